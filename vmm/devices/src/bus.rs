//! How the VMM reaches a device: a bus of address ranges, and a line to raise
//! an interrupt.

use std::io;
use std::os::fd::RawFd;

/// A device on the MMIO or port-I/O bus. `offset` is relative to the start of
/// the range the device was registered at. A device must never panic on any
/// offset or length a guest can produce: unknown accesses are logged and
/// ignored (reads return zeros).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Descriptors the VMM's event loop watches for this device (readable
    /// means `handle_event` has work: a tap with frames, a socket with input).
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Called by the event loop when one of `event_fds` is readable.
    fn handle_event(&mut self, _fd: RawFd) {}
    /// Back to power-on state (guest reboot or `reset` on the control API).
    fn reset(&mut self) {}
}

/// An interrupt line the device raises (an irqfd in the VMM, a counter in
/// tests).
pub trait IrqLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}
