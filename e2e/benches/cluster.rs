//! Apply-to-Running on a real cluster: N `test` Domains (default 100,
//! `VIREO_CLUSTER_N`) created on kubelet nodes (default two,
//! `VIREO_CLUSTER_NODES`) whose agents run as the chart's pods (image from
//! `scripts/image`, release build), beside the same N Domains on today's
//! process-based set-up (the operator and as many agents as local
//! processes against a bare kube-apiserver), in the same run. Each set-up
//! runs `VIREO_CLUSTER_ROUNDS` rounds (default 3: create N,
//! `VIREO_CLUSTER_AT_ONCE` at a time (default 8), wait for all Running,
//! delete them all and wait until they are gone); the figures are the
//! medians of the rounds' p50, p95, all-Running and all-gone times, and
//! the peak memory (VmHWM) of the operator and of the largest agent.
//!
//! `cargo bench -p vireo-e2e --bench cluster` (root, /dev/kvm, the packages
//! of scripts/setup) prints a table and writes `target/bench/cluster.json`;
//! `--profile dev` measures debug builds (the image then holds them too).
//! Issue 19's fleet on kubelet nodes: `VIREO_CLUSTER_N=10000
//! VIREO_CLUSTER_NODES=10 VIREO_CLUSTER_ROUNDS=1 VIREO_CLUSTER_AT_ONCE=16
//! cargo bench -p vireo-e2e --bench cluster`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::fleet;
use futures::StreamExt;
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
    p99: f64,
    /// The creates alone.
    creates: f64,
    /// Create → bound (the operator) and bound → Running (the agent,
    /// then the watch): p50, p95, p99.
    to_bound: [f64; 3],
    bound_to_running: [f64; 3],
    all: f64,
    gone: f64,
    running: usize,
    /// CPU seconds each component used from the first create to all
    /// Running ([`COMPONENTS`], then everything else on the machine).
    cpu: Vec<(String, f64)>,
    /// Priority and fairness from the first create to all Running, per
    /// priority level and flow schema: requests and their mean queue wait.
    apf: Vec<(String, f64, f64)>,
}

/// The API server's priority and fairness so far, keyed "priority level
/// (flow schema)": requests dispatched and the seconds they waited in its
/// queues in all (`apiserver_flowcontrol_request_wait_duration_seconds`).
fn apf_waits(cluster: &common::Cluster) -> BTreeMap<String, (f64, f64)> {
    let text = cluster.kubectl_ok(&["get", "--raw", "/metrics"]);
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let Some((name, labels, value)) = common::prom_sample(line) else {
            continue;
        };
        let is_sum = match name {
            "apiserver_flowcontrol_request_wait_duration_seconds_sum" => true,
            "apiserver_flowcontrol_request_wait_duration_seconds_count" => false,
            _ => continue,
        };
        let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
        if label("execute") != "true" {
            continue;
        }
        let key = format!("{} ({})", label("priority_level"), label("flow_schema"));
        let e = out.entry(key).or_default();
        if is_sum {
            e.1 += value;
        } else {
            e.0 += value;
        }
    }
    out
}

/// Requests and mean wait per key between two [`apf_waits`] readings,
/// busiest first.
fn apf_between(
    before: &BTreeMap<String, (f64, f64)>,
    after: &BTreeMap<String, (f64, f64)>,
) -> Vec<(String, f64, f64)> {
    let mut out: Vec<(String, f64, f64)> = after
        .iter()
        .filter_map(|(k, (n, w))| {
            let (n0, w0) = before.get(k).copied().unwrap_or_default();
            let n = n - n0;
            (n > 0.0).then(|| (k.clone(), n, (w - w0) / n))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// The processes whose CPU a round accounts for, by the last path element
/// of their command's first word; the chart's pods are processes of this
/// host too.
const COMPONENTS: [&str; 10] = [
    "kube-apiserver",
    "etcd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "containerd",
    "containerd-shim-runc-v2",
    "vireo-operator",
    "vireo-agent",
    "cluster",
];

/// CPU seconds (user + system) used so far: by every live process of each
/// of [`COMPONENTS`] (summed), and by the whole machine (`/proc/stat`'s
/// first line, idle and iowait left out) as the last entry.
fn cpu_by_component() -> Vec<f64> {
    let mut out = vec![0.0; COMPONENTS.len() + 1];
    for (pid, base) in common::processes() {
        // The bench's own binary is `cluster-<hash>`.
        let base = if base.starts_with("cluster-") {
            "cluster"
        } else {
            base.as_str()
        };
        if let Some(i) = COMPONENTS.iter().position(|c| *c == base) {
            out[i] += common::cpu_seconds(pid);
        }
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // cpu  user nice system idle iowait irq softirq steal ...
    let busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let f: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let all: f64 = f.iter().take(8).sum();
            Some(all - f.get(3).copied().unwrap_or(0.0) - f.get(4).copied().unwrap_or(0.0))
        })
        .unwrap_or(0.0);
    out[COMPONENTS.len()] = busy / hz;
    out
}

/// What each component used between two [`cpu_by_component`] snapshots;
/// the machine's total becomes "other" (what no component accounts for)
/// and "machine" (the total).
fn cpu_between(before: &[f64], after: &[f64]) -> Vec<(String, f64)> {
    let d: Vec<f64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b).max(0.0))
        .collect();
    let named: f64 = d.iter().take(COMPONENTS.len()).sum();
    let machine = d.get(COMPONENTS.len()).copied().unwrap_or(0.0);
    let mut out: Vec<(String, f64)> = COMPONENTS
        .iter()
        .zip(&d)
        .map(|(c, v)| (c.to_string(), *v))
        .collect();
    out.push(("other".to_string(), (machine - named).max(0.0)));
    out.push(("machine".to_string(), machine));
    out
}

/// How long a round may wait for all Running, and again for all gone:
/// 300 s, or 50 ms per Domain for a larger fleet.
fn patience(n: usize) -> Duration {
    Duration::from_secs(300).max(Duration::from_millis(50) * u32::try_from(n).unwrap_or(u32::MAX))
}

/// The peak resident memory (VmHWM, MiB) of every process named `name`
/// ([`common::processes`]): the chart's pods are processes of this host
/// too (their own PID namespace, the host's procfs).
fn peak_mib(name: &str) -> Vec<f64> {
    common::processes()
        .into_iter()
        .filter(|(_, base)| base == name)
        .map(|(pid, _)| common::vm_hwm_kib(pid))
        .filter(|kib| *kib > 0)
        .map(|kib| kib as f64 / 1024.0)
        .collect()
}

/// Creates `n` test Domains (`at_once` at a time), waits until all are
/// Running, deletes them and waits until they are gone.
async fn round(
    cluster: &common::Cluster,
    client: &kube::Client,
    n: usize,
    at_once: usize,
    tag: &str,
) -> Round {
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let (watch, seen) = fleet::watch_running(&domains);
    // Let the watch list before the first create.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let apf_before = apf_waits(cluster);
    let cpu_before = cpu_by_component();
    let started = Instant::now();
    let created = fleet::create(&domains, tag, n, "64Mi", at_once).await;
    let creates = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + patience(n);
    while seen.running.lock().unwrap_or_else(|p| p.into_inner()).len() < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = started.elapsed().as_secs_f64();
    let cpu = cpu_between(&cpu_before, &cpu_by_component());
    let apf = apf_between(&apf_before, &apf_waits(cluster));
    watch.abort();
    let running = seen
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let bound = seen.bound.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let lat = fleet::latencies(&created, &running);
    let quantiles = |v: &[f64]| [0.50, 0.95, 0.99].map(|q| fleet::percentile(v, q));
    let to_bound = quantiles(&fleet::latencies(&created, &bound));
    let bound_to_running = quantiles(&fleet::latencies(&bound, &running));
    // Clean up for the next round, as many deletes in flight as creates.
    let deleting = Instant::now();
    futures::stream::iter(created.keys())
        .for_each_concurrent(at_once, |name| {
            let domains = domains.clone();
            async move {
                let _ = domains.delete(name, &DeleteParams::default()).await;
            }
        })
        .await;
    let deadline = Instant::now() + patience(n);
    let lp = kube::api::ListParams::default().limit(1);
    while Instant::now() < deadline {
        match domains.list_metadata(&lp).await {
            Ok(l) if l.items.is_empty() => break,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Round {
        p50: fleet::percentile(&lat, 0.50),
        p95: fleet::percentile(&lat, 0.95),
        p99: fleet::percentile(&lat, 0.99),
        creates,
        to_bound,
        bound_to_running,
        all,
        gone: deleting.elapsed().as_secs_f64(),
        running: running.len(),
        cpu,
        apf,
    }
}

async fn rounds(
    cluster: &common::Cluster,
    client: &kube::Client,
    n: usize,
    at_once: usize,
    count: usize,
    tag: &str,
) -> Vec<Round> {
    let mut out = Vec::new();
    for r in 0..count {
        let x = round(cluster, client, n, at_once, &format!("{tag}{r}")).await;
        eprintln!(
            "[bench] {tag} round {}: {}/{n} Running, p50 {:.3}s p95 {:.3}s p99 {:.3}s all {:.2}s (creates {:.2}s), gone {:.2}s; create → bound p50/p95/p99 {:.3}/{:.3}/{:.3}s, bound → Running {:.3}/{:.3}/{:.3}s",
            r + 1,
            x.running,
            x.p50,
            x.p95,
            x.p99,
            x.all,
            x.creates,
            x.gone,
            x.to_bound[0],
            x.to_bound[1],
            x.to_bound[2],
            x.bound_to_running[0],
            x.bound_to_running[1],
            x.bound_to_running[2],
        );
        let cpu: Vec<String> = x
            .cpu
            .iter()
            .filter(|(_, v)| *v >= 0.05)
            .map(|(c, v)| format!("{c} {v:.1}"))
            .collect();
        eprintln!(
            "[bench] {tag} round {}: CPU seconds to all Running ({:.2} of {} cores busy): {}",
            r + 1,
            x.cpu.last().map_or(0.0, |(_, v)| *v) / x.all.max(f64::EPSILON),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu.join(", ")
        );
        for (key, count, wait) in &x.apf {
            eprintln!(
                "[bench] {tag} round {}: priority and fairness {key}: {count:.0} requests, mean queue wait {wait:.4}s",
                r + 1
            );
        }
        out.push(x);
    }
    out
}

#[tokio::main]
async fn main() {
    let n = env_or("VIREO_CLUSTER_N", 100);
    let count = env_or("VIREO_CLUSTER_ROUNDS", 3);
    let n_nodes = env_or("VIREO_CLUSTER_NODES", 2).max(1);
    let at_once = env_or("VIREO_CLUSTER_AT_ONCE", 8).max(1);
    // Simulated nodes big enough for any fleet (the scale bench's sizes),
    // the same for the processes and the pods.
    let (cpus, memory) = ("512", "4Ti");

    // Today's set-up: operator and the agents as processes.
    // `VIREO_CLUSTER_ONLY=pods` skips the processes (an experiment on the
    // pods alone).
    let pods_only = std::env::var("VIREO_CLUSTER_ONLY").is_ok_and(|v| v == "pods");
    let (procs, procs_mib) = if pods_only {
        (Vec::new(), (Vec::new(), Vec::new()))
    } else {
        let mut cluster = common::Cluster::start("bench-procs");
        let operator = cluster.operator("operator", &["--no-leader-election"]);
        let agents: Vec<common::Proc> = (1..=n_nodes)
            .map(|i| {
                // The chart's resync (`agent.resyncSeconds`), not the
                // tests' 5 s.
                let args = ["--cpus", cpus, "--memory", memory, "--resync-seconds", "30"];
                cluster.agent(&format!("node-{i}"), &args)
            })
            .collect();
        let client = cluster.client().await;
        common::ready_hosts(&client, n_nodes).await;
        let r = rounds(&cluster, &client, n, at_once, count, "procs").await;
        let mib = (peak_mib("vireo-operator"), peak_mib("vireo-agent"));
        drop(agents);
        drop(operator);
        cluster.procs_clear();
        (r, mib)
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
    let nodes = common::nodes::Nodes::start(&cluster, n_nodes);
    nodes.import(&image);
    let chart = common::repo().join("charts/vireo");
    // Further chart values for an experiment (`VIREO_CLUSTER_SET`, helm's
    // `--set` syntax, e.g. `operator.resources.requests.cpu=500m`).
    let extra_set = std::env::var("VIREO_CLUSTER_SET").unwrap_or_default();
    let mut install = vec![
        "install",
        "vireo",
        chart.to_str().unwrap_or("charts/vireo"),
        "--namespace",
        "vireo-system",
        "--create-namespace",
        "--set",
        "uninstall.cleanup=false",
        // The same simulated node size the processes above were given
        // (below).
        "--wait",
        "--timeout",
        "5m",
    ];
    let memory_set = format!("agent.memory={memory}");
    let cpus_set = format!("agent.cpus={cpus}");
    install.extend(["--set", &cpus_set, "--set", &memory_set]);
    if !extra_set.is_empty() {
        install.extend(["--set", &extra_set]);
    }
    cluster.helm_ok(&install);
    let client = cluster.client().await;
    common::ready_hosts(&client, n_nodes).await;
    let pods = rounds(&cluster, &client, n, at_once, count, "pods").await;
    let pods_mib = (peak_mib("vireo-operator"), peak_mib("vireo-agent"));
    drop(nodes);

    let largest = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let row = |name: &str, rs: &[Round], mib: &(Vec<f64>, Vec<f64>)| {
        let p50 = median(rs.iter().map(|r| r.p50).collect());
        let p95 = median(rs.iter().map(|r| r.p95).collect());
        let all = median(rs.iter().map(|r| r.all).collect());
        let gone = median(rs.iter().map(|r| r.gone).collect());
        let ok = rs.iter().all(|r| r.running == n);
        let (op, agent) = (largest(&mib.0), largest(&mib.1));
        let p99 = median(rs.iter().map(|r| r.p99).collect());
        let creates = median(rs.iter().map(|r| r.creates).collect());
        let step = |f: &dyn Fn(&Round) -> f64| median(rs.iter().map(f).collect());
        let to_bound = [0, 1, 2].map(|i| step(&|r: &Round| r.to_bound[i]));
        let bound_to_running = [0, 1, 2].map(|i| step(&|r: &Round| r.bound_to_running[i]));
        println!(
            " {name:<44} {p50:>8.3}s {p95:>8.3}s {all:>9.2}s {gone:>9.2}s {op:>6.0} / {agent:<4.0} {ok}"
        );
        println!(
            " {:<44} creates {creates:.2}s, p99 {p99:.3}s; create → bound p50/p95/p99 {:.3}/{:.3}/{:.3}s, bound → Running {:.3}/{:.3}/{:.3}s",
            "",
            to_bound[0],
            to_bound[1],
            to_bound[2],
            bound_to_running[0],
            bound_to_running[1],
            bound_to_running[2],
        );
        // Each component's CPU seconds to all Running, median of the rounds.
        let names: Vec<String> = rs
            .first()
            .map(|r| r.cpu.iter().map(|(c, _)| c.clone()).collect())
            .unwrap_or_default();
        let cpu: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let v = step(&|r: &Round| r.cpu.get(i).map_or(0.0, |(_, v)| *v));
                (c.clone(), serde_json::json!((v * 10.0).round() / 10.0))
            })
            .collect();
        let shown: Vec<String> = cpu
            .iter()
            .filter(|(_, v)| v.as_f64().unwrap_or(0.0) >= 0.05)
            .map(|(c, v)| format!("{c} {v}"))
            .collect();
        println!(
            " {:<44} CPU seconds to all Running: {}",
            "",
            shown.join(", ")
        );
        // Each round's priority and fairness to all Running.
        let apf: Vec<Vec<serde_json::Value>> = rs
            .iter()
            .map(|r| {
                r.apf
                    .iter()
                    .map(|(k, n, w)| serde_json::json!({"level_and_flow_schema": k, "requests": n, "mean_wait_seconds": w}))
                    .collect()
            })
            .collect();
        serde_json::json!({"priority_and_fairness_per_round": apf, "cpu_seconds_to_all_running": cpu, "p50_seconds": p50, "p95_seconds": p95, "p99_seconds": p99, "creates_seconds": creates, "create_to_bound_seconds": to_bound, "bound_to_running_seconds": bound_to_running, "all_running_seconds": all, "all_gone_seconds": gone, "operator_peak_mib": op, "agent_peak_mib": mib.1, "all_ran": ok})
    };
    println!(
        "{n} test Domains, apply to Running, {n_nodes} nodes, {at_once} creates at a time; medians of {count} rounds"
    );
    println!();
    println!(
        " {:<44} {:>9} {:>9} {:>10} {:>10} {:>13}  all Running",
        "set-up", "p50", "p95", "all", "all gone", "MiB op / agent"
    );
    // `VIREO_CLUSTER_ONLY=pods` ran no processes: no row and no ratio.
    let a = if procs.is_empty() {
        serde_json::Value::Null
    } else {
        row("agents as processes (today's bench)", &procs, &procs_mib)
    };
    let b = row(
        "agents as the chart's pods on kubelet nodes",
        &pods,
        &pods_mib,
    );
    if !procs.is_empty() {
        let ratio = |k: &str| b[k].as_f64().unwrap_or(f64::NAN) / a[k].as_f64().unwrap_or(f64::NAN);
        println!(
            " ratio pods / processes: p50 {:.2}x, p95 {:.2}x",
            ratio("p50_seconds"),
            ratio("p95_seconds")
        );
    }
    let json = serde_json::json!({
        "benchmark": "cluster",
        "domains": n,
        "nodes": n_nodes,
        "creates_at_once": at_once,
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
