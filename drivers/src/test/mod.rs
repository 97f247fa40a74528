//! libvirt's test driver: an in-memory node with libvirt's semantics and no
//! guests. `test:///default` is the node libvirt's test driver starts with;
//! `test:///PATH` loads a node file.
//!
//! A node file is a YAML stream of ordinary Vireo manifests. Every object is
//! loaded persistent and active, as libvirt's test driver loads its custom
//! files, unless an annotation says otherwise:
//!
//! * `test.vireo.dev/state`: `running` (default), `paused` or `shutoff` for a
//!   Domain; `active` (default) or `inactive` for a Network or StoragePool;
//! * `test.vireo.dev/capacity`: a StoragePool's size (default `100Gi`);
//! * a `Host` document's `status.nodeInfo` replaces the default NodeInfo.
//!
//! `test:///DIR/` (a directory) is a persistent node: it starts empty, and
//! every change is saved under DIR, so a process that opens it again finds
//! every object as it was, running domains with the same IDs (see [`store`]).

mod domains;
mod migration;
mod networks;
mod node_file;
mod snapshots;
mod storage;
mod store;

pub use migration::URI_SCHEME as MIGRATION_URI_SCHEME;
pub use node_file::STATE_ANNOTATION;
pub use storage::CAPACITY_ANNOTATION;

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use vireo_crds::{
    Domain, DomainReason, DomainState, Network, NodeInfo, ObjectKind, StoragePool, VolFormat,
};

use crate::error::{Error, ObjectName};

/// The driver. Cheap to clone a reference to; all state is behind one lock.
pub struct TestDriver {
    state: Mutex<State>,
    /// Where a persistent node saves its objects.
    store: Option<store::Store>,
}

/// The kinds of object the store keeps a file for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Domain,
    Network,
    Pool,
}

impl Kind {
    fn object_kind(self) -> ObjectKind {
        match self {
            Self::Domain => ObjectKind::Domain,
            Self::Network => ObjectKind::Network,
            Self::Pool => ObjectKind::StoragePool,
        }
    }
}

/// The name of an object, empty when the manifest has none (the
/// operation then fails on it with a clear error).
fn object_name(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// libvirt's test driver node: i686, 16 CPUs at 1400 MHz, 2 NUMA cells of
/// 2 sockets x 2 cores x 2 threads, 3 GiB.
pub fn default_node_info() -> NodeInfo {
    NodeInfo {
        cpu_model: "i686".into(),
        cpus: 16,
        mhz: 1400,
        numa_nodes: 2,
        sockets: 2,
        cores: 2,
        threads: 2,
        memory_bytes: 3 << 30,
    }
}

#[derive(Default)]
struct State {
    node: NodeInfo,
    next_domain_id: u32,
    /// The node's shared domain IDs, when the driver is one of several
    /// (see [`crate::ids`]); `next_domain_id` otherwise.
    ids: Option<crate::ids::DomainIds>,
    next_bridge: u32,
    domains: BTreeMap<String, DomainObj>,
    networks: BTreeMap<String, NetworkObj>,
    pools: BTreeMap<String, PoolObj>,
}

/// A domain as libvirt's `virDomainObj` holds it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DomainObj {
    /// The running definition while active; the persistent one while inactive.
    def: Domain,
    /// A persistent definition that takes effect at the next start.
    new_def: Option<Domain>,
    uuid: String,
    persistent: bool,
    autostart: bool,
    state: DomainState,
    reason: DomainReason,
    id: Option<u32>,
    max_memory: u64,
    memory: u64,
    vcpus: u32,
    cpu_time_ns: u64,
    #[serde(skip)]
    running_since: Option<Instant>,
    /// The managed save image (`managedsave`): the next start resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    managed_save: Option<domains::SavedImage>,
    /// Its snapshots (`snapshot-create-as`).
    #[serde(
        default,
        skip_serializing_if = "crate::snapshot::SnapshotTree::is_empty"
    )]
    snapshots: crate::snapshot::SnapshotTree,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkObj {
    def: Network,
    new_def: Option<Network>,
    uuid: String,
    persistent: bool,
    autostart: bool,
    active: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolObj {
    /// The running definition while active; the persistent one while inactive.
    def: StoragePool,
    /// A persistent definition (and its size) that takes effect at the next start.
    new_def: Option<(StoragePool, u64)>,
    uuid: String,
    persistent: bool,
    autostart: bool,
    active: bool,
    capacity: u64,
    volumes: BTreeMap<String, VolObj>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolObj {
    format: VolFormat,
    capacity: u64,
    allocation: u64,
}

impl PoolObj {
    fn allocation(&self) -> u64 {
        self.volumes.values().map(|v| v.allocation).sum()
    }
    fn available(&self) -> u64 {
        self.capacity.saturating_sub(self.allocation())
    }
    fn vol_path(&self, vol: &str) -> String {
        format!("{}/{}", self.def.spec.path.trim_end_matches('/'), vol)
    }
}

impl TestDriver {
    fn empty(node: NodeInfo) -> Self {
        Self {
            state: Mutex::new(State {
                node,
                next_domain_id: 1,
                ..State::default()
            }),
            store: None,
        }
    }

    /// A persistent node in a directory (created if needed): empty the first
    /// time, as it was left every time after.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let mut driver = Self::empty(default_node_info());
        let store = {
            let mut st = driver.lock();
            store::Store::open(dir, &mut st)
                .map_err(|e| format!("cannot open the test node in {}: {e}", dir.display()))?
        };
        driver.store = Some(store);
        Ok(driver)
    }

    /// Takes domain IDs from the node's shared counter instead of its own,
    /// first reporting the IDs of the domains it runs now.
    pub fn with_domain_ids(self, ids: crate::ids::DomainIds) -> std::io::Result<Self> {
        {
            let mut st = self.lock();
            if let Some(max) = st.domains.values().filter_map(|d| d.id).max() {
                ids.observe(max)?;
            }
            st.ids = Some(ids);
        }
        Ok(self)
    }

    /// Runs a change under the lock, then saves the object it named.
    fn change<R>(
        &self,
        kind: Kind,
        name: &str,
        f: impl FnOnce(&mut State) -> crate::Result<R>,
    ) -> crate::Result<R> {
        let mut st = self.lock();
        let r = f(&mut st)?;
        if let Some(store) = &self.store {
            store
                .save(&st, kind, name)
                .map_err(|e| Error::OperationFailed {
                    object: ObjectName::new(kind.object_kind(), name),
                    message: format!("cannot save the test node's state: {e}"),
                })?;
        }
        Ok(r)
    }

    /// The node of `test:///default`.
    pub fn default_node() -> Self {
        let driver = Self::empty(default_node_info());
        // The embedded file is part of the build and loads in a unit test.
        if let Err(e) = driver.load(include_str!("default-node.yaml")) {
            unreachable!("the embedded default node does not load: {e}");
        }
        driver
    }

    /// A node loaded from a node file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read node file {}: {e}", path.display()))?;
        let driver = Self::empty(default_node_info());
        driver
            .load(&text)
            .map_err(|e| format!("node file {}: {e}", path.display()))?;
        Ok(driver)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the maps half-edited
        // in a way later calls would misread (each operation checks before it
        // writes), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HypervisorDriver, ListFilter, Lookup, NetworkDriver, StorageDriver};

    #[test]
    fn default_node_matches_libvirt() {
        let d = TestDriver::default_node();
        let dom = d.lookup_domain(Lookup::Name("test")).expect("test exists");
        assert_eq!(dom.id, Some(1));
        assert_eq!(dom.uuid, "6695eb01-f6a4-8304-79aa-97f2502e193f");
        let info = d.domain_info("test").expect("info");
        assert_eq!((info.state, info.vcpus), (DomainState::Running, 2));
        assert_eq!(info.max_memory.0, "8Gi");
        assert_eq!(info.memory.0, "2Gi");
        let net = d.network_info("default").expect("net");
        assert!(net.active && net.persistent && !net.autostart);
        assert_eq!(net.bridge.as_deref(), Some("virbr0"));
        let pool = d.pool_info("default-pool").expect("pool");
        assert_eq!(pool.capacity, 100 << 30);
        assert_eq!(pool.available, 100 << 30);
        assert_eq!(d.count_domains(ListFilter::All).ok(), Some(1));
        assert_eq!(d.node_info().expect("node").cpus, 16);
    }

    #[test]
    fn default_test_domain_has_libvirts_disk_and_nic() {
        let d = TestDriver::default_node();
        let def = d.domain_definition("test", false).expect("def");
        let disks = &def.spec.devices.disks;
        assert_eq!(disks.len(), 1);
        assert_eq!(
            (disks[0].name.as_str(), disks[0].volume.as_str()),
            ("vda", "diskimage1")
        );
        let nics = &def.spec.devices.interfaces;
        assert_eq!(nics.len(), 1);
        assert_eq!(nics[0].name, "testnet0");
        assert_eq!(nics[0].network, "default");
        assert_eq!(nics[0].mac.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(d.domain_os_type("test").expect("os"), "linux");
    }

    #[test]
    fn domains_of_any_type_are_simulated() {
        use vireo_crds::DomainType;
        let d = TestDriver::default_node();
        for (name, ty) in [("k", DomainType::Kvm), ("q", DomainType::Qemu)] {
            let mut dom = crate::conformance::test_driver_fixture().domain(name);
            dom.spec.domain_type = ty;
            d.define_domain(&dom).expect("defined");
            d.start_domain(name).expect("started");
            assert_eq!(d.domain_state(name).expect("state").0, DomainState::Running);
            let def = d.domain_definition(name, false).expect("def");
            assert_eq!(def.spec.domain_type, ty, "the type is kept");
        }
    }

    #[test]
    fn live_changes_of_an_inactive_domain_are_refused_as_libvirt_does() {
        use crate::Affect;
        let d = TestDriver::default_node();
        d.destroy_domain("test").expect("destroy");
        let e = d
            .set_domain_memory_flags("test", 1 << 30, Affect::Live)
            .expect_err("live on an inactive domain");
        assert!(matches!(e, Error::InvalidState { .. }), "{e}");
        assert!(e.to_string().contains("is not running"), "{e}");
        let e = d
            .set_domain_vcpus_flags("test", 1, Affect::Live)
            .expect_err("live on an inactive domain");
        assert!(matches!(e, Error::InvalidState { .. }), "{e}");
        d.set_domain_memory_flags("test", 1 << 30, Affect::Config)
            .expect("config");
        assert_eq!(d.domain_info("test").expect("info").memory.0, "1Gi");
        d.set_domain_vcpus_flags("test", 1, Affect::Current)
            .expect("current is config");
        let def = d.domain_definition("test", true).expect("def");
        assert_eq!((def.spec.vcpus, def.spec.max_vcpus), (1, Some(2)));
        // On a running domain, --config leaves the live domain alone.
        d.start_domain("test").expect("start");
        d.set_domain_memory_flags("test", 512 << 20, Affect::Config)
            .expect("config while running");
        assert_eq!(d.domain_info("test").expect("info").memory.0, "1Gi");
        let next = d.domain_definition("test", true).expect("next");
        assert_eq!(
            next.spec.current_memory.as_ref().map(|q| q.0.as_str()),
            Some("512Mi")
        );
    }

    #[test]
    fn a_live_description_leaves_the_persistent_one() {
        use crate::Affect;
        use crate::hypervisor::DESCRIPTION_ANNOTATION as KEY;
        let d = TestDriver::default_node();
        d.set_domain_annotation("test", KEY, Some("live"), Affect::Current)
            .expect("live");
        let note = |inactive| {
            d.domain_definition("test", inactive)
                .expect("def")
                .metadata
                .annotations
                .and_then(|a| a.get(KEY).cloned())
        };
        assert_eq!(note(false).as_deref(), Some("live"));
        assert_eq!(note(true), None);
        d.set_domain_annotation("test", KEY, Some("next"), Affect::Config)
            .expect("config");
        assert_eq!(note(true).as_deref(), Some("next"));
        assert_eq!(note(false).as_deref(), Some("live"));
    }
}
