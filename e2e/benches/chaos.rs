//! The chaos run (issue 18 item 1): `cargo bench -p vireo-e2e --bench chaos
//! -- [--domains 300] [--seconds 120] [--guests 10] [--networks 4]
//! [--seed N] [--converge-seconds 300]`.
//!
//! Creates, changes and deletes `type: test` Domains (one in four with a
//! disk in the dir pool `chaos`) and real guests (qemu with the busybox
//! guest image, kvm with the test guest) at random across three agents and
//! two operator replicas on a real kube-apiserver, while SIGKILLing agents,
//! the operator leader, etcd and kube-apiserver (each kind at least once,
//! then at random) and starting them again; checks that no Domain is ever
//! active on two hosts, and after the faults stop that everything converges
//! with nothing lost or leaked (e2e/tests/common/chaos.rs): with root,
//! nft and dnsmasq each agent runs in a network namespace of its own with
//! the real network backend, the guests have interfaces on the run's
//! Networks (two stable, the rest created and deleted at random), and
//! bridges, taps, nftables tables, dnsmasq and lease files are checked in
//! every namespace. Prints the
//! seed, faults by kind, operations by kind, convergence time after the
//! last fault and every violation; writes `target/bench/chaos.json`; exits
//! 1 on a violation.
//!
//! Figures (2026-12-03, 2 shared cores, load average 5-10; e2e/README.md
//! "Chaos" has the details): seeds 11, 22, 33 with `--domains 300
//! --seconds 120 --guests 10`: 20, 18 and 19 faults (every kind each time),
//! 1,498, 1,177 and 1,144 acknowledged writes, convergence 12.0 s, 67.4 s
//! and 4.9 s after the last fault, 0 violations each; seed 44 after the
//! agent's stale-cache fix (e2e/README.md): 18 faults, 1,400 writes,
//! 31.7 s, 0 violations. With the agents in network namespaces and 4
//! Networks (2026-12-04, `--profile dev`, load 10-12): seeds 101, 202, 303:
//! 18, 19 and 17 faults (every kind each time), 1,150, 900 and 775
//! acknowledged writes, convergence 16.1, 16.6 and 17.4 s, 0 violations.

#[path = "../tests/common/chaos.rs"]
mod chaos;
#[path = "../tests/common/mod.rs"]
mod common;

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot parse {v:?}"))
        })
}

#[tokio::main]
async fn main() {
    // cargo bench adds `--bench`; unknown arguments are ignored.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = chaos::Config {
        domains: flag(&args, "--domains").unwrap_or(300),
        seconds: flag(&args, "--seconds").unwrap_or(120),
        seed: flag(&args, "--seed").unwrap_or_else(chaos::clock_seed),
        converge_seconds: flag(&args, "--converge-seconds").unwrap_or(300),
        guests: flag(&args, "--guests").unwrap_or(10),
        networks: flag(&args, "--networks").unwrap_or(4),
    };
    let mut cluster = common::Cluster::start("chaos");
    let report = chaos::run(&mut cluster, &config).await;
    report.print();
    let dir = common::repo().join("target/bench");
    let path = dir.join("chaos.json");
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&report.json()).unwrap_or_default(),
        )
    });
    match written {
        Ok(()) => println!(" written: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    drop(cluster);
    if !report.violations.is_empty() || report.convergence_seconds.is_none() {
        std::process::exit(1);
    }
}
