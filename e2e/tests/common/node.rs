//! What an agent restart must keep, read from the node itself rather than
//! from the agent: processes (PID and start time from /proc), the links and
//! nftables tables of a network namespace, files, a guest's console. Shared
//! by the restart tests of standalone mode (agent/tests/restart.rs, which
//! includes this file with `#[path]`, so it stands alone) and of the
//! cluster agent (e2e/tests/restart.rs, through `common::node`), and by the
//! chaos test and the benches' CPU counters.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One process: its PID and its start time (field 22 of /proc/PID/stat,
/// clock ticks after boot). The pair names a process even where PIDs are
/// reused: the same pair is the same process, not a new one with the PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProcId {
    pub pid: u32,
    pub start: u64,
}

/// The process `pid` as it is now (`None` when gone or a zombie).
pub fn proc_id(pid: u32) -> Option<ProcId> {
    // State (field 3) .. starttime (22).
    let rest = stat_fields(pid)?;
    if matches!(rest.first().map(String::as_str), Some("Z") | Some("X")) {
        return None;
    }
    let start = rest.get(22 - 3)?.parse().ok()?;
    Some(ProcId { pid, start })
}

/// The fields of `/proc/PID/stat` after the command name (which is in
/// parentheses and may hold spaces): element 0 is field 3 (state), element
/// N is field N + 3.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The command line of `pid`, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// The PIDs of every process in the network namespace `netns`.
pub fn netns_pids(netns: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The processes of the namespace whose program's file name is `program`
/// (`qemu-system-x86_64`, `dnsmasq`) and whose command line holds `marker`
/// (a run directory's path). Sorted.
pub fn procs_in(netns: &str, program: &str, marker: &str) -> Vec<ProcId> {
    let mut found: Vec<ProcId> = netns_pids(netns)
        .into_iter()
        .filter(|&pid| {
            cmdline(pid).is_some_and(|c| {
                let prog = c.split(' ').next().unwrap_or_default();
                Path::new(prog).file_name().and_then(|f| f.to_str()) == Some(program)
                    && c.contains(marker)
            })
        })
        .filter_map(proc_id)
        .collect();
    found.sort();
    found
}

/// Every process on this machine whose command line holds `marker`
/// (without spawning anything: fast enough to catch a process as it
/// appears).
pub fn procs_with(program: &str, marker: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            cmdline(pid).is_some_and(|c| {
                c.split(' ').next().unwrap_or_default().ends_with(program) && c.contains(marker)
            })
        })
        .collect()
}

/// `ip -j ARGS` in the namespace, parsed (an empty list when it fails).
pub fn ip_json(netns: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ip", "-j"])
        .args(args)
        .output()
        .expect("ip -j");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Array(Vec::new()))
}

/// The interface index of `dev` in the namespace.
pub fn ifindex(netns: &str, dev: &str) -> Option<u64> {
    ip_json(netns, &["link", "show", "dev", dev])
        .get(0)?
        .get("ifindex")?
        .as_u64()
}

/// The names of the links enslaved to `bridge` in the namespace.
pub fn bridge_ports(netns: &str, bridge: &str) -> BTreeSet<String> {
    names(&ip_json(netns, &["link", "show", "master", bridge]))
}

/// The names of every tap (tun) device in the namespace, on a bridge or not.
pub fn taps(netns: &str) -> BTreeSet<String> {
    let links = ip_json(netns, &["-d", "link", "show"]);
    let taps: Vec<serde_json::Value> = links
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["linkinfo"]["info_kind"] == "tun")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    names(&serde_json::Value::Array(taps))
}

/// The names of the links with `kind` (`bridge`) in the namespace.
pub fn links_of_kind(netns: &str, kind: &str) -> BTreeSet<String> {
    names(&ip_json(netns, &["link", "show", "type", kind]))
}

fn names(links: &serde_json::Value) -> BTreeSet<String> {
    links
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The handle of nftables table `ip TABLE` in the namespace: a table
/// deleted and made again (even with the same rules) has a new one.
pub fn nft_table_handle(netns: &str, table: &str) -> Option<u64> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", netns, "nft", "-a", "list", "table", "ip", table,
        ])
        .output()
        .expect("nft");
    if !out.status.success() {
        return None;
    }
    // `table ip NAME { # handle N`
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("table "))?;
    line.rsplit_once("# handle ")?.1.trim().parse().ok()
}

/// Every file and directory under `dir`, relative to it, sorted.
pub fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(rel) = path.strip_prefix(root) {
                out.insert(rel.to_path_buf());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Types a line on a guest's serial console (QEMU's console socket, the
/// busybox shell of the project's guest image behind it) and waits for its
/// answer: `echo TOKEN-$((6*7))` must come back as `TOKEN-42`, which only a
/// shell can print (the echo of the typed line shows the unexpanded form).
/// Retries (a new connection each time) until `timeout`; returns what was
/// read, or why it failed.
pub fn console_answers(socket: &Path, token: &str, timeout: Duration) -> Result<String, String> {
    let want = format!("{token}-42");
    let start = Instant::now();
    let mut seen = String::new();
    let mut last_error = String::new();
    while start.elapsed() < timeout {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if let Err(e) = s.write_all(format!("\necho {token}-$((6*7))\n").as_bytes()) {
                    last_error = format!("writing to {}: {e}", socket.display());
                    continue;
                }
                let until = Instant::now() + Duration::from_secs(5);
                let mut buf = [0u8; 4096];
                while Instant::now() < until {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                            if seen.contains(&want) {
                                return Ok(seen);
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => {
                            last_error = format!("reading {}: {e}", socket.display());
                            break;
                        }
                    }
                }
            }
            Err(e) => last_error = format!("connecting to {}: {e}", socket.display()),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "no {want} from the console within {timeout:?} ({last_error}); read:\n{seen}"
    ))
}

/// Waits until the link `name` exists in the namespace, checking as fast
/// as the kernel answers: a thread of its own joins the namespace (setns
/// moves only the calling thread) and reads /proc/thread-self/net/dev,
/// which lists the links of the thread's namespace, with no process
/// spawned per check. Returns whether it appeared within `timeout`.
pub fn wait_link_fast(netns: &str, name: &str, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{netns}");
    let needle = format!("{name}:");
    std::thread::spawn(move || {
        let Ok(ns) = File::open(&path) else {
            return false;
        };
        // SAFETY: setns with the descriptor of a network namespace file that
        // stays open for the call; it moves only this thread, which ends
        // when the wait is over.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        let start = Instant::now();
        while start.elapsed() < timeout {
            let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
            if text.lines().any(|l| l.trim_start().starts_with(&needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        false
    })
    .join()
    .unwrap_or(false)
}

/// Waits until a process of `program` whose command line holds `marker`
/// exists on this machine, scanning /proc without pause. Returns its PIDs,
/// or none after `timeout`.
pub fn wait_proc_fast(program: &str, marker: &str, timeout: Duration) -> Vec<u32> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let found = procs_with(program, marker);
        if !found.is_empty() {
            return found;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Vec::new()
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a PID fits pid_t");
    // SAFETY: kill(2) has no memory effects; the PID is a child the test
    // started and has not reaped yet.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// What a restarted agent must keep of the example guest and its network,
/// read from the node: the guest's process, the bridge, the nftables table,
/// dnsmasq, the guest's address and taps, and the files of the state
/// directory and pools.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub uuid: String,
    pub qemu: ProcId,
    /// The bridge's ifindex.
    pub bridge: u64,
    /// The nftables table's handle.
    pub table: u64,
    pub dnsmasq: ProcId,
    pub mac: String,
    /// `address/prefix`, as `vireo domifaddr` shows it.
    pub ip: String,
    pub taps: BTreeSet<String>,
    pub files: BTreeSet<PathBuf>,
}

impl Kept {
    /// Asserts that this (after a restart) is what `base` was. A replaced
    /// dnsmasq is only noted: the caller checked that it kept the leases.
    pub fn assert_kept(&self, base: &Kept, what: &str, tag: &str) {
        assert_eq!(self.qemu, base.qemu, "the same QEMU process {what}");
        assert_eq!(self.uuid, base.uuid);
        assert_eq!(self.bridge, base.bridge, "the same bridge {what}");
        assert_eq!(self.table, base.table, "the same nftables table {what}");
        if self.dnsmasq != base.dnsmasq {
            eprintln!(
                "{tag} dnsmasq replaced {what}: {:?} → {:?}",
                base.dnsmasq, self.dnsmasq
            );
        }
        assert_eq!(self.mac, base.mac);
        assert_eq!(self.ip, base.ip, "the guest's address {what}");
        assert_eq!(self.taps, base.taps, "no tap leaked {what}");
        assert_eq!(
            self.files,
            base.files,
            "no file appeared or went {what}: added {:?}, removed {:?}",
            self.files.difference(&base.files).collect::<Vec<_>>(),
            base.files.difference(&self.files).collect::<Vec<_>>()
        );
    }
}

/// Whether `program` is on PATH (or in /usr/sbin, /sbin).
pub fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(program).is_file())
}

/// Whether a restart test can run here (root, QEMU, nft, dnsmasq); says
/// why not, and fails instead of skipping when `CI` is set.
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if !root {
        "not root (network namespaces, bridges, and the guest image in /var/lib/vireo/boot)"
            .to_string()
    } else if let Some(p) = ["qemu-system-x86_64", "nft", "dnsmasq"]
        .into_iter()
        .find(|p| !on_path(p))
    {
        format!("{p} not found")
    } else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}, and CI is set");
    }
    eprintln!("SKIP {test}: {why}");
    false
}
