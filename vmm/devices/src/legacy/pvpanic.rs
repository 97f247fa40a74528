//! The pvpanic device at port 0x505, QEMU's convention: a guest kernel that
//! panics writes `PANICKED` to the port, and the VMM ends the machine as
//! crashed (its exit file says so, and the kvm driver hands it to
//! `lifecycle.onCrash`) instead of leaving a dead guest spinning.
//!
//! A read returns the events the device understands. `CRASH_LOADED` (a
//! crash kernel is taking over) is logged and left alone: the guest goes on.

use crate::bus::BusDevice;
use crate::legacy::power::{GuestRequest, RequestSink};

/// The guest panicked.
pub const PANICKED: u8 = 1 << 0;
/// A crash kernel was loaded and runs.
pub const CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    sink: std::sync::Arc<dyn RequestSink>,
}

impl PvPanic {
    pub fn new(sink: std::sync::Arc<dyn RequestSink>) -> Self {
        Self { sink }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0
            && let Some(b) = data.first_mut()
        {
            *b = PANICKED | CRASH_LOADED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&v)) if v & PANICKED != 0 => self.sink.request(GuestRequest::Panic),
            (0, Some(&v)) if v & CRASH_LOADED != 0 => {
                tracing::warn!("pvpanic: the guest loaded its crash kernel")
            }
            _ => tracing::debug!(offset, len = data.len(), "pvpanic: access ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::power::tests::Recorder;
    use std::sync::Arc;

    #[test]
    fn panicked_is_a_request_and_the_rest_is_not() {
        let rec = Arc::new(Recorder::default());
        let mut dev = PvPanic::new(rec.clone());
        let mut b = [0u8; 1];
        dev.read(0, &mut b);
        assert_eq!(b[0], PANICKED | CRASH_LOADED);
        dev.write(0, &[CRASH_LOADED]);
        dev.write(0, &[0]);
        dev.write(1, &[PANICKED]);
        dev.write(0, &[]);
        assert!(rec.0.lock().map(|v| v.is_empty()).unwrap_or(false));
        dev.write(0, &[PANICKED | CRASH_LOADED]);
        let got = rec.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(got, vec![GuestRequest::Panic]);
    }
}
