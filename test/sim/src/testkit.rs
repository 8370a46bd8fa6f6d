//! Helpers for the integration tests and the benchmark: temporary disk
//! images with a known pattern (a model of what the disk holds), a rig
//! that attaches the driver to them, QEMU 7.2 for the scenarios QEMU
//! 10.0.2 cannot run.

use crate::sd::{Sd, SdDriver};
use rvscsi_emu::{Bed, BedConfig, DetachReport, Disk as MachineDisk, MachineConfig, VirtioPci};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("rvscsi-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create a temporary directory");
        TempDir(p)
    }

    /// A path inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What block `lba` of a patterned image holds (512 bytes, unique per
/// block and per image seed).
pub fn pattern_block(seed: u64, lba: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    let head = format!("rvscsi seed {seed:08x} LBA {lba:016x} ");
    b[..head.len()].copy_from_slice(head.as_bytes());
    let mut x = seed ^ lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    for byte in &mut b[head.len()..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    b
}

/// Pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A raw image file filled with [`pattern_block`]s.
pub struct Image {
    /// Its path.
    pub path: PathBuf,
    /// Pattern seed.
    pub seed: u64,
    /// Size in 512-byte blocks.
    pub blocks: u64,
    /// Filled with the pattern (else all zeros).
    pub patterned: bool,
}

impl Image {
    /// Creates `path` with `blocks` patterned blocks.
    pub fn patterned(path: &Path, seed: u64, blocks: u64) -> Image {
        let mut data = Vec::with_capacity(blocks as usize * 512);
        for lba in 0..blocks {
            data.extend_from_slice(&pattern_block(seed, lba));
        }
        std::fs::write(path, &data).expect("write a disk image");
        Image {
            path: path.to_path_buf(),
            seed,
            blocks,
            patterned: true,
        }
    }

    /// Creates `path` with `blocks` zeroed blocks (a sparse file: quick to
    /// make at any size, for runs that do not check data).
    pub fn blank(path: &Path, blocks: u64) -> Image {
        let f = std::fs::File::create(path).expect("create a disk image");
        f.set_len(blocks * 512).expect("size a disk image");
        Image {
            path: path.to_path_buf(),
            seed: 0,
            blocks,
            patterned: false,
        }
    }

    /// The image file's bytes `[off, off+len)` (what QEMU wrote through).
    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.path).expect("open the image");
        f.seek(SeekFrom::Start(off)).expect("seek the image");
        let mut b = vec![0u8; len];
        f.read_exact(&mut b).expect("read the image");
        b
    }

    /// What blocks `[lba, lba+n)` held when the image was made.
    pub fn expected(&self, lba: u64, n: u64) -> Vec<u8> {
        if !self.patterned {
            return vec![0; n as usize * 512];
        }
        (lba..lba + n)
            .flat_map(|l| pattern_block(self.seed, l))
            .collect()
    }
}

/// Where an unpacked QEMU 7.2 lives (`test/scripts/install-deps.sh
/// --qemu72` puts it under `target/qemu72/root`), or why there is none.
pub fn qemu72_root() -> Result<PathBuf, String> {
    let root = std::env::var_os("RVSCSI_QEMU72_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/qemu72/root"));
    if root.join("usr/bin/qemu-system-x86_64").is_file() {
        Ok(root)
    } else {
        Err(format!(
            "QEMU 7.2 is not unpacked at {} (QEMU 10.0.2 deadlocks on ABORT TASK of a held request, \
             so this scenario needs 7.2): run test/scripts/install-deps.sh --qemu72",
            root.display()
        ))
    }
}

/// A target driver that attaches to every LUN without sending anything
/// (so a raw-packet test finds the LUN as the device left it, power-on
/// unit attention included). Each instance is a
/// [`crate::load::TargetBinding`]: the load generator opens the LUN and
/// counts its commands through it, so the framework's offline of a pulled
/// LUN meets what sd would present (refused while open or busy).
#[derive(Default)]
pub struct Recorder {
    devices: std::sync::Mutex<Vec<(Arc<rvscsi_emu::Device>, Arc<crate::load::TargetBinding>)>>,
}

struct Recorded(Arc<crate::load::TargetBinding>);

impl rvscsi_emu::TargetInstance for Recorded {
    fn detach(&self) {}
    fn try_detach(&self) -> Result<(), String> {
        self.0.try_detach()
    }
    fn device_removed(&self) {
        self.0.device_removed();
    }
    fn device_inserted(&self) {
        self.0.device_inserted();
    }
}

impl rvscsi_emu::TargetDriver for Recorder {
    fn attach(
        &self,
        dev: Arc<rvscsi_emu::Device>,
        _inq: &[u8],
    ) -> Result<Box<dyn rvscsi_emu::TargetInstance>, String> {
        let binding = Arc::new(crate::load::TargetBinding::default());
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((dev, binding.clone()));
        Ok(Box::new(Recorded(binding)))
    }
}

impl Recorder {
    /// The LUNs attached, in order.
    pub fn devices(&self) -> Vec<Arc<rvscsi_emu::Device>> {
        self.attached().into_iter().map(|(d, _)| d).collect()
    }

    /// The LUNs attached, in order, with their instances.
    pub fn attached(&self) -> Vec<(Arc<rvscsi_emu::Device>, Arc<crate::load::TargetBinding>)> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Which target driver the rig binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// The sd-like driver (attach sequence, disks).
    Sd,
    /// The recorder (no I/O at attach).
    Recorder,
}

/// How the bed reaches the driver's `dev_ops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The library's entry points, the shim's part done in Rust
    /// (`rvscsi_emu::bed::LibraryBinding`). Not what the kernel runs: use
    /// it only where a test needs what the shim cannot do, and say why
    /// there.
    Library,
    /// The C shim built for the host, loaded through `_init`, attaching
    /// through the `dev_ops(9S)` it installs, as the kernel does: the
    /// default.
    Shim,
    /// The `dev_ops(9S)` at this address: a module object loaded by
    /// `rvscsi-loader` ([`rvscsi_loader::Module::dev_ops`]).
    DevOps(usize),
}

/// Which QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qemu {
    /// The installed one (10.x).
    System,
    /// The unpacked 7.2.
    V72,
}

/// What to attach.
#[derive(Clone, Debug)]
pub struct RigConfig {
    /// Images: (blocks, target, lun); file `d<i>.img`.
    pub images: Vec<(u64, u8, u16)>,
    /// Per image, a QEMU filename prefix such as `blkdebug:RULES:` (the
    /// rules file is written into the rig's directory).
    pub blkdebug: Vec<Option<String>>,
    /// `legacy` or `modern`.
    pub transport: String,
    /// `msix`, `msi`, `fixed`, `poll`.
    pub interrupts: String,
    /// Extra driver properties.
    pub props: Vec<(String, i32)>,
    /// virtio-scsi `num_queues`.
    pub num_queues: Option<u32>,
    /// MSI-X vectors of the device.
    pub msix_vectors: Option<u32>,
    /// QEMU.
    pub qemu: Qemu,
    /// Extra `-drive` options for every disk (e.g. throttling).
    pub drive_opts: Vec<String>,
    /// The target driver.
    pub driver: Driver,
    /// How the driver is reached.
    pub binding: Binding,
    /// Device misbehaviour armed before the driver attaches.
    pub faults: Vec<rvscsi_emu::faults::Fault>,
    /// What plays the device (QEMU, or the in-process model).
    pub backend: rvscsi_emu::Backend,
    /// Zeroed images instead of patterned ones (for runs that check no
    /// data: much quicker to make).
    pub blank_images: bool,
    /// The emulated kernel's interrupt platform (apix, or pcplusmp).
    pub psm: rvscsi_emu::ddi::intr::Psm,
    /// Which HBA QEMU plays (virtio-scsi unless said otherwise).
    pub family: rvscsi_emu::HbaFamily,
    /// Disks that hold nothing and answer every read and write after this
    /// many nanoseconds (QEMU's `null-co` with `latency-ns`, reads zeroes):
    /// I/O held in the device without blkdebug, which QEMU's pvscsi cannot
    /// abort or reset around (shared/notes/pvscsi.md §2). The images are
    /// still made (blank), for their sizes.
    pub null_latency_ns: Option<u64>,
    /// The `apix_system_max_vectors` tunable: the IRM pool's size.
    pub apix_system_max_vectors: Option<u32>,
    /// The FM capabilities the parent nexus supports (default: npe's).
    pub nexus_fm_caps: Option<i32>,
}

impl Default for RigConfig {
    fn default() -> Self {
        RigConfig {
            images: vec![(8192, 0, 0)],
            blkdebug: Vec::new(),
            transport: "modern".into(),
            interrupts: "msix".into(),
            props: Vec::new(),
            num_queues: None,
            msix_vectors: None,
            qemu: Qemu::System,
            drive_opts: Vec::new(),
            driver: Driver::Sd,
            // The real C shim, so that every test attaches the way the
            // kernel attaches the module (issue 11).
            binding: Binding::Shim,
            faults: Vec::new(),
            backend: rvscsi_emu::Backend::Qemu,
            blank_images: false,
            psm: rvscsi_emu::ddi::intr::Psm::default(),
            apix_system_max_vectors: None,
            nexus_fm_caps: None,
            family: rvscsi_emu::HbaFamily::VirtioScsi,
            null_latency_ns: None,
        }
    }
}

impl RigConfig {
    /// QEMU's VMware PVSCSI with `images` (blocks, target, lun), interrupts
    /// as the driver chooses them (QEMU offers MSI and INTx, no MSI-X).
    pub fn pvscsi(images: Vec<(u64, u8, u16)>) -> RigConfig {
        RigConfig {
            images,
            interrupts: "auto".into(),
            family: rvscsi_emu::HbaFamily::Pvscsi,
            ..RigConfig::default()
        }
    }
}

/// The driver attached to QEMU over patterned images, with sd on top.
pub struct Rig {
    /// The bed.
    pub bed: Option<Bed>,
    /// The target driver.
    pub sd: Arc<Sd>,
    /// The recorder, with `Driver::Recorder`.
    pub recorder: Arc<Recorder>,
    /// The images, in order.
    pub images: Vec<Image>,
    /// Their (target, LUN), in the same order.
    pub addrs: Vec<(u8, u16)>,
    /// The directory holding them.
    pub dir: TempDir,
}

impl Rig {
    /// Attaches per `cfg`; panics with the reason if it cannot.
    pub fn start(cfg: RigConfig) -> Rig {
        Self::try_start(cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Attaches per `cfg`.
    pub fn try_start(cfg: RigConfig) -> Result<Rig, String> {
        Self::try_attach(cfg).map_err(|f| f.message)
    }

    /// Attaches per `cfg`; on failure, what the driver left behind.
    pub fn try_attach(cfg: RigConfig) -> Result<Rig, rvscsi_emu::bed::AttachFailure> {
        let failed = |message: String| rvscsi_emu::bed::AttachFailure {
            message,
            report: rvscsi_emu::DetachReport::default(),
        };
        let dir = TempDir::new("rig");
        let mut images = Vec::new();
        let mut disks = Vec::new();
        for (i, &(blocks, target, lun)) in cfg.images.iter().enumerate() {
            let path = dir.path(&format!("d{i}.img"));
            let img = if cfg.blank_images {
                Image::blank(&path, blocks)
            } else {
                Image::patterned(&path, 0x1000 + i as u64, blocks)
            };
            let prefix = cfg.blkdebug.get(i).cloned().flatten().unwrap_or_default();
            let mut file = match cfg.null_latency_ns {
                None => format!("{prefix}{}", img.path.display()),
                Some(ns) => format!(
                    "null-co://,file.size={},file.latency-ns={ns},file.read-zeroes=on",
                    blocks * 512
                ),
            };
            for o in &cfg.drive_opts {
                file.push(',');
                file.push_str(o);
            }
            disks.push(MachineDisk { file, target, lun });
            images.push(img);
        }
        let mut mc = match cfg.family {
            rvscsi_emu::HbaFamily::VirtioScsi => {
                let mut mc = MachineConfig::virtio_scsi(disks);
                mc.virtio = if cfg.transport == "legacy" {
                    VirtioPci::Transitional
                } else {
                    VirtioPci::ModernOnly
                };
                mc
            }
            rvscsi_emu::HbaFamily::Pvscsi => MachineConfig::pvscsi(disks),
        };
        mc.num_queues = cfg.num_queues;
        mc.msix_vectors = cfg.msix_vectors;
        mc.backend = cfg.backend;
        mc.psm = cfg.psm;
        mc.apix_system_max_vectors = cfg.apix_system_max_vectors;
        mc.nexus_fm_caps = cfg.nexus_fm_caps;
        if cfg.qemu == Qemu::V72 {
            let root = qemu72_root().map_err(failed)?;
            mc.qemu.binary = root.join("usr/bin/qemu-system-x86_64");
            mc.qemu.env.push((
                "QEMU_MODULE_DIR".into(),
                root.join("usr/lib/x86_64-linux-gnu/qemu")
                    .display()
                    .to_string(),
            ));
            mc.qemu.args.extend([
                "-L".into(),
                root.join("usr/share/qemu").display().to_string(),
                "-L".into(),
                "/usr/share/seabios".into(),
            ]);
        }
        let sd = Sd::new();
        let recorder = Arc::new(Recorder::default());
        let td: Arc<dyn rvscsi_emu::TargetDriver> = match cfg.driver {
            Driver::Sd => Arc::new(SdDriver(sd.clone())),
            Driver::Recorder => recorder.clone(),
        };
        let mut bc = BedConfig::new(mc, td)
            .prop_str("virtio-transport", &cfg.transport)
            .prop_str("interrupt-type", &cfg.interrupts);
        for (k, v) in &cfg.props {
            bc = bc.prop_int(k, *v);
        }
        match cfg.binding {
            Binding::Library => {}
            Binding::Shim => {
                bc.binding = rvscsi_emu::bed::hosted::binding().map_err(|e| failed(e.0))?;
            }
            Binding::DevOps(ops) => {
                bc.binding = Arc::new(rvscsi_emu::bed::DevOpsBinding {
                    dev_ops: ops as *mut rvscsi::ffi::dev_ops,
                });
            }
        }
        bc.faults = cfg.faults.clone();
        let bed = Bed::try_attach(bc)?;
        Ok(Rig {
            bed: Some(bed),
            sd,
            recorder,
            images,
            addrs: cfg.images.iter().map(|&(_, t, l)| (t, l)).collect(),
            dir,
        })
    }

    /// The bed.
    pub fn bed(&self) -> &Bed {
        self.bed.as_ref().expect("attached")
    }

    /// The in-process device of a rig on the memory back end.
    pub fn memdev(&self) -> Arc<rvscsi_emu::memdev::MemoryMachine> {
        self.bed()
            .machine
            .memdev
            .clone()
            .expect("the in-memory device (Backend::Memory)")
    }

    /// The first disk (target/LUN of the first image).
    pub fn disk0(&self) -> Arc<crate::sd::Disk> {
        self.sd.disks().into_iter().next().expect("a disk attached")
    }

    /// What the driver logged.
    pub fn log(&self) -> Vec<String> {
        self.bed()
            .machine
            .log()
            .into_iter()
            .map(|l| l.text)
            .collect()
    }

    /// Detaches and returns the report.
    pub fn finish(mut self) -> DetachReport {
        let bed = self.bed.take().expect("attached");
        let machine = bed.machine.clone();
        match bed.detach() {
            Ok(report) => report,
            Err(e) => {
                // The driver says why it refused; the test log should too.
                for line in machine.log() {
                    eprintln!("driver log: {}", line.text);
                }
                panic!("detach: {e:?}");
            }
        }
    }

    /// Detaches and fails the test unless nothing leaked and no DDI rule
    /// was broken.
    pub fn finish_clean(self) {
        let r = self.finish();
        assert!(
            r.is_clean(),
            "after detach: leaks {:?}, pages leaked {}, violations {:?}",
            r.leaks,
            r.pages_leaked,
            r.violations
        );
    }
}

impl Rig {
    /// The LUNs of the images, in image order, as load targets: each with
    /// its power-on unit attention cleared and a model of what it holds
    /// (`Driver::Recorder` rigs: no target driver uses them).
    pub fn load_luns(&self) -> Vec<Arc<crate::load::Lun>> {
        let devs = self.recorder.attached();
        self.addrs
            .iter()
            .zip(&self.images)
            .map(|(&(t, l), img)| {
                // The latest instance (a re-attach adds new ones).
                let (dev, binding) = devs
                    .iter()
                    .rev()
                    .find(|(d, _)| d.target == u32::from(t) && d.lun == u64::from(l))
                    .unwrap_or_else(|| panic!("LUN {t},{l} was not configured"))
                    .clone();
                clear_unit_attention(&dev);
                Arc::new(crate::load::Lun::bound(
                    dev,
                    binding,
                    img.expected(0, img.blocks),
                ))
            })
            .collect()
    }
}

/// Sends TEST UNIT READY until the LUN answers GOOD (consuming the unit
/// attentions a reset or power-on leaves); panics after 10 tries.
pub fn clear_unit_attention(dev: &Arc<rvscsi_emu::Device>) {
    for _ in 0..10 {
        let p = dev
            .init_pkt(None, rvscsi_emu::InitArgs::default())
            .expect("a TEST UNIT READY packet");
        assert_eq!(p.start_async(), rvscsi::ffi::TRAN_ACCEPT);
        assert!(
            p.wait(std::time::Duration::from_secs(30)),
            "TEST UNIT READY never completed"
        );
        let good = p.result().reason == rvscsi::ffi::CMD_CMPLT && p.result().status() == 0;
        p.destroy();
        if good {
            return;
        }
    }
    panic!("LUN {}/{} never became ready", dev.target, dev.lun);
}

/// A read of the block at `lba` that machine `m`'s device holds: its
/// completion withheld ([`rvscsi_emu::faults::Fault::Withhold`]), started,
/// and returned once the device has it (the test releases it, or a reset
/// or abort ends it).
pub fn held_read(
    m: &rvscsi_emu::Machine,
    dev: &Arc<rvscsi_emu::Device>,
    lba: u32,
) -> rvscsi_emu::Packet {
    use rvscsi_emu::faults::{Fault, Match};
    let before = m.faults.withheld();
    m.faults.arm(Fault::Withhold(Match::Lba(u64::from(lba))));
    let held = read_block(dev, lba);
    assert_eq!(
        held.start_async(),
        rvscsi::ffi::TRAN_ACCEPT,
        "the read of LBA {lba}"
    );
    assert!(
        wait_for(std::time::Duration::from_secs(10), || {
            m.faults.withheld() == before + 1
        }),
        "the device holds the read of LBA {lba}"
    );
    held
}

/// A READ(10) packet of the one block at `lba` (SBC-3 §5.11), not started.
pub fn read_block(dev: &Arc<rvscsi_emu::Device>, lba: u32) -> rvscsi_emu::Packet {
    let mut p = dev
        .init_pkt(
            Some(Arc::new(rvscsi_emu::DataBuf::new(512, 0, true))),
            rvscsi_emu::InitArgs::default(),
        )
        .expect("a READ(10) packet");
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    p.cdb_mut().copy_from_slice(&cdb);
    p
}

/// A TEST UNIT READY packet (SPC-4 §6.47: a 6-byte CDB of zeros, no
/// data), not started.
pub fn test_unit_ready(dev: &Arc<rvscsi_emu::Device>) -> rvscsi_emu::Packet {
    let mut p = dev
        .init_pkt(
            None,
            rvscsi_emu::InitArgs {
                cmdlen: 6,
                ..rvscsi_emu::InitArgs::default()
            },
        )
        .expect("packet");
    p.cdb_mut().fill(0);
    p
}

/// The packet cache of `dev`'s HBA (made at attach).
pub fn packet_cache(dev: &Arc<rvscsi_emu::Device>) -> Arc<rvscsi_emu::scsa::hba::PktCache> {
    dev.hba
        .cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .expect("the HBA's packet cache")
}

/// The `rvscsi-reset` probe firings so far: (level, target, lun, done).
pub fn reset_firings(rig: &Rig) -> Vec<Vec<u64>> {
    rig.bed()
        .machine
        .probes
        .firings("rvscsi-reset")
        .iter()
        .map(|f| f.args.clone())
        .collect()
}

/// Polls `cond` every 10 ms until it holds or `limit` passed; returns
/// whether it held (the caller asserts, naming what it waited for).
pub fn wait_for(limit: std::time::Duration, cond: impl Fn() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    cond()
}

/// Polls `done` every 50 ms; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// MSI-X vector of request queue `n` when each has its own: configuration
/// changes and events share vector 0 (see `rvscsi::vioscsi::vectors`).
pub fn request_vector(n: usize) -> usize {
    1 + n
}

impl Rig {
    /// Interrupts delivered so far, per vector.
    pub fn per_vector(&self) -> Vec<u64> {
        self.bed()
            .machine
            .stats
            .per_vector
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Interrupts delivered per vector once none is on its way (see
    /// `Machine::wait_interrupts_quiet`): the count to compare across an
    /// I/O window. Panics if the interrupts never quiet down.
    pub fn per_vector_quiet(&self) -> Vec<u64> {
        assert!(
            self.bed()
                .machine
                .wait_interrupts_quiet(std::time::Duration::from_secs(10)),
            "interrupts still arriving after 10 s"
        );
        self.per_vector()
    }

    /// Runs a QMP command on the machine's QEMU; panics if it fails.
    pub fn qmp(&self, cmd: &str, args: rvscsi_qtest::Value) {
        self.bed()
            .machine
            .with_qemu(|q| q.qmp(cmd, args))
            .expect("QEMU")
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }

    /// Hot-plugs `image` as a scsi-hd at `target`/`lun` of the controller
    /// (block node and device both named after `id`).
    pub fn hot_plug(&self, id: &str, image: &Path, target: u32, lun: u32) {
        self.qmp(
            "blockdev-add",
            rvscsi_qtest::json!({"driver": "raw", "node-name": format!("n{id}"),
                "file": {"driver": "file", "filename": image.to_str().expect("a UTF-8 path")}}),
        );
        self.qmp(
            "device_add",
            rvscsi_qtest::json!({"driver": "scsi-hd", "id": id, "bus": "hba0.0",
                "drive": format!("n{id}"), "scsi-id": target, "lun": lun}),
        );
    }
}

/// What an administrator would look at: the driver's kstats (read as
/// `kstat(8)` reads them, through `ks_update`) and its ereports.
impl Rig {
    /// The HBA's instance number (`ddi_get_instance(9F)`).
    pub fn instance(&self) -> i32 {
        rvscsi_emu::ddi::devinfo::ddi_get_instance(self.bed().hba)
    }

    /// The driver's kstat `rvscsi:<instance>:<name>`; panics if it is not
    /// installed.
    pub fn kstat(&self, name: &str) -> rvscsi_emu::ddi::kstat::Snapshot {
        rvscsi_emu::ddi::kstat::read(&self.bed().machine, "rvscsi", self.instance(), name)
            .unwrap_or_else(|e| panic!("kstat rvscsi:{}:{name}: {e:?}", self.instance()))
    }

    /// Statistic `stat` of `rvscsi:<instance>:hba`.
    pub fn hba_stat(&self, stat: &str) -> u64 {
        self.kstat("hba")
            .u64(stat)
            .unwrap_or_else(|| panic!("no statistic hba:{stat}"))
    }

    /// Asserts each `(statistic, value)` of `rvscsi:<instance>:hba`.
    pub fn assert_hba_stats(&self, want: &[(&str, u64)]) {
        for &(stat, value) in want {
            assert_eq!(self.hba_stat(stat), value, "hba:{stat}");
        }
    }

    /// Statistic `stat` of `rvscsi:<instance>:queue<q>`.
    pub fn queue_stat(&self, q: usize, stat: &str) -> u64 {
        self.kstat(&format!("queue{q}"))
            .u64(stat)
            .unwrap_or_else(|| panic!("no statistic queue{q}:{stat}"))
    }

    /// The classes of the ereports posted so far, in order.
    pub fn ereport_classes(&self) -> Vec<String> {
        rvscsi_emu::ddi::fm::ereports(&self.bed().machine)
            .into_iter()
            .map(|e| e.class)
            .collect()
    }

    /// How many ereports of `class` were posted so far.
    pub fn ereports_of(&self, class: &str) -> usize {
        self.ereport_classes()
            .iter()
            .filter(|c| *c == class)
            .count()
    }

    /// The ereports of a run whose only device faults were `dropped`
    /// completions naming no command outstanding: each
    /// `device.intern_uncorr` with detail `bad-completion` and a `queue`
    /// and `id`; at least one, no more than were dropped, and a second or
    /// more apart (the driver's rate); no service impact.
    pub fn assert_bad_completion_reports(&self, dropped: u64) {
        use rvscsi_emu::ddi::fm::Payload;
        let reports = rvscsi_emu::ddi::fm::ereports(&self.bed().machine);
        assert!(
            !reports.is_empty() && reports.len() as u64 <= dropped,
            "{dropped} dropped: {:?}",
            self.ereport_classes()
        );
        for e in &reports {
            assert_eq!(e.class, "ereport.io.device.intern_uncorr", "{e:?}");
            assert_eq!(
                e.member("detail"),
                Some(&Payload::Str("bad-completion".into())),
                "{e:?}"
            );
            assert!(
                matches!(e.member("queue"), Some(Payload::Int(_)))
                    && matches!(e.member("id"), Some(Payload::Int(_))),
                "{e:?}"
            );
        }
        // The deadline clock the driver rates by ticks 100 times a second.
        for w in reports.windows(2) {
            assert!(
                w[1].time - w[0].time >= 990_000_000,
                "reported {} ns apart",
                w[1].time - w[0].time
            );
        }
    }
}
