//! The VM process as seen from /proc: is it (still) ours, how much CPU it
//! used, and stopping it.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether `pid` is a live process whose command line contains `marker`
/// (the activation's own socket path, so a recycled PID is never taken for
/// our VM). Zombies count as gone.
pub fn alive(pid: u32, marker: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let marker = marker.as_os_str().as_encoded_bytes();
    !marker.is_empty() && cmdline.windows(marker.len()).any(|w| w == marker)
}

/// The live processes whose command line contains `marker` (an
/// activation's socket path), found by reading /proc: the process of a
/// launch whose PID nobody recorded (its agent was killed meanwhile).
pub fn with_marker(marker: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| alive(pid, marker))
        .collect();
    pids.sort_unstable();
    pids
}

/// How long ago the process started, if it runs.
pub fn age(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // After ')' come: state(3) ... starttime(22): index 19.
    let start: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some(Duration::from_secs_f64(
        (uptime - start as f64 / tck).max(0.0),
    ))
}

/// CPU time (user + system) of a process and all its threads, in ns.
pub fn cpu_time_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // After ')' come: state(3) ppid(4) ... utime(14) stime(15): indexes 11, 12.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as u64 } else { 100 };
    Some((utime + stime).saturating_mul(1_000_000_000) / tck)
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory effects; the PID was checked to be
        // our VM process just before.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Waits until the process is gone, up to `timeout`.
pub fn wait_gone(pid: u32, marker: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while alive(pid, marker) {
        if start.elapsed() >= timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Stops the process: SIGTERM, then SIGKILL after `grace`. Returns whether
/// it is gone.
pub fn terminate(pid: u32, marker: &Path, grace: Duration) -> bool {
    if !alive(pid, marker) {
        return true;
    }
    signal(pid, libc::SIGTERM);
    if wait_gone(pid, marker, grace) {
        return true;
    }
    if alive(pid, marker) {
        signal(pid, libc::SIGKILL);
    }
    wait_gone(pid, marker, Duration::from_secs(10))
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a thread of a process runs, from /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadCpu {
    /// The CPU it last ran on.
    pub last_cpu: u32,
    /// User and system time.
    pub cpu_time_ns: u64,
    /// The CPUs it may run on.
    pub allowed: Vec<usize>,
}

/// A thread's CPU, time and affinity (`/proc/PID/task/TID/stat` and
/// `status`); `None` if the thread is gone or unreadable.
pub fn thread_cpu(pid: u32, tid: u32) -> Option<ThreadCpu> {
    let dir = std::path::PathBuf::from(format!("/proc/{pid}/task/{tid}"));
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    parse_thread(&stat, &status)
}

fn parse_thread(stat: &str, status: &str) -> Option<ThreadCpu> {
    // Fields after the command name, which may hold spaces: field 3 on.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, processor is 39 (1-based).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100);
    let cpu_time_ns = (field(14)? + field(15)?).saturating_mul(1_000_000_000 / ticks);
    let last_cpu = u32::try_from(field(39)?).ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut allowed = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                allowed.extend(a..=b.min(a + 4096));
            }
            None => allowed.push(part.parse().ok()?),
        }
    }
    Some(ThreadCpu {
        last_cpu,
        cpu_time_ns,
        allowed,
    })
}

#[cfg(test)]
mod thread_tests {
    #[test]
    fn reads_a_threads_cpu_time_and_affinity() {
        let stat = "1234 (CPU 0/KVM) S 1 1 1 0 -1 4194560 0 0 0 0 150 50 0 0 20 0 1 0 1 0 0 \
                    18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 -1 3 0 0 0 0 0";
        let status = "Name:\tCPU 0/KVM\nCpus_allowed_list:\t0-2,5\n";
        let t = super::parse_thread(stat, status).expect("parses");
        assert_eq!(t.last_cpu, 3);
        assert_eq!(t.allowed, vec![0, 1, 2, 5]);
        assert!(t.cpu_time_ns > 0);
        // Our own thread, for real.
        let me = std::process::id();
        assert!(super::thread_cpu(me, me).is_some());
    }
}
