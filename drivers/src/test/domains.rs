//! Domains on the test driver.

use std::time::Instant;

use vireo_crds::quantity::{format_bytes, parse_quantity};
use vireo_crds::{
    Domain, DomainInfo, DomainReason, DomainState, DomainType, LifecycleAction, NodeInfo,
    ObjectKind, Validate,
};

use super::{DomainObj, Kind, State, TestDriver, object_name};
use crate::hypervisor::{DomainRef, HypervisorDriver};
use crate::{Error, ListFilter, Lookup, Result};

const KIND: ObjectKind = ObjectKind::Domain;

fn not_running(name: &str) -> Error {
    Error::invalid_state(KIND, name, "is not running")
}

impl DomainObj {
    fn name(&self) -> &str {
        self.def.metadata.name.as_deref().unwrap_or_default()
    }

    fn reference(&self) -> DomainRef {
        DomainRef {
            name: self.name().to_string(),
            uuid: self.uuid.clone(),
            id: self.id,
        }
    }

    fn is_active(&self) -> bool {
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
    fn stop_clock(&mut self) {
        self.cpu_time_ns = self.cpu_time();
        self.running_since = None;
    }

    /// Loads the sizes of the definition into the runtime fields.
    fn load_sizes(&mut self) {
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
    fn domain(&self, name: &str) -> Result<&DomainObj> {
        self.domains
            .get(name)
            .ok_or_else(|| Error::not_found(KIND, name))
    }

    fn domain_mut(&mut self, name: &str) -> Result<&mut DomainObj> {
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
        if domain.spec.domain_type != DomainType::Test {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "spec.type: the test driver runs domains of type 'test', not '{}'",
                    domain.spec.domain_type
                ),
            ));
        }
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

    fn activate(&mut self, name: &str, reason: DomainReason) -> Result<DomainRef> {
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
    fn deactivate(&mut self, name: &str, reason: DomainReason) -> Result<()> {
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
        Ok("vireo-test-node".into())
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
            } else {
                st.domains.remove(name);
            }
            Ok(())
        })
    }

    fn start_domain(&self, name: &str) -> Result<DomainRef> {
        self.change(Kind::Domain, name, |st| {
            st.start(name, DomainReason::Booted)
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

    fn destroy_domain(&self, name: &str) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            if !st.domain(name)?.is_active() {
                return Err(not_running(name));
            }
            st.deactivate(name, DomainReason::Destroyed)
        })
    }
}
