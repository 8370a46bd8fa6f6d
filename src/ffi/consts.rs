//! illumos constants the driver uses, by their C names.
//!
//! Values were measured from the real headers (`test/abi/illumos-amd64-abi.tsv`);
//! a host test compares every entry of [`ABI_CONSTANTS`] with that table, and
//! the C shim's generated header `_Static_assert`s each one against the
//! headers it is compiled with.
#![allow(missing_docs)]

use core::ffi::c_int;

/// Declares constants and records them in [`ABI_CONSTANTS`].
macro_rules! abi_constants {
    ($( $(#[$m:meta])* $name:ident : $t:ty = $v:expr; )*) => {
        $( $(#[$m])* pub const $name: $t = $v; )*
        /// Every constant above, by C name, as a signed 64-bit value.
        pub const ABI_CONSTANTS: &[(&str, i64)] = &[ $( (stringify!($name), $name as i64), )* ];
    };
}

abi_constants! {
    // sunddi.h return values
    DDI_SUCCESS: c_int = 0;
    DDI_FAILURE: c_int = -1;
    DDI_ENOMEM: c_int = 1;
    DDI_EINVAL: c_int = -4;
    DDI_ENOTSUP: c_int = -5;
    DDI_EAGAIN: c_int = -3;
    DDI_SLEEP: c_int = 0;
    DDI_NOSLEEP: c_int = 1;

    // attach(9E) / detach(9E) commands
    DDI_ATTACH: c_int = 0;
    DDI_RESUME: c_int = 1;
    DDI_DETACH: c_int = 0;
    DDI_SUSPEND: c_int = 1;

    // kmem_alloc(9F)
    KM_SLEEP: c_int = 0;
    KM_NOSLEEP: c_int = 1;

    // cmn_err(9F) levels
    CE_CONT: c_int = 0;
    CE_NOTE: c_int = 1;
    CE_WARN: c_int = 2;
    CE_PANIC: c_int = 3;

    // mutex_init(9F) / cv_init(9F)
    MUTEX_DRIVER: c_int = 4;
    CV_DRIVER: c_int = 1;

    // ddi_device_acc_attr(9S)
    DDI_DEVICE_ATTR_V0: u16 = 1;
    DDI_DEVICE_ATTR_V1: u16 = 2;
    DDI_NEVERSWAP_ACC: u8 = 0;
    DDI_STRUCTURE_LE_ACC: u8 = 1;
    DDI_STRICTORDER_ACC: u8 = 0;
    DDI_DEFAULT_ACC: u8 = 1;

    // ddi_dma_attr(9S), ddi_dma_alloc_handle(9F), ddi_dma_mem_alloc(9F)
    DMA_ATTR_V0: u32 = 0;
    DDI_DMA_WRITE: u32 = 0x1;
    DDI_DMA_READ: u32 = 0x2;
    DDI_DMA_RDWR: u32 = 0x3;
    DDI_DMA_PARTIAL: u32 = 0x8;
    DDI_DMA_CONSISTENT: u32 = 0x10;
    DDI_DMA_STREAMING: u32 = 0x40;
    DDI_DMA_DONTWAIT: usize = 0;
    DDI_DMA_SLEEP: usize = 1;
    DDI_DMA_MAPPED: c_int = 0;
    DDI_DMA_PARTIAL_MAP: c_int = 1;
    DDI_DMA_NORESOURCES: c_int = -1;
    DDI_DMA_NOMAPPING: c_int = -2;
    DDI_DMA_TOOBIG: c_int = -3;
    DDI_DMA_INUSE: c_int = -9;
    DDI_DMA_SYNC_FORDEV: u32 = 0;
    DDI_DMA_SYNC_FORCPU: u32 = 1;
    DDI_DMA_SYNC_FORKERNEL: u32 = 2;

    // ddi_intr_*(9F)
    DDI_INTR_CLAIMED: u32 = 1;
    DDI_INTR_UNCLAIMED: u32 = 0;
    DDI_INTR_TYPE_FIXED: c_int = 1;
    DDI_INTR_TYPE_MSI: c_int = 2;
    DDI_INTR_TYPE_MSIX: c_int = 4;
    DDI_INTR_ALLOC_NORMAL: c_int = 0;
    DDI_INTR_ALLOC_STRICT: c_int = 1;
    DDI_INTR_FLAG_BLOCK: c_int = 0x100;
    DDI_INTR_PRI_MAX: u32 = 12;
    DDI_INTR_NOTFOUND: c_int = 1;
    DDI_EALREADY: c_int = -7;

    // ddi_cb_register(9F): ddi_cb_flags_t and ddi_cb_action_t
    // (sys/ddi_impldefs.h enums)
    DDI_CB_FLAG_INTR: c_int = 1;
    DDI_CB_INTR_ADD: c_int = 0;
    DDI_CB_INTR_REMOVE: c_int = 1;

    // ddi_prop_*(9F)
    DDI_PROP_SUCCESS: c_int = 0;
    DDI_PROP_NOT_FOUND: c_int = 1;
    DDI_PROP_INVAL_ARG: c_int = 4;
    DDI_PROP_DONTPASS: u32 = 0x1;
    DDI_DEV_T_ANY: u64 = 0xffff_ffff_ffff_fffe;

    // ddi_taskq_*(9F)
    TASKQ_DEFAULTPRI: i16 = -1;

    // PCI configuration space (pci.h)
    PCI_CONF_VENID: i64 = 0x0;
    PCI_CONF_DEVID: i64 = 0x2;
    PCI_CONF_COMM: i64 = 0x4;
    PCI_CONF_STAT: i64 = 0x6;
    PCI_CONF_REVID: i64 = 0x8;
    PCI_CONF_BASE0: i64 = 0x10;
    PCI_CONF_SUBVENID: i64 = 0x2c;
    PCI_CONF_SUBSYSID: i64 = 0x2e;
    PCI_CONF_CAP_PTR: i64 = 0x34;
    PCI_STAT_CAP: u16 = 0x10;
    PCI_CAP_ID_MSI: u8 = 0x5;
    PCI_CAP_ID_VS: u8 = 0x9;
    PCI_CAP_ID_MSI_X: u8 = 0x11;
    PCI_CAP_PTR_MASK: u8 = 0xfc;
    PCI_CAP_MAX_PTR: usize = 48;
    PCI_REG_REG_M: u32 = 0xff;
    PCI_ADDR_MASK: u32 = 0x0300_0000;
    PCI_ADDR_CONFIG: u32 = 0x0;
    PCI_ADDR_IO: u32 = 0x0100_0000;
    PCI_ADDR_MEM32: u32 = 0x0200_0000;
    PCI_ADDR_MEM64: u32 = 0x0300_0000;

    // scsi_pkt(9S): pkt_reason
    CMD_CMPLT: u8 = 0;
    CMD_INCOMPLETE: u8 = 1;
    CMD_DMA_DERR: u8 = 2;
    CMD_TRAN_ERR: u8 = 3;
    CMD_RESET: u8 = 4;
    CMD_ABORTED: u8 = 5;
    CMD_TIMEOUT: u8 = 6;
    CMD_DATA_OVR: u8 = 7;
    CMD_CMD_OVR: u8 = 8;
    CMD_STS_OVR: u8 = 9;
    CMD_TERMINATED: u8 = 22;
    CMD_DEV_GONE: u8 = 24;

    // tran_start(9E) return values
    TRAN_ACCEPT: c_int = 1;
    TRAN_BUSY: c_int = 0;
    TRAN_BADPKT: c_int = -1;
    TRAN_FATAL_ERROR: c_int = -2;

    // tran_reset(9E) levels
    RESET_ALL: c_int = 0;
    RESET_TARGET: c_int = 1;
    RESET_BUS: c_int = 2;
    RESET_LUN: c_int = 3;

    // scsi_init_pkt(9F) flags, seen by the HBA in the pkt flags it inspects
    PKT_CONSISTENT: u32 = 0x1;
    PKT_DMA_PARTIAL: u32 = 0x40000;
    PKT_XARQ: u32 = 0x80000;

    // SCSI status bytes (sys/scsi/generic/status.h)
    STATUS_GOOD: u8 = 0x00;
    STATUS_CHECK: u8 = 0x02;
    STATUS_BUSY: u8 = 0x08;
    STATUS_QFULL: u8 = 0x28;
    STATUS_MASK: u8 = 0x3e;

    // sense lengths (sys/scsi/generic/sense.h)
    SENSE_LENGTH: usize = 20;
    MAX_SENSE_LENGTH: usize = 252;

    // getcap/setcap interconnect types (sys/scsi/impl/services.h)
    INTERCONNECT_PARALLEL: c_int = 1;
    INTERCONNECT_SAS: c_int = 11;

    // scsi_hba_attach_setup(9F) flags, scsi_hba_tran_alloc(9F) flags
    SCSI_HBA_TRAN_CLONE: c_int = 0x01;
    SCSI_HBA_TRAN_CDB: c_int = 0x04;
    SCSI_HBA_TRAN_SCB: c_int = 0x08;
    SCSI_HBA_HBA: c_int = 0x10;
    SCSI_HBA_ADDR_COMPLEX: c_int = 0x40;
    SCSI_HBA_CANSLEEP: c_int = 0x01;

    // scsi_hba_tgtmap_create(9F)
    SCSI_TM_FULLSET: c_int = 0;
    SCSI_TM_PERADDR: c_int = 1;
    SCSI_TGT_SCSI_DEVICE: c_int = 0;

    // time units
    MICROSEC: i64 = 1_000_000;
    NANOSEC: i64 = 1_000_000_000;

    // module linkage (modlinkage(9S), dev_ops(9S)), for the C shim
    MODREV_1: c_int = 1;
    DEVO_REV: c_int = 4;
    // modctl.h: the most of drv_linkinfo modinfo(8) keeps, NUL included
    MODMAXLINKINFOLEN: usize = 32;

    // default pkt sizes (sys/scsi/scsi_pkt.h)
    DEFAULT_CDBLEN: usize = 16;
    DEFAULT_SCBLEN: usize = 32;

    // kstat_create(9F), kstat(9S), kstat_named(9S) (sys/kstat.h); measured
    // into test/abi/rvscsi-shim-abi.tsv
    KSTAT_STRLEN: usize = 31;
    KSTAT_TYPE_RAW: u8 = 0;
    KSTAT_TYPE_NAMED: u8 = 1;
    KSTAT_FLAG_VIRTUAL: u8 = 0x01;
    KSTAT_FLAG_VAR_SIZE: u8 = 0x02;
    KSTAT_FLAG_WRITABLE: u8 = 0x04;
    KSTAT_FLAG_PERSISTENT: u8 = 0x08;
    KSTAT_FLAG_DORMANT: u8 = 0x10;
    KSTAT_FLAG_INVALID: u8 = 0x20;
    KSTAT_READ: c_int = 0;
    KSTAT_WRITE: c_int = 1;
    KSTAT_DATA_UINT32: u8 = 2;
    KSTAT_DATA_UINT64: u8 = 4;
    KSTAT_DATA_STRING: u8 = 9;
    // ks_update's return codes besides 0 (sys/kstat.h; sys/errno.h)
    EACCES: c_int = 13;
    EIO: c_int = 5;

    // ddi_fm_init(9F) capabilities and ddi_fm_error(9S) (sys/ddifm.h)
    DDI_FM_NOT_CAPABLE: c_int = 0;
    DDI_FM_EREPORT_CAPABLE: c_int = 0x1;
    DDI_FM_ACCCHK_CAPABLE: c_int = 0x2;
    DDI_FM_DMACHK_CAPABLE: c_int = 0x4;
    DDI_FM_ERRCB_CAPABLE: c_int = 0x8;
    DDI_FM_OK: c_int = 0;
    DDI_FM_FATAL: c_int = -1;
    DDI_FM_NONFATAL: c_int = -2;
    DDI_FM_UNKNOWN: c_int = -3;
    DDI_FM_ERR_UNEXPECTED: c_int = 0;
    DDI_FM_ERR_EXPECTED: c_int = 1;
    DDI_FME_VER0: c_int = 0;
    DDI_FME_VER1: c_int = 1;
    DDI_FME_VERSION: c_int = 1;
    // ddi_fm_service_impact(9F): ddi_fault_impact_t (sys/sunddi.h enum)
    DDI_SERVICE_LOST: c_int = -32;
    DDI_SERVICE_DEGRADED: c_int = -16;
    DDI_SERVICE_UNAFFECTED: c_int = 0;
    DDI_SERVICE_RESTORED: c_int = 16;
    // handles whose faults the framework flags (ddi_device_acc_attr(9S),
    // ddi_dma_attr(9S)): what ddi_fm_acc_err_get/ddi_fm_dma_err_get report on
    DDI_FLAGERR_ACC: u8 = 0x02;
    DDI_DMA_FLAGERR: u32 = 0x200;
    // fm_ena_generate(9F) format, the ereport version (sys/fm/protocol.h)
    FM_ENA_FMT1: u8 = 1;
    FM_EREPORT_VERS0: u8 = 0;
    // nvpair data types of an ereport payload (sys/nvpair.h data_type_t)
    DATA_TYPE_UINT8: c_int = 23;
    DATA_TYPE_UINT32: c_int = 6;
    DATA_TYPE_UINT64: c_int = 8;
    DATA_TYPE_STRING: c_int = 9;
}

/// Declares string constants (the ereport class and payload names of
/// sys/fm/io/ddi.h and sys/fm/protocol.h) and records them in
/// [`ABI_STRINGS`].
macro_rules! abi_strings {
    ($( $(#[$m:meta])* $name:ident = $v:literal; )*) => {
        $( $(#[$m])* pub const $name: &str = $v; )*
        /// Every string constant above, by C name (what the macro expands
        /// to, measured into test/abi/rvscsi-shim-abi.tsv as `str` rows).
        pub const ABI_STRINGS: &[(&str, &str)] = &[ $( (stringify!($name), $name), )* ];
    };
}

abi_strings! {
    FM_VERSION = "version";
    FM_EREPORT_CLASS = "ereport";
    DDI_IO_CLASS = "io";
    DDI_FM_DEVICE = "device";
    DDI_FM_DEVICE_INVAL_STATE = "inval_state";
    DDI_FM_DEVICE_NO_RESPONSE = "no_response";
    DDI_FM_DEVICE_STALL = "stall";
    DDI_FM_DEVICE_BADINT_LIMIT = "badint_limit";
    DDI_FM_DEVICE_INTERN_CORR = "intern_corr";
    DDI_FM_DEVICE_INTERN_UNCORR = "intern_uncorr";
    DDI_FM_SERVICE_IMPACT = "service";
    DDI_FM_SERVICE_LOST = "lost";
    DDI_FM_SERVICE_DEGRADED = "degraded";
    DDI_FM_SERVICE_RESTORED = "restored";
    DDI_FM_SERVICE_UNAFFECTED = "unaffected";
    DVR_ERPT = "ddi.";
    DVR_ECONTEXT = "context";
    DVR_EVER = "version";
}

/// `NULL_FUNC`: do not wait for resources.
pub const NULL_FUNC: usize = 0;
/// `SLEEP_FUNC`: wait for resources.
pub const SLEEP_FUNC: usize = 1;
