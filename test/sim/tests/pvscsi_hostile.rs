//! A hostile VMware PVSCSI: the test bed rewrites what the driver sees of
//! QEMU's completion and message rings (test/emu `faults/pvscsi.rs`):
//! completions lost, delivered twice or naming contexts the driver never
//! gave, impossible statuses and lengths, a producer index that runs away,
//! garbage messages and a message ring that overflows. Each scenario
//! checks what the driver must do about it, that every packet completes
//! exactly once, that I/O goes on, and ends with a clean detach.

use rvscsi::ffi;
use rvscsi::scsa::{PktState, PktStatistics};
use rvscsi_emu::faults::pvscsi::{BogusContext, CmpEdit, MsgEdit};
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_sim::load::{self, Completion, LoadConfig};
use rvscsi_sim::testkit::{
    Driver, Image, Rig, RigConfig, clear_unit_attention, held_read, read_block, wait_for,
};
use std::time::Duration;

/// A pvscsi rig of patterned disks, reached without a target driver.
fn recorder_rig(images: Vec<(u64, u8, u16)>) -> Rig {
    Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..RigConfig::pvscsi(images)
    })
}

/// A pvscsi rig whose one disk (4096 blocks at target 0) answers every
/// read and write after `latency`.
fn slow_rig(latency: Duration, interrupts: &str) -> Rig {
    Rig::start(RigConfig {
        interrupts: interrupts.into(),
        images: vec![(4096, 0, 0)],
        blank_images: true,
        null_latency_ns: Some(latency.as_nanos() as u64),
        driver: Driver::Recorder,
        ..RigConfig::pvscsi(Vec::new())
    })
}

fn log_count(rig: &Rig, needle: &str) -> usize {
    rig.log().iter().filter(|l| l.contains(needle)).count()
}

/// Reads one block at `lba` and returns the result, after checking that
/// it completed exactly once.
fn read_once(dev: &std::sync::Arc<rvscsi_emu::Device>, lba: u32) -> rvscsi_emu::PktResult {
    let p = read_block(dev, lba);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(30)), "LBA {lba} completes");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(p.comp_calls(), 1, "LBA {lba}: completed exactly once");
    let r = p.result();
    p.destroy();
    r
}

#[test]
fn duplicate_and_bogus_context_completions_are_dropped_counted_and_the_real_one_completes() {
    let rig = recorder_rig(vec![(8192, 0, 0)]);
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    // One more command stays outstanding for the driver throughout (its
    // completion withheld; pkt_time 0: no timeout): a duplicate or bogus
    // completion then does not claim more completions than there are
    // commands, which the driver takes for a runaway index (see below).
    let background = held_read(&m, &dev, 50);
    // Some I/O, several at once, so that completed (stale) contexts exist.
    let first: Vec<_> = (0..4).map(|lba| read_block(&dev, lba)).collect();
    for p in &first {
        assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    }
    for p in first {
        assert!(p.wait(Duration::from_secs(30)));
        assert_eq!(p.result().reason, ffi::CMD_CMPLT);
        p.destroy();
    }
    let cases = [
        (
            "duplicate",
            Fault::Duplicate(Match::Lba(100)),
            100u32,
            "cmpl_duplicate",
        ),
        (
            "context 0",
            Fault::BogusContext(Match::Lba(101), BogusContext::Zero),
            101,
            "cmpl_impossible",
        ),
        (
            "beyond the ring",
            Fault::BogusContext(Match::Lba(102), BogusContext::OutOfRange),
            102,
            "cmpl_impossible",
        ),
        (
            "above 32 bits",
            Fault::BogusContext(Match::Lba(103), BogusContext::Above32Bits),
            103,
            "cmpl_impossible",
        ),
        (
            "never issued",
            Fault::BogusContext(Match::Lba(104), BogusContext::NeverIssued),
            104,
            "cmpl_unknown",
        ),
        (
            "already completed",
            Fault::BogusContext(Match::Lba(105), BogusContext::Stale),
            105,
            "cmpl_duplicate",
        ),
    ];
    assert_eq!(cases.len(), 6, "the bad completions reported below");
    let kinds = ["cmpl_duplicate", "cmpl_unknown", "cmpl_impossible"];
    for (what, fault, lba, kind) in cases {
        let counted: Vec<u64> = kinds.iter().map(|k| rig.hba_stat(k)).collect();
        let dropped = log_count(&rig, "unknown command id");
        let before = m.faults.stats();
        m.faults.arm(fault);
        let r = read_once(&dev, lba);
        assert_eq!(
            (r.reason, r.status()),
            (ffi::CMD_CMPLT, 0),
            "{what}: the real completion is good: {r:?}"
        );
        assert_eq!(m.faults.pending(), 0, "{what}: the fault was used");
        let after = m.faults.stats();
        assert_eq!(
            (after.duplicated + after.bogus_ids) - (before.duplicated + before.bogus_ids),
            1,
            "{what}: one extra completion shown"
        );
        assert!(
            wait_for(Duration::from_secs(5), || log_count(
                &rig,
                "unknown command id"
            ) == dropped + 1),
            "{what}: the driver dropped it and said so: {:?}",
            rig.log()
        );
        // kstat(8) counts it once, as what it was.
        for (k, before) in kinds.iter().zip(&counted) {
            let want = before + u64::from(*k == kind);
            assert_eq!(rig.hba_stat(k), want, "{what}: hba:{k}");
        }
    }
    // Reported at most once a second; no service impact.
    rig.assert_bad_completion_reports(6);
    // The data of a read with a duplicate is the disk's.
    m.faults.arm(Fault::Duplicate(Match::Any));
    let disk_block = rig.images[0].expected(7, 1);
    let buf = std::sync::Arc::new(rvscsi_emu::DataBuf::new(512, 0, true));
    let mut p = dev
        .init_pkt(Some(buf.clone()), rvscsi_emu::InitArgs::default())
        .expect("packet");
    p.cdb_mut()
        .copy_from_slice(&[0x28, 0, 0, 0, 0, 7, 0, 0, 1, 0]);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(30)));
    assert_eq!(p.result().reason, ffi::CMD_CMPLT);
    p.destroy();
    assert_eq!(buf.bytes(), &disk_block[..]);
    // The background command comes back with the next interrupt.
    m.faults.release_withheld();
    assert_eq!(read_once(&dev, 8).reason, ffi::CMD_CMPLT);
    assert!(background.wait(Duration::from_secs(30)));
    assert_eq!(
        (background.result().reason, background.comp_calls()),
        (ffi::CMD_CMPLT, 1)
    );
    background.destroy();
    // A duplicate of the only command outstanding: the producer index
    // claims two completions for one command. The driver cannot tell a
    // duplicate from a runaway index then: it resets the adapter, and
    // the command (consumed or reclaimed) still completes exactly once.
    let resets = m.faults.stats().adapter_resets;
    m.faults.arm(Fault::Duplicate(Match::Lba(60)));
    let r = read_once(&dev, 60);
    assert!(
        r.reason == ffi::CMD_RESET || (r.reason, r.status()) == (ffi::CMD_CMPLT, 0),
        "{r:?}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || m.faults.stats().adapter_resets
            > resets),
        "an adapter reset"
    );
    clear_unit_attention(&dev);
    assert_eq!(read_once(&dev, 61).reason, ffi::CMD_CMPLT);
    rig.finish_clean();
}

#[test]
fn duplicates_and_bogus_contexts_under_load_leave_every_command_completed_once() {
    // With MSI, with INTx (INTR_STATUS read and acknowledged) and polled.
    for mode in ["msi", "fixed", "poll"] {
        eprintln!("interrupts: {mode}");
        bogus_under_load(mode);
    }
}

fn bogus_under_load(mode: &str) {
    let rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        interrupts: mode.into(),
        ..RigConfig::pvscsi(vec![(8192, 0, 0), (8192, 1, 0)])
    });
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    // A command the driver keeps outstanding throughout (see the test
    // above), outside the load's LBAs.
    let background = held_read(&m, &luns[1].dev, 7000);
    let mut armed = 0;
    let kinds = [
        BogusContext::Zero,
        BogusContext::OutOfRange,
        BogusContext::Above32Bits,
        BogusContext::NeverIssued,
        BogusContext::Stale,
    ];
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 600,
            depth: 24,
            seed: 51,
            lba_limit: Some(6000),
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
                m.faults.arm(match armed % 2 {
                    0 => Fault::Duplicate(Match::Any),
                    _ => Fault::BogusContext(Match::Any, kinds[armed % kinds.len()]),
                });
            }
        },
    );
    r.assert_clean("pvscsi duplicates and bogus contexts");
    let st = m.faults.stats();
    assert!(st.duplicated >= 5 && st.bogus_ids >= 5, "{st:?}");
    assert!(
        log_count(&rig, "unknown command id") as u64 >= st.duplicated + st.bogus_ids,
        "every extra completion was dropped and logged: {st:?} {:?}",
        rig.log()
    );
    assert_eq!(st.adapter_resets, 1, "only attach's: {st:?}");
    m.faults.release_withheld();
    assert_eq!(read_once(&luns[0].dev, 1).reason, ffi::CMD_CMPLT);
    assert!(background.wait(Duration::from_secs(30)));
    assert_eq!(
        (background.result().reason, background.comp_calls()),
        (ffi::CMD_CMPLT, 1)
    );
    background.destroy();
    rig.finish_clean();
}

#[test]
fn a_lost_completion_is_aborted_at_pkt_time_and_ends_cmd_timeout_once() {
    let rig = recorder_rig(vec![(8192, 0, 0)]);
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    let before = m.faults.stats();
    // The device completes the read; the driver never sees it, until the
    // test lets it through after the driver's ABORT_CMD (a device that
    // sat on the command and answers once asked).
    m.faults.arm(Fault::Withhold(Match::Lba(4321)));
    let mut p = read_block(&dev, 4321);
    p.set_time(1);
    let t0 = std::time::Instant::now();
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(
        wait_for(Duration::from_secs(20), || m.faults.stats().abort_cmds
            > before.abort_cmds),
        "ABORT_CMD was sent"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "not before pkt_time: {:?}",
        t0.elapsed()
    );
    assert_eq!(m.faults.withheld(), 1);
    assert!(!p.is_done(), "nothing came back yet");
    m.faults.release_withheld();
    // Another command makes the device interrupt (the late completion is
    // on the ring already).
    assert_eq!(read_once(&dev, 5).reason, ffi::CMD_CMPLT);
    assert!(p.wait(Duration::from_secs(30)), "the lost command ends");
    std::thread::sleep(Duration::from_millis(50));
    let r = p.result();
    assert_eq!(r.reason, ffi::CMD_TIMEOUT, "{r:?}");
    assert!(r.statistics.contains(PktStatistics::TIMEOUT), "{r:?}");
    assert_eq!(p.comp_calls(), 1, "completed exactly once");
    p.destroy();
    assert_eq!(m.faults.stats().withheld - before.withheld, 1);
    rig.finish_clean();
}

#[test]
fn a_completion_lost_for_good_goes_down_the_ladder_to_an_adapter_reset() {
    let rig = recorder_rig(vec![(8192, 0, 0)]);
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    let before = m.faults.stats();
    m.faults.arm(Fault::Withhold(Match::Lba(999)));
    let mut p = read_block(&dev, 999);
    p.set_time(1);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(60)), "the lost command ends");
    std::thread::sleep(Duration::from_millis(50));
    let r = p.result();
    assert_eq!(r.reason, ffi::CMD_TIMEOUT, "{r:?}");
    assert!(
        r.statistics
            .contains(PktStatistics::TIMEOUT | PktStatistics::BUS_RESET),
        "{r:?}"
    );
    assert_eq!(p.comp_calls(), 1, "completed exactly once");
    p.destroy();
    let st = m.faults.stats();
    assert!(st.abort_cmds > before.abort_cmds, "ABORT_CMD first: {st:?}");
    assert!(
        st.device_resets > before.device_resets,
        "then RESET_DEVICE: {st:?}"
    );
    assert!(
        st.adapter_resets > before.adapter_resets,
        "then ADAPTER_RESET: {st:?}"
    );
    assert_eq!(m.faults.withheld(), 0, "forgotten with the old rings");
    // kstat(8) and fmdump -e: one timeout, the ladder short of a reset
    // got nothing back (no_response), one adapter reset that worked.
    rig.assert_hba_stats(&[
        ("timeouts", 1),
        ("no_response", 1),
        ("device_resets", 1),
        ("device_resets_failed", 0),
    ]);
    assert_eq!(
        rig.ereport_classes(),
        [
            "ereport.io.device.no_response",
            "ereport.io.service.degraded",
            "ereport.io.service.restored",
        ]
    );
    // The rings were set up again.
    clear_unit_attention(&dev);
    for lba in [10, 11] {
        let r = read_once(&dev, lba);
        assert_eq!((r.reason, r.status()), (ffi::CMD_CMPLT, 0), "{r:?}");
    }
    rig.finish_clean();
}

#[test]
fn an_adapter_reset_that_fails_loses_the_controller_and_says_so() {
    // tran_reset(RESET_ALL) with a command in flight, on a device that
    // fails the reset itself (ADAPTER_RESET's status reads failed) or
    // refuses the rings after it (SETUP_RINGS): the command in flight ends
    // CMD_RESET once, the controller is lost (kstat device_resets_failed;
    // fmdump -e: inval_state/reset-failed, then service.lost) and new
    // commands fail at once instead of hanging.
    const ADAPTER_RESET: u32 = 1;
    const SETUP_RINGS: u32 = 3;
    for command in [ADAPTER_RESET, SETUP_RINGS] {
        let rig = recorder_rig(vec![(8192, 0, 0)]);
        let dev = rig.recorder.devices().remove(0);
        clear_unit_attention(&dev);
        let m = rig.bed().machine.clone();
        let in_flight = held_read(&m, &dev, 77);
        m.faults.arm(Fault::CommandFails(command));
        assert_eq!(dev.reset(ffi::RESET_ALL), 0, "command {command}: failed");
        assert!(in_flight.wait(Duration::from_secs(30)), "command {command}");
        std::thread::sleep(Duration::from_millis(20));
        let r = in_flight.result();
        assert_eq!(r.reason, ffi::CMD_RESET, "command {command}: {r:?}");
        assert_eq!(in_flight.comp_calls(), 1, "command {command}: once");
        in_flight.destroy();
        assert!(m.faults.stats().commands_failed >= 1, "command {command}");
        rig.assert_hba_stats(&[("device_resets", 1), ("device_resets_failed", 1)]);
        let reports = rvscsi_emu::ddi::fm::ereports(&m);
        let classes: Vec<&str> = reports.iter().map(|e| e.class.as_str()).collect();
        assert_eq!(
            classes,
            ["ereport.io.device.inval_state", "ereport.io.service.lost"],
            "command {command}"
        );
        assert_eq!(
            reports[0].member("detail"),
            Some(&rvscsi_emu::ddi::fm::Payload::Str("reset-failed".into()))
        );
        let p = read_block(&dev, 5);
        assert_eq!(p.start_async(), ffi::TRAN_FATAL_ERROR, "command {command}");
        p.destroy();
        // The device carries out its commands again: detach resets it and
        // frees everything.
        m.faults.disarm_all();
        rig.finish_clean();
    }
}

#[test]
fn a_runaway_completion_index_resets_the_adapter_and_ends_what_was_in_flight_once() {
    // 5: more than the four outstanding (the driver counts), and 5000:
    // more than the whole ring.
    // (INTx too: the handler acknowledges INTR_STATUS before it looks.)
    for (extra, mode) in [(5u32, "auto"), (5000, "auto"), (5, "fixed")] {
        let rig = slow_rig(Duration::from_millis(500), mode);
        let dev = rig.recorder.devices().remove(0);
        clear_unit_attention(&dev);
        let m = rig.bed().machine.clone();
        let before = m.faults.stats();
        m.faults.arm(Fault::CmpProdRunaway(Match::Any, extra));
        // The first completes while the other three still wait in the
        // device (250 ms more): its completion comes with the runaway.
        let pkts: Vec<_> = (0..4).map(|i| read_block(&dev, i)).collect();
        assert_eq!(pkts[0].start_async(), ffi::TRAN_ACCEPT);
        std::thread::sleep(Duration::from_millis(250));
        for p in &pkts[1..] {
            assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
        }
        for (i, p) in pkts.into_iter().enumerate() {
            assert!(p.wait(Duration::from_secs(30)), "{extra}: ends");
            std::thread::sleep(Duration::from_millis(20));
            let r = p.result();
            assert_eq!(p.comp_calls(), 1, "{extra}: completed exactly once");
            let reset =
                r.reason == ffi::CMD_RESET && r.statistics.contains(PktStatistics::BUS_RESET);
            if i == 0 {
                // Really completed by the device: ended by the reset, or
                // read from the ring as the reset left it (an interrupt
                // handler running between ADAPTER_RESET and the reclaim
                // sees the device's true index again): never anything
                // else.
                let good = r.reason == ffi::CMD_CMPLT && r.status() == 0 && r.resid == 0;
                assert!(reset || good, "{extra}: the first: {r:?}");
            } else {
                assert!(reset, "{extra}: in flight at the reset: {r:?}");
            }
            p.destroy();
        }
        let st = m.faults.stats();
        assert_eq!(st.runaways - before.runaways, 1);
        assert!(
            st.adapter_resets > before.adapter_resets,
            "{extra}: ADAPTER_RESET: {st:?}"
        );
        assert!(
            rig.log()
                .iter()
                .any(|l| l.contains("more than the device can have completed")),
            "{extra}: {:?}",
            rig.log()
        );
        // kstat(8): one runaway, one adapter reset; fmdump -e: the ring
        // protocol broken, the service degraded, then restored.
        assert_eq!(rig.hba_stat("ring_runaway"), 1, "{extra}");
        assert_eq!(rig.hba_stat("device_resets"), 1, "{extra}");
        assert!(
            wait_for(Duration::from_secs(10), || rig
                .ereports_of("ereport.io.service.restored")
                == 1),
            "{extra}: {:?}",
            rig.ereport_classes()
        );
        assert_eq!(
            rig.ereport_classes(),
            [
                "ereport.io.device.intern_uncorr",
                "ereport.io.service.degraded",
                "ereport.io.service.restored",
            ],
            "{extra}"
        );
        // I/O works on the new rings.
        clear_unit_attention(&dev);
        let r = read_once(&dev, 20);
        assert_eq!((r.reason, r.status()), (ffi::CMD_CMPLT, 0), "{r:?}");
        rig.finish_clean();
    }
}

#[test]
fn impossible_statuses_and_lengths_are_never_a_success() {
    let rig = recorder_rig(vec![(8192, 0, 0)]);
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    let cases: [(&str, CmpEdit, u8); 6] = [
        (
            "host status no header defines",
            CmpEdit {
                host_status: Some(0x99),
                ..CmpEdit::default()
            },
            ffi::CMD_TRAN_ERR,
        ),
        (
            "host status 0xffff",
            CmpEdit {
                host_status: Some(0xffff),
                ..CmpEdit::default()
            },
            ffi::CMD_TRAN_ERR,
        ),
        (
            "scsi status 0x100",
            CmpEdit {
                scsi_status: Some(0x100),
                ..CmpEdit::default()
            },
            ffi::CMD_TRAN_ERR,
        ),
        (
            "scsi status 0xffff with CHECK's low byte",
            CmpEdit {
                scsi_status: Some(0xff02),
                sense_len: Some(18),
                ..CmpEdit::default()
            },
            ffi::CMD_TRAN_ERR,
        ),
        (
            "dataLen one byte more than the transfer",
            CmpEdit {
                data_len: Some(513),
                ..CmpEdit::default()
            },
            ffi::CMD_TRAN_ERR,
        ),
        (
            "dataLen 2^64-1",
            CmpEdit {
                data_len: Some(u64::MAX),
                ..CmpEdit::default()
            },
            ffi::CMD_TRAN_ERR,
        ),
    ];
    for (i, (what, edit, want)) in cases.into_iter().enumerate() {
        let lba = 200 + i as u32;
        m.faults
            .arm(Fault::Completion(Match::Lba(u64::from(lba)), edit));
        let r = read_once(&dev, lba);
        assert_ne!(r.reason, ffi::CMD_CMPLT, "{what}: never a success: {r:?}");
        assert_eq!(r.reason, want, "{what}: {r:?}");
        assert!(
            !r.state.contains(PktState::XFERRED_DATA),
            "{what}: no data claimed: {r:?}"
        );
    }
    assert_eq!(m.faults.stats().completion_edits, 6);
    // A plausible short transfer is a residual, not an error.
    m.faults.arm(Fault::Completion(
        Match::Lba(300),
        CmpEdit {
            data_len: Some(256),
            ..CmpEdit::default()
        },
    ));
    let p = read_block(&dev, 300);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(30)));
    assert_eq!((p.result().reason, p.resid()), (ffi::CMD_CMPLT, 256));
    p.destroy();
    rig.finish_clean();
}

/// A READ(10) of one block at `lba` with a full extended status area
/// (PKT_XARQ: 12 bytes of header + 252 of sense), started and waited for.
fn read_xarq(dev: &std::sync::Arc<rvscsi_emu::Device>, lba: u32) -> rvscsi_emu::PktResult {
    let mut p = dev
        .init_pkt(
            Some(std::sync::Arc::new(rvscsi_emu::DataBuf::new(512, 0, true))),
            rvscsi_emu::InitArgs {
                statuslen: 12 + ffi::MAX_SENSE_LENGTH,
                flags: ffi::PKT_XARQ,
                ..rvscsi_emu::InitArgs::default()
            },
        )
        .expect("packet");
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    p.cdb_mut().copy_from_slice(&cdb);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(30)));
    assert_eq!(p.comp_calls(), 1);
    let r = p.result();
    p.destroy();
    r
}

#[test]
fn sense_longer_than_offered_is_clamped_to_the_offer_and_arq_is_done() {
    let rig = recorder_rig(vec![(1024, 0, 0)]);
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let m = rig.bed().machine.clone();
    // Beyond the last block: CHECK CONDITION, ILLEGAL REQUEST, LBA out of
    // range (21/00), 18 bytes of fixed sense from QEMU.
    let truthful = read_xarq(&dev, 5000);
    assert_eq!(truthful.status(), ffi::STATUS_CHECK, "{truthful:?}");
    assert_eq!(truthful.sense_key(), Some((5, 0x21, 0)));
    assert_eq!(truthful.sense().map(|s| s.len()), Some(18));
    for claimed in [253u32, 4096, u32::MAX] {
        m.faults.arm(Fault::Completion(
            Match::Lba(5001),
            CmpEdit {
                sense_len: Some(claimed),
                ..CmpEdit::default()
            },
        ));
        let r = read_xarq(&dev, 5001);
        assert_eq!(
            (r.reason, r.status()),
            (ffi::CMD_CMPLT, ffi::STATUS_CHECK),
            "{claimed}: {r:?}"
        );
        assert!(
            r.state.contains(PktState::ARQ_DONE | PktState::XARQ_DONE),
            "{claimed}: ARQ done: {r:?}"
        );
        assert_eq!(
            r.sense().map(|s| s.len()),
            Some(ffi::MAX_SENSE_LENGTH),
            "{claimed}: clamped to the 252 bytes offered"
        );
        assert_eq!(r.sense_key(), Some((5, 0x21, 0)), "{claimed}");
        assert!(r.scb.len() == 12 + ffi::MAX_SENSE_LENGTH, "nothing overrun");
    }
    // Without XARQ the 20-byte area is all there is.
    m.faults.arm(Fault::Completion(
        Match::Lba(5002),
        CmpEdit {
            sense_len: Some(4096),
            ..CmpEdit::default()
        },
    ));
    let p = read_block(&dev, 5002);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(30)));
    let r = p.result();
    p.destroy();
    assert!(r.state.contains(PktState::ARQ_DONE) && !r.state.contains(PktState::XARQ_DONE));
    assert_eq!(r.sense().map(|s| s.len()), Some(ffi::SENSE_LENGTH));
    assert_eq!(r.sense_key(), Some((5, 0x21, 0)));
    rig.finish_clean();
}

fn disk_names(rig: &Rig) -> Vec<String> {
    let mut v: Vec<_> = rig
        .sd
        .disks()
        .iter()
        .filter(|d| !d.is_gone())
        .map(|d| d.name())
        .collect();
    v.sort();
    v
}

fn has_disk(rig: &Rig, t: u32) -> bool {
    rig.sd.disk(t, 0).is_some_and(|d| !d.is_gone())
}

fn plug(rig: &Rig, t: u32) {
    let img = Image::patterned(
        &rig.dir.path(&format!("hp{t}.img")),
        300 + u64::from(t),
        256,
    );
    rig.hot_plug(&format!("hp{t}"), &img.path, t, 0);
}

#[test]
fn garbage_messages_are_consumed_and_later_hot_plugs_still_appear() {
    let rig = Rig::start(RigConfig::pvscsi(vec![(2048, 0, 0)]));
    let m = rig.bed().machine.clone();
    // Target 3's DEV_ADDED arrives as a message of no known kind.
    m.faults.arm(Fault::Message(MsgEdit::garbage()));
    plug(&rig, 3);
    assert!(
        wait_for(Duration::from_secs(20), || log_count(
            &rig,
            "ignoring a message of a kind not known"
        ) == 1),
        "consumed and ignored: {:?}",
        rig.log()
    );
    assert_eq!(m.faults.stats().events, 1);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!has_disk(&rig, 3), "an ignored message discovers nothing");
    // Target 4's DEV_ADDED comes with invented ones: a bus this interface
    // has not, a target above 255, and an unknown kind.
    m.faults.arm(Fault::ExtraMessages(vec![
        MsgEdit {
            bus: Some(7),
            ..MsgEdit::default()
        },
        MsgEdit {
            target: Some(300),
            ..MsgEdit::default()
        },
        MsgEdit {
            kind: Some(0xffff),
            ..MsgEdit::default()
        },
    ]));
    plug(&rig, 4);
    // The bad addresses call for a rescan of everything: 3 is found too.
    assert!(
        wait_for(Duration::from_secs(30), || has_disk(&rig, 3)
            && has_disk(&rig, 4)),
        "targets 3 and 4: {:?} {:?}",
        disk_names(&rig),
        rig.log()
    );
    assert_eq!(m.faults.stats().messages_injected, 3);
    assert_eq!(
        log_count(&rig, "ignoring a message of a kind not known"),
        2,
        "{:?}",
        rig.log()
    );
    // The ring did not stall, and the device still has room (its
    // msgConsIdx is its own numbering): a plain hot-plug still appears.
    plug(&rig, 5);
    assert!(
        wait_for(Duration::from_secs(30), || has_disk(&rig, 5)),
        "target 5: {:?}",
        rig.log()
    );
    assert!(
        rig.log().iter().any(|l| l.contains("target 5 appeared")),
        "from its own message"
    );
    assert_eq!(
        rig.sd.disk(0, 0).unwrap().read(5, 512).unwrap(),
        rig.images[0].expected(5, 1)
    );
    rig.finish_clean();
}

#[test]
fn a_message_ring_overflow_leads_to_a_full_rediscovery() {
    let rig = Rig::start(RigConfig::pvscsi(vec![(2048, 0, 0), (2048, 1, 0)]));
    let m = rig.bed().machine.clone();
    assert_eq!(disk_names(&rig), ["c0t0d0", "c0t1d0"]);
    // Target 9's message comes with msgProdIdx 40 more than the device
    // wrote: more than the 32-entry ring, so messages were overwritten.
    m.faults.arm(Fault::MsgProdOverflow(40));
    plug(&rig, 9);
    assert!(
        wait_for(Duration::from_secs(30), || has_disk(&rig, 9)),
        "target 9 found by the rediscovery: {:?} {:?}",
        disk_names(&rig),
        rig.log()
    );
    assert!(
        rig.log()
            .iter()
            .any(|l| l.contains("device messages were lost")),
        "{:?}",
        rig.log()
    );
    assert!(
        !rig.log().iter().any(|l| l.contains("target 9 appeared")),
        "no message of an overrun ring is read"
    );
    assert_eq!(m.faults.stats().msg_overflows, 1);
    assert!(
        has_disk(&rig, 0) && has_disk(&rig, 1),
        "every target still there"
    );
    // Messages flow again after the skip.
    plug(&rig, 10);
    assert!(
        wait_for(Duration::from_secs(30), || has_disk(&rig, 10)),
        "target 10: {:?}",
        rig.log()
    );
    assert!(rig.log().iter().any(|l| l.contains("target 10 appeared")));
    rig.finish_clean();
}

#[test]
fn ring_sizes_the_device_misread_fail_attach_cleanly() {
    // With 65 targets the driver sets up 32 request pages (1024 entries:
    // log2 10), 32 completion pages (4096: log2 12) and one message page
    // (32: log2 5); the device says otherwise.
    for (what, offset, value) in [
        ("request ring", 8u64, 8u32),
        ("completion ring", 20, 7),
        ("message ring", 136, 4),
    ] {
        let f = match Rig::try_attach(RigConfig {
            faults: vec![Fault::RingLog2 { offset, value }],
            ..RigConfig::pvscsi(vec![(2048, 0, 0)])
        }) {
            Ok(rig) => {
                let log = rig.log();
                rig.finish_clean();
                panic!("{what}: attached although the device misread the rings: {log:?}");
            }
            Err(f) => f,
        };
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
    }
}
