//! The module check itself: the shipped module passes, and objects built
//! here to break one rule each are refused with a message that names what
//! is wrong. Malformed input is a reported problem, never a crash.

use rvscsi_modcheck::testobj::{self, GOOD, compile};
use rvscsi_modcheck::{Policy, check};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn policy() -> Policy {
    let imports = std::fs::read_to_string(root().join("test/abi/kernel-imports.tsv")).unwrap();
    let mapfile = std::fs::read_to_string(root().join("mapfiles/rvscsi.mapfile")).unwrap();
    Policy::parse(&imports, &mapfile, &["misc/scsi"]).expect("the project's policy parses")
}

fn variant(name: &str, extra_src: &str, flags: &[&str]) -> rvscsi_modcheck::Report {
    let r = check(&testobj::variant(name, extra_src, flags), &policy());
    assert!(!r.passed(), "{name} should fail:\n{r}");
    r
}

#[test]
fn the_shipped_module_passes_every_rule() {
    let module = std::env::var_os("RVSCSI_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/kernel/rvscsi"));
    let bytes = std::fs::read(&module).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. The module is built by pkg/kernel/build-module.sh (test/run.sh runs it first)",
            module.display()
        )
    });
    let r = check(&bytes, &policy());
    assert!(r.passed(), "{}:\n{r}", module.display());
    assert_eq!(r.summary.exports, ["_fini", "_info", "_init"]);
    assert_eq!(r.summary.depends_on.as_deref(), Some("misc/scsi"));
    for probe in [
        "rvscsi-cmd-start",
        "rvscsi-cmd-done",
        "rvscsi-cmd-timeout",
        "rvscsi-cmd-abort",
        "rvscsi-reset",
    ] {
        let sites = r.summary.probes.get(probe).copied().unwrap_or(0);
        assert!(sites > 0, "probe {probe} has no site in the module");
    }
    for needed in [
        "scsi_hba_attach_setup",
        "scsi_hba_pkt_comp",
        "mod_install",
        "ddi_dma_sync",
    ] {
        assert!(
            r.summary.imports.iter().any(|(n, _)| n == needed),
            "the module imports {needed}"
        );
    }
    assert!(r.summary.text > 10_000, "the driver's code is in it");
}

#[test]
fn a_minimal_module_built_with_kernel_flags_passes() {
    let r = check(&compile("good", GOOD, &[], false), &policy());
    assert!(r.passed(), "{r}");
    assert_eq!(r.summary.depends_on.as_deref(), Some("misc/scsi"));
    assert_eq!(
        r.summary.imports,
        [("mod_info".to_string(), "kernel".to_string())]
    );
}

#[test]
fn got_relative_relocations_are_refused() {
    // Position-independent code reaches extern data through the GOT.
    let r = variant(
        "gotpcrel",
        "extern char mod_driverops; char *f(void) { return &mod_driverops; }",
        &["-fPIC", "-mcmodel=small"],
    );
    assert!(r.has("relocation", "GOTPCREL"), "{r}");
}

#[test]
fn zero_extended_32_bit_addresses_are_refused() {
    let r = variant(
        "r32",
        "static int x; int *g(void) { return &x; }",
        &["-mcmodel=small"],
    );
    assert!(r.has("relocation", "R_X86_64_32 "), "{r}");
}

#[test]
fn floating_point_and_simd_instructions_are_refused() {
    let src = "double scale(double a, double b) { return a * b + 2.5; }";
    let r = check(
        &compile(
            "sse",
            &format!("{GOOD}\n{src}"),
            &[
                "-O2",
                "-fno-pic",
                "-mcmodel=kernel",
                "-mno-red-zone",
                "-fno-asynchronous-unwind-tables",
            ],
            true,
        ),
        &policy(),
    );
    assert!(r.has("instruction", "FPU/SIMD"), "{r}");
}

#[test]
fn stores_below_the_stack_pointer_are_refused() {
    // A leaf function with the red zone on keeps its locals below %rsp.
    let r = variant(
        "redzone",
        "int leaf(int x) { volatile int a[8]; a[0] = x; a[7] = x + 1; return a[0] + a[7]; }",
        &["-mred-zone", "-O1"],
    );
    assert!(r.has("red-zone", "below the stack pointer"), "{r}");
}

#[test]
fn constructors_and_thread_locals_are_refused() {
    let r = variant(
        "ctor",
        "static int z; __attribute__((constructor)) static void c(void) { z = 1; } int getz(void) { return z; }",
        &[],
    );
    assert!(r.has("section", ".init_array"), "{r}");
    let r = variant(
        "tls",
        "static __thread int t; int get(void) { return t; } void put(int v) { t = v; }",
        &[],
    );
    assert!(
        r.has("section", "SHF_TLS") || r.has("section", ".tbss"),
        "{r}"
    );
    assert!(
        r.has("relocation", "TPOFF") || r.has("symbol", "thread-local"),
        "{r}"
    );
}

#[test]
fn an_unknown_import_is_refused_by_name() {
    let r = variant(
        "unknown",
        "extern int frobnicate_kernel(int); int use(int x) { return frobnicate_kernel(x); }",
        &[],
    );
    assert!(r.has("import", "frobnicate_kernel"), "{r}");
    assert!(r.has("export", "use"), "a stray global is named too:\n{r}");
}

#[test]
fn a_probe_that_is_not_a_call_site_is_refused() {
    let r = variant(
        "probe",
        "extern void __dtrace_probe_rvscsi__x(void); void *const probe_addr = (void *)__dtrace_probe_rvscsi__x;",
        &[],
    );
    assert!(r.has("probe", "__dtrace_probe_rvscsi__x"), "{r}");
}

#[test]
fn a_probe_call_is_accepted_and_counted() {
    let src = r#"
extern int mod_info(void *, void *);
extern void __dtrace_probe_rvscsi__test(long, long);
static char _depends_on[] __attribute__((used)) = "misc/scsi";
int _init(void) { __dtrace_probe_rvscsi__test(1, 2); return 0; }
int _fini(void) { return 0; }
int _info(void *mi) { return mod_info(0, mi); }
"#;
    let r = check(&compile("probe_ok", src, &[], false), &policy());
    assert!(r.passed(), "{r}");
    assert_eq!(r.summary.probes.get("rvscsi-test"), Some(&1));
}

#[test]
fn missing_or_wrong_dependencies_are_refused() {
    let no_dep = GOOD.replace(
        r#"static char _depends_on[] __attribute__((used)) = "misc/scsi";"#,
        "",
    );
    let r = check(&compile("nodep", &no_dep, &[], false), &policy());
    assert!(r.has("depends", "no _depends_on"), "{r}");
    let wrong = GOOD.replace("misc/scsi", "misc/virtio");
    let r = check(&compile("wrongdep", &wrong, &[], false), &policy());
    assert!(r.has("depends", "misc/virtio"), "{r}");
    let missing_entry = GOOD.replace("int _fini(void) { return 0; }", "");
    let r = check(&compile("nofini", &missing_entry, &[], false), &policy());
    assert!(r.has("export", "_fini is not defined"), "{r}");
}

/// Byte offset of section header `index`'s `sh_type`.
fn sh_type_offset(obj: &[u8], index: usize) -> usize {
    let shoff = u64::from_le_bytes(obj[0x28..0x30].try_into().unwrap()) as usize;
    let shentsize = u16::from_le_bytes(obj[0x3a..0x3c].try_into().unwrap()) as usize;
    shoff + index * shentsize + 4
}

#[test]
fn rel_sections_wrong_machines_and_broken_files_are_reported_not_crashed_on() {
    let good = compile("good2", GOOD, &[], false);
    // SHT_REL instead of SHT_RELA: find the first RELA header and retype it.
    let shnum = u16::from_le_bytes(good[0x3c..0x3e].try_into().unwrap()) as usize;
    let mut rel = good.clone();
    let rela = (0..shnum)
        .find(|&i| {
            let at = sh_type_offset(&good, i);
            u32::from_le_bytes(good[at..at + 4].try_into().unwrap()) == 4
        })
        .expect("a RELA section");
    let at = sh_type_offset(&rel, rela);
    rel[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    assert!(check(&rel, &policy()).has("relocation", "SHT_REL"));
    // Another machine.
    let mut arm = good.clone();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes());
    assert!(check(&arm, &policy()).has("elf", "EM_X86_64"));
    // An executable, not a relocatable object.
    let mut exe = good.clone();
    exe[16..18].copy_from_slice(&2u16.to_le_bytes());
    assert!(check(&exe, &policy()).has("elf", "ET_REL"));
    // Truncations everywhere, garbage, nothing.
    for cut in [0usize, 4, 16, 63, 64, 200, good.len() / 2, good.len() - 1] {
        let r = check(&good[..cut], &policy());
        assert!(!r.passed(), "a file cut at {cut} bytes passed");
    }
    let mut noise = good.clone();
    for (i, b) in noise.iter_mut().enumerate().skip(64) {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    assert!(!check(&noise, &policy()).passed());
    assert!(check(b"#!/bin/sh\necho not a module\n", &policy()).has("elf", "not an ELF64 object"));
}

#[test]
fn the_command_line_tool_exits_non_zero_on_a_bad_module() {
    let dir = std::env::temp_dir().join(format!("rvscsi-modcheck-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.o");
    std::fs::write(
        &bad,
        compile(
            "cli_bad",
            &format!("{GOOD}\nint stray(void) {{ return 1; }}"),
            &[],
            false,
        ),
    )
    .unwrap();
    let tool = Path::new(env!("CARGO_BIN_EXE_rvscsi-modcheck"));
    let out = Command::new(tool).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL [export] stray"), "{text}");
    let out = Command::new(tool)
        .arg(dir.join("absent.o"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
