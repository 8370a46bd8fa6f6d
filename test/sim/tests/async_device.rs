//! A device whose completions land while the driver runs, as QEMU's do
//! when its I/O completes on other threads (the in-memory device's
//! asynchronous mode, `rvscsi_emu::memdev::Completions::Async`), with
//! interrupts sent by QEMU's rules (hw/virtio/virtio.c,
//! virtio_split_should_notify: with EVENT_IDX the device interrupts only
//! when its used index passes the driver's `used_event`, virtio 1.2
//! §2.7.10, §2.7.7.2).
//!
//! The race is injected, not waited for: one held completion lands just
//! before each of the driver's `used_event` writes reaches memory, after
//! its last look at the used index. A driver that gives up re-arming after
//! a bounded number of passes then leaves `used_event` behind the device,
//! which never interrupts that queue again; these tests fail (the load
//! hangs until its bound) unless the driver then gets itself called again,
//! and unless its watchdog reaps a queue that has completions waiting.
//!
//! The watchdog does not tick on its own clock here: the tests hold the
//! machine's periodics (`rvscsi_emu::ddi::time::hold_periodics`) and fire
//! the ticks themselves, so every assertion about the watchdog counts
//! ticks and never depends on when a thread is scheduled. A load's time
//! limit is only a hang guard.

use rvscsi_emu::Backend;
use rvscsi_emu::ddi::time::{PeriodicHold, fire_periodics, hold_periodics};
use rvscsi_emu::memdev::{AsyncCompletions, Completions, MemoryMachine};
use rvscsi_sim::load::{self, LoadConfig};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A rig on the in-memory device with `num_queues` request queues.
fn memory_rig(num_queues: u32) -> Rig {
    memory_rig_with(num_queues, Vec::new())
}

fn memory_rig_with(num_queues: u32, props: Vec<(String, i32)>) -> Rig {
    Rig::start(RigConfig {
        images: vec![(16_384, 0, 0), (8192, 1, 0)],
        transport: "modern".into(),
        interrupts: "msix".into(),
        num_queues: Some(num_queues),
        backend: Backend::Memory,
        driver: Driver::Recorder,
        props,
        ..RigConfig::default()
    })
}

fn device(rig: &Rig) -> Arc<MemoryMachine> {
    rig.memdev()
}

/// The driver's counters.
fn driver_stats(rig: &Rig) -> &rvscsi::hba::Stats {
    let dip = rig.bed().hba;
    let tran =
        rvscsi_emu::ddi::devinfo::ddi_get_driver_private(dip).cast::<rvscsi::ffi::scsi_hba_tran>();
    assert!(!tran.is_null(), "the HBA node has its transport");
    // SAFETY: the attached HBA node's driver-private pointer is the
    // framework's scsi_hba_tran, whose tran_hba_private is the driver's
    // Hba<VioScsi> (entry::rvscsi_hba_attach); it lives until detach, which
    // `rig` (borrowed for the result's lifetime) has not done.
    unsafe {
        let hba = (*tran)
            .tran_hba_private
            .cast::<rvscsi::hba::Hba<rvscsi::vioscsi::VioScsi>>();
        &(*hba.cast_const()).stats
    }
}

/// A load whose only time limit is a hang guard: with the watchdog held
/// no timeout is ever scanned for, so a command that waits for an
/// interrupt that never comes hangs the load until `limit`, instead of
/// being rescued by the timeout ladder.
fn load_config(commands: usize, depth: usize) -> LoadConfig {
    LoadConfig {
        commands,
        depth,
        max_blocks: 16,
        pkt_time: 60,
        limit: Duration::from_secs(120),
        ..LoadConfig::default()
    }
}

/// Two watchdog ticks, fired and finished: a request queue whose
/// completions waited unconsumed from one to the next is reaped by the
/// second, and counted.
fn two_watchdog_ticks(hold: &PeriodicHold) {
    assert!(
        fire_periodics(hold) >= 1,
        "the driver's watchdog is registered"
    );
    fire_periodics(hold);
}

#[test]
fn completions_landing_in_every_rearm_window_never_leave_a_queue_silent() {
    let rig = memory_rig(1);
    let dev = device(&rig);
    let luns = rig.load_luns();
    // No watchdog tick during the load: only the interrupts and the
    // hand-off can serve the queue.
    let hold = hold_periodics(&rig.bed().machine);
    dev.set_completions(Completions::Async(AsyncCompletions::racing_rearm()));
    let r = load::run(&luns, &load_config(400, 16), &load::only_good, &mut |_| {});
    let m = &rig.bed().machine;
    let landed = dev.stats.landed_in_rearm_window.load(Ordering::Relaxed);
    eprintln!(
        "completed {} of {} (hung {}), {landed} landed in re-arm windows, {} interrupts",
        r.completed,
        r.issued,
        r.hung,
        m.stats.interrupts.load(Ordering::Relaxed)
    );
    r.assert_clean("completions racing the re-arm");
    assert_eq!(r.completed, 400);
    assert_eq!(
        m.probes.count("rvscsi-cmd-timeout"),
        0,
        "no command needed its timeout to come back"
    );
    assert!(landed > 0, "the race was exercised");
    let handed_off = rig.hba_stat("rearm_handoffs");
    assert!(
        handed_off > 0,
        "completion passes ran out with completions waiting, and said so"
    );
    let stats = driver_stats(&rig);
    let reaped = stats.handoff_reaps.load(Ordering::Relaxed);
    assert!(
        (1..=handed_off).contains(&reaped),
        "the work task reaped the queue for its hand-offs ({reaped} reaps, {handed_off} hand-offs)"
    );
    // Nothing was left for the safety net: two ticks find no queue with
    // completions that waited from one to the next.
    two_watchdog_ticks(&hold);
    assert_eq!(
        rig.hba_stat("watchdog_reaps"),
        0,
        "the hand-off kept the queue served, not the watchdog's safety net"
    );
    drop(hold);
    dev.set_completions(Completions::Inline);
    assert!(dev.errors().is_empty(), "device errors: {:?}", dev.errors());
    rig.finish_clean();
}

#[test]
fn the_watchdog_reaps_a_request_queue_whose_interrupt_never_comes() {
    let rig = memory_rig(1);
    let dev = device(&rig);
    let luns = rig.load_luns();
    let hold = hold_periodics(&rig.bed().machine);
    // The device publishes its completions but never signals the request
    // queue's vector (a lost MSI-X message, every time).
    dev.set_completions(Completions::Async(AsyncCompletions {
        tick: Duration::from_millis(1),
        per_tick: 64,
        in_rearm_window: 0,
        signal: false,
    }));
    // The test is the clock: a watchdog tick between two polls of the
    // load, as many as it takes.
    let mut ticks = 0u64;
    let r = load::run(&luns, &load_config(12, 4), &load::only_good, &mut |_| {
        fire_periodics(&hold);
        ticks += 1;
    });
    eprintln!(
        "completed {} of {} (hung {}) in {ticks} watchdog ticks",
        r.completed, r.issued, r.hung
    );
    r.assert_clean("a request queue without interrupts");
    assert_eq!(r.completed, 12);
    let m = &rig.bed().machine;
    assert_eq!(m.probes.count("rvscsi-cmd-timeout"), 0);
    let reaps = rig.hba_stat("watchdog_reaps");
    assert!(reaps >= 1, "the watchdog's reaps are counted ({reaps})");
    assert!(
        reaps <= ticks,
        "one reap of the one queue per tick at most ({reaps} in {ticks})"
    );
    drop(hold);
    let warned = rig
        .log()
        .iter()
        .filter(|l| l.contains("reaped by the watchdog"))
        .count();
    assert_eq!(warned, 1, "said once, then counted: {:?}", rig.log());
    dev.set_completions(Completions::Inline);
    rig.finish_clean();
}

#[test]
fn without_event_idx_completions_racing_the_rearm_are_served_too() {
    // VIRTQ_AVAIL_F_NO_INTERRUPT instead of used_event (§2.7.7): the
    // device interrupts for whatever it publishes while the flag is clear,
    // so nothing is stranded, and the driver must still see everything.
    let rig = memory_rig_with(1, vec![("virtio-event-idx".into(), 0)]);
    let dev = device(&rig);
    let luns = rig.load_luns();
    let hold = hold_periodics(&rig.bed().machine);
    dev.set_completions(Completions::Async(AsyncCompletions::racing_rearm()));
    let r = load::run(&luns, &load_config(200, 16), &load::only_good, &mut |_| {});
    r.assert_clean("completions racing the re-arm, without EVENT_IDX");
    assert_eq!(r.completed, 200);
    assert!(dev.stats.landed_in_rearm_window.load(Ordering::Relaxed) > 0);
    assert_eq!(rig.bed().machine.probes.count("rvscsi-cmd-timeout"), 0);
    two_watchdog_ticks(&hold);
    assert_eq!(rig.hba_stat("watchdog_reaps"), 0);
    drop(hold);
    dev.set_completions(Completions::Inline);
    assert!(dev.errors().is_empty(), "device errors: {:?}", dev.errors());
    rig.finish_clean();
}

#[test]
fn a_hand_off_reaps_only_the_queue_that_ran_out_of_passes() {
    // Two request queues; every command is started on CPU 1, so only
    // queue 1 (the CPU's own, `queue_for_this_cpu`) has I/O and races its
    // re-arm. The work task must reap queue 1 for its hand-offs, never
    // queue 0.
    let rig = memory_rig(2);
    let dev = device(&rig);
    let luns = rig.load_luns();
    let hold = hold_periodics(&rig.bed().machine);
    rvscsi_emu::ddi::cpu::run_on(1);
    dev.set_completions(Completions::Async(AsyncCompletions::racing_rearm()));
    let r = load::run(&luns, &load_config(300, 16), &load::only_good, &mut |_| {});
    r.assert_clean("one of two queues racing its re-arm");
    assert_eq!(r.completed, 300);
    let stats = driver_stats(&rig);
    let handed_off = rig.hba_stat("rearm_handoffs");
    assert!(handed_off > 0, "queue 1 ran out of passes ({handed_off})");
    assert_eq!(
        stats.handoff_reaped_queues.load(Ordering::Relaxed),
        1 << 1,
        "the work task reaped queue 1 and only queue 1"
    );
    let reaped = stats.handoff_reaps.load(Ordering::Relaxed);
    assert!(
        (1..=handed_off).contains(&reaped),
        "one reap per hand-off at most ({reaped} reaps, {handed_off} hand-offs)"
    );
    two_watchdog_ticks(&hold);
    assert_eq!(rig.hba_stat("watchdog_reaps"), 0);
    drop(hold);
    dev.set_completions(Completions::Inline);
    assert!(dev.errors().is_empty(), "device errors: {:?}", dev.errors());
    rig.finish_clean();
}
