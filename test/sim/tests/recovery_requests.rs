//! How `tran_reset(9E)` and `tran_abort(9E)` requests are served when the
//! caller may not wait: never refused while the HBA runs or is being reset
//! (sd fails the I/O with EIO when every reset returns 0: sd.c
//! `sd_pkt_status_busy`), never run nested inside the driver's own
//! completion delivery (its work task and watchdog are kernel threads,
//! where `servicing_interrupt()` is 0), done at once during a panic (a
//! crash dump: sddump resets with RESET_ALL and gives up on 0, and no task
//! queue runs then), escalated on the task queue when the device refuses,
//! and dropped once the HBA is stopped.

use rvscsi::ffi;
use rvscsi::hba::{Hba, HbaState};
use rvscsi::vioscsi::VioScsi;
use rvscsi_emu::Backend;
use rvscsi_emu::ddi::sync::{enter_interrupt_context, leave_interrupt_context};
use rvscsi_emu::ddi::{panic, taskq};
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_emu::memdev::{AsyncCompletions, Completions, MemoryMachine};
use rvscsi_sim::testkit::{
    Driver, Rig, RigConfig, clear_unit_attention, read_block, reset_firings, test_unit_ready,
    wait_for,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

/// `VIRTIO_SCSI_S_FUNCTION_REJECTED` (virtio 1.2 §5.6.6.2).
const FUNCTION_REJECTED: u8 = 11;
/// The modern common configuration's device_status (virtio 1.2 §4.1.4.3).
const DEVICE_STATUS: u64 = 0x14;

fn recorder_rig(luns: u16, interrupts: &str) -> Rig {
    Rig::start(RigConfig {
        images: (0..luns).map(|l| (2048, 0, l)).collect(),
        driver: Driver::Recorder,
        interrupts: interrupts.into(),
        ..RigConfig::default()
    })
}

/// A rig on the in-memory device, whose completions can be held back
/// for good ([`never_completing`]).
fn memory_rig() -> Rig {
    Rig::start(RigConfig {
        images: vec![(2048, 0, 0)],
        driver: Driver::Recorder,
        backend: Backend::Memory,
        ..RigConfig::default()
    })
}

/// The in-memory device's request queues complete nothing from now on (a
/// command that never comes back; a device reset forgets what it held,
/// as a real device forgets what it never finished). Unlike the fault
/// layer's `Withhold`, which only hides a completion QEMU did write (so a
/// reaper that looks between the reset and the driver's reclaim may still
/// find it), nothing is ever in the used ring.
fn never_completing(rig: &Rig) -> Arc<MemoryMachine> {
    let dev = rig.memdev();
    dev.set_completions(Completions::Async(AsyncCompletions {
        tick: Duration::from_secs(3600),
        per_tick: 0,
        in_rearm_window: 0,
        signal: true,
    }));
    dev
}

/// The attached HBA.
fn hba(rig: &Rig) -> &Hba<VioScsi> {
    let dip = rig.bed().hba;
    let tran =
        rvscsi_emu::ddi::devinfo::ddi_get_driver_private(dip).cast::<rvscsi::ffi::scsi_hba_tran>();
    assert!(!tran.is_null(), "the HBA node has its transport");
    // SAFETY: the attached HBA node's driver-private pointer is the
    // framework's scsi_hba_tran, whose tran_hba_private is the driver's
    // Hba<VioScsi> (entry::rvscsi_hba_attach); it lives until detach, which
    // `rig` (borrowed for the result's lifetime) has not done.
    unsafe { &*(*tran).tran_hba_private.cast::<Hba<VioScsi>>().cast_const() }
}

/// Runs `f` on this thread as an interrupt handler would.
fn in_interrupt<T>(rig: &Rig, f: impl FnOnce() -> T) -> T {
    enter_interrupt_context();
    let r = f();
    leave_interrupt_context(&rig.bed().machine);
    r
}

fn firing(level: i32, done: bool) -> Vec<u64> {
    vec![level as u64, 0, 0, u64::from(done)]
}

/// Asserts that the `rvscsi-reset` probe reports a done reset at `level`
/// within 20 s.
fn wait_for_reset_done(rig: &Rig, level: i32) {
    assert!(
        wait_for(Duration::from_secs(20), || reset_firings(rig)
            .contains(&firing(level, true))),
        "{:?}",
        reset_firings(rig)
    );
}

/// Asserts that the HBA enters RESETTING within 20 s (`what` names the
/// reset).
fn wait_until_resetting(rig: &Rig, what: &str) {
    assert!(
        wait_for(Duration::from_secs(20), || hba(rig).state()
            == HbaState::Resetting),
        "{what}"
    );
}

/// LUN 0 of the recorder, its unit attention consumed.
fn ready_device(rig: &Rig) -> Arc<rvscsi_emu::Device> {
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    dev
}

/// Waits until the work task is idle (no task queued or running).
fn tasks_idle(rig: &Rig) {
    let m = &rig.bed().machine;
    assert!(
        wait_for(Duration::from_secs(20), || taskq::all_idle(m)),
        "the work task went idle"
    );
}

#[test]
fn a_full_request_list_becomes_one_device_reset_and_nothing_is_refused() {
    let rig = recorder_rig(6, "msix");
    let devs = rig.recorder.devices();
    assert_eq!(devs.len(), 6);
    for d in &devs {
        clear_unit_attention(d);
    }
    let m = rig.bed().machine.clone();
    tasks_idle(&rig);
    // The work task gets no CPU meanwhile: every request stays queued.
    taskq::hold_tasks(&m, true);
    let rcs: Vec<i32> = in_interrupt(&rig, || {
        let mut rcs = Vec::new();
        for d in &devs {
            rcs.push(d.reset(ffi::RESET_LUN));
            rcs.push(d.reset(ffi::RESET_TARGET));
            rcs.push(d.abort(None));
        }
        rcs
    });
    taskq::hold_tasks(&m, false);
    // 18 different requests, 16 slots: the 17th and 18th are accepted too.
    assert_eq!(rcs, vec![1; 18]);
    wait_for_reset_done(&rig, ffi::RESET_ALL);
    tasks_idle(&rig);
    // The list became that one reset: nothing else was sent.
    assert_eq!(reset_firings(&rig), vec![firing(ffi::RESET_ALL, true)]);
    assert_eq!(m.probes.count("rvscsi-cmd-abort"), 0);
    for d in &devs {
        clear_unit_attention(d);
    }
    rig.finish_clean();
}

#[test]
fn requests_made_while_the_device_is_being_reset_are_accepted_and_covered_by_it() {
    let rig = recorder_rig(1, "msix");
    let dev = ready_device(&rig);
    let m = rig.bed().machine.clone();
    // The device takes its time to finish the reset: the HBA stays
    // RESETTING until the fault is cleared.
    m.faults.arm(Fault::ResetStuck);
    assert_eq!(in_interrupt(&rig, || dev.reset(ffi::RESET_ALL)), 1);
    wait_until_resetting(&rig, "the device reset began");
    let (target, abort) = in_interrupt(&rig, || (dev.reset(ffi::RESET_TARGET), dev.abort(None)));
    assert_eq!(
        hba(&rig).state(),
        HbaState::Resetting,
        "the requests were made during the reset"
    );
    m.faults.disarm_all();
    assert_eq!((target, abort), (1, 1), "covered by the reset under way");
    wait_for_reset_done(&rig, ffi::RESET_ALL);
    tasks_idle(&rig);
    // Covered, not queued: no TMF followed the reset.
    assert_eq!(reset_firings(&rig), vec![firing(ffi::RESET_ALL, true)]);
    assert_eq!(m.probes.count("rvscsi-cmd-abort"), 0);
    clear_unit_attention(&dev);
    rig.finish_clean();
}

/// What a completion routine saw when it asked for a target reset.
#[derive(Default)]
struct AskedFromCallback {
    /// `servicing_interrupt()` there.
    in_interrupt: AtomicI32,
    /// What scsi_reset(RESET_TARGET) returned.
    rc: AtomicI32,
    /// `rvscsi-reset` firings during the call (a reset done inside it).
    fired_during: AtomicU64,
}

impl AskedFromCallback {
    /// Asserts the routine ran in thread context (`delivered_from` says
    /// which thread), had its reset accepted, and that no reset ran inside
    /// it (`not_nested`).
    fn assert_accepted_from_thread_not_nested(&self, delivered_from: &str, not_nested: &str) {
        assert_eq!(
            self.in_interrupt.load(Ordering::Relaxed),
            0,
            "{delivered_from}"
        );
        assert_eq!(self.rc.load(Ordering::Relaxed), 1, "accepted");
        assert_eq!(self.fired_during.load(Ordering::Relaxed), 0, "{not_nested}");
    }
}

fn asking_callback(asked: &Arc<AskedFromCallback>) -> rvscsi_emu::scsa::packet::Callback {
    let asked = asked.clone();
    Arc::new(move |p: &rvscsi_emu::Packet| {
        let probes = &p.device().machine.probes;
        asked.in_interrupt.store(
            rvscsi_emu::ddi::cpu::servicing_interrupt(),
            Ordering::Relaxed,
        );
        let before = probes.count("rvscsi-reset");
        asked
            .rc
            .store(p.device().reset(ffi::RESET_TARGET), Ordering::Relaxed);
        asked
            .fired_during
            .store(probes.count("rvscsi-reset") - before, Ordering::Relaxed);
    })
}

#[test]
fn a_completion_the_work_task_delivers_asks_for_a_reset_that_runs_later_not_nested() {
    let rig = memory_rig();
    let dev = ready_device(&rig);
    // A command outstanding through a device reset: the reset, on the work
    // task, completes it, and its completion routine asks for a reset.
    let memdev = never_completing(&rig);
    let held = read_block(&dev, 50);
    let asked = Arc::new(AskedFromCallback::default());
    held.set_callback(Some(asking_callback(&asked)));
    assert_eq!(held.start_async(), ffi::TRAN_ACCEPT);
    assert_eq!(in_interrupt(&rig, || dev.reset(ffi::RESET_ALL)), 1);
    assert!(held.wait(Duration::from_secs(20)), "the reset ended it");
    memdev.set_completions(Completions::Inline);
    assert_eq!(held.result().reason, ffi::CMD_RESET);
    asked.assert_accepted_from_thread_not_nested(
        "delivered from the work task, a kernel thread",
        "no TMF or reset ran inside the completion routine",
    );
    // The work task did it afterwards.
    wait_for_reset_done(&rig, ffi::RESET_TARGET);
    held.set_callback(None);
    held.destroy();
    tasks_idle(&rig);
    clear_unit_attention(&dev);
    rig.finish_clean();
}

#[test]
fn a_completion_the_watchdog_delivers_asks_for_a_reset_that_runs_on_the_task_queue() {
    // Polled mode: the watchdog (ddi_periodic, level 0) delivers every
    // completion.
    let rig = recorder_rig(1, "poll");
    let dev = ready_device(&rig);
    let tur = test_unit_ready(&dev);
    let asked = Arc::new(AskedFromCallback::default());
    tur.set_callback(Some(asking_callback(&asked)));
    assert_eq!(tur.transport(), ffi::TRAN_ACCEPT);
    assert!(tur.wait(Duration::from_secs(20)));
    tur.set_callback(None);
    tur.destroy();
    asked.assert_accepted_from_thread_not_nested(
        "the watchdog",
        "no TMF ran inside the watchdog's completion",
    );
    wait_for_reset_done(&rig, ffi::RESET_TARGET);
    tasks_idle(&rig);
    rig.finish_clean();
}

#[test]
fn during_a_panic_a_reset_from_interrupt_context_is_done_before_it_returns() {
    let rig = recorder_rig(1, "msix");
    let dev = ready_device(&rig);
    let m = rig.bed().machine.clone();
    tasks_idle(&rig);
    // A panic on an interrupt thread, then the dump's scsi_reset(RESET_ALL)
    // (sddump): no task queue runs any more.
    panic::set_panicking(&m, true);
    taskq::hold_tasks(&m, true);
    let rc = in_interrupt(&rig, || dev.reset(ffi::RESET_ALL));
    let done_by_then = reset_firings(&rig);
    taskq::hold_tasks(&m, false);
    panic::set_panicking(&m, false);
    assert_eq!(rc, 1);
    assert_eq!(
        done_by_then,
        vec![firing(ffi::RESET_ALL, true)],
        "the reset was done when scsi_reset returned"
    );
    assert_eq!(hba(&rig).state(), HbaState::Running);
    tasks_idle(&rig);
    clear_unit_attention(&dev);
    assert_eq!(reset_firings(&rig).len(), 1, "and not a second time later");
    rig.finish_clean();
}

#[test]
fn a_device_reset_that_ends_after_quiesce_leaves_the_hba_and_the_device_stopped() {
    let rig = recorder_rig(1, "msix");
    let dev = ready_device(&rig);
    let m = rig.bed().machine.clone();
    tasks_idle(&rig);
    taskq::hold_tasks(&m, true);
    // Queued: a target reset, then an abort of the LUN's task set.
    let rcs = in_interrupt(&rig, || (dev.reset(ffi::RESET_TARGET), dev.abort(None)));
    assert_eq!(rcs, (1, 1));
    // The device refuses the target reset (so the work task resets the
    // device) and takes its time with that reset.
    m.faults.arm(Fault::TmfResponse {
        response: FUNCTION_REJECTED,
        count: 1,
    });
    m.faults.arm(Fault::ResetStuck);
    taskq::hold_tasks(&m, false);
    wait_until_resetting(&rig, "the escalated device reset began");
    let tmfs_sent = m.faults.stats().control_notifies;
    // Fast reboot meanwhile.
    assert_eq!(rig.bed().quiesce(), ffi::DDI_SUCCESS);
    m.faults.disarm_all();
    assert!(
        wait_for(Duration::from_secs(20), || reset_firings(&rig)
            .iter()
            .any(|f| f[0] == ffi::RESET_ALL as u64)),
        "{:?}",
        reset_firings(&rig)
    );
    tasks_idle(&rig);
    assert_eq!(
        hba(&rig).state(),
        HbaState::Stopped,
        "quiesce's STOPPED stands"
    );
    let common = m.faults.layout().common.expect("modern interface");
    assert_eq!(
        m.qt.readb(common + DEVICE_STATUS).expect("device status"),
        0,
        "the device the reset brought back was stopped again"
    );
    assert_eq!(
        m.faults.stats().control_notifies,
        tmfs_sent,
        "the queued abort was not sent to the stopped device"
    );
    assert_eq!(m.probes.count("rvscsi-cmd-abort"), 0);
    rig.finish_clean();
}

#[test]
fn a_reset_the_device_refuses_climbs_the_ladder_on_the_task_queue() {
    let rig = recorder_rig(1, "msix");
    let dev = ready_device(&rig);
    let m = rig.bed().machine.clone();
    // A LUN reset, refused, then the target reset, refused: the device.
    m.faults.arm(Fault::TmfResponse {
        response: FUNCTION_REJECTED,
        count: 2,
    });
    assert_eq!(in_interrupt(&rig, || dev.reset(ffi::RESET_LUN)), 1);
    assert!(
        wait_for(Duration::from_secs(20), || reset_firings(&rig).len() == 3),
        "{:?}",
        reset_firings(&rig)
    );
    assert_eq!(
        reset_firings(&rig),
        vec![
            firing(ffi::RESET_LUN, false),
            firing(ffi::RESET_TARGET, false),
            firing(ffi::RESET_ALL, true)
        ]
    );
    assert_eq!(m.faults.stats().tmfs, 2);
    tasks_idle(&rig);
    clear_unit_attention(&dev);
    // A target reset, refused: the device.
    m.faults.arm(Fault::TmfResponse {
        response: FUNCTION_REJECTED,
        count: 1,
    });
    assert_eq!(in_interrupt(&rig, || dev.reset(ffi::RESET_TARGET)), 1);
    assert!(
        wait_for(Duration::from_secs(20), || reset_firings(&rig).len() == 5),
        "{:?}",
        reset_firings(&rig)
    );
    assert_eq!(
        reset_firings(&rig)[3..],
        [
            firing(ffi::RESET_TARGET, false),
            firing(ffi::RESET_ALL, true)
        ]
    );
    tasks_idle(&rig);
    clear_unit_attention(&dev);
    // An abort of the task set, accepted for the task and done there.
    assert_eq!(in_interrupt(&rig, || dev.abort(None)), 1);
    assert!(
        wait_for(Duration::from_secs(20), || m
            .probes
            .firings("rvscsi-cmd-abort")
            .iter()
            .any(|f| f.args == [0, 0, 0, 1])),
        "{:?}",
        m.probes.firings("rvscsi-cmd-abort")
    );
    tasks_idle(&rig);
    assert_eq!(
        reset_firings(&rig).len(),
        5,
        "no reset for a successful abort"
    );
    rig.finish_clean();
}

/// Offset of `status` in the virtio-scsi response header (virtio 1.2
/// §5.6.6.1).
const RESP_STATUS: usize = 10;

#[test]
fn a_busy_device_makes_sd_reset_and_a_full_request_list_does_not_fail_the_io_with_eio() {
    let rig = Rig::start(RigConfig {
        images: (0..6).map(|l| (2048, 0, l)).collect(),
        ..RigConfig::default()
    });
    let disks = rig.sd.disks();
    assert_eq!(disks.len(), 6);
    let m = rig.bed().machine.clone();
    tasks_idle(&rig);
    taskq::hold_tasks(&m, true);
    // Sixteen different requests fill the list (the work task gets no
    // CPU); none is the target reset of disk 0 that sd will ask for.
    let rcs: Vec<i32> = in_interrupt(&rig, || {
        let mut rcs = Vec::new();
        for d in &disks[1..] {
            rcs.push(d.dev.reset(ffi::RESET_LUN));
            rcs.push(d.dev.reset(ffi::RESET_TARGET));
        }
        for d in &disks {
            rcs.push(d.dev.abort(None));
        }
        rcs
    });
    assert_eq!(rcs, vec![1; 16]);
    // The device answers BUSY twice: on the second, sd_pkt_status_busy
    // resets from its completion routine (RESET_TARGET, sd's default,
    // then RESET_ALL) and fails the read with EIO if both return 0.
    for _ in 0..2 {
        m.faults.arm(Fault::Response(
            Match::Lba(100),
            vec![(RESP_STATUS, vec![ffi::STATUS_BUSY])],
        ));
    }
    let disk = &disks[0];
    let read = disk.read(100, 512);
    taskq::hold_tasks(&m, false);
    let data = read.expect("no EIO");
    assert_eq!(data, rig.images[0].expected(100, 1));
    let rec = &disk.recovery;
    assert_eq!(rec.busy_resets.load(Ordering::Relaxed), 1, "sd reset");
    assert_eq!(rec.interrupt_resets.load(Ordering::Relaxed), 1);
    assert_eq!(
        rec.resets_at(ffi::RESET_TARGET),
        (1, 1),
        "accepted with the list full"
    );
    assert_eq!(rec.resets_at(ffi::RESET_LUN), (0, 0), "not enabled");
    assert_eq!(rec.busy_failures.load(Ordering::Relaxed), 0);
    wait_for_reset_done(&rig, ffi::RESET_ALL);
    tasks_idle(&rig);
    assert_eq!(reset_firings(&rig), vec![firing(ffi::RESET_ALL, true)]);
    for d in &disks {
        let more = d.read(10, 4096).expect("later I/O");
        assert_eq!(more.len(), 4096);
    }
    rig.finish_clean();
}

#[test]
fn completions_a_device_reset_in_thread_context_delivers_ask_for_resets_that_run_later() {
    let rig = memory_rig();
    let dev = ready_device(&rig);
    let memdev = never_completing(&rig);
    let held = read_block(&dev, 50);
    let asked = Arc::new(AskedFromCallback::default());
    held.set_callback(Some(asking_callback(&asked)));
    assert_eq!(held.start_async(), ffi::TRAN_ACCEPT);
    tasks_idle(&rig);
    let m = rig.bed().machine.clone();
    // What the completion routine asks for stays queued until looked at.
    taskq::hold_tasks(&m, true);
    // A thread (scsi_reset from a target driver's thread): done at once,
    // and the reset completes the held command from inside the call.
    assert_eq!(dev.reset(ffi::RESET_ALL), 1);
    memdev.set_completions(Completions::Inline);
    assert_eq!(reset_firings(&rig), vec![firing(ffi::RESET_ALL, true)]);
    assert!(held.is_done(), "the reset ended it");
    assert_eq!(held.result().reason, ffi::CMD_RESET);
    asked.assert_accepted_from_thread_not_nested(
        "delivered from the resetting thread",
        "no TMF ran nested inside the reset's completion",
    );
    taskq::hold_tasks(&m, false);
    wait_for_reset_done(&rig, ffi::RESET_TARGET);
    held.set_callback(None);
    held.destroy();
    tasks_idle(&rig);
    clear_unit_attention(&dev);
    rig.finish_clean();
}

#[test]
fn the_emulated_panic_is_per_machine_and_a_delay_in_it_is_a_violation() {
    let rig = recorder_rig(1, "msix");
    let m = rig.bed().machine.clone();
    let _current = rvscsi_emu::machine::set_current(&m);
    assert_eq!(panic::ddi_in_panic(), 0);
    panic::set_panicking(&m, true);
    assert_eq!(panic::ddi_in_panic(), 1);
    // A thread of no machine (or another machine) is not panicking.
    assert_eq!(
        std::thread::spawn(|| panic::ddi_in_panic()).join().unwrap(),
        0
    );
    let before = m.violations().len();
    // clock() does nothing in a panic: a delay would never end.
    rvscsi_emu::ddi::time::delay(1);
    panic::set_panicking(&m, false);
    assert_eq!(panic::ddi_in_panic(), 0);
    let new: Vec<String> = m.violations()[before..].to_vec();
    assert!(
        new.len() == 1 && new[0].contains("delay(9F) during a panic"),
        "{new:?}"
    );
    // The violation was this test's own doing: the detach itself is fine.
    drop(_current);
    let report = rig.finish();
    assert_eq!(report.violations.len(), before + 1, "{report:?}");
    assert!(
        report.leaks.is_empty() && report.pages_leaked == 0,
        "{report:?}"
    );
}

#[test]
fn a_reset_the_device_never_finishes_fails_the_controller_and_says_so() {
    // tran_reset(RESET_ALL) from thread context, on a device whose reset
    // never completes: the driver gives up waiting, the controller is lost
    // (kstat device_resets_failed; fmdump -e: inval_state/reset-failed and
    // service.lost), and new commands fail at once instead of hanging.
    let rig = recorder_rig(1, "msix");
    let dev = ready_device(&rig);
    let m = rig.bed().machine.clone();
    m.faults.arm(Fault::ResetStuck);
    assert_eq!(dev.reset(ffi::RESET_ALL), 0, "the reset did not work");
    assert_eq!(hba(&rig).state(), HbaState::Failed);
    assert_eq!(rig.hba_stat("device_resets"), 1);
    assert_eq!(rig.hba_stat("device_resets_failed"), 1);
    let reports = rvscsi_emu::ddi::fm::ereports(&m);
    let classes: Vec<&str> = reports.iter().map(|e| e.class.as_str()).collect();
    assert_eq!(
        classes,
        ["ereport.io.device.inval_state", "ereport.io.service.lost"]
    );
    assert_eq!(
        reports[0].member("detail"),
        Some(&rvscsi_emu::ddi::fm::Payload::Str("reset-failed".into()))
    );
    let p = read_block(&dev, 5);
    assert_eq!(p.start_async(), ffi::TRAN_FATAL_ERROR);
    p.destroy();
    // The device finishes resets again: detach stops it and frees all.
    m.faults.disarm_all();
    rig.finish_clean();
}
