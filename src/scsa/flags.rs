//! Bit sets of `scsi_pkt(9S)`: `pkt_flags`, `pkt_state`, `pkt_statistics`.
//! Values from `sys/scsi/scsi_pkt.h` (checked against the measured tables
//! by a host test).

use bitflags::bitflags;

bitflags! {
    /// `pkt_flags`
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PktFlags: u32 {
        /// Run to completion without interrupts (polled).
        const NOINTR = 0x0001;
        /// No disconnects.
        const NODISCON = 0x0002;
        /// No parity.
        const NOPARITY = 0x0008;
        /// ACA task attribute.
        const ACA = 0x0100;
        /// A request sense command.
        const SENSING = 0x0400;
        /// Head-of-queue tag.
        const HTAG = 0x1000;
        /// Ordered tag.
        const OTAG = 0x2000;
        /// Simple tag.
        const STAG = 0x4000;
        /// Head of the HBA's queue.
        const HEAD = 0x8000;
        /// Do not log errors.
        const SILENT = 0x0001_0000;
        /// Diagnose, do not retry.
        const DIAGNOSE = 0x0002_0000;
        /// The framework has called the completion routine.
        const PKT_COMP_CALLED = 0x2000_0000;
        const _ = !0;
    }
}

bitflags! {
    /// `pkt_state`: how far the command got.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PktState: u32 {
        /// The bus was arbitrated for.
        const GOT_BUS = 0x01;
        /// The target was selected.
        const GOT_TARGET = 0x02;
        /// The command was sent.
        const SENT_CMD = 0x04;
        /// Data was transferred.
        const XFERRED_DATA = 0x08;
        /// Status was received.
        const GOT_STATUS = 0x10;
        /// Auto request sense was done.
        const ARQ_DONE = 0x20;
        /// Extended (more than 20 bytes) auto request sense was done.
        const XARQ_DONE = 0x40;
        const _ = !0;
    }
}

bitflags! {
    /// `pkt_statistics`: what happened to the command on the way.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PktStatistics: u32 {
        /// Disconnected.
        const DISCON = 0x01;
        /// Synchronous.
        const SYNC = 0x02;
        /// Parity error.
        const PERR = 0x04;
        /// The bus (here: the whole device) was reset.
        const BUS_RESET = 0x08;
        /// The target or LUN was reset.
        const DEV_RESET = 0x10;
        /// The command was aborted.
        const ABORTED = 0x20;
        /// The command timed out.
        const TIMEOUT = 0x40;
        /// The command was terminated.
        const TERMINATED = 0x80;
        const _ = !0;
    }
}

/// The data direction of a bound packet, from `pkt_dma_flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// No data phase.
    None,
    /// The device writes memory (`DDI_DMA_READ`).
    In,
    /// The device reads memory (`DDI_DMA_WRITE`).
    Out,
}

impl DataDir {
    /// From `pkt_dma_flags` and `pkt_numcookies`; `None` (the Option) when
    /// both directions are set, which no single virtio-scsi or SPI data
    /// phase can do.
    pub fn from_dma_flags(dma_flags: u32, ncookies: u32) -> Option<DataDir> {
        use crate::ffi::{DDI_DMA_READ, DDI_DMA_WRITE};
        if ncookies == 0 {
            return Some(DataDir::None);
        }
        match (
            dma_flags & DDI_DMA_READ != 0,
            dma_flags & DDI_DMA_WRITE != 0,
        ) {
            (true, false) => Some(DataDir::In),
            (false, true) => Some(DataDir::Out),
            _ => None,
        }
    }
}
