//! The driver's mirrors, constants and DDI declarations against the
//! measured illumos ABI (`test/abi/*.tsv`).

use rvscsi::ffi::{ABI_CONSTANTS, ABI_LAYOUT, ABI_STRINGS, AbiFact};
use std::collections::HashMap;

fn table(name: &str) -> Vec<Vec<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/test/abi/");
    let text = std::fs::read_to_string(format!("{path}{name}")).expect("measured ABI table");
    text.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

#[test]
fn every_mirror_offset_and_size_matches_the_measured_headers() {
    let mut measured: HashMap<(String, String), i64> = HashMap::new();
    let mut rows = table("illumos-amd64-abi.tsv");
    rows.extend(table("rvscsi-shim-abi.tsv"));
    for r in rows {
        if r.len() >= 3 {
            measured.insert(
                (r[0].clone(), r[1].clone()),
                r[2].parse().unwrap_or(i64::MIN),
            );
        }
    }
    assert!(ABI_LAYOUT.len() > 100, "the layout list covers the mirrors");
    for f in ABI_LAYOUT {
        let (kind, name, value) = match *f {
            AbiFact::Offset {
                key, member, value, ..
            } => ("offset", format!("{key}.{member}"), value),
            AbiFact::Size { key, value, .. } => ("size", key.to_string(), value),
        };
        let m = measured
            .get(&(kind.to_string(), name.clone()))
            .unwrap_or_else(|| panic!("{kind} {name} is not in the measured table"));
        assert_eq!(*m, value as i64, "{kind} of {name}");
    }
}

#[test]
fn every_constant_matches_the_measured_headers() {
    let mut measured: HashMap<String, i128> = HashMap::new();
    // The provided table, and what measure-shim-abi.sh measured from the
    // same headers (kstat.h, ddifm.h, fm/protocol.h, nvpair.h).
    let mut rows = table("illumos-amd64-abi.tsv");
    rows.extend(table("rvscsi-shim-abi.tsv"));
    for r in rows {
        if r.len() >= 3 && r[0] == "const" {
            measured.insert(r[1].clone(), r[2].parse().unwrap_or(i128::MIN));
        }
    }
    for &(name, value) in ABI_CONSTANTS {
        let m = measured
            .get(name)
            .unwrap_or_else(|| panic!("constant {name} is not in the measured table"));
        // Unsigned values (DDI_DEV_T_ANY) come out of the table unsigned.
        let ours = if *m > i128::from(i64::MAX) {
            i128::from(value as u64)
        } else {
            i128::from(value)
        };
        assert_eq!(*m, ours, "{name}");
    }
}

#[test]
fn every_string_constant_matches_the_macro_of_the_measured_headers() {
    let mut measured: HashMap<String, String> = HashMap::new();
    for r in table("rvscsi-shim-abi.tsv") {
        if r.len() >= 3 && r[0] == "str" {
            measured.insert(r[1].clone(), r[2].clone());
        }
    }
    assert!(ABI_STRINGS.len() >= 10, "the class names are listed");
    for &(name, value) in ABI_STRINGS {
        let m = measured
            .get(name)
            .unwrap_or_else(|| panic!("string {name} is not in the measured table"));
        assert_eq!(m, value, "{name}");
    }
}

#[test]
fn every_ddi_declaration_names_a_real_function_with_its_arity() {
    let mut arity: HashMap<String, usize> = HashMap::new();
    for r in table("illumos-ddi-functions.tsv") {
        if r.len() >= 3 {
            let params = r[2].trim();
            let n = if params.is_empty() || params == "void" {
                0
            } else {
                params.split(" ; ").count()
            };
            arity.insert(r[0].clone(), n);
        }
    }
    let src = include_str!("../src/ffi/funcs.rs");
    let mut checked = 0;
    let mut rest = src;
    while let Some(at) = rest.find("pub fn ") {
        rest = &rest[at + 7..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // Count top-level commas: parameters may be function pointers.
        let open = rest.find('(').expect("a parameter list");
        let (mut depth, mut n, mut nonempty) = (0usize, 0usize, false);
        for c in rest[open..].chars() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if depth == 1 => {
                    n += 1;
                    nonempty = false;
                    continue;
                }
                _ => {}
            }
            if depth >= 1 && !c.is_whitespace() && c != '(' {
                nonempty = true;
            }
        }
        if nonempty {
            n += 1;
        }
        // Kernel exports outside the DDI set the table measured, with
        // their parameter counts read from the header that declares them.
        const UNMEASURED: &[(&str, Option<usize>)] = &[
            // panic(9F): variadic, sys/cmn_err.h.
            ("panic", None),
            // servicing_interrupt(9F): `extern int servicing_interrupt(void);`
            // in usr/src/uts/common/sys/disp.h.
            ("servicing_interrupt", Some(0)),
            // ddi_in_panic(9F): `extern int ddi_in_panic(void);` in
            // usr/src/uts/common/sys/sunddi.h.
            ("ddi_in_panic", Some(0)),
        ];
        match arity.get(&name) {
            Some(&want) => {
                assert_eq!(n, want, "{name}: parameter count");
                checked += 1;
            }
            None => match UNMEASURED.iter().find(|(k, _)| *k == name) {
                Some((_, Some(want))) => assert_eq!(n, *want, "{name}: parameter count"),
                Some((_, None)) => {}
                None => panic!("{name} is not a measured DDI function"),
            },
        }
    }
    assert!(checked > 60, "checked {checked} declarations");
}
