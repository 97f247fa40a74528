//! Starts interrupted by the death of the process that made them (an agent
//! SIGKILLed, OOM-killed or evicted mid-start), as the next agent finds
//! them (issue 23; agent/tests/restart.rs and e2e/tests/restart.rs kill
//! real agents at these moments):
//!
//! - a network whose bridge was made but not yet given its alias (two
//!   netlink requests): the next start clears it instead of refusing the
//!   bridge forever as someone else's;
//! - a domain whose record says its launch was under way: the next driver
//!   adopts the VM process that launch started (same PID, same ID) instead
//!   of starting a second one beside it, or, when no process was started,
//!   shows the domain shut off (failed) and can start it.
//!
//! The network test needs root, `ip`, `nft` and `dnsmasq`; the domain tests
//! need `qemu-system-x86_64`. Without them a test fails when `CI` is set,
//! and otherwise prints a SKIP line and returns.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fresh_root, linux_domain, qemu_available, say};
use serde_json::Value;
use vireo_crds::network::IpSpec;
use vireo_crds::{DomainReason, DomainState, ForwardMode, Network, NetworkSpec};
use vireo_drivers::bridge::{BridgeDriver, netlink};
use vireo_drivers::conformance::wait_for_state;
use vireo_drivers::{Connection, Lookup, NetworkDriver};

#[path = "../../e2e/tests/common/netns.rs"]
mod netns;

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(program).is_file())
}

fn networking_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = ["ip", "nft", "dnsmasq"]
        .into_iter()
        .filter(|p| !on_path(p))
        .collect();
    if root && missing.is_empty() {
        return true;
    }
    let why = if root {
        format!("{} not found", missing.join(", "))
    } else {
        "not root".to_string()
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}, and CI is set (scripts/setup installs them)");
    }
    say(&format!("SKIP {test}: {why}; not run"));
    false
}

#[test]
fn a_bridge_made_but_not_yet_marked_is_cleared_by_the_next_start() {
    let test = "a_bridge_made_but_not_yet_marked_is_cleared_by_the_next_start";
    if !networking_available(test) {
        return;
    }
    let ns = netns::Netns::new(&format!("vireo-int-{}", std::process::id()));
    // This thread (and the nft and dnsmasq it starts) in the namespace.
    let handle = std::fs::File::open(format!("/run/netns/{}", ns.name)).expect("the namespace");
    // SAFETY: setns on the descriptor of a namespace file held open for the
    // call; it moves only this test's thread.
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let state = fresh_root("int-net");
    let bridge = "vireo-int0";
    let lab = Network::new(
        "lab",
        NetworkSpec {
            uuid: None,
            forward_mode: ForwardMode::Nat,
            bridge: Some(bridge.into()),
            ip: Some(IpSpec {
                address: "10.79.0.1".into(),
                prefix: 24,
                dhcp: None,
            }),
            autostart: false,
            active: None,
            node_selector: None,
        },
    );

    // What an agent killed between making the bridge and giving it its
    // alias leaves: the bridge, no alias, and the pending mark.
    let driver = BridgeDriver::open(&state).expect("opens");
    let uuid = driver.define_network(&lab).expect("define").uuid;
    ns.ip(&["link", "add", bridge, "type", "bridge"]);
    std::fs::create_dir_all(state.join("run/lab")).expect("run dir");
    std::fs::write(state.join("run/lab/bridge-pending"), bridge).expect("mark");
    let driver = BridgeDriver::open(&state).expect("opens again");
    driver
        .start_network("lab")
        .expect("the start clears the unmarked bridge it made");
    let link = netlink::link(bridge).expect("netlink").expect("the bridge");
    assert_eq!(
        link.alias.as_deref(),
        Some(format!("vireo-network:{uuid}").as_str()),
        "a bridge of the network's own"
    );
    assert!(!state.join("run/lab/bridge-pending").exists());
    driver.destroy_network("lab").expect("destroy");
    assert!(netlink::link(bridge).expect("netlink").is_none());

    // A bridge without the mark is someone else's: refused and left alone.
    ns.ip(&["link", "add", bridge, "type", "bridge"]);
    let e = driver
        .start_network("lab")
        .expect_err("someone else's bridge");
    assert!(e.to_string().contains("already exists"), "{e}");
    assert!(netlink::link(bridge).expect("netlink").is_some());
    let _ = std::fs::remove_dir_all(&state);
}

fn open(root: &Path) -> Connection {
    vireo_drivers::open(&format!("qemu:///embed?root={}", root.display()))
        .expect("opens qemu:///embed")
}

/// The QEMU processes of the domain's activation (its socket path marks them).
fn qemus(root: &Path, uuid: &str) -> Vec<u32> {
    let marker = root.join("run").join(uuid).join("api.sock");
    let marker = marker.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            !zombie
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        })
        .collect()
}

/// Kills whatever still runs from a test's state directory (its QEMU,
/// when the test fails before destroying it) and removes the directory.
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let marker = self.0.to_string_lossy().into_owned();
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = pid.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
            {
                // SAFETY: kill(2) touches no memory; the process runs from
                // this test's own state directory.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn record_path(root: &Path, name: &str) -> PathBuf {
    root.join("domains").join(format!("{name}.json"))
}

/// Rewrites a domain's record as `activate` saves it before the launch
/// (its agent then killed): the activation under way, no PID yet.
fn as_if_launching(root: &Path, name: &str) {
    let path = record_path(root, name);
    let mut rec: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
    rec["run"]["pid"] = 0.into();
    rec["run"]["launching"] = true.into();
    std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write record");
}

#[test]
fn a_launch_its_agent_did_not_see_through_is_adopted() {
    let test = "a_launch_its_agent_did_not_see_through_is_adopted";
    if !qemu_available(test) {
        return;
    }
    let guard = Root(fresh_root("int-adopt"));
    let root = guard.0.clone();
    let conn = open(&root);
    let name = "adopt";
    conn.hypervisor()
        .define_domain(&linux_domain(name, None, ""))
        .expect("define");
    let started = conn.hypervisor().start_domain(name).expect("start");
    let pids = qemus(&root, &started.uuid);
    assert_eq!(pids.len(), 1, "{pids:?}");
    drop(conn);
    as_if_launching(&root, name);

    let conn = open(&root);
    let again = conn
        .hypervisor()
        .lookup_domain(Lookup::Name(name))
        .expect("lookup");
    assert_eq!(again.id, started.id, "the activation keeps its ID");
    let info = conn.hypervisor().domain_info(name).expect("info");
    assert_eq!(info.state, DomainState::Running);
    let rec: Value =
        serde_json::from_slice(&std::fs::read(record_path(&root, name)).expect("r")).expect("json");
    assert_eq!(
        rec["run"]["pid"].as_u64(),
        Some(u64::from(pids[0])),
        "{rec}"
    );
    assert_eq!(rec["run"]["launching"], false, "{rec}");
    // Nothing started beside it, even after the watcher's refreshes.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(qemus(&root, &started.uuid), pids, "the same QEMU, alone");
    conn.hypervisor().destroy_domain(name).expect("destroy");
    assert!(qemus(&root, &started.uuid).is_empty());
}

#[test]
fn a_launch_that_started_no_process_ends_failed() {
    let test = "a_launch_that_started_no_process_ends_failed";
    if !qemu_available(test) {
        return;
    }
    let guard = Root(fresh_root("int-failed"));
    let root = guard.0.clone();
    let conn = open(&root);
    let name = "failed";
    conn.hypervisor()
        .define_domain(&linux_domain(name, None, ""))
        .expect("define");
    let started = conn.hypervisor().start_domain(name).expect("start");
    drop(conn);
    // The record of a launch whose process never came (this one is made to
    // go first).
    for pid in qemus(&root, &started.uuid) {
        // (QEMU's daemonizing parent may be exiting as we look.)
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let start = Instant::now();
    while !qemus(&root, &started.uuid).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "QEMU is gone");
        std::thread::sleep(Duration::from_millis(50));
    }
    as_if_launching(&root, name);

    let conn = open(&root);
    let reason = wait_for_state(&conn, name, DomainState::Shutoff, Duration::from_secs(10))
        .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(reason, DomainReason::Failed);
    // And it starts as usual.
    let r = conn.hypervisor().start_domain(name).expect("start again");
    assert!(r.id.is_some());
    assert_eq!(qemus(&root, &r.uuid).len(), 1);
    conn.hypervisor().destroy_domain(name).expect("destroy");
}
