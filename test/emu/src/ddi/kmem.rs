//! `kmem_alloc(9F)`, `kmem_zalloc(9F)`, `kmem_free(9F)`: checked (the size
//! given to `kmem_free` must be the size allocated; `KM_SLEEP` is not for
//! interrupt context: kmem_alloc(9F) CONTEXT, "can be called from
//! interrupt context only if the KM_NOSLEEP flag is set"; interrupt
//! context is what `servicing_interrupt()` reports, see `cpu.rs`).

use super::sync::check_may_sleep;
use super::violation;
use crate::machine::lock;
use rvscsi::ffi;
use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

static ALLOCS: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// `kmem_alloc`/`kmem_zalloc` calls so far (all machines): a loaded
/// module's every heap allocation, its Rust allocator included.
pub fn alloc_calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

fn layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.max(1), 8).ok()
}

fn kalloc(size: usize, kmflag: c_int, zero: bool) -> *mut c_void {
    if kmflag & ffi::KM_NOSLEEP == 0 {
        check_may_sleep("kmem_alloc(KM_SLEEP)");
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    let Some(l) = layout(size) else {
        return std::ptr::null_mut();
    };
    // SAFETY: non-zero size layout.
    let p = unsafe { if zero { alloc_zeroed(l) } else { alloc(l) } };
    if !p.is_null() {
        lock(&ALLOCS)
            .get_or_insert_with(HashMap::new)
            .insert(p as usize, size);
    }
    p.cast()
}

/// `kmem_alloc(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn kmem_alloc(size: usize, kmflag: c_int) -> *mut c_void {
    let _kernel = crate::meter::kernel();
    kalloc(size, kmflag, false)
}

/// `kmem_zalloc(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn kmem_zalloc(size: usize, kmflag: c_int) -> *mut c_void {
    let _kernel = crate::meter::kernel();
    kalloc(size, kmflag, true)
}

/// `kmem_free(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn kmem_free(buf: *mut c_void, size: usize) {
    let _kernel = crate::meter::kernel();
    match lock(&ALLOCS)
        .get_or_insert_with(HashMap::new)
        .remove(&(buf as usize))
    {
        Some(real) if real == size => {
            if let Some(l) = layout(size) {
                // SAFETY: allocated by kalloc with this layout.
                unsafe { dealloc(buf.cast(), l) };
            }
        }
        Some(real) => {
            violation(format!("kmem_free of {size} bytes, allocated as {real}"));
            if let Some(l) = layout(real) {
                // SAFETY: allocated by kalloc with this layout.
                unsafe { dealloc(buf.cast(), l) };
            }
        }
        None => violation(format!(
            "kmem_free of {buf:p}, which kmem_alloc did not return"
        )),
    }
}

/// Bytes allocated with `kmem_alloc` and not freed (all machines).
pub fn outstanding_bytes() -> usize {
    lock(&ALLOCS)
        .get_or_insert_with(HashMap::new)
        .values()
        .sum()
}
