//! The commands, named as virsh names them.

mod console;
mod domain;
mod edit;
mod guest;
mod host;
mod inspect;
mod migrate;
mod network;
mod pool;
mod save;
mod snapshot;
mod volume;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use vireo_crds::Manifest;
use vireo_drivers::Connection;

use crate::output::Output;

/// Every command. Names, arguments and messages follow virsh.
#[derive(Subcommand)]
pub enum Command {
    // -- connection and host --
    /// Print the connection URI.
    Uri,
    /// Print Vireo's and the hypervisor's versions.
    Version,
    /// Print the node's CPUs and memory (libvirt's NodeGetInfo).
    Nodeinfo,
    /// Print the node's host name.
    Hostname,
    /// Print the node's free memory (libvirt's test node: its fixed
    /// figures), per NUMA cell with --all or CELL.
    Freecell(FreecellArgs),
    /// Print the connection's capabilities as libvirt capabilities XML:
    /// host CPU, NUMA cells, security model, guest types.
    Capabilities,
    /// Print the host's SMBIOS data as libvirt sysinfo XML: the node's (read
    /// from its /sys/class/dmi/id), or the test node's fixed data.
    Sysinfo,
    /// Print the arguments, like virsh's echo (handy in shell scripts).
    Echo(EchoArgs),
    /// Turn a libvirt XML description (domain, network, pool, volume) into
    /// the Vireo manifest to keep; what it cannot carry over is noted on
    /// stderr. (`define -f FILE.xml` and the other -f commands take XML too.)
    ImportXml(ImportXmlArgs),

    // -- domains --
    /// List domains: running ones, or all with --all, or inactive ones with
    /// --inactive; --state-*, --persistent, --transient, --autostart and
    /// --no-autostart filter them, --name and --uuid print only those.
    List(DomListArgs),
    /// Show a domain's ID, UUID, state, CPUs and memory.
    Dominfo(DomainArg),
    /// Show a domain's state, and with --reason why it is in it.
    Domstate(DomstateArgs),
    /// Print a domain's ID ('-' when inactive).
    Domid(DomainArg),
    /// Show a running domain's interfaces, MACs and the addresses their
    /// networks' DHCP servers leased, or (--source agent) the addresses the
    /// guest agent reports from inside the guest.
    Domifaddr(DomifaddrArgs),
    /// Print a domain's UUID.
    Domuuid(DomainArg),
    /// Print a domain's name.
    Domname(DomainArg),
    /// Print a domain's manifest (live, or the next-start definition with --inactive).
    Dumpspec(DumpArgs),
    /// Print a domain as libvirt domain XML, which `virsh define` accepts.
    Dumpxml(DumpArgs),
    /// Define (or redefine) persistent, inactive domains from a manifest file.
    Define(FileArg),
    /// Create and start transient domains from a manifest file.
    Create(FileArg),
    /// Remove a domain's definition; an active domain becomes transient and keeps running.
    Undefine(DomainArg),
    /// Start an inactive domain.
    Start(DomainArg),
    /// Ask the guest to shut down (it ends 'shut off (shutdown)'): with the
    /// ACPI power button, or with --mode agent through its guest agent.
    Shutdown(ShutdownArgs),
    /// Ask the guest to reboot (the domain's lifecycle.onReboot applies);
    /// --mode as for shutdown.
    Reboot(ShutdownArgs),
    /// Show what the guest agent reports: users, OS, hostname, filesystems,
    /// interfaces (all, or the groups asked for), as `key : value` lines.
    Guestinfo(GuestinfoArgs),
    /// Freeze the guest's filesystems through its guest agent (before a
    /// disk snapshot), all or the --mountpoint ones.
    Domfsfreeze(DomfsfreezeArgs),
    /// Thaw the filesystems domfsfreeze froze.
    Domfsthaw(DomainArg),
    /// Reset the guest at once, like the reset button.
    Reset(DomainArg),
    /// Pause a running domain.
    Suspend(DomainArg),
    /// Resume a paused domain.
    Resume(DomainArg),
    /// Stop a domain at once (it ends 'shut off (destroyed)').
    Destroy(DomainArg),
    /// Save a running domain's memory and device state to a file on its
    /// node and stop it (it ends 'shut off (saved)').
    Save(save::SaveArgs),
    /// Start a domain again from a file `save` wrote, where it was.
    Restore(save::RestoreArgs),
    /// Save a running domain's state on its node; the next start resumes it.
    Managedsave(DomainArg),
    /// Remove a domain's managed save image: its next start boots.
    ManagedsaveRemove(DomainArg),
    /// Take a snapshot of a domain: its disks and, of a running domain, its
    /// memory (--disk-only: disks only). It becomes the current snapshot.
    SnapshotCreateAs(snapshot::CreateAsArgs),
    /// List a domain's snapshots: name, creation time, state.
    SnapshotList(snapshot::ListArgs),
    /// Print a snapshot's state, parent, children and what it holds.
    SnapshotInfo(snapshot::SnapshotArg),
    /// Print a snapshot as libvirt's domainsnapshot XML.
    SnapshotDumpxml(snapshot::DumpxmlArgs),
    /// Print a domain's current snapshot (its name with --name).
    SnapshotCurrent(snapshot::CurrentArgs),
    /// Return a domain to a snapshot: its definition, disks and, for a
    /// snapshot with memory, the running guest where it was.
    SnapshotRevert(snapshot::RevertArgs),
    /// Delete a snapshot and what it holds; the domain is untouched.
    SnapshotDelete(snapshot::SnapshotArg),
    /// Move a running domain to another node while it runs (virsh migrate
    /// --live). On a cluster: `migrate NAME [NODE]` creates a
    /// DomainMigration and waits for it; between connections: `migrate
    /// --live NAME DEST_URI`.
    Migrate(migrate::MigrateArgs),
    /// Abort a domain's running job, a migration being sent (virsh
    /// domjobabort): the guest runs on where it was. On a cluster it
    /// deletes the Domain's DomainMigration in flight, which cancels it.
    Domjobabort(DomainArg),
    /// On a cluster: drain a node (Host spec.drain): its Domains migrate
    /// live, move after a shutdown, or stay, as their evictionStrategy says.
    Drain(migrate::DrainArgs),
    /// Mark a domain to start with its node, or unmark it with --disable.
    Autostart(AutostartArgs),
    /// Set a domain's current memory (a bare number is KiB; units: K, M, G,
    /// KiB, GB, ...). Without --config only a running domain's (as virsh).
    Setmem(SetmemArgs),
    /// Set a domain's vCPU count (at most spec.maxVcpus). Without --config
    /// only a running domain's (as virsh).
    Setvcpus(SetvcpusArgs),
    /// List a domain's interfaces: name, type, network, model, MAC.
    Domiflist(DomainArg),
    /// List a domain's disks: target and source (the volume's path, or its
    /// name when no pool of this node holds it).
    Domblklist(DomainArg),
    /// Print a domain's vCPU counts: maximum and current, config and live.
    Vcpucount(VcpucountArgs),
    /// Print a running domain's memory statistics, in KiB.
    Dommemstat(DomainArg),
    /// Print or set (--new-desc) a domain's description, or its title with
    /// --title (the vireo.dev/description and vireo.dev/title annotations).
    Desc(DescArgs),
    /// Print a domain's scheduler and its parameters.
    Schedinfo(DomainArg),
    /// Print the console socket of a running domain, a path on the node
    /// that runs it (empty when its driver has none, as on the test node).
    Ttyconsole(DomainArg),
    /// Print a disk's capacity, allocation and physical size in bytes.
    Domblkinfo(DomainDeviceArgs),
    /// Print a running domain's disk I/O counters: QEMU's (the qemu
    /// driver), the test driver's simulated ones; the kvm driver keeps none yet.
    Domblkstat(DomainDeviceArgs),
    /// Print a running domain's interface counters, as the guest sees them:
    /// its tap's, so only on the node that runs it (this machine, or its
    /// agent's socket); the test driver's are simulated.
    Domifstat(DomainIfaceArgs),
    /// Print each vCPU: the host CPU it runs on, its state, CPU time,
    /// affinity (read on the node that runs it; N/A while inactive).
    Vcpuinfo(DomainArg),
    /// Edit a domain's manifest in $EDITOR (libvirt XML with --xml) and
    /// define the result; nothing changes if the edit is invalid or unchanged.
    Edit(EditArgs),
    /// Print domain lifecycle events (started, stopped, suspended, ...) as
    /// they happen; --loop keeps going, --timeout stops after SECONDS. It
    /// polls the connection's domains every 200 ms: on a node (an agent's
    /// socket) it sees what the agent and every client do; on
    /// test:///default the node lives in this process, which makes no
    /// change while it waits.
    Event(EventArgs),
    /// Attach to a running domain's serial console; Ctrl+] leaves it.
    Console(ConsoleArgs),

    // -- networks --
    /// List networks: active ones, or all with --all, or inactive ones with --inactive.
    NetList(ListArgs),
    /// Show a network's UUID, state and bridge.
    NetInfo(NameArg),
    /// Print a network's UUID.
    NetUuid(NameArg),
    /// Print a network's name, from its UUID.
    NetName(NameArg),
    /// Print a network's manifest.
    NetDumpspec(NameArg),
    /// Print a network as libvirt network XML.
    NetDumpxml(NameArg),
    /// Define (or redefine) persistent, inactive networks from a manifest file.
    NetDefine(FileArg),
    /// Create and start transient networks from a manifest file.
    NetCreate(FileArg),
    /// Start an inactive network.
    NetStart(NameArg),
    /// Stop an active network (a transient network goes away).
    NetDestroy(NameArg),
    /// Remove a network's definition; an active network becomes transient.
    NetUndefine(NameArg),
    /// Mark a network to start with its node, or unmark it with --disable.
    NetAutostart(NamedAutostartArgs),
    /// List a network's DHCP leases (only those of --mac MAC).
    NetDhcpLeases(DhcpLeasesArgs),

    // -- storage pools --
    /// List pools; --details adds persistence and sizes.
    PoolList(PoolListArgs),
    /// Show a pool's state and sizes.
    PoolInfo(NameArg),
    /// Print a pool's UUID.
    PoolUuid(NameArg),
    /// Print a pool's name, from its UUID.
    PoolName(NameArg),
    /// Print a pool's manifest.
    PoolDumpspec(NameArg),
    /// Print a pool as libvirt pool XML.
    PoolDumpxml(NameArg),
    /// Define (or redefine) persistent, inactive pools from a manifest file.
    PoolDefine(FileArg),
    /// Create and start transient pools from a manifest file.
    PoolCreate(FileArg),
    /// Make an inactive pool's storage (a dir pool's directory).
    PoolBuild(NameArg),
    /// Start an inactive pool.
    PoolStart(NameArg),
    /// Stop an active pool; its volumes stay.
    PoolDestroy(NameArg),
    /// Remove an inactive pool's storage.
    PoolDelete(NameArg),
    /// Remove an inactive pool's definition.
    PoolUndefine(NameArg),
    /// Rescan a pool's volumes and sizes.
    PoolRefresh(NameArg),
    /// Mark a pool to start with its node, or unmark it with --disable.
    PoolAutostart(NamedAutostartArgs),

    // -- storage volumes --
    /// List a pool's volumes; --details adds type and sizes.
    VolList(VolListArgs),
    /// Show a volume's type and sizes.
    VolInfo(VolArgs),
    /// Print a volume's path.
    VolPath(VolArgs),
    /// Print a volume's key.
    VolKey(VolArgs),
    /// Print a volume's name, from its key or path.
    VolName(VolArgs),
    /// Print the pool that holds a volume (given by key or path).
    VolPool(VolPoolArgs),
    /// Create volumes from a StorageVol manifest file.
    VolCreate(VolFileArgs),
    /// Create a volume from arguments (sizes: a bare number is bytes; units K, M, G, GB, ...).
    VolCreateAs(VolCreateAsArgs),
    /// Copy a volume into a new one in the same pool.
    VolClone(VolCloneArgs),
    /// Change a volume's capacity (refused past the pool's free space).
    VolResize(VolResizeArgs),
    /// Overwrite a volume's content with zeros.
    VolWipe(VolArgs),
    /// Delete a volume.
    VolDelete(VolArgs),
    /// Print a volume as libvirt volume XML.
    VolDumpxml(VolArgs),
    /// Replace a volume's content with a local file (progress on stderr).
    VolUpload(VolTransferArgs),
    /// Copy a volume's content into a local file (progress on stderr).
    VolDownload(VolTransferArgs),
}

#[derive(Args)]
pub struct ListArgs {
    /// Active and inactive objects.
    #[arg(long, conflicts_with = "inactive")]
    pub all: bool,
    /// Inactive objects only.
    #[arg(long)]
    pub inactive: bool,
}

impl ListArgs {
    pub fn filter(&self) -> vireo_drivers::ListFilter {
        match (self.all, self.inactive) {
            (true, _) => vireo_drivers::ListFilter::All,
            (_, true) => vireo_drivers::ListFilter::Inactive,
            _ => vireo_drivers::ListFilter::Active,
        }
    }
}

#[derive(Args)]
pub struct DomListArgs {
    /// Active and inactive domains.
    #[arg(long, conflicts_with = "inactive")]
    pub all: bool,
    /// Inactive domains only.
    #[arg(long)]
    pub inactive: bool,
    /// Running domains (of all, active and inactive).
    #[arg(long)]
    pub state_running: bool,
    /// Paused domains.
    #[arg(long)]
    pub state_paused: bool,
    /// Shut-off domains.
    #[arg(long)]
    pub state_shutoff: bool,
    /// Domains in another state (shutdown, crashed, pmsuspended, blocked).
    #[arg(long)]
    pub state_other: bool,
    /// Persistent domains only.
    #[arg(long, conflicts_with = "transient")]
    pub persistent: bool,
    /// Transient domains only.
    #[arg(long)]
    pub transient: bool,
    /// Domains marked to start with the node.
    #[arg(long, conflicts_with = "no_autostart")]
    pub autostart: bool,
    /// Domains not marked to start with the node.
    #[arg(long)]
    pub no_autostart: bool,
    /// Print names only, one a line.
    #[arg(long, conflicts_with = "table")]
    pub name: bool,
    /// Print UUIDs only, one a line (with --name: UUID and name).
    #[arg(long, conflicts_with = "table")]
    pub uuid: bool,
    /// Print the table (the default).
    #[arg(long)]
    pub table: bool,
    /// Add a Title column (the vireo.dev/title annotation).
    #[arg(long)]
    pub title: bool,
    /// On a cluster (kube:///), the domains of every namespace the
    /// connection's user may list, not only the connection's namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

/// virsh's --live, --config and --current.
#[derive(Args)]
pub struct AffectArgs {
    /// The running domain only (refused on an inactive one).
    #[arg(long)]
    pub live: bool,
    /// The persistent definition (the next start) only.
    #[arg(long)]
    pub config: bool,
    /// The running domain if it runs, else the persistent definition.
    #[arg(long)]
    pub current: bool,
}

#[derive(Args)]
pub struct VcpucountArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Only the maximum count.
    #[arg(long, conflicts_with = "active")]
    pub maximum: bool,
    /// Only the current count.
    #[arg(long)]
    pub active: bool,
    #[command(flatten)]
    pub affect: AffectArgs,
}

#[derive(Args)]
pub struct DescArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// The title instead of the description.
    #[arg(long)]
    pub title: bool,
    /// Set it to this text (empty removes it).
    #[arg(long, value_name = "TEXT")]
    pub new_desc: Option<String>,
    #[command(flatten)]
    pub affect: AffectArgs,
}

#[derive(Args)]
pub struct FreecellArgs {
    /// Only this NUMA cell.
    pub cell: Option<u32>,
    /// Only this NUMA cell (virsh's --cellno form).
    #[arg(long, conflicts_with = "cell")]
    pub cellno: Option<u32>,
    /// Every cell, and the total.
    #[arg(long, conflicts_with_all = ["cell", "cellno"])]
    pub all: bool,
}

#[derive(Args)]
pub struct EchoArgs {
    /// Words to print, separated by spaces.
    pub words: Vec<String>,
}

#[derive(Args)]
pub struct DomainDeviceArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Disk target (vda) or volume name.
    pub device: String,
}

#[derive(Args)]
pub struct DomainIfaceArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Interface name (as domiflist prints it) or MAC address.
    pub interface: String,
}

#[derive(Args)]
pub struct EditArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Edit libvirt domain XML instead of the manifest.
    #[arg(long)]
    pub xml: bool,
}

#[derive(Args)]
pub struct EventArgs {
    /// Only this domain's events (name, ID or UUID).
    #[arg(long)]
    pub domain: Option<String>,
    /// Only lifecycle events (the only kind there is; accepted for virsh's sake).
    #[arg(long, value_name = "EVENT")]
    pub event: Option<String>,
    /// Keep printing events instead of stopping after the first.
    #[arg(long = "loop")]
    pub keep: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Print a timestamp before each event.
    #[arg(long)]
    pub timestamp: bool,
}

#[derive(Args)]
pub struct VolPoolArgs {
    /// Volume key or path.
    pub vol: String,
    /// Print the pool's UUID instead of its name.
    #[arg(long)]
    pub uuid: bool,
}

#[derive(Args)]
pub struct DomainArg {
    /// Domain name, ID or UUID.
    pub domain: String,
}

#[derive(Args)]
pub struct ShutdownArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// How to ask: `acpi` (the power button, the default) or `agent` (the
    /// guest agent); a comma list tries each in order until one is accepted.
    #[arg(long)]
    pub mode: Option<String>,
}

#[derive(Args)]
pub struct DomifaddrArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Only this interface (its name in the guest with --source agent).
    #[arg(long)]
    pub interface: Option<String>,
    /// Where the addresses come from: `lease` (the networks' DHCP leases,
    /// the default) or `agent` (the guest agent, from inside the guest).
    #[arg(long, default_value = "lease", value_parser = ["lease", "agent"])]
    pub source: String,
    /// Repeat the name and MAC on every address line.
    #[arg(long)]
    pub full: bool,
}

#[derive(Args)]
pub struct GuestinfoArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Logged-in users.
    #[arg(long)]
    pub user: bool,
    /// The operating system.
    #[arg(long)]
    pub os: bool,
    /// The host name.
    #[arg(long)]
    pub hostname: bool,
    /// Network interfaces and addresses.
    #[arg(long)]
    pub interface: bool,
    /// Mounted filesystems.
    #[arg(long)]
    pub filesystem: bool,
}

#[derive(Args)]
pub struct DomfsfreezeArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// A mount point to freeze (repeatable); all when none is given.
    #[arg(long)]
    pub mountpoint: Vec<String>,
}

#[derive(Args)]
pub struct DomstateArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Also say why the domain is in its state.
    #[arg(long)]
    pub reason: bool,
}

#[derive(Args)]
pub struct DumpArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// The persistent definition the next start uses, not the live one.
    #[arg(long)]
    pub inactive: bool,
}

#[derive(Args)]
pub struct FileArg {
    /// Manifest file (YAML; several documents separated by '---'), or a
    /// libvirt XML description; '-' reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Args)]
pub struct VolFileArgs {
    /// Manifest file (YAML; several documents separated by '---'), or a
    /// libvirt volume XML description; '-' reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// The pool of a volume given as libvirt XML (its XML does not name one).
    #[arg(long)]
    pub pool: Option<String>,
}

#[derive(Args)]
pub struct ImportXmlArgs {
    /// A libvirt XML description (`virsh dumpxml`, `net-dumpxml`,
    /// `pool-dumpxml`, `vol-dumpxml` output); '-' reads standard input.
    pub file: PathBuf,
    /// The pool of a volume (a volume's XML does not name one).
    #[arg(long)]
    pub pool: Option<String>,
}

#[derive(Args)]
pub struct AutostartArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Turn autostart off.
    #[arg(long)]
    pub disable: bool,
}

#[derive(Args)]
pub struct NamedAutostartArgs {
    /// Name or UUID.
    pub name: String,
    /// Turn autostart off.
    #[arg(long)]
    pub disable: bool,
}

#[derive(Args)]
pub struct SetmemArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// New current memory: a bare number is KiB, or give a unit (512M, 2G, 2GiB).
    pub size: String,
    #[command(flatten)]
    pub affect: AffectArgs,
}

#[derive(Args)]
pub struct SetvcpusArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// New vCPU count.
    pub count: u32,
    #[command(flatten)]
    pub affect: AffectArgs,
}

#[derive(Args)]
pub struct DhcpLeasesArgs {
    /// Network name or UUID.
    pub name: String,
    /// Only the leases of this MAC address.
    #[arg(long)]
    pub mac: Option<String>,
}

#[derive(Args)]
pub struct NameArg {
    /// Name or UUID.
    pub name: String,
}

#[derive(Args)]
pub struct PoolListArgs {
    #[command(flatten)]
    pub list: ListArgs,
    /// Add persistence, capacity, allocation and available space.
    #[arg(long)]
    pub details: bool,
}

#[derive(Args)]
pub struct VolListArgs {
    /// Pool name or UUID.
    #[arg(required_unless_present = "pool_opt")]
    pub pool: Option<String>,
    /// Pool name or UUID (virsh's --pool form).
    #[arg(long = "pool", id = "pool_opt", value_name = "POOL")]
    pub pool_opt: Option<String>,
    /// Add type, capacity and allocation.
    #[arg(long)]
    pub details: bool,
}

#[derive(Args)]
pub struct VolArgs {
    /// Volume name (with --pool), or its key or path.
    pub vol: String,
    /// Pool that holds the volume.
    #[arg(long)]
    pub pool: Option<String>,
}

#[derive(Args)]
pub struct VolTransferArgs {
    /// Volume name (with --pool), or its key or path.
    pub vol: String,
    /// The local file to read (vol-upload) or write (vol-download); for
    /// vol-upload '-' reads standard input (`kubectl exec -i ... < disk.img`).
    pub file: std::path::PathBuf,
    /// Pool that holds the volume.
    #[arg(long)]
    pub pool: Option<String>,
    /// vol-upload from standard input: how many bytes come (an upload
    /// through an agent's socket needs it, and it drives the progress).
    #[arg(long, value_name = "BYTES")]
    pub length: Option<u64>,
}

#[derive(Args)]
pub struct VolCreateAsArgs {
    /// Pool name or UUID.
    pub pool: String,
    /// Name of the new volume.
    pub name: String,
    /// Capacity: a bare number is bytes, or give a unit (10G, 512M, 1GB).
    pub capacity: String,
    /// Space to allocate now (default: all of it).
    #[arg(long)]
    pub allocation: Option<String>,
    /// Format: raw or qcow2.
    #[arg(long, default_value = "raw")]
    pub format: String,
}

#[derive(Args)]
pub struct VolCloneArgs {
    /// Source volume name (with --pool), or its key or path.
    pub vol: String,
    /// Name of the new volume.
    pub newname: String,
    /// Pool that holds the source volume.
    #[arg(long)]
    pub pool: Option<String>,
}

#[derive(Args)]
pub struct VolResizeArgs {
    /// Volume name (with --pool), or its key or path.
    pub vol: String,
    /// New capacity (with --delta, the amount to add): a bare number is bytes; units K, M, G, GB, ...
    pub capacity: String,
    /// Pool that holds the volume.
    #[arg(long)]
    pub pool: Option<String>,
    /// Allocate the new space now.
    #[arg(long)]
    pub allocate: bool,
    /// Add the capacity to the current one.
    #[arg(long)]
    pub delta: bool,
    /// Allow the capacity to go down.
    #[arg(long)]
    pub shrink: bool,
}

#[derive(Args)]
pub struct ConsoleArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Print what the console shows for this many seconds, then leave
    /// (no keyboard input; for scripts and logs).
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
}

/// Runs a command on a connection.
pub fn run(conn: &Connection, command: &Command) -> Result<Output> {
    use Command as C;
    match command {
        C::Uri | C::Version | C::Nodeinfo | C::Hostname => host::run(conn, command),
        C::Echo(a) => Ok(Output::Text {
            text: a.words.join(" "),
            data: serde_json::json!({"echo": a.words.join(" ")}),
        }),
        C::Freecell(_)
        | C::Capabilities
        | C::Sysinfo
        | C::Domiflist(_)
        | C::Domblklist(_)
        | C::Vcpucount(_)
        | C::Dommemstat(_)
        | C::Desc(_)
        | C::Schedinfo(_)
        | C::Ttyconsole(_)
        | C::Domblkinfo(_)
        | C::Domblkstat(_)
        | C::Domifstat(_)
        | C::Vcpuinfo(_) => inspect::run(conn, command),
        C::Edit(a) => edit::edit(conn, a),
        C::Event(a) => edit::events(conn, a),
        C::ImportXml(a) => import_xml(a),
        C::List(_)
        | C::Dominfo(_)
        | C::Domstate(_)
        | C::Domid(_)
        | C::Domuuid(_)
        | C::Domname(_)
        | C::Dumpspec(_)
        | C::Dumpxml(_)
        | C::Define(_)
        | C::Create(_)
        | C::Undefine(_)
        | C::Start(_)
        | C::Reset(_)
        | C::Suspend(_)
        | C::Resume(_)
        | C::Destroy(_)
        | C::Autostart(_)
        | C::Setmem(_)
        | C::Setvcpus(_) => domain::run(conn, command),
        C::Migrate(a) => migrate::run(conn, a),
        C::Drain(a) => migrate::drain(conn, a),
        C::Domjobabort(a) => migrate::domjobabort(conn, &a.domain),
        C::Save(a) => save::save(conn, a),
        C::Restore(a) => save::restore(conn, a),
        C::Managedsave(a) => save::managedsave(conn, &a.domain),
        C::ManagedsaveRemove(a) => save::managedsave_remove(conn, &a.domain),
        C::SnapshotCreateAs(a) => snapshot::create_as(conn, a),
        C::SnapshotList(a) => snapshot::list(conn, a),
        C::SnapshotInfo(a) => snapshot::info(conn, a),
        C::SnapshotDumpxml(a) => snapshot::dumpxml(conn, a),
        C::SnapshotCurrent(a) => snapshot::current(conn, a),
        C::SnapshotRevert(a) => snapshot::revert(conn, a),
        C::SnapshotDelete(a) => snapshot::delete(conn, a),
        C::Console(a) => console::run(conn, a),
        C::Shutdown(a) => guest::shutdown(conn, &a.domain, a.mode.as_deref(), false),
        C::Reboot(a) => guest::shutdown(conn, &a.domain, a.mode.as_deref(), true),
        C::Guestinfo(a) => guest::guestinfo(conn, a),
        C::Domfsfreeze(a) => guest::domfsfreeze(conn, a),
        C::Domfsthaw(a) => guest::domfsthaw(conn, &a.domain),
        C::Domifaddr(a) if a.source == "agent" => {
            guest::domifaddr_agent(conn, &a.domain, a.interface.as_deref(), a.full)
        }
        C::NetList(_)
        | C::NetInfo(_)
        | C::NetUuid(_)
        | C::NetName(_)
        | C::NetDumpspec(_)
        | C::NetDumpxml(_)
        | C::NetDefine(_)
        | C::NetCreate(_)
        | C::NetStart(_)
        | C::NetDestroy(_)
        | C::NetUndefine(_)
        | C::NetAutostart(_)
        | C::NetDhcpLeases(_)
        | C::Domifaddr(_) => network::run(conn, command),
        C::PoolList(_)
        | C::PoolInfo(_)
        | C::PoolUuid(_)
        | C::PoolName(_)
        | C::PoolDumpspec(_)
        | C::PoolDumpxml(_)
        | C::PoolDefine(_)
        | C::PoolCreate(_)
        | C::PoolBuild(_)
        | C::PoolStart(_)
        | C::PoolDestroy(_)
        | C::PoolDelete(_)
        | C::PoolUndefine(_)
        | C::PoolRefresh(_)
        | C::PoolAutostart(_) => pool::run(conn, command),
        C::VolList(_)
        | C::VolInfo(_)
        | C::VolDumpxml(_)
        | C::VolPath(_)
        | C::VolKey(_)
        | C::VolName(_)
        | C::VolPool(_)
        | C::VolCreate(_)
        | C::VolCreateAs(_)
        | C::VolClone(_)
        | C::VolResize(_)
        | C::VolWipe(_)
        | C::VolDelete(_)
        | C::VolUpload(_)
        | C::VolDownload(_) => volume::run(conn, command),
    }
}

/// Reads a file, or standard input for '-'.
fn read_text(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

/// A libvirt XML description as a manifest; what it does not carry over
/// goes to stderr as notes.
fn from_libvirt_xml(path: &Path, text: &str, pool: Option<&str>) -> Result<Manifest> {
    use vireo_crds::libvirt_xml::{ImportOptions, from_xml};
    let imported = from_xml(
        text,
        &ImportOptions {
            pool: pool.map(str::to_string),
        },
    )
    .with_context(|| path.display().to_string())?;
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    Ok(imported.manifest)
}

/// `import-xml`: a libvirt description as the manifest to keep (YAML, or
/// JSON with `-o json`).
fn import_xml(a: &ImportXmlArgs) -> Result<Output> {
    // Past the size cap, refuse before reading the file at all.
    use vireo_crds::libvirt_xml::{MAX_DESCRIPTION_BYTES, XmlError};
    if let Ok(meta) = std::fs::metadata(&a.file)
        && meta.is_file()
        && meta.len() > MAX_DESCRIPTION_BYTES as u64
    {
        let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
        bail!("{}: {}", a.file.display(), XmlError::TooLarge(len));
    }
    let text = read_text(&a.file)?;
    let manifest = from_libvirt_xml(&a.file, &text, a.pool.as_deref())?;
    let data = to_data(&manifest)?;
    Ok(Output::Text {
        text: serde_yaml_ng::to_string(&manifest)?.trim_end().to_string(),
        data,
    })
}

/// Reads a manifest file and keeps the documents of one kind, refusing others.
pub fn read_manifests(path: &Path, want: &'static str, hint: &str) -> Result<Vec<Manifest>> {
    read_manifests_in(path, want, hint, None)
}

/// Same, with the pool a volume's libvirt XML leaves out.
pub fn read_manifests_in(
    path: &Path,
    want: &'static str,
    hint: &str,
    pool: Option<&str>,
) -> Result<Vec<Manifest>> {
    let text = read_text(path)?;
    let all = if vireo_crds::libvirt_xml::looks_like_xml(&text) {
        vec![from_libvirt_xml(path, &text, pool)?]
    } else {
        Manifest::parse_all(&text).with_context(|| path.display().to_string())?
    };
    if all.is_empty() {
        bail!("{}: no {want} in the file", path.display());
    }
    for (i, m) in all.iter().enumerate() {
        if m.kind() != want {
            bail!(
                "{}: document {} is a {}, not a {want}; use {hint}",
                path.display(),
                i + 1,
                m.kind()
            );
        }
    }
    Ok(all)
}

/// virsh's yes/no.
pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Serializes a value to JSON for `-o json|yaml`.
pub fn to_data<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).context("cannot serialize")
}
