//! Runs the built binary with `--unix` on the host and queries it over the
//! socket, as a host client would. Only read-only commands: never
//! guest-shutdown or guest-fsfreeze-* on the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(tag: &str) -> (Agent, PathBuf) {
    start_with(tag, &[])
}

fn start_with(tag: &str, extra: &[&str]) -> (Agent, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("vireo-guest-agent-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("qga.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vireo-guest-agent"))
        .arg("--unix")
        .arg(&sock)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("start vireo-guest-agent");
    (Agent { child, dir }, sock)
}

fn connect(sock: &PathBuf) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                return s;
            }
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn new(s: UnixStream) -> Client {
        let r = BufReader::new(s.try_clone().expect("clone"));
        Client { w: s, r }
    }

    /// Resynchronizes the way host clients do: 0xFF, guest-sync-delimited,
    /// skip input up to the 0xFF before its reply.
    fn sync(&mut self, id: u64) {
        let req = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        self.w.write_all(&[0xFF]).expect("write");
        self.w.write_all(req.to_string().as_bytes()).expect("write");
        let mut skipped = Vec::new();
        self.r.read_until(0xFF, &mut skipped).expect("read 0xFF");
        assert_eq!(self.read(), json!({"return": id}));
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("read reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    fn call(&mut self, cmd: &str) -> Value {
        let req = json!({"execute": cmd}).to_string() + "\n";
        self.w.write_all(req.as_bytes()).expect("write");
        let r = self.read();
        assert!(r.get("error").is_none(), "{cmd}: {r}");
        r["return"].clone()
    }
}

#[test]
fn queries_over_unix_socket() {
    let (_agent, sock) = start("queries");
    let mut c = Client::new(connect(&sock));
    c.sync(4242);

    let info = c.call("guest-info");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let names: Vec<&str> = info["supported_commands"]
        .as_array()
        .expect("commands")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for n in [
        "guest-network-get-interfaces",
        "guest-shutdown",
        "guest-fsfreeze-freeze",
    ] {
        assert!(names.contains(&n), "{n}");
    }

    assert_eq!(c.call("guest-ping"), json!({}));

    let ifaces = c.call("guest-network-get-interfaces");
    let lo = ifaces
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "lo"))
        .expect("lo");
    assert!(
        lo["ip-addresses"]
            .as_array()
            .expect("addresses")
            .iter()
            .any(|a| a["ip-address"] == "127.0.0.1" && a["ip-address-type"] == "ipv4"),
        "{lo}"
    );

    let os = c.call("guest-get-osinfo");
    assert!(os["kernel-release"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(os["machine"], std::env::consts::ARCH);

    let host = c.call("guest-get-host-name");
    assert!(host["host-name"].is_string());

    let fs = c.call("guest-get-fsinfo");
    let root = fs
        .as_array()
        .and_then(|a| a.iter().find(|f| f["mountpoint"] == "/"))
        .expect("/ in fsinfo");
    assert!(
        root["total-bytes"].as_u64().is_some_and(|n| n > 0),
        "{root}"
    );

    assert!(c.call("guest-get-users").is_array());
    assert_eq!(c.call("guest-fsfreeze-status"), "thawed");

    // Garbage and an unknown command get errors; the connection goes on.
    c.w.write_all(b"this is not json\n{\"execute\":\"guest-nope\"}\n")
        .expect("write");
    assert_eq!(c.read()["error"]["class"], "GenericError");
    assert_eq!(c.read()["error"]["class"], "CommandNotFound");
    assert_eq!(c.call("guest-ping"), json!({}));
}

#[test]
fn serves_the_next_client_after_a_disconnect() {
    let (_agent, sock) = start("reconnect");
    {
        // A client that leaves half a request behind and hangs up.
        let mut s = connect(&sock);
        s.write_all(b"{\"execute\": \"guest-pi").expect("write");
    }
    let mut c = Client::new(connect(&sock));
    c.w.write_all(b"{\"execute\":\"guest-ping\"}")
        .expect("write");
    assert_eq!(c.read(), json!({"return": {}}));
    // Oversized request: an error, then service as usual.
    let mut big = vec![b'{'; 1];
    big.extend(std::iter::repeat_n(b' ', 70 * 1024));
    big.extend_from_slice(b"}\n");
    c.w.write_all(&big).expect("write");
    assert_eq!(c.read()["error"]["class"], "GenericError");
    c.sync(1);
    drop(c);
    // One more connection still works.
    let mut c = Client::new(connect(&sock));
    c.sync(2);
    let mut rest = Vec::new();
    c.w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    c.r.read_to_end(&mut rest).expect("read");
    assert!(rest.is_empty());
}

#[test]
fn vsock_listener_starts_where_the_host_has_vsock() {
    if !std::path::Path::new("/dev/vsock").exists() {
        eprintln!("SKIP vsock_listener_starts_where_the_host_has_vsock: no /dev/vsock");
        return;
    }
    // Binding and listening is all that can be checked here: connecting
    // needs a guest on the other side (or the vsock_loopback driver).
    let port = 47000 + std::process::id() % 1000;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo-guest-agent"))
        .args(["--vsock-port", &port.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vireo-guest-agent");
    std::thread::sleep(Duration::from_millis(500));
    let running = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    assert!(
        running,
        "the agent exited: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_idle_client_is_dropped_for_the_next_one() {
    let (_agent, sock) = start_with("idle", &["--idle-timeout", "1"]);
    // Connects, sends half a request, and hangs.
    let mut hung = connect(&sock);
    hung.write_all(b"{\"execute\":").expect("write");
    let started = Instant::now();
    let mut c = Client::new(connect(&sock));
    c.sync(3);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(c.call("guest-ping"), json!({}));
    // The hung client was closed.
    let mut rest = Vec::new();
    assert_eq!(
        hung.read_to_end(&mut rest).map(|_| rest.len()).ok(),
        Some(0)
    );
}
