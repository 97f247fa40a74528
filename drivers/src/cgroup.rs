//! Keeping guests alive when the agent's pod goes: a process the agent
//! starts for a node (a guest's QEMU or vireo-vmm, a network's dnsmasq) is
//! moved out of the pod's cgroups.
//!
//! When a pod's container is stopped or deleted, the container runtime kills
//! every process in the container's cgroups (in each cgroup v1 hierarchy, and
//! the unified one), whatever its session or parent. A process left in any
//! one of them dies with the agent. So after launching one, the agent looks
//! at the process's cgroups and, for each path that runs through kubelet's
//! `kubepods` tree (`/kubepods/...` with the cgroupfs driver,
//! `/kubepods.slice/...` with systemd's), moves it to a sibling of that tree:
//! `PREFIX/vireo` (or `PREFIX/vireo.slice`), where `PREFIX` is what comes
//! before `kubepods` (kubelet's `cgroupRoot`). Outside a pod (standalone mode,
//! tests, an agent run as a plain process) the paths hold no `kubepods` and
//! nothing moves.
//!
//! Inside a container a cgroup v1 mount usually shows only the container's
//! own cgroup (its mount root is that path), so the hierarchy's root is
//! looked for among the visible mounts (the node's `/sys/fs/cgroup` under the
//! agent's host root, say) and, failing that, mounted privately under
//! `/run/vireo/cgroup` (a privileged agent can; the kernel hands back the
//! existing hierarchy for the same options).
//!
//! The cost: guests are not counted in the agent pod's memory or CPU
//! (which is what a pod limit sized for the agent needs anyway); the node's
//! resources are shared out by the Host's allocatable, not by kubelet.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Where the agent mounts a hierarchy it finds no usable mount of.
const PRIVATE_MOUNTS: &str = "/run/vireo/cgroup";

/// One line of `/proc/PID/cgroup`: `ID:CONTROLLERS:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// `cpu,cpuacct`, `name=systemd`; empty for the unified (v2) hierarchy.
    pub controllers: String,
    pub path: String,
}

/// Parses `/proc/PID/cgroup`.
pub fn memberships(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_string();
            let path = parts.next()?.to_string();
            Some(Membership { controllers, path })
        })
        .collect()
}

/// Where a process in `path` goes to leave its pod, or `None` when `path`
/// is not in kubelet's `kubepods` tree.
pub fn outside_pod(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let at = parts.iter().position(|p| p.starts_with("kubepods"))?;
    let name = if parts[at].ends_with(".slice") {
        "vireo.slice"
    } else {
        "vireo"
    };
    let mut out = String::new();
    for p in &parts[..at] {
        out.push('/');
        out.push_str(p);
    }
    out.push('/');
    out.push_str(name);
    Some(out)
}

/// A cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The path inside the hierarchy that the mount shows at its top.
    pub root: String,
    pub mount_point: PathBuf,
    /// `cgroup2`, or the v1 hierarchy's controllers as in /proc/PID/cgroup.
    pub controllers: String,
}

/// The cgroup mounts of a mountinfo text.
pub fn mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let controllers = match r[0] {
            "cgroup2" => String::new(),
            "cgroup" => {
                // Super options: rw,cpu,cpuacct or rw,name=systemd ...
                let known = [
                    "cpu",
                    "cpuacct",
                    "cpuset",
                    "memory",
                    "devices",
                    "freezer",
                    "net_cls",
                    "net_prio",
                    "blkio",
                    "perf_event",
                    "hugetlb",
                    "pids",
                    "rdma",
                    "misc",
                ];
                let mut c: Vec<&str> = r[2]
                    .split(',')
                    .filter(|o| known.contains(o) || o.starts_with("name="))
                    .collect();
                c.sort_unstable();
                c.join(",")
            }
            _ => continue,
        };
        out.push(Mount {
            root: unescape(l[3]),
            mount_point: PathBuf::from(unescape(l[4])),
            controllers,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(n) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(n as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn sorted(controllers: &str) -> String {
    let mut c: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
    c.sort_unstable();
    c.join(",")
}

/// The directory of cgroup `path` of the hierarchy `controllers` through
/// one of `mounts`, if one shows it.
pub fn directory(mounts: &[Mount], controllers: &str, path: &str) -> Option<PathBuf> {
    let want = sorted(controllers);
    mounts
        .iter()
        .filter(|m| m.controllers == want)
        .find_map(|m| {
            let root = m.root.trim_end_matches('/');
            let rest = path.strip_prefix(root)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            Some(m.mount_point.join(rest.trim_start_matches('/')))
        })
}

/// Moves process `pid` out of its pod's cgroups (see the module docs).
/// Returns what it moved, `hierarchy: from -> to`, empty outside a pod.
pub fn leave_pod(pid: u32) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
    let mut moved = Vec::new();
    let mut errors = Vec::new();
    for m in memberships(&text) {
        let Some(target) = outside_pod(&m.path) else {
            continue;
        };
        match move_to(pid, &m.controllers, &target) {
            Ok(()) => moved.push(format!("{}: {} -> {target}", label(&m), m.path)),
            Err(e) => errors.push(format!("{}: {e}", label(&m))),
        }
    }
    if errors.is_empty() {
        Ok(moved)
    } else {
        Err(format!(
            "process {pid} stays in its pod's cgroups, so it would die with the agent's pod: {}",
            errors.join("; ")
        ))
    }
}

fn label(m: &Membership) -> &str {
    if m.controllers.is_empty() {
        "unified"
    } else {
        &m.controllers
    }
}

fn move_to(pid: u32, controllers: &str, target: &str) -> Result<(), String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let dir = match directory(&mounts(&info), controllers, target) {
        Some(d) => d,
        None => {
            let root = mount_hierarchy(controllers)?;
            root.join(target.trim_start_matches('/'))
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if controllers.split(',').any(|c| c == "cpuset") {
        // A new cpuset has no CPUs or memory nodes until given some, and
        // refuses tasks until then: take its parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let mine = dir.join(file);
            let empty = std::fs::read_to_string(&mine)
                .map(|s| s.trim().is_empty())
                .unwrap_or(true);
            if empty && let Some(parent) = dir.parent() {
                let v = std::fs::read_to_string(parent.join(file))
                    .map_err(|e| format!("{}: {e}", parent.join(file).display()))?;
                std::fs::write(&mine, v.trim()).map_err(|e| format!("{}: {e}", mine.display()))?;
            }
        }
    }
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|e| format!("{}: {e}", procs.display()))
}

/// Mounts the hierarchy of `controllers` (empty: the unified one) under
/// [`PRIVATE_MOUNTS`], once, and returns where its root is.
fn mount_hierarchy(controllers: &str) -> Result<PathBuf, String> {
    let name = if controllers.is_empty() {
        "unified".to_string()
    } else {
        controllers.replace(['=', ','], "_")
    };
    let at = Path::new(PRIVATE_MOUNTS).join(name);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts(&info)
        .iter()
        .any(|m| m.mount_point == at && m.root == "/")
    {
        return Ok(at);
    }
    std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
    let (fstype, options) = if controllers.is_empty() {
        ("cgroup2", String::new())
    } else if controllers.starts_with("name=") {
        ("cgroup", format!("none,{controllers}"))
    } else {
        ("cgroup", controllers.to_string())
    };
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let (source, target, fs, opts) = (
        c("cgroup")?,
        c(&at.to_string_lossy())?,
        c(fstype)?,
        c(&options)?,
    );
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call; mount(2) reads them and keeps nothing.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting the {fstype} hierarchy '{controllers}' at {}: {}",
            at.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_through_kubepods_move_and_they_go_beside_it() {
        assert_eq!(outside_pod("/"), None);
        assert_eq!(outside_pod("/process_api/92c4"), None);
        assert_eq!(
            outside_pod("/vireo-node-1/kubepods/besteffort/pod1234/abcd"),
            Some("/vireo-node-1/vireo".into())
        );
        assert_eq!(
            outside_pod("/kubepods/burstable/pod1/c1"),
            Some("/vireo".into())
        );
        assert_eq!(
            outside_pod("/kubepods.slice/kubepods-burstable.slice/x.scope"),
            Some("/vireo.slice".into())
        );
    }

    #[test]
    fn proc_cgroup_lines_parse() {
        let m = memberships("9:name=systemd:/a\n4:cpu,cpuacct:/k/kubepods/p\n0::/\n");
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].controllers, "name=systemd");
        assert_eq!(m[1].controllers, "cpu,cpuacct");
        assert_eq!(m[1].path, "/k/kubepods/p");
        assert_eq!(m[2].controllers, "");
    }

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 /kubepods/besteffort/pod1/c1 /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpuacct,cpu
40 31 0:37 /kubepods/besteffort/pod1/c1 /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
90 80 0:29 / /host/sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
91 80 0:38 / /host/sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
92 80 0:40 / /host/with\\040space rw - ext4 /dev/vda rw
";

    #[test]
    fn a_mount_of_the_root_is_found_and_one_of_the_container_is_not() {
        let m = mounts(MOUNTINFO);
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(m[0].controllers, "cpu,cpuacct");
        // The container's own mount cannot reach a sibling of kubepods.
        assert_eq!(
            directory(&m, "cpu,cpuacct", "/vireo"),
            Some(PathBuf::from("/host/sys/fs/cgroup/cpu,cpuacct/vireo"))
        );
        // Inside its root, the container's mount serves.
        assert_eq!(
            directory(&m, "cpuacct,cpu", "/kubepods/besteffort/pod1/c1/x"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/x"))
        );
        assert_eq!(
            directory(&m, "", "/n1/vireo"),
            Some(PathBuf::from("/host/sys/fs/cgroup/unified/n1/vireo"))
        );
        // name=systemd is only mounted at the container's cgroup: mount it.
        assert_eq!(directory(&m, "name=systemd", "/vireo"), None);
        // A prefix that is not a path component does not match.
        assert_eq!(
            directory(&m, "name=systemd", "/kubepods/besteffort/pod1/c10"),
            None
        );
    }

    #[test]
    fn a_process_outside_any_pod_stays_where_it_is() {
        let moved = leave_pod(std::process::id()).expect("nothing to do outside a pod");
        if std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .contains("kubepods")
        {
            eprintln!("this test runs in a pod; moved: {moved:?}");
        } else {
            assert!(moved.is_empty(), "{moved:?}");
        }
    }
}
