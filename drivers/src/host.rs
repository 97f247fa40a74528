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

/// This machine's SMBIOS data (from the kernel's DMI directory, normally
/// /sys/class/dmi/id) as libvirt's `<sysinfo type='smbios'>` XML: the BIOS
/// and system entries the kernel exposes (serial and UUID need root).
pub fn sysinfo_xml(dmi: &std::path::Path) -> std::io::Result<String> {
    if !dmi.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "this machine exposes no SMBIOS data ({} is missing)",
                dmi.display()
            ),
        ));
    }
    let read = |file: &str| {
        std::fs::read_to_string(dmi.join(file))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    let escape = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('\'', "&apos;")
    };
    let section = |tag: &str, entries: &[(&str, &str)]| {
        let lines: Vec<String> = entries
            .iter()
            .filter_map(|(name, file)| {
                read(file).map(|v| format!("    <entry name='{name}'>{}</entry>", escape(&v)))
            })
            .collect();
        if lines.is_empty() {
            String::new()
        } else {
            format!("  <{tag}>\n{}\n  </{tag}>\n", lines.join("\n"))
        }
    };
    let mut x = String::from("<sysinfo type='smbios'>\n");
    x.push_str(&section(
        "bios",
        &[
            ("vendor", "bios_vendor"),
            ("version", "bios_version"),
            ("date", "bios_date"),
            ("release", "bios_release"),
        ],
    ));
    x.push_str(&section(
        "system",
        &[
            ("manufacturer", "sys_vendor"),
            ("product", "product_name"),
            ("version", "product_version"),
            ("serial", "product_serial"),
            ("uuid", "product_uuid"),
            ("sku", "product_sku"),
            ("family", "product_family"),
        ],
    ));
    x.push_str("</sysinfo>\n");
    Ok(x)
}

#[cfg(test)]
mod sysinfo_tests {
    #[test]
    fn sysinfo_reads_the_dmi_directory() {
        let dir = std::env::temp_dir().join(format!("vireo-dmi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("bios_vendor"), "ACME <BIOS>\n").expect("write");
        std::fs::write(dir.join("bios_version"), "1.2\n").expect("write");
        std::fs::write(dir.join("sys_vendor"), "ACME\n").expect("write");
        let xml = super::sysinfo_xml(&dir).expect("sysinfo");
        assert_eq!(
            xml,
            "<sysinfo type='smbios'>\n  <bios>\n    <entry name='vendor'>ACME &lt;BIOS&gt;</entry>\n    \
             <entry name='version'>1.2</entry>\n  </bios>\n  <system>\n    \
             <entry name='manufacturer'>ACME</entry>\n  </system>\n</sysinfo>\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(super::sysinfo_xml(&dir).is_err(), "no DMI directory");
    }
}
