//! libvirt's XML descriptions, to and from Vireo manifests, for users who
//! migrate from libvirt: `virsh dumpxml` output becomes a Domain, Network,
//! StoragePool or StorageVol (`vireo import-xml`, or `vireo define -f
//! FILE.xml` directly), and `vireo dumpxml` writes XML that `virsh define`
//! accepts.
//!
//! The mapping keeps what Vireo models (type, name, UUID, memory, vCPUs,
//! direct kernel boot, lifecycle actions, virtio disks on volumes, network
//! interfaces, serial console; a network's forward mode, bridge, address
//! and DHCP; a dir pool's path; a volume's size and format) and reports
//! everything else it meets as a note, so nothing is dropped silently.

use std::fmt::Write as _;

use quick_xml::events::{BytesStart, Event};

use crate::quantity::{format_bytes, parse_quantity};
use crate::{
    DhcpHost, DhcpRange, DhcpSpec, Disk, Domain, DomainDevices, DomainSpec, DomainType,
    ForwardMode, Interface, IpSpec, Lifecycle, LifecycleAction, Manifest, Network, NetworkSpec,
    OsSpec, PoolType, RunStrategy, SerialSpec, StoragePool, StoragePoolSpec, StorageVol,
    StorageVolSpec, VolFormat,
};

/// Why an XML description could not become a manifest.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed XML: {0}")]
    Syntax(String),
    #[error("<{0}> is not a libvirt description Vireo imports (domain, network, pool, volume)")]
    UnknownRoot(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn invalid(path: &str, message: impl Into<String>) -> XmlError {
    XmlError::Invalid {
        path: path.to_string(),
        message: message.into(),
    }
}

/// A manifest made from XML, with what the XML said that Vireo does not
/// model (or models differently).
#[derive(Debug, Clone)]
pub struct Imported {
    pub manifest: Manifest,
    pub notes: Vec<String>,
}

/// What the XML alone does not say.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The pool of a `<volume>` (its XML does not name one).
    pub pool: Option<String>,
}

/// Whether a text looks like XML rather than YAML (its first character
/// that is not white space is `<`).
pub fn looks_like_xml(text: &str) -> bool {
    text.trim_start().starts_with('<')
}

/// An element: its name, attributes, children and text.
#[derive(Debug, Default)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
}

impl Element {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
    fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
    fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }
}

fn start_element(e: &BytesStart<'_>) -> Result<Element, XmlError> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| XmlError::Syntax(err.to_string()))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a
            .unescape_value()
            .map_err(|err| XmlError::Syntax(err.to_string()))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        ..Default::default()
    })
}

/// Parses a document into its root element.
fn parse(xml: &str) -> Result<Element, XmlError> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| XmlError::Syntax(format!("at byte {}: {e}", reader.buffer_position())))?;
        match event {
            Event::Start(e) => stack.push(start_element(&e)?),
            Event::Empty(e) => {
                let el = start_element(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| XmlError::Syntax("an end tag without a start".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(el) = stack.last_mut() {
                    let text = t
                        .decode()
                        .map_err(|e| XmlError::Syntax(e.to_string()))?
                        .into_owned();
                    let text = quick_xml::escape::unescape(&text)
                        .map_err(|e| XmlError::Syntax(e.to_string()))?
                        .into_owned();
                    el.text.push_str(&text);
                }
            }
            Event::GeneralRef(r) => {
                if let Some(el) = stack.last_mut() {
                    let name = r.decode().map_err(|e| XmlError::Syntax(e.to_string()))?;
                    let entity = format!("&{name};");
                    let text = quick_xml::escape::unescape(&entity)
                        .map_err(|e| XmlError::Syntax(e.to_string()))?;
                    el.text.push_str(&text);
                }
            }
            Event::CData(t) => {
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Syntax(format!(
            "<{}> is not closed",
            stack.last().map(|e| e.name.as_str()).unwrap_or_default()
        )));
    }
    root.ok_or_else(|| XmlError::Syntax("no element".into()))
}

/// libvirt's scaled integers (`<memory unit='KiB'>1048576</memory>`), in bytes.
fn scaled(el: &Element, path: &str, default_unit: &str) -> Result<u64, XmlError> {
    let value: u64 = el
        .text
        .trim()
        .parse()
        .map_err(|_| invalid(path, format!("'{}' is not a whole number", el.text.trim())))?;
    let unit = el.attr("unit").unwrap_or(default_unit);
    let factor: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(invalid(
                path,
                format!("unit '{other}' is not one libvirt knows"),
            ));
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| invalid(path, "too large"))
}

fn lifecycle_action(text: &str, path: &str, notes: &mut Vec<String>) -> LifecycleAction {
    match text {
        "destroy" => LifecycleAction::Destroy,
        "restart" => LifecycleAction::Restart,
        "preserve" => LifecycleAction::Preserve,
        "rename-restart" => {
            notes.push(format!("{path}: rename-restart taken as restart"));
            LifecycleAction::Restart
        }
        "coredump-destroy" => {
            notes.push(format!(
                "{path}: coredump-destroy taken as destroy (no core dump)"
            ));
            LifecycleAction::Destroy
        }
        "coredump-restart" => {
            notes.push(format!(
                "{path}: coredump-restart taken as restart (no core dump)"
            ));
            LifecycleAction::Restart
        }
        other => {
            notes.push(format!(
                "{path}: '{other}' is not an action Vireo has; destroy"
            ));
            LifecycleAction::Destroy
        }
    }
}

/// The last path component of a file, as a volume name.
fn volume_name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base
        .strip_suffix(".qcow2")
        .or_else(|| base.strip_suffix(".img"))
        .or_else(|| base.strip_suffix(".raw"))
        .unwrap_or(base);
    let mut name: String = stem
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    if name.is_empty() { "disk".into() } else { name }
}

fn domain_from(root: &Element) -> Result<Imported, XmlError> {
    let mut notes = Vec::new();
    let domain_type = match root.attr("type") {
        Some("kvm") => DomainType::Kvm,
        Some("qemu") => DomainType::Qemu,
        Some("test") => DomainType::Test,
        Some(other) => {
            return Err(invalid(
                "domain/@type",
                format!("'{other}' is not a Vireo domain type (kvm, qemu, test)"),
            ));
        }
        None => return Err(invalid("domain/@type", "missing")),
    };
    let name = root
        .child_text("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("domain/name", "missing"))?
        .to_string();
    let memory = root
        .child("memory")
        .map(|m| scaled(m, "domain/memory", "KiB"))
        .transpose()?
        .ok_or_else(|| invalid("domain/memory", "missing"))?;
    let current = root
        .child("currentMemory")
        .map(|m| scaled(m, "domain/currentMemory", "KiB"))
        .transpose()?;
    let vcpu = root.child("vcpu");
    let max_vcpus: u32 =
        match vcpu {
            Some(v) => v.text.trim().parse().map_err(|_| {
                invalid("domain/vcpu", format!("'{}' is not a count", v.text.trim()))
            })?,
            None => 1,
        };
    let current_vcpus: Option<u32> = vcpu
        .and_then(|v| v.attr("current"))
        .map(|c| {
            c.parse()
                .map_err(|_| invalid("domain/vcpu/@current", format!("'{c}' is not a count")))
        })
        .transpose()?;
    let os = root.child("os").map(|os| {
        let machine = os.child("type").and_then(|t| t.attr("machine")).map(|m| {
            // pc-q35-8.2 and friends: the machine family is what the qemu
            // driver takes.
            if m.contains("q35") {
                "q35".to_string()
            } else if m.contains("microvm") {
                "microvm".to_string()
            } else {
                notes.push(format!(
                    "domain/os/type/@machine: '{m}' taken as the default machine"
                ));
                String::new()
            }
        });
        for skipped in ["loader", "nvram", "boot", "bootmenu", "smbios"] {
            if os.child(skipped).is_some() {
                notes.push(format!(
                    "domain/os/{skipped}: not modelled (Vireo boots a kernel directly)"
                ));
            }
        }
        OsSpec {
            machine: machine.filter(|m| !m.is_empty()),
            kernel: os.child_text("kernel").map(str::to_string),
            initrd: os.child_text("initrd").map(str::to_string),
            cmdline: os.child_text("cmdline").map(str::to_string),
            ..Default::default()
        }
    });
    let mut lifecycle = Lifecycle::default();
    for (tag, slot) in [
        ("on_poweroff", &mut lifecycle.on_poweroff),
        ("on_reboot", &mut lifecycle.on_reboot),
        ("on_crash", &mut lifecycle.on_crash),
    ] {
        if let Some(t) = root.child_text(tag) {
            *slot = lifecycle_action(t, &format!("domain/{tag}"), &mut notes);
        }
    }
    let mut devices = DomainDevices::default();
    if let Some(devs) = root.child("devices") {
        for (i, d) in devs.children.iter().enumerate() {
            let path = format!("domain/devices/{}[{i}]", d.name);
            match d.name.as_str() {
                "disk" => {
                    let device = d.attr("device").unwrap_or("disk");
                    if device != "disk" {
                        notes.push(format!("{path}: a {device} is not modelled; skipped"));
                        continue;
                    }
                    let source = d.child("source");
                    let volume = match d.attr("type") {
                        Some("volume") => source
                            .and_then(|s| s.attr("volume"))
                            .map(volume_name_of),
                        Some("file") => source.and_then(|s| s.attr("file")).map(|f| {
                            let v = volume_name_of(f);
                            notes.push(format!(
                                "{path}: the file {f} becomes the StorageVol '{v}' (a Domain names volumes, never host paths)"
                            ));
                            v
                        }),
                        other => {
                            notes.push(format!(
                                "{path}: a disk of type '{}' is not modelled; skipped",
                                other.unwrap_or("?")
                            ));
                            continue;
                        }
                    };
                    let Some(volume) = volume else {
                        notes.push(format!("{path}: no source; skipped"));
                        continue;
                    };
                    let target = d
                        .child("target")
                        .and_then(|t| t.attr("dev"))
                        .unwrap_or_default();
                    let name = if target.starts_with("vd") {
                        target.to_string()
                    } else {
                        let n = format!("vd{}", (b'a' + devices.disks.len() as u8) as char);
                        notes.push(format!("{path}: target '{target}' becomes virtio disk {n}"));
                        n
                    };
                    devices.disks.push(Disk {
                        name,
                        volume,
                        read_only: d.child("readonly").is_some(),
                    });
                }
                "interface" => {
                    let network = match d.attr("type") {
                        Some("network") => d
                            .child("source")
                            .and_then(|s| s.attr("network"))
                            .map(str::to_string),
                        Some("bridge") => d.child("source").and_then(|s| s.attr("bridge")).map(|b| {
                            notes.push(format!(
                                "{path}: the host bridge {b} becomes the Network '{b}' (define it with forwardMode: bridge)"
                            ));
                            b.to_string()
                        }),
                        other => {
                            notes.push(format!(
                                "{path}: an interface of type '{}' is not modelled; skipped",
                                other.unwrap_or("?")
                            ));
                            continue;
                        }
                    };
                    let Some(network) = network else {
                        notes.push(format!("{path}: no source; skipped"));
                        continue;
                    };
                    if let Some(model) = d.child("model").and_then(|m| m.attr("type"))
                        && model != "virtio"
                    {
                        notes.push(format!("{path}: model '{model}' becomes virtio"));
                    }
                    devices.interfaces.push(Interface {
                        name: format!("net{}", devices.interfaces.len()),
                        network,
                        mac: d
                            .child("mac")
                            .and_then(|m| m.attr("address"))
                            .map(str::to_ascii_lowercase),
                    });
                }
                "serial" | "console" => {
                    devices.serial = Some(SerialSpec { enabled: true });
                }
                // Implied by Vireo's machines.
                "emulator" | "controller" | "memballoon" | "rng" | "input" => {}
                other => notes.push(format!("{path}: <{other}> is not modelled; skipped")),
            }
        }
    }
    for skipped in ["features", "cpu", "clock", "pm", "seclabel", "resource"] {
        if root.child(skipped).is_some() {
            notes.push(format!("domain/{skipped}: not modelled; skipped"));
        }
    }
    let spec = DomainSpec {
        domain_type,
        uuid: root.child_text("uuid").map(str::to_ascii_lowercase),
        memory: format_bytes(memory),
        current_memory: current.filter(|&c| c != memory).map(format_bytes),
        vcpus: current_vcpus.unwrap_or(max_vcpus),
        max_vcpus: current_vcpus.map(|_| max_vcpus),
        os: os.filter(|o| *o != OsSpec::default()),
        devices,
        // A defined libvirt domain does not run until started: Manual keeps
        // it as it is (Always would start it at once).
        run_strategy: RunStrategy::Manual,
        lifecycle,
        node_selector: None,
    };
    notes.push("spec.runStrategy: Manual (as a defined libvirt domain, started by hand); set Always to keep it running".into());
    Ok(Imported {
        manifest: Manifest::Domain(Box::new(Domain::new(&name, spec))),
        notes,
    })
}

/// 255.255.255.0 → 24.
fn netmask_prefix(mask: &str, path: &str) -> Result<u8, XmlError> {
    let addr: std::net::Ipv4Addr = mask
        .parse()
        .map_err(|_| invalid(path, format!("'{mask}' is not a netmask")))?;
    let bits = u32::from(addr);
    let prefix = bits.leading_ones();
    if bits.checked_shl(prefix).unwrap_or(0) != 0 {
        return Err(invalid(
            path,
            format!("'{mask}' is not a contiguous netmask"),
        ));
    }
    Ok(prefix as u8)
}

fn network_from(root: &Element) -> Result<Imported, XmlError> {
    let mut notes = Vec::new();
    let name = root
        .child_text("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("network/name", "missing"))?
        .to_string();
    let forward_mode = match root
        .child("forward")
        .map(|f| f.attr("mode").unwrap_or("nat"))
    {
        None => ForwardMode::Isolated,
        Some("nat") => ForwardMode::Nat,
        Some("route") => ForwardMode::Route,
        Some("bridge") => ForwardMode::Bridge,
        Some(other) => {
            return Err(invalid(
                "network/forward/@mode",
                format!(
                    "'{other}' is not a Vireo forward mode (nat, route, bridge; none: isolated)"
                ),
            ));
        }
    };
    let ips: Vec<&Element> = root
        .children_named("ip")
        .filter(|ip| ip.attr("family").is_none_or(|f| f == "ipv4"))
        .collect();
    if root
        .children_named("ip")
        .any(|ip| ip.attr("family") == Some("ipv6"))
    {
        notes.push("network/ip[@family='ipv6']: not modelled; skipped".into());
    }
    if ips.len() > 1 {
        notes.push("network/ip: only the first IPv4 address is kept".into());
    }
    let ip = match ips.first() {
        Some(ip) => {
            let address = ip
                .attr("address")
                .ok_or_else(|| invalid("network/ip/@address", "missing"))?
                .to_string();
            let prefix = match (ip.attr("prefix"), ip.attr("netmask")) {
                (Some(p), _) => p
                    .parse()
                    .map_err(|_| invalid("network/ip/@prefix", format!("'{p}' is not a prefix")))?,
                (None, Some(m)) => netmask_prefix(m, "network/ip/@netmask")?,
                (None, None) => 24,
            };
            let dhcp = ip.child("dhcp").map(|d| DhcpSpec {
                ranges: d
                    .children_named("range")
                    .filter_map(|r| {
                        Some(DhcpRange {
                            start: r.attr("start")?.to_string(),
                            end: r.attr("end")?.to_string(),
                        })
                    })
                    .collect(),
                hosts: d
                    .children_named("host")
                    .filter_map(|h| {
                        Some(DhcpHost {
                            mac: h.attr("mac")?.to_ascii_lowercase(),
                            ip: h.attr("ip")?.to_string(),
                            name: h.attr("name").map(str::to_string),
                        })
                    })
                    .collect(),
            });
            Some(IpSpec {
                address,
                prefix,
                dhcp,
            })
        }
        None => None,
    };
    for skipped in ["dns", "domain", "mac", "bandwidth", "portgroup", "mtu"] {
        if root.child(skipped).is_some() {
            notes.push(format!("network/{skipped}: not modelled; skipped"));
        }
    }
    let spec = NetworkSpec {
        uuid: root.child_text("uuid").map(str::to_ascii_lowercase),
        forward_mode,
        bridge: root
            .child("bridge")
            .and_then(|b| b.attr("name"))
            .map(str::to_string),
        ip,
        autostart: false,
        active: None,
        node_selector: None,
    };
    Ok(Imported {
        manifest: Manifest::Network(Box::new(Network::new(&name, spec))),
        notes,
    })
}

fn pool_from(root: &Element) -> Result<Imported, XmlError> {
    let notes = Vec::new();
    match root.attr("type") {
        Some("dir") => {}
        other => {
            return Err(invalid(
                "pool/@type",
                format!(
                    "'{}' is not a pool type Vireo has (dir)",
                    other.unwrap_or_default()
                ),
            ));
        }
    }
    let name = root
        .child_text("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("pool/name", "missing"))?
        .to_string();
    let path = root
        .child("target")
        .and_then(|t| t.child_text("path"))
        .ok_or_else(|| invalid("pool/target/path", "missing"))?
        .to_string();
    let spec = StoragePoolSpec {
        uuid: root.child_text("uuid").map(str::to_ascii_lowercase),
        pool_type: PoolType::Dir,
        path,
        autostart: false,
        active: None,
        node_selector: None,
    };
    Ok(Imported {
        manifest: Manifest::StoragePool(Box::new(StoragePool::new(&name, spec))),
        notes,
    })
}

fn volume_from(root: &Element, options: &ImportOptions) -> Result<Imported, XmlError> {
    let mut notes = Vec::new();
    let file_name = root
        .child_text("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("volume/name", "missing"))?;
    let name = volume_name_of(file_name);
    if name != file_name {
        notes.push(format!(
            "volume/name: '{file_name}' becomes '{name}' (a Kubernetes object name)"
        ));
    }
    let pool = options.pool.clone().ok_or_else(|| {
        invalid(
            "volume",
            "a volume's XML does not name its pool; give it (--pool)",
        )
    })?;
    let capacity = root
        .child("capacity")
        .map(|c| scaled(c, "volume/capacity", "bytes"))
        .transpose()?
        .ok_or_else(|| invalid("volume/capacity", "missing"))?;
    let allocation = root
        .child("allocation")
        .map(|a| scaled(a, "volume/allocation", "bytes"))
        .transpose()?;
    let format = match root
        .child("target")
        .and_then(|t| t.child("format"))
        .and_then(|f| f.attr("type"))
    {
        None | Some("raw") => VolFormat::Raw,
        Some("qcow2") => VolFormat::Qcow2,
        Some(other) => {
            return Err(invalid(
                "volume/target/format/@type",
                format!("'{other}' is not a format Vireo has (raw, qcow2)"),
            ));
        }
    };
    if root.child("backingStore").is_some() {
        notes.push("volume/backingStore: not kept; make the volume with spec.source.clone (overlay: true) of its backing volume".into());
    }
    let spec = StorageVolSpec {
        pool,
        capacity: format_bytes(capacity),
        allocation: allocation.filter(|&a| a != capacity).map(format_bytes),
        format,
        source: None,
        node_name: None,
    };
    Ok(Imported {
        manifest: Manifest::StorageVol(Box::new(StorageVol::new(&name, spec))),
        notes,
    })
}

/// A libvirt XML description (`<domain>`, `<network>`, `<pool>`,
/// `<volume>`) as a Vireo manifest.
pub fn from_xml(xml: &str, options: &ImportOptions) -> Result<Imported, XmlError> {
    let root = parse(xml)?;
    match root.name.as_str() {
        "domain" => domain_from(&root),
        "network" => network_from(&root),
        "pool" => pool_from(&root),
        "volume" => volume_from(&root, options),
        other => Err(XmlError::UnknownRoot(other.to_string())),
    }
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

fn action(a: LifecycleAction) -> &'static str {
    match a {
        LifecycleAction::Destroy => "destroy",
        LifecycleAction::Restart => "restart",
        LifecycleAction::Preserve => "preserve",
    }
}

/// Bytes of a Quantity, 0 when it does not parse (the schema keeps that
/// from happening for stored objects).
fn bytes_of(q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity) -> u64 {
    parse_quantity(q).unwrap_or(0)
}

/// A Domain as libvirt domain XML (`vireo dumpxml`), which `virsh define`
/// accepts.
pub fn domain_to_xml(d: &Domain) -> String {
    let s = &d.spec;
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{}'>", s.domain_type);
    let _ = writeln!(
        x,
        "  <name>{}</name>",
        esc(d.metadata.name.as_deref().unwrap_or_default())
    );
    if let Some(u) = &s.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", esc(u));
    }
    let memory = bytes_of(&s.memory) >> 10;
    let current = s
        .current_memory
        .as_ref()
        .map_or(memory, |c| bytes_of(c) >> 10);
    let _ = writeln!(x, "  <memory unit='KiB'>{memory}</memory>");
    let _ = writeln!(x, "  <currentMemory unit='KiB'>{current}</currentMemory>");
    match s.max_vcpus {
        Some(max) if max != s.vcpus => {
            let _ = writeln!(
                x,
                "  <vcpu placement='static' current='{}'>{max}</vcpu>",
                s.vcpus
            );
        }
        _ => {
            let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", s.vcpus);
        }
    }
    x.push_str("  <os>\n");
    let os = s.os.clone().unwrap_or_default();
    match os.machine.as_deref() {
        Some(m) => {
            let _ = writeln!(x, "    <type arch='x86_64' machine='{}'>hvm</type>", esc(m));
        }
        None => x.push_str("    <type arch='x86_64'>hvm</type>\n"),
    }
    for (tag, v) in [
        ("kernel", &os.kernel),
        ("initrd", &os.initrd),
        ("cmdline", &os.cmdline),
    ] {
        if let Some(v) = v {
            let _ = writeln!(x, "    <{tag}>{}</{tag}>", esc(v));
        }
    }
    x.push_str("  </os>\n");
    let _ = writeln!(
        x,
        "  <on_poweroff>{}</on_poweroff>",
        action(s.lifecycle.on_poweroff)
    );
    let _ = writeln!(
        x,
        "  <on_reboot>{}</on_reboot>",
        action(s.lifecycle.on_reboot)
    );
    let _ = writeln!(x, "  <on_crash>{}</on_crash>", action(s.lifecycle.on_crash));
    x.push_str("  <devices>\n");
    for disk in &s.devices.disks {
        x.push_str("    <disk type='volume' device='disk'>\n");
        x.push_str("      <driver name='qemu' type='raw'/>\n");
        // The pool is where the volume is on its node; a Domain names
        // volumes of its namespace, so the pool here is a placeholder
        // to edit.
        let _ = writeln!(
            x,
            "      <source pool='default' volume='{}'/>",
            esc(&disk.volume)
        );
        let _ = writeln!(x, "      <target dev='{}' bus='virtio'/>", esc(&disk.name));
        if disk.read_only {
            x.push_str("      <readonly/>\n");
        }
        x.push_str("    </disk>\n");
    }
    for iface in &s.devices.interfaces {
        x.push_str("    <interface type='network'>\n");
        if let Some(mac) = &iface.mac {
            let _ = writeln!(x, "      <mac address='{}'/>", esc(mac));
        }
        let _ = writeln!(x, "      <source network='{}'/>", esc(&iface.network));
        x.push_str("      <model type='virtio'/>\n");
        x.push_str("    </interface>\n");
    }
    if s.devices.serial.as_ref().is_none_or(|c| c.enabled) {
        x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
        x.push_str(
            "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
        );
    }
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// A Network as libvirt network XML (`vireo net-dumpxml`).
pub fn network_to_xml(n: &Network) -> String {
    let s = &n.spec;
    let mut x = String::from("<network>\n");
    let _ = writeln!(
        x,
        "  <name>{}</name>",
        esc(n.metadata.name.as_deref().unwrap_or_default())
    );
    if let Some(u) = &s.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", esc(u));
    }
    match s.forward_mode {
        ForwardMode::Nat => x.push_str("  <forward mode='nat'/>\n"),
        ForwardMode::Route => x.push_str("  <forward mode='route'/>\n"),
        ForwardMode::Bridge => x.push_str("  <forward mode='bridge'/>\n"),
        ForwardMode::Isolated => {}
    }
    if let Some(b) = &s.bridge {
        let _ = writeln!(x, "  <bridge name='{}'/>", esc(b));
    }
    if let Some(ip) = &s.ip {
        let _ = write!(
            x,
            "  <ip address='{}' prefix='{}'",
            esc(&ip.address),
            ip.prefix
        );
        match &ip.dhcp {
            Some(d) => {
                x.push_str(">\n    <dhcp>\n");
                for r in &d.ranges {
                    let _ = writeln!(
                        x,
                        "      <range start='{}' end='{}'/>",
                        esc(&r.start),
                        esc(&r.end)
                    );
                }
                for h in &d.hosts {
                    let _ = write!(x, "      <host mac='{}'", esc(&h.mac));
                    if let Some(name) = &h.name {
                        let _ = write!(x, " name='{}'", esc(name));
                    }
                    let _ = writeln!(x, " ip='{}'/>", esc(&h.ip));
                }
                x.push_str("    </dhcp>\n  </ip>\n");
            }
            None => x.push_str("/>\n"),
        }
    }
    x.push_str("</network>\n");
    x
}

/// A StoragePool as libvirt pool XML (`vireo pool-dumpxml`).
pub fn pool_to_xml(p: &StoragePool) -> String {
    let mut x = String::from("<pool type='dir'>\n");
    let _ = writeln!(
        x,
        "  <name>{}</name>",
        esc(p.metadata.name.as_deref().unwrap_or_default())
    );
    if let Some(u) = &p.spec.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", esc(u));
    }
    let _ = writeln!(
        x,
        "  <target>\n    <path>{}</path>\n  </target>",
        esc(&p.spec.path)
    );
    x.push_str("</pool>\n");
    x
}

/// A volume as libvirt volume XML (`vireo vol-dumpxml`): its name, sizes
/// in bytes, path and format.
pub fn volume_to_xml(
    name: &str,
    capacity: u64,
    allocation: u64,
    path: &str,
    format: VolFormat,
) -> String {
    let format = match format {
        VolFormat::Raw => "raw",
        VolFormat::Qcow2 => "qcow2",
    };
    format!(
        "<volume type='file'>\n  <name>{}</name>\n  <key>{}</key>\n  <capacity unit='bytes'>{capacity}</capacity>\n  <allocation unit='bytes'>{allocation}</allocation>\n  <target>\n    <path>{}</path>\n    <format type='{format}'/>\n  </target>\n</volume>\n",
        esc(name),
        esc(path),
        esc(path)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `virt-install` leaves in a domain's XML, trimmed.
    const VIRT_INSTALL: &str = r#"<domain type='kvm' id='3'>
  <name>web01</name>
  <uuid>6B29FC40-CA47-1067-B31D-00DD010662DA</uuid>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <kernel>/var/lib/vireo/boot/vmlinuz</kernel>
    <cmdline>console=ttyS0 root=/dev/vda &amp; quiet</cmdline>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>coredump-restart</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/Web01_Root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='default' volume='data'/>
      <target dev='sdb' bus='scsi'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:AB:CD:EF'/>
      <source network='default'/>
      <model type='e1000'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <graphics type='vnc' port='-1'/>
    <video><model type='qxl'/></video>
  </devices>
</domain>"#;

    #[test]
    fn a_virt_install_domain_imports_with_notes() {
        let got = from_xml(VIRT_INSTALL, &ImportOptions::default()).expect("imports");
        let Manifest::Domain(d) = got.manifest else {
            panic!("a Domain: {:?}", got.manifest);
        };
        assert_eq!(d.metadata.name.as_deref(), Some("web01"));
        let s = &d.spec;
        assert_eq!(s.domain_type, DomainType::Kvm);
        assert_eq!(
            s.uuid.as_deref(),
            Some("6b29fc40-ca47-1067-b31d-00dd010662da")
        );
        assert_eq!(s.memory.0, "2Gi");
        assert_eq!(s.current_memory.as_ref().map(|q| q.0.as_str()), Some("1Gi"));
        assert_eq!((s.vcpus, s.max_vcpus), (2, Some(4)));
        let os = s.os.as_ref().expect("os");
        assert_eq!(os.machine.as_deref(), Some("q35"));
        assert_eq!(
            os.cmdline.as_deref(),
            Some("console=ttyS0 root=/dev/vda & quiet")
        );
        assert_eq!(s.lifecycle.on_crash, LifecycleAction::Restart);
        assert_eq!(s.run_strategy, RunStrategy::Manual);
        assert_eq!(
            s.devices.disks,
            vec![
                Disk {
                    name: "vda".into(),
                    volume: "web01-root".into(),
                    read_only: false
                },
                Disk {
                    name: "vdb".into(),
                    volume: "data".into(),
                    read_only: true
                },
            ]
        );
        assert_eq!(
            s.devices.interfaces,
            vec![Interface {
                name: "net0".into(),
                network: "default".into(),
                mac: Some("52:54:00:ab:cd:ef".into())
            }]
        );
        assert!(s.devices.serial.is_some());
        let notes = got.notes.join("\n");
        for want in [
            "domain/os/boot",
            "domain/features",
            "domain/cpu",
            "coredump-restart taken as restart",
            "the file /var/lib/libvirt/images/Web01_Root.qcow2 becomes the StorageVol 'web01-root'",
            "target 'sdb' becomes virtio disk vdb",
            "a cdrom is not modelled",
            "model 'e1000' becomes virtio",
            "<graphics> is not modelled",
            "<video> is not modelled",
        ] {
            assert!(notes.contains(want), "{want} not in:\n{notes}");
        }
        // What Vireo checks of every Domain holds for the import.
        crate::Validate::validate(s).expect("a valid spec");
    }

    #[test]
    fn libvirts_default_network_imports() {
        let xml = "<network>\n  <name>default</name>\n  <uuid>0f9a3d4e-1b2c-4d5e-8f90-a1b2c3d4e5f6</uuid>\n  <forward mode='nat'><nat><port start='1024' end='65535'/></nat></forward>\n  <bridge name='virbr0' stp='on' delay='0'/>\n  <mac address='52:54:00:0a:0b:0c'/>\n  <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='192.168.122.2' end='192.168.122.254'/>\n      <host mac='52:54:00:00:00:09' name='fixed' ip='192.168.122.9'/>\n    </dhcp>\n  </ip>\n</network>\n";
        let got = from_xml(xml, &ImportOptions::default()).expect("imports");
        let Manifest::Network(n) = got.manifest else {
            panic!("a Network");
        };
        assert_eq!(n.spec.forward_mode, ForwardMode::Nat);
        assert_eq!(n.spec.bridge.as_deref(), Some("virbr0"));
        let ip = n.spec.ip.as_ref().expect("ip");
        assert_eq!((ip.address.as_str(), ip.prefix), ("192.168.122.1", 24));
        let dhcp = ip.dhcp.as_ref().expect("dhcp");
        assert_eq!(dhcp.ranges[0].end, "192.168.122.254");
        assert_eq!(dhcp.hosts[0].name.as_deref(), Some("fixed"));
        assert!(got.notes.iter().any(|n| n.contains("network/mac")));
        crate::Validate::validate(&n.spec).expect("a valid spec");
        // And back: the same spec again.
        let again = from_xml(&network_to_xml(&n), &ImportOptions::default()).expect("round trip");
        let Manifest::Network(m) = again.manifest else {
            panic!("a Network");
        };
        assert_eq!(m.spec, n.spec);
    }

    #[test]
    fn domains_round_trip_through_xml() {
        let got = from_xml(VIRT_INSTALL, &ImportOptions::default()).expect("imports");
        let Manifest::Domain(d) = got.manifest else {
            panic!("a Domain");
        };
        let xml = domain_to_xml(&d);
        let again = from_xml(&xml, &ImportOptions::default()).expect("its own XML imports");
        let Manifest::Domain(e) = again.manifest else {
            panic!("a Domain");
        };
        assert_eq!(e.spec, d.spec, "{xml}");
        assert_eq!(e.metadata.name, d.metadata.name);
    }

    #[test]
    fn pools_and_volumes_import_and_round_trip() {
        let pool = "<pool type='dir'><name>images</name><target><path>/var/lib/libvirt/images</path></target></pool>";
        let Manifest::StoragePool(p) = from_xml(pool, &ImportOptions::default())
            .expect("pool")
            .manifest
        else {
            panic!("a StoragePool");
        };
        assert_eq!(p.spec.path, "/var/lib/libvirt/images");
        let Manifest::StoragePool(q) = from_xml(&pool_to_xml(&p), &ImportOptions::default())
            .expect("again")
            .manifest
        else {
            panic!("a StoragePool");
        };
        assert_eq!(q.spec, p.spec);

        let vol = "<volume type='file'><name>disk1.qcow2</name><capacity unit='G'>10</capacity><allocation unit='bytes'>196608</allocation><target><format type='qcow2'/></target></volume>";
        let e = from_xml(vol, &ImportOptions::default()).expect_err("no pool");
        assert!(e.to_string().contains("--pool"), "{e}");
        let got = from_xml(
            vol,
            &ImportOptions {
                pool: Some("images".into()),
            },
        )
        .expect("volume");
        let Manifest::StorageVol(v) = got.manifest else {
            panic!("a StorageVol");
        };
        assert_eq!(v.metadata.name.as_deref(), Some("disk1"));
        assert_eq!(v.spec.capacity.0, "10Gi");
        assert_eq!(v.spec.format, VolFormat::Qcow2);
        assert_eq!(v.spec.pool, "images");
        let xml = volume_to_xml("disk1", 10 << 30, 196_608, "/p/disk1", VolFormat::Qcow2);
        let Manifest::StorageVol(w) = from_xml(
            &xml,
            &ImportOptions {
                pool: Some("images".into()),
            },
        )
        .expect("again")
        .manifest
        else {
            panic!("a StorageVol");
        };
        assert_eq!(w.spec.capacity, v.spec.capacity);
        assert_eq!(w.spec.format, VolFormat::Qcow2);
    }

    #[test]
    fn bad_xml_gets_a_clear_error() {
        for (xml, want) in [
            ("<domain type='kvm'><name>x</name>", "not closed"),
            (
                "<domain type='xen'><name>x</name><memory>1</memory></domain>",
                "domain/@type: 'xen'",
            ),
            (
                "<domain type='kvm'><name>x</name></domain>",
                "domain/memory: missing",
            ),
            (
                "<domain type='kvm'><name>x</name><memory unit='PiB'>1</memory></domain>",
                "unit 'PiB'",
            ),
            (
                "<domain type='kvm'><name>x</name><memory>lots</memory></domain>",
                "not a whole number",
            ),
            ("<interface/>", "<interface> is not a libvirt description"),
            (
                "<network><name>n</name><forward mode='hostdev'/></network>",
                "network/forward/@mode",
            ),
            (
                "<network><name>n</name><ip address='10.0.0.1' netmask='255.0.255.0'/></network>",
                "not a contiguous netmask",
            ),
            ("<pool type='logical'><name>p</name></pool>", "pool/@type"),
            ("not xml at all <", "not well-formed"),
        ] {
            let e = from_xml(xml, &ImportOptions::default()).expect_err(xml);
            assert!(e.to_string().contains(want), "{xml}: {e}");
        }
    }
}
