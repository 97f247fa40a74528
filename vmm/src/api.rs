//! The control API: one JSON object per line each way on a unix socket
//! (docs/vmm.md lists the requests). This module parses requests and shapes
//! answers; the event loop ([`crate::vmm`]) carries them out.

use serde::Deserialize;
use serde_json::{Value, json};

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Info,
    Pause,
    Resume,
    Shutdown {
        timeout_seconds: Option<u64>,
    },
    Reset,
    Destroy,
    /// Sets the guest's memory to `bytes` through the balloon.
    Balloon {
        bytes: u64,
    },
    /// Sets the number of enabled vCPUs (CPU hot-unplug / plug).
    Vcpus {
        count: u32,
    },
    /// Each disk's I/O counters, in `--disk` order ([`block_stats`]).
    BlockStats,
    /// Pauses the machine and sends its snapshot on this connection: an
    /// answer line with `bytes`, then that many bytes of the snapshot file
    /// (crate::snapshot); then resumes, stays paused or exits, per `after`.
    Snapshot {
        #[serde(default)]
        after: SnapshotAfter,
    },
    /// A VMM started with `--incoming`: listen on `listen` (IP:PORT, port
    /// 0 for any) for the migration stream (crate::migration); the answer
    /// has the `port`. A running machine refuses it.
    MigrateIncoming {
        listen: String,
        /// Indexes among `--disk` whose data follows the snapshot.
        #[serde(default)]
        disks: Vec<usize>,
    },
    /// Debug builds only: the event loop opens a host file, a system call
    /// the seccomp filter forbids, so that tests see the filter kill the
    /// VMM. Release builds do not know this request.
    #[cfg(debug_assertions)]
    DebugForbiddenSyscall,
}

/// What the VMM does once a snapshot is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotAfter {
    /// Run on as before (a running guest resumes; a paused one stays so).
    Resume,
    /// Stay paused.
    #[default]
    Pause,
    /// Exit (reason `destroyed`, detail saying a snapshot was taken).
    Exit,
}

/// The machine state `info` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    ShuttingDown,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShuttingDown => "shutting-down",
        }
    }
}

/// What `info` answers.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    pub state: RunState,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub cpu_time_ns: u64,
    pub boot_time_us: Option<u64>,
    pub pid: u32,
}

/// Parses one line.
pub fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

pub fn ok() -> Value {
    json!({"ok": true})
}

pub fn error(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

pub fn info(i: &Info) -> Value {
    json!({
        "ok": true,
        "state": i.state.as_str(),
        "memory_bytes": i.memory_bytes,
        "vcpus": i.vcpus,
        "cpu_time_ns": i.cpu_time_ns,
        "boot_time_us": i.boot_time_us,
        "pid": i.pid,
    })
}

/// What `block-stats` answers: one object per `--disk`, in order, with
/// its index and the counters under virsh's `domblkstat` names (times in
/// nanoseconds).
pub fn block_stats(disks: &[vireo_vmm_devices::virtio::block::BlockCounters]) -> Value {
    let disks: Vec<Value> = disks
        .iter()
        .enumerate()
        .map(|(index, c)| {
            json!({
                "index": index,
                "rd_req": c.rd_req,
                "rd_bytes": c.rd_bytes,
                "wr_req": c.wr_req,
                "wr_bytes": c.wr_bytes,
                "flush_operations": c.flush_req,
                "rd_total_times": c.rd_total_ns,
                "wr_total_times": c.wr_total_ns,
                "flush_total_times": c.flush_total_ns,
                "errs": c.errs,
            })
        })
        .collect();
    json!({"ok": true, "disks": disks})
}

/// The answer line before a snapshot's bytes.
pub fn snapshot_answer(bytes: u64, memory_stored: u64) -> Value {
    json!({"ok": true, "bytes": bytes, "memory_stored": memory_stored})
}

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_requests() {
        assert_eq!(parse(r#"{"command": "info"}"#), Ok(Request::Info));
        assert_eq!(
            parse(r#"{"command": "block-stats"}"#),
            Ok(Request::BlockStats)
        );
        assert_eq!(parse(r#"{"command":"pause"}"#), Ok(Request::Pause));
        assert_eq!(parse(r#"{"command":"resume"}"#), Ok(Request::Resume));
        assert_eq!(
            parse(r#"{"command":"shutdown","timeout_seconds":7}"#),
            Ok(Request::Shutdown {
                timeout_seconds: Some(7)
            })
        );
        assert_eq!(parse(r#"{"command":"reset"}"#), Ok(Request::Reset));
        assert_eq!(parse(r#"{"command":"destroy"}"#), Ok(Request::Destroy));
        assert_eq!(
            parse(r#"{"command":"balloon","bytes":4096}"#),
            Ok(Request::Balloon { bytes: 4096 })
        );
        assert!(parse(r#"{"command":"balloon"}"#).is_err());
        assert_eq!(
            parse(r#"{"command":"vcpus","count":1}"#),
            Ok(Request::Vcpus { count: 1 })
        );
        assert_eq!(
            parse(r#"{"command":"snapshot","after":"exit"}"#),
            Ok(Request::Snapshot {
                after: SnapshotAfter::Exit
            })
        );
        assert_eq!(
            parse(r#"{"command":"snapshot"}"#),
            Ok(Request::Snapshot {
                after: SnapshotAfter::Pause
            })
        );
        assert!(parse(r#"{"command":"snapshot","after":"later"}"#).is_err());
        assert_eq!(
            parse(r#"{"command":"migrate-incoming","listen":"10.0.0.2:0"}"#),
            Ok(Request::MigrateIncoming {
                listen: "10.0.0.2:0".into(),
                disks: Vec::new(),
            })
        );
        for bad in ["", "{}", "[]", r#"{"command":"explode"}"#, "nonsense"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // Extra fields are tolerated (clients may send more than we read).
        assert_eq!(parse(r#"{"command":"info","x":1}"#), Ok(Request::Info));
        let e = error("nope");
        assert_eq!(e["ok"], false);
        assert_eq!(e["error"], "nope");
    }
}
