//! The CPUID each vCPU sees: what KVM supports, with the topology filled in
//! per vCPU, the hypervisor bit set, and the features `--cpuid-hide` names
//! cleared.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("unknown CPUID feature {0:?} in --cpuid-hide (known: {1})")]
    Unknown(String, String),
}

/// Which register of a leaf a feature bit lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A feature bit: leaf, subleaf, register, bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features `--cpuid-hide` understands (the names /proc/cpuinfo uses).
pub const FEATURES: &[Feature] = &[
    f("sse3", 1, 0, Reg::Ecx, 0),
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("monitor", 1, 0, Reg::Ecx, 3),
    f("vmx", 1, 0, Reg::Ecx, 5),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pdcm", 1, 0, Reg::Ecx, 15),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("mce", 1, 0, Reg::Edx, 7),
    f("cx8", 1, 0, Reg::Edx, 8),
    f("mtrr", 1, 0, Reg::Edx, 12),
    f("pge", 1, 0, Reg::Edx, 13),
    f("pat", 1, 0, Reg::Edx, 16),
    f("pse36", 1, 0, Reg::Edx, 17),
    f("clflush", 1, 0, Reg::Edx, 19),
    f("ht", 1, 0, Reg::Edx, 28),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("hle", 7, 0, Reg::Ebx, 4),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("rtm", 7, 0, Reg::Ebx, 11),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("sha_ni", 7, 0, Reg::Ebx, 29),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("la57", 7, 0, Reg::Ecx, 16),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("md_clear", 7, 0, Reg::Edx, 10),
    f("xsaveopt", 0xd, 1, Reg::Eax, 0),
    f("xsavec", 0xd, 1, Reg::Eax, 1),
    f("xsaves", 0xd, 1, Reg::Eax, 3),
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("nx", 0x8000_0001, 0, Reg::Edx, 20),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

/// Parses `cx16,xsave,...` (empty items ignored, case-insensitive).
pub fn parse_hide(list: &str) -> Result<Vec<Feature>, CpuidError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            FEATURES
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
                .copied()
                .ok_or_else(|| {
                    let known: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
                    CpuidError::Unknown(name.to_string(), known.join(","))
                })
        })
        .collect()
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// CPUID for vCPU `index` of `count`, from KVM's supported set `base`.
pub fn for_vcpu(base: &CpuId, index: u32, count: u32, hide: &[Feature]) -> CpuId {
    let mut cpuid = base.clone();
    let hide_xsave = hide.iter().any(|f| f.name == "xsave");
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // APIC ID, logical processors per package, CLFLUSH size 8 quadwords.
                e.ebx = (index << 24) | ((count & 0xff) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // OSXSAVE mirrors the guest's CR4; KVM recomputes it.
                e.ecx &= !LEAF1_ECX_OSXSAVE;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            // Extended topology: x2APIC ID in EDX on every subleaf.
            0xb | 0x1f => e.edx = index,
            // Without XSAVE there is no XSAVE state to enumerate.
            0xd if hide_xsave => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
        for f in hide {
            if e.function == f.leaf && e.index == f.subleaf {
                *reg_mut(e, f.reg) &= !(1u32 << f.bit);
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn hides_named_bits_and_sets_topology() {
        let base = CpuId::from_entries(&[entry(1, 0, u32::MAX), entry(7, 0, 0), entry(0xb, 1, 0)])
            .unwrap();
        let hide = parse_hide("cx16, XSAVE,,").unwrap();
        let c = for_vcpu(&base, 2, 4, &hide);
        let l1 = c.as_slice()[0];
        assert_eq!(l1.ecx & (1 << 13), 0);
        assert_eq!(l1.ecx & (1 << 26), 0);
        assert_ne!(l1.ecx & (1 << 30), 0, "other bits untouched");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(c.as_slice()[2].edx, 2);
        assert!(parse_hide("cx16,nonsense").is_err());
        assert!(parse_hide("").unwrap().is_empty());
    }
}
