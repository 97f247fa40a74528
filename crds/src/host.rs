//! `Host`: one per node agent (libvirt's `virNodeGetInfo` and capabilities).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, is_false};

/// A node as its agent reports it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "Host",
    status = "HostStatus",
    shortname = "hv",
    category = "vireo",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"CPUs","type":"integer","jsonPath":".status.nodeInfo.cpus"}"#,
    printcolumn = r#"{"name":"Memory","type":"integer","description":"Memory in bytes","jsonPath":".status.nodeInfo.memoryBytes"}"#,
    printcolumn = r#"{"name":"Allocatable","type":"string","jsonPath":".status.allocatableMemory"}"#,
    printcolumn = r#"{"name":"Drivers","type":"string","jsonPath":".status.driverList"}"#,
    printcolumn = r#"{"name":"Drain","type":"boolean","jsonPath":".spec.drain"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HostSpec {
    /// Keep new Domains off this host (like `kubectl cordon`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub unschedulable: bool,
    /// Move the Domains off this host (`vireo drain NODE`): no new Domain
    /// is placed here, and each Domain here goes as its
    /// `spec.evictionStrategy` says (LiveMigrate, Shutdown; None stays).
    #[serde(default, skip_serializing_if = "is_false")]
    pub drain: bool,
}

/// libvirt's `virNodeInfo`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// CPU model (`x86_64`, or the model name).
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// CPU frequency in MHz.
    pub mhz: u32,
    /// NUMA cells.
    pub numa_nodes: u32,
    /// Sockets per NUMA cell.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// What the agent reports about its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_info: Option<NodeInfo>,
    /// Hypervisor drivers the agent embeds (`test`, `kvm`, `qemu`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<String>,
    /// The same, comma-separated, for `kubectl get hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_list: Option<String>,
    /// Memory left for guests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable_memory: Option<Quantity>,
    /// vCPUs left for guests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable_vcpus: Option<u32>,
    /// The address other nodes' agents send live migrations to (the
    /// agent's `--migration-address`, by default the node's first
    /// non-loopback address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_address: Option<String>,
    /// Last time the agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
