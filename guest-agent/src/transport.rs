//! Where the requests come from: a virtio-serial port (or any character
//! device), an AF_VSOCK listener, or a Unix socket listener. Every
//! transport serves one host connection at a time and waits for the next
//! when it ends; none of them spins while the host is away.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Action, Agent, ShutdownMode, VIRTIO_PORT_NAME};

/// Pause between checks while the host side is away or a device is missing.
const RETRY: Duration = Duration::from_millis(500);

pub fn log(msg: &str) {
    eprintln!("vireo-guest-agent: {msg}");
}

static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--verbose`: log connections, device events and request sizes.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Socket connections (Unix, vsock) that send nothing for this long are
/// closed, so that a client that hangs cannot keep the next one out
/// forever (connections are served one at a time). Seconds; 0: never.
static IDLE_SECS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_IDLE_TIMEOUT.as_secs());

/// The default of `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// `--idle-timeout SECS` (None: never).
pub fn set_idle_timeout(t: Option<Duration>) {
    let secs = t.map_or(0, |d| d.as_secs().max(1));
    IDLE_SECS.store(secs, std::sync::atomic::Ordering::Relaxed);
}

fn idle_timeout() -> Option<Duration> {
    match IDLE_SECS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        s => Some(Duration::from_secs(s)),
    }
}

/// Logs how a socket connection ended, if not by the client's close.
fn log_conn_end(what: &str, r: io::Result<()>) {
    match r {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            log(&format!("{what} connection idle, closed"));
        }
        Err(e) => log(&format!("{what} connection: {e}")),
    }
}

fn debug(msg: impl FnOnce() -> String) {
    if VERBOSE.load(std::sync::atomic::Ordering::Relaxed) {
        log(&msg());
    }
}

/// Serves requests read from `r`, replies written to `w`, until `r` ends.
pub fn serve_io<R: Read, W: Write>(agent: &mut Agent, r: &mut R, w: &mut W) -> io::Result<()> {
    agent.reset_connection();
    let mut buf = [0u8; 8192];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => {
                debug(|| "end of input".into());
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let out = agent.feed(&buf[..n]);
        debug(|| format!("read {n} bytes, replying {} bytes", out.bytes.len()));
        if !out.bytes.is_empty() {
            w.write_all(&out.bytes)?;
            w.flush()?;
        }
        if let Some(action) = out.action {
            perform(action);
        }
    }
}

/// Carries out an action once its (absent) reply is flushed: sync, then
/// reboot(2). Returns only if that fails (not root, or not the guest).
pub fn perform(action: Action) {
    let Action::Shutdown(mode) = action;
    let (cmd, what) = match mode {
        ShutdownMode::Powerdown => (libc::RB_POWER_OFF, "power off"),
        ShutdownMode::Reboot => (libc::RB_AUTOBOOT, "reboot"),
        ShutdownMode::Halt => (libc::RB_HALT_SYSTEM, "halt"),
    };
    log(&format!("guest-shutdown: {what}"));
    // Also on the console (via the kernel log), where tests watch; best effort.
    if let Ok(mut k) = OpenOptions::new().write(true).open("/dev/kmsg") {
        // One write is one kernel log record.
        let _ = k.write_all(format!("vireo-guest-agent: guest-shutdown: {what}\n").as_bytes());
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with one of the documented commands; it touches no
    // memory of ours and returns only on failure.
    if unsafe { libc::reboot(cmd) } != 0 {
        log(&format!(
            "guest-shutdown: reboot(2) failed: {}",
            io::Error::last_os_error()
        ));
    }
}

/// Reads from a character device, waiting with poll(2) while the other
/// end is away: a virtio-serial port reports POLLHUP (and POLLIN, with
/// nothing to read) as long as no host client has it open.
struct PolledDevice {
    file: File,
    last_revents: libc::c_short,
}

impl Read for PolledDevice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call; the
            // descriptor stays open (owned by self.file).
            let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if pfd.revents != self.last_revents {
                debug(|| format!("poll: revents {:#x}", pfd.revents));
                self.last_revents = pfd.revents;
            }
            if pfd.revents & libc::POLLNVAL != 0 {
                return Err(io::Error::other("poll: invalid descriptor"));
            }
            // A virtio-serial port without a host reports POLLHUP, and
            // POLLIN too (a read returns 0 at once): nothing to read until
            // the host connects. Reopening would not help (closing and
            // reopening the port races with the host's connect).
            if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                std::thread::sleep(RETRY);
                continue;
            }
            return self.file.read(buf);
        }
    }
}

/// Serves a device path. A regular file is read once as requests, the
/// replies going to stdout (handy for trying the agent out); a character
/// device or FIFO is served for ever, reopened after an end of file.
pub fn serve_device(agent: &mut Agent, path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.file_type().is_file() {
        let mut f = File::open(path)?;
        return serve_io(agent, &mut f, &mut io::stdout().lock());
    }
    let mut complained = false;
    loop {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => {
                if !complained {
                    log(&format!("{}: {e}; retrying", path.display()));
                    complained = true;
                }
                std::thread::sleep(RETRY);
                continue;
            }
        };
        complained = false;
        let mut w = file.try_clone()?;
        let mut r = PolledDevice {
            file,
            last_revents: 0,
        };
        if let Err(e) = serve_io(agent, &mut r, &mut w) {
            log(&format!("{}: {e}", path.display()));
        }
        std::thread::sleep(RETRY);
    }
}

/// Listens on a Unix socket path (a stale socket file is replaced).
pub fn serve_unix(agent: &mut Agent, path: &Path) -> io::Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    loop {
        let (mut stream, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.set_read_timeout(idle_timeout())?;
        let mut w = stream.try_clone()?;
        log_conn_end("unix", serve_io(agent, &mut stream, &mut w));
    }
}

fn vsock_listener(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain integers, valid when all zero.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a live sockaddr_vm and `len` its size; bind(2)
    // only reads it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a descriptor we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// SO_RCVTIMEO: a read on the socket fails with EAGAIN after `t`.
fn set_recv_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(t.subsec_micros()),
    };
    // SAFETY: `tv` is a live timeval and the length is its size;
    // setsockopt(2) only reads it, on a descriptor we own.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast::<libc::c_void>(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Listens on AF_VSOCK (any CID) `port`, one connection at a time.
pub fn serve_vsock(agent: &mut Agent, port: u32) -> io::Result<()> {
    serve_vsock_on(agent, &vsock_listener(port)?)
}

fn serve_vsock_on(agent: &mut Agent, listener: &OwnedFd) -> io::Result<()> {
    loop {
        // SAFETY: accept4(2) on our listening socket; no peer address is
        // asked for, so no memory of ours is written.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: `fd` is a fresh descriptor from accept4 that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(t) = idle_timeout() {
            set_recv_timeout(&conn, t)?;
        }
        let mut conn = File::from(conn);
        let mut w = conn.try_clone()?;
        log_conn_end("vsock", serve_io(agent, &mut conn, &mut w));
    }
}

/// The virtio-serial port named `name`: its /dev node, made with mknod
/// from sysfs's `dev` file where /dev has none (no udev in small guests).
/// `sys` and `dev` are /sys/class/virtio-ports and /dev normally.
pub fn find_virtio_port(sys: &Path, dev: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(sys) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(port_name) = std::fs::read_to_string(dir.join("name")) else {
            continue;
        };
        if port_name.trim() != name {
            continue;
        }
        let node = dev.join(entry.file_name());
        if !node.exists() {
            let numbers = std::fs::read_to_string(dir.join("dev"))?;
            make_char_node(&node, numbers.trim())?;
        }
        return Ok(Some(node));
    }
    Ok(None)
}

fn make_char_node(node: &Path, numbers: &str) -> io::Result<()> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad dev numbers {numbers:?}"),
        )
    };
    let (maj, min) = numbers.split_once(':').ok_or_else(bad)?;
    let maj: u32 = maj.parse().map_err(|_| bad())?;
    let min: u32 = min.parse().map_err(|_| bad())?;
    let c = std::ffi::CString::new(node.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `c` is a NUL-terminated path; mknod(2) only reads it.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(maj, min)) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How long the default transport waits for a virtio-serial port before
/// it considers vsock: the port appears a moment after virtio_console
/// loads (the host announces it over the control queue).
const VIRTIO_GRACE: Duration = Duration::from_secs(5);

/// No transport given: the virtio-serial port named
/// `org.qemu.guest_agent.0` if the guest has one (or gets one within
/// [`VIRTIO_GRACE`]), else AF_VSOCK on [`crate::DEFAULT_VSOCK_PORT`] if the
/// guest has vsock, checked again every 2 s until one of them appears.
pub fn serve_default(agent: &mut Agent) -> io::Result<()> {
    let started = std::time::Instant::now();
    let mut complained = false;
    loop {
        match find_virtio_port(
            Path::new("/sys/class/virtio-ports"),
            Path::new("/dev"),
            VIRTIO_PORT_NAME,
        ) {
            Ok(Some(node)) => {
                log(&format!("serving virtio-serial port {}", node.display()));
                return serve_device(agent, &node);
            }
            Ok(None) => {}
            Err(e) => log(&format!("virtio-serial port {VIRTIO_PORT_NAME}: {e}")),
        }
        if started.elapsed() < VIRTIO_GRACE {
            std::thread::sleep(RETRY);
            continue;
        }
        if Path::new("/dev/vsock").exists() {
            match vsock_listener(crate::DEFAULT_VSOCK_PORT) {
                Ok(listener) => {
                    log(&format!("serving vsock port {}", crate::DEFAULT_VSOCK_PORT));
                    return serve_vsock_on(agent, &listener);
                }
                Err(e) if !complained => log(&format!("vsock: {e}")),
                Err(_) => {}
            }
        }
        if !complained {
            log(&format!(
                "no virtio-serial port {VIRTIO_PORT_NAME} and no vsock yet; waiting"
            ));
            complained = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}
