//! Device nodes (`dev_info_t`) and their properties.

use crate::ffi;
use core::ffi::{CStr, c_char, c_int, c_uint};
use core::ptr::NonNull;

/// A device node the driver is attached to. Valid from `attach(9E)` to
/// `detach(9E)`; the framework keeps it alive for that whole time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dip(NonNull<ffi::dev_info_t>);

// SAFETY: a dev_info_t pointer is a kernel object reference valid for the
// attach lifetime; DDI calls on it are thread safe.
unsafe impl Send for Dip {}
// SAFETY: Dip is a Copy pointer with no interior state of its own; sharing
// it only lets threads make the same thread-safe DDI calls on the node.
unsafe impl Sync for Dip {}

impl Dip {
    /// Wraps a non-null node pointer.
    pub fn new(dip: *mut ffi::dev_info_t) -> Option<Self> {
        NonNull::new(dip).map(Dip)
    }

    /// The raw pointer, for DDI calls.
    pub fn as_ptr(self) -> *mut ffi::dev_info_t {
        self.0.as_ptr()
    }

    /// `ddi_get_instance(9F)`
    pub fn instance(self) -> i32 {
        // SAFETY: self is a valid node (type invariant).
        unsafe { ffi::ddi_get_instance(self.as_ptr()) }
    }

    /// `ddi_get_parent(9F)`
    pub fn parent(self) -> Option<Dip> {
        // SAFETY: self is a valid node.
        Dip::new(unsafe { ffi::ddi_get_parent(self.as_ptr()) })
    }

    /// `ddi_prop_get_int(9F)` on this node and its parents (driver.conf
    /// tunables and hardware properties).
    pub fn prop_int(self, name: &CStr, default: i32) -> i32 {
        // SAFETY: valid node, NUL-terminated name that the DDI only reads.
        unsafe {
            ffi::ddi_prop_get_int(
                ffi::DDI_DEV_T_ANY,
                self.as_ptr(),
                0,
                name.as_ptr() as *mut c_char,
                default,
            )
        }
    }

    /// `ddi_prop_lookup_string(9F)`, copied into `buf`.
    pub fn prop_string<'b>(self, name: &CStr, buf: &'b mut [u8]) -> StrProp<'b> {
        let mut data: *mut c_char = core::ptr::null_mut();
        // SAFETY: valid node and name; on success the DDI hands us a
        // NUL-terminated string that we free with ddi_prop_free below.
        let rc = unsafe {
            ffi::ddi_prop_lookup_string(
                ffi::DDI_DEV_T_ANY,
                self.as_ptr(),
                0,
                name.as_ptr() as *mut c_char,
                &mut data,
            )
        };
        if rc != ffi::DDI_PROP_SUCCESS || data.is_null() {
            return StrProp::Absent;
        }
        // SAFETY: the DDI returned a valid NUL-terminated string.
        let bytes = unsafe { CStr::from_ptr(data) }.to_bytes();
        let fits = bytes.len() <= buf.len();
        if fits {
            buf[..bytes.len()].copy_from_slice(bytes);
        }
        let len = bytes.len();
        // SAFETY: data came from ddi_prop_lookup_string and is freed once.
        unsafe { ffi::ddi_prop_free(data.cast()) };
        match (fits, fits.then(|| core::str::from_utf8(&buf[..len]))) {
            (true, Some(Ok(s))) => StrProp::Value(s),
            _ => StrProp::Unusable,
        }
    }

    /// Calls `f` with the node's `reg` property (pci(5): five cells per
    /// register set) and returns what it returns, or `None` if absent.
    pub fn with_reg_property<R>(self, f: impl FnOnce(&[i32]) -> R) -> Option<R> {
        let mut data: *mut c_int = core::ptr::null_mut();
        let mut count: c_uint = 0;
        // SAFETY: valid node; on success the DDI returns an int array of
        // `count` elements that we free with ddi_prop_free.
        let rc = unsafe {
            ffi::ddi_prop_lookup_int_array(
                ffi::DDI_DEV_T_ANY,
                self.as_ptr(),
                ffi::DDI_PROP_DONTPASS,
                c"reg".as_ptr() as *mut c_char,
                &mut data,
                &mut count,
            )
        };
        if rc != ffi::DDI_PROP_SUCCESS || data.is_null() {
            return None;
        }
        // SAFETY: the DDI guarantees `count` valid ints at `data` until freed.
        let cells = unsafe { core::slice::from_raw_parts(data, count as usize) };
        let r = f(cells);
        // SAFETY: freed exactly once, after the last use of `cells`.
        unsafe { ffi::ddi_prop_free(data.cast()) };
        Some(r)
    }

    /// `ddi_report_dev(9F)`
    pub fn report(self) {
        // SAFETY: valid node.
        unsafe { ffi::ddi_report_dev(self.as_ptr()) }
    }
}

/// A string property as [`Dip::prop_string`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrProp<'b> {
    /// Not set.
    Absent,
    /// Its value.
    Value(&'b str),
    /// Set, but longer than the buffer or not UTF-8.
    Unusable,
}
