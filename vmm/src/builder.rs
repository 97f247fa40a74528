//! Builds the machine: a KVM VM with its irqchip and PIT, guest memory, the
//! legacy devices on their buses, the loaded kernel and boot tables, and
//! configured vCPUs (not yet running).

use crate::boot::{self, Entry, acpi, layout};
use crate::bus::{Bus, BusError, Buses, SharedDevice, lock};
use crate::config::{OpenFiles, VmConfig};
use crate::console::{ConsoleClients, ConsoleOut};
use crate::events::EventQueue;
use crate::memory::{self, GuestMemory};
use crate::snapshot::{self, DeviceStates, MachineConfig, SnapshotState, VmState};
use crate::vcpu::state::VcpuState;
use crate::vcpu::{self, Vcpu, VcpuControl, cpuid, regs};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
};
use kvm_ioctls::{Kvm, VmFd};
use std::fs::File;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vireo_vmm_devices::bus::{BusDevice, IrqLine};
use vireo_vmm_devices::legacy::boot_timer::{BootTime, BootTimer};
use vireo_vmm_devices::legacy::cpu_hotplug::{self, CpuHotplug};
use vireo_vmm_devices::legacy::i8042::I8042;
use vireo_vmm_devices::legacy::power::PowerDevice;
use vireo_vmm_devices::legacy::pvpanic::PvPanic;
use vireo_vmm_devices::legacy::serial::{SERIAL_REGISTERS, SerialDevice};
use vireo_vmm_devices::virtio::block::BlockStats;
use vireo_vmm_devices::virtio::{
    Balloon, BalloonControl, Block, MmioTransport, Net, Rng, VirtioDevice, Vsock,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Load(#[from] boot::loader::LoadError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("zeroing guest memory: {0}")]
    Zero(std::io::Error),
    #[error("virtio device in slot {slot}: {source}")]
    Virtio {
        slot: u32,
        source: vireo_vmm_devices::virtio::Error,
    },
    #[error("{0} virtio devices asked for; there are {max} slots", max = layout::VIRTIO_MMIO_SLOTS)]
    TooManyDevices(usize),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("restoring the snapshot: {0}")]
    Restore(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// An interrupt line backed by an irqfd.
pub struct IrqFd(EventFd);

impl IrqLine for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<Arc<IrqFd>, BuildError> {
    let efd = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&efd, gsi)
        .map_err(kvm("register irqfd"))?;
    Ok(Arc::new(IrqFd(efd)))
}

/// The serial device as the VMM holds it.
pub type Serial = SerialDevice<ConsoleOut>;

/// A virtio transport as the VMM holds every slot.
pub type VirtioSlotDevice = Arc<Mutex<MmioTransport<Box<dyn VirtioDevice>>>>;

/// The balloon, when there is one: its shared target/actual and its slot.
pub struct BalloonHandle {
    pub control: Arc<BalloonControl>,
    pub transport: VirtioSlotDevice,
}

/// Interrupt-controller state right after creation, restored by a reset.
struct IrqchipSnapshot {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

/// Everything that makes up the guest, before its vCPUs run.
pub struct Machine {
    pub vm: VmFd,
    pub mem: GuestMemory,
    pub memory_bytes: u64,
    pub buses: Arc<Buses>,
    pub serial: Arc<Mutex<Serial>>,
    pub i8042: Arc<Mutex<I8042>>,
    /// The CPU hot-plug controller (which vCPUs are enabled).
    pub cpu_hotplug: Arc<Mutex<CpuHotplug>>,
    pub console_clients: ConsoleClients,
    pub events: Arc<EventQueue>,
    pub boot_time: BootTime,
    pub control: Arc<VcpuControl>,
    pub vcpus: Vec<Vcpu>,
    /// Descriptors devices want watched (taps), with their device.
    pub device_fds: Vec<(RawFd, SharedDevice)>,
    /// The virtio-balloon (`--balloon`).
    pub balloon: Option<BalloonHandle>,
    /// Each `--disk`'s I/O counters, in `--disk` order (`block-stats`).
    pub disk_stats: Vec<Arc<BlockStats>>,
    virtio: Vec<acpi::VirtioSlot>,
    /// Each slot's transport and device name, in slot order.
    transports: Vec<(&'static str, VirtioSlotDevice)>,
    boot_source: BootSource,
    vcpu_count: u32,
    irqchip: IrqchipSnapshot,
    // Kept last: dropped after the VM fd.
    _kvm: Kvm,
}

/// What is booted: kept open for the life of the VM, reread on reset.
struct BootSource {
    kernel: File,
    initrd: Option<File>,
    cmdline: String,
    elf_entry: boot::loader::ElfEntry,
}

/// Loads kernel, initrd, command line, boot structures and ACPI tables.
fn load_guest(
    mem: &GuestMemory,
    memory_bytes: u64,
    src: &mut BootSource,
    vcpus: u32,
    virtio: &[acpi::VirtioSlot],
) -> Result<Entry, BuildError> {
    let loaded = boot::loader::load(
        mem,
        memory_bytes,
        &mut src.kernel,
        src.initrd.as_mut(),
        &src.cmdline,
        src.elf_entry,
    )?;
    regs::write_boot_structures(mem, loaded.entry)?;
    acpi::write(mem, vcpus, virtio)?;
    tracing::info!(
        entry = %loaded.entry.describe(),
        kernel = format_args!("{:#x}..{:#x}", loaded.kernel_load, loaded.kernel_end),
        initrd = ?loaded.initrd.map(|(a, s)| format!("{a:#x}+{s:#x}")),
        "kernel loaded"
    );
    Ok(loaded.entry)
}

/// Builds the machine described by `cfg` from the files opened for it.
/// `start` is when the process started (the boot timer's zero).
pub fn build(cfg: &VmConfig, files: OpenFiles, start: Instant) -> Result<Machine, BuildError> {
    let OpenFiles {
        kernel,
        initrd,
        console_log,
        disks,
        taps,
        vsock,
        restore,
        ..
    } = files;
    let kvm_sys = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm = kvm_sys.create_vm().map_err(kvm("create VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm("set TSS address"))?;
    if let Err(e) = vm.set_identity_map_address(0xfffb_c000) {
        tracing::debug!(error = %e, "KVM has no identity-map address to set");
    }
    vm.create_irq_chip().map_err(kvm("create irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm("create PIT"))?;

    let mem = memory::create(cfg.memory_bytes)?;
    memory::register(&vm, &mem)?;

    let events = Arc::new(EventQueue::new().map_err(BuildError::EventFd)?);
    let boot_time = BootTime::new();
    let console_clients = ConsoleClients::new().map_err(BuildError::EventFd)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irqfd(&vm, layout::COM1_GSI)?,
        ConsoleOut::new(console_log, console_clients.clone()),
    )));
    let i8042 = Arc::new(Mutex::new(I8042::new(
        events.clone(),
        irqfd(&vm, layout::I8042_GSI)?,
    )));
    let power: SharedDevice = Arc::new(Mutex::new(PowerDevice::new(events.clone())));
    let cpu_hotplug = Arc::new(Mutex::new(CpuHotplug::new(
        cfg.vcpus,
        events.clone(),
        irqfd(&vm, layout::CPU_HOTPLUG_GSI)?,
    )));
    let timer: SharedDevice = Arc::new(Mutex::new(BootTimer::new(start, boot_time.clone())));

    let mut pio = Bus::new("pio");
    pio.insert(
        "serial",
        u64::from(layout::COM1),
        SERIAL_REGISTERS,
        serial.clone(),
    )?;
    pio.insert("i8042", u64::from(layout::I8042), 5, i8042.clone())?;
    pio.insert("power", u64::from(layout::POWER), 1, power)?;
    let pvpanic: SharedDevice = Arc::new(Mutex::new(PvPanic::new(events.clone())));
    pio.insert("pvpanic", u64::from(layout::PVPANIC), 1, pvpanic)?;
    pio.insert(
        "cpu-hotplug",
        u64::from(layout::CPU_HOTPLUG),
        cpu_hotplug::PORTS,
        cpu_hotplug.clone(),
    )?;
    let mut mmio = Bus::new("mmio");
    mmio.insert("boot-timer", layout::BOOT_TIMER, 1, timer)?;

    // virtio-mmio: disks, then NICs, then the entropy device, then the
    // balloon, then vsock, one slot each.
    let wanted = disks.len()
        + taps.len()
        + usize::from(cfg.rng)
        + usize::from(cfg.balloon.is_some())
        + usize::from(vsock.is_some());
    if wanted > layout::VIRTIO_MMIO_SLOTS as usize {
        return Err(BuildError::TooManyDevices(wanted));
    }
    let mut virtio_devs: Vec<(&'static str, Box<dyn VirtioDevice>)> = Vec::new();
    let mut disk_stats = Vec::new();
    for (i, (file, spec)) in disks.into_iter().zip(&cfg.disks).enumerate() {
        let slot = virtio_devs.len() as u32;
        let blk = Block::new(file, spec.readonly)
            .map_err(|source| BuildError::Virtio { slot, source })?
            .with_id(&format!("disk{i}"));
        disk_stats.push(blk.stats());
        virtio_devs.push(("virtio-blk", Box::new(blk)));
    }
    for (i, (tap, spec)) in taps.into_iter().zip(&cfg.nets).enumerate() {
        let slot = virtio_devs.len() as u32;
        let mac = spec.mac.unwrap_or([0x02, 0x56, 0x49, 0x52, 0x45, i as u8]);
        let net = Net::new(tap, mac).map_err(|source| BuildError::Virtio { slot, source })?;
        virtio_devs.push(("virtio-net", Box::new(net)));
    }
    if cfg.rng {
        virtio_devs.push(("virtio-rng", Box::new(Rng::new())));
    }
    let mut balloon_control = None;
    if let Some(target) = cfg.balloon {
        let b = Balloon::new(target);
        balloon_control = Some(b.control());
        virtio_devs.push(("virtio-balloon", Box::new(b)));
    }
    if let (Some(listener), Some(spec)) = (vsock, &cfg.vsock) {
        let slot = virtio_devs.len() as u32;
        let dev = Vsock::new(spec.cid, listener, &spec.uds)
            .map_err(|source| BuildError::Virtio { slot, source })?;
        virtio_devs.push(("virtio-vsock", Box::new(dev)));
    }
    let mut balloon = None;
    let mut virtio = Vec::new();
    let mut device_fds = Vec::new();
    let mut transports = Vec::new();
    for (index, (name, dev)) in virtio_devs.into_iter().enumerate() {
        let slot = acpi::VirtioSlot {
            index: index as u32,
        };
        let transport =
            MmioTransport::new(mem.clone(), irqfd(&vm, slot.gsi())?, dev).map_err(|source| {
                BuildError::Virtio {
                    slot: slot.index,
                    source,
                }
            })?;
        let fds = BusDevice::event_fds(&transport);
        let typed: VirtioSlotDevice = Arc::new(Mutex::new(transport));
        transports.push((name, typed.clone()));
        if name == "virtio-balloon"
            && let Some(control) = balloon_control.take()
        {
            balloon = Some(BalloonHandle {
                control,
                transport: typed.clone(),
            });
        }
        let shared: SharedDevice = typed;
        mmio.insert(name, slot.base(), layout::VIRTIO_MMIO_SIZE, shared.clone())?;
        device_fds.extend(fds.into_iter().map(|fd| (fd, shared.clone())));
        tracing::info!(
            device = name,
            slot = slot.index,
            base = format_args!("{:#x}", slot.base()),
            gsi = slot.gsi(),
            "virtio-mmio device"
        );
        virtio.push(slot);
    }
    let buses = Arc::new(Buses { pio, mmio });

    let mut boot_source = BootSource {
        kernel,
        initrd,
        cmdline: cfg.cmdline.clone(),
        elf_entry: cfg.elf_entry,
    };
    let entry = load_guest(&mem, cfg.memory_bytes, &mut boot_source, cfg.vcpus, &virtio)?;

    let base_cpuid = kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("get supported CPUID"))?;
    let control = Arc::new(VcpuControl::new(entry));
    // The MSRs a snapshot saves: the host's list (empty if KVM will not say).
    let msr_list = Arc::new(
        kvm_sys
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default(),
    );
    let mut vcpus = Vec::new();
    for index in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm("create vCPU"))?;
        let cpuid = cpuid::for_vcpu(&base_cpuid, index, cfg.vcpus, &cfg.cpuid_hide);
        vcpus.push(Vcpu::new(
            index,
            fd,
            &cpuid,
            entry,
            buses.clone(),
            control.clone(),
            events.clone(),
            msr_list.clone(),
        )?);
    }

    let mut chips = Vec::new();
    for chip_id in 0..3 {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(kvm("get irqchip"))?;
        chips.push(chip);
    }
    let pit = vm.get_pit2().map_err(kvm("get PIT"))?;

    let mut machine = Machine {
        vm,
        mem,
        memory_bytes: cfg.memory_bytes,
        buses,
        serial,
        i8042,
        cpu_hotplug,
        console_clients,
        events,
        boot_time,
        control,
        vcpus,
        device_fds,
        balloon,
        disk_stats,
        virtio,
        transports,
        boot_source,
        vcpu_count: cfg.vcpus,
        irqchip: IrqchipSnapshot { chips, pit },
        _kvm: kvm_sys,
    };
    if let (Some(mut file), Some((_, offset))) = (restore, &cfg.restore) {
        machine.restore_from(&mut file, *offset)?;
    }
    Ok(machine)
}

impl Machine {
    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    /// What the machine was built from, as a snapshot records it.
    pub fn snapshot_config(&self) -> MachineConfig {
        MachineConfig {
            memory_bytes: self.memory_bytes,
            vcpus: self.vcpu_count,
            devices: self.transports.iter().map(|(n, _)| n.to_string()).collect(),
        }
    }

    /// The whole state of the (paused) machine with its vCPUs' `vcpus`.
    pub fn save_state(&self, vcpus: Vec<VcpuState>) -> Result<SnapshotState, BuildError> {
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm.get_irqchip(&mut chip).map_err(kvm("get irqchip"))?;
            irqchips.push(chip);
        }
        let pit = self.vm.get_pit2().map_err(kvm("get PIT"))?;
        let clock = self.vm.get_clock().ok();
        let serial = lock(&self.serial)
            .save_state()
            .ok_or_else(|| BuildError::Restore("the serial port is gone".into()))?;
        Ok(SnapshotState {
            config: self.snapshot_config(),
            vcpus,
            vm: VmState {
                irqchips,
                pit,
                clock,
            },
            devices: DeviceStates {
                serial,
                i8042: lock(&self.i8042).save_state(),
                cpu_hotplug: lock(&self.cpu_hotplug).save_state(),
                virtio: self
                    .transports
                    .iter()
                    .map(|(_, t)| lock(t).save_state())
                    .collect(),
                boot_time_us: self.boot_time.get(),
            },
        })
    }

    /// Loads the snapshot at `offset` in `file` into this freshly built
    /// machine (same command line), before its vCPUs run. Everything is
    /// checked before guest memory or any device changes.
    fn restore_from(&mut self, file: &mut File, offset: u64) -> Result<(), BuildError> {
        let parsed = snapshot::parse(file, offset)?;
        let st = &parsed.state;
        let here = self.snapshot_config();
        if st.config != here {
            return Err(snapshot::SnapshotError::Mismatch(format!(
                "saved {} MiB, {} vCPUs, devices [{}]; this machine has {} MiB, {} vCPUs, devices [{}]",
                st.config.memory_bytes >> 20,
                st.config.vcpus,
                st.config.devices.join(", "),
                here.memory_bytes >> 20,
                here.vcpus,
                here.devices.join(", ")
            ))
            .into());
        }
        memory::zero(&self.mem).map_err(BuildError::Zero)?;
        snapshot::load_memory(file, &parsed, &self.mem)?;
        for (chip_id, saved) in st.vm.irqchips.iter().enumerate() {
            let mut chip = *saved;
            // The file says which chip; the position decides.
            chip.chip_id = chip_id as u32;
            self.vm.set_irqchip(&chip).map_err(kvm("set irqchip"))?;
        }
        self.vm.set_pit2(&st.vm.pit).map_err(kvm("set PIT"))?;
        if let Some(clock) = &st.vm.clock {
            let mut c = *clock;
            // KVM_SET_CLOCK takes the time only (flags it reported are
            // not accepted back).
            c.flags = 0;
            if let Err(e) = self.vm.set_clock(&c) {
                tracing::warn!(error = %e, "KVM refused the saved clock");
            }
        }
        let d = &st.devices;
        lock(&self.serial)
            .restore_state(&d.serial)
            .map_err(BuildError::Restore)?;
        lock(&self.i8042)
            .restore_state(&d.i8042)
            .map_err(BuildError::Restore)?;
        lock(&self.cpu_hotplug)
            .restore_state(&d.cpu_hotplug)
            .map_err(BuildError::Restore)?;
        for (slot, ((name, t), saved)) in self.transports.iter().zip(&d.virtio).enumerate() {
            lock(t)
                .restore_state(saved)
                .map_err(|e| BuildError::Restore(format!("{name} in slot {slot}: {e}")))?;
        }
        self.boot_time.restore(d.boot_time_us);
        for (v, saved) in self.vcpus.iter().zip(&st.vcpus) {
            v.restore_state(saved)?;
        }
        {
            let mut cs = lock(&self.control.state);
            cs.unplugged = d.cpu_hotplug.cpus.iter().map(|c| !c.enabled).collect();
            cs.replugged = vec![false; cs.unplugged.len()];
        }
        tracing::info!(
            memory_stored = parsed.memory_bytes_stored(),
            runs = parsed.runs.len(),
            missing = ?st.vcpus.first().map(|v| v.missing.clone()).unwrap_or_default(),
            "machine restored from the snapshot"
        );
        Ok(())
    }

    /// With the vCPUs parked: devices and interrupt controllers back to
    /// power-on state, RAM zeroed, kernel loaded again. Returns the new entry.
    pub fn reset_platform(&mut self) -> Result<Entry, BuildError> {
        self.buses.pio.reset_all();
        self.buses.mmio.reset_all();
        for chip in &self.irqchip.chips {
            self.vm.set_irqchip(chip).map_err(kvm("set irqchip"))?;
        }
        self.vm
            .set_pit2(&self.irqchip.pit)
            .map_err(kvm("set PIT"))?;
        memory::zero(&self.mem).map_err(BuildError::Zero)?;
        load_guest(
            &self.mem,
            self.memory_bytes,
            &mut self.boot_source,
            self.vcpu_count,
            &self.virtio,
        )
    }
}
