//! virtio-blk on a raw image in an already-open file.
//!
//! Requests are served synchronously from the queue notify: data moves
//! between the file and guest memory with pread/pwrite straight into the
//! guest's pages (no bounce buffer). The device never opens a path.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::Address as _;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::chain::{self, Chain, ChainError};
use super::{
    Error, Interrupt, LogLimiter, TYPE_BLOCK, VIRTIO_F_VERSION_1, VirtioDevice, guest_warn,
};
use crate::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request (the chain also has a header and a status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest single data descriptor.
pub const SIZE_MAX: u32 = 1 << 20;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const HEADER_LEN: u64 = 16;

/// pread/pwrite at a moving offset, for vm-memory's volatile copy helpers.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

fn io_err(e: io::Error) -> VolatileMemoryError {
    VolatileMemoryError::IOError(e)
}

impl FileAt<'_> {
    fn off(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| io_err(io::Error::from(io::ErrorKind::InvalidInput)))
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0usize;
        let guard = buf.ptr_guard_mut();
        while done < buf.len() {
            let off = self.off()?;
            // SAFETY: the guard keeps the slice's `buf.len()` bytes of guest
            // memory mapped; we write at most `buf.len() - done` bytes from
            // `done` on.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    buf.len() - done,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err(e));
            }
            if n == 0 {
                break;
            }
            let n = n as usize;
            buf.bitmap().mark_dirty(done, n);
            done += n;
            self.offset += n as u64;
        }
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0usize;
        let guard = buf.ptr_guard();
        while done < buf.len() {
            let off = self.off()?;
            // SAFETY: the guard keeps the slice's bytes mapped; we read at
            // most `buf.len() - done` bytes from `done` on.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    buf.len() - done,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err(e));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.offset += n as u64;
        }
        Ok(done)
    }
}

/// A disk's I/O counters, as `virsh domblkstat` shows them: completed
/// requests and bytes by kind, the time spent serving them, and the
/// requests that ended in an I/O error. The device counts; the VMM reads
/// them through the shared handle ([`Block::stats`]) without taking the
/// device's lock. They start at zero with the process (a restored or
/// migrated machine counts again from zero, as QEMU does).
#[derive(Debug, Default)]
pub struct BlockStats {
    rd_req: AtomicU64,
    rd_bytes: AtomicU64,
    rd_ns: AtomicU64,
    wr_req: AtomicU64,
    wr_bytes: AtomicU64,
    wr_ns: AtomicU64,
    flush_req: AtomicU64,
    flush_ns: AtomicU64,
    errs: AtomicU64,
}

/// The counters of [`BlockStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    pub rd_req: u64,
    pub rd_bytes: u64,
    pub rd_total_ns: u64,
    pub wr_req: u64,
    pub wr_bytes: u64,
    pub wr_total_ns: u64,
    pub flush_req: u64,
    pub flush_total_ns: u64,
    /// Requests answered with an I/O error (a write to a read-only disk, a
    /// range outside the disk, a failed read or write of the image).
    pub errs: u64,
}

impl BlockStats {
    /// The counters now.
    pub fn read(&self) -> BlockCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockCounters {
            rd_req: get(&self.rd_req),
            rd_bytes: get(&self.rd_bytes),
            rd_total_ns: get(&self.rd_ns),
            wr_req: get(&self.wr_req),
            wr_bytes: get(&self.wr_bytes),
            wr_total_ns: get(&self.wr_ns),
            flush_req: get(&self.flush_req),
            flush_total_ns: get(&self.flush_ns),
            errs: get(&self.errs),
        }
    }

    /// Counts one request of type `req_type` that ended with `status`
    /// after `ns`, moving `bytes` of data.
    fn count(&self, req_type: u32, status: u8, bytes: u64, ns: u64) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        if status == VIRTIO_BLK_S_IOERR {
            add(&self.errs, 1);
            return;
        }
        if status != VIRTIO_BLK_S_OK {
            return;
        }
        match req_type {
            VIRTIO_BLK_T_IN => {
                add(&self.rd_req, 1);
                add(&self.rd_bytes, bytes);
                add(&self.rd_ns, ns);
            }
            VIRTIO_BLK_T_OUT => {
                add(&self.wr_req, 1);
                add(&self.wr_bytes, bytes);
                add(&self.wr_ns, ns);
            }
            VIRTIO_BLK_T_FLUSH => {
                add(&self.flush_req, 1);
                add(&self.flush_ns, ns);
            }
            _ => {}
        }
    }
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
}

/// A virtio-blk device.
pub struct Block {
    file: File,
    read_only: bool,
    /// Capacity in 512-byte sectors.
    capacity: u64,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    active: Option<Active>,
    log: LogLimiter,
    queue_sizes: [u16; 1],
    stats: Arc<BlockStats>,
}

/// What one request did.
struct Outcome {
    status: u8,
    /// Bytes written to the guest before the status byte.
    written: u32,
    /// The request's type and the data bytes it moved, for the counters.
    req_type: u32,
    moved: u64,
}

impl Block {
    /// A disk on `file` (opened read-write unless `read_only`). Its size is
    /// taken once, here (seek to the end, so block devices work too); a
    /// trailing partial sector is not visible to the guest.
    pub fn new(file: File, read_only: bool) -> Result<Self, Error> {
        let size = (&file).seek(SeekFrom::End(0))?;
        let capacity = size / SECTOR_SIZE;
        let mut id = [0u8; ID_BYTES];
        if let Ok(meta) = file.metadata() {
            use std::os::unix::fs::MetadataExt;
            let s = format!("vireo-{:x}-{:x}", meta.dev(), meta.ino());
            let n = s.len().min(ID_BYTES);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        let mut config = Vec::with_capacity(24);
        config.extend_from_slice(&capacity.to_le_bytes()); // capacity
        config.extend_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
        config.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        config.extend_from_slice(&[0u8; 4]); // geometry (not offered)
        config.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        Ok(Block {
            file,
            read_only,
            capacity,
            id,
            config,
            active: None,
            log: LogLimiter::default(),
            queue_sizes: [QUEUE_SIZE],
            stats: Arc::default(),
        })
    }

    /// The disk's I/O counters, shared with the device.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// Sets the serial the guest reads with GET_ID (at most 20 bytes are
    /// kept; shorter ones are NUL-padded).
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = [0; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        self.id[..n].copy_from_slice(&id.as_bytes()[..n]);
        self
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn process_queue(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some((head, walked)) = chain::pop(
            &mut a.queue,
            &a.mem,
            SEG_MAX as usize + 2,
            &mut self.log,
            "virtio-blk",
        ) {
            let started = Instant::now();
            let used_len = match walked.and_then(|c| {
                handle_request(
                    &self.file,
                    self.read_only,
                    self.capacity,
                    &self.id,
                    &a.mem,
                    &c,
                )
                .map(|o| (c, o))
            }) {
                Ok((c, o)) => {
                    let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    self.stats.count(o.req_type, o.status, o.moved, ns);
                    // The status byte is the last byte of the chain, written
                    // after the data.
                    let status_at = c
                        .writable
                        .last()
                        .and_then(|b| b.addr.checked_add(u64::from(b.len).checked_sub(1)?));
                    match status_at {
                        Some(at) if a.mem.write_obj(o.status, at).is_ok() => {
                            o.written.saturating_add(1)
                        }
                        _ => 0,
                    }
                }
                Err(e) => {
                    if let ChainError::Shape(_) = e {
                        guest_warn!(self.log, error = %e, head, "virtio-blk: malformed request refused");
                    }
                    0
                }
            };
            if !chain::put_used(
                &mut a.queue,
                &a.mem,
                head,
                used_len,
                &mut self.log,
                "virtio-blk",
            ) {
                break;
            }
            used_any = true;
        }
        if used_any {
            chain::notify_used(&mut a.queue, &a.mem, &a.interrupt);
        }
    }
}

/// Serves one well-formed chain. `Err` means the chain cannot carry a status
/// byte (or a header) at all; the caller then returns it with length 0.
fn handle_request(
    file: &File,
    read_only: bool,
    capacity: u64,
    id: &[u8; ID_BYTES],
    mem: &GuestMemory,
    c: &Chain,
) -> Result<Outcome, ChainError> {
    let mut header = [0u8; HEADER_LEN as usize];
    if chain::read_bytes(mem, &c.readable, &mut header) != header.len() {
        return Err(ChainError::Shape("request header shorter than 16 bytes"));
    }
    let writable_len = c.writable_len();
    if writable_len == 0 || c.writable.last().is_some_and(|b| b.len == 0) {
        return Err(ChainError::Shape("no status byte at the end of the chain"));
    }
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    // The status byte is the last byte of the last writable descriptor.
    let in_data = chain::slice_bufs(&c.writable, 0, writable_len - 1);
    let out_data = chain::slice_bufs(
        &c.readable,
        HEADER_LEN,
        c.readable_len().saturating_sub(HEADER_LEN),
    );
    let ioerr = Outcome {
        status: VIRTIO_BLK_S_IOERR,
        written: 0,
        req_type,
        moved: 0,
    };
    let ok = |written: u32, moved: u64| Outcome {
        status: VIRTIO_BLK_S_OK,
        written,
        req_type,
        moved,
    };
    let check_range = |len: u64| -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        if end > capacity {
            return None;
        }
        sector.checked_mul(SECTOR_SIZE)
    };
    match req_type {
        VIRTIO_BLK_T_IN => {
            let len = writable_len - 1;
            let Some(mut offset) = check_range(len) else {
                tracing::debug!(sector, len, capacity, "virtio-blk: read outside the disk");
                return Ok(ioerr);
            };
            let mut written = 0u32;
            for b in &in_data {
                let mut src = FileAt { file, offset };
                if let Err(e) = mem.read_exact_volatile_from(b.addr, &mut src, b.len as usize) {
                    tracing::warn!(error = %e, "virtio-blk: read from the image failed");
                    return Ok(Outcome {
                        status: VIRTIO_BLK_S_IOERR,
                        written,
                        req_type,
                        moved: 0,
                    });
                }
                offset += u64::from(b.len);
                written = written.saturating_add(b.len);
            }
            Ok(ok(written, len))
        }
        VIRTIO_BLK_T_OUT => {
            if read_only {
                return Ok(ioerr);
            }
            let len = c.readable_len() - HEADER_LEN;
            let Some(mut offset) = check_range(len) else {
                tracing::debug!(sector, len, capacity, "virtio-blk: write outside the disk");
                return Ok(ioerr);
            };
            for b in &out_data {
                let mut dst = FileAt { file, offset };
                if let Err(e) = mem.write_all_volatile_to(b.addr, &mut dst, b.len as usize) {
                    tracing::warn!(error = %e, "virtio-blk: write to the image failed");
                    return Ok(ioerr);
                }
                offset += u64::from(b.len);
            }
            Ok(ok(0, len))
        }
        VIRTIO_BLK_T_FLUSH => {
            if !read_only && let Err(e) = file.sync_data() {
                tracing::warn!(error = %e, "virtio-blk: flush failed");
                return Ok(ioerr);
            }
            Ok(ok(0, 0))
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = chain::write_bytes(mem, &in_data, id);
            Ok(ok(n as u32, 0))
        }
        other => {
            tracing::debug!(req_type = other, "virtio-blk: unsupported request type");
            Ok(Outcome {
                status: VIRTIO_BLK_S_UNSUPP,
                written: 0,
                req_type,
                moved: 0,
            })
        }
    }
}

impl VirtioDevice for Block {
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
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
        let Some(queue) = queues.into_iter().next() else {
            return Err(Error::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(Error::QueueNotReady(0));
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue: usize) {
        if queue == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}
