//! The emulated illumos DDI: every kernel function the driver may import,
//! as `#[unsafe(no_mangle)] extern "C"` definitions with the illumos
//! signatures, implemented on the [`crate::machine::Machine`].
//!
//! It is strict where the real kernel is lenient or silent: DMA memory
//! reaches the device only on `ddi_dma_sync(FORDEV)` (and comes back only
//! on `FORCPU`), handles are validated, sleeping in interrupt context, a
//! lock held across `scsi_hba_pkt_comp` and other broken rules are
//! recorded as violations that fail the test, and every resource is
//! counted so that a leak at detach is seen.

pub mod acc;
pub mod cpu;
pub mod devinfo;
pub mod dma;
pub mod fm;
pub mod intr;
pub mod kmem;
pub mod kstat;
pub mod log;
pub mod modctl;
pub mod panic;
pub mod retpoline;
pub mod sdt;
pub mod symbols;
pub mod sync;
pub mod taskq;
pub mod time;

use crate::machine::{self, Machine};
use std::sync::Arc;

/// Records a violation against the current machine (or, without one, on
/// stderr and in the global list).
pub fn violation(what: impl Into<String>) {
    let what = what.into();
    match machine::current() {
        Some(m) => m.violation(what),
        None => {
            eprintln!("rvscsi-emu: VIOLATION (no machine): {what}");
            machine::lock(&ORPHAN_VIOLATIONS).push(what);
        }
    }
}

/// Violations recorded without a current machine.
pub static ORPHAN_VIOLATIONS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The current machine, or a violation for a DDI call made outside any.
pub fn current_or_violation(func: &str) -> Option<Arc<Machine>> {
    let m = machine::current();
    if m.is_none() {
        violation(format!("{func} called outside any machine's context"));
    }
    m
}
