//! The shim's warnings gate is live. The judge of a C compile
//! (`c-shim/build_support.rs`: no flag that silences a diagnostic, exit 0,
//! no output at all, an object written, a compiler environment of PATH and
//! TMPDIR only) is the very code `build.rs` and `test/emu/build.rs` run; it
//! is included here and tested
//!
//! - with the command `build.rs` compiled `c-shim/rvscsi_shim.c` with
//!   (recorded in `OUT_DIR/shim-cc.txt`, one argument a line, ending `-c
//!   SOURCE -o OBJECT`), whichever headers that build used (the minimal
//!   declarations, or the real illumos ones with `ILLUMOS_GATE`): the shim
//!   passes, and copies with a deliberate warning each fail;
//! - with the command the test bed compiles the shim for the host with
//!   (`build_support::hosted_shim_command`), the same way;
//! - with stand-in compilers (shell scripts) that fail silently, succeed
//!   with a blank line of output, or write no object: each fails;
//! - with every spelling of a flag that silences diagnostics, and with an
//!   environment that would (CFLAGS, clang's CCC_OVERRIDE_OPTIONS, GCC's
//!   CPATH and GCC_EXEC_PREFIX), in a child process of this test program.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "../c-shim/build_support.rs"]
mod build_support;

const RECORD: &str = include_str!(concat!(env!("OUT_DIR"), "/shim-cc.txt"));

/// The recorded command, split into (everything before `-c`, the source).
fn recorded() -> (Vec<OsString>, PathBuf) {
    let args: Vec<&str> = RECORD.lines().collect();
    let n = args.len();
    assert!(n > 6, "a compiler command: {args:?}");
    assert_eq!(args[n - 4], "-c", "the record ends -c SOURCE -o OBJECT");
    assert_eq!(args[n - 2], "-o", "the record ends -c SOURCE -o OBJECT");
    (
        args[..n - 4].iter().map(OsString::from).collect(),
        PathBuf::from(args[n - 3]),
    )
}

/// The compiler the build used (the first word of the record).
fn compiler() -> OsString {
    recorded().0.swap_remove(0)
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

/// The shim's source, as the build compiled it.
fn shim_source() -> String {
    std::fs::read_to_string(recorded().1).expect("read the shim")
}

/// A stand-in compiler: a shell script running `body` (its last argument,
/// `$obj`, is the object the judge asks for).
fn stand_in(dir: &Path, body: &str) -> OsString {
    let path = dir.join("cc.sh");
    std::fs::write(&path, format!("#!/bin/sh\nfor obj; do :; done\n{body}\n"))
        .expect("write the stand-in compiler");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make it executable");
    path.into_os_string()
}

#[test]
fn the_record_is_the_shim_built_with_the_shared_kernel_flags() {
    let (cmd, source) = recorded();
    assert!(
        source.ends_with("c-shim/rvscsi_shim.c"),
        "the recorded source is the shim: {source:?}"
    );
    // Right after the compiler, the shared list, whole and in order: the
    // build compiled with build_support's flags and nothing before them.
    let flags: Vec<&str> = build_support::kernel_cflags().collect();
    let got: Vec<String> = cmd[1..=flags.len()]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(got, flags, "the record starts with kernel_cflags()");
    for f in build_support::WARNINGS_ARE_ERRORS {
        assert!(cmd.iter().any(|a| a == f), "{f} in {cmd:?}");
    }
    for a in &cmd[1..] {
        assert_eq!(
            build_support::silencer(&a.to_string_lossy()),
            None,
            "{a:?} in the record {cmd:?}"
        );
    }
}

#[test]
fn the_judge_passes_the_shim_as_the_build_compiled_it() {
    let (cmd, source) = recorded();
    let dir = scratch("clean");
    build_support::compile(cmd, &source, &dir.join("out.o"))
        .unwrap_or_else(|e| panic!("the shim does not pass the judge:\n{e}"));
}

/// Each is appended to a copy of the shim; each alone must fail the judge.
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
    (
        "an implicit declaration (an error in GCC 14)",
        "int rvscsi_injected(void);\n\
         int rvscsi_injected(void) { return rvscsi_not_declared_anywhere(); }\n",
    ),
];

/// Not a warning and not an error: a note the compiler prints and exits 0
/// with, which only the judge's "no output at all" rule catches.
const PRAGMA_MESSAGE: &str = "#pragma message(\"rvscsi: a note on purpose\")\n";

/// Each of [`INJECTED`] and [`PRAGMA_MESSAGE`] on a copy of the shim
/// compiled with `cmd`: each must fail the judge, with the compiler's words
/// in the error.
fn each_injection_fails(cmd: &[OsString], what_build: &str) {
    let shim = shim_source();
    let cases = INJECTED
        .iter()
        .copied()
        .chain([("a #pragma message (exit 0, one note)", PRAGMA_MESSAGE)]);
    for (i, (what, code)) in cases.enumerate() {
        let dir = scratch(&format!("{what_build}-injected{i}"));
        // The copy finds rvscsi.h and minimal/ through the command's -I of
        // c-shim, as the original does.
        let copy = dir.join("rvscsi_shim.c");
        std::fs::write(&copy, format!("{shim}\n{code}")).expect("write the copy");
        match build_support::compile(cmd.to_vec(), &copy, &dir.join("out.o")) {
            Ok(_) => panic!("{what_build}, {what}: the judge passes the copy"),
            Err(e) => assert!(
                e.contains("rvscsi_shim.c:"),
                "{what_build}, {what}: failed without the compiler's diagnostic:\n{e}"
            ),
        }
    }
}

#[test]
fn a_shim_with_a_deliberate_warning_fails_the_judge_in_the_kernel_build() {
    each_injection_fails(&recorded().0, "kernel");
}

#[test]
fn the_pragma_message_passes_the_compiler_itself() {
    // So that the case above shows the judge's own rule, not -Werror.
    let (cmd, _) = recorded();
    let dir = scratch("pragma-alone");
    let copy = dir.join("rvscsi_shim.c");
    std::fs::write(&copy, format!("{}\n{PRAGMA_MESSAGE}", shim_source())).expect("write");
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .arg("-c")
        .arg(&copy)
        .arg("-o")
        .arg(dir.join("out.o"))
        .output()
        .expect("run the compiler");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a note on purpose"),
        "{out:?}"
    );
}

#[test]
fn the_hosted_shim_is_judged_alike() {
    // The command test/emu/build.rs compiles the shim for the host with.
    let generated = Path::new(env!("OUT_DIR")).join("include");
    let shim_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("c-shim");
    let cmd = build_support::hosted_shim_command(&compiler(), &shim_dir, &generated, "0.0.0");
    for f in build_support::WARNINGS_ARE_ERRORS {
        assert!(cmd.iter().any(|a| a == f), "{f} in {cmd:?}");
    }
    let dir = scratch("hosted-clean");
    build_support::compile(
        cmd.clone(),
        &shim_dir.join("rvscsi_shim.c"),
        &dir.join("out.o"),
    )
    .unwrap_or_else(|e| panic!("the hosted shim does not pass the judge:\n{e}"));
    each_injection_fails(&cmd, "hosted");
}

#[test]
fn a_compiler_that_fails_speaks_or_writes_nothing_fails_the_judge() {
    let source = recorded().1;
    for (what, body, passes) in [
        ("writes the object, silently", ": > \"$obj\"", true),
        ("exits 1 silently", ": > \"$obj\"; exit 1", false),
        ("prints one empty line", ": > \"$obj\"; echo", false),
        ("prints on stdout", ": > \"$obj\"; echo note", false),
        ("prints on stderr", ": > \"$obj\"; echo note >&2", false),
        ("writes no object", "exit 0", false),
    ] {
        let dir = scratch("stand-in");
        let cc = stand_in(&dir, body);
        let object = dir.join("out.o");
        let verdict = build_support::compile(vec![cc], &source, &object);
        assert_eq!(
            verdict.is_ok(),
            passes,
            "a compiler that {what}: {verdict:?}"
        );
    }
}

#[test]
fn a_stale_object_does_not_pass_for_a_new_one() {
    let dir = scratch("stale");
    let object = dir.join("out.o");
    std::fs::write(&object, "an object from an earlier build").expect("write");
    let cc = stand_in(&dir, "exit 0");
    let verdict = build_support::compile(vec![cc], &recorded().1, &object);
    assert!(verdict.is_err(), "{verdict:?}");
}

/// Every spelling, in GCC or clang, that silences a diagnostic, makes an
/// error a warning again, or hands options on unchecked.
const SILENCERS: &[&str] = &[
    "-w",
    "--no-warnings",
    "-Wno-error",
    "-Wno-error=incompatible-pointer-types",
    "-Wno-incompatible-pointer-types",
    "-Wno-everything",
    "--warn-no-unused-variable",
    "-Wp,-w",
    "-Wa,--no-warn",
    "-Xpreprocessor",
    "-Xassembler",
    "-Xclang",
    "@flags.txt",
    "-specs=quiet.specs",
    "--specs=quiet.specs",
    "-fpermissive",
    "-Qunused-arguments",
];

#[test]
fn every_spelling_that_silences_is_refused_before_the_compiler_runs() {
    let source = recorded().1;
    for flag in SILENCERS {
        assert!(
            build_support::silencer(flag).is_some(),
            "{flag} is not seen as silencing"
        );
        // A compiler that would pass: the refusal is the judge's.
        let dir = scratch("silencer");
        let cc = stand_in(&dir, ": > \"$obj\"");
        let verdict = build_support::compile(vec![cc, (*flag).into()], &source, &dir.join("o"));
        assert!(
            verdict
                .as_ref()
                .is_err_and(|e| e.contains(flag) && e.contains("every warning an error")),
            "{flag}: {verdict:?}"
        );
    }
    // And none of the project's own flags is.
    for flag in build_support::kernel_cflags()
        .chain(build_support::host_cflags())
        .chain(build_support::HOSTED_SHIM.iter().copied())
    {
        assert_eq!(build_support::silencer(flag), None, "{flag}");
    }
}

/// Set in the child process of the test below.
const HOSTILE_CHILD: &str = "RVSCSI_SHIM_BUILD_HOSTILE_CHILD";

/// An environment that would silence or redirect a compiler that saw it.
const HOSTILE_ENVIRONMENT: &[(&str, &str)] = &[
    ("CFLAGS", "-w"),
    ("CPPFLAGS", "-w"),
    // clang: "+-w" appends -w to every command line.
    ("CCC_OVERRIDE_OPTIONS", "+-w"),
    ("CPATH", "/nonexistent/rvscsi-cpath"),
    ("C_INCLUDE_PATH", "/nonexistent/rvscsi-c-include-path"),
    ("GCC_EXEC_PREFIX", "/nonexistent/rvscsi-gcc-exec-prefix/"),
    ("COMPILER_PATH", "/nonexistent/rvscsi-compiler-path"),
];

#[test]
fn the_environment_does_not_reach_the_compiler() {
    // The judge reads this process's environment; setting variables in a
    // multi-threaded test program is not sound, so a child of this very
    // program runs the checks with the hostile environment.
    let mut child = Command::new(std::env::current_exe().expect("this test program"));
    child
        .args([
            "--ignored",
            "--exact",
            "hostile_environment_child",
            "--test-threads=1",
        ])
        .env(HOSTILE_CHILD, "1");
    for (k, v) in HOSTILE_ENVIRONMENT {
        child.env(k, v);
    }
    let out = child.output().expect("run the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the child did not run the check:\n{text}"
    );
}

#[test]
#[ignore = "the child of the_environment_does_not_reach_the_compiler; fails alone"]
fn hostile_environment_child() {
    assert_eq!(
        std::env::var_os(HOSTILE_CHILD).as_deref(),
        Some("1".as_ref()),
        "run by the_environment_does_not_reach_the_compiler, which sets the environment"
    );
    // A stand-in that reports every hostile variable it can see.
    let dir = scratch("hostile");
    let mut report = String::from(": > \"$obj\"\n");
    for (k, _) in HOSTILE_ENVIRONMENT {
        report.push_str(&format!(
            "[ -n \"${{{k}+set}}\" ] && echo \"{k} reached the compiler\" >&2\n"
        ));
    }
    report.push_str("exit 0");
    let cc = stand_in(&dir, &report);
    build_support::compile(vec![cc], &recorded().1, &dir.join("out.o"))
        .unwrap_or_else(|e| panic!("{e}"));
    // And the real compiler, with that environment around it, is as strict.
    let (cmd, source) = recorded();
    build_support::compile(cmd.clone(), &source, &dir.join("shim.o"))
        .unwrap_or_else(|e| panic!("the shim in a hostile environment:\n{e}"));
    each_injection_fails(&cmd, "hostile");
}
