//! The OmniOS runbook's pieces that can be checked off illumos: the QEMU
//! layout it documents is one QEMU accepts, and the runbook itself refuses
//! clearly where it cannot run.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_documented_vm_layout_is_a_command_line_qemu_accepts() {
    let dir = std::env::temp_dir().join(format!("rvscsi-omnios-vm-{}", std::process::id()));
    let out = Command::new("sh")
        .arg(root().join("test/omnios/qemu-omnios.sh"))
        .args(["--check", "--dir"])
        .arg(&dir)
        .output()
        .expect("sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("QEMU accepted the layout"), "{text}");
}

#[test]
fn the_runbook_stops_at_its_first_step_off_illumos_and_says_why() {
    let runbook = root().join("test/omnios/runbook.sh");
    let logs = std::env::temp_dir().join(format!("rvscsi-runbook-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let out = Command::new("bash")
        .arg(&runbook)
        .args(["--p5p", "/nonexistent.p5p"])
        .env("TMPDIR", &logs)
        .output()
        .expect("bash");
    let _ = std::fs::remove_dir_all(&logs);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  environment"), "{text}");
    assert!(text.contains("not illumos"), "{text}");
    // Usage errors.
    let out = Command::new("bash").arg(&runbook).output().expect("bash");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new("bash")
        .arg(&runbook)
        .arg("--frobnicate")
        .output()
        .expect("bash");
    assert_eq!(out.status.code(), Some(2));
}
