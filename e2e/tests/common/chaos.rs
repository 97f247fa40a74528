//! The chaos run (issue 18 item 1), shared by `e2e/benches/chaos.rs` (the
//! full form) and `e2e/tests/chaos.rs` (the short form in `scripts/test`).
//!
//! On a real kube-apiserver and etcd with three agents and two operator
//! replicas (leader election), workers create, change (memory,
//! runStrategy Always/Halted) and delete `type: test` Domains at random
//! for a bounded time (one in four with a disk: a StorageVol in the dir
//! pool `chaos`, created before its Domain and deleted after it), while a
//! fault thread SIGKILLs an agent, the operator leader, etcd or
//! kube-apiserver and starts it again after a short random pause (same
//! data directory, same ports): the first four faults are the four kinds
//! in a shuffled order, the rest drawn at random. Anything that exits on
//! its own is started again too, as a kubelet would.
//!
//! An observer checks all along, from the API and from each agent's own
//! records (STATE/test-node/domains/*.json, the test driver's state): no
//! Domain (by UUID) ever active on two nodes at once, nor on a node it is
//! not bound to, and no binding ever changes. After the faults stop it
//! waits for convergence (every Domain bound, its status at its spec's
//! generation and in the state its runStrategy asks, the node's record
//! the same state and ID, its node-cleanup finalizer there; deleted
//! Domains and StorageVols gone with their finalizers; bound volumes Ready
//! with their file, in-use ones holding their in-use finalizer), then
//! checks: nothing the workers were told was written is lost, no node
//! record is left for a Domain that is gone, IDs are unique per node
//! among running Domains, the files in each node's pool directory are
//! exactly the StorageVols bound there (no partial file left), and no
//! process of the run is left beside the ones it holds.
//!
//! With `guests` > 0, real guests join in (qemu with the busybox guest
//! image, kvm with the test guest): their records (STATE/{qemu,kvm}/domains)
//! count like the test driver's, each running one's VM process must be
//! there, once, and no other VM process (whoever its parent) nor any other
//! process may be left.
//!
//! Networks: where the host allows it (root, `ip`, `nft`, dnsmasq), each
//! agent runs in a network namespace of its own (`ip netns exec`, killed
//! and started again there) with the real network backend: a Network is a
//! bridge, an nftables table and a dnsmasq in each node's namespace. The
//! run has [`Config::networks`] Networks `chaosnet-0`.. (nat, isolated,
//! route in turn, each with DHCP); the first [`STABLE_NETWORKS`] stay for
//! the run and every real guest has an interface on one of them (a tap on
//! its bridge: the qemu and kvm drivers make taps, the test driver does
//! not, so test Domains have no interfaces); the rest are created and
//! deleted at random (no guest uses these: a Network in use waits for
//! its Domains before it goes). At the end, in each node's namespace: the bridges are exactly
//! the active Networks', the taps exactly the running guests' interfaces
//! (by name), the nftables tables exactly the active Networks', one
//! dnsmasq per active Network, in that namespace (checked by the inode of
//! /proc/PID/ns/net against /run/netns/NAME), and none other anywhere;
//! lease files only for Networks that exist; the agents' network records
//! the Networks of the API. Without those, the agents share this machine's
//! namespace with the test network backend and the run has no Networks
//! (said in the report's notes; with `CI` set that fails instead).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vireo_crds::{Domain, DomainState, Network, RunStrategy, StoragePool, StorageVol};

use crate::common::{Cluster, Netns, Proc, fleet};

// Links, taps and processes read from a node's namespace.
use crate::common::node;

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Domain names `chaos-000`.. that the workers create and delete.
    pub domains: usize,
    /// How long operations and faults go on.
    pub seconds: u64,
    pub seed: u64,
    /// How long to wait for convergence after the last fault.
    pub converge_seconds: u64,
    /// Real guests (`guest-00`..): qemu with the busybox guest image and
    /// kvm (vireo-vmm) with the test guest, alternating, where the host
    /// has them; created, halted, started and deleted at random too.
    pub guests: usize,
    /// Networks `chaosnet-0`..: the first [`STABLE_NETWORKS`] carry the
    /// real guests' interfaces, the rest are created and deleted at random
    /// (only where the agents can run in namespaces of their own).
    pub networks: usize,
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub domains: usize,
    pub seconds: u64,
    /// Faults by kind ([`FAULT_KINDS`], every kind listed), and by target.
    pub faults: BTreeMap<String, u64>,
    pub fault_detail: BTreeMap<String, u64>,
    /// Processes that ended on their own and were started again.
    pub self_exits: BTreeMap<String, u64>,
    /// Operations by kind and outcome (`create ok`, `delete failed`).
    pub operations: BTreeMap<String, u64>,
    /// Seconds from the end of the last fault to convergence (None: never).
    pub convergence_seconds: Option<f64>,
    /// Domains at the end, and how many of them run.
    pub final_domains: usize,
    pub final_running: usize,
    /// Volume files in the chaos pool on all nodes at the end.
    pub volume_files: usize,
    pub observer_samples: u64,
    /// Real guests by type (`qemu`, `kvm`), and what was left out and why.
    pub guests: BTreeMap<String, usize>,
    /// At the end, over every node: bridges, taps, nftables tables,
    /// dnsmasq processes and lease files (empty without namespaces).
    pub network_objects: BTreeMap<String, usize>,
    pub notes: Vec<String>,
    pub violations: Vec<String>,
}

impl Report {
    pub fn print(&self) {
        println!(
            "chaos run: seed {} ({} Domain names, {} s of operations and faults)",
            self.seed, self.domains, self.seconds
        );
        for (ty, n) in &self.guests {
            println!(" real guests: {n} of type {ty}");
        }
        for n in &self.notes {
            println!(" note: {n}");
        }
        println!(
            " faults injected: {} in all",
            self.faults.values().sum::<u64>()
        );
        for (k, n) in &self.faults {
            println!("   {k:<44} {n:>6}");
        }
        println!(" faults by target:");
        for (k, n) in &self.fault_detail {
            println!("   {k:<44} {n:>6}");
        }
        println!(" processes that exited on their own and were restarted:");
        for (k, n) in &self.self_exits {
            println!("   {k:<44} {n:>6}");
        }
        println!(" operations:");
        for (k, n) in &self.operations {
            println!("   {k:<44} {n:>6}");
        }
        match self.convergence_seconds {
            Some(s) => println!(" convergence after the last fault              {s:>9.2}s"),
            None => println!(" convergence after the last fault              never"),
        }
        println!(
            " at the end: {} Domains, {} running, {} volume files; {} observer samples",
            self.final_domains, self.final_running, self.volume_files, self.observer_samples
        );
        if !self.network_objects.is_empty() {
            let parts: Vec<String> = self
                .network_objects
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            println!(" in the nodes' namespaces: {}", parts.join(", "));
        }
        println!(" violations: {}", self.violations.len());
        for v in &self.violations {
            println!("   - {v}");
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "benchmark": "chaos",
            "seed": self.seed,
            "domains": self.domains,
            "seconds": self.seconds,
            "faults": self.faults,
            "fault_detail": self.fault_detail,
            "self_exits": self.self_exits,
            "operations": self.operations,
            "convergence_seconds": self.convergence_seconds,
            "final_domains": self.final_domains,
            "final_running": self.final_running,
            "volume_files": self.volume_files,
            "observer_samples": self.observer_samples,
            "guests": self.guests,
            "network_objects": self.network_objects,
            "notes": self.notes,
            "violations": self.violations,
        })
    }
}

/// splitmix64: small, seedable, good enough to pick faults and operations.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo).max(1)))
    }
}

/// A seed from the clock, for runs not given one.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

fn bump(c: &Counts, key: &str) {
    *c.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.to_string())
        .or_default() += 1;
}

/// etcd or kube-apiserver as e2e/cluster.sh started it: SIGKILLed and run
/// again with the same command line (same data directory, same ports),
/// its PID written back into DIR/env so that `cluster.sh stop` stops it.
struct ClusterProc {
    name: &'static str,
    env_key: &'static str,
    argv: Vec<String>,
    log: PathBuf,
    env_file: PathBuf,
    pid: u32,
    child: Option<Child>,
}

fn read_cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Alive and not a zombie.
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

impl ClusterProc {
    fn new(cluster: &Cluster, name: &'static str, env_key: &'static str) -> ClusterProc {
        let pid: u32 = cluster
            .env
            .get(env_key)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{env_key} in the cluster env"));
        let argv = read_cmdline(pid);
        assert!(!argv.is_empty(), "the command line of {name} (pid {pid})");
        ClusterProc {
            name,
            env_key,
            argv,
            log: cluster.dir.join(format!("{name}.log")),
            env_file: cluster.dir.join("env"),
            pid,
            child: None,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if pid_alive(self.pid) {
            // SAFETY: kill(2) with a PID we read from cluster.sh's env and
            // checked alive; no memory is involved.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_alive(self.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => pid_alive(self.pid),
        }
    }

    fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} again: {e}", self.name));
        self.pid = child.id();
        self.child = Some(child);
        let text = std::fs::read_to_string(&self.env_file).unwrap_or_default();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{}=", self.env_key)) {
                    format!("{}={}\n", self.env_key, self.pid)
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let _ = std::fs::write(&self.env_file, text);
    }
}

impl Drop for ClusterProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The processes the fault thread owns.
struct Fleet {
    agents: Vec<Proc>,
    operators: Vec<Proc>,
    etcd: ClusterProc,
    apiserver: ClusterProc,
}

impl Fleet {
    fn pids(&self) -> BTreeSet<u32> {
        let mut out: BTreeSet<u32> = self
            .agents
            .iter()
            .chain(&self.operators)
            .filter_map(Proc::pid)
            .collect();
        out.insert(self.etcd.pid);
        out.insert(self.apiserver.pid);
        out
    }

    /// Starts again whatever ended on its own.
    fn supervise(&mut self, self_exits: &Counts) {
        for p in self.agents.iter_mut().chain(self.operators.iter_mut()) {
            if p.exited() {
                bump(self_exits, &p.name);
                p.start();
            }
        }
        for c in [&mut self.etcd, &mut self.apiserver] {
            if !c.alive() {
                bump(self_exits, c.name);
                c.start();
            }
        }
    }

    /// The operator replica that leads: the one whose /readyz says 200.
    fn leader(&self) -> Option<usize> {
        self.operators
            .iter()
            .position(|p| p.http_get("/readyz").map(|r| r.0) == Some(200))
    }
}

/// Sleeps `d` in small steps, starting again what exits on its own.
fn supervised_sleep(fleet: &mut Fleet, d: Duration, self_exits: &Counts) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        fleet.supervise(self_exits);
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now().min(end)));
    }
}

/// The kinds of fault, as the report counts them.
pub const FAULT_KINDS: [&str; 4] = ["agent", "operator leader", "etcd", "kube-apiserver"];

/// The fault loop: until `until`, every 2–7 s SIGKILL one of agent,
/// operator leader, etcd, kube-apiserver, and start it again 0.3–3 s
/// later. The first four faults are the four kinds in a shuffled order,
/// so that a run long enough for four faults injects every kind; the
/// rest are drawn at random. `faults` counts by kind, `detail` by target.
/// Returns the fleet and when the last restart was done.
fn fault_loop(
    mut fleet: Fleet,
    mut rng: Rng,
    until: Instant,
    faults: Counts,
    detail: Counts,
    self_exits: Counts,
) -> (Fleet, Instant) {
    let mut last = Instant::now();
    // Fisher–Yates over the kinds for the first round.
    let mut round: Vec<usize> = (0..FAULT_KINDS.len()).collect();
    for i in (1..round.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        round.swap(i, j);
    }
    round.reverse();
    loop {
        let pause = rng.millis(2000, 7000);
        supervised_sleep(&mut fleet, pause, &self_exits);
        if Instant::now() >= until {
            break;
        }
        let down = rng.millis(300, 3000);
        let kind = round
            .pop()
            .unwrap_or_else(|| rng.below(FAULT_KINDS.len() as u64) as usize);
        bump(&faults, FAULT_KINDS[kind]);
        match kind {
            0 => {
                let i = rng.below(fleet.agents.len() as u64) as usize;
                bump(&detail, &format!("SIGKILL agent {}", fleet.agents[i].name));
                fleet.agents[i].kill();
                supervised_sleep(&mut fleet, Duration::ZERO, &self_exits);
                std::thread::sleep(down);
                fleet.agents[i].start();
            }
            1 => {
                let (i, what) = match fleet.leader() {
                    Some(i) => (i, "SIGKILL operator leader"),
                    // Between leaders (e.g. after the API server came back):
                    // a random replica.
                    None => (
                        rng.below(fleet.operators.len() as u64) as usize,
                        "SIGKILL operator (no leader)",
                    ),
                };
                bump(&detail, what);
                fleet.operators[i].kill();
                std::thread::sleep(down);
                fleet.operators[i].start();
            }
            2 => {
                bump(&detail, "SIGKILL etcd");
                fleet.etcd.kill();
                std::thread::sleep(down);
                fleet.etcd.start();
            }
            _ => {
                bump(&detail, "SIGKILL kube-apiserver");
                fleet.apiserver.kill();
                std::thread::sleep(down);
                fleet.apiserver.start();
            }
        }
        last = Instant::now();
    }
    // Everything up once more before convergence is timed.
    fleet.supervise(&self_exits);
    (fleet, last)
}

/// What a worker knows of a Domain name: absent, or its memory and whether
/// it is halted; `None` after an operation whose outcome is unknown.
type Known = Option<Option<(String, bool)>>;

const MEMORY: [&str; 3] = ["128Mi", "256Mi", "384Mi"];

/// A Domain name the workers use: a test Domain, or a real guest of `ty`
/// booting `os` (its memory stays 256Mi; its runStrategy changes).
#[derive(Clone)]
pub struct Slot {
    pub name: String,
    pub guest: Option<(String, serde_json::Value)>,
    /// A test Domain with a disk: the StorageVol of this name in the
    /// pool [`POOL`], created before the Domain and deleted after it.
    pub volume: Option<String>,
    /// A real guest's interface: the Network it is on.
    pub network: Option<String>,
}

/// The dir StoragePool of the Domains with a disk, on every node (under
/// each agent's own `--host-root`).
pub const POOL: &str = "chaos";
const POOL_PATH: &str = "/var/lib/vireo/chaos";

fn disk_domain(name: &str, memory: &str, volume: &str) -> Domain {
    let mut d = fleet::test_domain(name, memory);
    d.spec.devices.disks = vec![vireo_crds::domain::Disk {
        name: "vda".into(),
        volume: volume.into(),
        ..Default::default()
    }];
    d
}

fn chaos_volume(name: &str) -> Option<StorageVol> {
    serde_json::from_value(json!({
        "apiVersion": "vireo.dev/v1alpha1",
        "kind": "StorageVol",
        "metadata": {"name": name},
        "spec": {"pool": POOL, "capacity": "1Mi"},
    }))
    .ok()
}

fn guest_domain(
    name: &str,
    ty: &str,
    os: &serde_json::Value,
    halted: bool,
    network: Option<&str>,
) -> Option<Domain> {
    let interfaces: Vec<serde_json::Value> = network
        .map(|n| json!({"name": "net0", "network": n}))
        .into_iter()
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "vireo.dev/v1alpha1",
        "kind": "Domain",
        "metadata": {"name": name},
        "spec": {
            "type": ty,
            "memory": "256Mi",
            "vcpus": 1,
            "runStrategy": if halted { "Halted" } else { "Always" },
            "os": os,
            "devices": {"interfaces": interfaces},
        },
    }))
    .ok()
}

/// How an operation ended when it did not succeed.
enum Failed {
    /// The API server answered no (409, 404, 422): nothing was written.
    Refused,
    /// No answer, or an error from a server that may have written it.
    Unknown,
}

/// Runs one API call with a bound (a request caught by an etcd kill may
/// wait for the API server's own timeout otherwise).
async fn call<T>(f: impl std::future::Future<Output = kube::Result<T>>) -> Result<(), Failed> {
    match tokio::time::timeout(Duration::from_secs(15), f).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(s))) if s.code == 409 || s.code == 422 || s.code == 404 => {
            Err(Failed::Refused)
        }
        _ => Err(Failed::Unknown),
    }
}

/// A worker: operations at random on the names `i` with `i % workers ==
/// w`, until `until`. Returns what it knows of each name.
async fn worker(
    api: Api<Domain>,
    vols: Api<StorageVol>,
    slots: Vec<Slot>,
    mut rng: Rng,
    until: Instant,
    ops: Counts,
) -> Vec<(String, Known)> {
    let mut known: Vec<Known> = vec![Some(None); slots.len()];
    while Instant::now() < until {
        tokio::time::sleep(rng.millis(20, 250)).await;
        let i = rng.below(slots.len() as u64) as usize;
        let name = &slots[i].name;
        let guest = slots[i].guest.as_ref();
        let volume = slots[i].volume.as_deref();
        let network = slots[i].network.as_deref();
        let state = match known[i].clone() {
            Some(s) => s,
            None => match tokio::time::timeout(Duration::from_secs(15), api.get_opt(name)).await {
                Ok(Ok(d)) => {
                    let s = d
                        .filter(|d| d.metadata.deletion_timestamp.is_none())
                        .map(|d| {
                            (
                                d.spec.memory.0.clone(),
                                d.spec.run_strategy == RunStrategy::Halted,
                            )
                        });
                    known[i] = Some(s.clone());
                    s
                }
                _ => continue,
            },
        };
        let (kind, result, next) = match state {
            None => {
                let halted = rng.below(4) == 0;
                let (d, memory, kind) = match (guest, volume) {
                    (None, None) => {
                        let memory = MEMORY[rng.below(3) as usize];
                        let mut d = fleet::test_domain(name, memory);
                        if halted {
                            d.spec.run_strategy = RunStrategy::Halted;
                        }
                        (Some(d), memory, "create")
                    }
                    (None, Some(vol)) => {
                        // The volume first: kept from an earlier life of
                        // the name, or created (not while it is deleting:
                        // a Domain on a volume that is going would wait).
                        let have =
                            tokio::time::timeout(Duration::from_secs(15), vols.get_opt(vol)).await;
                        match have {
                            Ok(Ok(Some(v))) if v.metadata.deletion_timestamp.is_some() => {
                                bump(&ops, "create with volume: volume still deleting");
                                continue;
                            }
                            Ok(Ok(Some(_))) => {}
                            Ok(Ok(None)) => {
                                let Some(v) = chaos_volume(vol) else {
                                    bump(&ops, "create volume: no manifest");
                                    continue;
                                };
                                match call(vols.create(&PostParams::default(), &v)).await {
                                    Ok(()) => bump(&ops, "create volume ok"),
                                    Err(Failed::Refused) => {
                                        bump(&ops, "create volume refused");
                                        continue;
                                    }
                                    Err(Failed::Unknown) => {
                                        bump(&ops, "create volume failed (API down)");
                                        continue;
                                    }
                                }
                            }
                            _ => {
                                bump(&ops, "create volume failed (API down)");
                                continue;
                            }
                        }
                        let memory = MEMORY[rng.below(3) as usize];
                        let mut d = disk_domain(name, memory, vol);
                        if halted {
                            d.spec.run_strategy = RunStrategy::Halted;
                        }
                        (Some(d), memory, "create with volume")
                    }
                    (Some((ty, os)), _) => (
                        guest_domain(name, ty, os, halted, network),
                        "256Mi",
                        "create real guest",
                    ),
                };
                let Some(d) = d else {
                    bump(&ops, &format!("{kind}: no manifest"));
                    continue;
                };
                let r = call(api.create(&PostParams::default(), &d)).await;
                (kind, r, Some((memory.to_string(), halted)))
            }
            // Real guests keep their memory: delete or start/halt.
            Some((memory, halted)) if guest.is_some() => match rng.below(10) {
                0..=2 => {
                    let r = call(api.delete(name, &DeleteParams::default())).await;
                    ("delete real guest", r, None)
                }
                _ => {
                    let s = if halted { "Always" } else { "Halted" };
                    let r = call(api.patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"runStrategy": s}})),
                    ))
                    .await;
                    ("change real guest runStrategy", r, Some((memory, !halted)))
                }
            },
            Some((memory, halted)) => match rng.below(10) {
                0..=2 => {
                    let r = call(api.delete(name, &DeleteParams::default())).await;
                    match volume {
                        None => ("delete", r, None),
                        Some(vol) => {
                            // The volume goes after its Domain (its
                            // in-use finalizer holds it until then).
                            if r.is_ok() {
                                let v = call(vols.delete(vol, &DeleteParams::default())).await;
                                bump(
                                    &ops,
                                    match v {
                                        Ok(()) => "delete volume ok",
                                        Err(Failed::Refused) => "delete volume refused",
                                        Err(Failed::Unknown) => "delete volume failed (API down)",
                                    },
                                );
                            }
                            ("delete with volume", r, None)
                        }
                    }
                }
                3..=6 => {
                    let m = MEMORY[rng.below(3) as usize];
                    let r = call(api.patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"memory": m}})),
                    ))
                    .await;
                    ("change memory", r, Some((m.to_string(), halted)))
                }
                _ => {
                    let s = if halted { "Always" } else { "Halted" };
                    let r = call(api.patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"runStrategy": s}})),
                    ))
                    .await;
                    ("change runStrategy", r, Some((memory, !halted)))
                }
            },
        };
        match result {
            Ok(()) => {
                bump(&ops, &format!("{kind} ok"));
                known[i] = Some(next);
            }
            Err(Failed::Refused) => {
                // Refused (still being deleted, gone): learn it again.
                bump(&ops, &format!("{kind} refused"));
                known[i] = None;
            }
            Err(Failed::Unknown) => {
                bump(&ops, &format!("{kind} failed (API down)"));
                known[i] = None;
            }
        }
    }
    slots.into_iter().map(|s| s.name).zip(known).collect()
}

/// One test-driver record on a node.
#[derive(Clone, Debug)]
struct Record {
    node: String,
    name: String,
    uuid: String,
    state: serde_json::Value,
    id: Option<u64>,
    /// The VM process of a running real guest.
    pid: Option<u32>,
}

impl Record {
    fn active(&self) -> bool {
        !matches!(self.state.as_str(), Some("shutoff" | "nostate" | "pending"))
    }
}

/// The test driver's records of every node.
fn node_records(dir: &Path, nodes: &[String]) -> Vec<Record> {
    let mut out = Vec::new();
    for node in nodes {
        let d = dir.join(format!("state-{node}/test-node/domains"));
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let Some(v) = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            else {
                continue;
            };
            out.push(Record {
                node: node.clone(),
                name: v["def"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                uuid: v["uuid"].as_str().unwrap_or_default().to_ascii_lowercase(),
                state: v["state"].clone(),
                id: v["id"].as_u64(),
                pid: None,
            });
        }
        // The qemu and kvm drivers' records: running while `run` is there.
        for ty in ["qemu", "kvm"] {
            let d = dir.join(format!("state-{node}/{ty}/domains"));
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().and_then(|x| x.to_str()) != Some("json") {
                    continue;
                }
                let Some(v) = std::fs::read(&p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                else {
                    continue;
                };
                let run = &v["run"];
                out.push(Record {
                    node: node.clone(),
                    name: v["name"].as_str().unwrap_or_default().to_string(),
                    uuid: v["uuid"].as_str().unwrap_or_default().to_ascii_lowercase(),
                    state: json!(if run.is_object() {
                        "running"
                    } else {
                        "shutoff"
                    }),
                    id: run["id"].as_u64(),
                    pid: run["pid"].as_u64().map(|p| p as u32),
                });
            }
        }
    }
    out
}

fn bound_node(d: &Domain) -> Option<String> {
    d.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(vireo_crds::labels::NODE))
        .cloned()
}

/// spec.uuid as the nodes keep it (lower case).
fn lower_uuid(d: &Domain) -> Option<String> {
    d.spec.uuid.as_deref().map(str::to_ascii_lowercase)
}

fn state_json(s: Option<DomainState>) -> serde_json::Value {
    s.and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The observer: samples the API and the nodes' records until `stop`.
async fn observer(
    api: Api<Domain>,
    dir: PathBuf,
    nodes: Vec<String>,
    ns_inodes: BTreeMap<u64, String>,
    stop: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
) -> u64 {
    let mut bound: HashMap<String, String> = HashMap::new();
    let mut samples = 0;
    let mut said: BTreeSet<String> = BTreeSet::new();
    let mut say = |v: String, key: String| {
        if said.insert(key) {
            eprintln!("[chaos] VIOLATION: {v}");
            violations.lock().unwrap_or_else(|p| p.into_inner()).push(v);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        samples += 1;
        // Bindings by UUID (spec.uuid is set with the binding).
        if let Ok(list) = api.list(&ListParams::default()).await {
            for d in &list.items {
                let (Some(node), Some(uuid)) = (bound_node(d), lower_uuid(d)) else {
                    continue;
                };
                let name = d.metadata.name.clone().unwrap_or_default();
                let reported = d.status.as_ref().and_then(|s| s.node_name.clone());
                if let Some(r) = reported
                    && r != node
                {
                    say(
                        format!("Domain {name} (uuid {uuid}) bound to {node}, status.nodeName {r}"),
                        format!("status node {uuid} {r}"),
                    );
                }
                match bound.get(&uuid) {
                    Some(n) if *n != node => say(
                        format!("Domain {name} (uuid {uuid}) rebound from {n} to {node}"),
                        format!("rebound {uuid}"),
                    ),
                    Some(_) => {}
                    None => {
                        bound.insert(uuid, node);
                    }
                }
            }
        }
        // Every dnsmasq of the run in its own node's namespace.
        if !ns_inodes.is_empty() {
            for (pid, node, net, ino) in run_dnsmasqs(&dir) {
                let inside = ino.and_then(|i| ns_inodes.get(&i));
                if inside != Some(&node) {
                    say(
                        format!(
                            "dnsmasq pid {pid} of node {node}'s Network {net} runs in the namespace of {}",
                            inside.map_or("no node", String::as_str)
                        ),
                        format!("dnsmasq ns {pid}"),
                    );
                }
            }
        }
        let records = node_records(&dir, &nodes);
        let mut active: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
        for r in records.iter().filter(|r| r.active()) {
            active.entry(&r.uuid).or_default().push(r);
        }
        for (uuid, rs) in &active {
            if rs.len() > 1 {
                let on: Vec<String> = rs
                    .iter()
                    .map(|r| format!("{} ({})", r.node, r.state))
                    .collect();
                say(
                    format!(
                        "Domain {} (uuid {uuid}) active on {} hosts at once: {}",
                        rs[0].name,
                        rs.len(),
                        on.join(", ")
                    ),
                    format!("two hosts {uuid}"),
                );
            }
            for r in rs {
                if let Some(n) = bound.get(*uuid)
                    && *n != r.node
                {
                    say(
                        format!(
                            "Domain {} (uuid {uuid}) bound to {n} but active on {}",
                            r.name, r.node
                        ),
                        format!("elsewhere {uuid} {}", r.node),
                    );
                }
            }
        }
    }
    samples
}

/// Why the cluster has not converged yet (empty: converged), and the
/// Domains and running count when it has.
async fn convergence_gaps(
    api: &Api<Domain>,
    vols: &Api<StorageVol>,
    dir: &Path,
    nodes: &[String],
) -> (Vec<String>, usize, usize) {
    let list = match api.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => return (vec![format!("cannot list Domains: {e}")], 0, 0),
    };
    let vol_list = match vols.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => return (vec![format!("cannot list StorageVols: {e}")], 0, 0),
    };
    let mut gaps = Vec::new();
    // Volumes: deleted ones gone; bound ones Ready on their node with
    // their file there; in use ones holding the in-use finalizer.
    let used: BTreeSet<&str> = list
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .flat_map(|d| d.spec.devices.disks.iter().map(|k| k.volume.as_str()))
        .collect();
    for v in &vol_list {
        let name = v.metadata.name.clone().unwrap_or_default();
        if v.metadata.deletion_timestamp.is_some() {
            gaps.push(format!(
                "volume {name} still deleting (finalizers {:?})",
                v.metadata.finalizers
            ));
            continue;
        }
        let has = |f: &str| {
            v.metadata
                .finalizers
                .as_ref()
                .is_some_and(|fs| fs.iter().any(|x| x == f))
        };
        if used.contains(name.as_str()) && !has(vireo_crds::labels::IN_USE_FINALIZER) {
            gaps.push(format!(
                "volume {name} is in use without its in-use finalizer"
            ));
        }
        let node = v
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(vireo_crds::labels::NODE));
        let phase = v.status.as_ref().and_then(|s| s.phase.as_deref());
        match node {
            Some(node) => {
                if phase != Some("Ready") {
                    gaps.push(format!("volume {name} on {node}: phase {phase:?}"));
                }
                if !volume_file(dir, node, &name).is_file() {
                    gaps.push(format!("volume {name} on {node}: no file"));
                }
            }
            None if used.contains(name.as_str()) => {
                gaps.push(format!("volume {name} in use but not bound"));
            }
            None => {}
        }
    }
    let records = node_records(dir, nodes);
    let mut running = 0;
    let mut uuids = BTreeSet::new();
    for d in &list {
        let name = d.metadata.name.clone().unwrap_or_default();
        if d.metadata.deletion_timestamp.is_some() {
            gaps.push(format!(
                "{name} still deleting (finalizers {:?})",
                d.metadata.finalizers
            ));
            continue;
        }
        let Some(node) = bound_node(d) else {
            gaps.push(format!("{name} not bound"));
            continue;
        };
        if !d.metadata.finalizers.as_ref().is_some_and(|f| {
            f.iter()
                .any(|x| x == vireo_crds::labels::NODE_CLEANUP_FINALIZER)
        }) {
            gaps.push(format!(
                "{name} bound to {node} without its node-cleanup finalizer"
            ));
        }
        let uuid = lower_uuid(d).unwrap_or_default();
        uuids.insert(uuid.clone());
        let st = d.status.clone().unwrap_or_default();
        let want = if d.spec.run_strategy == RunStrategy::Halted {
            DomainState::Shutoff
        } else {
            DomainState::Running
        };
        if st.state == Some(DomainState::Running) {
            running += 1;
        }
        if st.node_name.as_deref() != Some(node.as_str()) {
            gaps.push(format!(
                "{name}: status.nodeName {:?}, bound to {node}",
                st.node_name
            ));
        }
        if st.observed_generation != d.metadata.generation {
            gaps.push(format!(
                "{name}: observedGeneration {:?} of {:?}",
                st.observed_generation, d.metadata.generation
            ));
        }
        if st.state != Some(want) {
            gaps.push(format!(
                "{name}: status {:?}, runStrategy {:?} wants {want:?}",
                st.state, d.spec.run_strategy
            ));
        }
        let mine: Vec<&Record> = records.iter().filter(|r| r.uuid == uuid).collect();
        match mine.as_slice() {
            [r] if r.node == node => {
                if r.state != state_json(st.state) {
                    gaps.push(format!(
                        "{name}: node {node} has it {}, status says {:?}",
                        r.state, st.state
                    ));
                }
                if want == DomainState::Running && r.id.map(|i| i as u32) != st.id {
                    gaps.push(format!(
                        "{name}: node {node} runs it as ID {:?}, status says {:?}",
                        r.id, st.id
                    ));
                }
            }
            rs => gaps.push(format!(
                "{name}: records on {:?}, bound to {node}",
                rs.iter().map(|r| &r.node).collect::<Vec<_>>()
            )),
        }
    }
    for r in records.iter().filter(|r| !uuids.contains(&r.uuid)) {
        gaps.push(format!(
            "node {} keeps a record of {} ({}), whose Domain is gone",
            r.node, r.name, r.state
        ));
    }
    (gaps, list.len(), running)
}

/// Where a volume of the chaos pool is on `node` (`namespace.name`).
fn volume_file(dir: &Path, node: &str, vol: &str) -> PathBuf {
    dir.join(format!("host-{node}"))
        .join(POOL_PATH.trim_start_matches('/'))
        .join(format!("default.{vol}"))
}

/// The files in the chaos pool's directory of every node: (node, file name).
fn pool_files(dir: &Path, nodes: &[String]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for node in nodes {
        let d = dir
            .join(format!("host-{node}"))
            .join(POOL_PATH.trim_start_matches('/'));
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            out.insert((node.clone(), e.file_name().to_string_lossy().into_owned()));
        }
    }
    out
}

/// A VM process (QEMU or vireo-vmm) by its executable's name.
fn is_vm_process(argv: &[String]) -> bool {
    argv.first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|f| f.to_str())
        .is_some_and(|f| f.starts_with("qemu-system") || f == "vireo-vmm")
}

fn parent(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// `pid` or one of its ancestors is in `ours`.
fn descends(pid: u32, ours: &BTreeSet<u32>) -> bool {
    let mut p = pid;
    for _ in 0..16 {
        if ours.contains(&p) {
            return true;
        }
        match parent(p) {
            Some(q) if q > 1 => p = q,
            _ => return false,
        }
    }
    false
}

/// Processes whose command line names the run's directory, besides `ours`
/// and their children; VM processes besides `vms` (the running guests'),
/// wherever they descend from.
fn stray_processes(dir: &Path, ours: &BTreeSet<u32>, vms: &BTreeSet<u32>) -> Vec<String> {
    let marker = dir.display().to_string();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && pid_alive(*pid))
        .filter_map(|pid| {
            let argv = read_cmdline(pid);
            let c = argv.join(" ");
            if !c.contains(&marker) {
                return None;
            }
            // A Network's dnsmasq daemonizes (its parent is init): the
            // network checks account for each one.
            if argv
                .first()
                .and_then(|a| Path::new(a).file_name())
                .is_some_and(|f| f == "dnsmasq")
            {
                return None;
            }
            if is_vm_process(&argv) {
                return (!vms.contains(&pid))
                    .then(|| format!("VM process of no running guest: pid {pid}: {c}"));
            }
            (!descends(pid, ours)).then(|| format!("pid {pid}: {c}"))
        })
        .collect()
}

/// The real guests' slots: qemu and kvm alternating, of the kinds this
/// host has (noted in the report when one is missing).
fn guest_slots(n: usize, stable_networks: usize, report: &mut Report) -> Vec<Slot> {
    if n == 0 {
        return Vec::new();
    }
    let mut kinds: Vec<(String, serde_json::Value)> = Vec::new();
    let qemu = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if qemu {
        let image = crate::common::script_output("scripts/guest-image.sh", None);
        kinds.push((
            "qemu".into(),
            json!({
                "kernel": image.join("vmlinuz").display().to_string(),
                "initrd": image.join("initrd.img").display().to_string(),
                // eth0 asks the Network's dnsmasq for an address (a lease).
                "cmdline": if stable_networks > 0 {
                    "console=ttyS0 quiet"
                } else {
                    "console=ttyS0 quiet vireo.net=0"
                },
            }),
        ));
    } else {
        report
            .notes
            .push("no qemu-system-x86_64: no qemu guests".into());
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let vmm = crate::common::vireo_bin("vireo-vmm");
    if kvm && vmm.is_file() {
        let out = std::env::temp_dir().join(format!("vireo-e2e-guest-{}", std::process::id()));
        let guest = crate::common::script_output("vmm/guest/build.sh", Some(&out));
        kinds.push((
            "kvm".into(),
            json!({"kernel": guest.display().to_string(), "cmdline": "console=ttyS0"}),
        ));
    } else {
        report.notes.push(format!(
            "no kvm guests: /dev/kvm opens: {kvm}, {} exists: {}",
            vmm.display(),
            vmm.is_file()
        ));
    }
    if kinds.is_empty() {
        return Vec::new();
    }
    (0..n)
        .map(|i| {
            let (ty, os) = kinds[i % kinds.len()].clone();
            *report.guests.entry(ty.clone()).or_default() += 1;
            Slot {
                name: format!("guest-{i:02}"),
                guest: Some((ty, os)),
                volume: None,
                network: (stable_networks > 0).then(|| network_name(i % stable_networks)),
            }
        })
        .collect()
}

/// How many of the run's Networks stay for the whole run (the real
/// guests' interfaces are on them); the others come and go.
pub const STABLE_NETWORKS: usize = 2;

/// The name of the run's Network `i`.
pub fn network_name(i: usize) -> String {
    format!("chaosnet-{i}")
}

/// Network `i`: nat, isolated and route in turn, bridge `vchaos{i}`,
/// 10.89.i.0/24 with DHCP.
fn network_manifest(i: usize) -> Option<Network> {
    let mode = ["nat", "isolated", "route"][i % 3];
    serde_json::from_value(json!({
        "apiVersion": "vireo.dev/v1alpha1",
        "kind": "Network",
        "metadata": {"name": network_name(i)},
        "spec": {
            "forwardMode": mode,
            "bridge": format!("vchaos{i}"),
            "ip": {
                "address": format!("10.89.{i}.1"),
                "prefix": 24,
                "dhcp": {"ranges": [{"start": format!("10.89.{i}.10"), "end": format!("10.89.{i}.200")}]},
            },
        },
    }))
    .ok()
}

/// Whether the agents can run in namespaces of their own with the real
/// network backend here; why not otherwise.
fn namespaces_possible() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (network namespaces, bridges, nftables)".into());
    }
    for p in ["ip", "nft", "dnsmasq"] {
        if !node::on_path(p) {
            return Err(format!("{p} not found"));
        }
    }
    Ok(())
}

/// A node's network namespace, by node.
pub struct NodeNs {
    pub node: String,
    pub netns: Netns,
}

/// The inode of a network namespace file (/run/netns/NAME, or
/// /proc/PID/ns/net): the same inode is the same namespace.
fn ns_inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// A network record of an agent's bridge driver (STATE/network/networks).
#[derive(Debug, Default)]
struct NetRecord {
    active: bool,
    bridge: Option<String>,
    table: Option<String>,
    dnsmasq: bool,
}

fn net_records(dir: &Path, node: &str) -> BTreeMap<String, NetRecord> {
    let mut out = BTreeMap::new();
    let d = dir.join(format!("state-{node}/network/networks"));
    let Ok(entries) = std::fs::read_dir(&d) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Some(v) = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            continue;
        };
        let name = v["name"].as_str().unwrap_or_default().to_string();
        out.insert(
            name,
            NetRecord {
                active: v["active"] == true,
                bridge: v["live"]["bridge"].as_str().map(str::to_string),
                table: v["live"]["table"].as_str().map(str::to_string),
                dnsmasq: v["live"]["dnsmasq"] == true,
            },
        );
    }
    out
}

/// Every dnsmasq of the run on this machine: (pid, node, network, the
/// inode of its network namespace), from its `--conf-file` path
/// (DIR/state-NODE/network/run/NETWORK/dnsmasq.conf).
fn run_dnsmasqs(dir: &Path) -> Vec<(u32, String, String, Option<u64>)> {
    let prefix = format!("--conf-file={}/state-", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pid_alive(*pid))
        .filter_map(|pid| {
            let argv = read_cmdline(pid);
            let prog = Path::new(argv.first()?).file_name()?.to_str()?.to_string();
            if prog != "dnsmasq" {
                return None;
            }
            let rest = argv.iter().find_map(|a| a.strip_prefix(&prefix))?;
            // NODE/network/run/NETWORK/dnsmasq.conf
            let parts: Vec<&str> = rest.split('/').collect();
            let (node, net) = match parts.as_slice() {
                [node, "network", "run", net, _] => (node.to_string(), net.to_string()),
                _ => (rest.to_string(), String::new()),
            };
            Some((pid, node, net, ns_inode(&format!("/proc/{pid}/ns/net"))))
        })
        .collect()
}

/// The nftables tables of Vireo (`vireo_*`) in a namespace.
fn nft_tables(netns: &str) -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list", "tables"])
        .output();
    let Ok(out) = out else {
        return BTreeSet::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|t| t.starts_with("vireo_"))
        .map(str::to_string)
        .collect()
}

/// The networks with a lease file on `node` (STATE/network/run/NAME/dnsmasq.leases).
fn lease_files(dir: &Path, node: &str) -> BTreeSet<String> {
    let d = dir.join(format!("state-{node}/network/run"));
    let Ok(entries) = std::fs::read_dir(&d) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join("dnsmasq.leases").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The Networks of the API that are not being deleted, by name, with
/// their bridge (every node is selected).
async fn api_networks(nets: &Api<Network>) -> Result<BTreeMap<String, Option<String>>, String> {
    let list = nets
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot list Networks: {e}"))?;
    Ok(list
        .items
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.spec.bridge.clone(),
            )
        })
        .collect())
}

/// Why the Networks have not converged yet (from the API): one being
/// deleted, or one not active on every node.
async fn network_gaps(nets: &Api<Network>, nodes: usize) -> Vec<String> {
    let list = match nets.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => return vec![format!("cannot list Networks: {e}")],
    };
    let mut gaps = Vec::new();
    for n in &list {
        let name = n.metadata.name.clone().unwrap_or_default();
        if n.metadata.deletion_timestamp.is_some() {
            gaps.push(format!(
                "Network {name} still deleting (finalizers {:?})",
                n.metadata.finalizers
            ));
            continue;
        }
        let active = n
            .status
            .as_ref()
            .map(|s| s.nodes.iter().filter(|e| e.active).count())
            .unwrap_or(0);
        if active != nodes {
            gaps.push(format!(
                "Network {name} active on {active} of {nodes} nodes"
            ));
        }
    }
    gaps
}

/// What is wrong with the networking of the nodes (empty: nothing), and
/// the counts of what is there. `running_guests` are (node, guest name,
/// UUID) of the running real guests, each with one interface.
fn network_findings(
    dir: &Path,
    nodes: &[NodeNs],
    api: &BTreeMap<String, Option<String>>,
    running_guests: &[(String, String, String)],
) -> (Vec<String>, BTreeMap<String, usize>) {
    use node::{links_of_kind, taps};
    let mut found = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let dnsmasqs = run_dnsmasqs(dir);
    let inodes: BTreeMap<u64, &str> = nodes
        .iter()
        .filter_map(|n| {
            Some((
                ns_inode(&format!("/run/netns/{}", n.netns.name))?,
                n.node.as_str(),
            ))
        })
        .collect();
    for (pid, node, net, ino) in &dnsmasqs {
        match ino.and_then(|i| inodes.get(&i)) {
            Some(in_ns) if *in_ns == node.as_str() => {}
            Some(in_ns) => found.push(format!(
                "dnsmasq pid {pid} of node {node}'s Network {net} runs in node {in_ns}'s namespace"
            )),
            None => found.push(format!(
                "dnsmasq pid {pid} of node {node}'s Network {net} runs outside every node's namespace"
            )),
        }
    }
    for n in nodes {
        let ns = n.netns.name.as_str();
        let node = n.node.as_str();
        let records = net_records(dir, node);
        // The agent's records are the API's Networks, all active.
        for (name, r) in &records {
            if !api.contains_key(name) {
                found.push(format!(
                    "node {node}: Network {name} is recorded (active: {}) but gone from the API",
                    r.active
                ));
            } else if !r.active {
                found.push(format!("node {node}: Network {name} is not active"));
            }
        }
        for name in api.keys().filter(|n| !records.contains_key(*n)) {
            found.push(format!("node {node}: Network {name} has no record"));
        }
        let active: BTreeMap<&String, &NetRecord> =
            records.iter().filter(|(_, r)| r.active).collect();
        // Bridges: exactly the active Networks'.
        let bridges = links_of_kind(ns, "bridge");
        *counts.entry("bridges".into()).or_default() += bridges.len();
        let want: BTreeSet<String> = api
            .iter()
            .filter_map(|(name, b)| {
                b.clone()
                    .or_else(|| active.get(name).and_then(|r| r.bridge.clone()))
            })
            .collect();
        for b in bridges.difference(&want) {
            found.push(format!(
                "node {node}: bridge {b} left, of no active Network"
            ));
        }
        for b in want.difference(&bridges) {
            found.push(format!(
                "node {node}: bridge {b} of an active Network is missing"
            ));
        }
        // Taps: exactly the running guests' interfaces.
        let have = taps(ns);
        *counts.entry("taps".into()).or_default() += have.len();
        let want: BTreeMap<String, &str> = running_guests
            .iter()
            .filter(|(on, _, _)| on == node)
            .map(|(_, name, uuid)| (vireo_drivers::bridge::tap::tap_name(uuid, 0), name.as_str()))
            .collect();
        for t in have.iter().filter(|t| !want.contains_key(*t)) {
            found.push(format!("node {node}: tap {t} left, of no running guest"));
        }
        for (t, g) in want.iter().filter(|(t, _)| !have.contains(*t)) {
            found.push(format!("node {node}: running guest {g} has no tap {t}"));
        }
        // nftables: exactly the active Networks' tables.
        let tables = nft_tables(ns);
        *counts.entry("nftables tables".into()).or_default() += tables.len();
        let want: BTreeSet<String> = active.values().filter_map(|r| r.table.clone()).collect();
        for t in tables.difference(&want) {
            found.push(format!(
                "node {node}: nftables table {t} left, of no active Network"
            ));
        }
        for t in want.difference(&tables) {
            found.push(format!(
                "node {node}: nftables table {t} of an active Network is missing"
            ));
        }
        // dnsmasq: one per active Network with DHCP, none other.
        let mut per: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (pid, _, net, _) in dnsmasqs.iter().filter(|d| d.1 == node) {
            per.entry(net.as_str()).or_default().push(*pid);
        }
        *counts.entry("dnsmasq processes".into()).or_default() +=
            per.values().map(Vec::len).sum::<usize>();
        for (net, pids) in &per {
            match active.get(&net.to_string()) {
                Some(r) if r.dnsmasq && pids.len() == 1 => {}
                Some(r) if r.dnsmasq => found.push(format!(
                    "node {node}: {} dnsmasq for Network {net}: pids {pids:?}",
                    pids.len()
                )),
                _ => found.push(format!(
                    "node {node}: dnsmasq {pids:?} left, of Network {net}, which is not active with DHCP here"
                )),
            }
        }
        for (name, _) in active
            .iter()
            .filter(|(n, r)| r.dnsmasq && !per.contains_key(n.as_str()))
        {
            found.push(format!("node {node}: Network {name} has no dnsmasq"));
        }
        // Lease files: only for Networks that exist.
        let leases = lease_files(dir, node);
        *counts.entry("lease files".into()).or_default() += leases.len();
        for l in leases
            .iter()
            .filter(|l| !api.contains_key(*l) || !records.contains_key(*l))
        {
            found.push(format!(
                "node {node}: lease file of Network {l} left, which is gone"
            ));
        }
    }
    (found, counts)
}

/// Creates and deletes the non-stable Networks at random until `until`.
/// Returns what it knows of each (exists or not; `None`: unknown).
async fn network_worker(
    nets: Api<Network>,
    churn: Vec<usize>,
    mut rng: Rng,
    until: Instant,
    ops: Counts,
) -> Vec<(String, Option<bool>)> {
    let mut known: Vec<Option<bool>> = vec![Some(false); churn.len()];
    while Instant::now() < until && !churn.is_empty() {
        tokio::time::sleep(rng.millis(1000, 4000)).await;
        let k = rng.below(churn.len() as u64) as usize;
        let name = network_name(churn[k]);
        let exists = match known[k] {
            Some(e) => e,
            None => {
                match tokio::time::timeout(Duration::from_secs(15), nets.get_opt(&name)).await {
                    Ok(Ok(Some(n))) if n.metadata.deletion_timestamp.is_some() => {
                        bump(&ops, "network still deleting");
                        continue;
                    }
                    Ok(Ok(n)) => {
                        known[k] = Some(n.is_some());
                        n.is_some()
                    }
                    _ => continue,
                }
            }
        };
        let (kind, r) = if exists {
            (
                "delete network",
                call(nets.delete(&name, &DeleteParams::default())).await,
            )
        } else {
            let Some(n) = network_manifest(churn[k]) else {
                bump(&ops, "create network: no manifest");
                continue;
            };
            (
                "create network",
                call(nets.create(&PostParams::default(), &n)).await,
            )
        };
        match r {
            Ok(()) => {
                bump(&ops, &format!("{kind} ok"));
                known[k] = Some(!exists);
            }
            Err(Failed::Refused) => {
                bump(&ops, &format!("{kind} refused"));
                known[k] = None;
            }
            Err(Failed::Unknown) => {
                bump(&ops, &format!("{kind} failed (API down)"));
                known[k] = None;
            }
        }
    }
    churn.into_iter().map(network_name).zip(known).collect()
}

/// Runs the chaos run on `cluster` (started with [`Cluster::start`], no
/// Vireo processes yet): starts three agents and two operator replicas,
/// and returns the report (violations included; the caller asserts).
pub async fn run(cluster: &mut Cluster, config: &Config) -> Report {
    let mut rng = Rng::new(config.seed);
    eprintln!("[chaos] seed {}", config.seed);
    let t0 = Instant::now();
    let big = ["--cpus", "512", "--memory", "4Ti"];
    let nodes: Vec<String> = (1..=3).map(|i| format!("node-{i}")).collect();
    // Each agent in a namespace of its own, with the real network backend.
    let mut ns_note = None;
    let spaces: Vec<NodeNs> = match namespaces_possible() {
        Ok(()) => nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeNs {
                node: n.clone(),
                netns: Netns::new(&format!("vch{}-{}", i + 1, std::process::id())),
            })
            .collect(),
        Err(why) => {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "chaos run: {why}, and CI is set: the agents cannot run in namespaces of their own"
                );
            }
            eprintln!("[chaos] NOTE: {why}: agents share this namespace, no Networks");
            ns_note = Some(format!(
                "{why}: the agents share this machine's network namespace with the test network backend; no Networks, no network checks"
            ));
            Vec::new()
        }
    };
    let agents: Vec<Proc> = if spaces.is_empty() {
        nodes.iter().map(|n| cluster.agent(n, &big)).collect()
    } else {
        spaces
            .iter()
            .map(|s| cluster.agent_in_netns(&s.node, &s.netns, &big))
            .collect()
    };
    let networks = if spaces.is_empty() {
        0
    } else {
        config.networks
    };
    let stable = networks.min(STABLE_NETWORKS);
    let lease = ["--leader-lease-seconds", "4"];
    let operators: Vec<Proc> = ["operator-a", "operator-b"]
        .iter()
        .map(|n| cluster.operator(n, &lease))
        .collect();
    let client = cluster.client().await;
    crate::common::ready_hosts(&client, 3).await;
    let api: Api<Domain> = Api::namespaced(client.clone(), "default");
    let vols: Api<StorageVol> = Api::namespaced(client.clone(), "default");
    let pools: Api<StoragePool> = Api::all(client.clone());
    let nets: Api<Network> = Api::all(client.clone());
    // The stable Networks, active on every node before anything else.
    for i in 0..stable {
        let n = network_manifest(i).expect("a Network manifest");
        nets.create(&PostParams::default(), &n)
            .await
            .expect("create a stable Network");
    }
    if stable > 0 {
        crate::common::wait_for(
            Duration::from_secs(120),
            "the stable Networks active on 3 nodes",
            || async { network_gaps(&nets, 3).await.is_empty().then_some(()) },
        )
        .await;
    }
    let pool: StoragePool = serde_json::from_value(json!({
        "apiVersion": "vireo.dev/v1alpha1",
        "kind": "StoragePool",
        "metadata": {"name": POOL},
        "spec": {"type": "dir", "path": POOL_PATH},
    }))
    .expect("the chaos pool's manifest");
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create the chaos pool");
    crate::common::wait_for(
        Duration::from_secs(120),
        "the chaos pool running on 3 nodes",
        || async {
            let p = pools.get(POOL).await.ok()?;
            (p.status
                .as_ref()?
                .nodes
                .iter()
                .filter(|e| e.state == "running")
                .count()
                == 3)
                .then_some(())
        },
    )
    .await;

    let fleet_procs = Fleet {
        agents,
        operators,
        etcd: ClusterProc::new(cluster, "etcd", "ETCD_PID"),
        apiserver: ClusterProc::new(cluster, "kube-apiserver", "APISERVER_PID"),
    };
    let faults: Counts = Arc::new(Mutex::new(
        FAULT_KINDS.iter().map(|k| (k.to_string(), 0)).collect(),
    ));
    let fault_detail: Counts = Arc::default();
    let self_exits: Counts = Arc::default();
    let ops: Counts = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let mut report = Report {
        seed: config.seed,
        domains: config.domains,
        seconds: config.seconds,
        ..Default::default()
    };
    report.notes.extend(ns_note);
    if networks > 0 {
        report.notes.push(format!(
            "agents in network namespaces {}; {networks} Networks ({stable} stable, carrying the real guests' interfaces)",
            spaces
                .iter()
                .map(|s| s.netns.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // The guests' images are built (or found in their caches) first.
    let all: Vec<Slot> = (0..config.domains)
        .map(|i| Slot {
            name: format!("chaos-{i:03}"),
            guest: None,
            // One test Domain in four has a disk.
            volume: (i % 4 == 0).then(|| format!("chaos-{i:03}-disk")),
            network: None,
        })
        .chain(guest_slots(config.guests, stable, &mut report))
        .collect();
    eprintln!(
        "[chaos] set up in {:.1}s (agents, pool, stable Networks, guest images); operations and faults begin",
        t0.elapsed().as_secs_f64()
    );
    let until = Instant::now() + Duration::from_secs(config.seconds);
    let observer_task = tokio::spawn(observer(
        api.clone(),
        cluster.dir.clone(),
        nodes.clone(),
        spaces
            .iter()
            .filter_map(|s| {
                Some((
                    ns_inode(&format!("/run/netns/{}", s.netns.name))?,
                    s.node.clone(),
                ))
            })
            .collect(),
        stop.clone(),
        violations.clone(),
    ));
    let fault_rng = Rng::new(rng.next());
    let fault_thread = {
        let (faults, detail, self_exits) =
            (faults.clone(), fault_detail.clone(), self_exits.clone());
        std::thread::spawn(move || {
            fault_loop(fleet_procs, fault_rng, until, faults, detail, self_exits)
        })
    };
    let workers = 4.min(all.len().max(1));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let slots: Vec<Slot> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % workers == w)
            .map(|(_, s)| s.clone())
            .collect();
        tasks.push(tokio::spawn(worker(
            api.clone(),
            vols.clone(),
            slots,
            Rng::new(rng.next()),
            until,
            ops.clone(),
        )));
    }
    let net_task = tokio::spawn(network_worker(
        nets.clone(),
        (stable..networks).collect(),
        Rng::new(rng.next()),
        until,
        ops.clone(),
    ));
    let mut known: Vec<(String, Known)> = Vec::new();
    for t in tasks {
        if let Ok(k) = t.await {
            known.extend(k);
        }
    }
    let net_known = net_task.await.unwrap_or_default();
    let (mut fleet_procs, last_fault) = tokio::task::spawn_blocking(move || {
        fault_thread
            .join()
            .unwrap_or_else(|_| panic!("the fault thread panicked"))
    })
    .await
    .expect("fault thread joined");
    eprintln!(
        "[chaos] faults stopped at {:.1}s; waiting for convergence",
        t0.elapsed().as_secs_f64()
    );

    // Convergence: the state the API asks for, on the nodes too. Processes
    // that exit now (an operator that lost its Lease late) start again.
    let deadline = Instant::now() + Duration::from_secs(config.converge_seconds);
    loop {
        fleet_procs.supervise(&self_exits);
        let (mut gaps, n, running) = convergence_gaps(&api, &vols, &cluster.dir, &nodes).await;
        if !spaces.is_empty() && gaps.is_empty() {
            gaps.extend(network_gaps(&nets, 3).await);
            if gaps.is_empty() {
                gaps.extend(
                    net_check(&nets, &cluster.dir, &nodes, &spaces, stable)
                        .await
                        .0,
                );
            }
        }
        if gaps.is_empty() {
            report.convergence_seconds = Some(last_fault.elapsed().as_secs_f64());
            report.final_domains = n;
            report.final_running = running;
            break;
        }
        if Instant::now() > deadline {
            let mut v = violations.lock().unwrap_or_else(|p| p.into_inner());
            v.push(format!(
                "no convergence {} s after the last fault; {} gaps, first: {}",
                config.converge_seconds,
                gaps.len(),
                gaps.iter().take(10).cloned().collect::<Vec<_>>().join("; ")
            ));
            report.final_domains = n;
            report.final_running = running;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "[chaos] convergence wait over at {:.1}s; final checks",
        t0.elapsed().as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
    report.observer_samples = observer_task.await.unwrap_or(0);

    let mut found = Vec::new();
    // Nothing acknowledged is lost.
    if let Ok(list) = api.list(&ListParams::default()).await {
        let now: HashMap<String, &Domain> = list
            .items
            .iter()
            .map(|d| (d.metadata.name.clone().unwrap_or_default(), d))
            .collect();
        for (name, k) in &known {
            let Some(want) = k else { continue };
            let have = now.get(name).map(|d| {
                (
                    d.spec.memory.0.clone(),
                    d.spec.run_strategy == RunStrategy::Halted,
                )
            });
            if have != *want {
                found.push(format!(
                    "{name}: the API holds {have:?}, the last acknowledged write was {want:?}"
                ));
            }
        }
    }
    // Networks: what was acknowledged is there, and the nodes' namespaces
    // hold exactly what the active Networks and running guests need.
    if !spaces.is_empty() {
        match api_networks(&nets).await {
            Ok(have) => {
                for (name, want) in &net_known {
                    if let Some(want) = want
                        && have.contains_key(name) != *want
                    {
                        found.push(format!(
                            "Network {name}: exists in the API: {}, the last acknowledged write: {}",
                            have.contains_key(name),
                            if *want { "create" } else { "delete" }
                        ));
                    }
                }
            }
            Err(e) => found.push(e),
        }
        let (f, counts) = net_check(&nets, &cluster.dir, &nodes, &spaces, stable).await;
        found.extend(f);
        report.network_objects = counts;
    }
    // IDs unique per node among running Domains.
    let records = node_records(&cluster.dir, &nodes);
    for node in &nodes {
        let mut ids: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for r in records.iter().filter(|r| r.node == *node && r.active()) {
            if let Some(id) = r.id {
                ids.entry(id).or_default().push(&r.name);
            }
        }
        for (id, names) in ids.iter().filter(|(_, n)| n.len() > 1) {
            found.push(format!("node {node}: ID {id} held by {names:?}"));
        }
    }
    // The volume files are the bound StorageVols, no more, no fewer (hidden
    // partial files included: none may be left).
    match vols.list(&ListParams::default()).await {
        Ok(list) => {
            let want: BTreeSet<(String, String)> = list
                .items
                .iter()
                .filter_map(|v| {
                    let node = v.metadata.labels.as_ref()?.get(vireo_crds::labels::NODE)?;
                    Some((
                        node.clone(),
                        format!("default.{}", v.metadata.name.as_deref()?),
                    ))
                })
                .collect();
            let have = pool_files(&cluster.dir, &nodes);
            report.volume_files = have.len();
            for (node, f) in have.difference(&want) {
                found.push(format!(
                    "node {node}: volume file {f} left, of no StorageVol"
                ));
            }
            for (node, f) in want.difference(&have) {
                found.push(format!(
                    "node {node}: volume file {f} lost, its StorageVol is bound there"
                ));
            }
        }
        Err(e) => found.push(format!("cannot list StorageVols at the end: {e}")),
    }
    // Every running real guest's process is there, once per UUID.
    let mut ours = fleet_procs.pids();
    let mut vms = BTreeSet::new();
    let mut vm_uuids: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.active()) {
        if let Some(pid) = r.pid {
            if !pid_alive(pid) {
                found.push(format!(
                    "node {}: {} recorded running as pid {pid}, which is gone",
                    r.node, r.name
                ));
            }
            ours.insert(pid);
            vms.insert(pid);
            vm_uuids.entry(&r.uuid).or_default().push(pid);
        }
    }
    for (uuid, pids) in vm_uuids.iter().filter(|(_, p)| p.len() > 1) {
        found.push(format!(
            "real guest {uuid} runs as {} processes: {pids:?}",
            pids.len()
        ));
    }
    // No process of the run besides ours (and their children).
    for p in stray_processes(&cluster.dir, &ours, &vms) {
        found.push(format!("stray process {p}"));
    }
    for v in &found {
        eprintln!("[chaos] VIOLATION: {v}");
    }
    let mut all = violations.lock().unwrap_or_else(|p| p.into_inner()).clone();
    all.extend(found);
    report.violations = all;
    report.faults = faults.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report.fault_detail = fault_detail
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    report.self_exits = self_exits.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report.operations = ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // A manifest of the run's own that does not parse is a bug of the run.
    for (k, n) in report
        .operations
        .iter()
        .filter(|(k, _)| k.contains("no manifest"))
    {
        report.violations.push(format!(
            "{n} operations found no manifest ({k}): the run's manifest does not parse"
        ));
    }
    // The Vireo processes stop here; etcd and kube-apiserver with the cluster.
    for p in fleet_procs.agents.iter().chain(&fleet_procs.operators) {
        if p.log_text().contains("panicked") {
            report
                .violations
                .push(format!("{} panicked (see {})", p.name, p.log.display()));
        }
    }
    drop(fleet_procs);
    // Whatever is left in the namespaces (guests, dnsmasq) goes with them.
    drop(spaces);
    // The test guest built for the kvm guests (see guest_slots).
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("vireo-e2e-guest-{}", std::process::id())),
    );
    eprintln!(
        "[chaos] final checks done, agents and namespaces gone at {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    report
}

/// [`network_findings`] on the API's Networks and the running real guests
/// of the node records (each with one interface when `stable` > 0).
async fn net_check(
    nets: &Api<Network>,
    dir: &Path,
    nodes: &[String],
    spaces: &[NodeNs],
    stable: usize,
) -> (Vec<String>, BTreeMap<String, usize>) {
    let api = match api_networks(nets).await {
        Ok(a) => a,
        Err(e) => return (vec![e], BTreeMap::new()),
    };
    let running: Vec<(String, String, String)> = if stable == 0 {
        Vec::new()
    } else {
        node_records(dir, nodes)
            .into_iter()
            .filter(|r| r.active() && r.pid.is_some())
            .map(|r| (r.node, r.name, r.uuid))
            .collect()
    };
    network_findings(dir, spaces, &api, &running)
}
