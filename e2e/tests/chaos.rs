//! The chaos run's short form (issue 18 item 1; the full form is `cargo
//! bench -p vireo-e2e --bench chaos`): 40 `type: test` Domain names
//! created, changed and deleted at random for 45 s across three agents
//! and two operator replicas on a real kube-apiserver, while agents, the
//! operator leader, etcd and kube-apiserver are SIGKILLed at random and
//! started again. No Domain may ever be active on two hosts, and after
//! the faults stop everything converges with nothing lost or leaked (see
//! e2e/tests/common/chaos.rs). `VIREO_CHAOS_SEED` replays a run.
//!
//! Where the host allows (root, nft, dnsmasq; required with `CI` set) each
//! agent runs in a network namespace of its own with the real network
//! backend: three Networks (two stable, one created and deleted at random)
//! and two real guests (one qemu, one kvm where there is /dev/kvm) with an
//! interface each, so that bridges, taps, nftables tables, dnsmasq and
//! lease files are checked for leaks and losses at the end. More guests are
//! left to the full form (`--guests`), to keep this near a minute.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use common::Cluster;

#[tokio::test(flavor = "multi_thread")]
async fn chaos_short_form_converges_with_no_violation() {
    let seed = std::env::var("VIREO_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(chaos::clock_seed);
    let config = chaos::Config {
        domains: 40,
        seconds: 45,
        seed,
        converge_seconds: 180,
        guests: 2,
        networks: 3,
    };
    let mut cluster = Cluster::start("chaos");
    let report = chaos::run(&mut cluster, &config).await;
    report.print();
    let ops: u64 = report
        .operations
        .iter()
        .filter(|(k, _)| k.ends_with(" ok"))
        .map(|(_, n)| n)
        .sum();
    assert!(ops > 0, "no operation succeeded: {:?}", report.operations);
    if !report.guests.is_empty() {
        assert!(
            report
                .operations
                .get("create real guest ok")
                .is_some_and(|n| *n > 0),
            "seed {seed}: no real guest was created: {:?}",
            report.operations
        );
    }
    for kind in chaos::FAULT_KINDS {
        assert!(
            report.faults.get(kind).copied().unwrap_or(0) > 0,
            "seed {seed}: no {kind} fault was injected: {:?}",
            report.faults
        );
    }
    assert!(
        report.violations.is_empty(),
        "seed {seed}: {} violations:\n{}",
        report.violations.len(),
        report.violations.join("\n")
    );
    assert!(
        report.convergence_seconds.is_some(),
        "seed {seed}: no convergence"
    );
}
