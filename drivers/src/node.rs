//! A node's hypervisor drivers as one: the agent embeds several (`test`,
//! `qemu`, `kvm`), and a client of its local API sees the node's domains as
//! one list, as `virsh list` shows one host. A domain lives in exactly one
//! driver (the one its `spec.type` names); lookups and operations go to the
//! driver that has it, definitions to the driver of their type.

use std::collections::BTreeMap;

use vireo_crds::{Domain, DomainInfo, DomainType, NodeInfo, ObjectKind};

use crate::hypervisor::{Affect, BlockInfo, DomainRef, HypervisorDriver, VcpuInfo};
use crate::{Connection, Error, ListFilter, Lookup, Result};

/// The hypervisor drivers of one node, by domain type.
pub struct NodeHypervisor {
    drivers: BTreeMap<DomainType, Connection>,
    /// The first of them, for what the node answers as a whole.
    first: Connection,
}

impl NodeHypervisor {
    /// Needs at least one driver.
    pub fn new(drivers: BTreeMap<DomainType, Connection>) -> std::result::Result<Self, String> {
        let first = drivers
            .values()
            .next()
            .cloned()
            .ok_or("a node needs at least one hypervisor driver")?;
        Ok(Self { drivers, first })
    }

    fn first(&self) -> &dyn HypervisorDriver {
        self.first.hypervisor()
    }

    fn all(&self) -> impl Iterator<Item = &dyn HypervisorDriver> {
        self.drivers.values().map(|c| c.hypervisor())
    }

    /// The driver that holds the domain `name`.
    fn owner(&self, name: &str) -> Result<&dyn HypervisorDriver> {
        self.all()
            .find(|d| d.lookup_domain(Lookup::Name(name)).is_ok())
            .ok_or_else(|| Error::not_found(ObjectKind::Domain, name))
    }

    /// The driver of a definition's type; refused when another driver
    /// already holds a domain of that name.
    fn for_definition(&self, domain: &Domain) -> Result<&dyn HypervisorDriver> {
        let name = domain.metadata.name.clone().unwrap_or_default();
        let ty = domain.spec.domain_type;
        let target = self.drivers.get(&ty).ok_or_else(|| {
            Error::invalid_argument(
                ObjectKind::Domain,
                &name,
                format!(
                    "spec.type: domains of type '{ty}' do not run on this node (it embeds: {})",
                    self.drivers
                        .keys()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        for (other, conn) in &self.drivers {
            if *other != ty && conn.hypervisor().lookup_domain(Lookup::Name(&name)).is_ok() {
                return Err(Error::already_exists(
                    ObjectKind::Domain,
                    &name,
                    format!(" with type '{other}'; undefine it before changing its type"),
                ));
            }
        }
        Ok(target.hypervisor())
    }
}

impl HypervisorDriver for NodeHypervisor {
    fn name(&self) -> &'static str {
        "node"
    }
    fn hypervisor_version(&self) -> String {
        self.first().hypervisor_version()
    }
    fn node_info(&self) -> Result<NodeInfo> {
        crate::host::probe_node_info().map_err(|e| Error::OperationFailed {
            object: crate::error::ObjectName::new(ObjectKind::Host, "localhost"),
            message: e.to_string(),
        })
    }
    fn hostname(&self) -> Result<String> {
        self.first().hostname()
    }
    fn list_domains(&self, filter: ListFilter) -> Result<Vec<DomainRef>> {
        let mut out = Vec::new();
        for d in self.all() {
            out.extend(d.list_domains(filter)?);
        }
        Ok(out)
    }
    fn lookup_domain(&self, key: Lookup<'_>) -> Result<DomainRef> {
        let found: Vec<(DomainType, DomainRef)> = self
            .drivers
            .iter()
            .filter_map(|(ty, c)| c.hypervisor().lookup_domain(key).ok().map(|r| (*ty, r)))
            .collect();
        match found.as_slice() {
            [] => Err(Error::not_found(ObjectKind::Domain, key.describe())),
            [(_, r)] => Ok(r.clone()),
            // Drivers opened on their own number their own activations (as
            // each libvirt connection does), so an ID may name one domain
            // per driver; an agent's drivers share one counter (crate::ids).
            many => Err(Error::invalid_argument(
                ObjectKind::Domain,
                key.describe(),
                format!(
                    "names several domains on this node ({}); use a name or UUID",
                    many.iter()
                        .map(|(ty, r)| format!("{} of type {ty}", r.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
    fn domain_definition(&self, name: &str, inactive: bool) -> Result<Domain> {
        self.owner(name)?.domain_definition(name, inactive)
    }
    fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        self.owner(name)?.domain_info(name)
    }
    fn domain_is_persistent(&self, name: &str) -> Result<bool> {
        self.owner(name)?.domain_is_persistent(name)
    }
    fn domain_autostart(&self, name: &str) -> Result<bool> {
        self.owner(name)?.domain_autostart(name)
    }
    fn set_domain_autostart(&self, name: &str, autostart: bool) -> Result<()> {
        self.owner(name)?.set_domain_autostart(name, autostart)
    }
    fn set_domain_memory(&self, name: &str, bytes: u64) -> Result<()> {
        self.owner(name)?.set_domain_memory(name, bytes)
    }
    fn set_domain_vcpus(&self, name: &str, vcpus: u32) -> Result<()> {
        self.owner(name)?.set_domain_vcpus(name, vcpus)
    }
    fn define_domain(&self, domain: &Domain) -> Result<DomainRef> {
        self.for_definition(domain)?.define_domain(domain)
    }
    fn create_domain(&self, domain: &Domain) -> Result<DomainRef> {
        self.for_definition(domain)?.create_domain(domain)
    }
    fn undefine_domain(&self, name: &str) -> Result<()> {
        self.owner(name)?.undefine_domain(name)
    }
    fn start_domain(&self, name: &str) -> Result<DomainRef> {
        self.owner(name)?.start_domain(name)
    }
    fn shutdown_domain(&self, name: &str) -> Result<()> {
        self.owner(name)?.shutdown_domain(name)
    }
    fn reboot_domain(&self, name: &str) -> Result<()> {
        self.owner(name)?.reboot_domain(name)
    }
    fn reset_domain(&self, name: &str) -> Result<()> {
        self.owner(name)?.reset_domain(name)
    }
    fn suspend_domain(&self, name: &str) -> Result<()> {
        self.owner(name)?.suspend_domain(name)
    }
    fn resume_domain(&self, name: &str) -> Result<()> {
        self.owner(name)?.resume_domain(name)
    }
    fn destroy_domain(&self, name: &str) -> Result<()> {
        self.owner(name)?.destroy_domain(name)
    }
    fn console_path(&self, name: &str) -> Result<std::path::PathBuf> {
        self.owner(name)?.console_path(name)
    }
    fn set_domain_memory_flags(&self, name: &str, bytes: u64, affect: Affect) -> Result<()> {
        self.owner(name)?
            .set_domain_memory_flags(name, bytes, affect)
    }
    fn set_domain_vcpus_flags(&self, name: &str, vcpus: u32, affect: Affect) -> Result<()> {
        self.owner(name)?
            .set_domain_vcpus_flags(name, vcpus, affect)
    }
    fn set_domain_annotation(
        &self,
        name: &str,
        key: &str,
        value: Option<&str>,
        affect: Affect,
    ) -> Result<()> {
        self.owner(name)?
            .set_domain_annotation(name, key, value, affect)
    }
    fn domain_os_type(&self, name: &str) -> Result<String> {
        self.owner(name)?.domain_os_type(name)
    }
    fn domain_security_label(&self, name: &str) -> Result<Option<(String, bool)>> {
        self.owner(name)?.domain_security_label(name)
    }
    fn domain_scheduler(&self, name: &str) -> Result<(String, Vec<(String, String)>)> {
        self.owner(name)?.domain_scheduler(name)
    }
    fn domain_block_info(&self, name: &str, disk: &str) -> Result<BlockInfo> {
        self.owner(name)?.domain_block_info(name, disk)
    }
    fn domain_block_stats(&self, name: &str, disk: &str) -> Result<Vec<(String, i64)>> {
        self.owner(name)?.domain_block_stats(name, disk)
    }
    fn domain_interface_stats(&self, name: &str, iface: &str) -> Result<Vec<(String, i64)>> {
        self.owner(name)?.domain_interface_stats(name, iface)
    }
    fn domain_memory_stats(&self, name: &str) -> Result<Vec<(String, u64)>> {
        self.owner(name)?.domain_memory_stats(name)
    }
    fn domain_interface_addresses(&self, name: &str) -> Result<Option<Vec<(String, String)>>> {
        self.owner(name)?.domain_interface_addresses(name)
    }
    fn domain_vcpu_info(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        self.owner(name)?.domain_vcpu_info(name)
    }
    fn guest_info(&self, name: &str) -> Result<vireo_crds::GuestInfo> {
        self.owner(name)?.guest_info(name)
    }
    fn guest_fs_freeze(&self, name: &str, mountpoints: &[String]) -> Result<u64> {
        self.owner(name)?.guest_fs_freeze(name, mountpoints)
    }
    fn guest_fs_thaw(&self, name: &str) -> Result<u64> {
        self.owner(name)?.guest_fs_thaw(name)
    }
    fn guest_agent_shutdown(&self, name: &str, reboot: bool) -> Result<()> {
        self.owner(name)?.guest_agent_shutdown(name, reboot)
    }
    fn save_domain(&self, name: &str, path: &std::path::Path) -> Result<()> {
        self.owner(name)?.save_domain(name, path)
    }
    /// Goes to the driver that wrote the file (its header says which).
    fn restore_domain(&self, path: &std::path::Path) -> Result<DomainRef> {
        let shown = path.display().to_string();
        let (header, _) = crate::save::read(path).map_err(|e| e.into_error(&shown))?;
        let by_name = self.all().find(|d| d.name() == header.driver);
        let driver = match by_name {
            Some(d) => d,
            None => self
                .drivers
                .get(&header.definition.spec.domain_type)
                .map(|c| c.hypervisor())
                .ok_or_else(|| {
                    Error::invalid_argument(
                        ObjectKind::Domain,
                        &header.name,
                        format!(
                            "{shown} was saved by the {} driver, which this node does not run",
                            header.driver
                        ),
                    )
                })?,
        };
        driver.restore_domain(path)
    }
    fn migrate_prepare(
        &self,
        domain: &vireo_crds::Domain,
        params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationIncoming> {
        self.for_definition(domain)?.migrate_prepare(domain, params)
    }
    fn migrate_perform(
        &self,
        name: &str,
        incoming: &crate::migration::MigrationIncoming,
        params: &crate::migration::MigrationParams,
    ) -> Result<crate::migration::MigrationStats> {
        self.owner(name)?.migrate_perform(name, incoming, params)
    }
    fn migrate_finish(&self, name: &str, succeeded: bool) -> Result<Option<DomainRef>> {
        match self.owner(name) {
            Ok(driver) => driver.migrate_finish(name, succeeded),
            // A failed migration's target copy that is gone already (its
            // process died, and a transient domain went with it): nothing
            // is left to throw away.
            Err(Error::NotFound(_)) if !succeeded => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn migrate_confirm(&self, name: &str, succeeded: bool) -> Result<()> {
        self.owner(name)?.migrate_confirm(name, succeeded)
    }
    fn abort_job(&self, name: &str) -> Result<()> {
        self.owner(name)?.abort_job(name)
    }
    fn snapshot_create(
        &self,
        name: &str,
        params: &crate::snapshot::SnapshotParams,
    ) -> Result<crate::snapshot::SnapshotInfo> {
        self.owner(name)?.snapshot_create(name, params)
    }
    fn snapshot_list(&self, name: &str) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        self.owner(name)?.snapshot_list(name)
    }
    fn snapshot_get(&self, name: &str, snapshot: &str) -> Result<crate::snapshot::SnapshotInfo> {
        self.owner(name)?.snapshot_get(name, snapshot)
    }
    fn snapshot_current(&self, name: &str) -> Result<Option<crate::snapshot::SnapshotInfo>> {
        self.owner(name)?.snapshot_current(name)
    }
    fn snapshot_revert(
        &self,
        name: &str,
        snapshot: &str,
        to: crate::snapshot::RevertTo,
    ) -> Result<()> {
        self.owner(name)?.snapshot_revert(name, snapshot, to)
    }
    fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<()> {
        self.owner(name)?.snapshot_delete(name, snapshot)
    }
    fn managed_save(&self, name: &str) -> Result<()> {
        self.owner(name)?.managed_save(name)
    }
    fn has_managed_save(&self, name: &str) -> Result<bool> {
        self.owner(name)?.has_managed_save(name)
    }
    fn managed_save_remove(&self, name: &str) -> Result<()> {
        self.owner(name)?.managed_save_remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn test_conn() -> Connection {
        let t = Arc::new(crate::test::TestDriver::default_node());
        Connection::new("test:///default", t.clone(), t.clone(), t)
    }

    #[test]
    fn lists_merge_and_an_id_of_two_drivers_is_refused_naming_both() {
        let node = NodeHypervisor::new(BTreeMap::from([
            (DomainType::Test, test_conn()),
            (DomainType::Qemu, test_conn()),
        ]))
        .expect("two drivers");
        // libvirt's default test node has one running domain, `test`, ID 1.
        assert_eq!(node.list_domains(ListFilter::All).expect("list").len(), 2);
        let e = node.lookup_domain(Lookup::Id(1)).expect_err("ambiguous");
        let text = e.to_string();
        assert!(text.contains("several domains"), "{text}");
        assert!(
            text.contains("type test") && text.contains("type qemu"),
            "{text}"
        );
        let e = node.lookup_domain(Lookup::Id(99)).expect_err("unknown");
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert!(NodeHypervisor::new(BTreeMap::new()).is_err());
    }

    #[test]
    fn definitions_go_to_the_driver_of_their_type() {
        let node = NodeHypervisor::new(BTreeMap::from([(DomainType::Test, test_conn())]))
            .expect("one driver");
        let mut d = crate::conformance::test_driver_fixture().domain("typed");
        d.spec.domain_type = DomainType::Kvm;
        let e = node.define_domain(&d).expect_err("no kvm here");
        assert!(e.to_string().contains("spec.type"), "{e}");
        d.spec.domain_type = DomainType::Test;
        node.define_domain(&d).expect("test driver");
        assert!(node.lookup_domain(Lookup::Name("typed")).is_ok());
    }
}
