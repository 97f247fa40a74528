//! `cargo bench -p vireo-cli --bench shell`
//!
//! Runs N (default 10,000; `VIREO_BENCH_N`) `dominfo test` commands in one
//! shell-mode session of `vireo -c test:///default`, and the same through
//! `virsh -c test:///default` (Debian's libvirt-clients) in the same run,
//! R times each (default 5; `VIREO_BENCH_ROUNDS`), interleaved. Prints the
//! median rates and their ratio, and writes them to
//! `target/bench/shell-dominfo.json`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs one session; returns its wall time, or why it could not run.
fn session(
    program: &str,
    args: &[&str],
    input: &[u8],
    expect_lines: usize,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    let elapsed = start.elapsed();
    writer
        .join()
        .map_err(|_| "writer thread panicked".to_string())?
        .map_err(|e| format!("{program}: writing stdin: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let answers = text.matches("Max memory:").count();
    if answers != expect_lines {
        return Err(format!(
            "{program}: {answers} answers for {expect_lines} commands; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(elapsed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let n = env_or("VIREO_BENCH_N", 10_000);
    let rounds = env_or("VIREO_BENCH_ROUNDS", 5).max(1);
    let input = "dominfo test\n".repeat(n).into_bytes();
    let vireo = env!("CARGO_BIN_EXE_vireo");

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut virsh_error = None;
    for _ in 0..rounds {
        match session(vireo, &["-c", "test:///default"], &input, n) {
            Ok(d) => ours.push(d.as_secs_f64()),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        if virsh_error.is_none() {
            match session("virsh", &["-q", "-c", "test:///default"], &input, n) {
                Ok(d) => theirs.push(d.as_secs_f64()),
                Err(e) => virsh_error = Some(e),
            }
        }
    }

    let ours_s = median(ours.clone());
    let ours_rate = n as f64 / ours_s;
    println!("{n} x `dominfo test` in one shell session, median of {rounds} rounds");
    println!();
    println!(" {:<8} {:>12} {:>14}", "tool", "seconds", "commands/s");
    println!(" {:<8} {:>12.3} {:>14.0}", "vireo", ours_s, ours_rate);
    let mut json = serde_json::json!({
        "benchmark": "shell-dominfo",
        "commands": n,
        "rounds": rounds,
        "vireo": {"seconds": ours, "median_seconds": ours_s, "rate": ours_rate},
    });
    match virsh_error {
        None => {
            let theirs_s = median(theirs.clone());
            let theirs_rate = n as f64 / theirs_s;
            let ratio = ours_rate / theirs_rate;
            println!(" {:<8} {:>12.3} {:>14.0}", "virsh", theirs_s, theirs_rate);
            println!();
            println!(" vireo / virsh rate: {ratio:.1}x (goal: at least 5x)");
            json["virsh"] = serde_json::json!({"seconds": theirs, "median_seconds": theirs_s, "rate": theirs_rate});
            json["ratio"] = ratio.into();
        }
        Some(e) => {
            println!();
            println!(" virsh not measured: {e} (apt-get install libvirt-clients)");
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let path = dir.join("shell-dominfo.json");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap_or_default()));
    match written {
        Ok(()) => println!(" written: {}", path.display()),
        Err(e) => eprintln!("error: cannot write {}: {e}", path.display()),
    }
}
