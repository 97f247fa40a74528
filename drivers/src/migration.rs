//! Live migration between two nodes, in libvirt's steps (the "v3" protocol
//! of `virDomainMigrate*`): the target *prepares* (defines the domain and
//! starts it waiting for the incoming state), the source *performs* (sends
//! memory, device state and the data of node-local disks, and ends paused),
//! the target *finishes* (resumes the guest, or throws its half away), and
//! the source *confirms* (on success stops and undefines its copy, on
//! failure resumes it).
//!
//! Whoever drives the steps (the CLI between two connections, the agents
//! through a `DomainMigration` object) carries [`MigrationIncoming`] from
//! the target to the source; nothing else passes between the two nodes but
//! the drivers' own streams. At no moment do both copies run: the source
//! is paused before the target resumes, and a failure before the target
//! resumes leaves the guest on the source.

use serde::{Deserialize, Serialize};

/// What the caller asks of a migration (virsh migrate's flags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationParams {
    /// The address on the target node that the target's listener binds and
    /// the source connects to (an IP address; no host names).
    pub target_address: String,
    /// Copy the data of disks that are local to the source node (libvirt's
    /// `--copy-storage-all`); otherwise the disks must be shared.
    pub copy_storage: bool,
    /// The longest pause the guest may see at the switch-over, in ms
    /// (`virsh migrate-setmaxdowntime`); `None`: the driver's default.
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap in MiB/s (`virsh migrate-setspeed`); `None`: no cap.
    pub bandwidth_mib_s: Option<u64>,
}

/// What the target's prepare step hands to the source: where to send the
/// state and, when storage is copied, where each disk's data goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationIncoming {
    /// The driver's own URI for the state stream (`tcp:10.0.0.2:49152`).
    pub uri: String,
    /// Per disk (by the domain's disk name), where its data is to be
    /// written (an NBD export `nbd://10.0.0.2:49153/vda`), when copied.
    #[serde(default)]
    pub disks: Vec<(String, String)>,
    /// Opaque driver data the source needs (a cookie, as libvirt's).
    #[serde(default)]
    pub cookie: serde_json::Value,
}

/// What a finished (or failed) migration measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStats {
    /// From the start of perform to the source paused with everything sent.
    pub total_ms: u64,
    /// How long the guest did not run at the switch-over, as the driver
    /// measured it (QEMU's `downtime`).
    pub downtime_ms: u64,
    /// Memory bytes sent (all passes).
    pub memory_bytes: u64,
    /// Disk bytes copied (0 without copy_storage).
    pub disk_bytes: u64,
}
