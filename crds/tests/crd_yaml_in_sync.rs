//! The committed CRD YAML is what the types generate.

use std::path::PathBuf;

#[test]
fn committed_crds_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/vireo/crds");
    let mut stale = Vec::new();
    for crd in vireo_crds::crd::all() {
        let name = vireo_crds::crd::file_name(&crd);
        let want = vireo_crds::crd::to_yaml(&crd).expect("CRD serializes");
        let have = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        // The same files scripts/gen-crds writes, without building the
        // operator: VIREO_UPDATE_CRDS=1 cargo test -p vireo-crds --test crd_yaml_in_sync
        if have != want && std::env::var_os("VIREO_UPDATE_CRDS").is_some() {
            std::fs::write(dir.join(&name), &want).expect("CRD file written");
            continue;
        }
        if have != want {
            stale.push(name);
        }
    }
    let files = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert!(
        stale.is_empty() && files == vireo_crds::crd::all().len(),
        "charts/vireo/crds is out of date with the types ({stale:?}, {files} files): run scripts/gen-crds and commit"
    );
}

#[test]
fn crds_have_status_printer_columns_and_rules() {
    for crd in vireo_crds::crd::all() {
        let v = &crd.spec.versions[0];
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}: status subresource"
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 4),
            "{name}: printer columns"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{name}: short names"
        );
    }
    let domain = serde_json::to_string(&vireo_crds::crd::all()[0]).expect("json");
    for rule in [
        "spec.currentMemory must not be greater than spec.memory",
        "spec.uuid cannot change once set",
        "x-kubernetes-list-map-keys",
    ] {
        assert!(domain.contains(rule), "Domain CRD lacks {rule}");
    }
}
