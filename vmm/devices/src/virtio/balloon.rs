//! virtio-balloon (device id 5): the VMM asks the guest for pages back.
//!
//! Only the two mandatory queues: inflate (0) and deflate (1). No stats
//! queue, no free-page hinting or reporting, and none of the optional
//! features (`VIRTIO_BALLOON_F_MUST_TELL_HOST`, `STATS_VQ`, `DEFLATE_ON_OOM`)
//! is offered, so only `VIRTIO_F_VERSION_1` is.
//!
//! Config space (little-endian): `num_pages` at 0 (the target, written by
//! the VMM through [`set_target`]) and `actual` at 4 (written by the
//! driver). Each inflate request is a chain whose device-readable bytes are
//! 32-bit page frame numbers (4 KiB pages, whatever the host's page size);
//! the device gives those pages' host memory back to the kernel with
//! `madvise(MADV_DONTNEED)`. A PFN outside guest RAM is refused (logged,
//! skipped). Deflate needs nothing from the host: a page given back faults
//! in as a zero page when the guest touches it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::mmio::MmioTransport;
use super::{
    Error, Interrupt, LogLimiter, STATUS_DRIVER_OK, TYPE_BALLOON, VIRTIO_F_VERSION_1, VirtioDevice,
    chain, guest_warn,
};
use crate::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
/// The balloon's page size (virtio 1.2, 5.5.6: always 4096).
pub const PAGE_SIZE: u64 = 4096;
/// Most PFNs taken from one request (Linux sends at most 256).
pub const MAX_PFNS_PER_REQUEST: usize = 16 * 1024;
/// Config space: `num_pages`, `actual`.
pub const CONFIG_SIZE: usize = 8;

/// What the VMM and the device share: the target and the driver's `actual`.
#[derive(Debug, Default)]
pub struct BalloonControl {
    target: AtomicU32,
    actual: AtomicU32,
}

impl BalloonControl {
    /// The target the VMM set, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.target.load(Ordering::SeqCst)
    }
    /// The pages the driver says it holds (config `actual`).
    pub fn actual_pages(&self) -> u32 {
        self.actual.load(Ordering::SeqCst)
    }
}

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStats {
    /// Pages given back to the host (inflate PFNs accepted).
    pub inflated: u64,
    /// Pages the driver took back (deflate PFNs accepted).
    pub deflated: u64,
    /// PFNs refused (outside guest RAM) on either queue.
    pub refused: u64,
    /// `madvise` calls that failed.
    pub madvise_errors: u64,
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// The balloon device.
pub struct Balloon {
    control: Arc<BalloonControl>,
    active: Option<Active>,
    log: LogLimiter,
    queue_sizes: [u16; 2],
    stats: BalloonStats,
    pfns: Vec<u8>,
}

impl Balloon {
    /// A balloon whose initial target is `target_pages`.
    pub fn new(target_pages: u32) -> Self {
        let control = Arc::new(BalloonControl::default());
        control.target.store(target_pages, Ordering::SeqCst);
        Balloon {
            control,
            active: None,
            log: LogLimiter::default(),
            queue_sizes: [QUEUE_SIZE; 2],
            stats: BalloonStats::default(),
            pfns: Vec::new(),
        }
    }

    /// The shared target/actual, for the VMM (keep it before boxing the
    /// device).
    pub fn control(&self) -> Arc<BalloonControl> {
        self.control.clone()
    }

    pub fn stats(&self) -> BalloonStats {
        self.stats
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[..4].copy_from_slice(&self.control.target_pages().to_le_bytes());
        c[4..].copy_from_slice(&self.control.actual_pages().to_le_bytes());
        c
    }

    fn process_queue(&mut self, index: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = a.queues.get_mut(index) else {
            return;
        };
        let inflate = index == INFLATE_QUEUE;
        let mut used_any = false;
        while let Some((head, walked)) = chain::pop(
            queue,
            &a.mem,
            usize::from(QUEUE_SIZE),
            &mut self.log,
            "virtio-balloon",
        ) {
            if let Ok(c) = walked {
                if !c.writable.is_empty() {
                    guest_warn!(
                        self.log,
                        head,
                        "virtio-balloon: device-writable buffers in a PFN list ignored"
                    );
                }
                let bytes = usize::try_from(c.readable_len())
                    .unwrap_or(usize::MAX)
                    .min(MAX_PFNS_PER_REQUEST * 4);
                if c.readable_len() > (MAX_PFNS_PER_REQUEST * 4) as u64 {
                    guest_warn!(
                        self.log,
                        head,
                        len = c.readable_len(),
                        "virtio-balloon: request longer than {MAX_PFNS_PER_REQUEST} PFNs; the rest ignored"
                    );
                }
                self.pfns.resize(bytes & !3, 0);
                let got = chain::read_bytes(&a.mem, &c.readable, &mut self.pfns) & !3;
                let pfns = self.pfns[..got]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                apply(&a.mem, pfns, inflate, &mut self.stats, &mut self.log);
            }
            if !chain::put_used(queue, &a.mem, head, 0, &mut self.log, "virtio-balloon") {
                break;
            }
            used_any = true;
        }
        if used_any {
            chain::notify_used(queue, &a.mem, &a.interrupt);
        }
    }
}

/// Validates PFNs (each page entirely inside one RAM region) and, when
/// inflating, gives runs of consecutive pages back to the host.
fn apply(
    mem: &GuestMemory,
    pfns: impl Iterator<Item = u32>,
    inflate: bool,
    stats: &mut BalloonStats,
    log: &mut LogLimiter,
) {
    // A run of consecutive pages: (host address, length, next PFN).
    let mut run: Option<(*mut u8, usize, u64)> = None;
    for pfn in pfns {
        let pfn = u64::from(pfn);
        let gpa = pfn * PAGE_SIZE; // < 2^44: no overflow
        let host = mem.to_region_addr(GuestAddress(gpa)).and_then(|(r, ra)| {
            let fits =
                ra.0.checked_add(PAGE_SIZE)
                    .is_some_and(|end| end <= r.len());
            if fits {
                r.get_host_address(ra).ok()
            } else {
                None
            }
        });
        let Some(host) = host else {
            stats.refused += 1;
            guest_warn!(
                log,
                pfn,
                inflate,
                "virtio-balloon: PFN outside guest RAM refused"
            );
            continue;
        };
        if inflate {
            stats.inflated += 1;
        } else {
            stats.deflated += 1;
            continue;
        }
        match run {
            // Consecutive in the guest and in the host mapping (same region).
            Some((start, len, next)) if next == pfn && start.wrapping_add(len) == host => {
                run = Some((start, len + PAGE_SIZE as usize, pfn + 1));
            }
            _ => {
                if let Some((start, len, _)) = run {
                    discard(start, len, stats, log);
                }
                run = Some((host, PAGE_SIZE as usize, pfn + 1));
            }
        }
    }
    if let Some((start, len, _)) = run {
        discard(start, len, stats, log);
    }
}

fn discard(host: *mut u8, len: usize, stats: &mut BalloonStats, log: &mut LogLimiter) {
    // SAFETY: `host..host + len` lies inside one guest memory region's
    // mapping (each page was checked against its region, and a run only
    // grows by pages adjacent in that mapping). MADV_DONTNEED on private
    // anonymous (or shared) guest memory only drops the pages' contents; the
    // mapping stays valid and the guest sees zero pages when it touches them
    // again. No Rust reference into guest memory is held (it is only
    // accessed through volatile slices).
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if rc != 0 {
        stats.madvise_errors += 1;
        guest_warn!(
            log,
            error = %std::io::Error::last_os_error(),
            len,
            "virtio-balloon: madvise(MADV_DONTNEED) failed"
        );
    }
}

/// Sets the balloon's target to `pages` (4 KiB pages the guest should give
/// back), bumps ConfigGeneration and, once the driver is up, raises a
/// config-change interrupt. `control` is the balloon's in `transport`.
pub fn set_target<D: VirtioDevice>(
    transport: &mut MmioTransport<D>,
    control: &BalloonControl,
    pages: u32,
) {
    control.target.store(pages, Ordering::SeqCst);
    transport.config_changed(transport.status() & STATUS_DRIVER_OK != 0);
}

impl VirtioDevice for Balloon {
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
    }
    fn save_extra(&self) -> crate::snapshot::DeviceExtra {
        crate::snapshot::DeviceExtra::Balloon {
            target_pages: self.control.target_pages(),
            actual_pages: self.control.actual_pages(),
        }
    }
    fn restore_extra(&mut self, extra: &crate::snapshot::DeviceExtra) -> Result<(), Error> {
        match extra {
            crate::snapshot::DeviceExtra::Balloon {
                target_pages,
                actual_pages,
            } => {
                self.control.target.store(*target_pages, Ordering::SeqCst);
                self.control.actual.store(*actual_pages, Ordering::SeqCst);
                Ok(())
            }
            other => Err(Error::Snapshot(format!(
                "a balloon cannot take the state {other:?}"
            ))),
        }
    }

    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's; any part of it may be
        // written.
        let mut cfg = self.config();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let end = start.saturating_add(data.len());
        if start < 4 || end > CONFIG_SIZE {
            guest_warn!(
                self.log,
                offset,
                len = data.len(),
                "virtio-balloon: config write outside `actual` ignored"
            );
            return;
        }
        cfg[start..end].copy_from_slice(data);
        let actual = u32::from_le_bytes([cfg[4], cfg[5], cfg[6], cfg[7]]);
        let old = self.control.actual.swap(actual, Ordering::SeqCst);
        if old != actual {
            tracing::debug!(
                actual,
                target = self.control.target_pages(),
                "virtio-balloon: driver reports actual pages"
            );
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error> {
        if queues.len() != 2 {
            return Err(Error::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                return Err(Error::QueueNotReady(i));
            }
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue: usize) {
        if queue == INFLATE_QUEUE || queue == DEFLATE_QUEUE {
            self.process_queue(queue);
        } else {
            guest_warn!(self.log, queue, "virtio-balloon: notify of a missing queue");
        }
    }

    fn reset(&mut self) {
        // The driver is gone: it holds no pages. The target is the VMM's and
        // stays.
        self.active = None;
        self.control.actual.store(0, Ordering::SeqCst);
        self.pfns = Vec::new();
    }
}
