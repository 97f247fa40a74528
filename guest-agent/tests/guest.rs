//! The agent inside the real test guest: scripts/guest-agent.sh builds the
//! static binary and its cpio, which is appended to the busybox initramfs
//! of scripts/guest-image.sh; QEMU (TCG, q35) boots it with a
//! virtio-serial port named org.qemu.guest_agent.0 on a Unix socket, and
//! the test talks to the agent as a host client would: queries, a freeze
//! and thaw of the guest's disk, a reconnect, and a shutdown that works
//! although the guest ignores the ACPI power button (`vireo.acpi=0`).
//!
//! Without `qemu-system-x86_64` this test fails when `CI` is set, and
//! otherwise prints a SKIP line and returns.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const QEMU: &str = "qemu-system-x86_64";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Runs a script of scripts/ and returns its last stdout line (a directory).
fn script_dir(name: &str) -> PathBuf {
    let started = Instant::now();
    let out = Command::new(repo_root().join("scripts").join(name))
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} failed: {}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().expect("a directory").trim());
    say(&format!(
        "{name}: {} ({} ms)",
        dir.display(),
        started.elapsed().as_millis()
    ));
    dir
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// QEMU and the console lines it printed; killed when dropped.
struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn wait_for(&self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.console.lock().expect("console").contains(marker) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no {marker:?} on the console within {timeout:?}:\n{}",
            self.console.lock().expect("console")
        );
    }

    fn console_line(&self, prefix: &str) -> Option<String> {
        let c = self.console.lock().expect("console");
        c.lines()
            .find_map(|l| l.trim_end().strip_prefix(prefix).map(str::to_string))
    }
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

struct Qga {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next_id: u64,
}

impl Qga {
    fn new(path: &Path) -> Qga {
        let s = connect(path);
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let r = BufReader::new(s.try_clone().expect("clone"));
        Qga {
            w: s,
            r,
            next_id: 1000,
        }
    }

    /// 0xFF and guest-sync-delimited until the agent answers with our id
    /// (it may not be listening yet, and stale bytes may be in the way).
    fn resync(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            assert!(Instant::now() < deadline, "no guest-sync-delimited reply");
            self.next_id += 1;
            let id = self.next_id;
            let req = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
            let mut bytes = vec![0xFF];
            bytes.extend_from_slice(req.to_string().as_bytes());
            bytes.push(b'\n');
            self.w.write_all(&bytes).expect("write");
            loop {
                let mut skipped = Vec::new();
                match self.r.read_until(0xFF, &mut skipped) {
                    Ok(_) if skipped.last() == Some(&0xFF) => {}
                    Ok(_) => panic!("agent channel closed"),
                    Err(e) if is_timeout(&e) => break,
                    Err(e) => panic!("read: {e}"),
                }
                let mut line = String::new();
                match self.r.read_line(&mut line) {
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => break,
                    Err(e) => panic!("read: {e}"),
                }
                if serde_json::from_str::<Value>(&line).ok() == Some(json!({"return": id})) {
                    return;
                }
            }
        }
    }

    fn send(&mut self, cmd: &str, args: Value) {
        let req = json!({"execute": cmd, "arguments": args}).to_string() + "\n";
        self.w.write_all(req.as_bytes()).expect("write");
    }

    fn call(&mut self, cmd: &str, args: Value) -> Value {
        self.send(cmd, args);
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        let r: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(r.get("error").is_none(), "{cmd}: {r}");
        r["return"].clone()
    }
}

/// One QMP command on a fresh connection.
fn qmp(path: &Path, cmd: &str) {
    let s = connect(path);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).expect("QMP greeting");
    for c in ["qmp_capabilities", cmd] {
        w.write_all(json!({"execute": c}).to_string().as_bytes())
            .expect("write");
        loop {
            line.clear();
            r.read_line(&mut line).expect("QMP reply");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("return").is_some() {
                break;
            }
            assert!(v.get("error").is_none(), "{c}: {v}");
        }
    }
}

#[test]
fn agent_in_the_test_guest() {
    if !on_path(QEMU) {
        if std::env::var_os("CI").is_some() {
            panic!("{QEMU} is missing and CI is set (scripts/setup installs qemu-system-x86)");
        }
        say(&format!(
            "SKIP agent_in_the_test_guest: {QEMU} not found; not run"
        ));
        return;
    }
    let image = script_dir("guest-image.sh");
    let agent = script_dir("guest-agent.sh");

    let dir = TempDir(std::env::temp_dir().join(format!("vireo-qga-guest-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let mut initrd = std::fs::read(image.join("initrd.img")).expect("initrd.img");
    initrd.extend(std::fs::read(agent.join("agent.cpio.gz")).expect("agent.cpio.gz"));
    let initrd_path = dir.0.join("initrd-agent.img");
    std::fs::write(&initrd_path, initrd).expect("write initrd");
    let disk = dir.0.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("disk");
    let qga_sock = dir.0.join("qga.sock");
    let qmp_sock = dir.0.join("qmp.sock");

    let mut child = Command::new(QEMU)
        .args(["-M", "q35", "-accel", "tcg", "-m", "256", "-smp", "1"])
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd_path)
        .args(["-append", "console=ttyS0 vireo.mkfs=1 vireo.acpi=0"])
        .arg("-drive")
        .arg(format!("id=vda,file={},format=raw,if=none", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=vda"])
        .args([
            "-netdev",
            "user,id=net0,restrict=on",
            "-device",
            "virtio-net-pci,netdev=net0",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qga_sock.display()
        ))
        .args(["-device", "virtio-serial"])
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu");
    let console = Arc::new(Mutex::new(String::new()));
    if let Some(mut out) = child.stdout.take() {
        let console = console.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut c) = console.lock() {
                    c.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
    }
    let mut guest = Guest { child, console };
    let booted = Instant::now();
    guest.wait_for("VIREO-GUEST-AGENT started", BOOT_TIMEOUT);
    guest.wait_for("VIREO-GUEST-SETUP-DONE", BOOT_TIMEOUT);
    say(&format!(
        "guest set up in {} ms",
        booted.elapsed().as_millis()
    ));

    let mut qga = Qga::new(&qga_sock);
    qga.resync(Duration::from_secs(60));

    let info = qga.call("guest-info", json!({}));
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        qga.call("guest-get-host-name", json!({}))["host-name"],
        "vireo-guest"
    );
    let os = qga.call("guest-get-osinfo", json!({}));
    let kernel = guest
        .console_line("VIREO-GUEST-KERNEL ")
        .expect("kernel line");
    assert_eq!(os["kernel-release"], kernel.as_str());
    assert_eq!(os["machine"], "x86_64");

    let ifaces = qga.call("guest-network-get-interfaces", json!({}));
    let find = |name: &str| {
        ifaces
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {ifaces}"))
    };
    let eth0 = find("eth0");
    assert_eq!(eth0["hardware-address"], "52:54:00:12:34:56");
    assert!(
        eth0["ip-addresses"].as_array().is_some_and(|a| a.contains(
            &json!({"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24})
        )),
        "{eth0}"
    );
    assert!(find("lo")["ip-addresses"].to_string().contains("127.0.0.1"));
    assert_eq!(qga.call("guest-get-users", json!({})), json!([]));

    let fs = qga.call("guest-get-fsinfo", json!({}));
    let vda = fs
        .as_array()
        .and_then(|a| a.iter().find(|f| f["mountpoint"] == "/mnt/vda"))
        .cloned()
        .unwrap_or_else(|| panic!("no /mnt/vda in {fs}"));
    assert_eq!(vda["name"], "vda");
    assert!(vda["total-bytes"].as_u64().is_some_and(|n| n > 0), "{vda}");

    // Freeze: only the ext2 disk can be (rootfs and tmpfs are skipped).
    assert_eq!(qga.call("guest-fsfreeze-status", json!({})), "thawed");
    assert_eq!(qga.call("guest-fsfreeze-freeze", json!({})), 1);
    assert_eq!(qga.call("guest-fsfreeze-status", json!({})), "frozen");
    assert_eq!(qga.call("guest-fsfreeze-thaw", json!({})), 1);
    assert_eq!(qga.call("guest-fsfreeze-status", json!({})), "thawed");
    let n = qga.call(
        "guest-fsfreeze-freeze-list",
        json!({"mountpoints": ["/mnt/vda"]}),
    );
    assert_eq!(n, 1);
    assert_eq!(qga.call("guest-fsfreeze-thaw", json!({})), 1);

    // The host side goes away and comes back: the agent serves it again.
    drop(qga);
    let mut qga = Qga::new(&qga_sock);
    qga.resync(Duration::from_secs(30));
    assert_eq!(qga.call("guest-ping", json!({})), json!({}));

    // The ACPI power button is ignored here...
    qmp(&qmp_sock, "system_powerdown");
    thread::sleep(Duration::from_secs(3));
    assert!(
        guest.child.try_wait().expect("try_wait").is_none(),
        "the guest powered off on the ACPI button despite vireo.acpi=0"
    );
    assert_eq!(qga.call("guest-ping", json!({})), json!({}));

    // ...but the agent shuts the guest down.
    qga.send("guest-shutdown", json!({"mode": "powerdown"}));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = guest.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU still running after guest-shutdown"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "qemu: {status}");
    guest.wait_for(
        "vireo-guest-agent: guest-shutdown: power off",
        Duration::from_secs(5),
    );
    say(&format!(
        "agent_in_the_test_guest: {} ms in all",
        booted.elapsed().as_millis()
    ));
}
