//! The virtio-scsi device family (virtio 1.2 §5.6) on the HBA core
//! (`crate::hba`).
//!
//! - [`proto`]: wire formats and the response -> SCSA mapping.
//! - [`config`]: device configuration and the limits derived from it.
//! - [`cmd`]: the virtio-scsi part of each command (request header,
//!   response, indirect table) and how it is written and read.
//! - [`ring`]: a request queue's split virtqueue on the core.
//! - [`device`]: attach, device (re)initialization, interrupts and their
//!   routing, and the `Family` implementation.
//! - [`vectors`]: which MSI-X vector serves which source.
//! - [`tmf`]: task management on the control queue.
//! - [`events`]: the event queue and what its events ask of the core.
//!
//! # Locks and contexts
//!
//! The request-queue locks are the core's. The control queue lock
//! serializes task management (thread context only; it polls, and is held
//! across the seconds a TMF may take, so nothing reachable from an
//! interrupt handler takes it). The event queue lock has the interrupt
//! priority (the handler of vector 0 services events).

pub mod cmd;
pub mod config;
pub mod device;
pub mod events;
pub mod proto;
pub mod ring;
pub mod tmf;
pub mod vectors;

pub use device::VioScsi;
