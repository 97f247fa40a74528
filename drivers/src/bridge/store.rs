//! The driver's state on disk, so that a restarted agent (or the CLI beside
//! it) sees the same networks:
//!
//! ```text
//! STATE/lock                   flock(2): one writer at a time, across processes
//! STATE/networks/NAME.json     one record per network (written atomically)
//! STATE/run/NAME/              dnsmasq's configuration, pid file, leases, log
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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
    root: PathBuf,
}

/// Holds the store's lock while alive.
pub struct Locked<'a> {
    store: &'a Store,
    _file: File,
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
        fs::create_dir_all(root.join("networks"))?;
        fs::create_dir_all(root.join("run"))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn lock(&self) -> io::Result<Locked<'_>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))?;
        // SAFETY: flock on a descriptor we own; it only blocks this thread
        // until other holders release the lock.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Locked {
            store: self,
            _file: file,
        })
    }

    /// The run directory of a network.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.root.join("run").join(name)
    }
}

impl Locked<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.store
            .root
            .join("networks")
            .join(format!("{name}.json"))
    }

    /// Every record, sorted by name; unreadable files are skipped with a
    /// warning.
    pub fn all(&self) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.store.root.join("networks"))? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable network record")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn get(&self, name: &str) -> io::Result<Option<Record>> {
        if !valid_name(name) {
            return Ok(None);
        }
        match fs::read(self.path(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a record atomically (temporary file, fsync, rename).
    pub fn put(&self, record: &Record) -> io::Result<()> {
        let path = self.path(&record.name);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(tmp, path)
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
