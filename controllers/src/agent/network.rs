//! Networks whose nodeSelector matches this node: defined and started
//! here, torn down when deleted or no longer selected.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use vireo_crds::Network;
use vireo_crds::labels::{IN_USE_FINALIZER, node_finalizer};
use vireo_drivers::Error as DriverError;

use super::{Ctx, drain, error_policy, instrumented, released_here, wanted_here};
use crate::error::Result;
use crate::k8s;

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let api: Api<Network> = Api::all(ctx.client.clone());
    let stream = k8s::controller(api, watcher::Config::default())
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            |net, ctx: Arc<Ctx>| async move {
                let key = format!("network/{}", net.name_any());
                instrumented(&ctx, "agent-network", key, reconcile(net, &ctx)).await
            },
            |net, _err, ctx: Arc<Ctx>| error_policy(&ctx, &format!("network/{}", net.name_any())),
            ctx.clone(),
        );
    drain(stream).await;
}

async fn reconcile(net: Arc<Network>, ctx: &Ctx) -> Result<Action> {
    let api: Api<Network> = Api::all(ctx.client.clone());
    let name = net.name_any();
    let finalizer = node_finalizer(&ctx.config.node_name);
    let mine = net.finalizers().contains(&finalizer);
    // Deleted, but Domains still use it (the operator's finalizer): a node
    // that has it keeps it up (started again after a reboot, say) until
    // they are gone; a node that has not does not take it up now.
    let held = net.meta().deletion_timestamp.is_some()
        && net.finalizers().iter().any(|f| f == IN_USE_FINALIZER);
    if held && !mine {
        return Ok(Action::await_change());
    }
    let wanted = if held {
        ctx.selects_me(net.spec.node_selector.as_ref()) && net.spec.active.unwrap_or(true)
    } else {
        wanted_here(
            ctx,
            net.meta(),
            net.spec.node_selector.as_ref(),
            net.spec.active,
        )
    };
    if !wanted {
        if mine {
            let n = name.clone();
            ctx.drive(move |c| {
                let nd = c.network();
                match nd.network_info(&n) {
                    Ok(i) if i.active => nd.destroy_network(&n)?,
                    Ok(_) => {}
                    Err(DriverError::NotFound(_)) => return Ok(()),
                    Err(e) => return Err(e),
                }
                match nd.undefine_network(&n) {
                    Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .await?;
            let note = format!("destroyed on node {}", ctx.config.node_name);
            released_here(ctx, &api, net.as_ref(), "TornDown", note).await?;
        }
        return Ok(Action::await_change());
    }
    if !held {
        k8s::add_finalizer(&api, net.as_ref(), &finalizer).await?;
    }
    let def = Network::new(&name, net.spec.clone());
    let n = name.clone();
    let info = ctx
        .drive(move |c| {
            let nd = c.network();
            let current = match nd.network_definition(&n, true) {
                Ok(cur) => Some(cur),
                Err(DriverError::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            let mut want = def.clone();
            // The driver fills in what the spec leaves open (UUID, bridge name).
            if let Some(cur) = &current {
                want.spec.uuid = want.spec.uuid.or(cur.spec.uuid.clone());
                want.spec.bridge = want.spec.bridge.or(cur.spec.bridge.clone());
            }
            if current.as_ref().is_none_or(|cur| cur.spec != want.spec) {
                nd.define_network(&want)?;
            }
            if !nd.network_info(&n)?.active {
                nd.start_network(&n)?;
            }
            nd.network_info(&n)
        })
        .await?;
    let entry = json!({"nodes": [{
        "nodeName": ctx.config.node_name,
        "active": info.active,
        "bridge": info.bridge,
    }]});
    let already = net.status.as_ref().is_some_and(|s| {
        s.nodes.iter().any(|e| {
            e.node_name == ctx.config.node_name
                && e.active == info.active
                && e.bridge == info.bridge
        })
    });
    if !already {
        k8s::apply_status(&api, &name, &ctx.manager, &entry).await?;
        k8s::event(
            &ctx.recorder,
            net.as_ref(),
            EventType::Normal,
            "Started",
            "Start",
            format!(
                "active on node {} (bridge {})",
                ctx.config.node_name,
                info.bridge.unwrap_or_default()
            ),
        )
        .await;
    }
    Ok(Action::requeue(ctx.config.resync))
}
