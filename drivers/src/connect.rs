//! Connections, opened by URI like libvirt's `virConnectOpen`.
//!
//! | URI                       | driver                                      |
//! |---------------------------|---------------------------------------------|
//! | `test:///default`         | test driver with libvirt's default node      |
//! | `test:///path/node.yaml`  | test driver loaded from a node file          |
//! | `test:///path/dir/`       | a persistent test node saved in a directory  |
//! | `kvm:///system`           | vireo-vmm, state under /var/lib/vireo/kvm    |
//! | `kvm:///embed?root=/DIR`  | vireo-vmm, state under DIR                   |
//! | `qemu:///system`          | QEMU, state under /var/lib/vireo/qemu        |
//! | `qemu:///embed?root=/DIR` | QEMU, state under DIR                        |
//! | `vireo+unix:///path`      | a standalone agent's local API socket        |

use std::path::Path;
use std::sync::Arc;

use crate::hypervisor::HypervisorDriver;
use crate::network::NetworkDriver;
use crate::storage::StorageDriver;
use crate::{Error, Result};

/// An open connection: a hypervisor driver with the network and storage
/// drivers that go with it.
#[derive(Clone)]
pub struct Connection {
    uri: String,
    hypervisor: Arc<dyn HypervisorDriver>,
    network: Arc<dyn NetworkDriver>,
    storage: Arc<dyn StorageDriver>,
}

impl Connection {
    /// Bundles three drivers under one URI.
    pub fn new(
        uri: impl Into<String>,
        hypervisor: Arc<dyn HypervisorDriver>,
        network: Arc<dyn NetworkDriver>,
        storage: Arc<dyn StorageDriver>,
    ) -> Self {
        Self {
            uri: uri.into(),
            hypervisor,
            network,
            storage,
        }
    }

    /// The canonical URI of the connection.
    pub fn uri(&self) -> &str {
        &self.uri
    }
    /// Domains and the node.
    pub fn hypervisor(&self) -> &dyn HypervisorDriver {
        self.hypervisor.as_ref()
    }
    /// Networks.
    pub fn network(&self) -> &dyn NetworkDriver {
        self.network.as_ref()
    }
    /// Pools and volumes.
    pub fn storage(&self) -> &dyn StorageDriver {
        self.storage.as_ref()
    }
    /// The network driver, to pair with another hypervisor driver.
    pub fn network_driver(&self) -> Arc<dyn NetworkDriver> {
        self.network.clone()
    }
    /// The storage driver, to pair with another hypervisor driver.
    pub fn storage_driver(&self) -> Arc<dyn StorageDriver> {
        self.storage.clone()
    }
}

/// Opens a connection by URI.
pub fn open(uri: &str) -> Result<Connection> {
    let fail = |message: &str| Error::Connect {
        uri: uri.to_string(),
        message: message.to_string(),
    };
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| fail("not a URI (expected scheme:///path, e.g. test:///default)"))?;
    // Drivers on this node take no host part: `test:///default`, not `test://h/default`.
    let path = rest
        .strip_prefix('/')
        .map(|p| format!("/{p}"))
        .ok_or_else(|| fail("a host part is not supported; use scheme:///path"))?;
    match scheme {
        "test" => {
            let driver = if path == "/default" {
                crate::test::TestDriver::default_node()
            } else if path.ends_with('/') || Path::new(&path).is_dir() {
                crate::test::TestDriver::from_dir(Path::new(&path)).map_err(|e| fail(&e))?
            } else {
                crate::test::TestDriver::from_file(Path::new(&path)).map_err(|e| fail(&e))?
            };
            let driver = Arc::new(driver);
            Ok(Connection::new(uri, driver.clone(), driver.clone(), driver))
        }
        "qemu" => crate::qemu::open(uri, &path).map_err(|e| fail(&e)),
        "kvm" => crate::kvm::open(uri, &path).map_err(|e| fail(&e)),
        "vireo+unix" => crate::remote::open(uri, &path).map_err(|e| fail(&e)),
        other => Err(fail(&format!(
            "no driver for scheme '{other}' (known: test, kvm, qemu, vireo+unix)"
        ))),
    }
}
