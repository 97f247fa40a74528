//! Pools and volumes on the test driver: sizes are bookkeeping, no file is written.

use std::collections::BTreeMap;

use vireo_crds::quantity::{human_bytes as human, parse_quantity, parse_str};
use vireo_crds::{ObjectKind, StoragePool, StorageVol, Validate, VolFormat};

use super::{Kind, PoolObj, State, TestDriver, VolObj, object_name};
use crate::storage::{PoolInfo, PoolRef, PoolState, ResizeFlags, StorageDriver, VolInfo, VolRef};
use crate::{Error, ListFilter, Lookup, Result};

const POOL: ObjectKind = ObjectKind::StoragePool;
const VOL: ObjectKind = ObjectKind::StorageVol;

/// Annotation that sets a test pool's size.
pub const CAPACITY_ANNOTATION: &str = "test.vireo.dev/capacity";
const DEFAULT_CAPACITY: u64 = 100 << 30;

impl PoolObj {
    fn name(&self) -> &str {
        self.def.metadata.name.as_deref().unwrap_or_default()
    }
    fn reference(&self) -> PoolRef {
        PoolRef {
            name: self.name().to_string(),
            uuid: self.uuid.clone(),
        }
    }
    fn vol_ref(&self, name: &str) -> VolRef {
        let path = self.vol_path(name);
        VolRef {
            pool: self.name().to_string(),
            name: name.to_string(),
            key: path.clone(),
            path,
        }
    }
}

impl State {
    fn pool(&self, name: &str) -> Result<&PoolObj> {
        self.pools
            .get(name)
            .ok_or_else(|| Error::not_found(POOL, name))
    }

    fn pool_mut(&mut self, name: &str) -> Result<&mut PoolObj> {
        self.pools
            .get_mut(name)
            .ok_or_else(|| Error::not_found(POOL, name))
    }

    fn active_pool_mut(&mut self, name: &str) -> Result<&mut PoolObj> {
        let pool = self.pool_mut(name)?;
        if !pool.active {
            return Err(Error::invalid_state(POOL, name, "is not active"));
        }
        Ok(pool)
    }

    fn active_pool(&self, name: &str) -> Result<&PoolObj> {
        let pool = self.pool(name)?;
        if !pool.active {
            return Err(Error::invalid_state(POOL, name, "is not active"));
        }
        Ok(pool)
    }

    pub(super) fn define_pool(&mut self, pool: &StoragePool) -> Result<PoolRef> {
        let name = pool
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid_argument(POOL, "", "metadata.name is required"))?;
        pool.spec
            .validate()
            .map_err(|e| Error::invalid_argument(POOL, &name, e.to_string()))?;
        let capacity = match pool
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CAPACITY_ANNOTATION))
        {
            Some(text) => parse_str(text).map_err(|e| {
                Error::invalid_argument(
                    POOL,
                    &name,
                    format!("annotation {CAPACITY_ANNOTATION}: {e}"),
                )
            })?,
            None => DEFAULT_CAPACITY,
        };
        let uuid = crate::storage::pool_uuid(
            pool,
            self.pools.values().map(|o| crate::storage::KnownPool {
                name: o.name(),
                uuid: &o.uuid,
                path: &o.def.spec.path,
            }),
        )?;
        let mut def = pool.clone();
        def.spec.uuid = Some(uuid.clone());
        def.status = None;
        if let Some(obj) = self.pools.get_mut(&name) {
            // While the pool runs, the new definition waits for its next start.
            if obj.active {
                obj.new_def = Some((def, capacity));
            } else {
                obj.def = def;
                obj.capacity = capacity;
            }
            obj.persistent = true;
            return Ok(obj.reference());
        }
        let obj = PoolObj {
            autostart: def.spec.autostart,
            def,
            new_def: None,
            uuid,
            persistent: true,
            active: false,
            capacity,
            volumes: BTreeMap::new(),
        };
        let r = obj.reference();
        self.pools.insert(name, obj);
        Ok(r)
    }

    pub(super) fn start_pool(&mut self, name: &str) -> Result<()> {
        let pool = self.pool_mut(name)?;
        if pool.active {
            return Err(Error::invalid_state(POOL, name, "is already active"));
        }
        pool.active = true;
        Ok(())
    }

    pub(super) fn create_volume(&mut self, volume: &StorageVol) -> Result<VolRef> {
        let name = volume
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid_argument(VOL, "", "metadata.name is required"))?;
        if name.contains('/') || name == "." || name == ".." {
            return Err(Error::invalid_argument(
                VOL,
                &name,
                "metadata.name must be a file name",
            ));
        }
        let spec = &volume.spec;
        spec.validate()
            .map_err(|e| Error::invalid_argument(VOL, &name, e.to_string()))?;
        let pool = self.active_pool_mut(&spec.pool)?;
        if pool.volumes.contains_key(&name) {
            return Err(Error::already_exists(
                VOL,
                &name,
                format!(" in storage pool '{}'", spec.pool),
            ));
        }
        let capacity = parse_quantity(&spec.capacity).unwrap_or(0);
        let mut allocation = match &spec.allocation {
            Some(q) => parse_quantity(q).unwrap_or(0),
            None => capacity,
        };
        if let Some(src) = &spec.source {
            if src.url.is_some() || src.upload.is_some() {
                return Err(Error::Unsupported {
                    object: crate::error::ObjectName::new(VOL, &name),
                    driver: "test",
                    operation: "volume content from a URL or an upload (it needs a real storage pool)",
                });
            }
            if let Some(clone) = &src.clone {
                let from = pool
                    .volumes
                    .get(&clone.volume)
                    .ok_or_else(|| Error::not_found(VOL, &clone.volume))?;
                if capacity < from.capacity {
                    return Err(Error::invalid_argument(
                        VOL,
                        &name,
                        format!(
                            "spec.capacity {} is smaller than the source volume '{}' ({})",
                            human(capacity),
                            clone.volume,
                            human(from.capacity)
                        ),
                    ));
                }
                if clone.overlay {
                    if spec.format != VolFormat::Qcow2 {
                        return Err(Error::invalid_argument(
                            VOL,
                            &name,
                            "spec.format: an overlay clone must be qcow2",
                        ));
                    }
                    allocation = 0;
                } else if spec.allocation.is_none() {
                    allocation = from.allocation.max(allocation.min(capacity));
                }
            }
        }
        let available = pool.available();
        if allocation > available {
            return Err(Error::no_space(
                VOL,
                &name,
                format!(
                    "not enough free space in storage pool '{}': needs {}, {} available",
                    spec.pool,
                    human(allocation),
                    human(available)
                ),
            ));
        }
        pool.volumes.insert(
            name.clone(),
            VolObj {
                format: spec.format,
                capacity,
                allocation,
            },
        );
        Ok(pool.vol_ref(&name))
    }
}

impl StorageDriver for TestDriver {
    fn list_pools(&self, filter: ListFilter) -> Result<Vec<PoolRef>> {
        Ok(self
            .lock()
            .pools
            .values()
            .filter(|p| filter.accepts(p.active))
            .map(PoolObj::reference)
            .collect())
    }

    fn lookup_pool(&self, key: Lookup<'_>) -> Result<PoolRef> {
        let st = self.lock();
        let found = match key {
            Lookup::Name(n) => st.pools.get(n),
            Lookup::Uuid(u) => {
                let u = u.to_string();
                st.pools.values().find(|p| p.uuid == u)
            }
            Lookup::Id(_) => None,
        };
        found
            .map(PoolObj::reference)
            .ok_or_else(|| Error::not_found(POOL, key.describe()))
    }

    fn pool_definition(&self, name: &str) -> Result<StoragePool> {
        Ok(self.lock().pool(name)?.def.clone())
    }

    fn pool_info(&self, name: &str) -> Result<PoolInfo> {
        let st = self.lock();
        let p = st.pool(name)?;
        let (capacity, allocation, available) = if p.active {
            (p.capacity, p.allocation(), p.available())
        } else {
            (0, 0, 0)
        };
        Ok(PoolInfo {
            name: name.to_string(),
            uuid: p.uuid.clone(),
            state: if p.active {
                PoolState::Running
            } else {
                PoolState::Inactive
            },
            persistent: p.persistent,
            autostart: p.autostart,
            capacity,
            allocation,
            available,
        })
    }

    fn define_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        self.change(Kind::Pool, &object_name(&pool.metadata), |st| {
            st.define_pool(pool)
        })
    }

    fn create_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        self.change(Kind::Pool, &object_name(&pool.metadata), |st| {
            let name = pool.metadata.name.clone().unwrap_or_default();
            match st.pools.get(&name) {
                Some(p) if p.active => {
                    return Err(Error::invalid_state(POOL, &name, "is already active"));
                }
                // An inactive persistent pool runs this definition once and keeps
                // its persistent one for its next start.
                Some(p) => {
                    let kept = (p.def.clone(), p.capacity);
                    st.define_pool(pool)?;
                    if let Some(p) = st.pools.get_mut(&name) {
                        p.new_def = Some(kept);
                    }
                }
                None => {
                    st.define_pool(pool)?;
                    if let Some(p) = st.pools.get_mut(&name) {
                        p.persistent = false;
                    }
                }
            }
            st.start_pool(&name)?;
            Ok(st.pool(&name)?.reference())
        })
    }

    fn build_pool(&self, name: &str) -> Result<()> {
        let st = self.lock();
        if st.pool(name)?.active {
            return Err(Error::invalid_state(POOL, name, "is active"));
        }
        Ok(())
    }

    fn start_pool(&self, name: &str) -> Result<()> {
        self.change(Kind::Pool, name, |st| st.start_pool(name))
    }

    fn destroy_pool(&self, name: &str) -> Result<()> {
        self.change(Kind::Pool, name, |st| {
            let pool = st.pool_mut(name)?;
            if !pool.active {
                return Err(Error::invalid_state(POOL, name, "is not active"));
            }
            pool.active = false;
            if let Some((def, capacity)) = pool.new_def.take() {
                pool.def = def;
                pool.capacity = capacity;
            }
            if !pool.persistent {
                st.pools.remove(name);
            }
            Ok(())
        })
    }

    fn delete_pool(&self, name: &str) -> Result<()> {
        let mut st = self.lock();
        let pool = st.pool_mut(name)?;
        if pool.active {
            return Err(Error::invalid_state(POOL, name, "is active"));
        }
        if !pool.volumes.is_empty() {
            return Err(Error::invalid_state(
                POOL,
                name,
                format!(
                    "still holds {} volume(s); delete them first (a dir pool's directory must be empty)",
                    pool.volumes.len()
                ),
            ));
        }
        Ok(())
    }

    fn undefine_pool(&self, name: &str) -> Result<()> {
        self.change(Kind::Pool, name, |st| {
            if st.pool(name)?.active {
                return Err(Error::invalid_state(POOL, name, "is active"));
            }
            st.pools.remove(name);
            Ok(())
        })
    }

    fn refresh_pool(&self, name: &str) -> Result<()> {
        self.lock().active_pool(name).map(|_| ())
    }

    fn set_pool_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.change(Kind::Pool, name, |st| {
            let pool = st.pool_mut(name)?;
            if !pool.persistent {
                return Err(Error::invalid_state(
                    POOL,
                    name,
                    "is transient: autostart needs a persistent pool",
                ));
            }
            pool.autostart = autostart;
            Ok(())
        })
    }

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolRef>> {
        let st = self.lock();
        let p = st.active_pool(pool)?;
        Ok(p.volumes.keys().map(|v| p.vol_ref(v)).collect())
    }

    fn lookup_volume(&self, pool: &str, name: &str) -> Result<VolRef> {
        let st = self.lock();
        let p = st.active_pool(pool)?;
        if !p.volumes.contains_key(name) {
            return Err(Error::not_found(VOL, name));
        }
        Ok(p.vol_ref(name))
    }

    fn lookup_volume_by_key(&self, key: &str) -> Result<VolRef> {
        self.lookup_volume_by_path(key)
    }

    fn lookup_volume_by_path(&self, path: &str) -> Result<VolRef> {
        let st = self.lock();
        st.pools
            .values()
            .filter(|p| p.active)
            .find_map(|p| {
                p.volumes
                    .keys()
                    .find(|v| p.vol_path(v) == path)
                    .map(|v| p.vol_ref(v))
            })
            .ok_or_else(|| Error::not_found(VOL, path))
    }

    fn volume_info(&self, pool: &str, name: &str) -> Result<VolInfo> {
        let st = self.lock();
        let p = st.active_pool(pool)?;
        let v = p
            .volumes
            .get(name)
            .ok_or_else(|| Error::not_found(VOL, name))?;
        let path = p.vol_path(name);
        Ok(VolInfo {
            name: name.to_string(),
            pool: pool.to_string(),
            key: path.clone(),
            path,
            format: v.format,
            capacity: v.capacity,
            allocation: v.allocation,
            awaiting_upload: false,
            upload_progress: None,
        })
    }

    fn create_volume(&self, volume: &StorageVol) -> Result<VolRef> {
        self.change(Kind::Pool, &volume.spec.pool, |st| st.create_volume(volume))
    }

    fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        flags: ResizeFlags,
    ) -> Result<()> {
        self.change(Kind::Pool, pool, |st| {
            let p = st.active_pool_mut(pool)?;
            let available = p.available();
            let v = p
                .volumes
                .get_mut(name)
                .ok_or_else(|| Error::not_found(VOL, name))?;
            let new = crate::storage::resize_target(
                name,
                pool,
                (v.capacity, v.allocation),
                available,
                capacity,
                flags,
                true,
            )?;
            let fully_allocated = v.allocation == v.capacity;
            v.capacity = new;
            if flags.allocate || fully_allocated {
                v.allocation = new;
            }
            Ok(())
        })
    }

    fn wipe_volume(&self, pool: &str, name: &str) -> Result<()> {
        let st = self.lock();
        let p = st.active_pool(pool)?;
        p.volumes
            .get(name)
            .ok_or_else(|| Error::not_found(VOL, name))?;
        Ok(())
    }

    fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        self.change(Kind::Pool, pool, |st| {
            let p = st.active_pool_mut(pool)?;
            p.volumes
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| Error::not_found(VOL, name))
        })
    }
}
