//! Target maps (`scsi_hba_tgtmap_create(9F)` and friends) and what the
//! framework does when a target appears: a probe node for LUN 0,
//! INQUIRY, REPORT LUNS (through `scsi_poll`), then a child per LUN
//! ("target,lun" in lowercase hex, the LUN in illumos `lun64` form), each
//! initialized with `tran_tgt_init` and handed to the target driver.
//!
//! Configuration runs on the map's own thread after a short settle
//! (damap batches changes the same way; its real settle time is
//! shortened here so tests do not wait seconds for nothing).

use super::buf::DataBuf;
use super::device;
use super::hba::{HbaState, hba_state};
use super::packet::{Device, InitArgs};
use crate::ddi::devinfo::{DevInfo, NodeKind, node};
use crate::ddi::violation;
use crate::machine::{lock, set_current};
use rvscsi::ffi::{self, dev_info_t, scsi_hba_tgtmap_t, scsi_hba_tran};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the map lets changes accumulate before configuring.
const SETTLE: Duration = Duration::from_millis(20);

/// A LUN the target driver attached to (or refused).
pub trait TargetInstance: Send + Sync {
    /// The LUN goes away (detach(9E) of the target driver).
    fn detach(&self);
}

/// The target driver the emulated framework binds LUNs to (sd's role).
pub trait TargetDriver: Send + Sync {
    /// A LUN was configured: attach to it. `inquiry` is its standard
    /// INQUIRY data.
    fn attach(&self, dev: Arc<Device>, inquiry: &[u8]) -> Result<Box<dyn TargetInstance>, String>;
}

struct Lun {
    device: Arc<Device>,
    instance: Option<Box<dyn TargetInstance>>,
}

enum Work {
    Reconcile,
    ScanLuns(String),
}

#[derive(Default)]
struct MapState {
    observing: Option<BTreeSet<String>>,
    reported: BTreeSet<String>,
    configured: BTreeMap<String, BTreeMap<u64, Lun>>,
    pending: VecDeque<Work>,
    busy: bool,
    closing: bool,
    /// A detach holds the iport (as `ndi_devi_enter` does): no
    /// configuration work starts until it lets go.
    held: bool,
    last_change: Option<Instant>,
}

/// A target map.
pub struct TgtMap {
    hba: Arc<HbaState>,
    iport: *mut dev_info_t,
    tran: *mut scsi_hba_tran,
    driver: Arc<dyn TargetDriver>,
    state: Mutex<MapState>,
    cv: Condvar,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

// SAFETY: raw pointers name the iport and its tran, which outlive the map
// (iport detach destroys the map first).
unsafe impl Send for TgtMap {}
// SAFETY: as above; state is under a lock.
unsafe impl Sync for TgtMap {}

static MAPS: Mutex<Option<HashMap<usize, Arc<TgtMap>>>> = Mutex::new(None);
static TARGET_DRIVERS: Mutex<Option<HashMap<usize, Arc<dyn TargetDriver>>>> = Mutex::new(None);
static NEXT_INSTANCE: AtomicI32 = AtomicI32::new(0);

/// Which target driver LUNs under HBA node `hba` are given to.
pub fn set_target_driver(hba: *mut dev_info_t, d: Arc<dyn TargetDriver>) {
    lock(&TARGET_DRIVERS)
        .get_or_insert_with(HashMap::new)
        .insert(hba as usize, d);
}

fn map_of(p: *mut scsi_hba_tgtmap_t, func: &str) -> Option<Arc<TgtMap>> {
    let m = lock(&MAPS)
        .get_or_insert_with(HashMap::new)
        .get(&(p as usize))
        .cloned();
    if m.is_none() {
        violation(format!("{func}: unknown target map {p:p}"));
    }
    m
}

/// The target map of iport `iport`, if it has one.
pub fn map_of_iport(iport: *mut dev_info_t) -> Option<Arc<TgtMap>> {
    lock(&MAPS)
        .get_or_insert_with(HashMap::new)
        .values()
        .find(|m| m.iport == iport)
        .cloned()
}

/// Formats a unit address the way the framework names LUN children.
pub fn unit_address(target: &str, lun64: u64) -> String {
    format!("{target},{lun64:x}")
}

/// `scsi_lun_to_lun64`: peripheral-format single-level LUNs keep the
/// SCSI-2 compatible form; anything else the full 64-bit form.
pub fn lun_to_lun64(l: [u8; 8]) -> u64 {
    if l[2..].iter().all(|&b| b == 0) && l[0] & 0xc0 == 0 {
        (u64::from(l[0] & 0x3f) << 8) | u64::from(l[1])
    } else {
        u64::from_be_bytes(l)
    }
}

impl TgtMap {
    fn notify(&self, w: Work) {
        let mut s = lock(&self.state);
        s.pending.push_back(w);
        s.last_change = Some(Instant::now());
        self.cv.notify_all();
    }

    /// Waits until no configuration work is pending or running.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut s = lock(&self.state);
        while !s.pending.is_empty() || s.busy {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Holds the iport for a detach, as the framework's
    /// `ndi_devi_enter` of the iport does in illumos: enumeration (probe
    /// INQUIRY, REPORT LUNS) runs with the iport entered, so detach(9E) of
    /// the iport never runs while the framework's own probe commands are
    /// in flight. Waits for work under way to end. Undo with
    /// [`Self::release`].
    pub fn hold(&self) {
        let mut s = lock(&self.state);
        s.held = true;
        while s.busy {
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets configuration work run again after a refused detach.
    pub fn release(&self) {
        lock(&self.state).held = false;
        self.cv.notify_all();
    }

    /// The configured LUN devices.
    pub fn devices(&self) -> Vec<Arc<Device>> {
        let s = lock(&self.state);
        s.configured
            .values()
            .flat_map(|luns| luns.values().map(|l| l.device.clone()))
            .collect()
    }

    /// Runs a LUN rescan of `target` (as `scsi_hba_tgtmap_scan_luns`).
    pub fn scan_luns(&self, target: &str) {
        self.notify(Work::ScanLuns(target.to_string()));
    }

    fn worker(self: Arc<Self>) {
        let _g = set_current(&self.hba.machine);
        let mut s = lock(&self.state);
        loop {
            if s.closing {
                return;
            }
            let settled = s.last_change.is_none_or(|t| t.elapsed() >= SETTLE);
            if s.pending.is_empty() || !settled || s.held {
                let wait = if s.pending.is_empty() {
                    Duration::from_millis(100)
                } else {
                    SETTLE
                };
                s = self
                    .cv
                    .wait_timeout(s, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let Some(w) = s.pending.pop_front() else {
                continue;
            };
            s.busy = true;
            drop(s);
            match w {
                Work::Reconcile => self.reconcile(),
                Work::ScanLuns(t) => self.rescan_target(&t),
            }
            s = lock(&self.state);
            s.busy = false;
            self.cv.notify_all();
        }
    }

    fn reconcile(&self) {
        let (reported, configured): (BTreeSet<String>, BTreeSet<String>) = {
            let s = lock(&self.state);
            (s.reported.clone(), s.configured.keys().cloned().collect())
        };
        for gone in configured.difference(&reported) {
            let luns = lock(&self.state).configured.remove(gone);
            for (_, l) in luns.into_iter().flatten() {
                self.offline(l);
            }
        }
        for new in reported.difference(&configured) {
            let luns = self.enumerate(new);
            let mut online = BTreeMap::new();
            for lun in luns {
                if let Some(l) = self.online(new, lun) {
                    online.insert(lun, l);
                }
            }
            lock(&self.state).configured.insert(new.clone(), online);
        }
    }

    fn rescan_target(&self, target: &str) {
        if !lock(&self.state).configured.contains_key(target) {
            return;
        }
        let want: BTreeSet<u64> = self.enumerate(target).into_iter().collect();
        let have: BTreeSet<u64> = lock(&self.state)
            .configured
            .get(target)
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default();
        for gone in have.difference(&want) {
            let l = lock(&self.state)
                .configured
                .get_mut(target)
                .and_then(|m| m.remove(gone));
            if let Some(l) = l {
                self.offline(l);
            }
        }
        for new in want.difference(&have) {
            if let Some(l) = self.online(target, *new)
                && let Some(m) = lock(&self.state).configured.get_mut(target)
            {
                m.insert(*new, l);
            }
        }
    }

    /// A child node with its `scsi_device`, initialized by the HBA.
    fn make_child(&self, target: &str, lun64: u64, name: &str) -> Option<Arc<Device>> {
        let ua = CString::new(unit_address(target, lun64)).ok()?;
        let inst = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let dip = DevInfo::create(
            self.hba.machine.clone(),
            NodeKind::Child(ua),
            self.iport,
            inst,
            name,
        );
        let sd = device::alloc(dip, self.tran);
        let t = u32::from_str_radix(target, 16).unwrap_or(u32::MAX);
        let Some(dev) = Device::new(self.hba.clone(), self.tran, dip, sd, t, lun64) else {
            // SAFETY: just created, unused.
            unsafe {
                device::free(sd);
                DevInfo::destroy(dip);
            }
            return None;
        };
        // SAFETY: the iport's live tran.
        let init = unsafe { (*self.tran).tran_tgt_init };
        let rc = match init {
            // SAFETY: the HBA's entry point, as scsi_busctl_initchild calls it.
            Some(f) => unsafe { f(self.iport, dip, self.tran, sd) },
            None => ffi::DDI_SUCCESS,
        };
        if rc != ffi::DDI_SUCCESS {
            self.free_child(&dev, false);
            return None;
        }
        Some(dev)
    }

    fn free_child(&self, dev: &Arc<Device>, tgt_free: bool) {
        if tgt_free {
            // SAFETY: the iport's live tran.
            if let Some(f) = unsafe { (*self.tran).tran_tgt_free } {
                // SAFETY: the HBA's entry point for a device it initialized.
                unsafe { f(self.iport, dev.node, self.tran, dev.sd) };
            }
        }
        // SAFETY: the device is no longer used by anyone.
        unsafe {
            device::free(dev.sd);
            DevInfo::destroy(dev.node);
        }
    }

    fn inquiry(dev: &Arc<Device>) -> Option<Vec<u8>> {
        let data = Arc::new(DataBuf::new(96, 0, true));
        let mut p = dev
            .init_pkt(
                Some(data.clone()),
                InitArgs {
                    cmdlen: 6,
                    flags: ffi::PKT_CONSISTENT,
                    ..InitArgs::default()
                },
            )
            .ok()?;
        p.cdb_mut().copy_from_slice(&[0x12, 0, 0, 0, 96, 0]);
        p.set_time(10);
        let ok = p.poll() == 0;
        let r = p.result();
        p.destroy();
        (ok && r.reason == ffi::CMD_CMPLT)
            .then(|| data.bytes()[..96 - r.resid.clamp(0, 96) as usize].to_vec())
    }

    fn report_luns(dev: &Arc<Device>) -> Option<Vec<u64>> {
        const ALLOC: usize = 8 + 256 * 8;
        let data = Arc::new(DataBuf::new(ALLOC, 0, true));
        let mut p = dev
            .init_pkt(
                Some(data.clone()),
                InitArgs {
                    cmdlen: 12,
                    flags: ffi::PKT_CONSISTENT,
                    ..InitArgs::default()
                },
            )
            .ok()?;
        let mut cdb = [0u8; 12];
        cdb[0] = 0xa0;
        cdb[6..10].copy_from_slice(&(ALLOC as u32).to_be_bytes());
        p.cdb_mut().copy_from_slice(&cdb);
        p.set_time(3);
        let ok = p.poll() == 0;
        p.destroy();
        if !ok {
            return None;
        }
        let b = data.bytes();
        let list = u32::from_be_bytes(b[0..4].try_into().ok()?) as usize;
        let n = (list / 8).min((ALLOC - 8) / 8);
        Some(
            (0..n)
                .map(|i| lun_to_lun64(b[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0xff; 8])))
                .collect(),
        )
    }

    /// LUNs behind `target` (LUN 0 probe, INQUIRY, REPORT LUNS).
    fn enumerate(&self, target: &str) -> Vec<u64> {
        let Some(probe) = self.make_child(target, 0, "probe") else {
            return Vec::new();
        };
        let inq = Self::inquiry(&probe);
        let lun0 = inq
            .as_ref()
            .is_some_and(|d| !d.is_empty() && d[0] >> 5 == 0);
        let luns =
            Self::report_luns(&probe).unwrap_or_else(|| if lun0 { vec![0] } else { Vec::new() });
        self.free_child(&probe, true);
        luns
    }

    fn online(&self, target: &str, lun64: u64) -> Option<Lun> {
        let dev = self.make_child(target, lun64, "disk")?;
        let inq = Self::inquiry(&dev);
        let present = inq
            .as_ref()
            .is_some_and(|d| !d.is_empty() && d[0] >> 5 == 0);
        if !present {
            self.free_child(&dev, true);
            return None;
        }
        let instance = match self
            .driver
            .attach(dev.clone(), inq.as_deref().unwrap_or(&[]))
        {
            Ok(i) => Some(i),
            Err(e) => {
                dev.machine.log_line(
                    ffi::CE_WARN,
                    &format!("target driver did not attach to {target},{lun64:x}: {e}"),
                );
                None
            }
        };
        Some(Lun {
            device: dev,
            instance,
        })
    }

    fn offline(&self, l: Lun) {
        if let Some(i) = l.instance {
            i.detach();
        }
        self.free_child(&l.device, true);
    }

    /// Takes every LUN offline and stops the map.
    pub fn shutdown(&self) {
        {
            let mut s = lock(&self.state);
            s.closing = true;
            self.cv.notify_all();
        }
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
        let all: Vec<Lun> = {
            let mut s = lock(&self.state);
            std::mem::take(&mut s.configured)
                .into_values()
                .flat_map(|m| m.into_values())
                .collect()
        };
        for l in all {
            self.offline(l);
        }
    }
}

/// `scsi_hba_tgtmap_create(9F)`
///
/// # Safety
/// `handlep` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_tgtmap_create(
    iport: *mut dev_info_t,
    mode: c_int,
    csync_usec: c_int,
    settle_usec: c_int,
    _priv: *mut c_void,
    _acb: Option<unsafe extern "C" fn()>,
    _dcb: Option<unsafe extern "C" fn()>,
    handlep: *mut *mut scsi_hba_tgtmap_t,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(iport, "scsi_hba_tgtmap_create") else {
        return ffi::DDI_FAILURE;
    };
    if !matches!(n.kind, NodeKind::Iport(_)) {
        violation("scsi_hba_tgtmap_create on a node that is not an iport");
        return ffi::DDI_FAILURE;
    }
    if csync_usec <= 0
        || settle_usec <= 0
        || handlep.is_null()
        || (mode != ffi::SCSI_TM_FULLSET && mode != ffi::SCSI_TM_PERADDR)
    {
        violation("scsi_hba_tgtmap_create: bad arguments");
        return ffi::DDI_FAILURE;
    }
    let Some(hba) = hba_state(n.parent) else {
        violation("scsi_hba_tgtmap_create: the iport's HBA is not set up");
        return ffi::DDI_FAILURE;
    };
    let tran = n
        .driver_private
        .load(Ordering::Acquire)
        .cast::<scsi_hba_tran>();
    let Some(driver) = lock(&TARGET_DRIVERS)
        .get_or_insert_with(HashMap::new)
        .get(&(n.parent as usize))
        .cloned()
    else {
        violation("scsi_hba_tgtmap_create: no target driver configured for this HBA");
        return ffi::DDI_FAILURE;
    };
    let map = Arc::new(TgtMap {
        hba,
        iport,
        tran,
        driver,
        state: Mutex::new(MapState::default()),
        cv: Condvar::new(),
        worker: Mutex::new(None),
    });
    let m2 = map.clone();
    let h = std::thread::Builder::new()
        .name("emu-tgtmap".into())
        .spawn(move || m2.worker())
        .expect("a target map thread");
    *lock(&map.worker) = Some(h);
    let key = Arc::as_ptr(&map) as usize;
    lock(&MAPS)
        .get_or_insert_with(HashMap::new)
        .insert(key, map);
    // SAFETY: checked non-null.
    unsafe { *handlep = key as *mut scsi_hba_tgtmap_t };
    ffi::DDI_SUCCESS
}

/// `scsi_hba_tgtmap_destroy(9F)`: every LUN goes offline.
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_tgtmap_destroy(h: *mut scsi_hba_tgtmap_t) {
    let _kernel = crate::meter::kernel();
    let Some(map) = lock(&MAPS)
        .get_or_insert_with(HashMap::new)
        .remove(&(h as usize))
    else {
        violation("scsi_hba_tgtmap_destroy of an unknown map");
        return;
    };
    map.shutdown();
}

/// `scsi_hba_tgtmap_set_begin(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_tgtmap_set_begin(h: *mut scsi_hba_tgtmap_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(m) = map_of(h, "scsi_hba_tgtmap_set_begin") else {
        return ffi::DDI_FAILURE;
    };
    lock(&m.state).observing = Some(BTreeSet::new());
    ffi::DDI_SUCCESS
}

/// `scsi_hba_tgtmap_set_add(9F)`
///
/// # Safety
/// `addr` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_tgtmap_set_add(
    h: *mut scsi_hba_tgtmap_t,
    typ: c_int,
    addr: *mut c_char,
    _priv: *mut c_void,
) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(m) = map_of(h, "scsi_hba_tgtmap_set_add") else {
        return ffi::DDI_FAILURE;
    };
    if typ != ffi::SCSI_TGT_SCSI_DEVICE || addr.is_null() {
        violation("scsi_hba_tgtmap_set_add: bad type or address");
        return ffi::DDI_FAILURE;
    }
    // SAFETY: NUL-terminated (caller).
    let a = unsafe { CStr::from_ptr(addr) }
        .to_string_lossy()
        .into_owned();
    let mut s = lock(&m.state);
    match s.observing.as_mut() {
        Some(o) => {
            o.insert(a);
            ffi::DDI_SUCCESS
        }
        None => {
            violation("scsi_hba_tgtmap_set_add outside set_begin/set_end");
            ffi::DDI_FAILURE
        }
    }
}

/// `scsi_hba_tgtmap_set_end(9F)`: the observed set becomes the truth.
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_tgtmap_set_end(h: *mut scsi_hba_tgtmap_t, _flags: c_uint) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(m) = map_of(h, "scsi_hba_tgtmap_set_end") else {
        return ffi::DDI_FAILURE;
    };
    let set = lock(&m.state).observing.take();
    let Some(set) = set else {
        violation("scsi_hba_tgtmap_set_end without set_begin");
        return ffi::DDI_FAILURE;
    };
    lock(&m.state).reported = set;
    m.notify(Work::Reconcile);
    ffi::DDI_SUCCESS
}

/// `scsi_hba_tgtmap_set_flush(9F)`: the observation is dropped.
#[unsafe(no_mangle)]
pub extern "C" fn scsi_hba_tgtmap_set_flush(h: *mut scsi_hba_tgtmap_t) -> c_int {
    let _kernel = crate::meter::kernel();
    let Some(m) = map_of(h, "scsi_hba_tgtmap_set_flush") else {
        return ffi::DDI_FAILURE;
    };
    lock(&m.state).observing = None;
    ffi::DDI_SUCCESS
}

/// `scsi_hba_tgtmap_scan_luns(9F)`
///
/// # Safety
/// `addr` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_hba_tgtmap_scan_luns(h: *mut scsi_hba_tgtmap_t, addr: *mut c_char) {
    let _kernel = crate::meter::kernel();
    let Some(m) = map_of(h, "scsi_hba_tgtmap_scan_luns") else {
        return;
    };
    if addr.is_null() {
        return;
    }
    // SAFETY: NUL-terminated (caller).
    let a = unsafe { CStr::from_ptr(addr) }
        .to_string_lossy()
        .into_owned();
    m.scan_luns(&a);
}
