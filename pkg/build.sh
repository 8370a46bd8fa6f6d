#!/usr/bin/env bash
# Builds rvscsi: the kernel module (checked against the illumos loader's
# rules), its IPS package (or, where the IPS tools are absent, the proto
# area and manifest), and shows the driver working on QEMU.
#
#   pkg/build.sh [--no-demo]
#
# Installs what it needs first (compilers, the pinned Rust for the kernel
# target, QEMU). Results:
#   target/kernel/rvscsi            the module (kernel/drv/amd64/rvscsi)
#   target/pkg/                     proto area, manifest, .p5p on illumos
# The demo attaches the driver to QEMU's virtio-scsi over a generated disk
# image and runs format and dd through it (rvscsi-sim), first with the
# library linked into rvscsi-sim, then with the module object itself.
set -euo pipefail
# Under set -e a failing command ends the script; say which one.
trap 'echo "build: failed (exit $?) at pkg/build.sh line $LINENO: $BASH_COMMAND" >&2' ERR
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

demo=1
for arg in "$@"; do
    case "$arg" in
        --no-demo) demo=0 ;;
        *) echo "build: unknown argument '$arg' (usage: pkg/build.sh [--no-demo])" >&2; exit 2 ;;
    esac
done

bash test/scripts/install-deps.sh
bash test/scripts/ensure-rust.sh
if [ "$(uname -s)" = SunOS ]; then
    # bindgen's libclang, and no demo: the test bed's QEMU device models run
    # on Linux. clang-sys searches only LIBCLANG_PATH when it is set, and
    # none of its default directories is OmniOS's /opt/ooce/llvm-NN/lib.
    # shellcheck source=kernel/illumos.sh
    . pkg/kernel/illumos.sh
    if [ -z "${LIBCLANG_PATH:-}" ]; then
        LIBCLANG_PATH=$(illumos_libclang_dir) || {
            echo "build: no libclang.so in /opt/ooce/llvm-*/lib; install $ILLUMOS_CLANG_PKG" \
                "(test/scripts/install-deps.sh does)" >&2
            exit 1
        }
        export LIBCLANG_PATH
    fi
    echo "build: libclang from $LIBCLANG_PATH"
    demo=0
fi

echo "== kernel module"
pkg/kernel/build-module.sh
echo "== module check"
cargo run --quiet --release --locked -p rvscsi-modcheck -- target/kernel/rvscsi
echo "== package"
pkg/package.sh

[ "$demo" = 1 ] || exit 0

echo "== demo: building the test bed (release)"
cargo build --workspace --release --locked
sim="$top/target/release/rvscsi-sim"
demo_dir="$top/target/demo"
mkdir -p "$demo_dir"
echo "== demo: a 64 MiB disk image and a 1 MiB pattern"
truncate -s 0 "$demo_dir/disk0.img" && truncate -s 64M "$demo_dir/disk0.img"
truncate -s 0 "$demo_dir/disk1.img" && truncate -s 16M "$demo_dir/disk1.img"
head -c 1048576 /dev/urandom > "$demo_dir/pattern.bin"
echo "\$ rvscsi-sim format disk0.img disk1.img,target=1"
"$sim" format "$demo_dir/disk0.img" "$demo_dir/disk1.img,target=1"
echo "\$ rvscsi-sim dd disk0.img -- if=pattern.bin of=/dev/rdsk/c0t0d0 bs=64k seek=16"
"$sim" dd "$demo_dir/disk0.img" -- if="$demo_dir/pattern.bin" of=/dev/rdsk/c0t0d0 bs=64k seek=16
echo "\$ rvscsi-sim dd disk0.img -- if=/dev/rdsk/c0t0d0 of=readback.bin bs=64k skip=16 count=16"
"$sim" dd "$demo_dir/disk0.img" -- if=/dev/rdsk/c0t0d0 of="$demo_dir/readback.bin" bs=64k skip=16 count=16
if cmp -s "$demo_dir/pattern.bin" "$demo_dir/readback.bin"; then
    echo "demo: the pattern read back through the driver is byte-identical"
else
    echo "demo: MISMATCH between the pattern and what was read back" >&2
    exit 1
fi
echo "== demo: the same through the kernel module object, loaded under krtld's rules"
echo "\$ rvscsi-sim --module target/kernel/rvscsi format disk0.img disk1.img,target=1"
"$sim" --module "$top/target/kernel/rvscsi" format "$demo_dir/disk0.img" "$demo_dir/disk1.img,target=1"
echo "\$ rvscsi-sim --module target/kernel/rvscsi dd disk0.img -- if=/dev/rdsk/c0t0d0 of=readback2.bin bs=64k skip=16 count=16"
"$sim" --module "$top/target/kernel/rvscsi" dd "$demo_dir/disk0.img" -- \
    if=/dev/rdsk/c0t0d0 of="$demo_dir/readback2.bin" bs=64k skip=16 count=16
if cmp -s "$demo_dir/pattern.bin" "$demo_dir/readback2.bin"; then
    echo "demo: the module read back the same pattern"
else
    echo "demo: MISMATCH reading through the module" >&2
    exit 1
fi
