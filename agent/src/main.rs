//! `vireo-agent`: one per node. The reconcilers arrive with the Kubernetes
//! and standalone issues; today the binary reports what it would register as
//! its Host.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Vireo's node agent", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's NodeInfo (CPUs, memory, CPU model) as the Host status will carry it.
    HostInfo,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::HostInfo => {
            let info = vireo_drivers::host::probe_node_info()?;
            print!("{}", serde_yaml_ng::to_string(&info)?);
        }
    }
    Ok(())
}
