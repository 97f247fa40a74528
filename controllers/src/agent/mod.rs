//! The node agent's reconcilers: it registers its Host, renews a Lease as
//! its heartbeat, and realizes the objects of its node through the drivers
//! it embeds, writing what it observes to their status under its own field
//! manager (`vireo-agent/<node>`).
//!
//! It watches only Domains and StorageVols labelled with its node
//! (`vireo.dev/node`), and the cluster-scoped Networks and StoragePools whose
//! `nodeSelector` matches its Host's labels.

mod domain;
mod host;
mod migration;
mod network;
mod pool;
mod snapshot;
pub mod subresources;
mod sweep;
mod volume;

use futures::FutureExt;
pub(crate) use volume::file_name as volume_file_name;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use vireo_crds::DomainType;
use vireo_drivers::Connection;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name: the Host's name and the value of `vireo.dev/node`.
    pub node_name: String,
    /// Where the agent keeps its drivers' state.
    pub state_dir: PathBuf,
    /// Labels of the Host (matched by nodeSelectors).
    pub labels: BTreeMap<String, String>,
    /// CPUs and memory to offer, instead of this machine's.
    pub cpus: Option<u32>,
    pub memory: Option<u64>,
    /// vCPUs offered per CPU.
    pub cpu_overcommit: u32,
    /// How often the heartbeat Lease is renewed.
    pub heartbeat: Duration,
    /// How long the Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often a healthy object is looked at again.
    pub resync: Duration,
    /// Objects reconciled at once, per kind.
    pub concurrency: u16,
    /// How long a guest gets to shut down before it is destroyed.
    pub stop_timeout: Duration,
    /// Where this host's filesystem is seen: pool paths are taken under it
    /// (`/`, or the host's root mounted into a container; a directory per
    /// simulated node in tests).
    pub host_root: PathBuf,
    /// Directories a Domain's kernel and initrd may come from (checked
    /// after symbolic links are resolved). Empty: any path (standalone).
    pub boot_dirs: Vec<PathBuf>,
    /// The local API socket; STATE/vireo.sock when unset.
    pub socket: Option<PathBuf>,
    /// The domain types to offer; empty: every driver that opens here.
    pub drivers: Vec<DomainType>,
    /// Where Networks are realized: real bridges, or the test driver's
    /// bookkeeping (several simulated nodes on one machine).
    pub network_driver: NetworkBackend,
    /// The aggregated API (`subresources.vireo.dev`): consoles and volume
    /// transfers through the API server. Off when unset.
    pub subresources: Option<subresources::SubresourcesConfig>,
    /// The address other agents send live migrations to; unset: the
    /// node's first non-loopback address.
    pub migration_address: Option<std::net::IpAddr>,
}

/// The agent's network backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkBackend {
    /// Linux bridges, nftables and dnsmasq (`drivers::bridge`).
    #[default]
    Bridge,
    /// The test driver: networks are records, no device is made.
    Test,
}

impl AgentConfig {
    /// Why a Domain's boot files are refused on this node, if they are:
    /// `spec.os.kernel` and `spec.os.initrd` must be files in a boot
    /// directory or volumes of the node's pools, once links and `..` are
    /// resolved (`vireo_drivers::host_paths`). No boot directory
    /// configured (tests that build an `AgentConfig` themselves): any path.
    pub fn boot_path_refusal(
        &self,
        dom: &vireo_crds::Domain,
        storage: &dyn vireo_drivers::StorageDriver,
    ) -> Option<String> {
        if self.boot_dirs.is_empty() {
            return None;
        }
        vireo_drivers::host_paths::refusal(dom, &self.boot_dirs, Some(storage))
            .map(|why| format!("{why} on node {}", self.node_name))
    }

    /// The process drivers' URI parameter carrying the boot directories, so
    /// that the drivers refuse the same paths on define.
    fn boot_dirs_param(&self) -> String {
        if self.boot_dirs.is_empty() {
            return String::new();
        }
        let dirs: Vec<String> = self
            .boot_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        format!("&boot_dirs={}", dirs.join(":"))
    }
}

/// The node's own connection: the test driver (its `type: test` domains,
/// under STATE/test-node), the bridge network backend (records under
/// STATE/network; or the test driver's networks with `--network-driver
/// test`) and the dir storage backend (pool records under STATE/storage,
/// pool paths under the host root).
pub(crate) fn open_node(config: &AgentConfig) -> Result<Connection> {
    let test = std::sync::Arc::new(
        vireo_drivers::test::TestDriver::from_dir(&config.state_dir.join("test-node"))
            .map_err(Error::Invalid)?
            .with_domain_ids(domain_ids(config))
            .map_err(|e| Error::Invalid(format!("the node's domain IDs: {e}")))?,
    );
    let network: std::sync::Arc<dyn vireo_drivers::NetworkDriver> = match config.network_driver {
        NetworkBackend::Test => test.clone(),
        NetworkBackend::Bridge => {
            let bridge =
                vireo_drivers::bridge::BridgeDriver::open(&config.state_dir.join("network"))?;
            // Networks marked autostart come up with the agent (libvirt's
            // autostart), and active ones whose devices went are repaired.
            match bridge.autostart_all() {
                Ok(failed) => {
                    for (name, e) in failed {
                        tracing::warn!(network = %name, error = %e, "autostart failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "autostart of networks failed"),
            }
            std::sync::Arc::new(bridge)
        }
    };
    let storage = std::sync::Arc::new(
        vireo_drivers::storage::dir::DirStorage::open(
            &config.state_dir.join("storage"),
            &config.host_root,
        )
        .map_err(Error::Invalid)?,
    );
    Ok(Connection::new(
        format!("vireo-node://{}", config.node_name),
        test,
        network,
        storage,
    ))
}

/// What every reconcile of the agent shares.
pub(crate) struct Ctx {
    pub client: Client,
    /// The node's own connection (test driver): networks, pools, volumes,
    /// and `type: test` domains.
    pub conn: Connection,
    /// One connection per domain type this agent embeds (`test`, `qemu`),
    /// each sharing the node's network and storage drivers.
    pub hypervisors: BTreeMap<DomainType, Connection>,
    pub config: AgentConfig,
    pub manager: String,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    failures: Mutex<HashMap<String, u32>>,
    /// Starts this agent made, per domain: the watch cache can lag behind
    /// our own status writes, and a start count must never go down.
    starts: Mutex<HashMap<String, u32>>,
    /// When a graceful stop was first asked, per domain.
    stops: Mutex<HashMap<String, std::time::Instant>>,
    /// Volume fills (copies, URL fetches) running or recently ended, by
    /// volume file name.
    pub fills: Mutex<HashMap<String, Arc<volume::Fill>>>,
    /// The status this agent last applied to each Domain (by UID), and
    /// when: a reconcile woken by another writer's change that the watch
    /// delivered before this agent's own write sees the object without it,
    /// and need not send the same status again.
    pub applied: Mutex<HashMap<String, (vireo_crds::DomainStatus, std::time::Instant)>>,
}

impl Ctx {
    /// The domain types this agent runs, as the Host lists them.
    pub fn driver_names(&self) -> Vec<String> {
        self.hypervisors.keys().map(|t| t.to_string()).collect()
    }

    /// Runs a driver call for a domain of type `ty` on the blocking pool.
    pub async fn drive_domain<T, F>(&self, ty: DomainType, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> vireo_drivers::Result<T> + Send + 'static,
    {
        let conn = self.hypervisors.get(&ty).cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "domains of type '{ty}' do not run on node {} (it embeds: {})",
                self.config.node_name,
                self.driver_names().join(", ")
            ))
        })?;
        Ok(tokio::task::spawn_blocking(move || f(&conn)).await??)
    }

    /// Runs a driver call on the blocking pool: drivers are synchronous.
    pub async fn drive<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> vireo_drivers::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        Ok(tokio::task::spawn_blocking(move || f(&conn)).await??)
    }

    /// Whether a nodeSelector selects this node.
    pub fn selects_me(&self, selector: Option<&BTreeMap<String, String>>) -> bool {
        // The Host carries its node label too (`vireo.dev/node: <node>`).
        let label = |k: &str| {
            if k == vireo_crds::labels::NODE {
                Some(&self.config.node_name)
            } else {
                self.config.labels.get(k)
            }
        };
        selector.is_none_or(|s| s.iter().all(|(k, v)| label(k) == Some(v)))
    }

    /// Requeue delay after a failure: 1 s doubling to 60 s, per object.
    fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(6)).min(Duration::from_secs(60))
    }

    /// The start count of a domain: the larger of what status says and
    /// what this agent remembers, plus `started` more.
    pub fn start_count(&self, key: &str, in_status: u32, started: u32) -> u32 {
        let mut s = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        let n = s.entry(key.to_string()).or_default();
        *n = (*n).max(in_status).saturating_add(started);
        *n
    }

    /// When a stop of this domain was first asked, for the destroy timeout.
    pub fn stop_asked(&self, key: &str) -> std::time::Instant {
        let mut s = self.stops.lock().unwrap_or_else(|p| p.into_inner());
        *s.entry(key.to_string())
            .or_insert_with(std::time::Instant::now)
    }

    /// The stop finished: the next stop starts its own timeout.
    pub fn forget_stop(&self, key: &str) {
        let mut s = self.stops.lock().unwrap_or_else(|p| p.into_inner());
        s.remove(key);
    }

    /// Forgets what this agent remembers of an object that left the node.
    pub fn forget(&self, key: &str) {
        for map in [&self.failures, &self.starts] {
            let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|k, _| k != key && !k.starts_with(&format!("{key}#")));
        }
        let mut s = self.stops.lock().unwrap_or_else(|p| p.into_inner());
        s.remove(key);
    }

    fn succeeded(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(key);
    }
}

/// Wraps a reconcile with metrics, logs and the per-object backoff bookkeeping.
pub(crate) async fn instrumented<F>(
    ctx: &Ctx,
    controller: &str,
    key: String,
    f: F,
) -> Result<Action>
where
    F: std::future::Future<Output = Result<Action>>,
{
    let started = std::time::Instant::now();
    // A panic in a reconcile is a defect: it fails this object's reconcile
    // (logged, evented by the caller, retried with backoff), never the agent.
    let result = std::panic::AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .unwrap_or_else(|p| Err(crate::error::panicked(p.as_ref())));
    match &result {
        Ok(_) => {
            ctx.succeeded(&key);
            ctx.metrics.reconciled(controller, started, None);
        }
        Err(e) => {
            ctx.metrics.reconciled(controller, started, Some(e.label()));
            tracing::warn!(controller, object = %key, error = %e, "reconcile failed");
        }
    }
    result
}

pub(crate) fn error_policy(ctx: &Ctx, key: &str) -> Action {
    Action::requeue(ctx.backoff(key))
}

/// Runs the agent until SIGTERM or Ctrl-C. Guests keep running after it stops.
pub async fn run(
    config: AgentConfig,
    metrics: Arc<Metrics>,
    mut shutdown: crate::shutdown::Shutdown,
) -> Result<()> {
    if !vireo_crds::labels::is_label_value(&config.node_name) {
        return Err(Error::Invalid(format!(
            "node name '{}' cannot be a label value (at most 63 characters of letters, digits, '-', '_', '.')",
            config.node_name
        )));
    }
    let client = Client::try_default().await?;
    let (config, conn, hypervisors) = open_drivers(config).await?;
    // The node's own door to consoles and volume uploads and downloads
    // (`vireo -c vireo+unix:///PATH`, or `kubectl exec` into the agent's
    // pod); from a workstation, the aggregated API (subresources) instead.
    let socket = serve_local_api(&config, &conn, &hypervisors)?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "vireo-agent".into(),
            instance: Some(config.node_name.clone()),
        },
    );
    let ctx = Arc::new(Ctx {
        manager: vireo_crds::labels::agent_manager(&config.node_name),
        client,
        conn,
        hypervisors,
        config,
        recorder,
        metrics: metrics.clone(),
        failures: Mutex::new(HashMap::new()),
        starts: Mutex::new(HashMap::new()),
        stops: Mutex::new(HashMap::new()),
        fills: Mutex::new(HashMap::new()),
        applied: Mutex::new(HashMap::new()),
    });
    host::register(&ctx).await?;
    tracing::info!(node = %ctx.config.node_name, "registered Host");
    metrics.set_ready(true);
    let subresources = ctx
        .config
        .subresources
        .clone()
        .map(|sr| tokio::spawn(subresources::serve(ctx.clone(), sr)));
    let heartbeat = tokio::spawn(host::heartbeat(ctx.clone()));
    let sweep = tokio::spawn(sweep::run(ctx.clone()));
    let (reconciled, domains_reconciled) = futures::channel::mpsc::unbounded();
    tokio::select! {
        _ = domain::run(ctx.clone(), reconciled) => {}
        _ = volume::run(ctx.clone()) => {}
        _ = network::run(ctx.clone()) => {}
        _ = pool::run(ctx.clone()) => {}
        _ = snapshot::run(ctx.clone(), domains_reconciled) => {}
        _ = migration::run(ctx.clone()) => {}
        _ = shutdown.wait() => tracing::info!("stopping; guests keep running"),
    }
    heartbeat.abort();
    sweep.abort();
    if let Some(s) = subresources {
        s.abort();
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Opens the node's connection and its hypervisor drivers on the blocking
/// pool: opening re-adopts what runs (networks' bridges and dnsmasq, guests'
/// processes) through synchronous calls that must not run on an async
/// worker thread.
pub(crate) async fn open_drivers(
    config: AgentConfig,
) -> Result<(AgentConfig, Connection, BTreeMap<DomainType, Connection>)> {
    tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let conn = open_node(&config)?;
            let hypervisors = open_hypervisors(&config, &conn);
            Ok((conn, hypervisors))
        }))
        .unwrap_or_else(|p| Err(crate::error::panicked(p.as_ref())))
        .map(|(conn, hypervisors)| (config, conn, hypervisors))
    })
    .await?
}

/// Serves the node's drivers as one on the local API socket (`--socket`,
/// default STATE/vireo.sock, mode 0600), the CLI's `vireo -c
/// vireo+unix:///PATH`. Returns its path.
pub(crate) fn serve_local_api(
    config: &AgentConfig,
    node: &Connection,
    hypervisors: &BTreeMap<DomainType, Connection>,
) -> Result<PathBuf> {
    let socket = config
        .socket
        .clone()
        .unwrap_or_else(|| config.state_dir.join("vireo.sock"));
    let api = Connection::new(
        format!("vireo+unix://{}", socket.display()),
        Arc::new(
            vireo_drivers::node::NodeHypervisor::new(hypervisors.clone())
                .map_err(Error::Invalid)?,
        ),
        node.network_driver(),
        node.storage_driver(),
    );
    vireo_drivers::remote::serve(api, &socket)
        .map_err(|e| Error::Invalid(format!("local API socket {}: {e}", socket.display())))?;
    tracing::info!(socket = %socket.display(), "local API listening (vireo -c vireo+unix://{})", socket.display());
    Ok(socket)
}

/// The hypervisor drivers this agent embeds (those of `--drivers`, when
/// given): `test` always, `qemu` when
/// `qemu-system-x86_64` is installed (state under STATE/qemu), `kvm` when
/// /dev/kvm opens and `vireo-vmm` is beside the agent, on PATH or in
/// $VIREO_VMM (state under STATE/kvm). Each shares the node's network and
/// storage drivers.
pub(crate) fn open_hypervisors(
    config: &AgentConfig,
    node: &Connection,
) -> BTreeMap<DomainType, Connection> {
    let mut out = BTreeMap::new();
    out.insert(DomainType::Test, node.clone());
    out.extend(open_process_drivers(config, node));
    if !config.drivers.is_empty() {
        out.retain(|ty, _| config.drivers.contains(ty));
        for ty in &config.drivers {
            if !out.contains_key(ty) {
                tracing::warn!(driver = %ty, "asked for with --drivers, but it does not open on this node");
            }
        }
    }
    out
}

/// One counter of domain IDs for all the drivers of this node, so that an
/// ID names one domain on it whatever its type (see `vireo_drivers::ids`).
fn domain_ids(config: &AgentConfig) -> vireo_drivers::ids::DomainIds {
    vireo_drivers::ids::DomainIds::new(&config.state_dir.join("domain-ids"))
}

/// The qemu and kvm drivers, where they open, on the node's domain IDs.
fn open_process_drivers(
    config: &AgentConfig,
    node: &Connection,
) -> BTreeMap<DomainType, Connection> {
    let mut out = BTreeMap::new();
    let ids = domain_ids(config);
    let root = config.state_dir.join("qemu");
    let path = format!(
        "/embed?root={}&ids={}{}",
        root.display(),
        ids.path().display(),
        config.boot_dirs_param()
    );
    let uri = format!("qemu://{path}");
    match vireo_drivers::qemu::open_with(&uri, &path, node.network_driver(), node.storage_driver())
    {
        Ok(c) => {
            out.insert(DomainType::Qemu, c);
        }
        Err(e) => tracing::warn!(error = %e, "the qemu driver is not available on this node"),
    }
    let root = config.state_dir.join("kvm");
    let path = format!(
        "/embed?root={}&ids={}{}",
        root.display(),
        ids.path().display(),
        config.boot_dirs_param()
    );
    match vireo_drivers::kvm::open_with(
        &format!("kvm://{path}"),
        &path,
        node.network_driver(),
        node.storage_driver(),
    ) {
        Ok(c) => {
            out.insert(DomainType::Kvm, c);
        }
        Err(e) => tracing::warn!(error = %e, "the kvm driver is not available on this node"),
    }
    out
}

/// Whether a cluster-scoped object (Network, StoragePool) should be realized
/// on this node: not being deleted, selecting this node, and active.
pub(crate) fn wanted_here(
    ctx: &Ctx,
    meta: &kube::api::ObjectMeta,
    selector: Option<&BTreeMap<String, String>>,
    active: Option<bool>,
) -> bool {
    meta.deletion_timestamp.is_none() && ctx.selects_me(selector) && active.unwrap_or(true)
}

/// After a cluster-scoped object was torn down on this node: drop this
/// node's status entry, say so in an Event, and release this node's finalizer.
pub(crate) async fn released_here<K>(
    ctx: &Ctx,
    api: &kube::Api<K>,
    obj: &K,
    reason: &str,
    note: String,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = kube::ResourceExt::name_any(obj);
    crate::k8s::apply_status(api, &name, &ctx.manager, &serde_json::json!({})).await?;
    crate::k8s::event(
        &ctx.recorder,
        obj,
        kube::runtime::events::EventType::Normal,
        reason,
        "Destroy",
        note,
    )
    .await;
    crate::k8s::remove_finalizer(
        api,
        obj,
        &vireo_crds::labels::node_finalizer(&ctx.config.node_name),
    )
    .await
}

/// Drains a controller's output stream (the results are already logged).
pub(crate) async fn drain<S, T, E>(stream: S)
where
    S: futures::Stream<Item = std::result::Result<T, E>>,
{
    stream.for_each(|_| async {}).await;
}
