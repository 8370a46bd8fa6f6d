//! Compiles the C half of the test bed:
//! - the variadic DDI functions (`cmn_err`, `dev_err`, `panic`, `scsi_log`),
//!   which Rust cannot define;
//! - the driver's own C shim (`c-shim/rvscsi_shim.c`), built for the host
//!   with the project's minimal illumos declarations, so that the bed can
//!   attach the driver through the shim's `dev_ops` exactly as the kernel
//!   does (`ShimBinding`). Its `_init`/`_fini`/`_info` are renamed
//!   `rvscsi_hosted__*`: a host program has an `_init` of its own.
use std::env;

fn main() {
    println!("cargo:rerun-if-changed=csrc/variadic.c");
    cc::Build::new()
        .file("csrc/variadic.c")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("rvscsi_emu_variadic");

    let include =
        env::var("DEP_RVSCSI_INCLUDE").expect("the rvscsi build script exports its include dir");
    let shim = env::var("DEP_RVSCSI_SHIM").expect("the rvscsi build script exports the shim dir");
    println!("cargo:rerun-if-changed={shim}");
    let version = env::var("CARGO_PKG_VERSION").unwrap_or_default();
    cc::Build::new()
        .file(format!("{shim}/rvscsi_shim.c"))
        .include(&shim)
        .include(&include)
        .flag("-std=gnu99")
        .flag("-ffreestanding")
        .flag("-nostdinc")
        .flag("-fno-builtin")
        .define("RVSCSI_MINIMAL_HEADERS", None)
        .define("RVSCSI_VERSION", Some(format!("\"{version}\"").as_str()))
        .define("_init", Some("rvscsi_hosted__init"))
        .define("_fini", Some("rvscsi_hosted__fini"))
        .define("_info", Some("rvscsi_hosted__info"))
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("rvscsi_hosted_shim");
}
