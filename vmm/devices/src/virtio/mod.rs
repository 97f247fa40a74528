//! virtio 1.x devices on the virtio-mmio transport.
//!
//! [`mmio::MmioTransport`] is the [`BusDevice`](crate::bus::BusDevice) the VMM
//! registers at a virtio-mmio slot; it owns the registers, the feature
//! negotiation and the queue configuration, and hands the configured queues to
//! a [`VirtioDevice`] (block, net, entropy, balloon, vsock) when the driver sets DRIVER_OK.
//! Devices process their queues synchronously: on a QueueNotify write (the
//! vCPU thread) and on `handle_event` for their backend fds (the VMM's event
//! loop). Nothing here knows about KVM; guest memory is a
//! [`GuestMemory`](crate::GuestMemory) and the interrupt an
//! [`IrqLine`](crate::bus::IrqLine).

pub mod balloon;
pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueState};

use crate::GuestMemory;
use crate::bus::IrqLine;

pub use balloon::{Balloon, BalloonControl};
pub use block::Block;
pub use mmio::MmioTransport;
pub use net::Net;
pub use rng::Rng;
pub use vsock::Vsock;

/// Device types (virtio 1.2, 5 "Device Types").
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits common to all devices.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// InterruptStatus bits (virtio 1.2, 4.2.2).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Why a device refused to start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid maximum queue size {0}")]
    InvalidQueueSize(u16),
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    #[error("device expects {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("backend I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("descriptor chain: {0}")]
    Chain(#[from] chain::ChainError),
    #[error(
        "vsock guest CID {0} is reserved or too large (it must be at least 3 and below 2^32 - 1)"
    )]
    InvalidCid(u64),
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// The interrupt a device raises: sets a bit in the transport's
/// InterruptStatus register and triggers the slot's line.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn IrqLine>,
}

impl Interrupt {
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// The device changed its configuration space (or needs a reset).
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!(error = %e, "virtio: raising the interrupt line failed");
        }
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clear the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets InterruptStatus without raising the line (a restored snapshot).
    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What the mmio transport needs from a device model.
pub trait VirtioDevice: Send {
    /// Device ID (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space at `offset`; bytes past
    /// its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space (ignored by devices whose config is
    /// read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio: write to read-only config space ignored"
        );
    }
    /// The driver set DRIVER_OK: start using `queues` (validated by the
    /// transport: sizes and ring addresses are inside guest memory; queues the
    /// driver did not enable have `ready() == false`).
    fn activate(
        &mut self,
        mem: GuestMemory,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error>;
    /// The driver wrote QueueNotify for `queue` (after activation only).
    fn queue_notify(&mut self, queue: usize);
    /// Back to the state before activation (drop queues and memory; keep the
    /// backend).
    fn reset(&mut self);
    /// Backend fds the VMM's event loop should watch.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of `event_fds` is readable.
    fn handle_event(&mut self, _fd: RawFd) {}
    /// The live state of the queues the device took at activation (its
    /// own copies, which move on as it serves them); `None` before
    /// activation. A snapshot keeps these, not the transport's copies.
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        None
    }
    /// The device was activated again from a snapshot (the guest carries
    /// on without a reset); a device whose backend did not survive tells
    /// the guest here.
    fn restored(&mut self) {}
    /// Device-specific state beyond the queues, for a snapshot.
    fn save_extra(&self) -> crate::snapshot::DeviceExtra {
        crate::snapshot::DeviceExtra::None
    }
    /// Restores what [`VirtioDevice::save_extra`] gave (before the
    /// transport activates the device again).
    fn restore_extra(&mut self, extra: &crate::snapshot::DeviceExtra) -> Result<(), Error> {
        match extra {
            crate::snapshot::DeviceExtra::None => Ok(()),
            other => Err(Error::Snapshot(format!(
                "device type {} has no state like {other:?}",
                self.device_type()
            ))),
        }
    }
}

/// So the VMM may use `MmioTransport<Box<dyn VirtioDevice>>` for all slots.
impl<D: VirtioDevice + ?Sized> VirtioDevice for Box<D> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(
        &mut self,
        mem: GuestMemory,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error> {
        (**self).activate(mem, acked_features, queues, interrupt)
    }
    fn queue_notify(&mut self, queue: usize) {
        (**self).queue_notify(queue)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn event_fds(&self) -> Vec<RawFd> {
        (**self).event_fds()
    }
    fn handle_event(&mut self, fd: RawFd) {
        (**self).handle_event(fd)
    }
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        (**self).queue_states()
    }
    fn restored(&mut self) {
        (**self).restored()
    }
    fn save_extra(&self) -> crate::snapshot::DeviceExtra {
        (**self).save_extra()
    }
    fn restore_extra(&mut self, extra: &crate::snapshot::DeviceExtra) -> Result<(), Error> {
        (**self).restore_extra(extra)
    }
}

/// Copies `config[offset..]` into `data`, zero past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// A rate limiter for guest-triggered log lines: the first few at `warn`,
/// then one in every 1024, so a guest cannot flood the VMM's log.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    count: u64,
}

impl LogLimiter {
    pub(crate) fn allow(&mut self) -> bool {
        self.count = self.count.wrapping_add(1);
        self.count <= 16 || self.count.is_multiple_of(1024)
    }
}

/// Logs a guest-caused problem through a [`LogLimiter`].
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if $limiter.allow() {
            tracing::warn!($($arg)+);
        } else {
            tracing::debug!($($arg)+);
        }
    };
}
pub(crate) use guest_warn;
