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
echo "== integration tests under DEBUG-kernel kmem (a representative set)"
# Constructor and destructor around every packet, freed objects poisoned
# with 0xdeadbeef and checked, caches reaped at random points drawn from
# the seed (test/emu/src/ddi/kmem.rs). The seed comes from the commit
# under test: every commit explores new reap points, and a failure is
# reproducible from the commit alone (or from the seed printed here). The test
# binaries are the ones the workspace build above made (building only
# rvscsi-sim would unify features differently and compile it all again);
# they run from their package's directory, as cargo runs them.
kmem_seed=${RVSCSI_KMEM_SEED:-0x$(git -C "$top" rev-parse --short=8 HEAD 2>/dev/null || echo 5eed)}
echo "RVSCSI_KMEM_DEBUG=1 RVSCSI_KMEM_SEED=$kmem_seed"
kmem_set='packets|bad_input|recovery|faults|io|hostile|queues|lifecycle|shim|pvscsi|pvscsi_hostile'
mapfile -t kmem_tests < <(cargo test --workspace --locked --no-run 2>&1 |
    sed -En "s#^ *Executable tests/($kmem_set)\.rs \((.*)\)\$#\2#p")
if [ "${#kmem_tests[@]}" -ne 11 ]; then
    echo "expected the 11 test binaries of $kmem_set, found: ${kmem_tests[*]}" >&2
    exit 1
fi
for t in "${kmem_tests[@]}"; do
    echo "-- $t"
    (cd test/sim && RVSCSI_KMEM_DEBUG=1 RVSCSI_KMEM_SEED=$kmem_seed "$top/$t" --test-threads=2)
done
echo "== fuzz (a short run of every hostile-device target)"
test/scripts/fuzz.sh --time 20
