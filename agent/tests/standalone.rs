//! `vireo-agent --standalone --manifests DIR`: a `type: qemu` Domain with the
//! real Linux guest runs from a manifest file; editing the file stops and
//! starts it; a killed agent leaves the guest running and re-adopts it;
//! removing the file destroys the guest. A broken file changes nothing.
//!
//! Without `qemu-system-x86_64` the test fails when `CI` is set, and
//! otherwise prints a SKIP line and returns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn qemu_available() -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-system-x86_64 is missing and CI is set (scripts/setup installs it)"
        );
        eprintln!("SKIP standalone test: qemu-system-x86_64 not found");
    }
    found
}

fn guest_image() -> PathBuf {
    let out = Command::new(repo().join("scripts/guest-image.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("runs scripts/guest-image.sh");
    assert!(out.status.success());
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("dir")
            .trim(),
    )
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a standalone agent; kernels only from `boot_dir` (or the default,
/// /var/lib/vireo/boot, with `None`) and the pools.
fn start_agent(state: &Path, manifests: &Path, boot_dir: Option<&Path>) -> Agent {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("log"))
        .expect("log");
    let err = log.try_clone().expect("log");
    Agent(
        Command::new(env!("CARGO_BIN_EXE_vireo-agent"))
            .args(["--standalone", "--manifests"])
            .arg(manifests)
            .arg("--state-dir")
            .arg(state)
            .args(
                boot_dir
                    .map(|d| ["--boot-dir".as_ref(), d.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .args([
                "--resync-seconds",
                "1",
                "--stop-timeout-seconds",
                "30",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("vireo-agent starts"),
    )
}

fn status(state: &Path) -> Option<Value> {
    let text = std::fs::read(state.join("standalone/status/default.linux.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn wait_status(state: &Path, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(s) = status(state).filter(|s| f(s)) {
            return s;
        }
        assert!(
            start.elapsed() < T,
            "timed out waiting for {what}; status {:?}; agent log:\n{}",
            status(state),
            std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn manifest(image: &Path, strategy: &str) -> String {
    format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: linux}}\nspec:\n  type: qemu\n  memory: 256Mi\n  vcpus: 1\n  runStrategy: {strategy}\n  os:\n    kernel: {}\n    initrd: {}\n    cmdline: console=ttyS0 quiet vireo.net=0 vireo.shell=1\n",
        image.join("vmlinuz").display(),
        image.join("initrd.img").display()
    )
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn standalone_runs_edits_readopts_and_removes_a_qemu_guest() {
    if !qemu_available() {
        return;
    }
    let image = guest_image();
    let base = std::env::temp_dir().join(format!("vireo-standalone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (dir, state) = (base.join("manifests"), base.join("state"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::create_dir_all(&state).expect("state");
    let file = dir.join("linux.yaml");
    std::fs::write(&file, manifest(&image, "Always")).expect("write");
    let agent = start_agent(&state, &dir, Some(&image));

    let running = |s: &Value| s["state"] == "running" && s["id"].is_u64();
    let s = wait_status(&state, "running", running);
    let (id, uuid) = (
        s["id"].clone(),
        s["uuid"].as_str().expect("uuid").to_string(),
    );
    let run = state.join("qemu/run").join(&uuid);
    let log = run.join("console.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("VIREO-GUEST-READY")
    {
        assert!(start.elapsed() < T, "no marker on the console");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid: u64 = std::fs::read_to_string(run.join("pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");

    local_api(&state, &base);

    // A broken file changes nothing.
    std::fs::write(
        &file,
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: [",
    )
    .expect("write");
    std::thread::sleep(Duration::from_secs(3));
    let s = status(&state).expect("status");
    assert!(
        running(&s) && s["id"] == id,
        "a broken manifest left the guest alone: {s}"
    );

    // Kill the agent: the guest keeps running; a new agent adopts it.
    drop(agent);
    assert!(pid_alive(pid), "QEMU outlives the agent");
    std::fs::write(&file, manifest(&image, "Always")).expect("write");
    let agent = start_agent(&state, &dir, Some(&image));
    std::thread::sleep(Duration::from_secs(3));
    let s = wait_status(&state, "running after restart", running);
    assert_eq!(s["id"], id, "same ID after the agent restart");
    assert_eq!(s["startCount"], 1, "nothing restarted: {s}");
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("VIREO-GUEST-READY")
            .count(),
        1
    );

    // Edit: Halted stops the guest (graceful), Always starts it again.
    std::fs::write(&file, manifest(&image, "Halted")).expect("write");
    wait_status(&state, "shut off", |s| s["state"] == "shutoff");
    assert!(!pid_alive(pid), "QEMU is gone");
    std::fs::write(&file, manifest(&image, "Always")).expect("write");
    let s = wait_status(&state, "running again", running);
    assert_ne!(s["id"], id, "a new activation");

    // Remove the manifest: the guest goes.
    let pid: u64 = std::fs::read_to_string(run.join("pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    std::fs::remove_file(&file).expect("remove");
    let start = Instant::now();
    while status(&state).is_some() || pid_alive(pid) {
        assert!(
            start.elapsed() < T,
            "the removed Domain's guest is still there"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !state.join("qemu/domains/default%2Flinux.json").exists(),
        "the domain is undefined"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&base);
}

/// The `vireo` CLI of this build (cargo builds it once per test binary),
/// without the variables cargo set for this test: ring's build script
/// reruns when `CARGO_MANIFEST_DIR` or `CARGO_PKG_*` change, and with them
/// ring, rustls and kube would rebuild here and again after.
fn vireo_cli() -> PathBuf {
    let mut cargo = Command::new(env!("CARGO"));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k == "CARGO_CRATE_NAME"
        {
            cargo.env_remove(&key);
        }
    }
    let status = cargo
        .args(["build", "--quiet", "-p", "vireo-cli", "--bin", "vireo"])
        .current_dir(repo())
        .status()
        .expect("runs cargo build");
    assert!(status.success(), "cargo build -p vireo-cli failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("debug/vireo")
}

/// Runs `vireo -c URI ARGS` with `stdin`; (success, stdout, stderr).
fn vireo(uri: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(vireo_cli())
        .arg("-c")
        .arg(uri)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vireo runs");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("vireo finishes");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a user types: the `vireo` CLI on the agent's socket lists the
/// guest, describes it, and reaches its shell through `vireo console`.
fn cli_on_the_socket(state: &Path) {
    let uri = format!("vireo+unix://{}", state.join("vireo.sock").display());
    let (ok, out, err) = vireo(&uri, &["list"], "");
    assert!(ok, "vireo list: {err}");
    let row = out
        .lines()
        .find(|l| l.contains("default/linux"))
        .unwrap_or_else(|| panic!("no default/linux in:\n{out}"));
    assert!(row.contains("running"), "{out}");
    let (ok, out, err) = vireo(&uri, &["dominfo", "default/linux"], "");
    assert!(ok, "vireo dominfo: {err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("State:") && l.contains("running")),
        "{out}"
    );
    let (ok, _, err) = vireo(&uri, &["dominfo", "default/nope"], "");
    assert!(!ok);
    assert_eq!(err.trim(), "error: domain 'default/nope' not found");

    let token = format!("SOCK-{}", std::process::id());
    let mut answer = String::new();
    let start = Instant::now();
    while !answer.contains(&format!("{token}-42")) {
        assert!(
            start.elapsed() < T,
            "the guest's shell did not answer through vireo console on the socket:\n{answer}"
        );
        let (ok, out, err) = vireo(
            &uri,
            &["console", "default/linux"],
            &format!("\necho {token}-$((6*7))\n"),
        );
        assert!(ok, "vireo console: {err}");
        answer.push_str(&out);
    }
}

/// The agent's local API (`vireo+unix:///STATE/vireo.sock`): the node's
/// drivers as one connection, as the CLI uses them.
fn local_api(state: &Path, base: &Path) {
    cli_on_the_socket(state);
    use vireo_drivers::{Error, ListFilter, Lookup};
    let uri = format!("vireo+unix://{}", state.join("vireo.sock").display());
    let conn = vireo_drivers::open(&uri).expect("the agent's socket answers");
    let hv = conn.hypervisor();
    let doms = hv.list_domains(ListFilter::Active).expect("list");
    assert!(
        doms.iter()
            .any(|d| d.name == "default/linux" && d.id.is_some()),
        "the qemu guest is listed with its ID: {doms:?}"
    );
    let info = hv.domain_info("default/linux").expect("dominfo");
    assert_eq!(info.state, vireo_crds::DomainState::Running);
    let console = hv.console_path("default/linux").expect("console path");
    assert!(console.exists(), "console socket {}", console.display());
    // Errors cross the socket typed, naming the object.
    let e = hv.domain_info("default/nope").expect_err("unknown");
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert_eq!(e.to_string(), "domain 'default/nope' not found");

    // A `type: test` domain defined through the socket goes to the test driver.
    let scratch: vireo_crds::Domain = serde_yaml_ng::from_str(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: scratch}\nspec: {type: test, memory: 64Mi, vcpus: 1, runStrategy: Manual}\n",
    )
    .expect("manifest");
    hv.define_domain(&scratch)
        .expect("define through the socket");
    hv.start_domain("scratch").expect("start");
    let r = hv.lookup_domain(Lookup::Name("scratch")).expect("lookup");
    assert!(r.id.is_some(), "running with an ID: {r:?}");
    hv.destroy_domain("scratch").expect("destroy");
    hv.undefine_domain("scratch").expect("undefine");

    // A pool, a volume, and its content through the socket.
    let pool_dir = base.join("pool");
    let pool: vireo_crds::StoragePool = serde_yaml_ng::from_str(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: api-pool}}\nspec: {{path: {}}}\n",
        pool_dir.display()
    ))
    .expect("pool");
    let st = conn.storage();
    st.define_pool(&pool).expect("define pool");
    st.build_pool("api-pool").expect("build");
    st.start_pool("api-pool").expect("start");
    let vol: vireo_crds::StorageVol = serde_yaml_ng::from_str(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: v}\nspec: {pool: api-pool, capacity: 2Mi}\n",
    )
    .expect("vol");
    st.create_volume(&vol).expect("create volume");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let n = st
        .upload_volume(
            "api-pool",
            "v",
            &mut &data[..],
            Some(data.len() as u64),
            &|_, _| {},
        )
        .expect("upload");
    assert_eq!(n, data.len() as u64);
    let mut back = Vec::new();
    let n = st
        .download_volume("api-pool", "v", &mut back, &|_, _| {})
        .expect("download");
    assert_eq!(n, 2 << 20);
    assert_eq!(&back[..data.len()], &data[..]);
    assert_eq!(std::fs::read(pool_dir.join("v")).expect("file"), back);
    st.delete_volume("api-pool", "v").expect("delete");
    st.destroy_pool("api-pool").expect("destroy");
    st.undefine_pool("api-pool").expect("undefine");
}

/// A volume made for an upload holds its Domain back in standalone mode
/// too: the Domain stays shut off until `vireo vol-upload` (here from
/// standard input, through the agent's socket) fills the volume, and then
/// starts.
#[test]
fn standalone_holds_a_domain_until_its_upload_arrives() {
    let base = std::env::temp_dir().join(format!("vireo-sa-upload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (state, manifests, pool) = (
        base.join("state"),
        base.join("manifests"),
        base.join("pool"),
    );
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(
        manifests.join("all.yaml"),
        format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: up}}\nspec: {{path: {}}}\n---\napiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: img}}\nspec: {{pool: up, capacity: 1Mi, source: {{upload: {{}}}}}}\n---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: waiter}}\nspec:\n  type: test\n  memory: 128Mi\n  vcpus: 1\n  devices:\n    disks: [{{name: vda, volume: img}}]\n---\napiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: hostile}}\nspec:\n  type: test\n  memory: 128Mi\n  vcpus: 1\n  os: {{kernel: /etc/shadow}}\n",
            pool.display()
        ),
    )
    .expect("manifest");
    let _agent = start_agent(&state, &manifests, None);
    let uri = format!("vireo+unix://{}", state.join("vireo.sock").display());
    let marker = pool.join(".default.img.vireo-awaiting-upload");
    let start = Instant::now();
    while !(pool.join("default.img").is_file() && marker.is_file()) {
        assert!(
            start.elapsed() < T,
            "the placeholder and its mark; agent log:\n{}",
            std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A Domain whose kernel is a host file outside the boot directory and
    // the pools is refused with the field named, and never defined.
    let log = || std::fs::read_to_string(state.with_extension("log")).unwrap_or_default();
    while !log().contains("spec.os.kernel: '/etc/shadow' is outside the node's storage pools and its boot directories (/var/lib/vireo/boot)") {
        assert!(start.elapsed() < T, "no refusal of /etc/shadow; agent log:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = vireo(&uri, &["domstate", "default/hostile"], "");
    assert!(
        !ok && err.contains("not found") || err.contains("no domain"),
        "{err}"
    );
    // A few passes later it is still held back.
    std::thread::sleep(Duration::from_secs(3));
    let (ok, out, err) = vireo(&uri, &["domstate", "default/waiter"], "");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "shut off", "held back while the volume waits");
    let (ok, out, _) = vireo(&uri, &["vol-info", "default.img", "--pool", "up"], "");
    assert!(ok && out.contains("waiting for vol-upload"), "{out}");

    let content = "an image\n".repeat(4096);
    let length = content.len().to_string();
    let (ok, out, err) = vireo(
        &uri,
        &[
            "vol-upload",
            "default.img",
            "-",
            "--pool",
            "up",
            "--length",
            &length,
        ],
        &content,
    );
    assert!(ok, "{out}{err}");
    assert!(!marker.exists(), "the mark goes with the upload");
    let start = Instant::now();
    loop {
        let (_, out, _) = vireo(&uri, &["domstate", "default/waiter"], "");
        if out.trim() == "running" {
            break;
        }
        assert!(
            start.elapsed() < T,
            "waiter did not start after the upload: {out}; agent log:\n{}",
            std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored = std::fs::read(pool.join("default.img")).expect("volume");
    assert_eq!(&stored[..content.len()], content.as_bytes());
    let _ = std::fs::remove_dir_all(&base);
}
