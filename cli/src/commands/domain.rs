//! Domain commands: list, dominfo, domstate, define, start, shutdown, ...

use anyhow::{Result, bail};
use serde_json::json;
use vireo_crds::Manifest;
use vireo_crds::quantity::parse_quantity;
use vireo_drivers::{Connection, Lookup};

use super::{Command, read_manifests, to_data, yes_no};
use crate::output::{Output, Table};

/// Resolves a name, ID or UUID to the domain's name.
/// A libvirt name (`QEMUGuest1`) also finds the Domain imported from it:
/// the Kubernetes form of the name whose `vireo.dev/libvirt-name`
/// annotation is that libvirt name.
pub fn resolve(conn: &Connection, text: &str) -> Result<vireo_drivers::DomainRef> {
    let hv = conn.hypervisor();
    match hv.lookup_domain(Lookup::domain(text)) {
        Err(vireo_drivers::Error::NotFound(e)) => {
            let (ns, name) = match text.rsplit_once('/') {
                Some((ns, name)) => (format!("{ns}/"), name),
                None => (String::new(), text),
            };
            let candidate = format!("{ns}{}", vireo_crds::libvirt_xml::kube_name(name));
            if candidate != text
                && let Ok(found) = hv.lookup_domain(Lookup::Name(&candidate))
                && hv
                    .domain_definition(&found.name, true)
                    .ok()
                    .and_then(|d| d.metadata.annotations)
                    .and_then(|a| a.get(vireo_crds::labels::LIBVIRT_NAME_ANNOTATION).cloned())
                    .is_some_and(|original| original == name)
            {
                return Ok(found);
            }
            Err(vireo_drivers::Error::NotFound(e).into())
        }
        other => Ok(other?),
    }
}

fn id_text(id: Option<u32>) -> String {
    id.map_or_else(|| "-".to_string(), |i| i.to_string())
}

pub fn run(conn: &Connection, command: &Command) -> Result<Output> {
    let hv = conn.hypervisor();
    Ok(match command {
        Command::List(args) => list(conn, args)?,
        Command::Dominfo(a) => {
            let d = resolve(conn, &a.domain)?;
            let info = hv.domain_info(&d.name)?;
            let persistent = hv.domain_is_persistent(&d.name)?;
            let autostart = hv.domain_autostart(&d.name)?;
            let max_kib = parse_quantity(&info.max_memory).unwrap_or(0) / 1024;
            let used_kib = parse_quantity(&info.memory).unwrap_or(0) / 1024;
            let cpu_s = info.cpu_time_ns as f64 / 1e9;
            let mut rows = vec![
                ("Id", id_text(d.id)),
                ("Name", d.name.clone()),
                ("UUID", d.uuid.clone()),
                ("OS Type", hv.domain_os_type(&d.name)?),
                ("State", info.state.to_string()),
                ("CPU(s)", info.vcpus.to_string()),
            ];
            if info.cpu_time_ns > 0 {
                rows.push(("CPU time", format!("{cpu_s:.1}s")));
            }
            rows.extend([
                ("Max memory", format!("{max_kib} KiB")),
                ("Used memory", format!("{used_kib} KiB")),
                ("Persistent", yes_no(persistent).to_string()),
                (
                    "Autostart",
                    if autostart { "enable" } else { "disable" }.to_string(),
                ),
                (
                    "Managed save",
                    yes_no(hv.has_managed_save(&d.name).unwrap_or(false)).to_string(),
                ),
            ]);
            let (model, doi) = hv.security_model();
            rows.push(("Security model", model));
            rows.push(("Security DOI", doi));
            if let Some((label, enforcing)) = hv.domain_security_label(&d.name)? {
                let mode = if enforcing { "enforcing" } else { "permissive" };
                rows.push(("Security label", format!("{label} ({mode})")));
            }
            Output::Fields {
                width: 15,
                rows,
                data: json!({
                    "id": d.id, "name": d.name, "uuid": d.uuid,
                    "info": info, "persistent": persistent, "autostart": autostart,
                }),
            }
        }
        Command::Domstate(a) => {
            let d = resolve(conn, &a.domain)?;
            let (state, reason) = hv.domain_state(&d.name)?;
            let text = if a.reason {
                format!("{state} ({reason})")
            } else {
                state.to_string()
            };
            Output::Text {
                text,
                data: json!({"state": state, "reason": reason}),
            }
        }
        Command::Domid(a) => {
            let d = resolve(conn, &a.domain)?;
            Output::Text {
                text: id_text(d.id),
                data: json!({"id": d.id}),
            }
        }
        Command::Domuuid(a) => {
            let d = resolve(conn, &a.domain)?;
            Output::Text {
                data: json!({"uuid": d.uuid}),
                text: d.uuid,
            }
        }
        Command::Domname(a) => {
            let d = resolve(conn, &a.domain)?;
            Output::Text {
                data: json!({"name": d.name}),
                text: d.name,
            }
        }
        Command::Dumpspec(a) => {
            let d = resolve(conn, &a.domain)?;
            let def = hv.domain_definition(&d.name, a.inactive)?;
            let data = to_data(&def)?;
            Output::Text {
                text: serde_yaml_ng::to_string(&def)?.trim_end().to_string(),
                data,
            }
        }
        Command::Dumpxml(a) => {
            let d = resolve(conn, &a.domain)?;
            let mut def = hv.domain_definition(&d.name, a.inactive)?;
            // libvirt's names take no '/': a node's `namespace/name` keeps
            // its name only.
            if let Some((_, name)) = d.name.split_once('/') {
                def.metadata.name = Some(name.to_string());
            }
            let xml = vireo_crds::libvirt_xml::domain_to_xml(&def);
            Output::Text {
                data: json!({"xml": xml}),
                text: xml.trim_end().to_string(),
            }
        }
        Command::Define(f) | Command::Create(f) => {
            let transient = matches!(command, Command::Create(_));
            let manifests = read_manifests(
                &f.file,
                "Domain",
                "net-define, pool-define or vol-create for other kinds",
            )?;
            let mut lines = Vec::new();
            for m in manifests {
                let Manifest::Domain(d) = m else { continue };
                let r = if transient {
                    hv.create_domain(&d)?
                } else {
                    hv.define_domain(&d)?
                };
                let verb = if transient { "created" } else { "defined" };
                lines.push(format!(
                    "Domain '{}' {verb} from {}",
                    r.name,
                    f.file.display()
                ));
            }
            Output::Message(lines.join("\n"))
        }
        Command::Undefine(a) => {
            let d = resolve(conn, &a.domain)?;
            hv.undefine_domain(&d.name)?;
            Output::Message(format!("Domain '{}' has been undefined", d.name))
        }
        Command::Start(a) => {
            let d = resolve(conn, &a.domain)?;
            hv.start_domain(&d.name)?;
            Output::Message(format!("Domain '{}' started", d.name))
        }
        Command::Reset(a) => {
            let d = resolve(conn, &a.domain)?;
            hv.reset_domain(&d.name)?;
            Output::Message(format!("Domain '{}' was reset", d.name))
        }
        Command::Suspend(a) => {
            let d = resolve(conn, &a.domain)?;
            hv.suspend_domain(&d.name)?;
            Output::Message(format!("Domain '{}' suspended", d.name))
        }
        Command::Resume(a) => {
            let d = resolve(conn, &a.domain)?;
            hv.resume_domain(&d.name)?;
            Output::Message(format!("Domain '{}' resumed", d.name))
        }
        Command::Destroy(a) => {
            let d = resolve(conn, &a.domain)?;
            hv.destroy_domain(&d.name)?;
            Output::Message(format!("Domain '{}' destroyed", d.name))
        }
        Command::Autostart(a) => {
            let d = resolve(conn, &a.domain)?;
            hv.set_domain_autostart(&d.name, !a.disable)?;
            let verb = if a.disable { "unmarked" } else { "marked" };
            Output::Message(format!("Domain '{}' {verb} as autostarted", d.name))
        }
        Command::Setmem(a) => {
            let d = resolve(conn, &a.domain)?;
            let bytes = crate::size::parse(&a.size, 1024).map_err(anyhow::Error::msg)?;
            // virsh's setmem without a flag changes the running domain only.
            hv.set_domain_memory_flags(
                &d.name,
                bytes,
                a.affect.affect_or(vireo_drivers::Affect::Live)?,
            )?;
            Output::Empty
        }
        Command::Setvcpus(a) => {
            let d = resolve(conn, &a.domain)?;
            // virsh's setvcpus without a flag changes the running domain only.
            hv.set_domain_vcpus_flags(
                &d.name,
                a.count,
                a.affect.affect_or(vireo_drivers::Affect::Live)?,
            )?;
            Output::Empty
        }
        _ => bail!("not a domain command"),
    })
}

/// `list`, with virsh's filters and its --name/--uuid forms.
fn list(conn: &Connection, args: &super::DomListArgs) -> Result<Output> {
    use vireo_crds::DomainState as S;
    let hv = conn.hypervisor();
    let any_state =
        args.state_running || args.state_paused || args.state_shutoff || args.state_other;
    // A state filter looks at every domain, active or not, as virsh's does.
    let filter = if args.all || any_state {
        vireo_drivers::ListFilter::All
    } else if args.inactive {
        vireo_drivers::ListFilter::Inactive
    } else {
        vireo_drivers::ListFilter::Active
    };
    // A connection that spans nodes (a cluster) adds where each one runs.
    let with_node = hv.spans_nodes();
    let mut headers = vec!["Id", "Name", "State"];
    if args.title {
        headers.push("Title");
    }
    if with_node {
        headers.push("Node");
    }
    let mut table = Table::new(&headers);
    let domains = if args.all_namespaces {
        hv.list_domains_all_namespaces(filter)?
    } else {
        hv.list_domains(filter)?
    };
    let mut data = Vec::new();
    let mut lines = Vec::new();
    for d in domains {
        let (state, reason) = hv.domain_state(&d.name)?;
        if any_state {
            let wanted = match state {
                S::Running => args.state_running,
                S::Paused => args.state_paused,
                S::Shutoff => args.state_shutoff,
                _ => args.state_other,
            };
            if !wanted {
                continue;
            }
        }
        if args.persistent || args.transient {
            let persistent = hv.domain_is_persistent(&d.name)?;
            if persistent != args.persistent {
                continue;
            }
        }
        if args.autostart || args.no_autostart {
            let autostart = hv.domain_autostart(&d.name)?;
            if autostart != args.autostart {
                continue;
            }
        }
        let node = if with_node {
            hv.domain_node(&d.name)?
        } else {
            None
        };
        let mut item =
            json!({"id": d.id, "name": d.name, "uuid": d.uuid, "state": state, "reason": reason});
        if with_node {
            item["node"] = json!(node);
        }
        data.push(item);
        match (args.uuid, args.name) {
            (true, true) => lines.push(format!("{} {}", d.uuid, d.name)),
            (true, false) => lines.push(d.uuid.clone()),
            (false, true) => lines.push(d.name.clone()),
            (false, false) => {}
        }
        let mut row = vec![id_text(d.id), d.name.clone(), state.to_string()];
        if args.title {
            let def = hv.domain_definition(&d.name, false)?;
            let title = def
                .metadata
                .annotations
                .as_ref()
                .and_then(|n| n.get(vireo_drivers::hypervisor::TITLE_ANNOTATION))
                .cloned()
                .unwrap_or_default();
            row.push(title);
        }
        if with_node {
            row.push(node.unwrap_or_else(|| "-".to_string()));
        }
        table.row(row);
    }
    Ok(if args.name || args.uuid {
        Output::Text {
            text: lines.join("\n"),
            data: data.into(),
        }
    } else {
        Output::Table {
            table,
            data: data.into(),
        }
    })
}
