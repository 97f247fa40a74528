//! Network commands: net-list, net-info, net-define, net-start, ...

use anyhow::{Result, bail};
use serde_json::json;
use vireo_crds::Manifest;
use vireo_drivers::{Connection, Lookup, NetworkRef};

use super::{Command, read_manifests, to_data, yes_no};
use crate::output::{Output, Table};

/// A lease's expiry as virsh prints it (local time), or `never`.
fn expiry(seconds: u64) -> String {
    if seconds == 0 {
        return "never".into();
    }
    let Ok(t) = libc::time_t::try_from(seconds) else {
        return seconds.to_string();
    };
    // SAFETY: `tm` is plain old data; zeroed is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers point to live locals for the call's duration;
    // localtime_r is the thread-safe variant.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return seconds.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn resolve(conn: &Connection, text: &str) -> Result<NetworkRef> {
    Ok(conn.network().lookup_network(Lookup::object(text))?)
}

pub fn run(conn: &Connection, command: &Command) -> Result<Output> {
    let net = conn.network();
    Ok(match command {
        Command::NetList(args) => {
            let mut table = Table::new(&["Name", "State", "Autostart", "Persistent"]);
            let mut data = Vec::new();
            for n in net.list_networks(args.filter())? {
                let i = net.network_info(&n.name)?;
                data.push(json!({"name": i.name, "uuid": i.uuid, "active": i.active, "autostart": i.autostart, "persistent": i.persistent, "bridge": i.bridge}));
                table.row(vec![
                    i.name,
                    if i.active { "active" } else { "inactive" }.into(),
                    yes_no(i.autostart).into(),
                    yes_no(i.persistent).into(),
                ]);
            }
            Output::Table {
                table,
                data: data.into(),
            }
        }
        Command::NetDhcpLeases(a) => {
            let n = resolve(conn, &a.name)?;
            let mut table = Table::new(&[
                "Expiry Time",
                "MAC address",
                "Protocol",
                "IP address",
                "Hostname",
                "Client ID or DUID",
            ]);
            let mut data = Vec::new();
            for l in net.dhcp_leases(&n.name)? {
                if a.mac
                    .as_ref()
                    .is_some_and(|m| !m.eq_ignore_ascii_case(&l.mac))
                {
                    continue;
                }
                data.push(serde_json::to_value(&l)?);
                table.row(vec![
                    expiry(l.expiry),
                    l.mac,
                    "ipv4".into(),
                    format!("{}/{}", l.ip, l.prefix),
                    l.hostname.unwrap_or_else(|| "-".into()),
                    l.client_id.unwrap_or_else(|| "-".into()),
                ]);
            }
            Output::Table {
                table,
                data: data.into(),
            }
        }
        Command::Domifaddr(a) => {
            let hv = conn.hypervisor();
            let d = hv.lookup_domain(Lookup::domain(&a.domain))?;
            if d.id.is_none() {
                bail!("domain '{}' is not running", d.name);
            }
            let def = hv.domain_definition(&d.name, false)?;
            // virsh's fixed layout: a 79-column rule, N/A without an address.
            let mut lines = vec![
                format!(
                    " {:<10} {:<20} {:<12} {}",
                    "Name", "MAC address", "Protocol", "Address"
                ),
                "-".repeat(79),
            ];
            let mut data = Vec::new();
            // Addresses the driver knows (the test driver's simulated ones),
            // else the leases of the networks' DHCP servers.
            let known = hv.domain_interface_addresses(&d.name)?;
            let mut ifaces = vireo_drivers::network::interface_addresses(
                net,
                &def.spec.devices.interfaces,
                &d.uuid,
            );
            if let Some(want) = &a.interface {
                ifaces.retain(|i| i.name == *want || i.device.as_ref() == Some(want));
                if ifaces.is_empty() {
                    bail!("no interface with name '{want}' on domain '{}'", d.name);
                }
            }
            if let Some(known) = known {
                for i in &mut ifaces {
                    i.ip = known
                        .iter()
                        .find(|(name, _)| *name == i.name)
                        .map(|(_, ip)| ip.clone());
                }
            }
            for i in ifaces {
                // A test domain plugs nothing in: its interface goes by its
                // own name, as libvirt's test driver names it.
                let device = if def.spec.domain_type == vireo_crds::DomainType::Test {
                    i.name.clone()
                } else {
                    i.device.clone().unwrap_or_else(|| i.name.clone())
                };
                data.push(json!({"name": device, "interface": i.name, "network": i.network, "mac": i.mac, "address": i.ip}));
                let (protocol, address) = match &i.ip {
                    Some(ip) => ("ipv4", ip.clone()),
                    None => ("N/A", "N/A".to_string()),
                };
                lines.push(format!(
                    " {device:<10} {:<20} {protocol:<12} {address}",
                    i.mac
                ));
            }
            Output::Text {
                text: lines.join("\n"),
                data: data.into(),
            }
        }
        Command::NetUuid(a) => {
            let n = resolve(conn, &a.name)?;
            Output::Text {
                data: json!({"uuid": n.uuid}),
                text: n.uuid,
            }
        }
        Command::NetName(a) => {
            let n = resolve(conn, &a.name)?;
            Output::Text {
                data: json!({"name": n.name}),
                text: n.name,
            }
        }
        Command::NetInfo(a) => {
            let n = resolve(conn, &a.name)?;
            let i = net.network_info(&n.name)?;
            Output::Fields {
                width: 15,
                data: json!({"name": i.name, "uuid": i.uuid, "active": i.active, "persistent": i.persistent, "autostart": i.autostart, "bridge": i.bridge}),
                rows: vec![
                    ("Name", i.name),
                    ("UUID", i.uuid),
                    ("Active", yes_no(i.active).into()),
                    ("Persistent", yes_no(i.persistent).into()),
                    ("Autostart", yes_no(i.autostart).into()),
                    ("Bridge", i.bridge.unwrap_or_default()),
                ],
            }
        }
        Command::NetDumpspec(a) => {
            let n = resolve(conn, &a.name)?;
            let def = net.network_definition(&n.name, false)?;
            Output::Text {
                data: to_data(&def)?,
                text: serde_yaml_ng::to_string(&def)?.trim_end().to_string(),
            }
        }
        Command::NetDumpxml(a) => {
            let n = resolve(conn, &a.name)?;
            let def = net.network_definition(&n.name, false)?;
            let xml = vireo_crds::libvirt_xml::network_to_xml(&def);
            Output::Text {
                data: json!({"xml": xml}),
                text: xml.trim_end().to_string(),
            }
        }
        Command::NetDefine(f) | Command::NetCreate(f) => {
            let transient = matches!(command, Command::NetCreate(_));
            let manifests = read_manifests(
                &f.file,
                "Network",
                "define, pool-define or vol-create for other kinds",
            )?;
            let mut lines = Vec::new();
            for m in manifests {
                let Manifest::Network(n) = m else { continue };
                let r = if transient {
                    net.create_network(&n)?
                } else {
                    net.define_network(&n)?
                };
                let verb = if transient { "created" } else { "defined" };
                lines.push(format!(
                    "Network {} {verb} from {}",
                    r.name,
                    f.file.display()
                ));
            }
            Output::Message(lines.join("\n"))
        }
        Command::NetStart(a) => {
            let n = resolve(conn, &a.name)?;
            net.start_network(&n.name)?;
            Output::Message(format!("Network {} started", n.name))
        }
        Command::NetDestroy(a) => {
            let n = resolve(conn, &a.name)?;
            net.destroy_network(&n.name)?;
            Output::Message(format!("Network {} destroyed", n.name))
        }
        Command::NetUndefine(a) => {
            let n = resolve(conn, &a.name)?;
            net.undefine_network(&n.name)?;
            Output::Message(format!("Network {} has been undefined", n.name))
        }
        Command::NetAutostart(a) => {
            let n = resolve(conn, &a.name)?;
            net.set_network_autostart(&n.name, !a.disable)?;
            let verb = if a.disable { "unmarked" } else { "marked" };
            Output::Message(format!("Network {} {verb} as autostarted", n.name))
        }
        _ => bail!("not a network command"),
    })
}
