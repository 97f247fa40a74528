//! Networks: protected from deletion while a Domain has an interface on
//! them, as StorageVols are ([`super::volume`]) and as a PVC is. A deleted
//! Network that Domains still use stays active on its nodes (their agents
//! wait for this finalizer to go) and says which Domains hold it; once none
//! does, the finalizer goes and the agents tear it down.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use vireo_crds::labels::IN_USE_FINALIZER;
use vireo_crds::{Domain, Network};

use super::Ctx;
use crate::error::Result;
use crate::k8s;

pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    k8s::controller(Api::<Network>::all(client), watcher::Config::default())
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            |net, ctx: Arc<Ctx>| async move {
                let started = std::time::Instant::now();
                let r = reconcile(net, &ctx).await;
                ctx.metrics
                    .reconciled("network", started, r.as_ref().err().map(|e| e.label()));
                r
            },
            |_net, _err, _ctx| Action::requeue(Duration::from_secs(2)),
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

/// The Domains (`NS/NAME`, sorted) with an interface on network `name`.
pub fn users(domains: &[Domain], name: &str) -> Vec<String> {
    let mut users: Vec<String> = domains
        .iter()
        .filter(|d| d.spec.devices.interfaces.iter().any(|i| i.network == name))
        .map(|d| format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any()))
        .collect();
    users.sort();
    users
}

async fn reconcile(net: Arc<Network>, ctx: &Ctx) -> Result<Action> {
    let name = net.name_any();
    let api: Api<Network> = Api::all(ctx.client.clone());
    if net.meta().deletion_timestamp.is_some() {
        if !net.finalizers().iter().any(|f| f == IN_USE_FINALIZER) {
            return Ok(Action::await_change());
        }
        let domains = Api::<Domain>::all(ctx.client.clone())
            .list(&Default::default())
            .await?
            .items;
        let users = users(&domains, &name);
        if users.is_empty() {
            k8s::remove_finalizer(&api, net.as_ref(), IN_USE_FINALIZER).await?;
            return Ok(Action::await_change());
        }
        k8s::event(
            &ctx.recorder,
            net.as_ref(),
            EventType::Warning,
            "InUse",
            "Delete",
            format!(
                "deletion waits: domain(s) {} have an interface on it",
                users.join(", ")
            ),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(3)));
    }
    k8s::add_finalizer(&api, net.as_ref(), IN_USE_FINALIZER).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(ns: &str, name: &str, networks: &[&str]) -> Domain {
        let interfaces: Vec<serde_json::Value> = networks
            .iter()
            .enumerate()
            .map(|(i, n)| serde_json::json!({"name": format!("net{i}"), "network": n}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1",
            "kind": "Domain",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "test", "memory": "1Gi", "vcpus": 1,
                     "devices": {"interfaces": interfaces}},
        }))
        .expect("a Domain")
    }

    #[test]
    fn users_are_the_domains_with_an_interface_on_the_network() {
        let all = [
            domain("b", "two", &["lab", "edge"]),
            domain("a", "one", &["lab"]),
            domain("a", "other", &["edge"]),
            domain("a", "none", &[]),
        ];
        assert_eq!(users(&all, "lab"), ["a/one", "b/two"]);
        assert_eq!(users(&all, "edge"), ["a/other", "b/two"]);
        assert!(users(&all, "unused").is_empty());
    }
}
