//! The shipped binary at work: the module object `pkg/build.sh` builds
//! (`target/kernel/rvscsi`: the C shim and the Rust library compiled for the
//! kernel target, linked with `ld -r`) is loaded under krtld's rules by
//! `rvscsi-loader`, installed through its own `_init`, attached to QEMU's
//! virtio-scsi through its own `dev_ops`, and used like a disk driver:
//! format, data both ways, detach, `_fini`, unload, and again.

use rvscsi_loader::{Kernel, Module};
use rvscsi_sim::cli::format_listing;
use rvscsi_sim::testkit::{Binding, Rig, RigConfig, random_bytes};
use std::path::PathBuf;
use std::sync::Mutex;

/// One module load at a time: each test below installs it, and the
/// emulated module framework is process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn module_path() -> PathBuf {
    std::env::var_os("RVSCSI_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/kernel/rvscsi")
        })
}

/// modload of the built module, probes enabled as a DTrace consumer would.
fn load() -> Module {
    let path = module_path();
    assert!(
        path.exists(),
        "{} is missing: pkg/build.sh (test/run.sh runs it first) builds the module",
        path.display()
    );
    let mut m =
        Module::load_file(&path, &Kernel::test_bed()).unwrap_or_else(|e| panic!("load: {e}"));
    assert_eq!(m.depends_on(), ["misc/scsi"]);
    let enabled = m.enable_probes().expect("enable probes");
    assert!(enabled >= 5, "every probe site has a recorder: {enabled}");
    m.init().unwrap_or_else(|e| panic!("_init: {e}"));
    assert_ne!(m.info().expect("_info"), 0, "_info succeeds");
    m
}

fn exercise(module: &Module, transport: &str) {
    let rig = Rig::start(RigConfig {
        images: vec![(16_384, 0, 0), (8192, 2, 0), (8192, 2, 5)],
        transport: transport.into(),
        binding: Binding::DevOps(module.dev_ops().expect("installed")),
        ..RigConfig::default()
    });
    let line = rig
        .log()
        .into_iter()
        .find(|l| l.starts_with("virtio-scsi"))
        .expect("the module's attach line");
    assert!(line.contains(&format!("{transport} transport")), "{line}");
    // format: every LUN, as sd sees it.
    let listing = format_listing(&rig.sd.disks());
    assert_eq!(
        listing,
        "c0t0d0 QEMU QEMU HARDDISK 16384 x 512\n\
         c0t2d0 QEMU QEMU HARDDISK 8192 x 512\n\
         c0t2d5 QEMU QEMU HARDDISK 8192 x 512\n",
        "{transport}"
    );
    // Reads return what the image holds; writes reach the image.
    for (i, disk) in rig.sd.disks().iter().enumerate() {
        let img = &rig.images[i];
        assert_eq!(
            disk.read(64, 128 << 10).expect("read"),
            img.expected(64, 256),
            "{transport} disk {i}: read"
        );
        let data = random_bytes(i as u64 + 100, 256 << 10);
        disk.write(1000, &data).expect("write");
        assert_eq!(
            img.read(1000 * 512, data.len()),
            data,
            "{transport} disk {i}: image after write"
        );
        assert_eq!(disk.read(1000, data.len()).expect("read back"), data);
    }
    // The module's probe sites fired into the test bed's recorder.
    let probes = &rig.bed().machine.probes;
    let (starts, dones) = (
        probes.count("rvscsi-cmd-start"),
        probes.count("rvscsi-cmd-done"),
    );
    assert!(
        starts > 10 && starts == dones,
        "start {starts}, done {dones}"
    );
    assert!(rig.bed().machine.violations().is_empty());
    rig.finish_clean();
}

#[test]
fn the_built_module_attaches_to_both_transports_moves_data_and_unloads_clean() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = load();
    exercise(&m, "legacy");
    exercise(&m, "modern");
    assert_eq!(m.fini().expect("_fini"), 0, "unloads once detached");
    drop(m);
}

#[test]
fn fini_is_refused_while_attached_and_the_same_object_loads_again() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = load();
    let rig = Rig::start(RigConfig {
        binding: Binding::DevOps(m.dev_ops().expect("installed")),
        ..RigConfig::default()
    });
    assert_eq!(m.fini().expect("_fini"), rvscsi_emu::ddi::modctl::EBUSY);
    let disk = rig.disk0();
    let data = random_bytes(7, 64 << 10);
    disk.write(8, &data)
        .expect("write while a _fini was refused");
    assert_eq!(disk.read(8, data.len()).expect("read"), data);
    // quiesce(9E) through the module's dev_ops (fast reboot), then detach.
    assert_eq!(rig.bed().quiesce(), rvscsi::ffi::DDI_SUCCESS);
    rig.finish_clean();
    assert_eq!(m.fini().expect("_fini"), 0);
    drop(m);
    // A fresh load of the same bytes: new memory, statics as in the file.
    let mut again = load();
    exercise(&again, "modern");
    assert_eq!(again.fini().expect("_fini"), 0);
}
