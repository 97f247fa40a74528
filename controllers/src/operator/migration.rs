//! DomainMigrations, cluster-wide: the operator accepts a migration (one
//! per Domain at a time: it marks the Domain with `vireo.dev/migration`),
//! picks the target as placement does, and at the end moves the Domain's
//! binding to the target (success) or releases the mark (failure). The
//! steps between (prepare, perform, finish, confirm) are the two agents'.
//!
//! Phases this controller writes: `Pending` → `Scheduling` (accepted) →
//! `Preparing` (target chosen) … `Confirming` with `Confirmed=True` →
//! `Succeeded`; and `Failed` when the Domain cannot migrate or no Host can
//! take it (the guest is not touched).
//!
//! The finalizer `vireo.dev/migration-cleanup` holds an accepted migration
//! until it ends: deleted before an agent acted (`Pending`, `Scheduling`)
//! it goes at once, the mark released; later the agents cancel it (see
//! `agent/migration.rs`) and it goes once `Failed` or `Succeeded`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use vireo_crds::labels::{MIGRATION_ANNOTATION, MIGRATION_FINALIZER, NODE};
use vireo_crds::{Domain, DomainMigration, DomainState, MigrationPhase, StorageVol};

use super::Ctx;
use super::domain::{bound_node, host_views, request};
use crate::error::Result;
use crate::k8s;
use crate::migration::{events, fail, first_failure, now, phase, set_condition, step_ok, update};
use crate::placement::place;

struct MigrationCtx {
    ctx: Arc<Ctx>,
    domains: Store<Domain>,
}

/// Runs the controller until the process ends; `domains` is the cache of
/// the operator's one Domain watch ([`super::domain::watch`]).
pub async fn run(ctx: Arc<Ctx>, domains: Store<Domain>) {
    let client = ctx.client.clone();
    if let Err(e) = domains.wait_until_ready().await {
        tracing::warn!(error = %e, "the migration controller's Domain cache did not fill");
    }
    tokio::spawn(super::drain::run(ctx.clone(), domains.clone()));
    let mctx = Arc::new(MigrationCtx { ctx, domains });
    k8s::controller(
        Api::<DomainMigration>::all(client),
        watcher::Config::default(),
    )
    .with_config(Config::default().concurrency(mctx.ctx.config.concurrency))
    .run(
        |m, mctx: Arc<MigrationCtx>| async move {
            let started = std::time::Instant::now();
            let result = reconcile(m.clone(), &mctx).await;
            let err = result.as_ref().err().map(|e| e.label());
            mctx.ctx.metrics.reconciled("migration", started, err);
            if let Err(e) = &result {
                tracing::warn!(migration = %m.name_any(), error = %e, "reconcile failed");
            }
            result
        },
        |_m, _err, _ctx| Action::requeue(Duration::from_secs(2)),
        mctx,
    )
    .for_each(|_| async {})
    .await;
}

async fn reconcile(m: Arc<DomainMigration>, mctx: &MigrationCtx) -> Result<Action> {
    let ctx = &mctx.ctx;
    let ns = m.namespace().unwrap_or_default();
    let api: Api<DomainMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let domains: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = m.meta().deletion_timestamp.is_some();
    let dom = domains.get_opt(&m.spec.domain_name).await?;
    if deleting
        && matches!(
            phase(&m),
            MigrationPhase::Pending | MigrationPhase::Scheduling
        )
    {
        // Nothing has been asked of an agent yet: the mark goes, and so does it.
        release(&domains, &m, dom.as_ref()).await?;
        k8s::remove_finalizer(&api, m.as_ref(), MIGRATION_FINALIZER).await?;
        return Ok(Action::await_change());
    }
    match phase(&m) {
        MigrationPhase::Pending if !m.finalizers().iter().any(|f| f == MIGRATION_FINALIZER) => {
            // First the finalizer (its patch brings the object back here).
            k8s::add_finalizer(&api, m.as_ref(), MIGRATION_FINALIZER).await?;
            Ok(Action::await_change())
        }
        MigrationPhase::Pending => accept(ctx, &api, &domains, &m, dom.as_ref()).await,
        MigrationPhase::Scheduling => schedule(mctx, &api, &m, dom.as_ref()).await,
        MigrationPhase::Confirming => {
            let status = m.status.clone().unwrap_or_default();
            if step_ok(&status, "Confirmed") == Some(true) {
                complete(ctx, &api, &domains, &m, dom.as_ref()).await
            } else {
                Ok(Action::await_change())
            }
        }
        MigrationPhase::Failed => {
            release(&domains, &m, dom.as_ref()).await?;
            k8s::remove_finalizer(&api, m.as_ref(), MIGRATION_FINALIZER).await?;
            Ok(Action::await_change())
        }
        MigrationPhase::Succeeded => {
            k8s::remove_finalizer(&api, m.as_ref(), MIGRATION_FINALIZER).await?;
            Ok(Action::await_change())
        }
        // The agents' steps; a step that never comes (an agent gone) is
        // looked at again now and then.
        _ => Ok(Action::requeue(Duration::from_secs(30))),
    }
}

/// The migration this Domain is marked with, if any.
fn marked(dom: &Domain) -> Option<&str> {
    dom.annotations()
        .get(MIGRATION_ANNOTATION)
        .map(String::as_str)
}

async fn refuse(
    ctx: &Ctx,
    api: &Api<DomainMigration>,
    m: &DomainMigration,
    dom: Option<&Domain>,
    reason: &str,
    message: String,
) -> Result<Action> {
    update(api, m, |s| fail(s, "Scheduled", reason, &message)).await?;
    tracing::info!(migration = %m.name_any(), %message, "migration refused");
    events(
        &ctx.recorder,
        m,
        dom,
        EventType::Warning,
        "MigrationFailed",
        message,
    )
    .await;
    Ok(Action::await_change())
}

/// Pending: checks the Domain can migrate and marks it as migrating.
async fn accept(
    ctx: &Ctx,
    api: &Api<DomainMigration>,
    domains: &Api<Domain>,
    m: &DomainMigration,
    dom: Option<&Domain>,
) -> Result<Action> {
    let name = &m.spec.domain_name;
    let ns = m.namespace().unwrap_or_default();
    let Some(dom) = dom.filter(|d| d.meta().deletion_timestamp.is_none()) else {
        let why = format!("Domain '{name}' not found in namespace '{ns}'");
        return refuse(ctx, api, m, None, "DomainNotFound", why).await;
    };
    let Some(source) = bound_node(dom).map(str::to_string) else {
        let why = format!("Domain '{name}' is not bound to a host: only a running domain migrates");
        return refuse(ctx, api, m, Some(dom), "NotRunning", why).await;
    };
    let state = dom.status.as_ref().and_then(|s| s.state);
    if state != Some(DomainState::Running) {
        let shown = state.map_or("without a state yet", |s| s.virsh_name());
        let why = format!(
            "Domain '{name}' is {shown} on host {source}: only a running domain migrates live"
        );
        return refuse(ctx, api, m, Some(dom), "NotRunning", why).await;
    }
    if let Some(other) = marked(dom).filter(|o| *o != m.name_any()) {
        // A mark left by a migration that ended (or was deleted) is stale.
        let live = api
            .get_opt(other)
            .await?
            .is_some_and(|o| !phase(&o).is_final());
        if live {
            let why = format!(
                "Domain '{name}' is already migrating (DomainMigration '{other}'); one migration at a time"
            );
            return refuse(ctx, api, m, Some(dom), "AlreadyMigrating", why).await;
        }
    }
    // The mark, on the version looked at: two migrations accepted at once
    // cannot both set it.
    let path = annotation_path(MIGRATION_ANNOTATION);
    let mut ops = vec![
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": dom.resource_version()}),
    ];
    if dom.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {MIGRATION_ANNOTATION: m.name_any()}}));
    } else {
        ops.push(json!({"op": "add", "path": path, "value": m.name_any()}));
    }
    k8s::patch_json(domains, name, serde_json::Value::Array(ops)).await?;
    update(api, m, |s| {
        s.phase = Some(MigrationPhase::Scheduling);
        s.source_node = Some(source.clone());
        s.start_time = Some(now());
        s.message = Some(format!("accepted; domain runs on host {source}"));
    })
    .await?;
    Ok(Action::await_change())
}

/// Scheduling: picks the target as placement does, never the source.
async fn schedule(
    mctx: &MigrationCtx,
    api: &Api<DomainMigration>,
    m: &DomainMigration,
    dom: Option<&Domain>,
) -> Result<Action> {
    let ctx = &mctx.ctx;
    let status = m.status.clone().unwrap_or_default();
    let source = status.source_node.clone().unwrap_or_default();
    let Some(dom) = dom else {
        let why = format!("Domain '{}' was deleted", m.spec.domain_name);
        return refuse(ctx, api, m, None, "DomainNotFound", why).await;
    };
    let decision = request(dom, ctx).and_then(|mut req| {
        // Volumes on the source move with the domain (their data is copied).
        for v in &mut req.volumes {
            if v.node.as_deref() == Some(source.as_str()) {
                v.node = None;
            }
        }
        let mut placements = ctx.placements.lock().unwrap_or_else(|p| p.into_inner());
        let mut views = host_views(ctx, &mctx.domains, &mut placements);
        drop(placements);
        if let Some(target) = &m.spec.target_node {
            if *target == source {
                return Err(format!(
                    "host {target} is the host the domain runs on; migrate it to another"
                ));
            }
            views.retain(|h| h.name == *target);
            if views.is_empty() {
                return Err(format!("host {target} not found (kubectl get hosts)"));
            }
            place(&req, &views).map_err(|why| format!("host {target} cannot take it: {why}"))
        } else {
            views.retain(|h| h.name != source);
            place(&req, &views).map_err(|why| format!("no other host can take it: {why}"))
        }
    });
    let target = match decision {
        Ok(t) => t,
        Err(why) => {
            let why = format!(
                "Domain '{}' stays on host {source}: {why}",
                m.spec.domain_name
            );
            return refuse(ctx, api, m, Some(dom), "NoTarget", why).await;
        }
    };
    let note = format!("migrating from host {source} to host {target}");
    update(api, m, |s| {
        s.phase = Some(MigrationPhase::Preparing);
        s.target_node = Some(target.clone());
        s.message = Some(note.clone());
        set_condition(s, "Scheduled", true, "TargetChosen", note.clone());
    })
    .await?;
    events(
        &ctx.recorder,
        m,
        Some(dom),
        EventType::Normal,
        "MigrationScheduled",
        note,
    )
    .await;
    Ok(Action::await_change())
}

/// Confirming with the source's copy gone: moves the binding (the node
/// label, and that of the volumes that were on the source) to the target
/// and removes the mark, in one patch guarded by the mark.
async fn complete(
    ctx: &Ctx,
    api: &Api<DomainMigration>,
    domains: &Api<Domain>,
    m: &DomainMigration,
    dom: Option<&Domain>,
) -> Result<Action> {
    let status = m.status.clone().unwrap_or_default();
    let (Some(source), Some(target)) = (status.source_node.clone(), status.target_node.clone())
    else {
        return Ok(Action::await_change());
    };
    if let Some(dom) = dom.filter(|d| marked(d) == Some(m.name_any().as_str())) {
        let ns = m.namespace().unwrap_or_default();
        let vols: Api<StorageVol> = Api::namespaced(ctx.client.clone(), &ns);
        for (_, volume) in dom.spec.volume_refs() {
            let Some(vol) = vols.get_opt(volume).await? else {
                continue;
            };
            if vol.labels().get(NODE) == Some(&source) {
                k8s::patch_json(
                    &vols,
                    volume,
                    json!([
                        {"op": "test", "path": annotation_label_path(NODE), "value": source},
                        {"op": "replace", "path": annotation_label_path(NODE), "value": target},
                    ]),
                )
                .await?;
            }
        }
        let mark = annotation_path(MIGRATION_ANNOTATION);
        k8s::patch_json(
            domains,
            &m.spec.domain_name,
            json!([
                {"op": "test", "path": mark, "value": m.name_any()},
                {"op": "test", "path": annotation_label_path(NODE), "value": source},
                {"op": "replace", "path": annotation_label_path(NODE), "value": target},
                {"op": "remove", "path": mark},
            ]),
        )
        .await?;
    }
    let stats = status.stats.clone().unwrap_or_default();
    let note = format!(
        "migrated from host {source} to host {target} in {} ms (downtime {} ms)",
        stats.total_ms, stats.downtime_ms
    );
    update(api, m, |s| {
        s.phase = Some(MigrationPhase::Succeeded);
        s.end_time = Some(now());
        s.message = Some(note.clone());
    })
    .await?;
    tracing::info!(migration = %m.name_any(), "{note}");
    events(&ctx.recorder, m, dom, EventType::Normal, "Migrated", note).await;
    Ok(Action::await_change())
}

/// Failed: the Domain stays where it is; its mark goes.
async fn release(domains: &Api<Domain>, m: &DomainMigration, dom: Option<&Domain>) -> Result<()> {
    let Some(dom) = dom.filter(|d| marked(d) == Some(m.name_any().as_str())) else {
        return Ok(());
    };
    let mark = annotation_path(MIGRATION_ANNOTATION);
    tracing::info!(migration = %m.name_any(), domain = %dom.name_any(), reason = ?first_failure(&m.status.clone().unwrap_or_default()), "migration failed; domain released");
    k8s::patch_json(
        domains,
        &m.spec.domain_name,
        json!([
            {"op": "test", "path": mark, "value": m.name_any()},
            {"op": "remove", "path": mark},
        ]),
    )
    .await
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn annotation_path(key: &str) -> String {
    format!("/metadata/annotations/{}", escape(key))
}

fn annotation_label_path(key: &str) -> String {
    format!("/metadata/labels/{}", escape(key))
}
