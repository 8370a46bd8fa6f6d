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
        .args([
            "--ssh-port",
            &(20000 + std::process::id() % 20000).to_string(),
        ])
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

fn qemu_omnios(args: &[&str]) -> (bool, String) {
    let out = Command::new("sh")
        .arg(root().join("test/omnios/qemu-omnios.sh"))
        .args(args)
        .output()
        .expect("sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_installing_boot_shows_the_vga_console_and_later_boots_use_ttya() {
    // The OmniOS installer runs on the VGA console (its loader sets
    // console="text,ttya"): -nographic would show nothing of it.
    let (ok, cmd) = qemu_omnios(&["--dry-run", "--iso", "omnios.iso"]);
    assert!(ok, "{cmd}");
    assert!(cmd.contains(" -display curses "), "{cmd}");
    assert!(cmd.contains(" -serial file:./omnios-vm/ttya.log "), "{cmd}");
    assert!(!cmd.contains("-nographic"), "{cmd}");
    assert!(cmd.contains("media=cdrom,file=omnios.iso"), "{cmd}");
    let (_, cmd) = qemu_omnios(&["--dry-run", "--iso", "omnios.iso", "--vnc"]);
    assert!(cmd.contains(" -display vnc=127.0.0.1:0 "), "{cmd}");
    // Installed with the serial console chosen: ttya on this terminal.
    let (_, cmd) = qemu_omnios(&["--dry-run"]);
    assert!(cmd.contains(" -nographic -serial mon:stdio"), "{cmd}");
    assert!(!cmd.contains("-display"), "{cmd}");
    let (_, cmd) = qemu_omnios(&["--dry-run", "--vga"]);
    assert!(cmd.contains(" -display curses "), "{cmd}");
    // Both families for the runbook: the two virtio-scsi controllers and
    // a PVSCSI one, each with a scratch disk.
    for dev in [
        " -device virtio-scsi-pci,id=vscsi0 ",
        " -device virtio-scsi-pci,id=vscsi1,bus=rp1,disable-legacy=on ",
        " -device pvscsi,id=pvscsi0 ",
        " -device scsi-hd,bus=pvscsi0.0,channel=0,scsi-id=0,lun=0,drive=scratch2 ",
    ] {
        assert!(cmd.contains(dev), "{dev:?}: {cmd}");
    }
    // The installer's choices are documented in the script's own help.
    let (_, help) = qemu_omnios(&["--help"]);
    for choice in [
        "Serial Console        ttya",
        "SSH Server            Enabled",
        "Extra Packages Repo   Enabled",
        "extra.omnios",
        "again after each\n#   reboot it asks for",
        "new\n#   boot environment",
    ] {
        assert!(help.contains(choice), "help documents {choice:?}:\n{help}");
    }
    // And QEMU accepts the installing layout too.
    let dir = std::env::temp_dir().join(format!("rvscsi-omnios-iso-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let iso = dir.join("empty.iso");
    std::fs::write(&iso, b"").unwrap();
    let port = (20001 + std::process::id() % 20000).to_string();
    let (ok, text) = qemu_omnios(&[
        "--check",
        "--ssh-port",
        &port,
        "--dir",
        dir.to_str().unwrap(),
        "--iso",
        iso.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok && text.contains("QEMU accepted the layout"), "{text}");
}
