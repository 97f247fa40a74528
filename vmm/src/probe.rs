//! What `/dev/kvm` is on this host.

use std::path::Path;

/// The KVM a host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// No usable `/dev/kvm`.
    Absent,
    /// Hardware virtualization (VMX or SVM).
    Hardware,
    /// `kvm_pvm`, a software KVM on shadow paging: small guests only.
    Pvm,
}

impl KvmKind {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Absent => "absent: /dev/kvm cannot be opened",
            Self::Hardware => "hardware: /dev/kvm with VMX/SVM",
            Self::Pvm => "pvm: /dev/kvm is the kvm_pvm software implementation (small guests only)",
        }
    }
}

/// Looks at `/dev/kvm`, `/sys/module/kvm_pvm` and the CPU flags.
pub fn probe() -> KvmKind {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return KvmKind::Absent;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return KvmKind::Pvm;
    }
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    {
        KvmKind::Hardware
    } else {
        KvmKind::Pvm
    }
}
