//! Request handling: every command's reply shape, errors, limits, and
//! garbage input. Nothing here freezes or shuts down the host: the freezer
//! is a fake and shutdown only yields an [`Action`].

use std::io;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::*;

/// Records calls; fails to freeze the mount points in `fail`.
#[derive(Default, Clone)]
struct FakeFreezer {
    log: Arc<Mutex<Vec<String>>>,
    fail: Vec<String>,
    busy: Vec<String>,
}

impl Freezer for FakeFreezer {
    fn freeze(&mut self, p: &str) -> io::Result<()> {
        if self.fail.iter().any(|f| f == p) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.busy.iter().any(|f| f == p) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        if let Ok(mut l) = self.log.lock() {
            l.push(format!("freeze {p}"));
        }
        Ok(())
    }
    fn thaw(&mut self, p: &str) -> io::Result<()> {
        let mut l = self.log.lock().map_err(|_| io::Error::other("poisoned"))?;
        let frozen = format!("freeze {p}");
        if !l.contains(&frozen) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        l.retain(|x| x != &frozen);
        l.push(format!("thaw {p}"));
        Ok(())
    }
}

struct Fixture {
    agent: Agent,
    log: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// A temporary directory removed on drop (no extra crate for it).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vireo-guest-agent-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MOUNTS: &str = "\
rootfs / rootfs rw 0 0
proc /proc proc rw 0 0
sysfs /sys sysfs rw 0 0
devtmpfs /dev devtmpfs rw 0 0
tmpfs /tmp tmpfs rw 0 0
/dev/vda /mnt/vda ext4 rw 0 0
/dev/vdb /mnt/vdb ext4 rw 0 0
";

fn fixture_with(freezer: FakeFreezer) -> Fixture {
    let dir = TempDir::new("unit");
    let mounts = dir.0.join("mounts");
    std::fs::write(&mounts, MOUNTS).expect("mounts");
    let os = dir.0.join("os-release");
    std::fs::write(&os, "ID=vireo\nNAME=\"Vireo Test\"\nVERSION_ID=1\n").expect("os-release");
    let log = freezer.log.clone();
    let paths = Paths {
        mounts,
        os_release: vec![os],
        utmp: vec![dir.0.join("no-utmp")],
        net_dev: "/proc/net/dev".into(),
    };
    Fixture {
        agent: Agent::new(Box::new(freezer), paths),
        log,
        _dir: dir,
    }
}

fn fixture() -> Fixture {
    fixture_with(FakeFreezer::default())
}

/// Every reply in `bytes`, in order (0xFF bytes dropped).
fn replies(bytes: &[u8]) -> Vec<Value> {
    bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_prefix(&[0xFF]).unwrap_or(l))
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("reply is JSON"))
        .collect()
}

fn exec(a: &mut Agent, cmd: &str, args: Value) -> Value {
    let req = json!({"execute": cmd, "arguments": args}).to_string() + "\n";
    let out = a.feed(req.as_bytes());
    assert!(out.action.is_none(), "{cmd} asked for an action");
    let mut r = replies(&out.bytes);
    assert_eq!(
        r.len(),
        1,
        "{cmd}: {:?}",
        String::from_utf8_lossy(&out.bytes)
    );
    r.remove(0)
}

fn ret(a: &mut Agent, cmd: &str) -> Value {
    let r = exec(a, cmd, json!({}));
    assert!(r.get("error").is_none(), "{cmd}: {r}");
    r["return"].clone()
}

fn error_class(r: &Value) -> &str {
    r["error"]["class"].as_str().unwrap_or("")
}

#[test]
fn ping_and_sync() {
    let mut f = fixture();
    assert_eq!(ret(&mut f.agent, "guest-ping"), json!({}));
    assert_eq!(
        exec(&mut f.agent, "guest-sync", json!({"id": 12345}))["return"],
        12345
    );
    assert_eq!(
        exec(&mut f.agent, "guest-sync", json!({"id": u64::MAX}))["return"],
        json!(u64::MAX)
    );
    assert_eq!(
        error_class(&exec(&mut f.agent, "guest-sync", json!({}))),
        "GenericError"
    );
    assert_eq!(
        error_class(&exec(&mut f.agent, "guest-sync", json!({"id": "x"}))),
        "GenericError"
    );
}

#[test]
fn sync_delimited_prefixes_0xff_and_resets_input() {
    let mut f = fixture();
    // A half request left over by an earlier client, then 0xFF + sync.
    let mut input = b"{\"execute\": \"guest-ping\", \"argu".to_vec();
    input.push(0xFF);
    input.extend_from_slice(b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":7}}\n");
    let out = f.agent.feed(&input);
    assert_eq!(out.bytes.first(), Some(&0xFF));
    assert_eq!(&out.bytes[1..], b"{\"return\":7}\n");
}

#[test]
fn request_split_after_sync_delimited_survives() {
    let mut f = fixture();
    let out = f.agent.feed(
        b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}{\"execute\":\"guest-",
    );
    assert_eq!(out.bytes, b"\xff{\"return\":1}\n");
    let out = f.agent.feed(b"ping\"}");
    assert_eq!(out.bytes, b"{\"return\":{}}\n");
}

#[test]
fn id_is_echoed() {
    let mut f = fixture();
    let out = f.agent.feed(b"{\"execute\":\"guest-ping\",\"id\":\"abc\"}");
    assert_eq!(
        replies(&out.bytes),
        vec![json!({"return": {}, "id": "abc"})]
    );
    let out = f.agent.feed(b"{\"execute\":\"nope\",\"id\":3}");
    assert_eq!(replies(&out.bytes)[0]["id"], 3);
}

#[test]
fn info_lists_every_command() {
    let mut f = fixture();
    let r = ret(&mut f.agent, "guest-info");
    assert_eq!(r["version"], VERSION);
    let cmds = r["supported_commands"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(cmds.len(), COMMANDS.len());
    for c in &cmds {
        assert_eq!(c["enabled"], true);
        let name = c["name"].as_str().unwrap_or("");
        assert_eq!(c["success-response"], name != "guest-shutdown", "{name}");
    }
    for name in [
        "guest-sync",
        "guest-sync-delimited",
        "guest-ping",
        "guest-info",
        "guest-get-host-name",
        "guest-get-osinfo",
        "guest-network-get-interfaces",
        "guest-get-users",
        "guest-get-fsinfo",
        "guest-fsfreeze-status",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-freeze-list",
        "guest-fsfreeze-thaw",
        "guest-shutdown",
    ] {
        assert!(cmds.iter().any(|c| c["name"] == name), "{name}");
    }
}

#[test]
fn host_name_and_osinfo() {
    let mut f = fixture();
    let r = ret(&mut f.agent, "guest-get-host-name");
    assert!(r["host-name"].as_str().is_some_and(|s| !s.is_empty()));
    let r = ret(&mut f.agent, "guest-get-osinfo");
    assert_eq!(r["id"], "vireo");
    assert_eq!(r["name"], "Vireo Test");
    assert_eq!(r["version-id"], "1");
    assert!(r.get("pretty-name").is_none());
    for k in ["kernel-release", "kernel-version", "machine"] {
        assert!(r[k].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    }
}

#[test]
fn interfaces_include_loopback() {
    let mut f = fixture();
    let r = ret(&mut f.agent, "guest-network-get-interfaces");
    let lo = r
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "lo"))
        .cloned()
        .expect("lo listed");
    assert_eq!(lo["hardware-address"], "00:00:00:00:00:00");
    let addrs = lo["ip-addresses"].as_array().cloned().unwrap_or_default();
    assert!(
        addrs.contains(&json!({"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}))
    );
    assert!(lo["statistics"]["rx-bytes"].is_u64());
}

#[test]
fn users_empty_without_utmp() {
    let mut f = fixture();
    assert_eq!(ret(&mut f.agent, "guest-get-users"), json!([]));
}

#[test]
fn fsinfo_shape() {
    let mut f = fixture();
    let r = ret(&mut f.agent, "guest-get-fsinfo");
    let list = r.as_array().cloned().unwrap_or_default();
    let points: Vec<&str> = list
        .iter()
        .filter_map(|x| x["mountpoint"].as_str())
        .collect();
    assert_eq!(points, vec!["/", "/tmp", "/mnt/vda", "/mnt/vdb"]);
    let root = &list[0];
    assert_eq!(root["type"], "rootfs");
    assert_eq!(root["disk"], json!([]));
    // "/" exists on every host: statvfs works for it.
    assert!(root["total-bytes"].is_u64() && root["used-bytes"].is_u64());
}

#[test]
fn freeze_and_thaw() {
    let mut f = fixture();
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-status"), "thawed");
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-freeze"), 2);
    assert_eq!(
        *f.log.lock().expect("log"),
        vec!["freeze /mnt/vdb".to_string(), "freeze /mnt/vda".to_string()]
    );
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-status"), "frozen");
    // While frozen: read-only commands work, freezing again and shutting
    // down do not, and guest-info says so.
    assert_eq!(ret(&mut f.agent, "guest-ping"), json!({}));
    let r = exec(&mut f.agent, "guest-fsfreeze-freeze", json!({}));
    assert_eq!(error_class(&r), "GenericError");
    let r = exec(&mut f.agent, "guest-shutdown", json!({}));
    assert_eq!(error_class(&r), "GenericError");
    let info = ret(&mut f.agent, "guest-info");
    let disabled: Vec<&str> = info["supported_commands"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["enabled"] == false)
                .filter_map(|c| c["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        disabled,
        vec![
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-freeze-list",
            "guest-shutdown"
        ]
    );
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-thaw"), 2);
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-status"), "thawed");
    // Thawing again finds nothing frozen.
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-thaw"), 0);
}

#[test]
fn freeze_list_freezes_only_the_mount_points_given() {
    let mut f = fixture();
    let r = exec(
        &mut f.agent,
        "guest-fsfreeze-freeze-list",
        json!({"mountpoints": ["/mnt/vda", "/not/mounted", "/tmp"]}),
    );
    assert_eq!(r["return"], 1, "{r}");
    assert_eq!(
        *f.log.lock().expect("log"),
        vec!["freeze /mnt/vda".to_string()]
    );
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-status"), "frozen");
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-thaw"), 1);
    // Without the list: everything, as guest-fsfreeze-freeze.
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-freeze-list"), 2);
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-thaw"), 2);
    let r = exec(
        &mut f.agent,
        "guest-fsfreeze-freeze-list",
        json!({"mountpoints": [1]}),
    );
    assert_eq!(error_class(&r), "GenericError");
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-status"), "thawed");
}

#[test]
fn freeze_failure_thaws_what_it_froze() {
    let freezer = FakeFreezer {
        fail: vec!["/mnt/vda".into()],
        ..FakeFreezer::default()
    };
    let mut f = fixture_with(freezer);
    let r = exec(&mut f.agent, "guest-fsfreeze-freeze", json!({}));
    assert_eq!(error_class(&r), "GenericError");
    assert!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("/mnt/vda"))
    );
    assert_eq!(
        *f.log.lock().expect("log"),
        vec!["thaw /mnt/vdb".to_string()],
        "vdb was frozen first and thawed again"
    );
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-status"), "thawed");
}

#[test]
fn freeze_skips_busy() {
    let freezer = FakeFreezer {
        busy: vec!["/mnt/vdb".into()],
        ..FakeFreezer::default()
    };
    let mut f = fixture_with(freezer);
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-freeze"), 1);
    assert_eq!(ret(&mut f.agent, "guest-fsfreeze-thaw"), 1);
}

#[test]
fn nothing_freezable_freezes_nothing() {
    let points = freeze::freezable(&sys::parse_mounts(
        "proc /proc proc rw 0 0\ntmpfs /tmp tmpfs rw 0 0\nrootfs / rootfs rw 0 0\n",
    ));
    assert!(points.is_empty());
    // The real freezer, on an empty list: safe on any host.
    let mut real = IoctlFreezer;
    assert_eq!(freeze::freeze_all(&mut real, &points).ok(), Some(0));
    assert_eq!(freeze::thaw_all(&mut real, &points), 0);
}

#[test]
fn shutdown_replies_nothing_and_asks_for_action() {
    let mut f = fixture();
    for (args, mode) in [
        (json!({}), ShutdownMode::Powerdown),
        (json!({"mode": "powerdown"}), ShutdownMode::Powerdown),
        (json!({"mode": "reboot"}), ShutdownMode::Reboot),
        (json!({"mode": "halt"}), ShutdownMode::Halt),
    ] {
        let req = json!({"execute": "guest-shutdown", "arguments": args}).to_string();
        // The ping after it in the same read is dropped.
        let out = f
            .agent
            .feed(format!("{req}\n{{\"execute\":\"guest-ping\"}}\n").as_bytes());
        assert!(out.bytes.is_empty());
        assert_eq!(out.action, Some(Action::Shutdown(mode)));
    }
    let r = exec(&mut f.agent, "guest-shutdown", json!({"mode": "explode"}));
    assert_eq!(error_class(&r), "GenericError");
}

#[test]
fn unknown_command_and_bad_requests() {
    let mut f = fixture();
    let r = exec(&mut f.agent, "guest-exec", json!({"path": "/bin/sh"}));
    assert_eq!(error_class(&r), "CommandNotFound");
    for bad in [
        &b"{\"arguments\": {}}\n"[..],
        b"{\"execute\": 5}\n",
        b"{\"execute\": \"guest-ping\", \"arguments\": [1]}\n",
        b"{\"execute\": \"guest-ping\",}\n",
        b"{\"execute\": \"guest-\xc3\x28\"}\n",
        b"[1, 2]\n",
        b"not json at all\n",
    ] {
        let out = f.agent.feed(bad);
        let r = replies(&out.bytes);
        assert_eq!(r.len(), 1, "{:?}", String::from_utf8_lossy(bad));
        assert_eq!(
            error_class(&r[0]),
            "GenericError",
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // Unknown fields are ignored.
    let out = f
        .agent
        .feed(b"{\"execute\":\"guest-ping\",\"extra\":{\"x\":[1]},\"arguments\":{\"y\":2}}");
    assert_eq!(replies(&out.bytes), vec![json!({"return": {}})]);
}

#[test]
fn limits_give_errors_and_serving_goes_on() {
    let mut f = fixture();
    let mut big = b"{\"execute\":\"guest-ping\",\"arguments\":{\"s\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 100 * 1024));
    big.extend_from_slice(b"\"}}\n{\"execute\":\"guest-ping\"}\n");
    // In pieces, as reads deliver it.
    let mut all = Vec::new();
    for chunk in big.chunks(4096) {
        all.extend(f.agent.feed(chunk).bytes);
    }
    let r = replies(&all);
    assert_eq!(r.len(), 2);
    assert!(
        r[0]["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("larger"))
    );
    assert_eq!(r[1], json!({"return": {}}));

    let deep = format!(
        "{{\"execute\":\"guest-ping\",\"arguments\":{{\"a\":{}{}}}}}\n{{\"execute\":\"guest-ping\"}}\n",
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let r = replies(&f.agent.feed(deep.as_bytes()).bytes);
    assert_eq!(r.len(), 2);
    assert!(
        r[0]["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("deeper"))
    );
    assert_eq!(r[1], json!({"return": {}}));

    // Nesting within the limit is fine.
    let ok = format!(
        "{{\"execute\":\"guest-ping\",\"arguments\":{{\"a\":{}{}}}}}",
        "[".repeat(20),
        "]".repeat(20)
    );
    assert_eq!(
        replies(&f.agent.feed(ok.as_bytes()).bytes),
        vec![json!({"return": {}})]
    );
}

/// xorshift64*: deterministic pseudo-random bytes without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn random_input_never_panics_and_agent_recovers() {
    let mut f = fixture();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Bytes biased towards JSON's own characters, so that many inputs get
    // past the framer into the parser and the dispatcher.
    let alphabet = b"{}[]\":,\\ \n0123456789-.eE truefalsnul\xff\xc3";
    let words: [&[u8]; 6] = [
        b"\"execute\"",
        b"\"guest-ping\"",
        b"\"arguments\"",
        b"\"guest-sync\"",
        b"\"id\"",
        b"\"guest-fsfreeze-status\"",
    ];
    for _ in 0..10_000 {
        let len = (rng.next() % 200) as usize;
        let mut input = Vec::with_capacity(len);
        while input.len() < len {
            let r = rng.next();
            match r % 4 {
                0 => input.push((r >> 8) as u8),
                1 => input.extend_from_slice(words[((r >> 8) % words.len() as u64) as usize]),
                _ => input.push(alphabet[((r >> 8) % alphabet.len() as u64) as usize]),
            }
        }
        let out = f.agent.feed(&input);
        // Whatever came back is well-formed replies (and never a shutdown:
        // the random words do not include it).
        assert!(out.action.is_none());
        for line in out.bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let line = line.strip_prefix(&[0xFF]).unwrap_or(line);
            assert!(serde_json::from_slice::<Value>(line).is_ok());
        }
    }
    // Resync as the host does, then the agent answers normally.
    let out = f
        .agent
        .feed(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":99}}\n");
    assert_eq!(out.bytes, b"\xff{\"return\":99}\n");
    assert!(!f.agent.is_frozen());
}
