//! `#[repr(C)]` mirrors of the illumos structures the driver touches, with the
//! C names kept so that they can be checked line by line against the headers.
//!
//! Every offset and size below is asserted at compile time against the values
//! measured from the real illumos headers (`shared/illumos-abi/*.tsv`, commit
//! 01d4d8e7 of illumos-gate, amd64, `-D_KERNEL`). The C shim re-checks the
//! same numbers with `_Static_assert` against the headers it is compiled with.
//!
//! The DDI promises the *documented members* of `scsi_pkt(9S)`,
//! `scsi_address(9S)`, `ddi_dma_cookie(9S)`, `ddi_dma_attr(9S)` and
//! `scsi_hba_tran(9S)`, not their total sizes. The driver only reads and
//! writes members; it never allocates a `scsi_pkt`, `scsi_hba_tran` or
//! `scsi_device` itself (the framework does), so nothing here relies on a
//! total size except where the test bed's emulation allocates them.
#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_int, c_uint, c_void};

/// `uint_t`
pub type uint_t = c_uint;
/// `uchar_t`
pub type uchar_t = u8;
/// `caddr_t`
pub type caddr_t = *mut c_char;
/// `opaque_t`
pub type opaque_t = *mut c_void;
/// `off_t` (LP64: `long`)
pub type off_t = i64;
/// `offset_t` (`long long`)
pub type offset_t = i64;
/// `clock_t` (LP64: `long`)
pub type clock_t = i64;
/// `hrtime_t` (`long long`)
pub type hrtime_t = i64;
/// `ssize_t`
pub type ssize_t = isize;
/// `boolean_t` (an enum in C: int sized)
pub type boolean_t = c_int;
/// `dev_t` (LP64: `unsigned long`)
pub type dev_t = u64;
/// `pri_t`
pub type pri_t = i16;

macro_rules! opaque_types {
    ($($(#[$m:meta])* $name:ident;)*) => {$(
        $(#[$m])*
        #[repr(C)]
        pub struct $name {
            _private: [u8; 0],
            _not_send_sync: core::marker::PhantomData<*mut u8>,
        }
    )*};
}

opaque_types! {
    /// `struct __dev_info`: the opaque tag `dev_info_t` points to
    /// (`typedef struct __dev_info *dev_info_t;`, sys/dditypes.h). The
    /// kernel's node is `struct dev_info` (sys/ddi_impldefs.h), which a
    /// driver never sees.
    __dev_info;
    /// `struct __ddi_acc_handle`, behind `ddi_acc_handle_t` (sys/dditypes.h).
    __ddi_acc_handle;
    /// `struct __ddi_dma_handle`, behind `ddi_dma_handle_t` (sys/dditypes.h).
    __ddi_dma_handle;
    /// `struct __ddi_intr_handle`, behind `ddi_intr_handle_t` (sys/ddi_intr.h).
    __ddi_intr_handle;
    /// `struct __ddi_periodic`, behind `ddi_periodic_t` (sys/dditypes.h).
    __ddi_periodic;
    /// `struct __ddi_cb`, behind `ddi_cb_handle_t` (sys/sunddi.h).
    __ddi_cb;
    /// `struct scsi_device`: reached only through DDI accessors
    /// (`scsi_address_device(9F)`, `scsi_device_hba_private_get(9F)`).
    scsi_device;
    /// `struct __scsi_tgtmap`, which `scsi_hba_tgtmap_t` names
    /// (sys/scsi/impl/transport.h).
    __scsi_tgtmap;
    /// `struct ddi_taskq`, which `ddi_taskq_t` names (sys/sunddi.h).
    ddi_taskq;
    /// `struct buf`: the driver never looks inside; the framework binds it.
    buf;
    /// `struct kmem_cache`, which `kmem_cache_t` names (sys/kmem.h).
    kmem_cache;
    /// `struct mod_ops` (the kernel's `mod_driverops`).
    mod_ops;
    /// `struct modinfo` (filled by `mod_info(9F)`).
    modinfo;
    /// `struct cb_ops` (the framework supplies an HBA's).
    cb_ops;
    /// `struct bus_ops` (the framework supplies an HBA's).
    bus_ops;
    /// `struct __ddi_iblock_cookie`, behind `ddi_iblock_cookie_t`
    /// (sys/dditypes.h): what `ddi_fm_init(9F)` returns as the error
    /// handling priority.
    __ddi_iblock_cookie;
}

// The illumos handle typedefs, spelled as illumos declares them, so that
// `*mut dev_info_t` here is `dev_info_t *` in C: a pointer to a pointer
// type, which is what the DDI hands a driver and what it passes back.
// (tests/typedefs.rs checks every alias below against the measured
// typedefs, test/abi/illumos-typedefs.tsv.)

/// `dev_info_t`: `struct __dev_info *` (sys/dditypes.h).
pub type dev_info_t = *mut __dev_info;
/// `ddi_acc_handle_t`: `struct __ddi_acc_handle *` (sys/dditypes.h).
pub type ddi_acc_handle_t = *mut __ddi_acc_handle;
/// `ddi_dma_handle_t`: `struct __ddi_dma_handle *` (sys/dditypes.h).
pub type ddi_dma_handle_t = *mut __ddi_dma_handle;
/// `ddi_intr_handle_t`: `struct __ddi_intr_handle *` (sys/ddi_intr.h).
pub type ddi_intr_handle_t = *mut __ddi_intr_handle;
/// `ddi_iblock_cookie_t`: `struct __ddi_iblock_cookie *` (sys/dditypes.h).
pub type ddi_iblock_cookie_t = *mut __ddi_iblock_cookie;
/// `ddi_periodic_t`: `struct __ddi_periodic *` (sys/dditypes.h).
pub type ddi_periodic_t = *mut __ddi_periodic;
/// `scsi_hba_tgtmap_t`: `struct __scsi_tgtmap` (sys/scsi/impl/transport.h).
pub type scsi_hba_tgtmap_t = __scsi_tgtmap;
/// `ddi_taskq_t`: `struct ddi_taskq` (sys/sunddi.h).
pub type ddi_taskq_t = ddi_taskq;
/// `kmem_cache_t`: `struct kmem_cache` (sys/kmem.h).
pub type kmem_cache_t = kmem_cache;
/// `timeout_id_t`: `void *` (sys/types.h).
pub type timeout_id_t = *mut c_void;
/// `scsi_hba_tran_t`: `struct scsi_hba_tran` (sys/scsi/impl/transport.h).
pub type scsi_hba_tran_t = scsi_hba_tran;

/// `ddi_intr_handler_t`: in C the function type `uint_t (caddr_t, caddr_t)`
/// (sys/ddi_intr.h), which a parameter of that type adjusts to a pointer
/// to (C11 6.7.6.3); Rust has no function types, so this is that pointer.
pub type ddi_intr_handler_t = unsafe extern "C" fn(caddr_t, caddr_t) -> uint_t;

/// `ddi_cb_flags_t`: an enum of `sys/ddi_impldefs.h` (`DDI_CB_FLAG_INTR`),
/// int-sized on amd64.
pub type ddi_cb_flags_t = c_int;
/// `ddi_cb_action_t`: an enum of `sys/ddi_impldefs.h` (`DDI_CB_INTR_ADD`,
/// `DDI_CB_INTR_REMOVE`), int-sized on amd64.
pub type ddi_cb_action_t = c_int;
/// `ddi_cb_handle_t`: `struct __ddi_cb **` (sys/sunddi.h), opaque to
/// drivers; the driver only hands it back to `ddi_cb_unregister(9F)`.
pub type ddi_cb_handle_t = *mut *mut __ddi_cb;
/// `ddi_cb_func_t`: `int (*)(dev_info_t *, ddi_cb_action_t, void *cbarg,
/// void *arg1, void *arg2)` (sys/ddi_impldefs.h).
pub type ddi_cb_func_t = unsafe extern "C" fn(
    *mut dev_info_t,
    ddi_cb_action_t,
    *mut c_void,
    *mut c_void,
    *mut c_void,
) -> c_int;

/// A resource callback argument: `int (*)(caddr_t)`, which the DDI also
/// accepts as the two magic values `DDI_DMA_SLEEP`/`SLEEP_FUNC` (1) and
/// `DDI_DMA_DONTWAIT`/`NULL_FUNC` (0). It is passed as a pointer-sized value;
/// the driver never calls it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ddi_callback_t(pub usize);

/// The same `int (*)(caddr_t)` argument with its exact C type, where the
/// driver receives it (`tran_setup_pkt(9E)`). `SLEEP_FUNC` arrives as
/// `Some` of the non-callable address 1: never call it, only compare.
pub type ddi_waitfp_t = Option<unsafe extern "C" fn(caddr_t) -> c_int>;

/// `kmutex_t`: opaque, one pointer wide (mutex(9F)).
#[repr(C)]
pub struct kmutex_t {
    pub _opaque: [*mut c_void; 1],
}

/// `kcondvar_t`: opaque, two bytes (condvar(9F)).
#[repr(C)]
pub struct kcondvar_t {
    pub _opaque: u16,
}

/// The SPI form of `scsi_address(9S)`'s address union.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct scsi_address_spi {
    pub a_target: u16,
    pub a_lun: u8,
    pub _a_sublun: u8,
}

/// The address union of `scsi_address(9S)`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union scsi_address_a {
    pub spi: scsi_address_spi,
    /// With `SCSI_HBA_ADDR_COMPLEX`, the `scsi_device` of the target.
    pub a_sd: *mut scsi_device,
}

/// `struct scsi_address` (scsi_address(9S)).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct scsi_address {
    pub a_hba_tran: *mut scsi_hba_tran,
    pub a: scsi_address_a,
}

/// `ddi_dma_cookie_t` (ddi_dma_cookie(9S)). The C type has a union of
/// `dmac_laddress` (u64) and `dmac_address`/`dmac_notused` (2 x u32); on
/// amd64 the driver only uses the 64-bit view.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ddi_dma_cookie_t {
    pub dmac_laddress: u64,
    pub dmac_size: usize,
    pub dmac_type: uint_t,
}

/// `ddi_dma_attr_t` (ddi_dma_attr(9S)).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ddi_dma_attr_t {
    pub dma_attr_version: uint_t,
    pub dma_attr_addr_lo: u64,
    pub dma_attr_addr_hi: u64,
    pub dma_attr_count_max: u64,
    pub dma_attr_align: u64,
    pub dma_attr_burstsizes: uint_t,
    pub dma_attr_minxfer: u32,
    pub dma_attr_maxxfer: u64,
    pub dma_attr_seg: u64,
    pub dma_attr_sgllen: c_int,
    pub dma_attr_granular: u32,
    pub dma_attr_flags: uint_t,
}

/// `ddi_device_acc_attr_t` (ddi_device_acc_attr(9S)).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ddi_device_acc_attr_t {
    pub devacc_attr_version: u16,
    pub devacc_attr_endian_flags: u8,
    pub devacc_attr_dataorder: u8,
    pub devacc_attr_access: u8,
}

/// `struct scsi_pkt` (scsi_pkt(9S)), through `pkt_stmp`.
#[repr(C)]
pub struct scsi_pkt {
    pub pkt_ha_private: opaque_t,
    pub pkt_address: scsi_address,
    pub pkt_private: opaque_t,
    pub pkt_comp: Option<unsafe extern "C" fn(*mut scsi_pkt)>,
    pub pkt_flags: uint_t,
    pub pkt_time: c_int,
    pub pkt_scbp: *mut uchar_t,
    pub pkt_cdbp: *mut uchar_t,
    pub pkt_resid: ssize_t,
    pub pkt_state: uint_t,
    pub pkt_statistics: uint_t,
    pub pkt_reason: uchar_t,
    pub pkt_cdblen: uint_t,
    pub pkt_tgtlen: uint_t,
    pub pkt_scblen: uint_t,
    pub pkt_handle: ddi_dma_handle_t,
    pub pkt_numcookies: uint_t,
    pub pkt_dma_offset: off_t,
    pub pkt_dma_len: usize,
    pub pkt_dma_flags: uint_t,
    pub pkt_cookies: *mut ddi_dma_cookie_t,
    pub pkt_path_instance: c_int,
    pub pkt_stmp: *mut c_void,
}

/// Generic function-pointer slot of `scsi_hba_tran` for vectors the driver
/// leaves NULL; their exact C types are in `illumos-amd64-fields.tsv`.
pub type tran_unused_fn = Option<unsafe extern "C" fn()>;

/// `tran_tgt_init` / `tran_tgt_free` signature.
pub type tran_tgt_init_fn = unsafe extern "C" fn(
    *mut dev_info_t,
    *mut dev_info_t,
    *mut scsi_hba_tran,
    *mut scsi_device,
) -> c_int;
/// `tran_tgt_free`
pub type tran_tgt_free_fn =
    unsafe extern "C" fn(*mut dev_info_t, *mut dev_info_t, *mut scsi_hba_tran, *mut scsi_device);
/// `tran_tgt_probe`
pub type tran_tgt_probe_fn =
    unsafe extern "C" fn(*mut scsi_device, Option<unsafe extern "C" fn() -> c_int>) -> c_int;
/// `tran_start` / `tran_abort`
pub type tran_start_fn = unsafe extern "C" fn(*mut scsi_address, *mut scsi_pkt) -> c_int;
/// `tran_reset`
pub type tran_reset_fn = unsafe extern "C" fn(*mut scsi_address, c_int) -> c_int;
/// `tran_getcap`
pub type tran_getcap_fn = unsafe extern "C" fn(*mut scsi_address, *mut c_char, c_int) -> c_int;
/// `tran_setcap`
pub type tran_setcap_fn =
    unsafe extern "C" fn(*mut scsi_address, *mut c_char, c_int, c_int) -> c_int;
/// `tran_pkt_constructor`
pub type tran_pkt_constructor_fn =
    unsafe extern "C" fn(*mut scsi_pkt, *mut scsi_hba_tran, c_int) -> c_int;
/// `tran_pkt_destructor`
pub type tran_pkt_destructor_fn = unsafe extern "C" fn(*mut scsi_pkt, *mut scsi_hba_tran);
/// `tran_setup_pkt`
pub type tran_setup_pkt_fn = unsafe extern "C" fn(*mut scsi_pkt, ddi_waitfp_t, caddr_t) -> c_int;
/// `tran_teardown_pkt`
pub type tran_teardown_pkt_fn = unsafe extern "C" fn(*mut scsi_pkt);
/// `tran_quiesce` / `tran_unquiesce`
pub type tran_quiesce_fn = unsafe extern "C" fn(*mut dev_info_t) -> c_int;
/// `tran_bus_reset`
pub type tran_bus_reset_fn = unsafe extern "C" fn(*mut dev_info_t, c_int) -> c_int;

/// `struct scsi_hba_tran` (scsi_hba_tran(9S)), every member, so that the test
/// bed can allocate one of the real size the way `scsi_hba_tran_alloc(9F)`
/// does. The driver itself only uses `tran_hba_private`.
#[repr(C)]
pub struct scsi_hba_tran {
    pub tran_hba_dip: *mut dev_info_t,
    pub tran_hba_private: *mut c_void,
    pub tran_tgt_private: *mut c_void,
    pub tran_sd: *mut scsi_device,
    pub tran_tgt_init: Option<tran_tgt_init_fn>,
    pub tran_tgt_probe: Option<tran_tgt_probe_fn>,
    pub tran_tgt_free: Option<tran_tgt_free_fn>,
    pub tran_start: Option<tran_start_fn>,
    pub tran_reset: Option<tran_reset_fn>,
    pub tran_abort: Option<tran_start_fn>,
    pub tran_getcap: Option<tran_getcap_fn>,
    pub tran_setcap: Option<tran_setcap_fn>,
    pub tran_init_pkt: tran_unused_fn,
    pub tran_destroy_pkt: tran_unused_fn,
    pub tran_dmafree: tran_unused_fn,
    pub tran_sync_pkt: tran_unused_fn,
    pub tran_reset_notify: tran_unused_fn,
    pub tran_get_bus_addr: tran_unused_fn,
    pub tran_get_name: tran_unused_fn,
    pub tran_clear_aca: tran_unused_fn,
    pub tran_clear_task_set: tran_unused_fn,
    pub tran_terminate_task: tran_unused_fn,
    pub tran_get_eventcookie: tran_unused_fn,
    pub tran_add_eventcall: tran_unused_fn,
    pub tran_remove_eventcall: tran_unused_fn,
    pub tran_post_event: tran_unused_fn,
    pub tran_quiesce: Option<tran_quiesce_fn>,
    pub tran_unquiesce: Option<tran_quiesce_fn>,
    pub tran_bus_reset: Option<tran_bus_reset_fn>,
    pub tran_hba_flags: c_int,
    pub tran_obs1: uint_t,
    pub tran_obs2: uchar_t,
    pub tran_obs3: uchar_t,
    pub tran_open_lock: kmutex_t,
    pub tran_open_flag: u64,
    pub tran_bus_config: tran_unused_fn,
    pub tran_bus_unconfig: tran_unused_fn,
    pub tran_bus_power: tran_unused_fn,
    pub tran_interconnect_type: c_int,
    pub tran_pkt_constructor: Option<tran_pkt_constructor_fn>,
    pub tran_pkt_destructor: Option<tran_pkt_destructor_fn>,
    pub tran_pkt_cache_ptr: *mut kmem_cache_t,
    pub tran_hba_len: uint_t,
    pub tran_setup_pkt: Option<tran_setup_pkt_fn>,
    pub tran_teardown_pkt: Option<tran_teardown_pkt_fn>,
    pub tran_dma_attr: ddi_dma_attr_t,
    pub tran_extension: *mut c_void,
    pub tran_fm_capable: c_int,
    pub tran_iport_dip: *mut dev_info_t,
    pub tran_iportmap: *mut c_void,
    pub tran_tgtmap: *mut scsi_hba_tgtmap_t,
}

// ---- Module linkage: the C shim owns these (modldrv(9S), modlinkage(9S),
// ---- dev_ops(9S)); they are mirrored so that their layout is asserted in
// ---- one place, for the shim's minimal headers and the test bed's loader.

/// `struct modldrv` (modldrv(9S)).
#[repr(C)]
pub struct modldrv {
    pub drv_modops: *mut mod_ops,
    pub drv_linkinfo: *mut c_char,
    pub drv_dev_ops: *mut dev_ops,
}

/// Linkage slots of `struct modlinkage` in a 64-bit kernel.
pub const MODLINKAGE_SLOTS: usize = 7;

/// `struct modlinkage` (modlinkage(9S)): a NULL-terminated list.
#[repr(C)]
pub struct modlinkage {
    pub ml_rev: c_int,
    pub ml_linkage: [*mut c_void; MODLINKAGE_SLOTS],
}

/// `processorid_t` (sys/processor.h).
pub type processorid_t = c_int;

/// The leading members of `struct cpu` (sys/cpuvar.h), the current CPU
/// of which `curcpup()` returns. Only these are mirrored: the driver reads
/// the sequential id through the kernel's pointer and never allocates or
/// copies one, so the rest of the (large, private) structure stays opaque.
#[repr(C)]
pub struct cpu {
    /// CPU number (`cpu_id`).
    pub cpu_id: processorid_t,
    /// Sequential CPU id, 0..ncpus-1 (`cpu_seqid`).
    pub cpu_seqid: processorid_t,
}

/// `cpu_t`.
pub type cpu_t = cpu;

/// `devo_getinfo` (getinfo(9E)); `ddi_info_cmd_t` is an int-sized enum.
pub type devo_getinfo_fn =
    unsafe extern "C" fn(*mut dev_info_t, c_int, *mut c_void, *mut *mut c_void) -> c_int;
/// `devo_identify`, `devo_probe` (probe(9E)), `devo_quiesce` (quiesce(9E)).
pub type devo_dip_fn = unsafe extern "C" fn(*mut dev_info_t) -> c_int;
/// `devo_attach` (attach(9E)), `devo_detach` (detach(9E)), `devo_reset`:
/// the command enums are int-sized.
pub type devo_cmd_fn = unsafe extern "C" fn(*mut dev_info_t, c_int) -> c_int;
/// `devo_power` (power(9E)).
pub type devo_power_fn = unsafe extern "C" fn(*mut dev_info_t, c_int, c_int) -> c_int;

/// `struct dev_ops` (dev_ops(9S)).
#[repr(C)]
pub struct dev_ops {
    pub devo_rev: c_int,
    pub devo_refcnt: c_int,
    pub devo_getinfo: Option<devo_getinfo_fn>,
    pub devo_identify: Option<devo_dip_fn>,
    pub devo_probe: Option<devo_dip_fn>,
    pub devo_attach: Option<devo_cmd_fn>,
    pub devo_detach: Option<devo_cmd_fn>,
    pub devo_reset: Option<devo_cmd_fn>,
    pub devo_cb_ops: *mut cb_ops,
    pub devo_bus_ops: *mut bus_ops,
    pub devo_power: Option<devo_power_fn>,
    pub devo_quiesce: Option<devo_dip_fn>,
}

// ---- Named kernel statistics: kstat_create(9F), kstat(9S), kstat_named(9S)

/// `kid_t` (sys/kstat.h): a kstat's unique id.
pub type kid_t = c_int;

/// `ks_update`: `int (*)(struct kstat *, int rw)` (sys/kstat.h).
pub type ks_update_fn = unsafe extern "C" fn(*mut kstat, c_int) -> c_int;
/// `ks_snapshot`: `int (*)(struct kstat *, void *buf, int rw)`.
pub type ks_snapshot_fn = unsafe extern "C" fn(*mut kstat, *mut c_void, c_int) -> c_int;

/// `struct kstat` (kstat(9S)), every member: the test bed's emulation
/// allocates them as `kstat_create(9F)` does; the driver sets only
/// `ks_update`, `ks_private` (and would set `ks_lock`) between
/// `kstat_create` and `kstat_install`, and reads `ks_data`.
#[repr(C)]
pub struct kstat {
    pub ks_crtime: hrtime_t,
    pub ks_next: *mut kstat,
    pub ks_kid: kid_t,
    pub ks_module: [c_char; KSTAT_STRLEN],
    pub ks_resv: uchar_t,
    pub ks_instance: c_int,
    pub ks_name: [c_char; KSTAT_STRLEN],
    pub ks_type: uchar_t,
    pub ks_class: [c_char; KSTAT_STRLEN],
    pub ks_flags: uchar_t,
    pub ks_data: *mut c_void,
    pub ks_ndata: uint_t,
    pub ks_data_size: usize,
    pub ks_snaptime: hrtime_t,
    pub ks_update: Option<ks_update_fn>,
    pub ks_private: *mut c_void,
    pub ks_snapshot: Option<ks_snapshot_fn>,
    /// Really a `kmutex_t *` (sys/kstat.h says so), declared `void *`.
    pub ks_lock: *mut c_void,
}

/// `kstat_t`: `struct kstat` (sys/kstat.h).
pub type kstat_t = kstat;

/// The `str` member of `kstat_named_t`'s value union.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct kstat_named_str {
    /// `addr.ptr` (a union with 8 bytes of padding on amd64).
    pub ptr: *mut c_char,
    /// `len`: bytes of the string with its NUL.
    pub len: u32,
}

/// The value union of `kstat_named_t` (`value`), 16 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub union kstat_named_value {
    pub c: [c_char; 16],
    pub i32: i32,
    pub ui32: u32,
    pub str: kstat_named_str,
    pub i64: i64,
    pub ui64: u64,
}

/// `struct kstat_named` (kstat_named(9S)).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct kstat_named {
    pub name: [c_char; KSTAT_STRLEN],
    pub data_type: uchar_t,
    pub value: kstat_named_value,
}

/// `kstat_named_t`: `struct kstat_named` (sys/kstat.h).
pub type kstat_named_t = kstat_named;

// ---- Fault management: ddi_fm_init(9F), ddi_fm_acc_err_get(9F)

/// `struct ddi_fm_error` (ddi_fm_error(9S)).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ddi_fm_error {
    pub fme_version: c_int,
    pub fme_status: c_int,
    pub fme_flag: c_int,
    pub fme_ena: u64,
    pub fme_acc_handle: ddi_acc_handle_t,
    pub fme_dma_handle: ddi_dma_handle_t,
    pub fme_bus_specific: *mut c_void,
    pub fme_bus_type: c_int,
}

/// `ddi_fm_error_t`: `struct ddi_fm_error` (sys/ddifm.h).
pub type ddi_fm_error_t = ddi_fm_error;

use super::consts::{KSTAT_STRLEN, SENSE_LENGTH};

/// `struct scsi_arq_status` (scsi_arq_status(9S)). The two `struct
/// scsi_status` members are single bit-field bytes; they are kept as raw
/// bytes (the SCSI status byte as the target sent it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct scsi_arq_status {
    pub sts_status: u8,
    pub sts_rqpkt_status: u8,
    pub sts_rqpkt_reason: u8,
    pub sts_rqpkt_resid: u8,
    pub sts_rqpkt_state: uint_t,
    pub sts_rqpkt_statistics: uint_t,
    pub sts_sensedata: [u8; SENSE_LENGTH],
}

/// One measured ABI fact about a mirrored structure: the offset of a member
/// or the size of the whole type, with the C spelling of the type and member
/// so that the C shim's generated `_Static_assert`s and the test against the
/// measured tables can be produced from this single list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiFact {
    /// `offsetof(c_type, member) == value`; `key` names the type as the
    /// measured tables do.
    Offset {
        key: &'static str,
        c_type: &'static str,
        member: &'static str,
        value: usize,
    },
    /// `sizeof (c_type) == value`.
    Size {
        key: &'static str,
        c_type: &'static str,
        value: usize,
    },
}

/// Declares the measured layout of each mirror: asserts it at compile time
/// and records it in [`ABI_LAYOUT`].
macro_rules! abi_layout {
    ($( $t:ident as $cty:literal { $( $f:ident $(. $rest:ident)* $(as $cname:literal)? @ $o:literal ),* $(,)? } $(size $s:literal)? ; )*) => {
        $(
            $( const _: () = assert!(core::mem::offset_of!($t, $f $(. $rest)*) == $o); )*
            $( const _: () = assert!(core::mem::size_of::<$t>() == $s); )?
        )*
        /// Every layout fact the mirrors rely on, as asserted above.
        pub const ABI_LAYOUT: &[AbiFact] = &[
            $(
                $( AbiFact::Offset {
                    key: stringify!($t),
                    c_type: $cty,
                    member: abi_layout!(@name $f $(. $rest)* $(as $cname)?),
                    value: $o,
                }, )*
                $( AbiFact::Size { key: stringify!($t), c_type: $cty, value: $s }, )?
            )*
        ];
    };
    (@name $f:ident $(. $rest:ident)* as $cname:literal) => { $cname };
    (@name $f:ident $(. $rest:ident)*) => { concat!(stringify!($f) $(, ".", stringify!($rest))*) };
}

abi_layout! {
    scsi_pkt as "struct scsi_pkt" {
        pkt_ha_private @ 0, pkt_address @ 8, pkt_private @ 24, pkt_comp @ 32,
        pkt_flags @ 40, pkt_time @ 44, pkt_scbp @ 48, pkt_cdbp @ 56, pkt_resid @ 64,
        pkt_state @ 72, pkt_statistics @ 76, pkt_reason @ 80, pkt_cdblen @ 84,
        pkt_tgtlen @ 88, pkt_scblen @ 92, pkt_handle @ 96, pkt_numcookies @ 104,
        pkt_dma_offset @ 112, pkt_dma_len @ 120, pkt_dma_flags @ 128, pkt_cookies @ 136,
        pkt_path_instance @ 144, pkt_stmp @ 152,
    } size 160;
    scsi_address as "struct scsi_address" {
        a_hba_tran @ 0, a @ 8,
        // The C members are reached through the header's macros
        // (`a_target` is `a.spi.a_target`), as C code spells them.
        a.spi.a_target as "a_target" @ 8, a.spi.a_lun as "a_lun" @ 10,
        a.spi._a_sublun as "a_sublun" @ 11, a.a_sd @ 8,
    } size 16;
    ddi_dma_cookie_t as "ddi_dma_cookie_t" {
        dmac_laddress @ 0, dmac_size @ 8, dmac_type @ 16,
    } size 24;
    ddi_dma_attr_t as "ddi_dma_attr_t" {
        dma_attr_version @ 0, dma_attr_addr_lo @ 8, dma_attr_addr_hi @ 16,
        dma_attr_count_max @ 24, dma_attr_align @ 32, dma_attr_burstsizes @ 40,
        dma_attr_minxfer @ 44, dma_attr_maxxfer @ 48, dma_attr_seg @ 56,
        dma_attr_sgllen @ 64, dma_attr_granular @ 68, dma_attr_flags @ 72,
    } size 80;
    ddi_device_acc_attr_t as "ddi_device_acc_attr_t" {
        devacc_attr_version @ 0, devacc_attr_endian_flags @ 2,
        devacc_attr_dataorder @ 3, devacc_attr_access @ 4,
    } size 6;
    scsi_arq_status as "struct scsi_arq_status" {
        sts_status @ 0, sts_rqpkt_status @ 1, sts_rqpkt_reason @ 2, sts_rqpkt_resid @ 3,
        sts_rqpkt_state @ 4, sts_rqpkt_statistics @ 8, sts_sensedata @ 12,
    } size 32;
    kmutex_t as "kmutex_t" {} size 8;
    kcondvar_t as "kcondvar_t" {} size 2;
    scsi_hba_tran as "struct scsi_hba_tran" {
        tran_hba_dip @ 0, tran_hba_private @ 8, tran_tgt_private @ 16, tran_sd @ 24,
        tran_tgt_init @ 32, tran_tgt_probe @ 40, tran_tgt_free @ 48, tran_start @ 56,
        tran_reset @ 64, tran_abort @ 72, tran_getcap @ 80, tran_setcap @ 88,
        tran_init_pkt @ 96, tran_destroy_pkt @ 104, tran_dmafree @ 112, tran_sync_pkt @ 120,
        tran_reset_notify @ 128, tran_get_bus_addr @ 136, tran_get_name @ 144,
        tran_clear_aca @ 152, tran_clear_task_set @ 160, tran_terminate_task @ 168,
        tran_get_eventcookie @ 176, tran_add_eventcall @ 184, tran_remove_eventcall @ 192,
        tran_post_event @ 200, tran_quiesce @ 208, tran_unquiesce @ 216, tran_bus_reset @ 224,
        tran_hba_flags @ 232, tran_obs1 @ 236, tran_obs2 @ 240, tran_obs3 @ 241,
        tran_open_lock @ 248, tran_open_flag @ 256, tran_bus_config @ 264,
        tran_bus_unconfig @ 272, tran_bus_power @ 280, tran_interconnect_type @ 288,
        tran_pkt_constructor @ 296, tran_pkt_destructor @ 304, tran_pkt_cache_ptr @ 312,
        tran_hba_len @ 320, tran_setup_pkt @ 328, tran_teardown_pkt @ 336,
        tran_dma_attr @ 344, tran_extension @ 424, tran_fm_capable @ 432,
        tran_iport_dip @ 440, tran_iportmap @ 448, tran_tgtmap @ 456,
    } size 464;
    // Measured into test/abi/rvscsi-shim-abi.tsv by measure-shim-abi.sh.
    modldrv as "struct modldrv" {
        drv_modops @ 0, drv_linkinfo @ 8, drv_dev_ops @ 16,
    } size 24;
    modlinkage as "struct modlinkage" { ml_rev @ 0, ml_linkage @ 8 } size 64;
    dev_ops as "struct dev_ops" {
        devo_rev @ 0, devo_refcnt @ 4, devo_getinfo @ 8, devo_identify @ 16,
        devo_probe @ 24, devo_attach @ 32, devo_detach @ 40, devo_reset @ 48,
        devo_cb_ops @ 56, devo_bus_ops @ 64, devo_power @ 72, devo_quiesce @ 80,
    } size 88;
    // Measured into test/abi/rvscsi-shim-abi.tsv too; a prefix, no size.
    cpu as "struct cpu" { cpu_id @ 0, cpu_seqid @ 4 };
    // Measured into test/abi/rvscsi-shim-abi.tsv by measure-shim-abi.sh.
    kstat as "kstat_t" {
        ks_crtime @ 0, ks_next @ 8, ks_kid @ 16, ks_module @ 20, ks_resv @ 51,
        ks_instance @ 52, ks_name @ 56, ks_type @ 87, ks_class @ 88, ks_flags @ 119,
        ks_data @ 120, ks_ndata @ 128, ks_data_size @ 136, ks_snaptime @ 144,
        ks_update @ 152, ks_private @ 160, ks_snapshot @ 168, ks_lock @ 176,
    } size 184;
    kstat_named as "kstat_named_t" {
        name @ 0, data_type @ 31, value @ 32, value.ui64 @ 32,
    } size 48;
    ddi_fm_error as "ddi_fm_error_t" {
        fme_version @ 0, fme_status @ 4, fme_flag @ 8, fme_ena @ 16,
        fme_acc_handle @ 24, fme_dma_handle @ 32, fme_bus_specific @ 40,
        fme_bus_type @ 48,
    } size 56;
}
