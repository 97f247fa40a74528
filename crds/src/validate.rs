//! Checks on a spec that a driver applies before it defines anything, and
//! that the CRD's CEL rules repeat on the API server. Every error names the
//! field, as `kubectl` users see it (`spec.currentMemory`).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use crate::quantity::parse_quantity;
use crate::{DiskBus, DomainSpec, NetworkSpec, StoragePoolSpec, StorageVolSpec};

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

/// The most disks and interfaces a Domain has (the CRD's list limits).
pub const MAX_DISKS: usize = 64;
pub const MAX_INTERFACES: usize = 32;

/// Whether a string is a Kubernetes object name (RFC 1123 DNS subdomain:
/// at most 253 characters of `[a-z0-9.-]`, each dot-separated part
/// starting and ending with a letter or digit).
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// Whether a string is an architecture name as `spec.arch` takes it
/// (`x86_64`, `i686`, `aarch64`, `s390x`, ...).
pub fn is_arch(arch: &str) -> bool {
    !arch.is_empty()
        && arch.len() <= 32
        && arch.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

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

/// Whether a string is a guest disk name (`vda`, `vdb`, ... `vdzz` on
/// virtio; `sda` ... `sdzz` on sata and scsi).
pub fn is_disk_name(name: &str) -> bool {
    let rest = name.strip_prefix("vd").or_else(|| name.strip_prefix("sd"));
    rest.is_some_and(|rest| {
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
        // The CRD's pattern: the hyphenated form only.
        let hyphenated = u.len() == 36
            && u.bytes().enumerate().all(|(i, b)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        if !hyphenated {
            return Err(ValidationError::new(
                field,
                format!("'{u}' is not an RFC 4122 UUID (8-4-4-4-12 hex digits)"),
            ));
        }
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
        if let Some(arch) = &self.arch
            && !is_arch(arch)
        {
            return Err(ValidationError::new(
                "spec.arch",
                format!("'{arch}' is not an architecture name (x86_64, i686, aarch64, ...)"),
            ));
        }
        if self.devices.disks.len() > MAX_DISKS {
            return Err(ValidationError::new(
                "spec.devices.disks",
                format!(
                    "{} disks; a Domain has at most {MAX_DISKS}",
                    self.devices.disks.len()
                ),
            ));
        }
        if self.devices.interfaces.len() > MAX_INTERFACES {
            return Err(ValidationError::new(
                "spec.devices.interfaces",
                format!(
                    "{} interfaces; a Domain has at most {MAX_INTERFACES}",
                    self.devices.interfaces.len()
                ),
            ));
        }
        if let Some(os) = &self.os {
            for (field, volume) in [
                ("spec.os.kernelVolume", &os.kernel_volume),
                ("spec.os.initrdVolume", &os.initrd_volume),
            ] {
                if let Some(v) = volume
                    && !is_dns_subdomain(v)
                {
                    return Err(ValidationError::new(
                        field,
                        format!("'{v}' is not a StorageVol name (lower-case RFC 1123 subdomain)"),
                    ));
                }
            }
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
            if os.secure_boot && os.firmware != Some(crate::Firmware::Efi) {
                return Err(ValidationError::new(
                    "spec.os.secureBoot",
                    "needs spec.os.firmware: efi",
                ));
            }
            if !os.boot.is_empty() && self.devices.disks.iter().any(|d| d.boot_order.is_some()) {
                return Err(ValidationError::new(
                    "spec.os.boot",
                    "give spec.os.boot or per-disk bootOrder, not both (libvirt refuses the mix)",
                ));
            }
            let mut seen = HashSet::new();
            for (i, b) in os.boot.iter().enumerate() {
                if !seen.insert(*b) {
                    return Err(ValidationError::new(
                        format!("spec.os.boot[{i}]"),
                        format!("'{}' is listed twice", b.as_str()),
                    ));
                }
            }
        }
        if let Some(ci) = &self.cloud_init {
            for (name, inline, from) in [
                ("userData", &ci.user_data, ci.user_data_from.is_some()),
                ("metaData", &ci.meta_data, ci.meta_data_from.is_some()),
                (
                    "networkConfig",
                    &ci.network_config,
                    ci.network_config_from.is_some(),
                ),
            ] {
                if inline.is_some() && from {
                    return Err(ValidationError::new(
                        format!("spec.cloudInit.{name}From"),
                        format!("give {name} or {name}From, not both"),
                    ));
                }
                if inline.as_ref().is_some_and(|t| t.len() > 65536) {
                    return Err(ValidationError::new(
                        format!("spec.cloudInit.{name}"),
                        "at most 64 KiB inline; larger documents go in a Secret (its own limit is 1 MiB)",
                    ));
                }
            }
            for (name, from) in [
                ("userDataFrom", &ci.user_data_from),
                ("metaDataFrom", &ci.meta_data_from),
                ("networkConfigFrom", &ci.network_config_from),
            ] {
                if let Some(f) = from
                    && f.secret_key_ref.is_some() == f.config_map_key_ref.is_some()
                {
                    return Err(ValidationError::new(
                        format!("spec.cloudInit.{name}"),
                        "give exactly one of secretKeyRef, configMapKeyRef",
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
                format!("must be between 1 and {MAX_VCPUS} (got {})", self.vcpus),
            ));
        }
        if let Some(max) = self.max_vcpus
            && (max < self.vcpus || max > MAX_VCPUS)
        {
            return Err(ValidationError::new(
                "spec.maxVcpus",
                format!("must be between spec.vcpus and {MAX_VCPUS} (got {max})"),
            ));
        }
        let mut names = HashSet::new();
        let mut orders = HashSet::new();
        for (i, disk) in self.devices.disks.iter().enumerate() {
            if !is_disk_name(&disk.name) {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].name"),
                    format!(
                        "'{}' is not a disk name (vda, vdb, ... on virtio; sda, sdb, ... on sata and scsi)",
                        disk.name
                    ),
                ));
            }
            let prefix = if disk.bus == DiskBus::Virtio {
                "vd"
            } else {
                "sd"
            };
            if !disk.name.starts_with(prefix) {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].name"),
                    format!(
                        "'{}' is not a {} disk name ({prefix}a, {prefix}b, ...)",
                        disk.name,
                        disk.bus.as_str()
                    ),
                ));
            }
            if disk.device == crate::DiskDevice::Cdrom && disk.bus == DiskBus::Virtio {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].bus"),
                    "a CD-ROM is on bus sata or scsi, not virtio",
                ));
            }
            if let Some(order) = disk.boot_order
                && (order == 0 || !orders.insert(order))
            {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].bootOrder"),
                    format!("{order} must be above zero and used by one disk only"),
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
            if disk.boot_order.is_some_and(|o| o > 255) {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].bootOrder"),
                    "must be at most 255",
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
            if !is_dns_subdomain(&disk.volume) {
                return Err(ValidationError::new(
                    format!("spec.devices.disks[{i}].volume"),
                    format!(
                        "'{}' is not a StorageVol name (lower-case RFC 1123 subdomain)",
                        disk.volume
                    ),
                ));
            }
        }
        if let Some(os) = &self.os {
            for (field, path) in [
                ("spec.os.kernel", &os.kernel),
                ("spec.os.initrd", &os.initrd),
            ] {
                if let Some(p) = path
                    && (!p.starts_with('/') || p.split('/').any(|c| c == "..") || p.len() > 4096)
                {
                    return Err(ValidationError::new(
                        field,
                        format!(
                            "'{}' must be an absolute path without '..' (at most 4096 bytes)",
                            p.chars().take(256).collect::<String>()
                        ),
                    ));
                }
            }
            if let Some(c) = &os.cmdline
                && c.len() > 4096
            {
                return Err(ValidationError::new(
                    "spec.os.cmdline",
                    format!("{} bytes; a kernel command line has at most 4096", c.len()),
                ));
            }
        }
        let mut names = HashSet::new();
        let mut macs = HashSet::new();
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
            if !is_dns_subdomain(&nic.network) {
                return Err(ValidationError::new(
                    format!("spec.devices.interfaces[{i}].network"),
                    format!(
                        "'{}' is not a Network name: an interface joins a Network of the Domain's own namespace, by its plain name",
                        nic.network
                    ),
                ));
            }
            if let Some(mac) = &nic.mac {
                if !is_unicast_mac(mac) {
                    return Err(ValidationError::new(
                        format!("spec.devices.interfaces[{i}].mac"),
                        format!("'{mac}' is not a unicast MAC address"),
                    ));
                }
                if !macs.insert(mac.to_ascii_lowercase()) {
                    return Err(ValidationError::new(
                        format!("spec.devices.interfaces[{i}].mac"),
                        format!("'{mac}' is used by two interfaces"),
                    ));
                }
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
        let mut macs = HashSet::new();
        for (i, host) in dhcp.hosts.iter().enumerate() {
            if !macs.insert(host.mac.to_ascii_lowercase()) {
                return Err(ValidationError::new(
                    format!("spec.ip.dhcp.hosts[{i}].mac"),
                    format!("'{}' is given two fixed addresses", host.mac),
                ));
            }
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
            if let Some(c) = &src.clone
                && !is_dns_subdomain(&c.volume)
            {
                return Err(ValidationError::new(
                    "spec.source.clone.volume",
                    format!(
                        "'{}' is not a StorageVol name: a clone's source is a volume of the same pool, by its plain name",
                        c.volume
                    ),
                ));
            }
            if let Some(u) = &src.url
                && !(u.url.starts_with("http://") || u.url.starts_with("https://"))
            {
                return Err(ValidationError::new(
                    "spec.source.url.url",
                    format!("'{}' is not an http:// or https:// address", u.url),
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
            arch: None,
            uuid: None,
            memory: Quantity("1Gi".into()),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: None,
            devices: Default::default(),
            cloud_init: None,
            run_strategy: Default::default(),
            lifecycle: Default::default(),
            node_selector: None,
            eviction_strategy: None,
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
                ..Default::default()
            },
            Disk {
                name: "sda".into(),
                volume: "b".into(),
                ..Default::default()
            },
        ];
        assert_eq!(field_of(d.validate()), "spec.devices.disks[1].name");
        let mut d = domain();
        d.devices.disks = vec![Disk {
            name: "vda".into(),
            volume: "other-ns/data".into(),
            ..Default::default()
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
    fn firmware_boot_order_and_buses_name_the_field() {
        use crate::{BootDevice, DiskBus, DiskDevice, Firmware};
        let disk = |name: &str, bus: DiskBus| Disk {
            name: name.into(),
            volume: "v".into(),
            bus,
            ..Default::default()
        };
        let mut d = domain();
        d.os = Some(crate::OsSpec {
            firmware: Some(Firmware::Efi),
            boot: vec![BootDevice::Cdrom, BootDevice::Hd],
            ..Default::default()
        });
        d.devices.disks = vec![
            disk("sda", DiskBus::Sata),
            Disk {
                device: DiskDevice::Cdrom,
                ..disk("sdb", DiskBus::Scsi)
            },
            disk("vda", DiskBus::Virtio),
        ];
        assert_eq!(d.validate(), Ok(()));
        // Both kinds of boot order: libvirt refuses the mix.
        let mut both = d.clone();
        both.devices.disks[0].boot_order = Some(1);
        assert_eq!(field_of(both.validate()), "spec.os.boot");
        let mut twice = d.clone();
        if let Some(os) = twice.os.as_mut() {
            os.boot = vec![BootDevice::Hd, BootDevice::Hd];
        }
        assert_eq!(field_of(twice.validate()), "spec.os.boot[1]");
        // Per-disk orders: unique.
        let mut orders = d.clone();
        if let Some(os) = orders.os.as_mut() {
            os.boot.clear();
        }
        orders.devices.disks[0].boot_order = Some(2);
        orders.devices.disks[1].boot_order = Some(1);
        assert_eq!(orders.validate(), Ok(()));
        orders.devices.disks[2].boot_order = Some(1);
        assert_eq!(
            field_of(orders.validate()),
            "spec.devices.disks[2].bootOrder"
        );
        // A disk's name follows its bus.
        let mut named = d.clone();
        named.devices.disks[2].bus = DiskBus::Scsi;
        let e = named.validate().expect_err("vda on scsi");
        assert_eq!(e.field, "spec.devices.disks[2].name");
        assert!(e.message.contains("scsi"), "{e}");
        named.devices.disks[2].bus = DiskBus::Virtio;
        named.devices.disks[0].bus = DiskBus::Virtio;
        assert_eq!(field_of(named.validate()), "spec.devices.disks[0].name");
        // A CD-ROM needs a bus with removable media.
        let mut cd = d.clone();
        cd.devices.disks[2].device = DiskDevice::Cdrom;
        assert_eq!(field_of(cd.validate()), "spec.devices.disks[2].bus");
        // Secure boot is UEFI's.
        let mut sb = d.clone();
        if let Some(os) = sb.os.as_mut() {
            os.secure_boot = true;
        }
        assert_eq!(sb.validate(), Ok(()));
        if let Some(os) = sb.os.as_mut() {
            os.firmware = Some(Firmware::Bios);
        }
        assert_eq!(field_of(sb.validate()), "spec.os.secureBoot");
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
                && is_disk_name("sdb")
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
