//! Drives `cli/src/cluster/subresources.rs` against a cluster as the user
//! of $KUBECONFIG, for e2e/tests/subresources.rs:
//!
//! ```text
//! subresources-client console NS/NAME SECONDS   # stdin to the guest, its output to stdout
//! subresources-client upload NS/NAME FILE       # progress on stderr
//! subresources-client download NS/NAME FILE
//! ```
//!
//! Errors go to stderr with exit status 1, as `vireo` does.

#[path = "../src/cluster/subresources.rs"]
mod subresources;

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cmd, object, arg] = args.as_slice() else {
        bail!("usage: subresources-client console|upload|download NS/NAME ARG");
    };
    let (ns, name) = object.split_once('/').context("NS/NAME")?;
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(kube::Client::try_default())?;
    let progress = |done: u64, total: Option<u64>| {
        eprintln!(
            "progress {done} {}",
            total.map_or("?".into(), |t| t.to_string())
        );
    };
    match cmd.as_str() {
        "console" => {
            let secs: u64 = arg.parse()?;
            let mut s = subresources::open_console(&client, &rt, ns, name)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut input = Vec::new();
            std::io::stdin().read_to_end(&mut input)?;
            s.write_all(&input)?;
            let end = Instant::now() + Duration::from_secs(secs);
            let mut buf = [0u8; 4096];
            let mut out = std::io::stdout();
            while Instant::now() < end {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        out.write_all(&buf[..n])?;
                        out.flush()?;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        "upload" => {
            let mut f = std::fs::File::open(arg)?;
            // A pipe's length is not known up front.
            let meta = f.metadata()?;
            let len = meta.is_file().then_some(meta.len());
            let n = subresources::upload(&client, &rt, ns, name, &mut f, len, &progress)?;
            eprintln!("uploaded {n} bytes");
        }
        "download" => {
            let mut f = std::fs::File::create(arg)?;
            let n = subresources::download(&client, &rt, ns, name, &mut f, &progress)?;
            eprintln!("downloaded {n} bytes");
        }
        other => bail!("unknown command {other}"),
    }
    Ok(())
}
