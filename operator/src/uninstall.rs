//! `vireo-operator uninstall`: what the chart's pre-delete hook runs before
//! `helm uninstall` removes the agents, so that no guest, bridge or dnsmasq
//! is left running on a node with nobody to manage it.
//!
//! It deletes every Domain (in every namespace) and waits until the agents
//! have destroyed them and let them go (their finalizers), then does the same
//! for every Network (bridges, nftables tables and dnsmasq go). StoragePools
//! and StorageVols are left alone: their files are users' data, and a
//! reinstall finds them again.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use vireo_crds::{Domain, Network};

/// Deletes every Domain, then every Network, each time waiting until they
/// are gone or `timeout` has passed.
pub async fn run(client: Client, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let c = client.clone();
    remove_all::<Domain>(&client, "Domain", deadline, move |ns| {
        Api::namespaced(c.clone(), ns.unwrap_or("default"))
    })
    .await?;
    let c = client.clone();
    remove_all::<Network>(&client, "Network", deadline, move |_| Api::all(c.clone())).await?;
    println!("uninstall: no Domain or Network is left; StoragePools and StorageVols are kept");
    Ok(())
}

fn key<K: Resource>(o: &K) -> String {
    match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

/// Deletes every object of a kind (`api_of` gives the API for an object's
/// namespace) and waits until none is left.
async fn remove_all<K>(
    client: &Client,
    kind: &str,
    deadline: Instant,
    api_of: impl Fn(Option<&str>) -> Api<K>,
) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api = Api::<K>::all(client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .with_context(|| format!("cannot list {kind}s"))?;
    for o in &list.items {
        if o.meta().deletion_timestamp.is_some() {
            continue;
        }
        let dp = DeleteParams::default();
        let result = api_of(o.meta().namespace.as_deref())
            .delete(&o.name_any(), &dp)
            .await;
        match result {
            Ok(_) => println!("uninstall: deleting {kind} {}", key(o)),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("cannot delete {kind} {}", key(o))),
        }
    }
    let mut last: BTreeSet<String> = BTreeSet::new();
    loop {
        let left: BTreeSet<String> = api
            .list(&ListParams::default())
            .await
            .with_context(|| format!("cannot list {kind}s"))?
            .items
            .iter()
            .map(key)
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if left != last {
            println!(
                "uninstall: waiting for the agents to let {} {kind}(s) go: {}",
                left.len(),
                left.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            last = left.clone();
        }
        if Instant::now() > deadline {
            bail!(
                "{} {kind}(s) are still there (is their node's agent running?): {}",
                left.len(),
                left.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
