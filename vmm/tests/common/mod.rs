//! Shared by the integration tests: a KVM check that says why it skips, a
//! tiny x86 assembler for hand-made guests, an ELF writer (plain 64-bit entry
//! or PVH note), and a handle on a running `vireo-vmm run` process.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// True when /dev/kvm is usable; otherwise prints why the test is skipped.
pub fn kvm_available(test: &str) -> bool {
    let kind = vireo_vmm::probe::probe();
    if kind == vireo_vmm::probe::KvmKind::Absent {
        skip(
            test,
            &format!("/dev/kvm is not usable here ({})", kind.describe()),
        );
        return false;
    }
    eprintln!("{test}: KVM is {}", kind.describe());
    true
}

/// Says why a test does not run. Under CI (`CI` set, as `.ci/run` does) a
/// missing prerequisite is a failure instead: the CI machines have /dev/kvm,
/// root, gcc and network namespaces, and a test that skips there proves
/// nothing.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}, and CI is set: the CI machines must run this test");
    }
    eprintln!("SKIP {test}: {why}");
}

/// Where guests are linked and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// A few x86 instructions that encode the same in 32-bit protected mode and
/// 64-bit mode, so one program serves the PVH and the 64-bit entry.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
    labels: Vec<(String, usize)>,
    fixups: Vec<(usize, String)>,
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn label(&mut self, name: &str) -> &mut Self {
        self.labels.push((name.into(), self.code.len()));
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
    fn rel8(&mut self, op: u8, target: &str) -> &mut Self {
        self.code.push(op);
        self.fixups.push((self.code.len(), target.into()));
        self.code.push(0);
        self
    }
    /// `mov dx, imm16`
    pub fn mov_dx(&mut self, v: u16) -> &mut Self {
        let [a, b] = v.to_le_bytes();
        self.bytes(&[0x66, 0xBA, a, b])
    }
    /// `mov al, imm8`
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.bytes(&[0xB0, v])
    }
    /// `out dx, al`
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.bytes(&[0xEE])
    }
    /// `in al, dx`
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.bytes(&[0xEC])
    }
    /// `test al, imm8`
    pub fn test_al(&mut self, v: u8) -> &mut Self {
        self.bytes(&[0xA8, v])
    }
    /// `cmp al, imm8`
    pub fn cmp_al(&mut self, v: u8) -> &mut Self {
        self.bytes(&[0x3C, v])
    }
    pub fn jz(&mut self, l: &str) -> &mut Self {
        self.rel8(0x74, l)
    }
    pub fn jnz(&mut self, l: &str) -> &mut Self {
        self.rel8(0x75, l)
    }
    pub fn jmp(&mut self, l: &str) -> &mut Self {
        self.rel8(0xEB, l)
    }
    /// Writes `s` to COM1 (without waiting for THR-empty: the model's
    /// transmitter is always ready).
    pub fn print(&mut self, s: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in s.bytes() {
            self.mov_al(b).out_dx_al();
        }
        self
    }
    /// `mov byte [0xC0000000], 123`: the boot timer.
    pub fn boot_timer(&mut self) -> &mut Self {
        self.bytes(&[0xB8, 0x00, 0x00, 0x00, 0xC0, 0xC6, 0x00, 123])
    }
    /// Byte store to an absolute address (below 4 GiB).
    pub fn store_byte(&mut self, addr: u32, v: u8) -> &mut Self {
        let a = addr.to_le_bytes();
        self.bytes(&[0xB8, a[0], a[1], a[2], a[3], 0xC6, 0x00, v])
    }
    /// Byte load from an absolute address into al.
    pub fn load_byte(&mut self, addr: u32) -> &mut Self {
        let a = addr.to_le_bytes();
        self.bytes(&[0xB8, a[0], a[1], a[2], a[3], 0x8A, 0x00])
    }
    /// S5 on the power register.
    pub fn power_off(&mut self) -> &mut Self {
        self.mov_dx(0x600).mov_al((5 << 2) | (1 << 5)).out_dx_al()
    }
    /// Pulse reset through the i8042.
    pub fn i8042_reset(&mut self) -> &mut Self {
        self.mov_dx(0x64).mov_al(0xFE).out_dx_al()
    }
    /// `hlt; jmp hlt`
    pub fn halt_forever(&mut self) -> &mut Self {
        let l = format!("halt{}", self.code.len());
        self.label(&l).bytes(&[0xF4]).jmp(&l)
    }
    /// `jmp $`: burns CPU.
    pub fn spin_forever(&mut self) -> &mut Self {
        let l = format!("spin{}", self.code.len());
        self.label(&l).jmp(&l)
    }
    pub fn finish(&mut self) -> Vec<u8> {
        for (at, name) in &self.fixups {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, o)| *o)
                .unwrap_or_else(|| panic!("no label {name}"));
            let rel = target as i64 - (*at as i64 + 1);
            assert!((-128..=127).contains(&rel), "jump to {name} too far");
            self.code[*at] = rel as i8 as u8;
        }
        self.code.clone()
    }
}

/// An ELF64 executable with `code` loaded and entered at [`LOAD_ADDR`];
/// with `pvh`, also a Xen PHYS32_ENTRY note naming the same address.
pub fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let code_off = 0x1000u64;
    let mut out = Vec::new();
    // ELF header.
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&phnum.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let note_off = 64 + 56 * u64::from(phnum);
    let mut note = Vec::new();
    if pvh {
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    }
    let phdr =
        |out: &mut Vec<u8>, ty: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&addr.to_le_bytes()); // vaddr
            out.extend_from_slice(&addr.to_le_bytes()); // paddr
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&align.to_le_bytes());
        };
    phdr(
        &mut out,
        1,
        7,
        code_off,
        LOAD_ADDR,
        code.len() as u64,
        0x1000,
    );
    if pvh {
        phdr(&mut out, 4, 4, note_off, 0, note.len() as u64, 4);
    }
    out.extend_from_slice(&note);
    out.resize(code_off as usize, 0);
    out.extend_from_slice(code);
    out
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "vireo-vmm-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ rand_ish()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

fn rand_ish() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos()
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `vireo-vmm run` child process and its files.
pub struct Vmm {
    pub dir: TempDir,
    pub child: Child,
    pub api: PathBuf,
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    pub exit_file: PathBuf,
    pub stderr_log: PathBuf,
}

pub struct Opts<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: Option<&'a str>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub extra: Vec<&'a str>,
    /// Run the VMM in a fresh network namespace holding a tap of this name.
    pub netns_tap: Option<&'a str>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Self {
            kernel: Path::new("/nonexistent"),
            initrd: None,
            cmdline: None,
            memory_mib: 128,
            vcpus: 1,
            extra: Vec::new(),
            netns_tap: None,
        }
    }
}

/// Whether this process may create network namespaces with a tap in them.
pub fn can_make_netns_tap() -> bool {
    Command::new("unshare")
        .args(["--net", "sh", "-c", "ip tuntap add vtprobe mode tap"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Vmm {
    /// Writes `image` as the kernel and starts the VMM on it.
    pub fn start_image(tag: &str, image: &[u8], opts: Opts) -> Self {
        let dir = TempDir::new(tag);
        let kernel = dir.0.join("kernel.elf");
        std::fs::write(&kernel, image).unwrap();
        let opts = Opts {
            kernel: &kernel,
            ..opts
        };
        Self::start_in(dir, opts)
    }

    pub fn start(tag: &str, opts: Opts) -> Self {
        Self::start_in(TempDir::new(tag), opts)
    }

    fn start_in(dir: TempDir, opts: Opts) -> Self {
        let api = dir.0.join("api.sock");
        let console_socket = dir.0.join("console.sock");
        let console_log = dir.0.join("console.log");
        let exit_file = dir.0.join("exit.json");
        let stderr_log = dir.0.join("vmm.stderr");
        let bin = env!("CARGO_BIN_EXE_vireo-vmm");
        let mut cmd = match opts.netns_tap {
            None => Command::new(bin),
            Some(tap) => {
                let mut c = Command::new("unshare");
                c.args([
                    "--net",
                    "sh",
                    "-c",
                    &format!(
                        "ip tuntap add {tap} mode tap && ip link set {tap} up && exec \"$0\" \"$@\""
                    ),
                    bin,
                ]);
                c
            }
        };
        cmd.arg("run")
            .arg("--kernel")
            .arg(opts.kernel)
            .args(["--memory-mib", &opts.memory_mib.to_string()])
            .args(["--vcpus", &opts.vcpus.to_string()])
            .arg("--api-socket")
            .arg(&api)
            .arg("--console-log")
            .arg(&console_log)
            .arg("--console-socket")
            .arg(&console_socket)
            .arg("--exit-file")
            .arg(&exit_file);
        if let Some(i) = opts.initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(c) = opts.cmdline {
            cmd.args(["--cmdline", c]);
        }
        cmd.args(&opts.extra);
        let stderr = std::fs::File::create(&stderr_log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Vmm {
            dir,
            child,
            api,
            console_socket,
            console_log,
            exit_file,
            stderr_log,
        }
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console_log).unwrap_or_default()).into_owned()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Waits until the console log contains `needle` `times` times.
    pub fn wait_console(&mut self, needle: &str, times: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.console();
            if c.matches(needle).count() >= times {
                return c;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "VMM exited ({st}) before the console showed {needle:?} x{times}\nconsole:\n{c}\nstderr:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "console did not show {needle:?} x{times} within {timeout:?}\nconsole:\n{c}\nstderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects to the API socket (waits for it to appear).
    pub fn connect_api(&self) -> Api {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&self.api) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    return Api {
                        reader: BufReader::new(s.try_clone().unwrap()),
                        writer: s,
                    };
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("API socket never came up: {e}\nstderr:\n{}", self.stderr())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Waits for the process to end, whatever it leaves behind.
    pub fn wait_status(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "VMM still running after {timeout:?}\nstderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes one request line and returns without reading an answer.
    pub fn send_api(&self, req: &str) {
        let mut s = self.connect_api().writer;
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        // Keep the connection open a moment so the request is read whole.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Waits for the process to exit; returns its status and exit file.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Value) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let text = std::fs::read_to_string(&self.exit_file).unwrap_or_else(|e| {
                    panic!(
                        "no exit file after exit ({st}): {e}\nstderr:\n{}",
                        self.stderr()
                    )
                });
                let v: Value = serde_json::from_str(&text).unwrap();
                return (st, v);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "VMM still running after {timeout:?}\nconsole:\n{}\nstderr:\n{}",
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A control-API connection.
pub struct Api {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Api {
    pub fn call(&mut self, req: &str) -> Value {
        self.writer.write_all(req.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
    }
}

/// Attaches to the console socket.
pub fn console_client(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                return s;
            }
            Err(e) if Instant::now() > deadline => panic!("console socket: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Reads from a console client until `needle` shows up.
pub fn read_until(s: &mut UnixStream, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if String::from_utf8_lossy(&got).contains(needle) {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}
