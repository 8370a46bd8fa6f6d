//! Discovery: targets found through the iport's target map, kept current
//! by the event queue (hot-plug, hot-unplug, LUN changes, parameter
//! changes).

use rvscsi_qtest::json;
use rvscsi_sim::testkit::{self, Image, Rig, RigConfig};
use std::time::Duration;

/// How long discovery may take to notice a change.
const NOTICE: Duration = Duration::from_secs(20);

fn wait_until(what: &str, done: impl FnMut() -> bool) {
    testkit::wait_until(what, NOTICE, done);
}

fn names(rig: &Rig) -> Vec<String> {
    rig.sd.disks().iter().map(|d| d.name()).collect()
}

#[test]
fn the_last_target_id_is_discovered_too() {
    let rig = Rig::start(RigConfig {
        images: vec![(2048, 0, 0), (2048, 255, 0)],
        ..RigConfig::default()
    });
    assert_eq!(names(&rig), ["c0t0d0", "c0t255d0"]);
    rig.finish_clean();
}

#[test]
fn a_hot_plugged_target_and_lun_appear_without_reattach() {
    let rig = Rig::start(RigConfig::default());
    assert_eq!(names(&rig), ["c0t0d0"]);
    let img = Image::patterned(&rig.dir.path("new.img"), 77, 4096);
    rig.hot_plug("hd3", &img.path, 3, 0);
    wait_until("target 3", || names(&rig).contains(&"c0t3d0".to_string()));
    let d = rig.sd.disk(3, 0).unwrap();
    assert!(
        d.read(10, 1024).unwrap() == img.expected(10, 2),
        "the new disk reads its image"
    );
    // A second LUN behind an existing target: the LUN rescan finds it.
    let img2 = Image::patterned(&rig.dir.path("lun1.img"), 78, 2048);
    rig.hot_plug("hd4", &img2.path, 0, 1);
    wait_until("LUN 0,1", || names(&rig).contains(&"c0t0d1".to_string()));
    assert!(rig.sd.disk(0, 1).unwrap().read(0, 512).unwrap() == img2.expected(0, 1));
    assert!(
        rig.bed()
            .machine
            .log()
            .iter()
            .any(|l| l.text.contains("appeared")),
        "the event is logged"
    );
    rig.finish_clean();
}

#[test]
fn a_removed_target_goes_away_and_the_others_keep_working() {
    let rig = Rig::start(RigConfig {
        images: vec![(2048, 0, 0), (2048, 1, 0)],
        ..RigConfig::default()
    });
    let gone = rig.sd.disk(1, 0).unwrap();
    rig.qmp("device_del", json!({"id": "hd1"}));
    rig.bed()
        .machine
        .with_qemu(|q| q.wait_qmp_event("DEVICE_DELETED", Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    wait_until("target 1 removed", || names(&rig) == ["c0t0d0"]);
    assert!(gone.is_gone());
    // The other target is unaffected.
    let d0 = rig.sd.disk(0, 0).unwrap();
    assert!(d0.read(5, 512).unwrap() == rig.images[0].expected(5, 1));
    rig.finish_clean();
}

#[test]
fn a_capacity_change_reaches_the_target_driver_as_a_unit_attention() {
    let rig = Rig::start(RigConfig::default());
    let d = rig.disk0();
    rig.qmp(
        "block_resize",
        json!({"node-name": rig.bed().machine.with_qemu(|q| {
        let blk = q.qmp("query-block", json!({})).unwrap();
        blk[0]["inserted"]["node-name"].as_str().unwrap().to_string()
    }).unwrap(), "size": 16 << 20}),
    );
    wait_until("the parameter-change event", || {
        rig.log()
            .iter()
            .any(|l| l.contains("parameters changed (asc 0x2a ascq 0x9)"))
    });
    // The next command gets CAPACITY DATA HAS CHANGED (the driver does not
    // swallow it), then READ CAPACITY sees the new size.
    let o =
        rvscsi_sim::sd::Disk::command_once(&d.dev, &rvscsi_sim::scsi::test_unit_ready(), None, 10)
            .unwrap();
    let sense = o.result.sense_key();
    assert_eq!(sense, Some((6, 0x2a, 0x09)), "unit attention 2A/09");
    let data = std::sync::Arc::new(rvscsi_emu::DataBuf::new(8, 0, true));
    let o = rvscsi_sim::sd::Disk::command_once(
        &d.dev,
        &rvscsi_sim::scsi::read_capacity_10(),
        Some(data.clone()),
        10,
    )
    .unwrap();
    assert_eq!(o.result.status(), 0);
    let last = u32::from_be_bytes(data.bytes()[0..4].try_into().unwrap());
    assert_eq!(u64::from(last) + 1, (16u64 << 20) / 512);
    rig.finish_clean();
}

#[test]
fn detaching_the_iport_stops_a_discovery_under_way_instead_of_refusing() {
    use rvscsi_emu::faults::{Fault, Match};
    let mut rig = Rig::start(RigConfig::default());
    let m = rig.bed().machine.clone();
    // The first discovery probe (INQUIRY with allocation length 0) after
    // the hot-plug is held back: the discovery is under way, waiting.
    m.faults
        .arm(Fault::Withhold(Match::CdbPrefix(vec![0x12, 0, 0, 0, 0, 0])));
    let img = Image::patterned(&rig.dir.path("new.img"), 79, 2048);
    rig.hot_plug("hd5", &img.path, 5, 0);
    wait_until("a discovery probe held", || m.faults.withheld() == 1);
    // The probe completes while detach waits for the discovery.
    let releaser = std::thread::spawn({
        let m = m.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            m.faults.release_withheld();
        }
    });
    let report = rig
        .bed
        .as_mut()
        .expect("attached")
        .detach_nodes()
        .expect("the iport detaches: the discovery stops, nothing refuses");
    releaser.join().expect("releaser");
    assert!(report.is_clean(), "{report:?}");
    assert!(
        !rig.log().iter().any(|l| l.contains("detach refused")),
        "{:?}",
        rig.log()
    );
    // Attached again: the discovery at attach finds the new target.
    rig.bed
        .as_mut()
        .expect("attached")
        .reattach()
        .expect("re-attach");
    wait_until("target 5", || rig.bed().device(5, 0).is_some());
    rig.finish_clean();
}
