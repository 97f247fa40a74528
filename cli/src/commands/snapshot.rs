//! Domain snapshots: snapshot-create-as, snapshot-list, snapshot-info,
//! snapshot-dumpxml, snapshot-current, snapshot-revert, snapshot-delete
//! (virsh's names, arguments and messages).

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;
use vireo_drivers::Connection;
use vireo_drivers::snapshot::{RevertTo, SnapshotInfo, SnapshotParams};

use super::domain::resolve;
use crate::output::{Output, Table};

#[derive(Args)]
pub struct CreateAsArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// The snapshot's name (default: the current time in Unix seconds):
    /// 1 to 64 letters, digits, '.', '_' or '-'.
    #[arg(value_name = "NAME", conflicts_with = "name")]
    pub snapshot: Option<String>,
    /// The snapshot's name, as virsh's --name.
    #[arg(long)]
    pub name: Option<String>,
    /// Free text kept with the snapshot.
    #[arg(long)]
    pub description: Option<String>,
    /// Disks only: no memory, even of a running domain (a revert boots it
    /// from the disks, or leaves it shut off).
    #[arg(long)]
    pub disk_only: bool,
}

#[derive(Args)]
pub struct ListArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Add a Parent column.
    #[arg(long)]
    pub parent: bool,
    /// Print the names only, one a line.
    #[arg(long)]
    pub name: bool,
    /// Print the snapshots as a tree of parents and children.
    #[arg(long, conflicts_with_all = ["parent", "name"])]
    pub tree: bool,
}

#[derive(Args)]
pub struct SnapshotArg {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// The snapshot (or --current).
    #[arg(required_unless_present = "current")]
    pub snapshotname: Option<String>,
    /// The domain's current snapshot.
    #[arg(long)]
    pub current: bool,
}

#[derive(Args)]
pub struct RevertArgs {
    #[command(flatten)]
    pub snapshot: SnapshotArg,
    /// End running, whatever the snapshot's state (a snapshot without
    /// memory boots from its disks).
    #[arg(long, conflicts_with = "paused")]
    pub running: bool,
    /// End paused, whatever the snapshot's state.
    #[arg(long)]
    pub paused: bool,
}

#[derive(Args)]
pub struct CurrentArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// Print the current snapshot's name only.
    #[arg(long)]
    pub name: bool,
}

#[derive(Args)]
pub struct DumpxmlArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// The snapshot.
    pub snapshotname: String,
}

/// The snapshot an argument names: the one given, or the current one.
fn which(conn: &Connection, domain: &str, a: &SnapshotArg) -> Result<String> {
    match (&a.snapshotname, a.current) {
        (Some(s), _) => Ok(s.clone()),
        (None, _) => match conn.hypervisor().snapshot_current(domain)? {
            Some(s) => Ok(s.name),
            None => bail!("domain '{domain}' has no current snapshot"),
        },
    }
}

pub fn create_as(conn: &Connection, a: &CreateAsArgs) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let params = SnapshotParams {
        name: a.snapshot.clone().or_else(|| a.name.clone()),
        description: a.description.clone(),
        disk_only: a.disk_only,
    };
    let s = conn.hypervisor().snapshot_create(&d.name, &params)?;
    Ok(Output::Message(format!(
        "Domain snapshot {} created",
        s.name
    )))
}

/// `2026-12-04 03:14:29 +0000`, as virsh prints a creation time (in UTC).
pub fn creation_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn data(s: &SnapshotInfo) -> serde_json::Value {
    json!({
        "name": s.name,
        "domain": s.domain,
        "description": s.description,
        "creationTime": s.creation_time,
        "state": s.state.virsh_name(),
        "parent": s.parent,
        "current": s.current,
        "memory": s.memory,
        "disks": s.disks,
        "children": s.children,
        "descendants": s.descendants,
    })
}

pub fn list(conn: &Connection, a: &ListArgs) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let all = conn.hypervisor().snapshot_list(&d.name)?;
    let data_all: Vec<_> = all.iter().map(data).collect();
    if a.name {
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        return Ok(Output::Text {
            text: names.join("\n"),
            data: data_all.into(),
        });
    }
    if a.tree {
        let mut text = String::new();
        for root in all.iter().filter(|s| s.parent.is_none()) {
            tree(&all, root, "", &mut text);
        }
        return Ok(Output::Text {
            text: text.trim_end().to_string(),
            data: data_all.into(),
        });
    }
    let mut table = if a.parent {
        Table::new(&["Name", "Creation Time", "State", "Parent"])
    } else {
        Table::new(&["Name", "Creation Time", "State"])
    };
    for s in &all {
        let mut row = vec![
            s.name.clone(),
            creation_time(s.creation_time),
            s.state.to_string(),
        ];
        if a.parent {
            row.push(s.parent.clone().unwrap_or_default());
        }
        table.row(row);
    }
    Ok(Output::Table {
        table,
        data: data_all.into(),
    })
}

/// virsh's `snapshot-list --tree`.
fn tree(all: &[SnapshotInfo], node: &SnapshotInfo, indent: &str, out: &mut String) {
    out.push_str(&format!("{indent}{}\n", node.name));
    let children: Vec<&SnapshotInfo> = all
        .iter()
        .filter(|s| s.parent.as_deref() == Some(node.name.as_str()))
        .collect();
    for child in children {
        out.push_str(&format!("{indent}  |\n"));
        out.push_str(&format!("{indent}  +- "));
        let mut sub = String::new();
        tree(all, child, &format!("{indent}      "), &mut sub);
        out.push_str(sub.trim_start());
    }
}

pub fn info(conn: &Connection, a: &SnapshotArg) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let snap = which(conn, &d.name, a)?;
    let s = conn.hypervisor().snapshot_get(&d.name, &snap)?;
    let location = if s.disks.iter().any(|x| x.location == "copy") {
        "copy"
    } else {
        "internal"
    };
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let rows = vec![
        ("Name", s.name.clone()),
        ("Domain", s.domain.clone()),
        ("Current", yes_no(s.current)),
        ("State", s.state.to_string()),
        ("Location", location.to_string()),
        ("Parent", s.parent.clone().unwrap_or_else(|| "-".into())),
        ("Children", s.children.to_string()),
        ("Descendants", s.descendants.to_string()),
        ("Metadata", "yes".to_string()),
        ("Memory", yes_no(s.memory)),
    ];
    Ok(Output::Fields {
        width: 15,
        rows,
        data: data(&s),
    })
}

/// A snapshot as libvirt's `<domainsnapshot>` XML (`snapshot-dumpxml`).
fn snapshot_xml(s: &SnapshotInfo, uuid: &str) -> String {
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('\'', "&apos;")
            .replace('"', "&quot;")
    };
    let mut x = String::from("<domainsnapshot>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(&s.name)));
    if let Some(d) = &s.description {
        x.push_str(&format!("  <description>{}</description>\n", esc(d)));
    }
    x.push_str(&format!("  <state>{}</state>\n", s.state));
    if let Some(p) = &s.parent {
        x.push_str(&format!(
            "  <parent>\n    <name>{}</name>\n  </parent>\n",
            esc(p)
        ));
    }
    x.push_str(&format!(
        "  <creationTime>{}</creationTime>\n",
        s.creation_time
    ));
    x.push_str(&format!(
        "  <memory snapshot='{}'/>\n",
        if s.memory { "internal" } else { "no" }
    ));
    x.push_str("  <disks>\n");
    for disk in &s.disks {
        x.push_str(&format!(
            "    <disk name='{}' snapshot='{}'/>\n",
            esc(&disk.name),
            esc(&disk.location)
        ));
    }
    x.push_str("  </disks>\n");
    x.push_str(&format!(
        "  <domain>\n    <name>{}</name>\n    <uuid>{}</uuid>\n  </domain>\n",
        esc(&s.domain),
        esc(uuid)
    ));
    x.push_str("</domainsnapshot>");
    x
}

pub fn dumpxml(conn: &Connection, a: &DumpxmlArgs) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let s = conn.hypervisor().snapshot_get(&d.name, &a.snapshotname)?;
    Ok(Output::Text {
        text: snapshot_xml(&s, &d.uuid),
        data: data(&s),
    })
}

pub fn current(conn: &Connection, a: &CurrentArgs) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let Some(s) = conn.hypervisor().snapshot_current(&d.name)? else {
        bail!("domain '{}' has no current snapshot", d.name);
    };
    Ok(Output::Text {
        text: if a.name {
            s.name.clone()
        } else {
            snapshot_xml(&s, &d.uuid)
        },
        data: data(&s),
    })
}

pub fn revert(conn: &Connection, a: &RevertArgs) -> Result<Output> {
    let d = resolve(conn, &a.snapshot.domain)?;
    let snap = which(conn, &d.name, &a.snapshot)?;
    let to = if a.running {
        RevertTo::Running
    } else if a.paused {
        RevertTo::Paused
    } else {
        RevertTo::Snapshot
    };
    conn.hypervisor().snapshot_revert(&d.name, &snap, to)?;
    // virsh prints nothing on success.
    Ok(Output::Empty)
}

pub fn delete(conn: &Connection, a: &SnapshotArg) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let snap = which(conn, &d.name, a)?;
    conn.hypervisor().snapshot_delete(&d.name, &snap)?;
    Ok(Output::Message(format!("Domain snapshot {snap} deleted")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn creation_times_read_like_virsh_in_utc() {
        assert_eq!(super::creation_time(0), "1970-01-01 00:00:00 +0000");
        assert_eq!(
            super::creation_time(1_709_217_296),
            "2024-02-29 14:34:56 +0000"
        );
    }
}
