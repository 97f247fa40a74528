//! Errors of the reconcilers.

/// What can go wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("driver: {0}")]
    Driver(#[from] vireo_drivers::Error),
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("a driver call did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Driver(_) => "driver",
            Self::Serialize { .. } => "serialize",
            Self::Invalid(_) => "invalid",
            Self::Join(_) => "join",
        }
    }
}

/// The error a caught panic becomes: its message, so the log says where.
pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Error {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    tracing::error!(panic = %what, "internal error (a defect): a panic was caught");
    Error::Invalid(format!("internal error: {what}"))
}
