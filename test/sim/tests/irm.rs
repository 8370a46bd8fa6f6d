//! Interrupt resources as illumos grants them: the static MSI-X limit
//! without an IRM callback (`ddi_msix_alloc_limit`: 2 under pcplusmp, 8
//! under apix), the IRM pool with `ddi_cb_register(9F)`, the driver
//! following a `DDI_CB_INTR_REMOVE` and `DDI_CB_INTR_ADD` while I/O runs,
//! and a high-level interrupt priority refused at attach.

use rvscsi::ffi;
use rvscsi_emu::ddi::devinfo::{DevInfo, NodeKind};
use rvscsi_emu::ddi::intr::{self as emu_intr, Psm};
use rvscsi_emu::machine::set_current;
use rvscsi_emu::{Machine, MachineConfig, VirtioPci};
use rvscsi_sim::testkit::{Rig, RigConfig, random_bytes, request_vector, wait_until};
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn attach_line(rig: &Rig) -> String {
    rig.log()
        .into_iter()
        .find(|l| l.starts_with("virtio-scsi"))
        .expect("the attach line")
}

/// A machine with a virtio-scsi HBA of `queues` request queues (QEMU gives
/// it `queues + 3` MSI-X vectors) and a device node for it.
fn machine(psm: Psm, queues: u32) -> (Arc<Machine>, *mut ffi::dev_info_t) {
    machine_with_pool(psm, queues, None)
}

/// [`machine`] with the `apix_system_max_vectors` tunable.
fn machine_with_pool(
    psm: Psm,
    queues: u32,
    pool: Option<u32>,
) -> (Arc<Machine>, *mut ffi::dev_info_t) {
    let dir = rvscsi_sim::testkit::TempDir::new("irm");
    let img = rvscsi_sim::testkit::Image::blank(&dir.path("d.img"), 2048);
    let mut mc = MachineConfig::virtio_scsi(vec![rvscsi_emu::Disk {
        file: img.path.display().to_string(),
        target: 0,
        lun: 0,
    }]);
    mc.virtio = VirtioPci::ModernOnly;
    mc.num_queues = Some(queues);
    mc.psm = psm;
    mc.apix_system_max_vectors = pool;
    let m = Machine::launch(mc).expect("machine");
    std::mem::forget(dir); // QEMU keeps the image open
    let dip = DevInfo::create(m.clone(), NodeKind::Hba, std::ptr::null_mut(), 0, "scsi");
    (m, dip)
}

/// `ddi_intr_alloc(dip, .., MSI-X, inum, count, .., behavior)`: the return
/// value and the handles.
fn alloc(
    dip: *mut ffi::dev_info_t,
    inum: usize,
    count: usize,
    behavior: c_int,
) -> (c_int, Vec<ffi::ddi_intr_handle_t>) {
    let mut h = vec![std::ptr::null_mut(); 64];
    let mut actual = 0;
    // SAFETY: room for 64 handles; a node of the machine.
    let rc = unsafe {
        emu_intr::ddi_intr_alloc(
            dip,
            h.as_mut_ptr(),
            ffi::DDI_INTR_TYPE_MSIX,
            inum as c_int,
            count as c_int,
            &mut actual,
            behavior,
        )
    };
    let got = h[inum..inum + actual as usize].to_vec();
    (rc, got)
}

fn navail(dip: *mut ffi::dev_info_t) -> c_int {
    let mut n = 0;
    // SAFETY: out-pointer; a node of the machine.
    unsafe { emu_intr::ddi_intr_get_navail(dip, ffi::DDI_INTR_TYPE_MSIX, &mut n) };
    n
}

fn free_all(handles: &[ffi::ddi_intr_handle_t]) {
    for &h in handles {
        assert_eq!(emu_intr::ddi_intr_free(h), ffi::DDI_SUCCESS);
    }
}

unsafe extern "C" fn accept_everything(
    _dip: *mut ffi::dev_info_t,
    _action: c_int,
    _cbarg: *mut c_void,
    _arg1: *mut c_void,
    _arg2: *mut c_void,
) -> c_int {
    ffi::DDI_SUCCESS
}

/// ddi_cb_register(9F) of an IRM callback `cb` for `dip`: its return
/// code and the handle it gave out.
fn try_register(
    dip: *mut ffi::dev_info_t,
    cb: Option<ffi::ddi_cb_func_t>,
) -> (c_int, ffi::ddi_cb_handle_t) {
    let mut hdl = std::ptr::null_mut();
    // SAFETY: a node of the machine, kernel context, out-pointer.
    let rc = unsafe {
        emu_intr::ddi_cb_register(
            dip,
            ffi::DDI_CB_FLAG_INTR,
            cb,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut hdl,
        )
    };
    (rc, hdl)
}

fn register(dip: *mut ffi::dev_info_t) -> ffi::ddi_cb_handle_t {
    let (rc, hdl) = try_register(dip, Some(accept_everything));
    assert_eq!(rc, ffi::DDI_SUCCESS);
    hdl
}

/// ddi_intr_alloc(9F) as `ddi_intr.c` runs it, for a device of 15 MSI-X
/// vectors: without a callback the static limit (2 under pcplusmp, 8 under
/// apix), more than the device has is DDI_EINVAL, STRICT above the limit
/// DDI_EAGAIN; with an IRM callback every vector under apix and still 2
/// under pcplusmp, which has no pool.
#[test]
fn without_an_irm_callback_illumos_grants_two_msix_vectors_under_pcplusmp_and_eight_under_apix() {
    for (psm, limit, with_cb) in [(Psm::Pcplusmp, 2, 2), (Psm::Apix, 8, 15)] {
        let (m, dip) = machine(psm, 12);
        let _g = set_current(&m);
        assert_eq!(navail(dip) as usize, limit, "{psm:?}");
        let (rc, _) = alloc(dip, 0, 16, ffi::DDI_INTR_ALLOC_NORMAL);
        assert_eq!(rc, ffi::DDI_EINVAL, "{psm:?}: more than the device has");
        let (rc, _) = alloc(dip, 0, 15, ffi::DDI_INTR_ALLOC_STRICT);
        assert_eq!(rc, ffi::DDI_EAGAIN, "{psm:?}: STRICT above the limit");
        let (rc, h) = alloc(dip, 0, 15, ffi::DDI_INTR_ALLOC_NORMAL);
        assert_eq!((rc, h.len()), (ffi::DDI_SUCCESS, limit), "{psm:?}");
        // Nothing more to be had, even one by one.
        let (rc, _) = alloc(dip, limit, 1, ffi::DDI_INTR_ALLOC_NORMAL);
        assert_eq!(rc, ffi::DDI_EAGAIN, "{psm:?}: past the limit");
        free_all(&h);

        let hdl = register(dip);
        assert_eq!(navail(dip) as usize, with_cb, "{psm:?} with a callback");
        let (rc, h) = alloc(dip, 0, 15, ffi::DDI_INTR_ALLOC_NORMAL);
        assert_eq!(
            (rc, h.len()),
            (ffi::DDI_SUCCESS, with_cb),
            "{psm:?} with a callback"
        );
        if psm == Psm::Apix {
            assert_eq!(emu_intr::irm_grant(&m, dip), Some((15, 15)));
        }
        free_all(&h);
        assert_eq!(emu_intr::ddi_cb_unregister(hdl), ffi::DDI_SUCCESS);
        // SAFETY: no driver uses the node.
        unsafe { DevInfo::destroy(dip) };
        assert!(m.violations().is_empty(), "{:?}", m.violations());
        assert!(m.live.leaks().is_empty(), "{:?}", m.live.leaks());
        m.shutdown();
    }
}

static CALLS: std::sync::Mutex<Vec<(c_int, usize)>> = std::sync::Mutex::new(Vec::new());

/// An IRM callback that records what it is told and releases nothing.
unsafe extern "C" fn record_and_keep(
    _dip: *mut ffi::dev_info_t,
    action: c_int,
    cbarg: *mut c_void,
    _arg1: *mut c_void,
    _arg2: *mut c_void,
) -> c_int {
    CALLS.lock().unwrap().push((action, cbarg as usize));
    ffi::DDI_SUCCESS
}

/// The pool reduces an IRM driver for another device's sake (never below
/// its default size, 8), and one that keeps what it lost is warned about
/// as `i_ddi_irm_notify` does, and is a violation here; unregistering with
/// vectors still held shrinks the request to the static limit first, with
/// a REMOVE to the callback still registered (`i_ddi_irm_set_cb`).
#[test]
fn the_pool_reduces_an_irm_driver_and_one_that_keeps_the_excess_is_caught() {
    let (m, dip) = machine_with_pool(Psm::Apix, 12, Some(16));
    let _g = set_current(&m);
    assert_eq!(emu_intr::irm_pool(&m), Some((16, 8)));
    let (rc, hdl) = try_register(dip, Some(record_and_keep));
    assert_eq!(rc, ffi::DDI_SUCCESS);
    let (rc, _) = try_register(dip, Some(record_and_keep));
    assert_eq!(rc, ffi::DDI_EALREADY, "one registration per node");
    let (rc, h) = alloc(dip, 0, 14, ffi::DDI_INTR_ALLOC_NORMAL);
    assert_eq!((rc, h.len()), (ffi::DDI_SUCCESS, 14));
    // Another device wants 8: the pool (16) would take 6 back from the
    // driver; as it keeps them, the newcomer gets what is left (2).
    let (other, got) = emu_intr::irm_add_device(&m, 8).expect("fits");
    assert_eq!(got, 2);
    assert_eq!(
        CALLS.lock().unwrap().as_slice(),
        [(ffi::DDI_CB_INTR_REMOVE, 6)]
    );
    // The kernel gave up and left it what it holds.
    assert_eq!(navail(dip), 14);
    // It kept all 14: warned, left them, and a violation of ddi_cb_register(9F).
    assert!(
        m.log().iter().any(|l| l
            .text
            .contains("failed to release interrupts (nintrs=14, navail=8)")),
        "{:?}",
        m.log()
    );
    let v = m.violations();
    assert!(v.iter().any(|t| t.contains("kept 14 interrupts")), "{v:?}");
    assert_eq!(emu_intr::irm_grant(&m, dip), Some((14, 14)));
    emu_intr::irm_remove_device(&m, other);

    // Unregistering with 14 held: the request shrinks to the static limit
    // (8) and the callback, still registered, is told.
    CALLS.lock().unwrap().clear();
    assert_eq!(emu_intr::ddi_cb_unregister(hdl), ffi::DDI_SUCCESS);
    assert_eq!(
        CALLS.lock().unwrap().as_slice(),
        [(ffi::DDI_CB_INTR_REMOVE, 6)]
    );
    free_all(&h);
    // SAFETY: no driver uses the node.
    unsafe { DevInfo::destroy(dip) };
    assert!(m.live.leaks().is_empty(), "{:?}", m.live.leaks());
    m.shutdown();
}

/// Without a callback the driver could not have more than 8 vectors under
/// apix; with it, a device of 12 request queues gets 13 (one per queue and
/// one for configuration and events), and each CPU's I/O interrupts on its
/// queue's vector only. Under pcplusmp the same device works on 2.
#[test]
fn the_driver_gets_a_vector_per_request_queue_through_irm_and_io_works() {
    for (psm, vectors) in [(Psm::Apix, 13usize), (Psm::Pcplusmp, 2)] {
        let rig = Rig::start(RigConfig {
            num_queues: Some(12),
            psm,
            ..RigConfig::default()
        });
        let line = attach_line(&rig);
        assert!(
            line.contains(&format!(
                "MSI-X interrupts ({vectors} vectors), 12 request queue(s)"
            )),
            "{psm:?}: {line}"
        );
        let m = rig.bed().machine.clone();
        assert_eq!(emu_intr::allocated(&m, rig.bed().hba), vectors);
        let disk = rig.disk0();
        for on in 0..4usize {
            let before = rig.per_vector_quiet();
            let d = disk.clone();
            std::thread::spawn(move || {
                rvscsi_emu::ddi::cpu::run_on(on);
                let data = random_bytes(on as u64, 32 << 10);
                d.write(512 + on as u64 * 64, &data).expect("write");
                assert_eq!(d.read(512 + on as u64 * 64, 32 << 10).expect("read"), data);
            })
            .join()
            .expect("I/O thread");
            let after = rig.per_vector_quiet();
            let fired: Vec<usize> = (1..vectors).filter(|&v| after[v] > before[v]).collect();
            let own = if vectors == 2 { 1 } else { request_vector(on) };
            assert_eq!(
                fired,
                vec![own],
                "{psm:?} CPU {on}: {before:?} -> {after:?}"
            );
        }
        rig.finish_clean();
    }
}

/// Writes and reads back 32 KiB from a thread on CPU `on`; the MSI-X
/// vectors (past 0) that fired meanwhile.
fn io_and_vectors_fired(rig: &Rig, on: usize) -> Vec<usize> {
    let before = rig.per_vector_quiet();
    let d = rig.disk0();
    std::thread::spawn(move || {
        rvscsi_emu::ddi::cpu::run_on(on);
        let data = random_bytes(on as u64 + 77, 32 << 10);
        d.write(4096 + on as u64 * 64, &data).expect("write");
        assert_eq!(d.read(4096 + on as u64 * 64, 32 << 10).expect("read"), data);
    })
    .join()
    .expect("I/O thread");
    let after = rig.per_vector_quiet();
    (1..after.len()).filter(|&v| after[v] > before[v]).collect()
}

/// Another device takes vectors from a pool of 16: the pool reduces the
/// driver from 13 to its default size (8) and says so with
/// DDI_CB_INTR_REMOVE while I/O runs on every queue; the driver moves the
/// queues onto the 8 vectors and frees the others, and I/O goes on. When
/// that device goes, DDI_CB_INTR_ADD brings the driver back to 13.
#[test]
fn an_irm_remove_mid_run_moves_the_queues_and_io_keeps_working_then_add_restores_them() {
    for transport in ["modern", "legacy"] {
        remove_then_add(RigConfig {
            transport: transport.into(),
            ..RigConfig::default()
        });
    }
}

/// The same through the shipped module object (`target/kernel/rvscsi`,
/// built by `pkg/build.sh`), its imports bound by the loader.
#[test]
fn the_shipped_module_follows_an_irm_remove_and_add_too() {
    let path =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/kernel/rvscsi");
    assert!(
        path.exists(),
        "{} is missing: pkg/build.sh (test/run.sh runs it first) builds the module",
        path.display()
    );
    let mut module = rvscsi_loader::Module::load_file(&path, &rvscsi_loader::Kernel::test_bed())
        .unwrap_or_else(|e| panic!("load: {e}"));
    module.init().unwrap_or_else(|e| panic!("_init: {e}"));
    remove_then_add(RigConfig {
        binding: rvscsi_sim::testkit::Binding::DevOps(module.dev_ops().expect("installed")),
        ..RigConfig::default()
    });
    assert_eq!(module.fini().expect("_fini"), 0);
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The REMOVE and ADD of the test above on a rig made from `base`.
fn remove_then_add(base: RigConfig) {
    let rig = Rig::start(RigConfig {
        num_queues: Some(12),
        apix_system_max_vectors: Some(16),
        ..base
    });
    let m = rig.bed().machine.clone();
    let hba = rig.bed().hba;
    assert_eq!(emu_intr::irm_pool(&m), Some((16, 8)));
    assert_eq!(emu_intr::irm_grant(&m, hba), Some((13, 13)));
    // kstat(8) shows what the driver holds, MSI-X (4), and its queues.
    assert_eq!(rig.hba_stat("intr_type"), ffi::DDI_INTR_TYPE_MSIX as u64);
    assert_eq!(rig.hba_stat("intr_vectors"), 13);
    assert_eq!(rig.hba_stat("queues"), 12);
    let disk = rig.disk0();
    let stop = Arc::new(AtomicBool::new(false));
    // The I/O threads stop when the test does, passing or not.
    let _stop_guard = StopOnDrop(stop.clone());
    let io: Vec<_> = (0..8usize)
        .map(|on| {
            let (d, stop) = (disk.clone(), stop.clone());
            std::thread::spawn(move || {
                rvscsi_emu::ddi::cpu::run_on(on);
                let lba = 1024 + on as u64 * 128;
                let mut rounds = 0u64;
                // Until told to stop (the cap only bounds a runaway test).
                while !stop.load(Ordering::Acquire) && rounds < 1_000_000 {
                    let data = random_bytes(rounds * 8 + on as u64, 16 << 10);
                    d.write(lba, &data).expect("write");
                    assert_eq!(d.read(lba, 16 << 10).expect("read"), data);
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    // Let the I/O get going on every queue first.
    wait_until("I/O on the request queues", Duration::from_secs(30), || {
        let v = rig.per_vector();
        (1..9).all(|i| v[i] > 0)
    });

    let (other, got) = emu_intr::irm_add_device(&m, 8).expect("the other device fits");
    assert_eq!(got, 8);
    assert_eq!(emu_intr::irm_grant(&m, hba), Some((13, 8)));
    assert_eq!(
        emu_intr::allocated(&m, hba),
        8,
        "the driver released the excess"
    );
    assert_eq!(rig.hba_stat("intr_vectors"), 8, "the kstat follows");
    let log = rig.log();
    assert!(
        log.iter()
            .any(|l| l.contains("IRM removed 5: 13 -> 8 MSI-X vector(s)")),
        "{log:?}"
    );
    // The I/O running across the change goes on, then stops.
    let before = rig.per_vector();
    wait_until("I/O after the REMOVE", Duration::from_secs(30), || {
        let v = rig.per_vector();
        (1..8).all(|i| v[i] > before[i] + 2)
    });
    stop.store(true, Ordering::Release);
    for t in io {
        assert!(t.join().expect("I/O thread") > 0);
    }
    // Each CPU's queue now interrupts on its vector of the 8: queue q on
    // 1 + q % 7, and nothing on the vectors given back.
    for on in 0..8usize {
        let fired = io_and_vectors_fired(&rig, on);
        assert_eq!(fired, vec![1 + on % 7], "after the REMOVE, CPU {on}");
    }

    emu_intr::irm_remove_device(&m, other);
    assert_eq!(emu_intr::irm_grant(&m, hba), Some((13, 13)));
    assert_eq!(emu_intr::allocated(&m, hba), 13);
    assert_eq!(rig.hba_stat("intr_vectors"), 13, "and back");
    assert!(
        rig.log()
            .iter()
            .any(|l| l.contains("IRM added 5: 8 -> 13 MSI-X vector(s)")),
        "{:?}",
        rig.log()
    );
    for on in 0..8usize {
        let fired = io_and_vectors_fired(&rig, on);
        assert_eq!(fired, vec![request_vector(on)], "after the ADD, CPU {on}");
    }
    assert!(m.violations().is_empty(), "{:?}", m.violations());
    rig.finish_clean();
}

/// `interrupt-priorities=12` (as a .conf may set it, read by the x86 PCI
/// nexus for MSI/MSI-X too) makes the interrupts high-level: the driver
/// refuses to attach, says why naming the level, and gives everything back.
/// Below LOCK_LEVEL + 1 the priority is taken.
#[test]
fn a_high_level_interrupt_priority_is_refused_with_a_warning_and_a_low_one_taken() {
    let failed = Rig::try_attach(RigConfig {
        props: vec![("interrupt-priorities".into(), 12)],
        ..RigConfig::default()
    })
    .err()
    .expect("attach refused");
    // The message carries the driver's log.
    assert!(
        failed
            .message
            .contains("interrupt priority 12 is high-level"),
        "{}",
        failed.message
    );
    assert!(failed.report.is_clean(), "{:?}", failed.report);

    let rig = Rig::start(RigConfig {
        props: vec![("interrupt-priorities".into(), 9)],
        ..RigConfig::default()
    });
    let disk = rig.disk0();
    let data = random_bytes(9, 64 << 10);
    disk.write(8, &data).expect("write");
    assert_eq!(disk.read(8, 64 << 10).expect("read"), data);
    rig.finish_clean();
}
