//! `rvscsi-sim bench`: what each command costs the machine.
//!
//! In a VM the expensive part of I/O is every exit to the hypervisor: a
//! doorbell write, an interrupt, an interrupt-status read. This benchmark
//! drives the driver on QEMU's virtio-scsi through the test bed with a
//! closed loop at a fixed queue depth, as sd does under load: each
//! completion starts the next command from inside `scsi_hba_pkt_comp`.
//! Per command it reports the device register accesses (would-be VM
//! exits), interrupts delivered, ISR status reads, kernel heap
//! allocations (`kmem_alloc`; with `--module`, every allocation of the
//! module, its Rust allocator included), and wall time (min/median/max
//! over repeated runs; on this back end it is mostly QEMU and qtest).
//!
//! Each row is also run for a comparison driver: rvscsi configured
//! without EVENT_IDX and with a doorbell for every command
//! (`virtio-event-idx=0`, `virtio-notify-batching=0`), which is what a
//! driver without notification suppression does.
//!
//! The in-process back end (driver CPU time and instructions per command
//! on an in-memory device model) is not implemented: asking for it is an
//! error that says so.

use crate::load::Lun;
use crate::testkit::{Binding, Driver, Rig, RigConfig};
use rvscsi::ffi;
use rvscsi_emu::{DataBuf, InitArgs, Packet};
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Usage text of `bench`.
pub const USAGE: &str = "\
usage: rvscsi-sim bench [--json] [--commands N] [--repeat N] [--qd LIST]
                        [--queues LIST] [--mix LIST] [--backend qemu|memory]
                        [--module PATH]

Runs the driver on QEMU's virtio-scsi (through the test bed) at a fixed
queue depth, each completion starting the next command, and reports per
command: device register accesses (VM exits), interrupts, interrupt-status
reads, kernel heap allocations and wall time; each row also for a driver
that notifies on every command without EVENT_IDX.

  --json           one JSON object per row instead of the table
  --commands N     commands per run (default 4000)
  --repeat N       runs per row, for min/median/max time (default 3)
  --qd LIST        queue depths (default 1,8,32,128)
  --queues LIST    virtio-scsi request queues (default 1,4)
  --mix LIST       randread4k, seqwrite128k (default both)
  --backend B      qemu (default); memory is not implemented yet
  --module PATH    bench the kernel module object instead of the library
";

/// A workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// 4 KiB reads at random aligned offsets.
    RandRead4k,
    /// 128 KiB writes, one after the other.
    SeqWrite128k,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Mix::RandRead4k => "randread4k",
            Mix::SeqWrite128k => "seqwrite128k",
        }
    }

    fn blocks(self) -> u32 {
        match self {
            Mix::RandRead4k => 8,
            Mix::SeqWrite128k => 256,
        }
    }

    fn write(self) -> bool {
        self == Mix::SeqWrite128k
    }
}

/// The driver configuration a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// rvscsi as shipped.
    Rvscsi,
    /// rvscsi without EVENT_IDX and with a doorbell per command.
    NotifyEveryCommand,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Rvscsi => "rvscsi",
            Variant::NotifyEveryCommand => "notify-every-cmd",
        }
    }

    fn props(self) -> Vec<(String, i32)> {
        match self {
            Variant::Rvscsi => Vec::new(),
            Variant::NotifyEveryCommand => vec![
                ("virtio-event-idx".into(), 0),
                ("virtio-notify-batching".into(), 0),
            ],
        }
    }
}

/// Options of `bench`.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// JSON rows.
    pub json: bool,
    /// Commands per run.
    pub commands: u64,
    /// Runs per row.
    pub repeat: u32,
    /// Queue depths.
    pub qds: Vec<u32>,
    /// Request queues of the device.
    pub queues: Vec<u32>,
    /// Workloads.
    pub mixes: Vec<Mix>,
    /// A module object to load instead of the linked library.
    pub module: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            json: false,
            commands: 4000,
            repeat: 3,
            qds: vec![1, 8, 32, 128],
            queues: vec![1, 4],
            mixes: vec![Mix::RandRead4k, Mix::SeqWrite128k],
            module: None,
        }
    }
}

fn list<T>(v: &str, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|s| f(s.trim()).ok_or_else(|| format!("bench: bad list element '{s}'")))
        .collect()
}

/// Parses the arguments after `bench`.
pub fn parse(args: &[String]) -> Result<BenchOptions, String> {
    let mut o = BenchOptions::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut value = || {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("bench: {a} needs a value"))
        };
        match a {
            "--help" | "-h" => return Err("bench: usage".into()),
            "--json" => o.json = true,
            "--commands" => {
                o.commands = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("bench: --commands takes a positive number")?;
            }
            "--repeat" => {
                o.repeat = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("bench: --repeat takes a positive number")?;
            }
            "--qd" => {
                o.qds = list(&value()?, |s| {
                    s.parse().ok().filter(|&n: &u32| (1..=1024).contains(&n))
                })?;
            }
            "--queues" => {
                o.queues = list(&value()?, |s| {
                    s.parse().ok().filter(|&n: &u32| (1..=64).contains(&n))
                })?;
            }
            "--mix" => {
                o.mixes = list(&value()?, |s| match s {
                    "randread4k" => Some(Mix::RandRead4k),
                    "seqwrite128k" => Some(Mix::SeqWrite128k),
                    _ => None,
                })?;
            }
            "--backend" => match value()?.as_str() {
                "qemu" => {}
                "memory" => {
                    return Err("bench: the in-memory back end (driver CPU time and \
                                instructions per command) is NOT IMPLEMENTED yet; \
                                only --backend qemu runs"
                        .into());
                }
                other => return Err(format!("bench: unknown back end '{other}'")),
            },
            "--module" => o.module = Some(value()?),
            other => return Err(format!("bench: unknown argument '{other}'")),
        }
        i += 1;
    }
    Ok(o)
}

/// One measured row.
#[derive(Clone, Debug)]
pub struct Row {
    /// Workload.
    pub mix: Mix,
    /// Queue depth.
    pub qd: u32,
    /// Request queues.
    pub queues: u32,
    /// Driver configuration.
    pub variant: Variant,
    /// Device register accesses per command.
    pub exits_per_cmd: f64,
    /// Interrupts delivered per command.
    pub interrupts_per_cmd: f64,
    /// ISR status reads per command.
    pub isr_reads_per_cmd: f64,
    /// `kmem_alloc` calls per command.
    pub allocs_per_cmd: f64,
    /// Wall time per command: min, median, max over the runs.
    pub ns_per_cmd: [f64; 3],
}

impl Row {
    /// The row as one JSON object (the fields the README documents).
    pub fn json(&self) -> String {
        rvscsi_qtest::json!({
            "backend": "qemu",
            "mix": self.mix.name(),
            "qd": self.qd,
            "queues": self.queues,
            "exits_per_cmd": self.exits_per_cmd,
            "interrupts_per_cmd": self.interrupts_per_cmd,
            "isr_reads_per_cmd": self.isr_reads_per_cmd,
            "allocs_per_cmd": self.allocs_per_cmd,
            "ns_per_cmd": self.ns_per_cmd[1],
            "ns_per_cmd_min": self.ns_per_cmd[0],
            "ns_per_cmd_max": self.ns_per_cmd[2],
            "insns_per_cmd": rvscsi_qtest::Value::Null,
            "driver": self.variant.name(),
        })
        .to_string()
    }
}

/// Table header.
pub fn table_header() -> String {
    format!(
        "{:<8} {:<13} {:>4} {:>6} {:<17} {:>9} {:>9} {:>9} {:>9} {:>24}",
        "backend",
        "mix",
        "qd",
        "queues",
        "driver",
        "exits/cmd",
        "intr/cmd",
        "isr/cmd",
        "alloc/cmd",
        "ns/cmd min/med/max"
    )
}

/// One table line.
pub fn table_line(r: &Row) -> String {
    format!(
        "{:<8} {:<13} {:>4} {:>6} {:<17} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>24}",
        "qemu",
        r.mix.name(),
        r.qd,
        r.queues,
        r.variant.name(),
        r.exits_per_cmd,
        r.interrupts_per_cmd,
        r.isr_reads_per_cmd,
        r.allocs_per_cmd,
        format!(
            "{:.0}/{:.0}/{:.0}",
            r.ns_per_cmd[0], r.ns_per_cmd[1], r.ns_per_cmd[2]
        )
    )
}

/// The closed loop of one run.
struct Stream {
    mix: Mix,
    disk_blocks: u64,
    /// Commands still to start.
    remaining: AtomicI64,
    /// Packets in flight.
    active: Mutex<usize>,
    idle: Condvar,
    next_lba: AtomicU64,
    rng: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Stream {
    fn lba(&self) -> u64 {
        let b = u64::from(self.mix.blocks());
        let slots = (self.disk_blocks / b).max(1);
        match self.mix {
            Mix::RandRead4k => {
                // xorshift, shared: the order of draws does not matter.
                let mut x = self.rng.load(Ordering::Relaxed);
                loop {
                    let mut n = x;
                    n ^= n << 13;
                    n ^= n >> 7;
                    n ^= n << 17;
                    match self
                        .rng
                        .compare_exchange_weak(x, n, Ordering::Relaxed, Ordering::Relaxed)
                    {
                        Ok(_) => return (n % slots) * b,
                        Err(now) => x = now,
                    }
                }
            }
            Mix::SeqWrite128k => (self.next_lba.fetch_add(1, Ordering::Relaxed) % slots) * b,
        }
    }

    fn set_cdb(&self, p: &Packet) {
        let lba = self.lba() as u32;
        let mut cdb = [0u8; 10];
        // SBC-3: READ(10) 0x28, WRITE(10) 0x2a.
        cdb[0] = if self.mix.write() { 0x2a } else { 0x28 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&(self.mix.blocks() as u16).to_be_bytes());
        // SAFETY: the packet is not in flight (being set up, or just
        // completed and handed to us); its CDB area holds at least the 10
        // bytes init_pkt was asked for.
        unsafe {
            let pkt = p.pkt();
            std::ptr::copy_nonoverlapping(cdb.as_ptr(), (*pkt).pkt_cdbp, cdb.len());
        }
    }

    fn retire(&self) {
        let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        *a -= 1;
        if *a == 0 {
            self.idle.notify_all();
        }
    }

    fn problem(&self, what: String) {
        self.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    /// Runs in `scsi_hba_pkt_comp`: checks the completion and starts the
    /// packet again while commands remain.
    fn on_complete(&self, p: &Packet) {
        let r = p.result();
        if r.reason != ffi::CMD_CMPLT || r.status() != ffi::STATUS_GOOD {
            self.problem(format!(
                "a command ended with reason {} status {:#x}",
                r.reason,
                r.status()
            ));
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) <= 0 {
            self.retire();
            return;
        }
        self.set_cdb(p);
        let rc = p.start_async();
        if rc != ffi::TRAN_ACCEPT {
            self.problem(format!("tran_start returned {rc} at depth"));
            self.retire();
        }
    }
}

struct Sample {
    exits: u64,
    interrupts: u64,
    isr_reads: u64,
    allocs: u64,
    ns: u128,
}

/// One run of `commands` at depth `qd` on `lun`.
fn run_once(
    rig: &Rig,
    lun: &Lun,
    mix: Mix,
    (qd, queues): (u32, u32),
    commands: u64,
    seed: u64,
) -> Result<Sample, String> {
    let disk_blocks = lun.model.lock().map(|m| m.blocks()).unwrap_or(0);
    let len = mix.blocks() as usize * 512;
    let stream = Arc::new(Stream {
        mix,
        disk_blocks,
        remaining: AtomicI64::new(commands as i64 - i64::from(qd)),
        active: Mutex::new(qd as usize),
        idle: Condvar::new(),
        next_lba: AtomicU64::new(seed * 7),
        rng: AtomicU64::new(seed | 1),
        problems: Mutex::new(Vec::new()),
    });
    let mut pkts = Vec::new();
    for _ in 0..qd {
        let buf = Arc::new(DataBuf::new(len, 0, !mix.write()));
        let p = lun
            .dev
            .init_pkt(Some(buf), InitArgs::default())
            .map_err(|e| format!("init_pkt: {e:?}"))?;
        stream.set_cdb(&p);
        let s = stream.clone();
        p.set_restart(Some(Arc::new(move |p: &Packet| s.on_complete(p))));
        pkts.push(p);
    }
    let m = &rig.bed().machine;
    let before = counters(m);
    let t0 = Instant::now();
    for (k, p) in pkts.iter().enumerate() {
        // Issued from as many CPUs as there are queues; completions then
        // restart from their vectors' CPUs.
        rvscsi_emu::ddi::cpu::run_on(k % queues.max(1) as usize);
        let rc = p.start_async();
        if rc != ffi::TRAN_ACCEPT {
            stream.problem(format!("tran_start returned {rc} while filling the queue"));
            stream.retire();
        }
    }
    {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut a = stream.active.lock().unwrap_or_else(|p| p.into_inner());
        while *a > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("{} commands still out after 300 s", *a));
            }
            a = stream
                .idle
                .wait_timeout(a, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
    let ns = t0.elapsed().as_nanos();
    let after = counters(m);
    for p in pkts {
        p.set_restart(None);
        p.destroy();
    }
    let problems = std::mem::take(&mut *stream.problems.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(first) = problems.first() {
        return Err(format!("{} problem(s), the first: {first}", problems.len()));
    }
    Ok(Sample {
        exits: after.0 - before.0,
        interrupts: after.1 - before.1,
        isr_reads: after.2 - before.2,
        allocs: after.3 - before.3,
        ns,
    })
}

fn counters(m: &rvscsi_emu::Machine) -> (u64, u64, u64, u64) {
    let s = &m.stats;
    (
        s.reg_reads.load(Ordering::Relaxed) + s.reg_writes.load(Ordering::Relaxed),
        s.interrupts.load(Ordering::Relaxed),
        s.isr_reads.load(Ordering::Relaxed),
        rvscsi_emu::ddi::kmem::alloc_calls(),
    )
}

/// Measures one row: `repeat` runs, the counters of the median run.
fn measure(
    rig: &Rig,
    lun: &Lun,
    o: &BenchOptions,
    mix: Mix,
    qd: u32,
    queues: u32,
    variant: Variant,
) -> Result<Row, String> {
    let mut samples = Vec::new();
    for r in 0..o.repeat {
        samples.push(run_once(
            rig,
            lun,
            mix,
            (qd, queues),
            o.commands,
            1 + u64::from(r),
        )?);
    }
    samples.sort_by_key(|s| s.ns);
    let n = o.commands as f64;
    let med = &samples[samples.len() / 2];
    Ok(Row {
        mix,
        qd,
        queues,
        variant,
        exits_per_cmd: med.exits as f64 / n,
        interrupts_per_cmd: med.interrupts as f64 / n,
        isr_reads_per_cmd: med.isr_reads as f64 / n,
        allocs_per_cmd: med.allocs as f64 / n,
        ns_per_cmd: [
            samples[0].ns as f64 / n,
            med.ns as f64 / n,
            samples[samples.len() - 1].ns as f64 / n,
        ],
    })
}

/// Runs the benchmark; each row is printed as soon as it is measured.
pub fn run(o: &BenchOptions, out: &mut dyn Write, err: &mut dyn Write) -> Result<Vec<Row>, String> {
    let module = match &o.module {
        Some(path) => Some(crate::cli::load_module(path)?),
        None => None,
    };
    let binding = match &module {
        Some(m) => Binding::DevOps(m.dev_ops().ok_or("the module installed no dev_ops")?),
        None => Binding::Library,
    };
    let _ = writeln!(
        err,
        "bench: QEMU back end; the in-memory back end is NOT IMPLEMENTED yet (no CPU-time or \
         instruction rows)"
    );
    if !o.json {
        let _ = writeln!(out, "{}", table_header());
    }
    let mut rows = Vec::new();
    for &queues in &o.queues {
        for variant in [Variant::Rvscsi, Variant::NotifyEveryCommand] {
            let rig = Rig::try_start(RigConfig {
                // 32 MiB: room for sequential 128 KiB writes to wrap.
                images: vec![(65_536, 0, 0)],
                transport: "modern".into(),
                interrupts: "msix".into(),
                num_queues: Some(queues),
                props: variant.props(),
                driver: Driver::Recorder,
                binding,
                ..RigConfig::default()
            })?;
            let luns = rig.load_luns();
            let lun = luns.first().ok_or("no LUN was configured")?.clone();
            for &mix in &o.mixes {
                for &qd in &o.qds {
                    let row = measure(&rig, &lun, o, mix, qd, queues, variant)?;
                    let line = if o.json { row.json() } else { table_line(&row) };
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    rows.push(row);
                }
            }
            let report = rig.finish();
            if !report.is_clean() {
                return Err(format!("detach after the bench was not clean: {report:?}"));
            }
        }
    }
    if let Some(mut m) = module {
        match m.fini() {
            Ok(0) => {}
            other => return Err(format!("_fini of the module after the bench: {other:?}")),
        }
    }
    let _ = writeln!(
        err,
        "bench: {} rows, {} commands per run, {} runs per row",
        rows.len(),
        o.commands,
        o.repeat
    );
    Ok(rows)
}
