//! The fault matrix: every scenario runs under load (many commands
//! outstanding across targets and LUNs) and checks that every packet
//! completes exactly once, with the outcome the situation calls for, that
//! no read is returned as good unless it matches the model of the disk,
//! that nothing leaks, and that nothing hangs.

use rvscsi::ffi;
use rvscsi::scsa::{PktState, PktStatistics};
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_emu::scsa::{device, tgtmap};
use rvscsi_sim::load::{self, Completion, LoadConfig};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig, read_block, wait_until};
use std::time::Duration;

fn rig(images: Vec<(u64, u8, u16)>, extra: impl FnOnce(&mut RigConfig)) -> Rig {
    rig_on(
        RigConfig {
            images,
            ..RigConfig::default()
        },
        extra,
    )
}

/// A rig of `base` (its family and images) with the recorder driver.
fn rig_on(base: RigConfig, extra: impl FnOnce(&mut RigConfig)) -> Rig {
    let mut c = RigConfig {
        driver: Driver::Recorder,
        ..base
    };
    extra(&mut c);
    Rig::start(c)
}

#[test]
fn a_clean_load_completes_every_command_once_with_the_right_data() {
    clean_load(rig(
        vec![(16_384, 0, 0), (16_384, 1, 0), (8192, 1, 2)],
        |_| {},
    ));
}

#[test]
fn on_pvscsi_a_clean_load_completes_every_command_once_with_the_right_data() {
    // QEMU's pvscsi has LUN 0 only: three targets, one far up.
    clean_load(rig_on(
        RigConfig::pvscsi(vec![(16_384, 0, 0), (16_384, 1, 0), (8192, 40, 0)]),
        |_| {},
    ));
}

fn clean_load(rig: Rig) {
    let luns = rig.load_luns();
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 600,
            depth: 48,
            ..LoadConfig::default()
        },
        &load::only_good,
        &mut |_| {},
    );
    r.assert_clean("clean load");
    assert_eq!(r.completed, 600);
    assert_eq!(r.good, 600);
    // The model agrees with the image files too.
    for (i, l) in luns.iter().enumerate() {
        let m = l.model.lock().unwrap();
        let blocks = m.blocks();
        let on_disk = rig.images[i].read(0, blocks as usize * 512);
        m.check(0, blocks as u32, &on_disk)
            .expect("the image holds what the model says");
    }
    // kstat(8): every command started came back, none went wrong, nothing
    // for fmdump -e.
    no_trouble(&rig, "clean load");
    rig.finish_clean();
}

/// The HBA kstat shows commands all completed and no recovery, bad
/// completion or fault; no ereport was posted.
fn no_trouble(rig: &Rig, what: &str) {
    let hba = rig.kstat("hba");
    assert!(hba.u64("commands_started").unwrap_or(0) > 0, "{what}");
    assert_eq!(
        hba.u64("commands_started"),
        hba.u64("commands_completed"),
        "{what}"
    );
    for stat in [
        "timeouts",
        "aborts_done",
        "aborts_failed",
        "device_resets",
        "no_response",
        "cmpl_unknown",
        "cmpl_duplicate",
        "cmpl_impossible",
        "ring_runaway",
        "handle_faults",
        "tran_badpkt",
    ] {
        assert_eq!(hba.u64(stat), Some(0), "{what}: hba:{stat}");
    }
    assert!(
        rig.ereport_classes().is_empty(),
        "{what}: {:?}",
        rig.ereport_classes()
    );
}

/// blkdebug rules (QEMU's error injection) failing reads at sectors
/// 1000..1007 with EIO, writes at 2000..2007 with ENOSPC, and reads at
/// 3000..3007 with ENOMEDIUM.
fn media_rules(dir: &std::path::Path) -> String {
    let mut rules = String::new();
    for (event, errno, first) in [
        ("read_aio", 5, 1000),
        ("write_aio", 28, 2000),
        ("read_aio", 123, 3000),
    ] {
        for s in first..first + 8 {
            rules.push_str(&format!(
                "[inject-error]\nevent = \"{event}\"\nerrno = \"{errno}\"\nsector = \"{s}\"\nonce = \"off\"\n\n"
            ));
        }
    }
    let path = dir.join("media.rules");
    std::fs::write(&path, rules).unwrap();
    format!("blkdebug:{}:", path.display())
}

#[test]
fn media_errors_under_load_come_back_as_check_conditions_and_spare_the_neighbours() {
    // virtio-scsi: the residual is the device's own (QEMU says 0).
    media_errors_under_load(
        RigConfig {
            images: vec![(8192, 0, 0), (8192, 0, 1)],
            ..RigConfig::default()
        },
        ResidOfFailed::Device,
    );
}

#[test]
fn on_pvscsi_media_errors_under_load_come_back_as_check_conditions_and_spare_the_neighbours() {
    // The faulty disk and its neighbour on two targets (LUN 0 only).
    // PVSCSI: QEMU writes no dataLen, so the driver cannot know what
    // moved before the error.
    media_errors_under_load(
        RigConfig::pvscsi(vec![(8192, 0, 0), (8192, 1, 0)]),
        ResidOfFailed::Unknown,
    );
}

/// What a failed command's residual is.
#[derive(Clone, Copy, PartialEq)]
enum ResidOfFailed {
    /// What the device reported.
    Device,
    /// The device reports none: the whole length, no transfer claimed.
    Unknown,
}

/// Media errors on the first of `base`'s two disks (blkdebug), under load
/// on both.
fn media_errors_under_load(base: RigConfig, resid: ResidOfFailed) {
    let dir = rvscsi_sim::testkit::TempDir::new("faults-media");
    let prefix = media_rules(&dir.path(""));
    let rig = rig_on(base, |c| {
        c.blkdebug = vec![Some(prefix.clone()), None];
    });
    let luns = rig.load_luns();
    let bad = |c: &Completion, first: u64| (first..first + 8).any(|b| c.covers(b));
    let accept = |c: &Completion| -> Result<(), String> {
        let (eio, enospc, enomedium) = if c.lun == 0 {
            (
                !c.write && bad(c, 1000),
                c.write && bad(c, 2000),
                !c.write && bad(c, 3000),
            )
        } else {
            (false, false, false)
        };
        let want_sense = if eio {
            Some((0xb, 0x00, 0x06)) // ABORTED COMMAND, I/O process terminated
        } else if enospc {
            Some((0x7, 0x27, 0x07)) // DATA PROTECT, space allocation failed
        } else if enomedium {
            Some((0x2, 0x3a, 0x00)) // NOT READY, medium not present
        } else {
            None
        };
        let r = &c.result;
        match want_sense {
            None if c.good() => Ok(()),
            None => Err("a neighbouring command failed".into()),
            Some(want) => {
                if r.reason != ffi::CMD_CMPLT || r.status() != ffi::STATUS_CHECK {
                    return Err(format!("expected CHECK CONDITION {want:x?}"));
                }
                let arq = PktState::ARQ_DONE;
                let xarq = arq | PktState::XARQ_DONE;
                let state_ok = if c.xarq {
                    r.state.contains(xarq)
                } else {
                    r.state.contains(arq) && !r.state.contains(PktState::XARQ_DONE)
                };
                if !state_ok {
                    return Err(format!("ARQ state {:?} for xarq={}", r.state, c.xarq));
                }
                // Not knowing what moved before the error, the packet
                // must not claim all of it did (a uscsi caller reads it).
                if resid == ResidOfFailed::Unknown
                    && (r.state.contains(PktState::XFERRED_DATA) || r.resid != c.length())
                {
                    return Err(format!(
                        "a failed command claims a transfer (resid {} of {}): {r:?}",
                        r.resid,
                        c.length()
                    ));
                }
                match r.sense_key() {
                    Some(k) if k == want => Ok(()),
                    k => Err(format!("sense {k:x?}, expected {want:x?}")),
                }
            }
        }
    };
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 800,
            depth: 32,
            lba_limit: Some(3200),
            max_blocks: 48,
            seed: 7,
            hot: vec![1003, 2004, 3005],
            hot_percent: 15,
            ..LoadConfig::default()
        },
        &accept,
        &mut |_| {},
    );
    r.assert_clean("media errors");
    for key in [(0xb, 0x00, 0x06), (0x7, 0x27, 0x07), (0x2, 0x3a, 0x00)] {
        assert!(
            r.sense.get(&key).copied().unwrap_or(0) > 0,
            "no command hit the fault giving {key:x?}: {:?}",
            r.sense
        );
    }
    assert!(r.good > 600, "most commands are unaffected: {}", r.good);
    // Media errors are the target's answers, not the HBA's trouble.
    no_trouble(&rig, "media errors");
    rig.finish_clean();
}

#[test]
fn a_completion_that_never_comes_goes_through_the_whole_recovery_ladder() {
    // The device completes the read at LBA 4321, but the driver never sees
    // it: ABORT TASK, LU reset and I_T nexus reset all "work" and the
    // command is still there, so the device is reset, which ends it.
    let rig = rig(vec![(8192, 0, 0), (8192, 1, 0)], |_| {});
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    m.faults.arm(Fault::Withhold(Match::Lba(4321)));
    let accept = |c: &Completion| -> Result<(), String> {
        let r = &c.result;
        if c.lun == 0 && c.lba == 4321 {
            let want = PktStatistics::TIMEOUT | PktStatistics::DEV_RESET | PktStatistics::BUS_RESET;
            return if r.reason == ffi::CMD_TIMEOUT && r.statistics.contains(want) {
                Ok(())
            } else {
                Err(format!(
                    "the lost command: {:?} {:?}",
                    r.reason, r.statistics
                ))
            };
        }
        // Others: done, or ended by the device reset (CMD_RESET with
        // STAT_BUS_RESET), or the unit attention that follows it.
        if c.good()
            || (r.reason == ffi::CMD_RESET && r.statistics.contains(PktStatistics::BUS_RESET))
            || (r.status() == ffi::STATUS_CHECK && r.sense_key().is_some_and(|k| k.0 == 6))
        {
            Ok(())
        } else {
            Err("unexpected outcome".into())
        }
    };
    let mut victim: Option<rvscsi_emu::Packet> = None;
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 400,
            depth: 16,
            pkt_time: 2,
            seed: 11,
            write_percent: 0,
            ..LoadConfig::default()
        },
        &accept,
        &mut |p| {
            // Make sure the victim is issued: a read of LBA 4321 on LUN 0.
            if victim.is_none() && p.completed > 20 {
                let mut pkt = read_block(&luns[0].dev, 4321);
                pkt.set_time(2);
                assert_eq!(pkt.start_async(), ffi::TRAN_ACCEPT);
                victim = Some(pkt);
            }
        },
    );
    let pkt = victim.expect("the victim was started");
    assert!(pkt.wait(Duration::from_secs(60)), "the lost command ends");
    let v = pkt.result();
    assert_eq!(v.reason, ffi::CMD_TIMEOUT, "{v:?}");
    assert!(
        v.statistics
            .contains(PktStatistics::TIMEOUT | PktStatistics::DEV_RESET | PktStatistics::BUS_RESET),
        "{v:?}"
    );
    assert_eq!(pkt.comp_calls(), 1, "completed exactly once");
    pkt.destroy();
    r.assert_clean("lost completion");
    assert_eq!(m.faults.stats().withheld, 1);
    // What kstat(8) shows of it: one timeout, and each step of the ladder
    // once: ABORT TASK, LUN reset, target reset (each "done", the command
    // still there), then the device reset, which brought the device back.
    rig.assert_hba_stats(&[
        ("timeouts", 1),
        ("aborts_done", 1),
        ("aborts_failed", 0),
        ("lun_resets_done", 1),
        ("lun_resets_failed", 0),
        ("target_resets_done", 1),
        ("target_resets_failed", 0),
        ("device_resets", 1),
        ("device_resets_failed", 0),
        ("no_response", 1),
    ]);
    // And fmdump -e: the device stopped answering, the service degraded
    // while it was reset, then restored.
    assert_eq!(
        rig.ereport_classes(),
        [
            "ereport.io.device.no_response",
            "ereport.io.service.degraded",
            "ereport.io.service.restored",
        ]
    );
    let probes = &m.probes;
    assert!(probes.count("rvscsi-cmd-timeout") >= 1);
    let resets: Vec<u64> = probes
        .firings("rvscsi-reset")
        .iter()
        .map(|f| f.args[0])
        .collect();
    assert!(
        resets.contains(&(ffi::RESET_LUN as u64))
            && resets.contains(&(ffi::RESET_TARGET as u64))
            && resets.contains(&(ffi::RESET_ALL as u64)),
        "the ladder: {resets:?}"
    );
    // I/O works afterwards.
    let after = load::run(
        &luns,
        &LoadConfig {
            commands: 100,
            seed: 12,
            ..LoadConfig::default()
        },
        &|c| {
            if c.good()
                || (c.result.status() == ffi::STATUS_CHECK
                    && c.result.sense_key().is_some_and(|k| k.0 == 6))
            {
                Ok(())
            } else {
                Err("after the reset".into())
            }
        },
        &mut |_| {},
    );
    after.assert_clean("after recovery");
    std::thread::sleep(Duration::from_millis(100));
    rig.finish_clean();
}

/// A unit attention: CHECK CONDITION, sense key 6.
fn unit_attention(c: &Completion) -> bool {
    c.result.status() == ffi::STATUS_CHECK && c.result.sense_key().is_some_and(|k| k.0 == 6)
}

#[test]
fn tran_abort_and_tran_reset_under_load_end_commands_once_and_deliver_unit_attentions() {
    let rig = rig(vec![(8192, 0, 0), (8192, 0, 1), (8192, 1, 0)], |_| {});
    let luns = rig.load_luns();
    let accept = |c: &Completion| -> Result<(), String> {
        let r = &c.result;
        let ok = c.good()
            || unit_attention(c)
            || (r.reason == ffi::CMD_RESET
                && r.statistics
                    .intersects(PktStatistics::DEV_RESET | PktStatistics::BUS_RESET))
            || (r.reason == ffi::CMD_ABORTED && r.statistics.contains(PktStatistics::ABORTED));
        if ok {
            Ok(())
        } else {
            Err("unexpected outcome".into())
        }
    };
    // Each step: when so many commands have completed, do this.
    let mut steps: Vec<(usize, &str, i32)> = vec![
        (60, "LUN reset of 0,0", 0),
        (140, "target reset of target 1", 1),
        (220, "abort task set of 0,1", 2),
        (300, "reset of the whole device", 3),
    ];
    steps.reverse();
    let mut done: Vec<(&str, i32)> = Vec::new();
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: 500,
            depth: 32,
            seed: 21,
            ..LoadConfig::default()
        },
        &accept,
        &mut |p| {
            if let Some(&(_, what, kind)) = steps.last().filter(|s| p.completed >= s.0) {
                steps.pop();
                let rc = match kind {
                    0 => luns[0].dev.reset(ffi::RESET_LUN),
                    1 => luns[2].dev.reset(ffi::RESET_TARGET),
                    2 => luns[1].dev.abort(None),
                    _ => luns[0].dev.reset(ffi::RESET_ALL),
                };
                done.push((what, rc));
            }
        },
    );
    r.assert_clean("resets under load");
    assert_eq!(done.len(), 4, "every step ran: {done:?}");
    for (what, rc) in &done {
        assert_eq!(*rc, 1, "{what} succeeded");
    }
    // The resets' unit attentions reached the "target driver" (the load).
    let uas: usize = r
        .sense
        .iter()
        .filter(|(k, _)| k.0 == 6 && k.1 == 0x29)
        .map(|(_, n)| n)
        .sum();
    assert!(uas >= 3, "unit attentions after the resets: {:?}", r.sense);
    let reset_ended = r.by_reason.get(&ffi::CMD_RESET).copied().unwrap_or(0);
    eprintln!(
        "resets under load: {} good, {} ended by resets, {uas} unit attentions, by reason {:?}",
        r.good, reset_ended, r.by_reason
    );
    let resets: Vec<u64> = rig
        .bed()
        .machine
        .probes
        .firings("rvscsi-reset")
        .iter()
        .map(|f| f.args[0])
        .collect();
    assert!(resets.contains(&(ffi::RESET_ALL as u64)), "{resets:?}");
    rig.finish_clean();
}

#[test]
fn a_lun_pulled_with_io_in_flight_ends_its_commands_and_the_others_go_on() {
    let rig = rig(vec![(8192, 0, 0), (8192, 1, 0)], |_| {});
    let luns = rig.load_luns();
    let accept = |c: &Completion| -> Result<(), String> {
        if c.good() {
            return Ok(());
        }
        let r = &c.result;
        if unit_attention(c) {
            // 3F/0E: the LUN inventory changed.
            return Ok(());
        }
        if c.lun == 1
            && matches!(
                r.reason,
                ffi::CMD_DEV_GONE | ffi::CMD_ABORTED | ffi::CMD_RESET | ffi::CMD_INCOMPLETE
            )
        {
            return Ok(());
        }
        Err("unexpected outcome".into())
    };
    let map = tgtmap::map_of_device(&luns[1].dev).expect("the LUNs' target map");
    let kept_node = |dev: &rvscsi_emu::Device| {
        map.removed_devices()
            .iter()
            .any(|d| std::ptr::eq(d.sd, dev.sd))
            && device::is_allocated(dev.sd)
    };
    // Completions seen when LUN 1 was pulled, and when the framework told
    // its target driver the device was removed.
    let mut pulled_at: Option<usize> = None;
    let mut removed_at: Option<usize> = None;
    let mut kept_while_held = false;
    let r = load::run(
        &luns,
        &LoadConfig {
            // A bound, not a target: the run ends once LUN 0 has gone on
            // for a while after the removal (below).
            commands: 8000,
            depth: 32,
            seed: 31,
            ..LoadConfig::default()
        },
        &accept,
        &mut |p| {
            if pulled_at.is_none() && p.completed >= 100 {
                // Pull LUN 1,0 (QEMU device hd1) with its I/O in flight.
                rig.qmp("device_del", rvscsi_qtest::json!({"id": "hd1"}));
                pulled_at = Some(p.completed);
            }
            // The load holds LUN 1 open until it is told: the framework's
            // offline is refused, and it keeps the child, marked removed,
            // with a live scsi_device. The load then stops sending to it.
            if pulled_at.is_some() && removed_at.is_none() && luns[1].binding.is_removed() {
                removed_at = Some(p.completed);
                kept_while_held = kept_node(&luns[1].dev);
            }
            if removed_at.is_some_and(|at| p.completed >= at + 300) {
                luns[0]
                    .active
                    .store(false, std::sync::atomic::Ordering::Release);
            }
        },
    );
    r.assert_clean("hot-unplug under load");
    assert!(pulled_at.is_some());
    assert!(
        removed_at.is_some(),
        "the framework never told LUN 1's target driver the device was removed \
         ({} commands issued, by reason {:?})",
        r.issued,
        r.by_reason
    );
    assert!(
        luns[1].binding.refusals() > 0,
        "the offline met a target driver holding the LUN"
    );
    assert!(
        kept_while_held,
        "the child was kept, removed, with its scsi_device, while held"
    );
    let gone = r
        .completions
        .iter()
        .filter(|c| c.lun == 1 && c.result.reason == ffi::CMD_DEV_GONE)
        .count();
    assert!(
        gone > 0,
        "commands to the pulled LUN ended CMD_DEV_GONE: {:?}",
        r.by_reason
    );
    rig.bed()
        .machine
        .with_qemu(|q| q.wait_qmp_event("DEVICE_DELETED", Duration::from_secs(20)))
        .expect("QEMU")
        .expect("DEVICE_DELETED");
    wait_until("the target map drops 1,0", Duration::from_secs(30), || {
        rig.bed().device(1, 0).is_none()
    });
    // The load closed LUN 1 once its commands were back; nothing in the
    // framework retries the offline, so the node is still there...
    assert!(
        kept_node(&luns[1].dev) && !luns[1].binding.is_detached(),
        "a removed child stays until something unconfigures it"
    );
    // ...until an unconfigure (cfgadm, devfsadm -C, the iport's offline)
    // takes it down: the target driver detaches, then tran_tgt_free.
    assert_eq!(map.unconfig_removed(), 0, "the closed LUN is offlined");
    assert!(luns[1].binding.is_detached());
    assert!(!device::is_allocated(luns[1].dev.sd), "and freed");
    assert!(rig.bed().device(0, 0).is_some(), "the other LUN stays");
    assert!(
        !luns[0].binding.is_removed() && luns[0].binding.refusals() == 0,
        "LUN 0 was never offlined"
    );
    let lun0_after = r
        .completions
        .iter()
        .filter(|c| c.lun == 0 && c.good())
        .count();
    assert!(lun0_after > 200, "LUN 0 kept working: {lun0_after}");
    eprintln!(
        "hot-unplug: pulled at {:?}, removal told at {:?} completions; {} issued, \
         {gone} CMD_DEV_GONE, by reason {:?}",
        pulled_at, removed_at, r.issued, r.by_reason
    );
    rig.finish_clean();
}

#[test]
fn a_lun_pulled_while_held_open_is_kept_removed_and_the_same_node_comes_back_when_replugged() {
    let rig = rig(vec![(8192, 0, 0), (8192, 1, 0)], |_| {});
    let luns = rig.load_luns();
    let map = tgtmap::map_of_device(&luns[1].dev).expect("the LUNs' target map");
    let held = luns[1].binding.clone();
    // A consumer holds LUN 1 open (no I/O): its offline must be refused.
    held.open().expect("open LUN 1");
    rig.qmp("device_del", rvscsi_qtest::json!({"id": "hd1"}));
    rig.bed()
        .machine
        .with_qemu(|q| q.wait_qmp_event("DEVICE_DELETED", Duration::from_secs(20)))
        .expect("QEMU")
        .expect("DEVICE_DELETED");
    wait_until(
        "LUN 1's target driver is told the device was removed",
        Duration::from_secs(30),
        || held.is_removed(),
    );
    assert!(held.refusals() > 0 && !held.is_detached());
    assert!(
        rig.bed().device(1, 0).is_none(),
        "hidden from the map's LUNs"
    );
    assert!(
        map.removed_devices()
            .iter()
            .any(|d| std::ptr::eq(d.sd, luns[1].dev.sd))
            && device::is_allocated(luns[1].dev.sd),
        "kept, with its scsi_device"
    );
    // The disk comes back at the same address: the framework reprobes the
    // removed node and reinserts it (scsi_device_config), no new child.
    let img = rvscsi_sim::testkit::Image::patterned(&rig.dir.path("back.img"), 77, 8192);
    rig.hot_plug("hd1b", &img.path, 1, 0);
    wait_until("1,0 is configured again", Duration::from_secs(30), || {
        rig.bed().device(1, 0).is_some()
    });
    let back = rig.bed().device(1, 0).expect("1,0");
    assert!(
        std::ptr::eq(back.sd, luns[1].dev.sd),
        "the removed node was reinserted, not a second child made"
    );
    assert!(!held.is_removed(), "its target driver was told");
    assert!(map.removed_devices().is_empty());
    held.close();
    // It works again, with what the new disk holds.
    rvscsi_sim::testkit::clear_unit_attention(&back);
    let again = vec![
        luns[0].clone(),
        std::sync::Arc::new(load::Lun::bound(
            back,
            held.clone(),
            img.expected(0, img.blocks),
        )),
    ];
    let r = load::run(
        &again,
        &LoadConfig {
            commands: 200,
            seed: 5,
            ..LoadConfig::default()
        },
        &load::only_good,
        &mut |_| {},
    );
    r.assert_clean("the reinserted LUN under load");
    assert!(r.completions.iter().any(|c| c.lun == 1 && c.good()));
    drop(again);
    rig.finish_clean();
    assert!(held.is_detached(), "detached when the iport went");
}

#[test]
fn events_lost_while_the_queue_had_no_buffers_lead_to_a_full_rediscovery() {
    let rig = rig(vec![(2048, 0, 0)], |_| {});
    let m = rig.bed().machine.clone();
    let plug = |i: u32| {
        let img = rvscsi_sim::testkit::Image::patterned(
            &rig.dir.path(&format!("p{i}.img")),
            500 + u64::from(i),
            128,
        );
        rig.hot_plug(&format!("ph{i}"), &img.path, i, 0);
    };
    let has = |t: u32| rig.bed().device(t, 0).is_some();
    // From now on the device never sees the event buffers the driver
    // gives back; the ones it already has carry the first events.
    m.faults.starve_events(&*m.qt, true);
    for i in 1..=16 {
        plug(i);
    }
    wait_until("the first 16 targets", Duration::from_secs(60), || {
        (1..=16).all(has)
    });
    // No buffer left: these events are dropped by the device.
    for i in 17..=20 {
        plug(i);
    }
    std::thread::sleep(Duration::from_secs(3));
    rig.bed().settle().expect("settle");
    assert!(
        !(17..=20).any(has),
        "no event, no discovery: the device kept them"
    );
    // Buffers again: the device reports that events were missed, and the
    // driver rediscovers every target.
    m.faults.starve_events(&*m.qt, false);
    let t0 = std::time::Instant::now();
    while !(17..=20).all(has) && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !(17..=20).all(has) {
        for l in m.log() {
            eprintln!("log: {}", l.text);
        }
        panic!(
            "targets 17..20 were not rediscovered; faults {:?}",
            m.faults.stats()
        );
    }
    assert!(
        m.log().iter().any(|l| l.text.contains("events were lost")),
        "the loss is reported"
    );
    assert!(m.faults.stats().starved > 0);
    rig.finish_clean();
}
