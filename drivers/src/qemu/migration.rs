//! Live migration between two QEMU processes over QMP (see
//! `docs/save-restore.md`, "Live migration"):
//!
//! * target: QEMU started with `-incoming defer -S`; [`listen`] runs
//!   `migrate-incoming tcp:ADDR:PORT` and, when disks are copied,
//!   `nbd-server-start` on the same address with a writable
//!   `block-export-add` per disk;
//! * source: [`send`] mirrors each copied disk to its export
//!   (`blockdev-add` of an NBD client, `blockdev-mirror sync=full`) until
//!   the jobs are ready, then `migrate` with `pause-before-switchover`: at
//!   `pre-switchover` the guest is stopped, the mirrors are cancelled
//!   (after READY a cancel leaves the target a consistent copy of the
//!   moment) and `migrate-continue` sends the last state;
//! * target again: [`resume`] stops the NBD server and `cont`s.

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::qmp::{Qmp, QmpError};
use crate::migration::{MigrationIncoming, MigrationParams, MigrationStats};

/// Why a send that was asked to stop failed.
pub const ABORTED: &str = "the migration was aborted (domjobabort); nothing was switched over";

/// How often the migration and the block jobs are polled.
const POLL: Duration = Duration::from_millis(20);
/// How long a target may take to load the last state after the source
/// says it has sent everything, and block jobs to go once cancelled.
const SETTLE: Duration = Duration::from_secs(30);

/// QEMU's monitor, connected for each command: the QMP socket takes one
/// client at a time, and a migration takes long, so the driver's other
/// calls (the state, the watcher) get their turn between polls.
pub struct Monitor {
    path: PathBuf,
    timeout: Duration,
}

impl Monitor {
    pub fn new(path: &Path, timeout: Duration) -> Self {
        Self {
            path: path.to_path_buf(),
            timeout,
        }
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        Qmp::connect(&self.path, self.timeout)?.execute(command, arguments)
    }
}

fn e(err: QmpError) -> String {
    err.to_string()
}

/// `ADDR:PORT`, with brackets for IPv6.
fn host_port(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A TCP port free on `address` now (bound and released: QEMU binds it
/// right after).
fn free_port(address: IpAddr) -> Result<u16, String> {
    let listener = TcpListener::bind((address, 0))
        .map_err(|err| format!("cannot listen on {address} on this node: {err}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|err| err.to_string())
}

/// Target side: listens for the state and serves the disks to copy
/// (`exports`: index of the disk's `disk{i}` node, the disk's name).
pub fn listen(
    q: &mut Monitor,
    address: IpAddr,
    exports: &[(usize, String)],
) -> Result<MigrationIncoming, String> {
    let mut disks = Vec::new();
    if !exports.is_empty() {
        let port = free_port(address)?;
        q.execute(
            "nbd-server-start",
            Some(json!({
                "addr": { "type": "inet", "data": {
                    "host": address.to_string(), "port": port.to_string() } }
            })),
        )
        .map_err(e)?;
        for (index, name) in exports {
            q.execute(
                "block-export-add",
                Some(json!({
                    "type": "nbd", "id": format!("migrate-{name}"),
                    "node-name": format!("disk{index}"), "name": name,
                    "writable": true
                })),
            )
            .map_err(e)?;
            disks.push((
                name.clone(),
                format!("nbd://{}/{name}", host_port(address, port)),
            ));
        }
    }
    let port = free_port(address)?;
    let uri = format!("tcp:{}", host_port(address, port));
    q.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .map_err(e)?;
    Ok(MigrationIncoming {
        uri,
        disks,
        cookie: json!({ "driver": "qemu" }),
    })
}

/// `nbd://HOST:PORT/NAME` → (host, port, export name).
fn parse_nbd(uri: &str) -> Option<(String, String, String)> {
    let rest = uri.strip_prefix("nbd://")?;
    let (authority, export) = rest.split_once('/')?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.to_string(), export.to_string()))
}

/// The block jobs QEMU runs now, by id: (ready, bytes done).
fn jobs(q: &mut Monitor) -> Result<Vec<(String, bool, u64)>, String> {
    let all = q.execute("query-block-jobs", None).map_err(e)?;
    Ok(all
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| {
            Some((
                j.get("device")?.as_str()?.to_string(),
                j.get("ready").and_then(Value::as_bool).unwrap_or(false),
                j.get("offset").and_then(Value::as_u64).unwrap_or(0),
            ))
        })
        .collect())
}

/// What the source has set up, to undo on failure.
#[derive(Default)]
struct Copies {
    /// NBD client nodes added.
    nodes: Vec<String>,
    /// Mirror jobs started and not yet ended.
    jobs: Vec<String>,
    /// Bytes the mirrors copied.
    bytes: u64,
}

impl Copies {
    /// Cancels the jobs (`force`: a failure's) and waits until they are
    /// gone, then removes the NBD client nodes.
    fn cancel(&mut self, q: &mut Monitor, force: bool) -> Result<(), String> {
        if !self.jobs.is_empty() {
            if let Ok(now) = jobs(q) {
                self.bytes = now
                    .iter()
                    .filter(|(id, _, _)| self.jobs.contains(id))
                    .map(|(_, _, b)| b)
                    .sum();
            }
            for job in &self.jobs {
                let args = if force {
                    json!({ "device": job, "force": true })
                } else {
                    json!({ "device": job })
                };
                q.execute("block-job-cancel", Some(args)).map_err(e)?;
            }
            let since = Instant::now();
            loop {
                let left = jobs(q)?;
                if !left.iter().any(|(id, _, _)| self.jobs.contains(id)) {
                    break;
                }
                if since.elapsed() > SETTLE {
                    return Err(format!(
                        "the disk copies did not end within {}s of being cancelled",
                        SETTLE.as_secs()
                    ));
                }
                std::thread::sleep(POLL);
            }
            self.jobs.clear();
        }
        for node in std::mem::take(&mut self.nodes) {
            q.execute("blockdev-del", Some(json!({ "node-name": node })))
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Source side: copies the disks of `copies` (index of `disk{i}`, name) to
/// the target's exports and sends the state; returns once the source is
/// paused (`postmigrate`) with everything sent. On an error, or when
/// `aborted` says so while it waits, the migration and the copies are
/// cancelled; the guest may be left paused.
pub fn send(
    q: &mut Monitor,
    incoming: &MigrationIncoming,
    params: &MigrationParams,
    copies: &[(usize, String)],
    aborted: &dyn Fn() -> bool,
) -> Result<MigrationStats, String> {
    if let Some(driver) = incoming.cookie.get("driver").and_then(Value::as_str)
        && driver != "qemu"
    {
        return Err(format!(
            "the target was prepared by the {driver} driver, not the qemu driver"
        ));
    }
    let started = Instant::now();
    let mut set_up = Copies::default();
    let result = send_inner(q, incoming, params, copies, &mut set_up, started, aborted);
    match result {
        Ok(stats) => Ok(stats),
        Err(why) => {
            let _ = q.execute("migrate_cancel", None);
            if let Err(more) = set_up.cancel(q, true) {
                tracing::warn!(error = %more, "cancelling the disk copies after a failed migration");
            }
            Err(why)
        }
    }
}

fn send_inner(
    q: &mut Monitor,
    incoming: &MigrationIncoming,
    params: &MigrationParams,
    copies: &[(usize, String)],
    set_up: &mut Copies,
    started: Instant,
    aborted: &dyn Fn() -> bool,
) -> Result<MigrationStats, String> {
    let abort = || -> Result<(), String> {
        if aborted() {
            Err(ABORTED.to_string())
        } else {
            Ok(())
        }
    };
    // 1. The disks: a mirror each, until all are in sync.
    for (index, name) in copies {
        let uri = incoming
            .disks
            .iter()
            .find(|(disk, _)| disk == name)
            .map(|(_, uri)| uri)
            .ok_or_else(|| {
                format!(
                    "the target serves no copy of disk {name} (was it prepared with copyStorage?)"
                )
            })?;
        let (host, port, export) =
            parse_nbd(uri).ok_or_else(|| format!("disk {name}: '{uri}' is not an nbd:// URI"))?;
        let node = format!("migrate-{name}");
        // A client node an earlier, failed migration could not remove
        // (QEMU refuses a second of the same name): gone first, if unused.
        let _ = q.execute("blockdev-del", Some(json!({ "node-name": node })));
        q.execute(
            "blockdev-add",
            Some(json!({
                "driver": "nbd", "node-name": node, "export": export,
                "server": { "type": "inet", "host": host, "port": port }
            })),
        )
        .map_err(|err| format!("disk {name}: connecting to the target's {uri}: {err}"))?;
        set_up.nodes.push(node.clone());
        q.execute(
            "blockdev-mirror",
            Some(json!({
                "job-id": node, "device": format!("disk{index}"),
                "target": node, "sync": "full"
            })),
        )
        .map_err(|err| format!("disk {name}: starting its copy: {err}"))?;
        set_up.jobs.push(node);
    }
    loop {
        let now = jobs(q)?;
        let mut all_ready = true;
        for job in &set_up.jobs {
            match now.iter().find(|(id, _, _)| id == job) {
                Some((_, ready, _)) => all_ready &= *ready,
                None => {
                    return Err(format!(
                        "the copy of disk {} ended before it was in sync (the target's export went away, or a read or write failed)",
                        job.trim_start_matches("migrate-")
                    ));
                }
            }
        }
        if all_ready {
            break;
        }
        abort()?;
        std::thread::sleep(POLL);
    }
    // 2. The state. With disks, QEMU stops at pre-switchover so that the
    // copies end while the guest writes nothing.
    let copying = !set_up.jobs.is_empty();
    q.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "pause-before-switchover", "state": copying }
        ] })),
    )
    .map_err(e)?;
    let mut parameters = json!({
        // QEMU's default cap (32 MiB/s) is no one's choice; none unless asked.
        "max-bandwidth": params
            .bandwidth_mib_s
            .map(|m| m.saturating_mul(1 << 20))
            .unwrap_or(1 << 40),
    });
    if let Some(ms) = params.max_downtime_ms {
        parameters["downtime-limit"] = json!(ms);
    }
    q.execute("migrate-set-parameters", Some(parameters))
        .map_err(e)?;
    q.execute("migrate", Some(json!({ "uri": incoming.uri })))
        .map_err(|err| format!("starting the migration to {}: {err}", incoming.uri))?;
    // With disk copies QEMU stops the guest at pre-switchover, and its own
    // `downtime` leaves out the copies' ending: the pause counts from there.
    let mut stopped: Option<Instant> = None;
    loop {
        let info = q.execute("query-migrate", None).map_err(e)?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => {
                let num = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
                let paused_ms = stopped.map_or(0, |at| at.elapsed().as_millis() as u64);
                return Ok(MigrationStats {
                    total_ms: started.elapsed().as_millis() as u64,
                    downtime_ms: num(info.get("downtime")).max(paused_ms),
                    memory_bytes: num(info.get("ram").and_then(|r| r.get("transferred"))),
                    disk_bytes: set_up.bytes,
                });
            }
            Some("failed") | Some("cancelled") => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(format!(
                    "QEMU's migration to {} failed: {why}",
                    incoming.uri
                ));
            }
            Some("pre-switchover") => {
                stopped.get_or_insert_with(Instant::now);
                set_up.cancel(q, false)?;
                q.execute(
                    "migrate-continue",
                    Some(json!({ "state": "pre-switchover" })),
                )
                .map_err(e)?;
            }
            _ => {
                abort()?;
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Target side, after a migration that succeeded: waits for the last
/// state to load, stops serving disks, and runs the guest.
pub fn resume(q: &mut Monitor) -> Result<(), String> {
    let since = Instant::now();
    loop {
        let status = q.execute("query-status", None).map_err(e)?;
        match status.get("status").and_then(Value::as_str) {
            Some("inmigrate") if since.elapsed() < SETTLE => std::thread::sleep(POLL),
            Some("inmigrate") => {
                return Err(format!(
                    "the target has not received the whole state {}s after the source sent it",
                    SETTLE.as_secs()
                ));
            }
            Some(_) => break,
            None => return Err(format!("query-status answered {status}")),
        }
    }
    let info = q.execute("query-migrate", None).map_err(e)?;
    if let Some(status) = info.get("status").and_then(Value::as_str)
        && status != "completed"
    {
        return Err(format!(
            "the incoming migration is '{status}', not completed"
        ));
    }
    match q.execute("nbd-server-stop", None) {
        Ok(_) => {}
        // No disks were copied: no server runs.
        Err(QmpError::Qemu { desc, .. }) if desc.contains("not running") => {}
        Err(err) => return Err(e(err)),
    }
    q.execute("cont", None).map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_parse_with_ipv4_and_ipv6() {
        assert_eq!(
            parse_nbd("nbd://10.0.0.2:49153/vda"),
            Some(("10.0.0.2".into(), "49153".into(), "vda".into()))
        );
        assert_eq!(
            parse_nbd("nbd://[fd00::2]:10809/vdb"),
            Some(("fd00::2".into(), "10809".into(), "vdb".into()))
        );
        assert_eq!(parse_nbd("tcp:10.0.0.2:1"), None);
        assert_eq!(
            host_port("fd00::2".parse().unwrap(), 5),
            "[fd00::2]:5".to_string()
        );
    }
}
