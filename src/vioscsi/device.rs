//! The virtio-scsi device: attach, (re)initialization, interrupts and
//! their routing (MSI-X, IRM), and the [`Family`] implementation that puts
//! it on the HBA core.

use super::cmd::{CmdLayout, VioCmd};
use super::config::{CONFIG_LEN, DeviceConfig, Limits};
use super::events::EventQueue;
use super::proto::{self, CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE};
use super::ring::ReqRing;
use super::tmf::ControlQueue;
use super::vectors::MsixLayout;
use crate::ddi::dev::StrProp;
use crate::ddi::dma::{DmaBuffer, DmaMode, FaultCheck};
use crate::ddi::intr::{Interrupts, IntrKind, IrmChange};
use crate::ddi::kstat::HbaStat;
use crate::ddi::pci::PciConfig;
use crate::ddi::sync::KMutex;
use crate::ddi::{DdiError, Dip, Sleep};
use crate::hba::cmd::{CmdFields, OwnedCmd};
use crate::hba::family::{
    AddError, Attached, Claim, CmdFacts, Family, FamilyId, IrmAnswer, Presence, Request, StopError,
    StopWait, TaskMgmt, TmAddress, TmAnswer,
};
use crate::hba::intr::Shown;
use crate::hba::{AttachError, Callbacks, Hba, HbaState, KstatFacts, Stats};
use crate::scsa::Outcome;
use crate::scsa::cap::HbaCaps;
use crate::virtio::pci::{NO_VECTOR, Transport, TransportChoice, TransportError};
use crate::virtio::ring::{Layout, SplitQueue};
use crate::virtio::{Features, Status, VIRTIO_PCI_VENDOR};
use crate::{dev_note, dev_warn, ffi};
use alloc::vec::Vec;
use core::ffi::c_void;
use core::mem::ManuallyDrop;
use core::sync::atomic::{AtomicU16, Ordering};

/// Largest ring the driver sets up (modern devices let the driver choose;
/// legacy ones impose theirs).
pub const MAX_RING: u16 = 1024;
/// Legacy rings are located by a 32-bit page number: below 2^44.
const LEGACY_RING_ADDR_HI: u64 = (1 << 44) - 1;

pub use crate::hba::intr::IntrMode;

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
        let intr = crate::hba::intr::interrupt_choice(dip);
        Tunables {
            transport,
            indirect: dip.prop_int(c"virtio-indirect", 1) != 0,
            event_idx: dip.prop_int(c"virtio-event-idx", 1) != 0,
            intr: intr.kinds,
            poll: intr.poll,
            request_queues: u32::try_from(dip.prop_int(c"request-queues", 0)).unwrap_or(0),
            notify_batching: dip.prop_int(c"virtio-notify-batching", 1) != 0,
        }
    }
}

impl From<TransportError> for AttachError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Ddi(e) => AttachError::Ddi(e),
            TransportError::Layout(what) => AttachError::Layout(what),
            TransportError::ResetTimeout => AttachError::ResetTimeout,
        }
    }
}

impl From<TransportError> for StopError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Ddi(e) => StopError::Ddi(e),
            TransportError::Layout(_) | TransportError::ResetTimeout => StopError::Timeout,
        }
    }
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
        FaultCheck::Taken,
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

/// One virtio-scsi controller: the device side of an [`Hba`].
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
    /// Request queues in use.
    nreq: u16,
    /// Their ring size.
    req_size: u16,
    intr: KMutex<Option<Interrupts>>,
    /// MSI-X vectors the routing uses now ([`MsixLayout`]); 0 without
    /// MSI-X. Written under `routing`, read by the handlers.
    msix_vectors: AtomicU16,
    /// Serializes programming the device's vector routing and queue
    /// registers (both go through `queue_select`): device (re)activation
    /// and the IRM callback's re-routing.
    routing: KMutex<()>,
    /// The control and event queues: device-visible memory, freed only by
    /// [`Family::free_device_memory`] once the device is known stopped.
    pub(crate) ctl: ManuallyDrop<KMutex<ControlQueue>>,
    pub(crate) evt: ManuallyDrop<KMutex<EventQueue>>,
}

impl VioScsi {
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

    /// The virtqueue number of request queue `n`.
    fn vq(n: usize) -> u16 {
        FIRST_REQUEST_QUEUE + n as u16
    }

    fn start_interrupts(hba: &Hba<VioScsi>) -> Result<(), AttachError> {
        let dev = &hba.dev;
        let mut g = dev.intr.lock();
        let Some(intr) = g.as_mut() else {
            return Ok(());
        };
        let me = hba.callback_arg();
        for index in 0..intr.count() {
            let role = match dev.mode {
                IntrMode::MsiX => VectorRole::MsiX(index as u16),
                _ => VectorRole::All,
            };
            // SAFETY: the HBA is on the heap (OwnedHba) and outlives the
            // handlers: the teardown removes them (ddi_intr_disable waits
            // for a running one) before the HBA is freed. The handlers
            // make only shared references from `me`.
            unsafe {
                intr.add_handler(index, hba.callbacks.intr, me, role.encode() as *mut c_void)?
            };
        }
        intr.enable()?;
        dev.transport
            .set_msix_enabled(intr.kind() == IntrKind::MsiX);
        Ok(())
    }

    /// The MSI-X routing in use now.
    fn msix_layout(&self) -> MsixLayout {
        MsixLayout::new(
            usize::from(self.msix_vectors.load(Ordering::Acquire)),
            self.nreq,
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
        for n in 0..self.nreq {
            ok &= t.set_queue_vector(Self::vq(usize::from(n)), layout.queue_vector(n));
        }
        ok
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
            let one = MsixLayout::new(1, self.nreq);
            self.msix_vectors.store(1, Ordering::Release);
            let _ = self.program_routing(&one);
        }
    }

    /// Brings the (reset, feature-negotiated) device up: vectors, queue
    /// addresses, event buffers, DRIVER_OK (virtio 1.2 §3.1.1 steps 7-8).
    pub(crate) fn activate(hba: &Hba<VioScsi>) -> Result<(), AttachError> {
        let dev = &hba.dev;
        let t = &dev.transport;
        // The IRM callback re-routes through the same registers.
        let _routing = dev.routing.lock();
        let msix = dev.mode == IntrMode::MsiX;
        let layout = dev.msix_layout();
        let (config_vec, event_vec) = (layout.config_vector(), layout.event_vector());
        if msix && !t.set_config_vector(config_vec) {
            return Err(AttachError::Device(
                "device refused the configuration MSI-X vector",
            ));
        }
        {
            let c = dev.ctl.lock();
            let (d, a, u) = c.ring.addresses();
            t.setup_queue(CONTROL_QUEUE, c.ring.size(), d, a, u)?;
            // Task management is polled: no interrupts for it.
            if msix && !t.set_queue_vector(CONTROL_QUEUE, NO_VECTOR) {
                return Err(AttachError::Device("control queue vector"));
            }
        }
        {
            let mut e = dev.evt.lock();
            let (d, a, u) = e.ring.addresses();
            t.setup_queue(EVENT_QUEUE, e.ring.size(), d, a, u)?;
            if msix && !t.set_queue_vector(EVENT_QUEUE, event_vec) {
                return Err(AttachError::Device(
                    "device refused the event queue MSI-X vector",
                ));
            }
            e.post_all();
            if dev.mode.interrupts() {
                e.ring.enable_interrupts();
            } else {
                e.ring.disable_interrupts();
            }
        }
        for (n, q) in hba.queues.iter().enumerate() {
            let mut g = q.ring.lock();
            let ring = &mut g.ring.ring;
            let (d, a, u) = ring.addresses();
            t.setup_queue(Self::vq(n), ring.size(), d, a, u)?;
            if msix && !t.set_queue_vector(Self::vq(n), layout.queue_vector(n as u16)) {
                return Err(AttachError::Device(
                    "device refused a request queue MSI-X vector",
                ));
            }
            if dev.mode.interrupts() {
                ring.enable_interrupts();
            } else {
                ring.disable_interrupts();
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

    fn config_changed(hba: &Hba<VioScsi>) {
        if hba
            .dev
            .transport
            .status()
            .contains(Status::DEVICE_NEEDS_RESET)
        {
            dev_warn!(hba.dip(), "device needs reset");
            hba.device_needs_reset();
            hba.schedule_reset();
        }
    }
}

impl Family for VioScsi {
    type CmdExt = VioCmd;
    type Ring = ReqRing;
    const ID: FamilyId = FamilyId::VirtioScsi;

    fn attach(dip: Dip, callbacks: &Callbacks) -> Result<Attached<Self>, AttachError> {
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
            let mode = IntrMode::of(i.kind());
            i.keep(want);
            (Some(i), mode)
        };
        let pri = interrupts.as_ref().map_or(0, |i| i.priority());
        if interrupts.is_some() {
            crate::hba::intr::refuse_high_level(dip, pri)?;
        }
        let msix_vectors = match (&interrupts, mode) {
            (Some(i), IntrMode::MsiX) => MsixLayout::new(i.count(), nreq).vectors() as u16,
            _ => 0,
        };

        let legacy = transport.is_legacy();
        transport.prepare_queues(FIRST_REQUEST_QUEUE + nreq);
        let mut rings = Vec::with_capacity(usize::from(nreq));
        for n in 0..nreq {
            let size = ring_size(&transport, FIRST_REQUEST_QUEUE + n)?;
            let ring = SplitQueue::new(ring_memory(dip, size, legacy)?, size, event_idx)
                .ok_or(AttachError::Device("request queue memory"))?;
            rings.push(ReqRing { ring });
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
        let probe = VioCmd::new(dip, &layout, Sleep::Yes)?;
        let scsa_limits = limits.scsa();
        Ok(Attached {
            dev: VioScsi {
                dip,
                _pci: pci,
                transport,
                features,
                limits,
                layout,
                indirect,
                notify_batching: tun.notify_batching,
                mode,
                nreq,
                req_size,
                intr: KMutex::new(interrupts, 0),
                msix_vectors: AtomicU16::new(msix_vectors),
                routing: KMutex::new((), pri),
                ctl: ManuallyDrop::new(KMutex::new(ctl, 0)),
                evt: ManuallyDrop::new(KMutex::new(evt, pri)),
            },
            rings,
            limits: scsa_limits,
            caps: HbaCaps {
                dma_max: scsa_limits.max_xfer,
                max_cdb_len: scsa_limits.cdb_size,
                interconnect: ffi::INTERCONNECT_PARALLEL,
            },
            pri,
            probe,
        })
    }

    fn start(hba: &Hba<Self>) -> Result<(), AttachError> {
        // The IRM callback may now reach the HBA (its address holds until
        // the teardown unregisters the callback, before it is freed).
        if let Some(i) = hba.dev.intr.lock().as_ref() {
            i.link_irm(hba.callback_arg());
        }
        Self::start_interrupts(hba)?;
        // On failure activate() may have handed the rings to the device
        // (and DRIVER_OK): the caller's teardown resets it before the
        // memory goes. (Every earlier failure frees memory the device was
        // never told about: it was reset at the start and learns ring
        // addresses only here.)
        Self::activate(hba)
    }

    fn announce(hba: &Hba<Self>) {
        let d = &hba.dev;
        dev_note!(
            d.dip,
            "virtio-scsi {} transport, {} interrupts{}, {} request queue(s) of {}, {} segments, max transfer {} KiB{}{}",
            if d.transport.is_legacy() {
                "legacy"
            } else {
                "modern"
            },
            d.mode.name(),
            VectorCount(d.msix_vectors()),
            d.nreq,
            d.req_size,
            d.limits.segments,
            d.limits.max_xfer / 1024,
            if d.indirect { ", indirect" } else { "" },
            if d.features.contains(Features::EVENT_IDX) {
                ", event-idx"
            } else {
                ""
            },
        );
    }

    fn take_access_fault(&self, fma: &crate::ddi::fm::Fma) -> crate::ddi::fm::HandleHealth {
        self.transport.take_access_fault(fma)
    }

    /// The event queue (its lock is held briefly, by `service_events`)
    /// and the control queue, unless a TMF holds its lock (across the
    /// poll for its answer, up to 5 s): not waited for, the next look
    /// takes it.
    fn take_private_dma_fault(&self, fma: &crate::ddi::fm::Fma) -> crate::ddi::fm::HandleHealth {
        let events = self.evt.lock().take_dma_fault(fma);
        let control = self
            .ctl
            .try_lock()
            .map_or(crate::ddi::fm::HandleHealth::Ok, |c| c.take_dma_fault(fma));
        events.first_of(control)
    }

    fn kstat_facts(&self) -> KstatFacts {
        KstatFacts {
            features: self.features.bits(),
            intr_type: self.mode.ddi_type(),
            vectors: match self.mode {
                IntrMode::MsiX => self.msix_vectors() as u64,
                IntrMode::Msi | IntrMode::Fixed => 1,
                IntrMode::Poll => 0,
            },
        }
    }

    fn interrupts(&self) -> bool {
        self.mode.interrupts()
    }

    fn notify_batching(&self) -> bool {
        self.notify_batching
    }

    /// Any 64-bit address, segments of up to 4 GiB (a descriptor's 32-bit
    /// length), `seg_max` segments, transfers of `max_sectors`.
    fn data_dma_attr(&self) -> ffi::ddi_dma_attr_t {
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

    fn new_cmd_ext(&self, dip: Dip, sleep: Sleep) -> Result<VioCmd, DdiError> {
        VioCmd::new(dip, &self.layout, sleep)
    }

    fn prepare(&self, f: &mut CmdFields<VioCmd>, req: &Request<'_>) {
        super::cmd::prepare(&self.layout, self.indirect, f, req);
    }

    fn add(
        &self,
        ring: &mut ReqRing,
        c: OwnedCmd<VioCmd>,
    ) -> Result<u16, (OwnedCmd<VioCmd>, AddError)> {
        ring.add(c, &self.layout, self.indirect)
    }

    fn notify(&self, qi: usize) {
        self.transport.notify(Self::vq(qi));
    }

    fn decode(&self, f: &mut CmdFields<VioCmd>, facts: &CmdFacts) -> Outcome {
        super::cmd::decode(&self.layout, f, facts)
    }

    fn copy_sense(&self, f: &CmdFields<VioCmd>, out: &mut [u8]) -> usize {
        super::cmd::copy_sense(&self.layout, self.limits.sense_size, f, out)
    }

    fn presence(&self, f: &CmdFields<VioCmd>) -> Presence {
        match f.dev.response.response {
            proto::response::OK => Presence::Present,
            proto::response::BAD_TARGET | proto::response::INCORRECT_LUN => Presence::Absent,
            _ => Presence::Unknown,
        }
    }

    fn task_mgmt_name(&self, tm: TaskMgmt) -> &'static str {
        tmf_of(tm).name()
    }

    fn task_mgmt(hba: &Hba<Self>, tm: TaskMgmt, at: &TmAddress, can_sleep: bool) -> TmAnswer {
        super::tmf::send(&hba.dev, tmf_of(tm), at.target, at.lun, at.tag, can_sleep)
    }

    fn stop(&self, wait: StopWait) -> Result<(), StopError> {
        match wait {
            StopWait::Sleeping => Ok(self.transport.reset_sleeping()?),
            StopWait::Spinning => Ok(self.transport.reset()?),
            StopWait::Briefly if self.transport.reset_confirmed_briefly() => Ok(()),
            StopWait::Briefly => Err(StopError::Timeout),
        }
    }

    fn restart(hba: &Hba<Self>) -> Result<(), AttachError> {
        let d = &hba.dev;
        {
            let mut c = d.ctl.lock();
            c.ring.reclaim_all(|()| {});
            c.usable = true;
        }
        d.evt.lock().ring.reclaim_all(|_| {});
        d.renegotiate()?;
        Self::activate(hba)
    }

    fn fail(&self) {
        self.transport.fail();
    }

    fn quiesce(&self) {
        self.transport.reset_nowait();
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

    fn interrupt(hba: &Hba<Self>, arg: usize) -> Claim {
        hba.count(HbaStat::Interrupts);
        let dev = &hba.dev;
        match dev.mode {
            IntrMode::Fixed | IntrMode::Msi => {
                // Reading the ISR deasserts the line and tells whether the
                // (possibly shared) interrupt was ours (§4.1.4.5).
                let isr = dev.transport.read_isr();
                if isr == 0 {
                    return if dev.mode == IntrMode::Fixed {
                        Claim::Unclaimed
                    } else {
                        Claim::Claimed
                    };
                }
                if isr & 1 != 0 {
                    hba.service_all_interrupted();
                }
                if isr & 2 != 0 {
                    Self::config_changed(hba);
                }
            }
            IntrMode::MsiX => {
                let v = match VectorRole::decode(arg) {
                    VectorRole::MsiX(v) => v,
                    VectorRole::All => 0,
                };
                let layout = dev.msix_layout();
                if layout.serves_config_and_events(v) {
                    Self::config_changed(hba);
                    Self::service_events(hba);
                }
                for q in layout.queues_of(v) {
                    hba.reap_interrupted(usize::from(q));
                }
            }
            IntrMode::Poll => return Claim::Unclaimed,
        }
        Claim::Claimed
    }

    /// The IRM callback (`DDI_CB_INTR_ADD` / `DDI_CB_INTR_REMOVE`), on the
    /// IRM balance thread. The driver follows the grant
    /// (`ddi_intr_get_navail(9F)` says what it now is) up to a vector per
    /// request queue, without ever disabling vector 0 or all vectors at
    /// once, so interrupts keep flowing:
    /// - fewer: the routing moves every source onto the vectors that stay
    ///   (the handlers read the new layout), then the others are disabled
    ///   (waiting for running handlers) and freed;
    /// - more: the new vectors are allocated, get their handlers and are
    ///   enabled, then the routing moves queues onto them.
    ///
    /// Either way every queue is then reaped once, for completions whose
    /// interrupt was raised on a vector while it changed hands.
    fn irm_changed(hba: &Hba<Self>, change: IrmChange) -> IrmAnswer {
        let dev = &hba.dev;
        let mut g = dev.intr.lock();
        // Detach took the interrupts (and frees them) or they are not MSI-X.
        let Some(intr) = g.as_mut() else {
            return IrmAnswer::Failed;
        };
        if dev.mode != IntrMode::MsiX {
            return IrmAnswer::NotSupported;
        }
        let nq = dev.nreq;
        let wanted = MsixLayout::wanted(nq);
        let held = intr.count();
        let available = intr.available();
        if available == 0 {
            // The kernel would not say what the grant is: change nothing.
            return IrmAnswer::Failed;
        }
        let target = available.min(wanted);
        let me = hba.callback_arg();
        let mut result = IrmAnswer::Followed;
        if target < held {
            dev.reroute(MsixLayout::new(target, nq));
            intr.shrink(target);
        } else if target > held {
            let handler = hba.callbacks.intr;
            // SAFETY: as in start_interrupts: the HBA outlives its
            // handlers (the teardown removes them before freeing it).
            let grown = unsafe {
                intr.grow(target, handler, me, |i| {
                    VectorRole::MsiX(i as u16).encode() as *mut c_void
                })
            };
            match grown {
                Ok(n) => dev.reroute(MsixLayout::new(n, nq)),
                Err(e) => {
                    dev_warn!(dev.dip, "IRM: more vectors were offered but not taken: {e}");
                    result = IrmAnswer::Failed;
                }
            }
        }
        let now = intr.count();
        drop(g);
        Stats::bump(&hba.stats.irm_changes);
        hba.update_facts();
        dev_note!(
            dev.dip,
            "IRM {}: {held} -> {now} MSI-X vector(s) for {nq} request queue(s)",
            match change {
                IrmChange::Add(n) => alloc::format!("added {n}"),
                IrmChange::Remove(n) => alloc::format!("removed {n}"),
            }
        );
        if hba.state() != HbaState::Stopped {
            hba.service_all();
        }
        result
    }

    fn service_events(hba: &Hba<Self>) {
        super::events::service_events(hba);
    }

    unsafe fn free_device_memory(&mut self) {
        // SAFETY: once (caller), after the device stopped for good, with
        // nothing else able to reach the HBA: the device no longer reads or
        // writes the control and event queues, and no handler, task or tick
        // can reach them.
        unsafe {
            ManuallyDrop::drop(&mut self.ctl);
            ManuallyDrop::drop(&mut self.evt);
        }
    }
}

/// The virtio-scsi TMF for a task-management request (§5.6.6.2; a target
/// reset is I_T NEXUS RESET).
fn tmf_of(tm: TaskMgmt) -> proto::Tmf {
    match tm {
        TaskMgmt::AbortTask => proto::Tmf::AbortTask,
        TaskMgmt::AbortTaskSet => proto::Tmf::AbortTaskSet,
        TaskMgmt::LunReset => proto::Tmf::LogicalUnitReset,
        TaskMgmt::TargetReset => proto::Tmf::ItNexusReset,
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
    if t.config32(super::config::off::SENSE_SIZE) != limits.sense_size {
        t.set_config32(super::config::off::SENSE_SIZE, limits.sense_size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_role_survives_the_handler_argument() {
        for r in [VectorRole::All, VectorRole::MsiX(0), VectorRole::MsiX(12)] {
            assert_eq!(VectorRole::decode(r.encode()), r);
        }
        assert_eq!(VectorRole::MsiX(3).encode(), 4);
        assert_eq!(
            VectorRole::decode(usize::MAX),
            VectorRole::MsiX(u16::MAX),
            "clamped, never wrapped"
        );
    }

    #[test]
    fn the_attach_line_counts_vectors() {
        assert_eq!(VectorCount(0).to_string_for_test(), "");
        assert_eq!(VectorCount(1).to_string_for_test(), " (1 vector)");
        assert_eq!(VectorCount(5).to_string_for_test(), " (5 vectors)");
    }

    impl VectorCount {
        fn to_string_for_test(&self) -> alloc::string::String {
            alloc::format!("{self}")
        }
    }

    #[test]
    fn transport_errors_keep_their_meaning_in_the_core() {
        assert_eq!(
            AttachError::from(TransportError::Layout("x")),
            AttachError::Layout("x")
        );
        assert_eq!(
            AttachError::from(TransportError::ResetTimeout),
            AttachError::ResetTimeout
        );
        assert_eq!(
            StopError::from(TransportError::ResetTimeout),
            StopError::Timeout
        );
    }
}
