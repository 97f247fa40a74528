//! Save, restore and managed save under the kvm driver (vireo-vmm and its
//! own snapshot format inside the Vireo save file), with the test guest
//! printing a counter twice a second (`vireo.counter=1`): it keeps counting
//! from where it was after a restore, the guest does not boot again, and a
//! file that does not match is refused with nothing changed.
//!
//! Without /dev/kvm these tests fail when `CI` is set, and otherwise print
//! a SKIP line and return.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    console_log, expect_state, fresh_root, kvm_available, log_text, numbers_after, say,
    test_guest_domain,
};
use vireo_crds::{DomainReason, DomainState};
use vireo_drivers::{Connection, Error, Lookup};

const MARKER: &str = "VIREO-TEST-GUEST-READY";
const WAIT: Duration = Duration::from_secs(60);
const COUNTER: &str = "vireo.counter=1";
const TICK: &str = "VIREO-TEST counter ";

/// The counter values printed after byte `from` of the console log.
fn ticks_after(log: &Path, from: usize) -> Vec<u64> {
    numbers_after(log, from, TICK)
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

fn vmm_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("vireo-vmm"))
        .unwrap_or(false)
}

/// Whether a vireo-vmm process with this control socket is running.
fn vmm_with(api: &Path) -> bool {
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
fn kvm_save_restore_and_managed_save_keep_the_guest_running_where_it_was() {
    if !kvm_available("kvm_save_restore_and_managed_save_keep_the_guest_running_where_it_was") {
        return;
    }
    common::vmm_binary();
    let root = fresh_root("kvm-save");
    let conn = vireo_drivers::open(&format!("kvm:///embed?root={}", root.display()))
        .expect("opens kvm:///embed");
    let hv = conn.hypervisor();
    let name = "saver";
    hv.define_domain(&test_guest_domain(name, COUNTER))
        .expect("define");
    hv.start_domain(name).expect("start");
    let log = console_log(&root, &conn, name);
    wait_ticks(&log, 0, 3);
    let pid = pid_of(&conn, &root, name);

    // Save: shut off (saved), vireo-vmm gone, the file there.
    let file = root.join("saver.save");
    let t = Instant::now();
    hv.save_domain(name, &file).expect("save");
    say(&format!(
        "kvm save: {:?}, {} bytes",
        t.elapsed(),
        std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0)
    ));
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    assert!(
        !vmm_alive(pid),
        "vireo-vmm {pid} is still there after the save"
    );
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

    // A well-formed save file whose snapshot vireo-vmm refuses: it is
    // started, says why, and is gone; the domain is as it was.
    let unloadable = root.join("unloadable.save");
    let (header, _) = vireo_drivers::save::read(&file).expect("reads");
    let w = vireo_drivers::save::Writer::create(&unloadable, header).expect("creates");
    w.append(&[0x5a; 4096]).expect("appends");
    w.finish().expect("finishes");
    let e = hv
        .restore_domain(&unloadable)
        .expect_err("vireo-vmm cannot load it");
    say(&format!("kvm restore of an unloadable stream: {e}"));
    assert!(e.to_string().contains("not a vireo-vmm snapshot"), "{e}");
    // A damaged snapshot inside a good header (the Vireo header's own
    // checksum recomputed): vireo-vmm's checksum refuses it.
    let damaged = root.join("damaged.save");
    let (header, offset) = vireo_drivers::save::read(&file).expect("reads");
    let mut inner = std::fs::read(&file).expect("reads")[offset as usize..].to_vec();
    let mid = inner.len() / 2;
    inner[mid] ^= 1;
    let w = vireo_drivers::save::Writer::create(&damaged, header).expect("creates");
    w.append(&inner).expect("appends");
    w.finish().expect("finishes");
    let e = hv.restore_domain(&damaged).expect_err("damaged snapshot");
    say(&format!("kvm restore of a damaged snapshot: {e}"));
    assert!(e.to_string().contains("checksum"), "{e}");
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    expect_state(&conn, name, DomainState::Shutoff, DomainReason::Saved);
    let api = console_log(&root, &conn, name).with_file_name("api.sock");
    assert!(
        !vmm_with(&api),
        "a vireo-vmm of the failed restore is left running"
    );

    // Restore: running (restored), the counter goes on, no second boot.
    let t = Instant::now();
    let restored = hv.restore_domain(&file).expect("restore");
    say(&format!("kvm restore: {:?}", t.elapsed()));
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

/// A guest that ejected a vCPU (`setvcpus` 1 of 2) is saved and restored:
/// vireo-vmm is started with the snapshot's two vCPUs (the live definition
/// counts one), the ejected one stays out, and the counter goes on.
#[test]
fn kvm_restore_keeps_an_unplugged_vcpu_out() {
    if !kvm_available("kvm_restore_keeps_an_unplugged_vcpu_out") {
        return;
    }
    common::vmm_binary();
    let root = fresh_root("kvm-save-vcpus");
    let conn = vireo_drivers::open(&format!("kvm:///embed?root={}", root.display()))
        .expect("opens kvm:///embed");
    let hv = conn.hypervisor();
    let name = "unplugged";
    let mut d = test_guest_domain(name, COUNTER);
    d.spec.vcpus = 2;
    d.spec.max_vcpus = Some(2);
    hv.define_domain(&d).expect("define");
    hv.start_domain(name).expect("start");
    let log = console_log(&root, &conn, name);
    wait_ticks(&log, 0, 1);
    hv.set_domain_vcpus(name, 1).expect("setvcpus 1");
    let start = Instant::now();
    while hv.domain_info(name).expect("info").vcpus != 1 {
        assert!(start.elapsed() < WAIT, "the guest did not eject vCPU 1");
        std::thread::sleep(Duration::from_millis(50));
    }
    let file = root.join("unplugged.save");
    hv.save_domain(name, &file).expect("save");
    let last = *ticks_after(&log, 0).last().expect("ticks");
    let mark = log_text(&log).len();
    hv.restore_domain(&file)
        .expect("restore with the snapshot's vCPUs");
    expect_state(&conn, name, DomainState::Running, DomainReason::Restored);
    assert_eq!(hv.domain_info(name).expect("info").vcpus, 1);
    let after = wait_ticks(&log, mark, 1);
    assert_eq!(after[0], last + 1, "counter {last} then {after:?}");
    hv.destroy_domain(name).expect("destroy");
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}
