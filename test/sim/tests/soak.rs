//! The soak: a long random mix of reads and writes of random sizes at
//! random places across LUNs, with media errors and device misbehaviour
//! switched on and off, resets now and then; every read checked against a
//! model of the disk. Its length is RVSCSI_SOAK_SECONDS (default 20: CI);
//! it prints what it ran and what it saw. It runs on virtio-scsi (with the
//! hostile-device layer's misbehaviour) and on VMware PVSCSI (media errors
//! and resets: the hostile layer's pvscsi faults are its own tests').
//!
//!     RVSCSI_SOAK_SECONDS=600 cargo test -p rvscsi-sim --test soak -- --nocapture

use rvscsi::ffi;
use rvscsi_emu::faults::{Fault, Match};
use rvscsi_sim::load::{self, Completion, LoadConfig, Rng};
use rvscsi_sim::testkit::{Driver, Rig, RigConfig, TempDir};
use std::time::Duration;

/// Whatever a misbehaving device or a reset can make of a command; never
/// a broken invariant (the model checks the data of good reads).
fn acceptable(c: &Completion) -> Result<(), String> {
    c.within_bounds()?;
    match c.result.reason {
        ffi::CMD_CMPLT
        | ffi::CMD_RESET
        | ffi::CMD_ABORTED
        | ffi::CMD_TIMEOUT
        | ffi::CMD_TRAN_ERR
        | ffi::CMD_DEV_GONE => Ok(()),
        other => Err(format!("pkt_reason {other}")),
    }
}

#[test]
fn soak() {
    soak_on(RigConfig::default(), true);
}

#[test]
fn soak_pvscsi() {
    soak_on(RigConfig::pvscsi(Vec::new()), false);
}

/// The soak on the HBA of `base`, with the hostile-device layer's faults
/// if `device_faults`.
fn soak_on(base: RigConfig, device_faults: bool) {
    let family = format!("{:?}", base.family);
    let seconds: u64 = std::env::var("RVSCSI_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = TempDir::new("soak");
    let rules = dir.path("soak.rules");
    let mut text = String::new();
    for (event, errno, first) in [("read_aio", 5, 1500), ("write_aio", 28, 2500)] {
        for s in first..first + 4 {
            text.push_str(&format!(
                "[inject-error]\nevent = \"{event}\"\nerrno = \"{errno}\"\nsector = \"{s}\"\nonce = \"off\"\n\n"
            ));
        }
    }
    std::fs::write(&rules, text).unwrap();
    let rig = Rig::start(RigConfig {
        // QEMU's pvscsi has LUN 0 only (max_lun 0): a second target there.
        images: if device_faults {
            vec![(8192, 0, 0), (8192, 0, 1), (8192, 2, 0)]
        } else {
            vec![(8192, 0, 0), (8192, 1, 0), (8192, 2, 0)]
        },
        blkdebug: vec![Some(format!("blkdebug:{}:", rules.display())), None, None],
        driver: Driver::Recorder,
        ..base
    });
    let luns = rig.load_luns();
    let m = rig.bed().machine.clone();
    let mut rng = Rng::new(0x50a4);
    let mut next_event = Duration::from_millis(300);
    let mut resets = 0;
    let r = load::run(
        &luns,
        &LoadConfig {
            commands: usize::MAX,
            depth: 32,
            max_blocks: 64,
            pkt_time: 3,
            seed: 0x50a4,
            hot: vec![1501, 2502],
            hot_percent: 2,
            issue_for: Some(Duration::from_secs(seconds)),
            limit: Duration::from_secs(seconds + 120),
            ..LoadConfig::default()
        },
        &acceptable,
        &mut |p| {
            if p.elapsed < next_event {
                return;
            }
            next_event = p.elapsed + Duration::from_millis(200 + rng.below(600));
            // One misbehaviour or one reset at a time, at random.
            let pick = rng.below(12);
            if !device_faults && pick < 8 {
                return;
            }
            match pick {
                0 => m.faults.arm(Fault::Duplicate(Match::Any)),
                1 => m
                    .faults
                    .arm(Fault::BogusUsedId(300 + rng.below(60000) as u32)),
                2 => m
                    .faults
                    .arm(Fault::UsedLen(Match::Any, rng.next_u64() as u32)),
                3 => m.faults.arm(Fault::Response(
                    Match::Any,
                    vec![(0, vec![0xff; 4]), (10, vec![2]), (11, vec![0])],
                )),
                4 => m
                    .faults
                    .arm(Fault::Response(Match::Any, vec![(4, vec![0xff; 4])])),
                5 => m
                    .faults
                    .arm(Fault::Response(Match::Any, vec![(11, vec![0x66])])),
                6 if p.outstanding > 0 => m.faults.arm(Fault::Withhold(Match::Any)),
                7 => m.faults.arm(Fault::TmfResponse {
                    response: 11,
                    count: 1,
                }),
                8 => {
                    resets += 1;
                    let _ = luns[rng.below(3) as usize].dev.reset(ffi::RESET_LUN);
                }
                9 if rng.below(4) == 0 => {
                    resets += 1;
                    let _ = luns[0].dev.reset(ffi::RESET_ALL);
                }
                _ => {}
            }
        },
    );
    let st = m.faults.stats();
    let mismatches = r
        .problems
        .iter()
        .filter(|p| p.contains("read back wrong"))
        .count();
    println!(
        "soak ({family}): {seconds} s, {} commands ({} good), {resets} resets, by reason {:?}, sense {:?}",
        r.completed, r.good, r.by_reason, r.sense
    );
    println!("soak: device faults {st:?}");
    println!(
        "soak: mismatches {mismatches}, problems {}",
        r.problems.len()
    );
    assert_eq!(mismatches, 0, "{:#?}", r.problems);
    assert!(r.is_clean(), "{:#?} hung {}", r.problems, r.hung);
    assert!(r.completed > 100, "the soak ran");
    rig.finish_clean();
}
