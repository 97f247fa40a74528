//! `DomainMigration`: a request to move a running Domain to another Host
//! while it runs (libvirt's `virsh migrate --live`, KubeVirt's
//! VirtualMachineInstanceMigration). Created by a user (`vireo migrate NAME
//! NODE`) or by the operator draining a Host; the operator picks the target
//! and the two nodes' agents carry out libvirt's four steps, each writing
//! the phase it reached.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// Move the Domain `domainName` of this namespace to another Host, live.
/// The spec cannot change once created; delete the object and create
/// another to ask again.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "DomainMigration",
    namespaced,
    status = "DomainMigrationStatus",
    shortname = "dmig",
    category = "vireo",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domainName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.sourceNode"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetNode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: delete the DomainMigration and create another"))]
#[serde(rename_all = "camelCase")]
pub struct DomainMigrationSpec {
    /// The Domain to move (in this namespace). It must be running.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub domain_name: String,
    /// The Host to move it to; absent, the operator picks one as placement
    /// does (ready, with the Domain's driver and room, not the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[schemars(regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"))]
    pub target_node: Option<String>,
    /// The longest pause the guest may see at the switch-over, in
    /// milliseconds (`virsh migrate-setmaxdowntime`); absent: the driver's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap in MiB/s (`virsh migrate-setspeed`); absent: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub bandwidth: Option<u64>,
}

/// How far a migration got.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MigrationPhase {
    /// Created; the operator has not looked at it yet.
    Pending,
    /// The operator accepted it (the Domain is marked as migrating) and is
    /// picking the target.
    Scheduling,
    /// The target's agent is preparing (defining the domain there, paused,
    /// waiting for the state).
    Preparing,
    /// The source's agent is sending the state; it ends paused.
    Transferring,
    /// The target's agent resumes the guest (or, after a failed transfer,
    /// removes what it prepared).
    Finishing,
    /// The source's agent removes its copy (or, after a failure, resumes
    /// it); then the operator moves the Domain's binding.
    Confirming,
    /// The guest runs on the target and the Domain is bound there.
    Succeeded,
    /// The guest runs on the source, where the Domain stays bound; the
    /// message and conditions say why.
    Failed,
}

impl MigrationPhase {
    /// Whether the migration is over (succeeded or failed).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Where the target waits for the state (the prepare step's answer).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationIncoming {
    /// The target driver's URI for the state stream (`tcp:10.0.0.2:49152`).
    pub uri: String,
    /// Where each copied disk's data goes (an NBD export), by disk name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<MigrationDisk>,
    /// The driver's cookie for the source, as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

/// One disk's destination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationDisk {
    pub name: String,
    pub uri: String,
}

/// What the transfer measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStats {
    /// From the start of the transfer to the source paused with all sent.
    pub total_ms: u64,
    /// How long the guest did not run: from the source's pause for the
    /// switch-over to the target's resume (until the target has resumed
    /// it, the source driver's own figure).
    pub downtime_ms: u64,
    /// When the source was paused for the switch-over (Unix ms, the source
    /// node's clock); the target measures the downtime from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at_ms: Option<u64>,
    /// Memory bytes sent.
    pub memory_bytes: u64,
    /// Disk bytes copied.
    pub disk_bytes: u64,
}

/// The migration as the operator and the two agents report it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Where the Domain ran when the migration was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// Where it goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<MigrationIncoming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<MigrationStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// One per step: `Scheduled`, `Prepared`, `Transferred`, `Finished`,
    /// `Confirmed`, each True or False with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Why it failed, or how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
