#!/usr/bin/env bash
# Installs what the rvscsi build and test bed need on a Debian 12 (bookworm)
# machine, idempotently: QEMU's x86 system emulator (10.x from
# bookworm-backports, because the machine's qemu-utils comes from there and
# blocks bookworm's own 7.2), an unpacked QEMU 7.2 for the abort scenarios that
# 10.0.2 deadlocks on, and the host tools the build and checks use (gcc and
# binutils for the C shim and the module link, g++ for libFuzzer, libclang for
# bindgen, mandoc for the man page, qemu-img for the OmniOS VM script,
# valgrind for the bench's instruction counts, shellcheck for the scripts).
# The pinned Rust for the kernel target is installed by
# pkg/kernel/toolchain.sh when the module is built.
#
# Usage: test/scripts/install-deps.sh [--qemu72]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
want_qemu72=0
for arg in "$@"; do
    case "$arg" in
        --qemu72) want_qemu72=1 ;;
        *) echo "install-deps: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else echo "install-deps: need root to run: $*" >&2; return 1
    fi
}

if [ "$(uname -s)" = SunOS ]; then
    # Building on illumos (OmniOS): the compiler, the illumos link editor
    # and strip, the kernel headers, libclang for bindgen (the IPS tools and
    # mandoc are part of the base system). QEMU and the test bed are
    # Linux-only; the module is built, checked and packaged.
    # shellcheck source=../../pkg/kernel/illumos.sh
    . "$top/pkg/kernel/illumos.sh"
    need=()
    command -v gcc >/dev/null 2>&1 || need+=(developer/gcc14)
    [ -x "$ILLUMOS_LD" ] || need+=("$ILLUMOS_LD_PKG")
    [ -x "$ILLUMOS_STRIP" ] || need+=("$ILLUMOS_STRIP_PKG")
    [ -f "$illumos_root/usr/include/sys/scsi/scsi.h" ] || need+=(system/header)
    if ! illumos_libclang_dir >/dev/null; then
        # ooce/ packages come from the extra publisher, which the installer
        # sets up only when "Extra Packages Repo" is chosen in its
        # configuration menu (kayak installer/config-menu, cfg_extrarepo).
        if ! pkg publisher -H "$ILLUMOS_EXTRA_PUBLISHER" >/dev/null 2>&1; then
            release=$(uname -v | sed -n 's/^omnios-\(r[0-9]*\).*/\1/p')
            echo "install-deps: $ILLUMOS_CLANG_PKG (libclang for bindgen) comes from the" \
                "$ILLUMOS_EXTRA_PUBLISHER publisher, which is not configured; add it with" >&2
            echo "  pkg set-publisher -g https://pkg.omnios.org/${release:-<release>}/extra $ILLUMOS_EXTRA_PUBLISHER" >&2
            exit 1
        fi
        need+=("$ILLUMOS_CLANG_PKG")
    fi
    if [ ${#need[@]} -gt 0 ]; then
        illumos_pkg_install "${need[@]}" || {
            echo "install-deps: could not install ${need[*]}" >&2
            exit 1
        }
    fi
    libclang=$(illumos_libclang_dir) || {
        echo "install-deps: no libclang.so in /opt/ooce/llvm-*/lib after installing $ILLUMOS_CLANG_PKG" >&2
        exit 1
    }
    echo "install-deps: ok (illumos build host; libclang in $libclang)"
    exit 0
fi

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
# qemu-img (the OmniOS VM script's disks) is only recommended by it.
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
# From bookworm itself (not backports): the build tools.
need_base=()
command -v mandoc >/dev/null 2>&1 || need_base+=(mandoc)
command -v objcopy >/dev/null 2>&1 || need_base+=(binutils)
command -v cc >/dev/null 2>&1 || need_base+=(gcc)
# libfuzzer-sys builds libFuzzer's C++ sources (test/scripts/fuzz.sh).
command -v c++ >/dev/null 2>&1 || need_base+=(g++)
# callgrind counts the driver's instructions for rvscsi-sim bench.
command -v valgrind >/dev/null 2>&1 || need_base+=(valgrind)
# Every shell script is checked with shellcheck (tests/shellcheck.rs).
command -v shellcheck >/dev/null 2>&1 || need_base+=(shellcheck)
# bindgen loads libclang at build time.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
    need_base+=(libclang-dev)
fi

if [ ${#need_base[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: missing ${need_base[*]} and no apt-get to install them" >&2
        exit 1
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need_base[@]}"
fi

if [ ${#need_pkgs[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: missing ${need_pkgs[*]} and no apt-get to install them" >&2
        exit 1
    fi
    # Debian 12 machines here carry qemu-utils from bookworm-backports, which
    # conflicts with bookworm's qemu-system-x86 7.2. Enable backports using the
    # same mirror the machine already uses (never a hard-coded host).
    . /etc/os-release
    if [ "${VERSION_CODENAME:-}" = bookworm ] && \
       ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
                 | awk '{print $2}' | grep -v security | head -n1)
        [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list \
                 | awk '{print $2}' | grep -v security | head -n1)
        if [ -z "$mirror" ]; then
            echo "install-deps: cannot find the machine's Debian mirror" >&2
            exit 1
        fi
        echo "install-deps: enabling bookworm-backports from $mirror"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" | as_root tee /etc/apt/sources.list.d/rvscsi-backports.sources >/dev/null
    fi
    as_root apt-get update -qq
    extra=()
    if [ "${VERSION_CODENAME:-}" = bookworm ]; then extra=(-t bookworm-backports); fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${extra[@]}" "${need_pkgs[@]}"
fi

if [ "$want_qemu72" = 1 ]; then
    dest="$top/target/qemu72"
    if [ ! -x "$dest/root/usr/bin/qemu-system-x86_64" ]; then
        echo "install-deps: unpacking QEMU 7.2 into $dest"
        mkdir -p "$dest/debs" "$dest/root"
        # bookworm's own 7.2 (the release pin picks it over backports);
        # unpacked, never installed, so it cannot conflict with 10.x.
        (cd "$dest/debs" && apt-get download -q \
            qemu-system-x86/bookworm qemu-system-common/bookworm qemu-system-data/bookworm)
        for d in "$dest"/debs/*.deb; do dpkg-deb -x "$d" "$dest/root"; done
        "$dest/root/usr/bin/qemu-system-x86_64" --version | head -n1
    fi
fi
echo "install-deps: ok ($(qemu-system-x86_64 --version | head -n1))"
