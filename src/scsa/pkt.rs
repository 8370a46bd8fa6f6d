//! A safe handle on a `scsi_pkt(9S)` the HBA currently owns.
//!
//! The framework hands a packet to the HBA in `tran_start(9E)` (and the
//! other `tran_*` entry points) and gets it back when the HBA calls
//! `scsi_hba_pkt_comp(9F)` or, for `FLAG_NOINTR`, returns. A [`Pkt`] stands
//! for that ownership: it is created from the raw pointer in the entry
//! layer (the one `unsafe` step, relying on the framework's promise), is
//! neither `Copy` nor `Clone`, and is consumed by [`Pkt::complete`]. All
//! accesses go through the documented members of `scsi_pkt(9S)`.

use super::arq;
use super::flags::{DataDir, PktFlags, PktState};
use super::outcome::Outcome;
use crate::ffi;
use core::ptr::NonNull;

/// A packet the HBA owns.
#[derive(Debug)]
pub struct Pkt(NonNull<ffi::scsi_pkt>);

// SAFETY: ownership of a packet moves between threads with the command
// that carries it (submitter -> ring -> completer); one owner at a time.
unsafe impl Send for Pkt {}

impl Pkt {
    /// Takes ownership of the packet at `p`.
    ///
    /// # Safety
    /// `p` must be a packet the framework handed to the HBA, valid until
    /// the HBA gives it back, and no other `Pkt` for it may exist.
    pub unsafe fn from_raw(p: *mut ffi::scsi_pkt) -> Option<Pkt> {
        NonNull::new(p).map(Pkt)
    }

    /// The raw pointer (for identity checks and the completion call).
    pub fn as_ptr(&self) -> *mut ffi::scsi_pkt {
        self.0.as_ptr()
    }

    fn raw(&self) -> &ffi::scsi_pkt {
        // SAFETY: valid and owned (type invariant); shared reads only.
        unsafe { self.0.as_ref() }
    }

    fn raw_mut(&mut self) -> &mut ffi::scsi_pkt {
        // SAFETY: valid and exclusively owned (type invariant).
        unsafe { self.0.as_mut() }
    }

    /// `pkt_ha_private`
    pub fn ha_private(&self) -> *mut core::ffi::c_void {
        self.raw().pkt_ha_private
    }

    /// `pkt_flags`
    pub fn flags(&self) -> PktFlags {
        PktFlags::from_bits_retain(self.raw().pkt_flags)
    }

    /// `pkt_time` in seconds (0: no timeout).
    pub fn time(&self) -> i32 {
        self.raw().pkt_time
    }

    /// `pkt_cdblen`
    pub fn cdblen(&self) -> u32 {
        self.raw().pkt_cdblen
    }

    /// `pkt_scblen`
    pub fn scblen(&self) -> u32 {
        self.raw().pkt_scblen
    }

    /// `pkt_tgtlen`
    pub fn tgtlen(&self) -> u32 {
        self.raw().pkt_tgtlen
    }

    /// `pkt_numcookies`
    pub fn numcookies(&self) -> u32 {
        self.raw().pkt_numcookies
    }

    /// `pkt_dma_flags`
    pub fn dma_flags(&self) -> u32 {
        self.raw().pkt_dma_flags
    }

    /// The CDB (`pkt_cdbp`, `pkt_cdblen` bytes); empty if there is none.
    pub fn cdb(&self) -> &[u8] {
        let p = self.raw();
        if p.pkt_cdbp.is_null() {
            return &[];
        }
        // SAFETY: the framework points pkt_cdbp at pkt_cdblen bytes
        // (scsi_init_pkt(9F)), valid while we own the packet.
        unsafe { core::slice::from_raw_parts(p.pkt_cdbp, p.pkt_cdblen as usize) }
    }

    /// The DMA cookies of the current window (tran_setup_pkt(9E):
    /// `pkt_cookies`, `pkt_numcookies`); empty without DMA.
    pub fn cookies(&self) -> &[ffi::ddi_dma_cookie_t] {
        let p = self.raw();
        if p.pkt_numcookies == 0 || p.pkt_cookies.is_null() {
            return &[];
        }
        // SAFETY: the framework points pkt_cookies at pkt_numcookies
        // cookies of the bound handle, valid while we own the packet.
        unsafe { core::slice::from_raw_parts(p.pkt_cookies, p.pkt_numcookies as usize) }
    }

    /// The data direction, `None` if both directions are set.
    pub fn data_dir(&self) -> Option<DataDir> {
        DataDir::from_dma_flags(self.dma_flags(), self.numcookies())
    }

    fn scb_mut(&mut self) -> &mut [u8] {
        let p = self.raw_mut();
        if p.pkt_scbp.is_null() || p.pkt_scblen == 0 {
            return &mut [];
        }
        // SAFETY: the framework points pkt_scbp at pkt_scblen bytes,
        // valid and ours while we own the packet.
        unsafe { core::slice::from_raw_parts_mut(p.pkt_scbp, p.pkt_scblen as usize) }
    }

    /// What tran_start(9E) does first: clear the results of any earlier
    /// use (`pkt_resid`, `pkt_reason`, `pkt_state`, `pkt_statistics`, the
    /// status byte).
    pub fn reset_results(&mut self) {
        let p = self.raw_mut();
        p.pkt_resid = 0;
        p.pkt_reason = ffi::CMD_CMPLT;
        p.pkt_state = 0;
        p.pkt_statistics = 0;
        if let Some(b) = self.scb_mut().first_mut() {
            *b = 0;
        }
    }

    /// Writes how the command ended, with auto request sense when the
    /// target returned CHECK CONDITION and `sense` is not empty.
    pub fn set_outcome(&mut self, o: &Outcome, sense: &[u8]) {
        let mut state = o.state;
        if o.state.contains(PktState::GOT_STATUS) {
            state |= arq::fill(self.scb_mut(), o.status, sense);
        }
        let p = self.raw_mut();
        p.pkt_reason = o.reason;
        p.pkt_state = state.bits();
        p.pkt_statistics = o.statistics.bits();
        p.pkt_resid = o.resid.min(isize::MAX as usize) as isize;
    }

    /// Hands the packet back to the framework (`scsi_hba_pkt_comp(9F)`),
    /// which calls the target driver's completion routine. No driver lock
    /// may be held.
    pub fn complete(self) {
        // SAFETY: we own the packet; after this call we never touch it.
        unsafe { ffi::scsi_hba_pkt_comp(self.as_ptr()) }
    }
}
