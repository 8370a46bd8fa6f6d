//! The virtio-pci transports (virtio 1.2 §4.1): legacy (an I/O BAR laid out
//! as in virtio 0.9.5, §4.1.4.8) and modern (regions located by vendor
//! capabilities, §4.1.4).
//!
//! Every method is one or a few device register accesses; the device logic
//! decides how often to call them.

use super::{Features, Status};
use crate::ddi::pci::PciConfig;
use crate::ddi::regs::{self, RegMap};
use crate::ddi::{DdiError, Dip, time};
use crate::ffi;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// "No MSI-X vector" (`VIRTIO_MSI_NO_VECTOR`, §4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// Status reads [`Transport::reset_confirmed_briefly`] makes, a
/// microsecond apart, before it gives up on seeing the reset finish.
pub const RESET_CONFIRM_READS: u32 = 4;

/// Why the transport could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// A DDI call failed.
    Ddi(DdiError),
    /// A capability or BAR the spec requires is missing or malformed.
    Layout(&'static str),
    /// The device did not finish a reset in time.
    ResetTimeout,
}

impl From<DdiError> for TransportError {
    fn from(e: DdiError) -> Self {
        TransportError::Ddi(e)
    }
}

impl core::fmt::Display for TransportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TransportError::Ddi(e) => write!(f, "{e}"),
            TransportError::Layout(what) => write!(f, "bad virtio-pci layout: {what}"),
            TransportError::ResetTimeout => write!(f, "device did not complete reset"),
        }
    }
}

/// Which transport to use (the `virtio-transport` tunable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportChoice {
    /// Modern if the device offers it, else legacy.
    Auto,
    /// Legacy only.
    Legacy,
    /// Modern only.
    Modern,
}

// Legacy register offsets (§4.1.4.8).
mod legacy {
    pub const HOST_FEATURES: usize = 0x00;
    pub const GUEST_FEATURES: usize = 0x04;
    pub const QUEUE_PFN: usize = 0x08;
    pub const QUEUE_NUM: usize = 0x0c;
    pub const QUEUE_SEL: usize = 0x0e;
    pub const QUEUE_NOTIFY: usize = 0x10;
    pub const STATUS: usize = 0x12;
    pub const ISR: usize = 0x13;
    pub const CONFIG_VECTOR: usize = 0x14;
    pub const QUEUE_VECTOR: usize = 0x16;
    /// Device configuration without / with MSI-X enabled.
    pub const CONFIG: usize = 0x14;
    pub const CONFIG_MSIX: usize = 0x18;
    /// Legacy queues are located by 4096-byte page frame number.
    pub const PFN_SHIFT: u32 = 12;
}

// Modern common configuration offsets (§4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    pub const DEVICE_FEATURE: usize = 0x04;
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    pub const DRIVER_FEATURE: usize = 0x0c;
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    pub const NUM_QUEUES: usize = 0x12;
    pub const DEVICE_STATUS: usize = 0x14;
    pub const CONFIG_GENERATION: usize = 0x15;
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_SIZE: usize = 0x18;
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    pub const QUEUE_ENABLE: usize = 0x1c;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    pub const QUEUE_DESC: usize = 0x20;
    pub const QUEUE_DRIVER: usize = 0x28;
    pub const QUEUE_DEVICE: usize = 0x30;
    /// Length through `queue_device`.
    pub const MIN_LEN: usize = 0x38;
}

// virtio_pci_cap (§4.1.4): cfg_type values and field offsets.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_CFG_TYPE: u16 = 3;
const CAP_BAR: u16 = 4;
const CAP_OFFSET: u16 = 8;
const CAP_LENGTH: u16 = 12;
const CAP_NOTIFY_MULTIPLIER: u16 = 16;

/// Legacy transport state.
pub struct Legacy {
    regs: RegMap,
    msix: AtomicBool,
}

/// Modern transport state.
pub struct Modern {
    common: RegMap,
    notify: RegMap,
    notify_multiplier: u32,
    isr: RegMap,
    device: RegMap,
    /// Notification offset of each queue set up, in bytes into `notify`
    /// (`usize::MAX`: not set up). Sized once by `prepare_queues`, then
    /// written by `setup_queue` (also after a device reset) and read by
    /// `notify` without a lock.
    queue_notify: Vec<AtomicUsize>,
}

/// A virtio-pci transport.
pub enum Transport {
    /// virtio 0.9.5 I/O-port interface of transitional devices.
    Legacy(Legacy),
    /// virtio 1.x capability-based interface.
    Modern(Modern),
}

struct ModernCaps {
    common: Option<(u8, u32, u32)>,
    notify: Option<(u8, u32, u32, u32)>,
    isr: Option<(u8, u32, u32)>,
    device: Option<(u8, u32, u32)>,
}

fn find_modern_caps(cfg: &PciConfig) -> ModernCaps {
    let mut caps = ModernCaps {
        common: None,
        notify: None,
        isr: None,
        device: None,
    };
    for (at, id) in cfg.capabilities() {
        if id != ffi::PCI_CAP_ID_VS {
            continue;
        }
        let at = u16::from(at);
        let typ = cfg.read8(at + CAP_CFG_TYPE);
        let bar = cfg.read8(at + CAP_BAR);
        let off = cfg.read32(at + CAP_OFFSET);
        let len = cfg.read32(at + CAP_LENGTH);
        if bar > 5 {
            continue; // §4.1.4: values 0x6..0xff are reserved; ignore
        }
        // The first capability of each type is the preferred one (§4.1.4).
        match typ {
            CAP_COMMON if caps.common.is_none() => caps.common = Some((bar, off, len)),
            CAP_NOTIFY if caps.notify.is_none() => {
                let mult = cfg.read32(at + CAP_NOTIFY_MULTIPLIER);
                caps.notify = Some((bar, off, len, mult));
            }
            CAP_ISR if caps.isr.is_none() => caps.isr = Some((bar, off, len)),
            CAP_DEVICE if caps.device.is_none() => caps.device = Some((bar, off, len)),
            _ => {}
        }
    }
    caps
}

fn map_region(
    dip: Dip,
    bar: u8,
    off: u32,
    len: u32,
    min: usize,
    what: &'static str,
) -> Result<RegMap, TransportError> {
    if (len as usize) < min {
        return Err(TransportError::Layout(what));
    }
    let rnumber = regs::bar_register_number(dip, bar).ok_or(TransportError::Layout(what))?;
    Ok(RegMap::map(dip, rnumber, u64::from(off), len as usize)?)
}

impl Transport {
    /// Takes the faults the I/O framework recorded on the transport's
    /// register mappings (`Fma::take_regs_fault`: every one cleared), the
    /// first one found or Ok.
    pub fn take_access_fault(&self, fma: &crate::ddi::fm::Fma) -> crate::ddi::fm::HandleHealth {
        let maps: [Option<&RegMap>; 4] = match self {
            Transport::Legacy(l) => [Some(&l.regs), None, None, None],
            Transport::Modern(m) => [
                Some(&m.common),
                Some(&m.notify),
                Some(&m.isr),
                Some(&m.device),
            ],
        };
        maps.into_iter()
            .flatten()
            .map(|r| fma.take_regs_fault(r))
            .fold(
                crate::ddi::fm::HandleHealth::Ok,
                crate::ddi::fm::HandleHealth::first_of,
            )
    }

    /// Sets up the transport of the device at `dip`; `device_config_len` is
    /// the size of the device-specific configuration the driver reads.
    pub fn open(
        dip: Dip,
        cfg: &PciConfig,
        choice: TransportChoice,
        device_config_len: usize,
    ) -> Result<Transport, TransportError> {
        let (_, devid) = cfg.ids();
        let transitional = super::VIRTIO_PCI_TRANSITIONAL_RANGE.contains(&devid);
        let caps = find_modern_caps(cfg);
        let has_modern = caps.common.is_some();
        let use_modern = match choice {
            TransportChoice::Modern => true,
            TransportChoice::Legacy => false,
            TransportChoice::Auto => has_modern || !transitional,
        };
        if !use_modern {
            if !transitional {
                return Err(TransportError::Layout(
                    "legacy interface of a non-transitional device",
                ));
            }
            let rnumber =
                regs::bar_register_number(dip, 0).ok_or(TransportError::Layout("legacy BAR0"))?;
            if !regs::register_is_io(dip, rnumber) {
                return Err(TransportError::Layout("legacy BAR0 is not I/O space"));
            }
            let len = legacy::CONFIG_MSIX + device_config_len;
            let regs = RegMap::map(dip, rnumber, 0, len)?;
            return Ok(Transport::Legacy(Legacy {
                regs,
                msix: AtomicBool::new(false),
            }));
        }
        let (cb, co, cl) = caps
            .common
            .ok_or(TransportError::Layout("no common configuration capability"))?;
        let (nb, no, nl, mult) = caps
            .notify
            .ok_or(TransportError::Layout("no notification capability"))?;
        let (ib, io, il) = caps
            .isr
            .ok_or(TransportError::Layout("no ISR capability"))?;
        let (db, dof, dl) = caps
            .device
            .ok_or(TransportError::Layout("no device configuration capability"))?;
        Ok(Transport::Modern(Modern {
            common: map_region(dip, cb, co, cl, common::MIN_LEN, "common configuration")?,
            notify: map_region(dip, nb, no, nl, 2, "notification area")?,
            notify_multiplier: mult,
            isr: map_region(dip, ib, io, il, 1, "ISR status")?,
            device: map_region(dip, db, dof, dl, device_config_len, "device configuration")?,
            queue_notify: Vec::new(),
        }))
    }

    /// Whether this is the legacy interface.
    pub fn is_legacy(&self) -> bool {
        matches!(self, Transport::Legacy(_))
    }

    /// Device status.
    pub fn status(&self) -> Status {
        Status::from_bits_retain(match self {
            Transport::Legacy(l) => l.regs.read8(legacy::STATUS),
            Transport::Modern(m) => m.common.read8(common::DEVICE_STATUS),
        })
    }

    /// Writes the device status.
    pub fn set_status(&self, s: Status) {
        match self {
            Transport::Legacy(l) => l.regs.write8(legacy::STATUS, s.bits()),
            Transport::Modern(m) => m.common.write8(common::DEVICE_STATUS, s.bits()),
        }
    }

    /// Adds bits to the device status.
    pub fn add_status(&self, s: Status) {
        let now = self.status();
        self.set_status(now | s);
    }

    /// Resets the device (§2.4) and waits, at most one second, until it
    /// reads back 0 (§4.1.4.3.2: modern drivers must wait), busy-waiting
    /// (drv_usecwait(9F)): for callers that may not sleep. Thread context
    /// should use [`Transport::reset_sleeping`].
    pub fn reset(&self) -> Result<(), TransportError> {
        self.set_status(Status::empty());
        for _ in 0..10_000 {
            if self.status().is_empty() {
                return Ok(());
            }
            time::usec_wait(100);
        }
        Err(TransportError::ResetTimeout)
    }

    /// [`Transport::reset`] for thread context (attach, detach): the same
    /// one-second bound, but after a few short busy waits (a device that
    /// resets at once costs no tick) it sleeps a clock tick between looks
    /// (delay(9F), which may not be called in interrupt context) instead
    /// of holding the CPU for up to a second.
    pub fn reset_sleeping(&self) -> Result<(), TransportError> {
        const SPINS: u32 = 10;
        const SPIN_US: i64 = 10;
        self.set_status(Status::empty());
        for _ in 0..SPINS {
            if self.status().is_empty() {
                return Ok(());
            }
            time::usec_wait(SPIN_US);
        }
        // At least one look per tick for a second; at least one tick.
        let ticks = time::usec_to_ticks(1_000_000).max(1);
        for _ in 0..ticks {
            time::delay_ticks(1);
            if self.status().is_empty() {
                return Ok(());
            }
        }
        Err(TransportError::ResetTimeout)
    }

    /// Tells the device the driver gave up on it (§2.1.2).
    pub fn fail(&self) {
        self.add_status(Status::FAILED);
    }

    /// Resets without waiting: for quiesce(9E), which must not block.
    pub fn reset_nowait(&self) {
        self.set_status(Status::empty());
    }

    /// Resets and reads the status back at most [`RESET_CONFIRM_READS`]
    /// times, a microsecond apart (a few microseconds in all: fit for
    /// interrupt context); true once it read 0, i.e. the device is known
    /// to have stopped using the rings and buffers.
    ///
    /// virtio 1.2 §2.4 and §4.1.4.3.2: after writing 0 to device_status
    /// the driver must wait for a read of it to return 0; until then it
    /// cannot assume the device stopped. The first read also pushes the
    /// (posted) status write to the device (PCI ordering: a read does not
    /// pass a posted write). On a hypervisor the write is not posted to an
    /// asynchronous engine: it traps to the VMM, which runs the reset in
    /// that exit before the vCPU resumes (QEMU: `virtio_pci_common_write`,
    /// modern, and `virtio_ioport_write`, legacy, both call
    /// `virtio_pci_reset` -> `virtio_bus_reset` -> `virtio_reset` when the
    /// status becomes 0, in hw/virtio/virtio-pci.c), so the first read
    /// already returns 0. A device that has not read back 0 within this
    /// bound is left to [`Self::reset`], from a context that may wait.
    pub fn reset_confirmed_briefly(&self) -> bool {
        self.set_status(Status::empty());
        for i in 0..RESET_CONFIRM_READS {
            if self.status().is_empty() {
                return true;
            }
            if i + 1 < RESET_CONFIRM_READS {
                time::usec_wait(1);
            }
        }
        false
    }

    /// The features the device offers.
    pub fn device_features(&self) -> Features {
        match self {
            Transport::Legacy(l) => {
                Features::from_bits_retain(u64::from(l.regs.read32(legacy::HOST_FEATURES)))
            }
            Transport::Modern(m) => {
                let mut f = 0u64;
                for sel in 0..2u32 {
                    m.common.write32(common::DEVICE_FEATURE_SELECT, sel);
                    f |= u64::from(m.common.read32(common::DEVICE_FEATURE)) << (32 * sel);
                }
                Features::from_bits_retain(f)
            }
        }
    }

    /// Writes the driver's feature choice and, on modern devices, sets
    /// FEATURES_OK and checks that the device kept it (§3.1.1 step 5-6).
    pub fn negotiate(&self, f: Features) -> bool {
        match self {
            Transport::Legacy(l) => {
                l.regs.write32(legacy::GUEST_FEATURES, f.bits() as u32);
                true
            }
            Transport::Modern(m) => {
                for sel in 0..2u32 {
                    m.common.write32(common::DRIVER_FEATURE_SELECT, sel);
                    m.common
                        .write32(common::DRIVER_FEATURE, (f.bits() >> (32 * sel)) as u32);
                }
                self.add_status(Status::FEATURES_OK);
                self.status().contains(Status::FEATURES_OK)
            }
        }
    }

    /// Number of queues the device has, where the transport says (modern).
    pub fn num_queues(&self) -> Option<u16> {
        match self {
            Transport::Legacy(_) => None,
            Transport::Modern(m) => Some(m.common.read16(common::NUM_QUEUES)),
        }
    }

    /// The device's size for queue `q` (0: no such queue).
    pub fn queue_max_size(&self, q: u16) -> u16 {
        match self {
            Transport::Legacy(l) => {
                l.regs.write16(legacy::QUEUE_SEL, q);
                l.regs.read16(legacy::QUEUE_NUM)
            }
            Transport::Modern(m) => {
                m.common.write16(common::QUEUE_SELECT, q);
                m.common.read16(common::QUEUE_SIZE)
            }
        }
    }

    /// Makes room to set up queues `0..n`.
    pub fn prepare_queues(&mut self, n: u16) {
        if let Transport::Modern(m) = self {
            m.queue_notify = (0..n).map(|_| AtomicUsize::new(usize::MAX)).collect();
        }
    }

    /// Tells the device where queue `q` of `size` entries lives and enables
    /// it. Legacy queues must use the device's size and the contiguous
    /// 4096-aligned layout, located by page number.
    pub fn setup_queue(
        &self,
        q: u16,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), TransportError> {
        match self {
            Transport::Legacy(l) => {
                let pfn = desc >> legacy::PFN_SHIFT;
                if desc & ((1 << legacy::PFN_SHIFT) - 1) != 0 || pfn > u64::from(u32::MAX) {
                    return Err(TransportError::Layout("legacy queue address"));
                }
                l.regs.write16(legacy::QUEUE_SEL, q);
                if l.regs.read16(legacy::QUEUE_NUM) != size {
                    return Err(TransportError::Layout(
                        "legacy queue size is fixed by the device",
                    ));
                }
                l.regs.write32(legacy::QUEUE_PFN, pfn as u32);
                Ok(())
            }
            Transport::Modern(m) => {
                let c = &m.common;
                c.write16(common::QUEUE_SELECT, q);
                c.write16(common::QUEUE_SIZE, size);
                write64(c, common::QUEUE_DESC, desc);
                write64(c, common::QUEUE_DRIVER, avail);
                write64(c, common::QUEUE_DEVICE, used);
                let off =
                    usize::from(c.read16(common::QUEUE_NOTIFY_OFF)) * m.notify_multiplier as usize;
                if !crate::shmem::in_bounds(off, 2, m.notify.len()) {
                    return Err(TransportError::Layout(
                        "queue notification offset outside the area",
                    ));
                }
                let slot = m
                    .queue_notify
                    .get(usize::from(q))
                    .ok_or(TransportError::Layout("queue not prepared"))?;
                slot.store(off, Ordering::Relaxed);
                c.write16(common::QUEUE_ENABLE, 1);
                Ok(())
            }
        }
    }

    /// Notifies the device of new buffers in queue `q` (one register write).
    pub fn notify(&self, q: u16) {
        match self {
            Transport::Legacy(l) => l.regs.write16(legacy::QUEUE_NOTIFY, q),
            Transport::Modern(m) => {
                if let Some(off) = m.queue_notify.get(usize::from(q)) {
                    let off = off.load(Ordering::Relaxed);
                    if off != usize::MAX {
                        m.notify.write16(off, q);
                    }
                }
            }
        }
    }

    /// Reads (and so clears) the ISR status (§4.1.4.5); bit 0: a queue has
    /// used buffers, bit 1: configuration changed. Only needed for fixed
    /// interrupts (and MSI), never with MSI-X.
    pub fn read_isr(&self) -> u8 {
        match self {
            Transport::Legacy(l) => l.regs.read8(legacy::ISR),
            Transport::Modern(m) => m.isr.read8(0),
        }
    }

    /// Records that MSI-X is now enabled: the legacy device configuration
    /// moves from offset 20 to 24 (§4.1.4.8) and the vector registers
    /// appear.
    pub fn set_msix_enabled(&self, on: bool) {
        if let Transport::Legacy(l) = self {
            l.msix.store(on, Ordering::Relaxed);
        }
    }

    /// Routes configuration-change interrupts to MSI-X vector `v`; false if
    /// the device refused (it reads back `NO_VECTOR`, §4.1.5.1.2).
    pub fn set_config_vector(&self, v: u16) -> bool {
        match self {
            Transport::Legacy(l) => {
                l.regs.write16(legacy::CONFIG_VECTOR, v);
                l.regs.read16(legacy::CONFIG_VECTOR) == v
            }
            Transport::Modern(m) => {
                m.common.write16(common::CONFIG_MSIX_VECTOR, v);
                m.common.read16(common::CONFIG_MSIX_VECTOR) == v
            }
        }
    }

    /// Routes queue `q`'s interrupts to MSI-X vector `v`; false if refused.
    pub fn set_queue_vector(&self, q: u16, v: u16) -> bool {
        match self {
            Transport::Legacy(l) => {
                l.regs.write16(legacy::QUEUE_SEL, q);
                l.regs.write16(legacy::QUEUE_VECTOR, v);
                l.regs.read16(legacy::QUEUE_VECTOR) == v
            }
            Transport::Modern(m) => {
                m.common.write16(common::QUEUE_SELECT, q);
                m.common.write16(common::QUEUE_MSIX_VECTOR, v);
                m.common.read16(common::QUEUE_MSIX_VECTOR) == v
            }
        }
    }

    fn config_base(&self) -> (&RegMap, usize) {
        match self {
            Transport::Legacy(l) => {
                let base = if l.msix.load(Ordering::Relaxed) {
                    legacy::CONFIG_MSIX
                } else {
                    legacy::CONFIG
                };
                (&l.regs, base)
            }
            Transport::Modern(m) => (&m.device, 0),
        }
    }

    /// Reads a 16-bit device configuration field.
    pub fn config16(&self, off: usize) -> u16 {
        let (r, base) = self.config_base();
        r.read16(base + off)
    }

    /// Reads a 32-bit device configuration field.
    pub fn config32(&self, off: usize) -> u32 {
        let (r, base) = self.config_base();
        r.read32(base + off)
    }

    /// Writes a 32-bit device configuration field (for the fields a
    /// driver may set, such as virtio-scsi's sense_size, §5.6.4).
    pub fn set_config32(&self, off: usize, v: u32) {
        let (r, base) = self.config_base();
        r.write32(base + off, v);
    }

    /// Runs `read` until it sees a consistent snapshot of the device
    /// configuration (§4.1.4.3.1 config_generation; legacy devices have no
    /// generation and are read once). At most 10 attempts.
    pub fn read_config<R>(&self, mut read: impl FnMut(&Transport) -> R) -> R {
        let Transport::Modern(m) = self else {
            return read(self);
        };
        let mut r = read(self);
        for _ in 0..10 {
            let before = m.common.read8(common::CONFIG_GENERATION);
            r = read(self);
            if m.common.read8(common::CONFIG_GENERATION) == before {
                break;
            }
        }
        r
    }
}

fn write64(r: &RegMap, off: usize, v: u64) {
    // §4.1.3.1: 64-bit fields are written as two 32-bit halves, low first.
    r.write32(off, v as u32);
    r.write32(off + 4, (v >> 32) as u32);
}
