//! StorageVols bound to this node: created in their pool, deleted once no
//! Domain uses them (the operator's in-use finalizer gone).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::Api;
use kube::runtime::controller::{Action, Config};
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

/// A volume fill running on the blocking pool: its progress, and how it
/// ended. The volume appears in its pool only when the fill completed.
#[derive(Default)]
pub struct Fill {
    done: AtomicU64,
    /// 0 while unknown.
    total: AtomicU64,
    ended: Mutex<Option<(Instant, Result<(), DriverError>)>>,
}

impl Fill {
    fn percent(&self) -> u8 {
        let (d, t) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        d.saturating_mul(100)
            .checked_div(t)
            .map_or(0, |p| u8::try_from(p).unwrap_or(100).min(99))
    }
    fn ended(&self) -> Option<(Instant, Result<(), DriverError>)> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The fill of a volume this agent ran or runs, if any.
fn fill_of(ctx: &Ctx, file: &str) -> Option<Arc<Fill>> {
    ctx.fills
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(file)
        .cloned()
}

/// Forgets a volume's fill (it ended and was reported).
fn forget_fill(ctx: &Ctx, file: &str) {
    ctx.fills
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(file);
}

/// A failed fill is tried again after this long.
const FILL_RETRY: Duration = Duration::from_secs(30);

/// Starts filling a volume on the blocking pool, unless a fill of it runs
/// (or failed a moment ago), and waits briefly so that quick fills (blank
/// volumes) finish here. Returns the fill, and whether this call started it.
async fn start_fill(ctx: &Ctx, file: &str, want: StorageVol) -> (Arc<Fill>, bool) {
    let fill = {
        let mut fills = ctx.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fills.get(file) {
            match f.ended() {
                None => return (f.clone(), false),
                Some((at, Err(_))) if at.elapsed() < FILL_RETRY => return (f.clone(), false),
                _ => {}
            }
        }
        let f = Arc::new(Fill::default());
        fills.insert(file.to_string(), f.clone());
        f
    };
    let (conn, f) = (ctx.conn.clone(), fill.clone());
    let mut task = tokio::task::spawn_blocking(move || {
        let progress = |done: u64, total: Option<u64>| {
            f.done.store(done, Ordering::Relaxed);
            f.total.store(total.unwrap_or(0), Ordering::Relaxed);
        };
        let result = conn
            .storage()
            .create_volume_with_progress(&want, &progress)
            .map(|_| ());
        *f.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), result));
    });
    let _ = tokio::time::timeout(Duration::from_millis(800), &mut task).await;
    (fill, true)
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let api: Api<StorageVol> = Api::all(ctx.client.clone());
    let selector = format!("{NODE}={}", ctx.config.node_name);
    let stream = k8s::controller(api, watcher::Config::default().labels(&selector))
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
            // A fill still running would put the file back after the delete.
            if fill_of(ctx, &file).is_some_and(|f| f.ended().is_none()) {
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            forget_fill(ctx, &file);
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
            let (fill, fresh) = start_fill(ctx, &file, want).await;
            match fill.ended() {
                Some((_, Ok(()))) => {
                    forget_fill(ctx, &file);
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
                Some((
                    _,
                    Err(e @ (DriverError::InvalidState { .. } | DriverError::NotFound(_))),
                )) => {
                    forget_fill(ctx, &file);
                    ("Pending", None, e.to_string())
                }
                Some((at, Err(e))) => {
                    if at.elapsed() < Duration::from_secs(1) {
                        k8s::event(
                            &ctx.recorder,
                            vol.as_ref(),
                            EventType::Warning,
                            "FillFailed",
                            "Create",
                            e.to_string(),
                        )
                        .await;
                    }
                    (
                        "Failed",
                        None,
                        format!("{e} (tried again every {}s)", FILL_RETRY.as_secs()),
                    )
                }
                None => {
                    if fresh {
                        k8s::event(
                            &ctx.recorder,
                            vol.as_ref(),
                            EventType::Normal,
                            "Creating",
                            "Create",
                            format!("filling in pool {pool} on node {}", ctx.config.node_name),
                        )
                        .await;
                    }
                    (
                        "Creating",
                        None,
                        format!(
                            "filling in pool {pool} on node {}: {}% done",
                            ctx.config.node_name,
                            fill.percent()
                        ),
                    )
                }
            }
        }
        Err(Error::Driver(e)) => ("Pending", None, e.to_string()),
        Err(e) => return Err(e),
    };
    // spec.capacity grown (the API server refuses a shrink): resize it.
    let (info, message, resize_failed) = grow(ctx, &vol, &pool, &file, phase, info, message).await;
    // A volume made for an upload holds a blank placeholder until an
    // upload completes: never Ready before, so no guest gets it empty.
    let mut waiting = false;
    let mut uploading = None;
    let (phase, message) = match &info {
        Some(i) if phase == "Ready" && i.awaiting_upload => match i.upload_progress {
            Some(pct) => {
                uploading = Some(pct);
                (
                    "Creating",
                    format!(
                        "uploading into pool {pool} on node {}: {pct}% done",
                        ctx.config.node_name
                    ),
                )
            }
            None => {
                waiting = true;
                (
                    "Pending",
                    format!(
                        "waiting for its content: on node {}, `vireo vol-upload --pool {pool} {file} IMAGE`",
                        ctx.config.node_name
                    ),
                )
            }
        },
        _ => (phase, message),
    };
    let reason = if waiting { "WaitingForUpload" } else { phase };
    let was_waiting = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == "WaitingForUpload");
    if waiting && !was_waiting {
        k8s::event(
            &ctx.recorder,
            vol.as_ref(),
            EventType::Normal,
            "WaitingForUpload",
            "Create",
            message.clone(),
        )
        .await;
    }
    let for_upload = vol.spec.source.as_ref().is_some_and(|s| s.upload.is_some());
    if for_upload && phase == "Ready" && status.phase.as_deref() != Some("Ready") {
        k8s::event(
            &ctx.recorder,
            vol.as_ref(),
            EventType::Normal,
            "Uploaded",
            "Upload",
            format!(
                "content uploaded in pool {pool} on node {}",
                ctx.config.node_name
            ),
        )
        .await;
    }
    let ready = phase == "Ready";
    let wanted = StorageVolStatus {
        phase: Some(phase.to_string()),
        node_name: Some(ctx.config.node_name.clone()),
        path: info.as_ref().map(|i| i.path.clone()),
        key: info.as_ref().map(|i| i.key.clone()),
        format: info.as_ref().map(|i| i.format),
        capacity: info.as_ref().map(|i| format_bytes(i.capacity)),
        allocation: info.as_ref().map(|i| format_bytes(i.allocation)),
        progress: match phase {
            "Ready" => Some(100),
            "Creating" => uploading.or_else(|| fill_of(ctx, &file).map(|f| f.percent())),
            _ => None,
        },
        observed_generation: vol.meta().generation,
        conditions: vec![condition(
            &status.conditions,
            "Ready",
            ready,
            reason,
            message,
            vol.meta().generation,
        )],
    };
    let unchanged = status.phase == wanted.phase
        && status.progress == wanted.progress
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
    Ok(match phase {
        "Ready" if resize_failed => Action::requeue(RESIZE_RETRY),
        "Ready" => Action::requeue(ctx.config.resync),
        "Creating" => Action::requeue(Duration::from_secs(1)),
        "Failed" => Action::requeue(FILL_RETRY),
        _ => Action::requeue(Duration::from_secs(2)),
    })
}

/// How soon a failed resize is tried again (a qcow2 image a running QEMU
/// holds locked is resized once the guest stops).
const RESIZE_RETRY: Duration = Duration::from_secs(15);

/// Grows a Ready volume to `spec.capacity` when that is larger than the
/// volume (`virsh vol-resize`; as a PVC's expansion). Says so in an Event
/// (`Resized`, or `ResizeFailed` once per new reason) and returns the
/// volume as it is now, the Ready message (with why a resize failed), and
/// whether it failed.
async fn grow(
    ctx: &Ctx,
    vol: &StorageVol,
    pool: &str,
    file: &str,
    phase: &str,
    info: Option<vireo_drivers::storage::VolInfo>,
    message: String,
) -> (Option<vireo_drivers::storage::VolInfo>, String, bool) {
    let Some(have) = info
        .as_ref()
        .filter(|i| phase == "Ready" && !i.awaiting_upload)
    else {
        return (info, message, false);
    };
    let Ok(want) = vireo_crds::quantity::parse_quantity(&vol.spec.capacity) else {
        return (info, message, false);
    };
    // qemu-img sizes qcow2 images in whole 512-byte sectors (and creates
    // them rounded up): ask for that, or a size like 2.5G never matches.
    let want = if have.format == vireo_crds::VolFormat::Qcow2 {
        want.div_ceil(512).saturating_mul(512)
    } else {
        want
    };
    if want <= have.capacity {
        return (info, message, false);
    }
    let from = have.capacity;
    let (p, f) = (pool.to_string(), file.to_string());
    let resized = ctx
        .drive(move |c| {
            c.storage().resize_volume(
                &p,
                &f,
                want,
                vireo_drivers::storage::ResizeFlags::default(),
            )?;
            c.storage().volume_info(&p, &f)
        })
        .await;
    match resized {
        Ok(now) => {
            k8s::event(
                &ctx.recorder,
                vol,
                EventType::Normal,
                "Resized",
                "Resize",
                format!(
                    "grown from {} to {} on node {} (a running guest sees it at its next start)",
                    format_bytes(from).0,
                    format_bytes(now.capacity).0,
                    ctx.config.node_name
                ),
            )
            .await;
            (Some(now), message, false)
        }
        Err(e) => {
            let why = format!(
                "{message}; growing it to {} failed: {e}",
                format_bytes(want).0
            );
            let said_before = vol.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.message == why)
            });
            if !said_before {
                k8s::event(
                    &ctx.recorder,
                    vol,
                    EventType::Warning,
                    "ResizeFailed",
                    "Resize",
                    why.clone(),
                )
                .await;
            }
            (info, why, true)
        }
    }
}
