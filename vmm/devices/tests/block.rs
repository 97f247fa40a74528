//! virtio-blk driven through the mmio transport like a guest driver.

mod common;

use common::*;
use vireo_vmm_devices::virtio::Block;
use vireo_vmm_devices::virtio::block::*;
use vireo_vmm_devices::virtio::mmio::reg;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x1000;
const STATUS: u64 = DATA_BASE + 0x80;

fn disk(sectors: usize, ro: bool) -> (TempFile, Harness<Block>, VirtQ) {
    let contents: Vec<u8> = (0..sectors * 512)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    let tf = TempFile::new(&contents);
    let blk = Block::new(tf.open_rw(), ro).expect("block");
    let mut h = Harness::new(blk);
    let mut qs = h.bring_up(1, 16);
    let q = qs.remove(0);
    (tf, h, q)
}

fn header(h: &Harness<Block>, t: u32, sector: u64) {
    h.mem.write_obj(t.to_le(), GuestAddress(HDR)).unwrap();
    h.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    h.mem
        .write_obj(sector.to_le(), GuestAddress(HDR + 8))
        .unwrap();
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(h: &Harness<Block>) -> u8 {
    h.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn block_registers_and_config() {
    let (_tf, mut h, _q) = disk(8, false);
    assert_eq!(h.r32(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.r32(reg::VERSION), 2);
    assert_eq!(h.r32(reg::DEVICE_ID), 2);
    let f = h.device_features();
    assert_ne!(f & (1 << 32), 0, "VERSION_1");
    assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(h.r32(reg::CONFIG), 8, "capacity low");
    assert_eq!(h.r32(reg::CONFIG + 4), 0, "capacity high");
    assert_eq!(h.r32(reg::CONFIG + 8), SIZE_MAX);
    assert_eq!(h.r32(reg::CONFIG + 12), SEG_MAX);
    // Byte-wide config access and past the end.
    let mut b = [0xaau8; 1];
    h.t_read(reg::CONFIG, &mut b);
    assert_eq!(b[0], 8);
    assert_eq!(h.r32(reg::CONFIG + 0x80), 0);
}

trait ReadExt {
    fn t_read(&mut self, off: u64, data: &mut [u8]);
}
impl ReadExt for Harness<Block> {
    fn t_read(&mut self, off: u64, data: &mut [u8]) {
        use vireo_vmm_devices::bus::BusDevice;
        self.t.read(off, data);
    }
}

#[test]
fn block_read_write_roundtrip() {
    let (tf, mut h, mut q) = disk(16, false);
    // Write sectors 2..4 from two data descriptors.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    h.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    header(&h, VIRTIO_BLK_T_OUT, 2);
    let head = q.add_chain(
        &h.mem,
        &[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 512, 512, false),
            (STATUS, 1, true),
        ],
    );
    let irqs = h.irqs();
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem), Some((u32::from(head), 1)));
    assert_eq!(status(&h), VIRTIO_BLK_S_OK);
    assert!(h.irqs() > irqs, "interrupt raised");
    assert_eq!(h.r32(reg::INTERRUPT_STATUS) & 1, 1);
    h.w32(reg::INTERRUPT_ACK, 1);
    assert_eq!(h.r32(reg::INTERRUPT_STATUS), 0);
    assert_eq!(&tf.contents()[1024..2048], &payload[..]);

    // Read them back into one descriptor; header and status in one chain
    // with the status in the data buffer's own descriptor tail.
    h.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&h, VIRTIO_BLK_T_IN, 2);
    let head = q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem), Some((u32::from(head), 1025)));
    assert_eq!(status(&h), VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 1024];
    h.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, payload);
}

#[test]
fn block_read_last_sector_and_beyond() {
    let (tf, mut h, mut q) = disk(4, false);
    header(&h, VIRTIO_BLK_T_IN, 3);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(513));
    assert_eq!(status(&h), VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 512];
    h.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(&back[..], &tf.contents()[1536..2048]);

    // Sector 3 + 2 sectors crosses the end.
    header(&h, VIRTIO_BLK_T_IN, 3);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(1));
    assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);

    // A sector number that overflows when multiplied.
    header(&h, VIRTIO_BLK_T_OUT, u64::MAX);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(1));
    assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);

    // Not a multiple of the sector size.
    header(&h, VIRTIO_BLK_T_IN, 0);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
}

#[test]
fn block_read_only_refuses_writes() {
    let (tf, mut h, mut q) = disk(4, true);
    assert_ne!(h.device_features() & VIRTIO_BLK_F_RO, 0);
    let before = tf.contents();
    h.mem
        .write_slice(&[0x55u8; 512], GuestAddress(DATA))
        .unwrap();
    header(&h, VIRTIO_BLK_T_OUT, 0);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(1));
    assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
    assert_eq!(tf.contents(), before);
    // Reads still work.
    header(&h, VIRTIO_BLK_T_IN, 1);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(status(&h), VIRTIO_BLK_S_OK);
}

#[test]
fn block_flush_get_id_and_unsupported() {
    let (_tf, mut h, mut q) = disk(4, false);
    header(&h, VIRTIO_BLK_T_FLUSH, 0);
    q.add_chain(&h.mem, &[(HDR, 16, false), (STATUS, 1, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(1));
    assert_eq!(status(&h), VIRTIO_BLK_S_OK);

    header(&h, VIRTIO_BLK_T_GET_ID, 0);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(21));
    assert_eq!(status(&h), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert!(id.starts_with(b"vireo-"), "{id:?}");

    header(&h, 99, 0);
    q.add_chain(&h.mem, &[(HDR, 16, false), (STATUS, 1, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(1));
    assert_eq!(status(&h), VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn block_malformed_chains_are_refused() {
    let (tf, mut h, mut q) = disk(4, false);
    let before = tf.contents();

    // Short header.
    header(&h, VIRTIO_BLK_T_IN, 0);
    let head = q.add_chain(&h.mem, &[(HDR, 8, false), (STATUS, 1, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem), Some((u32::from(head), 0)));
    assert_eq!(status(&h), 0xff, "status untouched");

    // No writable status descriptor.
    header(&h, VIRTIO_BLK_T_FLUSH, 0);
    q.add_chain(&h.mem, &[(HDR, 16, false)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));

    // Readable after writable.
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (STATUS, 1, true), (DATA, 512, false)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));

    // Data buffer outside guest RAM.
    header(&h, VIRTIO_BLK_T_IN, 0);
    q.add_chain(
        &h.mem,
        &[
            (HDR, 16, false),
            (MEM_SIZE as u64 - 256, 512, true),
            (STATUS, 1, true),
        ],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));
    q.add_chain(
        &h.mem,
        &[
            (HDR, 16, false),
            (u64::MAX - 10, 512, true),
            (STATUS, 1, true),
        ],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));

    // A loop: two descriptors pointing at each other.
    let a = q.next_desc;
    let b = a + 1;
    q.write_desc(&h.mem, a, HDR, 16, F_NEXT, b);
    q.write_desc(&h.mem, b, DATA, 512, F_NEXT, a);
    q.next_desc += 2;
    q.make_available(&h.mem, a);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem), Some((u32::from(a), 0)));

    // Next index past the table.
    let a = q.next_desc;
    q.write_desc(&h.mem, a, HDR, 16, F_NEXT, 999);
    q.next_desc += 1;
    q.make_available(&h.mem, a);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));

    // Indirect descriptors were not offered.
    let a = q.next_desc;
    q.write_desc(&h.mem, a, DATA, 32, F_INDIRECT, 0);
    q.next_desc += 1;
    q.make_available(&h.mem, a);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));

    // The device still works afterwards.
    q.next_desc = 0;
    header(&h, VIRTIO_BLK_T_IN, 0);
    q.add_chain(
        &h.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(513));
    assert_eq!(status(&h), VIRTIO_BLK_S_OK);
    assert_eq!(tf.contents(), before);
}

#[test]
fn block_avail_index_jump_is_refused() {
    let (_tf, mut h, q) = disk(4, false);
    // avail.idx claims far more entries than the queue holds.
    h.mem.write_obj(1000u16, GuestAddress(q.avail + 2)).unwrap();
    h.notify(0);
    assert_eq!(q.used_idx(&h.mem), 0);
}

/// The counters `virsh domblkstat` shows: completed reads, writes and
/// flushes with their bytes; requests that end in an I/O error as `errs`;
/// GET_ID, unsupported types and malformed chains not counted.
#[test]
fn block_counts_requests_as_domblkstat_shows_them() {
    let contents = vec![0u8; 8 * 512];
    let tf = TempFile::new(&contents);
    let blk = Block::new(tf.open_rw(), false).expect("block");
    let stats = blk.stats();
    let mut h = Harness::new(blk);
    let mut q = h.bring_up(1, 16).remove(0);
    assert_eq!(
        stats.read(),
        BlockCounters::default(),
        "nothing counted yet"
    );

    let mut send = |h: &mut Harness<Block>, t: u32, sector: u64, data: Option<(u32, bool)>| {
        header(h, t, sector);
        let mut chain = vec![(HDR, 16, false)];
        if let Some((len, to_guest)) = data {
            chain.push((DATA, len, to_guest));
        }
        chain.push((STATUS, 1, true));
        q.add_chain(&h.mem, &chain);
        h.notify(0);
        assert!(q.pop_used(&h.mem).is_some(), "request {t} answered");
        status(h)
    };
    assert_eq!(
        send(&mut h, VIRTIO_BLK_T_OUT, 0, Some((1024, false))),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        send(&mut h, VIRTIO_BLK_T_OUT, 4, Some((512, false))),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        send(&mut h, VIRTIO_BLK_T_IN, 0, Some((2048, true))),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(send(&mut h, VIRTIO_BLK_T_FLUSH, 0, None), VIRTIO_BLK_S_OK);
    assert_eq!(
        send(&mut h, VIRTIO_BLK_T_GET_ID, 0, Some((20, true))),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(send(&mut h, 99, 0, None), VIRTIO_BLK_S_UNSUPP);
    // Past the end of the 8-sector disk: an I/O error.
    assert_eq!(
        send(&mut h, VIRTIO_BLK_T_IN, 7, Some((1024, true))),
        VIRTIO_BLK_S_IOERR
    );
    // Nothing writable, so no status byte: refused, not answered with a
    // status, not counted.
    header(&h, VIRTIO_BLK_T_IN, 0);
    q.add_chain(&h.mem, &[(HDR, 16, false), (DATA, 512, false)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));

    let c = stats.read();
    assert_eq!(
        (
            c.rd_req,
            c.rd_bytes,
            c.wr_req,
            c.wr_bytes,
            c.flush_req,
            c.errs
        ),
        (1, 2048, 2, 1536, 1, 1),
        "{c:?}"
    );
    assert!(c.rd_total_ns > 0 && c.wr_total_ns > 0, "{c:?}");
}
