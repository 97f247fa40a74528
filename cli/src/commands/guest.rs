//! Guest agent commands: guestinfo, domfsfreeze, domfsthaw, and the agent
//! modes of shutdown, reboot and domifaddr (see docs/guest-agent.md).

use anyhow::{Result, bail};
use serde_json::json;
use vireo_crds::GuestInfo;
use vireo_drivers::Connection;

use super::domain::resolve;
use super::{DomfsfreezeArgs, GuestinfoArgs};
use crate::output::Output;

/// `guestinfo`: virsh's `key : value` lines, the groups asked for (all
/// when none is).
pub fn guestinfo(conn: &Connection, a: &GuestinfoArgs) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let info = conn.hypervisor().guest_info(&d.name)?;
    let all = !(a.user || a.os || a.hostname || a.interface || a.filesystem);
    let rows = guestinfo_rows(&info, |g| {
        all || match g {
            "user" => a.user,
            "os" => a.os,
            "hostname" => a.hostname,
            "if" => a.interface,
            _ => a.filesystem,
        }
    });
    let text = rows
        .iter()
        .map(|(k, v)| format!("{k:<20}: {v}"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Output::Text {
        text,
        data: serde_json::to_value(&info)?,
    })
}

/// The typed parameters of `virDomainGetGuestInfo`, in virsh's order.
fn guestinfo_rows(info: &GuestInfo, want: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut put = |k: String, v: Option<String>| {
        if let Some(v) = v {
            rows.push((k, v));
        }
    };
    if want("user") {
        put("user.count".into(), Some(info.users.len().to_string()));
        for (i, u) in info.users.iter().enumerate() {
            put(format!("user.{i}.name"), Some(u.name.clone()));
            put(format!("user.{i}.domain"), u.domain.clone());
            // virsh prints milliseconds.
            put(
                format!("user.{i}.login-time"),
                u.login_time.map(|t| (t * 1000).to_string()),
            );
        }
    }
    if want("os")
        && let Some(os) = &info.os
    {
        put("os.id".into(), os.id.clone());
        put("os.name".into(), os.name.clone());
        put("os.pretty-name".into(), os.pretty_name.clone());
        put("os.version".into(), os.version.clone());
        put("os.version-id".into(), os.version_id.clone());
        put("os.kernel-release".into(), os.kernel_release.clone());
        put("os.kernel-version".into(), os.kernel_version.clone());
        put("os.machine".into(), os.machine.clone());
    }
    if want("hostname") {
        put("hostname".into(), info.hostname.clone());
    }
    if want("fs") {
        put("fs.count".into(), Some(info.filesystems.len().to_string()));
        for (i, f) in info.filesystems.iter().enumerate() {
            put(format!("fs.{i}.name"), f.name.clone());
            put(format!("fs.{i}.mountpoint"), Some(f.mountpoint.clone()));
            put(format!("fs.{i}.fstype"), f.fs_type.clone());
            put(
                format!("fs.{i}.total-bytes"),
                f.total_bytes.map(|b| b.to_string()),
            );
            put(
                format!("fs.{i}.used-bytes"),
                f.used_bytes.map(|b| b.to_string()),
            );
        }
    }
    if want("if") {
        put("if.count".into(), Some(info.interfaces.len().to_string()));
        for (i, n) in info.interfaces.iter().enumerate() {
            put(format!("if.{i}.name"), Some(n.name.clone()));
            put(format!("if.{i}.hwaddr"), n.mac.clone());
            put(
                format!("if.{i}.addr.count"),
                Some(n.addresses.len().to_string()),
            );
            for (j, addr) in n.addresses.iter().enumerate() {
                let (ip, prefix) = match addr.split_once('/') {
                    Some((ip, p)) => (ip, Some(p.to_string())),
                    None => (addr.as_str(), None),
                };
                let kind = if ip.contains(':') { "ipv6" } else { "ipv4" };
                put(format!("if.{i}.addr.{j}.type"), Some(kind.into()));
                put(format!("if.{i}.addr.{j}.addr"), Some(ip.into()));
                put(format!("if.{i}.addr.{j}.prefix"), prefix);
            }
        }
    }
    rows
}

/// `domifaddr --source agent`: the guest's own view, one line per
/// address, `-` for the name and MAC after an interface's first (as virsh
/// without --full).
pub fn domifaddr_agent(
    conn: &Connection,
    domain: &str,
    interface: Option<&str>,
    full: bool,
) -> Result<Output> {
    let d = resolve(conn, domain)?;
    if d.id.is_none() {
        bail!("domain '{}' is not running", d.name);
    }
    let info = conn.hypervisor().guest_info(&d.name)?;
    let mut lines = vec![
        format!(
            " {:<10} {:<20} {:<12} {}",
            "Name", "MAC address", "Protocol", "Address"
        ),
        "-".repeat(79),
    ];
    let mut data = Vec::new();
    let ifaces: Vec<_> = info
        .interfaces
        .iter()
        .filter(|i| interface.is_none_or(|want| want == i.name))
        .collect();
    if let Some(want) = interface
        && ifaces.is_empty()
    {
        bail!(
            "no interface with name '{want}' in the guest of domain '{}'",
            d.name
        );
    }
    for i in ifaces {
        let mac = i.mac.clone().unwrap_or_else(|| "-".into());
        data.push(json!({"name": i.name, "mac": i.mac, "addresses": i.addresses}));
        if i.addresses.is_empty() {
            lines.push(format!(" {:<10} {mac:<20} {:<12} {}", i.name, "N/A", "N/A"));
        }
        for (n, addr) in i.addresses.iter().enumerate() {
            let protocol = if addr.contains(':') { "ipv6" } else { "ipv4" };
            let (name, mac) = if n == 0 || full {
                (i.name.as_str(), mac.as_str())
            } else {
                ("-", "-")
            };
            lines.push(format!(" {name:<10} {mac:<20} {protocol:<12} {addr}"));
        }
    }
    Ok(Output::Text {
        text: lines.join("\n"),
        data: data.into(),
    })
}

pub fn domfsfreeze(conn: &Connection, a: &DomfsfreezeArgs) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let n = conn.hypervisor().guest_fs_freeze(&d.name, &a.mountpoint)?;
    Ok(Output::Message(format!("Froze {n} filesystem(s)")))
}

pub fn domfsthaw(conn: &Connection, domain: &str) -> Result<Output> {
    let d = resolve(conn, domain)?;
    let n = conn.hypervisor().guest_fs_thaw(&d.name)?;
    Ok(Output::Message(format!("Thawed {n} filesystem(s)")))
}

/// The `--mode` of shutdown and reboot: virsh's comma list, tried in
/// order until one is accepted.
pub fn parse_modes(mode: Option<&str>) -> Result<Vec<Mode>> {
    let Some(mode) = mode else {
        return Ok(vec![Mode::Acpi]);
    };
    mode.split(',')
        .map(|m| match m.trim() {
            "acpi" => Ok(Mode::Acpi),
            "agent" => Ok(Mode::Agent),
            other => bail!(
                "--mode: '{other}' is not a shutdown mode of Vireo (acpi, agent; a comma list tries them in order)"
            ),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Acpi,
    Agent,
}

/// Shuts down or reboots with the first mode that works.
pub fn shutdown(
    conn: &Connection,
    domain: &str,
    mode: Option<&str>,
    reboot: bool,
) -> Result<Output> {
    let modes = parse_modes(mode)?;
    let d = resolve(conn, domain)?;
    let hv = conn.hypervisor();
    let mut last = None;
    for m in modes {
        let r = match (m, reboot) {
            (Mode::Acpi, false) => hv.shutdown_domain(&d.name),
            (Mode::Acpi, true) => hv.reboot_domain(&d.name),
            (Mode::Agent, r) => hv.guest_agent_shutdown(&d.name, r),
        };
        match r {
            Ok(()) => {
                let verb = if reboot { "rebooted" } else { "shutdown" };
                return Ok(Output::Message(format!(
                    "Domain '{}' is being {verb}",
                    d.name
                )));
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e.into()),
        None => bail!("--mode: no mode given"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_crds::{GuestFilesystem, GuestInterface, GuestOs, GuestUser};

    #[test]
    fn guestinfo_reads_like_virsh() {
        let info = GuestInfo {
            hostname: Some("web01".into()),
            os: Some(GuestOs {
                id: Some("debian".into()),
                ..Default::default()
            }),
            users: vec![GuestUser {
                name: "root".into(),
                domain: None,
                login_time: Some(2),
            }],
            interfaces: vec![GuestInterface {
                name: "eth0".into(),
                mac: Some("52:54:00:00:00:01".into()),
                addresses: vec!["10.0.0.2/24".into(), "fe80::1/64".into()],
            }],
            filesystems: vec![GuestFilesystem {
                mountpoint: "/".into(),
                fs_type: Some("ext4".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let rows = guestinfo_rows(&info, |_| true);
        let get = |k: &str| {
            rows.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("hostname"), Some("web01"));
        assert_eq!(get("user.0.login-time"), Some("2000"));
        assert_eq!(get("os.id"), Some("debian"));
        assert_eq!(get("if.0.addr.1.type"), Some("ipv6"));
        assert_eq!(get("if.0.addr.0.prefix"), Some("24"));
        assert_eq!(get("fs.0.fstype"), Some("ext4"));
        let only_host = guestinfo_rows(&info, |g| g == "hostname");
        assert_eq!(
            only_host,
            vec![("hostname".to_string(), "web01".to_string())]
        );
    }

    #[test]
    fn modes_parse_as_virsh_lists() {
        assert_eq!(parse_modes(None).expect("default"), vec![Mode::Acpi]);
        assert_eq!(
            parse_modes(Some("agent,acpi")).expect("list"),
            vec![Mode::Agent, Mode::Acpi]
        );
        let e = parse_modes(Some("initctl")).expect_err("unknown");
        assert!(e.to_string().contains("'initctl'"), "{e}");
    }
}
