//! The work task that runs what may block, and target discovery through
//! the SCSA target map.
//!
//! Discovery follows the in-tree drivers: one iport ("iport0") with a
//! full-set target map; each target that answers on LUN 0 is reported by
//! its hexadecimal address, and the framework finds the LUNs behind it
//! (REPORT LUNS) and names the children "target,lun64", the LUN in
//! illumos' `lun64` form (LUN 256 is `4100000000000000`; see
//! `scsa::addr`), which `tran_tgt_init` decodes. The probe is an
//! INQUIRY with an allocation length of 0: it moves no data and, unlike
//! TEST UNIT READY, does not consume a pending unit attention (SPC), so
//! the target driver still sees the power-on or reset unit attention.

use super::family::{Family, Presence};
use super::io::Reaper;
use super::recovery::{Expired, TaskRequests};
use super::{Hba, HbaState};
use crate::ddi::Dip;
use crate::ddi::tgtmap::TargetMap;
use crate::{dev_warn, ffi};

/// Timed-out commands the work task can hold.
pub const MAX_EXPIRED: usize = 16;

/// Work for the task queue: what was found in interrupt or watchdog
/// context and needs a thread.
#[derive(Default)]
pub struct Work {
    /// A task is queued or running.
    pub scheduled: bool,
    /// Run a full target discovery.
    pub discover: bool,
    /// Targets whose LUNs must be rescanned (bit per target).
    pub scan: [u64; 4],
    /// Reset the device.
    pub reset: bool,
    /// The I/O framework reported a fault on the device's handles: reset
    /// the device (`Hba::recover_from_handle_fault`).
    pub handle_recovery: bool,
    /// ... again, soon after a recovery: take the controller out of
    /// service (`Hba::take_out_of_service`).
    pub out_of_service: bool,
    /// Request queues to reap (bit per queue, `io::queue_bit`): their
    /// completion pass ran out of passes with completions waiting (see
    /// `VioScsi::reap_as`).
    pub reap_queues: u64,
    /// The iport is being detached: no discovery may start, one under way
    /// stops at the next target (its commands would hold the detach off).
    pub discovery_stopped: bool,
    /// Task management accepted for the work task (`tran_abort`,
    /// `tran_reset` from interrupt context or the driver's own delivery).
    pub task_requests: TaskRequests,
    /// Completion deliveries from the driver's own contexts under way
    /// (`VioScsi::own_delivery`).
    pub own_deliveries: u32,
    expired: [Option<Expired>; MAX_EXPIRED],
}

impl Work {
    /// Asks for a LUN rescan behind `target`.
    pub fn rescan_target(&mut self, target: u8) {
        set_bit(&mut self.scan, target);
    }

    /// Free slots for timed-out commands.
    pub fn expired_room(&self) -> usize {
        self.expired.iter().filter(|e| e.is_none()).count()
    }

    /// Records a timed-out command (dropped if full: the caller checked).
    pub fn push_expired(&mut self, e: Expired) {
        if let Some(slot) = self.expired.iter_mut().find(|s| s.is_none()) {
            *slot = Some(e);
        }
    }

    fn pending(&self) -> bool {
        let discovery =
            !self.discovery_stopped && (self.discover || self.scan.iter().any(|&b| b != 0));
        discovery
            || self.reset
            || self.out_of_service
            || self.handle_recovery
            || self.reap_queues != 0
            || !self.task_requests.is_empty()
            || self.expired.iter().any(Option::is_some)
    }
}

fn set_bit(map: &mut [u64; 4], t: u8) {
    map[usize::from(t / 64)] |= 1 << (t % 64);
}

fn bit(map: &[u64; 4], t: u8) -> bool {
    map[usize::from(t / 64)] & (1 << (t % 64)) != 0
}

impl<F: Family> Hba<F> {
    /// Queues work for the task (safe from interrupt context).
    pub(crate) fn schedule(&self, f: impl FnOnce(&mut Work)) {
        let dispatch = {
            let mut w = self.work.lock();
            f(&mut w);
            let d = !w.scheduled && w.pending();
            if d {
                w.scheduled = true;
            }
            d
        };
        if dispatch {
            let queued = self.taskq.as_ref().is_some_and(|tq| {
                let me = self.callback_arg();
                // SAFETY: detach waits for the task queue before freeing.
                unsafe { tq.dispatch(self.callbacks.work, me) }
            });
            if !queued {
                // Try again from the next watchdog tick.
                self.work.lock().scheduled = false;
            }
        }
    }

    /// The work task (runs on the task queue): resets, recoveries,
    /// discovery. Bounded: at most a few rounds, then it requeues itself.
    /// Everything it completes to the target drivers is the driver's own
    /// delivery: their completion routines' resets and aborts come back
    /// here, queued, instead of running nested inside (`own_delivery`).
    pub fn run_work(&self) {
        let _delivering = self.own_delivery();
        for _ in 0..8 {
            let work = {
                let mut w = self.work.lock();
                if !w.pending() || self.state() == HbaState::Stopped {
                    w.scheduled = false;
                    return;
                }
                let taken = if w.discovery_stopped {
                    // Left queued for when the iport attaches again.
                    (w.reset, false, [0; 4], w.expired)
                } else {
                    let t = (w.reset, w.discover, w.scan, w.expired);
                    w.discover = false;
                    w.scan = [0; 4];
                    t
                };
                w.reset = false;
                w.expired = [None; MAX_EXPIRED];
                (
                    taken,
                    w.task_requests.take(),
                    core::mem::take(&mut w.reap_queues),
                    core::mem::take(&mut w.out_of_service),
                    core::mem::take(&mut w.handle_recovery),
                )
            };
            let ((reset, discover, scan, expired), task_requests, reap_queues, out, recover) = work;
            if out {
                // Before anything else: nothing more goes to the device.
                self.take_out_of_service();
            }
            if recover {
                // Before anything else: the device's state is unknown.
                self.recover_from_handle_fault();
            }
            if reap_queues != 0 {
                self.reap_handed_off(reap_queues);
            }
            if reset {
                self.reset_device("the device asked for it");
            }
            self.run_task_requests(task_requests);
            for e in expired.iter().flatten() {
                self.recover(*e, true, Reaper::Free);
            }
            let present = if discover { self.discover() } else { None };
            for t in 0..=self.limits.max_target {
                // Targets a discovery just found absent have no LUNs left.
                if bit(&scan, t) && present.is_none_or(|p| bit(&p, t)) {
                    self.scan_luns(t);
                }
            }
        }
        self.work.lock().scheduled = false;
        self.schedule(|_| {});
    }

    /// Whether `target` answers on LUN 0.
    fn probe_target(&self, target: u8) -> Presence {
        // INQUIRY, allocation length 0 (see the module docs).
        let cdb = [0x12, 0, 0, 0, 0, 0];
        self.internal_command(target, crate::scsa::addr::LunNumber::ZERO, &cdb, 10)
    }

    /// A full-set discovery of every target; returns which answered, or
    /// `None` when it could not complete (the previous set stands).
    fn discover(&self) -> Option<[u64; 4]> {
        let guard = self.tgtmap.lock();
        let map = guard.as_ref()?;
        let mut obs = match map.begin() {
            Ok(o) => o,
            Err(e) => {
                dev_warn!(self.dip, "discovery: {e}");
                return None;
            }
        };
        let mut present = [0u64; 4];
        for t in 0..=self.limits.max_target {
            if !matches!(self.state(), HbaState::Running | HbaState::Resetting)
                || self.work.lock().discovery_stopped
            {
                return None; // the observation is flushed on drop
            }
            match self.probe_target(t) {
                Presence::Present => {
                    set_bit(&mut present, t);
                    if let Err(e) = obs.add(u32::from(t)) {
                        dev_warn!(self.dip, "discovery: target {t}: {e}");
                    }
                }
                Presence::Absent => {}
                Presence::Unknown => {
                    dev_warn!(
                        self.dip,
                        "discovery: target {t} did not answer; keeping the previous set"
                    );
                    return None;
                }
            }
        }
        if let Err(e) = obs.end() {
            dev_warn!(self.dip, "discovery: {e}");
        }
        Some(present)
    }

    fn scan_luns(&self, target: u8) {
        if let Some(map) = self.tgtmap.lock().as_ref() {
            map.scan_luns(u32::from(target));
        }
    }

    /// attach(9E) of the iport node: the target map (settle times as the
    /// in-tree drivers: 1 s sync, 2 s settle), then a discovery.
    pub fn iport_attach(&self, iport: Dip) -> bool {
        match TargetMap::create_fullset(iport, ffi::MICROSEC as i32, 2 * ffi::MICROSEC as i32) {
            Ok(map) => {
                *self.tgtmap.lock() = Some(map);
                self.resume_discovery();
                true
            }
            Err(e) => {
                dev_warn!(self.dip, "iport attach: {e}");
                false
            }
        }
    }

    /// First half of detach(9E) of the iport node: stops discovery and
    /// waits for the work task, so the driver's own probe commands are no
    /// longer in flight when the caller checks for commands. Undo with
    /// [`Self::resume_discovery`] if the detach is refused.
    pub fn stop_discovery(&self) {
        self.work.lock().discovery_stopped = true;
        if let Some(tq) = &self.taskq {
            tq.wait();
        }
    }

    /// Lets discovery run and schedules a full one: at iport attach, and
    /// when a detach is refused after all (a full discovery makes up for
    /// anything a stopped one missed).
    pub fn resume_discovery(&self) {
        self.schedule(|w| {
            w.discovery_stopped = false;
            w.discover = true;
        });
    }

    /// detach(9E) of the iport node, after [`Self::stop_discovery`]:
    /// destroys the map.
    pub fn iport_detach(&self) {
        if let Some(tq) = &self.taskq {
            tq.wait();
        }
        drop(self.tgtmap.lock().take());
    }

    /// Whether the iport's target map exists.
    pub fn has_tgtmap(&self) -> bool {
        self.tgtmap.lock().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsa::addr::LunNumber;

    fn expired() -> Expired {
        Expired {
            queue: 0,
            slot: 0,
            tag: 1,
            pkt: 0,
            target: 0,
            lun: LunNumber::ZERO,
        }
    }

    #[test]
    fn work_is_pending_for_each_kind_of_work_and_only_then() {
        let idle = Work::default();
        assert!(!idle.pending(), "nothing to do");
        let each: [fn(&mut Work); 6] = [
            |w| w.discover = true,
            |w| w.scan[1] = 1 << 3,
            |w| w.reset = true,
            |w| w.reap_queues = crate::hba::io::queue_bit(2),
            |w| w.task_requests.request_bring_back(),
            |w| w.push_expired(expired()),
        ];
        for (n, set) in each.iter().enumerate() {
            let mut w = Work::default();
            set(&mut w);
            assert!(w.pending(), "work kind {n} is pending");
        }
        // A stopped discovery keeps what it had for later, but asks for
        // no task now; a reset or a reap still does.
        let mut w = Work {
            discovery_stopped: true,
            discover: true,
            ..Work::default()
        };
        w.scan[0] = 1;
        assert!(!w.pending(), "discovery stopped");
        w.reset = true;
        assert!(w.pending(), "a reset while discovery is stopped");
        // Scheduling state and the delivery mark are not work.
        let marks = Work {
            scheduled: true,
            own_deliveries: 2,
            ..Work::default()
        };
        assert!(!marks.pending());
    }
}
