//! Apply-to-Running on a real cluster: N `test` Domains (default 100,
//! `VIREO_CLUSTER_N`) created on two kubelet nodes whose agents run as the
//! chart's pods (image from `scripts/image`, release build), beside the same
//! N Domains on today's process-based set-up (the operator and two agents
//! as local processes against a bare kube-apiserver), in the same run.
//! Each set-up runs `VIREO_CLUSTER_ROUNDS` rounds (default 3: create N,
//! wait for all Running, delete them all); the figures are the medians of
//! the rounds' p50, p95 and all-Running times.
//!
//! `cargo bench -p vireo-e2e --bench cluster` (root, /dev/kvm, the packages
//! of scripts/setup) prints a table and writes `target/bench/cluster.json`;
//! `--profile dev` measures debug builds (the image then holds them too).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::fleet;
use kube::api::{Api, DeleteParams};
use vireo_crds::Domain;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    fleet::percentile(&v, 0.5)
}

/// One round's figures: p50, p95, first create to all Running (seconds).
struct Round {
    p50: f64,
    p95: f64,
    all: f64,
    running: usize,
}

/// Creates `n` test Domains (8 at a time), waits until all are Running,
/// deletes them and waits until they are gone.
async fn round(client: &kube::Client, n: usize, tag: &str) -> Round {
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let (watch, running_at) = fleet::watch_running(&domains);
    // Let the watch list before the first create.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let created = fleet::create(&domains, tag, n, "64Mi", 8).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while running_at.lock().unwrap_or_else(|p| p.into_inner()).len() < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = started.elapsed().as_secs_f64();
    watch.abort();
    let running = running_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let lat = fleet::latencies(&created, &running);
    // Clean up for the next round.
    for name in created.keys() {
        let _ = domains.delete(name, &DeleteParams::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        match domains.list(&Default::default()).await {
            Ok(l) if l.items.is_empty() => break,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Round {
        p50: fleet::percentile(&lat, 0.50),
        p95: fleet::percentile(&lat, 0.95),
        all,
        running: running.len(),
    }
}

async fn rounds(client: &kube::Client, n: usize, count: usize, tag: &str) -> Vec<Round> {
    let mut out = Vec::new();
    for r in 0..count {
        let x = round(client, n, &format!("{tag}{r}")).await;
        eprintln!(
            "[bench] {tag} round {}: {}/{n} Running, p50 {:.3}s p95 {:.3}s all {:.2}s",
            r + 1,
            x.running,
            x.p50,
            x.p95,
            x.all
        );
        out.push(x);
    }
    out
}

#[tokio::main]
async fn main() {
    let n = env_or("VIREO_CLUSTER_N", 100);
    let count = env_or("VIREO_CLUSTER_ROUNDS", 3);

    // Today's set-up: operator and two agents as processes.
    let procs = {
        let mut cluster = common::Cluster::start("bench-procs");
        let operator = cluster.operator("operator", &["--no-leader-election"]);
        let agents: Vec<common::Proc> = (1..=2)
            .map(|i| cluster.agent(&format!("node-{i}"), &[]))
            .collect();
        let client = cluster.client().await;
        common::ready_hosts(&client, 2).await;
        let r = rounds(&client, n, count, "procs").await;
        drop(agents);
        drop(operator);
        cluster.procs_clear();
        r
    };

    // The real cluster: the chart's pods on two kubelet nodes.
    // The image holds the same build as the processes ran: release under
    // `cargo bench`, debug under `cargo bench --profile dev`.
    let release = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|d| d.ends_with("release")))
        .unwrap_or(true);
    let profile = if release { "release" } else { "debug" };
    let image = common::nodes::script(&["scripts/image", "--profile", profile]);
    let cluster =
        common::Cluster::start_bare_with("bench-nodes", &[("VIREO_E2E_BIND_ADDRESS", "0.0.0.0")]);
    let nodes = common::nodes::Nodes::start(&cluster, 2);
    nodes.import(&image);
    let chart = common::repo().join("charts/vireo");
    cluster.helm_ok(&[
        "install",
        "vireo",
        chart.to_str().unwrap_or("charts/vireo"),
        "--namespace",
        "vireo-system",
        "--create-namespace",
        "--set",
        "uninstall.cleanup=false",
        // The same simulated node size the process harness gives its
        // agents (8 CPUs, 32 GiB), so that 100 Domains fit either way.
        "--set",
        "agent.cpus=8",
        "--set",
        "agent.memory=32Gi",
        "--wait",
        "--timeout",
        "5m",
    ]);
    let client = cluster.client().await;
    common::ready_hosts(&client, 2).await;
    let pods = rounds(&client, n, count, "pods").await;
    drop(nodes);

    let row = |name: &str, rs: &[Round]| {
        let p50 = median(rs.iter().map(|r| r.p50).collect());
        let p95 = median(rs.iter().map(|r| r.p95).collect());
        let all = median(rs.iter().map(|r| r.all).collect());
        let ok = rs.iter().all(|r| r.running == n);
        println!(" {name:<44} {p50:>8.3}s {p95:>8.3}s {all:>9.2}s  {ok}");
        serde_json::json!({"p50_seconds": p50, "p95_seconds": p95, "all_running_seconds": all, "all_ran": ok})
    };
    println!("{n} test Domains, apply to Running, two nodes; medians of {count} rounds");
    println!();
    println!(
        " {:<44} {:>9} {:>9} {:>10}  all Running",
        "set-up", "p50", "p95", "all"
    );
    let a = row("agents as processes (today's bench)", &procs);
    let b = row("agents as the chart's pods on kubelet nodes", &pods);
    let ratio = |k: &str| b[k].as_f64().unwrap_or(f64::NAN) / a[k].as_f64().unwrap_or(f64::NAN);
    println!(
        " ratio pods / processes: p50 {:.2}x, p95 {:.2}x",
        ratio("p50_seconds"),
        ratio("p95_seconds")
    );
    let json = serde_json::json!({
        "benchmark": "cluster",
        "domains": n,
        "rounds": count,
        "processes": a,
        "pods": b,
    });
    let dir = common::repo().join("target/bench");
    let path = dir.join("cluster.json");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap_or_default()));
    match written {
        Ok(()) => println!(" written: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    if procs.iter().chain(&pods).any(|r| r.running < n) {
        std::process::exit(1);
    }
}
