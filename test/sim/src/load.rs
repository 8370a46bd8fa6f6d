//! A load generator for the fault scenarios: many commands outstanding
//! across LUNs, READ(10)/WRITE(10) of random sizes at random places, each
//! completion checked — exactly once, against the scenario's idea of an
//! acceptable outcome, and every good read against a model of the disk.

use rvscsi::ffi;
use rvscsi_emu::DataBuf;
use rvscsi_emu::scsa::packet::{Device, InitArgs, Packet, PktResult};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a LUN holds, as far as the test knows.
pub struct DiskModel {
    data: Vec<u8>,
    /// Blocks whose content is unknown (a failed write may or may not
    /// have reached them).
    unknown: Vec<bool>,
}

impl DiskModel {
    /// A disk holding `data` (a whole number of 512-byte blocks).
    pub fn new(data: Vec<u8>) -> DiskModel {
        let blocks = data.len() / 512;
        DiskModel {
            data,
            unknown: vec![false; blocks],
        }
    }

    /// Blocks.
    pub fn blocks(&self) -> u64 {
        self.unknown.len() as u64
    }

    fn range(lba: u64, n: u32) -> std::ops::Range<usize> {
        lba as usize * 512..(lba as usize + n as usize) * 512
    }

    /// Whether `got` is what blocks `lba..+n` hold (unknown blocks match
    /// anything).
    pub fn check(&self, lba: u64, n: u32, got: &[u8]) -> Result<(), String> {
        let want = &self.data[Self::range(lba, n)];
        for b in 0..n as usize {
            if self.unknown[lba as usize + b] {
                continue;
            }
            let r = b * 512..(b + 1) * 512;
            if got[r.clone()] != want[r] {
                return Err(format!("block {} read back wrong", lba + b as u64));
            }
        }
        Ok(())
    }

    /// Blocks `lba..+n` now hold `data`.
    pub fn wrote(&mut self, lba: u64, n: u32, data: &[u8]) {
        self.data[Self::range(lba, n)].copy_from_slice(data);
        for b in 0..n as usize {
            self.unknown[lba as usize + b] = false;
        }
    }

    /// A write to `lba..+n` failed: the content is unknown.
    pub fn failed_write(&mut self, lba: u64, n: u32) {
        for b in 0..n as usize {
            self.unknown[lba as usize + b] = true;
        }
    }
}

/// What the target driver instance attached to a LUN holds, as far as the
/// framework's offline of the LUN cares (sd's soft state): opens
/// (`un_ocmap`, and the `devi_ref` an open puts on the node), commands in
/// the driver (`un_ncmds_in_driver`: from sdstrategy to biodone), and
/// whether the framework declared the device removed.
///
/// detach(9E) is refused while the LUN is open (`detach_node`, devcfg.c:
/// `devi_ref` held) or has commands in the driver (`sd_unit_detach`,
/// sd.c), so the framework keeps the child, marked removed, and
/// `tran_tgt_free` waits for a later, successful offline.
#[derive(Debug, Default)]
pub struct TargetBinding {
    state: Mutex<BindingState>,
}

#[derive(Debug, Default)]
struct BindingState {
    opens: u32,
    in_driver: u32,
    removed: bool,
    detached: bool,
    refusals: u32,
}

impl TargetBinding {
    fn state(&self) -> std::sync::MutexGuard<'_, BindingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// open(9E): refused once detached, and for a removed device (its node
    /// is hidden from lookups: `ndi_devi_device_remove` sets it hidden).
    pub fn open(&self) -> Result<(), &'static str> {
        let mut s = self.state();
        if s.detached {
            return Err("ENXIO: the instance detached");
        }
        if s.removed {
            return Err("ENXIO: the device was removed");
        }
        s.opens += 1;
        Ok(())
    }

    /// close(9E) of one open.
    pub fn close(&self) {
        let mut s = self.state();
        s.opens = s.opens.saturating_sub(1);
    }

    /// A command enters the driver (sdstrategy's `un_ncmds_in_driver++`);
    /// false once the instance detached (nothing may be sent through it).
    pub fn command_begins(&self) -> bool {
        let mut s = self.state();
        if s.detached {
            return false;
        }
        s.in_driver += 1;
        true
    }

    /// A command left the driver (completed, or refused by tran_start).
    pub fn command_ends(&self) {
        let mut s = self.state();
        s.in_driver = s.in_driver.saturating_sub(1);
    }

    /// Whether the framework declared the device removed.
    pub fn is_removed(&self) -> bool {
        self.state().removed
    }

    /// Whether the instance detached (the framework may then free the node).
    pub fn is_detached(&self) -> bool {
        self.state().detached
    }

    /// detach(9E)s refused so far.
    pub fn refusals(&self) -> u32 {
        self.state().refusals
    }

    /// detach(9E): refused while open or with commands in the driver.
    pub fn try_detach(&self) -> Result<(), String> {
        let mut s = self.state();
        let why = if s.opens > 0 {
            format!("open ({} opens)", s.opens)
        } else if s.in_driver > 0 {
            format!("{} commands in the driver", s.in_driver)
        } else {
            s.detached = true;
            return Ok(());
        };
        s.refusals += 1;
        Err(why)
    }

    /// The framework declared the device removed.
    pub fn device_removed(&self) {
        self.state().removed = true;
    }

    /// The framework found the removed device back.
    pub fn device_inserted(&self) {
        self.state().removed = false;
    }
}

/// One LUN under load.
pub struct Lun {
    /// The LUN.
    pub dev: Arc<Device>,
    /// Its model.
    pub model: std::sync::Mutex<DiskModel>,
    /// Whether new commands go to it (a scenario may clear it to stop
    /// sending to the LUN).
    pub active: std::sync::atomic::AtomicBool,
    /// The target driver instance attached to it: a run opens the LUN
    /// through it, counts its commands in it, and stops sending once the
    /// framework says the device was removed.
    pub binding: Arc<TargetBinding>,
}

impl Lun {
    /// A LUN under load, holding `data`, with a binding of its own (one
    /// the framework does not know about).
    pub fn new(dev: Arc<Device>, data: Vec<u8>) -> Lun {
        Lun::bound(dev, Arc::new(TargetBinding::default()), data)
    }

    /// A LUN under load through the target driver instance `binding`.
    pub fn bound(dev: Arc<Device>, binding: Arc<TargetBinding>, data: Vec<u8>) -> Lun {
        Lun {
            dev,
            model: std::sync::Mutex::new(DiskModel::new(data)),
            active: std::sync::atomic::AtomicBool::new(true),
            binding,
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Commands outstanding at once (over all LUNs).
    pub depth: usize,
    /// Commands to issue in all.
    pub commands: usize,
    /// Largest transfer, in blocks.
    pub max_blocks: u32,
    /// Percent of writes.
    pub write_percent: u32,
    /// Percent of packets with an extended status area (`PKT_XARQ`).
    pub xarq_percent: u32,
    /// `pkt_time` of every packet.
    pub pkt_time: i32,
    /// The random seed.
    pub seed: u64,
    /// The whole run must end within this.
    pub limit: Duration,
    /// Only LBAs below this (none: the whole disk).
    pub lba_limit: Option<u64>,
    /// Blocks that some commands are made to cover (fault sites), and the
    /// percent of commands aimed at one of them; half of those start at
    /// the block.
    pub hot: Vec<u64>,
    /// See `hot`.
    pub hot_percent: u32,
    /// Stop issuing after this long (then wait for what is out, within
    /// `limit`); none: issue `commands` in all.
    pub issue_for: Option<Duration>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            depth: 24,
            commands: 300,
            max_blocks: 64,
            write_percent: 40,
            xarq_percent: 30,
            pkt_time: 30,
            seed: 1,
            limit: Duration::from_secs(120),
            lba_limit: None,
            hot: Vec::new(),
            hot_percent: 0,
            issue_for: None,
        }
    }
}

/// A finished command.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Index of its LUN.
    pub lun: usize,
    /// First block.
    pub lba: u64,
    /// Blocks.
    pub blocks: u32,
    /// A write.
    pub write: bool,
    /// With `PKT_XARQ`.
    pub xarq: bool,
    /// When it was started, from the start of the run.
    pub started: Duration,
    /// How it ended.
    pub result: PktResult,
}

impl Completion {
    /// CMD_CMPLT with status GOOD and everything transferred.
    pub fn good(&self) -> bool {
        self.result.reason == ffi::CMD_CMPLT
            && self.result.status() == ffi::STATUS_GOOD
            && self.result.resid == 0
    }

    /// The bytes the command was to move.
    pub fn length(&self) -> isize {
        self.blocks as isize * 512
    }

    /// What no device, however broken, may make of a completion: a
    /// residual outside the transfer, or more sense than the status area
    /// holds (scsi_pkt(9S), scsi_arq_status(9S), scsi_extended_sense).
    pub fn within_bounds(&self) -> Result<(), String> {
        let len = self.length();
        if self.result.resid < 0 || self.result.resid > len {
            return Err(format!("resid {} outside 0..={len}", self.result.resid));
        }
        if let Some(s) = self.result.sense() {
            let cap = if self.xarq {
                ffi::MAX_SENSE_LENGTH
            } else {
                ffi::SENSE_LENGTH
            };
            if s.len() > cap {
                return Err(format!("{} sense bytes in a {cap}-byte area", s.len()));
            }
        }
        Ok(())
    }

    /// Whether it covers block `b`.
    pub fn covers(&self, b: u64) -> bool {
        b >= self.lba && b < self.lba + u64::from(self.blocks)
    }
}

/// What happened.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Commands started (accepted by tran_start).
    pub issued: usize,
    /// Completions seen.
    pub completed: usize,
    /// Good completions.
    pub good: usize,
    /// `TRAN_BUSY` answers (retried).
    pub busy: usize,
    /// Other tran_start refusals.
    pub refused: Vec<i32>,
    /// Completions by pkt_reason.
    pub by_reason: BTreeMap<u8, usize>,
    /// Sense (key, ASC, ASCQ) of CHECK CONDITIONs seen.
    pub sense: BTreeMap<(u8, u8, u8), usize>,
    /// Every broken expectation: data read back wrong, an outcome the
    /// scenario does not accept, a completion reported twice.
    pub problems: Vec<String>,
    /// Commands still outstanding when the time ran out.
    pub hung: usize,
    /// Every completion, in order.
    pub completions: Vec<Completion>,
}

impl LoadReport {
    /// Whether everything completed once, as accepted, with the right data.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.hung == 0 && self.refused.is_empty()
    }

    /// Panics, naming the run `what` and saying what went wrong, unless
    /// the run was clean.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.is_clean(),
            "{what}: problems {:#?}, hung {}, refused {:?}",
            self.problems,
            self.hung,
            self.refused
        );
    }
}

/// Acceptance for runs without faults: only good completions.
pub fn only_good(c: &Completion) -> Result<(), String> {
    if c.good() {
        Ok(())
    } else {
        Err("not good".into())
    }
}

struct Slot {
    pkt: Packet,
    buf: Arc<DataBuf>,
    lun: usize,
    lba: u64,
    blocks: u32,
    write: bool,
    xarq: bool,
    started: Duration,
}

/// A small deterministic random source (xorshift64*).
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn cdb10(write: bool, lba: u64, blocks: u32) -> [u8; 10] {
    let l = (lba as u32).to_be_bytes();
    let n = (blocks as u16).to_be_bytes();
    [
        if write { 0x2a } else { 0x28 },
        0,
        l[0],
        l[1],
        l[2],
        l[3],
        0,
        n[0],
        n[1],
        0,
    ]
}

/// Progress seen by the scenario's hook.
pub struct Progress<'a> {
    /// Completions so far.
    pub completed: usize,
    /// Commands outstanding.
    pub outstanding: usize,
    /// Time since the start.
    pub elapsed: Duration,
    /// The report so far.
    pub report: &'a LoadReport,
}

/// Runs `cfg` over `luns`. `accept` says whether a completion's outcome is
/// one the scenario allows (Err: why not); `during` runs between polls, to
/// inject faults mid-load.
pub fn run(
    luns: &[Arc<Lun>],
    cfg: &LoadConfig,
    accept: &dyn Fn(&Completion) -> Result<(), String>,
    during: &mut dyn FnMut(&Progress<'_>),
) -> LoadReport {
    let mut rng = Rng::new(cfg.seed);
    let mut report = LoadReport::default();
    let mut slots: Vec<Slot> = Vec::new();
    let t0 = Instant::now();
    let mut issued_total = 0usize;
    // The run holds every LUN open, as a consumer of the disks would.
    let mut open: Vec<bool> = luns.iter().map(|l| l.binding.open().is_ok()).collect();
    // New commands go to a LUN while it is open, the scenario wants them,
    // and the framework has not said the device was removed (sd's
    // consumers learn it from the LDI_EV_DEVICE_REMOVE callbacks and the
    // sysevent `ndi_devi_device_remove` posts).
    let sending = |open: &[bool], i: usize| {
        open[i] && luns[i].active.load(Ordering::Acquire) && !luns[i].binding.is_removed()
    };
    while (issued_total < cfg.commands || !slots.is_empty()) && t0.elapsed() < cfg.limit {
        let any_active = (0..luns.len()).any(|i| sending(&open, i));
        if !any_active && slots.is_empty() {
            break;
        }
        // Fill up to the depth.
        let issuing = cfg.issue_for.is_none_or(|d| t0.elapsed() < d);
        if !issuing && slots.is_empty() {
            break;
        }
        while issuing && slots.len() < cfg.depth && issued_total < cfg.commands {
            let li = rng.below(luns.len() as u64) as usize;
            let lun = &luns[li];
            if !sending(&open, li) {
                if !(0..luns.len()).any(|i| sending(&open, i)) {
                    break;
                }
                continue;
            }
            let disk_blocks = lun.model.lock().map(|m| m.blocks()).unwrap_or(0);
            let limit = cfg.lba_limit.unwrap_or(disk_blocks).min(disk_blocks);
            let blocks = 1 + rng.below(u64::from(cfg.max_blocks)) as u32;
            if limit <= u64::from(blocks) {
                break;
            }
            // A range no outstanding command on this LUN touches.
            let mut lba = None;
            let aim = (!cfg.hot.is_empty() && rng.below(100) < u64::from(cfg.hot_percent))
                .then(|| cfg.hot[rng.below(cfg.hot.len() as u64) as usize]);
            // Half the aimed commands start at the hot block (faults that
            // match a command's starting LBA see them often enough whatever
            // the interleaving), the others cover it from a random start.
            let aim_start = rng.below(2) == 0;
            for _ in 0..8 {
                let cand = match aim {
                    Some(h) => {
                        let back = if aim_start {
                            0
                        } else {
                            rng.below(u64::from(blocks))
                        };
                        h.saturating_sub(back).min(limit - u64::from(blocks))
                    }
                    None => rng.below(limit - u64::from(blocks)),
                };
                let clash = slots.iter().any(|s| {
                    s.lun == li
                        && cand < s.lba + u64::from(s.blocks)
                        && s.lba < cand + u64::from(blocks)
                });
                if !clash {
                    lba = Some(cand);
                    break;
                }
            }
            let Some(lba) = lba else { break };
            let write = rng.below(100) < u64::from(cfg.write_percent);
            let xarq = rng.below(100) < u64::from(cfg.xarq_percent);
            let len = blocks as usize * 512;
            let buf = Arc::new(DataBuf::new(len, rng.below(64) as usize * 8, !write));
            if write {
                for (i, b) in buf.bytes_mut().iter_mut().enumerate() {
                    *b = (rng.next_u64() as u8) ^ (i as u8);
                }
            }
            let args = InitArgs {
                statuslen: if xarq { 32 + 96 } else { 32 },
                flags: if xarq { ffi::PKT_XARQ } else { 0 },
                ..InitArgs::default()
            };
            let mut pkt = match lun.dev.init_pkt(Some(buf.clone()), args) {
                Ok(p) => p,
                Err(e) => {
                    report.problems.push(format!("init_pkt failed: {e:?}"));
                    break;
                }
            };
            pkt.cdb_mut().copy_from_slice(&cdb10(write, lba, blocks));
            pkt.set_time(cfg.pkt_time);
            if !lun.binding.command_begins() {
                pkt.destroy();
                open[li] = false;
                continue;
            }
            match pkt.start_async() {
                ffi::TRAN_ACCEPT => {
                    issued_total += 1;
                    report.issued += 1;
                    slots.push(Slot {
                        pkt,
                        buf,
                        lun: li,
                        lba,
                        blocks,
                        write,
                        xarq,
                        started: t0.elapsed(),
                    });
                }
                ffi::TRAN_BUSY => {
                    lun.binding.command_ends();
                    report.busy += 1;
                    pkt.destroy();
                    break;
                }
                rc => {
                    lun.binding.command_ends();
                    issued_total += 1;
                    report.refused.push(rc);
                    pkt.destroy();
                }
            }
        }
        // Reap.
        let mut progressed = false;
        let mut i = 0;
        while i < slots.len() {
            if !slots[i].pkt.is_done() {
                i += 1;
                continue;
            }
            progressed = true;
            let s = slots.swap_remove(i);
            let calls = s.pkt.comp_calls();
            let result = s.pkt.result();
            s.pkt.destroy();
            luns[s.lun].binding.command_ends();
            let c = Completion {
                lun: s.lun,
                lba: s.lba,
                blocks: s.blocks,
                write: s.write,
                xarq: s.xarq,
                started: s.started,
                result,
            };
            report.completed += 1;
            if calls != 1 {
                report
                    .problems
                    .push(format!("{:?} completed {calls} times", (c.lun, c.lba)));
            }
            *report.by_reason.entry(c.result.reason).or_default() += 1;
            if let Some(k) = c.result.sense_key() {
                *report.sense.entry(k).or_default() += 1;
            }
            if let Err(e) = accept(&c) {
                report.problems.push(format!(
                    "LUN {} {} of {} at {}: {e} ({:?})",
                    c.lun,
                    if c.write { "write" } else { "read" },
                    c.blocks,
                    c.lba,
                    c.result
                ));
            }
            let lun = &luns[c.lun];
            let mut model = lun.model.lock().unwrap_or_else(|e| e.into_inner());
            if c.good() {
                report.good += 1;
                if c.write {
                    model.wrote(c.lba, c.blocks, s.buf.bytes());
                } else if let Err(e) = model.check(c.lba, c.blocks, s.buf.bytes()) {
                    report
                        .problems
                        .push(format!("LUN {}: good read at {}: {e}", c.lun, c.lba));
                }
            } else if c.write {
                model.failed_write(c.lba, c.blocks);
            }
            drop(model);
            report.completions.push(c);
        }
        // A LUN the framework declared removed is closed once its last
        // command is back (so its target driver can detach).
        for (i, l) in luns.iter().enumerate() {
            if open[i] && l.binding.is_removed() && !slots.iter().any(|s| s.lun == i) {
                l.binding.close();
                open[i] = false;
            }
        }
        let progress = Progress {
            completed: report.completed,
            outstanding: slots.len(),
            elapsed: t0.elapsed(),
            report: &report,
        };
        during(&progress);
        if !progressed {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    report.hung = slots.len();
    for s in slots {
        report.problems.push(format!(
            "LUN {} {} at {} never completed",
            s.lun,
            if s.write { "write" } else { "read" },
            s.lba
        ));
        // Left allocated: tearing down an outstanding packet would hide the
        // hang the report names. It stays in its target driver too.
        std::mem::forget(s.pkt);
    }
    for (i, l) in luns.iter().enumerate() {
        if open[i] {
            l.binding.close();
        }
    }
    report
}
