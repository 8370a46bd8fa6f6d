//! The hostile-device layer for VMware PVSCSI: what a buggy or malicious
//! hypervisor could show a pvscsi driver, on top of QEMU's model, which
//! itself is left untouched (only the driver's view of guest memory is
//! rewritten).
//!
//! It follows the driver's adapter commands (COMMAND at BAR 0 + 0x0, then
//! the payload dwords at + 0x4; `pvscsi.h` `PVSCSICommands`, shared/notes/
//! pvscsi.md §1): SETUP_RINGS (`PVSCSICmdDescSetupRings`: reqRingNumPages
//! u32, cmpRingNumPages u32, ringsStatePPN u64, reqRingPPNs[32] u64,
//! cmpRingPPNs[32] u64) and SETUP_MSG_RING (`PVSCSICmdDescSetupMsgRing`:
//! numPages u32, pad u32, ringPPNs[16] u64) say where the rings-state page
//! and the three rings are; ADAPTER_RESET forgets them (QEMU
//! `pvscsi_reset_adapter` → `pvscsi_ring_cleanup`). At every doorbell
//! (KICK_RW_IO 0x4018, KICK_NON_RW_IO 0x3014) it reads the request
//! descriptors the driver published (`PVSCSIRingReqDesc`: context @0,
//! cdb[16] @40, cdbLen @56) to learn which context carries which CDB.
//!
//! From the first [`Fault`] armed on, it keeps the driver's own view of the
//! completion ring (`PVSCSIRingCmpDesc`, 32 B: context @0, dataLen @8,
//! senseLen @16, hostStatus @20, scsiStatus @22) and of `cmpProdIdx`
//! (rings-state @12), and of the message ring (128 B entries: type @0,
//! bus @4, target @8, lun[8] @12) and `msgProdIdx` (@128). The driver's
//! consumer indices (`cmpConsIdx` @16, `msgConsIdx` @132) are translated
//! back into the device's numbering on their way to it: QEMU reads
//! `msgConsIdx` to decide whether a message fits (Q
//! `pvscsi_ring_msg_has_room`); it never reads `cmpConsIdx` (Q
//! `pvscsi_ring_pop_cmp_descr`: "device may omit completion queue
//! overflow conditions check"), which is translated all the same.
//!
//! The faults (each once unless said), and what a real device could do
//! that looks like it:
//! - [`Fault::Withhold`]: a completion lost — the hypervisor finished the
//!   I/O and never posted it (a lost ring update after a live migration, a
//!   backend that swallows the command). Released by
//!   [`super::Faults::release_withheld`]; forgotten at ADAPTER_RESET.
//! - [`Fault::Duplicate`]: a completion posted twice (a replayed ring
//!   write, a producer index bumped twice).
//! - [`Fault::BogusContext`]: before a matching completion, one naming a
//!   context that is 0, beyond the request ring, above 32 bits (vmkernel
//!   keeps contexts in a u32, `pvscsi.h`: a truncating device would alias
//!   it to a real command), never issued, or already completed (a stale
//!   slot re-posted).
//! - [`Fault::Completion`]: a matching completion's hostStatus /
//!   scsiStatus / dataLen / senseLen replaced (a device writing garbage or
//!   an unknown BTSTAT code, a status wider than a byte, more data or
//!   sense than the buffers hold).
//! - [`Fault::CmpProdRunaway`]: with a matching completion `cmpProdIdx`
//!   runs ahead by `n` entries the device never wrote (a corrupted or
//!   uninitialized rings-state page). It stays ahead until ADAPTER_RESET.
//! - [`Fault::Message`]: the next message the device posts reads as
//!   edited (an unknown kind, a bus or target or LUN no driver can have).
//! - [`Fault::ExtraMessages`]: before the next message the device posts,
//!   these edits of it are posted too (a device that invents messages).
//! - [`Fault::MsgProdOverflow`]: with the next message the device posts,
//!   `msgProdIdx` jumps `n` more (a device that kept posting into a full
//!   ring, overwriting what the driver had not read: more than a ring
//!   ahead means messages were lost).
//! - [`Fault::RingLog2`]: a log2 field of the rings-state page reads
//!   wrong while armed (a device that misread SETUP_RINGS, or QEMU's own
//!   wrong log2 for page counts that are not a power of two).
//! - [`Fault::CommandFails`]: COMMAND_STATUS (BAR 0 + 0x8) reads
//!   0xFFFFFFFF after the armed adapter command, while armed (a device
//!   that fails ADAPTER_RESET, or refuses SETUP_RINGS after one). This is
//!   the one register the layer rewrites.

use super::{Fault, FaultStats, Reg};
use crate::machine::lock;
use rvscsi_qtest::Bus;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

// BAR 0 offsets (`pvscsi.h` `PVSCSIRegOffset`; src/pvscsi/regs.rs).
const REG_COMMAND: u64 = 0x0000;
const REG_COMMAND_DATA: u64 = 0x0004;
const REG_COMMAND_STATUS: u64 = 0x0008;
const REG_KICK_NON_RW_IO: u64 = 0x3014;
const REG_KICK_RW_IO: u64 = 0x4018;

// Command numbers (`pvscsi.h` `PVSCSICommands`).
const CMD_ADAPTER_RESET: u32 = 1;
const CMD_SETUP_RINGS: u32 = 3;
const CMD_RESET_BUS: u32 = 4;
const CMD_RESET_DEVICE: u32 = 5;
const CMD_ABORT_CMD: u32 = 6;
const CMD_SETUP_MSG_RING: u32 = 8;
/// Payload dwords of SETUP_RINGS (2 + 2 + 32·2 + 32·2) and SETUP_MSG_RING
/// (1 + 1 + 16·2).
const SETUP_RINGS_DWORDS: usize = 132;
const SETUP_MSG_RING_DWORDS: usize = 34;
/// ABORT_CMD: context u64, target u32, pad u32.
const ABORT_CMD_DWORDS: usize = 4;
/// RESET_DEVICE: target u32, lun[8].
const RESET_DEVICE_DWORDS: usize = 3;

const PAGE: u64 = 4096;
const REQ_DESC: u64 = 128;
const CMP_DESC: usize = 32;
const MSG_DESC: usize = 128;
const REQ_PER_PAGE: u64 = PAGE / REQ_DESC;
const CMP_PER_PAGE: usize = PAGE as usize / CMP_DESC;
const MSG_PER_PAGE: usize = PAGE as usize / MSG_DESC;

// Rings-state page offsets (`PVSCSIRingsState`).
const RS_REQ_PROD: u64 = 0;
const RS_REQ_LOG2: u64 = 8;
const RS_CMP_LOG2: u64 = 20;
const RS_MSG_LOG2: u64 = 136;
const RS_CMP_PROD: u64 = 12;
const RS_CMP_CONS: u64 = 16;
const RS_MSG_PROD: u64 = 128;
const RS_MSG_CONS: u64 = 132;

/// The context a [`Fault::BogusContext`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BogusContext {
    /// Context 0 (drivers never use it; a zeroed slot names it).
    Zero,
    /// The first context beyond the request ring (entries + 1).
    OutOfRange,
    /// A real outstanding context with bit 32 set: a device that keeps
    /// contexts in a u32 would take it as that command.
    Above32Bits,
    /// A context in range that was never issued since the rings were set
    /// up (the highest one not seen at a doorbell).
    NeverIssued,
    /// A context issued and already completed, not in flight now (a stale
    /// completion re-posted): of those, the one completed longest ago.
    /// Waits for a completion while none exists.
    Stale,
    /// This value.
    Value(u64),
}

/// What a [`Fault::Completion`] replaces in a completion descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmpEdit {
    /// hostStatus (`BTSTAT_*`).
    pub host_status: Option<u16>,
    /// scsiStatus (a SCSI status is a byte; the field is 16 bits wide).
    pub scsi_status: Option<u16>,
    /// dataLen: bytes transferred.
    pub data_len: Option<u64>,
    /// senseLen: sense bytes written.
    pub sense_len: Option<u32>,
}

/// What a [`Fault::Message`] or [`Fault::ExtraMessages`] entry replaces in
/// a message (`PVSCSIMsgDescDevStatusChanged`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsgEdit {
    /// type (0 DEV_ADDED, 1 DEV_REMOVED; others undefined).
    pub kind: Option<u32>,
    /// bus (always 0 on this interface).
    pub bus: Option<u32>,
    /// target.
    pub target: Option<u32>,
    /// lun[8] (single-level: lun[1] is the LUN).
    pub lun: Option<[u8; 8]>,
}

impl MsgEdit {
    /// A message of a kind no header defines, with junk addresses.
    pub fn garbage() -> MsgEdit {
        MsgEdit {
            kind: Some(0x1234_5678),
            bus: Some(0xdead_beef),
            target: Some(0xffff_ff00),
            lun: Some([0xee; 8]),
        }
    }

    fn apply(&self, m: &mut [u8; MSG_DESC]) {
        if let Some(k) = self.kind {
            m[0..4].copy_from_slice(&k.to_le_bytes());
        }
        if let Some(b) = self.bus {
            m[4..8].copy_from_slice(&b.to_le_bytes());
        }
        if let Some(t) = self.target {
            m[8..12].copy_from_slice(&t.to_le_bytes());
        }
        if let Some(l) = self.lun {
            m[12..20].copy_from_slice(&l);
        }
    }
}

impl CmpEdit {
    fn apply(&self, e: &mut [u8; CMP_DESC]) {
        if let Some(d) = self.data_len {
            e[8..16].copy_from_slice(&d.to_le_bytes());
        }
        if let Some(s) = self.sense_len {
            e[16..20].copy_from_slice(&s.to_le_bytes());
        }
        if let Some(h) = self.host_status {
            e[20..22].copy_from_slice(&h.to_le_bytes());
        }
        if let Some(s) = self.scsi_status {
            e[22..24].copy_from_slice(&s.to_le_bytes());
        }
    }
}

/// Where the driver put the rings (guest-physical addresses).
#[derive(Clone, Debug)]
struct RingsInfo {
    state: u64,
    req: Vec<u64>,
    cmp: Vec<u64>,
    msg: Vec<u64>,
}

impl RingsInfo {
    fn req_entries(&self) -> u32 {
        (self.req.len() as u64 * REQ_PER_PAGE) as u32
    }
    fn cmp_entries(&self) -> u32 {
        (self.cmp.len() * CMP_PER_PAGE) as u32
    }
    fn msg_entries(&self) -> u32 {
        (self.msg.len() * MSG_PER_PAGE) as u32
    }
    fn req_addr(&self, idx: u32) -> Option<u64> {
        let slot = u64::from(idx & (self.req_entries() - 1));
        let page = self.req.get((slot / REQ_PER_PAGE) as usize)?;
        Some(page + (slot % REQ_PER_PAGE) * REQ_DESC)
    }
    fn cmp_addr(&self, idx: u32) -> Option<u64> {
        let slot = (idx & (self.cmp_entries() - 1)) as usize;
        let page = self.cmp.get(slot / CMP_PER_PAGE)?;
        Some(page + ((slot % CMP_PER_PAGE) * CMP_DESC) as u64)
    }
    fn msg_addr(&self, idx: u32) -> Option<u64> {
        let entries = self.msg_entries();
        if entries == 0 {
            return None;
        }
        let slot = (idx & (entries - 1)) as usize;
        let page = self.msg.get(slot / MSG_PER_PAGE)?;
        Some(page + ((slot % MSG_PER_PAGE) * MSG_DESC) as u64)
    }
}

/// The driver's view of a ring whose entries are `N` bytes.
struct View<const N: usize> {
    /// The device's producer index consumed into the view so far.
    device: u32,
    /// The producer index the driver sees.
    visible: u32,
    /// The entries the driver sees, by slot.
    entries: Vec<[u8; N]>,
    /// Completions held back.
    withheld: Vec<[u8; N]>,
}

impl<const N: usize> View<N> {
    fn push(&mut self, e: [u8; N]) {
        let size = self.entries.len();
        if size == 0 {
            return;
        }
        let slot = self.visible as usize % size;
        self.entries[slot] = e;
        self.visible = self.visible.wrapping_add(1);
    }

    /// How far the driver's numbering is ahead of the device's.
    fn offset(&self) -> u32 {
        self.visible.wrapping_sub(self.device)
    }
}

#[derive(Default)]
struct State {
    /// BAR 0's address: set for a pvscsi machine only.
    bar0: Option<u64>,
    /// The adapter command being collected and its payload so far.
    cmd: Option<u32>,
    /// The last command number written to COMMAND (whose status
    /// COMMAND_STATUS reads).
    last_cmd: Option<u32>,
    data: Vec<u32>,
    rings: Option<RingsInfo>,
    /// The request index up to which descriptors were read.
    req_seen: u32,
    /// The CDB of each context, from the last descriptor that carried it.
    cdbs: BTreeMap<u64, Vec<u8>>,
    /// Contexts published and not completed (as far as the layer saw).
    in_flight: BTreeSet<u64>,
    /// When each context last completed (the layer's own count of
    /// completions taken from the device): a stale context is picked
    /// among those completed longest ago.
    completed_at: BTreeMap<u64, u64>,
    completions: u64,
    cmp: Option<View<CMP_DESC>>,
    msg: Option<View<MSG_DESC>>,
    faults: VecDeque<Fault>,
    stats: FaultStats,
}

/// The pvscsi half of [`super::Faults`].
#[derive(Default)]
pub struct PvFaults {
    state: Mutex<State>,
    armed: AtomicBool,
    /// Set once the machine is a pvscsi one (cheap check on every hook).
    active: AtomicBool,
    /// ABORT_CMD contexts the driver sent (most recent last, 16 kept).
    aborts: Mutex<VecDeque<u64>>,
    /// Adapter commands seen, by number (0..=15).
    commands: [AtomicU64; 16],
}

fn read_u32(qt: &dyn Bus, gpa: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    qt.read_mem(gpa, &mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn dword_u64(d: &[u32], i: usize) -> u64 {
    u64::from(d[i]) | u64::from(d[i + 1]) << 32
}

fn overlaps(gpa: u64, len: usize, start: u64, n: u64) -> bool {
    gpa < start + n && gpa + len as u64 > start
}

/// Copies `src` (the driver's view of `[start, start+src.len())`) into the
/// overlapping part of `buf` (guest memory at `gpa`).
fn patch(buf: &mut [u8], gpa: u64, start: u64, src: &[u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let a = gpa + i as u64;
        if a >= start && a < start + src.len() as u64 {
            *b = src[(a - start) as usize];
        }
    }
}

impl PvFaults {
    /// Makes this the machine's layer: BAR 0 is at `bar0`.
    pub fn set_bar0(&self, bar0: u64) {
        lock(&self.state).bar0 = Some(bar0);
        self.active.store(true, Ordering::Release);
    }

    /// Whether the machine is a pvscsi one.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Arms `fault`; from the first one on, the driver's views are
    /// followed from where the device is now.
    pub fn arm(&self, qt: &dyn Bus, fault: Fault) {
        self.armed.store(true, Ordering::Release);
        let mut s = lock(&self.state);
        s.faults.push_back(fault);
        if s.rings.is_some() && s.cmp.is_none() {
            // Requests published so far are the device's already: start
            // learning contexts from the producer index as it is now.
            if let Some(r) = &s.rings {
                s.req_seen = read_u32(qt, r.state + RS_REQ_PROD).unwrap_or(0);
            }
            start_views(&mut s, qt);
        }
    }

    /// Drops every fault not used yet.
    pub fn disarm_all(&self) {
        lock(&self.state).faults.clear();
    }

    /// Faults armed and not used yet.
    pub fn pending(&self) -> usize {
        lock(&self.state).faults.len()
    }

    /// What the layer did.
    pub fn stats(&self) -> FaultStats {
        lock(&self.state).stats
    }

    /// Delivers every withheld completion (seen at the driver's next look).
    pub fn release_withheld(&self) {
        let mut s = lock(&self.state);
        if let Some(v) = s.cmp.as_mut() {
            let held: Vec<_> = v.withheld.drain(..).collect();
            for e in held {
                v.push(e);
            }
        }
    }

    /// Completions withheld and not released.
    pub fn withheld(&self) -> usize {
        lock(&self.state)
            .cmp
            .as_ref()
            .map_or(0, |v| v.withheld.len())
    }

    /// The contexts of the last ABORT_CMDs the driver sent.
    pub fn aborted_contexts(&self) -> Vec<u64> {
        lock(&self.aborts).iter().copied().collect()
    }

    /// How many times the driver sent adapter command `number`
    /// (`PVSCSICommands`: 1 ADAPTER_RESET, 4 RESET_BUS, 5 RESET_DEVICE,
    /// 6 ABORT_CMD, ...), counted whether or not a fault is armed.
    pub fn commands_sent(&self, number: u32) -> u64 {
        self.commands
            .get(number as usize)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// A register write by the driver (before it reaches the device).
    pub fn on_reg_write(&self, qt: &dyn Bus, reg: Reg, value: u64) {
        let Reg::Mem(a) = reg else { return };
        let mut s = lock(&self.state);
        let Some(bar0) = s.bar0 else { return };
        let Some(off) = a.checked_sub(bar0) else {
            return;
        };
        let value = value as u32;
        match off {
            REG_COMMAND => {
                if let Some(c) = self.commands.get(value as usize) {
                    c.fetch_add(1, Ordering::AcqRel);
                }
                s.cmd = Some(value);
                s.last_cmd = Some(value);
                s.data.clear();
                if value == CMD_ADAPTER_RESET {
                    // QEMU completes what it had with BUSRESET into the
                    // old ring, then forgets the rings: so does the layer
                    // (withheld completions are lost with them).
                    forget_rings(&mut s);
                    s.stats.adapter_resets += 1;
                    s.cmd = None;
                }
                if value == CMD_RESET_BUS {
                    s.stats.bus_resets += 1;
                }
            }
            REG_COMMAND_DATA => {
                let Some(cmd) = s.cmd else { return };
                s.data.push(value);
                let n = s.data.len();
                match (cmd, n) {
                    (CMD_SETUP_RINGS, SETUP_RINGS_DWORDS) => {
                        setup_rings(&mut s);
                        s.cmd = None;
                    }
                    (CMD_SETUP_MSG_RING, SETUP_MSG_RING_DWORDS) => {
                        setup_msg_ring(&mut s);
                        s.cmd = None;
                    }
                    (CMD_ABORT_CMD, ABORT_CMD_DWORDS) => {
                        let ctx = dword_u64(&s.data, 0);
                        s.stats.abort_cmds += 1;
                        s.cmd = None;
                        let mut a = lock(&self.aborts);
                        a.push_back(ctx);
                        if a.len() > 16 {
                            a.pop_front();
                        }
                    }
                    (CMD_RESET_DEVICE, RESET_DEVICE_DWORDS) => {
                        s.stats.device_resets += 1;
                        s.cmd = None;
                    }
                    (_, n) if n > SETUP_RINGS_DWORDS => s.cmd = None,
                    _ => {}
                }
            }
            REG_KICK_RW_IO | REG_KICK_NON_RW_IO if self.armed.load(Ordering::Acquire) => {
                track_requests(&mut s, qt);
            }
            _ => {}
        }
    }

    /// A register read by the driver; returns what it sees: a failed
    /// COMMAND_STATUS while [`Fault::CommandFails`] names the last
    /// command written.
    pub fn on_reg_read(&self, reg: Reg, value: u64) -> u64 {
        let Reg::Mem(a) = reg else { return value };
        if !self.armed.load(Ordering::Acquire) {
            return value;
        }
        let mut s = lock(&self.state);
        let (Some(bar0), Some(cmd)) = (s.bar0, s.last_cmd) else {
            return value;
        };
        if a.checked_sub(bar0) != Some(REG_COMMAND_STATUS)
            || !s.faults.contains(&Fault::CommandFails(cmd))
        {
            return value;
        }
        s.stats.commands_failed += 1;
        u64::from(u32::MAX)
    }

    /// Guest memory the driver is about to see: rewrites its view of the
    /// producer indices and of the completion and message rings.
    pub fn filter_read(&self, qt: &dyn Bus, gpa: u64, buf: &mut [u8]) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let mut s = lock(&self.state);
        let Some(r) = s.rings.clone() else { return };
        let len = buf.len();
        let log2: Vec<(u64, u32)> = s
            .faults
            .iter()
            .filter_map(|f| match f {
                Fault::RingLog2 { offset, value } => Some((*offset, *value)),
                _ => None,
            })
            .collect();
        for (offset, value) in log2 {
            if matches!(offset, RS_REQ_LOG2 | RS_CMP_LOG2 | RS_MSG_LOG2)
                && overlaps(gpa, len, r.state + offset, 4)
            {
                patch(buf, gpa, r.state + offset, &value.to_le_bytes());
                s.stats.config_reads += 1;
            }
        }
        if overlaps(gpa, len, r.state + RS_CMP_PROD, 4) {
            advance_cmp(&mut s, qt, &r);
            if let Some(v) = &s.cmp {
                patch(buf, gpa, r.state + RS_CMP_PROD, &v.visible.to_le_bytes());
            }
        }
        if !r.msg.is_empty() && overlaps(gpa, len, r.state + RS_MSG_PROD, 4) {
            advance_msg(&mut s, qt, &r);
            if let Some(v) = &s.msg {
                patch(buf, gpa, r.state + RS_MSG_PROD, &v.visible.to_le_bytes());
            }
        }
        if let Some(v) = &s.cmp {
            for (i, &page) in r.cmp.iter().enumerate() {
                if !overlaps(gpa, len, page, PAGE) {
                    continue;
                }
                let first = i * CMP_PER_PAGE;
                let bytes: Vec<u8> = v.entries[first..first + CMP_PER_PAGE]
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                patch(buf, gpa, page, &bytes);
            }
        }
        if let Some(v) = &s.msg {
            for (i, &page) in r.msg.iter().enumerate() {
                if !overlaps(gpa, len, page, PAGE) {
                    continue;
                }
                let first = i * MSG_PER_PAGE;
                let bytes: Vec<u8> = v.entries[first..first + MSG_PER_PAGE]
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                patch(buf, gpa, page, &bytes);
            }
        }
    }

    /// Driver memory about to reach the device: its consumer indices, in
    /// its own numbering, become the device's.
    pub fn filter_write(&self, gpa: u64, data: &[u8]) -> Option<Vec<u8>> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let s = lock(&self.state);
        let r = s.rings.as_ref()?;
        let mut out: Option<Vec<u8>> = None;
        let fields = [
            (RS_CMP_CONS, s.cmp.as_ref().map(|v| v.offset())),
            (RS_MSG_CONS, s.msg.as_ref().map(|v| v.offset())),
        ];
        for (field, offset) in fields {
            let (at, Some(offset)) = (r.state + field, offset) else {
                continue;
            };
            if offset == 0 || !(gpa <= at && gpa + data.len() as u64 >= at + 4) {
                continue;
            }
            let i = (at - gpa) as usize;
            let b = out.get_or_insert_with(|| data.to_vec());
            let driver = u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            b[i..i + 4].copy_from_slice(&driver.wrapping_sub(offset).to_le_bytes());
        }
        out
    }
}

fn forget_rings(s: &mut State) {
    s.rings = None;
    s.cmp = None;
    s.msg = None;
    s.req_seen = 0;
    s.cdbs.clear();
    s.in_flight.clear();
    s.completed_at.clear();
}

/// SETUP_RINGS' payload is complete: the rings as QEMU will take them
/// (page counts 1..=32, else it refuses: Q `pvscsi_on_cmd_setup_rings`).
fn setup_rings(s: &mut State) {
    let d = &s.data;
    let (req_pages, cmp_pages) = (d[0] as usize, d[1] as usize);
    if !(1..=32).contains(&req_pages) || !(1..=32).contains(&cmp_pages) {
        return;
    }
    let ppn = |i: usize| dword_u64(d, i) * PAGE;
    let rings = RingsInfo {
        state: ppn(2),
        req: (0..req_pages).map(|i| ppn(4 + 2 * i)).collect(),
        cmp: (0..cmp_pages).map(|i| ppn(68 + 2 * i)).collect(),
        msg: Vec::new(),
    };
    forget_rings(s);
    // The views start at the driver's first look after QEMU zeroed the
    // indices (the command runs after this write).
    s.rings = Some(rings);
}

/// SETUP_MSG_RING's payload is complete (pages 1..=16, after SETUP_RINGS;
/// Q `pvscsi_on_cmd_setup_msg_ring`, `pvscsi_ring_init_msg`).
fn setup_msg_ring(s: &mut State) {
    let pages = s.data[0] as usize;
    if !(1..=16).contains(&pages) {
        return;
    }
    let msg: Vec<u64> = (0..pages)
        .map(|i| dword_u64(&s.data, 2 + 2 * i) * PAGE)
        .collect();
    if let Some(r) = s.rings.as_mut() {
        r.msg = msg;
    }
    s.msg = None;
}

/// Reads the request descriptors published since the last look: which
/// context carries which CDB.
fn track_requests(s: &mut State, qt: &dyn Bus) {
    let Some(r) = s.rings.clone() else { return };
    let Some(prod) = read_u32(qt, r.state + RS_REQ_PROD) else {
        return;
    };
    let n = prod.wrapping_sub(s.req_seen);
    if n > r.req_entries() {
        // Not a producer index the driver can have written: resync.
        s.req_seen = prod;
        return;
    }
    for i in 0..n {
        let Some(addr) = r.req_addr(s.req_seen.wrapping_add(i)) else {
            break;
        };
        let mut d = [0u8; REQ_DESC as usize];
        if qt.read_mem(addr, &mut d).is_err() {
            break;
        }
        let context = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
        let cdb_len = usize::from(d[56]).min(16);
        s.cdbs.insert(context, d[40..40 + cdb_len].to_vec());
        s.in_flight.insert(context);
    }
    s.req_seen = prod;
}

/// Starts the views that are not there yet, identical to the device's.
fn start_views(s: &mut State, qt: &dyn Bus) {
    let Some(r) = s.rings.clone() else { return };
    if s.cmp.is_none()
        && let Some(prod) = read_u32(qt, r.state + RS_CMP_PROD)
    {
        s.cmp = view_of(qt, &r.cmp, prod);
    }
    if s.msg.is_none()
        && !r.msg.is_empty()
        && let Some(prod) = read_u32(qt, r.state + RS_MSG_PROD)
    {
        s.msg = view_of(qt, &r.msg, prod);
    }
}

/// A view of the ring in `pages` of `N`-byte entries as the device left
/// it, producer index `prod`; None if guest memory cannot be read.
fn view_of<const N: usize>(qt: &dyn Bus, pages: &[u64], prod: u32) -> Option<View<N>> {
    let mut entries = Vec::with_capacity(pages.len() * PAGE as usize / N);
    for &page in pages {
        let mut b = vec![0u8; PAGE as usize];
        qt.read_mem(page, &mut b).ok()?;
        entries.extend(
            b.chunks(N)
                .map(|c| <[u8; N]>::try_from(c).unwrap_or([0; N])),
        );
    }
    Some(View {
        device: prod,
        visible: prod,
        entries,
        withheld: Vec::new(),
    })
}

/// A bogus context of `kind` for a completion of `real` (None: none fits
/// now).
fn bogus_context(s: &State, r: &RingsInfo, kind: BogusContext, real: u64) -> Option<u64> {
    let entries = u64::from(r.req_entries());
    match kind {
        BogusContext::Zero => Some(0),
        BogusContext::OutOfRange => Some(entries + 1),
        BogusContext::Above32Bits => Some(real | 1 << 32),
        BogusContext::NeverIssued => (1..=entries).rev().find(|c| !s.cdbs.contains_key(c)),
        BogusContext::Stale => {
            // Not one the driver still waits for: in the device, or
            // completed by it and withheld. And the one completed longest
            // ago: the driver reuses its most recently freed contexts
            // first (src/pvscsi/ring.rs keeps a LIFO free list), and one
            // it has just reused and written into the request ring, but
            // not yet published, looks stale here while the driver
            // already has it outstanding: naming it would be a completion
            // for a request the device cannot have seen, which the driver
            // rightly drops as impossible, or, when more completions then
            // wait than requests are published, takes for a runaway
            // index and resets the device (the rare CMD_RESET seen).
            let withheld: Vec<u64> = s.cmp.as_ref().map_or(Vec::new(), |v| {
                v.withheld
                    .iter()
                    .map(|e| u64::from_le_bytes(e[0..8].try_into().unwrap_or_default()))
                    .collect()
            });
            s.cdbs
                .keys()
                .copied()
                .filter(|c| {
                    *c != real
                        && *c != 0
                        && *c <= entries
                        && !s.in_flight.contains(c)
                        && !withheld.contains(c)
                })
                .min_by_key(|c| s.completed_at.get(c).copied().unwrap_or(0))
        }
        BogusContext::Value(v) => Some(v),
    }
}

/// Takes the device's new completions into the driver's view, applying
/// the armed faults.
fn advance_cmp(s: &mut State, qt: &dyn Bus, r: &RingsInfo) {
    start_views(s, qt);
    let Some(device_prod) = read_u32(qt, r.state + RS_CMP_PROD) else {
        return;
    };
    let Some(v) = s.cmp.as_ref() else { return };
    let pending = device_prod.wrapping_sub(v.device);
    if pending == 0 {
        return;
    }
    if pending > r.cmp_entries() {
        return; // QEMU never does this; nothing sensible to follow
    }
    // Requests published since the last doorbell the layer saw (the
    // driver publishes under the lock its reaping holds).
    track_requests(s, qt);
    for _ in 0..pending {
        let Some(v) = s.cmp.as_mut() else { return };
        let Some(addr) = r.cmp_addr(v.device) else {
            return;
        };
        let mut e = [0u8; CMP_DESC];
        if qt.read_mem(addr, &mut e).is_err() {
            return;
        }
        v.device = v.device.wrapping_add(1);
        let context = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
        s.in_flight.remove(&context);
        s.completions += 1;
        let at = s.completions;
        s.completed_at.insert(context, at);
        let cdb = s.cdbs.get(&context).cloned().unwrap_or_default();
        let mut withhold = false;
        let mut duplicate = false;
        let mut bogus: Vec<u64> = Vec::new();
        let mut runaway = 0u32;
        // One fault of each kind per completion.
        let mut applied: Vec<std::mem::Discriminant<Fault>> = Vec::new();
        let mut i = 0;
        while i < s.faults.len() {
            let kind = std::mem::discriminant(&s.faults[i]);
            if applied.contains(&kind) {
                i += 1;
                continue;
            }
            let used = match s.faults[i].clone() {
                Fault::Withhold(m) if m.matches(&cdb) => {
                    withhold = true;
                    s.stats.withheld += 1;
                    true
                }
                Fault::Duplicate(m) if m.matches(&cdb) => {
                    duplicate = true;
                    s.stats.duplicated += 1;
                    true
                }
                Fault::BogusContext(m, k) if m.matches(&cdb) => {
                    match bogus_context(s, r, k, context) {
                        Some(c) => {
                            bogus.push(c);
                            s.stats.bogus_ids += 1;
                            true
                        }
                        None => false,
                    }
                }
                Fault::Completion(m, edit) if m.matches(&cdb) => {
                    edit.apply(&mut e);
                    s.stats.completion_edits += 1;
                    true
                }
                Fault::CmpProdRunaway(m, n) if m.matches(&cdb) => {
                    runaway = n;
                    s.stats.runaways += 1;
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
        let Some(v) = s.cmp.as_mut() else { return };
        for c in bogus {
            // A plausible completion (good status, nothing moved) naming
            // the bogus context.
            let mut b = [0u8; CMP_DESC];
            b[0..8].copy_from_slice(&c.to_le_bytes());
            v.push(b);
        }
        if withhold {
            v.withheld.push(e);
        } else {
            v.push(e);
            if duplicate {
                v.push(e);
            }
        }
        // Entries the device never wrote: the driver's ring slots keep
        // what they held.
        v.visible = v.visible.wrapping_add(runaway);
    }
}

/// Takes the device's new messages into the driver's view, applying the
/// armed faults.
fn advance_msg(s: &mut State, qt: &dyn Bus, r: &RingsInfo) {
    start_views(s, qt);
    let Some(device_prod) = read_u32(qt, r.state + RS_MSG_PROD) else {
        return;
    };
    let Some(v) = s.msg.as_ref() else { return };
    let pending = device_prod.wrapping_sub(v.device);
    if pending == 0 || pending > r.msg_entries() {
        return;
    }
    for _ in 0..pending {
        let Some(v) = s.msg.as_mut() else { return };
        let Some(addr) = r.msg_addr(v.device) else {
            return;
        };
        let mut m = [0u8; MSG_DESC];
        if qt.read_mem(addr, &mut m).is_err() {
            return;
        }
        v.device = v.device.wrapping_add(1);
        let mut extra: Vec<[u8; MSG_DESC]> = Vec::new();
        let mut jump = 0u32;
        let mut applied: Vec<std::mem::Discriminant<Fault>> = Vec::new();
        let mut i = 0;
        while i < s.faults.len() {
            let kind = std::mem::discriminant(&s.faults[i]);
            if applied.contains(&kind) {
                i += 1;
                continue;
            }
            let used = match &s.faults[i] {
                Fault::Message(edit) => {
                    edit.apply(&mut m);
                    s.stats.events += 1;
                    true
                }
                Fault::ExtraMessages(edits) => {
                    for edit in edits {
                        let mut x = m;
                        edit.apply(&mut x);
                        extra.push(x);
                    }
                    s.stats.messages_injected += edits.len() as u64;
                    true
                }
                Fault::MsgProdOverflow(n) => {
                    jump = *n;
                    s.stats.msg_overflows += 1;
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
        let Some(v) = s.msg.as_mut() else { return };
        for x in extra {
            v.push(x);
        }
        v.push(m);
        v.visible = v.visible.wrapping_add(jump);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_land_at_the_header_offsets() {
        let mut e = [0u8; CMP_DESC];
        CmpEdit {
            host_status: Some(0x1234),
            scsi_status: Some(0x0102),
            data_len: Some(0x0807_0605_0403_0201),
            sense_len: Some(0xaabb_ccdd),
        }
        .apply(&mut e);
        assert_eq!(&e[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&e[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(&e[20..24], &[0x34, 0x12, 0x02, 0x01]);
        let mut m = [0u8; MSG_DESC];
        MsgEdit::garbage().apply(&mut m);
        assert_eq!(&m[0..4], &0x1234_5678u32.to_le_bytes());
        assert_eq!(&m[12..20], &[0xee; 8]);
    }

    #[test]
    fn ring_addresses_follow_the_page_lists() {
        let r = RingsInfo {
            state: 0x1000,
            req: vec![0x10_000, 0x30_000],
            cmp: vec![0x50_000],
            msg: vec![0x70_000],
        };
        assert_eq!(r.req_entries(), 64);
        assert_eq!(r.req_addr(33), Some(0x30_000 + 128));
        assert_eq!(r.req_addr(64 + 1), Some(0x10_000 + 128), "wraps");
        assert_eq!(r.cmp_addr(129), Some(0x50_000 + 32));
        assert_eq!(r.msg_addr(33), Some(0x70_000 + 128));
    }

    #[test]
    fn patch_copies_only_the_overlap() {
        let mut buf = [0u8; 8];
        patch(&mut buf, 100, 104, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(buf, [0, 0, 0, 0, 1, 2, 3, 4]);
        assert!(overlaps(100, 8, 107, 4) && !overlaps(100, 8, 108, 4));
    }
}
