//! Draining a Host (`spec.drain: true`, which `vireo drain NODE` sets):
//! no new Domain is placed there (placement treats it as unschedulable),
//! and each Domain bound there goes as its `spec.evictionStrategy` says:
//!
//! * `LiveMigrate`: a running Domain gets a DomainMigration named
//!   `<domain>-drain` (label `vireo.dev/drain: <host>`), the target picked
//!   as for any migration; one that failed is tried again after 30 s. A
//!   Domain that is not running is evicted as with `Shutdown`.
//! * `Shutdown`: the operator marks it `vireo.dev/evict: <host>`; that
//!   Host's agent shuts the guest down (destroying it after its stop
//!   timeout), undefines it and says `Evicted=True`; the operator then
//!   unbinds it (leaving `vireo.dev/evicted-from: <host>`), and placement
//!   puts it on another Host, where its runStrategy applies (Always: it
//!   starts there). A Domain with volumes is not shut down this way (its
//!   node-local volumes would pin it to the drained Host): an Event says so.
//! * `None` (the default): left running where it is.
//!
//! With the operator's `--drain-on-cordon` (the chart's default), a
//! cordoned Kubernetes Node of the Host's name drains it the same way, so
//! `kubectl drain NODE --ignore-daemonsets` moves the guests (the agents
//! are a DaemonSet, which kubectl drain leaves); `kubectl uncordon` ends
//! it. Vireo's guests are not pods: kubectl drain returns once the pods
//! are gone; `kubectl wait host/NODE --for=condition=Drained` waits for
//! the guests.
//!
//! The Host's condition `Drained` says how far it got (`True` once no
//! Domain that should leave is left).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;
use vireo_crds::labels::{
    DRAIN_LABEL, EVICT_ANNOTATION, EVICTED_FROM_ANNOTATION, MIGRATION_ANNOTATION, NODE,
};
use vireo_crds::{
    Domain, DomainMigration, DomainMigrationSpec, DomainState, EvictionStrategy, Host,
};

use super::Ctx;
use super::domain::bound_node;
use crate::conditions::{condition, find};
use crate::error::Result;
use crate::k8s;
use crate::migration::phase;

/// The field manager of the Host's `Drained` condition (host health owns
/// `Ready` under the operator's own).
const DRAIN_MANAGER: &str = "vireo-operator-drain";

/// How long a failed drain migration waits before it is tried again.
const RETRY_FAILED: Duration = Duration::from_secs(30);

/// Looks at drained Hosts every 2 s until the process ends.
pub async fn run(ctx: Arc<Ctx>, domains: Store<Domain>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for host in ctx.hosts.state() {
            if let Err(e) = drain(&ctx, &domains, &host).await {
                tracing::warn!(host = %host.name_any(), error = %e, "drain step failed");
            }
        }
    }
}

async fn drain(ctx: &Ctx, domains: &Store<Domain>, host: &Host) -> Result<()> {
    let name = host.name_any();
    let prev = host
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if !ctx.draining(host) {
        // Undrained: the condition goes.
        if find(&prev, "Drained").is_some() {
            let hosts: Api<Host> = Api::all(ctx.client.clone());
            k8s::apply_status(&hosts, &name, DRAIN_MANAGER, &json!({})).await?;
        }
        return Ok(());
    }
    let (mut moving, mut left) = (0usize, 0usize);
    for d in domains.state() {
        if bound_node(&d) != Some(name.as_str()) || d.meta().deletion_timestamp.is_some() {
            continue;
        }
        let running = d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running);
        match d.spec.eviction_strategy.unwrap_or_default() {
            EvictionStrategy::None => left += 1,
            EvictionStrategy::LiveMigrate if running => {
                moving += 1;
                migrate(ctx, &d, &name).await?;
            }
            EvictionStrategy::LiveMigrate | EvictionStrategy::Shutdown => {
                if d.spec.volume_refs().is_empty() {
                    moving += 1;
                    evict(ctx, &d, &name).await?;
                } else {
                    left += 1;
                    note_once(
                        ctx,
                        &d,
                        "EvictionBlocked",
                        format!(
                            "host {name} is drained, but a Domain with volumes is not shut down to move (its node-local volumes stay on {name}); use evictionStrategy LiveMigrate on a running domain"
                        ),
                    )
                    .await;
                }
            }
        }
    }
    let message = if moving == 0 {
        format!("drained: nothing left to move ({left} domain(s) stay, evictionStrategy None)")
    } else {
        format!("{moving} domain(s) moving off, {left} staying (evictionStrategy None)")
    };
    let message = if host.spec.drain {
        message
    } else {
        format!("node cordoned (kubectl drain or cordon): {message}")
    };
    let drained = moving == 0;
    let reason = if drained { "Drained" } else { "Draining" };
    if find(&prev, "Drained").is_none_or(|c| c.message != message) {
        let hosts: Api<Host> = Api::all(ctx.client.clone());
        let c = condition(&prev, "Drained", drained, reason, message.clone(), None);
        k8s::apply_status(&hosts, &name, DRAIN_MANAGER, &json!({"conditions": [c]})).await?;
        tracing::info!(host = %name, "{message}");
    }
    Ok(())
}

/// An Event on the Domain, unless it already has one with this reason.
async fn note_once(ctx: &Ctx, d: &Domain, reason: &str, note: String) {
    let key = format!(
        "{}/{}#{reason}",
        d.namespace().unwrap_or_default(),
        d.name_any()
    );
    let news = ctx
        .drain_notes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key);
    if news {
        k8s::event(&ctx.recorder, d, EventType::Warning, reason, "Drain", note).await;
    }
}

/// The DomainMigration a drain uses for a Domain: `<domain>-drain`.
fn migration_name(d: &Domain) -> String {
    let base = d.name_any();
    let mut end = base.len().min(247);
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}-drain", &base[..end])
}

async fn migrate(ctx: &Ctx, d: &Domain, host: &str) -> Result<()> {
    let ns = d.namespace().unwrap_or_default();
    let api: Api<DomainMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let name = migration_name(d);
    match api.get_opt(&name).await? {
        Some(m) if !phase(&m).is_final() => return Ok(()),
        Some(m) => {
            // Ended: a success from an earlier drain, or a failure old enough
            // to try again. Deleted here; the next look creates it anew.
            let ended = m
                .status
                .as_ref()
                .and_then(|s| s.end_time.as_ref())
                .map(|t| {
                    k8s_openapi::jiff::Timestamp::now()
                        .duration_since(t.0)
                        .unsigned_abs()
                })
                .unwrap_or_default();
            if ended >= RETRY_FAILED || phase(&m) == vireo_crds::MigrationPhase::Succeeded {
                api.delete(&name, &DeleteParams::default()).await?;
            }
            return Ok(());
        }
        None => {}
    }
    if d.annotations().contains_key(MIGRATION_ANNOTATION) {
        return Ok(());
    }
    let mut m = DomainMigration::new(
        &name,
        DomainMigrationSpec {
            domain_name: d.name_any(),
            target_node: None,
            max_downtime_ms: None,
            bandwidth: None,
        },
    );
    m.metadata.labels = Some([(DRAIN_LABEL.to_string(), host.to_string())].into());
    match api.create(&PostParams::default(), &m).await {
        Ok(_) => {
            k8s::event(
                &ctx.recorder,
                d,
                EventType::Normal,
                "Evicting",
                "Drain",
                format!("host {host} is drained: migrating live (DomainMigration {name})"),
            )
            .await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn evict(ctx: &Ctx, d: &Domain, host: &str) -> Result<()> {
    let ns = d.namespace().unwrap_or_default();
    let api: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    let marked = d.annotations().get(EVICT_ANNOTATION).map(String::as_str) == Some(host);
    if !marked {
        api.patch(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {EVICT_ANNOTATION: host}}})),
        )
        .await?;
        k8s::event(
            &ctx.recorder,
            d,
            EventType::Normal,
            "Evicting",
            "Drain",
            format!(
                "host {host} is drained: shutting the domain down there to place it on another host"
            ),
        )
        .await;
        return Ok(());
    }
    let evicted = d
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, "Evicted"))
        .is_some_and(|c| c.status == "True" && c.message.contains(host));
    if !evicted {
        return Ok(());
    }
    let esc = |k: &str| k.replace('~', "~0").replace('/', "~1");
    let ops = json!([
        {"op": "test", "path": format!("/metadata/labels/{}", esc(NODE)), "value": host},
        {"op": "remove", "path": format!("/metadata/labels/{}", esc(NODE))},
        {"op": "remove", "path": format!("/metadata/annotations/{}", esc(EVICT_ANNOTATION))},
        {"op": "add", "path": format!("/metadata/annotations/{}", esc(EVICTED_FROM_ANNOTATION)), "value": host},
    ]);
    k8s::patch_json(&api, &d.name_any(), ops).await?;
    k8s::event(
        &ctx.recorder,
        d,
        EventType::Normal,
        "Evicted",
        "Drain",
        format!("shut down and removed from drained host {host}; placing it on another host"),
    )
    .await;
    Ok(())
}
