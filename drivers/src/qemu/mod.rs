//! The `qemu` driver: one `qemu-system-x86_64` process per running Domain,
//! controlled over QMP on a per-VM unix socket.
//!
//! * `qemu:///system` keeps its state under `/var/lib/vireo/qemu`;
//!   `qemu:///embed?root=/DIR` under DIR (libvirt's embedded-driver URI), so
//!   tests and the agent each get their own. `&shutdown_timeout=SECONDS`
//!   sets how long a graceful shutdown waits before destroying (default 300).
//! * QEMU runs daemonized (`-daemonize`, `-pidfile`), so it outlives the
//!   driver and the agent; a driver opened again on the same root re-adopts
//!   every running QEMU over QMP ([`crate::vm`] keeps the records).
//! * `-no-shutdown`: a guest power-off leaves QEMU stopped in `shutdown`
//!   until the driver applies `lifecycle.onPoweroff` (reset in place for
//!   `restart`, or end the process: shutoff, reason shutdown). A QEMU that
//!   dies by itself (killed, crashed) is shutoff, reason crashed.
//! * `reboot` presses the ACPI power button and resets the guest when it
//!   powers off, as libvirt does without a guest agent; guest-initiated
//!   reboots are QEMU's own in-place resets, or a stop with
//!   `lifecycle.onReboot: destroy` (`-action reboot=shutdown`).
//! * The serial console is a unix socket (`vireo console NAME` attaches to
//!   it) with a log file beside it.
//! * Networks and pools of this connection are, until the network and
//!   storage backends land, the test driver's bookkeeping kept under
//!   ROOT/objects/.

pub mod command;
pub mod migration;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vireo_crds::{DiskBus, DiskDevice, Domain, DomainType, Firmware};

use crate::vm::{self, Backend, Control, ControlError, DiskFile, Live, LiveState, RunPaths};
use command::{Accel, Machine};
use qmp::{Qmp, QmpError};

/// Where `qemu:///system` keeps its state.
pub const SYSTEM_ROOT: &str = "/var/lib/vireo/qemu";

/// The QEMU backend of [`vm::VmDriver`].
pub struct Qemu {
    binary: PathBuf,
    hardware_kvm: bool,
}

/// The qemu hypervisor driver.
pub type QemuDriver = vm::VmDriver<Qemu>;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

impl Qemu {
    /// Finds `qemu-system-x86_64` (or `$VIREO_QEMU`).
    pub fn new() -> Result<Self, String> {
        let binary = match std::env::var_os("VIREO_QEMU") {
            Some(p) => PathBuf::from(p),
            None => find_in_path("qemu-system-x86_64")
                .ok_or("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")?,
        };
        let hardware_kvm = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
            })
            .unwrap_or(false)
            && !Path::new("/sys/module/kvm_pvm").exists()
            && Path::new("/dev/kvm").exists();
        Ok(Self {
            binary,
            hardware_kvm,
        })
    }

    fn qmp(&self, paths: &RunPaths) -> Result<Qmp, QmpError> {
        Qmp::connect(&paths.api, QMP_TIMEOUT)
    }

    /// Starts QEMU for `def`: booting, or with `incoming` waiting for a
    /// saved state (`-incoming defer`); with `stay_paused` too, the guest
    /// does not run once the state is in (`-S`: a migration's target runs
    /// it at finish).
    fn launch_qemu(
        &self,
        def: &Domain,
        paths: &RunPaths,
        disks: &[DiskFile],
        incoming: bool,
        stay_paused: bool,
    ) -> Result<u32, String> {
        let accel = command::accel_of(def)?;
        for file in [
            def.spec.os.as_ref().and_then(|o| o.kernel.as_deref()),
            def.spec.os.as_ref().and_then(|o| o.initrd.as_deref()),
        ]
        .into_iter()
        .flatten()
        {
            if !Path::new(file).is_file() {
                return Err(format!("{file}: no such file on this node"));
            }
        }
        if command::firmware_of(def) == Some(Firmware::Efi) {
            create_nvram(&paths.nvram, command::ovmf_files(def).1)?;
        }
        let mut args = command::build(def, paths, disks, accel)?;
        if incoming {
            args.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        if stay_paused {
            args.push("-S".to_string());
        }
        let log = std::fs::File::create(&paths.log)
            .map_err(|e| format!("{}: {e}", paths.log.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", paths.log.display()))?;
        tracing::debug!(binary = %self.binary.display(), ?args, "launching QEMU");
        // -daemonize: this returns when QEMU is initialised and detached
        // (its own session, re-parented), or with its error.
        let status = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .status()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        let message = || {
            std::fs::read_to_string(&paths.log)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        if !status.success() {
            return Err(format!(
                "qemu-system-x86_64 failed ({status}): {}",
                message()
            ));
        }
        let pid: u32 = std::fs::read_to_string(&paths.pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("QEMU wrote no pid file: {}", message()))?;
        // Balloon down to currentMemory: the guest's balloon driver gives
        // the rest back once it loads.
        let (max, current) = {
            let max = vireo_crds::quantity::parse_quantity(&def.spec.memory).unwrap_or(0);
            let cur = def
                .spec
                .current_memory
                .as_ref()
                .and_then(|q| vireo_crds::quantity::parse_quantity(q).ok())
                .unwrap_or(max);
            (max, cur)
        };
        // A restored guest's balloon is part of its saved state.
        if current < max && !incoming {
            let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
            q.execute("balloon", Some(json!({ "value": current })))
                .map_err(|e| e.to_string())?;
        }
        Ok(pid)
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

fn failed(e: QmpError) -> ControlError {
    ControlError::Failed(e.to_string())
}

impl Backend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    /// qemu-system-x86_64 runs 64- and 32-bit x86 guests.
    fn arches(&self) -> &'static [&'static str] {
        &["x86_64", "i686"]
    }

    fn domain_type(&self) -> DomainType {
        DomainType::Qemu
    }

    fn version(&self) -> String {
        let out = Command::new(&self.binary).arg("--version").output();
        out.ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                text.split_whitespace()
                    .skip_while(|w| *w != "version")
                    .nth(1)
                    .map(|v| v.to_string())
            })
            .unwrap_or_else(|| "unknown".into())
    }

    fn check(&self, def: &Domain) -> Result<(), String> {
        Machine::from_spec(def)?;
        let accel = command::accel_of(def)?;
        if accel == Accel::Kvm && !self.hardware_kvm {
            return Err(format!(
                "metadata.annotations[{}]: kvm asked for, but this host has no hardware KVM",
                command::ACCEL_ANNOTATION
            ));
        }
        if let Some(i) = def
            .spec
            .devices
            .disks
            .iter()
            .position(|d| d.device == DiskDevice::Cdrom && d.bus == DiskBus::Virtio)
        {
            return Err(format!(
                "spec.devices.disks[{i}].bus: a CD-ROM is on bus sata or scsi, not virtio"
            ));
        }
        match command::firmware_of(def) {
            Some(Firmware::Efi) => {
                let (code, vars) = command::ovmf_files(def);
                for file in [code, vars] {
                    if !Path::new(file).is_file() {
                        return Err(format!(
                            "spec.os.firmware: efi needs {file} on this node (Debian package ovmf)"
                        ));
                    }
                }
                Ok(())
            }
            Some(Firmware::Bios) => Ok(()),
            None => {
                let os = def.spec.os.as_ref().ok_or(
                    "spec.os.kernel: set spec.os.kernel (or spec.os.kernelVolume) to boot a kernel directly, or spec.os.firmware (bios, efi) to boot from a disk",
                )?;
                if os.kernel.as_deref().is_none_or(str::is_empty) && os.kernel_volume.is_none() {
                    return Err(
                        "spec.os.kernel: set it (or spec.os.kernelVolume) to boot a kernel directly, or spec.os.firmware (bios, efi) to boot from a disk"
                            .into(),
                    );
                }
                Ok(())
            }
        }
    }

    fn launch(&self, def: &Domain, paths: &RunPaths, disks: &[DiskFile]) -> Result<u32, String> {
        self.launch_qemu(def, paths, disks, false, false)
    }

    fn saves_state(&self) -> bool {
        true
    }

    fn launch_incoming(
        &self,
        def: &Domain,
        paths: &RunPaths,
        disks: &[DiskFile],
        _file: &Path,
        _offset: u64,
        _paused: bool,
    ) -> Result<u32, String> {
        self.launch_qemu(def, paths, disks, true, false)
    }

    fn migrates(&self) -> bool {
        true
    }

    fn launch_migration_target(
        &self,
        def: &Domain,
        paths: &RunPaths,
        disks: &[DiskFile],
    ) -> Result<u32, String> {
        self.launch_qemu(def, paths, disks, true, true)
    }

    fn migration_listen(
        &self,
        paths: &RunPaths,
        address: std::net::IpAddr,
        exports: &[(usize, String)],
    ) -> Result<crate::migration::MigrationIncoming, String> {
        let mut q = migration::Monitor::new(&paths.api, QMP_TIMEOUT);
        migration::listen(&mut q, address, exports)
    }

    fn migration_send(
        &self,
        paths: &RunPaths,
        incoming: &crate::migration::MigrationIncoming,
        params: &crate::migration::MigrationParams,
        copies: &[(usize, String)],
        aborted: &dyn Fn() -> bool,
    ) -> Result<crate::migration::MigrationStats, String> {
        let mut q = migration::Monitor::new(&paths.api, QMP_TIMEOUT);
        migration::send(&mut q, incoming, params, copies, aborted)
    }

    fn migration_resume_target(&self, paths: &RunPaths) -> Result<(), String> {
        let mut q = migration::Monitor::new(&paths.api, QMP_TIMEOUT);
        migration::resume(&mut q)
    }

    /// Pauses the guest and migrates it into the file (QEMU 7.2 has no
    /// `file:` URI: `exec:cat >>`), waiting for the migration to end.
    fn save_state(&self, paths: &RunPaths, file: &Path) -> Result<(), String> {
        let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
        q.execute("stop", None).map_err(|e| e.to_string())?;
        // QEMU's default bandwidth cap (32 MiB/s) is for live migration
        // over a network; a save writes as fast as the disk takes it.
        q.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 1u64 << 40 })),
        )
        .map_err(|e| e.to_string())?;
        let file = file.to_str().ok_or("the save file's path is not UTF-8")?;
        let uri = format!("exec:cat >> {}", crate::save::shell_quote(file));
        q.execute("migrate", Some(json!({ "uri": uri })))
            .map_err(|e| e.to_string())?;
        loop {
            let info = q
                .execute("query-migrate", None)
                .map_err(|e| e.to_string())?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = info
                        .get("error-desc")
                        .and_then(|d| d.as_str())
                        .unwrap_or("no reason given");
                    return Err(format!("QEMU's migration to the file failed: {why}"));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Feeds the file's state stream (past the header) to the waiting QEMU,
    /// waits until it has loaded, and runs the guest unless it was saved
    /// paused.
    fn load_state(
        &self,
        paths: &RunPaths,
        file: &Path,
        offset: u64,
        paused: bool,
    ) -> Result<(), String> {
        let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
        let file = file.to_str().ok_or("the save file's path is not UTF-8")?;
        let uri = format!(
            "exec:tail -c +{} {}",
            offset + 1,
            crate::save::shell_quote(file)
        );
        q.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map_err(|e| e.to_string())?;
        loop {
            // A stream QEMU cannot load ends the process: the socket closes.
            let status = q.execute("query-status", None).map_err(|e| {
                let said = std::fs::read_to_string(&paths.log).unwrap_or_default();
                let said = said.trim();
                if said.is_empty() {
                    format!("QEMU could not load the saved state ({e})")
                } else {
                    format!("QEMU could not load the saved state ({e}): {said}")
                }
            })?;
            match status.get("status").and_then(|s| s.as_str()) {
                Some("inmigrate") => std::thread::sleep(Duration::from_millis(20)),
                Some("running") if paused => {
                    q.execute("stop", None).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                Some("running") => return Ok(()),
                Some(_) if paused => return Ok(()),
                Some(_) => {
                    q.execute("cont", None).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                None => return Err(format!("query-status answered {status}")),
            }
        }
    }

    /// qcow2 disks get internal snapshots (`savevm`'s kind, kept inside
    /// the image); the memory goes to a save file beside them.
    fn snapshot_disks(&self) -> Option<vm::snapshot::DiskSnapshots> {
        Some(vm::snapshot::DiskSnapshots::Qcow2Internal)
    }

    fn snapshot_internal_live(
        &self,
        paths: &RunPaths,
        indexes: &[usize],
        tag: &str,
    ) -> Result<(), String> {
        let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
        for (n, i) in indexes.iter().enumerate() {
            let taken = q.execute(
                "blockdev-snapshot-internal-sync",
                Some(json!({ "device": format!("disk{i}"), "name": tag })),
            );
            if let Err(e) = taken {
                for done in &indexes[..n] {
                    let _ = q.execute(
                        "blockdev-snapshot-delete-internal-sync",
                        Some(json!({ "device": format!("disk{done}"), "name": tag })),
                    );
                }
                return Err(format!("disk{i}: {e}"));
            }
        }
        Ok(())
    }

    fn snapshot_delete_live(
        &self,
        paths: &RunPaths,
        index: usize,
        tag: &str,
    ) -> Result<(), String> {
        let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
        q.execute(
            "blockdev-snapshot-delete-internal-sync",
            Some(json!({ "device": format!("disk{index}"), "name": tag })),
        )
        .map(drop)
        .map_err(|e| e.to_string())
    }

    fn vcpu_threads(&self, paths: &RunPaths) -> Option<Result<Vec<u32>, String>> {
        Some((|| {
            let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
            let cpus = q
                .execute("query-cpus-fast", None)
                .map_err(|e| e.to_string())?;
            let mut threads: Vec<(i64, u32)> = cpus
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    let index = c.get("cpu-index")?.as_i64()?;
                    let tid = u32::try_from(c.get("thread-id")?.as_u64()?).ok()?;
                    Some((index, tid))
                })
                .collect();
            threads.sort_unstable();
            Ok(threads.into_iter().map(|(_, t)| t).collect())
        })())
    }

    fn guest_agent(&self, paths: &RunPaths) -> Option<crate::vm::guest_agent::Channel> {
        Some(crate::vm::guest_agent::Channel::Unix(
            paths.guest_agent.clone(),
        ))
    }

    fn guest_agent_open(&self, paths: &RunPaths) -> Option<bool> {
        // QEMU knows whether the guest opened its end of the port
        // (`frontend-open`): without an agent there, asking would only
        // wait for a timeout.
        let chardevs = self.qmp(paths).ok()?.execute("query-chardev", None).ok()?;
        chardevs
            .as_array()?
            .iter()
            .find(|c| c.get("label").and_then(Value::as_str) == Some("qga0"))?
            .get("frontend-open")
            .and_then(Value::as_bool)
    }

    fn block_stats(
        &self,
        paths: &RunPaths,
        disk: &str,
    ) -> Option<Result<Vec<(String, i64)>, String>> {
        Some((|| {
            let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
            let all = q
                .execute("query-blockstats", None)
                .map_err(|e| e.to_string())?;
            // Our disks are -device ...,id=<target>: QEMU names the
            // frontend by that id, alone or as a QOM path.
            let entry = all
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| {
                    e.get("qdev")
                        .and_then(|q| q.as_str())
                        .is_some_and(|q| q == disk || q.split('/').any(|part| part == disk))
                })
                .ok_or_else(|| format!("QEMU reports no statistics for {disk}"))?;
            let stats = entry
                .get("stats")
                .ok_or_else(|| format!("query-blockstats answered {entry}"))?;
            let get = |k: &str| stats.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
            // virsh's names for QEMU's counters, in virsh's order.
            Ok([
                ("rd_req", "rd_operations"),
                ("rd_bytes", "rd_bytes"),
                ("wr_req", "wr_operations"),
                ("wr_bytes", "wr_bytes"),
                ("flush_operations", "flush_operations"),
                ("rd_total_times", "rd_total_time_ns"),
                ("wr_total_times", "wr_total_time_ns"),
                ("flush_total_times", "flush_total_time_ns"),
            ]
            .into_iter()
            .map(|(ours, theirs)| (format!("{disk} {ours}"), get(theirs)))
            .collect())
        })())
    }

    fn query(&self, paths: &RunPaths) -> Result<Live, String> {
        let mut q = self.qmp(paths).map_err(|e| e.to_string())?;
        let status = q.execute("query-status", None).map_err(|e| e.to_string())?;
        let state = match status.get("status").and_then(|s| s.as_str()) {
            Some("running") => LiveState::Running,
            Some("shutdown") => LiveState::GuestStopped,
            Some("guest-panicked") => LiveState::GuestCrashed,
            Some(_) => LiveState::Paused,
            None => return Err(format!("query-status answered {status}")),
        };
        let memory = q
            .execute("query-balloon", None)
            .ok()
            .and_then(|b| b.get("actual").and_then(|a| a.as_u64()));
        let vcpus = q
            .execute("query-cpus-fast", None)
            .ok()
            .and_then(|c| c.as_array().map(|a| a.len() as u32));
        Ok(Live {
            state,
            memory,
            vcpus,
        })
    }

    fn control(&self, paths: &RunPaths, op: Control) -> Result<(), ControlError> {
        let mut q = self.qmp(paths).map_err(failed)?;
        match op {
            Control::Pause => q.execute("stop", None).map(drop).map_err(failed),
            Control::Resume => q.execute("cont", None).map(drop).map_err(failed),
            Control::Powerdown => q
                .execute("system_powerdown", None)
                .map(drop)
                .map_err(failed),
            Control::Reset => {
                q.execute("system_reset", None).map_err(failed)?;
                let status = q.execute("query-status", None).map_err(failed)?;
                if status.get("running").and_then(|r| r.as_bool()) != Some(true) {
                    q.execute("cont", None).map_err(failed)?;
                }
                Ok(())
            }
            Control::SetMemory(bytes) => q
                .execute("balloon", Some(json!({ "value": bytes })))
                .map(drop)
                .map_err(failed),
            Control::SetVcpus { from, to } => {
                // Only q35 domains have hot-pluggable vCPUs (devices vcpu1..).
                let cpus = q.execute("query-hotpluggable-cpus", None).map_err(failed)?;
                let pluggable = cpus.as_array().map(|a| a.len()).unwrap_or(0);
                if pluggable <= 1 {
                    return Err(ControlError::Unsupported(
                        "changing vCPUs of a running microvm domain (use spec.os.machine: q35)",
                    ));
                }
                let model = cpus
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(|c| c.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("max-x86_64-cpu")
                    .to_string();
                if to > from {
                    for i in from..to {
                        q.execute(
                            "device_add",
                            Some(json!({
                                "driver": model, "id": format!("vcpu{i}"),
                                "socket-id": i, "core-id": 0, "thread-id": 0
                            })),
                        )
                        .map_err(failed)?;
                    }
                } else {
                    let present: Vec<String> = cpus
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.get("qom-path").and_then(|p| p.as_str()))
                        .map(str::to_string)
                        .collect();
                    for i in (to..from).rev() {
                        let id = format!("vcpu{i}");
                        if !present.iter().any(|p| p.ends_with(&format!("/{id}"))) {
                            continue;
                        }
                        match q.execute("device_del", Some(json!({ "id": id }))) {
                            Ok(_) => {}
                            // Until the guest's ACPI switches QEMU to the
                            // modern CPU hot-plug interface, unplug is refused.
                            Err(QmpError::Qemu { desc, .. })
                                if desc.contains("not supported device type") =>
                            {
                                return Err(ControlError::NotYet(desc));
                            }
                            Err(e) => return Err(failed(e)),
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// Opens `qemu:///system` or `qemu:///embed?root=DIR`, with the test
/// driver's bookkeeping under ROOT/objects for networks and pools.
pub fn open(uri: &str, path_and_query: &str) -> Result<crate::Connection, String> {
    vm::open_standalone(Qemu::new()?, uri, path_and_query, Path::new(SYSTEM_ROOT))
}

/// Opens the qemu driver paired with the given network and storage drivers
/// (the agent pairs it with the node's own), which also resolve disks.
pub fn open_with(
    uri: &str,
    path_and_query: &str,
    network: Arc<dyn crate::NetworkDriver>,
    storage: Arc<dyn crate::StorageDriver>,
) -> Result<crate::Connection, String> {
    vm::open_connection(
        Qemu::new()?,
        uri,
        path_and_query,
        Path::new(SYSTEM_ROOT),
        network,
        storage,
    )
}

/// Makes an EFI Domain's variable store from OVMF's template, once: an
/// existing store (the guest's variables, its boot entries) is kept.
fn create_nvram(nvram: &Path, template: &str) -> Result<(), String> {
    if nvram.exists() {
        return Ok(());
    }
    let dir = nvram.parent().ok_or("NVRAM path has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let partial = nvram.with_extension("fd.partial");
    std::fs::copy(template, &partial)
        .and_then(|_| std::fs::rename(&partial, nvram))
        .map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            format!("copying {template} to {}: {e}", nvram.display())
        })
}

/// Waits for a line containing `needle` in a console log, up to `timeout`.
/// Returns the log read so far.
pub fn wait_for_console(log: &Path, needle: &str, timeout: Duration) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if start.elapsed() >= timeout {
            return Err(text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
