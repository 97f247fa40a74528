//! The driver interface, shaped by libvirt's API, and the drivers behind it.
//!
//! A [`Connection`] is opened by URI ([`connect::open`]). Like libvirt's
//! `virConnectPtr`, it bundles a hypervisor driver (domains), a network
//! driver and a storage driver (pools and volumes); each is a trait here, so
//! the agent can pair any hypervisor (test, kvm, qemu) with the real network
//! and storage backends.
//!
//! Modules follow libvirt's concepts: [`hypervisor`] (domains),
//! [`network`], [`storage`] (pools and volumes), [`error`] (typed errors that
//! name the object), [`test`] (libvirt's test driver), [`conformance`] (the
//! suite every driver passes), [`host`] (this machine's NodeInfo).

pub mod bridge;
pub mod cgroup;
pub mod conformance;
pub mod connect;
pub mod error;
pub mod host;
pub mod host_paths;
pub mod hypervisor;
pub mod ids;
pub mod kvm;
pub mod lookup;
pub mod migration;
pub mod network;
pub mod node;
pub mod qemu;
pub mod records;
pub mod remote;
pub mod save;
pub mod snapshot;
pub mod storage;
pub mod test;
pub mod vm;

pub use connect::{Connection, open};
pub use error::{Error, Result};
pub use hypervisor::{Affect, BlockInfo, DomainRef, HypervisorDriver, VcpuInfo};
pub use lookup::{ListFilter, Lookup};
pub use network::{DhcpLease, NetworkDriver, NetworkInfo, NetworkRef};
pub use storage::{PoolInfo, PoolRef, PoolState, ResizeFlags, StorageDriver, VolInfo, VolRef};

/// Vireo's version, reported by `vireo version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
