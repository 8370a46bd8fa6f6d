//! Detach while a command is out, detach and attach again on the same
//! device, quiesce.

use rvscsi::ffi;
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_sim::load::{self, LoadConfig};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig, read_block};
use std::time::{Duration, Instant};

#[test]
fn detach_waits_for_a_command_out_then_the_hba_attaches_again_and_quiesce_stops_the_device() {
    let mut rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..RigConfig::default()
    });
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    // A command the device finished but the driver has not seen.
    m.faults.arm(Fault::Withhold(Match::Lba(77)));
    let held = read_block(&luns[0].dev, 77);
    assert_eq!(held.start_async(), ffi::TRAN_ACCEPT);
    let t0 = Instant::now();
    while m.faults.withheld() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the device never completed it"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let bed = rig.bed.as_mut().expect("attached");
    let e = bed.detach_nodes().expect_err("detach with a command out");
    assert!(e.0.contains("detach of iport0 failed"), "{e}");
    assert!(
        rig.log()
            .iter()
            .any(|l| l.contains("detach refused: commands in flight"))
    );
    // The completion arrives (with the next one); the command ends once.
    m.faults.release_withheld();
    let tur = luns[0]
        .dev
        .init_pkt(None, rvscsi_emu::InitArgs::default())
        .expect("packet");
    assert_eq!(tur.start_async(), ffi::TRAN_ACCEPT);
    assert!(tur.wait(Duration::from_secs(10)));
    tur.destroy();
    assert!(
        held.wait(Duration::from_secs(10)),
        "the held command completes"
    );
    assert_eq!(
        (held.result().reason, held.result().status()),
        (ffi::CMD_CMPLT, 0)
    );
    assert_eq!(held.comp_calls(), 1);
    held.destroy();
    // Now detach goes through and gives everything back.
    let bed = rig.bed.as_mut().expect("attached");
    let report = bed.detach_nodes().expect("detach once idle");
    assert!(report.is_clean(), "{report:?}");
    // The same device, attached again: a new instance that works.
    bed.reattach().expect("re-attach");
    let luns = rig.load_luns();
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 120,
            seed: 51,
            ..LoadConfig::default()
        },
        &load::only_good,
        &mut |_| {},
    );
    assert!(r.is_clean(), "{:?}", r.problems);
    // quiesce(9E): the device is stopped (status 0, virtio 1.2 §2.1).
    assert_eq!(rig.bed().quiesce(), ffi::DDI_SUCCESS);
    let common = m.faults.layout().common.expect("modern interface");
    assert_eq!(m.qt.readb(common + 0x14).expect("device status"), 0);
    rig.finish_clean();
}
