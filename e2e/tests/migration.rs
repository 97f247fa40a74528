//! Live migration on the real API server: two agents, each in a network
//! namespace of its own joined by a veth link whose addresses are their
//! migration addresses (`--migration-address`), and a third small node.
//! A test-driver Domain moves from node-1 to node-2 with `vireo migrate`:
//! the DomainMigration goes through every phase to Succeeded, the Domain is
//! bound to node-2 and runs there, node-1 has no record of it left, and an
//! observer reading both agents' own records all along (STATE/test-node/
//! domains/*.json, as the chaos run does) never sees it running on both.
//! Then a migration to the host that cannot take it fails with a condition
//! saying why and the guest runs on; a second migration while one is in
//! progress is refused; the spec cannot change.
//!
//! A second test drains a Host (`vireo drain`): each Domain goes as its
//! `evictionStrategy` says.
//!
//! Needs root (network namespaces); without it the test fails when `CI`
//! is set and otherwise prints a SKIP line and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Cluster, Netns, ready_hosts, vireo_as, wait_for};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use vireo_crds::labels::{MIGRATION_ANNOTATION, NODE};
use vireo_crds::{Domain, DomainMigration, DomainMigrationSpec, DomainState, Host, MigrationPhase};

const T: Duration = Duration::from_secs(60);

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: not root (network namespaces), and CI is set"
    );
    eprintln!("SKIP {test}: not root (network namespaces)");
    false
}

/// Joins two namespaces with a veth pair: `ns1` gets 10.77.0.1/24, `ns2`
/// 10.77.0.2/24.
fn link(ns1: &Netns, ns2: &Netns, tag: &str) {
    let (a, b) = (format!("vm{tag}a"), format!("vm{tag}b"));
    let run = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {}", args.join(" "));
    };
    run(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    run(&["link", "set", &a, "netns", &ns1.name]);
    run(&["link", "set", &b, "netns", &ns2.name]);
    for (ns, dev, addr) in [(ns1, &a, "10.77.0.1/24"), (ns2, &b, "10.77.0.2/24")] {
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        assert!(
            ns.ip(&["-o", "addr", "show", "dev", dev]).contains(addr),
            "{addr} on {dev} in {}",
            ns.name
        );
    }
}

/// The operator, and agents node-1 and node-2 each in a network namespace
/// of its own (`vireo-TAG-1`, `vireo-TAG-2`) joined by a veth pair whose
/// addresses are their migration addresses (10.77.0.1, 10.77.0.2). The
/// namespaces live as long as what this returns.
fn two_linked_nodes(cluster: &mut Cluster, tag: &str, veth: &str) -> (Netns, Netns) {
    let ns1 = Netns::new(&format!("vireo-{tag}-1"));
    let ns2 = Netns::new(&format!("vireo-{tag}-2"));
    link(&ns1, &ns2, veth);
    cluster.hold(cluster.operator("operator", &["--no-leader-election"]));
    for (node, ns, address) in [("node-1", &ns1, "10.77.0.1"), ("node-2", &ns2, "10.77.0.2")] {
        let args = ["--network-driver", "test", "--migration-address", address];
        cluster.hold(cluster.agent_in_netns(node, ns, &args));
    }
    (ns1, ns2)
}

/// `vireo -c kube:/// migrate DOMAIN NODE`, which must succeed: its
/// (stdout, stderr).
fn migrate_with_cli(cluster: &Cluster, domain: &str, node: &str) -> (String, String) {
    let out = vireo_as(
        &cluster.kubeconfig,
        &["-c", "kube:///", "migrate", domain, node].map(String::from),
        b"",
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "vireo migrate: {stdout}{stderr}\n{}",
        cluster.logs()
    );
    (stdout, stderr)
}

/// The test driver's records of running domains on a node: (name, uuid).
fn running_records(state: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(state.join("test-node/domains")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            (v["state"] == "running").then(|| {
                (
                    v["def"]["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    v["uuid"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect()
}

fn record_exists(state: &Path, key: &str) -> bool {
    let file = format!("{}.json", key.replace('/', "%2F"));
    state.join("test-node/domains").join(file).exists()
}

/// Watches both nodes' records until stopped; returns every moment one
/// UUID was running on both (empty: never).
fn observe(
    states: [PathBuf; 2],
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let mut looks = 0;
        let mut both = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let a = running_records(&states[0]);
            let b = running_records(&states[1]);
            for (name, uuid) in &a {
                if b.iter().any(|(_, u)| u == uuid) {
                    both.push(format!(
                        "{name} ({uuid}) running on both nodes at look {looks}"
                    ));
                }
            }
            looks += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (looks, both)
    })
}

fn phase(m: &DomainMigration) -> Option<MigrationPhase> {
    m.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(m: &'a DomainMigration, t: &str) -> Option<&'a vireo_crds::Condition> {
    m.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)
}

async fn ended(api: &Api<DomainMigration>, name: &str) -> DomainMigration {
    wait_for(T, &format!("DomainMigration {name} to end"), || async {
        api.get_opt(name)
            .await
            .ok()
            .flatten()
            .filter(|m| phase(m).is_some_and(|p| p.is_final()))
    })
    .await
}

async fn running_on(api: &Api<Domain>, name: &str, node: &str) -> Domain {
    wait_for(T, &format!("{name} running on {node}"), || async {
        api.get_opt(name).await.ok().flatten().filter(|d| {
            let s = d.status.as_ref();
            d.labels().get(NODE).map(String::as_str) == Some(node)
                && s.and_then(|s| s.node_name.as_deref()) == Some(node)
                && s.and_then(|s| s.state) == Some(DomainState::Running)
                && s.and_then(|s| s.info.as_ref())
                    .is_some_and(|i| i.state == DomainState::Running)
        })
    })
    .await
}

fn migration(name: &str, domain: &str, target: Option<&str>) -> DomainMigration {
    DomainMigration::new(
        name,
        DomainMigrationSpec {
            domain_name: domain.into(),
            target_node: target.map(str::to_string),
            max_downtime_ms: None,
            bandwidth: None,
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_test_domain_migrates_between_two_agents_and_a_refused_one_runs_on() {
    if !root_or_skip("migration") {
        return;
    }
    let mut cluster = Cluster::start("migration");
    let _nets = two_linked_nodes(&mut cluster, "mig", "k");
    // node-3 cannot take it: 1 GiB for a 2 GiB guest. Its address is
    // found, not given.
    cluster.hold(cluster.agent("node-3", &["--memory", "1Gi"]));
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    let hosts: Api<Host> = Api::all(client.clone());
    for (node, want) in [("node-1", Some("10.77.0.1")), ("node-2", Some("10.77.0.2"))] {
        let h = hosts.get(node).await.expect("host");
        assert_eq!(
            h.status.and_then(|s| s.migration_address).as_deref(),
            want,
            "{node}'s migration address"
        );
    }

    // Placement: node-1 and node-2 tie on free memory; the name decides.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata: {name: web, namespace: default}
spec: {type: test, memory: 2Gi, vcpus: 2, runStrategy: Always}
"#,
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let before = running_on(&domains, "web", "node-1").await;
    let uuid = before.spec.uuid.clone().expect("uuid");
    let states = [
        cluster.dir.join("state-node-1"),
        cluster.dir.join("state-node-2"),
    ];
    assert!(record_exists(&states[0], "default/web"));

    let stop = Arc::new(AtomicBool::new(false));
    let observer = observe(states.clone(), stop.clone());
    let (stdout, stderr) = migrate_with_cli(&cluster, "web", "node-2");
    assert!(
        stdout.contains("Domain 'default/web' migrated to node node-2"),
        "{stdout}"
    );
    // The test driver's steps take milliseconds: the CLI, polling, may see
    // only the last phase.
    assert!(stderr.contains(": Succeeded"), "progress: {stderr}");
    let after = running_on(&domains, "web", "node-2").await;
    stop.store(true, Ordering::Relaxed);
    let (looks, both) = observer.join().expect("observer");
    assert!(both.is_empty(), "{both:?}");
    assert!(looks > 10, "the observer looked {looks} times");
    assert_eq!(
        after.spec.uuid.as_deref(),
        Some(uuid.as_str()),
        "the same domain"
    );
    assert!(
        !after.annotations().contains_key(MIGRATION_ANNOTATION),
        "the mark is gone"
    );
    assert!(
        !record_exists(&states[0], "default/web"),
        "node-1's copy removed"
    );
    assert!(
        running_records(&states[1]).iter().any(|(_, u)| *u == uuid),
        "node-2's record runs"
    );
    // The migration's record: every step True, the figures, the nodes.
    let migrations: Api<DomainMigration> = Api::namespaced(client.clone(), "default");
    let list = migrations.list(&Default::default()).await.expect("list");
    assert_eq!(list.items.len(), 1);
    let m = &list.items[0];
    assert_eq!(phase(m), Some(MigrationPhase::Succeeded));
    let s = m.status.clone().expect("status");
    assert_eq!(
        (s.source_node.as_deref(), s.target_node.as_deref()),
        (Some("node-1"), Some("node-2"))
    );
    assert!(
        s.incoming
            .is_some_and(|i| i.uri == "test+migrate://10.77.0.2/default/web")
    );
    assert_eq!(s.stats.map(|st| st.memory_bytes), Some(2 << 30));
    for step in [
        "Scheduled",
        "Prepared",
        "Transferred",
        "Finished",
        "Confirmed",
    ] {
        assert_eq!(
            condition(m, step).map(|c| c.status.as_str()),
            Some("True"),
            "{step}"
        );
    }
    assert!(s.start_time.is_some() && s.end_time.is_some());
    let table = cluster.kubectl_ok(&["get", "dmig", "-n", "default"]);
    assert!(
        table.contains("DOMAIN") && table.contains("SOURCE") && table.contains("node-2"),
        "{table}"
    );
    let events = cluster.kubectl_ok(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.name=web,involvedObject.kind=Domain",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    for r in ["MigrationPrepared", "MigrationTransferred", "Migrated"] {
        assert!(events.contains(r), "Domain Events lack {r}: {events}");
    }
    // node-2's agent adopted it: a stop through the spec is carried out there.
    assert_eq!(
        after.status.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("node-2")
    );

    // A host that cannot take it: Failed, with why; the guest runs on.
    migrations
        .create(
            &PostParams::default(),
            &migration("to-small", "web", Some("node-3")),
        )
        .await
        .expect("created");
    let m = ended(&migrations, "to-small").await;
    assert_eq!(phase(&m), Some(MigrationPhase::Failed));
    let c = condition(&m, "Scheduled").expect("Scheduled");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "NoTarget")
    );
    assert!(
        c.message.contains("host node-3 cannot take it") && c.message.contains("memory"),
        "{}",
        c.message
    );
    let still = running_on(&domains, "web", "node-2").await;
    assert!(!still.annotations().contains_key(MIGRATION_ANNOTATION));

    // To where it runs: refused the same way.
    migrations
        .create(
            &PostParams::default(),
            &migration("to-self", "web", Some("node-2")),
        )
        .await
        .expect("created");
    let m = ended(&migrations, "to-self").await;
    assert!(
        m.status
            .and_then(|s| s.message)
            .is_some_and(|t| t.contains("the host the domain runs on")),
    );

    // The spec cannot change.
    let e = migrations
        .patch(
            "to-small",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"targetNode": "node-1"}})),
        )
        .await
        .expect_err("immutable");
    assert!(e.to_string().contains("spec is immutable"), "{e}");

    // One at a time: a Domain marked by a migration in progress refuses another.
    migrations
        .create(
            &PostParams::default(),
            &migration("held", "other", Some("node-9")),
        )
        .await
        .expect("created");
    migrations
        .patch_status(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Preparing", "sourceNode": "node-8", "targetNode": "node-9"}})),
        )
        .await
        .expect("held in Preparing");
    domains
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {MIGRATION_ANNOTATION: "held"}}})),
        )
        .await
        .expect("marked");
    migrations
        .create(&PostParams::default(), &migration("second", "web", None))
        .await
        .expect("created");
    let m = ended(&migrations, "second").await;
    assert_eq!(phase(&m), Some(MigrationPhase::Failed));
    assert!(
        condition(&m, "Scheduled").is_some_and(
            |c| c.reason == "AlreadyMigrating" && c.message.contains("DomainMigration 'held'")
        ),
        "{:?}",
        m.status
    );
    // The refused one did not take the mark away from the one in progress.
    let d = domains.get("web").await.expect("web");
    assert_eq!(
        d.annotations()
            .get(MIGRATION_ANNOTATION)
            .map(String::as_str),
        Some("held")
    );
    assert_eq!(d.labels().get(NODE).map(String::as_str), Some("node-2"));
    drop(cluster);
}

/// `vireo drain node-1`: of three Domains there, the LiveMigrate one
/// migrates (a DomainMigration the operator made), the Shutdown one is shut
/// down there and starts on another node, the None one stays; the Host
/// says Drained and `kubectl get hosts` shows DRAIN.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_moves_domains_as_their_eviction_strategy_says() {
    let mut cluster = Cluster::start("drain");
    cluster.hold(cluster.operator("operator", &["--no-leader-election"]));
    // node-1 has the most room: placement puts all three there.
    cluster.hold(cluster.agent("node-1", &["--memory", "64Gi"]));
    cluster.hold(cluster.agent("node-2", &[]));
    cluster.hold(cluster.agent("node-3", &[]));
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    let mut yaml = String::new();
    for (name, strategy) in [
        ("live", "LiveMigrate"),
        ("shut", "Shutdown"),
        ("stay", "None"),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: {name}, namespace: default}}\nspec: {{type: test, memory: 1Gi, vcpus: 1, runStrategy: Always, evictionStrategy: {strategy}}}\n"
        ));
    }
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    for name in ["live", "shut", "stay"] {
        running_on(&domains, name, "node-1").await;
    }
    let out = vireo_as(
        &cluster.kubeconfig,
        &["-c", "kube:///", "drain", "node-1"].map(String::from),
        b"",
    );
    assert!(
        out.status.success(),
        "vireo drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = cluster.kubectl_ok(&["get", "hosts"]);
    assert!(table.contains("DRAIN") && table.contains("true"), "{table}");
    let hosts: Api<Host> = Api::all(client.clone());
    wait_for(T, "node-1 Drained", || async {
        let h = hosts.get("node-1").await.ok()?;
        h.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Drained" && c.status == "True")
            .then_some(())
    })
    .await;
    let moved = |d: &Domain| {
        d.labels()
            .get(NODE)
            .is_some_and(|n| n == "node-2" || n == "node-3")
    };
    for name in ["live", "shut"] {
        let d = wait_for(T, &format!("{name} running off node-1"), || async {
            domains.get_opt(name).await.ok().flatten().filter(|d| {
                moved(d) && d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running)
            })
        })
        .await;
        assert!(moved(&d));
    }
    let migrations: Api<DomainMigration> = Api::namespaced(client.clone(), "default");
    let m = migrations
        .get("live-drain")
        .await
        .expect("the drain's migration");
    assert_eq!(phase(&m), Some(MigrationPhase::Succeeded));
    assert_eq!(
        m.labels()
            .get(vireo_crds::labels::DRAIN_LABEL)
            .map(String::as_str),
        Some("node-1")
    );
    assert!(
        migrations
            .get_opt("shut-drain")
            .await
            .expect("get")
            .is_none(),
        "Shutdown does not migrate"
    );
    let stay = domains.get("stay").await.expect("stay");
    assert_eq!(stay.labels().get(NODE).map(String::as_str), Some("node-1"));
    assert_eq!(
        stay.status.as_ref().and_then(|s| s.state),
        Some(DomainState::Running)
    );
    drop(cluster);
}

fn qemu_or_skip(test: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    let debugfs = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .iter()
        .any(|p| Path::new(p).is_file());
    if found && debugfs {
        return root_or_skip(test);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: qemu-system-x86_64 or debugfs is missing and CI is set (scripts/setup installs them)"
    );
    eprintln!("SKIP {test}: qemu-system-x86_64 or debugfs not found");
    false
}

/// The Linux guest's counter on its console (`TICK-n`).
const TICK: &str = "TICK-";
/// The test guest's under vireo-vmm (`vireo.counter=1`).
const KVM_TICK: &str = "VIREO-TEST counter ";

/// The counters a console log shows after `marker`, in order.
fn counters(log: &Path, marker: &str) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .split(marker)
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

fn ticks(log: &Path) -> Vec<u64> {
    counters(log, TICK)
}

fn last_of(log: &Path, marker: &str) -> u64 {
    counters(log, marker).last().copied().unwrap_or(0)
}

fn last_tick(log: &Path) -> u64 {
    last_of(log, TICK)
}

async fn counter_above(log: &Path, marker: &str, above: u64, what: &str) -> u64 {
    wait_for(T, what, || async {
        let t = last_of(log, marker);
        (t > above).then_some(t)
    })
    .await
}

async fn tick_above(log: &Path, above: u64, what: &str) -> u64 {
    counter_above(log, TICK, above, what).await
}

/// Follows both consoles until stopped; returns every moment node-1's
/// counter went on after node-2's had started (the guest running twice).
fn observe_consoles(
    logs: [PathBuf; 2],
    marker: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let mut looks = 0;
        let mut both = Vec::new();
        let mut first_on_2: Option<(u64, u64)> = None;
        while !stop.load(Ordering::Relaxed) {
            let (one, two) = (last_of(&logs[0], marker), last_of(&logs[1], marker));
            match first_on_2 {
                None if two > 0 => first_on_2 = Some((one, two)),
                Some((one_then, two_then)) if one > one_then => both.push(format!(
                    "node-1 printed counter {one} after node-2 had printed {two_then} (node-1 was at {one_then})"
                )),
                _ => {}
            }
            looks += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (looks, both)
    })
}

/// The issue's migration: a Linux guest (QEMU, TCG) writing a growing file
/// on a node-local raw volume moves from node-1 to node-2 with `vireo
/// migrate`. Before that, a migration held to 1 MiB/s is cancelled with
/// `vireo domjobabort` while its state is sent: it fails saying it was
/// aborted, its object goes, and the guest runs on on node-1 with nothing
/// left on node-2. After the real one: the console's counter goes on from
/// where it was (no second boot), the Domain and its volume are bound to
/// node-2, node-1's QEMU and its copy of the volume are gone, the two
/// consoles never counted at once, and once shut down the file on node-2's
/// disk has every line. A migration to a host that cannot take it fails
/// with a condition and the guest runs on.
#[tokio::test(flavor = "multi_thread")]
async fn a_linux_guest_migrates_with_its_disk_and_an_aborted_one_stays() {
    let test = "qemu_migration";
    if !qemu_or_skip(test) {
        return;
    }
    let image = common::script_output("scripts/guest-image.sh", None);
    let mut cluster = Cluster::start("qemu-migration");
    let _nets = two_linked_nodes(&mut cluster, "qmig", "q");
    cluster.hold(cluster.agent("node-3", &["--memory", "64Mi"]));
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;

    // Each second the guest appends a line to a file on its disk and syncs,
    // then prints the counter: every counter printed is on the disk.
    let manifest = format!(
        r#"apiVersion: vireo.dev/v1alpha1
kind: StoragePool
metadata: {{name: images}}
spec: {{path: /var/lib/vireo/images}}
---
apiVersion: vireo.dev/v1alpha1
kind: StorageVol
metadata: {{name: data, namespace: default}}
spec: {{pool: images, capacity: 64Mi, format: raw, nodeName: node-1}}
---
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata: {{name: mover, namespace: default}}
spec:
  type: qemu
  memory: 128Mi
  vcpus: 1
  runStrategy: Always
  os:
    kernel: {}
    initrd: {}
    cmdline: 'console=ttyS0 quiet vireo.net=0 vireo.mkfs=1 vireo.run="i=0; while :; do i=$((i+1)); echo line-$i >> /mnt/vda/log; sync; echo TICK-$i; sleep 1; done"'
  devices:
    disks: [{{name: vda, volume: data}}]
"#,
        image.join("vmlinuz").display(),
        image.join("initrd.img").display()
    );
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let vols: Api<vireo_crds::StorageVol> = Api::namespaced(client.clone(), "default");
    let migrations: Api<DomainMigration> = Api::namespaced(client.clone(), "default");
    let before = running_on(&domains, "mover", "node-1").await;
    let uuid = before
        .spec
        .uuid
        .clone()
        .or_else(|| before.uid())
        .expect("uuid");
    let run_dir = |node: &str| cluster.dir.join(format!("state-{node}/qemu/run/{uuid}"));
    let logs = [
        run_dir("node-1").join("console.log"),
        run_dir("node-2").join("console.log"),
    ];
    let copy_on = |node: &str| {
        cluster
            .dir
            .join(format!("host-{node}/var/lib/vireo/images/default.data"))
    };
    tick_above(&logs[0], 2, "the guest counting on node-1").await;
    let pid_1: u32 = std::fs::read_to_string(run_dir("node-1").join("pid"))
        .expect("node-1's pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(copy_on("node-1").exists() && !copy_on("node-2").exists());

    // 1. Held to 1 MiB/s (128 MiB of memory: minutes), then aborted while
    // the state goes.
    let mut slow = migration("slow", "mover", Some("node-2"));
    slow.spec.bandwidth = Some(1);
    migrations
        .create(&PostParams::default(), &slow)
        .await
        .expect("created");
    wait_for(T, "the slow migration sending", || async {
        migrations
            .get_opt("slow")
            .await
            .ok()
            .flatten()
            .filter(|m| phase(m) == Some(MigrationPhase::Transferring))
    })
    .await;
    // Its copy of the volume exists on node-2 while it is sent.
    assert!(copy_on("node-2").exists(), "node-2 made the volume's copy");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = vireo_as(
        &cluster.kubeconfig,
        &["-c", "kube:///", "domjobabort", "mover"].map(String::from),
        b"",
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vireo domjobabort: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("Migration slow of domain"), "{said}");
    // It ends (Failed, the send aborted) and then goes; the last look at
    // it says why.
    let mut last = None;
    let deadline = std::time::Instant::now() + T;
    loop {
        match migrations.get_opt("slow").await {
            Ok(Some(m)) => last = Some(m),
            Ok(None) => break,
            Err(_) => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the aborted migration is still there: {:?}\n{}",
            last.as_ref().and_then(|m| m.status.clone()),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = last.expect("seen while it was cancelled");
    let transferred = condition(&last, "Transferred").cloned();
    if let Some(c) = &transferred {
        assert_eq!(c.status, "False", "{c:?}");
        assert!(
            c.message.contains("aborted") || c.message.contains("deleted"),
            "{c:?}"
        );
    }
    let d = running_on(&domains, "mover", "node-1").await;
    assert!(
        !d.annotations().contains_key(MIGRATION_ANNOTATION),
        "the mark is released"
    );
    let t = last_tick(&logs[0]);
    tick_above(
        &logs[0],
        t + 2,
        "the guest counting on node-1 after the abort",
    )
    .await;
    // node-2 keeps no record and runs no QEMU for it (its console log of
    // the attempt stays, as a stopped domain's does).
    let records_2 = cluster.dir.join("state-node-2/qemu/domains");
    wait_for(T, "node-2's half removed", || async {
        let records = std::fs::read_dir(&records_2)
            .map(|d| d.count())
            .unwrap_or(0);
        (records == 0 && !run_dir("node-2").join("pid").exists()).then_some(())
    })
    .await;
    wait_for(T, "node-2's copy of the volume removed", || async {
        (!copy_on("node-2").exists()).then_some(())
    })
    .await;
    assert!(copy_on("node-1").exists(), "node-1's volume stays");

    // 2. The migration.
    let stop = Arc::new(AtomicBool::new(false));
    let observer = observe_consoles(logs.clone(), TICK, stop.clone());
    let (stdout, _) = migrate_with_cli(&cluster, "mover", "node-2");
    assert!(
        stdout.contains("Domain 'default/mover' migrated to node node-2"),
        "{stdout}"
    );
    eprintln!("{stdout}");
    let after = running_on(&domains, "mover", "node-2").await;
    assert!(!after.annotations().contains_key(MIGRATION_ANNOTATION));
    let on_2 = tick_above(&logs[1], 0, "the guest counting on node-2").await;
    let more = tick_above(&logs[1], on_2 + 2, "the guest counting on on node-2").await;
    stop.store(true, Ordering::Relaxed);
    let (looks, both) = observer.join().expect("observer");
    assert!(both.is_empty(), "{both:?}");
    assert!(looks > 10, "the observer looked {looks} times");
    let text_2 = std::fs::read_to_string(&logs[1]).unwrap_or_default();
    assert!(
        !text_2.contains("VIREO-GUEST-READY"),
        "the guest booted again on node-2:\n{text_2}"
    );
    let first_2 = ticks(&logs[1])[0];
    assert!(
        first_2 > 3,
        "node-2's counter starts at {first_2}: a fresh boot"
    );
    eprintln!("the counter went on on node-2 from {first_2} (now {more})");
    // node-1: its QEMU gone, its run directory and its volume copy too.
    wait_for(T, "node-1's QEMU gone", || async {
        (!Path::new(&format!("/proc/{pid_1}")).exists()).then_some(())
    })
    .await;
    assert!(!run_dir("node-1").exists());
    wait_for(T, "node-1's copy of the volume removed", || async {
        (!copy_on("node-1").exists()).then_some(())
    })
    .await;
    let v = wait_for(T, "volume data Ready on node-2", || async {
        vols.get_opt("data").await.ok().flatten().filter(|v| {
            v.labels().get(NODE).map(String::as_str) == Some("node-2")
                && v.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-2")
                && v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Ready")
        })
    })
    .await;
    assert!(v.status.is_some());
    let m = migrations
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .find(|m| m.name_any().starts_with("mover-"))
        .expect("the CLI's DomainMigration");
    let s = m.status.clone().expect("status");
    let stats = s.stats.expect("stats");
    assert!(stats.memory_bytes > 0 && stats.disk_bytes > 0, "{stats:?}");
    // The guest did stop: from the source's pause to the target's resume.
    assert!(
        stats.downtime_ms > 0 && stats.paused_at_ms.is_some(),
        "{stats:?}"
    );
    assert!(m.finalizers().is_empty(), "{:?}", m.finalizers());

    // 3. A host that cannot take it (64 MiB for a 128 MiB guest).
    migrations
        .create(
            &PostParams::default(),
            &migration("to-small", "mover", Some("node-3")),
        )
        .await
        .expect("created");
    let m = ended(&migrations, "to-small").await;
    assert_eq!(phase(&m), Some(MigrationPhase::Failed));
    let c = condition(&m, "Scheduled").expect("Scheduled");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "NoTarget")
    );
    let t = last_tick(&logs[1]);
    tick_above(&logs[1], t + 1, "the guest counting on after the refusal").await;
    running_on(&domains, "mover", "node-2").await;

    // 4. Shut down (the guest unmounts its disk); the file on node-2's
    // disk has every line, from before and after the move.
    let last = last_tick(&logs[1]);
    domains
        .patch(
            "mover",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
        )
        .await
        .expect("halted");
    wait_for(T, "mover shut off", || async {
        domains
            .get_opt("mover")
            .await
            .ok()
            .flatten()
            .filter(|d| d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Shutoff))
    })
    .await;
    let debugfs = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("debugfs");
    let out = Command::new(debugfs)
        .args(["-R", "cat /log"])
        .arg(copy_on("node-2"))
        .stderr(std::process::Stdio::null())
        .output()
        .expect("debugfs runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() as u64 >= last,
        "the file has {} lines; the guest printed counter {last}",
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
    eprintln!(
        "the file on node-2's disk: {} lines, all in order",
        lines.len()
    );
    drop(cluster);
}

/// `kubectl drain node-1 --ignore-daemonsets` (the real command; the
/// agents are a DaemonSet in the chart) with the operator's
/// `--drain-on-cordon`: the cordon drains Host node-1, its LiveMigrate
/// Domain migrates, no new Domain is placed there, and `kubectl uncordon`
/// ends the drain (the condition goes, placement may use it again).
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_drain_of_a_node_migrates_its_guests() {
    let mut cluster = Cluster::start("kubectl-drain");
    cluster.hold(cluster.operator("operator", &["--no-leader-election", "--drain-on-cordon"]));
    cluster.hold(cluster.agent("node-1", &["--memory", "64Gi"]));
    cluster.hold(cluster.agent("node-2", &[]));
    let client = cluster.client().await;
    ready_hosts(&client, 2).await;
    // The Kubernetes Nodes of the same names (no kubelet runs here; kubectl
    // drain cordons them and finds no pods to evict).
    let nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-2}\n";
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], nodes);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: live, namespace: default}\nspec: {type: test, memory: 1Gi, vcpus: 1, runStrategy: Always, evictionStrategy: LiveMigrate}\n",
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    running_on(&domains, "live", "node-1").await;

    let out = cluster.kubectl_stdin(
        &["drain", "node-1", "--ignore-daemonsets", "--timeout=60s"],
        "",
    );
    assert!(
        out.status.success(),
        "kubectl drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    running_on(&domains, "live", "node-2").await;
    let hosts: Api<Host> = Api::all(client.clone());
    let drained = wait_for(T, "node-1 Drained", || async {
        let h = hosts.get("node-1").await.ok()?;
        h.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Drained" && c.status == "True")
    })
    .await;
    assert!(
        drained.message.contains("node cordoned"),
        "{}",
        drained.message
    );
    let out = cluster.kubectl_ok(&[
        "wait",
        "host/node-1",
        "--for=condition=Drained",
        "--timeout=30s",
    ]);
    assert!(out.contains("condition met"), "{out}");
    // A new Domain goes elsewhere, though node-1 has the most room.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: fresh, namespace: default}\nspec: {type: test, memory: 1Gi, vcpus: 1, runStrategy: Always}\n",
    );
    running_on(&domains, "fresh", "node-2").await;

    // Uncordoned: the drain ends; the moved Domain stays where it went.
    cluster.kubectl_ok(&["uncordon", "node-1"]);
    wait_for(T, "node-1's Drained condition gone", || async {
        let h = hosts.get("node-1").await.ok()?;
        (!h.status?.conditions.iter().any(|c| c.type_ == "Drained")).then_some(())
    })
    .await;
    let d = domains.get("live").await.expect("live");
    assert_eq!(d.labels().get(NODE).map(String::as_str), Some("node-2"));
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: later, namespace: default}\nspec: {type: test, memory: 1Gi, vcpus: 1, runStrategy: Always}\n",
    );
    running_on(&domains, "later", "node-1").await;
    drop(cluster);
}

fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if ok {
        return root_or_skip(test);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: /dev/kvm cannot be opened and CI is set"
    );
    eprintln!("SKIP {test}: /dev/kvm cannot be opened");
    false
}

/// A `type: kvm` Domain (the test guest under vireo-vmm, counting on its
/// console) moves from node-1 to node-2 through the same DomainMigration
/// steps: vireo-vmm's snapshot goes over TCP between the two agents'
/// network namespaces (stop-and-copy). The counter goes on on node-2 with
/// no second boot, the consoles never count at once, node-1's VMM is gone,
/// and the figures say what was sent and how long the guest stood still.
#[tokio::test(flavor = "multi_thread")]
async fn a_kvm_guest_migrates_between_two_agents() {
    let test = "kvm_migration";
    if !kvm_or_skip(test) {
        return;
    }
    let out_dir = std::env::temp_dir().join(format!("vireo-e2e-mig-guest-{}", std::process::id()));
    let guest = common::script_output("vmm/guest/build.sh", Some(&out_dir));
    let mut cluster = Cluster::start("kvm-migration");
    let _nets = two_linked_nodes(&mut cluster, "kmig", "v");
    let client = cluster.client().await;
    ready_hosts(&client, 2).await;
    // Placement: the two tie; the name decides (node-1).
    let manifest = format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: counter, namespace: default}}\nspec:\n  type: kvm\n  memory: 64Mi\n  vcpus: 1\n  runStrategy: Always\n  os:\n    kernel: {}\n    cmdline: console=ttyS0 vireo.counter=1\n",
        guest.display()
    );
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let before = running_on(&domains, "counter", "node-1").await;
    let uuid = before
        .spec
        .uuid
        .clone()
        .or_else(|| before.uid())
        .expect("uuid");
    let run_dir = |node: &str| cluster.dir.join(format!("state-{node}/kvm/run/{uuid}"));
    let logs = [
        run_dir("node-1").join("console.log"),
        run_dir("node-2").join("console.log"),
    ];
    counter_above(&logs[0], KVM_TICK, 2, "the guest counting on node-1").await;
    let pid_1: u32 = std::fs::read_to_string(run_dir("node-1").join("pid"))
        .expect("node-1's pid file")
        .trim()
        .parse()
        .expect("pid");

    let stop = Arc::new(AtomicBool::new(false));
    let observer = observe_consoles(logs.clone(), KVM_TICK, stop.clone());
    let (stdout, _) = migrate_with_cli(&cluster, "counter", "node-2");
    eprintln!("{stdout}");
    running_on(&domains, "counter", "node-2").await;
    let first = counter_above(&logs[1], KVM_TICK, 0, "the guest counting on node-2").await;
    counter_above(
        &logs[1],
        KVM_TICK,
        first + 2,
        "the guest counting on on node-2",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (looks, both) = observer.join().expect("observer");
    assert!(both.is_empty(), "{both:?}");
    assert!(looks > 10, "the observer looked {looks} times");
    let on_2 = counters(&logs[1], KVM_TICK);
    assert!(
        on_2[0] > 2,
        "node-2's counter starts at {}: a fresh boot",
        on_2[0]
    );
    let text_2 = std::fs::read_to_string(&logs[1]).unwrap_or_default();
    assert!(
        !text_2.contains("VIREO-TEST-GUEST-READY"),
        "the guest booted again on node-2:\n{text_2}"
    );
    wait_for(T, "node-1's VMM gone", || async {
        (!Path::new(&format!("/proc/{pid_1}")).exists()).then_some(())
    })
    .await;
    let migrations: Api<DomainMigration> = Api::namespaced(client.clone(), "default");
    let m = migrations
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .next()
        .expect("the CLI's DomainMigration");
    assert_eq!(phase(&m), Some(MigrationPhase::Succeeded));
    let stats = m.status.and_then(|s| s.stats).expect("stats");
    assert!(stats.memory_bytes > 0 && stats.downtime_ms > 0, "{stats:?}");
    drop(cluster);
}
