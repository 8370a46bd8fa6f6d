//! HBA registration: `scsi_hba_tran_alloc(9F)`, `scsi_hba_attach_setup(9F)`,
//! `scsi_hba_detach(9F)`, `scsi_hba_iport_register(9F)`, and the packet
//! cache the framework builds for an HBA that uses `tran_setup_pkt(9E)`.

use super::packet::PktWrap;
use crate::ddi::devinfo::{NodeKind, node};
use crate::ddi::kmem::{self, KmemMode, Rng};
use crate::ddi::violation;
use crate::machine::{Machine, lock};
use rvscsi::ffi::{self, ddi_dma_attr_t, dev_info_t, scsi_hba_tran};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, c_char, c_int};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

/// Framework state of an attached HBA instance.
pub struct HbaState {
    /// The machine.
    pub machine: Arc<Machine>,
    /// The HBA node.
    pub dip: *mut dev_info_t,
    /// The HBA's tran.
    pub tran: *mut scsi_hba_tran,
    /// The packet cache (with `tran_setup_pkt`).
    pub cache: Mutex<Option<Arc<PktCache>>>,
    /// Registered iport names.
    pub iports: Mutex<Vec<String>>,
}

// SAFETY: the raw pointers name framework objects whose lifetime the
// framework manages; access is serialized by the framework's flows.
unsafe impl Send for HbaState {}
// SAFETY: shared references only read the pointers; the framework's
// flows (attach, detach, bus config) serialize what they change.
unsafe impl Sync for HbaState {}

static HBAS: Mutex<Option<HashMap<usize, Arc<HbaState>>>> = Mutex::new(None);
static TRANS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

/// The framework state of HBA node `dip`.
pub fn hba_state(dip: *mut dev_info_t) -> Option<Arc<HbaState>> {
    lock(&HBAS)
        .get_or_insert_with(HashMap::new)
        .get(&(dip as usize))
        .cloned()
}

/// Whether `tran` came from `scsi_hba_tran_alloc` (or is an iport's copy).
pub fn tran_known(tran: *const scsi_hba_tran) -> bool {
    lock(&TRANS)
        .get_or_insert_with(HashSet::new)
        .contains(&(tran as usize))
}

fn new_tran() -> *mut scsi_hba_tran {
    // SAFETY: scsi_hba_tran is plain old data (pointers, integers, Option
    // of function pointers): all-zero is a valid value, as kmem_zalloc
    // gives it in the kernel.
    let t: Box<scsi_hba_tran> = Box::new(unsafe { std::mem::zeroed() });
    let p = Box::into_raw(t);
    lock(&TRANS)
        .get_or_insert_with(HashSet::new)
        .insert(p as usize);
    p
}

/// A copy of `htran` for an iport (what the framework does before the
/// iport attaches): `tran_hba_private` cleared, `tran_iport_dip` set.
///
/// # Safety
/// `htran` must be a live `scsi_hba_tran`.
pub unsafe fn clone_tran_for_iport(
    htran: *const scsi_hba_tran,
    iport: *mut dev_info_t,
) -> *mut scsi_hba_tran {
    let p = new_tran();
    // SAFETY: htran is a live tran; p is fresh; scsi_hba_tran is POD (the
    // kernel copies it with a struct assignment).
    unsafe {
        std::ptr::copy_nonoverlapping(htran, p, 1);
        (*p).tran_open_flag = 0;
        (*p).tran_hba_private = std::ptr::null_mut();
        (*p).tran_iport_dip = iport;
        (*p).tran_hba_flags &= !ffi::SCSI_HBA_HBA;
    }
    p
}

/// Frees a tran made by [`new_tran`].
fn free_tran(tran: *mut scsi_hba_tran) -> bool {
    if lock(&TRANS)
        .get_or_insert_with(HashSet::new)
        .remove(&(tran as usize))
    {
        // SAFETY: registered, made by Box::into_raw.
        drop(unsafe { Box::from_raw(tran) });
        true
    } else {
        false
    }
}

/// Frees an iport's tran copy.
pub fn free_iport_tran(tran: *mut scsi_hba_tran) {
    free_tran(tran);
}

/// The framework's `bus_ops` and `cb_ops` for HBA drivers: their
/// addresses only (scsi_hba.c `scsi_hba_busops`, `scsi_hba_cbops`).
#[repr(C)]
pub struct FrameworkOps(usize);
/// `scsi_hba_busops`
pub static SCSI_HBA_BUSOPS: FrameworkOps = FrameworkOps(0);
/// `scsi_hba_cbops`
pub static SCSI_HBA_CBOPS: FrameworkOps = FrameworkOps(0);

/// The `dev_ops` of a linkage (null if malformed).
///
/// # Safety
/// `modlp` is null or a `struct modlinkage` whose first linkage is a
/// `modldrv`.
unsafe fn dev_ops_of(modlp: *mut ffi::modlinkage) -> *mut ffi::dev_ops {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let Some(ml) = modlp.as_ref() else {
            return std::ptr::null_mut();
        };
        match ml.ml_linkage[0].cast::<ffi::modldrv>().as_ref() {
            Some(md) => md.drv_dev_ops,
            None => std::ptr::null_mut(),
        }
    }
}

/// `scsi_hba_init(9F)` (from `_init`, before `mod_install`): the framework
/// puts its own `bus_ops` (and `cb_ops`, if the driver has none) into the
/// driver's `dev_ops`, as scsi_hba.c does.
///
/// # Safety
/// `modlp` is the driver's `struct modlinkage`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_init(modlp: *mut ffi::modlinkage) -> c_int {
    let _kernel = crate::meter::kernel();
    // SAFETY: guaranteed by the caller.
    let Some(ops) = (unsafe { dev_ops_of(modlp).as_mut() }) else {
        violation("scsi_hba_init: a linkage without a modldrv and dev_ops");
        return crate::ddi::modctl::EINVAL;
    };
    if !ops.devo_bus_ops.is_null() {
        violation("scsi_hba_init: the HBA's dev_ops already has bus_ops");
    }
    ops.devo_bus_ops = std::ptr::from_ref(&SCSI_HBA_BUSOPS).cast_mut().cast();
    if ops.devo_cb_ops.is_null() {
        ops.devo_cb_ops = std::ptr::from_ref(&SCSI_HBA_CBOPS).cast_mut().cast();
    }
    0
}

/// `scsi_hba_fini(9F)` (from `_fini`, after `mod_remove`, or from `_init`
/// when `mod_install` failed): undoes `scsi_hba_init`.
///
/// # Safety
/// `modlp` is the driver's `struct modlinkage`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_fini(modlp: *mut ffi::modlinkage) {
    let _kernel = crate::meter::kernel();
    // SAFETY: guaranteed by the caller.
    let Some(ops) = (unsafe { dev_ops_of(modlp).as_mut() }) else {
        violation("scsi_hba_fini: a linkage without a modldrv and dev_ops");
        return;
    };
    if !std::ptr::eq(ops.devo_bus_ops.cast_const().cast(), &SCSI_HBA_BUSOPS) {
        violation("scsi_hba_fini without scsi_hba_init");
    }
    ops.devo_bus_ops = std::ptr::null_mut();
    if std::ptr::eq(ops.devo_cb_ops.cast_const().cast(), &SCSI_HBA_CBOPS) {
        ops.devo_cb_ops = std::ptr::null_mut();
    }
}

/// `scsi_hba_tran_alloc(9F)`: a zeroed `scsi_hba_tran` of the real size.
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_tran_alloc(dip: *mut dev_info_t, _flags: c_int) -> *mut scsi_hba_tran {
    let _kernel = crate::meter::kernel();
    if node(dip, "scsi_hba_tran_alloc").is_none() {
        return std::ptr::null_mut();
    }
    new_tran()
}

/// `scsi_hba_tran_free(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_tran_free(tran: *mut scsi_hba_tran) {
    let _kernel = crate::meter::kernel();
    if !free_tran(tran) {
        violation(format!(
            "scsi_hba_tran_free of {tran:p}, which scsi_hba_tran_alloc did not return"
        ));
    }
}

/// `scsi_hba_attach_setup(9F)`
///
/// # Safety
/// Pointers as the DDI requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_attach_setup(
    dip: *mut dev_info_t,
    attr: *mut ddi_dma_attr_t,
    tran: *mut scsi_hba_tran,
    flags: c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "scsi_hba_attach_setup") else {
        return ffi::DDI_FAILURE;
    };
    if n.kind != NodeKind::Hba {
        violation("scsi_hba_attach_setup on an iport or child node");
        return ffi::DDI_FAILURE;
    }
    if tran.is_null() || !tran_known(tran) || attr.is_null() {
        violation("scsi_hba_attach_setup: tran not from scsi_hba_tran_alloc, or no DMA attributes");
        return ffi::DDI_FAILURE;
    }
    // SAFETY: a live tran (checked) that the driver filled in.
    let t = unsafe { &mut *tran };
    if t.tran_get_name.is_some() != t.tran_get_bus_addr.is_some() {
        violation(
            "scsi_hba_attach_setup: tran_get_name and tran_get_bus_addr must be set together",
        );
        return ffi::DDI_FAILURE;
    }
    t.tran_hba_dip = dip;
    t.tran_hba_flags = flags;
    // SAFETY: checked non-null; the driver's attributes.
    t.tran_dma_attr = unsafe { *attr };
    let cache = if t.tran_setup_pkt.is_some() {
        if t.tran_init_pkt.is_some() || t.tran_destroy_pkt.is_some() {
            violation(
                "scsi_hba_attach_setup: tran_setup_pkt with tran_init_pkt/tran_destroy_pkt also set",
            );
            return ffi::DDI_FAILURE;
        }
        if t.tran_teardown_pkt.is_none() {
            violation("scsi_hba_attach_setup: tran_setup_pkt without tran_teardown_pkt");
            return ffi::DDI_FAILURE;
        }
        Some(PktCache::new(n.machine.clone(), dip, tran))
    } else {
        None
    };
    if t.tran_start.is_none() {
        violation("scsi_hba_attach_setup: no tran_start");
        return ffi::DDI_FAILURE;
    }
    n.driver_private.store(tran.cast(), Ordering::Release);
    let st = Arc::new(HbaState {
        machine: n.machine.clone(),
        dip,
        tran,
        cache: Mutex::new(cache),
        iports: Mutex::new(Vec::new()),
    });
    lock(&HBAS)
        .get_or_insert_with(HashMap::new)
        .insert(dip as usize, st);
    ffi::DDI_SUCCESS
}

/// `scsi_hba_detach(9F)`: destroys the packet cache (running the
/// destructor of every cached packet).
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_detach(dip: *mut dev_info_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "scsi_hba_detach") else {
        return ffi::DDI_FAILURE;
    };
    let Some(st) = lock(&HBAS)
        .get_or_insert_with(HashMap::new)
        .remove(&(dip as usize))
    else {
        violation("scsi_hba_detach of a node without scsi_hba_attach_setup");
        return ffi::DDI_FAILURE;
    };
    if let Some(c) = lock(&st.cache).take() {
        c.destroy();
    }
    // SAFETY: the HBA's live tran.
    unsafe { (*st.tran).tran_hba_dip = std::ptr::null_mut() };
    n.driver_private
        .store(std::ptr::null_mut(), Ordering::Release);
    ffi::DDI_SUCCESS
}

/// `scsi_hba_iport_register(9F)`
///
/// # Safety
/// `port` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_iport_register(dip: *mut dev_info_t, port: *mut c_char) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(st) = hba_state(dip) else {
        violation("scsi_hba_iport_register before scsi_hba_attach_setup");
        return ffi::DDI_FAILURE;
    };
    if port.is_null() {
        return ffi::DDI_FAILURE;
    }
    // SAFETY: NUL-terminated (caller).
    let name = unsafe { CStr::from_ptr(port) }
        .to_string_lossy()
        .into_owned();
    let mut ports = lock(&st.iports);
    if ports.len() >= 32 {
        return ffi::DDI_FAILURE;
    }
    if !ports.contains(&name) {
        ports.push(name);
    }
    ffi::DDI_SUCCESS
}

/// `scsi_hba_iport_unit_address(9F)`: NULL unless `dip` is an iport.
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_iport_unit_address(dip: *mut dev_info_t) -> *mut c_char {
    let _kernel = crate::meter::kernel();
    match node(dip, "scsi_hba_iport_unit_address").map(|n| &n.kind) {
        Some(NodeKind::Iport(ua)) => ua.as_ptr().cast_mut(),
        _ => std::ptr::null_mut(),
    }
}

/// The capability names `scsi_hba_lookup_capstr(9F)` knows, by index
/// (`SCSI_CAP_*`), and its legacy aliases.
pub const CAP_NAMES: [&str; 23] = [
    "dma-max",
    "msg-out",
    "disconnect",
    "synchronous",
    "wide-xfer",
    "parity",
    "initiator-id",
    "untagged-qing",
    "tagged-qing",
    "auto-rqsense",
    "linked-cmds",
    "sector-size",
    "total-sectors",
    "geometry",
    "reset-notification",
    "qfull-retries",
    "qfull-retry-interval",
    "scsi-version",
    "interconnect-type",
    "lun-reset",
    "max-cdb-length",
    "dma-max-arch",
    "tran-layer-retries",
];

/// `scsi_hba_lookup_capstr(9F)`
///
/// # Safety
/// `capstr` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_lookup_capstr(capstr: *mut c_char) -> c_int {
    let _kernel = crate::meter::kernel();
    if capstr.is_null() {
        return -1;
    }
    // SAFETY: NUL-terminated (caller).
    let s = unsafe { CStr::from_ptr(capstr) }.to_string_lossy();
    match s.as_ref() {
        "dma_max" => 0,
        "msg_out" => 1,
        "wide_xfer" => 4,
        other => CAP_NAMES
            .iter()
            .position(|&n| n == other)
            .map_or(-1, |i| i as c_int),
    }
}

/// The per-instance packet cache (`pkt_cache_<drv>_<inst>`), as
/// `scsi_hba_attach_setup` creates it: `kmem_cache_create(name, len, 8,
/// scsi_hba_pkt_constructor, scsi_hba_pkt_destructor, NULL, tran, NULL,
/// 0)` (scsi_hba.c). Objects are the framework wrapper, `tran_hba_len`
/// bytes for the HBA, a 16-byte CDB area and a `scsi_arq_status`. The
/// constructor (`scsi_hba_pkt_constructor`) zeroes the object, points
/// `pkt_ha_private` and the areas into it, allocates `pkt_handle` and calls
/// `tran_pkt_constructor`; the destructor (`scsi_hba_pkt_destructor`) calls
/// `tran_pkt_destructor`; `scsi_init_cache_pkt` takes objects with
/// `kmem_cache_alloc` and `scsi_free_cache_pkt` gives them back with
/// `kmem_cache_free` (scsi_resource.c).
///
/// The cache follows the kmem mode in effect at its creation
/// ([`crate::ddi::kmem`]). Non-DEBUG, an object is constructed once and
/// cached constructed across allocations. DEBUG (`KMF_DEADBEEF`), the
/// destructor runs at every free and the object is filled with the free
/// pattern, checked at its next allocation (and when a reap frees it),
/// then the constructor runs again. A random reap (on a thread of the
/// cache, as `kmem_taskq` runs `kmem_cache_reap`) frees every free object:
/// the destructor first for a constructed one (non-DEBUG), the pattern
/// checked for a poisoned one (DEBUG).
pub struct PktCache {
    machine: Arc<Machine>,
    dip: *mut dev_info_t,
    tran: *mut scsi_hba_tran,
    layout: std::alloc::Layout,
    mode: KmemMode,
    me: Weak<PktCache>,
    /// Free objects: constructed (non-DEBUG, reused last-freed first) or
    /// poisoned (DEBUG, reused oldest first, which leaves a freed object
    /// poisoned the longest).
    free: Mutex<VecDeque<usize>>,
    /// Every object of the cache, allocated or free.
    all: Mutex<HashSet<usize>>,
    rng: Mutex<Rng>,
    reaper: Mutex<ReaperState>,
    reaper_cv: Condvar,
    reaper_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Constructor calls that succeeded.
    pub constructed: AtomicU64,
    /// Destructor calls.
    pub destructed: AtomicU64,
    /// Objects allocated to target drivers now.
    pub in_use: AtomicI64,
    /// Reaps done.
    pub reaps: AtomicU64,
    /// Objects freed by reaps.
    pub reaped: AtomicU64,
    /// Free objects found written after their free (DEBUG; each is also a
    /// violation).
    pub modified: AtomicU64,
}

#[derive(Default)]
struct ReaperState {
    requested: bool,
    stop: bool,
}

// SAFETY: raw pointers name framework objects (node, tran) that outlive
// the cache; object lists are under locks.
unsafe impl Send for PktCache {}
// SAFETY: the object lists are under locks, and the node and tran
// pointers are only read.
unsafe impl Sync for PktCache {}

/// Bytes of the framework's part of each object.
pub const WRAP_SIZE: usize = std::mem::size_of::<PktWrap>().next_multiple_of(8);

impl PktCache {
    fn new(machine: Arc<Machine>, dip: *mut dev_info_t, tran: *mut scsi_hba_tran) -> Arc<Self> {
        // SAFETY: live tran.
        let hba_len = unsafe { (*tran).tran_hba_len } as usize;
        // The status area comes last, followed by guard bytes that catch an
        // HBA writing beyond it.
        let size = WRAP_SIZE
            + hba_len.next_multiple_of(8)
            + ffi::DEFAULT_CDBLEN
            + ffi::DEFAULT_SCBLEN
            + super::packet::SCB_GUARD;
        let layout = std::alloc::Layout::from_size_align(size, 8)
            .unwrap_or(std::alloc::Layout::new::<u64>());
        // kmem_cache_create copies kmem_flags at creation.
        let mode = kmem::mode();
        Arc::new_cyclic(|me| PktCache {
            machine,
            dip,
            tran,
            layout,
            mode,
            me: me.clone(),
            free: Mutex::new(VecDeque::new()),
            all: Mutex::new(HashSet::new()),
            rng: Mutex::new(Rng::for_new_cache(mode.seed)),
            reaper: Mutex::new(ReaperState::default()),
            reaper_cv: Condvar::new(),
            reaper_thread: Mutex::new(None),
            constructed: AtomicU64::new(0),
            destructed: AtomicU64::new(0),
            in_use: AtomicI64::new(0),
            reaps: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            modified: AtomicU64::new(0),
        })
    }

    /// The HBA's tran.
    pub fn tran(&self) -> *mut scsi_hba_tran {
        self.tran
    }

    /// The kmem mode the cache was created in.
    pub fn mode(&self) -> KmemMode {
        self.mode
    }

    /// `kmem_cache_alloc`: a free object (constructed, or in DEBUG mode
    /// checked and constructed now), else a new one; `None` if the
    /// constructor failed.
    pub fn alloc(&self, kmflag: c_int) -> Option<*mut PktWrap> {
        self.maybe_reap();
        let obj = if self.mode.debug {
            let base = match lock(&self.free).pop_front() {
                Some(b) => {
                    self.check_free_pattern(b, "its next allocation");
                    b as *mut u8
                }
                None => self.new_buffer()?,
            };
            // verify_and_copy_pattern: what the constructor finds.
            // SAFETY: a free buffer of the cache, layout.size() bytes.
            unsafe { kmem::fill_pattern(base, self.layout.size(), kmem::UNINITIALIZED_PATTERN) };
            match self.construct(base, kmflag) {
                Some(o) => o,
                None => {
                    // kmem_cache_alloc_debug: back to the slab, poisoned.
                    self.poison(base);
                    lock(&self.free).push_back(base as usize);
                    return None;
                }
            }
        } else {
            let free = lock(&self.free).pop_back();
            match free {
                Some(o) => o as *mut PktWrap,
                None => {
                    let base = self.new_buffer()?;
                    match self.construct(base, kmflag) {
                        Some(o) => o,
                        None => {
                            self.free_buffer(base as usize);
                            return None;
                        }
                    }
                }
            }
        };
        self.in_use.fetch_add(1, Ordering::AcqRel);
        Some(obj)
    }

    /// `kmem_cache_free`: the object back to the cache (in DEBUG mode
    /// destroyed and poisoned first, `kmem_cache_free_debug`).
    pub fn release(&self, obj: *mut PktWrap) {
        if !lock(&self.all).contains(&(obj as usize)) {
            violation("packet returned to a cache it does not belong to");
            return;
        }
        self.in_use.fetch_sub(1, Ordering::AcqRel);
        if self.mode.debug {
            self.destruct(obj);
            self.poison(obj.cast());
        }
        lock(&self.free).push_back(obj as usize);
        self.maybe_reap();
    }

    /// Fresh memory for one object, counted in the cache.
    fn new_buffer(&self) -> Option<*mut u8> {
        // SAFETY: non-zero size.
        let base = unsafe { std::alloc::alloc(self.layout) };
        if base.is_null() {
            return None;
        }
        lock(&self.all).insert(base as usize);
        Some(base)
    }

    /// Gives an object's memory back (it holds no live value).
    fn free_buffer(&self, base: usize) {
        lock(&self.all).remove(&base);
        // SAFETY: allocated by new_buffer with this layout.
        unsafe { std::alloc::dealloc(base as *mut u8, self.layout) };
    }

    /// Fills an object with the free pattern.
    fn poison(&self, base: *mut u8) {
        // SAFETY: an object of the cache holding no live value.
        unsafe { kmem::fill_pattern(base, self.layout.size(), kmem::FREE_PATTERN) };
    }

    /// Which part of an object offset `off` is in.
    fn part_of(&self, off: usize) -> String {
        // SAFETY: live tran.
        let hba_len = unsafe { (*self.tran).tran_hba_len } as usize;
        let pkt = std::mem::size_of::<ffi::scsi_pkt>();
        let ha = WRAP_SIZE;
        if off < pkt {
            format!("the scsi_pkt, +{off:#x}")
        } else if off < ha {
            format!("the framework's wrapper, +{:#x}", off - pkt)
        } else if off < ha + hba_len {
            format!("the HBA's private area (pkt_ha_private), +{:#x}", off - ha)
        } else {
            format!("the CDB/status areas, +{:#x}", off - ha - hba_len)
        }
    }

    /// DEBUG: checks that a free object still holds the free pattern
    /// (`KMERR_MODIFIED` otherwise: someone wrote it after its free).
    fn check_free_pattern(&self, base: usize, when: &str) {
        // SAFETY: a free object of the cache, layout.size() bytes.
        let found = unsafe {
            kmem::find_modified(base as *const u8, self.layout.size(), kmem::FREE_PATTERN)
        };
        if let Some((off, word)) = found {
            self.modified.fetch_add(1, Ordering::AcqRel);
            self.machine.violation(format!(
                "kmem DEBUG: packet object {base:#x} was written after scsi_destroy_pkt freed it \
                 (found at {when}): offset {off:#x}, in {}, holds {word:#018x} instead of the \
                 free pattern {:#018x} (KMERR_MODIFIED; RVSCSI_KMEM_SEED={:#x})",
                self.part_of(off),
                kmem::FREE_PATTERN,
                self.mode.seed
            ));
        }
    }

    /// The kmem cache constructor (`scsi_hba_pkt_constructor` in
    /// scsi_hba.c) on the memory at `base`: zero, HBA private pointer, DMA
    /// handle, CDB and status areas, then the HBA's
    /// `tran_pkt_constructor`. `None` (nothing live left in the memory) if
    /// a step failed.
    fn construct(&self, base: *mut u8, kmflag: c_int) -> Option<*mut PktWrap> {
        // SAFETY: live tran.
        let t = unsafe { &*self.tran };
        let hba_len = t.tran_hba_len as usize;
        let obj = base.cast::<PktWrap>();
        // SAFETY: base is an 8-aligned object of the cache of layout.size()
        // (at least WRAP_SIZE + the areas) bytes holding no live value;
        // zeroed (the constructor's bzero), then the framework fields
        // initialized in place; the areas follow inside the same object.
        unsafe {
            std::ptr::write_bytes(base, 0, self.layout.size());
            PktWrap::init(obj, self as *const PktCache);
            let ha = base.add(WRAP_SIZE);
            (*obj).pkt.pkt_ha_private = ha.cast();
            let cdb = ha.add(hba_len);
            let scb = cdb.add(ffi::DEFAULT_CDBLEN);
            if t.tran_hba_flags & ffi::SCSI_HBA_TRAN_CDB != 0 {
                (*obj).pkt.pkt_cdbp = cdb;
            }
            if t.tran_hba_flags & ffi::SCSI_HBA_TRAN_SCB != 0 {
                (*obj).pkt.pkt_scbp = scb;
            }
            (*obj).set_builtin_areas();
        }
        let sleep = if kmflag == ffi::KM_NOSLEEP {
            ffi::DDI_DMA_DONTWAIT
        } else {
            ffi::DDI_DMA_SLEEP
        };
        let mut h: ffi::ddi_dma_handle_t = std::ptr::null_mut();
        // SAFETY: the HBA node and its DMA attributes; out-pointer valid.
        let rc = unsafe {
            crate::ddi::dma::ddi_dma_alloc_handle(
                self.dip,
                &t.tran_dma_attr,
                ffi::ddi_callback_t(sleep),
                std::ptr::null_mut(),
                &mut h,
            )
        };
        if rc != ffi::DDI_SUCCESS {
            // SAFETY: initialized above, dropped once.
            unsafe { std::ptr::drop_in_place(obj) };
            return None;
        }
        // SAFETY: obj is initialized.
        unsafe { (*obj).pkt.pkt_handle = h };
        if let Some(ctor) = t.tran_pkt_constructor {
            // SAFETY: the HBA's constructor with a zeroed, set-up packet.
            let rc = unsafe { ctor(obj.cast(), self.tran, kmflag) };
            if rc != 0 {
                // SAFETY: allocated above, not used by anyone else.
                unsafe { crate::ddi::dma::ddi_dma_free_handle(&mut h) };
                // SAFETY: initialized above, dropped once.
                unsafe { std::ptr::drop_in_place(obj) };
                return None;
            }
        }
        self.constructed.fetch_add(1, Ordering::AcqRel);
        Some(obj)
    }

    /// The kmem cache destructor (`scsi_hba_pkt_destructor`): the HBA's
    /// `tran_pkt_destructor`, the DMA handle, the framework fields. The
    /// memory stays the cache's.
    fn destruct(&self, obj: *mut PktWrap) {
        // SAFETY: live tran.
        let t = unsafe { &*self.tran };
        if let Some(dtor) = t.tran_pkt_destructor {
            // SAFETY: a constructed object of this cache nobody uses.
            unsafe { dtor(obj.cast(), self.tran) };
        }
        // SAFETY: constructed object.
        let mut h = unsafe { (*obj).pkt.pkt_handle };
        // SAFETY: the object's handle, freed once.
        unsafe { crate::ddi::dma::ddi_dma_free_handle(&mut h) };
        // SAFETY: the framework fields were initialized in place by
        // PktWrap::init; dropped once.
        unsafe { std::ptr::drop_in_place(obj) };
        self.destructed.fetch_add(1, Ordering::AcqRel);
    }

    /// A reap at a random point of the cache's operations (seeded).
    fn maybe_reap(&self) {
        if self.mode.reap_one_in == 0 || !lock(&self.rng).one_in(self.mode.reap_one_in) {
            return;
        }
        lock(&self.reaper).requested = true;
        self.reaper_cv.notify_all();
        let mut t = lock(&self.reaper_thread);
        if t.is_none() {
            let me = self.me.clone();
            *t = std::thread::Builder::new()
                .name("kmem_taskq".into())
                .spawn(move || reaper(me))
                .ok();
        }
    }

    /// `kmem_cache_reap` as memory pressure runs it: every free object is
    /// destroyed and its memory freed.
    pub fn reap(&self) {
        let _g = crate::machine::set_current(&self.machine);
        let objs: Vec<usize> = lock(&self.free).drain(..).collect();
        self.reaps.fetch_add(1, Ordering::AcqRel);
        for o in objs {
            if self.mode.debug {
                // kmem_magazine_destroy: the pattern is checked; the
                // destructor ran at free.
                self.check_free_pattern(o, "a reap");
            } else {
                self.destruct(o as *mut PktWrap);
            }
            self.free_buffer(o);
            self.reaped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// `kmem_cache_destroy`: the reaper stops, every free object is
    /// destroyed. Objects still allocated are a target driver leak.
    pub fn destroy(&self) {
        lock(&self.reaper).stop = true;
        self.reaper_cv.notify_all();
        let t = lock(&self.reaper_thread).take();
        if let Some(t) = t {
            let _ = t.join();
        }
        let n = self.in_use.load(Ordering::Acquire);
        if n != 0 {
            self.machine.violation(format!(
                "{n} packet(s) still allocated when the HBA detached"
            ));
        }
        let objs: Vec<usize> = lock(&self.free).drain(..).collect();
        for o in objs {
            if self.mode.debug {
                self.check_free_pattern(o, "kmem_cache_destroy");
            } else {
                self.destruct(o as *mut PktWrap);
            }
            self.free_buffer(o);
        }
    }
}

/// The cache's reaper thread (kmem_taskq's part): reaps when asked, until
/// the cache is destroyed (or gone).
fn reaper(me: Weak<PktCache>) {
    loop {
        let Some(c) = me.upgrade() else { return };
        {
            let mut s = lock(&c.reaper);
            while !s.requested && !s.stop {
                s = c
                    .reaper_cv
                    .wait_timeout(s, std::time::Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if !s.requested && !s.stop && me.strong_count() <= 1 {
                    return;
                }
            }
            if s.stop {
                return;
            }
            s.requested = false;
        }
        c.reap();
    }
}
