//! What each device keeps in a vireo-vmm snapshot (docs/save-restore.md,
//! "vireo-vmm's snapshot"): plain serde structures, one per device model,
//! saved by the device itself and restored into a device built the same way
//! (same command line). Restoring checks every field a guest or a damaged
//! file could have made inconsistent (queue sizes, ring addresses inside
//! guest memory, FIFO lengths, vCPU counts) and refuses with
//! [`crate::virtio::Error::Snapshot`] rather than building a device that
//! would misbehave later.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// Device-specific state beyond the virtio transport and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeviceExtra {
    /// Nothing (block, net, entropy, vsock: their backends are the files,
    /// taps and sockets handed to the new process).
    None,
    /// The balloon's target and the pages the driver said it holds.
    Balloon {
        target_pages: u32,
        actual_pages: u32,
    },
}

/// One virtqueue (virtio-queue's `QueueState`, which has no serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport with its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device ID behind the slot (must match the rebuilt device).
    pub device_type: u32,
    pub status: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    /// Ring addresses as the driver wrote them, per queue.
    pub ring_addrs: Vec<[u64; 3]>,
    /// The transport's copy of each queue (what the registers show).
    pub queues: Vec<QueueSnapshot>,
    /// The device's own copies (indices as far as it served them), when
    /// activated.
    pub device_queues: Option<Vec<QueueSnapshot>>,
    pub extra: DeviceExtra,
}

/// COM1 (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read (at most the FIFO's 64).
    pub in_buffer: Vec<u8>,
}

/// The i8042 controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    pub config: u8,
    pub status_command: bool,
    /// What the next data-port write means (0 none, 1 config, 2 output
    /// port, 3 keyboard buffer, 4 keyboard argument).
    pub pending: u8,
    /// Bytes waiting for the guest (at most 64).
    pub output: Vec<u8>,
    pub output_port: u8,
}

/// One vCPU as the CPU hot-plug controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugCpu {
    pub enabled: bool,
    pub insert: bool,
    pub remove: bool,
}

/// The CPU hot-plug controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuHotplugSnapshot {
    pub cpus: Vec<HotplugCpu>,
    pub sel: u8,
}
