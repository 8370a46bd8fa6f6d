//! `rvscsi-sim bench` measures what it claims: the counters move with the
//! mechanisms (notification suppression and doorbell batching cut device
//! accesses at depth; MSI-X needs no interrupt-status reads; the I/O path
//! allocates nothing), the in-memory back end reports the driver's own
//! CPU time and instructions, and `--json` prints the documented fields.

use rvscsi_emu::Backend;
use rvscsi_sim::bench::{self, BenchOptions, Lifecycle, Mix, Variant};

fn quick(
    qds: Vec<u32>,
    queues: Vec<u32>,
    mixes: Vec<Mix>,
    json: bool,
) -> (Vec<bench::Row>, String) {
    run(BenchOptions {
        json,
        commands: 400,
        repeat: 1,
        qds,
        queues,
        mixes,
        backends: vec![Backend::Qemu],
        instructions: false,
        ..BenchOptions::default()
    })
}

/// The meter's counters are the process's: one bench at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(o: BenchOptions) -> (Vec<bench::Row>, String) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let rows = bench::run(&o, &mut out, &mut err)
        .unwrap_or_else(|e| panic!("bench: {e}\n{}", String::from_utf8_lossy(&err)));
    (rows, String::from_utf8_lossy(&out).into_owned())
}

fn row(rows: &[bench::Row], v: Variant, qd: u32, queues: u32) -> &bench::Row {
    rows.iter()
        .find(|r| r.variant == v && r.qd == qd && r.queues == queues)
        .expect("the row")
}

/// The mechanism, not a rate: the doorbells of commands started from a
/// completion pass are one per pass, and a pass follows an interrupt, so
/// doorbells are at most the interrupts plus the lone commands that fill
/// the queue before the first completion (`qd` of them). How many
/// completions one interrupt finds depends on how the device's thread and
/// the driver's interleave, so the rate itself is not asserted.
fn one_doorbell_per_pass(r: &bench::Row, commands: u32) {
    let fill = f64::from(r.qd) / f64::from(commands);
    assert!(
        r.exits_per_cmd <= r.interrupts_per_cmd + fill + 0.01,
        "more doorbells than completion passes: {r:?}"
    );
    assert!(
        r.interrupts_per_cmd < 0.5,
        "one interrupt per command at QD{}: {r:?}",
        r.qd
    );
}

#[test]
fn the_in_memory_back_end_reports_the_drivers_own_time_and_instructions() {
    let (rows, out) = run(BenchOptions {
        json: true,
        // Enough that filling the queue (a doorbell per command until the
        // first completion pass) does not dominate QD32.
        commands: 1000,
        repeat: 2,
        qds: vec![1, 32],
        queues: vec![1],
        mixes: vec![Mix::RandRead4k],
        backends: vec![Backend::Memory],
        instructions: true,
        exe: Some(env!("CARGO_BIN_EXE_rvscsi-sim").into()),
        ..BenchOptions::default()
    });
    assert_eq!(rows.len(), 4, "{out}");
    for r in &rows {
        assert_eq!(r.backend, Backend::Memory);
        assert!(r.ns_per_cmd[2] > 0.0, "driver time measured: {r:?}");
        // tran_start and the interrupt handler call the kernel (locks,
        // DMA syncs, the doorbell, scsi_hba_pkt_comp) some tens of times
        // per command, not hundreds.
        assert!(
            r.kernel_calls_per_cmd >= 5.0 && r.kernel_calls_per_cmd <= 60.0,
            "{r:?}"
        );
        // callgrind counted the driver's own instructions (valgrind is
        // installed by test/scripts/install-deps.sh): hundreds at least,
        // and bounded (unoptimized test builds run some ten times more
        // instructions than the release build's 1,000 or so).
        let insns = r
            .insns_per_cmd
            .unwrap_or_else(|| panic!("no instruction count: {r:?}"));
        let most = if cfg!(debug_assertions) {
            100_000.0
        } else {
            10_000.0
        };
        assert!((300.0..most).contains(&insns), "{r:?}");
        assert_eq!(r.allocs_per_cmd, 0.0, "{r:?}");
    }
    // The in-process device suppresses notifications by the same rules.
    one_doorbell_per_pass(row(&rows, Variant::Rvscsi, 32, 1), 1000);
    assert!(row(&rows, Variant::NotifyEveryCommand, 32, 1).exits_per_cmd >= 0.99);
    for l in out.lines() {
        let v: rvscsi_qtest::Value = rvscsi_qtest::from_str(l).expect("JSON");
        assert_eq!(v["backend"], "memory");
        assert!(v["insns_per_cmd"].as_f64().is_some(), "{l}");
    }
}

#[test]
fn suppression_and_batching_cut_device_accesses_and_the_io_path_allocates_nothing() {
    let (rows, table) = quick(vec![1, 32], vec![1, 4], vec![Mix::RandRead4k], false);
    eprintln!("{table}");
    assert_eq!(rows.len(), 8);
    let ours1 = row(&rows, Variant::Rvscsi, 1, 1);
    let ours32 = row(&rows, Variant::Rvscsi, 32, 1);
    let theirs32 = row(&rows, Variant::NotifyEveryCommand, 32, 1);
    // QD1: one doorbell per command at most (nothing to batch with).
    assert!(ours1.exits_per_cmd <= 1.0 + 1e-9, "{ours1:?}");
    // QD32: the doorbells of commands started from a completion pass are
    // one per pass, and the device suppresses the rest.
    one_doorbell_per_pass(ours32, 400);
    // The comparison driver rings for every command.
    assert!(theirs32.exits_per_cmd >= 0.99, "{theirs32:?}");
    // Four queues, whose vectors interrupt CPUs other than the ones whose
    // queues they serve: a command started from a completion still joins
    // that queue's pass and its single doorbell.
    let ours32x4 = row(&rows, Variant::Rvscsi, 32, 4);
    assert!(ours32x4.exits_per_cmd <= 0.3, "{ours32x4:?}");
    for r in &rows {
        // Through IRM (apix) a vector per request queue and one for
        // configuration and events.
        assert_eq!(r.vectors, 1 + r.queues as usize, "{r:?}");
        assert_eq!(r.isr_reads_per_cmd, 0.0, "MSI-X needs no ISR read: {r:?}");
        assert_eq!(r.allocs_per_cmd, 0.0, "no allocation per command: {r:?}");
        assert!(
            r.interrupts_per_cmd > 0.0 && r.interrupts_per_cmd <= 1.0,
            "{r:?}"
        );
        // The driver's doorbells (its queue kstats) are register writes
        // the device saw; MSI-X with nothing else per command: all of them.
        assert!(r.doorbells_per_cmd > 0.0, "{r:?}");
        assert!(
            (r.doorbells_per_cmd - r.exits_per_cmd).abs() < 1e-9,
            "every exit is a doorbell the kstats counted: {r:?}"
        );
        assert_eq!(r.busy_per_cmd, 0.0, "QD32 fits the ring: {r:?}");
    }
    assert!(table.lines().count() == 9 && table.contains("notify-every-cmd"));
    assert!(table.contains("bells/cmd") && table.contains("busy/cmd"));
}

#[test]
fn json_rows_carry_the_documented_fields_on_every_queue_count() {
    let (rows, out) = quick(vec![8], vec![1, 4], vec![Mix::SeqWrite128k], true);
    assert_eq!(rows.len(), 4);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for l in lines {
        let v: rvscsi_qtest::Value = rvscsi_qtest::from_str(l).expect("JSON");
        for f in [
            "backend",
            "mix",
            "qd",
            "queues",
            "vectors",
            "exits_per_cmd",
            "interrupts_per_cmd",
            "doorbells_per_cmd",
            "busy_per_cmd",
            "allocs_per_cmd",
            "kcalls_per_cmd",
            "probes_per_cmd",
            "ns_per_cmd",
            "insns_per_cmd",
            "driver",
            "lifecycle",
        ] {
            assert!(v.get(f).is_some(), "{f} missing in {l}");
        }
        assert_eq!(v["lifecycle"], "sd", "sd's life cycle is the default");
        assert_eq!(v["mix"], "seqwrite128k");
        assert_eq!(v["backend"], "qemu");
        assert_eq!(v["device"], "virtio-scsi", "the default device");
    }
}

#[test]
fn pvscsi_rows_and_their_in_tree_like_comparison_ring_a_doorbell_per_command_at_depth_3() {
    let (rows, out) = run(BenchOptions {
        json: true,
        devices: vec![bench::HbaDevice::Pvscsi],
        commands: 400,
        repeat: 1,
        qds: vec![32],
        queues: vec![1, 4],
        mixes: vec![Mix::RandRead4k],
        backends: vec![Backend::Qemu, Backend::Memory],
        instructions: false,
        ..BenchOptions::default()
    });
    // One queue on QEMU only: rvscsi at 32, the comparison at 3.
    assert_eq!(rows.len(), 2, "{out}");
    let ours = row(&rows, Variant::Rvscsi, 32, 1);
    let theirs = row(&rows, Variant::InTreeLike, bench::IN_TREE_DEPTH, 1);
    for l in out.lines() {
        let v: rvscsi_qtest::Value = rvscsi_qtest::from_str(l).expect("JSON");
        assert_eq!(v["device"], "pvscsi", "{l}");
    }
    assert!(
        (theirs.exits_per_cmd - 1.0).abs() < 0.01,
        "a doorbell for every command: {theirs:?}"
    );
    assert!(
        (theirs.doorbells_per_cmd - 1.0).abs() < 0.01,
        "and the kstats say so: {theirs:?}"
    );
    assert!(
        ours.doorbells_per_cmd <= ours.exits_per_cmd + 1e-9,
        "{ours:?}"
    );
    assert_eq!(theirs.isr_reads_per_cmd, 0.0, "MSI: no INTR_STATUS read");
    one_doorbell_per_pass(ours, 400);
    assert_eq!(ours.allocs_per_cmd, 0.0, "the I/O path allocates nothing");
}

#[test]
fn back_ends_are_chosen_by_name_and_unknown_ones_are_refused() {
    let o = bench::parse(&["--backend".to_string(), "memory".to_string()]).expect("memory");
    assert_eq!(o.backends, vec![Backend::Memory]);
    let e = bench::parse(&["--backend".to_string(), "vmware".to_string()]).unwrap_err();
    assert!(e.contains("vmware"), "{e}");
    // Fewer commands than the depth would divide the depth's work by too
    // few commands.
    let args = ["--commands", "8", "--qd", "1,32"].map(String::from);
    let e = bench::parse(&args).unwrap_err();
    assert!(e.contains("--commands"), "{e}");
    let mut err = Vec::new();
    let child = BenchOptions {
        callgrind_child: true,
        ..BenchOptions::default()
    };
    let e = bench::run(&child, &mut Vec::new(), &mut err).unwrap_err();
    assert!(e.contains("under valgrind"), "{e}");
}

#[test]
fn under_pcplusmp_the_bench_runs_on_the_two_vectors_illumos_grants_there() {
    let (rows, table) = run(BenchOptions {
        commands: 200,
        repeat: 1,
        qds: vec![8],
        queues: vec![4],
        mixes: vec![Mix::RandRead4k],
        backends: vec![Backend::Qemu],
        instructions: false,
        psm: rvscsi_emu::ddi::intr::Psm::Pcplusmp,
        ..BenchOptions::default()
    });
    eprintln!("{table}");
    assert_eq!(rows.len(), 2);
    for r in &rows {
        // Configuration and events on vector 0, the four queues on 1.
        assert_eq!(r.vectors, 2, "{r:?}");
        assert!(r.interrupts_per_cmd > 0.0, "{r:?}");
    }
    assert!(
        bench::parse(&["--psm".into(), "xen".into()]).is_err(),
        "an unknown platform is refused"
    );
}

#[test]
fn the_sd_life_cycle_makes_and_destroys_a_packet_for_every_command() {
    let (rows, out) = run(BenchOptions {
        json: true,
        commands: 300,
        repeat: 1,
        qds: vec![1],
        queues: vec![1],
        mixes: vec![Mix::RandRead4k],
        backends: vec![Backend::Memory],
        lifecycles: vec![Lifecycle::Sd, Lifecycle::Restart],
        instructions: false,
        ..BenchOptions::default()
    });
    let ours = |l| {
        rows.iter()
            .find(|r| r.variant == Variant::Rvscsi && r.lifecycle == l)
            .expect("the row")
    };
    let (sd, restart) = (ours(Lifecycle::Sd), ours(Lifecycle::Restart));
    // At QD1 every command is one tran_start and one interrupt either way;
    // sd's adds tran_setup_pkt and tran_teardown_pkt, and restart's none.
    assert!(
        (sd.entries_per_cmd - restart.entries_per_cmd - 2.0).abs() < 0.05,
        "sd {sd:?}\nrestart {restart:?}"
    );
    assert!((restart.entries_per_cmd - 2.0).abs() < 0.05, "{restart:?}");
    // DTrace probe sites (cmd-start, cmd-done) are not kernel calls.
    assert!((sd.probes_per_cmd - 2.0).abs() < 0.05, "{sd:?}");
    assert_eq!(sd.allocs_per_cmd, 0.0, "{sd:?}");
    let lifecycles: Vec<String> = out
        .lines()
        .map(|l| {
            let v: rvscsi_qtest::Value = rvscsi_qtest::from_str(l).expect("JSON");
            v["lifecycle"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    // Per driver configuration, in the order asked for.
    assert_eq!(
        lifecycles,
        ["sd", "restart", "sd", "restart"].map(String::from),
        "{out}"
    );
    let args = ["--lifecycle", "restart,sd"].map(String::from);
    let o = bench::parse(&args).expect("lifecycles");
    assert_eq!(o.lifecycles, vec![Lifecycle::Restart, Lifecycle::Sd]);
    let e = bench::parse(&["--lifecycle".into(), "zfs".into()]).unwrap_err();
    assert!(e.contains("zfs"), "{e}");
}

#[test]
fn only_the_drivers_own_functions_count_as_its_instructions() {
    use bench::{is_driver_function, own_instructions};
    for f in [
        "rvscsi_tran_start",
        "rvscsi::hba::io::<impl rvscsi::hba::Hba<F>>::submit",
        "<rvscsi::vioscsi::ring::ReqRing as rvscsi::hba::family::DeviceRing<X>>::pop",
        "core::slice::memchr::memchr_aligned",
        "__memcpy_avx_unaligned_erms",
        "0x0000000004a1b2c0",
    ] {
        assert!(is_driver_function(f), "{f}");
    }
    for f in [
        "ddi_dma_sync",
        "mutex_enter",
        "__dtrace_probe_rvscsi__cmd__start",
        "scsi_hba_pkt_comp",
        "rvscsi_emu::scsa::packet::Packet::start",
        "<rvscsi_emu::meter::Frame as core::ops::drop::Drop>::drop",
        "rvscsi_sim::bench::run_once",
        "std::sys::backtrace::__rust_begin_short_backtrace",
        "(below main)",
    ] {
        assert!(!is_driver_function(f), "{f}");
    }
    // Self cost lines count; the inclusive cost after a calls= line (what
    // the callee spent) does not, nor do other functions' lines.
    let dump = "\
events: Ir
fl=/work/main/src/hba/io.rs
fn=rvscsi::hba::io::<impl rvscsi::hba::Hba<F>>::submit
10 7
+2 5
cfn=ddi_dma_sync
calls=1 0
12 1000
-1 3
fn=ddi_dma_sync
0 40
fn=rvscsi_tran_start
* 11
";
    assert_eq!(own_instructions(dump), 7 + 5 + 3 + 11);
}
