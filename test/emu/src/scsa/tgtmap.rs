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
use crate::ddi::devinfo::{DevInfo, NodeKind, Prop, node};
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
///
/// When a target map drops a LUN, the framework does not simply free it:
/// `scsi_lunmap_unconfig` -> `scsi_hba_bus_unconfigone_addr` ->
/// `scsi_device_unconfig` (`scsi_hba.c`) calls
/// `ndi_devi_offline(child, NDI_DEVFS_CLEAN | NDI_DEVI_REMOVE)`. That
/// fails while the child is open (`detach_node` in `devcfg.c` refuses a
/// node with `devi_ref` held) or while its target driver refuses
/// detach(9E) (`sd_unit_detach`: commands in the driver or in transport,
/// layered opens). The framework then only marks the child removed
/// (`ndi_devi_device_remove`, `devcfg.c`: the node is hidden, flagged
/// `DEVI_DEVICE_REMOVED`, and the `LDI_EV_DEVICE_REMOVE` finalize callbacks
/// and a sysevent tell its consumers) and keeps it, `scsi_device` and all.
/// `tran_tgt_free` runs only when the child is really taken down: after a
/// successful detach(9E), `devi_detach_node` -> `ddi_uninitchild` ->
/// `scsi_busctl_uninitchild`.
pub trait TargetInstance: Send + Sync {
    /// detach(9E) of a target driver that never refuses it.
    fn detach(&self);
    /// detach(9E) as the framework's offline calls it: `Err(why)` where
    /// the driver (or the framework, for an open device) refuses, and the
    /// instance stays attached. By default the driver never refuses.
    fn try_detach(&self) -> Result<(), String> {
        self.detach();
        Ok(())
    }
    /// The framework declared the device removed (`ndi_devi_device_remove`
    /// after a failed offline); the instance stays attached.
    fn device_removed(&self) {}
    /// A removed device answered a later probe at its address again
    /// (`scsi_device_config`: reprobe, then `ndi_devi_device_insert`).
    fn device_inserted(&self) {}
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
    /// The version field of its INQUIRY data (`sd_inq->inq_ansi`).
    inquiry_version: u8,
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
    /// Children configured by name (`config_one`) under a unit address
    /// other than the one enumeration gave their LUN.
    by_name: Vec<Lun>,
    /// Children the map dropped whose offline failed: marked removed
    /// (`DEVI_DEVICE_REMOVED`, hidden) and kept until a later unconfigure
    /// takes them down or a probe finds the device back. No map callback
    /// retries them: `scsi_lunmap_unconfig` returns `DAM_SUCCESS` whatever
    /// `scsi_device_unconfig` managed, and the lunmap has no
    /// activate/deactivate callbacks (`scsi_lunmap_create` passes NULL).
    removed: Vec<Lun>,
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
// SAFETY: the map's state is under its lock and the iport and tran
// pointers are only read, and what they name outlives the map.
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

/// The target map whose children include `dev` (the map of its iport).
pub fn map_of_device(dev: &Device) -> Option<Arc<TgtMap>> {
    lock(&MAPS)
        .get_or_insert_with(HashMap::new)
        .values()
        .find(|m| m.tran == dev.tran)
        .cloned()
}

/// The target map of iport `iport`, if it has one.
pub fn map_of_iport(iport: *mut dev_info_t) -> Option<Arc<TgtMap>> {
    lock(&MAPS)
        .get_or_insert_with(HashMap::new)
        .values()
        .find(|m| m.iport == iport)
        .cloned()
}

/// Formats a unit address the way the framework names LUN children
/// (`scsi_hba.c`, `scsi_lunmap_set_add`: `"%s,%" PRIx64` of the target
/// address and the `lun64`).
pub fn unit_address(target: &str, lun64: u64) -> String {
    format!("{target},{lun64:x}")
}

/// `scsi_lun_to_lun64` (`usr/src/common/devid/devid_scsi.c`): a
/// single-level LUN in the peripheral device addressing method keeps the
/// SCSI-2 compatible form (the bus identifier bits above the LUN byte, as
/// illumos tolerates a non-zero one); anything else, the flat space
/// method included, is the whole 8-byte LUN as a big-endian number (flat
/// LUN 256, `41 00 00 ..`, is `0x4100000000000000`).
pub fn lun_to_lun64(l: [u8; 8]) -> u64 {
    if l[2..].iter().all(|&b| b == 0) && l[0] & 0xc0 == 0 {
        (u64::from(l[0] & 0x3f) << 8) | u64::from(l[1])
    } else {
        u64::from_be_bytes(l)
    }
}

/// `SCSI_32LUNS_PER_TARGET` (`sys/scsi/scsi_params.h`): the `lun`
/// property exists only below it.
const SCSI_32LUNS_PER_TARGET: u64 = 32;

/// `SCSI_LUN64_ILLEGAL` (`sys/scsi/scsi_address.h`).
const SCSI_LUN64_ILLEGAL: u64 = u64::MAX;

/// `scsi_addr_to_lun64` (`scsi_hba.c`) of the LUN part `lun` (what
/// follows the first ','): up to 16 hex digits of either case; a stop at
/// anything but the end or a ',' (the sfunc), or a 17th digit, is
/// `SCSI_LUN64_ILLEGAL`. No digit at all is LUN 0.
pub fn addr_to_lun64(lun: &str) -> u64 {
    let digits = lun
        .bytes()
        .take(16)
        .take_while(u8::is_ascii_hexdigit)
        .count();
    let value = lun.as_bytes()[..digits].iter().fold(0u64, |v, &c| {
        (v << 4) | u64::from((c as char).to_digit(16).unwrap_or(0))
    });
    match lun.as_bytes().get(digits) {
        None | Some(b',') => value,
        Some(_) => SCSI_LUN64_ILLEGAL,
    }
}

/// `scsi_hba_ua_set` (`scsi_hba.c`) for a devinfo child: the addressing
/// properties the framework decorates a node with from its unit address
/// `"tgt,lun[,sfunc]"` before `tran_tgt_init` runs (`scsi_device_config`
/// decorates, `scsi_busctl_initchild` then calls the HBA):
/// - `target` (int), only if the target part is lowercase hex and its
///   `int` accumulator stays non-negative (else the framework treats it
///   as a port name: `tgt = -1`, no `target`);
/// - `target-port` (string), the target part as written;
/// - `lun` (int), only for a `lun64` below 32;
/// - `lun64` (int64), always;
/// - `sfunc` (int), when there is one.
///
/// `None` where `scsi_hba_ua_set` returns 0 (a LUN or sfunc digit that is
/// not lowercase hex): the framework then removes the node.
pub fn ua_properties(ua: &str) -> Option<Vec<(&'static str, Prop)>> {
    fn lower_hex(s: &str) -> Option<u64> {
        s.bytes().try_fold(0u64, |acc, c| {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return None,
            };
            // The framework's accumulator wraps; so does this one.
            Some(acc.wrapping_shl(4) | u64::from(d))
        })
    }
    let mut parts = ua.splitn(3, ',');
    let tgt_port = parts.next().unwrap_or("");
    let lun64 = lower_hex(parts.next().unwrap_or(""))?;
    let sfunc = match parts.next() {
        Some(s) => Some(lower_hex(s)? as i32),
        None => None,
    };
    let mut props = Vec::new();
    // `int tgt = (tgt << 4) + digit`, checked after each digit: a
    // non-hex digit, or a value gone negative (8 digits from 0x8), makes
    // it -1 and ends the scan (the shift wraps, as the kernel's compiles).
    let tgt = tgt_port.bytes().try_fold(0i32, |acc, c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        let next = acc.wrapping_shl(4).wrapping_add(i32::from(d));
        (next >= 0).then_some(next)
    });
    if let Some(t) = tgt {
        props.push(("target", Prop::Int(t)));
    }
    props.push(("target-port", Prop::Str(tgt_port.to_string())));
    if lun64 < SCSI_32LUNS_PER_TARGET {
        props.push(("lun", Prop::Int(lun64 as i32)));
    }
    props.push(("lun64", Prop::Int64(lun64 as i64)));
    if let Some(f) = sfunc {
        props.push(("sfunc", Prop::Int(f)));
    }
    Some(props)
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
        drop(self.until_not_busy(s));
    }

    /// Waits, on `s`, until no configuration work runs (the worker and
    /// the direct callers notify `cv` when they end theirs).
    fn until_not_busy<'a>(
        &'a self,
        mut s: std::sync::MutexGuard<'a, MapState>,
    ) -> std::sync::MutexGuard<'a, MapState> {
        while s.busy {
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s
    }

    /// Waits for configuration work under way to end, then marks the
    /// caller's own as under way (clear `busy` and notify `cv` after).
    fn claim_configuration(&self) {
        let mut s = self.until_not_busy(lock(&self.state));
        s.busy = true;
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

    /// Children kept after a failed offline, marked removed (hidden from
    /// [`Self::devices`], as `ndi_devi_set_hidden` hides them from lookups).
    pub fn removed_devices(&self) -> Vec<Arc<Device>> {
        lock(&self.state)
            .removed
            .iter()
            .map(|l| l.device.clone())
            .collect()
    }

    /// `BUS_UNCONFIG_ALL` of the iport for the children kept removed
    /// (what `cfgadm -c unconfigure`, `devfsadm -C` or the iport's own
    /// offline ask of `scsi_hba_bus_unconfig_tgtmap` ->
    /// `ndi_busop_bus_unconfig`): each is offlined again, and freed
    /// (`tran_tgt_free`) if its target driver now detaches. Returns how
    /// many are still kept.
    pub fn unconfig_removed(&self) -> usize {
        let _g = set_current(&self.hba.machine);
        self.claim_configuration();
        let kept = std::mem::take(&mut lock(&self.state).removed);
        let mut still = Vec::new();
        for l in kept {
            if let Err((l, _)) = self.offline(l) {
                still.push(l);
            }
        }
        let mut s = lock(&self.state);
        let n = still.len();
        s.removed.extend(still);
        s.busy = false;
        self.cv.notify_all();
        n
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
                self.unconfig(l);
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
                self.unconfig(l);
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
        self.make_child_at(&unit_address(target, lun64), target, lun64, name)
    }

    /// A child node at unit address `ua` (naming `target`, `lun64`),
    /// decorated as `scsi_hba_ua_set` does, then initialized by the HBA.
    fn make_child_at(
        &self,
        ua_str: &str,
        target: &str,
        lun64: u64,
        name: &str,
    ) -> Option<Arc<Device>> {
        let props = ua_properties(ua_str)?;
        let ua = CString::new(ua_str).ok()?;
        let inst = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let dip = DevInfo::create(
            self.hba.machine.clone(),
            NodeKind::Child(ua),
            self.iport,
            inst,
            name,
        );
        if let Some(n) = node(dip, "make_child") {
            for (k, v) in props {
                n.set_prop(k, v);
            }
        }
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

    /// `scsi_device_reportluns` (`scsi_hba.c`): REPORT LUNS with room for
    /// `scsi_lunrpt_default_max` (256) LUNs, once more with room for all
    /// of them if the target has more; a list length of zero is a broken
    /// target (`DDI_NOT_WELL_FORMED`). Each LUN becomes its `lun64`.
    fn report_luns(dev: &Arc<Device>) -> Option<Vec<u64>> {
        const DEFAULT_MAX: usize = 256;
        let mut room = DEFAULT_MAX;
        loop {
            // sizeof (struct scsi_lunrpt) + (nluns - 1) * sizeof (scsi_lun)
            let alloc = 16 + (room - 1) * 8;
            let data = Arc::new(DataBuf::new(alloc, 0, true));
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
            cdb[6..10].copy_from_slice(&(alloc as u32).to_be_bytes());
            p.cdb_mut().copy_from_slice(&cdb);
            p.set_time(3);
            let ok = p.poll() == 0;
            p.destroy();
            if !ok {
                return None;
            }
            let b = data.bytes();
            let total = u32::from_be_bytes(b[0..4].try_into().ok()?) as usize / 8;
            if total == 0 {
                return None;
            }
            if total > room && room == DEFAULT_MAX {
                // The framework allocates what the target says
                // (`scsi_device_reportluns`: `scsi_alloc_consistent_buf`
                // of 16 + (tluns - 1) * 8 bytes, SLEEP_FUNC) and has no
                // limit of its own. This bound is the test bed's, not
                // illumos': past a million LUNs (8 MiB of list) the bed
                // gives up as if the allocation had failed (NDI_NOMEM)
                // rather than allocate up to 4 GiB.
                const BED_MAX_LUNS: usize = 1 << 20;
                if total > BED_MAX_LUNS {
                    return None;
                }
                room = total;
                continue;
            }
            let n = total.min(room);
            return Some(
                (0..n)
                    .map(|i| lun_to_lun64(b[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0xff; 8])))
                    .collect(),
            );
        }
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
        self.online_at(&unit_address(target, lun64), target, lun64)
    }

    fn online_at(&self, ua: &str, target: &str, lun64: u64) -> Option<Lun> {
        if let Some(found) = self.reinsert(ua) {
            return found;
        }
        let dev = self.make_child_at(ua, target, lun64, "disk")?;
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
        let inquiry_version = inq.as_ref().and_then(|d| d.get(2)).map_or(0, |v| v & 0x07);
        Some(Lun {
            device: dev,
            instance,
            inquiry_version,
        })
    }

    /// `scsi_device_config` finding a removed child at `ua`
    /// (`scsi_findchild` finds it by name@addr; `ndi_devi_device_isremoved`
    /// makes the framework reprobe it): if the device answers, the same
    /// node comes back (`ndi_devi_device_insert`), with no new
    /// `tran_tgt_init`; if not, it stays removed and nothing is configured.
    /// `None`: no removed child there.
    fn reinsert(&self, ua: &str) -> Option<Option<Lun>> {
        let at_ua = |l: &Lun| {
            node(l.device.node, "scsi_device_config")
                .and_then(|n| n.unit_address())
                .is_some_and(|u| u.to_bytes() == ua.as_bytes())
        };
        let dev = {
            let s = lock(&self.state);
            s.removed.iter().find(|l| at_ua(l))?.device.clone()
        };
        let present = Self::inquiry(&dev).is_some_and(|d| !d.is_empty() && d[0] >> 5 == 0);
        if !present {
            return Some(None);
        }
        let mut s = lock(&self.state);
        let i = s
            .removed
            .iter()
            .position(|l| Arc::ptr_eq(&l.device, &dev))?;
        let l = s.removed.remove(i);
        drop(s);
        if let Some(inst) = &l.instance {
            inst.device_inserted();
        }
        Some(Some(l))
    }

    /// `scsi_device_unconfig` (`scsi_hba.c`) of a child the map dropped:
    /// offline it, or, if that fails, mark it removed and keep it.
    fn unconfig(&self, l: Lun) {
        let Err((l, why)) = self.offline(l) else {
            return;
        };
        let ua = node(l.device.node, "scsi_device_unconfig")
            .and_then(|n| n.unit_address())
            .map(|u| u.to_string_lossy().into_owned())
            .unwrap_or_default();
        // i_ndi_devi_report_status_change: "?<path> (<driver><inst>) removed".
        self.hba.machine.log_line(
            ffi::CE_CONT,
            &format!("?disk@{ua} removed (offline failed: {why})"),
        );
        if let Some(i) = &l.instance {
            i.device_removed();
        }
        lock(&self.state).removed.push(l);
    }

    /// `ndi_devi_offline(child, NDI_DEVFS_CLEAN | NDI_DEVI_REMOVE)`:
    /// detach(9E) of the target driver, then (only then) `tran_tgt_free`
    /// and the node's removal. A refused detach leaves everything as it
    /// was and hands the child back.
    fn offline(&self, l: Lun) -> Result<(), (Lun, String)> {
        if let Some(i) = &l.instance
            && let Err(why) = i.try_detach()
        {
            return Err((l, why));
        }
        self.free_child(&l.device, true);
        Ok(())
    }

    /// `BUS_CONFIG_ONE` of `disk@<addr>` (`scsi_hba.c`,
    /// `scsi_hba_bus_configone`): what opening a `/devices` path by name
    /// (or a boot path) does. A child already named `addr` is found
    /// (`scsi_device_config`'s fast path, `scsi_findchild`, by string).
    /// Otherwise the LUN part is read as `scsi_addr_to_lun64` reads it;
    /// for a LUN other than 0 (and not `SCSI_LUN64_ILLEGAL`) the framework
    /// first configures the target's `",0"` itself, refuses the LUN if
    /// that fails, and filters LUNs below 32 at or past
    /// `scsi_get_scsi_maxluns` of LUN 0. The child then gets `addr` as
    /// written (no `,lun` part: none, `scsi_hba_ua_set` reads LUN 0), is
    /// decorated, initialized by the HBA (`tran_tgt_init`), probed and
    /// handed to the target driver like an enumerated LUN. Returns whether
    /// the LUN is configured.
    ///
    /// Not modelled: the framework's fallback to the generic
    /// `ndi_busop_bus_config` when this fails, and `scsi-options`
    /// properties (maxluns is the default, from LUN 0's INQUIRY version).
    pub fn config_one(&self, addr: &str) -> bool {
        let _g = set_current(&self.hba.machine);
        self.claim_configuration();
        let done = self.config_one_now(addr);
        lock(&self.state).busy = false;
        self.cv.notify_all();
        done
    }

    fn config_one_now(&self, addr: &str) -> bool {
        if self.configured_named(addr).is_some() {
            return true;
        }
        let Some((target, lun)) = addr.split_once(',') else {
            // No ",lun": scsi_device_config with the address as written.
            return self.config_named(addr, addr, 0);
        };
        let lun64 = addr_to_lun64(lun);
        if lun64 != 0 && lun64 != SCSI_LUN64_ILLEGAL {
            // ",0" first: the target's LUN 0 is configured (or found),
            // or the LUN is not.
            let lun0 = format!("{target},0");
            if self.configured_named(&lun0).is_none() && !self.config_named(&lun0, target, 0) {
                return false; // "no lun 0 or filtered lun"
            }
            if lun64 < SCSI_32LUNS_PER_TARGET && lun64 >= self.maxluns_of(&lun0) {
                return false; // "filtered"
            }
        }
        self.config_named(addr, target, lun64)
    }

    /// The INQUIRY version of the configured child named `addr`, if there
    /// is one (`scsi_findchild` compares unit addresses as strings: "0,00"
    /// is not "0,0").
    fn configured_named(&self, addr: &str) -> Option<u8> {
        let s = lock(&self.state);
        s.configured
            .values()
            .flat_map(|m| m.values())
            .chain(s.by_name.iter())
            .find(|l| {
                node(l.device.node, "config_one")
                    .and_then(|n| n.unit_address())
                    .is_some_and(|u| u.to_bytes() == addr.as_bytes())
            })
            .map(|l| l.inquiry_version)
    }

    /// `scsi_get_scsi_maxluns` of the configured child `addr`, with the
    /// default `scsi-options` (`scsi_subr.c`): 8 for a target below SCSI-3
    /// (INQUIRY version < 3), else 16.
    fn maxluns_of(&self, addr: &str) -> u64 {
        if self.configured_named(addr).unwrap_or(0) < 3 {
            8
        } else {
            16
        }
    }

    /// Configures the child at unit address `addr` (naming `target`,
    /// `lun64`) and records it.
    fn config_named(&self, addr: &str, target: &str, lun64: u64) -> bool {
        let Some(l) = self.online_at(addr, target, lun64) else {
            return false;
        };
        let mut s = lock(&self.state);
        let luns = s.configured.entry(target.to_string()).or_default();
        if let std::collections::btree_map::Entry::Vacant(e) = luns.entry(lun64) {
            e.insert(l);
        } else {
            // A second name for a configured LUN that the HBA accepted:
            // the framework keeps both nodes.
            s.by_name.push(l);
        }
        true
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
            let by_name = std::mem::take(&mut s.by_name);
            let removed = std::mem::take(&mut s.removed);
            std::mem::take(&mut s.configured)
                .into_values()
                .flat_map(|m| m.into_values())
                .chain(by_name)
                .chain(removed)
                .collect()
        };
        let mut held = 0;
        for l in all {
            if let Err((l, why)) = self.offline(l) {
                held += 1;
                // illumos unconfigures an iport's children before its
                // detach(9E) (devi_unconfig_branch) and refuses the iport's
                // offline while one stays attached; here the map is going
                // with a child its target driver still holds. That is
                // reported, and the child left allocated rather than freed
                // under its user.
                let ua = node(l.device.node, "scsi_hba_tgtmap_destroy")
                    .and_then(|n| n.unit_address())
                    .map(|u| u.to_string_lossy().into_owned())
                    .unwrap_or_default();
                violation(format!(
                    "scsi_hba_tgtmap_destroy: child @{ua} is still held by its target \
                     driver ({why}); illumos would not have let the iport detach"
                ));
                std::mem::forget(l);
            }
        }
        // Every child the map made is gone now (or was reported above): a
        // scsi_device left behind is a child this map lost track of, whose
        // tran_tgt_free never ran.
        let left = device::live_under(self.tran);
        if left > held {
            violation(format!(
                "scsi_hba_tgtmap_destroy: {} children left without tran_tgt_free",
                left - held
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luns_are_named_and_decorated_as_scsi_hba_c_does() {
        // QEMU's REPORT LUNS entries (scsi-bus.c store_lun) for 0, 255,
        // 256, 16383, and what illumos makes of them.
        let reported = [
            ([0u8, 0, 0, 0, 0, 0, 0, 0], 0u64),
            ([0, 0xff, 0, 0, 0, 0, 0, 0], 0xff),
            ([0x41, 0, 0, 0, 0, 0, 0, 0], 0x4100_0000_0000_0000),
            ([0x7f, 0xff, 0, 0, 0, 0, 0, 0], 0x7fff_0000_0000_0000),
            // A peripheral LUN with a bus identifier: folded in.
            ([0x01, 0x02, 0, 0, 0, 0, 0, 0], 0x102),
            // Two levels: the whole LUN.
            ([0, 1, 0, 2, 0, 0, 0, 0], 0x0001_0002_0000_0000),
        ];
        for (lun, lun64) in reported {
            assert_eq!(lun_to_lun64(lun), lun64, "{lun:02x?}");
        }
        assert_eq!(
            unit_address("3", 0x4100_0000_0000_0000),
            "3,4100000000000000"
        );
        assert_eq!(
            ua_properties("3,4100000000000000").unwrap(),
            vec![
                ("target", Prop::Int(3)),
                ("target-port", Prop::Str("3".into())),
                ("lun64", Prop::Int64(0x4100_0000_0000_0000)),
            ]
        );
        assert_eq!(
            ua_properties("1f,1f").unwrap(),
            vec![
                ("target", Prop::Int(31)),
                ("target-port", Prop::Str("1f".into())),
                ("lun", Prop::Int(31)),
                ("lun64", Prop::Int64(31)),
            ]
        );
        assert!(
            !ua_properties("0,20")
                .unwrap()
                .iter()
                .any(|(k, _)| *k == "lun"),
            "no `lun` from 32 up"
        );
        // A target part that is not lowercase hex is a port name only.
        assert_eq!(
            ua_properties("w5000c500,0").unwrap()[..2],
            [
                ("target-port", Prop::Str("w5000c500".into())),
                ("lun", Prop::Int(0))
            ]
        );
        assert_eq!(ua_properties("0,A"), None, "scsi_hba_ua_set refuses it");
        // The `int tgt` accumulator: -1, and no `target`, once it goes
        // negative (or at a non-hex digit); it wraps past 8 digits.
        let target_of = |ua: &str| {
            ua_properties(ua)
                .unwrap()
                .into_iter()
                .find(|(k, _)| *k == "target")
                .map(|(_, v)| v)
        };
        assert_eq!(target_of("7fffffff,0"), Some(Prop::Int(0x7fff_ffff)));
        assert_eq!(target_of("80000000,0"), None);
        assert_eq!(target_of("ffffffff0,0"), None);
        assert_eq!(target_of("100000000,0"), Some(Prop::Int(0)));
        assert_eq!(
            ua_properties("80000000,0").unwrap()[0],
            ("target-port", Prop::Str("80000000".into()))
        );
        assert_eq!(
            ua_properties("0,1,2").unwrap().last(),
            Some(&("sfunc", Prop::Int(2)))
        );
    }

    #[test]
    fn lun_parts_are_read_as_scsi_addr_to_lun64_reads_them() {
        assert_eq!(addr_to_lun64("0"), 0);
        assert_eq!(addr_to_lun64("00"), 0);
        assert_eq!(addr_to_lun64(""), 0, "no digit: LUN 0");
        assert_eq!(addr_to_lun64("0A"), 0xa, "either case");
        assert_eq!(addr_to_lun64("4100000000000000"), 0x4100_0000_0000_0000);
        assert_eq!(addr_to_lun64("1,2"), 1, "an sfunc follows");
        assert_eq!(addr_to_lun64("1x"), SCSI_LUN64_ILLEGAL);
        assert_eq!(addr_to_lun64("+1"), SCSI_LUN64_ILLEGAL);
        assert_eq!(addr_to_lun64("11111111111111111"), SCSI_LUN64_ILLEGAL);
    }
}
