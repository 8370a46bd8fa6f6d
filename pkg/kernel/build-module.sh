#!/usr/bin/env bash
# Builds the rvscsi kernel module, kernel/drv/amd64/rvscsi: the Rust library
# for the illumos kernel target (pkg/kernel/x86_64-illumos-kernel.json:
# kernel code model, no red zone, soft-float, static relocations, PLT calls,
# frame pointers, retpolines; build-std core+alloc; release, LTO, one
# codegen unit) with the C shim bundled (build.rs), linked into one
# relocatable object that exports only what mapfiles/rvscsi.mapfile lists.
#
#   pkg/kernel/build-module.sh
#
# Writes target/kernel/rvscsi (what ships) and target/kernel/rvscsi.debug
# (the same object with its DWARF, for mdb and debugging). Set
# ILLUMOS_GATE=<illumos-gate checkout> to compile the shim against the real
# illumos headers; without it the project's minimal declarations are used
# (both are checked against the same measured ABI).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
. pkg/kernel/toolchain.sh

spec=pkg/kernel/x86_64-illumos-kernel.json
target_name=$(basename "$spec" .json)
build_dir=target/kernel-build
out_dir=target/kernel
mapfile=mapfiles/rvscsi.mapfile
mkdir -p "$out_dir"

echo "build-module: Rust library for $target_name ($("$KERNEL_RUSTC" --version))"
# shellcheck disable=SC2086 # KERNEL_CARGO may be "rustup run <release> cargo"
RUSTC="$KERNEL_RUSTC" CARGO_TARGET_DIR="$build_dir" $KERNEL_CARGO rustc \
    -p rvscsi --lib --release --locked --features kernel \
    --target "$spec" -Zbuild-std=core,alloc -Zjson-target-spec \
    --crate-type staticlib
lib="$build_dir/$target_name/release/librvscsi.a"
[ -f "$lib" ] || { echo "build-module: $lib was not produced" >&2; exit 1; }

# The exported symbols: the mapfile's global list (single source).
mapfile_globals() {
    awk '/global:/ { on = 1; next } /local:/ { on = 0 } on && /;/ { gsub(/[ \t;]/, ""); print }' "$mapfile"
}
globals=$(mapfile_globals)
[ -n "$globals" ] || { echo "build-module: no global symbols in $mapfile" >&2; exit 1; }
undef_args=()
keep_args=()
for g in $globals; do
    undef_args+=(-u "$g")
    keep_args+=("--keep-global-symbol=$g")
done

module="$out_dir/rvscsi"
if [ "$(uname -s)" = SunOS ]; then
    # The illumos link editor records the dependency and applies the scope
    # (by absolute path: pkg/kernel/illumos.sh says why).
    # shellcheck source=illumos.sh
    . pkg/kernel/illumos.sh
    for tool in "$ILLUMOS_LD:$ILLUMOS_LD_PKG" "$ILLUMOS_STRIP:$ILLUMOS_STRIP_PKG"; do
        [ -x "${tool%%:*}" ] || {
            echo "build-module: ${tool%%:*} is missing (pkg install ${tool#*:})" >&2
            exit 1
        }
    done
    "$ILLUMOS_LD" -ztype=kmod -N misc/scsi -M "$mapfile" "${undef_args[@]}" -o "$module.debug" "$lib"
    cp "$module.debug" "$module"
    "$ILLUMOS_STRIP" -x "$module"
else
    # GNU ld: pull the shim (it defines _init) and what it reaches out of
    # the archive; _depends_on in the shim carries the dependency.
    ld -r -o "$out_dir/rvscsi.linked" "${undef_args[@]}" "$lib"
    objcopy \
        --remove-section=.llvmbc --remove-section=.llvmcmd \
        --remove-section=.eh_frame --remove-section=.rela.eh_frame \
        --remove-section=.note.GNU-stack \
        "${keep_args[@]}" \
        "$out_dir/rvscsi.linked" "$module.debug"
    objcopy --strip-debug "$module.debug" "$module"
    rm -f "$out_dir/rvscsi.linked"
fi
echo "build-module: wrote $module ($(wc -c <"$module") bytes)"
