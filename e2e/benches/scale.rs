//! Scale benchmark: N Domains of the test driver across A agents, on a real
//! kube-apiserver and etcd, with the release builds of the operator and
//! agents; then all of them deleted.
//!
//! ```text
//! cargo bench -p vireo-e2e --bench scale -- --domains 1000            # 3 agents
//! cargo bench -p vireo-e2e --bench scale -- --domains 10000 --agents 10
//! ```
//!
//! `--pprof SECONDS` (or `VIREO_SCALE_PPROF`) starts kube-apiserver with
//! profiling on and takes a CPU profile of it for that long from the first
//! create: `target/bench/scale-apiserver.pprof`, and `go tool pprof -top
//! -cum` of it in the output and the JSON.
//!
//! `--floor` runs no operator and no agent: it measures what this machine's
//! API server and etcd alone allow, so that the control plane's own share
//! of the time shows. First the bench's creates alone (16 at a time), then
//! the least any control plane could write to bring a Domain to Running:
//! for each Domain its create, one PATCH binding it (label, UUID) and one
//! status apply saying it runs, written back to back by the bench itself
//! with no watch and no processing between them, 48 Domains at a time
//! (the bench's 16 creates beside the operator's 32 reconciles). Written
//! to `target/bench/scale-floor-N.json`.
//!
//! `--operator-concurrency N` starts the operator with `--concurrency N`
//! (its default otherwise), to compare.
//!
//! (`VIREO_SCALE_N` and `VIREO_SCALE_AGENTS` work too.) Prints, and writes
//! to `target/bench/scale.json` (`scale-N.json` too): the time from the
//! first create to all Running and from the delete to all gone; p50, p95
//! and p99 of each Domain's create-to-Running and of each step on its way
//! (created → bound by the operator → gated by the operator's status →
//! seen and defined by its agent → started → Running seen in a watch); the
//! reconcile durations the operator and agents report; the API requests
//! per Domain by verb and by kind (from the API server's own counters),
//! its priority-and-fairness queueing and rejections, the watch restarts
//! (LISTs and WATCHes of Domains past the first: a WATCH resumes a watch
//! from its resourceVersion, a LIST is a relist), the watchers the
//! API server closed and, from its log, which ones and whether the client
//! had read all it was sent; the CPU seconds of every
//! process; the peak memory (VmHWM) of the operator and of each agent; the
//! machine's load average.
//! Goals (issue 19): 1,000 over 3 agents all Running ≤ 8 s, p99 ≤ 3 s, p50
//! ≤ 1 s; 10,000 over 10 agents ≤ 90 s, operator ≤ 300 MiB, agent ≤ 100 MiB.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::fleet;
use futures::TryStreamExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::watcher;
use vireo_crds::{Domain, DomainState};

/// `--NAME VALUE` on the command line, else the environment variable, else
/// the default.
fn arg_or(flag: &str, env: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .or_else(|| std::env::var(env).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

/// The PID `e2e/cluster.sh` recorded under `key` (`APISERVER_PID`,
/// `ETCD_PID`), 0 when absent.
fn cluster_pid(cluster: &common::Cluster, key: &str) -> u32 {
    cluster
        .env
        .get(key)
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0)
}

/// Takes a CPU profile of kube-apiserver for `secs` from now (its
/// /debug/pprof, served when the cluster was started with profiling on)
/// in a thread, writes it to `target/bench/scale-apiserver.pprof` and
/// hands back `go tool pprof -top -cum`'s lines: where the API server's CPU
/// went while the Domains were created and started.
fn apiserver_profile(
    cluster: &common::Cluster,
    secs: usize,
) -> std::thread::JoinHandle<Result<String, String>> {
    let mut cmd = std::process::Command::new(common::tools_bin().join("kubectl"));
    cmd.arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["get", "--raw"])
        .arg(format!("/debug/pprof/profile?seconds={secs}"))
        .arg(format!("--request-timeout={}s", secs + 60));
    let dir = common::repo().join("target/bench");
    std::thread::spawn(move || {
        let out = cmd.output().map_err(|e| format!("kubectl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let path = dir.join("scale-apiserver.pprof");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, &out.stdout))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let top = std::process::Command::new("go")
            // Cumulative: which request paths the time went to (the flat
            // top is the Go runtime's allocator and collector).
            .args(["tool", "pprof", "-top", "-cum", "-nodecount=40"])
            .arg(&path)
            .output()
            .map_err(|e| format!("go tool pprof (the profile is in {}): {e}", path.display()))?;
        if !top.status.success() {
            return Err(String::from_utf8_lossy(&top.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&top.stdout).into_owned())
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Seconds since the epoch, now.
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The API server's counters this bench reads, keyed `metric|labels`.
fn api_metrics(cluster: &common::Cluster) -> HashMap<String, f64> {
    let text = cluster.kubectl_ok(&["get", "--raw", "/metrics"]);
    let mut out: HashMap<String, f64> = HashMap::new();
    for line in text.lines() {
        let Some((name, labels, value)) = common::prom_sample(line) else {
            continue;
        };
        let l = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let key = match name {
            "apiserver_request_total" | "apiserver_request_duration_seconds_sum" => {
                let sub = l("subresource");
                format!(
                    "{name}|{} {}{}",
                    l("verb"),
                    l("resource"),
                    if sub.is_empty() {
                        String::new()
                    } else {
                        format!("/{sub}")
                    }
                )
            }
            "apiserver_flowcontrol_rejected_requests_total" => {
                format!("{name}|{} {}", l("priority_level"), l("reason"))
            }
            "apiserver_flowcontrol_request_wait_duration_seconds_sum"
            | "apiserver_flowcontrol_request_wait_duration_seconds_count" => {
                format!("{name}|{} {}", l("priority_level"), l("execute"))
            }
            // Watches the API server closed on a watcher that fell behind.
            "apiserver_terminated_watchers_total" => format!("{name}|{}", l("resource")),
            // The watch cache's event history; a watch opened while it
            // holds C events gets a buffer of max(10, C / 75) events.
            "watch_cache_capacity" => format!("{name}|{}", l("resource")),
            "etcd_request_duration_seconds_sum" | "etcd_request_duration_seconds_count" => {
                format!("{name}|{}", l("operation"))
            }
            _ => continue,
        };
        *out.entry(key).or_default() += value;
    }
    out
}

/// What changed between two readings of a metric family: (labels, delta),
/// largest first.
fn delta(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    metric: &str,
) -> Vec<(String, f64)> {
    let prefix = format!("{metric}|");
    let mut v: Vec<(String, f64)> = after
        .iter()
        .filter_map(|(k, n)| {
            let labels = k.strip_prefix(&prefix)?;
            let d = n - before.get(k).copied().unwrap_or_default();
            (d > 0.0).then(|| (labels.to_string(), d))
        })
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Requests by verb (the first word of the kind).
fn by_verb(kinds: &[(String, f64)]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, n) in kinds {
        let verb = k.split(' ').next().unwrap_or_default().to_string();
        *out.entry(verb).or_default() += n;
    }
    out
}

/// The `q` quantile of a Prometheus histogram family on a process's
/// /metrics (`metric` without `_bucket`), for `controller`, with its count
/// and mean.
fn histogram(text: &str, metric: &str, controller: &str) -> Option<(f64, f64, f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines() {
        let Some((name, labels, value)) = common::prom_sample(line) else {
            continue;
        };
        if labels.get("controller").map(String::as_str) != Some(controller) {
            continue;
        }
        if name == format!("{metric}_bucket") {
            let le = labels.get("le").map(String::as_str).unwrap_or("+Inf");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            buckets.push((le, value));
        } else if name == format!("{metric}_sum") {
            sum = value;
        } else if name == format!("{metric}_count") {
            count = value;
        }
    }
    if count == 0.0 {
        return None;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let q = |p: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= p * count)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    Some((count, sum / count, q(0.5), q(0.99)))
}

/// When each Domain passed each step, in seconds since the epoch.
#[derive(Default, Clone, Debug)]
struct Steps {
    created: Option<f64>,
    bound: Option<f64>,
    gated: Option<f64>,
    defined: Option<f64>,
    started: Option<f64>,
    running: Option<f64>,
    gone: Option<f64>,
}

type Timeline = Arc<Mutex<HashMap<String, Steps>>>;

fn lock(t: &Timeline) -> std::sync::MutexGuard<'_, HashMap<String, Steps>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Watches the Domains and stamps, per Domain, when it was first seen bound
/// (the operator's label), gated (the operator's `VolumesReady`), Running,
/// and deleted. Returns once the watch's first list is done.
async fn watch_steps(api: &Api<Domain>, steps: Timeline) -> tokio::task::JoinHandle<()> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let api = api.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let _ = watcher(api, watcher::Config::default())
            .try_for_each(move |ev| {
                let now = now_secs();
                match ev {
                    watcher::Event::InitDone => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
                        let name = d.metadata.name.clone().unwrap_or_default();
                        let mut t = lock(&steps);
                        let s = t.entry(name).or_default();
                        if d.metadata
                            .labels
                            .as_ref()
                            .is_some_and(|l| l.contains_key(vireo_crds::labels::NODE))
                        {
                            s.bound.get_or_insert(now);
                        }
                        let status = d.status.as_ref();
                        if status.is_some_and(|st| {
                            st.conditions.iter().any(|c| c.type_ == "VolumesReady")
                        }) {
                            s.gated.get_or_insert(now);
                        }
                        if status.and_then(|st| st.state) == Some(DomainState::Running) {
                            s.running.get_or_insert(now);
                        }
                    }
                    watcher::Event::Delete(d) => {
                        let name = d.metadata.name.clone().unwrap_or_default();
                        lock(&steps)
                            .entry(name)
                            .or_default()
                            .gone
                            .get_or_insert(now);
                    }
                    watcher::Event::Init => {}
                }
                futures::future::ready(Ok(()))
            })
            .await;
    });
    let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
    task
}

/// The agents' `defined` and `started` log lines (RFC 3339 UTC time, then
/// `domain=NAMESPACE/NAME`), into the timeline.
fn agent_steps(agents: &[common::Proc], steps: &Timeline) {
    let mut t = lock(steps);
    for a in agents {
        for line in a.log_text().lines() {
            let which = if line.contains(" defined ") {
                0
            } else if line.contains(" started ") {
                1
            } else {
                continue;
            };
            let Some(at) = line
                .split_whitespace()
                .next()
                .and_then(|ts| ts.parse::<k8s_openapi::jiff::Timestamp>().ok())
            else {
                continue;
            };
            let Some(name) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("domain="))
                .and_then(|k| k.split_once('/'))
                .map(|(_, n)| n.to_string())
            else {
                continue;
            };
            let secs = at.as_millisecond() as f64 / 1000.0;
            let s = t.entry(name).or_default();
            let slot = if which == 0 {
                &mut s.defined
            } else {
                &mut s.started
            };
            slot.get_or_insert(secs);
        }
    }
}

/// Sorted differences `to - from` over the Domains that have both.
fn spans(
    t: &HashMap<String, Steps>,
    from: fn(&Steps) -> Option<f64>,
    to: fn(&Steps) -> Option<f64>,
) -> Vec<f64> {
    let mut v: Vec<f64> = t.values().filter_map(|s| Some(to(s)? - from(s)?)).collect();
    v.sort_by(f64::total_cmp);
    v
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--floor") {
        floor(arg_or("--domains", "VIREO_SCALE_N", 1000)).await;
        return;
    }
    let n = arg_or("--domains", "VIREO_SCALE_N", 1000);
    let n_agents = arg_or("--agents", "VIREO_SCALE_AGENTS", 3).max(1);
    let pprof_secs = arg_or("--pprof", "VIREO_SCALE_PPROF", 0);
    let load_before = load_average();
    // Verbosity 1: the API server logs each watcher it closes for falling
    // behind, with its label selector (which process it was).
    let mut env = vec![("VIREO_E2E_APISERVER_V", "1")];
    if pprof_secs > 0 {
        env.push(("VIREO_E2E_PROFILING", "true"));
    }
    let mut cluster = common::Cluster::start_with("scale", &env);
    // Bigger simulated nodes than the tests use, so every guest fits.
    let big = ["--cpus", "512", "--memory", "4Ti", "--resync-seconds", "60"];
    let op_concurrency = arg_or(
        "--operator-concurrency",
        "VIREO_SCALE_OPERATOR_CONCURRENCY",
        0,
    );
    let mut op_args = vec!["--no-leader-election".to_string()];
    if op_concurrency > 0 {
        op_args.extend(["--concurrency".to_string(), op_concurrency.to_string()]);
    }
    let op_args: Vec<&str> = op_args.iter().map(String::as_str).collect();
    let operator = cluster.operator("operator", &op_args);
    let agents: Vec<common::Proc> = (1..=n_agents)
        .map(|i| cluster.agent(&format!("node-{i}"), &big))
        .collect();
    let client = cluster.client().await;
    common::ready_hosts(&client, n_agents).await;

    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let steps: Timeline = Arc::default();
    let watch = watch_steps(&domains, steps.clone()).await;
    let metrics_before = api_metrics(&cluster);
    let pid_of = |key: &str| cluster_pid(&cluster, key);
    let mut cpu_pids: Vec<(String, u32)> = vec![
        ("kube-apiserver".into(), pid_of("APISERVER_PID")),
        ("etcd".into(), pid_of("ETCD_PID")),
        ("operator".into(), operator.pid().unwrap_or(0)),
    ];
    for (i, a) in agents.iter().enumerate() {
        cpu_pids.push((format!("agent node-{}", i + 1), a.pid().unwrap_or(0)));
    }
    let cpu_now = || -> Vec<f64> {
        cpu_pids
            .iter()
            .map(|(_, p)| common::cpu_seconds(*p))
            .collect()
    };
    let cpu_before = cpu_now();
    let started = Instant::now();
    let t0 = now_secs();
    let profile = (pprof_secs > 0).then(|| apiserver_profile(&cluster, pprof_secs));
    let created_map = fleet::create(&domains, "scale", n, "256Mi", 16).await;
    let created = started.elapsed();
    {
        let mut t = lock(&steps);
        for (name, at) in &created_map {
            let since = at.saturating_duration_since(started).as_secs_f64();
            t.entry(name.clone()).or_default().created = Some(t0 + since);
        }
    }
    let running_count = || {
        lock(&steps)
            .values()
            .filter(|s| s.running.is_some() && s.created.is_some())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while running_count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_running = started.elapsed();
    let load_running = load_average();
    let cpu_running = cpu_now();
    // Let the last status writes land before counting requests.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics_running = api_metrics(&cluster);
    let proc_metrics: Vec<(String, String)> = std::iter::once(&operator)
        .chain(agents.iter())
        .map(|p| {
            (
                p.name.clone(),
                p.http_get("/metrics").map(|(_, b)| b).unwrap_or_default(),
            )
        })
        .collect();

    // All deleted: the agents destroy and undefine each guest and release
    // their finalizers.
    let deleting = Instant::now();
    // One DELETE of the collection; on a loaded API server the client may
    // give up on it before the server has marked every Domain (10,000 did
    // once), so it is sent again for what is left.
    for attempt in 1..=5 {
        match domains
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
        {
            Ok(_) => break,
            Err(e) => eprintln!("delete the Domains (attempt {attempt}): {e}"),
        }
    }
    let gone_count = || lock(&steps).values().filter(|s| s.gone.is_some()).count();
    let deadline = Instant::now() + Duration::from_secs(600);
    while gone_count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_gone = deleting.elapsed();
    let cpu_gone = cpu_now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics_gone = api_metrics(&cluster);
    watch.abort();
    agent_steps(&agents, &steps);

    let profile_top = profile.and_then(|p| p.join().ok()).and_then(|r| match r {
        Ok(top) => Some(top),
        Err(e) => {
            eprintln!("the API server's CPU profile: {e}");
            None
        }
    });
    let t = lock(&steps).clone();
    let running = t.values().filter(|s| s.running.is_some()).count();
    let gone = t.values().filter(|s| s.gone.is_some()).count();
    let total = spans(&t, |s| s.created, |s| s.running);
    let step_rows: Vec<(&str, Vec<f64>)> = vec![
        (
            "create → bound (operator)",
            spans(&t, |s| s.created, |s| s.bound),
        ),
        (
            "bound → gated (operator status)",
            spans(&t, |s| s.bound, |s| s.gated),
        ),
        (
            "bound → defined (agent saw it)",
            spans(&t, |s| s.bound, |s| s.defined),
        ),
        (
            "gated → started (agent)",
            spans(&t, |s| s.gated, |s| s.started),
        ),
        (
            "started → Running seen",
            spans(&t, |s| s.started, |s| s.running),
        ),
        ("create → Running", total.clone()),
    ];
    let op_mib = common::vm_hwm_kib(operator.pid().unwrap_or(0)) as f64 / 1024.0;
    let agent_mib: Vec<f64> = agents
        .iter()
        .map(|a| common::vm_hwm_kib(a.pid().unwrap_or(0)) as f64 / 1024.0)
        .collect();
    let agent_max = agent_mib.iter().copied().fold(0.0, f64::max);
    let pct = fleet::percentile;

    println!(
        "{n} Domains (test driver) across {n_agents} agents on a real kube-apiserver (load before: {load_before}; at all Running: {load_running})"
    );
    println!();
    println!(" {:<40} {:>12}", "measure", "value");
    println!(
        " {:<40} {:>12}",
        "running / created",
        format!("{running}/{n}")
    );
    println!(
        " {:<40} {:>11.2}s",
        "creates sent (16 at a time)",
        created.as_secs_f64()
    );
    println!(
        " {:<40} {:>11.2}s",
        "first create to all Running",
        all_running.as_secs_f64()
    );
    for (q, name) in [(0.50, "p50"), (0.95, "p95"), (0.99, "p99")] {
        println!(
            " {:<40} {:>11.3}s",
            format!("create-to-Running {name}"),
            pct(&total, q)
        );
    }
    println!(
        " {:<40} {:>11.2}s  ({gone}/{n} gone)",
        "delete to all gone",
        all_gone.as_secs_f64()
    );
    println!(" {:<40} {:>9.1} MiB", "operator peak RSS (VmHWM)", op_mib);
    println!(
        " {:<40} {:>9.1} MiB  (all: {})",
        "agent peak RSS, largest",
        agent_max,
        agent_mib
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!(" where the time goes, per Domain          p50       p95       p99     count");
    for (name, v) in &step_rows {
        println!(
            "   {:<36} {:>8.3}s {:>8.3}s {:>8.3}s {:>8}",
            name,
            pct(v, 0.5),
            pct(v, 0.95),
            pct(v, 0.99),
            v.len()
        );
    }
    println!();
    println!(" reconciles (each process's /metrics)      count     mean      p50≤      p99≤");
    for (name, text) in &proc_metrics {
        for (metric, controller) in [
            ("vireo_operator_reconcile_duration_seconds", "domain"),
            ("vireo_agent_reconcile_duration_seconds", "agent-domain"),
        ] {
            if let Some((count, mean, p50, p99)) = histogram(text, metric, controller) {
                println!(
                    "   {:<36} {:>8} {:>8.4}s {:>8.4}s {:>8.4}s",
                    format!("{name} {controller}"),
                    count,
                    mean,
                    p50,
                    p99
                );
            }
        }
    }
    println!();
    println!(" CPU seconds                      to all Running   deleting");
    let cpu_rows: Vec<(String, f64, f64)> = cpu_pids
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            (
                name.clone(),
                cpu_running[i] - cpu_before[i],
                cpu_gone[i] - cpu_running[i],
            )
        })
        .collect();
    let agents_cpu: (f64, f64) = cpu_rows
        .iter()
        .filter(|r| r.0.starts_with("agent"))
        .fold((0.0, 0.0), |a, r| (a.0 + r.1, a.1 + r.2));
    for (name, up, down) in cpu_rows.iter().filter(|r| !r.0.starts_with("agent")) {
        println!("   {name:<32} {up:>12.2}s {down:>9.2}s");
    }
    println!(
        "   {:<32} {:>12.2}s {:>9.2}s",
        format!("{n_agents} agents together"),
        agents_cpu.0,
        agents_cpu.1
    );

    let kinds_up = delta(&metrics_before, &metrics_running, "apiserver_request_total");
    let secs_up = delta(
        &metrics_before,
        &metrics_running,
        "apiserver_request_duration_seconds_sum",
    );
    let kinds_down = delta(&metrics_running, &metrics_gone, "apiserver_request_total");
    let nf = n.max(1) as f64;
    println!();
    println!(" API requests per Domain by verb     to Running   deleting");
    let (verbs_up, verbs_down) = (by_verb(&kinds_up), by_verb(&kinds_down));
    let mut verbs: Vec<&String> = verbs_up.keys().chain(verbs_down.keys()).collect();
    verbs.sort();
    verbs.dedup();
    for v in &verbs {
        println!(
            "   {:<32} {:>10.2} {:>10.2}",
            v,
            verbs_up.get(*v).copied().unwrap_or(0.0) / nf,
            verbs_down.get(*v).copied().unwrap_or(0.0) / nf
        );
    }
    println!(
        "   {:<32} {:>10.2} {:>10.2}",
        "all",
        verbs_up.values().sum::<f64>() / nf,
        verbs_down.values().sum::<f64>() / nf
    );
    println!(" API requests by kind, to Running (count, summed latency):");
    for (kind, count) in kinds_up.iter().take(14) {
        let secs = secs_up
            .iter()
            .find(|(k, _)| k == kind)
            .map_or(0.0, |(_, s)| *s);
        println!("   {kind:<40} {count:>7} {secs:>8.2}s");
    }
    println!(" API requests by kind, deleting:");
    for (kind, count) in kinds_down.iter().take(10) {
        println!("   {kind:<40} {count:>7}");
    }
    // Watch restarts: every LIST or WATCH of Domains in the run is one
    // (each watcher made its first before the clock started).
    let restarts: Vec<(String, f64)> = [("to Running", &kinds_up), ("deleting", &kinds_down)]
        .into_iter()
        .flat_map(|(phase, kinds)| {
            kinds
                .iter()
                .filter(|(k, _)| k == "LIST domains" || k == "WATCH domains")
                .map(move |(k, n)| (format!("{phase}: {k}"), *n))
        })
        .collect();
    println!(
        " watch restarts of Domains (LIST, WATCH requests after the start): {}",
        if restarts.is_empty() {
            "none".to_string()
        } else {
            restarts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let terminated = delta(
        &metrics_before,
        &metrics_gone,
        "apiserver_terminated_watchers_total",
    );
    println!(
        " watchers the API server closed for falling behind (apiserver_terminated_watchers_total): {}",
        if terminated.is_empty() {
            "none".to_string()
        } else {
            terminated
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    // Which watchers those were: the API server logs each one it closes,
    // naming its label selector (an agent's is its node; the operator's and
    // this bench's watch every Domain, no selector).
    let (closed, client_kept_up) = closed_watchers(&cluster.dir.join("kube-apiserver.log"));
    if !closed.is_empty() {
        println!(
            "   closed, by watcher (kube-apiserver.log): {}",
            closed
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Each watch has two queues in the API server: events waiting for
        // the watch's own goroutine (which filters and encodes them), and
        // encoded events waiting for the client to read them. The second
        // empty when the watch is closed means the client was keeping up.
        println!(
            "   of those, {client_kept_up} of {} with the client's queue empty (len(c.result) = 0): \
             for those, the API server's own goroutine for the watch fell behind, not the client",
            closed.values().sum::<usize>()
        );
    }
    // Why they fell behind: the API server sizes each watch's buffer when
    // the watch opens, from its watch cache's history then (capacity / 75 s
    // of history, at least 10 events, at most 100). Watches opened on a
    // quiet cluster get 10; the cache grows during the burst, and a watch
    // reopened then gets more.
    let capacity = |m: &HashMap<String, f64>| {
        m.get("watch_cache_capacity|domains")
            .copied()
            .unwrap_or(0.0)
    };
    let buffer = |c: f64| (c / 75.0).ceil().clamp(10.0, 100.0);
    let capacities = [
        capacity(&metrics_before),
        capacity(&metrics_running),
        capacity(&metrics_gone),
    ];
    println!(
        "   the Domain watch cache's capacity (watch_cache_capacity) before / at all Running / at all gone: {:.0} / {:.0} / {:.0} events, so a watch opened then gets a buffer of {:.0} / {:.0} / {:.0}",
        capacities[0],
        capacities[1],
        capacities[2],
        buffer(capacities[0]),
        buffer(capacities[1]),
        buffer(capacities[2]),
    );
    let apf_rejected: Vec<(String, f64)> = delta(
        &metrics_before,
        &metrics_gone,
        "apiserver_flowcontrol_rejected_requests_total",
    );
    let apf_wait = delta(
        &metrics_before,
        &metrics_gone,
        "apiserver_flowcontrol_request_wait_duration_seconds_sum",
    );
    let apf_count = delta(
        &metrics_before,
        &metrics_gone,
        "apiserver_flowcontrol_request_wait_duration_seconds_count",
    );
    println!(
        " priority and fairness (API server), whole run: rejected {}",
        {
            let r: f64 = apf_rejected.iter().map(|(_, n)| n).sum();
            r
        }
    );
    for (level, count) in &apf_count {
        let wait = apf_wait
            .iter()
            .find(|(k, _)| k == level)
            .map_or(0.0, |(_, s)| *s);
        println!(
            "   {:<40} {:>7} requests, mean queue wait {:.4}s",
            level,
            count,
            wait / count.max(1.0)
        );
    }
    let etcd_sum = delta(
        &metrics_before,
        &metrics_running,
        "etcd_request_duration_seconds_sum",
    );
    let etcd_count = delta(
        &metrics_before,
        &metrics_running,
        "etcd_request_duration_seconds_count",
    );
    println!(" etcd as the API server sees it, to Running (count, mean):");
    for (op, count) in etcd_count.iter().take(6) {
        let secs = etcd_sum
            .iter()
            .find(|(k, _)| k == op)
            .map_or(0.0, |(_, s)| *s);
        println!("   {op:<40} {count:>7} {:>8.4}s", secs / count.max(1.0));
    }

    let q = |v: &Vec<f64>| serde_json::json!({"p50": pct(v, 0.5), "p95": pct(v, 0.95), "p99": pct(v, 0.99), "count": v.len()});
    let json = serde_json::json!({
        "benchmark": "scale",
        "domains": n,
        "agents": n_agents,
        "load_before": load_before,
        "load_at_all_running": load_running,
        "running": running,
        "gone": gone,
        "creates_seconds": created.as_secs_f64(),
        "all_running_seconds": all_running.as_secs_f64(),
        "all_gone_seconds": all_gone.as_secs_f64(),
        "p50_seconds": pct(&total, 0.50),
        "p95_seconds": pct(&total, 0.95),
        "p99_seconds": pct(&total, 0.99),
        "steps": step_rows.iter().map(|(k, v)| (k.to_string(), q(v))).collect::<serde_json::Map<_, _>>(),
        "api_requests_per_domain_by_verb": {
            "to_running": verbs_up.iter().map(|(k, v)| (k.clone(), serde_json::json!(v / nf))).collect::<serde_json::Map<_, _>>(),
            "deleting": verbs_down.iter().map(|(k, v)| (k.clone(), serde_json::json!(v / nf))).collect::<serde_json::Map<_, _>>(),
        },
        "api_requests_by_kind": kinds_up.iter().map(|(k, c)| serde_json::json!({"kind": k, "count": c})).collect::<Vec<_>>(),
        "api_requests_by_kind_deleting": kinds_down.iter().map(|(k, c)| serde_json::json!({"kind": k, "count": c})).collect::<Vec<_>>(),
        "watchers_terminated": terminated.iter().map(|(k, c)| (k.clone(), serde_json::json!(c))).collect::<serde_json::Map<_, _>>(),
        "watchers_closed_by_selector": closed.iter().map(|(k, c)| (k.clone(), serde_json::json!(c))).collect::<serde_json::Map<_, _>>(),
        "watchers_closed_with_client_queue_empty": client_kept_up,
        "domain_watch_cache_capacity": {"before": capacities[0], "at_all_running": capacities[1], "at_all_gone": capacities[2]},
        "watch_restarts": restarts.iter().map(|(k, c)| (k.clone(), serde_json::json!(c))).collect::<serde_json::Map<_, _>>(),
        "apf_rejected": apf_rejected.iter().map(|(_, n)| n).sum::<f64>(),
        "cpu_seconds": cpu_rows.iter().map(|(k, up, down)| (k.clone(), serde_json::json!({"to_running": up, "deleting": down}))).collect::<serde_json::Map<_, _>>(),
        "operator_peak_mib": op_mib,
        "agent_peak_mib": agent_mib,
        "apiserver_cpu_profile_top": profile_top.clone(),
    });
    if let Some(top) = &profile_top {
        println!();
        println!(
            " kube-apiserver CPU profile, the first {pprof_secs} s (target/bench/scale-apiserver.pprof):"
        );
        for line in top.lines() {
            println!("   {line}");
        }
    }
    let dir = common::repo().join("target/bench");
    let body = serde_json::to_vec_pretty(&json).unwrap_or_default();
    for path in [dir.join("scale.json"), dir.join(format!("scale-{n}.json"))] {
        let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &body));
        match written {
            Ok(()) => println!(" written: {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }
    }
    drop(agents);
    drop(operator);
    cluster.procs_clear();
    if running < n || gone < n {
        std::process::exit(1);
    }
}

/// The watchers kube-apiserver closed for not keeping up, counted by the
/// label selector its log line names ("every Domain" for none), and how
/// many of them had nothing waiting for the client (`len(c.result) = 0`).
fn closed_watchers(log: &std::path::Path) -> (BTreeMap<String, usize>, usize) {
    let mut out = BTreeMap::new();
    let mut client_kept_up = 0;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text
        .lines()
        .filter(|l| l.contains("watcher close due to unresponsiveness"))
    {
        let labels = line
            .split_once("labels: \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(l, _)| l.to_string())
            .unwrap_or_default();
        let key = if labels.is_empty() {
            "every Domain".to_string()
        } else {
            labels
        };
        *out.entry(key).or_insert(0) += 1;
        if line.contains("len(c.result) = 0,") {
            client_kept_up += 1;
        }
    }
    (out, client_kept_up)
}

/// Waits until no Domain is left in `api` (they carry no finalizer here).
async fn wait_empty(api: &Api<Domain>) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(l) if l.items.is_empty() => return,
            Ok(_) => {}
            Err(e) => eprintln!("list the Domains: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `--floor`: the API server and etcd alone, no operator, no agent.
async fn floor(n: usize) {
    use kube::api::{Patch, PatchParams, PostParams};
    let load_before = load_average();
    let mut cluster = common::Cluster::start("scale-floor");
    let client = cluster.client().await;
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let pid_of = |key: &str| cluster_pid(&cluster, key);
    let (api_pid, etcd_pid) = (pid_of("APISERVER_PID"), pid_of("ETCD_PID"));
    let cpu = || (common::cpu_seconds(api_pid), common::cpu_seconds(etcd_pid));

    // 1. The bench's creates alone.
    let c0 = cpu();
    let started = Instant::now();
    let _ = fleet::create(&domains, "alone", n, "256Mi", 16).await;
    let creates_alone = started.elapsed().as_secs_f64();
    let c1 = cpu();
    if let Err(e) = domains
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
    {
        eprintln!("delete the Domains: {e}");
    }
    wait_empty(&domains).await;

    // 2. Create, bind, status Running: three writes per Domain, nothing else.
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let c2 = cpu();
    let started = Instant::now();
    futures::StreamExt::for_each_concurrent(futures::stream::iter(0..n), 48, |i| {
        let api = domains.clone();
        let (latencies, errors) = (latencies.clone(), errors.clone());
        async move {
            let name = format!("floor-{i:05}");
            let node = format!("node-{}", i % 3 + 1);
            let t = Instant::now();
            let result = async {
                let made = api
                    .create(&PostParams::default(), &fleet::test_domain(&name, "256Mi"))
                    .await?;
                let uid = made.metadata.uid.clone().unwrap_or_default();
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({
                        "metadata": {"labels": {"vireo.dev/node": node}},
                        "spec": {"uuid": uid},
                    })),
                )
                .await?;
                let status = serde_json::json!({
                    "apiVersion": <Domain as kube::Resource>::api_version(&()),
                    "kind": <Domain as kube::Resource>::kind(&()),
                    "status": {"state": "running", "nodeName": node, "id": i + 1},
                });
                api.patch_status(
                    &name,
                    &PatchParams::apply("scale-floor").force(),
                    &Patch::Apply(&status),
                )
                .await?;
                Ok::<(), kube::Error>(())
            }
            .await;
            match result {
                Ok(()) => latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(t.elapsed().as_secs_f64()),
                Err(e) => errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{name}: {e}")),
            }
        }
    })
    .await;
    let three_writes = started.elapsed().as_secs_f64();
    let c3 = cpu();
    let mut lat = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lat.sort_by(f64::total_cmp);
    let errs = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let pct = fleet::percentile;

    println!(
        "{n} Domains on this machine's kube-apiserver and etcd alone, no operator, no agent (load before: {load_before})"
    );
    println!();
    println!(" {:<58} {:>9} {:>14}", "measure", "time", "CPU api / etcd");
    println!(
        " {:<58} {:>8.2}s {:>6.1}s / {:.1}s",
        "creates alone, 16 at a time",
        creates_alone,
        c1.0 - c0.0,
        c1.1 - c0.1
    );
    println!(
        " {:<58} {:>8.2}s {:>6.1}s / {:.1}s",
        "create + bind PATCH + status apply, 48 Domains at a time",
        three_writes,
        c3.0 - c2.0,
        c3.1 - c2.1
    );
    println!(
        "   each Domain's three writes: p50 {:.3}s, p95 {:.3}s, p99 {:.3}s ({} done, {} failed)",
        pct(&lat, 0.5),
        pct(&lat, 0.95),
        pct(&lat, 0.99),
        lat.len(),
        errs.len()
    );
    for e in errs.iter().take(5) {
        eprintln!("   {e}");
    }
    let json = serde_json::json!({
        "benchmark": "scale-floor",
        "domains": n,
        "load_before": load_before,
        "creates_alone_seconds": creates_alone,
        "creates_alone_cpu_seconds": {"kube-apiserver": c1.0 - c0.0, "etcd": c1.1 - c0.1},
        "three_writes_seconds": three_writes,
        "three_writes_cpu_seconds": {"kube-apiserver": c3.0 - c2.0, "etcd": c3.1 - c2.1},
        "three_writes_per_domain": {"p50": pct(&lat, 0.5), "p95": pct(&lat, 0.95), "p99": pct(&lat, 0.99), "count": lat.len()},
        "failed": errs.len(),
    });
    let dir = common::repo().join("target/bench");
    let path = dir.join(format!("scale-floor-{n}.json"));
    let body = serde_json::to_vec_pretty(&json).unwrap_or_default();
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &body)) {
        Ok(()) => println!(" written: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    cluster.procs_clear();
    if !errs.is_empty() {
        std::process::exit(1);
    }
}
