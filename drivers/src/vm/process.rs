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
