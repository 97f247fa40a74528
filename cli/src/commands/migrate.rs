//! `migrate`: move a running domain to another node while it runs.
//!
//! * On a cluster (`kube:///`): `vireo migrate NAME [NODE]` creates a
//!   DomainMigration (the operator picks the node when none is given) and
//!   waits, printing each phase the operator and the agents reach, ending
//!   with the figures or the failure; `--no-wait` returns once it exists.
//! * Between two connections: `vireo migrate --live NAME DEST_URI` drives
//!   libvirt's four steps itself (prepare on the destination, perform on
//!   this connection, finish there, confirm here), as `virsh migrate`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use vireo_crds::{DomainMigration, DomainMigrationSpec, MigrationPhase};
use vireo_drivers::Connection;
use vireo_drivers::migration::MigrationParams;

use super::domain::resolve;
use crate::cluster;
use crate::output::Output;

#[derive(Args)]
pub struct MigrateArgs {
    /// Live migration (the guest runs on while its state is sent; the only
    /// kind Vireo does). Required between two connections, as virsh's.
    #[arg(long)]
    pub live: bool,
    /// Domain name, ID or UUID (`NS/NAME` on a cluster).
    pub domain: String,
    /// On a cluster: the node (Host) to move it to; absent, the operator
    /// picks one as placement does. Between connections: the destination
    /// URI of a driver this process opens (`qemu:///embed?root=DIR`,
    /// `test:///DIR/`); a standalone agent's socket (`vireo+unix://`) does
    /// not carry migration yet.
    pub dest: Option<String>,
    /// The longest pause the guest may see at the switch-over, in ms.
    #[arg(long, value_name = "MS")]
    pub max_downtime: Option<u64>,
    /// Bandwidth cap in MiB/s.
    #[arg(long, value_name = "MIB_S")]
    pub bandwidth: Option<u64>,
    /// Between connections: the destination's address the source sends the
    /// state to (default 127.0.0.1: both on this machine).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub migrate_address: String,
    /// On a cluster: return once the DomainMigration is created.
    #[arg(long)]
    pub no_wait: bool,
    /// On a cluster: give up waiting after this many seconds (the
    /// migration goes on; `kubectl get dmig` follows it).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
}

pub fn run(conn: &Connection, a: &MigrateArgs) -> Result<Output> {
    if cluster::is_kube_uri(conn.uri()) {
        on_cluster(conn, a)
    } else {
        between(conn, a)
    }
}

/// `domjobabort`: asks the driver to stop the domain's running job; on a
/// cluster, deletes the DomainMigration the Domain is marked with.
pub fn domjobabort(conn: &Connection, domain: &str) -> Result<Output> {
    if !cluster::is_kube_uri(conn.uri()) {
        let d = resolve(conn, domain)?;
        conn.hypervisor().abort_job(&d.name)?;
        return Ok(Output::Message(format!(
            "Job of domain '{}' aborted: it stays where it runs",
            d.name
        )));
    }
    let kube = cluster::open_kube(conn.uri())?;
    let (ns, name) = kube.split(domain);
    let (ns, name) = (ns.to_string(), name.to_string());
    let shown = cluster::full_name(&ns, &name);
    let domains: Api<vireo_crds::Domain> = Api::namespaced(kube.client().clone(), &ns);
    let dom = kube
        .block_on(domains.get_opt(&name))
        .with_context(|| format!("reading Domain {shown}"))?
        .ok_or_else(|| anyhow!("Domain '{shown}' not found"))?;
    let Some(mname) = dom
        .annotations()
        .get(vireo_crds::labels::MIGRATION_ANNOTATION)
        .cloned()
    else {
        bail!("Domain '{shown}' has no job running (no migration in flight)");
    };
    let api: Api<DomainMigration> = Api::namespaced(kube.client().clone(), &ns);
    kube.block_on(api.delete(&mname, &Default::default()))
        .with_context(|| format!("deleting DomainMigration {ns}/{mname}"))?;
    Ok(Output::Message(format!(
        "Migration {mname} of domain '{shown}' cancelled: DomainMigration {ns}/{mname} deleted; the guest stays on its node (kubectl get dmig -n {ns} {mname} shows it until it has ended)"
    )))
}

fn on_cluster(conn: &Connection, a: &MigrateArgs) -> Result<Output> {
    let kube = cluster::open_kube(conn.uri())?;
    let (ns, name) = kube.split(&a.domain);
    let (ns, name) = (ns.to_string(), name.to_string());
    let api: Api<DomainMigration> = Api::namespaced(kube.client().clone(), &ns);
    let mut m = DomainMigration::new(
        "",
        DomainMigrationSpec {
            domain_name: name.clone(),
            target_node: a.dest.clone(),
            max_downtime_ms: a.max_downtime,
            bandwidth: a.bandwidth,
        },
    );
    m.metadata.name = None;
    m.metadata.generate_name = Some(cluster::generate_name(&name));
    let created = kube
        .block_on(api.create(&PostParams::default(), &m))
        .map_err(|e| {
            anyhow!(cluster::api_error(
                vireo_crds::ObjectKind::Domain,
                &cluster::full_name(&ns, &name),
                e
            ))
        })
        .context("cannot create the DomainMigration")?;
    let mname = created.name_any();
    let shown = cluster::full_name(&ns, &name);
    if a.no_wait {
        return Ok(Output::Message(format!(
            "DomainMigration {ns}/{mname} created for domain '{shown}' (kubectl get dmig -n {ns} {mname})"
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut last = None;
    let stderr = std::io::stderr();
    loop {
        let now = kube
            .block_on(api.get_opt(&mname))
            .with_context(|| format!("reading DomainMigration {ns}/{mname}"))?
            .ok_or_else(|| anyhow!("DomainMigration {ns}/{mname} was deleted"))?;
        let status = now.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(MigrationPhase::Pending);
        if last != Some(phase) {
            let mut err = stderr.lock();
            let _ = writeln!(
                err,
                "Migration {mname}: {phase}{}",
                status
                    .message
                    .as_deref()
                    .filter(|_| !phase.is_final())
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            );
            last = Some(phase);
        }
        match phase {
            MigrationPhase::Succeeded => {
                let stats = status.stats.unwrap_or_default();
                let target = status.target_node.unwrap_or_default();
                return Ok(Output::Text {
                    text: format!(
                        "Domain '{shown}' migrated to node {target}: {} ms, downtime {} ms, {} MiB of memory, {} MiB of disks",
                        stats.total_ms,
                        stats.downtime_ms,
                        stats.memory_bytes >> 20,
                        stats.disk_bytes >> 20
                    ),
                    data: serde_json::json!({
                        "migration": mname,
                        "domain": shown,
                        "sourceNode": status.source_node,
                        "targetNode": target,
                        "stats": stats,
                    }),
                });
            }
            MigrationPhase::Failed => bail!(
                "migration of domain '{shown}' failed: {}",
                status.message.unwrap_or_else(|| "no reason given".into())
            ),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!(
                "migration {ns}/{mname} still {phase} after {} s; it goes on (kubectl get dmig -n {ns} {mname})",
                a.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn between(conn: &Connection, a: &MigrateArgs) -> Result<Output> {
    if !a.live {
        bail!("only live migration is supported: add --live");
    }
    let Some(dest_uri) = a.dest.as_deref() else {
        bail!("give the destination URI: vireo migrate --live NAME DEST_URI");
    };
    if cluster::is_kube_uri(dest_uri) {
        bail!(
            "a cluster migrates its own Domains: vireo -c kube:/// migrate NAME NODE (not to kube:/// from {})",
            conn.uri()
        );
    }
    let dest = vireo_drivers::open(dest_uri)
        .with_context(|| format!("cannot open the destination {dest_uri}"))?;
    let d = resolve(conn, &a.domain)?;
    let src = conn.hypervisor();
    let dst = dest.hypervisor();
    let def = src.domain_definition(&d.name, false)?;
    let params = MigrationParams {
        target_address: a.migrate_address.clone(),
        copy_storage: !def.spec.volume_refs().is_empty(),
        max_downtime_ms: a.max_downtime,
        bandwidth_mib_s: a.bandwidth,
    };
    let incoming = dst
        .migrate_prepare(&def, &params)
        .context("prepare on the destination")?;
    let stats = match src.migrate_perform(&d.name, &incoming, &params) {
        Ok(s) => s,
        Err(e) => {
            let _ = dst.migrate_finish(&d.name, false);
            let _ = src.migrate_confirm(&d.name, false);
            return Err(anyhow!(e).context("sending the state; the domain runs on here"));
        }
    };
    if let Err(e) = dst.migrate_finish(&d.name, true) {
        let _ = dst.migrate_finish(&d.name, false);
        let _ = src.migrate_confirm(&d.name, false);
        return Err(anyhow!(e).context("resuming on the destination; the domain runs on here"));
    }
    src.migrate_confirm(&d.name, true)
        .context("the domain runs on the destination, but removing it here failed")?;
    Ok(Output::Text {
        text: format!(
            "Migration: [100 %]\nDomain '{}' migrated to {dest_uri}: {} ms, downtime {} ms",
            d.name, stats.total_ms, stats.downtime_ms
        ),
        data: serde_json::json!({
            "domain": d.name,
            "destination": dest_uri,
            "stats": stats,
        }),
    })
}

#[derive(Args)]
pub struct DrainArgs {
    /// The node (Host) to drain.
    pub node: String,
    /// Undo a drain: the Host takes Domains again (those moved off stay
    /// where they went).
    #[arg(long)]
    pub undo: bool,
}

/// `drain NODE` on a cluster: sets the Host's `spec.drain` (`--undo` clears
/// it). The operator then moves the Host's Domains as their
/// `evictionStrategy` says; `kubectl get hosts` shows DRAIN, and the Host's
/// `Drained` condition how far it got.
pub fn drain(conn: &Connection, a: &DrainArgs) -> Result<Output> {
    if !cluster::is_kube_uri(conn.uri()) {
        bail!(
            "drain moves a cluster's Domains off a node: use it on kube:/// (this connection is {})",
            conn.uri()
        );
    }
    let kube = cluster::open_kube(conn.uri())?;
    let hosts: Api<vireo_crds::Host> = Api::all(kube.client().clone());
    let patch = serde_json::json!({"spec": {"drain": !a.undo}});
    kube.block_on(hosts.patch(
        &a.node,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    ))
    .map_err(|e| anyhow!(cluster::api_error(vireo_crds::ObjectKind::Host, &a.node, e)))?;
    Ok(Output::Message(if a.undo {
        format!("Host '{}' undrained: it takes Domains again", a.node)
    } else {
        format!(
            "Host '{}' draining: Domains with evictionStrategy LiveMigrate migrate, Shutdown move after a shutdown, None stay (kubectl get host {} -o jsonpath='{{.status.conditions}}')",
            a.node, a.node
        )
    }))
}
