//! The on-disk state of a process-backed hypervisor driver, under its root
//! directory:
//!
//! ```text
//! ROOT/lock                 flock(2): one writer at a time, across processes
//! ROOT/next-id              the next domain ID
//! ROOT/domains/NAME.json    one record per domain: definition, autostart,
//!                           the last stop reason, and the running activation
//! ROOT/run/UUID/            the activation's sockets, pid file, console log
//! ```
//!
//! Every process that opens the same root sees the same domains: the agent,
//! the CLI beside it, and the agent again after a restart.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_crds::{Domain, DomainReason};

/// One domain as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub name: String,
    pub uuid: String,
    /// The persistent definition; `None` for a transient domain.
    pub definition: Option<Domain>,
    pub autostart: bool,
    /// Why the domain last stopped (`unknown` if it never ran).
    pub last_reason: DomainReason,
    /// The running activation, if any.
    pub run: Option<Run>,
}

/// A running activation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub id: u32,
    pub pid: u32,
    /// The definition this activation runs (live changes included).
    pub live: Domain,
    /// Why it runs: `booted` or `unpaused`.
    pub reason: DomainReason,
    /// A `reboot` call asked the guest to power off; reset it when it does.
    #[serde(default)]
    pub fake_reboot: bool,
    /// A `shutdown` call is waiting for the guest (Unix seconds it was asked).
    #[serde(default)]
    pub shutdown_since: Option<u64>,
    /// Unix seconds the activation started.
    pub started: u64,
    /// A vCPU count the guest could not take yet (hot-unplug before its
    /// ACPI is up); the watcher retries.
    #[serde(default)]
    pub pending_vcpus: Option<u32>,
}

impl Record {
    pub fn is_active(&self) -> bool {
        self.run.is_some()
    }
    /// The definition that describes the domain now: the live one while
    /// active, else the persistent one.
    pub fn current(&self) -> Option<&Domain> {
        self.run
            .as_ref()
            .map(|r| &r.live)
            .or(self.definition.as_ref())
    }
}

/// The store under one root.
pub struct Store {
    root: PathBuf,
}

/// Holds the store's lock while alive.
pub struct Locked<'a> {
    store: &'a Store,
    _file: File,
}

impl Store {
    /// Opens (and creates) the root.
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root.join("domains"))?;
        fs::create_dir_all(root.join("run"))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the cross-process lock.
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))?;
        // SAFETY: flock on a descriptor we own; it only blocks this thread
        // until other holders release the lock.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Locked {
            store: self,
            _file: file,
        })
    }

    /// The run directory of a domain (by UUID, so paths stay short for
    /// unix sockets).
    pub fn run_dir(&self, uuid: &str) -> PathBuf {
        self.root.join("run").join(uuid)
    }
}

impl Locked<'_> {
    fn record_path(&self, name: &str) -> PathBuf {
        self.store
            .root
            .join("domains")
            .join(format!("{}.json", file_stem(name)))
    }

    /// Every record, sorted by name. Unreadable files are skipped with a
    /// warning rather than failing every operation.
    pub fn all(&self) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.store.root.join("domains"))? {
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
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable domain record")
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
        match fs::read(self.record_path(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a record atomically (temporary file, fsync, rename).
    pub fn put(&self, record: &Record) -> io::Result<()> {
        let path = self.record_path(&record.name);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(tmp, path)
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.record_path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Hands out the next domain ID (1, 2, ...), kept across restarts.
    pub fn next_id(&self) -> io::Result<u32> {
        let path = self.store.root.join("next-id");
        let id = match fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u32>().unwrap_or(1).max(1),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e),
        };
        let next = id.checked_add(1).unwrap_or(1);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, next.to_string())?;
        fs::rename(tmp, path)?;
        Ok(id)
    }
}

/// Names the store can keep: Kubernetes object names, optionally
/// `namespace/name` (how the agent names a Domain on its node).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 317
        && !name.starts_with('.')
        && name.split('/').count() <= 2
        && name.split('/').all(|part| !part.is_empty())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/'))
}

/// A record's file name: the domain name with '/' written as "%2F" (no
/// valid name has a '%').
fn file_stem(name: &str) -> String {
    name.replace('/', "%2F")
}
