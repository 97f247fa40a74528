//! Each device's snapshot state: saved from a device in use, restored into
//! one built the same way, it carries on where the first stopped; states
//! that do not fit are refused and leave the device usable.

mod common;

use common::*;
use std::sync::Arc;
use vireo_vmm_devices::bus::BusDevice;
use vireo_vmm_devices::legacy::cpu_hotplug::CpuHotplug;
use vireo_vmm_devices::legacy::i8042::I8042;
use vireo_vmm_devices::legacy::power::{GuestRequest, RequestSink};
use vireo_vmm_devices::legacy::serial::SerialDevice;
use vireo_vmm_devices::virtio::mmio::{MmioTransport, reg};
use vireo_vmm_devices::virtio::{Balloon, Block, Rng};

struct NoSink;
impl RequestSink for NoSink {
    fn request(&self, _r: GuestRequest) {}
}

#[test]
fn a_restored_rng_serves_the_next_buffer_with_the_saved_indices() {
    let mut h = Harness::new(Rng::new());
    let mut q = h.bring_up(1, 8).remove(0);
    for _ in 0..3 {
        q.add_chain(&h.mem, &[(DATA_BASE, 16, true)]);
        h.notify(0);
        assert!(q.pop_used(&h.mem).is_some());
    }
    let saved = h.t.save_state();
    assert!(saved.activated);
    let dq = saved.device_queues.as_ref().expect("device queues");
    assert_eq!((dq[0].next_avail, dq[0].next_used), (3, 3));
    // The transport's own copy stays at activation time.
    assert_eq!(saved.queues[0].next_avail, 0);

    // A new transport on the same memory, as a restored VMM builds it.
    let mut t = MmioTransport::new(h.mem.clone(), h.irq.clone(), Rng::new()).expect("transport");
    t.restore_state(&saved).expect("restores");
    assert_eq!(t.save_state(), saved, "the state round-trips");
    let mut b = [0u8; 4];
    t.read(reg::STATUS, &mut b);
    assert_eq!(u32::from_le_bytes(b), saved.status);
    // The next buffer is the fourth: served by the restored device.
    q.add_chain(&h.mem, &[(DATA_BASE, 16, true)]);
    t.write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
    assert_eq!(q.pop_used(&h.mem).map(|e| e.1), Some(16));
    assert_eq!(q.used_idx(&h.mem), 4);
}

#[test]
fn states_that_do_not_fit_are_refused() {
    let mut h = Harness::new(Rng::new());
    h.bring_up(1, 8);
    let saved = h.t.save_state();
    // Another device type in the slot.
    let file = TempFile::new(&[0u8; 4096]);
    let mut blk = MmioTransport::new(
        h.mem.clone(),
        h.irq.clone(),
        Block::new(file.open_rw(), false).expect("block"),
    )
    .expect("transport");
    let e = blk.restore_state(&saved).expect_err("type");
    assert!(e.to_string().contains("device type"), "{e}");
    // A queue size the device does not offer, rings outside memory.
    let mut t = MmioTransport::new(h.mem.clone(), h.irq.clone(), Rng::new()).expect("transport");
    let mut bad = saved.clone();
    bad.queues[0].max_size = 4096;
    assert!(t.restore_state(&bad).is_err());
    let mut bad = saved.clone();
    if let Some(dq) = bad.device_queues.as_mut() {
        dq[0].desc_table = 1 << 40;
    }
    let e = t.restore_state(&bad).expect_err("rings");
    assert!(e.to_string().contains("outside guest memory"), "{e}");
    assert!(!t.is_activated(), "a refused state leaves the device reset");
    t.restore_state(&saved)
        .expect("the good state still restores");
}

#[test]
fn the_balloon_keeps_its_target_and_actual() {
    let mut h = Harness::new(Balloon::new(100));
    h.bring_up(2, 8);
    let saved = h.t.save_state();
    let b = Balloon::new(0);
    let control = b.control();
    let mut t = MmioTransport::new(h.mem.clone(), h.irq.clone(), b).expect("transport");
    t.restore_state(&saved).expect("restores");
    assert_eq!(control.target_pages(), 100);
}

#[test]
fn legacy_devices_round_trip_and_refuse_what_does_not_fit() {
    let irq = Arc::new(CountIrq::default());
    let mut s = SerialDevice::new(irq.clone(), Vec::new());
    s.write(3, &[0x03]); // line control
    s.write(7, &[0x5a]); // scratch
    assert_eq!(s.enqueue_input(b"abc"), 3);
    let st = s.save_state().expect("state");
    let mut s2 = SerialDevice::new(irq.clone(), Vec::new());
    s2.restore_state(&st).expect("restores");
    assert_eq!(s2.save_state(), Some(st.clone()));
    let mut c = [0u8];
    s2.read(0, &mut c);
    assert_eq!(c[0], b'a', "unread input carried over");
    let mut big = st.clone();
    big.in_buffer = vec![0; 65];
    assert!(s2.restore_state(&big).is_err());
    s2.write(0, b"x");
    assert_eq!(
        s2.writer().map(|w| w.as_slice()),
        Some(&b"x"[..]),
        "still works"
    );

    let mut k = I8042::new(Arc::new(NoSink), irq.clone());
    k.send_ctrl_alt_del();
    let ks = k.save_state();
    let mut k2 = I8042::new(Arc::new(NoSink), irq.clone());
    k2.restore_state(&ks).expect("restores");
    assert_eq!(k2.save_state(), ks);
    let mut bad = ks.clone();
    bad.pending = 9;
    assert!(k2.restore_state(&bad).is_err());

    let c = CpuHotplug::new(3, Arc::new(NoSink), irq.clone());
    let mut cs = c.save_state();
    cs.cpus[2].enabled = false;
    let mut c2 = CpuHotplug::new(3, Arc::new(NoSink), irq.clone());
    c2.restore_state(&cs).expect("restores");
    assert_eq!(c2.enabled_count(), 2);
    let mut c3 = CpuHotplug::new(2, Arc::new(NoSink), irq);
    assert!(c3.restore_state(&cs).is_err(), "another vCPU count");
}

#[test]
fn a_restored_vsock_tells_the_guest_its_connections_are_gone() {
    use std::os::unix::net::UnixListener;
    use vireo_vmm_devices::virtio::Vsock;
    use vm_memory::{Bytes, GuestAddress};
    let dir = std::env::temp_dir().join(format!("vireo-snap-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let uds = dir.join("a.sock");
    let dev = Vsock::new(3, UnixListener::bind(&uds).expect("bind"), &uds).expect("vsock");
    let mut h = Harness::new(dev);
    let mut qs = h.bring_up(3, 256);
    let mut event = qs.remove(2);
    // The guest driver's event buffer, filled with a marker.
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(DATA_BASE))
        .expect("write");
    event.add_chain(&h.mem, &[(DATA_BASE, 8, true)]);
    let saved = h.t.save_state();

    let uds2 = dir.join("b.sock");
    let dev2 = Vsock::new(3, UnixListener::bind(&uds2).expect("bind"), &uds2).expect("vsock");
    let mut t = MmioTransport::new(h.mem.clone(), h.irq.clone(), dev2).expect("transport");
    let irqs = h.irqs();
    t.restore_state(&saved).expect("restores");
    assert_eq!(
        event.pop_used(&h.mem).map(|e| e.1),
        Some(4),
        "one 4-byte event"
    );
    assert_eq!(
        h.mem
            .read_obj::<u32>(GuestAddress(DATA_BASE))
            .expect("read"),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert_eq!(t.device().stats().transport_resets, 1);
    assert!(h.irqs() > irqs, "the guest is interrupted");
    let _ = std::fs::remove_dir_all(&dir);
}
