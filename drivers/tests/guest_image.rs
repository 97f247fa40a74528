//! The real Linux guest the qemu driver's tests boot: `scripts/guest-image.sh`
//! builds a Debian cloud kernel and a busybox initramfs, and QEMU runs them
//! here with software emulation (TCG): on a `microvm` machine with
//! virtio-mmio devices, and on `q35` with virtio-pci devices (see
//! docs/guest-image.md).
//!
//! Without `qemu-system-x86_64` these tests fail when `CI` is set, and
//! otherwise print a SKIP line and return.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
/// The guest must print its first marker within this.
const MARKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Hard limit for one boot, power-off included.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The microvm options that work with Debian's cloud kernel: ACPI on (it
/// describes the virtio-mmio devices and the power button; this kernel has
/// no `virtio_mmio.device=` support), the RTC on, no option ROMs.
const MICROVM: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,acpi=on";

/// The host's TSC rate in kHz, which is the guest's under TCG (QEMU's guest
/// `rdtsc` reads the host counter). A microvm has neither HPET nor ACPI PM
/// timer, so when the host is busy the kernel's TSC calibration against the
/// PIT fails, and the kernel then hangs calibrating the local APIC timer on a
/// PIT tick that never comes; `tsc_early_khz=` skips that calibration.
fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: rdtsc has no preconditions on x86_64.
            let t0 = unsafe { std::arch::x86_64::_rdtsc() };
            let start = Instant::now();
            thread::sleep(Duration::from_millis(200));
            let t1 = unsafe { std::arch::x86_64::_rdtsc() };
            let elapsed = start.elapsed().as_secs_f64();
            let khz = (t1.wrapping_sub(t0) as f64 / elapsed / 1000.0) as u64;
            (khz > 100_000).then_some(khz)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

/// A machine type and the virtio devices that go with it.
#[derive(Clone, Copy)]
enum Machine {
    /// `-M microvm`: virtio-mmio devices, described by its ACPI tables.
    Microvm,
    /// `-M q35`: virtio-pci devices, SeaBIOS loading the kernel.
    Q35,
}

impl Machine {
    fn name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
        }
    }
    fn arg(self) -> &'static str {
        match self {
            Machine::Microvm => MICROVM,
            Machine::Q35 => "q35",
        }
    }
    /// `virtio-blk`, `virtio-net`, ... on this machine's transport.
    fn device(self, kind: &str) -> String {
        match self {
            Machine::Microvm => format!("virtio-{kind}-device"),
            Machine::Q35 => format!("virtio-{kind}-pci"),
        }
    }
    /// Kernel command line the machine needs besides the console.
    fn append(self) -> String {
        match (self, host_tsc_khz()) {
            (Machine::Microvm, Some(khz)) => format!("tsc_early_khz={khz}"),
            _ => String::new(),
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("drivers/ has a parent")
        .to_path_buf()
}

/// A line on the test's stderr that libtest does not capture: SKIPs and
/// timings stay visible in CI logs.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Whether QEMU is here; when it is not, fails under CI and skips otherwise.
fn qemu_available(test: &str) -> bool {
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
fn guest_image() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let started = Instant::now();
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
        let dir = PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("guest-image.sh prints its directory")
                .trim(),
        );
        for file in ["vmlinuz", "initrd.img", "MANIFEST"] {
            assert!(dir.join(file).is_file(), "{} has no {file}", dir.display());
        }
        say(&format!(
            "guest image: {} ({} ms)",
            dir.display(),
            started.elapsed().as_millis()
        ));
        dir
    })
}

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vireo-guest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creates scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running QEMU whose serial console is read line by line.
struct Guest {
    child: Child,
    lines: Receiver<String>,
    console: Vec<String>,
    started: Instant,
}

impl Guest {
    fn boot(machine: Machine, append: &str, extra: &[&str]) -> Guest {
        let image = guest_image();
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-M",
            machine.arg(),
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
        ])
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
        .arg(image.join("initrd.img"))
        .args([
            "-append",
            &format!("console=ttyS0 {} {append}", machine.append()),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        println!("running: {cmd:?}");
        let started = Instant::now();
        let mut child = cmd.spawn().expect("starts qemu-system-x86_64");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_tx = {
            let mut stderr = child.stderr.take().expect("piped stderr");
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                let _ = tx.send(text);
            });
            rx
        };
        // Keep QEMU's stderr for failure reports: it arrives as one last line.
        let (merged_tx, merged) = mpsc::channel();
        thread::spawn(move || {
            for line in lines {
                if merged_tx.send(line).is_err() {
                    return;
                }
            }
            if let Ok(text) = stderr_tx.recv() {
                for line in text.lines().filter(|l| !l.is_empty()) {
                    let _ = merged_tx.send(format!("qemu stderr: {line}"));
                }
            }
        });
        Guest {
            child,
            lines: merged,
            console: Vec::new(),
            started,
        }
    }

    /// Reads the console until a line contains `needle`; panics with the
    /// console so far after `timeout` from boot or if QEMU stops first.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        loop {
            let left = timeout.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.console.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no {needle:?} within {} s", timeout.as_secs()))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("QEMU's console closed before {needle:?}"))
                }
            }
        }
    }

    /// Reads the rest of the console and waits for QEMU to exit by itself.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        loop {
            let left = BOOT_TIMEOUT.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.console.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => self.fail("QEMU did not exit by itself"),
            }
        }
        while self.started.elapsed() < BOOT_TIMEOUT {
            if let Some(status) = self.child.try_wait().expect("waits for qemu") {
                return status;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.fail("QEMU closed its console but did not exit")
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.console.push(line);
        }
        panic!(
            "{why} ({} ms after start); console:\n{}",
            self.started.elapsed().as_millis(),
            self.console.join("\n")
        );
    }

    /// Whether the console so far has a line containing `needle`, not
    /// counting the echo of the kernel command line.
    fn printed(&self, needle: &str) -> bool {
        self.console.iter().any(|l| {
            l.contains(needle) && !l.contains("VIREO-GUEST-CMDLINE") && !l.contains("ommand line:")
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Boots with a blank raw disk, an rng and a restricted user-mode network;
/// the guest formats and mounts the disk, writes a file and reads it back,
/// then powers itself off, and QEMU exits with status 0.
fn disk_round_trip(machine: Machine) {
    let test = format!("guest_image {}", machine.name());
    if !qemu_available(&test) {
        return;
    }
    let scratch = Scratch::new(machine.name());
    let disk = scratch.0.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("creates a sparse 64 MiB disk");
    let token = format!("vireo-probe-{}-{}", machine.name(), std::process::id());
    let run = format!(
        "echo {token} > /mnt/vda/probe && sync && echo 3 > /proc/sys/vm/drop_caches && \
         echo read-back: $(cat /mnt/vda/probe) && echo rng: $(cat /sys/class/misc/hw_random/rng_current)"
    );
    let append = format!("vireo.mkfs=1 vireo.run=\"{run}\" vireo.halt=1");
    let drive = format!("id=vda,file={},format=raw,if=none", disk.display());
    let blk = format!("{},drive=vda", machine.device("blk"));
    let rng = machine.device("rng");
    let net = format!("{},netdev=net0", machine.device("net"));
    let mut guest = Guest::boot(
        machine,
        &append,
        &[
            "-drive",
            &drive,
            "-device",
            &blk,
            "-device",
            &rng,
            // User-mode network, restricted: QEMU's own DHCP server answers
            // and nothing leaves the host.
            "-netdev",
            "user,id=net0,restrict=on",
            "-device",
            &net,
        ],
    );

    guest.wait_for("VIREO-GUEST-READY", MARKER_TIMEOUT);
    let ready_ms = guest.started.elapsed().as_millis();
    let ip = guest.wait_for("VIREO-GUEST-IP", BOOT_TIMEOUT);
    let disk_line = guest.wait_for("VIREO-GUEST-DISK", BOOT_TIMEOUT);
    let run_end = guest.wait_for("VIREO-GUEST-RUN-END", BOOT_TIMEOUT);
    guest.wait_for("VIREO-GUEST-POWEROFF", BOOT_TIMEOUT);
    let status = guest.wait_exit();
    let total_ms = guest.started.elapsed().as_millis();
    say(&format!(
        "{test}: TCG: marker after {ready_ms} ms, QEMU exited after {total_ms} ms; {ip}; {disk_line}"
    ));

    if !ip.contains("10.0.2.15") {
        guest.fail(&format!("expected QEMU's DHCP address, got {ip:?}"));
    }
    if !disk_line.contains("VIREO-GUEST-DISK ok vda") {
        guest.fail(&format!("disk not mounted: {disk_line:?}"));
    }
    if !run_end.contains("rc=0") || !guest.printed(&format!("read-back: {token}")) {
        guest.fail("vireo.run did not read its file back from /mnt/vda");
    }
    if !guest.printed("rng: virtio_rng") {
        guest.fail("the virtio-rng device is not the guest's hw_random source");
    }
    assert!(
        status.success(),
        "QEMU exited with {status} after the guest powered off"
    );
    // The file reached the disk image itself (ext2 keeps small files in a
    // data block, so the bytes appear verbatim).
    let bytes = std::fs::read(&disk).expect("reads the disk image");
    let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
    assert!(
        found,
        "{token} is not in {} after power-off",
        disk.display()
    );
}

#[test]
fn microvm_guest_formats_its_disk_and_powers_off() {
    disk_round_trip(Machine::Microvm);
}

#[test]
fn q35_guest_formats_its_disk_and_powers_off() {
    disk_round_trip(Machine::Q35);
}

#[test]
fn acpi_power_button_powers_the_guest_off() {
    if !qemu_available("guest_image acpi_power_button") {
        return;
    }
    let scratch = Scratch::new("acpi");
    let qmp_path = scratch.0.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let mut guest = Guest::boot(
        Machine::Microvm,
        "",
        &["-qmp", &qmp_arg, "-device", "virtio-rng-device"],
    );
    guest.wait_for("VIREO-GUEST-SETUP-DONE", MARKER_TIMEOUT);
    if !guest.printed("VIREO-GUEST-READY") {
        guest.fail("no VIREO-GUEST-READY before VIREO-GUEST-SETUP-DONE");
    }

    let mut qmp = UnixStream::connect(&qmp_path).expect("connects to QMP");
    qmp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("sets a QMP timeout");
    let mut reader = BufReader::new(qmp.try_clone().expect("clones the QMP socket"));
    let mut reply = String::new();
    let mut command = |cmd: &str| -> String {
        qmp.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
            .expect("writes to QMP");
        loop {
            reply.clear();
            reader.read_line(&mut reply).expect("reads from QMP");
            // Skip the greeting and events; the answer has "return" or "error".
            if reply.contains("\"return\"") || reply.contains("\"error\"") || reply.is_empty() {
                return reply.clone();
            }
        }
    };
    let caps = command("qmp_capabilities");
    assert!(caps.contains("\"return\""), "qmp_capabilities: {caps}");
    let pressed = Instant::now();
    let down = command("system_powerdown");
    assert!(down.contains("\"return\""), "system_powerdown: {down}");

    guest.wait_for("VIREO-GUEST-POWEROFF", BOOT_TIMEOUT);
    let status = guest.wait_exit();
    say(&format!(
        "guest_image acpi_power_button: microvm/TCG: system_powerdown to QEMU exit in {} ms",
        pressed.elapsed().as_millis()
    ));
    assert!(
        status.success(),
        "QEMU exited with {status} after an ACPI power-off"
    );
}

/// Ctrl-Alt-Del on the i8042 (how vireo-vmm and Firecracker ask a guest to
/// stop) powers the guest off instead of rebooting it: its init sets
/// kernel.ctrl-alt-del to 0, so the kernel signals init, which powers off.
/// Under q35 (it has the i8042) with QMP's send-key.
#[test]
fn ctrl_alt_del_powers_the_guest_off() {
    if !qemu_available("guest_image ctrl_alt_del") {
        return;
    }
    let scratch = Scratch::new("cad");
    let qmp_path = scratch.0.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let mut guest = Guest::boot(Machine::Q35, "vireo.net=0", &["-qmp", &qmp_arg]);
    guest.wait_for("VIREO-GUEST-SETUP-DONE", MARKER_TIMEOUT);
    let mut qmp = UnixStream::connect(&qmp_path).expect("connects to QMP");
    qmp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("sets a QMP timeout");
    let mut reader = BufReader::new(qmp.try_clone().expect("clones the QMP socket"));
    let mut send = |json: &str| -> String {
        qmp.write_all(format!("{json}\n").as_bytes())
            .expect("writes to QMP");
        let mut reply = String::new();
        loop {
            reply.clear();
            reader.read_line(&mut reply).expect("reads from QMP");
            if reply.contains("\"return\"") || reply.contains("\"error\"") || reply.is_empty() {
                return reply;
            }
        }
    };
    let caps = send("{\"execute\":\"qmp_capabilities\"}");
    assert!(caps.contains("\"return\""), "qmp_capabilities: {caps}");
    let keys = send(
        "{\"execute\":\"send-key\",\"arguments\":{\"keys\":[{\"type\":\"qcode\",\"data\":\"ctrl\"},{\"type\":\"qcode\",\"data\":\"alt\"},{\"type\":\"qcode\",\"data\":\"delete\"}]}}",
    );
    assert!(keys.contains("\"return\""), "send-key: {keys}");
    guest.wait_for("VIREO-GUEST-POWEROFF", BOOT_TIMEOUT);
    let status = guest.wait_exit();
    assert!(status.success(), "QEMU exited with {status}");
    assert!(
        !guest.printed("VIREO-GUEST-REBOOT") && !guest.printed("reboot: Restarting"),
        "a power-off, not a reboot:\n{}",
        guest.console.join("\n")
    );
}
