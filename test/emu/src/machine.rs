//! The machine the driver runs on: a QEMU process driven over qtest (its
//! devices are real QEMU device models), the guest RAM the emulated DDI
//! hands out as DMA memory, the PCI function of the HBA, and the thread
//! that delivers interrupts.
//!
//! Everything the driver does to the device goes through here, so here it
//! is counted (register accesses are what would be VM exits) and checked.

use rvscsi_qtest::{BarKind, Bdf, Bus, Pci, Qemu, QemuConfig};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First guest-physical page handed out (below is BIOS/legacy space).
const RAM_START: u64 = 0x10_0000;
/// Page size of the guest RAM allocator.
pub const PAGE: u64 = 4096;
/// Where the test bed places memory BARs and I/O BARs.
const MEM_BAR_BASE: u64 = 0xE000_0000;
const IO_BAR_BASE: u16 = 0xC000;
/// The device's PCI slot on q35 (fixed so the INTx routing is known).
pub const HBA_SLOT: u8 = 1;
/// q35 routes PCI INTx through PIRQ A-H to GSI 16-23.
pub const INTX_GSIS: std::ops::RangeInclusive<u32> = 16..=23;

/// Which virtio-pci interface the device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioPci {
    /// A transitional device (legacy I/O BAR and modern capabilities).
    Transitional,
    /// A modern-only device (`disable-legacy=on`).
    ModernOnly,
}

/// Which HBA device family QEMU plays (Backend::Qemu only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HbaFamily {
    /// `virtio-scsi-pci` (the reference, and the only family the driver
    /// attaches to so far).
    #[default]
    VirtioScsi,
    /// VMware PVSCSI (`-device pvscsi`, PCI 15ad:07c0): one 32 KiB memory
    /// BAR, MSI with one vector, no MSI-X; targets 0..=64, LUN 0 only
    /// (QEMU 10.0 `hw/scsi/vmw_pvscsi.c`, shared/notes/pvscsi.md §2).
    Pvscsi,
}

impl HbaFamily {
    /// Whether `(vendor, device)` is this family's PCI function: virtio-scsi
    /// transitional 1af4:1004 or modern 1af4:1048 (virtio 1.2 §4.1.2.1),
    /// pvscsi 15ad:07c0.
    pub fn matches(self, vendor: u16, device: u16) -> bool {
        match self {
            HbaFamily::VirtioScsi => vendor == 0x1af4 && (device == 0x1004 || device == 0x1048),
            HbaFamily::Pvscsi => {
                vendor == rvscsi::pvscsi::PCI_VENDOR_VMWARE
                    && device == rvscsi::pvscsi::PCI_DEVICE_PVSCSI
            }
        }
    }
}

/// What plays the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// QEMU's virtio-scsi over qtest (the reference).
    #[default]
    Qemu,
    /// The in-process model ([`crate::memdev`]): modern virtio-pci with
    /// MSI-X only, disks in RAM (loaded from the disk files).
    Memory,
}

/// One disk behind the HBA.
#[derive(Clone, Debug)]
pub struct Disk {
    /// What QEMU opens: a path, or any block filename such as
    /// `blkdebug:rules.conf:disk.img`.
    pub file: String,
    /// SCSI target.
    pub target: u8,
    /// LUN.
    pub lun: u16,
}

/// How to build a machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// QEMU itself (binary, environment, memory).
    pub qemu: QemuConfig,
    /// The HBA's virtio-pci interface.
    pub virtio: VirtioPci,
    /// Disks.
    pub disks: Vec<Disk>,
    /// virtio-scsi `num_queues` (request queues); QEMU's default if None.
    pub num_queues: Option<u32>,
    /// MSI-X vectors of the device (`vectors=`, 0: no MSI-X); default if None.
    pub msix_vectors: Option<u32>,
    /// Extra `-device virtio-scsi-pci` properties (`key=value,...`).
    pub device_props: Vec<String>,
    /// What plays the device.
    pub backend: Backend,
    /// Which HBA family (virtio-scsi unless [`MachineConfig::pvscsi`]).
    pub family: HbaFamily,
    /// The interrupt platform: which x86 PSM the emulated kernel runs
    /// (see [`crate::ddi::intr::Psm`]).
    pub psm: crate::ddi::intr::Psm,
    /// The `/etc/system` tunable `apix_system_max_vectors` (apix only):
    /// caps the IRM pool's size (`apix_irm_init`).
    pub apix_system_max_vectors: Option<u32>,
    /// The FM capabilities the HBA's parent nexus supports
    /// (`DDI_FM_*_CAPABLE`; `None`: [`crate::ddi::fm::NEXUS_CAPS`], what
    /// npe grants): `ddi_fm_init` grants the driver only these.
    pub nexus_fm_caps: Option<i32>,
}

impl MachineConfig {
    /// A transitional virtio-scsi HBA with `disks`.
    pub fn virtio_scsi(disks: Vec<Disk>) -> Self {
        MachineConfig {
            qemu: QemuConfig::default(),
            virtio: VirtioPci::Transitional,
            disks,
            num_queues: None,
            msix_vectors: None,
            device_props: Vec::new(),
            backend: Backend::Qemu,
            family: HbaFamily::VirtioScsi,
            psm: crate::ddi::intr::Psm::default(),
            apix_system_max_vectors: None,
            nexus_fm_caps: None,
        }
    }

    /// QEMU's VMware PVSCSI HBA with the same `disks` (same drive and
    /// scsi-hd lines as [`MachineConfig::virtio_scsi`]). Nothing of the
    /// driver attaches to it yet: it is for tests that drive the device
    /// themselves over qtest.
    pub fn pvscsi(disks: Vec<Disk>) -> Self {
        MachineConfig {
            family: HbaFamily::Pvscsi,
            ..Self::virtio_scsi(disks)
        }
    }

    fn qemu_args(&self) -> Result<Vec<String>, MachineError> {
        let mut args = Vec::new();
        let mut dev = match self.family {
            HbaFamily::VirtioScsi => {
                let mut dev = format!("virtio-scsi-pci,id=hba0,addr={HBA_SLOT:02x}.0");
                if self.virtio == VirtioPci::ModernOnly {
                    dev.push_str(",disable-legacy=on,disable-modern=off");
                }
                if let Some(n) = self.num_queues {
                    dev.push_str(&format!(",num_queues={n}"));
                }
                if let Some(v) = self.msix_vectors {
                    dev.push_str(&format!(",vectors={v}"));
                }
                dev
            }
            HbaFamily::Pvscsi => {
                // Knobs of virtio-scsi that pvscsi has no equivalent of are
                // refused rather than silently dropped.
                if self.virtio != VirtioPci::Transitional
                    || self.num_queues.is_some()
                    || self.msix_vectors.is_some()
                {
                    return Err(MachineError(
                        "pvscsi has no virtio interface, queue count or MSI-X vectors".into(),
                    ));
                }
                format!("pvscsi,id=hba0,addr={HBA_SLOT:02x}.0")
            }
        };
        for p in &self.device_props {
            dev.push(',');
            dev.push_str(p);
        }
        for (i, d) in self.disks.iter().enumerate() {
            args.push("-drive".into());
            args.push(format!(
                "if=none,id=d{i},format=raw,file={},rerror=report,werror=report",
                d.file
            ));
        }
        args.push("-device".into());
        args.push(dev);
        for (i, d) in self.disks.iter().enumerate() {
            args.push("-device".into());
            args.push(format!(
                "scsi-hd,id=hd{i},bus=hba0.0,drive=d{i},scsi-id={},lun={}",
                d.target, d.lun
            ));
        }
        Ok(args)
    }
}

/// A BAR as assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR number (0-5).
    pub index: u8,
    /// I/O space.
    pub io: bool,
    /// 64-bit memory BAR.
    pub mem64: bool,
    /// Assigned address (port or physical).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Counters of what the driver did to the machine.
#[derive(Debug)]
pub struct MachineStats {
    /// Device register reads (would-be VM exits).
    pub reg_reads: AtomicU64,
    /// Device register writes (would-be VM exits).
    pub reg_writes: AtomicU64,
    /// PCI configuration reads.
    pub cfg_reads: AtomicU64,
    /// `ddi_dma_sync(FORDEV)` calls.
    pub syncs_for_dev: AtomicU64,
    /// `ddi_dma_sync(FORCPU/FORKERNEL)` calls.
    pub syncs_for_cpu: AtomicU64,
    /// Interrupts delivered to handlers: on MSI/MSI-X one per message the
    /// device sent, whatever the handler then found.
    pub interrupts: AtomicU64,
    /// Of those, the ones whose handler returned `DDI_INTR_UNCLAIMED`.
    pub unclaimed: AtomicU64,
    /// MSI/MSI-X messages that arrived at a vector with no enabled handler
    /// (sent just before a disable masked the vector): taken by the CPU as
    /// spurious, never delivered.
    pub stray_messages: AtomicU64,
    /// Reads of the virtio ISR status register (each a VM exit, and on
    /// MSI-X never needed).
    pub isr_reads: AtomicU64,
    /// Interrupts delivered per vector (first 64).
    pub per_vector: [AtomicU64; 64],
}

impl Default for MachineStats {
    fn default() -> Self {
        MachineStats {
            reg_reads: AtomicU64::new(0),
            reg_writes: AtomicU64::new(0),
            cfg_reads: AtomicU64::new(0),
            syncs_for_dev: AtomicU64::new(0),
            syncs_for_cpu: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            unclaimed: AtomicU64::new(0),
            stray_messages: AtomicU64::new(0),
            isr_reads: AtomicU64::new(0),
            per_vector: [const { AtomicU64::new(0) }; 64],
        }
    }
}

/// Kernel resources the driver holds on this machine: each must be back at
/// zero after detach (the leak check).
#[derive(Default, Debug)]
pub struct Live {
    /// DMA handles (`ddi_dma_alloc_handle`).
    pub dma_handles: AtomicI64,
    /// DMA memory (`ddi_dma_mem_alloc`).
    pub dma_mem: AtomicI64,
    /// Bound DMA handles.
    pub dma_binds: AtomicI64,
    /// Register and configuration access handles.
    pub acc_handles: AtomicI64,
    /// Interrupt handles.
    pub intr_handles: AtomicI64,
    /// Interrupt handlers added.
    pub intr_handlers: AtomicI64,
    /// Task queues.
    pub taskqs: AtomicI64,
    /// Periodic callbacks.
    pub periodics: AtomicI64,
    /// Pending timeouts.
    pub timeouts: AtomicI64,
    /// Property values handed out and not freed.
    pub prop_values: AtomicI64,
    /// Mutexes initialized and not destroyed.
    pub mutexes: AtomicI64,
    /// Condition variables initialized and not destroyed.
    pub condvars: AtomicI64,
    /// `ddi_cb_register(9F)` callbacks not unregistered.
    pub callbacks: AtomicI64,
    /// kstats created (`kstat_create(9F)`) and not deleted.
    pub kstats: AtomicI64,
    /// FM handles (`ddi_fm_init(9F)`) not finalized (`ddi_fm_fini(9F)`).
    pub fm_handles: AtomicI64,
}

impl Live {
    /// Every counter by name.
    pub fn counts(&self) -> Vec<(&'static str, i64)> {
        let l = |a: &AtomicI64| a.load(Ordering::Acquire);
        vec![
            ("DMA handles", l(&self.dma_handles)),
            ("DMA memory allocations", l(&self.dma_mem)),
            ("DMA bindings", l(&self.dma_binds)),
            ("access handles", l(&self.acc_handles)),
            ("interrupt handles", l(&self.intr_handles)),
            ("interrupt handlers", l(&self.intr_handlers)),
            ("task queues", l(&self.taskqs)),
            ("periodic callbacks", l(&self.periodics)),
            ("pending timeouts", l(&self.timeouts)),
            ("property values", l(&self.prop_values)),
            ("mutexes", l(&self.mutexes)),
            ("condition variables", l(&self.condvars)),
            ("DDI callbacks", l(&self.callbacks)),
            ("kstats", l(&self.kstats)),
            ("FM handles", l(&self.fm_handles)),
        ]
    }

    /// The counters that are not zero.
    pub fn leaks(&self) -> Vec<(&'static str, i64)> {
        self.counts().into_iter().filter(|(_, n)| *n != 0).collect()
    }
}

/// Adds `d` to a live counter.
pub fn bump(c: &AtomicI64, d: i64) {
    c.fetch_add(d, Ordering::AcqRel);
}

/// A snapshot of [`MachineStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Register reads.
    pub reg_reads: u64,
    /// Register writes.
    pub reg_writes: u64,
    /// Interrupts delivered.
    pub interrupts: u64,
}

/// Interrupts held off ([`Machine::hold_interrupts`]) until dropped.
pub struct InterruptHold(Arc<Machine>);

impl Drop for InterruptHold {
    fn drop(&mut self) {
        self.0.held.store(false, Ordering::SeqCst);
        self.0.kick();
    }
}

/// The in-process device for `config` (its disks read into RAM).
fn memory_device(config: &MachineConfig) -> Result<crate::memdev::MemoryMachine, MachineError> {
    if config.family != HbaFamily::VirtioScsi {
        return Err(MachineError(
            "the in-memory device is virtio-scsi only".into(),
        ));
    }
    if config.virtio != VirtioPci::ModernOnly {
        return Err(MachineError(
            "the in-memory device is modern-only: use VirtioPci::ModernOnly".into(),
        ));
    }
    if !config.device_props.is_empty() {
        return Err(MachineError(format!(
            "the in-memory device takes no QEMU device properties ({:?})",
            config.device_props
        )));
    }
    let mut disks = Vec::new();
    for d in &config.disks {
        let disk = crate::memdev::RamDisk::from_file(&d.file).map_err(MachineError)?;
        disks.push((d.target, d.lun, disk));
    }
    crate::memdev::MemoryMachine::new(crate::memdev::MemoryConfig {
        ram_mib: config.qemu.memory_mib,
        slot: HBA_SLOT,
        num_queues: config.num_queues.unwrap_or(1),
        msix_vectors: config
            .msix_vectors
            .unwrap_or(config.num_queues.unwrap_or(1) + 3),
        queue_size: 256,
        disks,
    })
    .map_err(MachineError)
}

/// Guest-physical page allocator over the machine's RAM.
struct PageAllocator {
    free: Vec<bool>,
}

impl PageAllocator {
    fn new(mem_bytes: u64) -> Self {
        let pages = ((mem_bytes - RAM_START) / PAGE) as usize;
        PageAllocator {
            free: vec![true; pages],
        }
    }

    fn gpa(i: usize) -> u64 {
        RAM_START + i as u64 * PAGE
    }

    fn index(gpa: u64) -> usize {
        ((gpa - RAM_START) / PAGE) as usize
    }

    /// `n` physically contiguous pages, aligned to `align` pages.
    fn alloc_contig(&mut self, n: usize, align: usize) -> Option<u64> {
        let align = align.max(1);
        let mut i = 0;
        while i + n <= self.free.len() {
            let start_gpa = Self::gpa(i);
            if !((start_gpa / PAGE) as usize).is_multiple_of(align) {
                i += 1;
                continue;
            }
            match self.free[i..i + n].iter().position(|f| !f) {
                None => {
                    self.free[i..i + n].iter_mut().for_each(|f| *f = false);
                    return Some(start_gpa);
                }
                Some(busy) => i += busy + 1,
            }
        }
        None
    }

    /// `n` pages, deliberately not contiguous: taken from the top of RAM
    /// downwards, every other page, so that consecutive buffer pages land
    /// on descending, non-adjacent guest pages.
    fn alloc_scattered(&mut self, n: usize) -> Option<Vec<u64>> {
        let len = self.free.len();
        let mut out = Vec::with_capacity(n);
        'passes: for parity in 0..2 {
            let mut i = len - 1 - parity;
            loop {
                if out.len() == n {
                    break 'passes;
                }
                if self.free[i] {
                    self.free[i] = false;
                    out.push(Self::gpa(i));
                }
                if i < 2 {
                    break;
                }
                i -= 2;
            }
        }
        if out.len() == n {
            Some(out)
        } else {
            for g in out {
                self.free_pages(g, 1);
            }
            None
        }
    }

    fn free_pages(&mut self, gpa: u64, n: usize) {
        let i = Self::index(gpa);
        for f in &mut self.free[i..i + n] {
            *f = true;
        }
    }

    fn free_count(&self) -> usize {
        self.free.iter().filter(|f| **f).count()
    }
}

/// A registered interrupt vector.
#[derive(Clone, Copy)]
pub struct VectorSlot {
    /// The handler and its two arguments.
    pub handler: Option<(unsafe extern "C" fn(*mut i8, *mut i8) -> u32, usize, usize)>,
    /// Enabled with `ddi_intr_enable`.
    pub enabled: bool,
}

/// Interrupt type in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntrType {
    /// None allocated.
    None,
    /// MSI-X vectors.
    MsiX,
    /// MSI.
    Msi,
    /// INTx.
    Fixed,
}

/// Interrupt routing state, shared with the delivery thread.
pub struct IntrState {
    /// Type allocated.
    pub kind: IntrType,
    /// Vectors (index = inum).
    pub vectors: Vec<VectorSlot>,
}

/// A line the driver logged.
#[derive(Clone, Debug)]
pub struct LogLine {
    /// `CE_*` level.
    pub level: i32,
    /// The text.
    pub text: String,
}

/// The machine.
pub struct Machine {
    qemu: Mutex<Option<Qemu>>,
    /// The bus to the device: QEMU's qtest connection, or the in-process
    /// model.
    pub qt: Arc<dyn Bus>,
    /// The in-process model, when it plays the device.
    pub memdev: Option<Arc<crate::memdev::MemoryMachine>>,
    /// The HBA's PCI function.
    pub bdf: Bdf,
    /// Vendor and device ID.
    pub ids: (u16, u16),
    /// The HBA's BARs.
    pub bars: Vec<BarInfo>,
    ram: Mutex<PageAllocator>,
    ram_pages: usize,
    /// Counters.
    pub stats: MachineStats,
    /// Resources held.
    pub live: Live,
    violations: Mutex<Vec<String>>,
    log: Mutex<Vec<LogLine>>,
    /// DTrace SDT probe firings.
    pub probes: crate::ddi::sdt::ProbeLog,
    /// The hostile-device layer between the driver and QEMU.
    pub faults: crate::faults::Faults,
    /// Interrupt routing.
    pub intr: Mutex<IntrState>,
    /// Interrupt resource management: the IRM pool, the driver's request
    /// and its `ddi_cb_register(9F)` callback.
    pub irm: Mutex<crate::ddi::intr::Irm>,
    /// The IRM pool lock (`ipool_lock`): held by a balance across the
    /// callbacks it makes, taken by the first allocation and the last
    /// free of a device and by callback (un)registration.
    pub irm_pool_lock: Mutex<()>,
    /// Held by the delivery thread while a handler runs (ddi_intr_disable
    /// takes it to wait for a running handler).
    pub dispatch: Mutex<()>,
    /// Set by the delivery thread from its look at the messages (or the
    /// lines) until the handlers it found have returned.
    delivering: AtomicBool,
    /// MSI/MSI-X messages the device sent, per APIC vector ([`crate::msi`]).
    pub messages: Arc<crate::msi::MessageCounts>,
    /// Messages the delivery thread has taken, per APIC vector.
    taken: [AtomicU64; 256],
    /// The reader of QEMU's APIC trace (QEMU back end).
    apic_trace: Mutex<Option<crate::msi::QemuApicTrace>>,
    /// Set while a test holds interrupts off ([`Machine::hold_interrupts`]).
    held: AtomicBool,
    wake: (Mutex<bool>, Condvar),
    stop: AtomicBool,
    pump: Mutex<Option<JoinHandle<()>>>,
    pump_thread: Mutex<Option<std::thread::ThreadId>>,
    /// Set when a device access failed (QEMU died or hung).
    pub dead: AtomicBool,
    config: MachineConfig,
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Machine({} {:04x}:{:04x})",
            self.bdf, self.ids.0, self.ids.1
        )
    }
}

/// Why a machine could not be built.
#[derive(Debug)]
pub struct MachineError(pub String);

impl fmt::Display for MachineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MachineError {}

impl From<rvscsi_qtest::Error> for MachineError {
    fn from(e: rvscsi_qtest::Error) -> Self {
        MachineError(e.to_string())
    }
}

impl Machine {
    /// Starts QEMU with the HBA and its disks, finds the HBA, assigns its
    /// BARs, and starts the interrupt delivery thread.
    pub fn launch(config: MachineConfig) -> Result<Arc<Machine>, MachineError> {
        let (qemu, qt, memdev, messages, apic_trace): (Option<Qemu>, Arc<dyn Bus>, _, _, _) =
            match config.backend {
                Backend::Qemu => {
                    // Every MSI/MSI-X message is counted from QEMU's APIC
                    // trace (see crate::msi for why that is exact).
                    let messages = Arc::new(crate::msi::MessageCounts::default());
                    let trace =
                        crate::msi::QemuApicTrace::start(messages.clone()).map_err(MachineError)?;
                    let mut qc = config.qemu.clone();
                    qc.args.extend(config.qemu_args()?);
                    qc.args.extend(trace.qemu_args());
                    let qemu = Qemu::launch(qc)?;
                    let qt = qemu.qtest_handle();
                    trace.verify(&*qt).map_err(MachineError)?;
                    // INTx: have QEMU report the I/O APIC's input lines.
                    qt.irq_intercept_in("ioapic")?;
                    (Some(qemu), qt, None, messages, Some(trace))
                }
                Backend::Memory => {
                    let dev = Arc::new(memory_device(&config)?);
                    let messages = dev.messages.clone();
                    (None, dev.clone(), Some(dev), messages, None)
                }
            };
        let pci = Pci::new(&*qt);
        let bdf = Bdf::new(0, HBA_SLOT, 0);
        let f = pci
            .probe(bdf)?
            .ok_or_else(|| MachineError(format!("no PCI function at {bdf}")))?;
        if !config.family.matches(f.vendor, f.device) {
            return Err(MachineError(format!(
                "{bdf} is {:04x}:{:04x}, not a {:?} HBA",
                f.vendor, f.device, config.family
            )));
        }
        let assigned = pci.assign_bars(bdf, MEM_BAR_BASE, IO_BAR_BASE)?;
        let bars: Vec<BarInfo> = assigned
            .iter()
            .map(|(i, b, addr)| BarInfo {
                index: *i as u8,
                io: b.kind == BarKind::Io,
                mem64: b.kind == BarKind::Mem64,
                addr: *addr,
                size: b.size,
            })
            .collect();
        let faults = crate::faults::Faults::default();
        match config.family {
            HbaFamily::VirtioScsi => {
                faults.set_layout(virtio_layout(&pci, bdf, &bars)?, qt.clone())
            }
            // The registers are BAR 0, memory (notes/pvscsi.md §1).
            HbaFamily::Pvscsi => {
                let bar0 = bars.iter().find(|b| b.index == 0 && !b.io).map(|b| b.addr);
                let bar0 =
                    bar0.ok_or_else(|| MachineError("pvscsi without a memory BAR 0".into()))?;
                faults.set_pvscsi(bar0, qt.clone());
            }
        }
        let mem_bytes = u64::from(config.qemu.memory_mib) << 20;
        let ram = PageAllocator::new(mem_bytes);
        let ram_pages = ram.free.len();
        let m = Arc::new(Machine {
            qemu: Mutex::new(qemu),
            qt,
            memdev,
            bdf,
            ids: (f.vendor, f.device),
            bars,
            ram: Mutex::new(ram),
            ram_pages,
            stats: MachineStats::default(),
            live: Live::default(),
            violations: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            probes: Default::default(),
            faults,
            intr: Mutex::new(IntrState {
                kind: IntrType::None,
                vectors: Vec::new(),
            }),
            irm: Mutex::new(crate::ddi::intr::Irm::new(&config)),
            irm_pool_lock: Mutex::new(()),
            dispatch: Mutex::new(()),
            delivering: AtomicBool::new(false),
            messages,
            taken: [const { AtomicU64::new(0) }; 256],
            apic_trace: Mutex::new(apic_trace),
            held: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            pump: Mutex::new(None),
            pump_thread: Mutex::new(None),
            dead: AtomicBool::new(false),
            config,
        });
        // A message wakes the delivery thread at once.
        let waker = Arc::downgrade(&m);
        m.messages.set_waker(Box::new(move || {
            if let Some(m) = waker.upgrade() {
                m.kick();
            }
        }));
        let weak = Arc::downgrade(&m);
        let handle = std::thread::Builder::new()
            .name("emu-intr".into())
            .spawn(move || interrupt_pump(weak))
            .map_err(|e| MachineError(format!("cannot start the interrupt thread: {e}")))?;
        *lock(&m.pump_thread) = Some(handle.thread().id());
        *lock(&m.pump) = Some(handle);
        Ok(m)
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// QMP / HMP access (hot-plug, fault injection).
    pub fn with_qemu<R>(&self, f: impl FnOnce(&Qemu) -> R) -> Option<R> {
        lock(&self.qemu).as_ref().map(f)
    }

    /// Stops the interrupt thread and QEMU.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
        if let Some(h) = lock(&self.pump).take() {
            let _ = h.join();
        }
        drop(lock(&self.qemu).take());
        drop(lock(&self.apic_trace).take());
    }

    /// Waits until no interrupt is on its way: no MSI message the delivery
    /// thread has not taken (no INTx line asserted) and no handler running,
    /// on three looks in a row. A message the device sent just before an
    /// I/O finished (a completion the handler had already reaped by
    /// polling) is then counted in the window it belongs to. False if that
    /// did not happen within `limit`.
    pub fn wait_interrupts_quiet(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut quiet = 0;
        while quiet < 3 {
            if Instant::now() > deadline {
                return false;
            }
            let idle = !self.delivering.load(Ordering::Acquire) && !self.message_waiting();
            quiet = if idle { quiet + 1 } else { 0 };
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// True if an interrupt is waiting for the delivery thread.
    fn message_waiting(&self) -> bool {
        let kind = lock(&self.intr).kind;
        match kind {
            IntrType::MsiX | IntrType::Msi => (0..=u8::MAX).any(|v| self.messages_untaken(v) > 0),
            IntrType::Fixed => {
                self.qt.sync_irqs().is_ok() && INTX_GSIS.clone().any(|g| self.qt.irq_level(g))
            }
            IntrType::None => false,
        }
    }

    /// Messages to `apic_vector` the delivery thread has not taken yet.
    fn messages_untaken(&self, apic_vector: u8) -> u64 {
        let taken = self.taken[usize::from(apic_vector)].load(Ordering::Acquire);
        self.messages.sent(apic_vector).saturating_sub(taken)
    }

    /// MSI/MSI-X messages the device has sent to vector `inum` so far.
    pub fn messages_sent(&self, inum: usize) -> u64 {
        self.messages.sent_to_inum(inum)
    }

    /// Holds interrupt delivery off until the guard is dropped, as a CPU
    /// with interrupts blocked: messages the device sends meanwhile wait
    /// (each still one interrupt, taken when the guard goes). For tests
    /// that need several messages between two looks of the delivery
    /// thread. A handler already running finishes first.
    pub fn hold_interrupts(self: &Arc<Self>) -> InterruptHold {
        // SeqCst with the delivery thread's store of `delivering` and load
        // of `held`: one of the two sees the other's store.
        self.held.store(true, Ordering::SeqCst);
        while self.delivering.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(100));
        }
        InterruptHold(self.clone())
    }

    /// Records a broken rule of the DDI (the test fails on it).
    pub fn violation(&self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("rvscsi-emu: VIOLATION: {what}");
        lock(&self.violations).push(what);
    }

    /// Every violation so far.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    /// Records a message the driver logged.
    pub fn log_line(&self, level: i32, text: &str) {
        if std::env::var_os("RVSCSI_EMU_LOG").is_some() {
            eprintln!("rvscsi[{level}]: {text}");
        }
        lock(&self.log).push(LogLine {
            level,
            text: text.to_string(),
        });
    }

    /// What the driver logged.
    pub fn log(&self) -> Vec<LogLine> {
        lock(&self.log).clone()
    }

    /// Records a failed device access: the machine is dead from now on.
    pub fn device_failed(&self, what: &str, e: &rvscsi_qtest::Error) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            self.violation(format!("device access failed ({what}): {e}"));
        }
    }

    /// Wakes the interrupt thread (after the driver wrote a register).
    pub fn kick(&self) {
        let (m, c) = &self.wake;
        *lock(m) = true;
        c.notify_all();
    }

    /// Whether the caller is the interrupt delivery thread.
    pub fn on_interrupt_thread(&self) -> bool {
        *lock(&self.pump_thread) == Some(std::thread::current().id())
    }

    /// `n` contiguous guest pages aligned to `align` pages.
    pub fn alloc_contig(&self, n: usize, align: usize) -> Option<u64> {
        lock(&self.ram).alloc_contig(n, align)
    }

    /// `n` scattered guest pages.
    pub fn alloc_scattered(&self, n: usize) -> Option<Vec<u64>> {
        lock(&self.ram).alloc_scattered(n)
    }

    /// Returns pages.
    pub fn free_pages(&self, gpa: u64, n: usize) {
        lock(&self.ram).free_pages(gpa, n)
    }

    /// Guest pages currently handed out (for leak checks).
    pub fn pages_in_use(&self) -> usize {
        self.ram_pages - lock(&self.ram).free_count()
    }

    /// The BAR number `i`.
    pub fn bar(&self, i: u8) -> Option<BarInfo> {
        self.bars.iter().copied().find(|b| b.index == i)
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            reg_reads: self.stats.reg_reads.load(Ordering::Relaxed),
            reg_writes: self.stats.reg_writes.load(Ordering::Relaxed),
            interrupts: self.stats.interrupts.load(Ordering::Relaxed),
        }
    }

    // ---- guest memory through qtest, failures recorded ------------------

    /// Reads guest memory.
    pub fn read_mem(&self, gpa: u64, buf: &mut [u8]) {
        if let Err(e) = self.qt.read_mem(gpa, buf) {
            self.device_failed("memory read", &e);
            buf.fill(0xff);
            return;
        }
        self.faults.filter_read(&*self.qt, gpa, buf);
    }

    /// Writes guest memory.
    pub fn write_mem(&self, gpa: u64, data: &[u8]) {
        let replaced = self.faults.filter_write(gpa, data);
        let data = replaced.as_deref().unwrap_or(data);
        if let Err(e) = self.qt.write_mem(gpa, data) {
            self.device_failed("memory write", &e);
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        drop(lock(&self.qemu).take());
        drop(lock(&self.apic_trace).take());
    }
}

/// Locks, recovering from poisoning (a panicking test thread must not hide
/// the state from the checks that follow).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The interrupt delivery thread: watches the MSI/MSI-X message counts or
/// the INTx lines and calls the driver's handlers, as a CPU taking
/// interrupts would. Polls fast while the device is busy, slowly when
/// idle; a message wakes it at once. Only this thread calls handlers, so
/// a vector's handler never runs concurrently with itself.
fn interrupt_pump(weak: std::sync::Weak<Machine>) {
    let mut last_activity = Instant::now();
    loop {
        let Some(m) = weak.upgrade() else { return };
        if m.stop.load(Ordering::Acquire) || m.dead.load(Ordering::Acquire) {
            return;
        }
        let delivered = {
            // Handlers run "on" this machine (probes, logging find it).
            let _g = set_current(&m);
            // SeqCst against Machine::hold_interrupts (see there).
            m.delivering.store(true, Ordering::SeqCst);
            let ran = !m.held.load(Ordering::SeqCst) && deliver_once(&m);
            m.delivering.store(false, Ordering::SeqCst);
            ran
        };
        if delivered {
            last_activity = Instant::now();
        }
        let idle = last_activity.elapsed();
        let (wm, wc) = &m.wake;
        let mut woken = lock(wm);
        if *woken {
            *woken = false;
            last_activity = Instant::now();
            continue;
        }
        let wait = if idle < Duration::from_millis(20) {
            Duration::from_micros(30)
        } else if idle < Duration::from_millis(500) {
            Duration::from_micros(500)
        } else {
            Duration::from_millis(3)
        };
        let (mut g, _) = wc
            .wait_timeout(woken, wait)
            .unwrap_or_else(|p| p.into_inner());
        if *g {
            *g = false;
            last_activity = Instant::now();
        }
    }
}

/// What became of one interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// No enabled handler on the vector (checked under the dispatch lock):
    /// not delivered.
    NoHandler,
    /// The handler ran and claimed it.
    Claimed,
    /// The handler ran and found nothing (`DDI_INTR_UNCLAIMED`).
    Unclaimed,
}

/// One look for pending interrupts; true if a handler ran.
fn deliver_once(m: &Machine) -> bool {
    let kind = lock(&m.intr).kind;
    match kind {
        IntrType::MsiX | IntrType::Msi => deliver_messages(m),
        IntrType::Fixed => {
            let vectors = {
                let s = lock(&m.intr);
                if !s.vectors.iter().any(|v| v.enabled && v.handler.is_some()) {
                    return false;
                }
                s.vectors.len()
            };
            if let Err(e) = m.qt.sync_irqs() {
                m.device_failed("INTx poll", &e);
                return false;
            }
            let asserted = INTX_GSIS.clone().any(|g| m.qt.irq_level(g));
            let mut ran = false;
            if asserted {
                // A level-triggered, possibly shared line: every handler
                // gets a look until one claims it.
                for i in 0..vectors {
                    match call_handler(m, i) {
                        Delivery::Claimed => {
                            ran = true;
                            break;
                        }
                        Delivery::Unclaimed => ran = true,
                        Delivery::NoHandler => {}
                    }
                }
            }
            ran
        }
        IntrType::None => {
            // Nothing allocated: a message now (sent before the free) has
            // no handler; take it, so that it never reaches a later one.
            deliver_messages(m)
        }
    }
}

/// Takes every MSI/MSI-X message that arrived since the last look, one
/// interrupt each: the vectors in turn, one message per vector per round,
/// as long as any of the messages counted at the start of the look is
/// left. A message for a vector without an enabled handler is dropped
/// (counted in `stray_messages`). True if a handler ran.
fn deliver_messages(m: &Machine) -> bool {
    let mut pending = [0u64; 256];
    for (v, p) in pending.iter_mut().enumerate() {
        *p = m.messages_untaken(v as u8);
    }
    let mut ran = false;
    while pending.iter().any(|&p| p > 0) {
        for (v, p) in pending.iter_mut().enumerate() {
            if *p == 0 {
                continue;
            }
            *p -= 1;
            // Taken before the handler runs: a message that arrives while
            // it runs is a new interrupt.
            m.taken[v].fetch_add(1, Ordering::AcqRel);
            // Vectors outside the device's range (QEMU's own at reset, the
            // launch probe) are nobody's: taken and forgotten.
            let Some(inum) = crate::msi::inum_of(v as u8) else {
                continue;
            };
            match call_handler(m, inum) {
                Delivery::NoHandler => {
                    m.stats.stray_messages.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::Claimed | Delivery::Unclaimed => ran = true,
            }
        }
    }
    ran
}

/// Calls vector `i`'s handler, if it has an enabled one.
fn call_handler(m: &Machine, i: usize) -> Delivery {
    let _dispatch = lock(&m.dispatch);
    // Checked under the dispatch lock, which ddi_intr_disable and
    // ddi_intr_remove_handler take: never a call after either returned.
    let slot = { lock(&m.intr).vectors.get(i).copied() };
    let Some(VectorSlot {
        handler: Some((f, a1, a2)),
        enabled: true,
    }) = slot
    else {
        return Delivery::NoHandler;
    };
    m.stats.interrupts.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = m.stats.per_vector.get(i) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    // The interrupt system spreads vectors over CPUs (illumos apix binds
    // them round-robin): vector i runs on CPU i here.
    crate::ddi::cpu::run_on(i);
    crate::ddi::sync::enter_interrupt_context();
    let r = {
        let _m = crate::meter::driver();
        // SAFETY: the driver registered this handler with these arguments
        // through ddi_intr_add_handler and has not removed it (checked above,
        // under the dispatch lock that ddi_intr_disable/remove take).
        unsafe { f(a1 as *mut i8, a2 as *mut i8) }
    };
    crate::ddi::sync::leave_interrupt_context(m);
    if r == rvscsi::ffi::DDI_INTR_CLAIMED {
        Delivery::Claimed
    } else {
        m.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
        Delivery::Unclaimed
    }
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<Arc<Machine>>> = const { std::cell::RefCell::new(None) };
}

/// The machine the calling thread works for: set by the test bed around
/// every call into the driver, and by every thread the emulation starts
/// (interrupts, task queues, timers). DDI functions that take no device
/// handle (mutexes, timers) account to it.
pub fn current() -> Option<Arc<Machine>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Restores the previous current machine when dropped.
pub struct CurrentGuard(Option<Arc<Machine>>);

/// Makes `m` the calling thread's current machine.
pub fn set_current(m: &Arc<Machine>) -> CurrentGuard {
    CurrentGuard(CURRENT.with(|c| c.replace(Some(m.clone()))))
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Where the HBA's virtio-pci structures are: its vendor-specific
/// capabilities (virtio 1.2 §4.1.4: cfg_type at +3, bar at +4, offset at
/// +8, notify_off_multiplier at +16) and, on a transitional device, the
/// legacy I/O BAR 0.
fn virtio_layout(
    pci: &Pci<'_>,
    bdf: Bdf,
    bars: &[BarInfo],
) -> Result<crate::faults::VirtioLayout, MachineError> {
    let mut l = crate::faults::VirtioLayout::default();
    let base = |bar: u8| {
        bars.iter()
            .find(|b| b.index == bar && !b.io)
            .map(|b| b.addr)
    };
    for (at, id) in pci.capabilities(bdf)? {
        if id != 0x09 {
            continue;
        }
        let cfg_type = pci.cfg_read8(bdf, at + 3)?;
        let bar = pci.cfg_read8(bdf, at + 4)?;
        let off = u64::from(pci.cfg_read32(bdf, at + 8)?);
        let Some(b) = base(bar) else { continue };
        match cfg_type {
            1 => l.common = Some(b + off),
            2 => l.notify = Some((b + off, pci.cfg_read32(bdf, at + 16)?)),
            3 => l.isr = Some(b + off),
            4 => l.device = Some(b + off),
            _ => {}
        }
    }
    l.legacy = bars
        .iter()
        .find(|b| b.index == 0 && b.io)
        .map(|b| b.addr as u16);
    Ok(l)
}
