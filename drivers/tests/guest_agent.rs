//! The guest agent through the qemu driver, on the real busybox guest under
//! TCG: `vireo-guest-agent` (scripts/guest-agent.sh) appended to the guest's
//! initramfs answers on the virtio-serial port every qemu guest gets. What
//! a user sees: guest info, a freeze that makes a copy of the disk hold
//! data the guest had not synced, a thaw, an agent shutdown of a guest
//! that ignores the ACPI power button; and a guest without an agent, whose
//! calls fail as "not responding" while everything else works.
//!
//! Without `qemu-system-x86_64` these tests fail when `CI` is set, and
//! otherwise print a SKIP line and return.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fresh_root, linux_domain, qemu_available, repo_root, say, yaml};
use vireo_crds::{DomainReason, DomainState};
use vireo_drivers::conformance::wait_for_state;
use vireo_drivers::qemu::wait_for_console;
use vireo_drivers::{Error, HypervisorDriver, Lookup, StorageDriver};

const T: Duration = Duration::from_secs(90);

/// scripts/guest-agent.sh's directory (the static agent and its cpio).
fn agent_dir() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/guest-agent.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("runs scripts/guest-agent.sh");
    assert!(out.status.success(), "scripts/guest-agent.sh failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("a directory").trim())
}

/// The guest image's initramfs with the agent's cpio appended (the kernel
/// unpacks concatenated archives in turn).
fn initrd_with_agent(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(common::guest_image().join("initrd.img")).expect("initrd");
    bytes.extend(std::fs::read(agent_dir().join("agent.cpio.gz")).expect("agent cpio"));
    let path = dir.join("initrd-agent.img");
    std::fs::write(&path, bytes).expect("write initrd");
    path
}

/// Asks for guest info until the agent answers (it starts after the
/// guest's set-up).
fn wait_agent(hv: &dyn HypervisorDriver, name: &str) -> vireo_crds::GuestInfo {
    let start = Instant::now();
    loop {
        match hv.guest_info(name) {
            Ok(info) => {
                say(&format!(
                    "guest agent of {name}: answered {:?} after start",
                    start.elapsed()
                ));
                return info;
            }
            Err(e) => {
                assert!(
                    start.elapsed() < T,
                    "the guest agent of {name} did not answer within {T:?}: {e}"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .stderr(Stdio::null())
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guest_agent_info_freeze_and_shutdown_on_qemu() {
    if !qemu_available("guest_agent_info_freeze_and_shutdown_on_qemu") {
        return;
    }
    let root = fresh_root("qemu-agent");
    let (storage, pool_dir) = common::started_pool(&root);
    let data: vireo_crds::StorageVol = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: data}\nspec: {pool: p, capacity: 32Mi, format: raw}\n",
    );
    storage.create_volume(&data).expect("data volume");
    let networks = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let conn = vireo_drivers::qemu::open_with(
        &format!("qemu:///embed?root={}", root.display()),
        &format!("/embed?root={}", root.display()),
        networks,
        storage.clone(),
    )
    .expect("opens the qemu driver");
    let hv = conn.hypervisor();

    // A guest with the agent, a disk, and no ear for the power button.
    // Its command writes a file and does not sync it.
    let mut with = linux_domain(
        "ga",
        None,
        "vireo.net=0 vireo.mkfs=1 vireo.acpi=0 vireo.run=\"echo unsynced-data-42 > /mnt/vda/marker\"",
    );
    if let Some(os) = with.spec.os.as_mut() {
        os.initrd = Some(initrd_with_agent(&root).display().to_string());
    }
    with.spec.devices.disks = vec![vireo_crds::Disk {
        name: "vda".into(),
        volume: "data".into(),
        ..Default::default()
    }];
    // And one without.
    let without = linux_domain("plain", None, "vireo.net=0");
    hv.define_domain(&with).expect("define ga");
    hv.define_domain(&without).expect("define plain");
    hv.start_domain("ga").expect("start ga");
    hv.start_domain("plain").expect("start plain");

    wait_agent(hv, "ga");
    // Once the guest has mounted its disk and run its command:
    let uuid = hv.lookup_domain(Lookup::Name("ga")).expect("lookup").uuid;
    let log = root.join("run").join(&uuid).join("console.log");
    wait_for_console(&log, "VIREO-GUEST-RUN-END", T)
        .unwrap_or_else(|t| panic!("the guest's command did not run; console:\n{t}"));
    let info = hv.guest_info("ga").expect("guest info");
    assert_eq!(info.hostname.as_deref(), Some("vireo-guest"), "{info:?}");
    let os = info.os.clone().expect("os info");
    assert!(
        os.kernel_release
            .as_deref()
            .is_some_and(|k| k.contains("cloud-amd64")),
        "{os:?}"
    );
    let lo = info
        .interfaces
        .iter()
        .find(|i| i.name == "lo")
        .expect("lo in the guest's interfaces");
    assert!(lo.addresses.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");
    assert!(
        info.filesystems.iter().any(|f| f.mountpoint == "/mnt/vda"),
        "{:?}",
        info.filesystems
    );
    assert_eq!(info.fs_freeze.as_deref(), Some("thawed"));
    assert!(info.agent_version.is_some());

    // Freeze, copy the disk, thaw: the copy has what the guest had only in
    // its page cache before the freeze.
    let frozen = hv.guest_fs_freeze("ga", &[]).expect("freeze");
    assert!(frozen >= 1, "froze {frozen}");
    assert_eq!(
        hv.guest_info("ga")
            .expect("info while frozen")
            .fs_freeze
            .as_deref(),
        Some("frozen")
    );
    let snap: vireo_crds::StorageVol = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: snap}\nspec: {pool: p, capacity: 32Mi, format: raw, source: {clone: {volume: data}}}\n",
    );
    storage
        .create_volume(&snap)
        .expect("copy of the frozen disk");
    let thawed = hv.guest_fs_thaw("ga").expect("thaw");
    assert_eq!(thawed, frozen, "thaws what it froze");
    let marker = debugfs_cat(&pool_dir.join("snap"), "/marker");
    assert!(
        marker.contains("unsynced-data-42"),
        "the copy taken while frozen holds the guest's unsynced write: {marker:?}"
    );

    // No agent: "not responding" (QEMU says the guest never opened the
    // port, so there is no timeout to wait), and nothing else minds.
    let e = hv.guest_info("plain").expect_err("no agent in plain");
    assert!(matches!(e, Error::AgentUnresponsive { .. }), "{e}");
    assert!(
        e.to_string().contains("guest agent is not responding"),
        "{e}"
    );
    assert!(e.to_string().contains("no agent has opened"), "{e}");
    let e = hv
        .guest_agent_shutdown("plain", false)
        .expect_err("no agent");
    assert!(matches!(e, Error::AgentUnresponsive { .. }), "{e}");
    assert_eq!(
        hv.domain_info("plain").expect("info").state,
        DomainState::Running
    );

    // The power button does nothing to ga; its agent powers it off.
    hv.shutdown_domain("ga").expect("ACPI shutdown request");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        hv.domain_info("ga").expect("info").state,
        DomainState::Running,
        "the guest ignores the ACPI power button (vireo.acpi=0)"
    );
    hv.guest_agent_shutdown("ga", false)
        .expect("shutdown --mode agent");
    let reason =
        wait_for_state(&conn, "ga", DomainState::Shutoff, T).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(reason, DomainReason::Shutdown);
    // Calls on a stopped guest say so.
    let e = hv.guest_info("ga").expect_err("not running");
    assert!(e.to_string().contains("not running"), "{e}");

    // plain still takes the driver's other calls (the power button's
    // shutdown is the lifecycle tests' business).
    hv.destroy_domain("plain").expect("destroy plain");
    assert_eq!(
        hv.domain_info("plain").expect("info").state,
        DomainState::Shutoff
    );
    let _ = std::fs::remove_dir_all(&root);
}
