//! Connection and node commands: uri, version, nodeinfo, hostname.

use anyhow::{Result, bail};
use serde_json::json;
use vireo_drivers::Connection;

use super::{Command, to_data};
use crate::output::Output;

pub fn run(conn: &Connection, command: &Command) -> Result<Output> {
    let hv = conn.hypervisor();
    Ok(match command {
        Command::Uri => Output::Text {
            text: conn.uri().to_string(),
            data: json!({"uri": conn.uri()}),
        },
        Command::Version => {
            let driver = hv.name();
            let hv_version = hv.hypervisor_version();
            Output::Fields {
                width: 19,
                rows: vec![
                    ("Vireo version", vireo_drivers::VERSION.to_string()),
                    ("Driver", driver.to_string()),
                    (
                        "Running hypervisor",
                        format!("{} {hv_version}", driver.to_uppercase()),
                    ),
                ],
                data: json!({"vireo": vireo_drivers::VERSION, "driver": driver, "hypervisor": hv_version}),
            }
        }
        Command::Nodeinfo => {
            let n = hv.node_info()?;
            Output::Fields {
                width: 20,
                rows: vec![
                    ("CPU model", n.cpu_model.clone()),
                    ("CPU(s)", n.cpus.to_string()),
                    ("CPU frequency", format!("{} MHz", n.mhz)),
                    ("CPU socket(s)", n.sockets.to_string()),
                    ("Core(s) per socket", n.cores.to_string()),
                    ("Thread(s) per core", n.threads.to_string()),
                    ("NUMA cell(s)", n.numa_nodes.to_string()),
                    ("Memory size", format!("{} KiB", n.memory_bytes / 1024)),
                ],
                data: to_data(&n)?,
            }
        }
        Command::Hostname => {
            let h = hv.hostname()?;
            Output::Text {
                data: json!({"hostname": h}),
                text: h,
            }
        }
        _ => bail!("not a host command"),
    })
}
