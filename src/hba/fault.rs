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
//! - a fault the I/O framework reports on a register access handle or a
//!   ring's DMA handle (`ddi_fm_acc_err_get(9F)`, `ddi_fm_dma_err_get`),
//!   looked at once a second by the watchdog: `device.intern_uncorr` (detail
//!   `access-handle-fault` or `dma-handle-fault`, with the handle error's
//!   ENA, which ties it to the nexus's own ereport), LOST: the work task
//!   resets the device (so it stops DMA), ends every command in flight
//!   `CMD_RESET` and leaves the HBA FAILED, so new commands get
//!   TRAN_FATAL_ERROR: the affected commands fail, none hangs. The
//!   handle's status stays faulted (the DDI keeps it until
//!   `ddi_fm_acc_err_clear(9F)`, which the driver does not call), so the
//!   controller is not brought back: detach and attach it again;
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

use super::family::{DeviceRing, StopWait};
use super::{Family, Hba, HbaState};
use crate::ddi::fm::{DeviceFault, FmCaps, ServiceImpact};
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
    pub(crate) fn device_needs_reset(&self) {
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

    /// The watchdog's look at the handles' fault status (thread context,
    /// at most once a second, while running): the register access handles, then
    /// each request ring's DMA handles. A fault is counted and reported
    /// once, and the work task takes the controller out of service.
    pub(crate) fn check_handles(&self) {
        if !self.fma.caps().intersects(FmCaps::ACCCHK | FmCaps::DMACHK) {
            return;
        }
        // Once a second (the watchdog alone calls this: no race).
        let now = self.clock.now();
        let last = self.handles_checked.load(Ordering::Relaxed);
        if now.wrapping_sub(last) < self.clock.hz() && last != i64::MIN {
            return;
        }
        self.handles_checked.store(now, Ordering::Relaxed);
        let mut found = None;
        let acc = self.dev.check_access(&self.fma);
        if acc.is_faulted() {
            found = Some((DeviceFault::AccessHandle, acc));
        } else {
            for q in self.queues.iter() {
                let h = q.ring.lock().ring.check_dma(&self.fma);
                if h.is_faulted() {
                    found = Some((DeviceFault::DmaHandle, h));
                    break;
                }
            }
        }
        let Some((fault, h)) = found else {
            return;
        };
        if self.handle_fault.swap(true, Ordering::AcqRel) {
            return;
        }
        self.count(HbaStat::HandleFaults);
        dev_warn!(
            self.dip,
            "the I/O framework reports a fault on the device's {} handle ({h:?}): taking the controller out of service",
            if fault == DeviceFault::AccessHandle {
                "register"
            } else {
                "DMA"
            }
        );
        // The handle error's ENA: the nexus's ereport and ours are one
        // error (ddifm.c: the ENA "should be set if this error is a result
        // of an error status returned from ddi_dma_err_check() or
        // ddi_acc_err_check()").
        self.fma
            .report(fault, h.ena(), &[(c"fm-status", h.status() as i64 as u64)]);
        self.schedule(|w| w.out_of_service = true);
    }

    /// The work task's part of a handle fault: the device is reset (it
    /// stops DMA), every command in flight ends `CMD_RESET`, and the HBA
    /// stays FAILED (new commands: TRAN_FATAL_ERROR); the service is
    /// LOST. Nothing if the HBA is not running (stopping, or already
    /// failed).
    pub(crate) fn take_out_of_service(&self) {
        let Some(stopped) = self.stop_and_reclaim("a fault on its handles", StopWait::Spinning)
        else {
            return;
        };
        if let Err(e) = stopped {
            dev_warn!(self.dip, "the device did not finish its reset: {e}");
        }
        self.dev.fail();
        if self.leave_resetting(HbaState::Failed) {
            self.impaired.store(true, Ordering::Relaxed);
            self.fma.service_impact(ServiceImpact::Lost);
        }
        for qi in 0..self.queues.len() {
            self.complete_parked(qi);
        }
    }
}
