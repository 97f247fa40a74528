//! The bridge network driver on real Linux networking, inside network
//! namespaces each test creates (`vireo-test-<random>`); the host's own
//! interfaces are never touched. Each test thread enters its namespace
//! with setns(2), so the driver's netlink sockets, nft and dnsmasq (and
//! QEMU, for the guests) all run in it.
//!
//! Needs root, `ip`, `nft` and `dnsmasq` (scripts/setup installs them);
//! without them every test prints a SKIP line and passes, except under CI,
//! where it fails.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vireo_crds::network::{DhcpHost, DhcpRange, DhcpSpec, IpSpec};
use vireo_crds::{ForwardMode, Interface, Network, NetworkSpec};
use vireo_drivers::bridge::{BridgeDriver, netlink, nft, tap};
use vireo_drivers::conformance::{Fixture, test_driver_fixture};
use vireo_drivers::{Connection, NetworkDriver};

use common::say;

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

/// Whether the tests can run here; fails under CI when they cannot.
fn available(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for (prog, pkg) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("dnsmasq", "dnsmasq-base"),
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

fn find(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn run(program: &str, args: &[&str]) -> String {
    let bin = find(program).unwrap_or_else(|| PathBuf::from(program));
    let out = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own, deleted (with what runs in it)
/// when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("vireo-test-{tag}-{}", &id[..8]);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        enter_netns(&self.name);
    }

    /// `ip -n NAME ARGS...`
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Link names in the namespace.
    fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .collect()
    }

    /// nftables tables in the namespace.
    fn tables(&self) -> String {
        run(
            "ip",
            &["netns", "exec", &self.name, "nft", "list", "tables"],
        )
    }

    /// PIDs of processes in the namespace.
    fn pids(&self) -> Vec<String> {
        run("ip", &["netns", "pids", &self.name])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) touches no memory; these processes were
                // started by this test inside its own namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = Command::new(find("ip").unwrap_or_else(|| "ip".into()))
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("opens the namespace");
    // SAFETY: setns on a namespace descriptor we own; it changes only the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Serves `HTTP/1.0 200` with a body naming `who` and the peer, from a
/// thread in namespace `ns`, until `deadline`. Peers are sent on the channel.
fn serve_http(
    ns: &str,
    addr: &str,
    who: &'static str,
    deadline: Duration,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns = ns.to_string();
    let addr: SocketAddr = addr.parse().expect("a socket address");
    thread::spawn(move || {
        enter_netns(&ns);
        let listener = TcpListener::bind(addr).expect("binds the HTTP server");
        listener.set_nonblocking(true).expect("non-blocking");
        let _ = ready_tx.send(());
        let start = Instant::now();
        while start.elapsed() < deadline {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let body = format!("{who} peer={}\n", peer.ip());
                    let _ = write!(
                        s,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tx.send(peer.ip().to_string());
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the HTTP server is listening");
    rx
}

/// Whether a TCP connection from namespace `ns` to `addr` succeeds.
fn connects_from(ns: &str, addr: &str, timeout: Duration) -> bool {
    let ns = ns.to_string();
    let addr: SocketAddr = addr.parse().expect("a socket address");
    thread::spawn(move || {
        enter_netns(&ns);
        TcpStream::connect_timeout(&addr, timeout).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// Asserts the namespace holds nothing of a network anymore.
fn assert_clean(ns: &Netns, allowed_links: &[&str]) {
    let links = ns.links();
    let extra: Vec<&String> = links
        .iter()
        .filter(|l| !allowed_links.contains(&l.as_str()))
        .collect();
    assert!(extra.is_empty(), "links left in {}: {extra:?}", ns.name);
    let tables = ns.tables();
    assert!(
        !tables.contains("vireo_"),
        "nftables tables left in {}: {tables}",
        ns.name
    );
    let pids = ns.pids();
    let dnsmasq: Vec<String> = pids
        .iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("dnsmasq"))
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    assert!(
        dnsmasq.is_empty(),
        "dnsmasq left in {}: {dnsmasq:?}",
        ns.name
    );
}

// ---------------------------------------------------------------------------
// Networks
// ---------------------------------------------------------------------------

fn network(name: &str, mode: ForwardMode, third: u8, dhcp: Option<DhcpSpec>) -> Network {
    Network::new(
        name,
        NetworkSpec {
            uuid: None,
            forward_mode: mode,
            bridge: None,
            ip: Some(IpSpec {
                address: format!("10.{third}.0.1"),
                prefix: 24,
                dhcp,
            }),
            autostart: false,
            active: None,
            node_selector: None,
        },
    )
}

fn ranges(third: u8) -> DhcpSpec {
    DhcpSpec {
        ranges: vec![DhcpRange {
            start: format!("10.{third}.0.100"),
            end: format!("10.{third}.0.120"),
        }],
        hosts: Vec::new(),
    }
}

fn state_dir(tag: &str) -> PathBuf {
    common::fresh_root(tag)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Start builds the bridge, its address, the table and dnsmasq; destroy
/// removes them all; start and destroy again; a second driver on the same
/// state directory (a restarted agent) finds the network active and
/// restarts a dnsmasq that died; bridge mode creates nothing.
#[test]
fn start_destroy_restart_leave_nothing() {
    if !available("start_destroy_restart_leave_nothing") {
        return;
    }
    let ns = Netns::new("life");
    ns.enter();
    let dir = state_dir("bridge-life");
    let driver = BridgeDriver::open(&dir).expect("opens the driver");
    let r = driver
        .define_network(&network("life", ForwardMode::Nat, 61, Some(ranges(61))))
        .expect("defines");
    let bridge = driver
        .network_info("life")
        .expect("info")
        .bridge
        .expect("a bridge name");
    assert!(
        bridge.starts_with("vireo") && bridge.len() <= 15,
        "{bridge}"
    );
    for round in 0..2 {
        driver.start_network("life").expect("starts");
        let link = netlink::link(&bridge)
            .expect("netlink")
            .expect("the bridge exists");
        assert!(netlink::is_bridge(&link) && link.up, "{link:?}");
        assert_eq!(
            link.alias.as_deref(),
            Some(format!("vireo-network:{}", r.uuid).as_str())
        );
        let addrs = netlink::ipv4_addresses(link.index).expect("addresses");
        assert_eq!(addrs, vec![("10.61.0.1".parse().expect("ip"), 24)]);
        let table = nft::table_name("life");
        let rules = run(
            "ip",
            &[
                "netns", "exec", &ns.name, "nft", "list", "table", "ip", &table,
            ],
        );
        assert!(rules.contains("masquerade"), "round {round}: {rules}");
        let conf = std::fs::read_to_string(dir.join("run/life/dnsmasq.conf")).expect("conf");
        assert!(
            conf.contains("dhcp-range=10.61.0.100,10.61.0.120,255.255.255.0"),
            "{conf}"
        );
        let pid: u32 = std::fs::read_to_string(dir.join("run/life/dnsmasq.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid");
        assert!(
            ns.pids().contains(&pid.to_string()),
            "dnsmasq runs in the namespace"
        );
        driver.destroy_network("life").expect("destroys");
        assert_clean(&ns, &["lo"]);
    }

    // A restarted agent: a second driver sees the active network and
    // starts its dnsmasq again after it died.
    driver.start_network("life").expect("starts");
    let pid_file = dir.join("run/life/dnsmasq.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    // SAFETY: kill(2) on the dnsmasq this test started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    thread::sleep(Duration::from_millis(200));
    drop(driver);
    let again = BridgeDriver::open(&dir).expect("opens again");
    let info = again.network_info("life").expect("info");
    assert!(info.active && info.persistent, "{info:?}");
    let new_pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert_ne!(new_pid, pid, "dnsmasq was started again");
    again.destroy_network("life").expect("destroys");
    // Autostart at an agent's start.
    again
        .set_network_autostart("life", true)
        .expect("autostart");
    let failed = again.autostart_all().expect("autostarts");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(again.network_info("life").expect("info").active);
    again.destroy_network("life").expect("destroys");
    again.undefine_network("life").expect("undefines");
    assert_clean(&ns, &["lo"]);

    // Bridge mode: attaches to an existing bridge and creates nothing.
    ns.ip(&["link", "add", "hostbr0", "type", "bridge"]);
    let mut attach = network("attach", ForwardMode::Bridge, 62, None);
    attach.spec.ip = None;
    attach.spec.bridge = Some("hostbr0".into());
    again
        .create_network(&attach)
        .expect("creates in bridge mode");
    assert!(!ns.tables().contains("vireo_"), "bridge mode adds no table");
    again.destroy_network("attach").expect("destroys");
    assert!(
        ns.links().contains(&"hostbr0".to_string()),
        "the host bridge stays"
    );
    ns.ip(&["link", "del", "hostbr0"]);
    let mut missing = attach.clone();
    missing.spec.bridge = Some("nosuchbr".into());
    let err = again.create_network(&missing).expect_err("no such bridge");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_clean(&ns, &["lo"]);
}

/// A tap for a guest: made on the bridge, up, then removed.
#[test]
fn taps_join_the_bridge_and_go() {
    if !available("taps_join_the_bridge_and_go") {
        return;
    }
    let ns = Netns::new("tap");
    ns.enter();
    let driver = BridgeDriver::open(&state_dir("bridge-tap")).expect("opens");
    driver
        .create_network(&network("taps", ForwardMode::Isolated, 63, None))
        .expect("creates");
    let bridge = driver.active_bridge("taps").expect("active");
    tap::create("vttest0", &bridge, "taps").expect("creates the tap");
    tap::create("vttest0", &bridge, "taps").expect("again: idempotent");
    let br = netlink::link(&bridge).expect("netlink").expect("bridge");
    let t = netlink::link("vttest0").expect("netlink").expect("tap");
    assert_eq!(t.kind.as_deref(), Some("tun"));
    assert_eq!(t.controller, Some(br.index), "the tap is on the bridge");
    assert!(t.up);
    // The tap can be opened again the way QEMU and vireo-vmm do
    // (single queue, vnet header).
    tap::remove("vttest0").expect("removes");
    tap::remove("vttest0").expect("removing again is fine");
    assert!(netlink::link("vttest0").expect("netlink").is_none());
    let err = tap::create("vttest1", "nosuchbr", "taps").expect_err("no bridge");
    assert!(err.to_string().contains("does not exist"), "{err}");
    driver.destroy_network("taps").expect("destroys");
    assert_clean(&ns, &["lo"]);
}

/// Destroying a network deletes its bridge and leaves its guests' taps on
/// no bridge; starting it again puts back the taps marked as its own, and
/// only those. Opening the driver again (an agent restart) puts back a tap
/// of an active network that lost its bridge.
#[test]
fn taps_come_back_when_their_network_starts_again() {
    let test = "taps_come_back_when_their_network_starts_again";
    if !available(test) {
        return;
    }
    let ns = Netns::new("back");
    ns.enter();
    let dir = state_dir("bridge-back");
    let driver = BridgeDriver::open(&dir).expect("opens");
    for (name, third) in [("back", 64), ("side", 65)] {
        driver
            .define_network(&network(name, ForwardMode::Isolated, third, None))
            .expect("defines");
        driver.start_network(name).expect("starts");
    }
    let bridge = driver.active_bridge("back").expect("active");
    let side = driver.active_bridge("side").expect("active");
    tap::create("vtback0", &bridge, "back").expect("a tap of back");
    tap::create("vtback1", &bridge, "back").expect("another tap of back");
    // On back's bridge but marked as another network's.
    tap::create("vtother0", &bridge, "other").expect("a tap of other");
    // Marked as back's but on another bridge: it stays there.
    tap::create("vtside0", &side, "back").expect("a tap on side");
    // The longest network name there is (253) still marks a tap.
    let longest = "n".repeat(253);
    tap::create("vtlong0", &side, &longest).expect("a tap of a long-named network");
    let marked = netlink::link("vtlong0").expect("netlink").expect("vtlong0");
    assert_eq!(marked.alias, Some(tap::port_alias(&longest)));
    let link = |n: &str| netlink::link(n).expect("netlink").expect(n);
    let index = |n: &str| link(n).index;

    driver.destroy_network("back").expect("destroys");
    for t in ["vtback0", "vtback1", "vtother0"] {
        assert_eq!(link(t).controller, None, "{t} lost its bridge");
    }
    driver.start_network("back").expect("starts again");
    let br = index(&bridge);
    for t in ["vtback0", "vtback1"] {
        let l = link(t);
        assert_eq!(l.controller, Some(br), "{t} is back on {bridge}");
        assert!(l.up, "{t} is up");
    }
    assert_eq!(
        link("vtother0").controller,
        None,
        "another network's tap stays off"
    );
    assert_eq!(
        link("vtside0").controller,
        Some(index(&side)),
        "vtside0 stays on {side}"
    );

    // A tap that lost its bridge while the network stayed active is put
    // back when the driver is opened again.
    ns.ip(&["link", "set", "vtback1", "nomaster"]);
    assert_eq!(link("vtback1").controller, None);
    let again = BridgeDriver::open(&dir).expect("opens again");
    assert_eq!(link("vtback1").controller, Some(br), "vtback1 is back");

    for t in ["vtback0", "vtback1", "vtother0", "vtside0", "vtlong0"] {
        tap::remove(t).expect("removes");
    }
    for name in ["back", "side"] {
        again.destroy_network(name).expect("destroys");
        again.undefine_network(name).expect("undefines");
    }
    assert_clean(&ns, &["lo"]);
}

// ---------------------------------------------------------------------------
// The conformance suite's network cases
// ---------------------------------------------------------------------------

/// The fixture's networks: NAT with an address and a DHCP range each, a
/// subnet per name (cases run two networks at once).
fn conformance_fixture() -> Fixture {
    let base = test_driver_fixture();
    Fixture {
        make_network: Box::new(|name| {
            let h = name
                .bytes()
                .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            let third = 100 + (h % 100) as u8;
            let mut n = network(name, ForwardMode::Nat, 64, Some(ranges(64)));
            let ip = n.spec.ip.as_mut().expect("an ip");
            ip.address = format!("10.64.{third}.1");
            ip.dhcp = Some(DhcpSpec {
                ranges: vec![DhcpRange {
                    start: format!("10.64.{third}.10"),
                    end: format!("10.64.{third}.20"),
                }],
                hosts: Vec::new(),
            });
            n
        }),
        ..base
    }
}

/// Runs one network case of the conformance suite against the bridge
/// driver in a namespace of its own (domains and pools on the test
/// driver), then checks the namespace is empty again.
fn conformance_case(
    test: &str,
    case: fn(&Connection, &Fixture) -> Result<(), vireo_drivers::conformance::Failure>,
) {
    if !available(test) {
        return;
    }
    let ns = Netns::new("conf");
    ns.enter();
    let network = Arc::new(BridgeDriver::open(&state_dir("bridge-conf")).expect("opens"));
    let test_driver = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let conn = Connection::new(
        "bridge:///conformance",
        test_driver.clone(),
        network,
        test_driver,
    );
    if let Err(failure) = case(&conn, &conformance_fixture()) {
        panic!("{test}: {failure}");
    }
    assert_clean(&ns, &["lo"]);
}

macro_rules! network_conformance {
    ($($case:ident)*) => {
        $(
            #[test]
            fn $case() {
                conformance_case(stringify!($case), vireo_drivers::conformance::$case);
            }
        )*
    };
}

network_conformance!(
    case_network_lifecycle
    case_network_undefine_active
    case_network_transient
    case_network_create_over_defined
    case_network_define_transient
    case_network_redefine_active
    case_network_autostart
    case_network_lookup
    case_network_duplicate_uuid
    case_network_list_filters
);

// ---------------------------------------------------------------------------
// Real Linux guests under QEMU
// ---------------------------------------------------------------------------

const GUEST_TIMEOUT: Duration = Duration::from_secs(150);

fn guest(name: &str, network: &str, mac: Option<&str>, run: &str) -> vireo_crds::Domain {
    let mut d = common::linux_domain(
        name,
        None,
        &format!("vireo.dhcp_tries=10 vireo.run=\"{run}\""),
    );
    d.spec.devices.interfaces = vec![Interface {
        name: "net0".into(),
        network: network.into(),
        mac: mac.map(str::to_string),
    }];
    d
}

fn console_log(root: &Path, conn: &Connection, name: &str) -> PathBuf {
    let uuid = conn
        .hypervisor()
        .lookup_domain(vireo_drivers::Lookup::Name(name))
        .expect("lookup")
        .uuid;
    root.join("run").join(uuid).join("console.log")
}

/// Two Linux guests on a NAT network: addresses by DHCP (one from the
/// range, one a static host), they ping each other, reach an HTTP server
/// on the host side and one outside (through masquerade), and the leases
/// name them; the network destroyed and started again under them, b
/// reaches the gateway again; destroying the guests and the network
/// leaves the namespace as it was.
#[test]
fn linux_guests_on_a_nat_network() {
    let test = "linux_guests_on_a_nat_network";
    if !available(test) || !common::qemu_available(test) {
        return;
    }
    // Built (or found in the cache) before entering the namespace, which
    // has no way out.
    common::guest_image();
    let host = Netns::new("nat");
    let outside = Netns::new("out");
    host.ip(&[
        "link",
        "add",
        "vh0",
        "type",
        "veth",
        "peer",
        "name",
        "vo0",
        "netns",
        &outside.name,
    ]);
    host.ip(&["addr", "add", "10.254.0.1/24", "dev", "vh0"]);
    host.ip(&["link", "set", "vh0", "up"]);
    outside.ip(&["addr", "add", "10.254.0.2/24", "dev", "vo0"]);
    outside.ip(&["link", "set", "vo0", "up"]);
    host.enter();

    let out_peers = serve_http(&outside.name, "10.254.0.2:8080", "outside", GUEST_TIMEOUT);

    let net_dir = state_dir("bridge-nat");
    let networks = Arc::new(BridgeDriver::open(&net_dir).expect("opens the network driver"));
    let b_mac = "52:54:00:71:00:0b";
    let mut dhcp = ranges(71);
    dhcp.hosts.push(DhcpHost {
        mac: b_mac.into(),
        ip: "10.71.0.11".into(),
        name: Some("b".into()),
    });
    networks
        .define_network(&network("natnet", ForwardMode::Nat, 71, Some(dhcp)))
        .expect("defines");
    networks.start_network("natnet").expect("starts");
    // An isolated network beside it, with DHCP and no way out.
    networks
        .define_network(&network(
            "isonet",
            ForwardMode::Isolated,
            72,
            Some(ranges(72)),
        ))
        .expect("defines isonet");
    networks.start_network("isonet").expect("starts isonet");
    let bridge = networks.active_bridge("natnet").expect("active");
    let host_peers = serve_http(&host.name, "10.71.0.1:8081", "host", GUEST_TIMEOUT);

    let root = state_dir("bridge-qemu");
    let test_driver = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let conn = vireo_drivers::qemu::open_with(
        &format!("qemu:///embed?root={}", root.display()),
        &format!("/embed?root={}", root.display()),
        networks.clone(),
        test_driver,
    )
    .expect("opens the qemu driver");
    let hv = conn.hypervisor();
    let started = Instant::now();
    // b stays on the network: it says when the gateway goes (the network
    // destroyed) and when it answers again (started again, b's tap put
    // back). Computed markers, so the echoed command line cannot match.
    hv.create_domain(&guest(
        "b",
        "natnet",
        Some(b_mac),
        "ping -c 2 -W 2 10.71.0.1 && echo PING-GW-OK; \
         while ping -c 1 -W 1 10.71.0.1 >/dev/null; do sleep 1; done; echo GW-GONE-$((6*7)); \
         for i in $(seq 600); do ping -c 1 -W 1 10.71.0.1 >/dev/null && echo GW-BACK-$((6*7)) && break; done",
    ))
    .expect("starts b");
    let a_run = "for i in $(seq 60); do ping -c 1 -W 1 10.71.0.11 >/dev/null && break; done; \
                 ping -c 3 -W 2 10.71.0.11 && echo PING-B-OK; \
                 wget -q -O - http://10.71.0.1:8081/ && echo WGET-HOST-OK; \
                 wget -q -O - http://10.254.0.2:8080/ && echo WGET-OUT-OK";
    let a = hv
        .create_domain(&guest("a", "natnet", None, a_run))
        .expect("starts a");
    let a_mac = tap::derived_mac(&a.uuid, 0);
    // Computed markers, so the command line echoed on the console cannot
    // match them.
    let c_run = "wget -q -T 5 -O - http://10.254.0.2:8080/ && echo WGET-OUT-$((6*7)) \
                 || echo BLOCKED-$((6*7))";
    hv.create_domain(&guest("c", "isonet", None, c_run))
        .expect("starts c");

    // Both taps are on the bridge while the guests run.
    let br = netlink::link(&bridge).expect("netlink").expect("bridge");
    let ports = netlink::ports_of(br.index).expect("ports");
    assert_eq!(ports.len(), 2, "two taps on {bridge}: {ports:?}");

    let a_log = console_log(&root, &conn, "a");
    let b_log = console_log(&root, &conn, "b");
    let text = vireo_drivers::qemu::wait_for_console(&a_log, "VIREO-GUEST-RUN-END", GUEST_TIMEOUT)
        .unwrap_or_else(|t| panic!("guest a did not finish; console:\n{t}"));
    let b_text =
        vireo_drivers::qemu::wait_for_console(&b_log, "PING-GW-OK", Duration::from_secs(30))
            .unwrap_or_else(|t| panic!("guest b did not ping the gateway; console:\n{t}"));
    say(&format!(
        "two guests booted and talked in {:?}",
        started.elapsed()
    ));
    assert!(
        b_text.contains("VIREO-GUEST-IP 10.71.0.11/24"),
        "b has its static address; console:\n{b_text}"
    );
    assert!(
        b_text.contains("PING-GW-OK"),
        "b pings the gateway; console:\n{b_text}"
    );
    let a_ip = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("VIREO-GUEST-IP "))
        .unwrap_or_else(|| panic!("a printed no address; console:\n{text}"))
        .to_string();
    assert!(
        a_ip.starts_with("10.71.0.1") && a_ip.ends_with("/24") && a_ip != "10.71.0.1/24",
        "a has an address of the range: {a_ip}"
    );
    for marker in ["PING-B-OK", "WGET-HOST-OK", "WGET-OUT-OK"] {
        assert!(
            text.contains(marker),
            "guest a: no {marker}; console:\n{text}"
        );
    }
    let a_addr = a_ip.trim_end_matches("/24");
    assert_eq!(
        host_peers.try_iter().next().as_deref(),
        Some(a_addr),
        "the host side sees the guest itself"
    );
    assert_eq!(
        out_peers.try_iter().next().as_deref(),
        Some("10.254.0.1"),
        "the outside sees the host's address (masquerade)"
    );

    // The isolated guest has its address and no way out.
    let c_log = console_log(&root, &conn, "c");
    let c_text = vireo_drivers::qemu::wait_for_console(
        &c_log,
        "VIREO-GUEST-RUN-END",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|t| panic!("guest c did not finish; console:\n{t}"));
    assert!(
        c_text.contains("VIREO-GUEST-IP 10.72.0.1"),
        "c has an address of isonet's range; console:\n{c_text}"
    );
    assert!(
        c_text.contains("BLOCKED-42") && !c_text.contains("WGET-OUT-42"),
        "the isolated guest reached the outside; console:\n{c_text}"
    );
    assert!(
        out_peers.try_iter().next().is_none(),
        "the outside saw a second client"
    );
    hv.destroy_domain("c").expect("destroys c");
    networks.destroy_network("isonet").expect("destroys isonet");
    networks
        .undefine_network("isonet")
        .expect("undefines isonet");

    // Leases, by network and by MAC.
    let leases = networks.dhcp_leases("natnet").expect("leases");
    let by_mac: BTreeMap<String, String> = leases
        .iter()
        .map(|l| (l.mac.clone(), l.ip.clone()))
        .collect();
    assert_eq!(
        by_mac.get(b_mac).map(String::as_str),
        Some("10.71.0.11"),
        "{leases:?}"
    );
    assert_eq!(
        by_mac.get(&a_mac).map(String::as_str),
        Some(a_addr),
        "{leases:?}"
    );
    let (net, lease) = networks
        .lease_for_mac(&a_mac.to_uppercase())
        .expect("lookup")
        .expect("a lease");
    assert_eq!(
        (net.as_str(), lease.ip.as_str(), lease.prefix),
        ("natnet", a_addr, 24)
    );
    // What `vireo domifaddr` and the Domain's status.interfaces show: the
    // derived MAC, the tap, and the address the guest itself printed.
    let a_def = hv.domain_definition("a", false).expect("a's definition");
    let shown = vireo_drivers::network::interface_addresses(
        networks.as_ref(),
        &a_def.spec.devices.interfaces,
        &a.uuid,
    );
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].mac, a_mac, "{shown:?}");
    assert_eq!(shown[0].ip.as_deref(), Some(a_ip.as_str()), "{shown:?}");
    assert_eq!(
        shown[0].device.as_deref(),
        Some(tap::tap_name(&a.uuid, 0).as_str())
    );
    let b_def = hv.domain_definition("b", false).expect("b's definition");
    let b_uuid = b_def.spec.uuid.clone().expect("b has a UUID");
    let b_shown = vireo_drivers::network::interface_addresses(
        networks.as_ref(),
        &b_def.spec.devices.interfaces,
        &b_uuid,
    );
    assert_eq!(b_shown[0].mac, b_mac, "a MAC given in the spec is kept");
    assert_eq!(b_shown[0].ip.as_deref(), Some("10.71.0.11/24"));

    // The network destroyed and started again while a and b run: b sees
    // the gateway go and come back, both taps are on the new bridge.
    networks.destroy_network("natnet").expect("destroys natnet");
    vireo_drivers::qemu::wait_for_console(&b_log, "GW-GONE-42", Duration::from_secs(60))
        .unwrap_or_else(|t| panic!("guest b did not lose the gateway; console:\n{t}"));
    networks
        .start_network("natnet")
        .expect("starts natnet again");
    let br = netlink::link(&bridge)
        .expect("netlink")
        .expect("the new bridge");
    let mut ports: Vec<String> = netlink::ports_of(br.index)
        .expect("ports")
        .into_iter()
        .map(|l| l.name)
        .collect();
    ports.sort();
    let mut taps = vec![tap::tap_name(&a.uuid, 0), tap::tap_name(&b_uuid, 0)];
    taps.sort();
    assert_eq!(ports, taps, "both guests' taps are back on {bridge}");
    let kept: Vec<String> = networks
        .dhcp_leases("natnet")
        .expect("leases")
        .into_iter()
        .map(|l| l.mac)
        .collect();
    assert!(
        kept.contains(&a_mac) && kept.iter().any(|m| m == b_mac),
        "the leases outlive the restart: {kept:?}"
    );
    let back = Instant::now();
    vireo_drivers::qemu::wait_for_console(&b_log, "GW-BACK-42", Duration::from_secs(60))
        .unwrap_or_else(|t| panic!("guest b did not reach the gateway again; console:\n{t}"));
    say(&format!(
        "b reached the restarted network's gateway {:?} after its start",
        back.elapsed()
    ));

    // Guests go: their taps go with them.
    hv.destroy_domain("a").expect("destroys a");
    hv.destroy_domain("b").expect("destroys b");
    assert!(
        netlink::ports_of(br.index).expect("ports").is_empty(),
        "no tap left on the bridge"
    );
    networks
        .destroy_network("natnet")
        .expect("destroys the network");
    networks.undefine_network("natnet").expect("undefines");
    assert_clean(&host, &["lo", "vh0"]);
}

/// A veth "guest" (a namespace with a static address, its peer on the
/// bridge) against an HTTP server outside: isolated blocks forwarding but
/// not the host side; nat masquerades; route forwards with the guest's own
/// address. The same network, redefined and restarted each time.
#[test]
fn forward_modes_isolated_nat_route() {
    let test = "forward_modes_isolated_nat_route";
    if !available(test) {
        return;
    }
    let host = Netns::new("fwd");
    let outside = Netns::new("out");
    let guest_ns = Netns::new("gst");
    host.ip(&[
        "link",
        "add",
        "vh0",
        "type",
        "veth",
        "peer",
        "name",
        "vo0",
        "netns",
        &outside.name,
    ]);
    host.ip(&["addr", "add", "10.254.0.1/24", "dev", "vh0"]);
    host.ip(&["link", "set", "vh0", "up"]);
    outside.ip(&["addr", "add", "10.254.0.2/24", "dev", "vo0"]);
    outside.ip(&["link", "set", "vo0", "up"]);
    // Replies to a routed (not masqueraded) guest go back through the host.
    outside.ip(&["route", "add", "10.72.0.0/24", "via", "10.254.0.1"]);
    host.enter();
    let out_peers = serve_http(
        &outside.name,
        "10.254.0.2:8080",
        "outside",
        Duration::from_secs(60),
    );

    let host_peers = serve_http(&host.name, "0.0.0.0:8081", "host", Duration::from_secs(60));
    let driver = BridgeDriver::open(&state_dir("bridge-fwd")).expect("opens");
    let mut def = network("fwd", ForwardMode::Isolated, 72, None);
    let r = driver.define_network(&def).expect("defines");
    def.spec.uuid = Some(r.uuid);
    host.ip(&[
        "link",
        "add",
        "vg0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &guest_ns.name,
    ]);
    guest_ns.ip(&["addr", "add", "10.72.0.50/24", "dev", "eth0"]);
    guest_ns.ip(&["link", "set", "eth0", "up"]);
    guest_ns.ip(&["route", "add", "default", "via", "10.72.0.1"]);

    let short = Duration::from_secs(2);
    for (mode, forwards, seen_as) in [
        (ForwardMode::Isolated, false, None),
        (ForwardMode::Nat, true, Some("10.254.0.1")),
        (ForwardMode::Route, true, Some("10.72.0.50")),
    ] {
        def.spec.forward_mode = mode;
        driver.define_network(&def).expect("redefines");
        driver.start_network("fwd").expect("starts");
        let bridge = driver.active_bridge("fwd").expect("active");
        host.ip(&["link", "set", "vg0", "master", &bridge, "up"]);
        assert!(
            connects_from(&guest_ns.name, "10.72.0.1:8081", short),
            "{mode}: the guest reaches the host side"
        );
        assert_eq!(
            host_peers.recv_timeout(short).ok().as_deref(),
            Some("10.72.0.50")
        );
        assert_eq!(
            connects_from(&guest_ns.name, "10.254.0.2:8080", short),
            forwards,
            "{mode}: forwarding to the outside"
        );
        assert_eq!(
            out_peers
                .recv_timeout(Duration::from_millis(500))
                .ok()
                .as_deref(),
            seen_as,
            "{mode}: the outside sees"
        );
        // The outside cannot open connections to the guest, except routed.
        let inbound = connects_from(&outside.name, "10.72.0.50:9", short);
        assert!(
            !inbound,
            "{mode}: nothing listens on the guest's port 9; a connection must not succeed"
        );
        driver.destroy_network("fwd").expect("destroys");
        assert_clean(&host, &["lo", "vh0", "vg0"]);
    }
    driver.undefine_network("fwd").expect("undefines");
}

// ---------------------------------------------------------------------------
// vireo-vmm's test guest beside a Linux guest
// ---------------------------------------------------------------------------

/// Frames seen on an interface (both directions), from an AF_PACKET socket
/// made in the calling thread's namespace and read by a thread until
/// `until` or until `stop` is set.
fn capture(
    ifname: &str,
    until: Duration,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<Vec<u8>>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let index = netlink::link(ifname)
        .expect("netlink")
        .unwrap_or_else(|| panic!("no interface {ifname}"))
        .index;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // right below.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind(2) reads `sll`, which lives across the call, with its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: setsockopt(2) reads a timeval that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    thread::spawn(move || {
        let start = Instant::now();
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 2048];
        while start.elapsed() < until && !stop.load(Ordering::SeqCst) {
            // SAFETY: recv(2) writes at most buf.len() bytes into `buf`.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                frames.push(buf[..n as usize].to_vec());
            }
        }
        frames
    })
}

fn mac_bytes(mac: &str) -> Vec<u8> {
    mac.split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect()
}

/// vireo-vmm's test guest (kvm driver, virtio-net echoing every frame) and
/// a Linux guest (qemu driver) on one bridge: the Linux guest's pings reach
/// the test guest, and come back to the Linux guest's tap from the test
/// guest's MAC.
#[test]
fn kvm_test_guest_and_linux_guest_exchange_frames() {
    let test = "kvm_test_guest_and_linux_guest_exchange_frames";
    if !available(test) || !common::qemu_available(test) || !common::kvm_available(test) {
        return;
    }
    common::guest_image();
    common::vmm_binary();
    common::test_guest();
    let host = Netns::new("mix");
    host.enter();
    let networks = Arc::new(BridgeDriver::open(&state_dir("bridge-mix")).expect("opens"));
    networks
        .create_network(&network(
            "mixnet",
            ForwardMode::Isolated,
            73,
            Some(ranges(73)),
        ))
        .expect("creates");
    let storage = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let kvm_root = state_dir("bridge-kvm");
    let kvm = vireo_drivers::kvm::open_with(
        &format!("kvm:///embed?root={}", kvm_root.display()),
        &format!("/embed?root={}", kvm_root.display()),
        networks.clone(),
        storage.clone(),
    )
    .expect("opens the kvm driver");
    let qemu_root = state_dir("bridge-mixq");
    let qemu = vireo_drivers::qemu::open_with(
        &format!("qemu:///embed?root={}", qemu_root.display()),
        &format!("/embed?root={}", qemu_root.display()),
        networks.clone(),
        storage,
    )
    .expect("opens the qemu driver");

    let t_mac = "52:54:00:73:00:99";
    let mut t = common::test_guest_domain("t", "vireo.echo=1");
    t.spec.devices.interfaces = vec![Interface {
        name: "net0".into(),
        network: "mixnet".into(),
        mac: Some(t_mac.into()),
    }];
    kvm.hypervisor()
        .create_domain(&t)
        .expect("starts the test guest");
    let t_log = console_log(&kvm_root, &kvm, "t");
    let t_text = vireo_drivers::qemu::wait_for_console(
        &t_log,
        "VIREO-TEST-GUEST-DONE",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|t| panic!("the test guest did not finish; console:\n{t}"));
    assert!(
        t_text.contains(&format!("VIREO-TEST net0: mac={t_mac} tx=ok")),
        "the test guest's virtio-net sent its frame; console:\n{t_text}"
    );

    let run = format!(
        "arp -i eth0 -s 10.73.0.99 {t_mac}; \
         ping -c 5 -W 1 10.73.0.99; echo PINGS-SENT"
    );
    let l = qemu
        .hypervisor()
        .create_domain(&guest("l", "mixnet", None, &run))
        .expect("starts the Linux guest");
    let l_mac = tap::derived_mac(&l.uuid, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let frames = capture(&tap::tap_name(&l.uuid, 0), GUEST_TIMEOUT, stop.clone());
    let l_log = console_log(&qemu_root, &qemu, "l");
    let l_text =
        vireo_drivers::qemu::wait_for_console(&l_log, "VIREO-GUEST-RUN-END", GUEST_TIMEOUT)
            .unwrap_or_else(|t| panic!("the Linux guest did not finish; console:\n{t}"));
    assert!(l_text.contains("PINGS-SENT"), "console:\n{l_text}");
    // (The test guest prints only its first 8 frames, and IPv6 chatter
    // fills those; what it echoed is checked on the Linux guest's tap.)
    // Stop the guests, which ends the capture's interface too.
    qemu.hypervisor().destroy_domain("l").expect("destroys l");
    kvm.hypervisor().destroy_domain("t").expect("destroys t");
    stop.store(true, Ordering::SeqCst);
    let frames = frames.join().expect("the capture thread");
    let (t_b, l_b) = (mac_bytes(t_mac), mac_bytes(&l_mac));
    let echoed = frames
        .iter()
        .filter(|f| {
            f.len() >= 14
                && f[0..6] == l_b[..]
                && f[6..12] == t_b[..]
                && f[12..14] == [0x08, 0x00]
                && f.len() >= 34
                && f[23] == 1
        })
        .count();
    assert!(
        echoed >= 3,
        "fewer than 3 of 5 ICMP frames from the test guest ({t_mac}) to the Linux guest ({l_mac}) on its tap; frames seen: {}",
        frames
            .iter()
            .filter(|f| f.len() >= 14)
            .map(|f| format!(
                "{:02x?}>{:02x?} {:02x}{:02x} len {}",
                &f[6..12],
                &f[0..6],
                f[12],
                f[13],
                f.len()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    say(&format!(
        "{echoed} frames echoed by vireo-vmm's test guest reached the Linux guest"
    ));
    networks.destroy_network("mixnet").expect("destroys");
    assert_clean(&host, &["lo"]);
}
