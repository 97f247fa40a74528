//! `cargo bench -p vireo-drivers --bench disk_boot [-- RUNS]`: the Debian
//! disk of `scripts/debian-image.sh` booted to its `login:` prompt on the
//! serial console, through SeaBIOS and through OVMF, RUNS times each
//! (default 3), by the qemu driver and by hand, alternately, in the same
//! run:
//!
//! * **Vireo**: a dir pool, a qcow2 overlay volume of the image (a clone
//!   with `overlay: true`), a Domain with `firmware: bios|efi` and a NIC on
//!   an isolated Vireo network (bridge and dnsmasq), `start_domain` to
//!   `login:`.
//! * **By hand**: the same QEMU command line (read from Vireo's QEMU in the
//!   first run), on a fresh overlay made with `qemu-img create -b`, a fresh
//!   copy of OVMF's variable template, and a tap made with `ip tuntap` on
//!   the same bridge, as a user running QEMU on that network would.
//!
//! Every boot is a first boot (fresh overlay, empty machine-id, cloud-init's
//! first run), so both sides do the same work. Needs root (a network
//! namespace of its own, a bridge, taps), QEMU, OVMF and SeaBIOS.
//!
//! Prints a table and writes `target/bench/disk-boot.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_crds::{Disk, Domain, Firmware, Interface, OsSpec, RunStrategy};
use vireo_drivers::{Lookup, NetworkDriver, StorageDriver};

const MARKER: &str = "login:";
const TIMEOUT: Duration = Duration::from_secs(600);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
}

fn wait_marker(log: &Path, start: Instant) -> f64 {
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(MARKER) {
            return start.elapsed().as_secs_f64();
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "no '{MARKER}' in {} after {TIMEOUT:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn yaml<T: serde::de::DeserializeOwned>(t: &str) -> T {
    serde_yaml_ng::from_str(t).expect("manifest")
}

/// Moves this thread into a fresh network namespace (removed at exit).
struct Netns(String);

impl Netns {
    fn enter() -> Netns {
        let name = format!("vireo-bench-disk-{:x}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        let f = std::fs::File::open(format!("/run/netns/{name}")).expect("the namespace");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace descriptor we own; it changes only
        // the calling thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("disk_boot: needs root (a network namespace, a bridge and taps); not run");
        return;
    }
    let out = Command::new(repo().join("scripts/debian-image.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/debian-image.sh");
    assert!(out.status.success(), "debian-image.sh failed");
    let image = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim(),
    )
    .join("debian.qcow2");
    let _ns = Netns::enter();

    let root = std::env::temp_dir().join(format!("vireo-bench-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pool_dir = root.join("pool");
    let storage = Arc::new(
        vireo_drivers::storage::dir::DirStorage::open(&root.join("storage"), Path::new("/"))
            .expect("dir backend"),
    );
    let pool: vireo_crds::StoragePool = yaml(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: p}}\nspec: {{type: dir, path: {}}}\n",
        pool_dir.display()
    ));
    storage.define_pool(&pool).expect("define pool");
    storage.build_pool("p").expect("build pool");
    storage.start_pool("p").expect("start pool");
    std::fs::copy(&image, pool_dir.join("debian")).expect("the image into the pool");
    storage.refresh_pool("p").expect("refresh");
    let networks = Arc::new(
        vireo_drivers::bridge::BridgeDriver::open(&root.join("net")).expect("network driver"),
    );
    let net: vireo_crds::Network = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: Network\nmetadata: {name: bench}\nspec: {forwardMode: isolated, ip: {address: 10.74.0.1, prefix: 24, dhcp: {ranges: [{start: 10.74.0.100, end: 10.74.0.200}]}}}\n",
    );
    networks.define_network(&net).expect("define network");
    networks.start_network("bench").expect("start network");
    let bridge = networks
        .network_info("bench")
        .ok()
        .and_then(|n| n.bridge)
        .unwrap_or_default();
    assert!(!bridge.is_empty(), "the network's bridge name");
    let conn = vireo_drivers::qemu::open_with(
        &format!("qemu:///embed?root={}", root.display()),
        &format!("/embed?root={}", root.display()),
        networks.clone(),
        storage.clone(),
    )
    .expect("qemu driver");
    let hv = conn.hypervisor();
    let hand = root.join("hand");
    std::fs::create_dir_all(&hand).expect("hand dir");

    let mut rows = Vec::new();
    for firmware in [Firmware::Bios, Firmware::Efi] {
        let fw = firmware.as_str();
        let (mut vireo_s, mut hand_s) = (Vec::new(), Vec::new());
        let mut argv: Vec<String> = Vec::new();
        let (mut disk_path, mut nvram_path, mut run_dir) =
            (String::new(), String::new(), String::new());
        for i in 0..runs {
            // Vireo.
            let vol: vireo_crds::StorageVol = yaml(
                "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: root}\nspec: {pool: p, capacity: 3Gi, format: qcow2, source: {clone: {volume: debian, overlay: true}}}\n",
            );
            storage.create_volume(&vol).expect("overlay volume");
            let mut d: Domain = yaml(&format!(
                "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: deb-{fw}}}\nspec: {{type: qemu, memory: 1Gi, vcpus: 2}}\n"
            ));
            d.spec.os = Some(OsSpec {
                firmware: Some(firmware),
                ..Default::default()
            });
            d.spec.devices.disks = vec![Disk {
                name: "vda".into(),
                volume: "root".into(),
                ..Default::default()
            }];
            d.spec.devices.interfaces = vec![Interface {
                name: "net0".into(),
                network: "bench".into(),
                mac: None,
            }];
            d.spec.run_strategy = RunStrategy::Manual;
            let name = format!("deb-{fw}");
            hv.define_domain(&d).expect("define");
            let uuid = hv.lookup_domain(Lookup::Name(&name)).expect("lookup").uuid;
            let run = root.join("run").join(&uuid);
            let start = Instant::now();
            hv.start_domain(&name).expect("start");
            let t = wait_marker(&run.join("console.log"), start);
            vireo_s.push(t);
            eprintln!("disk_boot: {fw} vireo run {}: login: after {t:.1} s", i + 1);
            if i == 0 {
                let pid: u32 = std::fs::read_to_string(run.join("pid"))
                    .expect("pid")
                    .trim()
                    .parse()
                    .expect("pid");
                argv = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .expect("cmdline")
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                disk_path = storage.volume_info("p", "root").expect("volume").path;
                nvram_path = root
                    .join("nvram")
                    .join(format!("{uuid}_VARS.fd"))
                    .display()
                    .to_string();
                run_dir = run.display().to_string();
            }
            hv.destroy_domain(&name).expect("destroy");
            hv.undefine_domain(&name).expect("undefine");
            storage.delete_volume("p", "root").expect("delete overlay");

            // By hand: the same command, its own overlay, NVRAM and tap.
            let overlay = hand.join("root.qcow2");
            let nvram = hand.join("VARS.fd");
            let _ = std::fs::remove_file(&overlay);
            let _ = std::fs::remove_file(hand.join("console.log"));
            sh(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    &pool_dir.join("debian").display().to_string(),
                    &overlay.display().to_string(),
                ],
            );
            if firmware == Firmware::Efi {
                std::fs::copy(vireo_drivers::qemu::command::OVMF_VARS, &nvram)
                    .expect("OVMF's template");
            }
            let tap = argv
                .iter()
                .find_map(|a| {
                    a.split(',')
                        .find_map(|kv| kv.strip_prefix("ifname="))
                        .map(str::to_string)
                })
                .expect("a tap on the command line");
            sh(
                "ip",
                &["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"],
            );
            sh("ip", &["link", "set", &tap, "master", &bridge, "up"]);
            let to = hand.display().to_string();
            let args: Vec<String> = argv[1..]
                .iter()
                .map(|a| {
                    a.replace(&disk_path, &overlay.display().to_string())
                        .replace(&nvram_path, &nvram.display().to_string())
                        .replace(&run_dir, &to)
                })
                .collect();
            let start = Instant::now();
            let status = Command::new(&argv[0]).args(&args).status().expect("qemu");
            assert!(status.success(), "QEMU by hand: {status}");
            let t = wait_marker(&hand.join("console.log"), start);
            hand_s.push(t);
            eprintln!(
                "disk_boot: {fw} by hand run {}: login: after {t:.1} s",
                i + 1
            );
            let pid = std::fs::read_to_string(hand.join("pid")).unwrap_or_default();
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            std::thread::sleep(Duration::from_millis(500));
            let _ = Command::new("ip").args(["link", "del", &tap]).output();
        }
        rows.push((fw, vireo_s, hand_s));
    }
    let _ = networks.destroy_network("bench");

    println!(
        "\nDebian disk to `login:` on the serial console (TCG, 1 GiB, 2 vCPUs, a NIC on an isolated Vireo network; {runs} runs each, median)\n"
    );
    println!(
        "{:<10} {:>12} {:>12} {:>8}",
        "firmware", "vireo (s)", "by hand (s)", "ratio"
    );
    let mut json = serde_json::Map::new();
    for (fw, v, h) in &rows {
        let (mv, mh) = (median(v), median(h));
        let ratio = if mh > 0.0 { mv / mh } else { 0.0 };
        println!("{fw:<10} {mv:>12.1} {mh:>12.1} {ratio:>7.2}x");
        json.insert(
            fw.to_string(),
            serde_json::json!({
                "vireo_s": {"median": mv, "samples": v},
                "by_hand_s": {"median": mh, "samples": h},
                "ratio": ratio,
            }),
        );
    }
    let dir = repo().join("target").join("bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("disk-boot.json");
    if std::fs::write(
        &path,
        serde_json::to_vec_pretty(&serde_json::Value::Object(json)).unwrap_or_default(),
    )
    .is_ok()
    {
        println!("\nwrote {}", path.display());
    }
    let _ = std::fs::remove_dir_all(&root);
}
