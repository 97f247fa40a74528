//! `vireo-operator`: the cluster controllers. The controllers arrive with the
//! Kubernetes issue; today the binary prints or writes the CRDs generated
//! from the `crds` types.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Vireo's cluster operator", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of every Vireo kind as YAML, or
    /// write one file per CRD with --out-dir.
    Crds {
        /// Directory to write `<plural>.vireo.dev.yaml` files into.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir } => {
            for crd in vireo_crds::crd::all() {
                let yaml = vireo_crds::crd::to_yaml(&crd)?;
                match &out_dir {
                    Some(dir) => {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("cannot create {}", dir.display()))?;
                        let path = dir.join(vireo_crds::crd::file_name(&crd));
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        println!("wrote {}", path.display());
                    }
                    None => print!("---\n{yaml}"),
                }
            }
        }
    }
    Ok(())
}
