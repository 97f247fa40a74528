//! Vireo on a real kube-apiserver and etcd: the operator and three agents
//! (three simulated nodes) as processes. Each test starts its own cluster.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Cluster, ready_hosts, repo, wait_for, wait_gone};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use vireo_crds::{Domain, DomainState, Host, StorageVol};

const T: Duration = Duration::from_secs(60);

fn state(d: &Domain) -> Option<DomainState> {
    d.status.as_ref().and_then(|s| s.state)
}

fn id(d: &Domain) -> Option<u32> {
    d.status.as_ref().and_then(|s| s.id)
}

/// The reasons of the Events about the object `name`, space-separated.
fn event_reasons(cluster: &Cluster, name: &str) -> String {
    cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "jsonpath={.items[*].reason}",
    ])
}

/// Whether a Domain has the condition `type_` with `status`.
fn has_condition(d: &Domain, type_: &str, status: &str) -> bool {
    d.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == status)
    })
}

fn reason(d: &Domain) -> Option<String> {
    d.status
        .as_ref()
        .and_then(|s| s.info.as_ref())
        .map(|i| i.reason.virsh_name().to_string())
}

async fn running(api: &Api<Domain>, name: &str) -> Domain {
    wait_for(T, &format!("domain {name} running"), || async {
        api.get_opt(name)
            .await
            .ok()
            .flatten()
            .filter(|d| state(d) == Some(DomainState::Running) && id(d).is_some())
    })
    .await
}

/// The test-driver examples, as `-f` arguments (examples/ also holds a
/// kustomization and a QEMU guest; e2e/tests/examples.rs applies it whole
/// with `-k`).
fn examples() -> Vec<String> {
    [
        "test-network.yaml",
        "test-pool.yaml",
        "test-volume.yaml",
        "test-domain.yaml",
        "test-vm-with-disk.yaml",
    ]
    .iter()
    .flat_map(|f| {
        [
            "-f".to_string(),
            repo().join("examples").join(f).display().to_string(),
        ]
    })
    .collect()
}

fn with_examples<'a>(args: &[&'a str], files: &'a [String]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(files.iter().map(String::as_str));
    v
}

/// `kubectl apply -f examples/`: every Domain runs with an ID on some node,
/// `kubectl get` reads like virsh list, three Hosts, and applying the same
/// manifests again with server-side apply changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn examples_run_and_reapply_changes_nothing() {
    let cluster = Cluster::start("examples").with_vireo();
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;

    let files = examples();
    cluster.kubectl_ok(&with_examples(&["apply", "--server-side"], &files));
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let mut nodes = BTreeSet::new();
    for name in ["demo", "web"] {
        let d = running(&domains, name).await;
        let node = d
            .status
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("bound to a node");
        assert_eq!(d.labels().get(vireo_crds::labels::NODE), Some(&node));
        assert!(d.spec.uuid.is_some(), "a UUID was defaulted");
        nodes.insert(node);
    }
    let web = domains.get("web").await.expect("web");
    let conds: BTreeMap<_, _> = web
        .status
        .as_ref()
        .expect("status")
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    for c in ["Scheduled", "VolumesReady", "NetworksReady", "Ready"] {
        assert_eq!(
            conds.get(c).map(String::as_str),
            Some("True"),
            "{c} on web: {conds:?}"
        );
    }
    // Everyone who wrote status speaks of the current generation (the
    // operator's UUID made it at least 2).
    let generation = web.metadata.generation.expect("a generation");
    assert!(
        generation >= 2,
        "the operator's UUID bumped it: {generation}"
    );
    let st = web.status.as_ref().expect("status");
    assert_eq!(st.observed_generation, Some(generation), "{st:?}");
    for c in &st.conditions {
        assert_eq!(c.observed_generation, Some(generation), "{c:?}");
    }
    // demo needs no gate (no volume, no network): its agent wrote the
    // operator's conditions in the status apply that said it runs, and the
    // operator wrote no status of its own (one status write, issue 19).
    let demo = domains.get("demo").await.expect("demo");
    for c in [
        "Scheduled",
        "VolumesReady",
        "NetworksReady",
        "HostReachable",
        "Ready",
    ] {
        assert!(
            has_condition(&demo, c, "True"),
            "{c} on demo: {:?}",
            demo.status
        );
    }
    let status_writers: BTreeSet<String> = demo
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        status_writers
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        [format!("vireo-agent/{}", demo.labels()[vireo_crds::labels::NODE]).as_str()],
        "demo's status has one writer"
    );
    let vols: Api<StorageVol> = Api::namespaced(client.clone(), "default");
    let scratch = vols.get("scratch").await.expect("scratch");
    assert_eq!(
        scratch.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Ready")
    );
    assert_eq!(
        scratch.labels().get(vireo_crds::labels::NODE),
        web.labels().get(vireo_crds::labels::NODE),
        "the volume landed on the node of its first Domain"
    );

    let table = cluster.kubectl_ok(&["get", "domains"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .expect("header")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "ID", "STATE", "NODE", "VCPUS", "MEMORY", "AGE"],
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("demo") && l.contains("running")),
        "{table}"
    );
    let hosts_table = cluster.kubectl_ok(&["get", "hosts"]);
    assert_eq!(
        hosts_table
            .lines()
            .filter(|l| l.starts_with("node-"))
            .count(),
        3,
        "{hosts_table}"
    );
    assert!(
        hosts_table
            .lines()
            .skip(1)
            .all(|l| l.split_whitespace().nth(1) == Some("True")),
        "{hosts_table}"
    );
    let nets: Api<vireo_crds::Network> = Api::all(client.clone());
    wait_for(T, "lab active on 3 nodes", || async {
        nets.get("lab")
            .await
            .ok()
            .filter(|n| n.status.as_ref().and_then(|s| s.active_nodes) == Some(3))
    })
    .await;
    let table = cluster.kubectl_ok(&["get", "networks"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("lab") && l.split_whitespace().any(|w| w == "3")),
        "lab is active on 3 nodes:\n{table}"
    );

    // GitOps: the same manifests again change nothing (no resourceVersion moves).
    let versions = |out: String| -> BTreeMap<String, String> {
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                (
                    format!("{}/{}", i["kind"], i["metadata"]["name"]),
                    i["metadata"]["resourceVersion"].to_string(),
                )
            })
            .collect()
    };
    let all = "domains,storagevols,networks,storagepools";
    // Let status settle first: agents and operator finish their writes. The
    // windows are longer than two agent resyncs (5 s), so a status write
    // repeated every resync would show.
    let window = Duration::from_secs(11);
    let mut before = versions(cluster.kubectl_ok(&["get", all, "-A", "-o", "json"]));
    for _ in 0..10 {
        tokio::time::sleep(window).await;
        let now = versions(cluster.kubectl_ok(&["get", all, "-A", "-o", "json"]));
        if now == before {
            break;
        }
        before = now;
    }
    let out = cluster.kubectl_ok(&with_examples(&["apply", "--server-side"], &files));
    assert!(
        out.lines().all(|l| l.ends_with("serverside-applied")),
        "{out}"
    );
    tokio::time::sleep(window).await;
    let after = versions(cluster.kubectl_ok(&["get", all, "-A", "-o", "json"]));
    assert_eq!(
        before, after,
        "re-applying the same manifests changed objects"
    );
    let diff = cluster.kubectl(&with_examples(&["diff", "--server-side"], &files));
    assert_eq!(
        diff.status.code(),
        Some(0),
        "kubectl diff sees drift: {}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

/// runStrategy Halted stops the guest (shut off, shutdown); Always starts it
/// again with a new ID; deleting it destroys it on its node, then it goes.
#[tokio::test(flavor = "multi_thread")]
async fn run_strategy_and_delete() {
    let cluster = Cluster::start("runstrategy").with_vireo();
    let client = cluster.client().await;
    cluster.kubectl_ok(&[
        "apply",
        "-f",
        &repo()
            .join("examples/test-domain.yaml")
            .display()
            .to_string(),
    ]);
    let domains: Api<Domain> = Api::namespaced(client, "default");
    let first = running(&domains, "demo").await;
    let first_id = id(&first);
    let node = first
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("node");

    domains
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
        )
        .await
        .expect("halt");
    let halted = wait_for(T, "demo shut off", || async {
        domains
            .get("demo")
            .await
            .ok()
            .filter(|d| state(d) == Some(DomainState::Shutoff))
    })
    .await;
    assert_eq!(reason(&halted).as_deref(), Some("shutdown"));
    assert_eq!(id(&halted), None, "an inactive domain has no ID");

    domains
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runStrategy": "Always"}})),
        )
        .await
        .expect("always");
    let again = running(&domains, "demo").await;
    assert_ne!(id(&again), first_id, "a new activation gets a new ID");
    assert_eq!(again.status.as_ref().and_then(|s| s.start_count), Some(2));

    let state_file = cluster.dir.join(format!(
        "state-{node}/test-node/domains/default%2Fdemo.json"
    ));
    assert!(
        state_file.exists(),
        "the node holds the domain: {}",
        state_file.display()
    );
    domains
        .delete("demo", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&domains, "demo", T, "demo gone").await;
    assert!(
        !state_file.exists(),
        "the domain was destroyed and undefined on {node} before it went"
    );
}

/// `spec.cloudInit.userDataFrom` names a Secret: the agent waits for it
/// (Ready=False, CloudInitSourceMissing), then defines the Domain on its node
/// with the document inline (the node's driver writes the seed from it);
/// the Secret's content shows in no status, event or log.
#[tokio::test(flavor = "multi_thread")]
async fn cloud_init_user_data_from_a_secret() {
    let cluster = Cluster::start("cloudinit").with_vireo();
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: seeded}\nspec:\n  type: test\n  memory: 64Mi\n  vcpus: 1\n  cloudInit:\n    hostname: seeded-host\n    userDataFrom: {secretKeyRef: {name: seed, key: userdata}}\n",
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let waiting = wait_for(T, "Ready=False for the missing Secret", || async {
        domains.get_opt("seeded").await.ok().flatten().filter(|d| {
            d.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.reason == "CloudInitSourceMissing")
            })
        })
    })
    .await;
    let message = waiting
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("spec.cloudInit.userDataFrom") && message.contains("default/seed"),
        "{message}"
    );
    assert_eq!(state(&waiting), None, "nothing was defined or started");

    const TOKEN: &str = "VIREO-SECRET-TOKEN-5e11";
    cluster.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "seed",
        &format!("--from-literal=userdata=#cloud-config\n# {TOKEN}\n"),
    ]);
    let d = running(&domains, "seeded").await;
    let node = d
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("node");
    let state_file = cluster.dir.join(format!(
        "state-{node}/test-node/domains/default%2Fseeded.json"
    ));
    let on_node = std::fs::read_to_string(&state_file).expect("the node's definition");
    assert!(
        on_node.contains(TOKEN) && on_node.contains("seeded-host"),
        "the node's definition holds the document inline:\n{on_node}"
    );
    let record: serde_json::Value = serde_json::from_str(&on_node).expect("JSON");
    let ci = &record["def"]["spec"]["cloudInit"];
    assert!(
        ci["userDataFrom"].is_null() && ci["userData"].as_str().is_some_and(|t| t.contains(TOKEN)),
        "resolved, not referenced: {ci}"
    );
    let status = cluster.kubectl_ok(&["get", "domain", "seeded", "-o", "yaml"]);
    let events = cluster.kubectl_ok(&["get", "events", "-o", "yaml"]);
    for (what, text) in [
        ("status", &status),
        ("events", &events),
        ("logs", &cluster.logs()),
    ] {
        assert!(!text.contains(TOKEN), "the Secret leaked into {what}");
    }
}

/// Invalid manifests are refused by the API server, each naming its field.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_manifests_are_rejected_naming_the_field() {
    let cluster = Cluster::start("invalid");
    let dom = |spec: &str| {
        format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: bad}}\nspec: {spec}\n"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (dom("{type: test, memory: 1Gi, currentMemory: 2Gi, vcpus: 1}"), "spec.currentMemory"),
        (dom("{type: test, memory: 0, vcpus: 1}"), "spec.memory"),
        (dom("{type: test, memory: lots, vcpus: 1}"), "spec.memory"),
        (dom("{type: test, memory: 1Gi, vcpus: 0}"), "spec.vcpus"),
        (dom("{type: test, memory: 1Gi, vcpus: 4, maxVcpus: 2}"), "spec.maxVcpus"),
        (dom("{type: xen, memory: 1Gi, vcpus: 1}"), "spec.type"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, uuid: not-a-uuid}"), "spec.uuid"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, devices: {disks: [{name: sda, volume: v}]}}"), "spec.devices.disks[0].name"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, devices: {interfaces: [{name: 'eth/0', network: n}]}}"), "spec.devices.interfaces[0].name"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, devices: {interfaces: [{name: net0, network: n, mac: '01:00:5e:00:00:01'}]}}"), "spec.devices.interfaces[0].mac"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, devices: {disks: [{name: vda, volume: a}, {name: vda, volume: b}]}}"), "spec.devices.disks[1]"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, runStrategy: Sometimes}"), "spec.runStrategy"),
        (dom("{type: kvm, memory: 1Gi, vcpus: 1, os: {kernel: /boot/vmlinuz, kernelVolume: k}}"), "spec.os.kernelVolume"),
        (dom("{type: kvm, memory: 1Gi, vcpus: 1, os: {initrdVolume: 'Not/A/Name'}}"), "spec.os.initrdVolume"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, cloudInit: {userData: x, userDataFrom: {secretKeyRef: {name: s, key: k}}}}"), "spec.cloudInit.userDataFrom"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, cloudInit: {networkConfigFrom: {}}}"), "spec.cloudInit.networkConfigFrom"),
        (dom("{type: test, memory: 1Gi, vcpus: 1, cloudInit: {hostname: 'no spaces'}}"), "spec.cloudInit.hostname"),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: Network\nmetadata: {name: bad}\nspec: {ip: {address: 10.0.0.1, prefix: 24, dhcp: {ranges: [{start: 10.0.0.2, end: 10.0.1.9}]}}}\n".into(),
            "spec.ip.dhcp.ranges",
        ),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: Network\nmetadata: {name: bad}\nspec: {bridge: this-name-is-too-long-for-linux}\n".into(),
            "spec.bridge",
        ),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: Network\nmetadata: {name: bad}\nspec: {ip: {address: 10.0.0.1, prefix: 31}}\n".into(),
            "spec.ip.prefix",
        ),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: Network\nmetadata: {name: bad}\nspec: {forwardMode: bridge}\n".into(),
            "spec.bridge",
        ),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {name: bad}\nspec: {path: relative/dir}\n".into(),
            "spec.path",
        ),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: bad}\nspec: {pool: p, capacity: 0}\n".into(),
            "spec.capacity",
        ),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: bad}\nspec: {pool: p, capacity: 1Gi, allocation: 2Gi}\n".into(),
            "spec.allocation",
        ),
        (
            "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: bad}\nspec: {pool: p, capacity: 1Gi, source: {blank: {}, url: {url: 'http://x/y'}}}\n".into(),
            "spec.source",
        ),
    ];
    let mut failures = Vec::new();
    for (manifest, field) in &cases {
        let out = cluster.kubectl_stdin(&["apply", "-f", "-"], manifest);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains(field) {
            failures.push(format!(
                "expected a rejection naming {field}, got (ok={}): {err}\n{manifest}",
                out.status.success()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // The UUID cannot change once set.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &dom("{type: test, memory: 1Gi, vcpus: 1, uuid: 6695eb01-f6a4-8304-79aa-97f2502e193f}"),
    );
    let out = cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &dom("{type: test, memory: 1Gi, vcpus: 1, uuid: 6695eb01-f6a4-8304-79aa-97f2502e1940}"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec.uuid"), "{err}");
}

/// A Domain whose memory fits no node stays Pending, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn domain_that_fits_nowhere_stays_pending() {
    let cluster = Cluster::start("pending").with_vireo();
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    cluster.kubectl_stdin(&["apply", "-f", "-"], "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: huge}\nspec: {type: test, memory: 4Ti, vcpus: 1}\n");
    let domains: Api<Domain> = Api::namespaced(client, "default");
    let d = wait_for(T, "a Scheduled=False condition", || async {
        domains
            .get("huge")
            .await
            .ok()
            .filter(|d| has_condition(d, "Scheduled", "False"))
    })
    .await;
    let cond = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Scheduled"))
        .expect("Scheduled");
    assert_eq!(cond.reason, "Unschedulable");
    assert_eq!(cond.message, "0/3 hosts fit: 3 with too little memory left");
    assert_eq!(state(&d), Some(DomainState::Pending));
    assert!(d.labels().get(vireo_crds::labels::NODE).is_none());
    let events = event_reasons(&cluster, "huge");
    assert!(events.contains("FailedScheduling"), "{events}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        state(&domains.get("huge").await.expect("huge")),
        Some(DomainState::Pending),
        "still pending"
    );
}

/// A volume in use by a Domain is deleted only once the Domain releases it.
#[tokio::test(flavor = "multi_thread")]
async fn volume_in_use_waits_for_release() {
    let cluster = Cluster::start("inuse").with_vireo();
    let client = cluster.client().await;
    let files = examples();
    cluster.kubectl_ok(&with_examples(&["apply"], &files));
    // A kernel from a volume is a volume the Domain uses like a disk: it
    // lands on the Domain's node, Ready before the Domain starts, and is
    // protected while the Domain exists.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: kern}\nspec: {pool: images, capacity: 64Mi}\n---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: booter}\nspec: {type: test, memory: 256Mi, vcpus: 1, os: {kernelVolume: kern}}\n",
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    running(&domains, "web").await;
    let booter = running(&domains, "booter").await;
    let vols: Api<StorageVol> = Api::namespaced(client, "default");
    let kern = vols.get("kern").await.expect("kern");
    let kern_status = kern.status.clone().unwrap_or_default();
    assert_eq!(kern_status.phase.as_deref(), Some("Ready"));
    assert_eq!(
        kern_status.node_name,
        booter.status.as_ref().and_then(|s| s.node_name.clone()),
        "the kernel volume is on its Domain's node"
    );
    for name in ["scratch", "kern"] {
        vols.delete(name, &DeleteParams::default())
            .await
            .expect("delete request");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        vols.get("kern")
            .await
            .expect("kern stays while booter uses it")
            .metadata
            .deletion_timestamp
            .is_some()
    );
    domains
        .delete("booter", &DeleteParams::default())
        .await
        .expect("delete booter");
    wait_gone(&vols, "kern", T, "kern gone after booter released it").await;
    let v = vols
        .get("scratch")
        .await
        .expect("still there while web uses it");
    assert!(v.metadata.deletion_timestamp.is_some());
    let events = event_reasons(&cluster, "scratch");
    assert!(events.contains("InUse"), "{events}");
    domains
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete web");
    wait_gone(&vols, "scratch", T, "scratch gone after web released it").await;
}

/// SIGKILL an agent: its Host goes NotReady and its Domains Unknown, nothing
/// moves elsewhere; restart it: same IDs, nothing restarted.
#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_host_not_ready_then_readopted() {
    let mut cluster = Cluster::start("agentkill").with_vireo();
    let client = cluster.client().await;
    let mut manifests = String::new();
    for i in 0..6 {
        manifests.push_str(&format!("---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: vm{i}}}\nspec: {{type: test, memory: 1Gi, vcpus: 1}}\n"));
    }
    cluster.kubectl_stdin(&["apply", "-f", "-"], &manifests);
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let mut before = BTreeMap::new();
    for i in 0..6 {
        let d = running(&domains, &format!("vm{i}")).await;
        before.insert(
            d.name_any(),
            (
                d.status
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .expect("node"),
                id(&d),
                d.status.as_ref().and_then(|s| s.start_count),
            ),
        );
    }
    let victim = before.values().next().expect("a node").0.clone();
    let on_victim: Vec<String> = before
        .iter()
        .filter(|(_, v)| v.0 == victim)
        .map(|(k, _)| k.clone())
        .collect();
    cluster.proc(&victim).kill();

    let hosts: Api<Host> = Api::all(client.clone());
    wait_for(T, "victim host NotReady", || async {
        hosts.get(&victim).await.ok().filter(|h| {
            h.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False")
            })
        })
    })
    .await;
    for name in &on_victim {
        wait_for(T, &format!("{name} unknown"), || async {
            domains
                .get(name)
                .await
                .ok()
                .filter(|d| state(d) == Some(DomainState::Unknown))
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in &on_victim {
        let d = domains.get(name).await.expect("domain");
        assert_eq!(
            d.status.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(victim.as_str()),
            "{name} was not moved"
        );
    }

    cluster.proc(&victim).start();
    for (name, (node, old_id, starts)) in &before {
        let d = running(&domains, name).await;
        assert_eq!(
            d.status.as_ref().and_then(|s| s.node_name.as_ref()),
            Some(node)
        );
        assert_eq!(id(&d), *old_id, "{name} kept its ID");
        assert_eq!(
            d.status.as_ref().and_then(|s| s.start_count),
            *starts,
            "{name} was not restarted"
        );
    }
    // The restarted agent logged no start: it adopted what ran.
    let log = cluster.proc(&victim).log_text();
    let after_restart: Vec<&str> = log
        .rsplit("vireo-agent starting")
        .next()
        .unwrap_or("")
        .lines()
        .collect();
    assert!(
        !after_restart
            .iter()
            .any(|l| l.contains("agent::domain: started")),
        "the restarted agent started a domain:\n{}",
        after_restart.join("\n")
    );
    assert!(
        log.matches("vireo-agent starting").count() >= 2,
        "the agent did restart"
    );
}

/// Kill the operator while 50 Domains are being created: after a restart
/// all converge, and none runs twice.
#[tokio::test(flavor = "multi_thread")]
async fn killed_operator_during_creation_converges_without_duplicates() {
    // One reconcile at a time, so the kill lands while binding is under way.
    let mut cluster = Cluster::start("opkill").with_vireo_operator_args(&["--concurrency", "1"]);
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    let mut manifests = String::new();
    for i in 0..50 {
        manifests.push_str(&format!("---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: d{i:02}}}\nspec: {{type: test, memory: 256Mi, vcpus: 1}}\n"));
    }
    // All 50 are there before the operator looks (a binding takes one
    // round trip: it would keep up with kubectl's creates), then it starts
    // and is killed at the first binding seen, with the rest unbound.
    cluster.proc("operator").kill();
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &manifests);
    assert!(out.status.success());
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    cluster.proc("operator").start();
    let deadline = std::time::Instant::now() + T;
    let bound_at_kill = loop {
        let bound = domains
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|d| d.labels().contains_key(vireo_crds::labels::NODE))
                    .count()
            })
            .unwrap_or(0);
        if bound > 0 {
            break bound;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Domain bound within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    cluster.proc("operator").kill();
    assert!(
        bound_at_kill < 50,
        "the operator bound all 50 before the kill; nothing left to converge"
    );
    eprintln!("[e2e] operator killed with {bound_at_kill}/50 domains bound");
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.proc("operator").start();

    let all = wait_for(Duration::from_secs(120), "50 domains running", || async {
        let l = domains.list(&Default::default()).await.ok()?;
        (l.items.len() == 50
            && l.items
                .iter()
                .all(|d| state(d) == Some(DomainState::Running)))
        .then_some(l.items)
    })
    .await;
    let mut ids = BTreeSet::new();
    for d in &all {
        let s = d.status.as_ref().expect("status");
        assert_eq!(s.start_count, Some(1), "{} started once", d.name_any());
        ids.insert((s.node_name.clone(), s.id));
    }
    assert_eq!(ids.len(), 50, "every domain has its own (node, ID)");
    // No domain is defined on two nodes.
    let mut seen = BTreeMap::new();
    for n in 1..=3 {
        let dir = cluster
            .dir
            .join(format!("state-node-{n}/test-node/domains"));
        for f in std::fs::read_dir(&dir).expect("state dir").flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(prev) = seen.insert(name.clone(), n) {
                panic!("{name} is defined on node-{prev} and node-{n}");
            }
        }
    }
    assert_eq!(seen.len(), 50);
}

/// A deleted Network or StoragePool is torn down on every node before it
/// goes; a StorageVol with `spec.nodeName` is bound to that node at once.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_objects_torn_down_on_every_node_and_volume_node_name() {
    let cluster = Cluster::start("teardown").with_vireo();
    let client = cluster.client().await;
    cluster.kubectl_ok(&[
        "apply",
        "-f",
        &repo()
            .join("examples/test-network.yaml")
            .display()
            .to_string(),
    ]);
    cluster.kubectl_ok(&[
        "apply",
        "-f",
        &repo().join("examples/test-pool.yaml").display().to_string(),
    ]);
    let nets: Api<vireo_crds::Network> = Api::all(client.clone());
    let pools: Api<vireo_crds::StoragePool> = Api::all(client.clone());
    wait_for(T, "lab and images active on 3 nodes", || async {
        let n = nets.get("lab").await.ok()?;
        let p = pools.get("images").await.ok()?;
        (n.status.as_ref()?.nodes.iter().filter(|e| e.active).count() == 3
            && p.status
                .as_ref()?
                .nodes
                .iter()
                .filter(|e| e.state == "running")
                .count()
                == 3)
            .then_some(())
    })
    .await;
    let net = nets.get("lab").await.expect("lab");
    let finalizers: BTreeSet<String> = net.finalizers().iter().cloned().collect();
    let expected: BTreeSet<String> = (1..=3)
        .map(|n| vireo_crds::labels::node_finalizer(&format!("node-{n}")))
        .chain([vireo_crds::labels::IN_USE_FINALIZER.to_string()])
        .collect();
    assert_eq!(
        finalizers, expected,
        "each node holds its own finalizer, the operator the in-use one"
    );
    let net_files: Vec<_> = (1..=3)
        .map(|n| {
            cluster
                .dir
                .join(format!("state-node-{n}/test-node/networks/lab.json"))
        })
        .collect();
    assert!(
        net_files.iter().all(|f| f.exists()),
        "lab is defined on every node"
    );

    // A volume that names its node is bound there at once, before any Domain uses it.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: pinned}\nspec: {pool: images, capacity: 1Gi, nodeName: node-2}\n",
    );
    let vols: Api<StorageVol> = Api::namespaced(client.clone(), "default");
    let v = wait_for(T, "pinned Ready on node-2", || async {
        vols.get("pinned")
            .await
            .ok()
            .filter(|v| v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Ready"))
    })
    .await;
    assert_eq!(
        v.labels().get(vireo_crds::labels::NODE).map(String::as_str),
        Some("node-2")
    );
    assert_eq!(
        v.status.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("node-2")
    );

    // Grown as a PVC is expanded: spec.capacity up, the node's agent
    // resizes the file and says so; a shrink is refused naming the field;
    // `vireo vol-resize` on the cluster raises spec.capacity and waits.
    let file = cluster
        .dir
        .join("host-node-2/var/lib/vireo/images/default.pinned");
    let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert_eq!(size(), 1 << 30);
    vols.patch(
        "pinned",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"capacity": "2Gi"}})),
    )
    .await
    .expect("grow pinned");
    wait_for(T, "pinned grown to 2Gi", || async {
        let v = vols.get("pinned").await.ok()?;
        (v.status?.capacity?.0 == "2Gi").then_some(())
    })
    .await;
    assert_eq!(size(), 2 << 30, "the file on node-2 grew");
    assert!(event_reasons(&cluster, "pinned").contains("Resized"));
    let shrink = cluster.kubectl(&[
        "patch",
        "storagevol",
        "pinned",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"capacity":"1Gi"}}"#,
    ]);
    let said = String::from_utf8_lossy(&shrink.stderr);
    assert!(
        !shrink.status.success() && said.contains("spec.capacity cannot shrink"),
        "{said}"
    );
    common::vireo_ok(
        &cluster.kubeconfig,
        &["vol-resize", "--pool", "images", "pinned", "--delta", "1G"],
    );
    assert_eq!(size(), 3 << 30, "vol-resize returned once the file grew");
    // qcow2 grows in whole sectors: a size that is not one is rounded up,
    // not refused by qemu-img again and again.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: odd}\nspec: {pool: images, capacity: 64Mi, format: qcow2, nodeName: node-2}\n",
    );
    wait_for(T, "odd Ready", || async {
        let v = vols.get("odd").await.ok()?;
        (v.status?.phase.as_deref() == Some("Ready")).then_some(())
    })
    .await;
    vols.patch(
        "odd",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"capacity": "100000000"}})),
    )
    .await
    .expect("grow odd");
    let grown = wait_for(T, "odd grown", || async {
        let v = vols.get("odd").await.ok()?;
        let c = vireo_crds::quantity::parse_quantity(&v.status?.capacity?).ok()?;
        (c >= 100_000_000).then_some(c)
    })
    .await;
    assert_eq!(grown, 100_000_000u64.div_ceil(512) * 512);
    let reasons = event_reasons(&cluster, "odd");
    assert!(
        reasons.contains("Resized") && !reasons.contains("ResizeFailed"),
        "{reasons}"
    );
    vols.delete("odd", &DeleteParams::default())
        .await
        .expect("delete odd");

    nets.delete("lab", &DeleteParams::default())
        .await
        .expect("delete lab");
    wait_gone(&nets, "lab", T, "lab gone").await;
    assert!(
        net_files.iter().all(|f| !f.exists()),
        "lab was destroyed and undefined on every node"
    );

    vols.delete("pinned", &DeleteParams::default())
        .await
        .expect("delete pinned");
    wait_gone(&vols, "pinned", T, "pinned gone").await;
    pools
        .delete("images", &DeleteParams::default())
        .await
        .expect("delete images");
    wait_gone(&pools, "images", T, "images gone").await;
    for n in 1..=3 {
        let f = cluster
            .dir
            .join(format!("state-node-{n}/test-node/pools/images.json"));
        assert!(!f.exists(), "images was undefined on node-{n}");
    }
}

/// Networks and StoragePools are realized only on the nodes their
/// nodeSelector matches (per-node state in their status), the operator
/// places a Domain only where its networks are active and its pools run,
/// and a Domain that needs both where no node has both stays Pending until
/// a changed selector moves the network: torn down where it no longer
/// matches, started where it now does.
#[tokio::test(flavor = "multi_thread")]
async fn node_selectors_of_networks_and_pools_decide_placement() {
    let mut cluster = Cluster::start("selectors");
    let op = cluster.operator("operator", &["--no-leader-election"]);
    cluster.hold(op);
    for (node, zone) in [("node-1", "a"), ("node-2", "b"), ("node-3", "b")] {
        let zone = format!("zone={zone}");
        let agent = cluster.agent(node, &["--label", &zone]);
        cluster.hold(agent);
    }
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Network\nmetadata: {name: edge}\nspec:\n  forwardMode: isolated\n  ip: {address: 10.88.0.1, prefix: 24}\n  nodeSelector: {zone: a}\n---\napiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {name: fast}\nspec:\n  type: dir\n  path: /var/lib/vireo/fast\n  nodeSelector: {zone: b}\n",
    );
    let nets: Api<vireo_crds::Network> = Api::all(client.clone());
    let pools: Api<vireo_crds::StoragePool> = Api::all(client.clone());
    let active_on = |n: &vireo_crds::Network| -> BTreeSet<String> {
        n.status
            .as_ref()
            .map(|s| {
                s.nodes
                    .iter()
                    .filter(|e| e.active)
                    .map(|e| e.node_name.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    let nodes =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
    wait_for(T, "edge active on node-1 only", || async {
        let n = nets.get("edge").await.ok()?;
        (active_on(&n) == nodes(&["node-1"])).then_some(())
    })
    .await;
    wait_for(T, "fast running on node-2 and node-3 only", || async {
        let p = pools.get("fast").await.ok()?;
        let running: BTreeSet<String> = p
            .status
            .as_ref()?
            .nodes
            .iter()
            .filter(|e| e.state == "running")
            .map(|e| e.node_name.clone())
            .collect();
        (running == nodes(&["node-2", "node-3"])).then_some(())
    })
    .await;
    let defined = |node: &str, what: &str| {
        cluster
            .dir
            .join(format!("state-{node}/test-node/{what}.json"))
            .exists()
    };
    assert!(defined("node-1", "networks/edge"));
    assert!(!defined("node-2", "networks/edge") && !defined("node-3", "networks/edge"));
    assert!(!defined("node-1", "pools/fast"));
    assert!(
        !cluster.dir.join("host-node-1/var/lib/vireo/fast").exists(),
        "no pool directory on the node it does not select"
    );

    // One Domain on edge, one with a volume in fast, one needing both.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: fastvol}\nspec: {pool: fast, capacity: 64Mi}\n---\napiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: bothvol}\nspec: {pool: fast, capacity: 64Mi}\n---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: on-edge}\nspec:\n  type: test\n  memory: 256Mi\n  vcpus: 1\n  devices:\n    interfaces: [{name: net0, network: edge}]\n---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: on-fast}\nspec:\n  type: test\n  memory: 256Mi\n  vcpus: 1\n  devices:\n    disks: [{name: vda, volume: fastvol}]\n---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: both}\nspec:\n  type: test\n  memory: 256Mi\n  vcpus: 1\n  devices:\n    interfaces: [{name: net0, network: edge}]\n    disks: [{name: vda, volume: bothvol}]\n",
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let node_of = |d: &Domain| d.status.as_ref().and_then(|s| s.node_name.clone());
    let on_edge = running(&domains, "on-edge").await;
    assert_eq!(node_of(&on_edge).as_deref(), Some("node-1"));
    let on_fast = running(&domains, "on-fast").await;
    let fast_node = node_of(&on_fast).expect("on-fast bound");
    assert!(
        fast_node == "node-2" || fast_node == "node-3",
        "{fast_node}"
    );
    let vols: Api<StorageVol> = Api::namespaced(client.clone(), "default");
    let fastvol = vols.get("fastvol").await.expect("fastvol");
    assert_eq!(
        fastvol.status.as_ref().and_then(|s| s.node_name.clone()),
        Some(fast_node.clone()),
        "the volume followed its first consumer"
    );
    let scheduled = |d: &Domain| {
        d.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Scheduled"))
            .map(|c| (c.status.clone(), c.message.clone()))
    };
    // Each host is counted under the first thing it lacks.
    let want = "0/3 hosts fit: 2 without the domain's networks active, 1 without the volumes' storage pools active";
    let both = wait_for(T, "both unschedulable, saying why", || async {
        let d = domains.get("both").await.ok()?;
        let (status, message) = scheduled(&d)?;
        (status == "False" && message == want).then_some(d)
    })
    .await;
    assert_eq!(state(&both), Some(DomainState::Pending));

    // edge moves to zone b: gone from node-1 (its Domain there keeps its
    // binding; nothing is started elsewhere), up on node-2 and node-3, and
    // `both` finds a node with both.
    nets.patch(
        "edge",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"nodeSelector": {"zone": "b"}}})),
    )
    .await
    .expect("patch edge");
    wait_for(T, "edge active on node-2 and node-3 only", || async {
        let n = nets.get("edge").await.ok()?;
        (active_on(&n) == nodes(&["node-2", "node-3"])).then_some(())
    })
    .await;
    wait_for(T, "edge torn down on node-1", || async {
        (!defined("node-1", "networks/edge")).then_some(())
    })
    .await;
    let both = running(&domains, "both").await;
    let both_node = node_of(&both).expect("both bound");
    assert!(
        both_node == "node-2" || both_node == "node-3",
        "{both_node}"
    );
    assert_eq!(
        node_of(&domains.get("on-edge").await.expect("on-edge")).as_deref(),
        Some("node-1"),
        "a bound Domain is never moved"
    );

    // In use: deleting edge waits while Domains have an interface on it,
    // saying which; it stays active on its nodes meanwhile.
    nets.delete("edge", &DeleteParams::default())
        .await
        .expect("delete edge");
    let messages = || {
        cluster.kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=edge,reason=InUse",
            "-o",
            "jsonpath={.items[*].message}",
        ])
    };
    wait_for(T, "edge says who holds it", || async {
        let m = messages();
        (m.contains("default/both") && m.contains("default/on-edge")).then_some(())
    })
    .await;
    let held = nets.get("edge").await.expect("edge is still there");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(active_on(&held), nodes(&["node-2", "node-3"]), "still up");
    assert!(defined("node-2", "networks/edge") && defined("node-3", "networks/edge"));
    for name in ["on-edge", "both"] {
        domains
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete a Domain on edge");
    }
    wait_gone(&nets, "edge", T, "edge gone once its Domains are").await;
    assert!(
        !defined("node-2", "networks/edge") && !defined("node-3", "networks/edge"),
        "edge torn down on its nodes"
    );
}

/// A StorageVol made for an upload (`source.upload`) is a placeholder until
/// its content arrives through the node agent's socket (`vireo vol-upload`):
/// Pending with reason WaitingForUpload (and an Event saying how), its
/// Domain not started; Creating with the upload's progress while it runs;
/// then Ready with exactly the uploaded bytes, and the Domain runs.
#[tokio::test(flavor = "multi_thread")]
async fn uploaded_volume_waits_for_its_content() {
    let cluster = Cluster::start("upload").with_vireo();
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    cluster.kubectl_ok(&[
        "apply",
        "-f",
        &repo().join("examples/test-pool.yaml").display().to_string(),
    ]);
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: image}\nspec:\n  pool: images\n  capacity: 64Mi\n  nodeName: node-2\n  source: {upload: {}}\n---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: reader}\nspec:\n  type: test\n  memory: 256Mi\n  vcpus: 1\n  devices:\n    disks: [{name: vda, volume: image}]\n",
    );
    let vols: Api<StorageVol> = Api::namespaced(client.clone(), "default");
    let ready_reason = |v: &StorageVol| {
        v.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let waiting = wait_for(T, "image waiting for its upload", || async {
        vols.get("image").await.ok().filter(|v| {
            v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
                && ready_reason(v).is_some_and(|(r, _)| r == "WaitingForUpload")
        })
    })
    .await;
    let (_, message) = ready_reason(&waiting).expect("Ready condition");
    assert!(
        message.contains("node-2")
            && message.contains("vireo vol-upload --pool images default.image"),
        "{message}"
    );
    let file = cluster
        .dir
        .join("host-node-2/var/lib/vireo/images/default.image");
    assert!(file.is_file(), "the placeholder is in the pool");
    let events = event_reasons(&cluster, "image");
    assert!(events.contains("WaitingForUpload"), "{events}");
    // The Domain on it is bound to node-2 but does not start.
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let reader = wait_for(T, "reader held back by its volume", || async {
        domains
            .get("reader")
            .await
            .ok()
            .filter(|d| has_condition(d, "VolumesReady", "False"))
    })
    .await;
    assert_ne!(state(&reader), Some(DomainState::Running));

    // Upload 16 MiB through node-2's socket, slowly enough to be watched.
    const MIB: usize = 1 << 20;
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8).collect();
    let socket = cluster.dir.join("state-node-2/vireo.sock");
    let uri = format!("vireo+unix://{}", socket.display());
    let sent = data.clone();
    let upload = tokio::task::spawn_blocking(move || {
        struct Slow<'a>(&'a [u8]);
        impl std::io::Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                // About 2.5 MiB/s whatever the reads' sizes: ~6 s in all.
                let n = buf.len().min(self.0.len()).min(MIB);
                std::thread::sleep(Duration::from_micros((400_000 * n / MIB) as u64));
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let conn = vireo_drivers::open(&uri).expect("node-2's local API");
        conn.storage().upload_volume(
            "images",
            "default.image",
            &mut Slow(&sent),
            Some(sent.len() as u64),
            &vireo_drivers::storage::no_progress,
        )
    });
    let during = wait_for(T, "image Creating with the upload's progress", || async {
        vols.get("image").await.ok().filter(|v| {
            v.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Creating")
                    && s.progress.is_some_and(|p| (1..100).contains(&p))
            })
        })
    })
    .await;
    let (reason, message) = ready_reason(&during).expect("Ready condition");
    assert_eq!(reason, "Creating");
    assert!(message.contains("uploading"), "{message}");
    let n = upload.await.expect("upload thread").expect("upload");
    assert_eq!(n, data.len() as u64);

    wait_for(T, "image Ready", || async {
        vols.get("image").await.ok().filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase.as_deref() == Some("Ready") && s.progress == Some(100))
        })
    })
    .await;
    let stored = std::fs::read(&file).expect("the volume's file");
    assert_eq!(stored.len(), 64 * MIB, "a shorter raw image keeps the size");
    assert!(stored[..data.len()] == data[..], "the uploaded bytes");
    assert!(stored[data.len()..].iter().all(|&b| b == 0));
    running(&domains, "reader").await;
    let events = event_reasons(&cluster, "image");
    assert!(events.contains("Uploaded"), "{events}");
}
