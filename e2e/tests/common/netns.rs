//! A network namespace a test makes and removes, shared by the e2e tests
//! and the agent's standalone examples test (which includes this file with
//! `#[path]`): tests never touch the host's own interfaces.

#![allow(dead_code)]

use std::fs::File;
use std::process::{Command, Stdio};

/// A network namespace the test makes (`ip netns add`), with loopback up.
/// On drop every process left in it (an agent's guests, dnsmasq) is killed
/// and the namespace deleted: nothing of it reaches the host's interfaces.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        let ok = Command::new("ip")
            .args(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "loopback up in {name}");
        Netns { name: name.into() }
    }

    /// Runs `ip ARGS` inside the namespace and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Forwards TCP `127.0.0.1:port` inside the namespace to the same
    /// address in this process's own namespace, for as long as the test
    /// process lives. The listening socket is made by a thread that joins
    /// the namespace (setns changes only the calling thread) and then ends;
    /// the socket stays in the namespace it was made in, while the threads
    /// that accept and connect onwards are in the test's own.
    pub fn forward_port(&self, port: u16) {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.name);
        let listener = std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            let ns = File::open(&path)?;
            // SAFETY: setns with a file descriptor of a network namespace
            // file that stays open for the call; it moves only this thread,
            // which ends right after binding.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::net::TcpListener::bind(("127.0.0.1", port))
        })
        .join()
        .expect("the setns thread")
        .unwrap_or_else(|e| panic!("listening on port {port} in {}: {e}", self.name));
        std::thread::spawn(move || {
            for inside in listener.incoming().flatten() {
                let Ok(outside) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (inside.try_clone(), outside.try_clone()),
                    (outside.try_clone(), inside.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
