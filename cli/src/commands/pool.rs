//! Storage pool commands: pool-list, pool-info, pool-define, pool-build, ...

use anyhow::{Result, bail};
use serde_json::json;
use vireo_crds::Manifest;
use vireo_crds::quantity::human_bytes;
use vireo_drivers::{Connection, Lookup, PoolRef, PoolState};

use super::{Command, read_manifests, to_data, yes_no};
use crate::output::{Output, Table};

fn resolve(conn: &Connection, text: &str) -> Result<PoolRef> {
    Ok(conn.storage().lookup_pool(Lookup::object(text))?)
}

pub fn run(conn: &Connection, command: &Command) -> Result<Output> {
    let st = conn.storage();
    Ok(match command {
        Command::PoolList(args) => {
            let mut table = if args.details {
                Table::new(&[
                    "Name",
                    "State",
                    "Autostart",
                    "Persistent",
                    "Capacity",
                    "Allocation",
                    "Available",
                ])
            } else {
                Table::new(&["Name", "State", "Autostart"])
            };
            let mut data = Vec::new();
            for p in st.list_pools(args.list.filter())? {
                let i = st.pool_info(&p.name)?;
                let running = i.state == PoolState::Running;
                data.push(json!({"name": i.name, "uuid": i.uuid, "state": i.state.to_string(), "autostart": i.autostart,
                    "persistent": i.persistent, "capacity": i.capacity, "allocation": i.allocation, "available": i.available}));
                // virsh's pool-list says active/inactive (pool-info says running).
                // (--details says running, as virsh does).
                let word = match (args.details, running) {
                    (true, _) => i.state.to_string(),
                    (false, true) => "active".to_string(),
                    (false, false) => "inactive".to_string(),
                };
                let mut row = vec![i.name, word, yes_no(i.autostart).into()];
                if args.details {
                    row.push(yes_no(i.persistent).into());
                    for v in [i.capacity, i.allocation, i.available] {
                        row.push(if running { human_bytes(v) } else { "-".into() });
                    }
                }
                table.row(row);
            }
            Output::Table {
                table,
                data: data.into(),
            }
        }
        Command::PoolUuid(a) => {
            let p = resolve(conn, &a.name)?;
            Output::Text {
                data: json!({"uuid": p.uuid}),
                text: p.uuid,
            }
        }
        Command::PoolName(a) => {
            let p = resolve(conn, &a.name)?;
            Output::Text {
                data: json!({"name": p.name}),
                text: p.name,
            }
        }
        Command::PoolInfo(a) => {
            let p = resolve(conn, &a.name)?;
            let i = st.pool_info(&p.name)?;
            let data = json!({"name": i.name, "uuid": i.uuid, "state": i.state.to_string(), "persistent": i.persistent,
                "autostart": i.autostart, "capacity": i.capacity, "allocation": i.allocation, "available": i.available});
            let mut rows = vec![
                ("Name", i.name),
                ("UUID", i.uuid),
                ("State", i.state.to_string()),
                ("Persistent", yes_no(i.persistent).into()),
                ("Autostart", yes_no(i.autostart).into()),
            ];
            if i.state == PoolState::Running {
                rows.push(("Capacity", human_bytes(i.capacity)));
                rows.push(("Allocation", human_bytes(i.allocation)));
                rows.push(("Available", human_bytes(i.available)));
            }
            Output::Fields {
                width: 15,
                rows,
                data,
            }
        }
        Command::PoolDumpspec(a) => {
            let p = resolve(conn, &a.name)?;
            let def = st.pool_definition(&p.name)?;
            Output::Text {
                data: to_data(&def)?,
                text: serde_yaml_ng::to_string(&def)?.trim_end().to_string(),
            }
        }
        Command::PoolDumpxml(a) => {
            let p = resolve(conn, &a.name)?;
            let def = st.pool_definition(&p.name)?;
            let xml = vireo_crds::libvirt_xml::pool_to_xml(&def);
            Output::Text {
                data: json!({"xml": xml}),
                text: xml.trim_end().to_string(),
            }
        }
        Command::PoolDefine(f) | Command::PoolCreate(f) => {
            let transient = matches!(command, Command::PoolCreate(_));
            let manifests = read_manifests(
                &f.file,
                "StoragePool",
                "define, net-define or vol-create for other kinds",
            )?;
            let mut lines = Vec::new();
            for m in manifests {
                let Manifest::StoragePool(p) = m else {
                    continue;
                };
                let r = if transient {
                    st.create_pool(&p)?
                } else {
                    st.define_pool(&p)?
                };
                let verb = if transient { "created" } else { "defined" };
                lines.push(format!("Pool {} {verb} from {}", r.name, f.file.display()));
            }
            Output::Message(lines.join("\n"))
        }
        Command::PoolBuild(a) => {
            let p = resolve(conn, &a.name)?;
            st.build_pool(&p.name)?;
            Output::Message(format!("Pool {} built", p.name))
        }
        Command::PoolStart(a) => {
            let p = resolve(conn, &a.name)?;
            st.start_pool(&p.name)?;
            Output::Message(format!("Pool {} started", p.name))
        }
        Command::PoolDestroy(a) => {
            let p = resolve(conn, &a.name)?;
            st.destroy_pool(&p.name)?;
            Output::Message(format!("Pool {} destroyed", p.name))
        }
        Command::PoolDelete(a) => {
            let p = resolve(conn, &a.name)?;
            st.delete_pool(&p.name)?;
            Output::Message(format!("Pool {} deleted", p.name))
        }
        Command::PoolUndefine(a) => {
            let p = resolve(conn, &a.name)?;
            st.undefine_pool(&p.name)?;
            Output::Message(format!("Pool {} has been undefined", p.name))
        }
        Command::PoolRefresh(a) => {
            let p = resolve(conn, &a.name)?;
            st.refresh_pool(&p.name)?;
            Output::Message(format!("Pool {} refreshed", p.name))
        }
        Command::PoolAutostart(a) => {
            let p = resolve(conn, &a.name)?;
            st.set_pool_autostart(&p.name, !a.disable)?;
            let verb = if a.disable { "unmarked" } else { "marked" };
            Output::Message(format!("Pool {} {verb} as autostarted", p.name))
        }
        _ => bail!("not a pool command"),
    })
}
