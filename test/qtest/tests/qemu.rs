//! Tests against a real QEMU (`qemu-system-x86_64`, or `$RVSCSI_QEMU`).
//!
//! A missing QEMU is a test failure, never a silent pass: install it with
//! `test/scripts/install-deps.sh`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rvscsi_qtest::{BarKind, Bdf, Error, Op, Pci, Qemu, QemuConfig, json};

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_SCSI_TRANSITIONAL: u16 = 0x1004;
const VIRTIO_SCSI_MODERN: u16 = 0x1048;
const RAM: u64 = 0x0020_0000;

/// The default config, after checking that the QEMU binary exists.
fn config() -> QemuConfig {
    let cfg = QemuConfig::default();
    require_binary(&cfg.binary);
    cfg
}

fn require_binary(bin: &Path) {
    let found = if bin.components().count() > 1 {
        bin.is_file()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false)
    };
    assert!(
        found,
        "QEMU binary `{}` not found: run test/scripts/install-deps.sh \
         (or set RVSCSI_QEMU to a qemu-system-x86_64)",
        bin.display()
    );
}

fn launch(cfg: QemuConfig) -> Qemu {
    match Qemu::launch(cfg) {
        Ok(q) => q,
        Err(e) => panic!("launching QEMU failed: {e}"),
    }
}

/// True while `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
    }
}

fn wait_gone(pid: u32, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    !process_alive(pid)
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn virtio_scsi_transitional_enumerates() {
    let t0 = Instant::now();
    let qemu = launch(config().device("virtio-scsi-pci,id=vs0"));
    let startup = t0.elapsed();
    let qt = qemu.qtest();
    let pci = Pci::new(qt);

    let funcs = pci.scan_bus0().unwrap();
    let vs = funcs
        .iter()
        .find(|f| f.vendor == VIRTIO_VENDOR && f.device == VIRTIO_SCSI_TRANSITIONAL)
        .unwrap_or_else(|| panic!("no virtio-scsi in {funcs:#x?}"));
    assert_eq!(
        vs.bdf,
        Bdf::new(0, 1, 0),
        "virtio-scsi on q35 sits at 00:01.0"
    );
    assert_eq!((vs.class, vs.subclass), (0x01, 0x00), "SCSI storage class");
    assert_eq!(vs.interrupt_pin, 1);
    // q35 host bridge at 00:00.0 and the multi-function ICH9 at 00:1f.{0,2,3}.
    assert!(
        funcs
            .iter()
            .any(|f| f.bdf == Bdf::new(0, 0, 0) && f.vendor == 0x8086)
    );
    assert!(
        funcs.iter().any(|f| f.bdf == Bdf::new(0, 0x1f, 2)),
        "{funcs:#x?}"
    );

    let bar0 = pci.bar_info(vs.bdf, 0).unwrap().expect("BAR0");
    assert_eq!(bar0.kind, BarKind::Io);
    assert_eq!(bar0.size, 64);

    let bars = pci.assign_bars(vs.bdf, 0xE000_0000, 0xC000).unwrap();
    let (i, b, io) = bars[0];
    assert_eq!((i, b.kind, b.size, io), (0, BarKind::Io, 64, 0xC000));
    for &(i, b, addr) in &bars {
        assert_eq!(addr % b.size, 0, "BAR{i} naturally aligned");
    }
    let modern = bars.iter().find(|(i, ..)| *i == 4).expect("BAR4 (modern)");
    assert_eq!(modern.1.kind, BarKind::Mem64);
    assert_eq!(modern.1.size, 16384);
    // The device decodes what we assigned.
    assert_eq!(pci.cfg_read32(vs.bdf, 0x10).unwrap() & !3, 0xC000);
    assert_eq!(pci.cfg_read16(vs.bdf, 0x04).unwrap() & 0x7, 0x7);

    let host_features = qt.inl(io as u16).unwrap();
    assert_ne!(host_features, 0, "legacy host features");

    let caps = pci.capabilities(vs.bdf).unwrap();
    assert!(
        caps.iter().any(|&(_, id)| id == 0x11),
        "MSI-X cap in {caps:x?}"
    );
    assert!(
        caps.iter().filter(|&&(_, id)| id == 0x09).count() >= 4,
        "virtio caps"
    );
    assert_eq!(
        pci.find_capability(vs.bdf, 0x11).unwrap(),
        Some(caps.iter().find(|c| c.1 == 0x11).unwrap().0)
    );
    eprintln!("startup {startup:?}, features {host_features:#x}, bars {bars:x?}, caps {caps:x?}");
    qemu.shutdown().unwrap();
}

#[test]
fn virtio_scsi_modern_only() {
    let qemu = launch(config().device("virtio-scsi-pci,id=vs0,disable-legacy=on"));
    let pci = Pci::new(qemu.qtest());
    let f = pci
        .find(VIRTIO_VENDOR, VIRTIO_SCSI_MODERN)
        .unwrap()
        .expect("modern virtio-scsi 0x1048");
    assert_eq!(f.bdf, Bdf::new(0, 1, 0));
    assert_eq!(pci.bar_info(f.bdf, 0).unwrap(), None, "no legacy I/O BAR");
    let bars = pci.assign_bars(f.bdf, 0xE000_0000, 0xC000).unwrap();
    assert!(
        bars.iter().all(|(_, b, _)| b.kind != BarKind::Io),
        "{bars:x?}"
    );
    assert!(
        bars.iter()
            .any(|(i, b, _)| *i == 4 && b.kind == BarKind::Mem64)
    );
}

#[test]
fn memory_round_trips() {
    let qemu = launch(config());
    let qt = qemu.qtest();

    let data = pattern(64 * 1024, 0x5eed);
    let before = qt.stats();
    qt.write_mem(RAM, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    qt.read_mem(RAM, &mut back).unwrap();
    assert!(back == data, "64 KiB b64write/b64read round trip");
    let d = qt.stats().since(&before);
    assert_eq!((d.bulk_writes, d.bulk_write_bytes), (1, 65536));
    assert_eq!((d.bulk_reads, d.bulk_read_bytes), (1, 65536));
    assert_eq!(d.round_trips, 2);

    // Empty transfers are no-ops (no command at all).
    qt.write_mem(RAM, &[]).unwrap();
    qt.read_mem(RAM, &mut []).unwrap();
    qt.memset(RAM, 0, 0xff).unwrap();
    assert_eq!(qt.stats().since(&before).round_trips, 2);

    // Scalar accesses of each width, little-endian as seen by bytes.
    let a = RAM + 0x1_0000;
    qt.writeq(a, 0x0123_4567_89ab_cdef).unwrap();
    assert_eq!(qt.readq(a).unwrap(), 0x0123_4567_89ab_cdef);
    assert_eq!(qt.readl(a).unwrap(), 0x89ab_cdef);
    assert_eq!(qt.readl(a + 4).unwrap(), 0x0123_4567);
    assert_eq!(qt.readw(a).unwrap(), 0xcdef);
    assert_eq!(qt.readb(a + 7).unwrap(), 0x01);
    qt.writel(a, 0xdead_beef).unwrap();
    qt.writew(a + 4, 0xcafe).unwrap();
    qt.writeb(a + 6, 0x42).unwrap();
    assert_eq!(qt.readq(a).unwrap(), 0x0142_cafe_dead_beef);
    qt.writeq(a + 8, u64::MAX).unwrap();
    assert_eq!(qt.readq(a + 8).unwrap(), u64::MAX);
    let mut b = [0u8; 16];
    qt.read_mem(a, &mut b).unwrap();
    assert_eq!(b[..8], 0x0142_cafe_dead_beef_u64.to_le_bytes());

    qt.memset(a, 16, 0xa5).unwrap();
    assert_eq!(qt.readq(a + 8).unwrap(), 0xa5a5_a5a5_a5a5_a5a5);

    // Batch: one round trip, values in op order, 0 for writes.
    let before = qt.stats();
    let v = qt
        .batch(&[
            Op::Writel(a, 0x1122_3344),
            Op::Readb(a),
            Op::Readw(a),
            Op::Readl(a),
            Op::WriteMem(a + 8, &[1, 2, 3, 4, 5, 6, 7, 8]),
            Op::Readq(a + 8),
            Op::Memset(a + 16, 8, 0x77),
            Op::Readq(a + 16),
            Op::Outb(0x80, 0),
            Op::Inb(0x80),
        ])
        .unwrap();
    assert_eq!(
        v[..8],
        [
            0,
            0x44,
            0x3344,
            0x1122_3344,
            0,
            0x0807_0605_0403_0201,
            0,
            0x7777_7777_7777_7777
        ]
    );
    let d = qt.stats().since(&before);
    assert_eq!(d.round_trips, 1);
    assert_eq!(
        (d.mem_reads, d.mem_writes, d.port_reads, d.port_writes),
        (5, 1, 1, 1)
    );

    // A big batch is split into chunks and stays in order.
    let ops: Vec<Op> = (0..3000u64)
        .map(|i| Op::Writeq(RAM + 8 * i, i * 3))
        .collect();
    qt.batch(&ops).unwrap();
    let reads: Vec<Op> = (0..3000u64).map(|i| Op::Readq(RAM + 8 * i)).collect();
    let vals = qt.batch(&reads).unwrap();
    assert!(vals.iter().enumerate().all(|(i, &v)| v == i as u64 * 3));

    // Errors: a FAIL reply is Error::Qtest and the connection stays usable.
    assert!(matches!(qt.raw("no_such_command"), Err(Error::Qtest(_))));
    assert_eq!(qt.readq(RAM + 8).unwrap(), 3);
    assert!(!qt.is_dead());
}

#[test]
fn threads_share_one_qtest() {
    let qemu = launch(config().device("virtio-scsi-pci,id=vs0"));
    let qt = qemu.qtest_handle();
    thread::scope(|s| {
        for t in 0..4u64 {
            let qt = &qt;
            s.spawn(move || {
                let pci = Pci::new(&**qt);
                for i in 0..200u64 {
                    let a = RAM + t * 0x1000 + 8 * i;
                    qt.writeq(a, (t << 32) | i).unwrap();
                    assert_eq!(qt.readq(a).unwrap(), (t << 32) | i);
                    // Config accesses (two commands each) must not interleave.
                    assert_eq!(pci.cfg_read16(Bdf::new(0, 1, 0), 0).unwrap(), VIRTIO_VENDOR);
                }
            });
        }
    });
    let s = qt.stats();
    assert_eq!(s.mem_writes, 800);
    assert_eq!(s.mem_reads, 800);
}

#[test]
fn irq_intercept() {
    let qemu = launch(config());
    let qt = qemu.qtest();
    qt.irq_intercept_in("ioapic").unwrap();
    qt.sync_irqs().unwrap();
    assert!(!qt.irq_level(21));
    assert_eq!(qt.irq_raises(21), 0);
    // QEMU allows one intercepted device per process; repeating it is accepted.
    qt.irq_intercept_in("ioapic").unwrap();
    // A path that names no device is a FAIL reply, and the connection stays usable.
    assert!(matches!(
        qt.irq_intercept_in("/machine/no-such-device"),
        Err(Error::Qtest(_))
    ));
    qt.sync_irqs().unwrap();
    assert!(!qt.is_dead());
}

/// QEMU's `edu` teaching device raises INTx on a register write: real IRQ lines.
#[test]
fn irq_lines_from_edu_device() {
    let qemu = launch(config().device("edu"));
    let qt = qemu.qtest();
    let pci = Pci::new(qt);
    let edu = pci.find(0x1234, 0x11e8).unwrap().expect("edu device");
    assert_eq!(edu.interrupt_pin, 1);
    let bars = pci.assign_bars(edu.bdf, 0xE000_0000, 0xC000).unwrap();
    let mmio = bars[0].2;
    assert_eq!(
        qt.readl(mmio).unwrap() & 0xff,
        0xed,
        "edu identification register"
    );
    qt.irq_intercept_in("ioapic").unwrap();

    let before = qt.stats();
    qt.writel(mmio + 0x60, 0x1).unwrap(); // raise
    qt.sync_irqs().unwrap();
    // q35: slot 1 INTA is routed to GSI 21 by default.
    assert!(qt.irq_level(21), "INTx of 00:01.0 should be GSI 21");
    assert_eq!(qt.irq_raises(21), 1);
    assert_eq!(qt.readl(mmio + 0x24).unwrap(), 0x1, "interrupt status");
    qt.writel(mmio + 0x64, 0x1).unwrap(); // acknowledge: lowers the line
    qt.sync_irqs().unwrap();
    assert!(!qt.irq_level(21));
    assert_eq!(qt.irq_raises(21), 1);
    assert_eq!(qt.stats().since(&before).irq_events, 2);
}

#[test]
fn qmp_and_hmp() {
    let qemu = launch(config());
    let status = qemu.qmp("query-status", json!({})).unwrap();
    assert_eq!(status["running"], json!(false), "{status}");
    assert_eq!(status["status"], json!("prelaunch"), "{status}");

    let version = qemu.hmp("info version").unwrap();
    assert!(
        version.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "{version:?}"
    );

    match qemu.qmp("no-such-command", json!(null)) {
        Err(Error::Qmp { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }

    // Events: a reset emits RESET; a wait that times out leaves the connection usable.
    qemu.qmp("system_reset", json!(null)).unwrap();
    let ev = qemu
        .wait_qmp_event("RESET", Duration::from_secs(5))
        .unwrap();
    assert_eq!(ev["event"], json!("RESET"));
    let t0 = Instant::now();
    let e = qemu
        .wait_qmp_event("NO_SUCH_EVENT", Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    qemu.qmp("system_reset", json!(null)).unwrap();
    thread::sleep(Duration::from_millis(50));
    let evs = qemu.take_qmp_events();
    assert!(evs.iter().any(|e| e["event"] == json!("RESET")), "{evs:?}");
    assert!(qemu.take_qmp_events().is_empty());
    assert!(qemu.qmp("query-status", json!(null)).is_ok());
}

#[test]
fn drop_kills_qemu() {
    let qemu = launch(config());
    let pid = qemu.pid();
    let dir = qemu.dir().to_path_buf();
    assert!(process_alive(pid));
    assert!(dir.is_dir());
    let t0 = Instant::now();
    drop(qemu);
    assert!(
        wait_gone(pid, Duration::from_secs(3)),
        "QEMU {pid} survived drop"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!dir.exists(), "temp dir {} not removed", dir.display());
}

#[test]
fn killed_qemu_fails_then_dead() {
    let cfg = QemuConfig {
        reply_timeout: Duration::from_secs(2),
        ..config()
    };
    let qemu = launch(cfg);
    let qt = qemu.qtest();
    assert_eq!(qt.readl(RAM).unwrap(), 0);
    signal(qemu.pid(), "-9");
    let t0 = Instant::now();
    let e = qt.readl(RAM).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(e, Error::Closed { .. } | Error::Timeout { .. }),
        "{e}"
    );
    eprintln!("after kill -9: {e}");
    assert!(qt.is_dead());
    let t0 = Instant::now();
    assert!(matches!(qt.readl(RAM), Err(Error::Dead)));
    assert!(matches!(qt.write_mem(RAM, &[1]), Err(Error::Dead)));
    assert!(t0.elapsed() < Duration::from_millis(50));
    let e = qemu.qmp("query-status", json!(null)).unwrap_err();
    assert!(matches!(e, Error::Closed { .. } | Error::Dead), "{e}");
    // shutdown reports that QEMU had died on its own.
    let t0 = Instant::now();
    let e = qemu.shutdown().unwrap_err();
    assert!(matches!(e, Error::Shutdown(_)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[test]
fn wedged_qemu_times_out() {
    let cfg = QemuConfig {
        reply_timeout: Duration::from_secs(1),
        ..config()
    };
    let qemu = launch(cfg);
    let pid = qemu.pid();
    signal(pid, "-STOP");
    let t0 = Instant::now();
    let e = qemu.qtest().inl(0xcfc).unwrap_err();
    let waited = t0.elapsed();
    assert!(
        matches!(&e, Error::Timeout { command, .. } if command == "inl 0xcfc"),
        "{e}"
    );
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3));
    assert!(matches!(qemu.qtest().inl(0xcfc), Err(Error::Dead)));
    // Stopping a stopped QEMU: quit and SIGTERM go unanswered, SIGKILL works.
    let t0 = Instant::now();
    let e = qemu.shutdown().unwrap_err();
    assert!(matches!(e, Error::Shutdown(_)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    assert!(wait_gone(pid, Duration::from_secs(1)));
}

#[test]
fn startup_failure_reports_stderr() {
    let t0 = Instant::now();
    let e = Qemu::launch(config().device("no-such-device-model")).unwrap_err();
    assert!(matches!(e, Error::Connect(_)), "{e}");
    assert!(e.to_string().contains("no-such-device-model"), "{e}");
    eprintln!("{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn missing_binary_points_to_install_script() {
    let cfg = QemuConfig {
        binary: "/nonexistent/qemu-system-x86_64".into(),
        ..QemuConfig::default()
    };
    let e = Qemu::launch(cfg).unwrap_err();
    assert!(matches!(e, Error::Spawn(_)), "{e}");
    assert!(e.to_string().contains("install-deps.sh"), "{e}");
}

#[test]
fn extra_env_and_args_reach_qemu() {
    let cfg = QemuConfig {
        env: vec![("RVSCSI_TEST_MARKER".into(), "42".into())],
        memory_mib: 64,
        ..config()
    };
    let qemu = launch(cfg);
    let environ = std::fs::read(format!("/proc/{}/environ", qemu.pid())).unwrap();
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|kv| kv == b"RVSCSI_TEST_MARKER=42")
    );
    assert!(qemu.cmdline().windows(2).any(|w| w == ["-m", "64M"]));
    let mem = qemu.hmp("info mtree -f").unwrap();
    assert!(!mem.is_empty());
}

/// Helper run in a child test process by `qemu_dies_with_test_process`: launches QEMU,
/// prints its pid and aborts without running any destructor.
#[test]
#[ignore = "helper: run by qemu_dies_with_test_process"]
fn helper_launch_then_abort() {
    let qemu = launch(config());
    // The temp dir outlives the abort: the parent test removes it.
    println!("QEMU_DIR={}", qemu.dir().display());
    println!("QEMU_PID={}", qemu.pid());
    use std::io::Write as _;
    std::io::stdout().flush().unwrap();
    std::process::abort();
}

#[test]
fn qemu_dies_with_test_process() {
    require_binary(&QemuConfig::default().binary);
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "helper_launch_then_abort",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut pid = None;
    let mut dir = None;
    for line in out.lines() {
        let line = line.unwrap();
        // libtest prints "test NAME ... " without a newline before the test's output.
        if let Some((_, p)) = line.split_once("QEMU_PID=") {
            pid = Some(p.trim().parse::<u32>().unwrap());
        }
        if let Some((_, d)) = line.split_once("QEMU_DIR=") {
            dir = Some(std::path::PathBuf::from(d.trim()));
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the helper aborts");
    let pid = pid.expect("helper printed QEMU's pid");
    if let Some(d) = dir.filter(|d| d.to_string_lossy().contains("rvscsi-qtest-")) {
        let _ = std::fs::remove_dir_all(d);
    }
    assert!(
        wait_gone(pid, Duration::from_secs(3)),
        "QEMU {pid} outlived the aborted test process"
    );
}
