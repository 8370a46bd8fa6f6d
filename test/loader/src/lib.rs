//! A user-space loader for the rvscsi kernel module object that follows the
//! rules of krtld, the illumos kernel runtime linker, on amd64, and binds
//! the module to the test bed's DDI emulation: the bytes that ship run
//! against QEMU's device models.
//!
//! What krtld does and this loader does the same way (illumos
//! `uts/common/krtld/kobj.c`, `uts/intel/amd64/krtld/kobj_reloc.c`,
//! `doreloc.c`):
//! - the object must be an ELF64 relocatable object for amd64; a section
//!   of type `SHT_REL` is refused ("can't process type SHT_REL");
//! - `SHF_ALLOC` sections are laid out, text first, each at its alignment,
//!   `SHT_NOBITS` ones zeroed; here in the low 2 GiB of the address space
//!   (`MAP_32BIT`), where the kernel code model's sign-extended 32-bit
//!   addresses (`R_X86_64_32S`) hold as they do in the kernel's top 2 GiB;
//! - relocations are applied only to loaded sections: value = S + A, minus
//!   P for PC-relative types, written with an overflow check; local symbols
//!   take their section's address; undefined ones bind to the kernel's
//!   exports, and an undefined symbol that is not found fails the load
//!   with its name ("not found: ...");
//! - a call to an undefined `__dtrace_probe_<name>` is an SDT probe site:
//!   its 5-byte `call` becomes no-ops (a tail-call `jmp` becomes no-ops and
//!   `ret`), and the site is recorded (sdt_reloc_resolve);
//! - `_depends_on` lists the modules to load first;
//! - modload calls `_init`, `_info`; modunload calls `_fini`.
//!
//! Where krtld would compute something wrongly, the loader refuses instead:
//! GOT-relative and TLS relocations, `R_X86_64_32` (zero-extended: wrong
//! for every kernel address), and any type krtld does not relocate.
//!
//! Binding: the emulated kernel's symbols live in this process, far from
//! the module; a function import is reached through a stub placed beside
//! the module (`jmp *addr(%rip)`), a data import by its absolute address.
//! DTrace "enabling" a probe ([`Module::enable_probes`]) patches its sites
//! back into calls to the test bed's recording functions.

use object::LittleEndian as LE;
use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
use rvscsi::ffi;
use rvscsi_emu::bed::{DevOpsBinding, DriverBinding};
use rvscsi_emu::ddi::{modctl, sdt, symbols};
use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_int, c_void};
use std::fmt;
use std::sync::Arc;

type ElfHeader = elf::FileHeader64<LE>;

/// Why a module could not be loaded or run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

fn err<T>(msg: impl Into<String>) -> Result<T, LoadError> {
    Err(LoadError(msg.into()))
}

/// The largest module the loader maps (the real one is ~80 KiB).
pub const MAX_MODULE_BYTES: usize = 64 << 20;

/// The SDT probe prefix krtld recognises.
const SDT_PREFIX: &str = "__dtrace_probe_";
const SDT_CALL: u8 = 0xe8;
const SDT_JMP: u8 = 0xe9;
const SDT_NOP: u8 = 0x90;
const SDT_RET: u8 = 0xc3;

/// A function stub: `jmp *0(%rip)`, the 8-byte target, two `int3`.
const STUB_BYTES: usize = 16;

/// The emulated kernel a module is loaded into.
pub struct Kernel {
    exports: HashMap<&'static str, symbols::KernelSymbol>,
    modules: BTreeSet<&'static str>,
}

impl Kernel {
    /// The test bed's kernel: the DDI emulation's exports, and `misc/scsi`
    /// (its SCSA framework) loaded.
    pub fn test_bed() -> Kernel {
        Kernel {
            exports: symbols::kernel_symbols()
                .into_iter()
                .map(|s| (s.name, s))
                .collect(),
            modules: ["misc/scsi"].into_iter().collect(),
        }
    }
}

/// A probe site the loader found (and turned into no-ops).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// The symbol called (`__dtrace_probe_rvscsi__cmd__start`).
    pub symbol: String,
    /// The address of the 5-byte instruction.
    pub addr: usize,
    /// Whether it was a tail call (`jmp`).
    pub tail_call: bool,
}

/// An anonymous mapping in the low 2 GiB.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Mapping, LoadError> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return err(format!(
                "cannot map {len} bytes below 2 GiB: {}",
                std::io::Error::last_os_error()
            ));
        }
        let m = Mapping {
            base: p.cast(),
            len,
        };
        if m.base as usize + len > 1 << 31 {
            return err(
                "the mapping is not below 2 GiB: 32-bit sign-extended addresses would not hold",
            );
        }
        Ok(m)
    }

    fn addr(&self) -> usize {
        self.base as usize
    }

    /// The mapping's bytes.
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: base..base+len is our mapping, readable and writable.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), no longer referenced (Module
        // only drops it once the module is not installed).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Loaded,
    Installed,
    Removed,
}

/// A loaded module.
pub struct Module {
    name: String,
    map: Option<Mapping>,
    /// Where each loaded section went: section index → mapping offset.
    placed: HashMap<usize, usize>,
    /// Defined symbols by name (the first of a name wins, globals first).
    defined: HashMap<String, usize>,
    probes: Vec<ProbeSite>,
    /// Next free stub slot (mapping offset) and the end of the stub area.
    stub_next: usize,
    stub_end: usize,
    /// Function stubs by target.
    stubs: HashMap<usize, usize>,
    depends_on: Vec<String>,
    state: State,
    dev_ops: Option<usize>,
}

// SAFETY: the module's memory is process-wide code and data; the kernel
// calls modules from any thread.
unsafe impl Send for Module {}
// SAFETY: as above; the methods that change it take &mut self.
unsafe impl Sync for Module {}

/// Sections and symbols of the object being loaded.
struct Parsed<'a> {
    data: &'a [u8],
    sections: object::read::elf::SectionTable<'a, ElfHeader>,
    symtab_index: usize,
    symbols: object::read::elf::SymbolTable<'a, ElfHeader>,
}

impl Parsed<'_> {
    fn section_name(&self, s: &elf::SectionHeader64<LE>) -> String {
        self.sections
            .section_name(LE, s)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_else(|_| "<bad name>".into())
    }

    fn symbol_name(&self, s: &elf::Sym64<LE>) -> String {
        s.name(LE, self.symbols.strings())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default()
    }
}

fn is_tls_reloc(t: u32) -> bool {
    matches!(
        t,
        elf::R_X86_64_DTPMOD64
            | elf::R_X86_64_DTPOFF64
            | elf::R_X86_64_TPOFF64
            | elf::R_X86_64_TLSGD
            | elf::R_X86_64_TLSLD
            | elf::R_X86_64_DTPOFF32
            | elf::R_X86_64_GOTTPOFF
            | elf::R_X86_64_TPOFF32
            | elf::R_X86_64_GOTPC32_TLSDESC
            | elf::R_X86_64_TLSDESC_CALL
            | elf::R_X86_64_TLSDESC
    )
}

fn is_got_reloc(t: u32) -> bool {
    matches!(
        t,
        elf::R_X86_64_GOT32
            | elf::R_X86_64_GOTPCREL
            | elf::R_X86_64_GOTPCRELX
            | elf::R_X86_64_REX_GOTPCRELX
            | elf::R_X86_64_GOTOFF64
            | elf::R_X86_64_GOTPC32
            | elf::R_X86_64_GOT64
            | elf::R_X86_64_GOTPCREL64
            | elf::R_X86_64_GOTPC64
            | elf::R_X86_64_GOTPLT64
            | elf::R_X86_64_PLTOFF64
    )
}

fn reloc_name(t: u32) -> String {
    match t {
        elf::R_X86_64_64 => "R_X86_64_64".into(),
        elf::R_X86_64_PC32 => "R_X86_64_PC32".into(),
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32".into(),
        elf::R_X86_64_32 => "R_X86_64_32".into(),
        elf::R_X86_64_32S => "R_X86_64_32S".into(),
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL".into(),
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX".into(),
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX".into(),
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32".into(),
        elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF".into(),
        elf::R_X86_64_TLSGD => "R_X86_64_TLSGD".into(),
        t => format!("R_X86_64 type {t}"),
    }
}

impl Module {
    /// Reads and loads the module file at `path`.
    pub fn load_file(path: &std::path::Path, kernel: &Kernel) -> Result<Module, LoadError> {
        let bytes =
            std::fs::read(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "module".into());
        Module::load(&name, &bytes, kernel)
    }

    /// Loads module `name` from `bytes`: lays out and relocates it, binds
    /// its imports to `kernel`, turns its probe sites into no-ops, checks
    /// its dependencies. It is not initialised yet ([`Module::init`]).
    pub fn load(name: &str, bytes: &[u8], kernel: &Kernel) -> Result<Module, LoadError> {
        let p = parse(bytes).map_err(|e| LoadError(format!("{name}: {}", e.0)))?;
        let mut m = layout(name, &p)?;
        // Relocation types first: an object built for a GOT also names
        // _GLOBAL_OFFSET_TABLE_, and the real problem is the type.
        m.check_relocation_types(&p)?;
        let values = m.bind_symbols(&p, kernel)?;
        m.relocate(&p, &values)?;
        m.find_entry_points()?;
        m.depends_on = m.read_depends_on(&p)?;
        for d in &m.depends_on {
            if !kernel.modules.contains(d.as_str()) {
                return err(format!(
                    "{name} depends on {d}, which this kernel does not provide"
                ));
            }
        }
        Ok(m)
    }

    /// The module's name (its file name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The modules it depends on (`_depends_on`).
    pub fn depends_on(&self) -> &[String] {
        &self.depends_on
    }

    /// The address of a symbol it defines (global or local).
    pub fn symbol(&self, name: &str) -> Option<usize> {
        self.defined.get(name).copied()
    }

    /// The probe sites krtld would have recorded.
    pub fn probe_sites(&self) -> &[ProbeSite] {
        &self.probes
    }

    /// Where the module lies in memory.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.map
            .as_ref()
            .map_or(0..0, |m| m.addr()..m.addr() + m.len)
    }

    /// DTrace enabling every probe whose recording function the test bed
    /// has: each site becomes a call (or, for a tail call, a jump) to it
    /// again. Returns the sites enabled; call before [`Module::init`].
    pub fn enable_probes(&mut self) -> Result<usize, LoadError> {
        if self.state != State::Loaded {
            return err("probes are enabled before _init, while nothing runs the module's code");
        }
        let mut n = 0;
        for site in self.probes.clone() {
            let Some(target) = sdt::probe_function(&site.symbol) else {
                continue;
            };
            let stub = self.stub_for(target)?;
            let base = self.range().start;
            let rel = stub as i64 - (site.addr as i64 + 5);
            let rel =
                i32::try_from(rel).map_err(|_| LoadError("probe stub out of reach".into()))?;
            let off = site.addr - base;
            let bytes = self.map.as_mut().map(Mapping::bytes).unwrap_or(&mut []);
            bytes[off] = if site.tail_call { SDT_JMP } else { SDT_CALL };
            bytes[off + 1..off + 5].copy_from_slice(&rel.to_le_bytes());
            n += 1;
        }
        Ok(n)
    }

    /// modload's `_init(9E)`: installs the module. Its `dev_ops` is then
    /// known ([`Module::binding`]).
    pub fn init(&mut self) -> Result<(), LoadError> {
        if self.state == State::Installed {
            return err(format!("{} is already installed", self.name));
        }
        let before = modctl::installed_list();
        let init = self.entry("_init")?;
        // SAFETY: the module's _init, relocated and bound; called once per
        // load, from a thread that may block, as modload does.
        let rc = unsafe { init() };
        if rc != 0 {
            return err(format!("{}: _init failed with errno {rc}", self.name));
        }
        let range = self.range();
        let installed = modctl::installed_list()
            .into_iter()
            .find(|m| !before.contains(m) && range.contains(&m.linkage));
        match installed {
            Some(m) => {
                self.dev_ops = Some(m.dev_ops);
                self.state = State::Installed;
                Ok(())
            }
            None => err(format!(
                "{}: _init returned 0 without installing its linkage (mod_install)",
                self.name
            )),
        }
    }

    /// modinfo's `_info(9E)`: non-zero on success.
    pub fn info(&self) -> Result<c_int, LoadError> {
        let info = self.entry_with_arg("_info")?;
        let mut buf = [0u64; 128];
        // SAFETY: the module's _info with a writable modinfo-sized buffer.
        Ok(unsafe { info(buf.as_mut_ptr().cast()) })
    }

    /// modunload's `_fini(9E)`: 0 when the module is removed (then it may
    /// be dropped), EBUSY while an instance is attached.
    pub fn fini(&mut self) -> Result<c_int, LoadError> {
        if self.state != State::Installed {
            return err(format!("{} is not installed", self.name));
        }
        let fini = self.entry("_fini")?;
        // SAFETY: the module's _fini, from a thread that may block.
        let rc = unsafe { fini() };
        if rc == 0 {
            self.state = State::Removed;
            self.dev_ops = None;
        }
        Ok(rc)
    }

    /// The installed module's `dev_ops(9S)` address.
    pub fn dev_ops(&self) -> Option<usize> {
        self.dev_ops
    }

    /// The bed's way to the installed module's `dev_ops`.
    pub fn binding(&self) -> Result<Arc<dyn DriverBinding>, LoadError> {
        match self.dev_ops {
            Some(o) => Ok(Arc::new(DevOpsBinding {
                dev_ops: o as *mut ffi::dev_ops,
            })),
            None => err(format!("{} is not installed", self.name)),
        }
    }

    fn entry(&self, name: &str) -> Result<unsafe extern "C" fn() -> c_int, LoadError> {
        let a = self
            .symbol(name)
            .ok_or_else(|| LoadError(format!("{} has no {name}", self.name)))?;
        // SAFETY: a function symbol of the loaded, relocated module with the
        // C signature of _init(9E)/_fini(9E).
        Ok(unsafe { std::mem::transmute::<usize, unsafe extern "C" fn() -> c_int>(a) })
    }

    fn entry_with_arg(
        &self,
        name: &str,
    ) -> Result<unsafe extern "C" fn(*mut c_void) -> c_int, LoadError> {
        let a = self
            .symbol(name)
            .ok_or_else(|| LoadError(format!("{} has no {name}", self.name)))?;
        // SAFETY: _info(9E)'s C signature, in the loaded module.
        Ok(unsafe { std::mem::transmute::<usize, unsafe extern "C" fn(*mut c_void) -> c_int>(a) })
    }

    /// A stub beside the module that jumps to `target`.
    fn stub_for(&mut self, target: usize) -> Result<usize, LoadError> {
        if let Some(&s) = self.stubs.get(&target) {
            return Ok(s);
        }
        if self.stub_next + STUB_BYTES > self.stub_end {
            return err("out of stub space");
        }
        let off = self.stub_next;
        self.stub_next += STUB_BYTES;
        let base = self.range().start;
        let bytes = self.map.as_mut().map(Mapping::bytes).unwrap_or(&mut []);
        let stub = &mut bytes[off..off + STUB_BYTES];
        stub[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
        stub[6..14].copy_from_slice(&(target as u64).to_le_bytes());
        stub[14..16].copy_from_slice(&[0xcc, 0xcc]);
        self.stubs.insert(target, base + off);
        Ok(base + off)
    }

    /// Every symbol's value, as krtld computes it; imports bound (function
    /// imports through stubs), probe symbols marked.
    fn bind_symbols(
        &mut self,
        p: &Parsed<'_>,
        kernel: &Kernel,
    ) -> Result<Vec<SymValue>, LoadError> {
        let base = self.range().start;
        let mut values = Vec::with_capacity(p.symbols.len());
        let mut missing = Vec::new();
        for sym in p.symbols.symbols() {
            let name = p.symbol_name(sym);
            let shndx = sym.st_shndx(LE);
            let v = match shndx {
                elf::SHN_UNDEF if name.is_empty() => SymValue::Addr(0),
                elf::SHN_UNDEF if name.starts_with(SDT_PREFIX) => SymValue::Probe(name.clone()),
                elf::SHN_UNDEF => match kernel.exports.get(name.as_str()) {
                    Some(k) if k.data => SymValue::Addr(k.addr),
                    Some(k) => SymValue::Addr(self.stub_for(k.addr)?),
                    None if sym.st_bind() == elf::STB_WEAK => SymValue::Unbound,
                    None => {
                        missing.push(name.clone());
                        SymValue::Unbound
                    }
                },
                elf::SHN_ABS => SymValue::Addr(sym.st_value(LE) as usize),
                elf::SHN_COMMON => {
                    return err(format!(
                        "{}: common symbol {name} (build with -fno-common)",
                        self.name
                    ));
                }
                elf::SHN_XINDEX => {
                    return err(format!(
                        "{}: extended section indexes are not supported",
                        self.name
                    ));
                }
                i => match self.placed.get(&usize::from(i)) {
                    Some(&off) => SymValue::Addr(base + off + sym.st_value(LE) as usize),
                    // A symbol of a section that is not loaded.
                    None => SymValue::Addr(sym.st_value(LE) as usize),
                },
            };
            // Defined in a loaded section: remember it by name (globals win
            // over locals of the same name).
            let in_module = shndx != elf::SHN_UNDEF
                && !name.is_empty()
                && self.placed.contains_key(&usize::from(shndx));
            if let (SymValue::Addr(a), true) = (&v, in_module) {
                let global = sym.st_bind() != elf::STB_LOCAL;
                if global || !self.defined.contains_key(&name) {
                    self.defined.insert(name.clone(), *a);
                }
            }
            values.push(v);
        }
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            let list: Vec<String> = missing.iter().map(|m| format!("not found: {m}")).collect();
            return err(format!(
                "{}: undefined symbols the kernel does not export: {}",
                self.name,
                list.join(", ")
            ));
        }
        Ok(values)
    }

    /// Refuses relocation types krtld would reject or compute wrongly, in
    /// the sections it loads.
    fn check_relocation_types(&self, p: &Parsed<'_>) -> Result<(), LoadError> {
        for s in p.sections.iter() {
            if s.sh_type(LE) != elf::SHT_RELA
                || !self.placed.contains_key(&(s.sh_info(LE) as usize))
            {
                continue;
            }
            let Ok(Some((relas, _))) = s.rela(LE, p.data) else {
                continue; // reported by relocate()
            };
            for rela in relas {
                let ty = rela.r_type(LE, false);
                let why = if is_tls_reloc(ty) {
                    "thread-local storage does not exist in the kernel (krtld: invalid relocation type)"
                } else if is_got_reloc(ty) {
                    "krtld has no GOT and would compute this silently wrong"
                } else {
                    continue;
                };
                let sym = p
                    .symbols
                    .symbol(object::SymbolIndex(rela.r_sym(LE, false) as usize))
                    .map(|s| p.symbol_name(s))
                    .unwrap_or_default();
                let tname = p
                    .sections
                    .section(object::SectionIndex(s.sh_info(LE) as usize))
                    .map(|t| p.section_name(t))
                    .unwrap_or_default();
                return err(format!(
                    "{}: {} at {tname}+{:#x} ({sym}): {why}",
                    self.name,
                    reloc_name(ty),
                    rela.r_offset(LE)
                ));
            }
        }
        Ok(())
    }

    fn relocate(&mut self, p: &Parsed<'_>, values: &[SymValue]) -> Result<(), LoadError> {
        let base = self.range().start;
        for s in p.sections.iter() {
            if s.sh_type(LE) != elf::SHT_RELA {
                continue;
            }
            let target = s.sh_info(LE) as usize;
            let Some(&toff) = self.placed.get(&target) else {
                // krtld relocates only sections it loads.
                continue;
            };
            let rname = p.section_name(s);
            if s.sh_link(LE) as usize != p.symtab_index {
                return err(format!(
                    "{}: {rname} is for another symbol table",
                    self.name
                ));
            }
            let tsec = p
                .sections
                .section(object::SectionIndex(target))
                .map_err(|e| LoadError(format!("{}: {e}", self.name)))?;
            let tsize = tsec.sh_size(LE) as usize;
            let tname = p.section_name(tsec);
            let relas = match s.rela(LE, p.data) {
                Ok(Some((r, _))) => r,
                Ok(None) => continue,
                Err(e) => return err(format!("{}: {rname}: {e}", self.name)),
            };
            for rela in relas {
                let ty = rela.r_type(LE, false);
                let si = rela.r_sym(LE, false) as usize;
                let offset = rela.r_offset(LE) as usize;
                let addend = rela.r_addend(LE);
                let sym_name = p
                    .symbols
                    .symbol(object::SymbolIndex(si))
                    .map(|s| p.symbol_name(s))
                    .unwrap_or_default();
                let at = format!("{tname}+{offset:#x} ({sym_name})");
                if ty == elf::R_X86_64_NONE {
                    continue;
                }
                if is_tls_reloc(ty) {
                    return err(format!(
                        "{}: {} at {at}: thread-local storage does not exist in the kernel (krtld: invalid relocation type)",
                        self.name,
                        reloc_name(ty)
                    ));
                }
                if is_got_reloc(ty) {
                    return err(format!(
                        "{}: {} at {at}: krtld has no GOT and would compute this silently wrong",
                        self.name,
                        reloc_name(ty)
                    ));
                }
                let width = match ty {
                    elf::R_X86_64_64 => 8,
                    elf::R_X86_64_PC32
                    | elf::R_X86_64_PLT32
                    | elf::R_X86_64_32S
                    | elf::R_X86_64_32 => 4,
                    _ => {
                        return err(format!(
                            "{}: {} at {at}: not a relocation krtld applies to a module",
                            self.name,
                            reloc_name(ty)
                        ));
                    }
                };
                if offset.checked_add(width).is_none_or(|e| e > tsize) {
                    return err(format!(
                        "{}: relocation at {at} lies outside its section",
                        self.name
                    ));
                }
                let place = base + toff + offset;
                let Some(v) = values.get(si) else {
                    return err(format!(
                        "{}: relocation at {at} names symbol {si}, out of range",
                        self.name
                    ));
                };
                let s_value = match v {
                    SymValue::Addr(a) => *a as i64,
                    SymValue::Unbound => continue,
                    SymValue::Probe(sym) => {
                        self.sdt_site(sym, toff + offset, &at)?;
                        continue;
                    }
                };
                let pc_relative = matches!(ty, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32);
                let value = s_value.wrapping_add(addend).wrapping_sub(if pc_relative {
                    place as i64
                } else {
                    0
                });
                let bytes = self.map.as_mut().map(Mapping::bytes).unwrap_or(&mut []);
                let field = &mut bytes[toff + offset..toff + offset + width];
                match ty {
                    elf::R_X86_64_64 => field.copy_from_slice(&value.to_le_bytes()),
                    elf::R_X86_64_32 => {
                        // Zero-extended: right only for a small absolute
                        // value; every kernel address is above 4 GiB.
                        let abs = matches!(
                            p.symbols
                                .symbol(object::SymbolIndex(si))
                                .map(|s| s.st_shndx(LE)),
                            Ok(elf::SHN_ABS)
                        );
                        match u32::try_from(value) {
                            Ok(v) if abs => field.copy_from_slice(&v.to_le_bytes()),
                            _ => {
                                return err(format!(
                                    "{}: R_X86_64_32 at {at}: zero-extends a 32-bit address, which cannot hold a kernel address",
                                    self.name
                                ));
                            }
                        }
                    }
                    _ => match i32::try_from(value) {
                        Ok(v) => field.copy_from_slice(&v.to_le_bytes()),
                        Err(_) => {
                            return err(format!(
                                "{}: {} at {at}: value {value:#x} does not fit in 32 signed bits (relocation overflow)",
                                self.name,
                                reloc_name(ty)
                            ));
                        }
                    },
                }
            }
        }
        Ok(())
    }

    /// krtld's handling of a probe site: the `call`/`jmp` rel32 whose field
    /// is at mapping offset `field` becomes no-ops (and `ret` for a tail
    /// call).
    fn sdt_site(&mut self, sym: &str, field: usize, at: &str) -> Result<(), LoadError> {
        let base = self.range().start;
        let bytes = self.map.as_mut().map(Mapping::bytes).unwrap_or(&mut []);
        let opcode = field.checked_sub(1).and_then(|i| bytes.get(i).copied());
        let tail_call = match opcode {
            Some(SDT_CALL) => false,
            Some(SDT_JMP) => true,
            _ => {
                return err(format!(
                    "probe {sym} at {at} is not a call or jump: krtld would overwrite other instructions"
                ));
            }
        };
        if field + 4 > bytes.len() {
            return err(format!("probe {sym} at {at} lies outside the module"));
        }
        bytes[field - 1..field + 3].fill(SDT_NOP);
        bytes[field + 3] = if tail_call { SDT_RET } else { SDT_NOP };
        self.probes.push(ProbeSite {
            symbol: sym.to_string(),
            addr: base + field - 1,
            tail_call,
        });
        Ok(())
    }

    fn find_entry_points(&self) -> Result<(), LoadError> {
        for e in ["_init", "_fini", "_info"] {
            if self.symbol(e).is_none() {
                return err(format!("{}: no {e}: not a loadable module", self.name));
            }
        }
        Ok(())
    }

    /// The modules `_depends_on` names (krtld's depends_on()).
    fn read_depends_on(&self, p: &Parsed<'_>) -> Result<Vec<String>, LoadError> {
        let Some(addr) = self.symbol("_depends_on") else {
            return Ok(Vec::new());
        };
        let size = p
            .symbols
            .symbols()
            .iter()
            .find(|s| p.symbol_name(s) == "_depends_on" && s.st_shndx(LE) != elf::SHN_UNDEF)
            .map_or(0, |s| s.st_size(LE) as usize);
        let range = self.range();
        if size == 0 || addr < range.start || addr + size > range.end {
            return err(format!(
                "{}: _depends_on is not inside the module",
                self.name
            ));
        }
        // SAFETY: addr..addr+size is inside our mapping (checked).
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, size) };
        if bytes.last() != Some(&0) {
            return err(format!("{}: _depends_on is not NUL-terminated", self.name));
        }
        Ok(String::from_utf8_lossy(&bytes[..size - 1])
            .split_whitespace()
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.state == State::Installed {
            // Installed code may still be called (interrupts, callbacks):
            // never unmap it; the kernel would not unload it either.
            eprintln!(
                "rvscsi-loader: {} dropped while installed: its memory is kept",
                self.name
            );
            if let Some(m) = self.map.take() {
                std::mem::forget(m);
            }
        }
    }
}

/// A symbol's value for relocation.
#[derive(Clone, Debug)]
enum SymValue {
    Addr(usize),
    /// An undefined weak symbol: krtld leaves its relocations alone.
    Unbound,
    /// An SDT probe symbol.
    Probe(String),
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, LoadError> {
    let header =
        ElfHeader::parse(bytes).map_err(|e| LoadError(format!("not an ELF64 object: {e}")))?;
    if header.e_ident().data != elf::ELFDATA2LSB {
        return err("not a little-endian object");
    }
    if header.e_type(LE) != elf::ET_REL {
        return err(format!(
            "ELF type {} is not ET_REL: a module is a relocatable object",
            header.e_type(LE)
        ));
    }
    if header.e_machine(LE) != elf::EM_X86_64 {
        return err(format!(
            "machine {} is not EM_X86_64: not an amd64 module",
            header.e_machine(LE)
        ));
    }
    let sections = header
        .sections(LE, bytes)
        .map_err(|e| LoadError(format!("bad section headers: {e}")))?;
    let mut symtab_index = None;
    for (i, s) in sections.iter().enumerate() {
        match s.sh_type(LE) {
            elf::SHT_REL => {
                let name = sections
                    .section_name(LE, s)
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default();
                return err(format!(
                    "section {name} is SHT_REL: krtld can't process type SHT_REL"
                ));
            }
            elf::SHT_INIT_ARRAY | elf::SHT_FINI_ARRAY | elf::SHT_PREINIT_ARRAY => {
                let name = sections
                    .section_name(LE, s)
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default();
                return err(format!(
                    "section {name} holds constructors or destructors, which krtld never runs"
                ));
            }
            elf::SHT_SYMTAB if symtab_index.is_some() => return err("more than one symbol table"),
            elf::SHT_SYMTAB => symtab_index = Some(i),
            _ => {}
        }
        if s.sh_flags(LE) & u64::from(elf::SHF_TLS) != 0 {
            return err("a thread-local section: the kernel has no TLS");
        }
    }
    let symtab_index = symtab_index.ok_or_else(|| LoadError("no symbol table".into()))?;
    let symbols = sections
        .symbols(LE, bytes, elf::SHT_SYMTAB)
        .map_err(|e| LoadError(format!("bad symbol table: {e}")))?;
    Ok(Parsed {
        data: bytes,
        sections,
        symtab_index,
        symbols,
    })
}

/// Places the loaded sections (text first, like krtld's text and data
/// areas), copies their contents, and leaves room for the stubs.
fn layout(name: &str, p: &Parsed<'_>) -> Result<Module, LoadError> {
    let mut order: Vec<usize> = Vec::new();
    for exec in [true, false] {
        for (i, s) in p.sections.iter().enumerate() {
            let f = s.sh_flags(LE);
            if f & u64::from(elf::SHF_ALLOC) != 0
                && (f & u64::from(elf::SHF_EXECINSTR) != 0) == exec
            {
                order.push(i);
            }
        }
    }
    let mut placed = HashMap::new();
    let mut at = 0usize;
    for &i in &order {
        let s = p
            .sections
            .section(object::SectionIndex(i))
            .map_err(|e| LoadError(e.to_string()))?;
        let align = (s.sh_addralign(LE) as usize).max(1);
        if !align.is_power_of_two() || align > 4096 {
            return err(format!(
                "{name}: section {} has alignment {align}",
                p.section_name(s)
            ));
        }
        let size = s.sh_size(LE) as usize;
        at = at.next_multiple_of(align);
        placed.insert(i, at);
        at = at
            .checked_add(size)
            .filter(|&e| e <= MAX_MODULE_BYTES)
            .ok_or_else(|| LoadError(format!("{name}: larger than {MAX_MODULE_BYTES} bytes")))?;
    }
    // Stubs: one per undefined symbol at most, plus one per probe function.
    let undefined = p
        .symbols
        .symbols()
        .iter()
        .filter(|s| s.st_shndx(LE) == elf::SHN_UNDEF)
        .count();
    let stub_start = at.next_multiple_of(16);
    let stub_end = stub_start + (undefined + 16) * STUB_BYTES;
    let total = stub_end.next_multiple_of(4096);
    if total > MAX_MODULE_BYTES {
        return err(format!("{name}: larger than {MAX_MODULE_BYTES} bytes"));
    }
    let mut map = Mapping::new(total.max(4096))?;
    for &i in &order {
        let s = p
            .sections
            .section(object::SectionIndex(i))
            .map_err(|e| LoadError(e.to_string()))?;
        if s.sh_type(LE) == elf::SHT_NOBITS {
            continue; // the anonymous mapping is zeroed: .bss
        }
        let data = s
            .data(LE, p.data)
            .map_err(|e| LoadError(format!("{name}: section {}: {e}", p.section_name(s))))?;
        let off = placed[&i];
        map.bytes()[off..off + data.len()].copy_from_slice(data);
    }
    Ok(Module {
        name: name.to_string(),
        map: Some(map),
        placed,
        defined: HashMap::new(),
        probes: Vec::new(),
        stub_next: stub_start,
        stub_end,
        stubs: HashMap::new(),
        depends_on: Vec::new(),
        state: State::Loaded,
        dev_ops: None,
    })
}
