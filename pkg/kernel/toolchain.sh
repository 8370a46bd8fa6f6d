# shellcheck shell=bash
# Sourced by the build scripts: finds (and on Debian installs) the pinned
# Rust toolchain for the kernel target, and exports
#   KERNEL_CARGO, KERNEL_RUSTC  the cargo and rustc to use
#   RUSTC_BOOTSTRAP=1           build-std and JSON targets are unstable
#
# The kernel target's JSON format changes between Rust releases, so the
# version is pinned here and checked; moving to another release means
# re-checking pkg/kernel/x86_64-illumos-kernel.json and the module check.
#
#   Debian 12: rustc-web, cargo-web, rust-web-src (bookworm-security), whose
#              library source lands in /usr/lib/rustlib/src/rust;
#   illumos:   rustup toolchain $KERNEL_RUST_RELEASE with the rust-src
#              component.
# RVSCSI_KERNEL_CARGO / RVSCSI_KERNEL_RUSTC override both.

KERNEL_RUST_RELEASE=1.96.0

kernel_toolchain_fail() {
    echo "kernel toolchain: $*" >&2
    exit 1
}

kernel_toolchain_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else kernel_toolchain_fail "need root to run: $*"
    fi
}

if [ -n "${RVSCSI_KERNEL_CARGO:-}" ] || [ -n "${RVSCSI_KERNEL_RUSTC:-}" ]; then
    KERNEL_CARGO=${RVSCSI_KERNEL_CARGO:?set RVSCSI_KERNEL_CARGO with RVSCSI_KERNEL_RUSTC}
    KERNEL_RUSTC=${RVSCSI_KERNEL_RUSTC:?set RVSCSI_KERNEL_RUSTC with RVSCSI_KERNEL_CARGO}
elif [ "$(uname -s)" = SunOS ]; then
    # rustup is not an OmniOS package: it comes from its site and installs
    # into the invoking user's ~/.cargo/bin, which root's PATH lacks.
    command -v rustup >/dev/null 2>&1 ||
        kernel_toolchain_fail "rustup not found: install it from https://rustup.rs" \
            "(it is not an OmniOS package) and put ~/.cargo/bin on PATH" \
            "(export PATH=\$HOME/.cargo/bin:\$PATH), then run this again"
    rustup toolchain install "$KERNEL_RUST_RELEASE" --profile minimal --component rust-src >&2
    KERNEL_CARGO="rustup run $KERNEL_RUST_RELEASE cargo"
    KERNEL_RUSTC=$(rustup which --toolchain "$KERNEL_RUST_RELEASE" rustc)
else
    if ! /usr/bin/rustc --version 2>/dev/null | grep -q "^rustc ${KERNEL_RUST_RELEASE}" ||
        [ ! -x /usr/bin/cargo ] || [ ! -d /usr/lib/rustlib/src/rust/library ]; then
        command -v apt-get >/dev/null 2>&1 ||
            kernel_toolchain_fail "need Rust $KERNEL_RUST_RELEASE with its library source; no apt-get here (set RVSCSI_KERNEL_CARGO and RVSCSI_KERNEL_RUSTC)"
        echo "kernel toolchain: installing Debian's Rust $KERNEL_RUST_RELEASE (rustc-web, cargo-web, rust-web-src)" >&2
        kernel_toolchain_as_root apt-get update -qq
        kernel_toolchain_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "rustc-web=${KERNEL_RUST_RELEASE}*" \
            "cargo-web=${KERNEL_RUST_RELEASE}*" "rust-web-src=${KERNEL_RUST_RELEASE}*" >&2 ||
            kernel_toolchain_fail "apt-get could not install Rust $KERNEL_RUST_RELEASE (is bookworm-security enabled?)"
    fi
    KERNEL_CARGO=/usr/bin/cargo
    KERNEL_RUSTC=/usr/bin/rustc
fi

"$KERNEL_RUSTC" --version | grep -q "^rustc ${KERNEL_RUST_RELEASE}" ||
    kernel_toolchain_fail "$KERNEL_RUSTC is $("$KERNEL_RUSTC" --version), the kernel build is pinned to $KERNEL_RUST_RELEASE"
export KERNEL_CARGO KERNEL_RUSTC
export RUSTC_BOOTSTRAP=1
