//! The boot timer: a guest writes byte 123 at its MMIO address when it has
//! booted, and the VMM records how long that took from the start of its own
//! process (the convention Firecracker's guests already follow).

use crate::bus::BusDevice;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The byte a guest writes to say "booted".
pub const BOOT_COMPLETE: u8 = 123;

/// The recorded boot time, shared between the device and whoever reports it.
#[derive(Clone, Default)]
pub struct BootTime(Arc<AtomicU64>);

const UNSET: u64 = u64::MAX;

impl BootTime {
    pub fn new() -> Self {
        Self(Arc::new(AtomicU64::new(UNSET)))
    }

    /// Microseconds from process start to the guest's first boot-complete
    /// write, if it has written.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Acquire) {
            UNSET => None,
            v => Some(v),
        }
    }

    /// Sets the value a snapshot carried (`None`: not written yet).
    pub fn restore(&self, us: Option<u64>) {
        self.0.store(us.unwrap_or(UNSET), Ordering::Release);
    }

    fn record_first(&self, us: u64) -> bool {
        self.0
            .compare_exchange(UNSET, us, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The device on the MMIO bus.
pub struct BootTimer {
    start: Instant,
    time: BootTime,
}

impl BootTimer {
    /// `start` is the instant the VMM process started.
    pub fn new(start: Instant, time: BootTime) -> Self {
        Self { start, time }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_COMPLETE) {
            let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            if self.time.record_first(us) {
                tracing::info!(boot_time_us = us, "guest boot complete (boot timer)");
            } else {
                tracing::info!(
                    since_start_us = us,
                    "guest wrote the boot timer again (first value kept)"
                );
            }
        } else {
            tracing::debug!(offset, ?data, "boot timer: write ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_first_boot_complete_only() {
        let start = Instant::now() - Duration::from_millis(5);
        let time = BootTime::new();
        let mut dev = BootTimer::new(start, time.clone());
        dev.write(0, &[1]);
        dev.write(1, &[BOOT_COMPLETE]);
        assert_eq!(time.get(), None);
        dev.write(0, &[BOOT_COMPLETE]);
        let first = time.get();
        assert!(first.is_some_and(|us| us >= 5_000), "{first:?}");
        std::thread::sleep(Duration::from_millis(2));
        dev.write(0, &[BOOT_COMPLETE]);
        assert_eq!(time.get(), first);
    }
}
