//! The `qemu-system-x86_64` command line for a Domain.

use vireo_crds::quantity::parse_quantity;
use vireo_crds::{Domain, LifecycleAction, VolFormat};

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
    pub fn from_spec(def: &Domain) -> Result<Self, String> {
        match def.spec.os.as_ref().and_then(|o| o.machine.as_deref()) {
            None | Some("microvm") => Ok(Self::Microvm),
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
    let os = spec
        .os
        .as_ref()
        .ok_or("spec.os: the qemu driver boots a kernel directly; spec.os.kernel is required")?;
    let kernel = os
        .kernel
        .as_deref()
        .ok_or("spec.os.kernel is required by the qemu driver")?;
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
    push(&["-kernel", kernel]);
    if let Some(initrd) = os.initrd.as_deref() {
        push(&["-initrd", initrd]);
    }
    let mut cmdline = os.cmdline.clone().unwrap_or_default();
    if machine == Machine::Microvm
        && accel == Accel::Tcg
        && !cmdline.contains("tsc_early_khz=")
        && let Some(khz) = host_tsc_khz()
    {
        cmdline = format!("{cmdline} tsc_early_khz={khz}").trim().to_string();
    }
    if !cmdline.is_empty() {
        push(&["-append", &cmdline]);
    }
    push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
    push(&["-device", &format!("{},rng=rng0", machine.device("rng"))]);
    push(&[
        "-device",
        &format!("{},id=balloon0", machine.device("balloon")),
    ]);
    for (i, disk) in disks.iter().enumerate() {
        let ro = if disk.read_only { ",read-only=on" } else { "" };
        let format = match disk.format {
            VolFormat::Raw => "raw",
            VolFormat::Qcow2 => "qcow2",
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
            &format!("{},drive=disk{i},id={}", machine.device("blk"), disk.name),
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
                "{},netdev=net{i},mac={mac},id={}",
                machine.device("net"),
                iface.name
            ),
        ]);
    }
    Ok(a)
}
