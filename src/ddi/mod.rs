//! Safe wrappers over the illumos DDI: each owns one kernel resource and
//! releases it in `Drop`, so the device logic above never sees a raw handle.
//!
//! Calling context is documented per wrapper; as a rule, constructors may
//! sleep (attach, detach, taskq context) and accessors may be used from
//! interrupt context.

pub mod cpu;
pub mod dev;
pub mod dma;
pub mod fm;
pub mod intr;
pub mod kstat;
pub mod log;
pub mod pci;
pub mod regs;
pub mod sync;
pub mod taskq;
pub mod tgtmap;
pub mod time;

pub use dev::Dip;

/// Why a DDI call failed: the function that failed and what it returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DdiError {
    /// The DDI function that failed.
    pub func: &'static str,
    /// Its return value.
    pub code: i32,
}

impl DdiError {
    /// An error from `func` returning `code`.
    pub const fn new(func: &'static str, code: i32) -> Self {
        Self { func, code }
    }
}

impl core::fmt::Display for DdiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} failed ({})", self.func, self.code)
    }
}

/// Whether an allocation may sleep waiting for resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sleep {
    /// May block (attach, taskq, `KM_SLEEP` constructors).
    Yes,
    /// Must not block (interrupt context, `KM_NOSLEEP` constructors).
    No,
}

impl Sleep {
    /// From a `kmflag` argument (`KM_SLEEP` / `KM_NOSLEEP`).
    pub fn from_kmflag(kmflag: i32) -> Self {
        if kmflag & crate::ffi::KM_NOSLEEP != 0 {
            Sleep::No
        } else {
            Sleep::Yes
        }
    }

    pub(crate) fn dma_callback(self) -> crate::ffi::ddi_callback_t {
        crate::ffi::ddi_callback_t(match self {
            Sleep::Yes => crate::ffi::DDI_DMA_SLEEP,
            Sleep::No => crate::ffi::DDI_DMA_DONTWAIT,
        })
    }
}
