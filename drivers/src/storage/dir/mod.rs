//! The `dir` storage backend: pools that are directories on the node and
//! volumes that are the files in them, as libvirt's dir pools are.
//!
//! * Pool definitions are JSON records under the driver's state directory
//!   (`STATE/pools/<name>.json`, written atomically under a cross-process
//!   lock), so the agent, the CLI beside it and a restarted agent agree.
//! * Volumes are not recorded anywhere: a volume is a regular file in the
//!   pool's directory, so files put there by hand appear on the next look
//!   (refresh is a rescan). Its format, size and backing file come from the
//!   file itself (a qcow2 header, or a raw file's length). Hidden files are
//!   not volumes; symbolic links are not followed.
//! * New content is built under a hidden partial name
//!   (`.NAME.vireo-partial`) and renamed into place once complete and
//!   synced, so a volume is never listed with half its data, and a crash
//!   half way leaves only a hidden file that the next attempt replaces.
//! * Pool paths may be re-rooted (`host_root`): an agent whose host
//!   filesystem is mounted elsewhere (a DaemonSet's `/host`), or several
//!   simulated nodes on one machine, each see their own directories.

mod fetch;
pub mod file;
pub mod qemu_img;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vireo_crds::quantity::{human_bytes as human, parse_quantity};
use vireo_crds::{ObjectKind, StoragePool, StorageVol, Validate, VolFormat};

use crate::records::{self, Named, RecordDir};

use super::{PoolInfo, PoolRef, PoolState, Progress, ResizeFlags, StorageDriver, VolInfo, VolRef};
use crate::{Error, ListFilter, Lookup, Result};

const POOL: ObjectKind = ObjectKind::StoragePool;
const VOL: ObjectKind = ObjectKind::StorageVol;

/// A pool as the driver keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolRecord {
    def: StoragePool,
    uuid: String,
    persistent: bool,
    autostart: bool,
    active: bool,
    /// A definition given while the pool ran, for its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<StoragePool>,
}

impl PoolRecord {
    fn name(&self) -> &str {
        self.def.metadata.name.as_deref().unwrap_or_default()
    }
    fn reference(&self) -> PoolRef {
        PoolRef {
            name: self.name().to_string(),
            uuid: self.uuid.clone(),
        }
    }
}

/// The dir storage driver of one node.
pub struct DirStorage {
    records: RecordDir,
    host_root: PathBuf,
    /// Threads of this process take turns before the cross-process lock.
    lock: Mutex<()>,
    /// Uploads running now through this driver, by volume path: bytes
    /// done and the total when known (for `volume_info`'s progress).
    uploads: Mutex<HashMap<PathBuf, (u64, Option<u64>)>>,
}

impl Named for PoolRecord {
    fn name(&self) -> &str {
        PoolRecord::name(self)
    }
}

fn io_fail(kind: ObjectKind, name: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::OperationFailed {
        object: crate::error::ObjectName::new(kind, name),
        message: format!("{what}: {e}"),
    }
}

/// A volume name is a plain file name that is not hidden.
fn check_vol_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name.contains('\0')
        || name.starts_with(file::HIDDEN)
    {
        return Err(Error::invalid_argument(
            VOL,
            name,
            "metadata.name must be a file name that does not start with '.' (at most 255 bytes, no '/')",
        ));
    }
    Ok(())
}

/// Whether `path` is a regular file (not a link, not a directory).
fn is_volume_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

fn no_space_or(kind: ObjectKind, name: &str, what: &str, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::no_space(
            kind,
            name,
            format!("{what}: no space left on the pool's filesystem"),
        )
    } else {
        io_fail(kind, name, what, e)
    }
}

impl DirStorage {
    /// Opens the driver whose pool records live under `state` (created if
    /// needed); pool paths are taken under `host_root` (`/` for this host).
    pub fn open(state: &Path, host_root: &Path) -> std::result::Result<Self, String> {
        let records = RecordDir::open(state, "pools", "pool")
            .map_err(|e| format!("cannot create {}: {e}", state.join("pools").display()))?;
        Ok(Self {
            records,
            host_root: host_root.to_path_buf(),
            lock: Mutex::new(()),
            uploads: Mutex::new(HashMap::new()),
        })
    }

    /// Where a pool path of a spec is on this node.
    pub fn resolve(&self, spec_path: &str) -> PathBuf {
        if self.host_root == Path::new("/") {
            PathBuf::from(spec_path)
        } else {
            self.host_root.join(spec_path.trim_start_matches('/'))
        }
    }

    fn pool_dir(&self, rec: &PoolRecord) -> PathBuf {
        self.resolve(&rec.def.spec.path)
    }

    /// Runs `f` holding the in-process lock and the state directory's flock.
    fn locked<T>(&self, f: impl FnOnce(&records::Locked<'_>) -> Result<T>) -> Result<T> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let l = self
            .records
            .lock()
            .map_err(|e| io_fail(POOL, "", "lock the pool records", e))?;
        f(&l)
    }

    fn records(&self) -> Result<Vec<PoolRecord>> {
        self.records
            .all()
            .map_err(|e| io_fail(POOL, "", "read the pool records", e))
    }

    fn record(&self, name: &str) -> Result<PoolRecord> {
        self.records
            .get(name)
            .map_err(|e| io_fail(POOL, name, "read its record", e))?
            .ok_or_else(|| Error::not_found(POOL, name))
    }

    fn save(l: &records::Locked<'_>, rec: &PoolRecord) -> Result<()> {
        l.put(rec)
            .map_err(|e| io_fail(POOL, rec.name(), "write its record", e))
    }

    fn forget(l: &records::Locked<'_>, name: &str) -> Result<()> {
        l.remove(name)
            .map_err(|e| io_fail(POOL, name, "remove its record", e))
    }

    /// A running pool and its directory.
    fn active(&self, pool: &str) -> Result<(PoolRecord, PathBuf)> {
        let rec = self.record(pool)?;
        if !rec.active {
            return Err(Error::invalid_state(POOL, pool, "is not active"));
        }
        let dir = self.pool_dir(&rec);
        Ok((rec, dir))
    }

    fn vol_ref(pool: &str, dir: &Path, name: &str) -> VolRef {
        let path = dir.join(name).display().to_string();
        VolRef {
            pool: pool.to_string(),
            name: name.to_string(),
            key: path.clone(),
            path,
        }
    }

    /// The volume file of a running pool, which must exist.
    fn existing(&self, pool: &str, name: &str) -> Result<(PathBuf, PathBuf)> {
        let (_, dir) = self.active(pool)?;
        let path = dir.join(name);
        if check_vol_name(name).is_err() || !is_volume_file(&path) {
            return Err(Error::not_found(VOL, name));
        }
        Ok((dir, path))
    }

    fn probe(name: &str, path: &Path) -> Result<file::Probe> {
        file::probe(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::not_found(VOL, name)
            } else {
                io_fail(VOL, name, &format!("read {}", path.display()), e)
            }
        })
    }

    fn volume_names(&self, pool: &str, dir: &Path) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| io_fail(POOL, pool, &format!("read {}", dir.display()), e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_vol_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Refuses a qcow2 image whose backing file is not a volume of the pool
    /// it is in: a guest must never read a host file through a header.
    fn check_backing(name: &str, dir: &Path, probe: &file::Probe) -> Result<()> {
        let Some(backing) = &probe.backing else {
            return Ok(());
        };
        let path = file::backing_path(dir, backing);
        let inside = path.parent() == Some(dir)
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| check_vol_name(n).is_ok())
            && is_volume_file(&path);
        if inside {
            Ok(())
        } else {
            Err(Error::invalid_argument(
                VOL,
                name,
                format!(
                    "its qcow2 backing file '{backing}' is not a volume of the same pool; refused"
                ),
            ))
        }
    }

    /// Builds the content of a new volume at `partial`.
    fn fill(
        &self,
        name: &str,
        spec: &vireo_crds::StorageVolSpec,
        dir: &Path,
        partial: &Path,
        progress: Progress<'_>,
    ) -> Result<()> {
        let capacity = parse_quantity(&spec.capacity).unwrap_or(0);
        let allocation = spec
            .allocation
            .as_ref()
            .and_then(|q| parse_quantity(q).ok())
            .unwrap_or(0)
            .min(capacity);
        let (_, _, available) =
            file::fs_sizes(dir).map_err(|e| io_fail(POOL, &spec.pool, "statvfs", e))?;
        let space = |needed: u64| -> Result<()> {
            if needed > available {
                Err(Error::no_space(
                    VOL,
                    name,
                    format!(
                        "not enough free space in storage pool '{}': needs {}, {} available",
                        spec.pool,
                        human(needed),
                        human(available)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let fail = |what: &str, e: String| io_fail(VOL, name, what, e);
        let source = spec.source.clone().unwrap_or_default();
        if let Some(clone) = &source.clone {
            let src_path = dir.join(&clone.volume);
            if check_vol_name(&clone.volume).is_err() || !is_volume_file(&src_path) {
                return Err(Error::not_found(VOL, &clone.volume));
            }
            let src = Self::probe(&clone.volume, &src_path)?;
            if capacity < src.capacity {
                return Err(Error::invalid_argument(
                    VOL,
                    name,
                    format!(
                        "spec.capacity {} is smaller than the source volume '{}' ({})",
                        human(capacity),
                        clone.volume,
                        human(src.capacity)
                    ),
                ));
            }
            if clone.overlay {
                if spec.format != VolFormat::Qcow2 {
                    return Err(Error::invalid_argument(
                        VOL,
                        name,
                        "spec.format: an overlay clone must be qcow2",
                    ));
                }
                return qemu_img::create_overlay(partial, &src_path, src.format, capacity)
                    .map_err(|e| fail("overlay", e));
            }
            let needed = src.allocation.max(allocation);
            space(needed)?;
            if src.format.is_raw_bytes() && spec.format.is_raw_bytes() {
                let out = file::create_new(partial).map_err(|e| io_fail(VOL, name, "create", e))?;
                file::copy_sparse(&src_path, &out, progress)
                    .map_err(|e| no_space_or(VOL, name, "copy", e))?;
                out.set_len(capacity)
                    .map_err(|e| no_space_or(VOL, name, "resize", e))?;
                // The copy has the source's data and allocated zeros, and
                // its holes stay holes. A preallocated source's reserved
                // space reads as holes to SEEK_DATA (unwritten extents):
                // if the copy fell short of the source's allocation by
                // more than extent metadata, the clone reserves it as
                // libvirt does, from the start; else only what the spec
                // asks.
                let got = out
                    .metadata()
                    .map_err(|e| io_fail(VOL, name, "stat", e))?
                    .blocks()
                    .saturating_mul(512);
                let reserve = if src.allocation.saturating_sub(got) > PREALLOCATED_SLACK {
                    needed
                } else {
                    allocation
                };
                file::allocate(&out, reserve.min(capacity))
                    .map_err(|e| no_space_or(VOL, name, "allocate", e))?;
                return out.sync_all().map_err(|e| io_fail(VOL, name, "sync", e));
            }
            if src.format == VolFormat::Qcow2
                && spec.format == VolFormat::Qcow2
                && src.backing.is_none()
            {
                // A qcow2 image without a backing file is self-contained:
                // its file, copied with its holes, is the same image, at
                // the speed of a raw copy (a reflink where the filesystem
                // has them) rather than qemu-img decoding and re-encoding
                // every cluster.
                let out = file::create_new(partial).map_err(|e| io_fail(VOL, name, "create", e))?;
                file::copy_sparse(&src_path, &out, progress)
                    .map_err(|e| no_space_or(VOL, name, "copy", e))?;
                drop(out);
                return self.grow_to(name, partial, spec.format, src.capacity, capacity);
            }
            progress(0, None);
            qemu_img::convert(&src_path, src.format, partial, spec.format)
                .map_err(|e| fail("copy", e))?;
            return self.grow_to(name, partial, spec.format, src.capacity, capacity);
        }
        if let Some(url) = &source.url {
            space(allocation)?;
            let out = file::create_new(partial).map_err(|e| io_fail(VOL, name, "create", e))?;
            let limit = match spec.format {
                // A raw image is the disk: it must fit the capacity.
                VolFormat::Raw | VolFormat::Iso => capacity.min(available),
                VolFormat::Qcow2 => available,
            };
            fetch::fetch(&url.url, &out, limit, progress).map_err(|e| fail("fetch", e))?;
            out.sync_all().map_err(|e| io_fail(VOL, name, "sync", e))?;
            drop(out);
            let got = Self::probe(name, partial)?;
            if got.backing.is_some() {
                return Err(Error::invalid_argument(
                    VOL,
                    name,
                    format!(
                        "spec.source.url: the image at {} has a qcow2 backing file; refused",
                        url.url
                    ),
                ));
            }
            if got.capacity > capacity {
                return Err(Error::invalid_argument(
                    VOL,
                    name,
                    format!(
                        "spec.capacity {} is smaller than the image at {} ({})",
                        human(capacity),
                        url.url,
                        human(got.capacity)
                    ),
                ));
            }
            if got.format != spec.format
                && !(got.format.is_raw_bytes() && spec.format.is_raw_bytes())
            {
                // Convert to the format the spec asks for, as an importer would.
                let converted = dir.join(format!(".{name}.vireo-convert"));
                let result = qemu_img::convert(partial, got.format, &converted, spec.format)
                    .map_err(|e| fail("convert", e))
                    .and_then(|()| {
                        std::fs::rename(&converted, partial)
                            .map_err(|e| io_fail(VOL, name, "rename", e))
                    });
                if result.is_err() {
                    let _ = std::fs::remove_file(&converted);
                }
                result?;
            }
            return self.grow_to(name, partial, spec.format, got.capacity, capacity);
        }
        // Blank (and upload, whose content comes later through vol-upload).
        space(allocation)?;
        match spec.format {
            VolFormat::Raw | VolFormat::Iso => {
                let out = file::create_new(partial).map_err(|e| io_fail(VOL, name, "create", e))?;
                out.set_len(capacity)
                    .map_err(|e| no_space_or(VOL, name, "resize", e))?;
                file::allocate(&out, allocation)
                    .map_err(|e| no_space_or(VOL, name, "allocate", e))?;
                out.sync_all().map_err(|e| io_fail(VOL, name, "sync", e))
            }
            VolFormat::Qcow2 => {
                qemu_img::create_qcow2(partial, capacity).map_err(|e| fail("create", e))
            }
        }
    }

    /// Grows a new image from `from` to `to` bytes and syncs it.
    fn grow_to(
        &self,
        name: &str,
        path: &Path,
        format: VolFormat,
        from: u64,
        to: u64,
    ) -> Result<()> {
        if to > from {
            match format {
                VolFormat::Raw | VolFormat::Iso => {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| io_fail(VOL, name, "open", e))?;
                    f.set_len(to)
                        .map_err(|e| no_space_or(VOL, name, "resize", e))?;
                }
                VolFormat::Qcow2 => qemu_img::resize_qcow2(path, to, false)
                    .map_err(|e| io_fail(VOL, name, "resize", e))?,
            }
        }
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_fail(VOL, name, "sync", e))
    }

    fn define_locked(&self, pool: &StoragePool) -> Result<(PoolRecord, bool)> {
        let name = pool
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid_argument(POOL, "", "metadata.name is required"))?;
        if name.contains('/') || name.contains('\0') {
            return Err(Error::invalid_argument(
                POOL,
                &name,
                "metadata.name must not contain '/'",
            ));
        }
        pool.spec
            .validate()
            .map_err(|e| Error::invalid_argument(POOL, &name, e.to_string()))?;
        let records = self.records()?;
        let existing = records.iter().find(|r| r.name() == name);
        let uuid = super::pool_uuid(
            pool,
            records.iter().map(|r| super::KnownPool {
                name: r.name(),
                uuid: &r.uuid,
                path: &r.def.spec.path,
            }),
        )?;
        let mut def = pool.clone();
        def.spec.uuid = Some(uuid.clone());
        def.status = None;
        def.metadata.managed_fields = None;
        def.metadata.resource_version = None;
        let rec = match existing {
            Some(r) if r.active => PoolRecord {
                next: Some(def),
                persistent: true,
                ..r.clone()
            },
            Some(r) => PoolRecord {
                autostart: r.autostart,
                def,
                persistent: true,
                ..r.clone()
            },
            None => PoolRecord {
                autostart: def.spec.autostart,
                def,
                uuid,
                persistent: true,
                active: false,
                next: None,
            },
        };
        Ok((rec, existing.is_some()))
    }
}

impl StorageDriver for DirStorage {
    fn list_pools(&self, filter: ListFilter) -> Result<Vec<PoolRef>> {
        Ok(self
            .records()?
            .iter()
            .filter(|r| filter.accepts(r.active))
            .map(PoolRecord::reference)
            .collect())
    }

    fn lookup_pool(&self, key: Lookup<'_>) -> Result<PoolRef> {
        let found = match key {
            Lookup::Name(n) => self.record(n).ok(),
            Lookup::Uuid(u) => {
                let u = u.to_string();
                self.records()?.into_iter().find(|r| r.uuid == u)
            }
            Lookup::Id(_) => None,
        };
        found
            .map(|r| r.reference())
            .ok_or_else(|| Error::not_found(POOL, key.describe()))
    }

    fn pool_definition(&self, name: &str) -> Result<StoragePool> {
        Ok(self.record(name)?.def)
    }

    fn pool_info(&self, name: &str) -> Result<PoolInfo> {
        let rec = self.record(name)?;
        let (state, (capacity, allocation, available)) = if rec.active {
            match file::fs_sizes(&self.pool_dir(&rec)) {
                Ok(sizes) if self.pool_dir(&rec).is_dir() => (PoolState::Running, sizes),
                _ => (PoolState::Inaccessible, (0, 0, 0)),
            }
        } else {
            (PoolState::Inactive, (0, 0, 0))
        };
        Ok(PoolInfo {
            name: name.to_string(),
            uuid: rec.uuid.clone(),
            state,
            persistent: rec.persistent,
            autostart: rec.autostart,
            capacity,
            allocation,
            available,
        })
    }

    fn define_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        self.locked(|l| {
            let (rec, _) = self.define_locked(pool)?;
            Self::save(l, &rec)?;
            Ok(rec.reference())
        })
    }

    fn create_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        self.locked(|l| {
            let name = pool.metadata.name.clone().unwrap_or_default();
            let before = self.record(&name).ok();
            if before.as_ref().is_some_and(|r| r.active) {
                return Err(Error::invalid_state(POOL, &name, "is already active"));
            }
            let (mut rec, _) = self.define_locked(pool)?;
            let dir = self.resolve(&pool.spec.path);
            if !dir.is_dir() {
                return Err(Error::OperationFailed {
                    object: crate::error::ObjectName::new(POOL, &name),
                    message: format!(
                        "cannot open directory '{}': it does not exist (build the pool first)",
                        dir.display()
                    ),
                });
            }
            match before {
                // An inactive persistent pool runs this definition once and
                // keeps its own for its next start.
                Some(old) => rec.next = Some(old.def),
                None => rec.persistent = false,
            }
            rec.active = true;
            Self::save(l, &rec)?;
            Ok(rec.reference())
        })
    }

    fn build_pool(&self, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        if rec.active {
            return Err(Error::invalid_state(POOL, name, "is active"));
        }
        let dir = self.pool_dir(&rec);
        std::fs::create_dir_all(&dir).map_err(|e| {
            io_fail(
                POOL,
                name,
                &format!("create directory {}", dir.display()),
                e,
            )
        })
    }

    fn start_pool(&self, name: &str) -> Result<()> {
        self.locked(|l| {
            let mut rec = self.record(name)?;
            if rec.active {
                return Err(Error::invalid_state(POOL, name, "is already active"));
            }
            let dir = self.pool_dir(&rec);
            if !dir.is_dir() {
                return Err(Error::OperationFailed {
                    object: crate::error::ObjectName::new(POOL, name),
                    message: format!(
                        "cannot open directory '{}': it does not exist (build the pool first)",
                        dir.display()
                    ),
                });
            }
            rec.active = true;
            Self::save(l, &rec)
        })
    }

    fn destroy_pool(&self, name: &str) -> Result<()> {
        self.locked(|l| {
            let mut rec = self.record(name)?;
            if !rec.active {
                return Err(Error::invalid_state(POOL, name, "is not active"));
            }
            if !rec.persistent {
                return Self::forget(l, name);
            }
            rec.active = false;
            if let Some(next) = rec.next.take() {
                rec.def = next;
            }
            Self::save(l, &rec)
        })
    }

    fn delete_pool(&self, name: &str) -> Result<()> {
        self.locked(|_| {
            let rec = self.record(name)?;
            if rec.active {
                return Err(Error::invalid_state(POOL, name, "is active"));
            }
            let dir = self.pool_dir(&rec);
            // Leftovers of interrupted fills are ours to remove.
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.filter_map(|e| e.ok()) {
                    if e.file_name().to_str().is_some_and(file::is_partial) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            match std::fs::remove_dir(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                    Err(Error::invalid_state(
                        POOL,
                        name,
                        format!(
                            "still holds files in {}; delete its volumes first",
                            dir.display()
                        ),
                    ))
                }
                Err(e) => Err(io_fail(
                    POOL,
                    name,
                    &format!("remove directory {}", dir.display()),
                    e,
                )),
            }
        })
    }

    fn undefine_pool(&self, name: &str) -> Result<()> {
        self.locked(|l| {
            if self.record(name)?.active {
                return Err(Error::invalid_state(POOL, name, "is active"));
            }
            Self::forget(l, name)
        })
    }

    fn refresh_pool(&self, name: &str) -> Result<()> {
        let (_, dir) = self.active(name)?;
        self.volume_names(name, &dir).map(|_| ())
    }

    fn set_pool_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.locked(|l| {
            let mut rec = self.record(name)?;
            if !rec.persistent {
                return Err(Error::invalid_state(
                    POOL,
                    name,
                    "is transient: autostart needs a persistent pool",
                ));
            }
            rec.autostart = autostart;
            Self::save(l, &rec)
        })
    }

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolRef>> {
        let (_, dir) = self.active(pool)?;
        Ok(self
            .volume_names(pool, &dir)?
            .iter()
            .map(|n| Self::vol_ref(pool, &dir, n))
            .collect())
    }

    fn lookup_volume(&self, pool: &str, name: &str) -> Result<VolRef> {
        let (dir, _) = self.existing(pool, name)?;
        Ok(Self::vol_ref(pool, &dir, name))
    }

    fn lookup_volume_by_key(&self, key: &str) -> Result<VolRef> {
        self.lookup_volume_by_path(key)
    }

    fn lookup_volume_by_path(&self, path: &str) -> Result<VolRef> {
        let wanted = Path::new(path);
        for rec in self.records()?.iter().filter(|r| r.active) {
            let dir = self.pool_dir(rec);
            if wanted.parent() != Some(dir.as_path()) {
                continue;
            }
            if let Some(name) = wanted.file_name().and_then(|n| n.to_str())
                && check_vol_name(name).is_ok()
                && is_volume_file(wanted)
            {
                return Ok(Self::vol_ref(rec.name(), &dir, name));
            }
        }
        Err(Error::not_found(VOL, path))
    }

    fn volume_info(&self, pool: &str, name: &str) -> Result<VolInfo> {
        let (dir, path) = self.existing(pool, name)?;
        let p = Self::probe(name, &path)?;
        let r = Self::vol_ref(pool, &dir, name);
        let upload_progress = self
            .uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&path)
            .map(|&(done, total)| match total {
                Some(t) if t > 0 => (done.min(t).saturating_mul(100) / t) as u8,
                _ => 0,
            });
        Ok(VolInfo {
            name: name.to_string(),
            pool: pool.to_string(),
            path: r.path,
            key: r.key,
            format: p.format,
            capacity: p.capacity,
            allocation: p.allocation,
            awaiting_upload: file::upload_marker_path(&dir, name).exists(),
            upload_progress,
        })
    }

    fn create_volume(&self, volume: &StorageVol) -> Result<VolRef> {
        self.create_volume_with_progress(volume, &super::no_progress)
    }

    fn create_volume_with_progress(
        &self,
        volume: &StorageVol,
        progress: Progress<'_>,
    ) -> Result<VolRef> {
        let name = volume.metadata.name.clone().unwrap_or_default();
        check_vol_name(&name)?;
        let spec = &volume.spec;
        spec.validate()
            .map_err(|e| Error::invalid_argument(VOL, &name, e.to_string()))?;
        let (_, dir) = self.active(&spec.pool)?;
        let path = dir.join(&name);
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(Error::already_exists(
                VOL,
                &name,
                format!(" in storage pool '{}'", spec.pool),
            ));
        }
        let partial = file::partial_path(&dir, &name);
        let _ = std::fs::remove_file(&partial);
        // A volume for an upload is marked before its placeholder appears.
        let marker = file::upload_marker_path(&dir, &name);
        let for_upload = spec.source.as_ref().is_some_and(|s| s.upload.is_some());
        if for_upload {
            std::fs::write(&marker, b"").map_err(|e| io_fail(VOL, &name, "mark", e))?;
        }
        let built = self
            .fill(&name, spec, &dir, &partial, progress)
            .and_then(|()| {
                file::rename_noreplace(&partial, &path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Error::already_exists(
                            VOL,
                            &name,
                            format!(" in storage pool '{}'", spec.pool),
                        )
                    } else {
                        io_fail(VOL, &name, "rename into place", e)
                    }
                })
            });
        if let Err(e) = built {
            let _ = std::fs::remove_file(&partial);
            if for_upload && std::fs::symlink_metadata(&path).is_err() {
                let _ = std::fs::remove_file(&marker);
            }
            return Err(e);
        }
        let _ = file::sync_dir(&dir);
        tracing::info!(pool = %spec.pool, volume = %name, path = %path.display(), "volume created");
        Ok(Self::vol_ref(&spec.pool, &dir, &name))
    }

    fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        flags: ResizeFlags,
    ) -> Result<()> {
        let (dir, path) = self.existing(pool, name)?;
        let p = Self::probe(name, &path)?;
        let (_, _, available) =
            file::fs_sizes(&dir).map_err(|e| io_fail(POOL, pool, "statvfs", e))?;
        // Raw files cannot shrink below what they hold on disk; qcow2 images
        // are shrunk by qemu-img, which checks its own data.
        let new = super::resize_target(
            name,
            pool,
            (p.capacity, p.allocation),
            available,
            capacity,
            flags,
            p.format.is_raw_bytes(),
        )?;
        match p.format {
            VolFormat::Raw | VolFormat::Iso => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_fail(VOL, name, "open", e))?;
                f.set_len(new)
                    .map_err(|e| no_space_or(VOL, name, "resize", e))?;
                if flags.allocate {
                    file::allocate(&f, new).map_err(|e| no_space_or(VOL, name, "allocate", e))?;
                }
                f.sync_all().map_err(|e| io_fail(VOL, name, "sync", e))
            }
            VolFormat::Qcow2 => qemu_img::resize_qcow2(&path, new, new < p.capacity)
                .map_err(|e| io_fail(VOL, name, "resize", e)),
        }
    }

    fn wipe_volume(&self, pool: &str, name: &str) -> Result<()> {
        let (dir, path) = self.existing(pool, name)?;
        let p = Self::probe(name, &path)?;
        match p.format {
            VolFormat::Raw | VolFormat::Iso => {
                file::zero_data(&path).map_err(|e| io_fail(VOL, name, "wipe", e))
            }
            VolFormat::Qcow2 => {
                // An empty image of the same size (and the same backing file).
                let partial = file::partial_path(&dir, name);
                let made = match &p.backing {
                    Some(b) => {
                        Self::check_backing(name, &dir, &p)?;
                        let backing = file::backing_path(&dir, b);
                        let fmt = Self::probe(name, &backing)?.format;
                        qemu_img::create_overlay(&partial, &backing, fmt, p.capacity)
                    }
                    None => qemu_img::create_qcow2(&partial, p.capacity),
                }
                .map_err(|e| io_fail(VOL, name, "wipe", e))
                .and_then(|()| {
                    std::fs::rename(&partial, &path).map_err(|e| io_fail(VOL, name, "wipe", e))
                });
                if made.is_err() {
                    let _ = std::fs::remove_file(&partial);
                }
                made
            }
        }
    }

    fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        let (dir, path) = self.existing(pool, name)?;
        // An overlay's backing volume stays while the overlay needs it.
        for other in self.volume_names(pool, &dir)? {
            if other == name {
                continue;
            }
            if let Ok(p) = file::probe(&dir.join(&other))
                && let Some(b) = &p.backing
                && file::backing_path(&dir, b) == path
            {
                return Err(Error::invalid_state(
                    VOL,
                    name,
                    format!("is the backing file of volume '{other}'; delete that first"),
                ));
            }
        }
        std::fs::remove_file(&path).map_err(|e| io_fail(VOL, name, "delete", e))?;
        let _ = std::fs::remove_file(file::partial_path(&dir, name));
        let _ = std::fs::remove_file(file::upload_marker_path(&dir, name));
        let _ = file::sync_dir(&dir);
        tracing::info!(pool, volume = name, "volume deleted");
        Ok(())
    }

    fn upload_volume(
        &self,
        pool: &str,
        name: &str,
        source: &mut dyn Read,
        length: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        self.replace_content(pool, name, length, progress, &mut |out, progress| {
            file::copy_stream(source, out, length, progress)
        })
    }

    fn upload_volume_from_file(
        &self,
        pool: &str,
        name: &str,
        source: &File,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let length = source
            .metadata()
            .map_err(|e| io_fail(VOL, name, "upload", e))?
            .len();
        // The file's holes are skipped, not read (or a reflink).
        self.replace_content(pool, name, Some(length), progress, &mut |out, progress| {
            file::copy_file(source, out, progress)
        })
    }

    fn download_volume(
        &self,
        pool: &str,
        name: &str,
        sink: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let (_, path) = self.existing(pool, name)?;
        file::copy_out(&path, sink, progress).map_err(|e| io_fail(VOL, name, "download", e))
    }

    fn download_volume_to_file(
        &self,
        pool: &str,
        name: &str,
        sink: &File,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let (_, path) = self.existing(pool, name)?;
        let empty = sink
            .metadata()
            .map_err(|e| io_fail(VOL, name, "download", e))?
            .len()
            == 0;
        if !empty {
            // The sparse copy writes only the data; what a file held
            // before would show through its holes.
            sink.set_len(0)
                .map_err(|e| io_fail(VOL, name, "download", e))?;
        }
        // The volume's holes stay holes in the file (or a reflink).
        file::copy_sparse(&path, sink, progress).map_err(|e| no_space_or(VOL, name, "download", e))
    }
}

impl DirStorage {
    /// Replaces a volume's content with what `fill` writes into a new file
    /// (upload): built under the partial name, synced, then renamed over
    /// the volume; on error the volume keeps its old content and the
    /// partial file is removed.
    fn replace_content(
        &self,
        pool: &str,
        name: &str,
        length: Option<u64>,
        progress: Progress<'_>,
        fill: &mut dyn FnMut(&File, Progress<'_>) -> io::Result<u64>,
    ) -> Result<u64> {
        let (dir, path) = self.existing(pool, name)?;
        let old = Self::probe(name, &path)?;
        let partial = file::partial_path(&dir, name);
        // Seen by volume_info while it runs; gone when this returns.
        let running = Running::new(&self.uploads, &path, length);
        let progress = |done: u64, total: Option<u64>| {
            running.set(done);
            progress(done, total);
        };
        let result = (|| -> Result<u64> {
            let out = file::create_new(&partial).map_err(|e| io_fail(VOL, name, "create", e))?;
            let n = fill(&out, &progress).map_err(|e| no_space_or(VOL, name, "upload", e))?;
            if let Some(want) = length
                && n != want
            {
                return Err(io_fail(
                    VOL,
                    name,
                    "upload",
                    format!("the stream ended after {n} of {want} bytes"),
                ));
            }
            let new = Self::probe(name, &partial)?;
            Self::check_backing(name, &dir, &new)?;
            if new.format.is_raw_bytes() && old.format.is_raw_bytes() && n < old.capacity {
                // A shorter raw image keeps the volume's size.
                out.set_len(old.capacity)
                    .map_err(|e| no_space_or(VOL, name, "resize", e))?;
            }
            out.sync_all().map_err(|e| io_fail(VOL, name, "sync", e))?;
            std::fs::rename(&partial, &path).map_err(|e| io_fail(VOL, name, "rename", e))?;
            // The content is in place: the volume no longer waits for it.
            match std::fs::remove_file(file::upload_marker_path(&dir, name)) {
                Ok(()) => {
                    tracing::info!(pool, volume = name, bytes = n, "uploaded content arrived")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_fail(VOL, name, "unmark", e)),
            }
            Ok(n)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        let _ = file::sync_dir(&dir);
        result
    }
}

/// How much less than its source a sparse copy may occupy (extent tree
/// blocks the copy needs fewer of) before the source counts as having
/// preallocated space the copy did not get.
const PREALLOCATED_SLACK: u64 = 256 << 10;

/// An upload in [`DirStorage`]'s table of running uploads while alive.
struct Running<'a> {
    table: &'a Mutex<HashMap<PathBuf, (u64, Option<u64>)>>,
    path: PathBuf,
}

impl<'a> Running<'a> {
    fn new(
        table: &'a Mutex<HashMap<PathBuf, (u64, Option<u64>)>>,
        path: &Path,
        total: Option<u64>,
    ) -> Self {
        table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), (0, total));
        Self {
            table,
            path: path.to_path_buf(),
        }
    }

    fn set(&self, done: u64) {
        if let Some(entry) = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.path)
        {
            entry.0 = done;
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.path);
    }
}

/// Whether qcow2 volumes can be made on this machine (qemu-img present).
pub fn qcow2_supported() -> bool {
    qemu_img::available()
}
