//! Teardown order: a failed attach resets the device before it frees the
//! memory the device uses; the interrupts are off before detach drains its
//! task queue; a closed task queue refuses every dispatch, even from a task
//! already running; a device write into DMA memory after it was freed is
//! caught by the bed.

use rvscsi::ddi::Dip;
use rvscsi::ddi::taskq::TaskQueue;
use rvscsi::ffi;
use rvscsi_emu::ddi::{dma, taskq};
use rvscsi_emu::faults::Fault;
use rvscsi_emu::machine::{lock, set_current};
use rvscsi_emu::scsa::hba::hba_state;
use rvscsi_sim::testkit::{Binding, Driver, Rig, RigConfig};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[test]
fn a_failed_attach_resets_the_device_before_freeing_its_rings() {
    // Through the library's entry points and through the C shim's dev_ops.
    for binding in [Binding::Library, Binding::Shim] {
        failed_attach_resets_the_device(binding);
    }
}

fn failed_attach_resets_the_device(binding: Binding) {
    // The device fails as soon as it runs: DEVICE_NEEDS_RESET right after
    // DRIVER_OK, the last step of bringing it up. By then the driver has
    // given it every ring and posted the event buffers.
    let failure = match Rig::try_attach(RigConfig {
        driver: Driver::Recorder,
        faults: vec![Fault::NeedsReset],
        binding,
        ..RigConfig::default()
    }) {
        Ok(rig) => {
            rig.finish();
            panic!("the driver attached to a device that needs a reset");
        }
        Err(f) => f,
    };
    assert!(
        failure.message.contains("attach of the HBA failed")
            && failure
                .message
                .contains("device needs reset right after DRIVER_OK"),
        "{binding:?}: {}",
        failure.message
    );
    // The bed's DMA emulation reports memory freed while the device still
    // has it as a ring (and device writes into freed memory).
    assert!(
        failure.report.is_clean(),
        "{binding:?}: a failed attach left {:?} (pages {}), violations {:?}",
        failure.report.leaks,
        failure.report.pages_leaked,
        failure.report.violations
    );
}

/// What the hook in the detach window found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Window {
    /// The hook did not run during the HBA's detach.
    #[default]
    NotReached,
    /// The configuration vector was still enabled, with its handler: an
    /// interrupt now would reach the driver and could dispatch work.
    VectorOn,
    /// The configuration vector was already disabled.
    VectorOff,
}

#[test]
fn the_interrupts_are_off_before_detach_drains_its_task_queue() {
    // MSI-X, one request queue: vector 0 is the configuration vector (a
    // DEVICE_NEEDS_RESET there schedules a reset on the task queue).
    let rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        num_queues: Some(1),
        msix_vectors: Some(4),
        ..RigConfig::default()
    });
    let m = rig.bed().machine.clone();
    let hba = rig.bed().hba as usize;
    {
        // MsixLayout puts configuration changes (and events) on vector 0
        // whatever the grant.
        let st = lock(&m.intr);
        assert!(
            st.vectors.first().is_some_and(|v| v.handler.is_some()),
            "the driver took no MSI-X vector 0 ({} vectors): this test needs the \
             configuration vector",
            st.vectors.len()
        );
    }
    let window = Arc::new(Mutex::new(Window::NotReached));
    let fired = Arc::new(AtomicBool::new(false));
    {
        let (m2, window, fired) = (Arc::downgrade(&m), window.clone(), fired.clone());
        // After the first task-queue wait of the HBA's own detach (the
        // framework has called scsi_hba_detach: the HBA's SCSA state is
        // gone), which is the last wait before the queue is destroyed: an
        // interrupt that can still reach the driver here can dispatch work
        // the destroy then finds. The state of the vector says whether one
        // can; no interrupt is raised (on a driver that got the order
        // wrong it would run on an HBA being freed), so the test needs no
        // waiting at all.
        taskq::after_wait(&m, move || {
            let Some(m) = m2.upgrade() else { return };
            if hba_state(hba as *mut ffi::dev_info_t).is_some()
                || fired.swap(true, Ordering::AcqRel)
            {
                return;
            }
            let enabled = {
                let st = lock(&m.intr);
                st.vectors
                    .first()
                    .is_some_and(|v| v.enabled && v.handler.is_some())
            };
            *lock(&window) = if enabled {
                Window::VectorOn
            } else {
                Window::VectorOff
            };
        });
    }
    let report = rig.finish();
    assert!(
        fired.load(Ordering::Acquire),
        "the HBA's detach never waited for its task queue"
    );
    let seen = lock(&window).clone();
    assert!(
        report.is_clean(),
        "detach ({seen:?} when its task queue was drained): leaks {:?}, pages {}, violations {:?}",
        report.leaks,
        report.pages_leaked,
        report.violations
    );
    // The driver disables its interrupts before it drains its task queue.
    assert_eq!(seen, Window::VectorOff);
}

/// What the first task of the close test shares with the test.
struct CloseRace {
    tq: *const TaskQueue,
    /// Set (and signalled) once the test closed the queue.
    closed: (Mutex<bool>, Condvar),
    /// What the running task's dispatch after the close returned.
    late_dispatch: Mutex<Option<bool>>,
    /// Whether the late task ran.
    late_ran: AtomicBool,
}

/// The task already running when the queue is closed: it waits (bounded)
/// for the close, then dispatches onto the queue, as a work task that
/// requeues itself or an interrupt racing the teardown would.
unsafe extern "C" fn dispatch_after_close(arg: *mut c_void) {
    // SAFETY: the test passes its CloseRace and waits for the queue before
    // dropping it.
    let race = unsafe { &*arg.cast::<CloseRace>() };
    let (m, cv) = &race.closed;
    let g = cv
        .wait_timeout_while(lock(m), Duration::from_secs(30), |closed| !*closed)
        .map(|(g, _)| g)
        .unwrap_or_else(|p| p.into_inner().0);
    let closed = *g;
    drop(g);
    if !closed {
        return; // The test failed to close: it reports that itself.
    }
    // SAFETY: the queue outlives its tasks (the test waits for it); arg
    // outlives the late task likewise.
    let accepted = unsafe { (*race.tq).dispatch(late_task, arg) };
    *lock(&race.late_dispatch) = Some(accepted);
}

unsafe extern "C" fn late_task(arg: *mut c_void) {
    // SAFETY: as in dispatch_after_close.
    let race = unsafe { &*arg.cast::<CloseRace>() };
    race.late_ran.store(true, Ordering::Release);
}

#[test]
fn a_closed_task_queue_refuses_a_dispatch_from_a_running_task() {
    let rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..RigConfig::default()
    });
    let m = rig.bed().machine.clone();
    let _current = set_current(&m);
    let dip = Dip::new(rig.bed().hba).expect("the HBA node");
    let tq = TaskQueue::create(dip, c"rvscsi_close_test").expect("ddi_taskq_create");
    let race = CloseRace {
        tq: &tq,
        closed: (Mutex::new(false), Condvar::new()),
        late_dispatch: Mutex::new(None),
        late_ran: AtomicBool::new(false),
    };
    let arg = &race as *const CloseRace as *mut c_void;
    // SAFETY: `race` outlives the tasks: the queue is waited for below.
    assert!(unsafe { tq.dispatch(dispatch_after_close, arg) });
    tq.close();
    *lock(&race.closed.0) = true;
    race.closed.1.notify_all();
    // ddi_taskq_wait: until the running task and anything it queued ran.
    tq.wait();
    assert_eq!(
        *lock(&race.late_dispatch),
        Some(false),
        "a dispatch after close was not refused"
    );
    assert!(
        !race.late_ran.load(Ordering::Acquire),
        "a task dispatched after close ran"
    );
    drop(tq);
    drop(_current);
    rig.finish_clean();
}

#[test]
fn a_device_write_into_freed_dma_memory_is_caught() {
    let mut rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..RigConfig::default()
    });
    let m = rig.bed().machine.clone();
    // The event queue's used ring: the device writes there when an event
    // happens.
    let (_, _, _, _, used, _) = m
        .faults
        .queues()
        .into_iter()
        .find(|q| q.0 == 1 && q.5)
        .expect("the event queue is set up");
    let bed = rig.bed.as_mut().expect("attached");
    let report = bed.detach_nodes().expect("detach");
    assert!(report.is_clean(), "{report:?}");
    // A device that did not stop: an event completion lands in the ring
    // after the driver freed it.
    m.qt.write_mem(used + 2, &[1, 0, 0, 0, 0, 0])
        .expect("the late device write");
    dma::check_freed(&m);
    let v = m.violations();
    assert!(
        v.iter()
            .any(|s| s.contains("the device wrote into freed DMA memory")),
        "{v:?}"
    );
}

#[test]
fn a_device_that_never_finishes_its_reset_keeps_its_memory() {
    let mut rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..RigConfig::default()
    });
    let m = rig.bed().machine.clone();
    // From now on a reset never completes: the device may still be using
    // its rings when detach gives up waiting.
    m.faults.arm(Fault::ResetStuck);
    let bed = rig.bed.as_mut().expect("attached");
    let report = bed.detach_nodes().expect("detach");
    // Freeing the rings would be a violation (memory the device still has
    // as a ring); keeping them is a leak, and the log says why.
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(
        report
            .leaks
            .iter()
            .any(|&(what, n)| what == "DMA memory allocations" && n > 0),
        "{:?}",
        report.leaks
    );
    // The kept queues' kstats are deleted all the same (one left behind
    // would have its ks_update in an unloaded module), and FM is undone.
    assert!(
        report
            .leaks
            .iter()
            .all(|&(what, _)| what != "kstats" && what != "FM handles"),
        "{:?}",
        report.leaks
    );
    let log: Vec<String> = m.log().into_iter().map(|l| l.text).collect();
    assert!(
        log.iter()
            .any(|l| l.contains("did not finish its reset") && l.contains("kept, not freed")),
        "{log:#?}"
    );
    m.faults.disarm_all();
}
