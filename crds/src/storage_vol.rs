//! `StorageVol`: a volume in a pool on one node (libvirt's `virStorageVolPtr`).

use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// A volume: a file in a StoragePool on one node, a disk for Domains of its namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "StorageVol",
    namespaced,
    status = "StorageVolStatus",
    shortname = "vol",
    category = "vireo",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".spec.capacity"}"#,
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".spec.format"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("isQuantity(string(self.capacity)) && quantity(string(self.capacity)).isGreaterThan(quantity('0')) && quantity(string(self.capacity)).isLessThan(quantity('16Ei'))").message("spec.capacity must be a size above zero and below 16Ei, such as 10Gi").field_path(".capacity"))]
#[x_kube(validation = Rule::new("!has(self.allocation) || (isQuantity(string(self.allocation)) && isQuantity(string(self.capacity)) && quantity(string(self.allocation)).compareTo(quantity(string(self.capacity))) <= 0)").message("spec.allocation must be a size not greater than spec.capacity").field_path(".allocation"))]
#[x_kube(validation = Rule::new("!has(self.source) || [has(self.source.blank), has(self.source.clone), has(self.source.upload), has(self.source.url)].filter(x, x).size() == 1").message("spec.source must set exactly one of blank, clone, upload, url").field_path(".source"))]
#[x_kube(validation = Rule::new("!has(oldSelf.nodeName) || (has(self.nodeName) && self.nodeName == oldSelf.nodeName)").message("spec.nodeName cannot change once set").field_path(".nodeName"))]
#[x_kube(validation = Rule::new("!isQuantity(string(self.capacity)) || !isQuantity(string(oldSelf.capacity)) || quantity(string(self.capacity)).compareTo(quantity(string(oldSelf.capacity))) >= 0").message("spec.capacity cannot shrink: a volume only grows (the guest's data would be cut off)").field_path(".capacity"))]
#[serde(rename_all = "camelCase")]
pub struct StorageVolSpec {
    /// Name of the StoragePool that holds the volume.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.pool cannot change"))]
    pub pool: String,
    /// Size the guest sees. It may grow (the node's agent resizes the
    /// volume; a running guest sees the new size at its next start), never
    /// shrink.
    pub capacity: Quantity,
    /// Space to allocate up front (default: the whole capacity for raw
    /// volumes created by the test driver, sparse on real pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Quantity>,
    /// On-disk format.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.format cannot change"))]
    pub format: VolFormat,
    /// Where the content comes from; blank when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// Node that holds the volume; when absent, the node of the first Domain
    /// that uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// Volume formats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolFormat {
    #[default]
    Raw,
    Qcow2,
    /// An ISO 9660 image (an installer, a cloud-init seed): raw bytes,
    /// attached read-only as a CD-ROM.
    Iso,
}

impl VolFormat {
    /// Whether the file holds the guest's bytes as they are (raw, iso).
    pub fn is_raw_bytes(self) -> bool {
        matches!(self, Self::Raw | Self::Iso)
    }
}

impl fmt::Display for VolFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Iso => "iso",
        })
    }
}

/// Where a volume's content comes from: exactly one member is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSource {
    /// A blank (zeroed) volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<BlankSource>,
    /// A copy of another volume of the same pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneSource>,
    /// Content uploaded by a client (`vireo vol-upload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadSource>,
    /// Content fetched from an HTTP(S) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
}

/// A blank volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct BlankSource {}

/// A clone of another volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloneSource {
    /// Name of the source volume, in the same pool (a plain name).
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub volume: String,
    /// Make a qcow2 overlay backed by the source instead of a full copy.
    #[serde(default, skip_serializing_if = "crate::common::is_false")]
    pub overlay: bool,
}

/// Content from a client upload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct UploadSource {}

/// Content from a URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UrlSource {
    /// http:// or https:// address of the content.
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
}

/// What the node holding the volume reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageVolStatus {
    /// `Pending`, `Creating`, `Ready`, `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Path of the volume on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// libvirt's volume key (unique on the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<VolFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Quantity>,
    /// Percentage of a long copy done (0-100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
