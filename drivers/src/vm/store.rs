//! The on-disk state of a process-backed hypervisor driver, under its root
//! directory:
//!
//! ```text
//! ROOT/lock                 flock(2): one writer at a time, across processes
//! ROOT/next-id              the next domain ID
//! ROOT/domains/NAME.json    one record per domain: definition, autostart,
//!                           the last stop reason, and the running activation
//! ROOT/run/UUID/            the activation's sockets, pid file, console log
//! ROOT/nvram/UUID_VARS.fd   an EFI Domain's variable store (qemu), kept
//!                           across activations, removed with the Domain
//! ROOT/save/UUID.save       a managed save image (`managedsave`), resumed
//!                           and removed by the next start
//! ```
//!
//! Every process that opens the same root sees the same domains: the agent,
//! the CLI beside it, and the agent again after a restart.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::records::{self, Named, RecordDir};

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
    /// The VM process; 0 while `launching`.
    pub pid: u32,
    /// The activation is recorded before its process starts, so that a
    /// launch is never lost: a driver that finds this set on a record it
    /// did not write (its agent was killed during the launch) adopts the
    /// process that launch started, or ends the activation if there is none.
    #[serde(default)]
    pub launching: bool,
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
    /// The live migration this activation is part of (`crate::migration`):
    /// set by prepare (target) or perform (source), cleared by finish or
    /// confirm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationRole>,
}

/// Which end of a live migration an activation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MigrationRole {
    /// Sending: perform started; `was_running` says whether the guest ran
    /// before it (confirm resumes it after a failure only then).
    Source { was_running: bool },
    /// Receiving: prepared, waiting for the state or for finish.
    Target,
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
    records: RecordDir,
}

/// Holds the store's lock while alive.
pub struct Locked<'a>(records::Locked<'a>);

impl Named for Record {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Store {
    /// Opens (and creates) the root.
    pub fn open(root: &Path) -> io::Result<Self> {
        let records = RecordDir::open(root, "domains", "domain")?;
        fs::create_dir_all(root.join("run"))?;
        Ok(Self { records })
    }

    pub fn root(&self) -> &Path {
        self.records.root()
    }

    /// Takes the cross-process lock.
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        self.records.lock().map(Locked)
    }

    /// The run directory of a domain (by UUID, so paths stay short for
    /// unix sockets).
    pub fn run_dir(&self, uuid: &str) -> PathBuf {
        self.root().join("run").join(uuid)
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

    /// Hands out the next domain ID (1, 2, ...), kept across restarts.
    pub fn next_id(&self) -> io::Result<u32> {
        let path = self.0.records().root().join("next-id");
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
