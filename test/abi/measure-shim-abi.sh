#!/usr/bin/env bash
# Measures, from real illumos headers, the layouts of the module-linkage
# structures the C shim fills (dev_ops, modldrv, modlinkage) and of the
# leading members of struct cpu the driver reads (cpu_seqid), which the
# provided tables (illumos-amd64-abi.tsv) do not cover, and writes them in
# the same format to rvscsi-shim-abi.tsv.
#
#   ILLUMOS_GATE=/path/to/illumos-gate test/abi/measure-shim-abi.sh
#
# The numbers come out of the compiler (gcc -S of offsetof/sizeof constants
# with -D_KERNEL for amd64), never typed by hand.
set -euo pipefail
: "${ILLUMOS_GATE:?set ILLUMOS_GATE to an illumos-gate checkout}"
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# kind<TAB>name<TAB>expression<TAB>header
facts=$(cat <<'FACTS'
size	dev_ops	sizeof (struct dev_ops)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_rev	__builtin_offsetof(struct dev_ops, devo_rev)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_refcnt	__builtin_offsetof(struct dev_ops, devo_refcnt)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_getinfo	__builtin_offsetof(struct dev_ops, devo_getinfo)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_identify	__builtin_offsetof(struct dev_ops, devo_identify)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_probe	__builtin_offsetof(struct dev_ops, devo_probe)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_attach	__builtin_offsetof(struct dev_ops, devo_attach)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_detach	__builtin_offsetof(struct dev_ops, devo_detach)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_reset	__builtin_offsetof(struct dev_ops, devo_reset)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_cb_ops	__builtin_offsetof(struct dev_ops, devo_cb_ops)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_bus_ops	__builtin_offsetof(struct dev_ops, devo_bus_ops)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_power	__builtin_offsetof(struct dev_ops, devo_power)	usr/src/uts/common/sys/devops.h
offset	dev_ops.devo_quiesce	__builtin_offsetof(struct dev_ops, devo_quiesce)	usr/src/uts/common/sys/devops.h
size	modldrv	sizeof (struct modldrv)	usr/src/uts/common/sys/modctl.h
offset	modldrv.drv_modops	__builtin_offsetof(struct modldrv, drv_modops)	usr/src/uts/common/sys/modctl.h
offset	modldrv.drv_linkinfo	__builtin_offsetof(struct modldrv, drv_linkinfo)	usr/src/uts/common/sys/modctl.h
offset	modldrv.drv_dev_ops	__builtin_offsetof(struct modldrv, drv_dev_ops)	usr/src/uts/common/sys/modctl.h
size	modlinkage	sizeof (struct modlinkage)	usr/src/uts/common/sys/modctl.h
offset	modlinkage.ml_rev	__builtin_offsetof(struct modlinkage, ml_rev)	usr/src/uts/common/sys/modctl.h
offset	modlinkage.ml_linkage	__builtin_offsetof(struct modlinkage, ml_linkage)	usr/src/uts/common/sys/modctl.h
size	modlinkage.ml_linkage	sizeof (((struct modlinkage *)0)->ml_linkage)	usr/src/uts/common/sys/modctl.h
offset	cpu.cpu_id	__builtin_offsetof(struct cpu, cpu_id)	usr/src/uts/common/sys/cpuvar.h
offset	cpu.cpu_seqid	__builtin_offsetof(struct cpu, cpu_seqid)	usr/src/uts/common/sys/cpuvar.h
size	cpu.cpu_seqid	sizeof (((struct cpu *)0)->cpu_seqid)	usr/src/uts/common/sys/cpuvar.h
FACTS
)

{
	echo '#include <sys/types.h>'
	echo '#include <sys/modctl.h>'
	echo '#include <sys/conf.h>'
	echo '#include <sys/devops.h>'
	echo '#include <sys/cpuvar.h>'
	i=0
	while IFS=$'\t' read -r _kind _name expr _hdr; do
		echo "const unsigned long rvscsi_fact_$i = $expr;"
		i=$((i + 1))
	done <<<"$facts"
} >"$work/m.c"

gcc -m64 -std=gnu99 -D_KERNEL -nostdinc -ffreestanding \
	-I"$ILLUMOS_GATE/usr/src/uts/intel" -I"$ILLUMOS_GATE/usr/src/uts/common" \
	-Wno-unknown-pragmas -Wno-format -O0 -S -o "$work/m.s" "$work/m.c"

commit=$(git -C "$ILLUMOS_GATE" rev-parse HEAD 2>/dev/null || echo unknown)
out="$here/rvscsi-shim-abi.tsv"
{
	printf 'kind\tname\tvalue\theader\n'
	i=0
	while IFS=$'\t' read -r kind name _expr hdr; do
		v=$(awk -v s="rvscsi_fact_$i:" '
			$1 == s { getline; print ($1 == ".zero" ? 0 : $2); exit }' "$work/m.s")
		[ -n "$v" ] || { echo "no value for $name" >&2; exit 1; }
		printf '%s\t%s\t%s\t%s\n' "$kind" "$name" "$v" "$hdr"
		i=$((i + 1))
	done <<<"$facts"
} >"$out"
echo "wrote $out (illumos-gate $commit)"
