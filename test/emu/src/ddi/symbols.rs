//! The emulated kernel's symbol table: what a loaded module's undefined
//! symbols bind to. It holds exactly the kernel exports the module may
//! import (`test/abi/kernel-imports.tsv`); this crate does not link unless
//! the emulation defines each of them (the generated declarations below),
//! so the imports that ship are the ones the tests exercise.

/// One kernel export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSymbol {
    /// Its name.
    pub name: &'static str,
    /// A data object rather than a function.
    pub data: bool,
    /// Its address in this process.
    pub addr: usize,
}

include!(concat!(env!("OUT_DIR"), "/kernel_symbols.rs"));

/// The export `name`, if the emulated kernel has it.
pub fn lookup(name: &str) -> Option<KernelSymbol> {
    kernel_symbols().into_iter().find(|s| s.name == name)
}
