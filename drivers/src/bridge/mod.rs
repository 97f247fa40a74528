//! libvirt's bridge network driver for Linux: each active Network is a
//! bridge on this node, with the network's address on it, nftables rules
//! for its forward mode and a dnsmasq for DHCP and DNS.
//!
//! | forward mode | bridge | address | nftables (`table ip vireo_NAME`) | dnsmasq |
//! |---|---|---|---|---|
//! | `nat` | created | `spec.ip` | masquerade of the subnet; only replies come in | with `spec.ip` |
//! | `route` | created | `spec.ip` | forward to and from the subnet | with `spec.ip` |
//! | `isolated` | created | `spec.ip` | no forwarding at all | with `spec.ip` |
//! | `bridge` | `spec.bridge`, which must exist | none | none | none |
//!
//! The defined/active/transient rules are libvirt's, the same as the test
//! driver's networks (`crate::test`); the state is kept on disk
//! ([`store`]), so a driver opened again on the same directory (a
//! restarted agent, the CLI beside it) sees the same networks, and finds
//! what each active network set up. Start and destroy are idempotent: a
//! start first clears whatever a failed or interrupted start left, and
//! destroy removes the bridge (only one we created, recognised by its
//! alias `vireo-network:UUID`, or by the pending mark in the network's run
//! directory when a start was stopped between making the bridge and
//! giving it its alias), the table and the dnsmasq.
//!
//! Guests join a network through [`tap`] devices on its bridge; their
//! addresses are read from dnsmasq's leases ([`BridgeDriver::dhcp_leases`],
//! [`BridgeDriver::lease_for_mac`]). Details: `docs/network.md`.

pub mod dnsmasq;
pub mod netlink;
pub mod nft;
pub mod plan;
pub mod store;
pub mod tap;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vireo_crds::{ForwardMode, Network, ObjectKind, Validate};

pub use dnsmasq::Lease;
use plan::Plan;
use store::{Live, Locked, Record, Store};

use crate::error::ObjectName;
use crate::network::{NetworkDriver, NetworkInfo, NetworkRef};
use crate::{Error, ListFilter, Lookup, Result};

const KIND: ObjectKind = ObjectKind::Network;

/// A program on PATH, or in the sbin directories where Debian installs
/// `nft` and `dnsmasq` (not on every user's PATH).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// FNV-1a, for short stable names.
pub(crate) fn short_hash(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The alias that marks a bridge as this network's.
fn bridge_alias(uuid: &str) -> String {
    format!("vireo-network:{uuid}")
}

fn failed(name: &str, message: impl Into<String>) -> Error {
    Error::OperationFailed {
        object: ObjectName::new(KIND, name),
        message: message.into(),
    }
}

fn io_failed(name: &str, what: &str, e: impl std::fmt::Display) -> Error {
    failed(name, format!("{what}: {e}"))
}

/// The network driver for Linux bridges; see the module docs.
pub struct BridgeDriver {
    store: Store,
    /// Serializes this process's threads (the store's flock is per process).
    mutex: Mutex<()>,
}

impl BridgeDriver {
    /// Opens the driver on its state directory (created if missing), and
    /// brings active networks up to date: a network whose bridge is gone
    /// (the node rebooted) is inactive, a dnsmasq that died is started
    /// again and the tables are written again.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let store = Store::open(state_dir)
            .map_err(|e| io_failed("", &format!("opening {}", state_dir.display()), e))?;
        let driver = Self {
            store,
            mutex: Mutex::new(()),
        };
        driver.recover()?;
        Ok(driver)
    }

    fn locked<T>(&self, f: impl FnOnce(&Locked<'_>) -> Result<T>) -> Result<T> {
        let _guard = self.mutex.lock().unwrap_or_else(|p| p.into_inner());
        let lock = self
            .store
            .lock()
            .map_err(|e| io_failed("", "locking the network state", e))?;
        f(&lock)
    }

    fn get(l: &Locked<'_>, name: &str) -> Result<Record> {
        l.get(name)
            .map_err(|e| io_failed(name, "reading the network record", e))?
            .ok_or_else(|| Error::not_found(KIND, name))
    }

    fn all(l: &Locked<'_>) -> Result<Vec<Record>> {
        l.all()
            .map_err(|e| io_failed("", "listing network records", e))
    }

    fn save(l: &Locked<'_>, rec: &Record) -> Result<()> {
        l.put(rec)
            .map_err(|e| io_failed(&rec.name, "saving the network record", e))
    }

    fn files(&self, name: &str) -> dnsmasq::Files {
        dnsmasq::Files::new(&self.store.run_dir(name))
    }

    /// See [`BridgeDriver::open`].
    fn recover(&self) -> Result<()> {
        self.locked(|l| {
            for mut rec in Self::all(l)?.into_iter().filter(|r| r.active) {
                let Some(live) = rec.live.clone() else {
                    continue;
                };
                let bridge_there = match netlink::link(&live.bridge) {
                    Ok(link) => link.is_some_and(|link| netlink::is_bridge(&link)),
                    Err(e) => {
                        // Unknown is not gone: leave the record as it is.
                        tracing::warn!(network = %rec.name, error = %e, "cannot look up the bridge");
                        continue;
                    }
                };
                if !bridge_there {
                    tracing::warn!(network = %rec.name, bridge = %live.bridge, "the bridge is gone: the network is inactive");
                    let _ = self.teardown(&rec.name, &rec.uuid, &live);
                    self.deactivate(l, &mut rec)?;
                    continue;
                }
                reattach_taps(&rec.name, &live.bridge);
                let plan = match plan::plan(&rec.def) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(network = %rec.name, error = %e, "cannot check an active network");
                        continue;
                    }
                };
                if let (Some(table), Some(rules)) = (
                    &live.table,
                    live.table.as_deref().and_then(|t| nft::ruleset(t, &plan)),
                ) && !nft::exists(table)
                    && let Err(e) = nft::apply(&rules)
                {
                    tracing::warn!(network = %rec.name, error = %e, "writing the nftables table again failed");
                }
                let files = self.files(&rec.name);
                if live.dnsmasq
                    && dnsmasq::running(&files).is_none()
                    && let Some(conf) = dnsmasq::config(&rec.name, &plan, &files)
                {
                    match dnsmasq::start(&files, &conf) {
                        Ok(pid) => {
                            tracing::info!(network = %rec.name, pid, "dnsmasq started again")
                        }
                        Err(e) => {
                            tracing::warn!(network = %rec.name, error = %e, "starting dnsmasq again failed")
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// Validates, fixes the UUID and the bridge name (`vireoN` when absent).
    fn prepare(&self, l: &Locked<'_>, network: &Network) -> Result<(String, Network)> {
        let name = network
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid_argument(KIND, "", "metadata.name is required"))?;
        if !store::valid_name(&name) {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                "metadata.name: only letters, digits, '-', '.' and '_' (not '.' first), at most 253",
            ));
        }
        network
            .spec
            .validate()
            .map_err(|e| Error::invalid_argument(KIND, &name, e.to_string()))?;
        let all = Self::all(l)?;
        let existing = all.iter().find(|r| r.name == name);
        let uuid = match (&network.spec.uuid, existing) {
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
        let mut def = network.clone();
        def.spec.uuid = Some(uuid);
        def.status = None;
        let bridges_of = |r: &Record| {
            [Some(&r.def), r.new_def.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|d| d.spec.bridge.clone())
                .collect::<Vec<_>>()
        };
        let bridge = match (&def.spec.bridge, existing) {
            (Some(b), _) => b.clone(),
            (None, Some(rec)) => match rec.def.spec.bridge.clone() {
                Some(b) => b,
                None => free_bridge_name(&all)?,
            },
            (None, None) => free_bridge_name(&all)?,
        };
        // Several bridge-mode networks may share a host bridge; a bridge
        // Vireo creates belongs to one network.
        if def.spec.forward_mode != ForwardMode::Bridge
            && let Some(other) = all
                .iter()
                .find(|r| r.name != name && bridges_of(r).contains(&bridge))
        {
            return Err(Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "spec.bridge: bridge '{bridge}' is already used by network '{}'",
                    other.name
                ),
            ));
        }
        def.spec.bridge = Some(bridge);
        plan::plan(&def).map_err(|e| Error::invalid_argument(KIND, &name, e))?;
        Ok((name, def))
    }

    fn define_locked(&self, l: &Locked<'_>, network: &Network) -> Result<NetworkRef> {
        let (name, def) = self.prepare(l, network)?;
        if let Some(mut rec) = l
            .get(&name)
            .map_err(|e| io_failed(&name, "reading the network record", e))?
        {
            if rec.active {
                rec.new_def = Some(def);
            } else {
                rec.def = def;
            }
            rec.persistent = true;
            Self::save(l, &rec)?;
            return Ok(reference(&rec));
        }
        let rec = Record {
            name: name.clone(),
            uuid: def.spec.uuid.clone().unwrap_or_default(),
            autostart: def.spec.autostart,
            def,
            new_def: None,
            persistent: true,
            active: false,
            live: None,
        };
        Self::save(l, &rec)?;
        Ok(reference(&rec))
    }

    /// Makes `rec.def` real, saves the record active.
    fn activate(&self, l: &Locked<'_>, rec: &mut Record) -> Result<()> {
        if rec.active {
            return Err(Error::invalid_state(KIND, &rec.name, "is already active"));
        }
        let plan = plan::plan(&rec.def).map_err(|e| Error::invalid_argument(KIND, &rec.name, e))?;
        if let Some(subnet) = plan.subnet {
            for other in Self::all(l)?
                .iter()
                .filter(|r| r.active && r.name != rec.name)
            {
                if let Ok(Plan {
                    subnet: Some(theirs),
                    ..
                }) = plan::plan(&other.def)
                    && subnet.overlaps(&theirs)
                {
                    return Err(Error::invalid_argument(
                        KIND,
                        &rec.name,
                        format!(
                            "spec.ip: {} overlaps {} of active network '{}'",
                            subnet.cidr(),
                            theirs.cidr(),
                            other.name
                        ),
                    ));
                }
            }
        }
        let live = self
            .realize(&rec.name, &rec.uuid, &plan)
            .map_err(|e| failed(&rec.name, e))?;
        tracing::info!(network = %rec.name, bridge = %live.bridge, mode = %plan.mode, "network started");
        reattach_taps(&rec.name, &live.bridge);
        rec.active = true;
        rec.live = Some(live);
        Self::save(l, rec)
    }

    /// Sets the network up; on failure takes down what it set up.
    fn realize(&self, name: &str, uuid: &str, plan: &Plan) -> std::result::Result<Live, String> {
        let mut live = Live {
            bridge: plan.bridge.clone(),
            created_bridge: false,
            table: None,
            dnsmasq: false,
        };
        if plan.mode == ForwardMode::Bridge {
            let link = netlink::link(&plan.bridge)
                .map_err(|e| format!("looking up bridge {}: {e}", plan.bridge))?;
            return match link {
                Some(l) if netlink::is_bridge(&l) => Ok(live),
                Some(_) => Err(format!(
                    "spec.bridge: '{}' exists on this node but is not a bridge",
                    plan.bridge
                )),
                None => Err(format!(
                    "spec.bridge: bridge '{}' does not exist on this node (bridge mode attaches to an existing bridge)",
                    plan.bridge
                )),
            };
        }
        // Clear what an interrupted start or a crash may have left.
        let leftovers = Live {
            bridge: plan.bridge.clone(),
            created_bridge: true,
            table: Some(nft::table_name(name)),
            dnsmasq: true,
        };
        self.teardown(name, uuid, &leftovers)?;
        let result = self.setup(name, uuid, plan, &mut live);
        if let Err(e) = result {
            if let Err(more) = self.teardown(name, uuid, &live) {
                tracing::warn!(network = %name, error = %more, "cleaning up after a failed start");
            }
            return Err(e);
        }
        Ok(live)
    }

    fn setup(
        &self,
        name: &str,
        uuid: &str,
        plan: &Plan,
        live: &mut Live,
    ) -> std::result::Result<(), String> {
        let br = &plan.bridge;
        let index = match netlink::link(br).map_err(|e| format!("looking up {br}: {e}"))? {
            Some(_) => {
                return Err(format!(
                    "spec.bridge: interface '{br}' already exists on this node and is not this network's"
                ));
            }
            None => {
                // Creating a bridge and giving it its alias are two netlink
                // requests: a process killed between them leaves a bridge
                // no alias marks as ours. The pending mark, written first,
                // marks it until it has its alias (see `teardown`).
                let pending = self.pending_bridge_file(name);
                let dir = self.store.run_dir(name);
                std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(&pending, br))
                    .map_err(|e| format!("{}: {e}", pending.display()))?;
                live.created_bridge = true;
                let index = netlink::create_bridge(br, &bridge_alias(uuid))
                    .map_err(|e| format!("creating bridge {br}: {e}"))?;
                let _ = std::fs::remove_file(&pending);
                index
            }
        };
        if let Some(subnet) = plan.subnet {
            netlink::add_ipv4(index, subnet.gateway, subnet.prefix)
                .map_err(|e| format!("adding {}/{} to {br}: {e}", subnet.gateway, subnet.prefix))?;
            if matches!(plan.mode, ForwardMode::Nat | ForwardMode::Route) {
                enable_forwarding()?;
            }
        }
        let table = nft::table_name(name);
        if let Some(rules) = nft::ruleset(&table, plan) {
            live.table = Some(table);
            nft::apply(&rules)?;
        }
        let dir = self.store.run_dir(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let files = self.files(name);
        if let Some(conf) = dnsmasq::config(name, plan, &files) {
            live.dnsmasq = true;
            let pid = dnsmasq::start(&files, &conf)?;
            tracing::debug!(network = %name, pid, "dnsmasq started");
        }
        Ok(())
    }

    /// Takes down what `live` says was set up; what is already gone is
    /// fine. Every step is tried; the first failure is returned.
    fn teardown(&self, name: &str, uuid: &str, live: &Live) -> std::result::Result<(), String> {
        let mut first: Option<String> = None;
        let mut note = |r: std::result::Result<(), String>| {
            if let Err(e) = r
                && first.is_none()
            {
                first = Some(e);
            }
        };
        if live.dnsmasq {
            let files = self.files(name);
            note(dnsmasq::stop(&files));
            for p in [&files.conf, &files.pid, &files.log] {
                let _ = std::fs::remove_file(p);
            }
        }
        if let Some(table) = &live.table {
            note(nft::remove(table));
        }
        if live.created_bridge {
            let pending = self.pending_bridge_file(name);
            let unmarked_is_ours =
                std::fs::read_to_string(&pending).is_ok_and(|b| b.trim() == live.bridge);
            let deleted = delete_our_bridge(&live.bridge, uuid, unmarked_is_ours);
            if deleted.is_ok() {
                let _ = std::fs::remove_file(&pending);
            }
            note(deleted);
        }
        first.map_or(Ok(()), Err)
    }

    /// Names the bridge this driver is creating for network `name`, from
    /// just before the bridge is made until it carries its alias.
    fn pending_bridge_file(&self, name: &str) -> PathBuf {
        self.store.run_dir(name).join("bridge-pending")
    }

    /// Marks the record inactive (a transient one disappears).
    fn deactivate(&self, l: &Locked<'_>, rec: &mut Record) -> Result<()> {
        rec.active = false;
        rec.live = None;
        if let Some(next) = rec.new_def.take() {
            rec.def = next;
        }
        if rec.persistent {
            Self::save(l, rec)
        } else {
            let _ = std::fs::remove_dir_all(self.store.run_dir(&rec.name));
            l.remove(&rec.name)
                .map_err(|e| io_failed(&rec.name, "removing the network record", e))
        }
    }

    /// Starts every persistent network marked autostart that is not active
    /// (libvirt does this when its daemon starts). Returns the names that
    /// failed, with why; the others are started.
    pub fn autostart_all(&self) -> Result<Vec<(String, Error)>> {
        let names: Vec<String> = self.locked(|l| {
            Ok(Self::all(l)?
                .into_iter()
                .filter(|r| r.persistent && r.autostart && !r.active)
                .map(|r| r.name)
                .collect())
        })?;
        let mut failed = Vec::new();
        for name in names {
            match self.start_network(&name) {
                Ok(()) => {}
                // Started meanwhile by another process: fine.
                Err(Error::InvalidState { .. }) => {}
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "autostart failed");
                    failed.push((name, e));
                }
            }
        }
        Ok(failed)
    }

    /// The unexpired DHCP leases of an active network (`net-dhcp-leases`).
    pub fn dhcp_leases(&self, name: &str) -> Result<Vec<Lease>> {
        self.locked(|l| {
            let rec = Self::get(l, name)?;
            if !rec.active {
                return Err(Error::invalid_state(KIND, name, "is not active"));
            }
            Ok(self.leases_of(&rec))
        })
    }

    fn leases_of(&self, rec: &Record) -> Vec<Lease> {
        let prefix = plan::plan(&rec.def)
            .ok()
            .and_then(|p| p.subnet)
            .map_or(0, |s| s.prefix);
        dnsmasq::leases(&self.files(&rec.name), prefix)
    }

    /// The lease of a MAC on any active network (`domifaddr`): the
    /// network's name and the lease.
    pub fn lease_for_mac(&self, mac: &str) -> Result<Option<(String, Lease)>> {
        let mac = mac.to_ascii_lowercase();
        self.locked(|l| {
            for rec in Self::all(l)?.iter().filter(|r| r.active) {
                if let Some(lease) = self
                    .leases_of(rec)
                    .into_iter()
                    .filter(|x| x.mac == mac)
                    .max_by_key(|x| if x.expiry == 0 { u64::MAX } else { x.expiry })
                {
                    return Ok(Some((rec.name.clone(), lease)));
                }
            }
            Ok(None)
        })
    }

    /// The bridge of an active network, for attaching a guest's tap.
    pub fn active_bridge(&self, name: &str) -> Result<String> {
        self.locked(|l| {
            let rec = Self::get(l, name)?;
            match (&rec.live, rec.active) {
                (Some(live), true) => Ok(live.bridge.clone()),
                _ => Err(Error::invalid_state(KIND, name, "is not active")),
            }
        })
    }
}

/// Puts the running guests' taps of network `name` that lost their bridge
/// back on `bridge` ([`tap::reattach`]). A failure is logged: the network
/// is up, and only those guests stay cut off, as they were.
fn reattach_taps(name: &str, bridge: &str) {
    match tap::reattach(name, bridge) {
        Ok(back) if back.is_empty() => {}
        Ok(back) => {
            tracing::info!(network = %name, %bridge, taps = ?back, "guests' taps put back on the bridge")
        }
        Err(e) => {
            tracing::warn!(network = %name, %bridge, error = %e, "putting guests' taps back on the bridge failed")
        }
    }
}

/// `vireoN`, the first N no network uses and no link on this node has.
fn free_bridge_name(all: &[Record]) -> Result<String> {
    let used: Vec<String> = all
        .iter()
        .flat_map(|r| [Some(&r.def), r.new_def.as_ref()])
        .flatten()
        .filter_map(|d| d.spec.bridge.clone())
        .collect();
    for n in 0..10_000u32 {
        let candidate = format!("vireo{n}");
        if used.contains(&candidate) {
            continue;
        }
        match netlink::link(&candidate) {
            Ok(None) => return Ok(candidate),
            Ok(Some(_)) => continue,
            Err(e) => return Err(io_failed("", "looking up links", e)),
        }
    }
    Err(failed("", "no free bridge name vireo0..vireo9999"))
}

/// Deletes the bridge if it is there and is ours: it has our alias, or it
/// has none and `unmarked_is_ours` (the pending mark names it: we created
/// it and were stopped before giving it its alias).
fn delete_our_bridge(
    bridge: &str,
    uuid: &str,
    unmarked_is_ours: bool,
) -> std::result::Result<(), String> {
    match netlink::link(bridge).map_err(|e| format!("looking up {bridge}: {e}"))? {
        None => Ok(()),
        Some(link)
            if netlink::is_bridge(&link)
                && (link.alias.as_deref() == Some(&bridge_alias(uuid))
                    || (unmarked_is_ours && link.alias.as_deref().is_none_or(str::is_empty))) =>
        {
            netlink::delete(bridge).map_err(|e| format!("deleting bridge {bridge}: {e}"))
        }
        Some(_) => Ok(()),
    }
}

/// IPv4 forwarding on (`net.ipv4.ip_forward`, of this network namespace),
/// as libvirt does for nat and route networks. It is never turned off.
fn enable_forwarding() -> std::result::Result<(), String> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|e| format!("enabling IPv4 forwarding ({path}): {e}"))
}

fn reference(rec: &Record) -> NetworkRef {
    NetworkRef {
        name: rec.name.clone(),
        uuid: rec.uuid.clone(),
    }
}

fn object_name(n: &Network) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

impl NetworkDriver for BridgeDriver {
    fn dhcp_leases(&self, name: &str) -> Result<Vec<Lease>> {
        BridgeDriver::dhcp_leases(self, name)
    }
    fn list_networks(&self, filter: ListFilter) -> Result<Vec<NetworkRef>> {
        self.locked(|l| {
            Ok(Self::all(l)?
                .iter()
                .filter(|r| filter.accepts(r.active))
                .map(reference)
                .collect())
        })
    }

    fn lookup_network(&self, key: Lookup<'_>) -> Result<NetworkRef> {
        self.locked(|l| {
            let found = match key {
                Lookup::Name(n) => l
                    .get(n)
                    .map_err(|e| io_failed(n, "reading the network record", e))?,
                Lookup::Uuid(u) => {
                    let u = u.to_string();
                    Self::all(l)?.into_iter().find(|r| r.uuid == u)
                }
                Lookup::Id(_) => None,
            };
            found
                .as_ref()
                .map(reference)
                .ok_or_else(|| Error::not_found(KIND, key.describe()))
        })
    }

    fn network_definition(&self, name: &str, inactive: bool) -> Result<Network> {
        self.locked(|l| {
            let rec = Self::get(l, name)?;
            Ok(match (rec.new_def, inactive) {
                (Some(next), true) => next,
                _ => rec.def,
            })
        })
    }

    fn network_info(&self, name: &str) -> Result<NetworkInfo> {
        self.locked(|l| {
            let rec = Self::get(l, name)?;
            Ok(NetworkInfo {
                name: rec.name.clone(),
                uuid: rec.uuid.clone(),
                active: rec.active,
                persistent: rec.persistent,
                autostart: rec.autostart,
                bridge: rec.def.spec.bridge.clone(),
            })
        })
    }

    fn define_network(&self, network: &Network) -> Result<NetworkRef> {
        self.locked(|l| self.define_locked(l, network))
    }

    fn create_network(&self, network: &Network) -> Result<NetworkRef> {
        let name = object_name(network);
        self.locked(|l| {
            let (name, def) = self.prepare(l, network)?;
            let existing = l
                .get(&name)
                .map_err(|e| io_failed(&name, "reading the network record", e))?;
            let mut rec = match existing {
                Some(rec) if rec.active => {
                    return Err(Error::invalid_state(KIND, &name, "is already active"));
                }
                Some(mut rec) => {
                    let persistent = std::mem::replace(&mut rec.def, def);
                    rec.new_def = Some(persistent);
                    rec
                }
                None => Record {
                    name: name.clone(),
                    uuid: def.spec.uuid.clone().unwrap_or_default(),
                    autostart: false,
                    def,
                    new_def: None,
                    persistent: false,
                    active: false,
                    live: None,
                },
            };
            self.activate(l, &mut rec)?;
            Ok(reference(&rec))
        })
        .map_err(|e| {
            tracing::debug!(network = %name, error = %e, "create failed");
            e
        })
    }

    fn undefine_network(&self, name: &str) -> Result<()> {
        self.locked(|l| {
            let mut rec = Self::get(l, name)?;
            if !rec.persistent {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: there is no definition to undefine",
                ));
            }
            if rec.active {
                rec.persistent = false;
                rec.autostart = false;
                rec.new_def = None;
                Self::save(l, &rec)
            } else {
                let _ = std::fs::remove_dir_all(self.store.run_dir(name));
                l.remove(name)
                    .map_err(|e| io_failed(name, "removing the network record", e))
            }
        })
    }

    fn start_network(&self, name: &str) -> Result<()> {
        self.locked(|l| {
            let mut rec = Self::get(l, name)?;
            self.activate(l, &mut rec)
        })
    }

    fn destroy_network(&self, name: &str) -> Result<()> {
        self.locked(|l| {
            let mut rec = Self::get(l, name)?;
            if !rec.active {
                return Err(Error::invalid_state(KIND, name, "is not active"));
            }
            if let Some(live) = &rec.live {
                self.teardown(name, &rec.uuid, live)
                    .map_err(|e| failed(name, e))?;
            }
            tracing::info!(network = %name, "network stopped");
            self.deactivate(l, &mut rec)
        })
    }

    fn set_network_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.locked(|l| {
            let mut rec = Self::get(l, name)?;
            if !rec.persistent {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    "is transient: autostart needs a persistent network",
                ));
            }
            rec.autostart = autostart;
            Self::save(l, &rec)
        })
    }
}
