//! Boots hand-assembled guests (bytes written by the test into an ELF, with
//! and without a PVH note) and checks what the VMM does with what they do.
//! Needs /dev/kvm; says so and skips when it is absent.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn hello_guest(marker: &str) -> Vec<u8> {
    Asm::new()
        .print(marker)
        .print("\n")
        .boot_timer()
        .power_off()
        .halt_forever()
        .finish()
}

fn boots_to_power_off(pvh: bool) {
    let marker = if pvh {
        "VIREO-TINY-PVH"
    } else {
        "VIREO-TINY-ELF64"
    };
    let image = elf(&hello_guest(marker), pvh);
    let mut vmm = Vmm::start_image("hello", &image, Opts::default());
    let (status, exit) = vmm.wait_exit(T);
    let console = vmm.console();
    assert!(console.contains(marker), "console: {console:?}");
    assert_eq!(exit["reason"], "poweroff", "{exit}");
    assert!(status.success(), "{status}");
    let boot_us = exit["boot_time_us"].as_u64().expect("boot time recorded");
    assert!(boot_us > 0);
    let stderr = vmm.stderr();
    let entry = if pvh {
        "PVH 32-bit entry"
    } else {
        "64-bit entry"
    };
    assert!(stderr.contains(entry), "{stderr}");
    assert!(stderr.contains("boot_time_us"), "{stderr}");
    assert!(stderr.contains("seccomp filter installed"), "{stderr}");
}

#[test]
fn elf64_guest_prints_records_boot_time_and_powers_off() {
    if kvm_available("elf64_guest_prints_records_boot_time_and_powers_off") {
        boots_to_power_off(false);
    }
}

#[test]
fn pvh_guest_prints_records_boot_time_and_powers_off() {
    if kvm_available("pvh_guest_prints_records_boot_time_and_powers_off") {
        boots_to_power_off(true);
    }
}

/// Prints READY, records boot time, then burns CPU forever.
fn spinning_guest() -> Vec<u8> {
    Asm::new()
        .print("READY\n")
        .boot_timer()
        .spin_forever()
        .finish()
}

#[test]
fn api_info_pause_resume_destroy() {
    if !kvm_available("api_info_pause_resume_destroy") {
        return;
    }
    let opts = Opts {
        vcpus: 2,
        memory_mib: 96,
        ..Opts::default()
    };
    let mut vmm = Vmm::start_image("api", &elf(&spinning_guest(), false), opts);
    vmm.wait_console("READY", 1, T);
    let mut api = vmm.connect_api();
    let info = api.call(r#"{"command": "info"}"#);
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_bytes"], 96u64 << 20);
    assert_eq!(info["pid"], vmm.child.id());
    assert!(info["boot_time_us"].as_u64().is_some(), "{info}");

    // The spinning vCPU accumulates CPU time...
    let t0 = info["cpu_time_ns"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t1 = api.call(r#"{"command":"info"}"#)["cpu_time_ns"]
        .as_u64()
        .unwrap();
    assert!(t1 > t0, "cpu time {t0} -> {t1}");

    // ...and none while paused.
    assert_eq!(api.call(r#"{"command":"pause"}"#)["ok"], true);
    let paused = api.call(r#"{"command":"info"}"#);
    assert_eq!(paused["state"], "paused");
    let p0 = paused["cpu_time_ns"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let p1 = api.call(r#"{"command":"info"}"#)["cpu_time_ns"]
        .as_u64()
        .unwrap();
    assert!(p1 - p0 < 20_000_000, "paused vCPUs used {} ns", p1 - p0);

    assert_eq!(api.call(r#"{"command":"resume"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"command":"info"}"#)["state"], "running");
    std::thread::sleep(Duration::from_millis(300));
    let r1 = api.call(r#"{"command":"info"}"#)["cpu_time_ns"]
        .as_u64()
        .unwrap();
    assert!(
        r1 > p1 + 50_000_000,
        "resumed vCPU should spin again: {p1} -> {r1}"
    );

    // Garbage gets an error answer and the VMM keeps serving.
    for bad in ["nonsense", r#"{"command":"explode"}"#, "{}"] {
        let a = api.call(bad);
        assert_eq!(a["ok"], false, "{bad} -> {a}");
        assert!(a["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    // Every VMM thread runs under seccomp (mode 2 = filter).
    let pid = vmm.child.id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert!(tasks.len() >= 3, "main + 2 vCPU threads");
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')),
            "thread {:?} not filtered:\n{status}",
            t.file_name()
        );
    }

    assert_eq!(api.call(r#"{"command":"destroy"}"#)["ok"], true);
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "destroyed");
    assert!(exit["boot_time_us"].as_u64().is_some());
    assert!(
        !vmm.api.exists() && !vmm.console_socket.exists(),
        "sockets removed"
    );
}

#[test]
fn console_socket_fans_out_and_feeds_the_guest() {
    if !kvm_available("console_socket_fans_out_and_feeds_the_guest") {
        return;
    }
    // Echo whatever arrives on COM1; power off on 'q'.
    let code = Asm::new()
        .print("ECHO-READY\n")
        .label("poll")
        .mov_dx(0x3fd)
        .in_al_dx()
        .test_al(1)
        .jz("poll")
        .mov_dx(0x3f8)
        .in_al_dx()
        .out_dx_al()
        .cmp_al(b'q')
        .jnz("poll")
        .power_off()
        .halt_forever()
        .finish();
    let mut vmm = Vmm::start_image("echo", &elf(&code, false), Opts::default());
    vmm.wait_console("ECHO-READY", 1, T);
    let mut a = console_client(&vmm.console_socket);
    let mut b = console_client(&vmm.console_socket);
    // Let the VMM register both clients before the guest answers.
    std::thread::sleep(Duration::from_millis(200));
    // Far more than the 16550's 64-byte FIFO: the VMM holds the rest until
    // the guest has read what came before.
    // Digits only: the guest powers off on 'q'.
    let long: String = (0..900)
        .map(|i| char::from(b'0' + (i % 10) as u8))
        .collect();
    let text = format!("hello from a {long} END");
    a.write_all(text.as_bytes()).unwrap();
    let got_a = read_until(&mut a, "END", T);
    let got_b = read_until(&mut b, "END", T);
    assert!(got_a.contains(&text), "{got_a:?}");
    assert!(
        got_b.contains(&text),
        "second client sees the echo too: {got_b:?}"
    );
    b.write_all(b"q").unwrap();
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "poweroff");
    assert!(
        vmm.console().contains(&format!("{text}q")),
        "{}",
        vmm.console()
    );
}

/// Polls the i8042 and powers off when the last byte of Ctrl-Alt-Del
/// (set 2: ... 0xE0 0x71) arrives.
fn ctrl_alt_del_guest() -> Vec<u8> {
    Asm::new()
        .print("KBD-READY\n")
        .label("poll")
        .mov_dx(0x64)
        .in_al_dx()
        .test_al(1)
        .jz("poll")
        .mov_dx(0x60)
        .in_al_dx()
        .cmp_al(0x71)
        .jnz("poll")
        .print("CTRL-ALT-DEL\n")
        .power_off()
        .halt_forever()
        .finish()
}

#[test]
fn shutdown_sends_ctrl_alt_del_and_guest_powers_off() {
    if !kvm_available("shutdown_sends_ctrl_alt_del_and_guest_powers_off") {
        return;
    }
    let mut vmm = Vmm::start_image("cad", &elf(&ctrl_alt_del_guest(), false), Opts::default());
    vmm.wait_console("KBD-READY", 1, T);
    let mut api = vmm.connect_api();
    assert_eq!(
        api.call(r#"{"command":"shutdown","timeout_seconds":30}"#)["ok"],
        true
    );
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "poweroff", "{exit}");
    assert!(vmm.console().contains("CTRL-ALT-DEL"));
}

#[test]
fn shutdown_of_a_deaf_guest_destroys_it_after_the_timeout() {
    if !kvm_available("shutdown_of_a_deaf_guest_destroys_it_after_the_timeout") {
        return;
    }
    let mut vmm = Vmm::start_image("deaf", &elf(&spinning_guest(), false), Opts::default());
    vmm.wait_console("READY", 1, T);
    let mut api = vmm.connect_api();
    let asked = std::time::Instant::now();
    assert_eq!(
        api.call(r#"{"command":"shutdown","timeout_seconds":1}"#)["ok"],
        true
    );
    assert_eq!(api.call(r#"{"command":"info"}"#)["state"], "shutting-down");
    let (status, exit) = vmm.wait_exit(T);
    assert!(asked.elapsed() >= Duration::from_secs(1));
    assert!(status.success());
    assert_eq!(exit["reason"], "destroyed", "{exit}");
}

fn rebooting_guest() -> Vec<u8> {
    Asm::new()
        .print("BOOTED\n")
        .i8042_reset()
        .halt_forever()
        .finish()
}

#[test]
fn guest_reboot_with_on_reboot_destroy_exits_with_reason_reboot() {
    if !kvm_available("guest_reboot_with_on_reboot_destroy_exits_with_reason_reboot") {
        return;
    }
    let opts = Opts {
        extra: vec!["--on-reboot", "destroy"],
        ..Opts::default()
    };
    let mut vmm = Vmm::start_image("reboot-destroy", &elf(&rebooting_guest(), false), opts);
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "reboot", "{exit}");
    assert_eq!(vmm.console().matches("BOOTED").count(), 1);
}

#[test]
fn guest_reboot_restarts_in_place_and_api_reset_too() {
    if !kvm_available("guest_reboot_restarts_in_place_and_api_reset_too") {
        return;
    }
    // A guest that reboots once per boot would loop forever; use a guest that
    // reboots through the power device's reset value only if a byte it
    // stored in RAM is absent — RAM is zeroed by the reset, so it reboots on
    // every boot; we count boots and then destroy it.
    let opts = Opts {
        vcpus: 2,
        ..Opts::default()
    };
    let code = Asm::new()
        .print("BOOTED\n")
        .mov_dx(0x600)
        .mov_al(1)
        .out_dx_al()
        .halt_forever()
        .finish();
    let mut vmm = Vmm::start_image("reboot-restart", &elf(&code, false), opts);
    vmm.wait_console("BOOTED", 3, T);
    let mut api = vmm.connect_api();
    assert_eq!(api.call(r#"{"command":"info"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"command":"destroy"}"#)["ok"], true);
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "destroyed");
    let pid_same = vmm.stderr().matches("resetting the machine").count();
    assert!(
        pid_same >= 2,
        "reset in place, same process:\n{}",
        vmm.stderr()
    );

    // The API's reset on a guest that does not reboot by itself.
    let code = Asm::new()
        .print("BOOTED\n")
        .store_byte(0x5000, 0xAB)
        .halt_forever()
        .finish();
    let mut vmm = Vmm::start_image("api-reset", &elf(&code, false), Opts::default());
    vmm.wait_console("BOOTED", 1, T);
    let mut api = vmm.connect_api();
    assert_eq!(api.call(r#"{"command":"reset"}"#)["ok"], true);
    vmm.wait_console("BOOTED", 2, T);
    assert_eq!(api.call(r#"{"command":"reset"}"#)["ok"], true);
    vmm.wait_console("BOOTED", 3, T);
    assert_eq!(api.call(r#"{"command":"info"}"#)["state"], "running");
    assert_eq!(api.call(r#"{"command":"destroy"}"#)["ok"], true);
    let (_, exit) = vmm.wait_exit(T);
    assert_eq!(exit["reason"], "destroyed");
}

#[test]
fn unknown_port_and_mmio_accesses_are_ignored() {
    if !kvm_available("unknown_port_and_mmio_accesses_are_ignored") {
        return;
    }
    let mut a = Asm::new();
    a.mov_dx(0x1234).mov_al(0x55).out_dx_al().in_al_dx();
    // Unclaimed MMIO in the gap, and a virtio slot with no device.
    a.store_byte(0xD000_0000, 1).load_byte(0xD000_0000);
    a.store_byte(0xFEB0_0000, 1).load_byte(0xFEB0_0000);
    // The boot timer with a wrong value, and the power register with junk.
    a.store_byte(0xC000_0000, 7);
    a.mov_dx(0x600).mov_al(0x99).out_dx_al();
    a.print("SURVIVED\n").power_off().halt_forever();
    let mut vmm = Vmm::start_image("unknown", &elf(&a.finish(), false), Opts::default());
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success());
    assert_eq!(exit["reason"], "poweroff");
    assert!(
        exit["boot_time_us"].is_null(),
        "a wrong boot-timer byte is not a boot: {exit}"
    );
    assert!(vmm.console().contains("SURVIVED"));
    let stderr = vmm.stderr();
    assert!(stderr.contains("no device claims"), "{stderr}");
    assert!(
        stderr.contains("0x1234") && stderr.contains("0xd0000000"),
        "{stderr}"
    );
}

#[test]
fn start_errors_are_reported_in_the_exit_file() {
    let dir = TempDir::new("bad-kernel");
    let kernel = dir.0.join("garbage");
    std::fs::write(&kernel, vec![0x5au8; 8192]).unwrap();
    let mut vmm = Vmm::start(
        "bad-kernel",
        Opts {
            kernel: &kernel,
            ..Opts::default()
        },
    );
    let (status, exit) = vmm.wait_exit(T);
    assert_eq!(status.code(), Some(1));
    assert_eq!(exit["reason"], "crashed");
    let detail = exit["detail"].as_str().unwrap();
    if vireo_vmm::probe::probe() != vireo_vmm::probe::KvmKind::Absent {
        assert!(detail.contains("neither an ELF nor a bzImage"), "{detail}");
    }
    assert!(vmm.stderr().contains(detail.lines().next().unwrap_or("")));

    // An unknown --cpuid-hide name is refused before anything runs.
    let image = dir.0.join("ok.elf");
    std::fs::write(&image, elf(&hello_guest("X"), false)).unwrap();
    let mut vmm = Vmm::start(
        "bad-cpuid",
        Opts {
            kernel: &image,
            extra: vec!["--cpuid-hide", "cx16,warp-drive"],
            ..Opts::default()
        },
    );
    let (status, exit) = vmm.wait_exit(T);
    assert_eq!(status.code(), Some(1));
    assert!(
        exit["detail"].as_str().unwrap().contains("warp-drive"),
        "{exit}"
    );
}

#[test]
fn cpuid_hide_is_what_the_guest_sees() {
    if !kvm_available("cpuid_hide_is_what_the_guest_sees") {
        return;
    }
    // cpuid leaf 1; print '1' if ECX bit 13 (CX16) is set, else '0'.
    // mov eax,1 ; xor ecx,ecx ; cpuid ; bt ecx,13 ; setc al ; add al,'0' ; out
    let probe = |hide: Option<&str>| -> char {
        let mut a = Asm::new();
        a.print("CX16=");
        let mut code = a.finish();
        code.extend_from_slice(&[
            0xB8, 1, 0, 0, 0, // mov eax, 1
            0x31, 0xC9, // xor ecx, ecx
            0x0F, 0xA2, // cpuid
            0x0F, 0xBA, 0xE1, 13, // bt ecx, 13
            0x0F, 0x92, 0xC0, // setc al
            0x04, b'0', // add al, '0'
            0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
            0xEE, // out dx, al
        ]);
        code.extend(Asm::new().print("\n").power_off().halt_forever().finish());
        let opts = Opts {
            extra: hide.map(|h| vec!["--cpuid-hide", h]).unwrap_or_default(),
            ..Opts::default()
        };
        let mut vmm = Vmm::start_image("cpuid", &elf(&code, false), opts);
        let (_, exit) = vmm.wait_exit(T);
        assert_eq!(exit["reason"], "poweroff");
        let c = vmm.console();
        c.split("CX16=")
            .nth(1)
            .and_then(|s| s.chars().next())
            .unwrap_or('?')
    };
    assert_eq!(probe(Some("cx16")), '0');
    let host_has_cx16 = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .split_whitespace()
        .any(|f| f == "cx16");
    if host_has_cx16 {
        assert_eq!(
            probe(None),
            '1',
            "without --cpuid-hide the guest sees the host's CX16"
        );
    }
}
