//! The shim's warnings gate is live: build.rs records the exact compiler
//! command it compiled `c-shim/rvscsi_shim.c` with (`OUT_DIR/shim-cc.txt`,
//! one argument a line, ending `-c SOURCE -o OBJECT`), and these tests run
//! that very command again, on the real shim (it must compile and print
//! nothing at all) and on copies with a deliberate warning injected (each
//! must fail). Whichever headers the build used (the minimal declarations,
//! or the real illumos ones with `ILLUMOS_GATE`) are the ones checked here.

use std::path::{Path, PathBuf};
use std::process::Command;

const RECORD: &str = include_str!(concat!(env!("OUT_DIR"), "/shim-cc.txt"));

/// The recorded command, split into (everything before `-c`, the source).
fn recorded() -> (Vec<String>, PathBuf) {
    let args: Vec<String> = RECORD.lines().map(str::to_string).collect();
    let n = args.len();
    assert!(n > 6, "a compiler command: {args:?}");
    assert_eq!(args[n - 4], "-c", "the record ends -c SOURCE -o OBJECT");
    assert_eq!(args[n - 2], "-o", "the record ends -c SOURCE -o OBJECT");
    (args[..n - 4].to_vec(), PathBuf::from(&args[n - 3]))
}

/// A scratch directory under the target dir, fresh for `name`.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("shim_build")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Runs the recorded command on `source`: (success, what it printed).
fn compile(source: &Path, dir: &Path) -> (bool, String) {
    let (cmd, _) = recorded();
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(dir.join("out.o"))
        .env("LC_ALL", "C")
        .output()
        .expect("run the recorded compiler");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_record_is_the_shim_built_with_every_warning_an_error() {
    let (cmd, source) = recorded();
    assert!(
        source.ends_with("c-shim/rvscsi_shim.c"),
        "the recorded source is the shim: {source:?}"
    );
    for f in [
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Werror=incompatible-pointer-types",
    ] {
        assert!(cmd.iter().any(|a| a == f), "{f} in {cmd:?}");
    }
    for a in &cmd {
        assert!(
            a != "-w" && !a.starts_with("-Wno-"),
            "{a} silences diagnostics in {cmd:?}"
        );
    }
}

#[test]
fn the_recorded_command_compiles_the_shim_without_a_diagnostic() {
    let (_, source) = recorded();
    let dir = scratch("clean");
    let (ok, text) = compile(&source, &dir);
    assert!(ok, "the shim does not compile:\n{text}");
    assert!(
        text.trim().is_empty(),
        "the compiler said something:\n{text}"
    );
}

/// Each is appended to a copy of the shim; each alone must fail the build.
const INJECTED: &[(&str, &str)] = &[
    (
        "-Wall: an unused variable",
        "int rvscsi_injected(void);\n\
         int rvscsi_injected(void) { int unused_on_purpose = 0; return 0; }\n",
    ),
    (
        "-Wextra: an unused parameter",
        "int rvscsi_injected(int unused_on_purpose);\n\
         int rvscsi_injected(int unused_on_purpose) { return 0; }\n",
    ),
    (
        "on by default (an error in GCC 14): a dev_info_t * as a struct dev_info *",
        "struct dev_info;\n\
         int rvscsi_injected(struct dev_info *);\n\
         int rvscsi_injected(struct dev_info *dip) { return rvscsi_quiesce(dip); }\n",
    ),
];

#[test]
fn a_shim_with_a_deliberate_warning_fails_the_recorded_command() {
    let (_, source) = recorded();
    let shim = std::fs::read_to_string(&source).expect("read the shim");
    for (i, (what, code)) in INJECTED.iter().enumerate() {
        let dir = scratch(&format!("injected{i}"));
        // Next to nothing: the copy finds rvscsi.h and minimal/ through the
        // command's -I of c-shim, as the original does.
        let copy = dir.join("rvscsi_shim.c");
        std::fs::write(&copy, format!("{shim}\n{code}")).expect("write the copy");
        let (ok, text) = compile(&copy, &dir);
        assert!(!ok, "{what}: the shim still compiles:\n{text}");
        assert!(
            text.contains("error"),
            "{what}: failed without an error message:\n{text}"
        );
    }
}
