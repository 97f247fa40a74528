//! The network's DHCP and DNS server: one dnsmasq per network, as libvirt
//! runs it, with its own configuration, pid file and lease file in the
//! network's run directory. dnsmasq daemonizes (it outlives the agent, like
//! the guests); it is recognised as ours by its configuration file's path
//! in `/proc/PID/cmdline`, never by PID alone.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::plan::Plan;
use crate::vm::process;

/// The files of one network's dnsmasq.
#[derive(Debug, Clone)]
pub struct Files {
    pub conf: PathBuf,
    pub pid: PathBuf,
    pub leases: PathBuf,
    pub log: PathBuf,
}

impl Files {
    pub fn new(dir: &Path) -> Self {
        Self {
            conf: dir.join("dnsmasq.conf"),
            pid: dir.join("dnsmasq.pid"),
            leases: dir.join("dnsmasq.leases"),
            log: dir.join("dnsmasq.log"),
        }
    }
}

/// A DHCP lease, as dnsmasq recorded it.
pub use crate::network::DhcpLease as Lease;

/// The dnsmasq binary: on PATH, or where Debian's `dnsmasq-base` puts it.
pub fn binary() -> Option<PathBuf> {
    super::find_program("dnsmasq")
}

/// The configuration for `plan` (which has a subnet), or `None` when the
/// network needs no dnsmasq.
pub fn config(network: &str, plan: &Plan, files: &Files) -> Option<String> {
    let subnet = plan.subnet?;
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Written by Vireo for network '{network}' at each start; edits are lost."
    );
    let _ = writeln!(c, "strict-order");
    let _ = writeln!(c, "pid-file={}", files.pid.display());
    let _ = writeln!(c, "except-interface=lo");
    let _ = writeln!(c, "bind-dynamic");
    let _ = writeln!(c, "interface={}", plan.bridge);
    if let Some(dhcp) = &plan.dhcp {
        let mask = subnet.mask();
        let mut leases: u64 = 0;
        for (start, end) in &dhcp.ranges {
            let _ = writeln!(c, "dhcp-range={start},{end},{mask}");
            leases += u64::from(u32::from(*end) - u32::from(*start)) + 1;
        }
        if dhcp.ranges.is_empty() && !dhcp.hosts.is_empty() {
            let _ = writeln!(c, "dhcp-range={},static,{mask}", subnet.network());
        }
        if !dhcp.ranges.is_empty() || !dhcp.hosts.is_empty() {
            leases += dhcp.hosts.len() as u64;
            let _ = writeln!(c, "dhcp-no-override");
            let _ = writeln!(c, "dhcp-authoritative");
            let _ = writeln!(c, "dhcp-lease-max={}", leases.max(1));
            let _ = writeln!(c, "dhcp-leasefile={}", files.leases.display());
            for h in &dhcp.hosts {
                match &h.name {
                    Some(name) => {
                        let _ = writeln!(c, "dhcp-host={},{},{name}", h.mac, h.ip);
                    }
                    None => {
                        let _ = writeln!(c, "dhcp-host={},{}", h.mac, h.ip);
                    }
                }
            }
        }
    }
    Some(c)
}

/// The PID of our running dnsmasq, if it runs.
pub fn running(files: &Files) -> Option<u32> {
    let pid: u32 = fs::read_to_string(&files.pid).ok()?.trim().parse().ok()?;
    process::alive(pid, &files.conf).then_some(pid)
}

/// Starts dnsmasq with `conf` (stopping one left from before). Returns its PID.
pub fn start(files: &Files, conf: &str) -> Result<u32, String> {
    stop(files)?;
    let bin = binary().ok_or("dnsmasq not found (Debian package dnsmasq-base)")?;
    fs::write(&files.conf, conf).map_err(|e| format!("{}: {e}", files.conf.display()))?;
    // The lease file is kept across restarts of the network, like libvirt's
    // status file, so guests keep their addresses.
    if !files.leases.exists() {
        fs::write(&files.leases, "").map_err(|e| format!("{}: {e}", files.leases.display()))?;
    }
    let log = fs::File::create(&files.log).map_err(|e| format!("{}: {e}", files.log.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", files.log.display()))?;
    // dnsmasq forks into the background and exits once its child has set
    // up (or failed to, with a message on stderr and a non-zero status).
    let status = Command::new(&bin)
        .arg(format!("--conf-file={}", files.conf.display()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !status.success() {
        let said = fs::read_to_string(&files.log).unwrap_or_default();
        return Err(format!("dnsmasq failed ({status}): {}", said.trim()));
    }
    for _ in 0..100 {
        if let Some(pid) = running(files) {
            // Guests renew their leases after the agent's pod is gone too.
            if let Err(e) = crate::cgroup::leave_pod(pid) {
                tracing::warn!(pid, error = %e, "cannot keep dnsmasq beyond the agent's pod");
            }
            return Ok(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "dnsmasq started but {} names no live dnsmasq of ours",
        files.pid.display()
    ))
}

/// Stops our dnsmasq, if it runs.
pub fn stop(files: &Files) -> Result<(), String> {
    if let Some(pid) = running(files)
        && !process::terminate(pid, &files.conf, Duration::from_secs(2))
    {
        return Err(format!("dnsmasq (pid {pid}) is still there after SIGKILL"));
    }
    let _ = fs::remove_file(&files.pid);
    Ok(())
}

/// Parses a dnsmasq lease file (`EXPIRY MAC IP HOSTNAME CLIENT-ID`, `*`
/// for none; IPv6 `duid` lines skipped).
pub fn parse_leases(text: &str, prefix: u8) -> Vec<Lease> {
    let opt = |s: &str| (s != "*").then(|| s.to_string());
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 || f[0] == "duid" {
                return None;
            }
            let expiry = f[0].parse().ok()?;
            f[2].parse::<std::net::Ipv4Addr>().ok()?;
            Some(Lease {
                expiry,
                mac: f[1].to_ascii_lowercase(),
                ip: f[2].to_string(),
                prefix,
                hostname: f.get(3).and_then(|s| opt(s)),
                client_id: f.get(4).and_then(|s| opt(s)),
            })
        })
        .collect()
}

/// The unexpired leases of a network.
pub fn leases(files: &Files, prefix: u8) -> Vec<Lease> {
    let now = process::now_secs();
    parse_leases(
        &fs::read_to_string(&files.leases).unwrap_or_default(),
        prefix,
    )
    .into_iter()
    .filter(|l| l.expiry == 0 || l.expiry > now)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::super::plan::{Dhcp, StaticHost, Subnet};
    use super::*;
    use std::net::Ipv4Addr;
    use vireo_crds::ForwardMode;

    #[test]
    fn lease_lines() {
        let text = "1700000000 52:54:00:AA:bb:cc 10.0.0.50 vireo-guest 01:52:54:00:aa:bb:cc\n\
                    0 52:54:00:00:00:01 10.0.0.2 * *\n\
                    duid 00:01:00:01\n\
                    garbage\n";
        let l = parse_leases(text, 24);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].mac, "52:54:00:aa:bb:cc");
        assert_eq!(l[0].hostname.as_deref(), Some("vireo-guest"));
        assert_eq!(l[1].expiry, 0);
        assert_eq!(l[1].hostname, None);
    }

    #[test]
    fn config_lists_ranges_and_hosts() {
        let plan = Plan {
            mode: ForwardMode::Nat,
            bridge: "vireo0".into(),
            subnet: Some(Subnet {
                gateway: Ipv4Addr::new(10, 0, 0, 1),
                prefix: 24,
            }),
            dhcp: Some(Dhcp {
                ranges: vec![(Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 19))],
                hosts: vec![StaticHost {
                    mac: "52:54:00:00:00:07".into(),
                    ip: Ipv4Addr::new(10, 0, 0, 7),
                    name: Some("seven".into()),
                }],
            }),
        };
        let files = Files::new(Path::new("/run/x"));
        let c = config("n", &plan, &files).expect("a config");
        assert!(c.contains("interface=vireo0\n"));
        assert!(c.contains("dhcp-range=10.0.0.10,10.0.0.19,255.255.255.0\n"));
        assert!(c.contains("dhcp-host=52:54:00:00:00:07,10.0.0.7,seven\n"));
        assert!(c.contains("dhcp-lease-max=11\n"));
        assert!(c.contains("dhcp-leasefile=/run/x/dnsmasq.leases\n"));
    }
}
