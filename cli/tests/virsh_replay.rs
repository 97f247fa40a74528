//! Replays cli/tests/virsh-session.txt through real `virsh -c test:///default`
//! and through `vireo -c test:///default`, each in one shell session (one
//! connection, so state carries over), and prints per step: same, same up to
//! documented wording (docs/cli.md), or different. After every step both
//! also list domains, networks and pools: those states must all agree, as
//! must every step's success or failure, and at least 95% of the steps must
//! print the same.
//!
//! Output is compared with trailing empty lines removed (virsh ends most
//! commands with one). Numbers libvirt's test driver derives from the clock
//! (CPU time, I/O counters) differ between two runs of virsh itself: the
//! test runs virsh twice, more than 4 s apart, and on a line that differs
//! between those runs it compares only the line's shape (digits masked).

use std::io::{Read, Write};
use std::process::{Command, Stdio};

const PROBES: [&str; 3] = ["list --all", "net-list --all", "pool-list --all"];

fn steps() -> Vec<String> {
    include_str!("virsh-session.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Every step followed by the state probes.
fn commands(steps: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for s in steps {
        out.push(s.clone());
        out.extend(PROBES.iter().map(|p| p.to_string()));
    }
    out
}

/// Runs a program with `input` on stdin, stdout and stderr in one pipe (so
/// errors stay in place); the merged text.
fn run_merged(program: &str, args: &[&str], input: &str) -> String {
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let mut child = Command::new(program)
        .args(args)
        .env_remove("VIREO_DEFAULT_URI")
        .stdin(Stdio::piped())
        .stdout(writer.try_clone().expect("pipe clone"))
        .stderr(writer)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut text = String::new();
    reader.read_to_string(&mut text).expect("read output");
    let _ = feeder.join();
    child.wait().expect("wait");
    text
}

/// virsh's shell output cut at its prompts: one block per command.
fn virsh_blocks(cmds: &[String]) -> Vec<String> {
    let input = cmds.join("\n") + "\n";
    let text = run_merged("virsh", &["-c", "test:///default"], &input);
    let mut blocks: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.split_inclusive('\n') {
        if line.starts_with("virsh # ") {
            if let Some(b) = current.take() {
                blocks.push(b);
            }
            current = Some(String::new());
        } else if let Some(b) = current.as_mut() {
            b.push_str(line);
        }
    }
    // The last prompt (end of input) starts no command.
    assert_eq!(
        blocks.len(),
        cmds.len(),
        "virsh printed one prompt per command:\n{text}"
    );
    blocks.into_iter().map(|b| normalize(&b)).collect()
}

/// vireo's shell output cut at `echo` markers placed before each command.
fn vireo_blocks(cmds: &[String]) -> Vec<String> {
    let mut input = String::new();
    for (i, c) in cmds.iter().enumerate() {
        input.push_str(&format!("echo @@{i}\n{c}\n"));
    }
    let text = run_merged(
        env!("CARGO_BIN_EXE_vireo"),
        &["-c", "test:///default"],
        &input,
    );
    let mut blocks = vec![String::new(); cmds.len()];
    let mut at: Option<usize> = None;
    for line in text.split_inclusive('\n') {
        if let Some(n) = line.trim_end().strip_prefix("@@")
            && let Ok(i) = n.parse::<usize>()
        {
            at = Some(i);
            continue;
        }
        if let Some(i) = at {
            blocks[i].push_str(line);
        }
    }
    blocks.into_iter().map(|b| normalize(&b)).collect()
}

fn normalize(block: &str) -> String {
    block.trim_end_matches('\n').to_string()
}

fn failed(block: &str) -> bool {
    block.lines().any(|l| l.starts_with("error:"))
}

fn mask(line: &str) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for c in line.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// Whether vireo's block matches virsh's, on the lines virsh reproduces
/// exactly and on the shape of the lines it does not (`a` and `b` are two
/// virsh runs).
fn same(a: &str, b: &str, ours: &str) -> bool {
    if a == ours {
        return true;
    }
    let (la, lb, lo): (Vec<&str>, Vec<&str>, Vec<&str>) = (
        a.lines().collect(),
        b.lines().collect(),
        ours.lines().collect(),
    );
    la.len() == lb.len()
        && la.len() == lo.len()
        && la
            .iter()
            .zip(&lb)
            .zip(&lo)
            .all(|((x, y), o)| x == o || (x != y && mask(x) == mask(o)))
}

/// The block without its error lines (what both print besides the error).
fn without_errors(block: &str) -> String {
    block
        .lines()
        .filter(|l| !l.starts_with("error:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Documented differences (docs/cli.md, "Replay against virsh"): the
/// command, and how vireo's output relates to virsh's.
fn documented(step: &str, virsh: &str, ours: &str) -> Option<&'static str> {
    if failed(virsh) && failed(ours) && without_errors(virsh) == without_errors(ours) {
        return Some("error wording");
    }
    let rows = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("---"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    if step.starts_with("domblklist")
        && rows(&virsh.replace("/guest/diskimage1", "diskimage1")) == rows(ours)
    {
        return Some("a disk is a volume: its name, not libvirt's file path");
    }
    if step == "version" && virsh.lines().last() == ours.lines().last() {
        return Some("vireo prints its own version, not libvirt's library and API");
    }
    None
}

#[test]
fn virsh_session_replays_the_same() {
    if Command::new("virsh").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "virsh (libvirt-clients) is missing, and CI installs it (scripts/setup): broken setup"
        );
        eprintln!(
            "SKIP virsh_session_replays_the_same: virsh is not installed \
             (scripts/setup installs libvirt-clients)"
        );
        return;
    }
    let steps = steps();
    assert!(steps.len() >= 150, "the session has {} steps", steps.len());
    let cmds = commands(&steps);
    let run_a = virsh_blocks(&cmds);
    // libvirt's test driver derives some counters from the clock in whole
    // seconds (a quarter of them, at the coarsest): runs more than 4 s
    // apart differ on every such line, so each is known for what it is.
    std::thread::sleep(std::time::Duration::from_millis(4500));
    let run_b = virsh_blocks(&cmds);
    let ours = vireo_blocks(&cmds);
    let per = PROBES.len() + 1;
    let (mut n_same, mut n_doc, mut n_diff) = (0, 0, 0);
    let mut report = String::new();
    let mut state_mismatch = Vec::new();
    let mut status_mismatch = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let k = i * per;
        let (a, b, o) = (&run_a[k], &run_b[k], &ours[k]);
        let verdict = if same(a, b, o) {
            n_same += 1;
            "same".to_string()
        } else if let Some(why) = documented(step, a, o) {
            n_doc += 1;
            format!("same up to documented wording ({why})")
        } else {
            n_diff += 1;
            "different".to_string()
        };
        report.push_str(&format!("{:>3} {step}: {verdict}\n", i + 1));
        if verdict == "different" || verdict.contains("documented") {
            report.push_str(&format!("    virsh: {a:?}\n    vireo: {o:?}\n"));
        }
        if failed(a) != failed(o) {
            status_mismatch.push(format!("{step}: virsh {a:?}, vireo {o:?}"));
        }
        for p in 1..per {
            if !same(&run_a[k + p], &run_b[k + p], &ours[k + p]) {
                state_mismatch.push(format!(
                    "after '{step}', {}:\nvirsh: {:?}\nvireo: {:?}",
                    PROBES[p - 1],
                    run_a[k + p],
                    ours[k + p]
                ));
            }
        }
    }
    let total = steps.len();
    let pct = n_same as f64 * 100.0 / total as f64;
    println!("{report}");
    println!(
        "virsh replay: {total} steps: {n_same} same ({pct:.1}%), {n_doc} same up to documented wording, {n_diff} different"
    );
    assert!(
        status_mismatch.is_empty(),
        "success and failure differ:\n{}",
        status_mismatch.join("\n")
    );
    assert!(
        state_mismatch.is_empty(),
        "states differ:\n{}",
        state_mismatch.join("\n")
    );
    assert!(pct >= 95.0, "only {pct:.1}% of the steps print the same");
}
