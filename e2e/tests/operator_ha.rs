//! Two operator replicas: one leads on the Lease, the other waits; killing
//! the leader hands over. Metrics and health endpoints answer.

mod common;

use std::time::Duration;

use common::{Cluster, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use vireo_crds::{Domain, DomainState};

const T: Duration = Duration::from_secs(60);

fn domain(name: &str) -> String {
    format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: {name}}}\nspec: {{type: test, memory: 256Mi, vcpus: 1}}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_leader_at_a_time_and_handover() {
    let cluster = Cluster::start("ha");
    let _agents: Vec<_> = (1..=2)
        .map(|i| cluster.agent(&format!("node-{i}"), &[]))
        .collect();
    let lease_args = ["--leader-lease-seconds", "4"];
    let a = cluster.operator("operator-a", &lease_args);
    let b = cluster.operator("operator-b", &lease_args);
    let client = cluster.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "vireo-system");
    let holder = wait_for(T, "a leader", || async {
        leases
            .get_opt("vireo-operator")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    })
    .await;

    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    cluster.kubectl_stdin(&["apply", "-f", "-"], &domain("first"));
    wait_for(T, "first running", || async {
        domains
            .get("first")
            .await
            .ok()
            .filter(|d| d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running))
    })
    .await;
    // Exactly one replica acted: only the leader logs that it leads and binds.
    let leading: Vec<&str> = [(&a, "a"), (&b, "b")]
        .into_iter()
        .filter(|(p, _)| p.log_text().contains("leading"))
        .map(|(_, n)| n)
        .collect();
    assert_eq!(
        leading.len(),
        1,
        "one leader, got {leading:?} (holder {holder})"
    );

    // Metrics and health of the leader.
    let leader = if leading[0] == "a" { &a } else { &b };
    let (status, body) = leader.http_get("/metrics").expect("metrics answer");
    assert_eq!(status, 200);
    assert!(
        body.contains("vireo_operator_reconciles_total{controller=\"domain\"}"),
        "{body}"
    );
    assert!(
        body.contains("vireo_operator_reconcile_duration_seconds_bucket"),
        "{body}"
    );
    assert_eq!(leader.http_get("/readyz").map(|r| r.0), Some(200));
    let standby = if leading[0] == "a" { &b } else { &a };
    assert_eq!(
        standby.http_get("/readyz").map(|r| r.0),
        Some(503),
        "the standby is not ready"
    );

    // Kill the leader: the other takes over and places new Domains.
    let (mut dead, survivor) = if leading[0] == "a" { (a, b) } else { (b, a) };
    dead.kill();
    cluster.kubectl_stdin(&["apply", "-f", "-"], &domain("second"));
    wait_for(T, "second running under the new leader", || async {
        domains
            .get("second")
            .await
            .ok()
            .filter(|d| d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running))
    })
    .await;
    assert!(
        survivor.log_text().contains("leading"),
        "{}",
        survivor.log_text()
    );
}
