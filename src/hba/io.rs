//! The I/O path: `tran_start(9E)` and friends, submission to a request
//! queue, completion (interrupt, poll, watchdog), polled commands,
//! internal commands.
//!
//! Nothing here allocates, sleeps (except an internal command's poll from
//! thread context) or loops without a bound.

use super::cmd::{Cmd, CmdList, CmdState, OwnedCmd};
use super::family::{
    AddError, BadCompletion, CmdFacts, DeviceRing, Family, Presence, Request, TaskAttr,
};
use super::{Hba, HbaState, Lun, REAP_HINTS, Stats};
use crate::ddi::kstat::{HbaStat, QueueStat};
use crate::ddi::time;
use crate::dev_warn;
use crate::ffi;
use crate::probes;
use crate::scsa::flags::DataDir;
use crate::scsa::pkt::Pkt;
use crate::scsa::{Outcome, PktFlags, PktState, PktStatistics};
use core::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering};

/// Deadlines without a kernel call per command: the clock (`lbolt`) as the
/// watchdog last read it, and the clock rate read once. sd gives every
/// command a pkt_time (sd.c `sd_setup_rw_pkt`: `un_cmd_timeout`, 60 s by
/// default), so `ddi_get_lbolt64(9F)` and `drv_usectohz(9F)` per command
/// would be two kernel calls on every I/O. The clock read is at most one
/// watchdog interval old (1 s; 10 ms polled), so a deadline is that
/// interval later than the command's start plus its pkt_time: never
/// earlier (pkt_time is the least a command is given), and the watchdog,
/// which compares against a fresh `lbolt` once a tick, already sees a
/// deadline only to within its interval. A periodic the system runs late
/// (ddi_periodic_add(9F) promises no more than its interval) leaves the
/// reading older than that; a deadline set meanwhile is earlier by the
/// lateness, seconds against sd's 60.
pub struct DeadlineClock {
    /// `ddi_get_lbolt64()` at the last watchdog tick (or attach).
    now: AtomicI64,
    /// Ticks per second (`drv_usectohz(MICROSEC)`).
    hz: i64,
    /// Ticks per watchdog interval, at most (a second).
    slack: i64,
}

impl DeadlineClock {
    /// The clock, read now (attach: thread context).
    pub fn start() -> DeadlineClock {
        let hz = time::usec_to_ticks(ffi::MICROSEC).max(1);
        DeadlineClock {
            now: AtomicI64::new(time::lbolt()),
            hz,
            slack: hz,
        }
    }

    /// Reads the clock again (the watchdog tick).
    pub fn tick(&self) {
        self.now.store(time::lbolt(), Ordering::Relaxed);
    }

    /// The time of the last tick, in clock ticks.
    pub fn now(&self) -> i64 {
        self.now.load(Ordering::Relaxed)
    }

    /// Clock ticks per second.
    pub fn hz(&self) -> i64 {
        self.hz
    }

    /// The deadline of a command of `time_s` seconds started now.
    pub fn deadline(&self, time_s: i32) -> i64 {
        deadline_after(
            self.now.load(Ordering::Relaxed),
            self.hz,
            self.slack,
            time_s,
        )
    }
}

/// `time_s` seconds of `hz` ticks after `now`, plus `slack` ticks for the
/// age of `now`; never 0 (0 means "no deadline") and never wrapped.
fn deadline_after(now: i64, hz: i64, slack: i64, time_s: i32) -> i64 {
    let d = now
        .saturating_add(hz.saturating_mul(i64::from(time_s)))
        .saturating_add(slack);
    if d == 0 { 1 } else { d }
}

/// `SCSI_POLL_TIMEOUT`: seconds a polled command without `pkt_time` may take.
const POLL_TIMEOUT_S: i64 = 60;

/// Request queues an HBA may have: one bit each in a hand-off map.
pub const MAX_REQUEST_QUEUES: u32 = 64;

/// Completion passes one reap makes before it hands the queue on: each
/// pass empties the ring (at most a ring's worth) and re-arms, and
/// completions that keep landing meanwhile would otherwise hold an
/// interrupt handler without bound.
pub(crate) const REAP_PASSES: u32 = 4;

/// What a bounded reap does after a pass (see [`Hba::reap_as`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterPass {
    /// The re-arm's re-check found nothing: the device will interrupt for
    /// the next completion. Done.
    Settled,
    /// The re-check found more: another pass.
    Again,
    /// The re-check found more and no pass is left: hand the queue on.
    HandOff,
}

/// The pass budget of one bounded reap: the decision after each pass,
/// kept apart from the ring and lock work so that the ring's tests
/// (`crate::virtio::ring`, `a_bounded_reap_with_hand_off_strands_nothing`)
/// run the driver's own rule against an adversarial device.
#[derive(Clone, Copy, Debug)]
pub struct ReapPasses {
    left: u32,
}

impl ReapPasses {
    /// A budget of `passes` passes (at least one).
    pub const fn new(passes: u32) -> Self {
        Self {
            left: if passes == 0 { 1 } else { passes },
        }
    }

    /// The decision after a pass whose re-arm re-check found completions
    /// (`rearm_found_more`) or not. Returns [`AfterPass::Again`] at most
    /// `passes - 1` times: a loop that runs until anything else comes back
    /// is bounded by the budget.
    pub fn after_pass(&mut self, rearm_found_more: bool) -> AfterPass {
        if !rearm_found_more {
            return AfterPass::Settled;
        }
        self.left -= 1;
        if self.left == 0 {
            AfterPass::HandOff
        } else {
            AfterPass::Again
        }
    }
}

/// The bit of request queue `qi` in a hand-off map (`Work::reap_queues`).
/// Every request queue has one: [`MAX_REQUEST_QUEUES`] fits the map.
pub const fn queue_bit(qi: usize) -> u64 {
    const _: () = assert!(MAX_REQUEST_QUEUES <= u64::BITS);
    1 << (qi % u64::BITS as usize)
}

/// Bits of [`PassKicks`] that count the completion passes running.
const PASS_DEPTH_BITS: u32 = 16;
const PASS_DEPTH_MASK: u64 = (1 << PASS_DEPTH_BITS) - 1;
/// Request queues whose doorbell [`PassKicks`] can defer (one bit each
/// above the depth); a later queue's command rings at once.
pub(crate) const DEFERRABLE_QUEUES: usize = (64 - PASS_DEPTH_BITS) as usize;

/// Doorbells deferred to the end of a completion pass, for commands
/// started on a queue that is not being reaped itself while passes run
/// (the queue being reaped has its own `kick_pending`). Target drivers
/// start commands from their completion callbacks and from other CPUs
/// meanwhile; a queue's doorbell for all of them is rung once, by the
/// next pass to end, instead of once per command. One word: the passes
/// running (low bits) and a bit per deferred queue, so that a deferral
/// is never left without a pass to ring it, and no lock. A command
/// started while no pass runs (a lone command) rings at once.
pub(crate) struct PassKicks(AtomicU64);

impl PassKicks {
    pub(crate) const fn new() -> Self {
        PassKicks(AtomicU64::new(0))
    }

    /// A completion pass that runs target drivers' callbacks begins.
    fn enter(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Defers request queue `qi`'s doorbell to the end of a running pass:
    /// true if one will ring it. False: no pass runs, the caller rings
    /// (the bit is taken back; a pass that began meanwhile may ring it
    /// as well: a spare doorbell, never a missing one).
    fn defer(&self, qi: usize) -> bool {
        if qi >= DEFERRABLE_QUEUES {
            return false;
        }
        let bit = 1u64 << (PASS_DEPTH_BITS as usize + qi);
        if self.0.fetch_or(bit, Ordering::AcqRel) & PASS_DEPTH_MASK != 0 {
            return true;
        }
        self.0.fetch_and(!bit, Ordering::AcqRel);
        false
    }

    /// A pass ends: the request queues (bit n: queue n) whose doorbells it
    /// must ring now. Every pass end takes what is deferred, so a
    /// deferral waits at most for the longest pass running when it was
    /// made (the pass that was running then ends after it, and takes it).
    fn leave(&self) -> u64 {
        let before = self.0.fetch_sub(1, Ordering::AcqRel);
        if before >> PASS_DEPTH_BITS == 0 {
            return 0;
        }
        self.0.fetch_and(PASS_DEPTH_MASK, Ordering::AcqRel) >> PASS_DEPTH_BITS
    }
}

/// Per CPU (seqid modulo [`REAP_HINTS`]): 1 + the request queue whose
/// completions that CPU is delivering, 0 when none. A command a target
/// driver starts from its completion callback goes to that queue, so its
/// doorbell joins the one the pass rings at its end, whichever CPU the
/// queue's vector happens to interrupt (illumos does not tie a vector to
/// the CPU whose queue it serves). Only a hint: a collision sends a
/// command to another valid queue.
///
/// A pass marks its slot and, at its end, clears it only if the mark is
/// still its own. It does not restore what it found: passes on one slot
/// need not end in the reverse order they began (a kernel thread reaping
/// may be preempted and migrate, CPUs share slots), and a restored mark
/// of a pass that already ended would steer that CPU's commands to one
/// queue until the next pass there, for good on an idle queue. Clearing
/// means a slot holds only marks of passes still running; an outer pass
/// that an inner one cleared goes on without its hint.
pub(crate) struct ReapHints([AtomicU16; REAP_HINTS]);

impl ReapHints {
    pub(crate) const fn new() -> Self {
        ReapHints([const { AtomicU16::new(0) }; REAP_HINTS])
    }

    /// The queue a pass on CPU `cpu` is reaping, if it is one of the
    /// `nqueues`.
    fn queue_for(&self, cpu: u32, nqueues: u32) -> Option<u16> {
        match u32::from(self.slot(cpu).load(Ordering::Relaxed)) {
            h @ 1.. if h <= nqueues => Some((h - 1) as u16),
            _ => None,
        }
    }

    /// A pass on CPU `cpu` reaps queue `qi` until the mark is dropped.
    fn mark(&self, cpu: u32, qi: usize) -> HintMark<'_> {
        let slot = self.slot(cpu);
        let mine = (qi as u16).wrapping_add(1);
        slot.store(mine, Ordering::Relaxed);
        HintMark { slot, mine }
    }

    fn slot(&self, cpu: u32) -> &AtomicU16 {
        &self.0[cpu as usize % REAP_HINTS]
    }
}

/// A running pass's mark in [`ReapHints`]; dropping it clears the slot
/// unless a later pass marked it since.
struct HintMark<'a> {
    slot: &'a AtomicU16,
    mine: u16,
}

impl Drop for HintMark<'_> {
    fn drop(&mut self) {
        // Fails when another pass marked the slot since: that pass clears
        // it when it ends.
        let _ = self
            .slot
            .compare_exchange(self.mine, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Who reaps a ring, and so what it may do with what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reaper {
    /// No driver lock held: completes to the target drivers.
    Free,
    /// Waits for a command of its own, possibly under driver locks.
    Poller,
}

/// Why a command could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The ring is full (or the device is being reset): try again
    /// (TRAN_BUSY).
    Busy,
    /// The HBA cannot send anything: failed or stopped (TRAN_FATAL_ERROR).
    Fatal,
    /// This packet can never be sent: not ours, already in flight, or
    /// beyond what the device takes (TRAN_BADPKT).
    Invalid,
}

/// How a command ended without an answer from the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forced {
    /// The device was reset with the command outstanding.
    DeviceReset,
}

/// The SAM task attribute a packet's flags ask for.
pub fn task_attr(flags: PktFlags) -> TaskAttr {
    if flags.intersects(PktFlags::HTAG | PktFlags::HEAD) {
        TaskAttr::HeadOfQueue
    } else if flags.contains(PktFlags::OTAG) {
        TaskAttr::Ordered
    } else if flags.contains(PktFlags::ACA) {
        TaskAttr::Aca
    } else {
        TaskAttr::Simple
    }
}

impl<F: Family> Hba<F> {
    /// `tran_setup_pkt(9E)`: checks what the packet asks for against what
    /// the device takes. False (the framework frees the packet): a CDB
    /// longer than the device's or empty, no status byte, or a packet that
    /// is not ours.
    pub fn setup_pkt(&self, pkt: &Pkt, cmd: &Cmd<F::CmdExt>) -> bool {
        if !cmd.is_valid() || cmd.state() != CmdState::Idle {
            return false;
        }
        let cdblen = pkt.cdblen();
        cdblen >= 1 && cdblen <= self.limits.cdb_size && pkt.scblen() >= 1
    }

    /// `tran_teardown_pkt(9E)`: nothing to release (the command state is
    /// reused). A packet torn down while in flight is a target driver bug:
    /// the command is cut loose from the packet (it will never be
    /// completed to anyone) and taken out of the device before the
    /// framework unbinds its buffers.
    pub fn teardown_pkt(&self, cmd: &Cmd<F::CmdExt>) {
        if cmd.is_valid() && cmd.state() != CmdState::Idle {
            dev_warn!(
                self.dip,
                "packet torn down while in flight (state {:?}): aborting its command",
                cmd.state()
            );
            self.abandon_cmd(cmd);
        }
    }

    /// `tran_start(9E)`: Ok when the packet was accepted (a polled one has
    /// completed by then, its outcome in the packet). TRAN_BUSY and
    /// TRAN_BADPKT answers are counted in the HBA kstat.
    pub fn tran_start(&self, lun: Lun, cmd: &Cmd<F::CmdExt>, pkt: Pkt) -> Result<(), StartError> {
        let r = self.start_pkt(lun, cmd, pkt);
        match r {
            Err(StartError::Busy) => self.count(HbaStat::TranBusy),
            Err(StartError::Invalid) => self.count(HbaStat::TranBadPkt),
            _ => {}
        }
        r
    }

    fn start_pkt(&self, lun: Lun, cmd: &Cmd<F::CmdExt>, mut pkt: Pkt) -> Result<(), StartError> {
        if !cmd.is_valid() {
            return Err(StartError::Invalid);
        }
        let Some(mut c) = OwnedCmd::claim(cmd) else {
            // Already in flight: started twice.
            return Err(StartError::Invalid);
        };
        let flags = pkt.flags();
        let cookies = pkt.cookies();
        let Some(dir) = pkt.data_dir() else {
            c.release(CmdState::Idle);
            return Err(StartError::Invalid);
        };
        let cdb = pkt.cdb();
        if cdb.is_empty()
            || cdb.len() > self.limits.cdb_size as usize
            || cookies.len() > self.limits.segments as usize
        {
            c.release(CmdState::Idle);
            return Err(StartError::Invalid);
        }
        let req = Request {
            target: lun.target,
            lun: lun.lun,
            cdb,
            cookies,
            dir,
            task_attr: task_attr(flags),
            polled: flags.contains(PktFlags::NOINTR),
            time_s: pkt.time(),
            tag: self.next_tag.fetch_add(1, Ordering::Relaxed),
        };
        self.prepare(&mut c, &req);
        let (polled, time_s) = (req.polled, req.time_s);
        let queue = c.fields_ref().queue;
        pkt.reset_results();
        c.fields().pkt = Some(pkt);
        if let Err((mut c, e)) = self.submit(c) {
            // The packet goes back to the target driver untouched.
            let _ = c.fields().pkt.take();
            c.release(CmdState::Idle);
            return Err(e);
        }
        if polled {
            // FLAG_NOINTR (tran_start(9E)): run to completion here, in
            // whatever context we were called from; never sleep.
            let limit = if time_s > 0 {
                i64::from(time_s)
            } else {
                POLL_TIMEOUT_S
            };
            let mut c = self.poll_to_completion(cmd, queue, limit, false);
            // The outcome is in the packet; hand it back by returning.
            let _ = c.fields().pkt.take();
            c.release(CmdState::Idle);
        }
        Ok(())
    }

    /// Records what completion needs of `req` and has the family write
    /// what its device reads.
    pub(crate) fn prepare(&self, c: &mut OwnedCmd<F::CmdExt>, req: &Request<'_>) {
        let xfer: usize = req.cookies.iter().map(|k| k.dmac_size).sum();
        let deadline = if req.time_s > 0 && !req.polled {
            self.clock.deadline(req.time_s)
        } else {
            0
        };
        let queue = self.queue_for_this_cpu();
        let f = c.fields();
        f.reset_for_start();
        f.polled = req.polled;
        f.target = req.target;
        f.lun = req.lun;
        f.tag = req.tag;
        f.xfer = xfer;
        f.dir = req.dir;
        f.deadline = deadline;
        f.queue = queue;
        self.dev.prepare(f, req);
    }

    /// The request queue for a command started on this CPU: the queue
    /// whose completions this CPU is delivering, if any (the doorbell then
    /// joins that pass's), else the CPU's own (as Linux's virtio_scsi
    /// spreads them): commands from different CPUs meet on different
    /// locks and rings, and, where the system grants a vector per request
    /// queue (MSI-X with interrupt resource management), each queue
    /// interrupts on its own vector.
    fn queue_for_this_cpu(&self) -> u16 {
        let n = self.queues.len().max(1) as u32;
        if n == 1 {
            // No choice to make: no CPU lookup (a kernel call) per command.
            return 0;
        }
        let cpu = crate::ddi::cpu::current_seqid();
        self.reaping.queue_for(cpu, n).unwrap_or((cpu % n) as u16)
    }

    /// Puts a prepared command in its ring and notifies the device if it
    /// wants to be. On error the command comes back with the reason.
    pub(crate) fn submit(
        &self,
        c: OwnedCmd<F::CmdExt>,
    ) -> Result<(), (OwnedCmd<F::CmdExt>, StartError)> {
        match self.state() {
            HbaState::Running => {}
            HbaState::Resetting => return Err((c, StartError::Busy)),
            _ => return Err((c, StartError::Fatal)),
        }
        let qi = usize::from(c.fields_ref().queue);
        let Some(q) = self.queues.get(qi) else {
            return Err((c, StartError::Fatal));
        };
        let kick = {
            let mut g = q.ring.lock();
            let slot = match self.dev.add(&mut g.ring, c) {
                Ok(s) => s,
                Err((c, AddError::Full)) => {
                    q.kstat.counters().bump(QueueStat::RingFull);
                    return Err((c, StartError::Busy));
                }
                Err((c, AddError::Invalid)) => return Err((c, StartError::Invalid)),
            };
            if let Some(t) = g.ring.get_mut(slot) {
                let f = t.fields();
                f.slot = slot;
                if let Some(p) = &f.pkt {
                    // Under the queue lock: before any completion of it.
                    probes::cmd_start(p.as_ptr() as usize, f.target, f.lun, f.queue);
                }
                t.mark_queued();
            }
            // Under the queue lock, its only writer: no locked add.
            q.kstat.counters().add_exclusive(QueueStat::Commands, 1);
            // Visible to the device at once; whether it needs a doorbell
            // is decided once for the batch when a pass runs (reading the
            // device's suppression state is a sync per decision).
            g.ring.publish();
            if !self.dev.notify_batching() {
                g.ring.notify_needed()
            } else if g.completing > 0 {
                // This queue's completion pass is running: it decides and
                // notifies once at its end.
                g.kick_pending = true;
                false
            } else if self.pass_kicks.defer(qi) {
                // Another queue's pass runs: the first to end decides.
                false
            } else {
                g.ring.notify_needed()
            }
        };
        self.count(HbaStat::Started);
        if kick {
            q.kstat.counters().bump(QueueStat::Doorbells);
            self.dev.notify(qi);
        }
        Ok(())
    }

    /// Completes everything the device returned on request queue `qi`,
    /// from a context that holds no driver lock (the interrupt handler,
    /// the watchdog, the work task): pops under the queue lock, completes
    /// with the lock dropped, re-arms the interrupt and looks again, for
    /// at most [`REAP_PASSES`] passes (see [`Self::reap_as`] for what
    /// happens to completions still waiting after the last one).
    pub fn reap(&self, qi: usize) {
        self.reap_as(qi, Reaper::Free);
    }

    /// [`Self::reap`] from the interrupt handler of queue `qi`'s vector,
    /// counted in the queue's `interrupts`.
    pub fn reap_interrupted(&self, qi: usize) {
        self.count_queue(qi, QueueStat::Interrupts);
        self.reap_as(qi, Reaper::Free);
    }

    /// The work task's part of a reap that ran out of passes: reaps the
    /// request queues in `queues` (bits by [`queue_bit`]), those that
    /// handed themselves on and no other (thread context, no driver lock
    /// held). Bounded like any reap; a queue that is still busy hands
    /// itself on again. Each queue reaped here is counted in
    /// `handoff_reaps` and marked in `handoff_reaped_queues`.
    pub(crate) fn reap_handed_off(&self, queues: u64) {
        for n in 0..self.queues.len() {
            if queues & queue_bit(n) == 0 {
                continue;
            }
            Stats::bump(&self.stats.handoff_reaps);
            self.stats
                .handoff_reaped_queues
                .fetch_or(queue_bit(n), Ordering::Relaxed);
            self.reap(n);
        }
    }

    /// The watchdog's safety net (interrupt modes): a request queue whose
    /// completions have waited since the previous tick with nobody
    /// consuming them (and no completion pass running) is reaped here, and
    /// counted in `watchdog_reaps`. Nothing should ever be found (an
    /// interrupt or a hand-off covers every completion); a device that
    /// loses its interrupts is still served, within two ticks. The first
    /// time is logged, the rest only counted.
    pub(crate) fn watchdog_reap(&self) {
        for (n, q) in self.queues.iter().enumerate() {
            let waiting = {
                let mut g = q.ring.lock();
                let stalled = g.ring.stalled_since_last_look();
                stalled && g.completing == 0
            };
            if !waiting {
                continue;
            }
            // The watchdog alone counts these: the first is logged.
            let first = self.kstat_value(HbaStat::WatchdogReaps) == 0;
            self.count(HbaStat::WatchdogReaps);
            if first {
                dev_warn!(
                    self.dip,
                    "request queue {n} had completions and no interrupt for them: reaped by the watchdog (counted in kstat watchdog_reaps from now on, not logged)"
                );
            }
            self.reap(n);
        }
    }

    /// Completes the commands parked on queue `qi` (by a poller, or by a
    /// device reset), from a context that holds no driver lock. One at a
    /// time, each taken off the list under the lock: a completion routine
    /// run from here may tear down another parked packet, whose command
    /// `abandon_cmd` must then still find on the list (bounded by the
    /// number parked when it starts).
    pub(crate) fn complete_parked(&self, qi: usize) {
        let Some(q) = self.queues.get(qi) else {
            return;
        };
        let n = q.ring.lock().deferred.len();
        self.complete_parked_upto(qi, n);
    }

    /// [`Self::complete_parked`], at most `n` of them.
    fn complete_parked_upto(&self, qi: usize, n: usize) {
        let Some(q) = self.queues.get(qi) else {
            return;
        };
        for _ in 0..n {
            let Some(c) = q.ring.lock().deferred.pop() else {
                return;
            };
            self.finish(c, None);
        }
    }

    /// [`Self::reap`] for `who`: a [`Reaper::Poller`] waits for commands
    /// of its own and may hold driver locks, so it parks the target
    /// drivers' commands instead of completing them (`scsi_hba_pkt_comp`
    /// is never called under a driver lock).
    ///
    /// Each pass ends by re-arming ([`DeviceRing::rearm`]: for virtio,
    /// `used_event` := the driver's own next used index, a full fence, and
    /// a re-read of the device's used index, virtio 1.2 §2.7.10). If that
    /// re-read finds more, they may have landed before the device saw the
    /// re-arm, and no interrupt will come for this queue, ever, until the
    /// driver catches up (with EVENT_IDX the device interrupts only when
    /// its used index moves past `used_event`: §2.7.7.2; QEMU's
    /// virtio_split_should_notify, hw/virtio/virtio.c). So the next pass
    /// runs; and when the last pass still finds more (completions landing
    /// in every re-arm window, under load), the queue is handed to the
    /// work task, which reaps it from thread context and hands it on again
    /// while that lasts (counted in `rearm_handoffs`). The watchdog's
    /// [`Self::watchdog_reap`] is the safety net under both.
    ///
    /// The target drivers' commands go onto the parked list in any case,
    /// not onto a list of this thread, and a free reaper completes them
    /// from there one at a time: a completion routine run here (or another
    /// thread) may tear down another of these packets, and `abandon_cmd`
    /// must find its command to cut it loose before the framework frees
    /// it (under a DEBUG kernel's kmem the packet's destructor then runs at
    /// once and its memory is poisoned). Only the pollers' own commands
    /// (polled, internal, abandoned), which no target driver can tear
    /// down, are completed from a list of this thread.
    pub(crate) fn reap_as(&self, qi: usize, who: Reaper) {
        let Some(q) = self.queues.get(qi) else {
            return;
        };
        let mut passes = ReapPasses::new(REAP_PASSES);
        // Bounded: `after_pass` ends it within REAP_PASSES passes.
        loop {
            let mut own = CmdList::new();
            let mut runaway = None;
            let (more, first, parked) = {
                let mut g = q.ring.lock();
                g.completing += 1;
                let mut batch = 0u64;
                for _ in 0..g.ring.capacity() {
                    match g.ring.pop() {
                        None => break,
                        Some(Ok(c)) => {
                            batch += 1;
                            c.mark_owned();
                            let f = c.fields_ref();
                            if f.pkt.is_some() && !f.polled {
                                g.deferred.push(c);
                            } else {
                                own.push(c);
                            }
                        }
                        Some(Err(BadCompletion::Runaway {
                            device_idx,
                            expected,
                        })) => {
                            runaway = Some((device_idx, expected));
                            break;
                        }
                        Some(Err(b)) => {
                            let (stat, id, what) = match b {
                                BadCompletion::Duplicate { id } => {
                                    (HbaStat::CmplDuplicate, id, "a duplicate")
                                }
                                BadCompletion::Impossible { id } => {
                                    (HbaStat::CmplImpossible, id, "impossible")
                                }
                                BadCompletion::Unknown { id } => {
                                    (HbaStat::CmplUnknown, id, "not outstanding")
                                }
                                // Matched above.
                                BadCompletion::Runaway { .. } => (HbaStat::RingRunaway, 0, ""),
                            };
                            self.count(stat);
                            dev_warn!(
                                self.dip,
                                "device returned unknown command id {id} ({what}): dropped"
                            );
                            self.bad_completion(qi, id);
                        }
                    }
                }
                // Under the queue lock: the only writer of both.
                if batch > 0 {
                    let k = q.kstat.counters();
                    k.add_exclusive(QueueStat::Completions, batch);
                    k.raise_exclusive(QueueStat::BatchMax, batch);
                }
                let more = runaway.is_none() && self.dev.interrupts() && g.ring.rearm();
                // The first to complete comes off the list under this
                // lock already (it is completed right away); the others
                // are taken one at a time.
                let (first, parked) = if who == Reaper::Free {
                    (g.deferred.pop(), g.deferred.len())
                } else {
                    (None, 0)
                };
                (more, first, parked)
            };
            // Target drivers' callbacks run in this pass (only a free
            // reaper takes parked commands, `first` among them; a poller's
            // completions run none).
            let callbacks = first.is_some();
            if callbacks {
                self.pass_kicks.enter();
            }
            if first.is_some() || !own.is_empty() {
                // The hint steers commands started from these completions
                // to this queue (`queue_for_this_cpu`); with one queue
                // there is nothing to steer, and no CPU lookup to pay.
                let hint = (self.queues.len() > 1)
                    .then(|| self.reaping.mark(crate::ddi::cpu::current_seqid(), qi));
                while let Some(c) = own.pop() {
                    self.finish(c, None);
                }
                if let Some(c) = first {
                    self.finish(c, None);
                    self.complete_parked_upto(qi, parked);
                }
                drop(hint);
            }
            // What was deferred to this pass is taken before its own
            // queue's decision, so that one doorbell covers both; a command
            // started on another queue after the taking finds the pass
            // gone (and decides itself, or defers to another pass), one
            // started on this queue before the lock below is still in
            // this pass (`completing`) and is decided below.
            let mut due = if callbacks {
                self.pass_kicks.leave()
            } else {
                0
            };
            let deferred_here = qi < DEFERRABLE_QUEUES && due & (1u64 << qi) != 0;
            if deferred_here {
                due &= !(1u64 << qi);
            }
            let kick = {
                let mut g = q.ring.lock();
                g.completing -= 1;
                let pending = g.completing == 0 && g.kick_pending;
                if pending {
                    g.kick_pending = false;
                }
                (pending || deferred_here) && g.ring.notify_needed()
            };
            if kick {
                q.kstat.counters().bump(QueueStat::Doorbells);
                self.dev.notify(qi);
            }
            self.ring_deferred(due);
            if let Some((device_idx, expected)) = runaway {
                self.ring_runaway(qi, device_idx, expected);
                self.schedule_reset();
                return;
            }
            match passes.after_pass(more) {
                AfterPass::Settled => return,
                AfterPass::Again => {}
                AfterPass::HandOff => break,
            }
        }
        // Out of passes with completions waiting that the device may never
        // interrupt for: someone else must come back for this queue.
        self.count(HbaStat::RearmHandoffs);
        self.schedule(|w| w.reap_queues |= queue_bit(qi));
    }

    /// Decides for the request queues in `due` (bit n: queue n) whose
    /// commands deferred to a pass, and rings those that need it.
    fn ring_deferred(&self, mut due: u64) {
        // At most one bit per request queue: bounded.
        while due != 0 {
            let n = due.trailing_zeros() as usize;
            due &= due - 1;
            let Some(q) = self.queues.get(n) else {
                continue;
            };
            if q.ring.lock().ring.notify_needed() {
                q.kstat.counters().bump(QueueStat::Doorbells);
                self.dev.notify(n);
            }
        }
    }

    /// Ends a command the device returned (or that a reset took back):
    /// has the family decode the answer, writes the outcome into the
    /// packet, and gives the command to its poller or the packet to the
    /// framework.
    pub(crate) fn finish(&self, mut c: OwnedCmd<F::CmdExt>, forced: Option<Forced>) {
        self.count(HbaStat::Completed);
        let f = c.fields();
        let forced = forced.or(f.reset_forced.then_some(Forced::DeviceReset));
        let facts = CmdFacts {
            xfer: f.xfer,
            dir: f.dir,
            timed_out: f.timed_out,
            recovery: f.recovery,
        };
        let outcome = match forced {
            None => self.dev.decode(f, &facts),
            Some(Forced::DeviceReset) => {
                // No answer: the reset ended it. An internal command's
                // poller sees `reset_forced` (presence unknown).
                f.reset_forced = true;
                Outcome {
                    reason: ffi::CMD_RESET,
                    state: PktState::GOT_BUS | PktState::GOT_TARGET | PktState::SENT_CMD,
                    statistics: facts.recovery | PktStatistics::BUS_RESET,
                    resid: facts.xfer,
                    status: 0,
                }
                .timed_out(facts.timed_out)
            }
        };
        let polled = f.polled;
        let Some(mut pkt) = f.pkt.take() else {
            if f.abandoned {
                // Its packet was torn down: nobody waits for it.
                c.release(CmdState::Idle);
            } else {
                // An internal command: its poller reads the answer.
                c.release(CmdState::Done);
            }
            return;
        };
        if outcome.is_check_condition() && forced.is_none() {
            // The sense buffer only where there is sense (zeroing it costs
            // every good command some 30 instructions).
            let mut sense = [0u8; ffi::MAX_SENSE_LENGTH];
            let n = self.dev.copy_sense(f, &mut sense);
            pkt.set_outcome(&outcome, &sense[..n.min(sense.len())]);
        } else {
            pkt.set_outcome(&outcome, &[]);
        }
        probes::cmd_done(
            pkt.as_ptr() as usize,
            outcome.reason,
            outcome.status,
            outcome.state.bits(),
            outcome.statistics.bits(),
        );
        if polled {
            // The poller owns the packet again (and hands it back by
            // returning from tran_start).
            f.pkt = Some(pkt);
            c.release(CmdState::Done);
        } else {
            c.release(CmdState::Idle);
            pkt.complete();
        }
    }

    /// Waits (bounded by `limit_s` seconds, then recovery) until polled
    /// command `cmd` on queue `qi` is done, reaping the queue meanwhile;
    /// returns the command, owned again. `can_sleep` allows `delay(9F)`
    /// between polls instead of spinning.
    pub(crate) fn poll_to_completion(
        &self,
        cmd: &Cmd<F::CmdExt>,
        qi: u16,
        limit_s: i64,
        can_sleep: bool,
    ) -> OwnedCmd<F::CmdExt> {
        if let Some(c) = self.poll_for(cmd, qi, limit_s * ffi::MICROSEC, can_sleep) {
            return c;
        }
        // Past its time: recovery escalates until the command is out of
        // the device; at worst the device is reset, which ends every
        // command, so this loop ends.
        self.recover_polled(cmd, limit_s, can_sleep);
        loop {
            if let Some(c) = self.poll_for(cmd, qi, ffi::MICROSEC, can_sleep) {
                return c;
            }
            match self.state() {
                HbaState::Running => {
                    self.reset_device_as("a polled command did not complete", Reaper::Poller);
                }
                // Another thread is resetting the device: it will end the
                // command.
                HbaState::Resetting => {}
                // The device is stopped (quiesced, failed): nothing will
                // ever come back from it.
                _ => self.abandon_queue(qi),
            }
        }
    }

    /// Polls for up to `limit_us`; the command if it is done.
    pub(crate) fn poll_for(
        &self,
        cmd: &Cmd<F::CmdExt>,
        qi: u16,
        limit_us: i64,
        can_sleep: bool,
    ) -> Option<OwnedCmd<F::CmdExt>> {
        let start = time::hrtime();
        let mut spins = 0u32;
        loop {
            if let Some(c) = OwnedCmd::reclaim_done(cmd) {
                return Some(c);
            }
            self.reap_as(usize::from(qi), Reaper::Poller);
            if let Some(c) = OwnedCmd::reclaim_done(cmd) {
                return Some(c);
            }
            if (time::hrtime() - start) / 1000 >= limit_us {
                return None;
            }
            time::poll_pause(&mut spins, can_sleep);
        }
    }

    /// Ends every command of queue `qi` as reset, without the device,
    /// which must be stopped (reset, quiesced or failed) so that it can
    /// no longer touch the ring.
    pub(crate) fn abandon_queue(&self, qi: u16) {
        let Some(q) = self.queues.get(usize::from(qi)) else {
            return;
        };
        let mut taken = CmdList::new();
        let mut returned = CmdList::new();
        {
            let mut g = q.ring.lock();
            g.ring.reclaim_all(&mut |c| taken.push(c));
            while let Some(c) = g.deferred.pop() {
                returned.push(c);
            }
        }
        while let Some(c) = returned.pop() {
            self.finish(c, None);
        }
        while let Some(c) = taken.pop() {
            c.mark_owned();
            self.finish(c, Some(Forced::DeviceReset));
        }
    }

    /// Runs a command of the driver's own (discovery) on `target`/`lun`,
    /// polled from thread context; whether the target is there.
    pub(crate) fn internal_command(
        &self,
        target: u8,
        lun: crate::scsa::addr::LunNumber,
        cdb: &[u8],
        time_s: i32,
    ) -> Presence {
        let guard = self.probe.lock();
        let cmd: &Cmd<F::CmdExt> = &guard;
        // A full ring or a reset in progress: retry for a while.
        for _ in 0..100 {
            let req = Request {
                target,
                lun,
                cdb,
                cookies: &[],
                dir: DataDir::None,
                task_attr: TaskAttr::Simple,
                polled: true,
                time_s,
                tag: self.next_tag.fetch_add(1, Ordering::Relaxed),
            };
            let Some(mut c) = OwnedCmd::claim(cmd) else {
                return Presence::Unknown;
            };
            self.prepare(&mut c, &req);
            let queue = c.fields_ref().queue;
            match self.submit(c) {
                Ok(()) => {
                    let c = self.poll_to_completion(cmd, queue, i64::from(time_s), true);
                    let f = c.fields_ref();
                    let p = if f.reset_forced {
                        Presence::Unknown
                    } else {
                        self.dev.presence(f)
                    };
                    c.release(CmdState::Idle);
                    return p;
                }
                Err((c, StartError::Busy)) => {
                    c.release(CmdState::Idle);
                    time::delay_ticks(1);
                }
                Err((c, _)) => {
                    c.release(CmdState::Idle);
                    return Presence::Unknown;
                }
            }
        }
        Presence::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_gives_deadlines_from_its_last_reading() {
        let c = DeadlineClock {
            now: AtomicI64::new(5000),
            hz: 100,
            slack: 100,
        };
        assert_eq!(c.deadline(60), 5000 + 6000 + 100);
        c.now.store(-300, Ordering::Relaxed);
        assert_eq!(c.deadline(1), -300 + 100 + 100);
    }

    #[test]
    fn a_deadline_is_pkt_time_plus_the_clocks_age_after_the_last_reading() {
        assert_eq!(deadline_after(1000, 100, 100, 60), 1000 + 6000 + 100);
        assert_eq!(
            deadline_after(-5000, 1000, 1000, 1),
            -3000,
            "lbolt may be anywhere"
        );
        assert_eq!(
            deadline_after(i64::MAX - 10, 100, 100, 60),
            i64::MAX,
            "saturates"
        );
        assert_eq!(
            deadline_after(-101, 1, 100, 1),
            1,
            "never 0, which means none"
        );
    }

    #[test]
    fn a_pass_steers_its_cpus_commands_to_its_queue_while_it_runs() {
        let h = ReapHints::new();
        assert_eq!(h.queue_for(5, 4), None, "no pass runs");
        let pass = h.mark(5, 3);
        assert_eq!(h.queue_for(5, 4), Some(3));
        assert_eq!(
            h.queue_for(5 + REAP_HINTS as u32, 4),
            Some(3),
            "a shared slot"
        );
        assert_eq!(h.queue_for(6, 4), None, "another CPU's");
        assert_eq!(h.queue_for(5, 3), None, "a queue the HBA no longer has");
        drop(pass);
        assert_eq!(h.queue_for(5, 4), None, "the pass ended");
        let first = h.mark(0, 0);
        assert_eq!(h.queue_for(0, 4), Some(0), "queue 0 is a hint too");
        drop(first);
    }

    #[test]
    fn passes_that_end_out_of_order_leave_no_hint_behind() {
        let h = ReapHints::new();
        // The outer pass ends first (it migrated), the inner one after:
        // restoring what each found would leave the outer's mark for good.
        let outer = h.mark(2, 4);
        let inner = h.mark(2, 1);
        drop(outer);
        assert_eq!(
            h.queue_for(2, 8),
            Some(1),
            "the running pass keeps its mark"
        );
        drop(inner);
        assert_eq!(h.queue_for(2, 8), None);
        // Nested the usual way round: the inner pass clears the slot.
        let outer = h.mark(2, 4);
        drop(h.mark(2, 1));
        assert_eq!(h.queue_for(2, 8), None, "the outer pass goes on unhinted");
        drop(outer);
        assert_eq!(h.queue_for(2, 8), None);
        // The same queue twice: the first to end clears it.
        let a = h.mark(2, 4);
        let b = h.mark(2, 4);
        drop(a);
        assert_eq!(h.queue_for(2, 8), None);
        drop(b);
        assert_eq!(h.queue_for(2, 8), None);
    }

    #[test]
    fn every_request_queue_has_its_own_hand_off_bit() {
        for qi in 0..MAX_REQUEST_QUEUES as usize {
            assert_eq!(queue_bit(qi), 1u64 << qi, "queue {qi}");
        }
    }

    #[test]
    fn a_deferred_doorbell_is_rung_by_the_pass_that_ends_and_a_lone_one_at_once() {
        let k = PassKicks::new();
        // No pass runs: the caller rings itself, and nothing is left over.
        assert!(!k.defer(3));
        k.enter();
        assert_eq!(k.leave(), 0, "nothing was deferred");
        // During a pass: deferred, rung (once) when it ends.
        k.enter();
        assert!(k.defer(0));
        assert!(k.defer(5));
        assert!(k.defer(5), "a second command on the queue joins the first");
        assert_eq!(k.leave(), 1 | 1 << 5);
        assert!(!k.defer(5), "the pass is over");
        // Nested passes: the first to end takes what was deferred.
        k.enter();
        k.enter();
        assert!(k.defer(1));
        assert_eq!(k.leave(), 1 << 1);
        assert_eq!(k.leave(), 0);
        // The last deferrable queue, and the first one past it.
        k.enter();
        assert!(k.defer(DEFERRABLE_QUEUES - 1));
        assert!(!k.defer(DEFERRABLE_QUEUES), "rings at once");
        assert_eq!(k.leave(), 1 << (DEFERRABLE_QUEUES - 1));
        assert_eq!(DEFERRABLE_QUEUES, 48);
        assert_eq!(PASS_DEPTH_MASK, 0xffff);
    }

    #[test]
    fn packet_flags_choose_the_task_attribute() {
        assert_eq!(task_attr(PktFlags::empty()), TaskAttr::Simple);
        assert_eq!(task_attr(PktFlags::HTAG), TaskAttr::HeadOfQueue);
        assert_eq!(task_attr(PktFlags::HEAD), TaskAttr::HeadOfQueue);
        assert_eq!(task_attr(PktFlags::OTAG), TaskAttr::Ordered);
        assert_eq!(task_attr(PktFlags::ACA), TaskAttr::Aca);
        assert_eq!(
            task_attr(PktFlags::OTAG | PktFlags::HTAG),
            TaskAttr::HeadOfQueue
        );
    }

    #[test]
    fn a_bounded_reap_settles_or_hands_off_within_its_passes() {
        let mut p = ReapPasses::new(3);
        assert_eq!(p.after_pass(true), AfterPass::Again);
        assert_eq!(p.after_pass(true), AfterPass::Again);
        assert_eq!(p.after_pass(true), AfterPass::HandOff);
        let mut q = ReapPasses::new(3);
        assert_eq!(q.after_pass(false), AfterPass::Settled);
        assert_eq!(ReapPasses::new(0).after_pass(true), AfterPass::HandOff);
    }
}
