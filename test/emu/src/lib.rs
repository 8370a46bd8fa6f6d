//! A strict emulation of the illumos DDI and SCSA framework on top of QEMU,
//! so that the rvscsi driver — the same code, down to its DDI calls, that
//! is linked into the kernel module — runs on Linux against QEMU's real
//! device models.
//!
//! - [`machine`]: QEMU over qtest, guest RAM, the HBA's PCI function,
//!   interrupt delivery, counters.
//! - [`ddi`]: the DDI functions the driver imports (`extern "C"`), strict.
//! - [`scsa`]: the SCSA framework around the HBA and the target-driver API.
//! - [`memdev`]: an in-process virtio-scsi device on RAM disks, for
//!   measuring the driver's own CPU cost.
//! - [`msi`]: MSI/MSI-X messages counted one by one (QEMU's APIC trace,
//!   the in-process device's own count).
//! - [`meter`]: the driver's own CPU time and instructions, apart from
//!   the emulated kernel's.
//! - [`bed`]: attach/detach orchestration and the leak check.
//!
//! The set of DDI functions defined here is the set the kernel object may
//! import (the module check compares them).

pub mod bed;
pub mod ddi;
pub mod faults;
pub mod machine;
pub mod memdev;
pub mod meter;
pub mod msi;
pub mod scsa;

pub use bed::{Bed, BedConfig, BedError, DetachReport, DriverBinding, LibraryBinding};
pub use machine::{Backend, Disk, HbaFamily, Machine, MachineConfig, VirtioPci};
pub use scsa::buf::DataBuf;
pub use scsa::packet::{Device, InitArgs, Packet, PktResult};
pub use scsa::tgtmap::{TargetDriver, TargetInstance};
