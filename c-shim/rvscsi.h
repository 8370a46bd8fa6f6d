/*
 * rvscsi.h: the contract between the C shim (rvscsi_shim.c) and the Rust
 * driver library. This header is the single source of truth for it:
 *
 * - the shim includes it, so that the C compiler checks every call and
 *   every assignment of an entry point to a scsi_hba_tran(9S) member
 *   against the illumos headers (-Werror);
 * - build.rs runs bindgen on it, and the Rust library (src/contract.rs)
 *   proves at compile time that each of its #[no_mangle] functions has
 *   exactly the type declared here.
 *
 * It names the illumos types exactly as the illumos headers declare them
 * (dev_info_t is `struct __dev_info *`, so an entry point's `dev_info_t *`
 * is a pointer to that pointer type; sys/dditypes.h), and needs them
 * declared first: the shim includes the illumos headers (or the minimal
 * declarations, minimal/rvscsi_illumos.h) before it. Read alone, as
 * bindgen reads it (build.rs defines RVSCSI_CONTRACT_STANDALONE), it
 * declares the few illumos typedefs it uses itself, with the same types;
 * tests/typedefs.rs checks them against the measured illumos typedefs.
 *
 * Each function is declared through a function type (NAME_fn_t) so that
 * the Rust side can compare its own function with the type by name.
 */

#ifndef	RVSCSI_H
#define	RVSCSI_H

#if defined(RVSCSI_CONTRACT_STANDALONE)
/* As sys/types.h, dditypes.h, ddidmareq.h, scsi/impl/transport.h. */
typedef char *caddr_t;
typedef struct __dev_info *dev_info_t;
typedef struct ddi_dma_attr ddi_dma_attr_t;
typedef struct scsi_hba_tran scsi_hba_tran_t;
#elif !defined(_SYS_DDITYPES_H) && !defined(RVSCSI_MINIMAL_HEADERS)
#error "rvscsi.h: include the illumos headers (or the minimal ones) first"
#endif

struct scsi_address;
struct scsi_device;
struct scsi_pkt;

/*
 * ---- Implemented in Rust, called by the shim: attach(9E), detach(9E),
 * ---- quiesce(9E) work.
 */

/*
 * Brings up the HBA of node dip (DDI_ATTACH of the HBA node): registers,
 * features, rings, interrupts. Returns the HBA, which the shim stores in
 * tran_hba_private, or NULL (the failure was logged).
 */
typedef void *rvscsi_hba_attach_fn_t(dev_info_t *dip);
rvscsi_hba_attach_fn_t rvscsi_hba_attach;

/* Fills *attr with the DMA attributes of data buffers; DDI_SUCCESS. */
typedef int rvscsi_hba_dma_attr_fn_t(const void *hba,
    ddi_dma_attr_t *attr);
rvscsi_hba_dma_attr_fn_t rvscsi_hba_dma_attr;

/* tran_hba_len: the bytes of HBA private data each packet needs. */
typedef unsigned int rvscsi_pkt_private_len_fn_t(void);
rvscsi_pkt_private_len_fn_t rvscsi_pkt_private_len;

/* tran_interconnect_type (INTERCONNECT_*). */
typedef int rvscsi_interconnect_type_fn_t(void);
rvscsi_interconnect_type_fn_t rvscsi_interconnect_type;

/*
 * DDI_SUCCESS if the HBA can be detached now (nothing in flight); asked
 * before scsi_hba_detach(9F), which cannot be undone.
 */
typedef int rvscsi_hba_detach_ready_fn_t(const void *hba);
rvscsi_hba_detach_ready_fn_t rvscsi_hba_detach_ready;

/*
 * Stops and frees the HBA (after scsi_hba_detach(9F)). DDI_FAILURE leaves
 * it untouched.
 */
typedef int rvscsi_hba_detach_fn_t(void *hba);
rvscsi_hba_detach_fn_t rvscsi_hba_detach;

/* attach(9E) / detach(9E) of the iport node "iport0". */
typedef int rvscsi_iport_attach_fn_t(dev_info_t *dip);
rvscsi_iport_attach_fn_t rvscsi_iport_attach;
typedef int rvscsi_iport_detach_fn_t(dev_info_t *dip);
rvscsi_iport_detach_fn_t rvscsi_iport_detach;

/* quiesce(9E) of the HBA node: stops the device without blocking. */
typedef int rvscsi_quiesce_fn_t(dev_info_t *dip);
rvscsi_quiesce_fn_t rvscsi_quiesce;

/*
 * ---- Implemented in Rust, installed by the shim in scsi_hba_tran(9S):
 * ---- the tran_*(9E) entry points, with their exact illumos types.
 */

typedef int rvscsi_tran_tgt_init_fn_t(dev_info_t *hba_dip,
    dev_info_t *tgt_dip, scsi_hba_tran_t *tran,
    struct scsi_device *sd);
rvscsi_tran_tgt_init_fn_t rvscsi_tran_tgt_init;

typedef void rvscsi_tran_tgt_free_fn_t(dev_info_t *hba_dip,
    dev_info_t *tgt_dip, scsi_hba_tran_t *tran,
    struct scsi_device *sd);
rvscsi_tran_tgt_free_fn_t rvscsi_tran_tgt_free;

typedef int rvscsi_tran_pkt_constructor_fn_t(struct scsi_pkt *pkt,
    scsi_hba_tran_t *tran, int kmflag);
rvscsi_tran_pkt_constructor_fn_t rvscsi_tran_pkt_constructor;

typedef void rvscsi_tran_pkt_destructor_fn_t(struct scsi_pkt *pkt,
    scsi_hba_tran_t *tran);
rvscsi_tran_pkt_destructor_fn_t rvscsi_tran_pkt_destructor;

typedef int rvscsi_tran_setup_pkt_fn_t(struct scsi_pkt *pkt,
    int (*callback)(caddr_t), caddr_t arg);
rvscsi_tran_setup_pkt_fn_t rvscsi_tran_setup_pkt;

typedef void rvscsi_tran_teardown_pkt_fn_t(struct scsi_pkt *pkt);
rvscsi_tran_teardown_pkt_fn_t rvscsi_tran_teardown_pkt;

typedef int rvscsi_tran_start_fn_t(struct scsi_address *ap,
    struct scsi_pkt *pkt);
rvscsi_tran_start_fn_t rvscsi_tran_start;

typedef int rvscsi_tran_abort_fn_t(struct scsi_address *ap,
    struct scsi_pkt *pkt);
rvscsi_tran_abort_fn_t rvscsi_tran_abort;

typedef int rvscsi_tran_reset_fn_t(struct scsi_address *ap, int level);
rvscsi_tran_reset_fn_t rvscsi_tran_reset;

typedef int rvscsi_tran_getcap_fn_t(struct scsi_address *ap, char *cap,
    int whom);
rvscsi_tran_getcap_fn_t rvscsi_tran_getcap;

typedef int rvscsi_tran_setcap_fn_t(struct scsi_address *ap, char *cap,
    int value, int whom);
rvscsi_tran_setcap_fn_t rvscsi_tran_setcap;

/*
 * ---- Implemented in C, called by Rust.
 *
 * Everything else the library needs from the kernel is a public DDI
 * function it declares itself (src/ffi/funcs.rs). Here are what only C
 * can call safely: the variadic ddi_fm_ereport_post(9F), whose argument
 * list (name, DATA_TYPE_*, value triples ended by NULL) no compiler
 * checks, is called here with a fixed list, so that Rust never calls a C
 * variadic function.
 */

/*
 * Posts the ereport "ereport.io.<class>" (ddi_fm_ereport_post(9F) adds
 * "io."; class is e.g. "device.no_response", sys/fm/io/ddi.h) for dip
 * with the ENA ena (0: the DDI generates one), always DDI_NOSLEEP, so it
 * may be called from any context including a high-level interrupt
 * (ddi_fm_ereport_post(9F), CONTEXT). Payload, in order: "version"
 * (DATA_TYPE_UINT8, FM_EREPORT_VERS0, which the DDI requires first;
 * uts/common/os/ddifm.c fm_dev_ereport_postv), then "detail"
 * (DATA_TYPE_STRING) if detail is not NULL, then name1 = value1 and
 * name2 = value2 (DATA_TYPE_UINT64) for each name that is not NULL.
 * The caller must have been granted DDI_FM_EREPORT_CAPABLE by
 * ddi_fm_init(9F); without it the DDI drops the report.
 */
void rvscsi_shim_ereport_post(dev_info_t *dip, const char *class_name,
    unsigned long ena, const char *detail, const char *name1,
    unsigned long value1, const char *name2, unsigned long value2);

#endif	/* RVSCSI_H */
