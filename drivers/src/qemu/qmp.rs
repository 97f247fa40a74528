//! A small synchronous client for QEMU's machine protocol (QMP): JSON
//! objects, one per line, over the per-VM unix socket.
//!
//! The driver connects for each operation and disconnects after it, so a
//! restarted agent (or the CLI beside it) reaches the same QEMU at any time.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("QMP: {0}")]
    Protocol(String),
    /// QEMU answered with an error (`{"error": {"class": ..., "desc": ...}}`).
    #[error("QEMU refused {command}: {desc} ({class})")]
    Qemu {
        command: String,
        class: String,
        desc: String,
    },
}

/// An open QMP session, past the capabilities negotiation.
pub struct Qmp {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events read while waiting for answers.
    pub events: Vec<Value>,
}

/// Events a connection may see before QEMU's greeting (left over from the
/// previous client); more than this and the peer is not speaking QMP.
const MAX_EVENTS_BEFORE_GREETING: usize = 64;

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities-negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let shown = path.display().to_string();
        let io_err = |source| QmpError::Io {
            path: shown.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io_err)?;
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let mut qmp = Self {
            path: shown.clone(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        // An event QEMU queued while no client was connected (a block
        // job's end, say) can come before the greeting: skipped, a few.
        let mut greeting = qmp.read_message()?;
        for _ in 0..MAX_EVENTS_BEFORE_GREETING {
            if greeting.get("event").is_none() {
                break;
            }
            greeting = qmp.read_message()?;
        }
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "{shown}: expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed the socket"),
            });
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("{}: not JSON ({e}): {line}", self.path)))
    }

    /// Runs a command and returns its `return` value. Events that arrive
    /// before the answer are kept in [`Qmp::events`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message);
                continue;
            }
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = message.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string()
                };
                return Err(QmpError::Qemu {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "{}: unexpected answer to {command}: {message}",
                self.path
            )));
        }
    }
}

#[cfg(test)]
mod greeting_tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    /// A QMP peer on a socket of its own: writes `first` lines, then the
    /// greeting, then answers each command with an empty return.
    fn peer(first: Vec<String>) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
        let dir =
            std::env::temp_dir().join(format!("vireo-qmp-{}-{}", std::process::id(), first.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut out = stream.try_clone().expect("clone");
            for line in first {
                let _ = writeln!(out, "{line}");
            }
            let _ = writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#);
            for line in std::io::BufReader::new(stream).lines() {
                if line.is_err() {
                    break;
                }
                let _ = writeln!(out, r#"{{"return": {{}}}}"#);
            }
        });
        (path, handle)
    }

    #[test]
    fn events_left_before_the_greeting_are_skipped() {
        let event =
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"id": "migrate-vda", "status": "null"}}"#;
        let (path, peer) = peer(vec![event.to_string(); 2]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).expect("connects");
        assert!(q.execute("query-status", None).is_ok());
        drop(q);
        peer.join().expect("peer");
    }

    #[test]
    fn a_peer_that_never_greets_is_refused() {
        let event = r#"{"event": "X"}"#;
        let (path, peer) = peer(vec![event.to_string(); MAX_EVENTS_BEFORE_GREETING + 2]);
        let e = Qmp::connect(&path, Duration::from_secs(5))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("expected the QMP greeting"), "{e}");
        peer.join().expect("peer");
    }
}
