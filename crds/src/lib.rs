//! Vireo's API types, group `vireo.dev`, version `v1alpha1`.
//!
//! One definition of each object serves the CRDs, the drivers, the CLI and
//! the standalone manifest files. The mapping to libvirt's object model:
//!
//! | libvirt            | Vireo         | scope      |
//! |--------------------|---------------|------------|
//! | `virDomainPtr`     | [`Domain`]      | namespaced |
//! | `virDomainMigrate` | [`DomainMigration`] | namespaced |
//! | `virNetworkPtr`    | [`Network`]     | cluster    |
//! | `virStoragePoolPtr`| [`StoragePool`] | cluster    |
//! | `virStorageVolPtr` | [`StorageVol`]  | namespaced |
//! | `virNodeGetInfo`   | [`Host`]        | cluster    |
//! | `virDomainSnapshotPtr` | [`DomainSnapshot`] | namespaced |
//! | `virDomainRevertToSnapshot` | [`DomainRestore`] | namespaced |

pub mod common;
pub mod crd;
pub mod domain;
pub mod domain_migration;
pub mod domain_snapshot;
pub mod host;
pub mod labels;
pub mod libvirt_xml;
pub mod manifest;
pub mod network;
pub mod quantity;
pub mod storage_pool;
pub mod storage_vol;
pub mod validate;

pub use common::{Condition, ObjectKind};
pub use domain::{
    BootDevice, CloudInit, DataSource, Disk, DiskBus, DiskDevice, Domain, DomainDevices,
    DomainInfo, DomainReason, DomainSpec, DomainState, DomainStatus, DomainType, EvictionStrategy,
    Firmware, GuestFilesystem, GuestInfo, GuestInterface, GuestOs, GuestUser, Interface,
    InterfaceStatus, KeyRef, Lifecycle, LifecycleAction, OsSpec, RunStrategy, SerialSpec,
};
pub use domain_migration::{
    DomainMigration, DomainMigrationSpec, DomainMigrationStatus, MigrationPhase,
};
pub use domain_snapshot::{
    DomainRestore, DomainRestoreSpec, DomainRestoreStatus, DomainSnapshot, DomainSnapshotSpec,
    DomainSnapshotStatus, SnapshotDiskStatus, SnapshotPhase,
};
pub use host::{Host, HostSpec, HostStatus, NodeInfo};
pub use manifest::{Manifest, ManifestError};
pub use network::{
    DhcpHost, DhcpRange, DhcpSpec, ForwardMode, IpSpec, Network, NetworkSpec, NetworkStatus,
};
pub use quantity::{QuantityError, format_bytes, parse_quantity};
pub use storage_pool::{PoolType, StoragePool, StoragePoolSpec, StoragePoolStatus};
pub use storage_vol::{
    BlankSource, CloneSource, StorageVol, StorageVolSpec, StorageVolStatus, UploadSource,
    UrlSource, VolFormat, VolumeSource,
};
pub use validate::{Validate, ValidationError};

/// The API group of every Vireo kind.
pub const GROUP: &str = "vireo.dev";
/// The API version of every Vireo kind.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "vireo.dev/v1alpha1";
