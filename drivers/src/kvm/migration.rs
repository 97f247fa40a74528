//! Live migration under the kvm driver: stop-and-copy of vireo-vmm's own
//! snapshot over TCP (docs/save-restore.md, "Live migration", kvm).
//!
//! * prepare (target): vireo-vmm starts with `--incoming FILE` (no machine
//!   yet; its API answers `info` as a paused VM), and `migrate-incoming`
//!   makes it listen on the target address (a free port).
//! * perform (source): connects first (a target that does not answer
//!   leaves the guest running, untouched), then asks the VMM for its
//!   snapshot with `after: pause` into a spool file in the run directory,
//!   and sends it behind a preamble (magic `VIREOMIG`, stream version,
//!   length), paced by `bandwidthMiBs` and polling `domjobabort`. The
//!   target writes it to FILE, checks it whole (snapshot header, version,
//!   checksum), restores the machine paused and answers one JSON line.
//! * finish (target): `resume`. confirm (source): the generic driver.
//!
//! There is no dirty-page pre-copy: the guest is paused from the snapshot
//! until the target has restored it, and that is the downtime reported.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Vmm;
use crate::migration::{MigrationIncoming, MigrationParams, MigrationStats};
use crate::vm::{Backend, RunPaths};

/// The stream's magic and version (vireo-vmm's `migration` module).
const MAGIC: &[u8; 8] = b"VIREOMIG";
const STREAM_VERSION: u32 = 1;
/// How long the connection to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the target may take nothing, or take to answer after the last
/// byte (it checks the snapshot and builds the machine).
const STALL_LIMIT: Duration = Duration::from_secs(120);
/// How often a wait looks at `domjobabort`.
const POLL: Duration = Duration::from_millis(100);
/// Bytes per write.
const CHUNK: usize = 256 << 10;
/// Longest answer line accepted from the target.
const MAX_ANSWER: u64 = 64 << 10;

/// The refusal of node-local disk copies.
pub(super) fn no_disk_copies(disks: &[(usize, String)]) -> String {
    let names: Vec<&str> = disks.iter().map(|(_, n)| n.as_str()).collect();
    format!(
        "the kvm driver does not copy disks yet (copyStorage with disks {}): put them on storage both nodes share, or migrate with the qemu driver",
        names.join(", ")
    )
}

/// The preamble in front of a snapshot of `len` bytes.
fn preamble(len: u64) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[..8].copy_from_slice(MAGIC);
    p[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
    p[16..24].copy_from_slice(&len.to_le_bytes());
    p
}

/// `tcp:ADDR:PORT` (an IP address, IPv6 in brackets).
fn parse_uri(uri: &str) -> Result<SocketAddr, String> {
    uri.strip_prefix("tcp:")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("migration URI '{uri}': expected tcp:ADDRESS:PORT"))
}

/// Target: makes the waiting vireo-vmm listen on `address` (a free port).
pub(super) fn listen(
    vmm: &Vmm,
    paths: &RunPaths,
    address: IpAddr,
    exports: &[(usize, String)],
) -> Result<MigrationIncoming, String> {
    if !exports.is_empty() {
        return Err(no_disk_copies(exports));
    }
    let listen = SocketAddr::new(address, 0);
    let answer = vmm.call(
        paths,
        json!({ "command": "migrate-incoming", "listen": listen.to_string() }),
    )?;
    let port = answer
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("migrate-incoming answered without a port: {answer}"))?;
    Ok(MigrationIncoming {
        uri: format!("tcp:{}", SocketAddr::new(address, port)),
        disks: Vec::new(),
        cookie: json!({ "driver": "kvm", "stream": "vireo-vmm snapshot", "version": STREAM_VERSION }),
    })
}

/// Target, at finish: the machine must be restored (not still waiting).
pub(super) fn resume_target(vmm: &Vmm, paths: &RunPaths) -> Result<(), String> {
    let info = vmm.call(paths, json!({ "command": "info" }))?;
    if let Some(phase) = info.get("incoming").and_then(Value::as_str) {
        return Err(format!(
            "the target has no guest state yet (vireo-vmm is {phase} for the migration stream)"
        ));
    }
    vmm.call(paths, json!({ "command": "resume" })).map(drop)
}

/// Removes the spool file however the send ends.
struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sends at most `cap` bytes a second, polling `aborted`.
struct Pacer<'a> {
    started: Instant,
    sent: u64,
    total: u64,
    cap: Option<u64>,
    aborted: &'a dyn Fn() -> bool,
    to: SocketAddr,
}

impl Pacer<'_> {
    fn abort_error(&self) -> String {
        format!(
            "aborted (domjobabort) after {} of {} bytes to {}: the guest stays on this node",
            self.sent, self.total, self.to
        )
    }

    fn write_all(&mut self, stream: &mut TcpStream, mut buf: &[u8]) -> Result<(), String> {
        let mut progress = Instant::now();
        while !buf.is_empty() {
            if (self.aborted)() {
                return Err(self.abort_error());
            }
            if let Some(cap) = self.cap {
                let due = Duration::from_secs_f64(self.sent as f64 / cap as f64);
                let elapsed = self.started.elapsed();
                if elapsed < due {
                    std::thread::sleep((due - elapsed).min(POLL));
                    progress = Instant::now();
                    continue;
                }
            }
            let n = buf.len().min(CHUNK);
            match stream.write(&buf[..n]) {
                Ok(0) => {
                    return Err(format!(
                        "the migration target {} closed the connection",
                        self.to
                    ));
                }
                Ok(w) => {
                    buf = &buf[w..];
                    self.sent += w as u64;
                    progress = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    if progress.elapsed() > STALL_LIMIT {
                        return Err(format!(
                            "the migration target {} took nothing for {} s",
                            self.to,
                            STALL_LIMIT.as_secs()
                        ));
                    }
                }
                Err(e) => return Err(format!("sending to the migration target {}: {e}", self.to)),
            }
        }
        Ok(())
    }

    /// The target's answer line, once it has the state.
    fn answer(&self, stream: &mut TcpStream, patience: Duration) -> Result<Value, String> {
        let waited = Instant::now();
        let mut line = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if (self.aborted)() {
                return Err(format!(
                    "aborted (domjobabort) while waiting for the target {} to restore the state: the guest stays on this node",
                    self.to
                ));
            }
            match stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "the migration target {} closed the connection without an answer",
                        self.to
                    ));
                }
                Ok(n) => {
                    line.extend_from_slice(&chunk[..n]);
                    if let Some(end) = line.iter().position(|&b| b == b'\n') {
                        line.truncate(end);
                        break;
                    }
                    if line.len() as u64 > MAX_ANSWER {
                        return Err(format!(
                            "the migration target {} answered more than {MAX_ANSWER} bytes without a line end",
                            self.to
                        ));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    if waited.elapsed() > patience {
                        return Err(format!(
                            "the migration target {} did not answer within {} s of the last byte",
                            self.to,
                            patience.as_secs()
                        ));
                    }
                }
                Err(e) => {
                    return Err(format!(
                        "reading the answer of the migration target {}: {e}",
                        self.to
                    ));
                }
            }
        }
        serde_json::from_slice(&line).map_err(|e| {
            format!(
                "the migration target {} answered something else than JSON ({e}): {}",
                self.to,
                String::from_utf8_lossy(&line)
            )
        })
    }
}

/// Source: connects, snapshots (the guest pauses), sends, and waits for
/// the target to have restored the state. On an error the guest may be
/// paused: the generic driver resumes it.
pub(super) fn send(
    vmm: &Vmm,
    paths: &RunPaths,
    incoming: &MigrationIncoming,
    params: &MigrationParams,
    copies: &[(usize, String)],
    aborted: &dyn Fn() -> bool,
) -> Result<MigrationStats, String> {
    if !copies.is_empty() {
        return Err(no_disk_copies(copies));
    }
    let to = parse_uri(&incoming.uri)?;
    let started = Instant::now();
    if aborted() {
        return Err("aborted (domjobabort) before anything was sent".into());
    }
    // Before the guest is touched: a target that does not answer leaves it
    // running as it was.
    let mut stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .map_err(|e| format!("the migration target {to} does not answer: {e}"))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_write_timeout(Some(POLL)))
        .and_then(|()| stream.set_read_timeout(Some(POLL)))
        .map_err(|e| format!("the connection to {to}: {e}"))?;
    if aborted() {
        return Err("aborted (domjobabort) before anything was sent".into());
    }
    // The snapshot, taken paused and left paused, spooled locally so that
    // the VMM's event loop is not held by the network's pace.
    let spool = Spool(paths.dir.join("migration-out.snap"));
    std::fs::File::create(&spool.0).map_err(|e| format!("{}: {e}", spool.0.display()))?;
    let paused_at = Instant::now();
    vmm.save_state(paths, &spool.0)
        .map_err(|e| format!("taking the guest's snapshot: {e}"))?;
    let snapshot_ms = paused_at.elapsed().as_millis() as u64;
    let mut file =
        std::fs::File::open(&spool.0).map_err(|e| format!("{}: {e}", spool.0.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", spool.0.display()))?
        .len();
    let mut pacer = Pacer {
        started: Instant::now(),
        sent: 0,
        total: len + 24,
        cap: params
            .bandwidth_mib_s
            .filter(|&b| b > 0)
            .map(|b| b.saturating_mul(1 << 20)),
        aborted,
        to,
    };
    let written = (|| {
        pacer.write_all(&mut stream, &preamble(len))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", spool.0.display()))?;
            if n == 0 {
                return Ok(());
            }
            pacer.write_all(&mut stream, &buf[..n])?;
        }
    })();
    if let Err(e) = written {
        // A target that refused the stream early may have said why.
        if !aborted()
            && let Ok(answer) = pacer.answer(&mut stream, Duration::from_secs(1))
            && let Some(why) = answer.get("error").and_then(Value::as_str)
        {
            return Err(format!(
                "the migration target {to} refused the state: {why}"
            ));
        }
        return Err(e);
    }
    if pacer.sent != pacer.total {
        return Err(format!(
            "the snapshot changed while it was sent ({} of {} bytes)",
            pacer.sent, pacer.total
        ));
    }
    let answer = pacer.answer(&mut stream, STALL_LIMIT)?;
    if answer.get("ok").and_then(Value::as_bool) != Some(true) {
        let why = answer
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        return Err(format!(
            "the migration target {to} refused the state: {why}"
        ));
    }
    let downtime_ms = paused_at.elapsed().as_millis() as u64;
    if let Some(max) = params.max_downtime_ms.filter(|&m| downtime_ms > m) {
        // Stop-and-copy cannot keep to a limit; it is said, not enforced.
        tracing::warn!(
            downtime_ms,
            max_downtime_ms = max,
            "the kvm driver migrates by stop-and-copy: the downtime was above the limit asked"
        );
    }
    tracing::info!(
        to = %to,
        bytes = pacer.sent,
        snapshot_ms,
        downtime_ms,
        "kvm migration: the target has the state"
    );
    Ok(MigrationStats {
        total_ms: started.elapsed().as_millis().max(1) as u64,
        downtime_ms,
        memory_bytes: pacer.sent,
        disk_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_preambles() {
        assert_eq!(
            parse_uri("tcp:10.0.0.2:4000"),
            Ok("10.0.0.2:4000".parse().expect("addr"))
        );
        assert_eq!(
            parse_uri("tcp:[fd00::2]:4000"),
            Ok("[fd00::2]:4000".parse().expect("addr"))
        );
        for bad in ["10.0.0.2:4000", "tcp:host:1", "tcp:10.0.0.2", "nbd://x"] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        let p = preamble(0x0102);
        assert_eq!(&p[..8], b"VIREOMIG");
        assert_eq!(&p[8..12], &1u32.to_le_bytes());
        assert_eq!(&p[16..24], &0x0102u64.to_le_bytes());
        let e = no_disk_copies(&[(0, "vda".into())]);
        assert!(e.contains("does not copy disks yet") && e.contains("vda"), "{e}");
    }

    #[test]
    fn the_send_keeps_to_the_bandwidth_and_stops_when_aborted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let to = listener.local_addr().expect("addr");
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut sink = vec![0u8; 1 << 16];
            let mut got = 0u64;
            while let Ok(n) = s.read(&mut sink) {
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            got
        });
        let mut stream = TcpStream::connect(to).expect("connect");
        stream.set_write_timeout(Some(POLL)).expect("timeout");
        let started = Instant::now();
        let aborted = || started.elapsed() > Duration::from_millis(1500);
        let mut pacer = Pacer {
            started,
            sent: 0,
            total: 8 << 20,
            cap: Some(1 << 20),
            aborted: &aborted,
            to,
        };
        let e = pacer
            .write_all(&mut stream, &vec![7u8; 8 << 20])
            .expect_err("aborted");
        drop(stream);
        let got = reader.join().expect("reader");
        assert!(e.starts_with("aborted (domjobabort) after "), "{e}");
        // About 1.5 s at 1 MiB/s (one chunk ahead at most).
        assert!(
            (1 << 20..=(2 << 20) + CHUNK as u64).contains(&pacer.sent),
            "{} bytes sent",
            pacer.sent
        );
        assert_eq!(got, pacer.sent);
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
