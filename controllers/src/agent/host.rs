//! The Host this agent registers, and its heartbeat Lease.

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use vireo_crds::labels::{NODE, SYSTEM_NAMESPACE};
use vireo_crds::quantity::format_bytes;
use vireo_crds::{Host, HostStatus, NodeInfo};

use super::Ctx;
use crate::error::Result;

/// This node as the agent offers it: the machine's NodeInfo, with CPUs and
/// memory replaced when configured (simulated nodes).
pub(crate) fn node_info(ctx: &Ctx) -> std::io::Result<NodeInfo> {
    let mut info = vireo_drivers::host::probe_node_info()?;
    if let Some(cpus) = ctx.config.cpus {
        info.cpus = cpus;
        info.sockets = 1;
        info.cores = cpus;
        info.threads = 1;
    }
    if let Some(memory) = ctx.config.memory {
        info.memory_bytes = memory;
    }
    Ok(info)
}

/// Creates or updates the Host object (labels, NodeInfo, drivers, allocatable).
pub(crate) async fn register(ctx: &Ctx) -> Result<()> {
    let info = node_info(ctx).map_err(|e| {
        crate::Error::Invalid(format!("cannot read this node's CPUs and memory: {e}"))
    })?;
    let hosts: Api<Host> = Api::all(ctx.client.clone());
    let name = &ctx.config.node_name;
    let mut labels = ctx.config.labels.clone();
    labels.insert(NODE.to_string(), name.clone());
    let params = PatchParams::apply(&ctx.manager).force();
    let mut body = json!({
        "apiVersion": "vireo.dev/v1alpha1",
        "kind": "Host",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
    });
    // Where the other agents forward this node's consoles and transfers.
    if let Some(address) = ctx
        .config
        .subresources
        .as_ref()
        .and_then(|s| s.advertise.as_ref())
    {
        body["metadata"]["annotations"] =
            json!({ super::subresources::rules::ADDRESS_ANNOTATION: address });
    }
    hosts.patch(name, &params, &Patch::Apply(&body)).await?;
    let drivers = ctx.driver_names();
    let status = HostStatus {
        allocatable_memory: Some(format_bytes(info.memory_bytes)),
        allocatable_vcpus: Some(info.cpus.saturating_mul(ctx.config.cpu_overcommit)),
        driver_list: Some(drivers.join(",")),
        drivers,
        node_info: Some(info),
        heartbeat_time: Some(Time(Timestamp::now())),
        conditions: Vec::new(),
    };
    crate::k8s::apply_status(&hosts, name, &ctx.manager, &status).await
}

/// Renews the node's Lease in `vireo-system` every heartbeat, forever.
pub(crate) async fn heartbeat(ctx: Arc<Ctx>) {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), SYSTEM_NAMESPACE);
    let name = ctx.config.node_name.clone();
    let params = PatchParams::apply(&ctx.manager).force();
    let seconds = i32::try_from(ctx.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let mut tick = tokio::time::interval(ctx.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": seconds,
                "renewTime": MicroTime(Timestamp::now()),
            },
        });
        if let Err(e) = leases.patch(&name, &params, &Patch::Apply(&lease)).await {
            tracing::warn!(error = %e, "cannot renew the heartbeat Lease");
        }
    }
}
