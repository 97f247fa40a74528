//! Domain snapshots (libvirt's `virDomainSnapshot*`, `virsh snapshot-*`).
//!
//! A snapshot records a domain at one moment: its definition, the state it
//! was in (`running`, `paused`, `shutoff`, or `disk-snapshot` for a
//! disk-only snapshot of an active domain), its disks and, for a full
//! snapshot of an active domain, its memory and device state. Snapshots of
//! one domain form a tree, as libvirt's do: a new one's parent is the
//! domain's *current* snapshot, and it becomes current; a revert makes the
//! snapshot reverted to current; deleting a snapshot hands its children to
//! its parent (and, when it was current, makes its parent current).
//!
//! [`SnapshotTree`] is that bookkeeping, shared by the drivers: the test
//! driver keeps it in its domain records, the qemu and kvm drivers in a file
//! per domain ([`SnapshotTree::load`], [`SnapshotTree::store`]). Each
//! driver keeps what its snapshots hold (qcow2 internal snapshots, a memory
//! file, copies of raw disks) and says so in [`SnapshotDisk::location`] and
//! [`SnapshotInfo::memory`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use vireo_crds::{Domain, ObjectKind};

use crate::{Error, Result};

const KIND: ObjectKind = ObjectKind::DomainSnapshot;

/// What `snapshot-create-as` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotParams {
    /// The snapshot's name; `None`: the current time in Unix seconds, as
    /// libvirt names them.
    pub name: Option<String>,
    pub description: Option<String>,
    /// Disks only (`--disk-only`): no memory, even of an active domain.
    pub disk_only: bool,
}

/// The domain's state when the snapshot was taken (libvirt's
/// `virDomainSnapshotState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    Running,
    Paused,
    Shutoff,
    /// A disk-only snapshot of an active domain: no memory.
    DiskSnapshot,
}

impl SnapshotState {
    /// virsh's words (`snapshot-list`, `snapshot-info`).
    pub fn virsh_name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Shutoff => "shutoff",
            Self::DiskSnapshot => "disk-snapshot",
        }
    }
}

impl std::fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.virsh_name())
    }
}

/// One disk in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotDisk {
    /// The guest's name for it (`vda`).
    pub name: String,
    /// The volume it is.
    pub volume: String,
    /// How its contents are kept: `internal` (a snapshot inside the qcow2
    /// image, or the test driver's record), `copy` (a sparse copy of a raw
    /// image beside the domain's state).
    pub location: String,
}

/// How a revert leaves the domain (`snapshot-revert --running/--paused`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevertTo {
    /// In the state the snapshot holds: running or paused with its memory
    /// for a full snapshot of an active domain, shut off otherwise.
    #[default]
    Snapshot,
    /// Running: a snapshot without memory boots from its disks.
    Running,
    /// Paused: a snapshot without memory starts paused, from its disks.
    Paused,
}

/// What `snapshot-info`, `snapshot-list` and `snapshot-dumpxml` show.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub name: String,
    /// The domain it is of.
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Unix seconds.
    pub creation_time: u64,
    pub state: SnapshotState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The domain's current snapshot.
    pub current: bool,
    /// It holds the guest's memory and device state.
    pub memory: bool,
    pub disks: Vec<SnapshotDisk>,
    /// Direct children.
    pub children: usize,
    /// Children, their children, and so on.
    pub descendants: usize,
    /// The domain's definition when it was taken; a revert brings it back.
    pub definition: Domain,
}

/// One snapshot as a driver keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub creation_time: u64,
    pub state: SnapshotState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub memory: bool,
    pub disks: Vec<SnapshotDisk>,
    pub definition: Domain,
    /// What else the driver needs to revert (a memory file, runtime sizes).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub driver_data: serde_json::Value,
}

/// A domain's snapshots, oldest first, and which one is current.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotTree {
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

/// The current time in Unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The name a snapshot gets: the one asked for, checked, or the current
/// time in Unix seconds (libvirt's default). Names become file names and
/// qcow2 snapshot tags, so they are 1 to 64 of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-`.
pub fn snapshot_name(domain: &str, params: &SnapshotParams) -> Result<String> {
    let Some(name) = params.name.clone() else {
        return Ok(now_secs().to_string());
    };
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty()
        || name.len() > 64
        || !ok_chars
        || name.starts_with('.')
        || name.starts_with('-')
    {
        return Err(Error::invalid_argument(
            KIND,
            &name,
            format!(
                "name: a snapshot of domain '{domain}' is named with 1 to 64 letters, digits, \
                 '.', '_' or '-', not starting with '.' or '-'"
            ),
        ));
    }
    Ok(name)
}

impl SnapshotTree {
    /// The snapshot `name`, or libvirt's not-found error.
    pub fn get(&self, name: &str) -> Result<&SnapshotRecord> {
        self.snapshots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::not_found(KIND, name))
    }

    /// Refuses a name already taken.
    pub fn check_new(&self, domain: &str, name: &str) -> Result<()> {
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::already_exists(
                KIND,
                name,
                format!(" for domain '{domain}'"),
            ));
        }
        Ok(())
    }

    /// Adds a snapshot under the current one, and makes it current.
    pub fn add(&mut self, mut record: SnapshotRecord) {
        record.parent = self.current.clone();
        self.current = Some(record.name.clone());
        self.snapshots.push(record);
    }

    fn children_of(&self, name: &str) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .iter()
            .filter(move |s| s.parent.as_deref() == Some(name))
    }

    fn descendants(&self, name: &str) -> usize {
        // The tree has no cycles (parents are always older), so this ends.
        self.children_of(name)
            .map(|c| 1 + self.descendants(&c.name))
            .sum()
    }

    /// What `snapshot-info` shows of one.
    pub fn info(&self, domain: &str, name: &str) -> Result<SnapshotInfo> {
        let r = self.get(name)?;
        Ok(SnapshotInfo {
            name: r.name.clone(),
            domain: domain.to_string(),
            description: r.description.clone(),
            creation_time: r.creation_time,
            state: r.state,
            parent: r.parent.clone(),
            current: self.current.as_deref() == Some(name),
            memory: r.memory,
            disks: r.disks.clone(),
            children: self.children_of(name).count(),
            descendants: self.descendants(name),
            definition: r.definition.clone(),
        })
    }

    /// All of them, oldest first.
    pub fn list(&self, domain: &str) -> Vec<SnapshotInfo> {
        self.snapshots
            .iter()
            .filter_map(|s| self.info(domain, &s.name).ok())
            .collect()
    }

    /// The current one, if any.
    pub fn current_info(&self, domain: &str) -> Option<SnapshotInfo> {
        let name = self.current.as_deref()?;
        self.info(domain, name).ok()
    }

    /// Removes one (the snapshot only): its children go to its parent, and
    /// if it was current its parent becomes current.
    pub fn remove(&mut self, name: &str) -> Result<SnapshotRecord> {
        let index = self
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::not_found(KIND, name))?;
        let gone = self.snapshots.remove(index);
        for s in &mut self.snapshots {
            if s.parent.as_deref() == Some(name) {
                s.parent = gone.parent.clone();
            }
        }
        if self.current.as_deref() == Some(name) {
            self.current = gone.parent.clone();
        }
        Ok(gone)
    }

    /// Makes `name` current (after a revert).
    pub fn set_current(&mut self, name: &str) -> Result<()> {
        self.get(name)?;
        self.current = Some(name.to_string());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// Reads a tree kept in a file; a missing file is an empty tree.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the tree to a file (through a temporary name and a rename, so
    /// a crash leaves the old or the new one).
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }
}

/// The snapshot state for a domain in `state`, with or without memory.
pub fn state_for(state: vireo_crds::DomainState, disk_only: bool) -> (SnapshotState, bool) {
    use vireo_crds::DomainState as S;
    match state {
        s if !s.is_active() => (SnapshotState::Shutoff, false),
        _ if disk_only => (SnapshotState::DiskSnapshot, false),
        S::Paused => (SnapshotState::Paused, true),
        _ => (SnapshotState::Running, true),
    }
}

/// libvirt's refusal to undefine an inactive domain that has snapshots.
pub fn undefine_refused(domain: &str, count: usize) -> Error {
    Error::invalid_state(
        ObjectKind::Domain,
        domain,
        format!(
            "has {count} snapshot(s): cannot undefine an inactive domain with snapshots; \
             delete them first (snapshot-delete)"
        ),
    )
}

/// Deletes every snapshot of a domain (newest first), for a caller that
/// removes the domain for good (an agent tearing down a deleted Domain);
/// a driver without snapshots has none.
pub fn delete_all(hv: &dyn crate::HypervisorDriver, domain: &str) -> Result<()> {
    let all = match hv.snapshot_list(domain) {
        Ok(all) => all,
        Err(Error::Unsupported { .. } | Error::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for s in all.iter().rev() {
        match hv.snapshot_delete(domain, &s.name) {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> SnapshotRecord {
        SnapshotRecord {
            name: name.into(),
            description: None,
            creation_time: 1,
            state: SnapshotState::Running,
            parent: None,
            memory: true,
            disks: vec![],
            definition: crate::conformance::test_driver_fixture().domain("d"),
            driver_data: serde_json::Value::Null,
        }
    }

    #[test]
    fn the_tree_follows_libvirts_rules() {
        let mut t = SnapshotTree::default();
        t.add(rec("a"));
        t.add(rec("b"));
        t.set_current("a").expect("a exists");
        t.add(rec("c"));
        assert_eq!(t.get("b").expect("b").parent.as_deref(), Some("a"));
        assert_eq!(t.get("c").expect("c").parent.as_deref(), Some("a"));
        let a = t.info("d", "a").expect("a");
        assert_eq!((a.children, a.descendants, a.current), (2, 2, false));
        assert!(t.info("d", "c").expect("c").current);
        t.check_new("d", "a").expect_err("taken");
        t.remove("a").expect("removed");
        assert_eq!(t.get("b").expect("b").parent, None);
        assert_eq!(t.current.as_deref(), Some("c"));
        t.remove("c").expect("removed");
        assert_eq!(
            t.current, None,
            "the current one's parent (none) is current"
        );
        let e = t.remove("zz").expect_err("unknown");
        assert_eq!(e.to_string(), "domain snapshot 'zz' not found");
    }

    #[test]
    fn names_are_checked_or_made() {
        let p = |n: &str| SnapshotParams {
            name: Some(n.into()),
            ..Default::default()
        };
        assert_eq!(
            snapshot_name("d", &p("s1.ok_x-2")).expect("ok"),
            "s1.ok_x-2"
        );
        for bad in ["", "a/b", ".x", "-x", "a b", &"x".repeat(65)] {
            let e = snapshot_name("d", &p(bad)).expect_err(bad);
            assert!(e.to_string().contains("name:"), "{e}");
        }
        let made = snapshot_name("d", &SnapshotParams::default()).expect("made");
        assert!(made.parse::<u64>().is_ok(), "{made}");
    }

    #[test]
    fn a_tree_survives_its_file() {
        let dir = std::env::temp_dir().join(format!("vireo-snap-{}", std::process::id()));
        let path = dir.join("x/tree.json");
        assert!(
            SnapshotTree::load(&path)
                .expect("missing is empty")
                .is_empty()
        );
        let mut t = SnapshotTree::default();
        t.add(rec("a"));
        t.store(&path).expect("stored");
        let back = SnapshotTree::load(&path).expect("loaded");
        assert_eq!(
            serde_json::to_value(&back).expect("json"),
            serde_json::to_value(&t).expect("json")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
