//! The PCI function of the in-process device: configuration space with
//! BARs and capabilities, the MSI-X table, the virtio-pci modern regions
//! (virtio 1.2 §4.1.4) and the virtqueues of a virtio-scsi device (§5.6).

use super::scsi::{self, RamDisk};
use super::{
    CAP_COMMON, CAP_DEVICE, CAP_ISR, CAP_MSIX, CAP_NOTIFY, COMMON_AT, DEVICE_AT, ISR_AT, MSIX_BAR,
    MSIX_BAR_SIZE, MSIX_PBA, MemoryConfig, NOTIFY_AT, NOTIFY_MULTIPLIER, VIRTIO_BAR,
    VIRTIO_BAR_SIZE,
};

/// Feature bits offered (§6): VIRTIO_F_VERSION_1, VIRTIO_F_RING_EVENT_IDX,
/// VIRTIO_F_RING_INDIRECT_DESC.
const FEATURE_VERSION_1: u64 = 1 << 32;
const FEATURE_EVENT_IDX: u64 = 1 << 29;
const FEATURE_INDIRECT: u64 = 1 << 28;
const OFFERED: u64 = FEATURE_VERSION_1 | FEATURE_EVENT_IDX | FEATURE_INDIRECT;

/// Device status bits (§2.1).
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;

/// virtio_scsi_config defaults the driver may change (§5.6.4).
const DEFAULT_SENSE_SIZE: u32 = 96;
const DEFAULT_CDB_SIZE: u32 = 32;

/// `VIRTIO_MSI_NO_VECTOR` (§4.1.5.1.2).
const NO_VECTOR: u16 = 0xffff;

/// Descriptor flags (§2.7.5).
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT` (§2.7.7).
const AVAIL_NO_INTERRUPT: u16 = 1;

/// virtio-scsi queues (§5.6.2).
const CONTROL_QUEUE: u16 = 0;
const EVENT_QUEUE: u16 = 1;

/// virtio_scsi_req_cmd: the CDB follows lun[8], id, task_attr, prio, crn;
/// virtio_scsi_resp_cmd: the sense follows sense_len, resid,
/// status_qualifier, status, response (§5.6.6.1). Written here from the
/// specification, not taken from the driver under test.
const REQ_CDB: usize = 19;
const RESP_SENSE: usize = 12;

/// virtio-scsi response codes (§5.6.6.1).
const S_OK: u8 = 0;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;

/// Configuration space and BARs.
pub(super) struct PciState {
    cfg: [u8; 256],
    bars: [u32; 6],
    /// CONFIG_ADDRESS as last written.
    pub(super) address: u32,
}

impl PciState {
    fn new(c: &MemoryConfig) -> PciState {
        let mut cfg = [0u8; 256];
        let put16 = |cfg: &mut [u8; 256], at: usize, v: u16| {
            cfg[at..at + 2].copy_from_slice(&v.to_le_bytes())
        };
        let put32 = |cfg: &mut [u8; 256], at: usize, v: u32| {
            cfg[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        // A modern virtio-scsi function (§4.1.2.1: 0x1040 + device ID 8).
        put16(&mut cfg, 0x00, 0x1af4);
        put16(&mut cfg, 0x02, 0x1048);
        put16(&mut cfg, 0x06, 0x0010); // capabilities list
        cfg[0x08] = 1; // revision 1: modern
        cfg[0x0b] = 0x01; // mass storage
        put16(&mut cfg, 0x2c, 0x1af4);
        put16(&mut cfg, 0x2e, 0x1100);
        cfg[0x34] = CAP_MSIX as u8;
        // MSI-X: table in BAR 1 at 0, PBA at 0x800.
        cfg[CAP_MSIX] = 0x11;
        cfg[CAP_MSIX + 1] = CAP_COMMON as u8;
        put16(&mut cfg, CAP_MSIX + 2, (c.msix_vectors - 1) as u16);
        put32(&mut cfg, CAP_MSIX + 4, MSIX_BAR as u32);
        put32(&mut cfg, CAP_MSIX + 8, MSIX_PBA as u32 | MSIX_BAR as u32);
        // virtio_pci_cap (§4.1.4): vndr, next, len, cfg_type, bar, id,
        // padding, offset, length (+ notify_off_multiplier).
        let caps = [
            (CAP_COMMON, CAP_ISR, 1u8, COMMON_AT),
            (CAP_ISR, CAP_DEVICE, 3, ISR_AT),
            (CAP_DEVICE, CAP_NOTIFY, 4, DEVICE_AT),
            (CAP_NOTIFY, 0, 2, NOTIFY_AT),
        ];
        for (at, next, kind, offset) in caps {
            cfg[at] = 0x09;
            cfg[at + 1] = next as u8;
            cfg[at + 2] = if kind == 2 { 20 } else { 16 };
            cfg[at + 3] = kind;
            cfg[at + 4] = VIRTIO_BAR as u8;
            put32(&mut cfg, at + 8, offset as u32);
            put32(&mut cfg, at + 12, 0x1000);
            if kind == 2 {
                put32(&mut cfg, at + 16, NOTIFY_MULTIPLIER);
            }
        }
        PciState {
            cfg,
            bars: [0; 6],
            address: 0,
        }
    }

    /// The BAR register `i` as the device presents it (size mask applied,
    /// type bits set).
    fn bar_reg(&self, i: usize) -> u32 {
        match i {
            MSIX_BAR => self.bars[i] & !(MSIX_BAR_SIZE as u32 - 1),
            // 64-bit (bits 2:1 = 10), prefetchable, as QEMU's virtio BAR.
            VIRTIO_BAR => (self.bars[i] & !(VIRTIO_BAR_SIZE as u32 - 1)) | 0xc,
            5 => self.bars[5],
            _ => 0,
        }
    }

    pub(super) fn read8(&self, off: usize) -> u8 {
        match off {
            0x10..0x28 => (self.bar_reg((off - 0x10) / 4) >> (8 * (off % 4))) as u8,
            0..256 => self.cfg[off],
            _ => 0xff,
        }
    }

    pub(super) fn write8(&mut self, off: usize, v: u8) {
        match off {
            // Command: I/O, memory, bus master, INTx disable.
            0x04 => self.cfg[off] = v & 0x07,
            0x05 => self.cfg[off] = v & 0x04,
            0x10..0x28 => {
                let i = (off - 0x10) / 4;
                let shift = 8 * (off % 4);
                self.bars[i] = (self.bars[i] & !(0xff << shift)) | (u32::from(v) << shift);
            }
            0x3c => self.cfg[off] = v,
            // MSI-X message control: enable (bit 15), function mask (14).
            x if x == CAP_MSIX + 3 => self.cfg[off] = v & 0xc0,
            _ => {}
        }
    }

    fn memory_enabled(&self) -> bool {
        self.cfg[0x04] & 0x02 != 0
    }

    fn bar_base(&self, i: usize) -> u64 {
        let low = u64::from(self.bar_reg(i) & !0xf);
        if i == VIRTIO_BAR {
            low | (u64::from(self.bars[5]) << 32)
        } else {
            low
        }
    }

    /// The offset of `[a, a+size)` inside BAR `i`, if it is there.
    pub(super) fn bar_offset(&self, i: usize, a: u64, size: usize) -> Option<u64> {
        let len = if i == MSIX_BAR {
            MSIX_BAR_SIZE
        } else {
            VIRTIO_BAR_SIZE
        };
        let base = self.bar_base(i);
        if !self.memory_enabled() || base == 0 {
            return None;
        }
        let off = a.checked_sub(base)?;
        (off + size as u64 <= len).then_some(off)
    }

    fn msix_control(&self) -> u8 {
        self.cfg[CAP_MSIX + 3]
    }
}

/// One virtqueue (§2.7).
#[derive(Clone, Debug)]
struct Queue {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    last_avail: u16,
    used_idx: u16,
    /// The used index at the last notification decision, and whether it
    /// means anything yet (QEMU's `signalled_used`/`signalled_used_valid`,
    /// hw/virtio/virtio.c: cleared at reset and when the used index has
    /// run more than 2^15 past it, so that the next decision notifies).
    signalled_used: u16,
    signalled_used_valid: bool,
    /// Requests executed whose used elements are not published yet (the
    /// asynchronous mode): (head, bytes written), oldest first.
    held: std::collections::VecDeque<(u16, u32)>,
}

impl Queue {
    fn new(size: u16) -> Queue {
        Queue {
            size,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
            last_avail: 0,
            used_idx: 0,
            signalled_used: 0,
            signalled_used_valid: false,
            held: std::collections::VecDeque::new(),
        }
    }

    /// Where the driver's `used_event` lives (§2.7.7.2: after the
    /// available ring's `size` entries).
    fn used_event_at(&self) -> u64 {
        self.driver + 4 + 2 * u64::from(self.size)
    }
}

/// When the device puts what it executed on the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Completions {
    /// Inside the doorbell write that made the request available, before
    /// the write returns (the default; the driver never sees a completion
    /// land while it runs).
    #[default]
    Inline,
    /// Asynchronously, as QEMU's I/O completes on its own threads: see
    /// [`AsyncCompletions`]. Request queues only; the control queue stays
    /// inline (the driver polls it).
    Async(AsyncCompletions),
}

/// The asynchronous completion mode: a doorbell only executes the request
/// (data moves at once); its used element is published later, by the
/// device's own thread or, deterministically, inside the driver's re-arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncCompletions {
    /// How often the device thread publishes.
    pub tick: std::time::Duration,
    /// How many held completions (oldest first) the thread publishes per
    /// queue and tick.
    pub per_tick: u16,
    /// How many held completions land, each with its notification
    /// decision, just before a driver write of the queue's `used_event`
    /// (without EVENT_IDX: the available ring's `flags`) reaches memory:
    /// between the driver's last read of the used index and its re-arm,
    /// the window of virtio 1.2 §2.7.10 that the driver must close by
    /// re-reading the index after the write.
    pub in_rearm_window: u16,
    /// False: the device never signals a request queue's vector (a lost
    /// MSI-X message, forever); only the driver's own polling finds the
    /// completions.
    pub signal: bool,
}

impl AsyncCompletions {
    /// Completions keep landing in every re-arm window: one per window,
    /// one per queue every 2 ms from the thread, interrupts as QEMU sends
    /// them.
    pub fn racing_rearm() -> AsyncCompletions {
        AsyncCompletions {
            tick: std::time::Duration::from_millis(2),
            per_tick: 1,
            in_rearm_window: 1,
            signal: true,
        }
    }
}

/// What a doorbell caused.
pub(super) struct NotifyOutcome {
    /// Requests completed.
    pub(super) completed: u64,
    /// MSI-X messages to deliver.
    pub(super) messages: Vec<(u64, u32)>,
    /// A malformed ring or chain (the device now needs a reset).
    pub(super) error: Option<String>,
}

/// A disk and where it sits.
struct Lu {
    target: u8,
    lun: u16,
    disk: RamDisk,
}

/// The whole function.
pub(super) struct Device {
    pub(super) pci: PciState,
    msix: Vec<[u32; 4]>,
    msix_pending: Vec<bool>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    queue_select: u16,
    max_queue_size: u16,
    queues: Vec<Queue>,
    isr: u8,
    /// virtio_scsi_config (§5.6.4), little-endian.
    config: [u8; 36],
    lus: Vec<Lu>,
    /// When completions are published.
    pub(super) completions: Completions,
}

impl Device {
    pub(super) fn new(c: &MemoryConfig) -> Device {
        let mut config = [0u8; 36];
        let mut put32 = |at: usize, v: u32| config[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(0, c.num_queues);
        put32(4, u32::from(c.queue_size) - 2); // seg_max
        put32(8, 0xffff); // max_sectors
        put32(12, 128); // cmd_per_lun
        put32(16, 16); // event_info_size
        put32(20, DEFAULT_SENSE_SIZE);
        put32(24, DEFAULT_CDB_SIZE);
        config[30..32].copy_from_slice(&255u16.to_le_bytes()); // max_target
        config[32..36].copy_from_slice(&16383u32.to_le_bytes()); // max_lun
        let n = c.msix_vectors as usize;
        Device {
            pci: PciState::new(c),
            // Entries start masked (PCI 3.0 §6.8.2.9).
            msix: vec![[0, 0, 0, 1]; n],
            msix_pending: vec![false; n],
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            queue_select: 0,
            max_queue_size: c.queue_size,
            queues: vec![Queue::new(c.queue_size); c.num_queues as usize + 2],
            isr: 0,
            config,
            lus: c
                .disks
                .iter()
                .map(|(target, lun, disk)| Lu {
                    target: *target,
                    lun: *lun,
                    disk: disk.clone(),
                })
                .collect(),
            completions: Completions::Inline,
        }
    }

    /// `v`, or NO_VECTOR if the device has no such vector: what the
    /// driver reads back to learn it was refused (§4.1.5.1.2).
    fn usable_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        let size = self.max_queue_size;
        self.queues.iter_mut().for_each(|q| *q = Queue::new(size));
        self.isr = 0;
        // sense_size and cdb_size return to their defaults (§5.6.4).
        self.config[20..24].copy_from_slice(&DEFAULT_SENSE_SIZE.to_le_bytes());
        self.config[24..28].copy_from_slice(&DEFAULT_CDB_SIZE.to_le_bytes());
    }

    // ---- MSI-X ---------------------------------------------------------

    pub(super) fn msix_read(&self, off: u64, size: usize) -> u64 {
        let word = |o: u64| -> u64 {
            let (i, w) = ((o / 16) as usize, ((o % 16) / 4) as usize);
            if let Some(e) = self.msix.get(i) {
                u64::from(e[w])
            } else if o >= MSIX_PBA {
                let bit0 = ((o - MSIX_PBA) * 8) as usize;
                (0..32).fold(0u64, |v, b| {
                    v | (u64::from(self.msix_pending.get(bit0 + b).copied().unwrap_or(false)) << b)
                })
            } else {
                0
            }
        };
        let aligned = off & !3;
        let v = word(aligned) | (word(aligned + 4) << 32);
        let v = v >> (8 * (off - aligned));
        v & super::all_ones(size)
    }

    pub(super) fn msix_write(&mut self, off: u64, size: usize, v: u64) {
        let (i, w) = ((off / 16) as usize, ((off % 16) / 4) as usize);
        let Some(e) = self.msix.get_mut(i) else {
            return; // the PBA is read-only
        };
        match size {
            4 if off.is_multiple_of(4) => e[w] = v as u32,
            8 if off.is_multiple_of(8) => {
                e[w] = v as u32;
                e[w + 1] = (v >> 32) as u32;
            }
            _ => {}
        }
        e[3] &= 1;
    }

    fn msix_masked(&self, v: usize) -> bool {
        self.pci.msix_control() & 0x40 != 0 || self.msix.get(v).is_none_or(|e| e[3] & 1 != 0)
    }

    /// Signals `vector`: the message to send now, or none (masked: it is
    /// left pending; MSI-X off or no vector: nothing, as there is no INTx).
    fn signal(&mut self, vector: u16) -> Option<(u64, u32)> {
        let v = usize::from(vector);
        if vector == NO_VECTOR || v >= self.msix.len() || self.pci.msix_control() & 0x80 == 0 {
            return None;
        }
        if self.msix_masked(v) {
            self.msix_pending[v] = true;
            return None;
        }
        let e = self.msix[v];
        Some((u64::from(e[0]) | (u64::from(e[1]) << 32), e[2]))
    }

    /// Messages that were pending and are now unmasked.
    pub(super) fn msix_release_pending(&mut self) -> Vec<(u64, u32)> {
        if self.pci.msix_control() & 0x80 == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for v in 0..self.msix.len() {
            if self.msix_pending[v] && !self.msix_masked(v) {
                self.msix_pending[v] = false;
                let e = self.msix[v];
                out.push((u64::from(e[0]) | (u64::from(e[1]) << 32), e[2]));
            }
        }
        out
    }

    // ---- virtio-pci regions ------------------------------------------------

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    pub(super) fn virtio_read(&mut self, off: u64, size: usize) -> u64 {
        match off {
            ISR_AT => {
                // Reading the ISR clears it (§4.1.4.5).
                std::mem::take(&mut self.isr).into()
            }
            _ if (DEVICE_AT..DEVICE_AT + 36).contains(&off) => {
                let at = (off - DEVICE_AT) as usize;
                (0..size).fold(0u64, |v, i| {
                    v | (u64::from(self.config.get(at + i).copied().unwrap_or(0)) << (8 * i))
                })
            }
            _ if off < COMMON_AT + 0x38 => self.common_read(off - COMMON_AT, size),
            _ => 0,
        }
    }

    fn common_read(&mut self, off: u64, size: usize) -> u64 {
        let q = self.queues.get(usize::from(self.queue_select)).cloned();
        let v = match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => OFFERED & 0xffff_ffff,
                1 => OFFERED >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => 0, // config_generation: the configuration never changes
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select), // queue_notify_off
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.driver),
            0x2c => q.map_or(0, |q| q.driver >> 32),
            0x30 => q.map_or(0, |q| q.device),
            0x34 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        v & super::all_ones(size)
    }

    pub(super) fn virtio_write(&mut self, off: u64, size: usize, v: u64) {
        if (DEVICE_AT..DEVICE_AT + 36).contains(&off) {
            // sense_size and cdb_size are the driver's to set (§5.6.4).
            let at = (off - DEVICE_AT) as usize;
            if (at == 20 || at == 24) && size == 4 {
                self.config[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
            return;
        }
        if off >= COMMON_AT + 0x38 {
            return;
        }
        let set_half = |old: u64, high: bool| {
            if size == 8 {
                v
            } else if high {
                (old & 0xffff_ffff) | (v << 32)
            } else {
                (old & !0xffff_ffff) | (v & 0xffff_ffff)
            }
        };
        match off - COMMON_AT {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            0x10 => self.config_vector = self.usable_vector(v as u16),
            0x14 => {
                let s = v as u8;
                if s == 0 {
                    self.reset();
                    return;
                }
                // FEATURES_OK sticks only for a subset of what is offered
                // that includes VERSION_1 (§2.2.2, §6.1).
                let ok = self.driver_features & !OFFERED == 0
                    && self.driver_features & FEATURE_VERSION_1 != 0;
                let s = if ok { s } else { s & !STATUS_FEATURES_OK };
                self.status = s | (self.status & STATUS_NEEDS_RESET);
            }
            0x16 => self.queue_select = v as u16,
            0x18 => {
                let max = self.max_queue_size;
                if let Some(q) = self.queue() {
                    // A power of two no larger than the maximum (§2.7).
                    let n = v as u16;
                    if n.is_power_of_two() && n <= max {
                        q.size = n;
                    }
                }
            }
            0x1a => {
                let vector = self.usable_vector(v as u16);
                if let Some(q) = self.queue() {
                    q.vector = vector;
                }
            }
            0x1c => {
                if let Some(q) = self.queue() {
                    q.enabled = v & 1 != 0;
                }
            }
            o @ (0x20 | 0x24) => {
                if let Some(q) = self.queue() {
                    q.desc = set_half(q.desc, o == 0x24);
                }
            }
            o @ (0x28 | 0x2c) => {
                if let Some(q) = self.queue() {
                    q.driver = set_half(q.driver, o == 0x2c);
                }
            }
            o @ (0x30 | 0x34) => {
                if let Some(q) = self.queue() {
                    q.device = set_half(q.device, o == 0x34);
                }
            }
            _ => {}
        }
    }

    // ---- virtqueues ----------------------------------------------------------

    /// Handles a doorbell of queue `qi`: every available request is
    /// executed and put on the used ring, then an interrupt is sent if the
    /// driver asked for one (§2.7.7, §2.7.10).
    pub(super) fn notify(&mut self, qi: u16, ram: &mut [u8]) -> NotifyOutcome {
        let mut out = NotifyOutcome {
            completed: 0,
            messages: Vec::new(),
            error: None,
        };
        let ready = self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0;
        // The event queue's buffers are held until there is an event, and
        // this device has none.
        if !ready || qi == EVENT_QUEUE {
            return out;
        }
        let Some(q) = self.queues.get(usize::from(qi)).cloned() else {
            return out;
        };
        if !q.enabled {
            return out;
        }
        match self.drain(qi, q, ram) {
            Ok((q, completed)) => {
                out.completed = completed;
                let old_used = self.queues[usize::from(qi)].used_idx;
                self.queues[usize::from(qi)] = q;
                // virtio-scsi completes each request with virtqueue_push
                // and virtio_notify (QEMU hw/scsi/virtio-scsi.c,
                // virtio_scsi_complete_req); a doorbell's batch gets one
                // decision here, which QEMU's rules make equivalent for the
                // driver (the interrupt is sent iff used_event lies in the
                // batch's range or the decision is the first).
                if self.queues[usize::from(qi)].used_idx != old_used {
                    out.messages.extend(self.notification(qi, ram));
                }
            }
            Err(e) => {
                self.status |= STATUS_NEEDS_RESET;
                out.error = Some(format!("queue {qi}: {e}; device needs reset"));
                self.isr |= 2;
                let v = self.config_vector;
                out.messages.extend(self.signal(v));
            }
        }
        out
    }

    fn event_idx(&self) -> bool {
        self.driver_features & FEATURE_EVENT_IDX != 0
    }

    /// Whether the driver asked to be interrupted for what was published
    /// since the last decision: QEMU's virtio_split_should_notify
    /// (hw/virtio/virtio.c) exactly. With EVENT_IDX: the first decision
    /// after a reset always notifies; later ones notify iff `used_event`
    /// lies in [previous decision's used index, used index) mod 2^16
    /// (vring_need_event; virtio 1.2 §2.7.10, §2.7.7.2). Without it,
    /// VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7). (VIRTIO_F_NOTIFY_ON_EMPTY is
    /// legacy-only and not offered.)
    fn should_notify(&mut self, qi: u16, ram: &[u8]) -> bool {
        let event_idx = self.event_idx();
        let q = &mut self.queues[usize::from(qi)];
        if !event_idx {
            return rd16(ram, q.driver).unwrap_or(0) & AVAIL_NO_INTERRUPT == 0;
        }
        let valid = q.signalled_used_valid;
        q.signalled_used_valid = true;
        let old = q.signalled_used;
        let new = q.used_idx;
        q.signalled_used = new;
        let used_event = rd16(ram, q.used_event_at()).unwrap_or(0);
        !valid || new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// The notification decision for queue `qi`, and its message if the
    /// driver asked for one (virtio_notify -> virtio_irq: ISR bit 0, then
    /// the queue's vector).
    fn notification(&mut self, qi: u16, ram: &[u8]) -> Option<(u64, u32)> {
        if !self.should_notify(qi, ram) {
            return None;
        }
        self.isr |= 1;
        let silent =
            matches!(self.completions, Completions::Async(a) if !a.signal) && qi > EVENT_QUEUE;
        if silent {
            return None;
        }
        let vector = self.queues[usize::from(qi)].vector;
        self.signal(vector)
    }

    /// Publishes up to `n` held completions of queue `qi`, each with its
    /// notification decision (as virtio_scsi_complete_req does per
    /// request); the messages to send.
    fn publish_held(&mut self, qi: u16, n: u16, ram: &mut [u8]) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let q = &mut self.queues[usize::from(qi)];
            let Some((head, written)) = q.held.pop_front() else {
                break;
            };
            let slot = u64::from(q.used_idx % q.size);
            let ok = wr32(ram, q.device + 4 + 8 * slot, u32::from(head))
                .and_then(|()| wr32(ram, q.device + 8 + 8 * slot, written));
            let old = q.used_idx;
            let new = old.wrapping_add(1);
            // virtqueue_split_flush: a used index that ran past the last
            // decision's by more than 2^15 invalidates it.
            if flush_invalidates(old, new, q.signalled_used) {
                q.signalled_used_valid = false;
            }
            q.used_idx = new;
            let at = q.device + 2;
            if ok.and_then(|()| wr16(ram, at, new)).is_err() {
                // The ring left RAM under the device: nothing to publish.
                q.held.clear();
                break;
            }
            out.extend(self.notification(qi, ram));
        }
        out
    }

    /// The asynchronous mode's thread tick: publishes up to `per_tick`
    /// held completions of each request queue.
    pub(super) fn tick(&mut self, per_tick: u16, ram: &mut [u8]) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return out;
        }
        for qi in EVENT_QUEUE + 1..self.queues.len() as u16 {
            out.extend(self.publish_held(qi, per_tick, ram));
        }
        out
    }

    /// A driver write of `[a, a+len)` is about to reach RAM: if it covers
    /// a request queue's re-arm field (`used_event` with EVENT_IDX, the
    /// available ring's `flags` without), the asynchronous mode lands
    /// `in_rearm_window` held completions first (the race the driver's
    /// re-check after re-arming exists for). The messages to send; the
    /// number of completions landed.
    pub(super) fn before_driver_write(
        &mut self,
        a: u64,
        len: u64,
        ram: &mut [u8],
    ) -> (Vec<(u64, u32)>, u64) {
        let Completions::Async(mode) = self.completions else {
            return (Vec::new(), 0);
        };
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return (Vec::new(), 0);
        }
        let mut out = Vec::new();
        let mut landed = 0;
        let event_idx = self.event_idx();
        for qi in EVENT_QUEUE + 1..self.queues.len() as u16 {
            let q = &self.queues[usize::from(qi)];
            let at = if event_idx {
                q.used_event_at()
            } else {
                q.driver
            };
            if !q.enabled || q.held.is_empty() || a >= at + 2 || a + len <= at {
                continue;
            }
            let before = q.held.len();
            out.extend(self.publish_held(qi, mode.in_rearm_window, ram));
            landed += (before - self.queues[usize::from(qi)].held.len()) as u64;
        }
        (out, landed)
    }

    /// Executes every available chain; the queue's new state. The driver
    /// cannot add entries meanwhile (its ring writes reach RAM through the
    /// bus, which this doorbell holds), so one look at the index is all.
    fn drain(&mut self, qi: u16, mut q: Queue, ram: &mut [u8]) -> Result<(Queue, u64), String> {
        let size = u64::from(q.size);
        let avail_idx = rd16(ram, q.driver + 2)?;
        let pending = avail_idx.wrapping_sub(q.last_avail);
        if pending > q.size {
            return Err(format!(
                "available index moved by {pending}, more than the {} entries",
                q.size
            ));
        }
        for _ in 0..pending {
            let slot = u64::from(q.last_avail % q.size);
            let head = rd16(ram, q.driver + 4 + 2 * slot)?;
            if head >= q.size {
                return Err(format!(
                    "head descriptor {head} of a {}-entry queue",
                    q.size
                ));
            }
            let written = self.execute(qi, &q, head, ram)?;
            q.last_avail = q.last_avail.wrapping_add(1);
            if matches!(self.completions, Completions::Async(_)) && qi > EVENT_QUEUE {
                q.held.push_back((head, written));
                continue;
            }
            let used_slot = u64::from(q.used_idx % q.size);
            wr32(ram, q.device + 4 + 8 * used_slot, u32::from(head))?;
            wr32(ram, q.device + 8 + 8 * used_slot, written)?;
            let old = q.used_idx;
            q.used_idx = q.used_idx.wrapping_add(1);
            if flush_invalidates(old, q.used_idx, q.signalled_used) {
                q.signalled_used_valid = false;
            }
            wr16(ram, q.device + 2, q.used_idx)?;
        }
        if self.event_idx() {
            // A doorbell is wanted for the next entry (§2.7.10).
            wr16(ram, q.device + 4 + 8 * size, q.last_avail)?;
        }
        Ok((q, u64::from(pending)))
    }

    /// Walks the chain at `head` (§2.7.5.2, §2.7.5.3): its readable and
    /// writable segments, in order.
    fn chain(&self, q: &Queue, head: u16, ram: &[u8]) -> Result<Vec<Segment>, String> {
        let mut segs = Vec::new();
        let mut table = (q.desc, u32::from(q.size));
        let mut indirect = false;
        let mut i = u32::from(head);
        let mut seen = 0u32;
        let mut seen_writable = false;
        loop {
            seen += 1;
            if seen > table.1 {
                return Err("descriptor chain longer than its table (a loop?)".into());
            }
            let at = table.0 + 16 * u64::from(i);
            let addr = rd64(ram, at)?;
            let len = rd32(ram, at + 8)?;
            let flags = rd16(ram, at + 12)?;
            let next = rd16(ram, at + 14)?;
            if flags & DESC_INDIRECT != 0 {
                if indirect || flags & DESC_NEXT != 0 {
                    return Err("indirect descriptor inside an indirect table or chained".into());
                }
                if len == 0 || len % 16 != 0 {
                    return Err(format!("indirect table of {len} bytes"));
                }
                indirect = true;
                table = (addr, len / 16);
                i = 0;
                seen = 0;
                continue;
            }
            let writable = flags & DESC_WRITE != 0;
            if seen_writable && !writable {
                return Err("readable descriptor after a writable one".into());
            }
            seen_writable |= writable;
            if addr
                .checked_add(u64::from(len))
                .is_none_or(|e| e > ram.len() as u64)
            {
                return Err(format!("buffer [{addr:#x}, +{len:#x}) outside guest RAM"));
            }
            segs.push(Segment {
                addr,
                len: len as usize,
                writable,
            });
            if flags & DESC_NEXT == 0 {
                return Ok(segs);
            }
            i = u32::from(next);
            if i >= table.1 {
                return Err(format!(
                    "next descriptor {i} outside a table of {}",
                    table.1
                ));
            }
        }
    }

    /// Executes one request; the bytes written into its buffers.
    fn execute(&mut self, qi: u16, q: &Queue, head: u16, ram: &mut [u8]) -> Result<u32, String> {
        let segs = self.chain(q, head, ram)?;
        let readable: Vec<Segment> = segs.iter().copied().filter(|s| !s.writable).collect();
        let writable: Vec<Segment> = segs.iter().copied().filter(|s| s.writable).collect();
        let out = gather(ram, &readable);
        if qi == CONTROL_QUEUE {
            return Ok(control(&out, &writable, ram));
        }
        let cdb_size = u32::from_le_bytes([
            self.config[24],
            self.config[25],
            self.config[26],
            self.config[27],
        ]) as usize;
        let sense_size = u32::from_le_bytes([
            self.config[20],
            self.config[21],
            self.config[22],
            self.config[23],
        ]) as usize;
        let req_len = REQ_CDB + cdb_size;
        let resp_len = RESP_SENSE + sense_size;
        let room: usize = writable.iter().map(|s| s.len).sum();
        if out.len() < req_len || room < resp_len {
            return Err(format!(
                "request of {} readable / {room} writable bytes, header needs {req_len} / {resp_len}",
                out.len()
            ));
        }
        let lun = &out[0..8];
        // A CDB shorter than the longest command's fields reads as zeros
        // past its end (cdb_size is the driver's to set).
        let mut cdb = out[REQ_CDB..REQ_CDB + cdb_size].to_vec();
        cdb.resize(cdb_size.max(DEFAULT_CDB_SIZE as usize), 0);
        let data_out = &out[req_len..];
        let data_room = room - resp_len;
        let mut resp = vec![0u8; resp_len];
        let mut data_in = Vec::new();
        let target = lun[1];
        let lun_no = (u16::from(lun[2] & 0x3f) << 8) | u16::from(lun[3]);
        let luns: Vec<u16> = self
            .lus
            .iter()
            .filter(|l| l.target == target)
            .map(|l| l.lun)
            .collect();
        if lun[0] != 1 || luns.is_empty() {
            resp[11] = S_BAD_TARGET;
        } else if !data_out.is_empty() && data_room > 0 {
            // Bidirectional commands are not supported.
            resp[11] = S_FAILURE;
        } else {
            let disk = self
                .lus
                .iter_mut()
                .find(|l| l.target == target && l.lun == lun_no)
                .map(|l| &mut l.disk);
            let r = scsi::execute(disk, &luns, &cdb, data_out, data_room);
            let sense_len = r.sense.len().min(sense_size);
            let resid = if data_out.is_empty() {
                data_room - r.data_in.len()
            } else {
                r.out_unused
            };
            resp[0..4].copy_from_slice(&(sense_len as u32).to_le_bytes());
            resp[4..8].copy_from_slice(&(resid as u32).to_le_bytes());
            resp[10] = r.status;
            resp[11] = S_OK;
            resp[12..12 + sense_len].copy_from_slice(&r.sense[..sense_len]);
            data_in = r.data_in;
        }
        scatter(ram, &writable, 0, &resp);
        scatter(ram, &writable, resp_len, &data_in);
        Ok((resp_len + data_in.len()) as u32)
    }
}

/// Whether moving the used index from `old` to `new` makes the last
/// notification decision's index meaningless: QEMU's virtqueue_split_flush
/// test `(int16_t)(new - signalled_used) < (uint16_t)(new - old)`, both
/// sides promoted to int.
fn flush_invalidates(old: u16, new: u16, signalled_used: u16) -> bool {
    i32::from(new.wrapping_sub(signalled_used) as i16) < i32::from(new.wrapping_sub(old))
}

/// [`flush_invalidates`], for the unit tests.
#[cfg(test)]
pub(super) fn flush_invalidates_for_test(old: u16, new: u16, signalled_used: u16) -> bool {
    flush_invalidates(old, new, signalled_used)
}

/// A control request (§5.6.6.2): task management functions all complete
/// (no request is ever outstanding here), asynchronous notification
/// queries and subscriptions report no events.
fn control(req: &[u8], writable: &[Segment], ram: &mut [u8]) -> u32 {
    let kind = req
        .get(0..4)
        .map_or(u32::MAX, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match kind {
        // VIRTIO_SCSI_T_TMF: response FUNCTION COMPLETE.
        0 => scatter(ram, writable, 0, &[0]) as u32,
        // AN_QUERY / AN_SUBSCRIBE: event_actual 0, response OK.
        1 | 2 => scatter(ram, writable, 0, &[0, 0, 0, 0, S_OK]) as u32,
        _ => scatter(ram, writable, 0, &[S_FAILURE]) as u32,
    }
}

/// A buffer of a chain.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: u64,
    len: usize,
    writable: bool,
}

/// The readable segments' bytes, concatenated (checked against RAM by
/// [`Device::chain`]).
fn gather(ram: &[u8], segs: &[Segment]) -> Vec<u8> {
    let mut v = Vec::with_capacity(segs.iter().map(|s| s.len).sum());
    for s in segs {
        v.extend_from_slice(&ram[s.addr as usize..s.addr as usize + s.len]);
    }
    v
}

/// Writes `data` into the writable segments from byte `skip` on; the bytes
/// written.
fn scatter(ram: &mut [u8], segs: &[Segment], mut skip: usize, mut data: &[u8]) -> usize {
    let mut n = 0;
    for s in segs {
        if data.is_empty() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(data.len());
        let at = s.addr as usize + skip;
        ram[at..at + take].copy_from_slice(&data[..take]);
        data = &data[take..];
        n += take;
        skip = 0;
    }
    n
}

fn range(ram: &[u8], a: u64, len: u64) -> Result<std::ops::Range<usize>, String> {
    super::in_ram(ram, a, len).ok_or_else(|| format!("ring access at {a:#x} outside guest RAM"))
}

fn rd16(ram: &[u8], a: u64) -> Result<u16, String> {
    let r = range(ram, a, 2)?;
    Ok(u16::from_le_bytes([ram[r.start], ram[r.start + 1]]))
}

fn rd32(ram: &[u8], a: u64) -> Result<u32, String> {
    let r = range(ram, a, 4)?;
    let mut b = [0u8; 4];
    b.copy_from_slice(&ram[r]);
    Ok(u32::from_le_bytes(b))
}

fn rd64(ram: &[u8], a: u64) -> Result<u64, String> {
    let r = range(ram, a, 8)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(&ram[r]);
    Ok(u64::from_le_bytes(b))
}

fn wr16(ram: &mut [u8], a: u64, v: u16) -> Result<(), String> {
    let r = range(ram, a, 2)?;
    ram[r].copy_from_slice(&v.to_le_bytes());
    Ok(())
}

fn wr32(ram: &mut [u8], a: u64, v: u32) -> Result<(), String> {
    let r = range(ram, a, 4)?;
    ram[r].copy_from_slice(&v.to_le_bytes());
    Ok(())
}
