//! DMA memory the driver owns: `ddi_dma_alloc_handle(9F)` +
//! `ddi_dma_mem_alloc(9F)` + `ddi_dma_addr_bind_handle(9F)`, bound to a
//! single cookie, released in reverse order on drop.
//!
//! Used for virtqueues, per-command request/response headers and indirect
//! descriptor tables, event buffers. Data buffers of SCSI commands are not
//! allocated here: the SCSA framework binds them and hands the driver
//! their cookies (tran_setup_pkt(9E)).

use super::{DdiError, Dip, Sleep};
use crate::ffi;
use crate::shmem::{SharedMem, in_bounds};
use core::ptr::NonNull;

/// How the memory is used, which picks the `ddi_dma_mem_alloc` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaMode {
    /// Rings and anything polled by both sides: `DDI_DMA_CONSISTENT`.
    Consistent,
    /// One-shot buffers (command headers): `DDI_DMA_STREAMING`.
    Streaming,
}

/// Whether the driver takes the faults the I/O framework records on a
/// buffer's DMA handle.
///
/// A handle is allocated with `DDI_DMA_FLAGERR` only if the driver looks
/// at it (`Fma::take_dma_fault`): the nexus then marks a DMA error on it
/// and lets the driver recover, where without the flag it has no handle to
/// tie the error to and takes it for fatal (uts/common/os/ndifm.c: only
/// FLAGERR handles are cached for the lookup; uts/common/io/pciex/
/// pcie_fault.c: an error no handle is found for panics). A flagged handle
/// nobody looks at would let a DMA error pass silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultCheck {
    /// Looked at once a second (rings, event and TMF buffers): flagged.
    Taken,
    /// Not looked at (per-command memory, which lives as long as the
    /// packet cache keeps it; one-shot pages): not flagged, the nexus's
    /// policy applies.
    NexusPolicy,
}

/// Attributes for driver-owned DMA memory: one contiguous segment anywhere
/// in the 64-bit space (virtio descriptors carry 64-bit addresses; legacy
/// virtqueues are located by a 32-bit page number, see `addr_hi`).
pub fn single_segment_attr(align: u64, addr_hi: u64) -> ffi::ddi_dma_attr_t {
    ffi::ddi_dma_attr_t {
        dma_attr_version: ffi::DMA_ATTR_V0,
        dma_attr_addr_lo: 0,
        dma_attr_addr_hi: addr_hi,
        dma_attr_count_max: 0xFFFF_FFFF,
        dma_attr_align: align,
        dma_attr_burstsizes: 1,
        dma_attr_minxfer: 1,
        dma_attr_maxxfer: 0xFFFF_FFFF,
        dma_attr_seg: u64::MAX,
        dma_attr_sgllen: 1,
        dma_attr_granular: 1,
        dma_attr_flags: 0,
    }
}

/// A bound, single-cookie DMA allocation.
pub struct DmaBuffer {
    handle: ffi::ddi_dma_handle_t,
    acc: ffi::ddi_acc_handle_t,
    kaddr: NonNull<u8>,
    len: usize,
    bus_addr: u64,
}

// SAFETY: the handles are kernel objects usable from any thread; concurrent
// access to the bytes is coordinated by the owners (queue locks).
unsafe impl Send for DmaBuffer {}
// SAFETY: all accessors take &self and do volatile, bounds-checked copies.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    /// Allocates `len` zeroed bytes aligned to `align`, below `addr_hi`;
    /// `faults` says whether the driver takes its handle's faults.
    pub fn alloc(
        dip: Dip,
        len: usize,
        align: u64,
        addr_hi: u64,
        mode: DmaMode,
        faults: FaultCheck,
        sleep: Sleep,
    ) -> Result<Self, DdiError> {
        // Word accessors rely on 8-byte alignment of the whole buffer.
        let mut attr = single_segment_attr(align.max(8), addr_hi);
        // With the DMA check granted, DDI_DMA_FLAGERR on a handle the
        // driver looks at, so that faults on it are reported by
        // ddi_fm_dma_err_get(9F) (ddifm.c: "driver must set the
        // dma_attr_flags ... to DDI_DMA_FLAGERR").
        // Asked only for such memory: per-command memory is allocated in
        // the packet constructor, which needs no kernel call for it.
        let granted = faults == FaultCheck::Taken && {
            // SAFETY: `dip` is a node the driver is attached to (a `Dip`
            // is valid from attach(9E) to detach(9E), and DMA memory and
            // register maps exist only in between); ddi_fm_capable(9F)
            // only reads the node's FM capabilities and may be called from
            // any context.
            let caps = unsafe { ffi::ddi_fm_capable(dip.as_ptr()) };
            caps & ffi::DDI_FM_DMACHK_CAPABLE != 0
        };
        if granted {
            attr.dma_attr_flags |= ffi::DDI_DMA_FLAGERR;
        }
        let acc_attr = ffi::ddi_device_acc_attr_t {
            devacc_attr_version: ffi::DDI_DEVICE_ATTR_V0,
            devacc_attr_endian_flags: ffi::DDI_NEVERSWAP_ACC,
            devacc_attr_dataorder: ffi::DDI_STRICTORDER_ACC,
            devacc_attr_access: 0,
        };
        let mut handle: ffi::ddi_dma_handle_t = core::ptr::null_mut();
        // SAFETY: valid node, attr lives across the call, out-pointer valid.
        let rc = unsafe {
            ffi::ddi_dma_alloc_handle(
                dip.as_ptr(),
                &attr,
                sleep.dma_callback(),
                core::ptr::null_mut(),
                &mut handle,
            )
        };
        if rc != ffi::DDI_SUCCESS {
            return Err(DdiError::new("ddi_dma_alloc_handle", rc));
        }
        let flags = match mode {
            DmaMode::Consistent => ffi::DDI_DMA_CONSISTENT,
            DmaMode::Streaming => ffi::DDI_DMA_STREAMING,
        };
        let mut kaddr: ffi::caddr_t = core::ptr::null_mut();
        let mut real_len = 0usize;
        let mut acc: ffi::ddi_acc_handle_t = core::ptr::null_mut();
        // SAFETY: handle is freshly allocated; out-pointers valid.
        let rc = unsafe {
            ffi::ddi_dma_mem_alloc(
                handle,
                len,
                &acc_attr,
                flags,
                sleep.dma_callback(),
                core::ptr::null_mut(),
                &mut kaddr,
                &mut real_len,
                &mut acc,
            )
        };
        let Some(kptr) =
            NonNull::new(kaddr.cast::<u8>()).filter(|_| rc == ffi::DDI_SUCCESS && real_len >= len)
        else {
            if rc == ffi::DDI_SUCCESS {
                // SAFETY: memory was allocated but is unusable; free it.
                unsafe { ffi::ddi_dma_mem_free(&mut acc) };
            }
            // SAFETY: handle allocated above, not bound.
            unsafe { ffi::ddi_dma_free_handle(&mut handle) };
            return Err(DdiError::new("ddi_dma_mem_alloc", rc));
        };
        // SAFETY: ddi_dma_mem_alloc returned real_len >= len writable bytes.
        unsafe { core::ptr::write_bytes(kptr.as_ptr(), 0, len) };
        let mut cookie = ffi::ddi_dma_cookie_t::default();
        let mut ncookies: core::ffi::c_uint = 0;
        // SAFETY: binds the memory just allocated through this very handle.
        let rc = unsafe {
            ffi::ddi_dma_addr_bind_handle(
                handle,
                core::ptr::null_mut(),
                kaddr,
                len,
                ffi::DDI_DMA_RDWR | flags,
                sleep.dma_callback(),
                core::ptr::null_mut(),
                &mut cookie,
                &mut ncookies,
            )
        };
        if rc != ffi::DDI_DMA_MAPPED || ncookies != 1 || cookie.dmac_size < len {
            if rc == ffi::DDI_DMA_MAPPED {
                // SAFETY: bound above.
                unsafe { ffi::ddi_dma_unbind_handle(handle) };
            }
            // SAFETY: allocated above, now unbound.
            unsafe {
                ffi::ddi_dma_mem_free(&mut acc);
                ffi::ddi_dma_free_handle(&mut handle);
            }
            let code = if rc == ffi::DDI_DMA_MAPPED {
                ffi::DDI_FAILURE
            } else {
                rc
            };
            return Err(DdiError::new("ddi_dma_addr_bind_handle", code));
        }
        let buf = Self {
            handle,
            acc,
            kaddr: kptr,
            len,
            bus_addr: cookie.dmac_laddress,
        };
        // The device must see the zeroes too (rings start out zeroed; on a
        // non-coherent platform nothing else would push them out).
        buf.sync_for_device(0, len);
        Ok(buf)
    }

    fn sync(&self, off: usize, len: usize, what: u32) {
        if len == 0 || !in_bounds(off, len, self.len) {
            debug_assert!(len == 0, "DMA sync out of bounds");
            return;
        }
        // SAFETY: bound handle; range within the bound object. On x86 the
        // call cannot fail for a valid handle and range.
        unsafe { ffi::ddi_dma_sync(self.handle, off as ffi::off_t, len, what) };
    }
}

/// Plain integers that can be loaded and stored whole.
pub trait Word: Copy + Default {}
impl Word for u16 {}
impl Word for u32 {}
impl Word for u64 {}

impl DmaBuffer {
    /// The DMA handle, for `ddi_fm_dma_err_get(9F)`
    /// ([`super::fm::Fma::take_dma_fault`]).
    pub fn dma_handle(&self) -> ffi::ddi_dma_handle_t {
        self.handle
    }

    fn load<W: Word>(&self, off: usize) -> W {
        let size = core::mem::size_of::<W>();
        if !in_bounds(off, size, self.len) || off % size != 0 {
            debug_assert!(false, "misplaced DMA word read");
            return W::default();
        }
        // SAFETY: in bounds and naturally aligned (the buffer itself is at
        // least 8-byte aligned: every allocation asks for align >= 8).
        unsafe { core::ptr::read_volatile(self.kaddr.as_ptr().add(off).cast::<W>()) }
    }

    fn store<W: Word>(&self, off: usize, v: W) {
        let size = core::mem::size_of::<W>();
        if !in_bounds(off, size, self.len) || off % size != 0 {
            debug_assert!(false, "misplaced DMA word write");
            return;
        }
        // SAFETY: in bounds and naturally aligned, as in load().
        unsafe { core::ptr::write_volatile(self.kaddr.as_ptr().add(off).cast::<W>(), v) }
    }
}

impl SharedMem for DmaBuffer {
    fn take_dma_fault(&self, fma: &super::fm::Fma) -> super::fm::HandleHealth {
        fma.take_dma_fault(self)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn device_addr(&self) -> u64 {
        self.bus_addr
    }

    fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        if !in_bounds(off, dst.len(), self.len) {
            debug_assert!(false, "DMA read out of bounds");
            dst.fill(0);
            return;
        }
        // One copy rather than a volatile load per byte (which kept the
        // compiler from merging the loads of a header into words: about
        // 30 instructions per completion). The callers read what the
        // device wrote only after it said so (a used ring or completion
        // index read first, then ddi_dma_sync(9F) for the CPU, both
        // opaque calls the copy cannot move above), and read it once into
        // `dst`, which they then check: a device that writes the bytes
        // again meanwhile gives them other bytes, never a value a u8
        // cannot hold, and never a second read that disagrees.
        // SAFETY: [off, off + len) is inside the buffer (checked above),
        // which no Rust reference covers, and `dst`, a Rust reference,
        // cannot overlap it.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.kaddr.as_ptr().add(off),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
    }

    fn write_bytes(&self, off: usize, src: &[u8]) {
        if !in_bounds(off, src.len(), self.len) {
            debug_assert!(false, "DMA write out of bounds");
            return;
        }
        // One copy rather than a volatile store per byte: the device reads
        // this memory only after the ddi_dma_sync(9F) call and the ring
        // index store that follow (both opaque to the compiler, which must
        // complete the copy before them); nothing is read back.
        // SAFETY: [off, off + len) is inside the buffer (checked above),
        // which no Rust reference covers, and `src` cannot overlap it.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr(), self.kaddr.as_ptr().add(off), src.len())
        };
    }

    // Ring indices and descriptor fields are read and written as whole,
    // naturally aligned words so that the device never sees (and we never
    // read) a torn value.
    fn read_u16(&self, off: usize) -> u16 {
        u16::from_le(self.load::<u16>(off))
    }
    fn read_u32(&self, off: usize) -> u32 {
        u32::from_le(self.load::<u32>(off))
    }
    fn read_u64(&self, off: usize) -> u64 {
        u64::from_le(self.load::<u64>(off))
    }
    fn write_u16(&self, off: usize, v: u16) {
        self.store::<u16>(off, v.to_le())
    }
    fn write_u32(&self, off: usize, v: u32) {
        self.store::<u32>(off, v.to_le())
    }
    fn write_u64(&self, off: usize, v: u64) {
        self.store::<u64>(off, v.to_le())
    }

    fn sync_for_device(&self, off: usize, len: usize) {
        self.sync(off, len, ffi::DDI_DMA_SYNC_FORDEV)
    }

    fn sync_for_cpu(&self, off: usize, len: usize) {
        self.sync(off, len, ffi::DDI_DMA_SYNC_FORCPU)
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: the three resources were acquired in alloc() and are
        // released exactly once, in reverse order.
        unsafe {
            ffi::ddi_dma_unbind_handle(self.handle);
            ffi::ddi_dma_mem_free(&mut self.acc);
            ffi::ddi_dma_free_handle(&mut self.handle);
        }
    }
}
