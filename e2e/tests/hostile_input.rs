//! Hostile input through the `vireo` binary: an XML file of about 1 MB
//! nested 150,000 deep, a 50 MB XML with about 480,000 disks and a YAML
//! manifest nested 100,000 deep. Each must end with one line of error and
//! a peak under 100 MiB; times and peaks are printed, not asserted.
//!
//! A child's peak (wait4's ru_maxrss) includes this process's own peak at
//! the spawn (Linux keeps the high-water mark across exec), so the files
//! are written in pieces and the figures say how much of a peak is ours.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::run::{error_lines, run, vireo};

/// This process's own peak resident memory, in KiB.
fn own_peak_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Writes `head`, `piece` `n` times and `tail`, without holding it all.
fn write_pieces(path: &Path, head: &str, piece: &str, n: usize, tail: &str) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("file"));
    f.write_all(head.as_bytes()).expect("write");
    for _ in 0..n {
        f.write_all(piece.as_bytes()).expect("write");
    }
    f.write_all(tail.as_bytes()).expect("write");
    f.flush().expect("flush");
}

#[test]
fn hostile_input_ends_at_once_with_one_line() {
    let vireo = vireo();
    let dir = std::env::temp_dir().join(format!("vireo-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let deep = dir.join("deep.xml");
    write_pieces(&deep, "<domain type='kvm'>", "<a>", 150_000, "");
    let close = std::fs::OpenOptions::new().append(true).open(&deep);
    close
        .expect("deep.xml")
        .write_all("</a>".repeat(150_000).as_bytes())
        .expect("write");
    let disk = "<disk type='file' device='disk'>\n  <driver name='qemu' type='qcow2'/>\n  <source file='/var/lib/libvirt/images/d.qcow2'/>\n  <target dev='vdb' bus='virtio'/>\n</disk>\n";
    let big = dir.join("big.xml");
    write_pieces(
        &big,
        "<domain type='kvm'><name>big</name><memory>1048576</memory><devices>\n",
        disk,
        50_000_000 / disk.len(),
        "</devices></domain>\n",
    );
    let yaml = dir.join("deep.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: deep}}\nspec: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
    )
    .expect("deep.yaml");
    let ours = own_peak_kib();
    let mut figures = Vec::new();
    for (what, file, args, want) in [
        (
            "XML, 150,000 deep",
            &deep,
            vec!["import-xml"],
            "nest deeper than 256",
        ),
        (
            "XML, 50 MB, ~480,000 disks",
            &big,
            vec!["import-xml"],
            "at most 10485760",
        ),
        (
            "YAML, 100,000 deep",
            &yaml,
            vec!["-c", "test:///default", "define", "-f"],
            "nested deeper than 256",
        ),
    ] {
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let r = run(
            Command::new(&vireo).args(&args).arg(file),
            Duration::from_secs(60),
        );
        let errors = error_lines(&r.stderr);
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        assert!(
            errors.len() == 1 && errors[0].contains(want),
            "{what}: {errors:?}"
        );
        assert!(
            r.max_rss_kib < 100 * 1024,
            "{what}: peak {} KiB",
            r.max_rss_kib
        );
        figures.push(format!(
            "  {what} ({size} bytes): {:?}, peak {} MiB (at most; this test process's own peak is {} MiB): {}",
            r.took,
            r.max_rss_kib / 1024,
            ours / 1024,
            errors[0]
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("hostile input:\n{}", figures.join("\n"));
}
