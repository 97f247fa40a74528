//! `cargo bench -p vireo-drivers --bench migration [-- --runs N]`: live
//! migration and save/restore of the Linux guest image (TCG) with 256 MiB
//! and 1 GiB of memory, a quarter of it filled with random bytes in a
//! tmpfs file before each measure, RUNS times each (default 3), through the
//! qemu driver and by hand, in the same run:
//!
//! * **Migration**: two "nodes" in network namespaces joined by a veth pair
//!   (10.78.0.1, 10.78.0.2). Vireo: `migrate_prepare` on the target,
//!   `migrate_perform` on the source, `migrate_finish`, `migrate_confirm`
//!   (wall time of the four; QEMU's downtime from the stats). By hand: the
//!   same QEMU command line (the driver's, read from /proc) started in each
//!   namespace, the target with `-incoming tcp:ADDR:PORT -S`, then QMP
//!   `migrate` on the source, `query-migrate` until completed and `cont`
//!   on the target (wall time from `migrate` to `cont`; QEMU's downtime).
//!   Same bandwidth (no cap) and downtime limit (300 ms) on both.
//! * **Save / restore** on the target node: Vireo `save_domain` and
//!   `restore_domain` beside QMP `stop` + `migrate "exec:cat > FILE"` and a
//!   QEMU started with `-incoming "exec:cat FILE"` until it runs.
//!
//! * **kvm** (after the qemu rows): the test guest under vireo-vmm with 256
//!   MiB, a quarter of it filled (`vireo.fill=64`), migrated RUNS times by
//!   the kvm driver between the same namespaces (stop-and-copy of its
//!   snapshot, docs/save-restore.md): prepare to confirm, and the downtime
//!   and bytes from the stats. There is no "by hand" column: vireo-vmm is
//!   driven only by the driver.
//!
//! `--only qemu` or `--only kvm` runs one part. No disk is copied (memory
//! and device state only). Needs root (network namespaces), QEMU for the
//! qemu rows and /dev/kvm for the kvm row. Prints a table and writes
//! `target/bench/migration.json`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vireo_crds::{Domain, DomainDevices, DomainSpec, DomainType, Lifecycle, OsSpec, RunStrategy};
use vireo_drivers::migration::MigrationParams;
use vireo_drivers::qemu::qmp::Qmp;
use vireo_drivers::{Connection, HypervisorDriver};

const TIMEOUT: Duration = Duration::from_secs(600);
const DOWNTIME_MS: u64 = 300;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
}

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("vireo-bench-mig-{tag}-{:x}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(format!("/run/netns/{}", self.0)).expect("namespace");
                // SAFETY: setns on a descriptor we own; moves this thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in the namespace")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn wait_for(log: &Path, needle: &str) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "no '{needle}' in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn domain(name: &str, image: &Path, mib: u64) -> Domain {
    let fill = mib / 4;
    Domain::new(
        name,
        DomainSpec {
            domain_type: DomainType::Qemu,
            arch: None,
            uuid: None,
            memory: k8s_openapi::apimachinery::pkg::api::resource::Quantity(format!("{mib}Mi")),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: Some(OsSpec {
                machine: None,
                kernel: Some(image.join("vmlinuz").display().to_string()),
                initrd: Some(image.join("initrd.img").display().to_string()),
                cmdline: Some(format!(
                    "console=ttyS0 quiet vireo.net=0 vireo.run=\"dd if=/dev/urandom of=/tmp/fill bs=1M count={fill} 2>/dev/null; echo FILL-DONE-$((40+2)); while :; do sleep 1; done\""
                )),
                ..Default::default()
            }),
            devices: DomainDevices::default(),
            cloud_init: None,
            run_strategy: RunStrategy::Manual,
            lifecycle: Lifecycle::default(),
            node_selector: None,
            eviction_strategy: None,
        },
    )
}

fn qemu_driver(root: &Path) -> Connection {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).expect("root");
    vireo_drivers::open(&format!("qemu:///embed?root={}", root.display())).expect("qemu driver")
}

fn qmp(sock: &Path) -> Qmp {
    let start = Instant::now();
    loop {
        match Qmp::connect(sock, Duration::from_secs(30)) {
            Ok(q) => return q,
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                panic!("QMP {}: {e}", sock.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Polls query-migrate until completed; returns QEMU's downtime in ms.
fn wait_migrated(q: &mut Qmp) -> u64 {
    loop {
        let info = q.execute("query-migrate", None).expect("query-migrate");
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => {
                return info.get("downtime").and_then(|d| d.as_u64()).unwrap_or(0);
            }
            Some("failed") | Some("cancelled") => panic!("migration failed: {info}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn wait_status(q: &mut Qmp, want: &str) {
    let start = Instant::now();
    loop {
        let s = q.execute("query-status", None).expect("query-status");
        if s.get("status").and_then(|s| s.as_str()) == Some(want) {
            return;
        }
        assert!(start.elapsed() < TIMEOUT, "QEMU never reached {want}: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_pidfile(pidfile: &Path) {
    if let Ok(pid) = std::fs::read_to_string(pidfile) {
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The argv of a running QEMU.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("cmdline")
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Starts QEMU with `argv` (the driver's, run directory replaced by `dir`)
/// and `extra` arguments; returns the QMP socket.
fn start_by_hand(argv: &[String], from_dir: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let to = dir.display().to_string();
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| a.replace(from_dir, &to))
        .filter(|a| a != "-S")
        .collect();
    // Drop the driver's own -incoming defer, if any.
    let mut clean = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "-incoming" {
            it.next();
            continue;
        }
        clean.push(a);
    }
    let status = Command::new(&argv[0])
        .args(&clean)
        .args(extra)
        .stdin(Stdio::null())
        .status()
        .expect("qemu");
    assert!(status.success(), "QEMU by hand: {status}");
    dir.join("api.sock")
}

#[derive(Default)]
struct Samples {
    vireo_total: Vec<f64>,
    vireo_down: Vec<f64>,
    hand_total: Vec<f64>,
    hand_down: Vec<f64>,
    vireo_save: Vec<f64>,
    hand_save: Vec<f64>,
    vireo_restore: Vec<f64>,
    hand_restore: Vec<f64>,
}

#[derive(Default)]
struct KvmSamples {
    total: Vec<f64>,
    down: Vec<f64>,
    mib: Vec<f64>,
}

/// The kvm row: the test guest (built by vmm/guest/build.sh) under the kvm
/// driver, vireo-vmm found as the driver finds it (`VIREO_VMM`, or built
/// here with cargo into this target directory).
fn kvm_rows(
    a: &Netns,
    b: &Netns,
    base: &Path,
    params: &MigrationParams,
    runs: usize,
) -> KvmSamples {
    if std::env::var_os("VIREO_VMM").is_none() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "vireo-vmm", "--bin", "vireo-vmm"])
            .current_dir(repo())
            .status()
            .expect("cargo build -p vireo-vmm");
        assert!(status.success(), "cargo build -p vireo-vmm failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target"));
        // SAFETY (std): set before any driver reads it, on this thread only.
        unsafe { std::env::set_var("VIREO_VMM", target.join("debug/vireo-vmm")) };
    }
    let out = Command::new(repo().join("vmm/guest/build.sh"))
        .arg(base.join("guest"))
        .stderr(Stdio::inherit())
        .output()
        .expect("vmm/guest/build.sh");
    assert!(out.status.success(), "vmm/guest/build.sh failed");
    let elf = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    let mut def = domain("kbench", Path::new("/"), 256);
    def.spec.domain_type = DomainType::Kvm;
    def.spec.os = Some(OsSpec {
        kernel: Some(elf),
        cmdline: Some("console=ttyS0 vireo.fill=64 vireo.counter=1".into()),
        ..Default::default()
    });
    let mut k = KvmSamples::default();
    for run in 0..runs {
        let open = |node: &str| {
            let root = base.join(format!("kvm-{node}"));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).expect("root");
            vireo_drivers::open(&format!("kvm:///embed?root={}", root.display()))
                .expect("kvm driver")
        };
        let (ca, cb) = (open("a"), open("b"));
        let (ha, hb) = (ca.hypervisor(), cb.hypervisor());
        let name = "kbench";
        a.run(|| ha.create_domain(&def)).expect("start on A");
        let uuid = ha
            .lookup_domain(vireo_drivers::Lookup::Name(name))
            .expect("lookup")
            .uuid;
        let log = base.join("kvm-a/run").join(&uuid).join("console.log");
        wait_for(&log, "VIREO-TEST counter 1");
        let live = ha.domain_definition(name, false).expect("definition");
        let t = Instant::now();
        let incoming = b
            .run(|| hb.migrate_prepare(&live, params))
            .expect("prepare");
        let stats = a
            .run(|| ha.migrate_perform(name, &incoming, params))
            .expect("perform");
        b.run(|| hb.migrate_finish(name, true)).expect("finish");
        a.run(|| ha.migrate_confirm(name, true)).expect("confirm");
        let total = t.elapsed().as_secs_f64();
        k.total.push(total);
        k.down.push(stats.downtime_ms as f64);
        k.mib.push(stats.memory_bytes as f64 / f64::from(1 << 20));
        eprintln!(
            "migration: kvm 256 MiB run {}: {total:.2} s, downtime {} ms, {:.1} MiB sent",
            run + 1,
            stats.downtime_ms,
            stats.memory_bytes as f64 / f64::from(1 << 20)
        );
        let _ = hb.destroy_domain(name);
        let _ = hb.undefine_domain(name);
    }
    k
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut runs = 3usize;
    let mut only: Option<String> = None;
    while let Some(a) = args.next() {
        if a == "--runs" {
            runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(runs);
        } else if a == "--only" {
            only = args.next();
        }
    }
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("migration: needs root (network namespaces); not run");
        return;
    }
    let a = Netns::new("a");
    let b = Netns::new("b");
    let (va, vb) = (
        format!("vbma{:x}", std::process::id() % 0xffff),
        format!("vbmb{:x}", std::process::id() % 0xffff),
    );
    sh(
        "ip",
        &[
            "-n", &a.0, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &b.0,
        ],
    );
    for (ns, dev, addr) in [(&a, &va, "10.78.0.1/24"), (&b, &vb, "10.78.0.2/24")] {
        sh("ip", &["-n", &ns.0, "addr", "add", addr, "dev", dev]);
        sh("ip", &["-n", &ns.0, "link", "set", dev, "up"]);
    }
    let base = std::env::temp_dir().join(format!("vireo-bench-mig-{}", std::process::id()));
    let params = MigrationParams {
        target_address: "10.78.0.2".into(),
        copy_storage: false,
        max_downtime_ms: Some(DOWNTIME_MS),
        bandwidth_mib_s: None,
    };

    let mut table = Vec::new();
    let sizes: &[u64] = if wants("qemu") { &[256, 1024] } else { &[] };
    let image = if sizes.is_empty() {
        PathBuf::new()
    } else {
        let out = Command::new(repo().join("scripts/guest-image.sh"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("scripts/guest-image.sh");
        assert!(out.status.success(), "guest-image.sh failed");
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .trim(),
        )
    };
    for &mib in sizes {
        let mut s = Samples::default();
        for run in 0..runs {
            // --- Vireo ---
            let ca = qemu_driver(&base.join("a"));
            let cb = qemu_driver(&base.join("b"));
            let (ha, hb): (&dyn HypervisorDriver, &dyn HypervisorDriver) =
                (ca.hypervisor(), cb.hypervisor());
            let name = "bench";
            a.run(|| ha.create_domain(&domain(name, &image, mib)))
                .expect("start on A");
            let uuid = ha
                .lookup_domain(vireo_drivers::Lookup::Name(name))
                .expect("lookup")
                .uuid;
            let run_a = base.join("a/run").join(&uuid);
            wait_for(&run_a.join("console.log"), "FILL-DONE-42");
            let pid: u32 = std::fs::read_to_string(run_a.join("pid"))
                .expect("pid")
                .trim()
                .parse()
                .expect("pid");
            let argv = cmdline(pid);
            let def = ha.domain_definition(name, false).expect("definition");
            let t = Instant::now();
            let incoming = b
                .run(|| hb.migrate_prepare(&def, &params))
                .expect("prepare");
            let stats = a
                .run(|| ha.migrate_perform(name, &incoming, &params))
                .expect("perform");
            b.run(|| hb.migrate_finish(name, true)).expect("finish");
            a.run(|| ha.migrate_confirm(name, true)).expect("confirm");
            let total = t.elapsed().as_secs_f64();
            s.vireo_total.push(total);
            s.vireo_down.push(stats.downtime_ms as f64);
            eprintln!(
                "migration: {mib} MiB run {}: vireo {total:.2} s, downtime {} ms, {} MiB sent",
                run + 1,
                stats.downtime_ms,
                stats.memory_bytes >> 20
            );
            let file = base.join("vireo.save");
            let _ = std::fs::remove_file(&file);
            let t = Instant::now();
            b.run(|| hb.save_domain(name, &file)).expect("save");
            s.vireo_save.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            b.run(|| hb.restore_domain(&file)).expect("restore");
            s.vireo_restore.push(t.elapsed().as_secs_f64());
            let _ = hb.destroy_domain(name);
            let _ = hb.undefine_domain(name);
            let _ = std::fs::remove_file(&file);
            drop(ca);
            drop(cb);

            // --- By hand: the same command line ---
            let from = run_a.display().to_string();
            let hand_a = base.join("hand-a");
            let hand_b = base.join("hand-b");
            let sock_a = a.run(|| start_by_hand(&argv, &from, &hand_a, &[]));
            wait_for(&hand_a.join("console.log"), "FILL-DONE-42");
            let port = 49000 + (run as u16);
            let uri = format!("tcp:10.78.0.2:{port}");
            // Timed from the target's start, as the driver's prepare is.
            let t = Instant::now();
            let sock_b = b.run(|| start_by_hand(&argv, &from, &hand_b, &["-S", "-incoming", &uri]));
            let mut qa = qmp(&sock_a);
            let mut qb = qmp(&sock_b);
            qa.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": DOWNTIME_MS })),
            )
            .expect("parameters");
            qa.execute("migrate", Some(json!({ "uri": uri })))
                .expect("migrate");
            let down = wait_migrated(&mut qa);
            wait_status(&mut qb, "paused");
            qb.execute("cont", None).expect("cont");
            let total = t.elapsed().as_secs_f64();
            s.hand_total.push(total);
            s.hand_down.push(down as f64);
            eprintln!(
                "migration: {mib} MiB run {}: by hand {total:.2} s, downtime {down} ms",
                run + 1
            );
            kill_pidfile(&hand_a.join("pid"));
            // Save and restore by hand on B.
            let file = base.join("hand.save");
            let _ = std::fs::remove_file(&file);
            let t = Instant::now();
            qb.execute("stop", None).expect("stop");
            qb.execute(
                "migrate",
                Some(json!({ "uri": format!("exec:cat > {}", file.display()) })),
            )
            .expect("migrate to file");
            wait_migrated(&mut qb);
            s.hand_save.push(t.elapsed().as_secs_f64());
            drop(qb);
            kill_pidfile(&hand_b.join("pid"));
            let t = Instant::now();
            let incoming = format!("exec:cat {}", file.display());
            let sock_b = b.run(|| start_by_hand(&argv, &from, &hand_b, &["-incoming", &incoming]));
            let mut qb = qmp(&sock_b);
            // Saved stopped, so loaded stopped: `cont`, as the driver does.
            wait_status(&mut qb, "paused");
            qb.execute("cont", None).expect("cont");
            wait_status(&mut qb, "running");
            s.hand_restore.push(t.elapsed().as_secs_f64());
            drop(qb);
            drop(qa);
            kill_pidfile(&hand_b.join("pid"));
            let _ = std::fs::remove_file(&file);
        }
        table.push((mib, s));
    }

    let mut out = serde_json::Map::new();
    if !table.is_empty() {
        println!(
            "\nLive migration and save/restore, Linux guest under TCG, a quarter of memory filled with random bytes, no disk; {runs} runs each, median\n"
        );
        println!(
            "{:<8} {:<22} {:>10} {:>10} {:>7}",
            "memory", "measure", "vireo", "by hand", "ratio"
        );
    }
    for (mib, s) in &table {
        let rows = [
            ("migration total (s)", &s.vireo_total, &s.hand_total),
            ("QEMU downtime (ms)", &s.vireo_down, &s.hand_down),
            ("save (s)", &s.vireo_save, &s.hand_save),
            ("restore (s)", &s.vireo_restore, &s.hand_restore),
        ];
        let mut entry = serde_json::Map::new();
        for (what, v, h) in rows {
            let (mv, mh) = (median(v), median(h));
            let ratio = if mh > 0.0 { mv / mh } else { 0.0 };
            println!(
                "{:<8} {what:<22} {mv:>10.2} {mh:>10.2} {ratio:>6.2}x",
                format!("{mib} MiB")
            );
            entry.insert(
                what.to_string(),
                json!({
                    "vireo": {"median": mv, "samples": v},
                    "by_hand": {"median": mh, "samples": h},
                    "ratio": ratio,
                }),
            );
        }
        out.insert(format!("{mib}MiB"), serde_json::Value::Object(entry));
    }
    if wants("kvm") {
        let k = kvm_rows(&a, &b, &base, &params, runs);
        println!(
            "\nkvm driver (vireo-vmm, stop-and-copy), test guest with 256 MiB, 64 MiB filled; {runs} runs, median\n"
        );
        println!("{:<8} {:<22} {:>10}", "memory", "measure", "vireo");
        for (what, v) in [
            ("migration total (s)", &k.total),
            ("downtime (ms)", &k.down),
            ("state sent (MiB)", &k.mib),
        ] {
            println!("{:<8} {what:<22} {:>10.2}", "256 MiB", median(v));
        }
        out.insert(
            "kvm-256MiB".into(),
            json!({
                "migration total (s)": {"median": median(&k.total), "samples": k.total},
                "downtime (ms)": {"median": median(&k.down), "samples": k.down},
                "state sent (MiB)": {"median": median(&k.mib), "samples": k.mib},
            }),
        );
    }
    let dir = repo().join("target").join("bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("migration.json");
    if std::fs::write(
        &path,
        serde_json::to_vec_pretty(&serde_json::Value::Object(out)).unwrap_or_default(),
    )
    .is_ok()
    {
        println!("\nwrote {}", path.display());
    }
    let _ = std::fs::remove_dir_all(&base);
}
