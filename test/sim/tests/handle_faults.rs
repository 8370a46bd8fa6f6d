//! A fault the I/O framework ties to one of the driver's handles (issue
//! 15): the nexus flags it on a register access handle mapped with
//! DDI_FLAGERR_ACC, or a DMA handle allocated with DDI_DMA_FLAGERR, and
//! `ddi_fm_acc_err_get(9F)`/`ddi_fm_dma_err_get` report it. The driver
//! looks once a watchdog tick and clears what it found
//! (`ddi_fm_acc_err_clear(9F)`/`ddi_fm_dma_err_clear`). A first fault is
//! recovered from: the commands in flight fail cleanly (CMD_RESET, each
//! once), the device is reset and I/O goes on; fmdump -e shows the fault
//! with the handle error's ENA, the service degraded and restored. The
//! same fault again soon after takes the controller out of service: new
//! commands get TRAN_FATAL_ERROR, nothing hangs, the service is lost. Both
//! families; detach still gives everything back.

use rvscsi::ffi;
use rvscsi_emu::ddi::fm::{self as efm, Payload};
use rvscsi_emu::ddi::{acc, dma};
use rvscsi_sim::testkit::{
    Driver, Rig, RigConfig, clear_unit_attention, held_read, read_block, wait_for,
};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Handle {
    Access,
    Dma,
}

/// The handles of `which` the nexus ties faults to: every register
/// handle; the DMA handles allocated with DDI_DMA_FLAGERR, which the
/// driver asks for only on memory it looks at (rings, event and TMF
/// buffers; not per-command memory or the framework's data buffers).
fn flagged_handles(m: &rvscsi_emu::Machine, which: Handle) -> Vec<usize> {
    let all: Vec<usize> = match which {
        Handle::Access => acc::register_handles(m)
            .into_iter()
            .map(|h| h as usize)
            .collect(),
        Handle::Dma => dma::handles(m)
            .into_iter()
            .filter(|&h| dma::flags_errors(h))
            .map(|h| h as usize)
            .collect(),
    };
    assert!(!all.is_empty(), "{which:?}: flagged handles exist");
    all
}

fn inject(m: &rvscsi_emu::Machine, which: Handle, status: i32, ena: u64) {
    match which {
        Handle::Access => {
            for h in acc::register_handles(m) {
                efm::inject_acc_fault(h, status, ena);
            }
        }
        Handle::Dma => {
            for h in dma::handles(m) {
                efm::inject_dma_fault(h, status, ena);
            }
        }
    }
}

/// Injects a fault on every handle of `which`, waits for the command
/// `held` (in flight) to end, and checks it ended CMD_RESET, once.
fn fault_ends(rig: &Rig, which: Handle, ena: u64, held: rvscsi_emu::Packet, what: &str) {
    let m = rig.bed().machine.clone();
    inject(&m, which, ffi::DDI_FM_FATAL, ena);
    assert!(
        held.wait(Duration::from_secs(10)),
        "{what}: the command in flight ends within a tick or two: {:?}",
        rig.log()
    );
    std::thread::sleep(Duration::from_millis(20));
    let r = held.result();
    assert_eq!(r.reason, ffi::CMD_RESET, "{what}: {r:?}");
    assert_eq!(held.comp_calls(), 1, "{what}: once");
    held.destroy();
}

fn a_handle_fault_is_recovered_from_once_and_a_second_takes_the_controller_out(
    cfg: RigConfig,
    which: Handle,
) {
    let what = format!("{:?} {which:?}", cfg.family);
    let rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..cfg
    });
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    let detail = Payload::Str(
        match which {
            Handle::Access => "access-handle-fault",
            Handle::Dma => "dma-handle-fault",
        }
        .into(),
    );

    // A first fault, with a command in flight: it ends CMD_RESET, the
    // device is reset, and I/O goes on.
    let first_ena = 0x5a5a_0000_0001;
    fault_ends(
        &rig,
        which,
        first_ena,
        held_read(&rig.bed().machine, &dev, 42),
        &what,
    );
    assert!(
        wait_for(Duration::from_secs(10), || efm::ereports(&m).len() == 3),
        "{what}: {:?}",
        rig.ereport_classes()
    );
    let reports = efm::ereports(&m);
    let classes: Vec<&str> = reports.iter().map(|e| e.class.as_str()).collect();
    assert_eq!(
        classes,
        [
            "ereport.io.device.intern_uncorr",
            "ereport.io.service.degraded",
            "ereport.io.service.restored"
        ],
        "{what}"
    );
    assert_eq!(reports[0].ena, first_ena, "{what}: the handle error's ENA");
    let said = format!(
        "a fault on the device's {} handle",
        match which {
            Handle::Access => "register",
            Handle::Dma => "DMA",
        }
    );
    let said_count = |tail: &str| {
        rig.log()
            .iter()
            .filter(|l| l.contains(&said) && l.contains(tail))
            .count()
    };
    assert_eq!(
        said_count("resetting the device"),
        1,
        "{what}: {:?}",
        rig.log()
    );
    assert_eq!(reports[0].member("detail"), Some(&detail), "{what}");
    assert_eq!(
        efm::service_state(rig.bed().hba),
        efm::ServiceState::Up,
        "{what}"
    );
    // The driver cleared what it took: no handle it flagged holds the
    // fault now.
    for h in flagged_handles(&m, which) {
        assert_eq!(efm::recorded_fault(h), None, "{what}: handle {h:#x}");
    }
    clear_unit_attention(&dev);
    let p = read_block(&dev, 7);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT, "{what}: back in service");
    assert!(p.wait(Duration::from_secs(10)), "{what}");
    assert_eq!(
        (p.result().reason, p.result().status()),
        (ffi::CMD_CMPLT, 0),
        "{what}"
    );
    p.destroy();
    rig.assert_hba_stats(&[("handle_faults", 1), ("device_resets", 1)]);

    // The same fault again within a minute of that recovery (a few
    // seconds on, more than the watchdog's once-a-second look): it
    // persists. The command in flight ends CMD_RESET, and the controller
    // is taken out of service.
    std::thread::sleep(Duration::from_secs(3));
    let second_ena = 0x5a5a_0000_0002;
    fault_ends(
        &rig,
        which,
        second_ena,
        held_read(&rig.bed().machine, &dev, 43),
        &what,
    );
    let p = read_block(&dev, 8);
    assert_eq!(
        p.start_async(),
        ffi::TRAN_FATAL_ERROR,
        "{what}: out of service"
    );
    p.destroy();
    rig.assert_hba_stats(&[("handle_faults", 2), ("device_resets", 2)]);
    let reports = efm::ereports(&m);
    let classes: Vec<&str> = reports[3..].iter().map(|e| e.class.as_str()).collect();
    assert_eq!(
        classes,
        ["ereport.io.device.intern_uncorr", "ereport.io.service.lost"],
        "{what}"
    );
    assert_eq!(reports[3].ena, second_ena, "{what}");
    assert_eq!(
        said_count("again within 60 s of recovering from one"),
        1,
        "{what}: {:?}",
        rig.log()
    );
    assert_eq!(reports[3].member("detail"), Some(&detail), "{what}");
    assert_eq!(
        efm::service_state(rig.bed().hba),
        efm::ServiceState::Down,
        "{what}"
    );
    // Unflagged handles (the framework's data buffers, per-command
    // memory) still hold the injected status: not the driver's to clear.
    inject(&m, which, ffi::DDI_FM_OK, 0);
    rig.finish_clean();
}

#[test]
fn a_register_handle_fault_is_recovered_from_then_a_second_takes_virtio_scsi_out() {
    a_handle_fault_is_recovered_from_once_and_a_second_takes_the_controller_out(
        RigConfig::default(),
        Handle::Access,
    );
}

#[test]
fn a_register_handle_fault_is_recovered_from_then_a_second_takes_pvscsi_out() {
    a_handle_fault_is_recovered_from_once_and_a_second_takes_the_controller_out(
        RigConfig::pvscsi(vec![(8192, 0, 0)]),
        Handle::Access,
    );
}

#[test]
fn a_ring_dma_handle_fault_is_recovered_from_then_a_second_takes_either_family_out() {
    a_handle_fault_is_recovered_from_once_and_a_second_takes_the_controller_out(
        RigConfig::default(),
        Handle::Dma,
    );
    a_handle_fault_is_recovered_from_once_and_a_second_takes_the_controller_out(
        RigConfig::pvscsi(vec![(8192, 0, 0)]),
        Handle::Dma,
    );
}

#[test]
fn a_register_handle_fault_is_found_and_recovered_from_when_polled() {
    // Polled mode's watchdog ticks a hundred times a second; the handles
    // are still looked at once a second, and the fault found.
    a_handle_fault_is_recovered_from_once_and_a_second_takes_the_controller_out(
        RigConfig {
            interrupts: "poll".into(),
            ..RigConfig::default()
        },
        Handle::Access,
    );
}

#[test]
fn without_the_nexus_handle_checks_no_handle_is_flagged_and_no_fault_is_taken() {
    // ddi_fm_init grants only what the parent supports: a handle is
    // flagged (and then looked at) only with its check granted; a fault
    // on an unflagged handle is the nexus's, never the driver's.
    for (caps, acc_flagged, dma_flagged) in [
        (ffi::DDI_FM_EREPORT_CAPABLE, false, false),
        (
            ffi::DDI_FM_EREPORT_CAPABLE | ffi::DDI_FM_ACCCHK_CAPABLE,
            true,
            false,
        ),
        (
            ffi::DDI_FM_EREPORT_CAPABLE | ffi::DDI_FM_DMACHK_CAPABLE,
            false,
            true,
        ),
    ] {
        let rig = Rig::start(RigConfig {
            driver: Driver::Recorder,
            nexus_fm_caps: Some(caps),
            ..RigConfig::default()
        });
        let dev = rig.recorder.devices().remove(0);
        clear_unit_attention(&dev);
        let m = rig.bed().machine.clone();
        let regs = acc::register_handles(&m);
        assert!(!regs.is_empty());
        for h in &regs {
            assert_eq!(acc::flags_errors(*h), acc_flagged, "caps {caps:#x}");
        }
        let rings = dma::handles(&m)
            .into_iter()
            .filter(|&h| dma::flags_errors(h))
            .count();
        assert_eq!(rings > 0, dma_flagged, "caps {caps:#x}: {rings} flagged");
        // Faults on what is not flagged are not the driver's to take.
        match (acc_flagged, dma_flagged) {
            (false, false) => {
                inject(&m, Handle::Access, ffi::DDI_FM_FATAL, 1);
                inject(&m, Handle::Dma, ffi::DDI_FM_FATAL, 1);
            }
            (true, false) => inject(&m, Handle::Dma, ffi::DDI_FM_FATAL, 1),
            _ => inject(&m, Handle::Access, ffi::DDI_FM_FATAL, 1),
        }
        std::thread::sleep(Duration::from_millis(2500));
        let p = read_block(&dev, 9);
        assert_eq!(p.start_async(), ffi::TRAN_ACCEPT, "caps {caps:#x}");
        assert!(p.wait(Duration::from_secs(10)), "caps {caps:#x}");
        assert_eq!(p.result().reason, ffi::CMD_CMPLT, "caps {caps:#x}");
        p.destroy();
        assert_eq!(rig.hba_stat("handle_faults"), 0, "caps {caps:#x}");
        assert!(
            rig.ereport_classes().is_empty(),
            "caps {caps:#x}: {:?}",
            rig.ereport_classes()
        );
        inject(&m, Handle::Access, ffi::DDI_FM_OK, 0);
        inject(&m, Handle::Dma, ffi::DDI_FM_OK, 0);
        rig.finish_clean();
    }
}
