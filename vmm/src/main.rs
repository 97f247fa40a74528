//! `vireo-vmm`: one process per running VM (see docs/vmm.md), plus `probe`,
//! which reports what kind of KVM this host offers.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vireo_vmm::boot::loader::ElfEntry;
use vireo_vmm::config::{DiskSpec, NetSpec, OnReboot, VmConfig, VsockSpec};
use vireo_vmm::exit::{ExitFile, ExitReason, ExitReport};

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
    /// Run one VM until it powers off, reboots (with --on-reboot destroy),
    /// is destroyed, or crashes.
    Run(Box<RunArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum OnRebootArg {
    Restart,
    Destroy,
}

#[derive(Clone, Copy, ValueEnum)]
enum ElfEntryArg {
    Auto,
    Linux64,
    Pvh,
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: bzImage, ELF vmlinux, or an ELF with a PVH entry note.
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "console=ttyS0 panic=1")]
    cmdline: String,
    #[arg(long)]
    memory_mib: u64,
    #[arg(long)]
    vcpus: u32,
    /// CPUID features to hide, comma-separated (/proc/cpuinfo names).
    #[arg(long, default_value = "")]
    cpuid_hide: String,
    /// PATH[,readonly]: a virtio-blk disk (repeatable).
    #[arg(long)]
    disk: Vec<String>,
    /// TAP[,mac=MAC]: a virtio-net NIC on an existing tap (repeatable).
    #[arg(long)]
    net: Vec<String>,
    /// A virtio-rng entropy device.
    #[arg(long)]
    rng: bool,
    /// A virtio-balloon device (live memory changes with `balloon` on the API).
    #[arg(long)]
    balloon: bool,
    /// Memory the guest should keep at boot (needs --balloon): the balloon's
    /// initial target is --memory-mib minus this.
    #[arg(long)]
    current_memory_mib: Option<u64>,
    /// cid=N,uds=PATH: a virtio-vsock device for a guest with CID N (>= 3).
    /// Host processes connect to the Unix socket PATH and write
    /// `CONNECT <port>\n`; guest connections to host port P go to `PATH_P`.
    #[arg(long)]
    vsock: Option<String>,
    #[arg(long)]
    api_socket: PathBuf,
    #[arg(long)]
    console_log: PathBuf,
    #[arg(long)]
    console_socket: PathBuf,
    #[arg(long)]
    exit_file: PathBuf,
    #[arg(long, value_enum, default_value = "restart")]
    on_reboot: OnRebootArg,
    /// Default timeout of a shutdown request that names none.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout_seconds: u64,
    /// Which entry of an ELF kernel to use: PVH when it has the note (auto),
    /// or always one of them.
    #[arg(long, value_enum, default_value = "auto")]
    elf_entry: ElfEntryArg,
    /// Carry on from this snapshot (taken with the `snapshot` API request)
    /// instead of booting. The rest of the command line must describe the
    /// same machine (memory, vCPUs, devices in the same order).
    #[arg(long)]
    restore: Option<PathBuf>,
    /// Where the snapshot starts in the --restore file (a file with a header
    /// of its own in front, such as the kvm driver's save files).
    #[arg(long, requires = "restore", default_value_t = 0)]
    restore_offset: u64,
    /// Wait for an incoming live migration instead of booting: answer the
    /// API as a paused VM, listen where `migrate-incoming` says, receive
    /// the source's snapshot into this file, and carry on from it, paused
    /// (see the `migration` module). The rest of the command line must
    /// describe the same machine as the source's.
    #[arg(long, conflicts_with = "restore")]
    incoming: Option<PathBuf>,
    /// Start with the vCPUs paused: the guest runs after `resume`.
    #[arg(long)]
    paused: bool,
    /// Do not install the seccomp filter (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Once the files are open, move into a mount namespace whose root holds
    /// only the directories of the sockets and the exit file (needs root;
    /// see docs/vmm.md). Capabilities are dropped and no_new_privs set
    /// with or without it.
    #[arg(long)]
    jail: bool,
    /// Run as this user once the files are open (root only; needs --gid).
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    /// The group for --uid.
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
}

impl RunArgs {
    fn config(&self) -> Result<VmConfig> {
        if self.vcpus == 0 {
            bail!("--vcpus must be at least 1");
        }
        let balloon = match (self.balloon, self.current_memory_mib) {
            (false, None) => None,
            (false, Some(_)) => bail!("--current-memory-mib needs --balloon"),
            (true, None) => Some(0),
            (true, Some(current)) => {
                if current == 0 || current > self.memory_mib {
                    bail!("--current-memory-mib must be between 1 and --memory-mib");
                }
                let pages = (self.memory_mib - current) * 256;
                Some(u32::try_from(pages).context("--memory-mib too large for the balloon")?)
            }
        };
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory_bytes: self
                .memory_mib
                .checked_mul(1 << 20)
                .context("--memory-mib too large")?,
            vcpus: self.vcpus,
            cpuid_hide: vireo_vmm::vcpu::cpuid::parse_hide(&self.cpuid_hide)?,
            api_socket: self.api_socket.clone(),
            console_log: self.console_log.clone(),
            console_socket: self.console_socket.clone(),
            on_reboot: match self.on_reboot {
                OnRebootArg::Restart => OnReboot::Restart,
                OnRebootArg::Destroy => OnReboot::Destroy,
            },
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_seconds),
            seccomp: !self.no_seccomp,
            exit_file: self.exit_file.clone(),
            jail: self.jail,
            run_as: self.uid.zip(self.gid),
            disks: self
                .disk
                .iter()
                .map(|d| DiskSpec::parse(d))
                .collect::<Result<_, _>>()?,
            nets: self
                .net
                .iter()
                .map(|n| NetSpec::parse(n))
                .collect::<Result<_, _>>()?,
            rng: self.rng,
            balloon,
            vsock: self.vsock.as_deref().map(VsockSpec::parse).transpose()?,
            restore: self.restore.clone().map(|p| (p, self.restore_offset)),
            start_paused: self.paused,
            elf_entry: match self.elf_entry {
                ElfEntryArg::Auto => ElfEntry::Auto,
                ElfEntryArg::Linux64 => ElfEntry::Linux64,
                ElfEntryArg::Pvh => ElfEntry::Pvh,
            },
        })
    }
}

fn run(args: RunArgs, start: Instant) -> i32 {
    // The exit file first, so that even a start error is reported in it.
    let exit_file = match ExitFile::create(&args.exit_file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "vireo-vmm: creating the exit file {}: {e}",
                args.exit_file.display()
            );
            return 1;
        }
    };
    // The VM is torn down only after the exit file is written: closing a
    // VM's descriptors takes tens of milliseconds, and the driver waits for
    // the word.
    let mut machine = None;
    let result = (|| -> Result<ExitReport> {
        let mut cfg = args.config()?;
        // An incoming migration: the state arrives first, then the machine
        // is built from it as for --restore, paused.
        let source = match &args.incoming {
            Some(file) => {
                let waiting = vireo_vmm::migration::Waiting {
                    memory_bytes: cfg.memory_bytes,
                    vcpus: cfg.vcpus,
                    disks: cfg
                        .disks
                        .iter()
                        .map(|d| (d.path.clone(), d.readonly))
                        .collect(),
                };
                let stream = vireo_vmm::migration::wait_incoming(&cfg.api_socket, file, waiting)
                    .context("waiting for the incoming migration")?;
                cfg.restore = Some((file.clone(), 0));
                cfg.start_paused = true;
                Some(stream)
            }
            None => None,
        };
        let built = cfg
            .open_files()
            .context("opening the files on the command line")
            .and_then(|files| {
                // The received snapshot is read through its open file from
                // here on: its name can go (nothing is left behind).
                if let Some(file) = &args.incoming {
                    let _ = std::fs::remove_file(file);
                }
                vireo_vmm::vmm::Vmm::start(&cfg, files, start).context("starting the VM")
            });
        if let Some(stream) = source {
            let outcome = built.as_ref().map(drop).map_err(|e| format!("{e:#}"));
            vireo_vmm::migration::reply(
                stream,
                outcome.as_ref().map(|_| ()).map_err(|e| e.as_str()),
            );
            if outcome.is_ok() {
                tracing::info!("incoming migration restored: paused until resume");
            }
        }
        let vmm = machine.insert(built?);
        tracing::info!(
            pid = std::process::id(),
            vcpus = cfg.vcpus,
            memory_mib = cfg.memory_bytes >> 20,
            "VM running"
        );
        Ok(vmm.run())
    })();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vireo-vmm: {e:#}");
            ExitReport {
                reason: ExitReason::Crashed,
                detail: format!("{e:#}"),
                boot_time_us: None,
            }
        }
    };
    if let Err(e) = exit_file.write(&report) {
        eprintln!("vireo-vmm: writing the exit file: {e}");
    }
    drop(machine);
    report.reason.code()
}

fn main() {
    // The boot timer's zero: taken before anything else happens.
    let start = Instant::now();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIREO_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // A panic anywhere (it would be a VMM bug; guests cannot cause one) must
    // not leave a half-alive VMM behind, e.g. a vCPU thread gone while the
    // event loop serves on: log it and abort, which the driver sees as a
    // VMM killed by a signal, i.e. `crashed`.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("vireo-vmm panicked: {info}; aborting");
        std::process::abort();
    }));
    let code = match cli.command {
        Command::Probe => {
            println!("{}", vireo_vmm::probe::probe().describe());
            0
        }
        Command::Run(args) => run(*args, start),
    };
    std::process::exit(code);
}
