//! Consoles and volume transfers through the API server: the agents'
//! aggregated API `subresources.vireo.dev` behind an APIService, on a real
//! kube-apiserver with a front proxy (e2e/cluster.sh), users authenticated
//! by ServiceAccount tokens and authorized by the chart's ClusterRoles.
//!
//! * user `alice`, bound to `vireo-user` in team-a, reads a real guest's
//!   console (qemu, the guest image's shell), uploads a volume with
//!   progress and downloads it back byte for byte;
//! * the same user is refused (`forbidden`, exit 1) in team-b, where the
//!   volume stays as it was;
//! * `bob`, bound to `vireo-viewer`, lists Domains but cannot open a console;
//! * a client without the front proxy's certificate is refused by the agent
//!   whatever identity headers it sends;
//! * an upload cut mid-stream leaves the volume not Ready with its old
//!   content; a retry completes it, byte for byte.
//!
//! The client is the real CLI, `vireo -c kube:///` (its
//! cli/src/cluster/subresources.rs), run as each user with their kubeconfig.
//! Needs qemu-system-x86_64 (the console's guest) and a non-loopback IPv4
//! address on this host (the APIService's endpoint): fails under CI
//! without them, otherwise prints SKIP.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Cluster, free_port, ready_hosts, wait_for};
use kube::api::Api;
use vireo_crds::{Domain, DomainState, StorageVol};

const T: Duration = Duration::from_secs(120);
const SERVICE: &str = "vireo-subresources";

fn skip(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{why} and CI is set");
    }
    eprintln!("SKIP subresources e2e: {why}");
    true
}

/// This host's address towards the outside: endpoint IPs may not be loopback.
fn host_ip() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "route", "get", "1"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "src")?;
    words.next().map(str::to_string)
}

fn qemu_available() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    })
}

/// The real CLI on a cluster connection, as the user of `kubeconfig`:
/// `upload NS/NAME FILE`, `download NS/NAME FILE`, `console NS/NAME` are
/// `vireo -c kube:/// vol-upload|vol-download --pool images ...` and
/// `vireo -c kube:/// console` (stdin to the guest until it ends, then its
/// answer for two seconds).
fn vireo_args(args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = vec!["-c".into(), "kube:///".into()];
    match args {
        ["upload", object, file] => {
            out.extend(["vol-upload", "--pool", "images", object, file].map(String::from))
        }
        ["download", object, file] => {
            out.extend(["vol-download", "--pool", "images", object, file].map(String::from))
        }
        ["console", object, ..] => out.extend(["console", object].map(String::from)),
        other => panic!("no such client command: {other:?}"),
    }
    out
}

fn client(kubeconfig: &Path, args: &[&str], stdin: &[u8]) -> Output {
    common::vireo_as(kubeconfig, &vireo_args(args), stdin)
}

/// [`client`] on a terminal (script(1)), where vireo draws its progress bar.
fn client_on_a_terminal(kubeconfig: &Path, args: &[&str]) -> Output {
    let line = std::iter::once(common::vireo_bin("vireo").display().to_string())
        .chain(vireo_args(args))
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("VIREO_DEFAULT_URI")
        .stdin(Stdio::null())
        .output()
        .expect("script runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A serving certificate for the agents, signed by the cluster's CA, for the
/// Service's DNS name (what the API server checks).
fn serving_cert(cluster: &Cluster) -> (PathBuf, PathBuf) {
    let pki = cluster.dir.join("pki");
    let (crt, key) = (pki.join("subresources.crt"), pki.join("subresources.key"));
    let ext = pki.join("subresources.ext");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:{SERVICE}.vireo-system.svc\n"
        ),
    )
    .expect("ext");
    let sh = format!(
        "set -e; cd {}; openssl ecparam -name prime256v1 -genkey -noout -out subresources.key; \
         openssl req -new -key subresources.key -subj /CN={SERVICE} -out subresources.csr; \
         openssl x509 -req -in subresources.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 2 \
         -extfile subresources.ext -out subresources.crt",
        pki.display()
    );
    let out = Command::new("bash")
        .args(["-c", &sh])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {}", text(&out.stderr));
    (crt, key)
}

/// A ServiceAccount's token kubeconfig.
fn user(cluster: &Cluster, ns: &str, name: &str) -> PathBuf {
    cluster.kubectl_ok(&["create", "serviceaccount", name, "-n", ns]);
    let token = cluster.kubectl_ok(&["create", "token", name, "-n", ns, "--duration", "2h"]);
    cluster.token_kubeconfig(name, token.trim())
}

fn vol_phase(v: &StorageVol) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: incompressible enough, reproducible.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn consoles_and_transfers_through_the_api_server_follow_rbac() {
    if !qemu_available() && skip("qemu-system-x86_64 is missing") {
        return;
    }
    let Some(ip) = host_ip().filter(|ip| !ip.starts_with("127.")) else {
        skip("this host has no non-loopback IPv4 address for the APIService endpoint");
        return;
    };
    let cluster = Cluster::start("subresources");
    let (crt, key) = serving_cert(&cluster);
    let port = free_port();
    let _op = cluster.operator("operator", &["--no-leader-election"]);
    let ca_file = cluster.dir.join("pki/ca.crt").display().to_string();
    let server_name = format!("{SERVICE}.vireo-system.svc");
    let subresources_args = |port: u16| -> Vec<String> {
        [
            "--subresources-listen".to_string(),
            format!("0.0.0.0:{port}"),
            "--subresources-advertise".to_string(),
            format!("{ip}:{port}"),
            "--subresources-cert".to_string(),
            crt.display().to_string(),
            "--subresources-key".to_string(),
            key.display().to_string(),
            "--subresources-ca".to_string(),
            ca_file.clone(),
            "--subresources-server-name".to_string(),
            server_name.clone(),
            "--resync-seconds".to_string(),
            "2".to_string(),
        ]
        .to_vec()
    };
    let args1 = subresources_args(port);
    let agent = cluster.agent(
        "node-1",
        &args1.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let kube = cluster.client().await;
    ready_hosts(&kube, 1).await;

    // The APIService, as the chart renders it, with a selector-less Service
    // whose endpoint is this host (the agent runs as a process here).
    let ca = std::fs::read(cluster.dir.join("pki/ca.crt")).expect("ca");
    let ca_b64 = {
        let out = Command::new("base64")
            .arg("-w0")
            .arg(cluster.dir.join("pki/ca.crt"))
            .output()
            .expect("base64");
        text(&out.stdout)
    };
    assert!(!ca.is_empty());
    let endpoints = |port: u16| {
        format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {SERVICE}, namespace: vireo-system}}\nsubsets:\n- addresses: [{{ip: {ip}}}]\n  ports: [{{name: https, port: {port}, protocol: TCP}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {SERVICE}-1\n  namespace: vireo-system\n  labels: {{kubernetes.io/service-name: {SERVICE}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\nports: [{{name: https, port: {port}, protocol: TCP}}]\n"
        )
    };
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {SERVICE}, namespace: vireo-system}}\nspec:\n  ports: [{{name: https, port: 443, targetPort: {port}, protocol: TCP}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {SERVICE}, namespace: vireo-system}}\nsubsets:\n- addresses: [{{ip: {ip}}}]\n  ports: [{{name: https, port: {port}, protocol: TCP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {SERVICE}-1\n  namespace: vireo-system\n  labels: {{kubernetes.io/service-name: {SERVICE}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\nports: [{{name: https, port: {port}, protocol: TCP}}]\n---\n\
         apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: v1alpha1.subresources.vireo.dev}}\nspec:\n  group: subresources.vireo.dev\n  version: v1alpha1\n  groupPriorityMinimum: 1000\n  versionPriority: 15\n  service: {{name: {SERVICE}, namespace: vireo-system, port: 443}}\n  caBundle: {ca_b64}\n"
    );
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(out.status.success(), "apply: {}", text(&out.stderr));
    let out = cluster.kubectl(&[
        "wait",
        "--for=condition=Available",
        "apiservice/v1alpha1.subresources.vireo.dev",
        "--timeout=90s",
    ]);
    assert!(
        out.status.success(),
        "the APIService did not become Available: {}{}\n{}",
        text(&out.stderr),
        cluster.kubectl_ok(&[
            "get",
            "apiservice",
            "v1alpha1.subresources.vireo.dev",
            "-o",
            "yaml"
        ]),
        agent.log_text()
    );

    // The chart's user roles.
    let roles = cluster.chart_user_roles();
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &roles);
    assert!(out.status.success(), "roles: {}", text(&out.stderr));
    for ns in ["team-a", "team-b"] {
        cluster.kubectl_ok(&["create", "namespace", ns]);
    }
    let alice = user(&cluster, "team-a", "alice");
    let bob = user(&cluster, "team-a", "bob");
    cluster.kubectl_ok(&[
        "create",
        "rolebinding",
        "alice-user",
        "-n",
        "team-a",
        "--clusterrole=vireo-user",
        "--serviceaccount=team-a:alice",
    ]);
    cluster.kubectl_ok(&[
        "create",
        "rolebinding",
        "bob-viewer",
        "-n",
        "team-a",
        "--clusterrole=vireo-viewer",
        "--serviceaccount=team-a:bob",
    ]);
    // Both read the cluster-scoped pools the CLI resolves `--pool` in.
    cluster.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "team-a-cluster-viewers",
        "--clusterrole=vireo-cluster-viewer",
        "--serviceaccount=team-a:alice",
        "--serviceaccount=team-a:bob",
    ]);

    // A guest with a shell on its console, a pool, volumes waiting for uploads.
    let image = common::script_output("scripts/guest-image.sh", None);
    let objects = format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: images}}\nspec: {{path: /var/lib/vireo/images}}\n---\n\
         apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: shell, namespace: team-a}}\nspec:\n  type: qemu\n  memory: 256Mi\n  vcpus: 1\n  os:\n    kernel: {}\n    initrd: {}\n    cmdline: console=ttyS0 quiet vireo.net=0 vireo.shell=1\n---\n\
         apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: disk, namespace: team-a}}\nspec: {{pool: images, capacity: 6Mi, nodeName: node-1, source: {{upload: {{}}}}}}\n---\n\
         apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: cut, namespace: team-a}}\nspec: {{pool: images, capacity: 4Mi, nodeName: node-1, source: {{upload: {{}}}}}}\n---\n\
         apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: disk, namespace: team-b}}\nspec: {{pool: images, capacity: 6Mi, nodeName: node-1, source: {{upload: {{}}}}}}\n",
        image.join("vmlinuz").display(),
        image.join("initrd.img").display()
    );
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &objects);
    assert!(out.status.success(), "objects: {}", text(&out.stderr));
    let vols_a: Api<StorageVol> = Api::namespaced(kube.clone(), "team-a");
    let vols_b: Api<StorageVol> = Api::namespaced(kube.clone(), "team-b");
    for (api, name) in [(&vols_a, "disk"), (&vols_a, "cut"), (&vols_b, "disk")] {
        wait_for(
            T,
            &format!("volume {name} waiting for its upload"),
            || async {
                api.get_opt(name).await.ok().flatten().filter(|v| {
                    vol_phase(v) == "Pending" && v.status.as_ref().is_some_and(|s| s.path.is_some())
                })
            },
        )
        .await;
    }

    // Not the front proxy: refused by the agent, whatever the headers say.
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "X-Remote-User: system:admin",
            "-H",
            "X-Remote-Group: system:masters",
            &format!(
                "https://{ip}:{port}/apis/subresources.vireo.dev/v1alpha1/namespaces/team-a/storagevols/disk/download"
            ),
        ])
        .output()
        .expect("curl");
    assert_eq!(
        text(&out.stdout),
        "401",
        "a direct request with forged headers"
    );

    // Upload in team-a with progress, then download: byte for byte.
    let data = random_bytes(6 << 20, 42);
    let src = cluster.dir.join("upload.img");
    std::fs::write(&src, &data).expect("source");
    let out = client_on_a_terminal(
        &alice,
        &["upload", "team-a/disk", &src.display().to_string()],
    );
    assert!(
        out.status.success(),
        "upload: {}\n{}",
        text(&out.stdout),
        agent.log_text()
    );
    // The bar's "DONE/TOTAL", then the result.
    assert!(
        text(&out.stdout).contains("/6.00 MiB"),
        "no progress shown: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("Uploaded 6.00 MiB"),
        "{}",
        text(&out.stdout)
    );
    wait_for(T, "volume disk Ready after its upload", || async {
        vols_a
            .get_opt("disk")
            .await
            .ok()
            .flatten()
            .filter(|v| vol_phase(v) == "Ready")
    })
    .await;
    let back = cluster.dir.join("download.img");
    let out = client(
        &alice,
        &["download", "team-a/disk", &back.display().to_string()],
        b"",
    );
    assert!(out.status.success(), "download: {}", text(&out.stderr));
    assert!(
        std::fs::read(&back).expect("downloaded") == data,
        "the download differs from the upload"
    );

    // The same user in team-b: forbidden, exit 1, the volume as it was.
    let b_before = vols_b.get("disk").await.expect("team-b disk");
    let out = client(
        &alice,
        &["upload", "team-b/disk", &src.display().to_string()],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "upload in team-b: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("forbidden"),
        "{}",
        text(&out.stderr)
    );
    let out = client(
        &alice,
        &["download", "team-b/disk", &back.display().to_string()],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("forbidden"),
        "{}",
        text(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b_after = vols_b.get("disk").await.expect("team-b disk");
    assert_eq!(vol_phase(&b_after), "Pending");
    assert_eq!(b_before.status, b_after.status, "team-b's volume changed");

    // The console: alice reads the guest's shell through it.
    let domains: Api<Domain> = Api::namespaced(kube.clone(), "team-a");
    wait_for(T, "domain shell running", || async {
        domains
            .get_opt("shell")
            .await
            .ok()
            .flatten()
            .filter(|d| d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running))
    })
    .await;
    let token = format!("OUT-{}", std::process::id());
    let mut answer = String::new();
    for _ in 0..20 {
        let out = client(
            &alice,
            &["console", "team-a/shell", "3"],
            format!("\necho {token}-$((6*7))\n").as_bytes(),
        );
        assert!(
            out.status.success(),
            "console: {}\n{}",
            text(&out.stderr),
            agent.log_text()
        );
        answer.push_str(&text(&out.stdout));
        if answer.contains(&format!("{token}-42")) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        answer.contains(&format!("{token}-42")),
        "the guest's shell did not answer through the console subresource:\n{answer}"
    );

    // bob (vireo-viewer) lists Domains but cannot open a console.
    let out = cluster.kubectl_as(&bob, &["get", "domains", "-n", "team-a"]);
    assert!(out.status.success(), "bob lists: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("shell"));
    let out = client(&bob, &["console", "team-a/shell", "1"], b"");
    assert_eq!(
        out.status.code(),
        Some(1),
        "bob's console: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("forbidden"),
        "{}",
        text(&out.stderr)
    );

    // A cut upload: the client dies mid-stream (its source is a pipe that
    // has given 1 MiB of 4): the volume stays not Ready with its old content.
    let cut = vols_a.get("cut").await.expect("cut");
    let cut_path = cut
        .status
        .as_ref()
        .and_then(|s| s.path.clone())
        .expect("path");
    // The agent reports the path as it sees it (under its --host-root).
    let host_path = PathBuf::from(cut_path);
    let old = std::fs::read(&host_path).unwrap_or_else(|e| panic!("{}: {e}", host_path.display()));
    // `vireo vol-upload ... -` reads standard input, of no known length.
    let mut child = Command::new(common::vireo_bin("vireo"))
        .args([
            "-c",
            "kube:///",
            "vol-upload",
            "--pool",
            "images",
            "team-a/cut",
            "-",
        ])
        .env("KUBECONFIG", &alice)
        .env_remove("VIREO_DEFAULT_URI")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vireo");
    let mut pipe = child.stdin.take().expect("stdin");
    let part = random_bytes(4 << 20, 7);
    pipe.write_all(&part[..1 << 20]).expect("first MiB");
    wait_for(T, "the cut upload running (volume Creating)", || async {
        vols_a
            .get_opt("cut")
            .await
            .ok()
            .flatten()
            .filter(|v| vol_phase(v) == "Creating")
    })
    .await;
    child.kill().expect("kill the client");
    let _ = child.wait();
    drop(pipe);
    // The agent notices, drops the partial file, and the volume goes back
    // to waiting for its content.
    wait_for(T, "volume cut Pending again", || async {
        vols_a
            .get_opt("cut")
            .await
            .ok()
            .flatten()
            .filter(|v| vol_phase(v) == "Pending")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = vols_a.get("cut").await.expect("cut");
    assert_ne!(vol_phase(&after), "Ready", "a cut upload reads Ready");
    assert!(
        std::fs::read(&host_path).expect("volume file") == old,
        "a cut upload changed the volume"
    );
    let leftovers: Vec<String> = std::fs::read_dir(host_path.parent().expect("pool dir"))
        .expect("pool dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".vireo-partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

    // The retry completes it, byte for byte.
    let whole = cluster.dir.join("cut.img");
    std::fs::write(&whole, &part).expect("source");
    let out = client(
        &alice,
        &["upload", "team-a/cut", &whole.display().to_string()],
        b"",
    );
    assert!(out.status.success(), "retry: {}", text(&out.stderr));
    wait_for(T, "volume cut Ready after the retry", || async {
        vols_a
            .get_opt("cut")
            .await
            .ok()
            .flatten()
            .filter(|v| vol_phase(v) == "Ready")
    })
    .await;
    assert!(
        std::fs::read(&host_path).expect("volume file") == part,
        "the retried upload differs"
    );
    let back = cluster.dir.join("cut-back.img");
    let out = client(
        &alice,
        &["download", "team-a/cut", &back.display().to_string()],
        b"",
    );
    assert!(out.status.success(), "download: {}", text(&out.stderr));
    assert!(std::fs::read(&back).expect("downloaded") == part);

    // Forwarding: the API server now reaches only node-2's agent, which
    // forwards to node-1's (where the volume is) with its own token; node-1
    // checks that token (TokenReview) may `proxy` before it believes the
    // user node-2 names.
    let port2 = free_port();
    let args2 = subresources_args(port2);
    let agent2 = cluster.agent(
        "node-2",
        &args2.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    ready_hosts(&kube, 2).await;
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &endpoints(port2));
    assert!(out.status.success(), "endpoints: {}", text(&out.stderr));
    let mut forwarded = false;
    for _ in 0..30 {
        let back2 = cluster.dir.join("forwarded.img");
        let out = client(
            &alice,
            &["download", "team-a/cut", &back2.display().to_string()],
            b"",
        );
        assert!(
            out.status.success(),
            "download through node-2: {}",
            text(&out.stderr)
        );
        assert!(std::fs::read(&back2).expect("downloaded") == part);
        if agent2.log_text().contains("subresources API: forwarded") {
            forwarded = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(forwarded, "node-2 never forwarded:\n{}", agent2.log_text());
    // And the forwarded identity stays the user's: bob is still refused.
    let nowhere = cluster.dir.join("bob.img");
    let out = client(
        &bob,
        &["download", "team-a/cut", &nowhere.display().to_string()],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("forbidden"),
        "{}",
        text(&out.stderr)
    );
    // A user's own token cannot pose as a forwarding agent.
    let alice_token = cluster.kubectl_ok(&["create", "token", "alice", "-n", "team-a"]);
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {}", alice_token.trim()),
            "-H",
            "X-Vireo-Forwarded-User: system:admin",
            &format!(
                "https://{ip}:{port}/apis/subresources.vireo.dev/v1alpha1/namespaces/team-b/storagevols/disk/download"
            ),
        ])
        .output()
        .expect("curl");
    assert_eq!(
        text(&out.stdout),
        "401",
        "a user's token posing as an agent"
    );
}
