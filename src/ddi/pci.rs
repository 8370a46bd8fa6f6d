//! PCI configuration space: `pci_config_setup(9F)`, `pci_config_get8(9F)`.

use super::{DdiError, Dip};
use crate::ffi;

/// An open configuration-space handle of the device.
pub struct PciConfig {
    acc: ffi::ddi_acc_handle_t,
}

// SAFETY: configuration accesses through the handle are thread safe.
unsafe impl Send for PciConfig {}
// SAFETY: every method takes `&self` and calls pci_config_get*/put*(9F)
// on the handle, which the DDI allows from several threads at once;
// PciConfig holds no other state.
unsafe impl Sync for PciConfig {}

impl PciConfig {
    /// `pci_config_setup(9F)`
    pub fn open(dip: Dip) -> Result<Self, DdiError> {
        let mut acc: ffi::ddi_acc_handle_t = core::ptr::null_mut();
        // SAFETY: valid node and out-pointer.
        let rc = unsafe { ffi::pci_config_setup(dip.as_ptr(), &mut acc) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("pci_config_setup", rc));
        }
        Ok(Self { acc })
    }

    /// `pci_config_get8(9F)`
    pub fn read8(&self, off: u16) -> u8 {
        // SAFETY: open handle; any offset below 4096 is a valid request.
        unsafe { ffi::pci_config_get8(self.acc, off.into()) }
    }

    /// `pci_config_get16(9F)`
    pub fn read16(&self, off: u16) -> u16 {
        // SAFETY: as read8.
        unsafe { ffi::pci_config_get16(self.acc, off.into()) }
    }

    /// `pci_config_get32(9F)`
    pub fn read32(&self, off: u16) -> u32 {
        // SAFETY: as read8.
        unsafe { ffi::pci_config_get32(self.acc, off.into()) }
    }

    /// Vendor and device ID.
    pub fn ids(&self) -> (u16, u16) {
        (
            self.read16(ffi::PCI_CONF_VENID as u16),
            self.read16(ffi::PCI_CONF_DEVID as u16),
        )
    }

    /// The capability list as `(offset, id)` pairs, walked defensively: at
    /// most `PCI_CAP_MAX_PTR` entries, only pointers inside the standard
    /// header area, stopping at a loop.
    pub fn capabilities(&self) -> CapIter<'_> {
        let has_list = self.read16(ffi::PCI_CONF_STAT as u16) & ffi::PCI_STAT_CAP != 0;
        let first = if has_list {
            self.read8(ffi::PCI_CONF_CAP_PTR as u16) & ffi::PCI_CAP_PTR_MASK
        } else {
            0
        };
        CapIter {
            cfg: self,
            next: first,
            seen: 0,
        }
    }
}

impl Drop for PciConfig {
    fn drop(&mut self) {
        // SAFETY: opened in open(), closed once.
        unsafe { ffi::pci_config_teardown(&mut self.acc) };
    }
}

/// Iterator over PCI capabilities, see [`PciConfig::capabilities`].
pub struct CapIter<'a> {
    cfg: &'a PciConfig,
    next: u8,
    seen: usize,
}

impl Iterator for CapIter<'_> {
    type Item = (u8, u8);
    fn next(&mut self) -> Option<(u8, u8)> {
        // Capabilities live after the 64-byte header.
        if self.next < 0x40 || self.seen >= ffi::PCI_CAP_MAX_PTR {
            return None;
        }
        let at = self.next;
        let id = self.cfg.read8(u16::from(at));
        let next = self.cfg.read8(u16::from(at) + 1) & ffi::PCI_CAP_PTR_MASK;
        self.seen += 1;
        self.next = if next == at { 0 } else { next };
        Some((at, id))
    }
}
