//! What the HBA tells fault management (issue 15): an ereport for each
//! device fault the core detects, with the service impact it has
//! (`ddi_fm_service_impact(9F)`), and the HBA kstat's count of it.
//!
//! - the recovery ladder exhausted short of a device reset (abort, LUN
//!   reset, target reset all failed for a timed-out command): the device
//!   stopped answering, `ereport.io.device.no_response`, DEGRADED (it is
//!   reset next);
//! - a device reset after which the device did not come back:
//!   `device.inval_state` (detail `reset-failed`), LOST: every command
//!   fails from now on;
//! - virtio's DEVICE_NEEDS_RESET: `device.inval_state` (detail
//!   `device-needs-reset`), DEGRADED;
//! - a completion index more than a ring ahead (both families):
//!   `device.intern_uncorr` (detail `ring-protocol-violation`), DEGRADED;
//! - a device that came back from a reset after one of those: RESTORED.
//!
//! Each ereport carries one fresh ENA (`fm_ena_generate(0, FM_ENA_FMT1)`,
//! as ddifm.c `ddi_fm_service_impact` makes its own for the impact
//! ereport). Every call here is allowed in any context:
//! `ddi_fm_ereport_post` with DDI_NOSLEEP (ddifm.c: "may be called from
//! user, kernel, interrupt or high-interrupt context"; the shim always
//! passes DDI_NOSLEEP), `ddi_fm_service_impact` (ddi_fm_service_impact(9F)
//! CONTEXT: user, kernel or high-level interrupt; ddifm.c only takes the
//! node's devi_lock and posts DDI_NOSLEEP). Nothing here allocates.

use super::{Family, Hba};
use crate::ddi::fm::{DeviceFault, ServiceImpact};
use crate::ddi::kstat::HbaStat;
use crate::dev_warn;
use core::sync::atomic::Ordering;

impl<F: Family> Hba<F> {
    /// Posts the ereport of `fault` with `members`, then the service
    /// impact; DEGRADED is remembered so that the device's return is
    /// reported RESTORED.
    fn report(
        &self,
        fault: DeviceFault,
        impact: ServiceImpact,
        members: &[(&'static core::ffi::CStr, u64)],
    ) {
        let ena = crate::ddi::fm::Fma::new_ena();
        self.fma.report(fault, ena, members);
        if matches!(impact, ServiceImpact::Degraded | ServiceImpact::Lost) {
            self.impaired.store(true, Ordering::Relaxed);
        }
        self.fma.service_impact(impact);
    }

    /// A completion index of request queue `qi` more than a ring ahead of
    /// the driver's: counted, logged, reported; the caller resets the
    /// device.
    pub(crate) fn ring_runaway(&self, qi: usize, device_idx: u32, expected: u32) {
        self.count(HbaStat::RingRunaway);
        dev_warn!(
            self.dip,
            "device used index {device_idx} is more than a ring ahead of {expected}"
        );
        self.report(
            DeviceFault::RingProtocol,
            ServiceImpact::Degraded,
            &[
                (c"queue", qi as u64),
                (c"device-index", u64::from(device_idx)),
            ],
        );
    }

    /// The device set DEVICE_NEEDS_RESET: counted and reported; the
    /// caller schedules the reset.
    pub fn device_needs_reset(&self) {
        self.count(HbaStat::NeedsReset);
        self.report(DeviceFault::NeedsReset, ServiceImpact::Degraded, &[]);
    }

    /// Every step of the recovery ladder short of a device reset failed
    /// for a command to `target`/`lun`: the device stopped answering.
    pub(crate) fn no_response(&self, target: u8, lun: u16) {
        self.count(HbaStat::NoResponse);
        self.report(
            DeviceFault::NoResponse,
            ServiceImpact::Degraded,
            &[(c"target", u64::from(target)), (c"lun", u64::from(lun))],
        );
    }

    /// A device reset did not bring the device back: the controller is
    /// lost.
    pub(crate) fn reset_failed(&self) {
        self.count(HbaStat::DeviceResetsFailed);
        self.report(DeviceFault::ResetFailed, ServiceImpact::Lost, &[]);
    }

    /// The device came back from a reset: RESTORED if a fault had
    /// degraded it.
    pub(crate) fn device_back(&self) {
        if self.impaired.swap(false, Ordering::Relaxed) {
            self.fma.service_impact(ServiceImpact::Restored);
        }
    }
}
