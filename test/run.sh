#!/usr/bin/env bash
# Runs every rvscsi test: the kernel module build and its check against the
# illumos loader's rules, the package, formatting and lint gates, the
# driver's unit and property tests, the qtest client's tests, and the
# integration tests that attach the driver to QEMU's virtio-scsi device
# model through the DDI emulation, directly and through the C shim (QEMU 7.2
# is unpacked for the task-management scenarios).
#
# Installs what it needs first (QEMU, QEMU 7.2, toolchain parts).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash test/scripts/install-deps.sh --qemu72
bash test/scripts/ensure-rust.sh

# The module and package the tests check (tests/package.rs,
# test/modcheck): built exactly as the README's build command builds them.
pkg/build.sh --no-demo

echo "== format"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
# Two cores: two test threads keep QEMU and the tests from starving each
# other; every wait in the test bed is bounded.
cargo test --workspace --locked -- --test-threads=2
echo "== fuzz (a short run of every hostile-device target)"
test/scripts/fuzz.sh --time 20
