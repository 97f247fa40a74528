//! The `kvm` driver: one `vireo-vmm` process per running Domain (our
//! micro-VMM on /dev/kvm, see docs/vmm.md), controlled over its per-VM API
//! socket (JSON lines).
//!
//! * `kvm:///system` keeps its state under `/var/lib/vireo/kvm`;
//!   `kvm:///embed?root=/DIR` under DIR, like the qemu driver.
//! * vireo-vmm runs in its own session, so it outlives the driver and the
//!   agent; a driver opened again on the same root re-adopts it
//!   ([`crate::vm`] keeps the records).
//! * vireo-vmm exits when the guest powers off (or reboots with
//!   `lifecycle.onReboot: destroy`) and says why in its exit file; the
//!   driver maps that to shutoff (shutdown), or starts it again for a
//!   `restart` lifecycle action. A VMM gone without an exit file crashed.
//! * Graceful shutdown is Ctrl-Alt-Del through the i8042; the driver
//!   destroys the guest when it does not comply in time.
//! * Disks are raw files (virtio-blk); qcow2 needs the qemu driver.
//! * Every domain gets virtio-rng and a virtio-balloon (`setmem` while it
//!   runs, and `currentMemory` below `memory` from boot on); `setvcpus`
//!   while it runs goes through ACPI CPU hot-plug: down to 1, and back up
//!   to the count it booted with (not beyond, unlike q35 under QEMU).
//! * Every domain gets a virtio-vsock device, guest CID [`VSOCK_GUEST_CID`],
//!   proxied to the Unix socket [`vsock_socket`] in its run directory
//!   (`CONNECT <port>\n` reaches guest port `<port>`; see docs/vmm.md).
//! * Live migration is stop-and-copy of vireo-vmm's snapshot over TCP,
//!   node-local raw disks on the same stream ([`migration`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vireo_crds::quantity::parse_quantity;
use vireo_crds::{Domain, DomainReason, DomainType, LifecycleAction, VolFormat};

mod migration;

use crate::bridge::tap::tap_name;
use crate::vm::{self, Backend, Control, ControlError, DiskFile, Live, LiveState, RunPaths};

/// Where `kvm:///system` keeps its state.
pub const SYSTEM_ROOT: &str = "/var/lib/vireo/kvm";

/// The vireo-vmm backend of [`vm::VmDriver`].
pub struct Vmm {
    binary: PathBuf,
}

/// The kvm hypervisor driver.
pub type KvmDriver = vm::VmDriver<Vmm>;

const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest CID of every Domain's vsock device. Each VM's host side is its
/// own Unix socket, not the host's vsock namespace, so CIDs need not differ
/// between VMs.
pub const VSOCK_GUEST_CID: u64 = 3;

/// The Unix socket of a Domain's vsock device (in its run directory): a
/// host process connects, writes `CONNECT <port>\n`, reads
/// `OK <host-side port>\n`, and then talks to the guest's port `<port>`.
/// Guest connections to host port P go to this path with `_P` appended.
/// It is [`RunPaths::vsock`], which `vm::guest_agent::Channel::VsockProxy`
/// takes as its `uds`.
pub fn vsock_socket(paths: &RunPaths) -> PathBuf {
    paths.vsock.clone()
}

/// [`vsock_socket`] of the Domain `name` on `driver` (its current or next
/// activation).
pub fn domain_vsock_socket(driver: &KvmDriver, name: &str) -> crate::Result<PathBuf> {
    Ok(vsock_socket(&driver.run_paths(name)?))
}

/// Finds `vireo-vmm`: `$VIREO_VMM`, next to the running program (a build
/// directory or an install prefix), or on PATH.
pub fn find_vmm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIREO_VMM") {
        return Some(PathBuf::from(p));
    }
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        // Test binaries live in target/<profile>/deps.
        [dir.join("vireo-vmm"), dir.join("../vireo-vmm")]
            .into_iter()
            .find(|p| p.is_file())
    });
    beside.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("vireo-vmm"))
                .find(|p| p.is_file())
        })
    })
}

impl Vmm {
    pub fn new() -> Result<Self, String> {
        let binary = find_vmm()
            .ok_or("vireo-vmm not found (set VIREO_VMM, or install it beside vireo-agent)")?;
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return Err("/dev/kvm cannot be opened".into());
        }
        Ok(Self { binary })
    }

    /// One request on the API socket, and its answer.
    fn call(&self, paths: &RunPaths, request: Value) -> Result<Value, String> {
        let shown = paths.api.display();
        let stream = UnixStream::connect(&paths.api).map_err(|e| format!("{shown}: {e}"))?;
        stream
            .set_read_timeout(Some(API_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(API_TIMEOUT)))
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut writer = stream.try_clone().map_err(|e| format!("{shown}: {e}"))?;
        writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| format!("{shown}: {e}"))?;
        let answer: Value =
            serde_json::from_str(&line).map_err(|e| format!("{shown}: not JSON ({e}): {line}"))?;
        if answer.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(answer)
        } else {
            Err(answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("refused")
                .to_string())
        }
    }

    fn command(&self, paths: &RunPaths, command: &str) -> Result<(), ControlError> {
        self.call(paths, json!({ "command": command }))
            .map(drop)
            .map_err(ControlError::Failed)
    }
}

/// How vireo-vmm starts.
#[derive(Debug, Clone, Copy)]
enum VmmStart<'a> {
    Boot,
    /// From the snapshot at this offset in the file, paused.
    Restore(&'a Path, u64),
    /// Waiting for a live migration's stream (`--incoming`).
    Incoming,
}

/// The launch's disks in `--disk` order (name, path, read-only), written
/// at each launch: a migration finds the files of the disks it copies here.
fn disks_file(paths: &RunPaths) -> PathBuf {
    paths.dir.join("disks.json")
}

/// The `--disk` index and path of the launch's disk `name`.
fn launched_disk(paths: &RunPaths, name: &str) -> Result<(usize, PathBuf), String> {
    let file = disks_file(paths);
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let list: Vec<Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    list.iter()
        .enumerate()
        .find(|(_, d)| d.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|(i, d)| Some((i, PathBuf::from(d.get("path")?.as_str()?))))
        .ok_or_else(|| {
            format!(
                "disk {name} is not among the VM's disks ({})",
                file.display()
            )
        })
}

/// Where a migration target's vireo-vmm receives the snapshot (its run
/// directory, which the jail keeps).
fn incoming_file(paths: &RunPaths) -> PathBuf {
    paths.dir.join("incoming.snap")
}

impl Vmm {
    /// Starts vireo-vmm for `def`: booting, from a snapshot (file, offset)
    /// and paused, or waiting for an incoming migration.
    fn launch_vmm(
        &self,
        def: &Domain,
        paths: &RunPaths,
        disks: &[DiskFile],
        start: VmmStart<'_>,
    ) -> Result<u32, String> {
        let restore = match start {
            VmmStart::Restore(file, offset) => Some((file, offset)),
            _ => None,
        };
        let spec = &def.spec;
        let os = spec.os.as_ref().ok_or("spec.os.kernel is required")?;
        let kernel = os.kernel.as_deref().ok_or("spec.os.kernel is required")?;
        let uuid = spec.uuid.clone().unwrap_or_default();
        let memory = parse_quantity(&spec.memory).map_err(|e| format!("spec.memory: {e}"))?;
        let memory_mib = memory.div_ceil(1 << 20).max(1);
        let current = match &spec.current_memory {
            Some(q) => parse_quantity(q).map_err(|e| format!("spec.currentMemory: {e}"))?,
            None => memory,
        };
        let current_mib = (current >> 20).clamp(1, memory_mib);
        let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), kernel.into()];
        if let Some(initrd) = os.initrd.as_deref() {
            args.extend(["--initrd".into(), initrd.into()]);
        }
        args.extend([
            "--cmdline".into(),
            os.cmdline.clone().unwrap_or_default(),
            "--memory-mib".into(),
            memory_mib.to_string(),
            // The guest boots with spec.vcpus; setvcpus unplugs some and
            // plugs them back, up to this count (the MADT lists every vCPU
            // as present from boot, so more cannot be added later). A
            // restore builds the vCPUs the snapshot has: the live
            // definition counts only those still plugged in.
            "--vcpus".into(),
            restore
                .and_then(|(file, offset)| snapshot_vcpus(file, offset))
                .unwrap_or(spec.vcpus)
                .to_string(),
            "--rng".into(),
            "--balloon".into(),
            "--current-memory-mib".into(),
            current_mib.to_string(),
            "--api-socket".into(),
            paths.api.display().to_string(),
            "--console-log".into(),
            paths.console_log.display().to_string(),
            "--console-socket".into(),
            paths.console_socket.display().to_string(),
            "--vsock".into(),
            format!(
                "cid={VSOCK_GUEST_CID},uds={}",
                vsock_socket(paths).display()
            ),
            "--exit-file".into(),
            paths.exit_file.display().to_string(),
            "--on-reboot".into(),
            match spec.lifecycle.on_reboot {
                LifecycleAction::Restart => "restart",
                _ => "destroy",
            }
            .into(),
            // The driver applies its own shutdown timeout.
            "--shutdown-timeout-seconds".into(),
            "86400".into(),
        ]);
        if let Some((file, offset)) = restore {
            args.extend([
                "--restore".into(),
                file.display().to_string(),
                "--restore-offset".into(),
                offset.to_string(),
                "--paused".into(),
            ]);
        }
        if let VmmStart::Incoming = start {
            args.extend([
                "--incoming".into(),
                incoming_file(paths).display().to_string(),
            ]);
        }
        args.extend(confinement_args());
        // Which file is which --disk, for a migration's disk copies.
        let listed: Vec<Value> = disks
            .iter()
            .map(|d| json!({ "name": d.name, "path": d.path, "readOnly": d.read_only }))
            .collect();
        std::fs::write(disks_file(paths), Value::Array(listed).to_string())
            .map_err(|e| format!("{}: {e}", disks_file(paths).display()))?;
        for disk in disks {
            if disk.format != VolFormat::Raw {
                return Err(format!(
                    "disk {}: the kvm driver attaches raw volumes only ({} needs the qemu driver)",
                    disk.name, disk.format
                ));
            }
            let ro = if disk.read_only { ",readonly" } else { "" };
            args.extend(["--disk".into(), format!("{}{ro}", disk.path)]);
        }
        for (i, iface) in spec.devices.interfaces.iter().enumerate() {
            let mac = crate::bridge::tap::interface_mac(iface, &uuid, i);
            args.extend(["--net".into(), format!("{},mac={mac}", tap_name(&uuid, i))]);
        }
        let log = std::fs::File::create(&paths.log)
            .map_err(|e| format!("{}: {e}", paths.log.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", paths.log.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: setsid() is async-signal-safe; between fork and exec it
        // only detaches the child from our session, so that it outlives us.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        let pid = child.id();
        // Reap it if it ends while this process lives (no zombies); when
        // this process ends first, init adopts it.
        let waiter = Arc::new(std::sync::Mutex::new(None));
        let status_slot = waiter.clone();
        std::thread::Builder::new()
            .name(format!("vmm-{pid}"))
            .spawn(move || {
                let status = child.wait().ok();
                if let Ok(mut s) = status_slot.lock() {
                    *s = status;
                }
            })
            .map_err(|e| format!("a thread to wait for vireo-vmm: {e}"))?;
        // Ready once the API answers.
        let start = Instant::now();
        loop {
            if self.call(paths, json!({ "command": "info" })).is_ok() {
                std::fs::write(&paths.pidfile, pid.to_string())
                    .map_err(|e| format!("{}: {e}", paths.pidfile.display()))?;
                return Ok(pid);
            }
            let exited = waiter.lock().map(|s| *s).unwrap_or(None);
            if let Some(status) = exited {
                // The exit file says why in one line; the log is the fallback.
                let detail = std::fs::read_to_string(&paths.exit_file)
                    .ok()
                    .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                    .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
                    .filter(|d| !d.is_empty());
                let why = match detail {
                    Some(d) => d,
                    None => std::fs::read_to_string(&paths.log)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                return Err(format!("vireo-vmm exited ({status}): {why}"));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err("vireo-vmm did not open its API socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Backend for Vmm {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn domain_type(&self) -> DomainType {
        DomainType::Kvm
    }

    fn version(&self) -> String {
        Command::new(&self.binary)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .last()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown".into())
    }

    fn check(&self, def: &Domain) -> Result<(), String> {
        refuse_firmware_boot(def)?;
        let os = def.spec.os.as_ref().ok_or(
            "spec.os.kernel: the kvm driver boots a kernel directly; set spec.os.kernel or spec.os.kernelVolume",
        )?;
        if os.kernel.as_deref().is_none_or(str::is_empty) && os.kernel_volume.is_none() {
            return Err(
                "spec.os.kernel: the kvm driver boots a kernel directly; set it (or spec.os.kernelVolume)"
                    .into(),
            );
        }
        if let Some(m) = os.machine.as_deref() {
            return Err(format!(
                "spec.os.machine: vireo-vmm has one machine type; leave it out (got '{m}')"
            ));
        }
        Ok(())
    }

    fn launch(&self, def: &Domain, paths: &RunPaths, disks: &[DiskFile]) -> Result<u32, String> {
        self.launch_vmm(def, paths, disks, VmmStart::Boot)
    }

    fn migrates(&self) -> bool {
        true
    }

    /// vireo-vmm with `--incoming`: no machine until the state is in; its
    /// API answers `info` as paused meanwhile.
    fn launch_migration_target(
        &self,
        def: &Domain,
        paths: &RunPaths,
        disks: &[DiskFile],
    ) -> Result<u32, String> {
        let _ = std::fs::remove_file(incoming_file(paths));
        self.launch_vmm(def, paths, disks, VmmStart::Incoming)
    }

    fn migration_listen(
        &self,
        paths: &RunPaths,
        address: std::net::IpAddr,
        exports: &[(usize, String)],
    ) -> Result<crate::migration::MigrationIncoming, String> {
        migration::listen(self, paths, address, exports)
    }

    fn migration_send(
        &self,
        paths: &RunPaths,
        incoming: &crate::migration::MigrationIncoming,
        params: &crate::migration::MigrationParams,
        copies: &[(usize, String)],
        aborted: &dyn Fn() -> bool,
    ) -> Result<crate::migration::MigrationStats, String> {
        migration::send(self, paths, incoming, params, copies, aborted)
    }

    fn migration_resume_target(&self, paths: &RunPaths) -> Result<(), String> {
        migration::resume_target(self, paths)?;
        // The received copy is in the VMM's memory now.
        let _ = std::fs::remove_file(incoming_file(paths));
        Ok(())
    }

    fn saves_state(&self) -> bool {
        true
    }

    /// Disks are raw: a snapshot keeps a sparse copy of each, taken while
    /// the guest is paused; the memory is vireo-vmm's snapshot.
    fn snapshot_disks(&self) -> Option<vm::snapshot::DiskSnapshots> {
        Some(vm::snapshot::DiskSnapshots::RawCopies)
    }

    /// vireo-vmm reads the snapshot at start (`--restore`, at the offset
    /// past the save file's header) and waits paused (`--paused`), so the
    /// guest runs only once [`Backend::load_state`] says so.
    fn launch_incoming(
        &self,
        def: &Domain,
        paths: &RunPaths,
        disks: &[DiskFile],
        file: &Path,
        offset: u64,
        _paused: bool,
    ) -> Result<u32, String> {
        self.launch_vmm(def, paths, disks, VmmStart::Restore(file, offset))
    }

    fn load_state(
        &self,
        paths: &RunPaths,
        _file: &Path,
        _offset: u64,
        paused: bool,
    ) -> Result<(), String> {
        if paused {
            Ok(())
        } else {
            self.call(paths, json!({ "command": "resume" })).map(drop)
        }
    }

    /// Asks vireo-vmm for its snapshot (it pauses and stays paused) and
    /// appends the stream it sends on the API connection to `file`.
    fn save_state(&self, paths: &RunPaths, file: &Path) -> Result<(), String> {
        let shown = paths.api.display();
        let stream = UnixStream::connect(&paths.api).map_err(|e| format!("{shown}: {e}"))?;
        // Generous: a large guest's memory takes a while to write.
        let patience = Some(Duration::from_secs(120));
        stream
            .set_read_timeout(patience)
            .and_then(|_| stream.set_write_timeout(patience))
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut writer = stream.try_clone().map_err(|e| format!("{shown}: {e}"))?;
        writer
            .write_all(b"{\"command\":\"snapshot\",\"after\":\"pause\"}\n")
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut reader = BufReader::with_capacity(1 << 20, stream);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("{shown}: {e}"))?;
        let answer: Value =
            serde_json::from_str(&line).map_err(|e| format!("{shown}: not JSON ({e}): {line}"))?;
        if answer.get("ok").and_then(Value::as_bool) != Some(true) {
            return Err(answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("snapshot refused")
                .to_string());
        }
        let bytes = answer
            .get("bytes")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("{shown}: snapshot answer without a size: {line}"))?;
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(file)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let copied = std::io::copy(&mut std::io::Read::take(&mut reader, bytes), &mut out)
            .map_err(|e| format!("receiving the snapshot: {e}"))?;
        if copied != bytes {
            return Err(format!(
                "vireo-vmm sent {copied} of the {bytes} snapshot bytes"
            ));
        }
        out.sync_all()
            .map_err(|e| format!("{}: {e}", file.display()))
    }

    fn query(&self, paths: &RunPaths) -> Result<Live, String> {
        let info = self.call(paths, json!({ "command": "info" }))?;
        let state = match info.get("state").and_then(Value::as_str) {
            Some("paused") => LiveState::Paused,
            Some(_) => LiveState::Running,
            None => return Err(format!("info answered {info}")),
        };
        Ok(Live {
            state,
            memory: info.get("memory_bytes").and_then(Value::as_u64),
            vcpus: info.get("vcpus").and_then(Value::as_u64).map(|v| v as u32),
        })
    }

    fn control(&self, paths: &RunPaths, op: Control) -> Result<(), ControlError> {
        match op {
            Control::Pause => self.command(paths, "pause"),
            Control::Resume => self.command(paths, "resume"),
            Control::Reset => self.command(paths, "reset"),
            Control::Powerdown => self
                .call(
                    paths,
                    json!({ "command": "shutdown", "timeout_seconds": 86400 }),
                )
                .map(drop)
                .map_err(ControlError::Failed),
            // The balloon: the guest's driver gives memory back (or takes
            // it) and `info.memory_bytes` follows.
            Control::SetMemory(bytes) => self
                .call(paths, json!({ "command": "balloon", "bytes": bytes }))
                .map(drop)
                .map_err(ControlError::Failed),
            // ACPI CPU hot-plug: removal waits for the guest to eject.
            Control::SetVcpus { to, .. } => self
                .call(paths, json!({ "command": "vcpus", "count": to }))
                .map(drop)
                .map_err(ControlError::Failed),
        }
    }

    /// vireo-vmm names each vCPU's thread `vcpuN`: the threads of the
    /// enabled vCPUs (`info.vcpus`, always vCPUs 0..N), from
    /// `/proc/PID/task`. The VMM's jail keeps the host's PID namespace.
    fn vcpu_threads(&self, paths: &RunPaths) -> Option<Result<Vec<u32>, String>> {
        Some((|| {
            let pid: u32 = std::fs::read_to_string(&paths.pidfile)
                .map_err(|e| format!("{}: {e}", paths.pidfile.display()))?
                .trim()
                .parse()
                .map_err(|e| format!("{}: {e}", paths.pidfile.display()))?;
            let enabled = self
                .call(paths, json!({ "command": "info" }))?
                .get("vcpus")
                .and_then(Value::as_u64)
                .ok_or("info answered no vcpus")?;
            let tasks = PathBuf::from(format!("/proc/{pid}/task"));
            let mut threads: Vec<(u64, u32)> = std::fs::read_dir(&tasks)
                .map_err(|e| format!("{}: {e}", tasks.display()))?
                .filter_map(|entry| {
                    let tid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                    let comm =
                        std::fs::read_to_string(tasks.join(tid.to_string()).join("comm")).ok()?;
                    let index: u64 = comm.trim().strip_prefix("vcpu")?.parse().ok()?;
                    (index < enabled).then_some((index, tid))
                })
                .collect();
            threads.sort_unstable();
            if threads.len() as u64 != enabled {
                return Err(format!(
                    "{} has {} vCPU threads of the {enabled} enabled",
                    tasks.display(),
                    threads.len()
                ));
            }
            Ok(threads.into_iter().map(|(_, tid)| tid).collect())
        })())
    }

    /// vireo-vmm's `block-stats` for the `--disk` that is `disk`, under
    /// virsh's names (as the qemu driver gives QEMU's), plus `errs`.
    fn block_stats(
        &self,
        paths: &RunPaths,
        disk: &str,
    ) -> Option<Result<Vec<(String, i64)>, String>> {
        Some((|| {
            let (index, _) = launched_disk(paths, disk)?;
            let answer = self.call(paths, json!({ "command": "block-stats" }))?;
            let stats = answer
                .get("disks")
                .and_then(Value::as_array)
                .and_then(|all| all.get(index))
                .ok_or_else(|| {
                    format!("vireo-vmm reports no statistics for disk {index}: {answer}")
                })?;
            let get = |k: &str| {
                stats
                    .get(k)
                    .and_then(Value::as_u64)
                    .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
                    .ok_or_else(|| format!("block-stats has no {k}: {stats}"))
            };
            [
                "rd_req",
                "rd_bytes",
                "wr_req",
                "wr_bytes",
                "flush_operations",
                "rd_total_times",
                "wr_total_times",
                "flush_total_times",
                "errs",
            ]
            .into_iter()
            .map(|k| Ok((format!("{disk} {k}"), get(k)?)))
            .collect()
        })())
    }

    /// The guest agent over vsock: vireo-vmm's proxy socket, `CONNECT`
    /// to the port vireo-guest-agent listens on.
    fn guest_agent(&self, paths: &RunPaths) -> Option<crate::vm::guest_agent::Channel> {
        Some(crate::vm::guest_agent::Channel::VsockProxy {
            uds: vsock_socket(paths),
            port: crate::vm::guest_agent::VSOCK_PORT,
        })
    }

    fn exit_reason(&self, paths: &RunPaths) -> Option<DomainReason> {
        let text = std::fs::read_to_string(&paths.exit_file).ok()?;
        let exit: Value = serde_json::from_str(&text).ok()?;
        match exit.get("reason").and_then(Value::as_str)? {
            "poweroff" | "reboot" => Some(DomainReason::Shutdown),
            "destroyed" => Some(DomainReason::Destroyed),
            _ => Some(DomainReason::Crashed),
        }
    }
}

/// The vCPU count in the state of the vireo-vmm snapshot at `offset` in
/// `file` (its machine config), read without checking the rest: vireo-vmm
/// checks the whole file when it restores it.
fn snapshot_vcpus(file: &Path, offset: u64) -> Option<u32> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).ok()?;
    // The snapshot's header (32 bytes), then the state's length.
    f.seek(SeekFrom::Start(offset.checked_add(32)?)).ok()?;
    let mut len = [0u8; 4];
    f.read_exact(&mut len).ok()?;
    let len = u32::from_le_bytes(len);
    if len > 16 << 20 {
        return None;
    }
    let mut state = vec![0u8; len as usize];
    f.read_exact(&mut state).ok()?;
    let state: Value = serde_json::from_slice(&state).ok()?;
    let n = state.get("config")?.get("vcpus")?.as_u64()?;
    u32::try_from(n).ok().filter(|&n| n > 0)
}

/// How vireo-vmm is confined beyond its seccomp filter (docs/vmm.md):
/// when the driver runs as root, `--jail` (a mount namespace whose root
/// holds only the Domain's run directory); and, when `VIREO_VMM_UID` and
/// `VIREO_VMM_GID` name a user, `--uid`/`--gid` so that the VMM runs as it.
/// By default (no such variables) the VMM stays uid 0 but without any
/// capability, under `no_new_privs`, which it always sets.
fn confinement_args() -> Vec<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Vec::new();
    }
    let mut args = vec!["--jail".to_string()];
    let id = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    if let (Some(uid), Some(gid)) = (id("VIREO_VMM_UID"), id("VIREO_VMM_GID")) {
        args.extend([
            "--uid".into(),
            uid.to_string(),
            "--gid".into(),
            gid.to_string(),
        ]);
    }
    args
}

/// What vireo-vmm does not do: firmware boot and the PC's disk buses (see
/// docs/vmm.md). Each refusal names the field and the driver that does it.
pub fn refuse_firmware_boot(def: &Domain) -> Result<(), String> {
    if def.spec.os.as_ref().and_then(|o| o.firmware).is_some() {
        return Err("spec.os.firmware: the kvm driver boots a kernel directly; use type: qemu for firmware boot".into());
    }
    if def.spec.os.as_ref().is_some_and(|o| !o.boot.is_empty()) {
        return Err(
            "spec.os.boot: the kvm driver boots a kernel directly; use type: qemu for a boot order"
                .into(),
        );
    }
    for (i, d) in def.spec.devices.disks.iter().enumerate() {
        if d.device == vireo_crds::DiskDevice::Cdrom {
            return Err(format!(
                "spec.devices.disks[{i}].device: the kvm driver has no CD-ROM drive (virtio disks only); use type: qemu for cdrom"
            ));
        }
        if d.bus != vireo_crds::DiskBus::Virtio {
            return Err(format!(
                "spec.devices.disks[{i}].bus: the kvm driver has virtio disks only; use type: qemu for {}",
                d.bus.as_str()
            ));
        }
        if d.boot_order.is_some() {
            return Err(format!(
                "spec.devices.disks[{i}].bootOrder: the kvm driver boots a kernel directly; use type: qemu for a boot order"
            ));
        }
    }
    Ok(())
}

/// The boot time the guest reported to vireo-vmm's boot timer (µs since
/// the VMM started), from its API while it runs.
pub fn boot_time_us(api: &Path) -> Option<u64> {
    let vmm = Vmm {
        binary: PathBuf::new(),
    };
    let paths = RunPaths {
        dir: PathBuf::new(),
        api: api.to_path_buf(),
        console_socket: PathBuf::new(),
        console_log: PathBuf::new(),
        pidfile: PathBuf::new(),
        log: PathBuf::new(),
        exit_file: PathBuf::new(),
        nvram: PathBuf::new(),
        guest_agent: PathBuf::new(),
        vsock: PathBuf::new(),
        abort_job: PathBuf::new(),
    };
    vmm.call(&paths, json!({ "command": "info" }))
        .ok()?
        .get("boot_time_us")
        .and_then(Value::as_u64)
}

/// Opens `kvm:///system` or `kvm:///embed?root=DIR`, with the test
/// driver's bookkeeping under ROOT/objects for networks and pools.
pub fn open(uri: &str, path_and_query: &str) -> Result<crate::Connection, String> {
    vm::open_standalone(Vmm::new()?, uri, path_and_query, Path::new(SYSTEM_ROOT))
}

/// Opens the kvm driver paired with the given network and storage drivers
/// (the agent pairs it with the node's own), which also resolve disks.
pub fn open_with(
    uri: &str,
    path_and_query: &str,
    network: Arc<dyn crate::NetworkDriver>,
    storage: Arc<dyn crate::StorageDriver>,
) -> Result<crate::Connection, String> {
    vm::open_connection(
        Vmm::new()?,
        uri,
        path_and_query,
        Path::new(SYSTEM_ROOT),
        network,
        storage,
    )
}

#[cfg(test)]
mod firmware_tests {
    use super::*;
    use vireo_crds::{Disk, DiskBus, DiskDevice, DomainSpec, DomainType, Firmware, OsSpec};

    #[test]
    fn firmware_boot_is_refused_naming_the_field() {
        let mut d = Domain::new(
            "fw",
            DomainSpec {
                domain_type: DomainType::Kvm,
                arch: None,
                uuid: None,
                memory: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
                current_memory: None,
                vcpus: 1,
                max_vcpus: None,
                os: Some(OsSpec {
                    firmware: Some(Firmware::Bios),
                    ..Default::default()
                }),
                devices: Default::default(),
                cloud_init: None,
                run_strategy: Default::default(),
                lifecycle: Default::default(),
                node_selector: None,
                eviction_strategy: None,
            },
        );
        assert_eq!(
            refuse_firmware_boot(&d),
            Err("spec.os.firmware: the kvm driver boots a kernel directly; use type: qemu for firmware boot".into())
        );
        d.spec.os = Some(OsSpec {
            kernel: Some("/boot/vmlinuz".into()),
            ..Default::default()
        });
        d.spec.devices.disks = vec![Disk {
            name: "sda".into(),
            volume: "iso".into(),
            device: DiskDevice::Cdrom,
            bus: DiskBus::Sata,
            ..Default::default()
        }];
        let e = refuse_firmware_boot(&d).expect_err("cdrom");
        assert!(
            e.starts_with("spec.devices.disks[0].device:") && e.contains("type: qemu"),
            "{e}"
        );
        d.spec.devices.disks[0].device = DiskDevice::Disk;
        let e = refuse_firmware_boot(&d).expect_err("sata");
        assert!(
            e.starts_with("spec.devices.disks[0].bus:") && e.contains("type: qemu for sata"),
            "{e}"
        );
        d.spec.devices.disks[0].bus = DiskBus::Virtio;
        d.spec.devices.disks[0].name = "vda".into();
        assert_eq!(refuse_firmware_boot(&d), Ok(()));
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::snapshot_vcpus;

    #[test]
    fn the_vcpu_count_is_read_from_the_snapshot_state() {
        let dir = std::env::temp_dir().join(format!("vireo-kvm-snapvcpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("s");
        let state = br#"{"config":{"memory_bytes":33554432,"vcpus":3,"devices":[]}}"#;
        // 100 bytes of another header in front, then the snapshot's 32.
        let mut bytes = vec![0u8; 100 + 32];
        bytes.extend_from_slice(&(state.len() as u32).to_le_bytes());
        bytes.extend_from_slice(state);
        std::fs::write(&file, &bytes).expect("write");
        assert_eq!(snapshot_vcpus(&file, 100), Some(3));
        // Anything else: no count (vireo-vmm refuses such files itself).
        assert_eq!(snapshot_vcpus(&file, 0), None);
        std::fs::write(&file, &bytes[..140]).expect("write");
        assert_eq!(snapshot_vcpus(&file, 100), None);
        assert_eq!(snapshot_vcpus(&dir.join("missing"), 0), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
