//! `rvscsi-modcheck [--imports FILE] [--mapfile FILE] [--depends MOD] MODULE`
//!
//! Checks a built kernel module object (by default the project's import
//! list, mapfile and `misc/scsi` dependency) and prints its size, imports,
//! probes and every broken rule. Exit status 0 when it passes, 1 when a
//! rule is broken, 2 on a usage or I/O error.

use rvscsi_modcheck::{Policy, check};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut imports = root.join("test/abi/kernel-imports.tsv");
    let mut mapfile = root.join("mapfiles/rvscsi.mapfile");
    let mut depends = vec!["misc/scsi".to_string()];
    let mut module = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--imports" => imports = args.next().map(PathBuf::from).unwrap_or_default(),
            "--mapfile" => mapfile = args.next().map(PathBuf::from).unwrap_or_default(),
            "--depends" => depends = args.next().map(|d| vec![d]).unwrap_or_default(),
            "-h" | "--help" => {
                println!(
                    "usage: rvscsi-modcheck [--imports FILE] [--mapfile FILE] [--depends MOD] MODULE"
                );
                return ExitCode::SUCCESS;
            }
            _ if module.is_none() && !a.starts_with('-') => module = Some(PathBuf::from(a)),
            _ => {
                eprintln!("rvscsi-modcheck: unexpected argument {a:?}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(module) = module else {
        eprintln!(
            "usage: rvscsi-modcheck [--imports FILE] [--mapfile FILE] [--depends MOD] MODULE"
        );
        return ExitCode::from(2);
    };
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let policy = match (read(&imports), read(&mapfile)) {
        (Ok(i), Ok(m)) => {
            let deps: Vec<&str> = depends.iter().map(String::as_str).collect();
            Policy::parse(
                &String::from_utf8_lossy(&i),
                &String::from_utf8_lossy(&m),
                &deps,
            )
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let policy = match policy {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rvscsi-modcheck: {e}");
            return ExitCode::from(2);
        }
    };
    let bytes = match read(&module) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("rvscsi-modcheck: {e}");
            return ExitCode::from(2);
        }
    };
    let report = check(&bytes, &policy);
    println!(
        "rvscsi-modcheck: {} ({} bytes)",
        module.display(),
        bytes.len()
    );
    print!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
