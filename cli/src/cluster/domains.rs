//! Domains on a cluster: read from the Domain objects and their status,
//! changed through their spec (which the agents carry out).

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use vireo_crds::labels::{PAUSED_ANNOTATION, REQUEST_ANNOTATION, STOP_ANNOTATION, STOP_DESTROY};
use vireo_crds::quantity::{format_bytes, parse_quantity};
use vireo_crds::{
    Domain, DomainInfo, DomainReason, DomainState, NodeInfo, ObjectKind, RunStrategy,
};
use vireo_drivers::{Affect, DomainRef, Error, HypervisorDriver, ListFilter, Lookup, Result};

use super::{Kube, api_error, apply_params, for_apply, full_name, unsupported};

const KIND: ObjectKind = ObjectKind::Domain;

pub struct Domains(pub Arc<Kube>);

/// The state a Domain's status reports; `pending` before an agent wrote one.
fn state_of(d: &Domain) -> (DomainState, DomainReason) {
    let status = d.status.as_ref();
    let state = status
        .and_then(|s| s.info.as_ref().map(|i| i.state).or(s.state))
        .unwrap_or(DomainState::Pending);
    let reason = status
        .and_then(|s| s.info.as_ref())
        .map_or(DomainReason::Unknown, |i| i.reason);
    (state, reason)
}

/// Whether the Domain asks its agent to keep it paused.
fn wants_paused(d: &Domain) -> bool {
    d.annotations()
        .get(PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// A Domain as a lookup returns it: `NS/NAME`, its UUID, its ID while active.
fn reference(d: &Domain) -> DomainRef {
    let status = d.status.as_ref();
    let active = state_of(d).0.is_active();
    DomainRef {
        name: full_name(&d.namespace().unwrap_or_default(), &d.name_any()),
        uuid: status
            .and_then(|s| s.uuid.clone())
            .or_else(|| d.spec.uuid.clone())
            .unwrap_or_default(),
        id: status.and_then(|s| s.id).filter(|_| active),
    }
}

/// Active ones first in ID order, then the others by name, as on a node.
fn sorted(mut refs: Vec<DomainRef>) -> Vec<DomainRef> {
    refs.sort_by(|a, b| match (a.id, b.id) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.name.cmp(&b.name)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.name.cmp(&b.name),
    });
    refs
}

impl Domains {
    fn api(&self, namespace: &str) -> Api<Domain> {
        Api::namespaced(self.0.client().clone(), namespace)
    }

    /// The Domain `NAME` or `NS/NAME`, and its full name.
    fn get(&self, text: &str) -> Result<(Domain, String)> {
        let (ns, name) = self.0.split(text);
        let full = full_name(ns, name);
        let d = self
            .0
            .block_on(self.api(ns).get(name))
            .map_err(|e| api_error(KIND, &full, e))?;
        Ok((d, full))
    }

    fn list_in(&self, api: Api<Domain>, what: &str) -> Result<Vec<Domain>> {
        self.0
            .block_on(api.list(&ListParams::default()))
            .map(|l| l.items)
            .map_err(|e| api_error(KIND, what, e))
    }

    /// A JSON merge patch of the Domain `text`.
    fn patch(&self, text: &str, patch: serde_json::Value) -> Result<Domain> {
        let (ns, name) = self.0.split(text);
        let full = full_name(ns, name);
        self.0
            .block_on(
                self.api(ns)
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .map_err(|e| api_error(KIND, &full, e))
    }

    /// Sets the run strategy, with or without the request to stop at once.
    fn run(&self, text: &str, strategy: RunStrategy, stop: Option<&str>) -> Result<Domain> {
        self.patch(
            text,
            json!({
                "metadata": {"annotations": {STOP_ANNOTATION: stop, PAUSED_ANNOTATION: null}},
                "spec": {"runStrategy": strategy},
            }),
        )
    }

    /// Applies a Domain (server-side apply, field manager `vireo-cli`) in
    /// its namespace, else the connection's.
    fn apply(&self, domain: &Domain) -> Result<DomainRef> {
        let mut d = domain.clone();
        let name = d.name_any();
        let ns = d
            .namespace()
            .unwrap_or_else(|| self.0.namespace().to_string());
        let full = full_name(&ns, &name);
        d.metadata.namespace = Some(ns.clone());
        for_apply(&mut d.metadata);
        d.status = None;
        let applied = self
            .0
            .block_on(
                self.api(&ns)
                    .patch(&name, &apply_params(), &Patch::Apply(&d)),
            )
            .map_err(|e| api_error(KIND, &full, e))?;
        Ok(reference(&applied))
    }

    /// A one-shot request the agent carries out on the running domain.
    fn ask(&self, text: &str, request: &str) -> Result<()> {
        let (d, full) = self.get(text)?;
        if !state_of(&d).0.is_active() {
            return Err(Error::invalid_state(KIND, full, "is not running"));
        }
        self.patch(
            text,
            json!({"metadata": {"annotations": {REQUEST_ANNOTATION: request}}}),
        )
        .map(|_| ())
    }

    fn stop(&self, text: &str, at_once: bool) -> Result<()> {
        let (d, full) = self.get(text)?;
        let (state, _) = state_of(&d);
        if !state.is_active()
            && matches!(
                d.spec.run_strategy,
                RunStrategy::Halted | RunStrategy::Manual | RunStrategy::Saved
            )
        {
            return Err(Error::invalid_state(KIND, full, "is not running"));
        }
        self.run(text, RunStrategy::Halted, at_once.then_some(STOP_DESTROY))
            .map(|_| ())
    }
}

impl HypervisorDriver for Domains {
    fn name(&self) -> &'static str {
        "kube"
    }

    fn hypervisor_version(&self) -> String {
        match self.0.block_on(self.0.client().apiserver_version()) {
            Ok(v) => v.git_version.trim_start_matches('v').to_string(),
            Err(_) => "unknown".to_string(),
        }
    }

    fn node_info(&self) -> Result<NodeInfo> {
        Err(unsupported(
            ObjectKind::Host,
            "cluster",
            "node info (a cluster has many nodes: kubectl get hosts)",
        ))
    }

    fn hostname(&self) -> Result<String> {
        Err(unsupported(
            ObjectKind::Host,
            "cluster",
            "a host name (a cluster has many nodes: kubectl get hosts)",
        ))
    }

    fn list_domains(&self, filter: ListFilter) -> Result<Vec<DomainRef>> {
        let ns = self.0.namespace().to_string();
        let items = self.list_in(self.api(&ns), &format!("{ns}/*"))?;
        Ok(sorted(
            items
                .iter()
                .filter(|d| filter.accepts(state_of(d).0.is_active()))
                .map(reference)
                .collect(),
        ))
    }

    fn list_domains_all_namespaces(&self, filter: ListFilter) -> Result<Vec<DomainRef>> {
        let items = self.list_in(Api::all(self.0.client().clone()), "*/*")?;
        Ok(sorted(
            items
                .iter()
                .filter(|d| filter.accepts(state_of(d).0.is_active()))
                .map(reference)
                .collect(),
        ))
    }

    fn spans_nodes(&self) -> bool {
        true
    }

    fn domain_node(&self, name: &str) -> Result<Option<String>> {
        let (d, _) = self.get(name)?;
        Ok(d.status
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .or_else(|| d.labels().get(vireo_crds::labels::NODE).cloned()))
    }

    fn lookup_domain(&self, key: Lookup<'_>) -> Result<DomainRef> {
        match key {
            Lookup::Name(text) => self.get(text).map(|(d, _)| reference(&d)),
            // IDs are per node; in the connection's namespace one must match.
            Lookup::Id(_) | Lookup::Uuid(_) => {
                let found: Vec<DomainRef> = self
                    .list_domains(ListFilter::All)?
                    .into_iter()
                    .filter(|r| match key {
                        Lookup::Id(id) => r.id == Some(id),
                        Lookup::Uuid(u) => r.uuid.eq_ignore_ascii_case(&u.to_string()),
                        Lookup::Name(_) => false,
                    })
                    .collect();
                match found.as_slice() {
                    [one] => Ok(one.clone()),
                    [] => Err(Error::not_found(KIND, key.describe())),
                    _ => Err(Error::invalid_argument(
                        KIND,
                        key.describe(),
                        "more than one domain has this ID (IDs are per node); use NS/NAME",
                    )),
                }
            }
        }
    }

    /// The Domain as defined: its spec and metadata, without the status
    /// its agent writes (`dominfo`, `domstate` read that).
    fn domain_definition(&self, name: &str, _inactive: bool) -> Result<Domain> {
        let (mut d, _) = self.get(name)?;
        d.metadata.managed_fields = None;
        d.status = None;
        Ok(d)
    }

    fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        let (d, _) = self.get(name)?;
        if let Some(info) = d.status.as_ref().and_then(|s| s.info.clone()) {
            return Ok(info);
        }
        let (state, reason) = state_of(&d);
        Ok(DomainInfo {
            state,
            reason,
            max_memory: d.spec.memory.clone(),
            memory: d
                .spec
                .current_memory
                .clone()
                .unwrap_or_else(|| d.spec.memory.clone()),
            vcpus: d.spec.vcpus,
            cpu_time_ns: 0,
        })
    }

    fn domain_is_persistent(&self, name: &str) -> Result<bool> {
        self.get(name).map(|_| true)
    }

    /// A Domain that is kept running (`runStrategy: Always`) starts with
    /// its node.
    fn domain_autostart(&self, name: &str) -> Result<bool> {
        let (d, _) = self.get(name)?;
        Ok(d.spec.run_strategy == RunStrategy::Always)
    }

    /// `--enable`: `runStrategy: Always`; `--disable`: `Manual`.
    fn set_domain_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.get(name)?;
        let strategy = if autostart {
            RunStrategy::Always
        } else {
            RunStrategy::Manual
        };
        self.patch(name, json!({"spec": {"runStrategy": strategy}}))
            .map(|_| ())
    }

    fn set_domain_memory(&self, name: &str, bytes: u64) -> Result<()> {
        let (d, full) = self.get(name)?;
        let max = parse_quantity(&d.spec.memory).unwrap_or(0);
        if bytes == 0 || bytes > max {
            return Err(Error::invalid_argument(
                KIND,
                full,
                format!(
                    "cannot set memory to {} KiB: it must be above 0 and at most the maximum of {} KiB",
                    bytes / 1024,
                    max / 1024
                ),
            ));
        }
        self.patch(
            name,
            json!({"spec": {"currentMemory": format_bytes(bytes)}}),
        )
        .map(|_| ())
    }

    fn set_domain_vcpus(&self, name: &str, vcpus: u32) -> Result<()> {
        let (d, full) = self.get(name)?;
        let max = d.spec.max_vcpus.unwrap_or(d.spec.vcpus);
        if vcpus == 0 || vcpus > max {
            return Err(Error::invalid_argument(
                KIND,
                full,
                format!("requested vcpus {vcpus} is outside 1..={max} (spec.maxVcpus)"),
            ));
        }
        self.patch(name, json!({"spec": {"vcpus": vcpus, "maxVcpus": max}}))
            .map(|_| ())
    }

    /// On a cluster every change is to the spec: `--live`, `--config` and
    /// `--current` all patch it, and the agent redefines the domain (a
    /// running guest gets it at its next start).
    fn set_domain_memory_flags(&self, name: &str, bytes: u64, _affect: Affect) -> Result<()> {
        self.set_domain_memory(name, bytes)
    }

    fn set_domain_vcpus_flags(&self, name: &str, vcpus: u32, _affect: Affect) -> Result<()> {
        self.set_domain_vcpus(name, vcpus)
    }

    fn define_domain(&self, domain: &Domain) -> Result<DomainRef> {
        self.apply(domain)
    }

    /// A transient domain has no cluster form: `create` applies the
    /// Domain with `runStrategy: Always`, so that it starts now.
    fn create_domain(&self, domain: &Domain) -> Result<DomainRef> {
        let mut d = domain.clone();
        d.spec.run_strategy = RunStrategy::Always;
        self.apply(&d)
    }

    /// Deletes the Domain; its agent destroys and undefines it on its node.
    fn undefine_domain(&self, name: &str) -> Result<()> {
        let (ns, n) = self.0.split(name);
        let full = full_name(ns, n);
        self.0
            .block_on(self.api(ns).delete(n, &DeleteParams::default()))
            .map(|_| ())
            .map_err(|e| api_error(KIND, &full, e))
    }

    /// `runStrategy: Always`: the agent starts it (and keeps it running).
    fn start_domain(&self, name: &str) -> Result<DomainRef> {
        let (d, full) = self.get(name)?;
        if state_of(&d).0.is_active() {
            return Err(Error::invalid_state(KIND, full, "is already active"));
        }
        self.run(name, RunStrategy::Always, None)
            .map(|d| reference(&d))
    }

    /// `runStrategy: Halted`: the agent asks the guest to shut down (and
    /// destroys it after its stop timeout).
    fn shutdown_domain(&self, name: &str) -> Result<()> {
        self.stop(name, false)
    }

    /// `runStrategy: Halted` with `vireo.dev/stop: destroy`: the agent
    /// stops it at once.
    fn destroy_domain(&self, name: &str) -> Result<()> {
        self.stop(name, true)
    }

    /// `vireo.dev/request: reboot`: the agent reboots it once.
    fn reboot_domain(&self, name: &str) -> Result<()> {
        self.ask(name, "reboot")
    }

    /// `vireo.dev/request: reset`: the agent resets it once.
    fn reset_domain(&self, name: &str) -> Result<()> {
        self.ask(name, "reset")
    }

    /// `vireo.dev/paused: "true"`: the agent pauses it (and keeps it paused).
    fn suspend_domain(&self, name: &str) -> Result<()> {
        let (d, full) = self.get(name)?;
        match state_of(&d).0 {
            DomainState::Paused => Err(Error::invalid_state(KIND, full, "is already paused")),
            s if !s.is_active() => Err(Error::invalid_state(KIND, full, "is not running")),
            _ => self
                .patch(
                    name,
                    json!({"metadata": {"annotations": {PAUSED_ANNOTATION: "true"}}}),
                )
                .map(|_| ()),
        }
    }

    /// Removes `vireo.dev/paused`: the agent resumes it.
    fn resume_domain(&self, name: &str) -> Result<()> {
        let (d, full) = self.get(name)?;
        if state_of(&d).0 != DomainState::Paused && !wants_paused(&d) {
            return Err(Error::invalid_state(KIND, full, "is not paused"));
        }
        self.patch(
            name,
            json!({"metadata": {"annotations": {PAUSED_ANNOTATION: null}}}),
        )
        .map(|_| ())
    }

    fn open_console(&self, name: &str) -> Result<std::os::unix::net::UnixStream> {
        let (ns, n) = self.0.split(name);
        super::subresources::open_console(self.0.client(), self.0.runtime(), ns, n)
    }

    /// The addresses the agent put in `status.interfaces` (the networks'
    /// leases on the node).
    fn domain_interface_addresses(&self, name: &str) -> Result<Option<Vec<(String, String)>>> {
        let (d, _) = self.get(name)?;
        Ok(Some(
            d.status
                .iter()
                .flat_map(|s| &s.interfaces)
                .filter_map(|i| i.ip.clone().map(|ip| (i.name.clone(), ip)))
                .collect(),
        ))
    }

    /// The security driver belongs to each node.
    fn domain_security_label(&self, name: &str) -> Result<Option<(String, bool)>> {
        self.get(name).map(|_| None)
    }

    fn domain_os_type(&self, name: &str) -> Result<String> {
        self.get(name).map(|_| "hvm".to_string())
    }

    /// A DomainSnapshot, once the Domain's agent has taken it
    /// (`super::snapshots`).
    fn snapshot_create(
        &self,
        name: &str,
        params: &vireo_drivers::snapshot::SnapshotParams,
    ) -> Result<vireo_drivers::snapshot::SnapshotInfo> {
        let (d, _) = self.get(name)?;
        let (ns, _) = self.0.split(name);
        super::snapshots::create(&self.0, &d, ns, params)
    }

    fn snapshot_list(&self, name: &str) -> Result<Vec<vireo_drivers::snapshot::SnapshotInfo>> {
        let (d, _) = self.get(name)?;
        let (ns, _) = self.0.split(name);
        super::snapshots::list(&self.0, &d, ns)
    }

    fn snapshot_revert(
        &self,
        name: &str,
        snapshot: &str,
        to: vireo_drivers::snapshot::RevertTo,
    ) -> Result<()> {
        let (d, _) = self.get(name)?;
        let (ns, _) = self.0.split(name);
        super::snapshots::revert(&self.0, &d, ns, snapshot, to)
    }

    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<()> {
        let (d, _) = self.get(name)?;
        let (ns, _) = self.0.split(name);
        super::snapshots::delete(&self.0, &d, ns, snapshot)
    }

    /// `runStrategy: Saved`: the agent saves the guest's memory and
    /// device state on its node and shuts it off; `start` resumes it.
    fn managed_save(&self, name: &str) -> Result<()> {
        let (d, full) = self.get(name)?;
        if !state_of(&d).0.is_active() {
            return Err(Error::invalid_state(KIND, full, "is not running"));
        }
        self.run(name, RunStrategy::Saved, None).map(|_| ())
    }

    /// The agent's `Saved` condition: a managed save image waits on the node.
    fn has_managed_save(&self, name: &str) -> Result<bool> {
        let (d, _) = self.get(name)?;
        Ok(d.status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Saved" && c.status == "True"))
    }

    /// `vireo.dev/request: managedsave-remove`: the agent drops the image,
    /// so that the next start boots.
    fn managed_save_remove(&self, name: &str) -> Result<()> {
        let (d, full) = self.get(name)?;
        if state_of(&d).0.is_active() {
            return Err(Error::invalid_state(KIND, full, "is running"));
        }
        self.patch(
            name,
            json!({"metadata": {"annotations": {REQUEST_ANNOTATION: "managedsave-remove"}}}),
        )
        .map(|_| ())
    }

    fn cells_free_memory(&self) -> Result<Vec<u64>> {
        Err(unsupported(
            ObjectKind::Host,
            "cluster",
            "free memory (a cluster has many nodes: kubectl get hosts)",
        ))
    }

    fn sysinfo(&self) -> Result<String> {
        Err(unsupported(
            ObjectKind::Host,
            "cluster",
            "sysinfo (a cluster has many nodes)",
        ))
    }

    fn domain_interface_stats(&self, name: &str, _iface: &str) -> Result<Vec<(String, i64)>> {
        let (_, full) = self.get(name)?;
        Err(unsupported(
            KIND,
            &full,
            "interface counters (they are read on the node that runs it)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_active_domains_first_by_id_then_by_name() {
        let r = |name: &str, id: Option<u32>| DomainRef {
            name: name.to_string(),
            uuid: String::new(),
            id,
        };
        let got = sorted(vec![
            r("a/z", None),
            r("b/y", Some(7)),
            r("a/x", Some(2)),
            r("a/a", None),
        ]);
        let names: Vec<&str> = got.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a/x", "b/y", "a/a", "a/z"]);
    }
}
