//! The CPU hot-plug controller: four byte-wide I/O ports through which the
//! guest learns that the VMM wants a vCPU added or removed, and ejects a
//! vCPU it was asked to give up.
//!
//! | offset | read | write |
//! |---|---|---|
//! | 0 `SEL` | the selected vCPU index | selects a vCPU |
//! | 1 `STA` | selected vCPU: bit 0 enabled, bit 1 insert pending, bit 2 remove pending | bit 1: insert seen (clears it); bit 3: eject (honoured only while a remove is pending) |
//! | 2 `PEND` | lowest vCPU index with a request pending, 0xFF if none | ignored |
//! | 3 `CNT` | number of vCPUs (the boot count: the most there can be) | ignored |
//!
//! The VMM raises the controller's interrupt (a GED in the DSDT) after
//! changing requests. An eject is handed to the VMM as
//! [`GuestRequest::EjectCpu`]; the VMM then parks that vCPU. vCPU 0 is never
//! removed.

use std::sync::Arc;

use crate::bus::{BusDevice, IrqLine};
use crate::legacy::power::{GuestRequest, RequestSink};

pub const SEL: u64 = 0;
pub const STA: u64 = 1;
pub const PEND: u64 = 2;
pub const CNT: u64 = 3;
/// Ports the controller takes.
pub const PORTS: u64 = 4;

pub const STA_ENABLED: u8 = 1;
pub const STA_INSERT: u8 = 2;
pub const STA_REMOVE: u8 = 4;
/// Written to `STA`: eject the selected vCPU.
pub const STA_EJECT: u8 = 8;
/// `PEND` when nothing is pending.
pub const NONE_PENDING: u8 = 0xff;
/// Most vCPUs the controller describes (indices fit a byte, 0xFF is "none").
pub const MAX_CPUS: u32 = 254;

#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    enabled: bool,
    insert: bool,
    remove: bool,
}

/// The controller.
pub struct CpuHotplug {
    cpus: Vec<Cpu>,
    sel: u8,
    sink: Arc<dyn RequestSink>,
    irq: Arc<dyn IrqLine>,
    ignored: u64,
}

impl CpuHotplug {
    /// `count` vCPUs (at most [`MAX_CPUS`]), all enabled.
    pub fn new(count: u32, sink: Arc<dyn RequestSink>, irq: Arc<dyn IrqLine>) -> Self {
        let n = count.min(MAX_CPUS) as usize;
        CpuHotplug {
            cpus: vec![
                Cpu {
                    enabled: true,
                    ..Cpu::default()
                };
                n
            ],
            sel: 0,
            sink,
            irq,
            ignored: 0,
        }
    }

    /// Which vCPUs are enabled and what is pending, for a snapshot.
    pub fn save_state(&self) -> crate::snapshot::CpuHotplugSnapshot {
        crate::snapshot::CpuHotplugSnapshot {
            cpus: self
                .cpus
                .iter()
                .map(|c| crate::snapshot::HotplugCpu {
                    enabled: c.enabled,
                    insert: c.insert,
                    remove: c.remove,
                })
                .collect(),
            sel: self.sel,
        }
    }

    /// Restores [`CpuHotplug::save_state`] into a controller with the same
    /// number of vCPUs (vCPU 0 stays enabled).
    pub fn restore_state(&mut self, s: &crate::snapshot::CpuHotplugSnapshot) -> Result<(), String> {
        if s.cpus.len() != self.cpus.len() {
            return Err(format!(
                "CPU hot-plug: {} vCPUs saved, this machine has {}",
                s.cpus.len(),
                self.cpus.len()
            ));
        }
        if s.cpus.first().is_some_and(|c| !c.enabled) {
            return Err("CPU hot-plug: vCPU 0 saved as ejected".into());
        }
        for (c, saved) in self.cpus.iter_mut().zip(&s.cpus) {
            *c = Cpu {
                enabled: saved.enabled,
                insert: saved.insert,
                remove: saved.remove,
            };
        }
        self.sel = s.sel;
        Ok(())
    }

    /// vCPUs the controller has.
    pub fn count(&self) -> u32 {
        self.cpus.len() as u32
    }

    /// vCPUs enabled (not ejected).
    pub fn enabled_count(&self) -> u32 {
        self.cpus.iter().filter(|c| c.enabled).count() as u32
    }

    pub fn is_enabled(&self, index: u32) -> bool {
        self.cpus.get(index as usize).is_some_and(|c| c.enabled)
    }

    /// Asks the guest to give up vCPU `index` (not 0, and enabled); `false`
    /// if there is nothing to ask. Cancels a pending insert.
    pub fn request_remove(&mut self, index: u32) -> bool {
        match self.cpus.get_mut(index as usize) {
            Some(c) if index != 0 && c.enabled => {
                c.insert = false;
                let new = !c.remove;
                c.remove = true;
                new
            }
            _ => false,
        }
    }

    /// Enables vCPU `index` again (the VMM has made its thread runnable) and
    /// tells the guest; `false` if it was already enabled or does not exist.
    /// An enabled vCPU with a remove pending just has the request cancelled.
    pub fn plug(&mut self, index: u32) -> bool {
        match self.cpus.get_mut(index as usize) {
            Some(c) if !c.enabled => {
                *c = Cpu {
                    enabled: true,
                    insert: true,
                    remove: false,
                };
                true
            }
            Some(c) => {
                c.remove = false;
                false
            }
            None => false,
        }
    }

    /// Raises the controller's interrupt.
    pub fn signal(&self) {
        if let Err(e) = self.irq.trigger() {
            tracing::warn!(error = %e, "cpu-hotplug: raising the interrupt failed");
        }
    }

    fn pending(&self) -> u8 {
        self.cpus
            .iter()
            .position(|c| c.insert || c.remove)
            .map_or(NONE_PENDING, |i| i as u8)
    }

    fn status(&self) -> u8 {
        self.cpus.get(usize::from(self.sel)).map_or(0, |c| {
            (u8::from(c.enabled) * STA_ENABLED)
                | (u8::from(c.insert) * STA_INSERT)
                | (u8::from(c.remove) * STA_REMOVE)
        })
    }

    fn write_status(&mut self, v: u8) {
        let index = u32::from(self.sel);
        let Some(c) = self.cpus.get_mut(usize::from(self.sel)) else {
            self.log_ignored(u64::from(v), "status write for a vCPU that does not exist");
            return;
        };
        if v & STA_INSERT != 0 {
            c.insert = false;
        }
        if v & STA_EJECT != 0 {
            if c.remove && c.enabled && index != 0 {
                c.enabled = false;
                c.remove = false;
                c.insert = false;
                tracing::info!(vcpu = index, "cpu-hotplug: guest ejected the vCPU");
                self.sink.request(GuestRequest::EjectCpu(index));
            } else {
                self.log_ignored(u64::from(index), "eject without a remove request refused");
            }
        }
    }

    fn log_ignored(&mut self, value: u64, what: &str) {
        self.ignored = self.ignored.wrapping_add(1);
        if self.ignored <= 16 || self.ignored.is_power_of_two() {
            tracing::warn!(value, count = self.ignored, "cpu-hotplug: {what}");
        }
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = match offset {
            SEL => self.sel,
            STA => self.status(),
            PEND => self.pending(),
            CNT => self.cpus.len() as u8,
            _ => 0,
        };
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            SEL => self.sel = v,
            STA => self.write_status(v),
            _ => self.log_ignored(offset, "write to a read-only port ignored"),
        }
    }

    fn reset(&mut self) {
        // Which vCPUs exist survives a machine reset (as the VMM's threads
        // do); requests the old guest did not answer are dropped.
        self.sel = 0;
        for c in &mut self.cpus {
            c.insert = false;
            c.remove = false;
        }
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

    fn rd(d: &mut CpuHotplug, off: u64) -> u8 {
        let mut b = [0xaa; 1];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn remove_eject_and_plug_again() {
        let rec = Arc::new(Recorder::default());
        let irq = Arc::new(Count::default());
        let mut d = CpuHotplug::new(3, rec.clone(), irq.clone());
        assert_eq!((rd(&mut d, CNT), d.enabled_count()), (3, 3));
        assert_eq!(rd(&mut d, PEND), NONE_PENDING);
        // vCPU 0 cannot go; 2 can.
        assert!(!d.request_remove(0));
        assert!(d.request_remove(2));
        assert!(!d.request_remove(2));
        assert!(!d.request_remove(7));
        d.signal();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut d, PEND), 2);
        // An eject of a vCPU not asked for is refused.
        d.write(SEL, &[1]);
        d.write(STA, &[STA_EJECT]);
        assert_eq!(rd(&mut d, STA), STA_ENABLED);
        d.write(SEL, &[2]);
        assert_eq!(rd(&mut d, STA), STA_ENABLED | STA_REMOVE);
        d.write(STA, &[STA_EJECT]);
        assert_eq!(rd(&mut d, STA), 0);
        assert_eq!(d.enabled_count(), 2);
        assert_eq!(rd(&mut d, PEND), NONE_PENDING);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestRequest::EjectCpu(2)]);
        // Back again: enabled, insert pending until the guest says so.
        assert!(d.plug(2));
        assert!(!d.plug(2));
        assert_eq!(rd(&mut d, PEND), 2);
        assert_eq!(rd(&mut d, STA), STA_ENABLED | STA_INSERT);
        d.write(STA, &[STA_INSERT]);
        assert_eq!(rd(&mut d, STA), STA_ENABLED);
        assert_eq!(d.enabled_count(), 3);
        // A remove cancelled by plug before the guest ejected.
        assert!(d.request_remove(1));
        assert!(!d.plug(1));
        assert_eq!(rd(&mut d, PEND), NONE_PENDING);
    }

    #[test]
    fn odd_accesses_and_reset() {
        let rec = Arc::new(Recorder::default());
        let mut d = CpuHotplug::new(2, rec.clone(), Arc::new(Count::default()));
        d.write(SEL, &[200]);
        assert_eq!(rd(&mut d, STA), 0);
        d.write(STA, &[0xff]);
        d.write(PEND, &[1]);
        d.write(CNT, &[1]);
        d.write(9, &[1]);
        d.write(SEL, &[]);
        let mut wide = [0xffu8; 4];
        d.read(SEL, &mut wide);
        assert_eq!(wide, [200, 0, 0, 0]);
        assert_eq!(rd(&mut d, 77), 0);
        assert!(d.request_remove(1));
        d.reset();
        assert_eq!(rd(&mut d, PEND), NONE_PENDING);
        assert_eq!(rd(&mut d, SEL), 0);
        assert_eq!(d.enabled_count(), 2);
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(
            CpuHotplug::new(1000, rec, Arc::new(Count::default())).count(),
            MAX_CPUS
        );
    }
}
