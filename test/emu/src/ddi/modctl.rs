//! The module framework a driver's `_init(9E)`, `_fini(9E)` and `_info(9E)`
//! talk to: `mod_install(9F)`, `mod_remove(9F)`, `mod_info(9F)`, the
//! kernel's `mod_driverops`, and the `nodev`/`nulldev` placeholders of
//! `dev_ops(9S)`.
//!
//! Strict as modctl.c is: a linkage must be `MODREV_1` with a `modldrv`
//! whose `drv_modops` is `&mod_driverops` and whose `dev_ops` is
//! `DEVO_REV`, with attach and detach; a module is installed once and
//! cannot be removed while an instance of its driver is attached (EBUSY).

use super::violation;
use crate::machine::lock;
use rvscsi::ffi::{self, dev_ops, modldrv, modlinkage};
use std::ffi::{c_int, c_void};
use std::sync::Mutex;

/// `EBUSY`, `EINVAL`, `ENXIO` (sys/errno.h).
pub const EBUSY: c_int = 16;
/// `EINVAL`
pub const EINVAL: c_int = 22;
/// `ENXIO`
pub const ENXIO: c_int = 6;

/// The kernel's `struct mod_ops` for drivers: only its address matters to
/// a driver (modldrv(9S) `drv_modops = &mod_driverops`).
#[repr(C)]
pub struct ModOps {
    _install: usize,
    _remove: usize,
    _info: usize,
}

/// `mod_driverops`
#[unsafe(no_mangle)]
pub static mod_driverops: ModOps = ModOps {
    _install: 0,
    _remove: 0,
    _info: 0,
};

/// An installed driver module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Installed {
    /// Its `struct modlinkage`.
    pub linkage: usize,
    /// Its `struct dev_ops`.
    pub dev_ops: usize,
    /// Instances attached through it (the bed counts them).
    pub attached: usize,
}

static INSTALLED: Mutex<Vec<Installed>> = Mutex::new(Vec::new());

/// The driver of a linkage, after checking it as `mod_install` does.
///
/// # Safety
/// `modlp` is null or points to a `struct modlinkage`.
unsafe fn driver_of(modlp: *mut modlinkage, func: &str) -> Result<*mut dev_ops, String> {
    // SAFETY: guaranteed by the caller.
    let Some(ml) = (unsafe { modlp.as_ref() }) else {
        return Err(format!("{func}: null modlinkage"));
    };
    if ml.ml_rev != ffi::MODREV_1 {
        return Err(format!("{func}: ml_rev {} is not MODREV_1", ml.ml_rev));
    }
    let md = ml.ml_linkage[0].cast::<modldrv>();
    // SAFETY: a driver's linkage points to its modldrv (modlinkage(9S)).
    let Some(md) = (unsafe { md.as_ref() }) else {
        return Err(format!("{func}: ml_linkage[0] is null"));
    };
    if !ml.ml_linkage[1].is_null() {
        return Err(format!("{func}: more than one linkage (a driver has one)"));
    }
    if !std::ptr::eq(md.drv_modops.cast_const().cast::<ModOps>(), &mod_driverops) {
        return Err(format!("{func}: drv_modops is not &mod_driverops"));
    }
    // SAFETY: modldrv(9S) drv_dev_ops.
    let Some(ops) = (unsafe { md.drv_dev_ops.as_ref() }) else {
        return Err(format!("{func}: drv_dev_ops is null"));
    };
    if ops.devo_rev != ffi::DEVO_REV {
        return Err(format!("{func}: devo_rev {} is not DEVO_REV", ops.devo_rev));
    }
    if ops.devo_attach.is_none() || ops.devo_detach.is_none() {
        return Err(format!("{func}: dev_ops without attach or detach"));
    }
    if md.drv_linkinfo.is_null() {
        return Err(format!("{func}: drv_linkinfo is null"));
    }
    Ok(md.drv_dev_ops)
}

/// `mod_install(9F)`
///
/// # Safety
/// `modlp` is the module's `struct modlinkage`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mod_install(modlp: *mut modlinkage) -> c_int {
    let _kernel = crate::meter::kernel();
    // SAFETY: guaranteed by the caller.
    let ops = match unsafe { driver_of(modlp, "mod_install") } {
        Ok(o) => o,
        Err(e) => {
            violation(e);
            return EINVAL;
        }
    };
    // SAFETY: checked above.
    if unsafe { (*ops).devo_bus_ops.is_null() } {
        violation("mod_install: an HBA's dev_ops has no bus_ops (scsi_hba_init not called first)");
        return EINVAL;
    }
    let mut g = lock(&INSTALLED);
    if g.iter().any(|m| m.linkage == modlp as usize) {
        violation("mod_install of a module already installed");
        return EBUSY;
    }
    g.push(Installed {
        linkage: modlp as usize,
        dev_ops: ops as usize,
        attached: 0,
    });
    0
}

/// `mod_remove(9F)`: EBUSY while an instance is attached.
///
/// # Safety
/// `modlp` is the module's `struct modlinkage`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mod_remove(modlp: *mut modlinkage) -> c_int {
    let _kernel = crate::meter::kernel();
    let mut g = lock(&INSTALLED);
    let Some(i) = g.iter().position(|m| m.linkage == modlp as usize) else {
        violation("mod_remove of a module that is not installed");
        return EINVAL;
    };
    if g[i].attached > 0 {
        return EBUSY;
    }
    g.remove(i);
    0
}

/// `mod_info(9F)`: non-zero on success. The emulation checks the linkage
/// and leaves `modinfop` (whose layout only modctl knows) alone.
///
/// # Safety
/// `modlp` is the module's `struct modlinkage`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mod_info(modlp: *mut modlinkage, modinfop: *mut c_void) -> c_int {
    let _kernel = crate::meter::kernel();
    if modinfop.is_null() {
        violation("mod_info with a null modinfo");
        return 0;
    }
    // SAFETY: guaranteed by the caller.
    match unsafe { driver_of(modlp, "mod_info") } {
        Ok(_) => 1,
        Err(e) => {
            violation(e);
            0
        }
    }
}

/// `nodev`: the entry point a driver does not provide.
#[unsafe(no_mangle)]
pub extern "C" fn nodev() -> c_int {
    let _kernel = crate::meter::kernel();
    ENXIO
}

/// `nulldev`: the entry point that does nothing and succeeds.
#[unsafe(no_mangle)]
pub extern "C" fn nulldev() -> c_int {
    let _kernel = crate::meter::kernel();
    0
}

/// The installed module whose linkage is `modlp`.
pub fn installed(modlp: *const modlinkage) -> Option<Installed> {
    lock(&INSTALLED)
        .iter()
        .find(|m| m.linkage == modlp as usize)
        .copied()
}

/// Every installed module.
pub fn installed_list() -> Vec<Installed> {
    lock(&INSTALLED).clone()
}

/// Counts an instance attached (`+1`) or detached (`-1`) through the
/// module whose `dev_ops` is `ops`.
pub fn count_instance(ops: *const dev_ops, delta: isize) {
    let mut g = lock(&INSTALLED);
    match g.iter_mut().find(|m| m.dev_ops == ops as usize) {
        Some(m) => m.attached = m.attached.saturating_add_signed(delta),
        None => violation("an instance attached through a module that is not installed"),
    }
}
