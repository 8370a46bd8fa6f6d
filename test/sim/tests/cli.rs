//! `rvscsi-sim format` and `dd` as an administrator would run them.

use rvscsi_sim::testkit::{Image, TempDir, random_bytes};
use std::process::Command;

fn sim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rvscsi-sim"))
        .args(args)
        .output()
        .expect("run rvscsi-sim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn format_lists_every_disk_with_its_geometry() {
    let dir = TempDir::new("cli-format");
    let a = Image::patterned(&dir.path("a.img"), 1, 4096);
    let b = Image::patterned(&dir.path("b.img"), 2, 20480);
    let (code, out, err) = sim(&[
        "format",
        a.path.to_str().unwrap(),
        &format!("{},target=2,lun=1", b.path.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "c0t0d0 QEMU QEMU HARDDISK 4096 x 512\nc0t2d1 QEMU QEMU HARDDISK 20480 x 512\n"
    );
    // The legacy transport with fixed interrupts finds the same.
    let (code, out2, err) = sim(&[
        "--transport",
        "legacy",
        "--interrupts",
        "intx",
        "format",
        a.path.to_str().unwrap(),
        &format!("{},target=2,lun=1", b.path.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out2, out);
}

#[test]
fn device_pvscsi_formats_and_copies_through_vmware_pvscsi() {
    let dir = TempDir::new("cli-pvscsi");
    let a = Image::patterned(&dir.path("a.img"), 7, 4096);
    let b = Image::patterned(&dir.path("b.img"), 8, 8192);
    let disks = [
        a.path.display().to_string(),
        format!("{},target=40", b.path.display()),
    ];
    let (code, out, err) = sim(&["--device", "pvscsi", "format", &disks[0], &disks[1]]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "c0t0d0 QEMU QEMU HARDDISK 4096 x 512\nc0t40d0 QEMU QEMU HARDDISK 8192 x 512\n"
    );
    let pattern = random_bytes(43, 2 << 20);
    let pfile = dir.path("p.bin");
    std::fs::write(&pfile, &pattern).unwrap();
    let (code, _, err) = sim(&[
        "--device",
        "pvscsi",
        "dd",
        &disks[0],
        &disks[1],
        "--",
        &format!("if={}", pfile.display()),
        "of=/dev/rdsk/c0t40d0",
        "bs=1m",
        "seek=1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("2+0 records in\n2+0 records out\n"),
        "{err}"
    );
    assert!(b.read(1 << 20, 2 << 20) == pattern, "target 40 holds it");
    assert!(
        a.read(0, 4096) == a.expected(0, 8),
        "the other disk is untouched"
    );
    // virtio-scsi's knobs are refused for pvscsi, and unknown devices.
    let (code, _, err) = sim(&[
        "--device",
        "pvscsi",
        "--num-queues",
        "2",
        "format",
        &disks[0],
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pvscsi has neither"), "{err}");
    let (code, _, err) = sim(&["--device", "lsi", "format", &disks[0]]);
    assert_eq!(code, 2);
    assert!(err.contains("neither virtio-scsi nor pvscsi"), "{err}");
}

#[test]
fn dd_writes_a_file_to_the_raw_disk_and_reads_it_back() {
    let dir = TempDir::new("cli-dd");
    let img = Image::patterned(&dir.path("d.img"), 3, 8192);
    let pattern = random_bytes(42, 3 << 20);
    let pfile = dir.path("pattern.bin");
    std::fs::write(&pfile, &pattern).unwrap();
    let back = dir.path("back.bin");
    let disk = img.path.to_str().unwrap();
    let (code, _, err) = sim(&[
        "dd",
        disk,
        "--",
        &format!("if={}", pfile.display()),
        "of=/dev/rdsk/c0t0d0",
        "bs=1m",
        "seek=1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("3+0 records in\n3+0 records out\n3145728 bytes transferred in "),
        "{err}"
    );
    assert!(
        img.read(1 << 20, 3 << 20) == pattern,
        "the image holds the pattern at 1 MiB"
    );
    assert!(
        img.read(0, 512) == img.expected(0, 1),
        "and nothing before it changed"
    );
    let (code, _, err) = sim(&[
        "dd",
        disk,
        "--",
        "if=c0t0d0",
        &format!("of={}", back.display()),
        "bs=64k",
        "skip=16",
        "count=48",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("48+0 records in\n48+0 records out\n"),
        "{err}"
    );
    assert!(
        std::fs::read(&back).unwrap() == pattern,
        "read back through the driver"
    );
    // A partial last record from a short file.
    std::fs::write(&pfile, &pattern[..1536]).unwrap();
    let (code, _, err) = sim(&[
        "dd",
        disk,
        "--",
        &format!("if={}", pfile.display()),
        "of=c0t0d0",
        "bs=1024",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("1+1 records in\n1+1 records out\n1536 bytes"),
        "{err}"
    );
}

#[test]
fn dd_reports_bad_requests_and_io_errors_with_sense_and_offset() {
    let dir = TempDir::new("cli-err");
    let img = Image::patterned(&dir.path("d.img"), 4, 4096);
    let disk = img.path.to_str().unwrap().to_string();
    // The raw device takes whole blocks only.
    let (code, _, err) = sim(&[
        "dd",
        &disk,
        "--",
        "if=c0t0d0",
        "of=/dev/null",
        "bs=1000",
        "count=1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("Invalid argument"), "{err}");
    // A disk that is not there.
    let (code, _, err) = sim(&["dd", &disk, "--", "if=c0t5d0", "of=/dev/null"]);
    assert_eq!(code, 1);
    assert!(err.contains("No such device"), "{err}");
    // Past the end.
    let (code, _, err) = sim(&[
        "dd",
        &disk,
        "--",
        "if=/dev/zero",
        "of=c0t0d0",
        "bs=512",
        "seek=4096",
        "count=1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("No space left on device"), "{err}");
    // Reads of sector 800 fail with EIO (QEMU reports ABORTED COMMAND
    // 00/06), writes of sector 900 with ENOSPC (DATA PROTECT 27/07).
    let rules = dir.path("rules.conf");
    std::fs::write(&rules, "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"800\"\n\n[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nsector = \"900\"\n").unwrap();
    let faulty = format!("blkdebug:{}:{}", rules.display(), disk);
    let (code, _, err) = sim(&[
        "dd",
        &faulty,
        "--",
        "if=c0t0d0",
        "of=/dev/null",
        "bs=4k",
        "skip=99",
        "count=3",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("ABORTED COMMAND (ASC 0x00 ASCQ 0x06)") && err.contains("offset 409600"),
        "{err}"
    );
    let (code, _, err) = sim(&[
        "dd",
        &faulty,
        "--",
        "if=/dev/zero",
        "of=c0t0d0",
        "bs=512",
        "seek=900",
        "count=1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("DATA PROTECT (ASC 0x27 ASCQ 0x07)") && err.contains("offset 460800"),
        "{err}"
    );
    // The neighbouring blocks read fine.
    let out = dir.path("ok.bin");
    let (code, _, err) = sim(&[
        "dd",
        &faulty,
        "--",
        "if=c0t0d0",
        &format!("of={}", out.display()),
        "bs=512",
        "skip=801",
        "count=8",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&out).unwrap() == img.expected(801, 8));
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, err) = sim(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("usage: rvscsi-sim"));
    let (code, _, err) = sim(&["frobnicate", "x.img"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown command"), "{err}");
    let (code, _, err) = sim(&["--interrupts", "carrier-pigeon", "format", "x.img"]);
    assert_eq!(code, 2);
    assert!(err.contains("not one of msix"), "{err}");
    let (code, _, err) = sim(&["dd", "x.img", "--", "if=a"]);
    assert_eq!(code, 2);
    assert!(err.contains("both if= and of="), "{err}");
    let (code, _, err) = sim(&["format", "/nonexistent/disk.img"]);
    assert_eq!(code, 1);
    assert!(err.contains("rvscsi-sim:"), "{err}");
}

#[test]
fn disk_names_parse_like_devfsadm_builds_them() {
    use rvscsi_sim::cli::disk_name;
    let some = |s: &str| Some(s.to_string());
    assert_eq!(disk_name("/dev/rdsk/c0t0d0"), some("c0t0d0"));
    // Decimal, as disk_callback_chan prints them ("t%dd%d").
    assert_eq!(disk_name("c0t10d31"), some("c0t10d31"));
    assert_eq!(disk_name("c0tAd1F"), None, "devfsadm writes no hex");
    assert_eq!(disk_name("/dev/rdsk/c0t2d1p0"), some("c0t2d1"));
    assert_eq!(disk_name("c1t0d0"), None, "one controller");
    assert_eq!(disk_name("/tmp/file"), None);
}

/// The module object `pkg/build.sh` builds.
fn built_module() -> String {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/kernel/rvscsi");
    assert!(
        p.exists(),
        "{} is missing: pkg/build.sh (test/run.sh runs it first) builds the module",
        p.display()
    );
    p.display().to_string()
}

#[test]
fn with_module_format_and_dd_run_through_the_kernel_object() {
    let module = built_module();
    let dir = TempDir::new("cli-module");
    let a = Image::patterned(&dir.path("a.img"), 5, 8192);
    let b = Image::patterned(&dir.path("b.img"), 6, 4096);
    let (code, out, err) = sim(&[
        "--module",
        &module,
        "format",
        a.path.to_str().unwrap(),
        &format!("{},target=3", b.path.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "c0t0d0 QEMU QEMU HARDDISK 8192 x 512\nc0t3d0 QEMU QEMU HARDDISK 4096 x 512\n"
    );
    // dd both ways through the module, legacy transport.
    let pattern = random_bytes(77, 1 << 20);
    let pfile = dir.path("p.bin");
    std::fs::write(&pfile, &pattern).unwrap();
    let disk = a.path.to_str().unwrap();
    let (code, _, err) = sim(&[
        "--module",
        &module,
        "--transport",
        "legacy",
        "dd",
        disk,
        "--",
        &format!("if={}", pfile.display()),
        "of=/dev/rdsk/c0t0d0",
        "bs=64k",
        "seek=8",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("16+0 records out"), "{err}");
    assert_eq!(
        a.read(8 * 65536, pattern.len()),
        pattern,
        "the image after the write"
    );
    let back = dir.path("back.bin");
    let (code, _, err) = sim(&[
        "--module",
        &module,
        "dd",
        disk,
        "--",
        "if=/dev/rdsk/c0t0d0",
        &format!("of={}", back.display()),
        "bs=64k",
        "skip=8",
        "count=16",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), pattern);
    // The same kernel object binds VMware PVSCSI.
    let (code, out, err) = sim(&[
        "--module",
        &module,
        "--device",
        "pvscsi",
        "format",
        a.path.to_str().unwrap(),
        &format!("{},target=20", b.path.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "c0t0d0 QEMU QEMU HARDDISK 8192 x 512\nc0t20d0 QEMU QEMU HARDDISK 4096 x 512\n"
    );
}

#[test]
fn with_a_module_that_cannot_load_the_error_names_why() {
    let dir = TempDir::new("cli-badmodule");
    let a = Image::patterned(&dir.path("a.img"), 1, 2048);
    let (code, _, err) = sim(&[
        "--module",
        dir.path("absent.o").to_str().unwrap(),
        "format",
        a.path.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("absent.o"), "{err}");
    let junk = dir.path("junk.o");
    std::fs::write(&junk, b"not an object").unwrap();
    let (code, _, err) = sim(&[
        "--module",
        junk.to_str().unwrap(),
        "format",
        a.path.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not an ELF64 object"), "{err}");
}

/// The value of `module:instance:name:statistic` in `kstat -p` output.
fn kstat_value(out: &str, key: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('\t'))
        .and_then(|v| v.parse().ok())
}

#[test]
fn kstat_prints_the_instance_kstats_and_dd_kstat_prints_them_after_the_copy() {
    let dir = TempDir::new("cli-kstat");
    let a = Image::patterned(&dir.path("a.img"), 5, 8192);
    let disk = a.path.to_str().unwrap();
    for device in ["virtio-scsi", "pvscsi"] {
        let (code, out, err) = sim(&["--device", device, "kstat", disk]);
        assert_eq!(code, 0, "{device}: {err}");
        // kstat -p: module:instance:name:statistic<TAB>value, the HBA's and
        // each queue's, with the class kstat(8) adds; then fmdump -e.
        assert!(out.contains("rvscsi:0:hba:class\tcontroller\n"), "{out}");
        let started = kstat_value(&out, "rvscsi:0:hba:commands_started").expect("started");
        assert!(started > 0, "discovery sent commands: {out}");
        assert_eq!(
            kstat_value(&out, "rvscsi:0:hba:commands_completed"),
            Some(started),
            "{out}"
        );
        assert_eq!(kstat_value(&out, "rvscsi:0:queue0:commands"), Some(started));
        assert!(kstat_value(&out, "rvscsi:0:hba:intr_type").is_some_and(|t| t > 0));
        assert!(
            out.ends_with("TIME                 CLASS\n"),
            "{device}: no ereport on a healthy device: {out}"
        );
        assert!(!out.contains("c0t0d0"), "kstat lists no disks: {out}");
        // dd --kstat: the same after a 1 MiB copy, which adds its commands.
        let (code, out2, err) = sim(&[
            "--device",
            device,
            "dd",
            "--kstat",
            disk,
            "--",
            "if=/dev/rdsk/c0t0d0",
            &format!("of={}", dir.path("copy.bin").display()),
            "bs=64k",
            "count=16",
        ]);
        assert_eq!(code, 0, "{device}: {err}");
        assert!(
            err.starts_with("16+0 records in\n16+0 records out\n"),
            "{err}"
        );
        let after = kstat_value(&out2, "rvscsi:0:hba:commands_started").expect("started");
        assert!(
            after >= started + 16,
            "{device}: {started} then {after}: {out2}"
        );
        assert!(out2.ends_with("TIME                 CLASS\n"), "{out2}");
    }
    // --stats still prints both, the ereports in fmdump -eV form.
    let (code, out, err) = sim(&["--stats", "format", disk]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("c0t0d0 "), "{out}");
    assert!(out.contains("# kstat -p rvscsi\nrvscsi:0:"), "{out}");
    assert!(out.contains("# fmdump -eV\nTIME"), "{out}");
}
