//! The seccomp filter every VMM thread runs under once set-up is done.
//!
//! An allow-list: the system calls the event loop, the vCPU threads, the
//! allocator and the exit path need. Any other system call — `open`,
//! `openat`, `execve`, `clone`, `socket` for anything but a Unix socket,
//! `ptrace`, `mount`... — kills the whole process with `SIGSYS`
//! (`SECCOMP_RET_KILL_PROCESS`). Files the VMM needs are opened before the
//! filter goes on.
//!
//! Why kill rather than refuse with `EPERM`: a VMM that makes a call outside
//! this list is either buggy or already taken over by a guest; either way
//! it must not go on serving. The driver sees the process killed by a
//! signal and reports the Domain `crashed` (docs/vmm.md). The list is
//! exercised by the VMM's own tests (API requests, devices and the exit
//! path all run under it) and by the kvm driver's tests.
//!
//! The one exception to "opened before": virtio-vsock connects a new Unix
//! stream socket to `UDS_<port>` whenever the guest connects to the host, on
//! the vCPU thread that wrote QueueNotify. So `socket` is allowed for
//! `AF_UNIX` only (argument 0; any other family kills), and `connect` is
//! allowed: with no other socket family creatable, it can only reach Unix
//! sockets the process could reach anyway — and the jail
//! ([`crate::jail`]) leaves it only its run directory.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::Error),
    #[error("seccomp: {0}")]
    Backend(#[from] seccompiler::BackendError),
}

const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors opened at start.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    // KVM.
    libc::SYS_ioctl,
    // Event loop and sockets already bound.
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // virtio-vsock: connect a socket made under the AF_UNIX-only rule below.
    libc::SYS_connect,
    // Threads, memory, signals, time.
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_restart_syscall,
    // The exit path: rename the exit file, remove our sockets.
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The compiled filter.
pub fn filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // socket(AF_UNIX, ...) only: virtio-vsock's guest-initiated connections.
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )?])?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs `program` on the calling thread.
pub fn apply(program: &BpfProgram) -> Result<(), SeccompError> {
    Ok(seccompiler::apply_filter(program)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// Runs the test `name` of this binary again in a child process with
    /// `VIREO_SECCOMP_CHILD` set (a forbidden call kills the whole process,
    /// so it cannot happen in the test runner), and returns how it ended.
    fn in_child(name: &str) -> std::process::Output {
        let exe = std::env::current_exe().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "vireo-seccomp-{}-{}",
            std::process::id(),
            name.rsplit("::").next().unwrap_or(name)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new(exe)
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("VIREO_SECCOMP_CHILD", &dir)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    /// The child's scratch directory (made and removed by the parent).
    fn scratch() -> std::path::PathBuf {
        std::env::var_os("VIREO_SECCOMP_CHILD")
            .map(Into::into)
            .unwrap_or_else(std::env::temp_dir)
    }

    fn is_child() -> bool {
        std::env::var_os("VIREO_SECCOMP_CHILD").is_some()
    }

    #[test]
    fn forbidden_call_kills_the_process_with_sigsys() {
        if is_child() {
            let prog = filter().unwrap();
            std::thread::spawn(move || {
                apply(&prog).unwrap();
                // Allowed: writing to a descriptor already open.
                std::io::Write::write_all(&mut std::io::stderr(), b"filtered write ok\n").unwrap();
                // Forbidden: opening a file. The process dies here.
                let r = std::fs::File::open("/proc/self/stat");
                eprintln!("SURVIVED open: {r:?}");
            })
            .join()
            .unwrap();
            return;
        }
        let out = in_child("seccomp::tests::forbidden_call_kills_the_process_with_sigsys");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("filtered write ok"), "{stderr}");
        assert!(!stderr.contains("SURVIVED"), "{stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{:?} {stderr}",
            out.status
        );
    }

    #[test]
    fn filtered_thread_may_make_unix_sockets_only() {
        if is_child() {
            let prog = filter().unwrap();
            let path = scratch().join("l.sock");
            let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            std::thread::spawn(move || {
                apply(&prog).unwrap();
                let unix = std::os::unix::net::UnixStream::connect(&path).map(|_| ());
                eprintln!("unix connect: {unix:?}");
                // An IPv4 socket: the process dies here.
                let inet = std::net::TcpStream::connect("127.0.0.1:9").map(|_| ());
                eprintln!("SURVIVED inet: {inet:?}");
            })
            .join()
            .unwrap();
            drop(listener);
            return;
        }
        let out = in_child("seccomp::tests::filtered_thread_may_make_unix_sockets_only");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("unix connect: Ok(())"), "{stderr}");
        assert!(!stderr.contains("SURVIVED"), "{stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{:?} {stderr}",
            out.status
        );
    }
}
