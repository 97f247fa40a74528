//! The driver conformance suite, unchanged, against the kvm driver
//! (vireo-vmm on /dev/kvm) with the project's test guest. Each case gets its
//! own state directory.
//!
//! Without /dev/kvm every case fails when `CI` is set, and otherwise prints
//! a SKIP line and runs against the test driver instead.

mod common;

use std::time::Duration;

use vireo_drivers::conformance::{Fixture, test_driver_fixture};

fn available() -> bool {
    common::kvm_available("kvm conformance")
}

fn connection() -> vireo_drivers::Connection {
    if !available() {
        return vireo_drivers::open("test:///default").expect("open");
    }
    common::vmm_binary();
    let root = common::fresh_root("kvm-conf");
    vireo_drivers::open(&format!(
        "kvm:///embed?root={}&shutdown_timeout=60",
        root.display()
    ))
    .expect("opens kvm:///embed")
}

fn fixture() -> Fixture {
    let base = test_driver_fixture();
    let on = available();
    Fixture {
        make_domain: Box::new(move |name| {
            let mut d = common::test_guest_domain(name, "");
            d.spec.max_vcpus = Some(2);
            if !on {
                d.spec.domain_type = vireo_crds::DomainType::Test;
                d.spec.os = None;
            }
            d
        }),
        make_network: base.make_network,
        make_pool: Box::new(common::dir_pool),
        timeout: Duration::from_secs(30),
    }
}

vireo_drivers::conformance_tests!(connection, fixture());
