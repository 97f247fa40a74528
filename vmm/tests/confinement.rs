//! The VMM's confinement (docs/vmm.md, "Confinement"): the seccomp filter
//! kills the process on a forbidden system call, and the jail leaves a
//! running VMM no capabilities, `no_new_privs`, and a root holding only its
//! run directory — while the guest still boots and is served.
//! Needs /dev/kvm, and root for the jail; says so and skips without them
//! (fails under CI).

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn ready_guest() -> Vec<u8> {
    Asm::new()
        .print("READY\n")
        .boot_timer()
        .halt_forever()
        .finish()
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
        .trim()
        .to_string()
}

#[test]
fn forbidden_syscall_kills_the_vmm_with_sigsys() {
    if !kvm_available("forbidden_syscall_kills_the_vmm_with_sigsys") {
        return;
    }
    let mut vmm = Vmm::start_image("sigsys", &elf(&ready_guest(), false), Opts::default());
    vmm.wait_console("READY", 1, T);
    // Served under the filter...
    assert_eq!(vmm.connect_api().call(r#"{"command":"info"}"#)["ok"], true);
    // ...until the event loop makes a call outside the allow-list (a debug
    // build's test hook: it opens /etc/hostname).
    vmm.send_api(r#"{"command":"debug-forbidden-syscall"}"#);
    let status = vmm.wait_status(T);
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "the VMM should die by SIGSYS, ended {status}\nstderr:\n{}",
        vmm.stderr()
    );
    assert!(
        !vmm.exit_file.exists(),
        "a killed VMM writes no exit file (the driver reads that as crashed)"
    );
}

#[test]
fn jailed_vmm_has_no_capabilities_and_sees_only_its_run_directory() {
    let test = "jailed_vmm_has_no_capabilities_and_sees_only_its_run_directory";
    if !kvm_available(test) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            test,
            "the jail needs root (a mount namespace and pivot_root)",
        );
        return;
    }
    let opts = Opts {
        extra: vec!["--jail"],
        ..Opts::default()
    };
    let mut vmm = Vmm::start_image("jail", &elf(&ready_guest(), false), opts);
    vmm.wait_console("READY", 1, T);
    let mut api = vmm.connect_api();
    assert_eq!(api.call(r#"{"command":"info"}"#)["ok"], true);
    let pid = vmm.child.id();
    let stderr = vmm.stderr();
    assert!(stderr.contains("jailed"), "{stderr}");

    // Every thread: no capabilities, no_new_privs, seccomp.
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
        let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        for (field, want) in [
            ("CapEff:", "0000000000000000"),
            ("CapPrm:", "0000000000000000"),
            ("CapInh:", "0000000000000000"),
            ("CapBnd:", "0000000000000000"),
            ("CapAmb:", "0000000000000000"),
            ("NoNewPrivs:", "1"),
            ("Seccomp:", "2"),
        ] {
            let got = st
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .map(str::trim);
            assert_eq!(got, Some(want), "thread {tid} {field}\n{st}");
        }
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // Its root is not the host's.
    let root = format!("/proc/{pid}/root");
    let host = std::fs::metadata("/").unwrap();
    let jail = std::fs::metadata(&root).unwrap();
    assert!(
        (jail.dev(), jail.ino()) != (host.dev(), host.ino()),
        "the VMM's root is the host's /"
    );
    // Its mount namespace is its own.
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    // What it can reach: the run directory's path and nothing else. A file
    // next to the run directory, and the host's /etc, are not there.
    let run_dir = vmm.dir.0.canonicalize().unwrap();
    let probe = run_dir.with_file_name(format!(
        "{}-outside",
        run_dir.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&probe, b"host secret").unwrap();
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let first = run_dir
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        top,
        vec![first],
        "the jail's root holds only the way to the run dir"
    );
    let inside = |p: &std::path::Path| format!("{root}{}", p.display());
    assert!(std::path::Path::new(&inside(&vmm.api)).exists());
    assert!(
        !std::path::Path::new(&inside(&probe)).exists(),
        "host file visible"
    );
    assert!(!std::path::Path::new(&format!("{root}/etc/passwd")).exists());
    assert!(!std::path::Path::new(&format!("{root}/dev/kvm")).exists());
    let siblings: Vec<_> = std::fs::read_dir(inside(run_dir.parent().unwrap()))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings, vec![run_dir.file_name().unwrap().to_owned()]);
    std::fs::remove_file(&probe).ok();

    // The guest is still served: pause/resume, console socket, destroy,
    // exit file renamed and sockets unlinked inside the jail.
    assert_eq!(api.call(r#"{"command":"pause"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"command":"resume"}"#)["ok"], true);
    let _client = console_client(&vmm.console_socket);
    assert_eq!(api.call(r#"{"command":"destroy"}"#)["ok"], true);
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success(), "{status}\n{}", vmm.stderr());
    assert_eq!(exit["reason"], "destroyed");
    assert!(!vmm.api.exists() && !vmm.console_socket.exists());
}

#[test]
fn vmm_runs_as_an_unprivileged_user_when_asked() {
    let test = "vmm_runs_as_an_unprivileged_user_when_asked";
    if !kvm_available(test) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "switching users needs root");
        return;
    }
    let opts = Opts {
        extra: vec!["--jail", "--uid", "65534", "--gid", "65534"],
        ..Opts::default()
    };
    let mut vmm = Vmm::start_image("uid", &elf(&ready_guest(), false), opts);
    vmm.wait_console("READY", 1, T);
    let mut api = vmm.connect_api();
    let pid = vmm.child.id();
    let uids = status_field(pid, "Uid");
    assert_eq!(
        uids.split_whitespace().collect::<Vec<_>>(),
        vec!["65534"; 4],
        "{uids}"
    );
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(api.call(r#"{"command":"destroy"}"#)["ok"], true);
    let (status, exit) = vmm.wait_exit(T);
    assert!(status.success(), "{status}\n{}", vmm.stderr());
    assert_eq!(exit["reason"], "destroyed");
    assert!(
        !vmm.api.exists(),
        "the unprivileged VMM removed its sockets"
    );
}
