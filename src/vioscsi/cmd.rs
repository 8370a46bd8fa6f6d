//! The virtio-scsi part of each command: its DMA memory (request header,
//! response, indirect descriptor table, laid out by [`CmdLayout`]), how a
//! request is written there (virtio 1.2 §5.6.6.1) and how the response
//! reads back.

use super::config::MAX_CDB_SIZE;
use super::proto::{self, Response};
use crate::ddi::dma::{DmaBuffer, DmaMode, FaultCheck};
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
            // At least the small header buffer, which the request is
            // copied from whole (`write_request`).
            total: (table_off + DESC_SIZE * table_entries).max(HEADERS_SMALL),
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
        let dma = DmaBuffer::alloc(
            dip,
            layout.total,
            64,
            u64::MAX,
            DmaMode::Streaming,
            FaultCheck::NexusPolicy,
            sleep,
        )?;
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

/// The most header bytes a command writes: the request header with the
/// largest CDB a device may ask for, padded to the response, and the
/// response header.
const HEADERS_MAX: usize =
    (proto::REQ_CDB + MAX_CDB_SIZE as usize).next_multiple_of(8) + proto::RESP_HEADER_LEN;

/// Header bytes that fit a CDB of up to 45 bytes (QEMU's is 32).
const HEADERS_SMALL: usize = 80;

/// The bytes of the request header of `req` and the response header, as
/// they go into a command's DMA memory from offset 0, into `out` (zeroed,
/// at least [`proto::REQ_CDB`] long); their length (`resp_off` + the
/// response header, or less if `out` is shorter).
fn headers(layout: &CmdLayout, req: &Request<'_>, out: &mut [u8]) -> usize {
    let end = (layout.resp_off + proto::RESP_HEADER_LEN).min(out.len());
    if end < proto::REQ_CDB {
        return 0;
    }
    // struct virtio_scsi_req_cmd (§5.6.6.1); `out` is zeroed, so the
    // CDB's unused bytes and the padding after it are too (the device
    // reads all `cdb_size` bytes).
    out[proto::REQ_LUN..proto::REQ_LUN + 8].copy_from_slice(&proto::lun_bytes(req.target, req.lun));
    out[proto::REQ_ID..proto::REQ_ID + 8].copy_from_slice(&req.tag.to_le_bytes());
    // task_attr; prio and crn stay 0.
    out[proto::REQ_TASK_ATTR] = task_attr(req.task_attr);
    let cdb_room = layout.req_len.min(end).saturating_sub(proto::REQ_CDB);
    let n = req.cdb.len().min(cdb_room);
    copy_cdb(&mut out[proto::REQ_CDB..], &req.cdb[..n]);
    // Response header: a response code no device sends, so a command the
    // device "completes" without writing its response is not mistaken
    // for a success.
    if let Some(b) = out.get_mut(layout.resp_off + proto::RESP_RESPONSE) {
        *b = 0xff;
    }
    end
}

/// Copies the CDB `src` to the start of `dst` (which holds it: the
/// caller cut `src` to the room). The lengths the SCSI command groups
/// define from 10 bytes up (SPC-4 §4.2.5.1: 10, 12 and 16) are copied as
/// two overlapping 8-byte words, a few moves, rather than a call to
/// memcpy for a handful of bytes (the compiler turns fixed-size copies of
/// these lengths back into that call); any other length is copied as it
/// is.
fn copy_cdb(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    let Some(dst) = dst.get_mut(..n) else {
        return;
    };
    if (8..=16).contains(&n) {
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            w
        };
        let (head, tail) = (word(&src[..8]), word(&src[n - 8..]));
        dst[n - 8..].copy_from_slice(&tail);
        dst[..8].copy_from_slice(&head);
    } else {
        dst.copy_from_slice(src);
    }
}

/// Writes the request header (and the indirect table) of `req` into the
/// command's DMA memory.
pub fn prepare(layout: &CmdLayout, indirect: bool, f: &mut CmdFields<VioCmd>, req: &Request<'_>) {
    f.dev.response = Response::default();
    write_request(&f.dev.dma, layout, indirect, req);
}

/// Writes the headers of `req` (and, `indirect`, its descriptor table)
/// into `dma` as `layout` places them, and syncs what the device reads
/// for it in one call.
fn write_request<M: SharedMem>(dma: &M, layout: &CmdLayout, indirect: bool, req: &Request<'_>) {
    // The headers are built on the stack and copied in one go: one bounds
    // check and one copy instead of one per field. The buffer is zeroed
    // whole: a small one for the CDB sizes devices offer (QEMU: 32), the
    // largest only when the device asks for it.
    let hdr_len = if layout.resp_off + proto::RESP_HEADER_LEN <= HEADERS_SMALL {
        let mut hdr = [0u8; HEADERS_SMALL];
        headers(layout, req, &mut hdr);
        // The whole buffer (the command's memory is at least that long,
        // `CmdLayout::new`): a copy of a constant size, which the compiler
        // makes a few stores, where the headers' own length (68 bytes for
        // QEMU's CDB size) would be a call to memcpy. Past the response
        // header lie the sense area the device overwrites and the table
        // written below; the zeroes are synced with the rest, so that no
        // dirty cache line of them can land on what the device writes
        // there later.
        dma.write_bytes(0, &hdr);
        HEADERS_SMALL
    } else {
        write_large_headers(dma, layout, req)
    };
    // What the device reads (and the response header it must
    // overwrite) is synced in one call once everything is written:
    // the header buffer copied, or up to the end of the indirect table
    // (the response's sense bytes in between, which the driver has
    // not written and reads only after a sync for the CPU, go along).
    let mut synced = hdr_len;

    if indirect {
        // [request][data-out...][response][data-in...] (§5.6.6.1: the
        // device-readable parts first).
        let base = dma.device_addr();
        let mut i = 0usize;
        let total = 2 + req.cookies.len();
        let mut put = |addr: u64, len: u32, writes: bool| {
            let last = i + 1 == total;
            let mut flags = if writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let next = if last { 0 } else { (i + 1) as u16 };
            // struct virtq_desc (§2.7.5), little-endian, in one write.
            let mut d = [0u8; DESC_SIZE];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            dma.write_bytes(layout.table_off + i * DESC_SIZE, &d);
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
        synced = synced.max(layout.table_off + total * DESC_SIZE);
    }
    dma.sync_for_device(0, synced);
}

/// The headers of `req` for a device whose CDBs do not fit the small
/// buffer, written into `dma`; their length. Out of line: merged into
/// `write_request`, its copy of a variable length would take the small
/// one's place too.
#[cold]
#[inline(never)]
fn write_large_headers<M: SharedMem>(dma: &M, layout: &CmdLayout, req: &Request<'_>) -> usize {
    let mut hdr = [0u8; HEADERS_MAX];
    let n = headers(layout, req, &mut hdr);
    dma.write_bytes(0, &hdr[..n]);
    n
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
    sense_from(&f.dev.dma, layout, &f.dev.response, sense_size, out)
}

/// [`copy_sense`] from `dma`, the response `r` read from it.
fn sense_from<M: SharedMem>(
    dma: &M,
    layout: &CmdLayout,
    r: &Response,
    sense_size: u32,
    out: &mut [u8],
) -> usize {
    let n = proto::sense_to_copy(r, sense_size).min(out.len());
    if n > 0 {
        let at = layout.resp_off + proto::RESP_SENSE;
        dma.sync_for_cpu(at, n);
        dma.read_bytes(at, &mut out[..n]);
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

    fn request<'a>(cdb: &'a [u8]) -> Request<'a> {
        Request {
            target: 5,
            lun: crate::scsa::addr::LunNumber::new(300).unwrap(),
            cdb,
            cookies: &[],
            dir: DataDir::None,
            task_attr: TaskAttr::Ordered,
            polled: false,
            time_s: 0,
            tag: 0x1122_3344_5566_7788,
        }
    }

    fn desc(
        m: &crate::shmem::shared::SharedHostMem,
        l: &CmdLayout,
        i: usize,
    ) -> (u64, u32, u16, u16) {
        let off = l.table_off + i * DESC_SIZE;
        (
            m.read_u64(off),
            m.read_u32(off + 8),
            m.read_u16(off + 12),
            m.read_u16(off + 14),
        )
    }

    fn cookie(addr: u64, size: usize) -> crate::ffi::ddi_dma_cookie_t {
        crate::ffi::ddi_dma_cookie_t {
            dmac_laddress: addr,
            dmac_size: size,
            dmac_type: 0,
        }
    }

    #[test]
    fn the_indirect_table_puts_what_the_device_reads_first_and_ends_the_chain() {
        use crate::shmem::shared::SharedHostMem;
        const BASE: u64 = 0x8000;
        let l = CmdLayout::new(32, 96, 4, true);
        let k = [cookie(0x10_0000, 4096), cookie(0x20_0000, 512)];
        // A read: [request][response][data in...].
        let m = SharedHostMem::new(l.total, BASE);
        let mut r = request(&[0x28, 0, 0, 0, 0, 0, 0, 0, 9, 0]);
        r.cookies = &k;
        r.dir = DataDir::In;
        write_request(&m, &l, true, &r);
        let (nf, w) = (DESC_F_NEXT, DESC_F_WRITE);
        assert_eq!(desc(&m, &l, 0), (BASE, 51, nf, 1), "the request");
        assert_eq!(desc(&m, &l, 1), (BASE + 56, 108, w | nf, 2), "the response");
        assert_eq!(desc(&m, &l, 2), (0x10_0000, 4096, w | nf, 3));
        assert_eq!(desc(&m, &l, 3), (0x20_0000, 512, w, 0), "the last ends it");
        let mut code = [0u8];
        m.read_bytes(67, &mut code);
        assert_eq!(code, [0xff], "the headers are there too");
        assert_eq!(
            m.take_syncs(),
            [(true, 0, l.table_off + 4 * DESC_SIZE)],
            "one sync from the headers to the table's end"
        );
        // A write: [request][data out...][response].
        let m = SharedHostMem::new(l.total, BASE);
        r.cookies = &k[..1];
        r.dir = DataDir::Out;
        write_request(&m, &l, true, &r);
        assert_eq!(desc(&m, &l, 0), (BASE, 51, nf, 1));
        assert_eq!(desc(&m, &l, 1), (0x10_0000, 4096, nf, 2), "device-readable");
        assert_eq!(desc(&m, &l, 2), (BASE + 56, 108, w, 0), "the response last");
        assert_eq!(m.take_syncs(), [(true, 0, l.table_off + 3 * DESC_SIZE)]);
        // No data, no indirect table: the headers only.
        let m = SharedHostMem::new(l.total, BASE);
        r.cookies = &[];
        r.dir = DataDir::None;
        write_request(&m, &l, false, &r);
        assert_eq!(desc(&m, &l, 0), (0, 0, 0, 0), "no table written");
        assert_eq!(
            m.take_syncs(),
            [(true, 0, HEADERS_SMALL)],
            "the headers and the zeroes copied with them"
        );
    }

    #[test]
    fn the_small_header_buffer_is_copied_whole_into_memory_that_holds_it() {
        use crate::shmem::shared::SharedHostMem;
        // 6-byte CDBs, no sense, no table: 44 bytes of layout, yet the
        // command's memory holds the whole buffer the headers come from.
        let l = CmdLayout::new(6, 0, 0, false);
        assert_eq!(
            (l.resp_off + proto::RESP_HEADER_LEN, l.total),
            (44, HEADERS_SMALL)
        );
        assert_eq!(
            CmdLayout::new(32, 96, 0, false).total,
            176,
            "when larger, itself"
        );
        let m = SharedHostMem::new(l.total, 0);
        m.write_bytes(0, &[0xee; HEADERS_SMALL]);
        write_request(&m, &l, false, &request(&[0x12, 0, 0, 0, 0x24, 0]));
        let mut b = [0u8; HEADERS_SMALL];
        m.read_bytes(0, &mut b);
        assert_eq!(&b[19..25], &[0x12, 0, 0, 0, 0x24, 0], "the CDB");
        assert_eq!(b[43], 0xff, "the response code");
        assert!(b[25..43].iter().all(|&x| x == 0), "padding and response");
        assert!(
            b[44..].iter().all(|&x| x == 0),
            "the stale bytes past it too"
        );
        assert_eq!(m.take_syncs(), [(true, 0, HEADERS_SMALL)], "and synced");
    }

    #[test]
    fn a_cdb_of_any_length_is_copied_exactly() {
        let src: [u8; 40] = core::array::from_fn(|i| 0x80 | i as u8);
        for n in 0..=40 {
            let mut dst = [0u8; 40];
            copy_cdb(&mut dst, &src[..n]);
            assert_eq!(&dst[..n], &src[..n], "length {n}");
            assert!(dst[n..].iter().all(|&b| b == 0), "nothing past {n}");
        }
        let mut short = [0u8; 12];
        copy_cdb(&mut short, &src[..16]);
        assert_eq!(short, [0; 12], "a CDB the room cannot take is not copied");
    }

    #[test]
    fn sense_is_what_the_device_says_it_wrote_within_every_bound() {
        use crate::shmem::shared::SharedHostMem;
        let l = CmdLayout::new(32, 96, 4, true);
        let m = SharedHostMem::new(l.total, 0);
        let sense: [u8; 96] = core::array::from_fn(|i| i as u8 + 1);
        m.write_bytes(l.resp_off + proto::RESP_SENSE, &sense);
        let r = |sense_len| Response {
            sense_len,
            ..Response::default()
        };
        let mut out = [0u8; 64];
        assert_eq!(sense_from(&m, &l, &r(18), 96, &mut out), 18);
        assert_eq!(&out[..18], &sense[..18]);
        assert_eq!(
            m.take_syncs(),
            [(false, l.resp_off + proto::RESP_SENSE, 18)],
            "what the device wrote, for the CPU"
        );
        assert_eq!(sense_from(&m, &l, &r(200), 96, &mut out), 64, "out's room");
        assert_eq!(out, sense[..64]);
        m.take_syncs();
        assert_eq!(sense_from(&m, &l, &r(0), 96, &mut out), 0);
        assert_eq!(m.take_syncs(), [], "no sense, no sync");
    }

    #[test]
    fn task_attributes_map_to_virtio_scsi_codes() {
        assert_eq!(task_attr(TaskAttr::Simple), proto::TASK_ATTR_SIMPLE);
        assert_eq!(task_attr(TaskAttr::Ordered), proto::TASK_ATTR_ORDERED);
        assert_eq!(task_attr(TaskAttr::HeadOfQueue), proto::TASK_ATTR_HEAD);
        assert_eq!(task_attr(TaskAttr::Aca), proto::TASK_ATTR_ACA);
        assert_ne!(proto::TASK_ATTR_SIMPLE, proto::TASK_ATTR_ORDERED);
    }

    #[test]
    fn a_device_asking_for_long_cdbs_gets_whole_headers() {
        use crate::shmem::shared::SharedHostMem;
        // 60-byte CDBs: the headers (92 bytes) do not fit the small buffer.
        let l = CmdLayout::new(60, 96, 4, false);
        let m = SharedHostMem::new(l.total, 0);
        m.write_bytes(0, &[0xee; 140]);
        write_request(&m, &l, false, &request(&[0x28; 10]));
        let end = l.resp_off + 12;
        assert!(end > HEADERS_SMALL);
        let mut b = [0u8; 140];
        m.read_bytes(0, &mut b);
        assert!(
            b[29..end - 1].iter().all(|&x| x == 0),
            "stale bytes cleared"
        );
        assert_eq!(b[end - 1], 0xff, "the response code is in place");
        assert_eq!(m.take_syncs(), [(true, 0, end)]);
    }

    #[test]
    fn the_headers_are_the_request_then_a_response_no_device_sends() {
        let l = CmdLayout::new(32, 96, 4, true);
        // Stale bytes from an earlier, longer command must not survive.
        let mut out = [0u8; HEADERS_MAX];
        let n = headers(&l, &request(&[0x28, 1, 2, 3, 4, 5, 6, 7, 8, 9]), &mut out);
        assert_eq!(n, 56 + 12, "up to the end of the response header");
        assert_eq!(
            &out[0..8],
            &[1, 5, 0x41, 0x2c, 0, 0, 0, 0],
            "LUN 300 of target 5"
        );
        assert_eq!(&out[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&out[16..19], &[proto::TASK_ATTR_ORDERED, 0, 0]);
        assert_eq!(&out[19..29], &[0x28, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(
            out[29..56].iter().all(|&b| b == 0),
            "CDB room and padding zero"
        );
        assert_eq!(&out[56..67], &[0; 11]);
        assert_eq!(out[67], 0xff, "response code no device sends");
        assert!(
            out[68..].iter().all(|&b| b == 0),
            "nothing past the headers"
        );
        // The small buffer prepare uses for such a layout gives the same.
        let mut small = [0u8; HEADERS_SMALL];
        let cdb = [0x28, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(headers(&l, &request(&cdb), &mut small), n);
        assert_eq!(&small[..n], &out[..n]);
        assert!(CmdLayout::new(45, 96, 4, true).resp_off + 12 <= HEADERS_SMALL);
        assert!(CmdLayout::new(46, 96, 4, true).resp_off + 12 > HEADERS_SMALL);
        // A CDB longer than the device's room is cut to it.
        let l = CmdLayout::new(6, 96, 4, true);
        let mut out = [0u8; HEADERS_MAX];
        let n = headers(&l, &request(&[0xaa; 16]), &mut out);
        assert_eq!((l.req_len, l.resp_off, n), (25, 32, 44));
        assert_eq!(&out[19..25], &[0xaa; 6]);
        assert!(out[25..43].iter().all(|&b| b == 0));
        assert_eq!(out[43], 0xff);
        // The largest CDB a device may ask for fits.
        let l = CmdLayout::new(MAX_CDB_SIZE, 96, 4, true);
        let mut out = [0u8; HEADERS_MAX];
        assert_eq!(headers(&l, &request(&[1; 16]), &mut out), HEADERS_MAX);
        assert_eq!(out[HEADERS_MAX - 1], 0xff);
    }
}
