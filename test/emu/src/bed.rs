//! The test bed: a machine, the driver attached to it the way the
//! illumos framework would attach it, and the checks after detach.
//!
//! [`DriverBinding`] is how the bed reaches the driver's `dev_ops`:
//! [`LibraryBinding`] calls the library's entry points, doing in Rust what
//! the C shim does around them (allocate the `scsi_hba_tran`, point its
//! vectors at the entry points, `scsi_hba_attach_setup`, register the
//! iport).

use crate::ddi::acc;
use crate::ddi::devinfo::{DevInfo, NodeKind, NodeState, Prop};
use crate::machine::{Machine, MachineConfig, MachineError, lock, set_current};
use crate::scsa::hba::{self, hba_state};
use crate::scsa::packet::Device;
use crate::scsa::tgtmap::{self, TargetDriver};
use rvscsi::entry;
use rvscsi::ffi::{self, dev_info_t, scsi_hba_tran};
use std::ffi::{CString, c_int};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How the bed calls the driver's attach/detach/quiesce (dev_ops(9S)).
///
/// # Safety
/// Implementations call into the driver; every method requires `dip` to
/// be a live node of the bed in the matching context (attach, detach,
/// quiesce), as the framework guarantees in the kernel.
pub unsafe trait DriverBinding: Send + Sync {
    /// attach(9E) with `DDI_ATTACH`, for the HBA node or an iport.
    ///
    /// # Safety
    /// `dip` is a live node being attached.
    unsafe fn attach(&self, dip: *mut dev_info_t) -> c_int;
    /// detach(9E) with `DDI_DETACH`.
    ///
    /// # Safety
    /// `dip` is an attached node with no attached children.
    unsafe fn detach(&self, dip: *mut dev_info_t) -> c_int;
    /// quiesce(9E).
    ///
    /// # Safety
    /// `dip` is the attached HBA node.
    unsafe fn quiesce(&self, dip: *mut dev_info_t) -> c_int;
}

/// The driver library, with the C shim's part done here.
pub struct LibraryBinding;

// SAFETY: the methods only call the library's entry points with the node
// they are given, under the contexts the trait requires.
unsafe impl DriverBinding for LibraryBinding {
    unsafe fn attach(&self, dip: *mut dev_info_t) -> c_int {
        // SAFETY: dip is a live node of the bed in attach context (caller).
        unsafe {
            if !hba::scsi_hba_iport_unit_address(dip).is_null() {
                return entry::rvscsi_iport_attach(dip);
            }
            let h = entry::rvscsi_hba_attach(dip);
            if h.is_null() {
                return ffi::DDI_FAILURE;
            }
            let tran = hba::scsi_hba_tran_alloc(dip, ffi::SCSI_HBA_CANSLEEP);
            let t = &mut *tran;
            t.tran_hba_private = h;
            t.tran_tgt_init = Some(entry::rvscsi_tran_tgt_init);
            t.tran_tgt_free = Some(entry::rvscsi_tran_tgt_free);
            t.tran_start = Some(entry::rvscsi_tran_start);
            t.tran_abort = Some(entry::rvscsi_tran_abort);
            t.tran_reset = Some(entry::rvscsi_tran_reset);
            t.tran_getcap = Some(entry::rvscsi_tran_getcap);
            t.tran_setcap = Some(entry::rvscsi_tran_setcap);
            t.tran_setup_pkt = Some(entry::rvscsi_tran_setup_pkt);
            t.tran_teardown_pkt = Some(entry::rvscsi_tran_teardown_pkt);
            t.tran_pkt_constructor = Some(entry::rvscsi_tran_pkt_constructor);
            t.tran_pkt_destructor = Some(entry::rvscsi_tran_pkt_destructor);
            t.tran_hba_len = entry::rvscsi_pkt_private_len();
            t.tran_interconnect_type = entry::rvscsi_interconnect_type();
            let mut attr = ffi::ddi_dma_attr_t::default();
            entry::rvscsi_hba_dma_attr(h, &mut attr);
            let flags = ffi::SCSI_HBA_HBA
                | ffi::SCSI_HBA_TRAN_CDB
                | ffi::SCSI_HBA_TRAN_SCB
                | ffi::SCSI_HBA_ADDR_COMPLEX;
            if hba::scsi_hba_attach_setup(dip, &mut attr, tran, flags) != ffi::DDI_SUCCESS {
                hba::scsi_hba_tran_free(tran);
                entry::rvscsi_hba_detach(h);
                return ffi::DDI_FAILURE;
            }
            if hba::scsi_hba_iport_register(dip, c"iport0".as_ptr().cast_mut()) != ffi::DDI_SUCCESS
            {
                hba::scsi_hba_detach(dip);
                hba::scsi_hba_tran_free(tran);
                entry::rvscsi_hba_detach(h);
                return ffi::DDI_FAILURE;
            }
            crate::ddi::devinfo::ddi_report_dev(dip);
            ffi::DDI_SUCCESS
        }
    }

    unsafe fn detach(&self, dip: *mut dev_info_t) -> c_int {
        // SAFETY: dip is a live node of the bed in detach context (caller).
        unsafe {
            if !hba::scsi_hba_iport_unit_address(dip).is_null() {
                return entry::rvscsi_iport_detach(dip);
            }
            let tran = crate::ddi::devinfo::ddi_get_driver_private(dip).cast::<scsi_hba_tran>();
            if tran.is_null() {
                return ffi::DDI_FAILURE;
            }
            let h = (*tran).tran_hba_private;
            if entry::rvscsi_hba_detach_ready(h) != ffi::DDI_SUCCESS {
                return ffi::DDI_FAILURE;
            }
            if hba::scsi_hba_detach(dip) != ffi::DDI_SUCCESS {
                return ffi::DDI_FAILURE;
            }
            if entry::rvscsi_hba_detach(h) != ffi::DDI_SUCCESS {
                return ffi::DDI_FAILURE;
            }
            hba::scsi_hba_tran_free(tran);
            ffi::DDI_SUCCESS
        }
    }

    unsafe fn quiesce(&self, dip: *mut dev_info_t) -> c_int {
        // SAFETY: attached HBA node (caller).
        unsafe { entry::rvscsi_quiesce(dip) }
    }
}

/// The driver's C shim, compiled for the host (see `build.rs`), reached
/// the way the kernel reaches a loaded module: `_init(9E)` installs its
/// linkage with the emulated `mod_install(9F)`, and the bed then calls the
/// `dev_ops(9S)` the shim registered. Unlike [`LibraryBinding`], this runs
/// the shim's own attach/detach logic and tran setup.
pub mod hosted {
    use super::*;
    use crate::ddi::modctl;
    use std::sync::OnceLock;
    use std::sync::atomic::Ordering;

    unsafe extern "C" {
        fn rvscsi_hosted__init() -> c_int;
        fn rvscsi_hosted__fini() -> c_int;
        fn rvscsi_hosted__info(modinfo: *mut std::ffi::c_void) -> c_int;
    }

    /// The shim's `dev_ops` (a static of the shim: its address never
    /// changes), learned at its first `_init`.
    static DEV_OPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// The shim's `_init(9E)`: 0 or an errno.
    pub fn init() -> c_int {
        let before = modctl::installed_list();
        // SAFETY: the shim's _init, called once per load as modload does.
        let rc = unsafe { rvscsi_hosted__init() };
        let new = modctl::installed_list()
            .into_iter()
            .find(|m| !before.contains(m));
        if let (0, Some(m)) = (rc, new) {
            DEV_OPS.store(m.dev_ops, Ordering::Release);
        }
        rc
    }

    /// The shim's `_fini(9E)`: 0, or EBUSY while an instance is attached.
    pub fn fini() -> c_int {
        // SAFETY: the shim's _fini.
        unsafe { rvscsi_hosted__fini() }
    }

    /// The shim's `_info(9E)` (non-zero on success).
    pub fn info() -> c_int {
        // modinfo is opaque to the emulation; give it room.
        let mut buf = [0u64; 128];
        // SAFETY: the shim's _info with a writable modinfo-sized buffer.
        unsafe { rvscsi_hosted__info(buf.as_mut_ptr().cast()) }
    }

    /// The `dev_ops` the shim installed, while it is installed.
    pub fn installed_dev_ops() -> Option<*mut ffi::dev_ops> {
        let ops = DEV_OPS.load(Ordering::Acquire);
        modctl::installed_list()
            .iter()
            .any(|m| ops != 0 && m.dev_ops == ops)
            .then_some(ops as *mut ffi::dev_ops)
    }

    /// The shim, loaded once for the whole process (a module is loaded
    /// once per boot); tests that unload it run in their own process.
    pub fn binding() -> Result<Arc<dyn DriverBinding>, BedError> {
        static LOADED: OnceLock<Result<usize, String>> = OnceLock::new();
        let ops = LOADED.get_or_init(|| match init() {
            0 => installed_dev_ops()
                .map(|o| o as usize)
                .ok_or_else(|| "_init returned 0 but installed no driver".to_string()),
            e => Err(format!("the shim's _init failed with errno {e}")),
        });
        match ops {
            Ok(o) => Ok(Arc::new(DevOpsBinding {
                dev_ops: *o as *mut ffi::dev_ops,
            })),
            Err(e) => Err(BedError(e.clone())),
        }
    }
}

/// The bed's way to a driver through its `dev_ops(9S)`: the hosted C shim,
/// or a module object loaded by the test bed's module loader. Attach and
/// detach are counted against the module, so that its `_fini` answers
/// EBUSY while an instance is attached (modctl's `mod_remove`).
pub struct DevOpsBinding {
    /// The module's `dev_ops`.
    pub dev_ops: *mut ffi::dev_ops,
}

// SAFETY: dev_ops is a module's static table, valid while it is installed.
unsafe impl Send for DevOpsBinding {}
// SAFETY: as above.
unsafe impl Sync for DevOpsBinding {}

impl DevOpsBinding {
    fn ops(&self) -> &ffi::dev_ops {
        // SAFETY: an installed module's dev_ops (see the field).
        unsafe { &*self.dev_ops }
    }
}

// SAFETY: the methods call the module's dev_ops entry points with the node
// and command the trait's contexts require.
unsafe impl DriverBinding for DevOpsBinding {
    unsafe fn attach(&self, dip: *mut dev_info_t) -> c_int {
        let Some(attach) = self.ops().devo_attach else {
            return ffi::DDI_FAILURE;
        };
        // SAFETY: attach(9E) of a live node (caller).
        let r = unsafe { attach(dip, ffi::DDI_ATTACH) };
        if r == ffi::DDI_SUCCESS {
            crate::ddi::modctl::count_instance(self.dev_ops, 1);
        }
        r
    }

    unsafe fn detach(&self, dip: *mut dev_info_t) -> c_int {
        let Some(detach) = self.ops().devo_detach else {
            return ffi::DDI_FAILURE;
        };
        // SAFETY: detach(9E) of an attached node (caller).
        let r = unsafe { detach(dip, ffi::DDI_DETACH) };
        if r == ffi::DDI_SUCCESS {
            crate::ddi::modctl::count_instance(self.dev_ops, -1);
        }
        r
    }

    unsafe fn quiesce(&self, dip: *mut dev_info_t) -> c_int {
        match self.ops().devo_quiesce {
            // SAFETY: quiesce(9E) of the attached HBA node (caller).
            Some(q) => unsafe { q(dip) },
            None => ffi::DDI_FAILURE,
        }
    }
}

/// Why the bed could not do something.
#[derive(Debug)]
pub struct BedError(pub String);

impl std::fmt::Display for BedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BedError {}

impl From<MachineError> for BedError {
    fn from(e: MachineError) -> Self {
        BedError(e.0)
    }
}

/// What to run.
pub struct BedConfig {
    /// The machine.
    pub machine: MachineConfig,
    /// driver.conf properties of the HBA node (tunables).
    pub props: Vec<(String, Prop)>,
    /// The target driver LUNs are given to.
    pub target_driver: Arc<dyn TargetDriver>,
    /// How the driver is reached.
    pub binding: Arc<dyn DriverBinding>,
    /// How long configuration may take.
    pub settle_timeout: Duration,
    /// Device misbehaviour armed before the driver attaches.
    pub faults: Vec<crate::faults::Fault>,
}

impl BedConfig {
    /// The library driver on `machine`, LUNs to `target_driver`.
    pub fn new(machine: MachineConfig, target_driver: Arc<dyn TargetDriver>) -> Self {
        BedConfig {
            machine,
            props: Vec::new(),
            target_driver,
            binding: Arc::new(LibraryBinding),
            settle_timeout: Duration::from_secs(60),
            faults: Vec::new(),
        }
    }

    /// Adds a string property.
    pub fn prop_str(mut self, name: &str, v: &str) -> Self {
        self.props.push((name.into(), Prop::Str(v.into())));
        self
    }

    /// Adds an integer property.
    pub fn prop_int(mut self, name: &str, v: i32) -> Self {
        self.props.push((name.into(), Prop::Int(v)));
        self
    }
}

/// An attached HBA on a machine.
pub struct Bed {
    /// The machine.
    pub machine: Arc<Machine>,
    /// The HBA node.
    pub hba: *mut dev_info_t,
    iport: Option<(*mut dev_info_t, *mut scsi_hba_tran)>,
    binding: Arc<dyn DriverBinding>,
    settle_timeout: Duration,
    pages_before: usize,
    detached: bool,
    /// The HBA node's properties and target driver, for re-attaching.
    props: Vec<(String, Prop)>,
    target_driver: Arc<dyn TargetDriver>,
}

/// Why attach failed, and what the driver left behind when it did.
#[derive(Debug)]
pub struct AttachFailure {
    /// What failed.
    pub message: String,
    /// Resources held and rules broken after the failed attach.
    pub report: DetachReport,
}

// SAFETY: raw pointers name nodes the bed owns.
unsafe impl Send for Bed {}
// SAFETY: as above.
unsafe impl Sync for Bed {}

/// What detach found.
#[derive(Debug, Default)]
pub struct DetachReport {
    /// Resources still held (name, count).
    pub leaks: Vec<(&'static str, i64)>,
    /// Guest pages not returned.
    pub pages_leaked: isize,
    /// Violations recorded during the whole run.
    pub violations: Vec<String>,
}

impl DetachReport {
    /// Whether everything was given back and no rule was broken.
    pub fn is_clean(&self) -> bool {
        self.leaks.is_empty() && self.pages_leaked == 0 && self.violations.is_empty()
    }
}

impl Bed {
    /// Launches the machine and attaches the driver: HBA node, iport,
    /// target map configuration (waited for).
    pub fn attach(config: BedConfig) -> Result<Bed, BedError> {
        Self::try_attach(config).map_err(|f| BedError(f.message))
    }

    /// [`Bed::attach`], reporting on failure what the driver left behind
    /// (a failed attach must give everything back).
    pub fn try_attach(config: BedConfig) -> Result<Bed, AttachFailure> {
        let machine = Machine::launch(config.machine).map_err(|e| AttachFailure {
            message: e.0,
            report: DetachReport::default(),
        })?;
        for f in config.faults {
            machine.faults.arm(f);
        }
        let mut bed = Bed {
            machine: machine.clone(),
            hba: std::ptr::null_mut(),
            iport: None,
            binding: config.binding,
            settle_timeout: config.settle_timeout,
            pages_before: machine.pages_in_use(),
            detached: true,
            props: config.props,
            target_driver: config.target_driver,
        };
        bed.attach_nodes()?;
        bed.settle().map_err(|e| AttachFailure {
            message: e.0,
            report: DetachReport::default(),
        })?;
        Ok(bed)
    }

    /// Attaches the driver again on the same machine after a detach
    /// ([`Bed::detach_nodes`]), as a new instance of the same device.
    pub fn reattach(&mut self) -> Result<(), BedError> {
        if !self.detached {
            return Err(BedError("reattach of an attached bed".into()));
        }
        self.attach_nodes().map_err(|f| BedError(f.message))?;
        self.settle()
    }

    /// Creates the HBA node, attaches it, configures and attaches iport0.
    fn attach_nodes(&mut self) -> Result<(), AttachFailure> {
        let machine = self.machine.clone();
        let _g = set_current(&machine);
        let fail = |bed: &Bed, message: String| AttachFailure {
            message,
            report: bed.report(),
        };
        let hba = DevInfo::create(
            machine.clone(),
            NodeKind::Hba,
            std::ptr::null_mut(),
            0,
            "scsi",
        );
        // SAFETY: just created.
        let node = unsafe { &*hba.cast::<DevInfo>() };
        node.set_prop("reg", Prop::Ints(acc::reg_property(&machine)));
        for (k, v) in &self.props {
            node.set_prop(k, v.clone());
        }
        tgtmap::set_target_driver(hba, self.target_driver.clone());
        node.set_state(NodeState::Attaching);
        // SAFETY: the HBA node just created, in attach context.
        let attached = unsafe { self.binding.attach(hba) };
        node.set_state(NodeState::Idle);
        if attached != ffi::DDI_SUCCESS {
            let log: Vec<String> = machine.log().into_iter().map(|l| l.text).collect();
            // SAFETY: the node is unused after a failed attach.
            unsafe { DevInfo::destroy(hba) };
            return Err(fail(
                self,
                format!("attach of the HBA failed; driver log: {log:?}"),
            ));
        }
        self.hba = hba;
        self.detached = false;
        let Some(st) = hba_state(hba) else {
            return Err(fail(
                self,
                "the driver attached without scsi_hba_attach_setup".into(),
            ));
        };
        if !lock(&st.iports).iter().any(|p| p == "iport0") {
            return Err(fail(self, "the driver registered no iport0".into()));
        }
        // The framework configures the iport: a node, a copy of the tran.
        let ua = CString::new("iport0").unwrap_or_default();
        let iport = DevInfo::create(machine.clone(), NodeKind::Iport(ua), hba, 0, "iport");
        // SAFETY: the HBA's live tran.
        let tran = unsafe { hba::clone_tran_for_iport(st.tran, iport) };
        // SAFETY: just created.
        unsafe { &*iport.cast::<DevInfo>() }
            .driver_private
            .store(tran.cast(), Ordering::Release);
        // SAFETY: just created.
        let iport_node = unsafe { &*iport.cast::<DevInfo>() };
        iport_node.set_state(NodeState::Attaching);
        // SAFETY: the iport node just created, in attach context.
        let attached = unsafe { self.binding.attach(iport) };
        iport_node.set_state(NodeState::Idle);
        if attached != ffi::DDI_SUCCESS {
            hba::free_iport_tran(tran);
            // SAFETY: unused after the failed attach.
            unsafe { DevInfo::destroy(iport) };
            return Err(fail(self, "attach of iport0 failed".into()));
        }
        self.iport = Some((iport, tran));
        Ok(())
    }

    /// What is held now beyond what was held before the first attach.
    fn report(&self) -> DetachReport {
        let m = &self.machine;
        // Device writes into DMA memory the driver freed (a violation each).
        crate::ddi::dma::check_freed(m);
        DetachReport {
            leaks: m.live.leaks(),
            pages_leaked: m.pages_in_use() as isize - self.pages_before as isize,
            violations: m.violations(),
        }
    }

    /// Waits until the target map has configured everything it was told
    /// (discovery runs on the driver's task queue, then the map's thread).
    pub fn settle(&self) -> Result<(), BedError> {
        let Some((iport, _)) = self.iport else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + self.settle_timeout;
        // The driver creates the map and dispatches discovery; wait until a
        // discovery has reported and the map is idle, twice in a row.
        let mut quiet = 0;
        while quiet < 2 {
            if std::time::Instant::now() > deadline {
                return Err(BedError("target configuration did not settle".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
            let Some(map) = tgtmap::map_of_iport(iport) else {
                quiet = 0;
                continue;
            };
            let idle = map.wait_idle(Duration::from_millis(200)) && self.driver_idle();
            quiet = if idle { quiet + 1 } else { 0 };
        }
        Ok(())
    }

    fn driver_idle(&self) -> bool {
        // The driver's work task: a discovery may still be probing.
        crate::ddi::taskq::all_idle(&self.machine)
    }

    /// Every configured LUN.
    pub fn devices(&self) -> Vec<Arc<Device>> {
        self.iport
            .and_then(|(i, _)| tgtmap::map_of_iport(i))
            .map(|m| m.devices())
            .unwrap_or_default()
    }

    /// The LUN `target`/`lun`.
    pub fn device(&self, target: u32, lun: u64) -> Option<Arc<Device>> {
        self.devices()
            .into_iter()
            .find(|d| d.target == target && d.lun == lun)
    }

    /// The HBA's packet cache counters: (constructed, destructed, in use).
    pub fn cache_counts(&self) -> Option<(u64, u64, i64)> {
        let st = hba_state(self.hba)?;
        let c = lock(&st.cache).clone()?;
        Some((
            c.constructed.load(Ordering::Acquire),
            c.destructed.load(Ordering::Acquire),
            c.in_use.load(Ordering::Acquire),
        ))
    }

    /// quiesce(9E) of the HBA node.
    pub fn quiesce(&self) -> c_int {
        let _g = set_current(&self.machine);
        // SAFETY: the attached HBA node.
        unsafe { self.binding.quiesce(self.hba) }
    }

    /// Detaches everything as the framework would (children, iport, HBA)
    /// and reports leaks and violations. QEMU is stopped afterwards.
    pub fn detach(mut self) -> Result<DetachReport, BedError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<DetachReport, BedError> {
        let report = self.detach_nodes()?;
        self.machine.shutdown();
        Ok(report)
    }

    /// Detaches the iport and the HBA as the framework would, keeping the
    /// machine (for [`Bed::reattach`]); reports what is still held. A
    /// refused detach leaves the bed attached as far as it got, and may be
    /// tried again.
    pub fn detach_nodes(&mut self) -> Result<DetachReport, BedError> {
        if self.detached {
            return Ok(self.report());
        }
        let m = self.machine.clone();
        let _g = set_current(&m);
        if let Some((iport, tran)) = self.iport {
            // The framework enters the iport before detaching it; its
            // target configuration waits.
            let map = tgtmap::map_of_iport(iport);
            if let Some(map) = &map {
                map.hold();
            }
            let iport_node = crate::ddi::devinfo::node(iport, "detach");
            if let Some(n) = iport_node {
                n.set_state(NodeState::Detaching);
            }
            // SAFETY: the attached iport; its children went with its map.
            let detached = unsafe { self.binding.detach(iport) };
            if let Some(n) = iport_node {
                n.set_state(NodeState::Idle);
            }
            if detached != ffi::DDI_SUCCESS {
                if let Some(map) = &map {
                    map.release();
                }
                return Err(BedError("detach of iport0 failed".into()));
            }
            drop(map);
            if tgtmap::map_of_iport(iport).is_some() {
                m.violation("the iport detached without destroying its target map");
            }
            hba::free_iport_tran(tran);
            // SAFETY: detached.
            unsafe { DevInfo::destroy(iport) };
            self.iport = None;
        }
        let hba_node = crate::ddi::devinfo::node(self.hba, "detach");
        if let Some(n) = hba_node {
            n.set_state(NodeState::Detaching);
        }
        // SAFETY: the attached HBA node, its iport detached above.
        let detached = unsafe { self.binding.detach(self.hba) };
        if let Some(n) = hba_node {
            n.set_state(NodeState::Idle);
        }
        if detached != ffi::DDI_SUCCESS {
            return Err(BedError("detach of the HBA failed".into()));
        }
        self.detached = true;
        // SAFETY: detached.
        unsafe { DevInfo::destroy(self.hba) };
        self.hba = std::ptr::null_mut();
        Ok(self.report())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.detach_inner();
        }
        self.machine.shutdown();
    }
}
