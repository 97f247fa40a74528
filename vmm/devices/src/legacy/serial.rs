//! COM1: vm-superio's 8250/16550 model on the port-I/O bus.
//!
//! Output goes to any `Write` (the VMM's console fan-out); input is queued with
//! [`SerialDevice::enqueue_input`]. The interrupt is an [`IrqLine`].

use crate::bus::{BusDevice, IrqLine};
use std::io::{self, Write};
use std::sync::Arc;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// The serial's interrupt as vm-superio wants it.
#[derive(Clone)]
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Number of registers of an 8250.
pub const SERIAL_REGISTERS: u64 = 8;

/// The serial port device.
pub struct SerialDevice<W: Write + Send> {
    // Only `None` for the instant of a reset.
    inner: Option<Serial<IrqTrigger, NoEvents, W>>,
    irq: IrqTrigger,
}

impl<W: Write + Send> SerialDevice<W> {
    pub fn new(irq: Arc<dyn IrqLine>, out: W) -> Self {
        let irq = IrqTrigger(irq);
        Self {
            inner: Some(Serial::new(irq.clone(), out)),
            irq,
        }
    }

    /// Queues bytes for the guest to read (as if typed). Returns how many fit
    /// in the receive FIFO; the rest are the caller's to keep or drop.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let Some(serial) = self.inner.as_mut() else {
            return 0;
        };
        let room = serial.fifo_capacity();
        let take = bytes.len().min(room);
        if take == 0 {
            return 0;
        }
        match serial.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = ?e, "serial: input not queued");
                0
            }
        }
    }

    /// The port's registers and unread input, for a snapshot.
    pub fn save_state(&self) -> Option<crate::snapshot::SerialSnapshot> {
        let st = self.inner.as_ref()?.state();
        Some(crate::snapshot::SerialSnapshot {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer,
        })
    }

    /// Restores [`SerialDevice::save_state`]; the output stays where it
    /// goes. More unread input than the FIFO holds is refused.
    pub fn restore_state(&mut self, s: &crate::snapshot::SerialSnapshot) -> Result<(), String> {
        // vm-superio's FIFO holds 64 bytes; checked before the old port is
        // taken apart, so a refused state leaves it working.
        if s.in_buffer.len() > 64 {
            return Err(format!(
                "serial: {} unread input bytes saved, the FIFO holds 64",
                s.in_buffer.len()
            ));
        }
        let Some(old) = self.inner.take() else {
            return Err("the serial port is gone".into());
        };
        let st = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let out = old.into_writer();
        match Serial::from_state(&st, self.irq.clone(), NoEvents, out) {
            Ok(serial) => {
                self.inner = Some(serial);
                Ok(())
            }
            // Only the interrupt line can fail here (the FIFO was checked).
            Err(e) => Err(format!("serial state refused: {e:?}")),
        }
    }

    /// The output side (tests read what the guest wrote).
    pub fn writer(&self) -> Option<&W> {
        self.inner.as_ref().map(|s| s.writer())
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (self.inner.as_mut(), u8::try_from(offset), data.first_mut()) {
            (Some(serial), Ok(off), Some(byte)) if offset < SERIAL_REGISTERS => {
                *byte = serial.read(off);
            }
            _ => tracing::debug!(offset, len = data.len(), "serial: read ignored"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (self.inner.as_mut(), u8::try_from(offset), data.first()) {
            (Some(serial), Ok(off), Some(&value)) if offset < SERIAL_REGISTERS => {
                if let Err(e) = serial.write(off, value) {
                    tracing::debug!(error = ?e, "serial: write failed");
                }
            }
            _ => tracing::debug!(offset, len = data.len(), "serial: write ignored"),
        }
    }

    fn reset(&mut self) {
        if let Some(old) = self.inner.take() {
            let out = old.into_writer();
            match Serial::from_state(&SerialState::default(), self.irq.clone(), NoEvents, out) {
                Ok(s) => self.inner = Some(s),
                Err(e) => tracing::error!(error = ?e, "serial: reset failed; port is gone"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl IrqLine for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn output_input_and_reset() {
        let irq = Arc::new(Count::default());
        let mut dev = SerialDevice::new(irq.clone(), Vec::new());
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(dev.writer().map(|w| w.as_slice()), Some(&b"hi"[..]));
        // Enable the received-data interrupt, then type.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut c = [0u8];
        dev.read(0, &mut c);
        assert_eq!(c[0], b'o');
        // Offsets past the 8 registers and empty accesses are ignored.
        dev.write(9, &[1]);
        dev.write(0, &[]);
        let mut big = [0xffu8; 2];
        dev.read(100, &mut big);
        assert_eq!(big, [0, 0]);
        dev.reset();
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "FIFO emptied by reset");
        // Output survives a reset (same writer).
        assert_eq!(dev.writer().map(|w| w.len()), Some(2));
    }
}
