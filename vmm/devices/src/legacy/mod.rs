//! Legacy devices: 8250 serial, i8042, boot timer, power, CPU hot-plug controller (owned by the VMM core work).

pub mod boot_timer;
pub mod cpu_hotplug;
pub mod i8042;
pub mod power;
pub mod pvpanic;
pub mod serial;
