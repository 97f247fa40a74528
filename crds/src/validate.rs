//! Checks on a spec that a driver applies before it defines anything, and
//! that the CRD's CEL rules repeat on the API server. Every error names the
//! field, as `kubectl` users see it (`spec.currentMemory`).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use crate::quantity::parse_quantity;
use crate::{DomainSpec, NetworkSpec, StoragePoolSpec, StorageVolSpec};

/// A spec that cannot be used, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// JSON path of the field, `spec.devices.disks[1].name`.
    pub field: String,
    pub message: String,
}

impl ValidationError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A spec that can check itself.
pub trait Validate {
    fn validate(&self) -> Result<(), ValidationError>;
}

/// The largest vCPU count a Domain may ask for (KVM's usual limit).
pub const MAX_VCPUS: u32 = 255;

/// Whether a string is a usable Linux network device name (at most 15
/// bytes, no `/`, whitespace or `:`, not `.` or `..`).
pub fn is_device_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Whether a string is a guest disk name (`vda`, `vdb`, ... `vdzz`).
pub fn is_disk_name(name: &str) -> bool {
    name.strip_prefix("vd").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 2 && rest.bytes().all(|b| b.is_ascii_lowercase())
    })
}

/// Whether a string is a unicast MAC address `52:54:00:12:34:56`.
pub fn is_unicast_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

fn check_uuid(field: &str, uuid: &Option<String>) -> Result<(), ValidationError> {
    if let Some(u) = uuid {
        uuid::Uuid::parse_str(u)
            .map_err(|_| ValidationError::new(field, format!("'{u}' is not an RFC 4122 UUID")))?;
    }
    Ok(())
}

fn positive_size(
    field: &str,
    q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity,
) -> Result<u64, ValidationError> {
    let bytes = parse_quantity(q).map_err(|e| ValidationError::new(field, e.to_string()))?;
    if bytes == 0 {
        return Err(ValidationError::new(field, "must be greater than zero"));
    }
    Ok(bytes)
}

impl Validate for DomainSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_uuid("spec.uuid", &self.uuid)?;
        if let Some(os) = &self.os {
            for (field, path, volume) in [
                ("spec.os.kernelVolume", &os.kernel, &os.kernel_volume),
                ("spec.os.initrdVolume", &os.initrd, &os.initrd_volume),
            ] {
                if path.is_some() && volume.is_some() {
                    return Err(ValidationError::new(
                        field,
                        "give the path or the volume, not both",
                    ));
                }
            }
        }
        let memory = positive_size("spec.memory", &self.memory)?;
        if let Some(current) = &self.current_memory {
            let current = positive_size("spec.currentMemory", current)?;
            if current > memory {
                return Err(ValidationError::new(
                    "spec.currentMemory",
                    "must not be greater than spec.memory",
                ));
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ValidationError::new(
                "spec.vcpus",
                format!("must be between 1 and {MAX_VCPUS}"),
            ));
        }
        if let Some(max) = self.max_vcpus
            && (max < self.vcpus || max > MAX_VCPUS)
        {
            return Err(ValidationError::new(
                "spec.maxVcpus",
                format!("must be between spec.vcpus and {MAX_VCPUS}"),
            ));
        }
        let mut names = HashSet::new();
        for (i, disk) in self.devices.disks.iter().enumerate() {
            if !is_disk_name(&disk.name) {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].name"),
                    format!("'{}' is not a disk name (vda, vdb, ...)", disk.name),
                ));
            }
            if !names.insert(disk.name.as_str()) {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].name"),
                    format!("'{}' is used by two disks", disk.name),
                ));
            }
            if disk.volume.is_empty() {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].volume"),
                    "must name a StorageVol",
                ));
            }
            if disk.volume.contains('/') {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].volume"),
                    format!(
                        "'{}' is not a volume name: a disk names a StorageVol of the Domain's own namespace, not a path or another namespace",
                        disk.volume
                    ),
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, nic) in self.devices.interfaces.iter().enumerate() {
            if !is_device_name(&nic.name) {
                return Err(ValidationError::new(
                    format!("spec.devices.interfaces[{i}].name"),
                    format!("'{}' is not a valid device name", nic.name),
                ));
            }
            if !names.insert(nic.name.as_str()) {
                return Err(ValidationError::new(
                    format!("spec.devices.interfaces[{i}].name"),
                    format!("'{}' is used by two interfaces", nic.name),
                ));
            }
            if nic.network.is_empty() {
                return Err(ValidationError::new(
                    format!("spec.devices.interfaces[{i}].network"),
                    "must name a Network",
                ));
            }
            if let Some(mac) = &nic.mac
                && !is_unicast_mac(mac)
            {
                return Err(ValidationError::new(
                    format!("spec.devices.interfaces[{i}].mac"),
                    format!("'{mac}' is not a unicast MAC address"),
                ));
            }
        }
        Ok(())
    }
}

fn parse_ip(field: &str, s: &str) -> Result<Ipv4Addr, ValidationError> {
    s.parse()
        .map_err(|_| ValidationError::new(field, format!("'{s}' is not an IPv4 address")))
}

impl Validate for NetworkSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_uuid("spec.uuid", &self.uuid)?;
        if let Some(bridge) = &self.bridge
            && !is_device_name(bridge)
        {
            return Err(ValidationError::new(
                "spec.bridge",
                format!(
                    "'{bridge}' is not a valid device name (at most 15 characters, no '/', ':' or spaces)"
                ),
            ));
        }
        if self.forward_mode == crate::ForwardMode::Bridge && self.bridge.is_none() {
            return Err(ValidationError::new(
                "spec.bridge",
                "is required when spec.forwardMode is bridge",
            ));
        }
        let Some(ip) = &self.ip else { return Ok(()) };
        let address = parse_ip("spec.ip.address", &ip.address)?;
        if ip.prefix == 0 || ip.prefix > 30 {
            return Err(ValidationError::new(
                "spec.ip.prefix",
                "must be between 1 and 30",
            ));
        }
        let mask = u32::MAX << (32 - u32::from(ip.prefix));
        let net = u32::from(address) & mask;
        let inside = |a: Ipv4Addr| u32::from(a) & mask == net;
        let Some(dhcp) = &ip.dhcp else { return Ok(()) };
        for (i, range) in dhcp.ranges.iter().enumerate() {
            let start = parse_ip(&format!("spec.ip.dhcp.ranges[{i}].start"), &range.start)?;
            let end = parse_ip(&format!("spec.ip.dhcp.ranges[{i}].end"), &range.end)?;
            for (which, a) in [("start", start), ("end", end)] {
                if !inside(a) {
                    return Err(ValidationError::new(
                        format!("spec.ip.dhcp.ranges[{i}].{which}"),
                        format!(
                            "{a} is outside the network {}/{}",
                            Ipv4Addr::from(net),
                            ip.prefix
                        ),
                    ));
                }
            }
            if u32::from(start) > u32::from(end) {
                return Err(ValidationError::new(
                    format!("spec.ip.dhcp.ranges[{i}]"),
                    "start must not be after end",
                ));
            }
        }
        for (i, host) in dhcp.hosts.iter().enumerate() {
            let a = parse_ip(&format!("spec.ip.dhcp.hosts[{i}].ip"), &host.ip)?;
            if !inside(a) {
                return Err(ValidationError::new(
                    format!("spec.ip.dhcp.hosts[{i}].ip"),
                    format!(
                        "{a} is outside the network {}/{}",
                        Ipv4Addr::from(net),
                        ip.prefix
                    ),
                ));
            }
            if !is_unicast_mac(&host.mac) {
                return Err(ValidationError::new(
                    format!("spec.ip.dhcp.hosts[{i}].mac"),
                    format!("'{}' is not a unicast MAC address", host.mac),
                ));
            }
        }
        Ok(())
    }
}

impl Validate for StoragePoolSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_uuid("spec.uuid", &self.uuid)?;
        if !self.path.starts_with('/') || self.path.split('/').any(|c| c == "..") {
            return Err(ValidationError::new(
                "spec.path",
                format!("'{}' must be an absolute path without '..'", self.path),
            ));
        }
        Ok(())
    }
}

impl Validate for StorageVolSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.pool.is_empty() {
            return Err(ValidationError::new("spec.pool", "must name a StoragePool"));
        }
        let capacity = positive_size("spec.capacity", &self.capacity)?;
        if let Some(a) = &self.allocation {
            let a = parse_quantity(a)
                .map_err(|e| ValidationError::new("spec.allocation", e.to_string()))?;
            if a > capacity {
                return Err(ValidationError::new(
                    "spec.allocation",
                    "must not be greater than spec.capacity",
                ));
            }
        }
        if let Some(src) = &self.source {
            let set = [
                src.blank.is_some(),
                src.clone.is_some(),
                src.upload.is_some(),
                src.url.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                return Err(ValidationError::new(
                    "spec.source",
                    "exactly one of blank, clone, upload, url must be set",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DhcpRange, DhcpSpec, Disk, DomainType, IpSpec};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn domain() -> DomainSpec {
        DomainSpec {
            domain_type: DomainType::Test,
            uuid: None,
            memory: Quantity("1Gi".into()),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: None,
            devices: Default::default(),
            run_strategy: Default::default(),
            lifecycle: Default::default(),
            node_selector: None,
        }
    }

    fn field_of(r: Result<(), ValidationError>) -> String {
        r.expect_err("should be refused").field
    }

    #[test]
    fn domain_rules_name_the_field() {
        assert_eq!(domain().validate(), Ok(()));
        let mut d = domain();
        d.current_memory = Some(Quantity("2Gi".into()));
        assert_eq!(field_of(d.validate()), "spec.currentMemory");
        let mut d = domain();
        d.memory = Quantity("0".into());
        assert_eq!(field_of(d.validate()), "spec.memory");
        let mut d = domain();
        d.vcpus = 0;
        assert_eq!(field_of(d.validate()), "spec.vcpus");
        let mut d = domain();
        d.uuid = Some("not-a-uuid".into());
        assert_eq!(field_of(d.validate()), "spec.uuid");
        let mut d = domain();
        d.devices.disks = vec![
            Disk {
                name: "vda".into(),
                volume: "a".into(),
                read_only: false,
            },
            Disk {
                name: "sda".into(),
                volume: "b".into(),
                read_only: false,
            },
        ];
        assert_eq!(field_of(d.validate()), "spec.devices.disks[1].name");
        let mut d = domain();
        d.devices.disks = vec![Disk {
            name: "vda".into(),
            volume: "other-ns/data".into(),
            read_only: false,
        }];
        assert_eq!(field_of(d.validate()), "spec.devices.disks[0].volume");
        let mut d = domain();
        d.os = Some(crate::OsSpec {
            kernel: Some("/boot/vmlinuz".into()),
            kernel_volume: Some("k".into()),
            ..Default::default()
        });
        assert_eq!(field_of(d.validate()), "spec.os.kernelVolume");
    }

    #[test]
    fn dhcp_ranges_stay_in_the_subnet() {
        let mut n = NetworkSpec {
            uuid: None,
            forward_mode: Default::default(),
            bridge: Some("virbr9".into()),
            ip: Some(IpSpec {
                address: "10.0.0.1".into(),
                prefix: 24,
                dhcp: Some(DhcpSpec {
                    ranges: vec![DhcpRange {
                        start: "10.0.0.2".into(),
                        end: "10.0.0.254".into(),
                    }],
                    hosts: vec![],
                }),
            }),
            autostart: false,
            active: None,
            node_selector: None,
        };
        assert_eq!(n.validate(), Ok(()));
        if let Some(ip) = n.ip.as_mut()
            && let Some(d) = ip.dhcp.as_mut()
        {
            d.ranges[0].end = "10.0.1.3".into();
        }
        assert_eq!(field_of(n.validate()), "spec.ip.dhcp.ranges[0].end");
        n.bridge = Some("a-name-that-is-far-too-long".into());
        assert_eq!(field_of(n.validate()), "spec.bridge");
    }

    #[test]
    fn names_and_macs() {
        assert!(
            is_disk_name("vda")
                && is_disk_name("vdaa")
                && !is_disk_name("vd")
                && !is_disk_name("hda")
        );
        assert!(
            is_device_name("virbr0")
                && !is_device_name("a/b")
                && !is_device_name("0123456789abcdef")
        );
        assert!(
            is_unicast_mac("52:54:00:ab:cd:ef")
                && !is_unicast_mac("01:00:5e:00:00:01")
                && !is_unicast_mac("52:54:00")
        );
    }
}
