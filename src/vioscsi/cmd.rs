//! The virtio-scsi part of each command: its DMA memory (request header,
//! response, indirect descriptor table, laid out by [`CmdLayout`]), how a
//! request is written there (virtio 1.2 §5.6.6.1) and how the response
//! reads back.

use super::proto::{self, Response};
use crate::ddi::dma::{DmaBuffer, DmaMode};
use crate::ddi::{DdiError, Dip, Sleep};
use crate::hba::cmd::CmdFields;
use crate::hba::family::{CmdFacts, Request, TaskAttr};
use crate::scsa::Outcome;
use crate::scsa::flags::DataDir;
use crate::shmem::SharedMem;
use crate::virtio::ring::{DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};

/// Where the request header, the response and the indirect table live in a
/// command's DMA memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdLayout {
    /// Bytes of the request header (`19 + cdb_size`).
    pub req_len: usize,
    /// Offset of the response.
    pub resp_off: usize,
    /// Bytes of the response (12 + sense).
    pub resp_len: usize,
    /// Offset of the indirect descriptor table.
    pub table_off: usize,
    /// Entries the table has room for (0: no table).
    pub table_entries: usize,
    /// Total bytes.
    pub total: usize,
}

impl CmdLayout {
    /// For CDBs of `cdb_size`, `sense_size` bytes of sense and up to
    /// `segments` data buffers, with or without an indirect table.
    pub fn new(cdb_size: u32, sense_size: u32, segments: u32, indirect: bool) -> Self {
        let req_len = proto::REQ_CDB + cdb_size as usize;
        let resp_off = req_len.next_multiple_of(8);
        let resp_len = proto::RESP_HEADER_LEN + sense_size as usize;
        let table_off = (resp_off + resp_len).next_multiple_of(DESC_SIZE);
        let table_entries = if indirect { segments as usize + 2 } else { 0 };
        CmdLayout {
            req_len,
            resp_off,
            resp_len,
            table_off,
            table_entries,
            total: table_off + DESC_SIZE * table_entries,
        }
    }
}

/// The virtio-scsi part of a command.
pub struct VioCmd {
    /// Request header, response, indirect table.
    pub dma: DmaBuffer,
    /// The response (kept for internal commands).
    pub response: Response,
}

impl VioCmd {
    /// A command's virtio-scsi part with its DMA memory allocated.
    pub fn new(dip: Dip, layout: &CmdLayout, sleep: Sleep) -> Result<VioCmd, DdiError> {
        let dma = DmaBuffer::alloc(dip, layout.total, 64, u64::MAX, DmaMode::Streaming, sleep)?;
        Ok(VioCmd {
            dma,
            response: Response::default(),
        })
    }
}

/// The virtio-scsi task attribute (§5.6.6.1).
pub fn task_attr(a: TaskAttr) -> u8 {
    match a {
        TaskAttr::Simple => proto::TASK_ATTR_SIMPLE,
        TaskAttr::Ordered => proto::TASK_ATTR_ORDERED,
        TaskAttr::HeadOfQueue => proto::TASK_ATTR_HEAD,
        TaskAttr::Aca => proto::TASK_ATTR_ACA,
    }
}

/// Writes the request header (and the indirect table) of `req` into the
/// command's DMA memory.
pub fn prepare(layout: &CmdLayout, indirect: bool, f: &mut CmdFields<VioCmd>, req: &Request<'_>) {
    f.dev.response = Response::default();
    let dma = &f.dev.dma;
    // struct virtio_scsi_req_cmd (§5.6.6.1).
    dma.write_bytes(proto::REQ_LUN, &proto::lun_bytes(req.target, req.lun));
    dma.write_u64(proto::REQ_ID, req.tag);
    // task_attr, prio, crn
    dma.write_bytes(proto::REQ_TASK_ATTR, &[task_attr(req.task_attr), 0, 0]);
    let cdb_room = layout.req_len - proto::REQ_CDB;
    let n = req.cdb.len().min(cdb_room);
    dma.write_bytes(proto::REQ_CDB, &req.cdb[..n]);
    let zeros = [0u8; 32];
    let mut at = proto::REQ_CDB + n;
    while at < layout.req_len {
        let k = (layout.req_len - at).min(zeros.len());
        dma.write_bytes(at, &zeros[..k]);
        at += k;
    }
    // Response header: a response code no device sends, so a command
    // the device "completes" without writing its response is not
    // mistaken for a success.
    dma.write_bytes(layout.resp_off, &[0u8; proto::RESP_HEADER_LEN]);
    dma.write_bytes(layout.resp_off + proto::RESP_RESPONSE, &[0xff]);
    // What the device reads (and the response header it must
    // overwrite) is synced in one call once everything is written:
    // just the headers, or up to the end of the indirect table
    // (the response's sense bytes in between, which the driver has
    // not written and reads only after a sync for the CPU, go along).
    let mut synced = layout.resp_off + proto::RESP_HEADER_LEN;

    if indirect {
        // [request][data-out...][response][data-in...] (§5.6.6.1: the
        // device-readable parts first).
        let base = dma.device_addr();
        let mut i = 0usize;
        let total = 2 + req.cookies.len();
        let mut put = |addr: u64, len: u32, writes: bool| {
            let off = layout.table_off + i * DESC_SIZE;
            let last = i + 1 == total;
            let mut flags = if writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            dma.write_u64(off, addr);
            dma.write_u32(off + 8, len);
            dma.write_u16(off + 12, flags);
            dma.write_u16(off + 14, if last { 0 } else { (i + 1) as u16 });
            i += 1;
        };
        put(base, layout.req_len as u32, false);
        if req.dir == DataDir::Out {
            for k in req.cookies {
                put(k.dmac_laddress, k.dmac_size as u32, false);
            }
        }
        put(base + layout.resp_off as u64, layout.resp_len as u32, true);
        if req.dir == DataDir::In {
            for k in req.cookies {
                put(k.dmac_laddress, k.dmac_size as u32, true);
            }
        }
        synced = layout.table_off + total * DESC_SIZE;
    }
    dma.sync_for_device(0, synced);
}

/// Reads the response header the device wrote and maps it to the SCSA
/// outcome (kept in the command for internal commands' pollers).
pub fn decode(layout: &CmdLayout, f: &mut CmdFields<VioCmd>, facts: &CmdFacts) -> Outcome {
    let dma = &f.dev.dma;
    dma.sync_for_cpu(layout.resp_off, proto::RESP_HEADER_LEN);
    let mut hdr = [0u8; proto::RESP_HEADER_LEN];
    dma.read_bytes(layout.resp_off, &mut hdr);
    let r = Response::parse(&hdr);
    f.dev.response = r;
    proto::outcome(&r, facts)
}

/// Copies the sense bytes of the response into `out` (at most what the
/// device says it wrote, what the buffer holds and what `out` takes).
pub fn copy_sense(
    layout: &CmdLayout,
    sense_size: u32,
    f: &CmdFields<VioCmd>,
    out: &mut [u8],
) -> usize {
    let n = proto::sense_to_copy(&f.dev.response, sense_size).min(out.len());
    if n > 0 {
        let at = layout.resp_off + proto::RESP_SENSE;
        f.dev.dma.sync_for_cpu(at, n);
        f.dev.dma.read_bytes(at, &mut out[..n]);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_for_qemu() {
        let l = CmdLayout::new(32, 96, 254, true);
        assert_eq!(l.req_len, 51);
        assert_eq!(l.resp_off, 56);
        assert_eq!(l.resp_len, 108);
        assert_eq!(l.table_off, 176);
        assert_eq!(l.table_entries, 256);
        assert_eq!(l.total, 176 + 16 * 256);
        assert_eq!(CmdLayout::new(32, 96, 254, false).total, 176);
    }
}
