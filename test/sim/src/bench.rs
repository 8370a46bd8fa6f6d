//! `rvscsi-sim bench`: what each command costs the machine and the CPU.
//!
//! In a VM the expensive part of I/O is every exit to the hypervisor: a
//! doorbell write, an interrupt, an interrupt-status read. The driver's own
//! CPU time comes second, and is hidden on QEMU behind a socket round trip
//! per register access. So the benchmark has two back ends, run with the
//! same closed loop at a fixed queue depth, as sd drives the HBA under
//! load (each completion starts the next command from inside
//! `scsi_hba_pkt_comp`):
//!
//! - `qemu`: QEMU's virtio-scsi through the test bed. Per command: device
//!   register accesses (would-be VM exits), interrupts delivered, ISR
//!   status reads, kernel heap allocations (`kmem_alloc`; with `--module`
//!   every allocation of the module, its Rust allocator included).
//! - `memory`: the test bed's in-process virtio-scsi model
//!   (`rvscsi_emu::memdev`), the same counters, where the driver's CPU
//!   cost is not drowned by QEMU's.
//!
//! Two life cycles of a command's packet:
//!
//! - `sd` (the default): what sd does for every I/O (sd_start_cmds,
//!   sdintr, sd_destroypkt in uts/common/io/scsi/targets/sd.c): a fresh
//!   `scsi_init_pkt` with a buf (the framework's packet cache,
//!   `tran_setup_pkt`, the DMA bind), `tran_start`, the completion, then
//!   `scsi_destroy_pkt` (`tran_teardown_pkt`, the unbind, the cache free)
//!   before the next packet is made, all from the completion callback.
//! - `restart`: one packet per slot, made once and started again from its
//!   completion callback (no setup, bind, teardown or unbind per command).
//!
//! On both, `ns_per_cmd` is the driver's own CPU time per command
//! (min/median/max over `--repeat` runs): time inside driver entry points
//! minus time inside the kernel functions it calls (the emulated DDI, the
//! device model behind a doorbell, the target driver's completion
//! callback), measured by `rvscsi_emu::meter`, less the measured cost of
//! the clock reads. `tran_setup_pkt` and `tran_teardown_pkt` are driver
//! entry points and count; the framework's own work around them (the
//! packet cache, `scsi_init_pkt`'s and `scsi_destroy_pkt`'s bookkeeping)
//! and the emulated rootnex's (DMA bind and unbind) are kernel work and do
//! not. `kcalls_per_cmd` counts the kernel calls the driver made, whose
//! cost on illumos depends on illumos; `probes_per_cmd` the DTrace probe
//! sites it passed, counted apart because illumos patches a disabled
//! probe's call to no-ops. `insns_per_cmd` is the driver's own instruction count per
//! command on the memory back end, counted by valgrind's callgrind in a
//! child process (`valgrind` must be installed; without it the column is
//! empty and the reason is printed). `wall_ns_per_cmd` is the elapsed time.
//!
//! Each row is also run for a comparison driver: rvscsi configured
//! without EVENT_IDX and with a doorbell for every command
//! (`virtio-event-idx=0`, `virtio-notify-batching=0`), which is what a
//! driver without notification suppression does.

pub use crate::cli::HbaDevice;
use crate::load::Lun;
use crate::testkit::{Binding, Driver, Rig, RigConfig};
use rvscsi::ffi;
use rvscsi_emu::{Backend, meter};
use rvscsi_emu::{DataBuf, Device, InitArgs, Packet};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Usage text of `bench`.
pub const USAGE: &str = "\
usage: rvscsi-sim bench [--json] [--device LIST] [--commands N] [--repeat N] [--qd LIST]
                        [--queues LIST] [--mix LIST] [--backend LIST]
                        [--lifecycle LIST] [--no-instructions] [--module PATH]
                        [--psm NAME]

Runs the driver at a fixed queue depth, each completion starting the next
command, on QEMU's virtio-scsi (through the test bed) and on an in-process
virtio-scsi model, and reports per command: device register accesses (VM
exits), interrupts, interrupt-status reads, kernel heap allocations, the
driver's own CPU time (min/median/max), kernel calls and DTrace probe
sites, and on the in-process model its own instructions (callgrind); each
row also for a driver that notifies on every command without EVENT_IDX.
The driver's share includes tran_setup_pkt and tran_teardown_pkt; the
framework's packet cache and the DMA bind and unbind are not the driver's.

  --json             one JSON object per row instead of the table
  --device LIST      virtio-scsi, pvscsi (default virtio-scsi); pvscsi runs on
                     QEMU with one request queue, its comparison row
                     (in-tree-like) rings a doorbell for every command at
                     queue depth 3, as the in-tree pvscsi driver does
  --commands N       commands per run (default 4000)
  --repeat N         runs per row, for min/median/max time (default 3)
  --qd LIST          queue depths (default 1,8,32,128)
  --queues LIST      virtio-scsi request queues (default 1,4)
  --mix LIST         randread4k, seqwrite128k (default both)
  --backend LIST     qemu, memory (default both)
  --lifecycle LIST   sd: scsi_init_pkt, tran_start, scsi_destroy_pkt for
                     every command, as sd does (the default); restart: one
                     packet per slot started again from its completion
  --no-instructions  skip the callgrind run (insns_per_cmd stays null)
  --kcall-sites      print, for each run, the driver's kernel calls per
                     command by the emulated function called (stderr)
  --module PATH      bench the kernel module object instead of the library
  --psm NAME         the emulated kernel's interrupt platform: apix (default,
                     what illumos runs on QEMU/KVM: an IRM pool, a vector per
                     request queue) or pcplusmp (no pool: 2 MSI-X vectors)
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

/// How a command's packet lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// A packet per command, made from the previous command's completion
    /// and destroyed on its own, as sd does.
    Sd,
    /// One packet per slot, started again from its completion.
    Restart,
}

impl Lifecycle {
    fn name(self) -> &'static str {
        match self {
            Lifecycle::Sd => "sd",
            Lifecycle::Restart => "restart",
        }
    }
}

/// The back end's name in the table and the JSON.
fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Qemu => "qemu",
        Backend::Memory => "memory",
    }
}

/// The driver configuration a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// rvscsi as shipped.
    Rvscsi,
    /// rvscsi without EVENT_IDX and with a doorbell per command.
    NotifyEveryCommand,
    /// pvscsi as the in-tree illumos driver runs it: a doorbell for every
    /// command and at most 3 commands in flight (sd's throttle once the
    /// in-tree driver's setcap tagged-qing returns 0, shared/notes/pvscsi.md
    /// §3 defect 1).
    InTreeLike,
}

/// sd's throttle under the in-tree pvscsi driver.
pub const IN_TREE_DEPTH: u32 = 3;

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Rvscsi => "rvscsi",
            Variant::NotifyEveryCommand => "notify-every-cmd",
            Variant::InTreeLike => "in-tree-like",
        }
    }

    /// The variants each device family is measured with.
    fn of(device: HbaDevice) -> [Variant; 2] {
        match device {
            HbaDevice::VirtioScsi => [Variant::Rvscsi, Variant::NotifyEveryCommand],
            HbaDevice::Pvscsi => [Variant::Rvscsi, Variant::InTreeLike],
        }
    }

    /// The queue depth a run of this variant at `qd` really has.
    fn depth(self, qd: u32) -> u32 {
        match self {
            Variant::InTreeLike => qd.min(IN_TREE_DEPTH),
            _ => qd,
        }
    }

    fn props(self) -> Vec<(String, i32)> {
        match self {
            Variant::Rvscsi => Vec::new(),
            Variant::NotifyEveryCommand => vec![
                ("virtio-event-idx".into(), 0),
                ("virtio-notify-batching".into(), 0),
            ],
            Variant::InTreeLike => vec![("pvscsi-notify-batching".into(), 0)],
        }
    }
}

/// Options of `bench`.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// JSON rows.
    pub json: bool,
    /// HBA families (QEMU's models; the memory back end is virtio-scsi's).
    pub devices: Vec<HbaDevice>,
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
    /// Back ends.
    pub backends: Vec<Backend>,
    /// Packet life cycles.
    pub lifecycles: Vec<Lifecycle>,
    /// Count instructions with callgrind (memory back end).
    pub instructions: bool,
    /// The emulated kernel's interrupt platform.
    pub psm: rvscsi_emu::ddi::intr::Psm,
    /// The `rvscsi-sim` executable, run under callgrind for the
    /// instruction counts (the running one if None).
    pub exe: Option<PathBuf>,
    /// Set in the child that runs under callgrind: dump callgrind's
    /// counters after each run.
    pub callgrind_child: bool,
    /// Print the driver's kernel calls per command by call site.
    pub kcall_sites: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            json: false,
            devices: vec![HbaDevice::VirtioScsi],
            commands: 4000,
            repeat: 3,
            qds: vec![1, 8, 32, 128],
            queues: vec![1, 4],
            mixes: vec![Mix::RandRead4k, Mix::SeqWrite128k],
            module: None,
            backends: vec![Backend::Qemu, Backend::Memory],
            lifecycles: vec![Lifecycle::Sd],
            instructions: true,
            psm: rvscsi_emu::ddi::intr::Psm::default(),
            exe: None,
            callgrind_child: false,
            kcall_sites: false,
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
            "--device" => {
                o.devices = list(&value()?, |s| HbaDevice::parse(s).ok())?;
            }
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
            "--backend" => {
                o.backends = list(&value()?, |s| match s {
                    "qemu" => Some(Backend::Qemu),
                    "memory" => Some(Backend::Memory),
                    _ => None,
                })?;
            }
            "--lifecycle" => {
                o.lifecycles = list(&value()?, |s| match s {
                    "sd" => Some(Lifecycle::Sd),
                    "restart" => Some(Lifecycle::Restart),
                    _ => None,
                })?;
            }
            "--no-instructions" => o.instructions = false,
            "--psm" => {
                o.psm = match value()?.as_str() {
                    "apix" => rvscsi_emu::ddi::intr::Psm::Apix,
                    "pcplusmp" => rvscsi_emu::ddi::intr::Psm::Pcplusmp,
                    other => {
                        return Err(format!("bench: --psm {other}: apix or pcplusmp"));
                    }
                }
            }
            "--callgrind-child" => o.callgrind_child = true,
            "--kcall-sites" => o.kcall_sites = true,
            "--module" => o.module = Some(value()?),
            other => return Err(format!("bench: unknown argument '{other}'")),
        }
        i += 1;
    }
    if let Some(&deepest) = o.qds.iter().max()
        && u64::from(deepest) > o.commands
    {
        return Err(format!(
            "bench: --commands {} is fewer than queue depth {deepest}",
            o.commands
        ));
    }
    Ok(o)
}

/// One measured row.
#[derive(Clone, Debug)]
pub struct Row {
    /// Which HBA family.
    pub device: HbaDevice,
    /// What played the device.
    pub backend: Backend,
    /// Workload.
    pub mix: Mix,
    /// Packet life cycle.
    pub lifecycle: Lifecycle,
    /// Queue depth.
    pub qd: u32,
    /// Request queues.
    pub queues: u32,
    /// MSI-X vectors the driver holds (what the emulated kernel granted:
    /// one per request queue and one for configuration and events through
    /// IRM under apix).
    pub vectors: usize,
    /// Driver configuration.
    pub variant: Variant,
    /// Device register accesses per command (counted by the emulation at
    /// the device: each is a VM exit; doorbells and interrupt-status reads
    /// are among them).
    pub exits_per_cmd: f64,
    /// Interrupts per command: the driver's own count, read from its HBA
    /// kstat (`rvscsi:<instance>:hba:interrupts`) as kstat(8) reads it.
    pub interrupts_per_cmd: f64,
    /// Doorbells per command: the sum over the request queues' kstats
    /// (`rvscsi:<instance>:queue<N>:doorbells`).
    pub doorbells_per_cmd: f64,
    /// TRAN_BUSY answers per command (`rvscsi:<instance>:hba:tran_busy`).
    pub busy_per_cmd: f64,
    /// ISR status reads per command.
    pub isr_reads_per_cmd: f64,
    /// `kmem_alloc` calls per command.
    pub allocs_per_cmd: f64,
    /// Kernel functions the driver called, per command (probe sites not
    /// included).
    pub kernel_calls_per_cmd: f64,
    /// DTrace probe sites the driver passed, per command.
    pub probes_per_cmd: f64,
    /// Driver entry points the framework called, per command (sd's life
    /// cycle adds `tran_setup_pkt` and `tran_teardown_pkt` to
    /// `tran_start` and the interrupts).
    pub entries_per_cmd: f64,
    /// The driver's own CPU time per command: min, median, max over runs.
    pub ns_per_cmd: [f64; 3],
    /// Elapsed time per command (median run).
    pub wall_ns_per_cmd: f64,
    /// The driver's own instructions per command (callgrind), when counted.
    pub insns_per_cmd: Option<f64>,
}

impl Row {
    fn key(&self) -> String {
        row_key(
            self.device,
            self.backend,
            (self.mix, self.lifecycle),
            self.qd,
            self.queues,
            self.variant,
        )
    }

    /// The row as one JSON object (the fields the README documents).
    pub fn json(&self) -> String {
        rvscsi_qtest::json!({
            "device": self.device.name(),
            "backend": backend_name(self.backend),
            "mix": self.mix.name(),
            "lifecycle": self.lifecycle.name(),
            "qd": self.qd,
            "queues": self.queues,
            "vectors": self.vectors,
            "exits_per_cmd": self.exits_per_cmd,
            "interrupts_per_cmd": self.interrupts_per_cmd,
            "doorbells_per_cmd": self.doorbells_per_cmd,
            "busy_per_cmd": self.busy_per_cmd,
            "isr_reads_per_cmd": self.isr_reads_per_cmd,
            "allocs_per_cmd": self.allocs_per_cmd,
            "kcalls_per_cmd": self.kernel_calls_per_cmd,
            "probes_per_cmd": self.probes_per_cmd,
            "ns_per_cmd": self.ns_per_cmd[1],
            "ns_per_cmd_min": self.ns_per_cmd[0],
            "ns_per_cmd_max": self.ns_per_cmd[2],
            "wall_ns_per_cmd": self.wall_ns_per_cmd,
            "insns_per_cmd": self.insns_per_cmd,
            "driver": self.variant.name(),
        })
        .to_string()
    }
}

fn row_key(
    device: HbaDevice,
    backend: Backend,
    (mix, life): (Mix, Lifecycle),
    qd: u32,
    queues: u32,
    v: Variant,
) -> String {
    format!(
        "{}/{}/{}/{}/qd{qd}/q{queues}/{}",
        device.name(),
        backend_name(backend),
        mix.name(),
        life.name(),
        v.name()
    )
}

/// Table header.
pub fn table_header() -> String {
    format!(
        "{:<11} {:<7} {:<13} {:<7} {:>4} {:>6} {:>7} {:<17} {:>9} {:>8} {:>9} {:>8} {:>7} {:>9} {:>10} {:>10} {:>20} {:>10} {:>9}",
        "device",
        "backend",
        "mix",
        "life",
        "qd",
        "queues",
        "vectors",
        "driver",
        "exits/cmd",
        "intr/cmd",
        "bells/cmd",
        "busy/cmd",
        "isr/cmd",
        "alloc/cmd",
        "kcalls/cmd",
        "probes/cmd",
        "drv ns/cmd min/med/max",
        "insns/cmd",
        "wall ns",
    )
}

/// One table line.
pub fn table_line(r: &Row) -> String {
    format!(
        "{:<11} {:<7} {:<13} {:<7} {:>4} {:>6} {:>7} {:<17} {:>9.3} {:>8.3} {:>9.3} {:>8.3} {:>7.3} {:>9.3} {:>10.1} {:>10.1} {:>20} {:>10} {:>9.0}",
        r.device.name(),
        backend_name(r.backend),
        r.mix.name(),
        r.lifecycle.name(),
        r.qd,
        r.queues,
        r.vectors,
        r.variant.name(),
        r.exits_per_cmd,
        r.interrupts_per_cmd,
        r.doorbells_per_cmd,
        r.busy_per_cmd,
        r.isr_reads_per_cmd,
        r.allocs_per_cmd,
        r.kernel_calls_per_cmd,
        r.probes_per_cmd,
        format!(
            "{:.0}/{:.0}/{:.0}",
            r.ns_per_cmd[0], r.ns_per_cmd[1], r.ns_per_cmd[2]
        ),
        r.insns_per_cmd
            .map_or_else(|| "-".to_string(), |n| format!("{n:.0}")),
        r.wall_ns_per_cmd,
    )
}

/// sd's default command timeout (`SD_IO_TIME`, uts/common/sys/scsi/targets/sddef.h; sd.c `sd_setup_rw_pkt` sets it as pkt_time), the pkt_time of every
/// I/O it starts.
pub const SD_IO_TIME: i32 = 60;

/// The closed loop of one run.
struct Stream {
    mix: Mix,
    lifecycle: Lifecycle,
    disk_blocks: u64,
    dev: Arc<Device>,
    /// Each slot's buf (sd's `struct buf` comes from above the HBA; it is
    /// not part of what a command costs the HBA).
    bufs: Vec<Arc<DataBuf>>,
    /// The packet each slot has out (its owner's handle on it).
    slots: Vec<Mutex<Option<Packet>>>,
    /// Commands still to start.
    remaining: AtomicI64,
    /// Slots with a packet in flight.
    active: Mutex<usize>,
    idle: Condvar,
    next_lba: AtomicU64,
    rng: AtomicU64,
    problems: Mutex<Vec<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    /// `scsi_init_pkt` of slot `slot`'s next packet, as sd_setup_rw_pkt
    /// asks for it from sd_start_cmds: with the buf, a 10-byte CDB, room
    /// for auto request sense, and a callback function rather than
    /// SLEEP_FUNC (it runs in interrupt context), so no sleeping
    /// allocation. Its completion comes back to [`Self::on_complete`].
    fn make(self: &Arc<Self>, slot: usize) -> Result<Packet, String> {
        let args = InitArgs {
            sleep: false,
            ..InitArgs::default()
        };
        let buf = self.bufs[slot].clone();
        let mut p = self
            .dev
            .init_pkt(Some(buf), args)
            .map_err(|e| format!("scsi_init_pkt: {e:?}"))?;
        // sd gives every I/O a pkt_time (sd_setup_rw_pkt: un_cmd_timeout,
        // SD_IO_TIME 60 s by default): the HBA pays for its deadline.
        p.set_time(SD_IO_TIME);
        self.set_cdb(&p);
        let s = self.clone();
        p.set_restart(Some(Arc::new(move |p: &Packet| s.on_complete(slot, p))));
        Ok(p)
    }

    /// Starts slot `slot`'s packet `p` and keeps it there. The slot stays
    /// locked while `tran_start` runs, so a completion on another CPU
    /// finds the packet in its slot.
    fn start(&self, slot: usize, p: Packet, what: &str) {
        let mut held = locked(&self.slots[slot]);
        let rc = p.start_async();
        *held = Some(p);
        drop(held);
        if rc != ffi::TRAN_ACCEPT {
            self.problem(format!("tran_start returned {rc} {what}"));
            self.retire();
        }
    }

    fn retire(&self) {
        let mut a = locked(&self.active);
        *a -= 1;
        if *a == 0 {
            self.idle.notify_all();
        }
    }

    fn problem(&self, what: String) {
        locked(&self.problems).push(what);
    }

    /// Runs in `scsi_hba_pkt_comp` for slot `slot`: checks the completion
    /// and starts the next command while commands remain. sd's way: the
    /// packet is destroyed (sd_destroypkt from sdintr) and a new one made
    /// for the next command; restart: the same packet goes again.
    fn on_complete(self: &Arc<Self>, slot: usize, p: &Packet) {
        let r = p.result();
        if r.reason != ffi::CMD_CMPLT || r.status() != ffi::STATUS_GOOD {
            self.problem(format!(
                "a command ended with reason {} status {:#x}",
                r.reason,
                r.status()
            ));
        }
        if self.lifecycle == Lifecycle::Sd {
            // Waits for the starter (if another CPU is still in its
            // tran_start) to have put the packet in the slot.
            let done = locked(&self.slots[slot]).take();
            // `p` is this packet: not touched after its destruction.
            match done {
                Some(done) => done.destroy(),
                None => self.problem("a completion for an empty slot".into()),
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) <= 0 {
            self.retire();
            return;
        }
        match self.lifecycle {
            Lifecycle::Sd => match self.make(slot) {
                Ok(next) => self.start(slot, next, "from a completion"),
                Err(e) => {
                    self.problem(format!("{e} from a completion"));
                    self.retire();
                }
            },
            Lifecycle::Restart => {
                self.set_cdb(p);
                let rc = p.start_async();
                if rc != ffi::TRAN_ACCEPT {
                    self.problem(format!("tran_start returned {rc} at depth"));
                    self.retire();
                }
            }
        }
    }
}

struct Sample {
    /// What the counters moved by during the run.
    counts: Counts,
    wall_ns: u128,
    meter: meter::Reading,
}

/// The kernel calls per command of the run just measured, by the emulated
/// function called (the file and line of its meter frame), most first.
fn print_kcall_sites(mix: Mix, lifecycle: Lifecycle, (qd, queues): (u32, u32), commands: u64) {
    let mut sites = meter::sites();
    sites.sort_by_key(|s| std::cmp::Reverse(s.1));
    let total: u64 = sites.iter().map(|s| s.1).sum();
    let per = |n: u64| n as f64 / commands.max(1) as f64;
    eprintln!(
        "kernel calls per command, {} {} qd {qd} queues {queues}: {:.2}",
        mix.name(),
        lifecycle.name(),
        per(total)
    );
    for ((file, line), n) in sites {
        eprintln!("  {:7.3}  {file}:{line}", per(n));
    }
}

/// One run of `commands` at depth `qd` on `lun`.
fn run_once(
    rig: &Rig,
    lun: &Lun,
    (mix, lifecycle): (Mix, Lifecycle),
    (qd, queues): (u32, u32),
    commands: u64,
    seed: u64,
) -> Result<Sample, String> {
    let disk_blocks = lun.model.lock().map(|m| m.blocks()).unwrap_or(0);
    let len = mix.blocks() as usize * 512;
    let stream = Arc::new(Stream {
        mix,
        lifecycle,
        disk_blocks,
        dev: lun.dev.clone(),
        bufs: (0..qd)
            .map(|_| Arc::new(DataBuf::new(len, 0, !mix.write())))
            .collect(),
        slots: (0..qd).map(|_| Mutex::new(None)).collect(),
        remaining: AtomicI64::new(commands as i64 - i64::from(qd)),
        active: Mutex::new(qd as usize),
        idle: Condvar::new(),
        next_lba: AtomicU64::new(seed * 7),
        rng: AtomicU64::new(seed | 1),
        problems: Mutex::new(Vec::new()),
    });
    // Restart: the packets exist before the measurement; sd: each
    // command's packet is made (and its tran_setup_pkt measured) when it
    // is started.
    let mut premade = Vec::new();
    if lifecycle == Lifecycle::Restart {
        for k in 0..qd as usize {
            premade.push(Ok(stream.make(k)?));
        }
    }
    let m = &rig.bed().machine;
    let before = counters(rig.bed())?;
    meter::valgrind::zero_stats();
    let _ = meter::take();
    meter::arm(true);
    let t0 = Instant::now();
    if lifecycle == Lifecycle::Sd {
        // Made (measured) first and then started together, so that filling
        // the queue is no slower than restart's.
        for k in 0..qd as usize {
            rvscsi_emu::ddi::cpu::run_on(k % queues.max(1) as usize);
            premade.push(stream.make(k));
        }
    }
    for (k, p) in premade.into_iter().enumerate() {
        // Issued from as many CPUs as there are queues; completions then
        // start the next ones from their vectors' CPUs.
        rvscsi_emu::ddi::cpu::run_on(k % queues.max(1) as usize);
        match p {
            Ok(p) => stream.start(k, p, "while filling the queue"),
            Err(e) => {
                stream.problem(format!("{e} while filling the queue"));
                stream.retire();
            }
        }
    }
    let waited = {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut a = locked(&stream.active);
        loop {
            if *a == 0 {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(format!("{} commands still out after 300 s", *a));
            }
            a = stream
                .idle
                .wait_timeout(a, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    };
    let wall_ns = t0.elapsed().as_nanos();
    meter::arm(false);
    let reading = meter::take();
    if meter::counting_sites() {
        print_kcall_sites(mix, lifecycle, (qd, queues), commands);
    }
    waited?;
    let after = counters(rig.bed())?;
    // Restart's packets (and any a refused start left in its slot).
    for slot in &stream.slots {
        if let Some(p) = locked(slot).take() {
            p.set_restart(None);
            p.destroy();
        }
    }
    let problems = std::mem::take(&mut *locked(&stream.problems));
    if let Some(first) = problems.first() {
        let violations = m.violations();
        return Err(format!(
            "{} problem(s), the first: {first}; DDI violations: {violations:?}",
            problems.len()
        ));
    }
    Ok(Sample {
        counts: after.since(&before),
        wall_ns,
        meter: reading,
    })
}

/// The counters a run is measured by, read before and after it (outside
/// the measured window): what the emulation counts at the device (register
/// accesses, interrupt-status reads) and in the kernel (allocations), and
/// what the driver counts in its kstats, read through the emulated kstat
/// framework as `kstat -p rvscsi:<instance>` reads them (so the table's
/// interrupts, doorbells and TRAN_BUSY are the numbers kstat(8) shows).
struct Counts {
    exits: u64,
    interrupts: u64,
    doorbells: u64,
    busy: u64,
    isr_reads: u64,
    allocs: u64,
}

impl Counts {
    /// How far each counter moved from `before`.
    fn since(&self, before: &Counts) -> Counts {
        Counts {
            exits: self.exits - before.exits,
            interrupts: self.interrupts - before.interrupts,
            doorbells: self.doorbells - before.doorbells,
            busy: self.busy - before.busy,
            isr_reads: self.isr_reads - before.isr_reads,
            allocs: self.allocs - before.allocs,
        }
    }
}

fn counters(bed: &rvscsi_emu::Bed) -> Result<Counts, String> {
    use rvscsi_emu::ddi::kstat;
    let m = &bed.machine;
    let instance = rvscsi_emu::ddi::devinfo::ddi_get_instance(bed.hba);
    let read = |name: &str| {
        kstat::read(m, "rvscsi", instance, name)
            .map_err(|e| format!("kstat rvscsi:{instance}:{name}: {e:?}"))
    };
    let stat = |s: &kstat::Snapshot, name: &str| {
        s.u64(name)
            .ok_or_else(|| format!("kstat {}:{}: no {name}", s.instance, s.name))
    };
    let hba = read("hba")?;
    let mut doorbells = 0;
    for q in 0..stat(&hba, "queues")? {
        doorbells += stat(&read(&format!("queue{q}"))?, "doorbells")?;
    }
    let s = &m.stats;
    Ok(Counts {
        exits: s.reg_reads.load(Ordering::Relaxed) + s.reg_writes.load(Ordering::Relaxed),
        interrupts: stat(&hba, "interrupts")?,
        doorbells,
        busy: stat(&hba, "tran_busy")?,
        isr_reads: s.isr_reads.load(Ordering::Relaxed),
        allocs: rvscsi_emu::ddi::kmem::alloc_calls(),
    })
}

/// What one row is measured on.
struct Setup<'a> {
    device: HbaDevice,
    rig: &'a Rig,
    lun: &'a Lun,
    backend: Backend,
    queues: u32,
    /// MSI-X vectors the driver holds.
    vectors: usize,
    variant: Variant,
    /// Nanoseconds each side switch of the meter adds to the driver.
    switch_ns: f64,
}

/// Measures one row: `repeat` runs; the counters of the median run (by
/// driver time).
fn measure(
    s: &Setup<'_>,
    o: &BenchOptions,
    (mix, lifecycle): (Mix, Lifecycle),
    qd: u32,
) -> Result<Row, String> {
    let mut samples = Vec::new();
    for r in 0..o.repeat {
        samples.push(run_once(
            s.rig,
            s.lun,
            (mix, lifecycle),
            (qd, s.queues),
            o.commands,
            1 + u64::from(r),
        )?);
        if o.callgrind_child {
            let switches = samples.last().map_or(0, |x: &Sample| x.meter.switches);
            dump_callgrind(&format!(
                "{} switches={switches}",
                row_key(
                    s.device,
                    s.backend,
                    (mix, lifecycle),
                    qd,
                    s.queues,
                    s.variant
                )
            ))?;
        }
    }
    let n = o.commands as f64;
    let driver_ns = |x: &Sample| {
        (x.meter.driver_ns as f64 - x.meter.switches as f64 * s.switch_ns).max(0.0) / n
    };
    samples.sort_by(|a, b| driver_ns(a).total_cmp(&driver_ns(b)));
    let med = &samples[samples.len() / 2];
    Ok(Row {
        device: s.device,
        backend: s.backend,
        mix,
        lifecycle,
        qd,
        queues: s.queues,
        vectors: s.vectors,
        variant: s.variant,
        exits_per_cmd: med.counts.exits as f64 / n,
        interrupts_per_cmd: med.counts.interrupts as f64 / n,
        doorbells_per_cmd: med.counts.doorbells as f64 / n,
        busy_per_cmd: med.counts.busy as f64 / n,
        isr_reads_per_cmd: med.counts.isr_reads as f64 / n,
        allocs_per_cmd: med.counts.allocs as f64 / n,
        kernel_calls_per_cmd: med.meter.kernel_calls as f64 / n,
        probes_per_cmd: med.meter.probe_calls as f64 / n,
        entries_per_cmd: med.meter.driver_entries as f64 / n,
        ns_per_cmd: [
            driver_ns(&samples[0]),
            driver_ns(med),
            driver_ns(&samples[samples.len() - 1]),
        ],
        wall_ns_per_cmd: med.wall_ns as f64 / n,
        insns_per_cmd: None,
    })
}

/// Dumps callgrind's counters labelled `rvscsi-bench <what>`.
fn dump_callgrind(what: &str) -> Result<(), String> {
    let label =
        std::ffi::CString::new(format!("rvscsi-bench {what}")).map_err(|e| e.to_string())?;
    meter::valgrind::dump_stats_at(&label);
    Ok(())
}

/// Empty kernel calls the meter's calibration makes.
const CALIBRATION_CALLS: u32 = 20_000;

/// Commands per run in the callgrind child (instruction counts hardly
/// vary from command to command; callgrind runs some 50 times slower).
const CALLGRIND_COMMANDS: u64 = 400;

/// Whether callgrind's function `name` is the driver's own code: the
/// `rvscsi` crate (its entry points are `rvscsi_*`, the rest
/// `rvscsi::...`), the `core` code it calls, the C library's memory
/// copies its copies become, and code callgrind has no symbol for (the
/// kernel module under `--module`, mapped by the loader). Not the
/// driver's: the emulated kernel functions it calls (plain C names such
/// as `ddi_dma_sync`, `mutex_enter`, `__dtrace_probe_*`), the test bed
/// (`rvscsi_emu::`, `rvscsi_sim::`) and the standard library, whose
/// instructions at the edges of a driver frame (an emulated function's
/// own entry before its kernel frame opens, the framework's call into an
/// entry point after the driver frame opened) callgrind collects too.
pub fn is_driver_function(name: &str) -> bool {
    if name.contains("::") {
        let name = name.trim_start_matches('<');
        return (name.starts_with("rvscsi::") || name.starts_with("core::"))
            && !name.starts_with("rvscsi_emu")
            && !name.starts_with("rvscsi_sim");
    }
    name.starts_with("rvscsi_")
        || name.starts_with("0x")
        || [
            "__memcpy",
            "__memmove",
            "__memset",
            "memcpy",
            "memmove",
            "memset",
        ]
        .iter()
        .any(|m| name.starts_with(m))
}

/// The instructions of one callgrind dump (`--compress-strings=no`,
/// `--dump-instr=no`) spent in the driver's own functions
/// ([`is_driver_function`]): each function's self cost, that is its cost
/// lines, not the inclusive cost that follows each `calls=` line.
pub fn own_instructions(dump: &str) -> u64 {
    let mut own = 0u64;
    let mut driver = false;
    let mut after_calls = false;
    for l in dump.lines() {
        if let Some(f) = l.strip_prefix("fn=") {
            driver = is_driver_function(f.trim());
            after_calls = false;
        } else if l.starts_with("calls=") {
            after_calls = true;
        } else if l.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) {
            if std::mem::take(&mut after_calls) {
                continue;
            }
            if driver {
                own += l
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    own
}

/// The driver's instructions per command for each memory row, counted by
/// running this benchmark under callgrind with collection only inside
/// driver frames (see `rvscsi_emu::meter`), one dump per row, and only
/// the instructions of the driver's own functions
/// ([`own_instructions`]).
fn count_instructions(o: &BenchOptions) -> Result<HashMap<String, f64>, String> {
    let exe = match &o.exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?,
    };
    let dir = crate::testkit::TempDir::new("callgrind");
    let out = dir.path("cg.out");
    let deepest = o.qds.iter().copied().max().map_or(1, u64::from);
    let commands = o.commands.min(CALLGRIND_COMMANDS.max(deepest));
    let join = |v: Vec<String>| v.join(",");
    let mut cmd = std::process::Command::new("valgrind");
    cmd.args([
        "--tool=callgrind",
        "--collect-atstart=no",
        "--dump-instr=no",
        "--compress-strings=no",
    ])
    .arg(format!("--callgrind-out-file={}", out.display()))
    .arg(&exe)
    .args([
        "bench",
        "--callgrind-child",
        "--json",
        "--backend",
        "memory",
    ])
    .args(["--repeat", "1", "--commands", &commands.to_string()])
    .args(["--qd", &join(o.qds.iter().map(u32::to_string).collect())])
    .args([
        "--queues",
        &join(o.queues.iter().map(u32::to_string).collect()),
    ])
    .args([
        "--mix",
        &join(o.mixes.iter().map(|m| m.name().to_string()).collect()),
    ])
    .args([
        "--lifecycle",
        &join(o.lifecycles.iter().map(|l| l.name().to_string()).collect()),
    ]);
    if let Some(m) = &o.module {
        cmd.args(["--module", m]);
    }
    if o.psm == rvscsi_emu::ddi::intr::Psm::Pcplusmp {
        cmd.args(["--psm", "pcplusmp"]);
    }
    let run = cmd.output().map_err(|e| {
        format!(
            "cannot run valgrind ({e}); install it (apt-get install valgrind) for insns_per_cmd"
        )
    })?;
    if !run.status.success() {
        let err = String::from_utf8_lossy(&run.stderr);
        let tail: Vec<&str> = err.lines().rev().take(12).collect();
        return Err(format!(
            "the callgrind run failed ({}): {}",
            run.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    // Each dump: "desc: Trigger: Client Request: rvscsi-bench <key>
    // switches=<n>", then the instructions per function.
    let mut counts = HashMap::new();
    let entries = std::fs::read_dir(&dir.0).map_err(|e| format!("callgrind output: {e}"))?;
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("desc: Trigger: Client Request: rvscsi-bench "))
            .and_then(|l| l.trim().split_once(" switches="))
            .map(|(k, _)| k.to_string());
        if let Some(key) = key.filter(|k| !k.starts_with("calibration")) {
            let own = own_instructions(&text);
            counts.insert(key, own as f64 / commands as f64);
        }
    }
    let expected = o.qds.len() * o.queues.len() * o.mixes.len() * o.lifecycles.len() * 2;
    if counts.len() != expected {
        return Err(format!(
            "callgrind produced {} of the {expected} row counts",
            counts.len()
        ));
    }
    Ok(counts)
}

/// Runs the benchmark; each row is printed as soon as it is measured.
pub fn run(o: &BenchOptions, out: &mut dyn Write, err: &mut dyn Write) -> Result<Vec<Row>, String> {
    if o.callgrind_child && !meter::valgrind::running() {
        return Err("--callgrind-child is for the run under valgrind that bench starts".into());
    }
    let insns = if o.instructions && !o.callgrind_child && o.backends.contains(&Backend::Memory) {
        let _ = writeln!(err, "bench: counting instructions under callgrind first");
        match count_instructions(o) {
            Ok(c) => c,
            Err(e) => {
                let _ = writeln!(err, "bench: no instruction counts: {e}");
                HashMap::new()
            }
        }
    } else {
        HashMap::new()
    };
    let module = match &o.module {
        Some(path) => Some(crate::cli::load_module(path)?),
        None => None,
    };
    let binding = match &module {
        Some(m) => Binding::DevOps(m.dev_ops().ok_or("the module installed no dev_ops")?),
        None => Binding::Library,
    };
    // The meter's cost per side switch: calls of an empty kernel function
    // less the same calls without its kernel frame (what a call costs the
    // caller stays the driver's).
    // (Under callgrind only the driver's own functions are counted, so no
    // calibration is needed there: see `own_instructions`.)
    let bare = meter::calibrate_bare(CALIBRATION_CALLS);
    let calibration = meter::calibrate(CALIBRATION_CALLS);
    meter::valgrind::zero_stats();
    let switch_ns = calibration.driver_ns.saturating_sub(bare.driver_ns) as f64
        / calibration.switches.saturating_sub(bare.switches).max(1) as f64;
    meter::count_sites(o.kcall_sites);
    if !o.json {
        let _ = writeln!(out, "{}", table_header());
    }
    let mut rows = Vec::new();
    for &device in &o.devices {
        for &backend in &o.backends {
            if device == HbaDevice::Pvscsi && backend != Backend::Qemu {
                let _ = writeln!(
                    err,
                    "bench: pvscsi runs on QEMU only (the in-process model is virtio-scsi): no {} rows",
                    backend_name(backend)
                );
                continue;
            }
            for &queues in &o.queues {
                if device == HbaDevice::Pvscsi && queues != 1 {
                    let _ = writeln!(
                        err,
                        "bench: pvscsi has one request queue: no rows for {queues} queues"
                    );
                    continue;
                }
                for variant in Variant::of(device) {
                    let rig = Rig::try_start(match device {
                        HbaDevice::VirtioScsi => RigConfig {
                            images: vec![(65_536, 0, 0)],
                            transport: "modern".into(),
                            interrupts: "msix".into(),
                            num_queues: Some(queues),
                            props: variant.props(),
                            driver: Driver::Recorder,
                            binding,
                            backend,
                            blank_images: true,
                            psm: o.psm,
                            ..RigConfig::default()
                        },
                        HbaDevice::Pvscsi => RigConfig {
                            props: variant.props(),
                            driver: Driver::Recorder,
                            binding,
                            blank_images: true,
                            psm: o.psm,
                            ..RigConfig::pvscsi(vec![(65_536, 0, 0)])
                        },
                    })?;
                    let luns = rig.load_luns();
                    let lun = luns.first().ok_or("no LUN was configured")?.clone();
                    let setup = Setup {
                        device,
                        rig: &rig,
                        lun: &lun,
                        backend,
                        queues,
                        vectors: rvscsi_emu::ddi::intr::allocated(
                            &rig.bed().machine,
                            rig.bed().hba,
                        ),
                        variant,
                        switch_ns,
                    };
                    for &lifecycle in &o.lifecycles {
                        for &mix in &o.mixes {
                            for &qd in &o.qds {
                                let qd = variant.depth(qd);
                                if rows.iter().any(|r: &Row| {
                                    r.device == device
                                        && r.backend == backend
                                        && r.queues == queues
                                        && r.variant == variant
                                        && (r.mix, r.lifecycle, r.qd) == (mix, lifecycle, qd)
                                }) {
                                    // The in-tree-like depth is capped: one row each.
                                    continue;
                                }
                                let mut row = measure(&setup, o, (mix, lifecycle), qd)?;
                                row.insns_per_cmd = insns.get(&row.key()).copied();
                                let line = if o.json { row.json() } else { table_line(&row) };
                                let _ = writeln!(out, "{line}");
                                let _ = out.flush();
                                rows.push(row);
                            }
                        }
                    }
                    if let Some(dev) = &rig.bed().machine.memdev {
                        let errors = dev.errors();
                        if !errors.is_empty() {
                            return Err(format!("the in-memory device found faults: {errors:?}"));
                        }
                    }
                    let report = rig.finish();
                    if !report.is_clean() {
                        return Err(format!("detach after the bench was not clean: {report:?}"));
                    }
                }
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
        "bench: {} rows, {} commands per run, {} runs per row; ns/cmd, insns/cmd and kcalls/cmd \
         are the driver's own (tran_setup_pkt and tran_teardown_pkt included; the framework's \
         packet cache and the DMA bind and unbind excluded; probe sites apart in probes/cmd), \
         the meter's {switch_ns:.0} ns per side switch taken off",
        rows.len(),
        o.commands,
        o.repeat
    );
    Ok(rows)
}
