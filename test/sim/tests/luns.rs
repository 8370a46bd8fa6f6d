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
use rvscsi_sim::testkit::{Binding, Image, Rig, RigConfig};

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

/// devfsadm's names for sd's `DDI_NT_BLOCK_CHAN` disks (`disk_link.c`,
/// `disk_callback_chan`: `sscanf(addr, "%X,%X")` into `uint_t`s, libc's
/// scan keeping the low 32 bits, then `"t%dd%d"`), written out.
#[test]
fn devfsadm_names_disks_in_decimal_from_the_low_32_bits() {
    use rvscsi_sim::sd::devfsadm_chan_name as name;
    assert_eq!(name("0,0"), "c0t0d0");
    assert_eq!(name("a,1f"), "c0t10d31", "decimal");
    assert_eq!(name("ff,102"), "c0t255d258");
    // Every flat-space LUN of a target is its LUN 0 to devfsadm.
    assert_eq!(name("3,4100000000000000"), name("3,0"));
    assert_eq!(name("3,7fff000000000000"), "c0t3d0");
    assert_eq!(name("3,4100000000000001"), "c0t3d1");
    assert_eq!(name("3,80000000"), "c0t3d-2147483648", "%d of a uint_t");
    assert_eq!(name("w5000c500,0"), "c0t0d0", "no digit: targ stays 0");
}

#[test]
fn luns_0_to_16383_attach_are_named_as_illumos_names_them_and_carry_io() {
    every_lun_attaches_named_and_carrying_io(Binding::Library);
}

/// The same through the C shim's dev_ops and scsi_hba_tran vectors.
#[test]
fn luns_0_to_16383_attach_through_the_c_shim_too() {
    every_lun_attaches_named_and_carrying_io(Binding::Shim);
}

fn every_lun_attaches_named_and_carrying_io(binding: Binding) {
    const TARGET: u8 = 3;
    let rig = Rig::start(RigConfig {
        images: LUNS.iter().map(|&l| (2048, TARGET, l)).collect(),
        binding,
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
        // The /dev/dsk name, as devfsadm's disk_callback_chan makes it
        // for sd's DDI_NT_BLOCK_CHAN nodes: sscanf("%X,%X") into
        // uint_ts keeps the low 32 bits of the lun64, printed "t%dd%d".
        // Every flat-space LUN is "d0": LUN 256 and 16383 share LUN 0's
        // name, and the driver says so once per unit address.
        let dev_name = if lun < 256 {
            format!("c0t{TARGET}d{lun}")
        } else {
            format!("c0t{TARGET}d0")
        };
        assert_eq!(disk.name(), dev_name, "LUN {lun}");
        let flat_warnings = rig
            .log()
            .iter()
            .filter(|l| {
                l.starts_with(&format!("@{ua}: "))
                    && l.contains(&format!("/dev/dsk name c#t{TARGET}d0"))
                    && l.ends_with(&format!("/disk@{ua}"))
            })
            .count();
        assert_eq!(
            flat_warnings,
            usize::from(lun >= 256),
            "LUN {lun}: one naming warning for a flat-space LUN; log: {:?}",
            rig.log()
        );
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
    // LUN 0 and LUN 256 of the target share one /dev/dsk name, so
    // format(8) lists it three times (LUN 0, 256, 16383) and the name
    // leads to one of them only.
    let lun0 = rig.sd.disk(u32::from(TARGET), 0).unwrap();
    let lun256 = rig
        .sd
        .disk(u32::from(TARGET), framework_lun64(256))
        .unwrap();
    assert_eq!(lun0.name(), lun256.name());
    assert_eq!(lun0.name(), format!("c0t{TARGET}d0"));
    let same_name = rig
        .sd
        .disks()
        .iter()
        .filter(|d| d.name() == lun0.name())
        .count();
    assert_eq!(same_name, 3);
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
fn a_lun_above_255_hot_plugged_behind_a_known_target_appears_and_goes() {
    let rig = Rig::start(RigConfig::default());
    let img = Image::patterned(&rig.dir.path("lun300.img"), 91, 2048);
    rig.hot_plug("hd300", &img.path, 0, 300);
    let lun64 = framework_lun64(300);
    rvscsi_sim::testkit::wait_until("LUN 300", std::time::Duration::from_secs(20), || {
        rig.sd.disk(0, lun64).is_some()
    });
    let d = rig.sd.disk(0, lun64).unwrap();
    assert!(d.read(3, 512).unwrap() == img.expected(3, 1));
    // And it goes when it is unplugged, LUN 0 staying.
    rig.qmp("device_del", rvscsi_qtest::json!({"id": "hd300"}));
    rvscsi_sim::testkit::wait_until(
        "LUN 300 removed",
        std::time::Duration::from_secs(20),
        || rig.sd.disk(0, lun64).is_none(),
    );
    assert!(d.is_gone());
    assert!(rig.disk0().read(0, 512).unwrap() == rig.images[0].expected(0, 1));
    rig.finish_clean();
}

/// A LUN the driver cannot address reaches tran_tgt_init only by name
/// (QEMU reports none): BUS_CONFIG_ONE of `disk@0,<lun64>`, as opening a
/// `/devices` path does. Each is refused with a warning that says why,
/// and nothing is configured in its place.
#[test]
fn luns_virtio_scsi_cannot_address_are_refused_by_name_never_mapped_elsewhere() {
    let rig = Rig::start(RigConfig::default());
    let dev0 = rig.bed().device(0, 0).expect("LUN 0");
    let iport = node(dev0.node, "luns test").expect("LUN 0's node").parent;
    let map = rvscsi_emu::scsa::tgtmap::map_of_iport(iport).expect("the iport's map");
    for (lun64, why) in [
        ("8001000000000000", "the logical unit addressing method"),
        ("c101000000000000", "an extended addressing method"),
        ("d200100000000000", "an extended addressing method"),
        ("4005400100000000", "a multi-level LUN"),
        ("4100000000000001", "a multi-level LUN"),
        ("100000000", "a multi-level LUN"),
    ] {
        let ua = format!("0,{lun64}");
        assert!(!map.config_one(&ua), "@{ua} must not configure");
        let want = format!(
            "not configuring @{ua}: LUN {:#x} uses {why}",
            u64::from_str_radix(lun64, 16).unwrap()
        );
        assert!(
            rig.log().iter().any(|l| l.contains(&want)),
            "{want:?} in {:?}",
            rig.log()
        );
    }
    // Spellings the framework never writes, other names for LUN 0: the
    // framework itself takes them (scsi_addr_to_lun64 and
    // scsi_hba_ua_set read "00" as 0) and hands them to tran_tgt_init,
    // which refuses them, once each however often they are asked for.
    for ua in ["0,00", "00,0", "0"] {
        let want = format!("not configuring @{ua}: not a target,lun unit address");
        for _ in 0..3 {
            assert!(!map.config_one(ua), "@{ua}");
        }
        let warned = rig.log().iter().filter(|l| l.contains(&want)).count();
        assert_eq!(warned, 1, "{want:?} once in {:?}", rig.log());
    }
    // An uppercase LUN digit is refused before the HBA is asked:
    // scsi_hba_ua_set accepts lowercase digits only.
    assert!(!map.config_one("0,0A"));
    assert!(
        !rig.log().iter().any(|l| l.contains("@0,0A")),
        "{:?}",
        rig.log()
    );
    // And one it can address but that is not there: no disk either.
    assert!(
        !map.config_one("0,4100000000000000"),
        "no LUN 256 on this target"
    );
    assert_eq!(rig.sd.disks().len(), 1, "only LUN 0, under its own name");
    assert_eq!(rig.bed().devices().len(), 1);
    rig.finish_clean();
}

/// BUS_CONFIG_ONE of a LUN whose target the framework has not enumerated
/// yet: `scsi_hba_bus_configone` configures the target's `",0"` itself
/// first (`scsi_hba.c`), then the LUN asked for, unless LUN 0's maxluns
/// filters it.
#[test]
fn config_one_of_a_lun_configures_its_targets_lun_0_first() {
    let rig = Rig::start(RigConfig::default());
    let dev0 = rig.bed().device(0, 0).expect("LUN 0");
    let iport = node(dev0.node, "luns test").expect("LUN 0's node").parent;
    let map = rvscsi_emu::scsa::tgtmap::map_of_iport(iport).expect("the iport's map");
    // The map enumerates nothing while held: target 4 is known only by
    // name.
    map.hold();
    let lun0 = Image::patterned(&rig.dir.path("t4l0.img"), 41, 2048);
    let lun2 = Image::patterned(&rig.dir.path("t4l2.img"), 42, 2048);
    rig.hot_plug("t4l0", &lun0.path, 4, 0);
    rig.hot_plug("t4l2", &lun2.path, 4, 2);
    let lun16 = Image::patterned(&rig.dir.path("t4l16.img"), 43, 2048);
    rig.hot_plug("t4l16", &lun16.path, 4, 16);
    let configured = map.config_one("4,2");
    // LUNs below 32 at or past scsi_get_scsi_maxluns of LUN 0 (16 for
    // QEMU's SPC-3 INQUIRY version 5) are filtered, though LUN 16 is
    // there.
    let filtered = !map.config_one("4,10");
    // (Checked before the map runs again: a rescan may then find it.)
    let lun16_absent = rig.sd.disk(4, 16).is_none();
    map.release();
    assert!(configured, "log: {:?}", rig.log());
    assert!(filtered && lun16_absent, "LUN 16 is filtered by name");
    let d2 = rig.sd.disk(4, 2).expect("LUN 4,2");
    assert!(d2.read(5, 512).unwrap() == lun2.expected(5, 1));
    let d0 = rig.sd.disk(4, 0).expect("LUN 4,0, configured first");
    assert!(d0.read(5, 512).unwrap() == lun0.expected(5, 1));
    rig.finish_clean();
}
