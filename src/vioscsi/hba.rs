//! The virtio-scsi HBA instance: attach, (re)initialization of the device,
//! interrupts, detach, quiesce.

use super::cmd::{Cmd, CmdLayout, OwnedCmd};
use super::config::{CONFIG_LEN, DeviceConfig, Limits};
use super::events::{EventQueue, Work};
use super::proto::{self, CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE};
use super::recovery::ControlQueue;
use super::vectors::MsixLayout;
use crate::ddi::dev::StrProp;
use crate::ddi::dma::{DmaBuffer, DmaMode};
use crate::ddi::intr::{Interrupts, IntrKind, IrmChange};
use crate::ddi::pci::PciConfig;
use crate::ddi::sync::KMutex;
use crate::ddi::taskq::TaskQueue;
use crate::ddi::tgtmap::TargetMap;
use crate::ddi::time::Periodic;
use crate::ddi::{DdiError, Dip, Sleep};
use crate::ffi;
use crate::scsa::cap::HbaCaps;
use crate::vioscsi::cmd::CmdList;
use crate::virtio::pci::{NO_VECTOR, Transport, TransportChoice, TransportError};
use crate::virtio::ring::{Layout, SplitQueue};
use crate::virtio::{Features, Status, VIRTIO_PCI_VENDOR};
use crate::{dev_note, dev_warn};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ffi::c_void;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};

/// Largest ring the driver sets up (modern devices let the driver choose;
/// legacy ones impose theirs).
pub const MAX_RING: u16 = 1024;
/// Legacy rings are located by a 32-bit page number: below 2^44.
const LEGACY_RING_ADDR_HI: u64 = (1 << 44) - 1;

/// HBA state (the `state` word).
pub mod state {
    /// Being attached; no I/O yet.
    pub const ATTACHING: u8 = 0;
    /// Serving I/O.
    pub const RUNNING: u8 = 1;
    /// The device is being reset and re-initialized: new commands get
    /// TRAN_BUSY.
    pub const RESETTING: u8 = 2;
    /// The device could not be brought back: commands fail.
    pub const FAILED: u8 = 3;
    /// Being detached or quiesced.
    pub const STOPPED: u8 = 4;
}

/// How completions are signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntrMode {
    /// MSI-X, routed as [`MsixLayout`] says for the vectors held (which an
    /// IRM callback may change while the driver runs).
    MsiX,
    /// One MSI vector; the ISR register says why.
    Msi,
    /// The fixed (INTx) line, possibly shared; the ISR says whether it was us.
    Fixed,
    /// No interrupts: completions are polled (the `interrupt-type=poll`
    /// tunable).
    Poll,
}

impl IntrMode {
    /// Whether the device interrupts at all.
    pub fn interrupts(self) -> bool {
        self != IntrMode::Poll
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            IntrMode::MsiX => "MSI-X",
            IntrMode::Msi => "MSI",
            IntrMode::Fixed => "fixed",
            IntrMode::Poll => "polled",
        }
    }
}

/// What an interrupt vector serves (the handler's second argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorRole {
    /// Every source, the ISR register saying which (MSI, fixed).
    All,
    /// MSI-X vector `v`: what it serves is the current [`MsixLayout`]'s
    /// answer, read when it interrupts.
    MsiX(u16),
}

impl VectorRole {
    /// Encodes the role as the handler's pointer-sized argument.
    pub fn encode(self) -> usize {
        match self {
            VectorRole::All => 0,
            VectorRole::MsiX(v) => 1 + usize::from(v),
        }
    }

    /// Decodes [`VectorRole::encode`].
    pub fn decode(v: usize) -> VectorRole {
        match v {
            0 => VectorRole::All,
            n => VectorRole::MsiX((n - 1).min(usize::from(u16::MAX)) as u16),
        }
    }
}

/// Driver tunables (`rvscsi.conf` properties, see rvscsi(4D)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// `virtio-transport`: auto | legacy | modern.
    pub transport: TransportChoice,
    /// `virtio-indirect`: use indirect descriptors if offered (1).
    pub indirect: bool,
    /// `virtio-event-idx`: use EVENT_IDX if offered (1).
    pub event_idx: bool,
    /// `interrupt-type`: the interrupt types to try, in order.
    pub intr: &'static [IntrKind],
    /// `interrupt-type=poll`.
    pub poll: bool,
    /// `request-queues`: use at most this many request queues (0: every
    /// queue the device offers).
    pub request_queues: u32,
    /// `virtio-notify-batching`: a command started from a completion pass
    /// rings the doorbell once at the end of the pass (1), or at once (0,
    /// as drivers without batching do; for comparison and debugging).
    pub notify_batching: bool,
}

impl Tunables {
    /// Reads the tunables from the node's properties (rvscsi.conf);
    /// a value it does not know is reported and the default used.
    pub fn read(dip: Dip) -> Tunables {
        let mut buf = [0u8; 32];
        let transport = match dip.prop_string(c"virtio-transport", &mut buf) {
            StrProp::Value("legacy") => TransportChoice::Legacy,
            StrProp::Value("modern") => TransportChoice::Modern,
            StrProp::Absent | StrProp::Value("auto") => TransportChoice::Auto,
            other => {
                dev_warn!(
                    dip,
                    "virtio-transport {} is not auto, legacy or modern: using auto",
                    Shown(other)
                );
                TransportChoice::Auto
            }
        };
        let mut buf = [0u8; 32];
        let (intr, poll): (&'static [IntrKind], bool) =
            match dip.prop_string(c"interrupt-type", &mut buf) {
                StrProp::Value("msix") => (&[IntrKind::MsiX], false),
                StrProp::Value("msi") => (&[IntrKind::Msi, IntrKind::Fixed], false),
                StrProp::Value("fixed") => (&[IntrKind::Fixed], false),
                StrProp::Value("poll") => (&[], true),
                StrProp::Absent | StrProp::Value("auto") => {
                    (&[IntrKind::MsiX, IntrKind::Msi, IntrKind::Fixed], false)
                }
                other => {
                    dev_warn!(
                        dip,
                        "interrupt-type {} is not auto, msix, msi, fixed or poll: using auto",
                        Shown(other)
                    );
                    (&[IntrKind::MsiX, IntrKind::Msi, IntrKind::Fixed], false)
                }
            };
        Tunables {
            transport,
            indirect: dip.prop_int(c"virtio-indirect", 1) != 0,
            event_idx: dip.prop_int(c"virtio-event-idx", 1) != 0,
            intr,
            poll,
            request_queues: u32::try_from(dip.prop_int(c"request-queues", 0)).unwrap_or(0),
            notify_batching: dip.prop_int(c"virtio-notify-batching", 1) != 0,
        }
    }
}

/// A string property value for a message.
struct Shown<'a>(StrProp<'a>);

impl core::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            StrProp::Value(v) => write!(f, "\"{v}\""),
            StrProp::Unusable => f.write_str("(too long or not text)"),
            StrProp::Absent => f.write_str("(unset)"),
        }
    }
}

/// Why attach failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// A DDI call failed.
    Ddi(DdiError),
    /// The transport could not be set up.
    Transport(TransportError),
    /// The device is not what the driver drives, or says something
    /// impossible.
    Device(&'static str),
}

impl From<DdiError> for AttachError {
    fn from(e: DdiError) -> Self {
        AttachError::Ddi(e)
    }
}

impl From<TransportError> for AttachError {
    fn from(e: TransportError) -> Self {
        AttachError::Transport(e)
    }
}

impl core::fmt::Display for AttachError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AttachError::Ddi(e) => write!(f, "{e}"),
            AttachError::Transport(e) => write!(f, "{e}"),
            AttachError::Device(what) => write!(f, "{what}"),
        }
    }
}

/// A request queue and its ring.
pub struct RequestQueue {
    /// The virtio queue number.
    pub index: u16,
    /// The ring, under the queue lock.
    pub ring: KMutex<ReqRing>,
}

/// What the request-queue lock protects.
pub struct ReqRing {
    /// The ring; its tokens are the commands in flight.
    pub ring: SplitQueue<DmaBuffer, OwnedCmd>,
    /// Completion passes running on this queue (notifications for
    /// submissions made meanwhile are deferred to the end of the pass).
    pub completing: u32,
    /// A submission during a completion pass needs a notification.
    pub kick_pending: bool,
    /// Commands the device returned while a poller reaped the ring (a
    /// thread that may hold driver locks): they go back to their target
    /// drivers from the next interrupt or watchdog tick, never from under
    /// a driver lock.
    pub deferred: CmdList,
}

/// Counters for tests and benchmarks (relaxed atomics; cheap).
#[derive(Default)]
pub struct Stats {
    /// Commands accepted by `tran_start` (and internal ones).
    pub started: AtomicU64,
    /// Commands completed.
    pub completed: AtomicU64,
    /// `tran_start` returned TRAN_BUSY.
    pub busy: AtomicU64,
    /// Device notifications (doorbell writes).
    pub notifies: AtomicU64,
    /// Interrupt handler invocations.
    pub interrupts: AtomicU64,
    /// Used elements the device returned that named no command.
    pub bad_used: AtomicU64,
    /// Device resets.
    pub resets: AtomicU64,
    /// Task management functions sent.
    pub tmfs: AtomicU64,
    /// Events received.
    pub events: AtomicU64,
    /// Completion passes that ran out with completions still waiting (the
    /// device may never interrupt for them): the queue went to the work
    /// task.
    pub rearm_handoffs: AtomicU64,
    /// Request queues the work task reaped for a hand-off.
    pub handoff_reaps: AtomicU64,
    /// Every request queue the work task has reaped for a hand-off (bit
    /// per queue): only queues that handed themselves on.
    pub handoff_reaped_queues: AtomicU64,
    /// Request queues the watchdog found with completions that had waited
    /// a whole tick unconsumed, and reaped (an interrupt that never came).
    pub watchdog_reaps: AtomicU64,
    /// IRM callbacks handled (the MSI-X grant changed).
    pub irm_changes: AtomicU64,
}

impl Stats {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
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

/// CPUs with a completion-queue hint of their own (see
/// [`VioScsi::reaping`]); more share slots.
pub const REAP_HINTS: usize = 64;

/// Callbacks the driver hands the kernel (defined in the entry layer,
/// which owns every `extern "C"` function).
pub struct Callbacks {
    /// Interrupt handler: arg1 the HBA, arg2 the [`VectorRole`].
    pub intr: ffi::ddi_intr_handler_t,
    /// IRM callback (`ddi_cb_register(9F)`): arg1 the
    /// [`crate::ddi::intr::IrmLink`] whose owner is the HBA.
    pub irm: ffi::ddi_cb_func_t,
    /// Task-queue function: arg the HBA.
    pub work: unsafe extern "C" fn(*mut c_void),
    /// Periodic watchdog: arg the HBA.
    pub watchdog: unsafe extern "C" fn(*mut c_void),
}

/// One attached virtio-scsi controller.
pub struct VioScsi {
    pub(crate) dip: Dip,
    _pci: PciConfig,
    pub(crate) transport: Transport,
    pub(crate) features: Features,
    pub(crate) limits: Limits,
    pub(crate) layout: CmdLayout,
    pub(crate) indirect: bool,
    /// See [`Tunables::notify_batching`].
    pub(crate) notify_batching: bool,
    pub(crate) mode: IntrMode,
    intr: KMutex<Option<Interrupts>>,
    /// MSI-X vectors the routing uses now ([`MsixLayout`]); 0 without
    /// MSI-X. Written under `routing`, read by the handlers.
    msix_vectors: AtomicU16,
    /// Serializes programming the device's vector routing and queue
    /// registers (both go through `queue_select`): device (re)activation
    /// and the IRM callback's re-routing.
    routing: KMutex<()>,
    /// The request queues. This, `ctl`, `evt` and `probe` hold all the
    /// memory the HBA owns that the device reads or writes (rings, event
    /// buffers, the probe command's headers): each is a `ManuallyDrop`
    /// that only [`VioScsi::free_device_memory`] drops, and only once the
    /// device is known to be stopped (else it is kept, see `Drop`).
    pub(crate) queues: ManuallyDrop<Vec<RequestQueue>>,
    /// Per CPU (seqid modulo [`REAP_HINTS`]): 1 + the request queue whose
    /// completions that CPU is delivering, 0 when none. A command a target
    /// driver starts from its completion callback goes to that queue, so
    /// its doorbell joins the one the pass rings at its end, whichever CPU
    /// the queue's vector happens to interrupt (illumos does not tie a
    /// vector to the CPU whose queue it serves). Only a hint: a collision
    /// sends a command to another valid queue.
    pub(crate) reaping: [core::sync::atomic::AtomicU16; REAP_HINTS],
    /// Doorbells deferred to the end of the completion passes running.
    pub(crate) pass_kicks: super::io::PassKicks,
    pub(crate) ctl: ManuallyDrop<KMutex<ControlQueue>>,
    pub(crate) evt: ManuallyDrop<KMutex<EventQueue>>,
    pub(crate) next_tag: AtomicU64,
    pub(crate) state: AtomicU8,
    pub(crate) work: KMutex<Work>,
    pub(crate) taskq: Option<TaskQueue>,
    watchdog: KMutex<Option<Periodic>>,
    pub(crate) tgtmap: KMutex<Option<TargetMap>>,
    /// The command used for the driver's own probes (TEST UNIT READY);
    /// device-visible memory like `queues`.
    pub(crate) probe: ManuallyDrop<KMutex<Box<Cmd>>>,
    pub(crate) callbacks: Callbacks,
    /// Set by [`VioScsi::teardown`] once the device finished a reset with
    /// nothing able to bring it back: only then may `Drop` free the
    /// device-visible memory.
    device_stopped: AtomicBool,
    /// Counters.
    pub stats: Stats,
}

fn ring_memory(dip: Dip, size: u16, legacy: bool) -> Result<DmaBuffer, AttachError> {
    let layout =
        Layout::new(size).ok_or(AttachError::Device("queue size is not a power of two"))?;
    let addr_hi = if legacy {
        LEGACY_RING_ADDR_HI
    } else {
        u64::MAX
    };
    Ok(DmaBuffer::alloc(
        dip,
        layout.total,
        4096,
        addr_hi,
        DmaMode::Consistent,
        Sleep::Yes,
    )?)
}

/// The ring size to use for queue `q`: the device's on legacy, at most
/// [`MAX_RING`] (rounded down to a power of two) on modern devices.
fn ring_size(t: &Transport, q: u16) -> Result<u16, AttachError> {
    let max = t.queue_max_size(q);
    if max == 0 {
        return Err(AttachError::Device("a required virtqueue does not exist"));
    }
    if t.is_legacy() {
        return Ok(max);
    }
    let size = max.min(MAX_RING);
    Ok(1 << (15 - size.leading_zeros().min(15)))
}

impl VioScsi {
    /// Attaches to the virtio-scsi device at `dip`: everything up to a
    /// running device with interrupts enabled. The result must not move
    /// (interrupt handlers hold its address): it lives on the heap, held
    /// by an [`OwnedHba`].
    pub fn attach(dip: Dip, callbacks: Callbacks) -> Result<OwnedHba, AttachError> {
        let tun = Tunables::read(dip);
        let pci = PciConfig::open(dip)?;
        let (vendor, device) = pci.ids();
        let is_scsi = device == crate::virtio::VIRTIO_PCI_MODERN_BASE + proto::VIRTIO_ID_SCSI
            || (crate::virtio::VIRTIO_PCI_TRANSITIONAL_RANGE.contains(&device)
                && pci.read16(ffi::PCI_CONF_SUBSYSID as u16) == proto::VIRTIO_ID_SCSI);
        if vendor != VIRTIO_PCI_VENDOR || !is_scsi {
            return Err(AttachError::Device("not a virtio-scsi device"));
        }
        let mut transport = Transport::open(dip, &pci, tun.transport, CONFIG_LEN)?;

        // virtio 1.2 §3.1.1: reset, ACKNOWLEDGE, DRIVER, features.
        // attach(9E) runs in thread context: the wait may sleep.
        transport.reset_sleeping()?;
        transport.set_status(Status::ACKNOWLEDGE);
        transport.add_status(Status::DRIVER);
        let offered = transport.device_features();
        let features = Self::choose_features(&transport, offered, &tun)?;
        if !transport.negotiate(features) {
            transport.fail();
            return Err(AttachError::Device(
                "device refused the feature set (FEATURES_OK)",
            ));
        }

        let cfg = DeviceConfig::read(&transport);
        let req_size = ring_size(&transport, FIRST_REQUEST_QUEUE)?;
        let limits = Limits::new(&cfg, req_size).map_err(AttachError::Device)?;
        tell_sense_size(&transport, &limits);
        // Every request queue the device offers (virtio 1.2 §5.6.4
        // num_queues), unless the administrator asked for fewer.
        let nreq = match tun.request_queues {
            0 => limits.request_queues,
            cap => limits
                .request_queues
                .min(u16::try_from(cap).unwrap_or(u16::MAX)),
        };
        if let Some(n) = transport.num_queues()
            && n < FIRST_REQUEST_QUEUE + nreq
        {
            return Err(AttachError::Device(
                "fewer virtqueues than num_queues implies",
            ));
        }
        let indirect = features.contains(Features::INDIRECT_DESC);
        let event_idx = features.contains(Features::EVENT_IDX);
        let layout = CmdLayout::new(
            limits.cdb_size,
            limits.sense_size,
            limits.segments,
            indirect,
        );

        // Interrupts (allocated, not yet enabled) decide the lock priority.
        // The IRM callback is registered first, so that on apix the pool
        // grants a vector per request queue (without it illumos grants at
        // most ddi_msix_alloc_limit: 8 on apix, 2 on pcplusmp); whatever
        // is granted, MsixLayout routes every source.
        let (interrupts, mode) = if tun.poll {
            (None, IntrMode::Poll)
        } else {
            let want = MsixLayout::wanted(nreq);
            let mut i = Interrupts::alloc(dip, tun.intr, want, Some(callbacks.irm))?;
            let mode = match i.kind() {
                IntrKind::MsiX => IntrMode::MsiX,
                IntrKind::Msi => IntrMode::Msi,
                IntrKind::Fixed => IntrMode::Fixed,
            };
            i.keep(want);
            (Some(i), mode)
        };
        let pri = interrupts.as_ref().map_or(0, |i| i.priority());
        // A high-level interrupt (above LOCK_LEVEL, e.g. from an
        // `interrupt-priorities` property in a .conf) would make the locks
        // its handlers take spin locks and run scsi_hba_pkt_comp(9F) and
        // everything it calls above the scheduler, where blocking kernel
        // services must not be used (ddi_intr_get_hilevel_pri(9F)). The
        // driver has no soft-interrupt stage for that: refuse.
        // SAFETY: no arguments; callable from attach context.
        let hilevel = unsafe { ffi::ddi_intr_get_hilevel_pri() };
        if interrupts.is_some() && pri >= hilevel {
            dev_warn!(
                dip,
                "interrupt priority {pri} is high-level (at or above {hilevel},                  ddi_intr_get_hilevel_pri): not supported, attach refused; remove                  interrupt-priorities from rvscsi.conf or set it below {hilevel}"
            );
            return Err(AttachError::Device(
                "high-level interrupt priority is not supported",
            ));
        }
        let msix_vectors = match (&interrupts, mode) {
            (Some(i), IntrMode::MsiX) => MsixLayout::new(i.count(), nreq).vectors() as u16,
            _ => 0,
        };

        let legacy = transport.is_legacy();
        transport.prepare_queues(FIRST_REQUEST_QUEUE + nreq);
        let mut queues = Vec::with_capacity(usize::from(nreq));
        for n in 0..nreq {
            let index = FIRST_REQUEST_QUEUE + n;
            let size = ring_size(&transport, index)?;
            let ring = SplitQueue::new(ring_memory(dip, size, legacy)?, size, event_idx)
                .ok_or(AttachError::Device("request queue memory"))?;
            queues.push(RequestQueue {
                index,
                ring: KMutex::new(
                    ReqRing {
                        ring,
                        completing: 0,
                        kick_pending: false,
                        deferred: CmdList::new(),
                    },
                    pri,
                ),
            });
        }
        let ctl_size = ring_size(&transport, CONTROL_QUEUE)?;
        let ctl = ControlQueue::new(
            dip,
            ring_memory(dip, ctl_size, legacy)?,
            ctl_size,
            event_idx,
        )?;
        let evt_size = ring_size(&transport, EVENT_QUEUE)?;
        let evt = EventQueue::new(
            dip,
            ring_memory(dip, evt_size, legacy)?,
            evt_size,
            event_idx,
            limits.event_size,
        )?;
        let probe = Box::new(Cmd::new(dip, &layout, Sleep::Yes)?);
        let taskq = TaskQueue::create(dip, c"rvscsi_work")?;

        let hba = OwnedHba::new(VioScsi {
            dip,
            _pci: pci,
            transport,
            features,
            limits,
            layout,
            indirect,
            notify_batching: tun.notify_batching,
            mode,
            intr: KMutex::new(interrupts, 0),
            msix_vectors: AtomicU16::new(msix_vectors),
            routing: KMutex::new((), pri),
            queues: ManuallyDrop::new(queues),
            ctl: ManuallyDrop::new(KMutex::new(ctl, 0)),
            evt: ManuallyDrop::new(KMutex::new(evt, pri)),
            next_tag: AtomicU64::new(1),
            reaping: [const { core::sync::atomic::AtomicU16::new(0) }; REAP_HINTS],
            pass_kicks: super::io::PassKicks::new(),
            state: AtomicU8::new(state::ATTACHING),
            work: KMutex::new(Work::default(), pri),
            taskq: Some(taskq),
            watchdog: KMutex::new(None, 0),
            tgtmap: KMutex::new(None, 0),
            probe: ManuallyDrop::new(KMutex::new(probe, 0)),
            callbacks,
            device_stopped: AtomicBool::new(false),
            stats: Stats::default(),
        });
        // The IRM callback may now reach the HBA (its address holds until
        // the teardown unregisters the callback, before it is freed).
        if let Some(i) = hba.get().intr.lock().as_ref() {
            i.link_irm(hba.as_ptr().cast());
        }
        let started = {
            let h = hba.get();
            h.start_interrupts().and_then(|()| h.activate())
        };
        if let Err(e) = started {
            // activate() may have handed the rings to the device (and
            // DRIVER_OK); interrupt handlers and the IRM callback may be
            // running. Dropping `hba` (the OwnedHba) runs the teardown
            // through a shared reference while they may, and frees the
            // HBA only after it (its memory only once the device is
            // reset). (Every earlier return above frees memory the device
            // was never told about: the device was reset at the start and
            // learns ring addresses only in activate().)
            hba.get().transport.fail();
            return Err(e);
        }
        let hba_ref = hba.get();
        hba_ref.state.store(state::RUNNING, Ordering::Release);
        hba_ref.start_watchdog();
        dev_note!(
            dip,
            "virtio-scsi {} transport, {} interrupts{}, {} request queue(s) of {}, {} segments, max transfer {} KiB{}{}",
            if legacy { "legacy" } else { "modern" },
            mode.name(),
            VectorCount(hba_ref.msix_vectors()),
            nreq,
            req_size,
            limits.segments,
            limits.max_xfer / 1024,
            if indirect { ", indirect" } else { "" },
            if event_idx { ", event-idx" } else { "" },
        );
        Ok(hba)
    }

    fn choose_features(
        t: &Transport,
        offered: Features,
        tun: &Tunables,
    ) -> Result<Features, AttachError> {
        let mut want = Features::SCSI_HOTPLUG | Features::SCSI_CHANGE;
        if tun.indirect {
            want |= Features::INDIRECT_DESC;
        }
        if tun.event_idx {
            want |= Features::EVENT_IDX;
        }
        if !t.is_legacy() {
            if !offered.contains(Features::VERSION_1) {
                return Err(AttachError::Device(
                    "modern interface without VIRTIO_F_VERSION_1",
                ));
            }
            // DDI DMA cookies are already platform (IOMMU) addresses.
            want |= Features::VERSION_1 | Features::ACCESS_PLATFORM;
        }
        Ok(offered & want)
    }

    fn start_interrupts(&self) -> Result<(), AttachError> {
        let mut g = self.intr.lock();
        let Some(intr) = g.as_mut() else {
            return Ok(());
        };
        let me = self as *const VioScsi as *mut c_void;
        for index in 0..intr.count() {
            let role = match self.mode {
                IntrMode::MsiX => VectorRole::MsiX(index as u16),
                _ => VectorRole::All,
            };
            // SAFETY: `self` is on the heap (OwnedHba) and outlives the
            // handlers: the teardown removes them (ddi_intr_disable waits
            // for a running one) before the HBA is freed. The handlers
            // make only shared references from `me`.
            unsafe {
                intr.add_handler(index, self.callbacks.intr, me, role.encode() as *mut c_void)?
            };
        }
        intr.enable()?;
        self.transport
            .set_msix_enabled(intr.kind() == IntrKind::MsiX);
        Ok(())
    }

    /// Disables and frees the interrupts and unregisters the IRM callback.
    /// They are taken out of the lock first and freed outside it: an IRM
    /// callback running meanwhile (it takes the lock) finds none, and the
    /// last `ddi_intr_free` may wait for that callback's balance to end.
    fn stop_interrupts(&self) {
        let taken = self.intr.lock().take();
        if let Some(mut i) = taken {
            i.disable();
            drop(i);
        }
        self.transport.set_msix_enabled(false);
    }

    /// The MSI-X routing in use now.
    fn msix_layout(&self) -> MsixLayout {
        MsixLayout::new(
            usize::from(self.msix_vectors.load(Ordering::Acquire)),
            self.queues.len() as u16,
        )
    }

    /// Routes configuration changes and every virtqueue as `layout` says
    /// (the caller holds `routing`); false if the device refused a vector.
    fn program_routing(&self, layout: &MsixLayout) -> bool {
        let t = &self.transport;
        let mut ok = t.set_config_vector(layout.config_vector());
        // Task management is polled: no interrupts for it.
        ok &= t.set_queue_vector(CONTROL_QUEUE, NO_VECTOR);
        ok &= t.set_queue_vector(EVENT_QUEUE, layout.event_vector());
        for (n, q) in self.queues.iter().enumerate() {
            ok &= t.set_queue_vector(q.index, layout.queue_vector(n as u16));
        }
        ok
    }

    /// The IRM callback (`DDI_CB_INTR_ADD` / `DDI_CB_INTR_REMOVE`, entry:
    /// `ddi_cb_func_t`), on the IRM balance thread. The driver follows the
    /// grant (`ddi_intr_get_navail(9F)` says what it now is) up to a vector
    /// per request queue, without ever disabling vector 0 or all vectors at
    /// once, so interrupts keep flowing:
    /// - fewer: the routing moves every source onto the vectors that stay
    ///   (the handlers read the new layout), then the others are disabled
    ///   (waiting for running handlers) and freed;
    /// - more: the new vectors are allocated, get their handlers and are
    ///   enabled, then the routing moves queues onto them.
    ///
    /// Either way every queue is then reaped once, for completions whose
    /// interrupt was raised on a vector while it changed hands. Returns the
    /// callback's `DDI_*` answer.
    pub fn irm_changed(&self, change: IrmChange) -> i32 {
        let mut g = self.intr.lock();
        // Detach took the interrupts (and frees them) or they are not MSI-X.
        let Some(intr) = g.as_mut() else {
            return ffi::DDI_FAILURE;
        };
        if self.mode != IntrMode::MsiX {
            return ffi::DDI_ENOTSUP;
        }
        let nq = self.queues.len() as u16;
        let wanted = MsixLayout::wanted(nq);
        let held = intr.count();
        let available = intr.available();
        if available == 0 {
            // The kernel would not say what the grant is: change nothing.
            return ffi::DDI_FAILURE;
        }
        let target = available.min(wanted);
        let me = self as *const VioScsi as *mut c_void;
        let mut result = ffi::DDI_SUCCESS;
        if target < held {
            self.reroute(MsixLayout::new(target, nq));
            intr.shrink(target);
        } else if target > held {
            let handler = self.callbacks.intr;
            // SAFETY: as in start_interrupts: the HBA outlives its handlers.
            let grown = unsafe {
                intr.grow(target, handler, me, |i| {
                    VectorRole::MsiX(i as u16).encode() as *mut c_void
                })
            };
            match grown {
                Ok(n) => self.reroute(MsixLayout::new(n, nq)),
                Err(e) => {
                    dev_warn!(
                        self.dip,
                        "IRM: more vectors were offered but not taken: {e}"
                    );
                    result = ffi::DDI_FAILURE;
                }
            }
        }
        let now = intr.count();
        drop(g);
        Stats::bump(&self.stats.irm_changes);
        dev_note!(
            self.dip,
            "IRM {}: {held} -> {now} MSI-X vector(s) for {nq} request queue(s)",
            match change {
                IrmChange::Add(n) => alloc::format!("added {n}"),
                IrmChange::Remove(n) => alloc::format!("removed {n}"),
            }
        );
        if self.state() != state::STOPPED {
            self.service_all();
        }
        result
    }

    /// Switches the routing to `layout`: the handlers first (they read
    /// `msix_vectors`), then the device. A device that refuses a vector
    /// gets everything on vector 0, which it took at attach.
    fn reroute(&self, layout: MsixLayout) {
        let _r = self.routing.lock();
        self.msix_vectors
            .store(layout.vectors() as u16, Ordering::Release);
        if !self.program_routing(&layout) {
            dev_warn!(
                self.dip,
                "device refused the MSI-X routing for {} vectors: everything on vector 0",
                layout.vectors()
            );
            let one = MsixLayout::new(1, self.queues.len() as u16);
            self.msix_vectors.store(1, Ordering::Release);
            let _ = self.program_routing(&one);
        }
    }

    /// Brings the (reset, feature-negotiated) device up: vectors, queue
    /// addresses, event buffers, DRIVER_OK (virtio 1.2 §3.1.1 steps 7-8).
    pub(crate) fn activate(&self) -> Result<(), AttachError> {
        let t = &self.transport;
        // The IRM callback re-routes through the same registers.
        let _routing = self.routing.lock();
        let msix = self.mode == IntrMode::MsiX;
        let layout = self.msix_layout();
        let (config_vec, event_vec) = (layout.config_vector(), layout.event_vector());
        let req_vec = |n: u16| layout.queue_vector(n);
        if msix && !t.set_config_vector(config_vec) {
            return Err(AttachError::Device(
                "device refused the configuration MSI-X vector",
            ));
        }
        {
            let c = self.ctl.lock();
            let (d, a, u) = c.ring.addresses();
            t.setup_queue(CONTROL_QUEUE, c.ring.size(), d, a, u)?;
            // Task management is polled: no interrupts for it.
            if msix && !t.set_queue_vector(CONTROL_QUEUE, NO_VECTOR) {
                return Err(AttachError::Device("control queue vector"));
            }
        }
        {
            let mut e = self.evt.lock();
            let (d, a, u) = e.ring.addresses();
            t.setup_queue(EVENT_QUEUE, e.ring.size(), d, a, u)?;
            if msix && !t.set_queue_vector(EVENT_QUEUE, event_vec) {
                return Err(AttachError::Device(
                    "device refused the event queue MSI-X vector",
                ));
            }
            e.post_all();
            if self.mode.interrupts() {
                e.ring.enable_interrupts();
            } else {
                e.ring.disable_interrupts();
            }
        }
        for (n, q) in self.queues.iter().enumerate() {
            let mut g = q.ring.lock();
            let (d, a, u) = g.ring.addresses();
            t.setup_queue(q.index, g.ring.size(), d, a, u)?;
            if msix && !t.set_queue_vector(q.index, req_vec(n as u16)) {
                return Err(AttachError::Device(
                    "device refused a request queue MSI-X vector",
                ));
            }
            if self.mode.interrupts() {
                g.ring.enable_interrupts();
            } else {
                g.ring.disable_interrupts();
            }
        }
        t.add_status(Status::DRIVER_OK);
        if t.status().contains(Status::DEVICE_NEEDS_RESET) {
            return Err(AttachError::Device(
                "device needs reset right after DRIVER_OK",
            ));
        }
        // The event buffers posted before DRIVER_OK: tell the device.
        t.notify(EVENT_QUEUE);
        Ok(())
    }

    /// Reset and re-negotiate the device with the same features (the
    /// device side of a device reset).
    pub(crate) fn renegotiate(&self) -> Result<(), AttachError> {
        let t = &self.transport;
        t.reset()?;
        t.set_status(Status::ACKNOWLEDGE);
        t.add_status(Status::DRIVER);
        if !t.negotiate(self.features) {
            return Err(AttachError::Device(
                "device refused the feature set after reset",
            ));
        }
        tell_sense_size(t, &self.limits);
        Ok(())
    }

    fn start_watchdog(&self) {
        // Polled mode reaps completions from the watchdog; otherwise it
        // only looks for timeouts, once a second.
        let interval = if self.mode.interrupts() {
            ffi::NANOSEC
        } else {
            ffi::NANOSEC / 100
        };
        let me = self as *const VioScsi as *mut c_void;
        // SAFETY: detach stops the watchdog (Periodic::drop waits for a
        // running tick) before the HBA is freed.
        let p = unsafe { Periodic::start(self.callbacks.watchdog, me, interval) };
        *self.watchdog.lock() = Some(p);
    }

    /// Current state (`state::*`).
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// The device node.
    pub fn dip(&self) -> Dip {
        self.dip
    }

    /// The limits in use.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The interrupt mode in use.
    pub fn intr_mode(&self) -> IntrMode {
        self.mode
    }

    /// MSI-X vectors the routing uses now (0 without MSI-X).
    pub fn msix_vectors(&self) -> usize {
        usize::from(self.msix_vectors.load(Ordering::Acquire))
    }

    /// Whether the modern transport is in use.
    pub fn is_modern(&self) -> bool {
        !self.transport.is_legacy()
    }

    /// The features negotiated.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Bytes of HBA-private area each packet needs (`tran_hba_len`).
    pub const fn pkt_private_len() -> usize {
        core::mem::size_of::<Cmd>()
    }

    /// The DMA attributes of data buffers (`tran_dma_attr`): any 64-bit
    /// address, segments of up to 4 GiB (a descriptor's 32-bit length),
    /// `seg_max` segments, transfers of `max_sectors`.
    pub fn data_dma_attr(&self) -> ffi::ddi_dma_attr_t {
        ffi::ddi_dma_attr_t {
            dma_attr_version: ffi::DMA_ATTR_V0,
            dma_attr_addr_lo: 0,
            dma_attr_addr_hi: u64::MAX,
            dma_attr_count_max: 0xFFFF_FFFF,
            dma_attr_align: 1,
            dma_attr_burstsizes: 1,
            dma_attr_minxfer: 1,
            dma_attr_maxxfer: u64::from(self.limits.max_xfer),
            dma_attr_seg: u64::MAX,
            dma_attr_sgllen: self.limits.segments as i32,
            // Partial-DMA windows end on block boundaries.
            dma_attr_granular: 512,
            dma_attr_flags: 0,
        }
    }

    /// What `getcap` reports.
    pub fn caps(&self) -> HbaCaps {
        HbaCaps {
            dma_max: self.limits.max_xfer,
            max_cdb_len: self.limits.cdb_size,
            interconnect: ffi::INTERCONNECT_PARALLEL,
        }
    }

    /// The interrupt handler body (entry: `ddi_intr_handler_t`).
    pub fn interrupt(&self, role: VectorRole) -> u32 {
        Stats::bump(&self.stats.interrupts);
        match self.mode {
            IntrMode::Fixed | IntrMode::Msi => {
                // Reading the ISR deasserts the line and tells whether the
                // (possibly shared) interrupt was ours (§4.1.4.5).
                let isr = self.transport.read_isr();
                if isr == 0 {
                    return if self.mode == IntrMode::Fixed {
                        ffi::DDI_INTR_UNCLAIMED
                    } else {
                        ffi::DDI_INTR_CLAIMED
                    };
                }
                if isr & 1 != 0 {
                    self.service_all();
                }
                if isr & 2 != 0 {
                    self.config_changed();
                }
            }
            IntrMode::MsiX => {
                let v = match role {
                    VectorRole::MsiX(v) => v,
                    VectorRole::All => 0,
                };
                let layout = self.msix_layout();
                if layout.serves_config_and_events(v) {
                    self.config_changed();
                    self.service_events();
                }
                for q in layout.queues_of(v) {
                    self.reap(usize::from(q));
                }
            }
            IntrMode::Poll => return ffi::DDI_INTR_UNCLAIMED,
        }
        ffi::DDI_INTR_CLAIMED
    }

    /// Services every queue (shared vectors, polled mode).
    pub(crate) fn service_all(&self) {
        self.service_events();
        for n in 0..self.queues.len() {
            self.reap(n);
        }
    }

    fn config_changed(&self) {
        if self.transport.status().contains(Status::DEVICE_NEEDS_RESET) {
            dev_warn!(self.dip, "device needs reset");
            self.schedule_reset();
        }
    }

    /// The watchdog tick (entry: periodic callback).
    pub fn watchdog(&self) {
        // A kernel thread (ddi_periodic level 0: servicing_interrupt() is
        // 0), but what it completes must not recover synchronously from
        // inside this tick: the driver's own delivery (`own_delivery`).
        let _delivering = self.own_delivery();
        // Completions a poller parked since the last interrupt, in any
        // state: after a failed reset no interrupt will come for them.
        for n in 0..self.queues.len() {
            self.complete_parked(n);
        }
        if self.state() != state::RUNNING {
            return;
        }
        if self.mode.interrupts() {
            // Events are rare and losing one costs a discovery: look.
            self.service_events();
            // Completions no interrupt came for (the safety net).
            self.watchdog_reap();
        } else {
            self.service_all();
        }
        self.scan_timeouts();
    }

    /// The stopping sequence, in the only order that touches no freed
    /// memory: each step removes a way into the HBA before the next one
    /// waits for, or frees, what that way could reach. [`OwnedHba`]'s drop
    /// runs it on every path that ends an HBA (detach, a failed attach),
    /// and frees the HBA only after it.
    ///
    /// It runs through `&self`, never `&mut self`: until step 5 returns,
    /// interrupt handlers, the IRM callback, the watchdog tick and the
    /// work task may be running, each with a `&VioScsi` made from the raw
    /// pointer the kernel was given. A `&mut VioScsi` (or a `Box` moved by
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
    /// 4. The device: reset (virtio 1.2 §2.1.1, §4.1.4.3.2), so it stops
    ///    using the rings and buffers (no more DMA, no more interrupts).
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
        self.state.store(state::STOPPED, Ordering::Release);
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
        self.stop_interrupts();
        // 4. The device stops DMA.
        let mut stopped = self.stop_device();
        // 5. The task under way, if any, finishes.
        if let Some(tq) = &self.taskq {
            tq.wait();
        }
        // 6. A task that was resetting the device may have brought it back
        // up (it ends with the state RUNNING or FAILED): reset once more.
        if self.state.swap(state::STOPPED, Ordering::AcqRel) != state::STOPPED {
            stopped = self.stop_device();
        }
        // 7. Release pairs with the load in Drop (on this thread anyway,
        // but the ordering states the intent).
        self.device_stopped.store(stopped, Ordering::Release);
    }

    /// Resets the device and waits for the reset to finish (the device
    /// no longer touches the driver's memory once it has); false if it
    /// did not finish.
    ///
    /// Thread context only (detach, a failed attach): it sleeps between
    /// looks at the status ([`Transport::reset_sleeping`]).
    fn stop_device(&self) -> bool {
        match self.transport.reset_sleeping() {
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
        self.state.store(state::STOPPED, Ordering::Release);
        self.transport.reset_nowait();
    }

    /// Frees the memory the device reads and writes: the request rings,
    /// the control and event queues (rings and event buffers) and the
    /// probe command (its header buffers).
    ///
    /// Per-packet buffers (each packet's `Cmd` headers, the target
    /// drivers' data) are not here: they belong to the framework's packet
    /// cache, which scsi_hba_detach(9F) destroys before this HBA's
    /// detach. None of them is known to the device then: detach proceeds
    /// only when [`VioScsi::detach_ready`] found every request ring with
    /// nothing outstanding (an abandoned command stays outstanding on its
    /// ring until the device returns it) and nothing parked, and once the
    /// framework's detach removed the iport no `tran_start` can add one.
    /// The driver's own probe is the one command outside the packet cache,
    /// so it is kept or freed with the rings.
    ///
    /// # Safety
    /// Call at most once, after [`VioScsi::teardown`] found the device
    /// stopped, with nothing else able to reach the HBA (`&mut self`); the
    /// fields are not used afterwards (only `Drop` calls this).
    unsafe fn free_device_memory(&mut self) {
        // SAFETY: once (caller), and nothing uses the fields afterwards;
        // the device finished a reset, so it no longer reads or writes
        // this memory, and no handler, task or tick can reach it.
        unsafe {
            ManuallyDrop::drop(&mut self.queues);
            ManuallyDrop::drop(&mut self.ctl);
            ManuallyDrop::drop(&mut self.evt);
            ManuallyDrop::drop(&mut self.probe);
        }
    }
}

impl Drop for VioScsi {
    /// Frees memory, nothing more: the stopping sequence
    /// ([`VioScsi::teardown`]) ran through `&self` before, and this
    /// `&mut self` exists only once nothing else can reach the HBA (see
    /// [`OwnedHba`]). A `VioScsi` dropped without a teardown keeps its
    /// device-visible memory (`device_stopped` is false).
    fn drop(&mut self) {
        // The task queue is empty and idle after the teardown's wait, and
        // closed: destroying it waits for nothing.
        drop(self.taskq.take());
        if self.device_stopped.load(Ordering::Acquire) {
            // SAFETY: once, here; the teardown found the device stopped;
            // `&mut self`: nobody else reaches the HBA.
            unsafe { self.free_device_memory() };
        }
        // Else the device may still write there: `queues`, `ctl`, `evt`
        // and `probe` stay in their ManuallyDrop, never freed.
    }
}

/// The one owner of an attached HBA: its address, which every pointer the
/// kernel is given (interrupt and IRM arguments, the task and watchdog
/// arguments, `tran_hba_private`) derives from.
///
/// The HBA is put on the heap and the `Box` turned into this pointer at
/// once, so that no `Box<VioScsi>` or `&mut VioScsi` exists while other
/// threads use the HBA: only shared references are made from it
/// ([`OwnedHba::get`]) until the drop, which runs
/// [`VioScsi::teardown`] through `&VioScsi` and then, with every other
/// user stopped, rebuilds the `Box` and frees it.
pub struct OwnedHba(NonNull<VioScsi>);

impl OwnedHba {
    fn new(hba: VioScsi) -> Self {
        // Box::leak: the `&mut` it returns becomes the pointer here and is
        // never used again.
        Self(NonNull::from(Box::leak(Box::new(hba))))
    }

    /// The HBA.
    pub fn get(&self) -> &VioScsi {
        // SAFETY: allocated in new() and freed only by this owner's drop;
        // only shared references are ever made from the pointer before it.
        unsafe { self.0.as_ref() }
    }

    /// The HBA's address (what the kernel is given).
    pub fn as_ptr(&self) -> *mut VioScsi {
        self.0.as_ptr()
    }

    /// Gives up ownership: the address, to be stored (the shim keeps it in
    /// `tran_hba_private`) and turned back with [`OwnedHba::from_raw`].
    pub fn into_raw(self) -> *mut VioScsi {
        ManuallyDrop::new(self).as_ptr()
    }

    /// Takes ownership back of what [`OwnedHba::into_raw`] gave up; None
    /// for null.
    ///
    /// # Safety
    /// `p` must be null or come from [`OwnedHba::into_raw`], and not have
    /// been taken back already (there is one owner).
    pub unsafe fn from_raw(p: *mut VioScsi) -> Option<Self> {
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

impl Drop for OwnedHba {
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

/// " (N MSI-X vectors)" in the attach line, nothing without MSI-X.
struct VectorCount(usize);

impl core::fmt::Display for VectorCount {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            0 => Ok(()),
            1 => f.write_str(" (1 vector)"),
            n => write!(f, " ({n} vectors)"),
        }
    }
}

/// Tells the device how much sense the response buffers hold (virtio 1.2
/// §5.6.4: sense_size is driver-writable; the device writes at most that
/// much and expects buffers that large), when the driver's choice differs
/// from what the device offered. A device reset restores its default, so
/// this follows every (re)negotiation.
fn tell_sense_size(t: &Transport, limits: &Limits) {
    if t.config32(crate::vioscsi::config::off::SENSE_SIZE) != limits.sense_size {
        t.set_config32(crate::vioscsi::config::off::SENSE_SIZE, limits.sense_size);
    }
}
