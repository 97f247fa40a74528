//! Network namespaces of a test's own, for the migration tests' two
//! "nodes": each driver runs its guests' processes from a thread inside its
//! namespace, and a veth pair is the wire between them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A program on PATH or in the sbin directories.
pub fn find(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Runs a program that must succeed; returns what it printed.
pub fn run(program: &str, args: &[&str]) -> String {
    let bin = find(program).unwrap_or_else(|| PathBuf::from(program));
    let out = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace `vireo-TAG-XXXXXXXX`, deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("vireo-{tag}-{}", &id[..8]);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace (setns(2) is per thread;
    /// the processes a driver starts there, and the sockets made there,
    /// belong to it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file =
                    File::open(format!("/run/netns/{}", self.name)).expect("opens the namespace");
                // SAFETY: setns on a descriptor we own; it moves only this
                // thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the thread in the namespace panicked")
        })
    }

    /// Joins this namespace to `other` with a veth pair (`PREFIXa…` here,
    /// `PREFIXb…` there, named after this namespace), the two addresses
    /// (`10.77.0.1/24`) up.
    pub fn link(&self, other: &Netns, prefix: &str, addrs: [&str; 2]) {
        let tail = &self.name[self.name.len() - 6..];
        let (a, b) = (format!("{prefix}a{tail}"), format!("{prefix}b{tail}"));
        run(
            "ip",
            &[
                "-n",
                &self.name,
                "link",
                "add",
                &a,
                "type",
                "veth",
                "peer",
                "name",
                &b,
                "netns",
                &other.name,
            ],
        );
        for (ns, dev, addr) in [(self, &a, addrs[0]), (other, &b, addrs[1])] {
            run("ip", &["-n", &ns.name, "addr", "add", addr, "dev", dev]);
            run("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(find("ip").unwrap_or_else(|| "ip".into()))
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// One "node" of a migration test: its namespace, a driver opened on a
/// state directory of its own, and that directory's started dir pool `p`.
/// Dropped, it destroys whatever still runs there (no VM process outlives
/// a failed test).
pub struct Node {
    pub ns: Netns,
    pub root: std::path::PathBuf,
    pub conn: vireo_drivers::Connection,
    pub storage: std::sync::Arc<vireo_drivers::storage::dir::DirStorage>,
    pub pool_dir: std::path::PathBuf,
}

/// A driver's `open_with` (`vireo_drivers::qemu::open_with`, `kvm::`).
pub type OpenWith = fn(
    &str,
    &str,
    std::sync::Arc<dyn vireo_drivers::NetworkDriver>,
    std::sync::Arc<dyn vireo_drivers::StorageDriver>,
) -> Result<vireo_drivers::Connection, String>;

impl Node {
    /// `scheme`: `qemu` or `kvm`; `tag` names the namespace and the root.
    pub fn new(scheme: &str, tag: &str, open_with: OpenWith) -> Self {
        let ns = Netns::new(tag);
        let root = super::fresh_root(tag);
        let (storage, pool_dir) = super::started_pool(&root);
        let networks = std::sync::Arc::new(vireo_drivers::test::TestDriver::default_node());
        let conn = open_with(
            &format!("{scheme}:///embed?root={}", root.display()),
            &format!("/embed?root={}", root.display()),
            networks,
            storage.clone(),
        )
        .unwrap_or_else(|e| panic!("opens the {scheme} driver: {e}"));
        Self {
            ns,
            root,
            conn,
            storage,
            pool_dir,
        }
    }

    pub fn info(&self, name: &str) -> Option<(vireo_crds::DomainState, vireo_crds::DomainReason)> {
        self.conn
            .hypervisor()
            .domain_info(name)
            .ok()
            .map(|i| (i.state, i.reason))
    }

    /// The domain's run directory (its console log, pid file).
    pub fn run_dir(&self, name: &str) -> std::path::PathBuf {
        let uuid = self
            .conn
            .hypervisor()
            .lookup_domain(vireo_drivers::Lookup::Name(name))
            .expect("lookup")
            .uuid;
        self.root.join("run").join(uuid)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let hv = self.conn.hypervisor();
        for d in hv
            .list_domains(vireo_drivers::ListFilter::Active)
            .unwrap_or_default()
        {
            let _ = hv.destroy_domain(&d.name);
        }
    }
}
