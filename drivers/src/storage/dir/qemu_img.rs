//! qcow2 images are written by `qemu-img` (Debian's `qemu-utils`), as
//! libvirt's storage driver does: creation, overlays on a backing volume,
//! conversion between formats, and resizing. Reading a header needs no
//! process (see [`super::file::probe`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use vireo_crds::VolFormat;

/// The qemu-img binary: `$VIREO_QEMU_IMG`, or `qemu-img` on PATH.
fn binary() -> PathBuf {
    std::env::var_os("VIREO_QEMU_IMG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// Runs qemu-img; the error is its stderr (or why it could not start).
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(binary())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run qemu-img (install qemu-utils): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "qemu-img {}: {}",
            args.first().copied().unwrap_or_default(),
            err.trim()
        ))
    }
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}

/// A new, empty qcow2 image of `capacity` bytes.
pub fn create_qcow2(path: &Path, capacity: u64) -> Result<(), String> {
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(path)?,
        &capacity.to_string(),
    ])
}

/// A qcow2 overlay of `capacity` bytes on `backing` (an absolute path).
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: VolFormat,
    capacity: u64,
) -> Result<(), String> {
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        qemu_format(backing_format),
        "-b",
        path_str(backing)?,
        path_str(path)?,
        &capacity.to_string(),
    ])
}

/// qemu-img's name of a format: an ISO image is raw bytes to it.
pub fn qemu_format(format: VolFormat) -> &'static str {
    match format {
        VolFormat::Raw | VolFormat::Iso => "raw",
        VolFormat::Qcow2 => "qcow2",
    }
}

/// A full copy of `src` in `to` format (a qcow2 source's backing chain is
/// flattened into the copy).
pub fn convert(src: &Path, from: VolFormat, dst: &Path, to: VolFormat) -> Result<(), String> {
    run(&[
        "convert",
        "-q",
        "-f",
        qemu_format(from),
        "-O",
        qemu_format(to),
        path_str(src)?,
        path_str(dst)?,
    ])
}

/// Changes a qcow2 image's virtual size.
pub fn resize_qcow2(path: &Path, capacity: u64, shrink: bool) -> Result<(), String> {
    let size = capacity.to_string();
    let mut args = vec!["resize", "-q", "-f", "qcow2"];
    if shrink {
        args.push("--shrink");
    }
    args.push(path_str(path)?);
    args.push(&size);
    run(&args)
}

/// An internal snapshot of a qcow2 image that no process has open
/// (`qemu-img snapshot`): `-c` creates `tag`, `-a` applies it (the image
/// returns to it), `-d` deletes it.
pub fn snapshot(path: &Path, flag: &str, tag: &str) -> Result<(), String> {
    run(&["snapshot", flag, tag, path_str(path)?])
}

/// Whether qemu-img can be run here.
pub fn available() -> bool {
    Command::new(binary())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
