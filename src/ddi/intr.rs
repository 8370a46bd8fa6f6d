//! Interrupts: `ddi_intr_alloc(9F)` and friends.
//!
//! The driver asks for MSI-X first (a vector per queue), then MSI, then a
//! fixed (INTx) interrupt, in the order given by the caller, taking what the
//! system grants.

use super::{DdiError, Dip};
use crate::ffi;
use alloc::vec::Vec;
use core::ffi::c_void;

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

/// Allocated interrupt vectors of one type, with their handlers.
pub struct Interrupts {
    kind: IntrKind,
    handles: Vec<ffi::ddi_intr_handle_t>,
    with_handler: Vec<bool>,
    pri: u32,
    block: bool,
    enabled: bool,
}

// SAFETY: interrupt handles are kernel objects usable from any thread; the
// owner serializes enable/disable (attach/detach).
unsafe impl Send for Interrupts {}
// SAFETY: &self methods only read immutable fields.
unsafe impl Sync for Interrupts {}

impl Interrupts {
    /// Allocates up to `want` vectors of the first type in `prefer` that
    /// both the device and the system support (MSI and fixed: one vector).
    pub fn alloc(dip: Dip, prefer: &[IntrKind], want: usize) -> Result<Self, DdiError> {
        let mut supported = 0;
        // SAFETY: valid node, out-pointer.
        let rc = unsafe { ffi::ddi_intr_get_supported_types(dip.as_ptr(), &mut supported) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_intr_get_supported_types", rc));
        }
        let mut last = DdiError::new("ddi_intr_get_supported_types", ffi::DDI_ENOTSUP);
        for &kind in prefer {
            if supported & kind.ddi_type() == 0 {
                continue;
            }
            match Self::alloc_kind(dip, kind, want) {
                Ok(i) => return Ok(i),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn alloc_kind(dip: Dip, kind: IntrKind, want: usize) -> Result<Self, DdiError> {
        let typ = kind.ddi_type();
        let (mut nintrs, mut navail) = (0, 0);
        // SAFETY: valid node, out-pointers.
        let rc = unsafe { ffi::ddi_intr_get_nintrs(dip.as_ptr(), typ, &mut nintrs) };
        if rc != ffi::DDI_SUCCESS || nintrs < 1 {
            return Err(DdiError::new("ddi_intr_get_nintrs", rc));
        }
        // SAFETY: as above.
        let rc = unsafe { ffi::ddi_intr_get_navail(dip.as_ptr(), typ, &mut navail) };
        if rc != ffi::DDI_SUCCESS || navail < 1 {
            return Err(DdiError::new("ddi_intr_get_navail", rc));
        }
        let count = match kind {
            IntrKind::MsiX => want.clamp(1, nintrs.min(navail) as usize),
            IntrKind::Msi | IntrKind::Fixed => 1,
        };
        let mut handles: Vec<ffi::ddi_intr_handle_t> = Vec::new();
        handles.resize(count, core::ptr::null_mut());
        let mut actual = 0;
        // SAFETY: handles has room for `count` handles.
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
        handles.truncate(actual as usize);
        let mut me = Self {
            kind,
            with_handler: alloc::vec![false; handles.len()],
            handles,
            pri: 0,
            block: false,
            enabled: false,
        };
        let mut pri = 0;
        // SAFETY: handles[0] was allocated above.
        let rc = unsafe { ffi::ddi_intr_get_pri(me.handles[0], &mut pri) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_intr_get_pri", rc)); // Drop frees
        }
        me.pri = pri;
        let mut cap = 0;
        // SAFETY: as above.
        if unsafe { ffi::ddi_intr_get_cap(me.handles[0], &mut cap) } == ffi::DDI_SUCCESS {
            me.block = cap & ffi::DDI_INTR_FLAG_BLOCK != 0;
        }
        Ok(me)
    }

    /// Frees every vector past the first `n` (before any is enabled): a
    /// driver that will not use them must not leave them allocated
    /// without handlers.
    pub fn keep(&mut self, n: usize) {
        let n = n.max(1);
        while self.handles.len() > n {
            let (Some(h), Some(added)) = (self.handles.pop(), self.with_handler.pop()) else {
                break;
            };
            // SAFETY: an allocated handle, not enabled (enable() was not
            // called yet by contract of this method), freed once.
            unsafe {
                if added {
                    ffi::ddi_intr_remove_handler(h);
                }
                ffi::ddi_intr_free(h);
            }
        }
    }

    /// The type granted.
    pub fn kind(&self) -> IntrKind {
        self.kind
    }

    /// Number of vectors granted.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The interrupt priority, for `mutex_init` of locks the handlers take.
    pub fn priority(&self) -> u32 {
        self.pri
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
        let Some(&h) = self.handles.get(index) else {
            return Err(DdiError::new("ddi_intr_add_handler", ffi::DDI_EINVAL));
        };
        // SAFETY: allocated handle; the caller guarantees the arguments.
        let rc = unsafe { ffi::ddi_intr_add_handler(h, handler, arg1, arg2) };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_intr_add_handler", rc));
        }
        self.with_handler[index] = true;
        Ok(())
    }

    /// Enables every vector (as a block when the system supports it).
    pub fn enable(&mut self) -> Result<(), DdiError> {
        if self.enabled {
            return Ok(());
        }
        let rc = if self.block {
            // SAFETY: all handles allocated, count matches.
            unsafe {
                ffi::ddi_intr_block_enable(self.handles.as_mut_ptr(), self.handles.len() as i32)
            }
        } else {
            let mut rc = ffi::DDI_SUCCESS;
            for (i, &h) in self.handles.iter().enumerate() {
                // SAFETY: allocated handle.
                rc = unsafe { ffi::ddi_intr_enable(h) };
                if rc != ffi::DDI_SUCCESS {
                    for &h in &self.handles[..i] {
                        // SAFETY: enabled just above.
                        unsafe { ffi::ddi_intr_disable(h) };
                    }
                    break;
                }
            }
            rc
        };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_intr_enable", rc));
        }
        self.enabled = true;
        Ok(())
    }

    /// Disables every vector; on return no handler is running or will run.
    pub fn disable(&mut self) {
        if !self.enabled {
            return;
        }
        if self.block {
            // SAFETY: all handles allocated and enabled.
            unsafe {
                ffi::ddi_intr_block_disable(self.handles.as_mut_ptr(), self.handles.len() as i32)
            };
        } else {
            for &h in &self.handles {
                // SAFETY: allocated and enabled.
                unsafe { ffi::ddi_intr_disable(h) };
            }
        }
        self.enabled = false;
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.disable();
        for (&h, &added) in self.handles.iter().zip(&self.with_handler) {
            // SAFETY: each handle was allocated once; handlers added are
            // removed before the handle is freed.
            unsafe {
                if added {
                    ffi::ddi_intr_remove_handler(h);
                }
                ffi::ddi_intr_free(h);
            }
        }
    }
}
