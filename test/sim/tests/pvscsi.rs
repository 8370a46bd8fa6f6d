//! The driver on QEMU's VMware PVSCSI (`-device pvscsi`): sd attaches to
//! every disk (ids above the 16 the Linux and FreeBSD drivers stop at
//! included), byte-exact I/O from one block to well past the largest
//! transfer, sd's full queue depth, and a clean detach.

use rvscsi::ffi;
use rvscsi::scsa::PktStatistics;
use rvscsi_qtest::json;
use rvscsi_sim::testkit::{
    Driver, Image, Rig, RigConfig, clear_unit_attention, random_bytes, read_block, wait_for,
};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn sd_attaches_to_every_disk_up_to_target_64_and_io_is_byte_exact() {
    let rig = Rig::start(RigConfig::pvscsi(vec![
        (16_384, 0, 0),
        (4096, 17, 0),
        (4096, 64, 0),
    ]));
    let log = rig.log();
    assert!(
        log.iter()
            .any(|l| l.contains("VMware PVSCSI") && l.contains("target ids 0..64")),
        "the attach line names the family and the 65 target ids: {log:?}"
    );
    for (i, &(t, l)) in rig.addrs.iter().enumerate() {
        let disk = rig
            .sd
            .disk(u32::from(t), u64::from(l))
            .unwrap_or_else(|| panic!("no disk at target {t}: {log:?}"));
        assert!(disk.tagged, "tagged-qing is 1: sd keeps its queue depth");
        assert_eq!(disk.blocks, rig.images[i].blocks);
        assert_eq!(
            disk.read(0, 4096).expect("read"),
            rig.images[i].expected(0, 8)
        );
    }
    let disk = rig.sd.disk(0, 0).expect("target 0");
    assert_eq!(disk.max_xfer, 127 * 4096, "dma-max: 127 pages");
    // Small, multi-segment, the largest transfer, and more than it.
    let mut lba = 64u64;
    for (n, len) in [512usize, 8192, 65536, disk.max_xfer, 1 << 20, 3 << 20]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(n as u64 + 11, len);
        disk.write(lba, &data)
            .unwrap_or_else(|e| panic!("write {len} at {lba}: {e}"));
        assert_eq!(disk.read(lba, len).expect("read back"), data, "{len} bytes");
        assert_eq!(
            rig.images[0].read(lba * 512, len),
            data,
            "image, {len} bytes"
        );
        lba += (len as u64).div_ceil(512) + 8;
    }
    // The neighbours of what was written are untouched.
    assert_eq!(
        rig.images[0].read(63 * 512, 512),
        rig.images[0].expected(63, 1)
    );
    rig.finish_clean();
}

#[test]
fn every_interrupt_mode_moves_data_msi_fixed_and_polled() {
    for (mode, name) in [("msi", "MSI"), ("fixed", "fixed"), ("poll", "polled")] {
        let rig = Rig::start(RigConfig {
            interrupts: mode.into(),
            ..RigConfig::pvscsi(vec![(4096, 3, 0)])
        });
        let log = rig.log();
        assert!(
            log.iter()
                .any(|l| l.contains("VMware PVSCSI") && l.contains(&format!("{name} interrupts"))),
            "interrupt-type={mode}: {log:?}"
        );
        let disk = rig.disk0();
        let data = random_bytes(5, 65536);
        disk.write(100, &data).expect("write");
        assert_eq!(disk.read(100, 65536).expect("read"), data, "{mode}");
        rig.finish_clean();
    }
}

/// A pvscsi rig whose one disk (4096 blocks at target 0) answers every
/// read and write after `latency`, reached without a target driver.
fn slow_rig(latency: Duration) -> Rig {
    Rig::start(RigConfig {
        images: vec![(4096, 0, 0)],
        blank_images: true,
        null_latency_ns: Some(latency.as_nanos() as u64),
        driver: Driver::Recorder,
        ..RigConfig::pvscsi(Vec::new())
    })
}

#[test]
fn sixty_four_commands_wait_in_the_device_on_one_lun_at_once() {
    let rig = slow_rig(Duration::from_millis(300));
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let hold = rig.bed().machine.hold_interrupts();
    let pkts: Vec<_> = (0..64).map(|i| read_block(&dev, i)).collect();
    for (i, p) in pkts.iter().enumerate() {
        assert_eq!(
            p.start_async(),
            ffi::TRAN_ACCEPT,
            "command {i} accepted, not busy"
        );
    }
    assert!(
        pkts.iter().all(|p| !p.is_done()),
        "none completed with interrupts held"
    );
    drop(hold);
    for p in pkts {
        assert!(p.wait(Duration::from_secs(30)), "completes");
        let r = p.result();
        assert_eq!((r.reason, r.status()), (ffi::CMD_CMPLT, 0), "{r:?}");
        assert_eq!(p.resid(), 0, "QEMU's dataLen 0 on success is no residual");
        p.destroy();
    }
    rig.finish_clean();
}

#[test]
fn a_command_past_pkt_time_is_aborted_with_abort_cmd_and_ends_cmd_timeout() {
    let rig = slow_rig(Duration::from_secs(3));
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let mut p = read_block(&dev, 10);
    p.set_time(1);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(
        p.wait(Duration::from_secs(30)),
        "the timed-out command completes"
    );
    let r = p.result();
    assert_eq!(r.reason, ffi::CMD_TIMEOUT, "{r:?}");
    assert_eq!(
        r.statistics,
        PktStatistics::TIMEOUT | PktStatistics::ABORTED,
        "ABORT_CMD ended it (QEMU: ABORTQUEUE): {r:?}"
    );
    assert_eq!(p.comp_calls(), 1, "completed exactly once");
    p.destroy();
    let probes = &rig.bed().machine.probes;
    assert!(
        wait_for(Duration::from_secs(10), || probes
            .firings("rvscsi-cmd-abort")
            .iter()
            .any(|f| f.args[3] == 1)),
        "the abort worked: {:?}",
        probes.firings("rvscsi-cmd-abort")
    );
    // The LUN still works, and no reset was needed.
    let p = read_block(&dev, 11);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(20)));
    assert_eq!(
        (p.result().reason, p.result().status()),
        (ffi::CMD_CMPLT, 0)
    );
    p.destroy();
    assert!(!rig.log().iter().any(|l| l.contains("resetting the device")));
    rig.finish_clean();
}

#[test]
fn reset_all_resets_the_adapter_ends_what_was_in_flight_and_io_goes_on() {
    // The held reads must still be in the device when each reset comes: 1 s
    // was once not enough on a loaded machine (two cores, a build beside).
    let rig = slow_rig(Duration::from_secs(3));
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let held: Vec<_> = (0..4).map(|i| read_block(&dev, i)).collect();
    for p in &held {
        assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    }
    // A LUN reset (RESET_DEVICE of the LUN) ends what it had in flight.
    assert_eq!(dev.reset(ffi::RESET_LUN), 1, "RESET_DEVICE of the LUN");
    let ended_by_reset = |pkts: Vec<rvscsi_emu::Packet>, what: &str| {
        for p in pkts {
            assert!(p.wait(Duration::from_secs(30)), "ended by {what}");
            let r = p.result();
            assert_eq!(r.reason, ffi::CMD_RESET, "{what}: {r:?}");
            assert_eq!(p.comp_calls(), 1, "completed exactly once");
            p.destroy();
        }
    };
    ended_by_reset(held, "the LUN reset");
    // The reset's unit attention (29/00) is the target driver's to clear.
    clear_unit_attention(&dev);
    assert_eq!(dev.reset(ffi::RESET_TARGET), 1, "RESET_DEVICE of LUN 0");
    clear_unit_attention(&dev);
    // The whole adapter, with commands in flight.
    let more: Vec<_> = (10..14).map(|i| read_block(&dev, i)).collect();
    for p in &more {
        assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    }
    assert_eq!(
        dev.reset(ffi::RESET_ALL),
        1,
        "ADAPTER_RESET and the rings again"
    );
    ended_by_reset(more, "the adapter reset");
    assert!(rig.log().iter().any(|l| l.contains("resetting the device")));
    // The rings were set up again: commands go on.
    clear_unit_attention(&dev);
    for lba in [100, 101] {
        let p = read_block(&dev, lba);
        assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
        assert!(p.wait(Duration::from_secs(20)));
        assert_eq!(
            (p.result().reason, p.result().status()),
            (ffi::CMD_CMPLT, 0)
        );
        p.destroy();
    }
    rig.finish_clean();
}

#[test]
fn a_direction_that_contradicts_the_cdb_is_refused_before_the_device_sees_it() {
    let rig = Rig::start(RigConfig {
        driver: Driver::Recorder,
        ..RigConfig::pvscsi(vec![(4096, 0, 0)])
    });
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    // READ(10) of one block into a buffer bound for the device to read.
    let mut p = dev
        .init_pkt(
            Some(Arc::new(rvscsi_emu::DataBuf::new(512, 0, false))),
            rvscsi_emu::InitArgs::default(),
        )
        .expect("packet");
    let cdb = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0];
    p.cdb_mut().copy_from_slice(&cdb);
    assert_eq!(
        p.start_async(),
        ffi::TRAN_BADPKT,
        "QEMU would lose it, and abort on the next adapter reset"
    );
    p.destroy();
    // An adapter reset now is safe (QEMU's pending queue is empty).
    assert_eq!(dev.reset(ffi::RESET_ALL), 1);
    let p = read_block(&dev, 1);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(20)));
    assert_eq!(p.result().reason, ffi::CMD_CMPLT);
    p.destroy();
    rig.finish_clean();
}

#[test]
fn a_hot_plugged_disk_appears_and_a_removed_one_goes_from_the_message_ring() {
    let rig = Rig::start(RigConfig::pvscsi(vec![(2048, 0, 0), (2048, 1, 0)]));
    let names = |rig: &Rig| -> Vec<String> {
        let mut v: Vec<_> = rig
            .sd
            .disks()
            .iter()
            .filter(|d| !d.is_gone())
            .map(|d| d.name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&rig), ["c0t0d0", "c0t1d0"]);
    let img = Image::patterned(&rig.dir.path("new.img"), 91, 4096);
    rig.hot_plug("hd40", &img.path, 40, 0);
    assert!(
        wait_for(Duration::from_secs(30), || names(&rig)
            .contains(&"c0t40d0".to_string())),
        "target 40 attached: {:?} {:?}",
        names(&rig),
        rig.log()
    );
    assert_eq!(
        rig.sd.disk(40, 0).unwrap().read(8, 1024).unwrap(),
        img.expected(8, 2)
    );
    assert!(
        rig.log().iter().any(|l| l.contains("target 40 appeared")),
        "{:?}",
        rig.log()
    );
    let gone = rig.sd.disk(1, 0).unwrap();
    rig.qmp("device_del", json!({"id": "hd1"}));
    rig.bed()
        .machine
        .with_qemu(|q| q.wait_qmp_event("DEVICE_DELETED", Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || gone.is_gone()),
        "target 1 removed: {:?}",
        rig.log()
    );
    assert!(rig.log().iter().any(|l| l.contains("target 1 removed")));
    assert_eq!(
        rig.sd.disk(0, 0).unwrap().read(5, 512).unwrap(),
        rig.images[0].expected(5, 1)
    );
    rig.finish_clean();
}

#[test]
fn detach_waits_for_a_command_out_then_the_hba_attaches_again_and_quiesce_masks_the_device() {
    let mut rig = slow_rig(Duration::from_millis(1500));
    let dev = rig.recorder.devices().remove(0);
    clear_unit_attention(&dev);
    let held = read_block(&dev, 7);
    assert_eq!(held.start_async(), ffi::TRAN_ACCEPT);
    let bed = rig.bed.as_mut().expect("attached");
    let e = bed.detach_nodes().expect_err("detach with a command out");
    assert!(e.0.contains("detach of iport0 failed"), "{e}");
    assert!(held.wait(Duration::from_secs(20)), "the command completes");
    assert_eq!(
        (held.result().reason, held.result().status()),
        (ffi::CMD_CMPLT, 0)
    );
    assert_eq!(held.comp_calls(), 1);
    held.destroy();
    let bed = rig.bed.as_mut().expect("attached");
    let report = bed.detach_nodes().expect("detach once idle");
    assert!(report.is_clean(), "{report:?}");
    // The same device again: a new instance with its rings set up anew.
    bed.reattach().expect("re-attach");
    let dev = rig.recorder.devices().pop().expect("the LUN again");
    clear_unit_attention(&dev);
    let p = read_block(&dev, 8);
    assert_eq!(p.start_async(), ffi::TRAN_ACCEPT);
    assert!(p.wait(Duration::from_secs(20)));
    assert_eq!(p.result().reason, ffi::CMD_CMPLT);
    p.destroy();
    // quiesce(9E): ADAPTER_RESET and every interrupt masked.
    let m = rig.bed().machine.clone();
    let bar0 = m.bar(0).expect("BAR 0");
    let mask = || m.qt.readl(bar0.addr + 0x2010).expect("INTR_MASK");
    assert_ne!(mask(), 0, "interrupts enabled while running");
    assert_eq!(rig.bed().quiesce(), ffi::DDI_SUCCESS);
    assert_eq!(mask(), 0, "masked by quiesce");
    rig.finish_clean();
}
