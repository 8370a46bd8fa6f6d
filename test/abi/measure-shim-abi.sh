#!/usr/bin/env bash
# Measures, from real illumos headers, what the provided tables
# (illumos-amd64-abi.tsv) do not cover, and writes it in the same format to
# rvscsi-shim-abi.tsv: the layouts of the module-linkage structures the C
# shim fills (dev_ops, modldrv, modlinkage), the leading members of struct
# cpu the driver reads (cpu_seqid), the named-kstat structures (kstat_t,
# kstat_named_t: kstat_create(9F)), ddi_fm_error_t (ddi_fm_acc_err_get(9F)),
# the kstat and FMA constants (`const` rows) and the ereport class names
# and payload member names of sys/fm/io/ddi.h and sys/fm/protocol.h (`str`
# rows: the string a macro expands to).
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
size	kstat	sizeof (kstat_t)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_crtime	__builtin_offsetof(kstat_t, ks_crtime)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_next	__builtin_offsetof(kstat_t, ks_next)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_kid	__builtin_offsetof(kstat_t, ks_kid)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_module	__builtin_offsetof(kstat_t, ks_module)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_resv	__builtin_offsetof(kstat_t, ks_resv)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_instance	__builtin_offsetof(kstat_t, ks_instance)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_name	__builtin_offsetof(kstat_t, ks_name)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_type	__builtin_offsetof(kstat_t, ks_type)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_class	__builtin_offsetof(kstat_t, ks_class)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_flags	__builtin_offsetof(kstat_t, ks_flags)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_data	__builtin_offsetof(kstat_t, ks_data)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_ndata	__builtin_offsetof(kstat_t, ks_ndata)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_data_size	__builtin_offsetof(kstat_t, ks_data_size)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_snaptime	__builtin_offsetof(kstat_t, ks_snaptime)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_update	__builtin_offsetof(kstat_t, ks_update)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_private	__builtin_offsetof(kstat_t, ks_private)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_snapshot	__builtin_offsetof(kstat_t, ks_snapshot)	usr/src/uts/common/sys/kstat.h
offset	kstat.ks_lock	__builtin_offsetof(kstat_t, ks_lock)	usr/src/uts/common/sys/kstat.h
size	kstat_named	sizeof (kstat_named_t)	usr/src/uts/common/sys/kstat.h
offset	kstat_named.name	__builtin_offsetof(kstat_named_t, name)	usr/src/uts/common/sys/kstat.h
offset	kstat_named.data_type	__builtin_offsetof(kstat_named_t, data_type)	usr/src/uts/common/sys/kstat.h
offset	kstat_named.value	__builtin_offsetof(kstat_named_t, value)	usr/src/uts/common/sys/kstat.h
size	kstat_named.value	sizeof (((kstat_named_t *)0)->value)	usr/src/uts/common/sys/kstat.h
offset	kstat_named.value.ui64	__builtin_offsetof(kstat_named_t, value.ui64)	usr/src/uts/common/sys/kstat.h
size	ddi_fm_error	sizeof (ddi_fm_error_t)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_version	__builtin_offsetof(ddi_fm_error_t, fme_version)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_status	__builtin_offsetof(ddi_fm_error_t, fme_status)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_flag	__builtin_offsetof(ddi_fm_error_t, fme_flag)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_ena	__builtin_offsetof(ddi_fm_error_t, fme_ena)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_acc_handle	__builtin_offsetof(ddi_fm_error_t, fme_acc_handle)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_dma_handle	__builtin_offsetof(ddi_fm_error_t, fme_dma_handle)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_bus_specific	__builtin_offsetof(ddi_fm_error_t, fme_bus_specific)	usr/src/uts/common/sys/ddifm.h
offset	ddi_fm_error.fme_bus_type	__builtin_offsetof(ddi_fm_error_t, fme_bus_type)	usr/src/uts/common/sys/ddifm.h
const	KSTAT_STRLEN	KSTAT_STRLEN	usr/src/uts/common/sys/kstat.h
const	KSTAT_TYPE_NAMED	KSTAT_TYPE_NAMED	usr/src/uts/common/sys/kstat.h
const	KSTAT_TYPE_RAW	KSTAT_TYPE_RAW	usr/src/uts/common/sys/kstat.h
const	KSTAT_FLAG_VIRTUAL	KSTAT_FLAG_VIRTUAL	usr/src/uts/common/sys/kstat.h
const	KSTAT_FLAG_VAR_SIZE	KSTAT_FLAG_VAR_SIZE	usr/src/uts/common/sys/kstat.h
const	KSTAT_FLAG_WRITABLE	KSTAT_FLAG_WRITABLE	usr/src/uts/common/sys/kstat.h
const	KSTAT_FLAG_PERSISTENT	KSTAT_FLAG_PERSISTENT	usr/src/uts/common/sys/kstat.h
const	KSTAT_FLAG_DORMANT	KSTAT_FLAG_DORMANT	usr/src/uts/common/sys/kstat.h
const	KSTAT_FLAG_INVALID	KSTAT_FLAG_INVALID	usr/src/uts/common/sys/kstat.h
const	KSTAT_READ	KSTAT_READ	usr/src/uts/common/sys/kstat.h
const	KSTAT_WRITE	KSTAT_WRITE	usr/src/uts/common/sys/kstat.h
const	KSTAT_DATA_UINT32	KSTAT_DATA_UINT32	usr/src/uts/common/sys/kstat.h
const	KSTAT_DATA_UINT64	KSTAT_DATA_UINT64	usr/src/uts/common/sys/kstat.h
const	KSTAT_DATA_STRING	KSTAT_DATA_STRING	usr/src/uts/common/sys/kstat.h
const	EACCES	EACCES	usr/src/uts/common/sys/errno.h
const	EIO	EIO	usr/src/uts/common/sys/errno.h
const	FM_ENA_FMT1	FM_ENA_FMT1	usr/src/uts/common/sys/fm/protocol.h
const	FM_EREPORT_VERS0	FM_EREPORT_VERS0	usr/src/uts/common/sys/fm/protocol.h
const	DATA_TYPE_UINT8	DATA_TYPE_UINT8	usr/src/uts/common/sys/nvpair.h
const	DATA_TYPE_UINT32	DATA_TYPE_UINT32	usr/src/uts/common/sys/nvpair.h
const	DATA_TYPE_UINT64	DATA_TYPE_UINT64	usr/src/uts/common/sys/nvpair.h
const	DATA_TYPE_STRING	DATA_TYPE_STRING	usr/src/uts/common/sys/nvpair.h
str	FM_VERSION	FM_VERSION	usr/src/uts/common/sys/fm/protocol.h
str	FM_EREPORT_CLASS	FM_EREPORT_CLASS	usr/src/uts/common/sys/fm/protocol.h
str	DDI_IO_CLASS	DDI_IO_CLASS	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_DEVICE	DDI_FM_DEVICE	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_DEVICE_INVAL_STATE	DDI_FM_DEVICE_INVAL_STATE	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_DEVICE_NO_RESPONSE	DDI_FM_DEVICE_NO_RESPONSE	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_DEVICE_STALL	DDI_FM_DEVICE_STALL	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_DEVICE_BADINT_LIMIT	DDI_FM_DEVICE_BADINT_LIMIT	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_DEVICE_INTERN_CORR	DDI_FM_DEVICE_INTERN_CORR	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_DEVICE_INTERN_UNCORR	DDI_FM_DEVICE_INTERN_UNCORR	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_SERVICE_IMPACT	DDI_FM_SERVICE_IMPACT	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_SERVICE_LOST	DDI_FM_SERVICE_LOST	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_SERVICE_DEGRADED	DDI_FM_SERVICE_DEGRADED	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_SERVICE_RESTORED	DDI_FM_SERVICE_RESTORED	usr/src/uts/common/sys/fm/io/ddi.h
str	DDI_FM_SERVICE_UNAFFECTED	DDI_FM_SERVICE_UNAFFECTED	usr/src/uts/common/sys/fm/io/ddi.h
str	DVR_ERPT	DVR_ERPT	usr/src/uts/common/sys/fm/io/ddi.h
str	DVR_ECONTEXT	DVR_ECONTEXT	usr/src/uts/common/sys/fm/io/ddi.h
str	DVR_EVER	DVR_EVER	usr/src/uts/common/sys/fm/io/ddi.h
FACTS
)

{
	echo '#include <sys/types.h>'
	echo '#include <sys/modctl.h>'
	echo '#include <sys/conf.h>'
	echo '#include <sys/devops.h>'
	echo '#include <sys/cpuvar.h>'
	echo '#include <sys/errno.h>'
	echo '#include <sys/kstat.h>'
	echo '#include <sys/sunddi.h>'
	echo '#include <sys/ddifm.h>'
	echo '#include <sys/nvpair.h>'
	echo '#include <sys/fm/protocol.h>'
	echo '#include <sys/fm/io/ddi.h>'
	i=0
	while IFS=$'\t' read -r kind _name expr _hdr; do
		if [ "$kind" = str ]; then
			echo "const char rvscsi_fact_${i}[] = $expr;"
		else
			echo "const long rvscsi_fact_$i = $expr;"
		fi
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
		# A number is the .quad (or .zero) after the label; a string,
		# the .string there (its quotes taken off).
		v=$(awk -v s="rvscsi_fact_$i:" '
			$1 == s { getline
				if ($1 == ".string") { sub(/^[ \t]*\.string[ \t]*"/, ""); sub(/"$/, ""); print; exit }
				print ($1 == ".zero" ? 0 : $2); exit }' "$work/m.s")
		[ -n "$v" ] || { echo "no value for $name" >&2; exit 1; }
		printf '%s\t%s\t%s\t%s\n' "$kind" "$name" "$v" "$hdr"
		i=$((i + 1))
	done <<<"$facts"
} >"$out"
echo "wrote $out (illumos-gate $commit)"
