//! Device nodes (`dev_info_t`) and their properties.

use crate::machine::{Machine, bump, lock};
use rvscsi::ffi::{self, dev_info_t};
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// A property value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prop {
    /// An integer.
    Int(i32),
    /// An integer array (e.g. `reg`).
    Ints(Vec<i32>),
    /// A 64-bit integer (`ndi_prop_update_int64`, e.g. `lun64`).
    Int64(i64),
    /// A string.
    Str(String),
}

/// What kind of node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// The HBA's PCI function.
    Hba,
    /// An iport (unit address, e.g. "iport0").
    Iport(CString),
    /// A SCSI child (unit address "target,lun").
    Child(CString),
}

/// A device node. `dev_info_t *` values handed to the driver point at one.
pub struct DevInfo {
    /// The machine it lives on.
    pub machine: Arc<Machine>,
    /// Kind and unit address.
    pub kind: NodeKind,
    /// Parent node (null for the HBA).
    pub parent: *mut dev_info_t,
    /// Instance number.
    pub instance: i32,
    /// Node name.
    pub name: CString,
    /// Driver name.
    pub driver: CString,
    /// Properties (driver.conf tunables, hardware properties).
    pub props: Mutex<HashMap<String, Prop>>,
    /// `ddi_set_driver_private` / the framework's tran.
    pub driver_private: AtomicPtr<c_void>,
    /// Where the framework is with the node ([`NodeState`] as a u8): what
    /// `DEVI_IS_ATTACHING`/`DEVI_IS_DETACHING` test (sys/ddi_impldefs.h),
    /// which `ddi_fm_init(9F)`/`ddi_fm_fini(9F)` require.
    pub state: AtomicU8,
}

/// The framework's phase of a node (the bed sets it around attach(9E) and
/// detach(9E)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeState {
    /// Neither attaching nor detaching (attached, or not yet).
    Idle = 0,
    /// Inside attach(9E) (`DEVI_IS_ATTACHING`).
    Attaching = 1,
    /// Inside detach(9E) (`DEVI_IS_DETACHING`).
    Detaching = 2,
}

// SAFETY: the raw parent pointer names another registered node; nodes are
// only freed by the test bed when no driver code can reach them.
unsafe impl Send for DevInfo {}
// SAFETY: as above; mutable state is behind locks or atomics.
unsafe impl Sync for DevInfo {}

static NODES: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

impl DevInfo {
    /// Creates a node and returns the pointer the driver sees.
    pub fn create(
        machine: Arc<Machine>,
        kind: NodeKind,
        parent: *mut dev_info_t,
        instance: i32,
        name: &str,
    ) -> *mut dev_info_t {
        let node = Box::new(DevInfo {
            machine,
            kind,
            parent,
            instance,
            name: CString::new(name).unwrap_or_default(),
            driver: CString::new("rvscsi").unwrap_or_default(),
            props: Mutex::new(HashMap::new()),
            driver_private: AtomicPtr::new(std::ptr::null_mut()),
            state: AtomicU8::new(NodeState::Idle as u8),
        });
        let p = Box::into_raw(node);
        lock(&NODES)
            .get_or_insert_with(HashSet::new)
            .insert(p as usize);
        p.cast()
    }

    /// Frees a node made by [`DevInfo::create`].
    ///
    /// # Safety
    /// No driver code may use `dip` afterwards.
    pub unsafe fn destroy(dip: *mut dev_info_t) {
        if lock(&NODES)
            .get_or_insert_with(HashSet::new)
            .remove(&(dip as usize))
        {
            // SAFETY: registered, so made by Box::into_raw in create().
            drop(unsafe { Box::from_raw(dip.cast::<DevInfo>()) });
            // Its FM state (the service state lives in the node on
            // illumos) goes with it: a node made later at the same
            // address starts up.
            super::fm::forget_node(dip);
        }
    }

    /// Enters `state` (the bed, around attach(9E) and detach(9E)).
    pub fn set_state(&self, state: NodeState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// The framework's phase of the node.
    pub fn node_state(&self) -> NodeState {
        match self.state.load(Ordering::Acquire) {
            1 => NodeState::Attaching,
            2 => NodeState::Detaching,
            _ => NodeState::Idle,
        }
    }

    /// Sets a property.
    pub fn set_prop(&self, name: &str, p: Prop) {
        lock(&self.props).insert(name.to_string(), p);
    }

    /// The unit address of an iport or child.
    pub fn unit_address(&self) -> Option<&CStr> {
        match &self.kind {
            NodeKind::Hba => None,
            NodeKind::Iport(ua) | NodeKind::Child(ua) => Some(ua),
        }
    }
}

/// The node behind `dip`, if it is one of ours (a violation otherwise).
pub fn node<'a>(dip: *mut dev_info_t, func: &str) -> Option<&'a DevInfo> {
    let known = !dip.is_null()
        && lock(&NODES)
            .get_or_insert_with(HashSet::new)
            .contains(&(dip as usize));
    if !known {
        super::violation(format!("{func}: invalid dev_info_t {dip:p}"));
        return None;
    }
    // SAFETY: registered nodes are live DevInfo boxes.
    Some(unsafe { &*dip.cast::<DevInfo>() })
}

/// Looks a property up on `dip` and, unless `DDI_PROP_DONTPASS`, its
/// parents.
fn lookup(dip: *mut dev_info_t, flags: c_uint, name: *const c_char, func: &str) -> Option<Prop> {
    if name.is_null() {
        super::violation(format!("{func}: null property name"));
        return None;
    }
    // SAFETY: the driver passes a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(name) }.to_str().ok()?.to_string();
    let mut d = dip;
    loop {
        let n = node(d, func)?;
        if let Some(p) = lock(&n.props).get(&name) {
            return Some(p.clone());
        }
        if flags & ffi::DDI_PROP_DONTPASS != 0 || n.parent.is_null() {
            return None;
        }
        d = n.parent;
    }
}

/// A property value handed to the driver, kept alive until
/// `ddi_prop_free`.
enum Handed {
    Ints(#[allow(dead_code)] Box<[i32]>),
    Str(#[allow(dead_code)] Box<[u8]>),
}

/// A handed-out value and the machine it is accounted to.
type HandedValue = (Handed, Arc<Machine>);

/// Property values handed out by the lookup functions, by address: what
/// `ddi_prop_free` may free.
static PROP_VALUES: Mutex<Option<HashMap<usize, HandedValue>>> = Mutex::new(None);

fn hand_out(n: &DevInfo, value: Handed, addr: usize) {
    bump(&n.machine.live.prop_values, 1);
    lock(&PROP_VALUES)
        .get_or_insert_with(HashMap::new)
        .insert(addr, (value, n.machine.clone()));
}

/// `ddi_get_instance(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_get_instance(dip: *mut dev_info_t) -> c_int {
    let _kernel = crate::meter::kernel();
    node(dip, "ddi_get_instance").map_or(-1, |n| n.instance)
}

/// `ddi_get_parent(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_get_parent(dip: *mut dev_info_t) -> *mut dev_info_t {
    let _kernel = crate::meter::kernel();
    node(dip, "ddi_get_parent").map_or(std::ptr::null_mut(), |n| n.parent)
}

/// `ddi_get_driver_private(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_get_driver_private(dip: *mut dev_info_t) -> *mut c_void {
    let _kernel = crate::meter::kernel();
    node(dip, "ddi_get_driver_private").map_or(std::ptr::null_mut(), |n| {
        n.driver_private.load(Ordering::Acquire)
    })
}

/// `ddi_set_driver_private(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_set_driver_private(dip: *mut dev_info_t, data: *mut c_void) {
    let _kernel = crate::meter::kernel();
    if let Some(n) = node(dip, "ddi_set_driver_private") {
        n.driver_private.store(data, Ordering::Release);
    }
}

/// `ddi_driver_name(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_driver_name(dip: *mut dev_info_t) -> *const c_char {
    let _kernel = crate::meter::kernel();
    node(dip, "ddi_driver_name").map_or(std::ptr::null(), |n| n.driver.as_ptr())
}

/// `ddi_node_name(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_node_name(dip: *mut dev_info_t) -> *mut c_char {
    let _kernel = crate::meter::kernel();
    node(dip, "ddi_node_name").map_or(std::ptr::null_mut(), |n| n.name.as_ptr().cast_mut())
}

/// `ddi_report_dev(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_report_dev(dip: *mut dev_info_t) {
    let _kernel = crate::meter::kernel();
    if let Some(n) = node(dip, "ddi_report_dev") {
        n.machine.log_line(
            ffi::CE_CONT,
            &format!("{}{} reported", n.driver.to_string_lossy(), n.instance),
        );
    }
}

/// `ddi_prop_get_int(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_prop_get_int(
    _dev: ffi::dev_t,
    dip: *mut dev_info_t,
    flags: c_uint,
    name: *mut c_char,
    default: c_int,
) -> c_int {
    let _kernel = crate::meter::kernel();
    match lookup(dip, flags, name, "ddi_prop_get_int") {
        Some(Prop::Int(v)) => v,
        Some(Prop::Ints(v)) if !v.is_empty() => v[0],
        _ => default,
    }
}

/// `ddi_prop_lookup_int_array(9F)`
///
/// # Safety
/// Out-pointers must be valid (the driver's contract).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_prop_lookup_int_array(
    _dev: ffi::dev_t,
    dip: *mut dev_info_t,
    flags: c_uint,
    name: *mut c_char,
    datap: *mut *mut c_int,
    nelementsp: *mut c_uint,
) -> c_int {
    let _kernel = crate::meter::kernel();
    if datap.is_null() || nelementsp.is_null() {
        super::violation("ddi_prop_lookup_int_array: null out-pointer");
        return ffi::DDI_PROP_INVAL_ARG;
    }
    let ints = match lookup(dip, flags, name, "ddi_prop_lookup_int_array") {
        Some(Prop::Ints(v)) => v,
        Some(Prop::Int(v)) => vec![v],
        _ => return ffi::DDI_PROP_NOT_FOUND,
    };
    let Some(n) = node(dip, "ddi_prop_lookup_int_array") else {
        return ffi::DDI_PROP_NOT_FOUND;
    };
    let values: Box<[i32]> = ints.into_boxed_slice();
    let len = values.len();
    let p = values.as_ptr().cast_mut();
    hand_out(n, Handed::Ints(values), p as usize);
    // SAFETY: checked non-null above.
    unsafe {
        *datap = p;
        *nelementsp = len as c_uint;
    }
    ffi::DDI_PROP_SUCCESS
}

/// `ddi_prop_lookup_string(9F)`
///
/// # Safety
/// Out-pointer must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_prop_lookup_string(
    _dev: ffi::dev_t,
    dip: *mut dev_info_t,
    flags: c_uint,
    name: *mut c_char,
    datap: *mut *mut c_char,
) -> c_int {
    let _kernel = crate::meter::kernel();
    if datap.is_null() {
        super::violation("ddi_prop_lookup_string: null out-pointer");
        return ffi::DDI_PROP_INVAL_ARG;
    }
    let Some(Prop::Str(s)) = lookup(dip, flags, name, "ddi_prop_lookup_string") else {
        return ffi::DDI_PROP_NOT_FOUND;
    };
    let Some(n) = node(dip, "ddi_prop_lookup_string") else {
        return ffi::DDI_PROP_NOT_FOUND;
    };
    let mut bytes = s.into_bytes();
    bytes.push(0);
    let bytes = bytes.into_boxed_slice();
    let p = bytes.as_ptr().cast_mut();
    hand_out(n, Handed::Str(bytes), p as usize);
    // SAFETY: checked non-null above.
    unsafe { *datap = p.cast() };
    ffi::DDI_PROP_SUCCESS
}

/// `ddi_prop_free(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_prop_free(data: *mut c_void) {
    let _kernel = crate::meter::kernel();
    match lock(&PROP_VALUES)
        .get_or_insert_with(HashMap::new)
        .remove(&(data as usize))
    {
        Some((value, m)) => {
            bump(&m.live.prop_values, -1);
            drop(value);
        }
        None => super::violation(format!(
            "ddi_prop_free of {data:p}, which no lookup returned"
        )),
    }
}
