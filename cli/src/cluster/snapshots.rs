//! Domain snapshots on a cluster (`vireo -c kube:/// snapshot-*`): a
//! snapshot is a DomainSnapshot object, a revert a DomainRestore, and the
//! Domain's agent carries both out on its node. The commands make those
//! objects, wait for the agent's answer in their status, and read the
//! snapshots back as a node's driver lists them.
//!
//! What a cluster cannot say as a node does:
//! * the current snapshot is the one last taken or returned to (the newest
//!   of a ready snapshot's creation time and a done restore's completion
//!   time); a node's driver records it instead;
//! * a snapshot's name is its DomainSnapshot's, so it is unique in the
//!   namespace, not per Domain, and must be a Kubernetes object name;
//! * `snapshot-revert --running/--paused` are refused: a DomainRestore
//!   returns the Domain to the snapshot's own state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use vireo_crds::{
    Domain, DomainRestore, DomainRestoreSpec, DomainSnapshot, DomainSnapshotSpec, ObjectKind,
    SnapshotPhase,
};
use vireo_drivers::error::ObjectName;
use vireo_drivers::snapshot::{
    RevertTo, SnapshotDisk, SnapshotInfo, SnapshotParams, SnapshotState,
};
use vireo_drivers::{Error, Result};

use super::{Kube, api_error, full_name};

const SNAPSHOT: ObjectKind = ObjectKind::DomainSnapshot;

/// How long a command waits for the agent to take, restore or delete a
/// snapshot (a guest's memory is written on its node meanwhile).
const WAIT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(250);

/// Unix seconds of an RFC 3339 time, 0 when it does not parse.
fn unix_seconds(t: Option<&str>) -> u64 {
    t.and_then(|t| t.parse::<Timestamp>().ok())
        .map_or(0, |t| u64::try_from(t.as_second()).unwrap_or(0))
}

fn snapshot_state(text: Option<&str>, memory: bool) -> SnapshotState {
    match text {
        Some("running") => SnapshotState::Running,
        Some("paused") => SnapshotState::Paused,
        Some("disk-snapshot") => SnapshotState::DiskSnapshot,
        Some("shutoff") => SnapshotState::Shutoff,
        // Not said: what its memory tells.
        _ if memory => SnapshotState::Running,
        _ => SnapshotState::Shutoff,
    }
}

/// The name of the current snapshot among `ready` (name, created at) and
/// the done restores (snapshot name, done at): the newest event wins, a
/// restore over a creation at the same second.
pub fn current_of(ready: &[(String, u64)], restored: &[(String, u64)]) -> Option<String> {
    let known = |name: &str| ready.iter().any(|(n, _)| n == name);
    ready
        .iter()
        .map(|(n, t)| (*t, 0u8, n))
        .chain(
            restored
                .iter()
                .filter(|(n, _)| known(n))
                .map(|(n, t)| (*t, 1u8, n)),
        )
        .max()
        .map(|(_, _, n)| n.clone())
}

/// The snapshots as a node's driver gives them, oldest first, with their
/// children counted and the current one marked.
fn infos(
    domain: &Domain,
    shown: &str,
    snaps: &[DomainSnapshot],
    current: Option<&str>,
) -> Vec<SnapshotInfo> {
    let mut out: Vec<SnapshotInfo> = snaps
        .iter()
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            let memory = st.memory.unwrap_or(false);
            SnapshotInfo {
                name: s.name_any(),
                domain: shown.to_string(),
                description: s.spec.description.clone(),
                creation_time: unix_seconds(st.creation_time.as_deref()),
                state: snapshot_state(st.domain_state.as_deref(), memory),
                parent: st.parent.clone(),
                current: current == Some(s.name_any().as_str()),
                memory,
                disks: st
                    .disks
                    .iter()
                    .map(|d| SnapshotDisk {
                        name: d.name.clone(),
                        volume: d.volume.clone(),
                        location: d.location.clone(),
                    })
                    .collect(),
                children: 0,
                descendants: 0,
                // The Domain as it is now: the node keeps the definition
                // the snapshot was taken with, and a restore uses that one.
                definition: domain.clone(),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        a.creation_time
            .cmp(&b.creation_time)
            .then_with(|| a.name.cmp(&b.name))
    });
    // A parent deleted since is no parent: its children are roots now (as a
    // node's driver re-parents them), so `--tree` still shows them.
    let names: Vec<String> = out.iter().map(|s| s.name.clone()).collect();
    for s in &mut out {
        if s.parent.as_ref().is_some_and(|p| !names.contains(p)) {
            s.parent = None;
        }
    }
    let parents: BTreeMap<String, Option<String>> = out
        .iter()
        .map(|s| (s.name.clone(), s.parent.clone()))
        .collect();
    for s in &mut out {
        s.children = parents
            .values()
            .filter(|p| p.as_deref() == Some(s.name.as_str()))
            .count();
        s.descendants = parents
            .keys()
            .filter(|n| {
                // Walk up from n; the map is finite, so stop after its size.
                let mut at = parents.get(*n).cloned().flatten();
                for _ in 0..parents.len() {
                    match at {
                        Some(p) if p == s.name => return true,
                        Some(p) => at = parents.get(&p).cloned().flatten(),
                        None => return false,
                    }
                }
                false
            })
            .count();
    }
    out
}

/// Waits until `done` says what the object came to (`Some`), polling
/// `get`; `None` from `get` is the object gone.
fn wait<T, F, Fut>(
    kube: &Kube,
    what: &str,
    mut get: F,
    mut done: impl FnMut(Option<&T>) -> Option<Result<()>>,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Option<T>, kube::Error>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let now = kube
            .block_on(get())
            .map_err(|e| api_error(SNAPSHOT, what, e))?;
        if let Some(answer) = done(now.as_ref()) {
            return answer;
        }
        if Instant::now() > deadline {
            return Err(Error::OperationFailed {
                object: ObjectName::new(SNAPSHOT, what),
                message: format!(
                    "no answer from the Domain's agent after {} s; it goes on (kubectl get {what})",
                    WAIT.as_secs()
                ),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until the object's agent has settled it (`Ready` or `Failed`):
/// `None` when it is ready, the agent's reason when it failed. An object
/// deleted meanwhile is an error saying `gone`.
fn settled<T, F, Fut>(
    kube: &Kube,
    what: &str,
    get: F,
    gone: &str,
    phase_of: impl Fn(&T) -> Option<(SnapshotPhase, Option<String>)>,
) -> Result<Option<String>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Option<T>, kube::Error>>,
{
    let mut failed = None;
    wait(kube, what, get, |o: Option<&T>| {
        let Some(o) = o else {
            return Some(Err(Error::OperationFailed {
                object: ObjectName::new(SNAPSHOT, what),
                message: gone.to_string(),
            }));
        };
        match phase_of(o)? {
            (SnapshotPhase::Ready, _) => Some(Ok(())),
            (SnapshotPhase::Failed, why) => {
                failed = Some(why.unwrap_or_else(|| "no reason given".into()));
                Some(Ok(()))
            }
            _ => None,
        }
    })?;
    Ok(failed)
}

/// The snapshots of a Domain that are ready, and its done restores as
/// (snapshot, done at).
type OfDomain = (Vec<DomainSnapshot>, Vec<(String, u64)>);

/// The Domain's ready snapshots and done restores in its namespace.
fn of_domain(kube: &Kube, ns: &str, name: &str) -> Result<OfDomain> {
    let snaps: Api<DomainSnapshot> = Api::namespaced(kube.client().clone(), ns);
    let restores: Api<DomainRestore> = Api::namespaced(kube.client().clone(), ns);
    let shown = full_name(ns, name);
    let all = kube
        .block_on(snaps.list(&ListParams::default()))
        .map_err(|e| api_error(SNAPSHOT, &shown, e))?
        .items;
    let ready: Vec<DomainSnapshot> = all
        .into_iter()
        .filter(|s| {
            s.spec.domain_name == name
                && s.metadata.deletion_timestamp.is_none()
                && s.status.as_ref().is_some_and(|st| st.ready_to_use)
        })
        .collect();
    let done = kube
        .block_on(restores.list(&ListParams::default()))
        .map_err(|e| api_error(SNAPSHOT, &shown, e))?
        .items
        .into_iter()
        .filter(|r| r.spec.domain_name == name)
        .filter_map(|r| {
            let st = r.status.as_ref()?;
            (st.phase == SnapshotPhase::Ready).then(|| {
                (
                    r.spec.snapshot_name.clone(),
                    unix_seconds(st.completion_time.as_deref()),
                )
            })
        })
        .collect();
    Ok((ready, done))
}

/// `snapshot-list` (and through it `snapshot-info`, `-current`, `-dumpxml`).
pub fn list(kube: &Kube, domain: &Domain, ns: &str) -> Result<Vec<SnapshotInfo>> {
    let name = domain.name_any();
    let (ready, restored) = of_domain(kube, ns, &name)?;
    let created: Vec<(String, u64)> = ready
        .iter()
        .map(|s| {
            let st = s.status.as_ref();
            (
                s.name_any(),
                unix_seconds(st.and_then(|st| st.creation_time.as_deref())),
            )
        })
        .collect();
    let current = current_of(&created, &restored);
    Ok(infos(
        domain,
        &full_name(ns, &name),
        &ready,
        current.as_deref(),
    ))
}

/// A Domain no agent holds yet (no node) would leave a snapshot or a
/// restore waiting: refused at once instead.
fn on_a_node(domain: &Domain, ns: &str) -> Result<()> {
    if domain
        .status
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some()
    {
        return Ok(());
    }
    Err(Error::invalid_state(
        ObjectKind::Domain,
        full_name(ns, &domain.name_any()),
        "is on no node yet: its node's agent takes and restores its snapshots",
    ))
}

/// `snapshot-create-as`: a DomainSnapshot, once its agent has taken it.
pub fn create(
    kube: &Kube,
    domain: &Domain,
    ns: &str,
    params: &SnapshotParams,
) -> Result<SnapshotInfo> {
    on_a_node(domain, ns)?;
    let name = domain.name_any();
    let snap_name = params
        .name
        .clone()
        .unwrap_or_else(|| Timestamp::now().as_second().to_string());
    let shown = full_name(ns, &snap_name);
    let api: Api<DomainSnapshot> = Api::namespaced(kube.client().clone(), ns);
    let object = DomainSnapshot::new(
        &snap_name,
        DomainSnapshotSpec {
            domain_name: name.clone(),
            include_memory: params.disk_only.then_some(false),
            description: params.description.clone(),
        },
    );
    kube.block_on(api.create(&PostParams::default(), &object))
        .map_err(|e| api_error(SNAPSHOT, &shown, e))?;
    let failed = settled(
        kube,
        &format!("domainsnapshot -n {ns} {snap_name}"),
        || api.get_opt(&snap_name),
        "the DomainSnapshot was deleted while it was being taken",
        |s: &DomainSnapshot| s.status.as_ref().map(|st| (st.phase, st.message.clone())),
    )?;
    if let Some(why) = failed {
        // virsh leaves nothing behind a snapshot that failed: neither do
        // we, so that the same name can be tried again.
        let gone = kube.block_on(api.delete(&snap_name, &DeleteParams::default()));
        let left = if gone.is_ok() {
            String::new()
        } else {
            format!(" (DomainSnapshot {shown} is left; kubectl delete it)")
        };
        return Err(Error::OperationFailed {
            object: ObjectName::new(SNAPSHOT, &shown),
            message: format!("taking the snapshot failed: {why}{left}"),
        });
    }
    list(kube, domain, ns)?
        .into_iter()
        .find(|s| s.name == snap_name)
        .ok_or_else(|| Error::not_found(SNAPSHOT, &shown))
}

/// The DomainSnapshot `snapshot` of the Domain `name`, ready.
fn ready_snapshot(kube: &Kube, ns: &str, name: &str, snapshot: &str) -> Result<DomainSnapshot> {
    let api: Api<DomainSnapshot> = Api::namespaced(kube.client().clone(), ns);
    let shown = full_name(ns, snapshot);
    let s = kube
        .block_on(api.get_opt(snapshot))
        .map_err(|e| api_error(SNAPSHOT, &shown, e))?
        .filter(|s| s.spec.domain_name == name)
        .ok_or_else(|| Error::not_found(SNAPSHOT, &shown))?;
    Ok(s)
}

/// `snapshot-revert`: a DomainRestore, once its agent has done it.
pub fn revert(kube: &Kube, domain: &Domain, ns: &str, snapshot: &str, to: RevertTo) -> Result<()> {
    let name = domain.name_any();
    if to != RevertTo::Snapshot {
        return Err(Error::invalid_argument(
            ObjectKind::Domain,
            full_name(ns, &name),
            "--running and --paused are not for a cluster: a DomainRestore returns the Domain to the snapshot's own state (start or suspend it afterwards)",
        ));
    }
    on_a_node(domain, ns)?;
    let s = ready_snapshot(kube, ns, &name, snapshot)?;
    if s.metadata.deletion_timestamp.is_some() {
        return Err(Error::invalid_state(
            SNAPSHOT,
            full_name(ns, snapshot),
            "is being deleted",
        ));
    }
    if !s.status.as_ref().is_some_and(|st| st.ready_to_use) {
        return Err(Error::invalid_state(
            SNAPSHOT,
            full_name(ns, snapshot),
            "is not ready to use",
        ));
    }
    let api: Api<DomainRestore> = Api::namespaced(kube.client().clone(), ns);
    let mut object = DomainRestore::new(
        "",
        DomainRestoreSpec {
            domain_name: name.clone(),
            snapshot_name: snapshot.to_string(),
        },
    );
    object.metadata.name = None;
    object.metadata.generate_name = Some(super::generate_name(&name));
    let created = kube
        .block_on(api.create(&PostParams::default(), &object))
        .map_err(|e| api_error(SNAPSHOT, &full_name(ns, &name), e))?;
    let rname = created.name_any();
    let failed = settled(
        kube,
        &format!("domainrestore -n {ns} {rname}"),
        || api.get_opt(&rname),
        "the DomainRestore was deleted before it was done",
        |r: &DomainRestore| r.status.as_ref().map(|st| (st.phase, st.message.clone())),
    )?;
    match failed {
        None => Ok(()),
        Some(why) => Err(Error::OperationFailed {
            object: ObjectName::new(ObjectKind::Domain, full_name(ns, &name)),
            message: format!(
                "reverting to snapshot {snapshot} failed: {why} (DomainRestore {ns}/{rname})"
            ),
        }),
    }
}

/// `snapshot-delete`: the DomainSnapshot, once its agent has deleted the
/// snapshot on its node (its finalizer).
pub fn delete(kube: &Kube, domain: &Domain, ns: &str, snapshot: &str) -> Result<()> {
    let name = domain.name_any();
    ready_snapshot(kube, ns, &name, snapshot)?;
    let api: Api<DomainSnapshot> = Api::namespaced(kube.client().clone(), ns);
    let shown = full_name(ns, snapshot);
    kube.block_on(api.delete(snapshot, &DeleteParams::default()))
        .map_err(|e| api_error(SNAPSHOT, &shown, e))?;
    wait(
        kube,
        &format!("domainsnapshot -n {ns} {snapshot}"),
        || api.get_opt(snapshot),
        |s: Option<&DomainSnapshot>| s.is_none().then_some(Ok(())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    }

    #[test]
    fn the_current_snapshot_is_the_last_taken_or_returned_to() {
        assert_eq!(current_of(&[], &[]), None);
        let ready = named(&[("a", 10), ("b", 20)]);
        assert_eq!(current_of(&ready, &[]).as_deref(), Some("b"));
        assert_eq!(
            current_of(&ready, &named(&[("a", 30)])).as_deref(),
            Some("a"),
            "returned to after b was taken"
        );
        assert_eq!(
            current_of(&ready, &named(&[("a", 20)])).as_deref(),
            Some("a"),
            "a restore wins a tie"
        );
        assert_eq!(
            current_of(&ready, &named(&[("gone", 99)])).as_deref(),
            Some("b"),
            "a restore of a snapshot since deleted does not count"
        );
    }

    #[test]
    fn a_deleted_parent_leaves_its_children_as_roots() {
        let domain: Domain = serde_json::from_value(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1", "kind": "Domain",
            "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"type": "test", "memory": "1Gi", "vcpus": 1},
        }))
        .expect("a Domain");
        let snap = |name: &str, parent: Option<&str>, at: &str| -> DomainSnapshot {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "vireo.dev/v1alpha1", "kind": "DomainSnapshot",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"domainName": "d"},
                "status": {"phase": "Ready", "readyToUse": true, "creationTime": at,
                           "domainState": "running", "memory": true, "parent": parent},
            }))
            .expect("a DomainSnapshot")
        };
        // a <- b <- c, and d whose parent was deleted.
        let all = [
            snap("c", Some("b"), "2026-12-05T10:00:03Z"),
            snap("a", None, "2026-12-05T10:00:01Z"),
            snap("b", Some("a"), "2026-12-05T10:00:02Z"),
            snap("d", Some("gone"), "2026-12-05T10:00:04Z"),
        ];
        let got = infos(&domain, "ns/d", &all, Some("c"));
        let view: Vec<(&str, Option<&str>, usize, usize, bool)> = got
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.parent.as_deref(),
                    s.children,
                    s.descendants,
                    s.current,
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                ("a", None, 1, 2, false),
                ("b", Some("a"), 1, 1, false),
                ("c", Some("b"), 0, 0, true),
                ("d", None, 0, 0, false),
            ]
        );
    }

    #[test]
    fn times_and_states_read_as_on_a_node() {
        assert_eq!(unix_seconds(Some("2026-12-05T14:00:00Z")), 1_796_479_200);
        assert_eq!(unix_seconds(Some("yesterday")), 0);
        assert_eq!(unix_seconds(None), 0);
        assert_eq!(snapshot_state(Some("paused"), true), SnapshotState::Paused);
        assert_eq!(
            snapshot_state(Some("disk-snapshot"), false),
            SnapshotState::DiskSnapshot
        );
        assert_eq!(snapshot_state(None, false), SnapshotState::Shutoff);
    }
}
