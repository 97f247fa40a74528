//! Pieces shared by every kind.

use std::fmt;

/// Kubernetes' standard condition type, used in every status.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The kinds of object in libvirt's model, as they are named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Domain,
    Network,
    StoragePool,
    StorageVol,
    Host,
    DomainSnapshot,
}

impl ObjectKind {
    /// The Kubernetes kind (`Domain`, `StoragePool`, ...).
    pub fn kind(self) -> &'static str {
        match self {
            Self::Domain => "Domain",
            Self::Network => "Network",
            Self::StoragePool => "StoragePool",
            Self::StorageVol => "StorageVol",
            Self::Host => "Host",
            Self::DomainSnapshot => "DomainSnapshot",
        }
    }
}

impl fmt::Display for ObjectKind {
    /// The word virsh uses in messages: `domain`, `network`, `storage pool`, `storage volume`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Domain => "domain",
            Self::Network => "network",
            Self::StoragePool => "storage pool",
            Self::StorageVol => "storage volume",
            Self::Host => "host",
            Self::DomainSnapshot => "domain snapshot",
        })
    }
}

/// Serde helper: skip a `bool` field when it is `false`.
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}
