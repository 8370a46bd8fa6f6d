//! The pvscsi controller: attach (BAR, adapter reset, feature probing,
//! ring geometry, interrupts), (re)activation of the rings, the interrupt
//! handler, the message ring, and the [`Family`] implementation that puts
//! it on the HBA core.
//!
//! Adapter commands (COMMAND, then COMMAND_DATA dwords, then
//! COMMAND_STATUS) are one conversation with the device: `cmds`
//! serializes them. Lock order: a request queue's lock, then `cmds`.

use super::cmd::{self, PvCmd};
use super::msg::{self, Action, Message};
use super::probe::{self, MaxTargets, TargetSource, ThresholdMode};
use super::queue::PvRing;
use super::regs::{
    BAR_SIZE, Command, CommandError, CommandNumber, CommandStatus, Doorbell, INTR_CMPL_MASK,
    INTR_MSG_MASK, Regs,
};
use super::ring::{Geometry, RingSetupError, Rings};
use super::status::MAX_SENSE_OFFER;
use super::wire::{CONFIG_PAGE_CONTROLLER_SIZE, MAX_SG_ENTRIES, PAGE_SIZE};
use super::{PCI_DEVICE_PVSCSI, PCI_VENDOR_VMWARE};
use crate::ddi::dma::{DmaBuffer, DmaMode, FaultCheck};
use crate::ddi::intr::{Interrupts, IrmChange};
use crate::ddi::kstat::HbaStat;
use crate::ddi::pci::PciConfig;
use crate::ddi::regs::{self, RegMap};
use crate::ddi::sync::KMutex;
use crate::ddi::{DdiError, Dip, Sleep};
use crate::hba::cmd::{CmdFields, OwnedCmd};
use crate::hba::family::{
    AddError, Attached, Claim, CmdFacts, Family, FamilyId, IrmAnswer, Presence, Request, StopError,
    StopWait, TaskMgmt, TmAddress, TmAnswer,
};
use crate::hba::intr::{IntrMode, interrupt_choice, refuse_high_level};
use crate::hba::{AttachError, Callbacks, Hba, KstatFacts, Limits};
use crate::scsa::Outcome;
use crate::scsa::addr::LunNumber;
use crate::scsa::cap::HbaCaps;
use crate::shmem::SharedMem;
use crate::{dev_note, dev_warn, ffi};
use core::sync::atomic::{AtomicBool, Ordering};

/// The largest transfer: any buffer of this size spans at most
/// [`MAX_SG_ENTRIES`] pages, whatever its alignment, so a binding never
/// needs more SG elements than the one-page list holds (`pvscsi.h`: 128
/// elements per segment; Linux `sg_tablesize`).
pub const MAX_XFER: u32 = (MAX_SG_ENTRIES as u32 - 1) * PAGE_SIZE as u32;

/// One VMware PVSCSI controller: the device side of an [`Hba`].
pub struct Pvscsi {
    dip: Dip,
    _pci: PciConfig,
    regs: Regs<RegMap>,
    /// Serializes adapter commands (see the module docs).
    cmds: KMutex<()>,
    mode: IntrMode,
    intr: KMutex<Option<Interrupts>>,
    targets: MaxTargets,
    geometry: Geometry,
    threshold: ThresholdMode,
    /// SETUP_MSG_RING took effect at the last activation.
    msg_ring: AtomicBool,
    /// See [`Family::notify_batching`]: the `pvscsi-notify-batching`
    /// tunable (1, the default; 0 rings for every command, as the in-tree
    /// driver does, for comparison and debugging).
    notify_batching: bool,
    /// A non-READ/WRITE command was published since the last doorbell:
    /// ring KICK_NON_RW_IO (which makes the device process the whole ring).
    nonrw_pending: AtomicBool,
}

impl From<CommandError> for AttachError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::BadPageCount { .. } => AttachError::Layout("ring page count"),
            CommandError::LunOutOfRange => AttachError::Layout("LUN out of range"),
        }
    }
}

impl From<RingSetupError> for AttachError {
    fn from(_: RingSetupError) -> Self {
        AttachError::Layout("ring memory is not page-aligned or too small")
    }
}

/// Maps the register BAR: the first memory BAR of at least 32 KiB (Linux
/// `pvscsi_probe`; VMware offers the registers in I/O space too, QEMU only
/// as BAR 0 in memory space, shared/notes/pvscsi.md §1).
fn map_registers(dip: Dip) -> Result<RegMap, AttachError> {
    for bar in 0..6u8 {
        let Some(rn) = regs::bar_register_number(dip, bar) else {
            continue;
        };
        if regs::register_is_io(dip, rn) {
            continue;
        }
        if regs::register_size(dip, rn).is_ok_and(|len| len >= BAR_SIZE) {
            return Ok(RegMap::map(dip, rn, 0, BAR_SIZE as usize)?);
        }
    }
    Err(AttachError::Layout("no memory BAR of 32 KiB"))
}

/// numPhys of the CONFIG controller page, if the device fills it in
/// (QEMU: CONFIG fails and leaves the page alone; the page is pre-marked
/// so that an untouched page is never believed, Linux
/// `pvscsi_get_max_targets`).
fn config_page_targets(dip: Dip, regs: &Regs<RegMap>) -> Result<Option<u32>, AttachError> {
    let page = DmaBuffer::alloc(
        dip,
        PAGE_SIZE,
        PAGE_SIZE as u64,
        u64::MAX,
        DmaMode::Consistent,
        // One command's answer, freed at once.
        FaultCheck::NexusPolicy,
        Sleep::Yes,
    )?;
    let mut bytes = [0u8; CONFIG_PAGE_CONTROLLER_SIZE];
    probe::premark_config_page(&mut bytes);
    page.write_bytes(0, &bytes);
    page.sync_for_device(0, CONFIG_PAGE_CONTROLLER_SIZE);
    let status = regs.issue(&Command::Config {
        cmp_addr: page.device_addr(),
        page_addr: super::regs::CONFIG_CONTROLLER_ADDRESS,
        page_num: super::regs::CONFIG_PAGE_CONTROLLER,
    })?;
    // CONFIG is answered before COMMAND_STATUS reads back: the page is
    // final now and can be freed.
    page.sync_for_cpu(0, CONFIG_PAGE_CONTROLLER_SIZE);
    page.read_bytes(0, &mut bytes);
    Ok(probe::from_config_page(status, &bytes))
}

fn ring_memory(dip: Dip, pages: u32) -> Result<DmaBuffer, AttachError> {
    Ok(DmaBuffer::alloc(
        dip,
        pages as usize * PAGE_SIZE,
        PAGE_SIZE as u64,
        u64::MAX,
        DmaMode::Consistent,
        FaultCheck::Taken,
        Sleep::Yes,
    )?)
}

impl Pvscsi {
    /// Tells the device where the rings are (SETUP_RINGS, checked; then
    /// SETUP_MSG_RING, which QEMU ignores before SETUP_RINGS) and unmasks
    /// its interrupts: at attach and after every adapter reset. The
    /// driver's ring indices are zero (new rings, or `reclaim_all`).
    fn activate(hba: &Hba<Pvscsi>) -> Result<(), AttachError> {
        let d = &hba.dev;
        let q = hba
            .queues
            .first()
            .ok_or(AttachError::Layout("no request queue"))?;
        let g = q.ring.lock();
        let rings = &g.ring.rings;
        let (rs_ppn, req, cmp) = rings.setup_rings_ppns();
        let _c = d.cmds.lock();
        if d.regs.issue(&Rings::<DmaBuffer, ()>::setup_rings_command(
            rs_ppn, &req, &cmp,
        ))? == CommandStatus::Failed
        {
            return Err(AttachError::Device("the device refused SETUP_RINGS"));
        }
        let msg = match rings.setup_msg_ring_ppns() {
            Some(ppns) => probe::msg_ring_set_up(d.regs.issue(&Command::SetupMsgRing {
                ppns: ppns.as_slice(),
            })?),
            None => false,
        };
        if let Err(m) = rings.check_device_geometry_of(msg) {
            dev_warn!(
                d.dip,
                "{:?} ring: the device set up 2^{} entries, the driver 2^{}",
                m.ring,
                m.device,
                m.expected
            );
            return Err(AttachError::Device(
                "the device misread SETUP_RINGS (ring sizes)",
            ));
        }
        d.msg_ring.store(msg, Ordering::Release);
        d.nonrw_pending.store(false, Ordering::Relaxed);
        if d.mode.interrupts() {
            let msg_bits = if msg { INTR_MSG_MASK } else { 0 };
            d.regs.set_intr_mask(INTR_CMPL_MASK | msg_bits);
        }
        Ok(())
    }

    fn start_interrupts(hba: &Hba<Pvscsi>) -> Result<(), AttachError> {
        let mut g = hba.dev.intr.lock();
        let Some(intr) = g.as_mut() else {
            return Ok(());
        };
        // SAFETY: the HBA is on the heap (OwnedHba) and outlives the
        // handler: the teardown removes it (ddi_intr_disable waits for a
        // running one) before the HBA is freed; the handler makes only
        // shared references from the argument. One vector: no second
        // argument.
        unsafe {
            intr.add_handler(
                0,
                hba.callbacks.intr,
                hba.callback_arg(),
                core::ptr::null_mut(),
            )?
        };
        intr.enable()?;
        Ok(())
    }

    /// Consumes every message the device posted (bounded by the ring's
    /// size) and hands the target-map work to the task queue; a full or
    /// overrun ring means messages were lost: rediscover everything.
    fn service_messages(hba: &Hba<Pvscsi>) {
        if !hba.dev.msg_ring.load(Ordering::Acquire) {
            return;
        }
        let Some(q) = hba.queues.first() else {
            return;
        };
        let mut actions = [Action::Ignore; super::ring::MSG_PER_PAGE as usize];
        let mut n = 0;
        let mut rescan_all = false;
        {
            let mut g = q.ring.lock();
            let rings = &mut g.ring.rings;
            let Some(window) = rings.msg_window() else {
                return;
            };
            rescan_all |= msg::rescan_needed(window);
            if let super::ring::MsgWindow::Overflow { .. } = window {
                rings.skip_messages();
            } else {
                let limit = rings.geometry().msg_entries();
                for _ in 0..limit {
                    let Some(raw) = rings.next_message() else {
                        break;
                    };
                    let m = Message::decode(&raw);
                    if let Some(a) = actions.get_mut(n) {
                        *a = msg::action(m);
                        n += 1;
                    } else {
                        rescan_all = true;
                    }
                }
            }
        }
        let dip = hba.dip();
        for a in &actions[..n] {
            hba.count(HbaStat::Events);
            match *a {
                Action::AddTarget(t) | Action::RemoveTarget(t) => {
                    let what = if matches!(a, Action::AddTarget(_)) {
                        "appeared"
                    } else {
                        "removed"
                    };
                    dev_note!(dip, "target {t} {what}");
                    // A full-set discovery adds and drops targets.
                    hba.schedule(|w| w.discover = true);
                }
                Action::RescanLuns(t) => hba.schedule(|w| w.rescan_target(t)),
                Action::RescanAll => rescan_all = true,
                Action::Ignore => dev_note!(dip, "ignoring a message of a kind not known"),
            }
        }
        if rescan_all {
            dev_warn!(dip, "device messages were lost: rediscovering every target");
            hba.schedule(|w| {
                w.discover = true;
                w.scan = [u64::MAX; 4];
            });
        }
    }

    /// Runs an adapter command; its status, `Failed` if it cannot be
    /// encoded.
    fn command(&self, c: &Command<'_>) -> CommandStatus {
        let _c = self.cmds.lock();
        self.regs.issue(c).unwrap_or(CommandStatus::Failed)
    }

    /// The interrupt mode in use.
    pub fn intr_mode(&self) -> IntrMode {
        self.mode
    }

    /// The target ids scanned and where their count came from.
    pub fn max_targets(&self) -> MaxTargets {
        self.targets
    }

    /// The ring sizes.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Whether the message ring is in use.
    pub fn has_msg_ring(&self) -> bool {
        self.msg_ring.load(Ordering::Acquire)
    }
}

/// What a task-management command's status means.
fn tm_answer(s: CommandStatus) -> TmAnswer {
    match s {
        CommandStatus::Done(_) => TmAnswer::Done,
        CommandStatus::Failed => TmAnswer::Refused(u32::MAX),
        CommandStatus::AwaitingData => TmAnswer::NoAnswer,
    }
}

impl Family for Pvscsi {
    type CmdExt = PvCmd;
    type Ring = PvRing;
    const ID: FamilyId = FamilyId::Pvscsi;

    fn attach(dip: Dip, _callbacks: &Callbacks) -> Result<Attached<Self>, AttachError> {
        let choice = interrupt_choice(dip);
        let pci = PciConfig::open(dip)?;
        if pci.ids() != (PCI_VENDOR_VMWARE, PCI_DEVICE_PVSCSI) {
            return Err(AttachError::Device("not a VMware PVSCSI device"));
        }
        let regs = Regs::new(map_registers(dip)?);
        // Stop whatever a previous owner (firmware, a previous attach)
        // left running; QEMU keeps INTR_MASK across the reset (notes §2
        // item 3): mask explicitly.
        regs.issue(&Command::AdapterReset)?;
        regs.set_intr_mask(0);

        // Probing (notes §5.2): max targets, message ring, threshold.
        let from_command = probe::from_get_max_targets(regs.issue(&Command::GetMaxTargets)?);
        let from_page = match from_command {
            Some(_) => None,
            None => config_page_targets(dip, &regs)?,
        };
        let targets = probe::max_targets(from_command, from_page);
        let msg_supported = probe::msg_ring_supported(regs.probe(CommandNumber::SetupMsgRing));
        // (The next COMMAND write abandons the probe's pending payload.)
        let after_command = regs.probe(CommandNumber::SetupReqCallThreshold);
        let after_enable = match after_command {
            CommandStatus::Failed => None,
            _ => Some(regs.send_payload(&Command::SetupReqCallThreshold { enable: true })?),
        };
        let threshold = probe::threshold_mode(after_command, after_enable);

        let (interrupts, mode) = if choice.poll {
            (None, IntrMode::Poll)
        } else {
            // One vector: every driver uses one (the header's vector 0 is
            // "completion"), and QEMU offers MSI with one vector.
            let mut i = Interrupts::alloc(dip, choice.kinds, 1, None)?;
            i.keep(1);
            let mode = IntrMode::of(i.kind());
            (Some(i), mode)
        };
        let pri = interrupts.as_ref().map_or(0, |i| i.priority());
        if interrupts.is_some() {
            refuse_high_level(dip, pri)?;
        }

        let geometry = Geometry::choose(targets.count, 0, msg_supported);
        let msg_mem = match geometry.msg_pages {
            Some(p) => Some(ring_memory(dip, p.get())?),
            None => None,
        };
        let rings = Rings::new(
            geometry,
            ring_memory(dip, 1)?,
            ring_memory(dip, geometry.req_pages.get())?,
            ring_memory(dip, geometry.cmp_pages.get())?,
            msg_mem,
        )?;
        let probe_cmd = PvCmd::new(dip, Sleep::Yes)?;
        let max_target = u8::try_from(targets.count.saturating_sub(1)).unwrap_or(u8::MAX);
        let limits = Limits {
            segments: MAX_SG_ENTRIES as u32,
            max_xfer: MAX_XFER,
            cdb_size: 16,
            sense_size: MAX_SENSE_OFFER,
            max_target,
            // lun[1] carries 0..=255 (wire::lun_field).
            max_lun: 255,
        };
        let ring_list = alloc::vec![PvRing::new(rings, threshold.coalescing())];
        Ok(Attached {
            dev: Pvscsi {
                dip,
                _pci: pci,
                regs,
                cmds: KMutex::new((), pri),
                mode,
                intr: KMutex::new(interrupts, 0),
                targets,
                geometry,
                threshold,
                msg_ring: AtomicBool::new(false),
                notify_batching: dip.prop_int(c"pvscsi-notify-batching", 1) != 0,
                nonrw_pending: AtomicBool::new(false),
            },
            rings: ring_list,
            limits,
            caps: HbaCaps {
                dma_max: MAX_XFER,
                max_cdb_len: 16,
                interconnect: ffi::INTERCONNECT_PARALLEL,
            },
            pri,
            probe: probe_cmd,
        })
    }

    fn start(hba: &Hba<Self>) -> Result<(), AttachError> {
        Self::start_interrupts(hba)?;
        // On failure the rings may be the device's: the caller's teardown
        // resets it (stop) before the memory goes.
        Self::activate(hba)
    }

    /// BAR 0, the one register mapping.
    fn take_access_fault(&self, fma: &crate::ddi::fm::Fma) -> crate::ddi::fm::HandleHealth {
        fma.take_regs_fault(self.regs.map())
    }

    /// PVSCSI negotiates no feature bits; `features` shows what the
    /// driver found the device to take: bit 0 the message ring
    /// (SETUP_MSG_RING), bit 1 the request-call threshold.
    fn kstat_facts(&self) -> KstatFacts {
        KstatFacts {
            features: u64::from(self.has_msg_ring()) | u64::from(self.threshold.coalescing()) << 1,
            intr_type: self.mode.ddi_type(),
            vectors: self.intr.lock().as_ref().map_or(0, |i| i.count() as u64),
        }
    }

    fn announce(hba: &Hba<Self>) {
        let d = &hba.dev;
        dev_note!(
            d.dip,
            "VMware PVSCSI, {} interrupts, target ids 0..{} ({}), {} requests / {} completions{}, max transfer {} KiB{}",
            d.mode.name(),
            d.targets.count.saturating_sub(1),
            match d.targets.source {
                TargetSource::GetMaxTargets => "GET_MAX_TARGETS",
                TargetSource::ConfigPage => "CONFIG page",
                TargetSource::Fallback => "device did not say",
            },
            d.geometry.req_entries(),
            d.geometry.cmp_entries(),
            if d.has_msg_ring() {
                ", message ring"
            } else {
                ", no message ring (hot-plug is not reported)"
            },
            MAX_XFER / 1024,
            if d.threshold.coalescing() {
                ", request-call threshold"
            } else {
                ""
            },
        );
    }

    fn interrupts(&self) -> bool {
        self.mode.interrupts()
    }

    fn notify_batching(&self) -> bool {
        self.notify_batching
    }

    /// Any 64-bit address; segments of up to 4 GiB - 1 (the SG element's
    /// 32-bit length); 128 segments (the one-page SG list); transfers of
    /// [`MAX_XFER`].
    fn data_dma_attr(&self) -> ffi::ddi_dma_attr_t {
        ffi::ddi_dma_attr_t {
            dma_attr_version: ffi::DMA_ATTR_V0,
            dma_attr_addr_lo: 0,
            dma_attr_addr_hi: u64::MAX,
            dma_attr_count_max: 0xFFFF_FFFF,
            dma_attr_align: 1,
            dma_attr_burstsizes: 1,
            dma_attr_minxfer: 1,
            dma_attr_maxxfer: u64::from(MAX_XFER),
            dma_attr_seg: u64::MAX,
            dma_attr_sgllen: MAX_SG_ENTRIES as i32,
            // Partial-DMA windows end on block boundaries.
            dma_attr_granular: 512,
            dma_attr_flags: 0,
        }
    }

    fn new_cmd_ext(&self, dip: Dip, sleep: Sleep) -> Result<PvCmd, DdiError> {
        PvCmd::new(dip, sleep)
    }

    fn prepare(&self, f: &mut CmdFields<PvCmd>, req: &Request<'_>) {
        // The submitting CPU steers the completion (notes §5.3); a hint.
        cmd::prepare(f, req, crate::ddi::cpu::current_seqid() as u8);
    }

    fn add(
        &self,
        ring: &mut PvRing,
        c: OwnedCmd<PvCmd>,
    ) -> Result<u16, (OwnedCmd<PvCmd>, AddError)> {
        let (slot, bell) = ring.add(c)?;
        if bell == Doorbell::NonReadWrite {
            self.nonrw_pending.store(true, Ordering::Release);
        }
        Ok(slot)
    }

    /// One doorbell for what was published: KICK_NON_RW_IO if a
    /// non-READ/WRITE command is among it (that register is never subject
    /// to the threshold and makes the device process the whole ring),
    /// KICK_RW_IO otherwise (Linux/FreeBSD `pvscsi_kick_io`).
    fn notify(&self, _qi: usize) {
        let bell = if self.nonrw_pending.swap(false, Ordering::AcqRel) {
            Doorbell::NonReadWrite
        } else {
            Doorbell::ReadWrite
        };
        self.regs.kick(bell);
    }

    fn decode(&self, f: &mut CmdFields<PvCmd>, facts: &CmdFacts) -> Outcome {
        cmd::decode(f, facts)
    }

    fn copy_sense(&self, f: &CmdFields<PvCmd>, out: &mut [u8]) -> usize {
        cmd::copy_sense(f, out)
    }

    fn presence(&self, f: &CmdFields<PvCmd>) -> Presence {
        cmd::presence(f)
    }

    fn task_mgmt_name(&self, tm: TaskMgmt) -> &'static str {
        match tm {
            TaskMgmt::AbortTask => "ABORT_CMD",
            TaskMgmt::AbortTaskSet => "ABORT TASK SET (not in the interface)",
            TaskMgmt::LunReset => "RESET_DEVICE",
            TaskMgmt::TargetReset => "RESET_DEVICE (LUN 0)",
        }
    }

    /// ABORT TASK is ABORT_CMD of the command's context, sent with the
    /// queue lock held after checking that the context still holds that
    /// command (a context is reused as soon as its command completes; the
    /// lock keeps it from completing meanwhile; Linux holds its ring lock
    /// across ABORT_CMD too). The device completes the command with
    /// ABORTQUEUE (QEMU: before the register write returns). The interface
    /// has no ABORT TASK SET; a LUN reset is RESET_DEVICE of the LUN; a
    /// target reset is RESET_DEVICE of LUN 0, the nearest the interface
    /// has (QEMU's targets have that one LUN, max_lun 0).
    fn task_mgmt(hba: &Hba<Self>, tm: TaskMgmt, at: &TmAddress, _can_sleep: bool) -> TmAnswer {
        let d = &hba.dev;
        match tm {
            TaskMgmt::AbortTask => {
                let Some(q) = hba.queues.get(usize::from(at.queue)) else {
                    return TmAnswer::Unavailable;
                };
                let mut g = q.ring.lock();
                let still_there = g
                    .ring
                    .rings
                    .token_mut(at.slot)
                    .is_some_and(|c| c.fields_ref().tag == at.tag);
                if !still_there {
                    // It completed meanwhile: nothing left to abort.
                    return TmAnswer::Done;
                }
                tm_answer(d.command(&Command::AbortCmd {
                    context: u64::from(at.slot) + 1,
                    target: u32::from(at.target),
                }))
            }
            TaskMgmt::AbortTaskSet => TmAnswer::Unavailable,
            TaskMgmt::LunReset => tm_answer(d.command(&Command::ResetDevice {
                target: u32::from(at.target),
                lun: at.lun,
            })),
            TaskMgmt::TargetReset => tm_answer(d.command(&Command::ResetDevice {
                target: u32::from(at.target),
                lun: LunNumber::ZERO,
            })),
        }
    }

    /// ADAPTER_RESET, interrupts masked: the device cancels its I/O
    /// (completing it with BUSRESET into the completion ring, which the
    /// core then does not read: it takes every command back) and forgets
    /// the rings. The command is done when COMMAND_STATUS reads back
    /// (QEMU: synchronously); a device that answers all-ones is gone.
    fn stop(&self, _wait: StopWait) -> Result<(), StopError> {
        let _c = self.cmds.lock();
        self.regs.set_intr_mask(0);
        match self.regs.issue(&Command::AdapterReset) {
            Ok(CommandStatus::Done(_)) => Ok(()),
            Ok(_) | Err(_) => Err(StopError::Timeout),
        }
    }

    fn restart(hba: &Hba<Self>) -> Result<(), AttachError> {
        Self::activate(hba)
    }

    fn fail(&self) {
        self.regs.set_intr_mask(0);
    }

    fn quiesce(&self) {
        // No lock: quiesce(9E) runs single-threaded with interrupts off.
        self.regs.set_intr_mask(0);
        let _ = self.regs.issue(&Command::AdapterReset);
    }

    fn stop_interrupts(&self) {
        self.regs.set_intr_mask(0);
        let taken = self.intr.lock().take();
        if let Some(mut i) = taken {
            i.disable();
            drop(i);
        }
    }

    /// MSI and MSI-X: the vector is ours; INTR_STATUS is not read (the
    /// device sends a message per completion batch whether or not it was
    /// acknowledged, notes §1 and Linux `pvscsi_isr`), saving an exit per
    /// interrupt. Fixed: the line may be shared; INTR_STATUS says whether
    /// it was us and is acknowledged (write-1-to-clear) before the rings
    /// are looked at, so that a completion after the look raises the line
    /// again.
    fn interrupt(hba: &Hba<Self>, _arg: usize) -> Claim {
        hba.count(HbaStat::Interrupts);
        let d = &hba.dev;
        let (completions, messages) = match d.mode {
            IntrMode::Fixed => {
                let s = d.regs.intr_status();
                if s == 0 {
                    return Claim::Unclaimed;
                }
                d.regs.ack_intr(s);
                (s & INTR_CMPL_MASK != 0, s & INTR_MSG_MASK != 0)
            }
            IntrMode::Msi | IntrMode::MsiX => (true, true),
            IntrMode::Poll => return Claim::Unclaimed,
        };
        if completions {
            hba.reap_interrupted(0);
        }
        if messages {
            Self::service_messages(hba);
        }
        Claim::Claimed
    }

    fn irm_changed(_hba: &Hba<Self>, _change: IrmChange) -> IrmAnswer {
        IrmAnswer::NotSupported
    }

    fn service_events(hba: &Hba<Self>) {
        Self::service_messages(hba);
    }

    unsafe fn free_device_memory(&mut self) {
        // Every ring the device uses lives in the request queue (freed by
        // the core after the device stopped); the rest is the commands'.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_management_answers_follow_command_status() {
        assert_eq!(tm_answer(CommandStatus::Done(0)), TmAnswer::Done);
        assert_eq!(tm_answer(CommandStatus::Done(7)), TmAnswer::Done);
        assert_eq!(
            tm_answer(CommandStatus::Failed),
            TmAnswer::Refused(u32::MAX)
        );
        assert_eq!(tm_answer(CommandStatus::AwaitingData), TmAnswer::NoAnswer);
    }

    #[test]
    fn the_largest_transfer_fits_the_sg_list_whatever_its_alignment() {
        // An unaligned buffer of MAX_XFER bytes touches at most 128 pages.
        let worst_pages = (MAX_XFER as usize).div_ceil(PAGE_SIZE) + 1;
        assert_eq!(worst_pages, MAX_SG_ENTRIES);
        assert_eq!(MAX_XFER, 508 * 1024);
    }

    #[test]
    fn command_and_ring_errors_keep_their_meaning_in_attach() {
        assert_eq!(
            AttachError::from(CommandError::BadPageCount { pages: 3 }),
            AttachError::Layout("ring page count")
        );
        assert_eq!(
            AttachError::from(CommandError::LunOutOfRange),
            AttachError::Layout("LUN out of range")
        );
        assert_eq!(
            AttachError::from(RingSetupError::BadStatePage),
            AttachError::Layout("ring memory is not page-aligned or too small")
        );
    }
}
