//! Compiles the C half of the emulation: the variadic DDI functions
//! (`cmn_err`, `dev_err`, `panic`, `scsi_log`), which Rust cannot define.
fn main() {
    println!("cargo:rerun-if-changed=csrc/variadic.c");
    cc::Build::new()
        .file("csrc/variadic.c")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("rvscsi_emu_variadic");
}
