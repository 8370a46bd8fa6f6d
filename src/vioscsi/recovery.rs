//! Task management (virtio 1.2 §5.6.6.2), command timeouts and the
//! recovery ladder, device reset.
//!
//! A command past its `pkt_time` is aborted (ABORT TASK); if it does not
//! come back, its LUN is reset, then its target (I_T NEXUS RESET), then the
//! whole device, which ends every outstanding command. Each step that
//! touched the command adds its statistics bit (`STAT_DEV_RESET`,
//! `STAT_BUS_RESET`); the command completes `CMD_TIMEOUT` +
//! `STAT_TIMEOUT` however it finally ends.
//!
//! `tran_abort(9E)` and `tran_reset(9E)` "can be called from user or
//! interrupt context" (their CONTEXT sections, from scsi_abort(9F) and
//! scsi_reset(9F)), and sd calls scsi_reset from its completion routine:
//! sdintr -> sd_pkt_reason_cmd_{incomplete,tran_err,reset,aborted,timeout}
//! and sd_pkt_reason_default -> sd_reset_target, which tries RESET_LUN,
//! then RESET_TARGET, then RESET_ALL (sd.c). A TMF waits for the device
//! (up to seconds) and a device reset waits for it too, which interrupt
//! context must not do (delay(9F): user and kernel context only;
//! condvar(9F): cv_wait should not be called from interrupt context). So
//! called in interrupt context (`servicing_interrupt()`), they hand the
//! request to the work task and return 1 at once: the request is accepted
//! and performed asynchronously, as the in-tree pvscsi does (pvscsi.c
//! `pvscsi_reset`, `pvscsi_abort`: write the request to the device and
//! return 1 without waiting for it). The commands concerned complete later,
//! from the device's answer or the reset, through `scsi_hba_pkt_comp` with
//! no driver lock held (`CMD_ABORTED` + `STAT_ABORTED`, `CMD_RESET` +
//! `STAT_DEV_RESET` or `STAT_BUS_RESET`). A deferred reset that the device
//! refuses is escalated as sd would have done on a 0 (LUN, then target,
//! then the whole device): the caller was told it would happen. A deferred
//! abort that fails leaves the command to its own deadline and the
//! watchdog's ladder. 0 only when nothing could be accepted (the HBA not
//! running, the command not found, the deferred list full).

use super::cmd::{Cmd, CmdList};
use super::hba::{AttachError, Lun, Stats, VioScsi, state};
use super::io::{Forced, Reaper};
use super::proto::{self, CONTROL_QUEUE, Tmf};
use crate::ddi::dma::{DmaBuffer, DmaMode};
use crate::ddi::{Dip, Sleep, cpu, time};
use crate::dev_warn;
use crate::ffi;
use crate::probes;
use crate::scsa::PktStatistics;
use crate::shmem::SharedMem;
use crate::virtio::ring::{Segment, SplitQueue};
use core::sync::atomic::Ordering;

/// How long a TMF may take before the device is considered unresponsive.
const TMF_TIMEOUT_US: i64 = 5 * ffi::MICROSEC;
/// How long a recovery step waits for the command to come back.
const STEP_WAIT_US: i64 = ffi::MICROSEC;
/// Offset of the TMF response in the control buffer.
const TMF_RESP_OFF: usize = 32;

/// The control queue and the buffer of the one TMF in flight.
pub struct ControlQueue {
    /// The ring (chains carry no token: one TMF at a time).
    pub ring: SplitQueue<DmaBuffer, ()>,
    buf: DmaBuffer,
    /// False after a TMF never came back (its buffer still belongs to the
    /// device); a device reset makes it usable again.
    pub usable: bool,
}

impl ControlQueue {
    /// The control queue in `mem`, with its request buffer.
    pub fn new(dip: Dip, mem: DmaBuffer, size: u16, event_idx: bool) -> Result<Self, AttachError> {
        let ring = SplitQueue::new(mem, size, event_idx)
            .ok_or(AttachError::Device("control queue memory"))?;
        let buf = DmaBuffer::alloc(dip, 64, 64, u64::MAX, DmaMode::Streaming, Sleep::Yes)?;
        Ok(Self {
            ring,
            buf,
            usable: true,
        })
    }
}

/// Task management requests accepted in interrupt context and left to the
/// work task: at most this many at once.
pub const MAX_DEFERRED: usize = 16;

/// A `tran_abort(9E)` or `tran_reset(9E)` request made in interrupt
/// context, for the work task to perform (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferred {
    /// ABORT TASK of this command (if it is still outstanding then).
    AbortTask(Expired),
    /// ABORT TASK SET of a LUN (`tran_abort` without a packet).
    AbortTaskSet(Lun),
    /// LOGICAL UNIT RESET (`RESET_LUN`).
    LunReset(Lun),
    /// I_T NEXUS RESET (`RESET_TARGET`).
    TargetReset(Lun),
    /// Device reset (`RESET_ALL`, `RESET_BUS`).
    DeviceReset,
}

/// The deferred requests (in the work state, under its lock: a fixed
/// array, as nothing on this path may allocate).
#[derive(Default)]
pub struct DeferredTmfs {
    slots: [Option<Deferred>; MAX_DEFERRED],
}

impl DeferredTmfs {
    /// Adds `d` (a request already queued counts as accepted); false if
    /// the list is full.
    pub fn push(&mut self, d: Deferred) -> bool {
        if self.slots.contains(&Some(d)) {
            return true;
        }
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(d);
                true
            }
            None => false,
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Takes every queued request, leaving the list empty.
    pub fn take(&mut self) -> DeferredTmfs {
        core::mem::take(self)
    }
}

/// A command the watchdog found past its deadline, by its coordinates
/// (the command itself stays owned by its ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// Request queue.
    pub queue: u16,
    /// Head descriptor in that ring.
    pub head: u16,
    /// Its tag: the head may be reused by another command.
    pub tag: u64,
    /// The packet's address, for tracing only (0 for none).
    pub pkt: crate::probes::PktAddr,
    /// Target.
    pub target: u8,
    /// LUN.
    pub lun: u16,
}

impl VioScsi {
    /// Sends a TMF and polls the control queue for its response; `None` if
    /// the device did not answer in time or cannot take a TMF now.
    pub(crate) fn tmf(
        &self,
        tmf: Tmf,
        target: u8,
        lun: u16,
        tag: u64,
        can_sleep: bool,
    ) -> Option<u8> {
        if self.state() != state::RUNNING {
            return None;
        }
        let mut c = self.ctl.lock();
        if !c.usable {
            return None;
        }
        Stats::bump(&self.stats.tmfs);
        c.buf
            .write_bytes(0, &proto::tmf_request(tmf, target, lun, tag));
        c.buf.write_bytes(TMF_RESP_OFF, &[0xff]);
        c.buf.sync_for_device(0, TMF_RESP_OFF + 1);
        let base = c.buf.device_addr();
        let chain = [
            Segment {
                addr: base,
                len: proto::TMF_REQ_LEN as u32,
                device_writes: false,
            },
            Segment {
                addr: base + TMF_RESP_OFF as u64,
                len: 1,
                device_writes: true,
            },
        ];
        if c.ring.add_chain(chain, ()).is_err() {
            return None;
        }
        if c.ring.publish() {
            self.transport.notify(CONTROL_QUEUE);
        }
        let start = time::hrtime();
        let mut spins = 0u32;
        loop {
            match c.ring.pop_used() {
                Some(Ok(_)) => {
                    c.buf.sync_for_cpu(TMF_RESP_OFF, 1);
                    let mut r = [0u8];
                    c.buf.read_bytes(TMF_RESP_OFF, &mut r);
                    return Some(r[0]);
                }
                Some(Err(e)) => {
                    dev_warn!(self.dip, "control queue: bad used element {e:?}");
                }
                None => {}
            }
            if (time::hrtime() - start) / 1000 >= TMF_TIMEOUT_US {
                dev_warn!(
                    self.dip,
                    "{} (target {target} lun {lun}): no answer from the device",
                    tmf.name()
                );
                c.usable = false;
                return None;
            }
            time::poll_pause(&mut spins, can_sleep);
        }
    }

    /// Sends `tmf` (about packet `pkt`, if any, for tracing) and tells
    /// whether the device performed it.
    fn tmf_ok(
        &self,
        tmf: Tmf,
        pkt: probes::PktAddr,
        target: u8,
        lun: u16,
        tag: u64,
        can_sleep: bool,
    ) -> bool {
        let done = match self.tmf(tmf, target, lun, tag, can_sleep) {
            Some(r) if proto::tmf_succeeded(r) => true,
            Some(r) => {
                dev_warn!(
                    self.dip,
                    "{} (target {target} lun {lun}) failed: response {r}",
                    tmf.name()
                );
                false
            }
            None => false,
        };
        match tmf {
            Tmf::AbortTask | Tmf::AbortTaskSet => probes::cmd_abort(pkt, target, lun, done),
            Tmf::LogicalUnitReset => probes::reset(ffi::RESET_LUN, target, lun, done),
            Tmf::ItNexusReset => probes::reset(ffi::RESET_TARGET, target, lun, done),
        }
        done
    }

    /// Finds command `cmd` in the request rings.
    fn locate(&self, cmd: &Cmd) -> Option<Expired> {
        for (qi, q) in self.queues.iter().enumerate() {
            let mut g = q.ring.lock();
            let mut found = None;
            g.ring.for_each_outstanding(|head, c| {
                if c.is(cmd) {
                    let f = c.fields_ref();
                    found = Some(Expired {
                        queue: qi as u16,
                        head,
                        tag: f.tag,
                        pkt: f.pkt.as_ref().map_or(0, |p| p.as_ptr() as usize),
                        target: f.target,
                        lun: f.lun,
                    });
                }
            });
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// Adds `stat` to the recovery statistics of `e` if it is still in its
    /// ring; false if it is gone.
    fn mark(&self, e: &Expired, stat: PktStatistics, timed_out: bool) -> bool {
        let Some(q) = self.queues.get(usize::from(e.queue)) else {
            return false;
        };
        let mut g = q.ring.lock();
        match g.ring.token_mut(e.head) {
            Some(c) if c.fields_ref().tag == e.tag => {
                let f = c.fields();
                f.recovery |= stat;
                f.timed_out |= timed_out;
                true
            }
            _ => false,
        }
    }

    fn outstanding(&self, e: &Expired) -> bool {
        self.mark(e, PktStatistics::empty(), false)
    }

    /// Waits until `e` is gone or `limit_us` passed. A poller (which may
    /// wait for its own command where the queue's interrupt cannot come,
    /// e.g. inside that very handler), or anyone in polled mode, reaps
    /// `e`'s queue meanwhile; the work task (`Reaper::Free`) with
    /// interrupts on leaves the completion to the interrupt handler, as
    /// for every command, so that target drivers' completion routines
    /// (which may ask for more recovery: sd resets from there) do not run
    /// nested inside a recovery on the task queue.
    fn wait_gone(&self, e: &Expired, limit_us: i64, can_sleep: bool, who: Reaper) -> bool {
        let start = time::hrtime();
        let mut spins = 0u32;
        let reap = who == Reaper::Poller || !self.mode.interrupts();
        loop {
            if reap {
                self.reap_as(usize::from(e.queue), who);
            }
            if !self.outstanding(e) {
                return true;
            }
            if (time::hrtime() - start) / 1000 >= limit_us {
                return false;
            }
            time::poll_pause(&mut spins, can_sleep);
        }
    }

    /// The recovery ladder for one timed-out command (`who`: whether the
    /// caller may hold driver locks).
    pub(crate) fn recover(&self, e: Expired, can_sleep: bool, who: Reaper) {
        let steps = [
            (Tmf::AbortTask, PktStatistics::empty()),
            (Tmf::LogicalUnitReset, PktStatistics::DEV_RESET),
            (Tmf::ItNexusReset, PktStatistics::DEV_RESET),
        ];
        for (tmf, stat) in steps {
            if !self.mark(&e, stat, true) {
                return;
            }
            if self.tmf_ok(tmf, e.pkt, e.target, e.lun, e.tag, can_sleep)
                && self.wait_gone(&e, STEP_WAIT_US, can_sleep, who)
            {
                return;
            }
        }
        if self.mark(&e, PktStatistics::BUS_RESET, true) {
            self.reset_device_as("command timeout recovery", who);
        }
    }

    /// Recovery of a polled command past its time (called by its poller).
    /// `limit_s` is the time it was given.
    pub(crate) fn recover_polled(&self, cmd: &Cmd, limit_s: i64, can_sleep: bool) {
        if let Some(e) = self.locate(cmd) {
            probes::cmd_timeout(
                e.pkt,
                e.target,
                e.lun,
                limit_s.try_into().unwrap_or(i32::MAX),
            );
            dev_warn!(
                self.dip,
                "polled command to target {} lun {} timed out",
                e.target,
                e.lun
            );
            self.recover(e, can_sleep, Reaper::Poller);
        }
    }

    /// The watchdog's look for commands past their deadline: marks them
    /// and hands them to the work task (a bounded number per tick).
    pub(crate) fn scan_timeouts(&self) {
        // Work whose dispatch failed (ddi_taskq_dispatch with DDI_NOSLEEP
        // may) is dispatched again from here, once a tick.
        self.schedule(|_| {});
        let room = self.work.lock().expired_room();
        if room == 0 {
            return;
        }
        let now = time::lbolt();
        let mut found = [None::<Expired>; super::events::MAX_EXPIRED];
        let mut n = 0;
        for (qi, q) in self.queues.iter().enumerate() {
            let mut g = q.ring.lock();
            g.ring.for_each_outstanding(|head, c| {
                let f = c.fields();
                if n < room && !f.polled && f.deadline != 0 && now - f.deadline >= 0 && !f.timed_out
                {
                    f.timed_out = true;
                    let pkt = f.pkt.as_ref();
                    probes::cmd_timeout(
                        pkt.map_or(0, |p| p.as_ptr() as usize),
                        f.target,
                        f.lun,
                        pkt.map_or(0, |p| p.time()),
                    );
                    found[n] = Some(Expired {
                        queue: qi as u16,
                        head,
                        tag: f.tag,
                        pkt: pkt.map_or(0, |p| p.as_ptr() as usize),
                        target: f.target,
                        lun: f.lun,
                    });
                    n += 1;
                }
            });
        }
        if n > 0 {
            for e in found.iter().flatten() {
                dev_warn!(
                    self.dip,
                    "command to target {} lun {} timed out",
                    e.target,
                    e.lun
                );
            }
            self.schedule(|w| {
                for e in found.iter().flatten() {
                    w.push_expired(*e);
                }
            });
        }
    }

    /// Cuts command `cmd` loose from its packet (torn down while in
    /// flight) and makes sure the device no longer uses its buffers: the
    /// recovery ladder, ending in a device reset if need be. Bounded; does
    /// not sleep (the context is the target driver's).
    pub(crate) fn abandon_cmd(&self, cmd: &Cmd) {
        let mut found = None;
        for (qi, q) in self.queues.iter().enumerate() {
            let mut g = q.ring.lock();
            g.ring.for_each_outstanding(|head, c| {
                if c.is(cmd) {
                    let f = c.fields();
                    f.pkt = None;
                    f.abandoned = true;
                    found = Some(Expired {
                        queue: qi as u16,
                        head,
                        tag: f.tag,
                        pkt: 0,
                        target: f.target,
                        lun: f.lun,
                    });
                }
            });
            // Done by the device, parked for completion: just cut loose.
            g.deferred.for_each(|c| {
                if c.is(cmd) {
                    let f = c.fields();
                    f.pkt = None;
                    f.abandoned = true;
                }
            });
            if found.is_some() {
                break;
            }
        }
        if let Some(e) = found {
            self.recover(e, false, Reaper::Poller);
        }
    }

    /// `tran_abort(9E)` of one packet: ABORT TASK. True if the device
    /// performed it (the command then completes `CMD_ABORTED`), or, in
    /// interrupt context, if the work task will send it.
    pub fn abort_cmd(&self, cmd: &Cmd) -> bool {
        let Some(e) = self.locate(cmd) else {
            return false;
        };
        if cpu::servicing_interrupt() {
            return self.defer(Deferred::AbortTask(e));
        }
        self.tmf_ok(Tmf::AbortTask, e.pkt, e.target, e.lun, e.tag, true)
    }

    /// `tran_abort(9E)` without a packet: ABORT TASK SET of the LUN
    /// (deferred in interrupt context).
    pub fn abort_lun(&self, lun: Lun) -> bool {
        if cpu::servicing_interrupt() {
            return self.defer(Deferred::AbortTaskSet(lun));
        }
        self.tmf_ok(Tmf::AbortTaskSet, 0, lun.target, lun.lun, 0, true)
    }

    /// `tran_reset(9E)`: LUN, target, or (`RESET_ALL`, `RESET_BUS`) the
    /// whole device; in interrupt context, accepted for the work task.
    pub fn reset(&self, lun: Lun, level: i32) -> bool {
        let request = match level {
            ffi::RESET_LUN => Deferred::LunReset(lun),
            ffi::RESET_TARGET => Deferred::TargetReset(lun),
            ffi::RESET_ALL | ffi::RESET_BUS => Deferred::DeviceReset,
            _ => return false,
        };
        if cpu::servicing_interrupt() {
            return self.defer(request);
        }
        match request {
            Deferred::LunReset(l) => {
                self.tmf_ok(Tmf::LogicalUnitReset, 0, l.target, l.lun, 0, true)
            }
            Deferred::TargetReset(l) => self.tmf_ok(Tmf::ItNexusReset, 0, l.target, l.lun, 0, true),
            _ => self.reset_device("reset requested"),
        }
    }

    /// Queues `d` for the work task (interrupt context: takes only the
    /// work lock, which has the interrupt priority). False if the HBA is
    /// not running or the list is full: nothing was accepted.
    fn defer(&self, d: Deferred) -> bool {
        if self.state() != state::RUNNING {
            return false;
        }
        let mut accepted = false;
        self.schedule(|w| accepted = w.tmfs.push(d));
        accepted
    }

    /// Performs the requests [`Self::defer`] accepted (the work task: may
    /// wait and sleep). A reset the device refuses goes one level up, as
    /// sd_reset_target would have on a 0.
    pub(crate) fn run_deferred(&self, requests: DeferredTmfs) {
        for d in requests.slots.iter().flatten() {
            match *d {
                Deferred::AbortTask(e) => {
                    // Done meanwhile: nothing to abort (its tag names no
                    // other command: tags are not reused).
                    if self.outstanding(&e) {
                        self.tmf_ok(Tmf::AbortTask, e.pkt, e.target, e.lun, e.tag, true);
                    }
                }
                Deferred::AbortTaskSet(l) => {
                    self.tmf_ok(Tmf::AbortTaskSet, 0, l.target, l.lun, 0, true);
                }
                Deferred::LunReset(l) => {
                    if !self.tmf_ok(Tmf::LogicalUnitReset, 0, l.target, l.lun, 0, true)
                        && !self.tmf_ok(Tmf::ItNexusReset, 0, l.target, l.lun, 0, true)
                    {
                        self.reset_device("a LUN reset requested in interrupt context failed");
                    }
                }
                Deferred::TargetReset(l) => {
                    if !self.tmf_ok(Tmf::ItNexusReset, 0, l.target, l.lun, 0, true) {
                        self.reset_device("a target reset requested in interrupt context failed");
                    }
                }
                Deferred::DeviceReset => {
                    self.reset_device("reset requested in interrupt context");
                }
            }
        }
    }

    /// Resets and re-initializes the device, ending every outstanding
    /// command `CMD_RESET` + `STAT_BUS_RESET` (`CMD_TIMEOUT` for timed-out
    /// ones). False if another reset is in progress or the device could not
    /// be brought back (it is then marked failed, and no command is left
    /// behind either way).
    pub(crate) fn reset_device(&self, why: &str) -> bool {
        self.reset_device_as(why, Reaper::Free)
    }

    /// [`Self::reset_device`] for `who`: a poller (which may hold driver
    /// locks) parks the target drivers' commands it takes back; the next
    /// interrupt or watchdog tick completes them.
    pub(crate) fn reset_device_as(&self, why: &str, who: Reaper) -> bool {
        if self
            .state
            .compare_exchange(
                state::RUNNING,
                state::RESETTING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        Stats::bump(&self.stats.resets);
        dev_warn!(self.dip, "resetting the device: {why}");
        let stopped = self.transport.reset();
        // The device no longer touches the rings: take everything back.
        let mut taken = CmdList::new();
        for q in self.queues.iter() {
            let mut g = q.ring.lock();
            g.ring.reclaim_all(|c| taken.push(c));
            g.kick_pending = false;
        }
        {
            let mut c = self.ctl.lock();
            c.ring.reclaim_all(|()| {});
            c.usable = true;
        }
        self.evt.lock().ring.reclaim_all(|_| {});
        let up = stopped
            .map_err(AttachError::from)
            .and_then(|()| self.renegotiate())
            .and_then(|()| self.activate());
        let ok = match up {
            Ok(()) => {
                self.state.store(state::RUNNING, Ordering::Release);
                true
            }
            Err(e) => {
                dev_warn!(self.dip, "device did not come back after reset: {e}");
                self.transport.fail();
                self.state.store(state::FAILED, Ordering::Release);
                false
            }
        };
        probes::reset(ffi::RESET_ALL, 0, 0, ok);
        while let Some(mut c) = taken.pop() {
            c.mark_owned();
            let f = c.fields();
            if who == Reaper::Poller && f.pkt.is_some() && !f.polled {
                f.reset_forced = true;
                let qi = usize::from(f.queue);
                if let Some(q) = self.queues.get(qi) {
                    q.ring.lock().deferred.push(c);
                    continue;
                }
            }
            self.finish(c, Some(Forced::DeviceReset));
        }
        ok
    }

    /// Asks the work task to reset the device (from interrupt context).
    pub(crate) fn schedule_reset(&self) {
        self.schedule(|w| w.reset = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lun(target: u8) -> Lun {
        Lun { target, lun: 0 }
    }

    #[test]
    fn deferred_requests_are_kept_once_and_refused_when_full() {
        let mut d = DeferredTmfs::default();
        assert!(d.is_empty());
        assert!(d.push(Deferred::LunReset(lun(1))));
        // The same request again is already accepted: no second slot.
        assert!(d.push(Deferred::LunReset(lun(1))));
        for t in 2..MAX_DEFERRED as u8 {
            assert!(d.push(Deferred::TargetReset(lun(t))));
        }
        assert!(d.push(Deferred::DeviceReset), "the last free slot");
        assert!(!d.push(Deferred::AbortTaskSet(lun(9))), "full: refused");
        assert!(d.push(Deferred::DeviceReset), "queued already");
        let taken = d.take();
        assert!(d.is_empty());
        assert_eq!(taken.slots.iter().flatten().count(), MAX_DEFERRED);
        assert_eq!(
            taken
                .slots
                .iter()
                .filter(|s| **s == Some(Deferred::LunReset(lun(1))))
                .count(),
            1
        );
    }
}
