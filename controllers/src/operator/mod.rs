//! The operator's cluster controllers. It never touches a node: it decides
//! (placement, UUIDs, dependency gates, in-use protection, host health) and
//! writes its decisions to labels and to its own status fields under the
//! field manager `vireo-operator`.
//!
//! * [`domain`]: UUID defaulting, placement on a Host, `Scheduled`,
//!   `VolumesReady`, `NetworksReady` conditions, state `pending`/`unknown`.
//! * [`volume`]: binding volumes with `spec.nodeName`, in-use protection.
//! * [`network`]: in-use protection of Networks.
//! * [`host_health`]: Host `Ready` from the agents' heartbeat Leases.
//! * [`drain`]: Hosts with `spec.drain`: their Domains migrate or move.
//! * [`migration`]: DomainMigrations: acceptance, the target, the binding's move.
//! * [`aggregate`]: how many nodes run each Network and StoragePool.

pub mod aggregate;
pub mod domain;
pub mod drain;
pub mod host_health;
pub mod migration;
pub mod network;
pub mod volume;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use vireo_crds::labels::SYSTEM_NAMESPACE;
use vireo_crds::{Host, Network, StoragePool, StorageVol};

use crate::error::Result;
use crate::metrics::Metrics;

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Objects reconciled at once, per controller.
    pub concurrency: u16,
    /// How often Hosts' Leases are checked.
    pub host_check: Duration,
    /// A Host whose Lease is older than its duration plus this is NotReady.
    pub host_grace: Duration,
    /// How often a Pending Domain is tried again without any change.
    pub retry_pending: Duration,
    /// A cordoned Kubernetes Node (`kubectl drain`, `kubectl cordon`:
    /// `spec.unschedulable`) drains the Host of the same name, as
    /// `spec.drain` does; uncordoning ends it.
    pub drain_on_cordon: bool,
}

/// What every controller of the operator shares.
pub struct Ctx {
    pub client: Client,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub hosts: Store<Host>,
    pub networks: Store<Network>,
    pub pools: Store<StoragePool>,
    pub volumes: Store<StorageVol>,
    pub leases: Store<Lease>,
    /// The Kubernetes Nodes, watched with `drain_on_cordon` only.
    pub nodes: Option<Store<Node>>,
    /// What placement knows of the room Domains take on each Host: a
    /// tally of the cache and the placements made since (see
    /// [`domain::Placements`]), under one lock, so two concurrent
    /// reconciles never give the same room twice.
    pub placements: Mutex<domain::Placements>,
    /// The status each Domain (by UID) was last given by this operator, and
    /// when: a reconcile woken by this operator's own earlier write may see
    /// the object from before it, and need not send the same status again.
    pub applied: Mutex<HashMap<String, (vireo_crds::DomainStatus, std::time::Instant)>>,
    /// When this operator bound each Domain (by UID), for the few seconds
    /// in which the agent writes the conditions of one that needs no gate.
    pub bound_at: Mutex<HashMap<String, std::time::Instant>>,
    /// Drain Events already sent (`ns/name#reason`), said once per process.
    pub drain_notes: Mutex<std::collections::HashSet<String>>,
}

impl Ctx {
    /// Whether the Kubernetes Node of this Host's name is cordoned (and
    /// the operator drains on cordon).
    pub fn cordoned(&self, host: &Host) -> bool {
        let Some(nodes) = &self.nodes else {
            return false;
        };
        let key = reflector::ObjectRef::<Node>::new(&kube::ResourceExt::name_any(host));
        nodes
            .get(&key)
            .is_some_and(|n| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true))
    }

    /// Whether a Host is being drained: `spec.drain`, or its Node cordoned.
    pub fn draining(&self, host: &Host) -> bool {
        host.spec.drain || self.cordoned(host)
    }
}

/// A reflector for a kind, running until the process ends.
pub(crate) fn reflect<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .for_each(|_| async {});
    tokio::spawn(stream);
    reader
}

/// Runs every controller until one ends (they run until the process stops).
pub async fn run(client: Client, config: OperatorConfig, metrics: Arc<Metrics>) -> Result<()> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "vireo-operator".into(),
            instance: std::env::var("HOSTNAME").ok(),
        },
    );
    let ctx = Arc::new(Ctx {
        hosts: reflect(Api::<Host>::all(client.clone())),
        networks: reflect(Api::<Network>::all(client.clone())),
        pools: reflect(Api::<StoragePool>::all(client.clone())),
        volumes: reflect(Api::<StorageVol>::all(client.clone())),
        leases: reflect(Api::<Lease>::namespaced(client.clone(), SYSTEM_NAMESPACE)),
        nodes: config
            .drain_on_cordon
            .then(|| reflect(Api::<Node>::all(client.clone()))),
        client,
        config,
        recorder,
        metrics,
        placements: Mutex::new(domain::Placements::default()),
        applied: Mutex::new(HashMap::new()),
        bound_at: Mutex::new(HashMap::new()),
        drain_notes: Mutex::new(std::collections::HashSet::new()),
    });
    for (name, ready) in [
        ("hosts", ctx.hosts.wait_until_ready().await),
        ("networks", ctx.networks.wait_until_ready().await),
        ("pools", ctx.pools.wait_until_ready().await),
        ("volumes", ctx.volumes.wait_until_ready().await),
        ("leases", ctx.leases.wait_until_ready().await),
    ] {
        if let Err(e) = ready {
            tracing::warn!(store = name, error = %e, "cache did not fill");
        }
    }
    ctx.metrics.set_ready(true);
    tracing::info!("caches filled; controllers start");
    let (domains, domain_events) = domain::watch(ctx.client.clone());
    tokio::select! {
        _ = domain::run(ctx.clone(), domains.clone(), domain_events) => {}
        _ = volume::run(ctx.clone()) => {}
        _ = network::run(ctx.clone()) => {}
        _ = host_health::run(ctx.clone()) => {}
        _ = migration::run(ctx.clone(), domains) => {}
        _ = aggregate::run_networks(ctx.clone()) => {}
        _ = aggregate::run_pools(ctx.clone()) => {}
    }
    Ok(())
}
