//! `vireo-operator`: the cluster controllers. The controllers arrive with the
//! Kubernetes issue; today the binary prints the CRDs generated from the
//! `crds` types.

use anyhow::Result;
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use vireo_crds::{Domain, Host, Network, StoragePool, StorageVol};

#[derive(Parser)]
#[command(version, about = "Vireo's cluster operator", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of every Vireo kind as YAML.
    Crds,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crds => {
            let crds = [
                Domain::crd(),
                Network::crd(),
                StoragePool::crd(),
                StorageVol::crd(),
                Host::crd(),
            ];
            for crd in crds {
                print!("---\n{}", serde_yaml_ng::to_string(&crd)?);
            }
        }
    }
    Ok(())
}
