//! `cargo bench -p vireo-vmm --bench boot [-- BOOTS [DENSITY]]`
//!
//! The test guest (`vmm/guest`) booted BOOTS times (default 20) by
//! vireo-vmm and by `qemu-system-x86_64 -M microvm -accel kvm` (the same PVH
//! ELF), the memory each VMM uses beside its guest while the guest idles,
//! and DENSITY (default 50) idle vireo-vmm guests of 32 MiB started at once.
//! Prints a table and writes `target/bench/vmm-boot.json`.
//!
//! Measures, and which is compared with which:
//! * boot timer: vireo-vmm's `boot_time_us` from its exit file (its clock
//!   starts at its own process start) against the time from spawning QEMU
//!   to QEMU's exit on the guest's `isa-debug-exit` write, which the guest
//!   makes right after its boot-timer write (QEMU has no boot timer; the
//!   QEMU figure includes its exit, so it favours vireo-vmm slightly).
//! * console marker: for both, the bench's own clock from spawn to
//!   `VIREO-TEST-GUEST-READY` appearing in the console file (polled every
//!   0.2 ms): the same method for both.
//! * memory: from `/proc/PID/smaps` of the idle VMM; guest RAM is the
//!   anonymous mapping of exactly the guest memory size; VMM overhead is the
//!   private memory (clean + dirty) outside it.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = "VIREO-TEST-GUEST-READY";
const IDLE: &str = "VIREO-TEST idle:";
const GUEST_MIB: u64 = 32;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Names another QEMU binary (a path, or a name looked up in PATH).
const QEMU_MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off";
const TIME_GOAL_RATIO: f64 = 0.5;
const OVERHEAD_GOAL_KIB: u64 = 5 * 1024;
const DENSITY_GOAL: usize = 50;

mod kit;
use kit::{QEMU_ENV, Res, Scratch, qemu_bin, version_of};

/// A child process that is killed and reaped when dropped, whatever happens.
struct Proc {
    child: Child,
    started: Instant,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Res<Self> {
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
        Ok(Self { child, started })
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Waits for the process to exit; the time since spawn and its status.
    fn wait_exit(&mut self, timeout: Duration) -> Res<(Duration, std::process::ExitStatus)> {
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok((self.started.elapsed(), st)),
                Ok(None) if self.started.elapsed() > timeout => {
                    return Err(format!(
                        "pid {} still running after {timeout:?}",
                        self.pid()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => return Err(format!("wait pid {}: {e}", self.pid())),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `file` until it contains `needle`; the time since `since`.
fn wait_file(file: &Path, needle: &str, since: Instant, proc: &mut Proc) -> Res<Duration> {
    loop {
        let found =
            std::fs::read(file).is_ok_and(|text| String::from_utf8_lossy(&text).contains(needle));
        if found {
            return Ok(since.elapsed());
        }
        if let Ok(Some(st)) = proc.child.try_wait() {
            return Err(format!(
                "pid {} exited ({st}) before {needle:?} in {}",
                proc.pid(),
                file.display()
            ));
        }
        if since.elapsed() > TIMEOUT {
            return Err(format!(
                "no {needle:?} in {} after {TIMEOUT:?}",
                file.display()
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

struct VireoFiles {
    api: PathBuf,
    console: PathBuf,
    exit: PathBuf,
}

fn vireo_cmd(bin: &Path, guest: &Path, dir: &Path, cmdline: &str) -> Res<(Command, VireoFiles)> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let files = VireoFiles {
        api: dir.join("api.sock"),
        console: dir.join("console.log"),
        exit: dir.join("exit.json"),
    };
    let stderr = std::fs::File::create(dir.join("stderr.log"))
        .map_err(|e| format!("create stderr log in {}: {e}", dir.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest)
        .args(["--cmdline", cmdline])
        .args([
            "--memory-mib",
            &GUEST_MIB.to_string(),
            "--vcpus",
            "1",
            "--rng",
        ])
        .arg("--api-socket")
        .arg(&files.api)
        .arg("--console-log")
        .arg(&files.console)
        .arg("--console-socket")
        .arg(dir.join("console.sock"))
        .arg("--exit-file")
        .arg(&files.exit)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    Ok((cmd, files))
}

fn qemu_cmd(guest: &Path, append: &str, serial: &str) -> Command {
    let mut cmd = Command::new(qemu_bin());
    cmd.args([
        "-M",
        QEMU_MACHINE,
        "-accel",
        "kvm",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-m", &GUEST_MIB.to_string()])
    .arg("-kernel")
    .arg(guest)
    .args(["-append", append, "-serial", serial])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

fn read_json(path: &Path) -> Res<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One vireo-vmm boot with `vireo.poweroff=1`: (boot_time_us, spawn to
/// marker, spawn to exit).
fn vireo_boot(bin: &Path, guest: &Path, dir: &Path) -> Res<(Duration, Duration, Duration)> {
    let (mut cmd, files) = vireo_cmd(bin, guest, dir, "console=ttyS0 vireo.poweroff=1")?;
    let mut p = Proc::spawn(&mut cmd)?;
    let since = p.started;
    let marker = wait_file(&files.console, MARKER, since, &mut p)?;
    let (exited, st) = p.wait_exit(TIMEOUT)?;
    let exit = read_json(&files.exit)?;
    if !st.success() || exit["reason"] != "poweroff" {
        return Err(format!("vireo-vmm ended {st}: {exit}"));
    }
    let us = exit["boot_time_us"]
        .as_u64()
        .ok_or_else(|| format!("no boot_time_us in {exit}"))?;
    Ok((Duration::from_micros(us), marker, exited))
}

/// QEMU to the guest's debug-exit write: the time from spawn to its exit.
fn qemu_debugexit(guest: &Path) -> Res<Duration> {
    let mut p = Proc::spawn(&mut qemu_cmd(
        guest,
        "console=ttyS0 vireo.debugexit=1",
        "null",
    ))?;
    let (t, st) = p.wait_exit(TIMEOUT)?;
    // isa-debug-exit: exit status (value << 1) | 1, the guest writes 0.
    if st.code() != Some(1) {
        return Err(format!(
            "QEMU ended {st}, expected status 1 from isa-debug-exit"
        ));
    }
    Ok(t)
}

/// QEMU to the console marker (then killed: microvm without ACPI has no
/// power-off the guest knows).
fn qemu_marker(guest: &Path, dir: &Path) -> Res<Duration> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let log = dir.join("console.log");
    let mut p = Proc::spawn(&mut qemu_cmd(
        guest,
        "console=ttyS0",
        &format!("file:{}", log.display()),
    ))?;
    let since = p.started;
    wait_file(&log, MARKER, since, &mut p)
}

#[derive(Default, Clone, Copy)]
struct Mem {
    rss_kib: u64,
    guest_rss_kib: u64,
    private_outside_kib: u64,
    /// Private_Dirty alone: what the VMM wrote (heap, stacks, guest-visible
    /// state), leaving out its binary's pages, which count as Private_Clean
    /// while only one process maps them.
    dirty_outside_kib: u64,
    rss_outside_kib: u64,
}

/// Sums `/proc/PID/smaps`, splitting off the guest-RAM mapping.
fn smaps(pid: u32) -> Res<Mem> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let guest_kib = GUEST_MIB * 1024;
    let mut m = Mem::default();
    let mut found_guest = false;
    // Per mapping: (anonymous, size, rss, private, private dirty).
    let mut cur: Option<(bool, u64, u64, u64, u64)> = None;
    let mut flush = |cur: Option<(bool, u64, u64, u64, u64)>, m: &mut Mem| {
        if let Some((anon, size, rss, private, dirty)) = cur {
            m.rss_kib += rss;
            if anon && size == guest_kib && !found_guest {
                found_guest = true;
                m.guest_rss_kib += rss;
            } else {
                m.rss_outside_kib += rss;
                m.private_outside_kib += private;
                m.dirty_outside_kib += dirty;
            }
        }
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            flush(cur.take(), &mut m);
            // start-end perms offset dev inode [path]
            let rest: Vec<&str> = words.collect();
            let anon = rest.get(3) == Some(&"0") && rest.len() <= 4;
            cur = Some((anon, 0, 0, 0, 0));
            continue;
        }
        let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if let Some(c) = cur.as_mut() {
            match first {
                "Size:" => c.1 = kib,
                "Rss:" => c.2 = kib,
                "Private_Clean:" => c.3 += kib,
                "Private_Dirty:" => {
                    c.3 += kib;
                    c.4 += kib;
                }
                _ => {}
            }
        }
    }
    flush(cur.take(), &mut m);
    if !found_guest {
        return Err(format!(
            "{path}: no anonymous mapping of {guest_kib} KiB (guest RAM)"
        ));
    }
    Ok(m)
}

/// Utime + stime of a process in clock ticks.
fn cpu_ticks(pid: u32) -> Res<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command (which may hold spaces) start at state (3).
    let after = text
        .rsplit_once(')')
        .map(|(_, a)| a)
        .ok_or_else(|| format!("{path}: no ')'"))?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| -> Res<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{path}: field {}", i + 3))
    };
    // utime is field 14, stime 15 (1-based): indexes 11 and 12 here.
    Ok(num(11)? + num(12)?)
}

fn mem_available_kib() -> Res<u64> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no MemAvailable in /proc/meminfo".to_string())
}

fn api(sock: &Path, request: &str) -> Res<Value> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("set timeout: {e}"))?;
    writeln!(s, "{request}").map_err(|e| format!("{}: {e}", sock.display()))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("answer {line:?}: {e}"))
}

/// Median of durations in milliseconds.
fn median_ms(v: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    match ms.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => ms[n / 2],
        n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
    }
}

fn range_ms(v: &[Duration]) -> (f64, f64) {
    let ms = v.iter().map(|d| d.as_secs_f64() * 1e3);
    (
        ms.clone().fold(f64::INFINITY, f64::min),
        ms.fold(0.0, f64::max),
    )
}

fn median_mem(v: &[Mem]) -> Mem {
    let med = |f: fn(&Mem) -> u64| {
        let mut x: Vec<u64> = v.iter().map(f).collect();
        x.sort_unstable();
        x.get(x.len() / 2).copied().unwrap_or(0)
    };
    Mem {
        rss_kib: med(|m| m.rss_kib),
        guest_rss_kib: med(|m| m.guest_rss_kib),
        private_outside_kib: med(|m| m.private_outside_kib),
        dirty_outside_kib: med(|m| m.dirty_outside_kib),
        rss_outside_kib: med(|m| m.rss_outside_kib),
    }
}

fn mem_json(m: &Mem) -> Value {
    json!({
        "rss_kib": m.rss_kib,
        "guest_ram_rss_kib": m.guest_rss_kib,
        "rss_outside_guest_kib": m.rss_outside_kib,
        "private_outside_guest_kib": m.private_outside_kib,
        "private_dirty_outside_guest_kib": m.dirty_outside_kib,
    })
}

fn durations_json(v: &[Duration]) -> Value {
    json!({
        "median_ms": median_ms(v),
        "min_ms": range_ms(v).0,
        "max_ms": range_ms(v).1,
        "runs_ms": v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
    })
}

/// The memory of an idle guest's vireo-vmm (3 samples, median).
fn idle_mem_vireo(bin: &Path, guest: &Path, dir: &Path) -> Res<Mem> {
    let mut samples = Vec::new();
    for i in 0..3 {
        let (mut cmd, files) =
            vireo_cmd(bin, guest, &dir.join(format!("vireo-{i}")), "console=ttyS0")?;
        let mut p = Proc::spawn(&mut cmd)?;
        let since = p.started;
        wait_file(&files.console, IDLE, since, &mut p)?;
        std::thread::sleep(Duration::from_millis(300));
        samples.push(smaps(p.pid())?);
        api(&files.api, r#"{"command": "destroy"}"#)?;
        p.wait_exit(TIMEOUT)?;
    }
    Ok(median_mem(&samples))
}

fn idle_mem_qemu(guest: &Path, dir: &Path) -> Res<Mem> {
    let mut samples = Vec::new();
    for i in 0..3 {
        let d = dir.join(format!("qemu-{i}"));
        std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        let log = d.join("console.log");
        let mut p = Proc::spawn(&mut qemu_cmd(
            guest,
            "console=ttyS0",
            &format!("file:{}", log.display()),
        ))?;
        let since = p.started;
        wait_file(&log, IDLE, since, &mut p)?;
        std::thread::sleep(Duration::from_millis(300));
        samples.push(smaps(p.pid())?);
    }
    Ok(median_mem(&samples))
}

struct Density {
    count: usize,
    all_ready: Duration,
    overhead: Mem,
    host_used_kib: i64,
    cpu_percent: f64,
    destroyed: usize,
}

/// `n` idle vireo-vmm guests at once.
fn density(bin: &Path, guest: &Path, dir: &Path, n: usize) -> Res<Density> {
    let avail_before = mem_available_kib()?;
    let mut procs = Vec::new();
    let mut files = Vec::new();
    let since = Instant::now();
    for i in 0..n {
        let (mut cmd, f) = vireo_cmd(bin, guest, &dir.join(format!("d{i}")), "console=ttyS0")?;
        procs.push(Proc::spawn(&mut cmd)?);
        files.push(f);
    }
    // Every guest must reach the marker (and then idle).
    for (p, f) in procs.iter_mut().zip(&files) {
        wait_file(&f.console, MARKER, since, p)?;
    }
    let all_ready = since.elapsed();
    for (p, f) in procs.iter_mut().zip(&files) {
        wait_file(&f.console, IDLE, since, p)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut total = Mem::default();
    for p in &procs {
        let m = smaps(p.pid())?;
        total.rss_kib += m.rss_kib;
        total.guest_rss_kib += m.guest_rss_kib;
        total.rss_outside_kib += m.rss_outside_kib;
        total.private_outside_kib += m.private_outside_kib;
        total.dirty_outside_kib += m.dirty_outside_kib;
    }
    let host_used_kib = avail_before as i64 - mem_available_kib()? as i64;
    // CPU over 5 s of idling.
    let ticks =
        |procs: &[Proc]| -> Res<u64> { procs.iter().map(|p| cpu_ticks(p.pid())).sum::<Res<u64>>() };
    let t0 = Instant::now();
    let c0 = ticks(&procs)?;
    std::thread::sleep(Duration::from_secs(5));
    let c1 = ticks(&procs)?;
    let secs = t0.elapsed().as_secs_f64();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_percent = (c1 - c0) as f64 / hz / secs * 100.0;
    let mut destroyed = 0;
    for (p, f) in procs.iter_mut().zip(&files) {
        let answer = api(&f.api, r#"{"command": "destroy"}"#)?;
        if answer["ok"] != true {
            return Err(format!("destroy pid {}: {answer}", p.pid()));
        }
    }
    for (p, f) in procs.iter_mut().zip(&files) {
        p.wait_exit(TIMEOUT)?;
        if read_json(&f.exit)?["reason"] == "destroyed" {
            destroyed += 1;
        }
    }
    Ok(Density {
        count: n,
        all_ready,
        overhead: total,
        host_used_kib,
        cpu_percent,
        destroyed,
    })
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench boot: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    // cargo bench passes `--bench`; the numbers are ours.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().map_err(|e| format!("argument {a:?}: {e}")))
        .collect::<Res<_>>()?;
    let boots = nums.first().copied().unwrap_or(20).max(1);
    let density_n = nums.get(1).copied().unwrap_or(50);

    let kvm = vireo_vmm::probe::probe();
    if kvm == vireo_vmm::probe::KvmKind::Absent {
        println!(
            "SKIP vmm boot bench: /dev/kvm is not usable here ({})",
            kvm.describe()
        );
        return Ok(());
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_vireo-vmm"));
    let scratch =
        Scratch(std::env::temp_dir().join(format!("vireo-vmmbench-{}", std::process::id())));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let guest = match kit::build_guest(&script, &scratch.0.join("guest")) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP vmm boot bench: cannot build the test guest ({e}): no C compiler?");
            return Ok(());
        }
    };
    let qemu = version_of(&qemu_bin());
    if qemu.is_none() {
        println!(
            "SKIP QEMU parts (boots, memory, ratios): {} not found or not runnable (Debian: apt-get install qemu-system-x86; {QEMU_ENV} names another)",
            qemu_bin()
        );
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("vireo-vmm boot bench, {date}: KVM {}", kvm.describe());
    // Other work on the machine shows in every figure: say how busy it was.
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!("  host load average at start: {loadavg}");
    println!("  vireo-vmm {}", bin.display());
    println!("  QEMU      {}", qemu.as_deref().unwrap_or("(absent)"));
    println!(
        "  guest     {} ({GUEST_MIB} MiB, 1 vCPU), {boots} boots each",
        guest.display()
    );

    // Boots, interleaved so that load from elsewhere hits both alike.
    let (mut v_timer, mut v_marker, mut v_exit) = (Vec::new(), Vec::new(), Vec::new());
    let (mut q_exit, mut q_marker) = (Vec::new(), Vec::new());
    for i in 0..boots {
        let (t, m, e) = vireo_boot(&bin, &guest, &scratch.0.join(format!("v{i}")))?;
        v_timer.push(t);
        v_marker.push(m);
        v_exit.push(e);
        if qemu.is_some() {
            q_exit.push(qemu_debugexit(&guest)?);
            q_marker.push(qemu_marker(&guest, &scratch.0.join(format!("q{i}")))?);
        }
    }
    let v_mem = idle_mem_vireo(&bin, &guest, &scratch.0.join("mem"))?;
    let q_mem = match qemu {
        Some(_) => Some(idle_mem_qemu(&guest, &scratch.0.join("mem"))?),
        None => None,
    };
    let dens = if density_n > 0 {
        Some(density(
            &bin,
            &guest,
            &scratch.0.join("density"),
            density_n,
        )?)
    } else {
        None
    };

    // The table.
    let ratio = |a: f64, b: f64| a / b;
    let fmt_q = |v: &[Duration]| {
        if v.is_empty() {
            "       n/a".to_string()
        } else {
            format!("{:7.1} ms", median_ms(v))
        }
    };
    let time_ratio =
        |v: &[Duration], q: &[Duration]| (!q.is_empty()).then(|| ratio(median_ms(v), median_ms(q)));
    let r_timer = time_ratio(&v_timer, &q_exit);
    let r_marker = time_ratio(&v_marker, &q_marker);
    let fmt_r = |r: Option<f64>| r.map_or("  n/a".to_string(), |r| format!("{r:5.2}"));
    println!();
    println!(
        "{:<52} {:>10} {:>10} {:>5}  min-max ms [vireo-vmm | QEMU]",
        "median of runs", "vireo-vmm", "QEMU", "ratio"
    );
    // Min-max of the runs after the ratio: vireo-vmm | QEMU.
    let spread = |v: &[Duration], q: &[Duration]| {
        let one = |x: &[Duration]| {
            if x.is_empty() {
                "n/a".to_string()
            } else {
                let (lo, hi) = range_ms(x);
                format!("{lo:.1}-{hi:.1}")
            }
        };
        format!("[{} | {}]", one(v), one(q))
    };
    println!(
        "{:<52} {:7.1} ms {} {}  {}",
        "boot timer (vireo boot_time_us | QEMU debug-exit)",
        median_ms(&v_timer),
        fmt_q(&q_exit),
        fmt_r(r_timer),
        spread(&v_timer, &q_exit)
    );
    println!(
        "{:<52} {:7.1} ms {} {}  {}",
        "spawn to console marker (bench clock, both)",
        median_ms(&v_marker),
        fmt_q(&q_marker),
        fmt_r(r_marker),
        spread(&v_marker, &q_marker)
    );
    println!(
        "{:<52} {:7.1} ms {:>10} {:>5}  {}",
        "spawn to process exit (vireo: poweroff)",
        median_ms(&v_exit),
        "",
        "",
        spread(&v_exit, &[])
    );
    let q_or = |f: fn(&Mem) -> u64| q_mem.as_ref().map(f);
    let mem_row = |name: &str, v: u64, q: Option<u64>| {
        let qs = q.map_or("       n/a".to_string(), |q| format!("{:6.2} MiB", mib(q)));
        let rs = q.map_or("  n/a".to_string(), |q| {
            format!("{:5.2}", ratio(v as f64, q as f64))
        });
        println!("{name:<52} {:6.2} MiB {qs} {rs}", mib(v));
    };
    mem_row("idle: RSS total", v_mem.rss_kib, q_or(|m| m.rss_kib));
    mem_row(
        "idle: guest RAM touched (RSS of guest mapping)",
        v_mem.guest_rss_kib,
        q_or(|m| m.guest_rss_kib),
    );
    mem_row(
        "idle: RSS outside guest RAM",
        v_mem.rss_outside_kib,
        q_or(|m| m.rss_outside_kib),
    );
    mem_row(
        "idle: VMM overhead = private outside guest RAM",
        v_mem.private_outside_kib,
        q_or(|m| m.private_outside_kib),
    );
    mem_row(
        "idle:   of which Private_Dirty (written by the VMM)",
        v_mem.dirty_outside_kib,
        q_or(|m| m.dirty_outside_kib),
    );
    if let Some(d) = &dens {
        println!();
        println!(
            "density: {} idle vireo-vmm guests of {GUEST_MIB} MiB at once",
            d.count
        );
        println!(
            "  all at the console marker after   {:8.1} ms",
            d.all_ready.as_secs_f64() * 1e3
        );
        println!(
            "  VMM overhead (private outside guest RAM): total {:.1} MiB, per VM {:.2} MiB",
            mib(d.overhead.private_outside_kib),
            mib(d.overhead.private_outside_kib) / d.count as f64
        );
        println!(
            "    of which Private_Dirty: total {:.1} MiB, per VM {:.2} MiB",
            mib(d.overhead.dirty_outside_kib),
            mib(d.overhead.dirty_outside_kib) / d.count as f64
        );
        println!(
            "  RSS total {:.1} MiB (guest RAM touched {:.1} MiB); host MemAvailable dropped {:.1} MiB",
            mib(d.overhead.rss_kib),
            mib(d.overhead.guest_rss_kib),
            d.host_used_kib as f64 / 1024.0
        );
        println!(
            "  CPU while idle (5 s, all VMMs): {:.1}% of one core",
            d.cpu_percent
        );
        println!("  destroyed via the API: {}/{}", d.destroyed, d.count);
    }
    println!();
    println!("goals:");
    let time_goal = |r: Option<f64>| r.map_or("SKIP (no QEMU)", |r| pass(r <= TIME_GOAL_RATIO));
    println!(
        "  boot timer <= {TIME_GOAL_RATIO} x QEMU microvm's:            {} ({})",
        time_goal(r_timer),
        fmt_r(r_timer).trim()
    );
    println!(
        "  console marker <= {TIME_GOAL_RATIO} x QEMU microvm's:        {} ({})",
        time_goal(r_marker),
        fmt_r(r_marker).trim()
    );
    let overhead_ok = v_mem.private_outside_kib <= OVERHEAD_GOAL_KIB;
    println!(
        "  VMM overhead <= 5 MiB:                          {} ({:.2} MiB)",
        pass(overhead_ok),
        mib(v_mem.private_outside_kib)
    );
    // Judged only when at least 50 were started (fewer say nothing of it).
    let density_ok = dens
        .as_ref()
        .filter(|d| d.count >= DENSITY_GOAL)
        .map(|d| d.destroyed == d.count);
    println!(
        "  50 guests of 32 MiB at once:                    {}",
        match (&dens, density_ok) {
            (Some(d), Some(ok)) => format!(
                "{} ({} started, {} destroyed)",
                pass(ok),
                d.count,
                d.destroyed
            ),
            (Some(d), None) => format!("NOT JUDGED (only {} started)", d.count),
            _ => "SKIP (density count 0)".to_string(),
        }
    );

    let out = json!({
        "date": date,
        "kvm": kvm.describe(),
        "loadavg_at_start": loadavg,
        "vireo_vmm": bin.display().to_string(),
        "qemu": qemu,
        "qemu_command": format!("{} -M {QEMU_MACHINE} -accel kvm -nodefaults -no-user-config -display none -m {GUEST_MIB} -kernel ELF -append ... -serial ... -device isa-debug-exit,iobase=0xf4,iosize=4", qemu_bin()),
        "guest_mib": GUEST_MIB,
        "boots": boots,
        "vireo": {
            "boot_time_us_ms": durations_json(&v_timer),
            "spawn_to_marker": durations_json(&v_marker),
            "spawn_to_exit": durations_json(&v_exit),
            "idle_memory": mem_json(&v_mem),
        },
        "qemu_microvm": q_mem.as_ref().map(|m| json!({
            "spawn_to_debug_exit": durations_json(&q_exit),
            "spawn_to_marker": durations_json(&q_marker),
            "idle_memory": mem_json(m),
        })),
        "ratios": {
            "boot_timer": r_timer,
            "marker": r_marker,
            "overhead": q_mem.map(|q| v_mem.private_outside_kib as f64 / q.private_outside_kib as f64),
        },
        "density": dens.as_ref().map(|d| json!({
            "count": d.count,
            "all_ready_ms": d.all_ready.as_secs_f64() * 1e3,
            "total": mem_json(&d.overhead),
            "per_vm_private_outside_guest_kib": d.overhead.private_outside_kib as f64 / d.count as f64,
            "host_mem_available_drop_kib": d.host_used_kib,
            "idle_cpu_percent_5s": d.cpu_percent,
            "destroyed": d.destroyed,
        })),
        "goals": {
            "boot_timer_half_of_qemu": r_timer.map(|r| r <= TIME_GOAL_RATIO),
            "marker_half_of_qemu": r_marker.map(|r| r <= TIME_GOAL_RATIO),
            "overhead_at_most_5_mib": overhead_ok,
            "density_50": density_ok,
        },
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ lies inside the workspace")
        .join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let path = dir.join("vmm-boot.json");
    let text = serde_json::to_string_pretty(&out).map_err(|e| format!("json: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
