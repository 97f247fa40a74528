//! Labels, finalizers, annotations and field managers shared by the
//! operator and the agents: the only contract between them besides the types.

/// Label the operator puts on a Domain or StorageVol it binds to a Host; the
/// agent of that Host watches objects with its name here.
pub const NODE: &str = "vireo.dev/node";

/// Finalizer of the agent that realized a namespaced object on its node:
/// removed once the object is torn down there.
pub const NODE_CLEANUP_FINALIZER: &str = "vireo.dev/node-cleanup";

/// Finalizer of the operator on a StorageVol: held while a Domain uses it.
pub const IN_USE_FINALIZER: &str = "vireo.dev/in-use-protection";

/// Prefix of the per-node finalizers on cluster-scoped Networks and
/// StoragePools: `node.vireo.dev/<node>` while realized on that node.
pub const NODE_FINALIZER_PREFIX: &str = "node.vireo.dev/";

/// Annotation of an object imported from libvirt XML whose libvirt name is
/// not a Kubernetes object name (`QEMUGuest1`, `web_01`): the name as
/// libvirt had it, which `dumpxml` writes back.
pub const LIBVIRT_NAME_ANNOTATION: &str = "vireo.dev/libvirt-name";

/// Annotation on a Domain asking how its agent stops it while its
/// `runStrategy` says it must stop: `destroy` stops it at once (virsh's
/// `destroy`, which `vireo -c kube:/// destroy` sets); absent, or anything
/// else, the agent asks the guest to shut down first and destroys it only
/// after its stop timeout.
pub const STOP_ANNOTATION: &str = "vireo.dev/stop";

/// The [`STOP_ANNOTATION`] value that stops a domain at once.
pub const STOP_DESTROY: &str = "destroy";

/// Annotation on a Domain asking its agent to keep it paused: `true`
/// suspends a running domain (`vireo -c kube:/// suspend`); removing it
/// resumes a domain paused by the user (`resume`).
pub const PAUSED_ANNOTATION: &str = "vireo.dev/paused";

/// Annotation on a Domain asking its agent for one action on the running
/// domain: `reboot` or `reset` (`vireo -c kube:/// reboot|reset`). The
/// agent carries it out once and removes the annotation.
pub const REQUEST_ANNOTATION: &str = "vireo.dev/request";

/// Annotation the operator puts on a Domain while a DomainMigration of it
/// is in progress (its value: that DomainMigration's name): one migration
/// at a time, and the source's agent leaves the domain to the migration's
/// steps meanwhile. Removed, with the binding moved on success, when the
/// migration ends.
pub const MIGRATION_ANNOTATION: &str = "vireo.dev/migration";

/// Finalizer the operator puts on a DomainMigration it accepted and takes
/// off when the migration ended: deleting one in flight cancels it (the
/// agents' steps fail it, or abort its send) instead of leaving the guest
/// paused or marked.
pub const MIGRATION_FINALIZER: &str = "vireo.dev/migration-cleanup";

/// Annotation the operator puts on a Domain whose Host is drained and
/// whose `evictionStrategy` is `Shutdown` (its value: that Host): the agent
/// there shuts the guest down (destroying it after its stop timeout),
/// undefines it and says `Evicted=True`; the operator then unbinds it.
pub const EVICT_ANNOTATION: &str = "vireo.dev/evict";

/// Annotation the operator leaves on a Domain it unbound after an
/// eviction (its value: the Host it left), so that the binding recorded in
/// status is not restored and placement picks another Host.
pub const EVICTED_FROM_ANNOTATION: &str = "vireo.dev/evicted-from";

/// Label on the DomainMigrations the operator creates to drain a Host
/// (its value: that Host).
pub const DRAIN_LABEL: &str = "vireo.dev/drain";

/// Whether an annotation is one of the requests above, which the agent
/// carries out rather than copying into the node's definition.
pub fn is_request_annotation(key: &str) -> bool {
    matches!(
        key,
        STOP_ANNOTATION
            | PAUSED_ANNOTATION
            | REQUEST_ANNOTATION
            | MIGRATION_ANNOTATION
            | EVICT_ANNOTATION
            | EVICTED_FROM_ANNOTATION
    )
}

/// Field manager of the operator.
pub const OPERATOR_MANAGER: &str = "vireo-operator";

/// Field manager of the agent on a node: `vireo-agent/<node>`.
pub fn agent_manager(node: &str) -> String {
    format!("vireo-agent/{node}")
}

/// Namespace of the agents' heartbeat Leases and of the operator's leader Lease.
pub const SYSTEM_NAMESPACE: &str = "vireo-system";

/// Name of the operator's leader-election Lease.
pub const OPERATOR_LEASE: &str = "vireo-operator";

/// The per-node finalizer name for a cluster-scoped object.
pub fn node_finalizer(node: &str) -> String {
    format!("{NODE_FINALIZER_PREFIX}{node}")
}

/// Whether a node name can be used as a label value (at most 63
/// characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric).
pub fn is_label_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// The key a Domain or StorageVol has in a node's drivers: `namespace/name`.
pub fn node_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}
