//! The jail the VMM closes around itself once its files are open, before
//! its vCPU threads start and the seccomp filter goes on:
//!
//! * **mount namespace and minimal root** (`--jail`, needs root): a mount
//!   namespace of its own whose root is an empty read-only tmpfs holding
//!   only the directories the VMM still uses by name (those of the API
//!   socket, the console socket, the vsock socket and the exit file — the
//!   Domain's run directory), bind-mounted at their usual paths so that
//!   every path the VMM knows stays valid. The host's root is unmounted
//!   from the namespace (`pivot_root`), so no path leads to a host file:
//!   the kernel, initrd, disks and taps were opened before.
//! * **user** (`--uid`/`--gid`, root only): the VMM switches to that user,
//!   after handing it the files it still renames, unlinks or binds (the
//!   jail's directories, its sockets, the exit file).
//! * **privileges**, always: no capabilities left (effective, permitted,
//!   inheritable, ambient and — when it may — the bounding set), and
//!   `no_new_privs`, so not even an `execve` could gain any.
//!
//! Capabilities and `no_new_privs` are per thread and inherited: this runs
//! on the main thread while it is the only one, and the vCPU threads
//! started afterwards inherit the state (`unshare(CLONE_NEWNS)` also
//! requires a single-threaded process).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("jail: {0}")]
    Invalid(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

fn check(rc: libc::c_int, what: impl Into<String>) -> Result<(), JailError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(sys(what)(std::io::Error::last_os_error()))
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JailError::Invalid(format!("{} contains a NUL byte", p.display())))
}

/// The directories a jail keeps: the parents of `paths`, canonical and
/// without repeats (a directory inside another kept one is dropped).
pub fn kept_dirs(paths: &[&Path]) -> Result<Vec<PathBuf>, JailError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in paths {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = parent
            .canonicalize()
            .map_err(sys(format!("{}", parent.display())))?;
        if dir == Path::new("/") {
            return Err(JailError::Invalid(format!(
                "{} is directly under /: the jail would keep the whole host",
                p.display()
            )));
        }
        dirs.push(dir);
    }
    dirs.sort();
    dirs.dedup();
    let all = dirs.clone();
    dirs.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    Ok(dirs)
}

/// Enters a mount namespace whose root holds only `dirs` (from
/// [`kept_dirs`]), at their usual paths.
pub fn enter(dirs: &[PathBuf]) -> Result<(), JailError> {
    let first = dirs
        .first()
        .ok_or_else(|| JailError::Invalid("nothing to keep".into()))?;
    // SAFETY: unshare and mount take no pointers but valid C strings
    // (built above and alive for the call); they change only this
    // process's mount namespace, which is not shared after the unshare.
    unsafe {
        check(
            libc::unshare(libc::CLONE_NEWNS),
            "unshare(CLONE_NEWNS) (the jail needs root)",
        )?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "making / private",
        )?;
    }
    // Handles on the kept directories, valid whatever is mounted later
    // (opened in the new namespace: a bind mount takes its source from it).
    let handles: Vec<OwnedFd> = dirs
        .iter()
        .map(|d| {
            std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(d)
                .map(OwnedFd::from)
                .map_err(sys(format!("{}", d.display())))
        })
        .collect::<Result<_, _>>()?;
    // The new root: a small tmpfs over the first kept directory (any
    // directory would do; this one surely exists).
    let root = cstr(first)?;
    // SAFETY: as above; the option string is a valid C string.
    unsafe {
        check(
            libc::mount(
                c"vireo-vmm-jail".as_ptr(),
                root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=64k,mode=0755".as_ptr().cast(),
            ),
            format!("a tmpfs on {}", first.display()),
        )?;
    }
    for (dir, handle) in dirs.iter().zip(&handles) {
        let rel = dir.strip_prefix("/").unwrap_or(dir);
        let target = first.join(rel);
        std::fs::create_dir_all(&target).map_err(sys(format!("{}", target.display())))?;
        let source = CString::new(format!("/proc/self/fd/{}", handle.as_raw_fd()))
            .map_err(|_| JailError::Invalid("descriptor path".into()))?;
        let target_c = cstr(&target)?;
        // SAFETY: valid C strings alive for the call.
        unsafe {
            check(
                libc::mount(
                    source.as_ptr(),
                    target_c.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV,
                    std::ptr::null(),
                ),
                format!("binding {} into the jail", dir.display()),
            )?;
        }
    }
    drop(handles);
    std::env::set_current_dir(first).map_err(sys(format!("{}", first.display())))?;
    // SAFETY: "." is a valid C string; pivot_root(".", ".") stacks the old
    // root under the new one, and the lazy unmount then removes it from
    // this namespace (the host is untouched: its mounts are not shared).
    unsafe {
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "unmounting the host's root",
        )?;
    }
    std::env::set_current_dir("/").map_err(sys("/"))?;
    // SAFETY: valid C strings; makes the jail's own root read-only (the
    // kept directories are separate mounts and stay writable).
    unsafe {
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ),
            "making the jail's root read-only",
        )?;
    }
    Ok(())
}

/// Becomes `uid`:`gid` (no supplementary groups), first handing it the
/// files in `give` (they must exist; `lchown`, so links are not followed).
pub fn switch_user(uid: u32, gid: u32, give: &[&Path]) -> Result<(), JailError> {
    for p in give {
        let c = cstr(p)?;
        // SAFETY: a valid C string alive for the call.
        check(
            unsafe { libc::lchown(c.as_ptr(), uid, gid) },
            format!("handing {} to uid {uid}", p.display()),
        )?;
    }
    // SAFETY: plain system calls on this process's credentials; no memory.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(gid, gid, gid), format!("setresgid {gid}"))?;
        check(libc::setresuid(uid, uid, uid), format!("setresuid {uid}"))?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability of the calling thread (and of threads it starts
/// later) and sets `no_new_privs`.
pub fn drop_privileges() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        // Ambient capabilities (EINVAL on kernels without them: nothing to
        // clear).
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        // The bounding set, while CAP_SETPCAP is still held (an
        // unprivileged VMM has none to drop and gets EPERM: fine).
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EPERM) {
                    break;
                }
            }
        }
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and data are valid for the kernel's capset ABI
    // (version 3 takes two data structs) and live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    check(rc as libc::c_int, "dropping capabilities")?;
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "no_new_privs",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_dirs_are_canonical_parents_without_repeats() {
        let base = std::env::temp_dir().join(format!("vireo-jail-{}", std::process::id()));
        let sub = base.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let a = base.join("api.sock");
        let b = base.join("console.sock");
        let c = sub.join("exit.json");
        let canon = base.canonicalize().unwrap();
        assert_eq!(kept_dirs(&[&a, &b, &c]).unwrap(), vec![canon.clone()]);
        let dotted = sub.join("..").join("x.sock");
        assert_eq!(kept_dirs(&[&dotted]).unwrap(), vec![canon]);
        assert!(kept_dirs(&[Path::new("/api.sock")]).is_err());
        std::fs::remove_dir_all(&base).ok();
    }
}
