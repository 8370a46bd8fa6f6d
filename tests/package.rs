//! The IPS package as `pkg/build.sh` leaves it where the IPS tools are
//! absent: the proto area and the filled manifest (`target/pkg/`), the man
//! page, the configuration file, and `rvscsiadm`, which hands virtio-scsi
//! controllers from vioscsi to rvscsi and back (run here against scratch
//! driver databases and stand-ins for update_drv and friends).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One manifest action: its type, payload (if any) and attributes (a name
/// may repeat, as `alias=` does).
#[derive(Debug)]
struct Action {
    kind: String,
    payload: Option<String>,
    attrs: Vec<(String, String)>,
}

impl Action {
    fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.attrs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Splits a line into tokens, keeping quoted values whole (pkg(7)
/// manifest syntax: `key=value`, `key="value with spaces"`).
fn tokens(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_token = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_token = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in {line:?}"));
    }
    if in_token {
        out.push(cur);
    }
    Ok(out)
}

fn parse_manifest(text: &str) -> Result<Vec<Action>, String> {
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim_end();
        if cur.is_empty() && (t.trim_start().starts_with('#') || t.trim().is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            joined.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        return Err("the manifest ends in a continuation".into());
    }
    let mut actions = Vec::new();
    for line in joined {
        let toks = tokens(&line)?;
        let Some((kind, rest)) = toks.split_first() else {
            continue;
        };
        let mut a = Action {
            kind: kind.clone(),
            payload: None,
            attrs: Vec::new(),
        };
        for t in rest {
            match t.split_once('=') {
                Some((k, v)) if !k.is_empty() => a.attrs.push((k.into(), v.into())),
                _ if a.payload.is_none() => a.payload = Some(t.clone()),
                _ => return Err(format!("stray token {t:?} in {line:?}")),
            }
        }
        actions.push(a);
    }
    Ok(actions)
}

fn built_package() -> (Vec<Action>, PathBuf) {
    let dir = root().join("target/pkg");
    let text = std::fs::read_to_string(dir.join("rvscsi.p5m")).unwrap_or_else(|e| {
        panic!("target/pkg/rvscsi.p5m: {e}. pkg/build.sh (or pkg/package.sh) produces it; test/run.sh runs it first")
    });
    (
        parse_manifest(&text).expect("the manifest parses"),
        dir.join("proto"),
    )
}

fn crate_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

#[test]
fn the_manifest_names_the_package_as_omnios_packages_do() {
    let (actions, _) = built_package();
    let sets: BTreeMap<&str, Vec<&str>> = actions
        .iter()
        .filter(|a| a.kind == "set")
        .map(|a| (a.get("name").unwrap_or(""), a.all("value")))
        .collect();
    let fmri = sets["pkg.fmri"][0];
    let want = format!("/driver/storage/rvscsi@{},5.11-", crate_version());
    assert!(
        fmri.starts_with("pkg://") && fmri.contains(&want),
        "pkg.fmri {fmri}"
    );
    assert!(!fmri.contains("$("), "macros filled: {fmri}");
    for name in ["pkg.summary", "pkg.description"] {
        assert!(
            sets.get(name).is_some_and(|v| v[0].len() > 20),
            "{name} says something"
        );
    }
    assert_eq!(
        sets["info.classification"],
        ["org.opensolaris.category.2008:Drivers/Storage"]
    );
    assert_eq!(sets["variant.arch"], ["i386"]);
    assert_eq!(
        sets["variant.opensolaris.zone"],
        ["global"],
        "global zone only"
    );
}

#[test]
fn every_file_action_points_at_a_built_file_with_its_attributes() {
    let (actions, proto) = built_package();
    let dirs: Vec<&str> = actions
        .iter()
        .filter(|a| a.kind == "dir")
        .filter_map(|a| a.get("path"))
        .collect();
    let files: Vec<&Action> = actions.iter().filter(|a| a.kind == "file").collect();
    let paths: Vec<&str> = files.iter().filter_map(|a| a.get("path")).collect();
    for want in [
        "kernel/drv/amd64/rvscsi",
        "kernel/drv/rvscsi.conf",
        "usr/sbin/rvscsiadm",
        "usr/share/man/man4d/rvscsi.4d",
    ] {
        assert!(paths.contains(&want), "the package delivers {want}");
    }
    for f in files {
        let path = f.get("path").expect("file actions have a path");
        let src = proto.join(f.payload.as_deref().unwrap_or(path));
        let meta = std::fs::metadata(&src)
            .unwrap_or_else(|e| panic!("{path}: no built file at {}: {e}", src.display()));
        assert!(meta.len() > 0, "{path} is empty");
        for attr in ["owner", "group", "mode"] {
            assert!(f.get(attr).is_some(), "{path} has no {attr}");
        }
        let mode = f.get("mode").unwrap();
        assert!(
            mode.len() == 4 && u32::from_str_radix(mode, 8).is_ok(),
            "{path}: mode {mode}"
        );
        let parent = Path::new(path).parent().unwrap().to_str().unwrap();
        assert!(
            dirs.contains(&parent),
            "{path}: its directory {parent} is delivered"
        );
        let exec = u32::from_str_radix(mode, 8).unwrap() & 0o111 != 0;
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o111 != 0,
            exec,
            "{path}: the built file's execute bits match the manifest"
        );
    }
    let conf = actions
        .iter()
        .find(|a| a.kind == "file" && a.get("path") == Some("kernel/drv/rvscsi.conf"))
        .unwrap();
    assert_eq!(
        conf.get("preserve"),
        Some("renamenew"),
        "local edits survive updates"
    );
    let module = actions
        .iter()
        .find(|a| a.get("path") == Some("kernel/drv/amd64/rvscsi"))
        .unwrap();
    assert_eq!(
        (module.get("owner"), module.get("group")),
        (Some("root"), Some("sys"))
    );
    // The packaged module is the built (and checked) one.
    assert_eq!(
        std::fs::read(proto.join("kernel/drv/amd64/rvscsi")).unwrap(),
        std::fs::read(root().join("target/kernel/rvscsi")).unwrap()
    );
    let license = actions
        .iter()
        .find(|a| a.kind == "license")
        .expect("a license action");
    assert!(license.get("license").is_some());
    let lic = proto.join(license.payload.as_deref().expect("license payload"));
    assert!(
        std::fs::read_to_string(lic)
            .unwrap()
            .contains("Permission is hereby granted")
    );
}

/// The virtio-scsi PCI aliases rvscsiadm moves, from the script itself.
fn rvscsiadm_aliases() -> Vec<String> {
    let script = std::fs::read_to_string(root().join("pkg/rvscsiadm")).unwrap();
    let line = script
        .lines()
        .find(|l| l.starts_with("ALIASES="))
        .expect("ALIASES= in rvscsiadm");
    line.trim_start_matches("ALIASES=")
        .trim_matches('"')
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn is_pci_alias(a: &str) -> bool {
    let Some(rest) = a.strip_prefix("pci") else {
        return false;
    };
    let rest = rest.strip_suffix(",p").unwrap_or(rest);
    let Some((v, d)) = rest.split_once(',') else {
        return false;
    };
    let hex = |s: &str| {
        (1..=4).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    };
    hex(v) && hex(d)
}

#[test]
fn the_driver_action_and_the_virtio_scsi_aliases_are_well_formed_and_do_not_collide() {
    let (actions, _) = built_package();
    let drivers: Vec<&Action> = actions.iter().filter(|a| a.kind == "driver").collect();
    assert_eq!(drivers.len(), 1);
    let d = drivers[0];
    assert_eq!(d.get("name"), Some("rvscsi"));
    assert_eq!(d.get("class"), Some("scsi-self-identifying"));
    // Every alias a driver action carries must be well formed, and none
    // may be one of vioscsi's: pkg(1) refuses to install two drivers that
    // share an alias.
    let aliases = rvscsiadm_aliases();
    for a in d.all("alias") {
        assert!(is_pci_alias(a), "driver alias {a}");
        assert!(
            !aliases.iter().any(|x| x == a),
            "{a} is vioscsi's: pkg would refuse"
        );
    }
    // The aliases rvscsiadm moves are virtio-scsi's, transitional and
    // modern (virtio 1.2 §4.1.2: 0x1040 + device id 8; transitional 0x1004).
    assert_eq!(aliases, ["pci1af4,1004", "pci1af4,1048,p"]);
    for a in &aliases {
        assert!(is_pci_alias(a), "{a}");
        let ids = a.trim_start_matches("pci").trim_end_matches(",p");
        let (v, dev) = ids.split_once(',').unwrap();
        assert_eq!(
            u16::from_str_radix(v, 16).unwrap(),
            rvscsi::virtio::VIRTIO_PCI_VENDOR
        );
        let dev = u16::from_str_radix(dev, 16).unwrap();
        assert!(
            dev == rvscsi::virtio::VIRTIO_PCI_MODERN_BASE + rvscsi::vioscsi::proto::VIRTIO_ID_SCSI
                || rvscsi::virtio::VIRTIO_PCI_TRANSITIONAL_RANGE.contains(&dev),
            "{a} names a virtio-scsi device id the driver accepts"
        );
    }
}

#[test]
fn the_man_page_is_lint_clean_and_documents_tunables_and_probes() {
    let page = root().join("pkg/rvscsi.4D");
    let out = Command::new("mandoc")
        .args(["-T", "lint", "-W", "style"])
        .arg(&page)
        .output()
        .expect("mandoc (test/scripts/install-deps.sh installs it)");
    let messages: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        // Facts about this machine, not the page: it has no illumos
        // manuals, and Debian's mandoc does not know illumos section names.
        .filter(|l| !l.contains("referenced manual not found"))
        .filter(|l| !l.contains("unknown manual section: Dt ... 4D"))
        .map(str::to_string)
        .collect();
    assert!(messages.is_empty(), "mandoc -T lint: {messages:#?}");
    let text = std::fs::read_to_string(&page).unwrap();
    let conf = std::fs::read_to_string(root().join("pkg/rvscsi.conf")).unwrap();
    // Every tunable the driver reads is documented in both places.
    let src = std::fs::read_to_string(root().join("src/vioscsi/hba.rs")).unwrap();
    let mut tunables = Vec::new();
    for piece in src.split("prop_").skip(1) {
        if let Some(name) = piece.split("c\"").nth(1).and_then(|s| s.split('"').next()) {
            if !tunables.contains(&name) {
                tunables.push(name);
            }
        }
    }
    assert!(
        tunables.len() >= 4,
        "tunables found in the driver: {tunables:?}"
    );
    for t in tunables {
        assert!(
            text.contains(&format!(".It Sy {t}")),
            "rvscsi.4D documents {t}"
        );
        assert!(
            conf.contains(&format!("#{t}=")),
            "rvscsi.conf documents {t}"
        );
    }
    // Every probe the driver fires is documented.
    let probes = std::fs::read_to_string(root().join("src/probes.rs")).unwrap();
    for name in probes
        .split("fn __dtrace_probe_")
        .skip(1)
        .filter_map(|s| s.split('(').next())
    {
        let d = name.replace("__", "-");
        assert!(
            text.contains(&format!(".It Sy {d}")),
            "rvscsi.4D documents probe {d}"
        );
    }
}

/// A scratch system for rvscsiadm: driver databases and stand-ins for
/// update_drv (with its refusal to give one alias to two drivers),
/// devfsadm, bootadm, zfs, zpool and ls.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str, root_device: Option<&str>) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rvscsiadm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let etc = dir.join("etc");
        let bin = dir.join("bin");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(
            etc.join("driver_aliases"),
            "sd \"scsiclass,00\"\nvioscsi \"pci1af4,1004\"\nvioscsi \"pci1af4,1048,p\"\nvioblk \"pci1af4,1001\"\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("name_to_major"),
            "sd 32\nvioscsi 286\nvioblk 287\nrvscsi 300\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("path_to_inst"),
            "\"/pci@0,0/pci1af4,2@3\" 0 \"vioblk\"\n\"/pci@0,0/pci1af4,8@4\" 0 \"vioscsi\"\n",
        )
        .unwrap();
        let log = dir.join("calls.log");
        let stub = |name: &str, body: &str| {
            let p = bin.join(name);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >> '{}'\n{body}\n",
                    log.display()
                ),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // update_drv -a|-d -i '"a" "b"' driver, on $RVSCSIADM_ETC.
        stub(
            "update_drv",
            r#"db="$RVSCSIADM_ETC/driver_aliases"
op=$1; shift; [ "$1" = "-i" ] || exit 9; list=$2; drv=$3
for a in $(echo "$list" | tr -d '"'); do
  owner=$(awk -v a="\"$a\"" '$2 == a { print $1 }' "$db")
  if [ "$op" = "-a" ]; then
    if [ -n "$owner" ] && [ "$owner" != "$drv" ]; then echo "($a) already in use as a driver or alias." >&2; exit 1; fi
    [ -n "$owner" ] || echo "$drv \"$a\"" >> "$db"
  else
    awk -v a="\"$a\"" -v d="$drv" '!($1 == d && $2 == a)' "$db" > "$db.new" && mv "$db.new" "$db"
  fi
done"#,
        );
        stub("devfsadm", "exit 0");
        stub("bootadm", "exit 0");
        if let Some(dev) = root_device {
            stub("zfs", "echo rpool/ROOT/omnios");
            stub(
                "zpool",
                "printf '  pool: rpool\\n config:\\n\\trpool  ONLINE\\n\\t  /dev/dsk/c1t0d0s0  ONLINE  0 0 0\\n'",
            );
            stub(
                "ls",
                &format!(
                    "case \"$2\" in /dev/dsk/*) echo \"lrwxrwxrwx 1 root root 50 Jan 1 00:00 $2 -> ../../devices{dev}:a\" ;; *) exec /bin/ls \"$@\" ;; esac"
                ),
            );
        }
        Scratch { dir }
    }

    fn run(&self, args: &[&str]) -> (i32, String) {
        let path = format!("{}:/usr/bin:/bin", self.dir.join("bin").display());
        let out = Command::new("sh")
            .arg(root().join("pkg/rvscsiadm"))
            .args(args)
            .env("RVSCSIADM_ETC", self.dir.join("etc"))
            .env("PATH", path)
            .output()
            .expect("sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    fn owners(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.dir.join("etc/driver_aliases"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("pci1af4,10"))
            .filter_map(|l| l.split_once(' '))
            .map(|(d, a)| (a.trim_matches('"').to_string(), d.to_string()))
            .filter(|(a, _)| a != "pci1af4,1001")
            .collect()
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls.log")).unwrap_or_default()
    }
}

fn owned_by(s: &Scratch, driver: &str) -> bool {
    let o = s.owners();
    o.len() == 2 && o.iter().all(|(_, d)| d == driver)
}

#[test]
fn rvscsiadm_moves_the_aliases_to_rvscsi_and_back_when_the_root_pool_is_elsewhere() {
    let s = Scratch::new("virtio-blk-root", Some("/pci@0,0/pci1af4,2@3/blkdev@0,0"));
    let (rc, out) = s.run(&["status"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("pci1af4,1004") && out.contains("vioscsi"),
        "{out}"
    );
    let (rc, out) = s.run(&["take"]);
    assert_eq!(rc, 0, "{out}");
    assert!(owned_by(&s, "rvscsi"), "after take: {:?}", s.owners());
    let calls = s.calls();
    assert!(
        calls.contains("update_drv -d -i \"pci1af4,1004\" vioscsi"),
        "{calls}"
    );
    assert!(calls.contains("devfsadm -i rvscsi"), "{calls}");
    assert!(calls.contains("bootadm update-archive"), "{calls}");
    // Taking twice changes nothing.
    let (rc, _) = s.run(&["take"]);
    assert_eq!(rc, 0);
    assert!(owned_by(&s, "rvscsi"));
    let (rc, out) = s.run(&["release"]);
    assert_eq!(rc, 0, "{out}");
    assert!(owned_by(&s, "vioscsi"), "after release: {:?}", s.owners());
    assert!(s.calls().contains("devfsadm -i vioscsi"));
    // The unrelated alias is untouched.
    let db = std::fs::read_to_string(s.dir.join("etc/driver_aliases")).unwrap();
    assert!(db.contains("vioblk \"pci1af4,1001\"") && db.contains("sd \"scsiclass,00\""));
}

#[test]
fn rvscsiadm_refuses_to_take_the_root_pool_controller_without_force() {
    let s = Scratch::new(
        "virtio-scsi-root",
        Some("/pci@0,0/pci1af4,8@4/iport@iport0/disk@0,0"),
    );
    let (rc, out) = s.run(&["take"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("root pool is on a virtio-scsi controller"),
        "{out}"
    );
    assert!(owned_by(&s, "vioscsi"), "nothing moved: {:?}", s.owners());
    assert!(!s.calls().contains("update_drv"), "no update_drv call");
    let (rc, out) = s.run(&["take", "-f"]);
    assert_eq!(rc, 0, "{out}");
    assert!(owned_by(&s, "rvscsi"));
}

#[test]
fn rvscsiadm_refuses_what_it_cannot_check_or_should_not_touch() {
    // No way to find the root pool: refuse unless forced.
    let s = Scratch::new("unknown-root", None);
    let (rc, out) = s.run(&["take"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("cannot tell where the root pool is"), "{out}");
    assert!(owned_by(&s, "vioscsi"));
    // rvscsi not installed.
    let s = Scratch::new("not-installed", Some("/pci@0,0/pci1af4,2@3/blkdev@0,0"));
    std::fs::write(s.dir.join("etc/name_to_major"), "vioscsi 286\n").unwrap();
    let (rc, out) = s.run(&["take"]);
    assert_eq!(rc, 1);
    assert!(out.contains("driver rvscsi is not installed"), "{out}");
    assert!(owned_by(&s, "vioscsi"));
    // An alias owned by a third driver is left alone.
    let s = Scratch::new("third", Some("/pci@0,0/pci1af4,2@3/blkdev@0,0"));
    std::fs::write(
        s.dir.join("etc/driver_aliases"),
        "vioscsi \"pci1af4,1004\"\nother \"pci1af4,1048,p\"\n",
    )
    .unwrap();
    let (rc, out) = s.run(&["take"]);
    assert_eq!(rc, 1);
    assert!(out.contains("belongs to other"), "{out}");
    // Usage.
    assert_eq!(s.run(&[]).0, 2);
    assert_eq!(s.run(&["frob"]).0, 2);
    assert_eq!(s.run(&["take", "-x"]).0, 2);
}
