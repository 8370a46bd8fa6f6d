//! The emulated kstat and FMA calls (issue 15): the driver's owners
//! (`rvscsi::ddi::kstat`, `rvscsi::ddi::fm`) work through them, counters
//! read back through `ks_update` in `kstat -p` form, ereports in `fmdump -e`
//! form, and every misuse the emulation refuses is seen to fire.
//!
//! Each test has an in-memory machine of its own (no QEMU), so violations
//! are the machine's own.

use rvscsi::ddi::Dip;
use rvscsi::ddi::Sleep;
use rvscsi::ddi::dma::{DmaBuffer, DmaMode, FaultCheck};
use rvscsi::ddi::fm::{DeviceFault, FmCaps, Fma, HandleHealth, ServiceImpact};
use rvscsi::ddi::kstat::{HBA_STATS, HbaStat, KstatName, Published, QUEUE_STATS, QueueStat, Stat};
use rvscsi::ffi::{self, dev_info_t};
use rvscsi_emu::ddi::devinfo::{DevInfo, NodeKind, NodeState};
use rvscsi_emu::ddi::fm::{self as efm, Payload, ServiceState};
use rvscsi_emu::ddi::kstat::{self as eks, ReadError};
use rvscsi_emu::ddi::sync::{enter_interrupt_context, leave_interrupt_context_unchecked};
use rvscsi_emu::machine::{CurrentGuard, set_current};
use rvscsi_emu::{Backend, Machine, MachineConfig, VirtioPci};
use std::ffi::c_int;
use std::sync::Arc;

unsafe extern "C" {
    // The variadic DDI function, called directly only by these tests (the
    // driver reaches it through the shim's fixed-list wrapper).
    fn ddi_fm_ereport_post(
        dip: *mut dev_info_t,
        class: *const std::ffi::c_char,
        ena: u64,
        sflag: c_int,
        ...
    );
}

struct Rig {
    m: Arc<Machine>,
    dip: *mut dev_info_t,
    _current: CurrentGuard,
}

impl Rig {
    fn new() -> Rig {
        let mut config = MachineConfig::virtio_scsi(Vec::new());
        config.backend = Backend::Memory;
        config.virtio = VirtioPci::ModernOnly;
        let m = Machine::launch(config).expect("an in-memory machine");
        let current = set_current(&m);
        let dip = DevInfo::create(m.clone(), NodeKind::Hba, std::ptr::null_mut(), 3, "scsi");
        Rig {
            m,
            dip,
            _current: current,
        }
    }

    fn node(&self) -> &DevInfo {
        // SAFETY: the node this rig made, alive until the rig goes.
        unsafe { &*self.dip.cast::<DevInfo>() }
    }

    fn d(&self) -> Dip {
        Dip::new(self.dip).unwrap()
    }

    fn in_state<R>(&self, s: NodeState, f: impl FnOnce() -> R) -> R {
        self.node().set_state(s);
        let r = f();
        self.node().set_state(NodeState::Idle);
        r
    }

    fn fired(&self, what: &str) -> usize {
        self.m
            .violations()
            .iter()
            .filter(|v| v.contains(what))
            .count()
    }

    fn leak(&self, what: &str) -> i64 {
        self.m
            .live
            .counts()
            .into_iter()
            .find(|(n, _)| *n == what)
            .map_or(0, |(_, c)| c)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.m.shutdown();
    }
}

#[test]
fn published_counters_read_back_through_ks_update_in_kstat_p_form() {
    let r = Rig::new();
    let q: Published<QUEUE_STATS> = r.in_state(NodeState::Attaching, || {
        Published::create::<QueueStat>(r.d(), &KstatName::queue(2))
    });
    assert!(q.is_published());
    q.counters().add(QueueStat::Commands, 5);
    q.counters().add(QueueStat::Completions, 4);
    q.counters().raise_to(QueueStat::BatchMax, 3);
    let s = eks::read(&r.m, "rvscsi", 3, "queue2").expect("an installed kstat");
    assert_eq!(s.class, "controller");
    assert_eq!(s.u64("commands"), Some(5));
    assert_eq!(s.u64("completions"), Some(4));
    assert_eq!(s.u64("batch_max"), Some(3));
    assert_eq!(s.u64("ring_full"), Some(0));
    assert_eq!(s.stats.len(), QueueStat::ALL.len());
    // Later bumps show on the next read: the update copies on each read.
    q.counters().bump(QueueStat::Completions);
    let p = eks::kstat_p(&r.m, "rvscsi", Some(3));
    assert!(p.contains("rvscsi:3:queue2:completions\t5\n"), "{p}");
    assert!(p.contains("rvscsi:3:queue2:commands\t5\n"), "{p}");
    assert!(p.contains("rvscsi:3:queue2:class\tcontroller\n"), "{p}");
    assert!(p.contains("rvscsi:3:queue2:snaptime\t"), "{p}");
    drop(q);
    assert_eq!(
        eks::read(&r.m, "rvscsi", 3, "queue2").unwrap_err(),
        ReadError::NoSuchKstat
    );
    assert_eq!(r.leak("kstats"), 0);
    assert!(r.m.violations().is_empty(), "{:?}", r.m.violations());
}

#[test]
fn a_kstat_is_invisible_until_installed_and_refuses_misuse() {
    let r = Rig::new();
    // SAFETY: NUL-terminated strings; a named kstat of one entry.
    let ksp = unsafe {
        ffi::kstat_create(
            c"rvscsi".as_ptr(),
            3,
            c"hba".as_ptr(),
            c"controller".as_ptr(),
            ffi::KSTAT_TYPE_NAMED,
            1,
            0,
        )
    };
    assert!(!ksp.is_null());
    assert_eq!(
        eks::read(&r.m, "rvscsi", 3, "hba").unwrap_err(),
        ReadError::NotInstalled
    );
    // A second one of the same name: a namespace collision, NULL.
    // SAFETY: as above.
    let again = unsafe {
        ffi::kstat_create(
            c"rvscsi".as_ptr(),
            3,
            c"hba".as_ptr(),
            c"controller".as_ptr(),
            ffi::KSTAT_TYPE_NAMED,
            1,
            0,
        )
    };
    assert!(again.is_null());
    assert!(
        r.m.log()
            .iter()
            .any(|l| l.text.contains("namespace collision"))
    );
    // Installing with an entry nobody named.
    // SAFETY: the kstat just made.
    unsafe { ffi::kstat_install(ksp) };
    assert_eq!(r.fired("was never named"), 1);
    assert!(eks::read(&r.m, "rvscsi", 3, "hba").is_ok());
    // SAFETY: installed twice on purpose.
    unsafe { ffi::kstat_install(ksp) };
    assert_eq!(r.fired("installed twice"), 1);
    // Not deleted: a leak.
    assert_eq!(r.leak("kstats"), 1);
    // SAFETY: deleted once, then again on purpose.
    unsafe {
        ffi::kstat_delete(ksp);
        ffi::kstat_delete(ksp);
    }
    assert_eq!(r.fired("does not exist (deleted twice"), 1);
    assert_eq!(r.leak("kstats"), 0);
    // SAFETY: a pointer kstat_create never returned.
    unsafe { ffi::kstat_install(ksp) };
    assert_eq!(r.fired("does not exist (not from kstat_create"), 1);
}

#[test]
fn kstat_create_refuses_interrupt_context_and_long_names() {
    let r = Rig::new();
    enter_interrupt_context();
    // SAFETY: NUL-terminated strings.
    let ksp = unsafe {
        ffi::kstat_create(
            c"rvscsi".as_ptr(),
            0,
            c"queue0".as_ptr(),
            c"controller".as_ptr(),
            ffi::KSTAT_TYPE_NAMED,
            1,
            0,
        )
    };
    leave_interrupt_context_unchecked();
    assert_eq!(r.fired("kstat_create called in interrupt context"), 1);
    // SAFETY: the kstat made above.
    unsafe { ffi::kstat_delete(ksp) };
    // SAFETY: NUL-terminated strings.
    let long = unsafe {
        ffi::kstat_create(
            c"rvscsi".as_ptr(),
            0,
            c"a_name_of_more_than_thirty_bytes".as_ptr(),
            c"controller".as_ptr(),
            ffi::KSTAT_TYPE_NAMED,
            1,
            0,
        )
    };
    assert_eq!(r.fired("kstat_set_string cuts it to 30"), 1);
    assert!(
        eks::list(&r.m)
            .iter()
            .any(|(_, _, n)| n == "a_name_of_more_than_thirty_byt")
    );
    // SAFETY: the kstat made above.
    unsafe { ffi::kstat_delete(long) };
    // Deleting while holding its ks_lock.
    let mut lock = ffi::kmutex_t {
        _opaque: [std::ptr::null_mut()],
    };
    // SAFETY: an emulated mutex of ours, then a kstat using it as ks_lock.
    unsafe {
        ffi::mutex_init(
            &mut lock,
            std::ptr::null_mut(),
            ffi::MUTEX_DRIVER,
            std::ptr::null_mut(),
        );
        let ksp = ffi::kstat_create(
            c"rvscsi".as_ptr(),
            0,
            c"locked".as_ptr(),
            c"misc".as_ptr(),
            ffi::KSTAT_TYPE_RAW,
            8,
            0,
        );
        (*ksp).ks_lock = (&raw mut lock).cast();
        ffi::kstat_install(ksp);
        ffi::mutex_enter(&mut lock);
        ffi::kstat_delete(ksp);
        ffi::mutex_exit(&mut lock);
        assert_eq!(r.fired("caller holds data lock"), 1);
        ffi::kstat_delete(ksp);
        ffi::mutex_destroy(&mut lock);
    }
    assert_eq!(r.leak("kstats"), 0);
}

#[test]
fn a_failed_kstat_create_leaves_counting_without_publishing() {
    let r = Rig::new();
    eks::fail_next_creates(&r.m, 1);
    let hba: Published<HBA_STATS> = Published::create::<HbaStat>(r.d(), &KstatName::hba());
    assert!(!hba.is_published());
    hba.counters().bump(HbaStat::DeviceResets);
    assert_eq!(hba.counters().get(HbaStat::DeviceResets), 1);
    assert!(r.m.log().iter().any(|l| l.text.contains("not published")));
    assert_eq!(
        eks::read(&r.m, "rvscsi", 3, "hba").unwrap_err(),
        ReadError::NoSuchKstat
    );
    drop(hba);
    assert_eq!(r.leak("kstats"), 0);
}

#[test]
fn fma_grants_in_attach_posts_ereports_and_reports_service_impact() {
    let r = Rig::new();
    let fma = r.in_state(NodeState::Attaching, || Fma::init(r.d(), FmCaps::WANTED));
    assert_eq!(fma.caps(), FmCaps::WANTED);
    // ddi_fm_init made the handle's own kstat.
    assert!(eks::read(&r.m, "rvscsi", 3, "fm").is_ok());
    let ena = Fma::new_ena();
    assert_eq!(ena & 3, 1, "format 1");
    fma.report(
        DeviceFault::NoResponse,
        ena,
        &[(c"queue", 2), (c"inflight", 7)],
    );
    fma.report(DeviceFault::NeedsReset, 0, &[]);
    fma.service_impact(ServiceImpact::Lost);
    fma.service_impact(ServiceImpact::Degraded);
    assert_eq!(efm::service_state(r.dip), ServiceState::Down);
    fma.service_impact(ServiceImpact::Restored);
    assert_eq!(efm::service_state(r.dip), ServiceState::Up);
    let e = efm::ereports(&r.m);
    let classes: Vec<&str> = e.iter().map(|e| e.class.as_str()).collect();
    assert_eq!(
        classes,
        [
            "ereport.io.device.no_response",
            "ereport.io.device.inval_state",
            "ereport.io.service.lost",
            "ereport.io.service.lost",
            "ereport.io.service.restored",
        ]
    );
    assert_eq!(e[0].ena, ena);
    assert_eq!(
        e[0].member("detail"),
        Some(&Payload::Str("device-not-responding".into()))
    );
    assert_eq!(e[0].member("queue"), Some(&Payload::Int(2)));
    assert_eq!(e[0].member("inflight"), Some(&Payload::Int(7)));
    assert_ne!(e[1].ena, 0, "a zero ENA is generated");
    assert_eq!(
        e[1].member("detail"),
        Some(&Payload::Str("device-needs-reset".into()))
    );
    let dump = efm::fmdump_e(&r.m);
    assert!(dump.starts_with("TIME"), "{dump}");
    assert!(dump.contains(" ereport.io.device.no_response\n"), "{dump}");
    assert!(
        dump.contains("detail = device-not-responding (string)"),
        "{dump}"
    );
    r.in_state(NodeState::Detaching, || drop(fma));
    assert_eq!(r.leak("FM handles"), 0);
    assert_eq!(r.leak("kstats"), 0);
    assert!(r.m.violations().is_empty(), "{:?}", r.m.violations());
}

#[test]
fn fma_misuse_is_refused() {
    let r = Rig::new();
    // Outside attach: nothing granted, a violation, a ddi.context defect.
    let fma = Fma::init(r.d(), FmCaps::WANTED);
    assert_eq!(fma.caps(), FmCaps::empty());
    assert_eq!(r.fired("ddi_fm_init outside attach"), 1);
    assert!(
        efm::ereports(&r.m)
            .iter()
            .any(|e| e.class == "ereport.io.ddi.context")
    );
    // Posting without the capability (bypassing Fma's own guard).
    // SAFETY: a node of ours, NUL-terminated strings, NULL members.
    unsafe {
        rvscsi::contract::shim::rvscsi_shim_ereport_post(
            r.dip,
            c"device.stall".as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
            0,
            std::ptr::null(),
            0,
        )
    };
    assert_eq!(r.fired("without DDI_FM_EREPORT_CAPABLE"), 1);
    // fini without a handle.
    ffi_fm_fini(r.dip);
    assert_eq!(r.fired("ddi_fm_fini without an FM handle"), 1);
    drop(fma);
    // A real handle: DDI_SLEEP in interrupt context, a bad first member,
    // fini outside detach (a leak).
    let fma = r.in_state(NodeState::Attaching, || Fma::init(r.d(), FmCaps::WANTED));
    enter_interrupt_context();
    // SAFETY: a node of ours; a well-formed list ending with NULL.
    unsafe {
        ddi_fm_ereport_post(
            r.dip,
            c"device.stall".as_ptr(),
            0,
            ffi::DDI_SLEEP,
            c"version".as_ptr(),
            ffi::DATA_TYPE_UINT8,
            0u32,
            std::ptr::null::<u8>(),
        )
    };
    leave_interrupt_context_unchecked();
    assert_eq!(r.fired("DDI_SLEEP) in interrupt context"), 1);
    // SAFETY: as above, without the version member.
    unsafe {
        ddi_fm_ereport_post(
            r.dip,
            c"device.stall".as_ptr(),
            0,
            ffi::DDI_NOSLEEP,
            c"detail".as_ptr(),
            ffi::DATA_TYPE_STRING,
            c"x".as_ptr(),
            std::ptr::null::<u8>(),
        )
    };
    assert_eq!(r.fired("the first member is not version"), 1);
    assert!(
        !efm::ereports(&r.m)
            .iter()
            .any(|e| e.class.ends_with("device.stall"))
    );
    drop(fma);
    assert_eq!(r.fired("ddi_fm_fini outside attach(9E)/detach(9E)"), 1);
    assert_eq!(
        r.leak("FM handles"),
        1,
        "the handle outlives a refused fini"
    );
    r.in_state(NodeState::Detaching, || ffi_fm_fini(r.dip));
    assert_eq!(r.leak("FM handles"), 0);
}

fn ffi_fm_fini(dip: *mut dev_info_t) {
    // SAFETY: a node of ours.
    unsafe { ffi::ddi_fm_fini(dip) }
}

#[test]
fn handle_checks_report_injected_faults_and_refuse_bad_versions() {
    let r = Rig::new();
    let fma = r.in_state(NodeState::Attaching, || Fma::init(r.d(), FmCaps::WANTED));
    let buf = DmaBuffer::alloc(
        r.d(),
        4096,
        4096,
        u64::MAX,
        DmaMode::Consistent,
        FaultCheck::Taken,
        Sleep::Yes,
    )
    .expect("DMA memory");
    assert_eq!(fma.take_dma_fault(&buf), HandleHealth::Ok);
    let h = buf.dma_handle();
    efm::inject_dma_fault(h, ffi::DDI_FM_FATAL, 0x1234);
    assert_eq!(fma.take_dma_fault(&buf), HandleHealth::Fatal(0x1234));
    // Taken: ddi_fm_dma_err_clear(9F) put the handle back to DDI_FM_OK.
    assert_eq!(fma.take_dma_fault(&buf), HandleHealth::Ok, "cleared");
    let mut de: ffi::ddi_fm_error_t = unsafe_zeroed();
    // SAFETY: a live handle; version 7 on purpose.
    unsafe { ffi::ddi_fm_dma_err_get(h, &mut de, 7) };
    assert_eq!(r.fired("version 7 (illumos panics"), 1);
    // SAFETY: as above, clearing.
    unsafe { ffi::ddi_fm_dma_err_clear(h, 7) };
    assert_eq!(
        r.fired("ddi_fm_dma_err_clear: version 7 (illumos panics"),
        1
    );
    // SAFETY: NULL on purpose.
    unsafe { ffi::ddi_fm_acc_err_get(std::ptr::null_mut(), &mut de, ffi::DDI_FME_VERSION) };
    assert_eq!(r.fired("ddi_fm_acc_err_get(NULL handle)"), 1);
    // SAFETY: NULL on purpose.
    unsafe { ffi::ddi_fm_acc_err_clear(std::ptr::null_mut(), ffi::DDI_FME_VERSION) };
    assert_eq!(r.fired("ddi_fm_acc_err_clear(NULL handle)"), 1);
    drop(buf);
    r.in_state(NodeState::Detaching, || drop(fma));
}

fn unsafe_zeroed() -> ffi::ddi_fm_error_t {
    // SAFETY: plain data; zero is a valid value of every member.
    unsafe { std::mem::zeroed() }
}

#[test]
fn the_module_loader_resolves_every_kstat_and_fm_import() {
    // The loader binds a module's imports through this table (built from
    // test/abi/kernel-imports.tsv), so a module calling these loads.
    for name in [
        "kstat_create",
        "kstat_install",
        "kstat_delete",
        "kstat_named_init",
        "ddi_fm_init",
        "ddi_fm_fini",
        "ddi_fm_capable",
        "ddi_fm_service_impact",
        "ddi_fm_ereport_post",
        "ddi_fm_acc_err_get",
        "ddi_fm_dma_err_get",
        "ddi_fm_acc_err_clear",
        "ddi_fm_dma_err_clear",
        "fm_ena_generate",
    ] {
        let s = rvscsi_emu::ddi::symbols::lookup(name)
            .unwrap_or_else(|| panic!("{name} is not exported"));
        assert!(!s.data && s.addr != 0, "{name}");
    }
}
