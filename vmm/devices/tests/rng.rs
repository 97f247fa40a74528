//! virtio-rng driven through the mmio transport.

mod common;

use common::*;
use vireo_vmm_devices::virtio::Rng;
use vireo_vmm_devices::virtio::mmio::reg;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn rng_fills_buffers() {
    let mut h = Harness::new(Rng::new());
    assert_eq!(h.r32(reg::DEVICE_ID), 4);
    let mut q = h.bring_up(1, 8).remove(0);
    let head = q.add_chain(
        &h.mem,
        &[(DATA_BASE, 64, true), (DATA_BASE + 0x1000, 64, true)],
    );
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem), Some((u32::from(head), 128)));
    let mut a = [0u8; 64];
    let mut b = [0u8; 64];
    h.mem.read_slice(&mut a, GuestAddress(DATA_BASE)).unwrap();
    h.mem
        .read_slice(&mut b, GuestAddress(DATA_BASE + 0x1000))
        .unwrap();
    assert_ne!(a, [0u8; 64]);
    assert_ne!(a, b);
    assert!(h.irqs() > 0);
}

#[test]
fn rng_refuses_readable_and_bad_chains() {
    let mut h = Harness::new(Rng::new());
    let mut q = h.bring_up(1, 8).remove(0);
    q.add_chain(&h.mem, &[(DATA_BASE, 64, false)]);
    q.add_chain(&h.mem, &[(u64::MAX - 8, 64, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(0));
    assert_eq!(h.mem.read_obj::<u64>(GuestAddress(DATA_BASE)).unwrap(), 0);
}

#[test]
fn rng_honours_no_interrupt() {
    let mut h = Harness::new(Rng::new());
    let mut q = h.bring_up(1, 8).remove(0);
    // VRING_AVAIL_F_NO_INTERRUPT
    h.mem.write_obj(1u16, GuestAddress(q.avail)).unwrap();
    q.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(8));
    assert_eq!(h.irqs(), 0);
    h.mem.write_obj(0u16, GuestAddress(q.avail)).unwrap();
    q.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    h.notify(0);
    assert_eq!(h.irqs(), 1);
}

#[test]
fn rng_behind_a_boxed_device() {
    use vireo_vmm_devices::virtio::VirtioDevice;
    let dev: Box<dyn VirtioDevice> = Box::new(Rng::new());
    let mut h = Harness::new(dev);
    assert_eq!(h.r32(reg::DEVICE_ID), 4);
    let mut q = h.bring_up(1, 8).remove(0);
    q.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(8));
}
