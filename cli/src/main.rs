//! `vireo`: a virsh-like command line for Vireo.
//!
//! One command per invocation (`vireo -c test:///default list --all`), or a
//! shell that reads commands from standard input, one a line, all in one
//! connection (`vireo` with no command).

mod cluster;
mod commands;
mod output;
mod size;

use std::io::{self, BufRead, BufWriter, IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};

use commands::Command;
use output::Format;

/// The standalone agent's socket under its default state directory.
const AGENT_SOCKET: &str = "/var/lib/vireo/vireo.sock";

/// The connection used when neither `-c` nor `VIREO_DEFAULT_URI` names one:
/// the local agent when its socket is there (as virsh finds libvirtd), else
/// libvirt's in-memory test node, said on stderr so that nobody takes the
/// test node for their own (an agent that is down leaves no socket).
fn default_uri() -> String {
    if std::path::Path::new(AGENT_SOCKET).exists() {
        format!("vireo+unix://{AGENT_SOCKET}")
    } else {
        eprintln!(
            "vireo: no agent is listening at {AGENT_SOCKET} (is vireo-agent running?); \
             using test:///default, libvirt's in-memory test node (-c URI picks another)"
        );
        "test:///default".to_string()
    }
}

#[derive(Parser)]
#[command(
    name = "vireo",
    version,
    about = "Manage Vireo virtual machines, networks and storage, the way virsh does",
    long_about = "Manage Vireo virtual machines, networks and storage, the way virsh does.\n\n\
        Vireo keeps libvirt's object model: domains, networks, storage pools and volumes are \
        defined (they exist) or active (they run). Every virsh command you know has an equivalent \
        here, with the same name.\n\n\
        With no command, vireo reads commands from standard input, one a line, and runs them in \
        one connection (a shell, like virsh's).",
    after_help = "Examples:\n  vireo list --all\n  vireo -c test:///default dominfo test\n  \
        vireo define -f examples/test-domain.yaml && vireo start demo\n  \
        printf 'list --all\\ndominfo test\\n' | vireo"
)]
struct Cli {
    /// Connection URI: vireo+unix:///PATH (a standalone agent's socket; the
    /// default when /var/lib/vireo/vireo.sock exists), test:///default (the
    /// in-memory test node; the default otherwise, with a note on stderr),
    /// test:///PATH/node.yaml, qemu:///system,
    /// qemu:///embed?root=DIR, kvm:///system, kvm:///embed?root=DIR,
    /// kube:///[CONTEXT][?namespace=NS] (a cluster, through its API server
    /// as the kubeconfig's user; the default as kubectl-vireo).
    #[arg(
        short = 'c',
        long = "connect",
        env = "VIREO_DEFAULT_URI",
        global = true
    )]
    uri: Option<String>,

    /// Output format: virsh-like tables, or YAML/JSON for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    output: Format,

    #[command(subcommand)]
    command: Option<Command>,
}

/// One line of shell mode: a command, with an optional `-o`.
#[derive(Parser)]
#[command(
    name = "vireo",
    no_binary_name = true,
    disable_version_flag = true,
    about = "vireo shell: one command a line, as on the command line without 'vireo'; 'quit' leaves",
    long_about = None
)]
struct ShellLine {
    #[arg(short = 'o', long = "output", value_enum, global = true)]
    output: Option<Format>,

    #[command(subcommand)]
    command: Command,
}

/// Whether this process runs as `kubectl-vireo` (a kubectl plugin): then
/// its connection is the cluster's, `kube:///`, unless -c says otherwise.
fn is_kubectl_plugin(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "kubectl-vireo")
}

/// Opens a connection: `kube:` URIs on the cluster, the rest through the drivers.
fn open(uri: &str) -> vireo_drivers::Result<vireo_drivers::Connection> {
    if cluster::is_kube_uri(uri) {
        cluster::open(uri)
    } else {
        vireo_drivers::open(uri)
    }
}

fn main() -> ExitCode {
    let plugin = is_kubectl_plugin(std::env::args_os().next().as_deref());
    let cli = if plugin {
        Cli::parse_from(
            std::iter::once(std::ffi::OsString::from("kubectl vireo"))
                .chain(std::env::args_os().skip(1)),
        )
    } else {
        Cli::parse()
    };
    let uri = match (&cli.uri, plugin) {
        (Some(u), _) => u.clone(),
        (None, true) => "kube:///".to_string(),
        (None, false) => default_uri(),
    };
    let conn = match open(&uri) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(command) => {
            let stdout = io::stdout();
            let mut out = stdout.lock();
            if run_one(&conn, &command, cli.output, &mut out) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        None => shell(&conn, cli.output),
    }
}

/// Runs one command, prints its output or its error; true on success.
fn run_one(
    conn: &vireo_drivers::Connection,
    command: &Command,
    format: Format,
    out: &mut dyn Write,
) -> bool {
    match commands::run(conn, command) {
        Ok(output) => {
            if let Err(e) = output.print(format, out) {
                // A closed pipe (`vireo list | head`) is not worth a message.
                if e.kind() != io::ErrorKind::BrokenPipe {
                    eprintln!("error: cannot write output: {e}");
                }
                return false;
            }
            true
        }
        Err(e) => {
            let _ = out.flush();
            eprintln!("error: {e:#}");
            false
        }
    }
}

/// clap's message without its usage and tip lines, on one line.
fn one_line(message: &str) -> String {
    let text = message
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.trim_start().starts_with("tip:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    text.trim_start_matches("error: ").to_string()
}

/// Shell mode: commands from standard input in one connection.
fn shell(conn: &vireo_drivers::Connection, default_format: Format) -> ExitCode {
    let interactive = io::stdin().is_terminal();
    let stdin = io::stdin();
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
    // Built once: building clap's command tree costs more than running a command.
    let mut parser = ShellLine::command();
    let mut failed = false;
    let mut line = String::new();
    let mut input = stdin.lock();
    loop {
        if interactive {
            let _ = write!(out, "vireo # ");
            let _ = out.flush();
        }
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: cannot read standard input: {e}");
                failed = true;
                break;
            }
        }
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if text == "quit" || text == "exit" {
            break;
        }
        let words = match shell_words::split(text) {
            Ok(w) => w,
            Err(e) => {
                let _ = out.flush();
                eprintln!("error: cannot split '{text}': {e}");
                failed = true;
                continue;
            }
        };
        let parsed = parser
            .try_get_matches_from_mut(words)
            .and_then(|m| ShellLine::from_arg_matches(&m));
        match parsed {
            Ok(l) => {
                let format = l.output.unwrap_or(default_format);
                if !run_one(conn, &l.command, format, &mut out) {
                    failed = true;
                }
            }
            Err(e) => {
                let _ = out.flush();
                match e.kind() {
                    clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                        let _ = write!(out, "{}", e.render());
                    }
                    _ => {
                        eprintln!("error: {}", one_line(&e.render().to_string()));
                        failed = true;
                    }
                }
            }
        }
        if interactive {
            let _ = out.flush();
        }
    }
    let _ = out.flush();
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_vireo_is_the_plugin_by_its_file_name() {
        let yes = |s: &str| is_kubectl_plugin(Some(std::ffi::OsStr::new(s)));
        assert!(yes("kubectl-vireo"));
        assert!(yes("/usr/local/bin/kubectl-vireo"));
        assert!(!yes("vireo"));
        assert!(!yes("/opt/kubectl-vireo/vireo"));
        assert!(!is_kubectl_plugin(None));
    }
}
