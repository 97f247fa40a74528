//! `Network`: a virtual network (libvirt's `virNetworkPtr`), realized on every
//! node its `nodeSelector` matches.

use std::collections::BTreeMap;
use std::fmt;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, is_false};

/// A virtual network: a bridge per node, with optional NAT and DHCP.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "Network",
    status = "NetworkStatus",
    shortname = "net",
    category = "vireo",
    printcolumn = r#"{"name":"Forward","type":"string","jsonPath":".spec.forwardMode"}"#,
    printcolumn = r#"{"name":"Bridge","type":"string","jsonPath":".spec.bridge"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.ip.address"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","description":"Nodes the network is active on","jsonPath":".status.activeNodes"}"#,
    printcolumn = r#"{"name":"Autostart","type":"boolean","jsonPath":".spec.autostart"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self.forwardMode != 'bridge' || has(self.bridge)").message("spec.bridge is required when spec.forwardMode is bridge").field_path(".bridge"))]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// RFC 4122 UUID. Defaulted when absent; never changes afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.uuid cannot change once set"))]
    pub uuid: Option<String>,
    /// How traffic leaves the network (libvirt's `<forward mode>`).
    #[serde(default)]
    pub forward_mode: ForwardMode,
    /// Bridge device name (`virbr0`). For `bridge` mode, an existing bridge
    /// to attach to; otherwise the bridge Vireo creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[!-.0-9;-~]{1,15}$"))]
    pub bridge: Option<String>,
    /// The host side address, the subnet and DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpSpec>,
    /// Start the network when its node starts (libvirt's autostart).
    #[serde(default, skip_serializing_if = "is_false")]
    pub autostart: bool,
    /// Whether the network should be active on its nodes (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Labels a Host must carry for the network to be realized on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// libvirt's forward modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    /// Masquerade to the outside.
    #[default]
    Nat,
    /// Routed without NAT.
    Route,
    /// No forwarding: guests reach each other and the host only.
    Isolated,
    /// Attach guests to an existing host bridge.
    Bridge,
}

impl fmt::Display for ForwardMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nat => "nat",
            Self::Route => "route",
            Self::Isolated => "isolated",
            Self::Bridge => "bridge",
        })
    }
}

/// The host's address on the network and the subnet it implies.
///
/// (The CEL rules build the CIDR with a list lookup instead of
/// `string(self.prefix)`: the API server's cost estimate treats an
/// int-to-string conversion as unbounded and refuses the CRD.)
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.dhcp) || !has(self.dhcp.ranges) || !isIP(self.address) || self.dhcp.ranges.all(r, isIP(r.start) && isIP(r.end) && cidr(self.address + ['/0', '/1', '/2', '/3', '/4', '/5', '/6', '/7', '/8', '/9', '/10', '/11', '/12', '/13', '/14', '/15', '/16', '/17', '/18', '/19', '/20', '/21', '/22', '/23', '/24', '/25', '/26', '/27', '/28', '/29', '/30'][self.prefix]).containsIP(r.start) && cidr(self.address + ['/0', '/1', '/2', '/3', '/4', '/5', '/6', '/7', '/8', '/9', '/10', '/11', '/12', '/13', '/14', '/15', '/16', '/17', '/18', '/19', '/20', '/21', '/22', '/23', '/24', '/25', '/26', '/27', '/28', '/29', '/30'][self.prefix]).containsIP(r.end))").message("spec.ip.dhcp.ranges: every range must lie inside the network's subnet (spec.ip.address/spec.ip.prefix)").field_path(".dhcp.ranges"))]
#[x_kube(validation = Rule::new("!has(self.dhcp) || !has(self.dhcp.hosts) || !isIP(self.address) || self.dhcp.hosts.all(h, isIP(h.ip) && cidr(self.address + ['/0', '/1', '/2', '/3', '/4', '/5', '/6', '/7', '/8', '/9', '/10', '/11', '/12', '/13', '/14', '/15', '/16', '/17', '/18', '/19', '/20', '/21', '/22', '/23', '/24', '/25', '/26', '/27', '/28', '/29', '/30'][self.prefix]).containsIP(h.ip))").message("spec.ip.dhcp.hosts: every static address must lie inside the network's subnet").field_path(".dhcp.hosts"))]
#[serde(rename_all = "camelCase")]
pub struct IpSpec {
    /// IPv4 address of the bridge (`192.168.122.1`).
    #[schemars(length(max = 15))]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4").message("spec.ip.address must be an IPv4 address"))]
    pub address: String,
    /// Prefix length of the subnet (`24`).
    #[schemars(range(min = 1, max = 30))]
    pub prefix: u8,
    /// DHCP service on the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpSpec>,
}

/// DHCP ranges and static hosts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DhcpSpec {
    /// Address ranges handed out dynamically.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ranges: Vec<DhcpRange>,
    /// Fixed addresses by MAC (one entry per MAC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["mac"]))]
    pub hosts: Vec<DhcpHost>,
}

/// An inclusive range of addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DhcpRange {
    /// First address of the range.
    #[schemars(length(max = 15))]
    pub start: String,
    /// Last address of the range.
    #[schemars(length(max = 15))]
    pub end: String,
}

/// A static DHCP lease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DhcpHost {
    /// The guest's MAC address.
    #[schemars(
        length(max = 17),
        regex(pattern = r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$")
    )]
    pub mac: String,
    /// The address it always gets.
    #[schemars(length(max = 15))]
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub name: Option<String>,
}

/// Per-node state of a network.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// How many nodes report the network active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_nodes: Option<u32>,
    /// One entry per node the network is realized on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["nodeName"]))]
    pub nodes: Vec<NetworkNodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The network as one node sees it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkNodeStatus {
    pub node_name: String,
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
