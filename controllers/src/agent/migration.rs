//! The steps of live migrations that involve this node, as libvirt's v3
//! protocol orders them, each carried out by the agent of the node it
//! concerns and recorded in the DomainMigration's status (phase and a
//! condition per step) with Events on it and on the Domain:
//!
//! | phase          | who    | driver call                   | next phase     |
//! |----------------|--------|-------------------------------|----------------|
//! | `Preparing`    | target | `migrate_prepare` → incoming  | `Transferring` (or `Failed`) |
//! | `Transferring` | source | `migrate_perform` → stats     | `Finishing`    |
//! | `Finishing`    | target | `migrate_finish(transferred)` | `Confirming`   |
//! | `Confirming`   | source | `migrate_confirm(finished)`   | (operator) `Succeeded`, or `Failed` |
//!
//! Volumes that live on the source (node-local StorageVols) move with the
//! guest: before prepare the target makes each one blank in the same pool
//! (same format, same capacity) for the driver's disk copy to fill; when
//! the migration fails the target removes those copies, and once it has
//! succeeded (the operator moved the volumes' binding) the source removes
//! its own (phase `Succeeded`, the source's last step).
//!
//! Deleting a DomainMigration in flight cancels it (the operator's
//! finalizer holds the object until it ends): before the state is sent the
//! remaining steps fail it; while it is sent the source aborts the send
//! (`abort_job`, libvirt's `domjobabort`); after that it completes.
//!
//! The source is paused by perform before the target resumes in finish, so
//! the guest never runs on both; any failure before finish resumed it ends
//! with the source's copy running again (confirm with `false`). Meanwhile
//! the Domain's own reconcile on the source leaves it alone (the
//! operator's `vireo.dev/migration` mark), and the target's does not see it
//! until the operator moves the binding.

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use vireo_crds::labels::{NODE, node_key};
use vireo_crds::quantity::{parse_quantity, parse_str};
use vireo_crds::{Domain, DomainMigration, Host, MigrationPhase, StorageVol, StorageVolSpec};
use vireo_drivers::Error as DriverError;
use vireo_drivers::migration::MigrationParams;

use super::{Ctx, drain, error_policy, instrumented};
use crate::error::{Error, Result};
use crate::k8s;
use crate::migration::{
    downtime_until_now, events, fail, first_failure, incoming_from_api, incoming_to_api, phase,
    set_condition, stats_to_api, step_ok, update_in_phase,
};

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let api: Api<DomainMigration> = Api::all(ctx.client.clone());
    let stream = k8s::controller(api, watcher::Config::default()).run(
        |m, ctx: Arc<Ctx>| async move {
            let key = format!(
                "migration:{}/{}",
                m.namespace().unwrap_or_default(),
                m.name_any()
            );
            instrumented(&ctx, "agent-migration", key, reconcile(m, &ctx)).await
        },
        |m, _err, ctx: Arc<Ctx>| {
            error_policy(
                &ctx,
                &format!(
                    "migration:{}/{}",
                    m.namespace().unwrap_or_default(),
                    m.name_any()
                ),
            )
        },
        ctx.clone(),
    );
    drain(stream).await;
}

/// Which side of a migration this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

/// The step this node owes a migration in this phase, if any.
fn my_step(phase: MigrationPhase, side: Side, confirmed: Option<bool>) -> Option<MigrationPhase> {
    match (phase, side) {
        (MigrationPhase::Preparing, Side::Target)
        | (MigrationPhase::Transferring, Side::Source)
        | (MigrationPhase::Finishing, Side::Target) => Some(phase),
        (MigrationPhase::Confirming, Side::Source) if confirmed.is_none() => Some(phase),
        // The source's copies of the volumes that moved go.
        (MigrationPhase::Succeeded, Side::Source) => Some(phase),
        _ => None,
    }
}

async fn reconcile(m: Arc<DomainMigration>, ctx: &Arc<Ctx>) -> Result<Action> {
    // Deleted in flight: cancelled (see the module's notes).
    let deleting = m.meta().deletion_timestamp.is_some();
    let status = m.status.clone().unwrap_or_default();
    let me = ctx.config.node_name.as_str();
    let side = if status.target_node.as_deref() == Some(me) {
        Side::Target
    } else if status.source_node.as_deref() == Some(me) {
        Side::Source
    } else {
        return Ok(Action::await_change());
    };
    let Some(step) = my_step(phase(&m), side, step_ok(&status, "Confirmed")) else {
        return Ok(Action::await_change());
    };
    let ns = m.namespace().unwrap_or_default();
    let api: Api<DomainMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let domains: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    let dom = domains.get_opt(&m.spec.domain_name).await?;
    let source = status.source_node.clone().unwrap_or_default();
    let target = status.target_node.clone().unwrap_or_default();
    let key = node_key(&ns, &m.spec.domain_name);
    let Some(dom) = dom else {
        if step == MigrationPhase::Preparing {
            let why = format!("Domain '{}' was deleted", m.spec.domain_name);
            update_in_phase(&api, &m, |s| fail(s, "Prepared", "DomainNotFound", &why)).await?;
        }
        return Ok(Action::await_change());
    };
    let ty = dom.spec.domain_type;
    match step {
        MigrationPhase::Preparing if deleting => {
            let why = format!(
                "the DomainMigration was deleted before host {target} prepared; the guest keeps running on host {source}"
            );
            update_in_phase(&api, &m, |s| fail(s, "Prepared", "Cancelled", &why)).await?;
            events(
                &ctx.recorder,
                &m,
                Some(&dom),
                EventType::Warning,
                "MigrationCancelled",
                why,
            )
            .await;
        }
        MigrationPhase::Preparing => {
            let moving = moving_volumes(ctx, &ns, &dom, &source).await?;
            let made = make_copies(ctx, &ns, &moving).await;
            let params = params(ctx, &m, &dom, &target).await;
            let uuid = dom
                .spec
                .uuid
                .clone()
                .unwrap_or_else(|| dom.uid().unwrap_or_default());
            let prepared = match (
                made,
                super::domain::node_definition(ctx, &dom, &uuid).await,
                params,
            ) {
                (Err(why), _, _) | (_, Err(why), _) => Err(why),
                (_, _, Err(e)) => Err(e.to_string()),
                (Ok(_), Ok(def), Ok(params)) => ctx
                    .drive_domain(ty, move |c| c.hypervisor().migrate_prepare(&def, &params))
                    .await
                    .map_err(|e| e.to_string()),
            };
            match prepared {
                Ok(incoming) => {
                    let note = format!("host {target} is ready for the state at {}", incoming.uri);
                    update_in_phase(&api, &m, |s| {
                        s.phase = Some(MigrationPhase::Transferring);
                        s.incoming = Some(incoming_to_api(&incoming));
                        set_condition(s, "Prepared", true, "Prepared", note.clone());
                    })
                    .await?;
                    tracing::info!(domain = %key, "migration prepared: {note}");
                    events(
                        &ctx.recorder,
                        &m,
                        Some(&dom),
                        EventType::Normal,
                        "MigrationPrepared",
                        note,
                    )
                    .await;
                }
                Err(e) => {
                    drop_copies(ctx, &ns, &moving).await;
                    let why = format!(
                        "preparing on host {target} failed: {e}; the guest keeps running on host {source}"
                    );
                    update_in_phase(&api, &m, |s| fail(s, "Prepared", "PrepareFailed", &why))
                        .await?;
                    tracing::warn!(domain = %key, "{why}");
                    events(
                        &ctx.recorder,
                        &m,
                        Some(&dom),
                        EventType::Warning,
                        "MigrationFailed",
                        why,
                    )
                    .await;
                }
            }
        }
        MigrationPhase::Transferring => {
            let params = params(ctx, &m, &dom, &target).await;
            let incoming = status
                .incoming
                .as_ref()
                .ok_or_else(|| "status.incoming is missing".to_string())
                .and_then(incoming_from_api)
                .and_then(|i| params.map(|p| (i, p)).map_err(|e| e.to_string()));
            let k = key.clone();
            let performed = match incoming {
                _ if deleting => Err(CANCELLED.to_string()),
                Err(why) => Err(why),
                Ok((incoming, params)) => {
                    // A deletion while it is sent aborts the send.
                    let watch = tokio::spawn(abort_when_deleted(
                        ctx.clone(),
                        api.clone(),
                        m.name_any(),
                        ty,
                        key.clone(),
                    ));
                    let sent = ctx
                        .drive_domain(ty, move |c| {
                            c.hypervisor().migrate_perform(&k, &incoming, &params)
                        })
                        .await
                        .map_err(|e| e.to_string());
                    watch.abort();
                    sent
                }
            };
            let (ok, reason, note) = match &performed {
                Ok(stats) => (
                    true,
                    "Transferred",
                    format!(
                        "state sent to host {target} in {} ms ({} MiB of memory, {} MiB of disks); the source is paused",
                        stats.total_ms,
                        stats.memory_bytes >> 20,
                        stats.disk_bytes >> 20
                    ),
                ),
                Err(e) => (
                    false,
                    "TransferFailed",
                    format!("sending the state to host {target} failed: {e}"),
                ),
            };
            update_in_phase(&api, &m, |s| {
                s.phase = Some(MigrationPhase::Finishing);
                if let Ok(stats) = &performed {
                    s.stats = Some(stats_to_api(stats));
                }
                set_condition(s, "Transferred", ok, reason, note.clone());
            })
            .await?;
            let t = if ok {
                EventType::Normal
            } else {
                EventType::Warning
            };
            tracing::info!(domain = %key, ok, "migration transfer: {note}");
            events(
                &ctx.recorder,
                &m,
                Some(&dom),
                t,
                &format!("Migration{reason}"),
                note,
            )
            .await;
        }
        MigrationPhase::Finishing => {
            let transferred = step_ok(&status, "Transferred") == Some(true);
            let k = key.clone();
            let finished = ctx
                .drive_domain(ty, move |c| {
                    let hv = c.hypervisor();
                    match hv.migrate_finish(&k, transferred) {
                        Ok(r) => Ok(Ok(r)),
                        // Resuming here failed: what prepare made goes, and
                        // the source resumes (confirm with false).
                        Err(e) if transferred => {
                            let _ = hv.migrate_finish(&k, false);
                            Ok(Err(e.to_string()))
                        }
                        Err(e) => Ok(Err(e.to_string())),
                    }
                })
                .await?;
            if finished.is_err() || !transferred {
                let moving = moving_volumes(ctx, &ns, &dom, &source).await?;
                drop_copies(ctx, &ns, &moving).await;
            }
            let (ok, reason, note) = match (&finished, transferred) {
                (Ok(_), true) => (true, "Resumed", format!("the guest runs on host {target}")),
                (Ok(_), false) => (
                    false,
                    "Cancelled",
                    format!("the transfer failed; what host {target} prepared is removed"),
                ),
                (Err(e), _) => (
                    false,
                    "FinishFailed",
                    format!("resuming on host {target} failed: {e}"),
                ),
            };
            update_in_phase(&api, &m, |s| {
                s.phase = Some(MigrationPhase::Confirming);
                if ok && let Some(stats) = s.stats.as_mut() {
                    stats.downtime_ms = downtime_until_now(stats);
                }
                set_condition(s, "Finished", ok, reason, note.clone());
            })
            .await?;
            let t = if ok {
                EventType::Normal
            } else {
                EventType::Warning
            };
            tracing::info!(domain = %key, ok, "migration finish: {note}");
            events(
                &ctx.recorder,
                &m,
                Some(&dom),
                t,
                &format!("Migration{reason}"),
                note,
            )
            .await;
        }
        MigrationPhase::Confirming => {
            let finished = step_ok(&status, "Finished") == Some(true);
            let k = key.clone();
            let confirmed = ctx
                .drive_domain(ty, move |c| c.hypervisor().migrate_confirm(&k, finished))
                .await;
            if finished {
                // The guest runs on the target whatever happens here: a
                // copy left on the source is said, and the binding moves.
                let note = match &confirmed {
                    Ok(()) => format!("the source's copy on host {source} is removed"),
                    Err(e) => format!(
                        "removing the source's copy on host {source} failed ({e}); the guest runs on host {target}"
                    ),
                };
                update_in_phase(&api, &m, |s| {
                    set_condition(s, "Confirmed", true, "SourceRemoved", note.clone());
                })
                .await?;
                let t = if confirmed.is_ok() {
                    EventType::Normal
                } else {
                    EventType::Warning
                };
                events(&ctx.recorder, &m, Some(&dom), t, "MigrationConfirmed", note).await;
            } else {
                let cause =
                    first_failure(&status).unwrap_or_else(|| "the migration was cancelled".into());
                let why = match &confirmed {
                    Ok(()) => format!("{cause}; the guest keeps running on host {source}"),
                    Err(e) => {
                        format!("{cause}; resuming the guest on host {source} failed too: {e}")
                    }
                };
                update_in_phase(&api, &m, |s| fail(s, "Confirmed", "Cancelled", &why)).await?;
                tracing::warn!(domain = %key, "migration failed: {why}");
                events(
                    &ctx.recorder,
                    &m,
                    Some(&dom),
                    EventType::Warning,
                    "MigrationFailed",
                    why,
                )
                .await;
            }
        }
        MigrationPhase::Succeeded => {
            let moved = moved_volumes(ctx, &ns, &dom).await?;
            for vol in moved {
                let file = super::volume::file_name(&ns, &vol.name_any());
                let pool = vol.spec.pool.clone();
                let (p, f) = (pool.clone(), file.clone());
                let removed = ctx
                    .drive(move |c| {
                        let storage = c.storage();
                        match storage.volume_info(&p, &f) {
                            Ok(_) => storage.delete_volume(&p, &f).map(|()| true),
                            Err(DriverError::NotFound(_)) => Ok(false),
                            Err(e) => Err(e),
                        }
                    })
                    .await;
                match removed {
                    Ok(false) => {}
                    Ok(true) => {
                        let note = format!(
                            "the copy of volume {} left in pool {pool} on host {source} is removed (it lives on host {target} now)",
                            vol.name_any()
                        );
                        tracing::info!(domain = %key, "{note}");
                        events(
                            &ctx.recorder,
                            &m,
                            None,
                            EventType::Normal,
                            "SourceVolumeRemoved",
                            note,
                        )
                        .await;
                    }
                    Err(e) => {
                        tracing::warn!(domain = %key, volume = %file, error = %e, "removing the source's copy of a migrated volume");
                        return Err(e);
                    }
                }
            }
        }
        _ => {}
    }
    Ok(Action::await_change())
}

/// Why a transfer did not start: the DomainMigration was deleted first.
const CANCELLED: &str = "the DomainMigration was deleted before the state was sent";

/// While the state is sent: aborts the send (`abort_job`) once the
/// DomainMigration is being deleted. Ends when the caller drops it.
async fn abort_when_deleted(
    ctx: Arc<Ctx>,
    api: Api<DomainMigration>,
    name: String,
    ty: vireo_crds::DomainType,
    key: String,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let deleting = match api.get_opt(&name).await {
            Ok(Some(m)) => m.meta().deletion_timestamp.is_some(),
            Ok(None) => true,
            Err(_) => false,
        };
        if deleting {
            let k = key.clone();
            match ctx
                .drive_domain(ty, move |c| c.hypervisor().abort_job(&k))
                .await
            {
                Ok(()) => {
                    tracing::info!(domain = %key, "DomainMigration {name} deleted while the state was sent: aborted");
                    return;
                }
                // Not sending yet (or any more): asked again shortly.
                Err(e) => tracing::debug!(domain = %key, error = %e, "abort not taken"),
            }
        }
    }
}

/// The Domain's StorageVols whose node binding (`vireo.dev/node`) `keep`
/// accepts, each once.
async fn domain_volumes(
    ctx: &Ctx,
    ns: &str,
    dom: &Domain,
    keep: impl Fn(Option<&str>) -> bool,
) -> Result<Vec<StorageVol>> {
    let api: Api<StorageVol> = Api::namespaced(ctx.client.clone(), ns);
    let mut out: Vec<StorageVol> = Vec::new();
    for (_, name) in dom.spec.volume_refs() {
        if out.iter().any(|v| v.name_any() == name) {
            continue;
        }
        if let Some(v) = api.get_opt(name).await?
            && keep(v.labels().get(NODE).map(String::as_str))
        {
            out.push(v);
        }
    }
    Ok(out)
}

/// The volumes that move with the guest: those still bound to the source.
async fn moving_volumes(
    ctx: &Ctx,
    ns: &str,
    dom: &Domain,
    source: &str,
) -> Result<Vec<StorageVol>> {
    domain_volumes(ctx, ns, dom, |node| node == Some(source)).await
}

/// On the source after success: the Domain's volumes now bound elsewhere
/// (never one bound here again, as by a migration back).
async fn moved_volumes(ctx: &Ctx, ns: &str, dom: &Domain) -> Result<Vec<StorageVol>> {
    let me = ctx.config.node_name.as_str();
    domain_volumes(ctx, ns, dom, |node| node.is_some_and(|n| n != me)).await
}

/// A blank volume of the same pool, format and capacity as `vol`, named as
/// its file on this node: what the driver's disk copy fills.
fn blank_copy(ns: &str, vol: &StorageVol) -> std::result::Result<StorageVol, String> {
    let name = vol.name_any();
    let spec_bytes = parse_quantity(&vol.spec.capacity)
        .map_err(|e| format!("StorageVol {name}: spec.capacity: {e}"))?;
    // A volume filled from an image can be larger than its spec says.
    let status_bytes = vol
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|q| parse_str(&q.0).ok())
        .unwrap_or(0);
    let bytes = spec_bytes.max(status_bytes);
    Ok(StorageVol::new(
        &super::volume::file_name(ns, &name),
        StorageVolSpec {
            pool: vol.spec.pool.clone(),
            capacity: vireo_crds::quantity::format_bytes(bytes),
            allocation: None,
            format: vol.spec.format,
            source: None,
            node_name: None,
        },
    ))
}

/// Target, before prepare: makes each moving volume here, blank, unless a
/// file of that name is there already. Errors say which volume and why.
async fn make_copies(ctx: &Ctx, ns: &str, vols: &[StorageVol]) -> std::result::Result<(), String> {
    for vol in vols {
        let want = blank_copy(ns, vol)?;
        let (name, pool) = (vol.name_any(), vol.spec.pool.clone());
        ctx.drive(move |c| {
            let storage = c.storage();
            let file = want.name_any();
            match storage.volume_info(&want.spec.pool, &file) {
                Ok(_) => Ok(()),
                Err(DriverError::NotFound(_)) => storage.create_volume(&want).map(|_| ()),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| {
            format!(
                "making volume {name} in pool {pool} on host {} for its copy: {e}",
                ctx.config.node_name
            )
        })?;
    }
    Ok(())
}

/// Target, after a failure: removes the copies of volumes still bound to
/// the source (their data is there; what is here is half a copy).
async fn drop_copies(ctx: &Ctx, ns: &str, vols: &[StorageVol]) {
    for vol in vols {
        let file = super::volume::file_name(ns, &vol.name_any());
        let (p, f) = (vol.spec.pool.clone(), file.clone());
        let removed = ctx
            .drive(move |c| match c.storage().delete_volume(&p, &f) {
                Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            })
            .await;
        if let Err(e) = removed {
            tracing::warn!(volume = %file, error = %e, "removing a failed migration's volume copy");
        }
    }
}

/// The driver's parameters: the target's migration address (from its
/// Host), whether disks are copied (a Domain's volumes live on its node),
/// and the spec's limits.
async fn params(
    ctx: &Ctx,
    m: &DomainMigration,
    dom: &Domain,
    target: &str,
) -> Result<MigrationParams> {
    let address = if target == ctx.config.node_name {
        super::host::migration_address(ctx).map(|a| a.to_string())
    } else {
        let hosts: Api<Host> = Api::all(ctx.client.clone());
        hosts
            .get_opt(target)
            .await?
            .and_then(|h| h.status.and_then(|s| s.migration_address))
    };
    let target_address = address.ok_or_else(|| {
        Error::Invalid(format!(
            "host {target} has no migration address (status.migrationAddress; the agent's --migration-address)"
        ))
    })?;
    Ok(MigrationParams {
        target_address,
        copy_storage: !dom.spec.volume_refs().is_empty(),
        max_downtime_ms: m.spec.max_downtime_ms,
        bandwidth_mib_s: m.spec.bandwidth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationPhase::*;

    #[test]
    fn each_step_is_one_sides() {
        assert_eq!(my_step(Preparing, Side::Target, None), Some(Preparing));
        assert_eq!(my_step(Preparing, Side::Source, None), None);
        assert_eq!(
            my_step(Transferring, Side::Source, None),
            Some(Transferring)
        );
        assert_eq!(my_step(Transferring, Side::Target, None), None);
        assert_eq!(my_step(Finishing, Side::Target, None), Some(Finishing));
        assert_eq!(my_step(Confirming, Side::Source, None), Some(Confirming));
        assert_eq!(my_step(Confirming, Side::Source, Some(true)), None, "once");
        for p in [Pending, Scheduling, Failed] {
            assert_eq!(my_step(p, Side::Source, None), None);
            assert_eq!(my_step(p, Side::Target, None), None);
        }
        // After success only the source has something left: its copies.
        assert_eq!(my_step(Succeeded, Side::Source, None), Some(Succeeded));
        assert_eq!(my_step(Succeeded, Side::Target, None), None);
    }

    fn vol(v: serde_json::Value) -> StorageVol {
        serde_json::from_value(v).expect("a StorageVol")
    }

    #[test]
    fn a_copy_is_blank_with_the_same_pool_format_and_the_larger_capacity() {
        let v = vol(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1", "kind": "StorageVol",
            "metadata": {"name": "data", "namespace": "ns"},
            "spec": {"pool": "images", "capacity": "64Mi", "format": "qcow2",
                     "source": {"url": {"url": "http://x/y.img"}}},
            "status": {"capacity": "2Gi"}
        }));
        let c = blank_copy("ns", &v).expect("a copy");
        assert_eq!(c.name_any(), "ns.data", "named as its file on the node");
        assert_eq!(c.spec.pool, "images");
        assert_eq!(c.spec.format, vireo_crds::VolFormat::Qcow2);
        assert!(c.spec.source.is_none(), "blank: the copy fills it");
        assert_eq!(parse_quantity(&c.spec.capacity).ok(), Some(2 << 30));
        let small = vol(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1", "kind": "StorageVol",
            "metadata": {"name": "d"},
            "spec": {"pool": "p", "capacity": "1Gi"}
        }));
        let c = blank_copy("ns", &small).expect("a copy");
        assert_eq!(parse_quantity(&c.spec.capacity).ok(), Some(1 << 30));
        assert_eq!(c.spec.format, vireo_crds::VolFormat::Raw);
    }
}
