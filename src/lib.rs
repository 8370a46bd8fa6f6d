//! rvscsi: an illumos SCSI HBA driver for virtio-scsi (and, later, VMware
//! pvscsi), written in `no_std` Rust.
//!
//! Architecture, bottom to top:
//! - [`ffi`]: the raw kernel boundary — `#[repr(C)]` mirrors of the illumos
//!   structures, constants and `extern "C"` DDI declarations.
//! - [`ddi`]: safe owners of DDI resources (DMA memory, register maps,
//!   interrupts, locks, task queues, timers).
//! - [`shmem`] and [`virtio`]: memory shared with a device, the split
//!   virtqueue, the virtio-pci transports.
//! - [`scsa`]: the SCSA packet layer (flags, states, reasons, capabilities,
//!   auto request sense, unit addresses), independent of the device behind it.
//! - [`hba`]: the device-independent HBA core: packet life cycle,
//!   `tran_start` checks, completion, polling, timeouts and the recovery
//!   ladder, the work task, discovery, statistics; and the `Family` trait
//!   a device family implements.
//! - [`vioscsi`]: the virtio-scsi family (its wire formats, rings, task
//!   management, events, interrupt routing).
//! - `entry`: the `extern "C"` entry points the C shim installs in
//!   `scsi_hba_tran(9S)` and `dev_ops(9S)`; [`contract`] proves at compile
//!   time that they match the shim's header (`c-shim/rvscsi.h`).
//! - [`probes`]: DTrace SDT probes; [`runtime`]: the kernel allocator and
//!   panic handler.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod contract;
pub mod ddi;
pub mod entry;
pub mod ffi;
pub mod hba;
pub mod probes;
pub mod pvscsi;
pub mod runtime;
pub mod scsa;
pub mod shmem;
pub mod vioscsi;
pub mod virtio;
