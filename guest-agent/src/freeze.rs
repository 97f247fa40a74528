//! File system freeze and thaw (FIFREEZE/FITHAW), behind a trait so the
//! logic can be tested on the host without freezing anything.

use std::io;

use crate::sys::{Mount, is_freezable};

/// Freezes or thaws the file system mounted at a path.
pub trait Freezer: Send {
    fn freeze(&mut self, mountpoint: &str) -> io::Result<()>;
    fn thaw(&mut self, mountpoint: &str) -> io::Result<()>;
}

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// The real thing: opens the mount point and issues the ioctl.
#[derive(Debug, Default)]
pub struct IoctlFreezer;

impl IoctlFreezer {
    fn ioctl(mountpoint: &str, request: libc::c_ulong) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(mountpoint)?;
        // SAFETY: `dir` is an open descriptor for the duration of the call;
        // FIFREEZE/FITHAW take an int argument that the kernel ignores and
        // write nothing back to user memory.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Freezer for IoctlFreezer {
    fn freeze(&mut self, mountpoint: &str) -> io::Result<()> {
        Self::ioctl(mountpoint, FIFREEZE)
    }
    fn thaw(&mut self, mountpoint: &str) -> io::Result<()> {
        Self::ioctl(mountpoint, FITHAW)
    }
}

/// Mount points to freeze, in mount-table order, each once (the last
/// mount on a path is the one visible there).
pub fn freezable(mounts: &[Mount]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in mounts {
        out.retain(|p| p != &m.mountpoint);
        if is_freezable(&m.fstype) {
            out.push(m.mountpoint.clone());
        }
    }
    out
}

/// Why a freeze failed (everything it froze is thawed again).
#[derive(Debug)]
pub struct FreezeError {
    pub mountpoint: String,
    pub source: io::Error,
}

impl std::fmt::Display for FreezeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failed to freeze {}: {}", self.mountpoint, self.source)
    }
}

/// Freezes `points`, innermost (last mounted) first. EBUSY (already
/// frozen, e.g. a second mount of one file system) and EOPNOTSUPP (a file
/// system that cannot freeze) are skipped; any other error thaws what was
/// frozen and is returned. On success, the number frozen.
pub fn freeze_all(f: &mut dyn Freezer, points: &[String]) -> Result<usize, FreezeError> {
    let mut frozen: Vec<&String> = Vec::new();
    for p in points.iter().rev() {
        match f.freeze(p) {
            Ok(()) => frozen.push(p),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EOPNOTSUPP)) => {}
            Err(e) => {
                for q in frozen.iter().rev() {
                    let _ = f.thaw(q);
                }
                return Err(FreezeError {
                    mountpoint: p.clone(),
                    source: e,
                });
            }
        }
    }
    Ok(frozen.len())
}

/// Thaws `points`; returns how many were frozen (EINVAL: was not frozen).
pub fn thaw_all(f: &mut dyn Freezer, points: &[String]) -> usize {
    points.iter().filter(|p| f.thaw(p).is_ok()).count()
}
