//! The virtio-scsi HBA instance: attach, (re)initialization of the device,
//! interrupts, detach, quiesce.

use super::cmd::{Cmd, CmdLayout, OwnedCmd};
use super::config::{CONFIG_LEN, DeviceConfig, Limits};
use super::events::{EventQueue, Work};
use super::proto::{self, CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE};
use super::recovery::ControlQueue;
use crate::ddi::dev::StrProp;
use crate::ddi::dma::{DmaBuffer, DmaMode};
use crate::ddi::intr::{Interrupts, IntrKind};
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
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

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
    /// MSI-X; `dedicated`: a vector for configuration changes, one for
    /// events and one per request queue, else everything on vector 0.
    MsiX {
        /// One vector per source.
        dedicated: bool,
    },
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
            IntrMode::MsiX { .. } => "MSI-X",
            IntrMode::Msi => "MSI",
            IntrMode::Fixed => "fixed",
            IntrMode::Poll => "polled",
        }
    }
}

/// What an interrupt vector serves (the handler's second argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorRole {
    /// Every source (shared MSI-X vector, MSI, fixed).
    All,
    /// Configuration changes.
    Config,
    /// The event queue.
    Events,
    /// Request queue `n`.
    Request(u16),
}

impl VectorRole {
    /// Encodes the role as the handler's pointer-sized argument.
    pub fn encode(self) -> usize {
        match self {
            VectorRole::All => 0,
            VectorRole::Config => 1,
            VectorRole::Events => 2,
            VectorRole::Request(n) => 3 + usize::from(n),
        }
    }

    /// Decodes [`VectorRole::encode`].
    pub fn decode(v: usize) -> VectorRole {
        match v {
            0 => VectorRole::All,
            1 => VectorRole::Config,
            2 => VectorRole::Events,
            n => VectorRole::Request((n - 3).min(usize::from(u16::MAX)) as u16),
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
    /// Request queues the watchdog found with completions that had waited
    /// a whole tick unconsumed, and reaped (an interrupt that never came).
    pub watchdog_reaps: AtomicU64,
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
    pub lun: u16,
}

/// CPUs with a completion-queue hint of their own (see
/// [`VioScsi::reaping`]); more share slots.
pub const REAP_HINTS: usize = 64;

/// Callbacks the driver hands the kernel (defined in the entry layer,
/// which owns every `extern "C"` function).
pub struct Callbacks {
    /// Interrupt handler: arg1 the HBA, arg2 the [`VectorRole`].
    pub intr: ffi::ddi_intr_handler_t,
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
    pub(crate) queues: Vec<RequestQueue>,
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
    pub(crate) ctl: KMutex<ControlQueue>,
    pub(crate) evt: KMutex<EventQueue>,
    pub(crate) next_tag: AtomicU64,
    pub(crate) state: AtomicU8,
    pub(crate) work: KMutex<Work>,
    pub(crate) taskq: Option<TaskQueue>,
    watchdog: KMutex<Option<Periodic>>,
    pub(crate) tgtmap: KMutex<Option<TargetMap>>,
    /// The command used for the driver's own probes (TEST UNIT READY).
    pub(crate) probe: KMutex<Box<Cmd>>,
    pub(crate) callbacks: Callbacks,
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
    /// (interrupt handlers hold its address): it is boxed.
    pub fn attach(dip: Dip, callbacks: Callbacks) -> Result<Box<VioScsi>, AttachError> {
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
        transport.reset()?;
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
        let (interrupts, mode) = if tun.poll {
            (None, IntrMode::Poll)
        } else {
            let want = usize::from(FIRST_REQUEST_QUEUE) + usize::from(nreq);
            let mut i = Interrupts::alloc(dip, tun.intr, want)?;
            let mode = match i.kind() {
                IntrKind::MsiX => IntrMode::MsiX {
                    dedicated: i.count() >= want,
                },
                IntrKind::Msi => IntrMode::Msi,
                IntrKind::Fixed => IntrMode::Fixed,
            };
            // Fewer vectors than sources: everything shares the first one;
            // the others are given back rather than left without handlers.
            let dedicated = mode == IntrMode::MsiX { dedicated: true };
            i.keep(if dedicated { want } else { 1 });
            (Some(i), mode)
        };
        let pri = interrupts.as_ref().map_or(0, |i| i.priority());

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

        let hba = Box::new(VioScsi {
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
            queues,
            ctl: KMutex::new(ctl, 0),
            evt: KMutex::new(evt, pri),
            next_tag: AtomicU64::new(1),
            reaping: [const { core::sync::atomic::AtomicU16::new(0) }; REAP_HINTS],
            pass_kicks: super::io::PassKicks::new(),
            state: AtomicU8::new(state::ATTACHING),
            work: KMutex::new(Work::default(), pri),
            taskq: Some(taskq),
            watchdog: KMutex::new(None, 0),
            tgtmap: KMutex::new(None, 0),
            probe: KMutex::new(probe, 0),
            callbacks,
            stats: Stats::default(),
        });
        if let Err(e) = hba.start_interrupts().and_then(|()| hba.activate()) {
            hba.transport.fail();
            hba.stop_interrupts();
            return Err(e);
        }
        hba.state.store(state::RUNNING, Ordering::Release);
        hba.start_watchdog();
        dev_note!(
            dip,
            "virtio-scsi {} transport, {} interrupts, {} request queue(s) of {}, {} segments, max transfer {} KiB{}{}",
            if legacy { "legacy" } else { "modern" },
            mode.name(),
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
        let roles: &[VectorRole] = match self.mode {
            IntrMode::MsiX { dedicated: true } => &[VectorRole::Config, VectorRole::Events],
            _ => &[VectorRole::All],
        };
        let mut index = 0;
        for &role in roles {
            // SAFETY: `self` is boxed and outlives the handlers: detach
            // drops the interrupts (removing the handlers) before the box.
            unsafe {
                intr.add_handler(index, self.callbacks.intr, me, role.encode() as *mut c_void)?
            };
            index += 1;
        }
        if let IntrMode::MsiX { dedicated: true } = self.mode {
            for n in 0..self.queues.len() as u16 {
                let role = VectorRole::Request(n);
                // SAFETY: as above.
                unsafe {
                    intr.add_handler(index, self.callbacks.intr, me, role.encode() as *mut c_void)?
                };
                index += 1;
            }
        }
        intr.enable()?;
        self.transport
            .set_msix_enabled(intr.kind() == IntrKind::MsiX);
        Ok(())
    }

    fn stop_interrupts(&self) {
        if let Some(mut i) = self.intr.lock().take() {
            i.disable();
        }
        self.transport.set_msix_enabled(false);
    }

    /// The MSI-X vector of each source, `NO_VECTOR` when not routed.
    fn vectors(&self) -> (u16, u16, impl Fn(u16) -> u16) {
        let dedicated = matches!(self.mode, IntrMode::MsiX { dedicated: true });
        let shared = matches!(self.mode, IntrMode::MsiX { dedicated: false });
        let (config, events) = if dedicated {
            (0, 1)
        } else if shared {
            (0, 0)
        } else {
            (NO_VECTOR, NO_VECTOR)
        };
        let req = move |n: u16| {
            if dedicated {
                2 + n
            } else if shared {
                0
            } else {
                NO_VECTOR
            }
        };
        (config, events, req)
    }

    /// Brings the (reset, feature-negotiated) device up: vectors, queue
    /// addresses, event buffers, DRIVER_OK (virtio 1.2 §3.1.1 steps 7-8).
    pub(crate) fn activate(&self) -> Result<(), AttachError> {
        let t = &self.transport;
        let msix = matches!(self.mode, IntrMode::MsiX { .. });
        let (config_vec, event_vec, req_vec) = self.vectors();
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
            IntrMode::MsiX { .. } => match role {
                VectorRole::All => self.service_all(),
                VectorRole::Config => self.config_changed(),
                VectorRole::Events => self.service_events(),
                VectorRole::Request(n) => self.reap(usize::from(n)),
            },
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

    /// Stops everything and releases the device: detach(9E) of the HBA
    /// node. Refuses (returns false, changing nothing) while commands are
    /// in flight.
    pub fn detach(self: Box<Self>) -> Result<(), Box<Self>> {
        if !self.detach_ready() {
            return Err(self);
        }
        self.state.store(state::STOPPED, Ordering::Release);
        // Order matters: nothing may call back into `self` once freed.
        drop(self.watchdog.lock().take());
        if let Some(tq) = &self.taskq {
            tq.wait();
        }
        self.stop_interrupts();
        self.transport.reset_nowait();
        let _ = self.transport.reset();
        drop(self);
        Ok(())
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
