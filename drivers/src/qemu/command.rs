//! The `qemu-system-x86_64` command line for a Domain.

use std::collections::HashMap;
use vireo_crds::quantity::parse_quantity;

use vireo_crds::{BootDevice, DiskBus, DiskDevice, Domain, Firmware, LifecycleAction, VolFormat};

use crate::vm::{DiskFile, RunPaths};

/// Machine types the driver builds command lines for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// QEMU's minimal machine: virtio-mmio devices found through ACPI, no
    /// PCI, no firmware (the default, like Firecracker's shape).
    Microvm,
    /// A PC with PCIe: virtio-pci devices, CPU hot-plug.
    Q35,
}

impl Machine {
    /// The machine of a Domain: `spec.os.machine`, by default microvm for
    /// direct kernel boot and q35 for firmware boot or a sata, scsi or
    /// CD-ROM disk (which microvm has no bus for).
    pub fn from_spec(def: &Domain) -> Result<Self, String> {
        let firmware = firmware_of(def);
        let pc_disk = def
            .spec
            .devices
            .disks
            .iter()
            .position(|d| d.bus != DiskBus::Virtio || d.device != DiskDevice::Disk);
        match def.spec.os.as_ref().and_then(|o| o.machine.as_deref()) {
            None if firmware.is_some() || pc_disk.is_some() => Ok(Self::Q35),
            None => Ok(Self::Microvm),
            Some("microvm") => {
                if let Some(f) = firmware {
                    return Err(format!(
                        "spec.os.machine: firmware: {} needs the q35 machine (leave spec.os.machine out)",
                        f.as_str()
                    ));
                }
                if let Some(i) = pc_disk {
                    return Err(format!(
                        "spec.devices.disks[{i}]: microvm has only virtio disks; use spec.os.machine: q35"
                    ));
                }
                Ok(Self::Microvm)
            }
            Some("q35") => Ok(Self::Q35),
            Some(other) => Err(format!(
                "spec.os.machine: '{other}' is not a machine type of the qemu driver (microvm, q35)"
            )),
        }
    }

    fn device(self, kind: &str) -> String {
        match self {
            Self::Microvm => format!("virtio-{kind}-device"),
            Self::Q35 => format!("virtio-{kind}-pci"),
        }
    }
}

/// Accelerator: TCG for `type: qemu` (libvirt's meaning), KVM when the
/// definition asks for it (a `vireo.dev/accel: kvm` annotation) and the
/// host has hardware KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// The annotation that asks for KVM acceleration under the qemu driver.
pub const ACCEL_ANNOTATION: &str = "vireo.dev/accel";

pub fn accel_of(def: &Domain) -> Result<Accel, String> {
    match def
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACCEL_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("tcg") => Ok(Accel::Tcg),
        Some("kvm") => Ok(Accel::Kvm),
        Some(other) => Err(format!(
            "metadata.annotations[{ACCEL_ANNOTATION}]: '{other}' is not tcg or kvm"
        )),
    }
}

/// The Domain's boot firmware, if it boots through one.
pub fn firmware_of(def: &Domain) -> Option<Firmware> {
    def.spec.os.as_ref().and_then(|o| o.firmware)
}

/// UEFI firmware (Debian's `ovmf`): the code, read-only and shared, and
/// the template each Domain's variable store starts from.
pub const OVMF_CODE: &str = vireo_crds::libvirt_xml::OVMF_CODE;
pub const OVMF_VARS: &str = vireo_crds::libvirt_xml::OVMF_VARS;
pub const OVMF_CODE_SECURE: &str = vireo_crds::libvirt_xml::OVMF_CODE_SECURE;
pub const OVMF_VARS_SECURE: &str = vireo_crds::libvirt_xml::OVMF_VARS_SECURE;

/// Whether the Domain boots UEFI with Secure Boot.
pub fn secure_boot(def: &Domain) -> bool {
    firmware_of(def) == Some(Firmware::Efi) && def.spec.os.as_ref().is_some_and(|o| o.secure_boot)
}

/// OVMF's code and the template of a new variable store, for a Domain.
pub fn ovmf_files(def: &Domain) -> (&'static str, &'static str) {
    if secure_boot(def) {
        (OVMF_CODE_SECURE, OVMF_VARS_SECURE)
    } else {
        (OVMF_CODE, OVMF_VARS)
    }
}

/// QEMU's `bootindex` of each device (disk names, interface names), as
/// libvirt gives them: per-disk `bootOrder` when set; otherwise the classes
/// of `spec.os.boot` (default `[hd]`) in order, each to the first device of
/// its class. Only for firmware boot: a kernel booted directly needs none.
pub fn boot_indexes(def: &Domain) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    if firmware_of(def).is_none() {
        return out;
    }
    let disks = &def.spec.devices.disks;
    if disks.iter().any(|d| d.boot_order.is_some()) {
        for d in disks {
            if let Some(o) = d.boot_order {
                out.insert(d.name.clone(), o);
            }
        }
        return out;
    }
    let order = def
        .spec
        .os
        .as_ref()
        .map(|o| o.boot.clone())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| vec![BootDevice::Hd]);
    for (i, class) in order.iter().enumerate() {
        let first = match class {
            BootDevice::Hd => disks
                .iter()
                .find(|d| d.device == DiskDevice::Disk)
                .map(|d| d.name.clone()),
            BootDevice::Cdrom => disks
                .iter()
                .find(|d| d.device == DiskDevice::Cdrom)
                .map(|d| d.name.clone()),
            BootDevice::Network => def.spec.devices.interfaces.first().map(|n| n.name.clone()),
        };
        if let Some(name) = first {
            out.entry(name).or_insert(i as u32 + 1);
        }
    }
    out
}

/// Tap names and derived MACs live with the taps (`crate::bridge::tap`).
pub use crate::bridge::tap::{derived_mac, tap_name};

/// The host TSC frequency in kHz, from /proc/cpuinfo; microvm guests under
/// TCG get it on their command line, since calibrating against the PIT on
/// a loaded host fails now and then.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Builds the arguments (without the program name).
pub fn build(
    def: &Domain,
    paths: &RunPaths,
    disks: &[DiskFile],
    accel: Accel,
) -> Result<Vec<String>, String> {
    let spec = &def.spec;
    let name = def.metadata.name.clone().unwrap_or_default();
    let uuid = spec.uuid.clone().unwrap_or_default();
    let machine = Machine::from_spec(def)?;
    let firmware = firmware_of(def);
    let default_os = vireo_crds::OsSpec::default();
    let os = match (spec.os.as_ref(), firmware) {
        (Some(os), _) => os,
        (None, Some(_)) => &default_os,
        (None, None) => {
            return Err(
                "spec.os: the qemu driver boots a kernel directly or through firmware; set spec.os.kernel or spec.os.firmware"
                    .into(),
            );
        }
    };
    let kernel = match (os.kernel.as_deref(), firmware) {
        (Some(k), _) => Some(k),
        (None, Some(_)) => None,
        (None, None) => {
            return Err(
                "spec.os.kernel is required by the qemu driver without spec.os.firmware".into(),
            );
        }
    };
    let boot = boot_indexes(def);
    let bootindex = |name: &str| {
        boot.get(name)
            .map(|i| format!(",bootindex={i}"))
            .unwrap_or_default()
    };
    let max = parse_quantity(&spec.memory).map_err(|e| format!("spec.memory: {e}"))?;
    let max_mib = max.div_ceil(1 << 20).max(1);
    let max_vcpus = spec.max_vcpus.unwrap_or(spec.vcpus).max(spec.vcpus);
    let path = |p: &std::path::Path| p.display().to_string();

    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={name},debug-threads=on")]);
    push(&["-uuid", &uuid]);
    let machine_arg = match machine {
        // rtc stays on: without it the cloud kernel hangs early (KVM-HERE.md).
        Machine::Microvm => {
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,acpi=on".to_string()
        }
        // Firmware: no display, so SeaBIOS writes its screen to the
        // serial port (QEMU's etc/sercon-port); OVMF's console is serial.
        Machine::Q35 if firmware.is_some() => {
            let mut m = "q35,graphics=off".to_string();
            if secure_boot(def) {
                // The secure-boot build keeps its variables behind SMM.
                m.push_str(",smm=on");
            }
            if firmware == Some(Firmware::Efi) {
                m.push_str(",pflash0=ovmf-code,pflash1=ovmf-vars");
            }
            m
        }
        Machine::Q35 => "q35".to_string(),
    };
    push(&["-machine", &machine_arg]);
    match accel {
        // A 32 MiB translation cache instead of QEMU's default 1 GiB: it
        // is most of QEMU's own memory under TCG, and small guests fit.
        Accel::Tcg => push(&["-accel", "tcg,tb-size=32", "-cpu", "max"]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&["-m", &format!("{max_mib}M")]);
    let cpu_model = match accel {
        Accel::Tcg => "max-x86_64-cpu",
        Accel::Kvm => "host-x86_64-cpu",
    };
    match machine {
        // microvm has no CPU hot-plug: all vCPUs from the start.
        Machine::Microvm => push(&["-smp", &spec.vcpus.to_string()]),
        // q35: one boot CPU, the rest as devices so that they can be
        // unplugged (setvcpus --live), up to maxVcpus sockets.
        Machine::Q35 => {
            push(&[
                "-smp",
                &format!("1,maxcpus={max_vcpus},sockets={max_vcpus},cores=1,threads=1"),
            ]);
            for i in 1..spec.vcpus {
                push(&[
                    "-device",
                    &format!("{cpu_model},id=vcpu{i},socket-id={i},core-id=0,thread-id=0"),
                ]);
            }
        }
    }
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // The guest's power-off leaves QEMU stopped in 'shutdown' for the
    // driver to decide (lifecycle.onPoweroff); it never exits by itself.
    push(&["-no-shutdown"]);
    // A kernel panic reaches QEMU through the pvpanic device (ISA, described
    // in ACPI; the guest image loads its driver) and stops the guest in
    // 'guest-panicked', which the driver reports as crashed and hands to
    // lifecycle.onCrash. QEMU's default panic action would shut it down,
    // which looks like a power-off.
    push(&["-device", "pvpanic", "-action", "panic=pause"]);
    if spec.lifecycle.on_reboot == LifecycleAction::Destroy {
        push(&["-action", "reboot=shutdown"]);
    }
    push(&["-daemonize", "-pidfile", &path(&paths.pidfile)]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", path(&paths.api)),
    ]);
    let serial = spec.devices.serial.as_ref().is_none_or(|s| s.enabled);
    if serial {
        push(&[
            "-chardev",
            &format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                path(&paths.console_socket),
                path(&paths.console_log)
            ),
            "-serial",
            "chardev:console",
        ]);
    }
    if secure_boot(def) {
        push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
    }
    if firmware == Some(Firmware::Efi) {
        let (code, _) = ovmf_files(def);
        // OVMF as two flash chips: its code, shared and read-only, and
        // the Domain's own variable store (libvirt's <loader>, <nvram>).
        push(&[
            "-blockdev",
            &format!("driver=file,filename={code},node-name=ovmf-code-file,read-only=on"),
            "-blockdev",
            "driver=raw,file=ovmf-code-file,node-name=ovmf-code,read-only=on",
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=ovmf-vars-file",
                path(&paths.nvram).replace(',', ",,")
            ),
            "-blockdev",
            "driver=raw,file=ovmf-vars-file,node-name=ovmf-vars",
        ]);
    }
    if firmware.is_some() {
        // Only the devices given a bootindex boot, in its order.
        push(&["-boot", "strict=on"]);
    }
    if let Some(kernel) = kernel {
        push(&["-kernel", kernel]);
        if let Some(initrd) = os.initrd.as_deref() {
            push(&["-initrd", initrd]);
        }
    }
    let mut cmdline = os.cmdline.clone().unwrap_or_default();
    if machine == Machine::Microvm
        && accel == Accel::Tcg
        && !cmdline.contains("tsc_early_khz=")
        && let Some(khz) = host_tsc_khz()
    {
        cmdline = format!("{cmdline} tsc_early_khz={khz}").trim().to_string();
    }
    if kernel.is_some() && !cmdline.is_empty() {
        push(&["-append", &cmdline]);
    }
    push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
    push(&["-device", &format!("{},rng=rng0", machine.device("rng"))]);
    push(&[
        "-device",
        &format!("{},id=balloon0", machine.device("balloon")),
    ]);
    // The guest agent's channel (libvirt's <channel> with target
    // org.qemu.guest_agent.0; KubeVirt always adds it too): a virtio-serial
    // port whose host end is a Unix socket in the run directory.
    push(&[
        "-chardev",
        &format!(
            "socket,id=qga0,path={},server=on,wait=off",
            path(&paths.guest_agent)
        ),
        "-device",
        &format!("{},id=vser0", machine.device("serial")),
        "-device",
        &format!(
            "virtserialport,bus=vser0.0,chardev=qga0,name={}",
            crate::vm::guest_agent::PORT_NAME
        ),
    ]);
    let specs: HashMap<&str, &vireo_crds::Disk> = spec
        .devices
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d))
        .collect();
    if specs.values().any(|d| d.bus == DiskBus::Scsi) {
        push(&["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    // q35's AHCI controller has six ports (ide.0 ... ide.5).
    let mut sata_port = 0;
    let mut scsi_id = 0;
    for (i, disk) in disks.iter().enumerate() {
        let (device, bus) = specs
            .get(disk.name.as_str())
            .map(|d| (d.device, d.bus))
            .unwrap_or_default();
        let read_only = disk.read_only || device == DiskDevice::Cdrom;
        let ro = if read_only { ",read-only=on" } else { "" };
        let format = match disk.format {
            VolFormat::Raw | VolFormat::Iso => "raw",
            VolFormat::Qcow2 => "qcow2",
        };
        let cd = device == DiskDevice::Cdrom;
        let front = match bus {
            DiskBus::Virtio if cd => {
                return Err(format!(
                    "disk {}: a CD-ROM is on bus sata or scsi, not virtio",
                    disk.name
                ));
            }
            DiskBus::Virtio => machine.device("blk"),
            DiskBus::Sata => {
                if sata_port >= 6 {
                    return Err(format!(
                        "disk {}: q35's SATA controller has 6 ports; use scsi for more",
                        disk.name
                    ));
                }
                let d = format!(
                    "{},bus=ide.{sata_port}",
                    if cd { "ide-cd" } else { "ide-hd" }
                );
                sata_port += 1;
                d
            }
            DiskBus::Scsi => {
                let d = format!(
                    "{},bus=scsi0.0,channel=0,scsi-id={scsi_id},lun=0",
                    if cd { "scsi-cd" } else { "scsi-hd" }
                );
                scsi_id += 1;
                d
            }
        };
        push(&[
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=file{i},cache.direct=off{ro}",
                disk.path.replace(',', ",,")
            ),
            "-blockdev",
            &format!("driver={format},file=file{i},node-name=disk{i}{ro}"),
            "-device",
            &format!(
                "{front},drive=disk{i},id={}{}",
                disk.name,
                bootindex(&disk.name)
            ),
        ]);
    }
    for (i, iface) in spec.devices.interfaces.iter().enumerate() {
        let mac = crate::bridge::tap::interface_mac(iface, &uuid, i);
        push(&[
            "-netdev",
            &format!(
                "tap,id=net{i},ifname={},script=no,downscript=no,vnet_hdr=on",
                tap_name(&uuid, i)
            ),
            "-device",
            &format!(
                "{},netdev=net{i},mac={mac},id={}{}",
                machine.device("net"),
                iface.name,
                bootindex(&iface.name)
            ),
        ]);
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vireo_crds::{Disk, DomainSpec, DomainType, Interface, OsSpec};

    fn paths() -> RunPaths {
        let dir = PathBuf::from("/r/run/u1");
        RunPaths {
            api: dir.join("api.sock"),
            console_socket: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            pidfile: dir.join("pid"),
            log: dir.join("process.log"),
            exit_file: dir.join("exit.json"),
            nvram: PathBuf::from("/r/nvram/u1_VARS.fd"),
            guest_agent: dir.join("qga.sock"),
            vsock: dir.join("vsock.sock"),
            abort_job: dir.join("abort-job"),
            dir,
        }
    }

    fn domain(os: Option<OsSpec>, disks: Vec<Disk>) -> Domain {
        let mut d = Domain::new(
            "fw",
            DomainSpec {
                domain_type: DomainType::Qemu,
                arch: None,
                uuid: Some("00000000-0000-4000-8000-000000000001".into()),
                memory: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
                current_memory: None,
                vcpus: 1,
                max_vcpus: None,
                os,
                devices: Default::default(),
                cloud_init: None,
                run_strategy: Default::default(),
                lifecycle: Default::default(),
                node_selector: None,
                eviction_strategy: None,
            },
        );
        d.spec.devices.disks = disks;
        d
    }

    fn disk(name: &str, device: DiskDevice, bus: DiskBus) -> Disk {
        Disk {
            name: name.into(),
            volume: name.into(),
            device,
            bus,
            ..Default::default()
        }
    }

    fn files(d: &Domain) -> Vec<DiskFile> {
        d.spec
            .devices
            .disks
            .iter()
            .map(|x| DiskFile {
                name: x.name.clone(),
                path: format!("/pool/{}", x.volume),
                format: if x.device == DiskDevice::Cdrom {
                    VolFormat::Iso
                } else {
                    VolFormat::Qcow2
                },
                read_only: x.read_only,
            })
            .collect()
    }

    fn args(d: &Domain) -> Vec<String> {
        build(d, &paths(), &files(d), Accel::Tcg).expect("builds")
    }

    /// The value after each `flag`.
    fn values<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn firmware(f: Firmware, boot: Vec<BootDevice>) -> Option<OsSpec> {
        Some(OsSpec {
            firmware: Some(f),
            boot,
            ..Default::default()
        })
    }

    #[test]
    fn direct_kernel_boot_is_as_before() {
        let d = domain(
            Some(OsSpec {
                kernel: Some("/boot/vmlinuz".into()),
                cmdline: Some("console=ttyS0".into()),
                machine: Some("q35".into()),
                ..Default::default()
            }),
            vec![disk("vda", DiskDevice::Disk, DiskBus::Virtio)],
        );
        let a = args(&d);
        assert_eq!(values(&a, "-machine"), vec!["q35"]);
        assert_eq!(values(&a, "-kernel"), vec!["/boot/vmlinuz"]);
        assert_eq!(values(&a, "-append"), vec!["console=ttyS0"]);
        assert!(
            !a.iter()
                .any(|x| x == "-boot" || x.contains("bootindex") || x.contains("pflash"))
        );
        assert!(values(&a, "-device").contains(&"virtio-blk-pci,drive=disk0,id=vda"));
        // Every guest gets the guest agent's virtio-serial port.
        assert!(values(&a, "-device").contains(&"virtio-serial-pci,id=vser0"));
        assert!(
            values(&a, "-device")
                .contains(&"virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0")
        );
        assert!(
            values(&a, "-chardev")
                .contains(&"socket,id=qga0,path=/r/run/u1/qga.sock,server=on,wait=off")
        );
        // Without firmware and kernel, the command line names what is missing.
        let e = build(&domain(None, vec![]), &paths(), &[], Accel::Tcg).expect_err("no boot");
        assert!(e.contains("spec.os.firmware"), "{e}");
    }

    #[test]
    fn bios_boots_the_first_disk_by_default() {
        let d = domain(
            firmware(Firmware::Bios, vec![]),
            vec![disk("vda", DiskDevice::Disk, DiskBus::Virtio)],
        );
        assert_eq!(Machine::from_spec(&d), Ok(Machine::Q35));
        let a = args(&d);
        assert_eq!(values(&a, "-machine"), vec!["q35,graphics=off"]);
        assert_eq!(values(&a, "-boot"), vec!["strict=on"]);
        assert!(
            !a.iter()
                .any(|x| x == "-kernel" || x == "-append" || x.contains("pflash"))
        );
        assert!(
            values(&a, "-device").contains(&"virtio-blk-pci,drive=disk0,id=vda,bootindex=1"),
            "{a:?}"
        );
        assert!(values(&a, "-serial").contains(&"chardev:console"));
        // microvm has no firmware slot for it.
        let mut m = d.clone();
        if let Some(os) = m.spec.os.as_mut() {
            os.machine = Some("microvm".into());
        }
        let e = Machine::from_spec(&m).expect_err("microvm");
        assert!(e.starts_with("spec.os.machine:"), "{e}");
    }

    #[test]
    fn efi_runs_ovmf_with_the_domains_own_nvram() {
        let d = domain(
            firmware(Firmware::Efi, vec![]),
            vec![disk("vda", DiskDevice::Disk, DiskBus::Virtio)],
        );
        let a = args(&d);
        assert_eq!(
            values(&a, "-machine"),
            vec!["q35,graphics=off,pflash0=ovmf-code,pflash1=ovmf-vars"]
        );
        let blockdevs = values(&a, "-blockdev");
        for want in [
            "driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,node-name=ovmf-code-file,read-only=on",
            "driver=raw,file=ovmf-code-file,node-name=ovmf-code,read-only=on",
            "driver=file,filename=/r/nvram/u1_VARS.fd,node-name=ovmf-vars-file",
            "driver=raw,file=ovmf-vars-file,node-name=ovmf-vars",
        ] {
            assert!(blockdevs.contains(&want), "{want} not in {blockdevs:?}");
        }
        assert!(!a.iter().any(|x| x.contains("smm") || x.contains("secure")));
        // Secure boot: the secure-boot build, SMM, and a protected flash.
        let mut sb = d.clone();
        if let Some(os) = sb.spec.os.as_mut() {
            os.secure_boot = true;
        }
        let a = args(&sb);
        assert_eq!(
            values(&a, "-machine"),
            vec!["q35,graphics=off,smm=on,pflash0=ovmf-code,pflash1=ovmf-vars"]
        );
        assert_eq!(
            values(&a, "-global"),
            vec!["driver=cfi.pflash01,property=secure,value=on"]
        );
        assert!(values(&a, "-blockdev").contains(
            &"driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd,node-name=ovmf-code-file,read-only=on"
        ));
        assert_eq!(ovmf_files(&sb).1, "/usr/share/OVMF/OVMF_VARS_4M.ms.fd");
    }

    #[test]
    fn boot_order_buses_and_cdroms() {
        let mut d = domain(
            firmware(
                Firmware::Bios,
                vec![BootDevice::Cdrom, BootDevice::Network, BootDevice::Hd],
            ),
            vec![
                disk("sda", DiskDevice::Disk, DiskBus::Sata),
                disk("sdb", DiskDevice::Cdrom, DiskBus::Sata),
                disk("sdc", DiskDevice::Disk, DiskBus::Scsi),
                disk("sdd", DiskDevice::Cdrom, DiskBus::Scsi),
                disk("vda", DiskDevice::Disk, DiskBus::Virtio),
            ],
        );
        d.spec.devices.interfaces = vec![Interface {
            name: "net0".into(),
            network: "lab".into(),
            mac: None,
        }];
        let a = args(&d);
        let devices = values(&a, "-device");
        for want in [
            "virtio-scsi-pci,id=scsi0",
            "ide-hd,bus=ide.0,drive=disk0,id=sda,bootindex=3",
            "ide-cd,bus=ide.1,drive=disk1,id=sdb,bootindex=1",
            "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=disk2,id=sdc",
            "scsi-cd,bus=scsi0.0,channel=0,scsi-id=1,lun=0,drive=disk3,id=sdd",
            "virtio-blk-pci,drive=disk4,id=vda",
        ] {
            assert!(devices.contains(&want), "{want} not in {devices:?}");
        }
        assert!(
            devices
                .iter()
                .any(|x| x.starts_with("virtio-net-pci,netdev=net0,")
                    && x.ends_with(",id=net0,bootindex=2")),
            "{devices:?}"
        );
        // A CD-ROM is read-only at both block layers; an ISO is raw bytes.
        let blockdevs = values(&a, "-blockdev");
        assert!(blockdevs.contains(
            &"driver=file,filename=/pool/sdb,node-name=file1,cache.direct=off,read-only=on"
        ));
        assert!(blockdevs.contains(&"driver=raw,file=file1,node-name=disk1,read-only=on"));
        assert!(blockdevs.contains(&"driver=qcow2,file=file0,node-name=disk0"));

        // Per-disk bootOrder instead of classes.
        if let Some(os) = d.spec.os.as_mut() {
            os.boot.clear();
        }
        d.spec.devices.disks[4].boot_order = Some(1);
        d.spec.devices.disks[3].boot_order = Some(2);
        let devices: Vec<String> = values(&args(&d), "-device")
            .into_iter()
            .map(str::to_string)
            .collect();
        assert!(devices.contains(&"virtio-blk-pci,drive=disk4,id=vda,bootindex=1".to_string()));
        assert!(
            devices.contains(
                &"scsi-cd,bus=scsi0.0,channel=0,scsi-id=1,lun=0,drive=disk3,id=sdd,bootindex=2"
                    .to_string()
            )
        );
        assert_eq!(
            devices.iter().filter(|x| x.contains("bootindex")).count(),
            2,
            "{devices:?}"
        );
    }

    #[test]
    fn pc_disks_need_q35() {
        let mut d = domain(
            Some(OsSpec {
                kernel: Some("/boot/vmlinuz".into()),
                ..Default::default()
            }),
            vec![disk("sda", DiskDevice::Cdrom, DiskBus::Sata)],
        );
        assert_eq!(Machine::from_spec(&d), Ok(Machine::Q35));
        if let Some(os) = d.spec.os.as_mut() {
            os.machine = Some("microvm".into());
        }
        let e = Machine::from_spec(&d).expect_err("microvm has no AHCI");
        assert!(e.starts_with("spec.devices.disks[0]:"), "{e}");
    }
}
