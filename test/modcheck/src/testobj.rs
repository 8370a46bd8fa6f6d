//! Small module objects compiled from C for the tests of the module check
//! and the module loader: a minimal good module, and variants that break
//! one rule each.

use std::path::PathBuf;
use std::process::Command;

/// A module that follows every rule: a local `_depends_on`, the three
/// entry points, one listed import.
pub const GOOD: &str = r#"
extern int mod_info(void *, void *);
static char _depends_on[] __attribute__((used)) = "misc/scsi";
int _init(void) { return 0; }
int _fini(void) { return 0; }
int _info(void *mi) { return mod_info(0, mi); }
"#;

/// The flags of kernel C code (see build.rs): what a good module is built
/// with.
pub const KERNEL_FLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-common",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-mno-mmx",
    "-mno-sse",
    "-mno-sse2",
];

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvscsi-testobj-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("a temporary directory");
    d
}

/// Compiles C `src` into an object: with the kernel flags followed by
/// `extra`, or (with `replace`) with `extra` alone. Panics with the
/// compiler's message when it fails: these are test fixtures.
pub fn compile(name: &str, src: &str, extra: &[&str], replace: bool) -> Vec<u8> {
    let dir = tmpdir();
    let c = dir.join(format!("{name}.c"));
    let o = dir.join(format!("{name}.o"));
    std::fs::write(&c, src).expect("write the C source");
    let mut cmd = Command::new("cc");
    if !replace {
        cmd.args(KERNEL_FLAGS);
    }
    cmd.args(extra).arg("-c").arg("-o").arg(&o).arg(&c);
    let out = cmd
        .output()
        .expect("a C compiler (cc) to build test objects");
    assert!(
        out.status.success(),
        "cc failed for {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&o).expect("read the object")
}

/// `GOOD` with `extra_src` appended, compiled with the kernel flags and
/// `flags`.
pub fn variant(name: &str, extra_src: &str, flags: &[&str]) -> Vec<u8> {
    compile(name, &format!("{GOOD}\n{extra_src}"), flags, false)
}
