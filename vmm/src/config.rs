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
    /// The exit file (opened by `main` before the VM is built).
    pub exit_file: PathBuf,
    /// Close the jail's mount namespace around the VMM ([`crate::jail`]).
    pub jail: bool,
    /// Run as this uid and gid once the files are open (root only).
    pub run_as: Option<(u32, u32)>,
    pub disks: Vec<DiskSpec>,
    pub nets: Vec<NetSpec>,
    pub rng: bool,
    /// A virtio-balloon device, with this initial target in 4 KiB pages.
    pub balloon: Option<u32>,
    /// A virtio-vsock device (`--vsock`).
    pub vsock: Option<VsockSpec>,
    pub elf_entry: crate::boot::loader::ElfEntry,
    /// `--restore FILE` (with `--restore-offset`): carry on from a snapshot
    /// instead of booting.
    pub restore: Option<(PathBuf, u64)>,
    /// `--paused`: the vCPUs wait for `resume` before they first run.
    pub start_paused: bool,
}

/// `--disk PATH[,readonly]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
}

/// `--net TAP[,mac=MAC]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

/// `--vsock cid=N,uds=PATH`: the guest's CID, and the Unix socket host
/// processes connect to (guest-initiated connections to port P go to
/// `PATH_P`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    pub cid: u64,
    pub uds: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("--disk {0:?}: expected PATH[,readonly]")]
    Disk(String),
    #[error("--net {0:?}: expected TAP[,mac=aa:bb:cc:dd:ee:ff]")]
    Net(String),
    #[error("--vsock {0:?}: expected cid=N,uds=PATH with 3 <= N < 2^32 - 1")]
    Vsock(String),
}

impl DiskSpec {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| SpecError::Disk(s.into()))?;
        let mut readonly = false;
        for opt in parts {
            match opt {
                "readonly" | "ro" => readonly = true,
                _ => return Err(SpecError::Disk(s.into())),
            }
        }
        Ok(Self {
            path: path.into(),
            readonly,
        })
    }
}

impl NetSpec {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let err = || SpecError::Net(s.into());
        let mut parts = s.split(',');
        let tap = parts.next().filter(|p| !p.is_empty()).ok_or_else(err)?;
        let mut mac = None;
        for opt in parts {
            let m = opt.strip_prefix("mac=").ok_or_else(err)?;
            let bytes: Vec<u8> = m
                .split(':')
                .map(|h| u8::from_str_radix(h, 16))
                .collect::<Result<_, _>>()
                .map_err(|_| err())?;
            mac = Some(<[u8; 6]>::try_from(bytes.as_slice()).map_err(|_| err())?);
        }
        Ok(Self {
            tap: tap.into(),
            mac,
        })
    }
}

impl VsockSpec {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let err = || SpecError::Vsock(s.into());
        let (mut cid, mut uds) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", v)) if cid.is_none() => {
                    cid = Some(v.parse::<u64>().map_err(|_| err())?);
                }
                Some(("uds", v)) if uds.is_none() && !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => return Err(err()),
            }
        }
        let (Some(cid), Some(uds)) = (cid, uds) else {
            return Err(err());
        };
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(err());
        }
        Ok(Self { cid, uds })
    }
}

/// Every file the VMM uses, opened at start.
pub struct OpenFiles {
    pub kernel: File,
    pub initrd: Option<File>,
    pub console_log: File,
    pub api: UnixListener,
    pub console: UnixListener,
    /// One per `--disk`, opened read-write or read-only as asked.
    pub disks: Vec<File>,
    /// One per `--net`: the tap's queue descriptor.
    pub taps: Vec<File>,
    /// The `--vsock` listening socket.
    pub vsock: Option<UnixListener>,
    /// The `--restore` snapshot.
    pub restore: Option<File>,
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
    /// The files the VMM still uses by name once running: it unlinks its
    /// sockets and renames the exit file at the end, and vsock connects to
    /// `<vsock uds>_<port>`.
    pub fn named_paths(&self) -> Vec<&Path> {
        let mut v = vec![
            self.api_socket.as_path(),
            self.console_socket.as_path(),
            self.exit_file.as_path(),
        ];
        v.extend(self.vsock.as_ref().map(|s| s.uds.as_path()));
        v
    }

    pub fn open_files(&self) -> Result<OpenFiles, OpenError> {
        Ok(OpenFiles {
            restore: self.restore.as_ref().map(|(p, _)| open(p)).transpose()?,
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
            disks: self
                .disks
                .iter()
                .map(|d| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(!d.readonly)
                        .open(&d.path)
                        .map_err(|source| OpenError::Open {
                            path: d.path.clone(),
                            source,
                        })
                })
                .collect::<Result<_, _>>()?,
            taps: self
                .nets
                .iter()
                .map(|n| {
                    vireo_vmm_devices::virtio::tap::open_tap(&n.tap).map_err(|source| {
                        OpenError::Open {
                            path: PathBuf::from(format!("tap {}", n.tap)),
                            source,
                        }
                    })
                })
                .collect::<Result<_, _>>()?,
            vsock: self.vsock.as_ref().map(|v| bind(&v.uds)).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!(
            DiskSpec::parse("/d.raw,readonly").unwrap(),
            DiskSpec {
                path: "/d.raw".into(),
                readonly: true
            }
        );
        assert!(!DiskSpec::parse("/d.raw").unwrap().readonly);
        assert!(DiskSpec::parse("").is_err() && DiskSpec::parse("/d,rw").is_err());
        let n = NetSpec::parse("tap0,mac=02:00:00:aa:bb:0c").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([2, 0, 0, 0xaa, 0xbb, 0x0c]));
        assert_eq!(NetSpec::parse("tap1").unwrap().mac, None);
        assert_eq!(
            VsockSpec::parse("cid=3,uds=/run/v.sock").unwrap(),
            VsockSpec {
                cid: 3,
                uds: "/run/v.sock".into()
            }
        );
        assert_eq!(VsockSpec::parse("uds=/x,cid=77").unwrap().cid, 77);
        for bad in [
            "",
            "cid=2,uds=/x",
            "cid=4294967295,uds=/x",
            "cid=3",
            "uds=/x",
            "cid=3,uds=",
            "cid=3,uds=/x,cid=4",
            "cid=x,uds=/x",
            "cid=3,uds=/x,mode=1",
        ] {
            assert!(VsockSpec::parse(bad).is_err(), "{bad}");
        }
        for bad in [
            "",
            "tap0,mac=02:00",
            "tap0,mac=zz:00:00:00:00:00",
            "tap0,speed=10",
        ] {
            assert!(NetSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
