//! `cargo bench -p vireo-drivers --bench storage`
//!
//! Two parts, each beside its peer in the same run:
//!
//! 1. **Volume operations** on a dir pool (the `DirStorage` backend the
//!    agent and `vireo vol-*` use) beside `qemu-img` doing the same on the
//!    same filesystem: upload a 1 GiB raw image from a local file
//!    (`qemu-img convert -f raw -O raw`), clone it in full (`qemu-img
//!    convert` again), and grow the clone to twice its size (`qemu-img
//!    resize`). Times run until the tool returns; both sync the result to
//!    disk before that (Vireo with fsync before it publishes the volume,
//!    qemu-img convert when given `-t writeback`; its default for convert,
//!    `unsafe`, never syncs). The image is pseudo-random data written by the
//!    bench, so no side can skip zeros; it is in the page cache for both.
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
//! `256,128,16`), `VIREO_BENCH_QEMU` (another QEMU binary). Parts whose
//! tools are missing (qemu-img, QEMU, a usable /dev/kvm, gcc for the guest)
//! print a `SKIP` line; the rest still runs.

use std::fs::File;
use std::io::Write;
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

/// `len` bytes of pseudo-random data (xorshift64), written and synced.
fn write_image(path: &Path, len: u64) -> Res<()> {
    let mut f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = usize::try_from(left.min(MIB)).unwrap_or(MIB as usize);
        f.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> Res<T> {
    serde_yaml_ng::from_str(text).map_err(|e| format!("{e}: {text}"))
}

fn volume(name: &str, mib: u64, source: &str) -> Res<StorageVol> {
    yaml(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: {name}}}\n\
         spec: {{pool: {POOL}, capacity: {mib}Mi, format: raw{source}}}\n"
    ))
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

// ---------------------------------------------------------------------
// part 1: volume operations

#[derive(Default)]
struct OpTimes {
    upload: Vec<f64>,
    clone: Vec<f64>,
    resize: Vec<f64>,
}

/// One upload, clone and resize by the dir backend, added to `t`.
fn vireo_ops(st: &DirStorage, image: &Path, mib: u64, t: &mut OpTimes) -> Res<()> {
    let e = |e: vireo_drivers::Error| e.to_string();
    let (up, cl) = ("up", "clone");
    st.create_volume(&volume(up, mib, "")?).map_err(e)?;
    t.upload.push(timed(|| {
        let mut src = File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
        st.upload_volume(POOL, up, &mut src, Some(mib * MIB), &no_progress)
            .map_err(e)
    })?);
    let vol = volume(cl, mib, &format!(", source: {{clone: {{volume: {up}}}}}"))?;
    t.clone.push(timed(|| st.create_volume(&vol).map_err(e))?);
    t.resize.push(timed(|| {
        st.resize_volume(POOL, cl, 2 * mib * MIB, ResizeFlags::default())
            .map_err(e)
    })?);
    st.delete_volume(POOL, cl).map_err(e)?;
    st.delete_volume(POOL, up).map_err(e)
}

/// `qemu-img convert` with the output synced when it closes: its default
/// for convert is `-t unsafe`, which never syncs (and leaves the writeback
/// to whatever runs next, such as the resize, which does sync).
const CONVERT: [&str; 7] = ["convert", "-t", "writeback", "-f", "raw", "-O", "raw"];

/// The same three by qemu-img, added to `t`.
fn qemu_img_ops(dir: &Path, image: &Path, mib: u64, t: &mut OpTimes) -> Res<()> {
    let qi = || Command::new("qemu-img");
    let (up, cl) = (dir.join("q-up"), dir.join("q-clone"));
    t.upload
        .push(timed(|| run_cmd(qi().args(CONVERT).arg(image).arg(&up)))?);
    t.clone
        .push(timed(|| run_cmd(qi().args(CONVERT).arg(&up).arg(&cl)))?);
    t.resize.push(timed(|| {
        run_cmd(
            qi().args(["resize", "-f", "raw"])
                .arg(&cl)
                .arg(format!("{}M", 2 * mib)),
        )
    })?);
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

fn parse_blk_opts() -> Res<BlkOpts> {
    let text = std::env::var("VIREO_BENCH_BLK").unwrap_or_else(|_| "256,128,16".into());
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
            Ok(BlkOpts { mib, kib, depth })
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

fn fmt(x: f64, prec: usize) -> String {
    if x.is_finite() {
        format!("{x:.prec$}")
    } else {
        "n/a".into()
    }
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
        fmt(a, prec),
        if peer.is_empty() {
            "n/a".into()
        } else {
            fmt(b, prec)
        },
        fmt(ratio, 2)
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
    let blk = parse_blk_opts()?;
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

    // Part 1, interleaved one run at a time.
    let mut ours = OpTimes::default();
    let mut peer = OpTimes::default();
    // Who goes first alternates. These machines are VMs whose host takes
    // back the memory the kernel frees (free page reporting) and backs it
    // again on first touch: a copy into fresh page-cache pages sometimes
    // takes five times as long, whichever tool makes it. Medians of
    // alternating runs keep that from deciding the ratio.
    for i in 0..runs {
        for first_ours in [i % 2 == 0, i % 2 == 1] {
            if first_ours {
                vireo_ops(&st, &image, mib, &mut ours)?;
            } else if qemu_img.is_some() {
                qemu_img_ops(&pool_dir, &image, mib, &mut peer)?;
            }
        }
    }
    if qemu_img.is_none() {
        println!("SKIP qemu-img column: qemu-img not found (Debian: apt-get install qemu-utils)");
    }
    let ms = |v: &[f64]| v.iter().map(|s| s * 1e3).collect::<Vec<_>>();
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>6}",
        format!("{mib} MiB raw volume, median of {runs}"),
        "vireo",
        "qemu-img",
        "ratio"
    );
    let ops = json!({
        "upload_s": row("upload from a local file (s)", &ours.upload, &peer.upload, 2, false),
        "clone_s": row("clone, full copy (s)", &ours.clone, &peer.clone, 2, false),
        "resize_ms": row("resize to twice the size (ms)", &ms(&ours.resize), &ms(&peer.resize), 1, false),
    });
    remove(&image);

    // Part 2.
    let mut blk_json = Value::Null;
    let mut tsc = f64::NAN;
    let blk_skip = if !kvm_usable() {
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
