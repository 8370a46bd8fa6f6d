//! The kernel runtime's allocator (`rvscsi::runtime::KmemAllocator`) on the
//! emulated `kmem_alloc(9F)`, which checks that every `kmem_free` names a
//! buffer it returned, with the size it was allocated with.

use rvscsi::runtime::KmemAllocator;
use rvscsi_emu::ddi::{ORPHAN_VIOLATIONS, kmem};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;

/// kmem's byte count is process-wide: one test at a time looks at it.
static KMEM_COUNT: Mutex<()> = Mutex::new(());

#[test]
fn every_alignment_is_honoured_and_every_buffer_returns_to_kmem() {
    let _one = KMEM_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let before = kmem::outstanding_bytes();
    let mut live = Vec::new();
    for align_log in 0..=12 {
        let align = 1usize << align_log;
        for size in [1usize, 7, 8, 24, 100, 4096, 10_000] {
            let layout = Layout::from_size_align(size, align).unwrap();
            for zeroed in [false, true] {
                // SAFETY: non-zero size.
                let p = unsafe {
                    if zeroed {
                        KmemAllocator.alloc_zeroed(layout)
                    } else {
                        KmemAllocator.alloc(layout)
                    }
                };
                assert!(!p.is_null(), "size {size} align {align}");
                assert_eq!(p as usize % align, 0, "size {size} align {align}");
                // SAFETY: p has size bytes.
                let bytes = unsafe { std::slice::from_raw_parts_mut(p, size) };
                if zeroed {
                    assert!(bytes.iter().all(|&b| b == 0), "alloc_zeroed not zero");
                }
                bytes.fill(0x5a);
                live.push((p, layout));
            }
        }
    }
    assert!(kmem::outstanding_bytes() > before);
    for (p, layout) in live {
        // SAFETY: allocated above with this layout.
        unsafe { KmemAllocator.dealloc(p, layout) };
    }
    assert_eq!(
        kmem::outstanding_bytes(),
        before,
        "kmem buffers not returned"
    );
    let v = ORPHAN_VIOLATIONS.lock().unwrap().clone();
    assert!(v.is_empty(), "kmem violations: {v:?}");
}

#[test]
fn a_size_no_object_can_have_is_refused_before_kmem() {
    // With the alignment slack it exceeds isize::MAX: refused without
    // asking kmem (whose KM_SLEEP would wait forever in a kernel).
    let _one = KMEM_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let before = kmem::outstanding_bytes();
    let layout = Layout::from_size_align(isize::MAX as usize - 4095, 4096).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { KmemAllocator.alloc(layout) };
    assert!(p.is_null());
    assert_eq!(kmem::outstanding_bytes(), before);
}
