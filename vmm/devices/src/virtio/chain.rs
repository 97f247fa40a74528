//! Walking a split-virtqueue descriptor chain defensively.
//!
//! `virtio_queue::Queue` hands out chain heads from the available ring; the
//! chain itself is walked here, so every malformed shape is an error we can
//! name (instead of a silently shortened chain): loops and over-long chains,
//! indices past the table, indirect descriptors (not offered), buffers outside
//! guest memory, and a readable descriptor after a writable one.

use virtio_queue::desc::split::Descriptor as RawDescriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, Permissions};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{Interrupt, LogLimiter, guest_warn};
use crate::GuestMemory;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor index {0} is past the table of {1}")]
    IndexOutOfRange(u16, u16),
    #[error("chain longer than {0} descriptors (a loop?)")]
    TooLong(usize),
    #[error("descriptor table entry at {0:#x} is not in guest memory")]
    TableOutOfMemory(u64),
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    BufferOutOfMemory { addr: u64, len: u32 },
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("request does not fit the device's limits: {0}")]
    Shape(&'static str),
}

/// One buffer of a chain, already checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain split into its device-readable part and device-writable part.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Buf>,
    pub writable: Vec<Buf>,
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }
}

/// Walks the chain starting at `head` in the descriptor table at `table` of
/// `queue_size` entries, taking at most `max_descs` descriptors.
pub fn walk(
    mem: &GuestMemory,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    max_descs: usize,
) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut index = head;
    let limit = max_descs.min(usize::from(queue_size));
    let mut count = 0usize;
    loop {
        if index >= queue_size {
            return Err(ChainError::IndexOutOfRange(index, queue_size));
        }
        count += 1;
        if count > limit {
            return Err(ChainError::TooLong(limit));
        }
        let at = table
            .checked_add(u64::from(index) * 16)
            .ok_or(ChainError::TableOutOfMemory(table.raw_value()))?;
        let desc: RawDescriptor = mem
            .read_obj(at)
            .map_err(|_| ChainError::TableOutOfMemory(at.raw_value()))?;
        let flags = desc.flags();
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        let buf = Buf {
            addr: desc.addr(),
            len: desc.len(),
        };
        let write = flags & VIRTQ_DESC_F_WRITE != 0;
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if buf.len > 0 && !mem.check_range(buf.addr, buf.len as usize, access) {
            return Err(ChainError::BufferOutOfMemory {
                addr: buf.addr.raw_value(),
                len: buf.len,
            });
        }
        if write {
            chain.writable.push(buf);
        } else if chain.writable.is_empty() {
            chain.readable.push(buf);
        } else {
            return Err(ChainError::ReadableAfterWritable);
        }
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
}

/// A window into a list of buffers, addressed as one byte stream.
pub fn slice_bufs(bufs: &[Buf], mut start: u64, mut len: u64) -> Vec<Buf> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if start >= blen {
            start -= blen;
            continue;
        }
        let take = (blen - start).min(len);
        // `take` <= b.len, so it fits in u32.
        let Some(addr) = b.addr.checked_add(start) else {
            break;
        };
        out.push(Buf {
            addr,
            len: take as u32,
        });
        len -= take;
        start = 0;
    }
    out
}

/// Reads `out.len()` bytes from the start of the byte stream `bufs`; returns
/// how many were available.
pub fn read_bytes(mem: &GuestMemory, bufs: &[Buf], out: &mut [u8]) -> usize {
    let mut done = 0;
    for b in slice_bufs(bufs, 0, out.len() as u64) {
        let n = b.len as usize;
        if mem.read_slice(&mut out[done..done + n], b.addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Writes `data` to the start of the byte stream `bufs`; returns how many
/// bytes were written.
pub fn write_bytes(mem: &GuestMemory, bufs: &[Buf], data: &[u8]) -> usize {
    let mut done = 0;
    for b in slice_bufs(bufs, 0, data.len() as u64) {
        let n = b.len as usize;
        if mem.write_slice(&data[done..done + n], b.addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Takes the next chain the driver made available on `queue` and walks it.
/// `None`: nothing (more) to do, or the available ring is unusable (logged).
pub(crate) fn pop(
    queue: &mut Queue,
    mem: &GuestMemory,
    max_descs: usize,
    log: &mut LogLimiter,
    device: &'static str,
) -> Option<(u16, Result<Chain, ChainError>)> {
    let head = match queue.iter(mem) {
        Ok(mut it) => it.next().map(|c| c.head_index())?,
        Err(e) => {
            guest_warn!(log, device, error = %e, "virtio: available ring unusable");
            return None;
        }
    };
    let chain = walk(
        mem,
        GuestAddress(queue.desc_table()),
        queue.size(),
        head,
        max_descs,
    );
    if let Err(e) = &chain {
        guest_warn!(log, device, head, error = %e, "virtio: malformed descriptor chain refused");
    }
    Some((head, chain))
}

/// Puts `head` in the used ring with `len` bytes written. A head past the
/// queue cannot be returned and is skipped. `false`: the used ring cannot be
/// written (stop processing the queue).
pub(crate) fn put_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
    log: &mut LogLimiter,
    device: &'static str,
) -> bool {
    if head >= queue.size() {
        return true;
    }
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            guest_warn!(log, device, error = %e, "virtio: used ring write failed");
            false
        }
    }
}

/// Raises the used-buffer interrupt unless the driver suppressed it.
///
/// `VIRTIO_F_EVENT_IDX` is not offered, so the driver's only say is
/// `VRING_AVAIL_F_NO_INTERRUPT` in the avail ring's flags (which
/// virtio-queue does not look at).
pub(crate) fn notify_used(queue: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let flags = mem
        .read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map(u16::from_le)
        .unwrap_or(0);
    if flags & VRING_AVAIL_F_NO_INTERRUPT == 0 {
        interrupt.signal_used_queue();
    }
}

/// Checks that a queue's rings lie in guest memory with the access the
/// device needs, for its current size.
pub(crate) fn rings_in_memory(queue: &Queue, mem: &GuestMemory) -> bool {
    let size = usize::from(queue.size());
    mem.check_range(
        GuestAddress(queue.desc_table()),
        16 * size,
        Permissions::Read,
    ) && mem.check_range(
        GuestAddress(queue.avail_ring()),
        6 + 2 * size,
        Permissions::Read,
    ) && mem.check_range(
        GuestAddress(queue.used_ring()),
        6 + 8 * size,
        Permissions::Write,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .expect("memory")
    }

    fn desc(m: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + u64::from(i) * 16);
        m.write_obj(RawDescriptor::new(addr, len, flags, next), at)
            .expect("write descriptor");
    }

    #[test]
    fn walk_splits_readable_and_writable() {
        let m = mem();
        desc(&m, 0, 0, 0x1000, 16, VIRTQ_DESC_F_NEXT, 3);
        desc(
            &m,
            0,
            3,
            0xff00,
            0x200,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        desc(&m, 0, 1, 0x2000, 1, VIRTQ_DESC_F_WRITE, 0);
        let c = walk(&m, GuestAddress(0), 4, 0, 4).expect("chain");
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable.len(), 2);
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 0x201);
    }

    #[test]
    fn walk_refuses_malformed_chains() {
        let m = mem();
        // A loop.
        desc(&m, 0, 0, 0x1000, 16, VIRTQ_DESC_F_NEXT, 1);
        desc(&m, 0, 1, 0x1000, 16, VIRTQ_DESC_F_NEXT, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 0, 64),
            Err(ChainError::TooLong(4))
        ));
        // Longer than the device allows.
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 0, 1),
            Err(ChainError::TooLong(1))
        ));
        // Next past the table, head past the table.
        desc(&m, 0, 1, 0x1000, 16, VIRTQ_DESC_F_NEXT, 9);
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 0, 64),
            Err(ChainError::IndexOutOfRange(9, 4))
        ));
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 4, 64),
            Err(ChainError::IndexOutOfRange(4, 4))
        ));
        // Indirect.
        desc(&m, 0, 0, 0x1000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 0, 64),
            Err(ChainError::Indirect)
        ));
        // Buffer outside memory, or wrapping the address space.
        desc(&m, 0, 0, 0x1_fff0, 32, 0, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 0, 64),
            Err(ChainError::BufferOutOfMemory { .. })
        ));
        desc(&m, 0, 0, u64::MAX - 4, 32, VIRTQ_DESC_F_WRITE, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 0, 64),
            Err(ChainError::BufferOutOfMemory { .. })
        ));
        // Readable after writable.
        desc(
            &m,
            0,
            0,
            0x1000,
            16,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            1,
        );
        desc(&m, 0, 1, 0x1000, 16, 0, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0), 4, 0, 64),
            Err(ChainError::ReadableAfterWritable)
        ));
        // Descriptor table itself outside memory.
        assert!(matches!(
            walk(&m, GuestAddress(0x1_fff0), 4, 1, 64),
            Err(ChainError::TableOutOfMemory(_))
        ));
        assert!(matches!(
            walk(&m, GuestAddress(u64::MAX - 8), 4, 1, 64),
            Err(ChainError::TableOutOfMemory(_))
        ));
    }

    #[test]
    fn byte_streams_span_buffers_and_regions() {
        let m = mem();
        let bufs = [
            Buf {
                addr: GuestAddress(0xfffe),
                len: 4,
            },
            Buf {
                addr: GuestAddress(0x3000),
                len: 0,
            },
            Buf {
                addr: GuestAddress(0x4000),
                len: 4,
            },
        ];
        assert_eq!(write_bytes(&m, &bufs, &[1, 2, 3, 4, 5, 6, 7, 8, 9]), 8);
        let mut out = [0u8; 8];
        assert_eq!(read_bytes(&m, &bufs, &mut out), 8);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
        let s = slice_bufs(&bufs, 3, 3);
        assert_eq!(
            s,
            vec![
                Buf {
                    addr: GuestAddress(0x10001),
                    len: 1
                },
                Buf {
                    addr: GuestAddress(0x4000),
                    len: 2
                }
            ]
        );
        assert!(slice_bufs(&bufs, 100, 3).is_empty());
    }

    #[test]
    fn config_reads_pad_with_zeros() {
        let cfg = [1u8, 2, 3];
        let mut d = [0xffu8; 4];
        super::super::read_config_bytes(&cfg, 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        super::super::read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
