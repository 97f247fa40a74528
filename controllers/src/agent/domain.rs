//! Domains bound to this node: defined in the driver, started and stopped
//! as `runStrategy` and `lifecycle` say, observed into status.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use vireo_crds::labels::{NODE, NODE_CLEANUP_FINALIZER, OPERATOR_MANAGER, node_key};
use vireo_crds::{Domain, DomainInfo, DomainState, DomainStatus, DomainType};
use vireo_drivers::{Error as DriverError, Lookup};

use super::{Ctx, drain, error_policy, instrumented};
use crate::conditions::{
    OPERATOR_DOMAIN_CONDITIONS, condition, find, same, ungated_domain_conditions,
};
use crate::error::Result;
use crate::k8s;
use crate::run_strategy::{Action as Step, History, decide};

/// Names each Domain of this node just reconciled, for the snapshot
/// controller ([`super::snapshot::run`]).
pub(crate) type Reconciled = futures::channel::mpsc::UnboundedSender<ObjectRef<Domain>>;

/// Runs the Domain controller. After each reconcile (whatever its
/// outcome) the Domain is named on `reconciled`, which wakes its
/// DomainSnapshots: the snapshot controller needs no Domain watch of its
/// own, one watch fewer that the API server hands every Domain event to
/// (issue 19). A Domain deleted here is named after its teardown has
/// removed the finalizer, so its snapshots then find it gone.
pub(crate) async fn run(ctx: Arc<Ctx>, reconciled: Reconciled) {
    let api: Api<Domain> = Api::all(ctx.client.clone());
    let selector = format!("{NODE}={}", ctx.config.node_name);
    let stream = k8s::controller(api, watcher::Config::default().labels(&selector))
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            move |dom, ctx: Arc<Ctx>| {
                let reconciled = reconciled.clone();
                async move {
                    let key = node_key(&dom.namespace().unwrap_or_default(), &dom.name_any());
                    let r = ObjectRef::from_obj(dom.as_ref());
                    let action =
                        instrumented(&ctx, "agent-domain", key, reconcile(dom, &ctx)).await;
                    // The receiver lives as long as the agent's controllers.
                    let _ = reconciled.unbounded_send(r);
                    action
                }
            },
            |dom, _err, ctx: Arc<Ctx>| {
                error_policy(
                    &ctx,
                    &node_key(&dom.namespace().unwrap_or_default(), &dom.name_any()),
                )
            },
            ctx.clone(),
        );
    drain(stream).await;
}

async fn reconcile(dom: Arc<Domain>, ctx: &Ctx) -> Result<Action> {
    let ns = dom.namespace().unwrap_or_default();
    let api: Api<Domain> = Api::namespaced(ctx.client.clone(), &ns);
    let key = node_key(&ns, &dom.name_any());

    if dom.meta().deletion_timestamp.is_some() {
        if dom.finalizers().iter().any(|f| f == NODE_CLEANUP_FINALIZER) {
            teardown(ctx, dom.spec.domain_type, &key).await?;
            ctx.forget(&key);
            k8s::event(
                &ctx.recorder,
                dom.as_ref(),
                EventType::Normal,
                "Destroyed",
                "Delete",
                format!("destroyed and undefined on node {}", ctx.config.node_name),
            )
            .await;
            k8s::remove_finalizer(&api, dom.as_ref(), NODE_CLEANUP_FINALIZER).await?;
        }
        return Ok(Action::await_change());
    }
    // Moved to another node (a migration): the watch shows it leaving.
    if dom.labels().get(NODE) != Some(&ctx.config.node_name) {
        return Ok(Action::await_change());
    }
    // A live migration is moving it: its steps (agent::migration) own the
    // domain on this node until the operator moves or releases it.
    if dom
        .annotations()
        .contains_key(vireo_crds::labels::MIGRATION_ANNOTATION)
    {
        return Ok(Action::requeue(ctx.config.resync));
    }
    // A drain moves it off this node (evictionStrategy Shutdown).
    if dom.annotations().get(vireo_crds::labels::EVICT_ANNOTATION) == Some(&ctx.config.node_name) {
        return evict(ctx, &api, &dom, &key).await;
    }
    let ty = dom.spec.domain_type;
    // The operator gives every Domain its UUID (and this finalizer) when it binds it.
    let Some(uuid) = dom.spec.uuid.clone() else {
        return Ok(Action::await_change());
    };
    k8s::add_finalizer(&api, dom.as_ref(), NODE_CLEANUP_FINALIZER).await?;

    // A Domain names no host path: boot files only from the node's boot
    // directories (disks are volumes of its own namespace, below).
    if let Some(why) = ctx
        .config
        .boot_path_refusal(&dom, ctx.conn.storage_driver().as_ref())
    {
        return refuse(ctx, &api, &dom, "BootPathRefused", why).await;
    }

    // Define, or redefine when the spec changed.
    let def = match node_definition(ctx, &dom, &uuid).await {
        Ok(def) => def,
        Err(why) => return refuse(ctx, &api, &dom, "CloudInitSourceMissing", why).await,
    };
    // Not on this node yet: the watch cache may be stale (a list served by an
    // API server that just came back), and a Domain already deleted and torn
    // down here must not be defined again from it, with nothing left to
    // remove it. A consistent read confirms this very object still exists.
    let k = key.clone();
    let current = ctx
        .drive_domain(ty, move |c| {
            match c.hypervisor().domain_definition(&k, true) {
                Ok(cur) => Ok(Some(cur)),
                Err(DriverError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await?;
    if current.is_none() && !still_exists(ctx, &api, &dom).await? {
        return Ok(Action::await_change());
    }
    // Redefine if the spec changed (this key is reconciled by one pass at a
    // time, so the definition just read is still the node's), then read the state.
    let defined = current.is_none_or(|cur| {
        cur.spec != def.spec || cur.metadata.annotations != def.metadata.annotations
    });
    let (k, d) = (key.clone(), def);
    let (state, reason) = ctx
        .drive_domain(ty, move |c| {
            let hv = c.hypervisor();
            if defined {
                hv.define_domain(&d)?;
            }
            hv.domain_state(&k)
        })
        .await?;
    if defined {
        tracing::info!(domain = %key, "defined");
    }

    let status = dom.status.clone().unwrap_or_default();
    // Per object (UID), so a Domain recreated under the same name starts from zero.
    let count_key = format!("{key}#{}", dom.uid().unwrap_or_default());
    let mut start_count = ctx.start_count(&count_key, status.start_count.unwrap_or(0), 0);
    let history = History {
        started_once: start_count > 0,
    };
    // The operator's gates: start only once volumes and networks are ready
    // here. A Domain that uses neither has nothing to wait for: it starts
    // once bound, without waiting for the operator's status to come round
    // (one write and one watch delivery less on its way to Running, issue
    // 19); a gate the operator did write is obeyed all the same.
    let needs_nothing = dom.spec.needs_no_gate();
    let gates: Vec<&str> = ["VolumesReady", "NetworksReady"]
        .into_iter()
        .filter(|g| match find(&status.conditions, g) {
            Some(c) => c.status != "True",
            None => !needs_nothing,
        })
        .collect();
    let mut waiting = None;
    let step = decide(
        dom.spec.run_strategy,
        &dom.spec.lifecycle,
        state,
        reason,
        history,
    );
    match step {
        // Carried out below, where a failure is reported rather than retried.
        Step::Nothing | Step::Save => {}
        Step::Start if !gates.is_empty() => {
            waiting = Some(format!(
                "waiting for {} before starting",
                gates.join(" and ")
            ));
        }
        Step::Start => {
            let k = key.clone();
            let r = ctx
                .drive_domain(ty, move |c| c.hypervisor().start_domain(&k))
                .await?;
            start_count = ctx.start_count(&count_key, start_count, 1);
            let id = r.id.map_or_else(|| "-".into(), |i| i.to_string());
            tracing::info!(domain = %key, id, "started");
            // In the background: the status below is what watchers wait for.
            k8s::event_later(
                &ctx.recorder,
                dom.as_ref(),
                EventType::Normal,
                "Started",
                "Start",
                format!("started on node {} with ID {id}", ctx.config.node_name),
            );
        }
        Step::Stop => {
            // Ask the guest first; destroy it once it has had stop_timeout,
            // or at once when the Domain asks for it (`vireo destroy` on a
            // cluster sets the vireo.dev/stop annotation).
            let asked = ctx.stop_asked(&key);
            let k = key.clone();
            let at_once = crate::run_strategy::stop_at_once(dom.metadata.annotations.as_ref());
            if asked.elapsed() < ctx.config.stop_timeout && !at_once {
                ctx.drive_domain(ty, move |c| c.hypervisor().shutdown_domain(&k))
                    .await?;
            } else {
                if at_once {
                    tracing::info!(domain = %key, "destroying at once (vireo.dev/stop: destroy)");
                } else {
                    tracing::warn!(domain = %key, "did not shut down in time; destroying");
                }
                ctx.drive_domain(ty, move |c| c.hypervisor().destroy_domain(&k))
                    .await?;
            }
            let k = key.clone();
            let (after, _) = ctx
                .drive_domain(ty, move |c| c.hypervisor().domain_state(&k))
                .await?;
            if after.is_active() {
                return Ok(Action::requeue(std::time::Duration::from_secs(2)));
            }
            ctx.forget_stop(&key);
            tracing::info!(domain = %key, "stopped");
            k8s::event(
                &ctx.recorder,
                dom.as_ref(),
                EventType::Normal,
                "Stopped",
                "Stop",
                format!(
                    "stopped on node {} (runStrategy {:?})",
                    ctx.config.node_name, dom.spec.run_strategy
                ),
            )
            .await;
        }
    }

    // A save that failed (a driver without saved state, a full disk) is
    // said once, as a Warning Event and `Saved=False`; the guest runs on.
    let mut save_failed = None;
    if step == Step::Save {
        let k = key.clone();
        match ctx
            .drive_domain(ty, move |c| c.hypervisor().managed_save(&k))
            .await
        {
            Ok(()) => {
                tracing::info!(domain = %key, "saved (managed save)");
                k8s::event(
                    &ctx.recorder,
                    dom.as_ref(),
                    EventType::Normal,
                    "Saved",
                    "Save",
                    format!(
                        "memory and device state saved on node {}; the next start resumes it",
                        ctx.config.node_name
                    ),
                )
                .await;
            }
            Err(e) => {
                let message = format!("the guest runs on: {e}");
                if find(&status.conditions, "Saved")
                    .is_none_or(|c| c.status != "False" || c.message != message)
                {
                    tracing::warn!(domain = %key, error = %e, "managed save failed");
                    k8s::event(
                        &ctx.recorder,
                        dom.as_ref(),
                        EventType::Warning,
                        "SaveFailed",
                        "Save",
                        message.clone(),
                    )
                    .await;
                }
                save_failed = Some(message);
            }
        }
    }

    if step == Step::Nothing {
        requests(ctx, &api, &dom, ty, &key, state, reason).await?;
    }

    let k = key.clone();
    let (reference, info) = ctx
        .drive_domain(ty, move |c| {
            let r = c.hypervisor().lookup_domain(Lookup::Name(&k))?;
            let i = c.hypervisor().domain_info(&k)?;
            Ok((r, i))
        })
        .await?;
    let ready = info.state == DomainState::Running;
    let message = match (&waiting, reference.id) {
        (Some(w), _) => w.clone(),
        (None, id) => match id {
            Some(id) => format!(
                "{} ({}) with ID {id} on node {}",
                info.state, info.reason, ctx.config.node_name
            ),
            None => format!(
                "{} ({}) on node {}",
                info.state, info.reason, ctx.config.node_name
            ),
        },
    };
    let ready_cond = condition(
        &status.conditions,
        "Ready",
        ready,
        &camel(info.state.virsh_name()),
        message,
        dom.meta().generation,
    );
    // A firmware that found nothing to boot keeps its VM process running:
    // say so (Bootable=False and one Warning event) instead of a silent hang.
    let firmware = dom.spec.os.as_ref().is_some_and(|os| os.firmware.is_some());
    let problem = if firmware && info.state.is_active() {
        let k = key.clone();
        ctx.drive_domain(ty, move |c| c.hypervisor().boot_problem(&k))
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(domain = %key, error = %e, "cannot read the console for boot problems");
                None
            })
    } else {
        None
    };
    let mut conditions = vec![ready_cond];
    // `Saved`: whether a managed save image waits on the node (virsh
    // dominfo's "Managed save"), or why the save asked for failed.
    let saved_image = if info.state.is_active() {
        false
    } else {
        let k = key.clone();
        ctx.drive_domain(ty, move |c| c.hypervisor().has_managed_save(&k))
            .await
            .unwrap_or(false)
    };
    if let Some(message) = save_failed {
        conditions.push(condition(
            &status.conditions,
            "Saved",
            false,
            "SaveFailed",
            message,
            dom.meta().generation,
        ));
    } else if saved_image {
        conditions.push(condition(
            &status.conditions,
            "Saved",
            true,
            "ManagedSave",
            format!(
                "memory and device state saved on node {}; the next start resumes it",
                ctx.config.node_name
            ),
            dom.meta().generation,
        ));
    }
    if let Some(problem) = &problem {
        if find(&status.conditions, "Bootable").is_none_or(|c| c.status != "False") {
            tracing::warn!(domain = %key, "{problem}");
            k8s::event(
                &ctx.recorder,
                dom.as_ref(),
                EventType::Warning,
                "NoBootableDevice",
                "Boot",
                format!(
                    "{problem}; check spec.devices.disks, spec.os.boot and the console (vireo console {key})"
                ),
            )
            .await;
        }
        conditions.push(condition(
            &status.conditions,
            "Bootable",
            false,
            "NoBootableDevice",
            problem.clone(),
            dom.meta().generation,
        ));
    }
    let interfaces = if info.state.is_active() {
        interface_status(ctx, ty, &dom.spec.devices.interfaces, &reference.uuid).await
    } else {
        Vec::new()
    };
    // The guest agent: what it reports goes to status.guest; its absence
    // is a condition, never an error (drivers without an agent channel,
    // like the test driver, say nothing).
    let mut guest = None;
    let mut agent_waiting = false;
    if info.state == DomainState::Running {
        let k = key.clone();
        match ctx
            .drive_domain(ty, move |c| c.hypervisor().guest_info(&k))
            .await
        {
            Ok(g) => {
                let version = g.agent_version.clone().unwrap_or_default();
                conditions.push(condition(
                    &status.conditions,
                    "AgentConnected",
                    true,
                    "Connected",
                    format!("the guest agent {version} answers").replace("  ", " "),
                    dom.meta().generation,
                ));
                guest = Some(g);
            }
            Err(crate::Error::Driver(vireo_drivers::Error::Unsupported { .. })) => {}
            Err(e) => {
                tracing::debug!(domain = %key, error = %e, "guest agent");
                let message = match &e {
                    crate::Error::Driver(vireo_drivers::Error::AgentUnresponsive {
                        message,
                        ..
                    }) => format!(
                        "no guest agent answers ({message}); install vireo-guest-agent or qemu-guest-agent in the guest for status.guest, domifaddr --source agent and shutdown --mode agent"
                    ),
                    other => other.to_string(),
                };
                conditions.push(condition(
                    &status.conditions,
                    "AgentConnected",
                    false,
                    "AgentNotResponding",
                    message,
                    dom.meta().generation,
                ));
                agent_waiting = true;
            }
        }
    }
    // The operator's conditions of a Domain that needs no gate come with
    // this apply while the operator has not written its own (one status
    // write per Domain instead of two, issue 19). Applied unforced: if the
    // operator meanwhile says something else, its word stands.
    let for_operator = needs_nothing
        && !k8s::owns_status_conditions(
            dom.as_ref(),
            OPERATOR_MANAGER,
            &OPERATOR_DOMAIN_CONDITIONS,
        );
    if for_operator {
        conditions.extend(ungated_domain_conditions(
            &status.conditions,
            &ctx.config.node_name,
            dom.meta().generation,
        ));
    }
    let wanted = DomainStatus {
        state: Some(info.state),
        start_count: Some(start_count),
        id: reference.id,
        node_name: for_operator.then(|| ctx.config.node_name.clone()),
        uuid: Some(reference.uuid),
        info: Some(info),
        observed_generation: dom.meta().generation,
        conditions,
        interfaces,
        guest,
    };
    // A Domain the operator has bound but not yet given its gates waits
    // without a word: the operator's status follows its binding at once,
    // and wakes this reconcile; saying "waiting" in between would be one
    // more write per Domain for nothing anyone reads.
    let gates_unset = ["VolumesReady", "NetworksReady"]
        .iter()
        .any(|g| find(&status.conditions, g).is_none());
    let quiet = waiting.is_some() && gates_unset && !wanted.state.is_some_and(|s| s.is_active());
    if !quiet && !status_matches(&status, &wanted) && !recently_applied(ctx, &dom, &wanted) {
        let mut wanted = wanted;
        let shared = for_operator
            && k8s::apply_status_unforced(&api, &dom.name_any(), &ctx.manager, &wanted).await?;
        if !shared {
            if for_operator {
                // Refused: the operator (or another node's agent, before a
                // move) owns one of those fields with another value.
                wanted.node_name = None;
                wanted
                    .conditions
                    .retain(|c| !OPERATOR_DOMAIN_CONDITIONS.contains(&c.type_.as_str()));
            }
            k8s::apply_status(&api, &dom.name_any(), &ctx.manager, &wanted).await?;
        }
        remember_applied(ctx, &dom, wanted);
    }
    // Gates open with a status change, which wakes this reconcile. A
    // guest whose agent has not answered yet (still booting) is asked
    // again sooner.
    if agent_waiting {
        return Ok(Action::requeue(
            ctx.config.resync.min(std::time::Duration::from_secs(10)),
        ));
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Carries out what the Domain asks of its running domain through
/// annotations (`vireo -c kube:/// suspend|resume|reboot|reset`): keep it
/// paused while `vireo.dev/paused` is `true`, and one reboot or reset per
/// `vireo.dev/request`, which is removed once done (or refused: a Warning
/// Event says why, and the request is dropped rather than retried).
async fn requests(
    ctx: &Ctx,
    api: &Api<Domain>,
    dom: &Domain,
    ty: DomainType,
    key: &str,
    state: DomainState,
    reason: vireo_crds::DomainReason,
) -> Result<()> {
    use crate::run_strategy::{PauseStep, Request, pause_step, request, wants_paused};
    let notes = dom.metadata.annotations.as_ref();
    let k = key.to_string();
    let (result, done, verb) = match pause_step(wants_paused(notes), state, reason) {
        PauseStep::Nothing => (Ok(()), "", ""),
        PauseStep::Suspend => (
            ctx.drive_domain(ty, move |c| c.hypervisor().suspend_domain(&k))
                .await,
            "Suspended",
            "Suspend",
        ),
        PauseStep::Resume => (
            ctx.drive_domain(ty, move |c| c.hypervisor().resume_domain(&k))
                .await,
            "Resumed",
            "Resume",
        ),
    };
    if !done.is_empty() {
        result?;
        tracing::info!(domain = %key, "{}", done.to_lowercase());
        k8s::event(
            &ctx.recorder,
            dom,
            EventType::Normal,
            done,
            verb,
            format!("{} on node {}", done.to_lowercase(), ctx.config.node_name),
        )
        .await;
    }
    let Some(asked) = request(notes) else {
        return Ok(());
    };
    let k = key.to_string();
    let outcome = match asked {
        Ok(r) if state.is_active() != (r == Request::ManagedSaveRemove) => ctx
            .drive_domain(ty, move |c| match r {
                Request::Reboot => c.hypervisor().reboot_domain(&k),
                Request::Reset => c.hypervisor().reset_domain(&k),
                Request::ManagedSaveRemove => c.hypervisor().managed_save_remove(&k),
            })
            .await
            .map(|()| r)
            .map_err(|e| e.to_string()),
        Ok(Request::ManagedSaveRemove) => Err("the domain is running".to_string()),
        Ok(_) => Err("the domain is not running".to_string()),
        Err(other) => Err(format!(
            "'{other}' is not a request (reboot, reset, managedsave-remove)"
        )),
    };
    let (type_, why, note) = match outcome {
        Ok(Request::Reboot) => (
            EventType::Normal,
            "Rebooted",
            format!("rebooted on node {}", ctx.config.node_name),
        ),
        Ok(Request::Reset) => (
            EventType::Normal,
            "Reset",
            format!("reset on node {}", ctx.config.node_name),
        ),
        Ok(Request::ManagedSaveRemove) => (
            EventType::Normal,
            "ManagedSaveRemoved",
            format!(
                "managed save image removed on node {}; the next start boots",
                ctx.config.node_name
            ),
        ),
        Err(message) => (
            EventType::Warning,
            "RequestRefused",
            format!("vireo.dev/request dropped: {message}"),
        ),
    };
    tracing::info!(domain = %key, reason = why, "{note}");
    k8s::event(&ctx.recorder, dom, type_, why, "Request", note).await;
    // Removed only if it is still the request carried out.
    let value = notes
        .and_then(|a| a.get(vireo_crds::labels::REQUEST_ANNOTATION))
        .cloned();
    let path = format!(
        "/metadata/annotations/{}",
        vireo_crds::labels::REQUEST_ANNOTATION
            .replace('~', "~0")
            .replace('/', "~1")
    );
    k8s::patch_json(
        api,
        &dom.name_any(),
        serde_json::json!([
            {"op": "test", "path": path, "value": value},
            {"op": "remove", "path": path},
        ]),
    )
    .await
}

/// The definition of a Domain as this node's driver gets it: named
/// `namespace/name`, without the request annotations, its volumes by their
/// node file names, cloud-init documents inline. Err: a cloud-init source
/// that is missing (the message names it).
pub(super) async fn node_definition(
    ctx: &Ctx,
    dom: &Domain,
    uuid: &str,
) -> std::result::Result<Domain, String> {
    let ns = dom.namespace().unwrap_or_default();
    let key = node_key(&ns, &dom.name_any());
    let mut def = Domain::new(&key, dom.spec.clone());
    // Requests to the agent (vireo.dev/stop, paused, request) are carried
    // out here, not copied into the node's definition.
    // (None when nothing else is left, so that a request alone is no
    // change to the definition.)
    def.metadata.annotations = dom
        .metadata
        .annotations
        .clone()
        .map(|mut a| {
            a.retain(|k, _| !vireo_crds::labels::is_request_annotation(k));
            a
        })
        .filter(|a| !a.is_empty());
    // The object's UID, so that a record outliving its object is found
    // (agent/sweep.rs).
    super::sweep::mark(&mut def, dom.uid());
    def.spec.uuid = Some(uuid.to_ascii_lowercase());
    // Disks name StorageVols of the Domain's namespace; on the node a
    // volume's name is `namespace.name`.
    def.spec.map_volumes(|v| super::volume::file_name(&ns, v));
    // cloud-init documents kept in Secrets and ConfigMaps go to the node
    // inline (the driver writes the seed); never into status or logs.
    resolve_cloud_init(ctx, &ns, &mut def.spec).await?;
    Ok(def)
}

/// A running guest's interfaces: MAC, tap, and the address its network's
/// DHCP server leased to that MAC (none yet, or a network without DHCP).
async fn interface_status(
    ctx: &Ctx,
    ty: DomainType,
    interfaces: &[vireo_crds::Interface],
    uuid: &str,
) -> Vec<vireo_crds::InterfaceStatus> {
    let (ifaces, uuid) = (interfaces.to_vec(), uuid.to_string());
    let mut out = ctx
        .drive(move |c| {
            Ok(vireo_drivers::network::interface_addresses(
                c.network(),
                &ifaces,
                &uuid,
            ))
        })
        .await
        .unwrap_or_default();
    if ty == DomainType::Test {
        // The test driver plugs nothing in.
        out.iter_mut().for_each(|i| i.device = None);
    }
    out
}

/// Refuses to run a Domain: Ready=False with the reason, a Warning event
/// when that is news, and nothing defined on the node.
async fn refuse(
    ctx: &Ctx,
    api: &Api<Domain>,
    dom: &Domain,
    reason: &str,
    message: String,
) -> Result<Action> {
    let status = dom.status.clone().unwrap_or_default();
    let cond = condition(
        &status.conditions,
        "Ready",
        false,
        reason,
        message.clone(),
        dom.meta().generation,
    );
    let news = find(&status.conditions, "Ready")
        .is_none_or(|c| c.reason != reason || c.message != message);
    if news {
        tracing::warn!(domain = %dom.name_any(), %message, "refused");
        k8s::event(
            &ctx.recorder,
            dom,
            EventType::Warning,
            reason,
            "Define",
            message,
        )
        .await;
        let wanted = DomainStatus {
            observed_generation: dom.meta().generation,
            conditions: vec![cond],
            ..DomainStatus::default()
        };
        k8s::apply_status(api, &dom.name_any(), &ctx.manager, &wanted).await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Reads each `spec.cloudInit.*From` key of the Domain's namespace into the
/// inline field, for the node's copy of the definition. The error names the
/// field, the object and the key, never their content.
async fn resolve_cloud_init(
    ctx: &Ctx,
    ns: &str,
    spec: &mut vireo_crds::DomainSpec,
) -> std::result::Result<(), String> {
    let Some(ci) = spec.cloud_init.as_mut() else {
        return Ok(());
    };
    for (field, from, inline) in [
        ("userDataFrom", ci.user_data_from.take(), &mut ci.user_data),
        ("metaDataFrom", ci.meta_data_from.take(), &mut ci.meta_data),
        (
            "networkConfigFrom",
            ci.network_config_from.take(),
            &mut ci.network_config,
        ),
    ] {
        let Some(from) = from else { continue };
        *inline = Some(read_key(ctx, ns, field, &from).await?);
    }
    Ok(())
}

async fn read_key(
    ctx: &Ctx,
    ns: &str,
    field: &str,
    from: &vireo_crds::DataSource,
) -> std::result::Result<String, String> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let (kind, r) = match (&from.secret_key_ref, &from.config_map_key_ref) {
        (Some(r), _) => ("Secret", r),
        (None, Some(r)) => ("ConfigMap", r),
        (None, None) => {
            return Err(format!(
                "spec.cloudInit.{field}: give secretKeyRef or configMapKeyRef"
            ));
        }
    };
    let missing = |what: &str| {
        format!(
            "spec.cloudInit.{field}: {kind} {ns}/{} {what} (the Domain starts once it is there)",
            r.name
        )
    };
    let bytes: Option<Vec<u8>> = if kind == "Secret" {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let s = api
            .get_opt(&r.name)
            .await
            .map_err(|e| missing(&format!("cannot be read: {e}")))?
            .ok_or_else(|| missing("does not exist"))?;
        s.data
            .and_then(|d| d.get(&r.key).map(|b| b.0.clone()))
            .or_else(|| {
                s.string_data
                    .and_then(|d| d.get(&r.key).map(|t| t.clone().into_bytes()))
            })
    } else {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let c = api
            .get_opt(&r.name)
            .await
            .map_err(|e| missing(&format!("cannot be read: {e}")))?
            .ok_or_else(|| missing("does not exist"))?;
        c.data
            .and_then(|d| d.get(&r.key).map(|t| t.clone().into_bytes()))
            .or_else(|| {
                c.binary_data
                    .and_then(|d| d.get(&r.key).map(|b| b.0.clone()))
            })
    };
    let bytes = bytes.ok_or_else(|| missing(&format!("has no key '{}'", r.key)))?;
    String::from_utf8(bytes).map_err(|_| missing(&format!("key '{}' is not UTF-8 text", r.key)))
}

/// `shut off` → `ShutOff`, for condition reasons.
fn camel(words: &str) -> String {
    words
        .split(' ')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// How long a status this agent applied is trusted over a cache that does
/// not show it yet: the watch delivers our own write well within this;
/// past it, a status someone else overwrote is put right again.
const APPLIED_TRUST: std::time::Duration = std::time::Duration::from_secs(10);

fn recently_applied(ctx: &Ctx, dom: &Domain, wanted: &DomainStatus) -> bool {
    let uid = dom.uid().unwrap_or_default();
    let applied = ctx.applied.lock().unwrap_or_else(|p| p.into_inner());
    applied
        .get(&uid)
        .is_some_and(|(s, at)| at.elapsed() < APPLIED_TRUST && status_matches(s, wanted))
}

fn remember_applied(ctx: &Ctx, dom: &Domain, wanted: DomainStatus) {
    let uid = dom.uid().unwrap_or_default();
    let mut applied = ctx.applied.lock().unwrap_or_else(|p| p.into_inner());
    // Forget what is past trusting here, on a write, not on every look.
    applied.retain(|_, (_, at)| at.elapsed() < APPLIED_TRUST);
    applied.insert(uid, (wanted, std::time::Instant::now()));
}

/// Whether the status already says what we would write (CPU time aside:
/// it is refreshed with the next real change, to spare the API server).
fn status_matches(have: &DomainStatus, want: &DomainStatus) -> bool {
    let info_eq = |a: &Option<DomainInfo>, b: &Option<DomainInfo>| match (a, b) {
        (Some(a), Some(b)) => {
            a.state == b.state
                && a.reason == b.reason
                && a.max_memory == b.max_memory
                && a.memory == b.memory
                && a.vcpus == b.vcpus
        }
        (None, None) => true,
        _ => false,
    };
    // The conditions this agent owns (the operator owns the others, but
    // for those this agent writes for it: `node_name` set).
    let mut types = vec!["Ready", "Bootable", "AgentConnected", "Saved"];
    if want.node_name.is_some() {
        types.extend(OPERATOR_DOMAIN_CONDITIONS);
    }
    let ready_have: Vec<_> = types
        .iter()
        .filter_map(|t| find(&have.conditions, t).cloned())
        .collect();
    // Filesystem usage moves all the time: refreshed with the next real
    // change, as CPU time is.
    let guest_eq = |a: &Option<vireo_crds::GuestInfo>, b: &Option<vireo_crds::GuestInfo>| {
        let strip = |g: &Option<vireo_crds::GuestInfo>| {
            g.clone().map(|mut g| {
                for f in &mut g.filesystems {
                    f.used_bytes = None;
                }
                g
            })
        };
        strip(a) == strip(b)
    };
    have.state == want.state
        && (want.node_name.is_none() || have.node_name == want.node_name)
        && have.start_count == want.start_count
        && have.id == want.id
        && have.uuid == want.uuid
        && have.observed_generation == want.observed_generation
        && info_eq(&have.info, &want.info)
        && have.interfaces == want.interfaces
        && guest_eq(&have.guest, &want.guest)
        && same(&ready_have, &want.conditions)
}

/// `dom` (same UID) exists and is not being deleted, read from etcd rather
/// than from the watch cache.
async fn still_exists(ctx: &Ctx, api: &Api<Domain>, dom: &Domain) -> Result<bool> {
    let now = api.get_opt(&dom.name_any()).await?;
    Ok(live_same_object(now.as_ref(), dom)
        && now.is_some_and(|d| d.labels().get(NODE) == Some(&ctx.config.node_name)))
}

/// `now` (a fresh read) is the object `seen` and is not being deleted.
fn live_same_object(now: Option<&Domain>, seen: &Domain) -> bool {
    now.is_some_and(|d| d.uid() == seen.uid() && d.meta().deletion_timestamp.is_none())
}

/// A drain's eviction (`vireo.dev/evict: <this node>`): the guest is shut
/// down (destroyed once it has had the stop timeout), undefined here, and
/// `Evicted=True` says so; the operator then unbinds the Domain and
/// placement puts it on another Host.
async fn evict(ctx: &Ctx, api: &Api<Domain>, dom: &Domain, key: &str) -> Result<Action> {
    let ty = dom.spec.domain_type;
    let k = key.to_string();
    let state = ctx
        .drive_domain(ty, move |c| match c.hypervisor().domain_state(&k) {
            Ok((s, _)) => Ok(Some(s)),
            Err(DriverError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
    if state.is_some_and(|s| s.is_active()) {
        let asked = ctx.stop_asked(key);
        let k = key.to_string();
        if asked.elapsed() < ctx.config.stop_timeout {
            ctx.drive_domain(ty, move |c| c.hypervisor().shutdown_domain(&k))
                .await?;
        } else {
            tracing::warn!(domain = %key, "did not shut down in time for the drain; destroying");
            ctx.drive_domain(ty, move |c| c.hypervisor().destroy_domain(&k))
                .await?;
        }
        return Ok(Action::requeue(std::time::Duration::from_secs(2)));
    }
    ctx.forget_stop(key);
    teardown(ctx, ty, key).await?;
    let status = dom.status.clone().unwrap_or_default();
    let note = format!(
        "shut down and undefined on node {} (its host is drained; evictionStrategy Shutdown)",
        ctx.config.node_name
    );
    if find(&status.conditions, "Evicted").is_none_or(|c| c.status != "True" || c.message != note) {
        let generation = dom.meta().generation;
        let wanted = DomainStatus {
            state: Some(DomainState::Shutoff),
            observed_generation: generation,
            conditions: vec![
                condition(
                    &status.conditions,
                    "Ready",
                    false,
                    "Evicted",
                    note.clone(),
                    generation,
                ),
                condition(
                    &status.conditions,
                    "Evicted",
                    true,
                    "Drained",
                    note.clone(),
                    generation,
                ),
            ],
            ..DomainStatus::default()
        };
        k8s::apply_status(api, &dom.name_any(), &ctx.manager, &wanted).await?;
        tracing::info!(domain = %key, "{note}");
        k8s::event(
            &ctx.recorder,
            dom,
            EventType::Normal,
            "Evicted",
            "Drain",
            note,
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Destroys (if active) and undefines a domain on this node; gone is fine.
async fn teardown(ctx: &Ctx, ty: DomainType, key: &str) -> Result<()> {
    let k = key.to_string();
    ctx.drive_domain(ty, move |c| {
        let hv = c.hypervisor();
        match hv.domain_state(&k) {
            Ok((s, _)) if s.is_active() => hv.destroy_domain(&k)?,
            Ok(_) => {}
            Err(DriverError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        // The Domain is gone for good: so are its snapshots.
        vireo_drivers::snapshot::delete_all(hv, &k)?;
        match hv.undefine_domain(&k) {
            Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(uid: &str, deleting: bool) -> Domain {
        let mut d: Domain = serde_json::from_value(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1",
            "kind": "Domain",
            "metadata": {"name": "web", "uid": uid},
            "spec": {"type": "test", "memory": "1Gi", "vcpus": 1},
        }))
        .expect("a Domain");
        if deleting {
            d.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            );
        }
        d
    }

    #[test]
    fn a_stale_view_of_a_deleted_or_replaced_domain_is_not_defined_again() {
        let seen = domain("a", false);
        assert!(live_same_object(Some(&domain("a", false)), &seen));
        // Gone, being deleted, or another object under the same name.
        assert!(!live_same_object(None, &seen));
        assert!(!live_same_object(Some(&domain("a", true)), &seen));
        assert!(!live_same_object(Some(&domain("b", false)), &seen));
    }
}
