//! virtio-vsock (device ID 19) with the host side as a Unix-socket proxy.
//!
//! The guest has one CID (≥ 3, in the config space); the host is CID 2. There
//! is no vhost: every host end of a connection is a Unix stream socket of the
//! VMM process.
//!
//! * **Host-initiated**: a host process connects to the listening socket
//!   `UDS` and writes `CONNECT <port>\n`. The device sends the guest a
//!   REQUEST to `<port>` from a fresh host-side port; on the guest's RESPONSE
//!   it writes `OK <host-side port>\n` on the socket and bytes flow both ways.
//!   On the guest's RST (nothing listens) the socket is closed.
//! * **Guest-initiated**: a REQUEST to CID 2 port P is a connect(2) to the
//!   Unix socket `UDS_P`; RESPONSE if it is accepted, RST if nothing listens.
//!
//! Queues: 0 RX (device to guest), 1 TX (guest to device), 2 event (held,
//! never used: there is no transport reset without migration).
//!
//! Flow control is the spec's credit scheme both ways. Host to guest: data
//! is read from a host socket only while the guest's advertised buffer
//! (`buf_alloc` minus bytes in flight) has room, and only as much as an RX
//! buffer takes. Guest to host: we advertise [`CONN_BUF_SIZE`] per
//! connection; what the host socket does not take at once is kept (never
//! more than that: a guest overrunning its credit gets an RST) and written
//! when the socket is writable; a CREDIT_UPDATE goes back once a quarter of
//! the buffer has been forwarded since the guest last heard from us.
//!
//! Every host socket sits in an epoll set of the device's own, whose
//! descriptor is the device's one event fd (the VMM watches it
//! edge-triggered). A socket is watched for reading only until it is seen
//! readable; from then on the device reads it when the guest has credit and
//! RX buffers, until EAGAIN, and only then watches it again. So the inner set
//! never holds an event the device has already seen and could not act on,
//! and draining it always ends.
//!
//! Whatever the guest sends (bad CIDs, lengths past the chain, unknown ops,
//! packets for connections that do not exist), the answer is an RST or a
//! dropped packet; guest memory is only touched through checked buffers.

pub mod packet;
pub mod unix;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use self::packet::{HDR_LEN, Header, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use super::chain::{self, Buf};
use super::{
    Error, Interrupt, LogLimiter, TYPE_VSOCK, VIRTIO_F_VERSION_1, VirtioDevice, guest_warn,
};
use crate::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Smallest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Most connections (and host clients still in the handshake) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Receive buffer advertised to the guest per connection: the most bytes of
/// guest data the device keeps for a host socket that does not read.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Largest payload of one packet either way.
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Forwarded bytes after which the guest is sent a CREDIT_UPDATE.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// RSTs for packets that belong to no connection, waiting for RX buffers.
const MAX_PENDING_RST: usize = 1024;
/// First host-side port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Inner epoll token of the listening socket.
const TOKEN_LISTENER: u64 = 0;

/// A connection, as the guest sees it: (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST (to be) sent, waiting for RESPONSE.
    LocalInit,
    Established,
    /// We told the guest both directions are shut; waiting for its RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Host socket seen readable (or hung up) and not yet read to EAGAIN.
    readable: bool,
    /// The host socket returned end-of-file.
    eof: bool,
    /// The host socket hung up or failed (no longer in the epoll set).
    hup: bool,
    /// Current interest in the inner epoll set (`None`: not in it).
    registered: Option<EventSet>,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest data not yet taken by the host socket.
    tx_buf: VecDeque<u8>,
    /// Bytes of guest data written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as of the last packet the guest got from us.
    last_fwd_cnt_sent: u32,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// Control packets owed to the guest.
    want_request: bool,
    want_response: bool,
    want_credit_update: bool,
    /// SHUTDOWN flags to send (0: none).
    want_shutdown: u32,
    /// In `rx_work`.
    queued: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Conn {
            stream,
            token,
            state,
            readable: false,
            eof: false,
            hup: false,
            registered: None,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_shutdown: 0,
            want_request: false,
            want_response: false,
            want_credit_update: false,
            want_shutdown: 0,
            queued: false,
        }
    }

    /// How many more bytes the guest can take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_control(&self) -> bool {
        self.want_request
            || self.want_response
            || self.want_credit_update
            || self.want_shutdown != 0
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// The epoll interest this connection needs now.
    fn interest(&self) -> Option<EventSet> {
        if self.hup {
            return None;
        }
        let mut e = EventSet::empty();
        if self.state != State::LocalInit && !self.readable && !self.eof {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        Some(e)
    }
}

/// A host client that has not finished its `CONNECT <port>` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Target {
    Handshake,
    Conn(ConnKey),
}

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    event: Queue,
    interrupt: Interrupt,
}

/// Counters, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Guest packets or chains refused (dropped or answered with RST).
    pub malformed: u64,
    pub rst_sent: u64,
    /// RSTs not sent because too many were waiting for RX buffers.
    pub rst_dropped: u64,
    pub connections_opened: u64,
    pub connections_refused: u64,
    /// TRANSPORT_RESET events given to the guest (after a restore).
    pub transport_resets: u64,
}

/// What one TX packet turned out to be, for the bookkeeping after it.
enum TxOutcome {
    Done,
    Malformed,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    config: [u8; 8],
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    active: Option<Active>,
    conns: HashMap<ConnKey, Conn>,
    handshakes: HashMap<u64, Handshake>,
    targets: HashMap<u64, Target>,
    next_token: u64,
    next_local_port: u32,
    rx_work: VecDeque<ConnKey>,
    rst_queue: VecDeque<Header>,
    bounce: Vec<u8>,
    stats: VsockStats,
    log: LogLimiter,
    queue_sizes: [u16; 3],
    max_connections: usize,
}

impl Vsock {
    /// A device for a guest with CID `cid` (at least [`MIN_GUEST_CID`]),
    /// serving host clients on `listener` (bound at `uds_path`; made
    /// non-blocking here). Guest-initiated connections to port P go to
    /// `<uds_path>_P`.
    pub fn new(cid: u64, listener: UnixListener, uds_path: &Path) -> Result<Self, Error> {
        // u32::MAX is VMADDR_CID_ANY; Linux keeps CIDs in 32 bits.
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid) {
            return Err(Error::InvalidCid(cid));
        }
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Vsock {
            cid,
            config: cid.to_le_bytes(),
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            active: None,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            targets: HashMap::new(),
            next_token: TOKEN_LISTENER + 1,
            next_local_port: FIRST_LOCAL_PORT,
            rx_work: VecDeque::new(),
            rst_queue: VecDeque::new(),
            bounce: Vec::new(),
            stats: VsockStats::default(),
            log: LogLimiter::default(),
            queue_sizes: [QUEUE_SIZE; 3],
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// Lowers the connection limit (default [`MAX_CONNECTIONS`]; never
    /// raised past it).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.min(MAX_CONNECTIONS);
        self
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// Open connections (handshakes not counted).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The device's event fd (its inner epoll set).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Where guest-initiated connections to `port` go.
    pub fn guest_target_path(&self, port: u32) -> PathBuf {
        let mut s = self.uds_path.clone().into_os_string();
        s.push(format!("_{port}"));
        PathBuf::from(s)
    }

    fn new_token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1).max(TOKEN_LISTENER + 1);
        self.next_token
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= self.max_connections
    }

    /// Header of a packet from us to the guest on `key`.
    fn header(&self, key: ConnKey, op: u16, conn: &Conn) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: conn.fwd_cnt,
        }
    }

    fn enqueue(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key)
            && !c.queued
        {
            c.queued = true;
            self.rx_work.push_back(key);
        }
    }

    fn queue_rst(&mut self, h: Header) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            self.stats.rst_dropped += 1;
            return;
        }
        self.rst_queue.push_back(h);
    }

    /// Puts `key`'s epoll registration in line with what it needs.
    fn sync_interest(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.interest();
        if want == c.registered {
            return;
        }
        let fd = c.stream.as_raw_fd();
        let result = match (c.registered, want) {
            (None, Some(e)) => {
                self.epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(e, c.token))
            }
            (Some(_), Some(e)) => {
                self.epoll
                    .ctl(ControlOperation::Modify, fd, EpollEvent::new(e, c.token))
            }
            (Some(_), None) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => c.registered = want,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-vsock: epoll_ctl failed; connection reset");
                self.reset_conn(key);
            }
        }
    }

    /// Drops a connection (closing its host socket) and tells the guest.
    fn reset_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get(&key) {
            let h = self.header(key, op::RST, c);
            self.queue_rst(h);
        }
        self.remove_conn(key);
    }

    /// Drops a connection without a word to the guest.
    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            if c.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.targets.remove(&c.token);
        }
    }

    fn remove_handshake(&mut self, token: u64) {
        if let Some(h) = self.handshakes.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.targets.remove(&token);
    }

    // ---- host side ----

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-vsock: accept failed");
                    return;
                }
            };
            if self.at_capacity() {
                tracing::warn!(
                    max = self.max_connections,
                    "virtio-vsock: too many connections; host client refused"
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.new_token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .is_err()
            {
                continue;
            }
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
            self.targets.insert(token, Target::Handshake);
        }
    }

    /// Reads a host client's handshake a byte at a time (so nothing after
    /// the newline is consumed) and starts the connection once it is whole.
    fn on_handshake(&mut self, token: u64) {
        let Some(h) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match h.stream.read(&mut byte) {
                Ok(0) => {
                    self.remove_handshake(token);
                    return;
                }
                Ok(_) if byte[0] == b'\n' => break unix::parse_connect(&h.line),
                Ok(_) => {
                    h.line.push(byte[0]);
                    if h.line.len() >= unix::MAX_LINE {
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.remove_handshake(token);
                    return;
                }
            }
        };
        let Some(h) = self.handshakes.remove(&token) else {
            return;
        };
        self.targets.remove(&token);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            h.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = port else {
            tracing::debug!("virtio-vsock: bad handshake from a host client; closed");
            return;
        };
        if self.active.is_none() {
            tracing::debug!(
                port,
                "virtio-vsock: host CONNECT while the driver is not up; closed"
            );
            return;
        }
        let Some(local_port) = self.alloc_local_port() else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let token = self.new_token();
        let mut c = Conn::new(h.stream, token, State::LocalInit);
        c.want_request = true;
        self.conns.insert(key, c);
        self.targets.insert(token, Target::Conn(key));
        self.stats.connections_opened += 1;
        self.sync_interest(key);
        self.enqueue(key);
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    fn on_conn_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            c.readable = true;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            c.hup = true;
        }
        match c.state {
            State::LocalInit if c.hup => {
                // The host client gave up before the guest answered.
                self.reset_conn(key);
                return;
            }
            State::Established if c.eof && c.hup => {
                c.want_shutdown = SHUTDOWN_BOTH;
                c.state = State::Closing;
            }
            _ => {}
        }
        if events.contains(EventSet::OUT) && !self.flush_tx(key) {
            return;
        }
        self.sync_interest(key);
        self.enqueue(key);
    }

    /// Writes buffered guest data to the host socket. `false`: the
    /// connection is gone.
    fn flush_tx(&mut self, key: ConnKey) -> bool {
        let Some(c) = self.conns.get_mut(&key) else {
            return false;
        };
        while !c.tx_buf.is_empty() {
            let (front, _) = c.tx_buf.as_slices();
            match c.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    c.tx_buf.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // EPIPE and the like: the host end is gone.
                    self.reset_conn(key);
                    return false;
                }
            }
        }
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            c.want_credit_update = true;
        }
        if c.tx_buf.is_empty() && c.peer_shutdown & SHUTDOWN_SEND != 0 {
            if c.peer_shutdown == SHUTDOWN_BOTH {
                // The guest is done both ways and everything it sent is out.
                self.reset_conn(key);
                return false;
            }
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        self.sync_interest(key);
        self.enqueue(key);
        self.conns.contains_key(&key)
    }

    // ---- guest to host (TX queue) ----

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if !a.tx.ready() {
            return;
        }
        let mut used_any = false;
        // Bounded by what the guest made available when we started.
        for _ in 0..usize::from(QUEUE_SIZE) * 4 {
            let Some(a) = self.active.as_mut() else {
                break;
            };
            let Some((head, walked)) = chain::pop(
                &mut a.tx,
                &a.mem,
                usize::from(QUEUE_SIZE),
                &mut self.log,
                "virtio-vsock tx",
            ) else {
                break;
            };
            let outcome = match walked {
                Ok(c) if c.writable.is_empty() => {
                    let mem = a.mem.clone();
                    self.tx_packet(&mem, &c.readable, c.readable_len())
                }
                Ok(_) => {
                    guest_warn!(
                        self.log,
                        head,
                        "virtio-vsock: TX chain has device-writable buffers; dropped"
                    );
                    TxOutcome::Malformed
                }
                // Logged by `chain::pop`.
                Err(_) => TxOutcome::Malformed,
            };
            match outcome {
                TxOutcome::Done => self.stats.tx_packets += 1,
                TxOutcome::Malformed => self.stats.malformed += 1,
            }
            let Some(a) = self.active.as_mut() else {
                break;
            };
            if !chain::put_used(&mut a.tx, &a.mem, head, 0, &mut self.log, "virtio-vsock tx") {
                break;
            }
            used_any = true;
        }
        if used_any && let Some(a) = self.active.as_mut() {
            chain::notify_used(&mut a.tx, &a.mem, &a.interrupt);
        }
        // Answers (RESPONSE, RST, credit) and data the new credit allows.
        self.process_rx();
    }

    fn tx_packet(&mut self, mem: &GuestMemory, bufs: &[Buf], total: u64) -> TxOutcome {
        let mut raw = [0u8; HDR_LEN];
        if total < HDR_LEN as u64 || chain::read_bytes(mem, bufs, &mut raw) != HDR_LEN {
            guest_warn!(
                self.log,
                total,
                "virtio-vsock: TX packet shorter than its header; dropped"
            );
            return TxOutcome::Malformed;
        }
        let h = Header::from_bytes(&raw);
        if h.len > MAX_PKT_PAYLOAD || u64::from(h.len) > total - HDR_LEN as u64 {
            guest_warn!(
                self.log,
                len = h.len,
                chain = total,
                "virtio-vsock: TX payload length past the chain or too long; dropped"
            );
            return TxOutcome::Malformed;
        }
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            guest_warn!(
                self.log,
                src = h.src_cid,
                dst = h.dst_cid,
                "virtio-vsock: TX packet with wrong CIDs; dropped"
            );
            return TxOutcome::Malformed;
        }
        if h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.queue_rst(h.reply_rst());
            }
            return TxOutcome::Malformed;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if !self.conns.contains_key(&key) {
            match h.op {
                op::REQUEST => self.guest_connect(key, &h),
                op::RST => {}
                _ => self.queue_rst(h.reply_rst()),
            }
            return TxOutcome::Done;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return TxOutcome::Done;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let outcome = match (c.state, h.op) {
            (_, op::RST) => {
                // Refused by the guest (host-initiated) or torn down.
                self.remove_conn(key);
                return TxOutcome::Done;
            }
            (State::LocalInit, op::RESPONSE) => {
                c.state = State::Established;
                let ok = format!("OK {}\n", key.local_port);
                // A fresh socket has room for a few bytes; if it has not,
                // the client is not reading and loses the connection.
                match c.stream.write(ok.as_bytes()) {
                    Ok(n) if n == ok.len() => TxOutcome::Done,
                    _ => {
                        self.reset_conn(key);
                        return TxOutcome::Done;
                    }
                }
            }
            (State::LocalInit, _) => {
                self.reset_conn(key);
                return TxOutcome::Malformed;
            }
            (_, op::RW) => {
                if c.peer_shutdown & SHUTDOWN_SEND != 0 {
                    // Data after the guest said it sends no more.
                    self.reset_conn(key);
                    return TxOutcome::Malformed;
                }
                let len = h.len as usize;
                if c.tx_buf.len() + len > CONN_BUF_SIZE as usize {
                    guest_warn!(
                        self.log,
                        "virtio-vsock: guest overran its credit; connection reset"
                    );
                    self.reset_conn(key);
                    return TxOutcome::Malformed;
                }
                self.bounce.resize(len, 0);
                let payload = chain::slice_bufs(bufs, HDR_LEN as u64, u64::from(h.len));
                if chain::read_bytes(mem, &payload, &mut self.bounce) != len {
                    self.reset_conn(key);
                    return TxOutcome::Malformed;
                }
                let Some(c) = self.conns.get_mut(&key) else {
                    return TxOutcome::Done;
                };
                c.tx_buf.extend(&self.bounce);
                if !self.flush_tx(key) {
                    return TxOutcome::Done;
                }
                TxOutcome::Done
            }
            (_, op::CREDIT_UPDATE) => TxOutcome::Done,
            (_, op::CREDIT_REQUEST) => {
                c.want_credit_update = true;
                TxOutcome::Done
            }
            (_, op::SHUTDOWN) => {
                c.peer_shutdown |= h.flags & SHUTDOWN_BOTH;
                if c.peer_shutdown & SHUTDOWN_SEND != 0 && !self.flush_tx(key) {
                    return TxOutcome::Done;
                }
                TxOutcome::Done
            }
            _ => {
                // REQUEST or RESPONSE on an open connection, or an op that
                // does not exist.
                guest_warn!(
                    self.log,
                    op = h.op,
                    "virtio-vsock: unexpected op on a connection; reset"
                );
                self.reset_conn(key);
                return TxOutcome::Malformed;
            }
        };
        self.sync_interest(key);
        self.enqueue(key);
        outcome
    }

    /// The guest's REQUEST to the host: connect to `UDS_<port>`.
    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.at_capacity() {
            tracing::warn!(
                max = self.max_connections,
                "virtio-vsock: too many connections; guest REQUEST refused"
            );
            self.stats.connections_refused += 1;
            self.queue_rst(h.reply_rst());
            return;
        }
        let path = self.guest_target_path(key.local_port);
        let stream = match unix::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "virtio-vsock: guest connection refused");
                self.stats.connections_refused += 1;
                self.queue_rst(h.reply_rst());
                return;
            }
        };
        let token = self.new_token();
        let mut c = Conn::new(stream, token, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.want_response = true;
        self.conns.insert(key, c);
        self.targets.insert(token, Target::Conn(key));
        self.stats.connections_opened += 1;
        self.sync_interest(key);
        self.enqueue(key);
    }

    // ---- host to guest (RX queue) ----

    /// The next control packet `key` owes the guest, clearing its flag.
    fn take_control(&mut self, key: ConnKey) -> Option<Header> {
        let c = self.conns.get(&key)?;
        let (op, flags) = if c.want_request {
            (op::REQUEST, 0)
        } else if c.want_response {
            (op::RESPONSE, 0)
        } else if c.want_shutdown != 0 {
            (op::SHUTDOWN, c.want_shutdown)
        } else if c.want_credit_update {
            (op::CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        let mut h = self.header(key, op, c);
        h.flags = flags;
        let c = self.conns.get_mut(&key)?;
        match op {
            op::REQUEST => c.want_request = false,
            op::RESPONSE => c.want_response = false,
            op::SHUTDOWN => c.want_shutdown = 0,
            _ => c.want_credit_update = false,
        }
        Some(h)
    }

    fn pop_rx(&mut self) -> Option<(u16, Result<chain::Chain, chain::ChainError>)> {
        let a = self.active.as_mut()?;
        chain::pop(
            &mut a.rx,
            &a.mem,
            usize::from(QUEUE_SIZE),
            &mut self.log,
            "virtio-vsock rx",
        )
    }

    /// Gives the chain just popped back to the ring (nothing to put in it).
    fn unpop_rx(&mut self) {
        if let Some(a) = self.active.as_mut() {
            a.rx.go_to_previous_position();
        }
    }

    /// Writes `h` and `payload` into `bufs` and returns the chain. `false`:
    /// the used ring cannot be written.
    fn deliver(&mut self, head: u16, bufs: &[Buf], h: &Header, payload_len: usize) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let raw = h.to_bytes();
        let mut n = chain::write_bytes(&a.mem, bufs, &raw);
        if payload_len > 0 {
            let rest = chain::slice_bufs(bufs, HDR_LEN as u64, payload_len as u64);
            n += chain::write_bytes(&a.mem, &rest, &self.bounce[..payload_len]);
        }
        self.stats.rx_packets += 1;
        if h.op == op::RST {
            self.stats.rst_sent += 1;
        }
        chain::put_used(
            &mut a.rx,
            &a.mem,
            head,
            n as u32,
            &mut self.log,
            "virtio-vsock rx",
        )
    }

    fn process_rx(&mut self) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if !a.rx.ready() {
            return;
        }
        let mut used_any = false;
        // Bounded: each pass uses a guest buffer, retires a work item, or
        // ends the loop.
        for _ in 0..(8 * usize::from(QUEUE_SIZE) + 2 * MAX_CONNECTIONS) {
            // What to send next: RSTs first, then connections in turn.
            let (key, control) = if let Some(h) = self.rst_queue.front().copied() {
                (None, Some(h))
            } else if let Some(key) = self.rx_work.pop_front() {
                let Some(c) = self.conns.get_mut(&key) else {
                    continue;
                };
                c.queued = false;
                if c.wants_control() {
                    (Some(key), self.take_control(key))
                } else if c.can_send_data() {
                    (Some(key), None)
                } else {
                    continue;
                }
            } else {
                break;
            };
            let Some((head, walked)) = self.pop_rx() else {
                // No buffer: put the work back, in order.
                if let Some(key) = key {
                    self.restore_control(key, control);
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.queued = true;
                        self.rx_work.push_front(key);
                    }
                }
                break;
            };
            let bufs = match walked {
                // A header and at least one byte: a header-only buffer could
                // not carry data and would sit at the head of the ring.
                Ok(c) if c.readable.is_empty() && c.writable_len() > HDR_LEN as u64 => c.writable,
                other => {
                    if other.is_ok() {
                        guest_warn!(
                            self.log,
                            head,
                            "virtio-vsock: RX chain is device-readable or shorter than a header; refused"
                        );
                    }
                    self.stats.malformed += 1;
                    if let Some(key) = key {
                        self.restore_control(key, control);
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.queued = true;
                            self.rx_work.push_front(key);
                        }
                    }
                    let ok = self.active.as_mut().is_some_and(|a| {
                        chain::put_used(
                            &mut a.rx,
                            &a.mem,
                            head,
                            0,
                            &mut self.log,
                            "virtio-vsock rx",
                        )
                    });
                    used_any = true;
                    if !ok {
                        break;
                    }
                    continue;
                }
            };
            let room = bufs.iter().map(|b| u64::from(b.len)).sum::<u64>() - HDR_LEN as u64;
            let delivered = match (key, control) {
                (None, Some(h)) => {
                    self.rst_queue.pop_front();
                    self.deliver(head, &bufs, &h, 0)
                }
                (Some(key), Some(h)) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.last_fwd_cnt_sent = h.fwd_cnt;
                    }
                    let ok = self.deliver(head, &bufs, &h, 0);
                    self.enqueue(key);
                    ok
                }
                (Some(key), None) => match self.read_data(key, room) {
                    Some(h) => {
                        let ok = self.deliver(head, &bufs, &h, h.len as usize);
                        self.enqueue(key);
                        ok
                    }
                    None => {
                        self.unpop_rx();
                        continue;
                    }
                },
                (None, None) => {
                    self.unpop_rx();
                    continue;
                }
            };
            used_any = true;
            if !delivered {
                break;
            }
        }
        if used_any && let Some(a) = self.active.as_mut() {
            chain::notify_used(&mut a.rx, &a.mem, &a.interrupt);
        }
    }

    /// Puts back a control packet taken but not sent.
    fn restore_control(&mut self, key: ConnKey, control: Option<Header>) {
        let (Some(h), Some(c)) = (control, self.conns.get_mut(&key)) else {
            return;
        };
        match h.op {
            op::REQUEST => c.want_request = true,
            op::RESPONSE => c.want_response = true,
            op::SHUTDOWN => c.want_shutdown |= h.flags,
            _ => c.want_credit_update = true,
        }
    }

    /// Reads up to `room` bytes (and the guest's credit) from `key`'s host
    /// socket into the bounce buffer; returns the RW header, or `None` when
    /// there was nothing to send (the connection's state is updated).
    fn read_data(&mut self, key: ConnKey, room: u64) -> Option<Header> {
        let c = self.conns.get_mut(&key)?;
        let want = u64::from(c.peer_credit().min(MAX_PKT_PAYLOAD)).min(room) as usize;
        if want == 0 {
            return None;
        }
        self.bounce.resize(want, 0);
        loop {
            match c.stream.read(&mut self.bounce[..want]) {
                Ok(0) => {
                    c.eof = true;
                    c.readable = false;
                    if c.hup {
                        c.want_shutdown = SHUTDOWN_BOTH;
                        c.state = State::Closing;
                    } else {
                        c.want_shutdown = SHUTDOWN_SEND;
                    }
                    break;
                }
                Ok(n) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    let mut h = self.header(key, op::RW, self.conns.get(&key)?);
                    h.len = n as u32;
                    return Some(h);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    break;
                }
                Err(_) => {
                    self.reset_conn(key);
                    return None;
                }
            }
        }
        self.sync_interest(key);
        self.enqueue(key);
        None
    }

    /// Drains the inner epoll set.
    fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        // Terminates: see the module comment; the bound is a safety net.
        for _ in 0..1024 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-vsock: epoll_wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == TOKEN_LISTENER {
                    self.accept_clients();
                    continue;
                }
                match self.targets.get(&token) {
                    Some(Target::Handshake) => self.on_handshake(token),
                    Some(Target::Conn(key)) => {
                        let key = *key;
                        self.on_conn_event(key, ev.event_set());
                    }
                    None => {}
                }
            }
            // Handling an event may add a socket that is ready already
            // (an accepted client): look again until the set is quiet.
            if n == 0 {
                break;
            }
        }
    }

    /// Closes every connection (driver reset or gone).
    fn drop_connections(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k);
        }
        self.rx_work.clear();
        self.rst_queue.clear();
    }
}

impl VirtioDevice for Vsock {
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx.state(), a.tx.state(), a.event.state()])
    }

    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (it.next(), it.next(), it.next()) else {
            return Err(Error::QueueCount { expected: 3, got });
        };
        self.drop_connections();
        self.active = Some(Active {
            mem,
            rx,
            tx,
            event,
            interrupt,
        });
        Ok(())
    }

    /// Restored from a snapshot: the connections the guest knew are gone
    /// (their sockets were the old process's), so the guest is told with
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue, when its
    /// driver left a buffer there; it then drops them and reads its CID
    /// again (virtio 1.2, 5.10.6.8).
    fn restored(&mut self) {
        const TRANSPORT_RESET: u32 = 0;
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some((head, walked)) = chain::pop(
            &mut a.event,
            &a.mem,
            usize::from(QUEUE_SIZE),
            &mut self.log,
            "virtio-vsock",
        ) else {
            return;
        };
        let len = match walked {
            Ok(c) => chain::write_bytes(&a.mem, &c.writable, &TRANSPORT_RESET.to_le_bytes()) as u32,
            Err(_) => 0,
        };
        if chain::put_used(
            &mut a.event,
            &a.mem,
            head,
            len,
            &mut self.log,
            "virtio-vsock",
        ) {
            chain::notify_used(&mut a.event, &a.mem, &a.interrupt);
        }
        self.stats.transport_resets += 1;
    }

    fn queue_notify(&mut self, queue: usize) {
        match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.drop_connections();
        self.active = None;
        self.bounce = Vec::new();
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn handle_event(&mut self, fd: RawFd) {
        if fd == self.epoll.as_raw_fd() {
            self.poll_host();
            self.process_rx();
        }
    }
}
