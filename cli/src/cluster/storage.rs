//! Pools and volumes on a cluster: the cluster-scoped StoragePool objects
//! (their sizes summed over the nodes that realize them) and the
//! StorageVol objects of the connection's namespace, named `NS/NAME`.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use vireo_crds::quantity::{format_bytes, parse_quantity};
use vireo_crds::{ObjectKind, StoragePool, StorageVol};
use vireo_drivers::storage::Progress;
use vireo_drivers::{
    Error, ListFilter, Lookup, PoolInfo, PoolRef, PoolState, ResizeFlags, Result, StorageDriver,
    VolInfo, VolRef,
};

use super::{Kube, api_error, apply_params, for_apply, full_name, unsupported};

const POOL: ObjectKind = ObjectKind::StoragePool;
const VOL: ObjectKind = ObjectKind::StorageVol;

pub struct Storage(pub Arc<Kube>);

fn pool_active(p: &StoragePool) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.active_nodes)
        .is_some_and(|a| a > 0)
}

fn pool_ref(p: &StoragePool) -> PoolRef {
    PoolRef {
        name: p.name_any(),
        uuid: p.spec.uuid.clone().unwrap_or_default(),
    }
}

fn bytes(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> u64 {
    q.and_then(|q| parse_quantity(q).ok()).unwrap_or(0)
}

fn vol_ref(v: &StorageVol) -> VolRef {
    let status = v.status.as_ref();
    VolRef {
        pool: v.spec.pool.clone(),
        name: full_name(&v.namespace().unwrap_or_default(), &v.name_any()),
        key: status
            .and_then(|s| s.key.clone())
            .or_else(|| v.uid())
            .unwrap_or_default(),
        path: status.and_then(|s| s.path.clone()).unwrap_or_default(),
    }
}

impl Storage {
    fn pools(&self) -> Api<StoragePool> {
        Api::all(self.0.client().clone())
    }

    fn vols(&self, namespace: &str) -> Api<StorageVol> {
        Api::namespaced(self.0.client().clone(), namespace)
    }

    fn pool(&self, name: &str) -> Result<StoragePool> {
        self.0
            .block_on(self.pools().get(name))
            .map_err(|e| api_error(POOL, name, e))
    }

    fn patch_pool(&self, name: &str, patch: serde_json::Value) -> Result<()> {
        self.0
            .block_on(
                self.pools()
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .map(|_| ())
            .map_err(|e| api_error(POOL, name, e))
    }

    fn apply_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        let mut p = pool.clone();
        let name = p.name_any();
        for_apply(&mut p.metadata);
        p.metadata.namespace = None;
        p.status = None;
        self.0
            .block_on(
                self.pools()
                    .patch(&name, &apply_params(), &Patch::Apply(&p)),
            )
            .map(|p| pool_ref(&p))
            .map_err(|e| api_error(POOL, &name, e))
    }

    /// The volume `NAME` or `NS/NAME` of `pool`.
    fn vol(&self, pool: &str, text: &str) -> Result<StorageVol> {
        let (ns, name) = self.0.split(text);
        let full = full_name(ns, name);
        let v = self
            .0
            .block_on(self.vols(ns).get(name))
            .map_err(|e| api_error(VOL, &full, e))?;
        if v.spec.pool != pool {
            return Err(Error::not_found(VOL, full));
        }
        Ok(v)
    }

    fn all_vols(&self) -> Result<Vec<StorageVol>> {
        let ns = self.0.namespace().to_string();
        self.0
            .block_on(self.vols(&ns).list(&ListParams::default()))
            .map(|l| l.items)
            .map_err(|e| api_error(VOL, &format!("{ns}/*"), e))
    }
}

impl StorageDriver for Storage {
    fn list_pools(&self, filter: ListFilter) -> Result<Vec<PoolRef>> {
        let mut items = self
            .0
            .block_on(self.pools().list(&ListParams::default()))
            .map_err(|e| api_error(POOL, "*", e))?
            .items;
        items.retain(|p| filter.accepts(pool_active(p)));
        let mut refs: Vec<PoolRef> = items.iter().map(pool_ref).collect();
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(refs)
    }

    fn lookup_pool(&self, key: Lookup<'_>) -> Result<PoolRef> {
        match key {
            Lookup::Name(name) => self.pool(name).map(|p| pool_ref(&p)),
            _ => self
                .list_pools(ListFilter::All)?
                .into_iter()
                .find(|p| matches!(key, Lookup::Uuid(u) if p.uuid.eq_ignore_ascii_case(&u.to_string())))
                .ok_or_else(|| Error::not_found(POOL, key.describe())),
        }
    }

    fn pool_definition(&self, name: &str) -> Result<StoragePool> {
        let mut p = self.pool(name)?;
        p.metadata.managed_fields = None;
        p.status = None;
        Ok(p)
    }

    /// Sizes summed over the nodes that realize the pool.
    fn pool_info(&self, name: &str) -> Result<PoolInfo> {
        let p = self.pool(name)?;
        let nodes = p
            .status
            .as_ref()
            .map(|s| s.nodes.as_slice())
            .unwrap_or_default();
        let sum = |f: fn(
            &vireo_crds::storage_pool::PoolNodeStatus,
        )
            -> Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
            nodes.iter().map(|n| bytes(f(n))).sum::<u64>()
        };
        Ok(PoolInfo {
            name: p.name_any(),
            uuid: p.spec.uuid.clone().unwrap_or_default(),
            state: if pool_active(&p) {
                PoolState::Running
            } else {
                PoolState::Inactive
            },
            persistent: true,
            autostart: p.spec.autostart,
            capacity: sum(|n| n.capacity.as_ref()),
            allocation: sum(|n| n.allocation.as_ref()),
            available: sum(|n| n.available.as_ref()),
        })
    }

    fn define_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        self.apply_pool(pool)
    }

    /// No transient pools on a cluster: applied with `spec.active: true`.
    fn create_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        let mut p = pool.clone();
        p.spec.active = Some(true);
        self.apply_pool(&p)
    }

    fn build_pool(&self, name: &str) -> Result<()> {
        self.pool(name)?;
        Err(unsupported(
            POOL,
            name,
            "pool-build (the agents build pools on their nodes)",
        ))
    }

    fn start_pool(&self, name: &str) -> Result<()> {
        self.patch_pool(name, json!({"spec": {"active": true}}))
    }

    fn destroy_pool(&self, name: &str) -> Result<()> {
        self.patch_pool(name, json!({"spec": {"active": false}}))
    }

    fn delete_pool(&self, name: &str) -> Result<()> {
        self.pool(name)?;
        Err(unsupported(
            POOL,
            name,
            "pool-delete (a pool's storage is on its nodes)",
        ))
    }

    fn undefine_pool(&self, name: &str) -> Result<()> {
        self.0
            .block_on(self.pools().delete(name, &DeleteParams::default()))
            .map(|_| ())
            .map_err(|e| api_error(POOL, name, e))
    }

    fn refresh_pool(&self, name: &str) -> Result<()> {
        // The agents refresh their pools' status on every resync.
        self.pool(name).map(|_| ())
    }

    fn set_pool_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.patch_pool(name, json!({"spec": {"autostart": autostart}}))
    }

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolRef>> {
        self.pool(pool)?;
        let mut refs: Vec<VolRef> = self
            .all_vols()?
            .iter()
            .filter(|v| v.spec.pool == pool)
            .map(vol_ref)
            .collect();
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(refs)
    }

    fn lookup_volume(&self, pool: &str, name: &str) -> Result<VolRef> {
        self.vol(pool, name).map(|v| vol_ref(&v))
    }

    fn lookup_volume_by_key(&self, key: &str) -> Result<VolRef> {
        self.all_vols()?
            .iter()
            .map(vol_ref)
            .find(|v| v.key == key)
            .ok_or_else(|| Error::not_found(VOL, key))
    }

    fn lookup_volume_by_path(&self, path: &str) -> Result<VolRef> {
        self.all_vols()?
            .iter()
            .map(vol_ref)
            .find(|v| !v.path.is_empty() && v.path == path)
            .ok_or_else(|| Error::not_found(VOL, path))
    }

    fn volume_info(&self, pool: &str, name: &str) -> Result<VolInfo> {
        let v = self.vol(pool, name)?;
        let r = vol_ref(&v);
        let status = v.status.as_ref();
        let capacity = status
            .and_then(|s| s.capacity.as_ref())
            .unwrap_or(&v.spec.capacity);
        Ok(VolInfo {
            name: r.name,
            pool: r.pool,
            path: r.path,
            key: r.key,
            format: status.and_then(|s| s.format).unwrap_or(v.spec.format),
            capacity: bytes(Some(capacity)),
            allocation: bytes(status.and_then(|s| s.allocation.as_ref())),
            awaiting_upload: false,
            upload_progress: status.and_then(|s| s.progress),
        })
    }

    /// Applies the StorageVol in its namespace, else the connection's.
    fn create_volume(&self, volume: &StorageVol) -> Result<VolRef> {
        let mut v = volume.clone();
        let name = v.name_any();
        let ns = v
            .namespace()
            .unwrap_or_else(|| self.0.namespace().to_string());
        let full = full_name(&ns, &name);
        v.metadata.namespace = Some(ns.clone());
        for_apply(&mut v.metadata);
        v.status = None;
        self.0
            .block_on(
                self.vols(&ns)
                    .patch(&name, &apply_params(), &Patch::Apply(&v)),
            )
            .map(|v| vol_ref(&v))
            .map_err(|e| api_error(VOL, &full, e))
    }

    /// `vol-resize`: raises `spec.capacity` and waits until the volume's
    /// agent has grown it (`status.capacity`), or says why it has not.
    /// Volumes on a cluster only grow.
    fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        flags: ResizeFlags,
    ) -> Result<()> {
        let v = self.vol(pool, name)?;
        let full = vol_ref(&v).name;
        // What it holds may exceed its spec (an image larger than it).
        let current = parse_quantity(&v.spec.capacity)
            .map_err(|e| Error::invalid_argument(VOL, &full, format!("spec.capacity: {e}")))?
            .max(
                v.status
                    .as_ref()
                    .and_then(|s| s.capacity.as_ref())
                    .and_then(|c| parse_quantity(c).ok())
                    .unwrap_or(0),
            );
        let want = if flags.delta {
            current
                .checked_add(capacity)
                .ok_or_else(|| Error::invalid_argument(VOL, &full, "the new capacity overflows"))?
        } else {
            capacity
        };
        if want < current {
            return Err(Error::invalid_argument(
                VOL,
                &full,
                format!(
                    "a volume on a cluster only grows: {} is below its capacity {}",
                    format_bytes(want).0,
                    format_bytes(current).0
                ),
            ));
        }
        if flags.allocate {
            return Err(unsupported(VOL, &full, "vol-resize --allocate"));
        }
        let (ns, n) = self.0.split(name);
        let api = self.vols(ns);
        let patch = json!({"spec": {"capacity": format_bytes(want)}});
        let patched = self
            .0
            .block_on(api.patch(n, &PatchParams::default(), &Patch::Merge(&patch)))
            .map_err(|e| api_error(VOL, &full, e))?;
        let generation = patched.metadata.generation.unwrap_or(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let now = self
                .0
                .block_on(api.get(n))
                .map_err(|e| api_error(VOL, &full, e))?;
            let status = now.status.unwrap_or_default();
            let has = status
                .capacity
                .as_ref()
                .and_then(|c| parse_quantity(c).ok())
                .unwrap_or(0);
            if has >= want {
                return Ok(());
            }
            let said = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            // The agent's word on this spec (controllers' agent::volume::grow),
            // not an older one.
            let seen = status.observed_generation.unwrap_or(0) >= generation;
            let failed = seen && said.contains("growing it to") && said.contains("failed");
            if failed || std::time::Instant::now() > deadline {
                return Err(Error::OperationFailed {
                    object: vireo_drivers::error::ObjectName::new(VOL, &full),
                    message: format!(
                        "spec.capacity is {}, the volume is still {}: {}",
                        format_bytes(want).0,
                        format_bytes(has).0,
                        if said.is_empty() {
                            "no word from its node"
                        } else {
                            &said
                        }
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    fn wipe_volume(&self, pool: &str, name: &str) -> Result<()> {
        let v = self.vol(pool, name)?;
        Err(unsupported(VOL, &vol_ref(&v).name, "vol-wipe"))
    }

    fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        self.vol(pool, name)?;
        let (ns, n) = self.0.split(name);
        let full = full_name(ns, n);
        self.0
            .block_on(self.vols(ns).delete(n, &DeleteParams::default()))
            .map(|_| ())
            .map_err(|e| api_error(VOL, &full, e))
    }

    fn upload_volume(
        &self,
        pool: &str,
        name: &str,
        source: &mut dyn std::io::Read,
        length: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        self.vol(pool, name)?;
        let (ns, n) = self.0.split(name);
        super::subresources::upload(
            self.0.client(),
            self.0.runtime(),
            ns,
            n,
            source,
            length,
            progress,
        )
    }

    fn download_volume(
        &self,
        pool: &str,
        name: &str,
        sink: &mut dyn std::io::Write,
        progress: Progress<'_>,
    ) -> Result<u64> {
        self.vol(pool, name)?;
        let (ns, n) = self.0.split(name);
        super::subresources::download(self.0.client(), self.0.runtime(), ns, n, sink, progress)
    }
}
