//! `extern "C"` declarations of the illumos kernel functions the driver
//! calls, with the exact signatures of the illumos headers (see
//! `test/abi/illumos-ddi-functions.tsv`: name, return type, parameter types).
//!
//! This list is the driver's whole kernel boundary: the module checker
//! refuses an object importing anything else, and the test bed's DDI
//! emulation implements exactly these functions.

use super::types::*;
use core::ffi::{c_char, c_int, c_uint, c_void};

unsafe extern "C" {
    // ---- logging: cmn_err(9F), dev_err(9F) --------------------------------
    pub fn cmn_err(level: c_int, fmt: *const c_char, ...);
    pub fn dev_err(dip: *mut dev_info_t, level: c_int, fmt: *mut c_char, ...);

    // ---- locks: mutex(9F), condvar(9F) -----------------------------------
    pub fn mutex_init(mp: *mut kmutex_t, name: *mut c_char, typ: c_int, arg: *mut c_void);
    pub fn mutex_destroy(mp: *mut kmutex_t);
    pub fn mutex_enter(mp: *mut kmutex_t);
    pub fn mutex_tryenter(mp: *mut kmutex_t) -> c_int;
    pub fn mutex_exit(mp: *mut kmutex_t);
    pub fn mutex_owned(mp: *const kmutex_t) -> c_int;
    pub fn cv_init(cvp: *mut kcondvar_t, name: *mut c_char, typ: c_int, arg: *mut c_void);
    pub fn cv_destroy(cvp: *mut kcondvar_t);
    pub fn cv_signal(cvp: *mut kcondvar_t);
    pub fn cv_broadcast(cvp: *mut kcondvar_t);
    pub fn cv_reltimedwait(
        cvp: *mut kcondvar_t,
        mp: *mut kmutex_t,
        delta: clock_t,
        res: c_int,
    ) -> clock_t;

    // ---- memory: kmem_alloc(9F) -------------------------------------------
    pub fn kmem_alloc(size: usize, kmflag: c_int) -> *mut c_void;
    pub fn kmem_zalloc(size: usize, kmflag: c_int) -> *mut c_void;
    pub fn kmem_free(buf: *mut c_void, size: usize);

    // ---- DMA: ddi_dma_alloc_handle(9F) and friends ------------------------
    pub fn ddi_dma_alloc_handle(
        dip: *mut dev_info_t,
        attr: *const ddi_dma_attr_t,
        waitfp: ddi_callback_t,
        arg: caddr_t,
        handlep: *mut ddi_dma_handle_t,
    ) -> c_int;
    pub fn ddi_dma_free_handle(handlep: *mut ddi_dma_handle_t);
    pub fn ddi_dma_mem_alloc(
        handle: ddi_dma_handle_t,
        length: usize,
        accattrp: *const ddi_device_acc_attr_t,
        flags: c_uint,
        waitfp: ddi_callback_t,
        arg: caddr_t,
        kaddrp: *mut caddr_t,
        real_length: *mut usize,
        handlep: *mut ddi_acc_handle_t,
    ) -> c_int;
    pub fn ddi_dma_mem_free(handlep: *mut ddi_acc_handle_t);
    pub fn ddi_dma_addr_bind_handle(
        handle: ddi_dma_handle_t,
        as_: *mut c_void,
        addr: caddr_t,
        len: usize,
        flags: c_uint,
        waitfp: ddi_callback_t,
        arg: caddr_t,
        cookiep: *mut ddi_dma_cookie_t,
        ccountp: *mut c_uint,
    ) -> c_int;
    pub fn ddi_dma_unbind_handle(handle: ddi_dma_handle_t) -> c_int;
    pub fn ddi_dma_sync(
        handle: ddi_dma_handle_t,
        offset: off_t,
        length: usize,
        type_: c_uint,
    ) -> c_int;

    // ---- registers: ddi_regs_map_setup(9F), ddi_get8(9F), ddi_put8(9F) ----
    pub fn ddi_regs_map_setup(
        dip: *mut dev_info_t,
        rnumber: c_uint,
        addrp: *mut caddr_t,
        offset: offset_t,
        len: offset_t,
        accattrp: *const ddi_device_acc_attr_t,
        handlep: *mut ddi_acc_handle_t,
    ) -> c_int;
    pub fn ddi_regs_map_free(handlep: *mut ddi_acc_handle_t);
    pub fn ddi_dev_regsize(dip: *mut dev_info_t, rnumber: c_uint, resultp: *mut off_t) -> c_int;
    pub fn ddi_get8(handle: ddi_acc_handle_t, addr: *mut u8) -> u8;
    pub fn ddi_get16(handle: ddi_acc_handle_t, addr: *mut u16) -> u16;
    pub fn ddi_get32(handle: ddi_acc_handle_t, addr: *mut u32) -> u32;
    pub fn ddi_put8(handle: ddi_acc_handle_t, addr: *mut u8, value: u8);
    pub fn ddi_put16(handle: ddi_acc_handle_t, addr: *mut u16, value: u16);
    pub fn ddi_put32(handle: ddi_acc_handle_t, addr: *mut u32, value: u32);

    // ---- PCI configuration space: pci_config_setup(9F), pci_config_get8(9F)
    pub fn pci_config_setup(dip: *mut dev_info_t, handle: *mut ddi_acc_handle_t) -> c_int;
    pub fn pci_config_teardown(handle: *mut ddi_acc_handle_t);
    pub fn pci_config_get8(handle: ddi_acc_handle_t, offset: off_t) -> u8;
    pub fn pci_config_get16(handle: ddi_acc_handle_t, offset: off_t) -> u16;
    pub fn pci_config_get32(handle: ddi_acc_handle_t, offset: off_t) -> u32;

    // ---- interrupts: ddi_intr_alloc(9F) and friends ------------------------
    pub fn ddi_intr_get_supported_types(dip: *mut dev_info_t, typesp: *mut c_int) -> c_int;
    pub fn ddi_intr_get_nintrs(dip: *mut dev_info_t, type_: c_int, nintrsp: *mut c_int) -> c_int;
    pub fn ddi_intr_get_navail(dip: *mut dev_info_t, type_: c_int, navailp: *mut c_int) -> c_int;
    pub fn ddi_intr_alloc(
        dip: *mut dev_info_t,
        h_array: *mut ddi_intr_handle_t,
        type_: c_int,
        inum: c_int,
        count: c_int,
        actualp: *mut c_int,
        behavior: c_int,
    ) -> c_int;
    pub fn ddi_intr_free(h: ddi_intr_handle_t) -> c_int;
    pub fn ddi_intr_get_pri(h: ddi_intr_handle_t, prip: *mut c_uint) -> c_int;
    pub fn ddi_intr_get_cap(h: ddi_intr_handle_t, flagsp: *mut c_int) -> c_int;
    pub fn ddi_intr_add_handler(
        h: ddi_intr_handle_t,
        inthandler: ddi_intr_handler_t,
        arg1: *mut c_void,
        arg2: *mut c_void,
    ) -> c_int;
    pub fn ddi_intr_remove_handler(h: ddi_intr_handle_t) -> c_int;
    pub fn ddi_intr_enable(h: ddi_intr_handle_t) -> c_int;
    pub fn ddi_intr_disable(h: ddi_intr_handle_t) -> c_int;
    pub fn ddi_intr_block_enable(h_array: *mut ddi_intr_handle_t, count: c_int) -> c_int;
    pub fn ddi_intr_block_disable(h_array: *mut ddi_intr_handle_t, count: c_int) -> c_int;
    /// `uint_t ddi_intr_get_hilevel_pri(void)` (ddi_intr.h; the man page
    /// says `int`, the header and `ddi_intr.c` say `uint_t`): `LOCK_LEVEL + 1`.
    pub fn ddi_intr_get_hilevel_pri() -> c_uint;

    // ---- interrupt resource management: ddi_cb_register(9F) -----------------
    pub fn ddi_cb_register(
        dip: *mut dev_info_t,
        flags: ddi_cb_flags_t,
        cbfunc: ddi_cb_func_t,
        arg1: *mut c_void,
        arg2: *mut c_void,
        ret_hdlp: *mut ddi_cb_handle_t,
    ) -> c_int;
    pub fn ddi_cb_unregister(hdl: ddi_cb_handle_t) -> c_int;

    // ---- properties: ddi_prop_get_int(9F), ddi_prop_lookup(9F) -------------
    pub fn ddi_prop_get_int(
        match_dev: dev_t,
        dip: *mut dev_info_t,
        flags: c_uint,
        name: *mut c_char,
        defvalue: c_int,
    ) -> c_int;
    pub fn ddi_prop_lookup_int_array(
        match_dev: dev_t,
        dip: *mut dev_info_t,
        flags: c_uint,
        name: *mut c_char,
        datap: *mut *mut c_int,
        nelementsp: *mut c_uint,
    ) -> c_int;
    pub fn ddi_prop_lookup_string(
        match_dev: dev_t,
        dip: *mut dev_info_t,
        flags: c_uint,
        name: *mut c_char,
        datap: *mut *mut c_char,
    ) -> c_int;
    pub fn ddi_prop_free(data: *mut c_void);

    // ---- device tree --------------------------------------------------------
    pub fn ddi_get_instance(dip: *mut dev_info_t) -> c_int;
    pub fn ddi_get_driver_private(dip: *mut dev_info_t) -> *mut c_void;
    pub fn ddi_get_parent(dip: *mut dev_info_t) -> *mut dev_info_t;
    pub fn ddi_report_dev(dip: *mut dev_info_t);

    // ---- the current CPU: `CPU` of sys/cpuvar.h, which on x86 the headers
    // inline as a %gs load; the kernel also exports it as a function
    // (uts/intel/ml/i86_subr.S), which is what a module outside the
    // kernel's inline headers calls.
    pub fn curcpup() -> *mut cpu_t;
    /// 1 when the caller runs on an interrupt thread (`T_INTR_THREAD`) or
    /// on a CPU servicing a high-level interrupt, else 0 (sys/disp.h;
    /// uts/common/disp/thread.c `servicing_interrupt`).
    pub fn servicing_interrupt() -> c_int;
    /// 1 while the system panics (and dumps), else 0 (ddi_in_panic(9F),
    /// sys/sunddi.h; uts/common/os/sunddi.c: `panicstr != NULL`).
    pub fn ddi_in_panic() -> c_int;

    // ---- time: ddi_get_lbolt(9F), drv_usectohz(9F), timeout(9F) ------------
    pub fn ddi_get_lbolt64() -> i64;
    pub fn gethrtime() -> hrtime_t;
    pub fn drv_usectohz(microsecs: clock_t) -> clock_t;
    pub fn drv_usecwait(microsecs: clock_t);
    pub fn delay(ticks: clock_t);
    pub fn timeout(
        func: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
        ticks: clock_t,
    ) -> timeout_id_t;
    pub fn untimeout(id: timeout_id_t) -> clock_t;
    pub fn ddi_periodic_add(
        func: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
        interval: hrtime_t,
        level: c_int,
    ) -> ddi_periodic_t;
    pub fn ddi_periodic_delete(request: ddi_periodic_t);

    // ---- task queues: ddi_taskq_create(9F) ---------------------------------
    pub fn ddi_taskq_create(
        dip: *mut dev_info_t,
        name: *const c_char,
        nthreads: c_int,
        pri: pri_t,
        cflags: c_uint,
    ) -> *mut ddi_taskq_t;
    pub fn ddi_taskq_destroy(tq: *mut ddi_taskq_t);
    pub fn ddi_taskq_dispatch(
        tq: *mut ddi_taskq_t,
        func: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
        dflags: c_uint,
    ) -> c_int;
    pub fn ddi_taskq_wait(tq: *mut ddi_taskq_t);

    // ---- SCSA: scsi_hba_pkt_comp(9F), scsi_device(9S) accessors -----------
    pub fn scsi_hba_pkt_comp(pkt: *mut scsi_pkt);
    pub fn scsi_address_device(ap: *mut scsi_address) -> *mut scsi_device;
    pub fn scsi_device_hba_private_get(sd: *mut scsi_device) -> *mut c_void;
    pub fn scsi_device_hba_private_set(sd: *mut scsi_device, data: *mut c_void);
    pub fn scsi_device_unit_address(sd: *mut scsi_device) -> *mut c_char;
    pub fn scsi_hba_iport_unit_address(dip: *mut dev_info_t) -> *mut c_char;
    pub fn scsi_hba_lookup_capstr(capstr: *mut c_char) -> c_int;
    pub fn scsi_hba_tgtmap_create(
        self_: *mut dev_info_t,
        mode: c_int,
        csync_usec: c_int,
        settle_usec: c_int,
        tgtmap_priv: *mut c_void,
        activate_cb: Option<unsafe extern "C" fn()>,
        deactivate_cb: Option<unsafe extern "C" fn()>,
        tgtmapp: *mut *mut scsi_hba_tgtmap_t,
    ) -> c_int;
    pub fn scsi_hba_tgtmap_destroy(tgtmap: *mut scsi_hba_tgtmap_t);
    pub fn scsi_hba_tgtmap_set_begin(tgtmap: *mut scsi_hba_tgtmap_t) -> c_int;
    pub fn scsi_hba_tgtmap_set_add(
        tgtmap: *mut scsi_hba_tgtmap_t,
        tgt_type: c_int,
        tgt_addr: *mut c_char,
        tgt_priv: *mut c_void,
    ) -> c_int;
    pub fn scsi_hba_tgtmap_set_end(tgtmap: *mut scsi_hba_tgtmap_t, flags: c_uint) -> c_int;
    pub fn scsi_hba_tgtmap_set_flush(tgtmap: *mut scsi_hba_tgtmap_t) -> c_int;
    pub fn scsi_hba_tgtmap_scan_luns(tgtmap: *mut scsi_hba_tgtmap_t, tgt_addr: *mut c_char);

    // ---- named kernel statistics: kstat_create(9F) and friends (sys/kstat.h)
    pub fn kstat_create(
        ks_module: *const c_char,
        ks_instance: c_int,
        ks_name: *const c_char,
        ks_class: *const c_char,
        ks_type: uchar_t,
        ks_ndata: c_uint,
        ks_flags: uchar_t,
    ) -> *mut kstat_t;
    pub fn kstat_install(ksp: *mut kstat_t);
    pub fn kstat_delete(ksp: *mut kstat_t);
    pub fn kstat_named_init(knp: *mut kstat_named_t, name: *const c_char, data_type: uchar_t);

    // ---- fault management: ddi_fm_init(9F) and friends (sys/ddifm.h). The
    // variadic ddi_fm_ereport_post(9F) is called by the C shim only
    // (rvscsi_shim_ereport_post, c-shim/rvscsi.h): Rust never calls a C
    // variadic function whose argument list it cannot type-check.
    pub fn ddi_fm_init(dip: *mut dev_info_t, fmcap: *mut c_int, ibcp: *mut ddi_iblock_cookie_t);
    pub fn ddi_fm_fini(dip: *mut dev_info_t);
    pub fn ddi_fm_capable(dip: *mut dev_info_t) -> c_int;
    pub fn ddi_fm_service_impact(dip: *mut dev_info_t, svc_impact: c_int);
    pub fn ddi_fm_acc_err_get(handle: ddi_acc_handle_t, de: *mut ddi_fm_error_t, version: c_int);
    pub fn ddi_fm_dma_err_get(handle: ddi_dma_handle_t, de: *mut ddi_fm_error_t, version: c_int);
    pub fn ddi_fm_acc_err_clear(handle: ddi_acc_handle_t, version: c_int);
    pub fn ddi_fm_dma_err_clear(handle: ddi_dma_handle_t, version: c_int);
    /// `uint64_t fm_ena_generate(uint64_t timestamp, uchar_t format)`
    /// (sys/fm/protocol.h; uts/common/os/fm.c).
    pub fn fm_ena_generate(timestamp: u64, format: uchar_t) -> u64;

    // ---- the end of the line: panic(9F) (used by the kernel panic handler) --
    pub fn panic(fmt: *const c_char, ...) -> !;
}
