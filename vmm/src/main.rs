//! `vireo-vmm`: the micro-VMM arrives with the kvm-driver issue. Today it
//! reports what kind of KVM this host offers, which tests use to decide what
//! they can boot.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Vireo's micro-VMM on /dev/kvm", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Say whether /dev/kvm is hardware KVM, software KVM (PVM) or absent.
    Probe,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Probe => println!("{}", vireo_vmm::probe::probe().describe()),
    }
    Ok(())
}
