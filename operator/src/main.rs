//! `vireo-operator`: the cluster controllers (placement, UUIDs, dependency
//! gates, in-use protection, host health). Several replicas can run: one
//! leads, on the Lease `vireo-system/vireo-operator`; the others wait.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vireo_controllers::metrics::Metrics;
use vireo_controllers::operator::OperatorConfig;
use vireo_crds::labels::{OPERATOR_LEASE, SYSTEM_NAMESPACE};

mod uninstall;

#[derive(Parser)]
#[command(
    version,
    about = "Vireo's cluster operator",
    long_about = "Vireo's cluster operator. Places Domains on Hosts, defaults UUIDs, gates \
        Domains on their volumes and networks, protects volumes in use, and marks Hosts that \
        stop heartbeating NotReady. The cluster comes from KUBECONFIG (or the in-cluster \
        service account)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Objects reconciled at once, per controller. A reconcile mostly waits
    /// on the API server, so many run at once: at 32 the Domains of a fleet
    /// queued for their binding (1,000 at once: p99 8.9 s to Running, 1.3 s
    /// at 128; issue 19).
    #[arg(long, default_value_t = 128)]
    concurrency: u16,
    /// Seconds between checks of the Hosts' heartbeat Leases.
    #[arg(long, default_value_t = 2)]
    host_check_seconds: u64,
    /// Seconds past a Lease's duration before its Host is NotReady.
    #[arg(long, default_value_t = 0)]
    host_grace_seconds: u64,
    /// Seconds between placement attempts for a Domain that fits nowhere.
    #[arg(long, default_value_t = 5)]
    retry_pending_seconds: u64,
    /// Drain the Host of a cordoned Kubernetes Node (`kubectl drain NODE
    /// --ignore-daemonsets`, `kubectl cordon`) as `vireo drain` does: its
    /// Domains migrate, move or stay as their evictionStrategy says;
    /// uncordoning ends it. Needs get/list/watch on nodes.
    #[arg(long)]
    drain_on_cordon: bool,
    /// Run without leader election (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Seconds the leader's Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    leader_lease_seconds: u64,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9100")]
    metrics_addr: SocketAddr,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of every Vireo kind as YAML, or
    /// write one file per CRD with --out-dir.
    Crds {
        /// Directory to write `<plural>.vireo.dev.yaml` files into.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Before Vireo is removed from a cluster (the chart's pre-delete hook):
    /// delete every Domain and every Network and wait until the agents have
    /// destroyed their guests, bridges and dnsmasq. StoragePools and
    /// StorageVols, and their files, are kept.
    Uninstall {
        /// Seconds to wait for the agents before giving up (non-zero exit).
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
}

fn print_crds(out_dir: Option<PathBuf>) -> Result<()> {
    for crd in vireo_crds::crd::all() {
        let yaml = vireo_crds::crd::to_yaml(&crd)?;
        match &out_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let path = dir.join(vireo_crds::crd::file_name(&crd));
                std::fs::write(&path, yaml)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crds { out_dir }) = cli.command {
        return print_crds(out_dir);
    }
    vireo_controllers::metrics::init_tracing();
    if let Some(Command::Uninstall { timeout_seconds }) = cli.command {
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        return runtime.block_on(async move {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the cluster")?;
            uninstall::run(client, Duration::from_secs(timeout_seconds)).await
        });
    }
    let config = OperatorConfig {
        concurrency: cli.concurrency.max(1),
        host_check: Duration::from_secs(cli.host_check_seconds.max(1)),
        host_grace: Duration::from_secs(cli.host_grace_seconds),
        retry_pending: Duration::from_secs(cli.retry_pending_seconds.max(1)),
        drain_on_cordon: cli.drain_on_cordon,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Listening from the start: a signal while the Lease is sought is not lost.
        let mut shutdown = vireo_controllers::shutdown::Shutdown::listen()
            .context("cannot listen for SIGTERM and SIGINT")?;
        let metrics = Metrics::new("vireo_operator");
        vireo_controllers::metrics::spawn_server(cli.metrics_addr, metrics.clone());
        let client = kube::Client::try_default().await.context("cannot reach the cluster")?;
        if cli.no_leader_election {
            tracing::info!("running without leader election");
            return tokio::select! {
                r = vireo_controllers::operator::run(client, config, metrics) => r.context("vireo-operator"),
                _ = shutdown.wait() => Ok(()),
            };
        }
        let lease_seconds = cli.leader_lease_seconds.max(2);
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), OPERATOR_LEASE)
            .with_namespace(SYSTEM_NAMESPACE)
            .with_duration(lease_seconds)
            .with_grace((lease_seconds / 3).max(1))
            .build()
            .await
            .context("cannot set up leader election")?;
        let (mut leading, task) = manager.watch().await;
        tracing::info!("waiting to lead (Lease {SYSTEM_NAMESPACE}/{OPERATOR_LEASE})");
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => changed.context("leader election stopped")?,
                _ = shutdown.wait() => return Ok(()),
            }
        }
        tracing::info!("leading");
        tokio::select! {
            r = vireo_controllers::operator::run(client, config, metrics) => r.context("vireo-operator"),
            _ = async {
                loop {
                    if leading.changed().await.is_err() || !*leading.borrow() {
                        break;
                    }
                }
            } => {
                // Another replica may lead now: stop at once rather than act twice.
                anyhow::bail!("lost the leader Lease; exiting so a restart can wait its turn")
            }
            _ = shutdown.wait() => {
                // Hand the Lease over now instead of letting it expire.
                drop(leading);
                match task.await {
                    Ok(Ok(manager)) => {
                        if let Err(e) = manager.release().await {
                            tracing::warn!(error = %e, "cannot release the leader Lease");
                        } else {
                            tracing::info!("released the leader Lease");
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "leader election ended with an error"),
                    Err(e) => tracing::warn!(error = %e, "leader election task failed"),
                }
                Ok(())
            }
        }
    })
}
