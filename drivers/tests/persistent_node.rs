//! `test:///DIR/`: a test node that outlives the process that opened it.

use std::sync::atomic::{AtomicUsize, Ordering};

use vireo_crds::{DomainReason, DomainState};
use vireo_drivers::{ListFilter, Lookup};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory per connection, under the system's temp dir.
fn fresh_dir() -> std::path::PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vireo-test-node-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn open(dir: &std::path::Path) -> vireo_drivers::Connection {
    vireo_drivers::open(&format!("test://{}/", dir.display())).expect("opens")
}

// The whole conformance suite, unchanged, on a persistent node.
mod conformance {
    vireo_drivers::conformance_tests!(
        || super::open(&super::fresh_dir()),
        vireo_drivers::conformance::test_driver_fixture()
    );
}

#[test]
fn objects_and_ids_survive_a_reopen() {
    let dir = fresh_dir();
    let fx = vireo_drivers::conformance::test_driver_fixture();
    let (id, uuid) = {
        let conn = open(&dir);
        let hv = conn.hypervisor();
        hv.define_domain(&fx.domain("default/web")).expect("define");
        let r = hv.start_domain("default/web").expect("start");
        hv.define_domain(&fx.domain("default/idle"))
            .expect("define");
        hv.create_domain(&fx.domain("default/transient"))
            .expect("create");
        hv.suspend_domain("default/transient").expect("suspend");
        conn.network()
            .define_network(&fx.network("lan"))
            .expect("net");
        conn.network().start_network("lan").expect("net start");
        conn.storage().define_pool(&fx.pool("p")).expect("pool");
        (r.id, r.uuid)
    };
    let conn = open(&dir);
    let hv = conn.hypervisor();
    let web = hv
        .lookup_domain(Lookup::Name("default/web"))
        .expect("still there");
    assert_eq!(
        (web.id, web.uuid),
        (id, uuid),
        "same ID and UUID after a reopen"
    );
    assert_eq!(
        hv.domain_state("default/web").expect("state"),
        (DomainState::Running, DomainReason::Booted)
    );
    assert_eq!(
        hv.domain_state("default/transient").expect("state").0,
        DomainState::Paused
    );
    assert!(
        !hv.domain_is_persistent("default/transient")
            .expect("transient")
    );
    assert_eq!(hv.count_domains(ListFilter::Inactive).expect("count"), 1);
    assert!(conn.network().network_info("lan").expect("lan").active);
    assert_eq!(
        conn.storage()
            .count_pools(ListFilter::Inactive)
            .expect("pools"),
        1
    );

    // IDs keep increasing across reopens, and a stopped transient domain goes for good.
    hv.destroy_domain("default/transient").expect("destroy");
    let next = hv.start_domain("default/idle").expect("start");
    assert!(next.id > id, "{next:?} after {id:?}");
    drop(conn);
    let conn = open(&dir);
    assert!(
        conn.hypervisor()
            .lookup_domain(Lookup::Name("default/transient"))
            .is_err()
    );
    assert_eq!(
        conn.hypervisor()
            .lookup_domain(Lookup::Name("default/idle"))
            .expect("idle")
            .id,
        next.id
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_corrupt_state_file_is_a_clear_error() {
    let dir = fresh_dir();
    drop(open(&dir));
    std::fs::write(dir.join("domains").join("bad.json"), b"{not json").expect("write");
    let err = match vireo_drivers::open(&format!("test://{}/", dir.display())) {
        Ok(_) => panic!("a corrupt file must not load silently"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("bad.json"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
