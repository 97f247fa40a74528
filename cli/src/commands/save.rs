//! Saving and restoring a domain's state: save, restore, managedsave,
//! managedsave-remove (virsh's names and messages).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use vireo_drivers::Connection;

use super::domain::resolve;
use crate::output::Output;

#[derive(Args)]
pub struct SaveArgs {
    /// Domain name, ID or UUID.
    pub domain: String,
    /// The file to write, on the node that runs the domain.
    pub file: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// A file `save` wrote.
    pub file: PathBuf,
}

/// The path as the node sees it: relative paths are taken from here.
fn absolute(file: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(file).with_context(|| format!("{}", file.display()))
}

pub fn save(conn: &Connection, a: &SaveArgs) -> Result<Output> {
    let d = resolve(conn, &a.domain)?;
    let file = absolute(&a.file)?;
    conn.hypervisor().save_domain(&d.name, &file)?;
    Ok(Output::Message(format!(
        "Domain '{}' saved to {}",
        d.name,
        a.file.display()
    )))
}

pub fn restore(conn: &Connection, a: &RestoreArgs) -> Result<Output> {
    let file = absolute(&a.file)?;
    conn.hypervisor().restore_domain(&file)?;
    Ok(Output::Message(format!(
        "Domain restored from {}",
        a.file.display()
    )))
}

pub fn managedsave(conn: &Connection, domain: &str) -> Result<Output> {
    let d = resolve(conn, domain)?;
    conn.hypervisor().managed_save(&d.name)?;
    Ok(Output::Message(format!(
        "Domain '{}' state saved by libvirt",
        d.name
    )))
}

pub fn managedsave_remove(conn: &Connection, domain: &str) -> Result<Output> {
    let d = resolve(conn, domain)?;
    let hv = conn.hypervisor();
    if !hv.has_managed_save(&d.name)? {
        return Ok(Output::Message(format!(
            "Domain '{}' has no manage save image; removal skipped",
            d.name
        )));
    }
    hv.managed_save_remove(&d.name)?;
    Ok(Output::Message(format!(
        "Removed managedsave image for domain '{}'",
        d.name
    )))
}
