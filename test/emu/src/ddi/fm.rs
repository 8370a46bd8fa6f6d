//! Fault management: `ddi_fm_init(9F)`, `ddi_fm_fini`, `ddi_fm_capable`,
//! `ddi_fm_ereport_post(9F)` (its variadic list is parsed in
//! csrc/variadic.c and handed to [`rvscsi_emu_ereport_post`]),
//! `ddi_fm_service_impact(9F)`, `ddi_fm_acc_err_get(9F)`,
//! `ddi_fm_dma_err_get`, `fm_ena_generate`, modelled on
//! uts/common/os/ddifm.c and fm.c, and the reader of what was posted
//! (`fmdump -e`).
//!
//! What illumos does, and what is recorded:
//! - `ddi_fm_init` outside attach (`!DEVI_IS_ATTACHING`) posts the driver
//!   defect `ereport.io.ddi.context` and grants nothing: a violation here;
//!   asking for nothing creates no handle; otherwise it creates the FM
//!   handle and its `<driver>:<instance>:fm` kstat (if that kstat cannot be
//!   made it grants nothing) and grants what was asked and the parent
//!   supports. A second init is a violation (illumos overwrites, leaking).
//! - `ddi_fm_fini` asserts a handle and dereferences it: without one, a
//!   violation; outside attach and detach it posts `ddi.context` and
//!   returns (the handle stays: a leak), a violation too. A handle still
//!   there after detach is a leak ("FM handles").
//! - `ddi_fm_ereport_post`: without `DDI_FM_EREPORT_CAPABLE` the report is
//!   dropped (a violation here: the driver should not post); `DDI_SLEEP`
//!   in interrupt context is a driver defect, dropped (a violation); the
//!   first payload member must be `version`/`DATA_TYPE_UINT8` or it is a
//!   defect (`ddi.version`), dropped (a violation); the class gets
//!   `ereport.io.`; an ENA of 0 is generated.
//! - `ddi_fm_service_impact` moves the node's service state and posts
//!   `service.<impact>` through the same path (dropped silently without
//!   the ereport capability, as in illumos: no violation).
//! - `ddi_fm_acc_err_get`/`ddi_fm_dma_err_get` with a version other than
//!   VER0/VER1 panic (a violation); a NULL handle returns (a violation
//!   here); otherwise the handle's error status is returned (set by
//!   [`inject_acc_fault`]/[`inject_dma_fault`], the emulated nexus).

use super::devinfo::{NodeState, node};
use super::violation;
use crate::machine::{Machine, bump, lock};
use rvscsi::ffi::{self, ddi_acc_handle_t, ddi_dma_handle_t, ddi_fm_error_t, dev_info_t, kstat_t};
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, Weak};

/// The capabilities the emulated PCI nexus supports for its children (as
/// npe/pcieb do: ereports, error callbacks, access and DMA checks).
pub const NEXUS_CAPS: c_int = ffi::DDI_FM_EREPORT_CAPABLE
    | ffi::DDI_FM_ERRCB_CAPABLE
    | ffi::DDI_FM_ACCCHK_CAPABLE
    | ffi::DDI_FM_DMACHK_CAPABLE;

/// A node's service state (`DEVI_DEVICE_DOWN`, `DEVI_DEVICE_DEGRADED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceState {
    /// Up (no impact reported, or restored).
    #[default]
    Up,
    /// Degraded.
    Degraded,
    /// Down (service lost).
    Down,
}

struct FmHandle {
    cap: c_int,
    ksp: *mut kstat_t,
}

#[derive(Default)]
struct NodeFm {
    handle: Option<FmHandle>,
    service: ServiceState,
}

// SAFETY: the kstat pointer names an emulated kstat, used under FM's lock.
unsafe impl Send for NodeFm {}

static NODES: Mutex<Option<HashMap<usize, NodeFm>>> = Mutex::new(None);
static PARENT_CAPS: Mutex<Vec<(Weak<Machine>, c_int)>> = Mutex::new(Vec::new());
static EREPORTS: Mutex<Vec<(Weak<Machine>, Ereport)>> = Mutex::new(Vec::new());
static FAULTS: Mutex<Option<HashMap<usize, (c_int, u64)>>> = Mutex::new(None);

fn with_node<R>(dip: *mut dev_info_t, f: impl FnOnce(&mut NodeFm) -> R) -> R {
    let mut g = lock(&NODES);
    f(g.get_or_insert_with(HashMap::new)
        .entry(dip as usize)
        .or_default())
}

/// Makes the emulated nexus of `m` support only `caps` (default
/// [`NEXUS_CAPS`]).
pub fn set_parent_caps(m: &Arc<Machine>, caps: c_int) {
    let mut p = lock(&PARENT_CAPS);
    p.retain(|(w, _)| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(m)));
    p.push((Arc::downgrade(m), caps));
}

fn parent_caps(m: &Machine) -> c_int {
    lock(&PARENT_CAPS)
        .iter()
        .find(|(w, _)| std::ptr::eq(w.as_ptr(), m))
        .map(|(_, c)| *c)
        .or(m.config().nexus_fm_caps)
        .unwrap_or(NEXUS_CAPS)
}

/// The FM capabilities of node `dip` (what `ddi_fm_capable` returns).
pub fn capabilities(dip: *mut dev_info_t) -> c_int {
    with_node(dip, |n| n.handle.as_ref().map_or(0, |h| h.cap))
}

/// Drops what FM kept of node `dip` (the node is being freed).
pub fn forget_node(dip: *mut dev_info_t) {
    if let Some(nodes) = lock(&NODES).as_mut() {
        nodes.remove(&(dip as usize));
    }
}

/// The service state of node `dip`.
pub fn service_state(dip: *mut dev_info_t) -> ServiceState {
    with_node(dip, |n| n.service)
}

/// A payload member's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// An integer type (uint8, uint32, uint64, int*, boolean_value).
    Int(u64),
    /// A string.
    Str(String),
    /// `DATA_TYPE_BOOLEAN` (no value).
    Flag,
}

/// A posted ereport, as fmd would log it.
#[derive(Clone, Debug)]
pub struct Ereport {
    /// When (`gethrtime` of the emulated kernel, ns).
    pub time: i64,
    /// The full class (`ereport.io.device.no_response`).
    pub class: String,
    /// Its ENA.
    pub ena: u64,
    /// The detector's device path.
    pub detector: String,
    /// The payload after `version`: (name, type, value).
    pub payload: Vec<(String, c_int, Payload)>,
}

impl Ereport {
    /// The value of payload member `name`.
    pub fn member(&self, name: &str) -> Option<&Payload> {
        self.payload
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
    }
}

fn record(m: &Arc<Machine>, e: Ereport) {
    lock(&EREPORTS).push((Arc::downgrade(m), e));
}

/// Every ereport posted on `m`, in order.
pub fn ereports(m: &Machine) -> Vec<Ereport> {
    lock(&EREPORTS)
        .iter()
        .filter(|(w, _)| std::ptr::eq(w.as_ptr(), m))
        .map(|(_, e)| e.clone())
        .collect()
}

fn type_name(t: c_int) -> &'static str {
    match t {
        ffi::DATA_TYPE_UINT8 => "uint8",
        ffi::DATA_TYPE_UINT32 => "uint32",
        ffi::DATA_TYPE_UINT64 => "uint64",
        ffi::DATA_TYPE_STRING => "string",
        _ => "other",
    }
}

/// What `fmdump -eV` shows of the ereports of `m` (`-e` alone: the TIME
/// and CLASS lines; here each is followed by its ENA, detector and
/// payload, indented). TIME is the emulated kernel's `gethrtime` in
/// seconds (there is no wall clock in the bed).
pub fn fmdump_e(m: &Machine) -> String {
    let mut out = String::from("TIME                 CLASS\n");
    for e in ereports(m) {
        let _ = writeln!(
            out,
            "{:>10}.{:09} {}",
            e.time / 1_000_000_000,
            e.time % 1_000_000_000,
            e.class
        );
        let _ = writeln!(out, "        ena = {:#x}", e.ena);
        let _ = writeln!(out, "        detector = dev://{}", e.detector);
        for (n, t, v) in &e.payload {
            let v = match v {
                Payload::Int(i) => format!("{i:#x}"),
                Payload::Str(s) => s.clone(),
                Payload::Flag => "1".into(),
            };
            let _ = writeln!(out, "        {n} = {v} ({})", type_name(*t));
        }
    }
    out
}

fn detector(dip: *mut dev_info_t) -> String {
    node(dip, "ereport").map_or_else(String::new, |n| {
        format!("/pci@0,0/{}@{}", n.driver.to_string_lossy(), n.instance)
    })
}

fn generate_ena() -> u64 {
    fm_ena_generate(0, ffi::FM_ENA_FMT1)
}

/// Posts a driver-defect ereport (`ereport.io.ddi.<what>`), as
/// `i_ddi_drv_ereport_post` does against the root node.
fn driver_defect(m: &Arc<Machine>, dip: *mut dev_info_t, what: &str) {
    let name =
        node(dip, "ereport").map_or_else(String::new, |n| n.driver.to_string_lossy().into_owned());
    record(
        m,
        Ereport {
            time: super::time::gethrtime(),
            class: format!(
                "{}.{}.{}{what}",
                ffi::FM_EREPORT_CLASS,
                ffi::DDI_IO_CLASS,
                ffi::DVR_ERPT
            ),
            ena: generate_ena(),
            detector: "/".into(),
            payload: vec![("dvr-name".into(), ffi::DATA_TYPE_STRING, Payload::Str(name))],
        },
    );
}

/// The post path shared by `ddi_fm_ereport_post` and the service impact:
/// false (and nothing recorded) without the ereport capability.
fn post(
    m: &Arc<Machine>,
    dip: *mut dev_info_t,
    class: &str,
    ena: u64,
    payload: Vec<(String, c_int, Payload)>,
) -> bool {
    if capabilities(dip) & ffi::DDI_FM_EREPORT_CAPABLE == 0 {
        return false;
    }
    record(
        m,
        Ereport {
            time: super::time::gethrtime(),
            class: format!("{}.{}.{class}", ffi::FM_EREPORT_CLASS, ffi::DDI_IO_CLASS),
            ena: if ena == 0 { generate_ena() } else { ena },
            detector: detector(dip),
            payload,
        },
    );
    true
}

/// `ddi_fm_init(9F)`
///
/// # Safety
/// `fmcap` points at an int; `ibcp` is NULL or points at a cookie.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ddi_fm_init(
    dip: *mut dev_info_t,
    fmcap: *mut c_int,
    ibcp: *mut ffi::ddi_iblock_cookie_t,
) {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_fm_init") else {
        return;
    };
    let m = n.machine.clone();
    if fmcap.is_null() {
        violation("ddi_fm_init: NULL fmcap");
        return;
    }
    super::sync::check_may_sleep("ddi_fm_init");
    if n.node_state() != NodeState::Attaching {
        violation(
            "ddi_fm_init outside attach(9E) (illumos posts ereport.io.ddi.context, grants nothing)",
        );
        driver_defect(&m, dip, ffi::DVR_ECONTEXT);
        // SAFETY: checked non-null.
        unsafe { *fmcap = ffi::DDI_FM_NOT_CAPABLE };
        return;
    }
    // SAFETY: checked non-null.
    let wanted = unsafe { *fmcap };
    if wanted == ffi::DDI_FM_NOT_CAPABLE {
        return;
    }
    if with_node(dip, |f| f.handle.is_some()) {
        violation("ddi_fm_init twice on one node (illumos overwrites the FM handle, leaking it)");
        return;
    }
    let driver = n.driver.to_string_lossy().into_owned();
    let ksp = super::kstat::create_internal(&m, &driver, n.instance, "fm", "misc", 5);
    if ksp.is_null() {
        // SAFETY: checked non-null.
        unsafe { *fmcap = ffi::DDI_FM_NOT_CAPABLE };
        return;
    }
    // The FM handle's counters (ddifm.c ddifm_kstat_template).
    for (i, name) in [
        c"erpt_dropped",
        c"fm_cache_full",
        c"fm_cache_grew",
        c"acc_err",
        c"dma_err",
    ]
    .iter()
    .enumerate()
    {
        // SAFETY: the fm kstat just made holds 5 named entries.
        unsafe {
            super::kstat::kstat_named_init(
                (*ksp).ks_data.cast::<ffi::kstat_named_t>().add(i),
                name.as_ptr(),
                ffi::KSTAT_DATA_UINT64,
            );
        }
    }
    // SAFETY: the kstat just made.
    unsafe { super::kstat::kstat_install(ksp) };
    let granted = wanted & parent_caps(&m) & NEXUS_CAPS;
    with_node(dip, |f| f.handle = Some(FmHandle { cap: granted, ksp }));
    bump(&m.live.fm_handles, 1);
    // SAFETY: checked non-null; ibcp is the caller's or NULL.
    unsafe {
        *fmcap = granted;
        if !ibcp.is_null() {
            // A priority cookie (ipltospl(FM_ERR_PIL)); only compared.
            *ibcp = std::ptr::without_provenance_mut(9);
        }
    }
}

/// `ddi_fm_fini(9F)`
#[unsafe(no_mangle)]
pub extern "C" fn ddi_fm_fini(dip: *mut dev_info_t) {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_fm_fini") else {
        return;
    };
    let m = n.machine.clone();
    if with_node(dip, |f| f.handle.is_none()) {
        violation("ddi_fm_fini without an FM handle (illumos asserts one and dereferences NULL)");
        return;
    }
    if !matches!(n.node_state(), NodeState::Attaching | NodeState::Detaching) {
        violation(
            "ddi_fm_fini outside attach(9E)/detach(9E) (illumos posts ddi.context and keeps the handle)",
        );
        driver_defect(&m, dip, ffi::DVR_ECONTEXT);
        return;
    }
    if let Some(h) = with_node(dip, |f| f.handle.take()) {
        super::kstat::delete(h.ksp, true);
        bump(&m.live.fm_handles, -1);
    }
}

/// `ddi_fm_capable(9F)`: any context.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_fm_capable(dip: *mut dev_info_t) -> c_int {
    let _kernel = crate::meter::kernel();
    if node(dip, "ddi_fm_capable").is_none() {
        return 0;
    }
    capabilities(dip)
}

/// `ddi_fm_service_impact(9F)`: any context.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_fm_service_impact(dip: *mut dev_info_t, impact: c_int) {
    let _kernel = crate::meter::kernel();
    let Some(n) = node(dip, "ddi_fm_service_impact") else {
        return;
    };
    let m = n.machine.clone();
    let class = |leaf: &str| format!("{}.{leaf}", ffi::DDI_FM_SERVICE_IMPACT);
    let version = vec![];
    let leaf = match impact {
        ffi::DDI_SERVICE_LOST => {
            with_node(dip, |f| f.service = ServiceState::Down);
            ffi::DDI_FM_SERVICE_LOST
        }
        ffi::DDI_SERVICE_DEGRADED => {
            // Degraded after lost stays down and reports lost (ddifm.c).
            if with_node(dip, |f| {
                if f.service == ServiceState::Down {
                    true
                } else {
                    f.service = ServiceState::Degraded;
                    false
                }
            }) {
                ffi::DDI_FM_SERVICE_LOST
            } else {
                ffi::DDI_FM_SERVICE_DEGRADED
            }
        }
        ffi::DDI_SERVICE_RESTORED => {
            with_node(dip, |f| f.service = ServiceState::Up);
            ffi::DDI_FM_SERVICE_RESTORED
        }
        ffi::DDI_SERVICE_UNAFFECTED => ffi::DDI_FM_SERVICE_UNAFFECTED,
        other => {
            violation(format!(
                "ddi_fm_service_impact: {other} is no DDI_SERVICE_* (illumos ignores it)"
            ));
            return;
        }
    };
    post(&m, dip, &class(leaf), generate_ena(), version);
}

/// What csrc/variadic.c parsed from `ddi_fm_ereport_post`'s list.
///
/// # Safety
/// `class` is NUL-terminated; the arrays hold `n` entries; each name and
/// each non-NULL string is NUL-terminated.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rvscsi_emu_ereport_post(
    dip: *mut c_void,
    class: *const c_char,
    ena: u64,
    sflag: c_int,
    n: c_int,
    names: *const *const c_char,
    types: *const c_int,
    values: *const u64,
    strings: *const *const c_char,
    bad_type: c_int,
) {
    let _kernel = crate::meter::kernel();
    let dip = dip.cast::<dev_info_t>();
    let Some(node) = node(dip, "ddi_fm_ereport_post") else {
        return;
    };
    let m = node.machine.clone();
    if class.is_null() {
        violation("ddi_fm_ereport_post: NULL class");
        return;
    }
    // SAFETY: the caller's contract.
    let class = unsafe { CStr::from_ptr(class) }
        .to_string_lossy()
        .into_owned();
    if capabilities(dip) & ffi::DDI_FM_EREPORT_CAPABLE == 0 {
        violation(format!(
            "ddi_fm_ereport_post({class}) without DDI_FM_EREPORT_CAPABLE (illumos drops it)"
        ));
        return;
    }
    if sflag == ffi::DDI_SLEEP && super::sync::in_interrupt() {
        violation(format!(
            "ddi_fm_ereport_post({class}, DDI_SLEEP) in interrupt context (a driver defect; dropped)"
        ));
        driver_defect(&m, dip, ffi::DVR_ECONTEXT);
        return;
    }
    if bad_type != 0 {
        violation(format!(
            "ddi_fm_ereport_post({class}): payload type {bad_type} the emulation does not parse"
        ));
        return;
    }
    let mut members = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: n entries (the caller's contract).
        let (name, t, v, s) = unsafe {
            (
                *names.add(i),
                *types.add(i),
                *values.add(i),
                *strings.add(i),
            )
        };
        // SAFETY: NUL-terminated names.
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let value = match t {
            ffi::DATA_TYPE_STRING if s.is_null() => {
                violation(format!(
                    "ddi_fm_ereport_post({class}): member {name} is a NULL string"
                ));
                return;
            }
            ffi::DATA_TYPE_STRING => {
                // SAFETY: checked non-NULL above; NUL-terminated (the
                // caller's contract).
                Payload::Str(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
            }
            1 => Payload::Flag,
            _ => Payload::Int(v),
        };
        members.push((name, t, value));
    }
    match members.first() {
        Some((name, t, Payload::Int(_)))
            if name == ffi::FM_VERSION && *t == ffi::DATA_TYPE_UINT8 => {}
        _ => {
            violation(format!(
                "ddi_fm_ereport_post({class}): the first member is not version/DATA_TYPE_UINT8 \
                 (illumos posts ddi.version and drops it)"
            ));
            driver_defect(&m, dip, ffi::DVR_EVER);
            return;
        }
    }
    members.remove(0);
    post(&m, dip, &class, ena, members);
}

/// `fm_ena_generate(9F)` (fm.c `fm_ena_generate_cpu`): format 1 is
/// format | cpu id << 10 | time << 20; format 2 is format | time << 2.
#[unsafe(no_mangle)]
pub extern "C" fn fm_ena_generate(timestamp: u64, format: u8) -> u64 {
    let _kernel = crate::meter::kernel();
    let cpu = super::cpu::current() as u64;
    match format {
        1 => {
            let t = if timestamp != 0 {
                timestamp
            } else {
                super::time::gethrtime() as u64
            };
            1 | ((cpu << 10) & 0x0000_0000_000F_FC00) | ((t << 20) & 0xFFFF_FFFF_FFF0_0000)
        }
        2 => 2 | ((timestamp << 2) & 0xFFFF_FFFF_FFFF_FFFC),
        _ => 0,
    }
}

/// Sets the error status the next `ddi_fm_acc_err_get` of `h` reports (as
/// the nexus does on a fault of a `DDI_FLAGERR_ACC` handle); DDI_FM_OK
/// clears it.
pub fn inject_acc_fault(h: ddi_acc_handle_t, status: c_int, ena: u64) {
    lock(&FAULTS)
        .get_or_insert_with(HashMap::new)
        .insert(h as usize, (status, ena));
}

/// The fault status handle `h` (access or DMA) holds now: `None` once
/// `ddi_fm_*_err_clear` (or an injection of DDI_FM_OK) cleared it.
pub fn recorded_fault(h: usize) -> Option<(c_int, u64)> {
    lock(&FAULTS)
        .get_or_insert_with(HashMap::new)
        .get(&h)
        .copied()
        .filter(|(status, _)| *status != ffi::DDI_FM_OK)
}

/// As [`inject_acc_fault`], for a DMA handle.
pub fn inject_dma_fault(h: ddi_dma_handle_t, status: c_int, ena: u64) {
    lock(&FAULTS)
        .get_or_insert_with(HashMap::new)
        .insert(h as usize, (status, ena));
}

/// The checks ddifm.c makes of a handle call's arguments (a NULL handle
/// returns at once, another version panics), and the emulation's own (a
/// handle that is not live): false, with the violation, if one fails.
fn handle_call_ok(func: &str, h: usize, live: bool, version: c_int) -> bool {
    if h == 0 {
        violation(format!(
            "{func}(NULL handle) (illumos returns without a word)"
        ));
        return false;
    }
    if version != ffi::DDI_FME_VER0 && version != ffi::DDI_FME_VER1 {
        violation(format!(
            "{func}: version {version} (illumos panics: invalid driver version)"
        ));
        return false;
    }
    if !live {
        violation(format!("{func}: invalid handle {h:#x}"));
        return false;
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn err_get(
    func: &str,
    h: usize,
    live: bool,
    flagged: bool,
    de: *mut ddi_fm_error_t,
    version: c_int,
    acc: bool,
) {
    if !handle_call_ok(func, h, live, version) {
        return;
    }
    if de.is_null() {
        violation(format!("{func}: NULL ddi_fm_error_t"));
        return;
    }
    // A fault is tied to a handle only if it flags errors (DDI_FLAGERR_ACC,
    // DDI_DMA_FLAGERR): otherwise the nexus cannot tell whose it was.
    let (status, ena) = lock(&FAULTS)
        .get_or_insert_with(HashMap::new)
        .get(&h)
        .copied()
        .filter(|_| flagged)
        .unwrap_or((ffi::DDI_FM_OK, 0));
    // SAFETY: checked non-null: the caller's structure.
    let de = unsafe { &mut *de };
    if status == ffi::DDI_FM_OK {
        de.fme_status = ffi::DDI_FM_OK;
        return;
    }
    de.fme_status = status;
    de.fme_ena = ena;
    de.fme_flag = ffi::DDI_FM_ERR_UNEXPECTED;
    if acc {
        de.fme_acc_handle = h as ddi_acc_handle_t;
    } else {
        de.fme_dma_handle = h as ddi_dma_handle_t;
    }
}

/// `ddi_fm_acc_err_get(9F)`: any context.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_fm_acc_err_get(h: ddi_acc_handle_t, de: *mut ddi_fm_error_t, version: c_int) {
    let _kernel = crate::meter::kernel();
    err_get(
        "ddi_fm_acc_err_get",
        h as usize,
        super::acc::is_live(h),
        super::acc::flags_errors(h),
        de,
        version,
        true,
    );
}

/// `ddi_fm_dma_err_get(9F)`: any context.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_fm_dma_err_get(h: ddi_dma_handle_t, de: *mut ddi_fm_error_t, version: c_int) {
    let _kernel = crate::meter::kernel();
    err_get(
        "ddi_fm_dma_err_get",
        h as usize,
        super::dma::is_live(h),
        super::dma::flags_errors(h),
        de,
        version,
        false,
    );
}

fn err_clear(func: &str, h: usize, live: bool, version: c_int) {
    if !handle_call_ok(func, h, live, version) {
        return;
    }
    // ddifm.c: the handle's status back to DDI_FM_OK, its ENA to 0, its
    // flag to DDI_FM_ERR_UNEXPECTED, whatever it was.
    lock(&FAULTS).get_or_insert_with(HashMap::new).remove(&h);
}

/// `ddi_fm_acc_err_clear(9F)`: any context (ddifm.c: "user, kernel, and
/// interrupt contexts").
#[unsafe(no_mangle)]
pub extern "C" fn ddi_fm_acc_err_clear(h: ddi_acc_handle_t, version: c_int) {
    let _kernel = crate::meter::kernel();
    err_clear(
        "ddi_fm_acc_err_clear",
        h as usize,
        super::acc::is_live(h),
        version,
    );
}

/// `ddi_fm_dma_err_clear(9F)`: any context.
#[unsafe(no_mangle)]
pub extern "C" fn ddi_fm_dma_err_clear(h: ddi_dma_handle_t, version: c_int) {
    let _kernel = crate::meter::kernel();
    err_clear(
        "ddi_fm_dma_err_clear",
        h as usize,
        super::dma::is_live(h),
        version,
    );
}
