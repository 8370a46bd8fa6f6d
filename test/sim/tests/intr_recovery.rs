//! Recovery asked for in interrupt context.
//!
//! sd resets from its completion routine (sd.c: sdintr ->
//! sd_pkt_reason_cmd_tran_err / _cmd_timeout / ... -> sd_reset_target:
//! RESET_LUN, then RESET_TARGET, then RESET_ALL), and that routine runs
//! where the HBA calls `scsi_hba_pkt_comp`: its interrupt handler.
//! scsi_abort(9F) and scsi_reset(9F) may be called from interrupt context,
//! so tran_abort(9E) and tran_reset(9E) may be too. The emulation records
//! sleeping there (delay, cv_wait, KM_SLEEP), a mutex without interrupt
//! priority taken there, and more than a millisecond of busy waiting in
//! one interrupt: each fails `finish_clean`.
//!
//! These run on QEMU 7.2 (`test/scripts/install-deps.sh --qemu72`), as the
//! other task-management scenarios do (QEMU 10.0.2 deadlocks on ABORT TASK
//! of a held request).

use rvscsi::ffi;
use rvscsi::scsa::PktStatistics;
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_sim::testkit::{
    Binding, Driver, Qemu, Rig, RigConfig, clear_unit_attention, held_read, read_block,
    reset_firings, test_unit_ready, wait_for,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// virtio-scsi response codes (virtio 1.2 §5.6.6.1).
const VIRTIO_SCSI_S_OK: u8 = 0;
const VIRTIO_SCSI_S_TRANSPORT_FAILURE: u8 = 6;
/// Offset of `response` in the response header.
const RESP_RESPONSE: usize = 11;

fn rig(driver: Driver, blkdebug: bool) -> Rig {
    rig_with(driver, blkdebug, Binding::Library)
}

fn rig_with(driver: Driver, blkdebug: bool, binding: Binding) -> Rig {
    Rig::start(RigConfig {
        images: vec![(4096, 0, 0)],
        blkdebug: if blkdebug {
            vec![Some("blkdebug::".into())]
        } else {
            Vec::new()
        },
        driver,
        binding,
        qemu: Qemu::V72,
        ..RigConfig::default()
    })
}

fn hmp(rig: &Rig, cmd: &str) {
    rig.bed()
        .machine
        .with_qemu(|q| q.hmp(cmd))
        .expect("QEMU")
        .expect("HMP");
}

/// Resumes the request blkdebug holds once the driver has sent a TMF
/// (the fault layer's count of control-queue doorbells grew past what it
/// is now), from another thread; bounded: after 60 s it resumes anyway
/// (and the test's assertions then say what did not happen).
fn release_after_tmf(rig: &Rig) -> std::thread::JoinHandle<()> {
    let m = rig.bed().machine.clone();
    let before = m.faults.stats().control_notifies;
    std::thread::spawn(move || {
        wait_for(Duration::from_secs(60), || {
            m.faults.stats().control_notifies > before
        });
        m.with_qemu(|q| q.hmp("qemu-io d0 \"resume T1\""))
            .expect("QEMU")
            .expect("HMP resume");
    })
}

#[test]
fn with_reset_lun_a_transport_error_makes_sd_reset_the_lun_from_its_interrupt() {
    transport_error_then_reset(Binding::Library, true);
}

#[test]
fn through_the_c_shim_a_transport_error_makes_sd_reset_the_target_from_its_interrupt() {
    // sd's default (no "reset-lun" in sd.conf): RESET_TARGET first.
    transport_error_then_reset(Binding::Shim, false);
}

fn transport_error_then_reset(binding: Binding, reset_lun: bool) {
    let rig = rig_with(Driver::Sd, false, binding);
    let disk = rig.disk0();
    let image = &rig.images[0];
    disk.recovery
        .lun_reset_enabled
        .store(reset_lun, Ordering::Relaxed);
    let level = if reset_lun {
        ffi::RESET_LUN
    } else {
        ffi::RESET_TARGET
    };
    // The device reports a transport failure for the read of block 100.
    rig.bed().machine.faults.arm(Fault::Response(
        Match::Lba(100),
        vec![(RESP_RESPONSE, vec![VIRTIO_SCSI_S_TRANSPORT_FAILURE])],
    ));
    let data = disk.read(100, 4096).expect("the read succeeds on retry");
    assert_eq!(data, image.expected(100, 8));
    let rec = &disk.recovery;
    assert!(disk.retries.load(Ordering::Relaxed) >= 1, "sd retried");
    assert_eq!(
        rec.interrupt_resets.load(Ordering::Relaxed),
        1,
        "sd_reset_target ran in the completion routine, in interrupt context"
    );
    assert_eq!(rec.resets_at(level), (1, 1), "the first reset accepted");
    for other in [ffi::RESET_LUN, ffi::RESET_TARGET, ffi::RESET_ALL] {
        if other != level {
            assert_eq!(rec.resets_at(other), (0, 0), "level {other}");
        }
    }
    // The reset is done later, by the work task, and works.
    assert!(
        wait_for(Duration::from_secs(10), || reset_firings(&rig)
            .contains(&vec![level as u64, 0, 0, 1])),
        "{:?}",
        reset_firings(&rig)
    );
    // I/O goes on.
    let more = disk.read(200, 8192).expect("later I/O");
    assert_eq!(more, image.expected(200, 16));
    disk.write(300, &image.expected(300, 4)).expect("a write");
    rig.finish_clean();
}

#[test]
fn a_timeout_makes_sd_reset_the_lun_from_its_interrupt_and_io_goes_on() {
    let rig = rig(Driver::Sd, true);
    let disk = rig.disk0();
    let image = &rig.images[0];
    // sd.conf "reset-lun" true.
    disk.recovery
        .lun_reset_enabled
        .store(true, Ordering::Relaxed);
    hmp(&rig, "qemu-io d0 \"break read_aio T1\"");
    // The held read is aborted by the timeout ladder; the device then says
    // it completed (a command that finished as the abort reached it), so
    // the packet carries CMD_TIMEOUT + STAT_TIMEOUT and no reset or abort
    // statistic: sd_reset_target resets.
    rig.bed().machine.faults.arm(Fault::Response(
        Match::Lba(10),
        vec![(RESP_RESPONSE, vec![VIRTIO_SCSI_S_OK])],
    ));
    disk.set_io_time(1);
    let reader = {
        let disk = disk.clone();
        std::thread::spawn(move || disk.read(10, 512))
    };
    // Resumed once the timeout ladder's ABORT TASK is out.
    let releaser = release_after_tmf(&rig);
    let data = reader.join().unwrap().expect("the read succeeds on retry");
    releaser.join().unwrap();
    assert_eq!(data, image.expected(10, 1));
    let rec = &disk.recovery;
    assert_eq!(
        rec.interrupt_resets.load(Ordering::Relaxed),
        1,
        "sd_reset_target ran in the completion routine, in interrupt context"
    );
    assert_eq!(rec.resets_at(ffi::RESET_LUN), (1, 1));
    assert_eq!(rec.resets_at(ffi::RESET_ALL), (0, 0));
    let probes = &rig.bed().machine.probes;
    assert_eq!(probes.count("rvscsi-cmd-timeout"), 1);
    assert!(
        wait_for(Duration::from_secs(10), || reset_firings(&rig)
            .contains(&vec![ffi::RESET_LUN as u64, 0, 0, 1])),
        "{:?}",
        reset_firings(&rig)
    );
    disk.set_io_time(rvscsi_sim::sd::IO_TIME);
    let more = disk.read(20, 4096).expect("later I/O");
    assert_eq!(more, image.expected(20, 8));
    rig.finish_clean();
}

#[test]
fn reset_all_from_sds_interrupt_resets_the_device_on_the_task_queue() {
    let rig = rig(Driver::Sd, false);
    let disk = rig.disk0();
    let image = &rig.images[0];
    // "allow-bus-device-reset" 0: sd_reset_target goes straight to
    // RESET_ALL.
    disk.recovery
        .allow_bus_device_reset
        .store(false, Ordering::Relaxed);
    let m = rig.bed().machine.clone();
    // A command outstanding through the reset: the device completes it,
    // the driver never sees it, so only the reset ends it.
    let held = held_read(&m, &disk.dev, 50);
    m.faults.arm(Fault::Response(
        Match::Lba(100),
        vec![(RESP_RESPONSE, vec![VIRTIO_SCSI_S_TRANSPORT_FAILURE])],
    ));
    let data = disk.read(100, 512).expect("the read succeeds on retry");
    assert_eq!(data, image.expected(100, 1));
    let rec = &disk.recovery;
    assert_eq!(rec.interrupt_resets.load(Ordering::Relaxed), 1);
    assert_eq!(rec.resets_at(ffi::RESET_ALL), (1, 1), "RESET_ALL accepted");
    assert_eq!(rec.resets_at(ffi::RESET_LUN), (0, 0));
    // The outstanding command ends with the device reset, later, through
    // scsi_hba_pkt_comp: CMD_RESET + STAT_BUS_RESET.
    assert!(held.wait(Duration::from_secs(20)), "the reset ended it");
    let r = held.result();
    assert_eq!(
        (r.reason, r.statistics),
        (ffi::CMD_RESET, PktStatistics::BUS_RESET),
        "{r:?}"
    );
    assert_eq!(held.comp_calls(), 1);
    held.destroy();
    assert!(
        reset_firings(&rig).contains(&vec![ffi::RESET_ALL as u64, 0, 0, 1]),
        "{:?}",
        reset_firings(&rig)
    );
    assert_eq!(
        reset_firings(&rig)
            .iter()
            .filter(|f| f[0] == ffi::RESET_ALL as u64)
            .count(),
        1,
        "one device reset"
    );
    let more = disk.read(200, 4096).expect("later I/O");
    assert_eq!(more, image.expected(200, 8));
    rig.finish_clean();
}

#[test]
fn scsi_abort_from_a_completion_callback_aborts_the_held_command_later() {
    let rig = rig(Driver::Recorder, true);
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    hmp(&rig, "qemu-io d0 \"break read_aio T1\"");
    let held = Arc::new(read_block(&dev, 30));
    let pkt = held.pkt() as u64;
    assert_eq!(held.start_async(), ffi::TRAN_ACCEPT);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!held.is_done(), "held by blkdebug");
    // A TEST UNIT READY whose completion callback (interrupt context)
    // aborts the held command, as scsi_abort(9F) allows there.
    let tur = test_unit_ready(&dev);
    let rc = Arc::new(AtomicI32::new(-1));
    let in_interrupt = Arc::new(AtomicI32::new(-1));
    {
        let (held, rc, in_interrupt) = (held.clone(), rc.clone(), in_interrupt.clone());
        tur.set_callback(Some(Arc::new(move |p: &rvscsi_emu::Packet| {
            in_interrupt.store(
                rvscsi_emu::ddi::cpu::servicing_interrupt(),
                Ordering::Relaxed,
            );
            rc.store(p.device().abort(Some(&held)), Ordering::Relaxed);
        })));
    }
    // Resumed once the work task sent the abort.
    let releaser = release_after_tmf(&rig);
    assert_eq!(tur.transport(), ffi::TRAN_ACCEPT);
    assert!(tur.wait(Duration::from_secs(20)));
    tur.set_callback(None);
    tur.destroy();
    assert_eq!(in_interrupt.load(Ordering::Relaxed), 1, "interrupt context");
    assert_eq!(rc.load(Ordering::Relaxed), 1, "tran_abort accepted");
    assert!(held.wait(Duration::from_secs(20)));
    releaser.join().unwrap();
    let r = held.result();
    assert_eq!(
        (r.reason, r.statistics),
        (ffi::CMD_ABORTED, PktStatistics::ABORTED),
        "{r:?}"
    );
    assert_eq!(held.comp_calls(), 1);
    let probes = &rig.bed().machine.probes;
    assert!(
        wait_for(Duration::from_secs(10), || probes
            .firings("rvscsi-cmd-abort")
            .iter()
            .any(|f| f.args == [pkt, 0, 0, 1])),
        "{:?}",
        probes.firings("rvscsi-cmd-abort")
    );
    Arc::try_unwrap(held)
        .unwrap_or_else(|_| panic!("the callback's reference is gone"))
        .destroy();
    rig.finish_clean();
}
