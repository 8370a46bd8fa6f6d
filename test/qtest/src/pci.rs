//! PCI configuration space through the type-1 mechanism (ports 0xCF8/0xCFC), bus
//! enumeration, BAR sizing and assignment, capability walks.
//!
//! No firmware runs (the vCPU is stopped), so nobody has assigned BARs: the test does
//! it, like a BIOS would.

use std::fmt;

use crate::Bus;
use crate::error::Error;
use crate::qtest::Op;

/// CONFIG_ADDRESS port.
const CONFIG_ADDRESS: u16 = 0xCF8;
/// CONFIG_DATA port.
const CONFIG_DATA: u16 = 0xCFC;

/// Command register bits: I/O space, memory space, bus master.
pub const PCI_COMMAND_IO: u16 = 0x1;
/// Memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
/// Bus master enable.
pub const PCI_COMMAND_MASTER: u16 = 0x4;

/// Bound on a capability list walk (a looping list must not hang the test).
const MAX_CAPS: usize = 48;

/// A PCI function address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub dev: u8,
    /// Function number, 0..8.
    pub func: u8,
}

impl Bdf {
    /// `Bdf { bus, dev, func }`.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Bdf {
        Bdf { bus, dev, func }
    }

    /// The CONFIG_ADDRESS value for register `off` (dword aligned).
    fn config_address(self, off: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.bus) << 16)
            | (u32::from(self.dev & 0x1f) << 11)
            | (u32::from(self.func & 0x7) << 8)
            | u32::from(off & 0xFC)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// One function found by [`Pci::scan_bus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subclass.
    pub subclass: u8,
    /// Base class.
    pub class: u8,
    /// Header type without the multi-function bit (0 = device, 1 = bridge).
    pub header_type: u8,
    /// Subsystem vendor ID (type-0 headers; 0 otherwise).
    pub subsystem_vendor: u16,
    /// Subsystem ID (type-0 headers; 0 otherwise).
    pub subsystem: u16,
    /// Interrupt pin (0 = none, 1 = INTA...).
    pub interrupt_pin: u8,
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (the BAR uses two slots).
    Mem64,
}

/// A sized BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Its kind.
    pub kind: BarKind,
    /// Its size in bytes (a power of two).
    pub size: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A type-1 PCI configuration space accessor on a [`Bus`] (QEMU through
/// [`QTest`](crate::QTest), or an in-process device model).
///
/// Every config access is one [`Bus::batch`] of the address write and the data access:
/// one socket round trip on QEMU, atomic with respect to other threads using the same bus.
#[derive(Clone, Copy)]
pub struct Pci<'a> {
    qt: &'a dyn Bus,
}

impl std::fmt::Debug for Pci<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pci")
    }
}

impl<'a> Pci<'a> {
    /// A config space accessor on `qt`.
    pub fn new(qt: &'a dyn Bus) -> Pci<'a> {
        Pci { qt }
    }

    fn read(&self, bdf: Bdf, off: u8, data: Op<'static>) -> Result<u64, Error> {
        let v = self
            .qt
            .batch(&[Op::Outl(CONFIG_ADDRESS, bdf.config_address(off)), data])?;
        Ok(v[1])
    }

    fn write(&self, bdf: Bdf, off: u8, data: Op<'static>) -> Result<(), Error> {
        self.qt
            .batch(&[Op::Outl(CONFIG_ADDRESS, bdf.config_address(off)), data])
            .map(drop)
    }

    /// Reads the config byte at `off`.
    pub fn cfg_read8(&self, bdf: Bdf, off: u8) -> Result<u8, Error> {
        Ok(self.read(bdf, off, Op::Inb(CONFIG_DATA + u16::from(off & 3)))? as u8)
    }

    /// Reads the config word at `off` (`off` should be 2-aligned).
    pub fn cfg_read16(&self, bdf: Bdf, off: u8) -> Result<u16, Error> {
        Ok(self.read(bdf, off, Op::Inw(CONFIG_DATA + u16::from(off & 2)))? as u16)
    }

    /// Reads the config dword at `off` (`off` should be 4-aligned).
    pub fn cfg_read32(&self, bdf: Bdf, off: u8) -> Result<u32, Error> {
        Ok(self.read(bdf, off, Op::Inl(CONFIG_DATA))? as u32)
    }

    /// Writes the config byte at `off`.
    pub fn cfg_write8(&self, bdf: Bdf, off: u8, v: u8) -> Result<(), Error> {
        self.write(bdf, off, Op::Outb(CONFIG_DATA + u16::from(off & 3), v))
    }

    /// Writes the config word at `off` (`off` should be 2-aligned).
    pub fn cfg_write16(&self, bdf: Bdf, off: u8, v: u16) -> Result<(), Error> {
        self.write(bdf, off, Op::Outw(CONFIG_DATA + u16::from(off & 2), v))
    }

    /// Writes the config dword at `off` (`off` should be 4-aligned).
    pub fn cfg_write32(&self, bdf: Bdf, off: u8, v: u32) -> Result<(), Error> {
        self.write(bdf, off, Op::Outl(CONFIG_DATA, v))
    }

    /// Reads one function's identification, or `None` if nothing answers there.
    pub fn probe(&self, bdf: Bdf) -> Result<Option<PciFunction>, Error> {
        let id = self.cfg_read32(bdf, 0x00)?;
        let vendor = id as u16;
        if vendor == 0xFFFF || vendor == 0 {
            return Ok(None);
        }
        let class = self.cfg_read32(bdf, 0x08)?;
        let header_type = self.cfg_read8(bdf, 0x0E)? & 0x7F;
        let (subsystem_vendor, subsystem) = if header_type == 0 {
            let s = self.cfg_read32(bdf, 0x2C)?;
            (s as u16, (s >> 16) as u16)
        } else {
            (0, 0)
        };
        Ok(Some(PciFunction {
            bdf,
            vendor,
            device: (id >> 16) as u16,
            revision: class as u8,
            prog_if: (class >> 8) as u8,
            subclass: (class >> 16) as u8,
            class: (class >> 24) as u8,
            header_type,
            subsystem_vendor,
            subsystem,
            interrupt_pin: self.cfg_read8(bdf, 0x3D)?,
        }))
    }

    /// Enumerates the functions on `bus` (functions 1..7 only for multi-function
    /// devices).
    pub fn scan_bus(&self, bus: u8) -> Result<Vec<PciFunction>, Error> {
        let mut found = Vec::new();
        for dev in 0..32 {
            let Some(f0) = self.probe(Bdf::new(bus, dev, 0))? else {
                continue;
            };
            found.push(f0);
            let multi = self.cfg_read8(Bdf::new(bus, dev, 0), 0x0E)? & 0x80 != 0;
            if multi {
                for func in 1..8 {
                    if let Some(f) = self.probe(Bdf::new(bus, dev, func))? {
                        found.push(f);
                    }
                }
            }
        }
        Ok(found)
    }

    /// Enumerates bus 0 (all that q35/pc have without bridges).
    pub fn scan_bus0(&self) -> Result<Vec<PciFunction>, Error> {
        self.scan_bus(0)
    }

    /// The first function on bus 0 with this vendor and device ID.
    pub fn find(&self, vendor: u16, device: u16) -> Result<Option<PciFunction>, Error> {
        Ok(self
            .scan_bus0()?
            .into_iter()
            .find(|f| f.vendor == vendor && f.device == device))
    }

    /// Sizes BAR `i` (0..6) by writing all ones and restoring it, with decoding
    /// disabled meanwhile. `None` if the BAR is not implemented. For a 64-bit BAR,
    /// `i` must be its lower slot.
    pub fn bar_info(&self, bdf: Bdf, i: usize) -> Result<Option<Bar>, Error> {
        if i >= 6 {
            return Err(Error::Pci(format!("BAR index {i} out of range 0..6")));
        }
        let off = 0x10 + 4 * i as u8;
        let cmd = self.cfg_read16(bdf, 0x04)?;
        let decoding = cmd & (PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
        if decoding != 0 {
            self.cfg_write16(bdf, 0x04, cmd & !decoding)?;
        }
        let result = self.size_bar(bdf, i, off);
        if decoding != 0 {
            self.cfg_write16(bdf, 0x04, cmd)?;
        }
        result
    }

    fn size_bar(&self, bdf: Bdf, i: usize, off: u8) -> Result<Option<Bar>, Error> {
        let orig = self.cfg_read32(bdf, off)?;
        self.cfg_write32(bdf, off, 0xFFFF_FFFF)?;
        let probe = self.cfg_read32(bdf, off)?;
        self.cfg_write32(bdf, off, orig)?;
        if probe == 0 {
            return Ok(None);
        }
        if probe & 1 == 1 {
            let mut mask = probe & !0x3;
            if mask & 0xFFFF_0000 == 0 {
                // 16-bit I/O decoder: upper half reads as zero.
                mask |= 0xFFFF_0000;
            }
            return Ok(Some(Bar {
                kind: BarKind::Io,
                size: u64::from((!mask).wrapping_add(1)),
                prefetchable: false,
            }));
        }
        let prefetchable = probe & 0x8 != 0;
        let is64 = (probe >> 1) & 3 == 2 && i < 5;
        let mut mask = u64::from(probe & !0xF);
        if is64 {
            let hi_off = off + 4;
            let orig_hi = self.cfg_read32(bdf, hi_off)?;
            self.cfg_write32(bdf, hi_off, 0xFFFF_FFFF)?;
            let probe_hi = self.cfg_read32(bdf, hi_off)?;
            self.cfg_write32(bdf, hi_off, orig_hi)?;
            mask |= u64::from(probe_hi) << 32;
        } else {
            mask |= 0xFFFF_FFFF_0000_0000;
        }
        let size = (!mask).wrapping_add(1);
        if size == 0 {
            return Ok(None);
        }
        Ok(Some(Bar {
            kind: if is64 { BarKind::Mem64 } else { BarKind::Mem32 },
            size,
            prefetchable,
        }))
    }

    /// Programs every implemented BAR of `bdf`: memory BARs from `mem_base` upwards and
    /// I/O BARs from `io_base` upwards, each naturally aligned to its size, then enables
    /// I/O space, memory space and bus mastering in the command register.
    ///
    /// Returns `(bar index, bar, address)` for each BAR; a 64-bit BAR takes two slots
    /// and is reported at its lower index.
    pub fn assign_bars(
        &self,
        bdf: Bdf,
        mem_base: u64,
        io_base: u16,
    ) -> Result<Vec<(usize, Bar, u64)>, Error> {
        let mut mem = mem_base;
        let mut io = u64::from(io_base);
        let mut out = Vec::new();
        let mut i = 0;
        while i < 6 {
            let Some(bar) = self.bar_info(bdf, i)? else {
                i += 1;
                continue;
            };
            let off = 0x10 + 4 * i as u8;
            let cursor = if bar.kind == BarKind::Io {
                &mut io
            } else {
                &mut mem
            };
            let addr = cursor
                .checked_add(bar.size - 1)
                .map(|a| a & !(bar.size - 1))
                .ok_or_else(|| Error::Pci(format!("{bdf} BAR{i}: address space exhausted")))?;
            let end = addr + bar.size;
            let limit = match bar.kind {
                BarKind::Io => 0x1_0000,
                BarKind::Mem32 => 0x1_0000_0000,
                BarKind::Mem64 => u64::MAX,
            };
            if end > limit {
                return Err(Error::Pci(format!(
                    "{bdf} BAR{i} ({:?}, {:#x} bytes) does not fit at {addr:#x}",
                    bar.kind, bar.size
                )));
            }
            *cursor = end;
            match bar.kind {
                BarKind::Io | BarKind::Mem32 => self.cfg_write32(bdf, off, addr as u32)?,
                BarKind::Mem64 => {
                    self.cfg_write32(bdf, off, addr as u32)?;
                    self.cfg_write32(bdf, off + 4, (addr >> 32) as u32)?;
                }
            }
            out.push((i, bar, addr));
            i += if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        }
        let cmd = self.cfg_read16(bdf, 0x04)?;
        self.cfg_write16(
            bdf,
            0x04,
            cmd | PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
        )?;
        Ok(out)
    }

    /// The capability list as `(offset, capability id)`, in list order. The walk stops
    /// after 48 entries, on a pointer below 0x40, or on a pointer already seen.
    pub fn capabilities(&self, bdf: Bdf) -> Result<Vec<(u8, u8)>, Error> {
        let mut out = Vec::new();
        let status = self.cfg_read16(bdf, 0x06)?;
        if status & 0x10 == 0 {
            return Ok(out);
        }
        let mut seen = [false; 256];
        let mut p = self.cfg_read8(bdf, 0x34)? & 0xFC;
        while p >= 0x40 && !seen[usize::from(p)] && out.len() < MAX_CAPS {
            seen[usize::from(p)] = true;
            let v = self.cfg_read16(bdf, p)?;
            out.push((p, v as u8));
            p = ((v >> 8) as u8) & 0xFC;
        }
        Ok(out)
    }

    /// The offset of the first capability with id `id`.
    pub fn find_capability(&self, bdf: Bdf, id: u8) -> Result<Option<u8>, Error> {
        Ok(self
            .capabilities(bdf)?
            .into_iter()
            .find(|&(_, c)| c == id)
            .map(|(o, _)| o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_address() {
        assert_eq!(Bdf::new(0, 1, 0).config_address(0x10), 0x8000_0810);
        assert_eq!(Bdf::new(1, 31, 7).config_address(0xFF), 0x8001_FFFC);
        assert_eq!(Bdf::new(0, 1, 0).to_string(), "00:01.0");
    }
}
