//! DomainSnapshots and DomainRestores of the Domains bound to this node:
//! a snapshot is taken once through the Domain's driver (libvirt's
//! `snapshot-create-as`) and deleted with its object (a finalizer); a
//! restore returns the Domain to a ready snapshot once (`snapshot-revert`).
//! Each step leaves an Event, a condition and a phase.
//!
//! The driver snapshot is named as the object (`metadata.name`); the
//! Domain on the node is `namespace/name`, as the domain reconciler names
//! it. A snapshot is owned by its Domain (an ownerReference the agent
//! adds), so deleting the Domain deletes its DomainSnapshots; the agent's
//! teardown of the Domain deletes the driver snapshots first.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use vireo_crds::labels::{NODE, node_key};
use vireo_crds::{
    Domain, DomainRestore, DomainRestoreStatus, DomainSnapshot, DomainSnapshotStatus,
    SnapshotDiskStatus, SnapshotPhase,
};
use vireo_drivers::Error as DriverError;
use vireo_drivers::snapshot::{RevertTo, SnapshotInfo, SnapshotParams};

use super::{Ctx, drain, error_policy, instrumented};
use crate::conditions::condition;
use crate::error::Result;
use crate::k8s;

/// Held on a DomainSnapshot while its driver snapshot may exist.
pub const SNAPSHOT_FINALIZER: &str = "vireo.dev/snapshot";

/// Runs the snapshot and restore controllers; `domains` names each Domain
/// of this node the Domain controller has just reconciled
/// ([`super::domain::run`]), which wakes that Domain's snapshots.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    domains: futures::channel::mpsc::UnboundedReceiver<ObjectRef<Domain>>,
) {
    let snaps: Api<DomainSnapshot> = Api::all(ctx.client.clone());
    let restores: Api<DomainRestore> = Api::all(ctx.client.clone());
    let config = Config::default().concurrency(ctx.config.concurrency);
    let controller = k8s::controller(snaps, watcher::Config::default());
    let store = controller.store();
    let woken = domains.flat_map(move |d: ObjectRef<Domain>| {
        let refs = store
            .state()
            .into_iter()
            .filter(|s| s.namespace() == d.namespace && s.spec.domain_name == d.name)
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect::<Vec<_>>();
        futures::stream::iter(refs)
    });
    let snapshots = controller
        .reconcile_on(woken)
        .with_config(config.clone())
        .run(
            |s, ctx: Arc<Ctx>| async move {
                let key = format!("snapshot/{}", key_of(s.as_ref()));
                instrumented(&ctx, "agent-snapshot", key, reconcile_snapshot(s, &ctx)).await
            },
            |s, _err, ctx: Arc<Ctx>| {
                error_policy(&ctx, &format!("snapshot/{}", key_of(s.as_ref())))
            },
            ctx.clone(),
        );
    let restores = k8s::controller(restores, watcher::Config::default())
        .with_config(config)
        .run(
            |r, ctx: Arc<Ctx>| async move {
                let key = format!("restore/{}", key_of(r.as_ref()));
                instrumented(&ctx, "agent-restore", key, reconcile_restore(r, &ctx)).await
            },
            |r, _err, ctx: Arc<Ctx>| error_policy(&ctx, &format!("restore/{}", key_of(r.as_ref()))),
            ctx.clone(),
        );
    tokio::join!(drain(snapshots), drain(restores));
}

fn key_of<K: Resource>(obj: &K) -> String {
    node_key(
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default(),
    )
}

/// The Domain `name` of `ns`, if it exists, and whether it is bound to
/// this node.
async fn find_domain(ctx: &Ctx, ns: &str, name: &str) -> Result<Option<(Domain, bool)>> {
    let api: Api<Domain> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api.get_opt(name).await?.map(|d| {
        let mine = d.labels().get(NODE).map(String::as_str) == Some(ctx.config.node_name.as_str());
        (d, mine)
    }))
}

/// The Domain `name` of `ns`, when it is bound to this node.
async fn my_domain(ctx: &Ctx, ns: &str, name: &str) -> Result<Option<Domain>> {
    Ok(find_domain(ctx, ns, name)
        .await?
        .and_then(|(d, mine)| mine.then_some(d)))
}

/// RFC 3339 in UTC, from Unix seconds.
fn rfc3339(secs: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn ready_status(
    previous: &DomainSnapshotStatus,
    generation: Option<i64>,
    node: &str,
    info: &SnapshotInfo,
) -> DomainSnapshotStatus {
    let what = if info.memory {
        "disks and memory"
    } else {
        "disks only"
    };
    DomainSnapshotStatus {
        phase: SnapshotPhase::Ready,
        ready_to_use: true,
        creation_time: Some(rfc3339(info.creation_time)),
        domain_state: Some(info.state.to_string()),
        memory: Some(info.memory),
        disks: info
            .disks
            .iter()
            .map(|d| SnapshotDiskStatus {
                name: d.name.clone(),
                // The node's volume is `namespace.name`: the StorageVol is the name.
                volume: d
                    .volume
                    .split_once('.')
                    .map_or(d.volume.clone(), |(_, v)| v.to_string()),
                location: d.location.clone(),
            })
            .collect(),
        node: Some(node.to_string()),
        parent: info.parent.clone(),
        message: None,
        conditions: vec![condition(
            &previous.conditions,
            "Ready",
            true,
            "Taken",
            format!(
                "taken on node {node} with the domain {}: {what}",
                info.state
            ),
            generation,
        )],
    }
}

async fn reconcile_snapshot(snap: Arc<DomainSnapshot>, ctx: &Ctx) -> Result<Action> {
    let ns = snap.namespace().unwrap_or_default();
    let name = snap.name_any();
    let api: Api<DomainSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let status = snap.status.clone().unwrap_or_default();
    let node = ctx.config.node_name.clone();
    let domain_key = node_key(&ns, &snap.spec.domain_name);
    let found = find_domain(ctx, &ns, &snap.spec.domain_name).await?;
    let gone = found.is_none();
    let domain = found.and_then(|(d, mine)| mine.then_some(d));
    let mine = status.node.as_deref() == Some(node.as_str())
        || (status.node.is_none() && domain.is_some());

    if snap.meta().deletion_timestamp.is_some() {
        if mine && snap.finalizers().iter().any(|f| f == SNAPSHOT_FINALIZER) {
            let ty = domain
                .as_ref()
                .map(|d| d.spec.domain_type)
                .or_else(|| status_domain_type(&status));
            // A snapshot that failed before it was taken holds nothing on
            // the node: a snapshot there of the same name is not this
            // object's, and stays.
            let never_taken =
                status.phase == SnapshotPhase::Failed && status.creation_time.is_none();
            if let Some(ty) = ty.filter(|_| !never_taken) {
                let (k, n) = (domain_key.clone(), name.clone());
                ctx.drive_domain(ty, move |c| match c.hypervisor().snapshot_delete(&k, &n) {
                    Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                })
                .await?;
            }
            k8s::event(
                &ctx.recorder,
                snap.as_ref(),
                EventType::Normal,
                "SnapshotDeleted",
                "Delete",
                format!("snapshot {name} of domain {domain_key} deleted on node {node}"),
            )
            .await;
            k8s::remove_finalizer(&api, snap.as_ref(), SNAPSHOT_FINALIZER).await?;
        }
        return Ok(Action::await_change());
    }
    let Some(domain) = domain else {
        if gone && mine && status.ready_to_use {
            // The agent deleted the driver snapshot with its Domain (the
            // Domain's teardown); the object stays until it is deleted
            // (with an ownerReference, the garbage collector does it).
            let message = format!(
                "Domain {} was deleted, and this snapshot with it on node {node}",
                snap.spec.domain_name
            );
            let wanted = DomainSnapshotStatus {
                phase: SnapshotPhase::Failed,
                ready_to_use: false,
                message: Some(message.clone()),
                conditions: vec![condition(
                    &status.conditions,
                    "Ready",
                    false,
                    "DomainDeleted",
                    message,
                    snap.meta().generation,
                )],
                ..status.clone()
            };
            k8s::apply_status(&api, &name, &ctx.manager, &wanted).await?;
            return Ok(Action::await_change());
        }
        // Another node's, or its Domain is not there (yet): the agent of
        // the Domain's node takes it; an unbound Domain waits.
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    if matches!(status.phase, SnapshotPhase::Ready | SnapshotPhase::Failed)
        || domain.meta().deletion_timestamp.is_some()
    {
        // Done; or its Domain is going (and its snapshots with it).
        return Ok(Action::await_change());
    }
    // The watch cache may lag behind this agent's own status writes: a
    // consistent read says whether the snapshot was taken already.
    let Some(snap) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let status = snap.status.clone().unwrap_or_default();
    if matches!(status.phase, SnapshotPhase::Ready | SnapshotPhase::Failed) {
        return Ok(Action::await_change());
    }
    let snap = Arc::new(snap);
    let generation = snap.meta().generation;
    k8s::add_finalizer(&api, snap.as_ref(), SNAPSHOT_FINALIZER).await?;
    if let Some(uid) = domain.uid() {
        let owned = snap.owner_references().iter().any(|o| o.uid == uid);
        if !owned {
            k8s::patch_json(
                &api,
                &name,
                json!([{"op": "add", "path": "/metadata/ownerReferences", "value": [{
                    "apiVersion": vireo_crds::API_VERSION,
                    "kind": "Domain",
                    "name": domain.name_any(),
                    "uid": uid,
                }]}]),
            )
            .await?;
        }
    }
    let in_progress = DomainSnapshotStatus {
        phase: SnapshotPhase::InProgress,
        node: Some(node.clone()),
        conditions: vec![condition(
            &status.conditions,
            "Ready",
            false,
            "InProgress",
            format!("being taken on node {node}"),
            generation,
        )],
        ..Default::default()
    };
    k8s::apply_status(&api, &name, &ctx.manager, &in_progress).await?;
    let params = SnapshotParams {
        name: Some(name.clone()),
        description: snap.spec.description.clone(),
        disk_only: snap.spec.include_memory == Some(false),
    };
    let (k, n) = (domain_key.clone(), name.clone());
    let taken = ctx
        .drive_domain(domain.spec.domain_type, move |c| {
            let hv = c.hypervisor();
            match hv.snapshot_create(&k, &params) {
                // Taken by an earlier pass whose status write was lost.
                Err(DriverError::AlreadyExists { .. }) => hv.snapshot_get(&k, &n),
                other => other,
            }
        })
        .await;
    let wanted = match taken {
        Ok(info) => {
            let s = ready_status(&in_progress, generation, &node, &info);
            k8s::event(
                &ctx.recorder,
                snap.as_ref(),
                EventType::Normal,
                "SnapshotTaken",
                "Snapshot",
                format!(
                    "snapshot {name} of domain {domain_key} taken on node {node}: {}, {}, disks [{}]",
                    info.state,
                    if info.memory {
                        "with memory"
                    } else {
                        "without memory"
                    },
                    info.disks
                        .iter()
                        .map(|d| format!("{} ({})", d.name, d.location))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .await;
            s
        }
        Err(e) => {
            let message = e.to_string();
            tracing::warn!(snapshot = %key_of(snap.as_ref()), error = %message, "snapshot failed");
            k8s::event(
                &ctx.recorder,
                snap.as_ref(),
                EventType::Warning,
                "SnapshotFailed",
                "Snapshot",
                message.clone(),
            )
            .await;
            DomainSnapshotStatus {
                phase: SnapshotPhase::Failed,
                node: Some(node.clone()),
                message: Some(message.clone()),
                conditions: vec![condition(
                    &in_progress.conditions,
                    "Ready",
                    false,
                    "SnapshotFailed",
                    message,
                    generation,
                )],
                ..Default::default()
            }
        }
    };
    k8s::apply_status(&api, &name, &ctx.manager, &wanted).await?;
    Ok(Action::await_change())
}

/// A snapshot being deleted after its Domain went: its driver is the one
/// the disks' locations name (qcow2 internal: qemu; copies: kvm); the
/// test driver keeps none after its Domain is gone.
fn status_domain_type(status: &DomainSnapshotStatus) -> Option<vireo_crds::DomainType> {
    use vireo_crds::DomainType;
    match status.disks.first().map(|d| d.location.as_str()) {
        Some("copy") => Some(DomainType::Kvm),
        Some("internal") => Some(DomainType::Qemu),
        _ => None,
    }
}

async fn reconcile_restore(restore: Arc<DomainRestore>, ctx: &Ctx) -> Result<Action> {
    let ns = restore.namespace().unwrap_or_default();
    let name = restore.name_any();
    let api: Api<DomainRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let status = restore.status.clone().unwrap_or_default();
    if matches!(status.phase, SnapshotPhase::Ready | SnapshotPhase::Failed)
        || restore.meta().deletion_timestamp.is_some()
    {
        return Ok(Action::await_change());
    }
    let Some(domain) = my_domain(ctx, &ns, &restore.spec.domain_name).await? else {
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    // A restore is done once: a consistent read, not the watch cache,
    // says whether it was.
    let Some(restore) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let status = restore.status.clone().unwrap_or_default();
    if matches!(status.phase, SnapshotPhase::Ready | SnapshotPhase::Failed) {
        return Ok(Action::await_change());
    }
    let restore = Arc::new(restore);
    let generation = restore.meta().generation;
    let node = ctx.config.node_name.clone();
    let domain_key = node_key(&ns, &restore.spec.domain_name);
    let snaps: Api<DomainSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let snap_name = restore.spec.snapshot_name.clone();
    let pending = |message: String| DomainRestoreStatus {
        phase: SnapshotPhase::Pending,
        message: Some(message.clone()),
        conditions: vec![condition(
            &status.conditions,
            "Restored",
            false,
            "WaitingForSnapshot",
            message,
            generation,
        )],
        ..Default::default()
    };
    let failed = |message: String| DomainRestoreStatus {
        phase: SnapshotPhase::Failed,
        message: Some(message.clone()),
        conditions: vec![condition(
            &status.conditions,
            "Restored",
            false,
            "RestoreFailed",
            message,
            generation,
        )],
        ..Default::default()
    };
    let snap = snaps.get_opt(&snap_name).await?;
    let refusal = match &snap {
        None => Some((
            false,
            format!("DomainSnapshot {snap_name} not found in namespace {ns}"),
        )),
        Some(s) if s.spec.domain_name != restore.spec.domain_name => Some((
            true,
            format!(
                "spec.snapshotName: DomainSnapshot {snap_name} is of Domain {}, not {}",
                s.spec.domain_name, restore.spec.domain_name
            ),
        )),
        Some(s) => match s.status.as_ref().map(|x| x.phase) {
            Some(SnapshotPhase::Failed) => Some((
                true,
                format!(
                    "spec.snapshotName: DomainSnapshot {snap_name} failed; it cannot be restored"
                ),
            )),
            Some(SnapshotPhase::Ready) => None,
            _ => Some((
                false,
                format!("DomainSnapshot {snap_name} is not ready yet"),
            )),
        },
    };
    if let Some((terminal, message)) = refusal {
        let wanted = if terminal {
            k8s::event(
                &ctx.recorder,
                restore.as_ref(),
                EventType::Warning,
                "RestoreFailed",
                "Restore",
                message.clone(),
            )
            .await;
            failed(message)
        } else {
            pending(message)
        };
        k8s::apply_status(&api, &name, &ctx.manager, &wanted).await?;
        return Ok(if terminal {
            Action::await_change()
        } else {
            Action::requeue(Duration::from_secs(5))
        });
    }
    let in_progress = DomainRestoreStatus {
        phase: SnapshotPhase::InProgress,
        conditions: vec![condition(
            &status.conditions,
            "Restored",
            false,
            "InProgress",
            format!("returning domain {domain_key} to snapshot {snap_name} on node {node}"),
            generation,
        )],
        ..Default::default()
    };
    k8s::apply_status(&api, &name, &ctx.manager, &in_progress).await?;
    let (k, s) = (domain_key.clone(), snap_name.clone());
    let reverted = ctx
        .drive_domain(domain.spec.domain_type, move |c| {
            let hv = c.hypervisor();
            hv.snapshot_revert(&k, &s, RevertTo::Snapshot)?;
            hv.domain_state(&k)
        })
        .await;
    let wanted = match reverted {
        Ok((state, reason)) => {
            let shown = format!("{state} ({reason})");
            let note = format!(
                "domain {domain_key} returned to snapshot {snap_name} on node {node}: {shown}"
            );
            k8s::event(
                &ctx.recorder,
                restore.as_ref(),
                EventType::Normal,
                "Restored",
                "Restore",
                note.clone(),
            )
            .await;
            k8s::event(
                &ctx.recorder,
                &domain,
                EventType::Normal,
                "SnapshotReverted",
                "Restore",
                note.clone(),
            )
            .await;
            DomainRestoreStatus {
                phase: SnapshotPhase::Ready,
                domain_state: Some(state.to_string()),
                completion_time: Some(k8s_openapi::jiff::Timestamp::now().to_string()),
                message: None,
                conditions: vec![condition(
                    &in_progress.conditions,
                    "Restored",
                    true,
                    "Reverted",
                    note,
                    generation,
                )],
            }
        }
        Err(e) => {
            let message = e.to_string();
            k8s::event(
                &ctx.recorder,
                restore.as_ref(),
                EventType::Warning,
                "RestoreFailed",
                "Restore",
                message.clone(),
            )
            .await;
            failed(message)
        }
    };
    k8s::apply_status(&api, &name, &ctx.manager, &wanted).await?;
    Ok(Action::await_change())
}
