//! Auto request sense (tran_init_pkt(9E), scsi_arq_status(9S)).
//!
//! When the status area is at least `sizeof (struct scsi_arq_status)` (32
//! bytes) the HBA fills it on CHECK CONDITION: the status byte, then a
//! request-sense "packet" that succeeded, then the sense bytes, and sets
//! `STATE_ARQ_DONE`. A status area larger than that (the target driver
//! asked for extended sense, PKT_XARQ, sd's USCSI path) takes up to
//! `MAX_SENSE_LENGTH` (252) sense bytes, flagged `STATE_XARQ_DONE` in both
//! `pkt_state` and `sts_rqpkt_state`; sd then computes the sense length
//! as 252 - `sts_rqpkt_resid` (20 - resid without XARQ). Never more is
//! copied than fits in the status area.

use super::flags::PktState;
use crate::ffi::{self, scsi_arq_status};
use core::mem::{offset_of, size_of};

/// Offset of the sense bytes in the status area.
pub const SENSE_OFFSET: usize = offset_of!(scsi_arq_status, sts_sensedata);
/// Size of `struct scsi_arq_status`.
pub const ARQ_STATUS_LEN: usize = size_of::<scsi_arq_status>();

/// Writes the status (and, when possible, the auto request sense) of a
/// finished command into the status area `scb` (`pkt_scbp`,
/// `pkt_scblen` bytes). Returns the state bits to add to `pkt_state`.
pub fn fill(scb: &mut [u8], status: u8, sense: &[u8]) -> PktState {
    if scb.is_empty() {
        return PktState::empty();
    }
    scb[0] = status;
    let check = status & ffi::STATUS_MASK == ffi::STATUS_CHECK;
    if !check || sense.is_empty() || scb.len() < ARQ_STATUS_LEN {
        return PktState::empty();
    }
    let extended = scb.len() > ARQ_STATUS_LEN;
    let nominal = if extended {
        ffi::MAX_SENSE_LENGTH
    } else {
        ffi::SENSE_LENGTH
    };
    let room = (scb.len() - SENSE_OFFSET).min(nominal);
    let n = sense.len().min(room);
    let mut rq_state = PktState::GOT_BUS
        | PktState::GOT_TARGET
        | PktState::SENT_CMD
        | PktState::XFERRED_DATA
        | PktState::GOT_STATUS;
    if extended {
        rq_state |= PktState::XARQ_DONE;
    }
    scb[1] = ffi::STATUS_GOOD; // sts_rqpkt_status
    scb[2] = ffi::CMD_CMPLT; // sts_rqpkt_reason
    scb[3] = (nominal - n) as u8; // sts_rqpkt_resid (at most 252: fits)
    scb[4..8].copy_from_slice(&rq_state.bits().to_ne_bytes());
    scb[8..12].copy_from_slice(&0u32.to_ne_bytes()); // sts_rqpkt_statistics
    scb[SENSE_OFFSET..SENSE_OFFSET + n].copy_from_slice(&sense[..n]);
    scb[SENSE_OFFSET + n..SENSE_OFFSET + room].fill(0);
    if extended {
        PktState::ARQ_DONE | PktState::XARQ_DONE
    } else {
        PktState::ARQ_DONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    const SENSE_UA: [u8; 18] = [0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0, 0, 0, 0, 0];

    #[test]
    fn arq_fills_the_20_byte_area() {
        let mut scb = [0xAAu8; 32];
        let st = fill(&mut scb, ffi::STATUS_CHECK, &SENSE_UA);
        assert_eq!(st, PktState::ARQ_DONE);
        assert_eq!(
            &scb[..4],
            &[2, 0, 0, 2],
            "status, rq status, rq reason, resid 20-18"
        );
        let rq_state = u32::from_ne_bytes(scb[4..8].try_into().unwrap());
        assert_eq!(
            rq_state, 0x1f,
            "GOT_BUS|GOT_TARGET|SENT_CMD|XFERRED_DATA|GOT_STATUS"
        );
        assert_eq!(&scb[12..30], &SENSE_UA);
        assert_eq!(&scb[30..32], &[0, 0], "the unused sense bytes are cleared");
    }

    #[test]
    fn arq_never_copies_more_than_fits() {
        let sense: vec::Vec<u8> = (0..96).collect();
        let mut scb = [0u8; 32];
        assert_eq!(
            fill(&mut scb, ffi::STATUS_CHECK, &sense),
            PktState::ARQ_DONE
        );
        assert_eq!(&scb[12..32], &sense[..20]);
        assert_eq!(scb[3], 0);
        // Extended sense: 12 + 64 bytes of room.
        let mut scb = vec![0u8; 76];
        let st = fill(&mut scb, ffi::STATUS_CHECK, &sense);
        assert_eq!(st, PktState::ARQ_DONE | PktState::XARQ_DONE);
        assert_eq!(&scb[12..76], &sense[..64]);
        assert_eq!(scb[3] as usize, 252 - 64);
        let rq_state = u32::from_ne_bytes(scb[4..8].try_into().unwrap());
        assert!(rq_state & PktState::XARQ_DONE.bits() != 0);
    }

    #[test]
    fn small_status_areas_get_the_status_byte_only() {
        let mut scb = [0u8; 1];
        assert_eq!(
            fill(&mut scb, ffi::STATUS_CHECK, &SENSE_UA),
            PktState::empty()
        );
        assert_eq!(scb, [2]);
        let mut none: [u8; 0] = [];
        assert_eq!(
            fill(&mut none, ffi::STATUS_CHECK, &SENSE_UA),
            PktState::empty()
        );
        let mut scb = [9u8; 32];
        assert_eq!(fill(&mut scb, ffi::STATUS_GOOD, &[]), PktState::empty());
        assert_eq!(scb[0], 0);
    }
}
