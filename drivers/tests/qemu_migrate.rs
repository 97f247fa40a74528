//! Live migration under the qemu driver between two "nodes": two driver
//! instances with their own state directories and dir pools, each in a
//! network namespace of the test's own, joined by a veth pair (10.77.0.1
//! and 10.77.0.2). The real Linux guest (TCG) writes a growing file on its
//! disk (a qcow2 volume on the source, a raw one on the target) and prints
//! a counter on its console.
//!
//! Checked: a target that cannot prepare (its volume missing) and a
//! target that does not answer (closed ports, with and without disk
//! copies) leave the guest running on the source with a clear error; a
//! prepared target thrown away by finish(false) leaves nothing there; an
//! abort (`domjobabort`) while the state is sent fails the perform and
//! leaves the guest running on the source; a
//! migration with `copy_storage` moves the guest without a second boot
//! (the counter goes on), the target's disk holds every line the guest
//! wrote before and after, the source's QEMU is gone and its record
//! undefined, the source never ran once the target did, and the stats are
//! not zero.
//!
//! Needs root (network namespaces), `ip`, `debugfs` (e2fsprogs) and
//! qemu-system-x86_64: without them the test fails when `CI` is set and
//! otherwise prints a SKIP line and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::netns::{Node, find};
use common::{QEMU, expect_state, linux_domain, numbers_after, say, yaml};
use vireo_crds::{DomainReason, DomainState, StorageVol};
use vireo_drivers::StorageDriver;
use vireo_drivers::migration::{MigrationIncoming, MigrationParams};

const WAIT: Duration = Duration::from_secs(90);
/// Each second: a line appended to the disk's file and flushed, then the
/// counter on the console (so every counter printed is on the disk).
const WRITER: &str = r#"vireo.net=0 vireo.mkfs=1 vireo.run="i=0; while :; do i=$((i+1)); echo line-$i >> /mnt/vda/log; sync; echo TICK-$i; sleep 1; done""#;

/// Whether the test can run here; fails under CI when it cannot.
fn available(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces)".to_string());
    }
    for (prog, pkg) in [
        ("ip", "iproute2"),
        ("debugfs", "e2fsprogs"),
        (QEMU, "qemu-system-x86"),
    ] {
        if find(prog).is_none() {
            missing.push(format!("{prog} ({pkg})"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs {what}, and CI is set (scripts/setup installs them)");
    }
    say(&format!("SKIP {test}: needs {what}; not run"));
    false
}

/// One node: its namespace, its qemu driver and its pool `p`.
fn node(tag: &str) -> Node {
    Node::new(
        "qemu",
        &format!("mig-{tag}"),
        vireo_drivers::qemu::open_with,
    )
}

/// A domain's console log on a node.
fn console(node: &Node, name: &str) -> PathBuf {
    node.run_dir(name).join("console.log")
}

fn volume(name: &str, format: &str) -> StorageVol {
    yaml(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: {name}}}\nspec: {{pool: p, capacity: 64Mi, format: {format}}}\n"
    ))
}

fn ticks(log: &Path) -> Vec<u64> {
    numbers_after(log, 0, "TICK-")
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
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("qemu"))
        .unwrap_or(false)
}

fn params(copy_storage: bool) -> MigrationParams {
    MigrationParams {
        target_address: "10.77.0.2".into(),
        copy_storage,
        max_downtime_ms: Some(300),
        bandwidth_mib_s: None,
    }
}

#[test]
fn qemu_live_migration_moves_a_writing_guest_and_failures_leave_it_on_the_source() {
    let test = "qemu_live_migration_moves_a_writing_guest_and_failures_leave_it_on_the_source";
    if !available(test) {
        return;
    }
    let a = node("a");
    let b = node("b");
    // The wire between the two nodes.
    a.ns.link(&b.ns, "vm", ["10.77.0.1/24", "10.77.0.2/24"]);

    // The guest on A, its disk a qcow2 volume of A's pool.
    a.storage
        .create_volume(&volume("data", "qcow2"))
        .expect("volume on A");
    let name = "mover";
    let mut def = linux_domain(name, None, WRITER);
    def.spec.memory = k8s_openapi::apimachinery::pkg::api::resource::Quantity("128Mi".into());
    def.spec.devices.disks = vec![vireo_crds::Disk {
        name: "vda".into(),
        volume: "data".into(),
        ..Default::default()
    }];
    let (ha, hb) = (a.conn.hypervisor(), b.conn.hypervisor());
    a.ns.run(|| {
        ha.define_domain(&def).expect("define on A");
        ha.start_domain(name).expect("start on A");
    });
    let log_a = console(&a, name);
    wait_tick_above(&log_a, 2);
    let pid_a: u32 = std::fs::read_to_string(log_a.with_file_name("pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let def = ha.domain_definition(name, true).expect("A's definition");

    // 1. The target cannot prepare: its volume is missing. Nothing is made.
    let e =
        b.ns.run(|| hb.migrate_prepare(&def, &params(true)))
            .expect_err("no volume on B");
    say(&format!("prepare without the volume: {e}"));
    assert!(
        e.to_string().contains("spec.devices.disks[0].volume"),
        "the error names the field: {e}"
    );
    assert!(hb.domain_info(name).is_err(), "B keeps nothing of it");
    assert_eq!(a.info(name).map(|i| i.0), Some(DomainState::Running));

    // 2. A target that does not answer: closed ports on B, with a disk
    // copy (the NBD connection fails) and without (the migration does).
    // The guest runs on A throughout, and confirm(false) keeps it there.
    b.storage
        .create_volume(&volume("data", "raw"))
        .expect("volume on B");
    for copy in [true, false] {
        let bogus = MigrationIncoming {
            uri: "tcp:10.77.0.2:9".into(),
            disks: vec![("vda".into(), "nbd://10.77.0.2:9/vda".into())],
            cookie: serde_json::json!({ "driver": "qemu" }),
        };
        let before = *ticks(&log_a).last().expect("ticks");
        let e =
            a.ns.run(|| ha.migrate_perform(name, &bogus, &params(copy)))
                .expect_err("nobody listens on B");
        say(&format!("perform to a closed port (copy {copy}): {e}"));
        assert!(
            e.to_string().contains("10.77.0.2:9"),
            "the error says where it could not go: {e}"
        );
        ha.migrate_confirm(name, false)
            .expect("confirm the failure");
        assert_eq!(
            a.info(name),
            Some((DomainState::Running, DomainReason::Booted))
        );
        wait_tick_above(&log_a, before + 1);
        assert!(qemu_alive(pid_a));
    }

    // 3. A prepared target thrown away (finish told the perform failed):
    // its QEMU and its record go, the volume that was there stays.
    b.ns.run(|| hb.migrate_prepare(&def, &params(true)))
        .expect("prepare on B");
    let pid_b: u32 = std::fs::read_to_string(console(&b, name).with_file_name("pid"))
        .expect("B's pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(qemu_alive(pid_b));
    let thrown = hb.migrate_finish(name, false).expect("finish(false)");
    assert!(thrown.is_none());
    assert!(!qemu_alive(pid_b), "B's QEMU {pid_b} is still there");
    assert!(hb.domain_info(name).is_err(), "B keeps no record");
    assert!(b.pool_dir.join("data").exists(), "B's volume stays");
    assert_eq!(a.info(name).map(|i| i.0), Some(DomainState::Running));

    // 3b. An abort (`domjobabort`) while the state goes at 1 MiB/s, which
    // would take minutes: perform fails saying so, the guest runs on on A,
    // and B's half is thrown away. With nothing being sent, an abort is
    // refused.
    let e = ha.abort_job(name).expect_err("no job yet");
    assert!(e.to_string().contains("no job running"), "{e}");
    let incoming =
        b.ns.run(|| hb.migrate_prepare(&def, &params(true)))
            .expect("prepare on B");
    let slow = MigrationParams {
        bandwidth_mib_s: Some(1),
        ..params(true)
    };
    let before = *ticks(&log_a).last().expect("ticks");
    let asked = Instant::now();
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            // Once perform has begun (abort_job refuses before): retried.
            std::thread::sleep(Duration::from_secs(3));
            let since = Instant::now();
            while let Err(e) = ha.abort_job(name) {
                if since.elapsed() > WAIT {
                    // Unblocks perform, then fails the test.
                    let _ = ha.destroy_domain(name);
                    panic!("abort_job never took: {e}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        a.ns.run(|| ha.migrate_perform(name, &incoming, &slow))
            .expect_err("aborted")
    });
    say(&format!("perform aborted after {:?}: {e}", asked.elapsed()));
    assert!(e.to_string().contains("aborted"), "{e}");
    ha.migrate_confirm(name, false).expect("confirm the abort");
    assert!(
        hb.migrate_finish(name, false)
            .expect("finish(false)")
            .is_none()
    );
    assert!(hb.domain_info(name).is_err(), "B keeps no record");
    assert_eq!(
        a.info(name),
        Some((DomainState::Running, DomainReason::Booted))
    );
    wait_tick_above(&log_a, before + 2);
    assert!(qemu_alive(pid_a));

    // 4. The migration, with the disk copied.
    let incoming =
        b.ns.run(|| hb.migrate_prepare(&def, &params(true)))
            .expect("prepare on B");
    say(&format!("incoming: {incoming:?}"));
    assert!(incoming.uri.starts_with("tcp:10.77.0.2:"), "{incoming:?}");
    assert_eq!(incoming.disks.len(), 1, "{incoming:?}");
    assert_eq!(
        b.info(name),
        Some((DomainState::Paused, DomainReason::Migration))
    );
    // Both sides watched while it moves: the source must never be seen
    // running once the target was.
    let done = AtomicBool::new(false);
    let (stats, samples, last_a) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let target = b.info(name);
                let source = a.info(name);
                samples.push((target, source));
                std::thread::sleep(Duration::from_millis(25));
            }
            samples
        });
        let before = *ticks(&log_a).last().expect("ticks");
        let stats =
            a.ns.run(|| ha.migrate_perform(name, &incoming, &params(true)))
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
        // A little while of both after the switch.
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, Ordering::SeqCst);
        say(&format!("last counter on A before perform: {before}"));
        (stats, watcher.join().expect("watcher"), last_a)
    });
    say(&format!("stats: {stats:?}"));
    assert!(stats.total_ms > 0, "{stats:?}");
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert!(stats.disk_bytes > 0, "{stats:?}");
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

    // The source: its QEMU gone, its record undefined, its volume kept.
    let gone = Instant::now();
    while qemu_alive(pid_a) {
        assert!(
            gone.elapsed() < WAIT,
            "the source QEMU {pid_a} is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ha.domain_info(name).is_err(), "A still has the domain");
    assert!(a.pool_dir.join("data").exists(), "A's volume stays");

    // The target: running (migrated), persistent, the counter going on
    // from where it was, and no second boot.
    assert_eq!(
        b.info(name),
        Some((DomainState::Running, DomainReason::Migrated))
    );
    assert!(hb.domain_is_persistent(name).expect("persistent"));
    assert!(!log_a.exists(), "A's run directory is removed");
    let log_b = console(&b, name);
    let on_b = wait_tick_above(&log_b, last_a + 2);
    say(&format!(
        "counter: A ended at {last_a}, B went on with {:?}",
        &on_b[..on_b.len().min(5)]
    ));
    assert!(
        on_b[0] >= last_a && on_b[0] <= last_a + 3,
        "B's counter does not go on from A's {last_a}: {on_b:?}"
    );
    let text_b = std::fs::read_to_string(&log_b).unwrap_or_default();
    assert!(
        !text_b.contains("VIREO-GUEST-READY"),
        "the guest booted again on B:\n{text_b}"
    );

    // Shut down cleanly (the guest unmounts its disk), then read the file
    // from B's raw volume: every line, from before and after the move.
    let last_b = *on_b.last().expect("ticks");
    b.ns.run(|| hb.shutdown_domain(name))
        .expect("shutdown on B");
    expect_state(&b.conn, name, DomainState::Shutoff, DomainReason::Shutdown);
    let image = b.pool_dir.join("data");
    let out = Command::new(find("debugfs").expect("debugfs"))
        .args(["-R", "cat /log"])
        .arg(&image)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("runs debugfs");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() as u64 >= last_b,
        "the file on B has {} lines; the guest printed counter {last_b}",
        lines.len()
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("line-{}", i + 1),
            "line {} of the file",
            i + 1
        );
    }
    say(&format!(
        "the file on B's disk: {} lines, all in order",
        lines.len()
    ));
    hb.undefine_domain(name).expect("undefine on B");
    // Passed: the state directories (and their 64 MiB volumes) go.
    for node in [&a, &b] {
        let _ = std::fs::remove_dir_all(&node.root);
    }
}
