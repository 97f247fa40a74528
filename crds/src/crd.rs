//! The CustomResourceDefinitions, generated from the types.
//!
//! The YAML files under `charts/vireo/crds/` are this module's output,
//! written by `scripts/gen-crds`; a test fails when they and the types differ.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{
    Domain, DomainMigration, DomainRestore, DomainSnapshot, Host, Network, StoragePool, StorageVol,
};

/// Every Vireo CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        Domain::crd(),
        Network::crd(),
        StoragePool::crd(),
        StorageVol::crd(),
        Host::crd(),
        DomainSnapshot::crd(),
        DomainRestore::crd(),
        DomainMigration::crd(),
    ]
}

/// File name of a CRD under `charts/vireo/crds/` (`domains.vireo.dev.yaml`).
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// The YAML of one CRD, with the header the generated files carry.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml_ng::Error> {
    Ok(format!(
        "# Generated from the vireo-crds types by scripts/gen-crds. Do not edit.\n{}",
        serde_yaml_ng::to_string(crd)?
    ))
}
