//! DomainSnapshot and DomainRestore on a real API server, with a test-driver
//! Domain: the agent of the Domain's node takes the snapshot once (status
//! Ready, what it holds, an Event), a DomainRestore returns the Domain to
//! it (`running (from snapshot)`), one naming a missing snapshot waits,
//! the schema refuses bad specs naming the field, deleting a snapshot
//! deletes it on the node (finalizer), and a Domain with snapshots can
//! still be deleted (its snapshots go with it on the node).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Cluster, ready_hosts, repo, wait_for, wait_gone};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use vireo_crds::{Domain, DomainRestore, DomainSnapshot, DomainState, SnapshotPhase};

const T: Duration = Duration::from_secs(60);

fn snapshot(name: &str, domain: &str) -> DomainSnapshot {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "vireo.dev/v1alpha1",
        "kind": "DomainSnapshot",
        "metadata": {"name": name},
        "spec": {"domainName": domain, "description": "before the change"},
    }))
    .expect("a DomainSnapshot")
}

fn restore(name: &str, domain: &str, snap: &str) -> DomainRestore {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "vireo.dev/v1alpha1",
        "kind": "DomainRestore",
        "metadata": {"name": name},
        "spec": {"domainName": domain, "snapshotName": snap},
    }))
    .expect("a DomainRestore")
}

fn reason_of(d: &Domain) -> Option<String> {
    d.status
        .as_ref()
        .and_then(|s| s.info.as_ref())
        .map(|i| i.reason.virsh_name().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_and_restores_on_the_domains_node() {
    let cluster = Cluster::start("snapshots").with_vireo();
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    cluster.kubectl_ok(&[
        "apply",
        "-f",
        &repo()
            .join("examples/test-domain.yaml")
            .display()
            .to_string(),
    ]);
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let running = wait_for(T, "demo running", || async {
        domains.get_opt("demo").await.ok().flatten().filter(|d| {
            d.status
                .as_ref()
                .and_then(|s| s.info.as_ref())
                .is_some_and(|i| i.state == DomainState::Running)
        })
    })
    .await;
    let node = running
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("bound to a node");

    // Bad specs are refused by the API server, naming the field.
    let bad = cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: DomainSnapshot\nmetadata: {name: bad}\nspec: {domainName: Not_A_Name}\n",
    );
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && said.contains("spec.domainName"),
        "{said}"
    );

    let snaps: Api<DomainSnapshot> = Api::namespaced(client.clone(), "default");
    snaps
        .create(&PostParams::default(), &snapshot("snap1", "demo"))
        .await
        .expect("create the snapshot");
    let ready = wait_for(T, "snap1 ready", || async {
        snaps.get_opt("snap1").await.ok().flatten().filter(|s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.phase == SnapshotPhase::Ready)
        })
    })
    .await;
    let st = ready.status.clone().expect("status");
    assert!(st.ready_to_use, "{st:?}");
    assert_eq!(st.domain_state.as_deref(), Some("running"));
    assert_eq!(st.memory, Some(true));
    assert_eq!(st.node.as_deref(), Some(node.as_str()));
    assert!(st.creation_time.is_some(), "{st:?}");
    assert!(
        ready.finalizers().iter().any(|f| f == "vireo.dev/snapshot"),
        "{:?}",
        ready.finalizers()
    );
    assert!(
        ready
            .owner_references()
            .iter()
            .any(|o| o.kind == "Domain" && o.name == "demo"),
        "owned by its Domain: {:?}",
        ready.owner_references()
    );
    let table = cluster.kubectl_ok(&["get", "domainsnapshots"]);
    assert!(
        table.contains("CREATION TIME") && table.contains("running"),
        "{table}"
    );
    // A snapshot is taken once: its spec cannot change.
    let changed = cluster.kubectl(&[
        "patch",
        "domainsnapshot",
        "snap1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"description":"other"}}"#,
    ]);
    assert!(
        !changed.status.success()
            && String::from_utf8_lossy(&changed.stderr).contains("spec cannot change"),
        "{}",
        String::from_utf8_lossy(&changed.stderr)
    );
    let state_file = cluster.dir.join(format!(
        "state-{node}/test-node/domains/default%2Fdemo.json"
    ));
    let on_node = std::fs::read_to_string(&state_file).expect("the node's record");
    assert!(on_node.contains("\"snap1\""), "the node holds snap1");

    // A restore of a snapshot that does not exist waits, saying why.
    let restores: Api<DomainRestore> = Api::namespaced(client.clone(), "default");
    restores
        .create(
            &PostParams::default(),
            &restore("r-missing", "demo", "nope"),
        )
        .await
        .expect("create");
    let waiting = wait_for(T, "r-missing pending", || async {
        restores
            .get_opt("r-missing")
            .await
            .ok()
            .flatten()
            .filter(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.phase == SnapshotPhase::Pending && s.message.is_some())
            })
    })
    .await;
    assert!(
        waiting
            .status
            .and_then(|s| s.message)
            .is_some_and(|m| m.contains("nope")),
        "the message names the snapshot"
    );

    // The restore: the Domain runs from the snapshot.
    restores
        .create(&PostParams::default(), &restore("r1", "demo", "snap1"))
        .await
        .expect("create");
    let done = wait_for(T, "r1 done", || async {
        restores.get_opt("r1").await.ok().flatten().filter(|r| {
            r.status
                .as_ref()
                .is_some_and(|s| s.phase == SnapshotPhase::Ready)
        })
    })
    .await;
    assert!(
        done.status
            .as_ref()
            .and_then(|s| s.domain_state.as_deref())
            .is_some_and(|s| s.contains("running")),
        "{:?}",
        done.status
    );
    wait_for(T, "demo running (from snapshot)", || async {
        domains
            .get_opt("demo")
            .await
            .ok()
            .flatten()
            .filter(|d| reason_of(d).as_deref() == Some("from snapshot"))
    })
    .await;
    let events = cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=r1",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("Restored"), "{events}");

    // Deleting the snapshot deletes it on the node.
    snaps
        .delete("snap1", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&snaps, "snap1", T, "snap1 gone").await;
    let on_node = std::fs::read_to_string(&state_file).expect("the node's record");
    assert!(
        !on_node.contains("\"snap1\""),
        "snap1 is gone from the node"
    );

    // The same through the CLI: `vireo -c kube:/// snapshot-*` makes the
    // DomainSnapshots and DomainRestores and waits for the agent.
    cli_snapshots(&cluster, &snaps, &state_file).await;

    // A Domain with a snapshot is still deleted (the snapshot with it).
    snaps
        .create(&PostParams::default(), &snapshot("snap2", "demo"))
        .await
        .expect("create");
    wait_for(T, "snap2 ready", || async {
        snaps
            .get_opt("snap2")
            .await
            .ok()
            .flatten()
            .filter(|s| s.status.as_ref().is_some_and(|st| st.ready_to_use))
    })
    .await;
    domains
        .delete("demo", &DeleteParams::default())
        .await
        .expect("delete the Domain");
    wait_gone(&domains, "demo", T, "demo gone").await;
    assert!(!state_file.exists(), "demo is undefined on {node}");
    let left = wait_for(T, "snap2 says its Domain went", || async {
        snaps
            .get_opt("snap2")
            .await
            .ok()
            .flatten()
            .filter(|s| s.status.as_ref().is_some_and(|st| !st.ready_to_use))
    })
    .await;
    assert!(
        left.status
            .and_then(|s| s.message)
            .is_some_and(|m| m.contains("was deleted")),
        "snap2's message says why"
    );
    snaps
        .delete("snap2", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&snaps, "snap2", T, "snap2 gone").await;
}

/// virsh's snapshot commands on a cluster, on the running Domain `demo`.
async fn cli_snapshots(cluster: &Cluster, snaps: &Api<DomainSnapshot>, state_file: &Path) {
    let made = common::vireo_ok(
        &cluster.kubeconfig,
        &[
            "snapshot-create-as",
            "demo",
            "cli1",
            "--description",
            "by the CLI",
        ],
    );
    assert!(made.contains("Domain snapshot cli1 created"), "{made}");
    let cli1 = snaps.get("cli1").await.expect("a DomainSnapshot cli1");
    assert_eq!(cli1.spec.domain_name, "demo");
    assert_eq!(cli1.spec.description.as_deref(), Some("by the CLI"));
    assert!(
        cli1.status.is_some_and(|s| s.ready_to_use),
        "ready when the command returns"
    );
    let made = common::vireo_ok(
        &cluster.kubeconfig,
        &[
            "snapshot-create-as",
            "demo",
            "--name",
            "cli2",
            "--disk-only",
        ],
    );
    assert!(made.contains("Domain snapshot cli2 created"), "{made}");
    let on_node = std::fs::read_to_string(state_file).expect("the node's record");
    assert!(on_node.contains("\"cli2\""), "the node holds cli2");

    let listed = common::vireo_ok(&cluster.kubeconfig, &["snapshot-list", "demo", "--parent"]);
    let row = |name: &str| {
        listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{listed}"))
            .to_string()
    };
    assert!(row("cli1").contains("running"), "{listed}");
    assert!(
        row("cli2").contains("disk-snapshot") && row("cli2").trim_end().ends_with("cli1"),
        "cli2 is disks only, a child of cli1:\n{listed}"
    );
    assert_eq!(
        common::vireo_ok(&cluster.kubeconfig, &["snapshot-current", "demo", "--name"]).trim(),
        "cli2"
    );
    let info = common::vireo_ok(&cluster.kubeconfig, &["snapshot-info", "demo", "cli1"]);
    for words in ["cli1", "default/demo", "Children:", "Memory:"] {
        assert!(info.contains(words), "{words} in:\n{info}");
    }
    assert!(
        info.lines()
            .any(|l| l.starts_with("Children:") && l.trim_end().ends_with('1')),
        "{info}"
    );

    // Back to cli1: a DomainRestore, done when the command returns; cli1
    // is current again.
    common::vireo_ok(&cluster.kubeconfig, &["snapshot-revert", "demo", "cli1"]);
    let restored = cluster.kubectl_ok(&[
        "get",
        "domainrestores",
        "-o",
        "jsonpath={range .items[*]}{.spec.snapshotName}={.status.phase} {end}",
    ]);
    assert!(restored.contains("cli1=Ready"), "{restored}");
    assert_eq!(
        common::vireo_ok(&cluster.kubeconfig, &["snapshot-current", "demo", "--name"]).trim(),
        "cli1"
    );
    common::vireo_refused(
        &cluster.kubeconfig,
        &["snapshot-revert", "demo", "cli1", "--running"],
        "--running",
    );
    common::vireo_refused(
        &cluster.kubeconfig,
        &["snapshot-info", "demo", "nope"],
        "nope",
    );
    // A Domain on no node: refused at once rather than left waiting.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: nowhere}\nspec: {type: test, memory: 64Mi, vcpus: 1, nodeSelector: {e2e.vireo.dev/none: x}}\n",
    );
    common::vireo_refused(
        &cluster.kubeconfig,
        &["snapshot-create-as", "nowhere", "n1"],
        "on no node yet",
    );
    cluster.kubectl_ok(&["delete", "domain", "nowhere", "--wait=false"]);
    common::vireo_refused(
        &cluster.kubeconfig,
        &["snapshot-create-as", "demo", "Not_A_Name"],
        "Not_A_Name",
    );

    // Deleted: gone on the node, then its object.
    let said = common::vireo_ok(&cluster.kubeconfig, &["snapshot-delete", "demo", "cli2"]);
    assert!(said.contains("Domain snapshot cli2 deleted"), "{said}");
    assert!(
        snaps.get_opt("cli2").await.expect("get").is_none(),
        "cli2 is gone"
    );
    let on_node = std::fs::read_to_string(state_file).expect("the node's record");
    assert!(!on_node.contains("\"cli2\""), "cli2 is gone from the node");
    let listed = common::vireo_ok(&cluster.kubeconfig, &["snapshot-list", "demo", "--name"]);
    assert_eq!(listed.trim(), "cli1", "{listed}");
}
