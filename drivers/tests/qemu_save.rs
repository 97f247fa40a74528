//! Save, restore and managed save under the qemu driver, with the real
//! Linux guest under TCG: a counter the guest prints on its console once a
//! second keeps counting from where it was after a restore, the guest does
//! not boot again, and a file that does not match is refused with nothing
//! changed.
//!
//! Without `qemu-system-x86_64` these tests fail when `CI` is set, and
//! otherwise print a SKIP line and return.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    console_log, expect_state, fresh_root, linux_domain, log_text, numbers_after, open_qemu,
    qemu_available, say,
};
use vireo_crds::{DomainReason, DomainState};
use vireo_drivers::{Connection, Error, Lookup};

const MARKER: &str = "VIREO-GUEST-READY";
const WAIT: Duration = Duration::from_secs(60);
const COUNTER: &str =
    r#"vireo.net=0 vireo.run="i=0; while :; do i=$((i+1)); echo TICK-$i; sleep 1; done""#;

/// The counter values printed after byte `from` of the console log.
fn ticks_after(log: &Path, from: usize) -> Vec<u64> {
    numbers_after(log, from, "TICK-")
}

/// Waits until at least `n` ticks follow byte `from`; returns them.
fn wait_ticks(log: &Path, from: usize, n: usize) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let ticks = ticks_after(log, from);
        if ticks.len() >= n {
            return ticks;
        }
        assert!(
            start.elapsed() < WAIT,
            "the guest printed {} counter lines after byte {from}, not {n}; console:\n{}",
            ticks.len(),
            log_text(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("qemu"))
        .unwrap_or(false)
}

/// Whether a QEMU process with this control socket is running.
fn qemu_with(api: &Path) -> bool {
    let needle = api.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
}

fn pid_of(conn: &Connection, root: &Path, name: &str) -> u32 {
    std::fs::read_to_string(console_log(root, conn, name).with_file_name("pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

/// A copy of `from` whose header names another UUID (same name), with the
/// same state stream: a save of some other domain called the same.
fn foreign_copy(from: &Path, to: &Path) {
    let (mut header, offset) = vireo_drivers::save::read(from).expect("reads the save file");
    header.uuid = "00000000-0000-4000-8000-00000000beef".into();
    header.definition.spec.uuid = Some(header.uuid.clone());
    let bytes = std::fs::read(from).expect("reads");
    let w = vireo_drivers::save::Writer::create(to, header).expect("creates");
    w.append(&bytes[offset as usize..]).expect("appends");
    w.finish().expect("finishes");
}

#[test]
fn qemu_save_restore_and_managed_save_keep_the_guest_running_where_it_was() {
    if !qemu_available("qemu_save_restore_and_managed_save_keep_the_guest_running_where_it_was") {
        return;
    }
    let root = fresh_root("qemu-save");
    let conn = open_qemu(&root);
    let hv = conn.hypervisor();
    let name = "saver";
    hv.define_domain(&linux_domain(name, None, COUNTER))
        .expect("define");
    hv.start_domain(name).expect("start");
    let log = console_log(&root, &conn, name);
    wait_ticks(&log, 0, 3);
    let pid = pid_of(&conn, &root, name);

    // Save: shut off (saved), QEMU gone, the file there.
    let file = root.join("saver.save");
    let t = Instant::now();
    hv.save_domain(name, &file).expect("save");
    say(&format!(
        "qemu save: {:?}, {} bytes",
        t.elapsed(),
        std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0)
    ));
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    assert!(!qemu_alive(pid), "QEMU {pid} is still there after the save");
    let before = ticks_after(&log, 0);
    let last = *before.last().expect("ticks before the save");
    let mark = log_text(&log).len();

    // Files that do not match are refused; nothing changes.
    let truncated = root.join("truncated.save");
    let bytes = std::fs::read(&file).expect("reads");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("writes");
    let garbage = root.join("garbage.save");
    std::fs::write(&garbage, b"this is not a saved domain\n").expect("writes");
    let foreign = root.join("foreign.save");
    foreign_copy(&file, &foreign);
    for (bad, says) in [
        (&truncated, "truncated"),
        (&garbage, "not a Vireo saved-state file"),
        (&foreign, "uuid"),
    ] {
        let e = hv
            .restore_domain(bad)
            .expect_err("a file that does not match");
        assert!(
            matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains(says),
            "restore of {} should be refused saying '{says}': {e}",
            bad.display()
        );
        expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    }
    assert!(
        hv.lookup_domain(Lookup::Name("saver"))
            .expect("lookup")
            .id
            .is_none()
    );

    // A well-formed file whose stream QEMU cannot load: QEMU is started,
    // fails, and is gone; the domain is as it was.
    let unloadable = root.join("unloadable.save");
    let (header, _) = vireo_drivers::save::read(&file).expect("reads");
    let w = vireo_drivers::save::Writer::create(&unloadable, header).expect("creates");
    w.append(&[0x5a; 4096]).expect("appends");
    w.finish().expect("finishes");
    let e = hv
        .restore_domain(&unloadable)
        .expect_err("QEMU cannot load it");
    say(&format!("qemu restore of an unloadable stream: {e}"));
    assert!(
        matches!(e, Error::OperationFailed { .. }) && e.to_string().contains("restoring"),
        "{e}"
    );
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    let api = console_log(&root, &conn, name).with_file_name("api.sock");
    assert!(
        !qemu_with(&api),
        "a QEMU of the failed restore is left running"
    );

    // Restore: running (restored), the counter goes on, no second boot.
    let t = Instant::now();
    let restored = hv.restore_domain(&file).expect("restore");
    say(&format!("qemu restore: {:?}", t.elapsed()));
    assert!(restored.id.is_some());
    expect_state(&conn, name, DomainState::Running, DomainReason::Restored);
    let after = wait_ticks(&log, mark, 2);
    assert_eq!(
        after[0],
        last + 1,
        "the counter went on from {last}; after the restore it printed {after:?}"
    );
    assert_eq!(
        log_text(&log).matches(MARKER).count(),
        1,
        "the guest booted again"
    );

    // Managed save: the next start resumes it, and the image goes.
    hv.managed_save(name).expect("managedsave");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    assert!(hv.has_managed_save(name).expect("has"));
    let last = *ticks_after(&log, 0).last().expect("ticks");
    let mark = log_text(&log).len();
    hv.start_domain(name).expect("start resumes");
    expect_state(&conn, name, DomainState::Running, DomainReason::Restored);
    assert!(!hv.has_managed_save(name).expect("has"));
    let after = wait_ticks(&log, mark, 1);
    assert_eq!(
        after[0],
        last + 1,
        "managed save: counter {last} then {after:?}"
    );
    assert_eq!(
        log_text(&log).matches(MARKER).count(),
        1,
        "the guest booted again"
    );

    // Saved paused, restored paused; resume runs it on.
    hv.suspend_domain(name).expect("suspend");
    let paused_file = root.join("paused.save");
    hv.save_domain(name, &paused_file).expect("save paused");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    let last = *ticks_after(&log, 0).last().expect("ticks");
    let mark = log_text(&log).len();
    hv.restore_domain(&paused_file).expect("restore paused");
    expect_state(&conn, name, DomainState::Paused, DomainReason::User);
    hv.resume_domain(name).expect("resume");
    expect_state(&conn, name, DomainState::Running, DomainReason::Unpaused);
    let after = wait_ticks(&log, mark, 1);
    assert_eq!(
        after[0],
        last + 1,
        "paused save: counter {last} then {after:?}"
    );

    // managedsave-remove: the next start boots afresh.
    hv.managed_save(name).expect("managedsave");
    hv.managed_save_remove(name).expect("managedsave-remove");
    assert!(!hv.has_managed_save(name).expect("has"));
    hv.start_domain(name).expect("start boots");
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);
    let start = Instant::now();
    while log_text(&log).matches(MARKER).count() < 2 {
        assert!(start.elapsed() < WAIT, "no second boot marker");
        std::thread::sleep(Duration::from_millis(100));
    }
    hv.destroy_domain(name).expect("destroy");
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}
