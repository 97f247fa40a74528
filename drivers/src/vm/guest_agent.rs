//! The host side of the guest agent: the QEMU guest agent protocol (JSON
//! requests and replies, `guest-sync-delimited` to find the start of a
//! reply) spoken to `vireo-guest-agent` or to QEMU's own `qemu-ga` in the
//! guest. See docs/guest-agent.md.
//!
//! The channel is a Unix socket on the host: QEMU's end of a virtio-serial
//! port named `org.qemu.guest_agent.0`, or vireo-vmm's vsock proxy, which
//! takes `CONNECT <port>` first. Everything read comes from the guest and is
//! treated as hostile: replies are capped in size, every field is checked
//! for its type, lists and strings are cut to sizes fit for a status.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vireo_crds::{GuestFilesystem, GuestInfo, GuestInterface, GuestOs, GuestUser};

/// The virtio-serial port name QEMU's and our agent look for.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
/// The vsock port `vireo-guest-agent` listens on by default.
pub const VSOCK_PORT: u32 = 4100;

/// The largest reply read from a guest (a `guest-get-fsinfo` of a big guest
/// is a few KiB).
const MAX_REPLY: usize = 1 << 20;
/// Cuts for what goes into a status.
const MAX_ITEMS: usize = 64;
const MAX_ADDRESSES: usize = 32;
const MAX_TEXT: usize = 256;

/// How the host reaches a domain's guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A Unix socket that is the agent's byte stream (QEMU's chardev).
    Unix(PathBuf),
    /// vireo-vmm's vsock proxy: `CONNECT port\n`, answered `OK ...\n`.
    VsockProxy { uds: PathBuf, port: u32 },
}

/// Why a guest agent call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Nobody answers: no agent, not started yet, or a hung one.
    #[error("{0}")]
    Unresponsive(String),
    /// The agent answered with an error.
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
    /// The agent answered with something that is not the protocol.
    #[error("malformed reply: {0}")]
    Malformed(String),
}

impl AgentError {
    fn not_found(&self) -> bool {
        matches!(self, Self::Command { class, .. } if class == "CommandNotFound" || class == "CommandDisabled")
    }
}

/// One connection to a guest agent, synchronised.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    timeout: Duration,
}

fn unresponsive(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Unresponsive(format!("{what}: {e}"))
}

/// A request id for `guest-sync-delimited` that a stale reply will not
/// repeat.
fn sync_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0);
    // Keep it in the range JSON numbers carry exactly everywhere.
    ((nanos << 20) ^ u64::from(std::process::id())) & ((1 << 52) - 1)
}

impl Client {
    /// Connects and synchronises, so that the next reply read is the
    /// answer to the next request. `timeout` bounds each step.
    pub fn connect(channel: &Channel, timeout: Duration) -> Result<Self, AgentError> {
        let path = match channel {
            Channel::Unix(p) => p,
            Channel::VsockProxy { uds, .. } => uds,
        };
        let stream = UnixStream::connect(path)
            .map_err(|e| unresponsive(&format!("connecting to {}", path.display()), e))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| unresponsive("socket timeouts", e))?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| unresponsive("socket clone", e))?,
        );
        let mut client = Self {
            stream,
            reader,
            timeout,
        };
        if let Channel::VsockProxy { port, .. } = channel {
            client.send_raw(format!("CONNECT {port}\n").as_bytes())?;
            // The proxy closes the socket when the guest refuses the port.
            let line = client.read_line().map_err(|e| {
                AgentError::Unresponsive(format!(
                    "vsock port {port}: nothing listens in the guest ({e})"
                ))
            })?;
            if !line.starts_with("OK ") {
                return Err(AgentError::Unresponsive(format!(
                    "vsock port {port}: {}",
                    if line.trim().is_empty() {
                        "connection refused".to_string()
                    } else {
                        truncate(line.trim())
                    }
                )));
            }
        }
        client.sync()?;
        Ok(client)
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| unresponsive("writing to the agent", e))
    }

    fn send(&mut self, request: &Value) -> Result<(), AgentError> {
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.send_raw(&line)
    }

    /// One line, at most [`MAX_REPLY`] bytes.
    fn read_line(&mut self) -> Result<String, AgentError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| unresponsive("waiting for the agent", e))?;
        if n == 0 {
            return Err(AgentError::Unresponsive(
                "the agent closed the connection".into(),
            ));
        }
        if buf.len() > MAX_REPLY {
            return Err(AgentError::Malformed(format!(
                "a reply longer than {MAX_REPLY} bytes"
            )));
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// `guest-sync-delimited`: skips whatever an earlier client left
    /// unread, up to the 0xFF the agent sends before its reply.
    fn sync(&mut self) -> Result<(), AgentError> {
        let id = sync_id();
        self.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}))?;
        let deadline = Instant::now() + self.timeout;
        let mut skipped = 0usize;
        loop {
            if Instant::now() > deadline {
                return Err(AgentError::Unresponsive(
                    "no answer to guest-sync-delimited".into(),
                ));
            }
            let mut buf = Vec::new();
            (&mut self.reader)
                .take(MAX_REPLY as u64)
                .read_until(0xFF, &mut buf)
                .map_err(|e| unresponsive("waiting for the agent", e))?;
            if buf.last() != Some(&0xFF) {
                skipped += buf.len();
                if buf.is_empty() {
                    return Err(AgentError::Unresponsive(
                        "the agent closed the connection".into(),
                    ));
                }
                if skipped > 4 * MAX_REPLY {
                    return Err(AgentError::Malformed(
                        "no sync delimiter in the agent's output".into(),
                    ));
                }
                continue;
            }
            // Some agents answer the delimiter with the reply; a stale
            // reply of another client's sync is skipped.
            let line = self.read_line()?;
            match serde_json::from_str::<Value>(line.trim().trim_start_matches('\u{FFFD}')) {
                Ok(v) if v.get("return").and_then(Value::as_u64) == Some(id) => return Ok(()),
                Ok(_) | Err(_) => continue,
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn call(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, AgentError> {
        let request = match arguments {
            Some(a) => json!({"execute": command, "arguments": a}),
            None => json!({"execute": command}),
        };
        self.send(&request)?;
        let line = self.read_line()?;
        let reply: Value = serde_json::from_str(line.trim())
            .map_err(|e| AgentError::Malformed(format!("{command}: {e}")))?;
        if let Some(err) = reply.get("error") {
            return Err(AgentError::Command {
                class: text(err.get("class")).unwrap_or_else(|| "GenericError".into()),
                desc: text(err.get("desc")).unwrap_or_default(),
            });
        }
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| AgentError::Malformed(format!("{command}: no 'return' in the reply")))
    }

    /// A command that does not answer when it works (`guest-shutdown`):
    /// an error reply is an error, silence or a closed channel is success.
    pub fn call_no_reply(&mut self, command: &str, arguments: Value) -> Result<(), AgentError> {
        self.send(&json!({"execute": command, "arguments": arguments}))?;
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(500)));
        match self.read_line() {
            Ok(line) => match serde_json::from_str::<Value>(line.trim()) {
                Ok(reply) if reply.get("error").is_some() => {
                    let err = &reply["error"];
                    Err(AgentError::Command {
                        class: text(err.get("class")).unwrap_or_else(|| "GenericError".into()),
                        desc: text(err.get("desc")).unwrap_or_default(),
                    })
                }
                _ => Ok(()),
            },
            Err(_) => Ok(()),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_TEXT)
        .collect()
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(truncate)
}

fn number(v: Option<&Value>) -> Option<u64> {
    v.and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)))
}

fn items(v: &Value, max: usize) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten().take(max)
}

/// `guest-get-osinfo`.
fn os(v: &Value) -> GuestOs {
    GuestOs {
        id: text(v.get("id")),
        name: text(v.get("name")),
        pretty_name: text(v.get("pretty-name")),
        version: text(v.get("version")),
        version_id: text(v.get("version-id")),
        kernel_release: text(v.get("kernel-release")),
        kernel_version: text(v.get("kernel-version")),
        machine: text(v.get("machine")),
    }
}

/// `guest-network-get-interfaces`.
pub fn interfaces(v: &Value) -> Vec<GuestInterface> {
    items(v, MAX_ITEMS)
        .filter_map(|i| {
            let name = text(i.get("name"))?;
            let addresses = items(i.get("ip-addresses").unwrap_or(&Value::Null), MAX_ADDRESSES)
                .filter_map(|a| {
                    let ip = text(a.get("ip-address"))?;
                    // Only addresses that parse: the status is read by tools.
                    let parsed: std::net::IpAddr = ip.parse().ok()?;
                    let max = if parsed.is_ipv4() { 32 } else { 128 };
                    match number(a.get("prefix")) {
                        Some(p) if p <= max => Some(format!("{parsed}/{p}")),
                        _ => Some(parsed.to_string()),
                    }
                })
                .collect();
            Some(GuestInterface {
                name,
                mac: text(i.get("hardware-address")),
                addresses,
            })
        })
        .collect()
}

fn users(v: &Value) -> Vec<GuestUser> {
    items(v, MAX_ITEMS)
        .filter_map(|u| {
            Some(GuestUser {
                name: text(u.get("user"))?,
                domain: text(u.get("domain")),
                login_time: number(u.get("login-time")),
            })
        })
        .collect()
}

fn filesystems(v: &Value) -> Vec<GuestFilesystem> {
    items(v, MAX_ITEMS)
        .filter_map(|f| {
            Some(GuestFilesystem {
                mountpoint: text(f.get("mountpoint"))?,
                name: text(f.get("name")),
                fs_type: text(f.get("type")),
                used_bytes: number(f.get("used-bytes")),
                total_bytes: number(f.get("total-bytes")),
            })
        })
        .collect()
}

/// Everything the agent tells about the guest. A command the agent does
/// not have leaves its part out; any other failure fails the whole.
pub fn guest_info(channel: &Channel, timeout: Duration) -> Result<GuestInfo, AgentError> {
    let mut c = Client::connect(channel, timeout)?;
    let optional = |c: &mut Client, cmd: &str| match c.call(cmd, None) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.not_found() => Ok(None),
        Err(AgentError::Command { class, desc }) => {
            tracing::debug!(command = cmd, class, desc, "guest agent command failed");
            Ok(None)
        }
        Err(e) => Err(e),
    };
    let info = optional(&mut c, "guest-info")?;
    let hostname = optional(&mut c, "guest-get-host-name")?;
    let osinfo = optional(&mut c, "guest-get-osinfo")?;
    let ifaces = optional(&mut c, "guest-network-get-interfaces")?;
    let users_v = optional(&mut c, "guest-get-users")?;
    let fs = optional(&mut c, "guest-get-fsinfo")?;
    let freeze = optional(&mut c, "guest-fsfreeze-status")?;
    Ok(GuestInfo {
        agent_version: info.as_ref().and_then(|v| text(v.get("version"))),
        hostname: hostname.as_ref().and_then(|v| text(v.get("host-name"))),
        os: osinfo.as_ref().map(os),
        interfaces: ifaces.as_ref().map(interfaces).unwrap_or_default(),
        users: users_v.as_ref().map(users).unwrap_or_default(),
        filesystems: fs.as_ref().map(filesystems).unwrap_or_default(),
        fs_freeze: freeze
            .as_ref()
            .and_then(|v| v.as_str())
            .filter(|s| *s == "thawed" || *s == "frozen")
            .map(str::to_string),
    })
}

/// Freezes the guest's filesystems (all, or the mount points given) and
/// returns how many it froze.
pub fn fs_freeze(
    channel: &Channel,
    timeout: Duration,
    mountpoints: &[String],
) -> Result<u64, AgentError> {
    let mut c = Client::connect(channel, timeout)?;
    // A freeze flushes the guest's caches first: give it longer.
    let _ = c.stream.set_read_timeout(Some(timeout * 10));
    let v = if mountpoints.is_empty() {
        c.call("guest-fsfreeze-freeze", None)?
    } else {
        c.call(
            "guest-fsfreeze-freeze-list",
            Some(json!({ "mountpoints": mountpoints })),
        )?
    };
    v.as_u64()
        .ok_or_else(|| AgentError::Malformed(format!("guest-fsfreeze-freeze returned {v}")))
}

/// Thaws the guest's filesystems; returns how many it thawed.
pub fn fs_thaw(channel: &Channel, timeout: Duration) -> Result<u64, AgentError> {
    let mut c = Client::connect(channel, timeout)?;
    let v = c.call("guest-fsfreeze-thaw", None)?;
    v.as_u64()
        .ok_or_else(|| AgentError::Malformed(format!("guest-fsfreeze-thaw returned {v}")))
}

/// Asks the guest to power off (`powerdown`) or reboot.
pub fn shutdown(channel: &Channel, timeout: Duration, mode: &str) -> Result<(), AgentError> {
    let mut c = Client::connect(channel, timeout)?;
    c.call_no_reply("guest-shutdown", json!({ "mode": mode }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "vireo-ga-{tag}-{}-{}",
            std::process::id(),
            sync_id()
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }

    /// A guest side that answers each request with `answer(request)`
    /// (raw bytes written as they are).
    fn fake_agent(
        path: &std::path::Path,
        answer: impl Fn(&Value) -> Vec<u8> + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut w = stream.try_clone().expect("clone");
            let r = BufReader::new(stream);
            for line in r.lines() {
                let Ok(line) = line else { return };
                let Ok(req) = serde_json::from_str::<Value>(&line) else {
                    return;
                };
                if w.write_all(&answer(&req)).is_err() {
                    return;
                }
            }
        })
    }

    fn well_behaved(req: &Value) -> Vec<u8> {
        let cmd = req["execute"].as_str().unwrap_or_default();
        let reply = match cmd {
            "guest-sync-delimited" => {
                // Junk an earlier client left, then the delimiter.
                let mut out = b"{\"return\": 1}\n\xff".to_vec();
                out.extend(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).bytes());
                return out;
            }
            "guest-info" => json!({"return": {"version": "9.9", "supported_commands": []}}),
            "guest-get-host-name" => json!({"return": {"host-name": "web01"}}),
            "guest-get-osinfo" => {
                json!({"return": {"id": "debian", "pretty-name": "Debian GNU/Linux 12 (bookworm)", "kernel-release": "6.1.0"}})
            }
            "guest-network-get-interfaces" => json!({"return": [
                {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                    {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}]},
                {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "192.168.100.10", "prefix": 24},
                    {"ip-address-type": "ipv4", "ip-address": "not an address", "prefix": 24},
                    {"ip-address-type": "ipv4", "ip-address": "10.0.0.1", "prefix": 99}]}]}),
            "guest-get-users" => json!({"error": {"class": "CommandNotFound", "desc": "no"}}),
            "guest-get-fsinfo" => {
                json!({"return": [{"name": "vda1", "mountpoint": "/", "type": "ext4", "used-bytes": 100, "total-bytes": 1000.0}]})
            }
            "guest-fsfreeze-status" => json!({"return": "thawed"}),
            "guest-fsfreeze-freeze" => json!({"return": 2}),
            "guest-fsfreeze-thaw" => json!({"return": 2}),
            "guest-shutdown" => return Vec::new(),
            _ => json!({"error": {"class": "CommandNotFound", "desc": cmd}}),
        };
        format!("{reply}\n").into_bytes()
    }

    #[test]
    fn reads_what_a_qemu_ga_agent_reports() {
        let d = dir("info");
        let sock = d.0.join("qga.sock");
        let t = fake_agent(&sock, well_behaved);
        let info = guest_info(&Channel::Unix(sock), Duration::from_secs(5)).expect("info");
        t.join().expect("agent thread");
        assert_eq!(info.hostname.as_deref(), Some("web01"));
        assert_eq!(info.agent_version.as_deref(), Some("9.9"));
        let os = info.os.expect("os");
        assert_eq!(os.id.as_deref(), Some("debian"));
        assert_eq!(info.interfaces.len(), 2);
        assert_eq!(info.interfaces[0].addresses, ["127.0.0.1/8", "::1/128"]);
        // The bad address is dropped, the bad prefix left out.
        assert_eq!(
            info.interfaces[1].addresses,
            ["192.168.100.10/24", "10.0.0.1"]
        );
        assert_eq!(info.interfaces[1].mac.as_deref(), Some("52:54:00:12:34:56"));
        assert!(
            info.users.is_empty(),
            "guest-get-users is missing: no users"
        );
        assert_eq!(info.filesystems[0].total_bytes, Some(1000));
        assert_eq!(info.fs_freeze.as_deref(), Some("thawed"));
    }

    #[test]
    fn freeze_thaw_and_shutdown_round_trip() {
        for op in ["freeze", "thaw", "shutdown"] {
            let d = dir(op);
            let sock = d.0.join("qga.sock");
            let t = fake_agent(&sock, well_behaved);
            let ch = Channel::Unix(sock);
            let t5 = Duration::from_secs(5);
            match op {
                "freeze" => assert_eq!(fs_freeze(&ch, t5, &[]).expect("freeze"), 2),
                "thaw" => assert_eq!(fs_thaw(&ch, t5).expect("thaw"), 2),
                _ => shutdown(&ch, t5, "powerdown").expect("shutdown"),
            }
            drop(ch);
            t.join().expect("agent thread");
        }
    }

    #[test]
    fn the_vsock_proxy_is_asked_to_connect_first() {
        let d = dir("vsock");
        let sock = d.0.join("vsock.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let t = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut w = stream.try_clone().expect("clone");
            let mut r = BufReader::new(stream);
            let mut first = String::new();
            r.read_line(&mut first).expect("connect line");
            assert_eq!(first, format!("CONNECT {VSOCK_PORT}\n"));
            w.write_all(b"OK 1073741824\n").expect("ok");
            for line in r.lines() {
                let Ok(line) = line else { return };
                let req: Value = serde_json::from_str(&line).expect("json");
                if w.write_all(&well_behaved(&req)).is_err() {
                    return;
                }
            }
        });
        let ch = Channel::VsockProxy {
            uds: sock,
            port: VSOCK_PORT,
        };
        let info = guest_info(&ch, Duration::from_secs(5)).expect("info");
        assert_eq!(info.hostname.as_deref(), Some("web01"));
        t.join().expect("proxy thread");
    }

    #[test]
    fn a_silent_or_absent_agent_is_unresponsive_not_a_hang() {
        let d = dir("silent");
        let sock = d.0.join("qga.sock");
        // Nobody listens.
        let e = guest_info(&Channel::Unix(sock.clone()), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, AgentError::Unresponsive(_)), "{e}");
        // Somebody listens and says nothing (a virtio-serial port with no
        // agent behind it).
        let listener = UnixListener::bind(&sock).expect("bind");
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_millis(800));
            drop(s);
        });
        let start = Instant::now();
        let e = guest_info(&Channel::Unix(sock), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, AgentError::Unresponsive(_)), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().expect("thread");
        // A proxy that refuses the port.
        let sock = d.0.join("vsock.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
        });
        let e = guest_info(
            &Channel::VsockProxy { uds: sock, port: 7 },
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::Unresponsive(_)), "{e}");
        t.join().expect("thread");
    }

    #[test]
    fn an_error_reply_is_a_command_error() {
        let d = dir("err");
        let sock = d.0.join("qga.sock");
        let t = fake_agent(&sock, |req| {
            if req["execute"] == "guest-fsfreeze-freeze" {
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed to freeze /: Operation not supported\"}}\n".to_vec()
            } else {
                well_behaved(req)
            }
        });
        let e = fs_freeze(&Channel::Unix(sock), Duration::from_secs(5), &[]).unwrap_err();
        assert_eq!(
            e,
            AgentError::Command {
                class: "GenericError".into(),
                desc: "failed to freeze /: Operation not supported".into()
            }
        );
        t.join().expect("thread");
    }

    /// A hostile guest side: random bytes, truncated and oversized replies,
    /// wrong types. Every call ends in an error or a result, never a
    /// panic or a hang.
    #[test]
    fn hostile_replies_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let samples: Vec<Vec<u8>> = vec![
            b"\xff{\"return\": \"x\"}\n".to_vec(),
            b"\xff\n".to_vec(),
            b"{\"return\": [1,2,3]}\n".to_vec(),
            vec![b'['; 10_000],
            vec![b'a'; MAX_REPLY + 10],
            b"\xff{\"return\": {\"host-name\": 5}}\n".to_vec(),
        ];
        let d = dir("hostile");
        for round in 0..40u64 {
            let sock = d.0.join(format!("s{round}"));
            let listener = UnixListener::bind(&sock).expect("bind");
            let mut payload = samples[(round as usize) % samples.len()].clone();
            if round >= samples.len() as u64 {
                payload = (0..(next() % 4096))
                    .map(|_| {
                        let b = next() as u8;
                        // Sometimes the delimiter, sometimes JSON-ish bytes.
                        match b % 7 {
                            0 => 0xFF,
                            1 => b'\n',
                            2 => b'{',
                            _ => b,
                        }
                    })
                    .collect();
            }
            let t = std::thread::spawn(move || {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                for _ in 0..8 {
                    if s.write_all(&payload).is_err() {
                        break;
                    }
                }
            });
            let _ = guest_info(&Channel::Unix(sock), Duration::from_millis(300));
            t.join().expect("thread");
        }
    }
}
