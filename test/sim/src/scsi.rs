//! SCSI commands the emulated target driver sends (SBC-3, SPC-4) and the
//! sense data it reads.

/// Operation codes.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    /// SERVICE ACTION IN(16) / READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// TEST UNIT READY.
pub fn test_unit_ready() -> Vec<u8> {
    vec![op::TEST_UNIT_READY, 0, 0, 0, 0, 0]
}

/// INQUIRY (standard data, or VPD page `page`).
pub fn inquiry(page: Option<u8>, len: u16) -> Vec<u8> {
    let (evpd, p) = match page {
        Some(p) => (1, p),
        None => (0, 0),
    };
    let l = len.to_be_bytes();
    vec![op::INQUIRY, evpd, p, l[0], l[1], 0]
}

/// READ CAPACITY(10).
pub fn read_capacity_10() -> Vec<u8> {
    vec![op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// READ CAPACITY(16) for `len` bytes of answer.
pub fn read_capacity_16(len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op::SERVICE_ACTION_IN_16;
    c[1] = op::SA_READ_CAPACITY_16;
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

/// MODE SENSE(6) of `page` (0x3f: all pages).
pub fn mode_sense_6(page: u8, len: u8) -> Vec<u8> {
    vec![op::MODE_SENSE_6, 0x08, page & 0x3f, 0, len, 0]
}

/// START STOP UNIT (start).
pub fn start_unit() -> Vec<u8> {
    vec![op::START_STOP_UNIT, 0, 0, 0, 1, 0]
}

/// SYNCHRONIZE CACHE(10) of the whole medium.
pub fn synchronize_cache() -> Vec<u8> {
    vec![op::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// READ/WRITE of `blocks` at `lba`: 10-byte CDBs while they can express
/// the request, 16-byte ones beyond (if `max_cdb` allows).
pub fn rw(write: bool, lba: u64, blocks: u32, max_cdb: usize) -> Option<Vec<u8>> {
    if lba <= u64::from(u32::MAX) && blocks <= u32::from(u16::MAX) {
        let mut c = vec![0u8; 10];
        c[0] = if write { op::WRITE_10 } else { op::READ_10 };
        c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
        c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        return Some(c);
    }
    if max_cdb < 16 {
        return None;
    }
    let mut c = vec![0u8; 16];
    c[0] = if write { op::WRITE_16 } else { op::READ_16 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    Some(c)
}

/// A name for messages.
pub fn name(cdb: &[u8]) -> &'static str {
    match cdb.first().copied().unwrap_or(0xff) {
        op::TEST_UNIT_READY => "TEST UNIT READY",
        op::REQUEST_SENSE => "REQUEST SENSE",
        op::INQUIRY if cdb.get(1).is_some_and(|b| b & 1 != 0) => "INQUIRY (VPD)",
        op::INQUIRY => "INQUIRY",
        op::MODE_SENSE_6 => "MODE SENSE(6)",
        op::START_STOP_UNIT => "START STOP UNIT",
        op::READ_CAPACITY_10 => "READ CAPACITY(10)",
        op::READ_10 => "READ(10)",
        op::WRITE_10 => "WRITE(10)",
        op::SYNCHRONIZE_CACHE_10 => "SYNCHRONIZE CACHE(10)",
        op::READ_16 => "READ(16)",
        op::WRITE_16 => "WRITE(16)",
        op::SERVICE_ACTION_IN_16 => "READ CAPACITY(16)",
        op::REPORT_LUNS => "REPORT LUNS",
        _ => "command",
    }
}

/// Sense keys (SPC-4 table 54).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
}

/// Name of a sense key.
pub fn key_name(k: u8) -> &'static str {
    match k {
        key::NO_SENSE => "NO SENSE",
        key::RECOVERED_ERROR => "RECOVERED ERROR",
        key::NOT_READY => "NOT READY",
        key::MEDIUM_ERROR => "MEDIUM ERROR",
        key::HARDWARE_ERROR => "HARDWARE ERROR",
        key::ILLEGAL_REQUEST => "ILLEGAL REQUEST",
        key::UNIT_ATTENTION => "UNIT ATTENTION",
        key::DATA_PROTECT => "DATA PROTECT",
        key::ABORTED_COMMAND => "ABORTED COMMAND",
        _ => "sense",
    }
}

/// Key, ASC, ASCQ of fixed (0x70/0x71) or descriptor (0x72/0x73) sense.
pub fn decode_sense(s: &[u8]) -> Option<(u8, u8, u8)> {
    match s.first()? & 0x7f {
        0x70 | 0x71 if s.len() >= 14 => Some((s[2] & 0xf, s[12], s[13])),
        0x72 | 0x73 if s.len() >= 4 => Some((s[1] & 0xf, s[2], s[3])),
        _ => None,
    }
}
