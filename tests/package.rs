//! The IPS package as `pkg/build.sh` leaves it where the IPS tools are
//! absent: the proto area and the filled manifest (`target/pkg/`), the man
//! page and the configuration file. `rvscsiadm`, which hands virtio-scsi
//! controllers from vioscsi and VMware PVSCSI controllers from pvscsi to
//! rvscsi and back, is run against a scratch illumos system in
//! tests/omnios_scripts.rs.

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
        // It drives both families.
        for family in ["virtio-scsi", "PVSCSI"] {
            assert!(sets[name][0].contains(family), "{name} names {family}");
        }
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

/// The aliases rvscsiadm moves and the in-tree driver each is taken from,
/// from the script's own table (`HANDOVER`, one "ALIAS DRIVER" a line).
fn rvscsiadm_handover() -> Vec<(String, String)> {
    let script = std::fs::read_to_string(root().join("pkg/rvscsiadm")).unwrap();
    let start = script
        .find("\nHANDOVER=\"")
        .expect("HANDOVER=\" in rvscsiadm")
        + "\nHANDOVER=\"".len();
    let len = script[start..]
        .find('"')
        .expect("the table's closing quote");
    script[start..start + len]
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 2, "HANDOVER line {l:?}");
            (f[0].to_string(), f[1].to_string())
        })
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
fn the_driver_action_and_the_handed_over_aliases_are_well_formed_and_do_not_collide() {
    let (actions, _) = built_package();
    let drivers: Vec<&Action> = actions.iter().filter(|a| a.kind == "driver").collect();
    assert_eq!(drivers.len(), 1);
    let d = drivers[0];
    assert_eq!(d.get("name"), Some("rvscsi"));
    assert_eq!(d.get("class"), Some("scsi-self-identifying"));
    // The aliases rvscsiadm moves: virtio-scsi's, transitional and modern
    // (virtio 1.2 4.1.2: 0x1040 + device id 8; transitional 0x1004), from
    // vioscsi; VMware PVSCSI's, from pvscsi (the gate's
    // driver-storage-pvscsi.p5m declares pci15ad,7c0).
    let handover = rvscsiadm_handover();
    let pairs: Vec<(&str, &str)> = handover
        .iter()
        .map(|(a, d)| (a.as_str(), d.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("pci1af4,1004", "vioscsi"),
            ("pci1af4,1048,p", "vioscsi"),
            ("pci15ad,7c0", "pvscsi"),
        ]
    );
    // Every alias a driver action carries must be well formed, and none
    // may be one that vioscsi or pvscsi declares: pkg(1) refuses to
    // install two drivers that share an alias.
    for a in d.all("alias") {
        assert!(is_pci_alias(a), "driver alias {a}");
        if let Some((_, owner)) = handover.iter().find(|(x, _)| x == a) {
            panic!("{a} is {owner}'s: pkg would refuse");
        }
    }
    for (a, _) in &handover {
        assert!(is_pci_alias(a), "{a}");
        let ids = a.trim_start_matches("pci").trim_end_matches(",p");
        let (v, dev) = ids.split_once(',').unwrap();
        let v = u16::from_str_radix(v, 16).unwrap();
        let dev = u16::from_str_radix(dev, 16).unwrap();
        if v == rvscsi::pvscsi::PCI_VENDOR_VMWARE {
            assert_eq!(
                dev,
                rvscsi::pvscsi::PCI_DEVICE_PVSCSI,
                "{a} names the PVSCSI device the driver attaches"
            );
            continue;
        }
        assert_eq!(v, rvscsi::virtio::VIRTIO_PCI_VENDOR, "{a}");
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
    // Every tunable the driver reads, of either family or of the shared
    // core, is documented in both places.
    let src: String = [
        "src/vioscsi/device.rs",
        "src/pvscsi/device.rs",
        "src/hba/intr.rs",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
    .collect();
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
    // Every statistic of its kstats is documented (the names of the
    // stat_set! blocks: `Variant = c"name",`).
    let kstats = std::fs::read_to_string(root().join("src/ddi/kstat.rs")).unwrap();
    let mut stats = Vec::new();
    for block in kstats.split("stat_set! {").skip(1) {
        let body = block.split("\n}\n").next().unwrap_or("");
        for piece in body.split(" = c\"").skip(1) {
            if let Some(name) = piece.split('"').next() {
                stats.push(name.to_string());
            }
        }
    }
    assert!(stats.len() >= 20, "statistics found: {stats:?}");
    let documented: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(".It Sy "))
        .flat_map(|l| l.split(" , "))
        .map(str::trim)
        .collect();
    for s in &stats {
        assert!(
            documented.contains(&s.as_str()),
            "rvscsi.4D documents statistic {s}"
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

#[test]
fn the_manifest_marks_the_module_and_the_man_page_as_illumos_marks_its_own() {
    let (actions, _) = built_package();
    let by_path = |p: &str| {
        actions
            .iter()
            .find(|a| a.get("path") == Some(p))
            .unwrap_or_else(|| panic!("no action for {p}"))
    };
    // usr/src/pkg/transforms/defaults: every kernel file but .conf is
    // reboot-needed, so that pkg update puts a new module in a new boot
    // environment instead of replacing a loaded driver in place.
    assert_eq!(
        by_path("kernel/drv/amd64/rvscsi").get("reboot-needed"),
        Some("true")
    );
    assert_eq!(by_path("kernel/drv/rvscsi.conf").get("reboot-needed"), None);
    // usr/src/pkg/transforms/facets: everything under usr/share/man.
    for p in ["usr/share/man/man4d", "usr/share/man/man4d/rvscsi.4d"] {
        assert_eq!(by_path(p).get("facet.doc.man"), Some("true"), "{p}");
    }
    // The header names the script that fills the macros.
    let src = std::fs::read_to_string(root().join("pkg/rvscsi.p5m")).unwrap();
    let header: String = src
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        header.contains("pkg/package.sh") && header.contains("fills the macros"),
        "{header}"
    );
}

#[test]
fn the_man_page_covers_uninstalling_and_what_pkg_verify_reports() {
    let text = std::fs::read_to_string(root().join("pkg/rvscsi.4D")).unwrap();
    assert!(
        text.lines().any(|l| l == ".Os illumos"),
        "the page names its system"
    );
    let section = |name: &str| -> String {
        let start = text
            .find(&format!(".Ss {name}"))
            .or_else(|| text.find(&format!(".Sh {name}")))
            .unwrap_or_else(|| panic!("rvscsi.4D has no section {name:?}"));
        let rest = &text[start + 4..];
        let end = rest
            .find("\n.Ss ")
            .into_iter()
            .chain(rest.find("\n.Sh "))
            .min()
            .unwrap_or(rest.len());
        rest[..end].to_string()
    };
    let uninstall = section("Uninstalling");
    // The order matters: release, reboot, then pkg uninstall (whose
    // driver action runs rem_drv, dropping every alias rvscsi holds).
    let pos = |needle: &str| {
        uninstall
            .find(needle)
            .unwrap_or_else(|| panic!("Uninstalling says {needle:?}:\n{uninstall}"))
    };
    assert!(pos("rvscsiadm Cm release") < pos("reboot"));
    assert!(pos("reboot") < pos("Cm uninstall"));
    assert!(uninstall.contains("rem_drv"), "{uninstall}");
    // pkg uninstall removes a reboot-needed file, so it works in a new
    // boot environment (pkg5 actuator.py reboot_needed()): the page says
    // so, and that the reboot into it comes after the uninstall.
    assert!(
        pos("Cm uninstall") < uninstall.rfind(".Nm reboot").unwrap(),
        "a reboot after pkg uninstall:\n{uninstall}"
    );
    let flat = uninstall.replace('\n', " ");
    for needle in ["new boot environment", "reboot-needed", "New BE", "beadm"] {
        assert!(flat.contains(needle), "{needle:?}:\n{uninstall}");
    }
    // Binding happens at every boot: no reconfiguration boot is asked
    // for (devcfg.c bind_node at every boot).
    assert!(!text.contains("/reconfigure"), "no /reconfigure");
    assert!(!text.contains("Fl \\&- Fl r"), "no reboot -- -r");
    // The interrupt vectors: one per queue only with MSI-X and IRM
    // (apix); pcplusmp grants 2 MSI-X vectors (DDI_DEFAULT_MSIX_ALLOC,
    // i_ddi_get_msix_alloc_limit in usr/src/uts/common/os/ddi_intr_impl.c).
    let flat_all = text.replace('\n', " ");
    assert!(
        !flat_all.contains("each queue interrupts on its own vector"),
        "not true without IRM"
    );
    assert!(
        flat_all.contains("2 MSI-X vectors under pcplusmp"),
        "the man page says what pcplusmp grants"
    );
    // Binding: both families' aliases and in-tree drivers, and every
    // state rvscsiadm's status can print (from the script's state()).
    let binding = section("Binding to a controller");
    for needle in [
        "pci1af4,1004",
        "pci1af4,1048,p",
        "pci15ad,7c0",
        ".Xr vioscsi 4D",
        ".Xr pvscsi 4D",
    ] {
        assert!(binding.contains(needle), "{needle:?}:\n{binding}");
    }
    let script = std::fs::read_to_string(root().join("pkg/rvscsiadm")).unwrap();
    let state_fn = &script[script.find("\nstate() {").expect("state() in rvscsiadm")..];
    let state_fn = &state_fn[..state_fn.find("\n}\n").unwrap()];
    let mut states: Vec<&str> = state_fn
        .split("echo ")
        .skip(1)
        .map(|w| {
            w.split(|c: char| c == ';' || c.is_whitespace())
                .next()
                .unwrap()
        })
        .collect();
    states.sort_unstable();
    states.dedup();
    assert_eq!(
        states,
        [
            "in-tree",
            "in-tree-after-reboot",
            "mixed",
            "rvscsi",
            "rvscsi-after-reboot"
        ]
    );
    for st in states {
        assert!(
            binding.contains(&format!(".It Sy {st}\n")),
            "state {st} documented:\n{binding}"
        );
    }
    assert!(
        uninstall.contains(".Sy in-tree\n"),
        "Uninstalling waits for in-tree:\n{uninstall}"
    );
    let verify = section("Package verification");
    for needle in [
        "extra alias",
        "found in etc/driver_aliases",
        "missing from etc/driver_aliases",
        "vioscsi",
        "pvscsi",
    ] {
        assert!(verify.contains(needle), "{needle:?}:\n{verify}");
    }
}
