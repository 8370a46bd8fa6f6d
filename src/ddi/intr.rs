//! Interrupts: `ddi_intr_alloc(9F)` and friends, and interrupt resource
//! management (IRM, `ddi_cb_register(9F)` with `DDI_CB_FLAG_INTR`).
//!
//! The driver asks for MSI-X first, then MSI, then a fixed (INTx)
//! interrupt, in the order given by the caller, taking what the system
//! grants. What illumos grants (illumos-gate `common/os/ddi_intr.c`
//! `ddi_intr_alloc`, `ddi_intr_impl.c` `i_ddi_intr_get_limit`,
//! `ddi_intr_irm.c`):
//!
//! - without an IRM callback, at most `ddi_msix_alloc_limit` MSI-X vectors
//!   on x86: 2 as compiled (`DDI_DEFAULT_MSIX_ALLOC`), raised to 8
//!   (`DDI_MIN_MSIX_ALLOC`) by the apix PSM when it creates its IRM pool
//!   (`i86pc/io/apix/apix_irm.c` `apix_irm_init`); MSI at most 2;
//! - with an IRM callback registered before the first `ddi_intr_alloc`,
//!   and an IRM pool (apix; the PCI nexus hands it out for MSI and MSI-X,
//!   `pci_common_intr_ops` `DDI_INTROP_GETPOOL`), as many MSI-X vectors as
//!   the device has and the pool can give; the pool may later take some
//!   back (`DDI_CB_INTR_REMOVE`, never below its default size, at least 8)
//!   or give more (`DDI_CB_INTR_ADD`), and the callback must follow
//!   (release what it lost: `ddi_cb_register(9F)`);
//! - under pcplusmp (no pool) the callback changes nothing: 2 MSI-X vectors.
//!
//! The callback runs on the IRM balance thread (kernel context, which may
//! block) holding the pool's lock; `ddi_intr_free` of a device's last vector
//! and `ddi_cb_unregister` take that lock, so neither may be called from
//! the callback, and the callback must not wait for a thread that may be
//! making those calls. An owner that frees every vector before unregistering
//! (this object's `Drop`) cannot receive a callback after the last free
//! returns: `i_ddi_irm_remove` waits on the pool lock for a running balance
//! and removes the request it would notify.

use super::{DdiError, Dip};
use crate::ffi;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicPtr, Ordering};

/// An interrupt type (`DDI_INTR_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntrKind {
    /// `DDI_INTR_TYPE_MSIX`
    MsiX,
    /// `DDI_INTR_TYPE_MSI`
    Msi,
    /// `DDI_INTR_TYPE_FIXED` (legacy INTx)
    Fixed,
}

impl IntrKind {
    fn ddi_type(self) -> i32 {
        match self {
            IntrKind::MsiX => ffi::DDI_INTR_TYPE_MSIX,
            IntrKind::Msi => ffi::DDI_INTR_TYPE_MSI,
            IntrKind::Fixed => ffi::DDI_INTR_TYPE_FIXED,
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            IntrKind::MsiX => "MSI-X",
            IntrKind::Msi => "MSI",
            IntrKind::Fixed => "fixed",
        }
    }
}

/// A change of the interrupts available to the driver, as an IRM callback
/// reports it (`DDI_CB_INTR_ADD` / `DDI_CB_INTR_REMOVE`, the count in the
/// callback argument, ddi_cb_register(9F)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrmChange {
    /// This many more are available.
    Add(u32),
    /// This many fewer are available: release the excess.
    Remove(u32),
}

impl IrmChange {
    /// Decodes a callback's action and argument; `None` for an action the
    /// driver does not know (it answers `DDI_ENOTSUP`).
    pub fn decode(action: c_int, cbarg: *mut c_void) -> Option<IrmChange> {
        // The argument is an integer cast to a pointer.
        let n = u32::try_from(cbarg as usize).unwrap_or(u32::MAX);
        match action {
            ffi::DDI_CB_INTR_ADD => Some(IrmChange::Add(n)),
            ffi::DDI_CB_INTR_REMOVE => Some(IrmChange::Remove(n)),
            _ => None,
        }
    }
}

/// What an IRM callback's first argument points at: the object that owns
/// the interrupts, once it exists (the callback can come as soon as it is
/// registered, before the owner is built).
pub struct IrmLink {
    owner: AtomicPtr<c_void>,
}

impl IrmLink {
    /// The owner given to [`Interrupts::link_irm`], null before.
    pub fn owner(&self) -> *mut c_void {
        self.owner.load(Ordering::Acquire)
    }
}

/// A `ddi_cb_register(9F)` registration with `DDI_CB_FLAG_INTR`;
/// unregistered when dropped.
struct IrmRegistration {
    hdl: ffi::ddi_cb_handle_t,
    /// Boxed: the kernel holds its address until unregistration.
    _link: Box<IrmLink>,
}

impl Drop for IrmRegistration {
    fn drop(&mut self) {
        // SAFETY: a handle ddi_cb_register returned, unregistered once.
        // The owner (Interrupts) frees its vectors before this runs, so
        // the kernel has no request left to notify (see the module docs).
        unsafe { ffi::ddi_cb_unregister(self.hdl) };
    }
}

/// Allocated interrupt vectors of one type, with their handlers.
pub struct Interrupts {
    dip: Dip,
    kind: IntrKind,
    /// Room for every vector the device has; the first `count` are ours.
    handles: Vec<ffi::ddi_intr_handle_t>,
    count: usize,
    with_handler: Vec<bool>,
    enabled: Vec<bool>,
    pri: u32,
    /// MSI's block enable (`DDI_INTR_FLAG_BLOCK`); then every vector is
    /// enabled and disabled together.
    block: bool,
    irm: Option<IrmRegistration>,
}

// SAFETY: interrupt handles are kernel objects usable from any thread; the
// owner serializes changes (attach, detach, the IRM callback) with a lock.
unsafe impl Send for Interrupts {}
// SAFETY: &self methods only read immutable fields or ask the kernel.
unsafe impl Sync for Interrupts {}

impl Interrupts {
    /// Allocates up to `want` vectors of the first type in `prefer` that
    /// both the device and the system support (MSI and fixed: one vector).
    ///
    /// With `irm`, the callback is registered (`DDI_CB_FLAG_INTR`) before
    /// MSI-X is allocated, so that the IRM pool grants what the device has
    /// rather than the static limit; its first argument is an [`IrmLink`].
    /// A registration the kernel refuses is not an error: the driver then
    /// works with the static grant.
    pub fn alloc(
        dip: Dip,
        prefer: &[IntrKind],
        want: usize,
        irm: Option<ffi::ddi_cb_func_t>,
    ) -> Result<Self, DdiError> {
        let mut supported = 0;
        // SAFETY: valid node, out-pointer.
        let rc = unsafe { ffi::ddi_intr_get_supported_types(dip.as_ptr(), &mut supported) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_intr_get_supported_types", rc));
        }
        let mut registration = None;
        if let Some(cb) = irm
            && prefer.contains(&IntrKind::MsiX)
            && supported & ffi::DDI_INTR_TYPE_MSIX != 0
        {
            registration = Self::register(dip, cb);
        }
        let mut last = DdiError::new("ddi_intr_get_supported_types", ffi::DDI_ENOTSUP);
        for &kind in prefer {
            if supported & kind.ddi_type() == 0 {
                continue;
            }
            match Self::alloc_kind(dip, kind, want) {
                Ok(mut i) => {
                    i.irm = registration;
                    return Ok(i);
                }
                Err(e) => last = e,
            }
        }
        Err(last) // `registration` drops: unregistered
    }

    fn register(dip: Dip, cb: ffi::ddi_cb_func_t) -> Option<IrmRegistration> {
        let link = Box::new(IrmLink {
            owner: AtomicPtr::new(core::ptr::null_mut()),
        });
        let mut hdl: ffi::ddi_cb_handle_t = core::ptr::null_mut();
        let arg1 = &*link as *const IrmLink as *mut c_void;
        // SAFETY: valid node, kernel (attach) context; `arg1` stays valid
        // until ddi_cb_unregister (the Box lives in the registration,
        // which unregisters before it is freed).
        let rc = unsafe {
            ffi::ddi_cb_register(
                dip.as_ptr(),
                ffi::DDI_CB_FLAG_INTR,
                cb,
                arg1,
                core::ptr::null_mut(),
                &mut hdl,
            )
        };
        (rc == ffi::DDI_SUCCESS).then_some(IrmRegistration { hdl, _link: link })
    }

    fn alloc_kind(dip: Dip, kind: IntrKind, want: usize) -> Result<Self, DdiError> {
        let typ = kind.ddi_type();
        let (mut nintrs, mut navail) = (0, 0);
        // SAFETY: valid node, out-pointers.
        let rc = unsafe { ffi::ddi_intr_get_nintrs(dip.as_ptr(), typ, &mut nintrs) };
        if rc != ffi::DDI_SUCCESS || nintrs < 1 {
            return Err(DdiError::new("ddi_intr_get_nintrs", rc));
        }
        // SAFETY: `dip` is the attached node (Dip's invariant) and `navail`
        // a live local the call writes once.
        let rc = unsafe { ffi::ddi_intr_get_navail(dip.as_ptr(), typ, &mut navail) };
        if rc != ffi::DDI_SUCCESS || navail < 1 {
            return Err(DdiError::new("ddi_intr_get_navail", rc));
        }
        // ddi_intr_alloc(9F): a count above the device's is DDI_EINVAL
        // whatever the behaviour; NORMAL takes what is available.
        let count = match kind {
            IntrKind::MsiX => want.clamp(1, nintrs as usize),
            IntrKind::Msi | IntrKind::Fixed => 1,
        };
        let room = nintrs as usize;
        let mut handles: Vec<ffi::ddi_intr_handle_t> = Vec::new();
        handles.resize(room, core::ptr::null_mut());
        let mut actual = 0;
        // SAFETY: handles has room for every vector of the device.
        let rc = unsafe {
            ffi::ddi_intr_alloc(
                dip.as_ptr(),
                handles.as_mut_ptr(),
                typ,
                0,
                count as i32,
                &mut actual,
                ffi::DDI_INTR_ALLOC_NORMAL,
            )
        };
        if rc != ffi::DDI_SUCCESS || actual < 1 {
            return Err(DdiError::new("ddi_intr_alloc", rc));
        }
        let mut me = Self {
            dip,
            kind,
            handles,
            count: (actual as usize).min(room),
            with_handler: alloc::vec![false; room],
            enabled: alloc::vec![false; room],
            pri: 0,
            block: false,
            irm: None,
        };
        let mut pri = 0;
        // SAFETY: handles[0] was allocated above.
        let rc = unsafe { ffi::ddi_intr_get_pri(me.handles[0], &mut pri) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_intr_get_pri", rc)); // Drop frees
        }
        me.pri = pri;
        let mut cap = 0;
        // SAFETY: handles[0] was allocated above and is not freed before
        // `me` drops; `cap` is a live local the call writes once.
        if unsafe { ffi::ddi_intr_get_cap(me.handles[0], &mut cap) } == ffi::DDI_SUCCESS {
            me.block = cap & ffi::DDI_INTR_FLAG_BLOCK != 0;
        }
        Ok(me)
    }

    /// Tells the IRM callback which object it serves (null: none yet).
    pub fn link_irm(&self, owner: *mut c_void) {
        if let Some(r) = &self.irm {
            r._link.owner.store(owner, Ordering::Release);
        }
    }

    /// Whether an IRM callback is registered.
    pub fn has_irm(&self) -> bool {
        self.irm.is_some()
    }

    /// Frees every vector past the first `n` (at least one stays).
    pub fn keep(&mut self, n: usize) {
        let n = n.max(1);
        while self.count > n {
            self.free_last();
        }
    }

    fn free_last(&mut self) {
        let Some(i) = self.count.checked_sub(1) else {
            return;
        };
        let h = self.handles[i];
        // SAFETY: an allocated handle; disabled and without a handler
        // before it is freed, freed once.
        unsafe {
            if self.enabled[i] {
                ffi::ddi_intr_disable(h);
            }
            if self.with_handler[i] {
                ffi::ddi_intr_remove_handler(h);
            }
            ffi::ddi_intr_free(h);
        }
        self.enabled[i] = false;
        self.with_handler[i] = false;
        self.handles[i] = core::ptr::null_mut();
        self.count = i;
    }

    /// The type granted.
    pub fn kind(&self) -> IntrKind {
        self.kind
    }

    /// Number of vectors held.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The interrupt priority, for `mutex_init` of locks the handlers take.
    pub fn priority(&self) -> u32 {
        self.pri
    }

    /// What the system lets the device hold now (`ddi_intr_get_navail(9F)`:
    /// for an IRM driver, its current grant), 0 if it will not say.
    pub fn available(&self) -> usize {
        let mut n = 0;
        // SAFETY: valid node, out-pointer.
        let rc =
            unsafe { ffi::ddi_intr_get_navail(self.dip.as_ptr(), self.kind.ddi_type(), &mut n) };
        if rc == ffi::DDI_SUCCESS {
            usize::try_from(n).unwrap_or(0)
        } else {
            0
        }
    }

    /// `ddi_intr_add_handler(9F)` for vector `index`.
    ///
    /// # Safety
    /// `arg1`/`arg2` must stay valid for `handler` until this object is
    /// dropped (which removes the handler), and `handler` must tolerate
    /// being called from interrupt context at any time after
    /// [`Self::enable`].
    pub unsafe fn add_handler(
        &mut self,
        index: usize,
        handler: ffi::ddi_intr_handler_t,
        arg1: *mut c_void,
        arg2: *mut c_void,
    ) -> Result<(), DdiError> {
        if index >= self.count {
            return Err(DdiError::new("ddi_intr_add_handler", ffi::DDI_EINVAL));
        }
        let h = self.handles[index];
        // SAFETY: allocated handle; the caller guarantees the arguments.
        let rc = unsafe { ffi::ddi_intr_add_handler(h, handler, arg1, arg2) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_intr_add_handler", rc));
        }
        self.with_handler[index] = true;
        Ok(())
    }

    /// Enables every vector not enabled yet (MSI with block enable: all at
    /// once).
    pub fn enable(&mut self) -> Result<(), DdiError> {
        if self.block {
            if self.enabled[..self.count].iter().all(|&e| e) {
                return Ok(());
            }
            // SAFETY: all handles allocated, count matches.
            let rc =
                unsafe { ffi::ddi_intr_block_enable(self.handles.as_mut_ptr(), self.count as i32) };
            if rc != ffi::DDI_SUCCESS {
                return Err(DdiError::new("ddi_intr_block_enable", rc));
            }
            self.enabled[..self.count].fill(true);
            return Ok(());
        }
        for i in 0..self.count {
            if self.enabled[i] {
                continue;
            }
            // SAFETY: allocated handle with its handler.
            let rc = unsafe { ffi::ddi_intr_enable(self.handles[i]) };
            if rc != ffi::DDI_SUCCESS {
                return Err(DdiError::new("ddi_intr_enable", rc));
            }
            self.enabled[i] = true;
        }
        Ok(())
    }

    /// Disables every vector; on return no handler is running or will run.
    pub fn disable(&mut self) {
        if self.block {
            if self.enabled[..self.count].iter().any(|&e| e) {
                // SAFETY: all handles allocated and enabled.
                unsafe {
                    ffi::ddi_intr_block_disable(self.handles.as_mut_ptr(), self.count as i32)
                };
            }
            self.enabled[..self.count].fill(false);
            return;
        }
        for i in 0..self.count {
            if self.enabled[i] {
                // SAFETY: allocated and enabled.
                unsafe { ffi::ddi_intr_disable(self.handles[i]) };
                self.enabled[i] = false;
            }
        }
    }

    /// Adds MSI-X vectors up to `to` (as many as the system gives), each
    /// with `handler(arg1, arg2_of(index))` and enabled; returns the count
    /// held. Kernel context (the IRM callback), not interrupt context.
    ///
    /// # Safety
    /// As [`Self::add_handler`], for every new vector.
    pub unsafe fn grow(
        &mut self,
        to: usize,
        handler: ffi::ddi_intr_handler_t,
        arg1: *mut c_void,
        arg2_of: impl Fn(usize) -> *mut c_void,
    ) -> Result<usize, DdiError> {
        let to = to.min(self.handles.len());
        if self.kind != IntrKind::MsiX || self.block || to <= self.count {
            return Ok(self.count);
        }
        let first = self.count;
        let mut actual = 0;
        // SAFETY: the array has room for every vector of the device; the
        // kernel fills handles[first..first + actual].
        let rc = unsafe {
            ffi::ddi_intr_alloc(
                self.dip.as_ptr(),
                self.handles.as_mut_ptr(),
                ffi::DDI_INTR_TYPE_MSIX,
                first as i32,
                (to - first) as i32,
                &mut actual,
                ffi::DDI_INTR_ALLOC_NORMAL,
            )
        };
        if rc != ffi::DDI_SUCCESS || actual < 1 {
            return Err(DdiError::new("ddi_intr_alloc", rc));
        }
        self.count = (first + actual as usize).min(self.handles.len());
        for i in first..self.count {
            // SAFETY: the caller's guarantee, per vector.
            let added = unsafe { self.add_handler(i, handler, arg1, arg2_of(i)) };
            let rc = match added {
                // SAFETY: allocated, with its handler.
                Ok(()) => unsafe { ffi::ddi_intr_enable(self.handles[i]) },
                Err(e) => e.code,
            };
            if rc != ffi::DDI_SUCCESS {
                // Give back this one and those after it.
                while self.count > i {
                    self.free_last();
                }
                return Err(DdiError::new("ddi_intr_enable", rc));
            }
            self.enabled[i] = true;
        }
        Ok(self.count)
    }

    /// Disables and frees every vector past the first `to` (at least one
    /// stays; MSI-X only). On return no handler of those runs.
    pub fn shrink(&mut self, to: usize) {
        if self.kind != IntrKind::MsiX || self.block {
            return;
        }
        self.keep(to);
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.disable();
        while self.count > 0 {
            self.free_last();
        }
        // Then `irm` drops: ddi_cb_unregister with nothing allocated.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irm_callback_actions_decode_with_their_count_and_unknown_ones_do_not() {
        let n = |v: usize| v as *mut c_void;
        assert_eq!(
            IrmChange::decode(ffi::DDI_CB_INTR_ADD, n(3)),
            Some(IrmChange::Add(3))
        );
        assert_eq!(
            IrmChange::decode(ffi::DDI_CB_INTR_REMOVE, n(5)),
            Some(IrmChange::Remove(5))
        );
        assert_eq!(IrmChange::decode(7, n(1)), None);
        // A count that does not fit is saturated, not wrapped.
        assert_eq!(
            IrmChange::decode(ffi::DDI_CB_INTR_REMOVE, n(usize::MAX)),
            Some(IrmChange::Remove(u32::MAX))
        );
    }
}
