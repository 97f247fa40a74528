//! The running VMM: starts the vCPU threads, installs the seccomp filter and
//! serves the event loop — control API, console socket, machine events and
//! the shutdown timer — until the machine is gone.

use crate::api::{self, Request, RunState, SnapshotAfter};
use crate::builder::{BuildError, Machine};
use crate::bus::lock;
use crate::config::{OnReboot, OpenFiles, VmConfig};
use crate::events::MachineEvent;
use crate::exit::{ExitReason, ExitReport};
use crate::jail;
use crate::seccomp;
use crate::vcpu::{self, VcpuSet, VcpuThreadInfo};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vireo_vmm_devices::virtio::balloon;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error("event loop: {0}")]
    Epoll(std::io::Error),
}

const TOKEN_API: u64 = 1;
const TOKEN_CONSOLE: u64 = 2;
const TOKEN_EVENTS: u64 = 3;
const TOKEN_API_CLIENT: u64 = 1 << 32;
const TOKEN_CONSOLE_CLIENT: u64 = 2 << 32;
const TOKEN_DEVICE: u64 = 3 << 32;
const TOKEN_CONSOLE_OUT: u64 = 4;
/// How long console output may gather before it goes to clients.
const CONSOLE_BATCH: Duration = Duration::from_millis(2);
const TOKEN_KIND: u64 = !0xffff_ffff;
/// Console input held while the guest's receive FIFO is full.
const CONSOLE_PENDING_MAX: usize = 64 * 1024;
const CONSOLE_RETRY_MS: i32 = 5;

/// Writes to a non-blocking socket, waiting (up to a minute at a time) for
/// room when it is full: a snapshot is sent while the machine is paused.
struct PatientWriter<'a>(&'a UnixStream);

impl Write for PatientWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match (&mut &*self.0).write(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd: self.0.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: `p` is one valid pollfd for the duration of
                    // the call, and the count says one.
                    let rc = unsafe { libc::poll(&mut p, 1, 60_000) };
                    if rc == 0 {
                        return Err(std::io::Error::new(
                            ErrorKind::TimedOut,
                            "the client did not read the snapshot for a minute",
                        ));
                    }
                    if rc < 0 {
                        let e = std::io::Error::last_os_error();
                        if e.kind() != ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct ApiClient {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// A VMM with its machine built and its vCPUs running.
pub struct Vmm {
    machine: Machine,
    vcpus: Option<VcpuSet>,
    cpu_clocks: Vec<libc::clockid_t>,
    epoll: Epoll,
    api: UnixListener,
    console: UnixListener,
    api_clients: HashMap<RawFd, ApiClient>,
    console_inputs: HashMap<RawFd, UnixStream>,
    console_pending: std::collections::VecDeque<u8>,
    console_flush_at: Option<Instant>,
    state: RunState,
    shutdown_deadline: Option<Instant>,
    on_reboot: OnReboot,
    shutdown_timeout: Duration,
    sockets: Vec<PathBuf>,
}

impl Vmm {
    /// Builds the machine, starts its vCPUs and (unless disabled) installs
    /// the seccomp filter on every thread.
    pub fn start(cfg: &VmConfig, files: OpenFiles, start: Instant) -> Result<Self, VmmError> {
        let api = files.api.try_clone().map_err(VmmError::Epoll)?;
        let console = files.console.try_clone().map_err(VmmError::Epoll)?;
        let mut machine = crate::builder::build(cfg, files, start)?;
        let epoll = Epoll::new().map_err(VmmError::Epoll)?;
        let add = |fd: RawFd, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VmmError::Epoll)
        };
        add(api.as_raw_fd(), TOKEN_API)?;
        add(console.as_raw_fd(), TOKEN_CONSOLE)?;
        add(machine.events.fd(), TOKEN_EVENTS)?;
        add(machine.console_clients.wake_fd(), TOKEN_CONSOLE_OUT)?;
        // Device descriptors (taps, vsock's epoll set) edge-triggered: the
        // device reads until EAGAIN, or holds a frame until the guest posts
        // buffers (vsock: see the module comment of its device).
        for (i, (fd, _)) in machine.device_fds.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    *fd,
                    EpollEvent::new(
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                        TOKEN_DEVICE | i as u64,
                    ),
                )
                .map_err(VmmError::Epoll)?;
        }

        // The jail, while this is the only thread (the vCPU threads inherit
        // it).
        if cfg.jail || cfg.run_as.is_some() {
            let dirs = jail::kept_dirs(&cfg.named_paths())?;
            if cfg.jail {
                jail::enter(&dirs)?;
                tracing::info!(kept = ?dirs, "jailed: a mount namespace holding only these directories");
            }
            if let Some((uid, gid)) = cfg.run_as {
                let mut exit_tmp = cfg.exit_file.clone().into_os_string();
                exit_tmp.push(".tmp");
                let exit_tmp = std::path::PathBuf::from(exit_tmp);
                let mut give: Vec<&std::path::Path> = dirs.iter().map(|d| d.as_path()).collect();
                give.extend([cfg.api_socket.as_path(), cfg.console_socket.as_path()]);
                give.extend(cfg.vsock.as_ref().map(|v| v.uds.as_path()));
                give.push(&exit_tmp);
                jail::switch_user(uid, gid, &give)?;
                tracing::info!(uid, gid, "running as an unprivileged user");
            }
        }
        jail::drop_privileges()?;
        let filter = if cfg.seccomp {
            Some(Arc::new(seccomp::filter()?))
        } else {
            None
        };
        vcpu::register_kick_signal()?;
        if cfg.start_paused {
            VcpuSet::start_paused(&machine.control);
        }
        let (tx, rx) = std::sync::mpsc::channel::<VcpuThreadInfo>();
        let mut handles = Vec::new();
        for v in std::mem::take(&mut machine.vcpus) {
            handles.push(v.spawn(filter.clone(), tx.clone())?);
        }
        drop(tx);
        let mut cpu_clocks = Vec::new();
        // Each thread reports once, before it installs its filter and runs.
        for _ in 0..handles.len() {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(info) => cpu_clocks.extend(info.cpu_clock),
                Err(_) => break,
            }
        }
        if let Some(f) = &filter {
            seccomp::apply(f)?;
            tracing::info!("seccomp filter installed on every thread");
        } else {
            tracing::warn!("running without a seccomp filter (--no-seccomp)");
        }
        let vcpus = VcpuSet {
            control: machine.control.clone(),
            handles,
        };
        Ok(Self {
            machine,
            vcpus: Some(vcpus),
            cpu_clocks,
            epoll,
            api,
            console,
            api_clients: HashMap::new(),
            console_inputs: HashMap::new(),
            console_pending: std::collections::VecDeque::new(),
            console_flush_at: None,
            state: if cfg.start_paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            shutdown_deadline: None,
            on_reboot: cfg.on_reboot,
            shutdown_timeout: cfg.shutdown_timeout,
            sockets: [cfg.api_socket.clone(), cfg.console_socket.clone()]
                .into_iter()
                .chain(cfg.vsock.as_ref().map(|v| v.uds.clone()))
                .collect(),
        })
    }

    /// Sum of the vCPU threads' CPU time.
    fn cpu_time_ns(&self) -> u64 {
        self.cpu_clocks
            .iter()
            .map(|&clock| {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `clock` came from pthread_getcpuclockid for one of
                // our threads and `ts` is a valid out-pointer; if the thread
                // has gone the call fails and we count nothing for it.
                let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
                if rc == 0 {
                    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
                } else {
                    0
                }
            })
            .sum()
    }

    fn info(&self) -> api::Info {
        api::Info {
            state: self.state,
            memory_bytes: self.memory_bytes(),
            vcpus: lock(&self.machine.cpu_hotplug).enabled_count(),
            cpu_time_ns: self.cpu_time_ns(),
            boot_time_us: self.machine.boot_time.get(),
            pid: std::process::id(),
        }
    }

    /// Guest memory: all of it, less the pages the balloon driver holds.
    fn memory_bytes(&self) -> u64 {
        let total = self.machine.memory_bytes;
        match &self.machine.balloon {
            Some(b) => {
                total.saturating_sub(u64::from(b.control.actual_pages()) * balloon::PAGE_SIZE)
            }
            None => total,
        }
    }

    /// `balloon`: asks the guest to keep `bytes` of memory.
    fn set_balloon(&self, bytes: u64) -> Result<(), String> {
        let Some(b) = &self.machine.balloon else {
            return Err("no balloon device (start with --balloon)".into());
        };
        let total = self.machine.memory_bytes;
        if bytes == 0 || bytes > total {
            return Err(format!("bytes must be between 1 and {total}"));
        }
        let pages = (total - bytes) / balloon::PAGE_SIZE;
        let pages = u32::try_from(pages).map_err(|_| "balloon target too large".to_string())?;
        balloon::set_target(&mut lock(&b.transport), &b.control, pages);
        tracing::info!(bytes, target_pages = pages, "balloon target set");
        Ok(())
    }

    /// `vcpus`: asks the guest to eject vCPUs `count..` and plugs
    /// `..count` in again.
    fn set_vcpus(&self, count: u32) -> Result<(), String> {
        let max = self.machine.vcpu_count();
        if count == 0 || count > max {
            return Err(format!("count must be between 1 and {max}"));
        }
        let vcpus = self.vcpus().map_err(|e| e.to_string())?;
        let mut hp = lock(&self.machine.cpu_hotplug);
        let mut changed = false;
        for index in 0..max {
            if index < count {
                if !hp.is_enabled(index) {
                    // The thread first, so it waits for INIT/SIPI before the
                    // guest hears of it.
                    vcpus.set_unplugged(index, false);
                }
                changed |= hp.plug(index);
            } else {
                changed |= hp.request_remove(index);
            }
        }
        if changed {
            hp.signal();
        }
        tracing::info!(count, enabled = hp.enabled_count(), "vCPU count requested");
        Ok(())
    }

    fn report(&self, reason: ExitReason, detail: impl Into<String>) -> ExitReport {
        ExitReport {
            reason,
            detail: detail.into(),
            boot_time_us: self.machine.boot_time.get(),
        }
    }

    fn vcpus(&self) -> Result<&VcpuSet, vcpu::VcpuError> {
        self.vcpus
            .as_ref()
            .ok_or(vcpu::VcpuError::Timeout("exist", Duration::ZERO))
    }

    /// Machine reset in place; keeps the run state (a paused VM stays paused).
    fn reset(&mut self, why: &str) -> Result<(), String> {
        tracing::info!(why, "resetting the machine");
        let vcpus = self.vcpus().map_err(|e| e.to_string())?;
        vcpus.pause().map_err(|e| e.to_string())?;
        let entry = self
            .machine
            .reset_platform()
            .map_err(|e| format!("reset: {e}"))?;
        let vcpus = self.vcpus().map_err(|e| e.to_string())?;
        vcpus.reset(entry).map_err(|e| e.to_string())?;
        if self.state != RunState::Paused {
            vcpus.resume();
        }
        Ok(())
    }

    /// Handles one API request; `Some` means the VMM exits.
    fn handle_request(&mut self, req: Request) -> (serde_json::Value, Option<ExitReport>) {
        match req {
            Request::Info => (api::info(&self.info()), None),
            Request::Pause => match self.vcpus().and_then(|v| v.pause()) {
                Ok(()) => {
                    self.state = RunState::Paused;
                    (api::ok(), None)
                }
                Err(e) => (api::error(e.to_string()), None),
            },
            Request::Resume => {
                if let Ok(v) = self.vcpus() {
                    v.resume();
                }
                if self.state == RunState::Paused {
                    self.state = if self.shutdown_deadline.is_some() {
                        RunState::ShuttingDown
                    } else {
                        RunState::Running
                    };
                }
                (api::ok(), None)
            }
            Request::Shutdown { timeout_seconds } => {
                let timeout = timeout_seconds
                    .map(Duration::from_secs)
                    .unwrap_or(self.shutdown_timeout);
                // A paused guest cannot react: let it run to shut down.
                if let Ok(v) = self.vcpus() {
                    v.resume();
                }
                lock(&self.machine.i8042).send_ctrl_alt_del();
                self.state = RunState::ShuttingDown;
                self.shutdown_deadline = Some(Instant::now() + timeout);
                tracing::info!(?timeout, "shutdown requested: Ctrl-Alt-Del sent");
                (api::ok(), None)
            }
            Request::Reset => match self.reset("reset requested on the API") {
                Ok(()) => (api::ok(), None),
                Err(e) => {
                    let exit = self.report(ExitReason::Crashed, e.clone());
                    (api::error(e), Some(exit))
                }
            },
            Request::Balloon { bytes } => match self.set_balloon(bytes) {
                Ok(()) => (api::ok(), None),
                Err(e) => (api::error(e), None),
            },
            Request::Vcpus { count } => match self.set_vcpus(count) {
                Ok(()) => (api::ok(), None),
                Err(e) => (api::error(e), None),
            },
            Request::BlockStats => {
                let counters: Vec<_> = self.machine.disk_stats.iter().map(|s| s.read()).collect();
                (api::block_stats(&counters), None)
            }
            #[cfg(debug_assertions)]
            Request::DebugForbiddenSyscall => {
                tracing::warn!("debug-forbidden-syscall: opening /etc/hostname under the filter");
                // Under the filter the process dies in this call (SIGSYS).
                let answer = match std::fs::File::open("/etc/hostname") {
                    Ok(_) => "the forbidden open succeeded: no seccomp filter".to_string(),
                    Err(e) => format!("the forbidden open failed without killing: {e}"),
                };
                (api::error(answer), None)
            }
            Request::MigrateIncoming { .. } => (
                api::error(
                    "this VMM runs a machine: migrate-incoming needs one started with --incoming",
                ),
                None,
            ),
            // Served by on_api_readable, which owns the connection.
            Request::Snapshot { .. } => (api::error("snapshot: internal routing error"), None),
            Request::Destroy => (
                api::ok(),
                Some(self.report(ExitReason::Destroyed, "destroy requested on the API")),
            ),
        }
    }

    fn on_api_readable(&mut self, fd: RawFd) -> Option<ExitReport> {
        let mut chunk = [0u8; 4096];
        let mut lines = Vec::new();
        let mut close = false;
        if let Some(c) = self.api_clients.get_mut(&fd) {
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
            while let Some(pos) = c.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = c.buf.drain(..=pos).collect();
                lines.push(line);
            }
            if c.buf.len() > api::MAX_LINE {
                lines.push(Vec::new());
                c.buf.clear();
                close = true;
            }
        }
        let mut exit = None;
        let mut exit_after = None;
        for line in lines {
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() && !line.is_empty() {
                continue;
            }
            let (answer, e) = match api::parse(&text) {
                Ok(Request::Snapshot { after }) => {
                    tracing::info!(?after, "API request: snapshot");
                    match self.snapshot(fd, after) {
                        Ok(exit) => {
                            // The answer and the stream went out already.
                            if exit.is_some() {
                                exit_after = exit;
                                break;
                            }
                            continue;
                        }
                        Err(e) => (api::error(e), None),
                    }
                }
                Ok(req) => {
                    tracing::info!(?req, "API request");
                    self.handle_request(req)
                }
                Err(_) if line.is_empty() => (
                    api::error(format!("request longer than {} bytes", api::MAX_LINE)),
                    None,
                ),
                Err(msg) => (api::error(msg), None),
            };
            if let Some(c) = self.api_clients.get_mut(&fd) {
                let mut out = answer.to_string().into_bytes();
                out.push(b'\n');
                if c.stream.write_all(&out).is_err() {
                    close = true;
                }
            }
            if e.is_some() {
                exit = e;
                break;
            }
        }
        if close {
            self.drop_client(fd);
        }
        exit.or(exit_after)
    }

    /// `snapshot`: pauses, sends the answer line and the snapshot on the
    /// client `fd`, then does what `after` says. `Err` is an answer to send
    /// (nothing was sent yet; the guest runs on as before).
    fn snapshot(&mut self, fd: RawFd, after: SnapshotAfter) -> Result<Option<ExitReport>, String> {
        let was_paused = self.state == RunState::Paused;
        let started = Instant::now();
        let vcpus = self.vcpus().map_err(|e| e.to_string())?;
        if let Err(e) = vcpus.pause() {
            if !was_paused {
                vcpus.resume();
            }
            return Err(format!("snapshot failed: {e}"));
        }
        let prepared = vcpus
            .save_states()
            .map_err(|e| e.to_string())
            .and_then(|v| self.machine.save_state(v).map_err(|e| e.to_string()))
            .and_then(|st| {
                crate::snapshot::Prepared::new(&st, &self.machine.mem).map_err(|e| e.to_string())
            });
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                if !was_paused && let Ok(v) = self.vcpus() {
                    v.resume();
                }
                return Err(format!("snapshot failed: {e}"));
            }
        };
        let total = prepared.total_len();
        let sent = match self.api_clients.get(&fd) {
            Some(c) => {
                let mut w = PatientWriter(&c.stream);
                let mut line = api::snapshot_answer(total, prepared.memory_stored()).to_string();
                line.push('\n');
                w.write_all(line.as_bytes())
                    .map_err(crate::snapshot::SnapshotError::Io)
                    .and_then(|()| prepared.write_to(&mut w))
            }
            None => Err(crate::snapshot::SnapshotError::Io(std::io::Error::other(
                "the client has gone",
            ))),
        };
        drop(prepared);
        if let Err(e) = sent {
            tracing::warn!(error = %e, "sending the snapshot failed; the guest runs on");
            if !was_paused && let Ok(v) = self.vcpus() {
                v.resume();
            }
            self.drop_client(fd);
            return Ok(None);
        }
        tracing::info!(
            bytes = total,
            elapsed_ms = started.elapsed().as_millis() as u64,
            ?after,
            "snapshot sent"
        );
        match after {
            SnapshotAfter::Resume => {
                if !was_paused && let Ok(v) = self.vcpus() {
                    v.resume();
                }
                Ok(None)
            }
            SnapshotAfter::Pause => {
                self.state = RunState::Paused;
                Ok(None)
            }
            SnapshotAfter::Exit => Ok(Some(self.report(
                ExitReason::Destroyed,
                "a snapshot was taken and the VMM asked to exit",
            ))),
        }
    }

    fn drop_client(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.api_clients.remove(&fd);
        if self.console_inputs.remove(&fd).is_some() {
            self.machine.console_clients.remove(fd);
        }
    }

    fn accept(&mut self, console: bool) {
        loop {
            let listener = if console { &self.console } else { &self.api };
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            let token = if console {
                TOKEN_CONSOLE_CLIENT
            } else {
                TOKEN_API_CLIENT
            } | fd as u64;
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .is_err()
            {
                continue;
            }
            if console {
                match stream.try_clone() {
                    Ok(writer) => {
                        self.machine.console_clients.add(writer);
                        self.console_inputs.insert(fd, stream);
                        tracing::info!(
                            clients = self.machine.console_clients.len(),
                            "console client attached"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "console client refused");
                        let _ = self
                            .epoll
                            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    }
                }
            } else {
                self.api_clients.insert(
                    fd,
                    ApiClient {
                        stream,
                        buf: Vec::new(),
                    },
                );
            }
        }
    }

    fn on_console_readable(&mut self, fd: RawFd) {
        let mut chunk = [0u8; 1024];
        let mut close = false;
        if let Some(s) = self.console_inputs.get_mut(&fd) {
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => {
                        let room = CONSOLE_PENDING_MAX.saturating_sub(self.console_pending.len());
                        if room < n {
                            tracing::debug!(
                                dropped = n - room,
                                "console input backlog full; input dropped"
                            );
                        }
                        self.console_pending.extend(&chunk[..n.min(room)]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
        }
        if close {
            self.drop_client(fd);
        }
        self.feed_console();
    }

    /// Moves queued console input into the serial receive FIFO as far as it
    /// has room (the rest waits for the guest to read).
    fn feed_console(&mut self) {
        if self.console_pending.is_empty() {
            return;
        }
        let (front, _) = self.console_pending.as_slices();
        let queued = lock(&self.machine.serial).enqueue_input(front);
        self.console_pending.drain(..queued);
    }

    fn on_machine_events(&mut self) -> Option<ExitReport> {
        for e in self.machine.events.drain() {
            tracing::info!(event = ?e, "machine event");
            match e {
                MachineEvent::PowerOff(d) => return Some(self.report(ExitReason::Poweroff, d)),
                MachineEvent::Crash(d) => return Some(self.report(ExitReason::Crashed, d)),
                MachineEvent::EjectCpu(index) => {
                    if let Ok(v) = self.vcpus() {
                        v.set_unplugged(index, true);
                    }
                }
                MachineEvent::Reset(d) => match self.on_reboot {
                    OnReboot::Destroy => return Some(self.report(ExitReason::Reboot, d)),
                    OnReboot::Restart => {
                        if let Err(err) = self.reset(&d) {
                            return Some(self.report(ExitReason::Crashed, err));
                        }
                    }
                },
            }
        }
        None
    }

    /// Serves until the machine is gone; returns why.
    pub fn run(&mut self) -> ExitReport {
        let mut events = vec![EpollEvent::default(); 32];
        let report = loop {
            if let Some(deadline) = self.shutdown_deadline
                && Instant::now() >= deadline
            {
                break self.report(
                    ExitReason::Destroyed,
                    "the guest did not power off within the shutdown timeout",
                );
            }
            self.feed_console();
            let mut timeout = self
                .shutdown_deadline
                .map(|d| {
                    d.saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(i32::MAX as u128) as i32
                        + 1
                })
                .unwrap_or(-1);
            if let Some(at) = self.console_flush_at {
                if Instant::now() >= at {
                    self.machine.console_clients.flush();
                    self.console_flush_at = None;
                } else {
                    let ms = at.saturating_duration_since(Instant::now()).as_millis() as i32 + 1;
                    timeout = if timeout < 0 { ms } else { timeout.min(ms) };
                }
            }
            if !self.console_pending.is_empty() {
                // Input is waiting for room in the guest's FIFO: look again soon.
                timeout = if timeout < 0 {
                    CONSOLE_RETRY_MS
                } else {
                    timeout.min(CONSOLE_RETRY_MS)
                };
            }
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break self.report(ExitReason::Crashed, format!("event loop: {e}")),
            };
            let mut exit = None;
            for ev in &events[..n] {
                let token = ev.data();
                exit = match (token & TOKEN_KIND, token) {
                    (0, TOKEN_API) => {
                        self.accept(false);
                        None
                    }
                    (0, TOKEN_CONSOLE) => {
                        self.accept(true);
                        None
                    }
                    (0, TOKEN_EVENTS) => self.on_machine_events(),
                    (0, TOKEN_CONSOLE_OUT) => {
                        // Output is queued: send it once a little more has gathered.
                        self.machine.console_clients.ack_wake();
                        if self.console_flush_at.is_none() {
                            self.console_flush_at = Some(Instant::now() + CONSOLE_BATCH);
                        }
                        None
                    }
                    (TOKEN_API_CLIENT, t) => self.on_api_readable((t & 0xffff_ffff) as RawFd),
                    (TOKEN_DEVICE, t) => {
                        if let Some((fd, dev)) =
                            self.machine.device_fds.get((t & 0xffff_ffff) as usize)
                        {
                            lock(dev).handle_event(*fd);
                        }
                        None
                    }
                    (TOKEN_CONSOLE_CLIENT, t) => {
                        self.on_console_readable((t & 0xffff_ffff) as RawFd);
                        None
                    }
                    _ => None,
                };
                if exit.is_some() {
                    break;
                }
            }
            if let Some(r) = exit {
                break r;
            }
        };
        tracing::info!(reason = ?report.reason, detail = %report.detail, "VMM exiting");
        if let Some(v) = self.vcpus.take() {
            v.stop();
        }
        // The guest's last words reach attached clients too.
        self.machine.console_clients.flush();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        report
    }
}
