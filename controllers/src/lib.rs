//! Reconcilers. Pure decisions ([`run_strategy`], [`placement`],
//! [`conditions`]) are plain functions over the API types, shared by the
//! operator's cluster controllers ([`operator`]) and the agent's node
//! reconcilers ([`agent`]), which meet only in the API server.

pub mod agent;
pub mod conditions;
pub mod error;
pub mod k8s;
pub mod metrics;
pub mod migration;
pub mod operator;
pub mod placement;
pub mod run_strategy;
pub mod shutdown;
pub mod standalone;

pub use error::{Error, Result};
