//! Teardown order: a failed attach resets the device before it frees the
//! memory the device uses; an interrupt arriving during detach cannot get
//! work dispatched onto a task queue whose owner is being freed; a device
//! write into DMA memory after it was freed is caught by the bed.

use rvscsi::ffi;
use rvscsi_emu::ddi::{dma, taskq};
use rvscsi_emu::faults::Fault;
use rvscsi_emu::machine::{MSG_MAGIC, lock};
use rvscsi_emu::scsa::hba::hba_state;
use rvscsi_sim::testkit::{Binding, Driver, Rig, RigConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The configuration vector was still enabled: the interrupt was
    /// delivered to the driver.
    Delivered,
    /// The configuration vector was already disabled.
    VectorOff,
    /// The vector was enabled but the message was not delivered in time.
    Undelivered,
}

#[test]
fn an_interrupt_during_detach_cannot_dispatch_work_onto_a_freed_hba() {
    // One request queue and enough MSI-X vectors for one each: vector 0 is
    // the configuration vector.
    let rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        num_queues: Some(1),
        msix_vectors: Some(4),
        ..RigConfig::default()
    });
    let m = rig.bed().machine.clone();
    let hba = rig.bed().hba as usize;
    {
        let st = lock(&m.intr);
        assert!(
            st.vectors.len() >= 3 && st.vectors.iter().take(3).all(|v| v.handler.is_some()),
            "the driver did not take a vector per source: this test needs the dedicated \
             configuration vector"
        );
    }
    let window = Arc::new(Mutex::new(Window::NotReached));
    let fired = Arc::new(AtomicBool::new(false));
    {
        let (m2, window, fired) = (Arc::downgrade(&m), window.clone(), fired.clone());
        // After the first task-queue wait of the HBA's own detach (the
        // framework has called scsi_hba_detach: the HBA's SCSA state is
        // gone): the device fails (DEVICE_NEEDS_RESET with a configuration
        // interrupt, virtio 1.2 §2.1.2) and the task thread is slow to get
        // a CPU. A driver that still takes interrupts here dispatches a
        // reset that runs when the queue is destroyed.
        taskq::after_wait(&m, move || {
            let Some(m) = m2.upgrade() else { return };
            if hba_state(hba as *mut ffi::dev_info_t).is_some()
                || fired.swap(true, Ordering::AcqRel)
            {
                return;
            }
            taskq::hold_tasks(&m, true);
            m.faults.arm(Fault::NeedsReset);
            let (enabled, mailbox) = {
                let st = lock(&m.intr);
                let v = st.vectors.first().copied();
                (
                    v.is_some_and(|v| v.enabled && v.handler.is_some()),
                    st.mailbox,
                )
            };
            if !enabled {
                *lock(&window) = Window::VectorOff;
                return;
            }
            let delivered_before = m.stats.per_vector[0].load(Ordering::Acquire);
            // The MSI-X message of vector 0, as the device writes it.
            m.qt.writel(mailbox, MSG_MAGIC)
                .expect("write the MSI-X message");
            m.kick();
            let t0 = Instant::now();
            while m.stats.per_vector[0].load(Ordering::Acquire) == delivered_before
                && t0.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            *lock(&window) = if m.stats.per_vector[0].load(Ordering::Acquire) != delivered_before {
                Window::Delivered
            } else {
                Window::Undelivered
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
        "detach with an interrupt in its window ({seen:?}): leaks {:?}, pages {}, violations {:?}",
        report.leaks,
        report.pages_leaked,
        report.violations
    );
    // The driver disables its interrupts before it drains its task queue.
    assert_eq!(seen, Window::VectorOff);
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
    let log: Vec<String> = m.log().into_iter().map(|l| l.text).collect();
    assert!(
        log.iter()
            .any(|l| l.contains("did not finish its reset") && l.contains("kept, not freed")),
        "{log:#?}"
    );
    m.faults.disarm_all();
}
