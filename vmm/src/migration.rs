//! Incoming live migration (`run --incoming FILE`): the VMM starts without
//! a machine, answers its API as a paused VM waiting for its state, and on
//! `migrate-incoming` listens on TCP for the source's stream. The stream
//! is this crate's snapshot (crate::snapshot) behind a small preamble:
//!
//! ```text
//! offset 0   8 bytes  magic "VIREOMIG"
//! offset 8   4 bytes  stream version (1), little endian
//! offset 12  4 bytes  0
//! offset 16  8 bytes  length L of the snapshot that follows
//! offset 24  L bytes  a vireo-vmm snapshot file, as `snapshot` sends it
//!            then, for each disk `migrate-incoming` named, in its order:
//!            8 bytes  magic "VIREODSK"
//!            4 bytes  the disk's index among --disk, 4 bytes 0
//!            8 bytes  the disk's size in bytes (the target's must match)
//!            runs, each: 8 bytes offset, 8 bytes length, the bytes;
//!            ended by offset 2^64-1, length 0. What no run covers is
//!            zeros (the target's file is emptied first).
//! ```
//!
//! The receiver bounds L by the largest snapshot the machine on its
//! command line can have, writes it to FILE, and checks it whole (header,
//! version, checksum, state) before it builds anything: a stream that is
//! refused gets one line saying why, and the VMM waits for another. Once
//! the machine is restored (paused) the source gets `{"ok":true}`; the
//! driver resumes the guest with `resume` (docs/save-restore.md, "Live
//! migration", kvm).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use serde_json::{Value, json};

use crate::snapshot::{HEADER_LEN, MAX_STATE, PAGE};

/// The stream's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"VIREOMIG";
/// The stream format this build sends and receives.
pub const VERSION: u32 = 1;
/// Bytes before the snapshot.
pub const PREAMBLE_LEN: usize = 24;
/// How long a read from the source may wait.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("not a vireo-vmm migration stream (bad magic)")]
    Magic,
    #[error("migration stream version {0}; this vireo-vmm receives version {VERSION}")]
    Version(u32),
    #[error(
        "the stream announces a {len}-byte snapshot; a machine of this size sends at most {max}"
    )]
    TooLong { len: u64, max: u64 },
    #[error("the stream ended after {got} of {len} snapshot bytes")]
    Short { got: u64, len: u64 },
    #[error("{0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("disk {index}: {msg}")]
    Disk { index: usize, msg: String },
    #[error("receiving the migration stream: {0}")]
    Io(#[from] io::Error),
}

/// The preamble in front of a snapshot of `len` bytes.
pub fn preamble(len: u64) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(MAGIC);
    p[8..12].copy_from_slice(&VERSION.to_le_bytes());
    p[16..24].copy_from_slice(&len.to_le_bytes());
    p
}

/// The largest snapshot of a machine with `memory_bytes` of RAM: header,
/// state length and state, every page non-zero and in a run of its own,
/// the end marker.
pub fn max_snapshot_len(memory_bytes: u64) -> u64 {
    let pages = memory_bytes.div_ceil(PAGE);
    HEADER_LEN
        .saturating_add(4 + u64::from(MAX_STATE))
        .saturating_add(memory_bytes)
        .saturating_add(pages.saturating_mul(16))
        .saturating_add(16)
}

/// Reads a preamble and the snapshot after it from `from` into `file`
/// (truncated first), and checks the snapshot. Returns its length.
pub fn receive(
    from: &mut impl Read,
    file: &mut File,
    memory_bytes: u64,
) -> Result<u64, IncomingError> {
    let mut p = [0u8; PREAMBLE_LEN];
    from.read_exact(&mut p)?;
    if &p[..8] != MAGIC {
        return Err(IncomingError::Magic);
    }
    let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    if version != VERSION {
        return Err(IncomingError::Version(version));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&p[16..24]);
    let len = u64::from_le_bytes(l);
    let max = max_snapshot_len(memory_bytes);
    if len > max {
        return Err(IncomingError::TooLong { len, max });
    }
    file.set_len(0)?;
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(0))?;
    let got = io::copy(&mut from.take(len), file)?;
    if got != len {
        return Err(IncomingError::Short { got, len });
    }
    file.flush()?;
    // The whole snapshot, checked before it is believed (the restore reads
    // it again to build the machine).
    crate::snapshot::parse(file, 0)?;
    Ok(len)
}

/// The magic of a disk's section.
pub const DISK_MAGIC: &[u8; 8] = b"VIREODSK";
const END: u64 = u64::MAX;
/// Bytes copied at a time.
const DISK_CHUNK: u64 = 1 << 20;

/// Reads one disk's section from `from` into `disk` (index `index`):
/// checks its header against the file, empties the file and writes each
/// run where it goes. Returns the bytes written.
pub fn receive_disk(from: &mut impl Read, index: usize, disk: &File) -> Result<u64, IncomingError> {
    use std::os::unix::fs::FileExt;
    let bad = |msg: String| IncomingError::Disk { index, msg };
    let mut h = [0u8; 24];
    from.read_exact(&mut h)?;
    if &h[..8] != DISK_MAGIC {
        return Err(bad("the stream has no disk section here (bad magic)".into()));
    }
    let said = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if said != index {
        return Err(bad(format!("the stream sends disk {said} instead")));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&h[16..24]);
    let size = u64::from_le_bytes(w);
    let meta = disk.metadata()?;
    if !meta.is_file() {
        return Err(bad(
            "not a regular file: disks are copied into raw files only".into(),
        ));
    }
    if meta.len() != size {
        return Err(bad(format!(
            "the source's disk has {size} bytes, this one {}",
            meta.len()
        )));
    }
    // Zeros wherever no run lands (and a sparse file).
    disk.set_len(0)?;
    disk.set_len(size)?;
    let mut buf = vec![0u8; DISK_CHUNK as usize];
    let mut written = 0u64;
    loop {
        let mut r = [0u8; 16];
        from.read_exact(&mut r)?;
        let mut o = [0u8; 8];
        o.copy_from_slice(&r[..8]);
        let offset = u64::from_le_bytes(o);
        o.copy_from_slice(&r[8..]);
        let len = u64::from_le_bytes(o);
        if offset == END {
            if len != 0 {
                return Err(bad("malformed end of the disk's runs".into()));
            }
            return Ok(written);
        }
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(bad(format!(
                "a run of {len} bytes at {offset} does not fit the {size}-byte disk"
            )));
        }
        let mut at = offset;
        let mut left = len;
        while left > 0 {
            let n = left.min(DISK_CHUNK) as usize;
            from.read_exact(&mut buf[..n])?;
            disk.write_all_at(&buf[..n], at)?;
            at += n as u64;
            left -= n as u64;
            written += n as u64;
        }
    }
}

/// Where a waiting VMM is, as `info` reports it.
const WAITING: u8 = 0;
const RECEIVING: u8 = 1;
const RESTORING: u8 = 2;

/// A VMM waiting for its state: what `info` says about it.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The `--disk`s: path, read-only.
    pub disks: Vec<(PathBuf, bool)>,
}

/// What `migrate-incoming` hands to the receiver: where to listen, and the
/// disks (indexes among `--disk`) whose data follows the snapshot.
type Listen = (TcpListener, Vec<usize>);

/// Serves the API at `api_socket` while no machine exists, until `stop`.
struct WaitingApi {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl WaitingApi {
    fn start(
        api_socket: &Path,
        info: Waiting,
        phase: Arc<AtomicU8>,
        listen: mpsc::Sender<Listen>,
    ) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(api_socket)
            && meta.file_type().is_socket()
        {
            std::fs::remove_file(api_socket)?;
        }
        let listener = UnixListener::bind(api_socket)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api-incoming".into())
            .spawn(move || {
                let mut listen = Some(listen);
                let mut bound: Option<SocketAddr> = None;
                while !stopping.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            serve(client, &info, &phase, &mut listen, &mut bound);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "API accept while waiting for the migration");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            path: api_socket.to_path_buf(),
        })
    }

    /// Stops serving and removes the socket (the machine binds its own).
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for WaitingApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One API client of a waiting VMM: a line each way, until it closes.
fn serve(
    client: UnixStream,
    info: &Waiting,
    phase: &AtomicU8,
    listen: &mut Option<mpsc::Sender<Listen>>,
    bound: &mut Option<SocketAddr>,
) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = client.set_write_timeout(Some(Duration::from_secs(2)));
    let Ok(mut writer) = client.try_clone() else {
        return;
    };
    let mut reader = io::BufReader::new(client.take(crate::api::MAX_LINE as u64));
    let mut line = String::new();
    use std::io::BufRead;
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        let answer = answer(&line, info, phase, listen, bound);
        line.clear();
        if writer.write_all(format!("{answer}\n").as_bytes()).is_err() {
            return;
        }
    }
}

fn answer(
    line: &str,
    info: &Waiting,
    phase: &AtomicU8,
    listen: &mut Option<mpsc::Sender<Listen>>,
    bound: &mut Option<SocketAddr>,
) -> Value {
    let phase_name = match phase.load(Ordering::SeqCst) {
        WAITING => "waiting",
        RECEIVING => "receiving",
        _ => "restoring",
    };
    match crate::api::parse(line) {
        Ok(crate::api::Request::Info) => json!({
            "ok": true,
            "state": "paused",
            "incoming": phase_name,
            "memory_bytes": info.memory_bytes,
            "vcpus": info.vcpus,
            "cpu_time_ns": 0,
            "boot_time_us": null,
            "pid": std::process::id(),
        }),
        Ok(crate::api::Request::MigrateIncoming {
            listen: addr,
            disks,
        }) => {
            if let Some(b) = bound {
                return crate::api::error(format!("already listening on {b}"));
            }
            for (n, &i) in disks.iter().enumerate() {
                match info.disks.get(i) {
                    None => {
                        return crate::api::error(format!(
                            "disks: no disk {i} (this VMM has {})",
                            info.disks.len()
                        ));
                    }
                    Some((_, true)) => {
                        return crate::api::error(format!("disks: disk {i} is read-only"));
                    }
                    Some(_) if disks[..n].contains(&i) => {
                        return crate::api::error(format!("disks: disk {i} named twice"));
                    }
                    Some(_) => {}
                }
            }
            let Some(tx) = listen.take() else {
                return crate::api::error("the migration listener has gone");
            };
            let addr: SocketAddr = match addr.parse() {
                Ok(a) => a,
                Err(_) => {
                    *listen = Some(tx);
                    return crate::api::error(format!(
                        "listen: '{addr}' is not an IP address and port"
                    ));
                }
            };
            match TcpListener::bind(addr).and_then(|l| Ok((l.local_addr()?, l))) {
                Ok((local, l)) => {
                    if tx.send((l, disks)).is_err() {
                        return crate::api::error("the migration receiver has gone");
                    }
                    *bound = Some(local);
                    tracing::info!(%local, "waiting for the migration stream");
                    json!({"ok": true, "port": local.port(), "address": local.to_string()})
                }
                Err(e) => {
                    *listen = Some(tx);
                    crate::api::error(format!("listening on {addr}: {e}"))
                }
            }
        }
        Ok(_) => crate::api::error(format!(
            "this VMM waits for an incoming migration ({phase_name}): only info and migrate-incoming are served"
        )),
        Err(e) => crate::api::error(e),
    }
}

/// Serves the waiting API at `api_socket` and receives the stream into
/// `file`: returns once a whole snapshot that checks out is there, with
/// the source's connection (to be told how the restore went, see
/// [`reply`]). Streams that are refused are answered and dropped, and the
/// wait goes on.
pub fn wait_incoming(
    api_socket: &Path,
    file: &Path,
    info: Waiting,
) -> Result<TcpStream, IncomingError> {
    let phase = Arc::new(AtomicU8::new(WAITING));
    let (tx, rx) = mpsc::channel();
    let api = WaitingApi::start(api_socket, info.clone(), phase.clone(), tx)?;
    let (listener, copied) = rx
        .recv()
        .map_err(|_| io::Error::other("the API thread ended before migrate-incoming"))?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(file)?;
    loop {
        let (mut stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting the migration connection");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        phase.store(RECEIVING, Ordering::SeqCst);
        tracing::info!(%peer, "migration stream connected");
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let received = receive(&mut stream, &mut out, info.memory_bytes).and_then(|len| {
            let mut disk_bytes = 0;
            for &i in &copied {
                let (path, _) = &info.disks[i];
                let disk = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| IncomingError::Disk {
                        index: i,
                        msg: format!("{}: {e}", path.display()),
                    })?;
                disk_bytes += receive_disk(&mut stream, i, &disk)?;
                disk.sync_all()?;
            }
            Ok((len, disk_bytes))
        });
        match received {
            Ok((len, disk_bytes)) => {
                tracing::info!(%peer, bytes = len, disk_bytes, "migration stream received and checked");
                phase.store(RESTORING, Ordering::SeqCst);
                api.finish();
                return Ok(stream);
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "migration stream refused; waiting for another");
                refuse(stream, &e.to_string());
                let _ = out.set_len(0);
                phase.store(WAITING, Ordering::SeqCst);
            }
        }
    }
}

/// Tells the source why its stream is refused, then takes what it still
/// sends (for at most [`DRAIN_FOR`]) so that the connection ends with a
/// close it can read the answer from, rather than a reset.
fn refuse(mut stream: TcpStream, why: &str) {
    if let Err(e) = stream.write_all(format!("{}\n", crate::api::error(why)).as_bytes()) {
        tracing::warn!(error = %e, "telling the migration source why its stream is refused");
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let until = std::time::Instant::now() + DRAIN_FOR;
    let mut sink = [0u8; 64 << 10];
    while std::time::Instant::now() < until {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

/// How long a refused stream is still read (and thrown away).
const DRAIN_FOR: Duration = Duration::from_secs(30);

/// Tells the source how the restore went (one JSON line) and closes.
pub fn reply(mut stream: TcpStream, result: Result<(), &str>) {
    let line = match result {
        Ok(()) => crate::api::ok(),
        Err(e) => crate::api::error(e),
    };
    if let Err(e) = stream.write_all(format!("{line}\n").as_bytes()) {
        tracing::warn!(error = %e, "telling the migration source the outcome");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> (PathBuf, File) {
        let p = std::env::temp_dir().join(format!("vireo-mig-{tag}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .expect("temp file");
        (p, f)
    }

    #[test]
    fn a_bad_preamble_is_refused_in_one_line_without_reading_on() {
        let (p, mut f) = temp("pre");
        let mem = 32 << 20;
        let mut bad = preamble(10).to_vec();
        bad[0] = b'X';
        let e = receive(&mut bad.as_slice(), &mut f, mem).expect_err("magic");
        assert!(matches!(e, IncomingError::Magic), "{e}");
        let mut v2 = preamble(10).to_vec();
        v2[8] = 2;
        let e = receive(&mut v2.as_slice(), &mut f, mem).expect_err("version");
        assert_eq!(
            e.to_string(),
            "migration stream version 2; this vireo-vmm receives version 1"
        );
        // A huge length: refused before anything is written.
        let huge = preamble(u64::MAX);
        let e = receive(&mut huge.as_slice(), &mut f, mem).expect_err("huge");
        assert!(matches!(e, IncomingError::TooLong { .. }), "{e}");
        assert_eq!(f.metadata().map(|m| m.len()).unwrap_or(1), 0);
        // Shorter than announced.
        let mut short = preamble(100).to_vec();
        short.extend_from_slice(&[0u8; 40]);
        let e = receive(&mut short.as_slice(), &mut f, mem).expect_err("short");
        assert_eq!(
            e.to_string(),
            "the stream ended after 40 of 100 snapshot bytes"
        );
        // Whole, but not a snapshot that checks out.
        let mut body = preamble(64).to_vec();
        let mut snap = b"VIREOVMM".to_vec();
        snap.extend_from_slice(&7u32.to_le_bytes());
        snap.resize(64, 0);
        body.extend_from_slice(&snap);
        let e = receive(&mut body.as_slice(), &mut f, mem).expect_err("snapshot version");
        assert!(e.to_string().contains("snapshot format version 7"), "{e}");
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn disk_sections_land_where_they_say_and_nothing_else_is_believed() {
        let (p, f) = temp("disk");
        f.set_len(1 << 20).expect("size");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[9u8; 100], 5000).expect("old data");
        let section = |index: u32, size: u64, runs: &[(u64, &[u8])]| {
            let mut v = DISK_MAGIC.to_vec();
            v.extend_from_slice(&index.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            for (at, data) in runs {
                v.extend_from_slice(&at.to_le_bytes());
                v.extend_from_slice(&(data.len() as u64).to_le_bytes());
                v.extend_from_slice(data);
            }
            v.extend_from_slice(&END.to_le_bytes());
            v.extend_from_slice(&0u64.to_le_bytes());
            v
        };
        let ok = section(
            1,
            1 << 20,
            &[(4096, &[1u8; 10]), ((1 << 20) - 3, &[2u8; 3])],
        );
        assert_eq!(receive_disk(&mut ok.as_slice(), 1, &f).expect("copied"), 13);
        let got = std::fs::read(&p).expect("read");
        assert_eq!(got.len(), 1 << 20);
        assert_eq!(&got[4096..4106], &[1u8; 10]);
        assert_eq!(&got[(1 << 20) - 3..], &[2u8; 3]);
        assert_eq!(
            got.iter().filter(|&&b| b != 0).count(),
            13,
            "old data is gone"
        );
        for (stream, want) in [
            (section(0, 1 << 20, &[]), "instead"),
            (section(1, 4096, &[]), "has 4096 bytes"),
            (
                section(1, 1 << 20, &[((1 << 20) - 1, &[1u8; 2])]),
                "does not fit",
            ),
            (
                section(1, 1 << 20, &[(u64::MAX - 1, &[1u8; 2])]),
                "does not fit",
            ),
            (
                {
                    let mut v = section(1, 1 << 20, &[]);
                    v[7] = b'X';
                    v
                },
                "bad magic",
            ),
        ] {
            let e = receive_disk(&mut stream.as_slice(), 1, &f).expect_err(want);
            assert!(
                e.to_string().starts_with("disk 1: ") && e.to_string().contains(want),
                "{e}"
            );
        }
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn the_bound_covers_every_page_in_its_own_run() {
        let mem = 256u64 << 20;
        assert!(max_snapshot_len(mem) > mem + (mem / PAGE) * 16);
        assert!(max_snapshot_len(u64::MAX) == u64::MAX);
    }
}
