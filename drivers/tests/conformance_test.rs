//! The driver conformance suite against the test driver (`test:///default`).

vireo_drivers::conformance_tests!(
    || vireo_drivers::open("test:///default").expect("open"),
    vireo_drivers::conformance::test_driver_fixture()
);
