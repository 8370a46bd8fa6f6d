//! Every shell script in the tree passes shellcheck (at its default, style,
//! severity, following sourced files), and shellcheck does fail a broken
//! one. test/scripts/install-deps.sh installs shellcheck.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `path` is a shell script: a .sh file, a shebang naming sh,
/// bash or ksh, or a file that declares its shell to shellcheck (the
/// sourced helpers).
fn is_shell_script(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "sh") {
        return true;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let first = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let first = String::from_utf8_lossy(first);
    if let Some(shebang) = first.strip_prefix("#!") {
        let mut words = shebang.split_whitespace();
        let interp = words.next().unwrap_or("");
        let interp = if interp.ends_with("/env") {
            words.next().unwrap_or("")
        } else {
            interp.rsplit('/').next().unwrap_or("")
        };
        return matches!(interp, "sh" | "bash" | "ksh" | "dash");
    }
    first.starts_with("# shellcheck shell=")
}

fn scripts_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            if !matches!(
                name.as_ref(),
                "target" | ".git" | "corpus" | "artifacts" | "node_modules"
            ) {
                scripts_under(&p, out);
            }
        } else if ft.is_file() && is_shell_script(&p) {
            out.push(p);
        }
    }
}

fn shellcheck(script: &Path) -> Result<(), String> {
    let out = Command::new("shellcheck")
        .args(["-x", "-P", "SCRIPTDIR"])
        .arg(script)
        .current_dir(root())
        .output()
        .map_err(|e| {
            format!(
                "shellcheck: {e} (test/scripts/install-deps.sh installs it: apt package shellcheck)"
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let mut scripts = Vec::new();
    scripts_under(&root(), &mut scripts);
    scripts.sort();
    let rel: Vec<String> = scripts
        .iter()
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    // The walk finds the scripts it must (so that it cannot pass by
    // checking nothing): extension, shebang and sourced helpers alike.
    for want in [
        "pkg/build.sh",
        "pkg/rvscsiadm",
        "pkg/kernel/toolchain.sh",
        "pkg/kernel/illumos.sh",
        "test/run.sh",
        "test/omnios/runbook.sh",
        "test/omnios/standins/bin/update_drv",
        "test/omnios/standins/lib/standin.sh",
        "test/omnios/standins/sysroot/usr/sbin/install",
        ".ci/run",
    ] {
        assert!(
            rel.iter().any(|r| r == want),
            "{want} not found in {rel:#?}"
        );
    }
    let failures: Vec<String> = scripts
        .iter()
        .zip(&rel)
        .filter_map(|(p, r)| shellcheck(p).err().map(|e| format!("== {r}\n{e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} scripts fail shellcheck:\n{}",
        failures.len(),
        scripts.len(),
        failures.join("\n")
    );
}

#[test]
fn shellcheck_fails_a_broken_script() {
    let dir = std::env::temp_dir().join(format!("rvscsi-shellcheck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.sh");
    // An unquoted expansion and a cd whose failure is ignored.
    std::fs::write(&broken, "#!/bin/sh\ncd $1\nrm -rf *\n").unwrap();
    let err = shellcheck(&broken).expect_err("shellcheck passes a broken script");
    assert!(err.contains("SC2086") && err.contains("SC2164"), "{err}");
    assert!(is_shell_script(&broken));
    let _ = std::fs::remove_dir_all(&dir);
}
