//! `struct scsi_device(9S)` and the accessors the HBA calls:
//! `scsi_address_device(9F)`, `scsi_device_hba_private_get(9F)`,
//! `scsi_device_unit_address(9F)`.

use crate::ddi::devinfo::node;
use crate::ddi::violation;
use crate::machine::lock;
use rvscsi::ffi::{dev_info_t, scsi_address, scsi_address_a, scsi_device, scsi_hba_tran};
use std::collections::HashSet;
use std::ffi::{c_char, c_void};
use std::mem::offset_of;
use std::sync::Mutex;

/// `struct scsi_device`, the members the framework and HBA use at their
/// measured offsets.
#[repr(C)]
pub struct ScsiDeviceRaw {
    /// `sd_address`
    pub sd_address: scsi_address,
    /// `sd_dev`
    pub sd_dev: *mut dev_info_t,
    /// `sd_mutex`
    pub sd_mutex: [u8; 8],
    /// `sd_hba_private`
    pub sd_hba_private: *mut c_void,
    /// `sd_inq`
    pub sd_inq: *mut c_void,
    /// `sd_sense`
    pub sd_sense: *mut c_void,
    /// `sd_private`
    pub sd_private: *mut c_void,
    _rest: [u8; 32],
}

const _: () = assert!(offset_of!(ScsiDeviceRaw, sd_address) == 0);
const _: () = assert!(offset_of!(ScsiDeviceRaw, sd_dev) == 16);
const _: () = assert!(offset_of!(ScsiDeviceRaw, sd_hba_private) == 32);
const _: () = assert!(std::mem::size_of::<ScsiDeviceRaw>() == 96);

static DEVICES: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

/// Allocates a `scsi_device` for child `dip` under the iport whose tran is
/// `tran`, addressed (SCSI_HBA_ADDR_COMPLEX) through itself.
pub fn alloc(dip: *mut dev_info_t, tran: *mut scsi_hba_tran) -> *mut scsi_device {
    let raw = Box::new(ScsiDeviceRaw {
        sd_address: scsi_address {
            a_hba_tran: tran,
            a: scsi_address_a {
                a_sd: std::ptr::null_mut(),
            },
        },
        sd_dev: dip,
        sd_mutex: [0; 8],
        sd_hba_private: std::ptr::null_mut(),
        sd_inq: std::ptr::null_mut(),
        sd_sense: std::ptr::null_mut(),
        sd_private: std::ptr::null_mut(),
        _rest: [0; 32],
    });
    let p = Box::into_raw(raw);
    // SAFETY: just allocated.
    unsafe { (*p).sd_address.a.a_sd = p.cast() };
    lock(&DEVICES)
        .get_or_insert_with(HashSet::new)
        .insert(p as usize);
    p.cast()
}

/// Frees a device made by [`alloc`].
///
/// # Safety
/// Nothing may use it afterwards.
pub unsafe fn free(sd: *mut scsi_device) {
    if lock(&DEVICES)
        .get_or_insert_with(HashSet::new)
        .remove(&(sd as usize))
    {
        // SAFETY: registered, so made by Box::into_raw in alloc().
        drop(unsafe { Box::from_raw(sd.cast::<ScsiDeviceRaw>()) });
    }
}

fn raw<'a>(sd: *mut scsi_device, func: &str) -> Option<&'a mut ScsiDeviceRaw> {
    if sd.is_null()
        || !lock(&DEVICES)
            .get_or_insert_with(HashSet::new)
            .contains(&(sd as usize))
    {
        violation(format!("{func}: invalid scsi_device {sd:p}"));
        return None;
    }
    // SAFETY: registered devices are live boxes.
    Some(unsafe { &mut *sd.cast::<ScsiDeviceRaw>() })
}

/// `scsi_address_device(9F)`: with complex addressing, `a.a_sd`.
///
/// # Safety
/// `ap` must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scsi_address_device(ap: *mut scsi_address) -> *mut scsi_device {
    let _kernel = crate::meter::kernel();
    if ap.is_null() {
        violation("scsi_address_device(NULL)");
        return std::ptr::null_mut();
    }
    // SAFETY: the HBA passes the address the framework gave it.
    let sd = unsafe { (*ap).a.a_sd };
    raw(sd, "scsi_address_device").map_or(std::ptr::null_mut(), |_| sd)
}

/// `scsi_device_hba_private_get(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn scsi_device_hba_private_get(sd: *mut scsi_device) -> *mut c_void {
    let _kernel = crate::meter::kernel();
    raw(sd, "scsi_device_hba_private_get").map_or(std::ptr::null_mut(), |r| r.sd_hba_private)
}

/// `scsi_device_hba_private_set(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn scsi_device_hba_private_set(sd: *mut scsi_device, data: *mut c_void) {
    let _kernel = crate::meter::kernel();
    if let Some(r) = raw(sd, "scsi_device_hba_private_set") {
        r.sd_hba_private = data;
    }
}

/// `scsi_device_unit_address(9F)`: the child node's unit address.
#[unsafe(no_mangle)]
pub extern "C" fn scsi_device_unit_address(sd: *mut scsi_device) -> *mut c_char {
    let _kernel = crate::meter::kernel();
    let Some(r) = raw(sd, "scsi_device_unit_address") else {
        return std::ptr::null_mut();
    };
    node(r.sd_dev, "scsi_device_unit_address")
        .and_then(|n| n.unit_address())
        .map_or(std::ptr::null_mut(), |ua| ua.as_ptr().cast_mut())
}

/// The HBA private pointer of a device (for tests).
pub fn hba_private(sd: *mut scsi_device) -> *mut c_void {
    scsi_device_hba_private_get(sd)
}

/// Whether `sd` is a live `scsi_device` (allocated by the framework and
/// not yet freed by the child's teardown), for tests.
pub fn is_allocated(sd: *mut scsi_device) -> bool {
    lock(&DEVICES)
        .get_or_insert_with(HashSet::new)
        .contains(&(sd as usize))
}

/// How many live `scsi_device`s address through `tran` (children of the
/// iport whose tran it is, probe nodes included).
pub fn live_under(tran: *mut scsi_hba_tran) -> usize {
    lock(&DEVICES)
        .get_or_insert_with(HashSet::new)
        .iter()
        // SAFETY: registered devices are live boxes (freed only after
        // leaving the set, under the same lock).
        .filter(|&&p| unsafe { (*(p as *const ScsiDeviceRaw)).sd_address.a_hba_tran } == tran)
        .count()
}
