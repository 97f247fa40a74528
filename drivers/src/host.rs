//! This machine's NodeInfo, read from `/proc` and `/sys`.

use std::collections::HashSet;

use vireo_crds::NodeInfo;

/// Reads CPUs, topology, frequency, CPU model and memory of this machine.
pub fn probe_node_info() -> std::io::Result<NodeInfo> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    Ok(parse(&cpuinfo, &meminfo))
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let (k, v) = line.split_once(':')?;
    (k.trim() == key).then(|| v.trim())
}

/// Builds a NodeInfo from the text of `/proc/cpuinfo` and `/proc/meminfo`.
pub fn parse(cpuinfo: &str, meminfo: &str) -> NodeInfo {
    let mut cpus = 0u32;
    let mut model = String::new();
    let mut mhz = 0f64;
    let mut sockets = HashSet::new();
    let mut cores = HashSet::new();
    let mut physical = String::new();
    for line in cpuinfo.lines() {
        if field(line, "processor").is_some() {
            cpus += 1;
        } else if let Some(v) = field(line, "model name") {
            if model.is_empty() {
                model = v.to_string();
            }
        } else if let Some(v) = field(line, "cpu MHz") {
            if mhz == 0.0 {
                mhz = v.parse().unwrap_or(0.0);
            }
        } else if let Some(v) = field(line, "physical id") {
            physical = v.to_string();
            sockets.insert(physical.clone());
        } else if let Some(v) = field(line, "core id") {
            cores.insert((physical.clone(), v.to_string()));
        }
    }
    let cpus = cpus.max(1);
    let sockets_n = (sockets.len() as u32).max(1);
    let cores_n = (cores.len() as u32).max(1);
    let cores_per_socket = (cores_n / sockets_n).max(1);
    let threads = (cpus / cores_n).max(1);
    let memory_kib = meminfo
        .lines()
        .find_map(|l| field(l, "MemTotal"))
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    NodeInfo {
        cpu_model: if model.is_empty() {
            std::env::consts::ARCH.to_string()
        } else {
            model
        },
        cpus,
        mhz: mhz as u32,
        numa_nodes: 1,
        sockets: sockets_n,
        cores: cores_per_socket,
        threads,
        memory_bytes: memory_kib * 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_topology_and_memory() {
        let cpu = "processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 2400.123\nphysical id\t: 0\ncore id\t\t: 0\n\n\
                   processor\t: 1\nmodel name\t: Test CPU\ncpu MHz\t\t: 2400.123\nphysical id\t: 0\ncore id\t\t: 0\n\n\
                   processor\t: 2\nphysical id\t: 0\ncore id\t\t: 1\n\nprocessor\t: 3\nphysical id\t: 0\ncore id\t\t: 1\n";
        let mem = "MemTotal:       24576000 kB\nMemFree: 1 kB\n";
        let n = parse(cpu, mem);
        assert_eq!(
            (n.cpus, n.sockets, n.cores, n.threads, n.mhz),
            (4, 1, 2, 2, 2400)
        );
        assert_eq!(n.cpu_model, "Test CPU");
        assert_eq!(n.memory_bytes, 24576000 * 1024);
    }

    #[test]
    fn this_machine() {
        let n = probe_node_info().expect("/proc is readable");
        assert!(n.cpus >= 1 && n.memory_bytes > 0);
    }
}
