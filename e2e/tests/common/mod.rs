//! The e2e harness: a real etcd and kube-apiserver on loopback (started by
//! `e2e/cluster.sh` from the cached Go builds), Vireo's CRDs, and the
//! operator and agents as processes. Everything stops when dropped.

#![allow(dead_code)]

// Also used by agent/tests/examples.rs (through #[path]).
mod netns;
pub use netns::Netns;
pub mod fleet;
// Also used by agent/tests/restart.rs (through #[path]).
pub mod node;
pub mod nodes;
pub mod run;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo` for a build started from inside a test or bench, without the
/// variables cargo sets for the running test ([`without_cargo_env`]).
pub fn cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    without_cargo_env(&mut cmd);
    cmd
}

/// Leaves out of `cmd`'s environment the variables cargo sets for the
/// running test or bench (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), for a
/// command that builds with cargo (`cargo()`, `scripts/image`). ring's
/// build script asks to rerun when they change, so with them every such
/// build rebuilt ring, rustls and kube, and the next `cargo test` or `cargo
/// bench` rebuilt them back.
pub fn without_cargo_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                k.as_ref(),
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(&key);
        }
    }
}

/// CPU seconds (user + system, fields 14 and 15) a process has used so
/// far, 0 if unknown.
pub fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    node::stat_fields(pid)
        .and_then(|f| {
            let ut: f64 = f.get(14 - 3)?.parse().ok()?;
            let st: f64 = f.get(15 - 3)?.parse().ok()?;
            Some((ut + st) / hz)
        })
        .unwrap_or(0.0)
}

/// Every process on the host with the last path element of its command's
/// first word (`/usr/bin/kubelet` → `kubelet`); pods' processes included.
pub fn processes() -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(entry.path().join("cmdline")).ok()?;
            let first = cmd.split(|b| *b == 0).next()?;
            let base = first.rsplit(|b| *b == b'/').next()?;
            Some((pid, String::from_utf8_lossy(base).into_owned()))
        })
        .collect()
}

/// One sample line of Prometheus text: name, labels, value.
pub fn prom_sample(line: &str) -> Option<(&str, std::collections::BTreeMap<String, String>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((n, rest)) => (n, rest.trim_end_matches('}')),
        None => (head, ""),
    };
    let labels = labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    Some((name, labels, value))
}

/// A process's peak resident memory (VmHWM) in KiB, 0 if unknown.
pub fn vm_hwm_kib(pid: u32) -> u64 {
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

/// A Vireo binary from this workspace's target directory, built once per run
/// (or from `VIREO_E2E_VIREO_BIN`, a directory of binaries built before: the
/// scale bench compares two builds back to back that way).
pub fn vireo_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        if let Some(dir) = std::env::var_os("VIREO_E2E_VIREO_BIN") {
            return PathBuf::from(dir);
        }
        // Tests run from target/<profile>/deps/; the binaries sit one level up.
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        // Benchmarks run from target/release: measure release binaries there.
        let mut args = vec![
            "build",
            "--bin",
            "vireo-operator",
            "--bin",
            "vireo-agent",
            "--bin",
            "vireo",
        ];
        if dir.ends_with("release") {
            args.push("--release");
        }
        let status = cargo()
            .args(&args)
            .current_dir(repo())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build of the Vireo binaries failed");
        dir
    });
    dir.join(name)
}

/// Builds (or finds in the cache) kube-apiserver, etcd, kubectl and helm.
pub fn tools_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("e2e/build-tools.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("e2e/build-tools.sh runs");
        assert!(out.status.success(), "e2e/build-tools.sh failed");
        let text = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            text.lines()
                .last()
                .expect("build-tools.sh prints the bin dir")
                .trim(),
        )
    })
    .clone()
}

/// A running etcd + kube-apiserver with Vireo's CRDs installed.
pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub env: HashMap<String, String>,
    bin: PathBuf,
    procs: Vec<Proc>,
}

/// A child process whose output goes to a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    /// `host:port` of its /metrics, /healthz, /readyz.
    pub metrics: String,
    child: Option<Child>,
    command: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Proc {
    fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        log: PathBuf,
    ) -> Proc {
        let metrics = args
            .iter()
            .position(|a| a == "--metrics-addr")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_default();
        let mut p = Proc {
            name: name.into(),
            log,
            metrics,
            child: None,
            command: std::iter::once(program.display().to_string())
                .chain(args.iter().cloned())
                .collect(),
            envs: envs.to_vec(),
        };
        p.start();
        p
    }

    /// (Re)starts the process with the same command line, appending to its log.
    pub fn start(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .envs(self.envs.iter().cloned())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process was started and has ended on its own (reaped).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            _ => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// GET a path of its metrics endpoint (`/metrics`, `/readyz`): status and body.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&self.metrics).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.metrics
        )
        .ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Cluster {
    /// Starts etcd and kube-apiserver in a fresh directory, creates the
    /// `vireo-system` namespace and installs the CRDs from charts/vireo/crds.
    pub fn start(name: &str) -> Cluster {
        Self::start_with(name, &[])
    }

    /// [`Cluster::start`] with environment for `e2e/cluster.sh` (e.g.
    /// `VIREO_E2E_PROFILING=true` for the API server's /debug/pprof).
    pub fn start_with(name: &str, env_vars: &[(&str, &str)]) -> Cluster {
        let bin = tools_bin();
        let dir = std::env::temp_dir().join(format!("vireo-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(repo().join("e2e/cluster.sh"))
            .args(["start", &dir.display().to_string()])
            .env("VIREO_E2E_BIN", &bin)
            .envs(env_vars.iter().copied())
            .status()
            .expect("e2e/cluster.sh runs");
        assert!(
            status.success(),
            "e2e/cluster.sh start failed; logs in {}",
            dir.display()
        );
        let env = std::fs::read_to_string(dir.join("env"))
            .expect("cluster env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cluster = Cluster {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            env,
            bin,
            procs: Vec::new(),
        };
        cluster.kubectl_ok(&["create", "namespace", vireo_crds::labels::SYSTEM_NAMESPACE]);
        cluster.kubectl_ok(&[
            "apply",
            "--server-side",
            "-f",
            &repo().join("charts/vireo/crds").display().to_string(),
        ]);
        cluster.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ]);
        eprintln!(
            "[e2e] cluster {name} up in {:.1}s at {}",
            started.elapsed().as_secs_f64(),
            cluster.dir.display()
        );
        cluster
    }

    /// Runs kubectl against the cluster.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// Runs kubectl with standard input.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("kubectl finishes")
    }

    /// Runs kubectl and insists on success; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A kube client as the cluster's admin.
    pub async fn client(&self) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("client config");
        kube::Client::try_from(config).expect("client")
    }

    /// Starts the operator (no leader election unless `extra` asks for it).
    pub fn operator(&self, name: &str, extra: &[&str]) -> Proc {
        self.operator_with_kubeconfig(name, &self.kubeconfig, extra)
    }

    /// Starts an agent for a simulated node with its own state directory:
    /// 8 CPUs and 32 GiB unless `extra` says otherwise, fast heartbeats.
    pub fn agent(&self, node: &str, extra: &[&str]) -> Proc {
        self.agent_with_kubeconfig(node, &self.kubeconfig, extra)
    }

    /// The operator and three agents (`node-1`..`node-3`), kept by the cluster.
    pub fn with_vireo(self) -> Cluster {
        self.with_vireo_operator_args(&[])
    }

    /// Same, with extra operator flags.
    pub fn with_vireo_operator_args(mut self, extra: &[&str]) -> Cluster {
        let mut args = vec!["--no-leader-election"];
        args.extend_from_slice(extra);
        self.procs.push(self.operator("operator", &args));
        for n in 1..=3 {
            self.procs.push(self.agent(&format!("node-{n}"), &[]));
        }
        self
    }

    /// A process the cluster holds (`operator`, `node-1`, ...).
    pub fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Stops the processes the cluster holds.
    pub fn procs_clear(&mut self) {
        self.procs.clear();
    }

    /// The logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                let text = p.log_text();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                format!(
                    "--- {} (last lines) ---\n{}",
                    p.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.clear();
        // Guests outlive their agent by design; the test's own go with it.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &format!("{}/state-", self.dir.display())])
            .status();
        let _ = Command::new("bash")
            .arg(repo().join("e2e/cluster.sh"))
            .args(["stop", &self.dir.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("[e2e] kept {} for inspection", self.dir.display());
        }
    }
}

/// A free TCP port on loopback.
/// A port nothing listens on now, never the same twice in this test
/// process (the kernel may hand a just-closed port out again, and two
/// processes started together would then race for it).
/// `vireo ARGS` as the user of `kubeconfig` (its KUBECONFIG, no
/// VIREO_DEFAULT_URI), `stdin` written to it; its output once it ends.
#[allow(dead_code)]
pub fn vireo_as(kubeconfig: &Path, args: &[String], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(vireo_bin("vireo"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("VIREO_DEFAULT_URI")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vireo runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("stdin written");
    child.wait_with_output().expect("vireo finishes")
}

pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until the object `name` is gone from `api` (a finalizer let go).
pub async fn wait_gone<K>(api: &kube::Api<K>, name: &str, timeout: Duration, what: &str)
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(timeout, what, || async {
        api.get_opt(name)
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await
}

/// Polls `check` until it returns Some, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `n` Hosts are registered and Ready.
pub async fn ready_hosts(client: &kube::Client, n: usize) {
    let hosts: kube::Api<vireo_crds::Host> = kube::Api::all(client.clone());
    wait_for(
        Duration::from_secs(60),
        &format!("{n} ready Hosts"),
        || async {
            let l = hosts.list(&Default::default()).await.ok()?;
            (l.items.len() == n
                && l.items.iter().all(|h| {
                    h.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                }))
            .then_some(())
        },
    )
    .await
}

// ---- Helm and per-identity processes (e2e/tests/helm.rs) ----

impl Cluster {
    /// Starts etcd and kube-apiserver only, with no namespace and no CRDs:
    /// for tests that install Vireo themselves (the Helm chart).
    pub fn start_bare(name: &str) -> Cluster {
        Self::start_bare_with(name, &[])
    }

    /// [`Cluster::start_bare`] with environment for `e2e/cluster.sh` (e.g.
    /// `VIREO_E2E_BIND_ADDRESS=0.0.0.0`, so that real nodes reach it).
    pub fn start_bare_with(name: &str, env: &[(&str, &str)]) -> Cluster {
        let bin = tools_bin();
        let dir = std::env::temp_dir().join(format!("vireo-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let status = Command::new("bash")
            .arg(repo().join("e2e/cluster.sh"))
            .args(["start", &dir.display().to_string()])
            .env("VIREO_E2E_BIN", &bin)
            .envs(env.iter().copied())
            .status()
            .expect("e2e/cluster.sh runs");
        assert!(
            status.success(),
            "e2e/cluster.sh start failed; logs in {}",
            dir.display()
        );
        let env = std::fs::read_to_string(dir.join("env"))
            .expect("cluster env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Cluster {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            env,
            bin,
            procs: Vec::new(),
        }
    }

    /// Runs helm against the cluster as its admin, with helm's cache and
    /// config kept in the cluster's directory.
    pub fn helm(&self, args: &[&str]) -> Output {
        let home = self.dir.join("helm");
        Command::new(self.bin.join("helm"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .current_dir(repo())
            .output()
            .expect("helm runs")
    }

    /// The chart's user ClusterRoles (vireo-viewer, vireo-user,
    /// vireo-admin, vireo-cluster-viewer), as `helm template` renders them.
    #[allow(dead_code)]
    pub fn chart_user_roles(&self) -> String {
        self.helm_ok(&[
            "template",
            "vireo",
            "charts/vireo",
            "-n",
            "vireo-system",
            "--show-only",
            "templates/rbac-users.yaml",
        ])
    }

    /// Runs helm and insists on success; returns stdout.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        let out = self.helm(args);
        assert!(
            out.status.success(),
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a kubeconfig for this cluster that authenticates with a bearer
    /// token (e.g. a ServiceAccount's), and returns its path.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let server = self.env.get("SERVER").expect("SERVER in the cluster env");
        let ca = self.env.get("CA_FILE").expect("CA_FILE in the cluster env");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: vireo-e2e\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: vireo-e2e\n    user: {name}\n    namespace: default\ncurrent-context: {name}\n"
        );
        let path = self.dir.join(format!("kubeconfig-{name}"));
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Runs kubectl with another kubeconfig (another identity).
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    fn kube_env_for(kubeconfig: &Path) -> Vec<(String, String)> {
        vec![
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            (
                "RUST_LOG".into(),
                "info,kube=warn,tower=warn,hyper=warn".into(),
            ),
        ]
    }

    /// [`Cluster::operator`] authenticated by `kubeconfig` instead of the admin's.
    pub fn operator_with_kubeconfig(&self, name: &str, kubeconfig: &Path, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = vec![
            "--host-check-seconds".into(),
            "1".into(),
            "--retry-pending-seconds".into(),
            "1".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", free_port()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(
            name,
            &vireo_bin("vireo-operator"),
            &args,
            &Self::kube_env_for(kubeconfig),
            self.dir.join(format!("{name}.log")),
        )
    }

    /// [`Cluster::agent`] authenticated by `kubeconfig` instead of the admin's.
    pub fn agent_with_kubeconfig(&self, node: &str, kubeconfig: &Path, extra: &[&str]) -> Proc {
        Proc::spawn(
            node,
            &vireo_bin("vireo-agent"),
            &self.agent_args(node, extra),
            &Self::kube_env_for(kubeconfig),
            self.dir.join(format!("agent-{node}.log")),
        )
    }

    /// An agent inside the network namespace `netns`, with the real network
    /// backend (`--network-driver bridge`): its Networks are bridges, NAT
    /// rules and dnsmasq in that namespace, and its guests' taps are there.
    /// The API server's port is forwarded into the namespace's loopback, so
    /// the agent reaches it at the same address as everyone else.
    pub fn agent_in_netns(&self, node: &str, netns: &Netns, extra: &[&str]) -> Proc {
        let server = self.env.get("SERVER").expect("SERVER in the cluster env");
        let port: u16 = server
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("a port in {server}"));
        netns.forward_port(port);
        let mut extra = extra.to_vec();
        if !extra.contains(&"--network-driver") {
            extra.extend(["--network-driver", "bridge"]);
        }
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            netns.name.clone(),
            vireo_bin("vireo-agent").display().to_string(),
        ];
        args.extend(self.agent_args(node, &extra));
        Proc::spawn(
            node,
            Path::new("ip"),
            &args,
            &Self::kube_env_for(&self.kubeconfig),
            self.dir.join(format!("agent-{node}.log")),
        )
    }

    /// The command line of an agent for `node` (see [`Cluster::agent`]).
    fn agent_args(&self, node: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--node-name".into(),
            node.into(),
            "--state-dir".into(),
            self.dir.join(format!("state-{node}")).display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", free_port()),
        ];
        // Each simulated node has a filesystem of its own for its pools;
        // boot files may come from anywhere unless a test says otherwise.
        let host_root = self.dir.join(format!("host-{node}")).display().to_string();
        let defaults = [
            ("--host-root", host_root.as_str()),
            ("--boot-dir", "/"),
            // Simulated nodes share this machine's network namespace: their
            // Networks are records, not bridges on the host.
            ("--network-driver", "test"),
            ("--heartbeat-seconds", "1"),
            ("--lease-seconds", "3"),
            ("--resync-seconds", "5"),
            ("--cpus", "8"),
            ("--memory", "32Gi"),
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Keeps a process with the cluster (stopped with it, in [`Cluster::logs`]).
    pub fn hold(&mut self, proc: Proc) {
        self.procs.push(proc);
    }
}

/// Runs a repository script (`scripts/guest-image.sh`, `vmm/guest/build.sh`)
/// with an optional argument and returns the path on the last line of its
/// output (both print what they built there).
pub fn script_output(script: &str, arg: Option<&Path>) -> PathBuf {
    let mut cmd = Command::new(repo().join(script));
    // Some of them build with cargo (the guest agent).
    without_cargo_env(&mut cmd);
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("runs the script");
    assert!(out.status.success(), "{script} failed");
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a path")
            .trim(),
    )
}

/// stdout and stderr of a command, for a failed assertion's message.
pub fn text_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `vireo -c URI ARGS` (the CLI built from this workspace) as the user of
/// `kubeconfig`.
pub fn vireo(kubeconfig: &Path, uri: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(vireo_bin("vireo"))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("VIREO_DEFAULT_URI")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("vireo runs")
}

/// Same, insisting on success; returns stdout.
pub fn vireo_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let out = vireo(kubeconfig, "kube:///", args);
    assert!(
        out.status.success(),
        "vireo {} failed: {}",
        args.join(" "),
        text_of(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Same, insisting on a failure (exit 1) whose stderr holds `words`.
pub fn vireo_refused(kubeconfig: &Path, args: &[&str], words: &str) {
    let out = vireo(kubeconfig, "kube:///", args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "vireo {} did not fail: {}",
        args.join(" "),
        text_of(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(words),
        "vireo {}: {words:?} not in {err:?}",
        args.join(" ")
    );
}
