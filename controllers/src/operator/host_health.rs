//! Host health from the agents' heartbeat Leases, as the node lifecycle
//! controller does it for kubelets: a Host whose Lease is not renewed within
//! its duration (plus a grace) goes `Ready: False`; its Domains then show
//! state `unknown` (the Domain controller does that), and none is started
//! elsewhere while the old Host may still run it.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use vireo_crds::labels::OPERATOR_MANAGER;
use vireo_crds::{Host, HostStatus};

use super::Ctx;
use crate::conditions::{find, status_condition};
use crate::k8s;

pub async fn run(ctx: Arc<Ctx>) {
    let api: Api<Host> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(ctx.config.host_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        for host in ctx.hosts.state() {
            let name = host.name_any();
            let lease = ctx
                .leases
                .get(&ObjectRef::new(&name).within(vireo_crds::labels::SYSTEM_NAMESPACE));
            let (status, reason, message) = match lease.as_ref().and_then(|l| l.spec.as_ref()) {
                None => (
                    "Unknown",
                    "NoHeartbeat",
                    "the agent has not renewed a Lease yet".to_string(),
                ),
                Some(spec) => {
                    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(40));
                    let grace = i64::try_from(ctx.config.host_grace.as_secs()).unwrap_or(0);
                    match &spec.renew_time {
                        Some(t) => {
                            let age = now.as_second() - t.0.as_second();
                            if age <= duration + grace {
                                (
                                    "True",
                                    "HeartbeatFresh",
                                    format!("Lease renewed {age}s ago"),
                                )
                            } else {
                                (
                                    "False",
                                    "HeartbeatLost",
                                    format!("Lease not renewed for {age}s (duration {duration}s)"),
                                )
                            }
                        }
                        None => (
                            "Unknown",
                            "NoHeartbeat",
                            "the Lease has no renew time".to_string(),
                        ),
                    }
                }
            };
            let prev = host
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let current = find(&prev, "Ready");
            // Re-apply only on a change of status or reason: renewals are not news.
            if current.is_some_and(|c| c.status == status && c.reason == reason) {
                continue;
            }
            let cond = status_condition(&prev, "Ready", status, reason, message.clone(), None);
            let wanted = HostStatus {
                conditions: vec![cond],
                ..HostStatus::default()
            };
            if let Err(e) = k8s::apply_status(&api, &name, OPERATOR_MANAGER, &wanted).await {
                tracing::warn!(host = %name, error = %e, "cannot update Host readiness");
                continue;
            }
            let (t, r) = if status == "True" {
                (EventType::Normal, "HostReady")
            } else {
                (EventType::Warning, "HostNotReady")
            };
            tracing::info!(host = %name, status, reason, "host readiness changed");
            k8s::event(&ctx.recorder, host.as_ref(), t, r, "Heartbeat", message).await;
        }
    }
}
