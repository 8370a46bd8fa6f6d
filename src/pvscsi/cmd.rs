//! The pvscsi part of each command: its DMA memory (the SG list, which
//! must lie within one page, and the sense buffer), the request descriptor
//! written for it (everything but the context, which the ring gives at
//! submission), and the completion the device returned.

use super::regs::{Doorbell, doorbell_for};
use super::status::{self, MAX_SENSE_OFFER, SENSE_BUFFER_SIZE, btstat};
use super::wire::{
    self, Completion, EncodeError, MAX_SG_ENTRIES, PAGE_SIZE, REQ_DESC_SIZE, ReqDesc,
    SG_ELEMENT_SIZE, SenseBuffer, SgArea,
};
use crate::ddi::dma::{DmaBuffer, DmaMode, FaultCheck};
use crate::ddi::{DdiError, Dip, Sleep};
use crate::hba::cmd::CmdFields;
use crate::hba::family::{CmdFacts, Presence, Request, TaskAttr};
use crate::scsa::Outcome;
use crate::shmem::SharedMem;
use core::mem::offset_of;

/// Where the SG list starts in a command's memory (page-aligned: the
/// list must lie within one physical page, `pvscsi.h` SG comment).
pub const SG_OFF: usize = 0;
/// Where the sense buffer starts (after room for every SG element).
pub const SENSE_OFF: usize = SG_OFF + MAX_SG_ENTRIES * SG_ELEMENT_SIZE;
/// Bytes of a command's memory.
pub const CMD_MEM_LEN: usize = SENSE_OFF + SENSE_BUFFER_SIZE;
const _: () = assert!(SENSE_OFF <= PAGE_SIZE && CMD_MEM_LEN <= PAGE_SIZE);

/// Offset of the context in a request descriptor.
const DESC_CONTEXT: usize = offset_of!(ReqDesc, context);

/// A completion no device writes (a SCSI status wider than a byte): what a
/// command holds until its real one is read, so that a command decoded
/// without one is never mistaken for a success.
const NO_COMPLETION: Completion = Completion {
    context: 0,
    data_len: 0,
    sense_len: 0,
    host_status: btstat::HASOFTWARE,
    scsi_status: 0xFFFF,
};

/// The pvscsi part of a command (its memory `M`: DMA memory in the
/// driver, host memory in unit tests).
pub struct PvCmd<M = DmaBuffer> {
    /// SG list and sense buffer.
    pub mem: M,
    /// The request descriptor, context still to be filled in.
    pub desc: [u8; REQ_DESC_SIZE],
    /// Whether the request could be encoded (TRAN_BADPKT if not).
    pub encoded: Result<(), EncodeError>,
    /// The CDB's opcode (the completion mapping's READ/WRITE rules).
    pub opcode: u8,
    /// The doorbell its opcode calls for.
    pub bell: Doorbell,
    /// The device's answer, once reaped.
    pub completion: Completion,
    /// Valid sense bytes of that answer.
    pub sense_valid: usize,
}

impl PvCmd<DmaBuffer> {
    /// A command's pvscsi part with its DMA memory allocated.
    pub fn new(dip: Dip, sleep: Sleep) -> Result<PvCmd, DdiError> {
        let mem = DmaBuffer::alloc(
            dip,
            CMD_MEM_LEN,
            PAGE_SIZE as u64,
            u64::MAX,
            DmaMode::Streaming,
            FaultCheck::NexusPolicy,
            sleep,
        )?;
        Ok(PvCmd::over(mem))
    }
}

impl<M> PvCmd<M> {
    /// A command's pvscsi part over `mem` ([`CMD_MEM_LEN`] bytes, its
    /// start page-aligned).
    pub fn over(mem: M) -> PvCmd<M> {
        PvCmd {
            mem,
            desc: [0; REQ_DESC_SIZE],
            encoded: Err(EncodeError::BadContext),
            opcode: 0,
            bell: Doorbell::NonReadWrite,
            completion: NO_COMPLETION,
            sense_valid: 0,
        }
    }

    /// The descriptor for `context` (what [`Self::descriptor_from`] makes
    /// of this command's).
    pub fn descriptor_from_self(&self, context: u64) -> [u8; REQ_DESC_SIZE] {
        Self::descriptor_from(self.desc)(context)
    }

    /// A maker of the descriptor `desc` with the context the ring gives
    /// (the ring takes the command itself as the slot's token, so the
    /// descriptor is copied out first).
    pub fn descriptor_from(desc: [u8; REQ_DESC_SIZE]) -> impl FnOnce(u64) -> [u8; REQ_DESC_SIZE] {
        move |context| {
            let mut d = desc;
            d[DESC_CONTEXT..DESC_CONTEXT + 8].copy_from_slice(&context.to_le_bytes());
            d
        }
    }
}

/// The tag byte for a SAM task attribute. The descriptor's tag byte has
/// no ACA: such a command goes as SIMPLE (the target still sees an ACA
/// condition through its own state).
pub fn tag_byte(a: TaskAttr) -> u8 {
    match a {
        TaskAttr::Simple | TaskAttr::Aca => wire::TAG_SIMPLE,
        TaskAttr::Ordered => wire::TAG_ORDERED,
        TaskAttr::HeadOfQueue => wire::TAG_HEAD,
    }
}

/// Encodes `req` into the command's descriptor and SG list (synced for
/// the device), `vcpu_hint` the submitting CPU; an impossible request is
/// remembered and refused at submission.
pub fn prepare<M: SharedMem>(f: &mut CmdFields<PvCmd<M>>, req: &Request<'_>, vcpu_hint: u8) {
    let x = &mut f.dev;
    x.completion = NO_COMPLETION;
    x.sense_valid = 0;
    x.opcode = req.cdb.first().copied().unwrap_or(0);
    x.bell = doorbell_for(req.cdb);
    let sense = SenseBuffer {
        addr: x.mem.device_addr() + SENSE_OFF as u64,
        // As much as an extended status area takes (PKT_XARQ, 252 bytes):
        // the core copies what the packet holds.
        len: MAX_SENSE_OFFER,
    };
    let wreq = wire::Request {
        // A placeholder: the ring writes the real context at submission.
        context: 1,
        cdb: req.cdb,
        target: req.target,
        lun: req.lun,
        tag: tag_byte(req.task_attr),
        dir: req.dir,
        segments: req.cookies,
        sense,
        vcpu_hint,
    };
    let sg = SgArea {
        mem: &x.mem,
        off: SG_OFF,
    };
    x.encoded = wire::encode_request(&wreq, &sg).map(|d| x.desc = d);
    if x.encoded.is_ok() && req.cookies.len() > 1 {
        x.mem
            .sync_for_device(SG_OFF, req.cookies.len() * SG_ELEMENT_SIZE);
    }
}

/// The outcome of the completion the command holds.
pub fn decode<M>(f: &mut CmdFields<PvCmd<M>>, facts: &CmdFacts) -> Outcome {
    let x = &mut f.dev;
    let m = status::map_completion(
        &x.completion,
        &status::CmdFacts {
            xfer: facts.xfer,
            dir: facts.dir,
            opcode: x.opcode,
            sense_offered: MAX_SENSE_OFFER,
            timed_out: facts.timed_out,
            recovery: facts.recovery,
        },
    );
    x.sense_valid = m.sense_len;
    m.outcome
}

/// Copies the valid sense bytes into `out`; bytes copied.
pub fn copy_sense<M: SharedMem>(f: &CmdFields<PvCmd<M>>, out: &mut [u8]) -> usize {
    let x = &f.dev;
    let n = x.sense_valid.min(out.len()).min(SENSE_BUFFER_SIZE);
    if n > 0 {
        x.mem.sync_for_cpu(SENSE_OFF, n);
        x.mem.read_bytes(SENSE_OFF, &mut out[..n]);
    }
    n
}

/// Whether a discovery probe's target is there: selection timeout
/// (QEMU: no device at that id, `pvscsi_device_find`) or a LUN mismatch
/// means absent; a completed command with a real status means present;
/// anything else is no answer.
pub fn presence<M>(f: &CmdFields<PvCmd<M>>) -> Presence {
    let c = &f.dev.completion;
    let status_byte = c.scsi_status <= 0xFF;
    match c.host_status {
        btstat::SELTIMEO | btstat::LUNMISMATCH => Presence::Absent,
        btstat::SUCCESS
        | btstat::LINKED_COMMAND_COMPLETED
        | btstat::LINKED_COMMAND_COMPLETED_WITH_FLAG
        | btstat::DATA_UNDERRUN
        | btstat::DATARUN
            if status_byte =>
        {
            Presence::Present
        }
        _ => Presence::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi;
    use crate::hba::cmd::{Cmd, OwnedCmd};
    use crate::hba::family::Request;
    use crate::pvscsi::wire::{
        FLAG_DIR_NONE, FLAG_DIR_TODEVICE, FLAG_DIR_TOHOST, FLAG_WITH_SG_LIST,
    };
    use crate::scsa::addr::LunNumber;
    use crate::scsa::flags::DataDir;
    use crate::scsa::{PktStatistics, outcome::STATE_COMPLETED};
    use crate::shmem::shared::SharedHostMem;
    use std::boxed::Box;

    const BASE: u64 = 0x7000_0000;

    fn cmd() -> Box<Cmd<PvCmd<SharedHostMem>>> {
        Box::new(Cmd::new(PvCmd::over(SharedHostMem::new(CMD_MEM_LEN, BASE))))
    }

    fn cookie(addr: u64, size: usize) -> ffi::ddi_dma_cookie_t {
        ffi::ddi_dma_cookie_t {
            dmac_laddress: addr,
            dmac_size: size,
            dmac_type: 0,
        }
    }

    fn req<'a>(cdb: &'a [u8], cookies: &'a [ffi::ddi_dma_cookie_t], dir: DataDir) -> Request<'a> {
        Request {
            target: 17,
            lun: LunNumber::new(3).unwrap(),
            cdb,
            cookies,
            dir,
            task_attr: TaskAttr::Ordered,
            polled: false,
            time_s: 0,
            tag: 9,
        }
    }

    fn le64(d: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(d[off..off + 8].try_into().unwrap())
    }
    fn le32(d: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(d[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn a_one_cookie_read_is_described_in_the_descriptor_itself() {
        let c = cmd();
        let mut o = OwnedCmd::claim(&c).unwrap();
        let cdb = [0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0];
        let k = [cookie(0x1234_5000, 4096)];
        prepare(o.fields(), &req(&cdb, &k, DataDir::In), 5);
        let x = &o.fields_ref().dev;
        assert_eq!(x.encoded, Ok(()));
        assert_eq!((x.opcode, x.bell), (0x28, Doorbell::ReadWrite));
        assert_eq!(x.completion, NO_COMPLETION);
        let d = x.descriptor_from_self(77);
        assert_eq!(le64(&d, offset_of!(ReqDesc, context)), 77);
        assert_eq!(le64(&d, offset_of!(ReqDesc, data_addr)), 0x1234_5000);
        assert_eq!(le64(&d, offset_of!(ReqDesc, data_len)), 4096);
        assert_eq!(
            le64(&d, offset_of!(ReqDesc, sense_addr)),
            BASE + SENSE_OFF as u64
        );
        assert_eq!(le32(&d, offset_of!(ReqDesc, sense_len)), MAX_SENSE_OFFER);
        assert_eq!(le32(&d, offset_of!(ReqDesc, flags)), FLAG_DIR_TOHOST);
        assert_eq!(&d[offset_of!(ReqDesc, cdb)..][..10], &cdb);
        assert_eq!(d[offset_of!(ReqDesc, cdb_len)], 10);
        assert_eq!(
            &d[offset_of!(ReqDesc, lun)..][..8],
            &[0, 3, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(d[offset_of!(ReqDesc, tag)], wire::TAG_ORDERED);
        assert_eq!(d[offset_of!(ReqDesc, target)], 17);
        assert_eq!(d[offset_of!(ReqDesc, vcpu_hint)], 5);
        assert_eq!(x.mem.take_syncs(), [], "no SG list to sync");
        o.release(crate::hba::cmd::CmdState::Idle);
    }

    #[test]
    fn the_sense_buffer_follows_room_for_every_sg_element() {
        // 128 elements of 16 bytes: the SG list fills the first half page.
        assert_eq!(SENSE_OFF, 2048);
        assert_eq!(CMD_MEM_LEN, 2048 + SENSE_BUFFER_SIZE);
    }

    #[test]
    fn several_cookies_go_through_the_sg_list_in_the_commands_page() {
        let c = cmd();
        let mut o = OwnedCmd::claim(&c).unwrap();
        let cdb = [0x2a, 0, 0, 0, 0, 8, 0, 0, 24, 0];
        let k = [
            cookie(0x10_0000, 4096),
            cookie(0x20_0000, 4096),
            cookie(0x30_0000, 4096),
        ];
        prepare(o.fields(), &req(&cdb, &k, DataDir::Out), 0);
        let x = &o.fields_ref().dev;
        let d = x.descriptor_from_self(1);
        assert_eq!(
            le32(&d, offset_of!(ReqDesc, flags)),
            FLAG_DIR_TODEVICE | FLAG_WITH_SG_LIST
        );
        assert_eq!(
            le64(&d, offset_of!(ReqDesc, data_addr)),
            BASE + SG_OFF as u64
        );
        assert_eq!(le64(&d, offset_of!(ReqDesc, data_len)), 3 * 4096);
        for (i, k) in k.iter().enumerate() {
            assert_eq!(
                x.mem.read_u64(SG_OFF + i * SG_ELEMENT_SIZE),
                k.dmac_laddress
            );
            assert_eq!(x.mem.read_u32(SG_OFF + i * SG_ELEMENT_SIZE + 8), 4096);
        }
        assert_eq!(
            x.mem.take_syncs(),
            [(true, SG_OFF, 3 * SG_ELEMENT_SIZE)],
            "the list, once, for the device"
        );
        o.release(crate::hba::cmd::CmdState::Idle);
    }

    #[test]
    fn impossible_requests_are_remembered_for_submission_to_refuse() {
        let c = cmd();
        let mut o = OwnedCmd::claim(&c).unwrap();
        // READ(10) into a buffer the device is to read: QEMU would lose it.
        let k = [cookie(0x1000, 512), cookie(0x3000, 512)];
        prepare(
            o.fields(),
            &req(&[0x28, 0, 0, 0, 0, 1, 0, 0, 2, 0], &k, DataDir::Out),
            0,
        );
        assert_eq!(
            o.fields_ref().dev.encoded,
            Err(EncodeError::DirectionContradictsCdb)
        );
        assert_eq!(
            o.fields_ref().dev.mem.take_syncs(),
            [],
            "nothing of a refused command goes to the device"
        );
        // TEST UNIT READY: no data, the non-READ/WRITE doorbell.
        prepare(o.fields(), &req(&[0; 6], &[], DataDir::None), 0);
        let x = &o.fields_ref().dev;
        assert_eq!((x.encoded, x.bell), (Ok(()), Doorbell::NonReadWrite));
        assert_eq!(
            le32(&x.descriptor_from_self(1), offset_of!(ReqDesc, flags)),
            FLAG_DIR_NONE
        );
        // A LUN lun[1] cannot carry.
        let mut r = req(&[0; 6], &[], DataDir::None);
        r.lun = LunNumber::new(300).unwrap();
        prepare(o.fields(), &r, 0);
        assert_eq!(o.fields_ref().dev.encoded, Err(EncodeError::LunOutOfRange));
        o.release(crate::hba::cmd::CmdState::Idle);
    }

    #[test]
    fn task_attributes_map_to_tag_bytes() {
        assert_eq!(tag_byte(TaskAttr::Simple), wire::TAG_SIMPLE);
        assert_eq!(tag_byte(TaskAttr::Aca), wire::TAG_SIMPLE);
        assert_eq!(tag_byte(TaskAttr::Ordered), wire::TAG_ORDERED);
        assert_eq!(tag_byte(TaskAttr::HeadOfQueue), wire::TAG_HEAD);
    }

    fn facts(xfer: usize) -> CmdFacts {
        CmdFacts {
            xfer,
            dir: DataDir::In,
            timed_out: false,
            recovery: PktStatistics::empty(),
        }
    }

    #[test]
    fn completions_decode_to_outcomes_and_sense_is_what_the_device_said() {
        let c = cmd();
        let mut o = OwnedCmd::claim(&c).unwrap();
        let k = [cookie(0x1000, 4096)];
        prepare(
            o.fields(),
            &req(&[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0], &k, DataDir::In),
            0,
        );
        // Nothing reaped: never a success.
        let none = decode(o.fields(), &facts(4096));
        assert_ne!(none.reason, ffi::CMD_CMPLT);
        // Good, dataLen 0 (QEMU): no residual.
        o.fields().dev.completion = Completion {
            host_status: btstat::SUCCESS,
            scsi_status: 0,
            ..Completion::default()
        };
        let good = decode(o.fields(), &facts(4096));
        assert_eq!(
            (good.reason, good.status, good.resid),
            (ffi::CMD_CMPLT, 0, 0)
        );
        assert!(good.state.contains(STATE_COMPLETED));
        assert_eq!(o.fields_ref().dev.sense_valid, 0);
        o.fields_ref().dev.mem.take_syncs();
        assert_eq!(copy_sense(o.fields_ref(), &mut [0u8; 32]), 0);
        assert_eq!(o.fields_ref().dev.mem.take_syncs(), [], "no sense, no sync");
        // CHECK CONDITION with 18 bytes of sense in the buffer.
        let sense: [u8; 18] = core::array::from_fn(|i| 0x70 + i as u8);
        o.fields_ref().dev.mem.write_bytes(SENSE_OFF, &sense);
        o.fields().dev.completion = Completion {
            host_status: btstat::SUCCESS,
            scsi_status: u16::from(ffi::STATUS_CHECK),
            sense_len: 18,
            ..Completion::default()
        };
        let check = decode(o.fields(), &facts(4096));
        assert!(check.is_check_condition());
        assert_eq!(o.fields_ref().dev.sense_valid, 18);
        let mut out = [0u8; 32];
        o.fields_ref().dev.mem.take_syncs();
        assert_eq!(copy_sense(o.fields_ref(), &mut out), 18);
        assert_eq!(&out[..18], &sense);
        assert_eq!(
            o.fields_ref().dev.mem.take_syncs(),
            [(false, SENSE_OFF, 18)],
            "what the device wrote, for the CPU"
        );
        let mut short = [0u8; 8];
        assert_eq!(
            copy_sense(o.fields_ref(), &mut short),
            8,
            "never past the caller's room"
        );
        assert_eq!(short, sense[..8]);
        o.release(crate::hba::cmd::CmdState::Idle);
    }

    #[test]
    fn a_probe_reads_presence_from_the_host_status() {
        let c = cmd();
        let mut o = OwnedCmd::claim(&c).unwrap();
        let mut at = |host_status: u16, scsi_status: u16| {
            o.fields().dev.completion = Completion {
                host_status,
                scsi_status,
                ..Completion::default()
            };
            presence(o.fields_ref())
        };
        assert_eq!(at(btstat::SELTIMEO, 0), Presence::Absent);
        assert_eq!(at(btstat::LUNMISMATCH, 0), Presence::Absent);
        assert_eq!(at(btstat::SUCCESS, 0), Presence::Present);
        assert_eq!(
            at(btstat::SUCCESS, 2),
            Presence::Present,
            "a CHECK is an answer"
        );
        assert_eq!(at(btstat::LINKED_COMMAND_COMPLETED, 0), Presence::Present);
        assert_eq!(
            at(btstat::LINKED_COMMAND_COMPLETED_WITH_FLAG, 0),
            Presence::Present
        );
        assert_eq!(at(btstat::DATA_UNDERRUN, 0), Presence::Present);
        assert_eq!(at(btstat::DATARUN, 0), Presence::Present);
        assert_eq!(
            at(btstat::SUCCESS, 0x100),
            Presence::Unknown,
            "no such status"
        );
        assert_eq!(at(btstat::SUCCESS, 0xFF), Presence::Present);
        assert_eq!(at(btstat::BUSRESET, 0), Presence::Unknown);
        assert_eq!(at(btstat::HASOFTWARE, 0xFFFF), Presence::Unknown);
        o.release(crate::hba::cmd::CmdState::Idle);
    }
}
