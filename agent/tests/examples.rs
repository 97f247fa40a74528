//! Every manifest in examples/, run by the standalone agent as `scripts/run`
//! runs it: the test-driver domains, the pool and its volume, the network,
//! and the real Linux guest under QEMU, whose console the local API hands
//! out. (e2e/tests/examples.rs applies the same directory on a real
//! kube-apiserver.)
//!
//! The agent runs in a network namespace the test makes, since the example
//! network is a real bridge. Without `qemu-system-x86_64` or root the test
//! fails when `CI` is set, and otherwise prints a SKIP line and returns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_crds::DomainState;
use vireo_drivers::{ListFilter, Lookup};

const T: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

fn can_run() -> bool {
    let qemu = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let why = match (qemu, root) {
        (true, true) => return true,
        (false, _) => "qemu-system-x86_64 not found",
        (_, false) => "not root (the guest image goes to /var/lib/vireo/boot)",
    };
    if std::env::var_os("CI").is_some() {
        panic!("examples test: {why}, and CI is set");
    }
    eprintln!("SKIP examples test: {why}");
    false
}

// The e2e harness's network namespace helper (`ip netns add`, killed and
// deleted on drop).
#[path = "../../e2e/tests/common/netns.rs"]
mod netns;
use netns::Netns;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait<T>(what: &str, log: &Path, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < T,
            "timed out waiting for {what}; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn standalone_runs_every_example() {
    if !can_run() {
        return;
    }
    // What scripts/run does first: the guest image into the boot directory.
    let out = Command::new(repo().join("scripts/guest-image.sh"))
        .arg("/var/lib/vireo/boot/vireo-guest")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("runs scripts/guest-image.sh");
    assert!(out.status.success(), "scripts/guest-image.sh failed");

    let base = std::env::temp_dir().join(format!("vireo-examples-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (state, host) = (base.join("state"), base.join("host"));
    std::fs::create_dir_all(&state).expect("state");
    let log = base.join("agent.log");
    let logf = std::fs::File::create(&log).expect("log");
    let socket = state.join("vireo.sock");
    // The example network is a real bridge with dnsmasq: in a namespace of
    // the test's own, never on the host's interfaces.
    let netns = Netns::new(&format!("vireo-ex-{}", std::process::id()));
    let agent = Agent(
        Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(env!("CARGO_BIN_EXE_vireo-agent"))
            .args(["--standalone", "--manifests"])
            .arg(repo().join("examples"))
            .arg("--state-dir")
            .arg(&state)
            // The pool's /var/lib/vireo/images lands under the test's directory.
            .arg("--host-root")
            .arg(&host)
            .args(["--boot-dir", "/var/lib/vireo/boot"])
            .args(["--resync-seconds", "1", "--metrics-addr", "127.0.0.1:0"])
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("vireo-agent starts"),
    );
    let uri = format!("vireo+unix://{}", socket.display());
    let conn = wait("the local API socket", &log, || {
        vireo_drivers::open(&uri).ok()
    });

    let running = |name: &str| {
        conn.hypervisor()
            .domain_info(name)
            .ok()
            .filter(|i| i.state == DomainState::Running)
    };
    for name in ["default/demo", "default/web", "default/linux"] {
        wait(&format!("{name} running"), &log, || running(name));
    }
    let linux = conn
        .hypervisor()
        .lookup_domain(Lookup::Name("default/linux"))
        .expect("linux");
    assert!(linux.id.is_some());
    // One node, one numbering: the test driver's domains and the QEMU guest
    // never share an ID, so `vireo dominfo ID` names one domain.
    let mut ids: Vec<u32> = ["default/demo", "default/web", "default/linux"]
        .iter()
        .map(|n| {
            conn.hypervisor()
                .lookup_domain(Lookup::Name(n))
                .ok()
                .and_then(|d| d.id)
                .unwrap_or_else(|| panic!("{n} has an ID"))
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct IDs across drivers: {ids:?}");
    let by_id = conn
        .hypervisor()
        .lookup_domain(Lookup::Id(linux.id.expect("id")))
        .expect("lookup by the Linux guest's ID");
    assert_eq!(by_id.name, "default/linux");
    let console_log = state.join("qemu/run").join(&linux.uuid).join("console.log");
    wait("the Linux guest's marker", &log, || {
        std::fs::read_to_string(&console_log)
            .ok()
            .filter(|t| t.contains("VIREO-GUEST-READY"))
    });
    assert!(conn.hypervisor().console_path("default/linux").is_ok());

    // The pool is a real directory under the host root, with the volume's file.
    let pools = conn
        .storage()
        .list_pools(ListFilter::Active)
        .expect("pools");
    assert!(pools.iter().any(|p| p.name == "images"), "{pools:?}");
    let vol = conn
        .storage()
        .volume_info("images", "default.scratch")
        .expect("the example volume");
    assert_eq!(vol.capacity, 2 << 30);
    assert!(host.join("var/lib/vireo/images/default.scratch").is_file());
    let nets = conn
        .network()
        .list_networks(ListFilter::Active)
        .expect("nets");
    assert!(nets.iter().any(|n| n.name == "lab"), "{nets:?}");

    // The network is a real bridge in the namespace, with its DHCP server.
    let info = conn.network().network_info("lab").expect("lab");
    assert_eq!(info.bridge.as_deref(), Some("vireo-lab0"));
    let link = netns.ip(&["-br", "addr", "show", "vireo-lab0"]);
    assert!(
        link.contains("10.77.0.1/24"),
        "the bridge has the network's address: {link}"
    );
    assert!(conn.network().dhcp_leases("lab").is_ok());

    // The Linux example on that network: its console shows an address from
    // the DHCP range and its disk made and mounted; the lease is on its
    // derived MAC, and domifaddr's answer comes from it.
    let console = wait("the Linux guest's set-up", &log, || {
        std::fs::read_to_string(&console_log)
            .ok()
            .filter(|t| t.contains("VIREO-GUEST-SETUP-DONE"))
    });
    assert!(
        console.contains("VIREO-GUEST-DISK ok vda /mnt/vda"),
        "the example's disk is made and mounted: {console}"
    );
    let ip_line = console
        .lines()
        .find(|l| l.starts_with("VIREO-GUEST-IP "))
        .unwrap_or_default();
    assert!(
        ip_line.contains("10.77.0."),
        "a DHCP address on lab: {console}"
    );
    let iface = vireo_crds::Interface {
        name: "net0".into(),
        network: "lab".into(),
        mac: None,
    };
    let mac = vireo_drivers::bridge::tap::interface_mac(&iface, &linux.uuid, 0);
    let lease = wait("a DHCP lease for the Linux guest", &log, || {
        conn.network()
            .dhcp_leases("lab")
            .ok()?
            .into_iter()
            .find(|l| l.mac == mac)
    });
    let last: u8 = lease
        .ip
        .rsplit('.')
        .next()
        .and_then(|o| o.parse().ok())
        .expect("octet");
    assert!((10..=99).contains(&last), "in the range: {lease:?}");
    assert_eq!(lease.prefix, 24);
    assert!(
        ip_line.contains(&format!("{}/24", lease.ip)),
        "the guest has the leased address: {ip_line} vs {lease:?}"
    );
    // What `vireo domifaddr` and the Domain's status show.
    let addrs = vireo_drivers::network::interface_addresses(conn.network(), &[iface], &linux.uuid);
    assert_eq!(
        addrs[0].ip.as_deref(),
        Some(format!("{}/24", lease.ip).as_str()),
        "{addrs:?}"
    );
    // The disk is the example volume's file, now holding an ext2 filesystem.
    let data = std::fs::read(host.join("var/lib/vireo/images/default.linux-data"))
        .map(|b| b.get(1024 + 56..1024 + 58).map(<[u8]>::to_vec))
        .expect("the volume file");
    assert_eq!(data, Some(vec![0x53, 0xef]), "ext2 superblock magic");

    // Leave nothing running: stop the agent, then what it left in the
    // namespace (QEMU, dnsmasq) goes with the namespace.
    drop(agent);
    drop(netns);
    let _ = std::fs::remove_dir_all(&base);
}
