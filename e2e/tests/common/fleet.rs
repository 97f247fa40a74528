//! Fleets of `type: test` Domains for the benches: create many, and time
//! each one's create to Running as a watch sees it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use vireo_crds::{Domain, DomainSpec, DomainState, DomainType};

/// An instant per Domain name.
pub type Times = Arc<Mutex<HashMap<String, Instant>>>;

/// A `type: test` Domain with one vCPU and `memory`.
pub fn test_domain(name: &str, memory: &str) -> Domain {
    Domain::new(
        name,
        DomainSpec {
            domain_type: DomainType::Test,
            arch: None,
            uuid: None,
            memory: k8s_openapi::apimachinery::pkg::api::resource::Quantity(memory.into()),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: None,
            devices: Default::default(),
            cloud_init: None,
            run_strategy: Default::default(),
            lifecycle: Default::default(),
            node_selector: None,
            eviction_strategy: None,
        },
    )
}

/// When a watch first saw each Domain bound to a node (the operator's
/// `vireo.dev/node` label) and Running.
#[derive(Clone, Default)]
pub struct Seen {
    pub bound: Times,
    pub running: Times,
}

/// Watches `api` and records when each Domain is first seen bound and
/// Running.
pub fn watch_running(api: &Api<Domain>) -> (tokio::task::JoinHandle<()>, Seen) {
    let seen = Seen::default();
    let stamps = seen.clone();
    let api = api.clone();
    let task = tokio::spawn(async move {
        let _ = watcher(api, watcher::Config::default())
            .applied_objects()
            .try_for_each(move |d| {
                let name = d.metadata.name.clone().unwrap_or_default();
                let now = Instant::now();
                let bound = d
                    .metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(vireo_crds::labels::NODE));
                if bound {
                    stamps
                        .bound
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(name.clone())
                        .or_insert(now);
                }
                if d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running) {
                    stamps
                        .running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(name)
                        .or_insert(now);
                }
                futures::future::ready(Ok(()))
            })
            .await;
    });
    (task, seen)
}

/// Creates `{prefix}-{i:04}` for i in 0..n, `at_once` at a time; returns
/// when each create was sent.
pub async fn create(
    api: &Api<Domain>,
    prefix: &str,
    n: usize,
    memory: &str,
    at_once: usize,
) -> HashMap<String, Instant> {
    let created: Times = Arc::default();
    futures::stream::iter(0..n)
        .for_each_concurrent(at_once, |i| {
            let api = api.clone();
            let created = created.clone();
            async move {
                let name = format!("{prefix}-{i:04}");
                let t = Instant::now();
                if let Err(e) = api
                    .create(&PostParams::default(), &test_domain(&name, memory))
                    .await
                {
                    eprintln!("create {name}: {e}");
                }
                created
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, t);
            }
        })
        .await;
    created.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Each Domain's create-to-Running, in seconds, sorted.
pub fn latencies(
    created: &HashMap<String, Instant>,
    running: &HashMap<String, Instant>,
) -> Vec<f64> {
    let mut out: Vec<f64> = running
        .iter()
        .filter_map(|(k, t)| {
            created
                .get(k)
                .map(|c| t.saturating_duration_since(*c).as_secs_f64())
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// The `p` quantile (0..=1) of sorted values, NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
