//! virsh's everyday commands as `vireo` runs them: edit, event, desc, the
//! list filters, and the same commands through an agent's socket.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vireo_with(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vireo"));
    cmd.args(args)
        .env("VIREO_DEFAULT_URI", "test:///default")
        .env_remove("VISUAL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("vireo runs");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("vireo finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn edit_applies_a_changed_manifest_and_nothing_else() {
    // Unchanged: nothing to do.
    let out = vireo_with(&["edit", "test"], "", &[("EDITOR", "true")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "Domain 'test' manifest not changed."
    );

    // A valid change is defined: the running domain takes it at its next start.
    let session = "edit test\ndestroy test\nvcpucount test\n";
    let out = vireo_with(
        &[],
        session,
        &[(
            "EDITOR",
            "sed -i 's/^  vcpus: 2$/  vcpus: 1\\n  maxVcpus: 2/'",
        )],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("Domain 'test' manifest edited."),
        "{stdout}"
    );
    assert!(
        stdout.contains("maximum      config         2\ncurrent      config         1"),
        "{stdout}"
    );

    // An invalid edit is refused whole, and the definition stays.
    let session = "edit test\nvcpucount test --config\n";
    let out = vireo_with(
        &[],
        session,
        &[("EDITOR", "sed -i 's/^  vcpus: 2$/  vcpus: lots/'")],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success());
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(stdout.trim(), "2", "{stdout}");

    // Renaming is refused.
    let out = vireo_with(
        &["edit", "test"],
        "",
        &[("EDITOR", "sed -i 's/^  name: test$/  name: other/'")],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot rename"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn edit_xml_applies_libvirt_xml() {
    let session = "edit test --xml\ndestroy test\ndominfo test\n";
    let out = vireo_with(
        &[],
        session,
        &[(
            "EDITOR",
            "sed -i 's/<currentMemory unit=.KiB.>[0-9]*</<currentMemory unit=\"KiB\">1048576</'",
        )],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("Domain 'test' XML configuration edited."),
        "{stdout}"
    );
    assert!(stdout.contains("Used memory:    1048576 KiB"), "{stdout}");
}

#[test]
fn desc_and_list_title_and_filters() {
    let session = "desc test --title --new-desc 'Test guest'\nlist --title\n\
        destroy test\nlist --state-shutoff --name\nlist --name\nlist --transient --all\n\
        list --all --persistent --uuid --name\n";
    let out = vireo_with(&[], session, &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("Domain title updated successfully"),
        "{stdout}"
    );
    assert!(
        stdout.contains(" Id   Name   State     Title\n-----------------------------------\n 1    test   running   Test guest\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("test\n\n Id   Name   State\n--------------------\n"),
        "shut-off filter finds test, --name alone lists nothing running, no transient domain: {stdout}"
    );
    assert!(
        stdout.contains("6695eb01-f6a4-8304-79aa-97f2502e193f test"),
        "{stdout}"
    );
}

#[test]
fn setmem_without_config_is_refused_on_a_shut_off_domain() {
    let session = "destroy test\nsetmem test 1G\nsetmem test 1G --config\ndominfo test\n";
    let out = vireo_with(&[], session, &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success());
    assert!(stderr.contains("domain 'test' is not running"), "{stderr}");
    assert!(stdout.contains("Used memory:    1048576 KiB"), "{stdout}");
}

/// `event --loop` through an agent's local API (here served by this test
/// on the default test node): each change of state becomes one line.
#[test]
fn event_loop_reports_changes_made_through_the_socket() {
    let dir = std::env::temp_dir().join(format!("vireo-event-{}", std::process::id()));
    let sock = dir.join("vireo.sock");
    let conn = vireo_drivers::open("test:///default").expect("test node");
    vireo_drivers::remote::serve(conn.clone(), &sock).expect("serve");
    let uri = format!("vireo+unix://{}", sock.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["-c", &uri, "event", "--loop", "--timeout", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vireo event runs");
    let stdout = child.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(3)
            .collect::<Vec<_>>()
    });
    // Let the first look happen, then change the domain, one step at a time.
    std::thread::sleep(Duration::from_millis(700));
    let hv = conn.hypervisor();
    hv.suspend_domain("test").expect("suspend");
    std::thread::sleep(Duration::from_millis(500));
    hv.resume_domain("test").expect("resume");
    std::thread::sleep(Duration::from_millis(500));
    hv.destroy_domain("test").expect("destroy");
    let start = Instant::now();
    while !lines.is_finished() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let got = lines.join().expect("reader");
    assert_eq!(
        got,
        [
            "event 'lifecycle' for domain 'test': Suspended Paused",
            "event 'lifecycle' for domain 'test': Resumed Unpaused",
            "event 'lifecycle' for domain 'test': Stopped Destroyed",
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn new_commands_work_through_an_agent_socket() {
    let dir = std::env::temp_dir().join(format!("vireo-sock-{}", std::process::id()));
    let sock = dir.join("vireo.sock");
    let conn = vireo_drivers::open("test:///default").expect("test node");
    vireo_drivers::remote::serve(conn, &sock).expect("serve");
    let uri = format!("vireo+unix://{}", sock.display());
    let session = "dominfo test\nschedinfo test\ndomifstat test testnet0\nfreecell --all\n\
        desc test --new-desc hi\ndesc test\ndestroy test\nsetmem test 1G\n";
    let out = vireo_with(&["-c", &uri], session, &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stdout.contains("Security label: libvirt-test (enforcing)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Scheduler      : fair\nweight         : 50"),
        "{stdout}"
    );
    assert!(stdout.contains("testnet0 rx_bytes "), "{stdout}");
    assert!(stdout.contains("Total:       6144 KiB"), "{stdout}");
    assert!(
        stdout.contains("Domain description updated successfully\nhi\n"),
        "{stdout}"
    );
    assert!(stderr.contains("is not running"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
