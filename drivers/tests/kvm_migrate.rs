//! Live migration under the kvm driver (vireo-vmm's snapshot streamed over
//! TCP, stop-and-copy) between two "nodes": two driver instances with their
//! own state directories, each in a network namespace of the test's own,
//! joined by a veth pair (10.78.0.1 and 10.78.0.2). The test guest prints a
//! counter twice a second on its console.
//!
//! Checked: a target that does not answer leaves the guest running on the
//! source with an error naming the address; a guest with a node-local raw
//! disk moves with it (`copyStorage`: B's volume ends equal to A's); an abort (`domjobabort`)
//! while the state is sent fails the perform and leaves the guest running
//! on the source; streams of another version or with a bad checksum are
//! refused by the target, which waits on; the migration moves the guest
//! without a second boot (the counter goes on from where it was), the
//! source's vireo-vmm is gone and its record undefined, the source never
//! ran once the target did, and the stats are not zero.
//!
//! Needs root (network namespaces), `ip` and /dev/kvm: without them the
//! test fails when `CI` is set and otherwise prints a SKIP line and returns.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::netns::{Node, find};
use common::{log_text, numbers_after, say, test_guest_domain, yaml};
use vireo_crds::{DomainReason, DomainState, StorageVol};
use vireo_drivers::StorageDriver;
use vireo_drivers::migration::{MigrationIncoming, MigrationParams};

const WAIT: Duration = Duration::from_secs(60);
const COUNTER: &str = "vireo.counter=1";
const TICK: &str = "VIREO-TEST counter ";
const MARKER: &str = "VIREO-TEST-GUEST-READY";

/// Whether the test can run here; fails under CI when it cannot.
fn available(test: &str) -> bool {
    if !common::kvm_available(test) {
        return false;
    }
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces)".to_string());
    }
    if find("ip").is_none() {
        missing.push("ip (iproute2)".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs {what}, and CI is set");
    }
    say(&format!("SKIP {test}: needs {what}; not run"));
    false
}

/// One node: its namespace, its kvm driver and its pool `p`.
fn node(tag: &str) -> Node {
    Node::new("kvm", &format!("kmig-{tag}"), vireo_drivers::kvm::open_with)
}

fn ticks(log: &Path) -> Vec<u64> {
    numbers_after(log, 0, TICK)
}

/// Waits until the console shows a counter above `above`; returns all.
fn wait_tick_above(log: &Path, above: u64) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let t = ticks(log);
        if t.last().is_some_and(|l| *l > above) {
            return t;
        }
        assert!(
            start.elapsed() < WAIT,
            "no counter above {above} on the console; it says:\n{}",
            log_text(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vmm_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("vireo-vmm"))
        .unwrap_or(false)
}

fn pid_in(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn params() -> MigrationParams {
    MigrationParams {
        target_address: "10.78.0.2".into(),
        copy_storage: false,
        max_downtime_ms: None,
        bandwidth_mib_s: None,
    }
}

/// Sends `bytes` to the target at `uri` (`tcp:ADDR:PORT`) and returns its
/// answer line.
fn send_raw(uri: &str, bytes: &[u8]) -> String {
    let addr = uri.strip_prefix("tcp:").expect("tcp: URI");
    let mut s = TcpStream::connect(addr).expect("connects to the target");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The target may refuse before it has read everything.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("an answer");
    line
}

/// A migration stream preamble (vireo-vmm's `migration` module).
fn preamble(version: u32, len: u64) -> Vec<u8> {
    let mut p = b"VIREOMIG".to_vec();
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&len.to_le_bytes());
    p
}

#[test]
fn kvm_live_migration_moves_the_guest_and_failures_leave_it_on_the_source() {
    let test = "kvm_live_migration_moves_the_guest_and_failures_leave_it_on_the_source";
    if !available(test) {
        return;
    }
    common::vmm_binary();
    let a = node("a");
    let b = node("b");
    // The wire between the two nodes.
    a.ns.link(&b.ns, "vk", ["10.78.0.1/24", "10.78.0.2/24"]);

    // The guest on A, without disks.
    let name = "mover";
    let def = test_guest_domain(name, COUNTER);
    let (ha, hb) = (a.conn.hypervisor(), b.conn.hypervisor());
    a.ns.run(|| {
        ha.define_domain(&def).expect("define on A");
        ha.start_domain(name).expect("start on A");
    });
    let dir_a = a.run_dir(name);
    let log_a = dir_a.join("console.log");
    wait_tick_above(&log_a, 2);
    let pid_a = pid_in(&dir_a);
    let def = ha.domain_definition(name, true).expect("A's definition");

    // 1. A target that does not answer (a closed port on B): the guest
    // runs on A throughout, and confirm(false) keeps it there.
    let bogus = MigrationIncoming {
        uri: "tcp:10.78.0.2:9".into(),
        disks: Vec::new(),
        cookie: serde_json::json!({ "driver": "kvm" }),
    };
    let before = *ticks(&log_a).last().expect("ticks");
    let e =
        a.ns.run(|| ha.migrate_perform(name, &bogus, &params()))
            .expect_err("nobody listens on B");
    say(&format!("perform to a closed port: {e}"));
    assert!(
        e.to_string().contains("10.78.0.2:9"),
        "the error says where it could not go: {e}"
    );
    ha.migrate_confirm(name, false)
        .expect("confirm the failure");
    assert_eq!(
        a.info(name),
        Some((DomainState::Running, DomainReason::Booted))
    );
    wait_tick_above(&log_a, before + 1);
    assert!(vmm_alive(pid_a));

    // 2. A guest with a node-local disk, copied on the same stream
    // (`copyStorage`) into B's blank volume of the same size: the data
    // written on A's volume before is on B's after, and the counter goes on.
    let vol: StorageVol = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: data}\nspec: {pool: p, capacity: 16Mi, format: raw}\n",
    );
    a.storage.create_volume(&vol).expect("volume on A");
    b.storage.create_volume(&vol).expect("volume on B");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(a.pool_dir.join("data"))
            .expect("A's volume");
        for (at, text) in [
            (0u64, &b"VIREO-DISK-HEAD"[..]),
            (5 << 20, b"in the middle"),
            ((16 << 20) - 4, b"TAIL"),
        ] {
            f.write_all_at(text, at).expect("writes A's volume");
        }
    }
    let disked = "disked";
    let mut with_disk = test_guest_domain(disked, COUNTER);
    with_disk.spec.devices.disks = vec![vireo_crds::Disk {
        name: "vda".into(),
        volume: "data".into(),
        ..Default::default()
    }];
    a.ns.run(|| {
        ha.define_domain(&with_disk).expect("define on A");
        ha.start_domain(disked).expect("start on A");
    });
    let dlog_a = a.run_dir(disked).join("console.log");
    wait_tick_above(&dlog_a, 1);
    let copy = MigrationParams {
        copy_storage: true,
        ..params()
    };
    let with_disk = ha.domain_definition(disked, true).expect("definition");
    let incoming =
        b.ns.run(|| hb.migrate_prepare(&with_disk, &copy))
            .expect("prepare with a disk copy");
    assert_eq!(incoming.disks.len(), 1, "{incoming:?}");
    let stats =
        a.ns.run(|| ha.migrate_perform(disked, &incoming, &copy))
            .expect("perform with a disk copy");
    say(&format!("with a disk copy: {stats:?}"));
    let dlast_a = *ticks(&dlog_a).last().expect("ticks");
    b.ns.run(|| hb.migrate_finish(disked, true))
        .expect("finish")
        .expect("on B");
    a.ns.run(|| ha.migrate_confirm(disked, true))
        .expect("confirm");
    assert!(
        stats.disk_bytes > 0 && stats.disk_bytes <= 16 << 20,
        "{stats:?}"
    );
    assert!(ha.domain_info(disked).is_err(), "A still has it");
    assert_eq!(
        b.info(disked),
        Some((DomainState::Running, DomainReason::Migrated))
    );
    let dlog_b = b.run_dir(disked).join("console.log");
    let on_b = wait_tick_above(&dlog_b, dlast_a + 1);
    assert!(
        on_b[0] >= dlast_a && on_b[0] <= dlast_a + 3,
        "{dlast_a} then {on_b:?}"
    );
    let disk_a = std::fs::read(a.pool_dir.join("data")).expect("A's volume");
    let disk_b = std::fs::read(b.pool_dir.join("data")).expect("B's volume");
    assert_eq!(disk_a.len(), disk_b.len());
    assert!(disk_a == disk_b, "B's volume differs from A's");
    assert_eq!(&disk_b[..15], b"VIREO-DISK-HEAD");
    b.ns.run(|| hb.destroy_domain(disked))
        .expect("destroy on B");

    // 3. An abort (`domjobabort`) while the state goes, at 1 MiB/s, to a
    // target that takes it and never answers: perform fails saying so and
    // the guest runs on on A. With nothing being sent, an abort is refused.
    let e = ha.abort_job(name).expect_err("no job yet");
    assert!(e.to_string().contains("no job running"), "{e}");
    let silent =
        b.ns.run(|| TcpListener::bind("10.78.0.2:0"))
            .expect("a silent target on B");
    let silent_uri = format!("tcp:{}", silent.local_addr().expect("address"));
    let taker = std::thread::spawn(move || {
        // Takes whatever comes, says nothing.
        if let Ok((mut s, _)) = silent.accept() {
            let mut sink = [0u8; 65536];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
    });
    let slow = MigrationParams {
        bandwidth_mib_s: Some(1),
        ..params()
    };
    let to_silent = MigrationIncoming {
        uri: silent_uri.clone(),
        ..bogus.clone()
    };
    let before = *ticks(&log_a).last().expect("ticks");
    let asked = Instant::now();
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            // Once perform has begun (abort_job refuses before): retried.
            std::thread::sleep(Duration::from_millis(700));
            let since = Instant::now();
            while let Err(e) = ha.abort_job(name) {
                if since.elapsed() > WAIT {
                    // Unblocks perform, then fails the test.
                    let _ = ha.destroy_domain(name);
                    panic!("abort_job never took: {e}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        a.ns.run(|| ha.migrate_perform(name, &to_silent, &slow))
            .expect_err("aborted")
    });
    say(&format!("perform aborted after {:?}: {e}", asked.elapsed()));
    assert!(e.to_string().contains("aborted"), "{e}");
    ha.migrate_confirm(name, false).expect("confirm the abort");
    assert_eq!(
        a.info(name),
        Some((DomainState::Running, DomainReason::Booted))
    );
    wait_tick_above(&log_a, before + 2);
    assert!(vmm_alive(pid_a));
    let _ = taker.join();

    // 4. A prepared target: paused (migration), waiting. Streams of
    // another version, or whose snapshot is damaged, are refused with one
    // line saying why, and it waits on.
    let incoming =
        b.ns.run(|| hb.migrate_prepare(&def, &params()))
            .expect("prepare on B");
    say(&format!("incoming: {incoming:?}"));
    assert!(incoming.uri.starts_with("tcp:10.78.0.2:"), "{incoming:?}");
    assert_eq!(
        b.info(name),
        Some((DomainState::Paused, DomainReason::Migration))
    );
    let dir_b = b.run_dir(name);
    let pid_b = pid_in(&dir_b);
    let answer = b.ns.run(|| send_raw(&incoming.uri, &preamble(2, 64)));
    say(&format!("a version-2 stream: {}", answer.trim()));
    assert!(answer.contains("migration stream version 2"), "{answer}");
    let mut damaged = b"VIREOVMM".to_vec();
    damaged.extend_from_slice(&1u32.to_le_bytes());
    damaged.extend_from_slice(&0u32.to_le_bytes());
    damaged.extend_from_slice(&8u64.to_le_bytes());
    damaged.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    damaged.extend_from_slice(&0u32.to_le_bytes());
    damaged.extend_from_slice(&[1u8; 8]);
    let mut stream = preamble(1, damaged.len() as u64);
    stream.extend_from_slice(&damaged);
    let answer = b.ns.run(|| send_raw(&incoming.uri, &stream));
    say(&format!("a damaged snapshot: {}", answer.trim()));
    assert!(answer.contains("checksum"), "{answer}");
    let answer = b.ns.run(|| send_raw(&incoming.uri, &preamble(1, u64::MAX)));
    say(&format!("an endless stream: {}", answer.trim()));
    assert!(answer.contains("at most"), "{answer}");
    assert!(vmm_alive(pid_b), "B's vireo-vmm waits on");
    assert_eq!(
        b.info(name),
        Some((DomainState::Paused, DomainReason::Migration))
    );

    // 5. The migration. Both sides watched while it moves: the source must
    // never be seen running once the target was.
    let done = AtomicBool::new(false);
    let (stats, samples, last_a) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let target = b.info(name);
                let source = a.info(name);
                samples.push((target, source));
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        });
        let before = *ticks(&log_a).last().expect("ticks");
        let stats =
            a.ns.run(|| ha.migrate_perform(name, &incoming, &params()))
                .expect("perform on A");
        assert_eq!(
            a.info(name),
            Some((DomainState::Paused, DomainReason::Migration)),
            "the source after perform"
        );
        // The source's last counter (its run directory goes at confirm).
        let last_a = *ticks(&log_a).last().expect("ticks on A");
        let finished =
            b.ns.run(|| hb.migrate_finish(name, true))
                .expect("finish on B")
                .expect("the domain on B");
        assert!(finished.id.is_some());
        a.ns.run(|| ha.migrate_confirm(name, true))
            .expect("confirm on A");
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, Ordering::SeqCst);
        say(&format!("last counter on A before perform: {before}"));
        (stats, watcher.join().expect("watcher"), last_a)
    });
    say(&format!("stats: {stats:?}"));
    assert!(stats.total_ms > 0, "{stats:?}");
    assert!(stats.downtime_ms > 0, "{stats:?}");
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert_eq!(stats.disk_bytes, 0, "{stats:?}");
    let running = |s: &Option<(DomainState, DomainReason)>| {
        s.is_some_and(|(state, _)| state == DomainState::Running)
    };
    let first_target_run = samples
        .iter()
        .position(|(t, _)| running(t))
        .expect("the target was seen running");
    assert!(
        samples[first_target_run..]
            .iter()
            .all(|(_, source)| !running(source)),
        "the source ran after the target did: {samples:?}"
    );
    assert!(
        samples
            .iter()
            .any(|(_, s)| *s == Some((DomainState::Paused, DomainReason::Migration))),
        "the source was seen paused for the migration: {samples:?}"
    );
    say(&format!("{} samples of both sides", samples.len()));

    // The source: its vireo-vmm gone, its record undefined.
    let gone = Instant::now();
    while vmm_alive(pid_a) {
        assert!(
            gone.elapsed() < WAIT,
            "the source vireo-vmm {pid_a} is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ha.domain_info(name).is_err(), "A still has the domain");
    assert!(!dir_a.exists(), "A's run directory is removed");

    // The target: the same vireo-vmm as prepared, running (migrated),
    // persistent, the counter going on from where it was, no second boot,
    // and no received snapshot left in its run directory.
    assert_eq!(pid_in(&dir_b), pid_b);
    assert_eq!(
        b.info(name),
        Some((DomainState::Running, DomainReason::Migrated))
    );
    assert!(hb.domain_is_persistent(name).expect("persistent"));
    let log_b = dir_b.join("console.log");
    let on_b = wait_tick_above(&log_b, last_a + 2);
    say(&format!(
        "counter: A ended at {last_a}, B went on with {:?}",
        &on_b[..on_b.len().min(5)]
    ));
    assert!(
        on_b[0] >= last_a && on_b[0] <= last_a + 3,
        "B's counter does not go on from A's {last_a}: {on_b:?}"
    );
    let text_b = log_text(&log_b);
    assert!(
        !text_b.contains(MARKER),
        "the guest booted again on B:\n{text_b}"
    );
    assert!(
        !dir_b.join("incoming.snap").exists(),
        "the received snapshot is left in B's run directory"
    );

    b.ns.run(|| hb.destroy_domain(name)).expect("destroy on B");
    hb.undefine_domain(name).expect("undefine on B");
    // Passed: the state directories go, once the drivers are closed (a
    // driver's watcher would make its lock file again).
    let roots = [a.root.clone(), b.root.clone()];
    drop((a, b));
    for root in roots {
        let _ = std::fs::remove_dir_all(root);
    }
}
