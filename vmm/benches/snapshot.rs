//! `cargo bench -p vireo-vmm --bench snapshot [-- ROUNDS]` (default 5):
//! vireo-vmm's snapshot and restore of the test guest (`vireo.counter=1`,
//! `--rng`, 1 vCPU) at 32, 256 and 1024 MiB of RAM (`VIREO_BENCH_SNAPSHOT_MIB`
//! = a comma-separated list changes them), each idle and with a quarter of
//! its RAM (at most 64 MiB) filled by the guest (`vireo.fill`). Each round: `snapshot`
//! (`after: exit`) on the API, timed from the request to the last byte
//! received; the file size; then a new VMM with `--restore`, timed from
//! spawn to its first `info` answer (the machine is rebuilt from the file
//! and running) and to the guest's next counter line on the console (which
//! comes up to 0.5 s of guest time after the last one: the counter's pace,
//! not the restore's). Prints a table and writes
//! `target/bench/vmm-snapshot.json`. Without /dev/kvm it says what it skips.

#[path = "kit/mod.rs"]
mod kit;

use kit::{Proc, Res, Scratch, median};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn main() {
    if let Err(e) = run() {
        eprintln!("bench snapshot: {e}");
        std::process::exit(1);
    }
}

struct Round {
    snapshot_ms: f64,
    bytes: u64,
    memory_stored: u64,
    restore_api_ms: f64,
    restore_counter_ms: f64,
}

fn vmm(
    bin: &Path,
    guest: &Path,
    dir: &Path,
    mib: u64,
    fill: u64,
    restore: Option<&Path>,
) -> Res<Proc> {
    let mut cmd = Command::new(bin);
    let cmdline = if fill > 0 {
        format!("console=ttyS0 vireo.counter=1 vireo.fill={fill}")
    } else {
        "console=ttyS0 vireo.counter=1".to_string()
    };
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest)
        .args(["--cmdline", &cmdline])
        .args(["--memory-mib", &mib.to_string(), "--vcpus", "1", "--rng"])
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .arg("--console-log")
        .arg(dir.join("console.log"))
        .arg("--console-socket")
        .arg(dir.join("console.sock"))
        .arg("--exit-file")
        .arg(dir.join("exit.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(r) = restore {
        cmd.arg("--restore").arg(r);
    }
    Proc::spawn(&mut cmd)
}

/// Connects and waits for an `info` answer: the socket is bound before the
/// machine is built (or restored), the answer comes once it runs.
fn wait_api(api: &Path, proc: &mut Proc) -> Res<UnixStream> {
    let since = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(api) {
            s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            w.write_all(b"{\"command\":\"info\"}\n")
                .map_err(|e| e.to_string())?;
            let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            if !line.contains("\"ok\":true") {
                return Err(format!("info answered {line}"));
            }
            return Ok(s);
        }
        if let Ok(Some(st)) = proc.0.try_wait() {
            return Err(format!("the VMM exited ({st}) before its API answered"));
        }
        if since.elapsed() > T {
            return Err("no API socket".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The last counter on a console log.
fn last_counter(log: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("VIREO-TEST counter "))
        .find_map(|n| n.trim().parse().ok())
}

fn round(bin: &Path, guest: &Path, scratch: &Path, mib: u64, fill: u64, n: usize) -> Res<Round> {
    let a_dir = scratch.join(format!("a{mib}-{fill}-{n}"));
    let b_dir = scratch.join(format!("b{mib}-{fill}-{n}"));
    for d in [&a_dir, &b_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let mut a = vmm(bin, guest, &a_dir, mib, fill, None)?;
    kit::wait_line(
        &a_dir.join("console.log"),
        "VIREO-TEST counter 1",
        &mut a,
        T,
    )?;
    let s = wait_api(&a_dir.join("api.sock"), &mut a)?;
    s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let started = Instant::now();
    w.write_all(b"{\"command\":\"snapshot\",\"after\":\"exit\"}\n")
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let answer: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("{line}: {e}"))?;
    let bytes = answer["bytes"]
        .as_u64()
        .ok_or_else(|| format!("snapshot refused: {answer}"))?;
    let snap = scratch.join(format!("s{mib}-{n}.snap"));
    let mut f = std::fs::File::create(&snap).map_err(|e| e.to_string())?;
    let copied = std::io::copy(&mut (&mut r).take(bytes), &mut f).map_err(|e| e.to_string())?;
    let snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
    if copied != bytes {
        return Err(format!("{copied} of {bytes} bytes"));
    }
    drop(f);
    let _ = a.0.wait();
    let last = last_counter(&a_dir.join("console.log")).ok_or("no counter before the snapshot")?;

    let started = Instant::now();
    let mut b = vmm(bin, guest, &b_dir, mib, fill, Some(&snap))?;
    let mut api = wait_api(&b_dir.join("api.sock"), &mut b)?;
    let restore_api_ms = started.elapsed().as_secs_f64() * 1e3;
    kit::wait_line(
        &b_dir.join("console.log"),
        &format!("VIREO-TEST counter {}", last + 1),
        &mut b,
        T,
    )?;
    let restore_counter_ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = api.write_all(b"{\"command\":\"destroy\"}\n");
    let _ = b.0.wait();
    let _ = std::fs::remove_file(&snap);
    Ok(Round {
        snapshot_ms,
        bytes,
        memory_stored: answer["memory_stored"].as_u64().unwrap_or(0),
        restore_api_ms,
        restore_counter_ms,
    })
}

fn run() -> Res<()> {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse().map_err(|e| format!("argument {a:?}: {e}")))
        .transpose()?
        .unwrap_or(5)
        .max(1);
    let sizes: Vec<u64> = match std::env::var("VIREO_BENCH_SNAPSHOT_MIB") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse().map_err(|_| format!("size {s:?}")))
            .collect::<Res<_>>()?,
        Err(_) => vec![32, 256, 1024],
    };
    let kvm = vireo_vmm::probe::probe();
    if kvm == vireo_vmm::probe::KvmKind::Absent {
        println!(
            "SKIP vmm snapshot bench: /dev/kvm is not usable here ({})",
            kvm.describe()
        );
        return Ok(());
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_vireo-vmm"));
    let scratch =
        Scratch(std::env::temp_dir().join(format!("vireo-snapbench-{}", std::process::id())));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let guest = match kit::build_guest(&script, &scratch.0.join("guest")) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP vmm snapshot bench: cannot build the test guest ({e})");
            return Ok(());
        }
    };
    println!(
        "vireo-vmm snapshot bench: {} ({rounds} rounds per size)",
        kvm.describe()
    );
    println!(
        "{:>8} | {:>8} | {:>14} | {:>12} | {:>14} | {:>18} | {:>20}",
        "RAM MiB",
        "filled",
        "snapshot ms",
        "file bytes",
        "memory stored",
        "restore: API ms",
        "restore: counter ms"
    );
    let mut results = Vec::new();
    // Each size idle, and with a quarter of its RAM (at most 64 MiB:
    // filling costs the emulated guest ~4 s per 64 MiB) written by the
    // guest (`vireo.fill`), so that the file carries memory.
    let cases: Vec<(u64, u64)> = sizes
        .iter()
        .flat_map(|&m| [(m, 0), (m, (m / 4).min(64))])
        .collect();
    for &(mib, fill) in &cases {
        let mut rs = Vec::new();
        for n in 0..rounds {
            rs.push(round(&bin, &guest, &scratch.0, mib, fill, n)?);
        }
        let med = |f: fn(&Round) -> f64| median(&rs.iter().map(f).collect::<Vec<_>>());
        let (snap, api, counter) = (
            med(|r| r.snapshot_ms),
            med(|r| r.restore_api_ms),
            med(|r| r.restore_counter_ms),
        );
        let bytes = rs.iter().map(|r| r.bytes).max().unwrap_or(0);
        let stored = rs.iter().map(|r| r.memory_stored).max().unwrap_or(0);
        println!(
            "{mib:>8} | {fill:>8} | {snap:>14.1} | {bytes:>12} | {stored:>14} | {api:>18.1} | {counter:>20.1}"
        );
        results.push(json!({
            "memory_mib": mib,
            "filled_mib": fill,
            "snapshot_ms_median": snap,
            "restore_api_ms_median": api,
            "restore_counter_ms_median": counter,
            "file_bytes_max": bytes,
            "memory_stored_max": stored,
            "rounds": rs.iter().map(|r| json!({
                "snapshot_ms": r.snapshot_ms,
                "file_bytes": r.bytes,
                "restore_api_ms": r.restore_api_ms,
                "restore_counter_ms": r.restore_counter_ms,
            })).collect::<Vec<_>>(),
        }));
    }
    let out = json!({ "kvm": kvm.describe(), "results": results });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("vmm/ lies inside the workspace")?
        .join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let path = dir.join("vmm-snapshot.json");
    let text = serde_json::to_string_pretty(&out).map_err(|e| format!("json: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
