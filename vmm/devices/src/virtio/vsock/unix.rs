//! The host side's Unix-socket pieces: the `CONNECT <port>` handshake line
//! and a connect(2) that never blocks.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Longest handshake line accepted, newline included.
pub const MAX_LINE: usize = 32;

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r`
/// is tolerated).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"CONNECT ")?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// Connects a new non-blocking, close-on-exec stream socket to `path`.
/// A listener whose backlog is full answers `EAGAIN` instead of making us
/// wait (the caller treats that as refused).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero `sockaddr_un` is a valid value of that plain-data
    // struct.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path empty, too long or with a NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it;
    // the OwnedFd closes it on every path below.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid, initialised `sockaddr_un` that lives
        // across the call, and `len` (family + path + NUL) is within its size.
        let r = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(UnixStream::from(owned));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"connect 52",
            b"CONNECT 5 2",
            b"CONNECT 99999999999",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn connecting_to_nothing_fails_without_blocking() {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-unix-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("none");
        assert!(connect_nonblocking(&p).is_err());
        let l = std::os::unix::net::UnixListener::bind(&p).expect("bind");
        let s = connect_nonblocking(&p).expect("connect");
        drop((s, l));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(connect_nonblocking(Path::new("")).is_err());
    }
}
