//! Wire formats: `#[repr(C)]` mirrors of VMware's packed structures
//! (`pvscsi.h`: `PVSCSIRingsState`, `PVSCSIRingReqDesc`,
//! `PVSCSIRingCmpDesc`, `PVSCSIRingMsgDesc` / `PVSCSIMsgDescDevStatusChanged`,
//! `PVSCSISGElement`, `PVSCSIConfigPageHeader` / `...Controller`).
//!
//! Every field of every structure sits at its natural alignment, so the
//! plain `repr(C)` layout equals the packed one; the assertions below pin
//! each offset to the header's. The mirrors are never overlaid on DMA
//! memory: descriptors are built and read as byte arrays at offsets
//! taken from the mirrors (`offset_of!`), little-endian, so that a value
//! the device wrote is only ever a number to be checked.

use crate::scsa::addr::LunNumber;
use crate::scsa::flags::{DataDir, PktFlags};
use crate::shmem::SharedMem;
use core::mem::{offset_of, size_of};

/// Page size of the interface: PPNs count 4 KiB pages (`PAGE_SHIFT` 12 in
/// the header's users).
pub const PAGE_SIZE: usize = 4096;

/// `PVSCSIRingsState`: one page shared by driver and device.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RingsState {
    /// Driver: request producer index (free-running).
    pub req_prod_idx: u32,
    /// Device: request consumer index.
    pub req_cons_idx: u32,
    /// Device: log2 of the request ring's entries.
    pub req_num_entries_log2: u32,
    /// Device: completion producer index.
    pub cmp_prod_idx: u32,
    /// Driver: completion consumer index.
    pub cmp_cons_idx: u32,
    /// Device: log2 of the completion ring's entries.
    pub cmp_num_entries_log2: u32,
    /// Device: the request-call threshold (QEMU never writes it).
    pub req_call_threshold: u32,
    /// Keeps the message fields in their own cache line.
    pub _pad: [u8; 100],
    /// Device: message producer index.
    pub msg_prod_idx: u32,
    /// Driver: message consumer index.
    pub msg_cons_idx: u32,
    /// Device: log2 of the message ring's entries.
    pub msg_num_entries_log2: u32,
}

const _: () = assert!(size_of::<RingsState>() == 140);
const _: () = assert!(offset_of!(RingsState, req_prod_idx) == 0);
const _: () = assert!(offset_of!(RingsState, req_cons_idx) == 4);
const _: () = assert!(offset_of!(RingsState, req_num_entries_log2) == 8);
const _: () = assert!(offset_of!(RingsState, cmp_prod_idx) == 12);
const _: () = assert!(offset_of!(RingsState, cmp_cons_idx) == 16);
const _: () = assert!(offset_of!(RingsState, cmp_num_entries_log2) == 20);
const _: () = assert!(offset_of!(RingsState, req_call_threshold) == 24);
const _: () = assert!(offset_of!(RingsState, msg_prod_idx) == 128);
const _: () = assert!(offset_of!(RingsState, msg_cons_idx) == 132);
const _: () = assert!(offset_of!(RingsState, msg_num_entries_log2) == 136);

/// Offsets in the rings-state page.
pub mod rs {
    use super::RingsState;
    use core::mem::offset_of;
    /// `reqProdIdx` (driver writes).
    pub const REQ_PROD: usize = offset_of!(RingsState, req_prod_idx);
    /// `reqConsIdx` (device writes).
    pub const REQ_CONS: usize = offset_of!(RingsState, req_cons_idx);
    /// `reqNumEntriesLog2` (device writes).
    pub const REQ_LOG2: usize = offset_of!(RingsState, req_num_entries_log2);
    /// `cmpProdIdx` (device writes).
    pub const CMP_PROD: usize = offset_of!(RingsState, cmp_prod_idx);
    /// `cmpConsIdx` (driver writes).
    pub const CMP_CONS: usize = offset_of!(RingsState, cmp_cons_idx);
    /// `cmpNumEntriesLog2` (device writes).
    pub const CMP_LOG2: usize = offset_of!(RingsState, cmp_num_entries_log2);
    /// `reqCallThreshold` (device writes).
    pub const REQ_CALL_THRESHOLD: usize = offset_of!(RingsState, req_call_threshold);
    /// `msgProdIdx` (device writes).
    pub const MSG_PROD: usize = offset_of!(RingsState, msg_prod_idx);
    /// `msgConsIdx` (driver writes).
    pub const MSG_CONS: usize = offset_of!(RingsState, msg_cons_idx);
    /// `msgNumEntriesLog2` (device writes).
    pub const MSG_LOG2: usize = offset_of!(RingsState, msg_num_entries_log2);
}

/// `PVSCSIRingReqDesc`
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReqDesc {
    /// Non-zero, upper 32 bits zero (vmkernel keeps it in a u32).
    pub context: u64,
    /// Buffer address, or the SG list's with `FLAG_WITH_SG_LIST`.
    pub data_addr: u64,
    /// Total bytes.
    pub data_len: u64,
    /// Sense buffer address.
    pub sense_addr: u64,
    /// Sense buffer length.
    pub sense_len: u32,
    /// `PVSCSI_FLAG_CMD_*`
    pub flags: u32,
    /// The CDB.
    pub cdb: [u8; 16],
    /// CDB length (at most 16).
    pub cdb_len: u8,
    /// Single-level LUN, `lun[1]` = the LUN.
    pub lun: [u8; 8],
    /// Task attribute: 0x20 simple, 0x21 head, 0x22 ordered.
    pub tag: u8,
    /// Must be 0.
    pub bus: u8,
    /// Target id.
    pub target: u8,
    /// The submitting CPU (steers completions).
    pub vcpu_hint: u8,
    /// Must be zero.
    pub unused: [u8; 59],
}

/// Size of a request descriptor.
pub const REQ_DESC_SIZE: usize = 128;
const _: () = assert!(size_of::<ReqDesc>() == REQ_DESC_SIZE);
const _: () = assert!(offset_of!(ReqDesc, context) == 0);
const _: () = assert!(offset_of!(ReqDesc, data_addr) == 8);
const _: () = assert!(offset_of!(ReqDesc, data_len) == 16);
const _: () = assert!(offset_of!(ReqDesc, sense_addr) == 24);
const _: () = assert!(offset_of!(ReqDesc, sense_len) == 32);
const _: () = assert!(offset_of!(ReqDesc, flags) == 36);
const _: () = assert!(offset_of!(ReqDesc, cdb) == 40);
const _: () = assert!(offset_of!(ReqDesc, cdb_len) == 56);
const _: () = assert!(offset_of!(ReqDesc, lun) == 57);
const _: () = assert!(offset_of!(ReqDesc, tag) == 65);
const _: () = assert!(offset_of!(ReqDesc, bus) == 66);
const _: () = assert!(offset_of!(ReqDesc, target) == 67);
const _: () = assert!(offset_of!(ReqDesc, vcpu_hint) == 68);
const _: () = assert!(offset_of!(ReqDesc, unused) == 69);

/// `PVSCSI_FLAG_CMD_WITH_SG_LIST`
pub const FLAG_WITH_SG_LIST: u32 = 1 << 0;
/// `PVSCSI_FLAG_CMD_OUT_OF_BAND_CDB` ("to be specified"; never sent)
pub const FLAG_OUT_OF_BAND_CDB: u32 = 1 << 1;
/// `PVSCSI_FLAG_CMD_DIR_NONE`
pub const FLAG_DIR_NONE: u32 = 1 << 2;
/// `PVSCSI_FLAG_CMD_DIR_TOHOST`
pub const FLAG_DIR_TOHOST: u32 = 1 << 3;
/// `PVSCSI_FLAG_CMD_DIR_TODEVICE`
pub const FLAG_DIR_TODEVICE: u32 = 1 << 4;

/// Task attributes of the `tag` byte (SCSI-2 queue tag messages).
pub const TAG_SIMPLE: u8 = 0x20;
/// Head of queue.
pub const TAG_HEAD: u8 = 0x21;
/// Ordered.
pub const TAG_ORDERED: u8 = 0x22;

/// `PVSCSIRingCmpDesc`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CmpDesc {
    /// The request's context.
    pub context: u64,
    /// Bytes transferred (QEMU never writes it: always 0).
    pub data_len: u64,
    /// Sense bytes written.
    pub sense_len: u32,
    /// `BTSTAT_*`
    pub host_status: u16,
    /// SCSI status.
    pub scsi_status: u16,
    /// Zero.
    pub _pad: [u32; 2],
}

/// Size of a completion descriptor.
pub const CMP_DESC_SIZE: usize = 32;
const _: () = assert!(size_of::<CmpDesc>() == CMP_DESC_SIZE);
const _: () = assert!(offset_of!(CmpDesc, context) == 0);
const _: () = assert!(offset_of!(CmpDesc, data_len) == 8);
const _: () = assert!(offset_of!(CmpDesc, sense_len) == 16);
const _: () = assert!(offset_of!(CmpDesc, host_status) == 20);
const _: () = assert!(offset_of!(CmpDesc, scsi_status) == 22);
const _: () = assert!(offset_of!(CmpDesc, _pad) == 24);

/// `PVSCSIRingMsgDesc` read as `PVSCSIMsgDescDevStatusChanged` (the only
/// kinds defined).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MsgDesc {
    /// `PVSCSI_MSG_DEV_ADDED` / `PVSCSI_MSG_DEV_REMOVED`
    pub kind: u32,
    /// Bus (0).
    pub bus: u32,
    /// Target.
    pub target: u32,
    /// LUN, `lun[1]` = the LUN.
    pub lun: [u8; 8],
    /// Unused.
    pub _pad: [u32; 27],
}

/// Size of a message descriptor.
pub const MSG_DESC_SIZE: usize = 128;
const _: () = assert!(size_of::<MsgDesc>() == MSG_DESC_SIZE);
const _: () = assert!(offset_of!(MsgDesc, kind) == 0);
const _: () = assert!(offset_of!(MsgDesc, bus) == 4);
const _: () = assert!(offset_of!(MsgDesc, target) == 8);
const _: () = assert!(offset_of!(MsgDesc, lun) == 12);
const _: () = assert!(offset_of!(MsgDesc, _pad) == 20);

/// `PVSCSISGElement`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SgElement {
    /// Bus address.
    pub addr: u64,
    /// Bytes.
    pub length: u32,
    /// `PVSCSI_SGE_FLAG_CHAIN_ELEMENT` (bit 0) is never set: QEMU ignores it.
    pub flags: u32,
}

/// Size of an SG element.
pub const SG_ELEMENT_SIZE: usize = 16;
const _: () = assert!(size_of::<SgElement>() == SG_ELEMENT_SIZE);
const _: () = assert!(offset_of!(SgElement, addr) == 0);
const _: () = assert!(offset_of!(SgElement, length) == 8);
const _: () = assert!(offset_of!(SgElement, flags) == 12);

/// `PVSCSI_MAX_NUM_SG_ENTRIES_PER_SEGMENT`: the SG table's limit (Linux
/// `sg_tablesize`, FreeBSD). A 4 KiB page would hold 256; illumos'
/// sgllen 257 wrote past it.
pub const MAX_SG_ENTRIES: usize = 128;

/// `PVSCSIConfigPageHeader`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigPageHeader {
    /// Page number.
    pub page_num: u32,
    /// Dwords including the header.
    pub num_dwords: u16,
    /// `BTSTAT_*` of the read.
    pub host_status: u16,
    /// SCSI status of the read.
    pub scsi_status: u16,
    /// Reserved.
    pub reserved: [u16; 3],
}

const _: () = assert!(size_of::<ConfigPageHeader>() == 16);
const _: () = assert!(offset_of!(ConfigPageHeader, num_dwords) == 4);
const _: () = assert!(offset_of!(ConfigPageHeader, host_status) == 6);
const _: () = assert!(offset_of!(ConfigPageHeader, scsi_status) == 8);

/// `PVSCSIConfigPageController`
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConfigPageController {
    /// Header.
    pub header: ConfigPageHeader,
    /// SAS device name.
    pub node_wwn: u64,
    /// UTF-16.
    pub manufacturer: [u16; 64],
    /// UTF-16.
    pub serial_number: [u16; 64],
    /// UTF-16.
    pub oprom_version: [u16; 32],
    /// UTF-16.
    pub hw_version: [u16; 32],
    /// UTF-16.
    pub firmware_version: [u16; 32],
    /// Number of targets ("phys").
    pub num_phys: u32,
    /// Flag.
    pub use_consecutive_phy_wwns: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// Size of the controller page.
pub const CONFIG_PAGE_CONTROLLER_SIZE: usize = 480;
const _: () = assert!(size_of::<ConfigPageController>() == CONFIG_PAGE_CONTROLLER_SIZE);
const _: () = assert!(offset_of!(ConfigPageController, node_wwn) == 16);
const _: () = assert!(offset_of!(ConfigPageController, manufacturer) == 24);
const _: () = assert!(offset_of!(ConfigPageController, firmware_version) == 408);
const _: () = assert!(offset_of!(ConfigPageController, num_phys) == 472);

/// Offset of `header.hostStatus` in a config page.
pub const CONFIG_HOST_STATUS: usize = offset_of!(ConfigPageHeader, host_status);
/// Offset of `header.scsiStatus` in a config page.
pub const CONFIG_SCSI_STATUS: usize = offset_of!(ConfigPageHeader, scsi_status);
/// Offset of `numPhys` in the controller page.
pub const CONFIG_NUM_PHYS: usize = offset_of!(ConfigPageController, num_phys);

/// The 8-byte LUN field: single level, `lun[1]` = the LUN (Linux
/// `pvscsi_queue_ring`, FreeBSD, illumos all write only `lun[1]`; QEMU
/// `pvscsi_device_find` turns any other non-zero byte into SELTIMEO).
/// `None` for LUNs above 255, which that byte cannot carry.
pub fn lun_field(lun: LunNumber) -> Option<[u8; 8]> {
    let n = u8::try_from(lun.get()).ok()?;
    Some([0, n, 0, 0, 0, 0, 0, 0])
}

/// Decodes a device-written LUN field: `None` unless it is `[0, n, 0...]`.
pub fn decode_lun_field(b: &[u8; 8]) -> Option<LunNumber> {
    if b[0] != 0 || b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    LunNumber::new(u16::from(b[1]))
}

/// The tag byte for a packet's `pkt_flags` (FLAG_HTAG, FLAG_OTAG; simple
/// otherwise, as Linux `pvscsi_queue_ring` does for every tagged command).
pub fn tag_for(flags: PktFlags) -> u8 {
    if flags.contains(PktFlags::HTAG) {
        TAG_HEAD
    } else if flags.contains(PktFlags::OTAG) {
        TAG_ORDERED
    } else {
        TAG_SIMPLE
    }
}

/// The direction flag: from the DMA direction only (notes §5.4: a flag
/// that contradicts the CDB loses the command on QEMU).
pub fn dir_flag(dir: DataDir) -> u32 {
    match dir {
        DataDir::None => FLAG_DIR_NONE,
        DataDir::In => FLAG_DIR_TOHOST,
        DataDir::Out => FLAG_DIR_TODEVICE,
    }
}

/// The direction a READ/WRITE opcode moves data in, if it is one.
fn cdb_direction(opcode: u8) -> Option<DataDir> {
    match opcode {
        0x08 | 0x28 | 0xA8 | 0x88 => Some(DataDir::In),
        0x0A | 0x2A | 0xAA | 0x8A => Some(DataDir::Out),
        _ => None,
    }
}

/// One DMA segment of the data buffer (a cookie).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Bus address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
}

/// A data segment as a descriptor carries it: a DMA cookie of the
/// packet's binding, or a plain [`Segment`].
pub trait DataSegment {
    /// Bus address.
    fn bus_addr(&self) -> u64;
    /// Bytes.
    fn byte_len(&self) -> u32;
}

impl DataSegment for Segment {
    fn bus_addr(&self) -> u64 {
        self.addr
    }
    fn byte_len(&self) -> u32 {
        self.len
    }
}

impl DataSegment for crate::ffi::ddi_dma_cookie_t {
    fn bus_addr(&self) -> u64 {
        self.dmac_laddress
    }
    /// The family's DMA attributes cap a cookie at `dma_attr_count_max`
    /// 0xFFFF_FFFF (ddi_dma_attr(9S)), so the size fits the element's
    /// 32-bit length.
    fn byte_len(&self) -> u32 {
        self.dmac_size as u32
    }
}

/// The per-command area the SG list is written to: `mem[off..]`, whose
/// device address is `mem.device_addr() + off`.
pub struct SgArea<'a, M: SharedMem> {
    /// The memory.
    pub mem: &'a M,
    /// Offset of the table in it.
    pub off: usize,
}

impl<M: SharedMem> SgArea<'_, M> {
    /// Elements that fit: within the memory, within the physical page the
    /// table starts in (header: the table must lie within one page), and
    /// at most [`MAX_SG_ENTRIES`].
    pub fn capacity(&self) -> usize {
        let Some(room) = self.mem.len().checked_sub(self.off) else {
            return 0;
        };
        let addr = self.mem.device_addr().wrapping_add(self.off as u64);
        if addr % SG_ELEMENT_SIZE as u64 != 0 {
            return 0;
        }
        let to_page_end = PAGE_SIZE - (addr % PAGE_SIZE as u64) as usize;
        (room.min(to_page_end) / SG_ELEMENT_SIZE).min(MAX_SG_ENTRIES)
    }

    fn device_addr(&self) -> u64 {
        self.mem.device_addr().wrapping_add(self.off as u64)
    }
}

/// The sense buffer the device writes on CHECK CONDITION.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenseBuffer {
    /// Bus address.
    pub addr: u64,
    /// Bytes offered (see [`super::status::sense_len_to_offer`]).
    pub len: u32,
}

/// Everything a request descriptor says.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a, S: DataSegment = Segment> {
    /// The context ([`super::ring::Context`]).
    pub context: u64,
    /// The CDB, 1..=16 bytes.
    pub cdb: &'a [u8],
    /// Target.
    pub target: u8,
    /// LUN (0..=255).
    pub lun: LunNumber,
    /// Tag byte ([`tag_for`]).
    pub tag: u8,
    /// Direction of the DMA binding.
    pub dir: DataDir,
    /// The data segments (cookies), empty for no data.
    pub segments: &'a [S],
    /// Sense buffer.
    pub sense: SenseBuffer,
    /// The submitting CPU.
    pub vcpu_hint: u8,
}

/// Why a request cannot be put on the ring (the command fails with
/// TRAN_BADPKT; nothing was written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The CDB is empty or longer than 16 bytes.
    BadCdbLength(usize),
    /// The LUN does not fit `lun[1]`.
    LunOutOfRange,
    /// More segments than the SG area holds.
    TooManySegments {
        /// Segments given.
        segments: usize,
        /// Elements that fit.
        capacity: usize,
    },
    /// A data direction without segments, or segments without one.
    DirectionWithoutData,
    /// The DMA direction contradicts a READ/WRITE opcode (on QEMU the
    /// command would be lost and a later adapter reset abort QEMU).
    DirectionContradictsCdb,
    /// A context of 0 or above 32 bits.
    BadContext,
}

/// Encodes a request descriptor; with more than one segment, writes the SG
/// list into `sg` first (never past its [`SgArea::capacity`]). Syncing
/// the SG area for the device is the caller's, together with the ring.
pub fn encode_request<M: SharedMem, S: DataSegment>(
    req: &Request<'_, S>,
    sg: &SgArea<'_, M>,
) -> Result<[u8; REQ_DESC_SIZE], EncodeError> {
    if req.context == 0 || req.context > u64::from(u32::MAX) {
        return Err(EncodeError::BadContext);
    }
    if req.cdb.is_empty() || req.cdb.len() > 16 {
        return Err(EncodeError::BadCdbLength(req.cdb.len()));
    }
    let lun = lun_field(req.lun).ok_or(EncodeError::LunOutOfRange)?;
    match (req.dir, req.segments.is_empty()) {
        (DataDir::None, true) => {}
        (DataDir::None, false) | (_, true) => return Err(EncodeError::DirectionWithoutData),
        _ => {}
    }
    if let Some(d) = cdb_direction(req.cdb[0])
        && req.dir != DataDir::None
        && req.dir != d
    {
        return Err(EncodeError::DirectionContradictsCdb);
    }
    let total: u64 = req.segments.iter().map(|s| u64::from(s.byte_len())).sum();
    let mut flags = dir_flag(req.dir);
    let data_addr = match req.segments {
        [] => 0,
        [one] => one.bus_addr(),
        many => {
            let capacity = sg.capacity();
            if many.len() > capacity {
                return Err(EncodeError::TooManySegments {
                    segments: many.len(),
                    capacity,
                });
            }
            for (i, s) in many.iter().enumerate() {
                let mut e = [0u8; SG_ELEMENT_SIZE];
                e[offset_of!(SgElement, addr)..][..8].copy_from_slice(&s.bus_addr().to_le_bytes());
                e[offset_of!(SgElement, length)..][..4]
                    .copy_from_slice(&s.byte_len().to_le_bytes());
                sg.mem.write_bytes(sg.off + i * SG_ELEMENT_SIZE, &e);
            }
            flags |= FLAG_WITH_SG_LIST;
            sg.device_addr()
        }
    };
    let mut d = [0u8; REQ_DESC_SIZE];
    let put = |d: &mut [u8; REQ_DESC_SIZE], off: usize, b: &[u8]| {
        d[off..off + b.len()].copy_from_slice(b)
    };
    put(
        &mut d,
        offset_of!(ReqDesc, context),
        &req.context.to_le_bytes(),
    );
    put(
        &mut d,
        offset_of!(ReqDesc, data_addr),
        &data_addr.to_le_bytes(),
    );
    put(&mut d, offset_of!(ReqDesc, data_len), &total.to_le_bytes());
    put(
        &mut d,
        offset_of!(ReqDesc, sense_addr),
        &req.sense.addr.to_le_bytes(),
    );
    put(
        &mut d,
        offset_of!(ReqDesc, sense_len),
        &req.sense.len.to_le_bytes(),
    );
    put(&mut d, offset_of!(ReqDesc, flags), &flags.to_le_bytes());
    put(&mut d, offset_of!(ReqDesc, cdb), req.cdb);
    d[offset_of!(ReqDesc, cdb_len)] = req.cdb.len() as u8;
    put(&mut d, offset_of!(ReqDesc, lun), &lun);
    d[offset_of!(ReqDesc, tag)] = req.tag;
    d[offset_of!(ReqDesc, bus)] = 0;
    d[offset_of!(ReqDesc, target)] = req.target;
    d[offset_of!(ReqDesc, vcpu_hint)] = req.vcpu_hint;
    Ok(d)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// A completion descriptor as the device wrote it (nothing checked yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Context.
    pub context: u64,
    /// Bytes transferred, as the device claims (QEMU: always 0).
    pub data_len: u64,
    /// Sense bytes written, as the device claims.
    pub sense_len: u32,
    /// `BTSTAT_*`
    pub host_status: u16,
    /// SCSI status (a byte, in a u16).
    pub scsi_status: u16,
}

impl Completion {
    /// Decodes a completion descriptor.
    pub fn parse(b: &[u8; CMP_DESC_SIZE]) -> Self {
        Completion {
            context: le64(b, offset_of!(CmpDesc, context)),
            data_len: le64(b, offset_of!(CmpDesc, data_len)),
            sense_len: le32(b, offset_of!(CmpDesc, sense_len)),
            host_status: le16(b, offset_of!(CmpDesc, host_status)),
            scsi_status: le16(b, offset_of!(CmpDesc, scsi_status)),
        }
    }

    /// Encodes one (for tests and device models).
    pub fn to_bytes(&self) -> [u8; CMP_DESC_SIZE] {
        let mut b = [0u8; CMP_DESC_SIZE];
        b[offset_of!(CmpDesc, context)..][..8].copy_from_slice(&self.context.to_le_bytes());
        b[offset_of!(CmpDesc, data_len)..][..8].copy_from_slice(&self.data_len.to_le_bytes());
        b[offset_of!(CmpDesc, sense_len)..][..4].copy_from_slice(&self.sense_len.to_le_bytes());
        b[offset_of!(CmpDesc, host_status)..][..2].copy_from_slice(&self.host_status.to_le_bytes());
        b[offset_of!(CmpDesc, scsi_status)..][..2].copy_from_slice(&self.scsi_status.to_le_bytes());
        b
    }
}

/// A message descriptor's fields (nothing checked yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawMessage {
    /// Type.
    pub kind: u32,
    /// Bus.
    pub bus: u32,
    /// Target.
    pub target: u32,
    /// LUN field.
    pub lun: [u8; 8],
}

impl RawMessage {
    /// Decodes a message descriptor.
    pub fn parse(b: &[u8; MSG_DESC_SIZE]) -> Self {
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&b[offset_of!(MsgDesc, lun)..][..8]);
        RawMessage {
            kind: le32(b, offset_of!(MsgDesc, kind)),
            bus: le32(b, offset_of!(MsgDesc, bus)),
            target: le32(b, offset_of!(MsgDesc, target)),
            lun,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shmem::host::HostMem;

    const SENSE: SenseBuffer = SenseBuffer {
        addr: 0x9000,
        len: 96,
    };

    fn req<'a>(cdb: &'a [u8], dir: DataDir, segs: &'a [Segment]) -> Request<'a> {
        Request {
            context: 7,
            cdb,
            target: 3,
            lun: LunNumber::new(2).unwrap(),
            tag: TAG_SIMPLE,
            dir,
            segments: segs,
            sense: SENSE,
            vcpu_hint: 1,
        }
    }

    #[test]
    fn single_buffer_descriptor_layout() {
        let mem = HostMem::new(4096, 0x10_0000);
        let sg = SgArea { mem: &mem, off: 0 };
        let seg = [Segment {
            addr: 0x1234_5000,
            len: 512,
        }];
        let d = encode_request(
            &req(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], DataDir::In, &seg),
            &sg,
        )
        .unwrap();
        assert_eq!(le64(&d, 0), 7);
        assert_eq!(le64(&d, 8), 0x1234_5000);
        assert_eq!(le64(&d, 16), 512);
        assert_eq!(le64(&d, 24), 0x9000);
        assert_eq!(le32(&d, 32), 96);
        assert_eq!(le32(&d, 36), FLAG_DIR_TOHOST, "no SG flag for one segment");
        assert_eq!(&d[40..50], &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(d[56], 10);
        assert_eq!(&d[57..65], &[0, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!((d[65], d[66], d[67], d[68]), (0x20, 0, 3, 1));
        assert!(d[69..].iter().all(|&b| b == 0));
        let mut untouched = [0u8; 16];
        mem.read_bytes(0, &mut untouched);
        assert_eq!(untouched, [0; 16], "no SG list written for one segment");
    }

    #[test]
    fn sg_list_is_written_and_flagged() {
        let mem = HostMem::new(8192, 0x20_0000);
        let sg = SgArea {
            mem: &mem,
            off: 4096,
        };
        let segs = [
            Segment {
                addr: 0xA000,
                len: 4096,
            },
            Segment {
                addr: 0xC000,
                len: 512,
            },
        ];
        let d = encode_request(
            &req(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 9, 0], DataDir::Out, &segs),
            &sg,
        )
        .unwrap();
        assert_eq!(le32(&d, 36), FLAG_DIR_TODEVICE | FLAG_WITH_SG_LIST);
        assert_eq!(le64(&d, 8), 0x20_1000, "dataAddr = the SG table");
        assert_eq!(le64(&d, 16), 4608, "dataLen = the total");
        let mut e = [0u8; 32];
        mem.read_bytes(4096, &mut e);
        assert_eq!(le64(&e, 0), 0xA000);
        assert_eq!(le32(&e, 8), 4096);
        assert_eq!(le32(&e, 12), 0);
        assert_eq!(le64(&e, 16), 0xC000);
        assert_eq!(le32(&e, 24), 512);
    }

    #[test]
    fn the_sg_list_never_passes_its_page() {
        // 128 elements at most, and never across the page the table
        // starts in: a table 64 bytes before a page end holds 4.
        let mem = HostMem::new(3 * 4096, 0x30_0000);
        assert_eq!(SgArea { mem: &mem, off: 0 }.capacity(), 128);
        let near_end = SgArea {
            mem: &mem,
            off: 4096 - 64,
        };
        assert_eq!(near_end.capacity(), 4);
        assert_eq!(
            SgArea {
                mem: &mem,
                off: 3 * 4096
            }
            .capacity(),
            0
        );
        assert_eq!(
            SgArea {
                mem: &mem,
                off: 5 * 4096
            }
            .capacity(),
            0
        );
        assert_eq!(SgArea { mem: &mem, off: 8 }.capacity(), 0, "misaligned");
        let segs = [Segment {
            addr: 0x1000,
            len: 512,
        }; 5];
        let r = encode_request(&req(&[0x28; 10], DataDir::In, &segs), &near_end);
        assert_eq!(
            r,
            Err(EncodeError::TooManySegments {
                segments: 5,
                capacity: 4
            })
        );
        let mut after = [0u8; 128];
        mem.read_bytes(4096 - 64, &mut after);
        assert!(after.iter().all(|&b| b == 0), "nothing written on refusal");
        let many = [Segment {
            addr: 0x1000,
            len: 512,
        }; 129];
        let full = SgArea { mem: &mem, off: 0 };
        assert!(matches!(
            encode_request(&req(&[0x28; 10], DataDir::In, &many), &full),
            Err(EncodeError::TooManySegments {
                segments: 129,
                capacity: 128
            })
        ));
        assert!(encode_request(&req(&[0x28; 10], DataDir::In, &many[..128]), &full).is_ok());
    }

    #[test]
    fn direction_comes_from_the_dma_binding_and_never_contradicts_the_cdb() {
        let mem = HostMem::new(4096, 0);
        let sg = SgArea { mem: &mem, off: 0 };
        let seg = [Segment {
            addr: 0x1000,
            len: 512,
        }];
        let flags = |r: Result<[u8; 128], EncodeError>| r.map(|d| le32(&d, 36));
        assert_eq!(
            flags(encode_request(&req(&[0], DataDir::None, &[]), &sg)),
            Ok(FLAG_DIR_NONE)
        );
        assert_eq!(
            flags(encode_request(
                &req(&[0x12, 0, 0, 0, 36, 0], DataDir::In, &seg),
                &sg
            )),
            Ok(FLAG_DIR_TOHOST)
        );
        assert_eq!(
            flags(encode_request(
                &req(&[0x15, 0, 0, 0, 12, 0], DataDir::Out, &seg),
                &sg
            )),
            Ok(FLAG_DIR_TODEVICE)
        );
        for (op, wrong) in [
            (0x28u8, DataDir::Out),
            (0x08, DataDir::Out),
            (0x2A, DataDir::In),
            (0x8A, DataDir::In),
        ] {
            assert_eq!(
                encode_request(&req(&[op; 10], wrong, &seg), &sg),
                Err(EncodeError::DirectionContradictsCdb),
                "{op:#x}"
            );
        }
        assert_eq!(
            encode_request(&req(&[0x12; 6], DataDir::In, &[]), &sg),
            Err(EncodeError::DirectionWithoutData)
        );
        assert_eq!(
            encode_request(&req(&[0x12; 6], DataDir::None, &seg), &sg),
            Err(EncodeError::DirectionWithoutData)
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let mem = HostMem::new(4096, 0);
        let sg = SgArea { mem: &mem, off: 0 };
        assert_eq!(
            encode_request(&req(&[], DataDir::None, &[]), &sg),
            Err(EncodeError::BadCdbLength(0))
        );
        assert_eq!(
            encode_request(&req(&[0; 17], DataDir::None, &[]), &sg),
            Err(EncodeError::BadCdbLength(17))
        );
        let mut r = req(&[0; 6], DataDir::None, &[]);
        r.lun = LunNumber::new(256).unwrap();
        assert_eq!(encode_request(&r, &sg), Err(EncodeError::LunOutOfRange));
        let mut r = req(&[0; 6], DataDir::None, &[]);
        r.context = 0;
        assert_eq!(encode_request(&r, &sg), Err(EncodeError::BadContext));
        r.context = 1 << 32;
        assert_eq!(encode_request(&r, &sg), Err(EncodeError::BadContext));
        r.context = u64::from(u32::MAX);
        assert!(encode_request(&r, &sg).is_ok());
    }

    #[test]
    fn completion_round_trip_and_offsets() {
        let c = Completion {
            context: 0x1122,
            data_len: 0x3344,
            sense_len: 18,
            host_status: 0x12,
            scsi_status: 2,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &0x1122u64.to_le_bytes());
        assert_eq!(&b[16..20], &18u32.to_le_bytes());
        assert_eq!((b[20], b[22]), (0x12, 2));
        assert_eq!(Completion::parse(&b), c);
    }

    #[test]
    fn messages_and_luns_decode() {
        let mut b = [0u8; 128];
        b[0] = 1;
        b[8] = 64;
        b[13] = 0;
        let m = RawMessage::parse(&b);
        assert_eq!((m.kind, m.bus, m.target), (1, 0, 64));
        assert_eq!(
            decode_lun_field(&[0, 5, 0, 0, 0, 0, 0, 0]),
            LunNumber::new(5)
        );
        assert_eq!(decode_lun_field(&[1, 5, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_lun_field(&[0, 5, 0, 0, 0, 0, 0, 1]), None);
        assert_eq!(
            lun_field(LunNumber::new(255).unwrap()),
            Some([0, 255, 0, 0, 0, 0, 0, 0])
        );
    }

    /// HostMem that records the byte range every write touched.
    struct Recording {
        mem: HostMem,
        writes: core::cell::RefCell<std::vec::Vec<(usize, usize)>>,
    }
    impl SharedMem for Recording {
        fn len(&self) -> usize {
            self.mem.len()
        }
        fn device_addr(&self) -> u64 {
            self.mem.device_addr()
        }
        fn read_bytes(&self, off: usize, dst: &mut [u8]) {
            self.mem.read_bytes(off, dst)
        }
        fn write_bytes(&self, off: usize, src: &[u8]) {
            self.writes.borrow_mut().push((off, off + src.len()));
            self.mem.write_bytes(off, src)
        }
        fn sync_for_device(&self, _: usize, _: usize) {}
        fn sync_for_cpu(&self, _: usize, _: usize) {}
    }

    proptest::proptest! {
        /// Whatever the CDB, direction and segment count: the direction
        /// flag is the DMA direction's and only it, never a contradiction
        /// of a READ/WRITE opcode, the SG flag iff more than one segment,
        /// and no byte is written outside the SG area's page, or at all
        /// when the request is refused.
        #[test]
        fn encoder_flags_and_bounds(
            opcode in proptest::prelude::any::<u8>(),
            dir in 0u8..3,
            nseg in 0usize..200,
            off_elems in 0usize..520,
        ) {
            let dir = [DataDir::None, DataDir::In, DataDir::Out][dir as usize];
            let mem = Recording {
                mem: HostMem::new(2 * PAGE_SIZE, 0x40_0000),
                writes: Default::default(),
            };
            let off = off_elems * SG_ELEMENT_SIZE;
            let sg = SgArea { mem: &mem, off };
            let segs: std::vec::Vec<Segment> = (0..nseg)
                .map(|i| Segment { addr: 0x100_0000 + 4096 * i as u64, len: 512 })
                .collect();
            let cdb = [opcode, 0, 0, 0, 0, 0, 0, 0, 1, 0];
            let r = encode_request(&req(&cdb, dir, &segs), &sg);
            let writes = mem.writes.borrow().clone();
            match r {
                Ok(d) => {
                    let flags = le32(&d, 36);
                    let dirs = flags & (FLAG_DIR_NONE | FLAG_DIR_TOHOST | FLAG_DIR_TODEVICE);
                    proptest::prop_assert_eq!(dirs, dir_flag(dir));
                    if let Some(want) = cdb_direction(opcode) {
                        proptest::prop_assert!(dir == DataDir::None || dir == want);
                    }
                    proptest::prop_assert_eq!(flags & FLAG_WITH_SG_LIST != 0, nseg > 1);
                    proptest::prop_assert_eq!(le64(&d, 16), 512 * nseg as u64);
                    let page_end = (off / PAGE_SIZE + 1) * PAGE_SIZE;
                    let limit = page_end.min(off + MAX_SG_ENTRIES * SG_ELEMENT_SIZE);
                    for (a, b) in writes {
                        proptest::prop_assert!(a >= off && b <= limit, "write {}..{} outside {}..{}", a, b, off, limit);
                    }
                }
                Err(_) => proptest::prop_assert!(writes.is_empty()),
            }
        }
    }

    #[test]
    fn tags() {
        assert_eq!(tag_for(PktFlags::empty()), TAG_SIMPLE);
        assert_eq!(tag_for(PktFlags::STAG), TAG_SIMPLE);
        assert_eq!(tag_for(PktFlags::HTAG), TAG_HEAD);
        assert_eq!(tag_for(PktFlags::OTAG), TAG_ORDERED);
    }
}
