//! Everything written into guest memory before the first instruction: the
//! kernel, initrd and command line ([`loader`]), the memory map ([`e820`])
//! and the ACPI tables ([`acpi`]).

pub mod acpi;
pub mod e820;
pub mod loader;

/// Guest-physical addresses of what the VMM places below 1 MiB.
pub mod layout {
    /// The boot GDT (5 entries).
    pub const GDT: u64 = 0x500;
    /// An empty IDT.
    pub const IDT: u64 = 0x540;
    /// PVH `hvm_start_info`.
    pub const PVH_START_INFO: u64 = 0x6000;
    /// PVH module list (the initrd).
    pub const PVH_MODLIST: u64 = 0x6040;
    /// PVH memory map.
    pub const PVH_MEMMAP: u64 = 0x6080;
    /// The Linux zero page (`boot_params`).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Initial stack pointer.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// Identity-mapping page tables for 64-bit entry: PML4, PDPT, 4 PDs.
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE: u64 = 0x2_0000;
    /// Longest command line we accept, NUL included.
    pub const CMDLINE_MAX: usize = 4096;
    /// End of conventional memory; the e820 map reserves from here to 1 MiB.
    pub const EBDA_START: u64 = 0x9_fc00;
    /// ACPI tables; the RSDP comes first (the contract's 0xE0000).
    pub const ACPI_START: u64 = 0xE_0000;
    /// Kernels load at and above this.
    pub const HIMEM_START: u64 = 0x10_0000;
    /// The boot timer MMIO byte.
    pub const BOOT_TIMER: u64 = 0xC000_0000;
    /// First virtio-mmio slot; slot i is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
    pub const VIRTIO_MMIO_BASE: u64 = 0xFEB0_0000;
    pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
    pub const VIRTIO_MMIO_SLOTS: u32 = 16;
    /// GSI of virtio-mmio slot 0.
    pub const VIRTIO_GSI_BASE: u32 = 5;
    pub const IOAPIC: u64 = 0xFEC0_0000;
    pub const LAPIC: u64 = 0xFEE0_0000;
    /// Ports.
    pub const COM1: u16 = 0x3f8;
    pub const COM1_GSI: u32 = 4;
    pub const I8042: u16 = 0x60;
    pub const I8042_GSI: u32 = 1;
    pub const POWER: u16 = 0x600;
    /// pvpanic (QEMU's port).
    pub const PVPANIC: u16 = 0x505;
    /// The CPU hot-plug controller (4 ports) and its interrupt (the DSDT's
    /// GED).
    pub const CPU_HOTPLUG: u16 = 0x610;
    pub const CPU_HOTPLUG_GSI: u32 = 23;
}

/// How a vCPU enters the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode with identity paging, `rsi` = zero page (bzImage's
    /// 64-bit boot protocol and ELF vmlinux).
    Linux64 { rip: u64, zero_page: u64 },
    /// 32-bit protected mode without paging, `ebx` = `hvm_start_info` (PVH).
    Pvh { rip: u64, start_info: u64 },
}

impl Entry {
    pub fn describe(&self) -> String {
        match self {
            Entry::Linux64 { rip, .. } => format!("64-bit entry at {rip:#x}"),
            Entry::Pvh { rip, .. } => format!("PVH 32-bit entry at {rip:#x}"),
        }
    }
}
