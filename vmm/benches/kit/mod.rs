//! What the benches that boot the test guest share: vireo-vmm's (`boot`,
//! `net`) and the storage bench of `vireo-drivers`, which takes this file
//! with `#[path]`. Each bench uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub type Res<T> = Result<T, String>;

/// The QEMU binary: `$VIREO_BENCH_QEMU`, or qemu-system-x86_64.
pub const QEMU_ENV: &str = "VIREO_BENCH_QEMU";

pub fn qemu_bin() -> String {
    std::env::var(QEMU_ENV).unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// The first line of `PROGRAM --version`, if it runs.
pub fn version_of(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

/// A child process that is killed and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Res<Self> {
        cmd.spawn()
            .map(Proc)
            .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The median of the finite values (NaN when there are none).
pub fn median(v: &[f64]) -> f64 {
    let mut x: Vec<f64> = v.iter().copied().filter(|f| f.is_finite()).collect();
    x.sort_by(f64::total_cmp);
    match x.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => x[n / 2],
        n => (x[n / 2 - 1] + x[n / 2]) / 2.0,
    }
}

/// A number from the environment, or `default` when it is unset.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Res<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Builds the test guest with `vmm/guest/build.sh` (`script`) into `out`;
/// the ELF's path.
pub fn build_guest(script: &Path, out: &Path) -> Res<PathBuf> {
    let res = Command::new(script)
        .arg(out)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !res.status.success() {
        return Err(format!("{} failed ({})", script.display(), res.status));
    }
    String::from_utf8_lossy(&res.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| format!("{} printed no path", script.display()))
}

/// Polls the console log `file` for the first whole line that starts with
/// `prefix` while `proc` runs (the log grows byte by byte).
pub fn wait_line(file: &Path, prefix: &str, proc: &mut Proc, timeout: Duration) -> Res<String> {
    let since = Instant::now();
    loop {
        if let Ok(text) = std::fs::read(file) {
            let text = String::from_utf8_lossy(&text);
            let whole = text
                .split_inclusive('\n')
                .find(|l| l.starts_with(prefix) && l.ends_with('\n'));
            if let Some(line) = whole {
                return Ok(line.trim_end().to_string());
            }
        }
        if let Ok(Some(st)) = proc.0.try_wait() {
            return Err(format!(
                "the VMM exited ({st}) before {prefix:?} in {}",
                file.display()
            ));
        }
        if since.elapsed() > timeout {
            return Err(format!(
                "no {prefix:?} in {} after {timeout:?}",
                file.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
