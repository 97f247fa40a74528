//! The network driver (libvirt's `virNetwork*` calls).

use vireo_crds::Network;

use crate::{ListFilter, Lookup, Result};

/// The identity of a network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkRef {
    pub name: String,
    pub uuid: String,
}

/// `net-info`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub uuid: String,
    pub active: bool,
    pub persistent: bool,
    pub autostart: bool,
    pub bridge: Option<String>,
}

/// A DHCP lease on a network (`net-dhcp-leases`, `domifaddr`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DhcpLease {
    /// Seconds since the epoch; 0 for an infinite lease.
    pub expiry: u64,
    /// Lower-case `52:54:00:..`.
    pub mac: String,
    pub ip: String,
    /// The prefix of the network's subnet.
    pub prefix: u8,
    pub hostname: Option<String>,
    pub client_id: Option<String>,
}

/// A domain's interfaces with the addresses their networks leased
/// (`domifaddr`, the Domain's `status.interfaces`): each interface's MAC
/// (given, or derived from the UUID), its tap on the network's bridge, and
/// the leased `address/prefix` when there is one.
pub fn interface_addresses(
    net: &dyn NetworkDriver,
    interfaces: &[vireo_crds::Interface],
    uuid: &str,
) -> Vec<vireo_crds::InterfaceStatus> {
    interfaces
        .iter()
        .enumerate()
        .map(|(i, iface)| {
            let mac = crate::bridge::tap::interface_mac(iface, uuid, i);
            let ip = net
                .dhcp_leases(&iface.network)
                .unwrap_or_default()
                .into_iter()
                .find(|l| l.mac.eq_ignore_ascii_case(&mac))
                .map(|l| format!("{}/{}", l.ip, l.prefix));
            vireo_crds::InterfaceStatus {
                name: iface.name.clone(),
                network: iface.network.clone(),
                device: Some(crate::bridge::tap::tap_name(uuid, i)),
                mac,
                ip,
            }
        })
        .collect()
}

/// A network driver. Same defined/active/transient rules as domains.
pub trait NetworkDriver: Send + Sync {
    fn list_networks(&self, filter: ListFilter) -> Result<Vec<NetworkRef>>;
    fn count_networks(&self, filter: ListFilter) -> Result<usize> {
        Ok(self.list_networks(filter)?.len())
    }
    fn lookup_network(&self, key: Lookup<'_>) -> Result<NetworkRef>;
    fn network_definition(&self, name: &str, inactive: bool) -> Result<Network>;
    fn network_info(&self, name: &str) -> Result<NetworkInfo>;
    /// Defines (or redefines) a persistent, inactive network.
    fn define_network(&self, network: &Network) -> Result<NetworkRef>;
    /// Creates and starts a transient network.
    fn create_network(&self, network: &Network) -> Result<NetworkRef>;
    /// Removes the persistent definition; an active network becomes transient.
    fn undefine_network(&self, name: &str) -> Result<()>;
    fn start_network(&self, name: &str) -> Result<()>;
    /// Tears the network down; a transient network disappears.
    fn destroy_network(&self, name: &str) -> Result<()>;
    fn set_network_autostart(&self, name: &str, autostart: bool) -> Result<()>;
    /// The unexpired DHCP leases of an active network.
    fn dhcp_leases(&self, name: &str) -> Result<Vec<DhcpLease>> {
        Err(crate::Error::Unsupported {
            object: crate::error::ObjectName::new(vireo_crds::ObjectKind::Network, name),
            driver: "this",
            operation: "net-dhcp-leases",
        })
    }
}
