//! Architectural state a vCPU starts in: GDT and identity page tables in
//! guest memory, segment/control registers, general registers, FPU, MSRs and
//! the local APIC's LINT pins.

use crate::boot::Entry;
use crate::boot::layout::{BOOT_STACK, GDT, IDT, PD, PDPT, PML4};
use crate::memory::GuestMemory;
use kvm_bindings::{
    Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("building the MSR list: {0}")]
    Msrs(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

// GDT: 0 null, 1 null, 2 code (0x10, the boot protocol's __BOOT_CS),
// 3 data (0x18, __BOOT_DS), 4 TSS (0x20).
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;
const GDT_ENTRIES: usize = 5;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | (((limit >> 16) & 0xf) << 48)
        | ((flags & 0xf0ff) << 40)
}

const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT, an empty IDT and page tables identity-mapping the first
/// 4 GiB with 2 MiB pages (so a 64-bit guest reaches the MMIO gap too).
pub fn write_boot_structures(mem: &GuestMemory, entry: Entry) -> Result<(), RegsError> {
    let code = match entry {
        Entry::Linux64 { .. } => CODE64,
        Entry::Pvh { .. } => CODE32,
    };
    let gdt: [u64; GDT_ENTRIES] = [0, 0, code, DATA, TSS];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + (i * 8) as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))?;
    if let Entry::Linux64 { .. } = entry {
        mem.write_obj(PDPT | 0x3, GuestAddress(PML4))?;
        for i in 0..4u64 {
            mem.write_obj((PD + i * 0x1000) | 0x3, GuestAddress(PDPT + i * 8))?;
        }
        for i in 0..(4 * 512u64) {
            // Present, writable, 2 MiB page.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))?;
        }
    }
    Ok(())
}

/// Puts the boot vCPU at `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: Entry) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    let (code, cr0, cr4, efer, cr3) = match entry {
        Entry::Linux64 { .. } => (
            CODE64,
            CR0_PE | CR0_ET | CR0_PG,
            CR4_PAE,
            EFER_LME | EFER_LMA,
            PML4,
        ),
        Entry::Pvh { .. } => (CODE32, CR0_PE | CR0_ET, 0, 0, 0),
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cs = segment(code, CODE_SELECTOR);
    let data = segment(DATA, DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS, TSS_SELECTOR);
    sregs.cr0 = cr0;
    sregs.cr3 = cr3;
    sregs.cr4 = cr4;
    sregs.efer = efer;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { rip, zero_page } => {
            regs.rip = rip;
            regs.rsi = zero_page;
        }
        Entry::Pvh { rip, start_info } => {
            regs.rip = rip;
            regs.rbx = start_info;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
    Ok(())
}

/// FPU, MSRs and the local APIC, for every vCPU.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU"))?;

    let entries: Vec<kvm_msr_entry> = [
        (0x174u32, 0u64),       // SYSENTER_CS
        (0x175, 0),             // SYSENTER_ESP
        (0x176, 0),             // SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x10, 0),              // TSC
        (0x1a0, 1),             // MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| RegsError::Msrs(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; the rest keep their reset
        // values, which a kernel copes with.
        tracing::debug!(
            set,
            wanted = entries.len(),
            "KVM accepted only some boot MSRs"
        );
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_get(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn lapic_set(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *byte as _;
    }
}

/// LINT0 as ExtINT (the PIC), LINT1 as NMI, as firmware leaves them.
/// Returns the state, which a reset restores.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<kvm_lapic_state, RegsError> {
    let mut l = vcpu.get_lapic().map_err(kvm("get LAPIC"))?;
    let lvt0 = lapic_get(&l, APIC_LVT0);
    lapic_set(&mut l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_get(&l, APIC_LVT1);
    lapic_set(&mut l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
    vcpu.set_lapic(&l).map_err(kvm("set LAPIC"))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let c = segment(CODE64, CODE_SELECTOR);
        assert_eq!(
            (c.base, c.limit, c.l, c.db, c.type_, c.present),
            (0, 0xffff_ffff, 1, 0, 0xb, 1)
        );
        let c32 = segment(CODE32, CODE_SELECTOR);
        assert_eq!((c32.l, c32.db), (0, 1));
        let d = segment(DATA, DATA_SELECTOR);
        assert_eq!((d.type_, d.s, d.limit), (3, 1, 0xffff_ffff));
    }
}
