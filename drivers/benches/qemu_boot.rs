//! `cargo bench -p vireo-drivers --bench qemu_boot [-- BOOTS]`: the real
//! Linux guest image booted BOOTS times (default 10) by the qemu driver
//! (`create_domain` to the guest's `VIREO-GUEST-READY` line in the console
//! log), and the same QEMU command line started by hand as the peer, in the
//! same run. QEMU has no boot-timer device, so the console marker (printed
//! by the guest's /init right after its boot-timer write) is the measure for
//! both. Also QEMU's memory beyond guest RAM: its resident set less the
//! resident part of the guest-RAM mapping (from /proc/PID/smaps).
//!
//! Prints a table and writes `target/bench/qemu-boot.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vireo_crds::{Domain, DomainDevices, DomainSpec, DomainType, Lifecycle, OsSpec, RunStrategy};
use vireo_drivers::Lookup;

const MARKER: &str = "VIREO-GUEST-READY";
const GUEST_MIB: u64 = 256;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn wait_marker(log: &Path, start: Instant) -> Duration {
    loop {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(MARKER)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no marker in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// QEMU's memory beyond guest RAM, in KiB, from smaps (the guest RAM is
/// the mapping of exactly the guest's size): (resident, private). Resident
/// counts shared libraries every QEMU shares; private is what this VM
/// alone costs the host.
fn memory_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut rss, mut private) = (0, 0);
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("Size:"), Some(v)) => {
                in_guest = v.parse::<u64>().unwrap_or(0) == GUEST_MIB * 1024
            }
            (Some("Rss:"), Some(v)) if !in_guest => rss += v.parse::<u64>().unwrap_or(0),
            (Some("Private_Clean:" | "Private_Dirty:"), Some(v)) if !in_guest => {
                private += v.parse::<u64>().unwrap_or(0)
            }
            _ => {}
        }
    }
    (rss, private)
}

fn main() {
    let boots: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let out = Command::new(repo().join("scripts/guest-image.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/guest-image.sh");
    assert!(out.status.success(), "guest-image.sh failed");
    let image = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim(),
    );
    let root = std::env::temp_dir().join(format!("vireo-bench-qemu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let conn = vireo_drivers::open(&format!("qemu:///embed?root={}", root.display()))
        .expect("open qemu driver");
    let hv = conn.hypervisor();
    let dom = Domain::new(
        "bench",
        DomainSpec {
            domain_type: DomainType::Qemu,
            arch: None,
            uuid: None,
            memory: Quantity(format!("{GUEST_MIB}Mi")),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: Some(OsSpec {
                machine: None,
                kernel: Some(image.join("vmlinuz").display().to_string()),
                initrd: Some(image.join("initrd.img").display().to_string()),
                cmdline: Some("console=ttyS0 quiet vireo.net=0".into()),
                ..Default::default()
            }),
            devices: DomainDevices::default(),
            cloud_init: None,
            run_strategy: RunStrategy::Manual,
            lifecycle: Lifecycle::default(),
            node_selector: None,
            eviction_strategy: None,
        },
    );
    let (mut driver_ms, mut bare_ms, mut overhead_mib) = (Vec::new(), Vec::new(), Vec::new());
    let mut private_mib = Vec::new();
    let mut argv: Vec<String> = Vec::new();
    for i in 0..boots {
        let start = Instant::now();
        let r = hv.create_domain(&dom).expect("create");
        let run = root.join("run").join(&r.uuid);
        let t = wait_marker(&run.join("console.log"), start);
        driver_ms.push(t.as_secs_f64() * 1e3);
        let pid: u32 = std::fs::read_to_string(run.join("pid"))
            .expect("pid")
            .trim()
            .parse()
            .expect("pid");
        // Let the guest settle, then read QEMU's memory.
        std::thread::sleep(Duration::from_millis(500));
        let (rss, private) = memory_kib(pid);
        overhead_mib.push(rss as f64 / 1024.0);
        private_mib.push(private as f64 / 1024.0);
        if i == 0 {
            argv = std::fs::read(format!("/proc/{pid}/cmdline"))
                .expect("cmdline")
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
        }
        hv.destroy_domain("bench").expect("destroy");
        let _ = std::fs::remove_file(run.join("console.log"));
        assert!(hv.lookup_domain(Lookup::Name("bench")).is_err());
    }
    // The peer: the same command line, started by hand.
    let run = root.join("run").join(
        argv.iter()
            .position(|a| a == "-uuid")
            .map(|i| argv[i + 1].clone())
            .unwrap_or_default(),
    );
    let bare = root.join("bare");
    std::fs::create_dir_all(&bare).expect("bare dir");
    let from = run.display().to_string();
    let to = bare.display().to_string();
    let args: Vec<String> = argv[1..].iter().map(|a| a.replace(&from, &to)).collect();
    for _ in 0..boots {
        let _ = std::fs::remove_file(bare.join("console.log"));
        let start = Instant::now();
        let status = Command::new(&argv[0]).args(&args).status().expect("qemu");
        assert!(status.success());
        let t = wait_marker(&bare.join("console.log"), start);
        bare_ms.push(t.as_secs_f64() * 1e3);
        let pid: String = std::fs::read_to_string(bare.join("pid")).unwrap_or_default();
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        std::thread::sleep(Duration::from_millis(200));
    }
    let (d, b, m) = (
        median(&mut driver_ms),
        median(&mut bare_ms),
        median(&mut overhead_mib),
    );
    let p = median(&mut private_mib);
    println!(
        "qemu driver boot ({boots} boots each, TCG, microvm, {GUEST_MIB} MiB, 1 vCPU; median)"
    );
    println!("{:<44} {:>10}", "measure", "value");
    println!(
        "{:<44} {:>8.0} ms",
        "vireo qemu driver: create -> guest marker", d
    );
    println!(
        "{:<44} {:>8.0} ms",
        "bare QEMU, same command line -> marker", b
    );
    println!("{:<44} {:>8.2}", "ratio driver / bare QEMU", d / b);
    println!(
        "{:<44} {:>6.1} MiB",
        "QEMU memory beyond guest RAM: resident", m
    );
    println!(
        "{:<44} {:>6.1} MiB",
        "QEMU memory beyond guest RAM: private", p
    );
    let json = serde_json::json!({
        "boots": boots,
        "driver_marker_ms": {"median": d, "samples": driver_ms},
        "bare_qemu_marker_ms": {"median": b, "samples": bare_ms},
        "ratio_driver_to_bare": d / b,
        "qemu_overhead_rss_mib": {"median": m, "samples": overhead_mib},
        "qemu_overhead_private_mib": {"median": p, "samples": private_mib},
    });
    let dir = repo().join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("qemu-boot.json");
    if std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap_or_default()).is_ok() {
        println!("wrote {}", path.display());
    }
    let _ = std::fs::remove_dir_all(&root);
}
