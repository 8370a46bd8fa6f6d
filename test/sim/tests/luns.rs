//! LUNs across the whole single-level space virtio-scsi can address
//! (virtio 1.2 §5.6.6.1: 16384 LUNs per target): each attaches, is named
//! as illumos names it, and carries I/O to the right disk.
//!
//! What QEMU reports and how illumos names it, computed here from the
//! sources rather than from the driver or the test bed:
//! - QEMU's REPORT LUNS (`hw/scsi/scsi-bus.c`, `store_lun`): LUN < 256 in
//!   the peripheral device addressing method (`00 LL`), LUN >= 256 in the
//!   flat space method (`40|HH LL`), the other six bytes zero.
//! - illumos (`usr/src/common/devid/devid_scsi.c`, `scsi_lun_to_lun64`):
//!   a single-level peripheral LUN keeps its SCSI-2 compatible value;
//!   anything else, flat space included, the whole 8-byte LUN as a
//!   big-endian 64-bit number. The child is named `"%s,%" PRIx64` of the
//!   target address and that value (`scsi_hba.c`, `scsi_lunmap_set_add`)
//!   and decorated with `target`, `target-port`, `lun64` and, below 32,
//!   `lun` (`scsi_hba.c`, `scsi_hba_ua_set`).

use rvscsi_emu::ddi::devinfo::{Prop, node};
use rvscsi_sim::testkit::{Image, Rig, RigConfig};

/// LUN 0 and 255 (peripheral form), 256 and 16383 (flat space, the first
/// and the last LUN above the peripheral range).
const LUNS: [u16; 4] = [0, 255, 256, 16383];

/// The `lun64` illumos gives the LUN QEMU reports as `lun`.
fn framework_lun64(lun: u16) -> u64 {
    let reported: [u8; 8] = if lun < 256 {
        [0, lun as u8, 0, 0, 0, 0, 0, 0]
    } else {
        [0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0, 0, 0]
    };
    if reported[0] & 0xc0 == 0 && reported[2..].iter().all(|&b| b == 0) {
        (u64::from(reported[0] & 0x3f) << 8) | u64::from(reported[1])
    } else {
        u64::from_be_bytes(reported)
    }
}

#[test]
fn the_lun64_values_are_the_ones_illumos_computes() {
    // Written out, so that a slip in framework_lun64 shows.
    assert_eq!(framework_lun64(0), 0);
    assert_eq!(framework_lun64(255), 0xff);
    assert_eq!(framework_lun64(256), 0x4100_0000_0000_0000);
    assert_eq!(framework_lun64(16383), 0x7fff_0000_0000_0000);
}

fn int_prop(p: Option<&Prop>) -> Option<i64> {
    match p {
        Some(Prop::Int(v)) => Some(i64::from(*v)),
        Some(Prop::Int64(v)) => Some(*v),
        _ => None,
    }
}

#[test]
fn luns_0_to_16383_attach_are_named_as_illumos_names_them_and_carry_io() {
    const TARGET: u8 = 3;
    let rig = Rig::start(RigConfig {
        images: LUNS.iter().map(|&l| (2048, TARGET, l)).collect(),
        ..RigConfig::default()
    });
    let disks = rig.sd.disks();
    assert_eq!(
        disks.len(),
        LUNS.len(),
        "every LUN the hypervisor offers attaches; log: {:?}",
        rig.log()
    );
    for (i, &lun) in LUNS.iter().enumerate() {
        let lun64 = framework_lun64(lun);
        let disk = rig
            .sd
            .disk(u32::from(TARGET), lun64)
            .unwrap_or_else(|| panic!("LUN {lun} (lun64 {lun64:#x}) has no disk"));
        // The child's name and properties, as scsi_hba.c makes them.
        let n = node(disk.dev.node, "luns test").expect("the LUN's node");
        let ua = n.unit_address().expect("a unit address").to_str().unwrap();
        assert_eq!(ua, format!("{TARGET:x},{lun64:x}"), "LUN {lun}");
        let props = n.props.lock().unwrap();
        assert_eq!(
            int_prop(props.get("lun64")),
            Some(lun64 as i64),
            "LUN {lun}"
        );
        assert_eq!(
            int_prop(props.get("lun")),
            (lun64 < 32).then_some(lun64 as i64),
            "LUN {lun}: `lun` exists only below 32"
        );
        assert_eq!(int_prop(props.get("target")), Some(i64::from(TARGET)));
        assert_eq!(
            props.get("target-port"),
            Some(&Prop::Str(format!("{TARGET:x}")))
        );
        drop(props);
        // The data are this LUN's own: a read of its image, then a write
        // that lands in its image file and nowhere else.
        let img: &Image = &rig.images[i];
        assert!(
            disk.read(7, 2 * 512).unwrap() == img.expected(7, 2),
            "LUN {lun} reads its own image"
        );
        let mark: Vec<u8> = (0..1024).map(|b| (b as u8) ^ (i as u8 + 1)).collect();
        disk.write(100, &mark).unwrap();
        assert!(
            disk.read(100, 1024).unwrap() == mark,
            "LUN {lun} reads back"
        );
        assert!(
            img.read(100 * 512, 1024) == mark,
            "LUN {lun}'s write lands in its image"
        );
    }
    // No write went to another LUN's image.
    for (i, img) in rig.images.iter().enumerate() {
        for (j, _) in LUNS.iter().enumerate().filter(|&(j, _)| j != i) {
            let other: Vec<u8> = (0..1024).map(|b| (b as u8) ^ (j as u8 + 1)).collect();
            assert!(img.read(100 * 512, 1024) != other);
        }
    }
    rig.finish_clean();
}

#[test]
fn a_lun_above_255_hot_plugged_behind_a_known_target_appears() {
    let rig = Rig::start(RigConfig::default());
    let img = Image::patterned(&rig.dir.path("lun300.img"), 91, 2048);
    rig.hot_plug("hd300", &img.path, 0, 300);
    let lun64 = framework_lun64(300);
    rvscsi_sim::testkit::wait_until("LUN 300", std::time::Duration::from_secs(20), || {
        rig.sd.disk(0, lun64).is_some()
    });
    let d = rig.sd.disk(0, lun64).unwrap();
    assert!(d.read(3, 512).unwrap() == img.expected(3, 1));
    rig.finish_clean();
}
