//! Real guests on a real kube-apiserver: `type: qemu` Domains (the qemu
//! driver with the real Linux guest image, TCG) and `type: kvm` Domains
//! (vireo-vmm with the project's test guest). A killed agent leaves the
//! guest running and re-adopts it; a VM process killed from outside is
//! shutoff (crashed) and `RerunOnFailure` starts it again.
//!
//! Without `qemu-system-x86_64` (or /dev/kvm) a test fails when `CI` is
//! set, and otherwise prints a SKIP line and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Cluster, ready_hosts, wait_for, wait_gone};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use vireo_crds::{Domain, DomainReason, DomainState};

const T: Duration = Duration::from_secs(90);

fn qemu_available() -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("qemu-system-x86_64 is missing and CI is set (scripts/setup installs it)");
        }
        eprintln!("SKIP qemu e2e: qemu-system-x86_64 not found (apt-get install qemu-system-x86)");
    }
    found
}

/// What a kind of guest needs in a test.
struct Kind {
    /// `qemu` or `kvm`: the Domain's type and the agent's state subdirectory.
    driver: &'static str,
    /// The `spec.os` block of the manifest.
    os: String,
    /// The guest's first console line.
    marker: &'static str,
}

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("/dev/kvm cannot be opened and CI is set");
        }
        eprintln!("SKIP kvm e2e: /dev/kvm cannot be opened");
    }
    ok
}

fn test_guest() -> PathBuf {
    let out_dir = std::env::temp_dir().join(format!("vireo-e2e-guest-{}", std::process::id()));
    common::script_output("vmm/guest/build.sh", Some(&out_dir))
}

fn guest_image() -> PathBuf {
    common::script_output("scripts/guest-image.sh", None)
}

/// The guest image's initramfs with vireo-guest-agent appended
/// (scripts/guest-agent.sh), in a file of its own.
fn initrd_with_agent() -> PathBuf {
    let agent = common::script_output("scripts/guest-agent.sh", None);
    let mut bytes = std::fs::read(guest_image().join("initrd.img")).expect("initrd");
    bytes.extend(std::fs::read(agent.join("agent.cpio.gz")).expect("agent cpio"));
    let path = std::env::temp_dir().join(format!("vireo-e2e-initrd-agent-{}", std::process::id()));
    std::fs::write(&path, bytes).expect("write initrd");
    path
}

/// The Domain's condition of that type: (status, reason, message).
fn condition_of(d: &Domain, type_: &str) -> Option<(String, String, String)> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn status_of(d: &Domain) -> (Option<DomainState>, Option<u32>, Option<u32>, String) {
    let s = d.status.clone().unwrap_or_default();
    (
        s.state,
        s.id,
        s.start_count,
        s.info
            .map(|i| i.reason.virsh_name().to_string())
            .unwrap_or_default(),
    )
}

/// The guest's console log on the agent's node (the driver's run directory
/// is named by the Domain's UUID, which is its metadata.uid).
fn console_log(cluster: &Cluster, kind: &Kind, uuid: &str) -> PathBuf {
    cluster.dir.join(format!(
        "state-node-1/{}/run/{uuid}/console.log",
        kind.driver
    ))
}

fn markers(kind: &Kind, log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(kind.marker)
        .count()
}

fn vm_pid(cluster: &Cluster, kind: &Kind, uuid: &str) -> u32 {
    std::fs::read_to_string(
        cluster
            .dir
            .join(format!("state-node-1/{}/run/{uuid}/pid", kind.driver)),
    )
    .expect("pid file")
    .trim()
    .parse()
    .expect("pid")
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_domain_survives_agent_restart_and_reruns_after_crash() {
    if !qemu_available() {
        return;
    }
    let image = guest_image();
    let kind = Kind {
        driver: "qemu",
        os: format!(
            "  os:\n    kernel: {}\n    initrd: {}\n    cmdline: console=ttyS0 quiet vireo.net=0\n",
            image.join("vmlinuz").display(),
            image.join("initrd.img").display()
        ),
        marker: "VIREO-GUEST-READY",
    };
    survives_agent_restart_and_reruns_after_crash(kind).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kvm_domain_survives_agent_restart_and_reruns_after_crash() {
    if !kvm_available() {
        return;
    }
    let kind = Kind {
        driver: "kvm",
        os: format!(
            "  os:\n    kernel: {}\n    cmdline: console=ttyS0 vireo.counter=1\n",
            test_guest().display()
        ),
        marker: "VIREO-TEST-GUEST-READY",
    };
    survives_agent_restart_and_reruns_after_crash(kind).await;
}

async fn survives_agent_restart_and_reruns_after_crash(kind: Kind) {
    let cluster = Cluster::start(kind.driver);
    let op = cluster.operator("operator", &["--no-leader-election"]);
    let agent = cluster.agent("node-1", &["--resync-seconds", "2"]);
    let client = cluster.client().await;
    ready_hosts(&client, 1).await;
    let manifest = format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: linux}}\nspec:\n  type: {}\n  memory: 256Mi\n  vcpus: 1\n  runStrategy: RerunOnFailure\n{}",
        kind.driver, kind.os
    );
    cluster.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let d =
        wait_for(T, "domain running", || async {
            domains.get_opt("linux").await.ok().flatten().filter(|d| {
                status_of(d).0 == Some(DomainState::Running) && status_of(d).1.is_some()
            })
        })
        .await;
    let uuid = d.uid().expect("uid");
    let log = console_log(&cluster, &kind, &uuid);
    wait_for(
        Duration::from_secs(30),
        "the guest's marker on its console",
        || async { (markers(&kind, &log) >= 1).then_some(()) },
    )
    .await;
    let (_, id, starts, _) = status_of(&d);
    let pid = vm_pid(&cluster, &kind, &uuid);

    // Kill the agent: the guest keeps running.
    let mut agent = agent;
    agent.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU (pid {pid}) outlived the agent"
    );
    agent.start();
    // After the restart: same ID, same process, no new start.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let d = domains.get("linux").await.expect("domain");
    let (state, id2, starts2, _) = status_of(&d);
    assert_eq!(state, Some(DomainState::Running));
    assert_eq!(id2, id, "the re-adopted guest keeps its ID");
    assert_eq!(starts2, starts, "nothing was restarted");
    assert_eq!(vm_pid(&cluster, &kind, &uuid), pid, "the same QEMU");
    assert_eq!(markers(&kind, &log), 1, "the guest did not boot again");

    // SIGKILL QEMU: shutoff (crashed), and RerunOnFailure starts it again.
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let d = wait_for(T, "a new activation after the crash", || async {
        domains.get("linux").await.ok().filter(|d| {
            let (s, i, n, _) = status_of(d);
            s == Some(DomainState::Running) && i.is_some() && i != id && n > starts
        })
    })
    .await;
    assert_ne!(vm_pid(&cluster, &kind, &uuid), pid, "a new QEMU");
    wait_for(
        Duration::from_secs(30),
        "the guest booted again",
        || async { (markers(&kind, &log) >= 2).then_some(()) },
    )
    .await;
    let events = cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=linux",
    ]);
    assert!(events.contains("Started"), "Started events: {events}");
    let agent_log = agent.log_text();
    assert!(
        agent_log.contains("crashed"),
        "the agent saw the crash:\n{agent_log}"
    );
    let _ = d;

    if kind.driver == "kvm" {
        managed_save_through_run_strategy(&cluster, &kind, &domains, &uuid).await;
    }

    if kind.driver == "qemu" {
        // No guest agent in this guest: a condition says so, and nothing
        // else minds (it ran, restarted and crashed above).
        let d = wait_for(T, "AgentConnected=False on linux", || async {
            domains.get_opt("linux").await.ok().flatten().filter(|d| {
                condition_of(d, "AgentConnected")
                    .is_some_and(|(s, r, _)| s == "False" && r == "AgentNotResponding")
            })
        })
        .await;
        assert!(d.status.as_ref().is_some_and(|s| s.guest.is_none()));
        let (_, _, message) = condition_of(&d, "AgentConnected").expect("condition");
        assert!(message.contains("vireo-guest-agent"), "{message}");
        assert_eq!(
            condition_of(&d, "Ready").map(|c| c.0).as_deref(),
            Some("True"),
            "Ready regardless"
        );

        // With vireo-guest-agent in the guest: status.guest and
        // AgentConnected=True, through the real API server.
        let initrd = initrd_with_agent();
        cluster.kubectl_stdin(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: with-agent}}\nspec:\n  type: qemu\n  memory: 256Mi\n  vcpus: 1\n  os:\n    kernel: {}\n    initrd: {}\n    cmdline: console=ttyS0 quiet vireo.net=0\n",
                guest_image().join("vmlinuz").display(),
                initrd.display()
            ),
        );
        let d = wait_for(T, "status.guest of with-agent", || async {
            domains
                .get_opt("with-agent")
                .await
                .ok()
                .flatten()
                .filter(|d| {
                    d.status
                        .as_ref()
                        .and_then(|s| s.guest.as_ref())
                        .is_some_and(|g| g.hostname.is_some())
                })
        })
        .await;
        let guest = d
            .status
            .as_ref()
            .and_then(|s| s.guest.clone())
            .expect("guest");
        assert_eq!(guest.hostname.as_deref(), Some("vireo-guest"), "{guest:?}");
        assert!(
            guest
                .interfaces
                .iter()
                .any(|i| i.name == "lo" && i.addresses.iter().any(|a| a == "127.0.0.1/8")),
            "{guest:?}"
        );
        assert_eq!(
            condition_of(&d, "AgentConnected").map(|c| (c.0, c.1)),
            Some(("True".to_string(), "Connected".to_string()))
        );
        let host = cluster.kubectl_ok(&[
            "get",
            "domain",
            "with-agent",
            "-o",
            "jsonpath={.status.guest.hostname}",
        ]);
        assert_eq!(host.trim(), "vireo-guest");
        domains
            .delete("with-agent", &DeleteParams::default())
            .await
            .expect("delete with-agent");
        wait_gone(&domains, "with-agent", T, "with-agent deleted").await;
        let _ = std::fs::remove_file(&initrd);

        // A firmware boot with nothing to boot: QEMU keeps running
        // SeaBIOS, and the agent says so instead of a silent hang.
        cluster.kubectl_stdin(
            &["apply", "-f", "-"],
            "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: blank}\nspec:\n  type: qemu\n  memory: 128Mi\n  vcpus: 1\n  os: {firmware: bios}\n",
        );
        let d = wait_for(T, "Bootable=False on the blank Domain", || async {
            domains.get_opt("blank").await.ok().flatten().filter(|d| {
                d.status.as_ref().is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Bootable"
                            && c.status == "False"
                            && c.reason == "NoBootableDevice"
                    })
                })
            })
        })
        .await;
        assert_eq!(status_of(&d).0, Some(DomainState::Running), "QEMU runs on");
        let message = d
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Bootable"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(message.contains("No bootable device."), "{message}");
        let events = wait_for(T, "the NoBootableDevice event", || async {
            let e = cluster.kubectl_ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=blank",
            ]);
            e.contains("NoBootableDevice").then_some(e)
        })
        .await;
        assert!(events.contains("Warning"), "{events}");
        domains
            .delete("blank", &DeleteParams::default())
            .await
            .expect("delete blank");
        wait_gone(&domains, "blank", T, "blank deleted").await;
    }

    // Deleting the Domain destroys the guest.
    domains
        .delete("linux", &DeleteParams::default())
        .await
        .expect("delete");
    let new_pid = vm_pid(&cluster, &kind, &uuid);
    wait_gone(&domains, "linux", T, "the Domain gone").await;
    assert!(
        !Path::new(&format!("/proc/{new_pid}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{new_pid}/cmdline"))
                .unwrap_or_default()
                .is_empty(),
        "QEMU is gone with its Domain"
    );
    drop(op);
    drop(agent);
}

/// The test guest's counter values (`VIREO-TEST counter N`) in `text`.
fn counters(text: &str) -> Vec<u64> {
    text.split("VIREO-TEST counter ")
        .skip(1)
        .filter_map(|t| {
            t.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect()
}

/// `runStrategy: Saved` on a real vireo-vmm guest: the agent saves it on
/// its node (the VMM process ends, `shut off (saved)`, `Saved=True`), and
/// `Always` resumes it: the counter goes on from where it was, and the
/// guest does not boot again.
async fn managed_save_through_run_strategy(
    cluster: &Cluster,
    kind: &Kind,
    domains: &Api<Domain>,
    uuid: &str,
) {
    let log = console_log(cluster, kind, uuid);
    // The counter of the current boot: what follows the last boot marker.
    let this_boot = |text: &str| {
        text.rfind(kind.marker)
            .map_or(text, |at| &text[at..])
            .to_string()
    };
    wait_for(T, "the guest's counter", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (counters(&this_boot(&text)).len() >= 2).then_some(())
    })
    .await;
    let pid = vm_pid(cluster, kind, uuid);
    let set_strategy = |strategy: &str| {
        cluster.kubectl_ok(&[
            "patch",
            "domain",
            "linux",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{{"runStrategy":"{strategy}"}}}}"#),
        ]);
    };
    set_strategy("Saved");
    let d = wait_for(T, "linux saved (shut off, Saved=True)", || async {
        domains.get_opt("linux").await.ok().flatten().filter(|d| {
            let info = d.status.as_ref().and_then(|s| s.info.as_ref());
            info.is_some_and(|i| i.state == DomainState::Shutoff && i.reason == DomainReason::Saved)
                && condition_of(d, "Saved")
                    .is_some_and(|(s, r, _)| s == "True" && r == "ManagedSave")
        })
    })
    .await;
    assert_eq!(status_of(&d).1, None, "an inactive domain has no ID");
    wait_for(T, "the saved VMM process gone", || async {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await;
    let before = std::fs::read_to_string(&log).unwrap_or_default();
    let last = *counters(&this_boot(&before))
        .last()
        .expect("a counter before the save");
    let boots = markers(kind, &log);

    set_strategy("Always");
    let d = wait_for(T, "linux restored", || async {
        domains.get_opt("linux").await.ok().flatten().filter(|d| {
            let info = d.status.as_ref().and_then(|s| s.info.as_ref());
            info.is_some_and(|i| {
                i.state == DomainState::Running && i.reason == DomainReason::Restored
            }) && condition_of(d, "Saved").is_none()
        })
    })
    .await;
    assert!(status_of(&d).1.is_some(), "a running domain has an ID");
    let after = wait_for(T, "the counter after the restore", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // The log is appended to; read past what was there at the save.
        let new = text
            .get(before.len()..)
            .unwrap_or(text.as_str())
            .to_string();
        (counters(&new).len() >= 2).then_some(new)
    })
    .await;
    let resumed = counters(&after);
    assert_eq!(
        resumed.first().copied(),
        Some(last + 1),
        "the counter goes on from {last}; after the restore the console said:\n{after}"
    );
    assert!(
        !after.contains(kind.marker),
        "the guest booted again after the restore:\n{after}"
    );
    assert_eq!(markers(kind, &log), boots);
    let events = cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=linux",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        events.split_whitespace().any(|r| r == "Saved"),
        "a Saved Event: {events}"
    );
}
