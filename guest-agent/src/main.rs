//! vireo-guest-agent: serves the QEMU guest agent protocol inside a guest.
//! See docs/guest-agent.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vireo_guest_agent::{Agent, DEFAULT_VSOCK_PORT, VERSION, VIRTIO_PORT_NAME, transport};

enum Transport {
    Default,
    Device(PathBuf),
    Vsock(u32),
    Unix(PathBuf),
}

fn usage() -> String {
    format!(
        "vireo-guest-agent {VERSION}: the QEMU guest agent protocol, served inside a guest

usage: vireo-guest-agent [--device PATH | --vsock-port [N] | --unix PATH] [--idle-timeout S] [--verbose]

  --device PATH     a character device (virtio-serial port) to serve; a regular
                    file is read once as requests, replies go to stdout
  --vsock-port [N]  listen on AF_VSOCK, any CID, port N (default {DEFAULT_VSOCK_PORT})
  --unix PATH       listen on a Unix socket (for tests on a host)
  --idle-timeout S  close a Unix or vsock connection silent for S seconds
                    (default {idle}; 0: never), so a hung client cannot keep
                    the next one out
  --verbose         log connections, device events and request sizes
  --version, --help

Without a transport: the virtio-serial port named {VIRTIO_PORT_NAME}
(/dev node made if missing), else vsock port {DEFAULT_VSOCK_PORT}, waiting for either.",
        idle = transport::DEFAULT_IDLE_TIMEOUT.as_secs()
    )
}

fn parse(args: &[String]) -> Result<Option<Transport>, String> {
    let mut t = Transport::Default;
    let mut i = 0;
    let set = |new: Transport, t: &mut Transport| -> Result<(), String> {
        if !matches!(t, Transport::Default) {
            return Err("give one of --device, --vsock-port, --unix".into());
        }
        *t = new;
        Ok(())
    };
    while i < args.len() {
        let a = args[i].as_str();
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a, None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag {
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("vireo-guest-agent {VERSION}");
                return Ok(None);
            }
            "-v" | "--verbose" => transport::set_verbose(true),
            "--idle-timeout" => {
                let v = value("seconds")?;
                let secs: u64 = v.parse().map_err(|_| format!("bad --idle-timeout {v:?}"))?;
                transport::set_idle_timeout((secs > 0).then(|| Duration::from_secs(secs)));
            }
            "--device" => set(Transport::Device(value("a path")?.into()), &mut t)?,
            "--unix" => set(Transport::Unix(value("a path")?.into()), &mut t)?,
            "--vsock-port" => {
                let port = match inline.clone() {
                    Some(v) => Some(v),
                    None => match args.get(i + 1) {
                        Some(n) if !n.starts_with('-') => {
                            i += 1;
                            Some(n.clone())
                        }
                        _ => None,
                    },
                };
                let port = match port {
                    Some(p) => p.parse().map_err(|_| format!("bad vsock port {p:?}"))?,
                    None => DEFAULT_VSOCK_PORT,
                };
                set(Transport::Vsock(port), &mut t)?;
            }
            other => return Err(format!("unknown argument {other:?}\n\n{}", usage())),
        }
        i += 1;
    }
    Ok(Some(t))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let t = match parse(&args) {
        Ok(Some(t)) => t,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vireo-guest-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let mut agent = Agent::default();
    let r = match &t {
        Transport::Default => transport::serve_default(&mut agent),
        Transport::Device(p) => transport::serve_device(&mut agent, p),
        Transport::Vsock(port) => transport::serve_vsock(&mut agent, *port),
        Transport::Unix(p) => transport::serve_unix(&mut agent, p),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            transport::log(&e.to_string());
            ExitCode::FAILURE
        }
    }
}
