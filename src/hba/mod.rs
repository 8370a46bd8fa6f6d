//! The device-independent SCSA HBA core: what every HBA of rvscsi does,
//! whatever the device behind it.
//!
//! - [`cmd`]: per-packet state and its ownership protocol.
//! - [`family`]: the trait a device family implements (virtio-scsi in
//!   `crate::vioscsi`), and the Rust types it answers in.
//! - [`io`]: `tran_start(9E)` checks, submission, completion passes,
//!   polled commands, internal commands.
//! - [`recovery`]: `tran_abort(9E)`/`tran_reset(9E)`, pkt_time deadlines
//!   and the recovery ladder, device reset.
//! - [`work`]: the work task, iport and target-map discovery.
//! - this module: the HBA instance ([`Hba`]), its state machine, its
//!   statistics, the watchdog, detach, quiesce, and its one owner
//!   ([`OwnedHba`]).
//!
//! Nothing here returns a C code: the entry layer (`crate::entry`) turns
//! the Rust results into `TRAN_*`, `DDI_*` and the rest.
//!
//! # Locks and contexts
//!
//! Each request queue has its own lock (interrupt priority), held only
//! while its ring is touched: never across a device notification, a DMA
//! sync of command memory, or `scsi_hba_pkt_comp(9F)`. The work lock is
//! taken from interrupt context. `tran_start(9E)` may be called from
//! interrupt context (a target driver's completion routine), so nothing
//! on the I/O path sleeps or allocates.

pub mod cmd;
pub mod family;
pub mod fault;
pub mod intr;
pub mod io;
pub mod recovery;
pub mod work;

use crate::ddi::fm::{FmCaps, Fma};
use crate::ddi::kstat::{
    Counters, HBA_STATS, HbaStat, KstatName, Published, QUEUE_STATS, QueueStat,
};
use crate::ddi::sync::KMutex;
use crate::ddi::taskq::TaskQueue;
use crate::ddi::tgtmap::TargetMap;
use crate::ddi::time::Periodic;
use crate::ddi::{DdiError, Dip, Sleep};
use crate::scsa::cap::HbaCaps;
use crate::{dev_warn, ffi};
use alloc::boxed::Box;
use alloc::vec::Vec;
use cmd::{Cmd, CmdList};
use core::ffi::c_void;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
pub use family::{Family, FamilyId};
use family::{StopError, StopWait};
use work::Work;

/// The HBA's state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HbaState {
    /// Being attached; no I/O yet.
    Attaching = 0,
    /// Serving I/O.
    Running = 1,
    /// The device is being reset and re-initialized: new commands get
    /// TRAN_BUSY.
    Resetting = 2,
    /// The device could not be brought back: commands fail.
    Failed = 3,
    /// Being detached or quiesced.
    Stopped = 4,
}

impl HbaState {
    fn from_word(w: u8) -> HbaState {
        match w {
            0 => HbaState::Attaching,
            1 => HbaState::Running,
            2 => HbaState::Resetting,
            3 => HbaState::Failed,
            _ => HbaState::Stopped,
        }
    }
}

/// [`HbaState`] in an atomic word.
pub struct AtomicHbaState(AtomicU8);

impl AtomicHbaState {
    const fn new(s: HbaState) -> Self {
        AtomicHbaState(AtomicU8::new(s as u8))
    }

    /// The state now.
    pub fn load(&self) -> HbaState {
        HbaState::from_word(self.0.load(Ordering::Acquire))
    }

    fn store(&self, s: HbaState) {
        self.0.store(s as u8, Ordering::Release);
    }

    fn swap(&self, s: HbaState) -> HbaState {
        HbaState::from_word(self.0.swap(s as u8, Ordering::AcqRel))
    }

    /// `from` -> `to` if the state is `from`; whether it was.
    fn transition(&self, from: HbaState, to: HbaState) -> bool {
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Which family the HBA at `p` is (the first word of every [`Hba`]);
/// `None` for a word no family has (a stray pointer, a freed HBA).
///
/// # Safety
/// `p` must be non-null, aligned for a `u32`, and point at least 4
/// readable bytes: a live `Hba` of some family.
pub unsafe fn family_at(p: *const c_void) -> Option<FamilyId> {
    // SAFETY: every Hba is repr(C) with `family` first (offset 0, asserted
    // for each family by `Hba::FAMILY_FIRST`, which `Hba::attach` names),
    // and `p` points at a live one (caller). The word is read as a plain
    // u32 through the raw pointer: no reference to a type it might not be,
    // no enum value that might be invalid.
    let word = unsafe { p.cast::<u32>().read() };
    FamilyId::from_word(word)
}

/// Limits SCSA sees (DMA attributes, getcap, tran_tgt_init, discovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Data segments per command (`dma_attr_sgllen`).
    pub segments: u32,
    /// Largest transfer in bytes (`dma_attr_maxxfer`, `dma-max`).
    pub max_xfer: u32,
    /// Longest CDB the device takes.
    pub cdb_size: u32,
    /// Sense bytes the driver provides room for.
    pub sense_size: u32,
    /// Highest target probed.
    pub max_target: u8,
    /// Highest LUN accepted.
    pub max_lun: u16,
}

/// Why attach (or bringing a device back) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// A DDI call failed.
    Ddi(DdiError),
    /// The device's register or capability layout is not what the family
    /// drives.
    Layout(&'static str),
    /// The device did not finish a reset in time.
    ResetTimeout,
    /// The device is not what the driver drives, or says something
    /// impossible.
    Device(&'static str),
}

impl From<DdiError> for AttachError {
    fn from(e: DdiError) -> Self {
        AttachError::Ddi(e)
    }
}

impl From<StopError> for AttachError {
    fn from(e: StopError) -> Self {
        match e {
            StopError::Timeout => AttachError::ResetTimeout,
            StopError::Ddi(e) => AttachError::Ddi(e),
        }
    }
}

impl core::fmt::Display for AttachError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AttachError::Ddi(e) => write!(f, "{e}"),
            AttachError::Layout(what) => write!(f, "bad device layout: {what}"),
            AttachError::ResetTimeout => f.write_str("device did not complete reset"),
            AttachError::Device(what) => write!(f, "{what}"),
        }
    }
}

/// Callbacks the driver hands the kernel (defined in the entry layer,
/// which owns every `extern "C"` function), for one family.
pub struct Callbacks {
    /// Interrupt handler: arg1 the HBA, arg2 the family's vector argument.
    pub intr: ffi::ddi_intr_handler_t,
    /// IRM callback (`ddi_cb_register(9F)`): arg1 the
    /// [`crate::ddi::intr::IrmLink`] whose owner is the HBA.
    pub irm: ffi::ddi_cb_func_t,
    /// Task-queue function: arg the HBA.
    pub work: unsafe extern "C" fn(*mut c_void),
    /// Periodic watchdog: arg the HBA.
    pub watchdog: unsafe extern "C" fn(*mut c_void),
}

/// Internal counters of the completion machinery, for tests (relaxed
/// atomics; cheap). What an administrator looks at is in the kstats
/// ([`Hba::kstat`], [`Hba::queue_kstat`]).
#[derive(Default)]
pub struct Stats {
    /// Request queues the work task reaped for a hand-off (the hand-offs
    /// themselves are kstat `rearm_handoffs`).
    pub handoff_reaps: AtomicU64,
    /// Every request queue the work task has reaped for a hand-off (bit
    /// per queue): only queues that handed themselves on.
    pub handoff_reaped_queues: AtomicU64,
    /// IRM callbacks handled (the MSI-X grant changed).
    pub irm_changes: AtomicU64,
}

impl Stats {
    /// Adds one.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The facts about an HBA its kstat shows besides counts (set at attach,
/// and again when they change: an IRM callback changes the vectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KstatFacts {
    /// The negotiated feature bits (0 where the device has none).
    pub features: u64,
    /// `DDI_INTR_TYPE_*` in use, 0 when polled.
    pub intr_type: u64,
    /// Interrupt vectors held.
    pub vectors: u64,
}

/// The per-target/LUN state attached to each `scsi_device` in
/// `tran_tgt_init(9E)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lun {
    /// Target.
    pub target: u8,
    /// LUN.
    pub lun: crate::scsa::addr::LunNumber,
}

/// What a request-queue lock protects.
pub struct QueueState<F: Family> {
    /// The family's ring; its tokens are the commands in flight.
    pub ring: F::Ring,
    /// Completion passes running on this queue (notifications for
    /// submissions made meanwhile are deferred to the end of the pass).
    pub completing: u32,
    /// A submission during a completion pass needs a notification.
    pub kick_pending: bool,
    /// Commands the device returned while a poller reaped the ring (a
    /// thread that may hold driver locks), or that a device reset took
    /// back: they go back to their target drivers from a context that
    /// holds no driver lock, never from under one.
    pub deferred: CmdList<F::CmdExt>,
}

/// A request queue.
pub struct RequestQueue<F: Family> {
    /// Its ring and lists, under the queue lock.
    pub ring: KMutex<QueueState<F>>,
    /// `rvscsi:<instance>:queue<N>` (kstat(9S)). The queue may be kept
    /// for good (see `Hba::free_device_memory`); its kstat is deleted at
    /// detach either way (`Hba::drop`).
    pub(crate) kstat: Published<QUEUE_STATS>,
}

/// CPUs with a completion-queue hint of their own (see [`Hba::reaping`]);
/// more share slots.
pub const REAP_HINTS: usize = 64;

/// One attached controller of family `F`.
#[repr(C)]
pub struct Hba<F: Family> {
    /// First, at offset 0: which family this is (see [`FamilyId`]).
    family: FamilyId,
    pub(crate) dip: Dip,
    /// The device family's own state.
    pub dev: F,
    pub(crate) limits: Limits,
    caps: HbaCaps,
    /// The request queues. This and `probe` hold the device-visible memory
    /// the core owns (rings, the probe command's headers); each is a
    /// `ManuallyDrop` that only [`Hba::free_device_memory`] drops, and only
    /// once the device is known to be stopped (else it is kept, see
    /// `Drop`).
    pub(crate) queues: ManuallyDrop<Vec<RequestQueue<F>>>,
    /// Which queue each CPU's completion pass is reaping, to steer the
    /// commands its callbacks start there.
    pub(crate) reaping: io::ReapHints,
    /// Doorbells deferred to the end of the completion passes running.
    pub(crate) pass_kicks: io::PassKicks,
    pub(crate) next_tag: AtomicU64,
    /// The deadline clock (see [`io::DeadlineClock`]).
    pub(crate) clock: io::DeadlineClock,
    pub(crate) state: AtomicHbaState,
    pub(crate) work: KMutex<Work>,
    pub(crate) taskq: Option<TaskQueue>,
    watchdog: KMutex<Option<Periodic>>,
    pub(crate) tgtmap: KMutex<Option<TargetMap>>,
    /// The command used for the driver's own probes (discovery);
    /// device-visible memory like `queues`.
    pub(crate) probe: ManuallyDrop<KMutex<Box<Cmd<F::CmdExt>>>>,
    pub(crate) callbacks: Callbacks,
    /// Set by [`Hba::teardown`] once the device finished a reset with
    /// nothing able to bring it back: only then may `Drop` free the
    /// device-visible memory.
    device_stopped: AtomicBool,
    /// Internal counters (tests).
    pub stats: Stats,
    /// `rvscsi:<instance>:hba` (kstat(9S)).
    kstat: Published<HBA_STATS>,
    /// Fault management (ddi_fm_init(9F) at attach, ddi_fm_fini at
    /// detach, on drop).
    pub(crate) fma: Fma,
    /// A fault reported the service lost or degraded since the device
    /// last came back (its return is reported RESTORED).
    impaired: AtomicBool,
    /// A handle fault was found and its recovery (or the controller's
    /// taking out of service) is pending: the handles are not looked at
    /// until it is done.
    handle_fault: AtomicBool,
    /// The deadline clock's time the last recovery from a handle fault
    /// ended (`i64::MIN`: never).
    handle_recovered_at: AtomicI64,
    /// The deadline clock's time a bad completion was last reported
    /// (`i64::MIN`: never): at most one ereport a second.
    bad_completion_reported: AtomicI64,
    /// The deadline clock's time of the last look at the handles (once a
    /// second, also when polled mode ticks a hundred times as often).
    handles_checked: AtomicI64,
}

impl<F: Family> Hba<F> {
    /// Attaches to the device at `dip`: everything up to a running device
    /// with interrupts enabled. The result must not move (interrupt
    /// handlers hold its address): it lives on the heap, held by an
    /// [`OwnedHba`].
    pub fn attach(dip: Dip, callbacks: Callbacks) -> Result<OwnedHba<F>, AttachError> {
        let () = Self::FAMILY_FIRST;
        // First, while attaching (ddi_fm_init works only then, ddifm.c
        // checks DEVI_IS_ATTACHING): ereports and the handle checks.
        let fma = Fma::init(dip, FmCaps::WANTED);
        let a = F::attach(dip, &callbacks)?;
        let pri = a.pri;
        let mut queues = Vec::with_capacity(a.rings.len());
        for (n, ring) in a.rings.into_iter().enumerate() {
            let n = u16::try_from(n).unwrap_or(u16::MAX);
            queues.push(RequestQueue {
                // kstat_create(9F): user or kernel context, here attach(9E).
                kstat: Published::create::<QueueStat>(dip, &KstatName::queue(n)),
                ring: KMutex::new(
                    QueueState {
                        ring,
                        completing: 0,
                        kick_pending: false,
                        deferred: CmdList::new(),
                    },
                    pri,
                ),
            });
        }
        let probe = Box::new(Cmd::new(a.probe));
        let taskq = TaskQueue::create(dip, c"rvscsi_work")?;
        let kstat = Published::create::<HbaStat>(dip, &KstatName::hba());
        kstat.counters().set(HbaStat::Queues, queues.len() as u64);
        let hba = OwnedHba::new(Hba {
            family: F::ID,
            dip,
            dev: a.dev,
            limits: a.limits,
            caps: a.caps,
            queues: ManuallyDrop::new(queues),
            reaping: io::ReapHints::new(),
            pass_kicks: io::PassKicks::new(),
            next_tag: AtomicU64::new(1),
            clock: io::DeadlineClock::start(),
            state: AtomicHbaState::new(HbaState::Attaching),
            work: KMutex::new(Work::default(), pri),
            taskq: Some(taskq),
            watchdog: KMutex::new(None, 0),
            tgtmap: KMutex::new(None, 0),
            probe: ManuallyDrop::new(KMutex::new(probe, 0)),
            callbacks,
            device_stopped: AtomicBool::new(false),
            stats: Stats::default(),
            kstat,
            fma,
            impaired: AtomicBool::new(false),
            handle_fault: AtomicBool::new(false),
            handle_recovered_at: AtomicI64::new(i64::MIN),
            bad_completion_reported: AtomicI64::new(i64::MIN),
            handles_checked: AtomicI64::new(i64::MIN),
        });
        if let Err(e) = F::start(hba.get()) {
            // start() may have handed the rings to the device; interrupt
            // handlers and the IRM callback may be running. Dropping `hba`
            // (the OwnedHba) runs the teardown through a shared reference
            // while they may, and frees the HBA only after it (its memory
            // only once the device is reset).
            hba.get().dev.fail();
            return Err(e);
        }
        let h = hba.get();
        h.update_facts();
        h.state.store(HbaState::Running);
        h.start_watchdog();
        F::announce(h);
        Ok(hba)
    }

    fn start_watchdog(&self) {
        // Polled mode reaps completions from the watchdog; otherwise it
        // only looks for timeouts, once a second.
        let interval = if self.dev.interrupts() {
            ffi::NANOSEC
        } else {
            ffi::NANOSEC / 100
        };
        let me = self as *const Self as *mut c_void;
        // SAFETY: the teardown stops the watchdog (Periodic::drop waits
        // for a running tick) before the HBA is freed, so `me` is valid
        // for every tick.
        let p = unsafe { Periodic::start(self.callbacks.watchdog, me, interval) };
        *self.watchdog.lock() = Some(p);
    }

    /// The HBA's kstat counters (`rvscsi:<instance>:hba`).
    pub fn kstat(&self) -> &Counters<HBA_STATS> {
        self.kstat.counters()
    }

    /// The kstat counters of request queue `qi` (`queue<qi>`), if any.
    pub fn queue_kstat(&self, qi: usize) -> Option<&Counters<QUEUE_STATS>> {
        self.queues.get(qi).map(|q| q.kstat.counters())
    }

    /// Adds one to HBA statistic `s` (a relaxed atomic add, any context).
    pub(crate) fn count(&self, s: HbaStat) {
        self.kstat.counters().bump(s);
    }

    /// The value of statistic `s` now.
    pub(crate) fn kstat_value(&self, s: HbaStat) -> u64 {
        self.kstat.counters().get(s)
    }

    /// Adds one to statistic `s` of request queue `qi` (a relaxed atomic
    /// add, any context).
    pub(crate) fn count_queue(&self, qi: usize, s: QueueStat) {
        if let Some(q) = self.queues.get(qi) {
            q.kstat.counters().bump(s);
        }
    }

    /// Copies what the family says about itself (features, interrupts)
    /// into the HBA kstat (attach, and whenever it changes).
    pub(crate) fn update_facts(&self) {
        let f = self.dev.kstat_facts();
        let c = self.kstat.counters();
        c.set(HbaStat::Features, f.features);
        c.set(HbaStat::IntrType, f.intr_type);
        c.set(HbaStat::IntrVectors, f.vectors);
    }

    /// The HBA's address as the kernel callbacks' argument.
    pub fn callback_arg(&self) -> *mut c_void {
        self as *const Self as *mut c_void
    }

    /// Current state.
    pub fn state(&self) -> HbaState {
        self.state.load()
    }

    /// The device node.
    pub fn dip(&self) -> Dip {
        self.dip
    }

    /// The limits in use.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What `getcap` reports.
    pub fn caps(&self) -> HbaCaps {
        self.caps
    }

    /// Bytes of HBA-private area each packet needs (`tran_hba_len`).
    pub const fn pkt_private_len() -> usize {
        core::mem::size_of::<Cmd<F::CmdExt>>()
    }

    const FAMILY_FIRST: () = assert!(core::mem::offset_of!(Hba<F>, family) == 0);

    /// The watchdog tick (entry: periodic callback).
    pub fn watchdog(&self) {
        // A kernel thread (ddi_periodic level 0: servicing_interrupt() is
        // 0), but what it completes must not recover synchronously from
        // inside this tick: the driver's own delivery (`own_delivery`).
        let _delivering = self.own_delivery();
        self.clock.tick();
        // Completions a poller parked since the last interrupt, in any
        // state: after a failed reset no interrupt will come for them.
        for n in 0..self.queues.len() {
            self.complete_parked(n);
        }
        if self.state() != HbaState::Running {
            return;
        }
        if self.dev.interrupts() {
            // Events are rare and losing one costs a discovery: look.
            F::service_events(self);
            // Completions no interrupt came for (the safety net).
            self.watchdog_reap();
        } else {
            self.service_all();
        }
        self.scan_timeouts();
        // At most once a second, not per command: the handles' fault
        // status.
        self.check_handles();
    }

    /// [`Self::service_all`] for an interrupt that says "some queue"
    /// (INTx, one MSI): each queue's `interrupts` counts it.
    pub fn service_all_interrupted(&self) {
        F::service_events(self);
        for n in 0..self.queues.len() {
            self.reap_interrupted(n);
        }
    }

    /// Services the events and every request queue (shared vectors,
    /// polled mode, an IRM change).
    pub fn service_all(&self) {
        F::service_events(self);
        for n in 0..self.queues.len() {
            self.reap(n);
        }
    }

    /// The stopping sequence, in the only order that touches no freed
    /// memory: each step removes a way into the HBA before the next one
    /// waits for, or frees, what that way could reach. [`OwnedHba`]'s drop
    /// runs it on every path that ends an HBA (detach, a failed attach),
    /// and frees the HBA only after it.
    ///
    /// It runs through `&self`, never `&mut self`: until step 5 returns,
    /// interrupt handlers, the IRM callback, the watchdog tick and the
    /// work task may be running, each with a `&Hba` made from the raw
    /// pointer the kernel was given. A `&mut Hba` (or a `Box` moved by
    /// value, which asserts uniqueness too) alive meanwhile would claim an
    /// exclusive access those threads contradict (rustc marks such
    /// arguments `noalias`): undefined behavior even if no field it
    /// touches is shared. So the steps below only read plain fields and
    /// use locks and atomics, as the other threads do.
    ///
    /// 1. No new work: the state is STOPPED (the watchdog, the work task
    ///    and the recovery paths look at it) and the task queue is closed,
    ///    so `schedule()` can no longer dispatch (taskq(9F): the caller of
    ///    ddi_taskq_destroy must guarantee that nothing is scheduled).
    /// 2. The watchdog: ddi_periodic_delete(9F) waits for a running tick
    ///    and there is none after it.
    /// 3. The interrupts: disabled and their handlers removed, the IRM
    ///    callback unregistered. On i86pc ddi_intr_disable reaches
    ///    pci_disable_intr, then rem_avintr, whose remove_av unlinks the
    ///    handler and waits (wait_till_seen) until no CPU runs an
    ///    interrupt at its level (usr/src/uts/i86pc/io/pci/pci_common.c,
    ///    common/io/avintr.c; apix: apix_rem_avintr and
    ///    apix_wait_till_seen in i86pc/io/apix/apix_utils.c). So no
    ///    handler runs when it returns. ddi_intr_remove_handler does not
    ///    wait (DDI_INTROP_REMISR in pci_common_intr_ops only forgets the
    ///    handler): the vectors are disabled first (`Interrupts::drop`).
    /// 4. The device: reset, so it stops using the rings and buffers (no
    ///    more DMA, no more interrupts).
    /// 5. The task queue: ddi_taskq_wait for the task under way (it may be
    ///    a device reset, which fails fast on a reset device or finds the
    ///    state STOPPED); nothing can dispatch since steps 1-3.
    /// 6. The device again, if the task brought it back meanwhile (a reset
    ///    that had begun before step 1 re-initializes it), so the memory
    ///    freed later is unknown to the device.
    /// 7. Whether the device is known to be stopped (its last reset
    ///    finished) goes to `device_stopped`: `Drop` frees the
    ///    device-visible memory only then, else keeps it for good (a leak
    ///    the log reports, instead of memory the device could write after
    ///    the kernel reused it).
    ///
    /// After it nothing but the caller can reach the HBA: `Drop` then only
    /// frees memory (the task queue, empty, is destroyed first).
    fn teardown(&self) {
        // 1. No new work.
        self.state.store(HbaState::Stopped);
        if let Some(tq) = &self.taskq {
            tq.close();
        }
        // 2. The watchdog (Periodic::drop waits for a running tick). The
        // lock is not held across the wait: the guard is a temporary of
        // the statement that takes the value out.
        let watchdog = self.watchdog.lock().take();
        drop(watchdog);
        // 3. The interrupts (disabled, handlers removed, vectors freed,
        // IRM callback unregistered).
        self.dev.stop_interrupts();
        // 4. The device stops DMA.
        let mut stopped = self.stop_device();
        // 5. The task under way, if any, finishes.
        if let Some(tq) = &self.taskq {
            tq.wait();
        }
        // 6. A task that was resetting the device may have brought it back
        // up (it ends with the state RUNNING or FAILED): reset once more.
        if self.state.swap(HbaState::Stopped) != HbaState::Stopped {
            stopped = self.stop_device();
        }
        // 7. Release pairs with the load in Drop (on this thread anyway,
        // but the ordering states the intent).
        self.device_stopped.store(stopped, Ordering::Release);
    }

    /// Resets the device and waits for the reset to finish (the device
    /// no longer touches the driver's memory once it has); false if it
    /// did not finish. Thread context only (detach, a failed attach).
    fn stop_device(&self) -> bool {
        match self.dev.stop(StopWait::Sleeping) {
            Ok(()) => true,
            Err(e) => {
                dev_warn!(
                    self.dip,
                    "the device did not finish its reset ({e}): the memory it may still use is kept, not freed"
                );
                false
            }
        }
    }

    /// Whether no command is in flight (detach may go ahead); says why
    /// not when refusing.
    pub fn detach_ready(&self) -> bool {
        use family::DeviceRing;
        let idle = self.queues.iter().all(|q| {
            let g = q.ring.lock();
            g.ring.outstanding() == 0 && g.deferred.is_empty()
        });
        if !idle {
            dev_warn!(self.dip, "detach refused: commands in flight");
        }
        idle
    }

    /// quiesce(9E): stop the device for fast reboot. Must not block, take
    /// locks or allocate.
    pub fn quiesce(&self) {
        self.state.store(HbaState::Stopped);
        self.dev.quiesce();
    }

    /// `tran_pkt_constructor(9E)`: the command state of a new packet, with
    /// its DMA memory.
    pub fn construct_cmd(&self, sleep: Sleep) -> Result<Cmd<F::CmdExt>, DdiError> {
        Ok(Cmd::new(self.dev.new_cmd_ext(self.dip, sleep)?))
    }

    /// Frees the memory the device reads and writes: the request rings,
    /// the probe command (its header buffers) and the family's own.
    ///
    /// Per-packet buffers (each packet's `Cmd` headers, the target
    /// drivers' data) are not here: they belong to the framework's packet
    /// cache, which scsi_hba_detach(9F) destroys before this HBA's
    /// detach. None of them is known to the device then: detach proceeds
    /// only when [`Hba::detach_ready`] found every request ring with
    /// nothing outstanding (an abandoned command stays outstanding on its
    /// ring until the device returns it) and nothing parked, and once the
    /// framework's detach removed the iport no `tran_start` can add one.
    /// The driver's own probe is the one command outside the packet cache,
    /// so it is kept or freed with the rings.
    ///
    /// # Safety
    /// Call at most once, after [`Hba::teardown`] found the device
    /// stopped, with nothing else able to reach the HBA (`&mut self`); the
    /// fields are not used afterwards (only `Drop` calls this).
    unsafe fn free_device_memory(&mut self) {
        // SAFETY: once (caller), and nothing uses the fields afterwards;
        // the device finished a reset, so it no longer reads or writes
        // this memory, and no handler, task or tick can reach it.
        unsafe {
            ManuallyDrop::drop(&mut self.queues);
            ManuallyDrop::drop(&mut self.probe);
            self.dev.free_device_memory();
        }
    }
}

impl<F: Family> Drop for Hba<F> {
    /// Frees memory, nothing more: the stopping sequence
    /// ([`Hba::teardown`]) ran through `&self` before, and this
    /// `&mut self` exists only once nothing else can reach the HBA (see
    /// [`OwnedHba`]). An `Hba` dropped without a teardown keeps its
    /// device-visible memory (`device_stopped` is false).
    fn drop(&mut self) {
        // The task queue is empty and idle after the teardown's wait, and
        // closed: destroying it waits for nothing.
        drop(self.taskq.take());
        if self.device_stopped.load(Ordering::Acquire) {
            // SAFETY: once, here; the teardown found the device stopped;
            // `&mut self`: nobody else reaches the HBA.
            unsafe { self.free_device_memory() };
        } else {
            // The device may still write there: the rings, the probe and
            // the family's device memory stay in their ManuallyDrop, never
            // freed. Their kstats go all the same (kstat_delete(9F) at
            // detach: none may outlive the module that provides its
            // update).
            for q in self.queues.iter_mut() {
                q.kstat.unpublish();
            }
        }
    }
}

/// The one owner of an attached HBA: its address, which every pointer the
/// kernel is given (interrupt and IRM arguments, the task and watchdog
/// arguments, `tran_hba_private`) derives from.
///
/// The HBA is put on the heap and the `Box` turned into this pointer at
/// once, so that no `Box<Hba>` or `&mut Hba` exists while other threads
/// use the HBA: only shared references are made from it
/// ([`OwnedHba::get`]) until the drop, which runs [`Hba::teardown`]
/// through `&Hba` and then, with every other user stopped, rebuilds the
/// `Box` and frees it.
pub struct OwnedHba<F: Family>(NonNull<Hba<F>>);

impl<F: Family> OwnedHba<F> {
    fn new(hba: Hba<F>) -> Self {
        // Box::leak: the `&mut` it returns becomes the pointer here and is
        // never used again.
        Self(NonNull::from(Box::leak(Box::new(hba))))
    }

    /// The HBA.
    pub fn get(&self) -> &Hba<F> {
        // SAFETY: allocated in new() and freed only by this owner's drop;
        // only shared references are ever made from the pointer before it.
        unsafe { self.0.as_ref() }
    }

    /// The HBA's address (what the kernel is given).
    pub fn as_ptr(&self) -> *mut Hba<F> {
        self.0.as_ptr()
    }

    /// Gives up ownership: the address, to be stored (the shim keeps it in
    /// `tran_hba_private`) and turned back with [`OwnedHba::from_raw`].
    pub fn into_raw(self) -> *mut Hba<F> {
        ManuallyDrop::new(self).as_ptr()
    }

    /// Takes ownership back of what [`OwnedHba::into_raw`] gave up; None
    /// for null.
    ///
    /// # Safety
    /// `p` must be null or come from [`OwnedHba::into_raw`], and not have
    /// been taken back already (there is one owner).
    pub unsafe fn from_raw(p: *mut Hba<F>) -> Option<Self> {
        NonNull::new(p).map(Self)
    }

    /// detach(9E) of the HBA node: refuses (returning the owner, nothing
    /// changed) while commands are in flight; otherwise stops and frees
    /// the HBA (the drop).
    pub fn detach(self) -> Result<(), Self> {
        if !self.get().detach_ready() {
            return Err(self);
        }
        drop(self);
        Ok(())
    }
}

impl<F: Family> Drop for OwnedHba<F> {
    fn drop(&mut self) {
        // The `&mut self` here is to this owner (a pointer), not to the
        // HBA: the HBA is only reached through the shared reference.
        self.get().teardown();
        // SAFETY: the pointer came from Box::leak in new() and this owner
        // is dropped once (into_raw forgets it; from_raw makes one owner
        // per into_raw, caller's promise). The teardown stopped every
        // other user of the HBA: the watchdog deleted, the interrupts and
        // the IRM callback removed (their kernel functions wait for a
        // running handler or callback), the task queue closed and waited
        // for. The copies the kernel held are never used again, so the
        // Box (unique) is the only pointer in use from here on.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_word_reads_back_every_state_and_moves_only_from_the_expected_one() {
        for s in [
            HbaState::Attaching,
            HbaState::Running,
            HbaState::Resetting,
            HbaState::Failed,
            HbaState::Stopped,
        ] {
            let a = AtomicHbaState::new(s);
            assert_eq!(a.load(), s);
        }
        let a = AtomicHbaState::new(HbaState::Running);
        assert!(!a.transition(HbaState::Resetting, HbaState::Running));
        assert_eq!(a.load(), HbaState::Running);
        assert!(a.transition(HbaState::Running, HbaState::Resetting));
        assert_eq!(a.load(), HbaState::Resetting);
        assert_eq!(a.swap(HbaState::Stopped), HbaState::Resetting);
        assert_eq!(a.load(), HbaState::Stopped);
        a.store(HbaState::Failed);
        assert_eq!(a.load(), HbaState::Failed);
    }

    #[test]
    fn attach_errors_say_what_failed() {
        use alloc::string::ToString;
        assert_eq!(
            AttachError::Layout("no common configuration").to_string(),
            "bad device layout: no common configuration"
        );
        assert_eq!(
            AttachError::from(StopError::Timeout),
            AttachError::ResetTimeout
        );
        assert_eq!(
            AttachError::ResetTimeout.to_string(),
            "device did not complete reset"
        );
    }
}
