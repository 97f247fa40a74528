//! Guest RAM: where it lives in guest-physical space, and handing it to KVM.
//!
//! RAM starts at guest-physical 0 and fills up to the 32-bit MMIO gap at
//! 3 GiB (boot timer, virtio-mmio, IOAPIC, LAPIC live there); whatever does
//! not fit below the gap continues at 4 GiB.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use vireo_vmm_devices::GuestMemory;

/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the gap: RAM resumes here.
pub const MMIO_GAP_END: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be at least 16 MiB (asked for {0} bytes)")]
    TooSmall(u64),
    #[error("mapping guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    #[error("registering guest memory with KVM: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("guest memory region too large for this host")]
    TooLarge,
}

/// The (start, length) ranges of RAM for `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Maps `size` bytes of anonymous memory laid out as [`ram_ranges`].
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    if size < 16 << 20 {
        return Err(MemoryError::TooSmall(size));
    }
    let ranges = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| usize::try_from(l).map(|l| (a, l)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| MemoryError::TooLarge)?;
    Ok(GuestMemory::from_ranges(&ranges)?)
}

/// Registers every region of `mem` as a KVM memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::TooLarge)?;
        let slot = u32::try_from(slot).map_err(|_| MemoryError::TooLarge)?;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `region.len()`
        // bytes owned by `mem`, which the VMM keeps alive for as long as the
        // VM exists (the `Vm` holds both), so KVM never sees freed memory.
        unsafe { vm.set_user_memory_region(r) }?;
    }
    Ok(())
}

/// Gives every page of guest RAM back to the kernel, so the guest sees zeros
/// again (a machine reset). Mappings stay where they are, so KVM's slots
/// stay valid.
pub fn zero(mem: &GuestMemory) -> std::io::Result<()> {
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        // SAFETY: `host..host+len` is exactly one private anonymous mapping
        // owned by `mem`; MADV_DONTNEED on it only replaces its pages with
        // zero-fill-on-demand pages, which is what a reset wants. No Rust
        // reference into guest memory is held across this call (guest memory
        // is only accessed through volatile slices).
        let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_gap() {
        let small = ram_ranges(256 << 20);
        assert_eq!(small, vec![(GuestAddress(0), 256 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big.len(), 2);
        assert_eq!(big[0].1, MMIO_GAP_START);
        assert_eq!(big[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(big[0].1 + big[1].1, 4 << 30);
    }

    #[test]
    fn zero_clears_memory() -> Result<(), Box<dyn std::error::Error>> {
        let mem = create(64 << 20)?;
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000))?;
        zero(&mem)?;
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000))?, 0);
        assert!(create(1 << 20).is_err());
        Ok(())
    }
}
