//! Reconcilers. The decisions live here as plain functions over the API
//! types, so the cluster agent, standalone mode and their tests share them.

pub mod placement;
pub mod run_strategy;
