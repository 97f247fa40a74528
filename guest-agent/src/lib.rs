//! Vireo's guest agent: the QEMU guest agent (qemu-ga) protocol, served
//! from inside a guest. See docs/guest-agent.md.
//!
//! [`Agent::feed`] takes bytes as they arrive from the host and returns the
//! bytes to send back, plus an [`Action`] to carry out after they are sent
//! (a shutdown). Nothing in it panics on input; the transports live in
//! [`transport`].

pub mod framer;
pub mod freeze;
pub mod sys;
pub mod transport;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use serde_json::{Map, Value, json};

use framer::{Frame, Framer};
use freeze::{Freezer, IoctlFreezer};

/// Version reported by `guest-info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The virtio-serial port name the host's QEMU gives the agent channel.
pub const VIRTIO_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Default AF_VSOCK port for `--vsock-port` (the host client's default).
pub const DEFAULT_VSOCK_PORT: u32 = 4100;

/// How `guest-shutdown` stops the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    Powerdown,
    Reboot,
    Halt,
}

/// Something to do once the replies are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Shutdown(ShutdownMode),
}

/// What one [`Agent::feed`] produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Replies, each a JSON object and a newline (`guest-sync-delimited`'s
    /// preceded by 0xFF).
    pub bytes: Vec<u8>,
    /// Set by `guest-shutdown`; input after it in the same feed is dropped.
    pub action: Option<Action>,
}

/// Files the agent reads; tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct Paths {
    pub mounts: PathBuf,
    pub os_release: Vec<PathBuf>,
    pub utmp: Vec<PathBuf>,
    pub net_dev: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            mounts: "/proc/self/mounts".into(),
            os_release: vec!["/etc/os-release".into(), "/usr/lib/os-release".into()],
            utmp: vec!["/run/utmp".into(), "/var/run/utmp".into()],
            net_dev: "/proc/net/dev".into(),
        }
    }
}

/// An error reply's class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError {
    pub class: &'static str,
    pub desc: String,
}

impl CmdError {
    fn generic(desc: impl Into<String>) -> Self {
        CmdError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

enum Reply {
    Value(Value),
    /// Written after a 0xFF byte.
    Delimited(Value),
    /// No reply at all, then the action.
    Silent(Action),
}

type Args = Map<String, Value>;
type Handler = fn(&mut Agent, &Args) -> Result<Reply, CmdError>;

struct Command {
    name: &'static str,
    success_response: bool,
    /// Allowed while the file systems are frozen (cannot block on them).
    while_frozen: bool,
    run: Handler,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "guest-sync-delimited",
        success_response: true,
        while_frozen: true,
        run: cmd_sync_delimited,
    },
    Command {
        name: "guest-sync",
        success_response: true,
        while_frozen: true,
        run: cmd_sync,
    },
    Command {
        name: "guest-ping",
        success_response: true,
        while_frozen: true,
        run: cmd_ping,
    },
    Command {
        name: "guest-info",
        success_response: true,
        while_frozen: true,
        run: cmd_info,
    },
    Command {
        name: "guest-get-host-name",
        success_response: true,
        while_frozen: true,
        run: cmd_host_name,
    },
    Command {
        name: "guest-get-osinfo",
        success_response: true,
        while_frozen: true,
        run: cmd_osinfo,
    },
    Command {
        name: "guest-network-get-interfaces",
        success_response: true,
        while_frozen: true,
        run: cmd_interfaces,
    },
    Command {
        name: "guest-get-users",
        success_response: true,
        while_frozen: true,
        run: cmd_users,
    },
    Command {
        name: "guest-get-fsinfo",
        success_response: true,
        while_frozen: true,
        run: cmd_fsinfo,
    },
    Command {
        name: "guest-fsfreeze-status",
        success_response: true,
        while_frozen: true,
        run: cmd_freeze_status,
    },
    Command {
        name: "guest-fsfreeze-freeze",
        success_response: true,
        while_frozen: false,
        run: cmd_freeze,
    },
    Command {
        name: "guest-fsfreeze-freeze-list",
        success_response: true,
        while_frozen: false,
        run: cmd_freeze_list,
    },
    Command {
        name: "guest-fsfreeze-thaw",
        success_response: true,
        while_frozen: true,
        run: cmd_thaw,
    },
    Command {
        name: "guest-shutdown",
        success_response: false,
        while_frozen: false,
        run: cmd_shutdown,
    },
];

/// The protocol state of one agent: the framer and the freeze state.
pub struct Agent {
    framer: Framer,
    frozen: bool,
    freezer: Box<dyn Freezer>,
    paths: Paths,
}

impl Default for Agent {
    fn default() -> Self {
        Self::new(Box::new(IoctlFreezer), Paths::default())
    }
}

impl Agent {
    pub fn new(freezer: Box<dyn Freezer>, paths: Paths) -> Self {
        Agent {
            framer: Framer::new(),
            frozen: false,
            freezer,
            paths,
        }
    }

    /// A new connection: any half-read request is forgotten (the freeze
    /// state stays, as it does in the guest's kernel).
    pub fn reset_connection(&mut self) {
        self.framer.reset();
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Consumes input bytes; returns the replies to write.
    pub fn feed(&mut self, input: &[u8]) -> Outcome {
        let mut frames = Vec::new();
        self.framer.push(input, &mut frames);
        let mut out = Outcome::default();
        for frame in frames {
            match frame {
                Frame::Error(e) => write_reply(
                    &mut out.bytes,
                    error_reply(&CmdError::generic(e.describe()), None),
                ),
                Frame::Object(bytes) => match self.handle(&bytes) {
                    Reply::Value(v) => write_reply(&mut out.bytes, v),
                    Reply::Delimited(v) => {
                        out.bytes.push(0xFF);
                        write_reply(&mut out.bytes, v);
                    }
                    Reply::Silent(a) => {
                        out.action = Some(a);
                        self.framer.reset();
                        break;
                    }
                },
            }
        }
        out
    }

    /// One framed request → its reply (already wrapped in return/error).
    fn handle(&mut self, bytes: &[u8]) -> Reply {
        let req: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                let err = CmdError::generic(format!("JSON parse error: {e}"));
                return Reply::Value(error_reply(&err, None));
            }
        };
        let Value::Object(mut req) = req else {
            let err = CmdError::generic("JSON parse error: expected a JSON object");
            return Reply::Value(error_reply(&err, None));
        };
        let id = req.remove("id");
        let result = self.dispatch(&req);
        match result {
            Ok(Reply::Value(v)) => Reply::Value(ok_reply(v, id)),
            Ok(Reply::Delimited(v)) => Reply::Delimited(ok_reply(v, id)),
            Ok(Reply::Silent(a)) => Reply::Silent(a),
            Err(e) => Reply::Value(error_reply(&e, id)),
        }
    }

    fn dispatch(&mut self, req: &Args) -> Result<Reply, CmdError> {
        let name = match req.get("execute") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(CmdError::generic("'execute' must be a string")),
            None => return Err(CmdError::generic("the request has no 'execute' member")),
        };
        let empty = Map::new();
        let args = match req.get("arguments") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => return Err(CmdError::generic("'arguments' must be an object")),
        };
        let Some(cmd) = COMMANDS.iter().find(|c| c.name == name) else {
            return Err(CmdError {
                class: "CommandNotFound",
                desc: format!("the command {name} has not been found"),
            });
        };
        if self.frozen && !cmd.while_frozen {
            return Err(CmdError::generic(format!(
                "the command {name} is disabled while the file systems are frozen"
            )));
        }
        // Commands do not panic by design; should one, the agent answers
        // with an error instead of dying.
        match catch_unwind(AssertUnwindSafe(|| (cmd.run)(self, args))) {
            Ok(r) => r,
            Err(_) => Err(CmdError::generic(format!("internal error in {name}"))),
        }
    }

    fn read_first(paths: &[PathBuf]) -> Option<Vec<u8>> {
        paths.iter().find_map(|p| std::fs::read(p).ok())
    }
}

fn ok_reply(v: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), v);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn error_reply(e: &CmdError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn write_reply(out: &mut Vec<u8>, v: Value) {
    // Serializing a Value into a Vec cannot fail (string keys only).
    if serde_json::to_writer(&mut *out, &v).is_err() {
        out.extend_from_slice(
            b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"serialization\"}}",
        );
    }
    out.push(b'\n');
}

fn sync_id(args: &Args) -> Result<Value, CmdError> {
    match args.get("id") {
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Value::Number(n.clone())),
        Some(_) => Err(CmdError::generic("parameter 'id' must be an integer")),
        None => Err(CmdError::generic("parameter 'id' is missing")),
    }
}

fn cmd_sync(_: &mut Agent, args: &Args) -> Result<Reply, CmdError> {
    sync_id(args).map(Reply::Value)
}

fn cmd_sync_delimited(_: &mut Agent, args: &Args) -> Result<Reply, CmdError> {
    // The host sent 0xFF before this request, which reset the framer; the
    // 0xFF before the reply lets the host skip stale replies likewise.
    sync_id(args).map(Reply::Delimited)
}

fn cmd_ping(_: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    Ok(Reply::Value(json!({})))
}

fn cmd_info(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let cmds: Vec<Value> = COMMANDS
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "enabled": !a.frozen || c.while_frozen,
                "success-response": c.success_response,
            })
        })
        .collect();
    Ok(Reply::Value(
        json!({"version": VERSION, "supported_commands": cmds}),
    ))
}

fn cmd_host_name(_: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let u = sys::uname().map_err(|e| CmdError::generic(format!("uname: {e}")))?;
    Ok(Reply::Value(json!({"host-name": u.nodename})))
}

fn cmd_osinfo(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let text =
        Agent::read_first(&a.paths.os_release).map(|b| String::from_utf8_lossy(&b).into_owned());
    let u = sys::uname().ok();
    Ok(Reply::Value(sys::osinfo(text.as_deref(), u.as_ref())))
}

fn cmd_interfaces(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let net_dev = std::fs::read_to_string(&a.paths.net_dev).ok();
    sys::interfaces(net_dev.as_deref())
        .map(Reply::Value)
        .map_err(|e| CmdError::generic(format!("getifaddrs: {e}")))
}

fn cmd_users(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let data = Agent::read_first(&a.paths.utmp).unwrap_or_default();
    Ok(Reply::Value(sys::users(&data)))
}

fn read_mounts(a: &Agent) -> Result<String, CmdError> {
    std::fs::read_to_string(&a.paths.mounts)
        .map_err(|e| CmdError::generic(format!("{}: {e}", a.paths.mounts.display())))
}

fn cmd_fsinfo(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let text = read_mounts(a)?;
    Ok(Reply::Value(sys::fsinfo(&text)))
}

fn cmd_freeze_status(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    Ok(Reply::Value(json!(if a.frozen {
        "frozen"
    } else {
        "thawed"
    })))
}

fn freezable_points(a: &Agent) -> Result<Vec<String>, CmdError> {
    Ok(freeze::freezable(&sys::parse_mounts(&read_mounts(a)?)))
}

fn cmd_freeze(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let points = freezable_points(a)?;
    freeze_points(a, &points)
}

fn freeze_points(a: &mut Agent, points: &[String]) -> Result<Reply, CmdError> {
    // Data still in the page cache goes to disk first (FIFREEZE syncs
    // each file system too, this makes it one pass).
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let n = freeze::freeze_all(a.freezer.as_mut(), points)
        .map_err(|e| CmdError::generic(e.to_string()))?;
    a.frozen = true;
    Ok(Reply::Value(json!(n)))
}

/// `guest-fsfreeze-freeze-list`: only the freezable file systems mounted
/// on one of `mountpoints` (absent: all, as `guest-fsfreeze-freeze`);
/// paths that are no such mount point are passed over, as qemu-ga does.
fn cmd_freeze_list(a: &mut Agent, args: &Args) -> Result<Reply, CmdError> {
    let wanted: Option<Vec<&str>> = match args.get("mountpoints") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(
            list.iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        CmdError::generic("parameter 'mountpoints' must be a list of strings")
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => {
            return Err(CmdError::generic(
                "parameter 'mountpoints' must be a list of strings",
            ));
        }
    };
    let mut points = freezable_points(a)?;
    if let Some(wanted) = wanted {
        points.retain(|p| wanted.contains(&p.as_str()));
    }
    freeze_points(a, &points)
}

fn cmd_thaw(a: &mut Agent, _: &Args) -> Result<Reply, CmdError> {
    let points = freezable_points(a)?;
    let n = freeze::thaw_all(a.freezer.as_mut(), &points);
    a.frozen = false;
    Ok(Reply::Value(json!(n)))
}

fn cmd_shutdown(_: &mut Agent, args: &Args) -> Result<Reply, CmdError> {
    let mode = match args.get("mode") {
        None | Some(Value::Null) => ShutdownMode::Powerdown,
        Some(Value::String(s)) => match s.as_str() {
            "powerdown" => ShutdownMode::Powerdown,
            "reboot" => ShutdownMode::Reboot,
            "halt" => ShutdownMode::Halt,
            other => {
                return Err(CmdError::generic(format!(
                    "invalid mode '{other}' (powerdown, reboot or halt)"
                )));
            }
        },
        Some(_) => return Err(CmdError::generic("parameter 'mode' must be a string")),
    };
    Ok(Reply::Silent(Action::Shutdown(mode)))
}

#[cfg(test)]
mod tests;
