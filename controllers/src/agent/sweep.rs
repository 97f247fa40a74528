//! Orphan records: a domain record on this node that the agent defined for
//! a Domain object (it carries the object's UID in
//! [`OBJECT_UID_ANNOTATION`]) whose object is gone from the API server.
//!
//! The node-cleanup finalizer tears a record down when its Domain is
//! deleted; a record can still outlive its object when the finalizer is
//! taken off by hand (`kubectl patch ... finalizers: null`) while the agent
//! is down, or when etcd is restored from an older backup. The sweep runs
//! once the agent has listed its Domains from the API server (never after a
//! failed list) and then every few resync periods: a record whose key names
//! no listed Domain of the same UID is a candidate, and a direct GET of its
//! object (not the watch cache) decides: 404, or another object of that
//! name bound elsewhere, and the record is destroyed and undefined, with a
//! log line and `vireo_agent_orphans_swept_total`. Records without the
//! annotation (defined with the CLI on the node's socket, or by an older
//! agent before its first reconcile) are left alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use vireo_crds::labels::{NODE, node_key};
use vireo_crds::{Domain, DomainType};
use vireo_drivers::{Error as DriverError, ListFilter};

use super::Ctx;
use crate::error::Result;

/// The annotation on a node's definition naming the UID of the Domain
/// object it was defined for.
pub(crate) const OBJECT_UID_ANNOTATION: &str = "vireo.dev/object-uid";

/// Marks a node definition as the one of the object `uid`.
pub(crate) fn mark(def: &mut Domain, uid: Option<String>) {
    if let Some(uid) = uid.filter(|u| !u.is_empty()) {
        def.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(OBJECT_UID_ANNOTATION.to_string(), uid);
    }
}

/// What a direct GET of the Domain a record names returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// 404.
    Gone,
    /// An object of that name: its UID and the node it is bound to.
    Found { uid: String, node: Option<String> },
}

/// Whether the record (carrying `record_uid`, or none) is an orphan of
/// this node, given what the API server said about its object.
pub(crate) fn is_orphan(record_uid: Option<&str>, lookup: &Lookup, this_node: &str) -> bool {
    let Some(uid) = record_uid.filter(|u| !u.is_empty()) else {
        // Not defined by the agent for an object: not ours to remove.
        return false;
    };
    match lookup {
        Lookup::Gone => true,
        // The same object: not an orphan. Another object under the name,
        // bound here: the Domain controller redefines the record for it.
        Lookup::Found { uid: now, node } => now != uid && node.as_deref() != Some(this_node),
    }
}

/// The records worth a GET: marked ones whose key names no listed Domain
/// of the same UID. `records` are (key, annotation), `listed` key → UID.
pub(crate) fn candidates<'a>(
    records: &'a [(String, Option<String>)],
    listed: &HashMap<String, String>,
) -> Vec<&'a (String, Option<String>)> {
    records
        .iter()
        .filter(|(key, uid)| {
            uid.as_deref()
                .is_some_and(|u| !u.is_empty() && listed.get(key).map(String::as_str) != Some(u))
        })
        .collect()
}

/// Runs the sweep until the agent stops: first once the API server lists
/// this node's Domains, then every `max(6 × resync, 30 s)`.
pub(crate) async fn run(ctx: Arc<Ctx>) {
    let period = (ctx.config.resync * 6).max(Duration::from_secs(30));
    loop {
        match sweep(&ctx).await {
            Ok(()) => tokio::time::sleep(period).await,
            Err(e) => {
                tracing::warn!(error = %e, "the orphan sweep could not run; trying again");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// One sweep over every hypervisor's records.
async fn sweep(ctx: &Ctx) -> Result<()> {
    let node = ctx.config.node_name.clone();
    let all: Api<Domain> = Api::all(ctx.client.clone());
    // An error returns here: nothing is judged on a failed list.
    let listed: HashMap<String, String> = all
        .list(&ListParams::default().labels(&format!("{NODE}={node}")))
        .await?
        .items
        .iter()
        .map(|d| {
            (
                node_key(&d.namespace().unwrap_or_default(), &d.name_any()),
                d.uid().unwrap_or_default(),
            )
        })
        .collect();
    for ty in ctx.hypervisors.keys().copied().collect::<Vec<DomainType>>() {
        let records = ctx
            .drive_domain(ty, |c| {
                let hv = c.hypervisor();
                let mut out = Vec::new();
                for r in hv.list_domains(ListFilter::All)? {
                    match hv.domain_definition(&r.name, true) {
                        Ok(def) => {
                            let uid = def
                                .metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(OBJECT_UID_ANNOTATION).cloned());
                            out.push((r.name, uid));
                        }
                        // Undefined meanwhile.
                        Err(DriverError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await?;
        for (key, uid) in candidates(&records, &listed) {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let api: Api<Domain> = Api::namespaced(ctx.client.clone(), ns);
            let lookup = match api.get_opt(name).await? {
                None => Lookup::Gone,
                Some(d) => Lookup::Found {
                    uid: d.uid().unwrap_or_default(),
                    node: d.meta().labels.as_ref().and_then(|l| l.get(NODE).cloned()),
                },
            };
            if !is_orphan(uid.as_deref(), &lookup, &node) {
                continue;
            }
            let (k, stale) = (key.clone(), uid.clone());
            // Checked again just before: a Domain created under the name
            // since (and defined here with its own UID) is not touched.
            let removed = ctx
                .drive_domain(ty, move |c| {
                    let hv = c.hypervisor();
                    let def = match hv.domain_definition(&k, true) {
                        Ok(d) => d,
                        Err(DriverError::NotFound(_)) => return Ok(false),
                        Err(e) => return Err(e),
                    };
                    let now = def
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(OBJECT_UID_ANNOTATION).cloned());
                    if now != stale {
                        return Ok(false);
                    }
                    match hv.domain_state(&k) {
                        Ok((s, _)) if s.is_active() => hv.destroy_domain(&k)?,
                        Ok(_) => {}
                        Err(DriverError::NotFound(_)) => return Ok(false),
                        Err(e) => return Err(e),
                    }
                    match hv.undefine_domain(&k) {
                        Ok(()) | Err(DriverError::NotFound(_)) => Ok(true),
                        Err(e) => Err(e),
                    }
                })
                .await?;
            if removed {
                ctx.metrics.orphan_swept();
                ctx.forget(key);
                tracing::info!(
                    domain = %key,
                    driver = %ty,
                    uid = uid.as_deref().unwrap_or_default(),
                    "destroyed and undefined an orphan record: its Domain object is gone from the API server"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(uid: &str, node: Option<&str>) -> Lookup {
        Lookup::Found {
            uid: uid.into(),
            node: node.map(str::to_string),
        }
    }

    #[test]
    fn a_record_of_a_deleted_object_is_an_orphan() {
        assert!(is_orphan(Some("a"), &Lookup::Gone, "node-1"));
    }

    #[test]
    fn a_record_of_a_live_object_is_kept() {
        assert!(!is_orphan(Some("a"), &found("a", Some("node-1")), "node-1"));
        // Even bound elsewhere (a move in progress): the same object.
        assert!(!is_orphan(Some("a"), &found("a", Some("node-2")), "node-1"));
        assert!(!is_orphan(Some("a"), &found("a", None), "node-1"));
    }

    #[test]
    fn a_record_of_a_replaced_object_goes_unless_the_new_one_is_bound_here() {
        assert!(is_orphan(Some("a"), &found("b", Some("node-2")), "node-1"));
        assert!(is_orphan(Some("a"), &found("b", None), "node-1"));
        assert!(!is_orphan(Some("a"), &found("b", Some("node-1")), "node-1"));
    }

    #[test]
    fn records_vireo_did_not_define_are_left_alone() {
        assert!(!is_orphan(None, &Lookup::Gone, "node-1"));
        assert!(!is_orphan(Some(""), &Lookup::Gone, "node-1"));
    }

    #[test]
    fn only_marked_records_without_a_listed_object_of_their_uid_are_looked_up() {
        let records = vec![
            ("default/web".to_string(), Some("a".to_string())),
            ("default/old".to_string(), Some("b".to_string())),
            ("default/renamed".to_string(), Some("c".to_string())),
            ("mine".to_string(), None),
        ];
        let listed: HashMap<String, String> = [
            ("default/web".to_string(), "a".to_string()),
            ("default/renamed".to_string(), "z".to_string()),
        ]
        .into_iter()
        .collect();
        let keys: Vec<&str> = candidates(&records, &listed)
            .into_iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["default/old", "default/renamed"]);
    }

    #[test]
    fn marking_sets_the_uid_and_keeps_other_annotations() {
        let mut d: Domain = serde_json::from_value(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1",
            "kind": "Domain",
            "metadata": {"name": "web", "annotations": {"team": "x"}},
            "spec": {"type": "test", "memory": "1Gi", "vcpus": 1},
        }))
        .expect("a Domain");
        mark(&mut d, Some("u-1".into()));
        let a = d.metadata.annotations.expect("annotations");
        assert_eq!(
            a.get(OBJECT_UID_ANNOTATION).map(String::as_str),
            Some("u-1")
        );
        assert_eq!(a.get("team").map(String::as_str), Some("x"));
        let mut e: Domain = serde_json::from_value(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1",
            "kind": "Domain",
            "metadata": {"name": "web"},
            "spec": {"type": "test", "memory": "1Gi", "vcpus": 1},
        }))
        .expect("a Domain");
        mark(&mut e, None);
        assert!(e.metadata.annotations.is_none());
    }
}
