//! `edit` (a domain's manifest or XML in $EDITOR, then define) and `event`
//! (lifecycle events, by watching the connection's domains).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vireo_crds::{DomainReason, DomainState, Manifest};
use vireo_drivers::{Connection, ListFilter, Lookup};

use super::{EditArgs, EventArgs};
use crate::output::Output;

/// `edit`: the persistent definition in $VISUAL or $EDITOR (else `vi`);
/// an unchanged file changes nothing, an invalid one is refused whole.
pub fn edit(conn: &Connection, a: &EditArgs) -> Result<Output> {
    let hv = conn.hypervisor();
    let d = super::domain::resolve(conn, &a.domain)?;
    let def = hv.domain_definition(&d.name, true)?;
    let original = if a.xml {
        vireo_crds::libvirt_xml::domain_to_xml(&def)
    } else {
        serde_yaml_ng::to_string(&def).context("cannot write the manifest")?
    };
    let ext = if a.xml { "xml" } else { "yaml" };
    let path = std::env::temp_dir().join(format!(
        "vireo-edit-{}-{}.{ext}",
        std::process::id(),
        d.uuid
    ));
    std::fs::write(&path, &original).with_context(|| format!("cannot write {}", path.display()))?;
    let result = run_editor(&path).and_then(|()| {
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    });
    let _ = std::fs::remove_file(&path);
    let edited = result?;
    let what = if a.xml {
        "XML configuration"
    } else {
        "manifest"
    };
    if edited == original {
        return Ok(Output::Message(format!(
            "Domain '{}' {what} not changed.",
            d.name
        )));
    }
    let manifest = if a.xml {
        vireo_crds::libvirt_xml::from_xml(&edited, &Default::default())
            .context("the edited XML is not valid; nothing was changed")?
            .manifest
    } else {
        let mut all = Manifest::parse_all(&edited)
            .context("the edited manifest is not valid; nothing was changed")?;
        if all.len() != 1 {
            bail!(
                "the edited file holds {} documents, not one Domain; nothing was changed",
                all.len()
            );
        }
        all.remove(0)
    };
    let Manifest::Domain(new) = manifest else {
        bail!("the edited file is not a Domain; nothing was changed");
    };
    if new.metadata.name.as_deref() != Some(d.name.as_str()) {
        bail!(
            "the edited domain is named {:?}, not '{}' (edit cannot rename); nothing was changed",
            new.metadata.name.unwrap_or_default(),
            d.name
        );
    }
    hv.define_domain(&new)
        .context("the edited domain was refused; nothing was changed")?;
    Ok(Output::Message(format!(
        "Domain '{}' {what} edited.",
        d.name
    )))
}

fn run_editor(path: &std::path::Path) -> Result<()> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".to_string());
    // Through the shell, so that EDITOR may carry arguments ("code --wait").
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("vireo-edit")
        .arg(path)
        .status()
        .with_context(|| format!("cannot run the editor '{editor}'"))?;
    if !status.success() {
        bail!("the editor '{editor}' failed ({status}); nothing was changed");
    }
    Ok(())
}

/// What one look at the domains saw: state and reason by name.
type Snapshot = BTreeMap<String, (DomainState, DomainReason)>;

fn snapshot(conn: &Connection, only: Option<&str>) -> Result<Snapshot> {
    let hv = conn.hypervisor();
    let mut out = Snapshot::new();
    for d in hv.list_domains(ListFilter::All)? {
        if only.is_some_and(|o| o != d.name) {
            continue;
        }
        // A domain that went away between the list and this call is gone.
        if let Ok(s) = hv.domain_state(&d.name) {
            out.insert(d.name, s);
        }
    }
    Ok(out)
}

/// virsh's event and detail words for a change of state.
fn lifecycle(
    before: Option<&(DomainState, DomainReason)>,
    after: Option<&(DomainState, DomainReason)>,
) -> Option<(&'static str, String)> {
    use DomainState as S;
    let reason = |r: &DomainReason| {
        let t = r.to_string();
        let mut c = t.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect::<String>())
            .unwrap_or_default()
    };
    match (before, after) {
        (None, Some((s, _))) if !s.is_active() => Some(("Defined", "Added".into())),
        (None, Some(_)) => Some(("Started", "Booted".into())),
        (Some((s, _)), None) if s.is_active() => Some(("Stopped", "Destroyed".into())),
        (Some(_), None) => Some(("Undefined", "Removed".into())),
        // Same state (a reboot keeps a domain running): no lifecycle event.
        (Some((a, _)), Some((b, _))) if a == b => None,
        (Some((a, _)), Some((S::Running, r))) if !a.is_active() => Some(("Started", reason(r))),
        (Some((S::Paused, _)), Some((S::Running, r))) => Some(("Resumed", reason(r))),
        // virsh's detail for a pause the user asked for is "Paused".
        (Some(_), Some((S::Paused, DomainReason::User))) => Some(("Suspended", "Paused".into())),
        (Some(_), Some((S::Paused, r))) => Some(("Suspended", reason(r))),
        (Some(_), Some((s, r))) if !s.is_active() => Some(("Stopped", reason(r))),
        (Some(_), Some((s, r))) => Some(("Started", format!("{s} ({})", reason(r)))),
        (None, None) => None,
    }
}

/// `event`: polls the connection's domains (every 200 ms) and prints each
/// change as virsh prints a lifecycle event. Works on every connection:
/// an agent's socket (the changes of its reconcilers and other clients),
/// a persistent test node, or this process's own test node.
pub fn events(conn: &Connection, a: &EventArgs) -> Result<Output> {
    use std::io::Write;
    if let Some(e) = &a.event
        && e != "lifecycle"
    {
        bail!("event '{e}' is not one Vireo reports: only 'lifecycle'");
    }
    let only = match &a.domain {
        Some(text) => Some(conn.hypervisor().lookup_domain(Lookup::domain(text))?.name),
        None => None,
    };
    let deadline = a.timeout.map(|s| Instant::now() + Duration::from_secs(s));
    let mut seen = snapshot(conn, only.as_deref())?;
    let mut count = 0u64;
    let stdout = std::io::stdout();
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let mut out = stdout.lock();
            let _ = writeln!(out, "event loop timed out");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = snapshot(conn, only.as_deref())?;
        let names: std::collections::BTreeSet<&String> = seen.keys().chain(now.keys()).collect();
        let mut out = stdout.lock();
        for name in names {
            if let Some((event, detail)) = lifecycle(seen.get(name), now.get(name)) {
                if a.timestamp {
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    let _ = write!(out, "{}.{:03}: ", t.as_secs(), t.subsec_millis());
                }
                let _ = writeln!(
                    out,
                    "event 'lifecycle' for domain '{name}': {event} {detail}"
                );
                count += 1;
            }
        }
        let _ = out.flush();
        seen = now;
        if count > 0 && !a.keep {
            break;
        }
    }
    Ok(Output::Message(format!("events received: {count}")))
}
