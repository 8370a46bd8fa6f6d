//! The illumos branches of the project's scripts, run here on Linux against
//! a scratch illumos system: stand-ins for the illumos commands they call
//! (`test/omnios/standins`), each behaving as its illumos source and man
//! page say, unfriendly parts included (SysV `install`, `update_drv`
//! refusing to drop an alias while a device is attached, `pkg install`'s
//! exit 4, GNU tools first on PATH). The stand-ins log every call, so the
//! tests assert the exact command lines, and they keep the system's state
//! (binding files, the running kernel's bindings, installed packages), so
//! the tests assert what an administrator would find afterwards.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn standins() -> PathBuf {
    root().join("test/omnios/standins")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// The transitional and the modern virtio-scsi controller of the OmniOS
/// VM (test/omnios/qemu-omnios.sh), and the virtio-blk root disk's.
const TRANSITIONAL: &str = "/pci@0,0/pci1af4,8@4";
const MODERN: &str = "/pci@0,0/pci8086,29c0@1/pci1af4,1100@0";
const ROOT_BLK: &str = "/pci@0,0/pci1af4,2@3";
/// The VMware PVSCSI controller (QEMU's `-device pvscsi`, PCI 15ad:07c0;
/// QEMU gives it subsystem 1af4:1000, hence the node name).
const PVSCSI: &str = "/pci@0,0/pci1af4,1000@5";

/// A scratch OmniOS system: binding files, the running kernel's device
/// tree and bindings, installed packages, the illumos link editor, strip
/// and SysV install in usr/bin and usr/sbin, GNU's ld and strip in
/// usr/gnu/bin.
struct Sys {
    dir: PathBuf,
}

struct SysOptions {
    /// vioscsi also holds the modern alias pci1af4,1048,p (the gate's
    /// manifest declares only pci1af4,1004).
    vioscsi_has_modern: bool,
    /// The root pool's disk is behind this controller.
    root_controller: Option<&'static str>,
    /// The in-tree pvscsi driver is installed and holds its alias
    /// (driver_aliases `pvscsi "pci15ad,7c0"`, name_to_major, its module
    /// and package).
    pvscsi: bool,
    /// The machine has a PVSCSI controller (`PVSCSI`) with a disk, c4t0d0.
    pvscsi_controller: bool,
}

impl Default for SysOptions {
    fn default() -> Self {
        SysOptions {
            vioscsi_has_modern: false,
            root_controller: Some(ROOT_BLK),
            pvscsi: false,
            pvscsi_controller: false,
        }
    }
}

impl Sys {
    fn new(name: &str, opts: SysOptions) -> Sys {
        let dir = std::env::temp_dir().join(format!("rvscsi-sys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut aliases = String::from(
            "sd \"scsiclass,00\"\nvioblk \"pci1af4,1001\"\nvioscsi \"pci1af4,1004\"\n",
        );
        if opts.vioscsi_has_modern {
            aliases.push_str("vioscsi \"pci1af4,1048,p\"\n");
        }
        let mut majors = String::from("sd 32\nvioblk 287\nvioscsi 286\n");
        let mut modules = vec!["vioblk", "vioscsi", "sd"];
        let mut packages = String::from("driver/storage/vioscsi\n");
        if opts.pvscsi {
            // As the gate's manifest declares it
            // (usr/src/pkg/manifests/driver-storage-pvscsi.p5m).
            aliases.push_str("pvscsi \"pci15ad,7c0\"\n");
            majors.push_str("pvscsi 285\n");
            modules.push("pvscsi");
            packages.push_str("driver/storage/pvscsi\n");
        }
        write(&dir.join("etc/driver_aliases"), &aliases);
        write(&dir.join("etc/name_to_major"), &majors);
        write(&dir.join("etc/path_to_inst"), "");
        write(
            &dir.join("etc/release"),
            "  OmniOS v11 r151054\n  Copyright (c) 2012-2017 OmniTI Computer Consulting, Inc.\n",
        );
        for drv in modules {
            write(&dir.join(format!("kernel/drv/amd64/{drv}")), "module\n");
        }
        let mut nodes = format!(
            "{ROOT_BLK} pci1af4,2 pci1af4,1001 - 0 0\n\
             {TRANSITIONAL} pci1af4,8 pci1af4,1004 - 0 0\n\
             {MODERN} pci1af4,1100 pci1af4,1048,p - 0 0\n"
        );
        if opts.pvscsi_controller {
            nodes.push_str(&format!("{PVSCSI} pci1af4,1000 pci15ad,7c0 - 0 0\n"));
        }
        write(&dir.join(".kernel/nodes"), &nodes);
        write(&dir.join(".kernel/aliases"), "");
        write(&dir.join(".kernel/modules"), "");
        write(
            &dir.join(".kernel/description.rvscsi"),
            "rvscsi virtio/pvscsi HBA 0.1.0\n",
        );
        write(&dir.join("var/pkg/installed"), &packages);
        if opts.pvscsi {
            write(
                &dir.join("var/pkg/actions/driver_storage_pvscsi.driver"),
                "pvscsi scsi-self-identifying pci15ad,7c0\n",
            );
        }
        write(
            &dir.join("var/pkg/actions/driver_storage_vioscsi.driver"),
            if opts.vioscsi_has_modern {
                "vioscsi scsi-self-identifying pci1af4,1004 pci1af4,1048,p\n"
            } else {
                "vioscsi scsi-self-identifying pci1af4,1004\n"
            },
        );
        write(
            &dir.join("var/pkg/publishers"),
            "omnios origin online F https://pkg.omnios.org/r151054/core/\n",
        );
        write(
            &dir.join("var/pkg/catalog"),
            "ooce/developer/clang-19 extra.omnios opt/ooce/llvm-19/lib/libclang.so.19.1 opt/ooce/llvm-19/lib/libclang.so\n\
             system/header omnios usr/include/sys/scsi/scsi.h\n\
             developer/gcc14 omnios opt/gcc-14/bin/gcc\n",
        );
        write(&dir.join("var/tmp/.keep"), "");
        // What the boot archive holds (boot/solaris/filelist.ramdisk):
        // pkg(1) rebuilds it when a path under one of these changes.
        write(
            &dir.join("boot/solaris/filelist.ramdisk"),
            "etc/driver_aliases\netc/driver_classes\netc/name_to_major\netc/path_to_inst\nkernel\nplatform/i86pc/kernel\n",
        );
        // The root pool and the disks format lists.
        write(&dir.join(".config/rootfs"), "rpool/ROOT/omnios-r151054\n");
        write(&dir.join(".config/rootdisks"), "/dev/dsk/c1t0d0s0\n");
        let root_ctl = opts.root_controller.unwrap_or(ROOT_BLK);
        let root_phys = if root_ctl == ROOT_BLK {
            format!("{ROOT_BLK}/blkdev@0,0")
        } else {
            format!("{root_ctl}/iport@iport0/disk@0,0")
        };
        if opts.root_controller.is_none() {
            std::fs::remove_file(dir.join(".config/rootfs")).unwrap();
        }
        let mut disks = format!(
            "c1t0d0 {root_phys}\n\
             c2t0d0 {TRANSITIONAL}/iport@iport0/disk@0,0\n\
             c3t0d0 {MODERN}/iport@iport0/disk@0,0\n"
        );
        if opts.pvscsi_controller {
            disks.push_str(&format!("c4t0d0 {PVSCSI}/iport@iport0/disk@0,0\n"));
        }
        write(&dir.join(".config/disks"), &disks);
        std::fs::create_dir_all(dir.join("dev/dsk")).unwrap();
        std::os::unix::fs::symlink(
            format!("../../devices{root_phys}:a"),
            dir.join("dev/dsk/c1t0d0s0"),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("dev/rdsk")).unwrap();
        for d in ["c2t0d0p0", "c3t0d0p0", "c4t0d0p0"] {
            let f = std::fs::File::create(dir.join("dev/rdsk").join(d)).unwrap();
            f.set_len(16 << 20).unwrap();
        }
        // The tools that exist twice: the illumos ones where illumos has
        // them, GNU's in usr/gnu/bin.
        for (from, to) in [
            ("sysroot/usr/bin/ld", "usr/bin/ld"),
            ("sysroot/usr/bin/strip", "usr/bin/strip"),
            ("sysroot/usr/gnu/bin/ld", "usr/gnu/bin/ld"),
            ("sysroot/usr/gnu/bin/strip", "usr/gnu/bin/strip"),
            ("sysroot/usr/sbin/install", "usr/sbin/install"),
        ] {
            let dest = dir.join(to);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(standins().join(from), dest).unwrap();
        }
        let sys = Sys { dir };
        // The system as it comes up: every node bound from driver_aliases.
        sys.boot(true);
        sys
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// PATH as an OmniOS administrator may have it: the commands, then GNU
    /// tools (/usr/gnu/bin) ahead of the system's, /usr/sbin (SysV
    /// install) ahead of /usr/bin; Linux's own last, for the shell's
    /// utilities.
    fn env_path(&self) -> String {
        format!(
            "{}:{}:{}:{}:/usr/bin:/bin",
            standins().join("bin").display(),
            self.path("usr/gnu/bin").display(),
            self.path("usr/sbin").display(),
            self.path("usr/bin").display(),
        )
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("PATH", self.env_path())
            .env("STANDIN_SYS", &self.dir)
            .env("STANDIN_LOG", self.path("calls.log"))
            .env("RVSCSI_SYSROOT", &self.dir)
            .env("RVSCSIADM_ROOT", &self.dir)
            .env("RUNBOOK_ROOT", &self.dir)
            .env("TMPDIR", self.path("var/tmp"))
            .env_remove("LIBCLANG_PATH")
            .env_remove("RVSCSI_KERNEL_CARGO")
            .env_remove("RVSCSI_KERNEL_RUSTC")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTC_BOOTSTRAP")
            .stdin(std::process::Stdio::null());
        c
    }

    /// `add_drv -u rvscsi`: the driver installed, no alias of its own.
    fn add_rvscsi(&self) {
        self.command("add_drv")
            .args(["-u", "rvscsi"])
            .output()
            .unwrap();
    }

    fn rvscsiadm(&self, args: &[&str]) -> (i32, String) {
        let out = self
            .command("sh")
            .arg(root().join("pkg/rvscsiadm"))
            .args(args)
            .output()
            .expect("sh");
        (out.status.code().unwrap_or(-1), text(&out))
    }

    /// rvscsiadm with the stand-in command line `fail` failing
    /// (`STANDIN_FAIL`).
    fn rvscsiadm_failing(&self, args: &[&str], fail: &str) -> (i32, String) {
        let out = self
            .command("sh")
            .arg(root().join("pkg/rvscsiadm"))
            .args(args)
            .env("STANDIN_FAIL", fail)
            .output()
            .expect("sh");
        (out.status.code().unwrap_or(-1), text(&out))
    }

    /// A reboot; `reconfigure` as reboot -- -r.
    fn boot(&self, reconfigure: bool) {
        let mut c = self.command("bash");
        c.arg(standins().join("boot"));
        if reconfigure {
            c.arg("-r");
        }
        let out = c.output().expect("bash");
        assert!(out.status.success(), "boot: {}", text(&out));
    }

    /// The logged calls, one command line each, then forgets them.
    fn take_calls(&self) -> Vec<String> {
        let log = self.read("calls.log");
        let _ = std::fs::remove_file(self.path("calls.log"));
        log.lines().map(str::to_string).collect()
    }

    /// The driver each virtio-scsi alias has in driver_aliases.
    /// The calls since the last look that move aliases or rebuild the
    /// boot archive (`update_drv`, `bootadm`), in order.
    fn take_handover_calls(&self) -> Vec<String> {
        self.take_calls()
            .into_iter()
            .filter(|c| c.starts_with("update_drv") || c.starts_with("bootadm"))
            .collect()
    }

    fn alias_owner(&self, alias: &str) -> Option<String> {
        let want = format!("\"{alias}\"");
        self.read("etc/driver_aliases")
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
    }

    /// (bound driver, attached) of the node at `path` in the running
    /// system.
    fn node(&self, path: &str) -> (String, bool) {
        let nodes = self.read(".kernel/nodes");
        let line = nodes
            .lines()
            .find(|l| l.split_whitespace().next() == Some(path))
            .unwrap_or_else(|| panic!("no node {path} in {nodes}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[3].to_string(), f[4] == "1")
    }
}

impl Drop for Sys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A copy of the parts of the tree the build scripts use, so that what
/// they write (target/) stays out of the real tree.
fn tree_copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rvscsi-tree-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["pkg", "mapfiles", "test/scripts"] {
        copy_tree(&root().join(d), &dir.join(d));
    }
    write(
        &dir.join("Cargo.toml"),
        &std::fs::read_to_string(root().join("Cargo.toml")).unwrap(),
    );
    write(
        &dir.join("docs/LICENSE"),
        &std::fs::read_to_string(root().join("docs/LICENSE")).unwrap(),
    );
    dir
}

fn has_call(calls: &[String], want: &str) -> bool {
    calls.iter().any(|c| c == want)
}

// ---- test/scripts/install-deps.sh and pkg/build.sh ----------------------

#[test]
fn install_deps_on_omnios_finds_clang_under_opt_ooce_llvm_and_installs_only_what_is_missing() {
    let sys = Sys::new("deps", SysOptions::default());
    let tree = tree_copy("deps");
    let run = |sys: &Sys| {
        let out = sys
            .command("bash")
            .arg(tree.join("test/scripts/install-deps.sh"))
            .output()
            .expect("bash");
        (out.status.code(), text(&out))
    };
    // Nothing of it yet, and no extra publisher: the script says how to
    // add it instead of failing in pkg.
    let (rc, out) = run(&sys);
    assert_eq!(rc, Some(1), "{out}");
    assert!(
        out.contains("pkg set-publisher -g https://pkg.omnios.org/r151054/extra extra.omnios"),
        "{out}"
    );
    let calls = sys.take_calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("pkg install")),
        "{calls:#?}"
    );

    // With the publisher: exactly the missing packages, once.
    write(
        &sys.path("var/pkg/publishers"),
        "omnios origin online F https://pkg.omnios.org/r151054/core/\n\
         extra.omnios origin online F https://pkg.omnios.org/r151054/extra/\n",
    );
    let (rc, out) = run(&sys);
    assert_eq!(rc, Some(0), "{out}");
    let calls = sys.take_calls();
    assert!(
        has_call(
            &calls,
            "pkg install -v system/header ooce/developer/clang-19"
        ),
        "{calls:#?}"
    );
    let libdir = sys.path("opt/ooce/llvm-19/lib");
    assert!(
        out.contains(&format!("libclang in {}", libdir.display())),
        "{out}"
    );

    // Everything there: nothing installed again.
    let (rc, out) = run(&sys);
    assert_eq!(rc, Some(0), "{out}");
    let calls = sys.take_calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("pkg install")),
        "a second run installs nothing: {calls:#?}"
    );

    // A package that pkg says is installed already (exit 4, nothing to
    // do) is not a failure: the headers "missing" but their package in.
    std::fs::remove_file(sys.path("usr/include/sys/scsi/scsi.h")).unwrap();
    let (rc, out) = run(&sys);
    assert_eq!(rc, Some(0), "pkg install's exit 4 is success: {out}");
    assert!(
        has_call(&sys.take_calls(), "pkg install -v system/header"),
        "{out}"
    );

    // A real failure (no such package on the configured publishers) is one.
    write(&sys.path("var/pkg/installed"), "driver/storage/vioscsi\n");
    write(&sys.path("var/pkg/catalog"), "");
    let (rc, out) = run(&sys);
    assert_eq!(rc, Some(1), "{out}");
    assert!(
        out.contains("pkg install system/header failed (exit 1)")
            && out.contains("install-deps: could not install system/header"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&tree);
}

#[test]
fn the_build_on_omnios_uses_llvm_libclang_the_illumos_link_editor_and_no_install() {
    let sys = build_host("build");
    write(&sys.path("opt/ooce/llvm-18/lib/libclang.so"), "");
    // Same-named files in the system directories SysV install searches.
    for f in ["usr/lib/LICENSE", "usr/lib/rvscsi", "etc/rvscsi.conf"] {
        write(&sys.path(f), "the system's own\n");
    }
    let tree = tree_copy("build");
    let out = sys
        .command("bash")
        .arg(tree.join("pkg/build.sh"))
        .arg("--no-demo")
        .current_dir(&tree)
        .output()
        .expect("bash");
    let log = text(&out);
    let calls = sys.take_calls();
    assert!(out.status.success(), "{log}\ncalls: {calls:#?}");

    // bindgen got the newest OmniOS clang's libclang.
    let libdir = sys.path("opt/ooce/llvm-19/lib");
    assert!(
        calls.iter().any(|c| c
            == &format!(
                "cargo-env LIBCLANG_PATH={} RUSTC_BOOTSTRAP=1",
                libdir.display()
            )),
        "{calls:#?}"
    );
    // The module: the illumos link editor and strip, never GNU's.
    assert!(
        has_call(
            &calls,
            "/usr/bin/ld -ztype=kmod -N misc/scsi -M mapfiles/rvscsi.mapfile -u _init -u _fini -u _info \
             -o target/kernel/rvscsi.debug target/kernel-build/x86_64-illumos-kernel/release/librvscsi.a"
        ),
        "{calls:#?}"
    );
    assert!(
        has_call(&calls, "/usr/bin/strip -x target/kernel/rvscsi"),
        "{calls:#?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("/usr/gnu/bin/")),
        "{calls:#?}"
    );
    // The package: no install(1) at all, the system's files untouched,
    // the proto area complete with the manifest's modes.
    assert!(
        !calls.iter().any(|c| c.starts_with("/usr/sbin/install")),
        "{calls:#?}"
    );
    for f in ["usr/lib/LICENSE", "usr/lib/rvscsi", "etc/rvscsi.conf"] {
        assert_eq!(sys.read(f), "the system's own\n", "{f} overwritten");
    }
    let proto = tree.join("target/pkg/proto");
    for (f, mode) in [
        ("kernel/drv/amd64/rvscsi", 0o755),
        ("kernel/drv/rvscsi.conf", 0o644),
        ("usr/sbin/rvscsiadm", 0o555),
        ("usr/share/man/man4d/rvscsi.4d", 0o444),
        ("LICENSE", 0o444),
    ] {
        let meta = std::fs::metadata(proto.join(f)).unwrap_or_else(|e| panic!("{f}: {e}\n{log}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{f}");
    }
    assert_eq!(
        std::fs::read(proto.join("usr/sbin/rvscsiadm")).unwrap(),
        std::fs::read(root().join("pkg/rvscsiadm")).unwrap()
    );
    // The IPS tools: the manifest filled, linted, published into a scratch
    // repository and received into the archive the runbook installs.
    let version = env!("CARGO_PKG_VERSION");
    for want in [
        "pkgmogrify -DPKGVERS=VERSION -DPKGBRANCH=0 -DPKGPUBLISHER=rvscsi pkg/rvscsi.p5m"
            .to_string(),
        "pkglint target/pkg/rvscsi.p5m".to_string(),
        "pkgrepo create target/pkg/repo".to_string(),
        "pkgrepo -s target/pkg/repo set publisher/prefix=rvscsi".to_string(),
        "pkgsend publish -s target/pkg/repo -d target/pkg/proto target/pkg/rvscsi.p5m".to_string(),
        "pkgrecv -s target/pkg/repo -a -d target/pkg/rvscsi-VERSION.p5p driver/storage/rvscsi"
            .to_string(),
    ] {
        let want = want.replace("VERSION", version);
        assert!(has_call(&calls, &want), "{want}: {calls:#?}");
    }
    assert!(
        tree.join(format!("target/pkg/rvscsi-{version}.p5p"))
            .is_file(),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&tree);
}

/// A scratch system with what the build needs installed.
fn build_host(name: &str) -> Sys {
    let sys = vm(name);
    write(
        &sys.path("var/pkg/publishers"),
        "extra.omnios origin online F https://pkg.omnios.org/r151054/extra/\n",
    );
    write(
        &sys.path("var/pkg/installed"),
        "driver/storage/vioscsi\ndriver/storage/pvscsi\nooce/developer/clang-19\nsystem/header\n",
    );
    write(&sys.path("opt/ooce/llvm-19/lib/libclang.so"), "");
    write(&sys.path("usr/include/sys/scsi/scsi.h"), "");
    sys
}

#[test]
fn the_runbook_builds_the_package_from_source_and_installs_what_it_built() {
    let sys = build_host("runbook-source");
    let tree = tree_copy("runbook-source");
    let out = sys
        .command("bash")
        .arg(root().join("test/omnios/runbook.sh"))
        .arg("--source")
        .arg(&tree)
        .arg("--yes")
        .output()
        .expect("bash");
    let log = text(&out);
    let calls = sys.take_calls();
    assert_eq!(out.status.code(), Some(0), "{log}");
    passes(
        &log,
        &[
            "environment",
            "build",
            "install",
            "installed",
            "controllers",
            "take",
        ],
    );
    let archive = tree.join(format!(
        "target/pkg/rvscsi-{}.p5p",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        has_call(
            &calls,
            &format!(
                "pkg install -v -g {} driver/storage/rvscsi",
                archive.display()
            )
        ),
        "{calls:#?}"
    );
    // What was installed is what the build made.
    assert_eq!(
        std::fs::read(sys.path("usr/sbin/rvscsiadm")).unwrap(),
        std::fs::read(root().join("pkg/rvscsiadm")).unwrap()
    );
    assert!(log.contains("next: reboot, then run again"), "{log}");
    let _ = std::fs::remove_dir_all(&tree);
}

#[test]
fn the_build_on_omnios_stops_with_a_reason_when_libclang_is_missing() {
    let sys = Sys::new("noclang", SysOptions::default());
    let tree = tree_copy("noclang");
    // install-deps would install clang; here the build is run with the
    // dependencies believed present but clang gone from disk.
    write(&sys.path("usr/include/sys/scsi/scsi.h"), "");
    write(
        &sys.path("var/pkg/installed"),
        "driver/storage/vioscsi\nooce/developer/clang-19\nsystem/header\n",
    );
    write(
        &sys.path("var/pkg/publishers"),
        "extra.omnios origin online F https://pkg.omnios.org/r151054/extra/\n",
    );
    let out = sys
        .command("bash")
        .arg(tree.join("pkg/build.sh"))
        .arg("--no-demo")
        .current_dir(&tree)
        .output()
        .expect("bash");
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("no libclang.so in /opt/ooce/llvm-*/lib"),
        "a reason, not a silent exit: {log}"
    );
    let _ = std::fs::remove_dir_all(&tree);
}

// ---- pkg/rvscsiadm ------------------------------------------------------

#[test]
fn rvscsiadm_take_and_release_move_attached_controllers_at_the_next_boot() {
    let sys = Sys::new("handover", SysOptions::default());
    // The package is installed (add_drv as pkg's driver action runs it).
    let out = sys
        .command("add_drv")
        .args(["-u", "-c", "scsi-self-identifying", "rvscsi"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    write(&sys.path("kernel/drv/amd64/rvscsi"), "module\n");
    sys.take_calls();
    assert_eq!(
        sys.node(TRANSITIONAL),
        ("vioscsi".into(), true),
        "booted on vioscsi"
    );

    let (rc, out) = sys.rvscsiadm(&["status"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("state: in-tree\n"), "{out}");

    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    let handover = sys.take_handover_calls();
    assert_eq!(
        handover,
        [
            "update_drv -f -d -i '\"pci1af4,1004\"' vioscsi",
            "update_drv -a -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi",
            "bootadm update-archive",
        ],
        "{out}"
    );
    // The binding files say rvscsi; the attached controller stays with
    // vioscsi until the next boot, which take asked for.
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("rvscsi"));
    assert_eq!(sys.alias_owner("pci1af4,1048,p").as_deref(), Some("rvscsi"));
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), true));
    // The modern controller had no driver: rvscsi attached it at once.
    assert_eq!(sys.node(MODERN), ("rvscsi".into(), true));
    assert!(out.contains("state: rvscsi-after-reboot"), "{out}");
    assert!(
        out.contains("move to rvscsi at the next boot: reboot\n"),
        "{out}"
    );

    // Taking again changes nothing.
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        !sys.take_calls().iter().any(|c| c.starts_with("update_drv")),
        "{out}"
    );

    // A plain boot: every node is bound from driver_aliases at every boot.
    sys.boot(false);
    assert_eq!(sys.node(TRANSITIONAL), ("rvscsi".into(), true));
    assert_eq!(sys.node(MODERN), ("rvscsi".into(), true));
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: rvscsi\n"), "{out}");

    let (rc, out) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 0, "{out}");
    let handover = sys.take_handover_calls();
    assert_eq!(
        handover,
        [
            "update_drv -f -d -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi",
            "update_drv -a -i '\"pci1af4,1004\"' vioscsi",
            "bootadm update-archive",
        ],
        "vioscsi gets back what it had, and only that: {out}"
    );
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
    assert_eq!(sys.alias_owner("pci1af4,1048,p"), None);
    // pvscsi is not installed here: its alias goes back to nobody.
    assert_eq!(sys.alias_owner("pci15ad,7c0"), None);
    assert!(out.contains("state: in-tree-after-reboot"), "{out}");
    sys.boot(false);
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), true));
    assert_eq!(sys.node(MODERN), ("-".into(), false));
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: in-tree\n"), "{out}");
    // The unrelated aliases are untouched.
    let db = sys.read("etc/driver_aliases");
    assert!(db.contains("vioblk \"pci1af4,1001\"") && db.contains("sd \"scsiclass,00\""));
}

#[test]
fn rvscsiadm_gives_both_aliases_back_when_vioscsi_had_both() {
    let sys = Sys::new(
        "both",
        SysOptions {
            vioscsi_has_modern: true,
            ..SysOptions::default()
        },
    );
    sys.add_rvscsi();
    write(&sys.path("kernel/drv/amd64/rvscsi"), "module\n");
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        has_call(
            &sys.take_calls(),
            "update_drv -f -d -i '\"pci1af4,1004\" \"pci1af4,1048,p\"' vioscsi"
        ),
        "{out}"
    );
    sys.boot(true);
    let (rc, out) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        has_call(
            &sys.take_calls(),
            "update_drv -a -i '\"pci1af4,1004\" \"pci1af4,1048,p\"' vioscsi"
        ),
        "{out}"
    );
    sys.boot(true);
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), true));
    assert_eq!(sys.node(MODERN), ("vioscsi".into(), true));
}

#[test]
fn rvscsiadm_take_puts_the_aliases_back_when_rvscsi_cannot_have_them() {
    let sys = Sys::new("rollback", SysOptions::default());
    sys.add_rvscsi();
    sys.take_calls();
    let (rc, msg) = sys.rvscsiadm_failing(
        &["take"],
        "update_drv -a -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi",
    );
    assert_eq!(rc, 1, "{msg}");
    assert!(msg.contains("; vioscsi keeps pci1af4,1004\n"), "{msg}");
    assert_eq!(
        sys.alias_owner("pci1af4,1004").as_deref(),
        Some("vioscsi"),
        "no alias is left without a driver"
    );
    assert!(
        has_call(
            &sys.take_calls(),
            "update_drv -a -i '\"pci1af4,1004\"' vioscsi"
        ),
        "{msg}"
    );
}

#[test]
fn rvscsiadm_refuses_to_take_the_root_pool_controller_without_force() {
    let sys = Sys::new(
        "scsi-root",
        SysOptions {
            root_controller: Some(TRANSITIONAL),
            ..SysOptions::default()
        },
    );
    sys.add_rvscsi();
    sys.take_calls();
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains(&format!(
            "the root pool is on {TRANSITIONAL}, a controller of vioscsi:"
        )),
        "{out}"
    );
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
    assert!(
        !sys.take_calls().iter().any(|c| c.starts_with("update_drv")),
        "nothing moved"
    );
    let (rc, out) = sys.rvscsiadm(&["take", "-f"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("rvscsi"));
}

#[test]
fn rvscsiadm_refuses_what_it_cannot_check_or_should_not_touch() {
    // No way to find the root pool: refuse unless forced.
    let sys = Sys::new(
        "unknown-root",
        SysOptions {
            root_controller: None,
            ..SysOptions::default()
        },
    );
    sys.add_rvscsi();
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("cannot tell where the root pool is"), "{out}");
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
    // rvscsi not installed.
    let sys = Sys::new("not-installed", SysOptions::default());
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 1);
    assert!(out.contains("driver rvscsi is not installed"), "{out}");
    // An alias owned by a third driver is left alone.
    let sys = Sys::new("third", SysOptions::default());
    sys.add_rvscsi();
    write(
        &sys.path("etc/driver_aliases"),
        "vioscsi \"pci1af4,1004\"\nother \"pci1af4,1048,p\"\n",
    );
    sys.take_calls();
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 1);
    assert!(out.contains("belongs to other"), "{out}");
    assert!(!sys.take_calls().iter().any(|c| c.starts_with("update_drv")));
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: mixed"), "{out}");
    // Usage.
    assert_eq!(sys.rvscsiadm(&[]).0, 2);
    assert_eq!(sys.rvscsiadm(&["frob"]).0, 2);
    assert_eq!(sys.rvscsiadm(&["take", "-x"]).0, 2);
    assert_eq!(sys.rvscsiadm(&["take", "extra"]).0, 2);
}

// ---- pkg/rvscsiadm with a VMware PVSCSI controller ----------------------

/// Both families: the in-tree vioscsi and pvscsi drivers installed, a
/// PVSCSI controller beside the virtio-scsi ones, rvscsi installed with its
/// module.
fn both_families(name: &str, opts: SysOptions) -> Sys {
    let sys = Sys::new(
        name,
        SysOptions {
            pvscsi: true,
            pvscsi_controller: true,
            ..opts
        },
    );
    sys.add_rvscsi();
    write(&sys.path("kernel/drv/amd64/rvscsi"), "module\n");
    sys.take_calls();
    sys
}

#[test]
fn rvscsiadm_takes_the_pvscsi_alias_with_the_virtio_scsi_ones_and_gives_each_back_to_its_driver() {
    let sys = both_families("pv-handover", SysOptions::default());
    assert_eq!(
        sys.node(PVSCSI),
        ("pvscsi".into(), true),
        "booted on pvscsi"
    );

    let (rc, out) = sys.rvscsiadm(&["status"]);
    assert_eq!(rc, 0, "{out}");
    for line in [
        "pci1af4,1004     vioscsi\n",
        "pci1af4,1048,p   (no driver)\n",
        "pci15ad,7c0      pvscsi\n",
        "rvscsi           0 controller(s) bound in the running system\n",
        "vioscsi          1 controller(s) bound in the running system\n",
        "pvscsi           1 controller(s) bound in the running system\n",
        "state: in-tree\n",
    ] {
        assert!(out.contains(line), "{line:?}: {out}");
    }

    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        sys.take_handover_calls(),
        [
            "update_drv -f -d -i '\"pci1af4,1004\"' vioscsi",
            "update_drv -f -d -i '\"pci15ad,7c0\"' pvscsi",
            "update_drv -a -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi",
            "bootadm update-archive",
        ],
        "{out}"
    );
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("rvscsi"));
    assert_eq!(
        sys.read("etc/rvscsiadm.taken"),
        "pci1af4,1004 vioscsi\npci1af4,1048,p -\npci15ad,7c0 pvscsi\n",
        "what was taken, from whom"
    );
    // The attached PVSCSI controller stays with pvscsi until the boot.
    assert_eq!(sys.node(PVSCSI), ("pvscsi".into(), true));
    assert!(
        out.contains(
            "1 controller(s) still bound to pvscsi move to rvscsi at the next boot: reboot\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("pci15ad,7c0      rvscsi (taken from pvscsi)\n"),
        "{out}"
    );
    assert!(out.contains("state: rvscsi-after-reboot\n"), "{out}");

    sys.boot(false);
    assert_eq!(sys.node(PVSCSI), ("rvscsi".into(), true));
    assert_eq!(sys.node(TRANSITIONAL), ("rvscsi".into(), true));
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: rvscsi\n"), "{out}");

    let (rc, out) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        sys.take_handover_calls(),
        [
            "update_drv -f -d -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi",
            "update_drv -a -i '\"pci1af4,1004\"' vioscsi",
            "update_drv -a -i '\"pci15ad,7c0\"' pvscsi",
            "bootadm update-archive",
        ],
        "each alias to the driver it came from, and only there: {out}"
    );
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
    assert_eq!(sys.alias_owner("pci1af4,1048,p"), None);
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("pvscsi"));
    assert!(!sys.path("etc/rvscsiadm.taken").exists());
    assert!(out.contains("state: in-tree-after-reboot\n"), "{out}");
    sys.boot(false);
    assert_eq!(sys.node(PVSCSI), ("pvscsi".into(), true));
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), true));
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: in-tree\n"), "{out}");
}

#[test]
fn rvscsiadm_waits_for_the_reboot_while_only_the_pvscsi_controller_keeps_its_driver() {
    // vioscsi had both virtio-scsi aliases but no module to attach with,
    // so its controllers are free: take gives them to rvscsi at once, and
    // only the PVSCSI controller is still an in-tree driver's.
    let sys = both_families(
        "pv-wait",
        SysOptions {
            vioscsi_has_modern: true,
            ..SysOptions::default()
        },
    );
    std::fs::remove_file(sys.path("kernel/drv/amd64/vioscsi")).unwrap();
    sys.boot(false);
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), false));
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        has_call(
            &sys.take_calls(),
            "update_drv -f -d -i '\"pci1af4,1004\" \"pci1af4,1048,p\"' vioscsi"
        ),
        "{out}"
    );
    assert_eq!(sys.node(TRANSITIONAL), ("rvscsi".into(), true));
    assert_eq!(sys.node(MODERN), ("rvscsi".into(), true));
    assert_eq!(sys.node(PVSCSI), ("pvscsi".into(), true));
    assert!(out.contains("state: rvscsi-after-reboot\n"), "{out}");
    assert!(!out.contains("still bound to vioscsi"), "{out}");
    sys.boot(false);
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: rvscsi\n"), "{out}");
    let (rc, out) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        has_call(
            &sys.take_calls(),
            "update_drv -a -i '\"pci1af4,1004\" \"pci1af4,1048,p\"' vioscsi"
        ),
        "{out}"
    );
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("pvscsi"));
    assert!(out.contains("state: in-tree-after-reboot\n"), "{out}");
}

#[test]
fn rvscsiadm_refuses_to_take_a_root_pool_on_a_pvscsi_controller_without_force() {
    let sys = both_families(
        "pv-root",
        SysOptions {
            root_controller: Some(PVSCSI),
            ..SysOptions::default()
        },
    );
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains(&format!(
            "the root pool is on {PVSCSI}, a controller of pvscsi:"
        )) && out.contains("in which pvscsi still owns its aliases"),
        "{out}"
    );
    assert!(
        !sys.take_calls().iter().any(|c| c.starts_with("update_drv")),
        "nothing moved"
    );
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("pvscsi"));
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
    let (rc, out) = sys.rvscsiadm(&["take", "-f"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("rvscsi"));
    // Once rvscsi drives it, it is still the root pool's controller.
    sys.boot(false);
    let (rc, _) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 0);
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains(&format!(
            "the root pool is on {PVSCSI}, a controller of rvscsi:"
        )),
        "{out}"
    );
}

#[test]
fn rvscsiadm_without_the_pvscsi_driver_takes_its_alias_as_nobodys_and_gives_it_to_nobody() {
    let sys = Sys::new(
        "pv-absent",
        SysOptions {
            pvscsi_controller: true,
            ..SysOptions::default()
        },
    );
    sys.add_rvscsi();
    write(&sys.path("kernel/drv/amd64/rvscsi"), "module\n");
    sys.take_calls();
    assert_eq!(sys.node(PVSCSI), ("-".into(), false));
    let (rc, out) = sys.rvscsiadm(&["status"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("pci15ad,7c0      (no driver)\n"), "{out}");
    assert!(
        out.contains(
            "pvscsi           0 controller(s) bound in the running system (driver not installed)\n"
        ),
        "{out}"
    );
    assert!(out.contains("state: in-tree\n"), "{out}");

    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        sys.take_handover_calls(),
        [
            "update_drv -f -d -i '\"pci1af4,1004\"' vioscsi",
            "update_drv -a -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi",
            "bootadm update-archive",
        ],
        "{out}"
    );
    // A free controller: rvscsi has it at once.
    assert_eq!(sys.node(PVSCSI), ("rvscsi".into(), true));
    assert!(
        out.contains("pci15ad,7c0      rvscsi (taken from no driver)\n"),
        "{out}"
    );
    sys.boot(false);
    let (rc, out) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        sys.take_handover_calls(),
        [
            "update_drv -f -d -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi",
            "update_drv -a -i '\"pci1af4,1004\"' vioscsi",
            "bootadm update-archive",
        ],
        "{out}"
    );
    assert_eq!(sys.alias_owner("pci15ad,7c0"), None);
    sys.boot(false);
    assert_eq!(sys.node(PVSCSI), ("-".into(), false));
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: in-tree\n"), "{out}");
}

#[test]
fn rvscsiadm_undoes_a_hand_over_of_both_families_that_fails_half_way() {
    // take: vioscsi gave its alias, then pvscsi's update_drv fails: vioscsi
    // gets it back and the error names pvscsi.
    let sys = both_families("pv-undo", SysOptions::default());
    let (rc, msg) =
        sys.rvscsiadm_failing(&["take"], "update_drv -f -d -i '\"pci15ad,7c0\"' pvscsi");
    assert_eq!(rc, 1, "{msg}");
    assert!(
        msg.contains("could not remove pci15ad,7c0 from pvscsi")
            && msg.contains("vioscsi keeps pci1af4,1004, pvscsi keeps pci15ad,7c0\n"),
        "{msg}"
    );
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("pvscsi"));
    assert!(
        has_call(
            &sys.take_calls(),
            "update_drv -a -i '\"pci1af4,1004\"' vioscsi"
        ),
        "{msg}"
    );

    // release: vioscsi had its alias back, then pvscsi's update_drv fails:
    // rvscsi gets all of them back, vioscsi's included.
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    sys.boot(false);
    sys.take_calls();
    let (rc, msg) =
        sys.rvscsiadm_failing(&["release"], "update_drv -a -i '\"pci15ad,7c0\"' pvscsi");
    assert_eq!(rc, 1, "{msg}");
    assert!(msg.contains("rvscsi keeps them"), "{msg}");
    for a in ["pci1af4,1004", "pci1af4,1048,p", "pci15ad,7c0"] {
        assert_eq!(sys.alias_owner(a).as_deref(), Some("rvscsi"), "{a}: {msg}");
    }
    assert!(
        has_call(
            &sys.take_calls(),
            "update_drv -f -d -i '\"pci1af4,1004\"' vioscsi"
        ),
        "{msg}"
    );
    // What was taken is still known: a release that works gives it back.
    let (rc, out) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("pvscsi"));
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
}

#[test]
fn rvscsiadm_leaves_the_pvscsi_alias_alone_when_another_driver_has_it_or_its_driver_is_gone() {
    // Held by a driver that is not pvscsi (vioscsi here): refused.
    let sys = both_families("pv-other", SysOptions::default());
    write(
        &sys.path("etc/driver_aliases"),
        "vioscsi \"pci1af4,1004\"\nvioscsi \"pci15ad,7c0\"\n",
    );
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("alias pci15ad,7c0 belongs to vioscsi, not pvscsi: not touching it"),
        "{out}"
    );
    assert!(!sys.take_calls().iter().any(|c| c.starts_with("update_drv")));
    let (_, out) = sys.rvscsiadm(&["status"]);
    assert!(out.contains("state: mixed\n"), "{out}");

    // Taken from pvscsi, which is then removed: release refuses, naming
    // it, and changes nothing.
    let sys = both_families("pv-gone", SysOptions::default());
    let (rc, out) = sys.rvscsiadm(&["take"]);
    assert_eq!(rc, 0, "{out}");
    let n2m = sys.read("etc/name_to_major").replace("pvscsi 285\n", "");
    write(&sys.path("etc/name_to_major"), &n2m);
    sys.take_calls();
    let (rc, out) = sys.rvscsiadm(&["release"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("alias pci15ad,7c0 was taken from pvscsi, which is not installed now"),
        "{out}"
    );
    assert!(!sys.take_calls().iter().any(|c| c.starts_with("update_drv")));
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("rvscsi"));
}

// ---- test/omnios/runbook.sh ---------------------------------------------

/// The OmniOS VM of test/omnios/qemu-omnios.sh: the virtio-scsi
/// controllers, a PVSCSI one, and the in-tree vioscsi and pvscsi drivers.
fn vm(name: &str) -> Sys {
    Sys::new(
        name,
        SysOptions {
            pvscsi: true,
            pvscsi_controller: true,
            ..SysOptions::default()
        },
    )
}

/// The package archive the runbook installs: here a tar of the proto area
/// laid out from the sources, with the filled manifest (the pkg stand-in
/// reads its driver action).
fn package_archive(sys: &Sys) -> PathBuf {
    package_archive_version(sys, env!("CARGO_PKG_VERSION"), "module\n")
}

/// The same, for the package version `version` with `module` as its
/// kernel module.
fn package_archive_version(sys: &Sys, version: &str, module: &str) -> PathBuf {
    let proto = std::env::temp_dir().join(format!(
        "rvscsi-proto-{}-{version}",
        sys.dir.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&proto);
    write(&proto.join("kernel/drv/amd64/rvscsi"), module);
    for (src, dest) in [
        ("pkg/rvscsi.conf", "kernel/drv/rvscsi.conf"),
        ("pkg/rvscsiadm", "usr/sbin/rvscsiadm"),
        ("pkg/rvscsi.4D", "usr/share/man/man4d/rvscsi.4d"),
    ] {
        write(
            &proto.join(dest),
            &std::fs::read_to_string(root().join(src)).unwrap(),
        );
    }
    let manifest = std::fs::read_to_string(root().join("pkg/rvscsi.p5m"))
        .unwrap()
        .replace("$(PKGVERS)", version)
        .replace("$(PKGBRANCH)", "0")
        .replace("$(PKGPUBLISHER)", "rvscsi");
    write(&proto.join("rvscsi.p5m"), &manifest);
    std::fs::set_permissions(
        proto.join("usr/sbin/rvscsiadm"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    let archive = sys.path(&format!("var/tmp/rvscsi-{version}.p5p"));
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&proto)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let _ = std::fs::remove_dir_all(&proto);
    archive
}

fn runbook(sys: &Sys, archive: &Path) -> (i32, String, Vec<String>) {
    let out = sys
        .command("bash")
        .arg(root().join("test/omnios/runbook.sh"))
        .arg("--p5p")
        .arg(archive)
        .arg("--yes")
        .output()
        .expect("bash");
    (
        out.status.code().unwrap_or(-1),
        text(&out),
        sys.take_calls(),
    )
}

fn passes(out: &str, steps: &[&str]) {
    for s in steps {
        assert!(out.contains(&format!("PASS  {s}\n")), "step {s}:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
}

/// The name of the BE booted now, and of the one active on the next boot
/// (beadm list -H).
fn boot_environments(sys: &Sys) -> (String, String) {
    let out = sys.command("beadm").args(["list", "-H"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    let with = |flag: char| {
        list.lines()
            .find(|l| l.split(';').nth(2).is_some_and(|f| f.contains(flag)))
            .map(|l| l.split(';').next().unwrap().to_string())
            .unwrap_or_default()
    };
    (with('N'), with('R'))
}

#[test]
fn the_runbook_runs_in_four_phases_with_a_reboot_between_them() {
    let sys = vm("runbook");
    let archive = package_archive(&sys);

    // Phase 1: install, take, then the reboot it asks for.
    let (rc, out, calls) = runbook(&sys, &archive);
    assert_eq!(rc, 0, "{out}");
    passes(
        &out,
        &["environment", "install", "installed", "controllers", "take"],
    );
    assert!(out.contains("next: reboot, then run again"), "{out}");
    assert!(!out.contains("attach"), "phase 2 waits for the boot: {out}");
    let a = archive.display();
    for want in [
        format!("pkg info -g {a} driver/storage/rvscsi"),
        format!("pkg install -v -g {a} driver/storage/rvscsi"),
        "add_drv -u -c scsi-self-identifying rvscsi".to_string(),
        "devfsadm -u".to_string(),
        "bootadm update-archive -R /".to_string(),
        "pkg verify -v driver/storage/rvscsi".to_string(),
        "update_drv -f -d -i '\"pci1af4,1004\"' vioscsi".to_string(),
        "update_drv -f -d -i '\"pci15ad,7c0\"' pvscsi".to_string(),
        "update_drv -a -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi".to_string(),
    ] {
        assert!(has_call(&calls, &want), "{want}: {calls:#?}");
    }
    // The controllers step recorded each in-tree driver's controller.
    assert_eq!(
        sys.read("var/tmp/rvscsi-runbook.controllers"),
        format!("vioscsi {TRANSITIONAL}\npvscsi {PVSCSI}\n"),
        "{out}"
    );
    // A new install of a reboot-needed file is done in place.
    assert!(out.contains("PASS  install"), "{out}");
    assert_eq!(
        boot_environments(&sys),
        ("omnios-r151054".into(), "omnios-r151054".into())
    );

    // Run again before rebooting: it says so and changes nothing.
    let (out, calls) = runbook_waiting_for_reboot(&sys, &archive);
    assert!(out.contains("next: reboot, then run again"), "{out}");
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("update_drv") || c.starts_with("pkg install")),
        "{calls:#?}"
    );

    // Phase 2 after a plain reboot: the data, then the whole teardown on
    // the kernel (modunload detaches every instance), the attach again
    // and the same disks, then the release.
    let (out, calls) = runbook_after_a_plain_reboot(&sys, &archive);
    passes(
        &out,
        &[
            "environment",
            "attach",
            "disks",
            "choose-disk",
            "dd-write-read",
            "choose-disk-pvscsi",
            "dd-write-read-pvscsi",
            "dtrace",
            "detach",
            "reattach",
            "disks-again",
            "release",
        ],
    );
    assert!(out.contains("next: reboot, then run again"), "{out}");
    assert!(!out.contains("PASS  install"), "{out}");
    let attach = std::fs::read_to_string(format!("{}/attach.log", logs_of(&out))).unwrap();
    for want in [
        format!("the vioscsi controller {TRANSITIONAL} is attached to rvscsi"),
        format!("the pvscsi controller {PVSCSI} is attached to rvscsi"),
    ] {
        assert!(attach.contains(&want), "{want}: {attach}");
    }
    // A disk of each family written and read back: the virtio-scsi one
    // behind the transitional controller, the PVSCSI one.
    for d in ["c2t0d0", "c4t0d0"] {
        assert!(
            has_call(
                &calls,
                &format!(
                    "dd if={}/pattern.{d} of=/dev/rdsk/{d}p0 bs=1024k seek=1 count=8",
                    logs_of(&out)
                )
            ),
            "{d}: {calls:#?}"
        );
        let on_disk = std::fs::read(sys.path(&format!("dev/rdsk/{d}p0"))).unwrap();
        assert!(
            on_disk[1 << 20..9 << 20].iter().any(|&b| b != 0),
            "{d} holds the pattern"
        );
    }
    let pos = |want: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(want))
            .unwrap_or_else(|| panic!("{want}: {calls:#?}"))
    };
    assert!(pos("format") < pos("modunload -i "), "{calls:#?}");
    assert!(
        pos("modunload -i ") < pos("devfsadm -i rvscsi"),
        "{calls:#?}"
    );
    assert!(
        pos("devfsadm -i rvscsi")
            < pos(
                "update_drv -f -d -i '\"pci1af4,1004\" \"pci1af4,1048,p\" \"pci15ad,7c0\"' rvscsi"
            ),
        "{calls:#?}"
    );

    // Phase 3 after the next reboot: vioscsi again, and the package goes,
    // into a new boot environment: the running system keeps rvscsi.
    let (out, calls) = runbook_after_a_plain_reboot(&sys, &archive);
    passes(
        &out,
        &["environment", "not-loaded", "in-tree-again", "uninstall"],
    );
    let clone = sys.path(".be/mnt/omnios-r151054-1");
    assert!(
        has_call(&calls, &format!("rem_drv -b {} rvscsi", clone.display())),
        "{calls:#?}"
    );
    assert!(
        has_call(
            &calls,
            &format!("bootadm update-archive -R {}", clone.display())
        ),
        "{calls:#?}"
    );
    assert!(
        !calls.iter().any(|c| c == "rem_drv -b / rvscsi"),
        "{calls:#?}"
    );
    assert!(
        out.contains("next: reboot (into the boot environment omnios-r151054-1)"),
        "{out}"
    );
    assert!(sys.read("etc/name_to_major").contains("rvscsi 288"));
    assert_eq!(
        boot_environments(&sys),
        ("omnios-r151054".into(), "omnios-r151054-1".into())
    );

    // Before that reboot: it says so, and does not uninstall again.
    let (_, calls) = runbook_waiting_for_reboot(&sys, &archive);
    assert!(
        !calls.iter().any(|c| c.starts_with("pkg uninstall")),
        "{calls:#?}"
    );

    // Phase 4 in the new BE: rvscsi is gone, vioscsi has its controller.
    let (out, _) = runbook_after_a_plain_reboot(&sys, &archive);
    passes(&out, &["environment", "uninstalled", "in-tree-final"]);
    assert_eq!(
        boot_environments(&sys),
        ("omnios-r151054-1".into(), "omnios-r151054-1".into())
    );
    assert_eq!(sys.alias_owner("pci1af4,1004").as_deref(), Some("vioscsi"));
    assert_eq!(sys.alias_owner("pci15ad,7c0").as_deref(), Some("pvscsi"));
    assert!(!sys.read("etc/name_to_major").contains("rvscsi"));
    assert!(!sys.path("kernel/drv/amd64/rvscsi").exists());
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), true));
    assert_eq!(sys.node(PVSCSI), ("pvscsi".into(), true));
    for f in ["rvscsi-runbook.state", "rvscsi-runbook.controllers"] {
        assert!(
            !sys.path(&format!("var/tmp/{f}")).exists(),
            "{f} is gone: a new run starts at phase 1"
        );
    }
    let _ = std::fs::remove_file(&archive);
}

/// The directory of the runbook's logs, from its first line.
fn logs_of(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("rvscsi runbook; logs in "))
        .unwrap_or_else(|| panic!("no logs line: {out}"))
        .to_string()
}

/// Runs the runbook before the reboot it asked for: it fails the `reboot`
/// step. Returns its output and calls.
fn runbook_waiting_for_reboot(sys: &Sys, archive: &Path) -> (String, Vec<String>) {
    let (rc, out, calls) = runbook(sys, archive);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("FAIL  reboot"), "{out}");
    (out, calls)
}

/// Boots (no reconfiguration) and runs the next phase of the runbook,
/// which succeeds. Returns its output and calls.
fn runbook_after_a_plain_reboot(sys: &Sys, archive: &Path) -> (String, Vec<String>) {
    sys.boot(false);
    let (rc, out, calls) = runbook(sys, archive);
    assert_eq!(rc, 0, "{out}");
    (out, calls)
}

/// The runbook up to phase 2, run after the boot that take asked for.
fn runbook_to_phase_2(sys: &Sys, archive: &Path) {
    let (rc, out, _) = runbook(sys, archive);
    assert_eq!(rc, 0, "{out}");
    sys.boot(false);
}

#[test]
fn the_runbook_fails_the_detach_when_rvscsi_warns_while_detaching() {
    let sys = vm("detach-warn");
    let archive = package_archive(&sys);
    runbook_to_phase_2(&sys, &archive);
    // What the driver's dev_err(9F) puts in /var/adm/messages when the
    // device does not finish its reset at detach.
    write(
        &sys.path(".kernel/detach-messages.rvscsi"),
        "Dec  2 16:40:01 omnios rvscsi: [ID 107833 kern.warning] WARNING: rvscsi0: \
         the device did not finish its reset (timed out): the memory it may still use is kept, not freed\n",
    );
    let (rc, out, _) = runbook(&sys, &archive);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("FAIL  detach"), "{out}");
    assert!(out.contains("rvscsi warned while detaching"), "{out}");
    assert!(out.contains("kept, not freed"), "the log shows it: {out}");
    let _ = std::fs::remove_file(&archive);
}

#[test]
fn the_runbook_fails_the_detach_while_a_disk_behind_rvscsi_is_open() {
    let sys = vm("detach-busy");
    let archive = package_archive(&sys);
    runbook_to_phase_2(&sys, &archive);
    // A disk behind the transitional controller is open (in a pool, say).
    let nodes = sys.read(".kernel/nodes").replace(
        &format!("{TRANSITIONAL} pci1af4,8 pci1af4,1004 rvscsi 1 0"),
        &format!("{TRANSITIONAL} pci1af4,8 pci1af4,1004 rvscsi 1 1"),
    );
    assert!(nodes.contains("rvscsi 1 1"), "{nodes}");
    write(&sys.path(".kernel/nodes"), &nodes);
    let (rc, out, calls) = runbook(&sys, &archive);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("FAIL  detach"), "{out}");
    assert!(out.contains("Device busy"), "{out}");
    assert!(
        !has_call(&calls, "devfsadm -i rvscsi"),
        "no reattach after a failed detach: {calls:#?}"
    );
    let _ = std::fs::remove_file(&archive);
}

#[test]
fn the_runbook_fails_when_a_controller_is_not_back_with_its_in_tree_driver() {
    let sys = vm("pv-not-back");
    let archive = package_archive(&sys);
    runbook_to_phase_2(&sys, &archive);
    let (rc, out, _) = runbook(&sys, &archive);
    assert_eq!(rc, 0, "{out}");
    // pvscsi's module is gone: after the reboot its controller is bound
    // to it but not attached.
    std::fs::remove_file(sys.path("kernel/drv/amd64/pvscsi")).unwrap();
    sys.boot(false);
    assert_eq!(sys.node(PVSCSI), ("pvscsi".into(), false));
    let (rc, out, calls) = runbook(&sys, &archive);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("FAIL  in-tree-again"), "{out}");
    assert!(
        out.contains(&format!(
            "the pvscsi controller {PVSCSI} is not attached to pvscsi"
        )),
        "{out}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("pkg uninstall")),
        "no uninstall: {calls:#?}"
    );
    let _ = std::fs::remove_file(&archive);
}

#[test]
fn the_runbook_fails_the_final_check_when_a_controller_is_not_with_its_driver_in_the_new_be() {
    let sys = vm("pv-final");
    let archive = package_archive(&sys);
    runbook_to_phase_2(&sys, &archive);
    let (rc, out, _) = runbook(&sys, &archive);
    assert_eq!(rc, 0, "{out}");
    let (out, _) = runbook_after_a_plain_reboot(&sys, &archive);
    assert!(out.contains("PASS  uninstall"), "{out}");
    // The boot environment the uninstall made has lost pvscsi's module.
    std::fs::remove_file(sys.path(".be/root/omnios-r151054-1/kernel/drv/amd64/pvscsi")).unwrap();
    sys.boot(false);
    let (rc, out, _) = runbook(&sys, &archive);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("FAIL  in-tree-final"), "{out}");
    assert!(
        out.contains(&format!(
            "the pvscsi controller {PVSCSI} is not attached to pvscsi"
        )),
        "{out}"
    );
    let _ = std::fs::remove_file(&archive);
}

#[test]
fn the_runbook_needs_a_pvscsi_controller_driven_by_pvscsi_to_start() {
    // The PVSCSI controller is there but the in-tree pvscsi driver is not.
    let sys = Sys::new(
        "pv-no-driver",
        SysOptions {
            pvscsi_controller: true,
            ..SysOptions::default()
        },
    );
    let archive = package_archive(&sys);
    let (rc, out, calls) = runbook(&sys, &archive);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("FAIL  controllers"), "{out}");
    assert!(
        out.contains("no PVSCSI controller attached to pvscsi"),
        "{out}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("update_drv")),
        "nothing taken: {calls:#?}"
    );
    assert!(!sys.path("var/tmp/rvscsi-runbook.controllers").exists());
    let _ = std::fs::remove_file(&archive);
}

#[test]
fn the_runbook_reboots_into_the_new_be_when_the_install_is_an_update() {
    let sys = vm("update");
    let old = package_archive_version(&sys, "0.0.9", "old module\n");
    let out = sys
        .command("pkg")
        .args(["install", "-v", "-g"])
        .arg(&old)
        .arg("driver/storage/rvscsi")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Create boot environment:  No"),
        "a new install is in place: {}",
        text(&out)
    );
    sys.take_calls();
    let archive = package_archive(&sys);
    let (rc, out, calls) = runbook(&sys, &archive);
    assert_eq!(rc, 0, "{out}");
    passes(&out, &["environment", "install"]);
    assert!(
        out.contains("next: reboot (into the boot environment omnios-r151054-1)"),
        "{out}"
    );
    assert!(!out.contains("  take"), "{out}");
    assert!(
        !calls.iter().any(|c| c.starts_with("add_drv")),
        "the driver action did not change: {calls:#?}"
    );
    // The running system still has the old module; the new BE the new.
    assert_eq!(sys.read("kernel/drv/amd64/rvscsi"), "old module\n");
    assert_eq!(
        sys.read(".be/root/omnios-r151054-1/kernel/drv/amd64/rvscsi"),
        "module\n"
    );
    // Run again before the reboot: no second BE.
    let (_, calls) = runbook_waiting_for_reboot(&sys, &archive);
    assert!(!calls.iter().any(|c| c.starts_with("pkg install")));
    // In the new BE the install is nothing to do, and phase 1 goes on.
    let (out, _) = runbook_after_a_plain_reboot(&sys, &archive);
    passes(&out, &["install", "installed", "controllers", "take"]);
    let _ = std::fs::remove_file(&archive);
    let _ = std::fs::remove_file(&old);
}

#[test]
fn the_runbook_accepts_a_package_that_is_installed_already() {
    let sys = vm("reinstall");
    let archive = package_archive(&sys);
    let out = sys
        .command("pkg")
        .args(["install", "-v", "-g"])
        .arg(&archive)
        .arg("driver/storage/rvscsi")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    sys.take_calls();
    let (rc, out, _) = runbook(&sys, &archive);
    assert_eq!(rc, 0, "pkg install's exit 4 is not a failure: {out}");
    passes(&out, &["install", "take"]);
    let _ = std::fs::remove_file(&archive);
}

// ---- mapfiles/rvscsi.mapfile --------------------------------------------

#[test]
fn the_mapfile_has_the_form_of_the_gates_own_kmod_mapfiles() {
    // usr/src/uts/intel/io/viona/viona.mapfile, io/vmm/vmm.mapfile and
    // io/vmm/io/ppt.mapfile, linked with ld -ztype=kmod -M: a version 2
    // mapfile with one SYMBOL_VERSION ILLUMOSprivate block whose global
    // list is the module entry points and whose local list is "*".
    let text = std::fs::read_to_string(root().join("mapfiles/rvscsi.mapfile")).unwrap();
    let body: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        body,
        [
            "$mapfile_version 2",
            "SYMBOL_VERSION ILLUMOSprivate {",
            "global:",
            "_init;",
            "_fini;",
            "_info;",
            "local:",
            "*;",
            "};",
        ],
        "{text}"
    );
}

// ---- the stand-ins themselves -------------------------------------------

/// The unfriendly parts of illumos that the scripts had to survive stay in
/// the stand-ins: were one of them made kinder, the tests above could pass
/// on scripts that fail on OmniOS.
#[test]
fn the_stand_ins_keep_the_unfriendly_parts_of_illumos() {
    let sys = Sys::new("unfriendly", SysOptions::default());
    let run = |prog: &str, args: &[&str]| {
        let out = sys.command(prog).args(args).output().unwrap();
        (out.status.code(), text(&out))
    };

    // update_drv -d without -f, a controller attached through the alias:
    // the binding file loses the entry, the kernel keeps the binding, and
    // update_drv fails (update_drv(8), -f).
    let (rc, out) = run("update_drv", &["-d", "-i", "\"pci1af4,1004\"", "vioscsi"]);
    assert_eq!(rc, Some(1), "{out}");
    assert!(
        out.contains("One or more devices remain in use for driver vioscsi."),
        "{out}"
    );
    assert_eq!(sys.alias_owner("pci1af4,1004"), None, "the file lost it");
    assert!(
        sys.read(".kernel/aliases")
            .contains("vioscsi \"pci1af4,1004\""),
        "the kernel kept it"
    );
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), true));
    // ...and at the next boot the controller has no driver.
    sys.boot(true);
    assert_eq!(sys.node(TRANSITIONAL), ("-".into(), false));

    // An alias another driver holds in the file is refused by -a.
    let (rc, out) = run("update_drv", &["-a", "-i", "\"pci1af4,1001\"", "vioscsi"]);
    assert_ne!(rc, Some(0), "{out}");
    assert!(out.contains("already in use as a driver or alias"), "{out}");

    // pkg install of what is installed: exit 4.
    let (rc, out) = run("pkg", &["install", "-v", "driver/storage/vioscsi"]);
    assert_eq!(rc, Some(4), "{out}");
    assert!(
        out.contains("No updates necessary for this image."),
        "{out}"
    );

    // SysV install searches its operands and the system directories and
    // overwrites the first same-named file it finds.
    write(&sys.path("usr/lib/LICENSE"), "the system's own\n");
    let src = sys.path("var/tmp/LICENSE");
    write(&src, "rvscsi's\n");
    let dest = sys.path("var/tmp/proto/LICENSE");
    let (rc, out) = run(
        "install",
        &["-m", "0444", src.to_str().unwrap(), dest.to_str().unwrap()],
    );
    assert_eq!(rc, Some(0), "{out}");
    assert_eq!(sys.read("usr/lib/LICENSE"), "rvscsi's\n", "overwritten");
    assert!(!dest.exists(), "{out}");
    let (rc, out) = run(
        "install",
        &[
            "-m",
            "0444",
            src.to_str().unwrap().replace("LICENSE", "NOTICE").as_str(),
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(rc, Some(2), "{out}");
    assert!(out.contains("NOTICE was not found anywhere!"), "{out}");

    // GNU ld first on PATH: -N is --omagic.
    let (rc, out) = run("ld", &["-ztype=kmod", "-N", "misc/scsi", "-o", "x", "y.a"]);
    assert_eq!(rc, Some(1), "{out}");
    assert!(out.contains("cannot find misc/scsi"), "{out}");

    // clang-sys with LIBCLANG_PATH set searches only there.
    let out = sys
        .command("cargo")
        .args(["rustc", "--target", "x.json"])
        .env("CARGO_TARGET_DIR", sys.path("var/tmp/t"))
        .env("LIBCLANG_PATH", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101), "{}", text(&out));
}

/// What pkg(1), rem_drv(8), modunload(8) and a boot do, as pkg5 and
/// illumos-gate have them (see each stand-in's header for the source).
#[test]
fn the_stand_ins_model_boot_environments_detach_and_binding_at_boot() {
    let sys = Sys::new("be", SysOptions::default());
    let run = |prog: &str, args: &[&str]| {
        let out = sys.command(prog).args(args).output().unwrap();
        (out.status.code(), text(&out))
    };
    let archive = package_archive(&sys);
    let a = archive.to_str().unwrap();

    // A new install of a reboot-needed file: in place, no BE.
    let (rc, out) = run("pkg", &["install", "-v", "-g", a, "driver/storage/rvscsi"]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(out.contains("Create boot environment:  No"), "{out}");
    assert!(!out.contains("New BE"), "{out}");
    assert!(sys.read("etc/name_to_major").contains("rvscsi "));

    // Binding at every boot: a plain boot (no -r, no /reconfigure) binds
    // the controller from driver_aliases, whatever path_to_inst says.
    assert!(!sys.path("reconfigure").exists());
    assert!(sys.read("etc/path_to_inst").contains("\"vioscsi\""));
    let (rc, out) = run(
        "update_drv",
        &["-f", "-d", "-i", "\"pci1af4,1004\"", "vioscsi"],
    );
    assert_eq!(rc, Some(0), "{out}");
    let (rc, out) = run("update_drv", &["-a", "-i", "\"pci1af4,1004\"", "rvscsi"]);
    assert_eq!(rc, Some(0), "{out}");
    assert_eq!(sys.node(TRANSITIONAL), ("vioscsi".into(), true));
    sys.boot(false);
    assert_eq!(sys.node(TRANSITIONAL), ("rvscsi".into(), true));

    // modunload: refused while a disk behind an instance is open (EBUSY);
    // otherwise every instance detaches and stays bound; devfsadm -i
    // attaches them again.
    let id = sys
        .read(".kernel/modules")
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("rvscsi"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .expect("rvscsi loaded");
    let nodes = sys.read(".kernel/nodes");
    write(
        &sys.path(".kernel/nodes"),
        &nodes.replace("rvscsi 1 0", "rvscsi 1 1"),
    );
    let (rc, out) = run("modunload", &["-i", &id]);
    assert_eq!(rc, Some(1), "{out}");
    assert!(out.contains("Device busy"), "{out}");
    assert_eq!(sys.node(TRANSITIONAL), ("rvscsi".into(), true));
    write(&sys.path(".kernel/nodes"), &nodes);
    let (rc, out) = run("modunload", &["-i", &id]);
    assert_eq!(rc, Some(0), "{out}");
    assert_eq!(sys.node(TRANSITIONAL), ("rvscsi".into(), false));
    assert!(!sys.read(".kernel/modules").contains("rvscsi"));
    let (rc, out) = run("devfsadm", &["-i", "rvscsi"]);
    assert_eq!(rc, Some(0), "{out}");
    assert_eq!(sys.node(TRANSITIONAL), ("rvscsi".into(), true));

    // rem_drv -b, even -b /, leaves the running kernel alone.
    let (rc, out) = run("rem_drv", &["-b", "/", "vioblk"]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(!sys.read("etc/name_to_major").contains("vioblk"));
    assert!(sys.read(".kernel/aliases").contains("vioblk"));
    assert_eq!(sys.node(ROOT_BLK), ("vioblk".into(), true));

    // pkg uninstall of a reboot-needed file: a new BE, activated; the
    // running system unchanged until the boot into it.
    let (rc, out) = run("pkg", &["uninstall", "-v", "driver/storage/rvscsi"]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(out.contains("Create boot environment: Yes"), "{out}");
    assert!(out.contains("New BE: omnios-r151054-1"), "{out}");
    assert!(sys.read("etc/name_to_major").contains("rvscsi "));
    assert!(sys.path("kernel/drv/amd64/rvscsi").exists());
    assert_eq!(
        boot_environments(&sys),
        ("omnios-r151054".into(), "omnios-r151054-1".into())
    );
    sys.boot(false);
    assert!(!sys.read("etc/name_to_major").contains("rvscsi "));
    assert!(!sys.path("kernel/drv/amd64/rvscsi").exists());
    // rvscsi held the alias in the clone too: rem_drv dropped it, so the
    // controller has no driver now (why the man page says release first).
    assert_eq!(sys.node(TRANSITIONAL), ("-".into(), false));
    // The BE it left is kept, with rvscsi in it.
    assert!(
        sys.read(".be/root/omnios-r151054/etc/name_to_major")
            .contains("rvscsi ")
    );
    let _ = std::fs::remove_file(&archive);
}

/// install-deps.sh installs through illumos_pkg_install
/// (pkg/kernel/illumos.sh): one place that knows pkg's exit 4.
#[test]
fn illumos_pkg_install_is_what_install_deps_uses() {
    let sys = Sys::new("pkg-install", SysOptions::default());
    let run = |pkgs: &str| {
        let out = sys
            .command("bash")
            .arg("-c")
            .arg(format!(
                ". {}; illumos_pkg_install {pkgs}",
                root().join("pkg/kernel/illumos.sh").display()
            ))
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    let (rc, out) = run("driver/storage/vioscsi");
    assert_eq!(rc, Some(0), "exit 4 is success: {out}");
    let (rc, out) = run("no/such/package");
    assert_eq!(rc, Some(1), "{out}");
    assert!(
        out.contains("pkg install no/such/package failed (exit 1)"),
        "{out}"
    );
    let script = std::fs::read_to_string(root().join("test/scripts/install-deps.sh")).unwrap();
    assert!(
        script.contains("illumos_pkg_install \"${need[@]}\""),
        "install-deps.sh uses illumos_pkg_install"
    );
    assert!(
        !script.contains("pkg install -v"),
        "and has no pkg install of its own"
    );
}
