//! Save, restore and managed save on the test driver, with libvirt's test
//! driver semantics: save stops the domain (shutoff, saved) and writes a
//! file; restore runs it again (running, restored) with its live sizes;
//! managedsave is resumed by the next start; files that do not match are
//! refused and nothing changes.

use std::path::PathBuf;

use vireo_crds::{DomainReason, DomainState};
use vireo_drivers::conformance::test_driver_fixture;
use vireo_drivers::{Connection, Error, HypervisorDriver, Lookup};

fn conn() -> Connection {
    vireo_drivers::open("test:///default").expect("test:///default")
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-tsave-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn state(hv: &dyn HypervisorDriver, name: &str) -> (DomainState, DomainReason) {
    hv.domain_state(name).expect("state")
}

#[test]
fn save_and_restore_keep_live_state_and_refuse_files_that_do_not_match() {
    let conn = conn();
    let hv = conn.hypervisor();
    let d = dir("save");
    let fx = test_driver_fixture();
    hv.define_domain(&fx.domain("sv")).expect("define");
    hv.start_domain("sv").expect("start");
    hv.set_domain_memory("sv", 512 << 20).expect("setmem");
    let file = d.join("sv.save");

    // Only an active domain saves.
    hv.define_domain(&fx.domain("idle")).expect("define");
    let e = hv.save_domain("idle", &file).expect_err("inactive");
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    assert!(!file.exists());

    hv.save_domain("sv", &file).expect("save");
    assert_eq!(state(hv, "sv"), (DomainState::Shutoff, DomainReason::Saved));
    assert!(
        hv.lookup_domain(Lookup::Name("sv"))
            .expect("lookup")
            .id
            .is_none()
    );

    // Truncated, garbage, and another domain's file of the same name.
    let bytes = std::fs::read(&file).expect("read");
    let truncated = d.join("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() - 2]).expect("write");
    let garbage = d.join("garbage");
    std::fs::write(&garbage, b"\x00\x01 not a save file").expect("write");
    let foreign = d.join("foreign");
    let (mut header, offset) = vireo_drivers::save::read(&file).expect("read header");
    header.uuid = "00000000-0000-4000-8000-0000000000aa".into();
    let w = vireo_drivers::save::Writer::create(&foreign, header).expect("create");
    w.append(&bytes[offset as usize..]).expect("append");
    w.finish().expect("finish");
    let missing = d.join("missing");
    for (bad, says) in [
        (&truncated, "truncated"),
        (&garbage, "not a Vireo saved-state file"),
        (&foreign, "uuid"),
        (&missing, "No such file"),
    ] {
        let e = hv.restore_domain(bad).expect_err("refused");
        assert!(e.to_string().contains(says), "{}: {e}", bad.display());
        assert_eq!(state(hv, "sv"), (DomainState::Shutoff, DomainReason::Saved));
    }

    let r = hv.restore_domain(&file).expect("restore");
    assert!(r.id.is_some());
    assert_eq!(
        state(hv, "sv"),
        (DomainState::Running, DomainReason::Restored)
    );
    assert_eq!(hv.domain_info("sv").expect("info").memory.0, "512Mi");
    // An active domain cannot be restored over.
    let e = hv.restore_domain(&file).expect_err("active");
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    assert!(hv.domain_is_persistent("sv").expect("persistent"));
}

#[test]
fn paused_and_transient_domains() {
    let conn = conn();
    let hv = conn.hypervisor();
    let d = dir("transient");
    let fx = test_driver_fixture();
    hv.create_domain(&fx.domain("tr")).expect("create");
    hv.suspend_domain("tr").expect("suspend");
    let file = d.join("tr.save");
    hv.save_domain("tr", &file).expect("save");
    // A saved transient domain is gone until restored.
    assert!(matches!(
        hv.lookup_domain(Lookup::Name("tr")),
        Err(Error::NotFound(_))
    ));
    let e = hv.managed_save("test").map(|_| ()).err();
    // libvirt's default node domain `test` is persistent: managed save works.
    assert!(e.is_none(), "{e:?}");
    hv.restore_domain(&file).expect("restore");
    // Saved paused, restored paused; still transient.
    assert_eq!(state(hv, "tr"), (DomainState::Paused, DomainReason::User));
    assert!(!hv.domain_is_persistent("tr").expect("persistent"));
    let e = hv.managed_save("tr").expect_err("transient");
    assert!(e.to_string().contains("transient"), "{e}");
}

#[test]
fn managed_save_is_resumed_by_start_or_removed() {
    let conn = conn();
    let hv = conn.hypervisor();
    let fx = test_driver_fixture();
    hv.define_domain(&fx.domain("ms")).expect("define");
    hv.start_domain("ms").expect("start");
    assert!(!hv.has_managed_save("ms").expect("has"));
    hv.managed_save("ms").expect("managedsave");
    assert_eq!(state(hv, "ms"), (DomainState::Shutoff, DomainReason::Saved));
    assert!(hv.has_managed_save("ms").expect("has"));
    hv.start_domain("ms").expect("start");
    assert_eq!(
        state(hv, "ms"),
        (DomainState::Running, DomainReason::Restored)
    );
    assert!(!hv.has_managed_save("ms").expect("has"));

    hv.managed_save("ms").expect("managedsave");
    hv.managed_save_remove("ms").expect("remove");
    assert!(!hv.has_managed_save("ms").expect("has"));
    hv.start_domain("ms").expect("start");
    assert_eq!(
        state(hv, "ms"),
        (DomainState::Running, DomainReason::Booted)
    );
    // Only a running domain is saved.
    hv.destroy_domain("ms").expect("destroy");
    let e = hv.managed_save("ms").expect_err("inactive");
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
}

/// The calls travel the node's local API socket (`vireo+unix://`) and the
/// node's driver list, as the CLI beside an agent makes them.
#[test]
fn save_restore_and_managed_save_through_the_node_socket() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use vireo_crds::DomainType;
    use vireo_drivers::node::NodeHypervisor;

    let t = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let inner = Connection::new("test:///default", t.clone(), t.clone(), t.clone());
    let node = NodeHypervisor::new(BTreeMap::from([(DomainType::Test, inner)])).expect("node");
    let served = Connection::new("node", Arc::new(node), t.clone(), t);
    let d = dir("socket");
    let sock = d.join("api.sock");
    vireo_drivers::remote::serve(served, &sock).expect("serves");
    let conn = vireo_drivers::open(&format!("vireo+unix://{}", sock.display())).expect("connects");
    let hv = conn.hypervisor();

    let file = d.join("test.save");
    hv.save_domain("test", &file).expect("save");
    assert_eq!(
        state(hv, "test"),
        (DomainState::Shutoff, DomainReason::Saved)
    );
    let garbage = d.join("garbage");
    std::fs::write(&garbage, b"nope").expect("write");
    let e = hv.restore_domain(&garbage).expect_err("garbage");
    assert!(
        e.to_string().contains("not a Vireo saved-state file"),
        "{e}"
    );
    hv.restore_domain(&file).expect("restore");
    assert_eq!(
        state(hv, "test"),
        (DomainState::Running, DomainReason::Restored)
    );
    hv.managed_save("test").expect("managedsave");
    assert!(hv.has_managed_save("test").expect("has"));
    hv.managed_save_remove("test").expect("remove");
    assert!(!hv.has_managed_save("test").expect("has"));
}
