//! The virtio-mmio transport: registers, feature negotiation, queue set-up
//! validation, activation and reset (with the entropy device, the simplest).

mod common;

use common::*;
use vireo_vmm_devices::bus::BusDevice;
use vireo_vmm_devices::virtio::mmio::reg;
use vireo_vmm_devices::virtio::{Block, Rng, STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn mmio_identity_registers() {
    let mut h = Harness::new(Rng::new());
    assert_eq!(h.r32(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.r32(reg::VERSION), 2);
    assert_eq!(h.r32(reg::DEVICE_ID), 4);
    assert_ne!(h.r32(reg::VENDOR_ID), 0);
    assert_eq!(h.device_features(), VIRTIO_F_VERSION_1);
    h.w32(reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(h.r32(reg::DEVICE_FEATURES), 0);
    h.w32(reg::QUEUE_SEL, 0);
    assert_eq!(h.r32(reg::QUEUE_NUM_MAX), 256);
    h.w32(reg::QUEUE_SEL, 1);
    assert_eq!(h.r32(reg::QUEUE_NUM_MAX), 0, "no second queue");
    h.w32(reg::SHM_SEL, 0);
    assert_eq!(h.r32(reg::SHM_LEN_LOW), u32::MAX, "no shared memory");
    assert_eq!(h.r32(reg::CONFIG_GENERATION), 0);
}

#[test]
fn mmio_odd_accesses_are_ignored() {
    let mut h = Harness::new(Rng::new());
    // Sub-word and misaligned register accesses read as zero.
    let mut b = [0xffu8; 2];
    h.t.read(reg::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    let mut w = [0xffu8; 4];
    h.t.read(reg::MAGIC_VALUE + 1, &mut w);
    assert_eq!(w, [0; 4]);
    // Unknown and read-only registers.
    assert_eq!(h.r32(0x0e0), 0);
    h.w32(reg::MAGIC_VALUE, 0);
    h.w32(0x0e0, 0xdead_beef);
    h.t.write(reg::STATUS, &[1u8]);
    assert_eq!(h.r32(reg::STATUS), 0, "byte write to Status ignored");
    assert_eq!(h.r32(reg::MAGIC_VALUE), 0x7472_6976);
    // Far past the config space.
    let mut big = [0xffu8; 8];
    h.t.read(u64::MAX - 3, &mut big);
    assert_eq!(big, [0; 8]);
    h.t.write(u64::MAX - 3, &[1, 2, 3, 4]);
}

#[test]
fn mmio_refuses_unoffered_features() {
    let mut h = Harness::new(Rng::new());
    assert!(!h.negotiate(VIRTIO_F_VERSION_1 | 1 << 5), "unoffered bit");
    assert!(!h.negotiate(0), "no VERSION_1 (legacy driver)");
    // Feature words beyond the second.
    h.negotiate(VIRTIO_F_VERSION_1);
    h.w32(reg::STATUS, 0);
    h.w32(reg::STATUS, 3);
    h.w32(reg::DRIVER_FEATURES_SEL, 1);
    h.w32(reg::DRIVER_FEATURES, 1);
    h.w32(reg::DRIVER_FEATURES_SEL, 2);
    h.w32(reg::DRIVER_FEATURES, 1);
    h.w32(reg::STATUS, 0xb);
    assert_eq!(h.r32(reg::STATUS) & 8, 0);
    // The good case; features are frozen afterwards.
    assert!(h.negotiate(VIRTIO_F_VERSION_1));
    h.w32(reg::DRIVER_FEATURES_SEL, 0);
    h.w32(reg::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(h.t.acked_features(), VIRTIO_F_VERSION_1);
    // DRIVER_OK without FEATURES_OK is refused.
    h.w32(reg::STATUS, 0);
    h.w32(reg::STATUS, 3);
    h.w32(reg::STATUS, 7);
    assert_eq!(h.r32(reg::STATUS) & 4, 0);
    assert!(!h.t.is_activated());
}

#[test]
fn mmio_queue_setup_is_validated() {
    let mut h = Harness::new(Rng::new());
    // Queue registers before FEATURES_OK are refused.
    h.w32(reg::QUEUE_SEL, 0);
    h.w32(reg::QUEUE_NUM, 8);
    assert!(h.negotiate(VIRTIO_F_VERSION_1));
    let q = VirtQ::new(0, 8);
    // Not a power of two, and above the maximum: refused, size unchanged.
    h.w32(reg::QUEUE_NUM, 12);
    h.w32(reg::QUEUE_NUM, 512);
    h.w32(reg::QUEUE_NUM, 0x1_0008);
    // Rings outside guest memory: QueueReady stays 0.
    h.w32(reg::QUEUE_DESC_LOW, 0);
    h.w32(reg::QUEUE_DESC_HIGH, 1);
    h.w32(reg::QUEUE_DRIVER_LOW, q.avail as u32);
    h.w32(reg::QUEUE_DEVICE_LOW, q.used as u32);
    h.w32(reg::QUEUE_READY, 1);
    assert_eq!(h.r32(reg::QUEUE_READY), 0);
    // Ring straddling the end of RAM.
    h.w32(reg::QUEUE_DESC_HIGH, 0);
    h.w32(reg::QUEUE_DESC_LOW, (MEM_SIZE - 64) as u32);
    h.w32(reg::QUEUE_READY, 1);
    assert_eq!(h.r32(reg::QUEUE_READY), 0);
    // Misaligned descriptor table and used ring.
    h.w32(reg::QUEUE_DESC_LOW, q.desc as u32 + 8);
    h.w32(reg::QUEUE_READY, 1);
    assert_eq!(h.r32(reg::QUEUE_READY), 0);
    h.w32(reg::QUEUE_DESC_LOW, q.desc as u32);
    h.w32(reg::QUEUE_DEVICE_LOW, q.used as u32 + 2);
    h.w32(reg::QUEUE_READY, 1);
    assert_eq!(h.r32(reg::QUEUE_READY), 0);
    h.setup_queue(&q);
    assert_eq!(h.r32(reg::QUEUE_READY), 1);
    // Once ready, the queue's registers are frozen.
    h.w32(reg::QUEUE_DESC_LOW, 0x10);
    // Notify before DRIVER_OK does nothing.
    h.notify(0);
    h.driver_ok();
    assert!(h.t.is_activated());
    // After DRIVER_OK QueueReady cannot be cleared.
    h.w32(reg::QUEUE_READY, 0);
    assert_eq!(h.r32(reg::QUEUE_READY), 1);
    // Notify of a queue that does not exist.
    h.notify(5);
    let mut q = q;
    q.add_chain(&h.mem, &[(DATA_BASE, 16, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(16));
}

#[test]
fn mmio_activation_failure_sets_needs_reset() {
    let tf = TempFile::new(&[0u8; 4096]);
    let mut h = Harness::new(Block::new(tf.open_rw(), false).unwrap());
    let f = h.device_features();
    assert!(h.negotiate(f));
    // DRIVER_OK without enabling the queue.
    h.driver_ok();
    assert!(!h.t.is_activated());
    let st = h.r32(reg::STATUS);
    assert_ne!(st & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        h.r32(reg::INTERRUPT_STATUS) & 2,
        2,
        "config change interrupt"
    );
    assert_eq!(h.r32(reg::CONFIG_GENERATION), 1);
    assert!(h.irqs() > 0);
    // Recovery through reset.
    h.w32(reg::STATUS, 0);
    assert_eq!(h.r32(reg::STATUS), 0);
    assert_eq!(h.r32(reg::INTERRUPT_STATUS), 0);
    h.bring_up(1, 8);
}

#[test]
fn mmio_reset_returns_to_power_on() {
    let mut h = Harness::new(Rng::new());
    let mut q = h.bring_up(1, 8).remove(0);
    q.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    h.notify(0);
    assert_eq!(h.r32(reg::INTERRUPT_STATUS), 1);
    // Clearing status bits without writing 0 is ignored.
    h.w32(reg::STATUS, 1);
    assert_eq!(h.r32(reg::STATUS), 0xf);
    // Bus reset (VMM reboot) and Status = 0 both reset.
    h.t.reset();
    assert_eq!(h.r32(reg::STATUS), 0);
    assert_eq!(h.r32(reg::INTERRUPT_STATUS), 0);
    h.w32(reg::QUEUE_SEL, 0);
    assert_eq!(h.r32(reg::QUEUE_READY), 0);
    assert!(!h.t.is_activated());
    // Notify after reset is ignored; the ring is not touched.
    let before = q.used_idx(&h.mem);
    q.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    h.notify(0);
    assert_eq!(q.used_idx(&h.mem), before);
    // Up again from scratch: fresh rings work.
    let mut q = h.bring_up(1, 8).remove(0);
    // A driver zeroes its rings before reusing them.
    for ring in [q.avail, q.used] {
        h.mem.write_slice(&[0u8; 4096], GuestAddress(ring)).unwrap();
    }
    q.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(8));
}

#[test]
fn mmio_head_index_past_the_queue_is_skipped() {
    let mut h = Harness::new(Rng::new());
    let mut q = h.bring_up(1, 8).remove(0);
    q.make_available(&h.mem, 200);
    let head = q.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    h.notify(0);
    assert_eq!(q.pop_used(&h.mem), Some((u32::from(head), 8)));
    assert_eq!(q.pop_used(&h.mem), None);
}
