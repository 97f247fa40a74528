//! `Domain`: a virtual machine (libvirt's `virDomainPtr`).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, is_false};

/// A virtual machine. `kubectl apply` of a Domain *defines* it; whether it
/// should run is [`DomainSpec::run_strategy`]; what runs is [`DomainStatus`],
/// written by the agent of the node it is bound to.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vireo.dev",
    version = "v1alpha1",
    kind = "Domain",
    namespaced,
    status = "DomainStatus",
    shortname = "dom",
    shortname = "vm",
    category = "vireo",
    printcolumn = r#"{"name":"ID","type":"integer","jsonPath":".status.id"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"VCPUs","type":"integer","jsonPath":".spec.vcpus"}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".spec.memory"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.info.reason","priority":1}"#,
    printcolumn = r#"{"name":"UUID","type":"string","jsonPath":".spec.uuid","priority":1}"#
)]
#[x_kube(validation = Rule::new("isQuantity(string(self.memory)) && quantity(string(self.memory)).isGreaterThan(quantity('0')) && quantity(string(self.memory)).isLessThan(quantity('16Ei'))").message("spec.memory must be a size above zero and below 16Ei, such as 512Mi").field_path(".memory"))]
#[x_kube(validation = Rule::new("!has(self.currentMemory) || (isQuantity(string(self.currentMemory)) && quantity(string(self.currentMemory)).isGreaterThan(quantity('0')))").message("spec.currentMemory must be a size above zero, such as 256Mi").field_path(".currentMemory"))]
#[x_kube(validation = Rule::new("!has(self.currentMemory) || !isQuantity(string(self.currentMemory)) || !isQuantity(string(self.memory)) || quantity(string(self.currentMemory)).compareTo(quantity(string(self.memory))) <= 0").message("spec.currentMemory must not be greater than spec.memory").field_path(".currentMemory"))]
#[x_kube(validation = Rule::new("!has(self.maxVcpus) || self.maxVcpus >= self.vcpus").message("spec.maxVcpus must not be less than spec.vcpus").field_path(".maxVcpus"))]
#[x_kube(validation = Rule::new("!(has(self.os) && has(self.os.boot) && size(self.os.boot) > 0 && has(self.devices) && has(self.devices.disks) && self.devices.disks.exists(d, has(d.bootOrder)))").message("spec.os.boot: give spec.os.boot or per-disk bootOrder, not both (libvirt refuses the mix)").field_path(".os.boot"))]
#[serde(rename_all = "camelCase")]
pub struct DomainSpec {
    /// The hypervisor driver that runs this domain, like `<domain type='kvm'>`:
    /// `kvm` (vireo-vmm on /dev/kvm), `qemu` (QEMU with software emulation) or
    /// `test` (libvirt's in-memory test driver).
    #[serde(rename = "type")]
    pub domain_type: DomainType,

    /// RFC 4122 UUID. Defaulted when absent; never changes afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.uuid cannot change once set"))]
    pub uuid: Option<String>,

    /// The guest's CPU architecture (libvirt's `<os><type arch>`): `x86_64`
    /// when absent. Kept as written (`i686`, `aarch64`, ...): a driver that
    /// cannot run it refuses the Domain, naming this field (the qemu driver
    /// runs `x86_64` and `i686`, the kvm driver `x86_64`; the test driver
    /// simulates any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z][a-z0-9_]*$"))]
    pub arch: Option<String>,

    /// Maximum memory of the guest (libvirt's `<memory>`), e.g. `512Mi`.
    pub memory: Quantity,

    /// Memory the guest has now (libvirt's `<currentMemory>`); at most
    /// `memory`, which it defaults to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_memory: Option<Quantity>,

    /// Number of virtual CPUs the guest boots with.
    #[schemars(range(min = 1, max = 255))]
    pub vcpus: u32,

    /// Upper bound for `setvcpus` while the guest runs; defaults to `vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub max_vcpus: Option<u32>,

    /// How the guest boots: a kernel directly, or firmware from a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsSpec>,

    /// Disks, network interfaces and the serial console.
    #[serde(default)]
    pub devices: DomainDevices,

    /// A cloud-init NoCloud seed for the guest (KubeVirt's
    /// `cloudInitNoCloud`, `virt-install --cloud-init`): the node makes a
    /// small read-only disk labelled `cidata` holding `user-data`,
    /// `meta-data` and `network-config`, attached after the Domain's disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,

    /// Whether the domain should be active, and what to do when it stops.
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// What happens when the guest powers off, reboots or crashes
    /// (libvirt's `<on_poweroff>`, `<on_reboot>`, `<on_crash>`).
    #[serde(default)]
    pub lifecycle: Lifecycle,

    /// Labels a Host must carry for this domain to be placed on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// What a drain of its Host does to it (KubeVirt's evictionStrategy):
    /// `LiveMigrate` moves it to another Host while it runs, `Shutdown`
    /// stops it there and places it on another Host, `None` (the default)
    /// leaves it where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_strategy: Option<EvictionStrategy>,
}

/// What draining a Host does to a Domain on it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EvictionStrategy {
    /// Migrate it live to another Host (a DomainMigration the operator creates).
    LiveMigrate,
    /// Shut it down on the drained Host and place it on another, where its
    /// runStrategy applies.
    Shutdown,
    /// Leave it running where it is.
    #[default]
    None,
}

/// The hypervisor driver of a domain.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// vireo-vmm, our micro-VMM on /dev/kvm.
    Kvm,
    /// QEMU with software emulation (TCG), or KVM when asked and available.
    Qemu,
    /// libvirt's in-memory test driver: no guest runs.
    Test,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
            Self::Test => "test",
        }
    }
}

impl fmt::Display for DomainType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The architecture of a Domain that does not say (`spec.arch`).
pub const DEFAULT_ARCH: &str = "x86_64";

impl DomainSpec {
    /// The guest's architecture: `spec.arch`, or `x86_64`.
    pub fn arch(&self) -> &str {
        self.arch.as_deref().unwrap_or(DEFAULT_ARCH)
    }

    /// Whether the Domain uses no volume and no network, so that nothing
    /// has to be ready on its node before it starts (the operator's
    /// `VolumesReady` and `NetworksReady` gates have nothing to wait for).
    pub fn needs_no_gate(&self) -> bool {
        self.volume_refs().is_empty() && self.devices.interfaces.is_empty()
    }

    /// Every StorageVol the Domain uses, with the field that names it: its
    /// disks' volumes, then the kernel's and the initrd's.
    pub fn volume_refs(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = self
            .devices
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("spec.devices.disks[{i}].volume"), d.volume.as_str()))
            .collect();
        if let Some(os) = &self.os {
            if let Some(v) = &os.kernel_volume {
                out.push(("spec.os.kernelVolume".into(), v.as_str()));
            }
            if let Some(v) = &os.initrd_volume {
                out.push(("spec.os.initrdVolume".into(), v.as_str()));
            }
        }
        out
    }

    /// Whether the Domain uses the StorageVol `name` (of its namespace).
    pub fn uses_volume(&self, name: &str) -> bool {
        self.volume_refs().iter().any(|(_, v)| *v == name)
    }

    /// Renames every StorageVol the Domain names (to the node's names).
    pub fn map_volumes(&mut self, f: impl Fn(&str) -> String) {
        for disk in &mut self.devices.disks {
            disk.volume = f(&disk.volume);
        }
        if let Some(os) = &mut self.os {
            for v in [&mut os.kernel_volume, &mut os.initrd_volume]
                .into_iter()
                .flatten()
            {
                *v = f(v);
            }
        }
    }
}

/// How the guest boots, libvirt's `<os>`. Direct kernel boot (`<kernel>`,
/// `<initrd>`, `<cmdline>`): the kernel and initrd are files in a boot
/// directory the node's agent allows (`kernel`, `initrd`), or StorageVols of
/// the Domain's namespace (`kernelVolume`, `initrdVolume`), never both for
/// one of them. Firmware boot (`firmware: bios | efi`, libvirt's
/// `<os firmware>`): no kernel; the firmware boots a disk, a CD-ROM or the
/// network in `boot` order (or by the disks' `bootOrder`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.kernel) && has(self.kernelVolume))").message("spec.os.kernelVolume: give kernel or kernelVolume, not both").field_path(".kernelVolume"))]
#[x_kube(validation = Rule::new("!has(self.secureBoot) || !self.secureBoot || (has(self.firmware) && self.firmware == 'efi')").message("spec.os.secureBoot: needs spec.os.firmware: efi").field_path(".secureBoot"))]
#[x_kube(validation = Rule::new("!(has(self.initrd) && has(self.initrdVolume))").message("spec.os.initrdVolume: give initrd or initrdVolume, not both").field_path(".initrdVolume"))]
#[x_kube(validation = Rule::new("!has(self.kernel) || (self.kernel.startsWith('/') && !self.kernel.contains('/../') && !self.kernel.endsWith('/..'))").message("spec.os.kernel: must be an absolute path without '..'").field_path(".kernel"))]
#[x_kube(validation = Rule::new("!has(self.initrd) || (self.initrd.startsWith('/') && !self.initrd.contains('/../') && !self.initrd.endsWith('/..'))").message("spec.os.initrd: must be an absolute path without '..'").field_path(".initrd"))]
#[serde(rename_all = "camelCase")]
pub struct OsSpec {
    /// Machine type for drivers that have several (`microvm`, `q35`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Kernel image (bzImage, ELF vmlinux or PVH ELF): an absolute path in
    /// a boot directory the agent allows (or a volume of its pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub kernel: Option<String>,
    /// Kernel image from a StorageVol of the Domain's namespace (raw), by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub kernel_volume: Option<String>,
    /// Initial ramdisk: an absolute path in a boot directory the agent
    /// allows (or a volume of its pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub initrd: Option<String>,
    /// Initial ramdisk from a StorageVol of the Domain's namespace, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub initrd_volume: Option<String>,
    /// Kernel command line (at most 4096 bytes, x86's largest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
    /// Boot firmware (libvirt's `<os firmware>`): `bios` (SeaBIOS) or `efi`
    /// (OVMF, with a variable store of the Domain's own). Absent: direct
    /// kernel boot, which needs `kernel` or `kernelVolume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// UEFI Secure Boot (`firmware: efi` only): OVMF's secure-boot build
    /// with Microsoft's keys enrolled in a new variable store, on q35 with
    /// SMM, so only signed boot loaders (Debian's shim) run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub secure_boot: bool,
    /// Boot devices in order (libvirt's `<boot dev>`): the first disk, the
    /// first CD-ROM, the first interface. Not together with a disk's
    /// `bootOrder`. Default with firmware: `[hd]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3), extend("x-kubernetes-list-type" = "set"))]
    pub boot: Vec<BootDevice>,
}

/// Boot firmware.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS).
    Bios,
    /// UEFI (OVMF).
    Efi,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bios => "bios",
            Self::Efi => "efi",
        }
    }
}

/// A boot device class (libvirt's `<boot dev>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    /// The first disk (`device: disk`).
    Hd,
    /// The first CD-ROM.
    Cdrom,
    /// The first network interface (PXE).
    Network,
}

impl BootDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hd => "hd",
            Self::Cdrom => "cdrom",
            Self::Network => "network",
        }
    }
}

/// The devices of a domain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.interfaces) || self.interfaces.all(a, !has(a.mac) || self.interfaces.filter(b, has(b.mac) && b.mac.lowerAscii() == a.mac.lowerAscii()).size() == 1)").message("spec.devices.interfaces: two interfaces have the same MAC address").field_path(".interfaces"))]
#[serde(rename_all = "camelCase")]
pub struct DomainDevices {
    /// Disks and CD-ROMs, each backed by a StorageVol of the Domain's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<Disk>,
    /// Virtio network interfaces, each on a Network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub interfaces: Vec<Interface>,
    /// The serial console (present unless disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialSpec>,
}

/// A disk backed by a StorageVol.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("(has(self.bus) && self.bus != 'virtio') ? self.name.startsWith('sd') : self.name.startsWith('vd')").message("spec.devices.disks[].name: a virtio disk is named vdX, a sata or scsi disk sdX").field_path(".name"))]
#[x_kube(validation = Rule::new("!has(self.device) || self.device != 'cdrom' || (has(self.bus) && self.bus != 'virtio')").message("spec.devices.disks[].bus: a CD-ROM is on bus sata or scsi, not virtio").field_path(".bus"))]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Guest device name, as libvirt's `<target dev>`: `vda`, `vdb`, ...
    /// for virtio, `sda`, `sdb`, ... for sata and scsi.
    #[schemars(regex(pattern = r"^[vs]d[a-z]{1,2}$"))]
    pub name: String,
    /// Name of a StorageVol in the Domain's own namespace (a plain name:
    /// no namespace prefix, no path).
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub volume: String,
    /// Attach the disk read-only (a CD-ROM always is).
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// `disk` (default) or `cdrom` (read-only; its volume may be `iso`).
    #[serde(default, skip_serializing_if = "DiskDevice::is_disk")]
    pub device: DiskDevice,
    /// `virtio` (default), `sata` (q35's AHCI) or `scsi` (virtio-scsi),
    /// for guests without virtio-blk drivers.
    #[serde(default, skip_serializing_if = "DiskBus::is_virtio")]
    pub bus: DiskBus,
    /// Place in the boot order (libvirt's per-device `<boot order>`),
    /// from 1; not together with `spec.os.boot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub boot_order: Option<u32>,
}

impl Disk {
    /// Whether the guest may write to it.
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.device == DiskDevice::Cdrom
    }
}

/// What a disk is to the guest (libvirt's `<disk device>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskDevice {
    #[default]
    Disk,
    /// A read-only CD-ROM drive.
    Cdrom,
}

impl DiskDevice {
    fn is_disk(&self) -> bool {
        *self == Self::Disk
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disk => "disk",
            Self::Cdrom => "cdrom",
        }
    }
}

/// The bus a disk is on (libvirt's `<target bus>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Sata,
    Scsi,
}

impl DiskBus {
    fn is_virtio(&self) -> bool {
        *self == Self::Virtio
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Virtio => "virtio",
            Self::Sata => "sata",
            Self::Scsi => "scsi",
        }
    }
}

/// A network interface on a Network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name, unique within the domain (`net0`): a valid Linux
    /// device name (at most 15 characters, no '/', ':' or spaces).
    #[schemars(regex(pattern = r"^[!-.0-9;-~]{1,15}$"))]
    pub name: String,
    /// Name of the Network the interface joins (of the Domain's namespace:
    /// a plain name).
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ))]
    pub network: String,
    /// MAC address; derived from the Domain's UUID when absent, so it is
    /// stable across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 17))]
    #[schemars(regex(pattern = r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$"))]
    pub mac: Option<String>,
}

/// cloud-init's NoCloud data source. Each document is given inline or read
/// from a key of a Secret or ConfigMap of the Domain's namespace (on a
/// cluster: the node's agent reads it when it defines the Domain there; it
/// never goes into status, events or logs).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.userData) && has(self.userDataFrom))").message("spec.cloudInit.userDataFrom: give userData or userDataFrom, not both").field_path(".userDataFrom"))]
#[x_kube(validation = Rule::new("!(has(self.metaData) && has(self.metaDataFrom))").message("spec.cloudInit.metaDataFrom: give metaData or metaDataFrom, not both").field_path(".metaDataFrom"))]
#[x_kube(validation = Rule::new("!(has(self.networkConfig) && has(self.networkConfigFrom))").message("spec.cloudInit.networkConfigFrom: give networkConfig or networkConfigFrom, not both").field_path(".networkConfigFrom"))]
#[serde(rename_all = "camelCase")]
pub struct CloudInit {
    /// The guest's host name: `local-hostname` in the meta-data Vireo
    /// writes when `metaData` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(
        pattern = r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*$"
    ))]
    pub hostname: Option<String>,
    /// `user-data`: a `#cloud-config` document, a script, or MIME multipart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub user_data: Option<String>,
    /// `user-data` from a Secret or ConfigMap key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_from: Option<DataSource>,
    /// `meta-data` as given. Default: `instance-id` (the Domain's UUID) and
    /// `local-hostname` (`hostname`, else the Domain's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub meta_data: Option<String>,
    /// `meta-data` from a Secret or ConfigMap key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data_from: Option<DataSource>,
    /// `network-config` (cloud-init's network config version 1 or 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub network_config: Option<String>,
    /// `network-config` from a Secret or ConfigMap key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config_from: Option<DataSource>,
}

/// A key of a Secret or a ConfigMap in the Domain's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.secretKeyRef) != has(self.configMapKeyRef)").message("give exactly one of secretKeyRef, configMapKeyRef"))]
#[serde(rename_all = "camelCase")]
pub struct DataSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
}

/// An object of the Domain's namespace and one of its keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct KeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

impl CloudInit {
    /// Whether a document still comes from a Secret or ConfigMap (the node
    /// cannot build the seed before the agent has read it).
    pub fn has_references(&self) -> bool {
        self.user_data_from.is_some()
            || self.meta_data_from.is_some()
            || self.network_config_from.is_some()
    }
}

/// The serial console.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SerialSpec {
    /// Whether the guest has a serial port at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

/// Whether a domain should be active (KubeVirt's run strategies).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunStrategy {
    /// Keep it running: start it, and start it again whenever it stops.
    #[default]
    Always,
    /// Start it, and start it again only after a crash.
    RerunOnFailure,
    /// Start it once; whatever way it stops, leave it stopped.
    Once,
    /// Do nothing on our own: the user starts and stops it.
    Manual,
    /// Keep it stopped.
    Halted,
    /// Keep it stopped with its memory (libvirt's managed save): a running
    /// guest's memory and device state are saved on its node and it shuts
    /// off; the next start (`Always`, `Manual` plus `vireo start`) resumes
    /// it where it was instead of booting it.
    Saved,
}

/// libvirt's lifecycle events and actions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// When the guest powers off (default `destroy`).
    #[serde(default = "LifecycleAction::destroy")]
    pub on_poweroff: LifecycleAction,
    /// When the guest reboots (default `restart`).
    #[serde(default = "LifecycleAction::restart")]
    pub on_reboot: LifecycleAction,
    /// When the guest crashes (default `destroy`).
    #[serde(default = "LifecycleAction::destroy")]
    pub on_crash: LifecycleAction,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            on_poweroff: LifecycleAction::Destroy,
            on_reboot: LifecycleAction::Restart,
            on_crash: LifecycleAction::Destroy,
        }
    }
}

/// What to do on a lifecycle event (libvirt's `destroy`, `restart`, `preserve`, `rename-restart`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LifecycleAction {
    /// Stop the domain: it becomes shutoff.
    Destroy,
    /// Start the domain again.
    Restart,
    /// Keep the domain's resources for inspection (crashed, or paused).
    Preserve,
}

impl LifecycleAction {
    fn destroy() -> Self {
        Self::Destroy
    }
    fn restart() -> Self {
        Self::Restart
    }
}

/// What the node observed, written only by the agent that runs the domain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainStatus {
    /// The state `kubectl get` shows: the agent's observed state, or
    /// `pending` before placement and `unknown` while the host is not reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DomainState>,
    /// How many times an agent started the domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_count: Option<u32>,
    /// Runtime ID of the current activation; absent while inactive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// The Host the domain is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The UUID the domain runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// libvirt's GetInfo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<DomainInfo>,
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Scheduled`, `VolumesReady`, `NetworksReady`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The running guest's interfaces and the addresses their networks
    /// leased to them (`virsh domifaddr`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub interfaces: Vec<InterfaceStatus>,
    /// What the guest agent inside the running guest reports (qemu-ga
    /// protocol: `vireo-guest-agent` or QEMU's own); absent while no agent
    /// answers (condition `AgentConnected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
}

/// What a guest agent reports about the guest (libvirt's
/// `virDomainGetGuestInfo`, `virsh guestinfo`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestInfo {
    /// The agent's own version (`guest-info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<GuestOs>,
    /// The guest's network interfaces and their addresses, as the guest
    /// sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<GuestInterface>,
    /// Users logged in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<GuestUser>,
    /// Mounted filesystems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<GuestFilesystem>,
    /// `thawed` or `frozen` (`domfsfreeze`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_freeze: Option<String>,
}

/// The guest's operating system (`/etc/os-release` and `uname`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestOs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
}

/// A network interface inside the guest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestInterface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `address/prefix`, IPv4 and IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// A user logged in to the guest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestUser {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_time: Option<u64>,
}

/// A filesystem mounted in the guest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestFilesystem {
    pub mountpoint: String,
    /// The guest's device name (`vda1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
}

/// An interface of a running guest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// `spec.devices.interfaces[].name`.
    pub name: String,
    /// The Network it is on.
    pub network: String,
    /// Its MAC address (given, or derived from the UUID).
    pub mac: String,
    /// The host-side device (tap) on the network's bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `address/prefix` from the network's DHCP lease; absent until leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// libvirt's `virDomainInfo` with the state reason.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainInfo {
    pub state: DomainState,
    pub reason: DomainReason,
    /// Maximum memory.
    pub max_memory: Quantity,
    /// Memory the guest has now.
    pub memory: Quantity,
    /// Virtual CPUs now.
    pub vcpus: u32,
    /// CPU time used, in nanoseconds.
    pub cpu_time_ns: u64,
}

/// libvirt's `virDomainState`, plus `unknown` for a domain whose host is not reporting.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    Shutdown,
    Shutoff,
    Crashed,
    PmSuspended,
    /// The host that runs it is not reporting (Vireo only).
    Unknown,
    /// Not placed on a host yet (Vireo only).
    Pending,
}

impl DomainState {
    /// Whether a domain in this state is active (has an ID, uses resources).
    pub fn is_active(self) -> bool {
        !matches!(self, Self::Shutoff | Self::NoState | Self::Pending)
    }

    /// virsh's words: `running`, `idle`, `paused`, `in shutdown`, `shut off`, ...
    pub fn virsh_name(self) -> &'static str {
        match self {
            Self::NoState => "no state",
            Self::Running => "running",
            Self::Blocked => "idle",
            Self::Paused => "paused",
            Self::Shutdown => "in shutdown",
            Self::Shutoff => "shut off",
            Self::Crashed => "crashed",
            Self::PmSuspended => "pmsuspended",
            Self::Unknown => "unknown",
            Self::Pending => "pending",
        }
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.virsh_name())
    }
}

/// Why a domain is in its state (libvirt's `virDomain*Reason` enums, merged).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DomainReason {
    Unknown,
    /// running: normal startup.
    Booted,
    /// running: resumed after a pause.
    Unpaused,
    /// running: restored from a saved state.
    Restored,
    /// running: woken from power management suspend.
    Wakeup,
    /// paused: paused by the user.
    User,
    /// paused: an I/O error stopped it.
    IoError,
    /// paused: a watchdog fired.
    Watchdog,
    /// paused: paused while shutting down.
    ShuttingDown,
    /// paused: starting, not yet running.
    StartingUp,
    /// shutoff: the guest shut down.
    Shutdown,
    /// shutoff: forced off.
    Destroyed,
    /// shutoff or crashed: the guest or its process crashed.
    Crashed,
    /// shutoff: failed to start.
    Failed,
    /// shutoff: saved to a file.
    Saved,
    /// crashed: the guest kernel panicked.
    Panicked,
    /// running: resumed on this node after a live migration (libvirt's
    /// `VIR_DOMAIN_RUNNING_MIGRATED`); shutoff: its source copy, stopped
    /// after the guest moved away.
    Migrated,
    /// paused: a live migration holds it (the target waiting for the
    /// state, or the source once everything is sent).
    Migration,
    /// running, paused or shutoff: reverted to a snapshot.
    FromSnapshot,
}

impl DomainReason {
    /// virsh's words for `domstate --reason`.
    pub fn virsh_name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Booted => "booted",
            Self::Unpaused => "unpaused",
            Self::Restored => "restored",
            Self::Wakeup => "event wakeup",
            Self::User => "user",
            Self::IoError => "I/O error",
            Self::Watchdog => "watchdog",
            Self::ShuttingDown => "shutting down",
            Self::StartingUp => "starting up",
            Self::Shutdown => "shutdown",
            Self::Destroyed => "destroyed",
            Self::Crashed => "crashed",
            Self::Failed => "failed",
            Self::Saved => "saved",
            Self::Panicked => "panicked",
            Self::Migrated => "migrated",
            Self::Migration => "migration",
            Self::FromSnapshot => "from snapshot",
        }
    }
}

impl fmt::Display for DomainReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.virsh_name())
    }
}
