//! vireo-vmm's snapshot: the test guest counting on its console
//! (`vireo.counter=1`) is snapshotted over the API and restored in a new
//! process, which goes on from the next number without booting; damaged,
//! truncated, other-version and other-machine snapshots are refused with a
//! one-line error before the guest runs.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn build_guest(out: &Path) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let res = match Command::new(&script)
        .arg(out)
        .stderr(Stdio::inherit())
        .output()
    {
        Ok(res) => res,
        Err(e) => {
            skip("test guest", &format!("{}: {e}", script.display()));
            return None;
        }
    };
    if !res.status.success() {
        skip(
            "test guest",
            "build.sh failed: no C compiler for the test guest?",
        );
        return None;
    }
    let path = String::from_utf8_lossy(&res.stdout)
        .lines()
        .last()?
        .trim()
        .to_string();
    Some(PathBuf::from(path))
}

/// The counter values on a console, in order.
fn counters(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("VIREO-TEST counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Sends `snapshot` with `after` and returns the answer and the bytes.
fn take_snapshot(api: &Path, after: &str) -> (serde_json::Value, Vec<u8>) {
    let s = UnixStream::connect(api).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut w = s.try_clone().unwrap();
    writeln!(w, r#"{{"command":"snapshot","after":"{after}"}}"#).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let n = answer["bytes"].as_u64().unwrap();
    let mut bytes = vec![0u8; n as usize];
    r.read_exact(&mut bytes).unwrap();
    (answer, bytes)
}

fn opts<'a>(guest: &'a Path, extra: Vec<&'a str>) -> Opts<'a> {
    Opts {
        kernel: guest,
        cmdline: Some("console=ttyS0 vireo.counter=1 vireo.fill=4"),
        memory_mib: 32,
        vcpus: 1,
        extra,
        ..Opts::default()
    }
}

#[test]
fn a_restored_guest_counts_on_from_where_it_was() {
    if !kvm_available("a_restored_guest_counts_on_from_where_it_was") {
        return;
    }
    let out = TempDir::new("snap-guest");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let mut a = Vmm::start("snap-a", opts(&guest, vec!["--rng"]));
    a.wait_console("VIREO-TEST counter 3\n", 1, T);
    let started = Instant::now();
    let (answer, bytes) = take_snapshot(&a.api, "exit");
    let took = started.elapsed();
    let (status, exit) = a.wait_exit(T);
    assert!(status.success(), "{exit}");
    assert_eq!(exit["reason"], "destroyed", "{exit}");
    let before = counters(&a.console());
    let last = *before.last().unwrap();
    assert_eq!(before, (0..=last).collect::<Vec<_>>());
    eprintln!(
        "snapshot: {} bytes ({} of guest memory) in {took:?}, last counter {last}",
        bytes.len(),
        answer["memory_stored"]
    );
    assert_eq!(&bytes[..8], b"VIREOVMM");
    // The 4 MiB the guest filled (vireo.fill=4) are in it, the zeros not.
    let stored = answer["memory_stored"].as_u64().unwrap();
    assert!(
        (4 << 20..8 << 20).contains(&stored),
        "{stored} bytes of memory stored"
    );
    assert!(
        (bytes.len() as u64) < (8 << 20),
        "a sparse file: {} bytes",
        bytes.len()
    );

    let snap = out.0.join("guest.snap");
    std::fs::write(&snap, &bytes).unwrap();
    let snap_arg = snap.to_str().unwrap();
    // What the file holds, as the library reads it.
    let parsed = vireo_vmm::snapshot::parse(&mut std::fs::File::open(&snap).unwrap(), 0).unwrap();
    let v0 = &parsed.state.vcpus[0];
    eprintln!(
        "vCPU 0: {} MSRs, xsave {}, xcrs {}, vcpu_events {}, debugregs {}, KVM refused: {:?}; clock {}",
        v0.msrs.len(),
        v0.xsave.is_some(),
        v0.xcrs.is_some(),
        v0.vcpu_events.is_some(),
        v0.debugregs.is_some(),
        v0.missing,
        parsed.state.vm.clock.is_some()
    );
    assert_eq!(parsed.state.config.devices, vec!["virtio-rng".to_string()]);
    assert_eq!(
        parsed.memory_bytes_stored(),
        answer["memory_stored"].as_u64().unwrap()
    );
    let started = Instant::now();
    let mut b = Vmm::start("snap-b", opts(&guest, vec!["--rng", "--restore", snap_arg]));
    let next = format!("VIREO-TEST counter {}\n", last + 1);
    b.wait_console(&next, 1, T);
    eprintln!("restore: first counter after {:?}", started.elapsed());
    let after_first = format!("VIREO-TEST counter {}\n", last + 3);
    let console = b.wait_console(&after_first, 1, T);
    let after = counters(&console);
    assert_eq!(
        after.first(),
        Some(&(last + 1)),
        "the restored guest goes on from the next number:\n{console}"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{console}");
    assert!(
        !console.contains("VIREO-TEST-GUEST-READY"),
        "the restored guest booted again:\n{console}"
    );
    // The API works on the restored machine, and it can be snapshotted again.
    let mut api = b.connect_api();
    let info = api.call(r#"{"command":"info"}"#);
    assert_eq!(info["state"], "running", "{info}");
    let (_, again) = take_snapshot(&b.api, "resume");
    assert_eq!(&again[..8], b"VIREOVMM");
    let n = last + 5;
    b.wait_console(&format!("VIREO-TEST counter {n}\n"), 1, T);
    api.call(r#"{"command":"destroy"}"#);
    b.wait_exit(T);
}

#[test]
fn a_paused_snapshot_restores_paused_with_paused_flag() {
    if !kvm_available("a_paused_snapshot_restores_paused_with_paused_flag") {
        return;
    }
    let out = TempDir::new("snap-guest-p");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let mut a = Vmm::start("snap-p", opts(&guest, vec![]));
    a.wait_console("VIREO-TEST counter 1\n", 1, T);
    let (_, bytes) = take_snapshot(&a.api, "pause");
    let mut api = a.connect_api();
    assert_eq!(api.call(r#"{"command":"info"}"#)["state"], "paused");
    api.call(r#"{"command":"destroy"}"#);
    a.wait_exit(T);
    let last = *counters(&a.console()).last().unwrap();

    let snap = out.0.join("p.snap");
    std::fs::write(&snap, &bytes).unwrap();
    let snap_arg = snap.to_str().unwrap();
    let mut b = Vmm::start(
        "snap-q",
        opts(&guest, vec!["--restore", snap_arg, "--paused"]),
    );
    let mut api = b.connect_api();
    assert_eq!(api.call(r#"{"command":"info"}"#)["state"], "paused");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(counters(&b.console()).is_empty(), "a paused guest printed");
    api.call(r#"{"command":"resume"}"#);
    let console = b.wait_console(&format!("VIREO-TEST counter {}\n", last + 1), 1, T);
    assert_eq!(counters(&console).first(), Some(&(last + 1)), "{console}");
    api.call(r#"{"command":"destroy"}"#);
    b.wait_exit(T);
}

/// Starts a VMM restoring `file` (with `extra`), which must fail at start
/// with `needle` in its exit file.
fn refused(guest: &Path, file: &Path, memory_mib: u64, needle: &str) {
    let before = std::fs::read(file).unwrap();
    let mut o = opts(guest, vec!["--rng", "--restore", file.to_str().unwrap()]);
    o.memory_mib = memory_mib;
    let mut v = Vmm::start("snap-bad", o);
    let (status, exit) = v.wait_exit(T);
    assert!(!status.success());
    assert_eq!(exit["reason"], "crashed", "{exit}");
    let detail = exit["detail"].as_str().unwrap();
    assert!(detail.contains(needle), "wanted {needle:?} in {detail:?}");
    assert!(!detail.contains('\n'), "one line: {detail:?}");
    assert!(v.console().is_empty(), "the guest ran: {}", v.console());
    assert_eq!(std::fs::read(file).unwrap(), before, "the file changed");
    eprintln!("refused as wanted: {detail}");
}

#[test]
fn damaged_snapshots_are_refused_with_a_clear_error() {
    if !kvm_available("damaged_snapshots_are_refused_with_a_clear_error") {
        return;
    }
    let out = TempDir::new("snap-guest-d");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let mut a = Vmm::start("snap-d", opts(&guest, vec!["--rng"]));
    a.wait_console("VIREO-TEST counter 0\n", 1, T);
    let (_, good) = take_snapshot(&a.api, "exit");
    a.wait_exit(T);

    let write = |name: &str, bytes: &[u8]| {
        let p = out.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    refused(&guest, &write("flipped", &flipped), 32, "checksum");
    refused(
        &guest,
        &write("truncated", &good[..good.len() - 100]),
        32,
        "truncated",
    );
    refused(&guest, &write("short", &good[..20]), 32, "truncated");
    let mut extended = good.clone();
    extended.extend_from_slice(b"more");
    refused(
        &guest,
        &write("extended", &extended),
        32,
        "truncated or extended",
    );
    let mut v2 = good.clone();
    v2[8] = 2;
    refused(&guest, &write("v2", &v2), 32, "format version 2");
    refused(&guest, &write("garbage", &[0x5a; 4096]), 32, "bad magic");
    refused(
        &guest,
        &write("good", &good),
        64,
        "does not fit this machine",
    );
}
