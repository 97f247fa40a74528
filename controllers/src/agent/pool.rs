//! StoragePools whose nodeSelector matches this node: defined, built and
//! started here; stopped and undefined (their files kept, as libvirt's
//! pool-undefine keeps them) when deleted or no longer selected.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::{Action, Config};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use vireo_crds::labels::NODE;
use vireo_crds::labels::node_finalizer;
use vireo_crds::quantity::format_bytes;
use vireo_crds::{StoragePool, StorageVol};
use vireo_drivers::{Error as DriverError, PoolState};

use super::{Ctx, drain, error_policy, instrumented, released_here, wanted_here};
use crate::error::Result;
use crate::k8s;

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let api: Api<StoragePool> = Api::all(ctx.client.clone());
    // A volume created or deleted here changes its pool's allocation here.
    let vols: Api<StorageVol> = Api::all(ctx.client.clone());
    let selector = format!("{NODE}={}", ctx.config.node_name);
    let stream = k8s::controller(api, watcher::Config::default())
        .watches(vols, watcher::Config::default().labels(&selector), |vol| {
            Some(ObjectRef::new(&vol.spec.pool))
        })
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            |pool, ctx: Arc<Ctx>| async move {
                let key = format!("pool/{}", pool.name_any());
                instrumented(&ctx, "agent-pool", key, reconcile(pool, &ctx)).await
            },
            |pool, _err, ctx: Arc<Ctx>| error_policy(&ctx, &format!("pool/{}", pool.name_any())),
            ctx.clone(),
        );
    drain(stream).await;
}

async fn reconcile(pool: Arc<StoragePool>, ctx: &Ctx) -> Result<Action> {
    let api: Api<StoragePool> = Api::all(ctx.client.clone());
    let name = pool.name_any();
    let finalizer = node_finalizer(&ctx.config.node_name);
    let mine = pool.finalizers().contains(&finalizer);
    if !wanted_here(
        ctx,
        pool.meta(),
        pool.spec.node_selector.as_ref(),
        pool.spec.active,
    ) {
        if mine {
            let n = name.clone();
            ctx.drive(move |c| {
                let st = c.storage();
                match st.pool_info(&n) {
                    Ok(i) if i.state != PoolState::Inactive => st.destroy_pool(&n)?,
                    Ok(_) => {}
                    Err(DriverError::NotFound(_)) => return Ok(()),
                    Err(e) => return Err(e),
                }
                match st.undefine_pool(&n) {
                    Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .await?;
            let note = format!("stopped and undefined on node {}", ctx.config.node_name);
            released_here(ctx, &api, pool.as_ref(), "Stopped", note).await?;
        }
        return Ok(Action::await_change());
    }
    k8s::add_finalizer(&api, pool.as_ref(), &finalizer).await?;
    let mut def = StoragePool::new(&name, pool.spec.clone());
    def.metadata.annotations = pool.metadata.annotations.clone();
    let n = name.clone();
    let info = ctx
        .drive(move |c| {
            let st = c.storage();
            let current = match st.pool_definition(&n) {
                Ok(cur) => Some(cur),
                Err(DriverError::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            let mut want = def.clone();
            if let Some(cur) = &current {
                want.spec.uuid = want.spec.uuid.or(cur.spec.uuid.clone());
            }
            if current.as_ref().is_none_or(|cur| cur.spec != want.spec) {
                st.define_pool(&want)?;
            }
            if st.pool_info(&n)?.state == PoolState::Inactive {
                st.build_pool(&n)?;
                st.start_pool(&n)?;
            }
            st.pool_info(&n)
        })
        .await?;
    let state = info.state.to_string();
    // Sizes in whole MiB: the filesystem under a real pool moves with every
    // write on the node, and status should not churn with it.
    let mib = |b: u64| format_bytes(b >> 20 << 20);
    let entry = json!({"nodes": [{
        "nodeName": ctx.config.node_name,
        "state": state,
        "capacity": mib(info.capacity),
        "allocation": mib(info.allocation),
        "available": mib(info.available),
    }]});
    // Written again when the state changes, or the allocation moved by more
    // than 1% of the capacity since the last report.
    let already = pool.status.as_ref().is_some_and(|s| {
        s.nodes.iter().any(|e| {
            let reported = e
                .allocation
                .as_ref()
                .and_then(|q| vireo_crds::quantity::parse_quantity(q).ok());
            e.node_name == ctx.config.node_name
                && e.state == state
                && reported.is_some_and(|r| r.abs_diff(info.allocation) <= info.capacity / 100)
        })
    });
    if !already {
        k8s::apply_status(&api, &name, &ctx.manager, &entry).await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}
