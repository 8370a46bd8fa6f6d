//! `struct buf(9S)` as the DMA binding reads it, and owned data buffers.

use rvscsi::ffi;
use std::ffi::c_char;
use std::mem::offset_of;

/// `struct buf`, with the members the DDI's buffer binding uses at their
/// measured offsets (`illumos-amd64-fields.tsv`), the rest as padding.
#[repr(C)]
pub struct Buf {
    /// `b_flags` (`B_READ` / `B_WRITE`).
    pub b_flags: i32,
    _pad0: [u8; 44],
    /// `b_bcount`
    pub b_bcount: usize,
    /// `b_un.b_addr`
    pub b_addr: *mut c_char,
    _pad1: [u8; 16],
    /// `b_resid`
    pub b_resid: usize,
    _pad2: [u8; 68],
    /// `b_error`
    pub b_error: i32,
    _pad3: [u8; 88],
}

const _: () = assert!(offset_of!(Buf, b_flags) == 0);
const _: () = assert!(offset_of!(Buf, b_bcount) == 48);
const _: () = assert!(offset_of!(Buf, b_addr) == 56);
const _: () = assert!(offset_of!(Buf, b_resid) == 80);
const _: () = assert!(offset_of!(Buf, b_error) == 156);
const _: () = assert!(std::mem::size_of::<Buf>() == 248);

/// `B_READ` (sys/buf.h): the device writes memory.
pub const B_READ: i32 = 0x40;
/// `B_WRITE`
pub const B_WRITE: i32 = 0x100;

/// A data buffer of a target driver: page-aligned host memory with its
/// `struct buf`. Shared (`Arc`) with the packets that bind it, so it
/// outlives every binding.
pub struct DataBuf {
    mem: *mut u8,
    layout: std::alloc::Layout,
    len: usize,
    offset: usize,
    buf: std::cell::UnsafeCell<Buf>,
}

// SAFETY: the memory is owned; concurrent access follows the DMA rules
// (the device side only touches it through the DDI's copies).
unsafe impl Send for DataBuf {}
// SAFETY: the owned memory is written through `&self` only before a bind
// (bytes_mut) or by the DDI's copies, which follow the DMA rules.
unsafe impl Sync for DataBuf {}

impl DataBuf {
    /// `len` zero bytes starting `offset` bytes into a page (to exercise
    /// unaligned buffers), for a transfer in direction `read`.
    pub fn new(len: usize, offset: usize, read: bool) -> DataBuf {
        let total = (offset + len).max(1).next_multiple_of(4096);
        let layout = std::alloc::Layout::from_size_align(total, 4096)
            .unwrap_or(std::alloc::Layout::new::<u8>());
        // SAFETY: non-zero size.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!mem.is_null(), "out of memory for a data buffer");
        // SAFETY: offset < total.
        let addr = unsafe { mem.add(offset) };
        let buf = Buf {
            b_flags: if read { B_READ } else { B_WRITE },
            _pad0: [0; 44],
            b_bcount: len,
            b_addr: addr.cast(),
            _pad1: [0; 16],
            b_resid: 0,
            _pad2: [0; 68],
            b_error: 0,
            _pad3: [0; 88],
        };
        DataBuf {
            mem,
            layout,
            len,
            offset,
            buf: std::cell::UnsafeCell::new(buf),
        }
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the device writes it.
    pub fn is_read(&self) -> bool {
        // SAFETY: b_flags is only written at construction.
        unsafe { (*self.buf.get()).b_flags & B_READ != 0 }
    }

    /// The bytes (what the CPU sees).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: len bytes at offset, owned.
        unsafe { std::slice::from_raw_parts(self.mem.add(self.offset), self.len) }
    }

    /// The bytes, to fill before a write.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: `mem + offset .. + len` is the owned allocation (made in
        // new); callers fill buffers before binding them, so no DMA copy
        // runs at the same time.
        unsafe { std::slice::from_raw_parts_mut(self.mem.add(self.offset), self.len) }
    }

    /// The `struct buf` for the DDI.
    pub fn buf_ptr(&self) -> *mut ffi::buf {
        self.buf.get().cast()
    }
}

impl Drop for DataBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.mem, self.layout) };
    }
}
