//! The kernel symbols the module may import (`test/abi/kernel-imports.tsv`)
//! are exactly ones the test bed implements: the emulation's symbol table
//! declares every one of them and only links because the DDI emulation
//! defines each (the C library functions `memcpy`, `memset` and `strlen`
//! come from the host's C library, with the kernel's semantics). So the
//! imports that ship are the ones the tests exercise.

use rvscsi_emu::ddi::symbols::kernel_symbols;

#[test]
fn every_listed_import_is_implemented_by_the_test_bed() {
    let list = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../abi/kernel-imports.tsv"
    ))
    .unwrap();
    let symbols = kernel_symbols();
    assert_eq!(
        symbols.len(),
        list.lines().count() - 1,
        "one symbol per line"
    );
    assert!(symbols.len() > 50, "the list covers the driver's DDI use");
    for s in symbols {
        assert_ne!(s.addr, 0, "{} resolved to address 0", s.name);
    }
}

#[test]
fn every_listed_import_is_a_measured_illumos_function_or_says_where_it_is_declared() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../abi/");
    let list = std::fs::read_to_string(format!("{root}kernel-imports.tsv")).unwrap();
    let ddi = std::fs::read_to_string(format!("{root}illumos-ddi-functions.tsv")).unwrap();
    let measured: std::collections::HashSet<&str> = ddi
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').next())
        .collect();
    for line in list.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 4, "name kind provider declared_in: {line:?}");
        let (name, provider, declared) = (cols[0], cols[2], cols[3]);
        assert!(
            provider == "kernel" || provider == "misc/scsi",
            "{name}: provider {provider}"
        );
        assert!(
            measured.contains(name) || declared.starts_with("usr/src/uts/"),
            "{name} is neither in the measured DDI prototypes nor given an illumos source"
        );
        if name.starts_with("scsi_") {
            assert_eq!(provider, "misc/scsi", "{name} lives in misc/scsi");
        }
    }
}
