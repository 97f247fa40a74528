//! virtio-net driven through the mmio transport, with a datagram socket pair
//! standing in for the tap (it keeps frame boundaries as a tap does).

mod common;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use common::*;
use vireo_vmm_devices::bus::BusDevice;
use vireo_vmm_devices::virtio::Net;
use vireo_vmm_devices::virtio::mmio::reg;
use vireo_vmm_devices::virtio::net::*;
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn nic() -> (UnixDatagram, Harness<Net>, VirtQ, VirtQ) {
    let (host, dev) = UnixDatagram::pair().expect("socketpair");
    let tap = File::from(OwnedFd::from(dev));
    let mut h = Harness::new(Net::new(tap, MAC).expect("net"));
    let mut qs = h.bring_up(2, 16);
    let tx = qs.remove(1);
    let rx = qs.remove(0);
    host.set_nonblocking(true).unwrap();
    (host, h, rx, tx)
}

fn frame(n: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend((0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed));
    f
}

#[test]
fn net_config_has_mac_and_link() {
    let (_host, mut h, _rx, _tx) = nic();
    assert_eq!(h.r32(reg::DEVICE_ID), 1);
    let f = h.device_features();
    assert_ne!(f & VIRTIO_NET_F_MAC, 0);
    assert_eq!(f & 1, 0, "no CSUM offered");
    let mut mac = [0u8; 6];
    h.t.read(reg::CONFIG, &mut mac);
    assert_eq!(mac, MAC);
    let mut st = [0u8; 2];
    h.t.read(reg::CONFIG + 6, &mut st);
    assert_eq!(u16::from_le_bytes(st), VIRTIO_NET_S_LINK_UP);
    let fd = h.t.device().tap_fd();
    assert_eq!(h.t.event_fds(), vec![fd]);
}

#[test]
fn net_tx_writes_frames_to_the_tap() {
    let (host, mut h, _rx, mut tx) = nic();
    let f = frame(100, 1);
    // The guest's header claims checksum offload; it is cleared.
    let mut sent = f.clone();
    sent[0] = 1;
    h.mem
        .write_slice(&sent[..12], GuestAddress(DATA_BASE))
        .unwrap();
    h.mem
        .write_slice(&sent[12..], GuestAddress(DATA_BASE + 0x1000))
        .unwrap();
    let head = tx.add_chain(
        &h.mem,
        &[(DATA_BASE, 12, false), (DATA_BASE + 0x1000, 100, false)],
    );
    h.notify(1);
    assert_eq!(tx.pop_used(&h.mem), Some((u32::from(head), 0)));
    let mut buf = [0u8; 2048];
    let n = host.recv(&mut buf).expect("frame on the tap");
    assert_eq!(&buf[..n], &f[..]);
    assert_eq!(h.t.device().stats().tx_frames, 1);

    // Malformed TX chains: shorter than the header, device-writable buffer.
    tx.add_chain(&h.mem, &[(DATA_BASE, 8, false)]);
    tx.add_chain(
        &h.mem,
        &[(DATA_BASE, 12, false), (DATA_BASE + 0x1000, 64, true)],
    );
    h.notify(1);
    assert_eq!(tx.pop_used(&h.mem).map(|e| e.1), Some(0));
    assert_eq!(tx.pop_used(&h.mem).map(|e| e.1), Some(0));
    assert!(host.recv(&mut buf).is_err(), "nothing more on the tap");
    assert_eq!(h.t.device().stats().malformed, 2);
}

#[test]
fn net_rx_delivers_frames_and_keeps_one_pending() {
    let (host, mut h, mut rx, _tx) = nic();
    let fd = h.t.device().tap_fd();
    // Two frames arrive before the guest posted any RX buffer.
    let f1 = frame(60, 7);
    let f2 = frame(1500, 9);
    host.send(&f1).unwrap();
    host.send(&f2).unwrap();
    h.t.handle_event(fd);
    assert_eq!(rx.used_idx(&h.mem), 0);

    // One buffer: the pending frame goes in it, with num_buffers = 1.
    let b1 = DATA_BASE;
    let head = rx.add_chain(&h.mem, &[(b1, 2048, true)]);
    let irqs = h.irqs();
    h.notify(0);
    assert_eq!(
        rx.pop_used(&h.mem),
        Some((u32::from(head), f1.len() as u32))
    );
    assert!(h.irqs() > irqs);
    let mut got = vec![0u8; f1.len()];
    h.mem.read_slice(&mut got, GuestAddress(b1)).unwrap();
    let mut want = f1.clone();
    want[10] = 1;
    assert_eq!(got, want);

    // The second frame waits for the next buffer (split header/data).
    let b2 = DATA_BASE + 0x1000;
    rx.add_chain(&h.mem, &[(b2, 12, true), (b2 + 0x100, 1600, true)]);
    h.notify(0);
    assert_eq!(rx.pop_used(&h.mem).map(|e| e.1), Some(f2.len() as u32));
    let mut got = vec![0u8; 1500];
    h.mem
        .read_slice(&mut got, GuestAddress(b2 + 0x100))
        .unwrap();
    assert_eq!(&got[..], &f2[12..]);
    assert_eq!(h.t.device().stats().rx_frames, 2);
    assert_eq!(h.t.device().stats().rx_dropped, 0);

    // A frame arriving with buffers posted is delivered on the tap event.
    rx.add_chain(&h.mem, &[(b1, 2048, true)]);
    h.notify(0);
    let f3 = frame(200, 3);
    host.send(&f3).unwrap();
    h.t.handle_event(fd);
    assert_eq!(rx.pop_used(&h.mem).map(|e| e.1), Some(f3.len() as u32));
}

#[test]
fn net_rx_refuses_bad_buffers() {
    let (host, mut h, mut rx, _tx) = nic();
    let fd = h.t.device().tap_fd();
    // A device-readable RX buffer is refused; the frame goes to the next.
    rx.add_chain(&h.mem, &[(DATA_BASE, 2048, false)]);
    // Outside guest memory.
    rx.add_chain(&h.mem, &[(MEM_SIZE as u64, 2048, true)]);
    rx.add_chain(&h.mem, &[(DATA_BASE, 2048, true)]);
    let f = frame(64, 5);
    host.send(&f).unwrap();
    h.t.handle_event(fd);
    assert_eq!(rx.pop_used(&h.mem).map(|e| e.1), Some(0));
    assert_eq!(rx.pop_used(&h.mem).map(|e| e.1), Some(0));
    assert_eq!(rx.pop_used(&h.mem).map(|e| e.1), Some(f.len() as u32));
    // Too small for the frame: dropped, buffer returned empty.
    rx.add_chain(&h.mem, &[(DATA_BASE, 16, true)]);
    host.send(&frame(64, 6)).unwrap();
    h.t.handle_event(fd);
    assert_eq!(rx.pop_used(&h.mem).map(|e| e.1), Some(0));
    assert_eq!(h.t.device().stats().rx_dropped, 1);
}

#[test]
fn net_drops_frames_before_driver_ok_and_after_reset() {
    let (host, dev) = UnixDatagram::pair().unwrap();
    let mut h = Harness::new(Net::new(File::from(OwnedFd::from(dev)), MAC).unwrap());
    let fd = h.t.device().tap_fd();
    host.send(&frame(64, 1)).unwrap();
    h.t.handle_event(fd);
    assert_eq!(h.t.device().stats().rx_dropped, 1);
    let mut qs = h.bring_up(2, 16);
    h.w32(reg::STATUS, 0);
    assert!(!h.t.is_activated());
    host.send(&frame(64, 2)).unwrap();
    h.t.handle_event(fd);
    assert_eq!(h.t.device().stats().rx_dropped, 2);
    // Bring it up again: works.
    let _ = qs.remove(1);
    let mut rx = qs.remove(0);
    let mut qs = h.bring_up(2, 16);
    rx = std::mem::replace(&mut qs[0], rx);
    rx.add_chain(&h.mem, &[(DATA_BASE, 2048, true)]);
    h.notify(0);
    host.send(&frame(64, 3)).unwrap();
    h.t.handle_event(fd);
    assert_eq!(rx.pop_used(&h.mem).map(|e| e.1), Some(76));
}
