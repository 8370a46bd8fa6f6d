//! virtio-scsi wire formats and their meaning in SCSA terms (virtio 1.2
//! §5.6). Pure functions over bytes: the device's values are decoded here,
//! validated, and never used to index driver memory.

use crate::ffi;
use crate::scsa::addr::LunNumber;
use crate::scsa::flags::DataDir;
use crate::scsa::outcome::{STATE_COMPLETED, STATE_SENT};
use crate::scsa::{Outcome, PktState, PktStatistics};

/// The control queue (task management).
pub const CONTROL_QUEUE: u16 = 0;
/// The event queue.
pub const EVENT_QUEUE: u16 = 1;
/// The first request queue.
pub const FIRST_REQUEST_QUEUE: u16 = 2;

/// The virtio device ID of a SCSI host (§5.6).
pub const VIRTIO_ID_SCSI: u16 = 8;

// struct virtio_scsi_req_cmd, device-readable part (§5.6.6.1).
/// Offset of `lun[8]`.
pub const REQ_LUN: usize = 0;
/// Offset of `id` (le64, the command's tag for task management).
pub const REQ_ID: usize = 8;
/// Offset of `task_attr`.
pub const REQ_TASK_ATTR: usize = 16;
/// Offset of `cdb[cdb_size]`.
pub const REQ_CDB: usize = 19;

// Device-writable part.
/// Offset of `sense_len` (le32).
pub const RESP_SENSE_LEN: usize = 0;
/// Offset of `residual` (le32).
pub const RESP_RESIDUAL: usize = 4;
/// Offset of `status_qualifier` (le16).
pub const RESP_STATUS_QUALIFIER: usize = 8;
/// Offset of `status`.
pub const RESP_STATUS: usize = 10;
/// Offset of `response`.
pub const RESP_RESPONSE: usize = 11;
/// Offset of `sense[sense_size]`.
pub const RESP_SENSE: usize = 12;

/// Task attributes (§5.6.6.1).
pub const TASK_ATTR_SIMPLE: u8 = 0;
/// `VIRTIO_SCSI_S_ORDERED`
pub const TASK_ATTR_ORDERED: u8 = 1;
/// `VIRTIO_SCSI_S_HEAD`
pub const TASK_ATTR_HEAD: u8 = 2;
/// `VIRTIO_SCSI_S_ACA`
pub const TASK_ATTR_ACA: u8 = 3;

/// Response codes (§5.6.6.1, §5.6.6.2).
pub mod response {
    pub const OK: u8 = 0;
    pub const OVERRUN: u8 = 1;
    pub const ABORTED: u8 = 2;
    pub const BAD_TARGET: u8 = 3;
    pub const RESET: u8 = 4;
    pub const BUSY: u8 = 5;
    pub const TRANSPORT_FAILURE: u8 = 6;
    pub const TARGET_FAILURE: u8 = 7;
    pub const NEXUS_FAILURE: u8 = 8;
    pub const FAILURE: u8 = 9;
    pub const FUNCTION_SUCCEEDED: u8 = 10;
    pub const FUNCTION_REJECTED: u8 = 11;
    pub const INCORRECT_LUN: u8 = 12;
    /// `VIRTIO_SCSI_S_FUNCTION_COMPLETE` is the same value as OK.
    pub const FUNCTION_COMPLETE: u8 = 0;
}

// Task management (§5.6.6.2): struct virtio_scsi_ctrl_tmf.
/// `VIRTIO_SCSI_T_TMF`
pub const CTRL_TMF: u32 = 0;
/// Length of the device-readable TMF request: type, subtype, lun, id.
pub const TMF_REQ_LEN: usize = 24;

/// A task management function (`VIRTIO_SCSI_T_TMF_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tmf {
    /// Abort one command, named by its `id`.
    AbortTask = 0,
    /// Abort every command of a LUN.
    AbortTaskSet = 1,
    /// Reset the I_T nexus (the target, as seen from this initiator).
    ItNexusReset = 4,
    /// Reset a LUN.
    LogicalUnitReset = 5,
}

impl Tmf {
    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Tmf::AbortTask => "ABORT TASK",
            Tmf::AbortTaskSet => "ABORT TASK SET",
            Tmf::ItNexusReset => "I_T NEXUS RESET",
            Tmf::LogicalUnitReset => "LOGICAL UNIT RESET",
        }
    }
}

/// Whether a TMF response byte means the function was performed.
pub fn tmf_succeeded(resp: u8) -> bool {
    resp == response::FUNCTION_COMPLETE || resp == response::FUNCTION_SUCCEEDED
}

/// Encodes a TMF request.
pub fn tmf_request(tmf: Tmf, target: u8, lun: LunNumber, id: u64) -> [u8; TMF_REQ_LEN] {
    let mut b = [0u8; TMF_REQ_LEN];
    b[0..4].copy_from_slice(&CTRL_TMF.to_le_bytes());
    b[4..8].copy_from_slice(&(tmf as u32).to_le_bytes());
    b[8..16].copy_from_slice(&lun_bytes(target, lun));
    b[16..24].copy_from_slice(&id.to_le_bytes());
    b
}

/// Largest LUN of the single-level flat format (14 bits).
pub const MAX_LUN: u16 = crate::scsa::addr::MAX_SINGLE_LEVEL_LUN;

/// The 8-byte LUN field (virtio 1.2 §5.6.6.1): byte 0 is 1, byte 1 the
/// target, bytes 2-3 a single-level LUN structure, the rest zero.
///
/// The LUN goes in the flat space method (`0x40 | high bits`, low bits)
/// whatever form the framework's name had: it is the form every
/// virtio-scsi device is written against (Linux's `virtio_scsi.c` and
/// illumos' own `vioscsi.c` send nothing else), and the devices decode
/// the number from the low 14 bits of those two bytes (QEMU
/// `hw/scsi/virtio-scsi.c` `virtio_scsi_get_lun`; vhost-scsi
/// `drivers/vhost/scsi.c` `vhost_buf_to_lun`, `& 0x3fff`; QEMU's
/// `virtio_scsi_device_get` takes byte 2 of 0 or 0x40..0x7f only, so a
/// peripheral LUN with a bus identifier, `0x01..0x3f`, would not even
/// reach a LUN there). So peripheral LUN 5 (`00 05`, named `t,5`), flat
/// LUN 300 (`41 2c`, named `t,412c000000000000`) and the peripheral LUN
/// with bus identifier 1 that Linux targets (LIO, through vhost-scsi)
/// report for LUN 258 (`01 02`, `int_to_scsilun`; named `t,102`) go out
/// as `40 05`, `41 2c` and `41 02`.
///
/// A [`LunNumber`] is at most [`MAX_LUN`] by construction: nothing to
/// check or mask here.
pub fn lun_bytes(target: u8, lun: LunNumber) -> [u8; 8] {
    [
        1,
        target,
        0x40 | lun.high_bits(),
        lun.low_byte(),
        0,
        0,
        0,
        0,
    ]
}

/// Decodes a LUN field written by the device (an event's); `None` if not
/// a single-level LUN in the peripheral (bus 0) or flat space method.
pub fn decode_lun(b: &[u8; 8]) -> Option<(u8, LunNumber)> {
    if b[0] != 1 {
        return None;
    }
    let lun = match b[2] >> 6 {
        0 if b[2] == 0 => LunNumber::from_structure(0, b[3]), // peripheral format, LUN < 256
        1 => LunNumber::from_structure(b[2], b[3]),
        _ => return None,
    };
    Some((b[1], lun))
}

/// The device-written header of a command response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// Sense bytes the device says it wrote.
    pub sense_len: u32,
    /// Data bytes not transferred.
    pub residual: u32,
    /// Status qualifier.
    pub status_qualifier: u16,
    /// SCSI status byte.
    pub status: u8,
    /// virtio-scsi response code.
    pub response: u8,
}

/// Length of the response header before the sense bytes.
pub const RESP_HEADER_LEN: usize = RESP_SENSE;

impl Response {
    /// Decodes the 12-byte response header.
    pub fn parse(b: &[u8; RESP_HEADER_LEN]) -> Self {
        Response {
            sense_len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            residual: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            status_qualifier: u16::from_le_bytes([b[8], b[9]]),
            status: b[RESP_STATUS],
            response: b[RESP_RESPONSE],
        }
    }
}

/// What the driver knows about a command besides the device's response
/// (the core's).
pub use crate::hba::family::CmdFacts;

/// How many sense bytes of a response to copy: what the device says it
/// wrote (`sense_len`, a device-written value nothing trusts), never more
/// than the response buffer holds (`sense_size`).
pub fn sense_to_copy(r: &Response, sense_size: u32) -> usize {
    (r.sense_len as usize).min(sense_size as usize)
}

/// Maps a virtio-scsi response to the SCSA outcome (tran_start(9E)).
///
/// Anything the device says that cannot be true (a residual larger than
/// the transfer, an unknown response code) becomes `CMD_TRAN_ERR`: a
/// transport error the target driver retries, rather than data it would
/// trust. The used-ring length plays no part: devices commonly get it
/// wrong (QEMU counts the data-out bytes in it; virtio 1.2 §2.7.8 advises
/// drivers of legacy devices to ignore it), and the driver never uses it
/// to copy anything, so it cannot harm memory either way.
pub fn outcome(r: &Response, f: &CmdFacts) -> Outcome {
    use response::*;
    let mut o = Outcome {
        reason: ffi::CMD_CMPLT,
        state: STATE_SENT,
        statistics: f.recovery,
        resid: f.xfer,
        status: 0,
    };
    match r.response {
        OK => {
            if r.residual as usize > f.xfer {
                o.reason = ffi::CMD_TRAN_ERR;
                return o;
            }
            o.state = STATE_COMPLETED;
            o.resid = r.residual as usize;
            o.status = r.status;
            if f.xfer > 0 && o.resid < f.xfer {
                o.state |= PktState::XFERRED_DATA;
            }
        }
        OVERRUN => {
            o.reason = ffi::CMD_DATA_OVR;
            if f.dir != DataDir::None {
                o.state |= PktState::XFERRED_DATA;
            }
            o.resid = 0;
        }
        ABORTED => {
            o.reason = ffi::CMD_ABORTED;
            o.statistics |= PktStatistics::ABORTED;
        }
        RESET => {
            o.reason = ffi::CMD_RESET;
            if !o.statistics.contains(PktStatistics::BUS_RESET) {
                o.statistics |= PktStatistics::DEV_RESET;
            }
        }
        BAD_TARGET => {
            o.reason = ffi::CMD_DEV_GONE;
            o.state = PktState::GOT_BUS;
        }
        INCORRECT_LUN => {
            o.reason = ffi::CMD_DEV_GONE;
            o.state = PktState::GOT_BUS | PktState::GOT_TARGET;
        }
        BUSY => {
            // The device could not take the command now: a transport
            // error that sd retries.
            o.reason = ffi::CMD_TRAN_ERR;
            o.state = PktState::GOT_BUS;
        }
        TRANSPORT_FAILURE | TARGET_FAILURE | NEXUS_FAILURE | FAILURE => {
            o.reason = ffi::CMD_TRAN_ERR;
        }
        _ => {
            o.reason = ffi::CMD_TRAN_ERR;
            o.state = PktState::empty();
        }
    }
    o = o.timed_out(f.timed_out);
    o
}

/// Event codes (§5.6.6.3).
pub mod event {
    pub const NO_EVENT: u32 = 0;
    pub const TRANSPORT_RESET: u32 = 1;
    pub const ASYNC_NOTIFY: u32 = 2;
    pub const PARAM_CHANGE: u32 = 3;
    /// Flag: the device dropped events for lack of buffers.
    pub const EVENTS_MISSED: u32 = 0x8000_0000;
    pub const RESET_HARD: u32 = 0;
    pub const RESET_RESCAN: u32 = 1;
    pub const RESET_REMOVED: u32 = 2;
}

/// Size of `struct virtio_scsi_event`.
pub const EVENT_LEN: usize = 16;

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing (only meaningful with `missed`).
    None,
    /// A target or LUN appeared, disappeared or was reset.
    TransportReset {
        /// Target and LUN, if the LUN field was well formed.
        addr: Option<(u8, LunNumber)>,
        /// `RESET_*`
        reason: u32,
    },
    /// A parameter of a LUN changed (the sense code of the unit
    /// attention it will report).
    ParamChange {
        /// Target and LUN.
        addr: Option<(u8, LunNumber)>,
        /// Additional sense code.
        asc: u8,
        /// Additional sense code qualifier.
        ascq: u8,
    },
    /// Something this driver does not handle.
    Other(u32),
}

/// Decodes an event; the bool is the EVENTS_MISSED flag.
pub fn parse_event(b: &[u8; EVENT_LEN]) -> (Event, bool) {
    let code = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut lun = [0u8; 8];
    lun.copy_from_slice(&b[4..12]);
    let reason = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    let missed = code & event::EVENTS_MISSED != 0;
    let addr = decode_lun(&lun);
    let ev = match code & !event::EVENTS_MISSED {
        event::NO_EVENT => Event::None,
        event::TRANSPORT_RESET => Event::TransportReset { addr, reason },
        event::PARAM_CHANGE => Event::ParamChange {
            addr,
            asc: reason as u8,
            ascq: (reason >> 8) as u8,
        },
        other => Event::Other(other),
    };
    (ev, missed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(n: u16) -> LunNumber {
        LunNumber::new(n).unwrap()
    }

    fn facts(xfer: usize) -> CmdFacts {
        CmdFacts {
            xfer,
            dir: if xfer > 0 { DataDir::In } else { DataDir::None },
            timed_out: false,
            recovery: PktStatistics::empty(),
        }
    }

    fn resp(response: u8, status: u8, residual: u32) -> Response {
        Response {
            sense_len: 0,
            residual,
            status_qualifier: 0,
            status,
            response,
        }
    }

    #[test]
    fn lun_encoding_round_trips() {
        assert_eq!(lun_bytes(2, n(0)), [1, 2, 0x40, 0, 0, 0, 0, 0]);
        assert_eq!(lun_bytes(255, n(0x3fff)), [1, 255, 0x7f, 0xff, 0, 0, 0, 0]);
        // LUN 258 as Linux targets report it, peripheral with bus
        // identifier 1 (`01 02`), named t,102: sent flat.
        assert_eq!(lun_bytes(0, n(258)), [1, 0, 0x41, 0x02, 0, 0, 0, 0]);
        for (t, l) in [(0u8, 0u16), (3, 1), (255, 0x3fff), (17, 300)] {
            assert_eq!(decode_lun(&lun_bytes(t, n(l))), Some((t, n(l))));
        }
        assert_eq!(decode_lun(&[0, 1, 0x40, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_lun(&[1, 1, 0xc0, 0, 0, 0, 0, 0]), None);
        assert_eq!(
            decode_lun(&[1, 1, 0x01, 0, 0, 0, 0, 0]),
            None,
            "a bus identifier"
        );
        assert_eq!(
            decode_lun(&[1, 4, 0, 7, 0, 0, 0, 0]),
            Some((4, n(7))),
            "peripheral"
        );
    }

    /// What the framework names a LUN goes out as that LUN: each of the
    /// names QEMU's REPORT LUNS leads to, through tran_tgt_init's decoding,
    /// to the wire bytes QEMU decodes back to the same number.
    #[test]
    fn every_named_lun_reaches_the_same_lun_on_the_wire() {
        use crate::scsa::addr::child_of_unit_address;
        extern crate std;
        for n in 0..=MAX_LUN {
            let lun64 = if n < 256 {
                u64::from(n)
            } else {
                u64::from(0x4000 | n) << 48
            };
            let ua = std::format!("7,{lun64:x}");
            let (t, lun) = child_of_unit_address(ua.as_bytes(), 255, MAX_LUN).unwrap();
            let b = lun_bytes(t, lun.number());
            // QEMU: byte 0 is 1, byte 2 is 0 or 0x40..0x7f, the LUN is
            // the low 14 bits of bytes 2-3 (virtio_scsi_get_lun).
            assert_eq!((b[0], b[1]), (1, 7));
            assert!(b[2] == 0 || (0x40..0x80).contains(&b[2]));
            assert_eq!(u16::from_be_bytes([b[2], b[3]]) & 0x3fff, n, "{ua}");
            assert_eq!(&b[4..], &[0; 4]);
            let tmf = tmf_request(Tmf::LogicalUnitReset, t, lun.number(), 0);
            assert_eq!(&tmf[8..16], &b, "the TMF names the same LUN");
        }
    }

    #[test]
    fn good_completion_with_residual() {
        let o = outcome(&resp(response::OK, 0, 512), &facts(4096));
        assert_eq!(o.reason, ffi::CMD_CMPLT);
        assert_eq!(o.resid, 512);
        assert_eq!(o.state, STATE_COMPLETED | PktState::XFERRED_DATA);
        let o = outcome(&resp(response::OK, 0, 4096), &facts(4096));
        assert_eq!(o.state, STATE_COMPLETED, "nothing moved: no XFERRED_DATA");
        let o = outcome(&resp(response::OK, 2, 0), &facts(0));
        assert_eq!((o.status, o.state), (2, STATE_COMPLETED));
    }

    #[test]
    fn every_response_code_maps() {
        let cases = [
            (response::OVERRUN, ffi::CMD_DATA_OVR, PktStatistics::empty()),
            (response::ABORTED, ffi::CMD_ABORTED, PktStatistics::ABORTED),
            (
                response::BAD_TARGET,
                ffi::CMD_DEV_GONE,
                PktStatistics::empty(),
            ),
            (response::RESET, ffi::CMD_RESET, PktStatistics::DEV_RESET),
            (response::BUSY, ffi::CMD_TRAN_ERR, PktStatistics::empty()),
            (
                response::TRANSPORT_FAILURE,
                ffi::CMD_TRAN_ERR,
                PktStatistics::empty(),
            ),
            (
                response::TARGET_FAILURE,
                ffi::CMD_TRAN_ERR,
                PktStatistics::empty(),
            ),
            (
                response::NEXUS_FAILURE,
                ffi::CMD_TRAN_ERR,
                PktStatistics::empty(),
            ),
            (response::FAILURE, ffi::CMD_TRAN_ERR, PktStatistics::empty()),
            (
                response::INCORRECT_LUN,
                ffi::CMD_DEV_GONE,
                PktStatistics::empty(),
            ),
            (200, ffi::CMD_TRAN_ERR, PktStatistics::empty()),
        ];
        for (code, reason, stats) in cases {
            let o = outcome(&resp(code, 0, 0), &facts(512));
            assert_eq!((o.reason, o.statistics), (reason, stats), "response {code}");
            assert!(
                !o.state.contains(PktState::GOT_STATUS),
                "response {code} has no SCSI status"
            );
        }
    }

    #[test]
    fn untrustworthy_answers_become_transport_errors() {
        let o = outcome(&resp(response::OK, 0, 8192), &facts(4096));
        assert_eq!(o.reason, ffi::CMD_TRAN_ERR, "residual beyond the transfer");
        let o = outcome(&resp(0xff, 0, 0), &facts(4096));
        assert_eq!(
            o.reason,
            ffi::CMD_TRAN_ERR,
            "a response the device never wrote (pre-filled 0xff)"
        );
        assert_eq!(o.resid, 4096, "nothing is claimed transferred");
    }

    #[test]
    fn timeouts_keep_the_recovery_statistics() {
        let mut f = facts(512);
        f.timed_out = true;
        let o = outcome(&resp(response::ABORTED, 0, 0), &f);
        assert_eq!(o.reason, ffi::CMD_TIMEOUT);
        assert_eq!(
            o.statistics,
            PktStatistics::TIMEOUT | PktStatistics::ABORTED
        );
        f.recovery = PktStatistics::BUS_RESET;
        let o = outcome(&resp(response::RESET, 0, 0), &f);
        assert_eq!(
            o.statistics,
            PktStatistics::TIMEOUT | PktStatistics::BUS_RESET
        );
    }

    #[test]
    fn events_decode() {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[4..12].copy_from_slice(&lun_bytes(2, LunNumber::ZERO));
        b[12] = 2;
        assert_eq!(
            parse_event(&b),
            (
                Event::TransportReset {
                    addr: Some((2, LunNumber::ZERO)),
                    reason: 2
                },
                false
            )
        );
        b[0..4].copy_from_slice(&(3u32 | event::EVENTS_MISSED).to_le_bytes());
        b[12..16].copy_from_slice(&0x092au32.to_le_bytes());
        assert_eq!(
            parse_event(&b),
            (
                Event::ParamChange {
                    addr: Some((2, LunNumber::ZERO)),
                    asc: 0x2a,
                    ascq: 9
                },
                true
            )
        );
        let garbage = [0xffu8; 16];
        let (ev, missed) = parse_event(&garbage);
        assert!(missed);
        assert_eq!(ev, Event::Other(0x7fff_ffff));
    }

    #[test]
    fn tmf_request_layout() {
        let b = tmf_request(Tmf::LogicalUnitReset, 3, n(1), 0x1122);
        assert_eq!(&b[0..8], &[0, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(&b[8..16], &lun_bytes(3, n(1)));
        assert_eq!(&b[16..24], &0x1122u64.to_le_bytes());
    }
}
