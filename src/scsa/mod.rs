//! The SCSA side of an HBA, independent of the device behind it: packet
//! flags, states and statistics, completion outcomes and how they are
//! written into a `scsi_pkt(9S)`, auto request sense, capabilities, unit
//! addresses. virtio-scsi and (later) pvscsi share all of it.

pub mod addr;
pub mod arq;
pub mod cap;
pub mod flags;
pub mod outcome;
pub mod pkt;

pub use flags::{PktFlags, PktState, PktStatistics};
pub use outcome::Outcome;
