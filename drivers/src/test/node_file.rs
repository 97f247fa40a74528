//! Loading a node file into the test driver.

use vireo_crds::{Manifest, ObjectKind};

use super::{State, TestDriver};
use crate::Error;
use vireo_crds::DomainReason;

/// Annotation that sets an object's initial state in a node file.
pub const STATE_ANNOTATION: &str = "test.vireo.dev/state";

fn annotation<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

impl TestDriver {
    /// Adds every object of a YAML stream, in order (pools before their volumes).
    pub(super) fn load(&self, text: &str) -> Result<(), String> {
        let manifests = Manifest::parse_all(text).map_err(|e| e.to_string())?;
        let mut st = self.lock();
        for m in manifests {
            load_one(&mut st, m).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn bad_state(kind: ObjectKind, name: &str, value: &str, allowed: &str) -> Error {
    Error::invalid_argument(
        kind,
        name,
        format!("annotation {STATE_ANNOTATION}: '{value}' is not one of {allowed}"),
    )
}

fn load_one(st: &mut State, m: Manifest) -> Result<(), Error> {
    match m {
        Manifest::Domain(d) => {
            let r = st.define(&d)?;
            match annotation(&d.metadata, STATE_ANNOTATION).unwrap_or("running") {
                // libvirt's test driver loads its domains running, reason unknown.
                "running" => {
                    st.start(&r.name, DomainReason::Unknown)?;
                }
                "paused" => {
                    st.start(&r.name, DomainReason::Unknown)?;
                    st.pause(&r.name)?;
                }
                "shutoff" => {}
                other => {
                    return Err(bad_state(
                        ObjectKind::Domain,
                        &r.name,
                        other,
                        "running, paused, shutoff",
                    ));
                }
            }
        }
        Manifest::Network(n) => {
            let r = st.define_network(&n)?;
            match annotation(&n.metadata, STATE_ANNOTATION).unwrap_or("active") {
                "active" => st.start_network(&r.name)?,
                "inactive" => {}
                other => {
                    return Err(bad_state(
                        ObjectKind::Network,
                        &r.name,
                        other,
                        "active, inactive",
                    ));
                }
            }
        }
        Manifest::StoragePool(p) => {
            let r = st.define_pool(&p)?;
            match annotation(&p.metadata, STATE_ANNOTATION).unwrap_or("active") {
                "active" => st.start_pool(&r.name)?,
                "inactive" => {}
                other => {
                    return Err(bad_state(
                        ObjectKind::StoragePool,
                        &r.name,
                        other,
                        "active, inactive",
                    ));
                }
            }
        }
        Manifest::StorageVol(v) => {
            st.create_volume(&v)?;
        }
        Manifest::Host(h) => {
            if let Some(info) = h.status.and_then(|s| s.node_info) {
                st.node = info;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{HypervisorDriver, ListFilter, NetworkDriver, StorageDriver};
    use vireo_crds::DomainState;

    use super::*;

    #[test]
    fn loads_states_volumes_and_node_info() {
        let d = TestDriver::empty(super::super::default_node_info());
        d.load(
            r#"
apiVersion: vireo.dev/v1alpha1
kind: Host
metadata: {name: n1}
spec: {}
status:
  nodeInfo: {cpuModel: x86_64, cpus: 4, mhz: 2000, numaNodes: 1, sockets: 1, cores: 4, threads: 1, memoryBytes: 8589934592}
---
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata: {name: a, annotations: {test.vireo.dev/state: paused}}
spec: {type: test, memory: 1Gi, vcpus: 1}
---
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata: {name: b, annotations: {test.vireo.dev/state: shutoff}}
spec: {type: test, memory: 1Gi, vcpus: 1}
---
apiVersion: vireo.dev/v1alpha1
kind: StoragePool
metadata: {name: p, annotations: {test.vireo.dev/capacity: 10Gi}}
spec: {path: /p}
---
apiVersion: vireo.dev/v1alpha1
kind: StorageVol
metadata: {name: disk}
spec: {pool: p, capacity: 4Gi}
---
apiVersion: vireo.dev/v1alpha1
kind: Network
metadata: {name: n, annotations: {test.vireo.dev/state: inactive}}
spec: {forwardMode: isolated}
"#,
        )
        .expect("loads");
        assert_eq!(d.node_info().expect("node").cpus, 4);
        assert_eq!(d.domain_state("a").expect("a").0, DomainState::Paused);
        assert_eq!(d.domain_state("b").expect("b").0, DomainState::Shutoff);
        assert_eq!(d.pool_info("p").expect("p").available, 6 << 30);
        assert_eq!(d.count_networks(ListFilter::Inactive).expect("n"), 1);
        assert_eq!(
            d.network_info("n").expect("n").bridge.as_deref(),
            Some("virbr0"),
            "a network without a bridge gets virbrN"
        );
    }

    #[test]
    fn bad_annotation_is_refused_with_its_name() {
        let d = TestDriver::empty(super::super::default_node_info());
        let err = d
            .load("apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: a, annotations: {test.vireo.dev/state: flying}}\nspec: {type: test, memory: 1Gi, vcpus: 1}\n")
            .expect_err("refused");
        assert!(
            err.contains("domain 'a'") && err.contains("flying"),
            "{err}"
        );
    }
}
