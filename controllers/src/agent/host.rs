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
        migration_address: migration_address(ctx).map(|a| a.to_string()),
        conditions: Vec::new(),
    };
    crate::k8s::apply_status(&hosts, name, &ctx.manager, &status).await
}

/// Where other agents send live migrations to this node: the configured
/// address, or the first non-loopback address of an interface that is up
/// (IPv4 before IPv6).
pub(crate) fn migration_address(ctx: &Ctx) -> Option<std::net::IpAddr> {
    ctx.config.migration_address.or_else(first_address)
}

fn first_address() -> Option<std::net::IpAddr> {
    let mut found: Vec<std::net::IpAddr> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that freeifaddrs releases
    // below; each entry is read only while the list is alive.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return None;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & (libc::IFF_UP as u32) != 0;
            let loopback = ifa.ifa_flags & (libc::IFF_LOOPBACK as u32) != 0;
            if up && !loopback && !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        found.push(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                            u32::from_be(sin.sin_addr.s_addr),
                        )));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        let a = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        // Link-local addresses need a scope: not for peers.
                        if a.segments()[0] & 0xffc0 != 0xfe80 {
                            found.push(std::net::IpAddr::V6(a));
                        }
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    found.sort_by_key(|a| a.is_ipv6());
    found.into_iter().next()
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
