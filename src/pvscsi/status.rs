//! What a completion means in SCSA terms: host status (`BTSTAT_*`), SCSI
//! status and `dataLen` → reason, state, statistics and residual; and how
//! much sense to take.
//!
//! Two facts about real devices shape this (notes §2, §5.5):
//! - QEMU never writes `dataLen` (always 0), and ESXi returns 0 for some
//!   commands too (Linux commit 142c779d05d1). So `dataLen` 0 on success
//!   means "no residual known": resid 0. Only 0 < dataLen < length is a
//!   residual. With any other SCSI status (CHECK CONDITION, BUSY,
//!   RESERVATION CONFLICT) dataLen 0 means nothing is known to have
//!   moved: the whole length is the residual, as a uscsi(4I) caller's
//!   `uscsi_resid` then says, and the packet does not claim a transfer.
//! - QEMU reports any short (or long) transfer as `BTSTAT_DATARUN` with
//!   dataLen 0 (Q `pvscsi_command_complete`), including REPORT LUNS and
//!   VPD pages that are merely shorter than the allocation length. For
//!   non-READ/WRITE commands that is residue, not an error (nanos #1444);
//!   for READ/WRITE a length mismatch is a real error (CMD_DATA_OVR).

use super::regs::is_read_write;
use super::wire::Completion;
use crate::ffi;
use crate::scsa::flags::DataDir;
use crate::scsa::outcome::{STATE_COMPLETED, STATE_SENT};
use crate::scsa::{Outcome, PktState, PktStatistics};

/// `BTSTAT_*` host status codes (header `HostBusAdapterStatus`).
pub mod btstat {
    pub const SUCCESS: u16 = 0x00;
    pub const LINKED_COMMAND_COMPLETED: u16 = 0x0a;
    pub const LINKED_COMMAND_COMPLETED_WITH_FLAG: u16 = 0x0b;
    pub const DATA_UNDERRUN: u16 = 0x0c;
    pub const SELTIMEO: u16 = 0x11;
    pub const DATARUN: u16 = 0x12;
    pub const BUSFREE: u16 = 0x13;
    pub const INVPHASE: u16 = 0x14;
    pub const INVCODE: u16 = 0x15;
    pub const INVOPCODE: u16 = 0x16;
    pub const LUNMISMATCH: u16 = 0x17;
    pub const INVPARAM: u16 = 0x1a;
    pub const SENSFAILED: u16 = 0x1b;
    pub const TAGREJECT: u16 = 0x1c;
    pub const BADMSG: u16 = 0x1d;
    pub const HAHARDWARE: u16 = 0x20;
    pub const NORESPONSE: u16 = 0x21;
    pub const SENTRST: u16 = 0x22;
    pub const RECVRST: u16 = 0x23;
    pub const DISCONNECT: u16 = 0x24;
    pub const BUSRESET: u16 = 0x25;
    pub const ABORTQUEUE: u16 = 0x26;
    pub const HASOFTWARE: u16 = 0x27;
    pub const HATIMEOUT: u16 = 0x30;
    pub const SCSIPARITY: u16 = 0x34;
}

/// The smallest sense buffer offered to the device (Linux's 96 bytes;
/// illumos offered 20, too few for descriptor sense).
pub const MIN_SENSE_OFFER: u32 = 96;
/// The largest: what an extended status area can take (`MAX_SENSE_LENGTH`)
/// and QEMU writes at most (Q `pvscsi_write_sense`: ≤ 252).
pub const MAX_SENSE_OFFER: u32 = ffi::MAX_SENSE_LENGTH as u32;
/// Size of the per-command sense buffer the core allocates.
pub const SENSE_BUFFER_SIZE: usize = ffi::MAX_SENSE_LENGTH;

/// How many sense bytes to offer the device (`senseLen`) for a packet
/// whose status area is `scb_len` bytes: at least 96; when the status area
/// is larger than `struct scsi_arq_status` (the target asked for extended
/// sense, PKT_XARQ: scsa/arq.rs) as much as it can take, up to 252.
pub fn sense_len_to_offer(scb_len: usize) -> u32 {
    let room = scb_len.saturating_sub(crate::scsa::arq::SENSE_OFFSET);
    let want = if scb_len > crate::scsa::arq::ARQ_STATUS_LEN {
        room.min(ffi::MAX_SENSE_LENGTH)
    } else {
        0
    };
    (want as u32).clamp(MIN_SENSE_OFFER, MAX_SENSE_OFFER)
}

/// What the driver knows about a command besides its completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdFacts {
    /// Bytes of data the command was to move (the request's dataLen).
    pub xfer: usize,
    /// Direction of the data.
    pub dir: DataDir,
    /// The CDB's opcode.
    pub opcode: u8,
    /// Sense bytes offered to the device.
    pub sense_offered: u32,
    /// The watchdog timed the command out (its abort or reset ended it).
    pub timed_out: bool,
    /// Statistics bits of the recovery it went through (BUS_RESET when
    /// the driver sent RESET_BUS or ADAPTER_RESET, DEV_RESET for
    /// RESET_DEVICE, ABORTED for ABORT_CMD).
    pub recovery: PktStatistics,
}

/// The decoded completion: the outcome, and how many sense bytes of the
/// buffer are valid (0 unless CHECK CONDITION).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// For `Pkt::set_outcome`.
    pub outcome: Outcome,
    /// Valid sense bytes: cmp.senseLen, never more than offered, and 0
    /// unless the status is CHECK CONDITION (Linux zeroes the stale byte
    /// 0 for this reason: "the device incorrectly doesn't clear" it).
    pub sense_len: usize,
    /// The device claimed more sense than offered.
    pub sense_clamped: bool,
}

fn good_or_status(o: &mut Outcome, scsi_status: u8, xfer: usize, resid: usize) {
    o.reason = ffi::CMD_CMPLT;
    o.state = STATE_COMPLETED;
    o.status = scsi_status;
    o.resid = resid;
    if xfer > 0 && resid < xfer {
        o.state |= PktState::XFERRED_DATA;
    }
}

/// Maps a completion to the SCSA outcome (tran_start(9E)).
pub fn map_completion(c: &Completion, f: &CmdFacts) -> Mapped {
    use btstat::*;
    let mut o = Outcome {
        reason: ffi::CMD_TRAN_ERR,
        state: STATE_SENT,
        statistics: f.recovery,
        resid: f.xfer,
        status: 0,
    };
    let xfer = f.xfer as u64;
    let rw = is_read_write(f.opcode);
    // A SCSI status is a byte; anything wider is a lie.
    let status = u8::try_from(c.scsi_status).ok();
    let data_len = c.data_len;
    let mut got_status = false;
    match (c.host_status, status) {
        (_, None) => {
            o.state = PktState::empty();
        }
        (SUCCESS | LINKED_COMMAND_COMPLETED | LINKED_COMMAND_COMPLETED_WITH_FLAG, Some(s)) => {
            if data_len > xfer {
                // More moved than the buffer holds: untrustworthy.
                o.state = PktState::empty();
            } else {
                let resid = if data_len > 0 {
                    (xfer - data_len) as usize
                } else if s == ffi::STATUS_GOOD {
                    0
                } else {
                    f.xfer
                };
                good_or_status(&mut o, s, f.xfer, resid);
                got_status = true;
            }
        }
        (DATA_UNDERRUN, Some(s)) => {
            // The device says the transfer was short: dataLen is what moved.
            let moved = data_len.min(xfer);
            good_or_status(&mut o, s, f.xfer, (xfer - moved) as usize);
            got_status = true;
        }
        (DATARUN, Some(s)) => {
            if data_len > 0 && data_len < xfer {
                // A known short transfer (VMware writes dataLen).
                good_or_status(&mut o, s, f.xfer, (xfer - data_len) as usize);
                got_status = true;
            } else if !rw {
                // QEMU's "any residual" report (dataLen 0), or an overrun
                // of an allocation length: the data that came is good,
                // the amount unknown.
                good_or_status(&mut o, s, f.xfer, 0);
                got_status = true;
            } else if s != ffi::STATUS_GOOD {
                // A READ/WRITE that failed: the status (and sense) is what
                // matters; claim nothing moved.
                good_or_status(&mut o, s, f.xfer, f.xfer);
                got_status = true;
            } else {
                // A READ/WRITE whose length did not match the buffer.
                o.reason = ffi::CMD_DATA_OVR;
                o.resid = 0;
                if f.dir != DataDir::None {
                    o.state |= PktState::XFERRED_DATA;
                }
            }
        }
        (SELTIMEO, _) => {
            o.reason = ffi::CMD_DEV_GONE;
            o.state = PktState::GOT_BUS;
        }
        (LUNMISMATCH, _) => {
            o.reason = ffi::CMD_DEV_GONE;
            o.state = PktState::GOT_BUS | PktState::GOT_TARGET;
        }
        (ABORTQUEUE, _) => {
            o.reason = ffi::CMD_ABORTED;
            o.statistics |= PktStatistics::ABORTED;
        }
        (BUSRESET | SENTRST | RECVRST, _) => {
            o.reason = ffi::CMD_RESET;
            let known = PktStatistics::BUS_RESET | PktStatistics::DEV_RESET;
            if !o.statistics.intersects(known) {
                // A reset the driver did not ask for: the device's own.
                o.statistics |= if c.host_status == BUSRESET {
                    PktStatistics::BUS_RESET
                } else {
                    PktStatistics::DEV_RESET
                };
            }
        }
        (
            BUSFREE | INVPHASE | INVCODE | INVOPCODE | INVPARAM | SENSFAILED | TAGREJECT | BADMSG
            | HAHARDWARE | NORESPONSE | DISCONNECT | HASOFTWARE | HATIMEOUT | SCSIPARITY,
            _,
        ) => {
            o.reason = ffi::CMD_TRAN_ERR;
        }
        _ => {
            // A code no header defines.
            o.reason = ffi::CMD_TRAN_ERR;
            o.state = PktState::empty();
        }
    }
    o = o.timed_out(f.timed_out);
    let check = got_status && o.status & ffi::STATUS_MASK == ffi::STATUS_CHECK;
    let (sense_len, sense_clamped) = if check {
        let n = c.sense_len.min(f.sense_offered) as usize;
        (n.min(SENSE_BUFFER_SIZE), c.sense_len > f.sense_offered)
    } else {
        (0, false)
    };
    Mapped {
        outcome: o,
        sense_len,
        sense_clamped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(opcode: u8, xfer: usize) -> CmdFacts {
        CmdFacts {
            xfer,
            dir: if xfer > 0 { DataDir::In } else { DataDir::None },
            opcode,
            sense_offered: 96,
            timed_out: false,
            recovery: PktStatistics::empty(),
        }
    }

    fn cmp(host: u16, scsi: u16, data_len: u64, sense_len: u32) -> Completion {
        Completion {
            context: 1,
            data_len,
            sense_len,
            host_status: host,
            scsi_status: scsi,
        }
    }

    const READ10: u8 = 0x28;
    const INQUIRY: u8 = 0x12;
    const REPORT_LUNS: u8 = 0xA0;

    #[test]
    fn success_with_datalen_zero_is_no_residual() {
        let m = map_completion(&cmp(0, 0, 0, 0), &facts(READ10, 4096));
        assert_eq!(m.outcome.reason, ffi::CMD_CMPLT);
        assert_eq!(m.outcome.resid, 0, "QEMU never writes dataLen");
        assert_eq!(m.outcome.state, STATE_COMPLETED | PktState::XFERRED_DATA);
        assert_eq!(m.sense_len, 0);
    }

    #[test]
    fn a_failed_status_without_datalen_claims_no_transfer() {
        for status in [2u16, 8, 0x18] {
            let m = map_completion(&cmp(0, status, 0, 18), &facts(READ10, 4096));
            assert_eq!(
                (
                    m.outcome.reason,
                    u16::from(m.outcome.status),
                    m.outcome.resid
                ),
                (ffi::CMD_CMPLT, status, 4096),
                "status {status:#x}: nothing known to have moved"
            );
            assert_eq!(m.outcome.state, STATE_COMPLETED, "no XFERRED_DATA");
        }
        // A dataLen the device did write still counts.
        let m = map_completion(&cmp(0, 2, 1024, 18), &facts(READ10, 4096));
        assert_eq!(m.outcome.resid, 3072);
        assert!(m.outcome.state.contains(PktState::XFERRED_DATA));
    }

    #[test]
    fn success_with_a_short_datalen_is_a_residual() {
        let m = map_completion(&cmp(0, 0, 1024, 0), &facts(READ10, 4096));
        assert_eq!((m.outcome.reason, m.outcome.resid), (ffi::CMD_CMPLT, 3072));
        let m = map_completion(&cmp(0, 0, 4096, 0), &facts(READ10, 4096));
        assert_eq!(m.outcome.resid, 0);
        let m = map_completion(&cmp(0, 0, 8192, 0), &facts(READ10, 4096));
        assert_eq!(m.outcome.reason, ffi::CMD_TRAN_ERR, "more than the buffer");
        assert_eq!(m.outcome.resid, 4096);
    }

    #[test]
    fn datarun_is_residue_for_non_rw_and_an_error_for_rw() {
        for op in [INQUIRY, REPORT_LUNS] {
            let m = map_completion(&cmp(btstat::DATARUN, 0, 0, 0), &facts(op, 256));
            assert_eq!(m.outcome.reason, ffi::CMD_CMPLT, "{op:#x}");
            assert_eq!(m.outcome.resid, 0);
            assert!(m.outcome.state.contains(PktState::GOT_STATUS));
        }
        let m = map_completion(&cmp(btstat::DATARUN, 0, 0, 0), &facts(READ10, 4096));
        assert_eq!(m.outcome.reason, ffi::CMD_DATA_OVR);
        let m = map_completion(&cmp(btstat::DATARUN, 0, 512, 0), &facts(READ10, 4096));
        assert_eq!(
            (m.outcome.reason, m.outcome.resid),
            (ffi::CMD_CMPLT, 3584),
            "a known short transfer"
        );
        let m = map_completion(&cmp(btstat::DATARUN, 2, 0, 18), &facts(READ10, 4096));
        assert_eq!(
            (m.outcome.reason, m.outcome.status, m.outcome.resid),
            (ffi::CMD_CMPLT, 2, 4096)
        );
        assert_eq!(m.sense_len, 18);
    }

    #[test]
    fn underrun_reports_what_moved() {
        let m = map_completion(&cmp(btstat::DATA_UNDERRUN, 0, 100, 0), &facts(INQUIRY, 255));
        assert_eq!((m.outcome.reason, m.outcome.resid), (ffi::CMD_CMPLT, 155));
        let m = map_completion(&cmp(btstat::DATA_UNDERRUN, 0, 0, 0), &facts(INQUIRY, 255));
        assert_eq!(m.outcome.resid, 255);
        assert!(!m.outcome.state.contains(PktState::XFERRED_DATA));
    }

    #[test]
    fn check_condition_takes_sense_clamped_to_the_offer() {
        let m = map_completion(&cmp(0, 2, 0, 18), &facts(READ10, 512));
        assert_eq!(
            (m.outcome.status, m.sense_len, m.sense_clamped),
            (2, 18, false)
        );
        assert!(m.outcome.is_check_condition());
        let m = map_completion(&cmp(0, 2, 0, 4000), &facts(READ10, 512));
        assert_eq!((m.sense_len, m.sense_clamped), (96, true));
        // Not CHECK: the buffer is stale and ignored, whatever senseLen says.
        let m = map_completion(&cmp(0, 0, 0, 18), &facts(READ10, 512));
        assert_eq!(m.sense_len, 0);
        let m = map_completion(&cmp(0, 8, 0, 18), &facts(READ10, 512));
        assert_eq!(
            (m.outcome.reason, m.outcome.status, m.sense_len),
            (ffi::CMD_CMPLT, 8, 0),
            "BUSY passes"
        );
    }

    #[test]
    fn host_statuses_map() {
        let cases = [
            (
                btstat::SELTIMEO,
                ffi::CMD_DEV_GONE,
                PktStatistics::empty(),
                PktState::GOT_BUS,
            ),
            (
                btstat::LUNMISMATCH,
                ffi::CMD_DEV_GONE,
                PktStatistics::empty(),
                PktState::GOT_BUS | PktState::GOT_TARGET,
            ),
            (
                btstat::ABORTQUEUE,
                ffi::CMD_ABORTED,
                PktStatistics::ABORTED,
                STATE_SENT,
            ),
            (
                btstat::BUSRESET,
                ffi::CMD_RESET,
                PktStatistics::BUS_RESET,
                STATE_SENT,
            ),
            (
                btstat::SENTRST,
                ffi::CMD_RESET,
                PktStatistics::DEV_RESET,
                STATE_SENT,
            ),
            (
                btstat::RECVRST,
                ffi::CMD_RESET,
                PktStatistics::DEV_RESET,
                STATE_SENT,
            ),
            (
                btstat::HAHARDWARE,
                ffi::CMD_TRAN_ERR,
                PktStatistics::empty(),
                STATE_SENT,
            ),
            (
                btstat::HASOFTWARE,
                ffi::CMD_TRAN_ERR,
                PktStatistics::empty(),
                STATE_SENT,
            ),
            (
                btstat::HATIMEOUT,
                ffi::CMD_TRAN_ERR,
                PktStatistics::empty(),
                STATE_SENT,
            ),
            (
                0x99,
                ffi::CMD_TRAN_ERR,
                PktStatistics::empty(),
                PktState::empty(),
            ),
        ];
        for (host, reason, stats, state) in cases {
            let m = map_completion(&cmp(host, 0, 0, 0), &facts(READ10, 512));
            assert_eq!(
                (m.outcome.reason, m.outcome.statistics, m.outcome.state),
                (reason, stats, state),
                "{host:#x}"
            );
            assert_eq!(m.outcome.resid, 512, "{host:#x}: nothing claimed moved");
        }
        let m = map_completion(&cmp(0, 0x100, 0, 0), &facts(READ10, 512));
        assert_eq!(
            m.outcome.reason,
            ffi::CMD_TRAN_ERR,
            "a status wider than a byte"
        );
    }

    #[test]
    fn recovery_and_timeouts() {
        let mut f = facts(READ10, 512);
        f.recovery = PktStatistics::DEV_RESET;
        let m = map_completion(&cmp(btstat::BUSRESET, 0, 0, 0), &f);
        assert_eq!(
            m.outcome.statistics,
            PktStatistics::DEV_RESET,
            "QEMU reports RESET_DEVICE as BUSRESET"
        );
        f.timed_out = true;
        f.recovery = PktStatistics::empty();
        let m = map_completion(&cmp(btstat::ABORTQUEUE, 0, 0, 0), &f);
        assert_eq!(m.outcome.reason, ffi::CMD_TIMEOUT);
        assert_eq!(
            m.outcome.statistics,
            PktStatistics::ABORTED | PktStatistics::TIMEOUT
        );
    }

    #[test]
    fn sense_offers() {
        assert_eq!(sense_len_to_offer(0), 96);
        assert_eq!(sense_len_to_offer(32), 96, "plain ARQ");
        assert_eq!(sense_len_to_offer(12 + 252), 252, "XARQ");
        assert_eq!(sense_len_to_offer(12 + 200), 200);
        assert_eq!(
            sense_len_to_offer(64),
            96,
            "a small XARQ area still gets 96"
        );
        assert_eq!(sense_len_to_offer(4096), 252);
    }
}
