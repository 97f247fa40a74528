//! A vCPU's architectural state for a snapshot: read on the vCPU's own
//! thread while it is parked (after completing any I/O the last exit left
//! pending), and written into a freshly created vCPU before its thread
//! starts. Whatever this KVM refuses to hand out is left out and named in
//! `missing`, so a restore on the same kind of host sets the same set.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Most MSRs a snapshot may carry per vCPU (the host lists a few hundred).
pub const MAX_MSRS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// `kvm_fpu`, which kvm-bindings does not serialize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: Fpu,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: Option<kvm_vcpu_events>,
    pub msrs: Vec<kvm_msr_entry>,
    /// The state KVM would not give (e.g. `xsave` where it is refused).
    pub missing: Vec<String>,
}

/// Reads the MSRs of `msr_list` that KVM lets us read: all at once, or one
/// by one past the first it refuses.
fn read_msrs(fd: &VcpuFd, msr_list: &[u32]) -> Vec<kvm_msr_entry> {
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .take(MAX_MSRS)
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    if let Ok(mut all) = Msrs::from_entries(&entries)
        && let Ok(n) = fd.get_msrs(&mut all)
        && n == entries.len()
    {
        return all.as_slice().to_vec();
    }
    let mut got = Vec::new();
    for e in entries {
        if let Ok(mut one) = Msrs::from_entries(&[e])
            && fd.get_msrs(&mut one) == Ok(1)
        {
            got.extend_from_slice(one.as_slice());
        }
    }
    got
}

/// Reads the state of a parked vCPU. The caller has completed pending I/O
/// (a `KVM_RUN` with `immediate_exit`).
pub fn save(fd: &VcpuFd, index: u32, msr_list: &[u32]) -> Result<VcpuState, StateError> {
    let mut missing = Vec::new();
    let mut optional = |what: &str, ok: bool| {
        if !ok {
            missing.push(what.to_string());
        }
    };
    let xsave = fd.get_xsave().ok();
    optional("xsave", xsave.is_some());
    let xcrs = fd.get_xcrs().ok();
    optional("xcrs", xcrs.is_some());
    let debugregs = fd.get_debug_regs().ok();
    optional("debugregs", debugregs.is_some());
    let vcpu_events = fd.get_vcpu_events().ok();
    optional("vcpu_events", vcpu_events.is_some());
    Ok(VcpuState {
        index,
        regs: fd.get_regs().map_err(kvm("get regs"))?,
        sregs: fd.get_sregs().map_err(kvm("get sregs"))?,
        fpu: Fpu::from(&fd.get_fpu().map_err(kvm("get FPU"))?),
        xsave,
        xcrs,
        debugregs,
        lapic: fd.get_lapic().map_err(kvm("get LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(kvm("get MP state"))?,
        vcpu_events,
        msrs: read_msrs(fd, msr_list),
        missing,
    })
}

/// Writes `s` into a vCPU that has not run yet (its CPUID already set).
/// MSRs KVM will not take are skipped with a warning; everything else must
/// be accepted.
pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    if s.msrs.len() > MAX_MSRS {
        return Err(StateError::Invalid(format!(
            "vCPU {}: {} MSRs (at most {MAX_MSRS})",
            s.index,
            s.msrs.len()
        )));
    }
    fd.set_mp_state(s.mp_state).map_err(kvm("set MP state"))?;
    fd.set_regs(&s.regs).map_err(kvm("set regs"))?;
    fd.set_sregs(&s.sregs).map_err(kvm("set sregs"))?;
    fd.set_fpu(&kvm_fpu::from(&s.fpu)).map_err(kvm("set FPU"))?;
    if let Some(x) = &s.xsave {
        // SAFETY: KVM_SET_XSAVE reads the guest FPU's uABI size, which is
        // at most the 4096 bytes of `kvm_xsave` unless the process asked
        // for extended guest XSTATE permission (ARCH_REQ_XCOMP_GUEST_PERM,
        // AMX), which vireo-vmm never does; `x` is a whole `kvm_xsave`.
        unsafe { fd.set_xsave(x) }.map_err(kvm("set xsave"))?;
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(kvm("set xcrs"))?;
    }
    if let Some(d) = &s.debugregs {
        fd.set_debug_regs(d).map_err(kvm("set debug registers"))?;
    }
    fd.set_lapic(&s.lapic).map_err(kvm("set LAPIC"))?;
    if !s.msrs.is_empty() {
        let all = Msrs::from_entries(&s.msrs)
            .map_err(|e| StateError::Invalid(format!("vCPU {}: MSR list: {e:?}", s.index)))?;
        let n = fd.set_msrs(&all).map_err(kvm("set MSRs"))?;
        if n < s.msrs.len() {
            // KVM stops at the first it refuses: set the rest one by one.
            for e in &s.msrs[n..] {
                let ok = Msrs::from_entries(&[*e])
                    .ok()
                    .and_then(|one| fd.set_msrs(&one).ok())
                    == Some(1);
                if !ok {
                    tracing::warn!(
                        vcpu = s.index,
                        msr = format_args!("{:#x}", e.index),
                        "KVM refused to restore an MSR"
                    );
                }
            }
        }
    }
    if let Some(ev) = &s.vcpu_events {
        fd.set_vcpu_events(ev).map_err(kvm("set vCPU events"))?;
    }
    Ok(())
}
