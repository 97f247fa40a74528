//! The driver's state on disk, so that a restarted agent (or the CLI beside
//! it) sees the same networks:
//!
//! ```text
//! STATE/lock                   flock(2): one writer at a time, across processes
//! STATE/networks/NAME.json     one record per network (written atomically)
//! STATE/run/NAME/              dnsmasq's configuration, pid file, leases, log;
//!                              bridge-pending while the bridge is being made
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::records::{self, Named, RecordDir};

use serde::{Deserialize, Serialize};
use vireo_crds::Network;

/// What an activation set up, so that destroy (in this process or a later
/// one) takes exactly that down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Live {
    pub bridge: String,
    /// Whether the bridge is ours (false in bridge mode).
    pub created_bridge: bool,
    /// The nftables table, when the network has rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Whether a dnsmasq serves the network.
    #[serde(default)]
    pub dnsmasq: bool,
}

/// One network, with libvirt's bookkeeping (as the test driver keeps it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub name: String,
    pub uuid: String,
    /// The running definition while active, the persistent one otherwise.
    pub def: Network,
    /// A definition given while active, used from the next start on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_def: Option<Network>,
    pub persistent: bool,
    #[serde(default)]
    pub autostart: bool,
    #[serde(default)]
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Live>,
}

pub struct Store {
    records: RecordDir,
}

/// Holds the store's lock while alive.
pub struct Locked<'a>(records::Locked<'a>);

impl Named for Record {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Names a network can have: a Kubernetes object name (letters, digits,
/// '-', '.', and '_' for names made elsewhere), not starting with '.'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Store {
    pub fn open(root: &Path) -> io::Result<Self> {
        let records = RecordDir::open(root, "networks", "network")?;
        fs::create_dir_all(root.join("run"))?;
        Ok(Self { records })
    }

    pub fn lock(&self) -> io::Result<Locked<'_>> {
        self.records.lock().map(Locked)
    }

    /// The run directory of a network.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.records.root().join("run").join(name)
    }
}

impl Locked<'_> {
    /// Every record, sorted by name.
    pub fn all(&self) -> io::Result<Vec<Record>> {
        self.0.records().all()
    }

    pub fn get(&self, name: &str) -> io::Result<Option<Record>> {
        if !valid_name(name) {
            return Ok(None);
        }
        self.0.records().get(name)
    }

    pub fn put(&self, record: &Record) -> io::Result<()> {
        self.0.put(record)
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.0.remove(name)
    }
}
