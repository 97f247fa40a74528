//! virtio-net on a tap descriptor (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR with a
//! 12-byte vnet header, non-blocking; see [`super::tap::open_tap`]).
//!
//! Queue 0 is RX, queue 1 is TX. No offloads are offered, so every frame
//! carries a zeroed `virtio_net_hdr_v1` both ways (num_buffers = 1 on RX).
//! RX runs when the tap is readable (`handle_event`) and when the driver
//! posts buffers (notify on queue 0); a frame read while the guest has no
//! buffer is kept until it posts one, and the tap is not read further
//! meanwhile. TX runs on notify of queue 1.
//!
//! The VMM should watch the tap edge-triggered (EPOLLET): the device reads it
//! until EAGAIN, or until the guest has no RX buffer, in which case reading
//! resumes on the guest's next RX notify. Level-triggered watching works too
//! but spins while the guest has no RX buffer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};

use super::chain::{self, Chain};
use super::tap::VNET_HDR_LEN;
use super::{Error, Interrupt, LogLimiter, TYPE_NET, VIRTIO_F_VERSION_1, VirtioDevice, guest_warn};
use crate::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Largest frame (with its vnet header) moved either way: a 64 KiB payload.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_536;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// Counters, for tests and the VMM's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub malformed: u64,
}

/// The network device.
pub struct Net {
    tap: File,
    mac: [u8; 6],
    config: [u8; 8],
    active: Option<Active>,
    /// A frame read from the tap (with its header) waiting for an RX buffer.
    rx_frame: Vec<u8>,
    rx_len: usize,
    tx_frame: Vec<u8>,
    stats: NetStats,
    log: LogLimiter,
    queue_sizes: [u16; 2],
}

/// What became of one frame offered to the RX queue.
enum Delivery {
    Delivered,
    /// No buffer available: keep the frame.
    NoBuffer,
    /// A chain was consumed without carrying the frame (malformed or too
    /// small); try the next one.
    ChainRefused,
}

impl Net {
    /// A NIC on `tap` with MAC `mac`. The descriptor is switched to
    /// non-blocking if it is not already.
    pub fn new(tap: File, mac: [u8; 6]) -> Result<Self, Error> {
        super::tap::set_nonblocking(&tap)?;
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Ok(Net {
            tap,
            mac,
            config,
            active: None,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            tx_frame: Vec::with_capacity(MAX_FRAME),
            stats: NetStats::default(),
            log: LogLimiter::default(),
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The tap's descriptor (what `event_fds` returns).
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// Reads one frame from the tap into `rx_frame`. `Ok(false)`: nothing to
    /// read.
    fn read_tap(&mut self) -> io::Result<bool> {
        loop {
            match (&self.tap).read(&mut self.rx_frame) {
                Ok(n) if n < VNET_HDR_LEN => {
                    // A tap always prepends the header; anything shorter is
                    // not a frame (a zero-length read is a hung-up peer).
                    if n == 0 {
                        return Ok(false);
                    }
                    self.stats.rx_dropped += 1;
                    continue;
                }
                Ok(n) => {
                    self.rx_len = n;
                    // No offloads were negotiated: a plain header, and
                    // num_buffers = 1 (VERSION_1 header without MRG_RXBUF).
                    self.rx_frame[..VNET_HDR_LEN].fill(0);
                    self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops whatever the tap holds (the driver is not up).
    fn drain_tap(&mut self) {
        let mut budget = 4096;
        while budget > 0 {
            budget -= 1;
            match self.read_tap() {
                Ok(true) => {
                    self.rx_len = 0;
                    self.stats.rx_dropped += 1;
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-net: tap read failed");
                    break;
                }
            }
        }
    }

    fn deliver(&mut self) -> Delivery {
        let Some(a) = self.active.as_mut() else {
            return Delivery::NoBuffer;
        };
        if !a.rx.ready() {
            return Delivery::NoBuffer;
        }
        let Some((head, walked)) = chain::pop(
            &mut a.rx,
            &a.mem,
            usize::from(QUEUE_SIZE),
            &mut self.log,
            "virtio-net rx",
        ) else {
            return Delivery::NoBuffer;
        };
        let frame = &self.rx_frame[..self.rx_len];
        let (result, used_len) = match walked {
            Ok(c) if !c.readable.is_empty() => {
                guest_warn!(
                    self.log,
                    head,
                    "virtio-net: RX chain has device-readable buffers; refused"
                );
                (Delivery::ChainRefused, 0)
            }
            Ok(c) if c.writable_len() < frame.len() as u64 => {
                // Without MRG_RXBUF the driver must post buffers that hold a
                // whole frame; this one cannot: the frame is dropped.
                guest_warn!(
                    self.log,
                    head,
                    buffer = c.writable_len(),
                    frame = frame.len(),
                    "virtio-net: RX buffer too small; frame dropped"
                );
                self.stats.rx_dropped += 1;
                (Delivery::Delivered, 0)
            }
            Ok(c) => {
                let n = chain::write_bytes(&a.mem, &c.writable, frame);
                if n == frame.len() {
                    self.stats.rx_frames += 1;
                    (Delivery::Delivered, n as u32)
                } else {
                    (Delivery::ChainRefused, 0)
                }
            }
            // Logged by `chain::pop`.
            Err(_) => (Delivery::ChainRefused, 0),
        };
        if matches!(result, Delivery::ChainRefused) {
            self.stats.malformed += 1;
        }
        if !chain::put_used(
            &mut a.rx,
            &a.mem,
            head,
            used_len,
            &mut self.log,
            "virtio-net rx",
        ) {
            return Delivery::NoBuffer;
        }
        result
    }

    fn process_rx(&mut self) {
        if self.active.is_none() {
            self.drain_tap();
            return;
        }
        let mut used_any = false;
        // Bounded: every pass consumes a guest buffer or ends the loop, and
        // the guest cannot post more than the queue holds between passes.
        for _ in 0..(4 * usize::from(QUEUE_SIZE)) {
            if self.rx_len == 0 {
                match self.read_tap() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-net: tap read failed");
                        break;
                    }
                }
            }
            match self.deliver() {
                Delivery::Delivered => {
                    self.rx_len = 0;
                    used_any = true;
                }
                Delivery::ChainRefused => used_any = true,
                Delivery::NoBuffer => break,
            }
        }
        if used_any {
            self.notify_guest(RX_QUEUE);
        }
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if !a.tx.ready() {
            return;
        }
        let mut used_any = false;
        while let Some((head, walked)) = chain::pop(
            &mut a.tx,
            &a.mem,
            usize::from(QUEUE_SIZE),
            &mut self.log,
            "virtio-net tx",
        ) {
            match walked
                .map_err(|e| e.to_string())
                .and_then(|c| tx_shape(&c).map(|()| c))
            {
                Ok(c) => {
                    let len = c.readable_len() as usize;
                    self.tx_frame.resize(len, 0);
                    let n = chain::read_bytes(&a.mem, &c.readable, &mut self.tx_frame);
                    if n == len {
                        // Offloads were not negotiated: whatever the guest
                        // put in the header, the host sees a plain frame.
                        self.tx_frame[..VNET_HDR_LEN].fill(0);
                        match (&self.tap).write(&self.tx_frame) {
                            // A tap takes a frame whole or not at all.
                            Ok(n) if n == self.tx_frame.len() => self.stats.tx_frames += 1,
                            Ok(_) => self.stats.tx_dropped += 1,
                            Err(e) => {
                                // EAGAIN (tap queue full) or a gone
                                // interface: the frame is lost, as on a wire.
                                tracing::debug!(error = %e, "virtio-net: tap write failed; frame dropped");
                                self.stats.tx_dropped += 1;
                            }
                        }
                    } else {
                        self.stats.malformed += 1;
                    }
                }
                Err(e) => {
                    guest_warn!(self.log, error = %e, head, "virtio-net: malformed TX chain refused");
                    self.stats.malformed += 1;
                }
            }
            if !chain::put_used(&mut a.tx, &a.mem, head, 0, &mut self.log, "virtio-net tx") {
                break;
            }
            used_any = true;
        }
        if used_any {
            self.notify_guest(TX_QUEUE);
        }
    }

    fn notify_guest(&mut self, queue: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let q = if queue == RX_QUEUE {
            &mut a.rx
        } else {
            &mut a.tx
        };
        chain::notify_used(q, &a.mem, &a.interrupt);
    }
}

fn tx_shape(c: &Chain) -> Result<(), String> {
    if !c.writable.is_empty() {
        return Err("TX chain has device-writable buffers".into());
    }
    let len = c.readable_len();
    if len < VNET_HDR_LEN as u64 {
        return Err(format!(
            "TX chain of {len} bytes is shorter than the vnet header"
        ));
    }
    if len > MAX_FRAME as u64 {
        return Err(format!("TX frame of {len} bytes is too long"));
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx.state(), a.tx.state()])
    }

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error> {
        let got = queues.len();
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
            return Err(Error::QueueCount { expected: 2, got });
        };
        // Frames that arrived while the driver was not up are stale.
        self.drain_tap();
        self.rx_len = 0;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue: usize) {
        match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = 0;
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }

    fn handle_event(&mut self, fd: RawFd) {
        if fd == self.tap.as_raw_fd() {
            self.process_rx();
        }
    }
}
