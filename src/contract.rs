//! The contract with the C shim, read by bindgen from `c-shim/rvscsi.h`
//! (its single source of truth) when the crate is built.
//!
//! For every function the header declares as `NAME_fn_t NAME;`, the
//! generated code holds `const _: NAME_fn_t = Some(crate::entry::NAME);`:
//! the build fails unless the Rust entry point has exactly the C type the
//! shim compiles against (argument and return types, pointer mutability,
//! `extern "C"`). The illumos structures in those types are the library's
//! own mirrors (`crate::ffi`), so a mismatch cannot hide behind two
//! different opaque types.

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    dead_code,
    missing_docs,
    clippy::all
)]
mod header {
    include!(concat!(env!("OUT_DIR"), "/contract.rs"));
}

/// The functions `c-shim/rvscsi.h` declares, in its order.
pub const DECLARED: &[&str] = header::DECLARED;

/// What the C shim implements for Rust (`c-shim/rvscsi.h`, "Implemented in
/// C, called by Rust"), declared by bindgen from the header, so the Rust
/// side calls it with exactly the header's types.
pub mod shim {
    pub use super::header::rvscsi_shim_ereport_post;
}
