//! Domains, cluster-wide: a UUID for each, a Host for each, and the gates
//! (`VolumesReady`, `NetworksReady`) the agent waits for before starting it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use vireo_crds::labels::{NODE, NODE_CLEANUP_FINALIZER, OPERATOR_MANAGER};
use vireo_crds::quantity::parse_quantity;
use vireo_crds::{Domain, DomainState, DomainStatus, Host, Network, StorageVol};

use super::Ctx;
use crate::conditions::{
    OPERATOR_DOMAIN_CONDITIONS, bound_message, condition, find, host_reporting_message,
    networks_ready_message, same, volumes_ready_message,
};
use crate::error::Result;
use crate::k8s;
use crate::metrics::StateLabels;
use crate::placement::{HostView, Request, VolumeNeed, place};

struct DomainCtx {
    ctx: Arc<Ctx>,
    domains: Store<Domain>,
}

pub(super) fn bound_node(d: &Domain) -> Option<&str> {
    d.labels().get(NODE).map(String::as_str)
}

fn key(d: &Domain) -> String {
    format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any())
}

/// The operator's one watch on every Domain of the cluster, and the cache
/// it fills: the Domain controller reconciles from the stream, and the
/// migration and drain controllers read the same cache. One watch, not one
/// per controller: every Domain watch gets every Domain event in the API
/// server's watch cache, and at 10,000 Domains each held its own copy
/// (issue 19).
///
/// The cache holds the Domains without their managed fields: nothing in
/// the operator reads them (its writes are applies and patches the API
/// server merges), and they were a third of its memory at 10,000 Domains
/// (issue 19: 438 MiB before, 293 MiB after).
pub fn watch(
    client: kube::Client,
) -> (
    Store<Domain>,
    impl futures::Stream<Item = std::result::Result<Domain, watcher::Error>> + Send + 'static,
) {
    let (domains, writer) = reflector::store();
    let events = watcher(Api::<Domain>::all(client), watcher::Config::default())
        .modify(|d| d.managed_fields_mut().clear())
        .reflect(writer);
    let stream = k8s::reconcile_triggers(events, domains.clone());
    (domains, stream)
}

/// Runs the Domain controller on the stream and cache of [`watch`].
pub async fn run(
    ctx: Arc<Ctx>,
    domains: Store<Domain>,
    stream: impl futures::Stream<Item = std::result::Result<Domain, watcher::Error>> + Send + 'static,
) {
    let client = ctx.client.clone();
    let controller = Controller::for_stream(stream, domains.clone())
        .with_config(Config::default().concurrency(ctx.config.concurrency));
    // A Host that changes (registers, goes NotReady or Ready) concerns the
    // Domains bound to it and every Domain still waiting for a Host.
    let by_host = domains.clone();
    // A volume or network that changes concerns the Domains that use it.
    let by_volume = domains.clone();
    let by_network = domains.clone();
    tokio::spawn(count_states(ctx.clone(), domains.clone()));
    let dctx = Arc::new(DomainCtx {
        ctx: ctx.clone(),
        domains: domains.clone(),
    });
    controller
        .watches(
            Api::<Host>::all(client.clone()),
            watcher::Config::default(),
            move |host| {
                let name = host.name_any();
                by_host
                    .state()
                    .into_iter()
                    .filter(|d| bound_node(d).is_none_or(|n| n == name))
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<StorageVol>::all(client.clone()),
            watcher::Config::default(),
            move |vol| {
                let (ns, name) = (vol.namespace(), vol.name_any());
                by_volume
                    .state()
                    .into_iter()
                    .filter(|d| d.namespace() == ns && d.spec.uses_volume(&name))
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<Network>::all(client),
            watcher::Config::default(),
            move |net| {
                let name = net.name_any();
                by_network
                    .state()
                    .into_iter()
                    .filter(|d| d.spec.devices.interfaces.iter().any(|i| i.network == name))
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(
            |dom, dctx: Arc<DomainCtx>| async move {
                let started = std::time::Instant::now();
                let result = reconcile(dom.clone(), &dctx).await;
                let err = result.as_ref().err().map(|e| e.label());
                dctx.ctx.metrics.reconciled("domain", started, err);
                if let Err(e) = &result {
                    tracing::warn!(domain = %key(&dom), error = %e, "reconcile failed");
                }
                result
            },
            |_dom, _err, _ctx| Action::requeue(Duration::from_secs(2)),
            dctx,
        )
        .for_each(|_| async {})
        .await;
}

use futures::StreamExt;

/// Keeps `vireo_objects{kind="Domain",state=...}` current.
async fn count_states(ctx: Arc<Ctx>, domains: Store<Domain>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut seen: BTreeSet<String> = BTreeSet::new();
    loop {
        tick.tick().await;
        let mut counts: BTreeMap<String, i64> = seen.iter().map(|s| (s.clone(), 0)).collect();
        for d in domains.state() {
            let state = d
                .status
                .as_ref()
                .and_then(|s| s.state)
                .map_or("none", |s| s.virsh_name());
            *counts.entry(state.to_string()).or_default() += 1;
        }
        for (state, n) in counts {
            ctx.metrics
                .objects
                .get_or_create(&StateLabels {
                    kind: "Domain".into(),
                    state: state.clone(),
                })
                .set(n);
            seen.insert(state);
        }
    }
}

/// Whether a Host's `Ready` condition is True.
pub(crate) fn host_ready(h: &Host) -> bool {
    h.status
        .as_ref()
        .and_then(|s| find(&s.conditions, "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Whether a Host has been declared NotReady (False or Unknown).
fn host_lost(h: &Host) -> bool {
    h.status
        .as_ref()
        .and_then(|s| find(&s.conditions, "Ready"))
        .is_some_and(|c| c.status != "True")
}

pub(super) fn request(dom: &Domain, ctx: &Ctx) -> std::result::Result<Request, String> {
    let ns = dom.namespace().unwrap_or_default();
    let mut volumes = Vec::new();
    for (field, volume) in dom.spec.volume_refs() {
        let vol = ctx
            .volumes
            .get(&ObjectRef::new(volume).within(&ns))
            .ok_or_else(|| {
                format!("StorageVol '{volume}' not found in namespace '{ns}' ({field})")
            })?;
        volumes.push(VolumeNeed {
            name: volume.to_string(),
            pool: vol.spec.pool.clone(),
            node: vol
                .labels()
                .get(NODE)
                .cloned()
                .or_else(|| vol.spec.node_name.clone()),
        });
    }
    Ok(Request {
        driver: dom.spec.domain_type.as_str().to_string(),
        memory: parse_quantity(&dom.spec.memory).unwrap_or(u64::MAX),
        vcpus: u64::from(dom.spec.vcpus),
        node_selector: dom.spec.node_selector.clone().unwrap_or_default(),
        networks: dom
            .spec
            .devices
            .interfaces
            .iter()
            .map(|i| i.network.clone())
            .collect(),
        volumes,
    })
}

/// How often placement's tally of what bound Domains use is made again
/// from the cache. Making it is one pass over every Domain; made on every
/// placement, as it was, that pass was O(N) per Domain and O(N²) for a
/// fleet (10,000 Domains: 10⁸ quantities parsed). Placements made since the
/// last tally are counted from `Placements::assumed` until a tally has them.
const USAGE_REFRESH: Duration = Duration::from_millis(250);

/// What placement knows of the room the Domains take on each Host.
#[derive(Default)]
pub struct Placements {
    /// Placements made but maybe not yet in the tally: Domain UID → (host,
    /// memory, vCPUs). Placement reads and adds to it under one lock, so
    /// two concurrent reconciles never give the same room twice.
    assumed: HashMap<String, (String, u64, u64)>,
    /// Host → (memory, vCPUs) the bound Domains in the cache use, as of `at`.
    used: HashMap<String, (u64, u64)>,
    /// The UIDs of the Domains `used` counts.
    counted: HashSet<String>,
    at: Option<Instant>,
}

impl Placements {
    /// Forgets a placement (its Domain is going, or its binding failed).
    pub fn forget(&mut self, uid: &str) {
        self.assumed.remove(uid);
    }

    /// Tallies what the bound Domains in the cache use, and drops the
    /// assumptions the tally now counts or whose Domain is gone (deleted
    /// before the watch showed it bound: it would hold room forever).
    fn refresh(&mut self, domains: &Store<Domain>) {
        let all = domains.state();
        let mut used: HashMap<String, (u64, u64)> = HashMap::new();
        let mut counted = HashSet::with_capacity(all.len());
        let mut present = HashSet::with_capacity(all.len());
        for d in all {
            let uid = d.uid().unwrap_or_default();
            if let Some(node) = bound_node(&d) {
                let e = used.entry(node.to_string()).or_default();
                e.0 =
                    e.0.saturating_add(parse_quantity(&d.spec.memory).unwrap_or(0));
                e.1 = e.1.saturating_add(u64::from(d.spec.vcpus));
                counted.insert(uid.clone());
            }
            present.insert(uid);
        }
        self.assumed
            .retain(|uid, _| present.contains(uid) && !counted.contains(uid));
        self.used = used;
        self.counted = counted;
        self.at = Some(Instant::now());
    }
}

/// Every Host as placement sees it, with what bound and assumed Domains use.
pub(super) fn host_views(
    ctx: &Ctx,
    domains: &Store<Domain>,
    placements: &mut Placements,
) -> Vec<HostView> {
    let mut views: BTreeMap<String, HostView> = BTreeMap::new();
    for h in ctx.hosts.state() {
        let status = h.status.clone().unwrap_or_default();
        let name = h.name_any();
        views.insert(
            name.clone(),
            HostView {
                name,
                labels: h.labels().clone(),
                ready: host_ready(&h),
                // A drained Host takes no new Domain.
                unschedulable: h.spec.unschedulable || ctx.draining(&h),
                drivers: status.drivers.iter().cloned().collect(),
                memory: status
                    .allocatable_memory
                    .as_ref()
                    .and_then(|q| parse_quantity(q).ok())
                    .unwrap_or(0),
                vcpus: u64::from(status.allocatable_vcpus.unwrap_or(0)),
                ..HostView::default()
            },
        );
    }
    for net in ctx.networks.state() {
        for n in net
            .status
            .iter()
            .flat_map(|s| &s.nodes)
            .filter(|n| n.active)
        {
            if let Some(v) = views.get_mut(&n.node_name) {
                v.networks.insert(net.name_any());
            }
        }
    }
    for pool in ctx.pools.state() {
        for n in pool
            .status
            .iter()
            .flat_map(|s| &s.nodes)
            .filter(|n| n.state == "running")
        {
            if let Some(v) = views.get_mut(&n.node_name) {
                v.pools.insert(pool.name_any());
            }
        }
    }
    if placements.at.is_none_or(|t| t.elapsed() >= USAGE_REFRESH) {
        placements.refresh(domains);
    }
    for (node, (mem, vcpus)) in &placements.used {
        if let Some(v) = views.get_mut(node) {
            v.used_memory = v.used_memory.saturating_add(*mem);
            v.used_vcpus = v.used_vcpus.saturating_add(*vcpus);
        }
    }
    for (uid, (node, mem, vcpus)) in &placements.assumed {
        if !placements.counted.contains(uid)
            && let Some(v) = views.get_mut(node)
        {
            v.used_memory = v.used_memory.saturating_add(*mem);
            v.used_vcpus = v.used_vcpus.saturating_add(*vcpus);
        }
    }
    views.into_values().collect()
}

async fn reconcile(dom: Arc<Domain>, dctx: &DomainCtx) -> Result<Action> {
    let ctx = &dctx.ctx;
    let ns = dom.namespace().unwrap_or_default();
    let name = dom.name_any();
    let api: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    if dom.meta().deletion_timestamp.is_some() {
        ctx.placements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&dom.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    let status = dom.status.clone().unwrap_or_default();
    let mut generation = dom.meta().generation;
    let prev = &status.conditions;

    // The binding is the label, or the node already recorded in status: a
    // Domain whose label was dropped (kubectl replace, edit) gets the same
    // node back, never a second one.
    let mut node = bound_node(&dom).map(str::to_string);
    // Unbound on purpose by a drain's eviction: placed anew, not restored.
    let evicted_from = dom
        .annotations()
        .get(vireo_crds::labels::EVICTED_FROM_ANNOTATION)
        .cloned();
    if node.is_none()
        && let Some(recorded) = status.node_name.clone()
        && evicted_from.as_ref() != Some(&recorded)
    {
        let ops = json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": dom.resource_version()},
            {"op": "add", "path": "/metadata/labels", "value": relabelled(&dom, &recorded)},
        ]);
        k8s::patch_json(&api, &name, ops).await?;
        k8s::event(
            &ctx.recorder,
            dom.as_ref(),
            EventType::Warning,
            "Rebound",
            "Bind",
            format!(
                "label {NODE} was missing; restored to host {recorded}, where the domain was bound"
            ),
        )
        .await;
        return Ok(Action::await_change());
    }
    let scheduled = match &node {
        Some(n) => condition(
            prev,
            "Scheduled",
            true,
            "Bound",
            bound_message(n),
            generation,
        ),
        None => {
            let decision = request(&dom, ctx).and_then(|req| {
                let mut placements = ctx.placements.lock().unwrap_or_else(|p| p.into_inner());
                let views = host_views(ctx, &dctx.domains, &mut placements);
                let host = place(&req, &views)?;
                placements.assumed.insert(
                    dom.uid().unwrap_or_default(),
                    (host.clone(), req.memory, req.vcpus),
                );
                Ok((host, req))
            });
            match decision {
                Ok((host, req)) => {
                    match bind(ctx, &dom, &host, &req).await {
                        // Giving the Domain its UUID changed its spec: the
                        // conditions below speak of the bound generation, so
                        // that the next look finds them current.
                        Ok(bound) => {
                            generation = bound;
                            ctx.note_bound(&dom);
                        }
                        Err(e) => {
                            ctx.placements
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .forget(&dom.uid().unwrap_or_default());
                            return Err(e);
                        }
                    }
                    // In the background: the status below is what the
                    // Domain's watchers wait for.
                    k8s::event_later(
                        &ctx.recorder,
                        dom.as_ref(),
                        EventType::Normal,
                        "Scheduled",
                        "Bind",
                        format!("bound to host {host}"),
                    );
                    node = Some(host.clone());
                    condition(
                        prev,
                        "Scheduled",
                        true,
                        "Bound",
                        bound_message(&host),
                        generation,
                    )
                }
                Err(why) => {
                    // A UUID for life even while pending (placement sets it otherwise).
                    if dom.spec.uuid.is_none() {
                        let uid = dom.uid().unwrap_or_default();
                        api.patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"spec": {"uuid": uid}})),
                        )
                        .await?;
                    }
                    if find(prev, "Scheduled").is_none_or(|c| c.message != why) {
                        k8s::event(
                            &ctx.recorder,
                            dom.as_ref(),
                            EventType::Warning,
                            "FailedScheduling",
                            "Bind",
                            why.clone(),
                        )
                        .await;
                    }
                    condition(prev, "Scheduled", false, "Unschedulable", why, generation)
                }
            }
        }
    };

    let mut conditions = vec![scheduled];
    let mut state = None;
    let mut host_lost_now = false;
    match &node {
        None => {
            state = Some(DomainState::Pending);
            conditions.push(condition(
                prev,
                "VolumesReady",
                false,
                "NotScheduled",
                "waiting for a host",
                generation,
            ));
            conditions.push(condition(
                prev,
                "NetworksReady",
                false,
                "NotScheduled",
                "waiting for a host",
                generation,
            ));
        }
        Some(n) => {
            let (vol_ok, vol_msg) = volumes_ready(ctx, &dom, n);
            let (net_ok, net_msg) = networks_ready(ctx, &dom, n);
            for (type_, ok, msg) in [
                ("VolumesReady", vol_ok, vol_msg),
                ("NetworksReady", net_ok, net_msg),
            ] {
                let reason = if ok { "Ready" } else { "Waiting" };
                if find(prev, type_).is_some_and(|c| (c.status == "True") != ok) {
                    let (t, r) = if ok {
                        (EventType::Normal, type_.to_string())
                    } else {
                        (EventType::Warning, format!("{type_}Lost"))
                    };
                    k8s::event(&ctx.recorder, dom.as_ref(), t, &r, "Gate", msg.clone()).await;
                }
                conditions.push(condition(prev, type_, ok, reason, msg, generation));
            }
            // Whether the bound Host is reachable is the operator's own
            // condition. On the edge into NotReady it also marks the domain
            // `unknown` with a plain update (not an apply): a live agent may
            // overwrite it, and nobody re-asserts it, so the two never fight.
            let host = ctx.hosts.get(&ObjectRef::new(n));
            let lost = host.as_deref().is_none_or(host_lost);
            host_lost_now = lost;
            let was_lost = find(prev, "HostReachable").is_some_and(|c| c.status != "True");
            let msg = if lost {
                format!(
                    "host {n} is not reporting; the domain may still run there and is not started elsewhere"
                )
            } else {
                host_reporting_message(n)
            };
            if lost && !was_lost {
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"state": DomainState::Unknown}})),
                )
                .await?;
                k8s::event(
                    &ctx.recorder,
                    dom.as_ref(),
                    EventType::Warning,
                    "HostNotReady",
                    "Observe",
                    msg.clone(),
                )
                .await;
            }
            let reason = if lost { "HostNotReady" } else { "HostReady" };
            conditions.push(condition(
                prev,
                "HostReachable",
                !lost,
                reason,
                msg,
                generation,
            ));
        }
    }
    let wanted = DomainStatus {
        state,
        node_name: node.clone(),
        conditions,
        ..DomainStatus::default()
    };
    let mine: Vec<_> = status
        .conditions
        .iter()
        .filter(|c| wanted.conditions.iter().any(|w| w.type_ == c.type_))
        .cloned()
        .collect();
    let state_ok = wanted.state.is_none() || status.state == wanted.state;
    let current =
        state_ok && status.node_name == wanted.node_name && same(&mine, &wanted.conditions);
    // A Domain that needs no gate, bound here a moment ago to a Host that
    // reports, gets these conditions from its agent, in the status apply
    // that says it runs (`conditions::ungated_domain_conditions`): one
    // status write per Domain instead of two. If the agent has not written
    // them within the grace, the operator does.
    let ungated = dom.spec.needs_no_gate();
    let none_yet = OPERATOR_DOMAIN_CONDITIONS
        .iter()
        .all(|t| find(prev, t).is_none());
    if !current
        && ungated
        && none_yet
        && node.is_some()
        && !host_lost_now
        && let Some(left) = ctx.binding_grace_left(&dom)
    {
        return Ok(Action::requeue(left));
    }
    if !current && !dctx.ctx.recently_applied(&dom, &wanted) {
        k8s::apply_status(&api, &name, OPERATOR_MANAGER, &wanted).await?;
        dctx.ctx.remember_applied(&dom, wanted);
    }
    Ok(if node.is_none() {
        Action::requeue(ctx.config.retry_pending)
    } else {
        Action::await_change()
    })
}

/// How long an applied status is trusted over a cache that does not show
/// it yet: the watch delivers our own write well within this; past it, a
/// status someone else overwrote is put right again.
const APPLIED_TRUST: std::time::Duration = std::time::Duration::from_secs(10);

/// How long after binding a Domain that needs no gate the operator leaves
/// its conditions to the agent (see `conditions::ungated_domain_conditions`).
const AGENT_WRITES_WITHIN: Duration = Duration::from_secs(10);

impl Ctx {
    /// Notes that this operator bound the Domain just now.
    fn note_bound(&self, dom: &Domain) {
        let mut bound = self.bound_at.lock().unwrap_or_else(|p| p.into_inner());
        bound.retain(|_, at| at.elapsed() < AGENT_WRITES_WITHIN);
        bound.insert(dom.uid().unwrap_or_default(), Instant::now());
    }

    /// What is left of the agent's grace for a Domain this operator bound,
    /// if any.
    fn binding_grace_left(&self, dom: &Domain) -> Option<Duration> {
        let bound = self.bound_at.lock().unwrap_or_else(|p| p.into_inner());
        let at = bound.get(&dom.uid().unwrap_or_default())?;
        AGENT_WRITES_WITHIN
            .checked_sub(at.elapsed())
            .filter(|left| !left.is_zero())
    }

    fn recently_applied(&self, dom: &Domain, wanted: &DomainStatus) -> bool {
        let uid = dom.uid().unwrap_or_default();
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied.get(&uid).is_some_and(|(s, at)| {
            at.elapsed() < APPLIED_TRUST
                && s.node_name == wanted.node_name
                && s.state == wanted.state
                && same(&s.conditions, &wanted.conditions)
        })
    }

    fn remember_applied(&self, dom: &Domain, wanted: DomainStatus) {
        let uid = dom.uid().unwrap_or_default();
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        // Forget what is past trusting here, on a write, not on every look.
        applied.retain(|_, (_, at)| at.elapsed() < APPLIED_TRUST);
        applied.insert(uid, (wanted, std::time::Instant::now()));
    }
}

/// The Domain's labels with the node label set.
fn relabelled(dom: &Domain, node: &str) -> serde_json::Value {
    let mut labels = dom.labels().clone();
    labels.insert(NODE.to_string(), node.to_string());
    json!(labels)
}

/// Binds the Domain (and its unplaced volumes) to a Host with the label the
/// agent selects on, in one JSON Patch that also gives the Domain its UUID
/// (its own UID: an RFC 4122 UUID, for life) and the agent's cleanup
/// finalizer, and that applies only to the version placement looked at.
/// Returns the bound Domain's generation.
async fn bind(ctx: &Ctx, dom: &Domain, host: &str, req: &Request) -> Result<Option<i64>> {
    let ns = dom.namespace().unwrap_or_default();
    // Each unplaced volume is bound only if nobody bound it meanwhile (two
    // Domains sharing a volume must not pull it to two nodes).
    let vols: Api<StorageVol> = Api::namespaced(ctx.client.clone(), &ns);
    for v in req.volumes.iter().filter(|v| v.node.is_none()) {
        let Some(vol) = ctx.volumes.get(&ObjectRef::new(&v.name).within(&ns)) else {
            continue;
        };
        let mut labels = vol.labels().clone();
        labels.insert(NODE.to_string(), host.to_string());
        let ops = json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": vol.resource_version()},
            {"op": "add", "path": "/metadata/labels", "value": labels},
        ]);
        k8s::patch_json(&vols, &v.name, ops).await?;
    }
    let mut ops = vec![
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": dom.resource_version()}),
    ];
    if dom.metadata.labels.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {NODE: host}}));
    } else {
        ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", NODE.replace('~', "~0").replace('/', "~1")), "value": host}));
    }
    if dom.spec.uuid.is_none() {
        ops.push(
            json!({"op": "add", "path": "/spec/uuid", "value": dom.uid().unwrap_or_default()}),
        );
    }
    match &dom.metadata.finalizers {
        None => ops.push(
            json!({"op": "add", "path": "/metadata/finalizers", "value": [NODE_CLEANUP_FINALIZER]}),
        ),
        Some(f) if !f.iter().any(|x| x == NODE_CLEANUP_FINALIZER) => {
            ops.push(json!({"op": "add", "path": "/metadata/finalizers/-", "value": NODE_CLEANUP_FINALIZER}));
        }
        Some(_) => {}
    }
    let api: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    let bound =
        k8s::patch_json_returning(&api, &dom.name_any(), serde_json::Value::Array(ops)).await?;
    Ok(bound.meta().generation)
}

fn volumes_ready(ctx: &Ctx, dom: &Domain, node: &str) -> (bool, String) {
    let ns = dom.namespace().unwrap_or_default();
    let mut waiting = Vec::new();
    let refs = dom.spec.volume_refs();
    for (_, volume) in &refs {
        match ctx.volumes.get(&ObjectRef::new(volume).within(&ns)) {
            None => waiting.push(format!("{volume} (not found)")),
            Some(v) => {
                let phase = v
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_else(|| "Pending".into());
                let on = v.labels().get(NODE).map(String::as_str);
                if on != Some(node) {
                    waiting.push(format!("{volume} (on node {})", on.unwrap_or("none")));
                } else if phase != "Ready" {
                    waiting.push(format!("{volume} ({phase})"));
                }
            }
        }
    }
    if waiting.is_empty() {
        (true, volumes_ready_message(refs.len(), node))
    } else {
        (
            false,
            format!("waiting for volumes: {}", waiting.join(", ")),
        )
    }
}

fn networks_ready(ctx: &Ctx, dom: &Domain, node: &str) -> (bool, String) {
    let mut waiting = Vec::new();
    for nic in &dom.spec.devices.interfaces {
        let active = ctx
            .networks
            .get(&ObjectRef::new(&nic.network))
            .is_some_and(|n| {
                n.status
                    .as_ref()
                    .is_some_and(|s| s.nodes.iter().any(|e| e.node_name == node && e.active))
            });
        if !active {
            waiting.push(nic.network.clone());
        }
    }
    if waiting.is_empty() {
        (
            true,
            networks_ready_message(dom.spec.devices.interfaces.len(), node),
        )
    } else {
        (
            false,
            format!(
                "waiting for networks to be active on {node}: {}",
                waiting.join(", ")
            ),
        )
    }
}
