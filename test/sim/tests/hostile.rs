//! A hostile device: the test bed rewrites what QEMU's device returns
//! (completions duplicated or naming descriptors that were never made
//! available, impossible lengths, lying response headers, refused task
//! management, garbage events, impossible configurations). The driver must
//! never corrupt memory, complete a packet twice or never, overrun a status
//! area, or pass bad data as good; the rest keeps working.

use rvscsi::ffi;
use rvscsi::scsa::PktStatistics;
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_sim::load::{self, Completion, LoadConfig};
use rvscsi_sim::testkit::{Driver, Image, Rig, RigConfig, read_block, wait_for};
use std::time::Duration;

fn rig(images: Vec<(u64, u8, u16)>) -> Rig {
    Rig::start(RigConfig {
        images,
        driver: Driver::Recorder,
        ..RigConfig::default()
    })
}

/// Bytes to write into a response header, by offset.
type Patch = Vec<(usize, Vec<u8>)>;

fn logged(rig: &Rig, needle: &str) -> bool {
    rig.log().iter().any(|l| l.contains(needle))
}

#[test]
fn duplicated_and_made_up_completions_are_dropped_and_every_command_completes_once() {
    let rig = rig(vec![(8192, 0, 0), (8192, 1, 0)]);
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    let mut armed = 0;
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 600,
            depth: 24,
            seed: 41,
            ..LoadConfig::default()
        },
        &|c: &Completion| {
            if c.good() {
                Ok(())
            } else {
                Err("not good".into())
            }
        },
        &mut |p| {
            if p.completed >= 40 * (armed + 1) && armed < 12 {
                armed += 1;
                m.faults.arm(match armed % 4 {
                    0 => Fault::Duplicate(Match::Any),
                    1 => Fault::BogusUsedId(300),
                    2 => Fault::BogusUsedId(0xffff),
                    // In range but never a head: the split ring reuses
                    // freed descriptors first (LIFO), and 24 commands of
                    // a few descriptors each never reach the last one.
                    _ => Fault::BogusUsedId(255),
                });
            }
        },
    );
    r.assert_clean("duplicates and bogus ids");
    let st = m.faults.stats();
    // Each armed fault fires on the next request-queue completion.
    assert_eq!((st.duplicated, st.bogus_ids), (3, 9), "{st:?}");
    assert!(
        logged(&rig, "unknown command id"),
        "the driver says what it dropped"
    );
    // kstat(8) counts each kind apart: an id past the ring's 256
    // descriptors is impossible; a duplicate names the head of a chain
    // already returned; descriptor 255 never headed a chain: unknown.
    assert_eq!(rig.hba_stat("cmpl_impossible"), 6, "{st:?}");
    assert_eq!(rig.hba_stat("cmpl_duplicate"), st.duplicated, "{st:?}");
    assert_eq!(rig.hba_stat("cmpl_unknown"), 3, "{st:?}");
    assert_eq!(rig.hba_stat("ring_runaway"), 0);
    // Dropped and counted, and reported at most once a second; not a
    // fault that impairs the service.
    rig.assert_bad_completion_reports(st.duplicated + st.bogus_ids);
    rig.finish_clean();
}

#[test]
fn lying_response_headers_never_overrun_a_status_area_or_pass_as_good_data() {
    let rig = rig(vec![(8192, 0, 0), (8192, 0, 1)]);
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    // Each completion of a command at these LBAs lies in its own way.
    let lies: Vec<(u64, Patch)> = vec![
        // CHECK CONDITION with a sense length of 4 GiB.
        (100, vec![(0, vec![0xff; 4]), (10, vec![2]), (11, vec![0])]),
        // A residual larger than the transfer.
        (200, vec![(4, vec![0xff, 0xff, 0xff, 0x7f])]),
        // A response code virtio-scsi does not define.
        (300, vec![(11, vec![0x77])]),
        // BUSY status (the target driver retries).
        (400, vec![(10, vec![8])]),
    ];
    let accept = |c: &Completion| -> Result<(), String> {
        let r = &c.result;
        let want_len = c.blocks as isize * 512;
        // Whatever the device says: the residual stays within the transfer
        // and the sense within the status area.
        c.within_bounds()?;
        if c.good() {
            return Ok(());
        }
        // A lie (the faults match on the starting LBA, on either LUN).
        let lied = match c.lba {
            100 => r.status() == ffi::STATUS_CHECK,
            200 => r.resid == want_len,
            300 => r.reason == ffi::CMD_TRAN_ERR,
            400 => r.status() == ffi::STATUS_BUSY,
            _ => false,
        };
        if lied {
            Ok(())
        } else {
            Err("a truthful completion went wrong".into())
        }
    };
    for (lba, patch) in &lies {
        for _ in 0..4 {
            m.faults
                .arm(Fault::Response(Match::Lba(*lba), patch.clone()));
        }
    }
    m.faults.arm(Fault::UsedLen(Match::Any, u32::MAX));
    m.faults.arm(Fault::UsedLen(Match::Any, 0));
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 600,
            depth: 24,
            seed: 43,
            hot: vec![100, 200, 300, 400],
            hot_percent: 20,
            ..LoadConfig::default()
        },
        &accept,
        &mut |_| {},
    );
    r.assert_clean("lying responses");
    // The status areas' guard bytes are intact: the packets' teardown
    // checks them (no violation).
    let st = m.faults.stats();
    assert!(st.responses >= 8 && st.lengths == 2, "{st:?}");
    for lba in [100u64, 200, 300, 400] {
        assert!(
            r.completions.iter().any(|c| c.lba == lba && !c.good()),
            "the lie at {lba} was told"
        );
    }
    rig.finish_clean();
}

#[test]
fn task_management_refused_at_every_step_ends_in_a_device_reset() {
    let rig = rig(vec![(8192, 0, 0)]);
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    m.faults.arm(Fault::Withhold(Match::Lba(777)));
    // virtio 1.2 §5.6.6.2: VIRTIO_SCSI_S_FUNCTION_REJECTED is 11.
    m.faults.arm(Fault::TmfResponse {
        response: 11,
        count: 3,
    });
    let mut pkt = read_block(&luns[0].dev, 777);
    pkt.set_time(1);
    assert_eq!(pkt.start_async(), ffi::TRAN_ACCEPT);
    assert!(pkt.wait(Duration::from_secs(60)), "the lost command ends");
    let r = pkt.result();
    assert_eq!(r.reason, ffi::CMD_TIMEOUT, "{r:?}");
    assert!(
        r.statistics
            .contains(PktStatistics::TIMEOUT | PktStatistics::BUS_RESET),
        "{r:?}"
    );
    assert_eq!(pkt.comp_calls(), 1);
    pkt.destroy();
    let probes = &m.probes;
    let abort: Vec<Vec<u64>> = probes
        .firings("rvscsi-cmd-abort")
        .iter()
        .map(|f| f.args.clone())
        .collect();
    assert!(
        abort.iter().all(|a| a[3] == 0),
        "the abort was refused: {abort:?}"
    );
    let resets: Vec<(u64, u64)> = probes
        .firings("rvscsi-reset")
        .iter()
        .map(|f| (f.args[0], f.args[3]))
        .collect();
    assert!(resets.contains(&(ffi::RESET_LUN as u64, 0)), "{resets:?}");
    assert!(
        resets.contains(&(ffi::RESET_TARGET as u64, 0)),
        "{resets:?}"
    );
    assert!(resets.contains(&(ffi::RESET_ALL as u64, 1)), "{resets:?}");
    assert_eq!(m.faults.stats().tmfs, 3);
    assert!(
        logged(&rig, "failed: response 11"),
        "the refusals are logged"
    );
    // kstat(8): each refused step once, then the device reset that worked;
    // fmdump -e: the device stopped answering, degraded, restored.
    rig.assert_hba_stats(&[
        ("timeouts", 1),
        ("aborts_failed", 1),
        ("lun_resets_failed", 1),
        ("target_resets_failed", 1),
        ("aborts_done", 0),
        ("device_resets", 1),
        ("device_resets_failed", 0),
        ("no_response", 1),
    ]);
    assert_eq!(
        rig.ereport_classes(),
        [
            "ereport.io.device.no_response",
            "ereport.io.service.degraded",
            "ereport.io.service.restored",
        ]
    );
    // The device works again.
    io_goes_on_after_a_reset(&luns, 60, 44, "after the refused ladder");
    rig.finish_clean();
}

#[test]
fn garbage_events_are_reported_and_ignored_and_later_events_still_work() {
    let rig = Rig::start(RigConfig::default());
    let m = rig.bed().machine.clone();
    m.faults.arm(Fault::GarbageEvent);
    let add = |id: u32| {
        let img = rvscsi_sim::testkit::Image::patterned(
            &rig.dir.path(&format!("g{id}.img")),
            u64::from(id),
            256,
        );
        rig.hot_plug(&format!("g{id}"), &img.path, id, 0);
    };
    // The event of target 3 arrives as garbage.
    add(3);
    let t0 = std::time::Instant::now();
    while m.faults.stats().events == 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(m.faults.stats().events, 1);
    // The next one is real, and its rescan finds both.
    add(4);
    let t0 = std::time::Instant::now();
    while (rig.sd.disk(3, 0).is_none() || rig.sd.disk(4, 0).is_none())
        && t0.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rig.sd.disk(4, 0).is_some() && rig.sd.disk(3, 0).is_some());
    assert!(logged(&rig, "ignoring event"), "{:#?}", rig.log());
    rig.finish_clean();
}

/// Device configuration field at `offset` reads as `value`.
fn config(offset: u64, value: u32) -> Fault {
    Fault::Config { offset, value }
}

#[test]
fn impossible_device_configurations_fail_attach_cleanly_or_are_bounded() {
    // virtio 1.2 §5.6.4: num_queues 0, seg_max 4, max_sectors 8,
    // sense_size 20, cdb_size 24.
    let cases: Vec<(&str, Vec<Fault>)> = vec![
        ("no request queue", vec![config(0, 0)]),
        ("2^32-1 request queues", vec![config(0, u32::MAX)]),
        ("no segment", vec![config(4, 0)]),
        ("2^32-1 segments", vec![config(4, u32::MAX)]),
        ("no sector per transfer", vec![config(8, 0)]),
        ("no sense", vec![config(20, 0)]),
        ("4 GiB of sense", vec![config(20, u32::MAX)]),
        ("no CDB", vec![config(24, 0)]),
        ("a 4 GiB CDB", vec![config(24, u32::MAX)]),
        ("queues of 0", vec![Fault::QueueSize(0)]),
        ("queues of 3", vec![Fault::QueueSize(3)]),
        ("queues of 32768", vec![Fault::QueueSize(0x8000)]),
    ];
    let mut outcomes = Vec::new();
    for (what, faults) in cases {
        match Rig::try_attach(RigConfig {
            faults,
            ..RigConfig::default()
        }) {
            Ok(rig) => {
                let Some(disk) = rig.sd.disks().into_iter().next() else {
                    // The driver took the values as given and the device
                    // cannot work with them: no disk, but nothing broken.
                    rig.finish_clean();
                    outcomes.push(format!("{what}: attached, no usable disk"));
                    continue;
                };
                let data = rvscsi_sim::testkit::random_bytes(5, 8192);
                disk.write(16, &data)
                    .unwrap_or_else(|e| panic!("{what}: write: {e}"));
                assert_eq!(disk.read(16, 8192).expect("read"), data, "{what}");
                rig.finish_clean();
                outcomes.push(format!("{what}: attached, I/O works"));
            }
            Err(f) => {
                assert!(
                    f.report.is_clean(),
                    "{what}: a failed attach left {:?} (pages {}), violations {:?}",
                    f.report.leaks,
                    f.report.pages_leaked,
                    f.report.violations
                );
                assert!(
                    f.message.contains("attach of the HBA failed"),
                    "{what}: {}",
                    f.message
                );
                outcomes.push(format!("{what}: refused"));
            }
        }
    }
    eprintln!("{outcomes:#?}");
    for must_refuse in ["no request queue", "no CDB", "queues of 0", "queues of 3"] {
        assert!(
            outcomes.contains(&format!("{must_refuse}: refused")),
            "{must_refuse}: {outcomes:#?}"
        );
    }
}

#[test]
fn device_needs_reset_at_run_time_is_reported_and_the_device_is_reset() {
    let rig = rig(vec![(8192, 0, 0)]);
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    // The device fails while running: its status reads
    // DEVICE_NEEDS_RESET. The driver looks at the status on a
    // configuration interrupt; under MSI-X, vector 0 serves configuration
    // changes and events, so a hot-plug event brings it there.
    m.faults.arm(Fault::NeedsReset);
    let img = Image::blank(&rig.dir.path("plug.img"), 2048);
    rig.hot_plug("hd9", &img.path, 9, 0);
    assert!(
        wait_for(Duration::from_secs(20), || rig.hba_stat("device_resets")
            == 1
            && rig.ereports_of("ereport.io.service.restored") == 1),
        "reset and back: {:?} {:?}",
        rig.ereport_classes(),
        rig.log()
    );
    assert_eq!(rig.hba_stat("device_needs_reset"), 1);
    assert_eq!(rig.hba_stat("device_resets_failed"), 0);
    assert_eq!(
        rig.ereport_classes(),
        [
            "ereport.io.device.inval_state",
            "ereport.io.service.degraded",
            "ereport.io.service.restored",
        ]
    );
    let e = &rvscsi_emu::ddi::fm::ereports(&m)[0];
    assert_eq!(
        e.member("detail"),
        Some(&rvscsi_emu::ddi::fm::Payload::Str(
            "device-needs-reset".into()
        ))
    );
    // I/O goes on after the reset.
    io_goes_on_after_a_reset(&luns, 40, 45, "after DEVICE_NEEDS_RESET");
    rig.finish_clean();
}

#[test]
fn a_runaway_used_index_resets_the_device_and_is_reported() {
    let rig = rig(vec![(8192, 0, 0)]);
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    // With the completion of the read at 555, the used index the driver
    // sees jumps 1000 entries ahead: more than the ring (256), which no
    // device writes legitimately. Nothing is consumed; the device is reset.
    m.faults.arm(Fault::UsedIdxRunaway(Match::Lba(555), 1000));
    let pkt = read_block(&luns[0].dev, 555);
    assert_eq!(pkt.start_async(), ffi::TRAN_ACCEPT);
    assert!(pkt.wait(Duration::from_secs(30)), "the read ends");
    let r = pkt.result();
    assert_eq!(pkt.comp_calls(), 1, "once");
    assert!(
        r.reason == ffi::CMD_RESET && r.statistics.contains(PktStatistics::BUS_RESET),
        "ended by the reset: {r:?}"
    );
    pkt.destroy();
    assert_eq!(m.faults.stats().runaways, 1);
    assert!(
        wait_for(Duration::from_secs(10), || rig
            .ereports_of("ereport.io.service.restored")
            == 1),
        "{:?} {:?}",
        rig.ereport_classes(),
        rig.log()
    );
    assert!(
        logged(&rig, "more than the device can have completed"),
        "{:?}",
        rig.log()
    );
    assert_eq!(rig.hba_stat("ring_runaway"), 1);
    assert_eq!(rig.hba_stat("device_resets"), 1);
    assert_eq!(
        rig.ereport_classes(),
        [
            "ereport.io.device.intern_uncorr",
            "ereport.io.service.degraded",
            "ereport.io.service.restored",
        ]
    );
    io_goes_on_after_a_reset(&luns, 40, 46, "after the runaway index");
    rig.finish_clean();
}

/// `commands` good commands on `luns` after a device reset (a unit
/// attention, sense key 6, is the reset's to report and also fine).
fn io_goes_on_after_a_reset(
    luns: &[std::sync::Arc<load::Lun>],
    commands: usize,
    seed: u64,
    what: &str,
) {
    let after = load::run(
        luns,
        &LoadConfig {
            commands,
            seed,
            ..LoadConfig::default()
        },
        &|c: &Completion| {
            if c.good() || c.result.sense_key().is_some_and(|k| k.0 == 6) {
                Ok(())
            } else {
                Err("after the reset".into())
            }
        },
        &mut |_| {},
    );
    after.assert_clean(what);
}
