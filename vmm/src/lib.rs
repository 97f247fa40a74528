//! vireo-vmm's library part.

pub mod probe;
