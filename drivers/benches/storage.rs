//! `cargo bench -p vireo-drivers --bench storage`
//!
//! Two parts, each beside its peer in the same run:
//!
//! 1. **Volume copies** on a dir pool (the `DirStorage` backend the agent
//!    and `vireo vol-*` use) beside the usual tools copying the same files
//!    on the same filesystem: for a raw and a qcow2 image of 1 GiB with a
//!    disk-like layout (data extents of 4 to 12 MiB in every 16 MiB, one
//!    MiB of written zeros in some, holes between: about half the size is
//!    data), **upload** (a local file into a volume, as `vireo vol-upload
//!    VOL FILE` does; and the same bytes as a stream, as through the
//!    agent's socket), **download** (a volume into a local file, as
//!    `vireo vol-download`) and **clone** (a full copy). The peers do the
//!    same copies: `qemu-img convert -t writeback -f F -O F` (for both
//!    formats; and with `-t none`, its O_DIRECT writes, as Vireo's), and
//!    for raw `cp --sparse=always` (then fsync of the copy)
//!    and `dd bs=1M conv=sparse,fsync` (which, for the streamed upload,
//!    reads the image through a pipe from `cat`, as Vireo reads the
//!    stream; the other peers read the file for that row). Every copy is synced before its
//!    clock stops (qemu-img's default for convert, `-t unsafe`, never
//!    syncs). The image an upload reads is in the page cache for everyone;
//!    the volume a download or clone reads is synced and dropped from the
//!    page cache first, for everyone (a peer writing through the cache
//!    would otherwise read its own volume from memory and Vireo, which
//!    writes past it, from the disk). The first
//!    run checks Vireo's copies (`cmp` against the source; `qemu-img
//!    check` for qcow2) and reports every tool's allocated size: sparse
//!    files stay sparse. Also a raw resize, beside `qemu-img resize`.
//!
//! 2. **virtio-blk throughput** of the test guest (`vmm/guest`,
//!    `vireo.blkbench=MIB,KIB,DEPTH`) on a raw volume of that pool, under
//!    vireo-vmm and under `qemu-system-x86_64 -M microvm -accel kvm` (the
//!    same PVH ELF, QEMU's `virtio-blk-device` with its default cache and
//!    AIO) on the same file: MIB MiB written sequentially in KIB KiB
//!    requests with DEPTH in flight, a flush, and the same range read back
//!    and checked. The guest counts TSC cycles per pass; the bench measures
//!    the TSC's rate on the host and turns them into MB/s. A warm-up write
//!    before the timed runs allocates the whole range, so that no run pays
//!    for block allocation and the others do not.
//!
//! Runs alternate between Vireo and its peer, so that load from elsewhere
//! hits both alike. Figures are medians; a ratio is the median over the
//! runs of (Vireo's run i against the peer's run i, made back to back),
//! "above 1: Vireo is faster" (the peer's time over Vireo's, or Vireo's
//! rate over the peer's). On our build machines, VMs whose disk and memory
//! come from a busy host, a 1 GiB copy takes 0.6 s or 3 s depending on the
//! moment, for either tool: pairs see the same moment.
//! Prints a table and writes `target/bench/storage.json`.
//!
//! Environment: `VIREO_BENCH_RUNS` (default 5), `VIREO_BENCH_VOLUME_MIB`
//! (default 1024), `VIREO_BENCH_BLK` (`MIB,KIB,DEPTH`, default
//! `256,128,16`; `off` skips part 2), `VIREO_BENCH_QEMU` (another QEMU
//! binary). Parts whose
//! tools are missing (qemu-img, QEMU, a usable /dev/kvm, gcc for the guest)
//! print a `SKIP` line; the rest still runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vireo_crds::{StoragePool, StorageVol};
use vireo_drivers::StorageDriver;
use vireo_drivers::storage::ResizeFlags;
use vireo_drivers::storage::dir::DirStorage;
use vireo_drivers::storage::no_progress;

const MIB: u64 = 1 << 20;
const POOL: &str = "bench";
const GUEST_MIB: u64 = 32;
const QEMU_MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off,ioapic2=off,auto-kernel-cmdline=off";
const LINE: &str = "VIREO-TEST blkbench";
const TIMEOUT: Duration = Duration::from_secs(300);

#[path = "../../vmm/benches/kit/mod.rs"]
mod kit;
use kit::{Proc, QEMU_ENV, Res, Scratch, env_num, median, qemu_bin, version_of, wait_line};

fn repo() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Pool paths must be absolute without `..`.
    dir.parent()
        .map_or_else(|| dir.join(".."), Path::to_path_buf)
}

fn stats(v: &[f64]) -> Value {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"median": median(v), "min": lo, "max": hi, "runs": v})
}

/// Runs a command to completion; its stderr is the error.
fn run_cmd(cmd: &mut Command) -> Res<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} {:?}: {} {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Times `f` from a quiet start: everything written before (the last
/// operation's files, their deletion) is on disk first, so that no
/// operation pays for the writeback of another.
fn timed<T>(f: impl FnOnce() -> Res<T>) -> Res<f64> {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// A disk-like raw image of `len` bytes, written and synced: in every
/// 16 MiB, a data extent of 4 to 12 MiB of pseudo-random bytes (xorshift64,
/// so that nothing compresses or dedups), in every fifth of them one MiB
/// of written zeros (allocated, as a guest's freed blocks are), and holes
/// between. About half the size is data.
fn write_image(path: &Path, len: u64) -> Res<()> {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(len)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; MIB as usize];
    let block = 16 * MIB;
    for i in 0..len.div_ceil(block) {
        let data_mib = 4 + (i * 7) % 9;
        for m in 0..data_mib {
            let at = i * block + m * MIB;
            if at >= len {
                break;
            }
            if i % 5 == 0 && m == 1 {
                buf.fill(0);
            } else {
                for chunk in buf.chunks_exact_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    chunk.copy_from_slice(&state.to_le_bytes());
                }
            }
            let n = usize::try_from((len - at).min(MIB)).unwrap_or(MIB as usize);
            f.write_all_at(&buf[..n], at)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a file's dirty pages and drops its pages from the page cache,
/// so that the copy timed next reads it from the disk, whoever wrote it.
/// Without this a peer that wrote its upload through the page cache
/// (`cp`, `dd`, `qemu-img -t writeback`) would download and clone from
/// memory, while Vireo and `-t none` (which write past the cache) read
/// the disk: the same file, not in the same state.
fn evict(path: &Path) -> Res<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all()
        .map_err(|e| format!("sync {}: {e}", path.display()))?;
    // SAFETY: fadvise on a descriptor we own; it passes no memory.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!("fadvise {}: error {rc}", path.display()));
    }
    Ok(())
}

/// Bytes a file occupies on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> Res<T> {
    serde_yaml_ng::from_str(text).map_err(|e| format!("{e}: {text}"))
}

fn volume(name: &str, mib: u64, source: &str) -> Res<StorageVol> {
    volume_as(name, mib, Fmt::Raw, source)
}

fn volume_as(name: &str, mib: u64, fmt: Fmt, source: &str) -> Res<StorageVol> {
    yaml(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: {name}}}\n\
         spec: {{pool: {POOL}, capacity: {mib}Mi, format: {}{source}}}\n",
        fmt.name()
    ))
}

/// Removes a file and waits until the filesystem has freed its blocks.
fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
    settle(path.parent().unwrap_or(Path::new("/")));
}

/// Commits the filesystem's journal (syncfs), outside every clock. A file
/// removed or replaced frees its blocks at the next commit, and on a
/// filesystem mounted with `discard` (the build machines' ext4) that
/// commit also discards them, 0.1 s and more for a GiB: left alone, the
/// cost of one tool's removal lands in the next tool's fsync.
fn settle(dir: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(d) = File::open(dir) {
        // SAFETY: syncfs on a descriptor we own; it passes no memory.
        unsafe { libc::syncfs(d.as_raw_fd()) };
    }
}

// ---------------------------------------------------------------------
// part 1: volume operations

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Fmt {
    Raw,
    Qcow2,
}

impl Fmt {
    fn name(self) -> &'static str {
        match self {
            Fmt::Raw => "raw",
            Fmt::Qcow2 => "qcow2",
        }
    }
}

/// The copies measured, in table order.
const OPS: [&str; 4] = ["upload", "upload_stream", "download", "clone"];

/// Who copies: Vireo, or a peer tool.
const TOOLS: [&str; 5] = ["vireo", "qemu-img", "qemu-img-direct", "cp", "dd"];

/// Times per (format, op, tool), run by run; allocated bytes of the
/// first run's results; and the raw resize's.
#[derive(Default)]
struct Times {
    t: std::collections::BTreeMap<(Fmt, &'static str, &'static str), Vec<f64>>,
    alloc: std::collections::BTreeMap<(Fmt, &'static str, &'static str), u64>,
    resize: (Vec<f64>, Vec<f64>),
}

impl Times {
    fn add(&mut self, key: (Fmt, &'static str, &'static str), secs: f64, out: &Path) {
        let runs = self.t.entry(key).or_default();
        runs.push(secs);
        if runs.len() == 1 {
            self.alloc.insert(key, allocated(out));
        }
    }
    fn get(&self, key: (Fmt, &'static str, &'static str)) -> &[f64] {
        self.t.get(&key).map_or(&[], Vec::as_slice)
    }
}

/// Checks that `copy` holds the same bytes as `original` (and, for qcow2,
/// that qemu-img finds it consistent).
fn check_copy(original: &Path, copy: &Path, fmt: Fmt, what: &str) -> Res<()> {
    run_cmd(Command::new("cmp").arg("-s").arg(original).arg(copy))
        .map_err(|e| format!("{what}: the copy differs from its source: {e}"))?;
    if fmt == Fmt::Qcow2 {
        run_cmd(
            Command::new("qemu-img")
                .args(["check", "-q", "-f", "qcow2"])
                .arg(copy),
        )
        .map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

/// One upload (from the file, then as a stream), download and clone by
/// the dir backend, added to `t`; the first run checks the copies.
fn vireo_ops(
    st: &DirStorage,
    fmt: Fmt,
    image: &Path,
    out_dir: &Path,
    mib: u64,
    t: &mut Times,
) -> Res<()> {
    let e = |e: vireo_drivers::Error| e.to_string();
    let (up, cl) = ("up", "clone");
    let vol_path = |name: &str| -> Res<PathBuf> {
        Ok(PathBuf::from(st.volume_info(POOL, name).map_err(e)?.path))
    };
    let first = t.get((fmt, "upload", "vireo")).is_empty();
    st.create_volume(&volume_as(up, mib, fmt, "")?).map_err(e)?;
    let secs = timed(|| {
        let src = File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
        st.upload_volume_from_file(POOL, up, &src, &no_progress)
            .map_err(e)
    })?;
    let up_path = vol_path(up)?;
    t.add((fmt, "upload", "vireo"), secs, &up_path);
    if first {
        check_copy(image, &up_path, fmt, "vireo upload")?;
    }
    // The streamed upload goes into a volume of its own, made empty, as
    // every other copy here (Vireo's and the peers') writes a new file.
    let streamed = "up-stream";
    let pool_dir = up_path.parent().unwrap_or(Path::new("/")).to_path_buf();
    st.create_volume(&volume_as(streamed, mib, fmt, "")?)
        .map_err(e)?;
    settle(&pool_dir);
    let secs = timed(|| {
        let mut src = File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
        let len = src.metadata().map_err(|e| e.to_string())?.len();
        st.upload_volume(POOL, streamed, &mut src, Some(len), &no_progress)
            .map_err(e)
    })?;
    let streamed_path = vol_path(streamed)?;
    t.add((fmt, "upload_stream", "vireo"), secs, &streamed_path);
    if first {
        check_copy(image, &streamed_path, fmt, "vireo streamed upload")?;
    }
    st.delete_volume(POOL, streamed).map_err(e)?;
    settle(&pool_dir);
    let down = out_dir.join("vireo-down");
    evict(&up_path)?;
    let secs = timed(|| {
        let f = File::create(&down).map_err(|e| format!("{}: {e}", down.display()))?;
        st.download_volume_to_file(POOL, up, &f, &no_progress)
            .map_err(e)?;
        // As `vireo vol-download` does before it renames the file.
        f.sync_all().map_err(|e| format!("{}: {e}", down.display()))
    })?;
    t.add((fmt, "download", "vireo"), secs, &down);
    if first {
        check_copy(image, &down, fmt, "vireo download")?;
    }
    remove(&down);
    let vol = volume_as(
        cl,
        mib,
        fmt,
        &format!(", source: {{clone: {{volume: {up}}}}}"),
    )?;
    evict(&up_path)?;
    let secs = timed(|| st.create_volume(&vol).map(drop).map_err(e))?;
    let cl_path = vol_path(cl)?;
    t.add((fmt, "clone", "vireo"), secs, &cl_path);
    if first {
        check_copy(image, &cl_path, fmt, "vireo clone")?;
    }
    if fmt == Fmt::Raw {
        t.resize.0.push(timed(|| {
            st.resize_volume(POOL, cl, 2 * mib * MIB, ResizeFlags::default())
                .map_err(e)
        })?);
    }
    st.delete_volume(POOL, cl).map_err(e)?;
    st.delete_volume(POOL, up).map_err(e)?;
    settle(&pool_dir);
    Ok(())
}

/// One copy of `src` to `dst` by a peer tool, synced to disk.
fn tool_copy(tool: &str, fmt: Fmt, src: &Path, dst: &Path) -> Res<()> {
    // Its default for convert, `-t unsafe`, never syncs; `-t none` writes
    // past the page cache (O_DIRECT), as Vireo does.
    let qemu_img = |cache: &str| {
        run_cmd(
            Command::new("qemu-img")
                .args(["convert", "-t", cache, "-f", fmt.name(), "-O", fmt.name()])
                .arg(src)
                .arg(dst),
        )
    };
    match tool {
        "qemu-img" => qemu_img("writeback"),
        "qemu-img-direct" => qemu_img("none"),
        "cp" => {
            run_cmd(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))?;
            File::open(dst)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("sync {}: {e}", dst.display()))
        }
        "dd" => run_cmd(
            Command::new("dd")
                .arg(format!("if={}", src.display()))
                .arg(format!("of={}", dst.display()))
                .args(["bs=1M", "conv=sparse,fsync", "status=none"]),
        ),
        _ => Err(format!("no tool {tool}")),
    }
}

/// The same copies by a peer tool (a streamed upload is the same copy
/// for it, so it is timed once as `upload`), added to `t`.
fn tool_ops(
    tool: &'static str,
    fmt: Fmt,
    image: &Path,
    pool_dir: &Path,
    out_dir: &Path,
    mib: u64,
    t: &mut Times,
) -> Res<()> {
    let (up, cl, down) = (
        pool_dir.join(format!("{tool}-up")),
        pool_dir.join(format!("{tool}-clone")),
        out_dir.join(format!("{tool}-down")),
    );
    let secs = timed(|| tool_copy(tool, fmt, image, &up))?;
    t.add((fmt, "upload", tool), secs, &up);
    if tool == "dd" {
        // dd also takes a stream: the same bytes through a pipe, as
        // Vireo's streamed upload gets them.
        let streamed = pool_dir.join("dd-upstream");
        let secs = timed(|| {
            run_cmd(
                Command::new("sh")
                    .arg("-c")
                    .arg("cat \"$1\" | dd of=\"$2\" bs=1M iflag=fullblock conv=sparse,fsync status=none")
                    .arg("sh")
                    .arg(image)
                    .arg(&streamed),
            )
        })?;
        t.add((fmt, "upload_stream", tool), secs, &streamed);
        remove(&streamed);
    }
    evict(&up)?;
    let secs = timed(|| tool_copy(tool, fmt, &up, &down))?;
    t.add((fmt, "download", tool), secs, &down);
    remove(&down);
    evict(&up)?;
    let secs = timed(|| tool_copy(tool, fmt, &up, &cl))?;
    t.add((fmt, "clone", tool), secs, &cl);
    if fmt == Fmt::Raw && tool == "qemu-img" {
        t.resize.1.push(timed(|| {
            run_cmd(
                Command::new("qemu-img")
                    .args(["resize", "-f", "raw"])
                    .arg(&cl)
                    .arg(format!("{}M", 2 * mib)),
            )
        })?);
    }
    remove(&cl);
    remove(&up);
    Ok(())
}

// ---------------------------------------------------------------------
// part 2: virtio-blk throughput

#[derive(Clone, Copy)]
struct BlkOpts {
    mib: u32,
    kib: u32,
    depth: u32,
}

impl BlkOpts {
    fn option(&self) -> String {
        format!("vireo.blkbench={},{},{}", self.mib, self.kib, self.depth)
    }
}

/// One guest run's figures, in TSC cycles.
#[derive(Clone, Copy, Debug)]
struct BlkRun {
    bytes: u64,
    write: u64,
    flush: u64,
    read: u64,
}

impl BlkRun {
    fn mbs(&self, cycles: u64, tsc_hz: f64) -> f64 {
        self.bytes as f64 / (cycles as f64 / tsc_hz) / 1e6
    }
}

/// `VIREO-TEST blkbench bytes=B req=R depth=D write_cycles=W flush_cycles=F
/// read_cycles=C verify=ok`; a FAIL is an error.
fn parse_blk(line: &str) -> Res<BlkRun> {
    if line.contains("FAIL") || !line.contains("verify=ok") {
        return Err(format!("guest: {line}"));
    }
    let field = |key: &str| -> Res<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {key} in {line:?}"))
    };
    Ok(BlkRun {
        bytes: field("bytes=")?,
        write: field("write_cycles=")?,
        flush: field("flush_cycles=")?,
        read: field("read_cycles=")?,
    })
}

/// The TSC's rate on this host, against the monotonic clock.
fn tsc_hz() -> f64 {
    let sample = || {
        let t = Instant::now();
        // SAFETY: rdtsc reads a counter; it has no memory effects.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        (c1 - c0) as f64 / t.elapsed().as_secs_f64()
    };
    median(&[sample(), sample(), sample()])
}

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Vireo,
    Qemu,
}

fn blk_once(
    vmm: Vmm,
    bin: &Path,
    guest: &Path,
    disk: &Path,
    dir: &Path,
    opts: BlkOpts,
) -> Res<BlkRun> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let console = dir.join("console.log");
    let stderr = File::create(dir.join("stderr.log"))
        .map_err(|e| format!("create stderr log in {}: {e}", dir.display()))?;
    let mut cmd;
    match vmm {
        Vmm::Vireo => {
            cmd = Command::new(bin);
            cmd.arg("run")
                .arg("--kernel")
                .arg(guest)
                .args([
                    "--cmdline",
                    &format!("console=ttyS0 {} vireo.poweroff=1", opts.option()),
                ])
                .args(["--memory-mib", &GUEST_MIB.to_string(), "--vcpus", "1"])
                .arg("--disk")
                .arg(disk)
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
            cmd = Command::new(qemu_bin());
            cmd.args(["-M", QEMU_MACHINE, "-accel", "kvm"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-m", &GUEST_MIB.to_string()])
                .args(["-global", "virtio-mmio.force-legacy=false"])
                .arg("-kernel")
                .arg(guest)
                .args(["-append", &format!("console=ttyS0 {}", opts.option())])
                .args(["-serial", &format!("file:{}", console.display())])
                .args([
                    "-drive",
                    &format!("file={},format=raw,if=none,id=d0", disk.display()),
                ])
                .args(["-device", "virtio-blk-device,drive=d0"]);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut p = Proc(
        cmd.spawn()
            .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?,
    );
    let line = wait_line(&console, LINE, &mut p, TIMEOUT)?;
    if vmm == Vmm::Vireo {
        // It powers off by itself right after the report.
        let since = Instant::now();
        while p.0.try_wait().ok().flatten().is_none() && since.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    drop(p); // QEMU: microvm has no power-off here; it is killed.
    parse_blk(&line)
}

/// Builds vireo-vmm in this profile (release under `cargo bench`).
fn build_vmm() -> Res<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "vireo-vmm",
            "--bin",
            "vireo-vmm",
        ])
        .current_dir(repo())
        .status()
        .map_err(|e| format!("cargo build -p vireo-vmm: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build -p vireo-vmm: {status}"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    Ok(target.join("release/vireo-vmm"))
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// `VIREO_BENCH_BLK`: the options, or None for `off`.
fn parse_blk_opts() -> Res<Option<BlkOpts>> {
    let text = std::env::var("VIREO_BENCH_BLK").unwrap_or_else(|_| "256,128,16".into());
    if text == "off" {
        return Ok(None);
    }
    let n: Vec<u32> = text
        .split(',')
        .map(|s| s.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("VIREO_BENCH_BLK={text:?}: want MIB,KIB,DEPTH"))?;
    match n[..] {
        [mib, kib, depth]
            if mib > 0
                && kib.is_power_of_two()
                && kib <= 1024
                && (1..=64).contains(&depth)
                && (u64::from(mib) * 1024) % u64::from(kib) == 0 =>
        {
            Ok(Some(BlkOpts { mib, kib, depth }))
        }
        _ => Err(format!(
            "VIREO_BENCH_BLK={text:?}: want MIB,KIB,DEPTH with KIB a power of two up to 1024 \
             dividing MIB MiB, and DEPTH 1..=64"
        )),
    }
}

// ---------------------------------------------------------------------

fn main() {
    if let Err(e) = run() {
        eprintln!("bench storage: {e}");
        std::process::exit(1);
    }
}

fn num(x: f64, prec: usize) -> String {
    if x.is_finite() {
        format!("{x:.prec$}")
    } else {
        "n/a".into()
    }
}

fn fmt_s(x: f64) -> String {
    num(x, 2)
}

/// The filesystem a path is on, as `stat -f` names it (reflinks need
/// btrfs or XFS; ext4 has none).
fn fs_type(path: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
}

fn row(name: &str, ours: &[f64], peer: &[f64], prec: usize, higher_is_better: bool) -> Value {
    let (a, b) = (median(ours), median(peer));
    // Run i of each side ran back to back, under the same conditions: the
    // ratio is the median of those pairs' ratios.
    let pairs: Vec<f64> = ours
        .iter()
        .zip(peer)
        .map(|(o, p)| if higher_is_better { o / p } else { p / o })
        .collect();
    let ratio = median(&pairs);
    println!(
        "{name:<44} {:>10} {:>10} {:>6}",
        num(a, prec),
        if peer.is_empty() {
            "n/a".into()
        } else {
            num(b, prec)
        },
        num(ratio, 2)
    );
    json!({
        "vireo": stats(ours),
        "peer": (!peer.is_empty()).then(|| stats(peer)),
        "ratio": ratio.is_finite().then_some(ratio),
        "pair_ratios": pairs,
    })
}

fn run() -> Res<()> {
    let runs: usize = env_num("VIREO_BENCH_RUNS", 5)?.max(1);
    let mib: u64 = env_num("VIREO_BENCH_VOLUME_MIB", 1024)?.max(1);
    let blk_opt = parse_blk_opts()?;
    let blk = blk_opt.unwrap_or(BlkOpts {
        mib: 256,
        kib: 128,
        depth: 16,
    });
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let qemu_img = version_of("qemu-img");
    let qemu = version_of(&qemu_bin());
    println!("vireo storage bench, {date}: {runs} runs, volumes of {mib} MiB");
    println!("  qemu-img  {}", qemu_img.as_deref().unwrap_or("(absent)"));
    println!("  QEMU      {}", qemu.as_deref().unwrap_or("(absent)"));

    // Under target/, on the filesystem the build is on (not a tmpfs /tmp).
    let scratch = Scratch(repo().join(format!(
        "target/bench-scratch/storage-{}",
        std::process::id()
    )));
    let pool_dir = scratch.0.join("pool");
    let image = scratch.0.join("image.raw");
    std::fs::create_dir_all(&scratch.0)
        .map_err(|e| format!("mkdir {}: {e}", scratch.0.display()))?;
    let st = DirStorage::open(&scratch.0.join("state"), Path::new("/"))?;
    let pool: StoragePool = yaml(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: {POOL}}}\n\
         spec: {{type: dir, path: {}}}\n",
        pool_dir.display()
    ))?;
    let e = |e: vireo_drivers::Error| e.to_string();
    st.define_pool(&pool).map_err(e)?;
    st.build_pool(POOL).map_err(e)?;
    st.start_pool(POOL).map_err(e)?;
    println!("  pool      {} (dir)", pool_dir.display());
    write_image(&image, mib * MIB)?;
    let out_dir = scratch.0.join("out");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("mkdir {}: {e}", out_dir.display()))?;
    let qcow2 = scratch.0.join("image.qcow2");
    let mut formats = vec![(Fmt::Raw, image.clone())];
    if qemu_img.is_some() {
        run_cmd(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&image)
                .arg(&qcow2),
        )?;
        File::open(&qcow2)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", qcow2.display()))?;
        formats.push((Fmt::Qcow2, qcow2.clone()));
    } else {
        println!(
            "SKIP qcow2 and the qemu-img column: qemu-img not found (Debian: apt-get install qemu-utils)"
        );
    }
    // Sources in the page cache for everyone.
    for (_, path) in &formats {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }

    // Part 1, interleaved one run at a time; who goes first rotates.
    // These machines are VMs whose host takes back the memory the kernel
    // frees (free page reporting) and backs it again on first touch: a
    // copy into fresh page-cache pages sometimes takes five times as long,
    // whichever tool makes it. Medians of rotating runs keep that from
    // deciding a ratio.
    let mut t = Times::default();
    for i in 0..runs {
        for (fmt, src) in &formats {
            let tools: Vec<&'static str> = TOOLS
                .iter()
                .copied()
                .filter(|tool| match *tool {
                    "vireo" => true,
                    "qemu-img" | "qemu-img-direct" => qemu_img.is_some(),
                    _ => *fmt == Fmt::Raw,
                })
                .collect();
            for k in 0..tools.len() {
                let tool = tools[(i + k) % tools.len()];
                if tool == "vireo" {
                    vireo_ops(&st, *fmt, src, &out_dir, mib, &mut t)?;
                } else {
                    tool_ops(tool, *fmt, src, &pool_dir, &out_dir, mib, &mut t)?;
                }
            }
        }
    }
    let data_mib = allocated(&image) as f64 / MIB as f64;
    println!();
    println!(
        "{:<34} {:>7} {:>8} {:>5} {:>8} {:>5} {:>7} {:>5} {:>7} {:>5}",
        format!("{mib} MiB volumes, median of {runs} (s)"),
        "vireo",
        "qemu-img",
        "ratio",
        "-t none",
        "ratio",
        "cp",
        "ratio",
        "dd",
        "ratio"
    );
    let mut copies = serde_json::Map::new();
    for (fmt, src) in &formats {
        for op in OPS {
            let ours = t.get((*fmt, op, "vireo"));
            let label = match op {
                "upload" => "upload from a file",
                "upload_stream" => "upload from a stream",
                "download" => "download into a file",
                _ => "clone",
            };
            let mut line = format!(
                "{:<34} {:>7}",
                format!("{} {label}", fmt.name()),
                fmt_s(median(ours))
            );
            let mut peers = serde_json::Map::new();
            for tool in &TOOLS[1..] {
                // A streamed upload is the same copy for a peer that
                // reads only files (dd reads the pipe too).
                let peer_op = match op {
                    "upload_stream" if t.get((*fmt, op, tool)).is_empty() => "upload",
                    _ => op,
                };
                let theirs = t.get((*fmt, peer_op, tool));
                let width = if tool.starts_with("qemu-img") { 8 } else { 7 };
                if theirs.is_empty() {
                    line += &format!(" {:>width$} {:>5}", "", "");
                    continue;
                }
                let pairs: Vec<f64> = ours.iter().zip(theirs).map(|(o, p)| p / o).collect();
                let ratio = median(&pairs);
                line += &format!(" {:>width$} {:>5}", fmt_s(median(theirs)), num(ratio, 2));
                peers.insert(
                    (*tool).to_string(),
                    json!({
                        "time_s": stats(theirs),
                        "ratio": ratio.is_finite().then_some(ratio),
                        "pair_ratios": pairs,
                        "allocated_bytes": t.alloc.get(&(*fmt, peer_op, *tool)),
                    }),
                );
            }
            println!("{line}");
            copies.insert(
                format!("{}_{op}", fmt.name()),
                json!({
                    "source": src.display().to_string(),
                    "source_allocated_bytes": allocated(src),
                    "vireo": {
                        "time_s": stats(ours),
                        "allocated_bytes": t.alloc.get(&(*fmt, op, "vireo")),
                    },
                    "peers": peers,
                }),
            );
        }
    }
    println!("{:<34} (ms)", "");
    let ms = |v: &[f64]| v.iter().map(|s| s * 1e3).collect::<Vec<_>>();
    let resize = row(
        "raw resize to twice the size (ms)",
        &ms(&t.resize.0),
        &ms(&t.resize.1),
        1,
        false,
    );
    println!();
    println!(
        "  images: {data_mib:.0} MiB of {mib} MiB allocated (raw); copies' allocation (MiB, first run):"
    );
    for (fmt, src) in &formats {
        let mut line = format!(
            "  {:<6} source {:>5.0}",
            fmt.name(),
            allocated(src) as f64 / MIB as f64
        );
        for op in ["upload", "download", "clone"] {
            for tool in TOOLS {
                if let Some(b) = t.alloc.get(&(*fmt, op, tool)) {
                    line += &format!(", {op} {tool} {:.0}", *b as f64 / MIB as f64);
                }
            }
        }
        println!("{line}");
    }
    println!("  filesystem of the pool: {}", fs_type(&pool_dir));
    let ops = json!({
        "copies": copies,
        "resize_ms": resize,
        "filesystem": fs_type(&pool_dir),
        "image_allocated_bytes": allocated(&image),
    });
    remove(&image);
    remove(&qcow2);

    // Part 2.
    let mut blk_json = Value::Null;
    let mut tsc = f64::NAN;
    let blk_skip = if blk_opt.is_none() {
        Some("VIREO_BENCH_BLK=off".to_string())
    } else if !kvm_usable() {
        Some("/dev/kvm cannot be opened".to_string())
    } else {
        None
    };
    let guest = if blk_skip.is_none() {
        match kit::build_guest(&repo().join("vmm/guest/build.sh"), &scratch.0.join("guest")) {
            Ok(g) => Some(g),
            Err(err) => {
                println!("SKIP virtio-blk part: cannot build the test guest ({err}): no gcc?");
                None
            }
        }
    } else {
        None
    };
    if let Some(why) = &blk_skip {
        println!("SKIP virtio-blk part: {why}");
    }
    if let Some(guest) = guest {
        let bin = build_vmm()?;
        tsc = tsc_hz();
        let disk_mib = mib.max(u64::from(blk.mib));
        st.create_volume(&volume("disk", disk_mib, "")?)
            .map_err(e)?;
        let disk = PathBuf::from(st.volume_info(POOL, "disk").map_err(e)?.path);
        // Warm-up: allocates the range the timed runs write.
        blk_once(
            Vmm::Vireo,
            &bin,
            &guest,
            &disk,
            &scratch.0.join("warm"),
            blk,
        )?;
        let (mut v, mut q) = (Vec::new(), Vec::new());
        for i in 0..runs {
            v.push(blk_once(
                Vmm::Vireo,
                &bin,
                &guest,
                &disk,
                &scratch.0.join(format!("v{i}")),
                blk,
            )?);
            if qemu.is_some() {
                q.push(blk_once(
                    Vmm::Qemu,
                    &bin,
                    &guest,
                    &disk,
                    &scratch.0.join(format!("q{i}")),
                    blk,
                )?);
            }
        }
        if qemu.is_none() {
            println!(
                "SKIP QEMU column: {} not found (Debian: apt-get install qemu-system-x86; {QEMU_ENV} names another)",
                qemu_bin()
            );
        }
        println!();
        println!(
            "{:<44} {:>10} {:>10} {:>6}",
            format!(
                "virtio-blk MB/s, {} MiB in {} KiB x {}",
                blk.mib, blk.kib, blk.depth
            ),
            "vireo-vmm",
            "QEMU",
            "ratio"
        );
        let pick = |rs: &[BlkRun], f: &dyn Fn(&BlkRun) -> f64| rs.iter().map(f).collect::<Vec<_>>();
        let w = |r: &BlkRun| r.mbs(r.write, tsc);
        let wf = |r: &BlkRun| r.mbs(r.write + r.flush, tsc);
        let rd = |r: &BlkRun| r.mbs(r.read, tsc);
        blk_json = json!({
            "mib": blk.mib, "request_kib": blk.kib, "depth": blk.depth,
            "disk": disk.display().to_string(),
            "write_mb_s": row("sequential write", &pick(&v, &w), &pick(&q, &w), 0, true),
            "write_flush_mb_s": row("sequential write, then flush", &pick(&v, &wf), &pick(&q, &wf), 0, true),
            "read_mb_s": row("sequential read (verified)", &pick(&v, &rd), &pick(&q, &rd), 0, true),
            "vireo_runs_cycles": v.iter().map(|r| json!({"write": r.write, "flush": r.flush, "read": r.read})).collect::<Vec<_>>(),
            "qemu_runs_cycles": q.iter().map(|r| json!({"write": r.write, "flush": r.flush, "read": r.read})).collect::<Vec<_>>(),
        });
        println!(
            "  host TSC {:.1} MHz (the guest counts cycles of the same TSC)",
            tsc / 1e6
        );
    }
    println!(
        "  ratio: median over runs of (peer run i / Vireo run i) for times, the inverse for \
         rates; above 1: Vireo is faster"
    );

    let out = json!({
        "benchmark": "storage",
        "date": date,
        "runs": runs,
        "volume_mib": mib,
        "qemu_img": qemu_img,
        "qemu": qemu,
        "tsc_hz": tsc.is_finite().then_some(tsc),
        "volume_operations": ops,
        "virtio_blk": blk_json,
        "qemu_command": format!("{} -M {QEMU_MACHINE} -accel kvm -nodefaults -no-user-config -display none -m {GUEST_MIB} -global virtio-mmio.force-legacy=false -kernel ELF -append \"console=ttyS0 {}\" -serial file:LOG -drive file=DISK,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0", qemu_bin(), blk.option()),
    });
    let dir = repo().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let path = dir.join("storage.json");
    let text = serde_json::to_string_pretty(&out).map_err(|e| format!("json: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
