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
//! * Disks (`copyStorage`): after the snapshot, still paused, each
//!   writable disk's data (the runs that are not holes, not zeros) on the
//!   same stream, into the target's volume of the same size.
//! * finish (target): `resume`. confirm (source): the generic driver.
//!
//! There is no dirty-page pre-copy: the guest is paused from the snapshot
//! until the target has restored it (and has the disks), and that is the
//! downtime reported.

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
/// A disk section's magic (vireo-vmm's `migration` module).
const DISK_MAGIC: &[u8; 8] = b"VIREODSK";
/// Disk bytes read and sent at a time.
const DISK_CHUNK: usize = 1 << 20;
/// Longest answer line accepted from the target.
const MAX_ANSWER: u64 = 64 << 10;

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
    let indexes = exports
        .iter()
        .map(|(_, name)| super::launched_disk(paths, name).map(|(i, _)| i))
        .collect::<Result<Vec<_>, _>>()?;
    let listen = SocketAddr::new(address, 0);
    let answer = vmm.call(
        paths,
        json!({ "command": "migrate-incoming", "listen": listen.to_string(), "disks": indexes }),
    )?;
    let port = answer
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("migrate-incoming answered without a port: {answer}"))?;
    let uri = format!("tcp:{}", SocketAddr::new(address, port));
    Ok(MigrationIncoming {
        // The disks' data follows the state on the same stream.
        disks: exports
            .iter()
            .map(|(_, name)| (name.clone(), uri.clone()))
            .collect(),
        uri,
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
            "aborted (domjobabort) after {} bytes to {} (the state has {}): the guest stays on this node",
            self.sent, self.to, self.total
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

/// One disk's section: header, the runs of data that are not holes and
/// not all zeros (1 MiB at a time), the end. Returns the data bytes sent.
fn send_disk(
    pacer: &mut Pacer<'_>,
    stream: &mut TcpStream,
    index: usize,
    file: &std::fs::File,
) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut header = DISK_MAGIC.to_vec();
    header.extend_from_slice(&(index as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&size.to_le_bytes());
    pacer.write_all(stream, &header)?;
    let mut buf = vec![0u8; DISK_CHUNK];
    let mut sent = 0u64;
    let mut at = 0u64;
    while at < size {
        at = match next_data(file, at) {
            Some(d) if d < size => d,
            _ => break,
        };
        let n = (size - at).min(DISK_CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("reading at {at}: {e}"))?;
        if buf[..n].iter().any(|&b| b != 0) {
            let mut run = at.to_le_bytes().to_vec();
            run.extend_from_slice(&(n as u64).to_le_bytes());
            pacer.write_all(stream, &run)?;
            pacer.write_all(stream, &buf[..n])?;
            sent += n as u64;
        }
        at += n as u64;
    }
    let mut end = u64::MAX.to_le_bytes().to_vec();
    end.extend_from_slice(&0u64.to_le_bytes());
    pacer.write_all(stream, &end)?;
    Ok(sent)
}

/// The first offset at or after `from` that is not in a hole (`from`
/// itself where the filesystem cannot tell); `None` past the last data.
fn next_data(file: &std::fs::File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let off = libc::off_t::try_from(from).ok()?;
    // SAFETY: lseek on a descriptor `file` owns for the call's duration;
    // SEEK_DATA only moves the file offset, which nothing else here uses
    // (reads are positioned).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        return u64::try_from(r).ok();
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        _ => Some(from),
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
    let to = parse_uri(&incoming.uri)?;
    let disks = copies
        .iter()
        .map(|(_, name)| {
            let (index, path) = super::launched_disk(paths, name)?;
            let file = std::fs::File::open(&path)
                .map_err(|e| format!("disk {name}: {}: {e}", path.display()))?;
            Ok((index, name.clone(), file))
        })
        .collect::<Result<Vec<_>, String>>()?;
    for (name, _) in &incoming.disks {
        if !disks.iter().any(|(_, n, _)| n == name) {
            return Err(format!(
                "the target expects the data of disk {name}, which this migration does not copy (copyStorage differs between prepare and perform)"
            ));
        }
    }
    if disks.len() != incoming.disks.len() {
        return Err(format!(
            "the target expects {} disks' data, this migration copies {} (copyStorage differs between prepare and perform)",
            incoming.disks.len(),
            disks.len()
        ));
    }
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
    let mut disk_bytes = 0u64;
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
    })()
    .and_then(|()| {
        if pacer.sent != len + 24 {
            return Err(format!(
                "the snapshot changed while it was sent ({} of {} bytes)",
                pacer.sent,
                len + 24
            ));
        }
        for (index, name, file) in &disks {
            disk_bytes += send_disk(&mut pacer, &mut stream, *index, file)
                .map_err(|e| format!("disk {name}: {e}"))?;
        }
        Ok(())
    });
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
        disk_bytes,
        snapshot_ms,
        downtime_ms,
        "kvm migration: the target has the state"
    );
    Ok(MigrationStats {
        total_ms: started.elapsed().as_millis().max(1) as u64,
        downtime_ms,
        memory_bytes: len + 24,
        disk_bytes,
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
