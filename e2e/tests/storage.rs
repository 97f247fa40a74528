//! Storage on a real kube-apiserver, with real files: a dir pool and a 1 GiB
//! volume filled from an image served over HTTP on loopback; a real Linux
//! guest (qemu driver, TCG) makes a filesystem on it and writes a file, is
//! stopped and started again, and reads the file back; the same volume then
//! goes to a kvm-driver test guest, whose sector lands in the file. A
//! volume in use is not deleted until its Domain lets go; a Domain cannot
//! name another namespace's volume or a kernel outside the node's boot
//! directories; an agent killed in the middle of a URL fill never reports
//! the volume Ready with partial data, and finishes it after its restart.
//!
//! Without `qemu-system-x86_64` or /dev/kvm the test fails when `CI` is
//! set, and otherwise prints a SKIP line and returns.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::{Cluster, ready_hosts, wait_for, wait_gone};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use vireo_crds::{Domain, DomainState, StorageVol};

const T: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

fn have(what: &str, ok: bool, why: &str) -> bool {
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{what} is missing and CI is set ({why})");
        }
        eprintln!("SKIP storage e2e: {what} is missing ({why})");
    }
    ok
}

/// Serves `body` on loopback to every connection, `rate` bytes a second
/// at most (None: as fast as it goes).
fn serve(body: Vec<u8>, rate: Option<usize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let body = std::sync::Arc::new(body);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut req = [0u8; 2048];
                let _ = conn.read(&mut req);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let piece = rate.map_or(body.len(), |r| (r / 10).max(1));
                for chunk in body.chunks(piece) {
                    if conn.write_all(chunk).is_err() {
                        return;
                    }
                    if rate.is_some() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        }
    });
    format!("http://{addr}/disk.img")
}

fn vol_phase(v: &StorageVol) -> (String, Option<u8>) {
    let s = v.status.clone().unwrap_or_default();
    (s.phase.unwrap_or_default(), s.progress)
}

fn domain_state(d: &Domain) -> Option<DomainState> {
    d.status.as_ref().and_then(|s| s.state)
}

fn console(cluster: &Cluster, driver: &str, uuid: &str) -> String {
    std::fs::read_to_string(
        cluster
            .dir
            .join(format!("state-node-1/{driver}/run/{uuid}/console.log")),
    )
    .unwrap_or_default()
}

/// Waits for a Domain to be in `state`, and returns it.
async fn in_state(domains: &Api<Domain>, name: &str, state: DomainState, what: &str) -> Domain {
    wait_for(T, what, || async {
        domains
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .filter(|d| domain_state(d) == Some(state))
    })
    .await
}

async fn set_run_strategy(domains: &Api<Domain>, name: &str, strategy: &str) {
    domains
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"runStrategy": strategy}})),
        )
        .await
        .expect("patch runStrategy");
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_from_http_carry_guest_data_and_survive_agent_crashes() {
    let qemu = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !have("qemu-system-x86_64", qemu, "scripts/setup installs it") {
        return;
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !have("/dev/kvm", kvm, "the kvm half needs it") {
        return;
    }
    let image = common::script_output("scripts/guest-image.sh", None);
    let guest_dir = std::env::temp_dir().join(format!("vireo-e2e-sguest-{}", std::process::id()));
    let test_guest = common::script_output("vmm/guest/build.sh", Some(&guest_dir));

    let cluster = Cluster::start("storage");
    let _op = cluster.operator("operator", &["--no-leader-election"]);
    // Boot files only from the guest image's and the test guest's directories.
    let boot_dirs = [
        image.display().to_string(),
        test_guest
            .parent()
            .expect("the test guest's directory")
            .display()
            .to_string(),
    ];
    let agent_args = [
        "--resync-seconds",
        "2",
        "--boot-dir",
        &boot_dirs[0],
        "--boot-dir",
        &boot_dirs[1],
        "--stop-timeout-seconds",
        "30",
    ];
    let mut agent = cluster.agent("node-1", &agent_args);
    let client = cluster.client().await;
    ready_hosts(&client, 1).await;
    let pool_dir = cluster.dir.join("host-node-1/var/lib/vireo/images");

    // An image on loopback: a marker at the start and at its end.
    let mut img = vec![0u8; 16 * MIB];
    img[..16].copy_from_slice(b"VIREO-URL-IMAGE!");
    let end = img.len() - 8;
    img[end..].copy_from_slice(b"IMAGEEND");
    let url = serve(img.clone(), None);
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: images}}\nspec: {{path: /var/lib/vireo/images}}\n---\n\
             apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: data, namespace: default}}\nspec: {{pool: images, capacity: 1Gi, nodeName: node-1, source: {{url: {{url: '{url}'}}}}}}\n"
        ),
    );
    let vols: Api<StorageVol> = Api::namespaced(client.clone(), "default");
    let v = wait_for(T, "volume data Ready", || async {
        vols.get_opt("data")
            .await
            .ok()
            .flatten()
            .filter(|v| vol_phase(v).0 == "Ready")
    })
    .await;
    let st = v.status.clone().expect("status");
    assert_eq!(st.progress, Some(100));
    let file = pool_dir.join("default.data");
    assert_eq!(
        st.path.as_deref(),
        Some(file.display().to_string().as_str())
    );
    let bytes = std::fs::read(&file).expect("the volume is a file in the pool");
    assert_eq!(bytes.len(), 1 << 30, "grown to the capacity");
    assert_eq!(&bytes[..img.len()], &img[..], "the image's bytes");
    drop(bytes);

    // A real Linux guest makes a filesystem on it and writes a file; the
    // markers print computed text so the command line cannot match them.
    let run = "if [ -f /mnt/vda/hello ]; then echo GOT-$(cat /mnt/vda/hello); else echo vireo-was-here > /mnt/vda/hello; sync; echo WROTE-$((40+2)); fi";
    let linux = format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: linux, namespace: default}}\nspec:\n  type: qemu\n  memory: 256Mi\n  vcpus: 1\n  os:\n    kernel: {}\n    initrd: {}\n    cmdline: 'console=ttyS0 quiet vireo.net=0 vireo.mkfs=auto vireo.run=\"{run}\"'\n  devices:\n    disks:\n      - {{name: vda, volume: data}}\n",
        image.join("vmlinuz").display(),
        image.join("initrd.img").display()
    );
    cluster.kubectl_stdin(&["apply", "-f", "-"], &linux);
    let domains: Api<Domain> = Api::namespaced(client.clone(), "default");
    let d = in_state(
        &domains,
        "linux",
        DomainState::Running,
        "domain linux running",
    )
    .await;
    let uuid = d.uid().expect("uid");
    wait_for(T, "the guest wrote its file", || async {
        console(&cluster, "qemu", &uuid)
            .contains("WROTE-42")
            .then_some(())
    })
    .await;

    // A volume in use is not deleted: the request waits for the Domain.
    vols.delete("data", &DeleteParams::default())
        .await
        .expect("delete request");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = vols.get("data").await.expect("still there");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(file.exists(), "the file of a volume in use stays");

    // Stop and start again: the guest finds its file.
    set_run_strategy(&domains, "linux", "Halted").await;
    in_state(
        &domains,
        "linux",
        DomainState::Shutoff,
        "domain linux shut off",
    )
    .await;
    set_run_strategy(&domains, "linux", "Always").await;
    wait_for(T, "the guest read its file back", || async {
        console(&cluster, "qemu", &uuid)
            .contains("GOT-vireo-was-here")
            .then_some(())
    })
    .await;
    set_run_strategy(&domains, "linux", "Halted").await;
    in_state(
        &domains,
        "linux",
        DomainState::Shutoff,
        "domain linux shut off again",
    )
    .await;
    // The guest's filesystem is in the file: ext2's magic at 1080.
    let mut sb = [0u8; 2];
    let mut f = std::fs::File::open(&file).expect("open");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1080)).expect("seek");
    f.read_exact(&mut sb).expect("read");
    assert_eq!(
        sb,
        [0x53, 0xef],
        "an ext2/3/4 superblock written by the guest"
    );

    // The same volume for a kvm-driver test guest: its sector is in the file.
    let kvm_dom = format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: tiny, namespace: default}}\nspec:\n  type: kvm\n  memory: 64Mi\n  vcpus: 1\n  os:\n    kernel: {}\n    cmdline: console=ttyS0\n  devices:\n    disks:\n      - {{name: vda, volume: data}}\n",
        test_guest.display()
    );
    cluster.kubectl_stdin(&["apply", "-f", "-"], &kvm_dom);
    let tiny = in_state(
        &domains,
        "tiny",
        DomainState::Running,
        "domain tiny running",
    )
    .await;
    let tiny_uuid = tiny.uid().expect("uid");
    wait_for(T, "the test guest wrote its sector", || async {
        console(&cluster, "kvm", &tiny_uuid)
            .contains("write=ok read=ok verify=ok")
            .then_some(())
    })
    .await;
    let mut sector = [0u8; 17];
    let mut f = std::fs::File::open(&file).expect("open");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(512)).expect("seek");
    f.read_exact(&mut sector).expect("read");
    assert_eq!(&sector, b"VIREO-TEST-SECTOR");

    // Once both Domains are gone, the volume and its file go.
    for name in ["tiny", "linux"] {
        domains
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete domain");
    }
    wait_gone(&vols, "data", T, "volume data deleted").await;
    assert!(!file.exists(), "the file went with the volume");

    // Another namespace's volume cannot be named: the API server refuses.
    let out = cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: sneaky, namespace: default}\nspec:\n  type: test\n  memory: 64Mi\n  vcpus: 1\n  devices:\n    disks:\n      - {name: vda, volume: other-team/data}\n",
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "refused");
    assert!(
        err.contains("spec.devices.disks[0].volume"),
        "names the field: {err}"
    );

    // A kernel outside the node's boot directories: refused with a condition.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: hostpath, namespace: default}\nspec:\n  type: qemu\n  memory: 64Mi\n  vcpus: 1\n  os: {kernel: /etc/passwd}\n",
    );
    let refused = wait_for(T, "domain hostpath refused", || async {
        domains
            .get_opt("hostpath")
            .await
            .ok()
            .flatten()
            .filter(|d| {
                d.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.reason == "BootPathRefused")
                })
            })
    })
    .await;
    let cond = refused
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert!(cond.message.contains("spec.os.kernel"), "{}", cond.message);
    let events = cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=hostpath",
    ]);
    assert!(events.contains("BootPathRefused"), "{events}");

    // Kill the agent in the middle of a slow URL fill: never Ready with
    // partial data; after the restart the fill completes.
    let big: Vec<u8> = (0..48 * MIB).map(|i| (i % 251) as u8).collect();
    let slow = serve(big.clone(), Some(6 * MIB));
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: slow, namespace: default}}\nspec: {{pool: images, capacity: 64Mi, nodeName: node-1, source: {{url: {{url: '{slow}'}}}}}}\n"
        ),
    );
    let creating = wait_for(T, "volume slow Creating with progress", || async {
        vols.get_opt("slow")
            .await
            .ok()
            .flatten()
            .filter(|v| vol_phase(v).0 == "Creating" && vol_phase(v).1.is_some_and(|p| p > 0))
    })
    .await;
    assert!(vol_phase(&creating).1 < Some(100));
    agent.kill();
    let slow_file = pool_dir.join("default.slow");
    assert!(!slow_file.exists(), "no volume file while the fill was cut");
    let v = vols.get("slow").await.expect("slow");
    assert_ne!(vol_phase(&v).0, "Ready");
    agent.start();
    wait_for(T, "volume slow Ready after the restart", || async {
        vols.get_opt("slow")
            .await
            .ok()
            .flatten()
            .filter(|v| vol_phase(v).0 == "Ready")
    })
    .await;
    let got = std::fs::read(&slow_file).expect("the volume file");
    assert_eq!(got.len(), 64 * MIB);
    assert_eq!(
        &got[..big.len()],
        &big[..],
        "complete data, not a partial copy"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&pool_dir)
        .expect("pool dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no partial files left: {leftovers:?}");
    drop(agent);
}
