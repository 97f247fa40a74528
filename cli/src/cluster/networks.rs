//! Networks on a cluster: the cluster-scoped Network objects. Active means
//! active on at least one node (`status.activeNodes`); start and destroy
//! set `spec.active`, which the agents carry out on their nodes.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use vireo_crds::{Network, ObjectKind};
use vireo_drivers::{Error, ListFilter, Lookup, NetworkDriver, NetworkInfo, NetworkRef, Result};

use super::{Kube, api_error, apply_params, for_apply};

const KIND: ObjectKind = ObjectKind::Network;

pub struct Networks(pub Arc<Kube>);

fn active(n: &Network) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.active_nodes)
        .is_some_and(|a| a > 0)
}

fn reference(n: &Network) -> NetworkRef {
    NetworkRef {
        name: n.name_any(),
        uuid: n.spec.uuid.clone().unwrap_or_default(),
    }
}

impl Networks {
    fn api(&self) -> Api<Network> {
        Api::all(self.0.client().clone())
    }

    fn get(&self, name: &str) -> Result<Network> {
        self.0
            .block_on(self.api().get(name))
            .map_err(|e| api_error(KIND, name, e))
    }

    fn patch(&self, name: &str, patch: serde_json::Value) -> Result<()> {
        self.0
            .block_on(
                self.api()
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .map(|_| ())
            .map_err(|e| api_error(KIND, name, e))
    }

    fn apply(&self, network: &Network) -> Result<NetworkRef> {
        let mut n = network.clone();
        let name = n.name_any();
        for_apply(&mut n.metadata);
        n.metadata.namespace = None;
        n.status = None;
        self.0
            .block_on(self.api().patch(&name, &apply_params(), &Patch::Apply(&n)))
            .map(|n| reference(&n))
            .map_err(|e| api_error(KIND, &name, e))
    }
}

impl NetworkDriver for Networks {
    fn list_networks(&self, filter: ListFilter) -> Result<Vec<NetworkRef>> {
        let mut items = self
            .0
            .block_on(self.api().list(&ListParams::default()))
            .map_err(|e| api_error(KIND, "*", e))?
            .items;
        items.retain(|n| filter.accepts(active(n)));
        let mut refs: Vec<NetworkRef> = items.iter().map(reference).collect();
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(refs)
    }

    fn lookup_network(&self, key: Lookup<'_>) -> Result<NetworkRef> {
        match key {
            Lookup::Name(name) => self.get(name).map(|n| reference(&n)),
            _ => self
                .list_networks(ListFilter::All)?
                .into_iter()
                .find(|n| matches!(key, Lookup::Uuid(u) if n.uuid.eq_ignore_ascii_case(&u.to_string())))
                .ok_or_else(|| Error::not_found(KIND, key.describe())),
        }
    }

    fn network_definition(&self, name: &str, _inactive: bool) -> Result<Network> {
        let mut n = self.get(name)?;
        n.metadata.managed_fields = None;
        n.status = None;
        Ok(n)
    }

    fn network_info(&self, name: &str) -> Result<NetworkInfo> {
        let n = self.get(name)?;
        let bridge = n.spec.bridge.clone().or_else(|| {
            n.status
                .as_ref()
                .and_then(|s| s.nodes.iter().find_map(|x| x.bridge.clone()))
        });
        Ok(NetworkInfo {
            name: n.name_any(),
            uuid: n.spec.uuid.clone().unwrap_or_default(),
            active: active(&n),
            persistent: true,
            autostart: n.spec.autostart,
            bridge,
        })
    }

    fn define_network(&self, network: &Network) -> Result<NetworkRef> {
        self.apply(network)
    }

    /// No transient networks on a cluster: applied with `spec.active: true`.
    fn create_network(&self, network: &Network) -> Result<NetworkRef> {
        let mut n = network.clone();
        n.spec.active = Some(true);
        self.apply(&n)
    }

    fn undefine_network(&self, name: &str) -> Result<()> {
        self.0
            .block_on(self.api().delete(name, &DeleteParams::default()))
            .map(|_| ())
            .map_err(|e| api_error(KIND, name, e))
    }

    fn start_network(&self, name: &str) -> Result<()> {
        self.patch(name, json!({"spec": {"active": true}}))
    }

    fn destroy_network(&self, name: &str) -> Result<()> {
        self.patch(name, json!({"spec": {"active": false}}))
    }

    fn set_network_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.patch(name, json!({"spec": {"autostart": autostart}}))
    }
}
