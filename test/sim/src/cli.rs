//! The `rvscsi-sim` command line: options naming the machine (disk images,
//! transport, interrupts, queues), and the `format`, `dd` and `kstat`
//! commands.

use crate::sd::{Disk, Sd, SdDriver};
use rvscsi_emu::{Bed, BedConfig, Disk as MachineDisk, DriverBinding, MachineConfig, VirtioPci};
use rvscsi_loader::{Kernel, Module};
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::Instant;

/// What to run the driver on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimOptions {
    /// `--device virtio-scsi|pvscsi`: which HBA QEMU plays.
    pub device: HbaDevice,
    /// `--transport legacy|modern`
    pub transport: String,
    /// `--interrupts msix|msi|intx|poll`
    pub interrupts: String,
    /// `--num-queues N`
    pub num_queues: Option<u32>,
    /// Disks: (QEMU filename, target, lun).
    pub disks: Vec<(String, u8, u16)>,
    /// `--qemu PATH`
    pub qemu: Option<String>,
    /// `--module PATH`: run the kernel module object instead of the
    /// library linked into this program.
    pub module: Option<String>,
    /// `--stats`: after the command, print the driver's kstats (`kstat -p
    /// rvscsi` form) and the ereports it posted (`fmdump -eV` form).
    pub stats: bool,
    /// `--kstat` (or the `kstat` command): after the command, print the
    /// instance's kstats (`kstat -p rvscsi:<instance>`) and the ereports
    /// (`fmdump -e`: time and class).
    pub kstat: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            device: HbaDevice::VirtioScsi,
            transport: "modern".into(),
            interrupts: "msix".into(),
            num_queues: None,
            disks: Vec::new(),
            qemu: None,
            module: None,
            stats: false,
            kstat: false,
        }
    }
}

/// The HBA families `--device` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbaDevice {
    /// `virtio-scsi` (QEMU `virtio-scsi-pci`), the default.
    VirtioScsi,
    /// `pvscsi` (QEMU `pvscsi`, VMware PVSCSI).
    Pvscsi,
}

impl HbaDevice {
    /// Parses a `--device` value.
    pub fn parse(v: &str) -> Result<HbaDevice, String> {
        match v {
            "virtio-scsi" => Ok(HbaDevice::VirtioScsi),
            "pvscsi" => Ok(HbaDevice::Pvscsi),
            _ => Err(format!("--device: '{v}' is neither virtio-scsi nor pvscsi")),
        }
    }

    /// Its `--device` name (and the bench rows' `device` field).
    pub fn name(self) -> &'static str {
        match self {
            HbaDevice::VirtioScsi => "virtio-scsi",
            HbaDevice::Pvscsi => "pvscsi",
        }
    }

    /// The machine with `disks` behind this HBA.
    pub fn machine(self, disks: Vec<MachineDisk>) -> MachineConfig {
        match self {
            HbaDevice::VirtioScsi => MachineConfig::virtio_scsi(disks),
            HbaDevice::Pvscsi => MachineConfig::pvscsi(disks),
        }
    }
}

/// Usage text.
pub const USAGE: &str = "\
usage: rvscsi-sim [options] format DISK...
       rvscsi-sim [options] dd [--kstat] DISK... -- if=FILE of=FILE [bs=N] [count=N] [skip=N] [seek=N]
       rvscsi-sim [options] kstat DISK...
       rvscsi-sim bench [bench options]   (rvscsi-sim bench --help)

Attaches the rvscsi driver to QEMU's device model (virtio-scsi, or VMware
PVSCSI with --device pvscsi) over the given disk images and runs an
illumos-style command on the disks it finds.

DISK is a QEMU block filename (a raw image, or e.g. blkdebug:rules.conf:disk.img),
optionally followed by ,target=T and ,lun=L (default: the Nth disk is target N, LUN 0).
A dd operand naming a disk is /dev/rdsk/cTdL (or cTdL, with T and L in hex).

options:
  --device virtio-scsi|pvscsi   the HBA QEMU plays (default virtio-scsi)
  --transport legacy|modern     virtio-pci interface (default modern; virtio-scsi only)
  --interrupts msix|msi|intx|poll
                                interrupt type the driver is told to use (default msix;
                                with --device pvscsi, whatever the driver finds: QEMU's
                                pvscsi has MSI and INTx, no MSI-X)
  --num-queues N                virtio-scsi request queues of the device (virtio-scsi only)
  --qemu PATH                   the qemu-system-x86_64 to run
  --module PATH                 load this kernel module object (kernel/drv/amd64/rvscsi,
                                built by pkg/build.sh) under the illumos loader's rules
                                and drive the disks through it, instead of the library
                                linked into rvscsi-sim
  --stats                       after the command, print the driver's kstats
                                (kstat -p rvscsi) and ereports (fmdump -eV) to stdout
  --kstat                       after the command, print the instance's kstats
                                (kstat -p rvscsi:INSTANCE) and ereports (fmdump -e)

kstat prints, after discovery, the kstats of the instance (kstat -p form) and
the ereports the driver posted (fmdump -e form); dd --kstat does so after the
copy (the statistics go to stdout, dd's summary to stderr).
";

/// Parses options and disk arguments; returns the options and the rest.
pub fn parse_options(args: &[String]) -> Result<(SimOptions, Vec<String>), String> {
    let mut o = SimOptions::default();
    let mut interrupts_given = false;
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let mut value = |name: &str| -> Result<String, String> {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--device" => o.device = HbaDevice::parse(&value("--device")?)?,
            "--transport" => {
                let v = value("--transport")?;
                if v != "legacy" && v != "modern" {
                    return Err(format!("--transport: '{v}' is neither legacy nor modern"));
                }
                o.transport = v;
            }
            "--interrupts" => {
                let v = value("--interrupts")?;
                if !["msix", "msi", "intx", "poll"].contains(&v.as_str()) {
                    return Err(format!(
                        "--interrupts: '{v}' is not one of msix, msi, intx, poll"
                    ));
                }
                o.interrupts = v;
                interrupts_given = true;
            }
            "--num-queues" => {
                let v = value("--num-queues")?;
                o.num_queues = Some(
                    v.parse()
                        .map_err(|_| format!("--num-queues: '{v}' is not a number"))?,
                );
            }
            "--qemu" => o.qemu = Some(value("--qemu")?),
            "--module" => o.module = Some(value("--module")?),
            "--stats" => o.stats = true,
            "--kstat" => o.kstat = true,
            _ => rest.extend(args[i..].iter().cloned()),
        }
        if !rest.is_empty() {
            break;
        }
        i += 1;
    }
    if o.device == HbaDevice::Pvscsi {
        if o.transport != "modern" || o.num_queues.is_some() {
            return Err(
                "--transport and --num-queues are virtio-scsi's: pvscsi has neither".into(),
            );
        }
        if !interrupts_given {
            o.interrupts = "auto".into();
        }
    }
    Ok((o, rest))
}

/// Parses a DISK argument: `FILE[,target=T][,lun=L]`.
pub fn parse_disk(arg: &str, index: usize) -> Result<(String, u8, u16), String> {
    let mut target = u8::try_from(index).map_err(|_| "too many disks".to_string())?;
    let mut lun = 0u16;
    let mut file = arg.to_string();
    // Options are only recognized at the end, so QEMU filenames with
    // colons and commas of their own still work.
    while let Some(comma) = file.rfind(',') {
        let opt = file[comma + 1..].to_string();
        if let Some(t) = opt.strip_prefix("target=") {
            target = t.parse().map_err(|_| format!("bad target in '{arg}'"))?;
        } else if let Some(l) = opt.strip_prefix("lun=") {
            lun = l.parse().map_err(|_| format!("bad lun in '{arg}'"))?;
            if lun > 16383 {
                return Err(format!("lun {lun} in '{arg}' is beyond 16383"));
            }
        } else {
            break;
        }
        file.truncate(comma);
    }
    Ok((file, target, lun))
}

/// Starts QEMU with the disks and attaches the driver: the library's, or,
/// with `binding`, a loaded module's.
pub fn attach(
    o: &SimOptions,
    binding: Option<Arc<dyn DriverBinding>>,
) -> Result<(Bed, Arc<Sd>), String> {
    if o.disks.is_empty() {
        return Err("no disk given".into());
    }
    let disks = o
        .disks
        .iter()
        .map(|(f, t, l)| MachineDisk {
            file: f.clone(),
            target: *t,
            lun: *l,
        })
        .collect();
    let mut mc = o.device.machine(disks);
    if o.device == HbaDevice::VirtioScsi {
        mc.virtio = if o.transport == "legacy" {
            VirtioPci::Transitional
        } else {
            VirtioPci::ModernOnly
        };
        mc.num_queues = o.num_queues;
    }
    if let Some(q) = &o.qemu {
        mc.qemu.binary = q.into();
    }
    let sd = Sd::new();
    let intr = match o.interrupts.as_str() {
        "intx" => "fixed",
        other => other,
    };
    let mut cfg = BedConfig::new(mc, Arc::new(SdDriver(sd.clone())))
        .prop_str("virtio-transport", &o.transport)
        .prop_str("interrupt-type", intr);
    if let Some(b) = binding {
        cfg.binding = b;
    }
    let bed = Bed::attach(cfg).map_err(|e| e.to_string())?;
    Ok((bed, sd))
}

/// The `format` listing: one line per disk.
pub fn format_listing(disks: &[Arc<Disk>]) -> String {
    let mut s = String::new();
    for d in disks {
        let _ = writeln!(
            s,
            "{} {} {} {} x {}",
            d.name(),
            d.vendor,
            d.product,
            d.blocks,
            d.block_size
        );
    }
    s
}

/// dd operands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DdArgs {
    /// if=
    pub input: String,
    /// of=
    pub output: String,
    /// bs= (bytes)
    pub bs: usize,
    /// count= (blocks of bs; None: to the end of the input)
    pub count: Option<u64>,
    /// skip= (input blocks)
    pub skip: u64,
    /// seek= (output blocks)
    pub seek: u64,
}

/// Parses a size as dd does: a number with an optional k, m, g, b (512) suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1024),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        'b' => (&s[..s.len() - 1], 512),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Parses dd's operands.
pub fn parse_dd(ops: &[String]) -> Result<DdArgs, String> {
    let mut a = DdArgs {
        input: String::new(),
        output: String::new(),
        bs: 512,
        count: None,
        skip: 0,
        seek: 0,
    };
    for op in ops {
        let (k, v) = op
            .split_once('=')
            .ok_or_else(|| format!("dd: bad operand '{op}'"))?;
        let num = || parse_size(v).ok_or_else(|| format!("dd: bad number '{v}' for {k}"));
        match k {
            "if" => a.input = v.into(),
            "of" => a.output = v.into(),
            "bs" => a.bs = usize::try_from(num()?).map_err(|_| "dd: bs too large".to_string())?,
            "count" => a.count = Some(num()?),
            "skip" => a.skip = num()?,
            "seek" => a.seek = num()?,
            _ => return Err(format!("dd: unknown operand '{k}'")),
        }
    }
    if a.input.is_empty() || a.output.is_empty() {
        return Err("dd: both if= and of= are needed".into());
    }
    if a.bs == 0 {
        return Err("dd: bs must be positive".into());
    }
    Ok(a)
}

/// If `path` names a disk (`/dev/rdsk/c0tTdL`, `c0tTdL`, with an
/// optional `p0`), its name `c0tTdL`: target and LUN in decimal, as
/// devfsadm writes them (see [`crate::sd::Disk::name`]).
pub fn disk_name(path: &str) -> Option<String> {
    let name = path
        .strip_prefix("/dev/rdsk/")
        .or_else(|| path.strip_prefix("/dev/dsk/"))
        .unwrap_or(path);
    let name = name.strip_suffix("p0").unwrap_or(name);
    let (t, l) = name.strip_prefix("c0t")?.split_once('d')?;
    let decimal = |s: &str| {
        let digits = s.strip_prefix('-').unwrap_or(s);
        !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit())
    };
    (decimal(t) && decimal(l)).then(|| name.to_string())
}

enum End {
    Disk(Arc<Disk>),
    File(std::fs::File),
}

/// dd's summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DdSummary {
    /// Whole blocks read.
    pub full_in: u64,
    /// Partial blocks read.
    pub part_in: u64,
    /// Whole blocks written.
    pub full_out: u64,
    /// Partial blocks written.
    pub part_out: u64,
    /// Bytes copied.
    pub bytes: u64,
}

impl DdSummary {
    /// As dd prints it.
    pub fn render(&self, secs: f64) -> String {
        let rate = if secs > 0.0 {
            self.bytes as f64 / secs
        } else {
            0.0
        };
        format!(
            "{}+{} records in\n{}+{} records out\n{} bytes transferred in {:.6} secs ({:.0} bytes/sec)\n",
            self.full_in, self.part_in, self.full_out, self.part_out, self.bytes, secs, rate
        )
    }
}

/// Runs dd between a disk and a host file (either way) or two disks.
pub fn dd(sd: &Sd, a: &DdArgs) -> Result<DdSummary, String> {
    let open = |p: &str, write: bool| -> Result<End, String> {
        if let Some(name) = disk_name(p) {
            return sd
                .disk_named(&name)
                .map(End::Disk)
                .ok_or_else(|| format!("dd: {p}: No such device"));
        }
        let f = if write {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        } else {
            std::fs::File::open(p)
        };
        f.map(End::File).map_err(|e| format!("dd: {p}: {e}"))
    };
    let mut input = open(&a.input, false)?;
    let mut output = open(&a.output, true)?;
    for (e, name) in [(&input, &a.input), (&output, &a.output)] {
        if let End::Disk(d) = e
            && !a.bs.is_multiple_of(d.block_size as usize)
        {
            return Err(format!(
                "dd: {name}: bs={} is not a multiple of the {}-byte block size: Invalid argument",
                a.bs, d.block_size
            ));
        }
    }
    if let End::File(f) = &mut output {
        f.seek(SeekFrom::Start(a.seek * a.bs as u64))
            .map_err(|e| format!("dd: {}: {e}", a.output))?;
    }
    if let End::File(f) = &mut input {
        f.seek(SeekFrom::Start(a.skip * a.bs as u64))
            .map_err(|e| format!("dd: {}: {e}", a.input))?;
    }
    let mut s = DdSummary::default();
    let mut block = 0u64;
    while a.count.is_none_or(|c| block < c) {
        let data = match &mut input {
            End::Disk(d) => {
                let at = (a.skip + block) * a.bs as u64;
                if at >= d.capacity() {
                    break;
                }
                let n = (a.bs as u64).min(d.capacity() - at) as usize;
                d.read(at / u64::from(d.block_size), n)
                    .map_err(|e| format!("dd: read {}: {e} (offset {at})", a.input))?
            }
            End::File(f) => {
                let mut buf = vec![0u8; a.bs];
                let mut got = 0;
                while got < a.bs {
                    let n = f
                        .read(&mut buf[got..])
                        .map_err(|e| format!("dd: read {}: {e}", a.input))?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                buf.truncate(got);
                buf
            }
        };
        if data.is_empty() {
            break;
        }
        if data.len() == a.bs {
            s.full_in += 1;
        } else {
            s.part_in += 1;
        }
        match &mut output {
            End::Disk(d) => {
                let at = (a.seek + block) * a.bs as u64;
                if data.len() % d.block_size as usize != 0 {
                    return Err(format!(
                        "dd: write {}: a partial block of {} bytes: Invalid argument",
                        a.output,
                        data.len()
                    ));
                }
                if at + data.len() as u64 > d.capacity() {
                    return Err(format!(
                        "dd: write {}: No space left on device (offset {at})",
                        a.output
                    ));
                }
                d.write(at / u64::from(d.block_size), &data)
                    .map_err(|e| format!("dd: write {}: {e} (offset {at})", a.output))?;
            }
            End::File(f) => f
                .write_all(&data)
                .map_err(|e| format!("dd: write {}: {e}", a.output))?,
        }
        if data.len() == a.bs {
            s.full_out += 1;
        } else {
            s.part_out += 1;
        }
        s.bytes += data.len() as u64;
        block += 1;
        if data.len() < a.bs {
            break;
        }
    }
    if let End::File(f) = &mut output {
        f.flush().map_err(|e| format!("dd: {}: {e}", a.output))?;
    }
    Ok(s)
}

/// Runs `rvscsi-sim` with `args`; returns the exit code, printing to
/// `out` and `err`.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    if args.first().map(String::as_str) == Some("bench") {
        let o = match crate::bench::parse(&args[1..]) {
            Ok(o) => o,
            Err(e) => {
                let _ = writeln!(err, "rvscsi-sim: {e}\n{}", crate::bench::USAGE);
                return 2;
            }
        };
        return match crate::bench::run(&o, out, err) {
            Ok(_) => 0,
            Err(e) => {
                let _ = writeln!(err, "rvscsi-sim: bench: {e}");
                1
            }
        };
    }
    let (mut o, rest) = match parse_options(args) {
        Ok(x) => x,
        Err(e) => {
            let _ = writeln!(err, "rvscsi-sim: {e}\n{USAGE}");
            return 2;
        }
    };
    let Some(cmd) = rest.first() else {
        let _ = write!(err, "{USAGE}");
        return 2;
    };
    let (mut disk_args, ops): (Vec<String>, Vec<String>) = match rest.iter().position(|a| a == "--")
    {
        Some(i) => (rest[1..i].to_vec(), rest[i + 1..].to_vec()),
        None => (rest[1..].to_vec(), Vec::new()),
    };
    // `dd --kstat DISK...`: the flag right after the command word.
    if disk_args.first().map(String::as_str) == Some("--kstat") {
        disk_args.remove(0);
        o.kstat = true;
    }
    for (i, d) in disk_args.iter().enumerate() {
        match parse_disk(d, i) {
            Ok(x) => o.disks.push(x),
            Err(e) => {
                let _ = writeln!(err, "rvscsi-sim: {e}");
                return 2;
            }
        }
    }
    let dd_args = match cmd.as_str() {
        "format" => None,
        "kstat" => {
            o.kstat = true;
            None
        }
        "dd" => match parse_dd(&ops) {
            Ok(a) => Some(a),
            Err(e) => {
                let _ = writeln!(err, "{e}");
                return 2;
            }
        },
        other => {
            let _ = writeln!(err, "rvscsi-sim: unknown command '{other}'\n{USAGE}");
            return 2;
        }
    };
    let mut module = match &o.module {
        Some(path) => match load_module(path) {
            Ok(m) => Some(m),
            Err(e) => {
                let _ = writeln!(err, "rvscsi-sim: {e}");
                return 1;
            }
        },
        None => None,
    };
    let binding = match module.as_ref().map(Module::binding).transpose() {
        Ok(b) => b,
        Err(e) => {
            let _ = writeln!(err, "rvscsi-sim: {e}");
            return 1;
        }
    };
    let (bed, sd) = match attach(&o, binding) {
        Ok(x) => x,
        Err(e) => {
            let _ = writeln!(err, "rvscsi-sim: {e}");
            unload_module(&mut module, err);
            return 1;
        }
    };
    let mut code = 0;
    match dd_args {
        None if cmd == "kstat" => {}
        None => {
            let _ = write!(out, "{}", format_listing(&sd.disks()));
        }
        Some(a) => {
            let t0 = Instant::now();
            match dd(&sd, &a) {
                Ok(s) => {
                    let _ = write!(err, "{}", s.render(t0.elapsed().as_secs_f64()));
                }
                Err(e) => {
                    let _ = writeln!(err, "{e}");
                    code = 1;
                }
            }
        }
    }
    if o.kstat {
        let _ = write!(out, "{}", kstat_report(&bed));
    }
    if o.stats {
        let _ = write!(out, "{}", stats_report(&bed));
    }
    drop(sd);
    match bed.detach() {
        Ok(r) if r.is_clean() => {}
        Ok(r) => {
            let _ = writeln!(
                err,
                "rvscsi-sim: the driver left something behind: leaks {:?}, pages {}, violations {:?}",
                r.leaks, r.pages_leaked, r.violations
            );
            code = 3;
        }
        Err(e) => {
            let _ = writeln!(err, "rvscsi-sim: detach failed: {e}");
            code = 3;
        }
    }
    if !unload_module(&mut module, err) {
        code = 3;
    }
    code
}

/// The driver's kstats in `kstat -p rvscsi` form, then its ereports in
/// `fmdump -eV` form (each read through the emulation's readers:
/// `ks_update` runs for every kstat read).
pub fn stats_report(bed: &Bed) -> String {
    let mut s = String::from("# kstat -p rvscsi\n");
    s.push_str(&rvscsi_emu::ddi::kstat::kstat_p(
        &bed.machine,
        "rvscsi",
        None,
    ));
    s.push_str("# fmdump -eV\n");
    s.push_str(&rvscsi_emu::ddi::fm::fmdump_e(&bed.machine));
    s
}

/// The HBA instance's kstats as `kstat -p rvscsi:<instance>` prints them
/// (each read through its `ks_update`), then the ereports the run posted
/// as `fmdump -e` prints them: a TIME and CLASS header and a line per
/// ereport (TIME is the emulated kernel's `gethrtime`, in seconds: the bed
/// has no wall clock).
pub fn kstat_report(bed: &Bed) -> String {
    let instance = rvscsi_emu::ddi::devinfo::ddi_get_instance(bed.hba);
    let mut s = rvscsi_emu::ddi::kstat::kstat_p(&bed.machine, "rvscsi", Some(instance));
    s.push_str(&fmdump_e(&bed.machine));
    s
}

/// `fmdump -e` of the ereports posted on `m`: the header, then time and
/// class of each, oldest first.
pub fn fmdump_e(m: &rvscsi_emu::Machine) -> String {
    let mut s = String::from("TIME                 CLASS\n");
    for e in rvscsi_emu::ddi::fm::ereports(m) {
        let _ = writeln!(
            s,
            "{:>10}.{:09} {}",
            e.time / 1_000_000_000,
            e.time % 1_000_000_000,
            e.class
        );
    }
    s
}

/// modload: loads the module object at `path` into the emulated kernel,
/// enables its probes, and runs its `_init`.
pub fn load_module(path: &str) -> Result<Module, String> {
    let mut m = Module::load_file(std::path::Path::new(path), &Kernel::test_bed())
        .map_err(|e| e.to_string())?;
    m.enable_probes().map_err(|e| e.to_string())?;
    m.init().map_err(|e| e.to_string())?;
    Ok(m)
}

/// modunload: the module's `_fini`; false (with a message) if it refuses.
fn unload_module(module: &mut Option<Module>, err: &mut dyn Write) -> bool {
    let Some(mut m) = module.take() else {
        return true;
    };
    match m.fini() {
        Ok(0) => true,
        Ok(rc) => {
            let _ = writeln!(err, "rvscsi-sim: {}: _fini returned {rc}", m.name());
            false
        }
        Err(e) => {
            let _ = writeln!(err, "rvscsi-sim: {e}");
            false
        }
    }
}
