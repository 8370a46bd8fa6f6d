//! `rvscsi-sim`: the rvscsi driver attached to QEMU's virtio-scsi device
//! model through the DDI emulation, with an sd-like target driver on top,
//! and the `format` and `dd` commands an illumos administrator would use.

pub mod bench;
pub mod cli;
pub mod load;
pub mod scsi;
pub mod sd;
pub mod testkit;
