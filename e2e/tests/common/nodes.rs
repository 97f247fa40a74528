//! Real nodes for the e2e tests and benches: `e2e/nodes.sh` (kubelet and
//! containerd in a network and mount namespace per node, beside the API
//! server of `e2e/cluster.sh`), and a repository script's output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{Cluster, repo};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a repository script; returns the last line of its stdout.
pub fn script(args: &[&str]) -> String {
    let started = Instant::now();
    let mut cmd = Command::new(repo().join(args[0]));
    // scripts/image runs cargo.
    super::without_cargo_env(&mut cmd);
    let out = cmd
        .args(&args[1..])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("the script runs");
    assert!(out.status.success(), "{} failed", args.join(" "));
    eprintln!(
        "[cluster] {} took {:.1}s",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    text(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The two nodes of `e2e/nodes.sh`; stopped when dropped (before the
/// cluster, which is declared first).
pub struct Nodes {
    dir: PathBuf,
    env: HashMap<String, String>,
}

impl Nodes {
    pub fn start(cluster: &Cluster, n: usize) -> Nodes {
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(repo().join("e2e/nodes.sh"))
            .args(["start", &cluster.dir.display().to_string(), &n.to_string()])
            .env("VIREO_E2E_BIN", super::tools_bin())
            .status()
            .expect("e2e/nodes.sh runs");
        let nodes = Nodes {
            dir: cluster.dir.clone(),
            env: std::fs::read_to_string(cluster.dir.join("nodes.env"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
                .collect(),
        };
        assert!(status.success(), "e2e/nodes.sh start failed");
        eprintln!(
            "[cluster] {n} nodes Ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        nodes
    }

    pub fn var(&self, i: usize, what: &str) -> String {
        let key = format!("NODE_{i}_{what}");
        self.env
            .get(&key)
            .unwrap_or_else(|| panic!("{key} missing from nodes.env"))
            .clone()
    }

    pub fn name(&self, i: usize) -> String {
        self.var(i, "NAME")
    }

    /// The node's /var/lib/vireo, as the host sees it.
    pub fn vireo_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(self.var(i, "VIREO_DIR"))
    }

    pub fn index_of(&self, name: &str) -> usize {
        (1..=2)
            .find(|i| self.name(*i) == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// Runs a command inside node `i`'s namespaces; returns its stdout.
    pub fn exec(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(repo().join("e2e/nodes.sh"))
            .args([
                "exec",
                &self.dir.display().to_string(),
                &i.to_string(),
                "--",
            ])
            .args(args)
            .output()
            .expect("e2e/nodes.sh exec runs");
        assert!(
            out.status.success(),
            "{} on node {i}: {}",
            args.join(" "),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    pub fn import(&self, tar: &str) {
        let status = Command::new("bash")
            .arg(repo().join("e2e/nodes.sh"))
            .args(["import", &self.dir.display().to_string(), tar])
            .status()
            .expect("e2e/nodes.sh import runs");
        assert!(status.success(), "importing {tar} failed");
    }

    /// The network namespace of node `i` (its holder process's).
    pub fn netns(&self, i: usize) -> PathBuf {
        std::fs::read_link(format!("/proc/{}/ns/net", self.var(i, "PID")))
            .expect("the node's holder runs")
    }

    /// Processes in node `i`'s network namespace whose name starts with
    /// `comm`: (PID, start time), which names a process even across PID
    /// reuse.
    pub fn procs(&self, i: usize, comm: &str) -> Vec<(u32, u64)> {
        let ns = self.netns(i);
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let same_ns = std::fs::read_link(entry.path().join("ns/net")).is_ok_and(|l| l == ns);
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if same_ns
                && name.trim().starts_with(comm)
                && let Some(start) = start_time(pid)
            {
                out.push((pid, start));
            }
        }
        out.sort_unstable();
        out
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("e2e/nodes.sh"))
            .args(["stop", &self.dir.display().to_string()])
            .status();
    }
}

/// Field 22 of /proc/PID/stat: when the process started (clock ticks).
pub fn start_time(pid: u32) -> Option<u64> {
    super::node::stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

pub fn read_pid(path: &Path) -> Option<(u32, u64)> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Some((pid, start_time(pid)?))
}
