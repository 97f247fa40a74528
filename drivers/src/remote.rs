//! `vireo+unix:///PATH`: a connection to a node agent's local API, a unix
//! socket the standalone agent serves (libvirt's `qemu+unix://` to
//! libvirtd, in spirit). The client implements the three driver traits by
//! sending each call over the socket; the agent answers with its own
//! drivers, so the CLI and the agent see one node.
//!
//! The protocol is JSON lines: a [`Call`] per line, answered by one line,
//! `{"ok": VALUE}` or `{"err": ERROR}`. Volume uploads carry their bytes
//! after the call line (the length is in the call); downloads stream theirs
//! before the reply line, in chunks (a 4-byte big-endian length, then the
//! bytes; an empty chunk ends them), so nothing is staged on either side.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vireo_crds::{
    Domain, DomainInfo, DomainReason, DomainState, Network, NodeInfo, ObjectKind, StoragePool,
    StorageVol,
};

use crate::error::ObjectName;
use crate::hypervisor::{Affect, BlockInfo, DomainRef, HypervisorDriver, VcpuInfo};
use crate::network::{NetworkDriver, NetworkInfo, NetworkRef};
use crate::storage::{PoolInfo, PoolRef, Progress, ResizeFlags, StorageDriver, VolInfo, VolRef};
use crate::{Connection, Error, ListFilter, Lookup, Result};

/// A lookup key on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Key {
    Name(String),
    Uuid(uuid::Uuid),
    Id(u32),
}

impl Key {
    fn of(l: Lookup<'_>) -> Self {
        match l {
            Lookup::Name(n) => Self::Name(n.to_string()),
            Lookup::Uuid(u) => Self::Uuid(u),
            Lookup::Id(i) => Self::Id(i),
        }
    }
    fn lookup(&self) -> Lookup<'_> {
        match self {
            Self::Name(n) => Lookup::Name(n),
            Self::Uuid(u) => Lookup::Uuid(*u),
            Self::Id(i) => Lookup::Id(*i),
        }
    }
}

/// One call of the driver traits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", content = "args", rename_all = "camelCase")]
pub enum Call {
    HypervisorVersion,
    NodeInfo,
    Hostname,
    ListDomains(ListFilter),
    LookupDomain(Key),
    DomainDefinition(String, bool),
    DomainInfo(String),
    DomainState(String),
    DomainIsPersistent(String),
    DomainAutostart(String),
    SetDomainAutostart(String, bool),
    SetDomainMemory(String, u64),
    SetDomainVcpus(String, u32),
    DefineDomain(Box<Domain>),
    CreateDomain(Box<Domain>),
    UndefineDomain(String),
    StartDomain(String),
    ShutdownDomain(String),
    RebootDomain(String),
    ResetDomain(String),
    SuspendDomain(String),
    ResumeDomain(String),
    DestroyDomain(String),
    ConsolePath(String),
    SetDomainMemoryFlags(String, u64, Affect),
    SetDomainVcpusFlags(String, u32, Affect),
    SetDomainAnnotation(String, String, Option<String>, Affect),
    DomainOsType(String),
    SecurityModel,
    DomainSecurityLabel(String),
    CellsFreeMemory,
    NodeFreeMemory,
    DomainScheduler(String),
    Sysinfo,
    Capabilities,
    DomainInterfaceAddresses(String),
    GuestInfo(String),
    GuestFsFreeze(String, Vec<String>),
    GuestFsThaw(String),
    GuestAgentShutdown(String, bool),
    DomainBlockInfo(String, String),
    DomainBlockStats(String, String),
    DomainInterfaceStats(String, String),
    DomainMemoryStats(String),
    DomainVcpuInfo(String),
    SaveDomain(String, PathBuf),
    RestoreDomain(PathBuf),
    ManagedSave(String),
    HasManagedSave(String),
    ManagedSaveRemove(String),
    SnapshotCreate(String, crate::snapshot::SnapshotParams),
    SnapshotList(String),
    SnapshotGet(String, String),
    SnapshotCurrent(String),
    SnapshotRevert(String, String, crate::snapshot::RevertTo),
    SnapshotDelete(String, String),
    ListNetworks(ListFilter),
    LookupNetwork(Key),
    NetworkDefinition(String, bool),
    NetworkInfo(String),
    DefineNetwork(Box<Network>),
    CreateNetwork(Box<Network>),
    UndefineNetwork(String),
    StartNetwork(String),
    DestroyNetwork(String),
    SetNetworkAutostart(String, bool),
    DhcpLeases(String),
    ListPools(ListFilter),
    LookupPool(Key),
    PoolDefinition(String),
    PoolInfo(String),
    DefinePool(Box<StoragePool>),
    CreatePool(Box<StoragePool>),
    BuildPool(String),
    StartPool(String),
    DestroyPool(String),
    DeletePool(String),
    UndefinePool(String),
    RefreshPool(String),
    SetPoolAutostart(String, bool),
    ListVolumes(String),
    LookupVolume(String, String),
    LookupVolumeByKey(String),
    LookupVolumeByPath(String),
    VolumeInfo(String, String),
    CreateVolume(Box<StorageVol>),
    ResizeVolume(String, String, u64, ResizeFlags),
    WipeVolume(String, String),
    DeleteVolume(String, String),
    /// Followed by exactly `length` raw bytes.
    UploadVolume(String, String, u64),
    /// Answered by the length, then that many raw bytes.
    DownloadVolume(String, String),
}

/// A driver error on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "camelCase")]
pub enum WireError {
    NotFound {
        kind: String,
        name: String,
    },
    InvalidState {
        kind: String,
        name: String,
        message: String,
    },
    InvalidArgument {
        kind: String,
        name: String,
        message: String,
    },
    AlreadyExists {
        kind: String,
        name: String,
        detail: String,
    },
    NoSpace {
        kind: String,
        name: String,
        message: String,
    },
    OperationFailed {
        kind: String,
        name: String,
        message: String,
    },
    Connect {
        uri: String,
        message: String,
    },
    AgentUnresponsive {
        kind: String,
        name: String,
        message: String,
    },
}

fn kind_of(text: &str) -> ObjectKind {
    match text {
        "Network" => ObjectKind::Network,
        "StoragePool" => ObjectKind::StoragePool,
        "StorageVol" => ObjectKind::StorageVol,
        "Host" => ObjectKind::Host,
        "DomainSnapshot" => ObjectKind::DomainSnapshot,
        _ => ObjectKind::Domain,
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        let (kind, name) = e
            .object()
            .map(|o| (o.kind.kind().to_string(), o.name.clone()))
            .unwrap_or_default();
        match e {
            Error::NotFound(_) => Self::NotFound { kind, name },
            Error::InvalidState { message, .. } => Self::InvalidState {
                kind,
                name,
                message: message.clone(),
            },
            Error::InvalidArgument { message, .. } => Self::InvalidArgument {
                kind,
                name,
                message: message.clone(),
            },
            Error::AlreadyExists { detail, .. } => Self::AlreadyExists {
                kind,
                name,
                detail: detail.clone(),
            },
            Error::NoSpace { message, .. } => Self::NoSpace {
                kind,
                name,
                message: message.clone(),
            },
            // The driver's name and operation are static strings on our
            // side; across the socket they travel as the message.
            Error::Unsupported {
                driver, operation, ..
            } => Self::OperationFailed {
                kind,
                name,
                message: format!("not supported by the {driver} driver: {operation}"),
            },
            Error::OperationFailed { message, .. } => Self::OperationFailed {
                kind,
                name,
                message: message.clone(),
            },
            Error::Forbidden { message, .. } => Self::OperationFailed {
                kind,
                name,
                message: format!("forbidden: {message}"),
            },
            Error::Connect { uri, message } => Self::Connect {
                uri: uri.clone(),
                message: message.clone(),
            },
            Error::AgentUnresponsive { message, .. } => Self::AgentUnresponsive {
                kind,
                name,
                message: message.clone(),
            },
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        let obj = |kind: &str, name: String| ObjectName::new(kind_of(kind), name);
        match e {
            WireError::NotFound { kind, name } => Error::NotFound(obj(&kind, name)),
            WireError::InvalidState {
                kind,
                name,
                message,
            } => Error::InvalidState {
                object: obj(&kind, name),
                message,
            },
            WireError::InvalidArgument {
                kind,
                name,
                message,
            } => Error::InvalidArgument {
                object: obj(&kind, name),
                message,
            },
            WireError::AlreadyExists { kind, name, detail } => Error::AlreadyExists {
                object: obj(&kind, name),
                detail,
            },
            WireError::NoSpace {
                kind,
                name,
                message,
            } => Error::NoSpace {
                object: obj(&kind, name),
                message,
            },
            WireError::OperationFailed {
                kind,
                name,
                message,
            } => Error::OperationFailed {
                object: obj(&kind, name),
                message,
            },
            WireError::Connect { uri, message } => Error::Connect { uri, message },
            WireError::AgentUnresponsive {
                kind,
                name,
                message,
            } => Error::AgentUnresponsive {
                object: obj(&kind, name),
                message,
            },
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Reply {
    Ok(Value),
    Err(WireError),
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// Reads what the agent sends before its reply line (a download's chunks).
type BeforeReply<'a> = &'a mut dyn FnMut(&mut BufReader<UnixStream>) -> Result<()>;

/// A connection to an agent's socket. Calls are sent one at a time.
pub struct Remote {
    uri: String,
    socket: PathBuf,
    stream: Mutex<Option<(BufReader<UnixStream>, UnixStream)>>,
}

impl Remote {
    fn fail(&self, message: impl Into<String>) -> Error {
        Error::Connect {
            uri: self.uri.clone(),
            message: message.into(),
        }
    }

    fn connect(&self) -> Result<(BufReader<UnixStream>, UnixStream)> {
        let s = UnixStream::connect(&self.socket).map_err(|e| {
            self.fail(format!(
                "cannot reach the agent's socket {}: {e} (is `vireo-agent --standalone` running?)",
                self.socket.display()
            ))
        })?;
        let r = s.try_clone().map_err(|e| self.fail(e.to_string()))?;
        Ok((BufReader::new(r), s))
    }

    /// Sends a call (and `body` after it), lets `before_reply` read what
    /// comes ahead of the reply, then reads the reply line.
    fn exchange<T: DeserializeOwned>(
        &self,
        call: &Call,
        body: Option<(&mut dyn Read, u64)>,
        before_reply: Option<BeforeReply<'_>>,
    ) -> Result<T> {
        let mut guard = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.connect()?);
        }
        let Some((reader, writer)) = guard.as_mut() else {
            return Err(self.fail("not connected"));
        };
        let result = (|| -> Result<T> {
            let mut line = serde_json::to_vec(call).map_err(|e| self.fail(e.to_string()))?;
            line.push(b'\n');
            writer
                .write_all(&line)
                .map_err(|e| self.fail(format!("send: {e}")))?;
            if let Some((src, len)) = body {
                let n = std::io::copy(&mut src.take(len), writer)
                    .map_err(|e| self.fail(format!("send: {e}")))?;
                if n != len {
                    return Err(self.fail(format!("the upload ended after {n} of {len} bytes")));
                }
            }
            if let Some(f) = before_reply {
                f(reader)?;
            }
            let mut answer = String::new();
            let n = reader
                .read_line(&mut answer)
                .map_err(|e| self.fail(format!("receive: {e}")))?;
            if n == 0 {
                return Err(self.fail("the agent closed the connection"));
            }
            let reply: Reply =
                serde_json::from_str(&answer).map_err(|e| self.fail(format!("bad reply: {e}")))?;
            let value = match reply {
                Reply::Ok(v) => v,
                Reply::Err(e) => return Err(e.into()),
            };
            serde_json::from_value(value).map_err(|e| self.fail(format!("bad reply: {e}")))
        })();
        if matches!(result, Err(Error::Connect { .. })) {
            // Start over on the next call.
            *guard = None;
        }
        result
    }

    fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T> {
        self.exchange(&call, None, None)
    }
}

/// Opens `vireo+unix:///PATH`.
pub fn open(uri: &str, path: &str) -> std::result::Result<Connection, String> {
    let socket = PathBuf::from(path);
    let remote = Arc::new(Remote {
        uri: uri.to_string(),
        socket,
        stream: Mutex::new(None),
    });
    // Fail now, with a clear message, when nothing listens.
    let first = remote.connect().map_err(|e| e.to_string())?;
    *remote.stream.lock().unwrap_or_else(|p| p.into_inner()) = Some(first);
    Ok(Connection::new(uri, remote.clone(), remote.clone(), remote))
}

impl HypervisorDriver for Remote {
    fn name(&self) -> &'static str {
        "vireo+unix"
    }
    fn hypervisor_version(&self) -> String {
        self.call(Call::HypervisorVersion).unwrap_or_default()
    }
    fn node_info(&self) -> Result<NodeInfo> {
        self.call(Call::NodeInfo)
    }
    fn hostname(&self) -> Result<String> {
        self.call(Call::Hostname)
    }
    fn list_domains(&self, filter: ListFilter) -> Result<Vec<DomainRef>> {
        self.call(Call::ListDomains(filter))
    }
    fn lookup_domain(&self, key: Lookup<'_>) -> Result<DomainRef> {
        self.call(Call::LookupDomain(Key::of(key)))
    }
    fn domain_definition(&self, name: &str, inactive: bool) -> Result<Domain> {
        self.call(Call::DomainDefinition(name.into(), inactive))
    }
    fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        self.call(Call::DomainInfo(name.into()))
    }
    fn domain_state(&self, name: &str) -> Result<(DomainState, DomainReason)> {
        self.call(Call::DomainState(name.into()))
    }
    fn domain_is_persistent(&self, name: &str) -> Result<bool> {
        self.call(Call::DomainIsPersistent(name.into()))
    }
    fn domain_autostart(&self, name: &str) -> Result<bool> {
        self.call(Call::DomainAutostart(name.into()))
    }
    fn set_domain_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.call(Call::SetDomainAutostart(name.into(), autostart))
    }
    fn set_domain_memory(&self, name: &str, bytes: u64) -> Result<()> {
        self.call(Call::SetDomainMemory(name.into(), bytes))
    }
    fn set_domain_vcpus(&self, name: &str, vcpus: u32) -> Result<()> {
        self.call(Call::SetDomainVcpus(name.into(), vcpus))
    }
    fn define_domain(&self, domain: &Domain) -> Result<DomainRef> {
        self.call(Call::DefineDomain(Box::new(domain.clone())))
    }
    fn create_domain(&self, domain: &Domain) -> Result<DomainRef> {
        self.call(Call::CreateDomain(Box::new(domain.clone())))
    }
    fn undefine_domain(&self, name: &str) -> Result<()> {
        self.call(Call::UndefineDomain(name.into()))
    }
    fn start_domain(&self, name: &str) -> Result<DomainRef> {
        self.call(Call::StartDomain(name.into()))
    }
    fn shutdown_domain(&self, name: &str) -> Result<()> {
        self.call(Call::ShutdownDomain(name.into()))
    }
    fn reboot_domain(&self, name: &str) -> Result<()> {
        self.call(Call::RebootDomain(name.into()))
    }
    fn reset_domain(&self, name: &str) -> Result<()> {
        self.call(Call::ResetDomain(name.into()))
    }
    fn suspend_domain(&self, name: &str) -> Result<()> {
        self.call(Call::SuspendDomain(name.into()))
    }
    fn resume_domain(&self, name: &str) -> Result<()> {
        self.call(Call::ResumeDomain(name.into()))
    }
    fn destroy_domain(&self, name: &str) -> Result<()> {
        self.call(Call::DestroyDomain(name.into()))
    }
    fn console_path(&self, name: &str) -> Result<PathBuf> {
        self.call(Call::ConsolePath(name.into()))
    }
    fn set_domain_memory_flags(&self, name: &str, bytes: u64, affect: Affect) -> Result<()> {
        self.call(Call::SetDomainMemoryFlags(name.into(), bytes, affect))
    }
    fn set_domain_vcpus_flags(&self, name: &str, vcpus: u32, affect: Affect) -> Result<()> {
        self.call(Call::SetDomainVcpusFlags(name.into(), vcpus, affect))
    }
    fn set_domain_annotation(
        &self,
        name: &str,
        key: &str,
        value: Option<&str>,
        affect: Affect,
    ) -> Result<()> {
        self.call(Call::SetDomainAnnotation(
            name.into(),
            key.into(),
            value.map(str::to_string),
            affect,
        ))
    }
    fn domain_os_type(&self, name: &str) -> Result<String> {
        self.call(Call::DomainOsType(name.into()))
    }
    fn security_model(&self) -> (String, String) {
        self.call(Call::SecurityModel)
            .unwrap_or_else(|_| ("none".to_string(), "0".to_string()))
    }
    fn domain_security_label(&self, name: &str) -> Result<Option<(String, bool)>> {
        self.call(Call::DomainSecurityLabel(name.into()))
    }
    fn cells_free_memory(&self) -> Result<Vec<u64>> {
        self.call(Call::CellsFreeMemory)
    }
    fn node_free_memory(&self) -> Result<u64> {
        self.call(Call::NodeFreeMemory)
    }
    fn guest_info(&self, name: &str) -> Result<vireo_crds::GuestInfo> {
        self.call(Call::GuestInfo(name.into()))
    }
    fn guest_fs_freeze(&self, name: &str, mountpoints: &[String]) -> Result<u64> {
        self.call(Call::GuestFsFreeze(name.into(), mountpoints.to_vec()))
    }
    fn guest_fs_thaw(&self, name: &str) -> Result<u64> {
        self.call(Call::GuestFsThaw(name.into()))
    }
    fn save_domain(&self, name: &str, path: &std::path::Path) -> Result<()> {
        self.call(Call::SaveDomain(name.into(), path.to_path_buf()))
    }
    fn restore_domain(&self, path: &std::path::Path) -> Result<DomainRef> {
        self.call(Call::RestoreDomain(path.to_path_buf()))
    }
    fn managed_save(&self, name: &str) -> Result<()> {
        self.call(Call::ManagedSave(name.into()))
    }
    fn has_managed_save(&self, name: &str) -> Result<bool> {
        self.call(Call::HasManagedSave(name.into()))
    }
    fn managed_save_remove(&self, name: &str) -> Result<()> {
        self.call(Call::ManagedSaveRemove(name.into()))
    }
    fn guest_agent_shutdown(&self, name: &str, reboot: bool) -> Result<()> {
        self.call(Call::GuestAgentShutdown(name.into(), reboot))
    }
    fn snapshot_create(
        &self,
        name: &str,
        params: &crate::snapshot::SnapshotParams,
    ) -> Result<crate::snapshot::SnapshotInfo> {
        self.call(Call::SnapshotCreate(name.into(), params.clone()))
    }
    fn snapshot_list(&self, name: &str) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        self.call(Call::SnapshotList(name.into()))
    }
    fn snapshot_get(&self, name: &str, snapshot: &str) -> Result<crate::snapshot::SnapshotInfo> {
        self.call(Call::SnapshotGet(name.into(), snapshot.into()))
    }
    fn snapshot_current(&self, name: &str) -> Result<Option<crate::snapshot::SnapshotInfo>> {
        self.call(Call::SnapshotCurrent(name.into()))
    }
    fn snapshot_revert(
        &self,
        name: &str,
        snapshot: &str,
        to: crate::snapshot::RevertTo,
    ) -> Result<()> {
        self.call(Call::SnapshotRevert(name.into(), snapshot.into(), to))
    }
    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<()> {
        self.call(Call::SnapshotDelete(name.into(), snapshot.into()))
    }
    fn domain_scheduler(&self, name: &str) -> Result<(String, Vec<(String, String)>)> {
        self.call(Call::DomainScheduler(name.into()))
    }
    fn sysinfo(&self) -> Result<String> {
        self.call(Call::Sysinfo)
    }
    fn capabilities(&self) -> Result<String> {
        self.call(Call::Capabilities)
    }
    fn domain_interface_addresses(&self, name: &str) -> Result<Option<Vec<(String, String)>>> {
        self.call(Call::DomainInterfaceAddresses(name.into()))
    }
    fn domain_block_info(&self, name: &str, disk: &str) -> Result<BlockInfo> {
        self.call(Call::DomainBlockInfo(name.into(), disk.into()))
    }
    fn domain_block_stats(&self, name: &str, disk: &str) -> Result<Vec<(String, i64)>> {
        self.call(Call::DomainBlockStats(name.into(), disk.into()))
    }
    fn domain_interface_stats(&self, name: &str, iface: &str) -> Result<Vec<(String, i64)>> {
        self.call(Call::DomainInterfaceStats(name.into(), iface.into()))
    }
    fn domain_memory_stats(&self, name: &str) -> Result<Vec<(String, u64)>> {
        self.call(Call::DomainMemoryStats(name.into()))
    }
    fn domain_vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        self.call(Call::DomainVcpuInfo(name.into()))
    }
}

impl NetworkDriver for Remote {
    fn list_networks(&self, filter: ListFilter) -> Result<Vec<NetworkRef>> {
        self.call(Call::ListNetworks(filter))
    }
    fn lookup_network(&self, key: Lookup<'_>) -> Result<NetworkRef> {
        self.call(Call::LookupNetwork(Key::of(key)))
    }
    fn network_definition(&self, name: &str, inactive: bool) -> Result<Network> {
        self.call(Call::NetworkDefinition(name.into(), inactive))
    }
    fn network_info(&self, name: &str) -> Result<NetworkInfo> {
        self.call(Call::NetworkInfo(name.into()))
    }
    fn define_network(&self, network: &Network) -> Result<NetworkRef> {
        self.call(Call::DefineNetwork(Box::new(network.clone())))
    }
    fn create_network(&self, network: &Network) -> Result<NetworkRef> {
        self.call(Call::CreateNetwork(Box::new(network.clone())))
    }
    fn undefine_network(&self, name: &str) -> Result<()> {
        self.call(Call::UndefineNetwork(name.into()))
    }
    fn start_network(&self, name: &str) -> Result<()> {
        self.call(Call::StartNetwork(name.into()))
    }
    fn destroy_network(&self, name: &str) -> Result<()> {
        self.call(Call::DestroyNetwork(name.into()))
    }
    fn set_network_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.call(Call::SetNetworkAutostart(name.into(), autostart))
    }
    fn dhcp_leases(&self, name: &str) -> Result<Vec<crate::network::DhcpLease>> {
        self.call(Call::DhcpLeases(name.into()))
    }
}

impl StorageDriver for Remote {
    fn list_pools(&self, filter: ListFilter) -> Result<Vec<PoolRef>> {
        self.call(Call::ListPools(filter))
    }
    fn lookup_pool(&self, key: Lookup<'_>) -> Result<PoolRef> {
        self.call(Call::LookupPool(Key::of(key)))
    }
    fn pool_definition(&self, name: &str) -> Result<StoragePool> {
        self.call(Call::PoolDefinition(name.into()))
    }
    fn pool_info(&self, name: &str) -> Result<PoolInfo> {
        self.call(Call::PoolInfo(name.into()))
    }
    fn define_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        self.call(Call::DefinePool(Box::new(pool.clone())))
    }
    fn create_pool(&self, pool: &StoragePool) -> Result<PoolRef> {
        self.call(Call::CreatePool(Box::new(pool.clone())))
    }
    fn build_pool(&self, name: &str) -> Result<()> {
        self.call(Call::BuildPool(name.into()))
    }
    fn start_pool(&self, name: &str) -> Result<()> {
        self.call(Call::StartPool(name.into()))
    }
    fn destroy_pool(&self, name: &str) -> Result<()> {
        self.call(Call::DestroyPool(name.into()))
    }
    fn delete_pool(&self, name: &str) -> Result<()> {
        self.call(Call::DeletePool(name.into()))
    }
    fn undefine_pool(&self, name: &str) -> Result<()> {
        self.call(Call::UndefinePool(name.into()))
    }
    fn refresh_pool(&self, name: &str) -> Result<()> {
        self.call(Call::RefreshPool(name.into()))
    }
    fn set_pool_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.call(Call::SetPoolAutostart(name.into(), autostart))
    }
    fn list_volumes(&self, pool: &str) -> Result<Vec<VolRef>> {
        self.call(Call::ListVolumes(pool.into()))
    }
    fn lookup_volume(&self, pool: &str, name: &str) -> Result<VolRef> {
        self.call(Call::LookupVolume(pool.into(), name.into()))
    }
    fn lookup_volume_by_key(&self, key: &str) -> Result<VolRef> {
        self.call(Call::LookupVolumeByKey(key.into()))
    }
    fn lookup_volume_by_path(&self, path: &str) -> Result<VolRef> {
        self.call(Call::LookupVolumeByPath(path.into()))
    }
    fn volume_info(&self, pool: &str, name: &str) -> Result<VolInfo> {
        self.call(Call::VolumeInfo(pool.into(), name.into()))
    }
    fn create_volume(&self, volume: &StorageVol) -> Result<VolRef> {
        self.call(Call::CreateVolume(Box::new(volume.clone())))
    }
    fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        flags: ResizeFlags,
    ) -> Result<()> {
        self.call(Call::ResizeVolume(
            pool.into(),
            name.into(),
            capacity,
            flags,
        ))
    }
    fn wipe_volume(&self, pool: &str, name: &str) -> Result<()> {
        self.call(Call::WipeVolume(pool.into(), name.into()))
    }
    fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        self.call(Call::DeleteVolume(pool.into(), name.into()))
    }
    fn upload_volume(
        &self,
        pool: &str,
        name: &str,
        source: &mut dyn Read,
        length: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let Some(len) = length else {
            return Err(Error::invalid_argument(
                ObjectKind::StorageVol,
                name,
                "an upload through the agent's socket needs its length",
            ));
        };
        let mut counted = Counted {
            inner: source,
            done: 0,
            total: Some(len),
            progress,
        };
        progress(0, Some(len));
        self.exchange(
            &Call::UploadVolume(pool.into(), name.into(), len),
            Some((&mut counted, len)),
            None,
        )
    }
    fn download_volume(
        &self,
        pool: &str,
        name: &str,
        sink: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<u64> {
        // Chunks until the empty one; a sink that fails still drains the
        // stream, so the connection stays in step, and its error wins.
        let mut sink_error = None;
        let mut copy = |reader: &mut BufReader<UnixStream>| -> Result<()> {
            let mut done = 0u64;
            let mut buf = Vec::new();
            progress(0, None);
            loop {
                let mut len = [0u8; 4];
                reader
                    .read_exact(&mut len)
                    .map_err(|e| self.fail(format!("receive: {e}")))?;
                let len = u32::from_be_bytes(len) as usize;
                if len == 0 {
                    return Ok(());
                }
                buf.resize(len, 0);
                reader
                    .read_exact(&mut buf)
                    .map_err(|e| self.fail(format!("receive: {e}")))?;
                if sink_error.is_none()
                    && let Err(e) = sink.write_all(&buf)
                {
                    sink_error = Some(e);
                }
                done += len as u64;
                progress(done, None);
            }
        };
        let n: u64 = self.exchange(
            &Call::DownloadVolume(pool.into(), name.into()),
            None,
            Some(&mut copy),
        )?;
        if let Some(e) = sink_error {
            return Err(Error::OperationFailed {
                object: ObjectName::new(ObjectKind::StorageVol, name),
                message: format!("download: {e}"),
            });
        }
        progress(n, Some(n));
        Ok(n)
    }
}

/// A reader that reports how much went through it.
struct Counted<'a, R: Read + ?Sized> {
    inner: &'a mut R,
    done: u64,
    total: Option<u64>,
    progress: Progress<'a>,
}

impl<R: Read + ?Sized> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.done, self.total);
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// The server side
// ---------------------------------------------------------------------------

fn ok<T: Serialize>(r: Result<T>) -> Reply {
    match r {
        Ok(v) => match serde_json::to_value(v) {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Err(WireError::OperationFailed {
                kind: String::new(),
                name: String::new(),
                message: format!("cannot encode the answer: {e}"),
            }),
        },
        Err(e) => Reply::Err(WireError::from(&e)),
    }
}

/// Answers one call with `conn`. Uploads read their bytes from `input`;
/// downloads write theirs to `output` after the reply line.
fn answer(
    conn: &Connection,
    call: Call,
    input: &mut dyn Read,
    output: &mut dyn Write,
) -> std::io::Result<()> {
    let hv = conn.hypervisor();
    let net = conn.network();
    let st = conn.storage();
    let none = &crate::storage::no_progress;
    let reply = match call {
        Call::HypervisorVersion => ok(Ok(hv.hypervisor_version())),
        Call::NodeInfo => ok(hv.node_info()),
        Call::Hostname => ok(hv.hostname()),
        Call::ListDomains(f) => ok(hv.list_domains(f)),
        Call::LookupDomain(k) => ok(hv.lookup_domain(k.lookup())),
        Call::DomainDefinition(n, i) => ok(hv.domain_definition(&n, i)),
        Call::DomainInfo(n) => ok(hv.domain_info(&n)),
        Call::DomainState(n) => ok(hv.domain_state(&n)),
        Call::DomainIsPersistent(n) => ok(hv.domain_is_persistent(&n)),
        Call::DomainAutostart(n) => ok(hv.domain_autostart(&n)),
        Call::SetDomainAutostart(n, a) => ok(hv.set_domain_autostart(&n, a)),
        Call::SetDomainMemory(n, b) => ok(hv.set_domain_memory(&n, b)),
        Call::SetDomainVcpus(n, v) => ok(hv.set_domain_vcpus(&n, v)),
        Call::DefineDomain(d) => ok(hv.define_domain(&d)),
        Call::CreateDomain(d) => ok(hv.create_domain(&d)),
        Call::UndefineDomain(n) => ok(hv.undefine_domain(&n)),
        Call::StartDomain(n) => ok(hv.start_domain(&n)),
        Call::ShutdownDomain(n) => ok(hv.shutdown_domain(&n)),
        Call::RebootDomain(n) => ok(hv.reboot_domain(&n)),
        Call::ResetDomain(n) => ok(hv.reset_domain(&n)),
        Call::SuspendDomain(n) => ok(hv.suspend_domain(&n)),
        Call::ResumeDomain(n) => ok(hv.resume_domain(&n)),
        Call::DestroyDomain(n) => ok(hv.destroy_domain(&n)),
        Call::ConsolePath(n) => ok(hv.console_path(&n)),
        Call::SetDomainMemoryFlags(n, b, a) => ok(hv.set_domain_memory_flags(&n, b, a)),
        Call::SetDomainVcpusFlags(n, v, a) => ok(hv.set_domain_vcpus_flags(&n, v, a)),
        Call::SetDomainAnnotation(n, k, v, a) => {
            ok(hv.set_domain_annotation(&n, &k, v.as_deref(), a))
        }
        Call::DomainOsType(n) => ok(hv.domain_os_type(&n)),
        Call::SecurityModel => ok(Ok(hv.security_model())),
        Call::DomainSecurityLabel(n) => ok(hv.domain_security_label(&n)),
        Call::CellsFreeMemory => ok(hv.cells_free_memory()),
        Call::NodeFreeMemory => ok(hv.node_free_memory()),
        Call::DomainScheduler(n) => ok(hv.domain_scheduler(&n)),
        Call::GuestInfo(n) => ok(hv.guest_info(&n)),
        Call::GuestFsFreeze(n, m) => ok(hv.guest_fs_freeze(&n, &m)),
        Call::GuestFsThaw(n) => ok(hv.guest_fs_thaw(&n)),
        Call::GuestAgentShutdown(n, r) => ok(hv.guest_agent_shutdown(&n, r)),
        Call::Sysinfo => ok(hv.sysinfo()),
        Call::Capabilities => ok(hv.capabilities()),
        Call::DomainInterfaceAddresses(n) => ok(hv.domain_interface_addresses(&n)),
        Call::DomainBlockInfo(n, d) => ok(hv.domain_block_info(&n, &d)),
        Call::DomainBlockStats(n, d) => ok(hv.domain_block_stats(&n, &d)),
        Call::DomainInterfaceStats(n, i) => ok(hv.domain_interface_stats(&n, &i)),
        Call::DomainMemoryStats(n) => ok(hv.domain_memory_stats(&n)),
        Call::DomainVcpuInfo(n) => ok(hv.domain_vcpu_info(&n)),
        Call::SaveDomain(n, p) => ok(hv.save_domain(&n, &p)),
        Call::RestoreDomain(p) => ok(hv.restore_domain(&p)),
        Call::ManagedSave(n) => ok(hv.managed_save(&n)),
        Call::HasManagedSave(n) => ok(hv.has_managed_save(&n)),
        Call::ManagedSaveRemove(n) => ok(hv.managed_save_remove(&n)),
        Call::SnapshotCreate(n, p) => ok(hv.snapshot_create(&n, &p)),
        Call::SnapshotList(n) => ok(hv.snapshot_list(&n)),
        Call::SnapshotGet(n, s) => ok(hv.snapshot_get(&n, &s)),
        Call::SnapshotCurrent(n) => ok(hv.snapshot_current(&n)),
        Call::SnapshotRevert(n, s, t) => ok(hv.snapshot_revert(&n, &s, t)),
        Call::SnapshotDelete(n, s) => ok(hv.snapshot_delete(&n, &s)),
        Call::ListNetworks(f) => ok(net.list_networks(f)),
        Call::LookupNetwork(k) => ok(net.lookup_network(k.lookup())),
        Call::NetworkDefinition(n, i) => ok(net.network_definition(&n, i)),
        Call::NetworkInfo(n) => ok(net.network_info(&n)),
        Call::DefineNetwork(d) => ok(net.define_network(&d)),
        Call::CreateNetwork(d) => ok(net.create_network(&d)),
        Call::UndefineNetwork(n) => ok(net.undefine_network(&n)),
        Call::StartNetwork(n) => ok(net.start_network(&n)),
        Call::DestroyNetwork(n) => ok(net.destroy_network(&n)),
        Call::SetNetworkAutostart(n, a) => ok(net.set_network_autostart(&n, a)),
        Call::DhcpLeases(n) => ok(net.dhcp_leases(&n)),
        Call::ListPools(f) => ok(st.list_pools(f)),
        Call::LookupPool(k) => ok(st.lookup_pool(k.lookup())),
        Call::PoolDefinition(n) => ok(st.pool_definition(&n)),
        Call::PoolInfo(n) => ok(st.pool_info(&n)),
        Call::DefinePool(p) => ok(st.define_pool(&p)),
        Call::CreatePool(p) => ok(st.create_pool(&p)),
        Call::BuildPool(n) => ok(st.build_pool(&n)),
        Call::StartPool(n) => ok(st.start_pool(&n)),
        Call::DestroyPool(n) => ok(st.destroy_pool(&n)),
        Call::DeletePool(n) => ok(st.delete_pool(&n)),
        Call::UndefinePool(n) => ok(st.undefine_pool(&n)),
        Call::RefreshPool(n) => ok(st.refresh_pool(&n)),
        Call::SetPoolAutostart(n, a) => ok(st.set_pool_autostart(&n, a)),
        Call::ListVolumes(p) => ok(st.list_volumes(&p)),
        Call::LookupVolume(p, n) => ok(st.lookup_volume(&p, &n)),
        Call::LookupVolumeByKey(k) => ok(st.lookup_volume_by_key(&k)),
        Call::LookupVolumeByPath(k) => ok(st.lookup_volume_by_path(&k)),
        Call::VolumeInfo(p, n) => ok(st.volume_info(&p, &n)),
        Call::CreateVolume(v) => ok(st.create_volume(&v)),
        Call::ResizeVolume(p, n, c, f) => ok(st.resize_volume(&p, &n, c, f)),
        Call::WipeVolume(p, n) => ok(st.wipe_volume(&p, &n)),
        Call::DeleteVolume(p, n) => ok(st.delete_volume(&p, &n)),
        Call::UploadVolume(p, n, len) => {
            let mut body = input.take(len);
            let r = st.upload_volume(&p, &n, &mut body, Some(len), none);
            // Whatever the driver did not read is skipped, so the stream
            // stays in step with the next call.
            std::io::copy(&mut body, &mut std::io::sink())?;
            ok(r)
        }
        Call::DownloadVolume(p, n) => {
            let r = {
                let mut chunks = Chunks { out: &mut *output };
                st.download_volume(&p, &n, &mut chunks, none)
            };
            output.write_all(&0u32.to_be_bytes())?;
            ok(r)
        }
    };
    write_reply(output, &reply)
}

/// Frames what is written into chunks: a 4-byte big-endian length, then
/// the bytes.
struct Chunks<'a> {
    out: &'a mut dyn Write,
}

impl Write for Chunks<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(u32::MAX as usize);
        self.out.write_all(&(n as u32).to_be_bytes())?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn write_reply(output: &mut dyn Write, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    output.write_all(&line)?;
    output.flush()
}

/// Serves one client until it hangs up: a call per line.
pub fn serve_client(conn: &Connection, stream: UnixStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        match serde_json::from_str::<Call>(&line) {
            Ok(call) => answer(conn, call, &mut reader, &mut writer)?,
            Err(e) => write_reply(
                &mut writer,
                &Reply::Err(WireError::Connect {
                    uri: "vireo+unix".into(),
                    message: format!("not a call: {e}"),
                }),
            )?,
        }
    }
}

/// Serves `conn` on a unix socket at `path` (mode 0600: root's, like
/// libvirtd's read-write socket), a thread per client, until the process ends.
pub fn serve(conn: Connection, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("local-api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let conn = conn.clone();
                let _ = std::thread::Builder::new()
                    .name("local-api-client".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(&conn, stream) {
                            tracing::debug!(error = %e, "local API client left");
                        }
                    });
            }
        })?;
    Ok(())
}
