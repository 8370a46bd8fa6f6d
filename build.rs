//! Build script: the contract between the C shim and the Rust library, and
//! the shim itself.
//!
//! 1. `rvscsi_abi_asserts.h`: a `_Static_assert` for every member offset,
//!    structure size and constant that the Rust mirrors rely on
//!    (`src/ffi/types.rs` `ABI_LAYOUT`, `src/ffi/consts.rs`
//!    `ABI_CONSTANTS`), generated from those very lists, so that compiling
//!    the shim fails when the headers it sees disagree with the Rust side.
//! 2. `contract.rs`: bindgen's reading of `c-shim/rvscsi.h` (the contract's
//!    single source of truth) plus one compile-time check per function
//!    declared there that the Rust entry point has exactly that type.
//! 3. The shim (`c-shim/rvscsi_shim.c`), compiled with the flags of
//!    illumos kernel code, `-Wall -Wextra -Werror`, and nothing that
//!    silences a diagnostic (the command is assembled here, not by `cc`,
//!    whose `.warnings(false)` adds `-w` and whose CFLAGS from the
//!    environment come last and could add it too; any output at all from
//!    the compiler fails the build), against
//!    - the real illumos headers when `ILLUMOS_GATE=<illumos-gate checkout>`
//!      is set (the minimal declarations are then checked too) or when
//!      building on illumos (`/usr/include`), otherwise
//!    - the project's minimal declarations (`c-shim/minimal/`).
//!
//!    For the kernel target the object is bundled into the static library
//!    (`pkg/kernel/build-module.sh` links it into the module); for the host
//!    it is only compiled, as a check. The exact command is recorded in
//!    `OUT_DIR/shim-cc.txt` (one argument a line) for `tests/shim_build.rs`,
//!    which re-runs it on the shim and on a copy with a warning injected.

use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

// The Rust side of the ABI, compiled into this script as well.
#[allow(dead_code)]
#[path = "src/ffi/consts.rs"]
mod consts;
#[allow(dead_code)]
#[path = "src/ffi/types.rs"]
mod types;

/// The flags illumos builds kernel C code with on amd64 (the ones GNU cc
/// understands), plus what a freestanding module object needs.
const KERNEL_CFLAGS: &[&str] = &[
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
    "-Wall",
    "-Wextra",
    "-Werror",
    // What GCC 14 (OmniOS's compiler) rejects even without -Werror
    // (gcc.gnu.org/gcc-14/porting_to.html), spelled out so that an older
    // GCC holds the shim to the same rules. (-Wreturn-mismatch and
    // -Wdeclaration-missing-parameter-type are GCC 14's own names; -Wall
    // with -Werror covers them on older compilers.)
    "-Werror=incompatible-pointer-types",
    "-Werror=int-conversion",
    "-Werror=implicit-function-declaration",
    "-Werror=implicit-int",
];

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for p in ["c-shim", "src/ffi/types.rs", "src/ffi/consts.rs"] {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=ILLUMOS_GATE");
    println!("cargo:rerun-if-env-changed=RVSCSI_CC");

    let include = out.join("include");
    fs::create_dir_all(&include).unwrap_or_else(|e| fail(&format!("create {include:?}: {e}")));
    write(&include.join("rvscsi_abi_asserts.h"), &abi_asserts());
    // For dependents' build scripts (the test bed builds the shim for the
    // host): DEP_RVSCSI_INCLUDE and DEP_RVSCSI_SHIM.
    println!("cargo:include={}", include.display());
    println!("cargo:shim={}", root.join("c-shim").display());

    let header = root.join("c-shim/rvscsi.h");
    let header_text =
        fs::read_to_string(&header).unwrap_or_else(|e| fail(&format!("read {header:?}: {e}")));
    let exports = declared_functions(&header_text);
    write(&out.join("contract.rs"), &contract(&header, &exports));

    compile_shim(&root, &include);
}

fn fail(msg: &str) -> ! {
    panic!("rvscsi build: {msg}")
}

fn write(path: &Path, text: &str) {
    // Rewrite only on change, so that nothing downstream rebuilds for nothing.
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap_or_else(|e| fail(&format!("write {path:?}: {e}")));
    }
}

/// `_Static_assert`s of every layout fact and constant of the Rust mirrors.
/// With the minimal declarations, a structure is checked when the minimal
/// header declares it (`RVSCSI_MINIMAL_DECLARES_<name>`) and a constant
/// when it defines it; with real headers, everything is.
fn abi_asserts() -> String {
    let mut s = String::from(
        "/*\n * Generated by build.rs from src/ffi/types.rs (ABI_LAYOUT) and\n \
         * src/ffi/consts.rs (ABI_CONSTANTS): the numbers the Rust library was\n \
         * written against. Do not edit.\n */\n\n\
         #ifndef RVSCSI_ABI_ASSERTS_H\n#define RVSCSI_ABI_ASSERTS_H\n\n\
         #ifndef RVSCSI_MINIMAL_HEADERS\n\
         #include <sys/types.h>\n#include <sys/cmn_err.h>\n#include <sys/kmem.h>\n\
         #include <sys/ksynch.h>\n#include <sys/modctl.h>\n#include <sys/devops.h>\n\
         #include <sys/ddi.h>\n#include <sys/sunddi.h>\n#include <sys/ddi_intr.h>\n\
         #include <sys/pci.h>\n#include <sys/time.h>\n#include <sys/scsi/scsi.h>\n\
         #include <sys/cpuvar.h>\n\
         #endif\n\n",
    );
    let mut open: Option<&str> = None;
    for fact in types::ABI_LAYOUT {
        let key = match *fact {
            types::AbiFact::Offset { key, .. } | types::AbiFact::Size { key, .. } => key,
        };
        if open != Some(key) {
            if open.is_some() {
                s.push_str("#endif\n\n");
            }
            let _ = writeln!(
                s,
                "#if !defined(RVSCSI_MINIMAL_HEADERS) || defined(RVSCSI_MINIMAL_DECLARES_{key})"
            );
            open = Some(key);
        }
        match *fact {
            types::AbiFact::Offset {
                c_type,
                member,
                value,
                ..
            } => {
                let _ = writeln!(
                    s,
                    "_Static_assert(__builtin_offsetof({c_type}, {member}) == {value}, \
                     \"offset of {c_type}.{member}: the Rust mirror says {value}\");"
                );
            }
            types::AbiFact::Size { c_type, value, .. } => {
                let _ = writeln!(
                    s,
                    "_Static_assert(sizeof ({c_type}) == {value}, \
                     \"size of {c_type}: the Rust mirror says {value}\");"
                );
            }
        }
    }
    if open.is_some() {
        s.push_str("#endif\n\n");
    }
    for &(name, value) in consts::ABI_CONSTANTS {
        // A constant is checked with the minimal declarations when they
        // define it as a macro, or declare it as an enumerator and say so
        // (RVSCSI_MINIMAL_ENUMERATOR_<name>: #if cannot see enumerators).
        let _ = writeln!(
            s,
            "#if !defined(RVSCSI_MINIMAL_HEADERS) || defined({name}) || \
             defined(RVSCSI_MINIMAL_ENUMERATOR_{name})\n\
             _Static_assert((unsigned long long)({name}) == (unsigned long long)({value}LL), \
             \"{name}: the Rust side says {value}\");\n#endif"
        );
    }
    s.push_str("\n#endif /* RVSCSI_ABI_ASSERTS_H */\n");
    s
}

/// The functions `rvscsi.h` declares through a function type:
/// `NAME_fn_t NAME;`.
fn declared_functions(header: &str) -> Vec<String> {
    header
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (ty, rest) = l.split_once(' ')?;
            let name = rest.strip_suffix(';')?;
            (ty.strip_suffix("_fn_t") == Some(name)).then(|| name.to_string())
        })
        .collect()
}

/// bindgen's Rust for `rvscsi.h`, read alone (`RVSCSI_CONTRACT_STANDALONE`:
/// it then declares the illumos typedefs it uses itself), with those
/// typedefs and the illumos structures mapped to the library's mirrors, and
/// the type check of every entry point.
fn contract(header: &Path, exports: &[String]) -> String {
    // The illumos names rvscsi.h uses, each with the mirror of the same name
    // in crate::ffi (a typedef there is a type alias, so `dev_info_t *` is
    // `*mut dev_info_t`, that is `*mut *mut __dev_info`, on both sides).
    let typedefs = ["caddr_t", "dev_info_t", "ddi_dma_attr_t", "scsi_hba_tran_t"];
    let structs = ["scsi_address", "scsi_device", "scsi_pkt"];
    // The struct tags behind those typedefs: never named by the contract
    // itself, blocked so that nothing of them is generated.
    let tags = ["__dev_info", "ddi_dma_attr", "scsi_hba_tran"];
    let mut b = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg("-DRVSCSI_CONTRACT_STANDALONE")
        // The contract uses only LP64 C types (pointers, int, unsigned
        // int), the same on any x86_64 target clang knows.
        .clang_arg("--target=x86_64-unknown-linux-gnu")
        .use_core()
        .ctypes_prefix("core::ffi")
        .layout_tests(false)
        .allowlist_type("rvscsi_.*_fn_t")
        // What C implements for Rust (none yet) would be declared as
        // functions named rvscsi_shim_*.
        .allowlist_function("rvscsi_shim_.*")
        .raw_line(format!(
            "use crate::ffi::{{{}}};",
            typedefs
                .iter()
                .chain(structs.iter())
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    for m in typedefs.iter().chain(structs.iter()).chain(tags.iter()) {
        b = b.blocklist_type(m);
    }
    let bindings = b.generate().unwrap_or_else(|e| {
        fail(&format!(
            "bindgen could not read {header:?}: {e} (bindgen needs libclang: \
             apt-get install libclang-dev, or run test/scripts/install-deps.sh)"
        ))
    });
    let mut s =
        String::from("// Generated by build.rs (bindgen of c-shim/rvscsi.h). Do not edit.\n");
    s.push_str(&bindings.to_string());
    s.push_str(
        "\n/// Every function `rvscsi.h` declares, in order.\npub const DECLARED: &[&str] = &[\n",
    );
    for f in exports {
        let _ = writeln!(s, "    {f:?},");
    }
    s.push_str("];\n\n// Each entry point has exactly the type the header declares.\n");
    for f in exports {
        let _ = writeln!(s, "const _: {f}_fn_t = Some(crate::entry::{f});");
    }
    s
}

enum Headers {
    /// An illumos-gate checkout (`ILLUMOS_GATE`).
    Gate(PathBuf),
    /// The system's own headers (building on illumos).
    System,
    /// `c-shim/minimal/`.
    Minimal,
}

fn compile_shim(root: &Path, include: &Path) {
    let host = env::var("HOST").unwrap_or_default();
    let on_illumos = host.contains("illumos") || host.contains("solaris");
    let headers = match env::var_os("ILLUMOS_GATE").filter(|v| !v.is_empty()) {
        Some(g) => {
            let g = PathBuf::from(g);
            let probe = g.join("usr/src/uts/common/sys/scsi/scsi.h");
            if !probe.is_file() {
                fail(&format!(
                    "ILLUMOS_GATE={} has no {}: point it at an illumos-gate checkout \
                     (its usr/src/uts/common and usr/src/uts/intel are enough)",
                    g.display(),
                    probe.display()
                ));
            }
            Headers::Gate(g)
        }
        None if on_illumos => Headers::System,
        None => Headers::Minimal,
    };
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // The kernel target has no operating system; only there is the shim
    // part of what is built.
    let for_module = target_os == "none";

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let compiler = c_compiler(on_illumos);
    let mut shim = kernel_cc(&compiler, root, include);
    shim.push(
        format!(
            "-DRVSCSI_VERSION=\"{}\"",
            env::var("CARGO_PKG_VERSION").unwrap_or_default()
        )
        .into(),
    );
    if on_illumos {
        // The illumos link editor records the dependency (-N misc/scsi).
        shim.push("-DRVSCSI_ILLUMOS_LD".into());
    }
    match &headers {
        // -isystem, as on illumos, where these headers are the system's
        // (/usr/include): diagnostics inside the illumos headers themselves
        // are not the shim's; everything in the shim is still diagnosed.
        Headers::Gate(g) => {
            for dir in ["usr/src/uts/intel", "usr/src/uts/common"] {
                shim.push("-isystem".into());
                shim.push(g.join(dir).into_os_string());
            }
        }
        Headers::System => {
            shim.push("-isystem".into());
            shim.push("/usr/include".into());
        }
        Headers::Minimal => {
            shim.push("-DRVSCSI_MINIMAL_HEADERS".into());
        }
    }
    let object = out.join("rvscsi_shim.o");
    let shim = compile(shim, &root.join("c-shim/rvscsi_shim.c"), &object)
        .unwrap_or_else(|e| fail(&format!("the C shim does not compile: {e}")));
    // For tests/shim_build.rs: the command exactly as it was run.
    let mut record = String::new();
    for a in &shim {
        let a = a
            .to_str()
            .unwrap_or_else(|| fail(&format!("{a:?}: a compiler argument that is not UTF-8")));
        record.push_str(a);
        record.push('\n');
    }
    write(&out.join("shim-cc.txt"), &record);
    if for_module {
        archive(&out, "rvscsi_shim", &object);
    }

    if !matches!(headers, Headers::Minimal) {
        // The minimal declarations must hold as well: CI builds with them.
        let mut check = kernel_cc(&compiler, root, include);
        check.push("-DRVSCSI_MINIMAL_HEADERS".into());
        compile(
            check,
            &root.join("c-shim/minimal/check.c"),
            &out.join("rvscsi_minimal_check.o"),
        )
        .unwrap_or_else(|e| fail(&format!("the minimal illumos declarations disagree: {e}")));
    }
}

/// The C compiler: `RVSCSI_CC`, gcc on illumos, else the build machine's
/// (as `cc` finds it: CC and friends). Only the program is taken from
/// `cc`; its flags are not (see [`kernel_cc`]).
fn c_compiler(on_illumos: bool) -> OsString {
    if let Some(cc) = env::var_os("RVSCSI_CC").filter(|v| !v.is_empty()) {
        return cc;
    }
    if on_illumos {
        return "gcc".into();
    }
    // The module is built for the illumos kernel, which cc does not know as
    // a target: use the build machine's compiler (any x86_64 gcc emits the
    // same ELF object).
    let host = env::var("HOST").unwrap_or_default();
    cc::Build::new()
        .target(&host)
        .host(&host)
        .opt_level(2)
        .try_get_compiler()
        .unwrap_or_else(|e| fail(&format!("no C compiler: {e}")))
        .path()
        .as_os_str()
        .to_owned()
}

/// The command line of a C compile for illumos kernel code: the compiler,
/// [`KERNEL_CFLAGS`] and the shim's include directories, nothing else (the
/// environment's CFLAGS do not apply to kernel code).
fn kernel_cc(compiler: &OsString, root: &Path, include: &Path) -> Vec<OsString> {
    let mut cmd = vec![compiler.clone()];
    cmd.extend(KERNEL_CFLAGS.iter().map(OsString::from));
    for dir in [root.join("c-shim"), include.to_path_buf()] {
        cmd.push("-I".into());
        cmd.push(dir.into_os_string());
    }
    cmd
}

/// Runs `cmd -c source -o object`; an error unless it succeeds and prints
/// nothing at all (no warning, note or `#pragma message` passes). Returns
/// the command as run.
fn compile(mut cmd: Vec<OsString>, source: &Path, object: &Path) -> Result<Vec<OsString>, String> {
    println!("cargo:rerun-if-changed={}", source.display());
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
    let output = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("{shown}: cannot run the compiler: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !stderr.trim().is_empty() || !stdout.trim().is_empty() {
        return Err(format!(
            "{shown}\n({}; no diagnostic is allowed)\n{stdout}{stderr}",
            output.status
        ));
    }
    Ok(cmd)
}

/// `lib<name>.a` of `object` in `out`, linked into the crate (for the
/// kernel target, whose static library then carries the shim).
fn archive(out: &Path, name: &str, object: &Path) {
    let lib = out.join(format!("lib{name}.a"));
    // A stale archive would keep old members: `ar r` only adds.
    let _ = fs::remove_file(&lib);
    let mut ar = cc::Build::new()
        .target(&env::var("HOST").unwrap_or_default())
        .host(&env::var("HOST").unwrap_or_default())
        .try_get_archiver()
        .unwrap_or_else(|e| fail(&format!("no archiver: {e}")));
    let status = ar
        .arg("crs")
        .arg(&lib)
        .arg(object)
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run the archiver: {e}")));
    if !status.success() {
        fail(&format!(
            "archiving {object:?} into {lib:?} failed: {status}"
        ));
    }
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static={name}");
}
