//! The kvm driver (vireo-vmm on /dev/kvm) with the project's test guest:
//! the lifecycle a user runs, a disk the guest writes, re-adoption by a new
//! driver, and a VMM killed from outside.
//!
//! Without /dev/kvm these tests fail when `CI` is set, and otherwise print
//! a SKIP line and return.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{fresh_root, kvm_available, say, test_guest_domain, vmm_binary};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vireo_crds::{
    Disk, DomainReason, DomainState, PoolType, StoragePool, StoragePoolSpec, StorageVol,
    StorageVolSpec,
};
use vireo_drivers::conformance::wait_for_state;
use vireo_drivers::{Connection, Lookup};

const MARKER: &str = "VIREO-TEST-GUEST-READY";
const T: Duration = Duration::from_secs(30);

fn open(root: &Path) -> Connection {
    vmm_binary();
    vireo_drivers::open(&format!("kvm:///embed?root={}", root.display()))
        .expect("opens kvm:///embed")
}

/// A dir pool `p` under `root` and a 1 MiB raw volume `name` in it.
fn pool_with_volume(
    root: &Path,
    conn: &Connection,
    name: &str,
    source: Option<vireo_crds::VolumeSource>,
) -> vireo_drivers::VolRef {
    let pool_dir = root.join("pool");
    std::fs::create_dir_all(&pool_dir).expect("pool dir");
    let st = conn.storage();
    st.create_pool(&StoragePool::new(
        "p",
        StoragePoolSpec {
            uuid: None,
            pool_type: PoolType::Dir,
            path: pool_dir.display().to_string(),
            autostart: false,
            active: None,
            node_selector: None,
        },
    ))
    .expect("pool");
    st.create_volume(&StorageVol::new(
        name,
        StorageVolSpec {
            pool: "p".into(),
            capacity: Quantity("1Mi".into()),
            allocation: None,
            format: Default::default(),
            source,
            node_name: None,
        },
    ))
    .expect("volume")
}

fn run_dir(root: &Path, conn: &Connection, name: &str) -> std::path::PathBuf {
    let uuid = conn
        .hypervisor()
        .lookup_domain(Lookup::Name(name))
        .expect("lookup")
        .uuid;
    root.join("run").join(uuid)
}

fn pid_of(root: &Path, conn: &Connection, name: &str) -> u32 {
    std::fs::read_to_string(run_dir(root, conn, name).join("pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn expect_state(conn: &Connection, name: &str, state: DomainState, reason: DomainReason) {
    let got = wait_for_state(conn, name, state, T).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(
        got, reason,
        "domain '{name}' is {state} but for reason {got}"
    );
}

fn console(root: &Path, conn: &Connection, name: &str) -> String {
    std::fs::read_to_string(run_dir(root, conn, name).join("console.log")).unwrap_or_default()
}

fn wait_console(root: &Path, conn: &Connection, name: &str, needle: &str, count: usize) -> String {
    let start = Instant::now();
    loop {
        let text = console(root, conn, name);
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            start.elapsed() < T,
            "no '{needle}' (x{count}) on the console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn kvm_domain_lifecycle_with_test_guest_and_disk() {
    if !kvm_available("kvm_domain_lifecycle_with_test_guest_and_disk") {
        return;
    }
    let root = fresh_root("kvm-life");
    let conn = open(&root);
    // A dir pool and a raw volume the guest writes, zeroed first.
    let vol = pool_with_volume(&root, &conn, "disk0", None);
    std::fs::write(&vol.path, vec![0u8; 1 << 20]).expect("volume file");

    let hv = conn.hypervisor();
    let name = "life";
    let mut d = test_guest_domain(name, "");
    // Two vCPUs, so that vcpuinfo below has threads to tell apart.
    d.spec.vcpus = 2;
    d.spec.devices.disks.push(Disk {
        name: "vda".into(),
        volume: "disk0".into(),
        ..Default::default()
    });
    // A cloud-init seed rides along as a second, read-only virtio disk.
    d.spec.cloud_init = Some(vireo_crds::CloudInit {
        hostname: Some("life".into()),
        ..Default::default()
    });
    hv.define_domain(&d).expect("define");
    let started = Instant::now();
    let first = hv.start_domain(name).expect("start");
    let text = wait_console(&root, &conn, name, "VIREO-TEST-GUEST-DONE", 1);
    let seed = run_dir(&root, &conn, name).join("cidata.img");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid_of(&root, &conn, name)))
        .expect("vireo-vmm's command line");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(&format!("--disk {},readonly", seed.display())),
        "{cmdline}"
    );
    let image = std::fs::read(&seed).expect("the seed");
    assert_eq!(&image[0x2B..0x36], b"CIDATA     ", "a FAT labelled CIDATA");
    say(&format!(
        "kvm lifecycle: guest report {:?} after start",
        started.elapsed()
    ));
    assert!(text.contains(MARKER));
    assert!(
        text.contains("blk0: capacity=2048 write=ok read=ok verify=ok"),
        "console:\n{text}"
    );
    assert!(
        text.contains("rng0: read=64 nonzero=yes"),
        "console:\n{text}"
    );
    let data = std::fs::read(&vol.path).expect("read volume");
    assert!(
        data[512..].starts_with(b"VIREO-TEST-SECTOR"),
        "the sector the guest wrote is in the file"
    );
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);

    // domblkstat: the guest's one write, read and flush of vda, by the
    // disk's target or its volume.
    for key in ["vda", "disk0"] {
        let stats: std::collections::BTreeMap<String, i64> = hv
            .domain_block_stats(name, key)
            .expect("block statistics")
            .into_iter()
            .collect();
        let at = |k: &str| stats.get(&format!("vda {k}")).copied();
        assert_eq!(
            [
                "rd_req",
                "rd_bytes",
                "wr_req",
                "wr_bytes",
                "flush_operations",
                "errs"
            ]
            .map(at),
            [Some(1), Some(512), Some(1), Some(512), Some(1), Some(0)],
            "{stats:?}"
        );
        assert!(at("wr_total_times").is_some_and(|t| t > 0), "{stats:?}");
    }
    let err = hv
        .domain_block_stats(name, "vdz")
        .expect_err("no such disk");
    assert!(err.to_string().contains("vdz"), "{err}");

    // vcpuinfo: each vCPU's thread in vireo-vmm, with its CPU and CPU time.
    let vcpus = hv.domain_vcpu_info(name).expect("vcpuinfo");
    assert_eq!(vcpus.len(), d.spec.vcpus as usize, "{vcpus:?}");
    assert_eq!(vcpus.len(), 2, "{vcpus:?}");
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v.number as usize, i, "{vcpus:?}");
        assert!(v.cpu.is_some() && v.cpu_time_ns.is_some(), "{vcpus:?}");
        assert_eq!(v.state.as_deref(), Some("running"), "{vcpus:?}");
    }

    hv.suspend_domain(name).expect("suspend");
    expect_state(&conn, name, DomainState::Paused, DomainReason::User);
    hv.resume_domain(name).expect("resume");
    expect_state(&conn, name, DomainState::Running, DomainReason::Unpaused);

    hv.shutdown_domain(name).expect("shutdown");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Shutdown);
    let exit =
        std::fs::read_to_string(run_dir(&root, &conn, name).join("exit.json")).unwrap_or_default();
    assert!(
        exit.contains("poweroff"),
        "the guest powered off on Ctrl-Alt-Del: {exit}"
    );

    let second = hv.start_domain(name).expect("start again");
    assert!(
        second.id.is_some() && second.id != first.id,
        "a new ID: {first:?} then {second:?}"
    );
    hv.destroy_domain(name).expect("destroy");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Destroyed);
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn kvm_new_driver_readopts_and_killed_vmm_is_crashed() {
    if !kvm_available("kvm_new_driver_readopts_and_killed_vmm_is_crashed") {
        return;
    }
    let root = fresh_root("kvm-adopt");
    let name = "adopt";
    let (id, pid) = {
        let conn = open(&root);
        conn.hypervisor()
            .define_domain(&test_guest_domain(name, ""))
            .expect("define");
        let r = conn.hypervisor().start_domain(name).expect("start");
        wait_console(&root, &conn, name, MARKER, 1);
        (r.id, pid_of(&root, &conn, name))
    };
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "vireo-vmm outlives the driver"
    );
    let conn = open(&root);
    let hv = conn.hypervisor();
    assert_eq!(
        hv.lookup_domain(Lookup::Name(name)).expect("lookup").id,
        id,
        "same ID"
    );
    assert_eq!(pid_of(&root, &conn, name), pid, "the same process");
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);
    assert_eq!(
        console(&root, &conn, name).matches(MARKER).count(),
        1,
        "not restarted"
    );

    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Crashed);
    hv.start_domain(name).expect("start after a crash");
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);
    hv.destroy_domain(name).expect("destroy");
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

/// A guest that reports a kernel panic through pvpanic (the test guest's
/// `vireo.panic=1`) is a crash, handed to `lifecycle.onCrash`: destroy
/// leaves it shutoff (crashed); restart launches it again.
#[test]
fn kvm_guest_panic_follows_on_crash() {
    if !kvm_available("kvm_guest_panic_follows_on_crash") {
        return;
    }
    let root = fresh_root("kvm-panic");
    let conn = open(&root);
    let hv = conn.hypervisor();

    let mut d = test_guest_domain("panics", "vireo.panic=1");
    d.spec.lifecycle.on_crash = vireo_crds::LifecycleAction::Destroy;
    hv.define_domain(&d).expect("define");
    hv.start_domain("panics").expect("start");
    expect_state(&conn, "panics", DomainState::Shutoff, DomainReason::Crashed);
    let exit = std::fs::read_to_string(run_dir(&root, &conn, "panics").join("exit.json"))
        .unwrap_or_default();
    assert!(exit.contains("pvpanic"), "the VMM said why: {exit}");
    hv.undefine_domain("panics").expect("undefine");

    let mut d = test_guest_domain("again", "vireo.panic=1");
    d.spec.lifecycle.on_crash = vireo_crds::LifecycleAction::Restart;
    hv.define_domain(&d).expect("define");
    let first = hv.start_domain("again").expect("start");
    // It panics at once every time: two different VMM processes seen is
    // a launch after a crash.
    let mut pids = std::collections::BTreeSet::new();
    let start = Instant::now();
    while pids.len() < 2 {
        assert!(
            start.elapsed() < T,
            "not launched again after its panic (VMMs seen: {pids:?})"
        );
        if let Some(p) = std::fs::read_to_string(run_dir(&root, &conn, "again").join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            pids.insert(p);
        }
        // Each look lets the driver notice the exit and apply onCrash.
        let _ = hv.domain_info("again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (state, _) = hv.domain_state("again").expect("state");
    assert_ne!(state, DomainState::Shutoff, "restart keeps it going");
    assert_eq!(
        hv.lookup_domain(Lookup::Name("again")).expect("lookup").id,
        first.id,
        "restart is the same activation"
    );
    hv.destroy_domain("again").expect("destroy");
    hv.undefine_domain("again").expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn kvm_refuses_a_disk_still_waiting_for_its_upload() {
    if !kvm_available("kvm_refuses_a_disk_still_waiting_for_its_upload") {
        return;
    }
    let root = fresh_root("kvm-await");
    let conn = open(&root);
    let st = conn.storage();
    pool_with_volume(
        &root,
        &conn,
        "img",
        Some(vireo_crds::VolumeSource {
            upload: Some(vireo_crds::UploadSource {}),
            ..Default::default()
        }),
    );
    let hv = conn.hypervisor();
    let name = "await";
    let mut d = test_guest_domain(name, "");
    d.spec.devices.disks.push(Disk {
        name: "vda".into(),
        volume: "img".into(),
        ..Default::default()
    });
    hv.define_domain(&d).expect("define");
    let e = hv.start_domain(name).expect_err("a placeholder disk");
    assert!(e.to_string().contains("is waiting for its content"), "{e}");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Unknown);

    let content = vec![0u8; 1 << 20];
    st.upload_volume(
        "p",
        "img",
        &mut &content[..],
        Some(content.len() as u64),
        &vireo_drivers::storage::no_progress,
    )
    .expect("upload");
    hv.start_domain(name)
        .expect("starts once the content is there");
    wait_console(&root, &conn, name, MARKER, 1);
    hv.destroy_domain(name).expect("destroy");
}

/// The kernel can be a volume (`spec.os.kernelVolume`) instead of a file in
/// a boot directory: the test guest's image, uploaded into a raw volume,
/// boots; a kernel volume that is not there is refused, naming the field.
#[test]
fn kvm_boots_a_kernel_from_a_volume() {
    if !kvm_available("kvm_boots_a_kernel_from_a_volume") {
        return;
    }
    let root = fresh_root("kvm-kvol");
    let conn = open(&root);
    let st = conn.storage();
    pool_with_volume(&root, &conn, "guest-kernel", None);
    let mut d = test_guest_domain("kvol", "");
    let os = d.spec.os.as_mut().expect("os");
    let image = std::fs::read(os.kernel.take().expect("the test guest's kernel")).expect("image");
    os.kernel_volume = Some("guest-kernel".into());
    // The volume must hold the image: make it big enough, then upload.
    st.resize_volume(
        "p",
        "guest-kernel",
        (image.len() as u64).next_multiple_of(1 << 20),
        Default::default(),
    )
    .expect("resize");
    st.upload_volume(
        "p",
        "guest-kernel",
        &mut &image[..],
        Some(image.len() as u64),
        &vireo_drivers::storage::no_progress,
    )
    .expect("upload");
    let hv = conn.hypervisor();
    hv.define_domain(&d).expect("define");
    hv.start_domain("kvol").expect("start");
    wait_console(&root, &conn, "kvol", MARKER, 1);
    // What the domain was defined with stays a volume reference.
    let live = hv
        .domain_definition("kvol", false)
        .expect("live definition");
    let os = live.spec.os.expect("os");
    assert_eq!(
        (os.kernel, os.kernel_volume.as_deref()),
        (None, Some("guest-kernel"))
    );
    hv.destroy_domain("kvol").expect("destroy");

    // A kernel volume that is not there is refused, naming the field.
    let mut missing = test_guest_domain("kvol2", "");
    let os = missing.spec.os.as_mut().expect("os");
    os.kernel = None;
    os.kernel_volume = Some("nowhere".into());
    hv.define_domain(&missing).expect("define");
    let e = hv.start_domain("kvol2").expect_err("no such volume");
    assert!(
        e.to_string()
            .contains("spec.os.kernelVolume: no volume 'nowhere'"),
        "{e}"
    );
}

/// Every kvm Domain has a vsock device whose host side is `vsock.sock` in
/// its run directory: a host client reaches the test guest listening on a
/// vsock port and gets its bytes echoed.
#[test]
fn kvm_domain_vsock_socket_reaches_the_guest() {
    use std::io::{Read, Write};
    if !kvm_available("kvm_domain_vsock_socket_reaches_the_guest") {
        return;
    }
    let root = fresh_root("kvm-vsock");
    let conn = open(&root);
    let hv = conn.hypervisor();
    let name = "vs";
    hv.define_domain(&test_guest_domain(name, "vireo.vsock=listen:5000"))
        .expect("define");
    hv.start_domain(name).expect("start");
    wait_console(
        &root,
        &conn,
        name,
        "VIREO-TEST vsock: listening on port 5000",
        1,
    );
    let text = console(&root, &conn, name);
    assert!(
        text.contains(&format!(
            "VIREO-TEST vsock0: cid={}",
            vireo_drivers::kvm::VSOCK_GUEST_CID
        )),
        "{text}"
    );
    let sock = run_dir(&root, &conn, name).join("vsock.sock");
    let cmdline =
        std::fs::read(format!("/proc/{}/cmdline", pid_of(&root, &conn, name))).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(&format!("--vsock cid=3,uds={}", sock.display())),
        "{cmdline}"
    );
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("vsock socket");
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).expect("OK line") == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    s.write_all(b"hello guest\n").unwrap();
    let mut echo = [0u8; 12];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello guest\n");
    // The guest agent channel is this socket, port 4100: nothing listens
    // there in the test guest, so the agent is "not responding" (refused, not timed out).
    let e = hv.guest_info(name).expect_err("no agent in the test guest");
    assert!(
        matches!(e, vireo_drivers::Error::AgentUnresponsive { .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("vsock port 4100: nothing listens"),
        "{e}"
    );
    hv.destroy_domain(name).expect("destroy");
    say(&format!(
        "vsock: {} echoed through the guest",
        sock.display()
    ));
}

/// The driver confines vireo-vmm (docs/vmm.md, "Confinement"): as root it
/// runs jailed — no capabilities, `no_new_privs`, a root holding only the
/// run directory — and a system call outside the seccomp filter's list
/// kills it, which the driver reports as a crash (not a hang).
#[test]
fn kvm_vmm_is_jailed_and_a_forbidden_syscall_is_a_crash() {
    let test = "kvm_vmm_is_jailed_and_a_forbidden_syscall_is_a_crash";
    if !kvm_available(test) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: not root, and CI is set"
        );
        say(&format!(
            "SKIP {test}: the driver jails vireo-vmm only as root"
        ));
        return;
    }
    let root = fresh_root("kvm-jail");
    let name = "jailed";
    let conn = open(&root);
    let hv = conn.hypervisor();
    hv.define_domain(&test_guest_domain(name, ""))
        .expect("define");
    hv.start_domain(name).expect("start");
    wait_console(&root, &conn, name, MARKER, 1);
    let pid = pid_of(&root, &conn, name);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    for (field, want) in [
        ("CapEff:", "0000000000000000"),
        ("NoNewPrivs:", "1"),
        ("Seccomp:", "2"),
    ] {
        let got = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(str::trim);
        assert_eq!(got, Some(want), "{field}\n{status}");
    }
    let dir = run_dir(&root, &conn, name).canonicalize().expect("run dir");
    let jail_root = format!("/proc/{pid}/root");
    assert!(
        Path::new(&format!("{jail_root}{}", dir.join("api.sock").display())).exists(),
        "the run directory is inside the jail"
    );
    assert!(
        !Path::new(&format!("{jail_root}/etc")).exists(),
        "the host's /etc is not"
    );
    // The run directory's siblings (other Domains' run directories) are not
    // there either.
    let parent: Vec<_> =
        std::fs::read_dir(format!("{jail_root}{}", dir.parent().unwrap().display()))
            .expect("the run directory's parent in the jail")
            .map(|e| e.expect("entry").file_name())
            .collect();
    assert_eq!(parent, vec![dir.file_name().unwrap().to_owned()]);

    // A forbidden system call (the debug build's test hook on the API).
    let mut api = std::os::unix::net::UnixStream::connect(dir.join("api.sock")).expect("api");
    std::io::Write::write_all(&mut api, b"{\"command\":\"debug-forbidden-syscall\"}\n")
        .expect("request");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Crashed);
    assert!(
        !Path::new(&format!("/proc/{pid}/status")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.contains("State:\tZ")),
        "vireo-vmm is gone"
    );
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}

/// With boot directories configured (`&boot_dirs=` on the URI, as the agent
/// passes them; `/var/lib/vireo/boot` for `kvm:///system`), define refuses a
/// kernel or initrd outside them and outside the pools' volumes, naming the
/// field — after links and `..` are resolved — and defines nothing.
#[test]
fn kvm_define_refuses_boot_files_outside_the_boot_dirs_and_pools() {
    if !kvm_available("kvm_define_refuses_boot_files_outside_the_boot_dirs_and_pools") {
        return;
    }
    let root = fresh_root("kvm-hostpaths");
    vmm_binary();
    let guest = test_guest_domain("g", "");
    let kernel = std::path::PathBuf::from(
        guest
            .spec
            .os
            .as_ref()
            .and_then(|o| o.kernel.clone())
            .expect("kernel"),
    );
    let boot = kernel
        .parent()
        .expect("the test guest's directory")
        .to_path_buf();
    let outside = root.join("secret");
    std::fs::write(&outside, b"not a kernel").expect("outside file");
    let link = root.join("pool-link");
    std::os::unix::fs::symlink(&outside, &link).expect("link");
    let conn = vireo_drivers::open(&format!(
        "kvm:///embed?root={}&boot_dirs={}",
        root.display(),
        boot.display()
    ))
    .expect("opens kvm:///embed with boot_dirs");
    let hv = conn.hypervisor();
    let vol = pool_with_volume(&root, &conn, "kernel-vol", None);

    let with = |name: &str, kernel: &str, initrd: Option<&str>| {
        let mut d = test_guest_domain(name, "");
        let os = d.spec.os.as_mut().expect("os");
        os.kernel = Some(kernel.to_string());
        os.initrd = initrd.map(str::to_string);
        d
    };
    // Allowed: the boot directory, and a pool's volume by its path.
    hv.define_domain(&with("in-boot", kernel.to_str().unwrap(), None))
        .expect("a kernel in the boot directory");
    hv.define_domain(&with("in-pool", &vol.path, None))
        .expect("a kernel that is a pool volume");
    // `..` is refused outright (the CRD's rule and `validate`), even
    // when it would stay inside.
    let dotted = format!(
        "{}/../{}/{}",
        boot.display(),
        boot.file_name().unwrap().to_str().unwrap(),
        kernel.file_name().unwrap().to_str().unwrap()
    );
    let e = hv
        .define_domain(&with("dotted", &dotted, None))
        .expect_err("a path with ..");
    assert!(
        e.to_string().contains("spec.os.kernel: ") && e.to_string().contains("without '..'"),
        "{e}"
    );

    for (name, k, i, field) in [
        ("shadow", "/etc/shadow", None, "spec.os.kernel"),
        ("outside", outside.to_str().unwrap(), None, "spec.os.kernel"),
        ("link", link.to_str().unwrap(), None, "spec.os.kernel"),
        (
            "initrd",
            kernel.to_str().unwrap(),
            Some("/etc/hostname"),
            "spec.os.initrd",
        ),
    ] {
        let e = hv
            .define_domain(&with(name, k, i))
            .expect_err("a boot file outside the boot dirs and pools");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{field}: '"))
                && msg.contains("is outside the node's storage pools and its boot directories"),
            "{name}: {msg}"
        );
        assert!(
            hv.lookup_domain(Lookup::Name(name)).is_err(),
            "{name}: nothing defined"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
