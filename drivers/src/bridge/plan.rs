//! What a Network definition asks of the node: the bridge, the subnet, the
//! forwarding and the DHCP service, checked and in typed form.

use std::net::Ipv4Addr;

use vireo_crds::{ForwardMode, Network};

/// An IPv4 subnet with the host's address in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The bridge's (gateway's) address.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        };
        Ipv4Addr::from(bits)
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & u32::from(self.mask()))
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !u32::from(self.mask()))
    }
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & u32::from(self.mask()) == u32::from(self.network())
    }
    /// `10.0.0.0/24`
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network(), self.prefix)
    }
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let p = self.prefix.min(other.prefix);
        let shorter = Subnet {
            gateway: self.gateway,
            prefix: p,
        };
        shorter.contains(other.gateway)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticHost {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dhcp {
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub hosts: Vec<StaticHost>,
}

/// A checked network definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: ForwardMode,
    pub bridge: String,
    pub subnet: Option<Subnet>,
    pub dhcp: Option<Dhcp>,
}

fn addr(field: &str, text: &str) -> Result<Ipv4Addr, String> {
    text.parse::<Ipv4Addr>()
        .map_err(|_| format!("{field}: '{text}' is not an IPv4 address"))
}

/// Checks `def` (whose `spec.bridge` is already set) and types it. The
/// message names the field.
pub fn plan(def: &Network) -> Result<Plan, String> {
    let spec = &def.spec;
    let bridge = spec
        .bridge
        .clone()
        .ok_or("spec.bridge: the driver gives every network a bridge name")?;
    if !super::tap::valid_ifname(&bridge) {
        return Err(format!(
            "spec.bridge: '{bridge}' is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
        ));
    }
    // A bridge Vireo creates is named in nft rules and dnsmasq's
    // configuration: keep to characters neither can misread.
    if spec.forward_mode != ForwardMode::Bridge
        && !bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "spec.bridge: '{bridge}': a bridge Vireo creates is named with letters, digits, '-', '_' and '.' only"
        ));
    }
    if spec.forward_mode == ForwardMode::Bridge {
        if spec.ip.is_some() {
            return Err(
                "spec.ip: a network in bridge mode uses the host bridge's own addressing; remove spec.ip"
                    .into(),
            );
        }
        return Ok(Plan {
            mode: spec.forward_mode,
            bridge,
            subnet: None,
            dhcp: None,
        });
    }
    let Some(ip) = &spec.ip else {
        return Ok(Plan {
            mode: spec.forward_mode,
            bridge,
            subnet: None,
            dhcp: None,
        });
    };
    let gateway = addr("spec.ip.address", &ip.address)?;
    if !(1..=30).contains(&ip.prefix) {
        return Err(format!(
            "spec.ip.prefix: {} is not between 1 and 30",
            ip.prefix
        ));
    }
    let subnet = Subnet {
        gateway,
        prefix: ip.prefix,
    };
    if gateway == subnet.network() || gateway == subnet.broadcast() {
        return Err(format!(
            "spec.ip.address: {gateway} is the network or broadcast address of {}",
            subnet.cidr()
        ));
    }
    let dhcp = match &ip.dhcp {
        None => None,
        Some(d) => {
            let mut out = Dhcp::default();
            for (i, r) in d.ranges.iter().enumerate() {
                let start = addr(&format!("spec.ip.dhcp.ranges[{i}].start"), &r.start)?;
                let end = addr(&format!("spec.ip.dhcp.ranges[{i}].end"), &r.end)?;
                if !subnet.contains(start) || !subnet.contains(end) {
                    return Err(format!(
                        "spec.ip.dhcp.ranges[{i}]: {start}-{end} is not inside {}",
                        subnet.cidr()
                    ));
                }
                if u32::from(start) > u32::from(end) {
                    return Err(format!(
                        "spec.ip.dhcp.ranges[{i}]: start {start} is after end {end}"
                    ));
                }
                if (u32::from(start)..=u32::from(end)).contains(&u32::from(gateway)) {
                    return Err(format!(
                        "spec.ip.dhcp.ranges[{i}]: {start}-{end} contains the network's own address {gateway}"
                    ));
                }
                out.ranges.push((start, end));
            }
            for (i, h) in d.hosts.iter().enumerate() {
                let ip = addr(&format!("spec.ip.dhcp.hosts[{i}].ip"), &h.ip)?;
                if !subnet.contains(ip) || ip == gateway {
                    return Err(format!(
                        "spec.ip.dhcp.hosts[{i}].ip: {ip} is not a free address of {}",
                        subnet.cidr()
                    ));
                }
                let mac = h.mac.to_ascii_lowercase();
                if !valid_mac(&mac) {
                    return Err(format!(
                        "spec.ip.dhcp.hosts[{i}].mac: '{}' is not a unicast MAC address",
                        h.mac
                    ));
                }
                if let Some(name) = &h.name
                    && (name.is_empty()
                        || name.len() > 63
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                {
                    return Err(format!(
                        "spec.ip.dhcp.hosts[{i}].name: '{name}' is not a host name (letters, digits, '-')"
                    ));
                }
                out.hosts.push(StaticHost {
                    mac,
                    ip,
                    name: h.name.clone(),
                });
            }
            Some(out)
        }
    };
    Ok(Plan {
        mode: spec.forward_mode,
        bridge,
        subnet: Some(subnet),
        dhcp,
    })
}

/// `52:54:00:ab:cd:ef`: six hex pairs, unicast.
pub fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s = Subnet {
            gateway: Ipv4Addr::new(10, 1, 2, 1),
            prefix: 24,
        };
        assert_eq!(s.cidr(), "10.1.2.0/24");
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 1, 2, 255));
        assert!(s.contains(Ipv4Addr::new(10, 1, 2, 200)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 3, 1)));
        let wide = Subnet {
            gateway: Ipv4Addr::new(10, 1, 0, 1),
            prefix: 16,
        };
        assert!(s.overlaps(&wide) && wide.overlaps(&s));
        let other = Subnet {
            gateway: Ipv4Addr::new(10, 1, 3, 1),
            prefix: 24,
        };
        assert!(!s.overlaps(&other));
    }

    fn net(mode: ForwardMode, bridge: &str) -> Network {
        Network::new(
            "n",
            vireo_crds::NetworkSpec {
                uuid: None,
                forward_mode: mode,
                bridge: Some(bridge.into()),
                ip: Some(vireo_crds::network::IpSpec {
                    address: "10.5.0.1".into(),
                    prefix: 24,
                    dhcp: Some(vireo_crds::network::DhcpSpec {
                        ranges: vec![vireo_crds::network::DhcpRange {
                            start: "10.5.0.10".into(),
                            end: "10.5.0.20".into(),
                        }],
                        hosts: Vec::new(),
                    }),
                }),
                autostart: false,
                active: None,
                node_selector: None,
            },
        )
    }

    #[test]
    fn plans_are_checked() {
        let p = plan(&net(ForwardMode::Nat, "vireo0")).expect("a plan");
        assert_eq!(p.subnet.map(|s| s.cidr()).as_deref(), Some("10.5.0.0/24"));
        assert!(plan(&net(ForwardMode::Nat, "br\"x")).is_err());
        assert!(plan(&net(ForwardMode::Isolated, "a;b")).is_err());
        let mut bad = net(ForwardMode::Nat, "vireo0");
        if let Some(ip) = bad.spec.ip.as_mut() {
            ip.address = "10.5.0.0".into();
        }
        assert!(plan(&bad).is_err(), "the network address is not a host's");
        let mut outside = net(ForwardMode::Nat, "vireo0");
        if let Some(d) = outside.spec.ip.as_mut().and_then(|i| i.dhcp.as_mut()) {
            d.ranges[0].end = "10.6.0.1".into();
        }
        assert!(plan(&outside).is_err(), "a range outside the subnet");
        assert!(
            plan(&net(ForwardMode::Bridge, "br0")).is_err(),
            "bridge mode takes no address"
        );
    }

    #[test]
    fn macs() {
        assert!(valid_mac("52:54:00:12:34:56"));
        assert!(!valid_mac("01:00:5e:00:00:01"));
        assert!(!valid_mac("52:54:00:12:34"));
        assert!(!valid_mac("52:54:00:12:34:zz"));
    }
}
