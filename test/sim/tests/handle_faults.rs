//! A fault the I/O framework ties to one of the driver's handles (issue
//! 15): the nexus flags it on a register access handle mapped with
//! DDI_FLAGERR_ACC, or a DMA handle allocated with DDI_DMA_FLAGERR, and
//! `ddi_fm_acc_err_get(9F)`/`ddi_fm_dma_err_get` report it. The driver
//! looks once a watchdog tick; the commands in flight then fail cleanly
//! (CMD_RESET, each once), new ones get TRAN_FATAL_ERROR, nothing hangs,
//! and fmdump -e shows the fault with the handle error's ENA and the
//! service lost. Both families; detach still gives everything back.

use rvscsi::ffi;
use rvscsi_emu::ddi::fm::{self as efm, Payload};
use rvscsi_emu::ddi::{acc, dma};
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig, clear_unit_attention, read_block, wait_for};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Handle {
    Access,
    Dma,
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

fn a_handle_fault_fails_the_commands_cleanly(cfg: RigConfig, which: Handle) {
    let what = format!("{:?} {which:?}", cfg.family);
    let rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..cfg
    });
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    // A command in flight when the fault comes (the device holds it).
    m.faults.arm(Fault::Withhold(Match::Lba(42)));
    let held = read_block(&dev, 42);
    assert_eq!(held.start_async(), ffi::TRAN_ACCEPT);
    assert!(
        wait_for(Duration::from_secs(10), || m.faults.withheld() == 1),
        "{what}: held"
    );
    assert!(rig.ereport_classes().is_empty(), "{what}");
    let ena = 0x5a5a_0000_0001;
    inject(&m, which, ffi::DDI_FM_FATAL, ena);
    assert!(
        held.wait(Duration::from_secs(10)),
        "{what}: the command in flight ends within a tick or two: {:?}",
        rig.log()
    );
    let r = held.result();
    assert_eq!(r.reason, ffi::CMD_RESET, "{what}: {r:?}");
    assert_eq!(held.comp_calls(), 1, "{what}: once");
    held.destroy();
    // New commands are refused at once: the controller is out of service.
    let p = read_block(&dev, 7);
    assert_eq!(p.start_async(), ffi::TRAN_FATAL_ERROR, "{what}");
    p.destroy();
    assert_eq!(rig.hba_stat("handle_faults"), 1, "{what}");
    assert_eq!(rig.hba_stat("device_resets"), 1, "{what}");
    let reports = efm::ereports(&m);
    let classes: Vec<&str> = reports.iter().map(|e| e.class.as_str()).collect();
    assert_eq!(
        classes,
        ["ereport.io.device.intern_uncorr", "ereport.io.service.lost"],
        "{what}"
    );
    assert_eq!(reports[0].ena, ena, "{what}: the handle error's ENA");
    let detail = match which {
        Handle::Access => "access-handle-fault",
        Handle::Dma => "dma-handle-fault",
    };
    assert_eq!(
        reports[0].member("detail"),
        Some(&Payload::Str(detail.into())),
        "{what}"
    );
    assert_eq!(
        efm::service_state(rig.bed().hba),
        efm::ServiceState::Down,
        "{what}"
    );
    // The nexus's fault status goes with the handles (cleared here so that
    // no later handle at the same address inherits it).
    inject(&m, which, ffi::DDI_FM_OK, 0);
    rig.finish_clean();
}

#[test]
fn a_register_handle_fault_fails_the_commands_cleanly_on_virtio_scsi() {
    a_handle_fault_fails_the_commands_cleanly(RigConfig::default(), Handle::Access);
}

#[test]
fn a_register_handle_fault_fails_the_commands_cleanly_on_pvscsi() {
    a_handle_fault_fails_the_commands_cleanly(
        RigConfig::pvscsi(vec![(8192, 0, 0)]),
        Handle::Access,
    );
}

#[test]
fn a_ring_dma_handle_fault_fails_the_commands_cleanly_on_both_families() {
    a_handle_fault_fails_the_commands_cleanly(RigConfig::default(), Handle::Dma);
    a_handle_fault_fails_the_commands_cleanly(RigConfig::pvscsi(vec![(8192, 0, 0)]), Handle::Dma);
}

#[test]
fn a_register_handle_fault_fails_the_commands_cleanly_when_polled() {
    // Polled mode's watchdog ticks a hundred times a second; the handles
    // are still looked at once a second, and the fault found.
    a_handle_fault_fails_the_commands_cleanly(
        RigConfig {
            interrupts: "poll".into(),
            ..RigConfig::default()
        },
        Handle::Access,
    );
}
