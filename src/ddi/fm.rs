//! Fault management (FMA): `ddi_fm_init(9F)`, ereports
//! (`ddi_fm_ereport_post(9F)`, through the C shim), the service impact
//! (`ddi_fm_service_impact(9F)`) and the access/DMA handle checks
//! (`ddi_fm_acc_err_get(9F)`, `ddi_fm_dma_err_get(9F)`, each fault found
//! cleared with `ddi_fm_acc_err_clear(9F)`/`ddi_fm_dma_err_clear`)
//! (issue 15).
//!
//! What the DDI does (uts/common/os/ddifm.c):
//! - `ddi_fm_init` works only while the node attaches (`DEVI_IS_ATTACHING`;
//!   otherwise it posts a driver-defect ereport and grants nothing); the
//!   capabilities granted are those asked for that the parent nexus also
//!   supports; asking for none creates no FM handle;
//! - `ddi_fm_fini` must be called from detach(9E) (or a failing attach)
//!   and only after an `ddi_fm_init` that created a handle (it asserts one
//!   and dereferences it);
//! - an ereport without `DDI_FM_EREPORT_CAPABLE` is dropped; with
//!   `DDI_SLEEP` in interrupt context it is a driver defect and dropped:
//!   the shim always posts `DDI_NOSLEEP`, usable in any context;
//! - `ddi_fm_service_impact` posts `ereport.io.service.<impact>` and moves
//!   the node's state (down, degraded, up), in any context.
//!
//! The payload of each ereport is fixed by the shim's wrapper
//! (`rvscsi_shim_ereport_post`, c-shim/rvscsi.h): the required `version`,
//! an optional `detail` string and up to two `uint64` members.

use super::Dip;
use super::dma::DmaBuffer;
use super::regs::RegMap;
use crate::ffi;
use core::ffi::{CStr, c_int};

bitflags::bitflags! {
    /// FM capabilities (`DDI_FM_*_CAPABLE`, sys/ddifm.h).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FmCaps: i32 {
        /// `DDI_FM_EREPORT_CAPABLE`: the driver may post ereports.
        const EREPORT = ffi::DDI_FM_EREPORT_CAPABLE;
        /// `DDI_FM_ACCCHK_CAPABLE`: access handles made with
        /// `DDI_FLAGERR_ACC` report faults to `ddi_fm_acc_err_get`.
        const ACCCHK = ffi::DDI_FM_ACCCHK_CAPABLE;
        /// `DDI_FM_DMACHK_CAPABLE`: DMA handles made with
        /// `DDI_DMA_FLAGERR` report faults to `ddi_fm_dma_err_get`.
        const DMACHK = ffi::DDI_FM_DMACHK_CAPABLE;
        /// `DDI_FM_ERRCB_CAPABLE`: an error callback
        /// (`ddi_fm_handler_register(9F)`, which the driver does not use).
        const ERRCB = ffi::DDI_FM_ERRCB_CAPABLE;
    }
}

impl FmCaps {
    /// What rvscsi asks for: ereports and the handle checks. Not ERRCB: it
    /// registers no error handler.
    pub const WANTED: FmCaps = FmCaps::EREPORT.union(FmCaps::ACCCHK).union(FmCaps::DMACHK);
}

/// An ereport class the driver posts; the DDI prefixes `ereport.io.`
/// (ddifm.c `fm_dev_ereport_postv`, `fm_ereport_set`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EreportClass {
    /// `device.no_response` (`DDI_FM_DEVICE_NO_RESPONSE`).
    NoResponse,
    /// `device.inval_state` (`DDI_FM_DEVICE_INVAL_STATE`).
    InvalState,
    /// `device.stall` (`DDI_FM_DEVICE_STALL`).
    Stall,
    /// `device.intern_uncorr` (`DDI_FM_DEVICE_INTERN_UNCORR`).
    InternalUncorrectable,
}

impl EreportClass {
    /// The class as `ddi_fm_ereport_post(9F)` takes it (without `io.`).
    pub fn as_c_str(self) -> &'static CStr {
        match self {
            EreportClass::NoResponse => c"device.no_response",
            EreportClass::InvalState => c"device.inval_state",
            EreportClass::Stall => c"device.stall",
            EreportClass::InternalUncorrectable => c"device.intern_uncorr",
        }
    }
}

/// The faults the driver reports (issue 15), each with its class and the
/// `detail` member of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceFault {
    /// The device stopped answering (every command timed out, no
    /// completion came back).
    NoResponse,
    /// A device reset did not bring the device back.
    ResetFailed,
    /// The device set DEVICE_NEEDS_RESET (virtio 1.2 §2.1.1).
    NeedsReset,
    /// The device broke the ring protocol: a completion index more than a
    /// ring ahead.
    RingProtocol,
    /// A completion naming no command outstanding: a duplicate, an id
    /// never issued, or one the device cannot have been given.
    BadCompletion,
    /// The I/O framework reported a fault on a register access handle
    /// (`ddi_fm_acc_err_get(9F)`).
    AccessHandle,
    /// ... on a DMA handle (`ddi_fm_dma_err_get(9F)`).
    DmaHandle,
}

impl DeviceFault {
    /// Its ereport class.
    pub fn class(self) -> EreportClass {
        match self {
            DeviceFault::NoResponse => EreportClass::NoResponse,
            DeviceFault::ResetFailed | DeviceFault::NeedsReset => EreportClass::InvalState,
            DeviceFault::RingProtocol
            | DeviceFault::BadCompletion
            | DeviceFault::AccessHandle
            | DeviceFault::DmaHandle => EreportClass::InternalUncorrectable,
        }
    }

    /// Its `detail` payload member.
    pub fn detail(self) -> &'static CStr {
        match self {
            DeviceFault::NoResponse => c"device-not-responding",
            DeviceFault::ResetFailed => c"reset-failed",
            DeviceFault::NeedsReset => c"device-needs-reset",
            DeviceFault::RingProtocol => c"ring-protocol-violation",
            DeviceFault::BadCompletion => c"bad-completion",
            DeviceFault::AccessHandle => c"access-handle-fault",
            DeviceFault::DmaHandle => c"dma-handle-fault",
        }
    }
}

/// The service impact of a fault (`ddi_fault_impact_t`, sys/sunddi.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceImpact {
    /// `DDI_SERVICE_LOST`: the controller is unusable.
    Lost,
    /// `DDI_SERVICE_DEGRADED`: it works, worse.
    Degraded,
    /// `DDI_SERVICE_UNAFFECTED`
    Unaffected,
    /// `DDI_SERVICE_RESTORED`: back after a loss or degradation.
    Restored,
}

impl ServiceImpact {
    /// The `DDI_SERVICE_*` value.
    pub fn code(self) -> c_int {
        match self {
            ServiceImpact::Lost => ffi::DDI_SERVICE_LOST,
            ServiceImpact::Degraded => ffi::DDI_SERVICE_DEGRADED,
            ServiceImpact::Unaffected => ffi::DDI_SERVICE_UNAFFECTED,
            ServiceImpact::Restored => ffi::DDI_SERVICE_RESTORED,
        }
    }
}

/// A `uint64` payload member: its name and value.
pub type Member = (&'static CStr, u64);

/// What `ddi_fm_acc_err_get`/`ddi_fm_dma_err_get` found on a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleHealth {
    /// `DDI_FM_OK` (or the check is not granted: nothing can be known).
    Ok,
    /// `DDI_FM_NONFATAL`, with the error's ENA.
    NonFatal(u64),
    /// `DDI_FM_FATAL`, with the error's ENA.
    Fatal(u64),
    /// `DDI_FM_UNKNOWN` (or a status the DDI does not define).
    Unknown(u64),
}

impl HandleHealth {
    /// From `fme_status` and `fme_ena` of a `ddi_fm_error_t`.
    pub fn from_status(status: c_int, ena: u64) -> Self {
        match status {
            ffi::DDI_FM_OK => HandleHealth::Ok,
            ffi::DDI_FM_NONFATAL => HandleHealth::NonFatal(ena),
            ffi::DDI_FM_FATAL => HandleHealth::Fatal(ena),
            _ => HandleHealth::Unknown(ena),
        }
    }

    /// Whether the handle saw a fault.
    pub fn is_faulted(self) -> bool {
        self != HandleHealth::Ok
    }

    /// `self` if it is a fault, else `next` (to fold the faults taken from
    /// several handles, every one of which must be taken).
    pub fn first_of(self, next: HandleHealth) -> HandleHealth {
        if self.is_faulted() { self } else { next }
    }

    /// The error's ENA (0 for Ok).
    pub fn ena(self) -> u64 {
        match self {
            HandleHealth::Ok => 0,
            HandleHealth::NonFatal(e) | HandleHealth::Fatal(e) | HandleHealth::Unknown(e) => e,
        }
    }

    /// Its `DDI_FM_*` status.
    pub fn status(self) -> c_int {
        match self {
            HandleHealth::Ok => ffi::DDI_FM_OK,
            HandleHealth::NonFatal(_) => ffi::DDI_FM_NONFATAL,
            HandleHealth::Fatal(_) => ffi::DDI_FM_FATAL,
            HandleHealth::Unknown(_) => ffi::DDI_FM_UNKNOWN,
        }
    }
}

/// The driver's FM state of one node: what `ddi_fm_init` granted, undone
/// by `ddi_fm_fini` on drop when `ddi_fm_init` created an FM handle.
pub struct Fma {
    dip: Dip,
    caps: FmCaps,
    /// Whether `ddi_fm_fini` is owed. ddi_fm_init creates the handle when
    /// asked for anything while attaching, even when the parent grants
    /// nothing, and fails to create it (granting nothing) when its own
    /// kstat cannot be made: granted nothing is ambiguous, so `ddi_fm_fini`
    /// (which dereferences the handle) is called only when something was
    /// granted. (Known gap: a parent granting nothing leaks the DDI's
    /// small handle until the node goes; no nexus rvscsi sits on does.)
    owes_fini: bool,
}

// SAFETY: the DDI's FM calls on a node are made from any thread (their
// CONTEXT sections: user, kernel, high-level interrupt); Fma holds no
// state beyond the node and the granted capabilities.
unsafe impl Send for Fma {}
// SAFETY: as above; `&Fma` only posts, reports impact and checks handles.
unsafe impl Sync for Fma {}

impl Fma {
    /// `ddi_fm_init(dip, &wanted, &ibc)` (from attach(9E) only).
    pub fn init(dip: Dip, wanted: FmCaps) -> Self {
        let mut cap: c_int = wanted.bits();
        let mut ibc: ffi::ddi_iblock_cookie_t = core::ptr::null_mut();
        if wanted.is_empty() {
            return Self::without(dip);
        }
        // SAFETY: a node in attach (caller); cap and ibc are our locals,
        // which the DDI writes.
        unsafe { ffi::ddi_fm_init(dip.as_ptr(), &mut cap, &mut ibc) };
        let caps = FmCaps::from_bits_truncate(cap);
        Self {
            dip,
            caps,
            owes_fini: !caps.is_empty(),
        }
    }

    /// No fault management on `dip` (nothing granted, nothing to undo).
    pub fn without(dip: Dip) -> Self {
        Self {
            dip,
            caps: FmCaps::empty(),
            owes_fini: false,
        }
    }

    /// What the DDI granted.
    pub fn caps(&self) -> FmCaps {
        self.caps
    }

    /// `fm_ena_generate(0, FM_ENA_FMT1)`: an ENA for a new error, shared by
    /// the ereports that report it.
    pub fn new_ena() -> u64 {
        // SAFETY: no pointers; callable from any context (fm.c).
        unsafe { ffi::fm_ena_generate(0, ffi::FM_ENA_FMT1) }
    }

    /// Posts `ereport.io.<class>` with the ENA `ena` (0: the DDI makes
    /// one), the `detail` string if any and up to two `uint64` members.
    /// Nothing is posted unless ereports were granted (the DDI would drop
    /// it). Any context: the shim posts `DDI_NOSLEEP`.
    pub fn post(&self, class: EreportClass, ena: u64, detail: Option<&CStr>, members: &[Member]) {
        if !self.caps.contains(FmCaps::EREPORT) {
            return;
        }
        let (n1, v1) = members
            .first()
            .map_or((core::ptr::null(), 0), |(n, v)| (n.as_ptr(), *v));
        let (n2, v2) = members
            .get(1)
            .map_or((core::ptr::null(), 0), |(n, v)| (n.as_ptr(), *v));
        // SAFETY: a node with an FM handle granting ereports; every string
        // is NUL-terminated or NULL where the shim allows NULL (detail,
        // names), and outlives the call (the DDI copies the payload).
        unsafe {
            crate::contract::shim::rvscsi_shim_ereport_post(
                self.dip.as_ptr(),
                class.as_c_str().as_ptr(),
                ena,
                detail.map_or(core::ptr::null(), CStr::as_ptr),
                n1,
                v1,
                n2,
                v2,
            )
        }
    }

    /// Posts the ereport of `fault` (its class and detail) with `members`.
    pub fn report(&self, fault: DeviceFault, ena: u64, members: &[Member]) {
        self.post(fault.class(), ena, Some(fault.detail()), members);
    }

    /// `ddi_fm_service_impact(dip, impact)`: any context. Made whatever was
    /// granted: the node's state changes even where the ereport it posts is
    /// dropped (ddifm.c).
    pub fn service_impact(&self, impact: ServiceImpact) {
        // SAFETY: a valid node; the impact is a DDI_SERVICE_* value.
        unsafe { ffi::ddi_fm_service_impact(self.dip.as_ptr(), impact.code()) }
    }

    /// Takes the fault the I/O framework recorded on the registers'
    /// handle: `ddi_fm_acc_err_get`, and if it shows one,
    /// `ddi_fm_acc_err_clear(9F)`, so that the handle reports only faults
    /// that come after (the caller deals with this one: the Writing Device
    /// Drivers guide's recovery is clear, reset the device to a known
    /// state, retry). Ok if the access check was not granted. Any context
    /// (ddifm.c: both "may be called from user, kernel, and interrupt
    /// contexts").
    pub fn take_regs_fault(&self, regs: &RegMap) -> HandleHealth {
        if !self.caps.contains(FmCaps::ACCCHK) {
            return HandleHealth::Ok;
        }
        let mut de = blank_error();
        // SAFETY: `regs` is a mapping we own, so its handle is live until
        // the RegMap drops; `de` is our local, initialised at the version
        // we pass, which the DDI fills in.
        unsafe { ffi::ddi_fm_acc_err_get(regs.acc_handle(), &mut de, ffi::DDI_FME_VERSION) };
        let health = HandleHealth::from_status(de.fme_status, de.fme_ena);
        if health.is_faulted() {
            // SAFETY: the same live handle, at a version ddifm.c accepts
            // (it panics on any other); clearing only writes the handle's
            // own error status.
            unsafe { ffi::ddi_fm_acc_err_clear(regs.acc_handle(), ffi::DDI_FME_VERSION) };
        }
        health
    }

    /// Takes the fault recorded on a DMA buffer's handle
    /// (`ddi_fm_dma_err_get`, then `ddi_fm_dma_err_clear(9F)` if faulted),
    /// as [`Self::take_regs_fault`]. The memory's contents are then
    /// indeterminate (the guide): the caller resets the device, which
    /// rewrites every ring from scratch. Ok if the DMA check was not
    /// granted. Any context.
    pub fn take_dma_fault(&self, buf: &DmaBuffer) -> HandleHealth {
        if !self.caps.contains(FmCaps::DMACHK) {
            return HandleHealth::Ok;
        }
        let mut de = blank_error();
        // SAFETY: `buf` is memory we own, bound to its live handle until
        // it drops; `de` is our local at the version we pass.
        unsafe { ffi::ddi_fm_dma_err_get(buf.dma_handle(), &mut de, ffi::DDI_FME_VERSION) };
        let health = HandleHealth::from_status(de.fme_status, de.fme_ena);
        if health.is_faulted() {
            // SAFETY: the same live handle, at an accepted version;
            // clearing only writes the handle's own error status.
            unsafe { ffi::ddi_fm_dma_err_clear(buf.dma_handle(), ffi::DDI_FME_VERSION) };
        }
        health
    }
}

fn blank_error() -> ffi::ddi_fm_error_t {
    ffi::ddi_fm_error_t {
        fme_version: ffi::DDI_FME_VERSION,
        fme_status: ffi::DDI_FM_OK,
        fme_flag: ffi::DDI_FM_ERR_UNEXPECTED,
        fme_ena: 0,
        fme_acc_handle: core::ptr::null_mut(),
        fme_dma_handle: core::ptr::null_mut(),
        fme_bus_specific: core::ptr::null_mut(),
        fme_bus_type: 0,
    }
}

impl Drop for Fma {
    fn drop(&mut self) {
        if self.owes_fini {
            // SAFETY: ddi_fm_init created the handle (something was
            // granted); the owner drops this in detach(9E) or a failing
            // attach, the contexts ddi_fm_fini allows.
            unsafe { ffi::ddi_fm_fini(self.dip.as_ptr()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    #[test]
    fn ereport_classes_are_the_ddi_device_classes() {
        for (class, leaf) in [
            (EreportClass::NoResponse, ffi::DDI_FM_DEVICE_NO_RESPONSE),
            (EreportClass::InvalState, ffi::DDI_FM_DEVICE_INVAL_STATE),
            (EreportClass::Stall, ffi::DDI_FM_DEVICE_STALL),
            (
                EreportClass::InternalUncorrectable,
                ffi::DDI_FM_DEVICE_INTERN_UNCORR,
            ),
        ] {
            assert_eq!(
                class.as_c_str().to_str().unwrap(),
                format!("{}.{leaf}", ffi::DDI_FM_DEVICE)
            );
        }
    }

    #[test]
    fn each_fault_has_its_class_and_a_distinct_detail() {
        let all = [
            DeviceFault::NoResponse,
            DeviceFault::ResetFailed,
            DeviceFault::NeedsReset,
            DeviceFault::RingProtocol,
            DeviceFault::BadCompletion,
            DeviceFault::AccessHandle,
            DeviceFault::DmaHandle,
        ];
        assert_eq!(DeviceFault::NoResponse.class(), EreportClass::NoResponse);
        assert_eq!(DeviceFault::ResetFailed.class(), EreportClass::InvalState);
        assert_eq!(DeviceFault::NeedsReset.class(), EreportClass::InvalState);
        assert_eq!(
            DeviceFault::RingProtocol.class(),
            EreportClass::InternalUncorrectable
        );
        assert_eq!(
            DeviceFault::BadCompletion.class(),
            EreportClass::InternalUncorrectable
        );
        assert_eq!(DeviceFault::BadCompletion.detail(), c"bad-completion");
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.detail(), b.detail());
            }
        }
    }

    #[test]
    fn service_impacts_are_the_ddi_values() {
        assert_eq!(ServiceImpact::Lost.code(), -32);
        assert_eq!(ServiceImpact::Degraded.code(), -16);
        assert_eq!(ServiceImpact::Unaffected.code(), 0);
        assert_eq!(ServiceImpact::Restored.code(), 16);
    }

    #[test]
    fn handle_status_maps_to_health_with_its_ena() {
        assert_eq!(
            HandleHealth::from_status(ffi::DDI_FM_OK, 7),
            HandleHealth::Ok
        );
        assert_eq!(
            HandleHealth::from_status(ffi::DDI_FM_FATAL, 7),
            HandleHealth::Fatal(7)
        );
        assert_eq!(
            HandleHealth::from_status(ffi::DDI_FM_NONFATAL, 8),
            HandleHealth::NonFatal(8)
        );
        assert_eq!(HandleHealth::from_status(99, 9), HandleHealth::Unknown(9));
        assert!(!HandleHealth::Ok.is_faulted());
        assert!(HandleHealth::Fatal(1).is_faulted());
    }

    #[test]
    fn the_first_fault_of_several_handles_is_kept() {
        use HandleHealth::*;
        assert_eq!(Ok.first_of(Ok), Ok);
        assert_eq!(Ok.first_of(Unknown(3)), Unknown(3));
        assert_eq!(NonFatal(1).first_of(Fatal(2)), NonFatal(1));
        assert_eq!(
            [Ok, Fatal(5), NonFatal(6)]
                .into_iter()
                .fold(Ok, HandleHealth::first_of),
            Fatal(5)
        );
    }

    #[test]
    fn rvscsi_asks_for_ereports_and_handle_checks_but_no_callback() {
        assert!(FmCaps::WANTED.contains(FmCaps::EREPORT | FmCaps::ACCCHK | FmCaps::DMACHK));
        assert!(!FmCaps::WANTED.contains(FmCaps::ERRCB));
        assert_eq!(FmCaps::WANTED.bits(), 7);
    }
}
