//! Standalone mode: the agent on one machine without a cluster. It takes
//! the manifests a cluster would (Domains, Networks, StoragePools,
//! StorageVols) from a directory, looks at it again every `resync`, places
//! everything on this node, and reconciles through the same drivers and the
//! same run-strategy decisions as the clustered agent.
//!
//! State lives under the state directory, as on a cluster node:
//! `test-node/` (networks, pools, volumes and `type: test` domains), `qemu/`
//! and `kvm/` (the process-backed drivers, whose guests outlive the agent),
//! `standalone/managed.json` (what this agent put on the node from the
//! directory, so that a manifest removed from it is torn down) and
//! `standalone/status/NAMESPACE.NAME.json` (each Domain's status). The CLI
//! reaches the node through the agent's local API socket,
//! `vireo -c vireo+unix:///STATE/vireo.sock` (`--socket`), which shows every
//! embedded driver's domains as one list.
//!
//! A file that does not parse is reported and its objects are left as they
//! were: nothing is torn down because of an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vireo_crds::labels::node_key;
use vireo_crds::{Domain, DomainInfo, DomainState, DomainType, Manifest};
use vireo_drivers::{Connection, Error as DriverError, Lookup};

use crate::agent::AgentConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::run_strategy::{Action as Step, History, decide};
use crate::shutdown::Shutdown;

/// What the agent recorded about the Domains it manages.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Managed {
    /// `namespace/name` → the domain's type.
    domains: BTreeMap<String, DomainType>,
    /// `namespace/name` → starts made by this agent (for `Once`).
    #[serde(default)]
    starts: BTreeMap<String, u32>,
}

/// A Domain's status as standalone mode keeps it (the cluster's
/// `status`, written to a file).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    name: String,
    namespace: String,
    state: DomainState,
    id: Option<u32>,
    uuid: String,
    start_count: u32,
    info: DomainInfo,
    message: String,
    /// What the firmware said when it found nothing to boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_problem: Option<String>,
}

struct Standalone {
    config: AgentConfig,
    manifests: PathBuf,
    node: Connection,
    hypervisors: BTreeMap<DomainType, Connection>,
    dir: PathBuf,
    managed: Managed,
    /// Last good parse of each file, so a broken file changes nothing.
    files: HashMap<PathBuf, Vec<Manifest>>,
    /// When a graceful stop was first asked, per domain.
    stops: HashMap<String, Instant>,
    /// Domains whose firmware found nothing to boot, warned about once.
    unbootable: BTreeSet<String>,
    /// Domains waiting for an upload, warned about once.
    waiting: BTreeSet<String>,
    /// Domains whose managed save (`runStrategy: Saved`) failed, warned
    /// about once; the guest runs on.
    save_failed: BTreeSet<String>,
}

fn io(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {e}"))
}

/// Runs standalone mode until SIGTERM or Ctrl-C; guests keep running after.
pub async fn run(
    config: AgentConfig,
    manifests: PathBuf,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> Result<()> {
    let (config, node, hypervisors) = crate::agent::open_drivers(config).await?;
    let socket = crate::agent::serve_local_api(&config, &node, &hypervisors)?;
    let dir = config.state_dir.join("standalone");
    std::fs::create_dir_all(dir.join("status")).map_err(|e| io("state directory", e))?;
    let managed = std::fs::read(dir.join("managed.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut s = Standalone {
        config,
        manifests,
        node,
        hypervisors,
        dir,
        managed,
        files: HashMap::new(),
        stops: HashMap::new(),
        unbootable: BTreeSet::new(),
        save_failed: BTreeSet::new(),
        waiting: BTreeSet::new(),
    };
    tracing::info!(
        manifests = %s.manifests.display(),
        drivers = ?s.hypervisors.keys().map(|t| t.to_string()).collect::<Vec<_>>(),
        "standalone mode"
    );
    metrics.set_ready(true);
    let resync = s.config.resync.min(Duration::from_secs(2));
    loop {
        let started = Instant::now();
        // The drivers are synchronous; one pass runs on the blocking pool.
        // A signal that comes meanwhile is kept by `shutdown` and ends the
        // loop once the pass is through.
        let result;
        (s, result) = tokio::task::spawn_blocking(move || {
            // A panic is a defect, but it fails this pass, not the agent.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.pass()))
                .unwrap_or_else(|p| Err(crate::error::panicked(p.as_ref())));
            (s, r)
        })
        .await
        .map_err(|e| io("standalone pass", e))?;
        metrics.reconciled(
            "standalone",
            started,
            result.as_ref().err().map(|e| e.label()),
        );
        if let Err(e) = result {
            tracing::warn!(error = %e, "standalone pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(resync) => {}
            _ = shutdown.wait() => {
                let _ = std::fs::remove_file(&socket);
                tracing::info!("stopping; guests keep running");
                return Ok(());
            }
        }
    }
}

impl Standalone {
    /// Reads the directory: every `*.yaml` / `*.yml` / `*.json` file except
    /// kustomizations, in name order. Keeps the last good parse of a file
    /// that now fails.
    fn read(&mut self) -> Result<Vec<Manifest>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.manifests)
            .map_err(|e| io(&self.manifests.display().to_string(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                let stem = p.file_stem().and_then(|e| e.to_str()).unwrap_or("");
                matches!(ext, "yaml" | "yml" | "json") && stem != "kustomization"
            })
            .collect();
        paths.sort();
        self.files.retain(|p, _| paths.contains(p));
        let mut out = Vec::new();
        for path in paths {
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| Manifest::parse_all(&t).map_err(|e| e.to_string()))
                .and_then(|all| {
                    // Every object checked before any is acted on: a file
                    // with one bad object changes nothing.
                    for (i, m) in all.iter().enumerate() {
                        m.validate().map_err(|e| {
                            format!("document {} ({} '{}'): {e}", i + 1, m.kind(), m.name())
                        })?;
                    }
                    Ok(all)
                }) {
                Ok(m) => {
                    self.files.insert(path.clone(), m);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "manifest not applied; keeping what it defined before");
                }
            }
            if let Some(m) = self.files.get(&path) {
                out.extend(m.iter().cloned());
            }
        }
        Ok(out)
    }

    fn save_managed(&self) -> Result<()> {
        let path = self.dir.join("managed.json");
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.managed).map_err(|e| io("managed.json", e))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io("managed.json", e))
    }

    fn hv(&self, ty: DomainType) -> Result<&Connection> {
        self.hypervisors.get(&ty).ok_or_else(|| {
            Error::Invalid(format!(
                "domains of type '{ty}' do not run on this machine (it embeds: {})",
                self.hypervisors
                    .keys()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    fn pass(&mut self) -> Result<()> {
        let manifests = self.read()?;
        let mut wanted = BTreeSet::new();
        // Pools and networks first, then volumes, then domains.
        for m in &manifests {
            let r = match m {
                Manifest::Network(n) => self.network(n),
                Manifest::StoragePool(p) => self.pool(p),
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "not realized");
            }
        }
        for m in &manifests {
            if let Manifest::StorageVol(v) = m
                && let Err(e) = self.volume(v)
            {
                tracing::warn!(error = %e, "volume not created");
            }
        }
        for m in &manifests {
            if let Manifest::Domain(d) = m {
                let ns = d
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let key = node_key(&ns, d.metadata.name.as_deref().unwrap_or_default());
                wanted.insert(key.clone());
                if let Err(e) = self.domain(&key, &ns, d) {
                    tracing::warn!(domain = %key, error = %e, "reconcile failed");
                }
            }
        }
        // Domains whose manifest is gone: destroyed and undefined.
        let gone: Vec<(String, DomainType)> = self
            .managed
            .domains
            .iter()
            .filter(|(k, _)| !wanted.contains(*k))
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        for (key, ty) in gone {
            let hv = self.hv(ty)?.hypervisor();
            match hv.domain_state(&key) {
                Ok((s, _)) if s.is_active() => hv.destroy_domain(&key)?,
                Ok(_) | Err(DriverError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            vireo_drivers::snapshot::delete_all(hv, &key)?;
            match hv.undefine_domain(&key) {
                Ok(()) | Err(DriverError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(domain = %key, "manifest removed: destroyed and undefined");
            self.managed.domains.remove(&key);
            self.managed.starts.remove(&key);
            let _ = std::fs::remove_file(self.status_path(&key));
            self.save_managed()?;
        }
        Ok(())
    }

    fn status_path(&self, key: &str) -> PathBuf {
        self.dir
            .join("status")
            .join(format!("{}.json", key.replace('/', ".")))
    }

    fn network(&self, n: &vireo_crds::Network) -> Result<()> {
        let net = self.node.network();
        let name = n.metadata.name.clone().unwrap_or_default();
        let changed = match net.network_definition(&name, true) {
            Ok(cur) => cur.spec != n.spec,
            Err(DriverError::NotFound(_)) => true,
            Err(e) => return Err(e.into()),
        };
        if changed {
            net.define_network(n)?;
        }
        if n.spec.active.unwrap_or(true) && !net.network_info(&name)?.active {
            net.start_network(&name)?;
        }
        Ok(())
    }

    fn pool(&self, p: &vireo_crds::StoragePool) -> Result<()> {
        let st = self.node.storage();
        let name = p.metadata.name.clone().unwrap_or_default();
        let changed = match st.pool_definition(&name) {
            Ok(cur) => cur.spec != p.spec,
            Err(DriverError::NotFound(_)) => true,
            Err(e) => return Err(e.into()),
        };
        if changed {
            st.define_pool(p)?;
        }
        if p.spec.active.unwrap_or(true)
            && st.pool_info(&name)?.state != vireo_drivers::PoolState::Running
        {
            let _ = st.build_pool(&name);
            st.start_pool(&name)?;
        }
        Ok(())
    }

    fn volume(&self, v: &vireo_crds::StorageVol) -> Result<()> {
        let st = self.node.storage();
        let ns = v
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let file =
            crate::agent::volume_file_name(&ns, v.metadata.name.as_deref().unwrap_or_default());
        match st.lookup_volume(&v.spec.pool, &file) {
            Ok(_) => Ok(()),
            Err(DriverError::NotFound(_)) => {
                let mut on_node = v.clone();
                on_node.metadata.name = Some(file);
                st.create_volume(&on_node)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn domain(&mut self, key: &str, ns: &str, dom: &Domain) -> Result<()> {
        let ty = dom.spec.domain_type;
        let conn = self.hv(ty)?.clone();
        let hv = conn.hypervisor();
        // Boot files only from the node's boot directories and pools.
        if let Some(why) = self
            .config
            .boot_path_refusal(dom, conn.storage_driver().as_ref())
        {
            return Err(Error::Invalid(why));
        }
        let mut def = Domain::new(key, dom.spec.clone());
        def.metadata.annotations = dom.metadata.annotations.clone();
        // A stable UUID when the manifest has none: derived from the key.
        let uuid = dom.spec.uuid.clone().unwrap_or_else(|| {
            uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("vireo:{key}").as_bytes(),
            )
            .to_string()
        });
        def.spec.uuid = Some(uuid.to_ascii_lowercase());
        def.spec
            .map_volumes(|v| crate::agent::volume_file_name(ns, v));
        let needs_define = match hv.domain_definition(key, true) {
            Ok(cur) => cur.spec != def.spec || cur.metadata.annotations != def.metadata.annotations,
            Err(DriverError::NotFound(_)) => true,
            Err(e) => return Err(e.into()),
        };
        if needs_define {
            hv.define_domain(&def)?;
            tracing::info!(domain = %key, "defined");
        }
        if self.managed.domains.insert(key.to_string(), ty) != Some(ty) {
            self.save_managed()?;
        }
        let (state, reason) = hv.domain_state(key)?;
        let starts = self.managed.starts.get(key).copied().unwrap_or(0);
        let history = History {
            started_once: starts > 0,
        };
        match decide(
            dom.spec.run_strategy,
            &dom.spec.lifecycle,
            state,
            reason,
            history,
        ) {
            Step::Nothing => {
                self.stops.remove(key);
                self.save_failed.remove(key);
            }
            Step::Save => match hv.managed_save(key) {
                Ok(()) => {
                    self.save_failed.remove(key);
                    tracing::info!(domain = %key, "saved (managed save); the next start resumes it");
                }
                Err(e) => {
                    if self.save_failed.insert(key.to_string()) {
                        tracing::warn!(domain = %key, error = %e, "managed save failed; the guest runs on");
                    }
                }
            },
            Step::Start => {
                // A disk made for an upload waits for its content first.
                if let Some(vol) = self.awaiting_upload(&def) {
                    // Once per wait, not once per pass.
                    if self.waiting.insert(key.to_string()) {
                        tracing::warn!(domain = %key, volume = %vol, "not started: volume '{vol}' is waiting for its content (vireo vol-upload --pool POOL {vol} FILE)");
                    }
                    return Ok(());
                }
                self.waiting.remove(key);
                let r = hv.start_domain(key)?;
                *self.managed.starts.entry(key.to_string()).or_default() += 1;
                self.save_managed()?;
                tracing::info!(domain = %key, id = ?r.id, "started");
            }
            Step::Stop => {
                let asked = *self
                    .stops
                    .entry(key.to_string())
                    .or_insert_with(Instant::now);
                if asked.elapsed() < self.config.stop_timeout {
                    hv.shutdown_domain(key)?;
                } else {
                    tracing::warn!(domain = %key, "did not shut down in time; destroying");
                    hv.destroy_domain(key)?;
                }
            }
        }
        let r = hv.lookup_domain(Lookup::Name(key))?;
        let info = hv.domain_info(key)?;
        let boot_problem = hv.boot_problem(key).unwrap_or_default();
        match &boot_problem {
            Some(p) if self.unbootable.insert(key.to_string()) => {
                tracing::warn!(domain = %key, "{p}; check spec.devices.disks, spec.os.boot and the console (vireo console {key})");
            }
            Some(_) => {}
            None => {
                self.unbootable.remove(key);
            }
        }
        let status = Status {
            name: dom.metadata.name.clone().unwrap_or_default(),
            namespace: ns.to_string(),
            state: info.state,
            id: r.id,
            uuid: r.uuid,
            start_count: self.managed.starts.get(key).copied().unwrap_or(0),
            message: match &boot_problem {
                Some(p) => format!("{} ({}) on this machine; {p}", info.state, info.reason),
                None => format!("{} ({}) on this machine", info.state, info.reason),
            },
            info,
            boot_problem,
        };
        let path = self.status_path(key);
        let bytes = serde_json::to_vec_pretty(&status).map_err(|e| io("status", e))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io("status", e))?;
        Ok(())
    }
}

impl Standalone {
    /// The first of a definition's disks (node volume names) that is a
    /// placeholder waiting for an upload, in any active pool.
    fn awaiting_upload(&self, def: &Domain) -> Option<String> {
        let st = self.node.storage();
        let pools = st
            .list_pools(vireo_drivers::ListFilter::Active)
            .unwrap_or_default();
        def.spec.volume_refs().into_iter().find_map(|(_, volume)| {
            pools
                .iter()
                .filter_map(|p| st.volume_info(&p.name, volume).ok())
                .find(|i| i.awaiting_upload)
                .map(|_| volume.to_string())
        })
    }
}

/// The state directory's Domain status files, for tests and tools.
pub fn status_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("standalone").join("status")
}
