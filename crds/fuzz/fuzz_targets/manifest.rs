//! Fuzz input = a YAML (or JSON) manifest stream. Parsing may refuse it;
//! it must never panic, and a Domain it reads must export to XML without
//! panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_crds::Manifest;
use vireo_crds::libvirt_xml::{ImportOptions, domain_to_xml, from_xml};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(all) = Manifest::parse_all(text) else {
        return;
    };
    for m in all {
        if let Manifest::Domain(d) = m {
            let xml = domain_to_xml(&d);
            let _ = from_xml(&xml, &ImportOptions::default());
        }
    }
});
