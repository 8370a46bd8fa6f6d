//! Memory shared with a device (DMA): the one abstraction the ring code is
//! written against, so that rings can be unit-tested on ordinary memory
//! while the driver uses [`crate::ddi::dma::DmaBuffer`].
//!
//! All multi-byte values are little-endian, the byte order of virtio 1.x
//! and of VMware's rings (legacy virtio is guest-native, which is also
//! little-endian on x86).
//!
//! Accesses are bounds-checked: an offset outside the buffer reads as zero
//! and writes nowhere (and trips a debug assertion, since offsets are always
//! computed by the driver from validated indices, never taken from the
//! device).

/// Memory a device reads and writes by DMA.
pub trait SharedMem {
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device-visible (bus) address of byte 0.
    fn device_addr(&self) -> u64;
    /// Takes the fault the I/O framework recorded on the memory's DMA
    /// handle (`ddi_fm_dma_err_get(9F)`, cleared if there was one:
    /// `Fma::take_dma_fault`); memory without one (tests) is healthy.
    fn take_dma_fault(&self, _fma: &crate::ddi::fm::Fma) -> crate::ddi::fm::HandleHealth {
        crate::ddi::fm::HandleHealth::Ok
    }
    /// Copies `dst.len()` bytes at `off` into `dst`.
    fn read_bytes(&self, off: usize, dst: &mut [u8]);
    /// Copies `src` to `off`.
    fn write_bytes(&self, off: usize, src: &[u8]);
    /// Makes CPU writes in `[off, off+len)` visible to the device
    /// (`ddi_dma_sync(DDI_DMA_SYNC_FORDEV)`).
    fn sync_for_device(&self, off: usize, len: usize);
    /// Makes device writes in `[off, off+len)` visible to the CPU
    /// (`ddi_dma_sync(DDI_DMA_SYNC_FORCPU)`).
    fn sync_for_cpu(&self, off: usize, len: usize);

    /// Reads a little-endian `u16`.
    fn read_u16(&self, off: usize) -> u16 {
        let mut b = [0; 2];
        self.read_bytes(off, &mut b);
        u16::from_le_bytes(b)
    }
    /// Reads a little-endian `u32`.
    fn read_u32(&self, off: usize) -> u32 {
        let mut b = [0; 4];
        self.read_bytes(off, &mut b);
        u32::from_le_bytes(b)
    }
    /// Reads a little-endian `u64`.
    fn read_u64(&self, off: usize) -> u64 {
        let mut b = [0; 8];
        self.read_bytes(off, &mut b);
        u64::from_le_bytes(b)
    }
    /// Writes a little-endian `u16`.
    fn write_u16(&self, off: usize, v: u16) {
        self.write_bytes(off, &v.to_le_bytes())
    }
    /// Writes a little-endian `u32`.
    fn write_u32(&self, off: usize, v: u32) {
        self.write_bytes(off, &v.to_le_bytes())
    }
    /// Writes a little-endian `u64`.
    fn write_u64(&self, off: usize, v: u64) {
        self.write_bytes(off, &v.to_le_bytes())
    }
}

/// Memory shared through an `Rc` (a ring's "driver" side and a test or
/// fuzz harness playing the device, on one thread) is the memory itself.
impl<M: SharedMem + ?Sized> SharedMem for alloc::rc::Rc<M> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn device_addr(&self) -> u64 {
        (**self).device_addr()
    }
    fn take_dma_fault(&self, fma: &crate::ddi::fm::Fma) -> crate::ddi::fm::HandleHealth {
        (**self).take_dma_fault(fma)
    }
    fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        (**self).read_bytes(off, dst)
    }
    fn write_bytes(&self, off: usize, src: &[u8]) {
        (**self).write_bytes(off, src)
    }
    fn sync_for_device(&self, off: usize, len: usize) {
        (**self).sync_for_device(off, len)
    }
    fn sync_for_cpu(&self, off: usize, len: usize) {
        (**self).sync_for_cpu(off, len)
    }
    fn read_u16(&self, off: usize) -> u16 {
        (**self).read_u16(off)
    }
    fn read_u32(&self, off: usize) -> u32 {
        (**self).read_u32(off)
    }
    fn read_u64(&self, off: usize) -> u64 {
        (**self).read_u64(off)
    }
    fn write_u16(&self, off: usize, v: u16) {
        (**self).write_u16(off, v)
    }
    fn write_u32(&self, off: usize, v: u32) {
        (**self).write_u32(off, v)
    }
    fn write_u64(&self, off: usize, v: u64) {
        (**self).write_u64(off, v)
    }
}

/// Whether `[off, off+len)` lies within a buffer of `size` bytes.
#[inline]
pub fn in_bounds(off: usize, len: usize, size: usize) -> bool {
    off.checked_add(len).is_some_and(|end| end <= size)
}

/// Shared memory backed by ordinary host memory, for unit tests of the ring
/// logic: `sync_*` are no-ops, so what a test writes "as the device" is
/// immediately seen.
#[cfg(any(test, feature = "host-mem"))]
pub mod host {
    use super::{SharedMem, in_bounds};
    use alloc::vec;
    use alloc::vec::Vec;
    use core::cell::RefCell;

    /// A `Vec<u8>` pretending to be DMA memory at bus address `base`.
    pub struct HostMem {
        bytes: RefCell<Vec<u8>>,
        base: u64,
    }

    impl HostMem {
        /// `len` zeroed bytes at bus address `base`.
        pub fn new(len: usize, base: u64) -> Self {
            Self {
                bytes: RefCell::new(vec![0; len]),
                base,
            }
        }
    }

    impl SharedMem for HostMem {
        fn len(&self) -> usize {
            self.bytes.borrow().len()
        }
        fn device_addr(&self) -> u64 {
            self.base
        }
        fn read_bytes(&self, off: usize, dst: &mut [u8]) {
            let b = self.bytes.borrow();
            if in_bounds(off, dst.len(), b.len()) {
                dst.copy_from_slice(&b[off..off + dst.len()]);
            } else {
                debug_assert!(false, "HostMem read out of bounds");
                dst.fill(0);
            }
        }
        fn write_bytes(&self, off: usize, src: &[u8]) {
            let mut b = self.bytes.borrow_mut();
            let n = b.len();
            if in_bounds(off, src.len(), n) {
                b[off..off + src.len()].copy_from_slice(src);
            } else {
                debug_assert!(false, "HostMem write out of bounds");
            }
        }
        fn sync_for_device(&self, _off: usize, _len: usize) {}
        fn sync_for_cpu(&self, _off: usize, _len: usize) {}
    }
}

/// Host memory that two owners share (a ring's "driver" and a test
/// playing the device) and that may move between threads, for unit tests.
#[cfg(test)]
pub mod shared {
    use super::{SharedMem, in_bounds};
    use std::sync::{Arc, Mutex};
    use std::vec;
    use std::vec::Vec;

    /// A sync the memory was asked for: for the device (true) or the CPU,
    /// offset, length.
    pub type Sync = (bool, usize, usize);

    /// `len` zeroed bytes at bus address `base`; clones share them (and
    /// the record of syncs).
    #[derive(Clone)]
    pub struct SharedHostMem {
        bytes: Arc<Mutex<Vec<u8>>>,
        base: u64,
        syncs: Arc<Mutex<Vec<Sync>>>,
    }

    impl SharedHostMem {
        /// `len` zeroed bytes at bus address `base`.
        pub fn new(len: usize, base: u64) -> Self {
            SharedHostMem {
                bytes: Arc::new(Mutex::new(vec![0; len])),
                base,
                syncs: Arc::new(Mutex::new(Vec::new())),
            }
        }

        /// The syncs asked for since the last call, in order.
        pub fn take_syncs(&self) -> Vec<Sync> {
            core::mem::take(&mut *self.syncs.lock().unwrap())
        }
    }

    impl SharedMem for SharedHostMem {
        fn len(&self) -> usize {
            self.bytes.lock().unwrap().len()
        }
        fn device_addr(&self) -> u64 {
            self.base
        }
        fn read_bytes(&self, off: usize, dst: &mut [u8]) {
            let b = self.bytes.lock().unwrap();
            assert!(in_bounds(off, dst.len(), b.len()), "read out of bounds");
            dst.copy_from_slice(&b[off..off + dst.len()]);
        }
        fn write_bytes(&self, off: usize, src: &[u8]) {
            let mut b = self.bytes.lock().unwrap();
            let n = b.len();
            assert!(in_bounds(off, src.len(), n), "write out of bounds");
            b[off..off + src.len()].copy_from_slice(src);
        }
        fn sync_for_device(&self, off: usize, len: usize) {
            self.syncs.lock().unwrap().push((true, off, len));
        }
        fn sync_for_cpu(&self, off: usize, len: usize) {
            self.syncs.lock().unwrap().push((false, off, len));
        }
    }
}
