//! VMware PVSCSI: the device-specific half of an HBA, for the
//! device-independent core (`src/hba/`, being written) to drive.
//!
//! **Status: NOT attached to anything yet.** This module has the device's
//! registers, wire formats, ring discipline, completion mapping, message
//! decoding and feature-probing decisions, each unit-tested, and a
//! wire-format test against QEMU's model (test/emu `tests/pvscsi_wire.rs`).
//! There is no attach, no interrupt handler, no `tran_*` glue and no
//! implementation of the core's HBA trait yet; the driver does not bind
//! `pci15ad,7c0`.
//!
//! Layers, bottom to top:
//! - [`regs`]: BAR 0 offsets, interrupt bits, the command numbers and
//!   their payloads ([`regs::Command`] → dwords for COMMAND_DATA), the
//!   doorbell choice ([`regs::doorbell_for`], [`regs::kick_needed`]) and a
//!   typed accessor ([`regs::Regs`]) over [`crate::ddi::regs::RegMap`].
//! - [`wire`]: `#[repr(C)]` mirrors of the rings-state page and the
//!   request, completion, message and SG descriptors with compile-time
//!   layout assertions; [`wire::encode_request`] (direction from the DMA
//!   binding only, never past the SG page) and completion/message decoders.
//! - [`ring`]: ring geometry ([`ring::Geometry`], power-of-two page counts
//!   only), and [`ring::Rings`]: the three rings over
//!   [`crate::shmem::SharedMem`], the context table, flow control, and the
//!   validation of every device-written index and completion (typed
//!   verdicts: [`ring::Reap`], [`ring::BadCompletion`], [`ring::MsgWindow`]).
//! - [`status`]: host status + SCSI status + dataLen → [`crate::scsa::Outcome`]
//!   and the valid sense length (ARQ itself is [`crate::scsa::arq`]).
//! - [`msg`]: device added/removed messages → target-map actions, and when
//!   to rescan everything.
//! - [`probe`]: message ring, request-call threshold and target count
//!   decisions from what the device answered.
//!
//! Where the facts come from (details and measurements:
//! `shared/notes/pvscsi.md`): register offsets, command numbers, structure
//! layouts and `BTSTAT_*` codes are VMware's `pvscsi.h`, shipped with Linux
//! (`drivers/scsi/vmw_pvscsi.h`), FreeBSD (`sys/dev/vmware/pvscsi/pvscsi.h`,
//! which adds GET_MAX_TARGETS) and illumos; QEMU 10.0's behaviour
//! (`hw/scsi/vmw_pvscsi.c`: dataLen never written, DATARUN for any
//! residual, no power-of-two check in SETUP_RINGS, the lost command on a
//! contradicting direction flag, max_target 64, the dropped messages) was
//! read there and measured with the qtest probes in
//! `shared/reference/qtest-probes/pvscsi_probe*.py`. Choices that differ
//! from the other drivers are argued where they are made.

pub mod cmd;
pub mod device;
pub mod msg;
pub mod probe;
pub mod queue;
pub mod regs;
pub mod ring;
pub mod status;
pub mod wire;

pub use device::Pvscsi;

/// PCI vendor ID (VMware).
pub const PCI_VENDOR_VMWARE: u16 = 0x15AD;
/// PCI device ID of PVSCSI.
pub const PCI_DEVICE_PVSCSI: u16 = 0x07C0;
