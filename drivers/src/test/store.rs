//! A test node that outlives its process: `test:///DIR` keeps one JSON file
//! per object under DIR (as libvirt keeps a status file per running domain),
//! so an agent that restarts finds its "guests" as it left them, with the
//! same IDs.
//!
//! Layout: `DIR/node.json` (ID and bridge counters), `DIR/domains/`,
//! `DIR/networks/`, `DIR/pools/` (a pool file holds its volumes). Files are
//! written to a temporary name and renamed, so a crash leaves either the old
//! or the new file.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vireo_crds::NodeInfo;

use super::{DomainObj, Kind, State};

/// Where a persistent test node lives.
pub(super) struct Store {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeRecord {
    node: NodeInfo,
    next_domain_id: u32,
    next_bridge: u32,
}

/// Object names may hold any character but NUL; `/` and `%` are escaped.
fn file_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 5);
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out.push_str(".json");
    out
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn subdir(kind: Kind) -> &'static str {
    match kind {
        Kind::Domain => "domains",
        Kind::Network => "networks",
        Kind::Pool => "pools",
    }
}

fn read_all<T: for<'de> Deserialize<'de>>(dir: &Path) -> io::Result<Vec<T>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        out.push(value);
    }
    Ok(out)
}

impl Store {
    /// Opens (creating it if needed) the directory and loads what it holds.
    pub(super) fn open(dir: &Path, state: &mut State) -> io::Result<Self> {
        for kind in [Kind::Domain, Kind::Network, Kind::Pool] {
            std::fs::create_dir_all(dir.join(subdir(kind)))?;
        }
        let store = Self {
            dir: dir.to_path_buf(),
        };
        let node_path = dir.join("node.json");
        match std::fs::read(&node_path) {
            Ok(bytes) => {
                let rec: NodeRecord = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", node_path.display()),
                    )
                })?;
                state.node = rec.node;
                state.next_domain_id = rec.next_domain_id.max(1);
                state.next_bridge = rec.next_bridge;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => store.save_node(state)?,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        for mut d in read_all::<DomainObj>(&dir.join("domains"))? {
            if d.state == vireo_crds::DomainState::Running {
                d.running_since = Some(now);
            }
            // IDs never repeat, even if node.json was older than a domain file.
            if let Some(id) = d.id {
                state.next_domain_id = state.next_domain_id.max(id.saturating_add(1));
            }
            state
                .domains
                .insert(d.def.metadata.name.clone().unwrap_or_default(), d);
        }
        for n in read_all::<super::NetworkObj>(&dir.join("networks"))? {
            state
                .networks
                .insert(n.def.metadata.name.clone().unwrap_or_default(), n);
        }
        for p in read_all::<super::PoolObj>(&dir.join("pools"))? {
            state
                .pools
                .insert(p.def.metadata.name.clone().unwrap_or_default(), p);
        }
        Ok(store)
    }

    fn save_node(&self, state: &State) -> io::Result<()> {
        let rec = NodeRecord {
            node: state.node.clone(),
            next_domain_id: state.next_domain_id,
            next_bridge: state.next_bridge,
        };
        write_atomic(
            &self.dir.join("node.json"),
            &serde_json::to_vec_pretty(&rec)?,
        )
    }

    /// Writes the named object as it now is, or removes its file if it is gone.
    pub(super) fn save(&self, state: &State, kind: Kind, name: &str) -> io::Result<()> {
        let path = self.dir.join(subdir(kind)).join(file_name(name));
        let bytes = match kind {
            Kind::Domain => state.domains.get(name).map(|d| {
                let mut snapshot = d.clone();
                snapshot.cpu_time_ns = d.cpu_time();
                serde_json::to_vec_pretty(&snapshot)
            }),
            Kind::Network => state.networks.get(name).map(serde_json::to_vec_pretty),
            Kind::Pool => state.pools.get(name).map(serde_json::to_vec_pretty),
        };
        match bytes {
            Some(b) => write_atomic(&path, &b?)?,
            None => remove_if_present(&path)?,
        }
        self.save_node(state)
    }
}

#[cfg(test)]
mod tests {
    use super::file_name;

    #[test]
    fn names_become_safe_file_names() {
        assert_eq!(file_name("default/web"), "default%2Fweb.json");
        assert_eq!(file_name("100%"), "100%25.json");
        assert_eq!(file_name(".."), "...json");
    }
}
