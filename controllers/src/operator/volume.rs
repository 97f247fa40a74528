//! StorageVols: bound at once when `spec.nodeName` names a node (otherwise
//! with the first Domain that uses them), and protected from deletion while
//! a Domain uses them, as a PVC is.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use vireo_crds::labels::{IN_USE_FINALIZER, NODE};
use vireo_crds::{Domain, StorageVol};

use super::Ctx;
use crate::error::Result;
use crate::k8s;

pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    k8s::controller(Api::<StorageVol>::all(client), watcher::Config::default())
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            |vol, ctx: Arc<Ctx>| async move {
                let started = std::time::Instant::now();
                let r = reconcile(vol, &ctx).await;
                ctx.metrics
                    .reconciled("storagevol", started, r.as_ref().err().map(|e| e.label()));
                r
            },
            |_vol, _err, _ctx| Action::requeue(Duration::from_secs(2)),
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

async fn reconcile(vol: Arc<StorageVol>, ctx: &Ctx) -> Result<Action> {
    let ns = vol.namespace().unwrap_or_default();
    let name = vol.name_any();
    let api: Api<StorageVol> = Api::namespaced(ctx.client.clone(), &ns);
    if vol.meta().deletion_timestamp.is_some() {
        let users: Vec<String> = Api::<Domain>::namespaced(ctx.client.clone(), &ns)
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|d| d.spec.uses_volume(&name))
            .map(|d| d.name_any())
            .collect();
        if users.is_empty() {
            k8s::remove_finalizer(&api, vol.as_ref(), IN_USE_FINALIZER).await?;
            return Ok(Action::await_change());
        }
        k8s::event(
            &ctx.recorder,
            vol.as_ref(),
            EventType::Warning,
            "InUse",
            "Delete",
            format!("deletion waits: used by domain(s) {}", users.join(", ")),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(3)));
    }
    k8s::add_finalizer(&api, vol.as_ref(), IN_USE_FINALIZER).await?;
    if let (Some(node), None) = (&vol.spec.node_name, vol.labels().get(NODE)) {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {NODE: node}}})),
        )
        .await?;
        k8s::event(
            &ctx.recorder,
            vol.as_ref(),
            EventType::Normal,
            "Scheduled",
            "Bind",
            format!("bound to host {node} (spec.nodeName)"),
        )
        .await;
    }
    Ok(Action::await_change())
}
