//! Fuzz input = a libvirt XML description. The import may refuse it, with
//! one line; it must never panic, and what it imports must pass the checks
//! `define` applies and come back from its own export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_crds::Manifest;
use vireo_crds::Validate;
use vireo_crds::libvirt_xml::{
    ImportOptions, domain_to_xml, from_xml, network_to_xml, pool_to_xml,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let options = ImportOptions {
        pool: Some("images".into()),
    };
    let imported = match from_xml(text, &options) {
        Ok(i) => i,
        Err(e) => {
            assert!(
                !e.to_string().contains('\n'),
                "an error of several lines: {e}"
            );
            return;
        }
    };
    assert!(imported.notes.len() <= vireo_crds::libvirt_xml::MAX_NOTES + 1);
    let again = match &imported.manifest {
        Manifest::Domain(d) => {
            d.spec.validate().expect("an imported Domain is valid");
            domain_to_xml(d)
        }
        Manifest::Network(n) => {
            n.spec.validate().expect("an imported Network is valid");
            network_to_xml(n)
        }
        Manifest::StoragePool(p) => {
            p.spec.validate().expect("an imported StoragePool is valid");
            pool_to_xml(p)
        }
        Manifest::StorageVol(_) | Manifest::Host(_) => return,
    };
    if let Err(e) = from_xml(&again, &options) {
        panic!("its own export does not import: {e}\n{again}");
    }
});
