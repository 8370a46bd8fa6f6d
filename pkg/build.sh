#!/usr/bin/env bash
# Builds rvscsi and shows it working: the driver library and the test bed
# in release mode, then rvscsi-sim attaches the driver to QEMU's
# virtio-scsi over a generated disk image and runs format and dd.
#
# Installs what it needs first (QEMU, toolchain parts).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash test/scripts/install-deps.sh
bash test/scripts/ensure-rust.sh

echo "== building (release)"
cargo build --workspace --release --locked

sim="$top/target/release/rvscsi-sim"
demo="$top/target/demo"
mkdir -p "$demo"
echo "== demo: a 64 MiB disk image and a 1 MiB pattern"
truncate -s 0 "$demo/disk0.img" && truncate -s 64M "$demo/disk0.img"
truncate -s 0 "$demo/disk1.img" && truncate -s 16M "$demo/disk1.img"
head -c 1048576 /dev/urandom > "$demo/pattern.bin"
echo "\$ rvscsi-sim format disk0.img disk1.img,target=1"
"$sim" format "$demo/disk0.img" "$demo/disk1.img,target=1"
echo "\$ rvscsi-sim dd disk0.img -- if=pattern.bin of=/dev/rdsk/c0t0d0 bs=64k seek=16"
"$sim" dd "$demo/disk0.img" -- if="$demo/pattern.bin" of=/dev/rdsk/c0t0d0 bs=64k seek=16
echo "\$ rvscsi-sim dd disk0.img -- if=/dev/rdsk/c0t0d0 of=readback.bin bs=64k skip=16 count=16"
"$sim" dd "$demo/disk0.img" -- if=/dev/rdsk/c0t0d0 of="$demo/readback.bin" bs=64k skip=16 count=16
if cmp -s "$demo/pattern.bin" "$demo/readback.bin"; then
    echo "demo: the pattern read back through the driver is byte-identical"
else
    echo "demo: MISMATCH between the pattern and what was read back" >&2
    exit 1
fi
