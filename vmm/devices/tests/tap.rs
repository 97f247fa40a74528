//! virtio-net on a real tap made by `open_tap`, inside a fresh network
//! namespace (a thread that unshared CLONE_NEWNET). Frames go in and out
//! through an AF_PACKET socket on the same interface. Skipped unless root
//! with /dev/net/tun.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::*;
use vireo_vmm_devices::bus::BusDevice;
use vireo_vmm_devices::virtio::Net;
use vireo_vmm_devices::virtio::tap::open_tap;
use vm_memory::{Bytes, GuestAddress};

const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const IFNAME: &str = "vireotap0";

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/net/tun").exists()
}

fn link_up(name: &str) {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: libc::IFF_UP as i16,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: plain socket and SIOCSIFFLAGS on a 40-byte ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(s >= 0);
        let s = OwnedFd::from_raw_fd(s);
        assert_eq!(
            libc::ioctl(
                s.as_raw_fd(),
                libc::SIOCSIFFLAGS as _,
                &mut req as *mut IfReq
            ),
            0,
            "SIOCSIFFLAGS: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn packet_socket(name: &str) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: FFI calls with valid pointers and sizes.
    unsafe {
        let ifindex = libc::if_nametoindex(cname.as_ptr());
        assert_ne!(ifindex, 0);
        let s = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETHERTYPE.to_be()),
        );
        assert!(s >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let s = OwnedFd::from_raw_fd(s);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETHERTYPE.to_be();
        sll.sll_ifindex = ifindex as i32;
        let r = libc::bind(
            s.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        s
    }
}

fn eth_frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..100u8).map(|i| i ^ tag));
    f
}

fn poll_in(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn in_netns() {
    // SAFETY: unshare affects only this thread's network namespace.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    let tap = open_tap(IFNAME).expect("open_tap");
    link_up(IFNAME);
    let pkt = packet_socket(IFNAME);

    let mut h = Harness::new(Net::new(tap, GUEST_MAC).expect("net"));
    let mut qs = h.bring_up(2, 16);
    let mut tx = qs.remove(1);
    let mut rx = qs.remove(0);
    let tap_fd = h.t.event_fds()[0];

    // RX: host -> guest. The kernel may also send its own frames (IPv6
    // router solicitations) on the new link; look for ours.
    for i in 0..8u64 {
        rx.add_chain(&h.mem, &[(DATA_BASE + i * 0x1000, 2048, true)]);
    }
    h.notify(0);
    let want = eth_frame(GUEST_MAC, HOST_MAC, 0x5a);
    // SAFETY: sends from a valid buffer.
    let n = unsafe { libc::send(pkt.as_raw_fd(), want.as_ptr().cast(), want.len(), 0) };
    assert_eq!(n, want.len() as isize);
    let mut found = false;
    for _ in 0..20 {
        if poll_in(tap_fd, 200) {
            h.t.handle_event(tap_fd);
        }
        while let Some((id, len)) = rx.pop_used(&h.mem) {
            let mut buf = vec![0u8; len as usize];
            h.mem
                .read_slice(&mut buf, GuestAddress(DATA_BASE + u64::from(id) * 0x1000))
                .unwrap();
            assert_eq!(&buf[..10], &[0u8; 10], "plain vnet header");
            assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
            if buf[12..] == want[..] {
                found = true;
            }
        }
        if found {
            break;
        }
    }
    assert!(found, "frame from the host reached the guest");

    // TX: guest -> host.
    let out = eth_frame(HOST_MAC, GUEST_MAC, 0xa5);
    let at = DATA_BASE + 0x10_0000;
    h.mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
    h.mem.write_slice(&out, GuestAddress(at + 12)).unwrap();
    tx.add_chain(&h.mem, &[(at, 12 + out.len() as u32, false)]);
    h.notify(1);
    assert_eq!(tx.pop_used(&h.mem).map(|e| e.1), Some(0));
    let mut buf = [0u8; 2048];
    let mut got = false;
    for _ in 0..10 {
        // SAFETY: receives into a valid buffer.
        let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            break;
        }
        if buf[..n as usize] == out[..] {
            got = true;
            break;
        }
    }
    assert!(got, "frame from the guest reached the host");
    assert_eq!(h.t.device().stats().tx_frames, 1);
}

#[test]
fn tap_end_to_end_in_a_network_namespace() {
    if !can_run() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    std::thread::spawn(in_netns)
        .join()
        .expect("tap test thread");
}
