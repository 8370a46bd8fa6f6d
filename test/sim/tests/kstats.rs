//! What an administrator looks at (issue 15): the driver's kstats exist
//! from attach to detach and count what the driver did, read as kstat(8)
//! reads them (through `ks_update`); fault management is set up at attach
//! and nothing is reported on a healthy device. Both families.

use rvscsi_emu::ddi::kstat;
use rvscsi_sim::load::{self, LoadConfig};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig};

fn exercise(rig: Rig, family: &str) {
    let m = rig.bed().machine.clone();
    let inst = rig.instance();
    let nq = rig.hba_stat("queues") as usize;
    assert!(nq >= 1, "{family}: request queues");
    let names: Vec<String> = kstat::list(&m)
        .into_iter()
        .filter(|(md, i, _)| md == "rvscsi" && *i == inst)
        .map(|(_, _, n)| n)
        .collect();
    let mut want: Vec<String> = vec!["fm".into(), "hba".into()];
    want.extend((0..nq).map(|q| format!("queue{q}")));
    want.sort();
    assert_eq!(names, want, "{family}: the kstats of the instance");
    let hba = rig.kstat("hba");
    assert_eq!(hba.class, "controller");
    assert_ne!(hba.u64("intr_type"), Some(0), "{family}: interrupts in use");
    assert!(hba.u64("intr_vectors").unwrap_or(0) >= 1, "{family}");

    let started0 = rig.hba_stat("commands_started");
    let luns = rig.load_luns();
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 200,
            depth: 8,
            seed: 5,
            ..LoadConfig::default()
        },
        &|c| {
            if c.good() {
                Ok(())
            } else {
                Err("not good".into())
            }
        },
        &mut |_| {},
    );
    r.assert_clean(family);
    let hba = rig.kstat("hba");
    let started = hba.u64("commands_started").unwrap_or(0) - started0;
    assert!(started >= 200, "{family}: {started} started");
    assert_eq!(
        hba.u64("commands_started"),
        hba.u64("commands_completed"),
        "{family}: every command started completed"
    );
    let sum = |stat: &str| (0..nq).map(|q| rig.queue_stat(q, stat)).sum::<u64>();
    assert_eq!(
        sum("commands"),
        hba.u64("commands_started").unwrap_or(0),
        "{family}: the queues' commands add up to the HBA's"
    );
    assert_eq!(
        sum("completions"),
        sum("commands"),
        "{family}: every command on a ring came back from it"
    );
    assert!(sum("doorbells") >= 1 && sum("doorbells") <= sum("commands"));
    assert!(sum("interrupts") >= 1, "{family}: interrupts counted");
    let batch = (0..nq)
        .map(|q| rig.queue_stat(q, "batch_max"))
        .max()
        .unwrap_or(0);
    assert!((1..=8).contains(&batch), "{family}: largest batch {batch}");
    for stat in [
        "timeouts",
        "device_resets",
        "cmpl_unknown",
        "cmpl_duplicate",
        "cmpl_impossible",
        "ring_runaway",
        "tran_badpkt",
        "watchdog_reaps",
    ] {
        assert_eq!(hba.u64(stat), Some(0), "{family}: {stat}");
    }
    assert!(
        rig.ereport_classes().is_empty(),
        "{family}: a healthy device reports nothing: {:?}",
        rig.ereport_classes()
    );
    let p = kstat::kstat_p(&m, "rvscsi", Some(inst));
    assert!(
        p.contains(&format!("rvscsi:{inst}:hba:commands_started\t")),
        "{p}"
    );
    assert!(
        p.contains(&format!("rvscsi:{inst}:queue0:doorbells\t")),
        "{p}"
    );
    rig.finish_clean();
    assert!(
        kstat::list(&m).iter().all(|(md, _, _)| md != "rvscsi"),
        "{family}: every kstat is gone after detach: {:?}",
        kstat::list(&m)
    );
}

#[test]
fn virtio_scsi_kstats_live_from_attach_to_detach_and_count_the_io() {
    exercise(
        Rig::start(RigConfig {
            images: vec![(8192, 0, 0), (8192, 1, 0)],
            driver: Driver::Recorder,
            num_queues: Some(2),
            ..RigConfig::default()
        }),
        "virtio-scsi",
    );
}

#[test]
fn pvscsi_kstats_live_from_attach_to_detach_and_count_the_io() {
    exercise(
        Rig::start(RigConfig {
            driver: Driver::Recorder,
            ..RigConfig::pvscsi(vec![(8192, 0, 0), (8192, 1, 0)])
        }),
        "pvscsi",
    );
}
