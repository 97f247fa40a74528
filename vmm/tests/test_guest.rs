//! Boots the project's test guest (`vmm/guest`, built by its build.sh) and
//! checks its own report of the machine: command line, memory map, entry,
//! boot timer, interrupts through the IOAPIC, Ctrl-Alt-Del and power-off.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn build_guest(out: &Path) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let res = match Command::new(&script)
        .arg(out)
        .stderr(Stdio::inherit())
        .output()
    {
        Ok(res) => res,
        Err(e) => {
            skip("test guest", &format!("{}: {e}", script.display()));
            return None;
        }
    };
    if !res.status.success() {
        skip(
            "test guest",
            &format!(
                "{} failed ({}): no C compiler for the test guest?",
                script.display(),
                res.status
            ),
        );
        return None;
    }
    let path = String::from_utf8_lossy(&res.stdout)
        .lines()
        .last()?
        .trim()
        .to_string();
    Some(PathBuf::from(path))
}

/// Usable RAM in KiB in the e820 map vireo-vmm builds for `mib` (< 3 GiB).
fn usable_kib(mib: u64) -> u64 {
    (0x9fc00 + (mib << 20) - 0x10_0000) / 1024
}

#[test]
fn test_guest_reports_the_machine_and_shuts_down_on_ctrl_alt_del() {
    if !kvm_available("test_guest_reports_the_machine_and_shuts_down_on_ctrl_alt_del") {
        return;
    }
    let out = TempDir::new("guest-build");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let cmdline = "console=ttyS0 vireo.kbdtrace=1";
    let opts = Opts {
        kernel: &guest,
        cmdline: Some(cmdline),
        memory_mib: 64,
        vcpus: 2,
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest", opts);
    // The whole line: the guest writes it byte by byte.
    let console = vmm.wait_console("VIREO-TEST idle: irq=ioapic\n", 1, T);
    assert!(console.contains("VIREO-TEST-GUEST-READY"), "{console}");
    assert!(
        console.contains(&format!("VIREO-TEST cmdline: {cmdline}\n")),
        "{console}"
    );
    assert!(
        console.contains(&format!(
            "VIREO-TEST memory: {} KiB in 3 e820 entries",
            usable_kib(64)
        )),
        "{console}"
    );
    // The guest carries a PVH note, so vireo-vmm enters it through PVH.
    assert!(console.contains("VIREO-TEST entry: pvh\n"), "{console}");
    assert!(
        console.contains("VIREO-TEST-GUEST-DONE devices=0"),
        "{console}"
    );
    assert!(console.contains("VIREO-TEST idle: irq=ioapic"), "{console}");
    assert!(
        !console.contains("FAIL") && !console.contains("exception"),
        "{console}"
    );

    let mut api = vmm.connect_api();
    let info = api.call(r#"{"command":"info"}"#);
    assert!(info["boot_time_us"].as_u64().is_some(), "{info}");

    // Ctrl-Alt-Del arrives by interrupt (the guest sleeps in hlt) in the
    // order the contract gives.
    assert_eq!(
        api.call(r#"{"command":"shutdown","timeout_seconds":20}"#)["ok"],
        true
    );
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "poweroff", "{exit}");
    let console = vmm.console();
    let kbd: Vec<&str> = console
        .lines()
        .filter_map(|l| l.strip_prefix("VIREO-TEST kbd: "))
        .collect();
    assert_eq!(kbd, ["0x14", "0x11", "0xe0", "0x71"], "{console}");
    assert!(
        console.contains("VIREO-TEST ctrl-alt-del: powering off"),
        "{console}"
    );
    assert_eq!(exit["boot_time_us"], info["boot_time_us"]);
}

#[test]
fn test_guest_power_off_benchmark_mode() {
    if !kvm_available("test_guest_power_off_benchmark_mode") {
        return;
    }
    let out = TempDir::new("guest-build2");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("vireo.poweroff=1"),
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-poweroff", opts);
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "poweroff");
    let us = exit["boot_time_us"].as_u64().expect("boot timer written");
    eprintln!("test guest: boot timer at {us} us after VMM process start");
    assert!(vmm.console().contains("VIREO-TEST-GUEST-DONE devices=0"));
}

#[test]
fn test_guest_drives_virtio_disks_net_and_rng() {
    if !kvm_available("test_guest_drives_virtio_disks_net_and_rng") {
        return;
    }
    let out = TempDir::new("guest-build3");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let rw = out.0.join("rw.raw");
    let ro = out.0.join("ro.raw");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    let ro_content: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(&ro, &ro_content).unwrap();
    let rw_arg = rw.display().to_string();
    let ro_arg = format!("{},readonly", ro.display());
    let with_net = can_make_netns_tap();
    if !with_net {
        skip(
            "test_guest_drives_virtio_disks_net_and_rng (virtio-net part)",
            "cannot create a network namespace with a tap here; virtio-net left out",
        );
    }
    let mut extra = vec!["--disk", &rw_arg, "--disk", &ro_arg, "--rng"];
    if with_net {
        extra.extend(["--net", "vtap0,mac=02:00:00:00:00:07"]);
    }
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0 vireo.poweroff=1"),
        extra,
        netns_tap: with_net.then_some("vtap0"),
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-virtio", opts);
    let (status, exit) = vmm.wait_exit(T);
    let console = vmm.console();
    assert!(status.success(), "{console}\n{}", vmm.stderr());
    assert_eq!(exit["reason"], "poweroff", "{exit}");
    assert!(!console.contains("FAIL"), "{console}");
    // Slots in order: disks, NICs, entropy.
    assert!(
        console.contains("VIREO-TEST blk0: capacity=2048 write=ok read=ok verify=ok flush=ok"),
        "{console}"
    );
    assert!(
        console.contains("VIREO-TEST blk1: capacity=128 readonly write=refused read=ok"),
        "{console}"
    );
    assert!(
        console.contains("VIREO-TEST rng0: read=64 nonzero=yes"),
        "{console}"
    );
    let devices = if with_net {
        assert!(
            console.contains("VIREO-TEST net0: mac=02:00:00:00:00:07 tx=ok"),
            "{console}"
        );
        4
    } else {
        3
    };
    assert!(
        console.contains(&format!("VIREO-TEST-GUEST-DONE devices={devices}")),
        "{console}"
    );
    // The guest's write reached the file; the read-only disk is untouched.
    let disk = std::fs::read(&rw).unwrap();
    assert_eq!(&disk[512..529], b"VIREO-TEST-SECTOR");
    assert!((17..512).all(|i| disk[512 + i] == (i & 0xff) as u8));
    assert_eq!(std::fs::read(&ro).unwrap(), ro_content);
}

/// `block-stats` counts what the guest asked of each disk: on the
/// read-write one a 512-byte write, a 512-byte read and a flush; on the
/// read-only one a refused write (an error) and a read.
#[test]
fn test_guest_disk_io_shows_in_block_stats() {
    if !kvm_available("test_guest_disk_io_shows_in_block_stats") {
        return;
    }
    let out = TempDir::new("guest-build-blkstats");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let rw = out.0.join("rw.raw");
    let ro = out.0.join("ro.raw");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&ro, vec![0u8; 64 * 1024]).unwrap();
    let rw_arg = rw.display().to_string();
    let ro_arg = format!("{},readonly", ro.display());
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0"),
        extra: vec!["--disk", &rw_arg, "--disk", &ro_arg],
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-blkstats", opts);
    let mut api = vmm.connect_api();
    vmm.wait_console("VIREO-TEST-GUEST-DONE devices=2", 1, T);
    let console = vmm.console();
    assert!(!console.contains("FAIL"), "{console}");
    let r = api.call(r#"{"command": "block-stats"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let disks = r["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2, "{r}");
    let got = |d: &serde_json::Value, k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{k}: {d}"));
    let fields = [
        "index",
        "rd_req",
        "rd_bytes",
        "wr_req",
        "wr_bytes",
        "flush_operations",
        "errs",
    ];
    let counts: Vec<Vec<u64>> = disks
        .iter()
        .map(|d| fields.iter().map(|k| got(d, k)).collect())
        .collect();
    assert_eq!(
        counts[0],
        [0, 1, 512, 1, 512, 1, 0],
        "the read-write disk: {r}"
    );
    assert_eq!(
        counts[1],
        [1, 1, 512, 0, 0, 0, 1],
        "the read-only disk: {r}"
    );
    assert!(got(&disks[0], "wr_total_times") > 0, "{r}");
    let r = api.call(r#"{"command": "destroy"}"#);
    assert_eq!(r["ok"], true, "{r}");
}

/// The throughput mode the storage bench uses: many requests in flight,
/// each 64 KiB chain landing where it says, read back and checked.
#[test]
fn test_guest_block_benchmark_mode() {
    if !kvm_available("test_guest_block_benchmark_mode") {
        return;
    }
    let out = TempDir::new("guest-build-blkbench");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let disk = out.0.join("bench.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let disk_arg = disk.display().to_string();
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0 vireo.blkbench=4,64,8 vireo.poweroff=1"),
        extra: vec!["--disk", &disk_arg],
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-blkbench", opts);
    let (status, exit) = vmm.wait_exit(T);
    let console = vmm.console();
    assert!(status.success(), "{console}\n{}", vmm.stderr());
    assert_eq!(exit["reason"], "poweroff", "{exit}");
    assert!(!console.contains("FAIL"), "{console}");
    let line = console
        .lines()
        .find(|l| l.starts_with("VIREO-TEST blkbench "))
        .unwrap_or_else(|| panic!("no blkbench line: {console}"));
    assert!(
        line.starts_with("VIREO-TEST blkbench bytes=4194304 req=65536 depth=8 write_cycles="),
        "{line}"
    );
    assert!(line.ends_with(" verify=ok"), "{line}");
    // Every 64 KiB request starts with its first sector number; nothing
    // was written past the 4 MiB asked for.
    let data = std::fs::read(&disk).unwrap();
    for req in 0..64u64 {
        let at = (req * 65536) as usize;
        let sector = u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        assert_eq!(sector, req * 128, "request {req}");
    }
    assert!(data[4 << 20..].iter().all(|b| *b == 0));
}

#[test]
fn test_guest_through_its_64_bit_entry() {
    if !kvm_available("test_guest_through_its_64_bit_entry") {
        return;
    }
    let out = TempDir::new("guest-build4");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0 vireo.poweroff=1"),
        memory_mib: 256,
        extra: vec!["--elf-entry", "linux64"],
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-linux64", opts);
    let (status, exit) = vmm.wait_exit(T);
    let console = vmm.console();
    assert!(status.success(), "{console}");
    assert_eq!(exit["reason"], "poweroff");
    // The zero page's command line and e820 table, as the guest read them.
    assert!(console.contains("VIREO-TEST entry: linux64\n"), "{console}");
    assert!(
        console.contains("VIREO-TEST cmdline: console=ttyS0 vireo.poweroff=1\n"),
        "{console}"
    );
    assert!(
        console.contains(&format!(
            "VIREO-TEST memory: {} KiB in 3 e820 entries",
            usable_kib(256)
        )),
        "{console}"
    );
    assert!(
        vmm.stderr().contains("64-bit entry at 0x"),
        "{}",
        vmm.stderr()
    );
}

/// Polls `info` until `memory_bytes` is `want`.
fn wait_memory(api: &mut Api, want: u64, console: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let info = api.call(r#"{"command": "info"}"#);
        assert_eq!(info["ok"], true, "{info}");
        if info["memory_bytes"].as_u64() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "memory_bytes is {} after {T:?}, expected {want}\n{}",
            info["memory_bytes"],
            console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn test_guest_drives_the_balloon() {
    if !kvm_available("test_guest_drives_the_balloon") {
        return;
    }
    let out = TempDir::new("guest-build5");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    const MIB: u64 = 1 << 20;
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0"),
        memory_mib: 64,
        extra: vec!["--rng", "--balloon", "--current-memory-mib", "40"],
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-balloon", opts);
    // 24 MiB = 6144 pages given back at boot; the balloon is after the rng.
    vmm.wait_console("VIREO-TEST balloon0: target=6144 actual=6144\n", 1, T);
    vmm.wait_console("VIREO-TEST-GUEST-DONE devices=2", 1, T);
    let mut api = vmm.connect_api();
    wait_memory(&mut api, 40 * MIB, || vmm.console());

    // Inflate further, live, then deflate.
    let r = api.call(r#"{"command": "balloon", "bytes": 20971520}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST balloon0: target=11264 actual=11264\n", 1, T);
    wait_memory(&mut api, 20 * MIB, || vmm.console());
    let r = api.call(r#"{"command": "balloon", "bytes": 60817408}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST balloon0: target=1536 actual=1536\n", 1, T);
    wait_memory(&mut api, 58 * MIB, || vmm.console());
    let r = api.call(r#"{"command": "balloon", "bytes": 67108864}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST balloon0: target=0 actual=0\n", 1, T);
    wait_memory(&mut api, 64 * MIB, || vmm.console());

    // Out of range requests are refused and change nothing.
    for bad in [
        r#"{"command": "balloon", "bytes": 0}"#,
        r#"{"command": "balloon", "bytes": 67112960}"#,
    ] {
        let r = api.call(bad);
        assert_eq!(r["ok"], false, "{bad}: {r}");
    }
    let console = vmm.console();
    assert!(!console.contains("FAIL"), "{console}");
    assert!(!vmm.stderr().contains("PFN outside"), "{}", vmm.stderr());

    // A reset drops the driver's pages: the guest boots and inflates again
    // to the last target.
    let r = api.call(r#"{"command": "balloon", "bytes": 33554432}"#);
    assert_eq!(r["ok"], true, "{r}");
    wait_memory(&mut api, 32 * MIB, || vmm.console());
    let r = api.call(r#"{"command": "reset"}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST balloon0: target=8192 actual=8192\n", 2, T);
    wait_memory(&mut api, 32 * MIB, || vmm.console());
    let r = api.call(r#"{"command": "destroy"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let (_, exit) = vmm.wait_exit(T);
    assert_eq!(exit["reason"], "destroyed", "{exit}");
}

#[test]
fn test_guest_without_a_balloon_refuses_balloon_requests() {
    if !kvm_available("test_guest_without_a_balloon_refuses_balloon_requests") {
        return;
    }
    let out = TempDir::new("guest-build6");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0"),
        memory_mib: 32,
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-no-balloon", opts);
    vmm.wait_console("VIREO-TEST-GUEST-DONE devices=0", 1, T);
    let mut api = vmm.connect_api();
    let info = api.call(r#"{"command": "info"}"#);
    assert_eq!(info["memory_bytes"], 32u64 << 20, "{info}");
    let r = api.call(r#"{"command": "balloon", "bytes": 16777216}"#);
    assert_eq!(r["ok"], false, "{r}");
}

/// Polls `info` until `vcpus` is `want`.
fn wait_vcpus(api: &mut Api, want: u64, console: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let info = api.call(r#"{"command": "info"}"#);
        assert_eq!(info["ok"], true, "{info}");
        if info["vcpus"].as_u64() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vcpus is {} after {T:?}, expected {want}\n{}",
            info["vcpus"],
            console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn test_guest_ejects_and_takes_back_vcpus() {
    if !kvm_available("test_guest_ejects_and_takes_back_vcpus") {
        return;
    }
    let out = TempDir::new("guest-build7");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0"),
        memory_mib: 32,
        vcpus: 3,
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-vcpus", opts);
    vmm.wait_console("VIREO-TEST idle: irq=ioapic", 1, T);
    let mut api = vmm.connect_api();
    wait_vcpus(&mut api, 3, || vmm.console());
    for bad in [
        r#"{"command": "vcpus", "count": 0}"#,
        r#"{"command": "vcpus", "count": 4}"#,
    ] {
        let r = api.call(bad);
        assert_eq!(r["ok"], false, "{bad}: {r}");
    }

    // Down to one: the guest ejects vCPUs 1 and 2 when the controller's
    // interrupt arrives.
    let r = api.call(r#"{"command": "vcpus", "count": 1}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST cpu1: ejected\n", 1, T);
    vmm.wait_console("VIREO-TEST cpu2: ejected\n", 1, T);
    wait_vcpus(&mut api, 1, || vmm.console());

    // Pause and resume still work with parked vCPUs.
    assert_eq!(api.call(r#"{"command": "pause"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"command": "info"}"#)["state"], "paused");
    assert_eq!(api.call(r#"{"command": "resume"}"#)["ok"], true);

    // Up to two again.
    let r = api.call(r#"{"command": "vcpus", "count": 2}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST cpu1: plugged\n", 1, T);
    wait_vcpus(&mut api, 2, || vmm.console());

    // A reset keeps the count; the guest boots again and idles.
    let r = api.call(r#"{"command": "reset"}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST idle: irq=ioapic", 2, T);
    wait_vcpus(&mut api, 2, || vmm.console());
    let r = api.call(r#"{"command": "vcpus", "count": 1}"#);
    assert_eq!(r["ok"], true, "{r}");
    vmm.wait_console("VIREO-TEST cpu1: ejected\n", 2, T);
    wait_vcpus(&mut api, 1, || vmm.console());

    let console = vmm.console();
    assert!(!console.contains("FAIL"), "{console}");
    assert!(!console.contains("cpu0"), "{console}");
    let r = api.call(r#"{"command": "destroy"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let (_, exit) = vmm.wait_exit(T);
    assert_eq!(exit["reason"], "destroyed", "{exit}");
    assert!(
        vmm.stderr().contains("vCPU plugged in again"),
        "{}",
        vmm.stderr()
    );
}

/// Reads one `\n`-terminated line (without it).
fn read_line(s: &mut std::os::unix::net::UnixStream) -> String {
    use std::io::Read;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => return String::from_utf8_lossy(&line).into_owned(),
            Ok(1) => line.push(b[0]),
            other => panic!(
                "reading a line: {other:?} after {:?}",
                String::from_utf8_lossy(&line)
            ),
        }
    }
}

/// virtio-vsock end to end: a host process connects through `--vsock`'s
/// Unix socket to the guest, which accepts and echoes; then the guest
/// connects out to a host listener at `UDS_<port>` and is echoed back to.
#[test]
fn test_guest_talks_over_vsock_both_ways() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    if !kvm_available("test_guest_talks_over_vsock_both_ways") {
        return;
    }
    let out = TempDir::new("guest-build-vsock");
    let Some(guest) = build_guest(&out.0) else {
        return;
    };

    // Host to guest: the guest listens on port 5000.
    let uds = out.0.join("vsock.sock");
    let vsock_arg = format!("cid=7,uds={}", uds.display());
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0 vireo.vsock=listen:5000"),
        memory_mib: 32,
        extra: vec!["--vsock", &vsock_arg],
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-vsock-listen", opts);
    vmm.wait_console("VIREO-TEST vsock0: cid=7\n", 1, T);
    vmm.wait_console("VIREO-TEST vsock: listening on port 5000", 1, T);
    let mut s = UnixStream::connect(&uds).expect("the vsock socket");
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let ok = read_line(&mut s);
    assert!(ok.starts_with("OK "), "{ok}");
    let host_port: u32 = ok[3..].parse().expect("port number");
    vmm.wait_console(
        &format!("VIREO-TEST vsock: accepted port=5000 from host port={host_port}"),
        1,
        T,
    );
    let msg = b"ping from the host over vsock\n";
    s.write_all(msg).unwrap();
    let mut echo = vec![0u8; msg.len()];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(echo, msg);
    // A port nobody listens on in the guest: the socket is closed.
    let mut refused = UnixStream::connect(&uds).unwrap();
    refused.set_read_timeout(Some(T)).unwrap();
    refused.write_all(b"CONNECT 5001\n").unwrap();
    let mut b = [0u8; 16];
    assert_eq!(refused.read(&mut b).unwrap(), 0, "refused by the guest");
    // Closing the host end: the guest sees SHUTDOWN and answers RST.
    drop(s);
    vmm.wait_console("VIREO-TEST vsock: shutdown flags=3", 1, T);
    let console = vmm.console();
    assert!(!console.contains("FAIL"), "{console}");
    let mut api = vmm.connect_api();
    let r = api.call(r#"{"command": "destroy"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let (_, exit) = vmm.wait_exit(T);
    assert_eq!(exit["reason"], "destroyed", "{exit}");
    assert!(!uds.exists(), "the vsock socket is removed at exit");

    // Guest to host: a listener at UDS_6000 before the VM starts.
    let mut target = uds.clone().into_os_string();
    target.push("_6000");
    let listener = UnixListener::bind(&target).unwrap();
    listener.set_nonblocking(true).unwrap();
    let opts = Opts {
        kernel: &guest,
        cmdline: Some("console=ttyS0 vireo.vsock=connect:6000"),
        memory_mib: 32,
        extra: vec!["--vsock", &vsock_arg],
        ..Opts::default()
    };
    let mut vmm = Vmm::start("test-guest-vsock-connect", opts);
    let deadline = std::time::Instant::now() + T;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the guest did not connect\nconsole:\n{}\nstderr:\n{}",
                    vmm.console(),
                    vmm.stderr()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(read_line(&mut s), "VIREO-TEST hello from the guest");
    vmm.wait_console("VIREO-TEST vsock: connected to host port=6000", 1, T);
    let msg = b"echo me, guest\n";
    s.write_all(msg).unwrap();
    let mut echo = vec![0u8; msg.len()];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(echo, msg);
    let console = vmm.console();
    assert!(!console.contains("FAIL"), "{console}");
}
