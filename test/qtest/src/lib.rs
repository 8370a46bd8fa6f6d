//! QEMU launcher and qtest/QMP client for the rvscsi test bed.
//!
//! The rvscsi driver is tested on Linux against QEMU's real device models
//! (virtio-scsi, pvscsi) without booting any guest: the test itself plays the CPU.
//!
//! # qtest
//!
//! qtest is QEMU's device test protocol (`-qtest unix:SOCK`): a line-based socket
//! protocol through which a client performs port I/O (`inl`, `outw`...), guest-physical
//! memory and MMIO accesses (`readq`, `writel`, `b64read`, `b64write`, `memset`) and
//! intercepts interrupt lines (`irq_intercept_in ioapic`, after which QEMU reports
//! `IRQ raise N` / `IRQ lower N` asynchronously). Every access goes through QEMU's
//! memory API exactly as a vCPU access would, so devices see what a driver on real
//! hardware would make them see, and each access is countable (they would be VM exits).
//! [`QTest`] is that client; it is shared between threads and bounds every wait.
//!
//! # Why `-accel tcg -S`
//!
//! Upstream pairs `-qtest` with `-accel qtest`, but Debian's QEMU does not ship the
//! qtest accelerator module, so `-accel qtest` fails. The qtest protocol server itself
//! is built into every binary, so we use `-accel tcg -S`: TCG is available everywhere,
//! and `-S` keeps the vCPU stopped forever, so no firmware runs, nothing touches the
//! devices or RAM behind the test's back, and the test assigns PCI BARs itself
//! ([`Pci`]). The only qtest command missing in this mode is `clock_step` (the virtual
//! clock is not under the test's control).
//!
//! # Pieces
//!
//! * [`Qemu`] / [`QemuConfig`]: starts QEMU on private Unix sockets, connects qtest and
//!   QMP, and always stops it again (QMP `quit`, SIGTERM, SIGKILL; plus
//!   `PR_SET_PDEATHSIG` so QEMU dies with the test process).
//! * [`QTest`]: the protocol client (scalar and bulk accesses, [`QTest::batch`]
//!   pipelining, IRQ tracking, traffic counters).
//! * [`Pci`]: type-1 config space access, bus scan, BAR sizing/assignment, capability
//!   walk.
//!
//! ```no_run
//! use rvscsi_qtest::{Pci, Qemu, QemuConfig};
//!
//! let qemu = Qemu::launch(QemuConfig::default().device("virtio-scsi-pci,id=vs0"))?;
//! let qt = qemu.qtest();
//! let pci = Pci::new(qt);
//! let f = pci.find(0x1af4, 0x1004)?.expect("virtio-scsi");
//! let bars = pci.assign_bars(f.bdf, 0xE000_0000, 0xC000)?;
//! let host_features = qt.inl(bars[0].2 as u16)?;
//! # let _ = host_features;
//! # Ok::<(), rvscsi_qtest::Error>(())
//! ```

mod bus;
mod error;
mod line;
mod pci;
mod qemu;
mod qmp;
mod qtest;

pub use bus::Bus;
pub use error::Error;
pub use pci::{
    Bar, BarKind, Bdf, PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, Pci, PciFunction,
};
pub use qemu::{Qemu, QemuConfig};
pub use qtest::{Op, QTest, QtestStats};

/// Re-exported for [`Qemu::qmp`] arguments and results.
pub use serde_json::{Value, from_str, json};
