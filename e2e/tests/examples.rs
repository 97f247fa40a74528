//! Every manifest in examples/, applied on a real kube-apiserver the way a
//! GitOps tool applies a repository (`kubectl apply -k examples/`): the
//! schema accepts them all, and with the operator and an agent they
//! converge: the NAT network is a real bridge with dnsmasq, the pool a
//! directory with the volumes' files, and every Domain runs, the Linux guest
//! under QEMU included, which takes an address on the network by DHCP (shown
//! in its status) and makes a filesystem on its volume. `kubectl delete -k`
//! removes them. (agent/tests/examples.rs runs the same directory in
//! standalone mode.)
//!
//! The agent runs in a network namespace the test makes, so the example's
//! bridge and NAT rules never touch the host's interfaces. Without
//! `qemu-system-x86_64` or root the test fails when `CI` is set, and
//! otherwise prints a SKIP line and returns.

mod common;

use std::time::Duration;

use common::{Cluster, Netns, ready_hosts, repo, wait_for};
use kube::api::Api;
use vireo_crds::{Domain, DomainState, Network, StoragePool, StorageVol};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn every_example_applies_and_converges() {
    let qemu = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !(qemu && root) {
        let why = if qemu {
            "not root"
        } else {
            "qemu-system-x86_64 not found"
        };
        if std::env::var_os("CI").is_some() {
            panic!("examples e2e: {why}, and CI is set");
        }
        eprintln!("SKIP examples e2e: {why}");
        return;
    }
    // The Linux example boots from the agent's default boot directory.
    common::script_output(
        "scripts/guest-image.sh",
        Some(std::path::Path::new("/var/lib/vireo/boot/vireo-guest")),
    );

    let cluster = Cluster::start("examples");
    let _op = cluster.operator("operator", &["--no-leader-election"]);
    let netns = Netns::new(&format!("vireo-e2e-ex-{}", std::process::id()));
    let _agent = cluster.agent_in_netns(
        "node-1",
        &netns,
        &["--resync-seconds", "2", "--boot-dir", "/var/lib/vireo/boot"],
    );
    let client = cluster.client().await;
    ready_hosts(&client, 1).await;
    let examples = repo().join("examples");
    let examples = examples.to_str().expect("path");
    let applied = cluster.kubectl_ok(&["apply", "-k", examples]);
    for object in [
        "network.vireo.dev/lab",
        "storagepool.vireo.dev/images",
        "storagevol.vireo.dev/scratch",
        "domain.vireo.dev/demo",
        "domain.vireo.dev/web",
        "domain.vireo.dev/linux",
        "storagevol.vireo.dev/linux-data",
    ] {
        assert!(applied.contains(object), "{object} applied: {applied}");
    }
    // The Debian disk example is valid for the API server too (not applied:
    // it waits for an upload and boots for minutes under TCG; the firmware
    // tests in drivers/tests/firmware_boot.rs boot that disk).
    let debian = repo().join("examples").join("debian");
    let dry = cluster.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-k",
        debian.to_str().expect("path"),
    ]);
    for object in ["storagevol.vireo.dev/debian", "domain.vireo.dev/debian"] {
        assert!(dry.contains(object), "{object} accepted: {dry}");
    }

    let nets: Api<Network> = Api::all(client.clone());
    wait_for(T, "network lab active", || async {
        nets.get_opt("lab").await.ok().flatten().filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.active_nodes)
                .is_some_and(|a| a >= 1)
        })
    })
    .await;
    let pools: Api<StoragePool> = Api::all(client.clone());
    wait_for(T, "pool images active", || async {
        pools.get_opt("images").await.ok().flatten().filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.active_nodes)
                .is_some_and(|a| a >= 1)
        })
    })
    .await;
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    for name in ["demo", "web", "linux"] {
        wait_for(T, &format!("domain {name} running"), || async {
            domains
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .filter(|d| d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running))
        })
        .await;
    }
    let vols: Api<StorageVol> = Api::namespaced(client.clone(), "default");
    let v = vols.get("scratch").await.expect("scratch");
    let status = v.status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Ready"));
    assert!(
        cluster
            .dir
            .join("host-node-1/var/lib/vireo/images/default.scratch")
            .is_file(),
        "the volume is a file in the pool on node-1"
    );
    // web's interface on lab, with the MAC derived from its UUID.
    let web = domains.get("web").await.expect("web");
    let ifaces = web.status.expect("status").interfaces;
    assert_eq!(ifaces.len(), 1, "{ifaces:?}");
    assert_eq!(
        (ifaces[0].name.as_str(), ifaces[0].network.as_str()),
        ("net0", "lab")
    );
    assert!(ifaces[0].mac.starts_with("52:54:00:"), "{ifaces:?}");
    // The network is a real bridge in the agent's namespace.
    let bridge = netns.ip(&["-br", "addr", "show", "vireo-lab0"]);
    assert!(bridge.contains("10.77.0.1/24"), "{bridge}");

    // The Linux guest: an address from lab's DHCP range in its status, and
    // on its console, with its disk (the volume linux-data) made and mounted.
    let linux = wait_for(T, "the Linux guest's address in its status", || async {
        let d = domains.get_opt("linux").await.ok().flatten()?;
        let ip = d.status.as_ref()?.interfaces.first()?.ip.clone()?;
        Some((d, ip))
    })
    .await;
    let (linux, ip) = linux;
    assert!(ip.starts_with("10.77.0.") && ip.ends_with("/24"), "{ip}");
    let uuid = linux.spec.uuid.clone().expect("a UUID");
    let console_log = cluster
        .dir
        .join("state-node-1/qemu/run")
        .join(&uuid)
        .join("console.log");
    let console = wait_for(T, "the Linux guest's set-up", || async {
        std::fs::read_to_string(&console_log)
            .ok()
            .filter(|t| t.contains("VIREO-GUEST-SETUP-DONE"))
    })
    .await;
    assert!(
        console.contains(&format!("VIREO-GUEST-IP {ip}")),
        "the guest has the address its status shows ({ip}): {console}"
    );
    assert!(
        console.contains("VIREO-GUEST-DISK ok vda /mnt/vda"),
        "{console}"
    );
    let data = vols.get("linux-data").await.expect("linux-data");
    assert_eq!(data.status.and_then(|s| s.phase).as_deref(), Some("Ready"));
    let magic = std::fs::read(
        cluster
            .dir
            .join("host-node-1/var/lib/vireo/images/default.linux-data"),
    )
    .map(|b| b.get(1024 + 56..1024 + 58).map(<[u8]>::to_vec))
    .expect("the volume's file");
    assert_eq!(magic, Some(vec![0x53, 0xef]), "ext2 superblock magic");

    let table = cluster.kubectl_ok(&["get", "domains"]);
    assert!(
        table.contains("linux") && table.contains("running"),
        "{table}"
    );

    cluster.kubectl_ok(&["delete", "-k", examples, "--wait=false"]);
    wait_for(T, "the example domains gone", || async {
        let left = domains.list(&Default::default()).await.ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    // The network went with its manifest: no bridge is left in the namespace.
    wait_for(T, "the bridge gone", || async {
        (!netns.ip(&["-br", "link"]).contains("vireo-lab0")).then_some(())
    })
    .await;
}
