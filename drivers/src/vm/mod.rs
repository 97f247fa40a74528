//! What the `qemu` and `kvm` drivers share: domains whose activations are
//! processes on this node (one per running domain) that outlive the driver.
//!
//! [`VmDriver`] keeps libvirt's bookkeeping (definitions, transient and
//! persistent domains, IDs, autostart, lifecycle actions) in a [`store`]
//! under a root directory, and asks a [`Backend`] (QEMU over QMP, or
//! vireo-vmm over its control socket) to launch, query and control the
//! process. Nothing is kept only in memory: a driver opened again on the
//! same root (after an agent restart, or by the CLI next to the agent)
//! re-adopts the running processes as they are.
//!
//! Guest events are found by polling: every operation refreshes the domain
//! it touches, and a watcher thread refreshes the active ones twice a
//! second, applying `lifecycle.onPoweroff` / `onReboot` and the graceful
//! shutdown's timeout.

pub mod boot;
pub mod cloud_init;
pub mod guest_agent;
pub mod process;
pub mod snapshot;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use vireo_crds::quantity::{format_bytes, parse_quantity};
use vireo_crds::{
    Domain, DomainInfo, DomainReason, DomainState, DomainType, LifecycleAction, NodeInfo,
    ObjectKind, Validate,
};

use crate::hypervisor::{DomainRef, HypervisorDriver};
use crate::storage::StorageDriver;
use crate::{Error, ListFilter, Lookup, Result};
use store::{Locked, MigrationRole, Record, Run, Store};

const KIND: ObjectKind = ObjectKind::Domain;
/// How long each step of a guest agent conversation may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the only process carrying an activation's mark must have run
/// before a launch nobody saw through adopts it without a pid file (see
/// `Inner::finish_launch`).
const ADOPT_AFTER: Duration = Duration::from_secs(2);

/// How an activation begins.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    /// The guest boots.
    Boot,
    /// From the state saved in a file (path, offset of the state, paused).
    Saved(&'a Path, u64, bool),
    /// Waiting for a live migration's incoming state (paused).
    Migration,
}

/// The files of one activation.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub dir: PathBuf,
    /// The control socket (QMP or vireo-vmm's API). Its path is also the
    /// mark that identifies the process in `/proc/PID/cmdline`.
    pub api: PathBuf,
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    pub pidfile: PathBuf,
    /// The process's own messages (stderr).
    pub log: PathBuf,
    /// Where vireo-vmm writes why it exited.
    pub exit_file: PathBuf,
    /// The Domain's UEFI variable store (`firmware: efi`):
    /// `ROOT/nvram/UUID_VARS.fd`, beside the run directory `ROOT/run/UUID`
    /// and outside it, since it outlives activations. Created at the first
    /// start, removed when the Domain is undefined.
    pub nvram: PathBuf,
    /// The host end of the guest agent's virtio-serial port (qemu).
    pub guest_agent: PathBuf,
    /// vireo-vmm's vsock proxy socket (kvm): `CONNECT port` reaches the
    /// guest's vsock port.
    pub vsock: PathBuf,
    /// Present while a running job (a migration's send) is asked to stop
    /// (`domjobabort`): a file, so that any process can ask the one that
    /// runs the job.
    pub abort_job: PathBuf,
}

impl RunPaths {
    fn new(dir: PathBuf) -> Self {
        let uuid = dir.file_name().unwrap_or_default().to_string_lossy();
        let root = dir.parent().and_then(Path::parent).unwrap_or(&dir);
        Self {
            nvram: root.join("nvram").join(format!("{uuid}_VARS.fd")),
            api: dir.join("api.sock"),
            console_socket: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            pidfile: dir.join("pid"),
            log: dir.join("process.log"),
            exit_file: dir.join("exit.json"),
            guest_agent: dir.join("qga.sock"),
            vsock: dir.join("vsock.sock"),
            abort_job: dir.join("abort-job"),
            dir,
        }
    }
}

/// A disk resolved to a file on this node.
#[derive(Debug, Clone)]
pub struct DiskFile {
    /// Guest device name (`vda`).
    pub name: String,
    pub path: String,
    pub format: vireo_crds::VolFormat,
    pub read_only: bool,
}

/// What a running process reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveState {
    Running,
    Paused,
    /// The guest powered off (or rebooted, where the backend turns reboots
    /// into a stop); the process waits for the driver's decision.
    GuestStopped,
    /// The guest crashed (panic device); the process waits.
    GuestCrashed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub state: LiveState,
    /// Memory the guest has now (balloon), if the backend can tell.
    pub memory: Option<u64>,
    /// vCPUs present now, if the backend can tell.
    pub vcpus: Option<u32>,
}

/// An operation on a running process.
#[derive(Debug, Clone, Copy)]
pub enum Control {
    Pause,
    Resume,
    /// ACPI power button (QEMU) or Ctrl-Alt-Del (vireo-vmm).
    Powerdown,
    /// Reset in place, and run (also after a guest stop).
    Reset,
    SetMemory(u64),
    /// From the current count to a new one.
    SetVcpus {
        from: u32,
        to: u32,
    },
}

/// Why a control operation failed.
#[derive(Debug, Clone)]
pub enum ControlError {
    Unsupported(&'static str),
    Failed(String),
    /// The guest cannot take this yet (still booting); the driver keeps the
    /// request and tries again from the watcher.
    NotYet(String),
}

/// A hypervisor process behind [`VmDriver`].
pub trait Backend: Send + Sync + 'static {
    /// Driver name: `qemu`, `kvm`.
    fn name(&self) -> &'static str;
    /// The `spec.type` this backend runs.
    fn domain_type(&self) -> DomainType;
    fn version(&self) -> String;
    /// The guest architectures (`spec.arch`) this backend runs on this
    /// node, the first being what it runs natively.
    fn arches(&self) -> &'static [&'static str] {
        &["x86_64"]
    }
    /// What the backend needs in a definition beyond the generic checks
    /// (a kernel, a known machine type). The message names the field.
    fn check(&self, def: &Domain) -> std::result::Result<(), String>;
    /// Starts the process for `def`, detached from the caller (it must
    /// outlive the driver), and returns its PID once it accepts control.
    fn launch(
        &self,
        def: &Domain,
        paths: &RunPaths,
        disks: &[DiskFile],
    ) -> std::result::Result<u32, String>;
    /// Asks the process how the guest is.
    fn query(&self, paths: &RunPaths) -> std::result::Result<Live, String>;
    fn control(&self, paths: &RunPaths, op: Control) -> std::result::Result<(), ControlError>;
    /// Why a process that is gone ended, if it left word (vireo-vmm's exit
    /// file). `None` means it died without saying: crashed.
    fn exit_reason(&self, _paths: &RunPaths) -> Option<DomainReason> {
        None
    }
    /// The host thread of each vCPU of the running guest, in vCPU order;
    /// `None` when the backend does not say.
    fn vcpu_threads(&self, _paths: &RunPaths) -> Option<std::result::Result<Vec<u32>, String>> {
        None
    }
    /// How the host reaches the guest agent of a running guest; `None`
    /// when the backend gives guests no agent channel.
    fn guest_agent(&self, _paths: &RunPaths) -> Option<guest_agent::Channel> {
        None
    }
    /// Whether the guest has its end of the agent channel open, when the
    /// backend can tell (`false`: no agent runs, so do not wait for one).
    fn guest_agent_open(&self, _paths: &RunPaths) -> Option<bool> {
        None
    }
    /// Whether the backend saves and restores guest state (`save`,
    /// `restore`, `managedsave`).
    fn saves_state(&self) -> bool {
        false
    }
    /// Pauses the guest and appends its whole state to `file` (after the
    /// save file's header). The process stays, paused; the driver ends it.
    fn save_state(&self, _paths: &RunPaths, _file: &Path) -> std::result::Result<(), String> {
        Err("this backend does not save guest state".into())
    }
    /// Starts the process as [`Backend::launch`] does, but waiting for a
    /// saved state instead of booting. `file` and `offset` are where the
    /// state is (a backend that reads it at start, as vireo-vmm does, takes
    /// it here; QEMU gets it in [`Backend::load_state`]), `paused` whether
    /// the guest must come back paused.
    fn launch_incoming(
        &self,
        _def: &Domain,
        _paths: &RunPaths,
        _disks: &[DiskFile],
        _file: &Path,
        _offset: u64,
        _paused: bool,
    ) -> std::result::Result<u32, String> {
        Err("this backend does not restore guest state".into())
    }
    /// Loads the state at `offset` in `file` into a process started by
    /// [`Backend::launch_incoming`], and leaves the guest running (or
    /// paused, with `paused`).
    fn load_state(
        &self,
        _paths: &RunPaths,
        _file: &Path,
        _offset: u64,
        _paused: bool,
    ) -> std::result::Result<(), String> {
        Err("this backend does not restore guest state".into())
    }
    /// Whether the backend migrates running guests between nodes (the
    /// `migrate_*` steps of [`HypervisorDriver`]).
    fn migrates(&self) -> bool {
        false
    }
    /// Migration target: starts the process as [`Backend::launch`] does,
    /// but waiting for an incoming migration, and paused once it is in.
    fn launch_migration_target(
        &self,
        _def: &Domain,
        _paths: &RunPaths,
        _disks: &[DiskFile],
    ) -> std::result::Result<u32, String> {
        Err("this backend does not migrate guests".into())
    }
    /// Migration target: listens on `address` for the state and serves
    /// each disk of `exports` (its index among the launched disks, its
    /// name) writable for the source's copy.
    fn migration_listen(
        &self,
        _paths: &RunPaths,
        _address: std::net::IpAddr,
        _exports: &[(usize, String)],
    ) -> std::result::Result<crate::migration::MigrationIncoming, String> {
        Err("this backend does not migrate guests".into())
    }
    /// Migration source: copies the disks of `copies` (index, name) to the
    /// target's exports, sends the state, and returns once the source is
    /// paused with everything sent. On an error, undoes what it set up
    /// (the guest may be left paused: the driver resumes it).
    /// `aborted` says when the job is to stop (`domjobabort`): the backend
    /// asks it while it waits, and fails saying so.
    fn migration_send(
        &self,
        _paths: &RunPaths,
        _incoming: &crate::migration::MigrationIncoming,
        _params: &crate::migration::MigrationParams,
        _copies: &[(usize, String)],
        _aborted: &dyn Fn() -> bool,
    ) -> std::result::Result<crate::migration::MigrationStats, String> {
        Err("this backend does not migrate guests".into())
    }
    /// Migration target, after a migration that succeeded: stops serving
    /// the disks and runs the guest.
    fn migration_resume_target(&self, _paths: &RunPaths) -> std::result::Result<(), String> {
        Err("this backend does not migrate guests".into())
    }
    /// How the backend keeps disks in a snapshot (`snapshot-create-as`);
    /// `None`: it takes no snapshots. A full snapshot's memory goes
    /// through [`Backend::save_state`] and comes back through
    /// [`Backend::launch_incoming`] and [`Backend::load_state`].
    fn snapshot_disks(&self) -> Option<snapshot::DiskSnapshots> {
        None
    }
    /// With the guest paused, takes the internal snapshot `tag` of the
    /// disks at `indexes` among the launch's disks: all or none.
    fn snapshot_internal_live(
        &self,
        _paths: &RunPaths,
        _indexes: &[usize],
        _tag: &str,
    ) -> std::result::Result<(), String> {
        Err("this backend takes no internal disk snapshots".into())
    }
    /// Deletes the internal snapshot `tag` of the running guest's disk at
    /// `index`.
    fn snapshot_delete_live(
        &self,
        _paths: &RunPaths,
        _index: usize,
        _tag: &str,
    ) -> std::result::Result<(), String> {
        Err("this backend takes no internal disk snapshots".into())
    }
    /// I/O counters of the running guest's disk `disk` (its target name),
    /// virsh's names and values; `None` when the backend keeps none.
    fn block_stats(
        &self,
        _paths: &RunPaths,
        _disk: &str,
    ) -> Option<std::result::Result<Vec<(String, i64)>, String>> {
        None
    }
}

/// Settings of a [`VmDriver`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the driver keeps its state.
    pub root: PathBuf,
    /// How long a graceful shutdown waits for the guest before destroying it.
    pub shutdown_timeout: Duration,
    /// How often the watcher refreshes active domains.
    pub poll: Duration,
    /// The node's shared domain IDs (`&ids=FILE` in the URI); without it
    /// the driver numbers its own activations, as a libvirt connection does.
    pub ids: Option<crate::ids::DomainIds>,
    /// Where `spec.os.kernel` and `spec.os.initrd` may come from besides the
    /// volumes of the storage driver's pools (`crate::host_paths`):
    /// `/var/lib/vireo/boot` for `/system`, `&boot_dirs=DIR:DIR` on an
    /// embedded URI; `None` (an embedded URI without it): any path.
    pub boot_dirs: Option<Vec<PathBuf>>,
}

/// A hypervisor driver over processes; see the module docs.
pub struct VmDriver<B: Backend> {
    inner: Arc<Inner<B>>,
}

struct Inner<B: Backend> {
    backend: B,
    store: Store,
    options: Options,
    storage: Arc<dyn StorageDriver>,
    /// The networks interfaces join (their bridges take the guests' taps).
    network: Arc<dyn crate::NetworkDriver>,
    /// Serializes this process's threads (the store's flock is per process).
    mutex: Mutex<()>,
    /// When a repeated request (power button, vCPU unplug) was last sent,
    /// per domain and kind.
    last_sent: Mutex<HashMap<(String, &'static str), Instant>>,
    /// One guest agent conversation at a time per activation (the channel
    /// has one client); held outside the driver's lock.
    agent_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

fn io_failed(name: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::OperationFailed {
        object: crate::error::ObjectName::new(KIND, name),
        message: format!("{what}: {e}"),
    }
}

fn not_running(name: &str) -> Error {
    Error::invalid_state(KIND, name, "is not running")
}

fn sizes(def: &Domain) -> (u64, u64) {
    let max = parse_quantity(&def.spec.memory).unwrap_or(0);
    let cur = def
        .spec
        .current_memory
        .as_ref()
        .and_then(|q| parse_quantity(q).ok())
        .unwrap_or(max);
    (max, cur)
}

/// Moves a VM process out of the agent pod's cgroups, so that it outlives
/// the pod (`crate::cgroup`); outside a pod this does nothing. A failure is
/// logged, not fatal: the guest runs, but would die with the pod.
fn keep_beyond_pod(domain: &str, pid: u32) {
    match crate::cgroup::leave_pod(pid) {
        Ok(moved) if moved.is_empty() => {}
        Ok(moved) => {
            tracing::debug!(
                domain,
                pid,
                ?moved,
                "VM process moved out of the agent pod's cgroups"
            )
        }
        Err(e) => {
            tracing::warn!(domain, pid, error = %e, "cannot keep the VM process beyond the agent's pod")
        }
    }
}

impl<B: Backend> VmDriver<B> {
    /// Opens the driver on its root, and starts the watcher thread.
    pub fn open(
        backend: B,
        options: Options,
        network: Arc<dyn crate::NetworkDriver>,
        storage: Arc<dyn StorageDriver>,
    ) -> std::io::Result<Self> {
        let store = Store::open(&options.root)?;
        // A guest adopted from an agent that ran in a pod before leaves
        // that pod's cgroups too, if its launch could not move it.
        for rec in store.lock()?.all()? {
            if let Some(run) = &rec.run
                && process::alive(run.pid, &RunPaths::new(store.run_dir(&rec.uuid)).api)
            {
                keep_beyond_pod(&rec.name, run.pid);
            }
        }
        if let Some(ids) = &options.ids {
            // The IDs of the activations this driver re-adopts stay theirs.
            let running = store.lock()?.all()?;
            if let Some(max) = running
                .iter()
                .filter_map(|r| r.run.as_ref())
                .map(|r| r.id)
                .max()
            {
                ids.observe(max)?;
            }
        }
        let inner = Arc::new(Inner {
            backend,
            store,
            options,
            storage,
            network,
            mutex: Mutex::new(()),
            last_sent: Mutex::new(HashMap::new()),
            agent_locks: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&inner);
        let poll = inner.options.poll;
        thread::Builder::new()
            .name(format!("{}-watch", inner.backend.name()))
            .spawn(move || watch(weak, poll))?;
        Ok(Self { inner })
    }

    /// The files of a domain's current (or next) activation, for the
    /// console and for tests.
    pub fn run_paths(&self, name: &str) -> Result<RunPaths> {
        let rec = self.inner.with(name, |_, rec| Ok(rec.clone()))?;
        Ok(self.inner.paths(&rec.uuid))
    }

    /// The PID of a running domain's process.
    pub fn pid(&self, name: &str) -> Result<Option<u32>> {
        self.inner
            .with(name, |_, rec| Ok(rec.run.as_ref().map(|r| r.pid)))
    }
}

fn watch<B: Backend>(inner: Weak<Inner<B>>, poll: Duration) {
    loop {
        thread::sleep(poll);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = inner.refresh_all() {
            tracing::warn!(driver = inner.backend.name(), error = %e, "refreshing domains failed");
        }
    }
}

impl<B: Backend> Inner<B> {
    fn paths(&self, uuid: &str) -> RunPaths {
        RunPaths::new(self.store.run_dir(uuid))
    }

    /// Runs `f` with the locks held.
    fn locked<T>(&self, f: impl FnOnce(&Locked<'_>) -> Result<T>) -> Result<T> {
        let _guard = self.mutex.lock().unwrap_or_else(|p| p.into_inner());
        let lock = self
            .store
            .lock()
            .map_err(|e| io_failed("", "locking the driver state", e))?;
        f(&lock)
    }

    /// Runs `f` on the named domain's record, refreshed first.
    fn with<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Locked<'_>, &mut Record) -> Result<T>,
    ) -> Result<T> {
        self.locked(|l| {
            let mut rec = l
                .get(name)
                .map_err(|e| io_failed(name, "reading the domain record", e))?
                .ok_or_else(|| Error::not_found(KIND, name))?;
            self.refresh(l, &mut rec)?;
            if l.get(name).ok().flatten().is_none() {
                // A transient domain ended during the refresh.
                return Err(Error::not_found(KIND, name));
            }
            f(l, &mut rec)
        })
    }

    fn refresh_all(&self) -> Result<()> {
        self.locked(|l| {
            let all = l
                .all()
                .map_err(|e| io_failed("", "listing domain records", e))?;
            for mut rec in all.into_iter().filter(Record::is_active) {
                if let Err(e) = self.refresh(l, &mut rec) {
                    tracing::warn!(domain = %rec.name, error = %e, "refresh failed");
                }
            }
            Ok(())
        })
    }

    /// Whether a repeated request is due (and marks it sent if so).
    fn due(&self, name: &str, kind: &'static str, every: Duration) -> bool {
        let mut sent = self.last_sent.lock().unwrap_or_else(|p| p.into_inner());
        let key = (name.to_string(), kind);
        if sent.get(&key).is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        sent.insert(key, Instant::now());
        true
    }

    fn save(&self, l: &Locked<'_>, rec: &Record) -> Result<()> {
        l.put(rec)
            .map_err(|e| io_failed(&rec.name, "saving the domain record", e))
    }

    /// Ends the activation with `reason`: the process is gone (or is made
    /// to go), the run directory's sockets are removed, and a transient
    /// domain disappears.
    fn end(&self, l: &Locked<'_>, rec: &mut Record, reason: DomainReason) -> Result<()> {
        if let Some(run) = rec.run.take() {
            let paths = self.paths(&rec.uuid);
            // A launch nobody saw through has no PID on record: whatever
            // carries the activation's mark is its process.
            let pids = if run.launching {
                process::with_marker(&paths.api)
            } else {
                vec![run.pid]
            };
            if !pids
                .iter()
                .all(|&pid| process::terminate(pid, &paths.api, Duration::from_secs(3)))
            {
                rec.run = Some(run);
                return Err(io_failed(
                    &rec.name,
                    "stopping the process",
                    "it is still there after SIGKILL",
                ));
            }
            for p in [&paths.api, &paths.console_socket, &paths.pidfile] {
                let _ = std::fs::remove_file(p);
            }
            unplug_interfaces(&rec.name, &run.live);
            tracing::info!(driver = self.backend.name(), domain = %rec.name, id = run.id, reason = %reason.virsh_name(), "domain stopped");
        }
        self.last_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(n, _), _| n != &rec.name);
        rec.last_reason = reason;
        if rec.definition.is_none() {
            // A transient domain ends with its activation: so does its NVRAM.
            let _ = std::fs::remove_file(self.paths(&rec.uuid).nvram);
            l.remove(&rec.name)
                .map_err(|e| io_failed(&rec.name, "removing the domain record", e))
        } else {
            self.save(l, rec)
        }
    }

    /// Brings the record up to date with its process and applies lifecycle
    /// actions. Query failures leave the record as it is.
    fn refresh(&self, l: &Locked<'_>, rec: &mut Record) -> Result<()> {
        let Some(run) = rec.run.clone() else {
            return Ok(());
        };
        let paths = self.paths(&rec.uuid);
        if run.launching {
            return self.finish_launch(l, rec, &paths);
        }
        if !process::alive(run.pid, &paths.api) {
            let said = self.backend.exit_reason(&paths);
            let reason = match said {
                Some(DomainReason::Shutdown) if run.fake_reboot => {
                    // A reboot we asked for ended the process (vireo-vmm
                    // with onReboot=destroy).
                    DomainReason::Shutdown
                }
                Some(r) => r,
                None => DomainReason::Crashed,
            };
            if reason == DomainReason::Crashed {
                tracing::warn!(domain = %rec.name, pid = run.pid, "the VM process is gone without a word: crashed");
            }
            // A VMM that ends with its guest (vireo-vmm) is started again
            // for a restart lifecycle action, keeping the activation's ID.
            // A crash the VMM reported (a guest panic, a vCPU KVM could not
            // run) follows onCrash; a process gone without a word is left
            // to the runStrategy of whoever manages the Domain.
            let reported_crash = said == Some(DomainReason::Crashed);
            let action = if reported_crash {
                run.live.spec.lifecycle.on_crash
            } else if run.fake_reboot {
                run.live.spec.lifecycle.on_reboot
            } else {
                run.live.spec.lifecycle.on_poweroff
            };
            if (reason == DomainReason::Shutdown || reported_crash)
                && action == LifecycleAction::Restart
            {
                let disks = self.resolve_disks(&rec.name, &rec.uuid, &run.live)?;
                let boot = self.for_launch(&rec.name, &run.live)?;
                self.plug_interfaces(&rec.name, &run.live)?;
                for p in [&paths.exit_file, &paths.api, &paths.console_socket] {
                    let _ = std::fs::remove_file(p);
                }
                // Recorded first, as in `activate`: see `Run::launching`.
                if let Some(r) = rec.run.as_mut() {
                    r.pid = 0;
                    r.launching = true;
                }
                self.save(l, rec)?;
                let pid = match self.backend.launch(&boot, &paths, &disks) {
                    Ok(pid) => pid,
                    Err(e) => {
                        // As it was: the next refresh tries again.
                        if let Some(r) = rec.run.as_mut() {
                            r.pid = run.pid;
                            r.launching = false;
                        }
                        let _ = self.save(l, rec);
                        return Err(io_failed(&rec.name, "starting the VM process again", e));
                    }
                };
                keep_beyond_pod(&rec.name, pid);
                if let Some(r) = rec.run.as_mut() {
                    r.pid = pid;
                    r.launching = false;
                    r.fake_reboot = false;
                    r.shutdown_since = None;
                    r.reason = DomainReason::Booted;
                }
                tracing::info!(domain = %rec.name, pid, "guest stopped; lifecycle restart: started again");
                return self.save(l, rec);
            }
            return self.end(l, rec, reason);
        }
        let live = match self.backend.query(&paths) {
            Ok(live) => live,
            Err(e) => {
                tracing::debug!(domain = %rec.name, error = %e, "query failed");
                return Ok(());
            }
        };
        let lifecycle = run.live.spec.lifecycle;
        match live.state {
            LiveState::GuestStopped | LiveState::GuestCrashed => {
                let action = match live.state {
                    LiveState::GuestCrashed => lifecycle.on_crash,
                    _ if run.fake_reboot => lifecycle.on_reboot,
                    _ => lifecycle.on_poweroff,
                };
                match action {
                    LifecycleAction::Restart => {
                        self.backend
                            .control(&paths, Control::Reset)
                            .map_err(|e| control_error(&rec.name, &self.backend, e))?;
                        if let Some(r) = rec.run.as_mut() {
                            r.fake_reboot = false;
                            r.shutdown_since = None;
                            r.reason = DomainReason::Booted;
                        }
                        self.save(l, rec)?;
                        tracing::info!(domain = %rec.name, "guest stopped; lifecycle restart: reset in place");
                    }
                    LifecycleAction::Preserve if live.state == LiveState::GuestCrashed => {
                        // Keep the crashed guest for inspection.
                    }
                    _ => {
                        let reason = if live.state == LiveState::GuestCrashed {
                            DomainReason::Crashed
                        } else {
                            DomainReason::Shutdown
                        };
                        self.end(l, rec, reason)?;
                    }
                }
            }
            LiveState::Running | LiveState::Paused => {
                if let (Some(to), Some(now)) = (run.pending_vcpus, live.vcpus) {
                    if now == to {
                        if let Some(r) = rec.run.as_mut() {
                            r.pending_vcpus = None;
                        }
                        self.save(l, rec)?;
                    } else if self.due(&rec.name, "vcpus", Duration::from_secs(2)) {
                        // Ask again: a request the guest got before its
                        // hot-plug handling was ready is lost.
                        match self
                            .backend
                            .control(&paths, Control::SetVcpus { from: now, to })
                        {
                            Ok(()) | Err(ControlError::NotYet(_)) => {}
                            Err(e) => {
                                tracing::warn!(domain = %rec.name, error = ?e, "vCPU change failed; dropped");
                                if let Some(r) = rec.run.as_mut() {
                                    r.pending_vcpus = None;
                                }
                                self.save(l, rec)?;
                            }
                        }
                    }
                }
                if let Some(since) = run.shutdown_since {
                    let waited = process::now_secs().saturating_sub(since);
                    if waited >= self.options.shutdown_timeout.as_secs() {
                        tracing::warn!(domain = %rec.name, waited, "the guest ignored the shutdown request: destroying it");
                        return self.end(l, rec, DomainReason::Destroyed);
                    }
                    // Press the power button again now and then: a guest
                    // still booting may have missed the first press.
                    if live.state == LiveState::Running
                        && self.due(&rec.name, "powerdown", Duration::from_secs(2))
                        && let Err(e) = self.backend.control(&paths, Control::Powerdown)
                    {
                        tracing::debug!(domain = %rec.name, error = ?e, "power button");
                    }
                }
            }
        }
        Ok(())
    }

    /// A launch recorded by a process that did not see it through (see
    /// `Run::launching`: its agent was killed while the VM process
    /// started). Adopts the process that launch started: the one its pid
    /// file names, or else the only process with the activation's mark once
    /// it has run for [`ADOPT_AFTER`] (QEMU writes its pid file as it
    /// daemonizes; the parent it leaves carries the mark too, briefly).
    /// With no such process, the launch never got that far: the activation
    /// ends, `failed`, and its taps go. Otherwise (still daemonizing) the
    /// next refresh looks again.
    ///
    /// Starting another process instead would collide with the first (the
    /// tap and the disks are taken) and leave that one running unmanaged.
    fn finish_launch(&self, l: &Locked<'_>, rec: &mut Record, paths: &RunPaths) -> Result<()> {
        let marked = process::with_marker(&paths.api);
        let from_pidfile = std::fs::read_to_string(&paths.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|pid| marked.contains(pid));
        let pid = from_pidfile.or_else(|| match marked.as_slice() {
            [one] if process::age(*one).is_some_and(|a| a >= ADOPT_AFTER) => Some(*one),
            _ => None,
        });
        match pid {
            Some(pid) => {
                // The launch ended before its agent could do this.
                keep_beyond_pod(&rec.name, pid);
                if let Some(r) = rec.run.as_mut() {
                    r.pid = pid;
                    r.launching = false;
                }
                tracing::info!(driver = self.backend.name(), domain = %rec.name, pid, "adopted the VM process of a launch its agent did not see through");
                self.save(l, rec)
            }
            None if marked.is_empty() => {
                tracing::warn!(driver = self.backend.name(), domain = %rec.name, "a launch was interrupted before its VM process started: shut off (failed)");
                self.end(l, rec, DomainReason::Failed)
            }
            None => Ok(()),
        }
    }

    /// Checks a definition and gives it its UUID (the spec's, the existing
    /// domain's, or a new one). Refuses a UUID another domain has.
    fn prepare(&self, l: &Locked<'_>, domain: &Domain) -> Result<(String, Domain)> {
        let name = domain
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid_argument(KIND, "", "metadata.name is required"))?;
        if !store::valid_name(&name) {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                "metadata.name: only letters, digits, '-', '.' and '_' (not first), optionally as namespace/name",
            ));
        }
        domain
            .spec
            .validate()
            .map_err(|e| Error::invalid_argument(KIND, &name, e.to_string()))?;
        if let Some(dirs) = &self.options.boot_dirs
            && let Some(why) = crate::host_paths::refusal(domain, dirs, Some(self.storage.as_ref()))
        {
            return Err(Error::invalid_argument(KIND, &name, why));
        }
        let wanted = self.backend.domain_type();
        if domain.spec.domain_type != wanted {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "spec.type: the {} driver runs domains of type '{wanted}', not '{}'",
                    self.backend.name(),
                    domain.spec.domain_type
                ),
            ));
        }
        let arches = self.backend.arches();
        if !arches.contains(&domain.spec.arch()) {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "spec.arch: the {} driver on this node runs {} guests, not '{}'",
                    self.backend.name(),
                    arches.join(" and "),
                    domain.spec.arch()
                ),
            ));
        }
        self.backend
            .check(domain)
            .map_err(|e| Error::invalid_argument(KIND, &name, e))?;
        let all = l
            .all()
            .map_err(|e| io_failed(&name, "listing domain records", e))?;
        let existing = all.iter().find(|r| r.name == name);
        let uuid = match (&domain.spec.uuid, existing) {
            (Some(u), Some(rec)) if !u.eq_ignore_ascii_case(&rec.uuid) => {
                return Err(Error::already_exists(
                    KIND,
                    &name,
                    format!(" with uuid {}", rec.uuid),
                ));
            }
            (Some(u), _) => u.to_ascii_lowercase(),
            (None, Some(rec)) => rec.uuid.clone(),
            (None, None) => uuid::Uuid::new_v4().to_string(),
        };
        if let Some(other) = all.iter().find(|r| r.uuid == uuid && r.name != name) {
            return Err(Error::already_exists(
                KIND,
                &other.name,
                format!(" with uuid {uuid}; '{name}' cannot take it"),
            ));
        }
        let mut def = domain.clone();
        def.spec.uuid = Some(uuid.clone());
        def.status = None;
        Ok((name, def))
    }

    /// The record of `name` brought up to date, or a new one (without a
    /// definition) for a prepared `def`, whose UUID is the record's.
    fn record_for(&self, l: &Locked<'_>, name: &str, def: &Domain) -> Result<Record> {
        let read = || {
            l.get(name)
                .map_err(|e| io_failed(name, "reading the domain record", e))
        };
        if let Some(mut rec) = read()? {
            self.refresh(l, &mut rec)?;
        }
        // A transient domain may have ended during the refresh.
        Ok(read()?.unwrap_or_else(|| Record {
            name: name.to_string(),
            uuid: def.spec.uuid.clone().unwrap_or_default(),
            definition: None,
            autostart: false,
            last_reason: DomainReason::Unknown,
            run: None,
        }))
    }

    /// The volume `volume` (named by `field`) in the active pools of this
    /// node: exactly one, with its content complete.
    fn find_volume(&self, name: &str, field: &str, volume: &str) -> Result<crate::VolInfo> {
        let mut found = Vec::new();
        for pool in self.storage.list_pools(ListFilter::Active)? {
            if let Ok(info) = self.storage.volume_info(&pool.name, volume) {
                found.push(info);
            }
        }
        let info = match found.len() {
            0 => {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!("{field}: no volume '{volume}' in an active pool on this node"),
                ));
            }
            1 => found.remove(0),
            _ => {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!(
                        "{field}: volume '{volume}' is in several pools ({})",
                        found
                            .iter()
                            .map(|v| v.pool.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        };
        if info.awaiting_upload {
            return Err(Error::invalid_state(
                KIND,
                name,
                format!(
                    "{field}: volume '{volume}' is waiting for its content (vol-upload); not starting on a blank placeholder"
                ),
            ));
        }
        Ok(info)
    }

    /// Finds each disk's volume in the active pools of this node, and makes
    /// the cloud-init seed (`spec.cloudInit`) in the activation's run
    /// directory, attached read-only after them on the first free `vdX`.
    fn resolve_disks(&self, name: &str, uuid: &str, def: &Domain) -> Result<Vec<DiskFile>> {
        let mut out = self.volume_disks(name, def)?;
        if let Some(ci) = &def.spec.cloud_init {
            let seed = cloud_init::Seed::from_spec(ci, uuid, name)
                .map_err(|e| Error::invalid_argument(KIND, name, e))?;
            let image = seed
                .image()
                .map_err(|e| io_failed(name, "making the cloud-init seed", e))?;
            let dir = self.paths(uuid).dir;
            std::fs::create_dir_all(&dir)
                .map_err(|e| io_failed(name, "creating the run directory", e))?;
            let path = dir.join("cidata.img");
            std::fs::write(&path, image)
                .map_err(|e| io_failed(name, "writing the cloud-init seed", e))?;
            let taken: Vec<&str> = def
                .spec
                .devices
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            let free = (b'a'..=b'z')
                .map(|c| format!("vd{}", c as char))
                .find(|n| !taken.contains(&n.as_str()))
                .ok_or_else(|| {
                    Error::invalid_argument(
                        KIND,
                        name,
                        "spec.cloudInit: no free virtio disk name (vda to vdz) for the seed"
                            .to_string(),
                    )
                })?;
            out.push(DiskFile {
                name: free,
                path: path.display().to_string(),
                format: vireo_crds::VolFormat::Raw,
                read_only: true,
            });
        }
        Ok(out)
    }

    /// Finds each disk's volume in the active pools of this node.
    fn volume_disks(&self, name: &str, def: &Domain) -> Result<Vec<DiskFile>> {
        let mut out = Vec::new();
        for (i, disk) in def.spec.devices.disks.iter().enumerate() {
            let field = format!("spec.devices.disks[{i}].volume");
            let info = self.find_volume(name, &field, &disk.volume)?;
            self.check_backing_chain(name, &field, &info.path)?;
            out.push(DiskFile {
                name: disk.name.clone(),
                path: info.path,
                format: info.format,
                read_only: disk.read_only,
            });
        }
        Ok(out)
    }

    /// The definition the VM process is launched from: a kernel or initrd
    /// given as a volume (`spec.os.kernelVolume`, `initrdVolume`) becomes
    /// that raw volume's file.
    fn for_launch(&self, name: &str, live: &Domain) -> Result<Domain> {
        let mut def = live.clone();
        if let Some(os) = def.spec.os.as_mut() {
            for (field, volume, path) in [
                (
                    "spec.os.kernelVolume",
                    os.kernel_volume.take(),
                    &mut os.kernel,
                ),
                (
                    "spec.os.initrdVolume",
                    os.initrd_volume.take(),
                    &mut os.initrd,
                ),
            ] {
                let Some(volume) = volume else { continue };
                let info = self.find_volume(name, field, &volume)?;
                if info.format != vireo_crds::VolFormat::Raw {
                    return Err(Error::invalid_argument(
                        KIND,
                        name,
                        format!(
                            "{field}: volume '{volume}' is {}; a boot file must be raw",
                            info.format
                        ),
                    ));
                }
                *path = Some(info.path);
            }
        }
        Ok(def)
    }

    /// A qcow2 disk's backing files must themselves be volumes of an active
    /// pool here: a header naming any other file would hand the guest a
    /// host file.
    fn check_backing_chain(&self, name: &str, field: &str, path: &str) -> Result<()> {
        let mut at = PathBuf::from(path);
        for _ in 0..16 {
            let probe = crate::storage::dir::file::probe(&at).map_err(|e| {
                Error::invalid_argument(
                    KIND,
                    name,
                    format!("{field}: cannot read {}: {e}", at.display()),
                )
            })?;
            let Some(backing) = probe.backing else {
                return Ok(());
            };
            let next = crate::storage::dir::file::backing_path(
                at.parent().unwrap_or(Path::new("/")),
                &backing,
            );
            if self
                .storage
                .lookup_volume_by_path(&next.display().to_string())
                .is_err()
            {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!(
                        "{field}: the qcow2 image {} has the backing file '{backing}', which is not a volume of an active pool on this node; refused",
                        at.display()
                    ),
                ));
            }
            at = next;
        }
        Err(Error::invalid_argument(
            KIND,
            name,
            format!("{field}: the qcow2 backing chain of {path} is longer than 16"),
        ))
    }

    /// Makes a tap on its network's bridge for each interface, before the
    /// process starts (it opens the tap by name). All or none.
    fn plug_interfaces(&self, name: &str, def: &Domain) -> Result<()> {
        let uuid = def.spec.uuid.clone().unwrap_or_default();
        for (i, iface) in def.spec.devices.interfaces.iter().enumerate() {
            let field = format!("spec.devices.interfaces[{i}].network");
            let bridge = match self.network.network_info(&iface.network) {
                Ok(info) if info.active => info.bridge,
                Ok(_) => None,
                Err(Error::NotFound(_)) => None,
                Err(e) => {
                    unplug_interfaces(name, def);
                    return Err(e);
                }
            };
            let Some(bridge) = bridge else {
                unplug_interfaces(name, def);
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!(
                        "{field}: network '{}' is not active on this node",
                        iface.network
                    ),
                ));
            };
            let tap = crate::bridge::tap::tap_name(&uuid, i);
            if let Err(e) = crate::bridge::tap::create(&tap, &bridge, &iface.network) {
                unplug_interfaces(name, def);
                return Err(io_failed(
                    name,
                    &format!(
                        "{field}: tap {tap} on bridge {bridge} of network '{}'",
                        iface.network
                    ),
                    e,
                ));
            }
        }
        Ok(())
    }

    /// Starts an activation of `rec` running `live`.
    fn activate(&self, l: &Locked<'_>, rec: &mut Record, live: Domain) -> Result<DomainRef> {
        self.activate_from(l, rec, live, Start::Boot)
    }

    /// Starts an activation of `rec` running `live`: booted, or with
    /// the state saved in a file, or waiting for a live migration's.
    fn activate_from(
        &self,
        l: &Locked<'_>,
        rec: &mut Record,
        live: Domain,
        start: Start<'_>,
    ) -> Result<DomainRef> {
        let disks = self.resolve_disks(&rec.name, &rec.uuid, &live)?;
        let boot = self.for_launch(&rec.name, &live)?;
        let paths = self.paths(&rec.uuid);
        std::fs::create_dir_all(&paths.dir)
            .map_err(|e| io_failed(&rec.name, "creating the run directory", e))?;
        for p in [
            &paths.api,
            &paths.console_socket,
            &paths.pidfile,
            &paths.exit_file,
        ] {
            let _ = std::fs::remove_file(p);
        }
        let id = match &self.options.ids {
            Some(ids) => ids.next(),
            None => l.next_id(),
        }
        .map_err(|e| io_failed(&rec.name, "allocating an ID", e))?;
        let started = Instant::now();
        // Recorded before anything is made for it (see `Run::launching`):
        // an agent killed from here on leaves a launch the next one
        // finishes, never a guest nobody knows of.
        rec.run = Some(Run {
            id,
            pid: 0,
            launching: true,
            live: live.clone(),
            reason: match start {
                Start::Boot => DomainReason::Booted,
                Start::Saved(..) => DomainReason::Restored,
                Start::Migration => DomainReason::Migration,
            },
            fake_reboot: false,
            shutdown_since: None,
            started: process::now_secs(),
            pending_vcpus: None,
            migration: matches!(start, Start::Migration).then_some(MigrationRole::Target),
        });
        let launched = self.save(l, rec).and_then(|()| {
            self.plug_interfaces(&rec.name, &live)?;
            let (file, offset, paused) = match start {
                Start::Boot => {
                    return self.backend.launch(&boot, &paths, &disks).map_err(|e| {
                        unplug_interfaces(&rec.name, &live);
                        io_failed(&rec.name, "starting the VM process", e)
                    });
                }
                Start::Migration => {
                    return self
                        .backend
                        .launch_migration_target(&boot, &paths, &disks)
                        .map_err(|e| {
                            unplug_interfaces(&rec.name, &live);
                            io_failed(&rec.name, "starting the VM process for the migration", e)
                        });
                }
                Start::Saved(file, offset, paused) => (file, offset, paused),
            };
            let pid = self
                .backend
                .launch_incoming(&boot, &paths, &disks, file, offset, paused)
                .map_err(|e| {
                    unplug_interfaces(&rec.name, &live);
                    io_failed(&rec.name, "starting the VM process for the restore", e)
                })?;
            if let Err(e) = self.backend.load_state(&paths, file, offset, paused) {
                process::terminate(pid, &paths.api, Duration::from_secs(3));
                unplug_interfaces(&rec.name, &live);
                return Err(io_failed(
                    &rec.name,
                    &format!("restoring the state saved in {}", file.display()),
                    e,
                ));
            }
            Ok(pid)
        });
        let pid = match launched {
            Ok(pid) => pid,
            Err(e) => {
                // Nothing runs: the record is as it was.
                rec.run = None;
                let undone = if rec.definition.is_none() {
                    l.remove(&rec.name)
                } else {
                    l.put(rec)
                };
                if let Err(more) = undone {
                    tracing::warn!(domain = %rec.name, error = %more, "recording the failed start");
                }
                return Err(e);
            }
        };
        keep_beyond_pod(&rec.name, pid);
        tracing::info!(driver = self.backend.name(), domain = %rec.name, id, pid, elapsed_ms = started.elapsed().as_millis() as u64, "domain started");
        if let Some(r) = rec.run.as_mut() {
            r.pid = pid;
            r.launching = false;
        }
        self.save(l, rec)?;
        Ok(reference(rec))
    }

    /// Where a domain's managed save image lives: `ROOT/save/UUID.save`.
    fn managed_save_path(&self, uuid: &str) -> PathBuf {
        self.store.root().join("save").join(format!("{uuid}.save"))
    }

    /// Saves the running domain `rec` to `path` and ends its activation
    /// (shutoff, saved). On failure the file is removed and the guest runs
    /// on as it was.
    fn save_to(&self, l: &Locked<'_>, rec: &mut Record, path: &Path) -> Result<()> {
        let name = rec.name.clone();
        let Some(run) = rec.run.clone() else {
            return Err(not_running(&name));
        };
        if run.pid == 0 {
            return Err(Error::invalid_state(KIND, &name, "is still starting"));
        }
        let paths = self.paths(&rec.uuid);
        let live = self
            .backend
            .query(&paths)
            .map_err(|e| io_failed(&name, "asking the VM process its state", e))?;
        let paused = match live.state {
            LiveState::Running => false,
            LiveState::Paused => true,
            LiveState::GuestStopped | LiveState::GuestCrashed => {
                return Err(Error::invalid_state(
                    KIND,
                    &name,
                    "has stopped (its guest powered off or crashed): nothing to save",
                ));
            }
        };
        let header = crate::save::header(self.backend.name(), &name, &rec.uuid, &run.live, paused);
        let writer = crate::save::Writer::create(path, header).map_err(|e| e.into_error(&name))?;
        let undo = |e: Error| {
            let _ = std::fs::remove_file(path);
            if !paused && let Err(more) = self.backend.control(&paths, Control::Resume) {
                tracing::warn!(domain = %name, error = ?more, "resuming the guest after a failed save");
            }
            e
        };
        let started = Instant::now();
        self.backend
            .save_state(&paths, path)
            .map_err(|e| undo(io_failed(&name, "saving the guest state", e)))?;
        let header = writer.finish().map_err(|e| undo(e.into_error(&name)))?;
        tracing::info!(driver = self.backend.name(), domain = %name, file = %path.display(), bytes = header.state_size, elapsed_ms = started.elapsed().as_millis() as u64, "domain state saved");
        self.end(l, rec, DomainReason::Saved)
    }

    /// Restores the domain saved in `path` (checked before anything
    /// changes); `expect` names the domain it must be (a managed save).
    fn restore_from(&self, l: &Locked<'_>, path: &Path, expect: Option<&str>) -> Result<DomainRef> {
        let shown = path.display().to_string();
        let (header, offset) = crate::save::read(path).map_err(|e| e.into_error(&shown))?;
        let name = header.name.clone();
        if header.driver != self.backend.name() {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "{shown} was saved by the {} driver, not the {} driver",
                    header.driver,
                    self.backend.name()
                ),
            ));
        }
        if let Some(expected) = expect
            && expected != name
        {
            return Err(Error::invalid_argument(
                KIND,
                expected,
                format!("{shown} holds the state of domain '{name}'"),
            ));
        }
        let uuid = header.uuid.to_ascii_lowercase();
        let all = l
            .all()
            .map_err(|e| io_failed(&name, "listing domain records", e))?;
        if let Some(other) = all.iter().find(|r| r.uuid == uuid && r.name != name) {
            return Err(Error::already_exists(
                KIND,
                &other.name,
                format!(" with uuid {uuid}; the saved domain '{name}' cannot take it"),
            ));
        }
        let mut def = header.definition.clone();
        def.metadata.name = Some(name.clone());
        def.spec.uuid = Some(uuid.clone());
        let mut rec = self.record_for(l, &name, &def)?;
        if rec.uuid != uuid {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "{shown} holds the state of the domain with uuid {uuid}, not this one ({})",
                    rec.uuid
                ),
            ));
        }
        if rec.is_active() {
            return Err(Error::invalid_state(KIND, &name, "is already active"));
        }
        self.backend
            .check(&def)
            .map_err(|e| Error::invalid_argument(KIND, &name, e))?;
        let r = self.activate_from(l, &mut rec, def, Start::Saved(path, offset, header.paused))?;
        tracing::info!(driver = self.backend.name(), domain = %name, file = %shown, "domain restored");
        Ok(r)
    }

    /// The guest agent channel of a running, unpaused domain, and the lock
    /// that keeps its conversations apart.
    fn agent_channel(&self, name: &str) -> Result<(guest_agent::Channel, Arc<Mutex<()>>)> {
        let (uuid, channel) = self.with(name, |_, rec| {
            let Some(run) = &rec.run else {
                return Err(not_running(name));
            };
            if run.pid == 0 {
                return Err(Error::invalid_state(KIND, name, "is still starting"));
            }
            let paths = self.paths(&rec.uuid);
            if self
                .backend
                .query(&paths)
                .is_ok_and(|live| live.state == LiveState::Paused)
            {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is paused: its guest agent cannot answer",
                ));
            }
            let Some(channel) = self.backend.guest_agent(&paths) else {
                return Err(Error::Unsupported {
                    object: crate::error::ObjectName::new(KIND, name),
                    driver: self.backend.name(),
                    operation: "a guest agent",
                });
            };
            if self.backend.guest_agent_open(&paths) == Some(false) {
                return Err(Error::AgentUnresponsive {
                    object: crate::error::ObjectName::new(KIND, name),
                    message: format!(
                        "no agent has opened the guest's {} port",
                        guest_agent::PORT_NAME
                    ),
                });
            }
            Ok((format!("{}-{}", rec.uuid, run.id), channel))
        })?;
        let mut locks = self.agent_locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the locks of activations that ended (nobody holds them).
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        let lock = locks.entry(uuid).or_default().clone();
        Ok((channel, lock))
    }

    /// Runs a guest agent conversation on `name`.
    fn agent<T>(
        &self,
        name: &str,
        f: impl FnOnce(&guest_agent::Channel) -> std::result::Result<T, guest_agent::AgentError>,
    ) -> Result<T> {
        let (channel, lock) = self.agent_channel(name)?;
        let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
        f(&channel).map_err(|e| match e {
            guest_agent::AgentError::Command { .. } => Error::OperationFailed {
                object: crate::error::ObjectName::new(KIND, name),
                message: format!("guest agent: {e}"),
            },
            other => Error::AgentUnresponsive {
                object: crate::error::ObjectName::new(KIND, name),
                message: other.to_string(),
            },
        })
    }

    fn control(&self, rec: &Record, op: Control) -> Result<()> {
        let paths = self.paths(&rec.uuid);
        self.backend
            .control(&paths, op)
            .map_err(|e| control_error(&rec.name, &self.backend, e))
    }

    /// Resumes a paused guest (before a power button it must see): running
    /// (unpaused) until what follows ends the activation or reboots it.
    fn resume_if_paused(&self, rec: &mut Record) -> Result<()> {
        let paused = self
            .backend
            .query(&self.paths(&rec.uuid))
            .is_ok_and(|live| live.state == LiveState::Paused);
        if paused {
            tracing::info!(driver = self.backend.name(), domain = %rec.name, "resuming the paused guest to shut it down");
            self.control(rec, Control::Resume)?;
            if let Some(run) = rec.run.as_mut() {
                run.reason = DomainReason::Unpaused;
            }
        }
        Ok(())
    }

    /// [`control`](Self::control), for a process that may be ending as it
    /// is asked: a guest that powered off for a reboot (vireo-vmm exits and
    /// is launched again), or one that crashed. When the call fails and the
    /// process goes, the domain is refreshed (which relaunches it, or ends
    /// the activation) and a relaunched process is asked instead.
    fn control_live(&self, l: &Locked<'_>, rec: &mut Record, op: Control) -> Result<()> {
        let err = match self.control(rec, op) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let Some(pid) = rec.run.as_ref().map(|r| r.pid) else {
            return Err(err);
        };
        let paths = self.paths(&rec.uuid);
        let since = std::time::Instant::now();
        while process::alive(pid, &paths.api) {
            if since.elapsed() > Duration::from_secs(2) {
                return Err(err);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.refresh(l, rec)?;
        match rec.run.as_ref() {
            Some(r) if r.pid != pid => self.control(rec, op),
            Some(_) => Err(err),
            None => Err(not_running(&rec.name)),
        }
    }
}

/// Removes the taps of a domain's interfaces (those that are there).
fn unplug_interfaces(name: &str, def: &Domain) {
    let uuid = def.spec.uuid.clone().unwrap_or_default();
    for i in 0..def.spec.devices.interfaces.len() {
        let tap = crate::bridge::tap::tap_name(&uuid, i);
        if let Err(e) = crate::bridge::tap::remove(&tap) {
            tracing::warn!(domain = %name, tap = %tap, error = %e, "removing a tap failed");
        }
    }
}

fn control_error<B: Backend>(name: &str, backend: &B, e: ControlError) -> Error {
    match e {
        ControlError::Unsupported(operation) => Error::Unsupported {
            object: crate::error::ObjectName::new(KIND, name),
            driver: backend.name(),
            operation,
        },
        ControlError::Failed(message) | ControlError::NotYet(message) => {
            io_failed(name, "controlling the VM process", message)
        }
    }
}

fn reference(rec: &Record) -> DomainRef {
    DomainRef {
        name: rec.name.clone(),
        uuid: rec.uuid.clone(),
        id: rec.run.as_ref().map(|r| r.id),
    }
}

impl<B: Backend> HypervisorDriver for VmDriver<B> {
    fn name(&self) -> &'static str {
        self.inner.backend.name()
    }

    fn hypervisor_version(&self) -> String {
        self.inner.backend.version()
    }

    fn node_info(&self) -> Result<NodeInfo> {
        crate::host::probe_node_info()
            .map_err(|e| io_failed("", "reading the node's CPUs and memory", e))
    }

    fn hostname(&self) -> Result<String> {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .map_err(|e| io_failed("", "reading the host name", e))
    }

    fn list_domains(&self, filter: ListFilter) -> Result<Vec<DomainRef>> {
        let inner = &self.inner;
        inner.locked(|l| {
            let all = l
                .all()
                .map_err(|e| io_failed("", "listing domain records", e))?;
            let mut out = Vec::new();
            for mut rec in all {
                inner.refresh(l, &mut rec)?;
                if l.get(&rec.name).ok().flatten().is_none() {
                    continue;
                }
                if filter.accepts(rec.is_active()) {
                    out.push(reference(&rec));
                }
            }
            out.sort_by(|a, b| match (a.id, b.id) {
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => a.name.cmp(&b.name),
            });
            Ok(out)
        })
    }

    fn lookup_domain(&self, key: Lookup<'_>) -> Result<DomainRef> {
        let all = self.list_domains(ListFilter::All)?;
        let found = match key {
            Lookup::Name(n) => all.into_iter().find(|d| d.name == n),
            Lookup::Uuid(u) => {
                let u = u.to_string();
                all.into_iter().find(|d| d.uuid.eq_ignore_ascii_case(&u))
            }
            Lookup::Id(id) => all.into_iter().find(|d| d.id == Some(id)),
        };
        found.ok_or_else(|| Error::not_found(KIND, key.describe()))
    }

    fn domain_definition(&self, name: &str, inactive: bool) -> Result<Domain> {
        self.inner.with(name, |_, rec| {
            let def = if inactive {
                rec.definition.as_ref().or(rec.current())
            } else {
                rec.current()
            };
            def.cloned().ok_or_else(|| Error::not_found(KIND, name))
        })
    }

    fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        let inner = &self.inner;
        inner.with(name, |_, rec| {
            let def = rec.current().ok_or_else(|| Error::not_found(KIND, name))?;
            let (max, cur) = sizes(def);
            let Some(run) = &rec.run else {
                return Ok(DomainInfo {
                    state: DomainState::Shutoff,
                    reason: rec.last_reason,
                    max_memory: format_bytes(max),
                    memory: format_bytes(cur),
                    vcpus: def.spec.vcpus,
                    cpu_time_ns: 0,
                });
            };
            let paths = inner.paths(&rec.uuid);
            let live = inner.backend.query(&paths).ok();
            let (state, reason) = match live.map(|l| l.state) {
                Some(LiveState::Paused) if run.migration.is_some() => {
                    (DomainState::Paused, DomainReason::Migration)
                }
                Some(LiveState::Paused) => (DomainState::Paused, DomainReason::User),
                Some(LiveState::GuestStopped) => (DomainState::Shutdown, DomainReason::Unknown),
                Some(LiveState::GuestCrashed) => (DomainState::Crashed, DomainReason::Panicked),
                _ => (DomainState::Running, run.reason),
            };
            Ok(DomainInfo {
                state,
                reason,
                max_memory: format_bytes(max),
                memory: format_bytes(live.and_then(|l| l.memory).unwrap_or(cur)),
                vcpus: live.and_then(|l| l.vcpus).unwrap_or(def.spec.vcpus),
                cpu_time_ns: process::cpu_time_ns(run.pid).unwrap_or(0),
            })
        })
    }

    fn domain_is_persistent(&self, name: &str) -> Result<bool> {
        self.inner.with(name, |_, rec| Ok(rec.definition.is_some()))
    }

    fn domain_autostart(&self, name: &str) -> Result<bool> {
        self.inner.with(name, |_, rec| Ok(rec.autostart))
    }

    fn set_domain_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if rec.definition.is_none() {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: autostart needs a persistent domain",
                ));
            }
            rec.autostart = autostart;
            inner.save(l, rec)
        })
    }

    fn set_domain_memory(&self, name: &str, bytes: u64) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            let def = rec.current().ok_or_else(|| Error::not_found(KIND, name))?;
            let (max, _) = sizes(def);
            if bytes == 0 {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    "memory must be greater than zero",
                ));
            }
            if bytes > max {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!(
                        "cannot set memory to {} KiB, above the maximum of {} KiB",
                        bytes / 1024,
                        max / 1024
                    ),
                ));
            }
            if rec.run.is_some() {
                inner.control(rec, Control::SetMemory(bytes))?;
                if let Some(run) = rec.run.as_mut() {
                    run.live.spec.current_memory = Some(format_bytes(bytes));
                }
            } else if let Some(def) = rec.definition.as_mut() {
                def.spec.current_memory = Some(format_bytes(bytes));
            }
            inner.save(l, rec)
        })
    }

    fn set_domain_vcpus(&self, name: &str, vcpus: u32) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            let def = rec.current().ok_or_else(|| Error::not_found(KIND, name))?;
            let max = def.spec.max_vcpus.unwrap_or(def.spec.vcpus);
            if vcpus == 0 || vcpus > max {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!("requested vcpus {vcpus} is outside 1..={max} (spec.maxVcpus)"),
                ));
            }
            if let Some(run) = rec.run.as_mut() {
                let from = run.live.spec.vcpus;
                let paths = inner.paths(&rec.uuid);
                match inner
                    .backend
                    .control(&paths, Control::SetVcpus { from, to: vcpus })
                {
                    // Kept until the guest shows the new count (unplug
                    // needs the guest's cooperation).
                    Ok(()) => run.pending_vcpus = Some(vcpus),
                    Err(ControlError::NotYet(why)) => {
                        tracing::info!(domain = %name, vcpus, %why, "vCPU change waits for the guest");
                        run.pending_vcpus = Some(vcpus);
                    }
                    Err(e) => return Err(control_error(name, &inner.backend, e)),
                }
                run.live.spec.vcpus = vcpus;
            } else if let Some(def) = rec.definition.as_mut() {
                def.spec.vcpus = vcpus;
            }
            inner.save(l, rec)
        })
    }

    fn define_domain(&self, domain: &Domain) -> Result<DomainRef> {
        let inner = &self.inner;
        inner.locked(|l| {
            let (name, def) = inner.prepare(l, domain)?;
            let mut rec = inner.record_for(l, &name, &def)?;
            rec.definition = Some(def);
            inner.save(l, &rec)?;
            Ok(reference(&rec))
        })
    }

    fn create_domain(&self, domain: &Domain) -> Result<DomainRef> {
        let inner = &self.inner;
        inner.locked(|l| {
            let (name, def) = inner.prepare(l, domain)?;
            let mut rec = inner.record_for(l, &name, &def)?;
            if rec.is_active() {
                return Err(Error::invalid_state(KIND, &name, "is already active"));
            }
            inner.activate(l, &mut rec, def)
        })
    }

    fn undefine_domain(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if rec.definition.is_none() {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: there is no definition to undefine",
                ));
            }
            if rec.is_active() {
                rec.definition = None;
                rec.autostart = false;
                inner.save(l, rec)
            } else {
                let snapshots = inner.load_tree(name, &rec.uuid)?.snapshots.len();
                if snapshots > 0 {
                    return Err(crate::snapshot::undefine_refused(name, snapshots));
                }
                let paths = inner.paths(&rec.uuid);
                let _ = std::fs::remove_dir_all(&paths.dir);
                let _ = std::fs::remove_file(&paths.nvram);
                let _ = std::fs::remove_file(inner.managed_save_path(&rec.uuid));
                l.remove(name)
                    .map_err(|e| io_failed(name, "removing the domain record", e))
            }
        })
    }

    fn start_domain(&self, name: &str) -> Result<DomainRef> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if rec.is_active() {
                return Err(Error::invalid_state(KIND, name, "is already active"));
            }
            let def = rec
                .definition
                .clone()
                .ok_or_else(|| Error::not_found(KIND, name))?;
            let image = inner.managed_save_path(&rec.uuid);
            if inner.backend.saves_state() && image.exists() {
                let r = inner.restore_from(l, &image, Some(name)).map_err(|e| {
                    Error::invalid_state(
                        KIND,
                        name,
                        format!(
                            "cannot resume its managed save image ({e}); remove it with managedsave-remove to boot afresh"
                        ),
                    )
                })?;
                let _ = std::fs::remove_file(&image);
                return Ok(r);
            }
            inner.activate(l, rec, def)
        })
    }

    fn save_domain(&self, name: &str, path: &Path) -> Result<()> {
        let inner = &self.inner;
        if !inner.backend.saves_state() {
            return Err(Error::Unsupported {
                object: crate::error::ObjectName::new(KIND, name),
                driver: inner.backend.name(),
                operation: "saving a domain's state",
            });
        }
        let path = std::path::absolute(path)
            .map_err(|e| io_failed(name, &format!("{}", path.display()), e))?;
        inner.with(name, |l, rec| inner.save_to(l, rec, &path))
    }

    fn restore_domain(&self, path: &Path) -> Result<DomainRef> {
        let inner = &self.inner;
        let shown = path.display().to_string();
        if !inner.backend.saves_state() {
            return Err(Error::Unsupported {
                object: crate::error::ObjectName::new(KIND, &shown),
                driver: inner.backend.name(),
                operation: "restoring a saved domain",
            });
        }
        let path = std::path::absolute(path).map_err(|e| io_failed(&shown, &shown, e))?;
        inner.locked(|l| inner.restore_from(l, &path, None))
    }

    fn managed_save(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        if !inner.backend.saves_state() {
            return Err(Error::Unsupported {
                object: crate::error::ObjectName::new(KIND, name),
                driver: inner.backend.name(),
                operation: "managed save",
            });
        }
        inner.with(name, |l, rec| {
            if rec.definition.is_none() {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: cannot do managed save for a transient domain",
                ));
            }
            let image = inner.managed_save_path(&rec.uuid);
            if let Some(dir) = image.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| io_failed(name, "creating the managed save directory", e))?;
            }
            inner.save_to(l, rec, &image)
        })
    }

    fn snapshot_create(
        &self,
        name: &str,
        params: &crate::snapshot::SnapshotParams,
    ) -> Result<crate::snapshot::SnapshotInfo> {
        let inner = &self.inner;
        inner.snapshot_kind(name)?;
        inner.with(name, |l, rec| inner.snapshot_create(l, rec, params))
    }

    fn snapshot_list(&self, name: &str) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        let inner = &self.inner;
        inner.snapshot_kind(name)?;
        inner.with(name, |_, rec| {
            Ok(inner.load_tree(name, &rec.uuid)?.list(name))
        })
    }

    fn snapshot_get(&self, name: &str, snapshot: &str) -> Result<crate::snapshot::SnapshotInfo> {
        let inner = &self.inner;
        inner.snapshot_kind(name)?;
        inner.with(name, |_, rec| {
            inner.load_tree(name, &rec.uuid)?.info(name, snapshot)
        })
    }

    fn snapshot_current(&self, name: &str) -> Result<Option<crate::snapshot::SnapshotInfo>> {
        let inner = &self.inner;
        inner.snapshot_kind(name)?;
        inner.with(name, |_, rec| {
            Ok(inner.load_tree(name, &rec.uuid)?.current_info(name))
        })
    }

    fn snapshot_revert(
        &self,
        name: &str,
        snapshot: &str,
        to: crate::snapshot::RevertTo,
    ) -> Result<()> {
        let inner = &self.inner;
        inner.snapshot_kind(name)?;
        inner.with(name, |l, rec| inner.snapshot_revert(l, rec, snapshot, to))
    }

    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<()> {
        let inner = &self.inner;
        inner.snapshot_kind(name)?;
        inner.with(name, |_, rec| inner.snapshot_delete(rec, snapshot))
    }

    fn has_managed_save(&self, name: &str) -> Result<bool> {
        let inner = &self.inner;
        inner.with(name, |_, rec| {
            Ok(inner.managed_save_path(&rec.uuid).exists())
        })
    }

    fn managed_save_remove(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |_, rec| {
            match std::fs::remove_file(inner.managed_save_path(&rec.uuid)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_failed(name, "removing the managed save image", e)),
            }
        })
    }

    fn shutdown_domain(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if rec.run.is_none() {
                return Err(not_running(name));
            }
            // A paused guest cannot see the power button: it runs again
            // to shut down (libvirt's test driver ends a paused domain's
            // shutdown in shutoff too).
            inner.resume_if_paused(rec)?;
            let Some(run) = rec.run.as_mut() else {
                return Err(not_running(name));
            };
            run.shutdown_since.get_or_insert_with(process::now_secs);
            inner.save(l, rec)?;
            inner.due(name, "powerdown", Duration::ZERO);
            inner.control(rec, Control::Powerdown)
        })
    }

    fn reboot_domain(&self, name: &str) -> Result<()> {
        // As libvirt does for QEMU without a guest agent: ask the guest to
        // power off, and reset it when it does (or stop it if onReboot says
        // destroy). The activation and its ID stay.
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if rec.run.is_none() {
                return Err(not_running(name));
            }
            inner.resume_if_paused(rec)?;
            let Some(run) = rec.run.as_mut() else {
                return Err(not_running(name));
            };
            run.fake_reboot = true;
            run.shutdown_since.get_or_insert_with(process::now_secs);
            inner.save(l, rec)?;
            inner.due(name, "powerdown", Duration::ZERO);
            inner.control(rec, Control::Powerdown)
        })
    }

    fn reset_domain(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if !rec.is_active() {
                return Err(not_running(name));
            }
            // A reset keeps a paused domain paused, as libvirt's drivers do.
            let paused = inner
                .backend
                .query(&inner.paths(&rec.uuid))
                .is_ok_and(|live| live.state == LiveState::Paused);
            inner.control_live(l, rec, Control::Reset)?;
            if paused {
                inner.control(rec, Control::Pause)?;
            }
            Ok(())
        })
    }

    fn suspend_domain(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |_, rec| {
            if !rec.is_active() {
                return Err(not_running(name));
            }
            let live = inner
                .backend
                .query(&inner.paths(&rec.uuid))
                .map_err(|e| io_failed(name, "querying the VM process", e))?;
            if live.state == LiveState::Paused {
                return Err(Error::invalid_state(KIND, name, "is already paused"));
            }
            inner.control(rec, Control::Pause)
        })
    }

    fn resume_domain(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if !rec.is_active() {
                return Err(not_running(name));
            }
            let live = inner
                .backend
                .query(&inner.paths(&rec.uuid))
                .map_err(|e| io_failed(name, "querying the VM process", e))?;
            if live.state != LiveState::Paused {
                return Err(Error::invalid_state(KIND, name, "is not paused"));
            }
            if rec.run.as_ref().is_some_and(|r| r.migration.is_some()) {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is being migrated: the migration's finish (target) or confirm (source) resumes it",
                ));
            }
            inner.control(rec, Control::Resume)?;
            if let Some(run) = rec.run.as_mut() {
                run.reason = DomainReason::Unpaused;
            }
            inner.save(l, rec)
        })
    }

    fn guest_info(&self, name: &str) -> Result<vireo_crds::GuestInfo> {
        self.inner
            .agent(name, |ch| guest_agent::guest_info(ch, AGENT_TIMEOUT))
    }

    fn guest_fs_freeze(&self, name: &str, mountpoints: &[String]) -> Result<u64> {
        self.inner.agent(name, |ch| {
            guest_agent::fs_freeze(ch, AGENT_TIMEOUT, mountpoints)
        })
    }

    fn guest_fs_thaw(&self, name: &str) -> Result<u64> {
        self.inner
            .agent(name, |ch| guest_agent::fs_thaw(ch, AGENT_TIMEOUT))
    }

    fn guest_agent_shutdown(&self, name: &str, reboot: bool) -> Result<()> {
        // The agent powers the guest off; a reboot is a power-off the
        // driver turns into a reset, as `reboot` without an agent does, so
        // that a reboot ends the same way whichever asked.
        let inner = &self.inner;
        inner.agent(name, |ch| {
            guest_agent::shutdown(ch, AGENT_TIMEOUT, "powerdown")
        })?;
        inner.with(name, |l, rec| {
            let Some(run) = rec.run.as_mut() else {
                // Already off: the guest was quick.
                return Ok(());
            };
            if reboot {
                run.fake_reboot = true;
            }
            run.shutdown_since.get_or_insert_with(process::now_secs);
            inner.save(l, rec)
        })
    }

    fn boot_problem(&self, name: &str) -> Result<Option<String>> {
        let inner = &self.inner;
        // The record as stored: the caller has just read the state (which
        // refreshed it), so no second QMP round trip here.
        let log = inner.locked(|l| {
            let rec = l
                .get(name)
                .map_err(|e| io_failed(name, "reading the domain record", e))?
                .ok_or_else(|| Error::not_found(KIND, name))?;
            Ok(rec
                .run
                .as_ref()
                .filter(|run| {
                    run.live
                        .spec
                        .os
                        .as_ref()
                        .is_some_and(|os| os.firmware.is_some())
                })
                .map(|_| inner.paths(&rec.uuid).console_log))
        })?;
        // Read outside the store's lock: the log can be large.
        Ok(log.and_then(|log| boot::boot_problem(&boot::console_tail(&log))))
    }

    fn domain_vcpu_info(&self, name: &str) -> Result<Vec<crate::VcpuInfo>> {
        let inner = &self.inner;
        let (pid, threads, vcpus) = inner.with(name, |_, rec| {
            let vcpus = match (&rec.run, &rec.definition) {
                (Some(r), _) => r.live.spec.vcpus,
                (None, Some(d)) => d.spec.vcpus,
                (None, None) => 0,
            };
            match &rec.run {
                Some(run) => Ok((
                    run.pid,
                    inner.backend.vcpu_threads(&inner.paths(&rec.uuid)),
                    vcpus,
                )),
                None => Ok((0, None, vcpus)),
            }
        })?;
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let all = "y".repeat(host_cpus);
        let threads = match threads {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                return Err(Error::OperationFailed {
                    object: crate::error::ObjectName::new(KIND, name),
                    message: format!("reading the vCPU threads: {e}"),
                });
            }
            // Inactive, or a backend that does not say: what virsh prints
            // for an inactive domain.
            None => {
                return Ok((0..vcpus)
                    .map(|number| crate::VcpuInfo {
                        number,
                        cpu: None,
                        state: None,
                        cpu_time_ns: None,
                        affinity: all.clone(),
                    })
                    .collect());
            }
        };
        Ok(threads
            .iter()
            .enumerate()
            .map(|(i, tid)| {
                let t = process::thread_cpu(pid, *tid);
                crate::VcpuInfo {
                    number: u32::try_from(i).unwrap_or(u32::MAX),
                    cpu: t.as_ref().map(|t| t.last_cpu),
                    state: Some("running".to_string()),
                    cpu_time_ns: t.as_ref().map(|t| t.cpu_time_ns),
                    affinity: t
                        .map(|t| {
                            (0..host_cpus)
                                .map(|c| if t.allowed.contains(&c) { 'y' } else { '-' })
                                .collect()
                        })
                        .unwrap_or_else(|| all.clone()),
                }
            })
            .collect())
    }

    fn domain_block_stats(&self, name: &str, disk: &str) -> Result<Vec<(String, i64)>> {
        let inner = &self.inner;
        inner.with(name, |_, rec| {
            let Some(run) = &rec.run else {
                return Err(not_running(name));
            };
            let Some(target) = run
                .live
                .spec
                .devices
                .disks
                .iter()
                .find(|d| d.name == disk || d.volume == disk)
                .map(|d| d.name.clone())
            else {
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!("invalid path {disk} not assigned to domain"),
                ));
            };
            match inner.backend.block_stats(&inner.paths(&rec.uuid), &target) {
                None => Err(Error::Unsupported {
                    object: crate::error::ObjectName::new(KIND, name),
                    driver: inner.backend.name(),
                    operation: "block statistics",
                }),
                Some(Ok(stats)) => Ok(stats),
                Some(Err(e)) => Err(Error::OperationFailed {
                    object: crate::error::ObjectName::new(KIND, name),
                    message: format!("reading the block statistics of {target}: {e}"),
                }),
            }
        })
    }

    fn console_path(&self, name: &str) -> Result<PathBuf> {
        let inner = &self.inner;
        inner.with(name, |_, rec| {
            let Some(run) = &rec.run else {
                return Err(not_running(name));
            };
            if run
                .live
                .spec
                .devices
                .serial
                .as_ref()
                .is_some_and(|s| !s.enabled)
            {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "has no serial console (spec.devices.serial.enabled is false)",
                ));
            }
            Ok(inner.paths(&rec.uuid).console_socket)
        })
    }

    fn destroy_domain(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |l, rec| {
            if !rec.is_active() {
                return Err(not_running(name));
            }
            inner.end(l, rec, DomainReason::Destroyed)
        })
    }

    fn migrate_prepare(
        &self,
        domain: &Domain,
        params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationIncoming> {
        let inner = &self.inner;
        let shown = domain.metadata.name.clone().unwrap_or_default();
        inner.migration_supported(&shown)?;
        let address = target_address(&shown, params)?;
        inner.locked(|l| {
            let (name, def) = inner.prepare(l, domain)?;
            let mut rec = inner.record_for(l, &name, &def)?;
            if rec.is_active() {
                return Err(Error::invalid_state(
                    KIND,
                    &name,
                    "is already active on this node: it cannot be a migration's target",
                ));
            }
            let exports = if params.copy_storage {
                copied_disks(&def)
            } else {
                Vec::new()
            };
            inner.activate_from(l, &mut rec, def, Start::Migration)?;
            let paths = inner.paths(&rec.uuid);
            match inner.backend.migration_listen(&paths, address, &exports) {
                Ok(incoming) => {
                    tracing::info!(driver = inner.backend.name(), domain = %name, uri = %incoming.uri, disks = incoming.disks.len(), "migration prepared: waiting for the source");
                    Ok(incoming)
                }
                Err(e) => {
                    if let Err(more) = inner.end(l, &mut rec, DomainReason::Failed) {
                        tracing::warn!(domain = %name, error = %more, "stopping the migration target after a failed prepare");
                    }
                    Err(io_failed(&name, "listening for the migration", e))
                }
            }
        })
    }

    fn migrate_perform(
        &self,
        name: &str,
        incoming: &crate::migration::MigrationIncoming,
        params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationStats> {
        let inner = &self.inner;
        inner.migration_supported(name)?;
        target_address(name, params)?;
        // Marked under the lock, sent without it: a migration takes long,
        // and the domain's state must stay readable meanwhile.
        let (paths, copies, was_running) = inner.with(name, |l, rec| {
            let Some(run) = rec.run.as_mut() else {
                return Err(not_running(name));
            };
            if run.pid == 0 {
                return Err(Error::invalid_state(KIND, name, "is still starting"));
            }
            if run.migration.is_some() {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is already part of a migration",
                ));
            }
            let paths = inner.paths(&rec.uuid);
            let live = inner
                .backend
                .query(&paths)
                .map_err(|e| io_failed(name, "asking the VM process its state", e))?;
            let was_running = match live.state {
                LiveState::Running => true,
                LiveState::Paused => false,
                LiveState::GuestStopped | LiveState::GuestCrashed => {
                    return Err(Error::invalid_state(
                        KIND,
                        name,
                        "has stopped (its guest powered off or crashed): nothing to migrate",
                    ));
                }
            };
            let copies = if params.copy_storage {
                copied_disks(&run.live)
            } else {
                Vec::new()
            };
            // An abort asked of an earlier job is not this one's; one asked
            // from the moment the role is saved is (abort_job needs it).
            let _ = std::fs::remove_file(&paths.abort_job);
            run.migration = Some(MigrationRole::Source { was_running });
            inner.save(l, rec)?;
            Ok((paths, copies, was_running))
        })?;
        tracing::info!(driver = inner.backend.name(), domain = %name, uri = %incoming.uri, disks = copies.len(), "migration: sending");
        let aborted = || paths.abort_job.exists();
        let sent = inner
            .backend
            .migration_send(&paths, incoming, params, &copies, &aborted);
        let _ = std::fs::remove_file(&paths.abort_job);
        match sent {
            Ok(stats) => {
                tracing::info!(driver = inner.backend.name(), domain = %name, total_ms = stats.total_ms, downtime_ms = stats.downtime_ms, memory_bytes = stats.memory_bytes, disk_bytes = stats.disk_bytes, "migration: everything sent, source paused");
                Ok(stats)
            }
            Err(e) => {
                tracing::warn!(driver = inner.backend.name(), domain = %name, error = %e, "migration failed: the guest stays here");
                // As it was: running if it ran, no longer migrating.
                let undone = inner.with(name, |l, rec| inner.undo_source(l, rec, was_running));
                if let Err(more) = undone {
                    tracing::warn!(domain = %name, error = %more, "resuming the source after a failed migration");
                }
                Err(io_failed(name, "migrating", e))
            }
        }
    }

    fn migrate_finish(&self, name: &str, succeeded: bool) -> Result<Option<DomainRef>> {
        let inner = &self.inner;
        inner.migration_supported(name)?;
        inner.locked(|l| {
            let Some(mut rec) = l
                .get(name)
                .map_err(|e| io_failed(name, "reading the domain record", e))?
            else {
                // A target whose process died is gone already (transient).
                if succeeded {
                    return Err(Error::not_found(KIND, name));
                }
                return Ok(None);
            };
            inner.refresh(l, &mut rec)?;
            let Some(mut rec) = l
                .get(name)
                .map_err(|e| io_failed(name, "reading the domain record", e))?
            else {
                if succeeded {
                    return Err(io_failed(
                        name,
                        "finishing the migration",
                        "the target's VM process is gone",
                    ));
                }
                return Ok(None);
            };
            let incoming = rec
                .run
                .as_ref()
                .is_some_and(|r| r.migration == Some(MigrationRole::Target));
            if !incoming {
                if !succeeded && !rec.is_active() {
                    // Prepare's activation ended already; a definition that
                    // was here before stays.
                    return Ok(None);
                }
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is not waiting for an incoming migration on this node",
                ));
            }
            if !succeeded {
                tracing::info!(driver = inner.backend.name(), domain = %name, "migration failed: the target's copy is thrown away");
                inner.end(l, &mut rec, DomainReason::Failed)?;
                return Ok(None);
            }
            let paths = inner.paths(&rec.uuid);
            if let Err(e) = inner.backend.migration_resume_target(&paths) {
                // Nothing may run here unless it is whole: the source
                // keeps the guest (its confirm resumes it).
                if let Err(more) = inner.end(l, &mut rec, DomainReason::Failed) {
                    tracing::warn!(domain = %name, error = %more, "stopping the migration target after a failed finish");
                }
                return Err(io_failed(name, "resuming the migrated guest", e));
            }
            if let Some(run) = rec.run.as_mut() {
                run.migration = None;
                run.reason = DomainReason::Migrated;
                if rec.definition.is_none() {
                    rec.definition = Some(run.live.clone());
                }
            }
            inner.save(l, &rec)?;
            tracing::info!(driver = inner.backend.name(), domain = %name, "migration finished: the guest runs on this node");
            Ok(Some(reference(&rec)))
        })
    }

    /// Asks a migration's send in progress to stop (the abort file in the
    /// run directory, which perform polls): it cancels QEMU's migration
    /// and disk copies and resumes the guest here.
    fn abort_job(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        inner.with(name, |_l, rec| {
            let sending = rec
                .run
                .as_ref()
                .is_some_and(|r| matches!(r.migration, Some(MigrationRole::Source { .. })));
            if !sending {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "has no job running (only a migration being sent can be aborted)",
                ));
            }
            let paths = inner.paths(&rec.uuid);
            std::fs::write(&paths.abort_job, b"")
                .map_err(|e| io_failed(name, "asking the migration to stop", e))?;
            tracing::info!(domain = %name, "migration abort asked");
            Ok(())
        })
    }

    fn migrate_confirm(&self, name: &str, succeeded: bool) -> Result<()> {
        let inner = &self.inner;
        inner.migration_supported(name)?;
        inner.with(name, |l, rec| {
            let role = rec.run.as_ref().and_then(|r| r.migration);
            let was_running = match role {
                Some(MigrationRole::Source { was_running }) => was_running,
                Some(MigrationRole::Target) => {
                    return Err(Error::invalid_state(
                        KIND,
                        name,
                        "is a migration's target on this node, not its source",
                    ));
                }
                None if !succeeded => {
                    // Perform's failure already put it back as it was.
                    return Ok(());
                }
                None if rec.is_active() => {
                    return Err(Error::invalid_state(
                        KIND,
                        name,
                        "has sent no migration from this node: it keeps running",
                    ));
                }
                // The source process ended after sending: only the
                // definition is left to go.
                None => false,
            };
            if !succeeded {
                return inner.undo_source(l, rec, was_running);
            }
            if rec.is_active() {
                let live = inner
                    .backend
                    .query(&inner.paths(&rec.uuid))
                    .map_err(|e| io_failed(name, "asking the VM process its state", e))?;
                if live.state == LiveState::Running {
                    return Err(Error::invalid_state(
                        KIND,
                        name,
                        "runs here: the migration did not end with the source paused",
                    ));
                }
                inner.end(l, rec, DomainReason::Migrated)?;
            }
            if rec.definition.is_some() && l.get(name).ok().flatten().is_some() {
                // The guest lives on the target now. The volumes stay:
                // they belong to the storage pools, not to the domain.
                let paths = inner.paths(&rec.uuid);
                let _ = std::fs::remove_dir_all(&paths.dir);
                let _ = std::fs::remove_file(&paths.nvram);
                let _ = std::fs::remove_file(inner.managed_save_path(&rec.uuid));
                l.remove(name)
                    .map_err(|e| io_failed(name, "removing the domain record", e))?;
            }
            tracing::info!(driver = inner.backend.name(), domain = %name, "migration confirmed: the source's copy is stopped and undefined");
            Ok(())
        })
    }
}

/// The disks a migration with `copy_storage` copies: the domain's
/// writable disks (not CD-ROMs), by index among its disks and by name. A
/// read-only disk must already be on the target with the same content.
fn copied_disks(def: &Domain) -> Vec<(usize, String)> {
    def.spec
        .devices
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.read_only && d.device != vireo_crds::DiskDevice::Cdrom)
        .map(|(i, d)| (i, d.name.clone()))
        .collect()
}

/// `params.targetAddress` as an IP address.
fn target_address(
    name: &str,
    params: &crate::migration::MigrationParams,
) -> Result<std::net::IpAddr> {
    params.target_address.parse().map_err(|_| {
        Error::invalid_argument(
            KIND,
            name,
            format!(
                "targetAddress: '{}' is not an IP address",
                params.target_address
            ),
        )
    })
}

impl<B: Backend> Inner<B> {
    fn migration_supported(&self, name: &str) -> Result<()> {
        if self.backend.migrates() {
            Ok(())
        } else {
            Err(Error::Unsupported {
                object: crate::error::ObjectName::new(KIND, name),
                driver: self.backend.name(),
                operation: "live migration",
            })
        }
    }

    /// Puts a migration's source back as it was before perform: resumed if
    /// it ran (and is paused now), no longer migrating.
    fn undo_source(&self, l: &Locked<'_>, rec: &mut Record, was_running: bool) -> Result<()> {
        if rec.run.is_none() {
            return Ok(());
        }
        let paused = self
            .backend
            .query(&self.paths(&rec.uuid))
            .is_ok_and(|live| live.state == LiveState::Paused);
        if was_running && paused {
            self.control(rec, Control::Resume)?;
            tracing::info!(driver = self.backend.name(), domain = %rec.name, "migration failed: the source runs again");
        }
        if let Some(run) = rec.run.as_mut() {
            run.migration = None;
        }
        self.save(l, rec)
    }
}

/// Where a driver URI's state lives: `scheme:///system` → `system_root`,
/// `scheme:///embed?root=DIR` → DIR (libvirt's embedded driver URI).
pub fn root_from_uri(
    path_and_query: &str,
    system_root: &Path,
) -> std::result::Result<(PathBuf, HashMap<String, String>), String> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let params: HashMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    match path {
        "/system" => Ok((system_root.to_path_buf(), params)),
        "/embed" => params
            .get("root")
            .filter(|r| r.starts_with('/'))
            .map(|r| (PathBuf::from(r), params.clone()))
            .ok_or_else(|| "embed needs ?root=/absolute/dir".to_string()),
        other => Err(format!(
            "unknown path '{other}' (use /system, or /embed?root=/absolute/dir)"
        )),
    }
}

/// Where `qemu:///system` and `kvm:///system` take kernels and initrds from
/// (besides pool volumes), as the agent does by default.
pub const SYSTEM_BOOT_DIR: &str = "/var/lib/vireo/boot";

/// Opens a process-backed driver on the root a URI names
/// (`/system` or `/embed?root=DIR`, with `&shutdown_timeout=SECONDS`, default
/// 300, `&ids=FILE` for a node's shared domain IDs, and `&boot_dirs=DIR:DIR`
/// for where kernels may come from), paired with the
/// given network and storage drivers.
pub fn open_connection<B: Backend>(
    backend: B,
    uri: &str,
    path_and_query: &str,
    system_root: &Path,
    network: Arc<dyn crate::NetworkDriver>,
    storage: Arc<dyn StorageDriver>,
) -> std::result::Result<crate::Connection, String> {
    let (root, params) = root_from_uri(path_and_query, system_root)?;
    let shutdown_timeout = match params.get("shutdown_timeout") {
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| format!("shutdown_timeout={s}: not a number of seconds"))?,
        None => 300,
    };
    let driver = VmDriver::open(
        backend,
        Options {
            root,
            shutdown_timeout: Duration::from_secs(shutdown_timeout),
            poll: Duration::from_millis(500),
            ids: params
                .get("ids")
                .map(|p| crate::ids::DomainIds::new(Path::new(p))),
            boot_dirs: match params.get("boot_dirs") {
                Some(dirs) => Some(
                    dirs.split(':')
                        .filter(|d| !d.is_empty())
                        .map(PathBuf::from)
                        .collect(),
                ),
                None if path_and_query.starts_with("/system") => {
                    Some(vec![PathBuf::from(SYSTEM_BOOT_DIR)])
                }
                None => None,
            },
        },
        network.clone(),
        storage.clone(),
    )
    .map_err(|e| e.to_string())?;
    Ok(crate::Connection::new(
        uri,
        Arc::new(driver),
        network,
        storage,
    ))
}

/// Opens a process-backed driver with the dir storage backend (pool records
/// under ROOT/storage) and the test driver's bookkeeping for networks under
/// ROOT/objects.
pub fn open_standalone<B: Backend>(
    backend: B,
    uri: &str,
    path_and_query: &str,
    system_root: &Path,
) -> std::result::Result<crate::Connection, String> {
    let (root, _) = root_from_uri(path_and_query, system_root)?;
    let objects = Arc::new(crate::test::TestDriver::from_dir(&root.join("objects"))?);
    let storage = Arc::new(crate::storage::dir::DirStorage::open(
        &root.join("storage"),
        Path::new("/"),
    )?);
    open_connection(backend, uri, path_and_query, system_root, objects, storage)
}
