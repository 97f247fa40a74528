//! Runs of the `vireo` binary that tell a refusal from a crash: exit
//! status, output, time and peak memory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `vireo` binary of this workspace (only it: the corpus needs no
/// operator or agent), built once.
pub fn vireo() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let mut args = vec!["build", "--bin", "vireo"];
        if dir.ends_with("release") {
            args.push("--release");
        }
        let status = super::cargo()
            .args(&args)
            .current_dir(super::repo())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --bin vireo failed");
        dir.join("vireo")
    })
    .clone()
}

/// A finished process: exit code (None: killed by a signal), stdout,
/// stderr, wall time and peak resident memory.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
    pub max_rss_kib: i64,
}

/// Runs a command to its end, measuring its peak memory (wait4's rusage).
/// Killed after `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let outs = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let errs = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let pid = child.id() as libc::pid_t;
    let watchdog = std::thread::spawn(move || {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: our own child, not yet reaped (wait4 below reaps it).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and usage are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let took = started.elapsed();
    let _ = watchdog.join();
    // The child is reaped: keep std from waiting on it again.
    std::mem::forget(child);
    Run {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: outs.join().unwrap_or_default(),
        stderr: errs.join().unwrap_or_default(),
        took,
        max_rss_kib: usage.ru_maxrss,
    }
}

/// The error lines of a run's stderr (notes and the CLI's stderr banner
/// about the test node are not errors).
pub fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.starts_with("note: ") && !l.trim().is_empty())
        .filter(|l| !l.contains("test:///default"))
        .collect()
}
