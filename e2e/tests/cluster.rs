//! Vireo on a real cluster: the image built by `scripts/image`, two nodes
//! of kubelet and containerd (`e2e/nodes.sh`) beside the e2e kube-apiserver, and the
//! unchanged chart installed with `helm install`. The agent DaemonSet's pods
//! and the operator Deployment's pods become Ready, each node's agent
//! registers its Host, and `kubectl apply -k examples/` runs: the `test`
//! domains, the Linux guest under QEMU with its disk and its NAT network (its
//! DHCP address in status, its console answering through `kubectl exec`
//! and through the API server's subresources.vireo.dev from this machine),
//! and a `type: kvm` domain with the test guest under vireo-vmm.
//!
//! Then the promise that guests outlive the agent's pod: `kubectl delete
//! pod` of an agent and `helm upgrade` to a new image tag (a rolling update)
//! leave every guest's process (PID and start time), domain ID, dnsmasq and
//! bridge as they were, and the new pods write status again. Last, `helm
//! uninstall` runs the pre-delete hook: no VM process, dnsmasq, tap or
//! bridge is left on either node.
//!
//! Needs root, /dev/kvm, QEMU and the Debian packages `scripts/setup`
//! installs (containerd, runc, CNI plugins, mmdebstrap, umoci, skopeo);
//! without them the test fails when `CI` is set and otherwise prints a SKIP
//! line and returns.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::nodes::{Nodes, read_pid, script};
use common::{Cluster, repo, wait_for};
use kube::api::Api;
use serde_json::Value;
use vireo_crds::{Domain, DomainState, Host};

const NS: &str = "vireo-system";
const T: Duration = Duration::from_secs(240);
/// The tag `helm upgrade` moves the agents and the operator to.
const NEXT_TAG: &str = "0.1.0-e2e-next";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm cannot be opened".into());
    }
    for tool in ["qemu-system-x86_64", "containerd", "runc", "ctr"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!("{tool} not found (scripts/setup installs it)"));
        }
    }
    None
}

/// A process: PID and start time.
type ProcId = (u32, u64);

/// What must not change when an agent's pod goes: per running domain its
/// ID, node and process; per node its dnsmasq and bridge.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// Per domain: its node, its ID and its VM process.
    domains: BTreeMap<String, (String, Option<u32>, Option<ProcId>)>,
    dnsmasq: BTreeMap<usize, Option<ProcId>>,
    bridges: BTreeMap<usize, String>,
}

async fn snapshot(nodes: &Nodes, domains: &Api<Domain>) -> Snapshot {
    let mut out = Snapshot {
        domains: BTreeMap::new(),
        dnsmasq: BTreeMap::new(),
        bridges: BTreeMap::new(),
    };
    for d in domains.list(&Default::default()).await.expect("list").items {
        let name = d.metadata.name.clone().unwrap_or_default();
        if name.starts_with("probe-") {
            continue;
        }
        let status = d.status.clone().unwrap_or_default();
        assert_eq!(status.state, Some(DomainState::Running), "{name} runs");
        let node = status.node_name.clone().expect("a node");
        let dir = match d.spec.domain_type.to_string().as_str() {
            "qemu" => Some("qemu"),
            "kvm" => Some("kvm"),
            _ => None,
        };
        let process = dir.map(|dir| {
            let uuid = d.spec.uuid.clone().expect("a UUID");
            let pidfile = nodes
                .vireo_dir(nodes.index_of(&node))
                .join(dir)
                .join("run")
                .join(uuid)
                .join("pid");
            read_pid(&pidfile).unwrap_or_else(|| panic!("{name}: no live process in {pidfile:?}"))
        });
        out.domains.insert(name, (node, status.id, process));
    }
    for i in 1..=2 {
        let pidfile = nodes.vireo_dir(i).join("network/run/lab/dnsmasq.pid");
        out.dnsmasq.insert(i, read_pid(&pidfile));
        let link = nodes.exec(i, &["ip", "-o", "link", "show", "vireo-lab0"]);
        // "7: vireo-lab0: <...>": the index names this very bridge.
        out.bridges
            .insert(i, link.split(':').next().unwrap_or_default().to_string());
    }
    out
}

/// Numbers the probe Domains of [`assert_unchanged`].
fn cluster_probe_seq() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `kubectl apply -f -` of a manifest, which must succeed.
fn apply(cluster: &Cluster, manifest: &str) {
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], manifest);
    assert!(out.status.success(), "apply: {}", text(&out.stderr));
}

/// The agent pod on `node`, once Ready: (name, image, uid).
fn agent_pod(cluster: &Cluster, node: &str) -> Option<(String, String, String)> {
    let out = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/component=agent",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list["items"].as_array()?.iter().find_map(|p| {
        let ready = p["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (ready && p["metadata"]["deletionTimestamp"].is_null()).then(|| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
    })
}

/// Through the agent's pod, as a user reaches a console on a cluster: the
/// guest's shell answers a line.
fn console_answers(cluster: &Cluster, pod: &str) {
    let token = format!("E2E-{}", std::process::id());
    let mut seen = String::new();
    for _ in 0..10 {
        let out = cluster.kubectl_stdin(
            &[
                "exec",
                "-i",
                "-n",
                NS,
                pod,
                "--",
                "vireo",
                "console",
                "default/linux",
            ],
            &format!("\necho {token}-$((6*7))\n"),
        );
        seen.push_str(&text(&out.stdout));
        if seen.contains(&format!("{token}-42")) {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("the Linux guest's console did not answer through kubectl exec {pod}:\n{seen}");
}

/// Resident memory of the processes called `comm` (largest), in MiB.
/// `vireo -c kube:/// console default/linux` from this machine: the API
/// server authorizes `domains/console` and proxies to an agent pod.
fn console_through_the_api(cluster: &Cluster) {
    let token = format!("API-{}", std::process::id());
    let mut seen = String::new();
    for _ in 0..10 {
        let out = common::vireo_as(
            &cluster.kubeconfig,
            &["-c", "kube:///", "console", "default/linux"].map(String::from),
            format!("\necho {token}-$((6*7))\n").as_bytes(),
        );
        seen.push_str(&text(&out.stdout));
        seen.push_str(&text(&out.stderr));
        if seen.contains(&format!("{token}-42")) {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("the Linux guest's console did not answer through subresources.vireo.dev:\n{seen}");
}

fn rss_mib(comm: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        {
            out.push(kib / 1024);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_on_real_nodes_runs_the_examples_and_guests_outlive_agent_pods() {
    if let Some(why) = missing() {
        if std::env::var_os("CI").is_some() {
            panic!("cluster e2e: {why}, and CI is set");
        }
        eprintln!("SKIP cluster e2e: {why}");
        return;
    }
    let started = Instant::now();
    // The image, twice: the chart's tag and the one `helm upgrade` moves to
    // (same layers, another name). Debug binaries: what the tests built.
    let image = script(&["scripts/image", "--profile", "debug"]);
    let next = script(&[
        "scripts/image",
        "--profile",
        "debug",
        "--no-build",
        "--tag",
        NEXT_TAG,
    ]);
    let guest = common::script_output("scripts/guest-image.sh", None);
    let guest_dir =
        std::env::temp_dir().join(format!("vireo-e2e-cluster-guest-{}", std::process::id()));
    let test_guest = common::script_output("vmm/guest/build.sh", Some(&guest_dir));

    let cluster = Cluster::start_bare_with("cluster", &[("VIREO_E2E_BIND_ADDRESS", "0.0.0.0")]);
    let nodes = Nodes::start(&cluster, 2);
    for tar in [&image, &next] {
        nodes.import(tar);
    }
    // What the examples boot, in each node's boot directory.
    for i in 1..=2 {
        let boot = nodes.vireo_dir(i).join("boot");
        std::fs::create_dir_all(boot.join("vireo-guest")).expect("boot dir");
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::copy(guest.join(f), boot.join("vireo-guest").join(f)).expect("guest image");
        }
        std::fs::copy(&test_guest, boot.join("test-guest.elf")).expect("test guest");
    }

    // helm install of the unchanged chart: no values at all (the image is
    // on the nodes, IfNotPresent finds it).
    let chart = repo().join("charts/vireo");
    cluster.helm_ok(&[
        "install",
        "vireo",
        chart.to_str().expect("path"),
        "--namespace",
        NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
    ]);
    eprintln!(
        "[cluster] helm install --wait done after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let client = cluster.client().await;
    let hosts: Api<Host> = Api::all(client.clone());
    wait_for(T, "both nodes' Hosts Ready with qemu and kvm", || async {
        let l = hosts.list(&Default::default()).await.ok()?;
        (l.items.len() == 2
            && l.items.iter().all(|h| {
                h.status.as_ref().is_some_and(|s| {
                    s.drivers.iter().any(|d| d == "qemu")
                        && s.drivers.iter().any(|d| d == "kvm")
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            }))
        .then_some(())
    })
    .await;
    for i in 1..=2 {
        assert!(
            agent_pod(&cluster, &nodes.name(i)).is_some(),
            "an agent pod Ready on {}",
            nodes.name(i)
        );
    }

    // The examples, and a kvm guest.
    let examples = repo().join("examples");
    cluster.kubectl_ok(&["apply", "-k", examples.to_str().expect("path")]);
    apply(
        &cluster,
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: tiny, namespace: default}\n\
         spec:\n  type: kvm\n  memory: 128Mi\n  vcpus: 1\n  os:\n    kernel: /var/lib/vireo/boot/test-guest.elf\n    cmdline: console=ttyS0\n",
    );
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    for name in ["demo", "web", "linux", "tiny"] {
        wait_for(T, &format!("domain {name} running"), || async {
            domains
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .filter(|d| d.status.as_ref().and_then(|s| s.state) == Some(DomainState::Running))
        })
        .await;
    }
    let (linux, ip) = wait_for(
        T,
        "the Linux guest's DHCP address in its status",
        || async {
            let d = domains.get_opt("linux").await.ok().flatten()?;
            let ip = d.status.as_ref()?.interfaces.first()?.ip.clone()?;
            Some((d, ip))
        },
    )
    .await;
    assert!(ip.starts_with("10.77.0."), "{ip}");
    let node = linux
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("linux is placed");
    let n = nodes.index_of(&node);
    let uuid = linux.spec.uuid.clone().expect("a UUID");
    let console_log = nodes
        .vireo_dir(n)
        .join("qemu/run")
        .join(&uuid)
        .join("console.log");
    let console = wait_for(T, "the Linux guest's set-up on its console", || async {
        std::fs::read_to_string(&console_log)
            .ok()
            .filter(|t| t.contains("VIREO-GUEST-SETUP-DONE"))
    })
    .await;
    assert!(
        console.contains(&format!("VIREO-GUEST-IP {ip}")),
        "{console}"
    );
    assert!(console.contains("VIREO-GUEST-DISK ok vda"), "{console}");
    let tiny = domains.get("tiny").await.expect("tiny");
    let tiny_node = nodes.index_of(
        tiny.status
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .expect("tiny is placed"),
    );
    let tiny_log = nodes
        .vireo_dir(tiny_node)
        .join("kvm/run")
        .join(tiny.spec.uuid.clone().expect("a UUID"))
        .join("console.log");
    wait_for(T, "the test guest's marker under vireo-vmm", || async {
        std::fs::read_to_string(&tiny_log)
            .ok()
            .filter(|t| t.contains("VIREO-TEST-GUEST-READY"))
    })
    .await;
    let (pod, first_image, _) = agent_pod(&cluster, &node).expect("the agent pod");
    console_answers(&cluster, &pod);
    // The same console from this machine through the API server, no exec:
    // the chart's APIService served by the agent pods.
    wait_for(
        T,
        "the APIService v1alpha1.subresources.vireo.dev Available",
        || async {
            let out = cluster.kubectl(&[
                "get",
                "apiservice",
                "v1alpha1.subresources.vireo.dev",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Available')].status}",
            ]);
            (text(&out.stdout).trim() == "True").then_some(())
        },
    )
    .await;
    console_through_the_api(&cluster);
    let table = cluster.kubectl_ok(&["get", "domains"]);
    assert!(
        table.contains("linux") && table.contains("running"),
        "{table}"
    );
    eprintln!(
        "[cluster] examples running after {:.1}s; RSS MiB: agents {:?}, operators {:?}",
        started.elapsed().as_secs_f64(),
        rss_mib("vireo-agent"),
        rss_mib("vireo-operator")
    );

    let before = snapshot(&nodes, &domains).await;
    assert!(
        before.dnsmasq.values().all(Option::is_some),
        "a dnsmasq per node: {before:?}"
    );

    // 1. kubectl delete pod: the DaemonSet makes a new one; nothing moves.
    let (_, _, old_uid) = agent_pod(&cluster, &node).expect("agent pod");
    cluster.kubectl_ok(&["delete", "pod", "-n", NS, &pod, "--wait=true"]);
    let (new_pod, _, _) = wait_for(T, "a new agent pod Ready", || async {
        agent_pod(&cluster, &node).filter(|(_, _, uid)| *uid != old_uid)
    })
    .await;
    eprintln!("[cluster] agent pod {pod} replaced by {new_pod}");
    assert_unchanged(&cluster, &nodes, &domains, &hosts, &node, &before).await;
    console_answers(&cluster, &new_pod);

    // 2. helm upgrade to another image tag: a rolling update of every
    // agent (and operator) pod; nothing moves either.
    cluster.helm_ok(&[
        "upgrade",
        "vireo",
        chart.to_str().expect("path"),
        "--namespace",
        NS,
        "--reuse-values",
        "--set",
        &format!("image.tag={NEXT_TAG}"),
        "--wait",
        "--timeout",
        "5m",
    ]);
    cluster.kubectl_ok(&[
        "rollout",
        "status",
        "daemonset/vireo-agent",
        "-n",
        NS,
        "--timeout=300s",
    ]);
    for i in 1..=2 {
        let name = nodes.name(i);
        let (_, image, _) = wait_for(T, "the upgraded agent pod Ready", || async {
            agent_pod(&cluster, &name).filter(|(_, image, _)| image.ends_with(NEXT_TAG))
        })
        .await;
        assert_ne!(image, first_image);
    }
    assert_unchanged(&cluster, &nodes, &domains, &hosts, &node, &before).await;
    let (pod, _, _) = agent_pod(&cluster, &node).expect("agent pod");
    console_answers(&cluster, &pod);
    eprintln!(
        "[cluster] pod replacement and upgrade kept every guest, after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // 3. helm uninstall: the pre-delete hook destroys the guests and takes
    // the networks down while the agents still run; nothing is left.
    cluster.helm_ok(&[
        "uninstall",
        "vireo",
        "--namespace",
        NS,
        "--wait",
        "--timeout",
        "5m",
    ]);
    assert!(
        domains
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .is_empty(),
        "no Domain is left"
    );
    for i in 1..=2 {
        for comm in ["qemu-system", "vireo-vmm", "dnsmasq", "vireo-agent"] {
            let left = nodes.procs(i, comm);
            assert!(left.is_empty(), "{comm} left on node {i}: {left:?}");
        }
        let links = nodes.exec(i, &["ip", "-br", "link"]);
        assert!(
            !links.contains("vireo-lab0") && !links.contains("vt"),
            "a bridge or tap left on node {i}: {links}"
        );
    }
    for (kind, name) in [
        ("daemonset", "vireo-agent"),
        ("deployment", "vireo-operator"),
    ] {
        let left = cluster.kubectl_ok(&[
            "get",
            kind,
            name,
            "-n",
            NS,
            "--ignore-not-found",
            "-o",
            "name",
        ]);
        assert!(left.trim().is_empty(), "{kind} {name} left");
    }
    let _ = std::fs::remove_dir_all(&guest_dir);
    eprintln!(
        "[cluster] uninstalled clean; whole test {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// After an agent pod on `node` was replaced: the same guests, processes,
/// IDs, dnsmasq and bridges, and the new pod writes status again.
async fn assert_unchanged(
    kubectl: &Cluster,
    nodes: &Nodes,
    domains: &Api<Domain>,
    hosts: &Api<Host>,
    node: &str,
    before: &Snapshot,
) {
    // The old pod is gone: the node's Host is Ready again, and the new
    // pod writes the guests' status (their CPU time moves on).
    wait_for(T, "the node's Host Ready again", || async {
        let h = hosts.get(node).await.ok()?;
        h.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    // The new pod runs the node: a new Domain pinned to it starts, its
    // status written by that pod.
    let probe = format!("probe-{}", cluster_probe_seq());
    let manifest = format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: {probe}, namespace: default}}\n\
         spec:\n  type: test\n  memory: 64Mi\n  vcpus: 1\n  nodeSelector: {{vireo.dev/node: {node}}}\n"
    );
    apply(kubectl, &manifest);
    wait_for(T, &format!("{probe} running on {node}"), || async {
        let d = domains.get_opt(&probe).await.ok().flatten()?;
        let s = d.status?;
        (s.state == Some(DomainState::Running) && s.node_name.as_deref() == Some(node))
            .then_some(())
    })
    .await;
    let after = snapshot(nodes, domains).await;
    assert_eq!(&after, before, "guests, IDs, dnsmasq and bridges unchanged");
}
