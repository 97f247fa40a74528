//! Network commands: net-list, net-info, net-define, net-start, ...

use anyhow::{Result, bail};
use serde_json::json;
use vireo_crds::Manifest;
use vireo_drivers::{Connection, Lookup, NetworkRef};

use super::{Command, read_manifests, to_data, yes_no};
use crate::output::{Output, Table};

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
