//! `status.activeNodes` of Networks and StoragePools: how many agents
//! report them active, for `kubectl get`.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use serde_json::json;
use vireo_crds::labels::OPERATOR_MANAGER;
use vireo_crds::{Network, StoragePool};

use super::Ctx;
use crate::k8s;

const EVERY: Duration = Duration::from_secs(1);

pub async fn run_networks(ctx: Arc<Ctx>) {
    let api: Api<Network> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        for net in ctx.networks.state() {
            let status = net.status.clone().unwrap_or_default();
            let active =
                u32::try_from(status.nodes.iter().filter(|n| n.active).count()).unwrap_or(u32::MAX);
            if status.active_nodes != Some(active)
                && let Err(e) = k8s::apply_status(
                    &api,
                    &net.name_any(),
                    OPERATOR_MANAGER,
                    &json!({"activeNodes": active}),
                )
                .await
            {
                tracing::warn!(network = %net.name_any(), error = %e, "cannot update activeNodes");
            }
        }
    }
}

pub async fn run_pools(ctx: Arc<Ctx>) {
    let api: Api<StoragePool> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        for pool in ctx.pools.state() {
            let status = pool.status.clone().unwrap_or_default();
            let active =
                u32::try_from(status.nodes.iter().filter(|n| n.state == "running").count())
                    .unwrap_or(u32::MAX);
            if status.active_nodes != Some(active)
                && let Err(e) = k8s::apply_status(
                    &api,
                    &pool.name_any(),
                    OPERATOR_MANAGER,
                    &json!({"activeNodes": active}),
                )
                .await
            {
                tracing::warn!(pool = %pool.name_any(), error = %e, "cannot update activeNodes");
            }
        }
    }
}
