//! What a `no_std` Rust library needs from the illumos kernel to run inside
//! it: a global allocator over `kmem_alloc(9F)` and a panic handler that ends
//! in `panic(9F)`. The allocator is always compiled (the test bed checks it
//! against its strict `kmem_alloc` emulation); it becomes the global
//! allocator, and the panic handler exists, only in the kernel module
//! (feature `kernel` on a target without an operating system). The host
//! test bed uses std's.
//!
//! # Sleeping allocations, deliberately
//! `GlobalAlloc` cannot be told the caller's context, so one flag serves
//! every allocation. The driver allocates only in contexts that may block —
//! attach, detach, `tran_tgt_init(9E)` and its own task queue — never on the
//! I/O path (`tran_start`, completion, interrupts), where everything a packet
//! needs was preallocated by `tran_pkt_constructor(9E)`. So `KM_SLEEP`: it
//! cannot fail, which matters because Rust treats a failed allocation as
//! fatal. The test bed's `kmem_alloc` records a `KM_SLEEP` allocation from
//! interrupt context as a violation, so the rule is checked wherever this
//! allocator runs on it.
//!
//! # Alignment
//! `kmem_alloc(9F)` promises 8-byte alignment (`KMEM_ALIGN`). Larger
//! alignments are handled by over-allocating and keeping the distance to
//! the start of the kmem buffer in the word just below the aligned pointer.

use crate::ffi;
use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

/// The alignment every `kmem_alloc(9F)` buffer has.
const KMEM_ALIGN: usize = 8;

/// The global allocator of the kernel module.
pub struct KmemAllocator;

impl KmemAllocator {
    /// The kmem buffer size for `layout`, or `None` when no object can be
    /// that large (Rust objects are at most `isize::MAX` bytes).
    fn kmem_size(layout: Layout) -> Option<usize> {
        let size = if layout.align() <= KMEM_ALIGN {
            layout.size()
        } else {
            // Room to move the pointer up to the alignment; the gap is at
            // least KMEM_ALIGN bytes, which holds the header word.
            layout.size().checked_add(layout.align())?
        };
        (size <= isize::MAX as usize).then_some(size)
    }

    /// # Safety
    /// `layout` has a non-zero size (the `GlobalAlloc` contract).
    unsafe fn allocate(layout: Layout, zero: bool) -> *mut u8 {
        let Some(size) = Self::kmem_size(layout) else {
            return core::ptr::null_mut();
        };
        // SAFETY: a blocking allocation from a context that may block (see
        // the module documentation); size is non-zero.
        let raw = unsafe {
            if zero {
                ffi::kmem_zalloc(size, ffi::KM_SLEEP)
            } else {
                ffi::kmem_alloc(size, ffi::KM_SLEEP)
            }
        }
        .cast::<u8>();
        if raw.is_null() || layout.align() <= KMEM_ALIGN {
            return raw;
        }
        let gap = layout.align() - (raw as usize & (layout.align() - 1));
        // SAFETY: gap <= align, so [raw + gap, raw + gap + size) lies within
        // the size + align bytes allocated; gap >= KMEM_ALIGN because raw is
        // 8-aligned and not align-aligned plus gap, so the header word at
        // aligned - 8 is inside the buffer and 8-aligned.
        unsafe {
            let aligned = raw.add(gap);
            aligned.cast::<usize>().sub(1).write(gap);
            aligned
        }
    }
}

// SAFETY: every pointer returned comes from kmem_alloc/kmem_zalloc with at
// least `layout.size()` bytes at `layout.align()`; dealloc recomputes the
// same kmem buffer and size from the layout it is given.
unsafe impl GlobalAlloc for KmemAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the GlobalAlloc contract gives a non-zero size.
        unsafe { Self::allocate(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the GlobalAlloc contract gives alloc_zeroed a non-zero
        // size too, which is all `allocate` requires.
        unsafe { Self::allocate(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(size) = Self::kmem_size(layout) else {
            return;
        };
        let raw = if layout.align() <= KMEM_ALIGN {
            ptr
        } else {
            // SAFETY: allocate() stored the gap in the word below ptr.
            unsafe {
                let gap = ptr.cast::<usize>().sub(1).read();
                ptr.sub(gap)
            }
        };
        // SAFETY: raw and size are exactly what kmem_alloc was given.
        unsafe { ffi::kmem_free(raw.cast::<c_void>(), size) }
    }
}

#[cfg(all(feature = "kernel", target_os = "none"))]
#[global_allocator]
static KMEM: KmemAllocator = KmemAllocator;

/// A panic is a driver bug: say where, then stop the machine the way every
/// kernel module does (`panic(9F)`), so that a crash dump records it rather
/// than letting a half-updated ring or packet run on.
#[cfg(all(feature = "kernel", target_os = "none"))]
#[panic_handler]
fn on_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let message = crate::ddi::log::MessageBuf::format(format_args!("{info}"));
    // SAFETY: a constant format with one NUL-terminated string argument.
    unsafe {
        ffi::cmn_err(
            ffi::CE_WARN,
            c"rvscsi: Rust panic: %s".as_ptr(),
            message.as_c_ptr(),
        );
        ffi::panic(c"rvscsi: Rust panic (see the warning above)".as_ptr())
    }
}
