//! The device fuzz target: its input format and harness are
//! `vireo_vmm_devices::fuzzing` (shared with the stable-Rust run in
//! `tests/fuzz_stable.rs`). Any panic, or any host access outside guest
//! memory (caught by ASan), is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vireo_vmm_devices::fuzzing::run_one(data));
