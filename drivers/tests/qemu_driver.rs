//! The qemu driver with the real Linux guest image under TCG: the lifecycle
//! a user runs, re-adoption by a new driver, a QEMU killed from outside, and
//! the serial console socket.
//!
//! Without `qemu-system-x86_64` these tests fail when `CI` is set, and
//! otherwise print a SKIP line and return.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    STATE_TIMEOUT, console_log, expect_state, fresh_root, linux_domain, open_qemu, qemu_available,
    say, yaml,
};
use vireo_crds::{DomainReason, DomainState, LifecycleAction};
use vireo_drivers::qemu::wait_for_console;
use vireo_drivers::{Connection, Lookup};

const MARKER: &str = "VIREO-GUEST-READY";
const MARKER_TIMEOUT: Duration = Duration::from_secs(30);

fn console_socket(root: &Path, conn: &Connection, name: &str) -> std::path::PathBuf {
    console_log(root, conn, name).with_file_name("console.sock")
}

fn pid_of(root: &Path, conn: &Connection, name: &str) -> u32 {
    let path = console_log(root, conn, name).with_file_name("pid");
    std::fs::read_to_string(&path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

/// Appends to the console log only; each boot's marker count tells boots apart.
fn markers(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(MARKER)
        .count()
}

fn wait_markers(log: &Path, n: usize, timeout: Duration) {
    let start = Instant::now();
    while markers(log) < n {
        assert!(
            start.elapsed() < timeout,
            "the guest did not print {MARKER} (boot {n}) within {timeout:?}; console:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn qemu_domain_lifecycle_with_real_guest() {
    if !qemu_available("qemu_domain_lifecycle_with_real_guest") {
        return;
    }
    let root = fresh_root("qemu-life");
    let conn = open_qemu(&root);
    let hv = conn.hypervisor();
    let name = "life";
    hv.define_domain(&linux_domain(name, None, ""))
        .expect("define");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Unknown);

    let started = Instant::now();
    let first = hv.start_domain(name).expect("start");
    let log = console_log(&root, &conn, name);
    wait_markers(&log, 1, MARKER_TIMEOUT);
    say(&format!(
        "qemu lifecycle: marker {:?} after start",
        started.elapsed()
    ));
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);
    assert!(first.id.is_some(), "a started domain has an ID");
    let info = hv.domain_info(name).expect("info");
    assert_eq!(info.vcpus, 1);
    assert!(
        info.cpu_time_ns > 0,
        "a booted guest used CPU time: {info:?}"
    );

    hv.suspend_domain(name).expect("suspend");
    expect_state(&conn, name, DomainState::Paused, DomainReason::User);
    // A paused guest uses no CPU.
    let t0 = hv.domain_info(name).expect("info").cpu_time_ns;
    std::thread::sleep(Duration::from_millis(500));
    let t1 = hv.domain_info(name).expect("info").cpu_time_ns;
    assert!(
        t1 - t0 < 200_000_000,
        "a paused guest kept using CPU: {t0} -> {t1} ns"
    );
    hv.resume_domain(name).expect("resume");
    expect_state(&conn, name, DomainState::Running, DomainReason::Unpaused);

    hv.shutdown_domain(name).expect("shutdown");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Shutdown);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("VIREO-GUEST-POWEROFF"),
        "the guest powered itself off on the ACPI button; console:\n{text}"
    );

    let second = hv.start_domain(name).expect("start again");
    assert!(
        second.id.is_some() && second.id != first.id,
        "a new activation gets a new ID: {first:?} then {second:?}"
    );
    wait_markers(&log, 2, MARKER_TIMEOUT);
    hv.destroy_domain(name).expect("destroy");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Destroyed);
    assert!(
        hv.lookup_domain(Lookup::Name(name))
            .expect("lookup")
            .id
            .is_none(),
        "a destroyed domain has no ID"
    );
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_new_driver_readopts_a_running_guest() {
    if !qemu_available("a_new_driver_readopts_a_running_guest") {
        return;
    }
    let root = fresh_root("qemu-adopt");
    let name = "adopt";
    let (id, pid, log) = {
        let conn = open_qemu(&root);
        let r = conn
            .hypervisor()
            .create_domain(&linux_domain(name, None, ""))
            .expect("create");
        let log = console_log(&root, &conn, name);
        wait_markers(&log, 1, MARKER_TIMEOUT);
        (r.id, pid_of(&root, &conn, name), log)
        // The driver (and its watcher) goes away here; QEMU must not.
    };
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU (pid {pid}) outlives the driver"
    );
    let conn = open_qemu(&root);
    let hv = conn.hypervisor();
    let again = hv
        .lookup_domain(Lookup::Name(name))
        .expect("lookup after reopening");
    assert_eq!(again.id, id, "the re-adopted domain keeps its ID");
    assert_eq!(pid_of(&root, &conn, name), pid, "the same QEMU process");
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);
    assert_eq!(markers(&log), 1, "the guest was not restarted");
    hv.destroy_domain(name).expect("destroy");
    assert!(
        hv.lookup_domain(Lookup::Name(name)).is_err(),
        "a destroyed transient domain is gone"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_killed_qemu_is_shutoff_crashed() {
    if !qemu_available("a_killed_qemu_is_shutoff_crashed") {
        return;
    }
    let root = fresh_root("qemu-kill");
    let conn = open_qemu(&root);
    let hv = conn.hypervisor();
    let name = "killed";
    hv.define_domain(&linux_domain(name, None, ""))
        .expect("define");
    hv.start_domain(name).expect("start");
    let pid = pid_of(&root, &conn, name);
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Crashed);
    assert!(
        hv.lookup_domain(Lookup::Name(name))
            .expect("lookup")
            .id
            .is_none(),
        "a crashed domain has no ID"
    );
    // It can start again.
    hv.start_domain(name).expect("start after a crash");
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);
    hv.destroy_domain(name).expect("destroy");
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

/// A kernel panic inside the guest (pvpanic) is libvirt's crash: with
/// `onCrash: preserve` the guest is kept, crashed (panicked); with the
/// default (destroy) it is shutoff (crashed); with restart it boots again.
#[test]
fn a_guest_kernel_panic_follows_on_crash() {
    if !qemu_available("a_guest_kernel_panic_follows_on_crash") {
        return;
    }
    let root = fresh_root("qemu-panic");
    let conn = open_qemu(&root);
    let hv = conn.hypervisor();
    let panic_cmd = r#"vireo.net=0 vireo.run="echo c > /proc/sysrq-trigger""#;
    let cases = [
        (
            LifecycleAction::Preserve,
            DomainState::Crashed,
            DomainReason::Panicked,
        ),
        (
            LifecycleAction::Destroy,
            DomainState::Shutoff,
            DomainReason::Crashed,
        ),
    ];
    for (action, state, reason) in cases {
        let name = format!("panic-{action:?}").to_lowercase();
        let mut d = linux_domain(&name, None, panic_cmd);
        d.spec.lifecycle.on_crash = action;
        hv.define_domain(&d).expect("define");
        hv.start_domain(&name).expect("start");
        expect_state(&conn, &name, state, reason);
        let log = console_log(&root, &conn, &name);
        assert!(
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Kernel panic"),
            "the guest panicked (its console says so)"
        );
        hv.destroy_domain(&name).ok();
        hv.undefine_domain(&name).expect("undefine");
    }
    // Restart: reset in place, the same activation boots a second time.
    let name = "panic-restart";
    let mut d = linux_domain(name, None, panic_cmd);
    d.spec.lifecycle.on_crash = LifecycleAction::Restart;
    hv.define_domain(&d).expect("define");
    hv.start_domain(name).expect("start");
    let log = console_log(&root, &conn, name);
    wait_markers(&log, 2, Duration::from_secs(90));
    hv.destroy_domain(name).expect("destroy");
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

/// A qcow2 disk under the qemu driver: an overlay on a raw base volume of
/// a dir pool. The guest makes a filesystem and writes a file through the
/// overlay; a second boot reads it back; the base volume stays untouched
/// (all zeros) and the overlay's file grew with what was written.
#[test]
fn a_guest_on_a_qcow2_overlay_volume() {
    if !qemu_available("a_guest_on_a_qcow2_overlay_volume") {
        return;
    }
    if !vireo_drivers::storage::dir::qemu_img::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img is missing and CI is set (scripts/setup installs qemu-utils)"
        );
        say("SKIP a_guest_on_a_qcow2_overlay_volume: qemu-img is not installed");
        return;
    }
    use std::sync::Arc;
    use vireo_drivers::StorageDriver;
    let root = fresh_root("qemu-qcow2");
    let (storage, pool_dir) = common::started_pool(&root);
    let base: vireo_crds::StorageVol = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: base}\nspec: {pool: p, capacity: 64Mi, format: raw}\n",
    );
    storage.create_volume(&base).expect("base volume");
    let overlay: vireo_crds::StorageVol = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: top}\nspec: {pool: p, capacity: 64Mi, format: qcow2, source: {clone: {volume: base, overlay: true}}}\n",
    );
    storage.create_volume(&overlay).expect("overlay volume");
    let top_before = std::fs::metadata(pool_dir.join("top"))
        .expect("overlay file")
        .len();

    let networks = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let conn = vireo_drivers::qemu::open_with(
        &format!("qemu:///embed?root={}", root.display()),
        &format!("/embed?root={}", root.display()),
        networks,
        storage.clone(),
    )
    .expect("opens the qemu driver with the dir backend");
    let hv = conn.hypervisor();
    let run = "if [ -f /mnt/vda/hello ]; then echo GOT-$(cat /mnt/vda/hello); else echo qcow2-was-here > /mnt/vda/hello; sync; echo WROTE-$((40+2)); fi";
    let mut d = linux_domain(
        "q2",
        None,
        &format!("vireo.net=0 vireo.mkfs=auto vireo.run=\"{run}\""),
    );
    d.spec.devices.disks = vec![vireo_crds::Disk {
        name: "vda".into(),
        volume: "top".into(),
        ..Default::default()
    }];
    hv.define_domain(&d).expect("define");
    let log = console_log(&root, &conn, "q2");
    for (boot, want) in [(1, "WROTE-42"), (2, "GOT-qcow2-was-here")] {
        hv.start_domain("q2").expect("start");
        let text = wait_for_console(&log, "VIREO-GUEST-RUN-END", STATE_TIMEOUT)
            .unwrap_or_else(|t| panic!("boot {boot}: no run end; console:\n{t}"));
        let this_boot = text.rsplit("VIREO-GUEST-READY").next().unwrap_or("");
        assert!(
            this_boot.contains(want),
            "boot {boot}: no {want}; console:\n{text}"
        );
        // `domblkstat`: QEMU's counters of the disk, under virsh's names.
        let stats = hv.domain_block_stats("q2", "vda").expect("block stats");
        let get = |k: &str| {
            stats
                .iter()
                .find(|(n, _)| *n == format!("vda {k}"))
                .map_or(-1, |(_, v)| *v)
        };
        assert!(get("rd_req") > 0 && get("rd_bytes") > 0, "{stats:?}");
        if boot == 1 {
            assert!(get("wr_req") > 0 && get("wr_bytes") > 0, "{stats:?}");
        }
        assert!(
            hv.domain_block_stats("q2", "vdz").is_err(),
            "a disk the domain lacks"
        );
        // `vcpuinfo`: each vCPU's thread, the CPU it ran on, its time.
        let vcpus = hv.domain_vcpu_info("q2").expect("vcpu info");
        assert_eq!(vcpus.len() as u32, d.spec.vcpus, "{vcpus:?}");
        for v in &vcpus {
            assert!(v.cpu.is_some() && v.cpu_time_ns.is_some(), "{v:?}");
            assert_eq!(v.state.as_deref(), Some("running"));
            assert!(v.affinity.contains('y'), "{v:?}");
        }
        hv.shutdown_domain("q2").expect("shutdown");
        expect_state(&conn, "q2", DomainState::Shutoff, DomainReason::Shutdown);
        // The next boot's run end is a new line in the same log.
        std::fs::write(&log, "").expect("truncate the console log");
    }
    let base_bytes = std::fs::read(pool_dir.join("base")).expect("base file");
    assert!(
        base_bytes.iter().all(|b| *b == 0),
        "the base volume was not written through the overlay"
    );
    let top_after = std::fs::metadata(pool_dir.join("top"))
        .expect("overlay file")
        .len();
    assert!(
        top_after > top_before + (1 << 20),
        "the overlay holds what the guest wrote: {top_before} -> {top_after} bytes"
    );
    hv.undefine_domain("q2").expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_console_socket_carries_both_ways() {
    if !qemu_available("the_console_socket_carries_both_ways") {
        return;
    }
    let root = fresh_root("qemu-console");
    let conn = open_qemu(&root);
    let name = "console";
    conn.hypervisor()
        .create_domain(&linux_domain(name, None, "vireo.net=0 vireo.shell=1"))
        .expect("create");
    let log = console_log(&root, &conn, name);
    wait_for_console(&log, "VIREO-GUEST-SETUP-DONE", MARKER_TIMEOUT)
        .unwrap_or_else(|text| panic!("no set-up marker; console:\n{text}"));
    let mut sock =
        UnixStream::connect(console_socket(&root, &conn, name)).expect("connect to the console");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let token = format!("echo-{}", std::process::id());
    let start = Instant::now();
    let mut seen = String::new();
    let mut last_send = None::<Instant>;
    while !seen.contains(&format!("OUT:{token}")) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no answer from the guest's shell through the console socket; read:\n{seen}"
        );
        if last_send.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(3)) {
            sock.write_all(format!("\necho OUT:{token}\n").as_bytes())
                .expect("write");
            last_send = Some(Instant::now());
        }
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    conn.hypervisor().destroy_domain(name).expect("destroy");
    let _ = std::fs::remove_dir_all(&root);
}

/// `spec.arch`: qemu-system-x86_64 runs x86_64 and i686 guests; any other
/// architecture is refused at define, naming the field (no QEMU needed).
#[test]
fn an_arch_the_node_cannot_run_is_refused() {
    let root = fresh_root("qemu-arch");
    let conn = open_qemu(&root);
    let mut d = vireo_crds::Domain::new(
        "arm",
        vireo_crds::DomainSpec {
            domain_type: vireo_crds::DomainType::Qemu,
            arch: Some("aarch64".into()),
            uuid: None,
            memory: k8s_openapi::apimachinery::pkg::api::resource::Quantity("256Mi".into()),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: None,
            devices: Default::default(),
            cloud_init: None,
            run_strategy: vireo_crds::RunStrategy::Manual,
            lifecycle: Default::default(),
            node_selector: None,
            eviction_strategy: None,
        },
    );
    let err = conn
        .hypervisor()
        .define_domain(&d)
        .expect_err("aarch64 on qemu-system-x86_64");
    let msg = err.to_string();
    assert!(
        msg.contains("spec.arch") && msg.contains("'aarch64'") && msg.contains("x86_64 and i686"),
        "{msg}"
    );
    for arch in ["i686", "x86_64"] {
        d.spec.arch = Some(arch.into());
        if let Err(e) = conn.hypervisor().define_domain(&d) {
            assert!(!e.to_string().contains("spec.arch"), "{arch}: {e}");
        }
    }
}
