//! Domains on the test driver.

use std::time::Instant;

use vireo_crds::quantity::{format_bytes, parse_quantity};
use vireo_crds::{
    Domain, DomainInfo, DomainReason, DomainState, LifecycleAction, NodeInfo, ObjectKind, Validate,
};

use super::{DomainObj, Kind, State, TestDriver, object_name};
use crate::hypervisor::{Affect, BlockInfo, DomainRef, HypervisorDriver, VcpuInfo};
use crate::{Error, ListFilter, Lookup, Result};

const KIND: ObjectKind = ObjectKind::Domain;

fn not_running(name: &str) -> Error {
    Error::invalid_state(KIND, name, "is not running")
}

/// What the test driver saves of a running domain (`save`,
/// `managedsave`): its live definition and runtime sizes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SavedImage {
    pub(super) def: Domain,
    pub(super) memory: u64,
    pub(super) vcpus: u32,
    pub(super) paused: bool,
}

/// The state stream of a test driver save file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedRuntime {
    memory: u64,
    vcpus: u32,
}

impl DomainObj {
    fn name(&self) -> &str {
        self.def.metadata.name.as_deref().unwrap_or_default()
    }

    pub(super) fn reference(&self) -> DomainRef {
        DomainRef {
            name: self.name().to_string(),
            uuid: self.uuid.clone(),
            id: self.id,
        }
    }

    pub(super) fn is_active(&self) -> bool {
        self.state.is_active()
    }

    pub(super) fn cpu_time(&self) -> u64 {
        let running = self
            .running_since
            .map(|t| u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.cpu_time_ns.saturating_add(running)
    }

    /// Stops the vCPU clock (pause or stop).
    pub(super) fn stop_clock(&mut self) {
        self.cpu_time_ns = self.cpu_time();
        self.running_since = None;
    }

    /// Loads the sizes of the definition into the runtime fields.
    pub(super) fn load_sizes(&mut self) {
        let (max, cur) = sizes(&self.def);
        self.max_memory = max;
        self.memory = cur;
        self.vcpus = self.def.spec.vcpus;
    }
}

/// Max and current memory of a validated definition.
fn sizes(def: &Domain) -> (u64, u64) {
    let max = parse_quantity(&def.spec.memory).unwrap_or(0);
    let cur = def
        .spec
        .current_memory
        .as_ref()
        .and_then(|q| parse_quantity(q).ok())
        .unwrap_or(max);
    (max, cur)
}

impl State {
    pub(super) fn domain(&self, name: &str) -> Result<&DomainObj> {
        self.domains
            .get(name)
            .ok_or_else(|| Error::not_found(KIND, name))
    }

    pub(super) fn domain_mut(&mut self, name: &str) -> Result<&mut DomainObj> {
        self.domains
            .get_mut(name)
            .ok_or_else(|| Error::not_found(KIND, name))
    }

    /// Checks a definition and gives it its UUID: the one in the spec, the
    /// existing domain's of the same name, or a new random one. Refuses a
    /// name or UUID that belongs to another domain.
    fn prepare(&self, domain: &Domain) -> Result<(String, Domain)> {
        let name = domain
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid_argument(KIND, "", "metadata.name is required"))?;
        domain
            .spec
            .validate()
            .map_err(|e| Error::invalid_argument(KIND, &name, e.to_string()))?;
        // Like libvirt's test driver, any domain type is accepted and
        // simulated: a `kvm` or `qemu` domain runs here as `test` does.
        let existing = self.domains.get(&name);
        let uuid = match (&domain.spec.uuid, existing) {
            (Some(u), Some(obj)) if !u.eq_ignore_ascii_case(&obj.uuid) => {
                return Err(Error::already_exists(
                    KIND,
                    &name,
                    format!(" with uuid {}", obj.uuid),
                ));
            }
            (Some(u), _) => u.to_ascii_lowercase(),
            (None, Some(obj)) => obj.uuid.clone(),
            (None, None) => uuid::Uuid::new_v4().to_string(),
        };
        if let Some(other) = self
            .domains
            .values()
            .find(|o| o.uuid == uuid && o.name() != name)
        {
            return Err(Error::already_exists(
                KIND,
                other.name(),
                format!(" with uuid {uuid}; '{name}' cannot take it"),
            ));
        }
        let mut def = domain.clone();
        def.spec.uuid = Some(uuid.clone());
        def.status = None;
        Ok((name, def))
    }

    pub(super) fn activate(&mut self, name: &str, reason: DomainReason) -> Result<DomainRef> {
        self.domain_mut(name)?;
        let id = match &self.ids {
            Some(ids) => ids.next().map_err(|e| Error::OperationFailed {
                object: crate::error::ObjectName::new(ObjectKind::Domain, name),
                message: format!("allocating an ID in {}: {e}", ids.path().display()),
            })?,
            None => self.next_domain_id,
        };
        let obj = self.domain_mut(name)?;
        obj.id = Some(id);
        obj.state = DomainState::Running;
        obj.reason = reason;
        obj.cpu_time_ns = 0;
        obj.running_since = Some(Instant::now());
        obj.load_sizes();
        let r = obj.reference();
        self.next_domain_id = self.next_domain_id.wrapping_add(1).max(1);
        Ok(r)
    }

    /// Makes an active domain inactive with a reason; a transient one goes away.
    pub(super) fn deactivate(&mut self, name: &str, reason: DomainReason) -> Result<()> {
        let obj = self.domain_mut(name)?;
        obj.stop_clock();
        obj.state = DomainState::Shutoff;
        obj.reason = reason;
        obj.id = None;
        if let Some(next) = obj.new_def.take() {
            obj.def = next;
        }
        obj.load_sizes();
        if !obj.persistent {
            self.domains.remove(name);
        }
        Ok(())
    }

    /// Inserts a persistent, inactive domain (node-file loading and define).
    pub(super) fn define(&mut self, domain: &Domain) -> Result<DomainRef> {
        let (name, def) = self.prepare(domain)?;
        if let Some(obj) = self.domains.get_mut(&name) {
            if obj.is_active() {
                obj.new_def = Some(def);
            } else {
                obj.def = def;
                obj.load_sizes();
            }
            obj.persistent = true;
            return Ok(obj.reference());
        }
        let uuid = def.spec.uuid.clone().unwrap_or_default();
        let mut obj = DomainObj {
            def,
            new_def: None,
            uuid,
            persistent: true,
            autostart: false,
            state: DomainState::Shutoff,
            reason: DomainReason::Unknown,
            id: None,
            max_memory: 0,
            memory: 0,
            vcpus: 0,
            cpu_time_ns: 0,
            running_since: None,
            managed_save: None,
            snapshots: Default::default(),
        };
        obj.load_sizes();
        let r = obj.reference();
        self.domains.insert(name, obj);
        Ok(r)
    }

    pub(super) fn start(&mut self, name: &str, reason: DomainReason) -> Result<DomainRef> {
        if self.domain(name)?.is_active() {
            return Err(Error::invalid_state(KIND, name, "is already active"));
        }
        self.activate(name, reason)
    }

    /// The guest powered off or rebooted: its lifecycle action for that
    /// event decides. `restart` keeps the activation (a guest reboot keeps
    /// its process, live memory and vCPUs); `destroy` and `preserve` end it
    /// shut off (shutdown).
    fn guest_event(
        &mut self,
        name: &str,
        action: impl Fn(&vireo_crds::Lifecycle) -> LifecycleAction,
    ) -> Result<()> {
        let obj = self.domain_mut(name)?;
        if !obj.is_active() {
            return Err(not_running(name));
        }
        match action(&obj.def.spec.lifecycle) {
            LifecycleAction::Restart => {
                obj.state = DomainState::Running;
                obj.reason = DomainReason::Booted;
                obj.running_since.get_or_insert_with(Instant::now);
                Ok(())
            }
            LifecycleAction::Destroy | LifecycleAction::Preserve => {
                self.deactivate(name, DomainReason::Shutdown)
            }
        }
    }

    /// The image a save of the active domain `name` keeps.
    fn image_of(&self, name: &str) -> Result<SavedImage> {
        let obj = self.domain(name)?;
        if !obj.is_active() {
            return Err(not_running(name));
        }
        Ok(SavedImage {
            def: obj.def.clone(),
            memory: obj.memory,
            vcpus: obj.vcpus,
            paused: obj.state == DomainState::Paused,
        })
    }

    /// Runs a saved image again: running (restored), or paused if it was
    /// saved paused. The domain of that name must be inactive and have the
    /// image's UUID; without one, the image comes back transient.
    fn resume_image(&mut self, image: &SavedImage) -> Result<DomainRef> {
        let name =
            image.def.metadata.name.clone().ok_or_else(|| {
                Error::invalid_argument(KIND, "", "the saved definition has no name")
            })?;
        let uuid = image.def.spec.uuid.clone().unwrap_or_default();
        if let Some(other) = self
            .domains
            .values()
            .find(|o| o.uuid.eq_ignore_ascii_case(&uuid) && o.name() != name)
        {
            return Err(Error::already_exists(
                KIND,
                other.name(),
                format!(" with uuid {uuid}; the saved domain '{name}' cannot take it"),
            ));
        }
        match self.domains.get_mut(&name) {
            Some(obj) if !obj.uuid.eq_ignore_ascii_case(&uuid) => {
                return Err(Error::invalid_argument(
                    KIND,
                    &name,
                    format!(
                        "the saved state is of the domain with uuid {uuid}, not this one ({})",
                        obj.uuid
                    ),
                ));
            }
            Some(obj) if obj.is_active() => {
                return Err(Error::invalid_state(KIND, &name, "is already active"));
            }
            Some(obj) => {
                let persistent = std::mem::replace(&mut obj.def, image.def.clone());
                obj.new_def = Some(persistent);
            }
            None => {
                self.define(&image.def)?;
                if let Some(obj) = self.domains.get_mut(&name) {
                    obj.persistent = false;
                }
            }
        }
        let r = self.activate(&name, DomainReason::Restored)?;
        let obj = self.domain_mut(&name)?;
        obj.memory = image.memory.min(obj.max_memory);
        obj.vcpus = image.vcpus;
        if image.paused {
            obj.stop_clock();
            obj.state = DomainState::Paused;
            obj.reason = DomainReason::User;
        }
        Ok(r)
    }

    pub(super) fn pause(&mut self, name: &str) -> Result<()> {
        let obj = self.domain_mut(name)?;
        match obj.state {
            DomainState::Paused => Err(Error::invalid_state(KIND, name, "is already paused")),
            s if !s.is_active() => Err(not_running(name)),
            _ => {
                obj.stop_clock();
                obj.state = DomainState::Paused;
                obj.reason = DomainReason::User;
                Ok(())
            }
        }
    }
}

impl HypervisorDriver for TestDriver {
    fn name(&self) -> &'static str {
        "test"
    }

    fn hypervisor_version(&self) -> String {
        "0.0.2".into()
    }

    fn node_info(&self) -> Result<NodeInfo> {
        Ok(self.lock().node.clone())
    }

    fn hostname(&self) -> Result<String> {
        // libvirt's test driver reports the host name of the machine it runs on.
        Ok(machine_hostname())
    }

    fn list_domains(&self, filter: ListFilter) -> Result<Vec<DomainRef>> {
        let st = self.lock();
        let mut out: Vec<DomainRef> = st
            .domains
            .values()
            .filter(|o| filter.accepts(o.is_active()))
            .map(DomainObj::reference)
            .collect();
        // virsh list: active domains by ID first, then inactive ones by name.
        out.sort_by(|a, b| match (a.id, b.id) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.name.cmp(&b.name),
        });
        Ok(out)
    }

    fn count_domains(&self, filter: ListFilter) -> Result<usize> {
        let st = self.lock();
        Ok(st
            .domains
            .values()
            .filter(|o| filter.accepts(o.is_active()))
            .count())
    }

    fn lookup_domain(&self, key: Lookup<'_>) -> Result<DomainRef> {
        let st = self.lock();
        let found = match key {
            Lookup::Name(n) => st.domains.get(n),
            Lookup::Uuid(u) => {
                let u = u.to_string();
                st.domains.values().find(|o| o.uuid == u)
            }
            Lookup::Id(id) => st.domains.values().find(|o| o.id == Some(id)),
        };
        found
            .map(DomainObj::reference)
            .ok_or_else(|| Error::not_found(KIND, key.describe()))
    }

    fn domain_definition(&self, name: &str, inactive: bool) -> Result<Domain> {
        let st = self.lock();
        let obj = st.domain(name)?;
        let mut def = match (&obj.new_def, inactive) {
            (Some(next), true) => next.clone(),
            _ => obj.def.clone(),
        };
        if obj.is_active() && !inactive {
            def.spec.current_memory = Some(format_bytes(obj.memory));
            // A live vCPU change keeps the maximum the domain started with.
            def.spec.max_vcpus.get_or_insert(def.spec.vcpus);
            def.spec.vcpus = obj.vcpus;
        }
        Ok(def)
    }

    fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        let st = self.lock();
        let obj = st.domain(name)?;
        Ok(DomainInfo {
            state: obj.state,
            reason: obj.reason,
            max_memory: format_bytes(obj.max_memory),
            memory: format_bytes(obj.memory),
            vcpus: obj.vcpus,
            cpu_time_ns: obj.cpu_time(),
        })
    }

    fn domain_state(&self, name: &str) -> Result<(DomainState, DomainReason)> {
        let st = self.lock();
        let obj = st.domain(name)?;
        Ok((obj.state, obj.reason))
    }

    fn domain_is_persistent(&self, name: &str) -> Result<bool> {
        Ok(self.lock().domain(name)?.persistent)
    }

    fn domain_autostart(&self, name: &str) -> Result<bool> {
        Ok(self.lock().domain(name)?.autostart)
    }

    fn set_domain_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            if !obj.persistent {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: autostart needs a persistent domain",
                ));
            }
            obj.autostart = autostart;
            Ok(())
        })
    }

    fn set_domain_memory(&self, name: &str, bytes: u64) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            if bytes == 0 {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    "memory must be greater than zero",
                ));
            }
            if bytes > obj.max_memory {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!(
                        "cannot set memory to {} KiB, above the maximum of {} KiB",
                        bytes / 1024,
                        obj.max_memory / 1024
                    ),
                ));
            }
            if obj.is_active() {
                obj.memory = bytes;
            } else {
                obj.def.spec.current_memory = Some(format_bytes(bytes));
                obj.memory = bytes;
            }
            Ok(())
        })
    }

    fn set_domain_vcpus(&self, name: &str, vcpus: u32) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            let max = obj.def.spec.max_vcpus.unwrap_or(obj.def.spec.vcpus);
            if vcpus == 0 || vcpus > max {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!("requested vcpus {vcpus} is outside 1..={max} (spec.maxVcpus)"),
                ));
            }
            if obj.is_active() {
                obj.vcpus = vcpus;
            } else {
                // The maximum stays what it was (libvirt's <vcpu> vs current).
                obj.def.spec.max_vcpus = Some(max);
                obj.def.spec.vcpus = vcpus;
                obj.vcpus = vcpus;
            }
            Ok(())
        })
    }

    fn define_domain(&self, domain: &Domain) -> Result<DomainRef> {
        self.change(Kind::Domain, &object_name(&domain.metadata), |st| {
            st.define(domain)
        })
    }

    fn create_domain(&self, domain: &Domain) -> Result<DomainRef> {
        self.change(Kind::Domain, &object_name(&domain.metadata), |st| {
            let (name, def) = st.prepare(domain)?;
            match st.domains.get_mut(&name) {
                Some(obj) if obj.is_active() => {
                    return Err(Error::invalid_state(KIND, &name, "is already active"));
                }
                // An inactive persistent domain runs this definition once and
                // keeps its persistent one for later.
                Some(obj) => {
                    let persistent = std::mem::replace(&mut obj.def, def);
                    obj.new_def = Some(persistent);
                }
                None => {
                    st.define(&def)?;
                    if let Some(obj) = st.domains.get_mut(&name) {
                        obj.persistent = false;
                    }
                }
            }
            st.activate(&name, DomainReason::Booted)
        })
    }

    fn undefine_domain(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            if !obj.persistent {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: there is no definition to undefine",
                ));
            }
            if obj.is_active() {
                obj.persistent = false;
                obj.autostart = false;
                obj.new_def = None;
            } else if !obj.snapshots.is_empty() {
                return Err(crate::snapshot::undefine_refused(
                    name,
                    obj.snapshots.snapshots.len(),
                ));
            } else {
                st.domains.remove(name);
            }
            Ok(())
        })
    }

    fn start_domain(&self, name: &str) -> Result<DomainRef> {
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            if obj.is_active() {
                return Err(Error::invalid_state(KIND, name, "is already active"));
            }
            // A managed save image is resumed, once.
            if let Some(image) = obj.managed_save.clone() {
                let r = st.resume_image(&image)?;
                st.domain_mut(name)?.managed_save = None;
                return Ok(r);
            }
            st.start(name, DomainReason::Booted)
        })
    }

    fn save_domain(&self, name: &str, path: &std::path::Path) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            let image = st.image_of(name)?;
            let obj = st.domain(name)?;
            let header = crate::save::header("test", name, &obj.uuid, &image.def, image.paused);
            let state = serde_json::to_vec(&SavedRuntime {
                memory: image.memory,
                vcpus: image.vcpus,
            })
            .map_err(|e| Error::OperationFailed {
                object: crate::error::ObjectName::new(KIND, name),
                message: e.to_string(),
            })?;
            let written = crate::save::Writer::create(path, header).and_then(|w| {
                w.append(&state)?;
                w.finish()
            });
            if let Err(e) = written {
                let _ = std::fs::remove_file(path);
                return Err(e.into_error(name));
            }
            st.deactivate(name, DomainReason::Saved)
        })
    }

    fn restore_domain(&self, path: &std::path::Path) -> Result<DomainRef> {
        let shown = path.display().to_string();
        let (header, offset) = crate::save::read(path).map_err(|e| e.into_error(&shown))?;
        if header.driver != "test" {
            return Err(Error::invalid_argument(
                KIND,
                &header.name,
                format!(
                    "{shown} was saved by the {} driver, not the test driver",
                    header.driver
                ),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::OperationFailed {
            object: crate::error::ObjectName::new(KIND, &header.name),
            message: format!("{shown}: {e}"),
        })?;
        let state: SavedRuntime = usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o..))
            .and_then(|b| serde_json::from_slice(b).ok())
            .ok_or_else(|| {
                Error::invalid_argument(
                    KIND,
                    &header.name,
                    format!("{shown}: the test driver's state in it is unreadable"),
                )
            })?;
        let mut def = header.definition.clone();
        def.metadata.name = Some(header.name.clone());
        def.spec.uuid = Some(header.uuid.clone());
        let image = SavedImage {
            def,
            memory: state.memory,
            vcpus: state.vcpus,
            paused: header.paused,
        };
        self.change(Kind::Domain, &header.name, |st| st.resume_image(&image))
    }

    fn snapshot_create(
        &self,
        name: &str,
        params: &crate::snapshot::SnapshotParams,
    ) -> Result<crate::snapshot::SnapshotInfo> {
        self.change(Kind::Domain, name, |st| st.snapshot_create(name, params))
    }

    fn snapshot_list(&self, name: &str) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        Ok(self.lock().domain(name)?.snapshots.list(name))
    }

    fn snapshot_get(&self, name: &str, snapshot: &str) -> Result<crate::snapshot::SnapshotInfo> {
        self.lock().domain(name)?.snapshots.info(name, snapshot)
    }

    fn snapshot_current(&self, name: &str) -> Result<Option<crate::snapshot::SnapshotInfo>> {
        Ok(self.lock().domain(name)?.snapshots.current_info(name))
    }

    fn snapshot_revert(
        &self,
        name: &str,
        snapshot: &str,
        to: crate::snapshot::RevertTo,
    ) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            st.snapshot_revert(name, snapshot, to)
        })
    }

    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            st.domain_mut(name)?.snapshots.remove(snapshot).map(|_| ())
        })
    }

    fn managed_save(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            if !st.domain(name)?.persistent {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: cannot do managed save for a transient domain",
                ));
            }
            let image = st.image_of(name)?;
            st.deactivate(name, DomainReason::Saved)?;
            st.domain_mut(name)?.managed_save = Some(image);
            Ok(())
        })
    }

    fn has_managed_save(&self, name: &str) -> Result<bool> {
        Ok(self.lock().domain(name)?.managed_save.is_some())
    }

    fn managed_save_remove(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            st.domain_mut(name)?.managed_save = None;
            Ok(())
        })
    }

    fn shutdown_domain(&self, name: &str) -> Result<()> {
        // The test guest complies at once; lifecycle.onPoweroff applies.
        self.change(Kind::Domain, name, |st| {
            st.guest_event(name, |l| l.on_poweroff)
        })
    }

    fn reboot_domain(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            st.guest_event(name, |l| l.on_reboot)
        })
    }

    fn reset_domain(&self, name: &str) -> Result<()> {
        let st = self.lock();
        if !st.domain(name)?.is_active() {
            return Err(not_running(name));
        }
        Ok(())
    }

    fn suspend_domain(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| st.pause(name))
    }

    fn resume_domain(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            if obj.state != DomainState::Paused {
                return Err(Error::invalid_state(KIND, name, "is not paused"));
            }
            obj.state = DomainState::Running;
            obj.reason = DomainReason::Unpaused;
            obj.running_since = Some(Instant::now());
            Ok(())
        })
    }

    fn migrate_prepare(
        &self,
        domain: &Domain,
        params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationIncoming> {
        self.prepare_incoming(domain, params)
    }

    fn migrate_perform(
        &self,
        name: &str,
        incoming: &crate::migration::MigrationIncoming,
        _params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationStats> {
        self.perform_outgoing(name, incoming)
    }

    fn migrate_finish(&self, name: &str, succeeded: bool) -> Result<Option<DomainRef>> {
        self.finish_incoming(name, succeeded)
    }

    fn migrate_confirm(&self, name: &str, succeeded: bool) -> Result<()> {
        self.confirm_outgoing(name, succeeded)
    }

    /// The test driver's jobs end within the call that starts them.
    fn abort_job(&self, name: &str) -> Result<()> {
        self.domain_state(name)?;
        Err(Error::invalid_state(
            KIND,
            name,
            "has no job running (nothing to abort)",
        ))
    }

    fn destroy_domain(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            if !st.domain(name)?.is_active() {
                return Err(not_running(name));
            }
            st.deactivate(name, DomainReason::Destroyed)
        })
    }

    fn set_domain_annotation(
        &self,
        name: &str,
        key: &str,
        value: Option<&str>,
        affect: Affect,
    ) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            let active = obj.is_active();
            let set = |def: &mut Domain| {
                let notes = def
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default);
                match value {
                    Some(v) => notes.insert(key.to_string(), v.to_string()),
                    None => notes.remove(key),
                };
            };
            match affect {
                Affect::Live if !active => return Err(not_running(name)),
                Affect::Config if active => {
                    if !obj.persistent {
                        return Err(Error::invalid_state(
                            KIND,
                            name,
                            "is transient: it has no persistent definition to change",
                        ));
                    }
                    let mut next = obj.new_def.clone().unwrap_or_else(|| obj.def.clone());
                    set(&mut next);
                    obj.new_def = Some(next);
                }
                // Live (or current) on a running domain: this activation
                // only; the persistent definition keeps what it had.
                _ => {
                    if active && obj.persistent && obj.new_def.is_none() {
                        obj.new_def = Some(obj.def.clone());
                    }
                    set(&mut obj.def)
                }
            }
            Ok(())
        })
    }

    fn domain_os_type(&self, name: &str) -> Result<String> {
        self.lock().domain(name)?;
        // libvirt's test driver says `linux` whatever the domain's <os><type>.
        Ok("linux".to_string())
    }

    fn security_model(&self) -> (String, String) {
        ("testSecurity".to_string(), String::new())
    }

    fn domain_security_label(&self, name: &str) -> Result<Option<(String, bool)>> {
        let st = self.lock();
        let obj = st.domain(name)?;
        Ok(obj.is_active().then(|| ("libvirt-test".to_string(), true)))
    }

    fn cells_free_memory(&self) -> Result<Vec<u64>> {
        // libvirt's test node: two cells with 2 MiB and 4 MiB free.
        Ok(vec![2 << 20, 4 << 20])
    }

    fn node_free_memory(&self) -> Result<u64> {
        // What libvirt's test driver answers for the whole node: its memory
        // size in KiB (3 GiB), given as bytes, so `freecell` says 3072 KiB.
        Ok(self.lock().node.memory_bytes / 1024)
    }

    fn domain_scheduler(&self, name: &str) -> Result<(String, Vec<(String, String)>)> {
        self.lock().domain(name)?;
        Ok((
            "fair".to_string(),
            vec![("weight".to_string(), "50".to_string())],
        ))
    }

    fn sysinfo(&self) -> Result<String> {
        Ok(TEST_SYSINFO.to_string())
    }

    fn domain_interface_addresses(&self, name: &str) -> Result<Option<Vec<(String, String)>>> {
        let st = self.lock();
        let obj = st.domain(name)?;
        let Some(id) = obj.id else {
            return Err(not_running(name));
        };
        // libvirt's test driver makes the addresses up: 192.168.122.3 for
        // the first interface of the domain with ID 1, 20 further on per
        // ID, one further on per interface.
        let base = u32::from(std::net::Ipv4Addr::new(192, 168, 122, 3));
        Ok(Some(
            obj.def
                .spec
                .devices
                .interfaces
                .iter()
                .enumerate()
                .map(|(i, iface)| {
                    let n = base
                        .wrapping_add(id.wrapping_sub(1).wrapping_mul(20))
                        .wrapping_add(u32::try_from(i).unwrap_or(0));
                    (
                        iface.name.clone(),
                        format!("{}/24", std::net::Ipv4Addr::from(n)),
                    )
                })
                .collect(),
        ))
    }

    fn capabilities(&self) -> Result<String> {
        let node = self.lock().node.clone();
        Ok(test_capabilities(&node))
    }

    fn domain_block_info(&self, name: &str, disk: &str) -> Result<BlockInfo> {
        let st = self.lock();
        let obj = st.domain(name)?;
        find_disk(obj, disk)?;
        // libvirt's test driver: a 1 TiB file, a little less of it usable.
        Ok(BlockInfo {
            capacity: 1_099_506_450_432,
            allocation: 1 << 40,
            physical: 1 << 40,
        })
    }

    fn domain_block_stats(&self, name: &str, disk: &str) -> Result<Vec<(String, i64)>> {
        let st = self.lock();
        let obj = st.domain(name)?;
        if !obj.is_active() {
            return Err(not_running(name));
        }
        let disk = find_disk(obj, disk)?;
        // Counters that grow with the clock, as libvirt's test driver makes them.
        let (us, s) = clock();
        Ok(vec![
            ("rd_req".into(), us / 10),
            ("rd_bytes".into(), us / 20),
            ("wr_req".into(), us / 30),
            ("wr_bytes".into(), us / 40),
            ("errs".into(), s / 2),
        ]
        .into_iter()
        .map(|(k, v): (String, i64)| (format!("{disk} {k}"), v))
        .collect())
    }

    fn domain_interface_stats(&self, name: &str, iface: &str) -> Result<Vec<(String, i64)>> {
        let st = self.lock();
        let obj = st.domain(name)?;
        if !obj.is_active() {
            return Err(not_running(name));
        }
        let found = obj.def.spec.devices.interfaces.iter().any(|i| {
            i.name == iface
                || i.mac
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(iface))
        });
        if !found {
            return Err(Error::invalid_argument(
                KIND,
                name,
                format!("'{iface}' is not a known interface"),
            ));
        }
        let (us, s) = clock();
        Ok([
            ("rx_bytes", us / 10),
            ("rx_packets", us / 100),
            ("rx_errs", s),
            ("rx_drop", s / 2),
            ("tx_bytes", us / 20),
            ("tx_packets", us / 110),
            ("tx_errs", s / 3),
            ("tx_drop", s / 4),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{iface} {k}"), v))
        .collect())
    }

    fn domain_memory_stats(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let st = self.lock();
        let obj = st.domain(name)?;
        if !obj.is_active() {
            return Err(not_running(name));
        }
        let current = obj.memory / 1024;
        // libvirt's test driver's balloon: fixed figures around the current size.
        Ok([
            ("actual", current),
            ("swap_in", 0),
            ("swap_out", 0),
            ("major_fault", 0),
            ("minor_fault", 0),
            ("unused", 1_048_576),
            ("available", current),
            ("usable", 1_048_576),
            ("last_update", 627_319_920),
            ("disk_caches", 262_144),
            ("hugetlb_pgalloc", 0),
            ("hugetlb_pgfail", 0),
            ("rss", 1_048_576),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect())
    }

    fn domain_vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        let st = self.lock();
        let obj = st.domain(name)?;
        let active = obj.is_active();
        let last_cpu = st.node.cpus.saturating_sub(1);
        let (us, _) = clock();
        // libvirt's test driver: every vCPU on the node's last CPU, an
        // 8-CPU affinity map, CPU time from the clock.
        Ok((0..obj.vcpus)
            .map(|number| VcpuInfo {
                number,
                cpu: active.then_some(last_cpu),
                state: active.then(|| "running".to_string()),
                cpu_time_ns: active.then(|| u64::try_from(us / 10).unwrap_or(0)),
                affinity: "y".repeat(8),
            })
            .collect())
    }
}

/// The host name of this machine (`localhost` if it cannot be read).
fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Microseconds and seconds since the epoch.
fn clock() -> (i64, i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (
        i64::try_from(now.as_micros()).unwrap_or(i64::MAX),
        i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
    )
}

/// A domain's disk by its target name (`vda`) or volume; its target name.
fn find_disk<'a>(obj: &'a DomainObj, disk: &str) -> Result<&'a str> {
    obj.def
        .spec
        .devices
        .disks
        .iter()
        .find(|d| d.name == disk || d.volume == disk)
        .map(|d| d.name.as_str())
        .ok_or_else(|| {
            Error::invalid_argument(
                KIND,
                obj.name(),
                format!("invalid path {disk} not assigned to domain"),
            )
        })
}

/// The SMBIOS data libvirt's test driver describes.
const TEST_SYSINFO: &str = "<sysinfo type='smbios'>
  <bios>
    <entry name='vendor'>LENOVO</entry>
    <entry name='version'>G4ETA1WW (2.61 )</entry>
    <entry name='date'>05/07/2014</entry>
    <entry name='release'>2.61</entry>
  </bios>
</sysinfo>
";

/// The capabilities of a test node as libvirt's test driver describes
/// them: an i686 host with PAE, its NUMA cells (cell N has (N+1) x 2 GiB in
/// pages of 4 << N KiB), the `testSecurity` model, and `hvm` and `xen`
/// guests of type `test`.
fn test_capabilities(node: &NodeInfo) -> String {
    use std::fmt::Write;
    let mut x = String::new();
    let cells = node.numa_nodes.max(1);
    let per_cell = node.cpus / cells;
    let _ = write!(
        x,
        "<capabilities>\n\n  <host>\n    <cpu>\n      <arch>{}</arch>\n      <features>\n        <pae/>\n        <nonpae/>\n      </features>\n",
        node.cpu_model
    );
    for size in [4, 8, 2048, 1_048_576] {
        let _ = writeln!(x, "      <pages unit='KiB' size='{size}'/>");
    }
    x.push_str("    </cpu>\n    <power_management/>\n    <iommu support='no'/>\n    <topology>\n");
    let _ = writeln!(x, "      <cells num='{cells}'>");
    for c in 0..cells {
        let kib: u64 = 2_097_152 * u64::from(c + 1);
        let page: u64 = 4 << c;
        let _ = writeln!(x, "        <cell id='{c}'>");
        let _ = writeln!(x, "          <memory unit='KiB'>{kib}</memory>");
        let _ = writeln!(
            x,
            "          <pages unit='KiB' size='{page}'>{}</pages>",
            kib / page
        );
        let _ = writeln!(x, "          <pages unit='KiB' size='2048'>0</pages>");
        let _ = writeln!(x, "          <pages unit='KiB' size='1048576'>0</pages>");
        let _ = writeln!(x, "          <cpus num='{per_cell}'>");
        for i in 0..per_cell {
            let id = c * per_cell + i;
            let _ = writeln!(
                x,
                "            <cpu id='{id}' socket_id='{c}' die_id='0' core_id='{i}' siblings='{id}'/>"
            );
        }
        x.push_str("          </cpus>\n        </cell>\n");
    }
    x.push_str("      </cells>\n    </topology>\n    <secmodel>\n      <model>testSecurity</model>\n      <doi></doi>\n    </secmodel>\n  </host>\n\n");
    for os in ["hvm", "xen"] {
        let _ = write!(
            x,
            "  <guest>\n    <os_type>{os}</os_type>\n    <arch name='{}'>\n      <wordsize>32</wordsize>\n      <emulator>/usr/bin/test-hv</emulator>\n      <domain type='test'/>\n    </arch>\n    <features>\n      <pae/>\n      <nonpae/>\n    </features>\n  </guest>\n\n",
            node.cpu_model
        );
    }
    x.push_str("</capabilities>\n");
    x
}
