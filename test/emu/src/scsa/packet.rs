//! Packets: `scsi_init_pkt(9F)` (allocation from the HBA's cache,
//! `tran_setup_pkt` before DMA binding, cookies and windows),
//! `scsi_transport(9F)` (with the `FLAG_NOINTR` conversion of normal
//! context), `scsi_hba_pkt_comp(9F)` (with its checks),
//! `scsi_destroy_pkt(9F)` (teardown before unbind), `scsi_poll(9F)`.
//!
//! The Rust side ([`Packet`], [`Device`]) is what the emulated target
//! drivers use.

use super::buf::DataBuf;
use super::hba::{HbaState, PktCache};
use crate::ddi::dma;
use crate::ddi::sync::held_locks;
use crate::ddi::violation;
use crate::machine::{Machine, lock, set_current};
use rvscsi::ffi::{self, dev_info_t, scsi_device, scsi_hba_tran, scsi_pkt};
use rvscsi::scsa::{PktFlags, PktState, PktStatistics};
use std::ffi::{CString, c_int};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const WRAP_MAGIC: u64 = 0x0a11_0ced_7e57_0001;

/// A completion routine of a target driver.
pub type Callback = Arc<dyn Fn(&Packet) + Send + Sync>;

#[derive(Default)]
struct CompState {
    /// Completions since the last transport.
    done: u32,
}

/// The framework's part of a packet object; the `scsi_pkt` comes first so
/// that a `*mut scsi_pkt` is a `*mut PktWrap`.
///
/// Guard bytes follow the status area, to catch an HBA that writes more
/// status or sense than `pkt_scblen` allows.
#[repr(C)]
pub struct PktWrap {
    /// The packet the HBA sees.
    pub pkt: scsi_pkt,
    magic: u64,
    cache: *const PktCache,
    builtin_cdb: *mut u8,
    builtin_scb: *mut u8,
    device: Option<Arc<Device>>,
    data: Option<Arc<DataBuf>>,
    bound: bool,
    curwin: usize,
    totalwin: usize,
    total_xfer: usize,
    ext_cdb: Option<Box<[u8]>>,
    ext_scb: Option<Box<[u8]>>,
    ext_tgt: Option<Box<[u8]>>,
    comp: Mutex<CompState>,
    comp_cv: Condvar,
    callback: Mutex<Option<Callback>>,
    /// Run after the completion is recorded (see [`Packet::set_restart`]).
    restart: Mutex<Option<Callback>>,
    /// `scsi_hba_pkt_comp` calls since the last transport.
    pub comp_calls: AtomicU32,
    /// Handed to the HBA and not yet given back.
    in_flight: std::sync::atomic::AtomicBool,
}

impl PktWrap {
    /// Initializes the framework fields of a zeroed object.
    ///
    /// # Safety
    /// `obj` must be valid for writes and zeroed.
    pub unsafe fn init(obj: *mut PktWrap, cache: *const PktCache) {
        // SAFETY: fields written in place; the zeroed scsi_pkt is valid.
        unsafe {
            std::ptr::addr_of_mut!((*obj).magic).write(WRAP_MAGIC);
            std::ptr::addr_of_mut!((*obj).cache).write(cache);
            std::ptr::addr_of_mut!((*obj).builtin_cdb).write(std::ptr::null_mut());
            std::ptr::addr_of_mut!((*obj).builtin_scb).write(std::ptr::null_mut());
            std::ptr::addr_of_mut!((*obj).device).write(None);
            std::ptr::addr_of_mut!((*obj).data).write(None);
            std::ptr::addr_of_mut!((*obj).bound).write(false);
            std::ptr::addr_of_mut!((*obj).curwin).write(0);
            std::ptr::addr_of_mut!((*obj).totalwin).write(0);
            std::ptr::addr_of_mut!((*obj).total_xfer).write(0);
            std::ptr::addr_of_mut!((*obj).ext_cdb).write(None);
            std::ptr::addr_of_mut!((*obj).ext_scb).write(None);
            std::ptr::addr_of_mut!((*obj).ext_tgt).write(None);
            std::ptr::addr_of_mut!((*obj).comp).write(Mutex::new(CompState::default()));
            std::ptr::addr_of_mut!((*obj).comp_cv).write(Condvar::new());
            std::ptr::addr_of_mut!((*obj).callback).write(Mutex::new(None));
            std::ptr::addr_of_mut!((*obj).restart).write(Mutex::new(None));
            std::ptr::addr_of_mut!((*obj).comp_calls).write(AtomicU32::new(0));
            std::ptr::addr_of_mut!((*obj).in_flight)
                .write(std::sync::atomic::AtomicBool::new(false));
        }
    }

    /// Remembers the constructor's CDB and status areas.
    pub fn set_builtin_areas(&mut self) {
        self.builtin_cdb = self.pkt.pkt_cdbp;
        self.builtin_scb = self.pkt.pkt_scbp;
    }

    fn from_pkt<'a>(pkt: *mut scsi_pkt, func: &str) -> Option<&'a mut PktWrap> {
        if pkt.is_null() {
            violation(format!("{func}(NULL)"));
            return None;
        }
        let w = pkt.cast::<PktWrap>();
        // SAFETY: reading the magic of what claims to be one of our
        // packets; every packet the HBA sees comes from our caches.
        let magic = unsafe { (*w).magic };
        if magic != WRAP_MAGIC {
            // A DEBUG kernel's packet cache poisons what it frees (kmem.c,
            // kmem_cache_free_debug).
            let freed = if magic == crate::ddi::kmem::FREE_PATTERN {
                " (it holds the kmem free pattern: a packet used after scsi_destroy_pkt)"
            } else {
                ""
            };
            violation(format!(
                "{func}: {pkt:p} is not a packet of the framework{freed}"
            ));
            return None;
        }
        // SAFETY: a live packet object.
        Some(unsafe { &mut *w })
    }

    /// Records the completion and wakes its waiters. Notifies under the
    /// lock: once it is released, a woken owner may free the packet, so
    /// nothing here touches it after.
    fn mark_done(&self) {
        self.in_flight.store(false, Ordering::Release);
        let mut c = lock(&self.comp);
        c.done += 1;
        self.comp_cv.notify_all();
        drop(c);
    }
}

/// The completion routine the framework installs for target drivers.
unsafe extern "C" fn emu_pkt_comp(pkt: *mut scsi_pkt) {
    let Some(w) = PktWrap::from_pkt(pkt, "pkt_comp") else {
        return;
    };
    // The packet as its owner sees it, lent to a callback.
    let device = w.device.clone();
    let wrap = NonNull::from(&*w);
    let run = |cb: Option<Callback>| {
        if let (Some(cb), Some(dev)) = (cb, device.clone()) {
            cb(&Packet {
                wrap,
                dev,
                owned: false,
            });
        }
    };
    // The callback sees the completion before anyone waiting for it does;
    // a restart comes after it is recorded. Both are taken before the
    // completion is recorded: from then on a waiting owner may destroy the
    // packet and its cache may hand the memory to a new one (whose
    // closures are not this completion's).
    let callback = lock(&w.callback).clone();
    let restart = lock(&w.restart).clone();
    run(callback);
    w.mark_done();
    run(restart);
}

/// `scsi_hba_pkt_comp(9F)`: checks what the HBA must get right, syncs a
/// consistent read, then calls the target driver's completion routine.
///
/// # Safety
/// `pkt` must be a packet the framework handed to the HBA.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_pkt_comp(pkt: *mut scsi_pkt) {
    let _kernel = crate::meter::kernel();
    let Some(w) = PktWrap::from_pkt(pkt, "scsi_hba_pkt_comp") else {
        return;
    };
    let m = w.device.as_ref().map(|d| d.machine.clone());
    let report = |what: String| match &m {
        Some(m) => m.violation(what),
        None => violation(what),
    };
    let held = held_locks();
    if held > 0 {
        report(format!(
            "scsi_hba_pkt_comp called with {held} driver lock(s) held"
        ));
    }
    if !w.in_flight.load(Ordering::Acquire) {
        report(
            "scsi_hba_pkt_comp of a packet the HBA does not have (never started, or torn down)"
                .into(),
        );
    }
    let flags = PktFlags::from_bits_retain(w.pkt.pkt_flags);
    if flags.contains(PktFlags::PKT_COMP_CALLED) {
        report("scsi_hba_pkt_comp called twice for one transport of a packet".into());
    }
    w.pkt.pkt_flags |= PktFlags::PKT_COMP_CALLED.bits();
    w.comp_calls.fetch_add(1, Ordering::AcqRel);
    if flags.contains(PktFlags::NOINTR) {
        report("scsi_hba_pkt_comp called for a FLAG_NOINTR packet".into());
    }
    let Some(comp) = w.pkt.pkt_comp else { return };
    let df = w.pkt.pkt_dma_flags;
    if df & ffi::DDI_DMA_CONSISTENT != 0
        && df & ffi::DDI_DMA_READ != 0
        && w.pkt.pkt_state & PktState::XFERRED_DATA.bits() != 0
    {
        dma::ddi_dma_sync(
            w.pkt.pkt_handle,
            w.pkt.pkt_dma_offset,
            w.pkt.pkt_dma_len,
            ffi::DDI_DMA_SYNC_FORCPU,
        );
    }
    // SAFETY: the completion routine installed for this packet.
    unsafe { comp(pkt) };
}

/// A LUN as the framework configured it: a child node, its
/// `scsi_device`, and the HBA behind it.
pub struct Device {
    /// The machine.
    pub machine: Arc<Machine>,
    /// The HBA.
    pub hba: Arc<HbaState>,
    /// The iport's tran (what `sd_address.a_hba_tran` names).
    pub tran: *mut scsi_hba_tran,
    /// The child node.
    pub node: *mut dev_info_t,
    /// Its `scsi_device`.
    pub sd: *mut scsi_device,
    /// Target.
    pub target: u32,
    /// LUN (lun64 form).
    pub lun: u64,
    cache: Arc<PktCache>,
}

// SAFETY: raw pointers name framework objects the framework keeps alive
// while the device exists.
unsafe impl Send for Device {}
// SAFETY: `&Device` only reads the pointers (never writes through them
// without the framework's locks), and what they name outlives the device.
unsafe impl Sync for Device {}

/// Why `scsi_init_pkt` returned NULL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// The packet cache constructor failed.
    NoPacket,
    /// `tran_setup_pkt` returned -1.
    SetupRefused,
    /// The DMA binding failed (`DDI_DMA_*` code).
    Dma(c_int),
    /// No further window to move to.
    NoWindow,
}

/// Arguments of `scsi_init_pkt` besides the buffer.
#[derive(Clone, Copy, Debug)]
pub struct InitArgs {
    /// `cmdlen`
    pub cmdlen: usize,
    /// `statuslen`
    pub statuslen: usize,
    /// `privatelen`
    pub tgtlen: usize,
    /// `PKT_CONSISTENT`, `PKT_DMA_PARTIAL`, `PKT_XARQ`
    pub flags: u32,
    /// `SLEEP_FUNC` (else `NULL_FUNC`)
    pub sleep: bool,
}

impl Default for InitArgs {
    fn default() -> Self {
        InitArgs {
            cmdlen: 10,
            statuslen: std::mem::size_of::<ffi::scsi_arq_status>(),
            tgtlen: 0,
            flags: 0,
            sleep: true,
        }
    }
}

impl Device {
    /// Creates the device of child `node` with `scsi_device` `sd`.
    pub fn new(
        hba: Arc<HbaState>,
        tran: *mut scsi_hba_tran,
        node: *mut dev_info_t,
        sd: *mut scsi_device,
        target: u32,
        lun: u64,
    ) -> Option<Arc<Device>> {
        let cache = lock(&hba.cache).clone()?;
        Some(Arc::new(Device {
            machine: hba.machine.clone(),
            hba,
            tran,
            node,
            sd,
            target,
            lun,
            cache,
        }))
    }

    fn tran(&self) -> &scsi_hba_tran {
        // SAFETY: the iport's tran lives while its children do.
        unsafe { &*self.tran }
    }

    /// `&sd_address`
    pub fn address(&self) -> *mut ffi::scsi_address {
        self.sd.cast()
    }

    /// `scsi_init_pkt(9F)` of a new packet.
    pub fn init_pkt(
        self: &Arc<Self>,
        data: Option<Arc<DataBuf>>,
        a: InitArgs,
    ) -> Result<Packet, InitError> {
        let _g = set_current(&self.machine);
        let kmflag = if a.sleep {
            ffi::KM_SLEEP
        } else {
            ffi::KM_NOSLEEP
        };
        let obj = self.cache.alloc(kmflag).ok_or(InitError::NoPacket)?;
        // SAFETY: an object of our cache, allocated to us.
        let w = unsafe { &mut *obj };
        let t = self.tran();
        w.device = Some(self.clone());
        w.pkt.pkt_address = ffi::scsi_address {
            a_hba_tran: self.tran,
            a: ffi::scsi_address_a { a_sd: self.sd },
        };
        w.pkt.pkt_flags = 0;
        w.pkt.pkt_time = 0;
        w.pkt.pkt_resid = 0;
        w.pkt.pkt_state = 0;
        w.pkt.pkt_statistics = 0;
        w.pkt.pkt_reason = 0;
        w.pkt.pkt_dma_offset = 0;
        w.pkt.pkt_dma_len = 0;
        w.pkt.pkt_dma_flags = 0;
        w.pkt.pkt_numcookies = 0;
        w.pkt.pkt_cookies = std::ptr::null_mut();
        w.pkt.pkt_path_instance = 0;
        w.pkt.pkt_comp = Some(emu_pkt_comp);
        w.curwin = 0;
        w.totalwin = 0;
        w.total_xfer = 0;
        w.bound = false;
        *lock(&w.comp) = CompState::default();
        *lock(&w.callback) = None;
        *lock(&w.restart) = None;
        w.pkt.pkt_cdblen = a.cmdlen as u32;
        if t.tran_hba_flags & ffi::SCSI_HBA_TRAN_CDB != 0 && a.cmdlen > ffi::DEFAULT_CDBLEN {
            let mut b = vec![0u8; a.cmdlen].into_boxed_slice();
            w.pkt.pkt_cdbp = b.as_mut_ptr();
            w.ext_cdb = Some(b);
        }
        w.pkt.pkt_tgtlen = a.tgtlen as u32;
        if a.tgtlen > 0 {
            let mut b = vec![0u8; a.tgtlen].into_boxed_slice();
            w.pkt.pkt_private = b.as_mut_ptr().cast();
            w.ext_tgt = Some(b);
        }
        w.pkt.pkt_scblen = a.statuslen as u32;
        if t.tran_hba_flags & ffi::SCSI_HBA_TRAN_SCB != 0 && a.statuslen > ffi::DEFAULT_SCBLEN {
            let mut b = vec![0u8; a.statuslen + SCB_GUARD].into_boxed_slice();
            b[a.statuslen..].fill(GUARD_BYTE);
            w.pkt.pkt_scbp = b.as_mut_ptr();
            w.ext_scb = Some(b);
        } else if !w.builtin_scb.is_null() {
            // SAFETY: the builtin area has DEFAULT_SCBLEN bytes and the
            // cache object SCB_GUARD more after it.
            let room = unsafe {
                std::slice::from_raw_parts_mut(w.builtin_scb, ffi::DEFAULT_SCBLEN + SCB_GUARD)
            };
            room[a.statuslen.min(ffi::DEFAULT_SCBLEN)..].fill(GUARD_BYTE);
        }
        let mut p = Packet {
            wrap: NonNull::from(&*w),
            dev: self.clone(),
            owned: true,
        };
        // tran_setup_pkt comes before any DMA binding (scsi_hba.c).
        if let Some(setup) = t.tran_setup_pkt {
            // SLEEP_FUNC is the function-pointer-typed constant 1, as in
            // the C headers; NULL_FUNC is a null pointer (None).
            let cb: ffi::ddi_waitfp_t = if a.sleep {
                // SAFETY: a non-null value of a function-pointer type, never
                // called (the driver only compares it), as C does.
                Some(unsafe {
                    std::mem::transmute::<
                        usize,
                        unsafe extern "C" fn(ffi::caddr_t) -> std::ffi::c_int,
                    >(ffi::SLEEP_FUNC)
                })
            } else {
                None
            };
            let _m = crate::meter::driver();
            // SAFETY: the HBA's entry point with a packet set up as the
            // framework does.
            if unsafe { setup(p.pkt(), cb, std::ptr::null_mut()) } != 0 {
                p.free_ext_and_release();
                return Err(InitError::SetupRefused);
            }
        }
        let w = p.wrap_mut();
        for (ptr, len) in [
            (w.pkt.pkt_cdbp, a.cmdlen),
            (w.pkt.pkt_private.cast::<u8>(), a.tgtlen),
            (w.pkt.pkt_scbp, a.statuslen),
        ] {
            if !ptr.is_null() && len > 0 {
                // SAFETY: each area has at least len bytes.
                unsafe { std::ptr::write_bytes(ptr, 0, len) };
            }
        }
        if let Some(d) = data.filter(|d| !d.is_empty()) {
            let mut dma_flags = if d.is_read() {
                ffi::DDI_DMA_READ
            } else {
                ffi::DDI_DMA_WRITE
            };
            if a.flags & ffi::PKT_CONSISTENT != 0 {
                dma_flags |= ffi::DDI_DMA_CONSISTENT;
            }
            if a.flags & ffi::PKT_DMA_PARTIAL != 0 {
                dma_flags |= ffi::DDI_DMA_PARTIAL;
            }
            let mut cookie = ffi::ddi_dma_cookie_t::default();
            let mut count = 0;
            // SAFETY: the packet's handle and a live buf (kept alive by
            // the packet's reference to the DataBuf).
            let rc = unsafe {
                dma::ddi_dma_buf_bind_handle(
                    w.pkt.pkt_handle,
                    d.buf_ptr(),
                    dma_flags,
                    ffi::ddi_callback_t(0),
                    std::ptr::null_mut(),
                    &mut cookie,
                    &mut count,
                )
            };
            if rc != ffi::DDI_DMA_MAPPED && rc != ffi::DDI_DMA_PARTIAL_MAP {
                p.destroy_inner();
                return Err(InitError::Dma(rc));
            }
            let w = p.wrap_mut();
            w.bound = true;
            w.totalwin = dma::window_count(w.pkt.pkt_handle);
            w.pkt.pkt_dma_flags = dma_flags;
            w.data = Some(d);
            p.move_window()?;
        }
        Ok(p)
    }

    /// `scsi_ifgetcap(9F)`
    pub fn getcap(&self, cap: &str, whom: i32) -> i32 {
        let _g = set_current(&self.machine);
        let c = CString::new(cap).unwrap_or_default();
        match self.tran().tran_getcap {
            // SAFETY: the HBA's entry point with our address and a string.
            Some(f) => unsafe { f(self.address(), c.as_ptr().cast_mut(), whom) },
            None => -1,
        }
    }

    /// `scsi_ifsetcap(9F)`
    pub fn setcap(&self, cap: &str, value: i32, whom: i32) -> i32 {
        let _g = set_current(&self.machine);
        let c = CString::new(cap).unwrap_or_default();
        match self.tran().tran_setcap {
            // SAFETY: as getcap.
            Some(f) => unsafe { f(self.address(), c.as_ptr().cast_mut(), value, whom) },
            None => -1,
        }
    }

    /// `scsi_abort(9F)`
    pub fn abort(&self, pkt: Option<&Packet>) -> i32 {
        let _g = set_current(&self.machine);
        match self.tran().tran_abort {
            // SAFETY: the HBA's entry point.
            Some(f) => unsafe {
                f(
                    self.address(),
                    pkt.map_or(std::ptr::null_mut(), |p| p.pkt()),
                )
            },
            None => 0,
        }
    }

    /// `scsi_reset(9F)`: `RESET_LUN` needs the `lun-reset` capability.
    pub fn reset(&self, level: i32) -> i32 {
        if level == ffi::RESET_LUN && self.getcap("lun-reset", 1) != 1 {
            return 0;
        }
        let _g = set_current(&self.machine);
        match self.tran().tran_reset {
            // SAFETY: the HBA's entry point.
            Some(f) => unsafe { f(self.address(), level) },
            None => 0,
        }
    }
}

/// How a packet ended, as the target driver reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PktResult {
    /// `pkt_reason`
    pub reason: u8,
    /// `pkt_state`
    pub state: PktState,
    /// `pkt_statistics`
    pub statistics: PktStatistics,
    /// `pkt_resid`
    pub resid: isize,
    /// The status area (`pkt_scblen` bytes).
    pub scb: Vec<u8>,
}

impl PktResult {
    /// The SCSI status byte.
    pub fn status(&self) -> u8 {
        self.scb.first().copied().unwrap_or(0)
    }

    /// The auto request sense data, if ARQ was done: the sense bytes the
    /// HBA says it delivered (per sts_rqpkt_resid).
    pub fn sense(&self) -> Option<Vec<u8>> {
        if !self.state.contains(PktState::ARQ_DONE) || self.scb.len() < 32 {
            return None;
        }
        let resid = usize::from(self.scb[3]);
        let rq_state = u32::from_ne_bytes(self.scb[4..8].try_into().ok()?);
        let nominal = if rq_state & PktState::XARQ_DONE.bits() != 0 {
            ffi::MAX_SENSE_LENGTH
        } else {
            ffi::SENSE_LENGTH
        };
        let n = nominal.checked_sub(resid)?.min(self.scb.len() - 12);
        Some(self.scb[12..12 + n].to_vec())
    }

    /// Sense key, ASC, ASCQ of fixed-format sense, if any.
    pub fn sense_key(&self) -> Option<(u8, u8, u8)> {
        let s = self.sense()?;
        (s.len() >= 14).then(|| (s[2] & 0xf, s[12], s[13]))
    }
}

/// A packet allocated by a target driver.
pub struct Packet {
    wrap: NonNull<PktWrap>,
    dev: Arc<Device>,
    owned: bool,
}

// SAFETY: a packet is used by one target-driver thread at a time; the
// framework's own state in it is behind locks.
unsafe impl Send for Packet {}
// SAFETY: shared references reach the framework's state only through its
// locks; the target-driver side is used by one thread at a time.
unsafe impl Sync for Packet {}

impl Packet {
    fn wrap(&self) -> &PktWrap {
        // SAFETY: a live object of the cache while the Packet exists.
        unsafe { self.wrap.as_ref() }
    }

    #[allow(clippy::mut_from_ref)]
    fn wrap_mut(&self) -> &mut PktWrap {
        // SAFETY: as wrap(); the target driver owns the packet.
        unsafe { &mut *self.wrap.as_ptr() }
    }

    /// The raw packet.
    pub fn pkt(&self) -> *mut scsi_pkt {
        self.wrap.as_ptr().cast()
    }

    /// Its device.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// The CDB area (`pkt_cdblen` bytes).
    pub fn cdb_mut(&mut self) -> &mut [u8] {
        let w = self.wrap_mut();
        if w.pkt.pkt_cdbp.is_null() {
            return &mut [];
        }
        // SAFETY: pkt_cdbp points at pkt_cdblen bytes of this packet.
        unsafe { std::slice::from_raw_parts_mut(w.pkt.pkt_cdbp, w.pkt.pkt_cdblen as usize) }
    }

    /// Sets `pkt_flags` (keeping the framework's bits).
    pub fn set_flags(&mut self, f: PktFlags) {
        self.wrap_mut().pkt.pkt_flags = f.bits();
    }

    /// `pkt_flags`
    pub fn flags(&self) -> PktFlags {
        PktFlags::from_bits_retain(self.wrap().pkt.pkt_flags)
    }

    /// Sets `pkt_time`.
    pub fn set_time(&mut self, seconds: i32) {
        self.wrap_mut().pkt.pkt_time = seconds;
    }

    /// Sets a completion callback (run on the completing thread).
    pub fn set_callback(&self, cb: Option<Callback>) {
        *lock(&self.wrap().callback) = cb;
    }

    /// Sets a callback run on the completing thread after the completion
    /// is recorded, from inside `scsi_hba_pkt_comp`: where a target driver
    /// such as sd starts its next command (it may start this very
    /// packet again). The owner must not destroy the packet while such a
    /// callback may still be running.
    pub fn set_restart(&self, cb: Option<Callback>) {
        *lock(&self.wrap().restart) = cb;
    }

    /// The cookies of the current window, as the HBA sees them.
    pub fn cookies(&self) -> Vec<ffi::ddi_dma_cookie_t> {
        let w = self.wrap();
        if w.pkt.pkt_cookies.is_null() {
            return Vec::new();
        }
        // SAFETY: pkt_cookies points at pkt_numcookies cookies while bound.
        unsafe { std::slice::from_raw_parts(w.pkt.pkt_cookies, w.pkt.pkt_numcookies as usize) }
            .to_vec()
    }

    /// `pkt_resid` right after allocation: bytes not covered by the windows
    /// so far.
    pub fn resid(&self) -> isize {
        self.wrap().pkt.pkt_resid
    }

    /// (current window index, number of windows)
    pub fn windows(&self) -> (usize, usize) {
        let w = self.wrap();
        (w.curwin, w.totalwin)
    }

    /// `pkt_dma_len`, `pkt_dma_offset` of the current window.
    pub fn window_extent(&self) -> (usize, i64) {
        let w = self.wrap();
        (w.pkt.pkt_dma_len, w.pkt.pkt_dma_offset)
    }

    /// `scsi_init_pkt` on this packet again: the next DMA window.
    pub fn next_window(&mut self) -> Result<(), InitError> {
        self.move_window()
    }

    fn move_window(&mut self) -> Result<(), InitError> {
        let w = self.wrap_mut();
        if !w.bound || w.curwin >= w.totalwin {
            return Err(InitError::NoWindow);
        }
        let h = w.pkt.pkt_handle;
        if w.curwin > 0 {
            let mut off = 0;
            let mut len = 0;
            let mut cookie = ffi::ddi_dma_cookie_t::default();
            let mut n = 0;
            // SAFETY: bound handle; out-pointers valid.
            if unsafe {
                dma::ddi_dma_getwin(h, w.curwin as u32, &mut off, &mut len, &mut cookie, &mut n)
            } != ffi::DDI_SUCCESS
            {
                return Err(InitError::NoWindow);
            }
        }
        let Some((cookies, n, off, len)) = dma::current_window(h) else {
            return Err(InitError::NoWindow);
        };
        w.pkt.pkt_cookies = cookies;
        w.pkt.pkt_numcookies = n;
        w.pkt.pkt_dma_offset = off as i64;
        w.pkt.pkt_dma_len = len;
        w.curwin += 1;
        w.total_xfer += len;
        let total = w.data.as_ref().map_or(0, |d| d.len());
        w.pkt.pkt_resid = (total - w.total_xfer) as isize;
        Ok(())
    }

    fn start(&self) -> c_int {
        let _g = set_current(&self.dev.machine);
        let w = self.wrap_mut();
        w.pkt.pkt_flags &= !PktFlags::PKT_COMP_CALLED.bits();
        w.comp_calls.store(0, Ordering::Release);
        lock(&w.comp).done = 0;
        let Some(start) = self.dev.tran().tran_start else {
            violation("no tran_start");
            return ffi::TRAN_FATAL_ERROR;
        };
        // A target driver may (wrongly) start a packet still in flight:
        // then a refusal must not make it look finished.
        let was = w.in_flight.swap(true, Ordering::AcqRel);
        let rc = {
            let _m = crate::meter::driver();
            // SAFETY: the HBA's entry point with the packet's own address.
            unsafe { start(&mut w.pkt.pkt_address, self.pkt()) }
        };
        if rc != ffi::TRAN_ACCEPT {
            self.wrap().in_flight.store(was, Ordering::Release);
        }
        rc
    }

    /// Records a violation if the HBA wrote beyond `pkt_scblen` (the
    /// guard bytes after the status area changed).
    fn check_scb_guard(&self) {
        let w = self.wrap();
        let len = w.pkt.pkt_scblen as usize;
        let tail: &[u8] = match &w.ext_scb {
            Some(b) => &b[len.min(b.len())..],
            None if !w.builtin_scb.is_null() => {
                // SAFETY: as when the guard was written in init_pkt.
                let room = unsafe {
                    std::slice::from_raw_parts(w.builtin_scb, ffi::DEFAULT_SCBLEN + SCB_GUARD)
                };
                &room[len.min(ffi::DEFAULT_SCBLEN)..]
            }
            None => &[],
        };
        if tail.iter().any(|&b| b != GUARD_BYTE) {
            violation(format!(
                "the HBA wrote beyond the {len}-byte status area of a packet"
            ));
        }
    }

    /// `scsi_transport(9F)` from normal (thread) context: a `FLAG_NOINTR`
    /// packet becomes an interrupt-driven one the caller waits for, as the
    /// framework does; others go straight to `tran_start`.
    pub fn transport(&self) -> c_int {
        let w = self.wrap_mut();
        if w.pkt.pkt_flags & PktFlags::NOINTR.bits() == 0 {
            return self.start();
        }
        let saved = (w.pkt.pkt_flags, w.pkt.pkt_comp);
        w.pkt.pkt_flags = (w.pkt.pkt_flags & !PktFlags::NOINTR.bits()) | 0x800; // FLAG_IMMEDIATE_CB
        w.pkt.pkt_comp = Some(emu_pkt_comp);
        let rc = self.start();
        if rc == ffi::TRAN_ACCEPT {
            let limit = Duration::from_secs((w.pkt.pkt_time.max(0) as u64) * 3 + 120);
            if !self.wait(limit) {
                violation("a FLAG_NOINTR packet never completed");
            }
        }
        let w = self.wrap_mut();
        w.pkt.pkt_flags = saved.0 | (w.pkt.pkt_flags & PktFlags::PKT_COMP_CALLED.bits());
        w.pkt.pkt_comp = saved.1;
        rc
    }

    /// `tran_start` with `FLAG_NOINTR` as an interrupt thread or a panic
    /// dump would issue it (the framework does not convert): the HBA must
    /// poll to completion and not call `scsi_hba_pkt_comp`.
    pub fn start_polled(&self) -> c_int {
        let w = self.wrap_mut();
        w.pkt.pkt_flags |= PktFlags::NOINTR.bits();
        let saved = w.pkt.pkt_comp.take();
        let rc = self.start();
        let w = self.wrap_mut();
        // A polled command is over when tran_start returns.
        w.in_flight.store(false, Ordering::Release);
        w.pkt.pkt_comp = saved;
        rc
    }

    /// Starts the packet without waiting (`scsi_transport` of an
    /// interrupt-driven packet).
    pub fn start_async(&self) -> c_int {
        self.start()
    }

    /// Waits up to `limit` for the completion routine; true if it ran.
    pub fn wait(&self, limit: Duration) -> bool {
        let w = self.wrap();
        let deadline = Instant::now() + limit;
        let mut c = lock(&w.comp);
        while c.done == 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = w
                .comp_cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Whether the HBA has the packet.
    pub fn in_flight(&self) -> bool {
        self.wrap().in_flight.load(Ordering::Acquire)
    }

    /// Whether the completion routine ran since the last start.
    pub fn is_done(&self) -> bool {
        lock(&self.wrap().comp).done > 0
    }

    /// How many times `scsi_hba_pkt_comp` was called since the last start.
    pub fn comp_calls(&self) -> u32 {
        self.wrap().comp_calls.load(Ordering::Acquire)
    }

    /// The outcome fields.
    pub fn result(&self) -> PktResult {
        let w = self.wrap();
        let scb = if w.pkt.pkt_scbp.is_null() {
            Vec::new()
        } else {
            // SAFETY: pkt_scbp points at pkt_scblen bytes.
            unsafe { std::slice::from_raw_parts(w.pkt.pkt_scbp, w.pkt.pkt_scblen as usize) }
                .to_vec()
        };
        PktResult {
            reason: w.pkt.pkt_reason,
            state: PktState::from_bits_retain(w.pkt.pkt_state),
            statistics: PktStatistics::from_bits_retain(w.pkt.pkt_statistics),
            resid: w.pkt.pkt_resid,
            scb,
        }
    }

    /// `scsi_sync_pkt(9F)`
    pub fn sync(&self) {
        let w = self.wrap();
        if w.bound && w.pkt.pkt_state & PktState::XFERRED_DATA.bits() != 0 {
            let t = if w.pkt.pkt_dma_flags & ffi::DDI_DMA_READ != 0 {
                ffi::DDI_DMA_SYNC_FORCPU
            } else {
                ffi::DDI_DMA_SYNC_FORDEV
            };
            let _g = set_current(&self.dev.machine);
            dma::ddi_dma_sync(w.pkt.pkt_handle, w.pkt.pkt_dma_offset, w.pkt.pkt_dma_len, t);
        }
    }

    /// `scsi_poll(9F)`: `FLAG_NOINTR`, no completion routine, 60 s default
    /// time, retrying while the HBA is busy. Returns 0 if the command got
    /// status GOOD, -1 otherwise (the packet holds the details).
    pub fn poll(&mut self) -> c_int {
        let w = self.wrap_mut();
        if w.pkt.pkt_time == 0 {
            w.pkt.pkt_time = 60;
        }
        w.pkt.pkt_flags |= PktFlags::NOINTR.bits();
        for _ in 0..500 {
            let w = self.wrap_mut();
            if !w.pkt.pkt_scbp.is_null() && w.pkt.pkt_scblen > 0 {
                // SAFETY: at least one status byte.
                unsafe { *w.pkt.pkt_scbp = 0 };
            }
            w.pkt.pkt_reason = 0;
            w.pkt.pkt_state = 0;
            match self.transport() {
                ffi::TRAN_ACCEPT => {}
                ffi::TRAN_BUSY => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                _ => return -1,
            }
            let r = self.result();
            if r.reason == ffi::CMD_INCOMPLETE && r.state.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            self.sync();
            let ok =
                r.reason == ffi::CMD_CMPLT && r.status() & ffi::STATUS_MASK == ffi::STATUS_GOOD;
            return if ok { 0 } else { -1 };
        }
        -1
    }

    fn free_ext_and_release(&mut self) {
        self.check_scb_guard();
        let w = self.wrap_mut();
        w.pkt.pkt_cdbp = w.builtin_cdb;
        w.pkt.pkt_scbp = w.builtin_scb;
        w.pkt.pkt_private = std::ptr::null_mut();
        w.pkt.pkt_cdblen = 0;
        w.pkt.pkt_scblen = 0;
        w.pkt.pkt_tgtlen = 0;
        w.ext_cdb = None;
        w.ext_scb = None;
        w.ext_tgt = None;
        w.data = None;
        w.device = None;
        *lock(&w.callback) = None;
        *lock(&w.restart) = None;
        let cache = w.cache;
        self.owned = false;
        // SAFETY: the cache outlives its objects.
        unsafe { (*cache).release(self.pkt().cast()) };
    }

    fn destroy_inner(&mut self) {
        let _g = set_current(&self.dev.machine);
        // Teardown first, then the framework unbinds (scsi_free_cache_pkt).
        if let Some(td) = self.dev.tran().tran_teardown_pkt {
            let _m = crate::meter::driver();
            // SAFETY: the HBA's entry point with its packet.
            unsafe { td(self.pkt()) };
        }
        let w2 = self.wrap_mut();
        if w2.bound {
            dma::ddi_dma_unbind_handle(w2.pkt.pkt_handle);
            w2.bound = false;
            w2.pkt.pkt_numcookies = 0;
            w2.pkt.pkt_cookies = std::ptr::null_mut();
        }
        self.free_ext_and_release();
    }

    /// `scsi_destroy_pkt(9F)`: a read's data is in the buffer afterwards.
    pub fn destroy(mut self) {
        self.destroy_inner();
    }

    /// `scsi_destroy_pkt(9F)` of a packet the HBA still has: the target
    /// driver bug an HBA must survive. The framework tears it down and
    /// frees it anyway; if the HBA completes it afterwards, that is a
    /// violation.
    pub fn destroy_outstanding(mut self) {
        // Before the teardown: from it on the HBA does not have the packet,
        // and after it the object may belong to someone else.
        self.wrap().in_flight.store(false, Ordering::Release);
        self.destroy_inner();
    }
}

impl Drop for Packet {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if self.wrap().in_flight.load(Ordering::Acquire) {
            // The HBA may still complete it: it cannot be freed. Leak it and
            // fail the test.
            self.dev
                .machine
                .violation("a packet was dropped while the HBA still had it");
            return;
        }
        self.destroy_inner();
    }
}

/// Guard bytes after a status area.
pub const SCB_GUARD: usize = 16;
const GUARD_BYTE: u8 = 0xa5;
