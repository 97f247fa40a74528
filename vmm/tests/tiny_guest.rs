//! Boots hand-assembled guests (bytes written by the test into an ELF, with
//! and without a PVH note) and checks what the VMM does with what they do.
//! Needs /dev/kvm; says so and skips when it is absent.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn hello_guest(marker: &str) -> Vec<u8> {
    Asm::new()
        .print(marker)
        .print("\n")
        .boot_timer()
        .power_off()
        .halt_forever()
        .finish()
}

fn boots_to_power_off(pvh: bool) {
    let marker = if pvh {
        "VIREO-TINY-PVH"
    } else {
        "VIREO-TINY-ELF64"
    };
    let image = elf(&hello_guest(marker), pvh);
    let mut vmm = Vmm::start_image("hello", &image, Opts::default());
    let (status, exit) = vmm.wait_exit(T);
    let console = vmm.console();
    assert!(console.contains(marker), "console: {console:?}");
    assert_eq!(exit["reason"], "poweroff", "{exit}");
    assert!(status.success(), "{status}");
    let boot_us = exit["boot_time_us"].as_u64().expect("boot time recorded");
    assert!(boot_us > 0);
    let stderr = vmm.stderr();
    let entry = if pvh {
        "PVH 32-bit entry"
    } else {
        "64-bit entry"
    };
    assert!(stderr.contains(entry), "{stderr}");
    assert!(stderr.contains("boot_time_us"), "{stderr}");
    assert!(stderr.contains("seccomp filter installed"), "{stderr}");
}

#[test]
fn elf64_guest_prints_records_boot_time_and_powers_off() {
    if kvm_available("elf64_guest_prints_records_boot_time_and_powers_off") {
        boots_to_power_off(false);
    }
}

#[test]
fn pvh_guest_prints_records_boot_time_and_powers_off() {
    if kvm_available("pvh_guest_prints_records_boot_time_and_powers_off") {
        boots_to_power_off(true);
    }
}
