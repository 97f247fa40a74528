//! Device models of vireo-vmm.
//!
//! They see guest memory and a bus offset, never KVM: the VMM crate owns the
//! vCPUs and routes each exit to a device through [`bus::Bus`]. That keeps the
//! guest-facing parsing (virtio descriptor chains, device registers) testable
//! and fuzzable on any machine.

pub mod bus;
#[doc(hidden)]
pub mod fuzzing;
pub mod legacy;
pub mod snapshot;
pub mod virtio;

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
