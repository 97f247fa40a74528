//! What one VMM process runs, and the files it opens before the seccomp
//! filter goes on.

use crate::vcpu::cpuid::Feature;
use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to do when the guest reboots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReboot {
    /// Reset the machine in place and boot again.
    Restart,
    /// Exit with reason `reboot`.
    Destroy,
}

/// The machine and process settings (from the command line).
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub cpuid_hide: Vec<Feature>,
    pub api_socket: PathBuf,
    pub console_log: PathBuf,
    pub console_socket: PathBuf,
    pub on_reboot: OnReboot,
    pub shutdown_timeout: Duration,
    pub seccomp: bool,
}

/// Every file the VMM uses, opened at start.
pub struct OpenFiles {
    pub kernel: File,
    pub initrd: Option<File>,
    pub console_log: File,
    pub api: UnixListener,
    pub console: UnixListener,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding the unix socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn open(path: &Path) -> Result<File, OpenError> {
    File::open(path).map_err(|source| OpenError::Open {
        path: path.into(),
        source,
    })
}

/// Binds a listening socket, replacing a stale socket file (never any other
/// kind of file).
fn bind(path: &Path) -> Result<UnixListener, OpenError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| OpenError::Bind {
        path: path.into(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

impl VmConfig {
    pub fn open_files(&self) -> Result<OpenFiles, OpenError> {
        Ok(OpenFiles {
            kernel: open(&self.kernel)?,
            initrd: self.initrd.as_deref().map(open).transpose()?,
            console_log: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.console_log)
                .map_err(|source| OpenError::Open {
                    path: self.console_log.clone(),
                    source,
                })?,
            api: bind(&self.api_socket)?,
            console: bind(&self.console_socket)?,
        })
    }
}
