//! Task management, command timeouts and the recovery ladder, device
//! reset, for every family (each performs the steps on its device:
//! [`Family::task_mgmt`], [`Family::stop`], [`Family::restart`]).
//!
//! A command past its `pkt_time` is aborted (ABORT TASK); if it does not
//! come back, its LUN is reset, then its target (I_T NEXUS RESET or the
//! family's nearest), then the whole device, which ends every outstanding command. Each step that
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
//! called where the caller may not wait, they hand the request to the work
//! task and return 1 at once: the request is accepted and performed
//! asynchronously, as the in-tree pvscsi does (pvscsi.c `pvscsi_reset`,
//! `pvscsi_abort`: write the request to the device and return 1 without
//! waiting for it). "May not wait" is interrupt context
//! (`servicing_interrupt()`), and also a completion routine the driver
//! runs from its own work task or watchdog: kernel threads, where
//! servicing_interrupt() is 0, but a TMF of seconds or a device reset
//! nested there would stall every completion behind it
//! ([`Hba::own_delivery`]). During a panic (a crash dump: sddump
//! resets with RESET_ALL and fails the dump on 0, sd.c) no task queue runs
//! any more, so the request is done at once, polled (ddi_in_panic(9F)).
//!
//! The commands concerned complete later, from the device's answer or the
//! reset, through `scsi_hba_pkt_comp` with no driver lock held
//! (`CMD_ABORTED` + `STAT_ABORTED`, `CMD_RESET` + `STAT_DEV_RESET` or
//! `STAT_BUS_RESET`). A queued reset that the device refuses is escalated
//! as sd would have done on a 0 (LUN, then target, then the whole device):
//! the caller was told it would happen. A queued abort that fails leaves
//! the command to its own deadline and the watchdog's ladder. A request is
//! never refused while the HBA runs or is being reset, since sd fails the
//! I/O with EIO when every reset returns 0 (sd.c `sd_pkt_status_busy`):
//! a device reset under way, or queued, covers any request, and a full
//! list collapses into one device reset ([`TaskRequests::push`]). 0 only
//! when nothing will be done: the HBA stopped or failed, the command not
//! found, or (in thread context) the device refused.
//!
//! A packet torn down while in flight where the caller may not wait (sd
//! destroys packets from its completion routine) cannot wait for a TMF
//! either, and cannot be deferred: the framework unbinds and frees it when
//! tran_teardown_pkt returns. `abandon_cmd` then resets the device without
//! waiting (one status read-back, a few microseconds), takes every command
//! back onto the parked lists, and leaves the bring-back (renegotiation,
//! activation, the others completing `CMD_RESET` + `STAT_BUS_RESET`) to
//! the work task. Nothing reachable from an interrupt handler performs
//! task management (a family may hold a lock without interrupt priority
//! across the seconds a TMF may take: virtio's control queue), except a
//! FLAG_NOINTR command polled in interrupt context (`poll_to_completion`,
//! whose recovery runs inline).

use super::cmd::{Cmd, CmdState};
use super::family::{DeviceRing, Family, StopError, StopWait, TaskMgmt, TmAddress, TmAnswer};
use super::io::Reaper;
use super::{AttachError, Hba, HbaState, Lun};
use crate::ddi::kstat::HbaStat;
use crate::ddi::{cpu, time};
use crate::dev_warn;
use crate::ffi;
use crate::probes;
use crate::scsa::PktStatistics;
use crate::scsa::addr::LunNumber;

/// How long a recovery step waits for the command to come back.
const STEP_WAIT_US: i64 = ffi::MICROSEC;
/// How long `abandon_cmd` in interrupt context waits for another thread to
/// let go of a torn-down packet's command (it holds it for a few
/// microseconds: a completion under way, a reset taking the commands
/// back). Well within the millisecond of busy waiting an interrupt may do
/// in all (test/emu/src/ddi/time.rs INTERRUPT_SPIN_LIMIT_US).
const INTERRUPT_LET_GO_US: i64 = 200;

/// Task-management requests the work task can hold at once.
pub const MAX_TASK_REQUESTS: usize = 16;

/// A `tran_abort(9E)` or `tran_reset(9E)` request: performed at once in
/// thread context, or handed to the work task (see the module
/// documentation and [`Hba::caller`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskRequest {
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

/// What `tran_reset(9E)` was asked to reset (the entry point decodes
/// scsi_reset(9F)'s `RESET_*` level into this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetLevel {
    /// `RESET_LUN`: the LUN of the address.
    Lun,
    /// `RESET_TARGET`: the target of the address.
    Target,
    /// `RESET_ALL` or `RESET_BUS`: the whole device (one bus).
    All,
}

/// How [`TaskRequests::push`] took a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// In a slot of its own.
    Slot,
    /// Covered by what is queued already: the same request, or a device
    /// reset (which resets every LUN and target and ends every
    /// outstanding command).
    Covered,
    /// Every slot was taken: the list became a single device reset,
    /// which covers every request it held and this one.
    Collapsed,
}

/// The requests queued for the work task (in the work state, under its
/// lock: a fixed array, as nothing on this path may allocate).
#[derive(Default)]
pub struct TaskRequests {
    slots: [Option<TaskRequest>; MAX_TASK_REQUESTS],
    /// The device was stopped and its commands taken back by a caller
    /// that may not wait (see [`Hba::abandon_cmd`]); the work task
    /// brings it back. A flag, not a slot: never refused, never collapsed.
    bring_back: bool,
}

impl TaskRequests {
    /// Adds `r`. Never refuses: sd fails the I/O with EIO when every
    /// reset it tries returns 0 (sd.c `sd_pkt_status_busy`), so a full
    /// list collapses into one device reset instead, which covers all it
    /// held (their commands end `CMD_RESET`, as a reset ends them).
    pub fn push(&mut self, r: TaskRequest) -> Queued {
        if self
            .slots
            .iter()
            .any(|s| *s == Some(r) || *s == Some(TaskRequest::DeviceReset))
        {
            return Queued::Covered;
        }
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(r);
                Queued::Slot
            }
            None => {
                *self = TaskRequests {
                    bring_back: self.bring_back,
                    ..TaskRequests::default()
                };
                self.slots[0] = Some(TaskRequest::DeviceReset);
                Queued::Collapsed
            }
        }
    }

    /// Asks the work task to bring back a device stopped by a caller that
    /// may not wait (never refused).
    pub fn request_bring_back(&mut self) {
        self.bring_back = true;
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        !self.bring_back && self.slots.iter().all(Option::is_none)
    }

    /// Takes every queued request, leaving the list empty.
    pub fn take(&mut self) -> TaskRequests {
        core::mem::take(self)
    }
}

/// Where a `tran_abort(9E)` or `tran_reset(9E)` call comes from, and so
/// how it is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    /// A thread that may wait: served at once (the TMF or the reset done
    /// before returning).
    Thread,
    /// Interrupt context, or a target driver's completion routine run by
    /// the driver's own delivery (the work task, the watchdog, a reset's
    /// completions): handed to the work task, 1 at once.
    MayNotWait,
    /// The system is panicking (a crash dump: sddump resets with
    /// RESET_ALL and gives up on 0, sd.c): no task queue runs any more,
    /// so served at once, polled, never sleeping.
    Panic,
}

/// The mark [`Hba::own_delivery`] leaves while the driver delivers
/// completions from a context of its own; dropping it removes the mark.
pub(crate) struct OwnDelivery<'a, F: Family>(&'a Hba<F>);

impl<F: Family> Drop for OwnDelivery<'_, F> {
    fn drop(&mut self) {
        let mut w = self.0.work.lock();
        w.own_deliveries = w.own_deliveries.saturating_sub(1);
    }
}

/// Task management about a whole LUN (or its target).
fn lun_address(l: Lun) -> TmAddress {
    TmAddress {
        target: l.target,
        lun: l.lun,
        tag: 0,
        queue: 0,
        slot: 0,
    }
}

/// A command the watchdog found past its deadline, by its coordinates
/// (the command itself stays owned by its ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// Request queue.
    pub queue: u16,
    /// Head descriptor in that ring.
    pub slot: u16,
    /// Its tag: the slot may be reused by another command.
    pub tag: u64,
    /// The packet's address, for tracing only (0 for none).
    pub pkt: crate::probes::PktAddr,
    /// Target.
    pub target: u8,
    /// LUN.
    pub lun: LunNumber,
}

impl Expired {
    /// Whom ABORT TASK of this command is about.
    fn address(&self) -> TmAddress {
        TmAddress {
            target: self.target,
            lun: self.lun,
            tag: self.tag,
            queue: self.queue,
            slot: self.slot,
        }
    }
}

impl<F: Family> Hba<F> {
    /// Sends `tmf` (about packet `pkt`, if any, for tracing) and tells
    /// whether the device performed it.
    fn tmf_ok(&self, tm: TaskMgmt, pkt: probes::PktAddr, at: TmAddress, can_sleep: bool) -> bool {
        let (target, lun) = (at.target, at.lun);
        let answer = if self.state() == HbaState::Running {
            F::task_mgmt(self, tm, &at, can_sleep)
        } else {
            TmAnswer::Unavailable
        };
        let done = match answer {
            TmAnswer::Done => true,
            TmAnswer::Refused(r) => {
                dev_warn!(
                    self.dip,
                    "{} (target {target} lun {lun}) failed: response {r}",
                    self.dev.task_mgmt_name(tm)
                );
                false
            }
            TmAnswer::NoAnswer => {
                dev_warn!(
                    self.dip,
                    "{} (target {target} lun {lun}): no answer from the device",
                    self.dev.task_mgmt_name(tm)
                );
                false
            }
            TmAnswer::Unavailable => false,
        };
        self.count(match (tm, done) {
            (TaskMgmt::AbortTask | TaskMgmt::AbortTaskSet, true) => HbaStat::AbortsDone,
            (TaskMgmt::AbortTask | TaskMgmt::AbortTaskSet, false) => HbaStat::AbortsFailed,
            (TaskMgmt::LunReset, true) => HbaStat::LunResetsDone,
            (TaskMgmt::LunReset, false) => HbaStat::LunResetsFailed,
            (TaskMgmt::TargetReset, true) => HbaStat::TargetResetsDone,
            (TaskMgmt::TargetReset, false) => HbaStat::TargetResetsFailed,
        });
        match tm {
            TaskMgmt::AbortTask | TaskMgmt::AbortTaskSet => {
                probes::cmd_abort(pkt, target, lun, done)
            }
            TaskMgmt::LunReset => probes::reset(ffi::RESET_LUN, target, lun, done),
            TaskMgmt::TargetReset => probes::reset(ffi::RESET_TARGET, target, lun, done),
        }
        done
    }

    /// Finds command `cmd` in the request rings.
    fn locate(&self, cmd: &Cmd<F::CmdExt>) -> Option<Expired> {
        for (qi, q) in self.queues.iter().enumerate() {
            let mut g = q.ring.lock();
            let mut found = None;
            g.ring.for_each_outstanding(&mut |slot, c| {
                if c.is(cmd) {
                    let f = c.fields_ref();
                    found = Some(Expired {
                        queue: qi as u16,
                        slot,
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
        match g.ring.get_mut(e.slot) {
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
        let reap = who == Reaper::Poller || !self.dev.interrupts();
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
            (TaskMgmt::AbortTask, PktStatistics::empty()),
            (TaskMgmt::LunReset, PktStatistics::DEV_RESET),
            (TaskMgmt::TargetReset, PktStatistics::DEV_RESET),
        ];
        for (tmf, stat) in steps {
            if !self.mark(&e, stat, true) {
                return;
            }
            if self.tmf_ok(tmf, e.pkt, e.address(), can_sleep)
                && self.wait_gone(&e, STEP_WAIT_US, can_sleep, who)
            {
                return;
            }
        }
        if self.mark(&e, PktStatistics::BUS_RESET, true) {
            // Nothing short of a reset got an answer: the device stopped
            // answering (ereport), and is reset.
            self.no_response(e.target, e.lun.get());
            self.reset_device_as("command timeout recovery", who);
        }
    }

    /// Recovery of a polled command past its time (called by its poller).
    /// `limit_s` is the time it was given.
    pub(crate) fn recover_polled(&self, cmd: &Cmd<F::CmdExt>, limit_s: i64, can_sleep: bool) {
        if let Some(e) = self.locate(cmd) {
            self.count(HbaStat::Timeouts);
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
        let mut found = [None::<Expired>; super::work::MAX_EXPIRED];
        let mut n = 0;
        for (qi, q) in self.queues.iter().enumerate() {
            let mut g = q.ring.lock();
            g.ring.for_each_outstanding(&mut |slot, c| {
                let f = c.fields();
                if n < room && !f.polled && f.deadline != 0 && now - f.deadline >= 0 && !f.timed_out
                {
                    f.timed_out = true;
                    self.count(HbaStat::Timeouts);
                    let pkt = f.pkt.as_ref();
                    probes::cmd_timeout(
                        pkt.map_or(0, |p| p.as_ptr() as usize),
                        f.target,
                        f.lun,
                        pkt.map_or(0, |p| p.time()),
                    );
                    found[n] = Some(Expired {
                        queue: qi as u16,
                        slot,
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
    /// flight) and makes sure the device no longer uses its buffers.
    ///
    /// When this returns, the framework unbinds the packet's DMA and frees
    /// the packet, and with it the command (its HBA private area):
    /// scsi_destroy_pkt(9F) -> `scsi_free_cache_pkt` calls
    /// tran_teardown_pkt, then `scsi_dmafree_attr` (ddi_dma_unbind_handle)
    /// and `kmem_cache_free` (usr/src/uts/common/io/scsi/impl/
    /// scsi_resource.c). Under a DEBUG kernel's kmem the destructor runs
    /// then and the memory is filled with 0xdeadbeef
    /// (kmem_cache_free_debug), and any cache may be reaped at any time. So
    /// the device must have stopped using the command's buffers, and
    /// nothing of the HBA may still hold the command: it must be idle, not
    /// merely marked abandoned on some list.
    ///
    /// - A caller that may wait (thread context; a panic): the recovery
    ///   ladder (ABORT TASK, LUN reset, I_T nexus reset, device reset),
    ///   bounded, by spinning.
    /// - A caller that may not wait ([`Caller::MayNotWait`]): interrupt
    ///   context (sd destroys packets from its completion routine, which
    ///   runs in the HBA's interrupt handler: scsi_hba_pkt_comp calls
    ///   pkt_comp directly, scsi_hba.c), or a completion routine the
    ///   driver runs from its own work task or watchdog. No TMF
    ///   (it waits for the device, holding the control-queue lock, which
    ///   has no interrupt priority). If the device already returned the
    ///   command, it is ended here. Otherwise the device is reset without
    ///   waiting for more than a few microseconds
    ///   ([`StopWait::Briefly`]), every outstanding command is taken back
    ///   onto its queue's parked list, this one is ended, and the work
    ///   task brings the device back and completes the others `CMD_RESET`
    ///   (`run_task_requests` -> [`Self::bring_back`]).
    pub(crate) fn abandon_cmd(&self, cmd: &Cmd<F::CmdExt>) {
        let may_not_wait = self.caller() == Caller::MayNotWait;
        if let Some(e) = self.cut_loose(cmd) {
            if may_not_wait {
                self.take_back_without_waiting(&e);
            } else {
                self.recover(e, false, Reaper::Poller);
            }
        }
        // Out of the device now (or never found in it): done by it, or
        // taken back by a reset, it may be parked on a queue's list, or a
        // thread may be finishing it. Take it off the list, or wait
        // (briefly if the caller may not wait) for that thread to let go.
        let limit_us = if may_not_wait {
            INTERRUPT_LET_GO_US
        } else {
            STEP_WAIT_US
        };
        let start = time::hrtime();
        let mut spins = 0u32;
        loop {
            if cmd.state() == CmdState::Idle || self.unpark(cmd) {
                return;
            }
            if (time::hrtime() - start) / 1000 >= limit_us {
                dev_warn!(
                    self.dip,
                    "a torn-down packet's command could not be taken back (state {:?})",
                    cmd.state()
                );
                return;
            }
            time::poll_pause(&mut spins, false);
        }
    }

    /// Finds `cmd` in the request rings and cuts it loose from its packet
    /// (it will be completed to nobody); where it is, if it is there.
    fn cut_loose(&self, cmd: &Cmd<F::CmdExt>) -> Option<Expired> {
        for (qi, q) in self.queues.iter().enumerate() {
            let mut found = None;
            let mut g = q.ring.lock();
            g.ring.for_each_outstanding(&mut |slot, c| {
                if c.is(cmd) {
                    let f = c.fields();
                    f.pkt = None;
                    f.abandoned = true;
                    found = Some(Expired {
                        queue: qi as u16,
                        slot,
                        tag: f.tag,
                        pkt: 0,
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

    /// Interrupt context: gets the cut-loose command `e` out of the device
    /// without waiting for it (see [`Self::abandon_cmd`]). Takes only the
    /// request-queue and work locks, which have the interrupt priority.
    fn take_back_without_waiting(&self, e: &Expired) {
        // Returned by the device already: reaping its queue ends it.
        self.reap_as(usize::from(e.queue), Reaper::Poller);
        if !self.outstanding(e) {
            return;
        }
        // Another thread resetting the device (state RESETTING) takes it
        // back itself; abandon_cmd waits briefly for that.
        let Some(stopped) = self.stop_and_reclaim(
            "a packet was torn down in flight in interrupt context",
            StopWait::Briefly,
        ) else {
            return;
        };
        if stopped.is_err() {
            // Nothing more can be done here without waiting: the work
            // task's bring-back waits for the reset (renegotiate).
            dev_warn!(
                self.dip,
                "the device did not confirm a finished reset within microseconds: it may still use the buffers of the torn-down packet"
            );
        }
        self.schedule(|w| w.task_requests.request_bring_back());
    }

    /// Takes `cmd` off the parked list of its queue, if it is there, and
    /// ends it without a packet (the device no longer has it: it returned
    /// it, or a reset took it back). True if it was there.
    fn unpark(&self, cmd: &Cmd<F::CmdExt>) -> bool {
        for q in self.queues.iter() {
            let taken = q.ring.lock().deferred.remove_first(|c| c.is(cmd));
            if let Some(mut c) = taken {
                let f = c.fields();
                f.pkt = None;
                f.abandoned = true;
                c.release(CmdState::Idle);
                return true;
            }
        }
        false
    }

    /// How a `tran_abort(9E)` or `tran_reset(9E)` call made now is served
    /// (see [`Caller`]). A crash dump comes first: in a panic the task
    /// queue never runs, whatever the context (ddi_in_panic(9F)). Then
    /// interrupt context (servicing_interrupt(9F)), and the driver's own
    /// completion delivery from its task and watchdog, which are kernel
    /// threads (servicing_interrupt() is 0 there) but must not run a TMF
    /// of seconds, or a device reset, nested in a completion routine.
    fn caller(&self) -> Caller {
        if cpu::in_panic() {
            Caller::Panic
        } else if cpu::servicing_interrupt() || self.work.lock().own_deliveries > 0 {
            Caller::MayNotWait
        } else {
            Caller::Thread
        }
    }

    /// Marks the driver as delivering completions to target drivers from
    /// a context of its own (the work task, the watchdog, a reset's
    /// completions) until the mark is dropped: a `tran_abort` or
    /// `tran_reset` their completion routines make meanwhile goes to the
    /// work task. The mark is per HBA, not per thread (illumos has no
    /// thread identity in the DDI, and `curthread` is no exported
    /// function): a thread-context caller of another thread that comes
    /// while it is set is served by the work task too, which tran_reset(9E)
    /// allows (1 means accepted; the in-tree pvscsi always works this way).
    /// Nesting is counted.
    pub(crate) fn own_delivery(&self) -> OwnDelivery<'_, F> {
        let mut w = self.work.lock();
        w.own_deliveries = w.own_deliveries.saturating_add(1);
        drop(w);
        OwnDelivery(self)
    }

    /// `tran_abort(9E)` of one packet: ABORT TASK. True if the device
    /// performed it (the command then completes `CMD_ABORTED`), or, when
    /// the caller may not wait, if the work task will send it.
    pub fn abort_cmd(&self, cmd: &Cmd<F::CmdExt>) -> bool {
        let Some(e) = self.locate(cmd) else {
            return false;
        };
        self.serve(TaskRequest::AbortTask(e))
    }

    /// `tran_abort(9E)` without a packet: ABORT TASK SET of the LUN.
    pub fn abort_lun(&self, lun: Lun) -> bool {
        self.serve(TaskRequest::AbortTaskSet(lun))
    }

    /// `tran_reset(9E)`: the LUN, the target, or the whole device.
    pub fn reset(&self, lun: Lun, level: ResetLevel) -> bool {
        self.serve(match level {
            ResetLevel::Lun => TaskRequest::LunReset(lun),
            ResetLevel::Target => TaskRequest::TargetReset(lun),
            ResetLevel::All => TaskRequest::DeviceReset,
        })
    }

    /// Performs `r` now or hands it to the work task, as its caller
    /// allows; whether it was done (or accepted).
    fn serve(&self, r: TaskRequest) -> bool {
        match self.caller() {
            Caller::MayNotWait => self.queue_task_request(r),
            Caller::Thread => self.perform(r, true),
            Caller::Panic => self.perform(r, false),
        }
    }

    /// Performs `r` here (`can_sleep`: whether waits may sleep; false in a
    /// panic). A device reset under way covers any request: it resets
    /// every LUN and target and ends every outstanding command. Not in a
    /// panic, though: the thread doing that reset no longer runs (the
    /// panic stops every other CPU), so the dump's device reset takes it
    /// over, and a TMF, which needs a running device, fails (sd then asks
    /// for RESET_ALL).
    fn perform(&self, r: TaskRequest, can_sleep: bool) -> bool {
        if self.state() == HbaState::Resetting {
            if can_sleep {
                return true;
            }
            return r == TaskRequest::DeviceReset
                && self.leave_resetting(HbaState::Running)
                && self.reset_device("crash dump: a reset the panic interrupted, done again");
        }
        match r {
            TaskRequest::AbortTask(e) => {
                self.tmf_ok(TaskMgmt::AbortTask, e.pkt, e.address(), can_sleep)
            }
            TaskRequest::AbortTaskSet(l) => {
                self.tmf_ok(TaskMgmt::AbortTaskSet, 0, lun_address(l), can_sleep)
            }
            TaskRequest::LunReset(l) => {
                self.tmf_ok(TaskMgmt::LunReset, 0, lun_address(l), can_sleep)
            }
            TaskRequest::TargetReset(l) => {
                self.tmf_ok(TaskMgmt::TargetReset, 0, lun_address(l), can_sleep)
            }
            // Never sleeps: the same in a panic.
            TaskRequest::DeviceReset => self.reset_device("reset requested"),
        }
    }

    /// Queues `r` for the work task (takes only the work lock, which has
    /// the interrupt priority). Never refuses while the HBA runs or is
    /// being reset (see [`TaskRequests::push`]; a reset under way covers
    /// every request); false once it is stopped or failed: nothing will
    /// be done.
    fn queue_task_request(&self, r: TaskRequest) -> bool {
        match self.state() {
            HbaState::Running => {
                self.schedule(|w| {
                    w.task_requests.push(r);
                });
                true
            }
            HbaState::Resetting => true,
            _ => false,
        }
    }

    /// Performs the requests [`Self::queue_task_request`] accepted (the
    /// work task: may wait and sleep). A reset the device refuses goes one
    /// level up, as sd_reset_target would have on a 0: the caller was told
    /// it would happen. Stops as soon as the HBA is no longer running:
    /// stopped (teardown or quiesce: detach goes ahead only with no
    /// command in flight), failed or being reset (the reset ended, or
    /// ends, every command the rest concerned).
    pub(crate) fn run_task_requests(&self, requests: TaskRequests) {
        if requests.bring_back && self.state() == HbaState::Resetting {
            // Stopped and taken back by abandon_cmd, which could not wait;
            // renegotiate() waits for the reset to finish.
            self.bring_back(Ok(()), Reaper::Free);
        }
        for r in requests.slots.iter().flatten() {
            if self.state() != HbaState::Running {
                return;
            }
            match *r {
                TaskRequest::AbortTask(e) => {
                    // Done meanwhile: nothing to abort (its tag names no
                    // other command: tags are not reused).
                    if self.outstanding(&e) {
                        self.tmf_ok(TaskMgmt::AbortTask, e.pkt, e.address(), true);
                    }
                }
                TaskRequest::AbortTaskSet(l) => {
                    self.tmf_ok(TaskMgmt::AbortTaskSet, 0, lun_address(l), true);
                }
                TaskRequest::LunReset(l) => {
                    if !self.tmf_ok(TaskMgmt::LunReset, 0, lun_address(l), true)
                        && !self.tmf_ok(TaskMgmt::TargetReset, 0, lun_address(l), true)
                    {
                        self.reset_device("a LUN reset accepted for the work task failed");
                    }
                }
                TaskRequest::TargetReset(l) => {
                    if !self.tmf_ok(TaskMgmt::TargetReset, 0, lun_address(l), true) {
                        self.reset_device("a target reset accepted for the work task failed");
                    }
                }
                TaskRequest::DeviceReset => {
                    self.reset_device("reset accepted for the work task");
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
    /// interrupt or watchdog tick completes them. It never sleeps (the
    /// device's reset is busy-waited), so a panic may call it too.
    ///
    /// The state goes back to RUNNING only from RESETTING: a teardown or
    /// quiesce(9E) that stopped the HBA meanwhile wins, and the device this
    /// brought back up is reset again, so that it stops using the rings
    /// the teardown is about to free.
    pub(crate) fn reset_device_as(&self, why: &str, who: Reaper) -> bool {
        match self.stop_and_reclaim(why, StopWait::Spinning) {
            Some(stopped) => self.bring_back(stopped, who),
            None => false,
        }
    }

    /// The first half of a device reset: RUNNING -> RESETTING (`None` if
    /// the HBA was not running: another reset is under way, or it failed
    /// or stopped), the device reset (`wait`: how long to wait for it to
    /// finish), and every outstanding request-queue command taken back
    /// onto its queue's parked list. Takes no lock without the interrupt
    /// priority (callable in interrupt context with
    /// [`StopWait::Briefly`]). The result says whether the device is known
    /// to have stopped.
    pub(crate) fn stop_and_reclaim(
        &self,
        why: &str,
        wait: StopWait,
    ) -> Option<Result<(), StopError>> {
        if !self
            .state
            .transition(HbaState::Running, HbaState::Resetting)
        {
            return None;
        }
        self.count(HbaStat::DeviceResets);
        dev_warn!(self.dip, "resetting the device: {why}");
        let stopped = self.dev.stop(wait);
        // The device no longer touches the rings (if it did not say so in
        // time, the bring-back waits for its reset or fails it; nothing of
        // the HBA may keep a command of a packet torn down meanwhile): take
        // everything back, onto each queue's parked list, under its lock,
        // ended by the reset.
        // Not onto a list of this thread: while the device is brought back
        // and the commands are completed, a target driver may tear down one
        // of their packets (from another thread, or from the completion
        // routine of another packet run here), and abandon_cmd must find
        // the command to cut it loose before the packet is freed.
        for q in self.queues.iter() {
            let mut g = q.ring.lock();
            let r = &mut *g;
            let deferred = &mut r.deferred;
            r.ring.reclaim_all(&mut |mut c| {
                c.mark_owned();
                c.fields().reset_forced = true;
                deferred.push(c);
            });
            r.kick_pending = false;
        }
        Some(stopped)
    }

    /// The second half of a device reset (state RESETTING, the commands
    /// taken back by [`Self::stop_and_reclaim`]; thread context: it takes
    /// the control-queue lock and waits for the device): the control and
    /// event queues emptied, the device renegotiated and activated, the
    /// state RUNNING (or FAILED; or still STOPPED if a teardown came
    /// meanwhile), the parked commands completed as `who` may. True if the
    /// device came back.
    pub(crate) fn bring_back(&self, stopped: Result<(), StopError>, who: Reaper) -> bool {
        let up = stopped
            .map_err(AttachError::from)
            .and_then(|()| F::restart(self));
        let ok = match up {
            Ok(()) => {
                let back = self.leave_resetting(HbaState::Running);
                if !back {
                    // Stopped meanwhile: stop the device again (a
                    // teardown's own reset may have come before ours).
                    if let Err(e) = self.dev.stop(StopWait::Spinning) {
                        dev_warn!(self.dip, "stopping the device after its reset: {e}");
                        // The device may still use the rings: a teardown
                        // waiting for this task must know. Its step 6 stops
                        // the device itself when the state is no longer
                        // STOPPED, and keeps the memory if that fails too.
                        self.state.store(HbaState::Failed);
                    }
                } else {
                    self.device_back();
                }
                back
            }
            Err(e) => {
                dev_warn!(self.dip, "device did not come back after reset: {e}");
                self.dev.fail();
                self.leave_resetting(HbaState::Failed);
                self.reset_failed();
                false
            }
        };
        probes::reset(ffi::RESET_ALL, 0, LunNumber::ZERO, ok);
        // The completion routines run from here ask for recovery as from
        // any completion (sd resets on CMD_RESET unless STAT_BUS_RESET is
        // set): never nested inside this reset (see `own_delivery`).
        let _delivering = self.own_delivery();
        for (qi, q) in self.queues.iter().enumerate() {
            if who == Reaper::Free {
                // One at a time, each taken under the lock (complete_parked).
                self.complete_parked(qi);
                continue;
            }
            // A poller (which may hold driver locks) leaves the target
            // drivers' commands parked for the next interrupt or watchdog
            // tick, and ends here only the polled, internal and abandoned
            // ones, which no target driver can tear down (their pollers, or
            // abandon_cmd, wait for them).
            let mut own = q.ring.lock().deferred.take_where(|c| {
                let f = c.fields_ref();
                f.pkt.is_none() || f.polled
            });
            while let Some(c) = own.pop() {
                self.finish(c, None);
            }
        }
        ok
    }

    /// RESETTING -> `to`, unless the state changed meanwhile (to STOPPED:
    /// a teardown or quiesce); whether it did.
    pub(crate) fn leave_resetting(&self, to: HbaState) -> bool {
        self.state.transition(HbaState::Resetting, to)
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
        Lun {
            target,
            lun: LunNumber::ZERO,
        }
    }

    #[test]
    fn task_requests_are_kept_once_and_collapse_into_a_device_reset_when_full() {
        let mut d = TaskRequests::default();
        assert!(d.is_empty());
        assert_eq!(d.push(TaskRequest::LunReset(lun(1))), Queued::Slot);
        // The same request again is already accepted: no second slot.
        assert_eq!(d.push(TaskRequest::LunReset(lun(1))), Queued::Covered);
        for t in 2..=MAX_TASK_REQUESTS as u8 {
            assert_eq!(d.push(TaskRequest::TargetReset(lun(t))), Queued::Slot);
        }
        assert_eq!(d.slots.iter().flatten().count(), MAX_TASK_REQUESTS);
        // Full: not refused (sd would fail the I/O), but one device reset
        // covering everything the list held.
        assert_eq!(d.push(TaskRequest::AbortTaskSet(lun(9))), Queued::Collapsed);
        assert_eq!(d.slots[0], Some(TaskRequest::DeviceReset));
        assert_eq!(d.slots.iter().flatten().count(), 1);
        // Anything more is covered by that reset, without a slot.
        assert_eq!(d.push(TaskRequest::LunReset(lun(3))), Queued::Covered);
        assert_eq!(d.push(TaskRequest::AbortTaskSet(lun(4))), Queued::Covered);
        assert_eq!(d.push(TaskRequest::DeviceReset), Queued::Covered);
        let taken = d.take();
        assert!(d.is_empty());
        assert_eq!(taken.slots.iter().flatten().count(), 1);
    }

    #[test]
    fn a_queued_device_reset_covers_later_requests() {
        let mut d = TaskRequests::default();
        assert_eq!(d.push(TaskRequest::DeviceReset), Queued::Slot);
        assert_eq!(d.push(TaskRequest::TargetReset(lun(2))), Queued::Covered);
        assert_eq!(d.slots.iter().flatten().count(), 1);
    }

    #[test]
    fn a_bring_back_request_is_never_refused_and_taken_with_the_rest() {
        let mut d = TaskRequests::default();
        for t in 0..MAX_TASK_REQUESTS as u8 {
            assert_eq!(d.push(TaskRequest::TargetReset(lun(t))), Queued::Slot);
        }
        d.request_bring_back();
        // Full: the list collapses into one device reset, the bring-back
        // stays requested.
        assert_eq!(d.push(TaskRequest::DeviceReset), Queued::Collapsed);
        let taken = d.take();
        assert!(taken.bring_back && !taken.is_empty());
        assert!(d.is_empty() && !d.bring_back);
        let mut only = TaskRequests::default();
        only.request_bring_back();
        assert!(!only.is_empty(), "the work task is dispatched for it alone");
    }
}
