//! libvirt's XML descriptions, to and from Vireo manifests, for users who
//! migrate from libvirt: `virsh dumpxml` output becomes a Domain, Network,
//! StoragePool or StorageVol (`vireo import-xml`, or `vireo define -f
//! FILE.xml` directly), and `vireo dumpxml` writes XML that `virsh define`
//! accepts.
//!
//! The mapping keeps what Vireo models (type, name, UUID, architecture,
//! memory, vCPUs, direct kernel boot, firmware (BIOS or UEFI) and boot
//! order, lifecycle actions, disks and CD-ROMs on volumes (virtio, sata,
//! scsi), network interfaces, serial console; a network's forward mode,
//! bridge, address and DHCP; a dir pool's path; a volume's size and format)
//! and reports everything else it meets as a note, once per kind of element
//! with a count, so nothing is dropped silently.
//!
//! Names become Kubernetes object names (lower-case RFC 1123); the libvirt
//! name, when it differs, is kept in the annotation
//! [`labels::LIBVIRT_NAME_ANNOTATION`](crate::labels::LIBVIRT_NAME_ANNOTATION)
//! and written back by the export. Every import passes the same checks as
//! `define` ([`Validate`]), an error naming the XML element at fault.
//!
//! The parser is bounded: at most [`MAX_DESCRIPTION_BYTES`] of input,
//! [`MAX_DEPTH`] levels of nesting (libxml2's limit) and [`MAX_NODES`]
//! elements and attributes; time and memory are linear in the input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use quick_xml::events::{BytesStart, Event};

use crate::labels::LIBVIRT_NAME_ANNOTATION;
use crate::quantity::{format_bytes, parse_quantity};
use crate::validate::{MAX_DISKS, MAX_INTERFACES, Validate};
use crate::{
    BootDevice, DhcpHost, DhcpRange, DhcpSpec, Disk, DiskBus, DiskDevice, Domain, DomainDevices,
    DomainSpec, DomainType, Firmware, ForwardMode, Interface, IpSpec, Lifecycle, LifecycleAction,
    Manifest, Network, NetworkSpec, OsSpec, PoolType, RunStrategy, SerialSpec, StoragePool,
    StoragePoolSpec, StorageVol, StorageVolSpec, VolFormat,
};

/// The largest description Vireo reads: virsh's own limit on an XML file.
pub const MAX_DESCRIPTION_BYTES: usize = 10 << 20;
/// How deep elements nest at most (libxml2's limit).
pub const MAX_DEPTH: usize = 256;
/// How many elements and attributes a description holds at most (libvirt's
/// largest test descriptions have a few thousand).
pub const MAX_NODES: usize = 100_000;
/// How many different notes an import reports; the rest are summed up in
/// one line.
pub const MAX_NOTES: usize = 100;
/// The longest name an import gives an object (an RFC 1123 label's length,
/// so the name also fits where a label is needed).
pub const MAX_NAME: usize = 63;

/// Why an XML description could not become a manifest. Every message is
/// one line.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed XML: {0}")]
    Syntax(String),
    #[error(
        "the description is {0} bytes; Vireo reads at most {MAX_DESCRIPTION_BYTES} (10 MiB, as virsh does)"
    )]
    TooLarge(usize),
    #[error("elements nest deeper than {MAX_DEPTH} levels at byte {0} (libxml2's limit)")]
    TooDeep(u64),
    #[error(
        "more than {MAX_NODES} elements and attributes at byte {0}; a libvirt description has far fewer"
    )]
    TooMany(u64),
    #[error("<{0}> is not a libvirt description Vireo imports (domain, network, pool, volume)")]
    UnknownRoot(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// One line: a message from the XML parser never spans lines.
fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().replace(['\n', '\r'], " ")
}

fn invalid(path: &str, message: impl Into<String>) -> XmlError {
    XmlError::Invalid {
        path: path.to_string(),
        message: one_line(message.into()),
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

/// The notes of one import: each kind once, with how often it was met,
/// and at most [`MAX_NOTES`] kinds.
#[derive(Debug, Default)]
struct Notes {
    entries: Vec<(String, usize)>,
    by_key: HashMap<String, usize>,
    dropped: usize,
}

impl Notes {
    /// A note that is its own kind.
    fn push(&mut self, message: impl Into<String>) {
        let message = message.into();
        self.keyed(message.clone(), || message);
    }

    /// A note of a kind (`key`): the first message is kept, later ones
    /// of the same kind count.
    fn keyed(&mut self, key: impl Into<String>, message: impl FnOnce() -> String) {
        let key = key.into();
        if let Some(&i) = self.by_key.get(&key) {
            self.entries[i].1 += 1;
        } else if self.entries.len() < MAX_NOTES {
            self.by_key.insert(key, self.entries.len());
            self.entries.push((message(), 1));
        } else {
            self.dropped += 1;
        }
    }

    /// An element that does not carry over.
    fn skipped(&mut self, path: &str) {
        self.keyed(path, || format!("{path}: not modelled; skipped"));
    }

    fn finish(self) -> Vec<String> {
        let mut out: Vec<String> = self
            .entries
            .into_iter()
            .map(|(m, n)| if n > 1 { format!("{m} ({n} times)") } else { m })
            .collect();
        if self.dropped > 0 {
            out.push(format!(
                "{} more notes not shown (only the first {MAX_NOTES} kinds are)",
                self.dropped
            ));
        }
        out
    }
}

/// A libvirt name as a Kubernetes object name: lower-case, every other
/// character than a letter, digit or dot becomes '-', each dot-separated
/// part trimmed of '-', at most [`MAX_NAME`] characters. Empty when
/// nothing is left.
pub fn kube_name(name: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for part in name.split('.') {
        let mut p = String::with_capacity(part.len());
        for c in part.chars() {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                p.push(c);
            } else if !p.ends_with('-') {
                p.push('-');
            }
        }
        let p = p.trim_matches('-');
        if !p.is_empty() {
            parts.push(p.to_string());
        }
        if parts.iter().map(|p| p.len() + 1).sum::<usize>() > MAX_NAME {
            break;
        }
    }
    let mut out = parts.join(".");
    if out.len() > MAX_NAME {
        out.truncate(MAX_NAME);
    }
    out.trim_end_matches(['-', '.']).to_string()
}

/// The libvirt name of an object: its annotation when that still belongs
/// to its name (an object renamed since keeps its new name) and libvirt
/// takes it (no '/'), else the name.
pub fn libvirt_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or_default();
    let name = name.rsplit('/').next().unwrap_or(name);
    match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(LIBVIRT_NAME_ANNOTATION))
    {
        Some(original) if kube_name(original) == name && !original.contains('/') => {
            original.clone()
        }
        _ => name.to_string(),
    }
}

/// The object name for a libvirt name, with a note and the annotation
/// that keeps the original when they differ.
fn object_name(
    original: &str,
    path: &str,
    fallback: &str,
    notes: &mut Notes,
) -> (String, Option<BTreeMap<String, String>>) {
    let mut name = kube_name(original);
    if name.is_empty() {
        name = fallback.to_string();
    }
    if name == original {
        return (name, None);
    }
    notes.push(format!(
        "{path}: '{original}' becomes '{name}' (a Kubernetes object name); annotation {LIBVIRT_NAME_ANNOTATION} keeps '{original}' for dumpxml"
    ));
    (
        name,
        Some(BTreeMap::from([(
            LIBVIRT_NAME_ANNOTATION.to_string(),
            original.to_string(),
        )])),
    )
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
    /// Notes every child not in `read`, once per kind, under `path`.
    fn note_unread(&self, path: &str, read: &[&str], notes: &mut Notes) {
        for c in &self.children {
            if !read.contains(&c.name.as_str()) {
                notes.skipped(&format!("{path}/{}", c.name));
            }
        }
    }
}

fn start_element(e: &BytesStart<'_>, nodes: &mut usize, at: u64) -> Result<Element, XmlError> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        *nodes += 1;
        if *nodes > MAX_NODES {
            return Err(XmlError::TooMany(at));
        }
        let a = a.map_err(|err| XmlError::Syntax(one_line(err)))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a
            .unescape_value()
            .map_err(|err| XmlError::Syntax(one_line(err)))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        ..Default::default()
    })
}

/// Parses a document into its root element, within the limits.
fn parse(xml: &str) -> Result<Element, XmlError> {
    if xml.len() > MAX_DESCRIPTION_BYTES {
        return Err(XmlError::TooLarge(xml.len()));
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    let mut nodes = 0usize;
    loop {
        let event = reader.read_event().map_err(|e| {
            XmlError::Syntax(one_line(format!(
                "at byte {}: {e}",
                reader.buffer_position()
            )))
        })?;
        let at = reader.buffer_position();
        match event {
            Event::Start(_) | Event::Empty(_) if root.is_some() => {
                return Err(XmlError::Syntax(format!(
                    "at byte {at}: a second root element"
                )));
            }
            Event::Start(e) => {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(XmlError::TooMany(at));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep(at));
                }
                stack.push(start_element(&e, &mut nodes, at)?);
            }
            Event::Empty(e) => {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(XmlError::TooMany(at));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep(at));
                }
                let el = start_element(&e, &mut nodes, at)?;
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
                    let text = t.decode().map_err(|e| XmlError::Syntax(one_line(e)))?;
                    let text = quick_xml::escape::unescape(&text)
                        .map_err(|e| XmlError::Syntax(one_line(e)))?;
                    el.text.push_str(&text);
                }
            }
            Event::GeneralRef(r) => {
                if let Some(el) = stack.last_mut() {
                    let name = r.decode().map_err(|e| XmlError::Syntax(one_line(e)))?;
                    let entity = format!("&{name};");
                    let text = quick_xml::escape::unescape(&entity)
                        .map_err(|e| XmlError::Syntax(one_line(e)))?;
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
    if let Some(open) = stack.last() {
        return Err(XmlError::Syntax(format!("<{}> is not closed", open.name)));
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
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "m" | "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "g" | "G" | "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "t" | "T" | "TiB" => 1 << 40,
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

/// libvirt's UUID forms (with or without dashes, any case) in the
/// hyphenated lower-case form the CRD takes.
fn uuid_of(root: &Element, path: &str) -> Result<Option<String>, XmlError> {
    let Some(text) = root.child_text("uuid") else {
        return Ok(None);
    };
    if root.children_named("uuid").count() > 1 {
        return Err(invalid(path, "given twice; a description has one UUID"));
    }
    let hex: String = text.chars().filter(|c| *c != '-' && *c != ' ').collect();
    if hex.len() != 32 {
        return Err(invalid(
            path,
            format!("'{text}' is not a UUID (32 hex digits)"),
        ));
    }
    uuid::Uuid::try_parse(&hex)
        .map(|u| Some(u.hyphenated().to_string()))
        .map_err(|_| invalid(path, format!("'{text}' is not a UUID (32 hex digits)")))
}

fn lifecycle_action(text: &str, path: &str, notes: &mut Notes) -> LifecycleAction {
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
    let stem = [".qcow2", ".img", ".raw", ".iso"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(base);
    let name = kube_name(stem);
    if name.is_empty() { "disk".into() } else { name }
}

/// The guest disk name of the `n`th disk on a bus (from 0): `a` ... `z`,
/// `aa` ... `zz`, as libvirt counts; `None` past `zz`.
fn disk_letters(n: usize) -> Option<String> {
    let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
    match n {
        0..26 => Some(letter(n).to_string()),
        26..702 => Some(format!("{}{}", letter(n / 26 - 1), letter(n % 26))),
        _ => None,
    }
}

/// StorageVol names for a domain's disk sources, one per source: two
/// different files whose names map to the same volume name get `-2`, `-3`.
#[derive(Default)]
struct VolumeNames {
    by_source: HashMap<String, String>,
    used: HashSet<String>,
}

impl VolumeNames {
    fn name(&mut self, source: &str, wanted: String) -> String {
        if let Some(n) = self.by_source.get(source) {
            return n.clone();
        }
        let mut name = wanted.clone();
        let mut i = 2;
        while self.used.contains(&name) {
            let suffix = format!("-{i}");
            let mut base = wanted.clone();
            base.truncate(MAX_NAME - suffix.len());
            name = format!("{}{suffix}", base.trim_end_matches(['-', '.']));
            i += 1;
        }
        self.used.insert(name.clone());
        self.by_source.insert(source.to_string(), name.clone());
        name
    }
}

/// The XML element a DomainSpec field came from, for errors.
struct DomainPaths {
    vcpus: &'static str,
    disks: Vec<String>,
    interfaces: Vec<String>,
}

impl DomainPaths {
    fn of(&self, field: &str) -> String {
        let indexed = |rest: &str, paths: &[String], all: &str| -> String {
            rest.strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(i, _)| i.parse::<usize>().ok())
                .and_then(|i| paths.get(i).cloned())
                .unwrap_or_else(|| all.to_string())
        };
        if let Some(rest) = field.strip_prefix("spec.devices.disks") {
            return indexed(rest, &self.disks, "domain/devices/disk");
        }
        if let Some(rest) = field.strip_prefix("spec.devices.interfaces") {
            return indexed(rest, &self.interfaces, "domain/devices/interface");
        }
        match field {
            "spec.uuid" => "domain/uuid",
            "spec.arch" => "domain/os/type/@arch",
            "spec.memory" => "domain/memory",
            "spec.currentMemory" => "domain/currentMemory",
            "spec.vcpus" => self.vcpus,
            "spec.maxVcpus" => "domain/vcpu",
            f if f.starts_with("spec.os") => "domain/os",
            _ => "domain",
        }
        .to_string()
    }
}

/// The children of `<domain>` the import reads; the others are noted.
const DOMAIN_READ: &[&str] = &[
    "name",
    "uuid",
    "memory",
    "currentMemory",
    "vcpu",
    "os",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "devices",
];

/// Devices implied by Vireo's machines (a PCI or SATA controller, the
/// emulator, a balloon, an RNG, keyboard and mouse).
const DEVICES_IMPLIED: &[&str] = &["emulator", "controller", "memballoon", "rng", "input"];

fn domain_os(os: &Element, notes: &mut Notes) -> Result<(OsSpec, Option<String>), XmlError> {
    os.note_unread(
        "domain/os",
        &[
            "type", "kernel", "initrd", "cmdline", "loader", "nvram", "boot", "firmware",
        ],
        notes,
    );
    let os_type = os.child("type");
    let arch = os_type.and_then(|t| t.attr("arch")).map(str::to_string);
    if let Some(t) = os_type.map(|t| t.text.trim())
        && !t.is_empty()
        && t != "hvm"
    {
        notes.push(format!(
            "domain/os/type: '{t}' guests are not modelled; the guest boots as 'hvm'"
        ));
    }
    let machine = os_type.and_then(|t| t.attr("machine")).map(|m| {
        // pc-q35-8.2 and friends: the machine family is what the qemu
        // driver takes.
        if m.contains("q35") {
            "q35".to_string()
        } else if m.contains("microvm") {
            "microvm".to_string()
        } else {
            notes.keyed("domain/os/type/@machine", || {
                format!("domain/os/type/@machine: '{m}' taken as the default machine")
            });
            String::new()
        }
    });
    let kernel = os.child_text("kernel").map(str::to_string);
    let mut firmware = match os.attr("firmware") {
        Some("efi") => Some(Firmware::Efi),
        Some("bios") => Some(Firmware::Bios),
        Some(other) => {
            notes.push(format!(
                "domain/os/@firmware: '{other}' is not bios or efi; skipped"
            ));
            None
        }
        None => None,
    };
    if let Some(loader) = os.child("loader") {
        let path = loader.text.trim();
        let efi = loader.attr("type") == Some("pflash")
            || ["OVMF", "edk2", "ovmf", "efi", "AAVMF"]
                .iter()
                .any(|w| path.contains(w));
        if firmware.is_none() {
            firmware = Some(if efi { Firmware::Efi } else { Firmware::Bios });
        }
        if !path.is_empty() && path != OVMF_CODE && path != OVMF_CODE_SECURE {
            notes.push(format!(
                "domain/os/loader: {path} is not kept; Vireo runs {} firmware from the node's packages ({})",
                if efi { "UEFI" } else { "BIOS" },
                if efi { OVMF_CODE } else { "SeaBIOS" }
            ));
        }
    }
    let secure_boot = os
        .child("loader")
        .is_some_and(|l| l.attr("secure") == Some("yes"))
        || os
            .children_named("firmware")
            .flat_map(|f| f.children_named("feature"))
            .any(|f| f.attr("name") == Some("secure-boot") && f.attr("enabled") == Some("yes"));
    if secure_boot {
        firmware = Some(Firmware::Efi);
    }
    if let Some(nvram) = os.child("nvram") {
        let path = nvram.text.trim();
        if !path.is_empty() {
            notes.push(format!(
                "domain/os/nvram: {path} is not kept; the node keeps the Domain's own variable store, starting from {OVMF_VARS} (copy its variables into the guest again if they matter)"
            ));
        }
    }
    if firmware.is_none() && kernel.is_none() {
        // libvirt boots a domain without <kernel> through its BIOS.
        firmware = Some(Firmware::Bios);
        notes.push("domain/os: no <kernel>: spec.os.firmware: bios, as libvirt boots it");
    }
    let mut boot = Vec::new();
    for (i, b) in os.children_named("boot").enumerate() {
        let dev = match b.attr("dev") {
            Some("hd") => BootDevice::Hd,
            Some("cdrom") => BootDevice::Cdrom,
            Some("network") => BootDevice::Network,
            other => {
                notes.push(format!(
                    "domain/os/boot[{i}]: dev '{}' is not modelled (hd, cdrom, network); skipped",
                    other.unwrap_or("?")
                ));
                continue;
            }
        };
        if boot.contains(&dev) {
            notes.push(format!(
                "domain/os/boot[{i}]: '{}' is listed twice; kept once",
                dev.as_str()
            ));
        } else {
            boot.push(dev);
        }
    }
    Ok((
        OsSpec {
            machine: machine.filter(|m| !m.is_empty()),
            kernel,
            initrd: os.child_text("initrd").map(str::to_string),
            cmdline: os.child_text("cmdline").map(str::to_string),
            firmware,
            secure_boot,
            boot,
            ..Default::default()
        },
        arch,
    ))
}

/// A `<disk>`: the volume it is on, with a note for what changes, or
/// `None` (noted) when Vireo has no equivalent.
fn disk_volume(
    d: &Element,
    path: &str,
    device: DiskDevice,
    volumes: &mut VolumeNames,
    notes: &mut Notes,
) -> Option<String> {
    let source = d.child("source");
    let disk_type = d.attr("type").unwrap_or("file");
    match disk_type {
        "volume" => source.and_then(|s| s.attr("volume")).map(|v| {
            let name = volumes.name(&format!("volume:{v}"), volume_name_of(v));
            if name != v {
                notes.push(format!(
                    "{path}: the volume '{v}' becomes the StorageVol '{name}'"
                ));
            }
            name
        }),
        "file" | "block" => {
            let attr = if disk_type == "file" { "file" } else { "dev" };
            source.and_then(|s| s.attr(attr)).map(|f| {
                let v = volumes.name(&format!("{attr}:{f}"), volume_name_of(f));
                let what = if disk_type == "file" {
                    "file"
                } else {
                    "block device"
                };
                notes.push(format!(
                    "{path}: the {what} {f} becomes the StorageVol '{v}' (a Domain names volumes, never host paths)"
                ));
                v
            })
        }
        "network" => {
            let s = source?;
            let protocol = s.attr("protocol").unwrap_or("network");
            let image = s.attr("name").filter(|n| !n.is_empty()).map(str::to_string);
            let image = image.or_else(|| {
                s.child("host")
                    .and_then(|h| h.attr("name"))
                    .map(|h| format!("{protocol}-{h}"))
            })?;
            let v = volumes.name(&format!("network:{protocol}:{image}"), volume_name_of(&image));
            notes.push(format!(
                "{path}: the {protocol} disk '{image}' becomes the StorageVol '{v}' (fill it from its source, e.g. spec.source.url)"
            ));
            Some(v)
        }
        other => {
            notes.keyed(format!("disk type {other}"), || {
                format!(
                    "domain/devices/disk[@type='{other}']: not modelled (file, block, volume, network); skipped"
                )
            });
            None
        }
    }
    .or_else(|| {
        let what = if device == DiskDevice::Cdrom {
            "an empty CD-ROM drive is not modelled"
        } else {
            "a disk without a source is not modelled"
        };
        notes.keyed(what, || format!("domain/devices/disk: {what}; skipped"));
        None
    })
}

fn domain_from(root: &Element) -> Result<Imported, XmlError> {
    let mut notes = Notes::default();
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
    let original = root
        .child_text("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("domain/name", "missing"))?;
    let (name, annotations) = object_name(original, "domain/name", "domain", &mut notes);
    let uuid = uuid_of(root, "domain/uuid")?;
    root.note_unread("domain", DOMAIN_READ, &mut notes);
    let memory = root
        .child("memory")
        .map(|m| scaled(m, "domain/memory", "KiB"))
        .transpose()?
        .ok_or_else(|| invalid("domain/memory", "missing"))?;
    let mut current = root
        .child("currentMemory")
        .map(|m| scaled(m, "domain/currentMemory", "KiB"))
        .transpose()?;
    if current.is_some_and(|c| c > memory) {
        // libvirt lowers it to <memory> as well.
        notes.push("domain/currentMemory: above <memory>; lowered to it, as libvirt does");
        current = Some(memory);
    }
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
    let (os, arch) = match root.child("os") {
        Some(os) => {
            let (os, arch) = domain_os(os, &mut notes)?;
            (Some(os), arch)
        }
        None => (None, None),
    };
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
    let mut paths = DomainPaths {
        vcpus: if current_vcpus.is_some() {
            "domain/vcpu/@current"
        } else {
            "domain/vcpu"
        },
        disks: Vec::new(),
        interfaces: Vec::new(),
    };
    let mut volumes = VolumeNames::default();
    let mut disk_names: HashSet<String> = HashSet::new();
    if let Some(devs) = root.child("devices") {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for d in &devs.children {
            let n = counts.entry(d.name.as_str()).or_default();
            let path = format!("domain/devices/{}[{n}]", d.name);
            *n += 1;
            match d.name.as_str() {
                "disk" => {
                    let device = match d.attr("device").unwrap_or("disk") {
                        "disk" => DiskDevice::Disk,
                        "cdrom" => DiskDevice::Cdrom,
                        "lun" => {
                            notes.keyed("lun", || {
                                "domain/devices/disk[@device='lun']: becomes a disk (no SCSI pass-through)".into()
                            });
                            DiskDevice::Disk
                        }
                        other => {
                            notes.keyed(format!("device {other}"), || {
                                format!(
                                    "domain/devices/disk[@device='{other}']: not modelled; skipped"
                                )
                            });
                            continue;
                        }
                    };
                    let Some(volume) = disk_volume(d, &path, device, &mut volumes, &mut notes)
                    else {
                        continue;
                    };
                    if devices.disks.len() == MAX_DISKS {
                        return Err(invalid(
                            &path,
                            format!(
                                "more than {MAX_DISKS} disks; a Domain has at most {MAX_DISKS}"
                            ),
                        ));
                    }
                    d.note_unread(
                        "domain/devices/disk",
                        &["source", "target", "readonly", "boot", "driver"],
                        &mut notes,
                    );
                    if let Some(driver) = d.child("driver")
                        && driver.attrs.iter().any(|(k, _)| k != "name" && k != "type")
                    {
                        notes.skipped("domain/devices/disk/driver (cache, io, ...)");
                    }
                    let target = d.child("target");
                    let mut bus = match target.and_then(|t| t.attr("bus")) {
                        None | Some("virtio") => DiskBus::Virtio,
                        Some("sata") => DiskBus::Sata,
                        Some("scsi") => DiskBus::Scsi,
                        Some("ide") => {
                            notes.keyed("bus ide", || {
                                "domain/devices/disk/target/@bus: 'ide' becomes sata (q35 has no IDE)".into()
                            });
                            DiskBus::Sata
                        }
                        Some(other) => {
                            notes.keyed(format!("bus {other}"), || {
                                format!("domain/devices/disk/target/@bus: '{other}' becomes virtio")
                            });
                            DiskBus::Virtio
                        }
                    };
                    if device == DiskDevice::Cdrom && bus == DiskBus::Virtio {
                        notes.keyed("cdrom virtio", || {
                            "domain/devices/disk[@device='cdrom']: a CD-ROM goes on sata".into()
                        });
                        bus = DiskBus::Sata;
                    }
                    let target = target.and_then(|t| t.attr("dev")).unwrap_or_default();
                    let prefix = if bus == DiskBus::Virtio { "vd" } else { "sd" };
                    let name = if target.starts_with(prefix)
                        && crate::validate::is_disk_name(target)
                        && !disk_names.contains(target)
                    {
                        target.to_string()
                    } else {
                        let n = (0..)
                            .map_while(disk_letters)
                            .map(|l| format!("{prefix}{l}"))
                            .find(|n| !disk_names.contains(n))
                            .ok_or_else(|| invalid(&path, "no disk name left"))?;
                        notes.keyed("target rename", || {
                            format!(
                                "domain/devices/disk/target/@dev: a name that is not vdX on virtio or sdX on sata and scsi, or is taken, becomes the next free one ('{target}' becomes {} disk {n}, {path})",
                                bus.as_str()
                            )
                        });
                        n
                    };
                    disk_names.insert(name.clone());
                    let boot_order = d
                        .child("boot")
                        .and_then(|b| b.attr("order"))
                        .map(|o| {
                            o.parse::<u32>().map_err(|_| {
                                invalid(
                                    &format!("{path}/boot/@order"),
                                    format!("'{o}' is not a number"),
                                )
                            })
                        })
                        .transpose()?;
                    paths.disks.push(path);
                    devices.disks.push(Disk {
                        name,
                        volume,
                        read_only: d.child("readonly").is_some() && device == DiskDevice::Disk,
                        device,
                        bus,
                        boot_order,
                    });
                }
                "interface" => {
                    let source = d.child("source");
                    let network = match d.attr("type") {
                        Some("network") => source.and_then(|s| s.attr("network")).map(|n| {
                            let k = kube_name(n);
                            if k != n {
                                notes.push(format!(
                                    "domain/devices/interface: the network '{n}' becomes the Network '{k}'"
                                ));
                            }
                            k
                        }),
                        Some("bridge") => source.and_then(|s| s.attr("bridge")).map(|b| {
                            let k = kube_name(b);
                            notes.push(format!(
                                "domain/devices/interface: the host bridge {b} becomes the Network '{k}' (define it with forwardMode: bridge, bridge: {b})"
                            ));
                            k
                        }),
                        Some("user") => {
                            notes.keyed("user", || {
                                "domain/devices/interface[@type='user']: user-mode networking becomes an interface on the Network 'default' (define it with forwardMode: nat)".into()
                            });
                            Some("default".to_string())
                        }
                        other => {
                            let other = other.unwrap_or("?");
                            notes.keyed(format!("interface type {other}"), || {
                                format!(
                                    "domain/devices/interface[@type='{other}']: not modelled (network, bridge, user); skipped"
                                )
                            });
                            continue;
                        }
                    };
                    let Some(network) = network.filter(|n| !n.is_empty()) else {
                        notes.keyed("interface no source", || {
                            "domain/devices/interface: an interface without a source is not modelled; skipped".into()
                        });
                        continue;
                    };
                    if devices.interfaces.len() == MAX_INTERFACES {
                        return Err(invalid(
                            &path,
                            format!(
                                "more than {MAX_INTERFACES} interfaces; a Domain has at most {MAX_INTERFACES}"
                            ),
                        ));
                    }
                    d.note_unread(
                        "domain/devices/interface",
                        &["source", "mac", "model", "boot"],
                        &mut notes,
                    );
                    if let Some(model) = d.child("model").and_then(|m| m.attr("type"))
                        && model != "virtio"
                    {
                        notes.keyed(format!("model {model}"), || {
                            format!("domain/devices/interface/model: '{model}' becomes virtio")
                        });
                    }
                    if d.child("boot").is_some() {
                        notes.keyed("interface boot", || {
                            "domain/devices/interface/boot: an interface's boot order is not modelled; use spec.os.boot: [network]".into()
                        });
                    }
                    paths.interfaces.push(path);
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
                other if DEVICES_IMPLIED.contains(&other) => {}
                other => notes.skipped(&format!("domain/devices/{other}")),
            }
        }
    }
    let mut spec = DomainSpec {
        domain_type,
        arch,
        uuid,
        memory: format_bytes(memory),
        current_memory: current.filter(|&c| c != memory).map(format_bytes),
        vcpus: current_vcpus.unwrap_or(max_vcpus),
        max_vcpus: current_vcpus.map(|_| max_vcpus),
        os: os.filter(|o| *o != OsSpec::default()),
        devices,
        // A defined libvirt domain does not run until started: Manual keeps
        // it as it is (Always would start it at once).
        cloud_init: None,
        run_strategy: RunStrategy::Manual,
        lifecycle,
        node_selector: None,
        eviction_strategy: None,
    };
    if spec.max_vcpus == Some(spec.vcpus) {
        spec.max_vcpus = None;
    }
    spec.validate()
        .map_err(|e| invalid(&paths.of(&e.field), e.to_string()))?;
    notes.push("spec.runStrategy: Manual (as a defined libvirt domain, started by hand); set Always to keep it running");
    let mut domain = Domain::new(&name, spec);
    domain.metadata.annotations = annotations;
    Ok(Imported {
        manifest: Manifest::Domain(Box::new(domain)),
        notes: notes.finish(),
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
    let mut notes = Notes::default();
    let original = root
        .child_text("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("network/name", "missing"))?;
    let (name, annotations) = object_name(original, "network/name", "network", &mut notes);
    let uuid = uuid_of(root, "network/uuid")?;
    root.note_unread(
        "network",
        &[
            "name",
            "uuid",
            "forward",
            "bridge",
            "ip",
            "dns",
            "domain",
            "mac",
            "bandwidth",
            "portgroup",
            "mtu",
        ],
        &mut notes,
    );
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
        notes.push("network/ip[@family='ipv6']: not modelled; skipped");
    }
    if ips.len() > 1 {
        notes.push("network/ip: only the first IPv4 address is kept");
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
        uuid,
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
    spec.validate().map_err(|e| {
        let path = match e.field.as_str() {
            "spec.uuid" => "network/uuid",
            "spec.bridge" => "network/bridge/@name",
            f if f.starts_with("spec.ip.dhcp") => "network/ip/dhcp",
            f if f.starts_with("spec.ip") => "network/ip",
            _ => "network",
        };
        invalid(path, e.to_string())
    })?;
    let mut network = Network::new(&name, spec);
    network.metadata.annotations = annotations;
    Ok(Imported {
        manifest: Manifest::Network(Box::new(network)),
        notes: notes.finish(),
    })
}

fn pool_from(root: &Element) -> Result<Imported, XmlError> {
    let mut notes = Notes::default();
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
    let original = root
        .child_text("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("pool/name", "missing"))?;
    let (name, annotations) = object_name(original, "pool/name", "pool", &mut notes);
    let uuid = uuid_of(root, "pool/uuid")?;
    // capacity, allocation and available are what the pool had then:
    // status, not spec.
    root.note_unread(
        "pool",
        &[
            "name",
            "uuid",
            "target",
            "capacity",
            "allocation",
            "available",
        ],
        &mut notes,
    );
    let path = root
        .child("target")
        .and_then(|t| t.child_text("path"))
        .ok_or_else(|| invalid("pool/target/path", "missing"))?
        .to_string();
    let spec = StoragePoolSpec {
        uuid,
        pool_type: PoolType::Dir,
        path,
        autostart: false,
        active: None,
        node_selector: None,
    };
    spec.validate().map_err(|e| {
        let path = match e.field.as_str() {
            "spec.uuid" => "pool/uuid",
            "spec.path" => "pool/target/path",
            _ => "pool",
        };
        invalid(path, e.to_string())
    })?;
    let mut pool = StoragePool::new(&name, spec);
    pool.metadata.annotations = annotations;
    Ok(Imported {
        manifest: Manifest::StoragePool(Box::new(pool)),
        notes: notes.finish(),
    })
}

fn volume_from(root: &Element, options: &ImportOptions) -> Result<Imported, XmlError> {
    let mut notes = Notes::default();
    root.note_unread(
        "volume",
        &[
            "name",
            "key",
            "capacity",
            "allocation",
            "physical",
            "target",
            "backingStore",
        ],
        &mut notes,
    );
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
        Some("iso") => VolFormat::Iso,
        Some(other) => {
            return Err(invalid(
                "volume/target/format/@type",
                format!("'{other}' is not a format Vireo has (raw, qcow2, iso)"),
            ));
        }
    };
    if root.child("backingStore").is_some() {
        notes.push("volume/backingStore: not kept; make the volume with spec.source.clone (overlay: true) of its backing volume");
    }
    let spec = StorageVolSpec {
        pool,
        capacity: format_bytes(capacity),
        allocation: allocation.filter(|&a| a != capacity).map(format_bytes),
        format,
        source: None,
        node_name: None,
    };
    spec.validate().map_err(|e| {
        let path = match e.field.as_str() {
            "spec.capacity" => "volume/capacity",
            "spec.allocation" => "volume/allocation",
            _ => "volume",
        };
        invalid(path, e.to_string())
    })?;
    Ok(Imported {
        manifest: Manifest::StorageVol(Box::new(StorageVol::new(&name, spec))),
        notes: notes.finish(),
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

/// The UEFI firmware the qemu driver runs (Debian's `ovmf`), and the
/// template of each Domain's variable store.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Secure boot: OVMF's secure-boot build (needs SMM) and a template with
/// Microsoft's keys enrolled.
pub const OVMF_CODE_SECURE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
pub const OVMF_VARS_SECURE: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

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
    let _ = writeln!(x, "  <name>{}</name>", esc(&libvirt_name(&d.metadata)));
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
    let os = s.os.clone().unwrap_or_default();
    // BIOS by libvirt's firmware selection; UEFI as the explicit pflash
    // pair the qemu driver runs (libvirt refuses a loader's attributes
    // beside firmware='efi').
    if os.firmware == Some(Firmware::Bios) {
        x.push_str("  <os firmware='bios'>\n");
    } else {
        x.push_str("  <os>\n");
    }
    let arch = esc(s.arch());
    match os.machine.as_deref() {
        Some(m) => {
            let _ = writeln!(x, "    <type arch='{arch}' machine='{}'>hvm</type>", esc(m));
        }
        None => {
            let _ = writeln!(x, "    <type arch='{arch}'>hvm</type>");
        }
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
    if os.firmware == Some(Firmware::Efi) {
        if os.secure_boot {
            let _ = writeln!(
                x,
                "    <loader readonly='yes' secure='yes' type='pflash'>{OVMF_CODE_SECURE}</loader>"
            );
            let _ = writeln!(x, "    <nvram template='{OVMF_VARS_SECURE}'/>");
        } else {
            let _ = writeln!(
                x,
                "    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
            );
            let _ = writeln!(x, "    <nvram template='{OVMF_VARS}'/>");
        }
    }
    for b in &os.boot {
        let _ = writeln!(x, "    <boot dev='{}'/>", b.as_str());
    }
    x.push_str("  </os>\n");
    if os.secure_boot {
        // libvirt runs a secure loader only with SMM, as the driver does.
        x.push_str("  <features>\n    <smm state='on'/>\n  </features>\n");
    }
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
        let _ = writeln!(
            x,
            "    <disk type='volume' device='{}'>",
            disk.device.as_str()
        );
        x.push_str("      <driver name='qemu' type='raw'/>\n");
        // The pool is where the volume is on its node; a Domain names
        // volumes of its namespace, so the pool here is a placeholder
        // to edit.
        let _ = writeln!(
            x,
            "      <source pool='default' volume='{}'/>",
            esc(&disk.volume)
        );
        let _ = writeln!(
            x,
            "      <target dev='{}' bus='{}'/>",
            esc(&disk.name),
            disk.bus.as_str()
        );
        if let Some(order) = disk.boot_order {
            let _ = writeln!(x, "      <boot order='{order}'/>");
        }
        if disk.is_read_only() {
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
    let _ = writeln!(x, "  <name>{}</name>", esc(&libvirt_name(&n.metadata)));
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
    let _ = writeln!(x, "  <name>{}</name>", esc(&libvirt_name(&p.metadata)));
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
    let format = format.to_string();
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
                    ..Default::default()
                },
                Disk {
                    name: "sdb".into(),
                    volume: "data".into(),
                    read_only: true,
                    bus: DiskBus::Scsi,
                    ..Default::default()
                },
                Disk {
                    name: "sda".into(),
                    volume: "debian".into(),
                    device: DiskDevice::Cdrom,
                    bus: DiskBus::Sata,
                    ..Default::default()
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
        assert_eq!(os.boot, vec![BootDevice::Hd]);
        assert_eq!(os.firmware, None, "a kernel, no firmware");
        for want in [
            "domain/features",
            "domain/cpu",
            "coredump-restart taken as restart",
            "the file /var/lib/libvirt/images/Web01_Root.qcow2 becomes the StorageVol 'web01-root'",
            "the file /iso/debian.iso becomes the StorageVol 'debian'",
            "model: 'e1000' becomes virtio",
            "domain/devices/graphics: not modelled",
            "domain/devices/video: not modelled",
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

    /// A disk-booting libvirt domain: UEFI with its own NVRAM, boot order,
    /// a CD-ROM and sata and scsi disks.
    const EFI_DOMAIN: &str = r#"<domain type='kvm'>
  <name>installer</name>
  <memory unit='GiB'>1</memory>
  <vcpu>2</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/installer_VARS.fd</nvram>
    <boot dev='cdrom'/>
    <boot dev='hd'/>
    <boot dev='fd'/>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/installer.qcow2'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/debian-12.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sdc' bus='scsi'/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='default' volume='data'/>
      <target dev='sdd' bus='scsi'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn firmware_boot_order_and_cdroms_import_and_round_trip() {
        let got = from_xml(EFI_DOMAIN, &ImportOptions::default()).expect("imports");
        let Manifest::Domain(d) = got.manifest else {
            panic!("a Domain");
        };
        let os = d.spec.os.as_ref().expect("os");
        assert_eq!(os.firmware, Some(Firmware::Efi));
        assert!(os.secure_boot, "<loader secure='yes'>");
        assert_eq!(os.boot, vec![BootDevice::Cdrom, BootDevice::Hd]);
        assert_eq!(os.kernel, None);
        let disks: Vec<(&str, &str, DiskDevice, DiskBus)> = d
            .spec
            .devices
            .disks
            .iter()
            .map(|d| (d.name.as_str(), d.volume.as_str(), d.device, d.bus))
            .collect();
        assert_eq!(
            disks,
            vec![
                ("sda", "installer", DiskDevice::Disk, DiskBus::Sata),
                ("sdb", "debian-12", DiskDevice::Cdrom, DiskBus::Sata),
                ("sdd", "data", DiskDevice::Disk, DiskBus::Scsi),
            ]
        );
        let notes = got.notes.join("\n");
        for want in [
            "domain/os/loader: /usr/share/OVMF/OVMF_CODE_4M.ms.fd is not kept",
            "domain/os/nvram: /var/lib/libvirt/qemu/nvram/installer_VARS.fd is not kept",
            "domain/os/boot[2]: dev 'fd' is not modelled",
            "@bus: 'ide' becomes sata",
            "'hdc' becomes sata disk sdb",
            "an empty CD-ROM drive is not modelled",
        ] {
            assert!(notes.contains(want), "{want} not in:\n{notes}");
        }
        crate::Validate::validate(&d.spec).expect("a valid spec");
        let xml = domain_to_xml(&d);
        for want in [
            "<loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</loader>",
            "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'/>",
            "<boot dev='cdrom'/>\n    <boot dev='hd'/>",
            "<smm state='on'/>",
            "<disk type='volume' device='cdrom'>",
            "<target dev='sdb' bus='sata'/>",
            "<target dev='sdd' bus='scsi'/>",
        ] {
            assert!(xml.contains(want), "{want} not in:\n{xml}");
        }
        let again = from_xml(&xml, &ImportOptions::default()).expect("its own XML imports");
        let Manifest::Domain(e) = again.manifest else {
            panic!("a Domain");
        };
        assert_eq!(
            (&e.spec.os, &e.spec.devices.disks),
            (&d.spec.os, &d.spec.devices.disks),
            "{xml}"
        );
        assert!(
            !again.notes.iter().any(|n| n.contains("domain/os")),
            "{:?}",
            again.notes
        );

        // BIOS, and per-disk boot order; no <kernel> means libvirt's BIOS.
        let bios = "<domain type='qemu'><name>old</name><memory>524288</memory><os><type>hvm</type></os><devices><disk type='volume' device='disk'><source pool='p' volume='root'/><target dev='vda' bus='virtio'/><boot order='2'/></disk><disk type='volume' device='cdrom'><source pool='p' volume='tools'/><target dev='sda' bus='sata'/><boot order='1'/></disk></devices></domain>";
        let got = from_xml(bios, &ImportOptions::default()).expect("imports");
        let Manifest::Domain(d) = got.manifest else {
            panic!("a Domain");
        };
        assert_eq!(
            d.spec.os.as_ref().and_then(|o| o.firmware),
            Some(Firmware::Bios)
        );
        let orders: Vec<Option<u32>> = d.spec.devices.disks.iter().map(|d| d.boot_order).collect();
        assert_eq!(orders, vec![Some(2), Some(1)]);
        let xml = domain_to_xml(&d);
        assert!(xml.contains("<os firmware='bios'>"), "{xml}");
        assert!(
            xml.contains("<boot order='1'/>\n      <readonly/>"),
            "{xml}"
        );
        let Manifest::Domain(e) = from_xml(&xml, &ImportOptions::default())
            .expect("round trip")
            .manifest
        else {
            panic!("a Domain");
        };
        assert_eq!(
            (&e.spec.os, &e.spec.devices.disks),
            (&d.spec.os, &d.spec.devices.disks),
            "{xml}"
        );
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

    fn domain_of(xml: &str) -> (Domain, Vec<String>) {
        let got = from_xml(xml, &ImportOptions::default()).expect("imports");
        let Manifest::Domain(d) = got.manifest else {
            panic!("a Domain: {:?}", got.manifest);
        };
        (*d, got.notes)
    }

    #[test]
    fn names_become_object_names_and_come_back() {
        for (libvirt, want) in [
            ("QEMUGuest1", "qemuguest1"),
            ("TPM-VM", "tpm-vm"),
            ("foo/bar", "foo-bar"),
            ("web_01..example.COM", "web-01.example.com"),
            ("-édith-", "dith"),
            ("a.-b-.c", "a.b.c"),
            ("x".repeat(80).as_str(), "x".repeat(63).as_str()),
        ] {
            assert_eq!(kube_name(libvirt), want, "{libvirt}");
            assert!(crate::validate::is_dns_subdomain(&kube_name(libvirt)));
        }
        let xml = "<domain type='qemu'><name>QEMU_Guest.1</name><uuid>c7a5fdbd edaf 9455 926a d65c16db1809</uuid><memory>219136</memory><vcpu>1</vcpu><os><type arch='i686' machine='pc'>hvm</type></os><devices><interface type='network'><source network='Lab_Net'/></interface></devices></domain>";
        let (d, notes) = domain_of(xml);
        assert_eq!(d.metadata.name.as_deref(), Some("qemu-guest.1"));
        assert_eq!(
            d.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LIBVIRT_NAME_ANNOTATION))
                .map(String::as_str),
            Some("QEMU_Guest.1")
        );
        assert_eq!(
            d.spec.uuid.as_deref(),
            Some("c7a5fdbd-edaf-9455-926a-d65c16db1809")
        );
        assert_eq!(d.spec.arch.as_deref(), Some("i686"));
        assert_eq!(d.spec.devices.interfaces[0].network, "lab-net");
        let notes = notes.join("\n");
        assert!(
            notes.contains("'QEMU_Guest.1' becomes 'qemu-guest.1'"),
            "{notes}"
        );
        let xml = domain_to_xml(&d);
        assert!(xml.contains("<name>QEMU_Guest.1</name>"), "{xml}");
        assert!(xml.contains("<type arch='i686'>hvm</type>"), "{xml}");
        let (mut e, _) = domain_of(&xml);
        // The export writes the serial console a Domain has by default.
        e.spec.devices.serial = None;
        assert_eq!((e.metadata, e.spec), (d.metadata.clone(), d.spec.clone()));
        // A renamed object keeps its new name.
        let mut renamed = d;
        renamed.metadata.name = Some("other".into());
        assert!(domain_to_xml(&renamed).contains("<name>other</name>"));
    }

    #[test]
    fn what_define_refuses_is_refused_naming_the_element() {
        let base = |inner: &str| {
            format!("<domain type='kvm'><name>x</name><memory>1048576</memory>{inner}</domain>")
        };
        for (xml, want) in [
            (
                base("<vcpu>100000</vcpu>"),
                "domain/vcpu: spec.vcpus: must be between 1 and 255 (got 100000)",
            ),
            (
                base("<vcpu current='8'>4</vcpu>"),
                "domain/vcpu: spec.maxVcpus",
            ),
            (
                "<domain type='kvm'><name>x</name><memory>0</memory></domain>".into(),
                "domain/memory: spec.memory: must be greater than zero",
            ),
            (
                base("<uuid>not-a-uuid</uuid>"),
                "domain/uuid: 'not-a-uuid' is not a UUID",
            ),
            (
                base("<os><type arch='ARM 64'>hvm</type></os>"),
                "domain/os/type/@arch: spec.arch",
            ),
            (
                base(
                    "<devices><disk type='file'><source file='/a'/><boot order='0'/></disk></devices>",
                ),
                "domain/devices/disk[0]: spec.devices.disks[0].bootOrder",
            ),
            (
                base(
                    "<devices><interface type='network'><mac address='01:00:00:00:00:01'/><source network='n'/></interface></devices>",
                ),
                "domain/devices/interface[0]: spec.devices.interfaces[0].mac",
            ),
        ] {
            let e = from_xml(&xml, &ImportOptions::default()).expect_err(&xml);
            assert!(e.to_string().starts_with(want), "{xml}: {e}");
        }
        let many: String = (0..65)
            .map(|i| format!("<disk type='file'><source file='/d{i}'/></disk>"))
            .collect();
        let e = from_xml(
            &base(&format!("<devices>{many}</devices>")),
            &ImportOptions::default(),
        )
        .expect_err("65 disks");
        assert_eq!(
            e.to_string(),
            "domain/devices/disk[64]: more than 64 disks; a Domain has at most 64"
        );
    }

    #[test]
    fn disks_are_named_as_libvirt_counts_and_sources_keep_apart() {
        let disks: String = (0..30)
            .map(|i| format!("<disk type='file'><source file='/dir{}/disk.img'/><target dev='hd{i}' bus='usb'/></disk>", i % 2))
            .collect();
        let xml = format!(
            "<domain type='qemu'><name>d</name><memory>1024</memory><devices>{disks}<disk type='block'><source dev='/dev/sdb'/><target dev='vdb'/></disk><disk type='network'><source protocol='rbd' name='pool/Image_1'/></disk><disk type='network' device='cdrom'><source protocol='https' name='/isos/x.iso'><host name='example.com'/></source><target dev='sdz' bus='scsi'/></disk><disk type='dir'><source dir='/x'/></disk><interface type='user'/><interface type='bridge'><source bridge='br0'/></interface><interface type='direct'><source dev='eth0'/></interface></devices></domain>"
        );
        let (d, notes) = domain_of(&xml);
        let names: Vec<&str> = d
            .spec
            .devices
            .disks
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names.len(), 33);
        assert_eq!(&names[..3], ["vda", "vdb", "vdc"]);
        assert_eq!(names[25], "vdz");
        assert_eq!(names[26], "vdaa");
        assert_eq!(names[29], "vdad");
        assert_eq!(
            names[30], "vdae",
            "vdb is taken: the block device is renamed"
        );
        assert_eq!(&names[31..], ["vdaf", "sdz"]);
        let volumes: Vec<&str> = d
            .spec
            .devices
            .disks
            .iter()
            .map(|d| d.volume.as_str())
            .collect();
        assert_eq!(&volumes[..3], ["disk", "disk-2", "disk"]);
        assert_eq!(&volumes[30..], ["sdb", "image-1", "x"]);
        let nets: Vec<&str> = d
            .spec
            .devices
            .interfaces
            .iter()
            .map(|i| i.network.as_str())
            .collect();
        assert_eq!(nets, ["default", "br0"]);
        crate::Validate::validate(&d.spec).expect("valid");
        let notes = notes.join("\n");
        for want in [
            "domain/devices/disk/target/@bus: 'usb' becomes virtio (30 times)",
            "the block device /dev/sdb becomes the StorageVol 'sdb'",
            "the rbd disk 'pool/Image_1' becomes the StorageVol 'image-1'",
            "domain/devices/disk[@type='dir']: not modelled",
            "domain/devices/interface[@type='user']: user-mode networking becomes an interface on the Network 'default'",
            "domain/devices/interface[@type='direct']: not modelled",
        ] {
            assert!(notes.contains(want), "{want} not in:\n{notes}");
        }
    }

    #[test]
    fn every_element_that_does_not_carry_over_is_noted_once_with_a_count() {
        let xml = "<domain type='kvm'><name>t</name><memory>1048576</memory><maxMemory slots='16'>4194304</maxMemory><vcpu>2</vcpu><iothreads>2</iothreads><cputune><shares>2048</shares></cputune><numatune><memory mode='strict' nodeset='0'/></numatune><memoryBacking><hugepages/></memoryBacking><launchSecurity type='sev'/><os firmware='efi'><type arch='x86_64'>hvm</type><bootmenu enable='yes'/></os><devices><graphics type='vnc'/><graphics type='spice'/><video/><hostdev mode='subsystem'/><disk type='file'><source file='/a'/><driver name='qemu' type='raw' cache='none'/><address type='pci'/></disk><disk type='file'><source file='/b'/><address type='pci'/></disk></devices></domain>";
        let (d, notes) = domain_of(xml);
        assert_eq!(d.spec.arch.as_deref(), Some("x86_64"));
        for want in [
            "domain/maxMemory: not modelled; skipped",
            "domain/iothreads: not modelled",
            "domain/cputune: not modelled",
            "domain/numatune: not modelled",
            "domain/memoryBacking: not modelled",
            "domain/launchSecurity: not modelled",
            "domain/os/bootmenu: not modelled",
            "domain/devices/graphics: not modelled; skipped (2 times)",
            "domain/devices/video: not modelled; skipped",
            "domain/devices/hostdev: not modelled",
            "domain/devices/disk/address: not modelled; skipped (2 times)",
            "domain/devices/disk/driver (cache, io, ...): not modelled",
        ] {
            assert!(
                notes.iter().any(|n| n == want || n.starts_with(want)),
                "{want} not in:\n{}",
                notes.join("\n")
            );
        }
        // A flood of different notes ends in one summary line.
        let floods: String = (0..5000).map(|i| format!("<x{i}/>")).collect();
        let xml =
            format!("<domain type='kvm'><name>t</name><memory>1024</memory>{floods}</domain>");
        let (_, notes) = domain_of(&xml);
        assert!(notes.len() <= MAX_NOTES + 2, "{}", notes.len());
        assert!(
            notes.iter().any(|n| n.contains("more notes not shown")),
            "{notes:?}"
        );
    }

    #[test]
    fn hostile_descriptions_end_at_once_with_one_line() {
        // About 1 MB nested 150,000 deep: libxml2's depth limit, no stack.
        let deep = format!(
            "<domain type='kvm'>{}{}</domain>",
            "<a>".repeat(150_000),
            "</a>".repeat(150_000)
        );
        // 50 MB, ~480,000 disks: past the size cap before any parsing.
        let disk = "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/var/lib/libvirt/images/d.img'/><target dev='vda' bus='virtio'/></disk>\n";
        let big = format!(
            "<domain type='kvm'><name>big</name><memory>1024</memory><devices>{}</devices></domain>",
            disk.repeat(50_000_000 / disk.len())
        );
        // Under the size cap: 7,000 disks stop at the 65th; 2.5 million
        // empty elements at the node cap.
        let many_disks = format!(
            "<domain type='kvm'><name>big</name><memory>1024</memory><devices>{}</devices></domain>",
            disk.repeat(1_000_000 / disk.len())
        );
        let many_nodes = format!("<domain type='kvm'>{}</domain>", "<a/>".repeat(2_500_000));
        for (what, xml, want) in [
            (
                "150,000 deep",
                &deep,
                "elements nest deeper than 256 levels",
            ),
            ("50 MB", &big, "Vireo reads at most 10485760"),
            ("1 MB of disks", &many_disks, "more than 64 disks"),
            (
                "2.5 million elements",
                &many_nodes,
                "more than 100000 elements and attributes",
            ),
        ] {
            let started = std::time::Instant::now();
            let e = from_xml(xml, &ImportOptions::default())
                .expect_err(what)
                .to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{what}: {e}");
            eprintln!(
                "{what} ({} bytes): {e} ({:?})",
                xml.len(),
                started.elapsed()
            );
        }
    }
}
