//! Helpers shared by the driver tests that boot the real Linux guest image.

#![allow(dead_code)]

pub mod netns;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vireo_crds::{Domain, DomainDevices, DomainSpec, DomainType, Lifecycle, OsSpec, RunStrategy};

pub const QEMU: &str = "qemu-system-x86_64";

/// A console log as text; empty until the file exists.
pub fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The numbers printed right after each `prefix` past byte `from` of a
/// console log (a guest's counter: `TICK-7`, `VIREO-TEST counter 7`).
pub fn numbers_after(log: &Path, from: usize, prefix: &str) -> Vec<u64> {
    log_text(log)
        .get(from..)
        .unwrap_or_default()
        .split(prefix)
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

/// A line on stderr, shown even when the test passes (`--nocapture` or not,
/// the harness keeps stderr of passing tests hidden, so also in failures).
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("drivers/ has a parent")
        .to_path_buf()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Whether QEMU is here; when it is not, fails under CI and skips otherwise.
pub fn qemu_available(test: &str) -> bool {
    if on_path(QEMU) {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {QEMU} is missing and CI is set (scripts/setup installs qemu-system-x86)");
    }
    say(&format!(
        "SKIP {test}: {QEMU} not found (apt-get install qemu-system-x86); not run"
    ));
    false
}

/// Runs scripts/guest-image.sh once per test binary; its last stdout line is
/// the directory holding vmlinuz and initrd.img.
pub fn guest_image() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts/guest-image.sh"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("runs scripts/guest-image.sh");
        assert!(
            out.status.success(),
            "scripts/guest-image.sh failed: {}",
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("guest-image.sh prints its directory")
                .trim(),
        )
    })
}

/// A fresh, short state directory (unix socket paths must stay under 108
/// bytes, so not under a deep target directory).
pub fn fresh_root(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vireo-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creates the state directory");
    dir
}

/// A `type: qemu` domain booting the guest image. `cmdline` is appended to
/// the console settings.
pub fn linux_domain(name: &str, machine: Option<&str>, cmdline: &str) -> Domain {
    let image = guest_image();
    Domain::new(
        name,
        DomainSpec {
            domain_type: DomainType::Qemu,
            arch: None,
            uuid: None,
            memory: Quantity("256Mi".into()),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: Some(OsSpec {
                machine: machine.map(str::to_string),
                kernel: Some(image.join("vmlinuz").display().to_string()),
                initrd: Some(image.join("initrd.img").display().to_string()),
                cmdline: Some(format!("console=ttyS0 quiet {cmdline}").trim().to_string()),
                ..Default::default()
            }),
            devices: DomainDevices::default(),
            cloud_init: None,
            run_strategy: RunStrategy::Manual,
            lifecycle: Lifecycle::default(),
            node_selector: None,
            eviction_strategy: None,
        },
    )
}

/// Whether /dev/kvm opens; when it does not, fails under CI and skips
/// otherwise.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: /dev/kvm cannot be opened and CI is set");
        }
        say(&format!("SKIP {test}: /dev/kvm cannot be opened; not run"));
    }
    ok
}

/// Builds vireo-vmm (cargo, once per test binary) and points the kvm
/// driver at it through VIREO_VMM.
pub fn vmm_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "vireo-vmm", "--bin", "vireo-vmm"])
            .current_dir(repo_root())
            .status()
            .expect("runs cargo build");
        assert!(status.success(), "cargo build -p vireo-vmm failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        let bin = target.join("debug/vireo-vmm");
        // SAFETY (std): set once, before any driver reads it, under OnceLock.
        unsafe { std::env::set_var("VIREO_VMM", &bin) };
        bin
    })
}

/// Builds the test guest (vmm/guest/build.sh) once per test binary.
pub fn test_guest() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let out_dir = std::env::temp_dir().join(format!("vireo-test-guest-{}", std::process::id()));
        let out = Command::new(repo_root().join("vmm/guest/build.sh"))
            .arg(&out_dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("runs vmm/guest/build.sh");
        assert!(out.status.success(), "vmm/guest/build.sh failed");
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .expect("build.sh prints the ELF")
                .trim(),
        )
    })
}

/// A `type: kvm` domain booting the test guest.
pub fn test_guest_domain(name: &str, cmdline: &str) -> Domain {
    Domain::new(
        name,
        DomainSpec {
            domain_type: DomainType::Kvm,
            arch: None,
            uuid: None,
            memory: Quantity("32Mi".into()),
            current_memory: None,
            vcpus: 1,
            max_vcpus: None,
            os: Some(OsSpec {
                machine: None,
                kernel: Some(test_guest().display().to_string()),
                initrd: None,
                cmdline: Some(format!("console=ttyS0 {cmdline}").trim().to_string()),
                ..Default::default()
            }),
            devices: DomainDevices::default(),
            cloud_init: None,
            run_strategy: RunStrategy::Manual,
            lifecycle: Lifecycle::default(),
            node_selector: None,
            eviction_strategy: None,
        },
    )
}

/// A dir pool for the conformance suite, on a filesystem of its own: each
/// pool name gets a 256 MiB tmpfs (when we are root), so that the suite's
/// checks on the pool's allocation see only what the case itself did, not
/// other tests or builds writing to the same disk. The pool's directory is
/// made already, as `create_pool` (no build) needs it.
pub fn dir_pool(name: &str) -> vireo_crds::StoragePool {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static MOUNTED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let base = pools_root();
    let fs = base.join(name);
    let mut mounted = MOUNTED
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !mounted.contains(name) {
        std::fs::create_dir_all(&fs).expect("creates the pool's mount point");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let ok = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
                .arg(&fs)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot mount a tmpfs on {}", fs.display());
        } else {
            say(&format!(
                "NOTE dir pool {name}: not root, so no tmpfs of its own; its sizes may move with other writers on the same disk"
            ));
        }
        mounted.insert(name.to_string());
    }
    let path = fs.join("pool");
    std::fs::create_dir_all(&path).expect("creates the pool directory");
    vireo_crds::StoragePool::new(
        name,
        vireo_crds::StoragePoolSpec {
            uuid: None,
            pool_type: vireo_crds::PoolType::Dir,
            path: path.display().to_string(),
            autostart: false,
            active: None,
            node_selector: None,
        },
    )
}

/// `/tmp/vireo-pools-<pid>`; the first call unmounts and removes what
/// earlier test processes (no longer running) left.
fn pools_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix("vireo-pools-") else {
                    continue;
                };
                if Path::new("/proc").join(pid).exists() {
                    continue;
                }
                if let Ok(subs) = std::fs::read_dir(e.path()) {
                    for s in subs.filter_map(|s| s.ok()) {
                        let _ = Command::new("umount").arg("-l").arg(s.path()).status();
                    }
                }
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let root = tmp.join(format!("vireo-pools-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("creates the pools' root");
        root
    })
    .clone()
}

/// A manifest from YAML text (a test's own, so a mistake panics).
pub fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml_ng::from_str(text).expect("manifest")
}

/// The dir backend with its state in ROOT/storage and a started pool `p`
/// whose directory is ROOT/pool, for tests that put guests' disks in
/// volumes.
pub fn started_pool(
    root: &Path,
) -> (
    std::sync::Arc<vireo_drivers::storage::dir::DirStorage>,
    PathBuf,
) {
    use vireo_drivers::StorageDriver;
    let pool_dir = root.join("pool");
    let storage = std::sync::Arc::new(
        vireo_drivers::storage::dir::DirStorage::open(&root.join("storage"), Path::new("/"))
            .expect("opens the dir backend"),
    );
    let pool: vireo_crds::StoragePool = yaml(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: p}}\nspec: {{type: dir, path: {}}}\n",
        pool_dir.display()
    ));
    storage.define_pool(&pool).expect("define pool");
    storage.build_pool("p").expect("build");
    storage.start_pool("p").expect("start");
    (storage, pool_dir)
}

/// How long a test waits for a domain to reach a state.
pub const STATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `qemu:///embed?root=ROOT`.
pub fn open_qemu(root: &Path) -> vireo_drivers::Connection {
    vireo_drivers::open(&format!("qemu:///embed?root={}", root.display()))
        .expect("opens qemu:///embed")
}

/// The console log of a domain of an embedded vm driver rooted at `root`.
pub fn console_log(root: &Path, conn: &vireo_drivers::Connection, name: &str) -> PathBuf {
    let uuid = conn
        .hypervisor()
        .lookup_domain(vireo_drivers::Lookup::Name(name))
        .expect("lookup")
        .uuid;
    root.join("run").join(uuid).join("console.log")
}

/// Waits up to [`STATE_TIMEOUT`] for `state` and checks its reason.
pub fn expect_state(
    conn: &vireo_drivers::Connection,
    name: &str,
    state: vireo_crds::DomainState,
    reason: vireo_crds::DomainReason,
) {
    let got = vireo_drivers::conformance::wait_for_state(conn, name, state, STATE_TIMEOUT)
        .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(
        got, reason,
        "domain '{name}' is {state} but for reason {got}"
    );
}
