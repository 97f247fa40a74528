//! What the agent reads from the guest: uname, /etc/os-release, the
//! network interfaces, the mount table with each file system's usage, and
//! the logged-in users from utmp. Readers of files take the file's text or
//! bytes, so tests can feed them anything.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::raw::c_char;

use serde_json::{Map, Value, json};

/// A C `char` array up to its first NUL (or its end), lossily as UTF-8.
fn c_chars(chars: &[c_char]) -> String {
    // `c_char` is i8 or u8 depending on the platform; `as u8` keeps the bits.
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// uname(2) fields.
#[derive(Debug, Clone, Default)]
pub struct Uname {
    pub nodename: String,
    pub release: String,
    pub version: String,
    pub machine: String,
}

pub fn uname() -> std::io::Result<Uname> {
    // SAFETY: utsname is plain data (char arrays), for which all-zero
    // bytes are a valid value; uname(2) only writes into the struct we
    // pass, which lives for the whole call.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the pointer is to a live, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Uname {
        nodename: c_chars(&u.nodename),
        release: c_chars(&u.release),
        version: c_chars(&u.version),
        machine: c_chars(&u.machine),
    })
}

/// Parses os-release(5) text: KEY=VALUE lines, values optionally in single
/// or double quotes (backslash escapes inside double quotes).
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let raw = raw.trim();
        let value = if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            let mut v = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        v.push(n);
                    }
                } else {
                    v.push(c);
                }
            }
            v
        } else if let Some(inner) = raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
            inner.to_string()
        } else {
            raw.to_string()
        };
        out.insert(key.trim().to_string(), value);
    }
    out
}

/// The `guest-get-osinfo` return value from os-release text (None: no
/// such file) and uname. Absent fields are left out, as the schema allows.
pub fn osinfo(os_release: Option<&str>, u: Option<&Uname>) -> Value {
    let mut m = Map::new();
    if let Some(u) = u {
        m.insert("kernel-release".into(), json!(u.release));
        m.insert("kernel-version".into(), json!(u.version));
        m.insert("machine".into(), json!(u.machine));
    }
    let rel = os_release.map(parse_os_release).unwrap_or_default();
    let fields = [
        ("ID", "id"),
        ("NAME", "name"),
        ("PRETTY_NAME", "pretty-name"),
        ("VERSION", "version"),
        ("VERSION_ID", "version-id"),
        ("VARIANT", "variant"),
        ("VARIANT_ID", "variant-id"),
    ];
    for (key, name) in fields {
        if let Some(v) = rel.get(key) {
            m.insert(name.into(), json!(v));
        }
    }
    // os-release(5): ID defaults to "linux", NAME to "Linux".
    if !m.contains_key("id") {
        m.insert("id".into(), json!("linux"));
    }
    if !m.contains_key("name") {
        m.insert("name".into(), json!("Linux"));
    }
    Value::Object(m)
}

/// One mount-table entry (/proc/self/mounts), octal escapes decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub mountpoint: String,
    pub fstype: String,
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let source = f.next()?;
            let mountpoint = f.next()?;
            let fstype = f.next()?;
            Some(Mount {
                source: unescape_mount(source),
                mountpoint: unescape_mount(mountpoint),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// Kernel-internal file systems: no storage, not reported by fsinfo.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "configfs",
    "mqueue",
    "hugetlbfs",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "efivarfs",
    "selinuxfs",
    "nsfs",
    "rpc_pipefs",
    "nfsd",
];

/// Further types that freezing makes no sense for (memory-backed,
/// read-only by nature, stacked or remote).
const NOT_FREEZABLE_FS: &[&str] = &[
    "tmpfs", "ramfs", "rootfs", "overlay", "squashfs", "iso9660", "nfs", "nfs4", "cifs", "smb3",
    "9p", "virtiofs", "fuse",
];

pub fn is_pseudo(fstype: &str) -> bool {
    PSEUDO_FS.contains(&fstype)
}

pub fn is_freezable(fstype: &str) -> bool {
    !is_pseudo(fstype) && !NOT_FREEZABLE_FS.contains(&fstype) && !fstype.starts_with("fuse.")
}

/// statvfs(3) of a path: (used, total for unprivileged users, total).
pub fn fs_usage(path: &str) -> Option<(u64, u64, u64)> {
    let c = CString::new(path).ok()?;
    // SAFETY: statvfs is plain integers, valid when all zero.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated string and `st` a live, writable
    // statvfs; statvfs(3) reads the one and writes the other only.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize;
    let blocks = st.f_blocks;
    let bfree = st.f_bfree;
    let bavail = st.f_bavail;
    let used = blocks.saturating_sub(bfree);
    Some((
        used.saturating_mul(frsize),
        used.saturating_add(bavail).saturating_mul(frsize),
        blocks.saturating_mul(frsize),
    ))
}

/// The name fsinfo reports: a device's kernel name (`/dev/vda1` → `vda1`),
/// or the mount source as given for other file systems.
fn fs_name(source: &str) -> String {
    match source.strip_prefix("/dev/") {
        Some(rest) => rest.rsplit('/').next().unwrap_or(rest).to_string(),
        None => source.to_string(),
    }
}

/// The `guest-get-fsinfo` return value from the mount-table text.
pub fn fsinfo(mounts_text: &str) -> Value {
    let list: Vec<Value> = parse_mounts(mounts_text)
        .into_iter()
        .filter(|m| !is_pseudo(&m.fstype))
        .map(|m| {
            let mut o = Map::new();
            o.insert("name".into(), json!(fs_name(&m.source)));
            o.insert("mountpoint".into(), json!(m.mountpoint));
            o.insert("type".into(), json!(m.fstype));
            if let Some((used, total, privileged)) = fs_usage(&m.mountpoint) {
                o.insert("used-bytes".into(), json!(used));
                o.insert("total-bytes".into(), json!(total));
                o.insert("total-bytes-privileged".into(), json!(privileged));
            }
            o.insert("disk".into(), json!([]));
            Value::Object(o)
        })
        .collect();
    Value::Array(list)
}

/// Interface counters from /proc/net/dev text, by interface name.
pub fn parse_net_dev(text: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let n: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if n.len() < 12 {
            continue;
        }
        out.insert(
            name.trim().to_string(),
            json!({
                "rx-bytes": n[0], "rx-packets": n[1], "rx-errs": n[2], "rx-dropped": n[3],
                "tx-bytes": n[8], "tx-packets": n[9], "tx-errs": n[10], "tx-dropped": n[11],
            }),
        );
    }
    out
}

#[derive(Debug, Default)]
struct Iface {
    hw: Option<String>,
    addrs: Vec<Value>,
}

/// Frees the getifaddrs(3) list when dropped.
struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from a successful getifaddrs(3) and
            // is freed exactly once, here.
            unsafe { libc::freeifaddrs(self.0) }
        }
    }
}

fn prefix_v4(mask: Ipv4Addr) -> u32 {
    u32::from(mask).count_ones()
}

fn prefix_v6(mask: Ipv6Addr) -> u32 {
    u128::from(mask).count_ones()
}

/// The `guest-network-get-interfaces` return value: interfaces in the
/// order getifaddrs(3) lists them; `net_dev` is /proc/net/dev's text.
pub fn interfaces(net_dev: Option<&str>) -> std::io::Result<Value> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head to the pointer we pass; on
    // success the list is ours until freeifaddrs (done by IfAddrs::drop).
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let list = IfAddrs(head);
    let mut order: Vec<String> = Vec::new();
    let mut ifaces: BTreeMap<String, Iface> = BTreeMap::new();
    let mut cur = list.0;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list getifaddrs built,
        // valid until the list is freed (after this loop).
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a non-null NUL-terminated string in the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        if !ifaces.contains_key(&name) {
            order.push(name.clone());
        }
        let entry = ifaces.entry(name).or_default();
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to at least a sockaddr
        // header; the family tells the full type, read below per family.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in; read_unaligned
                // because the list gives no alignment promise.
                let sin =
                    unsafe { std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in>()) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let prefix = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
                    let m = unsafe {
                        std::ptr::read_unaligned(ifa.ifa_netmask.cast::<libc::sockaddr_in>())
                    };
                    prefix_v4(Ipv4Addr::from(u32::from_be(m.sin_addr.s_addr)))
                };
                entry.addrs.push(json!({
                    "ip-address-type": "ipv4", "ip-address": ip.to_string(), "prefix": prefix,
                }));
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 =
                    unsafe { std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in6>()) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let prefix = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: the netmask of an AF_INET6 address is a sockaddr_in6.
                    let m = unsafe {
                        std::ptr::read_unaligned(ifa.ifa_netmask.cast::<libc::sockaddr_in6>())
                    };
                    prefix_v6(Ipv6Addr::from(m.sin6_addr.s6_addr))
                };
                entry.addrs.push(json!({
                    "ip-address-type": "ipv6", "ip-address": ip.to_string(), "prefix": prefix,
                }));
            }
            libc::AF_PACKET => {
                // SAFETY: an AF_PACKET address is a sockaddr_ll.
                let sll =
                    unsafe { std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_ll>()) };
                let len = usize::from(sll.sll_halen).min(sll.sll_addr.len());
                if len > 0 {
                    let hw: Vec<String> = sll.sll_addr[..len]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    entry.hw = Some(hw.join(":"));
                }
            }
            _ => {}
        }
    }
    drop(list);
    let stats = net_dev.map(parse_net_dev).unwrap_or_default();
    let out: Vec<Value> = order
        .into_iter()
        .filter_map(|name| {
            let iface = ifaces.remove(&name)?;
            let mut o = Map::new();
            o.insert("name".into(), json!(name));
            if let Some(hw) = iface.hw {
                o.insert("hardware-address".into(), json!(hw));
            }
            o.insert("ip-addresses".into(), Value::Array(iface.addrs));
            if let Some(s) = stats.get(&name) {
                o.insert("statistics".into(), s.clone());
            }
            Some(Value::Object(o))
        })
        .collect();
    Ok(Value::Array(out))
}

/// Size of glibc's `struct utmp` on Linux (x86_64 and the other 64-bit
/// ABIs with 32-bit ut_tv), and the offsets of the fields we read.
pub const UTMP_SIZE: usize = 384;
const UT_TYPE: usize = 0;
const UT_USER: usize = 44;
const UT_USER_LEN: usize = 32;
const UT_TV_SEC: usize = 340;
const UT_TV_USEC: usize = 344;
const USER_PROCESS: i16 = 7;

fn le_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_le_bytes(a)
}

/// The `guest-get-users` return value from utmp bytes: each user once,
/// with the earliest login time (seconds since the epoch, as a float).
pub fn users(utmp: &[u8]) -> Value {
    let mut first: BTreeMap<String, f64> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for rec in utmp.chunks_exact(UTMP_SIZE) {
        let ty = i16::from_le_bytes([rec[UT_TYPE], rec[UT_TYPE + 1]]);
        if ty != USER_PROCESS {
            continue;
        }
        let raw = &rec[UT_USER..UT_USER + UT_USER_LEN];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let user = String::from_utf8_lossy(&raw[..end]).into_owned();
        if user.is_empty() {
            continue;
        }
        let t = f64::from(le_i32(rec, UT_TV_SEC)) + f64::from(le_i32(rec, UT_TV_USEC)) / 1e6;
        match first.get_mut(&user) {
            Some(old) => {
                if t < *old {
                    *old = t;
                }
            }
            None => {
                first.insert(user.clone(), t);
                order.push(user);
            }
        }
    }
    Value::Array(
        order
            .into_iter()
            .map(|u| {
                let t = first.get(&u).copied().unwrap_or(0.0);
                json!({"user": u, "login-time": t})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quotes() {
        let m = parse_os_release(
            "# c\nNAME=\"Debian GNU/Linux\"\nID=debian\nVERSION='13 (trixie)'\nPRETTY_NAME=\"a \\\"b\\\"\"\n",
        );
        assert_eq!(m["NAME"], "Debian GNU/Linux");
        assert_eq!(m["ID"], "debian");
        assert_eq!(m["VERSION"], "13 (trixie)");
        assert_eq!(m["PRETTY_NAME"], "a \"b\"");
        let v = osinfo(None, None);
        assert_eq!(v["id"], "linux");
    }

    #[test]
    fn mounts_unescape_and_filter() {
        let text = "/dev/vda1 / ext4 rw 0 0\nproc /proc proc rw 0 0\n/dev/vdb /mnt/my\\040disk ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n";
        let m = parse_mounts(text);
        assert_eq!(m[2].mountpoint, "/mnt/my disk");
        let v = fsinfo(text);
        let arr = v.as_array().cloned().unwrap_or_default();
        let points: Vec<&str> = arr
            .iter()
            .filter_map(|x| x["mountpoint"].as_str())
            .collect();
        assert_eq!(points, vec!["/", "/mnt/my disk", "/tmp"]);
        assert_eq!(arr[0]["name"], "vda1");
        assert!(is_freezable("ext4") && is_freezable("xfs"));
        assert!(!is_freezable("tmpfs") && !is_freezable("proc") && !is_freezable("fuse.sshfs"));
    }

    #[test]
    fn utmp_records() {
        let mut data = vec![0u8; UTMP_SIZE * 3];
        let put = |d: &mut Vec<u8>, i: usize, ty: i16, user: &str, sec: i32| {
            let r = &mut d[i * UTMP_SIZE..(i + 1) * UTMP_SIZE];
            r[0..2].copy_from_slice(&ty.to_le_bytes());
            r[UT_USER..UT_USER + user.len()].copy_from_slice(user.as_bytes());
            r[UT_TV_SEC..UT_TV_SEC + 4].copy_from_slice(&sec.to_le_bytes());
        };
        put(&mut data, 0, 7, "alice", 200);
        put(&mut data, 1, 8, "dead", 100);
        put(&mut data, 2, 7, "alice", 150);
        assert_eq!(
            users(&data),
            json!([{"user": "alice", "login-time": 150.0}])
        );
        // A truncated trailing record is ignored.
        assert_eq!(
            users(&data[..UTMP_SIZE + 10]),
            json!([{"user": "alice", "login-time": 200.0}])
        );
    }

    #[test]
    fn net_dev_counters() {
        let text = "Inter-|   Receive\n face |bytes\n    lo: 10 2 0 0 0 0 0 0 10 2 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text)["lo"]["rx-bytes"], 10);
    }
}
