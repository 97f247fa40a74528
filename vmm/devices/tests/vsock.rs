//! virtio-vsock driven through the mmio transport, with real Unix sockets in
//! a temporary directory for the host side: the test plays the guest driver
//! (queues in guest memory) and the host processes (socket clients and
//! listeners) at once.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use vireo_vmm_devices::bus::BusDevice;
use vireo_vmm_devices::virtio::mmio::reg;
use vireo_vmm_devices::virtio::vsock::packet::*;
use vireo_vmm_devices::virtio::vsock::*;
use vireo_vmm_devices::virtio::{Error, Vsock};
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
const RX_BUF: u32 = 4096;
const RX_AREA: u64 = 0x30_0000;
const TX_AREA: u64 = DATA_BASE;
const QSIZE: u16 = 256;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vireo-vsock-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The device up, with the test as its guest driver.
struct Rig {
    h: Harness<Vsock>,
    rx: VirtQ,
    tx: VirtQ,
    uds: PathBuf,
    /// RX chain head -> buffer address.
    rx_bufs: HashMap<u16, u64>,
    _dir: TempDir,
}

fn hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

impl Rig {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let uds = dir.0.join("vsock.sock");
        let listener = UnixListener::bind(&uds).expect("bind");
        let dev = Vsock::new(GUEST_CID, listener, &uds).expect("vsock");
        let mut h = Harness::new(dev);
        let mut qs = h.bring_up(3, QSIZE);
        let _event = qs.remove(2);
        let tx = qs.remove(1);
        let rx = qs.remove(0);
        Rig {
            h,
            rx,
            tx,
            uds,
            rx_bufs: HashMap::new(),
            _dir: dir,
        }
    }

    /// Posts `n` RX buffers of [`RX_BUF`] bytes (header and data in one).
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let i = self.rx.next_desc;
            let addr = RX_AREA + u64::from(i) * u64::from(RX_BUF);
            let head = self.rx.add_chain(&self.h.mem, &[(addr, RX_BUF, true)]);
            self.rx_bufs.insert(head, addr);
        }
        self.h.notify(RX_QUEUE as u32);
    }

    /// Host side events (what the VMM's event loop does).
    fn pump(&mut self) {
        // Socket I/O between threads of one process is synchronous, but give
        // the kernel a moment for wake-ups.
        std::thread::sleep(Duration::from_millis(5));
        let fd = self.h.t.device().epoll_fd();
        self.h.t.handle_event(fd);
    }

    /// The guest sends one packet (header and payload in two descriptors).
    fn send(&mut self, h: Header, payload: &[u8]) {
        let mut h = h;
        h.len = payload.len() as u32;
        self.h
            .mem
            .write_slice(&h.to_bytes(), GuestAddress(TX_AREA))
            .unwrap();
        let p = TX_AREA + 0x1000;
        self.h.mem.write_slice(payload, GuestAddress(p)).unwrap();
        let mut bufs = vec![(TX_AREA, HDR_LEN as u32, false)];
        if !payload.is_empty() {
            bufs.push((p, payload.len() as u32, false));
        }
        let head = self.tx.add_chain(&self.h.mem, &bufs);
        self.h.notify(TX_QUEUE as u32);
        assert_eq!(self.tx.pop_used(&self.h.mem), Some((u32::from(head), 0)));
    }

    /// The next packet the device gave the guest.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (id, len) = self.rx.pop_used(&self.h.mem)?;
        let addr = self.rx_bufs.remove(&(id as u16)).expect("known RX head");
        assert!(len as usize >= HDR_LEN, "used length {len}");
        let mut raw = [0u8; HDR_LEN];
        self.h.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let h = Header::from_bytes(&raw);
        assert_eq!(len as usize, HDR_LEN + h.len as usize);
        let mut data = vec![0u8; h.len as usize];
        self.h
            .mem
            .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        assert_eq!(
            (h.src_cid, h.dst_cid, h.type_),
            (HOST_CID, GUEST_CID, TYPE_STREAM)
        );
        Some((h, data))
    }

    fn recv_op(&mut self, op: u16) -> Header {
        let (h, _) = self.recv().expect("a packet for the guest");
        assert_eq!(h.op, op, "{h:?}");
        h
    }

    /// Data the device sent on a connection, until `n` bytes came.
    fn recv_data(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let (h, d) = self.recv().expect("more data");
            assert_eq!(h.op, op::RW, "{h:?}");
            out.extend(d);
        }
        out
    }

    /// A host-initiated connection to guest port `port`, accepted by the
    /// guest with `buf_alloc`: (host stream, host-side port).
    fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).expect("connect to the vsock socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        let req = self.recv_op(op::REQUEST);
        assert_eq!(req.dst_port, port);
        let mut resp = hdr(port, req.src_port, op::RESPONSE);
        resp.buf_alloc = buf_alloc;
        self.send(resp, &[]);
        let line = read_line(&mut s);
        assert_eq!(line, format!("OK {}", req.src_port));
        (s, req.src_port)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).expect("read line");
        assert_eq!(n, 1, "EOF in the middle of a line");
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

#[test]
fn vsock_config_and_cid_checks() {
    let mut r = Rig::new("cfg");
    assert_eq!(r.h.r32(reg::DEVICE_ID), 19);
    let mut cid = [0u8; 8];
    r.h.t.read(reg::CONFIG, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    assert_eq!(r.h.t.event_fds(), vec![r.h.t.device().epoll_fd()]);
    let d = TempDir::new("cid");
    for bad in [0u64, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let l = UnixListener::bind(d.0.join(format!("s{bad}"))).unwrap();
        assert!(
            matches!(Vsock::new(bad, l, &d.0.join("x")), Err(Error::InvalidCid(c)) if c == bad),
            "CID {bad}"
        );
    }
}

#[test]
fn vsock_host_initiated_connection_carries_data_both_ways_and_closes() {
    let mut r = Rig::new("host");
    r.post_rx(16);
    let (mut s, local) = r.host_connect(1234, 1 << 20);
    assert_eq!(r.h.t.device().connection_count(), 1);

    // Host to guest.
    s.write_all(b"hello guest").unwrap();
    r.pump();
    let (h, d) = r.recv().expect("data");
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, local, 1234));
    assert_eq!(d, b"hello guest");
    assert_eq!(h.buf_alloc, CONN_BUF_SIZE);

    // Guest to host.
    r.send(hdr(1234, local, op::RW), b"hello host");
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");

    // Host half-closes: the guest hears SHUTDOWN(SEND) and can still send.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    r.pump();
    let sd = r.recv_op(op::SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_SEND);
    r.send(hdr(1234, local, op::RW), b"reply");
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");

    // The guest closes: SHUTDOWN both, the device answers RST and closes
    // the host socket.
    let mut sd = hdr(1234, local, op::SHUTDOWN);
    sd.flags = SHUTDOWN_BOTH;
    r.send(sd, &[]);
    r.recv_op(op::RST);
    assert_eq!(s.read(&mut got).unwrap(), 0, "host socket closed");
    assert_eq!(r.h.t.device().connection_count(), 0);
}

#[test]
fn vsock_host_close_reaches_the_guest() {
    let mut r = Rig::new("hclose");
    r.post_rx(16);
    let (s, local) = r.host_connect(7, 1 << 20);
    drop(s);
    r.pump();
    let sd = r.recv_op(op::SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_BOTH);
    assert_eq!(r.h.t.device().connection_count(), 1);
    r.send(hdr(7, local, op::RST), &[]);
    assert_eq!(r.h.t.device().connection_count(), 0);
    assert!(r.recv().is_none(), "no answer to an RST");
}

#[test]
fn vsock_host_connect_refused_by_the_guest_or_malformed() {
    let mut r = Rig::new("refuse");
    r.post_rx(16);
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    r.pump();
    let req = r.recv_op(op::REQUEST);
    r.send(hdr(99, req.src_port, op::RST), &[]);
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0, "refused: socket closed");
    assert_eq!(r.h.t.device().connection_count(), 0);

    // Not a CONNECT line, and a line that never ends.
    for junk in [&b"HELLO 5\n"[..], &[b'A'; 100][..]] {
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(junk).unwrap();
        r.pump();
        // Closed: EOF, or a reset when it had unread bytes.
        match s.read(&mut b) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        assert!(r.recv().is_none());
    }

    // The host client gives up before the guest answers: the guest gets RST.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 5\n").unwrap();
    r.pump();
    let req = r.recv_op(op::REQUEST);
    drop(s);
    r.pump();
    let rst = r.recv_op(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 5));
    assert_eq!(r.h.t.device().connection_count(), 0);
}

#[test]
fn vsock_guest_initiated_connections() {
    let mut r = Rig::new("guest");
    r.post_rx(16);
    let mut target = r.uds.clone().into_os_string();
    target.push("_52");
    let listener = UnixListener::bind(&target).unwrap();

    r.send(hdr(1000, 52, op::REQUEST), &[]);
    let resp = r.recv_op(op::RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (52, 1000));
    let (mut s, _) = listener.accept().expect("the device connected");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    r.send(hdr(1000, 52, op::RW), b"ping");
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    s.write_all(b"pong").unwrap();
    r.pump();
    let (h, d) = r.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, 52, 1000));
    assert_eq!(d, b"pong");

    // A second connection to a port where nothing listens: RST.
    r.send(hdr(1001, 53, op::REQUEST), &[]);
    let rst = r.recv_op(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (53, 1001));
    assert_eq!(r.h.t.device().connection_count(), 1);
    assert_eq!(r.h.t.device().stats().connections_refused, 1);

    // Guest closes.
    let mut sd = hdr(1000, 52, op::SHUTDOWN);
    sd.flags = SHUTDOWN_BOTH;
    r.send(sd, &[]);
    r.recv_op(op::RST);
    assert_eq!(s.read(&mut got).unwrap(), 0);
    assert_eq!(r.h.t.device().connection_count(), 0);
}

#[test]
fn vsock_host_to_guest_respects_credit() {
    let mut r = Rig::new("credit");
    r.post_rx(64);
    let guest_buf = 8192u32;
    let (mut s, local) = r.host_connect(80, guest_buf);
    let data = pattern(20_000, 3);
    s.write_all(&data).unwrap();
    r.pump();
    // Exactly the guest's buffer, in RX-buffer-sized packets, then nothing.
    let first = r.recv_data(guest_buf as usize);
    assert_eq!(first.len(), guest_buf as usize);
    r.pump();
    r.post_rx(8);
    assert!(r.recv().is_none(), "no data past the guest's credit");

    // The guest consumed it: CREDIT_UPDATE, the rest flows.
    let mut cu = hdr(80, local, op::CREDIT_UPDATE);
    cu.buf_alloc = guest_buf;
    cu.fwd_cnt = guest_buf;
    r.send(cu, &[]);
    let second = r.recv_data(guest_buf as usize);
    assert!(r.recv().is_none());
    cu.fwd_cnt = 2 * guest_buf;
    r.send(cu, &[]);
    let third = r.recv_data(data.len() - 2 * guest_buf as usize);
    let all: Vec<u8> = [first, second, third].concat();
    assert_eq!(all, data);
}

#[test]
fn vsock_data_waits_for_rx_buffers() {
    let mut r = Rig::new("nobuf");
    r.post_rx(4);
    let (mut s, _local) = r.host_connect(81, 1 << 20);
    // The REQUEST took one buffer.
    r.post_rx(1);
    // Four buffers' worth and more, with no buffer left after the first four.
    let data = pattern(6 * (RX_BUF as usize - HDR_LEN), 9);
    s.write_all(&data).unwrap();
    r.pump();
    let mut got = r.recv_data(4 * (RX_BUF as usize - HDR_LEN));
    assert!(r.recv().is_none());
    r.pump();
    r.post_rx(4);
    got.extend(r.recv_data(2 * (RX_BUF as usize - HDR_LEN)));
    assert_eq!(got, data);
}

#[test]
fn vsock_guest_to_host_credit_updates_and_overrun() {
    let mut r = Rig::new("txcredit");
    r.post_rx(64);
    let (mut s, local) = r.host_connect(90, 1 << 20);
    // Three full packets: the device forwards them and, past a quarter of
    // its buffer, tells the guest how far it got.
    let data = pattern(3 * MAX_PKT_PAYLOAD as usize, 1);
    for chunk in data.chunks(MAX_PKT_PAYLOAD as usize) {
        r.send(hdr(90, local, op::RW), chunk);
    }
    let cu = r.recv_op(op::CREDIT_UPDATE);
    assert!(cu.fwd_cnt >= CONN_BUF_SIZE / 4, "{cu:?}");
    assert_eq!(cu.buf_alloc, CONN_BUF_SIZE);
    let mut got = vec![0u8; data.len()];
    let reader = std::thread::spawn(move || {
        s.read_exact(&mut got).unwrap();
        (s, got)
    });
    // Whatever the socket did not take right away is written when it is
    // writable again.
    let (mut s, got) = loop {
        r.pump();
        if reader.is_finished() {
            break reader.join().unwrap();
        }
    };
    assert_eq!(got, data);

    // CREDIT_REQUEST is answered with our counters.
    r.send(hdr(90, local, op::CREDIT_REQUEST), &[]);
    let mut cu = r.recv_op(op::CREDIT_UPDATE);
    while cu.fwd_cnt < data.len() as u32 {
        // An earlier update may still have been in the queue.
        cu = r.recv_op(op::CREDIT_UPDATE);
    }
    assert_eq!(cu.fwd_cnt, data.len() as u32);

    // A guest that ignores the credit while the host does not read gets RST.
    let chunk = pattern(MAX_PKT_PAYLOAD as usize, 2);
    let mut reset = false;
    for _ in 0..16 {
        r.send(hdr(90, local, op::RW), &chunk);
        while let Some((h, _)) = r.recv() {
            reset |= h.op == op::RST;
        }
        if reset {
            break;
        }
    }
    assert!(reset, "overrunning the credit resets the connection");
    assert_eq!(r.h.t.device().connection_count(), 0);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = Vec::new();
    assert!(s.read_to_end(&mut sink).is_ok(), "host socket closed");
}

#[test]
fn vsock_malformed_packets_get_rst_or_are_dropped() {
    let mut r = Rig::new("bad");
    r.post_rx(32);
    let before = r.h.t.device().stats().malformed;

    // Data for a connection that does not exist: RST.
    r.send(hdr(5, 6, op::RW), b"x");
    let rst = r.recv_op(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (6, 5));
    // An op that does not exist, for no connection: RST; an RST: nothing.
    r.send(hdr(5, 6, 99), &[]);
    r.recv_op(op::RST);
    r.send(hdr(5, 6, op::RST), &[]);
    assert!(r.recv().is_none());
    // A socket type we do not offer (SEQPACKET): RST.
    let mut sp = hdr(5, 6, op::REQUEST);
    sp.type_ = 2;
    r.send(sp, &[]);
    r.recv_op(op::RST);
    // Wrong CIDs: dropped.
    let mut bad = hdr(5, 6, op::REQUEST);
    bad.src_cid = 7;
    r.send(bad, &[]);
    let mut bad = hdr(5, 6, op::REQUEST);
    bad.dst_cid = 3;
    r.send(bad, &[]);
    assert!(r.recv().is_none());

    // A length past the chain: dropped.
    let mut h = hdr(5, 6, op::RW);
    h.len = 1000;
    r.h.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_AREA))
        .unwrap();
    r.tx.add_chain(
        &r.h.mem,
        &[
            (TX_AREA, HDR_LEN as u32, false),
            (TX_AREA + 0x1000, 10, false),
        ],
    );
    // Shorter than a header, split header, device-writable TX buffer, and a
    // buffer outside guest memory.
    r.tx.add_chain(&r.h.mem, &[(TX_AREA, 20, false)]);
    r.tx.add_chain(&r.h.mem, &[(TX_AREA, HDR_LEN as u32, true)]);
    r.tx.add_chain(&r.h.mem, &[(MEM_SIZE as u64 - 8, HDR_LEN as u32, false)]);
    r.h.notify(TX_QUEUE as u32);
    for _ in 0..4 {
        assert_eq!(r.tx.pop_used(&r.h.mem).map(|u| u.1), Some(0));
    }
    assert!(r.recv().is_none());
    assert!(r.h.t.device().stats().malformed >= before + 7);

    // RX chains too short for a header, or device-readable, are returned
    // empty; the RST waiting for them goes into the next good one.
    let mut r = Rig::new("badrx");
    r.rx.add_chain(&r.h.mem, &[(RX_AREA, 16, true)]);
    r.rx.add_chain(&r.h.mem, &[(RX_AREA, 4096, false)]);
    r.send(hdr(5, 6, op::RW), b"x");
    assert_eq!(r.rx.pop_used(&r.h.mem).map(|u| u.1), Some(0));
    assert_eq!(r.rx.pop_used(&r.h.mem).map(|u| u.1), Some(0));
    r.post_rx(1);
    r.recv_op(op::RST);
}

#[test]
fn vsock_random_guest_input_never_panics_and_the_device_keeps_working() {
    let mut r = Rig::new("random");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut target = r.uds.clone().into_os_string();
    target.push("_52");
    let _listener = UnixListener::bind(&target).unwrap();
    for i in 0..3000 {
        // Random bytes, often with a plausible header in front.
        let mut bytes: Vec<u8> = (0..(rnd() % 200) as usize).map(|_| rnd() as u8).collect();
        if i % 2 == 0 && bytes.len() >= HDR_LEN {
            let mut h = hdr(
                (rnd() % 4) as u32,
                [52, 53, 1 << 30][(rnd() % 3) as usize],
                (rnd() % 9) as u16,
            );
            h.len = (rnd() % 300) as u32;
            h.flags = (rnd() % 4) as u32;
            h.buf_alloc = rnd() as u32;
            h.fwd_cnt = rnd() as u32;
            bytes[..HDR_LEN].copy_from_slice(&h.to_bytes());
        }
        r.h.mem.write_slice(&bytes, GuestAddress(TX_AREA)).unwrap();
        // Random chain shapes: split anywhere, sometimes out of memory or
        // device-writable.
        let split = (rnd() as usize) % (bytes.len() + 1);
        let mut bufs = vec![(TX_AREA, split as u32, rnd() % 16 == 0)];
        if rnd() % 2 == 0 {
            bufs.push((TX_AREA + split as u64, (bytes.len() - split) as u32, false));
        }
        if rnd() % 32 == 0 {
            bufs.push((
                rnd() % (2 * MEM_SIZE as u64),
                (rnd() % 100_000) as u32,
                false,
            ));
        }
        r.tx.add_chain(&r.h.mem, &bufs);
        let outstanding = r.rx.avail_idx.wrapping_sub(r.rx.used_idx(&r.h.mem));
        if rnd() % 4 == 0 && outstanding < QSIZE / 2 {
            // Random RX chains too, of any size.
            let len = (rnd() % 200) as u32;
            let i = r.rx.next_desc;
            let head = r.rx.add_chain(
                &r.h.mem,
                &[(RX_AREA + u64::from(i) * 4096, len, rnd() % 8 != 0)],
            );
            r.rx_bufs.insert(head, RX_AREA + u64::from(i) * 4096);
            r.h.notify(RX_QUEUE as u32);
        }
        r.h.notify(TX_QUEUE as u32);
        while r.tx.pop_used(&r.h.mem).is_some() {}
        while r.rx.pop_used(&r.h.mem).is_some() {}
        if i % 100 == 0 {
            r.pump();
        }
        // A random write to the queue registers now and then is the
        // transport's business (tested elsewhere); keep the queues sane.
    }
    // Still serves a host connection, once the RSTs it owes are out.
    r.pump();
    loop {
        let outstanding = r.rx.avail_idx.wrapping_sub(r.rx.used_idx(&r.h.mem));
        r.post_rx(usize::from(QSIZE / 2 - outstanding.min(QSIZE / 2)));
        let mut n = 0;
        while r.rx.pop_used(&r.h.mem).is_some() {
            n += 1;
        }
        if n == 0 {
            break;
        }
    }
    // Start over on a clean ring for the final check (buffers still posted
    // are a mix of random ones and the test's).
    r.h.w32(reg::STATUS, 0);
    let mut qs = r.h.bring_up(3, QSIZE);
    r.tx = qs.remove(1);
    r.rx = qs.remove(0);
    r.rx_bufs.clear();
    r.post_rx(32);
    let (mut s, local) = r.host_connect(4242, 1 << 20);
    r.send(hdr(4242, local, op::RW), b"still here");
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
}

#[test]
fn vsock_connection_limit_refuses_both_ways() {
    let dir = TempDir::new("limit");
    let uds = dir.0.join("vsock.sock");
    let dev = Vsock::new(GUEST_CID, UnixListener::bind(&uds).unwrap(), &uds)
        .unwrap()
        .with_max_connections(2);
    let mut h = Harness::new(dev);
    let mut qs = h.bring_up(3, QSIZE);
    let mut r = Rig {
        tx: qs.remove(1),
        rx: qs.remove(0),
        h,
        uds,
        rx_bufs: HashMap::new(),
        _dir: dir,
    };
    r.post_rx(16);
    let mut target = r.uds.clone().into_os_string();
    target.push("_52");
    let listener = UnixListener::bind(&target).unwrap();
    r.send(hdr(1, 52, op::REQUEST), &[]);
    r.recv_op(op::RESPONSE);
    let (_s1, _) = r.host_connect(9, 1 << 20);
    assert_eq!(r.h.t.device().connection_count(), 2);
    // A third, from the guest: RST; from the host: closed.
    r.send(hdr(2, 52, op::REQUEST), &[]);
    r.recv_op(op::RST);
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    r.pump();
    let mut b = [0u8; 4];
    assert_eq!(c.read(&mut b).unwrap(), 0);
    assert!(r.recv().is_none());
    assert_eq!(r.h.t.device().stats().connections_refused, 1);
    // Room again once one goes.
    r.send(hdr(1, 52, op::RST), &[]);
    r.send(hdr(3, 52, op::REQUEST), &[]);
    r.recv_op(op::RESPONSE);
    drop(listener);
}

#[test]
fn vsock_reset_drops_connections() {
    let mut r = Rig::new("reset");
    r.post_rx(8);
    let (mut s, _) = r.host_connect(1, 1 << 20);
    r.h.w32(reg::STATUS, 0);
    assert!(!r.h.t.is_activated());
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert_eq!(r.h.t.device().connection_count(), 0);
    // A CONNECT while the driver is down is closed.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 1\n").unwrap();
    r.pump();
    assert_eq!(s.read(&mut b).unwrap(), 0);
}
