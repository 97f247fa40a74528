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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use vireo_crds::{Domain, DomainSpec, DomainState, DomainType};

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

/// Sum of `apiserver_request_total` on the API server's /metrics.
fn api_requests(cluster: &common::Cluster) -> u64 {
    let text = cluster.kubectl_ok(&["get", "--raw", "/metrics"]);
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
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
    let running_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = running_at.clone();
    let watch = tokio::spawn(
        watcher(domains.clone(), watcher::Config::default())
            .applied_objects()
            .try_for_each(move |d| {
                let seen = seen.clone();
                async move {
                    if d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running) {
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(d.metadata.name.clone().unwrap_or_default())
                            .or_insert_with(Instant::now);
                    }
                    Ok(())
                }
            }),
    );
    let requests_before = api_requests(&cluster);
    let started = Instant::now();
    let created_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    futures::stream::iter(0..n)
        .for_each_concurrent(16, |i| {
            let domains = domains.clone();
            let created_at = created_at.clone();
            async move {
                let name = format!("scale-{i:04}");
                let d = Domain::new(
                    &name,
                    DomainSpec {
                        domain_type: DomainType::Test,
                        uuid: None,
                        memory: k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                            "256Mi".into(),
                        ),
                        current_memory: None,
                        vcpus: 1,
                        max_vcpus: None,
                        os: None,
                        devices: Default::default(),
                        run_strategy: Default::default(),
                        lifecycle: Default::default(),
                        node_selector: None,
                    },
                );
                let t = Instant::now();
                if let Err(e) = domains.create(&PostParams::default(), &d).await {
                    eprintln!("create {name}: {e}");
                }
                created_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, t);
            }
        })
        .await;
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
    // Let the last status writes land before counting requests.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = api_requests(&cluster).saturating_sub(requests_before);
    watch.abort();

    let running = running_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let created_map = created_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut latencies: Vec<f64> = running
        .iter()
        .filter_map(|(k, t)| {
            created_map
                .get(k)
                .map(|c| t.saturating_duration_since(*c).as_secs_f64())
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
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
        percentile(&latencies, 0.50)
    );
    println!(
        " {:<36} {:>11.3}s",
        "create-to-Running p99",
        percentile(&latencies, 0.99)
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
    let json = serde_json::json!({
        "benchmark": "scale",
        "domains": n,
        "running": running.len(),
        "creates_seconds": created.as_secs_f64(),
        "all_running_seconds": all_running.as_secs_f64(),
        "p50_seconds": percentile(&latencies, 0.50),
        "p99_seconds": percentile(&latencies, 0.99),
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
