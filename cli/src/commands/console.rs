//! `vireo console NAME`: the guest's serial console, like `virsh console`.
//!
//! Connects to the console socket the driver gives, copies the terminal to
//! the guest and the guest to the terminal. On a terminal, input is raw
//! (keys reach the guest as typed) and Ctrl+] leaves; otherwise stdin is
//! copied until it ends, then output is read until the guest is quiet.

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vireo_drivers::{Connection, Lookup};

use super::ConsoleArgs;
use crate::output::Output;

/// Ctrl+], virsh's escape.
const ESCAPE: u8 = 0x1d;

pub fn run(conn: &Connection, args: &ConsoleArgs) -> Result<Output> {
    let d = conn
        .hypervisor()
        .lookup_domain(Lookup::domain(&args.domain))?;
    let sock = conn.hypervisor().open_console(&d.name)?;
    if let Some(secs) = args.watch {
        watch(sock, Duration::from_secs(secs))?;
        return Ok(Output::Empty);
    }
    let interactive = io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Connected to domain '{}'\r\nEscape character is ^] (Ctrl + ])\r",
            d.name
        );
    }
    let raw = interactive.then(RawMode::enter).transpose()?;
    let mut from_guest = sock.try_clone().context("console socket")?;
    let printer = std::thread::spawn(move || {
        // The caller may hold the stdout lock for the whole command; write
        // to the descriptor itself.
        // SAFETY: fd 1 is open for the life of the process, and
        // ManuallyDrop keeps this File from closing it.
        let mut out = std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(1)
        });
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut to_guest = sock;
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf).context("reading the terminal")?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if interactive && let Some(pos) = chunk.iter().position(|b| *b == ESCAPE) {
            to_guest.write_all(&chunk[..pos])?;
            break;
        }
        to_guest
            .write_all(chunk)
            .context("writing to the console")?;
    }
    drop(raw);
    if interactive {
        let _ = to_guest.shutdown(std::net::Shutdown::Both);
        eprintln!();
    } else {
        // Piped input ended: let the guest answer, then stop reading.
        // (No half-close: QEMU drops a client whose input ends.)
        std::thread::sleep(Duration::from_secs(2));
        let _ = to_guest.shutdown(std::net::Shutdown::Both);
    }
    let _ = printer.join();
    Ok(Output::Empty)
}

/// Copies the console to stdout for `limit`.
fn watch(mut sock: UnixStream, limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut out = io::stdout();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        sock.set_read_timeout(Some(
            (limit - start.elapsed()).max(Duration::from_millis(10)),
        ))?;
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e).context("reading the console"),
        }
    }
    Ok(())
}

/// The terminal in raw mode until dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Result<Self> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is stdin, open for the life of the process.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error()).context("reading terminal settings");
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: as above; raw is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error()).context("setting the terminal to raw mode");
        }
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in enter() on the same fd.
        unsafe {
            libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved);
        }
    }
}
