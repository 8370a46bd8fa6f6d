//! How the project compiles C, in one place: the flag lists and the rule
//! that judges a compile. Included with `#[path]` (it uses `std` only) by
//!
//! - `build.rs`: the shim for the kernel (and the minimal declarations'
//!   check);
//! - `test/emu/build.rs`: the test bed's own C and the shim for the host;
//! - `tests/shim_build.rs`: the tests of this very code (the judge on the
//!   shim and on copies with a warning injected, the refusal of flags that
//!   silence diagnostics, the compiler's environment).
//!
//! The rule: a C compile is assembled here from these lists, the include
//! directories and the defines, and from nothing in the environment (no
//! CFLAGS, no `cc` defaults, whose `.warnings(false)` adds `-w`); it is
//! refused if anything in it could silence a diagnostic; the compiler runs
//! with an environment of PATH and TMPDIR only (GCC reads CPATH,
//! GCC_EXEC_PREFIX, COMPILER_PATH; clang reads CCC_OVERRIDE_OPTIONS, which
//! can add `-w`); and it passes only if the compiler exits 0, prints
//! nothing at all (no warning, note or `#pragma message`) and writes the
//! object.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::Path;
use std::process::Command;

/// Every warning, an error: illumos builds its C with `-errwarn=%all` and
/// `-v` (usr/src/Makefile.master, CERRWARN and CCVERBOSE), which its
/// compiler wrapper turns into `-Werror` and `-Wall -Wextra`
/// (usr/src/tools/cw/cw.c). Unlike illumos (CERRWARN's `-Wno-*`), nothing
/// is turned off again: the shim is small and new. Plus what
/// GCC 14 (OmniOS's compiler) rejects even without -Werror
/// (gcc.gnu.org/gcc-14/porting_to.html), spelled out so that an older GCC
/// holds the C to the same rules. (-Wreturn-mismatch and
/// -Wdeclaration-missing-parameter-type are GCC 14's own names; -Wall with
/// -Werror covers them on older compilers.)
pub const WARNINGS_ARE_ERRORS: &[&str] = &[
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Werror=incompatible-pointer-types",
    "-Werror=int-conversion",
    "-Werror=implicit-function-declaration",
    "-Werror=implicit-int",
];

/// The code generation of illumos kernel C on amd64 (the flags GNU cc
/// understands), plus what a freestanding module object needs.
pub const KERNEL_CODEGEN: &[&str] = &[
    "-m64",
    "-std=gnu99",
    "-D_KERNEL",
    "-D_ELF64",
    "-ffreestanding",
    "-nostdinc",
    "-fno-builtin",
    "-fno-common",
    "-fno-strict-aliasing",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-omit-frame-pointer",
    "-fno-shrink-wrap",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-mno-mmx",
    "-mno-sse",
    "-mno-sse2",
    "-mno-3dnow",
    "-mno-avx",
    "-mindirect-branch=thunk-extern",
    "-mindirect-branch-register",
    "-O2",
];

/// The code generation of the test bed's C, linked into host programs
/// (position-independent: Rust links its test programs as PIE). `-O2` as
/// the kernel build, so that the warnings that need the optimiser
/// (-Wmaybe-uninitialized) are the same.
pub const HOST_CODEGEN: &[&str] = &[
    "-std=gnu99",
    "-O2",
    "-g",
    "-fPIC",
    "-fno-omit-frame-pointer",
    "-ffunction-sections",
    "-fdata-sections",
];

/// What the shim needs on top of [`HOST_CODEGEN`] when the test bed builds
/// it for the host: freestanding like the kernel build, against the
/// minimal declarations, with `_init`/`_fini`/`_info` renamed
/// `rvscsi_hosted__*` (a host program has an `_init` of its own).
pub const HOSTED_SHIM: &[&str] = &[
    "-ffreestanding",
    "-nostdinc",
    "-fno-builtin",
    "-DRVSCSI_MINIMAL_HEADERS",
    "-D_init=rvscsi_hosted__init",
    "-D_fini=rvscsi_hosted__fini",
    "-D_info=rvscsi_hosted__info",
];

/// The flags of illumos kernel C: [`KERNEL_CODEGEN`] and
/// [`WARNINGS_ARE_ERRORS`].
pub fn kernel_cflags() -> impl Iterator<Item = &'static str> {
    KERNEL_CODEGEN.iter().chain(WARNINGS_ARE_ERRORS).copied()
}

/// The flags of the test bed's C: [`HOST_CODEGEN`] and
/// [`WARNINGS_ARE_ERRORS`].
pub fn host_cflags() -> impl Iterator<Item = &'static str> {
    HOST_CODEGEN.iter().chain(WARNINGS_ARE_ERRORS).copied()
}

/// `compiler`, `flags`, then `-I` of each of `includes`: a command for
/// [`compile`].
pub fn command<'a>(
    compiler: &OsStr,
    flags: impl IntoIterator<Item = &'a str>,
    includes: &[&Path],
) -> Vec<OsString> {
    let mut cmd = vec![compiler.to_owned()];
    cmd.extend(flags.into_iter().map(OsString::from));
    for dir in includes {
        cmd.push("-I".into());
        cmd.push(dir.as_os_str().to_owned());
    }
    cmd
}

/// The command the test bed compiles the shim with for the host: the shim's
/// directory (`c-shim`) and the generated headers (`OUT_DIR/include` of the
/// rvscsi build) on the include path, `RVSCSI_VERSION` defined.
pub fn hosted_shim_command(
    compiler: &OsStr,
    shim_dir: &Path,
    generated: &Path,
    version: &str,
) -> Vec<OsString> {
    let mut cmd = command(
        compiler,
        host_cflags().chain(HOSTED_SHIM.iter().copied()),
        &[shim_dir, generated],
    );
    cmd.push(format!("-DRVSCSI_VERSION=\"{version}\"").into());
    cmd
}

/// Why `arg` could silence a diagnostic or turn an error back into a
/// warning, if it could. None of these is ever needed here; an argument
/// that hands options on unread (`-Wp,`, `-Xclang`, `@file`, `-specs=`)
/// is refused as well, as what it hands on is not checked.
pub fn silencer(arg: &str) -> Option<&'static str> {
    // GCC's driver takes `--warn-X` for `-WX` and `--no-warnings` for `-w`
    // (gcc/gcc.cc, option_map).
    let arg = match arg.strip_prefix("--warn-") {
        Some(rest) => return silencer(&format!("-W{rest}")),
        None => arg,
    };
    if arg == "-w" || arg == "--no-warnings" {
        Some("turns every warning off")
    } else if arg.starts_with("-Wno-") {
        Some("turns a warning (or its being an error) off")
    } else if arg.starts_with("-Wp,")
        || arg.starts_with("-Wa,")
        || arg == "-Xpreprocessor"
        || arg == "-Xassembler"
        || arg == "-Xclang"
    {
        Some("hands options past the driver unchecked (-Wp,-w silences the preprocessor)")
    } else if arg.starts_with('@') {
        Some("reads further options from a file, unchecked")
    } else if arg.starts_with("-specs") || arg.starts_with("--specs") {
        Some("a GCC spec file can add any option, -w too")
    } else if arg == "-fpermissive" {
        Some("turns GCC 14's errors back into warnings")
    } else if arg == "-Qunused-arguments" {
        Some("silences clang's warning about unused arguments")
    } else {
        None
    }
}

/// The compiler's whole environment: PATH (to find the assembler) and
/// TMPDIR from this process, and `LC_ALL=C`; nothing else reaches it.
pub fn compiler_environment() -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = ["PATH", "TMPDIR"]
        .into_iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (k.into(), v)))
        .collect();
    env.push(("LC_ALL".into(), "C".into()));
    env
}

/// Runs `cmd -c source -o object` and judges it: an error unless no
/// argument is a [`silencer`], the compiler exits 0, prints nothing at all
/// (not a byte on stdout or stderr) and writes `object`. Returns the
/// command as run.
pub fn compile(
    mut cmd: Vec<OsString>,
    source: &Path,
    object: &Path,
) -> Result<Vec<OsString>, String> {
    cmd.extend([
        "-c".into(),
        source.as_os_str().to_owned(),
        "-o".into(),
        object.as_os_str().to_owned(),
    ]);
    let shown = cmd
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    for a in &cmd[1..] {
        if let Some(why) = silencer(&a.to_string_lossy()) {
            return Err(format!(
                "{shown}\n{}: {why}; the project's C is built with every warning an error",
                a.to_string_lossy()
            ));
        }
    }
    // An object left from an earlier run must not pass for this one.
    match fs::remove_file(object) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{shown}\ncannot remove the old {object:?}: {e}")),
    }
    let output = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env_clear()
        .envs(compiler_environment())
        .output()
        .map_err(|e| format!("{shown}\ncannot run the compiler: {e}"))?;
    if !output.status.success() || !output.stdout.is_empty() || !output.stderr.is_empty() {
        return Err(format!(
            "{shown}\n({}; no diagnostic, and no output at all, is allowed)\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    if !object.is_file() {
        return Err(format!(
            "{shown}\nthe compiler succeeded silently but wrote no {object:?}"
        ));
    }
    Ok(cmd)
}

/// `lib<name>.a` of `objects` in `dir`, made with `ar` (the archiver
/// command, as `cc` finds it); returns the archive's path.
pub fn archive(
    mut ar: Command,
    dir: &Path,
    name: &str,
    objects: &[&Path],
) -> Result<std::path::PathBuf, String> {
    let lib = dir.join(format!("lib{name}.a"));
    // A stale archive would keep old members: `ar r` only adds.
    let _ = fs::remove_file(&lib);
    let status = ar
        .arg("crs")
        .arg(&lib)
        .args(objects)
        .status()
        .map_err(|e| format!("cannot run the archiver: {e}"))?;
    if !status.success() {
        return Err(format!(
            "archiving {objects:?} into {lib:?} failed: {status}"
        ));
    }
    Ok(lib)
}
