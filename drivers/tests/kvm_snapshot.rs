//! Snapshots under the kvm driver (vireo-vmm), with the test guest printing
//! a counter twice a second (`vireo.counter=1`) and a raw disk: a full
//! snapshot keeps vireo-vmm's snapshot and a sparse copy of the disk; a
//! revert brings back both: the counter goes on from where it was, the
//! guest does not boot again, and a change made to the disk after the
//! snapshot is gone.
//!
//! Without /dev/kvm this test fails when `CI` is set, and otherwise prints
//! a SKIP line and returns.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    console_log, expect_state, fresh_root, kvm_available, log_text, numbers_after, say,
    test_guest_domain, yaml,
};
use vireo_crds::{DomainReason, DomainState};
use vireo_drivers::StorageDriver;
use vireo_drivers::snapshot::{RevertTo, SnapshotParams, SnapshotState};

const MARKER: &str = "VIREO-TEST-GUEST-READY";
const WAIT: Duration = Duration::from_secs(60);
const TICK: &str = "VIREO-TEST counter ";

fn ticks_after(log: &Path, from: usize) -> Vec<u64> {
    numbers_after(log, from, TICK)
}

fn wait_ticks(log: &Path, from: usize, ok: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let ticks = ticks_after(log, from);
        if ok(&ticks) {
            return ticks;
        }
        assert!(
            start.elapsed() < WAIT,
            "the counter after byte {from} is {ticks:?}, not what the test waits for; console:\n{}",
            log_text(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sector1(path: &str) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("opens the disk");
    let mut buf = vec![0u8; 17];
    f.read_exact_at(&mut buf, 512).expect("reads sector 1");
    buf
}

#[test]
fn kvm_snapshot_brings_back_memory_and_the_raw_disk() {
    if !kvm_available("kvm_snapshot_brings_back_memory_and_the_raw_disk") {
        return;
    }
    common::vmm_binary();
    let root = fresh_root("kvm-snap");
    let (storage, _) = common::started_pool(&root);
    let vol: vireo_crds::StorageVol = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: d}\nspec: {pool: p, capacity: 1Mi, format: raw}\n",
    );
    storage.create_volume(&vol).expect("volume");
    let disk = storage.volume_info("p", "d").expect("vol").path;
    let networks = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let conn = vireo_drivers::kvm::open_with(
        &format!("kvm:///embed?root={}", root.display()),
        &format!("/embed?root={}", root.display()),
        networks,
        storage.clone(),
    )
    .expect("opens kvm:///embed with the dir backend");
    let hv = conn.hypervisor();
    let name = "snapper";
    let mut d = test_guest_domain(name, "vireo.counter=1");
    d.spec.devices.disks = vec![vireo_crds::Disk {
        name: "vda".into(),
        volume: "d".into(),
        ..Default::default()
    }];
    hv.define_domain(&d).expect("define");
    hv.start_domain(name).expect("start");
    let log = console_log(&root, &conn, name);
    wait_ticks(&log, 0, |t| t.len() >= 3);
    assert!(
        log_text(&log).contains("blk0: capacity=2048 write=ok"),
        "the guest wrote its disk: {}",
        log_text(&log)
    );
    assert_eq!(sector1(&disk), b"VIREO-TEST-SECTOR");

    let t = Instant::now();
    let s = hv
        .snapshot_create(
            name,
            &SnapshotParams {
                name: Some("s1".into()),
                description: Some("counting".into()),
                disk_only: false,
            },
        )
        .expect("snapshot");
    say(&format!(
        "kvm full snapshot (32 MiB guest, 1 MiB disk): {:?}",
        t.elapsed()
    ));
    assert_eq!((s.state, s.memory), (SnapshotState::Running, true));
    assert_eq!(s.disks.len(), 1);
    assert_eq!(s.disks[0].location, "copy");
    expect_state(&conn, name, DomainState::Running, DomainReason::Booted);
    let last = *ticks_after(&log, 0).last().expect("ticks");
    // The disk changes after the snapshot; the guest counts on.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.write_all_at(b"CHANGED-AFTERWARD", 512))
        .expect("writes the disk");
    wait_ticks(&log, 0, |t| t.last().is_some_and(|l| *l >= last + 3));

    let markers = log_text(&log).matches(MARKER).count();
    let mark = log_text(&log).len();
    let t = Instant::now();
    hv.snapshot_revert(name, "s1", RevertTo::Snapshot)
        .expect("revert");
    say(&format!("kvm revert to a full snapshot: {:?}", t.elapsed()));
    expect_state(
        &conn,
        name,
        DomainState::Running,
        DomainReason::FromSnapshot,
    );
    assert_eq!(
        sector1(&disk),
        b"VIREO-TEST-SECTOR",
        "the disk is back as it was at the snapshot"
    );
    let after = wait_ticks(&log, mark, |t| {
        t.windows(2).any(|w| w == [last + 1, last + 2])
    });
    assert!(!after.contains(&1), "the guest booted again: {after:?}");
    assert_eq!(
        log_text(&log).matches(MARKER).count(),
        markers,
        "the guest booted again after the revert"
    );

    hv.snapshot_delete(name, "s1").expect("delete");
    assert!(hv.snapshot_list(name).expect("list").is_empty());
    hv.destroy_domain(name).expect("destroy");
    hv.undefine_domain(name).expect("undefine");
    let _ = std::fs::remove_dir_all(&root);
}
