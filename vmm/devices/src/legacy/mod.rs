//! Legacy devices: 8250 serial, i8042, boot timer, power (owned by the VMM core work).
