//! An in-process machine: guest RAM in the test's own memory and a modern
//! virtio-scsi PCI function modelled here, reached through the same
//! [`Bus`] the QEMU machine uses.
//!
//! It exists to measure what the driver itself costs per command (CPU time
//! and instructions): on QEMU every register access is a socket round trip
//! that dwarfs the driver. The device is deliberately simple and fast; it
//! is not a conformance oracle (QEMU's model is, and the test suite runs
//! on it). What it does, it does by the specification: PCI type-1
//! configuration, BAR sizing, MSI-X (PCI Local Bus 3.0 §6.8.2), virtio-pci
//! modern capabilities (virtio 1.2 §4.1.4), split virtqueues with
//! EVENT_IDX and indirect descriptors (§2.7), virtio-scsi requests (§5.6.6)
//! on RAM disks. A notification is handled at once, inside the doorbell
//! write, as QEMU's model does; by default the completions are published
//! there too. [`Completions::Async`] (set with
//! [`MemoryMachine::set_completions`]) publishes them later instead, from
//! a device thread and inside the driver's re-arm of `used_event`, as
//! QEMU's do when its I/O completes on other threads; interrupts follow
//! QEMU's virtio_split_should_notify rules exactly either way.
//!
//! Not modelled: INTx (interrupt pin 0, so the emulated DDI never offers
//! fixed interrupts), MSI, the legacy interface, hot-plug events, unit
//! attentions, faults. A malformed ring or chain puts the device into
//! DEVICE_NEEDS_RESET (§2.1.2) and is recorded in [`MemoryMachine::errors`].

mod scsi;
mod virtio;

use crate::machine::lock;
use rvscsi_qtest::{Bus, Error, Op};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use scsi::RamDisk;
pub use virtio::{AsyncCompletions, Completions};

/// Type-1 configuration mechanism ports.
const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// BAR 1: the MSI-X table (entries of 16 bytes) and, at +0x800, the PBA.
const MSIX_BAR: usize = 1;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_PBA: u64 = 0x800;
/// BAR 4 (64-bit): the virtio regions, 4 KiB each, as QEMU lays them out.
const VIRTIO_BAR: usize = 4;
const VIRTIO_BAR_SIZE: u64 = 0x4000;
const COMMON_AT: u64 = 0x0000;
const ISR_AT: u64 = 0x1000;
const DEVICE_AT: u64 = 0x2000;
const NOTIFY_AT: u64 = 0x3000;
/// Bytes between two queues' doorbells (`notify_off_multiplier`).
const NOTIFY_MULTIPLIER: u32 = 4;

/// Configuration-space offsets of the capabilities.
const CAP_MSIX: usize = 0x40;
const CAP_COMMON: usize = 0x4c;
const CAP_ISR: usize = 0x5c;
const CAP_DEVICE: usize = 0x6c;
const CAP_NOTIFY: usize = 0x7c;

/// What the model is built with.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// Guest RAM in MiB.
    pub ram_mib: u32,
    /// PCI slot of the HBA on bus 0.
    pub slot: u8,
    /// Request queues (`num_queues`).
    pub num_queues: u32,
    /// MSI-X vectors (at least 1).
    pub msix_vectors: u32,
    /// Entries per virtqueue (the most the driver may set).
    pub queue_size: u16,
    /// The disks: (target, LUN, contents).
    pub disks: Vec<(u8, u16, RamDisk)>,
}

/// The device's counters.
#[derive(Debug)]
pub struct DeviceStats {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Completions that landed inside a re-arm window (asynchronous mode):
    /// after the driver's last look at the used index, before its
    /// `used_event` write.
    pub landed_in_rearm_window: AtomicU64,
    /// Doorbell writes per virtqueue (control, event, then the request
    /// queues), for tests that count notifications queue by queue.
    pub doorbells: [AtomicU64; DOORBELLS_COUNTED],
}

/// Virtqueues whose doorbell writes [`DeviceStats::doorbells`] counts
/// (control, event and 64 request queues); later ones are not counted.
pub const DOORBELLS_COUNTED: usize = 66;

impl Default for DeviceStats {
    fn default() -> Self {
        DeviceStats {
            requests: AtomicU64::new(0),
            landed_in_rearm_window: AtomicU64::new(0),
            doorbells: [const { AtomicU64::new(0) }; DOORBELLS_COUNTED],
        }
    }
}

impl DeviceStats {
    /// Doorbell writes of virtqueue `q` so far.
    pub fn doorbell_writes(&self, q: usize) -> u64 {
        self.doorbells
            .get(q)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// The in-process machine.
pub struct MemoryMachine {
    ram: Mutex<Vec<u8>>,
    dev: Mutex<virtio::Device>,
    slot: u8,
    /// Counters.
    pub stats: DeviceStats,
    /// The MSI-X messages it sent to the local APIC's window, per APIC
    /// vector: counted here, at the source, one per message.
    pub messages: Arc<crate::msi::MessageCounts>,
    errors: Mutex<Vec<String>>,
    /// The asynchronous mode's publishing thread.
    completion_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Bumped by every mode change: a thread of an older mode stops.
    generation: AtomicU64,
}

impl std::fmt::Debug for MemoryMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryMachine(slot {})", self.slot)
    }
}

impl MemoryMachine {
    /// Builds the machine; an error names the impossible setting.
    pub fn new(c: MemoryConfig) -> Result<MemoryMachine, String> {
        // The table ends where the PBA starts; the notify region holds a
        // doorbell for every queue, control and event included.
        let most_vectors = (MSIX_PBA / 16) as u32;
        if c.msix_vectors == 0 || c.msix_vectors > most_vectors {
            return Err(format!(
                "the in-memory device needs 1..={most_vectors} MSI-X vectors (it has no INTx), not {}",
                c.msix_vectors
            ));
        }
        let most_queues = 0x1000 / NOTIFY_MULTIPLIER - 2;
        if c.num_queues == 0 || c.num_queues > most_queues {
            return Err(format!(
                "num_queues {} out of 1..={most_queues}",
                c.num_queues
            ));
        }
        if !c.queue_size.is_power_of_two() || c.queue_size > 32768 {
            return Err(format!(
                "queue size {} is not a power of two <= 32768",
                c.queue_size
            ));
        }
        let ram_bytes = usize::try_from(u64::from(c.ram_mib) << 20)
            .map_err(|_| "guest RAM too large".to_string())?;
        Ok(MemoryMachine {
            ram: Mutex::new(vec![0u8; ram_bytes]),
            dev: Mutex::new(virtio::Device::new(&c)),
            slot: c.slot,
            stats: DeviceStats::default(),
            messages: Arc::new(crate::msi::MessageCounts::default()),
            errors: Mutex::new(Vec::new()),
            completion_thread: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
    }

    /// Changes when completions are published (see [`Completions`]).
    /// Completions an asynchronous mode still holds are published at once
    /// when the mode becomes [`Completions::Inline`], and left to the new
    /// mode otherwise. The asynchronous mode's thread stops when the mode
    /// changes again or the machine is dropped.
    pub fn set_completions(self: &Arc<Self>, mode: Completions) {
        let messages = {
            let mut dev = lock(&self.dev);
            dev.completions = mode;
            if mode == Completions::Inline {
                dev.tick(u16::MAX, &mut lock(&self.ram))
            } else {
                Vec::new()
            }
        };
        self.send(&messages);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let old = lock(&self.completion_thread).take();
        if let Some(h) = old {
            let _ = h.join();
        }
        let Completions::Async(a) = mode else {
            return;
        };
        let weak = Arc::downgrade(self);
        let h = std::thread::Builder::new()
            .name("memdev-completions".into())
            .spawn(move || {
                loop {
                    // Sleeps in slices, so that a mode change (which joins
                    // this thread) never waits a whole long tick.
                    let start = std::time::Instant::now();
                    while start.elapsed() < a.tick {
                        let left = a.tick.saturating_sub(start.elapsed());
                        std::thread::sleep(left.min(std::time::Duration::from_millis(1)));
                        let current = weak.upgrade().map(|m| m.generation.load(Ordering::Acquire));
                        if current != Some(generation) {
                            return;
                        }
                    }
                    let Some(m) = weak.upgrade() else { return };
                    if m.generation.load(Ordering::Acquire) != generation {
                        return;
                    }
                    let messages = {
                        let mut dev = lock(&m.dev);
                        let mut ram = lock(&m.ram);
                        dev.tick(a.per_tick, &mut ram)
                    };
                    m.send(&messages);
                }
            })
            .expect("the device's completion thread");
        *lock(&self.completion_thread) = Some(h);
    }

    /// What the device found wrong (malformed rings or chains).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }

    fn error(&self, what: String) {
        eprintln!("rvscsi-emu memdev: {what}");
        lock(&self.errors).push(what);
    }

    fn one(&self, dev: &mut virtio::Device, op: &Op<'_>) -> Result<u64, Error> {
        match *op {
            Op::Outl(CONFIG_ADDRESS, v) => {
                dev.pci.address = v;
                Ok(0)
            }
            Op::Inl(CONFIG_ADDRESS) => Ok(u64::from(dev.pci.address)),
            Op::Inb(p) | Op::Inw(p) | Op::Inl(p) if (CONFIG_DATA..CONFIG_DATA + 4).contains(&p) => {
                let size = op_size(op);
                Ok(self.config_read(dev, usize::from(p - CONFIG_DATA), size))
            }
            Op::Outb(p, _) | Op::Outw(p, _) | Op::Outl(p, _)
                if (CONFIG_DATA..CONFIG_DATA + 4).contains(&p) =>
            {
                let size = op_size(op);
                self.config_write(dev, usize::from(p - CONFIG_DATA), size, op_value(op));
                Ok(0)
            }
            // Nothing else lives in I/O space: reads float high.
            Op::Inb(_) => Ok(0xff),
            Op::Inw(_) => Ok(0xffff),
            Op::Inl(_) => Ok(0xffff_ffff),
            Op::Outb(..) | Op::Outw(..) | Op::Outl(..) => Ok(0),
            Op::Readb(a) | Op::Readw(a) | Op::Readl(a) | Op::Readq(a) => {
                Ok(self.mmio_read(dev, a, op_size(op)))
            }
            Op::Writeb(a, _) | Op::Writew(a, _) | Op::Writel(a, _) | Op::Writeq(a, _) => {
                self.mmio_write(dev, a, op_size(op), op_value(op));
                Ok(0)
            }
            Op::WriteMem(a, data) => {
                // What the device publishes while the driver's write is on
                // its way lands first (asynchronous mode).
                let (messages, landed) = {
                    let mut ram = lock(&self.ram);
                    dev.before_driver_write(a, data.len() as u64, &mut ram)
                };
                self.stats
                    .landed_in_rearm_window
                    .fetch_add(landed, Ordering::Relaxed);
                self.send(&messages);
                self.ram_write(a, data).map(|_| 0)
            }
            Op::Memset(a, len, byte) => {
                let mut ram = lock(&self.ram);
                let r = ram_range(&ram, a, len)?;
                ram[r].fill(byte);
                Ok(0)
            }
        }
    }

    fn ram_write(&self, a: u64, data: &[u8]) -> Result<(), Error> {
        let mut ram = lock(&self.ram);
        let r = ram_range(&ram, a, data.len() as u64)?;
        ram[r].copy_from_slice(data);
        Ok(())
    }

    // ---- PCI configuration space ---------------------------------------

    /// The function addressed by CONFIG_ADDRESS, if it is ours and enabled.
    fn selected(&self, dev: &virtio::Device) -> Option<usize> {
        let a = dev.pci.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let slot = (a >> 11) & 0x1f;
        let func = (a >> 8) & 7;
        (enabled && bus == 0 && slot == u32::from(self.slot) && func == 0)
            .then_some((a & 0xfc) as usize)
    }

    fn config_read(&self, dev: &virtio::Device, byte: usize, size: usize) -> u64 {
        let Some(reg) = self.selected(dev) else {
            return all_ones(size);
        };
        let off = reg + byte;
        let mut v = 0u64;
        for i in 0..size {
            v |= u64::from(dev.pci.read8(off + i)) << (8 * i);
        }
        v
    }

    fn config_write(&self, dev: &mut virtio::Device, byte: usize, size: usize, v: u64) {
        let Some(reg) = self.selected(dev) else {
            return;
        };
        let off = reg + byte;
        for i in 0..size {
            dev.pci.write8(off + i, (v >> (8 * i)) as u8);
        }
        // Unmasking (function or enable change) may release pending messages.
        let pending = dev.msix_release_pending();
        self.send(&pending);
    }

    // ---- memory space ---------------------------------------------------

    fn mmio_read(&self, dev: &mut virtio::Device, a: u64, size: usize) -> u64 {
        if let Some(off) = dev.pci.bar_offset(MSIX_BAR, a, size) {
            return dev.msix_read(off, size);
        }
        if let Some(off) = dev.pci.bar_offset(VIRTIO_BAR, a, size) {
            return dev.virtio_read(off, size);
        }
        let ram = lock(&self.ram);
        match ram_range(&ram, a, size as u64) {
            Ok(r) => ram[r]
                .iter()
                .rev()
                .fold(0u64, |v, b| (v << 8) | u64::from(*b)),
            Err(_) => all_ones(size),
        }
    }

    fn mmio_write(&self, dev: &mut virtio::Device, a: u64, size: usize, v: u64) {
        if let Some(off) = dev.pci.bar_offset(MSIX_BAR, a, size) {
            dev.msix_write(off, size, v);
            let pending = dev.msix_release_pending();
            self.send(&pending);
            return;
        }
        if let Some(off) = dev.pci.bar_offset(VIRTIO_BAR, a, size) {
            if (NOTIFY_AT..NOTIFY_AT + 0x1000).contains(&off) {
                let q = ((off - NOTIFY_AT) / u64::from(NOTIFY_MULTIPLIER)) as u16;
                if let Some(c) = self.stats.doorbells.get(usize::from(q)) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                let mut ram = lock(&self.ram);
                let out = dev.notify(q, &mut ram);
                drop(ram);
                self.stats
                    .requests
                    .fetch_add(out.completed, Ordering::Relaxed);
                if let Some(e) = out.error {
                    self.error(e);
                }
                self.send(&out.messages);
            } else {
                dev.virtio_write(off, size, v);
            }
            return;
        }
        let bytes = v.to_le_bytes();
        let _ = self.ram_write(a, &bytes[..size]);
    }

    /// Delivers MSI-X messages: a DWORD write of the data to the address.
    /// A write into the local APIC's MSI window is an interrupt to the
    /// vector in its data's low byte (Intel SDM vol. 3 §11.11.2), counted;
    /// any other lands in RAM, as a bus-master write does.
    fn send(&self, messages: &[(u64, u32)]) {
        use crate::msi::{MSI_WINDOW, MSI_WINDOW_SIZE};
        for &(addr, data) in messages {
            if (MSI_WINDOW..MSI_WINDOW + MSI_WINDOW_SIZE).contains(&addr) {
                self.messages.record(data as u8);
                continue;
            }
            if self.ram_write(addr, &data.to_le_bytes()).is_err() {
                self.error(format!("MSI-X message to {addr:#x}, outside guest RAM"));
            }
        }
    }
}

impl Bus for MemoryMachine {
    fn batch(&self, ops: &[Op<'_>]) -> Result<Vec<u64>, Error> {
        let mut dev = lock(&self.dev);
        ops.iter().map(|op| self.one(&mut dev, op)).collect()
    }

    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        let ram = lock(&self.ram);
        let r = ram_range(&ram, addr, buf.len() as u64)?;
        buf.copy_from_slice(&ram[r]);
        Ok(())
    }

    fn irq_level(&self, _line: u32) -> bool {
        false
    }

    fn sync_irqs(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Where `[a, a+len)` lies in `ram`, if it does.
fn in_ram(ram: &[u8], a: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let end = a.checked_add(len).filter(|&e| e <= ram.len() as u64)?;
    Some(a as usize..end as usize)
}

fn ram_range(ram: &[u8], a: u64, len: u64) -> Result<std::ops::Range<usize>, Error> {
    in_ram(ram, a, len).ok_or_else(|| {
        Error::Protocol(format!(
            "guest memory access [{a:#x}, +{len:#x}) outside the {} MiB of RAM",
            ram.len() >> 20
        ))
    })
}

/// The mask of a `size`-byte access.
fn all_ones(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    }
}

fn op_size(op: &Op<'_>) -> usize {
    match op {
        Op::Inb(_) | Op::Outb(..) | Op::Readb(_) | Op::Writeb(..) => 1,
        Op::Inw(_) | Op::Outw(..) | Op::Readw(_) | Op::Writew(..) => 2,
        Op::Inl(_) | Op::Outl(..) | Op::Readl(_) | Op::Writel(..) => 4,
        Op::Readq(_) | Op::Writeq(..) => 8,
        Op::WriteMem(..) | Op::Memset(..) => 0,
    }
}

fn op_value(op: &Op<'_>) -> u64 {
    match *op {
        Op::Outb(_, v) | Op::Writeb(_, v) => u64::from(v),
        Op::Outw(_, v) | Op::Writew(_, v) => u64::from(v),
        Op::Outl(_, v) | Op::Writel(_, v) => u64::from(v),
        Op::Writeq(_, v) => v,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvscsi_qtest::{Bdf, Pci};

    fn machine() -> MemoryMachine {
        MemoryMachine::new(MemoryConfig {
            ram_mib: 4,
            slot: 1,
            num_queues: 2,
            msix_vectors: 5,
            queue_size: 64,
            disks: vec![(0, 0, RamDisk::zeroed(2048))],
        })
        .expect("a machine")
    }

    #[test]
    fn pci_probe_and_bar_sizing_follow_the_rules() {
        let m = machine();
        let pci = Pci::new(&m);
        let f = pci
            .probe(Bdf::new(0, 1, 0))
            .expect("probe")
            .expect("the HBA");
        assert_eq!((f.vendor, f.device), (0x1af4, 0x1048));
        assert!(pci.probe(Bdf::new(0, 2, 0)).expect("probe").is_none());
        let bars = pci
            .assign_bars(Bdf::new(0, 1, 0), 0xE000_0000, 0xC000)
            .expect("assign");
        let sizes: Vec<(usize, u64)> = bars.iter().map(|(i, b, _)| (*i, b.size)).collect();
        assert_eq!(sizes, vec![(1, MSIX_BAR_SIZE), (4, VIRTIO_BAR_SIZE)]);
        let caps = pci.capabilities(Bdf::new(0, 1, 0)).expect("caps");
        let ids: Vec<u8> = caps.iter().map(|c| c.1).collect();
        assert_eq!(ids, vec![0x11, 0x09, 0x09, 0x09, 0x09]);
        let ctrl = pci
            .cfg_read16(Bdf::new(0, 1, 0), CAP_MSIX as u8 + 2)
            .expect("ctrl");
        assert_eq!(ctrl & 0x7ff, 4, "table size is N-1");
    }

    /// A driver's side of request queue 0 (virtqueue 2), 8 entries, with
    /// EVENT_IDX, indirect descriptors and MSI-X vector 2 writing 0x55 to
    /// `MAILBOX`.
    struct Driver<'a> {
        m: &'a MemoryMachine,
        common: u64,
        notify: u64,
        msix: u64,
    }

    const DESC: u64 = 0x10000;
    const AVAIL: u64 = 0x11000;
    const USED: u64 = 0x12000;
    const MAILBOX: u64 = 0x20000;
    const QSIZE: u64 = 8;

    impl<'a> Driver<'a> {
        fn up(m: &'a MemoryMachine) -> Driver<'a> {
            let bdf = Bdf::new(0, 1, 0);
            let pci = Pci::new(m);
            let bars = pci.assign_bars(bdf, 0xE000_0000, 0xC000).expect("BARs");
            let bar = |i| bars.iter().find(|b| b.0 == i).expect("BAR").2;
            let (msix, virtio) = (bar(MSIX_BAR), bar(VIRTIO_BAR));
            let d = Driver {
                m,
                common: virtio + COMMON_AT,
                notify: virtio + NOTIFY_AT,
                msix,
            };
            let c = d.common;
            m.writeb(c + 0x14, 1 | 2).expect("ACKNOWLEDGE | DRIVER");
            m.writel(c + 0x08, 1).expect("select");
            m.writel(c + 0x0c, 1).expect("VERSION_1");
            m.writel(c + 0x08, 0).expect("select");
            m.writel(c + 0x0c, (1 << 29) | (1 << 28))
                .expect("EVENT_IDX | INDIRECT");
            m.writeb(c + 0x14, 1 | 2 | 8).expect("FEATURES_OK");
            assert_eq!(m.readb(c + 0x14).expect("status") & 8, 8);
            m.writew(c + 0x16, 2).expect("queue_select");
            m.writew(c + 0x18, QSIZE as u16).expect("queue_size");
            m.writeq(c + 0x20, DESC).expect("desc");
            m.writeq(c + 0x28, AVAIL).expect("driver");
            m.writeq(c + 0x30, USED).expect("device");
            m.writew(c + 0x1a, 2).expect("vector");
            assert_eq!(m.readw(c + 0x1a).expect("vector"), 2);
            m.writew(c + 0x1c, 1).expect("enable");
            m.writel(msix + 32, MAILBOX as u32).expect("address");
            m.writel(msix + 36, 0).expect("address high");
            m.writel(msix + 40, 0x55).expect("data");
            m.writel(msix + 44, 0).expect("unmasked");
            pci.cfg_write16(bdf, CAP_MSIX as u8 + 2, 0x8000)
                .expect("MSI-X on");
            m.writeb(c + 0x14, 1 | 2 | 8 | 4).expect("DRIVER_OK");
            d
        }

        /// Puts a TEST UNIT READY to target 0 LUN 0 in avail slot `n` as
        /// descriptor `n`, one indirect table, and rings.
        fn test_unit_ready(&self, n: u16) {
            let m = self.m;
            let base = 0x30000 + 0x1000 * u64::from(n);
            let (req, resp, table) = (base, base + 0x100, base + 0x200);
            m.write_mem(req, &[1, 0, 0x40, 0]).expect("lun");
            m.memset(req + 4, 15 + 32, 0).expect("rest of the request");
            let desc = |at: u64, addr: u64, len: u32, flags: u16, next: u16| {
                m.writeq(at, addr).expect("addr");
                m.writel(at + 8, len).expect("len");
                m.writew(at + 12, flags).expect("flags");
                m.writew(at + 14, next).expect("next");
            };
            desc(table, req, 19 + 32, 1, 1);
            desc(table + 16, resp, 12 + 96, 2, 0);
            desc(DESC + 16 * u64::from(n), table, 32, 4, 0);
            self.add(n, n);
        }

        /// Offers descriptor `head` in avail slot `n` and rings.
        fn add(&self, n: u16, head: u16) {
            let m = self.m;
            m.writew(AVAIL + 4 + 2 * (u64::from(n) % QSIZE), head)
                .expect("slot");
            m.writew(AVAIL + 2, n + 1).expect("idx");
            m.writew(self.notify + 4 * 2, 2).expect("doorbell");
        }

        fn used_idx(&self) -> u16 {
            self.m.readw(USED + 2).expect("used idx")
        }

        fn message(&self) -> u32 {
            let v = self.m.readl(MAILBOX).expect("mailbox");
            self.m.writel(MAILBOX, 0).expect("clear");
            v
        }
    }

    #[test]
    fn a_request_completes_asks_for_the_next_doorbell_and_interrupts() {
        let m = machine();
        let d = Driver::up(&m);
        d.test_unit_ready(0);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(m.readl(USED + 4).expect("id"), 0);
        assert_eq!(m.readl(USED + 8).expect("len"), 12 + 96);
        assert_eq!(m.readb(0x30100 + 10).expect("status"), 0, "GOOD");
        assert_eq!(m.readb(0x30100 + 11).expect("response"), 0, "OK");
        assert_eq!(d.message(), 0x55, "used_event 0 crossed: vector 2 fired");
        assert_eq!(
            m.readw(USED + 4 + 8 * QSIZE).expect("avail_event"),
            1,
            "a doorbell is wanted for the next entry"
        );
        // used_event left at 0: the next completion does not interrupt.
        d.test_unit_ready(1);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.message(), 0, "suppressed by used_event");
        assert!(m.errors().is_empty(), "{:?}", m.errors());
    }

    /// The driver's `used_event` of request queue 0, written as the
    /// driver's DMA sync writes it (one `WriteMem`).
    fn write_used_event(m: &MemoryMachine, v: u16) {
        m.write_mem(AVAIL + 4 + 2 * QSIZE, &v.to_le_bytes())
            .expect("used_event");
    }

    #[test]
    fn asynchronous_completions_land_in_the_rearm_window_and_interrupt_as_qemu_does() {
        let m = Arc::new(machine());
        let d = Driver::up(&m);
        // The thread never ticks during the test: every publication below
        // is one the test makes happen.
        m.set_completions(Completions::Async(AsyncCompletions {
            tick: std::time::Duration::from_secs(3600),
            per_tick: 1,
            in_rearm_window: 1,
            signal: true,
        }));
        d.test_unit_ready(0);
        d.test_unit_ready(1);
        assert_eq!(d.used_idx(), 0, "executed, not yet published");
        assert_eq!(m.readb(0x30100 + 11).expect("response"), 0, "data moved");
        // The driver re-arms at 0: one completion lands first, and the
        // first decision after reset always notifies.
        write_used_event(&m, 0);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.message(), 0x55);
        // It re-arms at 1 (what it consumed): the second lands before the
        // write, while used_event still says 0, so no interrupt; it is
        // the driver's re-read of the index that must find it.
        write_used_event(&m, 1);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.message(), 0, "used_event 0 is behind [1, 2)");
        assert_eq!(m.stats.landed_in_rearm_window.load(Ordering::Relaxed), 2);
        // used_event (1) is now behind the device (2): the next completion
        // does not interrupt either (vring_need_event(1, 3, 2) is false).
        d.test_unit_ready(2);
        let tick = |m: &MemoryMachine| {
            let msgs = lock(&m.dev).tick(1, &mut lock(&m.ram));
            m.send(&msgs);
        };
        tick(&m);
        assert_eq!(d.used_idx(), 3);
        assert_eq!(
            d.message(),
            0,
            "a queue re-armed behind the device is silent"
        );
        // Re-armed at what the device has published, it interrupts again.
        write_used_event(&m, 3);
        assert_eq!(d.used_idx(), 3, "nothing was held for the window");
        d.test_unit_ready(3);
        tick(&m);
        assert_eq!(d.used_idx(), 4);
        assert_eq!(d.message(), 0x55, "used_event 3 lies in [3, 4)");
        // Back to inline: what is still held is published at once.
        d.test_unit_ready(4);
        assert_eq!(d.used_idx(), 4);
        m.set_completions(Completions::Inline);
        assert_eq!(d.used_idx(), 5);
        d.test_unit_ready(5);
        assert_eq!(d.used_idx(), 6, "inline again");
        assert!(m.errors().is_empty(), "{:?}", m.errors());
    }

    #[test]
    fn the_first_notification_decision_after_reset_interrupts_whatever_used_event_says() {
        // QEMU: signalled_used_valid is false after reset, and
        // virtio_split_should_notify returns true for an invalid one.
        let m = machine();
        let d = Driver::up(&m);
        write_used_event(&m, 7);
        d.test_unit_ready(0);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.message(), 0x55, "first decision");
        d.test_unit_ready(1);
        assert_eq!(d.message(), 0, "used_event 7 is not in [1, 2)");
    }

    #[test]
    fn a_used_index_more_than_half_the_range_past_the_last_decision_always_notifies() {
        // virtqueue_split_flush's invalidation, for the wrap.
        assert!(!virtio::flush_invalidates_for_test(0, 1, 0));
        assert!(!virtio::flush_invalidates_for_test(100, 101, 90));
        assert!(virtio::flush_invalidates_for_test(0x8000, 0x8001, 0));
        assert!(
            virtio::flush_invalidates_for_test(5, 6, 6),
            "signalled ahead of new"
        );
    }

    #[test]
    fn a_masked_vector_leaves_its_message_pending_until_unmasked() {
        let m = machine();
        let d = Driver::up(&m);
        m.writel(d.msix + 44, 1).expect("mask vector 2");
        d.test_unit_ready(0);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.message(), 0, "masked: nothing sent");
        assert_eq!(
            m.readl(d.msix + MSIX_PBA).expect("PBA") & 4,
            4,
            "pending bit"
        );
        m.writel(d.msix + 44, 0).expect("unmask");
        assert_eq!(d.message(), 0x55, "delivered on unmask");
        assert_eq!(m.readl(d.msix + MSIX_PBA).expect("PBA") & 4, 0);
    }

    #[test]
    fn a_looping_chain_puts_the_device_in_needs_reset() {
        let m = machine();
        let d = Driver::up(&m);
        // Descriptor 3 chains to itself.
        m.writeq(DESC + 48, 0x40000).expect("addr");
        m.writel(DESC + 56, 16).expect("len");
        m.writew(DESC + 60, 1).expect("NEXT");
        m.writew(DESC + 62, 3).expect("next: itself");
        d.add(0, 3);
        assert_eq!(d.used_idx(), 0, "nothing completed");
        assert_eq!(m.readb(d.common + 0x14).expect("status") & 0x40, 0x40);
        let errors = m.errors();
        assert!(
            errors.len() == 1 && errors[0].contains("longer than its table"),
            "{errors:?}"
        );
        // A device that needs a reset ignores doorbells until it gets one.
        d.test_unit_ready(1);
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn memory_outside_ram_is_an_error_not_a_crash() {
        let m = machine();
        let mut b = [0u8; 8];
        assert!(m.read_mem(4 << 20, &mut b).is_err());
        assert!(m.read_mem(u64::MAX - 2, &mut b).is_err());
        assert!(m.write_mem((4 << 20) - 4, &[0; 8]).is_err());
        m.write_mem(0x1000, &[1, 2, 3, 4]).expect("inside");
        assert_eq!(m.readl(0x1000).expect("read"), 0x0403_0201);
    }
}
