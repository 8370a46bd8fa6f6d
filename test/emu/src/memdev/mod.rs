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
//! write, as QEMU's model does.
//!
//! Not modelled: INTx (interrupt pin 0, so the emulated DDI never offers
//! fixed interrupts), MSI, the legacy interface, hot-plug events, unit
//! attentions, faults. A malformed ring or chain puts the device into
//! DEVICE_NEEDS_RESET (§2.1.2) and is recorded in [`MemoryMachine::errors`].

mod scsi;
mod virtio;

use rvscsi_qtest::{Bus, Error, Op};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

pub use scsi::RamDisk;

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
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Doorbell writes.
    pub notifies: AtomicU64,
    /// Requests completed.
    pub requests: AtomicU64,
    /// MSI-X messages sent.
    pub messages: AtomicU64,
}

/// The in-process machine.
pub struct MemoryMachine {
    ram: Mutex<Vec<u8>>,
    dev: Mutex<virtio::Device>,
    slot: u8,
    /// Counters.
    pub stats: DeviceStats,
    errors: Mutex<Vec<String>>,
}

impl std::fmt::Debug for MemoryMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryMachine(slot {})", self.slot)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryMachine {
    /// Builds the machine; an error names the impossible setting.
    pub fn new(c: MemoryConfig) -> Result<MemoryMachine, String> {
        if c.msix_vectors == 0 || c.msix_vectors > 2048 {
            return Err(format!(
                "the in-memory device needs 1..=2048 MSI-X vectors (it has no INTx), not {}",
                c.msix_vectors
            ));
        }
        if c.num_queues == 0 || c.num_queues > 1024 {
            return Err(format!("num_queues {} out of 1..=1024", c.num_queues));
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
            errors: Mutex::new(Vec::new()),
        })
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
            Op::WriteMem(a, data) => self.ram_write(a, data).map(|_| 0),
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
                self.stats.notifies.fetch_add(1, Ordering::Relaxed);
                let q = ((off - NOTIFY_AT) / u64::from(NOTIFY_MULTIPLIER)) as u16;
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
    fn send(&self, messages: &[(u64, u32)]) {
        for &(addr, data) in messages {
            self.stats.messages.fetch_add(1, Ordering::Relaxed);
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

fn ram_range(ram: &[u8], a: u64, len: u64) -> Result<std::ops::Range<usize>, Error> {
    let end = a.checked_add(len).filter(|&e| e <= ram.len() as u64);
    match end {
        Some(e) => Ok(a as usize..e as usize),
        None => Err(Error::Protocol(format!(
            "guest memory access [{a:#x}, +{len:#x}) outside the {} MiB of RAM",
            ram.len() >> 20
        ))),
    }
}

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
