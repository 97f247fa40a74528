//! StorageVols bound to this node: created in their pool, deleted once no
//! Domain uses them (the operator's in-use finalizer gone).

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use vireo_crds::labels::{IN_USE_FINALIZER, NODE, NODE_CLEANUP_FINALIZER};
use vireo_crds::quantity::format_bytes;
use vireo_crds::{StorageVol, StorageVolStatus};
use vireo_drivers::Error as DriverError;

use super::{Ctx, drain, error_policy, instrumented};
use crate::conditions::{condition, same};
use crate::error::{Error, Result};
use crate::k8s;

/// A volume's file name in its pool: `namespace.name` (namespaces hold no
/// dots, so the first dot splits them apart).
pub(crate) fn file_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let api: Api<StorageVol> = Api::all(ctx.client.clone());
    let selector = format!("{NODE}={}", ctx.config.node_name);
    let stream = Controller::new(api, watcher::Config::default().labels(&selector))
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            |vol, ctx: Arc<Ctx>| async move {
                let key = file_name(&vol.namespace().unwrap_or_default(), &vol.name_any());
                instrumented(&ctx, "agent-volume", key, reconcile(vol, &ctx)).await
            },
            |vol, _err, ctx: Arc<Ctx>| {
                error_policy(
                    &ctx,
                    &file_name(&vol.namespace().unwrap_or_default(), &vol.name_any()),
                )
            },
            ctx.clone(),
        );
    drain(stream).await;
}

async fn reconcile(vol: Arc<StorageVol>, ctx: &Ctx) -> Result<Action> {
    let ns = vol.namespace().unwrap_or_default();
    let api: Api<StorageVol> = Api::namespaced(ctx.client.clone(), &ns);
    let file = file_name(&ns, &vol.name_any());
    let pool = vol.spec.pool.clone();

    if vol.meta().deletion_timestamp.is_some() {
        // Wait while a Domain still uses it (the operator's finalizer).
        if vol.finalizers().iter().any(|f| f == IN_USE_FINALIZER) {
            return Ok(Action::await_change());
        }
        if vol.finalizers().iter().any(|f| f == NODE_CLEANUP_FINALIZER) {
            let (p, f) = (pool.clone(), file.clone());
            ctx.drive(move |c| match c.storage().delete_volume(&p, &f) {
                Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            })
            .await?;
            k8s::event(
                &ctx.recorder,
                vol.as_ref(),
                EventType::Normal,
                "Deleted",
                "Delete",
                format!("deleted from pool {pool} on node {}", ctx.config.node_name),
            )
            .await;
            k8s::remove_finalizer(&api, vol.as_ref(), NODE_CLEANUP_FINALIZER).await?;
            ctx.forget(&file);
        }
        return Ok(Action::await_change());
    }
    k8s::add_finalizer(&api, vol.as_ref(), NODE_CLEANUP_FINALIZER).await?;

    let status = vol.status.clone().unwrap_or_default();
    let (p, f) = (pool.clone(), file.clone());
    let existing = ctx.drive(move |c| c.storage().volume_info(&p, &f)).await;
    let (phase, info, message) = match existing {
        Ok(info) => (
            "Ready",
            Some(info),
            format!("in pool {pool} on node {}", ctx.config.node_name),
        ),
        // It was Ready here before: its file is gone. Never hand a guest a
        // fresh empty disk in its place; say so.
        Err(Error::Driver(DriverError::NotFound(_)))
            if status.phase.as_deref() == Some("Ready") =>
        {
            (
                "Failed",
                None,
                format!(
                    "the volume's file is missing from pool {pool} on node {}",
                    ctx.config.node_name
                ),
            )
        }
        Err(Error::Driver(DriverError::NotFound(_))) => {
            let mut want = StorageVol::new(&file, vol.spec.clone());
            if let Some(src) = want.spec.source.as_mut().and_then(|s| s.clone.as_mut()) {
                src.volume = file_name(&ns, &src.volume);
            }
            match ctx.drive(move |c| c.storage().create_volume(&want)).await {
                Ok(_) => {
                    let (p, f) = (pool.clone(), file.clone());
                    let info = ctx.drive(move |c| c.storage().volume_info(&p, &f)).await?;
                    k8s::event(
                        &ctx.recorder,
                        vol.as_ref(),
                        EventType::Normal,
                        "Created",
                        "Create",
                        format!("created in pool {pool} on node {}", ctx.config.node_name),
                    )
                    .await;
                    (
                        "Ready",
                        Some(info),
                        format!("in pool {pool} on node {}", ctx.config.node_name),
                    )
                }
                // The pool may not be active here yet: wait for it, visibly.
                Err(Error::Driver(e)) => ("Pending", None, e.to_string()),
                Err(e) => return Err(e),
            }
        }
        Err(Error::Driver(e)) => ("Pending", None, e.to_string()),
        Err(e) => return Err(e),
    };
    let ready = phase == "Ready";
    let wanted = StorageVolStatus {
        phase: Some(phase.to_string()),
        node_name: Some(ctx.config.node_name.clone()),
        path: info.as_ref().map(|i| i.path.clone()),
        key: info.as_ref().map(|i| i.key.clone()),
        format: info.as_ref().map(|i| i.format),
        capacity: info.as_ref().map(|i| format_bytes(i.capacity)),
        allocation: info.as_ref().map(|i| format_bytes(i.allocation)),
        progress: ready.then_some(100),
        observed_generation: vol.meta().generation,
        conditions: vec![condition(
            &status.conditions,
            "Ready",
            ready,
            phase,
            message,
            vol.meta().generation,
        )],
    };
    let unchanged = status.phase == wanted.phase
        && status.path == wanted.path
        && status.capacity == wanted.capacity
        && status.allocation == wanted.allocation
        && status.observed_generation == wanted.observed_generation
        && same(
            &status
                .conditions
                .iter()
                .filter(|c| c.type_ == "Ready")
                .cloned()
                .collect::<Vec<_>>(),
            &wanted.conditions,
        );
    if !unchanged {
        k8s::apply_status(&api, &vol.name_any(), &ctx.manager, &wanted).await?;
    }
    Ok(if ready {
        Action::requeue(ctx.config.resync)
    } else {
        Action::requeue(std::time::Duration::from_secs(2))
    })
}
