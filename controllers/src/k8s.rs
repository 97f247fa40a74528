//! Small helpers over kube-rs: finalizers, server-side-applied status, Events.

use std::sync::{Arc, OnceLock};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::{Error, Result};

/// Adds a finalizer if the object lacks it.
pub async fn add_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    // Guarded by the resourceVersion: several agents add their finalizers to
    // one new Network at once, and creating the list must not replace another's.
    let guard =
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version()});
    let patch = if obj.meta().finalizers.is_none() {
        json!([guard, {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]}])
    } else {
        json!([guard, {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}])
    };
    patch_json(api, &obj.name_any(), patch).await
}

/// Removes a finalizer; the patch tests its position first, so a concurrent
/// change makes it fail (and the reconcile retry) instead of removing
/// someone else's finalizer.
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(index) = obj.finalizers().iter().position(|f| f == finalizer) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch = json!([
        {"op": "test", "path": path, "value": finalizer},
        {"op": "remove", "path": path},
    ]);
    match patch_json(api, &obj.name_any(), patch).await {
        // Already gone: the object went away once its last finalizer did.
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
        other => other,
    }
}

/// Applies a JSON Patch (a list of operations) to an object.
pub async fn patch_json<K>(api: &Api<K>, name: &str, patch: serde_json::Value) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    patch_json_returning(api, name, patch).await.map(drop)
}

/// [`patch_json`], returning the object as the API server stored it.
pub async fn patch_json_returning<K>(
    api: &Api<K>,
    name: &str,
    patch: serde_json::Value,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|source| Error::Serialize {
            what: "a JSON patch",
            source,
        })?;
    Ok(api
        .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?)
}

/// The body of a server-side apply of `status` to a `K`.
fn status_apply_body<K: Resource<DynamicType = ()>, S: Serialize>(status: &S) -> serde_json::Value {
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

/// Server-side applies `status` on the status subresource under `manager`.
/// The fields `manager` applied before and leaves out now are removed.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, manager: &str, status: &S) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let body = status_apply_body::<K, S>(status);
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Server-side applies a status without forcing: where another manager
/// owns a field with another value the API server refuses the whole apply
/// (409), and this answers `false` having written nothing. Fields that
/// another manager owns with the same value become shared.
pub async fn apply_status_unforced<K, S>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: &S,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let body = status_apply_body::<K, S>(status);
    match api
        .patch_status(name, &PatchParams::apply(manager), &Patch::Apply(&body))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether `manager` owns, through the status subresource, any of the
/// conditions of `types` (a list keyed by type), as the object's managed
/// fields say.
pub fn owns_status_conditions<K: Resource>(obj: &K, manager: &str, types: &[&str]) -> bool {
    let keys: Vec<String> = types
        .iter()
        .map(|t| format!("k:{}", json!({ "type": t })))
        .collect();
    obj.meta()
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(manager) && m.subresource.as_deref() == Some("status")
        })
        .filter_map(|m| m.fields_v1.as_ref())
        .filter_map(|f| f.0.get("f:status")?.get("f:conditions")?.as_object())
        .any(|c| c.keys().any(|k| keys.contains(k)))
}

/// Events waiting to be sent, at most: past it an Event is dropped (and
/// logged), as client-go's broadcaster drops them when its queue is full.
const EVENT_QUEUE: usize = 10_000;
/// Events in flight at once, per process: few, so that Events yield the API
/// server to the writes users wait for (a fleet's statuses) and catch up
/// after.
const EVENTS_IN_FLIGHT: usize = 4;

type QueuedEvent = (Recorder, Event, ObjectReference);

/// The process's Event queue, its sender started on first use.
fn event_queue() -> &'static tokio::sync::mpsc::Sender<QueuedEvent> {
    static QUEUE: OnceLock<tokio::sync::mpsc::Sender<QueuedEvent>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<QueuedEvent>(EVENT_QUEUE);
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(EVENTS_IN_FLIGHT));
            while let Some((recorder, ev, reference)) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                tokio::spawn(async move {
                    publish(&recorder, &ev, &reference).await;
                    drop(slot);
                });
            }
        });
        tx
    })
}

async fn publish(recorder: &Recorder, ev: &Event, reference: &ObjectReference) {
    if let Err(e) = recorder.publish(ev, reference).await {
        tracing::warn!(reason = %ev.reason, error = %e, "cannot publish event");
    }
}

/// What a controller reconciles from a watch that fills `cache` (the
/// events must have passed through the cache's writer first): each object
/// changed, and every object of the cache once a list is complete.
///
/// kube's `applied_objects` hands on each object of a (re)list as it
/// arrives, before the cache holds it: the list is swapped in only at its
/// end. A controller that looks the object up in the cache (kube's does)
/// finds a new one missing and drops the reconcile, and nothing wakes it
/// until the object changes again (after a 410, or kube-apiserver
/// restarting). Here the listed objects are handed on at the end of the
/// list instead, when the cache holds them all.
pub fn reconcile_triggers<K, S>(
    events: S,
    cache: kube::runtime::reflector::Store<K>,
) -> impl futures::Stream<Item = std::result::Result<K, kube::runtime::watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    S: futures::Stream<
            Item = std::result::Result<
                kube::runtime::watcher::Event<K>,
                kube::runtime::watcher::Error,
            >,
        >,
{
    use futures::StreamExt;
    use kube::runtime::watcher::Event as Ev;
    events.flat_map(move |event| {
        let items: Vec<std::result::Result<K, kube::runtime::watcher::Error>> = match event {
            Ok(Ev::Apply(obj)) => vec![Ok(obj)],
            Ok(Ev::InitDone) => cache.state().iter().map(|o| Ok(K::clone(o))).collect(),
            Ok(Ev::Init | Ev::InitApply(_) | Ev::Delete(_)) => Vec::new(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(items)
    })
}

/// A controller of `K` on its own watch, like kube's `Controller::new`,
/// but woken as [`reconcile_triggers`] says: after a relist, once the
/// cache holds the listed objects.
pub fn controller<K>(
    api: Api<K>,
    config: kube::runtime::watcher::Config,
) -> kube::runtime::Controller<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::WatchStreamExt;
    let (cache, writer) = kube::runtime::reflector::store();
    let events = kube::runtime::watcher(api, config).reflect(writer);
    kube::runtime::Controller::for_stream(reconcile_triggers(events, cache.clone()), cache)
}

/// [`event`] sent in the background, through a queue that sends a few at
/// a time: the reconcile goes on to the write that matters (a status a
/// watcher waits for) without a round trip first, and a fleet's Events do
/// not compete with its statuses for the API server (issue 19: two Events
/// per Domain were a third of its requests on the way to Running).
pub fn event_later<K>(
    recorder: &Recorder,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) where
    K: Resource<DynamicType = ()>,
{
    let ev = new_event(type_, reason, action, note);
    let item = (recorder.clone(), ev, obj.object_ref(&()));
    match event_queue().try_send(item) {
        Ok(()) => {}
        Err(tokio::sync::mpsc::error::TrySendError::Full((_, ev, _))) => {
            tracing::warn!(reason = %ev.reason, "event queue full; event dropped");
        }
        // The runtime that ran the queue ended (tests start several):
        // send this one on its own.
        Err(tokio::sync::mpsc::error::TrySendError::Closed((recorder, ev, reference))) => {
            tokio::spawn(async move { publish(&recorder, &ev, &reference).await });
        }
    }
}

fn new_event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    }
}

/// Publishes an Event about an object. A failure to publish is logged, not
/// returned: an Event is a courtesy, not part of the reconcile.
pub async fn event<K>(
    recorder: &Recorder,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) where
    K: Resource<DynamicType = ()>,
{
    publish(
        recorder,
        &new_event(type_, reason, action, note),
        &obj.object_ref(&()),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use vireo_crds::Domain;

    fn entry(
        manager: &str,
        subresource: Option<&str>,
        fields: serde_json::Value,
    ) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Apply".into()),
            subresource: subresource.map(str::to_string),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn status_conditions_belong_to_whoever_the_managed_fields_name() {
        let mut dom: Domain = serde_json::from_value(json!({
            "apiVersion": "vireo.dev/v1alpha1", "kind": "Domain",
            "metadata": {"name": "d"},
            "spec": {"type": "test", "memory": "64Mi", "vcpus": 1}
        }))
        .expect("a Domain");
        let types = ["Scheduled", "HostReachable"];
        assert!(
            !owns_status_conditions(&dom, "vireo-operator", &types),
            "no managed fields"
        );
        dom.metadata.managed_fields = Some(vec![
            // The agent's apply, holding the operator's conditions for it.
            entry(
                "vireo-agent/node-1",
                Some("status"),
                json!({"f:status": {"f:state": {}, "f:conditions": {
                    "k:{\"type\":\"Ready\"}": {".": {}},
                    "k:{\"type\":\"Scheduled\"}": {".": {}}
                }}}),
            ),
            // The operator's binding, on the main resource.
            entry(
                "vireo-operator",
                None,
                json!({"f:metadata": {"f:labels": {}}}),
            ),
        ]);
        assert!(!owns_status_conditions(&dom, "vireo-operator", &types));
        assert!(owns_status_conditions(&dom, "vireo-agent/node-1", &types));
        assert!(!owns_status_conditions(
            &dom,
            "vireo-agent/node-1",
            &["VolumesReady"]
        ));
        if let Some(m) = dom.metadata.managed_fields.as_mut() {
            m.push(entry(
                "vireo-operator",
                Some("status"),
                json!({"f:status": {"f:nodeName": {}, "f:conditions": {
                    "k:{\"type\":\"HostReachable\"}": {".": {}}
                }}}),
            ));
        }
        assert!(owns_status_conditions(&dom, "vireo-operator", &types));
    }

    #[tokio::test]
    async fn a_relist_hands_on_its_objects_once_the_cache_holds_them() {
        use futures::StreamExt;
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::runtime::WatchStreamExt;
        use kube::runtime::reflector;
        use kube::runtime::watcher::Event as Ev;
        let cm = |name: &str| {
            let mut c = ConfigMap::default();
            c.metadata.name = Some(name.into());
            c.metadata.namespace = Some("ns".into());
            c
        };
        let (cache, writer) = reflector::store::<ConfigMap>();
        let events = futures::stream::iter(vec![
            Ok(Ev::Init),
            Ok(Ev::InitApply(cm("old"))),
            Ok(Ev::InitDone),
            Ok(Ev::Apply(cm("changed"))),
            // A relist (after a 410): "old" is gone, "new" appears.
            Ok(Ev::Init),
            Ok(Ev::InitApply(cm("new"))),
            Ok(Ev::InitDone),
            Ok(Ev::Delete(cm("new"))),
        ])
        .reflect(writer);
        let reader = cache.clone();
        let seen: Vec<(String, bool)> = reconcile_triggers(events, cache)
            .map(|r| {
                let obj = r.expect("no error");
                // What the controller's lookup would find at that moment.
                let cached = reader.get(&reflector::ObjectRef::from_obj(&obj)).is_some();
                (obj.name_any(), cached)
            })
            .collect()
            .await;
        assert_eq!(
            seen,
            vec![
                ("old".to_string(), true),
                ("changed".to_string(), true),
                ("new".to_string(), true),
            ],
            "each listed object once the list is in the cache, each change as it comes, no delete"
        );
    }
}
