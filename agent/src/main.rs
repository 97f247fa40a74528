//! `vireo-agent`: one per node. Registers its Host, heartbeats a Lease, and
//! realizes the Domains, StorageVols, Networks and StoragePools of its node
//! through the drivers it embeds. Guests outlive it: stopping or restarting
//! the agent leaves them running, and a restarted agent re-adopts them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use vireo_controllers::agent::AgentConfig;
use vireo_controllers::metrics::Metrics;

#[derive(Parser)]
#[command(
    version,
    about = "Vireo's node agent",
    long_about = "Vireo's node agent. Run one per node: it registers the node as a Host, renews a \
        heartbeat Lease in vireo-system, and runs the Domains, StorageVols, Networks and \
        StoragePools bound to or selecting its node. The cluster comes from KUBECONFIG (or the \
        in-cluster service account)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's NodeInfo (CPUs, memory, CPU model) as the Host status carries it.
    HostInfo,
}

#[derive(Args)]
struct RunArgs {
    /// Run without a cluster: take Domains, Networks, StoragePools and
    /// StorageVols from --manifests, place them all here, and keep status
    /// under --state-dir (standalone/status/).
    #[arg(long, requires = "manifests")]
    standalone: bool,
    /// The directory of manifests standalone mode runs (looked at again
    /// every --resync-seconds, at most every 2 s): edit a file and the
    /// guest follows, remove it and the guest goes.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// This node's name (the Host's name and the `vireo.dev/node` label value).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where the agent keeps its drivers' state; guests' records outlive the agent here.
    #[arg(long, env = "VIREO_STATE_DIR", default_value = "/var/lib/vireo")]
    state_dir: PathBuf,
    /// Host labels, `key=value`, repeatable (matched by nodeSelectors).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// CPUs to offer instead of this machine's (to simulate a bigger node).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory to offer instead of this machine's, in bytes or with a unit (64Gi).
    #[arg(long)]
    memory: Option<String>,
    /// vCPUs offered per CPU (KubeVirt's default ratio is 10).
    #[arg(long, default_value_t = 10)]
    cpu_overcommit: u32,
    /// Seconds between heartbeat Lease renewals.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Seconds a heartbeat stays valid.
    #[arg(long, default_value_t = 40)]
    lease_seconds: u64,
    /// Seconds between looks at a healthy object.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Objects reconciled at once, per kind.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Seconds a guest gets to shut down (runStrategy Halted, deletion aside)
    /// before it is destroyed.
    #[arg(long, default_value_t = 60)]
    stop_timeout_seconds: u64,
    /// Where this host's filesystem is seen: StoragePool paths are taken
    /// under it. `/` on a host; the host's root mounted into the agent's
    /// container (the chart uses /host); a directory per node when several
    /// agents share one machine for tests.
    #[arg(long, value_name = "DIR", default_value = "/")]
    host_root: PathBuf,
    /// A directory a Domain's kernel and initrd may come from (repeatable;
    /// symbolic links are resolved before the check). Other paths are
    /// refused with a Ready=False condition (standalone: logged). Volumes of
    /// the node's pools are allowed too. Default: /var/lib/vireo/boot.
    #[arg(long = "boot-dir", value_name = "DIR")]
    boot_dirs: Vec<PathBuf>,
    /// Domain types to offer, comma-separated (test, qemu, kvm); default:
    /// every driver that opens on this node. The Host lists what is offered.
    #[arg(long, value_delimiter = ',', value_name = "TYPES", value_parser = domain_type)]
    drivers: Vec<vireo_crds::DomainType>,
    /// Where Networks are realized: `bridge` (Linux bridges, nftables NAT,
    /// dnsmasq for DHCP, as libvirt does) or `test` (records only, no device:
    /// for several simulated nodes on one machine).
    #[arg(long, value_name = "BACKEND", default_value = "bridge", value_parser = ["bridge", "test"])]
    network_driver: String,
    /// The local API socket, which the CLI reaches with `vireo -c
    /// vireo+unix:///PATH` (default: STATE/vireo.sock): every domain of this
    /// node, their consoles, volume uploads and downloads. On a cluster the
    /// API server stays the source of truth: the agent puts back what a
    /// change through the socket does against a Domain's spec.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Serve the aggregated API `subresources.vireo.dev` (consoles, volume
    /// uploads and downloads through the API server, authorized by RBAC)
    /// on this address, e.g. 0.0.0.0:8443. Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    subresources_listen: Option<SocketAddr>,
    /// PEM serving certificate (chain) of the aggregated API; the
    /// APIService's caBundle must hold its CA. Without it (and the key), a
    /// self-signed certificate is made at start: the APIService then needs
    /// insecureSkipTLSVerify, and other agents cannot forward here.
    #[arg(long, value_name = "FILE", requires_all = ["subresources_key", "subresources_listen"])]
    subresources_cert: Option<PathBuf>,
    /// PEM private key of --subresources-cert.
    #[arg(long, value_name = "FILE", requires = "subresources_cert")]
    subresources_key: Option<PathBuf>,
    /// HOST:PORT the other agents reach this one's subresources API at,
    /// published in this node's Host; without it, the other agents answer
    /// 503 for this node's objects.
    #[arg(long, value_name = "HOST:PORT")]
    subresources_advertise: Option<String>,
    /// Forward requests for other nodes' objects to their agents, whose
    /// serving certificates must chain to this PEM CA ...
    #[arg(long, value_name = "FILE", requires = "subresources_server_name")]
    subresources_ca: Option<PathBuf>,
    /// ... and carry this DNS name (the Service's, e.g.
    /// vireo-subresources.vireo-system.svc). This agent's own token
    /// authenticates it; the other agent checks it may `proxy`.
    #[arg(long, value_name = "NAME", requires = "subresources_ca")]
    subresources_server_name: Option<String>,
    /// The IP address other nodes' agents send live migrations of this
    /// node's Domains to (published in the Host's status.migrationAddress);
    /// default: this node's first non-loopback address.
    #[arg(long, value_name = "IP")]
    migration_address: Option<std::net::IpAddr>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9101")]
    metrics_addr: SocketAddr,
}

fn domain_type(text: &str) -> Result<vireo_crds::DomainType, String> {
    match text.trim() {
        "test" => Ok(vireo_crds::DomainType::Test),
        "qemu" => Ok(vireo_crds::DomainType::Qemu),
        "kvm" => Ok(vireo_crds::DomainType::Kvm),
        other => Err(format!("'{other}' is not a domain type (test, qemu, kvm)")),
    }
}

fn labels(items: &[String]) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--label '{l}' is not KEY=VALUE"))
        })
        .collect()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::HostInfo) = cli.command {
        let info = vireo_drivers::host::probe_node_info()?;
        print!("{}", serde_yaml_ng::to_string(&info)?);
        return Ok(());
    }
    vireo_controllers::metrics::init_tracing();
    let a = cli.run;
    let node_name = match a.node_name {
        Some(n) => n,
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .context("--node-name is not set and /etc/hostname cannot be read")?,
    };
    let memory = a
        .memory
        .as_deref()
        .map(vireo_crds::quantity::parse_str)
        .transpose()
        .context("--memory")?;
    if a.heartbeat_seconds == 0 || a.lease_seconds <= a.heartbeat_seconds {
        bail!("--lease-seconds must be greater than --heartbeat-seconds (and both above zero)");
    }
    let config = AgentConfig {
        node_name,
        state_dir: a.state_dir,
        labels: labels(&a.labels)?,
        cpus: a.cpus,
        memory,
        cpu_overcommit: a.cpu_overcommit.max(1),
        heartbeat: Duration::from_secs(a.heartbeat_seconds),
        lease_duration: Duration::from_secs(a.lease_seconds),
        resync: Duration::from_secs(a.resync_seconds.max(1)),
        concurrency: a.concurrency.max(1),
        stop_timeout: Duration::from_secs(a.stop_timeout_seconds),
        migration_address: a.migration_address,
        host_root: a.host_root,
        socket: a.socket,
        drivers: a.drivers,
        network_driver: if a.network_driver == "test" {
            vireo_controllers::agent::NetworkBackend::Test
        } else {
            vireo_controllers::agent::NetworkBackend::Bridge
        },
        subresources: match (
            a.subresources_listen,
            a.subresources_cert,
            a.subresources_key,
        ) {
            (Some(listen), cert, key) => {
                Some(vireo_controllers::agent::subresources::SubresourcesConfig {
                    listen,
                    cert,
                    key,
                    advertise: a.subresources_advertise,
                    peer_ca: a.subresources_ca,
                    peer_server_name: a.subresources_server_name,
                })
            }
            _ => None,
        },
        boot_dirs: if a.boot_dirs.is_empty() {
            vec![PathBuf::from("/var/lib/vireo/boot")]
        } else {
            a.boot_dirs
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Listening from the start: a Ctrl-C during start-up is not lost.
        let shutdown = vireo_controllers::shutdown::Shutdown::listen()
            .context("cannot listen for SIGTERM and SIGINT")?;
        let metrics = Metrics::new("vireo_agent");
        vireo_controllers::metrics::spawn_server(a.metrics_addr, metrics.clone());
        tracing::info!(node = %config.node_name, state_dir = %config.state_dir.display(), "vireo-agent starting");
        match a.manifests.filter(|_| a.standalone) {
            Some(dir) => vireo_controllers::standalone::run(config, dir, metrics, shutdown)
                .await
                .context("vireo-agent --standalone"),
            None => vireo_controllers::agent::run(config, metrics, shutdown)
                .await
                .context("vireo-agent"),
        }
    })
}
