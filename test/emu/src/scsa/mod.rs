//! The emulated SCSA framework: what `scsi_hba.c`, `scsi_resource.c` and
//! `scsi_transport.c` do around an HBA that uses `tran_setup_pkt(9E)` (see
//! `shared/notes/scsa-framework.md`), plus the target-driver side of it
//! (`scsi_init_pkt(9F)`, `scsi_transport(9F)`, `scsi_destroy_pkt(9F)`,
//! `scsi_poll(9F)`, capabilities, resets) as a Rust API for the emulated
//! target drivers of the test bed.
//!
//! - [`buf`]: `struct buf` and the data buffers target drivers hand in.
//! - [`hba`]: `scsi_hba_tran_alloc(9F)`, `scsi_hba_attach_setup(9F)`, the
//!   per-instance packet cache (constructor/destructor), iports.
//! - [`device`]: `struct scsi_device` and its accessors.
//! - [`packet`]: packet allocation, DMA binding into cookies and windows,
//!   transport, completion (`scsi_hba_pkt_comp(9F)`), polling.
//! - [`tgtmap`]: target maps and LUN enumeration (REPORT LUNS).

pub mod buf;
pub mod device;
pub mod hba;
pub mod packet;
pub mod tgtmap;
