//! Placement: the one Host a Domain should run on, or why none fits.
//!
//! A Host fits when it is ready and schedulable, embeds the Domain's driver,
//! carries the labels of its `nodeSelector`, has the memory and vCPUs left,
//! has every Network of the Domain active, and holds its volumes (a volume
//! already on a node pins the Domain there; an unplaced one needs its pool
//! active on the Host). Among the Hosts that fit, the one with the most free
//! memory wins (spreading load); names break ties, so the choice is stable.

use std::collections::{BTreeMap, BTreeSet};

/// What placement needs to know about a Host.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub unschedulable: bool,
    pub drivers: BTreeSet<String>,
    /// Memory for guests, in bytes.
    pub memory: u64,
    /// vCPUs for guests.
    pub vcpus: u64,
    /// Memory and vCPUs already given to Domains bound here.
    pub used_memory: u64,
    pub used_vcpus: u64,
    /// Networks active on this Host.
    pub networks: BTreeSet<String>,
    /// Storage pools active on this Host.
    pub pools: BTreeSet<String>,
}

/// A volume a Domain uses.
#[derive(Debug, Clone)]
pub struct VolumeNeed {
    pub name: String,
    pub pool: String,
    /// The node the volume lives on, if placed.
    pub node: Option<String>,
}

/// What a Domain asks for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub driver: String,
    pub memory: u64,
    pub vcpus: u64,
    pub node_selector: BTreeMap<String, String>,
    pub networks: BTreeSet<String>,
    pub volumes: Vec<VolumeNeed>,
}

/// Why a Host does not fit, counted across Hosts for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Misfit {
    NotReady,
    Unschedulable,
    NoDriver,
    Selector,
    Memory,
    Vcpus,
    Network,
    VolumeElsewhere,
    PoolInactive,
}

impl Misfit {
    fn describe(self) -> &'static str {
        match self {
            Self::NotReady => "not ready",
            Self::Unschedulable => "unschedulable",
            Self::NoDriver => "without the domain's driver",
            Self::Selector => "not matching spec.nodeSelector",
            Self::Memory => "with too little memory left",
            Self::Vcpus => "with too few vCPUs left",
            Self::Network => "without the domain's networks active",
            Self::VolumeElsewhere => "not holding the domain's volumes",
            Self::PoolInactive => "without the volumes' storage pools active",
        }
    }
}

fn misfit(host: &HostView, req: &Request) -> Option<Misfit> {
    if !host.ready {
        return Some(Misfit::NotReady);
    }
    if host.unschedulable {
        return Some(Misfit::Unschedulable);
    }
    if !host.drivers.contains(&req.driver) {
        return Some(Misfit::NoDriver);
    }
    if req
        .node_selector
        .iter()
        .any(|(k, v)| host.labels.get(k) != Some(v))
    {
        return Some(Misfit::Selector);
    }
    if req
        .volumes
        .iter()
        .any(|v| v.node.as_deref().is_some_and(|n| n != host.name))
    {
        return Some(Misfit::VolumeElsewhere);
    }
    if req
        .volumes
        .iter()
        .any(|v| v.node.is_none() && !host.pools.contains(&v.pool))
    {
        return Some(Misfit::PoolInactive);
    }
    if !req.networks.is_subset(&host.networks) {
        return Some(Misfit::Network);
    }
    if host.used_memory.saturating_add(req.memory) > host.memory {
        return Some(Misfit::Memory);
    }
    if host.used_vcpus.saturating_add(req.vcpus) > host.vcpus {
        return Some(Misfit::Vcpus);
    }
    None
}

/// Picks a Host, or explains in one line why none fits
/// (`0/3 hosts fit: 2 with too little memory left, 1 not ready`).
pub fn place<'a>(
    req: &Request,
    hosts: impl IntoIterator<Item = &'a HostView>,
) -> Result<String, String> {
    let mut best: Option<(&HostView, u64)> = None;
    let mut misfits: BTreeMap<Misfit, usize> = BTreeMap::new();
    let mut total = 0;
    for host in hosts {
        total += 1;
        match misfit(host, req) {
            Some(m) => *misfits.entry(m).or_default() += 1,
            None => {
                let free = host.memory - host.used_memory - req.memory;
                let better = match best {
                    None => true,
                    Some((b, bfree)) => free > bfree || (free == bfree && host.name < b.name),
                };
                if better {
                    best = Some((host, free));
                }
            }
        }
    }
    if let Some((host, _)) = best {
        return Ok(host.name.clone());
    }
    if total == 0 {
        return Err("0/0 hosts fit: no Host is registered (is a vireo-agent running?)".into());
    }
    let reasons: Vec<String> = misfits
        .iter()
        .map(|(m, n)| format!("{n} {}", m.describe()))
        .collect();
    Err(format!("0/{total} hosts fit: {}", reasons.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, memory_gib: u64, used_gib: u64) -> HostView {
        HostView {
            name: name.into(),
            ready: true,
            drivers: ["test".to_string()].into(),
            memory: memory_gib << 30,
            vcpus: 16,
            used_memory: used_gib << 30,
            networks: ["default".to_string()].into(),
            pools: ["images".to_string()].into(),
            ..HostView::default()
        }
    }

    fn req(memory_gib: u64) -> Request {
        Request {
            driver: "test".into(),
            memory: memory_gib << 30,
            vcpus: 1,
            ..Request::default()
        }
    }

    #[test]
    fn spreads_to_the_most_free_memory() {
        let hosts = [host("a", 8, 6), host("b", 8, 1), host("c", 8, 3)];
        assert_eq!(place(&req(1), &hosts), Ok("b".into()));
    }

    #[test]
    fn ties_break_by_name() {
        let hosts = [host("b", 8, 0), host("a", 8, 0)];
        assert_eq!(place(&req(1), &hosts), Ok("a".into()));
    }

    #[test]
    fn says_why_nothing_fits() {
        let mut down = host("c", 64, 0);
        down.ready = false;
        let hosts = [host("a", 8, 0), host("b", 8, 0), down];
        assert_eq!(
            place(&req(32), &hosts),
            Err("0/3 hosts fit: 1 not ready, 2 with too little memory left".into())
        );
        assert!(place(&req(1), &[]).is_err_and(|e| e.contains("no Host")));
    }

    #[test]
    fn selector_driver_networks_and_volumes() {
        let mut labelled = host("gpu", 8, 0);
        labelled.labels.insert("gpu".into(), "yes".into());
        let hosts = [host("a", 8, 0), labelled];
        let mut r = req(1);
        r.node_selector.insert("gpu".into(), "yes".into());
        assert_eq!(place(&r, &hosts), Ok("gpu".into()));

        let mut r = req(1);
        r.driver = "kvm".into();
        assert!(place(&r, &hosts).is_err_and(|e| e.contains("2 without the domain's driver")));

        let mut r = req(1);
        r.networks.insert("lan".into());
        assert!(place(&r, &hosts).is_err_and(|e| e.contains("networks")));

        let mut r = req(1);
        r.volumes.push(VolumeNeed {
            name: "disk".into(),
            pool: "images".into(),
            node: Some("gpu".into()),
        });
        assert_eq!(
            place(&r, &hosts),
            Ok("gpu".into()),
            "a placed volume pins the domain"
        );

        let mut r = req(1);
        r.volumes.push(VolumeNeed {
            name: "disk".into(),
            pool: "other".into(),
            node: None,
        });
        assert!(place(&r, &hosts).is_err_and(|e| e.contains("storage pools")));
    }

    #[test]
    fn vcpus_count_too() {
        let mut h = host("a", 8, 0);
        h.used_vcpus = 16;
        assert!(place(&req(1), &[h]).is_err_and(|e| e.contains("vCPUs")));
    }
}
