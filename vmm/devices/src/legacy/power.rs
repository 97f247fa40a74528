//! The power device at port 0x600: the ACPI hardware-reduced sleep control,
//! sleep status and reset registers the FADT points at.
//!
//! A write of `SLP_TYP << 2 | SLP_EN` with `SLP_TYP` 5 (the value the DSDT's
//! `_S5_` package hands the guest) is power-off; a write of the FADT's reset
//! value (1) is a reset. Everything else is logged and ignored.

use crate::bus::BusDevice;

/// What the guest asked of the machine. Devices hand these to the VMM through
/// a [`RequestSink`]; they never act on the machine themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// Power the machine off (ACPI S5).
    PowerOff,
    /// Reset (reboot) the machine.
    Reset,
    /// The guest ejected this vCPU (CPU hot-plug controller).
    EjectCpu(u32),
    /// The guest's kernel panicked (pvpanic).
    Panic,
}

/// Where a device delivers a [`GuestRequest`] (the VMM's event loop; a
/// recorder in tests).
pub trait RequestSink: Send + Sync {
    fn request(&self, request: GuestRequest);
}

/// Bit position of SLP_TYP in the sleep control register.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYP mask once shifted down.
pub const SLP_TYP_MASK: u8 = 0x7;
/// SLP_EN: the guest means it.
pub const SLP_EN: u8 = 1 << 5;
/// The sleep type `_S5_` advertises.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The FADT's reset value.
pub const RESET_VALUE: u8 = 1;

/// The power-control register block (one byte).
pub struct PowerDevice {
    sink: std::sync::Arc<dyn RequestSink>,
}

impl PowerDevice {
    pub fn new(sink: std::sync::Arc<dyn RequestSink>) -> Self {
        Self { sink }
    }

    /// Decodes one byte written to the register.
    pub fn decode(value: u8) -> Option<GuestRequest> {
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE {
            Some(GuestRequest::PowerOff)
        } else if value == RESET_VALUE {
            Some(GuestRequest::Reset)
        } else {
            None
        }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS never set while the guest runs.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&value)) => match Self::decode(value) {
                Some(request) => self.sink.request(request),
                None => tracing::debug!(value, "power: write ignored"),
            },
            _ => tracing::debug!(offset, len = data.len(), "power: access ignored"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    pub(crate) struct Recorder(pub Mutex<Vec<GuestRequest>>);

    impl RequestSink for Recorder {
        fn request(&self, request: GuestRequest) {
            if let Ok(mut v) = self.0.lock() {
                v.push(request);
            }
        }
    }

    #[test]
    fn s5_is_power_off_and_one_is_reset() {
        let rec = Arc::new(Recorder::default());
        let mut dev = PowerDevice::new(rec.clone());
        dev.write(0, &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        dev.write(0, &[RESET_VALUE]);
        // S5 without SLP_EN, another sleep state, and a wrong offset do nothing.
        dev.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        dev.write(0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        dev.write(7, &[RESET_VALUE]);
        dev.write(0, &[]);
        let got = rec.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(got, vec![GuestRequest::PowerOff, GuestRequest::Reset]);
        let mut buf = [0xffu8; 4];
        dev.read(0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
