//! The virtio-scsi HBA (virtio 1.2 §5.6) on the SCSA packet layer.
//!
//! - [`proto`]: wire formats and the response -> SCSA mapping.
//! - [`config`]: device configuration and the limits derived from it.
//! - [`cmd`]: per-packet state and its ownership protocol.
//! - [`hba`]: attach, device (re)initialization, detach, quiesce.
//! - [`io`]: submission, completion, polling.
//! - [`recovery`]: task management, timeouts, device reset.
//! - [`events`]: the event queue, discovery and the work task.
//!
//! # Locks and contexts
//!
//! Each request queue has its own lock (interrupt priority), held only
//! while its ring is touched: never across a device notification, a DMA
//! sync of command memory, or `scsi_hba_pkt_comp(9F)`. The control queue
//! lock serializes task management (thread context only; it polls). The
//! event queue lock and the work lock are taken from interrupt context.
//! `tran_start(9E)` may be called from interrupt context (a target
//! driver's completion routine), so nothing on the I/O path sleeps or
//! allocates.

pub mod cmd;
pub mod config;
pub mod events;
pub mod hba;
pub mod io;
pub mod proto;
pub mod recovery;
pub mod vectors;

pub use hba::{Lun, VioScsi};
