//! Device fuzzing on stable Rust: the cargo-fuzz target's harness
//! (`vireo_vmm_devices::fuzzing`) driven by a deterministic mutator over
//! the seed corpus (`fuzz/seeds/`, one file per device), for a fixed number of
//! executions per device — 20,000 by default (CI), more with
//! `VIREO_FUZZ_EXECS=1000000` — printing executions per device. Every seed
//! and every file of `fuzz/regressions/` (inputs that once failed) runs
//! first, unchanged. A panic fails the test and writes the input to
//! `$TMPDIR/vireo-fuzz-crash-<device>-<n>` (keep it in `fuzz/regressions/`).
//!
//! Stable Rust has no sanitizer: out-of-bounds host accesses are found by
//! the cargo-fuzz run under ASan (`fuzz/run.sh`), not here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vireo_vmm_devices::fuzzing::{device_of, run_one};

const DEVICES: [&str; 5] = ["block", "net", "rng", "balloon", "vsock"];

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A selector byte that drives `device`.
fn selector(device: &str, r: u8) -> u8 {
    let base = r & !3;
    match device {
        "block" => base,
        "net" => base | 1,
        "rng" => (base & !0x40) | 2,
        "vsock" => base | 0x40 | 2,
        _ => base | 3,
    }
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// One of a few byte-level mutations, as a fuzzer's havoc stage does.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if v.len() > 4 => {
                let i = rng.below(v.len());
                let n = rng.below(v.len() - i);
                v.drain(i..i + n);
            }
            4 if !other.is_empty() => {
                let i = rng.below(v.len() + 1);
                let j = rng.below(other.len());
                let n = rng.below(other.len() - j);
                v.splice(i..i, other[j..j + n].iter().copied());
            }
            _ => {
                // An interesting value over a 16- or 32-bit field.
                let vals = [0u32, 1, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x1000, 256];
                let x = vals[rng.below(vals.len())].to_le_bytes();
                if v.len() >= 4 {
                    let i = rng.below(v.len() - 3);
                    v[i..i + 4].copy_from_slice(&x);
                }
            }
        }
    }
    v.truncate(1 << 17);
    v
}

#[test]
fn every_device_survives_its_fuzz_inputs() {
    let execs: usize = std::env::var("VIREO_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let regressions = files(&root.join("regressions"));
    let all_seeds = files(&root.join("seeds"));
    assert!(!all_seeds.is_empty(), "no seeds under {}", root.display());
    // Quiet: the devices log a guest's mistakes.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut findings = Vec::new();
    let mut report = Vec::new();
    for (k, device) in DEVICES.iter().enumerate() {
        // The seeds are named after their device (`block`, `block-ro`, ...).
        let mut seeds: Vec<Vec<u8>> = all_seeds
            .iter()
            .filter(|s| s.first().is_some_and(|&b| device_of(b) == *device))
            .cloned()
            .collect();
        if seeds.is_empty() {
            seeds = all_seeds.clone();
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (k as u64 + 1));
        let started = Instant::now();
        let mut inputs: Vec<Vec<u8>> = seeds.clone();
        inputs.extend(
            regressions
                .iter()
                .filter(|r| r.first().is_some_and(|&s| device_of(s) == *device))
                .cloned(),
        );
        let mut n = 0usize;
        let mut i = 0usize;
        while n < execs {
            let input = if i < inputs.len() {
                inputs[i].clone()
            } else {
                let seed = &seeds[rng.below(seeds.len())];
                let other = &all_seeds[rng.below(all_seeds.len())];
                let mut m = mutate(&mut rng, seed, other);
                if let Some(first) = m.first_mut() {
                    *first = selector(device, rng.next() as u8);
                }
                m
            };
            i += 1;
            n += 1;
            if std::panic::catch_unwind(|| run_one(&input)).is_err() {
                let path = std::env::temp_dir().join(format!("vireo-fuzz-crash-{device}-{n}"));
                let _ = std::fs::write(&path, &input);
                findings.push(format!(
                    "{device}: panic on input {n}, written to {}",
                    path.display()
                ));
            }
        }
        let secs = started.elapsed().as_secs_f64();
        report.push(format!(
            "{device}: {n} executions in {secs:.1} s ({:.0}/s)",
            n as f64 / secs.max(1e-9)
        ));
    }
    std::panic::set_hook(hook);
    for line in &report {
        eprintln!("[fuzz] {line}");
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}
