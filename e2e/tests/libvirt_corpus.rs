//! libvirt's own test XML through `vireo import-xml`, and hostile input
//! through the parsers.
//!
//! `libvirt_test_xml_imports_applies_and_round_trips` takes every domain
//! description of the `tests/*xml2*xml*/` directories of the libvirt source
//! package of this machine's Debian release (fetched and cached by
//! `scripts/libvirt-testdata.sh`, never stored in the repository) and runs
//! the `vireo import-xml` binary on each: imported, refused with a one-line
//! error, or crashed (a signal, a panic, a hang, an error of several lines).
//! Each imported manifest goes to a real kube-apiserver as a server-side
//! dry-run create (what `kubectl apply --dry-run=server` sends); its
//! `dumpxml` XML goes to real `virsh define` on libvirt's test driver (an
//! empty node: `test:///default`'s own domain `test` would refuse every
//! other domain of that name), and what
//! virsh then dumps is compared with the manifest: name, UUID, memory,
//! vCPUs, disks and interfaces. It asserts no crash and at least 95% of the
//! imported manifests accepted by the API server, and prints the figures.

mod common;

use common::run::{error_lines, run, vireo};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use vireo_crds::libvirt_xml::{ImportOptions, domain_to_xml, from_xml, libvirt_name};
use vireo_crds::{Domain, Manifest};

/// libvirt's test data, or None (with a SKIP line) when it cannot be had
/// outside CI.
fn corpus() -> Option<PathBuf> {
    let out = Command::new("bash")
        .arg(common::repo().join("scripts/libvirt-testdata.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/libvirt-testdata.sh runs");
    if !out.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "scripts/libvirt-testdata.sh failed"
        );
        eprintln!("SKIP: libvirt's test data cannot be fetched here");
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(PathBuf::from(
        text.lines().last().unwrap_or_default().trim(),
    ))
}

/// Every description of root element `root_tag` in `tests/*xml2*xml*/`,
/// sorted.
fn files_of(root: &Path, root_tag: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(root.join("tests"))
        .expect("tests/")
        .flatten()
    {
        let name = dir.file_name().to_string_lossy().into_owned();
        if !name.contains("xml2") || !name[name.find("xml2").unwrap_or(0) + 4..].contains("xml") {
            continue;
        }
        for f in std::fs::read_dir(dir.path()).expect("a test dir").flatten() {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "xml") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let body = text.trim_start();
            let open = format!("<{root_tag}");
            if body.starts_with(&format!("{open} ")) || body.starts_with(&format!("{open}>")) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// What survives a round trip, per field.
#[derive(Default)]
struct Survives {
    compared: usize,
    fields: BTreeMap<&'static str, usize>,
    lost: BTreeMap<&'static str, Vec<String>>,
}

impl Survives {
    fn check(&mut self, file: &str, field: &'static str, same: bool) {
        if same {
            *self.fields.entry(field).or_default() += 1;
        } else {
            let lost = self.lost.entry(field).or_default();
            if lost.len() < 3 {
                lost.push(file.to_string());
            }
        }
    }
}

/// What virsh makes of our dumpxml: defined and dumped again by libvirt's
/// own test driver, or its error.
fn virsh_round_trip(dir: &Path, i: usize, xml: &str, key: &str) -> Result<String, String> {
    let file = dir.join(format!("{i}.xml"));
    std::fs::write(&file, xml).expect("xml written");
    let quoted = key.replace('\\', "\\\\").replace('"', "\\\"");
    let script = format!("define {}\ndumpxml \"{quoted}\"\n", file.display());
    // libvirt's test driver on an empty node: test:///default's own
    // domain 'test' would refuse every other domain named test.
    let node = dir.join("node.xml");
    std::fs::write(&node, "<node/>\n").expect("node written");
    let mut child = Command::new("virsh")
        .args(["-q", "-c", &format!("test://{}", node.display())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("virsh runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(script.as_bytes()).expect("script");
    }
    let out = child.wait_with_output().expect("virsh finishes");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match stdout.find("<domain") {
        Some(at) if stderr.trim().is_empty() => Ok(stdout[at..].to_string()),
        // virsh's second line says why ("error: Failed to define domain
        // from FILE" first).
        _ => Err(stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .to_string()),
    }
}

/// A one-line summary of reasons: the most frequent first.
fn top(reasons: &BTreeMap<String, usize>, n: usize) -> String {
    let mut v: Vec<(&String, &usize)> = reasons.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .take(n)
        .map(|(r, c)| format!("{c} × {r}"))
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// The reason of an error, without the values that differ per file.
fn reason_of(e: &str) -> String {
    let e = e.trim_start_matches("error: ");
    let e = e.split_once(".xml: ").map_or(e, |(_, r)| r);
    e.chars().take(110).collect()
}

#[test]
fn libvirt_test_xml_imports_applies_and_round_trips() {
    let Some(root) = corpus() else { return };
    let files = files_of(&root, "domain");
    assert!(files.len() > 400, "{} domain files", files.len());
    let started = Instant::now();
    let vireo = vireo();
    let work = std::env::temp_dir().join(format!("vireo-corpus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");

    // 1. import-xml, the binary, on every file.
    let mut imported: Vec<(String, Domain)> = Vec::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    let mut crashed: Vec<String> = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    for path in &files {
        let short = path
            .strip_prefix(root.join("tests"))
            .unwrap_or(path)
            .display()
            .to_string();
        let r = run(
            Command::new(&vireo).arg("import-xml").arg(path),
            Duration::from_secs(20),
        );
        if r.took > slowest.0 {
            slowest = (r.took, short.clone());
        }
        let errors = error_lines(&r.stderr);
        match r.code {
            Some(0) => {
                let d: Domain =
                    serde_yaml_ng::from_str(&r.stdout).expect("import-xml prints a Domain");
                imported.push((short, d));
            }
            Some(1) if errors.len() == 1 => {
                *refused.entry(reason_of(errors[0])).or_default() += 1;
            }
            code => crashed.push(format!(
                "{short}: exit {code:?} after {:?}: {}",
                r.took,
                r.stderr.lines().take(3).collect::<Vec<_>>().join(" | ")
            )),
        }
    }
    let import_took = started.elapsed();
    let mut arches: BTreeMap<String, usize> = BTreeMap::new();
    for (_, d) in &imported {
        *arches.entry(d.spec.arch().to_string()).or_default() += 1;
    }

    // The networks, pools and volumes of the same directories: imported or
    // refused with one line, never a crash.
    let mut others = String::new();
    for tag in ["network", "pool", "volume"] {
        let (mut ok, mut no, mut crash) = (0, 0, 0);
        for path in files_of(&root, tag) {
            let r = run(
                Command::new(&vireo)
                    .args(["import-xml", "--pool", "default"])
                    .arg(&path),
                Duration::from_secs(20),
            );
            match r.code {
                Some(0) => ok += 1,
                Some(1) if error_lines(&r.stderr).len() == 1 => no += 1,
                code => {
                    crash += 1;
                    crashed.push(format!("{}: exit {code:?}: {}", path.display(), r.stderr));
                }
            }
        }
        others += &format!(" {tag}s {ok}/{no}/{crash}");
    }

    // 2. A real kube-apiserver: a server-side dry-run create of each.
    let cluster = common::Cluster::start("libvirt-corpus");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut accepted = 0usize;
    let mut apiserver_refused: BTreeMap<String, usize> = BTreeMap::new();
    rt.block_on(async {
        let client = cluster.client().await;
        let api: Api<Domain> = Api::namespaced(client, "default");
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        for (short, d) in &imported {
            match api.create(&dry, d).await {
                Ok(_) => accepted += 1,
                Err(e) => {
                    let e = e.to_string();
                    eprintln!("[corpus] apiserver refused {short}: {e}");
                    let reason = e
                        .split_once("is invalid: ")
                        .map_or(e.as_str(), |(_, r)| r)
                        .chars()
                        .take(110)
                        .collect();
                    *apiserver_refused.entry(reason).or_default() += 1;
                }
            }
        }
    });
    drop(cluster);

    // 3. dumpxml through real virsh on libvirt's test driver, and back.
    let mut virsh_ok = 0usize;
    let mut virsh_refused: BTreeMap<String, usize> = BTreeMap::new();
    let mut survives = Survives::default();
    for (i, (short, d)) in imported.iter().enumerate() {
        let xml = domain_to_xml(d);
        let name = libvirt_name(&d.metadata);
        let key = d.spec.uuid.clone().unwrap_or_else(|| name.clone());
        let back = match virsh_round_trip(&work, i, &xml, &key) {
            Ok(back) => back,
            Err(e) => {
                *virsh_refused.entry(reason_of(&e)).or_default() += 1;
                continue;
            }
        };
        virsh_ok += 1;
        let Ok(Manifest::Domain(e)) =
            from_xml(&back, &ImportOptions::default()).map(|i| i.manifest)
        else {
            survives.check(short, "virsh's XML imports again", false);
            continue;
        };
        survives.compared += 1;
        let (a, b) = (&d.spec, &e.spec);
        survives.check(short, "name", libvirt_name(&e.metadata) == name);
        survives.check(short, "uuid", a.uuid.is_none() || a.uuid == b.uuid);
        survives.check(
            short,
            "memory",
            a.memory == b.memory
                && a.current_memory.as_ref().unwrap_or(&a.memory)
                    == b.current_memory.as_ref().unwrap_or(&b.memory),
        );
        survives.check(
            short,
            "vcpus",
            a.vcpus == b.vcpus && a.max_vcpus.unwrap_or(a.vcpus) == b.max_vcpus.unwrap_or(b.vcpus),
        );
        survives.check(short, "arch", a.arch() == b.arch());
        survives.check(short, "disks", a.devices.disks == b.devices.disks);
        survives.check(
            short,
            "interfaces",
            a.devices.interfaces == b.devices.interfaces,
        );
    }
    let _ = std::fs::remove_dir_all(&work);

    let n = files.len();
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    let mut report = format!(
        "libvirt corpus: {} ({n} domain descriptions), {:.0} s in all, import-xml {:.1} s (slowest {:?}: {})\n",
        std::fs::read_to_string(root.join("SOURCE"))
            .unwrap_or_default()
            .trim(),
        started.elapsed().as_secs_f64(),
        import_took.as_secs_f64(),
        slowest.0,
        slowest.1,
    );
    report += &format!(
        "  imported {} / refused with a one-line error {} / crashed {}\n",
        imported.len(),
        refused.values().sum::<usize>(),
        crashed.len()
    );
    report += &format!("  refusals:\n    {}\n", top(&refused, 12));
    report += &format!(
        "  architectures kept: {}\n",
        arches
            .iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    report += &format!("  imported/refused/crashed:{others}\n");
    report += &format!(
        "  kube-apiserver (server-side dry run): accepted {accepted} of {} imported ({:.1}%)\n",
        imported.len(),
        pct(accepted, imported.len())
    );
    if !apiserver_refused.is_empty() {
        report += &format!("    {}\n", top(&apiserver_refused, 8));
    }
    report += &format!(
        "  virsh define (libvirt's test driver, empty node) of dumpxml: accepted {virsh_ok} of {} ({:.1}%)\n",
        imported.len(),
        pct(virsh_ok, imported.len())
    );
    if !virsh_refused.is_empty() {
        report += &format!("    {}\n", top(&virsh_refused, 8));
    }
    report += &format!(
        "  round trip through virsh ({} compared):",
        survives.compared
    );
    for field in [
        "name",
        "uuid",
        "memory",
        "vcpus",
        "arch",
        "disks",
        "interfaces",
    ] {
        report += &format!(
            " {field} {}",
            survives.fields.get(field).copied().unwrap_or(0)
        );
    }
    report += "\n";
    for (field, files) in &survives.lost {
        report += &format!("    {field} differs in e.g. {}\n", files.join(", "));
    }
    eprintln!("{report}");
    for c in &crashed {
        eprintln!("CRASHED {c}");
    }
    assert!(crashed.is_empty(), "{} crashed", crashed.len());
    assert!(
        pct(accepted, imported.len()) >= 95.0,
        "the API server accepts {accepted} of {} imported",
        imported.len()
    );
    // What is measured at 100% stays there: virsh takes every dumpxml,
    // and the fields survive its round trip.
    assert_eq!(virsh_ok, imported.len(), "virsh refuses some dumpxml");
    assert!(survives.lost.is_empty(), "fields lost in the round trip");
}
