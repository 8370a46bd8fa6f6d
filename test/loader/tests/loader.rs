//! The loader's rules: the built module loads as krtld loads it; a small
//! module built here shows the relocation, .bss, probe-site and linkage
//! semantics; objects that break a rule, and files that are not modules,
//! are refused with a message naming what is wrong.

use rvscsi_loader::{Kernel, LoadError, Module};
use rvscsi_modcheck::testobj::{GOOD, compile, variant};
use std::path::PathBuf;

fn built_module() -> Vec<u8> {
    let path = std::env::var_os("RVSCSI_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/kernel/rvscsi")
        });
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. pkg/build.sh (test/run.sh runs it first) builds the module",
            path.display()
        )
    })
}

fn load(name: &str, bytes: &[u8]) -> Result<Module, LoadError> {
    Module::load(name, bytes, &Kernel::test_bed())
}

fn refused(name: &str, bytes: &[u8]) -> String {
    match load(name, bytes) {
        Ok(_) => panic!("{name} was loaded"),
        Err(e) => e.0,
    }
}

#[test]
fn the_built_module_loads_as_krtld_would_load_it() {
    let m = load("rvscsi", &built_module()).unwrap_or_else(|e| panic!("{e}"));
    let r = m.range();
    assert!(
        r.end <= 1 << 31,
        "mapped where 32-bit sign-extended addresses hold: {r:x?}"
    );
    for e in ["_init", "_fini", "_info"] {
        let a = m.symbol(e).unwrap_or_else(|| panic!("{e}"));
        assert!(r.contains(&a), "{e} inside the module");
    }
    assert_eq!(m.depends_on(), ["misc/scsi"]);
    let sites = m.probe_sites();
    assert!(sites.len() >= 5, "{sites:?}");
    for s in sites {
        // krtld's sdt_reloc_resolve: four no-ops, then a no-op or, for a
        // tail call, a return.
        // SAFETY: the site lies in the loaded module (checked above).
        let bytes = unsafe { std::slice::from_raw_parts(s.addr as *const u8, 5) };
        let last = if s.tail_call { 0xc3 } else { 0x90 };
        assert_eq!(bytes, [0x90, 0x90, 0x90, 0x90, last], "{s:?}");
    }
    let names: std::collections::BTreeSet<&str> = sites.iter().map(|s| s.symbol.as_str()).collect();
    for p in ["start", "done", "timeout", "abort"] {
        assert!(
            names.contains(format!("__dtrace_probe_rvscsi__cmd__{p}").as_str()),
            "{names:?}"
        );
    }
}

#[test]
fn two_loads_of_the_same_object_are_independent_modules() {
    let bytes = built_module();
    let mut a = load("rvscsi-a", &bytes).unwrap();
    let mut b = load("rvscsi-b", &bytes).unwrap();
    assert!(a.range().end <= b.range().start || b.range().end <= a.range().start);
    a.init().unwrap();
    b.init().unwrap();
    assert_ne!(a.dev_ops(), b.dev_ops(), "each its own dev_ops");
    assert_ne!(a.info().unwrap(), 0);
    assert_ne!(b.info().unwrap(), 0);
    assert_eq!(a.fini().unwrap(), 0);
    assert_eq!(b.fini().unwrap(), 0);
}

/// A small module with every kind of thing the loader must get right.
const SMALL: &str = r#"
#include "minimal/rvscsi_illumos.h"
static char _depends_on[] __attribute__((used)) = "misc/scsi";
static int counter;                             /* .bss: zero at load */
static int seven = 7;                           /* .data */
static const char *const words[] = { "ab", "cd" };  /* R_X86_64_64 to .rodata */
extern void __dtrace_probe_rvscsi__reset(long, long, long, long);
__attribute__((noinline)) static void traced(long x) {
    __dtrace_probe_rvscsi__reset(x, 2, 3, 4);   /* a tail call: jmp */
}
static int att(dev_info_t *d, ddi_attach_cmd_t c) { (void)d; (void)c; return DDI_FAILURE; }
static int det(dev_info_t *d, ddi_detach_cmd_t c) { (void)d; (void)c; return DDI_FAILURE; }
static struct dev_ops ops = {
    .devo_rev = DEVO_REV, .devo_getinfo = nodev, .devo_identify = nulldev,
    .devo_probe = nulldev, .devo_attach = att, .devo_detach = det,
    .devo_reset = nodev,
};
static struct modldrv md = { &mod_driverops, "loader test module", &ops };
static struct modlinkage ml = { MODREV_1, { &md, NULL } };
int _init(void) {
    int e;
    if (counter != 0 || seven != 7 || words[1][1] != 'd')
        return 99;
    counter++;
    __dtrace_probe_rvscsi__reset(1, 2, 3, 4);   /* a call */
    traced(counter);
    if ((e = scsi_hba_init(&ml)) != 0)
        return e;
    if ((e = mod_install(&ml)) != 0)
        scsi_hba_fini(&ml);
    return e;
}
int _fini(void) {
    int e = mod_remove(&ml);
    if (e == 0)
        scsi_hba_fini(&ml);
    return e;
}
int _info(void *mi) { return mod_info(&ml, mi) != 0 ? 1000 + counter : 0; }
"#;

fn small_module() -> Vec<u8> {
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../../c-shim");
    compile(
        "loader_small",
        SMALL,
        &["-I", include, "-nostdinc", "-Wall", "-Werror"],
        false,
    )
}

#[test]
fn a_small_module_sees_its_data_relocated_its_bss_zeroed_and_its_probes_silenced() {
    let bytes = small_module();
    let mut m = load("small", &bytes).unwrap_or_else(|e| panic!("{e}"));
    let sites = m.probe_sites().to_vec();
    assert_eq!(sites.len(), 2, "{sites:?}");
    assert!(sites.iter().any(|s| s.tail_call) && sites.iter().any(|s| !s.tail_call));
    // _init checks its own .data, .bss and relocated pointers (99 if
    // wrong), runs through both silenced probe sites, installs.
    m.init().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.info().unwrap(), 1001, "_info sees the counter _init set");
    assert_eq!(m.fini().unwrap(), 0);
    // Loaded again from the same bytes: fresh data and bss.
    let mut again = load("small", &bytes).unwrap();
    again.init().unwrap_or_else(|e| panic!("second load: {e}"));
    assert_eq!(again.info().unwrap(), 1001);
    assert_eq!(again.fini().unwrap(), 0);
}

#[test]
fn relocations_krtld_cannot_compute_are_refused_by_name() {
    let e = refused(
        "gotpcrel",
        &variant(
            "ld_gotpcrel",
            "extern char mod_driverops; char *f(void) { return &mod_driverops; }",
            &["-fPIC", "-mcmodel=small"],
        ),
    );
    assert!(e.contains("GOTPCREL") && e.contains("mod_driverops"), "{e}");
    let e = refused(
        "r32",
        &variant(
            "ld_r32",
            "static int x; int *g(void) { return &x; }",
            &["-mcmodel=small"],
        ),
    );
    assert!(
        e.contains("R_X86_64_32 ") && e.contains("zero-extends"),
        "{e}"
    );
    let e = refused(
        "tls",
        &variant(
            "ld_tls",
            "static __thread int t; int get(void) { return t; } void put(int v) { t = v; }",
            &[],
        ),
    );
    assert!(e.contains("thread-local"), "{e}");
    let e = refused(
        "ctor",
        &variant(
            "ld_ctor",
            "static int z; __attribute__((constructor)) static void c(void) { z = 1; } int getz(void) { return z; }",
            &[],
        ),
    );
    assert!(e.contains(".init_array") && e.contains("never runs"), "{e}");
    let e = refused(
        "probe",
        &variant(
            "ld_probe",
            "extern void __dtrace_probe_rvscsi__x(void); void *const p = (void *)__dtrace_probe_rvscsi__x;",
            &[],
        ),
    );
    assert!(
        e.contains("__dtrace_probe_rvscsi__x") && e.contains("not a call"),
        "{e}"
    );
}

#[test]
fn an_import_the_kernel_does_not_export_fails_the_load_with_its_name() {
    let e = refused(
        "unknown",
        &variant(
            "ld_unknown",
            "extern int frobnicate_kernel(int); extern int twiddle_kernel(void);\n\
             int use(int x) { return frobnicate_kernel(x) + twiddle_kernel(); }",
            &[],
        ),
    );
    assert!(e.contains("not found: frobnicate_kernel"), "{e}");
    assert!(
        e.contains("not found: twiddle_kernel"),
        "every missing symbol is named: {e}"
    );
}

#[test]
fn dependencies_and_entry_points_are_checked() {
    let e = refused(
        "virtio",
        &compile(
            "ld_virtio",
            &GOOD.replace("misc/scsi", "misc/virtio"),
            &[],
            false,
        ),
    );
    assert!(e.contains("depends on misc/virtio"), "{e}");
    let e = refused(
        "noinit",
        &compile(
            "ld_noinit",
            &GOOD.replace("int _init(void) { return 0; }", ""),
            &[],
            false,
        ),
    );
    assert!(e.contains("no _init"), "{e}");
}

/// Byte offset of section header `index`'s `sh_type`.
fn sh_type_offset(obj: &[u8], index: usize) -> usize {
    let shoff = u64::from_le_bytes(obj[0x28..0x30].try_into().unwrap()) as usize;
    let shentsize = u16::from_le_bytes(obj[0x3a..0x3c].try_into().unwrap()) as usize;
    shoff + index * shentsize + 4
}

#[test]
fn files_that_are_not_amd64_modules_get_a_clear_error() {
    let good = compile("ld_good", GOOD, &[], false);
    assert!(load("good", &good).is_ok());
    let mut arm = good.clone();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes());
    assert!(refused("arm", &arm).contains("EM_X86_64"));
    let mut exe = good.clone();
    exe[16..18].copy_from_slice(&2u16.to_le_bytes());
    assert!(refused("exe", &exe).contains("ET_REL"));
    let shnum = u16::from_le_bytes(good[0x3c..0x3e].try_into().unwrap()) as usize;
    let rela = (0..shnum)
        .find(|&i| {
            let at = sh_type_offset(&good, i);
            u32::from_le_bytes(good[at..at + 4].try_into().unwrap()) == 4
        })
        .expect("a RELA section");
    let mut rel = good.clone();
    let at = sh_type_offset(&rel, rela);
    rel[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    assert!(refused("rel", &rel).contains("SHT_REL"));
    assert!(refused("text", b"this is not an object").contains("not an ELF64 object"));
    // Cut anywhere, or overwritten: an error, never a crash.
    for cut in (0..good.len()).step_by(37) {
        assert!(load("cut", &good[..cut]).is_err(), "cut at {cut} loaded");
    }
    let module = built_module();
    for cut in [64, 1000, module.len() / 3, module.len() - 100] {
        assert!(
            load("cut", &module[..cut]).is_err(),
            "the module cut at {cut} loaded"
        );
    }
    let mut noise = good.clone();
    for (i, b) in noise.iter_mut().enumerate().skip(64) {
        *b = (i as u8).wrapping_mul(29) ^ 0x3c;
    }
    assert!(load("noise", &noise).is_err());
}
