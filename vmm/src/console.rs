//! The serial console's output fan-out: every byte the guest writes to COM1
//! goes to the console log file and to each client attached to the console
//! socket. A client that cannot keep up loses bytes rather than stalling the
//! vCPU; a client that has gone away is dropped.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// The clients attached to the console socket (write side).
#[derive(Clone, Default)]
pub struct ConsoleClients(Arc<Mutex<Vec<UnixStream>>>);

impl ConsoleClients {
    pub fn add(&self, stream: UnixStream) {
        crate::bus::lock(&self.0).push(stream);
    }

    pub fn remove(&self, fd: RawFd) {
        crate::bus::lock(&self.0).retain(|s| s.as_raw_fd() != fd);
    }

    pub fn len(&self) -> usize {
        crate::bus::lock(&self.0).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn broadcast(&self, buf: &[u8]) {
        let mut clients = crate::bus::lock(&self.0);
        clients.retain_mut(|c| {
            match c.write(buf) {
                Ok(_) => true,
                // Slow reader: drop this chunk for it, keep the client.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
                Err(_) => false,
            }
        });
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
        if let Err(e) = self.log.write_all(buf) {
            tracing::debug!(error = %e, "console log write failed");
        }
        self.clients.broadcast(buf);
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
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("log");
        let log = File::create(&log_path).unwrap();
        let clients = ConsoleClients::default();
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, b_peer) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        clients.add(a);
        clients.add(b);
        drop(b_peer);
        let mut out = ConsoleOut::new(log, clients.clone());
        out.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        a_peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(clients.len(), 1, "the client whose peer closed is gone");
        assert_eq!(std::fs::read(&log_path).unwrap(), b"hello");
        std::fs::remove_dir_all(&dir).ok();
    }
}
