//! Typed errors. Each one names the object it is about, the way virsh users
//! read them: `domain 'web' not found`, `domain 'web' is not paused`.

use std::fmt;

use vireo_crds::ObjectKind;

/// The object an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub kind: ObjectKind,
    pub name: String,
}

impl ObjectName {
    pub fn new(kind: ObjectKind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}'", self.kind, self.name)
    }
}

/// Errors of every driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No object with that name, UUID or ID (libvirt's `VIR_ERR_NO_DOMAIN`, ...).
    #[error("{0} not found")]
    NotFound(ObjectName),
    /// The object exists but its state forbids the operation
    /// (libvirt's `VIR_ERR_OPERATION_INVALID`).
    #[error("{object} {message}")]
    InvalidState { object: ObjectName, message: String },
    /// An argument or a spec field is wrong (`VIR_ERR_INVALID_ARG`, `VIR_ERR_XML_ERROR`).
    #[error("{object}: invalid argument: {message}")]
    InvalidArgument { object: ObjectName, message: String },
    /// Another object already has that name or UUID.
    #[error("{object} already exists{detail}")]
    AlreadyExists { object: ObjectName, detail: String },
    /// Not enough room: pool space, host memory (`VIR_ERR_OPERATION_FAILED`).
    #[error("{object}: {message}")]
    NoSpace { object: ObjectName, message: String },
    /// The driver cannot do this (`VIR_ERR_NO_SUPPORT`).
    #[error("{object}: not supported by the {driver} driver: {operation}")]
    Unsupported {
        object: ObjectName,
        driver: &'static str,
        operation: &'static str,
    },
    /// A URI no driver accepts.
    #[error("cannot open '{uri}': {message}")]
    Connect { uri: String, message: String },
    /// Something failed below us (I/O, a process, a system call).
    #[error("{object}: operation failed: {message}")]
    OperationFailed { object: ObjectName, message: String },
    /// The guest agent inside a running domain does not answer: none is
    /// installed, it has not started yet, or it hangs
    /// (`VIR_ERR_AGENT_UNRESPONSIVE`).
    #[error("{object}: guest agent is not responding: {message}")]
    AgentUnresponsive { object: ObjectName, message: String },
    /// The connection's identity may not do this: the API server's RBAC
    /// refused it (HTTP 403), with the API server's message.
    #[error("{object}: forbidden: {message}")]
    Forbidden { object: ObjectName, message: String },
}

impl Error {
    pub fn not_found(kind: ObjectKind, name: impl Into<String>) -> Self {
        Self::NotFound(ObjectName::new(kind, name))
    }
    pub fn invalid_state(
        kind: ObjectKind,
        name: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::InvalidState {
            object: ObjectName::new(kind, name),
            message: message.into(),
        }
    }
    pub fn invalid_argument(
        kind: ObjectKind,
        name: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::InvalidArgument {
            object: ObjectName::new(kind, name),
            message: message.into(),
        }
    }
    pub fn already_exists(
        kind: ObjectKind,
        name: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self::AlreadyExists {
            object: ObjectName::new(kind, name),
            detail: detail.into(),
        }
    }
    pub fn no_space(kind: ObjectKind, name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::NoSpace {
            object: ObjectName::new(kind, name),
            message: message.into(),
        }
    }

    /// The object the error is about, if any.
    pub fn object(&self) -> Option<&ObjectName> {
        match self {
            Self::NotFound(o) => Some(o),
            Self::InvalidState { object, .. }
            | Self::InvalidArgument { object, .. }
            | Self::AlreadyExists { object, .. }
            | Self::NoSpace { object, .. }
            | Self::Unsupported { object, .. }
            | Self::OperationFailed { object, .. }
            | Self::AgentUnresponsive { object, .. }
            | Self::Forbidden { object, .. } => Some(object),
            Self::Connect { .. } => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
