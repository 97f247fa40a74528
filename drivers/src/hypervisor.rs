//! The hypervisor driver: domains (libvirt's `virDomain*` calls) and the node.

use vireo_crds::{Domain, DomainInfo, DomainReason, DomainState, NodeInfo};

use crate::{ListFilter, Lookup, Result};

/// What a lookup returns, like a `virDomainPtr`: the identity of a domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainRef {
    pub name: String,
    pub uuid: String,
    /// Runtime ID while active; `None` while inactive.
    pub id: Option<u32>,
}

/// A hypervisor driver. Operations take the domain's name (from a lookup)
/// and follow libvirt's rules:
///
/// * *define* makes a persistent, inactive domain (or updates the
///   definition; while the domain runs the new definition waits for the next
///   start); *create* makes a transient, active one;
/// * *undefine* removes an inactive domain, and makes an active one
///   transient: it keeps running and disappears when it stops;
/// * every activation gets a new ID; an inactive domain has none.
pub trait HypervisorDriver: Send + Sync {
    /// Driver name: `test`, `kvm`, `qemu`.
    fn name(&self) -> &'static str;
    /// Hypervisor version, as `major.minor.micro`.
    fn hypervisor_version(&self) -> String;
    /// libvirt's `virNodeGetInfo`.
    fn node_info(&self) -> Result<NodeInfo>;
    /// Node host name.
    fn hostname(&self) -> Result<String>;

    /// Domains matching the filter, in ID order for active ones then by name.
    fn list_domains(&self, filter: ListFilter) -> Result<Vec<DomainRef>>;
    /// How many domains match the filter.
    fn count_domains(&self, filter: ListFilter) -> Result<usize> {
        Ok(self.list_domains(filter)?.len())
    }
    /// Finds a domain by name, UUID or ID (IDs find active domains only).
    fn lookup_domain(&self, key: Lookup<'_>) -> Result<DomainRef>;

    /// The definition: the live one, or with `inactive` the persistent one
    /// that the next start uses (libvirt's `dumpxml --inactive`).
    fn domain_definition(&self, name: &str, inactive: bool) -> Result<Domain>;
    /// GetInfo: state and reason, memory, vCPUs, CPU time.
    fn domain_info(&self, name: &str) -> Result<DomainInfo>;
    /// State and reason (libvirt's `virDomainGetState`).
    fn domain_state(&self, name: &str) -> Result<(DomainState, DomainReason)> {
        let info = self.domain_info(name)?;
        Ok((info.state, info.reason))
    }
    /// Whether the domain has a persistent definition.
    fn domain_is_persistent(&self, name: &str) -> Result<bool>;
    /// Whether the domain starts with the node.
    fn domain_autostart(&self, name: &str) -> Result<bool>;
    /// Sets autostart (persistent domains only).
    fn set_domain_autostart(&self, name: &str, autostart: bool) -> Result<()>;
    /// Sets the current memory, in bytes: live while active, else in the
    /// definition. At most the maximum memory.
    fn set_domain_memory(&self, name: &str, bytes: u64) -> Result<()>;
    /// Sets the vCPU count: live while active, else in the definition. At
    /// most `maxVcpus`.
    fn set_domain_vcpus(&self, name: &str, vcpus: u32) -> Result<()>;

    /// Defines (or redefines) a persistent domain.
    fn define_domain(&self, domain: &Domain) -> Result<DomainRef>;
    /// Creates and starts a transient domain.
    fn create_domain(&self, domain: &Domain) -> Result<DomainRef>;
    /// Removes the persistent definition.
    fn undefine_domain(&self, name: &str) -> Result<()>;
    /// Starts an inactive persistent domain.
    fn start_domain(&self, name: &str) -> Result<DomainRef>;
    /// Asks the guest to power off; it ends shutoff (shutdown), at once or
    /// when the guest complies.
    fn shutdown_domain(&self, name: &str) -> Result<()>;
    /// Asks the guest to reboot; the domain's `lifecycle.onReboot` applies.
    fn reboot_domain(&self, name: &str) -> Result<()>;
    /// Resets the guest at once, like the reset button.
    fn reset_domain(&self, name: &str) -> Result<()>;
    /// Pauses the vCPUs: paused (user).
    fn suspend_domain(&self, name: &str) -> Result<()>;
    /// Resumes paused vCPUs: running (unpaused).
    fn resume_domain(&self, name: &str) -> Result<()>;
    /// Stops the domain at once: shutoff (destroyed).
    fn destroy_domain(&self, name: &str) -> Result<()>;

    /// The unix socket of a running domain's serial console (`vireo
    /// console`): bytes written go to the guest's serial port, bytes read
    /// come from it.
    fn console_path(&self, name: &str) -> Result<std::path::PathBuf> {
        Err(crate::Error::Unsupported {
            object: crate::error::ObjectName::new(vireo_crds::ObjectKind::Domain, name),
            driver: self.name(),
            operation: "a serial console (no guest runs)",
        })
    }
}
