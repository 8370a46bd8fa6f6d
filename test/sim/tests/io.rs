//! Byte-exact I/O through the driver on QEMU's virtio-scsi: sizes from one
//! block to the largest transfer, partial-DMA windows, several targets and
//! LUNs, both transports, every interrupt mode.

use rvscsi_sim::testkit::{Rig, RigConfig, random_bytes};

#[test]
fn reads_return_the_image_and_writes_reach_it_from_512_bytes_to_the_largest_transfer() {
    // 64 MiB: room for the largest transfer QEMU allows (max_sectors
    // 65535 x 512 bytes).
    let rig = Rig::start(RigConfig {
        images: vec![(131_072, 0, 0)],
        ..RigConfig::default()
    });
    let disk = rig.disk0();
    let img = &rig.images[0];
    assert_eq!(disk.max_xfer, 65535 * 512, "dma-max follows max_sectors");
    // Reads of the pristine image.
    for (lba, len) in [(0u64, 512usize), (7, 4096), (100, 65536), (1000, 1 << 20)] {
        let got = disk
            .read(lba, len)
            .unwrap_or_else(|e| panic!("read {len} at {lba}: {e}"));
        assert_eq!(
            got,
            img.expected(lba, len as u64 / 512),
            "read of {len} bytes at block {lba}"
        );
    }
    // Writes, then read back, and the image file itself.
    let sizes = [512usize, 4096, 65536, 1 << 20, disk.max_xfer];
    let mut lba = 4096u64;
    for (i, &len) in sizes.iter().enumerate() {
        let data = random_bytes(i as u64 + 7, len);
        disk.write(lba, &data)
            .unwrap_or_else(|e| panic!("write {len} at {lba}: {e}"));
        assert_eq!(
            disk.read(lba, len).expect("read back"),
            data,
            "read back {len} bytes"
        );
        assert_eq!(
            img.read(lba * 512, len),
            data,
            "image file after writing {len} bytes"
        );
        lba += (len as u64).div_ceil(512) + 8;
    }
    // Neighbours untouched.
    assert_eq!(img.read(4095 * 512, 512), img.expected(4095, 1));
    rig.finish_clean();
}

#[test]
fn buffers_larger_than_the_scatter_gather_list_go_in_several_windows() {
    let rig = Rig::start(RigConfig {
        images: vec![(16_384, 0, 0)],
        ..RigConfig::default()
    });
    let disk = rig.disk0();
    let before = disk.commands.load(std::sync::atomic::Ordering::Relaxed);
    // 4 MiB on scattered 4 KiB pages: 1024 cookies against 254 segments.
    let data = random_bytes(99, 4 << 20);
    disk.write(64, &data).expect("write 4 MiB");
    let windows = disk.commands.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        windows >= 4,
        "4 MiB in 254-cookie windows takes at least 4 commands, took {windows}"
    );
    assert_eq!(disk.read(64, 4 << 20).expect("read back"), data);
    assert_eq!(rig.images[0].read(64 * 512, 4 << 20), data);
    rig.finish_clean();
}

#[test]
fn several_targets_and_luns_each_reach_their_own_image() {
    let layout = [
        (2048u64, 0u8, 0u16),
        (2048, 0, 1),
        (4096, 2, 0),
        (2048, 5, 3),
    ];
    let rig = Rig::start(RigConfig {
        images: layout.to_vec(),
        ..RigConfig::default()
    });
    let names: Vec<String> = rig.sd.disks().iter().map(|d| d.name()).collect();
    assert_eq!(names, ["c0t0d0", "c0t0d1", "c0t2d0", "c0t5d3"]);
    for (i, &(blocks, t, l)) in layout.iter().enumerate() {
        let d = rig.sd.disk(u32::from(t), u64::from(l)).expect("disk");
        assert_eq!(d.blocks, blocks);
        let data = random_bytes(1000 + i as u64, 8192);
        d.write(16, &data).expect("write");
        assert_eq!(d.read(0, 512).expect("read"), rig.images[i].expected(0, 1));
    }
    for (i, img) in rig.images.iter().enumerate() {
        assert_eq!(
            img.read(16 * 512, 8192),
            random_bytes(1000 + i as u64, 8192),
            "image {i} got its own data"
        );
        assert_eq!(
            img.read(15 * 512, 512),
            img.expected(15, 1),
            "image {i}: the block before is untouched"
        );
    }
    rig.finish_clean();
}

/// One attach with the given transport and interrupt setting: I/O works,
/// the driver says which interrupts it ended up with, detach is clean.
fn run_mode(transport: &str, interrupts: &str, vectors: Option<u32>, expect: &str) {
    let rig = Rig::start(RigConfig {
        transport: transport.into(),
        interrupts: interrupts.into(),
        msix_vectors: vectors,
        ..RigConfig::default()
    });
    let line = rig
        .log()
        .into_iter()
        .find(|l| l.starts_with("virtio-scsi"))
        .expect("the attach line");
    assert!(line.contains(&format!("{transport} transport")), "{line}");
    assert!(
        line.contains(&format!("{expect} interrupts")),
        "asked {interrupts} with {vectors:?} vectors, got: {line}"
    );
    let disk = rig.disk0();
    let data = random_bytes(5, 256 << 10);
    disk.write(100, &data).expect("write");
    assert_eq!(disk.read(100, 256 << 10).expect("read"), data);
    assert_eq!(rig.images[0].read(100 * 512, 256 << 10), data);
    let delivered = rig.bed().machine.snapshot().interrupts;
    if expect == "polled" {
        assert_eq!(delivered, 0, "polled mode takes no interrupts");
    } else {
        assert!(delivered > 0, "{expect} interrupts were delivered");
    }
    rig.finish_clean();
}

#[test]
fn legacy_transport_in_every_interrupt_mode() {
    run_mode("legacy", "msix", None, "MSI-X");
    run_mode("legacy", "fixed", None, "fixed");
    run_mode("legacy", "poll", None, "polled");
}

#[test]
fn modern_transport_in_every_interrupt_mode() {
    run_mode("modern", "msix", None, "MSI-X");
    run_mode("modern", "fixed", None, "fixed");
    run_mode("modern", "poll", None, "polled");
}

#[test]
fn interrupt_fallbacks() {
    // virtio-pci has no MSI capability: asking for MSI ends with fixed.
    run_mode("modern", "msi", None, "fixed");
    // A device without MSI-X: the default order falls back to fixed.
    run_mode("legacy", "auto", Some(0), "fixed");
    // Fewer MSI-X vectors than sources: one shared vector.
    run_mode("modern", "msix", Some(2), "MSI-X");
}

#[test]
fn a_tunable_value_the_driver_does_not_know_is_reported_and_the_default_used() {
    let rig = Rig::start(RigConfig {
        transport: "modren".into(),
        interrupts: "msx".into(),
        ..RigConfig::default()
    });
    let log = rig.log();
    assert!(
        log.iter()
            .any(|l| l.contains("virtio-transport \"modren\" is not auto, legacy or modern")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("interrupt-type \"msx\" is not auto, msix, msi, fixed or poll")),
        "{log:#?}"
    );
    let line = log
        .iter()
        .find(|l| l.starts_with("virtio-scsi"))
        .expect("attached");
    assert!(
        line.contains("modern transport") && line.contains("MSI-X interrupts"),
        "{line}"
    );
    let disk = rig.disk0();
    let data = random_bytes(11, 8192);
    disk.write(3, &data).expect("write");
    assert_eq!(disk.read(3, 8192).expect("read"), data);
    rig.finish_clean();
}

#[test]
fn every_command_fires_the_start_and_done_probes_once_with_its_packet() {
    let rig = Rig::start(RigConfig::default());
    let probes = &rig.bed().machine.probes;
    probes.clear();
    let disk = rig.disk0();
    let data = random_bytes(21, 64 << 10);
    for i in 0..8u64 {
        disk.write(i * 128, &data).expect("write");
        assert_eq!(disk.read(i * 128, data.len()).expect("read"), data);
    }
    let starts = probes.firings("rvscsi-cmd-start");
    let dones = probes.firings("rvscsi-cmd-done");
    assert!(starts.len() >= 16, "{} starts", starts.len());
    assert_eq!(starts.len(), dones.len(), "one done per start");
    // Packets are reused from the cache, so compare in order: each start is
    // followed by the done of the same packet before the packet starts again.
    let mut open: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut all: Vec<(usize, bool, u64)> = Vec::new();
    for (i, f) in starts.iter().enumerate() {
        all.push((i, true, f.args[0]));
        assert_eq!((f.args[1], f.args[2]), (0, 0), "target 0 LUN 0");
    }
    for (i, f) in dones.iter().enumerate() {
        all.push((i, false, f.args[0]));
        assert_eq!(f.args[1], u64::from(rvscsi::ffi::CMD_CMPLT), "{f:?}");
        assert_eq!(f.args[2], 0, "GOOD status");
    }
    for f in &starts {
        *open.entry(f.args[0]).or_default() += 1;
    }
    for f in &dones {
        let n = open
            .get_mut(&f.args[0])
            .expect("a done for a started packet");
        *n -= 1;
    }
    assert!(open.values().all(|&n| n == 0), "every start has its done");
    rig.finish_clean();
}
