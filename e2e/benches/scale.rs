//! Scale benchmark: N Domains (default 1,000; `VIREO_SCALE_N`) of the test
//! driver across three agents, on a real kube-apiserver and etcd, with the
//! release builds of the operator and agents.
//!
//! Prints, and writes to `target/bench/scale.json`: the time from the first
//! create to all Running, p50 and p99 of each Domain's create-to-Running,
//! the API requests made (from the API server's own counters), and the
//! peak memory (VmHWM) of the operator and of each agent.
//! Goals (issue 3): all 1,000 Running within 20 s on 2 cores; operator and
//! each agent under 100 MiB.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::fleet;
use kube::api::Api;
use vireo_crds::Domain;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / hz)
        })
        .unwrap_or(0.0)
}

/// `apiserver_request_total` and the summed request seconds on the API
/// server's /metrics, by verb, resource and subresource.
fn api_requests(cluster: &common::Cluster) -> HashMap<String, (f64, f64)> {
    let text = cluster.kubectl_ok(&["get", "--raw", "/metrics"]);
    let mut by: HashMap<String, (f64, f64)> = HashMap::new();
    for line in text.lines() {
        let (metric, slot) = if let Some(r) = line.strip_prefix("apiserver_request_total{") {
            (r, 0)
        } else if let Some(r) = line.strip_prefix("apiserver_request_duration_seconds_sum{") {
            (r, 1)
        } else {
            continue;
        };
        let Some((labels, value)) = metric.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let sub = label("subresource");
        let key = format!(
            "{} {}{}",
            label("verb"),
            label("resource"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        let e = by.entry(key).or_default();
        if slot == 0 {
            e.0 += value;
        } else {
            e.1 += value;
        }
    }
    by
}

/// The requests made between two readings, largest first.
fn request_delta(
    before: &HashMap<String, (f64, f64)>,
    after: &HashMap<String, (f64, f64)>,
) -> Vec<(String, u64, f64)> {
    let mut v: Vec<(String, u64, f64)> = after
        .iter()
        .map(|(k, (n, secs))| {
            let (n0, s0) = before.get(k).copied().unwrap_or_default();
            (k.clone(), (n - n0).round() as u64, secs - s0)
        })
        .filter(|(_, n, _)| *n > 0)
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

#[tokio::main]
async fn main() {
    let n = env_or("VIREO_SCALE_N", 1000);
    let mut cluster = common::Cluster::start("scale");
    // Bigger simulated nodes than the tests use, so 1,000 guests fit.
    let big = ["--cpus", "512", "--memory", "4Ti", "--resync-seconds", "60"];
    let operator = cluster.operator("operator", &["--no-leader-election"]);
    let agents: Vec<common::Proc> = (1..=3)
        .map(|i| cluster.agent(&format!("node-{i}"), &big))
        .collect();
    let client = cluster.client().await;
    common::ready_hosts(&client, 3).await;

    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let (watch, running_at) = fleet::watch_running(&domains);
    let requests_before = api_requests(&cluster);
    let pid_of = |key: &str| {
        cluster
            .env
            .get(key)
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let mut cpu_pids: Vec<(String, u32)> = vec![
        ("kube-apiserver".into(), pid_of("APISERVER_PID")),
        ("etcd".into(), pid_of("ETCD_PID")),
        ("operator".into(), operator.pid().unwrap_or(0)),
    ];
    for (i, a) in agents.iter().enumerate() {
        cpu_pids.push((format!("agent node-{}", i + 1), a.pid().unwrap_or(0)));
    }
    let cpu_before: Vec<f64> = cpu_pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let started = Instant::now();
    let created_map = fleet::create(&domains, "scale", n, "256Mi", 16).await;
    let created = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = running_at.lock().unwrap_or_else(|p| p.into_inner()).len();
        if done >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_running = started.elapsed();
    let cpu_used: Vec<(String, f64)> = cpu_pids
        .iter()
        .zip(&cpu_before)
        .map(|((name, pid), before)| (name.clone(), cpu_seconds(*pid) - before))
        .collect();
    // Let the last status writes land before counting requests.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let request_kinds = request_delta(&requests_before, &api_requests(&cluster));
    let requests: u64 = request_kinds.iter().map(|(_, n, _)| n).sum();
    watch.abort();

    let running = running_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let latencies = fleet::latencies(&created_map, &running);
    let op_mib = vm_hwm_kib(operator.pid().unwrap_or(0)) as f64 / 1024.0;
    let agent_mib: Vec<f64> = agents
        .iter()
        .map(|a| vm_hwm_kib(a.pid().unwrap_or(0)) as f64 / 1024.0)
        .collect();

    println!("{n} Domains (test driver) across 3 agents on a real kube-apiserver");
    println!();
    println!(" {:<36} {:>12}", "measure", "value");
    println!(
        " {:<36} {:>12}",
        "running / created",
        format!("{}/{}", running.len(), n)
    );
    println!(
        " {:<36} {:>11.2}s",
        "creates sent (16 at a time)",
        created.as_secs_f64()
    );
    println!(
        " {:<36} {:>11.2}s  (goal < 20 s)",
        "first create to all Running",
        all_running.as_secs_f64()
    );
    println!(
        " {:<36} {:>11.3}s",
        "create-to-Running p50",
        fleet::percentile(&latencies, 0.50)
    );
    println!(
        " {:<36} {:>11.3}s",
        "create-to-Running p99",
        fleet::percentile(&latencies, 0.99)
    );
    println!(
        " {:<36} {:>12}",
        "API requests (apiserver_request_total)", requests
    );
    println!(
        " {:<36} {:>9.1} MiB  (goal < 100 MiB)",
        "operator peak RSS", op_mib
    );
    for (i, m) in agent_mib.iter().enumerate() {
        println!(
            " {:<36} {:>9.1} MiB  (goal < 100 MiB)",
            format!("agent node-{} peak RSS", i + 1),
            m
        );
    }
    for (name, secs) in &cpu_used {
        println!(
            " {:<36} {:>11.2}s",
            format!("CPU until all Running: {name}"),
            secs
        );
    }
    println!(" API requests by kind (count, summed latency):");
    for (kind, count, secs) in request_kinds.iter().take(12) {
        println!("   {kind:<40} {count:>6} {secs:>8.2}s");
    }
    let json = serde_json::json!({
        "api_requests_by_kind": request_kinds.iter().map(|(k, n, s)| serde_json::json!({"kind": k, "count": n, "seconds": s})).collect::<Vec<_>>(),
        "cpu_seconds_until_all_running": cpu_used.iter().map(|(n, s)| (n.clone(), serde_json::json!(s))).collect::<serde_json::Map<_, _>>(),
        "benchmark": "scale",
        "domains": n,
        "running": running.len(),
        "creates_seconds": created.as_secs_f64(),
        "all_running_seconds": all_running.as_secs_f64(),
        "p50_seconds": fleet::percentile(&latencies, 0.50),
        "p99_seconds": fleet::percentile(&latencies, 0.99),
        "api_requests": requests,
        "operator_peak_mib": op_mib,
        "agent_peak_mib": agent_mib,
    });
    let dir = common::repo().join("target/bench");
    let path = dir.join("scale.json");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap_or_default()));
    match written {
        Ok(()) => println!(" written: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    drop(agents);
    drop(operator);
    cluster.procs_clear();
    if running.len() < n {
        std::process::exit(1);
    }
}
