//! Routing guest port-I/O and MMIO accesses to devices.
//!
//! One [`Bus`] for ports and one for MMIO. An access nobody claims is logged
//! (rate-limited) and ignored; reads of it return zeros.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vireo_vmm_devices::bus::BusDevice;

/// A device shared between the bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{name}: range {base:#x}+{len:#x} overlaps {other}")]
    Overlap {
        name: &'static str,
        base: u64,
        len: u64,
        other: &'static str,
    },
    #[error("{0}: empty or wrapping range")]
    BadRange(&'static str),
}

struct Range {
    base: u64,
    len: u64,
    name: &'static str,
    dev: SharedDevice,
}

/// Locks a device even if a previous holder panicked (the device state is
/// still the best we have; the VMM must keep going).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An address space of devices.
pub struct Bus {
    kind: &'static str,
    ranges: Vec<Range>,
    unknown: AtomicU64,
}

impl Bus {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            ranges: Vec::new(),
            unknown: AtomicU64::new(0),
        }
    }

    /// Registers `dev` at `base..base+len`.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::BadRange(name));
        };
        if let Some(o) = self
            .ranges
            .iter()
            .find(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap {
                name,
                base,
                len,
                other: o.name,
            });
        }
        self.ranges.push(Range {
            base,
            len,
            name,
            dev,
        });
        self.ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&Range, u64)> {
        let i = self.ranges.partition_point(|r| r.base <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        let offset = addr - r.base;
        // The whole access must fall inside the device.
        (offset.checked_add(len as u64)? <= r.len).then_some((r, offset))
    }

    fn unknown_access(&self, what: &str, addr: u64, len: usize) {
        let n = self.unknown.fetch_add(1, Ordering::Relaxed) + 1;
        // Drivers find virtio-mmio devices by reading the slots' magic
        // value (QEMU's microvm has 24 slots, we fill fewer): an empty slot
        // is discovery, not a fault.
        let window = crate::boot::layout::VIRTIO_MMIO_BASE
            ..crate::boot::layout::VIRTIO_MMIO_BASE + 24 * crate::boot::layout::VIRTIO_MMIO_SIZE;
        if self.kind == "mmio" && window.contains(&addr) {
            tracing::debug!(
                addr = format_args!("{addr:#x}"),
                "guest {what} of an empty virtio-mmio slot"
            );
            return;
        }
        // The first few, then every power of two: a guest hammering an
        // absent address cannot flood the log.
        if n <= 16 || n.is_power_of_two() {
            tracing::warn!(
                bus = self.kind,
                addr = format_args!("{addr:#x}"),
                len,
                total_unknown = n,
                "guest {what} of an address no device claims; ignored"
            );
        }
    }

    /// A guest read; zeros if nobody is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((r, offset)) => lock(&r.dev).read(offset, data),
            None => {
                data.fill(0);
                self.unknown_access("read", addr, data.len());
            }
        }
    }

    /// A guest write; dropped if nobody is there.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((r, offset)) => lock(&r.dev).write(offset, data),
            None => self.unknown_access("write", addr, data.len()),
        }
    }

    /// Resets every device (machine reset).
    pub fn reset_all(&self) {
        for r in &self.ranges {
            lock(&r.dev).reset();
        }
    }

    /// How many unclaimed accesses the guest made.
    pub fn unknown_accesses(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }
}

/// Both buses, as the vCPU threads see them.
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Mem(Vec<u8>);
    impl BusDevice for Mem {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(x) = self.0.get_mut(offset as usize + i) {
                    *x = *b;
                }
            }
        }
    }

    #[test]
    fn routes_by_range_and_ignores_the_rest() {
        let mut bus = Bus::new("test");
        let a: SharedDevice = Arc::new(Mutex::new(Mem(vec![0; 8])));
        bus.insert("a", 0x100, 8, a.clone()).unwrap();
        bus.insert("b", 0x108, 8, Arc::new(Mutex::new(Mem(vec![0; 8]))))
            .unwrap();
        assert!(bus.insert("c", 0x104, 8, a.clone()).is_err());
        assert!(bus.insert("d", 0x1000, 0, a.clone()).is_err());
        assert!(bus.insert("e", u64::MAX, 2, a.clone()).is_err());
        bus.write(0x102, &[7, 8]);
        let mut buf = [0u8; 2];
        bus.read(0x102, &mut buf);
        assert_eq!(buf, [7, 8]);
        // Straddling two devices, below, above, at the very top: ignored.
        let mut buf = [0xffu8; 4];
        bus.read(0x106, &mut buf);
        assert_eq!(buf, [0; 4]);
        bus.write(0x50, &[1]);
        bus.write(u64::MAX, &[1]);
        bus.read(0x200, &mut buf);
        assert_eq!(bus.unknown_accesses(), 4);
    }
}
