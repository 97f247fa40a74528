//! `cargo bench -p vireo-vmm --bench net`
//!
//! virtio-net transmit from the test guest (`vmm/guest`,
//! `vireo.netbench=FRAMES,SIZE`) to the host side of a Linux bridge, under
//! vireo-vmm and under `qemu-system-x86_64 -M microvm -accel kvm` (the same
//! PVH ELF, `virtio-net-device` on a tap, QEMU's own virtio-net: no vhost),
//! each on its own tap of one bridge in a network namespace the bench
//! creates and deletes. Prints a table and writes `target/bench/vmm-net.json`.
//!
//! The guest sends FRAMES broadcast frames of SIZE bytes (EtherType 0x88B5,
//! payload `VIREO-NETBENCH` and a sequence number) as fast as its transmit
//! ring allows. On the host side an `AF_PACKET` socket bound to the bridge
//! for that EtherType counts the frames and bytes that arrive and the time
//! from the first to the last: frames per second and Mbit/s of Ethernet
//! frames (header and payload, no FCS). The guest's own figure, TSC cycles
//! from its first frame to its last completion, is shown per frame.
//!
//! Environment: `VIREO_BENCH_RUNS` (default 5 per VMM and size),
//! `VIREO_BENCH_FRAMES` (default 20000), `VIREO_BENCH_SIZES` (default
//! `64,1514`), `VIREO_BENCH_QEMU` (another QEMU binary). Needs root,
//! `ip` (iproute2) and a usable `/dev/kvm`; without them it prints a `SKIP`
//! line and exits 0.

use serde_json::{Value, json};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const QEMU_MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off,ioapic2=off,auto-kernel-cmdline=off";
const GUEST_MIB: u64 = 32;
const TIMEOUT: Duration = Duration::from_secs(180);
/// The bridge and the two taps, inside the bench's own namespace.
const BRIDGE: &str = "vnbbr0";
const TAP_VIREO: &str = "vnbtap0";
const TAP_QEMU: &str = "vnbtap1";
const ETHERTYPE: u16 = 0x88B5;
/// The guest's payload starts with this, right after the Ethernet header;
/// the sequence number (big-endian u32) follows it.
const TAG: &[u8] = b"VIREO-NETBENCH";
const SEQ_OFF: usize = 14 + 14;
const LINE: &str = "VIREO-TEST netbench";
/// Silence on the socket after the guest's report that ends a count.
const QUIET: Duration = Duration::from_millis(100);
// <linux/if_packet.h>
const SOL_PACKET: libc::c_int = 263;
const PACKET_STATISTICS: libc::c_int = 6;

mod kit;
use kit::{Proc, QEMU_ENV, Res, Scratch, env_num, median, qemu_bin, version_of, wait_line};

/// Runs `ip ARGS`; its stderr is the error.
fn ip(args: &[&str]) -> Res<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The bench's network namespace: a bridge and two vnet_hdr taps on it.
/// Deleted on drop (with everything in it), whatever happened.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Res<Self> {
        let ns = Netns {
            name: format!("vireo-netbench-{}", std::process::id()),
        };
        ip(&["netns", "add", &ns.name])?;
        // From here on, Drop removes it again.
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", n, "link", "set", BRIDGE, "up"])?;
        for tap in [TAP_VIREO, TAP_QEMU] {
            ip(&[
                "-n", n, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
            ])?;
            ip(&["-n", n, "link", "set", tap, "master", BRIDGE, "up"])?;
        }
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`
    /// execs it: the child's pid is the program's).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

/// Moves the calling thread into the namespace `name` (`/run/netns/NAME`).
fn enter_netns(name: &str) -> Res<()> {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns on a descriptor we own; it changes only this thread's
    // network namespace and touches no memory of ours.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    // Check that it took: this thread's namespace is the file's.
    use std::os::unix::fs::MetadataExt;
    let want = f.metadata().map_err(|e| format!("{path}: {e}"))?.ino();
    let have = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?
        .ino();
    if want != have {
        return Err(format!("setns {path}: the thread is still elsewhere"));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("bench net: cleaning up: {e}");
        }
    }
}

#[derive(Default, Clone, Debug)]
struct Received {
    frames: u64,
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    max_seq: u32,
    out_of_order: u64,
    /// Frames the kernel dropped at our socket (PACKET_STATISTICS).
    socket_drops: u64,
}

impl Received {
    fn span(&self) -> Duration {
        match (self.first, self.last) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        }
    }
    /// Frames per second from the first frame to the last.
    fn pps(&self) -> f64 {
        let s = self.span().as_secs_f64();
        if self.frames < 2 || s <= 0.0 {
            return f64::NAN;
        }
        (self.frames - 1) as f64 / s
    }
    fn mbps(&self) -> f64 {
        if self.frames == 0 {
            return f64::NAN;
        }
        self.pps() * (self.bytes as f64 / self.frames as f64) * 8.0 / 1e6
    }
}

/// An AF_PACKET socket for our EtherType bound to the bridge.
fn packet_socket() -> Res<OwnedFd> {
    let proto = ETHERTYPE.to_be();
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if fd < 0 {
        return Err(format!(
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(BRIDGE).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!(
            "{BRIDGE}: {} (not in the bench's namespace?)",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a sockaddr_ll of the size given, alive for the call.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(format!(
            "bind AF_PACKET to {BRIDGE}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // A big receive buffer (root may exceed rmem_max), and a short receive
    // timeout so that the loop sees the stop flag.
    let rcvbuf: libc::c_int = 64 << 20;
    // SAFETY: SO_RCVBUFFORCE reads one int that lives across the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &rcvbuf as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval that lives across the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
    }
    Ok(sock)
}

/// Frames the kernel dropped at the socket since the last call.
fn socket_drops(sock: &OwnedFd) -> u64 {
    #[repr(C)]
    struct TpacketStats {
        packets: u32,
        drops: u32,
    }
    let mut st = TpacketStats {
        packets: 0,
        drops: 0,
    };
    let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: PACKET_STATISTICS writes a struct tpacket_stats (two u32) of
    // at most `len` bytes into `st`, which lives across the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            SOL_PACKET,
            PACKET_STATISTICS,
            &mut st as *mut TpacketStats as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 { 0 } else { u64::from(st.drops) }
}

/// Frames taken per `recvmmsg` call (fewer system calls on the host side,
/// which shares the machine's cores with the VMM under test).
const BATCH: usize = 64;
/// Bytes of each frame copied out: enough for the header, tag and number.
const HEAD: usize = 64;

/// Counts our frames on `sock` until `expected` arrived, or `stop` is set
/// and the socket has been quiet for QUIET, or TIMEOUT. Frames that arrive
/// in one `recvmmsg` batch share its time stamp.
fn receive(sock: &OwnedFd, expected: u64, stop: &AtomicBool) -> Received {
    let mut rx = Received::default();
    let mut bufs = vec![[0u8; HEAD]; BATCH];
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    let mut next_seq: u32 = 0;
    socket_drops(sock); // zero the counter
    while rx.frames < expected && started.elapsed() < TIMEOUT {
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: HEAD,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: msghdr is plain data; all-zero is a valid value.
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_iov = iov as *mut libc::iovec;
                h.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        // SAFETY: `msgs` holds BATCH headers, each pointing at one iovec of
        // HEAD bytes into `bufs`; all of them outlive the call. With
        // MSG_TRUNC each msg_len is the frame's real length.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_TRUNC | libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let now = Instant::now();
        if n <= 0 {
            // Timeout (or EINTR): the end, once the guest has reported.
            if stop.load(Ordering::Acquire) {
                match quiet_since {
                    Some(q) if now.duration_since(q) >= QUIET => break,
                    Some(_) => {}
                    None => quiet_since = Some(now),
                }
            }
            continue;
        }
        quiet_since = None;
        for (m, buf) in msgs.iter().zip(&bufs).take(n as usize) {
            let len = m.msg_len as usize;
            if len < SEQ_OFF + 4 || buf[12..14] != ETHERTYPE.to_be_bytes() || &buf[14..28] != TAG {
                continue; // the guest's greeting frame, or someone else's
            }
            let seq = u32::from_be_bytes([
                buf[SEQ_OFF],
                buf[SEQ_OFF + 1],
                buf[SEQ_OFF + 2],
                buf[SEQ_OFF + 3],
            ]);
            if seq != next_seq {
                rx.out_of_order += u64::from(seq < next_seq);
            }
            next_seq = seq.wrapping_add(1);
            rx.max_seq = rx.max_seq.max(seq);
            rx.frames += 1;
            rx.bytes += len as u64;
            rx.first.get_or_insert(now);
            rx.last = Some(now);
        }
    }
    rx.socket_drops = socket_drops(sock);
    rx
}

/// One run's figures.
#[derive(Clone, Debug)]
struct Run {
    sent: u64,
    cycles: u64,
    rx: Received,
}

impl Run {
    fn json(&self) -> Value {
        json!({
            "sent": self.sent,
            "guest_cycles": self.cycles,
            "received": self.rx.frames,
            "received_bytes": self.rx.bytes,
            "span_ms": self.rx.span().as_secs_f64() * 1e3,
            "frames_per_s": self.rx.pps(),
            "mbit_per_s": self.rx.mbps(),
            "lost": self.sent.saturating_sub(self.rx.frames),
            "socket_drops": self.rx.socket_drops,
            "out_of_order": self.rx.out_of_order,
        })
    }
}

/// `VIREO-TEST netbench sent=N cycles=C`: (N, C); a FAIL is an error.
fn parse_report(line: &str) -> Res<(u64, u64)> {
    if line.contains("FAIL") {
        return Err(format!("guest: {line}"));
    }
    let field = |key: &str| -> Res<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {key} in {line:?}"))
    };
    Ok((field("sent=")?, field("cycles=")?))
}

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Vireo,
    Qemu,
}

/// One guest under one VMM: the receiver runs in a thread inside the
/// namespace while the VMM runs the flood.
fn run_once(
    vmm: Vmm,
    ns: &Netns,
    bin: &Path,
    guest: &Path,
    dir: &Path,
    frames: u32,
    size: u32,
) -> Res<Run> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let console = dir.join("console.log");
    let stderr = File::create(dir.join("stderr.log"))
        .map_err(|e| format!("create stderr log in {}: {e}", dir.display()))?;
    let bench_opt = format!("vireo.netbench={frames},{size}");

    // The receiver first, so that no frame goes uncounted.
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Res<()>>();
    let ns_name = ns.name.clone();
    let stop_rx = Arc::clone(&stop);
    let receiver = std::thread::spawn(move || -> Res<Received> {
        let sock = enter_netns(&ns_name).and_then(|()| packet_socket());
        let sock = match sock {
            Ok(s) => {
                let _ = ready_tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        Ok(receive(&sock, u64::from(frames), &stop_rx))
    });
    let ready = ready_rx
        .recv()
        .map_err(|_| "the receiver thread ended before it was ready".to_string())
        .and_then(|r| r);
    // Whatever happens from here on, the receiver is stopped and joined.
    let result = ready.and_then(|()| {
        let program = match vmm {
            Vmm::Vireo => bin.to_path_buf(),
            Vmm::Qemu => PathBuf::from(qemu_bin()),
        };
        let mut cmd = ns.command(&program);
        match vmm {
            Vmm::Vireo => {
                cmd.arg("run")
                    .arg("--kernel")
                    .arg(guest)
                    .args([
                        "--cmdline",
                        &format!("console=ttyS0 {bench_opt} vireo.poweroff=1"),
                    ])
                    .args(["--memory-mib", &GUEST_MIB.to_string(), "--vcpus", "1"])
                    .args(["--net", &format!("{TAP_VIREO},mac=02:56:49:52:45:70")])
                    .arg("--api-socket")
                    .arg(dir.join("api.sock"))
                    .arg("--console-log")
                    .arg(&console)
                    .arg("--console-socket")
                    .arg(dir.join("console.sock"))
                    .arg("--exit-file")
                    .arg(dir.join("exit.json"));
            }
            Vmm::Qemu => {
                cmd.args(["-M", QEMU_MACHINE, "-accel", "kvm"])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-m", &GUEST_MIB.to_string()])
                    .args(["-global", "virtio-mmio.force-legacy=false"])
                    .arg("-kernel")
                    .arg(guest)
                    .args(["-append", &format!("console=ttyS0 {bench_opt}")])
                    .args(["-serial", &format!("file:{}", console.display())])
                    .args([
                        "-netdev",
                        &format!("tap,id=n0,ifname={TAP_QEMU},script=no,downscript=no,vhost=off"),
                    ])
                    .args([
                        "-device",
                        "virtio-net-device,netdev=n0,mac=02:56:49:52:45:71",
                    ]);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut p = Proc::spawn(&mut cmd)?;
        let line = wait_line(&console, LINE, &mut p, TIMEOUT);
        stop.store(true, Ordering::Release);
        let (sent, cycles) = parse_report(&line?)?;
        if vmm == Vmm::Vireo {
            // It powers off by itself right after the report.
            let since = Instant::now();
            while p.0.try_wait().ok().flatten().is_none() && since.elapsed() < TIMEOUT {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        drop(p); // QEMU: microvm offers no power-off, so it is killed.
        Ok((sent, cycles))
    });
    stop.store(true, Ordering::Release);
    let rx = receiver
        .join()
        .map_err(|_| "the receiver thread panicked".to_string())?;
    let (sent, cycles) = result?;
    Ok(Run {
        sent,
        cycles,
        rx: rx?,
    })
}

fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .filter(|f| !f.is_nan())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn stats_json(v: &[f64]) -> Value {
    let (lo, hi) = range(v);
    json!({"median": median(v), "min": lo, "max": hi})
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench net: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let runs: usize = env_num("VIREO_BENCH_RUNS", 5)?.max(1);
    let frames: u32 = env_num("VIREO_BENCH_FRAMES", 20_000)?.max(2);
    let sizes: Vec<u32> = std::env::var("VIREO_BENCH_SIZES")
        .unwrap_or_else(|_| "64,1514".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (60..=1514).contains(n))
                .ok_or_else(|| format!("VIREO_BENCH_SIZES: {s:?} is not a size in 60..=1514"))
        })
        .collect::<Res<_>>()?;

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP vmm net bench: needs root (a network namespace, a bridge and taps)");
        return Ok(());
    }
    let kvm = vireo_vmm::probe::probe();
    if kvm == vireo_vmm::probe::KvmKind::Absent {
        println!(
            "SKIP vmm net bench: /dev/kvm is not usable here ({})",
            kvm.describe()
        );
        return Ok(());
    }
    if !Path::new("/dev/net/tun").exists() {
        println!("SKIP vmm net bench: no /dev/net/tun");
        return Ok(());
    }
    if Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        println!("SKIP vmm net bench: `ip` (iproute2) not found");
        return Ok(());
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_vireo-vmm"));
    let scratch =
        Scratch(std::env::temp_dir().join(format!("vireo-netbench-{}", std::process::id())));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let guest = match kit::build_guest(&script, &scratch.0.join("guest")) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP vmm net bench: cannot build the test guest ({e}): no C compiler?");
            return Ok(());
        }
    };
    let qemu = version_of(&qemu_bin());
    if qemu.is_none() {
        println!(
            "SKIP QEMU parts: {} not found or not runnable (Debian: apt-get install qemu-system-x86; {QEMU_ENV} names another)",
            qemu_bin()
        );
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load_start = loadavg();
    println!("vireo-vmm net bench, {date}: KVM {}", kvm.describe());
    println!("  host load average at start: {load_start}");
    println!("  vireo-vmm {}", bin.display());
    println!("  QEMU      {}", qemu.as_deref().unwrap_or("(absent)"));
    println!(
        "  guest     {} ({GUEST_MIB} MiB, 1 vCPU): {frames} frames per run, sizes {sizes:?}, {runs} runs each",
        guest.display()
    );

    let ns = Netns::create()?;
    println!(
        "  namespace {} (bridge {BRIDGE}; taps {TAP_VIREO} for vireo-vmm, {TAP_QEMU} for QEMU)",
        ns.name
    );

    // Interleaved runs, so that load from elsewhere hits both alike.
    let mut results: Vec<(u32, Vec<Run>, Vec<Run>)> = Vec::new();
    for &size in &sizes {
        let (mut v, mut q) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let d = scratch.0.join(format!("v{size}-{i}"));
            v.push(run_once(Vmm::Vireo, &ns, &bin, &guest, &d, frames, size)?);
            if qemu.is_some() {
                let d = scratch.0.join(format!("q{size}-{i}"));
                q.push(run_once(Vmm::Qemu, &ns, &bin, &guest, &d, frames, size)?);
            }
        }
        results.push((size, v, q));
    }
    drop(ns);
    let load_end = loadavg();

    // The table.
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>6}  min-max [vireo-vmm | QEMU]",
        "median of runs (host side)", "vireo-vmm", "QEMU", "ratio"
    );
    let mut json_sizes = Vec::new();
    for (size, v, q) in &results {
        type Pick = fn(&Run) -> f64;
        let rows: [(&str, Pick, usize); 5] = [
            ("frames/s", |r| r.rx.pps(), 0),
            ("Mbit/s", |r| r.rx.mbps(), 1),
            (
                "frames lost (sent - received)",
                |r| r.sent.saturating_sub(r.rx.frames) as f64,
                0,
            ),
            (
                "  of which dropped at our socket",
                |r| r.rx.socket_drops as f64,
                0,
            ),
            (
                "guest TSC cycles per frame",
                |r| r.cycles as f64 / r.sent.max(1) as f64,
                0,
            ),
        ];
        let mut per_size = serde_json::Map::new();
        for (i, (name, pick, prec)) in rows.iter().enumerate() {
            let vs: Vec<f64> = v.iter().map(pick).collect();
            let qs: Vec<f64> = q.iter().map(pick).collect();
            let (vm, qm) = (median(&vs), median(&qs));
            let fmt = |x: f64| {
                if x.is_nan() {
                    "n/a".to_string()
                } else {
                    format!("{x:.prec$}", prec = *prec)
                }
            };
            let spread = |x: &[f64]| {
                if x.is_empty() {
                    "n/a".to_string()
                } else {
                    let (lo, hi) = range(x);
                    format!("{}-{}", fmt(lo), fmt(hi))
                }
            };
            // Ratios only for the rates (lost frames may be 0).
            let ratio = (i < 2 && !qs.is_empty()).then(|| vm / qm);
            println!(
                "{:<34} {:>12} {:>12} {:>6}  [{} | {}]",
                format!("{size} B: {name}"),
                fmt(vm),
                if qs.is_empty() { "n/a".into() } else { fmt(qm) },
                ratio.map_or(String::new(), |r| format!("{r:.2}")),
                spread(&vs),
                spread(&qs),
            );
            let key = match i {
                0 => "frames_per_s",
                1 => "mbit_per_s",
                2 => "lost",
                3 => "socket_drops",
                _ => "guest_cycles_per_frame",
            };
            per_size.insert(
                key.into(),
                json!({
                    "vireo": stats_json(&vs),
                    "qemu": (!qs.is_empty()).then(|| stats_json(&qs)),
                    "ratio_vireo_over_qemu": ratio,
                }),
            );
        }
        json_sizes.push(json!({
            "size": size,
            "summary": per_size,
            "vireo_runs": v.iter().map(Run::json).collect::<Vec<_>>(),
            "qemu_runs": q.iter().map(Run::json).collect::<Vec<_>>(),
        }));
    }
    println!();
    println!("  host load average at end: {load_end}");
    println!("  ratio = vireo-vmm / QEMU (above 1: vireo-vmm is faster)");
    if kvm == vireo_vmm::probe::KvmKind::Pvm {
        println!(
            "  note: under kvm_pvm the guest's instructions are emulated one by one, so the \
             guest's own loop (its TSC cycles per frame) bounds both VMMs alike"
        );
    }

    let out = json!({
        "date": date,
        "kvm": kvm.describe(),
        "loadavg_at_start": load_start,
        "loadavg_at_end": load_end,
        "vireo_vmm": bin.display().to_string(),
        "qemu": qemu,
        "qemu_command": format!("ip netns exec NS {} -M {QEMU_MACHINE} -accel kvm -nodefaults -no-user-config -display none -m {GUEST_MIB} -global virtio-mmio.force-legacy=false -kernel ELF -append \"console=ttyS0 vireo.netbench=FRAMES,SIZE\" -serial file:LOG -netdev tap,id=n0,ifname={TAP_QEMU},script=no,downscript=no,vhost=off -device virtio-net-device,netdev=n0,mac=02:56:49:52:45:71", qemu_bin()),
        "vireo_command": format!("ip netns exec NS vireo-vmm run --kernel ELF --cmdline \"console=ttyS0 vireo.netbench=FRAMES,SIZE vireo.poweroff=1\" --memory-mib {GUEST_MIB} --vcpus 1 --net {TAP_VIREO},mac=02:56:49:52:45:70 ..."),
        "guest_mib": GUEST_MIB,
        "frames": frames,
        "runs": runs,
        "sizes": json_sizes,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("vmm/ has no parent directory")?
        .join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let path = dir.join("vmm-net.json");
    let text = serde_json::to_string_pretty(&out).map_err(|e| format!("json: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
