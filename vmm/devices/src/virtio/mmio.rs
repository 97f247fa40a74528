//! The virtio-mmio transport, register layout version 2 (virtio 1.2, 4.2.2).

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{
    Error, Interrupt, LogLimiter, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, VIRTIO_F_VERSION_1, VirtioDevice, chain, guest_warn,
};
use crate::GuestMemory;
use crate::bus::{BusDevice, IrqLine};

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2: virtio 1.x, no legacy.
pub const VERSION: u32 = 2;
/// Our vendor ID ("VIRE" little endian); drivers do not look at it.
pub const VENDOR_ID: u32 = 0x4552_4956;
/// Size of one slot in the machine's MMIO map.
pub const MMIO_SLOT_SIZE: u64 = 0x200;

/// Register offsets.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A virtio device behind the virtio-mmio register window of one slot.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    /// Descriptor table, driver (avail) and device (used) ring addresses of
    /// each queue, as the driver wrote them.
    ring_addrs: Vec<[u64; 3]>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    log: LogLimiter,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// `mem` is the guest's RAM (the same for the life of the VM, across
    /// resets); `irq` the slot's line (GSI 5 + slot).
    pub fn new(mem: GuestMemory, irq: Arc<dyn IrqLine>, device: D) -> Result<Self, Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|_| Error::InvalidQueueSize(max)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new(irq),
            ring_addrs: vec![[0; 3]; queues.len()],
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            log: LogLimiter::default(),
        })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device's configuration space changed (the VMM changed it): bumps
    /// ConfigGeneration and, if `interrupt`, raises a config-change
    /// interrupt.
    pub fn config_changed(&mut self, interrupt: bool) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if interrupt {
            self.interrupt.signal_config_change();
        }
    }

    /// The transport's state and its device's, for a snapshot (with the
    /// vCPUs parked, so nothing moves while it is read).
    pub fn save_state(&self) -> crate::snapshot::TransportState {
        use crate::snapshot::QueueSnapshot;
        crate::snapshot::TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            ring_addrs: self.ring_addrs.clone(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect(),
            device_queues: self
                .device
                .queue_states()
                .map(|qs| qs.into_iter().map(QueueSnapshot::from).collect()),
            extra: self.device.save_extra(),
        }
    }

    /// Turns saved queues into queues for this device, refusing sizes it
    /// does not offer and rings outside guest memory.
    fn snapshot_queues(
        &self,
        saved: &[crate::snapshot::QueueSnapshot],
    ) -> Result<Vec<Queue>, Error> {
        let max = self.device.queue_max_sizes();
        if saved.len() != max.len() {
            return Err(Error::Snapshot(format!(
                "{} queues saved, the device has {}",
                saved.len(),
                max.len()
            )));
        }
        saved
            .iter()
            .zip(max)
            .enumerate()
            .map(|(i, (q, &max))| {
                if q.max_size != max {
                    return Err(Error::Snapshot(format!(
                        "queue {i}: saved maximum size {} but the device offers {max}",
                        q.max_size
                    )));
                }
                let queue = Queue::try_from(virtio_queue::QueueState::from(*q))
                    .map_err(|e| Error::Snapshot(format!("queue {i}: {e}")))?;
                if queue.ready() && !chain::rings_in_memory(&queue, &self.mem) {
                    return Err(Error::Snapshot(format!(
                        "queue {i}: rings outside guest memory"
                    )));
                }
                Ok(queue)
            })
            .collect()
    }

    /// Restores a [`MmioTransport::save_state`] into this freshly built
    /// transport (same device type and queues), activating the device
    /// again with its saved queue positions. Guest memory must already hold
    /// the snapshot's contents. On error the transport is left reset.
    pub fn restore_state(&mut self, s: &crate::snapshot::TransportState) -> Result<(), Error> {
        self.reset_device();
        if s.device_type != self.device.device_type() {
            return Err(Error::Snapshot(format!(
                "device type {} saved, this slot holds device type {}",
                s.device_type,
                self.device.device_type()
            )));
        }
        if s.ring_addrs.len() != self.ring_addrs.len() {
            return Err(Error::Snapshot(format!(
                "{} ring addresses saved, the device has {} queues",
                s.ring_addrs.len(),
                self.ring_addrs.len()
            )));
        }
        let queues = self.snapshot_queues(&s.queues)?;
        self.device.restore_extra(&s.extra)?;
        if s.activated {
            let Some(dq) = &s.device_queues else {
                return Err(Error::Snapshot(
                    "an activated device without its queues".into(),
                ));
            };
            let device_queues = self.snapshot_queues(dq)?;
            self.device.activate(
                self.mem.clone(),
                s.acked_features,
                device_queues,
                self.interrupt.clone(),
            )?;
        }
        self.queues = queues;
        self.ring_addrs.clone_from(&s.ring_addrs);
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.activated = s.activated;
        self.interrupt
            .set_status(s.interrupt_status & (super::INT_USED_RING | super::INT_CONFIG_CHANGE));
        if self.activated {
            self.device.restored();
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK,
    /// on a queue that is not ready.
    fn queue_writable(&mut self, what: &str) -> bool {
        let phase_ok = self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        let sel = self.queue_sel;
        let ready = self.queues.get(sel as usize).map(|q| q.ready());
        match ready {
            Some(false) if phase_ok => true,
            _ => {
                guest_warn!(
                    self.log,
                    register = what,
                    queue = sel,
                    status = self.status,
                    "virtio-mmio: queue register write refused (no such queue, queue ready, or wrong phase)"
                );
                false
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of -1 says so.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!(
                    self.log,
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    guest_warn!(
                        self.log,
                        "virtio-mmio: DriverFeatures written after FEATURES_OK"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    sel => {
                        if v != 0 {
                            guest_warn!(
                                self.log,
                                sel,
                                v,
                                "virtio-mmio: driver acked features in an unknown word"
                            );
                            // Remembered as an unoffered bit so FEATURES_OK fails.
                            self.acked_features |= 1 << 63;
                        }
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if self.queue_writable("QueueNum") {
                    let size = u16::try_from(v).unwrap_or(0);
                    if let Some(q) = self.selected_queue()
                        && q.try_set_size(size).is_err()
                    {
                        guest_warn!(
                            self.log,
                            size = v,
                            "virtio-mmio: invalid queue size refused"
                        );
                    }
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_writable("queue address") {
                    return;
                }
                let Some(addrs) = self.ring_addrs.get_mut(self.queue_sel as usize) else {
                    return;
                };
                // Kept as written; alignment and ranges are checked on
                // QueueReady.
                let (which, high) = match offset {
                    reg::QUEUE_DESC_LOW => (0, false),
                    reg::QUEUE_DESC_HIGH => (0, true),
                    reg::QUEUE_DRIVER_LOW => (1, false),
                    reg::QUEUE_DRIVER_HIGH => (1, true),
                    reg::QUEUE_DEVICE_LOW => (2, false),
                    _ => (2, true),
                };
                let a = &mut addrs[which];
                *a = if high {
                    (*a & 0xffff_ffff) | (u64::from(v) << 32)
                } else {
                    (*a & !0xffff_ffff) | u64::from(v)
                };
            }
            reg::QUEUE_READY => {
                if v == 1 {
                    if !self.queue_writable("QueueReady") {
                        return;
                    }
                    let sel = self.queue_sel as usize;
                    let (Some(q), Some(&[desc, avail, used])) =
                        (self.queues.get_mut(sel), self.ring_addrs.get(sel))
                    else {
                        return;
                    };
                    let aligned = q.try_set_desc_table_address(GuestAddress(desc)).is_ok()
                        && q.try_set_avail_ring_address(GuestAddress(avail)).is_ok()
                        && q.try_set_used_ring_address(GuestAddress(used)).is_ok();
                    if aligned && chain::rings_in_memory(q, &self.mem) {
                        q.set_ready(true);
                    } else {
                        let size = q.size();
                        guest_warn!(
                            self.log,
                            queue = sel,
                            desc,
                            avail,
                            used,
                            size,
                            "virtio-mmio: queue not enabled: rings misaligned or not in guest memory"
                        );
                    }
                } else if v == 0 && self.status & STATUS_DRIVER_OK == 0 {
                    if let Some(q) = self.selected_queue() {
                        q.set_ready(false);
                    }
                } else {
                    guest_warn!(self.log, v, "virtio-mmio: QueueReady write refused");
                }
            }
            reg::QUEUE_NOTIFY => {
                let idx = v as usize;
                if !self.activated || self.status & STATUS_DEVICE_NEEDS_RESET != 0 {
                    guest_warn!(
                        self.log,
                        queue = v,
                        "virtio-mmio: notify before DRIVER_OK ignored"
                    );
                } else if idx >= self.queues.len() {
                    guest_warn!(
                        self.log,
                        queue = v,
                        "virtio-mmio: notify of a queue that does not exist"
                    );
                } else {
                    self.device.queue_notify(idx);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => {
                guest_warn!(
                    self.log,
                    offset,
                    v,
                    "virtio-mmio: write to unknown or read-only register"
                );
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset_device();
            return;
        }
        let old = self.status;
        if old & !v & !STATUS_DEVICE_NEEDS_RESET != 0 {
            guest_warn!(
                self.log,
                old,
                new = v,
                "virtio-mmio: driver cleared status bits without a reset; ignored"
            );
            return;
        }
        let mut new = v | (old & STATUS_DEVICE_NEEDS_RESET);
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let unoffered = self.acked_features & !offered;
            if unoffered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                guest_warn!(
                    self.log,
                    acked = self.acked_features,
                    offered,
                    "virtio-mmio: FEATURES_OK refused (features not offered, or no VERSION_1)"
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FAILED == 0 {
            if new & STATUS_FEATURES_OK == 0 {
                guest_warn!(
                    self.log,
                    "virtio-mmio: DRIVER_OK without FEATURES_OK refused"
                );
                new &= !STATUS_DRIVER_OK;
            } else {
                // The device gets its own copy of the queue state; the
                // transport's copy keeps answering register reads.
                let queues = self
                    .queues
                    .iter()
                    .map(|q| {
                        Queue::try_from(q.state()).map_err(|_| Error::InvalidQueueSize(q.size()))
                    })
                    .collect::<Result<Vec<_>, _>>();
                match queues.and_then(|queues| {
                    self.device.activate(
                        self.mem.clone(),
                        self.acked_features,
                        queues,
                        self.interrupt.clone(),
                    )
                }) {
                    Ok(()) => self.activated = true,
                    Err(e) => {
                        guest_warn!(self.log, error = %e, "virtio-mmio: device activation failed; DEVICE_NEEDS_RESET");
                        new |= STATUS_DEVICE_NEEDS_RESET;
                        self.status = new;
                        self.config_generation = self.config_generation.wrapping_add(1);
                        self.interrupt.signal_config_change();
                        return;
                    }
                }
            }
        }
        self.status = new;
    }

    fn reset_device(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.ring_addrs.fill([0; 3]);
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.clear();
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            guest_warn!(
                self.log,
                offset,
                len = data.len(),
                "virtio-mmio: register read not 32-bit aligned"
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                self.log,
                offset,
                len = data.len(),
                "virtio-mmio: register write not 32 bits"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!(self.log, offset, "virtio-mmio: register write not aligned");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }

    fn event_fds(&self) -> Vec<RawFd> {
        self.device.event_fds()
    }

    fn handle_event(&mut self, fd: RawFd) {
        self.device.handle_event(fd);
    }

    fn reset(&mut self) {
        self.reset_device();
    }
}
