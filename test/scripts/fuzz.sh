#!/usr/bin/env bash
# Runs the hostile-device fuzz targets (test/fuzz) under libFuzzer.
#
#   test/scripts/fuzz.sh [--time SECONDS | --runs N] [TARGET...]
#
# Default: every target for 20 seconds (the short run test/run.sh does).
# A long run: test/scripts/fuzz.sh --runs 10000000
# Installs cargo-fuzz (crates.io) if it is missing. libFuzzer needs the
# sanitizer flags of a nightly compiler; RUSTC_BOOTSTRAP=1 lets the
# project's stable toolchain accept them. Prints each target's execution
# count; exits non-zero on a crash (the input is kept in
# test/fuzz/fuzz/artifacts/<target>/).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"

limit=(-max_total_time=20)
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time) limit=("-max_total_time=$2"); shift 2 ;;
        --runs) limit=("-runs=$2"); shift 2 ;;
        -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(ring response control config pvscsi_rings pvscsi_completion)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
    log=$(mktemp)
    if ! cargo fuzz run --fuzz-dir test/fuzz/fuzz "$t" -- "${limit[@]}" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz: $t FAILED (see test/fuzz/fuzz/artifacts/$t/)" >&2
        rm -f "$log"
        exit 1
    fi
    runs=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1)
    echo "fuzz: $t: ${runs:-done}, no crash"
    rm -f "$log"
done
