//! How a command ended, in SCSA terms, and writing that into the packet.

use super::flags::{PktState, PktStatistics};
use crate::ffi;

/// Everything `tran_start(9E)` promises the target driver about a finished
/// command, except the sense data (see [`super::arq`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `pkt_reason` (`CMD_*`).
    pub reason: u8,
    /// `pkt_state`.
    pub state: PktState,
    /// `pkt_statistics`.
    pub statistics: PktStatistics,
    /// `pkt_resid`: bytes of this transfer not moved.
    pub resid: usize,
    /// The SCSI status byte (meaningful with `GOT_STATUS`).
    pub status: u8,
}

/// State bits of a command that reached the target and got status.
pub const STATE_COMPLETED: PktState = PktState::GOT_BUS
    .union(PktState::GOT_TARGET)
    .union(PktState::SENT_CMD)
    .union(PktState::GOT_STATUS);

/// State bits of a command that reached the target but ended without
/// status (aborted, reset).
pub const STATE_SENT: PktState = PktState::GOT_BUS
    .union(PktState::GOT_TARGET)
    .union(PktState::SENT_CMD);

impl Outcome {
    /// A command that never reached a target (transport error of kind
    /// `reason`), nothing transferred.
    pub fn failed(reason: u8, xfer: usize) -> Self {
        Self {
            reason,
            state: PktState::empty(),
            statistics: PktStatistics::empty(),
            resid: xfer,
            status: 0,
        }
    }

    /// The outcome of a command whose deadline passed (`timed_out`):
    /// however the device or a reset ended it, the target driver learns
    /// `CMD_TIMEOUT` + `STAT_TIMEOUT`, with the recovery's statistics kept.
    /// Unchanged otherwise. Every family's mapping and the core's reset
    /// ending go through this one rule.
    pub fn timed_out(mut self, timed_out: bool) -> Self {
        if timed_out {
            self.reason = ffi::CMD_TIMEOUT;
            self.statistics |= PktStatistics::TIMEOUT;
        }
        self
    }

    /// Whether the target returned CHECK CONDITION.
    pub fn is_check_condition(&self) -> bool {
        self.reason == ffi::CMD_CMPLT
            && self.state.contains(PktState::GOT_STATUS)
            && self.status & ffi::STATUS_MASK == ffi::STATUS_CHECK
    }
}
