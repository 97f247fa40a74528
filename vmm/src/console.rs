//! The serial console's output fan-out: every byte the guest writes to COM1
//! goes to the console log file and to each client attached to the console
//! socket. A client that cannot keep up loses bytes rather than stalling the
//! vCPU; a client that has gone away is dropped.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Output waiting to go to clients, and the clients.
struct Inner {
    clients: Vec<UnixStream>,
    pending: Vec<u8>,
}

/// The clients attached to the console socket (write side). Output to them
/// is batched: the serial port hands over one byte per guest `out`, and one
/// socket write per byte would be slow and would fill a client's socket
/// buffer (whose accounting is per write, not per byte) after a few hundred
/// bytes. The writer queues bytes and wakes the event loop, which sends
/// them out a moment later ([`ConsoleClients::flush`]); a large backlog is
/// sent at once.
#[derive(Clone)]
pub struct ConsoleClients {
    inner: Arc<Mutex<Inner>>,
    wake: Arc<EventFd>,
}

/// Bytes queued before the writer sends them itself.
const FLUSH_AT: usize = 4096;

impl ConsoleClients {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                clients: Vec::new(),
                pending: Vec::new(),
            })),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Readable when output is queued.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    pub fn add(&self, stream: UnixStream) {
        crate::bus::lock(&self.inner).clients.push(stream);
    }

    pub fn remove(&self, fd: RawFd) {
        crate::bus::lock(&self.inner)
            .clients
            .retain(|s| s.as_raw_fd() != fd);
    }

    pub fn len(&self) -> usize {
        crate::bus::lock(&self.inner).clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn queue(&self, buf: &[u8]) {
        let mut inner = crate::bus::lock(&self.inner);
        if inner.clients.is_empty() {
            return;
        }
        let was_empty = inner.pending.is_empty();
        inner.pending.extend_from_slice(buf);
        if inner.pending.len() >= FLUSH_AT {
            Self::send(&mut inner);
        } else if was_empty {
            let _ = self.wake.write(1);
        }
    }

    /// Clears the wake-up (the caller will flush later).
    pub fn ack_wake(&self) {
        let _ = self.wake.read();
    }

    /// Sends queued output to every client.
    pub fn flush(&self) {
        let _ = self.wake.read();
        Self::send(&mut crate::bus::lock(&self.inner));
    }

    fn send(inner: &mut Inner) {
        let Inner { clients, pending } = inner;
        if pending.is_empty() {
            return;
        }
        clients.retain_mut(|c| {
            match c.write_all(pending) {
                Ok(()) => true,
                // Slow reader: it loses (part of) this chunk, stays attached.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                Err(_) => false,
            }
        });
        pending.clear();
    }
}

/// What the serial device writes into.
pub struct ConsoleOut {
    log: File,
    clients: ConsoleClients,
}

impl ConsoleOut {
    pub fn new(log: File, clients: ConsoleClients) -> Self {
        Self { log, clients }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The log gets every byte at once: it is what survives a crash.
        if let Err(e) = self.log.write_all(buf) {
            tracing::debug!(error = %e, "console log write failed");
        }
        self.clients.queue(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn fans_out_to_log_and_clients_and_drops_dead_ones() {
        let dir = std::env::temp_dir().join(format!("vireo-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let log_path = dir.join("log");
        let log = File::create(&log_path).expect("the console log");
        let clients = ConsoleClients::new().expect("the client set and its eventfd");
        let (a, mut a_peer) = UnixStream::pair().expect("a socket pair");
        let (b, b_peer) = UnixStream::pair().expect("a socket pair");
        a.set_nonblocking(true).expect("non-blocking");
        b.set_nonblocking(true).expect("non-blocking");
        clients.add(a);
        clients.add(b);
        drop(b_peer);
        let mut out = ConsoleOut::new(log, clients.clone());
        out.write_all(b"hel").expect("console write");
        out.write_all(b"lo").expect("console write");
        clients.flush();
        let mut buf = [0u8; 5];
        a_peer
            .read_exact(&mut buf)
            .expect("the client got the bytes");
        assert_eq!(&buf, b"hello");
        assert_eq!(clients.len(), 1, "the client whose peer closed is gone");
        assert_eq!(std::fs::read(&log_path).expect("the console log"), b"hello");
        std::fs::remove_dir_all(&dir).ok();
    }
}
