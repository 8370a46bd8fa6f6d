//! The driver's raw illumos FFI: `#[repr(C)]` mirrors of the structures it
//! touches, the constants it uses and the kernel functions it calls — the
//! project's own equivalent of a `*-sys` crate (the `illumos-sys-hdrs` crate is
//! not published and covers no SCSI, DMA, register, interrupt or PCI-config
//! API). C names are kept so that every item can be checked against the
//! illumos headers.
//!
//! Nothing outside `ffi`, `ddi` (the safe wrappers), `virtio::ring` (shared
//! memory) and `entry` (the `extern "C"` entry points) touches these raw items.

pub mod consts;
pub mod funcs;
pub mod types;

pub use consts::*;
pub use funcs::*;
pub use types::*;
