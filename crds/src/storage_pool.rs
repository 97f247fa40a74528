//! `StoragePool`: where volumes live (libvirt's `virStoragePoolPtr`), realized
//! per node like a network.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, is_false};

/// A storage pool: a directory of volume files on each node it is realized on.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "StoragePool",
    status = "StoragePoolStatus",
    shortname = "pool",
    category = "vireo",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.path"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","description":"Nodes the pool is active on","jsonPath":".status.activeNodes"}"#,
    printcolumn = r#"{"name":"Autostart","type":"boolean","jsonPath":".spec.autostart"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolSpec {
    /// RFC 4122 UUID. Defaulted when absent; never changes afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.uuid cannot change once set"))]
    pub uuid: Option<String>,
    /// Pool type; `dir` is a directory of files.
    #[serde(rename = "type", default)]
    pub pool_type: PoolType,
    /// Directory that holds the volumes (libvirt's `<target><path>`): an
    /// absolute path without `..`.
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')").message("spec.path must be an absolute path without '..'"))]
    pub path: String,
    /// Start the pool when its node starts (libvirt's autostart).
    #[serde(default, skip_serializing_if = "is_false")]
    pub autostart: bool,
    /// Whether the pool should be active on its nodes (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Labels a Host must carry for the pool to be realized on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// Pool types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// A directory on the node's filesystem.
    #[default]
    Dir,
}

impl fmt::Display for PoolType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dir")
    }
}

/// Per-node state of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    /// How many nodes report the pool active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_nodes: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["nodeName"]))]
    pub nodes: Vec<PoolNodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The pool as one node sees it (libvirt's `virStoragePoolInfo`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolNodeStatus {
    pub node_name: String,
    /// `inactive`, `building`, `running`, `degraded`, `inaccessible`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
