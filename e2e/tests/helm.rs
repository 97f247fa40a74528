//! The Helm chart `charts/vireo`: it lints and renders, and on a real
//! kube-apiserver it installs, its RBAC is enough for the operator and the
//! agents (run as processes with the ServiceAccount tokens the chart
//! created) and no more, an agent cannot write another node's objects, and
//! it upgrades and uninstalls.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{Cluster, repo, tools_bin, wait_for};
use serde_json::Value;

const NS: &str = "vireo-system";
const RELEASE: &str = "vireo";
const POLICY: &str = "vireo-agent-node-scope";
const AGENT_SA: &str = "vireo-agent";
const OPERATOR_SA: &str = "vireo-operator";

fn chart() -> String {
    repo().join("charts/vireo").display().to_string()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm` from the e2e tools, without a cluster.
fn helm(args: &[&str]) -> Output {
    let home = std::env::temp_dir().join(format!("vireo-helm-home-{}", std::process::id()));
    std::process::Command::new(tools_bin().join("helm"))
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(repo())
        .output()
        .expect("helm runs")
}

/// `helm template` of the chart into vireo-system with extra arguments, as
/// one JSON value per rendered object.
fn render(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec!["template", RELEASE, chart.as_str(), "--namespace", NS];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(out.status.success(), "helm template failed: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in stdout.lines().chain(std::iter::once("---")) {
        if line.starts_with("---") {
            if current
                .lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                let doc: Value = serde_yaml_ng::from_str(&current)
                    .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{current}"));
                docs.push(doc);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// The rules of a rendered (Cluster)Role as (apiGroup, resource, verb, resourceNames) tuples.
fn grants(role: &Value) -> Vec<(String, String, String, Vec<String>)> {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in role["rules"].as_array().expect("rules") {
        let names = strs(&rule["resourceNames"]);
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    out.push((g.clone(), r.clone(), v, names.clone()));
                }
            }
        }
    }
    out
}

fn allows(role: &Value, group: &str, resource: &str, verb: &str) -> bool {
    grants(role)
        .iter()
        .any(|(g, r, v, _)| g == group && r == resource && v == verb)
}

#[test]
fn chart_lints_and_renders() {
    let chart = chart();
    let out = helm(&["lint", "--strict", &chart, "--namespace", NS]);
    assert!(out.status.success(), "helm lint failed: {}", text(&out));
    assert!(
        text(&out).contains("0 chart(s) failed"),
        "helm lint: {}",
        text(&out)
    );

    let docs = render(&[]);
    for (kind, name) in [
        ("ServiceAccount", OPERATOR_SA),
        ("ServiceAccount", AGENT_SA),
        ("ClusterRole", "vireo-operator"),
        ("ClusterRoleBinding", "vireo-operator"),
        ("Role", "vireo-operator"),
        ("RoleBinding", "vireo-operator"),
        ("ClusterRole", "vireo-agent"),
        ("ClusterRoleBinding", "vireo-agent"),
        ("Role", "vireo-agent"),
        ("RoleBinding", "vireo-agent"),
        ("Deployment", "vireo-operator"),
        ("DaemonSet", "vireo-agent"),
        ("Service", "vireo-operator-metrics"),
        ("Service", "vireo-agent-metrics"),
        ("ValidatingAdmissionPolicy", POLICY),
        ("ValidatingAdmissionPolicyBinding", POLICY),
        ("FlowSchema", "vireo-leases"),
        ("FlowSchema", "vireo-controllers"),
        ("PriorityLevelConfiguration", "vireo"),
    ] {
        find(&docs, kind, name);
    }

    // Least privilege, as rendered: nobody deletes, the operator never
    // writes Hosts' or Networks' main resources, Leases only in vireo-system.
    for name in ["vireo-operator", "vireo-agent"] {
        let role = find(&docs, "ClusterRole", name);
        for (g, r, v, _) in grants(role) {
            assert!(
                ![
                    "delete",
                    "deletecollection",
                    "*",
                    "update",
                    "escalate",
                    "bind"
                ]
                .contains(&v.as_str()),
                "{name} ClusterRole grants {v} on {g}/{r}"
            );
            // The one exception: the agent reads the cloud-init keys a
            // Domain names, by name (get, never list or watch).
            let cloud_init_key = name == "vireo-agent"
                && g.is_empty()
                && (r == "secrets" || r == "configmaps")
                && v == "get";
            // And it asks whether the user the API server's front proxy
            // names may open a console or a transfer (subresources.vireo.dev).
            // And forwards to another node's agent, which checks the
            // forwarding agent's token and its `proxy` permission.
            let access_review = name == "vireo-agent"
                && ((g == "authorization.k8s.io" && r == "subjectaccessreviews" && v == "create")
                    || (g == "authentication.k8s.io" && r == "tokenreviews" && v == "create")
                    || (g == "subresources.vireo.dev"
                        && (r == "domains" || r == "storagevols")
                        && v == "proxy"));
            // And the operator reads Nodes, to drain the Host of a
            // cordoned one (operator.drainOnCordon).
            let nodes_read = name == "vireo-operator"
                && g.is_empty()
                && r == "nodes"
                && ["get", "list", "watch"].contains(&v.as_str());
            assert!(
                g == "vireo.dev"
                    || (g == "events.k8s.io" && r == "events")
                    || cloud_init_key
                    || access_review
                    || nodes_read,
                "{name} ClusterRole reaches outside Vireo: {g}/{r} ({v})"
            );
        }
        let role = find(&docs, "Role", name);
        assert_eq!(role["metadata"]["namespace"], NS);
        for (g, r, _, _) in grants(role) {
            assert_eq!((g.as_str(), r.as_str()), ("coordination.k8s.io", "leases"));
        }
    }
    // The one identity that deletes: the pre-delete hook of `helm
    // uninstall`, for Domains and Networks only (volumes are data), and only
    // while the uninstall runs.
    let hook = find(&docs, "ClusterRole", "vireo-uninstall");
    assert_eq!(
        hook["metadata"]["annotations"]["helm.sh/hook"],
        "pre-delete"
    );
    for (g, r, v, _) in grants(hook) {
        assert_eq!(g, "vireo.dev");
        assert!(
            r == "domains" || r == "networks",
            "uninstall hook reaches {r}"
        );
        assert!(v == "list" || v == "delete", "uninstall hook may {v} {r}");
    }
    let job = find(&docs, "Job", "vireo-uninstall");
    assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "pre-delete");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["command"][1],
        "uninstall"
    );
    let off = render(&["--set", "uninstall.cleanup=false"]);
    assert!(
        !off.iter().any(|d| d["kind"] == "Job"),
        "cleanup=false renders no Job"
    );

    // Priority and fairness: both ServiceAccounts, their Leases at
    // leader-election and the rest at Vireo's own level, before the built-in
    // `service-accounts` schema (9000) and after the system's (up to 900).
    let subjects = serde_json::json!([
        {"kind": "ServiceAccount", "serviceAccount": {"name": OPERATOR_SA, "namespace": NS}},
        {"kind": "ServiceAccount", "serviceAccount": {"name": AGENT_SA, "namespace": NS}},
    ]);
    for (name, level, precedence) in [
        ("vireo-leases", "leader-election", 1000),
        ("vireo-controllers", "vireo", 1001),
    ] {
        let fs = find(&docs, "FlowSchema", name);
        assert_eq!(fs["spec"]["priorityLevelConfiguration"]["name"], level);
        assert_eq!(fs["spec"]["matchingPrecedence"], precedence);
        assert_eq!(
            fs["spec"]["rules"][0]["subjects"], subjects,
            "{name}'s subjects"
        );
    }
    let leases = find(&docs, "FlowSchema", "vireo-leases");
    assert_eq!(
        leases["spec"]["rules"][0]["resourceRules"][0]["resources"][0],
        "leases"
    );
    let off = render(&["--set", "flowControl.enabled=false"]);
    assert!(
        !off.iter().any(|d| d["kind"] == "FlowSchema"),
        "flowControl.enabled=false renders no FlowSchema"
    );
    assert!(
        !off.iter()
            .any(|d| d["kind"] == "PriorityLevelConfiguration"),
        "flowControl.enabled=false renders no priority level"
    );
    let level = find(&docs, "PriorityLevelConfiguration", "vireo");
    assert_eq!(level["spec"]["type"], "Limited");
    assert_eq!(level["spec"]["limited"]["nominalConcurrencyShares"], 40);

    let operator = find(&docs, "ClusterRole", "vireo-operator");
    assert!(allows(operator, "vireo.dev", "domains", "patch"));
    assert!(!allows(operator, "vireo.dev", "hosts", "patch"));
    assert!(!allows(
        operator,
        "vireo.dev",
        "storagevols/status",
        "patch"
    ));
    let lease_writes: Vec<_> = grants(find(&docs, "Role", "vireo-operator"))
        .into_iter()
        .filter(|(_, _, v, _)| v == "patch" || v == "update")
        .collect();
    assert!(
        lease_writes
            .iter()
            .all(|(_, _, _, names)| names == &["vireo-operator".to_string()]),
        "the operator writes only its leader Lease: {lease_writes:?}"
    );
    let agent = find(&docs, "ClusterRole", "vireo-agent");
    assert!(allows(agent, "vireo.dev", "hosts", "create"));
    assert!(!allows(agent, "vireo.dev", "domains", "create"));
    // cloud-init keys by name only: never a list or watch of Secrets.
    assert!(allows(agent, "", "secrets", "get"));
    assert!(!allows(agent, "", "secrets", "list"));
    assert!(!allows(agent, "", "secrets", "watch"));
    assert!(!allows(operator, "", "secrets", "get"));

    // kubectl drain drains Hosts by default (the cordon); off, no Nodes.
    assert!(allows(operator, "", "nodes", "watch"));
    let deploy = find(&docs, "Deployment", "vireo-operator");
    let args = deploy["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--drain-on-cordon"), "{args}");
    let no_cordon = render(&["--set", "operator.drainOnCordon=false"]);
    assert!(!allows(
        find(&no_cordon, "ClusterRole", "vireo-operator"),
        "",
        "nodes",
        "watch"
    ));
    let off_args =
        find(&no_cordon, "Deployment", "vireo-operator")["spec"]["template"]["spec"]["containers"]
            [0]["args"]
            .to_string();
    assert!(!off_args.contains("--drain-on-cordon"), "{off_args}");

    assert_eq!(deploy["spec"]["replicas"], 2);
    let args = deploy["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        !args.contains("--no-leader-election"),
        "two replicas elect a leader: {args}"
    );
    assert_eq!(
        deploy["spec"]["template"]["spec"]["serviceAccountName"],
        OPERATOR_SA
    );

    let ds = find(&docs, "DaemonSet", "vireo-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], AGENT_SA);
    assert_eq!(pod["hostNetwork"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);
    let node_env = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_env["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let volumes = pod["volumes"].to_string();
    assert!(volumes.contains("\"/dev/kvm\""), "{volumes}");
    assert!(volumes.contains("\"/var/lib/vireo\""), "{volumes}");
    for want in [
        "--state-dir=/var/lib/vireo",
        "--host-root=/host",
        "--boot-dir=/var/lib/vireo/boot",
    ] {
        assert!(
            container["args"].to_string().contains(want),
            "{want} not in {}",
            container["args"]
        );
    }
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["hostPath"]["path"] == "/"),
        "the node's root is mounted for --host-root: {volumes}"
    );

    let vap = find(&docs, "ValidatingAdmissionPolicy", POLICY);
    assert_eq!(vap["apiVersion"], "admissionregistration.k8s.io/v1");
    assert!(
        vap["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .is_some_and(|e| e.contains("system:serviceaccount:vireo-system:vireo-agent")),
        "{}",
        vap["spec"]["matchConditions"]
    );

    // Values reach the objects.
    let docs = render(&[
        "--set",
        "operator.replicas=3",
        "--set",
        "agent.drivers.kvm.enabled=false",
        "--set",
        "agent.stateDir=/srv/vireo",
        "--set",
        "agent.labels.zone=a",
        "--set",
        "metrics.agent.port=9200",
        "--set",
        "image.repository=registry.example/vireo",
        "--set",
        "image.tag=v9",
    ]);
    assert_eq!(
        find(&docs, "Deployment", "vireo-operator")["spec"]["replicas"],
        3
    );
    let ds = find(&docs, "DaemonSet", "vireo-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert!(!pod["volumes"].to_string().contains("/dev/kvm"));
    let args = pod["containers"][0]["args"].to_string();
    for want in [
        "--state-dir=/srv/vireo",
        "--label=zone=a",
        "--metrics-addr=0.0.0.0:9200",
    ] {
        assert!(args.contains(want), "{want} not in {args}");
    }
    assert_eq!(pod["containers"][0]["image"], "registry.example/vireo:v9");

    // The binaries keep their Leases in vireo-system: the chart says so
    // rather than install somewhere else.
    let out = helm(&["template", RELEASE, &chart, "--namespace", "default"]);
    assert!(!out.status.success(), "rendered into namespace default");
    assert!(text(&out).contains("vireo-system"), "{}", text(&out));
    // Two operators without an election would both place Domains.
    let out = helm(&[
        "template",
        RELEASE,
        &chart,
        "--namespace",
        NS,
        "--set",
        "operator.leaderElection.enabled=false",
    ]);
    assert!(!out.status.success(), "2 replicas without leader election");
}

/// Whether the cluster's kube-apiserver was started with --allow-privileged=true.
fn apiserver_allows_privileged(cluster: &Cluster) -> bool {
    let pid = cluster
        .env
        .get("APISERVER_PID")
        .expect("APISERVER_PID in the cluster env");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("kube-apiserver's cmdline");
    String::from_utf8_lossy(&cmdline)
        .split('\0')
        .any(|a| a == "--allow-privileged=true" || a == "--allow-privileged")
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A stand-in for the agent's DaemonSet pod on `node`: no kubelet runs it,
/// but it is scheduled there (spec.nodeName), which is what a token bound
/// to it carries.
fn stand_in_pod(cluster: &Cluster, node: &str) -> String {
    let name = format!("vireo-agent-{node}");
    let pod = format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"{NS}"}},
"spec":{{"nodeName":"{node}","serviceAccountName":"{AGENT_SA}",
"containers":[{{"name":"agent","image":"vireo:0.1.0"}}]}}}}"#
    );
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &pod);
    assert!(out.status.success(), "stand-in pod: {}", text(&out));
    name
}

fn token(cluster: &Cluster, sa: &str, bound_pod: Option<&str>) -> String {
    let mut args = vec!["create", "token", sa, "-n", NS, "--duration", "2h"];
    if let Some(pod) = bound_pod {
        args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
    }
    cluster.kubectl_ok(&args).trim().to_string()
}

/// The UID of the FlowSchema the API server put a request under: the
/// `X-Kubernetes-PF-FlowSchema-UID` header of the response to the first
/// request whose URL path ends in `path`, from kubectl's log at `-v=8` (kubectl
/// may send others, e.g. discovery, or a look at the namespace after a 404).
fn flow_schema_of(cluster: &Cluster, kubeconfig: &Path, args: &[&str], path: &str) -> String {
    const HEADER: &str = "x-kubernetes-pf-flowschema-uid";
    let mut all = args.to_vec();
    all.push("-v=8");
    let said = text(&cluster.kubectl_as(kubeconfig, &all));
    let (exact, query) = (format!("{path}\""), format!("{path}?"));
    said.lines()
        .skip_while(|l| !(l.contains("\"Request\"") && (l.contains(&exact) || l.contains(&query))))
        .find_map(|l| {
            let at = l.to_ascii_lowercase().find(HEADER)?;
            let value = l[at + HEADER.len()..].trim_start_matches([':', ' ', '\t', '"']);
            let uid: String = value
                .chars()
                .take_while(|c| c.is_ascii_hexdigit() || *c == '-')
                .collect();
            (!uid.is_empty()).then_some(uid)
        })
        .unwrap_or_else(|| {
            panic!(
                "kubectl {}: no FlowSchema header in: {said}",
                args.join(" ")
            )
        })
}

/// Runs kubectl as another identity and expects a refusal mentioning all of `words`.
fn refused(cluster: &Cluster, kubeconfig: &Path, args: &[&str], words: &[&str]) {
    let out = cluster.kubectl_as(kubeconfig, args);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "kubectl {} was allowed: {said}",
        args.join(" ")
    );
    for w in words {
        assert!(
            said.contains(w),
            "kubectl {}: refusal without {w:?}: {said}",
            args.join(" ")
        );
    }
}

/// Runs kubectl as another identity with standard input.
fn kubectl_as_stdin(kubeconfig: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(tools_bin().join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
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

fn domain_manifest(name: &str, node: &str) -> String {
    format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: test\n  memory: 512Mi\n  vcpus: 1\n  nodeSelector:\n    vireo.dev/node: {node}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_runs_vireo_with_its_own_rbac_and_uninstalls() {
    let mut cluster = Cluster::start_bare("helm");
    let chart = chart();

    // The harness's API server may run without --allow-privileged (the
    // default is false), and then refuses the agent's privileged container.
    // The chart's default is privileged; only here is it turned off.
    let privileged = apiserver_allows_privileged(&cluster);
    let mut values: Vec<&str> = Vec::new();
    if !privileged {
        eprintln!(
            "[e2e] the test kube-apiserver runs without --allow-privileged: installing with agent.privileged=false"
        );
        values.extend(["--set", "agent.privileged=false"]);
    }

    // Install: the CRDs come from the chart's crds/ directory.
    let mut args = vec![
        "install",
        RELEASE,
        &chart,
        "--namespace",
        NS,
        "--create-namespace",
    ];
    args.extend_from_slice(&values);
    cluster.helm_ok(&args);
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/domains.vireo.dev",
        "crd/hosts.vireo.dev",
        "crd/networks.vireo.dev",
        "crd/storagepools.vireo.dev",
        "crd/storagevols.vireo.dev",
        "--timeout=60s",
    ]);
    let deploy = json(&cluster.kubectl_ok(&[
        "get",
        "deployment",
        "vireo-operator",
        "-n",
        NS,
        "-o",
        "json",
    ]));
    assert_eq!(deploy["spec"]["replicas"], 2);
    cluster.kubectl_ok(&["get", "daemonset", "vireo-agent", "-n", NS]);
    cluster.kubectl_ok(&["get", "validatingadmissionpolicy", POLICY]);

    // Identities: the operator's token, and one per agent bound to a pod on its node.
    let operator_kc = cluster.token_kubeconfig("operator", &token(&cluster, OPERATOR_SA, None));
    let mut agent_kc: Vec<PathBuf> = Vec::new();
    for node in ["node-1", "node-2"] {
        let pod = stand_in_pod(&cluster, node);
        let kc = cluster.token_kubeconfig(
            &format!("agent-{node}"),
            &token(&cluster, AGENT_SA, Some(&pod)),
        );
        // The API server puts the pod's node into the user's extra info.
        let me = json(&String::from_utf8_lossy(
            &cluster
                .kubectl_as(&kc, &["auth", "whoami", "-o", "json"])
                .stdout,
        ));
        assert_eq!(
            me["status"]["userInfo"]["username"],
            format!("system:serviceaccount:{NS}:{AGENT_SA}")
        );
        assert_eq!(
            me["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"],
            serde_json::json!([node]),
            "{me}"
        );
        agent_kc.push(kc);
    }
    let unbound_kc = cluster.token_kubeconfig("agent-unbound", &token(&cluster, AGENT_SA, None));

    // Priority and fairness: the API server queues both identities under the
    // chart's FlowSchemas (Leases apart), not `service-accounts`.
    let schema_uid = |name: &str| {
        cluster
            .kubectl_ok(&["get", "flowschema", name, "-o", "jsonpath={.metadata.uid}"])
            .trim()
            .to_string()
    };
    let (leases_fs, controllers_fs) = (schema_uid("vireo-leases"), schema_uid("vireo-controllers"));
    assert!(!leases_fs.is_empty() && leases_fs != controllers_fs);
    // The API server found the priority level each schema names.
    for name in ["vireo-leases", "vireo-controllers"] {
        let what = format!("FlowSchema {name} to find its priority level");
        let dangling = wait_for(Duration::from_secs(30), &what, || async {
            let s = cluster.kubectl_ok(&[
                "get",
                "flowschema",
                name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Dangling\")].status}",
            ]);
            (!s.trim().is_empty()).then(|| s.trim().to_string())
        })
        .await;
        assert_eq!(dangling, "False", "FlowSchema {name} dangles");
    }
    for kc in [&operator_kc, &agent_kc[0]] {
        assert_eq!(
            flow_schema_of(&cluster, kc, &["get", "domains", "-A"], "/domains"),
            controllers_fs,
            "{}: a Domain list is not under vireo-controllers",
            kc.display()
        );
        assert_eq!(
            flow_schema_of(
                &cluster,
                kc,
                &["get", "lease", "vireo-operator", "-n", NS],
                "/leases/vireo-operator"
            ),
            leases_fs,
            "{}: a Lease request is not under vireo-leases",
            kc.display()
        );
    }

    // Vireo as the chart deploys it: two operators electing a leader, one agent per node.
    for name in ["operator-a", "operator-b"] {
        let p =
            cluster.operator_with_kubeconfig(name, &operator_kc, &["--leader-lease-seconds", "4"]);
        cluster.hold(p);
    }
    for (node, kc) in ["node-1", "node-2"].iter().zip(&agent_kc) {
        let p = cluster.agent_with_kubeconfig(node, kc, &[]);
        cluster.hold(p);
    }
    let client = cluster.client().await;
    common::ready_hosts(&client, 2).await;

    // A test Domain on each node converges to running.
    for (name, node) in [("demo-1", "node-1"), ("demo-2", "node-2")] {
        let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &domain_manifest(name, node));
        assert!(out.status.success(), "apply {name}: {}", text(&out));
    }
    for (name, node) in [("demo-1", "node-1"), ("demo-2", "node-2")] {
        let c = &cluster;
        wait_for(
            Duration::from_secs(60),
            &format!("{name} running on {node}\n{}", cluster.logs()),
            || async move {
                let out = c.kubectl(&["get", "domain", name, "-n", "default", "-o", "json"]);
                let d: Value = serde_json::from_slice(&out.stdout).ok()?;
                (d["status"]["state"] == "running"
                    && d["status"]["nodeName"] == node
                    && d["metadata"]["labels"]["vireo.dev/node"] == node
                    && d["status"]["id"].is_number())
                .then_some(())
            },
        )
        .await;
    }
    // Shared objects: a Network and a StoragePool are realized on both
    // nodes (each agent adds its own finalizer and status entry), and a
    // volume pinned to node-2 is bound and created there.
    for file in ["examples/test-network.yaml", "examples/test-pool.yaml"] {
        cluster.kubectl_ok(&["apply", "-f", &repo().join(file).display().to_string()]);
    }
    let out = cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: pinned, namespace: default}\nspec: {pool: images, capacity: 1Gi, nodeName: node-2}\n",
    );
    assert!(out.status.success(), "apply pinned: {}", text(&out));
    {
        let c = &cluster;
        wait_for(
            Duration::from_secs(60),
            &format!(
                "lab and images on both nodes, pinned Ready\n{}",
                cluster.logs()
            ),
            || async move {
                let get = |args: &[&str]| -> Option<Value> {
                    serde_json::from_slice(&c.kubectl(args).stdout).ok()
                };
                let net = get(&["get", "network", "lab", "-o", "json"])?;
                let pool = get(&["get", "storagepool", "images", "-o", "json"])?;
                let vol = get(&["get", "storagevol", "pinned", "-n", "default", "-o", "json"])?;
                let count = |v: &Value, f: &dyn Fn(&Value) -> bool| {
                    v["status"]["nodes"]
                        .as_array()
                        .map(|a| a.iter().filter(|e| f(e)).count())
                        .unwrap_or(0)
                };
                (count(&net, &|e| e["active"] == true) == 2
                    && count(&pool, &|e| e["state"] == "running") == 2
                    // Each node's, and the operator's in-use protection.
                    && net["metadata"]["finalizers"].as_array().map(Vec::len) == Some(3)
                    && vol["status"]["phase"] == "Ready"
                    && vol["metadata"]["labels"]["vireo.dev/node"] == "node-2")
                    .then_some(())
            },
        )
        .await;
    }
    // The leader holds its Lease; the agents' Events were published.
    let lease =
        json(&cluster.kubectl_ok(&["get", "lease", "vireo-operator", "-n", NS, "-o", "json"]));
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_some_and(|h| !h.is_empty()),
        "{lease}"
    );
    let events =
        cluster.kubectl_ok(&["get", "events.events.k8s.io", "-n", "default", "-o", "json"]);
    assert!(
        json(&events)["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["reportingController"] == "vireo-agent")),
        "no Event by vireo-agent: {events}"
    );
    // Nothing was refused along the way: the roles grant what Vireo does.
    for name in ["operator-a", "operator-b", "node-1", "node-2"] {
        let log = cluster.proc(name).log_text();
        assert!(
            !log.contains("forbidden") && !log.contains("Forbidden"),
            "{name} was refused something:\n{log}"
        );
    }

    let a1 = &agent_kc[0];
    // Its own node's objects: allowed.
    let out = cluster.kubectl_as(
        a1,
        &[
            "annotate",
            "lease",
            "node-1",
            "-n",
            NS,
            "e2e.vireo.dev/checked=yes",
            "--overwrite",
        ],
    );
    assert!(out.status.success(), "own Lease: {}", text(&out));
    // Status is written with server-side apply, as the agent does: allowed
    // on its own node's Domain (the same value, so nothing changes)...
    let status = |name: &str| {
        format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata:\n  name: {name}\n  namespace: default\nstatus:\n  state: running\n"
        )
    };
    let apply_status = [
        "apply",
        "--server-side",
        "--subresource=status",
        "--field-manager=e2e",
        "-f",
        "-",
    ];
    let out = kubectl_as_stdin(a1, &apply_status, &status("demo-1"));
    assert!(out.status.success(), "own Domain status: {}", text(&out));
    // ...and refused by the policy on another node's Domain, Host, Lease.
    let out = kubectl_as_stdin(a1, &apply_status, &status("demo-2"));
    assert!(
        !out.status.success(),
        "the agent of node-1 wrote demo-2's status: {}",
        text(&out)
    );
    for w in [
        POLICY,
        "node node-1",
        "domains/status default/demo-2",
        "belongs to node node-2",
    ] {
        assert!(
            text(&out).contains(w),
            "refusal without {w:?}: {}",
            text(&out)
        );
    }
    refused(
        &cluster,
        a1,
        &[
            "patch",
            "domain",
            "demo-2",
            "-n",
            "default",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/metadata/finalizers/-","value":"e2e.vireo.dev/x"}]"#,
        ],
        &[POLICY, "belongs to node node-2"],
    );
    // Nor may it take a Domain over by relabelling it.
    refused(
        &cluster,
        a1,
        &[
            "label",
            "domain",
            "demo-2",
            "-n",
            "default",
            "vireo.dev/node=node-1",
            "--overwrite",
        ],
        &[POLICY, "belongs to node node-2"],
    );
    refused(
        &cluster,
        a1,
        &["label", "host", "node-2", "e2e.vireo.dev/x=y"],
        &[POLICY, "belongs to node node-2"],
    );
    let host = "apiVersion: vireo.dev/v1alpha1\nkind: Host\nmetadata:\n  name: node-9\nspec: {}\n";
    let out = kubectl_as_stdin(
        a1,
        &["apply", "--server-side", "--field-manager=e2e", "-f", "-"],
        host,
    );
    assert!(!out.status.success(), "agent of node-1 created Host node-9");
    assert!(text(&out).contains(POLICY), "{}", text(&out));
    refused(
        &cluster,
        a1,
        &["annotate", "lease", "node-2", "-n", NS, "e2e.vireo.dev/x=y"],
        &[POLICY, "belongs to node node-2"],
    );
    refused(
        &cluster,
        a1,
        &[
            "annotate",
            "lease",
            "vireo-operator",
            "-n",
            NS,
            "e2e.vireo.dev/x=y",
        ],
        &[POLICY],
    );
    // Another node's finalizer on a shared Network, and another node's volume.
    let net = json(&cluster.kubectl_ok(&["get", "network", "lab", "-o", "json"]));
    let theirs = net["metadata"]["finalizers"]
        .as_array()
        .and_then(|a| a.iter().position(|f| f == "node.vireo.dev/node-2"))
        .expect("node-2's finalizer on lab");
    let remove = format!(r#"[{{"op":"remove","path":"/metadata/finalizers/{theirs}"}}]"#);
    refused(
        &cluster,
        a1,
        &["patch", "network", "lab", "--type=json", "-p", &remove],
        &[
            POLICY,
            "may change only its own finalizer and status entry of networks lab",
        ],
    );
    refused(
        &cluster,
        a1,
        &[
            "annotate",
            "storagevol",
            "pinned",
            "-n",
            "default",
            "e2e.vireo.dev/x=y",
        ],
        &[POLICY, "belongs to node node-2"],
    );
    // A token of the agents' ServiceAccount that names no node writes nothing.
    refused(
        &cluster,
        &unbound_kc,
        &[
            "annotate",
            "lease",
            "node-1",
            "-n",
            NS,
            "e2e.vireo.dev/x=y",
            "--overwrite",
        ],
        &[POLICY, "without a node"],
    );
    // And what RBAC does not grant at all.
    refused(
        &cluster,
        a1,
        &[
            "delete",
            "domain",
            "demo-1",
            "-n",
            "default",
            "--wait=false",
        ],
        &["forbidden", "cannot delete"],
    );
    refused(
        &cluster,
        &operator_kc,
        &["get", "secrets", "-n", NS],
        &["forbidden"],
    );
    // Deleting the Network: each agent tears its copy down and releases only
    // its own finalizer, under the policy.
    cluster.kubectl_ok(&["delete", "network", "lab", "--wait=false"]);
    {
        let c = &cluster;
        wait_for(
            Duration::from_secs(60),
            &format!("lab torn down on both nodes and gone\n{}", cluster.logs()),
            || async move {
                let out = c.kubectl(&["get", "network", "lab", "--ignore-not-found", "-o", "name"]);
                (out.status.success() && out.stdout.is_empty()).then_some(())
            },
        )
        .await;
    }
    // The other agent still runs its Domain, untouched.
    let d = json(&cluster.kubectl_ok(&["get", "domain", "demo-2", "-n", "default", "-o", "json"]));
    assert_eq!(d["status"]["state"], "running", "{d}");

    // Upgrade with changed values: applied to the objects.
    let mut args = vec![
        "upgrade",
        RELEASE,
        &chart,
        "--namespace",
        NS,
        "--set",
        "operator.replicas=3",
        "--set",
        "commonLabels.e2e\\.vireo\\.dev/upgraded=yes",
    ];
    args.extend_from_slice(&values);
    cluster.helm_ok(&args);
    let deploy = json(&cluster.kubectl_ok(&[
        "get",
        "deployment",
        "vireo-operator",
        "-n",
        NS,
        "-o",
        "json",
    ]));
    assert_eq!(deploy["spec"]["replicas"], 3, "{deploy}");
    let role = json(&cluster.kubectl_ok(&["get", "clusterrole", "vireo-agent", "-o", "json"]));
    assert_eq!(
        role["metadata"]["labels"]["e2e.vireo.dev/upgraded"], "yes",
        "{role}"
    );
    let history = cluster.helm_ok(&["history", RELEASE, "--namespace", NS]);
    assert!(history.lines().count() >= 3, "two revisions: {history}");
    // Vireo kept working through the upgrade: a new Domain still runs.
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &domain_manifest("demo-3", "node-1"));
    assert!(out.status.success(), "apply demo-3: {}", text(&out));
    {
        let c = &cluster;
        wait_for(
            Duration::from_secs(60),
            &format!("demo-3 running after the upgrade\n{}", cluster.logs()),
            || async move {
                let out = c.kubectl(&["get", "domain", "demo-3", "-n", "default", "-o", "json"]);
                let d: Value = serde_json::from_slice(&out.stdout).ok()?;
                (d["status"]["state"] == "running").then_some(())
            },
        )
        .await;
    }

    // Uninstall: the chart's objects go; the CRDs (and so the VMs' objects)
    // stay, as Helm keeps what crds/ installed.
    cluster.procs_clear();
    // No kubelet runs the pre-delete hook Job here (tests/cluster.rs runs
    // it on real nodes), so the hooks are skipped.
    cluster.helm_ok(&["uninstall", RELEASE, "--namespace", NS, "--no-hooks"]);
    for (kind, name, ns) in [
        ("deployment", "vireo-operator", Some(NS)),
        ("daemonset", "vireo-agent", Some(NS)),
        ("serviceaccount", AGENT_SA, Some(NS)),
        ("clusterrole", "vireo-operator", None),
        ("clusterrole", "vireo-agent", None),
        ("validatingadmissionpolicy", POLICY, None),
        ("validatingadmissionpolicybinding", POLICY, None),
    ] {
        let mut args = vec!["get", kind, name, "--ignore-not-found", "-o", "name"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let left = cluster.kubectl_ok(&args);
        assert!(left.trim().is_empty(), "{kind} {name} left after uninstall");
    }
    cluster.kubectl_ok(&["get", "crd", "domains.vireo.dev"]);
    cluster.kubectl_ok(&["get", "domain", "demo-1", "-n", "default"]);
    // The agents' credentials are worth nothing now.
    let out = cluster.kubectl_as(
        a1,
        &[
            "annotate",
            "lease",
            "node-1",
            "-n",
            NS,
            "e2e.vireo.dev/after=yes",
            "--overwrite",
        ],
    );
    assert!(
        !out.status.success(),
        "agent token still writes after uninstall"
    );
}

/// The agents' aggregated API (subresources.vireo.dev) and the user roles
/// render: an APIService whose caBundle signed the agents' serving
/// certificate, the agents' flag, port and mounted Secret, their delegation
/// bindings, and vireo-viewer/user/admin aggregated into view/edit/admin.
#[test]
fn chart_renders_the_subresources_api_and_user_roles() {
    let docs = render(&[]);
    let api = find(&docs, "APIService", "v1alpha1.subresources.vireo.dev");
    assert_eq!(api["spec"]["group"], "subresources.vireo.dev");
    assert_eq!(api["spec"]["version"], "v1alpha1");
    assert_eq!(api["spec"]["service"]["namespace"], NS);
    let svc_name = api["spec"]["service"]["name"].as_str().expect("service");
    let svc = find(&docs, "Service", svc_name);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "subresources");
    let ca_bundle = api["spec"]["caBundle"].as_str().expect("caBundle");
    let secret = find(&docs, "Secret", &format!("{RELEASE}-subresources-tls"));
    assert_eq!(secret["data"]["ca.crt"], ca_bundle);

    // The bundle's CA signed the serving certificate, for the Service's name.
    let dir = std::env::temp_dir().join(format!("vireo-helm-subresources-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let decode = |b64: &str, file: &str| {
        let path = dir.join(file);
        let out = std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(b64.as_bytes())?;
                c.wait_with_output()
            })
            .expect("base64 -d");
        std::fs::write(&path, out.stdout).expect("write");
        path
    };
    let ca = decode(ca_bundle, "ca.crt");
    let crt = decode(
        secret["data"]["tls.crt"].as_str().expect("tls.crt"),
        "tls.crt",
    );
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .arg(&crt)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl verify: {}", text(&out));
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&crt)
        .output()
        .expect("openssl");
    assert!(
        text(&out).contains(&format!("DNS:{svc_name}.{NS}.svc")),
        "SANs: {}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);

    // The agents serve it with that Secret.
    let ds = find(&docs, "DaemonSet", AGENT_SA);
    let pod = &ds["spec"]["template"]["spec"];
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--subresources-listen=0.0.0.0:8443"),
        "{args:?}"
    );
    assert!(args.iter().any(|a| a.starts_with("--subresources-cert=")));
    assert!(
        args.contains(&"--subresources-advertise=$(POD_IP):8443"),
        "{args:?}"
    );
    assert!(args.contains(&"--subresources-server-name=vireo-subresources.vireo-system.svc"));
    assert!(
        pod["containers"][0]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["name"] == "subresources" && p["containerPort"] == 8443)
    );
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["secret"]["secretName"] == format!("{RELEASE}-subresources-tls"))
    );
    // ... may ask SubjectAccessReviews and read the front proxy's settings.
    let agent = find(&docs, "ClusterRole", "vireo-agent");
    assert!(allows(
        agent,
        "authorization.k8s.io",
        "subjectaccessreviews",
        "create"
    ));
    let delegator = find(&docs, "ClusterRoleBinding", "vireo-agent-auth-delegator");
    assert_eq!(delegator["roleRef"]["name"], "system:auth-delegator");
    let reader = find(&docs, "RoleBinding", "vireo-agent-auth-reader");
    assert_eq!(reader["metadata"]["namespace"], "kube-system");
    assert_eq!(
        reader["roleRef"]["name"],
        "extension-apiserver-authentication-reader"
    );

    // The user roles.
    let label = |role: &Value, to: &str| {
        role["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{to}")] == "true"
    };
    let viewer = find(&docs, "ClusterRole", "vireo-viewer");
    assert!(label(viewer, "view"));
    for r in [
        "domains",
        "storagevols",
        "networks",
        "storagepools",
        "hosts",
    ] {
        assert!(allows(viewer, "vireo.dev", r, "list"), "viewer lists {r}");
    }
    assert!(!allows(viewer, "vireo.dev", "domains", "create"));
    assert!(
        grants(viewer)
            .iter()
            .all(|(g, _, _, _)| g != "subresources.vireo.dev"),
        "a viewer may not open consoles or transfer volumes"
    );
    let user = find(&docs, "ClusterRole", "vireo-user");
    assert!(label(user, "edit") && !label(user, "view"));
    for r in [
        "domains/console",
        "storagevols/upload",
        "storagevols/download",
    ] {
        // A WebSocket upgrade is a GET: the API server checks `get`.
        assert!(allows(user, "subresources.vireo.dev", r, "get"), "user {r}");
    }
    assert!(allows(user, "vireo.dev", "domains", "create"));
    assert!(allows(user, "vireo.dev", "storagevols", "delete"));
    assert!(!allows(user, "vireo.dev", "networks", "create"));
    let admin = find(&docs, "ClusterRole", "vireo-admin");
    assert!(label(admin, "admin") && !label(admin, "edit"));
    assert!(allows(
        admin,
        "subresources.vireo.dev",
        "domains/console",
        "get"
    ));
    assert!(allows(admin, "vireo.dev", "*", "*"));
    let cluster_viewer = find(&docs, "ClusterRole", "vireo-cluster-viewer");
    for (g, r, v, _) in grants(cluster_viewer) {
        assert_eq!(g, "vireo.dev");
        assert!(
            ["hosts", "networks", "storagepools"].contains(&r.as_str()),
            "{r}"
        );
        assert!(["get", "list", "watch"].contains(&v.as_str()), "{v}");
    }
    // Only the agents may forward (and so name a user).
    for role in [viewer, user, admin] {
        assert!(
            grants(role)
                .iter()
                .all(|(g, _, v, _)| !(g == "subresources.vireo.dev" && (v == "proxy" || v == "*"))),
            "{}",
            role["metadata"]["name"]
        );
    }

    // cert-manager issues the certificate instead; its cainjector fills the bundle.
    let docs = render(&["--set", "certManager.enabled=true"]);
    let api = find(&docs, "APIService", "v1alpha1.subresources.vireo.dev");
    assert!(api["spec"]["caBundle"].is_null());
    assert_eq!(
        api["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{NS}/{RELEASE}-subresources-tls")
    );
    let cert = find(&docs, "Certificate", &format!("{RELEASE}-subresources-tls"));
    assert_eq!(
        cert["spec"]["secretName"],
        format!("{RELEASE}-subresources-tls")
    );
    assert!(!docs.iter().any(|d| d["kind"] == "Secret"));

    // Off: no APIService, no flag.
    let docs = render(&["--set", "subresources.enabled=false"]);
    assert!(!docs.iter().any(|d| d["kind"] == "APIService"));
    let ds = find(&docs, "DaemonSet", AGENT_SA);
    assert!(
        !ds.to_string().contains("--subresources-listen"),
        "the flag without the API"
    );
}
