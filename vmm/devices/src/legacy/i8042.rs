//! The i8042 keyboard controller at ports 0x60 (data) and 0x64
//! (status/command), bus offsets 0 and 4.
//!
//! vm-superio's `I8042Device` handles the one command that matters to a VM,
//! pulse-reset (0xFE to port 0x64). Around it this model answers enough of
//! the controller and keyboard protocol for a guest driver to probe it
//! (self-test, configuration byte, keyboard reset/identify/ack), and can
//! deliver Ctrl-Alt-Del as scan-code set 2 bytes 0x14 0x11 0xE0 0x71, which
//! is how the VMM asks a guest to shut down.

use crate::bus::{BusDevice, IrqLine};
use crate::legacy::power::{GuestRequest, RequestSink};
use std::collections::VecDeque;
use std::sync::Arc;
use vm_superio::{I8042Device, Trigger};

/// Offset of port 0x60 (data).
pub const DATA_OFFSET: u64 = 0;
/// Offset of port 0x64 (status on read, command on write).
pub const COMMAND_OFFSET: u64 = 4;
/// The command that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xFE;
/// Ctrl, Alt, Del in scan-code set 2 (make codes).
pub const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xE0, 0x71];

const SR_OUTPUT_FULL: u8 = 0x01;
const SR_SYSTEM_FLAG: u8 = 0x04;
const SR_COMMAND: u8 = 0x08;
const SR_KEYLOCK_OPEN: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_XLATE: u8 = 0x40;

const ACK: u8 = 0xFA;
const OUTPUT_LIMIT: usize = 64;

/// What the next data-port write means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    WriteConfig,
    WriteOutputPort,
    WriteKbdBuffer,
    KbdArgument,
}

/// Forwards vm-superio's reset trigger to the VMM.
struct ResetTrigger(Arc<dyn RequestSink>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(GuestRequest::Reset);
        Ok(())
    }
}

/// The controller.
pub struct I8042 {
    reset: I8042Device<ResetTrigger>,
    irq: Arc<dyn IrqLine>,
    config: u8,
    status_command: bool,
    pending: Pending,
    output: VecDeque<u8>,
    output_port: u8,
}

impl I8042 {
    pub fn new(sink: Arc<dyn RequestSink>, irq: Arc<dyn IrqLine>) -> Self {
        Self {
            reset: I8042Device::new(ResetTrigger(sink)),
            irq,
            config: CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_XLATE,
            status_command: false,
            pending: Pending::None,
            output: VecDeque::new(),
            output_port: 0x01,
        }
    }

    /// The controller's state, for a snapshot.
    pub fn save_state(&self) -> crate::snapshot::I8042Snapshot {
        crate::snapshot::I8042Snapshot {
            config: self.config,
            status_command: self.status_command,
            pending: match self.pending {
                Pending::None => 0,
                Pending::WriteConfig => 1,
                Pending::WriteOutputPort => 2,
                Pending::WriteKbdBuffer => 3,
                Pending::KbdArgument => 4,
            },
            output: self.output.iter().copied().collect(),
            output_port: self.output_port,
        }
    }

    /// Restores [`I8042::save_state`]; an unknown `pending` or more output
    /// than the controller buffers is refused.
    pub fn restore_state(&mut self, s: &crate::snapshot::I8042Snapshot) -> Result<(), String> {
        let pending = match s.pending {
            0 => Pending::None,
            1 => Pending::WriteConfig,
            2 => Pending::WriteOutputPort,
            3 => Pending::WriteKbdBuffer,
            4 => Pending::KbdArgument,
            other => return Err(format!("i8042: unknown pending command {other}")),
        };
        if s.output.len() > OUTPUT_LIMIT {
            return Err(format!(
                "i8042: {} output bytes saved, the controller holds {OUTPUT_LIMIT}",
                s.output.len()
            ));
        }
        self.config = s.config;
        self.status_command = s.status_command;
        self.pending = pending;
        self.output = s.output.iter().copied().collect();
        self.output_port = s.output_port;
        Ok(())
    }

    /// Queues Ctrl-Alt-Del for the guest and raises the keyboard interrupt.
    pub fn send_ctrl_alt_del(&mut self) {
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_LIMIT {
            tracing::debug!(byte, "i8042: output buffer full, byte dropped");
            return;
        }
        self.output.push_back(byte);
        self.interrupt();
    }

    fn interrupt(&self) {
        if self.config & CTR_KBD_INT != 0
            && let Err(e) = self.irq.trigger()
        {
            tracing::warn!(error = %e, "i8042: interrupt failed");
        }
    }

    fn status(&self) -> u8 {
        let mut s = SR_KEYLOCK_OPEN;
        if !self.output.is_empty() {
            s |= SR_OUTPUT_FULL;
        }
        if self.config & CTR_SYSTEM_FLAG != 0 {
            s |= SR_SYSTEM_FLAG;
        }
        if self.status_command {
            s |= SR_COMMAND;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.status_command = true;
        self.pending = Pending::None;
        match cmd {
            0x20 => self.push(self.config),
            0x60 => self.pending = Pending::WriteConfig,
            0xA7 | 0xA8 | 0xAD | 0xAE => {} // aux/keyboard disable/enable
            0xA9 => self.push(0xFF),        // no aux port
            0xAA => self.push(0x55),        // controller self-test passed
            0xAB => self.push(0x00),        // keyboard interface test passed
            0xD0 => self.push(self.output_port),
            0xD1 => self.pending = Pending::WriteOutputPort,
            0xD2 => self.pending = Pending::WriteKbdBuffer,
            CMD_RESET_CPU => {
                // vm-superio's model recognises the pulse and calls our sink.
                let _ = self.reset.write(COMMAND_OFFSET as u8, cmd);
            }
            _ => tracing::debug!(cmd, "i8042: command ignored"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status_command = false;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteConfig => self.config = value,
            Pending::WriteOutputPort => {
                self.output_port = value;
                if value & 0x01 == 0 {
                    // Clearing the reset line through the output port is a
                    // reset too.
                    let _ = self.reset.write(COMMAND_OFFSET as u8, CMD_RESET_CPU);
                }
            }
            Pending::WriteKbdBuffer => self.push(value),
            Pending::KbdArgument => self.push(ACK),
            Pending::None => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, value: u8) {
        match value {
            0xFF => {
                self.push(ACK);
                self.push(0xAA); // basic assurance test passed
            }
            0xF2 => {
                self.push(ACK);
                self.push(0xAB);
                self.push(0x83);
            }
            0xED | 0xF0 | 0xF3 => {
                self.push(ACK);
                self.pending = Pending::KbdArgument;
            }
            _ => self.push(ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            DATA_OFFSET => {
                let v = self.output.pop_front().unwrap_or(0);
                if !self.output.is_empty() {
                    self.interrupt();
                }
                v
            }
            COMMAND_OFFSET => self.status(),
            _ => {
                tracing::debug!(offset, "i8042: read ignored");
                return;
            }
        };
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (DATA_OFFSET, Some(&v)) => self.data(v),
            (COMMAND_OFFSET, Some(&v)) => self.command(v),
            _ => tracing::debug!(offset, len = data.len(), "i8042: write ignored"),
        }
    }

    fn reset(&mut self) {
        self.config = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_XLATE;
        self.status_command = false;
        self.pending = Pending::None;
        self.output.clear();
        self.output_port = 0x01;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::power::tests::Recorder;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl IrqLine for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_reaches_the_sink() {
        let rec = Arc::new(Recorder::default());
        let mut dev = I8042::new(rec.clone(), Arc::new(Count::default()));
        dev.write(COMMAND_OFFSET, &[0xAA]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x55);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        let got = rec.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(got, vec![GuestRequest::Reset]);
    }

    #[test]
    fn ctrl_alt_del_is_delivered_in_order_with_interrupts() {
        let irq = Arc::new(Count::default());
        let mut dev = I8042::new(Arc::new(Recorder::default()), irq.clone());
        dev.send_ctrl_alt_del();
        assert!(irq.0.load(Ordering::SeqCst) >= CTRL_ALT_DEL.len());
        let mut got = Vec::new();
        while read(&mut dev, COMMAND_OFFSET) & SR_OUTPUT_FULL != 0 {
            got.push(read(&mut dev, DATA_OFFSET));
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn config_byte_round_trips_and_keyboard_acks() {
        let mut dev = I8042::new(Arc::new(Recorder::default()), Arc::new(Count::default()));
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(DATA_OFFSET, &[0x23]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x23);
        dev.write(DATA_OFFSET, &[0xFF]);
        assert_eq!(read(&mut dev, DATA_OFFSET), ACK);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0xAA);
        // Garbage offsets and lengths are harmless.
        dev.write(2, &[1]);
        dev.write(DATA_OFFSET, &[]);
        let mut buf = [0xffu8; 8];
        dev.read(3, &mut buf);
        assert_eq!(buf, [0; 8]);
    }
}
