//! What a device family (virtio-scsi, pvscsi, ...) implements for the
//! core: how a command is written for its device and put in a ring, how
//! the device's answer reads, how the device is notified, reset, brought
//! back and told to manage tasks, and what its interrupts mean.
//!
//! The family never sees a C return code and never completes a packet:
//! it reports in the Rust types below, and the core does the SCSA work
//! (ownership, completion, polling, timeouts, the recovery ladder,
//! discovery, statistics). Everything device-visible that is shared by
//! every family's request queues (the per-queue lock, the parked list,
//! the completion passes) is the core's; the ring inside is the family's
//! ([`DeviceRing`]).

use super::cmd::{CmdFields, OwnedCmd};
use super::{AttachError, Callbacks, Hba, KstatFacts, Limits};
use crate::ddi::fm::{Fma, HandleHealth};
use crate::ddi::intr::IrmChange;
use crate::ddi::{DdiError, Dip, Sleep};
use crate::ffi;
use crate::scsa::addr::LunNumber;
use crate::scsa::cap::HbaCaps;
use crate::scsa::flags::DataDir;
use crate::scsa::{Outcome, PktStatistics};
use alloc::vec::Vec;

/// Which family an HBA is (the first word of every [`Hba`], so that the
/// entry points shared by all families find out from the pointer the
/// framework hands them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FamilyId {
    /// virtio-scsi (`crate::vioscsi`).
    VirtioScsi = 0x7669_6f73,
    /// VMware PVSCSI (`crate::pvscsi`).
    Pvscsi = 0x7076_7363,
}

impl FamilyId {
    /// The family whose word is `w`.
    pub fn from_word(w: u32) -> Option<FamilyId> {
        [FamilyId::VirtioScsi, FamilyId::Pvscsi]
            .into_iter()
            .find(|f| *f as u32 == w)
    }
}

/// What a command asks of the device.
pub struct Request<'a> {
    /// Target.
    pub target: u8,
    /// LUN.
    pub lun: LunNumber,
    /// The CDB.
    pub cdb: &'a [u8],
    /// Data buffers.
    pub cookies: &'a [ffi::ddi_dma_cookie_t],
    /// Their direction.
    pub dir: DataDir,
    /// SAM task attribute.
    pub task_attr: TaskAttr,
    /// Poll for completion (no `scsi_hba_pkt_comp`).
    pub polled: bool,
    /// Timeout in seconds (0: none).
    pub time_s: i32,
    /// The tag the core gave this start (unique, never reused).
    pub tag: u64,
}

/// SAM task attributes (what `FLAG_HTAG`, `FLAG_OTAG`... ask for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAttr {
    /// SIMPLE.
    Simple,
    /// ORDERED.
    Ordered,
    /// HEAD OF QUEUE.
    HeadOfQueue,
    /// ACA.
    Aca,
}

/// What the core knows about a command when it asks the family to decode
/// the device's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdFacts {
    /// Bytes the packet's DMA binding maps.
    pub xfer: usize,
    /// Data direction.
    pub dir: DataDir,
    /// The watchdog marked it timed out.
    pub timed_out: bool,
    /// Statistics of the recovery steps taken for it.
    pub recovery: PktStatistics,
}

/// Whether a target answered a discovery probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// It is there.
    Present,
    /// The device says there is no such target (or LUN 0).
    Absent,
    /// The device failed to say.
    Unknown,
}

/// Why a ring could not take a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddError {
    /// No room now: try again (TRAN_BUSY).
    Full,
    /// This command can never fit (TRAN_BADPKT).
    Invalid,
}

/// A completion the device got wrong (counted, logged, never trusted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadCompletion {
    /// It names no command the driver has outstanding.
    Unknown {
        /// What it named.
        id: u64,
    },
    /// It names a command already completed (a duplicate or stale
    /// completion), where the family can tell.
    Duplicate {
        /// What it named.
        id: u64,
    },
    /// It names something the device cannot have been given: an id out
    /// of every range the driver uses, or a request the device cannot
    /// have seen yet.
    Impossible {
        /// What it named.
        id: u64,
    },
    /// The device's producer index is further ahead of the driver's
    /// consumer than the device can have completed (virtio: more than a
    /// ring; pvscsi: more than the commands outstanding, or the ring):
    /// the ring state is lost, the device is reset.
    Runaway {
        /// The device's index.
        device_idx: u32,
        /// The driver's.
        expected: u32,
    },
}

/// The request-queue ring of a family, under the core's queue lock.
/// Its tokens are the commands in flight.
pub trait DeviceRing<X>: Send {
    /// At most this many completions can be waiting (bounds a pass).
    fn capacity(&self) -> usize;
    /// Takes the faults the I/O framework recorded on the DMA handles of
    /// the ring's memory (each cleared), the first one found or Ok
    /// (thread context: the watchdog tick).
    fn take_dma_fault(&self, _fma: &Fma) -> HandleHealth {
        HandleHealth::Ok
    }
    /// The next completion the device returned, if any.
    fn pop(&mut self) -> Option<Result<OwnedCmd<X>, BadCompletion>>;
    /// Asks for an interrupt at the next completion and looks again:
    /// true if completions landed meanwhile (the device may not interrupt
    /// for them).
    fn rearm(&mut self) -> bool;
    /// Makes what was added visible to the device (no notification
    /// decision: a batch of publishes gets one, [`Self::notify_needed`]).
    fn publish(&mut self);
    /// Whether what was published since the last call needs the device
    /// notified now (false when nothing was). One call decides for a
    /// whole batch, so that a completion pass that starts many commands
    /// reads the device's suppression state once, not per command.
    fn notify_needed(&mut self) -> bool;
    /// The command in flight in `slot`.
    fn get_mut(&mut self, slot: u16) -> Option<&mut OwnedCmd<X>>;
    /// Calls `f` on every command in flight (with its slot).
    fn for_each_outstanding(&mut self, f: &mut dyn FnMut(u16, &mut OwnedCmd<X>));
    /// Takes every command in flight back (the device is stopped).
    fn reclaim_all(&mut self, f: &mut dyn FnMut(OwnedCmd<X>));
    /// Commands in flight.
    fn outstanding(&self) -> usize;
    /// Whether completions have waited, unconsumed, since the previous
    /// call (the watchdog's look for a lost interrupt).
    fn stalled_since_last_look(&mut self) -> bool;
}

/// Task management the recovery ladder and `tran_abort`/`tran_reset` ask
/// for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskMgmt {
    /// ABORT TASK of one command.
    AbortTask,
    /// ABORT TASK SET of a LUN.
    AbortTaskSet,
    /// LOGICAL UNIT RESET.
    LunReset,
    /// A reset of the target (I_T NEXUS RESET, or the family's nearest).
    TargetReset,
}

impl TaskMgmt {
    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            TaskMgmt::AbortTask => "ABORT TASK",
            TaskMgmt::AbortTaskSet => "ABORT TASK SET",
            TaskMgmt::LunReset => "LOGICAL UNIT RESET",
            TaskMgmt::TargetReset => "TARGET RESET",
        }
    }
}

/// Whom task management is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmAddress {
    /// Target.
    pub target: u8,
    /// LUN.
    pub lun: LunNumber,
    /// The command's tag (ABORT TASK), 0 otherwise.
    pub tag: u64,
    /// The command's request queue and slot (ABORT TASK).
    pub queue: u16,
    /// See `queue`.
    pub slot: u16,
}

/// How task management ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmAnswer {
    /// The device performed it.
    Done,
    /// The device answered that it did not (its response code).
    Refused(u32),
    /// The device did not answer in time.
    NoAnswer,
    /// The device cannot take it now, or the family has no such function.
    Unavailable,
}

/// How a device reset waits for the device to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopWait {
    /// Thread context (detach, a failed attach): may sleep while waiting.
    Sleeping,
    /// Waits, busy, until the device has stopped (no sleep: callable from
    /// the work task, a poller, a panic).
    Spinning,
    /// Interrupt context: a few microseconds of looks at most.
    Briefly,
}

/// Why a device did not stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopError {
    /// It did not say it had finished its reset in time.
    Timeout,
    /// An access to it failed.
    Ddi(DdiError),
}

impl core::fmt::Display for StopError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StopError::Timeout => f.write_str("device did not complete reset"),
            StopError::Ddi(e) => write!(f, "{e}"),
        }
    }
}

/// An interrupt handler's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// It was ours (DDI_INTR_CLAIMED).
    Claimed,
    /// Not ours (a shared line; DDI_INTR_UNCLAIMED).
    Unclaimed,
}

/// The answer to an IRM callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrmAnswer {
    /// The change was followed (DDI_SUCCESS).
    Followed,
    /// It could not be (DDI_FAILURE): the kernel keeps the old grant.
    Failed,
    /// The HBA does not take IRM callbacks in its interrupt mode
    /// (DDI_ENOTSUP).
    NotSupported,
}

/// What a family's attach hands the core.
pub struct Attached<F: Family> {
    /// The device, set up up to (not including) activation.
    pub dev: F,
    /// One ring per request queue.
    pub rings: Vec<F::Ring>,
    /// Limits for SCSA.
    pub limits: Limits,
    /// What getcap reports.
    pub caps: HbaCaps,
    /// Interrupt priority of the locks the handlers take (0: none).
    pub pri: u32,
    /// The family's part of the driver's own probe command.
    pub probe: F::CmdExt,
}

/// A device family on the core.
pub trait Family: Sized + Send + Sync + 'static {
    /// The family's part of each command.
    type CmdExt: Send;
    /// A request queue's ring.
    type Ring: DeviceRing<Self::CmdExt>;
    /// Which family this is.
    const ID: FamilyId;

    /// Sets up the device at `dip` (interrupts allocated, not enabled;
    /// rings allocated, the device not told of them yet).
    fn attach(dip: Dip, callbacks: &Callbacks) -> Result<Attached<Self>, AttachError>;
    /// Starts interrupts and activates the device (the HBA exists now
    /// and its address may be given out).
    fn start(hba: &Hba<Self>) -> Result<(), AttachError>;
    /// Logs the attach line.
    fn announce(hba: &Hba<Self>);
    /// The facts the HBA kstat shows: negotiated features, interrupt type
    /// and vectors (thread context: attach, the IRM callback).
    fn kstat_facts(&self) -> KstatFacts;
    /// Takes the faults the I/O framework recorded on the family's
    /// register access handles (`Fma::take_regs_fault`: each cleared), the
    /// first one found or Ok (thread context: the watchdog tick).
    fn take_access_fault(&self, fma: &Fma) -> HandleHealth;
    /// Takes the faults recorded on the DMA handles of the family's own
    /// rings and buffers outside the request queues (each cleared), the
    /// first one found or Ok (thread context: the watchdog tick; never
    /// waits for a lock held across device I/O).
    fn take_private_dma_fault(&self, _fma: &Fma) -> HandleHealth {
        HandleHealth::Ok
    }
    /// Whether the device interrupts (false: completions are polled).
    fn interrupts(&self) -> bool;
    /// Whether a command started from a completion pass may have its
    /// doorbell deferred to the end of the pass.
    fn notify_batching(&self) -> bool;
    /// The DMA attributes of data buffers.
    fn data_dma_attr(&self) -> ffi::ddi_dma_attr_t;

    /// The family's part of a new command, with its DMA memory.
    fn new_cmd_ext(&self, dip: Dip, sleep: Sleep) -> Result<Self::CmdExt, DdiError>;
    /// Writes what the device reads for `req` into the command's memory.
    fn prepare(&self, f: &mut CmdFields<Self::CmdExt>, req: &Request<'_>);
    /// Puts a prepared command in `ring`; its slot.
    fn add(
        &self,
        ring: &mut Self::Ring,
        c: OwnedCmd<Self::CmdExt>,
    ) -> Result<u16, (OwnedCmd<Self::CmdExt>, AddError)>;
    /// Rings request queue `qi`'s doorbell.
    fn notify(&self, qi: usize);
    /// The outcome of a command the device returned, from its answer (kept
    /// in the family's part for internal commands).
    fn decode(&self, f: &mut CmdFields<Self::CmdExt>, facts: &CmdFacts) -> Outcome;
    /// Copies the sense data of a CHECK CONDITION into `out`; bytes
    /// copied.
    fn copy_sense(&self, f: &CmdFields<Self::CmdExt>, out: &mut [u8]) -> usize;
    /// Whether the target of a discovery probe (an internal command the
    /// device returned) is there.
    fn presence(&self, f: &CmdFields<Self::CmdExt>) -> Presence;

    /// The family's name of a task-management function, for messages.
    fn task_mgmt_name(&self, tm: TaskMgmt) -> &'static str {
        tm.name()
    }
    /// Performs task management (thread context, or a panic: may wait
    /// `can_sleep`, or spin). No driver lock is held: the family may take
    /// a queue's lock (e.g. to check that the slot it names to the device
    /// still holds the command `at.tag` names).
    fn task_mgmt(hba: &Hba<Self>, tm: TaskMgmt, at: &TmAddress, can_sleep: bool) -> TmAnswer;
    /// Resets the device so that it stops using the rings.
    fn stop(&self, wait: StopWait) -> Result<(), StopError>;
    /// Brings a stopped device back with the same settings (thread
    /// context, no sleep): the family's own queues emptied, the device
    /// initialized and activated.
    fn restart(hba: &Hba<Self>) -> Result<(), AttachError>;
    /// Marks the device failed (it will not be used again).
    fn fail(&self);
    /// quiesce(9E): stops the device; no lock, no wait, no allocation.
    fn quiesce(&self);
    /// Disables and frees the interrupts (waiting for running handlers).
    fn stop_interrupts(&self);

    /// The interrupt handler body (`arg`: the handler's second argument).
    fn interrupt(hba: &Hba<Self>, arg: usize) -> Claim;
    /// The IRM callback.
    fn irm_changed(hba: &Hba<Self>, change: IrmChange) -> IrmAnswer;
    /// Looks at the device's event source (the watchdog's look, and
    /// polled mode's).
    fn service_events(hba: &Hba<Self>);

    /// Frees the memory the device reads and writes outside the request
    /// rings and commands.
    ///
    /// # Safety
    /// Once, after the device was stopped for good, with nothing else
    /// able to reach the HBA; the fields are not used afterwards.
    unsafe fn free_device_memory(&mut self);
}
