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
//! - a completion index further ahead than the device can have completed
//!   (virtio: more than a ring; pvscsi: more than the commands
//!   outstanding, or than the ring holds):
//!   `device.intern_uncorr` (detail `ring-protocol-violation`), DEGRADED;
//! - a completion naming no command outstanding (a duplicate, an id never
//!   issued, one out of every range; both families): dropped and counted
//!   (`cmpl_duplicate`, `cmpl_unknown`, `cmpl_impossible`), and
//!   `device.intern_uncorr` (detail `bad-completion`, payload `queue`,
//!   `id`) at most once a second, so that a device returning garbage does
//!   not flood fmd; no service impact: the command it may have meant is
//!   still outstanding and completes, or times out, by itself;
//! - a fault the I/O framework reports on a register access handle or a
//!   ring's DMA handle (`ddi_fm_acc_err_get(9F)`, `ddi_fm_dma_err_get`),
//!   looked at once a second by the watchdog and cleared when found
//!   (`ddi_fm_acc_err_clear(9F)`, `ddi_fm_dma_err_clear`):
//!   `device.intern_uncorr` (detail `access-handle-fault` or
//!   `dma-handle-fault`, with the handle error's ENA, which ties it to the
//!   nexus's own ereport). The Writing Device Drivers guide's recovery:
//!   the fault may be transient, so clear it, reset the device to a known
//!   state and retry; what was read through the handle, or is in memory
//!   bound to it, is indeterminate. So DEGRADED, and the work task resets
//!   the device: every command in flight ends `CMD_RESET` (the target
//!   drivers retry them), and the reset rewrites every ring. A fault found
//!   again within [`HANDLE_FAULT_WINDOW_SECS`] of that recovery persists:
//!   LOST, the device is reset (it stops DMA) and the HBA left FAILED, so
//!   new commands get TRAN_FATAL_ERROR (detach and attach it again). Either
//!   way the affected commands fail, none hangs;
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
use crate::ddi::fm::{DeviceFault, FmCaps, HandleHealth, ServiceImpact};
use crate::ddi::kstat::HbaStat;
use crate::dev_warn;
use core::sync::atomic::Ordering;

/// How long after a recovery from a handle fault another one is taken for
/// the same fault persisting: the controller is then taken out of service
/// rather than reset again and again (each reset fails every command in
/// flight).
pub const HANDLE_FAULT_WINDOW_SECS: i64 = 60;

/// Whether a bad completion at `now` is reported, the last report having
/// been at `last` (`i64::MIN`: none): a second (`hz` ticks) or more after.
fn report_again(last: i64, now: i64, hz: i64) -> bool {
    last == i64::MIN || now.wrapping_sub(last) >= hz
}

/// Whether a handle fault found at `now` is the last one persisting: it
/// came less than [`HANDLE_FAULT_WINDOW_SECS`] after the recovery that
/// ended at `recovered_at` (`i64::MIN`: there was none), on a clock of
/// `hz` ticks a second.
fn handle_fault_persists(recovered_at: i64, now: i64, hz: i64) -> bool {
    recovered_at != i64::MIN
        && now.wrapping_sub(recovered_at) < HANDLE_FAULT_WINDOW_SECS.saturating_mul(hz)
}

impl<F: Family> Hba<F> {
    /// Posts the ereport of `fault` with a fresh ENA and `members`, then
    /// the service impact.
    fn report(
        &self,
        fault: DeviceFault,
        impact: ServiceImpact,
        members: &[(&'static core::ffi::CStr, u64)],
    ) {
        self.report_as(fault, crate::ddi::fm::Fma::new_ena(), impact, members);
    }

    /// [`Self::report`] with the error's ENA `ena`; DEGRADED and LOST are
    /// remembered so that the device's return is reported RESTORED.
    fn report_as(
        &self,
        fault: DeviceFault,
        ena: u64,
        impact: ServiceImpact,
        members: &[(&'static core::ffi::CStr, u64)],
    ) {
        self.fma.report(fault, ena, members);
        if matches!(impact, ServiceImpact::Degraded | ServiceImpact::Lost) {
            self.impaired.store(true, Ordering::Relaxed);
        }
        self.fma.service_impact(impact);
    }

    /// A completion index of request queue `qi` further ahead of the
    /// driver's than the device can have completed: counted, logged,
    /// reported; the caller resets the device.
    pub(crate) fn ring_runaway(&self, qi: usize, device_idx: u32, expected: u32) {
        self.count(HbaStat::RingRunaway);
        dev_warn!(
            self.dip,
            "device completion index {device_idx} is ahead of {expected} by more than the device can have completed"
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

    /// A completion of request queue `qi` naming `id`, which no command
    /// outstanding has (counted by the caller): reported, at most once a
    /// second. Any context (the completion pass): `ddi_get_lbolt64(9F)`
    /// (any context; the deadline clock moves only once a watchdog tick,
    /// too coarse for a rate), an atomic and a post with DDI_NOSLEEP.
    pub(crate) fn bad_completion(&self, qi: usize, id: u64) {
        let now = crate::ddi::time::lbolt();
        let last = self.bad_completion_reported.load(Ordering::Relaxed);
        if !report_again(last, now, self.clock.hz()) {
            return;
        }
        // One pass of several racing ones reports.
        if self
            .bad_completion_reported
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.fma.report(
            DeviceFault::BadCompletion,
            crate::ddi::fm::Fma::new_ena(),
            &[(c"queue", qi as u64), (c"id", id)],
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
    /// each request ring's DMA handles, every fault found taken (cleared).
    /// A fault is counted and reported, and the work task recovers from
    /// it, or takes the controller out of service if it came back within
    /// [`HANDLE_FAULT_WINDOW_SECS`] of the last recovery. Nothing while a
    /// recovery is pending: its own reset is looked at after it.
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
        if self.handle_fault.load(Ordering::Acquire) {
            return;
        }
        let acc = self.dev.take_access_fault(&self.fma);
        let mut found = acc.is_faulted().then_some((DeviceFault::AccessHandle, acc));
        // Every ring's fault is taken, even after one was found.
        let rings = self
            .queues
            .iter()
            .map(|q| q.ring.lock().ring.take_dma_fault(&self.fma));
        let dma = rings.fold(
            self.dev.take_private_dma_fault(&self.fma),
            HandleHealth::first_of,
        );
        if found.is_none() && dma.is_faulted() {
            found = Some((DeviceFault::DmaHandle, dma));
        }
        let Some((fault, h)) = found else {
            return;
        };
        if self.handle_fault.swap(true, Ordering::AcqRel) {
            return;
        }
        self.count(HbaStat::HandleFaults);
        let persists = handle_fault_persists(
            self.handle_recovered_at.load(Ordering::Relaxed),
            now,
            self.clock.hz(),
        );
        let handle = if fault == DeviceFault::AccessHandle {
            "register"
        } else {
            "DMA"
        };
        // The handle error's ENA: the nexus's ereport and ours are one
        // error (ddifm.c: the ENA "should be set if this error is a result
        // of an error status returned from ddi_dma_err_check() or
        // ddi_acc_err_check()").
        let members = [(c"fm-status", h.status() as i64 as u64)];
        if persists {
            dev_warn!(
                self.dip,
                "the I/O framework reports a fault on the device's {handle} handle ({h:?}) again within {HANDLE_FAULT_WINDOW_SECS} s of recovering from one: taking the controller out of service"
            );
            // LOST once the device is stopped (take_out_of_service).
            self.fma.report(fault, h.ena(), &members);
            self.schedule(|w| w.out_of_service = true);
        } else {
            dev_warn!(
                self.dip,
                "the I/O framework reports a fault on the device's {handle} handle ({h:?}): resetting the device"
            );
            self.report_as(fault, h.ena(), ServiceImpact::Degraded, &members);
            self.schedule(|w| w.handle_recovery = true);
        }
    }

    /// The work task's recovery from a handle fault (already cleared): the
    /// device reset, every command in flight ended `CMD_RESET`, the device
    /// brought back (RESTORED; LOST if it does not come back). Nothing
    /// more if the HBA is not running: a reset under way resets the device
    /// anyway, a failed or stopping one needs none. The time is kept for
    /// the next fault's [`HANDLE_FAULT_WINDOW_SECS`].
    pub(crate) fn recover_from_handle_fault(&self) {
        self.reset_device("a fault on its handles");
        self.handle_recovered_at
            .store(self.clock.now(), Ordering::Relaxed);
        self.handle_fault.store(false, Ordering::Release);
    }

    /// The work task's part of a handle fault that persists: the device
    /// is reset (it stops DMA), every command in flight ends `CMD_RESET`,
    /// and the HBA stays FAILED (new commands: TRAN_FATAL_ERROR); the
    /// service is LOST. Nothing if the HBA is not running (stopping, or
    /// already failed).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_completion_is_reported_once_a_second_at_most() {
        let hz = 100;
        assert!(report_again(i64::MIN, 5, hz), "the first is reported");
        assert!(report_again(i64::MIN, i64::MIN + 1, hz));
        assert!(!report_again(1000, 1000, hz));
        assert!(!report_again(1000, 1000 + hz - 1, hz));
        assert!(report_again(1000, 1000 + hz, hz), "a second on");
        assert!(
            report_again(i64::MAX - 10, i64::MIN + hz, hz),
            "across the wrap"
        );
    }

    #[test]
    fn a_handle_fault_persists_only_within_the_window_after_a_recovery() {
        let hz = 100;
        let at = 1_000_000;
        assert!(!handle_fault_persists(i64::MIN, at, hz), "no recovery yet");
        assert!(!handle_fault_persists(i64::MIN, i64::MIN + 5, hz));
        assert!(handle_fault_persists(at, at, hz));
        assert!(handle_fault_persists(at, at + 3 * hz, hz));
        assert!(handle_fault_persists(at, at + 60 * hz - 1, hz));
        assert!(!handle_fault_persists(at, at + 60 * hz, hz), "a minute on");
        assert!(!handle_fault_persists(at, at + 3600 * hz, hz));
        // Across the clock's wrap.
        assert!(handle_fault_persists(i64::MAX - 10, i64::MIN + 10, hz));
    }
}
