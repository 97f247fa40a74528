//! The hypervisor driver: domains (libvirt's `virDomain*` calls) and the node.

use vireo_crds::{Domain, DomainInfo, DomainReason, DomainState, NodeInfo};

use crate::error::ObjectName;
use crate::{Error, ListFilter, Lookup, Result};

/// Which definition a change affects, as libvirt's `VIR_DOMAIN_AFFECT_*`
/// flags (virsh's `--live`, `--config`, `--current`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Affect {
    /// The running domain; refused while it is inactive.
    Live,
    /// The persistent definition (the next start); the running domain keeps
    /// what it has.
    Config,
    /// The live domain while active, the persistent definition while inactive.
    #[default]
    Current,
}

/// A domain's disk as `virDomainGetBlockInfo` sees it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockInfo {
    pub capacity: u64,
    pub allocation: u64,
    pub physical: u64,
}

/// One vCPU as `virDomainGetVcpus` sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuInfo {
    pub number: u32,
    /// The host CPU it last ran on, while the domain runs.
    pub cpu: Option<u32>,
    /// While the domain runs: `running`, `offline` or `blocked`.
    pub state: Option<String>,
    pub cpu_time_ns: Option<u64>,
    /// Host CPUs it may run on, one `y` or `-` per host CPU.
    pub affinity: String,
}

/// The annotation holding a domain's description (`virsh desc`).
pub const DESCRIPTION_ANNOTATION: &str = "vireo.dev/description";
/// The annotation holding a domain's title (`virsh desc --title`, `list --title`).
pub const TITLE_ANNOTATION: &str = "vireo.dev/title";

fn unsupported(driver: &'static str, name: &str, operation: &'static str) -> Error {
    Error::Unsupported {
        object: ObjectName::new(vireo_crds::ObjectKind::Domain, name),
        driver,
        operation,
    }
}

fn not_running(name: &str) -> Error {
    Error::invalid_state(vireo_crds::ObjectKind::Domain, name, "is not running")
}

/// What a lookup returns, like a `virDomainPtr`: the identity of a domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainRef {
    pub name: String,
    pub uuid: String,
    /// Runtime ID while active; `None` while inactive.
    pub id: Option<u32>,
}

/// A hypervisor driver. Operations take the domain's name (from a lookup)
/// and follow libvirt's rules:
///
/// * *define* makes a persistent, inactive domain (or updates the
///   definition; while the domain runs the new definition waits for the next
///   start); *create* makes a transient, active one;
/// * *undefine* removes an inactive domain, and makes an active one
///   transient: it keeps running and disappears when it stops;
/// * every activation gets a new ID; an inactive domain has none.
pub trait HypervisorDriver: Send + Sync {
    /// Driver name: `test`, `kvm`, `qemu`.
    fn name(&self) -> &'static str;
    /// Hypervisor version, as `major.minor.micro`.
    fn hypervisor_version(&self) -> String;
    /// libvirt's `virNodeGetInfo`.
    fn node_info(&self) -> Result<NodeInfo>;
    /// Node host name.
    fn hostname(&self) -> Result<String>;

    /// Domains matching the filter, in ID order for active ones then by name.
    fn list_domains(&self, filter: ListFilter) -> Result<Vec<DomainRef>>;
    /// How many domains match the filter.
    fn count_domains(&self, filter: ListFilter) -> Result<usize> {
        Ok(self.list_domains(filter)?.len())
    }
    /// Domains matching the filter in every namespace the connection can
    /// see (`list --all-namespaces`): on a node, the same as
    /// [`list_domains`](Self::list_domains).
    fn list_domains_all_namespaces(&self, filter: ListFilter) -> Result<Vec<DomainRef>> {
        self.list_domains(filter)
    }
    /// Whether the connection spans nodes (a cluster), so that `list`
    /// shows each domain's node.
    fn spans_nodes(&self) -> bool {
        false
    }
    /// The node a domain runs on, or was placed on, for a connection that
    /// spans nodes; `None` on a node.
    fn domain_node(&self, name: &str) -> Result<Option<String>> {
        let _ = name;
        Ok(None)
    }
    /// Finds a domain by name, UUID or ID (IDs find active domains only).
    fn lookup_domain(&self, key: Lookup<'_>) -> Result<DomainRef>;

    /// The definition: the live one, or with `inactive` the persistent one
    /// that the next start uses (libvirt's `dumpxml --inactive`).
    fn domain_definition(&self, name: &str, inactive: bool) -> Result<Domain>;
    /// GetInfo: state and reason, memory, vCPUs, CPU time.
    fn domain_info(&self, name: &str) -> Result<DomainInfo>;
    /// State and reason (libvirt's `virDomainGetState`).
    fn domain_state(&self, name: &str) -> Result<(DomainState, DomainReason)> {
        let info = self.domain_info(name)?;
        Ok((info.state, info.reason))
    }
    /// Whether the domain has a persistent definition.
    fn domain_is_persistent(&self, name: &str) -> Result<bool>;
    /// Whether the domain starts with the node.
    fn domain_autostart(&self, name: &str) -> Result<bool>;
    /// Sets autostart (persistent domains only).
    fn set_domain_autostart(&self, name: &str, autostart: bool) -> Result<()>;
    /// Sets the current memory, in bytes: live while active, else in the
    /// definition. At most the maximum memory.
    fn set_domain_memory(&self, name: &str, bytes: u64) -> Result<()>;
    /// Sets the vCPU count: live while active, else in the definition. At
    /// most `maxVcpus`.
    fn set_domain_vcpus(&self, name: &str, vcpus: u32) -> Result<()>;

    /// Defines (or redefines) a persistent domain.
    fn define_domain(&self, domain: &Domain) -> Result<DomainRef>;
    /// Creates and starts a transient domain.
    fn create_domain(&self, domain: &Domain) -> Result<DomainRef>;
    /// Removes the persistent definition.
    fn undefine_domain(&self, name: &str) -> Result<()>;
    /// Starts an inactive persistent domain.
    fn start_domain(&self, name: &str) -> Result<DomainRef>;
    /// Asks the guest to power off; it ends shutoff (shutdown), at once or
    /// when the guest complies.
    fn shutdown_domain(&self, name: &str) -> Result<()>;
    /// Asks the guest to reboot; the domain's `lifecycle.onReboot` applies.
    fn reboot_domain(&self, name: &str) -> Result<()>;
    /// Resets the guest at once, like the reset button.
    fn reset_domain(&self, name: &str) -> Result<()>;
    /// Pauses the vCPUs: paused (user).
    fn suspend_domain(&self, name: &str) -> Result<()>;
    /// Resumes paused vCPUs: running (unpaused).
    fn resume_domain(&self, name: &str) -> Result<()>;
    /// Stops the domain at once: shutoff (destroyed).
    fn destroy_domain(&self, name: &str) -> Result<()>;

    /// The unix socket of a running domain's serial console (`vireo
    /// console`): bytes written go to the guest's serial port, bytes read
    /// come from it.
    fn console_path(&self, name: &str) -> Result<std::path::PathBuf> {
        Err(unsupported(
            self.name(),
            name,
            "a serial console (no guest runs)",
        ))
    }

    /// A duplex stream to a running domain's serial console. By default
    /// the socket at [`console_path`](Self::console_path); a connection
    /// whose console is elsewhere (a cluster, reached over the network)
    /// hands back one end of a socket pair that it bridges itself.
    fn open_console(&self, name: &str) -> Result<std::os::unix::net::UnixStream> {
        let path = self.console_path(name)?;
        std::os::unix::net::UnixStream::connect(&path).map_err(|e| crate::Error::OperationFailed {
            object: crate::error::ObjectName::new(vireo_crds::ObjectKind::Domain, name),
            message: format!("cannot connect to its console at {}: {e}", path.display()),
        })
    }

    /// Sets the current memory with libvirt's affect flags: `Live` is
    /// refused on an inactive domain (`domain is not running`, as libvirt
    /// refuses `virsh setmem` without `--config`); `Config` changes the
    /// persistent definition only.
    fn set_domain_memory_flags(&self, name: &str, bytes: u64, affect: Affect) -> Result<()> {
        let active = self.domain_state(name)?.0.is_active();
        match affect {
            Affect::Live if !active => Err(not_running(name)),
            Affect::Config if active => {
                let mut def = self.domain_definition(name, true)?;
                let max = vireo_crds::quantity::parse_quantity(&def.spec.memory).unwrap_or(0);
                if bytes == 0 || bytes > max {
                    return Err(Error::invalid_argument(
                        vireo_crds::ObjectKind::Domain,
                        name,
                        format!(
                            "cannot set memory to {} KiB: it must be above 0 and at most the maximum of {} KiB",
                            bytes / 1024,
                            max / 1024
                        ),
                    ));
                }
                def.spec.current_memory = Some(vireo_crds::quantity::format_bytes(bytes));
                self.define_domain(&def).map(|_| ())
            }
            _ => self.set_domain_memory(name, bytes),
        }
    }

    /// Sets the vCPU count with libvirt's affect flags (see
    /// [`HypervisorDriver::set_domain_memory_flags`]).
    fn set_domain_vcpus_flags(&self, name: &str, vcpus: u32, affect: Affect) -> Result<()> {
        let active = self.domain_state(name)?.0.is_active();
        match affect {
            Affect::Live if !active => Err(not_running(name)),
            Affect::Config if active => {
                let mut def = self.domain_definition(name, true)?;
                let max = def.spec.max_vcpus.unwrap_or(def.spec.vcpus);
                if vcpus == 0 || vcpus > max {
                    return Err(Error::invalid_argument(
                        vireo_crds::ObjectKind::Domain,
                        name,
                        format!("requested vcpus {vcpus} is outside 1..={max} (spec.maxVcpus)"),
                    ));
                }
                // The maximum stays what it was (libvirt's <vcpu> vs current).
                def.spec.max_vcpus = Some(max);
                def.spec.vcpus = vcpus;
                self.define_domain(&def).map(|_| ())
            }
            _ => self.set_domain_vcpus(name, vcpus),
        }
    }

    /// Sets (or with `None` removes) an annotation of the domain, such as
    /// its description or title. `Config` and an inactive domain's
    /// `Current` redefine it; a live change needs a driver that keeps one.
    fn set_domain_annotation(
        &self,
        name: &str,
        key: &str,
        value: Option<&str>,
        affect: Affect,
    ) -> Result<()> {
        let active = self.domain_state(name)?.0.is_active();
        match affect {
            Affect::Live if !active => Err(not_running(name)),
            Affect::Live | Affect::Current if active => Err(unsupported(
                self.name(),
                name,
                "a live change of the description (use --config)",
            )),
            _ => {
                let mut def = self.domain_definition(name, true)?;
                let notes = def
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default);
                match value {
                    Some(v) => notes.insert(key.to_string(), v.to_string()),
                    None => notes.remove(key),
                };
                self.define_domain(&def).map(|_| ())
            }
        }
    }

    /// The OS type `virsh dominfo` prints: `hvm` for full virtualization.
    fn domain_os_type(&self, name: &str) -> Result<String> {
        self.domain_state(name)?;
        Ok("hvm".to_string())
    }

    /// The security driver: model and DOI (`virsh dominfo`, `capabilities`).
    fn security_model(&self) -> (String, String) {
        ("none".to_string(), "0".to_string())
    }

    /// A running domain's security label and whether it is enforcing.
    fn domain_security_label(&self, name: &str) -> Result<Option<(String, bool)>> {
        self.domain_state(name)?;
        Ok(None)
    }

    /// Free memory per NUMA cell, in bytes (`virsh freecell`): this
    /// machine's, as one cell, unless the driver knows better.
    fn cells_free_memory(&self) -> Result<Vec<u64>> {
        let text =
            std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::OperationFailed {
                object: ObjectName::new(vireo_crds::ObjectKind::Host, "localhost"),
                message: format!("cannot read /proc/meminfo: {e}"),
            })?;
        let kib = text
            .lines()
            .find_map(|l| l.strip_prefix("MemFree:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(vec![kib * 1024])
    }

    /// The node's free memory, in bytes (`virsh freecell` without a cell).
    fn node_free_memory(&self) -> Result<u64> {
        Ok(self.cells_free_memory()?.iter().sum())
    }

    /// The scheduler and its parameters (`virsh schedinfo`).
    fn domain_scheduler(&self, name: &str) -> Result<(String, Vec<(String, String)>)> {
        Err(unsupported(self.name(), name, "scheduler parameters"))
    }

    /// Addresses the driver itself knows for a running domain's interfaces
    /// (`virsh domifaddr`), as (interface name, `address/prefix`). `None`
    /// when the driver leaves them to the networks' DHCP leases.
    fn domain_interface_addresses(&self, name: &str) -> Result<Option<Vec<(String, String)>>> {
        self.domain_state(name)?;
        Ok(None)
    }

    /// The connection's capabilities as libvirt's `<capabilities>` XML,
    /// when the driver describes them itself (else the CLI builds them
    /// from the node's info).
    fn capabilities(&self) -> Result<String> {
        Err(unsupported(
            self.name(),
            "localhost",
            "a capabilities description",
        ))
    }

    /// The host's SMBIOS description as libvirt's `<sysinfo>` XML: this
    /// machine's, read from /sys/class/dmi/id, unless the driver knows better.
    fn sysinfo(&self) -> Result<String> {
        crate::host::sysinfo_xml(std::path::Path::new("/sys/class/dmi/id")).map_err(|e| {
            Error::OperationFailed {
                object: ObjectName::new(vireo_crds::ObjectKind::Host, "localhost"),
                message: e.to_string(),
            }
        })
    }

    /// A disk's sizes (`virsh domblkinfo`), when the driver knows them
    /// beyond its volume's.
    fn domain_block_info(&self, name: &str, _disk: &str) -> Result<BlockInfo> {
        Err(unsupported(self.name(), name, "block information"))
    }

    /// A disk's I/O counters (`virsh domblkstat`), virsh's names and values.
    fn domain_block_stats(&self, name: &str, _disk: &str) -> Result<Vec<(String, i64)>> {
        Err(unsupported(self.name(), name, "block statistics"))
    }

    /// An interface's counters (`virsh domifstat`), virsh's names and
    /// values. By default the counters of the interface's tap on this
    /// machine, seen from the guest (a tap's receive is the guest's
    /// transmit, as libvirt reports them): only on the node that runs the
    /// domain.
    fn domain_interface_stats(&self, name: &str, iface: &str) -> Result<Vec<(String, i64)>> {
        let d = self.lookup_domain(Lookup::Name(name))?;
        if d.id.is_none() {
            return Err(not_running(name));
        }
        let def = self.domain_definition(name, false)?;
        let interfaces = &def.spec.devices.interfaces;
        let index = interfaces
            .iter()
            .enumerate()
            .position(|(i, x)| {
                x.name == iface
                    || crate::bridge::tap::tap_name(&d.uuid, i) == iface
                    || crate::bridge::tap::interface_mac(x, &d.uuid, i).eq_ignore_ascii_case(iface)
            })
            .ok_or_else(|| {
                Error::invalid_argument(
                    vireo_crds::ObjectKind::Domain,
                    name,
                    format!("'{iface}' is not a known interface"),
                )
            })?;
        let tap = crate::bridge::tap::tap_name(&d.uuid, index);
        let dir = std::path::Path::new("/sys/class/net")
            .join(&tap)
            .join("statistics");
        let read = |counter: &str| -> Result<i64> {
            let path = dir.join(counter);
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .ok_or_else(|| Error::OperationFailed {
                    object: ObjectName::new(vireo_crds::ObjectKind::Domain, name),
                    message: format!(
                        "interface statistics are read on the node that runs the domain: \
                         {} is not readable here",
                        path.display()
                    ),
                })
        };
        // The guest's rx is the tap's tx, and the other way round.
        let pairs = [
            ("rx_bytes", "tx_bytes"),
            ("rx_packets", "tx_packets"),
            ("rx_errs", "tx_errors"),
            ("rx_drop", "tx_dropped"),
            ("tx_bytes", "rx_bytes"),
            ("tx_packets", "rx_packets"),
            ("tx_errs", "rx_errors"),
            ("tx_drop", "rx_dropped"),
        ];
        let label = &interfaces[index].name;
        pairs
            .iter()
            .map(|(ours, tap_counter)| Ok((format!("{label} {ours}"), read(tap_counter)?)))
            .collect()
    }

    /// Memory statistics (`virsh dommemstat`), virsh's names, in KiB: the
    /// balloon's `actual` size unless the driver knows more.
    fn domain_memory_stats(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let info = self.domain_info(name)?;
        if !info.state.is_active() {
            return Err(not_running(name));
        }
        let bytes = vireo_crds::quantity::parse_quantity(&info.memory).unwrap_or(0);
        Ok(vec![("actual".to_string(), bytes / 1024)])
    }

    /// Each vCPU (`virsh vcpuinfo`): where it runs while the domain does.
    fn domain_vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        let info = self.domain_info(name)?;
        let cpus = self.node_info()?.cpus;
        Ok((0..info.vcpus)
            .map(|number| VcpuInfo {
                number,
                cpu: None,
                state: info.state.is_active().then(|| "running".to_string()),
                cpu_time_ns: None,
                affinity: "y".repeat(cpus as usize),
            })
            .collect())
    }

    /// What the guest agent in the running domain reports (libvirt's
    /// `virDomainGetGuestInfo`, `virsh guestinfo`). `AgentUnresponsive`
    /// when no agent answers; `Unsupported` when the driver gives guests no
    /// agent channel.
    fn guest_info(&self, name: &str) -> Result<vireo_crds::GuestInfo> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "a guest agent"))
    }

    /// Freezes the guest's filesystems through its agent (all of them, or
    /// the mount points given); returns how many (`virsh domfsfreeze`).
    fn guest_fs_freeze(&self, name: &str, _mountpoints: &[String]) -> Result<u64> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "a guest agent"))
    }

    /// Thaws what a freeze froze; returns how many (`virsh domfsthaw`).
    fn guest_fs_thaw(&self, name: &str) -> Result<u64> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "a guest agent"))
    }

    /// Shuts the guest down (or reboots it) through its agent, for guests
    /// that ignore the ACPI power button (`shutdown --mode agent`).
    fn guest_agent_shutdown(&self, name: &str, _reboot: bool) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "a guest agent"))
    }

    /// Saves a running (or paused) domain's memory and device state to
    /// `path` on the node and stops it: shutoff, reason `saved` (libvirt's
    /// `virDomainSave`). A transient domain is gone until restored.
    fn save_domain(&self, name: &str, _path: &std::path::Path) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "saving a domain's state"))
    }

    /// Restores a domain saved to `path`: running, reason `restored` (or
    /// paused, if it was saved paused), where it was. A file that is not a
    /// save file of this driver, is damaged, or names a domain that
    /// differs (another UUID under that name) is refused and nothing
    /// changes.
    fn restore_domain(&self, path: &std::path::Path) -> Result<DomainRef> {
        Err(unsupported(
            self.name(),
            &path.display().to_string(),
            "restoring a saved domain",
        ))
    }

    /// Saves a persistent domain's state in the driver's own directory
    /// (libvirt's `virDomainManagedSave`): the next start resumes it.
    fn managed_save(&self, name: &str) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "managed save"))
    }

    /// Whether the domain has a managed save image.
    fn has_managed_save(&self, name: &str) -> Result<bool> {
        self.domain_state(name)?;
        Ok(false)
    }

    /// Removes the domain's managed save image (its next start boots).
    fn managed_save_remove(&self, name: &str) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "managed save"))
    }

    /// Takes a snapshot of the domain (libvirt's
    /// `virDomainSnapshotCreateXML`, `virsh snapshot-create-as`): its
    /// definition and disks, and its memory when it is active and
    /// `disk_only` is not asked. It becomes the current snapshot.
    fn snapshot_create(
        &self,
        name: &str,
        _params: &crate::snapshot::SnapshotParams,
    ) -> Result<crate::snapshot::SnapshotInfo> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "snapshots"))
    }

    /// The domain's snapshots, oldest first (`snapshot-list`).
    fn snapshot_list(&self, name: &str) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "snapshots"))
    }

    /// One snapshot (`snapshot-info`, `snapshot-dumpxml`).
    fn snapshot_get(&self, name: &str, snapshot: &str) -> Result<crate::snapshot::SnapshotInfo> {
        self.snapshot_list(name)?
            .into_iter()
            .find(|s| s.name == snapshot)
            .ok_or_else(|| Error::not_found(vireo_crds::ObjectKind::DomainSnapshot, snapshot))
    }

    /// The current snapshot, if there is one (`snapshot-current`).
    fn snapshot_current(&self, name: &str) -> Result<Option<crate::snapshot::SnapshotInfo>> {
        Ok(self.snapshot_list(name)?.into_iter().find(|s| s.current))
    }

    /// Returns the domain to a snapshot (`snapshot-revert`): its
    /// definition and disks, and its memory for a full snapshot; it ends
    /// as `to` says, reason `from snapshot`. The snapshot becomes current.
    fn snapshot_revert(
        &self,
        name: &str,
        _snapshot: &str,
        _to: crate::snapshot::RevertTo,
    ) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "snapshots"))
    }

    /// Deletes a snapshot and what it holds; the domain is untouched
    /// (`snapshot-delete`). Its children become its parent's.
    fn snapshot_delete(&self, name: &str, _snapshot: &str) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "snapshots"))
    }

    /// Migration, target side, step 1 (libvirt's Prepare): defines `domain`
    /// on this node and starts it waiting for the incoming state (not
    /// running: paused, reason `migration`), listening on
    /// `params.target_address`; returns where the source sends it.
    fn migrate_prepare(
        &self,
        domain: &Domain,
        _params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationIncoming> {
        let name = domain.metadata.name.clone().unwrap_or_default();
        Err(unsupported(self.name(), &name, "live migration"))
    }

    /// Migration, source side (Perform): sends the running domain's state
    /// (and, with `copy_storage`, its node-local disks' data) to
    /// `incoming`; returns once the source is paused with everything sent.
    /// On an error the source is left as it was (running, if it ran).
    fn migrate_perform(
        &self,
        name: &str,
        _incoming: &crate::migration::MigrationIncoming,
        _params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationStats> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "live migration"))
    }

    /// Migration, target side, last step (Finish): with `succeeded`, resumes
    /// the guest here (running, reason `migrated`); otherwise stops and
    /// removes what prepare made.
    fn migrate_finish(&self, name: &str, _succeeded: bool) -> Result<Option<DomainRef>> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "live migration"))
    }

    /// Migration, source side, last step (Confirm): with `succeeded`, stops
    /// and undefines the source's copy; otherwise resumes it.
    fn migrate_confirm(&self, name: &str, _succeeded: bool) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "live migration"))
    }

    /// Aborts the domain's running job (libvirt's `virDomainAbortJob`,
    /// `virsh domjobabort`): a migration's send, which then fails and
    /// leaves the guest running where it was. Asked from any process; the
    /// one running the job stops at its next poll.
    fn abort_job(&self, name: &str) -> Result<()> {
        self.domain_state(name)?;
        Err(unsupported(self.name(), name, "job abort"))
    }

    /// Why a running domain's firmware found nothing to boot, when its
    /// console says so (a blank disk, a wrong boot order); `None` while it
    /// boots or for drivers without firmware.
    fn boot_problem(&self, _name: &str) -> Result<Option<String>> {
        Ok(None)
    }
}
