//! The SCSA target map of an iport (`scsi_hba_tgtmap_create(9F)`): the HBA
//! reports which targets exist, the framework configures their LUNs.

use super::{DdiError, Dip};
use crate::ffi;
use crate::scsa::addr::TargetAddr;

/// A full-set target map, destroyed on drop.
pub struct TargetMap {
    map: *mut ffi::scsi_hba_tgtmap_t,
}

// SAFETY: target-map calls are made from thread context, one at a time
// (the owner keeps the map under a lock).
unsafe impl Send for TargetMap {}

/// An observation in progress (`scsi_hba_tgtmap_set_begin(9F)` ...
/// `set_end`); dropping it without `end` flushes it.
pub struct Observation<'a> {
    map: &'a TargetMap,
    done: bool,
}

impl TargetMap {
    /// `scsi_hba_tgtmap_create(iport, SCSI_TM_FULLSET, csync, settle, ...)`
    /// with times in microseconds.
    pub fn create_fullset(iport: Dip, csync_usec: i32, settle_usec: i32) -> Result<Self, DdiError> {
        let mut map: *mut ffi::scsi_hba_tgtmap_t = core::ptr::null_mut();
        // SAFETY: valid iport node and out-pointer; no callbacks.
        let rc = unsafe {
            ffi::scsi_hba_tgtmap_create(
                iport.as_ptr(),
                ffi::SCSI_TM_FULLSET,
                csync_usec,
                settle_usec,
                core::ptr::null_mut(),
                None,
                None,
                &mut map,
            )
        };
        if rc != ffi::DDI_SUCCESS || map.is_null() {
            return Err(DdiError::new("scsi_hba_tgtmap_create", rc));
        }
        Ok(Self { map })
    }

    /// Starts a full-set observation.
    pub fn begin(&self) -> Result<Observation<'_>, DdiError> {
        // SAFETY: valid map.
        let rc = unsafe { ffi::scsi_hba_tgtmap_set_begin(self.map) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("scsi_hba_tgtmap_set_begin", rc));
        }
        Ok(Observation {
            map: self,
            done: false,
        })
    }

    /// `scsi_hba_tgtmap_scan_luns(9F)`: rescan the LUNs behind `target`.
    pub fn scan_luns(&self, target: u32) {
        let a = TargetAddr::new(target);
        // SAFETY: valid map; NUL-terminated address the framework copies.
        unsafe { ffi::scsi_hba_tgtmap_scan_luns(self.map, a.as_c_ptr()) }
    }
}

impl Observation<'_> {
    /// Reports `target` as present.
    pub fn add(&mut self, target: u32) -> Result<(), DdiError> {
        let a = TargetAddr::new(target);
        // SAFETY: valid map; NUL-terminated address the framework copies.
        let rc = unsafe {
            ffi::scsi_hba_tgtmap_set_add(
                self.map.map,
                ffi::SCSI_TGT_SCSI_DEVICE,
                a.as_c_ptr(),
                core::ptr::null_mut(),
            )
        };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("scsi_hba_tgtmap_set_add", rc));
        }
        Ok(())
    }

    /// Ends the observation: targets not added are gone.
    pub fn end(mut self) -> Result<(), DdiError> {
        self.done = true;
        // SAFETY: valid map with an observation begun.
        let rc = unsafe { ffi::scsi_hba_tgtmap_set_end(self.map.map, 0) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("scsi_hba_tgtmap_set_end", rc));
        }
        Ok(())
    }
}

impl Drop for Observation<'_> {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: valid map with an observation begun and not ended.
            unsafe { ffi::scsi_hba_tgtmap_set_flush(self.map.map) };
        }
    }
}

impl Drop for TargetMap {
    fn drop(&mut self) {
        // SAFETY: created in create_fullset, destroyed once.
        unsafe { ffi::scsi_hba_tgtmap_destroy(self.map) };
    }
}
