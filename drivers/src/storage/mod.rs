//! The storage driver: pools and volumes (libvirt's `virStoragePool*` and
//! `virStorageVol*` calls), and [`dir`], the backend for real files on the
//! node.

pub mod dir;

use std::fmt;
use std::io::{Read, Write};

use vireo_crds::{StoragePool, StorageVol, VolFormat};

use crate::{ListFilter, Lookup, Result};

/// The identity of a pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolRef {
    pub name: String,
    pub uuid: String,
}

/// libvirt's `virStoragePoolState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PoolState {
    Inactive,
    Building,
    Running,
    Degraded,
    Inaccessible,
}

impl fmt::Display for PoolState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inactive => "inactive",
            Self::Building => "building",
            Self::Running => "running",
            Self::Degraded => "degraded",
            Self::Inaccessible => "inaccessible",
        })
    }
}

/// `pool-info`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub uuid: String,
    pub state: PoolState,
    pub persistent: bool,
    pub autostart: bool,
    pub capacity: u64,
    pub allocation: u64,
    pub available: u64,
}

/// The identity of a volume: its pool and name, its key (unique on the
/// node) and its path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolRef {
    pub pool: String,
    pub name: String,
    pub key: String,
    pub path: String,
}

/// `vol-info`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolInfo {
    pub name: String,
    pub pool: String,
    pub path: String,
    pub key: String,
    pub format: VolFormat,
    pub capacity: u64,
    pub allocation: u64,
    /// Made for an upload (`source.upload`) that has not completed yet: the
    /// file is a blank placeholder, not the content (`vol-upload` fills it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_upload: bool,
    /// Percent done of an upload into the volume running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_progress: Option<u8>,
}

/// `vol-resize` flags (libvirt's `VIR_STORAGE_VOL_RESIZE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ResizeFlags {
    /// Allocate the new space now.
    pub allocate: bool,
    /// The size is added to the current capacity.
    pub delta: bool,
    /// Allow the capacity to go down.
    pub shrink: bool,
}

/// A pool known to a driver, as [`pool_uuid`] compares it: name, UUID, path.
pub struct KnownPool<'a> {
    pub name: &'a str,
    pub uuid: &'a str,
    pub path: &'a str,
}

/// libvirt's identity rules for (re)defining the pool `pool`: a UUID it
/// gives must be the one its name already has; no other pool may have its
/// UUID or its path. Returns the UUID to keep (the given one, the existing
/// one, or a new one).
pub fn pool_uuid<'a>(
    pool: &StoragePool,
    known: impl IntoIterator<Item = KnownPool<'a>>,
) -> Result<String> {
    use vireo_crds::ObjectKind::StoragePool as POOL;
    let name = pool.metadata.name.as_deref().unwrap_or_default();
    let known: Vec<KnownPool<'a>> = known.into_iter().collect();
    let existing = known.iter().find(|k| k.name == name);
    let uuid = match (&pool.spec.uuid, existing) {
        (Some(u), Some(k)) if !u.eq_ignore_ascii_case(k.uuid) => {
            return Err(crate::Error::already_exists(
                POOL,
                name,
                format!(" with uuid {}", k.uuid),
            ));
        }
        (Some(u), _) => u.to_ascii_lowercase(),
        (None, Some(k)) => k.uuid.to_string(),
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    if let Some(other) = known
        .iter()
        .find(|k| k.name != name && (k.uuid == uuid || k.path == pool.spec.path))
    {
        return Err(crate::Error::already_exists(
            POOL,
            other.name,
            format!(
                " with uuid {} and path {}; '{name}' cannot take either",
                other.uuid, other.path
            ),
        ));
    }
    Ok(uuid)
}

/// The capacity a resize asks for, checked with libvirt's storage rules: a
/// delta adds to the current capacity; never zero; no shrink without the
/// flag; not below the allocation (where `allocation_floor`); never past
/// the allocation plus the pool's free space (`NoSpace`).
pub fn resize_target(
    name: &str,
    pool: &str,
    current: (u64, u64),
    available: u64,
    requested: u64,
    flags: ResizeFlags,
    allocation_floor: bool,
) -> Result<u64> {
    use vireo_crds::ObjectKind::StorageVol as VOL;
    use vireo_crds::quantity::human_bytes as human;
    let (capacity, allocation) = current;
    let new = if flags.delta {
        capacity.checked_add(requested).ok_or_else(|| {
            crate::Error::invalid_argument(VOL, name, "the new capacity is too large")
        })?
    } else {
        requested
    };
    if new == 0 {
        return Err(crate::Error::invalid_argument(
            VOL,
            name,
            "capacity must be greater than zero",
        ));
    }
    if new < capacity && !flags.shrink {
        return Err(crate::Error::invalid_argument(
            VOL,
            name,
            format!(
                "cannot shrink from {} to {} without the shrink flag",
                human(capacity),
                human(new)
            ),
        ));
    }
    if allocation_floor && new < allocation {
        return Err(crate::Error::invalid_argument(
            VOL,
            name,
            format!(
                "cannot shrink below the allocation of {}",
                human(allocation)
            ),
        ));
    }
    if new > allocation.saturating_add(available) {
        return Err(crate::Error::no_space(
            VOL,
            name,
            format!(
                "not enough space left in storage pool '{pool}' to grow to {} ({} available)",
                human(new),
                human(available)
            ),
        ));
    }
    Ok(new)
}

/// Progress of a long copy: bytes done, and the total when it is known.
/// Called from the thread doing the copy, at most a few times a second.
pub type Progress<'a> = &'a (dyn Fn(u64, Option<u64>) + Sync);

/// A progress callback that ignores everything.
pub fn no_progress(_done: u64, _total: Option<u64>) {}

/// A storage driver. Pools follow libvirt's rules: built and deleted only
/// while inactive, undefined only while inactive; volumes need an active pool.
pub trait StorageDriver: Send + Sync {
    fn list_pools(&self, filter: ListFilter) -> Result<Vec<PoolRef>>;
    fn count_pools(&self, filter: ListFilter) -> Result<usize> {
        Ok(self.list_pools(filter)?.len())
    }
    fn lookup_pool(&self, key: Lookup<'_>) -> Result<PoolRef>;
    fn pool_definition(&self, name: &str) -> Result<StoragePool>;
    fn pool_info(&self, name: &str) -> Result<PoolInfo>;
    /// Defines (or redefines) a persistent, inactive pool.
    fn define_pool(&self, pool: &StoragePool) -> Result<PoolRef>;
    /// Creates and starts a transient pool.
    fn create_pool(&self, pool: &StoragePool) -> Result<PoolRef>;
    /// Makes the pool's storage (for `dir`, the directory). Inactive pools only.
    fn build_pool(&self, name: &str) -> Result<()>;
    fn start_pool(&self, name: &str) -> Result<()>;
    /// Deactivates the pool; its volumes stay, unlisted until it starts again.
    fn destroy_pool(&self, name: &str) -> Result<()>;
    /// Removes the pool's storage. Inactive pools only.
    fn delete_pool(&self, name: &str) -> Result<()>;
    /// Removes the definition. Inactive pools only.
    fn undefine_pool(&self, name: &str) -> Result<()>;
    /// Rescans the pool's volumes and sizes.
    fn refresh_pool(&self, name: &str) -> Result<()>;
    fn set_pool_autostart(&self, name: &str, autostart: bool) -> Result<()>;

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolRef>>;
    fn count_volumes(&self, pool: &str) -> Result<usize> {
        Ok(self.list_volumes(pool)?.len())
    }
    fn lookup_volume(&self, pool: &str, name: &str) -> Result<VolRef>;
    fn lookup_volume_by_key(&self, key: &str) -> Result<VolRef>;
    fn lookup_volume_by_path(&self, path: &str) -> Result<VolRef>;
    fn volume_info(&self, pool: &str, name: &str) -> Result<VolInfo>;
    /// Creates a volume in `spec.pool` from its source (blank or a clone).
    fn create_volume(&self, volume: &StorageVol) -> Result<VolRef>;
    /// Changes the capacity; refused past the pool's free space.
    fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        flags: ResizeFlags,
    ) -> Result<()>;
    /// Overwrites the content with zeros.
    fn wipe_volume(&self, pool: &str, name: &str) -> Result<()>;
    fn delete_volume(&self, pool: &str, name: &str) -> Result<()>;

    /// Like [`create_volume`](Self::create_volume), reporting the progress
    /// of a long fill (a clone, a URL). The volume is listed only once its
    /// content is complete.
    fn create_volume_with_progress(
        &self,
        volume: &StorageVol,
        progress: Progress<'_>,
    ) -> Result<VolRef> {
        let _ = progress;
        self.create_volume(volume)
    }

    /// Replaces the volume's content with the bytes of `source`
    /// (libvirt's `virStorageVolUpload`): the volume grows to hold them,
    /// and keeps its old content if the upload fails.
    fn upload_volume(
        &self,
        pool: &str,
        name: &str,
        source: &mut dyn Read,
        length: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let _ = (pool, source, length, progress);
        Err(crate::Error::Unsupported {
            object: crate::error::ObjectName::new(vireo_crds::ObjectKind::StorageVol, name),
            driver: "test",
            operation: "vol-upload (it needs a real storage pool)",
        })
    }

    /// [`upload_volume`](Self::upload_volume) from a file on this
    /// machine: a backend that can reads only the file's data regions
    /// (its holes stay holes) or makes a reflink. By default, the file as
    /// a stream.
    fn upload_volume_from_file(
        &self,
        pool: &str,
        name: &str,
        source: &std::fs::File,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let length = source.metadata().ok().map(|m| m.len());
        self.upload_volume(pool, name, &mut &*source, length, progress)
    }

    /// [`download_volume`](Self::download_volume) into a file on this
    /// machine (empty, or emptied first): a backend that can writes only
    /// the volume's data (its holes stay holes) or makes a reflink. By
    /// default, the file as a stream.
    fn download_volume_to_file(
        &self,
        pool: &str,
        name: &str,
        sink: &std::fs::File,
        progress: Progress<'_>,
    ) -> Result<u64> {
        self.download_volume(pool, name, &mut &*sink, progress)
    }

    /// Writes the volume's content to `sink` (libvirt's
    /// `virStorageVolDownload`) and returns the number of bytes.
    fn download_volume(
        &self,
        pool: &str,
        name: &str,
        sink: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let _ = (pool, sink, progress);
        Err(crate::Error::Unsupported {
            object: crate::error::ObjectName::new(vireo_crds::ObjectKind::StorageVol, name),
            driver: "test",
            operation: "vol-download (it needs a real storage pool)",
        })
    }
}
