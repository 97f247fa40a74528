//! virtio-balloon driven through the mmio transport.

mod common;

use common::*;
use vireo_vmm_devices::bus::BusDevice;
use vireo_vmm_devices::virtio::balloon::{self, Balloon};
use vireo_vmm_devices::virtio::mmio::reg;
use vireo_vmm_devices::virtio::{INT_CONFIG_CHANGE, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

const PFN_LIST: u64 = DATA_BASE + 0x10_0000;

/// Writes `pfns` as a little-endian u32 array at `PFN_LIST`.
fn write_pfns(h: &Harness<Balloon>, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    h.mem.write_slice(&bytes, GuestAddress(PFN_LIST)).unwrap();
    bytes.len() as u32
}

fn fill_page(h: &Harness<Balloon>, pfn: u64, v: u8) {
    h.mem
        .write_slice(&[v; 4096], GuestAddress(pfn * 4096))
        .unwrap();
}

fn page_is(h: &Harness<Balloon>, pfn: u64, v: u8) -> bool {
    let mut b = [0u8; 4096];
    h.mem.read_slice(&mut b, GuestAddress(pfn * 4096)).unwrap();
    b.iter().all(|&x| x == v)
}

#[test]
fn balloon_registers_and_config() {
    let mut h = Harness::new(Balloon::new(300));
    assert_eq!(h.r32(reg::DEVICE_ID), 5);
    // Nothing but VERSION_1: no stats queue, no DEFLATE_ON_OOM.
    assert_eq!(h.device_features(), VIRTIO_F_VERSION_1);
    let control = h.t.device().control();
    assert_eq!(h.r32(reg::CONFIG), 300);
    assert_eq!(h.r32(reg::CONFIG + 4), 0);
    // The driver writes `actual`, whole or byte by byte.
    h.w32(reg::CONFIG + 4, 0x0102_0304);
    assert_eq!(control.actual_pages(), 0x0102_0304);
    h.t.write(reg::CONFIG + 6, &[0xff]);
    assert_eq!(control.actual_pages(), 0x01ff_0304);
    assert_eq!(h.r32(reg::CONFIG + 4), 0x01ff_0304);
    // num_pages is the device's; writes there or past the end are ignored.
    h.w32(reg::CONFIG, 7);
    h.w32(reg::CONFIG + 8, 7);
    h.t.write(reg::CONFIG + 3, &[1, 2]);
    h.t.write(reg::CONFIG + u64::MAX / 2, &[1, 2]);
    assert_eq!(h.r32(reg::CONFIG), 300);
    assert_eq!(control.target_pages(), 300);
    assert_eq!(h.r32(reg::CONFIG + 8), 0);
    // Two queues are needed.
    h.negotiate(VIRTIO_F_VERSION_1);
    h.setup_queue(&VirtQ::new(0, 8));
    h.driver_ok();
    assert!(!h.t.is_activated());
}

#[test]
fn balloon_set_target_bumps_generation_and_interrupts_when_up() {
    let mut h = Harness::new(Balloon::new(0));
    let control = h.t.device().control();
    let g0 = h.r32(reg::CONFIG_GENERATION);
    balloon::set_target(&mut h.t, &control, 10);
    // Before DRIVER_OK: no interrupt, but the generation moves.
    assert_eq!(h.irqs(), 0);
    assert_ne!(h.r32(reg::CONFIG_GENERATION), g0);
    assert_eq!(h.r32(reg::CONFIG), 10);
    let _qs = h.bring_up(2, 8);
    let g1 = h.r32(reg::CONFIG_GENERATION);
    balloon::set_target(&mut h.t, &control, 20);
    assert_eq!(h.r32(reg::CONFIG), 20);
    assert_ne!(h.r32(reg::CONFIG_GENERATION), g1);
    assert_eq!(h.irqs(), 1);
    assert_eq!(
        h.r32(reg::INTERRUPT_STATUS) & INT_CONFIG_CHANGE,
        INT_CONFIG_CHANGE
    );
    h.w32(reg::INTERRUPT_ACK, INT_CONFIG_CHANGE);
    assert_eq!(h.r32(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn balloon_inflate_discards_pages_and_deflate_keeps_them() {
    let mut h = Harness::new(Balloon::new(4));
    let mut qs = h.bring_up(2, 8);
    // Pages 0x300..0x306 hold data; 0x300..0x303 and 0x305 are inflated
    // (two runs), 0x304 is not.
    for pfn in 0x300..0x306 {
        fill_page(&h, pfn, 0xab);
    }
    let len = write_pfns(&h, &[0x300, 0x301, 0x302, 0x303, 0x305]);
    let head = qs[0].add_chain(&h.mem, &[(PFN_LIST, len, false)]);
    h.notify(0);
    assert_eq!(qs[0].pop_used(&h.mem), Some((u32::from(head), 0)));
    assert!(h.irqs() > 0);
    for pfn in [0x300, 0x301, 0x302, 0x303, 0x305] {
        assert!(page_is(&h, pfn, 0), "page {pfn:#x} not discarded");
    }
    assert!(page_is(&h, 0x304, 0xab));
    let s = h.t.device().stats();
    assert_eq!((s.inflated, s.refused, s.madvise_errors), (5, 0, 0));

    // Deflate: the pages come back (zero, as discarded); nothing else moves.
    fill_page(&h, 0x300, 0x5a);
    let len = write_pfns(&h, &[0x300, 0x301]);
    let head = qs[1].add_chain(&h.mem, &[(PFN_LIST, len, false)]);
    h.notify(1);
    assert_eq!(qs[1].pop_used(&h.mem), Some((u32::from(head), 0)));
    assert!(page_is(&h, 0x300, 0x5a));
    assert_eq!(h.t.device().stats().deflated, 2);
}

#[test]
fn balloon_refuses_pfns_outside_ram_and_bad_chains() {
    let mut h = Harness::new(Balloon::new(4));
    let mut qs = h.bring_up(2, 8);
    let last = (MEM_SIZE / 4096) as u32 - 1;
    fill_page(&h, u64::from(last), 0x11);
    // Past RAM, far past, the largest PFN, and the last good page.
    let len = write_pfns(&h, &[last + 1, 0x8000_0000, u32::MAX, last]);
    qs[0].add_chain(&h.mem, &[(PFN_LIST, len, false)]);
    // A PFN list that is not a multiple of 4 bytes: the tail is ignored
    // (its one PFN is `last + 1`).
    qs[0].add_chain(&h.mem, &[(PFN_LIST, 6, false)]);
    // A list outside RAM (refused as a chain), and a chain with a writable
    // buffer (the buffer is ignored, the PFN `last + 1` refused).
    qs[0].add_chain(&h.mem, &[(u64::MAX - 8, 16, false)]);
    qs[0].add_chain(&h.mem, &[(PFN_LIST, 4, false), (DATA_BASE, 8, true)]);
    h.notify(0);
    for _ in 0..4 {
        assert_eq!(qs[0].pop_used(&h.mem).map(|e| e.1), Some(0));
    }
    let s = h.t.device().stats();
    assert_eq!((s.refused, s.inflated), (5, 1), "{s:?}");
    assert!(page_is(&h, u64::from(last), 0));
    // Deflate with bad PFNs is refused the same way.
    let len = write_pfns(&h, &[u32::MAX]);
    qs[1].add_chain(&h.mem, &[(PFN_LIST, len, false)]);
    h.notify(1);
    assert_eq!(qs[1].pop_used(&h.mem).map(|e| e.1), Some(0));
    assert_eq!(h.t.device().stats().refused, 6);
    // Notifies of a queue that does not exist are ignored.
    h.notify(2);
    h.notify(u32::MAX);
}

#[test]
fn balloon_reset_forgets_actual_and_keeps_target() {
    let mut h = Harness::new(Balloon::new(0));
    let control = h.t.device().control();
    let _qs = h.bring_up(2, 8);
    balloon::set_target(&mut h.t, &control, 64);
    h.w32(reg::CONFIG + 4, 64);
    assert_eq!(control.actual_pages(), 64);
    h.w32(reg::STATUS, 0);
    assert_eq!(control.actual_pages(), 0);
    assert_eq!(control.target_pages(), 64);
    let _qs = h.bring_up(2, 8);
    assert_eq!(h.r32(reg::CONFIG), 64);
    BusDevice::reset(&mut h.t);
    assert_eq!(h.r32(reg::CONFIG + 4), 0);
}
