//! virsh's everyday inspection commands: domiflist, domblklist, vcpucount,
//! dommemstat, desc, freecell, capabilities, sysinfo, schedinfo,
//! ttyconsole, domblkinfo, domblkstat, domifstat, vcpuinfo.

use anyhow::{Result, bail};
use serde_json::json;
use vireo_crds::DomainType;
use vireo_drivers::hypervisor::{DESCRIPTION_ANNOTATION, TITLE_ANNOTATION};
use vireo_drivers::{Affect, Connection};

use super::{AffectArgs, Command};
use crate::output::{Output, Table};

pub fn run(conn: &Connection, command: &Command) -> Result<Output> {
    let hv = conn.hypervisor();
    Ok(match command {
        Command::Domiflist(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let def = hv.domain_definition(&d.name, false)?;
            let mut table = Table::new(&["Interface", "Type", "Source", "Model", "MAC"]);
            let mut data = Vec::new();
            for (i, iface) in def.spec.devices.interfaces.iter().enumerate() {
                let mac = iface.mac.clone().unwrap_or_else(|| {
                    vireo_drivers::bridge::tap::interface_mac(iface, &d.uuid, i)
                });
                // The test driver simulates NICs without a model, as
                // libvirt's test domain has none; the others give virtio.
                let model = if def.spec.domain_type == DomainType::Test {
                    "-"
                } else {
                    "virtio"
                };
                data.push(json!({"interface": iface.name, "type": "network", "source": iface.network, "model": model, "mac": mac}));
                table.row(vec![
                    iface.name.clone(),
                    "network".into(),
                    iface.network.clone(),
                    model.into(),
                    mac,
                ]);
            }
            Output::Table {
                table,
                data: data.into(),
            }
        }
        Command::Domblklist(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let def = hv.domain_definition(&d.name, false)?;
            let mut table = Table::new(&["Target", "Source"]);
            let mut data = Vec::new();
            for disk in &def.spec.devices.disks {
                let source = volume_path(conn, &disk.volume).unwrap_or_else(|| disk.volume.clone());
                data.push(json!({"target": disk.name, "source": source}));
                table.row(vec![disk.name.clone(), source]);
            }
            Output::Table {
                table,
                data: data.into(),
            }
        }
        Command::Vcpucount(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let config = hv.domain_definition(&d.name, true)?;
            let cfg_max = config.spec.max_vcpus.unwrap_or(config.spec.vcpus);
            let cfg_cur = config.spec.vcpus;
            let info = hv.domain_info(&d.name)?;
            let active = info.state.is_active();
            let live = if active {
                let def = hv.domain_definition(&d.name, false)?;
                Some((def.spec.max_vcpus.unwrap_or(def.spec.vcpus), info.vcpus))
            } else {
                None
            };
            let data = json!({"maximumConfig": cfg_max, "currentConfig": cfg_cur,
                "maximumLive": live.map(|l| l.0), "currentLive": live.map(|l| l.1)});
            if a.maximum || a.active || a.affect.config || a.affect.live || a.affect.current {
                let use_live = a.affect.live || (a.affect.current && active);
                let n = match (a.maximum, use_live, live) {
                    (true, true, Some((m, _))) => m,
                    (false, true, Some((_, c))) => c,
                    (_, true, None) => bail!("domain '{}' is not running", d.name),
                    (true, false, _) => cfg_max,
                    (false, false, _) => cfg_cur,
                };
                return Ok(Output::Text {
                    text: n.to_string(),
                    data,
                });
            }
            let mut lines = vec![format!("{:<12} {:<12} {:3}", "maximum", "config", cfg_max)];
            if let Some((m, _)) = live {
                lines.push(format!("{:<12} {:<12} {:3}", "maximum", "live", m));
            }
            lines.push(format!("{:<12} {:<12} {:3}", "current", "config", cfg_cur));
            if let Some((_, c)) = live {
                lines.push(format!("{:<12} {:<12} {:3}", "current", "live", c));
            }
            Output::Text {
                text: lines.join("\n"),
                data,
            }
        }
        Command::Dommemstat(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let stats = hv.domain_memory_stats(&d.name)?;
            let text = stats
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join("\n");
            let data: serde_json::Map<String, serde_json::Value> =
                stats.into_iter().map(|(k, v)| (k, json!(v))).collect();
            Output::Text {
                text,
                data: data.into(),
            }
        }
        Command::Desc(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let key = if a.title {
                TITLE_ANNOTATION
            } else {
                DESCRIPTION_ANNOTATION
            };
            let what = if a.title { "title" } else { "description" };
            if let Some(text) = &a.new_desc {
                let value = (!text.is_empty()).then_some(text.as_str());
                hv.set_domain_annotation(&d.name, key, value, a.affect.affect()?)?;
                let word = if a.title { "title" } else { "description" };
                return Ok(Output::Message(format!(
                    "Domain {word} updated successfully"
                )));
            }
            let inactive = a.affect.config || !hv.domain_state(&d.name)?.0.is_active();
            let def = hv.domain_definition(&d.name, inactive)?;
            let value = def
                .metadata
                .annotations
                .as_ref()
                .and_then(|n| n.get(key))
                .cloned();
            match value {
                Some(v) => Output::Text {
                    data: json!({ what: v }),
                    text: v,
                },
                None => Output::Text {
                    text: format!("No {what} for domain: {}", d.name),
                    data: json!({ what: null }),
                },
            }
        }
        Command::Freecell(a) => {
            let cells = hv.cells_free_memory()?;
            let cell = a.cellno.or(a.cell);
            if a.all {
                let mut lines = Vec::new();
                for (i, b) in cells.iter().enumerate() {
                    lines.push(format!("{i:5}: {:10} KiB", b / 1024));
                }
                let total: u64 = cells.iter().sum();
                lines.push("-".repeat(20));
                lines.push(format!("{:5}: {:10} KiB", "Total", total / 1024));
                Output::Text {
                    text: lines.join("\n"),
                    data: json!({"cells": cells, "total": total}),
                }
            } else if let Some(c) = cell {
                let Some(b) = cells.get(c as usize) else {
                    bail!(
                        "NUMA cell {c} does not exist: this node has cells 0 to {}",
                        cells.len().saturating_sub(1)
                    );
                };
                Output::Text {
                    text: format!("{c}: {} KiB", b / 1024),
                    data: json!({"cell": c, "free": b}),
                }
            } else {
                let total = hv.node_free_memory()?;
                Output::Text {
                    text: format!("Total: {} KiB", total / 1024),
                    data: json!({"free": total}),
                }
            }
        }
        Command::Capabilities => {
            let xml = match hv.capabilities() {
                Ok(x) => x,
                Err(vireo_drivers::Error::Unsupported { .. }) => capabilities(conn)?,
                Err(e) => return Err(e.into()),
            };
            Output::Text {
                data: json!({"xml": xml}),
                text: xml,
            }
        }
        Command::Sysinfo => {
            let xml = hv.sysinfo()?;
            Output::Text {
                data: json!({"xml": xml}),
                text: xml.trim_end().to_string(),
            }
        }
        Command::Schedinfo(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let (sched, params) = hv.domain_scheduler(&d.name)?;
            let mut lines = vec![format!("{:<15}: {sched}", "Scheduler")];
            for (k, v) in &params {
                lines.push(format!("{k:<15}: {v}"));
            }
            let data: serde_json::Map<String, serde_json::Value> =
                params.into_iter().map(|(k, v)| (k, json!(v))).collect();
            Output::Text {
                text: lines.join("\n"),
                data: json!({"scheduler": sched, "parameters": data}),
            }
        }
        Command::Ttyconsole(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            // A driver without a console (the test driver) prints an empty
            // line, as libvirt's test driver does.
            let path = hv
                .console_path(&d.name)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            Output::Text {
                data: json!({"console": path}),
                text: path,
            }
        }
        Command::Domblkinfo(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let def = hv.domain_definition(&d.name, false)?;
            let disk = def
                .spec
                .devices
                .disks
                .iter()
                .find(|x| x.name == a.device || x.volume == a.device);
            let from_volume = disk.and_then(|x| volume_info(conn, &x.volume));
            let info = match from_volume {
                Some(i) => i,
                None => hv.domain_block_info(&d.name, &a.device)?,
            };
            Output::Fields {
                width: 15,
                rows: vec![
                    ("Capacity", info.capacity.to_string()),
                    ("Allocation", info.allocation.to_string()),
                    ("Physical", info.physical.to_string()),
                ],
                data: json!(info),
            }
        }
        Command::Domblkstat(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let stats = hv.domain_block_stats(&d.name, &a.device)?;
            counters(stats)
        }
        Command::Domifstat(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let stats = hv.domain_interface_stats(&d.name, &a.interface)?;
            counters(stats)
        }
        Command::Vcpuinfo(a) => {
            let d = super::domain::resolve(conn, &a.domain)?;
            let vcpus = hv.domain_vcpu_info(&d.name)?;
            let na = || "N/A".to_string();
            let blocks: Vec<String> = vcpus
                .iter()
                .map(|v| {
                    let time = v.cpu_time_ns.map_or_else(
                        // virsh prints this label without its colon.
                        || format!("{:<15} N/A", "CPU time"),
                        |t| format!("{:<15} {:.1}s", "CPU time:", t as f64 / 1e9),
                    );
                    [
                        format!("{:<15} {}", "VCPU:", v.number),
                        format!(
                            "{:<15} {}",
                            "CPU:",
                            v.cpu.map_or_else(na, |c| c.to_string())
                        ),
                        format!("{:<15} {}", "State:", v.state.clone().unwrap_or_else(na)),
                        time,
                        format!("{:<15} {}", "CPU Affinity:", v.affinity),
                    ]
                    .join("\n")
                })
                .collect();
            Output::Text {
                text: blocks.join("\n\n"),
                data: json!(vcpus),
            }
        }
        _ => bail!("not an inspection command"),
    })
}

/// `NAME VALUE` lines (domblkstat, domifstat).
fn counters(stats: Vec<(String, i64)>) -> Output {
    let text = stats
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join("\n");
    let data: serde_json::Map<String, serde_json::Value> =
        stats.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Output::Text {
        text,
        data: data.into(),
    }
}

/// The path of a volume named like a disk's, in whichever pool holds it.
fn volume_path(conn: &Connection, volume: &str) -> Option<String> {
    let st = conn.storage();
    let pools = st.list_pools(vireo_drivers::ListFilter::Active).ok()?;
    pools
        .iter()
        .find_map(|p| st.lookup_volume(&p.name, volume).ok())
        .map(|v| v.path)
}

/// A disk's volume sizes, when a pool of the node holds it.
fn volume_info(conn: &Connection, volume: &str) -> Option<vireo_drivers::BlockInfo> {
    let st = conn.storage();
    let pools = st.list_pools(vireo_drivers::ListFilter::Active).ok()?;
    pools.iter().find_map(|p| {
        st.volume_info(&p.name, volume)
            .ok()
            .map(|i| vireo_drivers::BlockInfo {
                capacity: i.capacity,
                allocation: i.allocation,
                physical: i.allocation.max(i.capacity),
            })
    })
}

/// libvirt's capabilities XML for this connection: the host's CPU and
/// NUMA cells, its security model, and the guests its driver runs.
fn capabilities(conn: &Connection) -> Result<String> {
    let hv = conn.hypervisor();
    let n = hv.node_info()?;
    let cells = n.numa_nodes.max(1);
    let per_cell = n.cpus / cells;
    let cell_mem = hv.cells_free_memory().unwrap_or_default();
    let mut x = String::from("<capabilities>\n\n  <host>\n    <cpu>\n");
    x.push_str(&format!(
        "      <arch>{}</arch>\n    </cpu>\n",
        arch_of(&n.cpu_model)
    ));
    x.push_str(&format!("    <topology>\n      <cells num='{cells}'>\n"));
    for c in 0..cells {
        x.push_str(&format!("        <cell id='{c}'>\n"));
        if let Some(b) = cell_mem.get(c as usize) {
            x.push_str(&format!(
                "          <memory unit='KiB'>{}</memory>\n",
                b / 1024
            ));
        }
        x.push_str(&format!("          <cpus num='{per_cell}'>\n"));
        for i in 0..per_cell {
            let id = c * per_cell + i;
            x.push_str(&format!(
                "            <cpu id='{id}' socket_id='{c}' core_id='{i}' siblings='{id}'/>\n"
            ));
        }
        x.push_str("          </cpus>\n        </cell>\n");
    }
    x.push_str("      </cells>\n    </topology>\n");
    let (model, doi) = hv.security_model();
    x.push_str(&format!(
        "    <secmodel>\n      <model>{model}</model>\n      <doi>{doi}</doi>\n    </secmodel>\n  </host>\n\n"
    ));
    let types: &[&str] = match hv.name() {
        "test" => &["test"],
        "node" => &["test", "qemu", "kvm"],
        other => std::slice::from_ref(match other {
            "qemu" => &"qemu",
            "kvm" => &"kvm",
            _ => &"test",
        }),
    };
    x.push_str("  <guest>\n    <os_type>hvm</os_type>\n");
    x.push_str(&format!("    <arch name='{}'>\n", arch_of(&n.cpu_model)));
    for t in types {
        x.push_str(&format!("      <domain type='{t}'/>\n"));
    }
    x.push_str("    </arch>\n  </guest>\n\n</capabilities>");
    Ok(x)
}

/// The architecture a node's CPU model names (`i686` on the test node).
fn arch_of(model: &str) -> &str {
    match model {
        "i686" | "x86_64" | "aarch64" => model,
        _ => std::env::consts::ARCH,
    }
}

impl AffectArgs {
    /// virsh's --live/--config/--current, one at most; none is --current.
    pub fn affect(&self) -> Result<Affect> {
        self.affect_or(Affect::Current)
    }

    /// Same, with what none of them means for this command.
    pub fn affect_or(&self, default: Affect) -> Result<Affect> {
        Ok(match (self.live, self.config, self.current) {
            (true, false, false) => Affect::Live,
            (false, true, false) => Affect::Config,
            (false, false, true) => Affect::Current,
            (false, false, false) => default,
            _ => bail!("Options --current, --live and --config are mutually exclusive"),
        })
    }
}
