//! A hostile device on top of QEMU's. Every register access and every DMA
//! copy between the driver and QEMU passes through the test bed, so it can
//! make the device misbehave in ways QEMU never does — the way a buggy or
//! malicious hypervisor could: completions that never arrive, arrive twice
//! or name descriptors that were never made available, responses with
//! impossible sense lengths or residuals, task management refused, garbage
//! events, event buffers that the device never gets, impossible device
//! configuration values.
//!
//! It knows the virtio-pci register layout (virtio 1.2 §4.1.4 for the
//! modern interface, §4.1.5.1 and the legacy layout), follows where the
//! driver puts each queue's rings (virtio 1.2 §2.7), and from then on can
//! rewrite the driver's view of a used ring (§2.7.8) and the buffers a
//! completion names, or keep the device from seeing new event buffers.
//! Queue roles are virtio-scsi's (§5.6.2): 0 control, 1 event, 2.. requests.
//!
//! Faults are armed by a test ([`Faults::arm`]); until then the layer only
//! watches register writes and changes nothing.
//!
//! On a pvscsi machine every hook goes to [`pvscsi::PvFaults`] instead,
//! which knows that device's rings (see there).

pub mod pvscsi;

use crate::machine::lock;
use rvscsi_qtest::Bus;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the virtio-pci structures are (from the PCI capabilities), as
/// absolute addresses (memory) and ports (I/O).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioLayout {
    /// Modern common configuration.
    pub common: Option<u64>,
    /// Modern notification area and notify_off_multiplier.
    pub notify: Option<(u64, u32)>,
    /// Modern device configuration.
    pub device: Option<u64>,
    /// The legacy I/O header of a transitional device (first port).
    pub legacy: Option<u16>,
    /// The modern ISR status register (virtio 1.2 §4.1.4.5).
    pub isr: Option<u64>,
}

impl VirtioLayout {
    /// Whether `r` is an interrupt status register: the modern one, or the
    /// legacy header's at offset 19 (virtio 1.2 §4.1.4.8).
    pub fn is_isr(&self, r: Reg) -> bool {
        match r {
            Reg::Mem(a) => self.isr == Some(a),
            Reg::Io(p) => self.legacy.is_some_and(|l| p == l + 19),
        }
    }
}

/// Where a register access went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// A memory-mapped register at this address.
    Mem(u64),
    /// An I/O port.
    Io(u16),
}

/// Which requests a fault applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Any request.
    Any,
    /// Requests whose CDB starts with these bytes.
    CdbPrefix(Vec<u8>),
    /// READ/WRITE(10) or (16) whose LBA is this one.
    Lba(u64),
}

impl Match {
    fn matches(&self, cdb: &[u8]) -> bool {
        match self {
            Match::Any => true,
            Match::CdbPrefix(p) => cdb.starts_with(p),
            Match::Lba(lba) => cdb_lba(cdb) == Some(*lba),
        }
    }
}

/// The LBA of a READ/WRITE(10)/(16) CDB.
pub fn cdb_lba(cdb: &[u8]) -> Option<u64> {
    match cdb.first()? {
        0x28 | 0x2a if cdb.len() >= 10 => Some(u64::from(u32::from_be_bytes([
            cdb[2], cdb[3], cdb[4], cdb[5],
        ]))),
        0x88 | 0x8a if cdb.len() >= 16 => Some(u64::from_be_bytes([
            cdb[2], cdb[3], cdb[4], cdb[5], cdb[6], cdb[7], cdb[8], cdb[9],
        ])),
        _ => None,
    }
}

/// A way for the device to misbehave. Each is used once unless said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The device completes a matching request, but the driver never sees
    /// the completion (until [`Faults::release_withheld`] or a device
    /// reset): a command that never comes back.
    Withhold(Match),
    /// A matching request's completion is delivered twice.
    Duplicate(Match),
    /// Before a matching request's completion, a used entry naming
    /// descriptor `id` (out of range, or not outstanding) is delivered.
    BogusUsedId(u32),
    /// A matching completion reports this used length.
    UsedLen(Match, u32),
    /// With a matching completion, the used index the driver sees jumps
    /// this many entries further (more than the ring: an index no device
    /// can write legitimately, virtio 1.2 §2.7.8), until the device reset.
    UsedIdxRunaway(Match, u16),
    /// The response header of a matching request is overwritten at these
    /// offsets (virtio 1.2 §5.6.6: sense_len 0, resid 4, status_qualifier
    /// 8, status 10, response 11, sense 12).
    Response(Match, Vec<(usize, Vec<u8>)>),
    /// The next task management request is answered with this response
    /// code (virtio 1.2 §5.6.6.2), `count` times.
    TmfResponse { response: u8, count: usize },
    /// The next event is garbage.
    GarbageEvent,
    /// Device configuration field at this offset reads as this value
    /// (modern interface; virtio 1.2 §5.6.4), until cleared.
    Config { offset: u64, value: u32 },
    /// Queue sizes read as this value (modern interface), until cleared.
    QueueSize(u16),
    /// The device fails once it runs: while DRIVER_OK is set, the device
    /// status reads DEVICE_NEEDS_RESET too (virtio 1.2 §2.1.2; modern
    /// interface), until the first device reset after it was seen.
    NeedsReset,
    /// The device never finishes a reset (modern interface): once the
    /// driver writes status 0, the status reads ACKNOWLEDGE instead of 0
    /// and the device is taken to keep the rings it had (the layer does
    /// not forget them), until cleared.
    ResetStuck,
    /// pvscsi: before a matching completion, one naming this bogus
    /// context is delivered (see [`pvscsi::BogusContext`]).
    BogusContext(Match, pvscsi::BogusContext),
    /// pvscsi: a matching completion's fields are replaced.
    Completion(Match, pvscsi::CmpEdit),
    /// pvscsi: with a matching completion, cmpProdIdx runs this many
    /// entries ahead of what the device wrote, until ADAPTER_RESET.
    CmpProdRunaway(Match, u32),
    /// pvscsi: the next message the device posts reads as edited
    /// ([`pvscsi::MsgEdit::garbage`]: an unknown kind with junk addresses).
    Message(pvscsi::MsgEdit),
    /// pvscsi: before the next message the device posts, these edits of
    /// it are delivered too.
    ExtraMessages(Vec<pvscsi::MsgEdit>),
    /// pvscsi: with the next message the device posts, msgProdIdx jumps
    /// this many entries more (more than the ring: an overflow).
    MsgProdOverflow(u32),
    /// pvscsi: the rings-state page's log2 field of a ring (offset 8
    /// request, 20 completion, 136 message) reads as this value, as long
    /// as the fault is armed (a device that misread SETUP_RINGS).
    RingLog2 {
        /// The field's offset in the rings-state page.
        offset: u64,
        /// What it reads as.
        value: u32,
    },
    /// pvscsi: after adapter command `n` (`PVSCSICommands`: 1
    /// ADAPTER_RESET, 3 SETUP_RINGS, ...) COMMAND_STATUS reads
    /// 0xFFFFFFFF (failed), as long as the fault is armed: a device that
    /// has stopped carrying out its commands (or is gone) fails its reset.
    /// QEMU still runs the command; only the driver's view is failed.
    CommandFails(u32),
}

/// What the layer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Completions withheld.
    pub withheld: u64,
    /// Completions delivered twice.
    pub duplicated: u64,
    /// Bogus used entries injected.
    pub bogus_ids: u64,
    /// Used lengths changed.
    pub lengths: u64,
    /// Responses overwritten.
    pub responses: u64,
    /// Task management answers changed.
    pub tmfs: u64,
    /// Garbage events.
    pub events: u64,
    /// Configuration reads changed.
    pub config_reads: u64,
    /// Event buffer publications held back from the device.
    pub starved: u64,
    /// Notifications of the control queue: task management requests the
    /// driver sent (counted whether or not a fault is armed).
    pub control_notifies: u64,
    /// pvscsi: completions whose fields were replaced.
    pub completion_edits: u64,
    /// Runaway used indices (virtio) or completion producer indices
    /// (pvscsi) shown.
    pub runaways: u64,
    /// pvscsi: messages invented ([`Fault::ExtraMessages`]).
    pub messages_injected: u64,
    /// pvscsi: message producer jumps ([`Fault::MsgProdOverflow`]).
    pub msg_overflows: u64,
    /// pvscsi: ADAPTER_RESET commands the driver sent (always counted).
    pub adapter_resets: u64,
    /// pvscsi: RESET_BUS commands (always counted).
    pub bus_resets: u64,
    /// pvscsi: RESET_DEVICE commands (always counted).
    pub device_resets: u64,
    /// pvscsi: ABORT_CMD commands (always counted).
    pub abort_cmds: u64,
    /// pvscsi: COMMAND_STATUS reads failed ([`Fault::CommandFails`]).
    pub commands_failed: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Rings {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    enabled: bool,
}

impl Rings {
    fn used_len(&self) -> u64 {
        4 + 8 * u64::from(self.size) + 2
    }
}

/// The driver's view of one used ring, once faults touch it.
#[derive(Default)]
struct UsedView {
    /// The device's used index consumed so far.
    device: u16,
    /// The index the driver sees.
    visible: u16,
    /// The ring entries the driver sees, by position.
    entries: Vec<[u8; 8]>,
    /// Completions held back.
    withheld: Vec<[u8; 8]>,
}

#[derive(Default)]
struct State {
    layout: VirtioLayout,
    /// The driver uses the legacy interface (its queue setup says so).
    legacy_mode: bool,
    select: u16,
    rings: BTreeMap<u16, Rings>,
    views: BTreeMap<u16, UsedView>,
    faults: VecDeque<Fault>,
    starve_events: bool,
    /// The event queue's avail idx as the driver last wrote it, and as the
    /// device was last allowed to see it.
    event_avail: Option<(u16, u16)>,
    /// A [`Fault::NeedsReset`] was shown to the driver (the next reset
    /// ends it).
    needs_reset_shown: bool,
    /// A reset was asked for while [`Fault::ResetStuck`] was armed.
    reset_stuck: bool,
    stats: FaultStats,
}

/// The hostile-device layer of one machine.
#[derive(Default)]
pub struct Faults {
    state: Mutex<State>,
    /// Whether any fault was ever armed (until then nothing is filtered).
    armed: AtomicBool,
    /// The machine's qtest connection (raw device memory access).
    qt: std::sync::OnceLock<std::sync::Arc<dyn Bus>>,
    /// The pvscsi layer (in charge when the machine is a pvscsi one).
    pub pv: pvscsi::PvFaults,
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// The virtio-scsi request header's CDB offset (§5.6.6: lun 8, id 8,
/// task_attr, prio, crn).
const REQ_CDB: usize = 19;
const CONTROL_QUEUE: u16 = 0;
const EVENT_QUEUE: u16 = 1;

/// A descriptor chain's request and first device-writable buffer.
struct Chain {
    request: Vec<u8>,
    response: Option<u64>,
}

impl Faults {
    /// Sets the virtio-pci layout found at launch, and the connection to
    /// the device's memory.
    pub fn set_layout(&self, layout: VirtioLayout, qt: std::sync::Arc<dyn Bus>) {
        lock(&self.state).layout = layout;
        let _ = self.qt.set(qt);
    }

    /// Makes this a pvscsi machine's layer (BAR 0 at `bar0`): every hook
    /// goes to [`pvscsi::PvFaults`].
    pub fn set_pvscsi(&self, bar0: u64, qt: std::sync::Arc<dyn Bus>) {
        let _ = self.qt.set(qt);
        self.pv.set_bar0(bar0);
    }

    /// The layout in use.
    pub fn layout(&self) -> VirtioLayout {
        lock(&self.state).layout
    }

    /// Arms `fault`. From the first arming on, the driver's view of every
    /// running queue is followed from where the device is now, so that the
    /// very next completion can be touched.
    pub fn arm(&self, fault: Fault) {
        if self.pv.active() {
            if let Some(qt) = self.qt.get() {
                self.pv.arm(&**qt, fault);
            }
            return;
        }
        self.armed.store(true, Ordering::Release);
        let mut s = lock(&self.state);
        s.faults.push_back(fault);
        if let Some(qt) = self.qt.get() {
            let rings: Vec<(u16, Rings)> = s
                .rings
                .iter()
                .filter(|(_, r)| r.enabled && r.size > 0 && r.used != 0)
                .map(|(q, r)| (*q, *r))
                .collect();
            for (q, r) in rings {
                start_view(&mut s, &**qt, q, &r);
            }
        }
    }

    /// Disarms every fault not used yet (withheld completions stay
    /// withheld; configuration overrides end).
    pub fn disarm_all(&self) {
        self.pv.disarm_all();
        lock(&self.state).faults.clear();
    }

    /// Faults armed and not used yet.
    pub fn pending(&self) -> usize {
        if self.pv.active() {
            return self.pv.pending();
        }
        lock(&self.state).faults.len()
    }

    /// The queues the layer has seen set up: (index, size, desc, avail,
    /// used, enabled).
    pub fn queues(&self) -> Vec<(u16, u16, u64, u64, u64, bool)> {
        lock(&self.state)
            .rings
            .iter()
            .map(|(q, r)| (*q, r.size, r.desc, r.avail, r.used, r.enabled))
            .collect()
    }

    /// What the layer did so far.
    pub fn stats(&self) -> FaultStats {
        if self.pv.active() {
            return self.pv.stats();
        }
        lock(&self.state).stats
    }

    /// Keeps (true) or stops keeping (false) new event buffers from the
    /// device. When stopping, the buffers published meanwhile are shown
    /// to the device and it is notified.
    pub fn starve_events(&self, qt: &dyn Bus, on: bool) {
        self.armed.store(true, Ordering::Release);
        let mut s = lock(&self.state);
        s.starve_events = on;
        if on {
            // From here on the device keeps seeing the index it sees now.
            if let Some(r) = s.rings.get(&EVENT_QUEUE).copied() {
                let mut idx = [0u8; 2];
                if qt.read_mem(r.avail + 2, &mut idx).is_ok() {
                    let i = u16::from_le_bytes(idx);
                    s.event_avail = Some((i, i));
                }
            }
            return;
        }
        let Some(r) = s.rings.get(&EVENT_QUEUE).copied() else {
            return;
        };
        if let Some((driver, shown)) = s.event_avail.filter(|(d, s)| d != s) {
            let _ = shown;
            let _ = qt.write_mem(r.avail + 2, &driver.to_le_bytes());
            s.event_avail = Some((driver, driver));
            let (layout, legacy) = (s.layout, s.legacy_mode);
            drop(s);
            notify(qt, &layout, legacy, EVENT_QUEUE);
        }
    }

    /// Completions withheld so far, now delivered (they appear at the
    /// driver's next look at the ring).
    pub fn release_withheld(&self) {
        self.pv.release_withheld();
        let mut s = lock(&self.state);
        for v in s.views.values_mut() {
            let held: Vec<[u8; 8]> = v.withheld.drain(..).collect();
            for e in held {
                push_visible(v, e);
            }
        }
    }

    /// Completions withheld and not released.
    pub fn withheld(&self) -> usize {
        if self.pv.active() {
            return self.pv.withheld();
        }
        lock(&self.state)
            .views
            .values()
            .map(|v| v.withheld.len())
            .sum()
    }

    /// A register write by the driver.
    pub fn on_reg_write(&self, reg: Reg, size: usize, value: u64) {
        if self.pv.active() {
            if let Some(qt) = self.qt.get() {
                self.pv.on_reg_write(&**qt, reg, value);
            }
            return;
        }
        let mut s = lock(&self.state);
        let layout = s.layout;
        // The control queue's doorbell (queue 0: QEMU's queue_notify_off
        // is the queue index; legacy: the queue notify register, 0x10).
        let control_notify = match reg {
            Reg::Mem(a) => layout.notify.is_some_and(|(base, _)| a == base),
            Reg::Io(p) => layout.legacy.is_some_and(|l| p == l + 0x10) && value == 0,
        };
        if control_notify && value == u64::from(CONTROL_QUEUE) {
            s.stats.control_notifies += 1;
        }
        match reg {
            Reg::Mem(a) => {
                if let Some(c) = layout.common.filter(|&c| a >= c && a < c + 0x40) {
                    common_write(&mut s, a - c, size, value);
                    // A queue enabled while faults are armed: follow it
                    // from its start.
                    if a - c == 0x1c && value != 0 && self.armed.load(Ordering::Acquire) {
                        let sel = s.select;
                        if let (Some(qt), Some(r)) = (self.qt.get(), s.rings.get(&sel).copied()) {
                            s.views.remove(&sel);
                            start_view(&mut s, &**qt, sel, &r);
                        }
                    }
                }
            }
            Reg::Io(p) => {
                if let Some(l) = layout.legacy.filter(|&l| p >= l && p < l + 0x18) {
                    legacy_write(&mut s, u64::from(p - l), value);
                    if p - l == 0x08 && value != 0 && self.armed.load(Ordering::Acquire) {
                        let sel = s.select;
                        if let (Some(qt), Some(r)) = (self.qt.get(), s.rings.get(&sel).copied()) {
                            s.views.remove(&sel);
                            start_view(&mut s, &**qt, sel, &r);
                        }
                    }
                }
            }
        }
    }

    /// A register read by the driver; returns what the driver sees.
    pub fn on_reg_read(&self, reg: Reg, size: usize, value: u64) -> u64 {
        if self.pv.active() {
            return self.pv.on_reg_read(reg, value);
        }
        let mut s = lock(&self.state);
        let layout = s.layout;
        match reg {
            Reg::Io(p) => {
                if layout.legacy.is_some_and(|l| p == l + 0x0c) && size == 2 {
                    // The legacy queue size of the selected queue (read-only).
                    let sel = s.select;
                    s.rings.entry(sel).or_default().size = value as u16;
                }
                value
            }
            Reg::Mem(_) if !self.armed.load(Ordering::Acquire) => value,
            Reg::Mem(a) => {
                // device_status (virtio 1.2 §4.1.4.3): a reset that never
                // finishes reads ACKNOWLEDGE.
                if layout.common.is_some_and(|c| a == c + 0x14)
                    && size == 1
                    && s.reset_stuck
                    && s.faults.contains(&Fault::ResetStuck)
                {
                    return value | 1;
                }
                // device_status, DRIVER_OK (4) set.
                if layout.common.is_some_and(|c| a == c + 0x14)
                    && size == 1
                    && value & 4 != 0
                    && s.faults.contains(&Fault::NeedsReset)
                {
                    s.needs_reset_shown = true;
                    return value | 0x40;
                }
                if layout.common.is_some_and(|c| a == c + 0x18) && size == 2 {
                    let over = s.faults.iter().find_map(|f| match f {
                        Fault::QueueSize(n) => Some(*n),
                        _ => None,
                    });
                    if let Some(n) = over {
                        s.stats.config_reads += 1;
                        return u64::from(n);
                    }
                }
                if let Some(d) = layout.device.filter(|&d| a >= d) {
                    let rel = a - d;
                    let over = s.faults.iter().find_map(|f| match f {
                        Fault::Config { offset, value } if *offset == rel => Some(*value),
                        _ => None,
                    });
                    if let Some(v) = over {
                        s.stats.config_reads += 1;
                        return u64::from(v) & mask(size);
                    }
                }
                value
            }
        }
    }

    /// Device memory the driver is about to see (a FORCPU copy of
    /// `[gpa, gpa+buf.len())`): rewrites its view of faulty used rings.
    pub fn filter_read(&self, qt: &dyn Bus, gpa: u64, buf: &mut [u8]) {
        if self.pv.active() {
            return self.pv.filter_read(qt, gpa, buf);
        }
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let mut s = lock(&self.state);
        let queues: Vec<(u16, Rings)> = s
            .rings
            .iter()
            .filter(|(_, r)| r.enabled && r.size > 0 && r.used != 0)
            .map(|(q, r)| (*q, *r))
            .collect();
        for (q, r) in queues {
            let (start, end) = (r.used, r.used + r.used_len());
            if gpa >= end || gpa + buf.len() as u64 <= start {
                continue;
            }
            advance_view(&mut s, qt, q, &r);
            let Some(v) = s.views.get(&q) else { continue };
            // Patch the idx and entries in the overlap.
            let mut visible = vec![0u8; r.used_len() as usize];
            let mut device = vec![0u8; r.used_len() as usize];
            if qt.read_mem(r.used, &mut device).is_err() {
                continue;
            }
            visible.copy_from_slice(&device);
            visible[2..4].copy_from_slice(&v.visible.to_le_bytes());
            for (i, e) in v.entries.iter().enumerate() {
                visible[4 + 8 * i..12 + 8 * i].copy_from_slice(e);
            }
            for (i, b) in buf.iter_mut().enumerate() {
                let a = gpa + i as u64;
                if a >= start && a < end {
                    *b = visible[(a - start) as usize];
                }
            }
        }
    }

    /// Driver memory about to reach the device (a FORDEV copy): returns a
    /// replacement when the driver's `used_event` must be translated into
    /// the device's numbering of a rewritten used ring, or when the event
    /// queue is starved.
    pub fn filter_write(&self, gpa: u64, data: &[u8]) -> Option<Vec<u8>> {
        if self.pv.active() {
            return self.pv.filter_write(gpa, data);
        }
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut s = lock(&self.state);
        let mut out: Option<Vec<u8>> = None;
        // virtio 1.2 §2.7.10: the driver's used_event (after the avail ring)
        // names an entry in its own view; the device counts its own.
        for (q, v) in &s.views {
            let Some(r) = s.rings.get(q) else { continue };
            let at = r.avail + 4 + 2 * u64::from(r.size);
            if gpa <= at && gpa + data.len() as u64 >= at + 2 {
                let i = (at - gpa) as usize;
                let buf = out.get_or_insert_with(|| data.to_vec());
                let driver = u16::from_le_bytes([buf[i], buf[i + 1]]);
                let device = driver.wrapping_add(v.device.wrapping_sub(v.visible));
                buf[i..i + 2].copy_from_slice(&device.to_le_bytes());
            }
        }
        let Some(r) = s.rings.get(&EVENT_QUEUE).copied() else {
            return out;
        };
        let idx_at = r.avail + 2;
        if !(gpa <= idx_at && gpa + data.len() as u64 >= idx_at + 2) {
            return out;
        }
        let i = (idx_at - gpa) as usize;
        let driver = u16::from_le_bytes([data[i], data[i + 1]]);
        let shown = s.event_avail.map_or(driver, |(_, shown)| shown);
        if s.starve_events {
            s.event_avail = Some((driver, shown));
            if driver != shown {
                s.stats.starved += 1;
            }
            let buf = out.get_or_insert_with(|| data.to_vec());
            buf[i..i + 2].copy_from_slice(&shown.to_le_bytes());
        } else {
            s.event_avail = Some((driver, driver));
        }
        out
    }
}

fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

fn reset(s: &mut State) {
    s.rings.clear();
    s.views.clear();
    s.event_avail = None;
    if std::mem::take(&mut s.needs_reset_shown) {
        s.faults.retain(|f| *f != Fault::NeedsReset);
    }
}

/// The modern common configuration (virtio 1.2 §4.1.4.3).
fn common_write(s: &mut State, rel: u64, size: usize, value: u64) {
    let sel = s.select;
    let set_lo_hi = |field: &mut u64, hi: bool| {
        if size == 8 {
            *field = value;
        } else if hi {
            *field = (*field & 0xffff_ffff) | (value << 32);
        } else {
            *field = (*field & !0xffff_ffff) | (value & 0xffff_ffff);
        }
    };
    match rel {
        0x14 if value == 0 && s.faults.contains(&Fault::ResetStuck) => s.reset_stuck = true,
        0x14 if value == 0 => reset(s),
        0x16 => s.select = value as u16,
        0x18 => {
            s.legacy_mode = false;
            s.rings.entry(sel).or_default().size = value as u16;
        }
        0x1c => s.rings.entry(sel).or_default().enabled = value != 0,
        0x20 | 0x24 => set_lo_hi(&mut s.rings.entry(sel).or_default().desc, rel == 0x24),
        0x28 | 0x2c => set_lo_hi(&mut s.rings.entry(sel).or_default().avail, rel == 0x2c),
        0x30 | 0x34 => set_lo_hi(&mut s.rings.entry(sel).or_default().used, rel == 0x34),
        _ => {}
    }
}

/// The legacy header (virtio 1.2 §4.1.4.8): queue address as a page
/// frame number; the rings laid out one after the other, the used ring on
/// the next 4096-byte boundary.
fn legacy_write(s: &mut State, off: u64, value: u64) {
    match off {
        0x0e => s.select = value as u16,
        0x12 if value == 0 => reset(s),
        0x08 => {
            s.legacy_mode = true;
            let sel = s.select;
            let r = s.rings.entry(sel).or_default();
            if value == 0 {
                r.enabled = false;
                return;
            }
            let size = u64::from(r.size);
            r.desc = value << 12;
            r.avail = r.desc + 16 * size;
            r.used = (r.avail + 6 + 2 * size).next_multiple_of(4096);
            r.enabled = true;
        }
        _ => {}
    }
}

/// Notifies queue `q` (a doorbell write of the test bed's own), through
/// the interface the driver uses.
fn notify(qt: &dyn Bus, layout: &VirtioLayout, legacy: bool, q: u16) {
    match (legacy, layout.legacy, layout.notify) {
        // The legacy queue notify register (offset 0x10).
        (true, Some(port), _) => {
            let _ = qt.outw(port + 0x10, q);
        }
        // QEMU's queue_notify_off is the queue index.
        (_, _, Some((base, mult))) => {
            let _ = qt.writew(base + u64::from(q) * u64::from(mult), q);
        }
        _ => {}
    }
}

fn push_visible(v: &mut UsedView, e: [u8; 8]) {
    let size = v.entries.len();
    if size == 0 {
        return;
    }
    let pos = usize::from(v.visible) % size;
    v.entries[pos] = e;
    v.visible = v.visible.wrapping_add(1);
}

/// Reads descriptor `id`'s chain: the request bytes (up to the CDB) and
/// the first device-writable buffer.
fn read_chain(qt: &dyn Bus, r: &Rings, id: u32) -> Option<Chain> {
    if id >= u32::from(r.size) {
        return None;
    }
    let desc = |base: u64, i: u64| -> Option<(u64, u32, u16, u16)> {
        let mut d = [0u8; 16];
        qt.read_mem(base + 16 * i, &mut d).ok()?;
        Some((
            u64::from_le_bytes(d[0..8].try_into().ok()?),
            u32::from_le_bytes(d[8..12].try_into().ok()?),
            u16::from_le_bytes(d[12..14].try_into().ok()?),
            u16::from_le_bytes(d[14..16].try_into().ok()?),
        ))
    };
    let (addr, len, flags, next) = desc(r.desc, u64::from(id))?;
    // The chain to walk: an indirect table, or the ring's own.
    let (table, first, count) = if flags & VIRTQ_DESC_F_INDIRECT != 0 {
        (addr, 0u64, u64::from(len / 16).min(4096))
    } else {
        (r.desc, u64::from(id), u64::from(r.size))
    };
    let mut request = Vec::new();
    let mut response = None;
    let mut i = first;
    let mut d = if flags & VIRTQ_DESC_F_INDIRECT != 0 {
        desc(table, 0)?
    } else {
        (addr, len, flags, next)
    };
    for _ in 0..count {
        let (a, l, f, n) = d;
        if f & VIRTQ_DESC_F_WRITE != 0 {
            response = Some(a);
            break;
        }
        if request.len() < 64 {
            let mut b = vec![0u8; (l as usize).min(64 - request.len())];
            qt.read_mem(a, &mut b).ok()?;
            request.extend_from_slice(&b);
        }
        if f & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        i = u64::from(n);
        d = desc(table, i)?;
    }
    let _ = i;
    Some(Chain { request, response })
}

/// Starts following the driver's view of queue `q`'s used ring where the
/// device is: identical so far.
fn start_view(s: &mut State, qt: &dyn Bus, q: u16, r: &Rings) {
    if s.views.contains_key(&q) {
        return;
    }
    let size = usize::from(r.size);
    let mut idx = [0u8; 2];
    let mut ring = vec![0u8; 8 * size];
    if qt.read_mem(r.used + 2, &mut idx).is_err() || qt.read_mem(r.used + 4, &mut ring).is_err() {
        return;
    }
    let device = u16::from_le_bytes(idx);
    let entries = ring
        .chunks(8)
        .map(|c| c.try_into().unwrap_or([0; 8]))
        .collect();
    s.views.insert(
        q,
        UsedView {
            device,
            visible: device,
            entries,
            withheld: Vec::new(),
        },
    );
}

/// Takes the device's new used entries of queue `q` into the driver's
/// view, applying the armed faults.
fn advance_view(s: &mut State, qt: &dyn Bus, q: u16, r: &Rings) {
    let size = usize::from(r.size);
    let mut idx = [0u8; 2];
    if qt.read_mem(r.used + 2, &mut idx).is_err() {
        return;
    }
    let device_idx = u16::from_le_bytes(idx);
    if !s.views.contains_key(&q) {
        start_view(s, qt, q, r);
        return;
    }
    let pending = device_idx.wrapping_sub(s.views[&q].device);
    if usize::from(pending) > size {
        return; // a device gone mad is the driver's problem, not ours
    }
    for _ in 0..pending {
        let pos = usize::from(s.views[&q].device) % size;
        let mut e = [0u8; 8];
        if qt.read_mem(r.used + 4 + 8 * pos as u64, &mut e).is_err() {
            return;
        }
        if let Some(v) = s.views.get_mut(&q) {
            v.device = v.device.wrapping_add(1);
        }
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let chain = read_chain(qt, r, id);
        let cdb: Vec<u8> = chain
            .as_ref()
            .map(|c| c.request.get(REQ_CDB..).unwrap_or(&[]).to_vec())
            .unwrap_or_default();
        let mut withhold = false;
        let mut duplicate = false;
        let mut bogus = None;
        let mut new_len = None;
        let mut runaway = None;
        let mut patches: Vec<(usize, Vec<u8>)> = Vec::new();
        // One fault of each kind per completion: the next of the same kind
        // waits for the next matching completion.
        let mut applied: Vec<std::mem::Discriminant<Fault>> = Vec::new();
        let mut i = 0;
        while i < s.faults.len() {
            let kind = std::mem::discriminant(&s.faults[i]);
            if applied.contains(&kind) {
                i += 1;
                continue;
            }
            let used = match &s.faults[i] {
                Fault::Withhold(m) if q >= 2 && m.matches(&cdb) => {
                    withhold = true;
                    true
                }
                Fault::Duplicate(m) if q >= 2 && m.matches(&cdb) => {
                    duplicate = true;
                    true
                }
                Fault::BogusUsedId(bad) if q >= 2 => {
                    bogus = Some(*bad);
                    true
                }
                Fault::UsedLen(m, l) if q >= 2 && m.matches(&cdb) => {
                    new_len = Some(*l);
                    true
                }
                Fault::UsedIdxRunaway(m, n) if q >= 2 && m.matches(&cdb) => {
                    runaway = Some(*n);
                    true
                }
                Fault::Response(m, p) if q >= 2 && m.matches(&cdb) => {
                    patches.extend(p.iter().cloned());
                    true
                }
                Fault::TmfResponse { response, count } if q == CONTROL_QUEUE && *count > 0 => {
                    patches.push((0, vec![*response]));
                    s.stats.tmfs += 1;
                    if *count > 1 {
                        let (response, count) = (*response, *count - 1);
                        s.faults[i] = Fault::TmfResponse { response, count };
                        applied.push(kind);
                        i += 1;
                        continue;
                    }
                    true
                }
                Fault::GarbageEvent if q == EVENT_QUEUE => {
                    // virtio 1.2 §5.6.6.3: event (le32), lun[8], reason
                    // (le32): an unknown event code, a malformed LUN, junk.
                    patches.push((0, vec![0x78, 0x56, 0x34, 0x12]));
                    patches.push((4, vec![0xee; 8]));
                    patches.push((12, vec![0xef, 0xbe, 0xad, 0xde]));
                    s.stats.events += 1;
                    true
                }
                _ => false,
            };
            if used {
                applied.push(kind);
                s.faults.remove(i);
            } else {
                i += 1;
            }
        }
        if let (false, Some(resp)) = (patches.is_empty(), chain.as_ref().and_then(|c| c.response)) {
            for (off, bytes) in &patches {
                let _ = qt.write_mem(resp + *off as u64, bytes);
            }
            if q >= 2 {
                s.stats.responses += 1;
            }
        }
        if let Some(l) = new_len {
            e[4..8].copy_from_slice(&l.to_le_bytes());
            s.stats.lengths += 1;
        }
        let Some(v) = s.views.get_mut(&q) else { return };
        if let Some(bad) = bogus {
            let mut b = [0u8; 8];
            b[0..4].copy_from_slice(&bad.to_le_bytes());
            push_visible(v, b);
            s.stats.bogus_ids += 1;
        }
        if withhold {
            v.withheld.push(e);
            s.stats.withheld += 1;
            continue;
        }
        push_visible(v, e);
        if duplicate {
            push_visible(v, e);
            s.stats.duplicated += 1;
        }
        if let Some(n) = runaway {
            v.visible = v.visible.wrapping_add(n);
            s.stats.runaways += 1;
        }
    }
}
