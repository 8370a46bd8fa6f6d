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
use crate::ddi::dma::{DmaBuffer, DmaMode};
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

/// The pvscsi part of a command.
pub struct PvCmd {
    /// SG list and sense buffer.
    pub mem: DmaBuffer,
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

impl PvCmd {
    /// A command's pvscsi part with its DMA memory allocated.
    pub fn new(dip: Dip, sleep: Sleep) -> Result<PvCmd, DdiError> {
        let mem = DmaBuffer::alloc(
            dip,
            CMD_MEM_LEN,
            PAGE_SIZE as u64,
            u64::MAX,
            DmaMode::Streaming,
            sleep,
        )?;
        Ok(PvCmd {
            mem,
            desc: [0; REQ_DESC_SIZE],
            encoded: Err(EncodeError::BadContext),
            opcode: 0,
            bell: Doorbell::NonReadWrite,
            completion: NO_COMPLETION,
            sense_valid: 0,
        })
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
/// the device); an impossible request is remembered and refused at
/// submission.
pub fn prepare(f: &mut CmdFields<PvCmd>, req: &Request<'_>) {
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
        vcpu_hint: crate::ddi::cpu::current_seqid() as u8,
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
pub fn decode(f: &mut CmdFields<PvCmd>, facts: &CmdFacts) -> Outcome {
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
pub fn copy_sense(f: &CmdFields<PvCmd>, out: &mut [u8]) -> usize {
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
pub fn presence(f: &CmdFields<PvCmd>) -> Presence {
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
