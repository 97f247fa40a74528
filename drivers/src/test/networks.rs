//! Networks on the test driver.

use vireo_crds::{Network, ObjectKind, Validate};

use super::{Kind, NetworkObj, State, TestDriver, object_name};
use crate::network::{NetworkDriver, NetworkInfo, NetworkRef};
use crate::{Error, ListFilter, Lookup, Result};

const KIND: ObjectKind = ObjectKind::Network;

impl NetworkObj {
    fn name(&self) -> &str {
        self.def.metadata.name.as_deref().unwrap_or_default()
    }
    fn reference(&self) -> NetworkRef {
        NetworkRef {
            name: self.name().to_string(),
            uuid: self.uuid.clone(),
        }
    }
}

impl State {
    fn network(&self, name: &str) -> Result<&NetworkObj> {
        self.networks
            .get(name)
            .ok_or_else(|| Error::not_found(KIND, name))
    }

    fn network_mut(&mut self, name: &str) -> Result<&mut NetworkObj> {
        self.networks
            .get_mut(name)
            .ok_or_else(|| Error::not_found(KIND, name))
    }

    /// Validates, fixes the UUID and the bridge name (`virbrN` when absent).
    fn prepare_network(&mut self, network: &Network) -> Result<(String, Network)> {
        let name = network
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid_argument(KIND, "", "metadata.name is required"))?;
        network
            .spec
            .validate()
            .map_err(|e| Error::invalid_argument(KIND, &name, e.to_string()))?;
        let existing = self.networks.get(&name);
        let uuid = match (&network.spec.uuid, existing) {
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
            .networks
            .values()
            .find(|o| o.uuid == uuid && o.name() != name)
        {
            return Err(Error::already_exists(
                KIND,
                other.name(),
                format!(" with uuid {uuid}; '{name}' cannot take it"),
            ));
        }
        let mut def = network.clone();
        def.spec.uuid = Some(uuid);
        def.status = None;
        let bridge = match (&def.spec.bridge, existing) {
            (Some(b), _) => b.clone(),
            (None, Some(obj)) => obj.def.spec.bridge.clone().unwrap_or_default(),
            (None, None) => self.free_bridge_name(),
        };
        if let Some(other) = self
            .networks
            .values()
            .find(|o| o.name() != name && o.def.spec.bridge.as_deref() == Some(bridge.as_str()))
        {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "spec.bridge: bridge '{bridge}' is already used by network '{}'",
                    other.name()
                ),
            ));
        }
        def.spec.bridge = Some(bridge);
        Ok((name, def))
    }

    fn free_bridge_name(&mut self) -> String {
        loop {
            let candidate = format!("virbr{}", self.next_bridge);
            self.next_bridge += 1;
            if !self
                .networks
                .values()
                .any(|o| o.def.spec.bridge.as_deref() == Some(candidate.as_str()))
            {
                return candidate;
            }
        }
    }

    pub(super) fn define_network(&mut self, network: &Network) -> Result<NetworkRef> {
        let (name, def) = self.prepare_network(network)?;
        if let Some(obj) = self.networks.get_mut(&name) {
            if obj.active {
                obj.new_def = Some(def);
            } else {
                obj.def = def;
            }
            obj.persistent = true;
            return Ok(obj.reference());
        }
        let uuid = def.spec.uuid.clone().unwrap_or_default();
        let obj = NetworkObj {
            autostart: def.spec.autostart,
            def,
            new_def: None,
            uuid,
            persistent: true,
            active: false,
        };
        let r = obj.reference();
        self.networks.insert(name, obj);
        Ok(r)
    }

    pub(super) fn start_network(&mut self, name: &str) -> Result<()> {
        let obj = self.network_mut(name)?;
        if obj.active {
            return Err(Error::invalid_state(KIND, name, "is already active"));
        }
        obj.active = true;
        Ok(())
    }
}

impl NetworkDriver for TestDriver {
    /// The test driver runs no DHCP server: an active network has no leases.
    fn dhcp_leases(&self, name: &str) -> Result<Vec<crate::network::DhcpLease>> {
        if self.network_info(name)?.active {
            Ok(Vec::new())
        } else {
            Err(Error::invalid_state(KIND, name, "is not active"))
        }
    }
    fn list_networks(&self, filter: ListFilter) -> Result<Vec<NetworkRef>> {
        Ok(self
            .lock()
            .networks
            .values()
            .filter(|o| filter.accepts(o.active))
            .map(NetworkObj::reference)
            .collect())
    }

    fn lookup_network(&self, key: Lookup<'_>) -> Result<NetworkRef> {
        let st = self.lock();
        let found = match key {
            Lookup::Name(n) => st.networks.get(n),
            Lookup::Uuid(u) => {
                let u = u.to_string();
                st.networks.values().find(|o| o.uuid == u)
            }
            Lookup::Id(_) => None,
        };
        found
            .map(NetworkObj::reference)
            .ok_or_else(|| Error::not_found(KIND, key.describe()))
    }

    fn network_definition(&self, name: &str, inactive: bool) -> Result<Network> {
        let st = self.lock();
        let obj = st.network(name)?;
        Ok(match (&obj.new_def, inactive) {
            (Some(next), true) => next.clone(),
            _ => obj.def.clone(),
        })
    }

    fn network_info(&self, name: &str) -> Result<NetworkInfo> {
        let st = self.lock();
        let obj = st.network(name)?;
        Ok(NetworkInfo {
            name: name.to_string(),
            uuid: obj.uuid.clone(),
            active: obj.active,
            persistent: obj.persistent,
            autostart: obj.autostart,
            bridge: obj.def.spec.bridge.clone(),
        })
    }

    fn define_network(&self, network: &Network) -> Result<NetworkRef> {
        self.change(Kind::Network, &object_name(&network.metadata), |st| {
            st.define_network(network)
        })
    }

    fn create_network(&self, network: &Network) -> Result<NetworkRef> {
        self.change(Kind::Network, &object_name(&network.metadata), |st| {
            let (name, def) = st.prepare_network(network)?;
            match st.networks.get_mut(&name) {
                Some(obj) if obj.active => {
                    return Err(Error::invalid_state(KIND, &name, "is already active"));
                }
                Some(obj) => {
                    let persistent = std::mem::replace(&mut obj.def, def);
                    obj.new_def = Some(persistent);
                }
                None => {
                    st.define_network(&def)?;
                    if let Some(obj) = st.networks.get_mut(&name) {
                        obj.persistent = false;
                    }
                }
            }
            st.start_network(&name)?;
            let r = st.network(&name)?.reference();
            Ok(r)
        })
    }

    fn undefine_network(&self, name: &str) -> Result<()> {
        self.change(Kind::Network, name, |st| {
            let obj = st.network_mut(name)?;
            if !obj.persistent {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: there is no definition to undefine",
                ));
            }
            if obj.active {
                obj.persistent = false;
                obj.autostart = false;
                obj.new_def = None;
            } else {
                st.networks.remove(name);
            }
            Ok(())
        })
    }

    fn start_network(&self, name: &str) -> Result<()> {
        self.change(Kind::Network, name, |st| st.start_network(name))
    }

    fn destroy_network(&self, name: &str) -> Result<()> {
        self.change(Kind::Network, name, |st| {
            let obj = st.network_mut(name)?;
            if !obj.active {
                return Err(Error::invalid_state(KIND, name, "is not active"));
            }
            obj.active = false;
            if let Some(next) = obj.new_def.take() {
                obj.def = next;
            }
            if !obj.persistent {
                st.networks.remove(name);
            }
            Ok(())
        })
    }

    fn set_network_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.change(Kind::Network, name, |st| {
            let obj = st.network_mut(name)?;
            if !obj.persistent {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: autostart needs a persistent network",
                ));
            }
            obj.autostart = autostart;
            Ok(())
        })
    }
}
