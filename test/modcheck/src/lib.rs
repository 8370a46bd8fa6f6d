//! Checks a kernel module object against what the illumos kernel runtime
//! linker (krtld) accepts and what a kernel module may do, before it ever
//! reaches an illumos machine.
//!
//! The rules, and where they come from:
//! - one ELF64 little-endian relocatable object for x86-64 (`ET_REL`,
//!   `EM_X86_64`): krtld loads nothing else as a module;
//! - relocations in loaded sections only of the types krtld computes
//!   correctly for a module (`uts/intel/amd64/krtld/kobj_reloc.c`
//!   do_relocate, `doreloc.c`): `R_X86_64_64`, `PC32`, `PLT32`, `32S`. No
//!   `SHT_REL` section at all (krtld refuses it), no TLS relocation
//!   (refused), no GOT-relative one (there is no GOT: it would be computed
//!   silently wrong), no `R_X86_64_32` (zero-extends: wrong for kernel
//!   addresses);
//! - no `.init_array`, `.fini_array`, `.ctors`, `.dtors` (never run), no
//!   TLS sections, no `.got`/`.plt`, no `.eh_frame` (unused, and it carries
//!   relocations for nothing);
//! - every undefined symbol is a kernel export the project has listed
//!   (`test/abi/kernel-imports.tsv`), and that list is exactly what the test
//!   bed's DDI emulation implements; `__dtrace_probe_*` calls are SDT probe
//!   sites, which krtld turns into no-ops, so each must be a 5-byte
//!   `call`/`jmp rel32` (kobj_reloc.c sdt_reloc_resolve);
//! - the module exports only the symbols its mapfile makes global
//!   (`_init`, `_fini`, `_info`) and records its dependencies (`misc/scsi`)
//!   in `_depends_on` or a `.dynamic` section;
//! - no instruction touches x87, MMX, SSE or AVX registers (kernel threads
//!   do not save that state unless they ask), and nothing is stored below
//!   the stack pointer (interrupts use the stack there: no red zone).

use iced_x86::{
    Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, InstructionInfoFactory, OpKind,
    Register,
};
use object::LittleEndian as LE;
use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
pub mod testobj;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

type ElfHeader = elf::FileHeader64<LE>;

/// Where an imported symbol comes from in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    /// `function` or `data`.
    pub kind: String,
    /// `kernel` (genunix/unix, always present) or a module such as
    /// `misc/scsi`, which the module must depend on.
    pub provider: String,
}

/// What a module may import, export and depend on.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Kernel symbols the module may use.
    pub imports: BTreeMap<String, Import>,
    /// The symbols it must export, and the only ones it may.
    pub exports: BTreeSet<String>,
    /// The modules it depends on.
    pub depends_on: BTreeSet<String>,
}

impl Policy {
    /// Reads the import list (`name kind provider declared_in`, tab
    /// separated, one header line) and the mapfile's global symbols.
    pub fn parse(imports_tsv: &str, mapfile: &str, depends_on: &[&str]) -> Result<Policy, String> {
        let mut imports = BTreeMap::new();
        for (n, line) in imports_tsv.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            let [name, kind, provider, ..] = cols[..] else {
                return Err(format!(
                    "import list line {}: expected name, kind, provider",
                    n + 1
                ));
            };
            if kind != "function" && kind != "data" {
                return Err(format!("import list line {}: kind {kind:?}", n + 1));
            }
            imports.insert(
                name.to_string(),
                Import {
                    kind: kind.into(),
                    provider: provider.into(),
                },
            );
        }
        let exports = mapfile_globals(mapfile);
        if exports.is_empty() {
            return Err("the mapfile makes no symbol global".into());
        }
        Ok(Policy {
            imports,
            exports,
            depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
        })
    }
}

/// The names listed under `global:` in an illumos mapfile's
/// `SYMBOL_SCOPE`.
pub fn mapfile_globals(mapfile: &str) -> BTreeSet<String> {
    let mut on = false;
    let mut out = BTreeSet::new();
    for line in mapfile.lines() {
        let l = line.split('#').next().unwrap_or("").trim();
        if l.starts_with("global:") {
            on = true;
            continue;
        }
        if l.starts_with("local:") || l.starts_with('}') {
            on = false;
            continue;
        }
        if on {
            for name in l.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Which rule (a short name).
    pub rule: &'static str,
    /// What and where.
    pub detail: String,
}

/// What the module is made of.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Executable bytes.
    pub text: u64,
    /// Read-only data bytes.
    pub rodata: u64,
    /// Writable data bytes.
    pub data: u64,
    /// Zero-initialised bytes.
    pub bss: u64,
    /// Undefined symbols with their providers.
    pub imports: Vec<(String, String)>,
    /// DTrace probe names (`rvscsi-cmd-start`) with their sites.
    pub probes: BTreeMap<String, usize>,
    /// Global symbols defined.
    pub exports: Vec<String>,
    /// Dependencies as recorded.
    pub depends_on: Option<String>,
    /// Relocations in loaded sections, by type.
    pub relocations: BTreeMap<&'static str, usize>,
    /// Instructions decoded.
    pub instructions: usize,
}

/// The result of a check.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Every broken rule (empty: the module passes).
    pub problems: Vec<Problem>,
    /// What was found.
    pub summary: Summary,
}

impl Report {
    /// Whether every rule holds.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    /// Whether some problem of `rule` mentions `needle`.
    pub fn has(&self, rule: &str, needle: &str) -> bool {
        self.problems
            .iter()
            .any(|p| p.rule == rule && p.detail.contains(needle))
    }

    fn fail(&mut self, rule: &'static str, detail: impl Into<String>) {
        self.problems.push(Problem {
            rule,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        writeln!(
            f,
            "  loaded size: {} bytes (text {}, rodata {}, data {}, bss {})",
            s.text + s.rodata + s.data + s.bss,
            s.text,
            s.rodata,
            s.data,
            s.bss
        )?;
        writeln!(f, "  exports: {}", s.exports.join(" "))?;
        writeln!(
            f,
            "  depends on: {}",
            s.depends_on.as_deref().unwrap_or("(nothing recorded)")
        )?;
        let mut by_provider: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, provider) in &s.imports {
            by_provider.entry(provider).or_default().push(name);
        }
        writeln!(f, "  imports: {}", s.imports.len())?;
        for (provider, names) in by_provider {
            writeln!(
                f,
                "    from {provider} ({}): {}",
                names.len(),
                names.join(" ")
            )?;
        }
        let probes: Vec<String> = s.probes.iter().map(|(p, n)| format!("{p} ({n})")).collect();
        writeln!(f, "  DTrace SDT probes (sites): {}", probes.join(" "))?;
        let relocs: Vec<String> = s
            .relocations
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        writeln!(f, "  relocations in loaded sections: {}", relocs.join(", "))?;
        writeln!(f, "  instructions checked: {}", s.instructions)?;
        if self.problems.is_empty() {
            writeln!(f, "PASS")
        } else {
            for p in &self.problems {
                writeln!(f, "  FAIL [{}] {}", p.rule, p.detail)?;
            }
            writeln!(f, "FAIL: {} problem(s)", self.problems.len())
        }
    }
}

/// Relocation types krtld computes correctly for a module.
const ALLOWED_RELOCS: &[u32] = &[
    elf::R_X86_64_64,
    elf::R_X86_64_PC32,
    elf::R_X86_64_PLT32,
    elf::R_X86_64_32S,
];

/// Section names a module must not have.
const FORBIDDEN_SECTIONS: &[&str] = &[
    ".init_array",
    ".fini_array",
    ".preinit_array",
    ".ctors",
    ".dtors",
    ".init",
    ".fini",
    ".tdata",
    ".tbss",
    ".got",
    ".got.plt",
    ".plt",
    ".eh_frame",
    ".eh_frame_hdr",
    ".llvmbc",
    ".llvmcmd",
];

/// The SDT probe prefix krtld recognises.
pub const SDT_PREFIX: &str = "__dtrace_probe_";

fn reloc_name(t: u32) -> String {
    let known = match t {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_16 => "R_X86_64_16",
        elf::R_X86_64_PC16 => "R_X86_64_PC16",
        elf::R_X86_64_8 => "R_X86_64_8",
        elf::R_X86_64_PC8 => "R_X86_64_PC8",
        elf::R_X86_64_DTPMOD64 => "R_X86_64_DTPMOD64",
        elf::R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
        elf::R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
        elf::R_X86_64_TLSGD => "R_X86_64_TLSGD",
        elf::R_X86_64_TLSLD => "R_X86_64_TLSLD",
        elf::R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
        elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_SIZE32 => "R_X86_64_SIZE32",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        elf::R_X86_64_GOTPC32_TLSDESC => "R_X86_64_GOTPC32_TLSDESC",
        elf::R_X86_64_TLSDESC_CALL => "R_X86_64_TLSDESC_CALL",
        elf::R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        _ => return format!("R_X86_64 type {t}"),
    };
    known.to_string()
}

fn static_reloc_name(t: u32) -> &'static str {
    match t {
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        _ => "other",
    }
}

/// A register the kernel does not save for a thread that did not ask.
fn is_fpu_or_simd(r: Register) -> bool {
    r.is_xmm() || r.is_ymm() || r.is_zmm() || r.is_mm() || r.is_st() || r.is_k()
}

/// Parsed pieces of the object that the checks share.
struct Object<'a> {
    data: &'a [u8],
    sections: object::read::elf::SectionTable<'a, ElfHeader>,
    symbols: Option<object::read::elf::SymbolTable<'a, ElfHeader>>,
    symtab_index: usize,
}

impl<'a> Object<'a> {
    fn section_name(&self, s: &elf::SectionHeader64<LE>) -> String {
        self.sections
            .section_name(LE, s)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_else(|_| "<bad name>".into())
    }

    fn symbol_name(&self, sym: &elf::Sym64<LE>) -> String {
        self.symbols
            .as_ref()
            .and_then(|t| sym.name(LE, t.strings()).ok())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default()
    }

    fn section_data(&self, index: usize) -> Option<&'a [u8]> {
        let s = self.sections.section(object::SectionIndex(index)).ok()?;
        if s.sh_type(LE) == elf::SHT_NOBITS {
            return None;
        }
        s.data(LE, self.data).ok()
    }

    /// The function symbol of section `index` that contains `offset`.
    fn function_at(&self, index: usize, offset: u64) -> String {
        let Some(t) = &self.symbols else {
            return format!("+{offset:#x}");
        };
        let mut best: Option<(u64, String)> = None;
        for sym in t.symbols() {
            if usize::from(sym.st_shndx(LE)) != index || sym.st_type() != elf::STT_FUNC {
                continue;
            }
            let v = sym.st_value(LE);
            if v <= offset && best.as_ref().is_none_or(|(b, _)| v > *b) {
                best = Some((v, self.symbol_name(sym)));
            }
        }
        match best {
            Some((v, name)) => format!("{name}+{:#x}", offset - v),
            None => format!("+{offset:#x}"),
        }
    }
}

/// Checks `bytes`, a module object, against `policy`. Never panics on
/// malformed input: what cannot be parsed is reported as a problem.
pub fn check(bytes: &[u8], policy: &Policy) -> Report {
    let mut r = Report::default();
    let header = match ElfHeader::parse(bytes) {
        Ok(h) => h,
        Err(e) => {
            r.fail("elf", format!("not an ELF64 object: {e}"));
            return r;
        }
    };
    let ident = header.e_ident();
    if ident.data != elf::ELFDATA2LSB {
        r.fail("elf", "not little-endian");
        return r;
    }
    if header.e_type(LE) != elf::ET_REL {
        r.fail(
            "elf",
            format!(
                "e_type {} is not ET_REL (a relocatable object)",
                header.e_type(LE)
            ),
        );
    }
    if header.e_machine(LE) != elf::EM_X86_64 {
        r.fail(
            "elf",
            format!("e_machine {} is not EM_X86_64", header.e_machine(LE)),
        );
    }
    let sections = match header.sections(LE, bytes) {
        Ok(s) => s,
        Err(e) => {
            r.fail("elf", format!("section headers: {e}"));
            return r;
        }
    };
    let symtabs: Vec<usize> = sections
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sh_type(LE) == elf::SHT_SYMTAB)
        .map(|(i, _)| i)
        .collect();
    if symtabs.len() != 1 {
        r.fail(
            "elf",
            format!("{} symbol tables (krtld uses exactly one)", symtabs.len()),
        );
    }
    let symbols = match sections.symbols(LE, bytes, elf::SHT_SYMTAB) {
        Ok(t) if !t.is_empty() => Some(t),
        Ok(_) => None,
        Err(e) => {
            r.fail("elf", format!("symbol table: {e}"));
            None
        }
    };
    let obj = Object {
        data: bytes,
        sections,
        symbols,
        symtab_index: symtabs.first().copied().unwrap_or(0),
    };
    check_sections(&obj, &mut r);
    check_symbols(&obj, policy, &mut r);
    check_relocations(&obj, &mut r);
    check_instructions(&obj, &mut r);
    r
}

fn check_sections(obj: &Object<'_>, r: &mut Report) {
    for (i, s) in obj.sections.iter().enumerate() {
        let name = obj.section_name(s);
        let flags = s.sh_flags(LE);
        let ty = s.sh_type(LE);
        if FORBIDDEN_SECTIONS.contains(&name.as_str())
            || name.starts_with(".init_array.")
            || name.starts_with(".fini_array.")
            || name.starts_with(".ctors.")
            || name.starts_with(".tdata.")
            || name.starts_with(".tbss.")
        {
            r.fail(
                "section",
                format!("section {name} (index {i}) is not allowed in a module"),
            );
        }
        if flags & u64::from(elf::SHF_TLS) != 0 {
            r.fail(
                "section",
                format!("section {name} is thread-local (SHF_TLS)"),
            );
        }
        if ty == elf::SHT_REL {
            r.fail(
                "relocation",
                format!("section {name} is SHT_REL: krtld only processes SHT_RELA"),
            );
        }
        if ty == elf::SHT_INIT_ARRAY || ty == elf::SHT_FINI_ARRAY || ty == elf::SHT_PREINIT_ARRAY {
            r.fail(
                "section",
                format!("section {name} is an init/fini array: never run"),
            );
        }
        if flags & u64::from(elf::SHF_ALLOC) != 0 {
            let size = s.sh_size(LE);
            let s_ = &mut r.summary;
            if ty == elf::SHT_NOBITS {
                s_.bss += size;
            } else if flags & u64::from(elf::SHF_EXECINSTR) != 0 {
                s_.text += size;
            } else if flags & u64::from(elf::SHF_WRITE) != 0 {
                s_.data += size;
            } else {
                s_.rodata += size;
            }
        }
    }
}

fn check_symbols(obj: &Object<'_>, policy: &Policy, r: &mut Report) {
    let Some(table) = &obj.symbols else {
        r.fail("symbol", "no symbol table");
        return;
    };
    let mut exported = BTreeSet::new();
    let mut depends: Option<String> = None;
    for sym in table.symbols() {
        let name = obj.symbol_name(sym);
        let shndx = sym.st_shndx(LE);
        let bind = sym.st_bind();
        if sym.st_type() == elf::STT_TLS {
            r.fail("symbol", format!("{name} is thread-local"));
        }
        if shndx == elf::SHN_COMMON {
            r.fail(
                "symbol",
                format!("{name} is a common symbol (build with -fno-common)"),
            );
        }
        if shndx == elf::SHN_UNDEF {
            if name.is_empty() {
                continue;
            }
            if let Some(probe) = name.strip_prefix(SDT_PREFIX) {
                r.summary
                    .probes
                    .entry(probe.replace("__", "-"))
                    .or_insert(0);
                continue;
            }
            match policy.imports.get(&name) {
                Some(imp) => {
                    if imp.provider != "kernel" && !policy.depends_on.contains(&imp.provider) {
                        r.fail(
                            "import",
                            format!(
                                "{name} comes from {}, which the module does not depend on",
                                imp.provider
                            ),
                        );
                    }
                    r.summary.imports.push((name, imp.provider.clone()));
                }
                None => {
                    r.fail(
                        "import",
                        format!("{name} is not in the list of kernel exports the module may use"),
                    );
                    r.summary.imports.push((name, "UNLISTED".into()));
                }
            }
            continue;
        }
        if name == "_depends_on" {
            depends = Some(depends_on_value(obj, sym, r));
        }
        if bind == elf::STB_GLOBAL || bind == elf::STB_WEAK {
            if !policy.exports.contains(&name) {
                r.fail(
                    "export",
                    format!(
                        "{name} is global: the module exports only {:?}",
                        policy.exports
                    ),
                );
            }
            exported.insert(name);
        }
    }
    for want in &policy.exports {
        match table.symbols().iter().find(|s| obj.symbol_name(s) == *want) {
            Some(s) if s.st_shndx(LE) != elf::SHN_UNDEF && s.st_type() == elf::STT_FUNC => {
                if s.st_bind() == elf::STB_LOCAL {
                    r.fail("export", format!("{want} is defined but local"));
                }
            }
            _ => r.fail("export", format!("{want} is not defined as a function")),
        }
    }
    let has_dynamic = obj
        .sections
        .iter()
        .any(|s| s.sh_type(LE) == elf::SHT_DYNAMIC);
    match &depends {
        Some(d) => {
            let got: BTreeSet<String> = d.split_whitespace().map(str::to_string).collect();
            if got != policy.depends_on {
                r.fail(
                    "depends",
                    format!(
                        "_depends_on is {d:?}; the module depends on {:?} only",
                        policy.depends_on
                    ),
                );
            }
        }
        None if has_dynamic => {
            depends = Some("(in .dynamic, recorded by the illumos link editor)".into());
        }
        None if !policy.depends_on.is_empty() => {
            r.fail(
                "depends",
                "no _depends_on and no .dynamic: krtld would not load misc/scsi first",
            );
        }
        None => {}
    }
    r.summary.depends_on = depends;
    r.summary.exports = exported.into_iter().collect();
    r.summary.imports.sort();
}

/// The NUL-terminated string `_depends_on` holds.
fn depends_on_value(obj: &Object<'_>, sym: &elf::Sym64<LE>, r: &mut Report) -> String {
    let index = usize::from(sym.st_shndx(LE));
    let (start, size) = (sym.st_value(LE) as usize, sym.st_size(LE) as usize);
    let bytes = obj
        .section_data(index)
        .and_then(|d| d.get(start..start.checked_add(size)?));
    match bytes {
        Some(b) if b.last() == Some(&0) => String::from_utf8_lossy(&b[..b.len() - 1]).into_owned(),
        _ => {
            r.fail(
                "depends",
                "_depends_on is not a NUL-terminated string inside its section",
            );
            String::new()
        }
    }
}

fn check_relocations(obj: &Object<'_>, r: &mut Report) {
    let Some(table) = &obj.symbols else {
        return;
    };
    for s in obj.sections.iter() {
        if s.sh_type(LE) != elf::SHT_RELA {
            continue;
        }
        let rname = obj.section_name(s);
        let target_index = s.sh_info(LE) as usize;
        let Ok(target) = obj.sections.section(object::SectionIndex(target_index)) else {
            r.fail(
                "relocation",
                format!("{rname} applies to section {target_index}, which does not exist"),
            );
            continue;
        };
        // krtld skips relocations of sections it does not load.
        if target.sh_flags(LE) & u64::from(elf::SHF_ALLOC) == 0 {
            continue;
        }
        if s.sh_link(LE) as usize != obj.symtab_index {
            r.fail(
                "relocation",
                format!("{rname} uses another symbol table than the module's"),
            );
        }
        let tname = obj.section_name(target);
        let exec = target.sh_flags(LE) & u64::from(elf::SHF_EXECINSTR) != 0;
        let tdata = obj.section_data(target_index).unwrap_or(&[]);
        let relas = match s.rela(LE, obj.data) {
            Ok(Some((relas, _))) => relas,
            Ok(None) => continue,
            Err(e) => {
                r.fail("relocation", format!("{rname}: {e}"));
                continue;
            }
        };
        for rela in relas {
            let ty = rela.r_type(LE, false);
            let sym_index = rela.r_sym(LE, false) as usize;
            let offset = rela.r_offset(LE);
            let where_ = || {
                if exec {
                    format!("{tname} {}", obj.function_at(target_index, offset))
                } else {
                    format!("{tname}+{offset:#x}")
                }
            };
            let Ok(sym) = table.symbol(object::SymbolIndex(sym_index)) else {
                r.fail(
                    "relocation",
                    format!("{} refers to symbol {sym_index}, out of range", where_()),
                );
                continue;
            };
            let sym_name = obj.symbol_name(sym);
            if !ALLOWED_RELOCS.contains(&ty) {
                r.fail(
                    "relocation",
                    format!(
                        "{} at {} ({sym_name}): not a type krtld handles for modules",
                        reloc_name(ty),
                        where_()
                    ),
                );
                continue;
            }
            *r.summary
                .relocations
                .entry(static_reloc_name(ty))
                .or_insert(0) += 1;
            if sym.st_shndx(LE) == elf::SHN_UNDEF && sym_name.starts_with(SDT_PREFIX) {
                let probe = sym_name[SDT_PREFIX.len()..].replace("__", "-");
                *r.summary.probes.entry(probe).or_insert(0) += 1;
                let opcode = (offset as usize).checked_sub(1).and_then(|i| tdata.get(i));
                let is_call_site = exec
                    && (ty == elf::R_X86_64_PLT32 || ty == elf::R_X86_64_PC32)
                    && rela.r_addend(LE) == -4
                    && matches!(opcode, Some(0xe8) | Some(0xe9));
                if !is_call_site {
                    r.fail(
                        "probe",
                        format!(
                            "{sym_name} at {} is not a call/jmp rel32 site: krtld would patch the wrong bytes",
                            where_()
                        ),
                    );
                }
            }
        }
    }
}

fn check_instructions(obj: &Object<'_>, r: &mut Report) {
    let mut info = InstructionInfoFactory::new();
    let mut instr = Instruction::default();
    let mut gas = GasFormatter::new();
    let mut text = String::new();
    let mut show = |instr: &Instruction| {
        text.clear();
        gas.format(instr, &mut text);
        text.clone()
    };
    for (i, s) in obj.sections.iter().enumerate() {
        let flags = s.sh_flags(LE);
        if flags & u64::from(elf::SHF_EXECINSTR) == 0 || s.sh_type(LE) != elf::SHT_PROGBITS {
            continue;
        }
        let Some(code) = obj.section_data(i) else {
            continue;
        };
        let name = obj.section_name(s);
        let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
        let mut reported = 0usize;
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            r.summary.instructions += 1;
            let at = instr.ip();
            if instr.is_invalid() {
                r.fail(
                    "instruction",
                    format!("undecodable bytes at {name} {}", obj.function_at(i, at)),
                );
                reported += 1;
            } else {
                let uses_fpu = info
                    .info(&instr)
                    .used_registers()
                    .iter()
                    .any(|u| is_fpu_or_simd(u.register()));
                let has_memory = (0..instr.op_count()).any(|k| instr.op_kind(k) == OpKind::Memory);
                let below_sp = has_memory
                    && matches!(instr.memory_base(), Register::RSP | Register::ESP)
                    && (instr.memory_displacement64() as i64) < 0;
                let found = [
                    (uses_fpu, "instruction", "uses FPU/SIMD state"),
                    (below_sp, "red-zone", "reaches below the stack pointer"),
                ];
                for (_, rule, what) in found.into_iter().filter(|f| f.0) {
                    let text = format!(
                        "`{}` at {name} {} {what}",
                        show(&instr),
                        obj.function_at(i, at)
                    );
                    r.fail(rule, text);
                    reported += 1;
                }
            }
            if reported >= 50 {
                r.fail(
                    "instruction",
                    format!("{name}: further instruction problems not listed"),
                );
                break;
            }
        }
    }
}
