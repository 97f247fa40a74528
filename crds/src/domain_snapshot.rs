//! `DomainSnapshot` and `DomainRestore`: libvirt's domain snapshots
//! (`virDomainSnapshot*`) on Kubernetes.
//!
//! A DomainSnapshot asks the agent of the node its Domain is bound to for
//! one snapshot of it, taken once; its status says what the snapshot holds
//! (disks, and whether memory) and whether it is ready. A DomainRestore is
//! a request, applied once, to return a Domain to one of its snapshots
//! (`virsh snapshot-revert`), with its own status; a new restore is a new
//! object. Both are namespaced, in the Domain's namespace.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// A snapshot of a Domain: its disks and, of a running guest, its memory.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "DomainSnapshot",
    namespaced,
    status = "DomainSnapshotStatus",
    shortname = "dsnap",
    category = "vireo",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domainName"}"#,
    printcolumn = r#"{"name":"Creation Time","type":"string","jsonPath":".status.creationTime"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.domainState"}"#,
    printcolumn = r#"{"name":"Memory","type":"boolean","jsonPath":".status.memory"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.readyToUse"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec cannot change: a snapshot is taken once; make a new DomainSnapshot"))]
#[serde(rename_all = "camelCase")]
pub struct DomainSnapshotSpec {
    /// The Domain, in this namespace.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub domain_name: String,
    /// Take the guest's memory too, so that a restore brings it back
    /// running where it was. Default: true when the Domain runs (a shut-off
    /// Domain has none); false: its disks only (`--disk-only`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_memory: Option<bool>,
    /// Free text kept with the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// Where a snapshot or a restore is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SnapshotPhase {
    /// Not yet looked at by the Domain's agent.
    #[default]
    Pending,
    /// Being taken (or restored).
    InProgress,
    /// Taken (or restored).
    Ready,
    /// Could not be taken (or restored): see `message`.
    Failed,
}

/// One disk in a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotDiskStatus {
    /// The guest's name for it (`vda`).
    pub name: String,
    /// Its StorageVol.
    pub volume: String,
    /// `internal` (a qcow2 snapshot inside the volume) or `copy` (a sparse
    /// copy beside the Domain's state on its node).
    pub location: String,
}

/// What the agent observed of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainSnapshotStatus {
    #[serde(default)]
    pub phase: SnapshotPhase,
    /// The snapshot exists on its node and a DomainRestore may use it.
    #[serde(default)]
    pub ready_to_use: bool,
    /// When it was taken, RFC 3339 (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// The Domain's state when it was taken: `running`, `paused`,
    /// `shutoff`, or `disk-snapshot` (an active Domain's disks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_state: Option<String>,
    /// It holds the guest's memory and device state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    /// The disks it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<SnapshotDiskStatus>,
    /// The node that holds it (the Domain's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its parent among the Domain's snapshots (libvirt's tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Why it failed, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A request to return a Domain to one of its snapshots (`virsh
/// snapshot-revert`), carried out once by the Domain's agent.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "DomainRestore",
    namespaced,
    status = "DomainRestoreStatus",
    shortname = "drestore",
    category = "vireo",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domainName"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshotName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.domainState"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec cannot change: a restore is done once; make a new DomainRestore"))]
#[serde(rename_all = "camelCase")]
pub struct DomainRestoreSpec {
    /// The Domain, in this namespace.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub domain_name: String,
    /// The DomainSnapshot (of that Domain) to return to.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub snapshot_name: String,
}

/// What the agent did with a restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainRestoreStatus {
    #[serde(default)]
    pub phase: SnapshotPhase,
    /// The Domain's state after the restore (`running`, `shut off`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_state: Option<String>,
    /// When it was done, RFC 3339 (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
