//! The driver conformance suite, unchanged, against the qemu driver with the
//! real Linux guest image (TCG). Each case gets its own state directory.
//! The fixture's domains are `q35` machines, so that `setvcpus` on a running
//! guest can unplug a vCPU (microvm has no CPU hot-plug); a 2-vCPU maximum
//! and 512 MiB, of which the balloon gives back three quarters on `setmem`.
//!
//! Without `qemu-system-x86_64` every case fails when `CI` is set, and
//! otherwise prints a SKIP line and passes.

mod common;

use std::time::Duration;

use vireo_drivers::conformance::{Fixture, test_driver_fixture};

fn connection() -> vireo_drivers::Connection {
    let root = common::fresh_root("qemu-conf");
    vireo_drivers::open(&format!(
        "qemu:///embed?root={}&shutdown_timeout=120",
        root.display()
    ))
    .expect("opens qemu:///embed")
}

fn fixture() -> Fixture {
    let base = test_driver_fixture();
    let available = common::qemu_available("qemu conformance");
    Fixture {
        make_domain: Box::new(move |name| {
            let mut d = common::linux_domain(name, Some("q35"), "vireo.net=0");
            d.spec.max_vcpus = Some(2);
            d.spec.memory = k8s_openapi::apimachinery::pkg::api::resource::Quantity("512Mi".into());
            if !available {
                d.spec.domain_type = vireo_crds::DomainType::Test;
            }
            d
        }),
        make_network: base.make_network,
        make_pool: Box::new(common::dir_pool),
        timeout: Duration::from_secs(90),
    }
}

vireo_drivers::conformance_tests!(
    || if common::qemu_available("qemu conformance") {
        connection()
    } else {
        vireo_drivers::open("test:///default").expect("open")
    },
    fixture()
);
