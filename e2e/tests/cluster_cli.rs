//! `vireo -c kube:///` and `kubectl vireo` on a real API server, as
//! token-authenticated users under RBAC: a user bound to `vireo-user` in
//! `team-a` runs its Domains there and is refused in `team-b`; a viewer
//! lists and reads but changes nothing.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{
    Cluster, ready_hosts, text_of, tools_bin, vireo, vireo_bin, vireo_ok, vireo_refused, wait_for,
};
use kube::ResourceExt;
use kube::api::Api;
use vireo_crds::{Domain, DomainReason, DomainState, RunStrategy};

const T: Duration = Duration::from_secs(60);

/// Service accounts in team-a: alice (the chart's vireo-user there, and
/// vireo-cluster-viewer for the cluster-scoped Networks and StoragePools),
/// victor (vireo-viewer there).
const BINDINGS: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: alice-cluster-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vireo-cluster-viewer}
subjects: [{kind: ServiceAccount, name: alice, namespace: team-a}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: alice, namespace: team-a}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: victor, namespace: team-a}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice-user, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vireo-user}
subjects: [{kind: ServiceAccount, name: alice, namespace: team-a}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: victor-viewer, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vireo-viewer}
subjects: [{kind: ServiceAccount, name: victor, namespace: team-a}]
"#;

const WEB: &str = r#"
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata:
  name: web
spec:
  type: test
  memory: 512Mi
  vcpus: 1
  maxVcpus: 2
  runStrategy: Halted
"#;

const OTHER: &str = r#"
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata:
  name: x
  namespace: team-b
spec:
  type: test
  memory: 256Mi
  vcpus: 1
  runStrategy: Halted
"#;

/// A kubeconfig for the service account `sa` of team-a, its context's
/// namespace team-a.
fn user_kubeconfig(cluster: &Cluster, sa: &str) -> PathBuf {
    let token = cluster
        .kubectl_ok(&["create", "token", sa, "-n", "team-a", "--duration", "2h"])
        .trim()
        .to_string();
    let path = cluster.token_kubeconfig(sa, &token);
    let text = std::fs::read_to_string(&path).expect("read kubeconfig");
    std::fs::write(
        &path,
        text.replace("namespace: default", "namespace: team-a"),
    )
    .expect("write kubeconfig");
    path
}

async fn state_is(api: &Api<Domain>, name: &str, state: DomainState, reason: Option<DomainReason>) {
    wait_for(T, &format!("{name} {state} ({reason:?})"), || async {
        let d = api.get_opt(name).await.ok().flatten()?;
        let info = d.status.as_ref()?.info.as_ref()?;
        (info.state == state && reason.is_none_or(|r| r == info.reason)).then_some(())
    })
    .await
}

/// Waits for the agent's `Saved=True` (a managed save image on the node).
async fn saved_condition(api: &Api<Domain>, name: &str) {
    wait_for(T, &format!("the Saved condition of {name}"), || async {
        let d = api.get(name).await.ok()?;
        d.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Saved" && c.status == "True")
            .then_some(())
    })
    .await
}

/// The words of a table's header line.
fn header(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_run_their_domains_through_the_api_and_rbac_refuses_the_rest() {
    let cluster = Cluster::start("cluster-cli").with_vireo();
    let client = cluster.client().await;
    ready_hosts(&client, 3).await;
    cluster.kubectl_ok(&["create", "namespace", "team-a"]);
    cluster.kubectl_ok(&["create", "namespace", "team-b"]);
    let applied = cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!("{}\n---\n{BINDINGS}", cluster.chart_user_roles()),
    );
    assert!(applied.status.success(), "RBAC: {}", text_of(&applied));
    let other = cluster.kubectl_stdin(&["apply", "-f", "-"], OTHER);
    assert!(other.status.success(), "team-b/x: {}", text_of(&other));
    let alice = user_kubeconfig(&cluster, "alice");
    let victor = user_kubeconfig(&cluster, "victor");
    let team_a: Api<Domain> = Api::namespaced(client.clone(), "team-a");
    let team_b: Api<Domain> = Api::namespaced(client.clone(), "team-b");

    // define from a manifest: server-side applied in the context's namespace.
    let manifest = cluster.dir.join("web.yaml");
    std::fs::write(&manifest, WEB).expect("write manifest");
    let out = vireo_ok(&alice, &["define", "-f", &manifest.display().to_string()]);
    assert!(out.contains("Domain 'team-a/web' defined"), "{out}");
    let web = team_a.get("web").await.expect("team-a/web");
    assert!(
        web.metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|f| f.manager.as_deref() == Some("vireo-cli")),
        "not applied by vireo-cli"
    );
    state_is(&team_a, "web", DomainState::Shutoff, None).await;

    // start: the agent starts it; list shows it with its node.
    let out = vireo_ok(&alice, &["start", "web"]);
    assert!(out.contains("Domain 'team-a/web' started"), "{out}");
    state_is(&team_a, "web", DomainState::Running, None).await;
    let node = team_a
        .get("web")
        .await
        .expect("web")
        .status
        .and_then(|s| s.node_name)
        .expect("web has a node");
    let list = vireo_ok(&alice, &["list", "--all"]);
    assert_eq!(header(&list), ["Id", "Name", "State", "Node"], "{list}");
    let row = list
        .lines()
        .find(|l| l.contains("team-a/web"))
        .unwrap_or_else(|| panic!("no team-a/web in {list}"));
    assert!(row.contains("running") && row.contains(&node), "{row}");
    let info = vireo_ok(&alice, &["dominfo", "web"]);
    assert!(
        info.contains("State:") && info.contains("running"),
        "{info}"
    );
    assert_eq!(
        vireo_ok(&alice, &["domstate", "--reason", "team-a/web"]).trim(),
        "running (booted)"
    );
    let xml = vireo_ok(&alice, &["dumpxml", "web"]);
    assert!(xml.contains("<name>web</name>"), "{xml}");

    // shutdown: runStrategy Halted, the guest shuts down.
    vireo_ok(&alice, &["shutdown", "web"]);
    state_is(
        &team_a,
        "web",
        DomainState::Shutoff,
        Some(DomainReason::Shutdown),
    )
    .await;
    let d = team_a.get("web").await.expect("web");
    assert_eq!(d.spec.run_strategy, RunStrategy::Halted);

    // destroy: stopped at once (vireo.dev/stop: destroy).
    vireo_ok(&alice, &["start", "web"]);
    state_is(&team_a, "web", DomainState::Running, None).await;
    let out = vireo_ok(&alice, &["destroy", "web"]);
    assert!(out.contains("Domain 'team-a/web' destroyed"), "{out}");
    state_is(
        &team_a,
        "web",
        DomainState::Shutoff,
        Some(DomainReason::Destroyed),
    )
    .await;

    // setvcpus and autostart patch the spec.
    vireo_ok(&alice, &["setvcpus", "web", "2", "--config"]);
    vireo_ok(&alice, &["autostart", "--disable", "web"]);
    let d = team_a.get("web").await.expect("web");
    assert_eq!(d.spec.vcpus, 2);
    assert_eq!(d.spec.run_strategy, RunStrategy::Manual);

    // define replaces a definition: what dumpspec printed applies again
    // (without the operator's and agents' fields), and a Domain kubectl
    // applied is taken over.
    let spec = vireo_ok(&alice, &["dumpspec", "web"]);
    let dumped = cluster.dir.join("web-dumped.yaml");
    std::fs::write(&dumped, spec.replace("vcpus: 2", "vcpus: 1")).expect("write dumpspec");
    vireo_ok(&alice, &["define", "-f", &dumped.display().to_string()]);
    let d = team_a.get("web").await.expect("web");
    assert_eq!(d.spec.vcpus, 1);
    assert!(
        d.finalizers().iter().any(|f| f == "vireo.dev/node-cleanup"),
        "the agent's finalizer went: {:?}",
        d.finalizers()
    );
    let legacy = "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: legacy, namespace: team-a}\nspec: {type: test, memory: 256Mi, vcpus: 1, runStrategy: Halted}\n";
    let out = cluster.kubectl_stdin(&["apply", "--server-side", "-f", "-"], legacy);
    assert!(out.status.success(), "legacy: {}", text_of(&out));
    let redefined = cluster.dir.join("legacy.yaml");
    std::fs::write(&redefined, legacy.replace("256Mi", "384Mi")).expect("write legacy");
    vireo_ok(&alice, &["define", "-f", &redefined.display().to_string()]);
    let d = team_a.get("legacy").await.expect("legacy");
    assert_eq!(d.spec.memory.0, "384Mi");
    vireo_ok(&alice, &["undefine", "legacy"]);

    // suspend and resume: vireo.dev/paused, which the agent follows.
    vireo_ok(&alice, &["start", "web"]);
    state_is(&team_a, "web", DomainState::Running, None).await;
    let out = vireo_ok(&alice, &["suspend", "web"]);
    assert!(out.contains("Domain 'team-a/web' suspended"), "{out}");
    state_is(
        &team_a,
        "web",
        DomainState::Paused,
        Some(DomainReason::User),
    )
    .await;
    vireo_refused(&alice, &["suspend", "web"], "is already paused");
    vireo_ok(&alice, &["resume", "web"]);
    state_is(
        &team_a,
        "web",
        DomainState::Running,
        Some(DomainReason::Unpaused),
    )
    .await;
    vireo_refused(&alice, &["resume", "web"], "is not paused");

    // reboot and reset: one vireo.dev/request each, carried out and removed.
    for (command, event) in [("reboot", "Rebooted"), ("reset", "Reset")] {
        vireo_ok(&alice, &[command, "web"]);
        wait_for(T, &format!("{command} carried out"), || async {
            let d = team_a.get("web").await.ok()?;
            let pending = d.annotations().contains_key("vireo.dev/request");
            let reasons = cluster.kubectl_ok(&[
                "get",
                "events",
                "-n",
                "team-a",
                "--field-selector",
                "involvedObject.name=web",
                "-o",
                "jsonpath={.items[*].reason}",
            ]);
            (!pending && reasons.split_whitespace().any(|r| r == event)).then_some(())
        })
        .await;
        state_is(&team_a, "web", DomainState::Running, None).await;
    }

    // managedsave: `runStrategy: Saved`, which the agent carries out by
    // saving the guest on its node; start resumes it, managedsave-remove
    // (a vireo.dev/request) makes the next start boot.
    let managed = |want: &str| {
        let info = vireo_ok(&alice, &["dominfo", "web"]);
        let line = info
            .lines()
            .find(|l| l.starts_with("Managed save:"))
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            line.split_whitespace().last(),
            Some(want),
            "dominfo:\n{info}"
        );
    };
    managed("no");
    let out = vireo_ok(&alice, &["managedsave", "web"]);
    assert!(out.contains("Domain 'team-a/web' state saved"), "{out}");
    state_is(
        &team_a,
        "web",
        DomainState::Shutoff,
        Some(DomainReason::Saved),
    )
    .await;
    assert_eq!(
        team_a.get("web").await.expect("web").spec.run_strategy,
        RunStrategy::Saved
    );
    saved_condition(&team_a, "web").await;
    managed("yes");
    vireo_refused(&alice, &["managedsave", "web"], "is not running");
    vireo_refused(&alice, &["shutdown", "web"], "is not running");
    vireo_ok(&alice, &["start", "web"]);
    state_is(
        &team_a,
        "web",
        DomainState::Running,
        Some(DomainReason::Restored),
    )
    .await;
    managed("no");
    vireo_ok(&alice, &["managedsave", "web"]);
    state_is(
        &team_a,
        "web",
        DomainState::Shutoff,
        Some(DomainReason::Saved),
    )
    .await;
    saved_condition(&team_a, "web").await;
    let out = vireo_ok(&alice, &["managedsave-remove", "web"]);
    assert!(out.contains("Removed managedsave image"), "{out}");
    wait_for(T, "managedsave-remove carried out", || async {
        let d = team_a.get("web").await.ok()?;
        let pending = d.annotations().contains_key("vireo.dev/request");
        let saved = d.status?.conditions.iter().any(|c| c.type_ == "Saved");
        (!pending && !saved).then_some(())
    })
    .await;
    managed("no");
    let out = vireo_ok(&alice, &["managedsave-remove", "web"]);
    assert!(out.contains("no manage save image"), "{out}");
    vireo_ok(&alice, &["start", "web"]);
    state_is(
        &team_a,
        "web",
        DomainState::Running,
        Some(DomainReason::Booted),
    )
    .await;

    // What has no request form says so.
    vireo_refused(
        &alice,
        &["save", "web", "/tmp/web.save"],
        "not supported by the kube driver",
    );

    // Another namespace: forbidden, exit 1, nothing changed.
    let before = team_b.get("x").await.expect("team-b/x");
    vireo_refused(
        &alice,
        &["start", "team-b/x"],
        "error: domain 'team-b/x': forbidden:",
    );
    vireo_refused(&alice, &["destroy", "team-b/x"], "forbidden");
    let after = team_b.get("x").await.expect("team-b/x");
    assert_eq!(
        before.metadata.resource_version, after.metadata.resource_version,
        "team-b/x changed"
    );
    assert_eq!(after.spec.run_strategy, RunStrategy::Halted);
    let out = vireo(&alice, "kube:///?namespace=team-b", &["list", "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(text_of(&out).contains("forbidden"), "{}", text_of(&out));

    // --all-namespaces: every namespace the user may list (the admin: all;
    // alice may not list cluster-wide).
    let all = vireo_ok(&cluster.kubeconfig, &["list", "--all", "--all-namespaces"]);
    assert!(
        all.contains("team-a/web") && all.contains("team-b/x"),
        "{all}"
    );
    vireo_refused(&alice, &["list", "--all", "-A"], "forbidden");

    // kube:///CONTEXT picks the kubeconfig's context; an unknown one fails to open.
    let out = vireo(&alice, "kube:///alice", &["domstate", "web"]);
    assert!(out.status.success(), "{}", text_of(&out));
    let out = vireo(&alice, "kube:///nope", &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text_of(&out).contains("cannot open 'kube:///nope'"),
        "{}",
        text_of(&out)
    );

    // A missing one reads as on a node.
    vireo_refused(
        &alice,
        &["dominfo", "nope"],
        "error: domain 'team-a/nope' not found",
    );

    // The viewer lists and reads, and changes nothing.
    let list = vireo_ok(&victor, &["list", "--all"]);
    assert!(list.contains("team-a/web"), "{list}");
    let info = vireo_ok(&victor, &["dominfo", "web"]);
    assert!(info.contains("team-a/web"), "{info}");
    let before = team_a.get("web").await.expect("web");
    vireo_refused(
        &victor,
        &["destroy", "web"],
        "error: domain 'team-a/web': forbidden:",
    );
    let after = team_a.get("web").await.expect("web");
    assert_eq!(
        before.metadata.resource_version,
        after.metadata.resource_version
    );

    // kubectl vireo: the same binary as kubectl-vireo on PATH, kube:/// by default.
    let plugins = cluster.dir.join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::os::unix::fs::symlink(vireo_bin("vireo"), plugins.join("kubectl-vireo"))
        .expect("symlink kubectl-vireo");
    let path = format!(
        "{}:{}",
        plugins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(tools_bin().join("kubectl"))
        .env("KUBECONFIG", &alice)
        .env("PATH", &path)
        .env_remove("VIREO_DEFAULT_URI")
        .args(["vireo", "list", "--all"])
        .output()
        .expect("kubectl runs");
    assert!(out.status.success(), "kubectl vireo: {}", text_of(&out));
    let plugin_list = String::from_utf8_lossy(&out.stdout);
    assert!(plugin_list.contains("team-a/web"), "{plugin_list}");
    let node_list = Command::new(vireo_bin("vireo"))
        .args(["-c", "test:///default", "list", "--all"])
        .output()
        .expect("vireo runs");
    let mut want = header(&String::from_utf8_lossy(&node_list.stdout));
    want.push("Node".to_string());
    assert_eq!(header(&plugin_list), want, "{plugin_list}");

    // Networks, pools and volumes from their objects; domifaddr from status.
    for f in ["test-network.yaml", "test-pool.yaml"] {
        cluster.kubectl_ok(&[
            "apply",
            "-f",
            &common::repo()
                .join("examples")
                .join(f)
                .display()
                .to_string(),
        ]);
    }
    for f in ["test-volume.yaml", "test-vm-with-disk.yaml"] {
        let p = common::repo()
            .join("examples")
            .join(f)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&p).expect("example");
        // The example Domain is also called web: team-a's is vm here.
        let text = text.replace("name: web", "name: vm");
        let out = cluster.kubectl_stdin(&["apply", "-n", "team-a", "-f", "-"], &text);
        assert!(out.status.success(), "{f}: {}", text_of(&out));
    }
    state_is(&team_a, "vm", DomainState::Running, None).await;
    let nets = vireo_ok(&alice, &["net-list", "--all"]);
    assert!(
        nets.lines()
            .any(|l| l.split_whitespace().next() == Some("lab")),
        "{nets}"
    );
    let info = vireo_ok(&alice, &["net-info", "lab"]);
    assert!(info.contains("vireo-lab0"), "{info}");
    let pools = vireo_ok(&alice, &["pool-list", "--all"]);
    assert!(pools.contains("images"), "{pools}");
    vireo_ok(&alice, &["pool-info", "images"]);
    let vols = vireo_ok(&alice, &["vol-list", "images"]);
    assert!(vols.contains("team-a/scratch"), "{vols}");
    let info = vireo_ok(&alice, &["vol-info", "scratch", "--pool", "images"]);
    assert!(
        info.contains("team-a/scratch") && info.contains("2.00 GiB"),
        "{info}"
    );
    let vm = team_a.get("vm").await.expect("vm");
    let iface = vm
        .status
        .as_ref()
        .and_then(|s| s.interfaces.first().cloned())
        .expect("vm's status.interfaces");
    let addrs = vireo_ok(&alice, &["domifaddr", "vm"]);
    let row = addrs
        .lines()
        .find(|l| l.contains(&iface.mac))
        .unwrap_or_else(|| panic!("no {} in {addrs}", iface.mac));
    assert!(row.contains(iface.ip.as_deref().unwrap_or("N/A")), "{row}");

    // undefine deletes the Domain.
    let out = vireo_ok(&alice, &["undefine", "web"]);
    assert!(
        out.contains("Domain 'team-a/web' has been undefined"),
        "{out}"
    );
    common::wait_gone(&team_a, "web", T, "team-a/web deleted").await;
}
