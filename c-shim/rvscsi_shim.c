/*
 * rvscsi_shim.c: the C part of the rvscsi kernel module.
 *
 * It holds only what the kernel expects to find as C data and C linkage:
 * the module linkage (_init(9E), _fini(9E), _info(9E), modldrv(9S),
 * modlinkage(9S), dev_ops(9S)) and the SCSA registration of the HBA
 * (scsi_hba_init(9F), scsi_hba_tran_alloc(9F) with the tran vectors
 * pointing at the Rust entry points, scsi_hba_attach_setup(9F), iport
 * registration). Everything else is in the Rust library, reached through
 * the functions declared in rvscsi.h.
 *
 * Built with the illumos headers (on illumos, or ILLUMOS_GATE=<checkout>
 * anywhere), or with the project's minimal declarations
 * (minimal/rvscsi_illumos.h). Either way the generated
 * rvscsi_abi_asserts.h checks that the layouts and constants the Rust
 * library was written against are the ones this compilation sees.
 */

#ifdef	RVSCSI_MINIMAL_HEADERS
#include "minimal/rvscsi_illumos.h"
#else
#include <sys/types.h>
#include <sys/modctl.h>
#include <sys/conf.h>
#include <sys/devops.h>
#include <sys/ddi.h>
#include <sys/sunddi.h>
#include <sys/scsi/scsi.h>
#include <sys/ddifm.h>
#include <sys/nvpair.h>
#include <sys/fm/protocol.h>
#endif

#include "rvscsi.h"
#include "rvscsi_abi_asserts.h"

#ifndef	RVSCSI_VERSION
#error "build.rs defines RVSCSI_VERSION (the crate version)"
#endif

/*
 * The one module rvscsi needs loaded first. The illumos link editor
 * records it with -N misc/scsi; GNU ld cannot, so krtld reads this symbol
 * instead (kobj.c, depends_on()).
 */
#ifndef	RVSCSI_ILLUMOS_LD
char _depends_on[] = "misc/scsi";
#endif

/* The iport every target hangs off (SCSI_HBA_HBA: all children are iports). */
static char rvscsi_iport_name[] = "iport0";

/*
 * attach(9E). The HBA node is brought up by Rust, then registered with
 * SCSA here; the iport node (created by the framework after
 * scsi_hba_iport_register) is attached by Rust.
 */
static int
rvscsi_attach(dev_info_t *dip, ddi_attach_cmd_t cmd)
{
	scsi_hba_tran_t *tran;
	ddi_dma_attr_t dma_attr;
	void *hba;

	/* No suspend/resume: the device is re-initialised by attach. */
	if (cmd != DDI_ATTACH)
		return (DDI_FAILURE);

	if (scsi_hba_iport_unit_address(dip) != NULL)
		return (rvscsi_iport_attach(dip));

	if ((hba = rvscsi_hba_attach(dip)) == NULL)
		return (DDI_FAILURE);

	tran = scsi_hba_tran_alloc(dip, SCSI_HBA_CANSLEEP);
	if (tran == NULL) {
		(void) rvscsi_hba_detach(hba);
		return (DDI_FAILURE);
	}
	tran->tran_hba_private = hba;
	tran->tran_hba_len = rvscsi_pkt_private_len();
	tran->tran_interconnect_type = rvscsi_interconnect_type();

	tran->tran_tgt_init = rvscsi_tran_tgt_init;
	tran->tran_tgt_free = rvscsi_tran_tgt_free;
	tran->tran_start = rvscsi_tran_start;
	tran->tran_abort = rvscsi_tran_abort;
	tran->tran_reset = rvscsi_tran_reset;
	tran->tran_getcap = rvscsi_tran_getcap;
	tran->tran_setcap = rvscsi_tran_setcap;
	/* tran_setup_pkt(9E): the framework allocates packets and binds DMA. */
	tran->tran_pkt_constructor = rvscsi_tran_pkt_constructor;
	tran->tran_pkt_destructor = rvscsi_tran_pkt_destructor;
	tran->tran_setup_pkt = rvscsi_tran_setup_pkt;
	tran->tran_teardown_pkt = rvscsi_tran_teardown_pkt;

	if (rvscsi_hba_dma_attr(hba, &dma_attr) != DDI_SUCCESS)
		goto fail_tran;

	/*
	 * SCSI_HBA_HBA: targets live under iports. SCSI_HBA_ADDR_COMPLEX:
	 * the target's address comes from its unit address, not the
	 * scsi_address. SCSI_HBA_TRAN_CDB/SCB: the framework allocates the
	 * CDB and status areas of each packet.
	 */
	if (scsi_hba_attach_setup(dip, &dma_attr, tran, SCSI_HBA_HBA |
	    SCSI_HBA_ADDR_COMPLEX | SCSI_HBA_TRAN_CDB | SCSI_HBA_TRAN_SCB) !=
	    DDI_SUCCESS)
		goto fail_tran;

	if (scsi_hba_iport_register(dip, rvscsi_iport_name) != DDI_SUCCESS)
		goto fail_setup;

	ddi_report_dev(dip);
	return (DDI_SUCCESS);

fail_setup:
	(void) scsi_hba_detach(dip);
fail_tran:
	scsi_hba_tran_free(tran);
	(void) rvscsi_hba_detach(hba);
	return (DDI_FAILURE);
}

/* detach(9E): the iport through Rust; the HBA from SCSA, then Rust. */
static int
rvscsi_detach(dev_info_t *dip, ddi_detach_cmd_t cmd)
{
	scsi_hba_tran_t *tran;
	void *hba;

	if (cmd != DDI_DETACH)
		return (DDI_FAILURE);

	if (scsi_hba_iport_unit_address(dip) != NULL)
		return (rvscsi_iport_detach(dip));

	if ((tran = ddi_get_driver_private(dip)) == NULL)
		return (DDI_FAILURE);
	hba = tran->tran_hba_private;

	/* scsi_hba_detach cannot be undone: ask first. */
	if (rvscsi_hba_detach_ready(hba) != DDI_SUCCESS)
		return (DDI_FAILURE);
	if (scsi_hba_detach(dip) != DDI_SUCCESS)
		return (DDI_FAILURE);
	if (rvscsi_hba_detach(hba) != DDI_SUCCESS) {
		/*
		 * Something started in between (it cannot, with no iport):
		 * the HBA keeps running unregistered rather than being freed
		 * under a command.
		 */
		return (DDI_FAILURE);
	}
	scsi_hba_tran_free(tran);
	return (DDI_SUCCESS);
}

/* quiesce(9E): fast reboot; Rust stops the device without blocking. */
static int
rvscsi_quiesce_node(dev_info_t *dip)
{
	if (scsi_hba_iport_unit_address(dip) != NULL)
		return (DDI_SUCCESS);
	return (rvscsi_quiesce(dip));
}

/*
 * rvscsi_shim_ereport_post (rvscsi.h): the one place the variadic
 * ddi_fm_ereport_post(9F) is called, with each optional member either
 * present or absent, so that every argument list here is fixed and
 * ends with NULL.
 */
void
rvscsi_shim_ereport_post(dev_info_t *dip, const char *class_name,
    unsigned long ena, const char *detail, const char *name1,
    unsigned long value1, const char *name2, unsigned long value2)
{
	/* Absent members are moved forward: no NULL name before the end. */
	if (name1 == NULL) {
		name1 = name2;
		value1 = value2;
		name2 = NULL;
	}
	if (detail != NULL) {
		if (name2 != NULL) {
			ddi_fm_ereport_post(dip, class_name, ena, DDI_NOSLEEP,
			    FM_VERSION, DATA_TYPE_UINT8, FM_EREPORT_VERS0,
			    "detail", DATA_TYPE_STRING, detail,
			    name1, DATA_TYPE_UINT64, (uint64_t)value1,
			    name2, DATA_TYPE_UINT64, (uint64_t)value2, NULL);
		} else if (name1 != NULL) {
			ddi_fm_ereport_post(dip, class_name, ena, DDI_NOSLEEP,
			    FM_VERSION, DATA_TYPE_UINT8, FM_EREPORT_VERS0,
			    "detail", DATA_TYPE_STRING, detail,
			    name1, DATA_TYPE_UINT64, (uint64_t)value1, NULL);
		} else {
			ddi_fm_ereport_post(dip, class_name, ena, DDI_NOSLEEP,
			    FM_VERSION, DATA_TYPE_UINT8, FM_EREPORT_VERS0,
			    "detail", DATA_TYPE_STRING, detail, NULL);
		}
	} else if (name2 != NULL) {
		ddi_fm_ereport_post(dip, class_name, ena, DDI_NOSLEEP,
		    FM_VERSION, DATA_TYPE_UINT8, FM_EREPORT_VERS0,
		    name1, DATA_TYPE_UINT64, (uint64_t)value1,
		    name2, DATA_TYPE_UINT64, (uint64_t)value2, NULL);
	} else if (name1 != NULL) {
		ddi_fm_ereport_post(dip, class_name, ena, DDI_NOSLEEP,
		    FM_VERSION, DATA_TYPE_UINT8, FM_EREPORT_VERS0,
		    name1, DATA_TYPE_UINT64, (uint64_t)value1, NULL);
	} else {
		ddi_fm_ereport_post(dip, class_name, ena, DDI_NOSLEEP,
		    FM_VERSION, DATA_TYPE_UINT8, FM_EREPORT_VERS0, NULL);
	}
}

static struct dev_ops rvscsi_dev_ops = {
	.devo_rev =		DEVO_REV,
	.devo_refcnt =		0,
	.devo_getinfo =		nodev,
	.devo_identify =	nulldev,
	.devo_probe =		nulldev,
	.devo_attach =		rvscsi_attach,
	.devo_detach =		rvscsi_detach,
	.devo_reset =		nodev,
	.devo_cb_ops =		NULL,	/* scsi_hba_init supplies them */
	.devo_bus_ops =		NULL,
	.devo_power =		NULL,
	.devo_quiesce =		rvscsi_quiesce_node,
};

/*
 * What modinfo(8) shows: both device families. The kernel keeps at most
 * MODMAXLINKINFOLEN bytes of it, NUL included (modconf.c mod_info copies
 * that many with strncpy: a longer name loses its NUL), so it must fit.
 */
#define	RVSCSI_LINKINFO	"rvscsi virtio/pvscsi HBA " RVSCSI_VERSION
_Static_assert(sizeof (RVSCSI_LINKINFO) <= MODMAXLINKINFOLEN,
    "modinfo would cut the linkage name");

static struct modldrv rvscsi_modldrv = {
	.drv_modops =		&mod_driverops,
	.drv_linkinfo =		RVSCSI_LINKINFO,
	.drv_dev_ops =		&rvscsi_dev_ops,
};

static struct modlinkage rvscsi_modlinkage = {
	.ml_rev =		MODREV_1,
	.ml_linkage =		{ &rvscsi_modldrv, NULL },
};

int
_init(void)
{
	int err;

	if ((err = scsi_hba_init(&rvscsi_modlinkage)) != 0)
		return (err);
	if ((err = mod_install(&rvscsi_modlinkage)) != 0)
		scsi_hba_fini(&rvscsi_modlinkage);
	return (err);
}

int
_fini(void)
{
	int err;

	if ((err = mod_remove(&rvscsi_modlinkage)) != 0)
		return (err);
	scsi_hba_fini(&rvscsi_modlinkage);
	return (0);
}

int
_info(struct modinfo *modinfop)
{
	return (mod_info(&rvscsi_modlinkage, modinfop));
}
