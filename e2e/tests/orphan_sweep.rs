//! The agent's orphan sweep (controllers/src/agent/sweep.rs) on a real
//! kube-apiserver: a Domain deleted while its node's agent is down, its
//! node-cleanup finalizer taken off by hand, leaves a record on the node;
//! the agent, started again, destroys and undefines it once the API server
//! confirms the object is gone, and counts it. A record defined on the
//! node's own socket (not for a Domain object) stays.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Cluster, fleet, ready_hosts, wait_for};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vireo_crds::{Domain, DomainState};

const T: Duration = Duration::from_secs(90);

/// The names of the test driver's records on the node, with their state.
fn records(state: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(state.join("test-node/domains")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((
                v["def"]["metadata"]["name"].as_str()?.to_string(),
                v["state"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_sweeps_a_record_whose_domain_is_gone_and_leaves_its_own() {
    let cluster = Cluster::start("sweep");
    let _op = cluster.operator("operator", &["--no-leader-election"]);
    let mut agent = cluster.agent("node-1", &[]);
    let client = cluster.client().await;
    ready_hosts(&client, 1).await;
    let state = cluster.dir.join("state-node-1");
    let api: Api<Domain> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &fleet::test_domain("gone", "128Mi"))
        .await
        .expect("create Domain gone");
    wait_for(T, "gone running", || async {
        api.get("gone")
            .await
            .ok()
            .filter(|d| d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running))
    })
    .await;
    // A record of the node's own, defined on its socket: no object UID.
    let uri = format!("vireo+unix://{}", state.join("vireo.sock").display());
    tokio::task::spawn_blocking(move || {
        let conn = vireo_drivers::open(&uri).expect("the node's local API");
        conn.hypervisor()
            .define_domain(&fleet::test_domain("mine", "64Mi"))
            .expect("define mine on the node");
    })
    .await
    .expect("the define thread");
    let before = records(&state);
    assert!(
        before
            .iter()
            .any(|(n, s)| n == "default/gone" && s == "running"),
        "the node runs gone: {before:?}"
    );
    assert!(
        before.iter().any(|(n, _)| n == "mine"),
        "mine defined: {before:?}"
    );

    // Gone while the agent is down, its finalizers taken off by hand.
    agent.kill();
    api.delete("gone", &DeleteParams::default())
        .await
        .expect("delete gone");
    api.patch(
        "gone",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("finalizers off");
    wait_for(T, "gone out of the API server", || async {
        matches!(api.get_opt("gone").await, Ok(None)).then_some(())
    })
    .await;
    assert!(
        records(&state).iter().any(|(n, _)| n == "default/gone"),
        "the record outlives its object while the agent is down"
    );

    agent.start();
    let after = wait_for(T, "the orphan record swept", || async {
        let r = records(&state);
        (!r.iter().any(|(n, _)| n == "default/gone")).then_some(r)
    })
    .await;
    assert!(
        after.iter().any(|(n, _)| n == "mine"),
        "a record not defined for a Domain object is left alone: {after:?}"
    );
    assert!(
        agent.log_text().contains("orphan record"),
        "the sweep says what it removed:\n{}",
        agent.log_text()
    );
    let metrics = wait_for(T, "the agent's /metrics", || async {
        agent.http_get("/metrics").map(|(_, body)| body)
    })
    .await;
    let swept = metrics
        .lines()
        .find(|l| l.starts_with("vireo_agent_orphans_swept_total"))
        .unwrap_or_default()
        .to_string();
    assert!(swept.ends_with(" 1"), "one orphan counted: {swept:?}");
}
