//! The snapshot commands as a user runs them, on the test node.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn vireo(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(args)
        .env("VIREO_DEFAULT_URI", "test:///default")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vireo runs");
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or("").as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("vireo finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn snapshots_read_like_virsh() {
    // One shell session: the test node lives as long as the process.
    let script = "snapshot-create-as test s1 --description first\n\
                  destroy test\n\
                  snapshot-create-as test --name s2\n\
                  snapshot-list test\n\
                  snapshot-list test --parent\n\
                  snapshot-current test --name\n\
                  snapshot-info test s1\n\
                  snapshot-revert test s1\n\
                  domstate test --reason\n\
                  snapshot-info test --current\n\
                  snapshot-revert test s2\n\
                  domstate test --reason\n\
                  snapshot-dumpxml test s1\n\
                  snapshot-list test --tree\n\
                  snapshot-create-as test s1\n\
                  snapshot-delete test s1\n\
                  snapshot-list test --name\n\
                  snapshot-info test s1\n";
    let out = vireo(&[], Some(script));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "Domain snapshot s1 created",
        "Domain snapshot s2 created",
        "Domain 'test' destroyed",
        " Name   Creation Time               State",
        "running (from snapshot)",
        "shut off (from snapshot)",
        "Name:           s1",
        "Domain:         test",
        "State:          running",
        "Location:       internal",
        "Parent:         -",
        "Children:       1",
        "Descendants:    1",
        "Memory:         yes",
        "Current:        yes",
        "  <state>running</state>",
        "  <description>first</description>",
        "  <memory snapshot='internal'/>",
        "s1",
        "  |",
        "  +- s2",
        "Domain snapshot s1 deleted",
    ] {
        assert!(
            lines.contains(&want),
            "no line '{want}' in:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    // The table: a rule, then one row per snapshot with a creation time
    // in virsh's shape and the state.
    let table: Vec<&&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with(" Name   Creation Time"))
        .take(4)
        .collect();
    assert!(table[1].chars().all(|c| c == '-'), "{table:?}");
    for (row, (name, state)) in table[2..]
        .iter()
        .zip([("s1", "running"), ("s2", "shutoff")])
    {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells.len(), 5, "{row}");
        assert_eq!((cells[0], cells[4]), (name, state), "{row}");
        assert_eq!(cells[3], "+0000", "{row}");
        assert_eq!(cells[1].len(), "2026-12-04".len(), "{row}");
    }
    assert!(
        stdout.contains(" Name   Creation Time               State     Parent"),
        "--parent adds a column:\n{stdout}"
    );
    // After s1 is deleted, s2 is the only name.
    let after_delete: Vec<&&str> = lines
        .iter()
        .skip_while(|l| **l != "Domain snapshot s1 deleted")
        .skip(1)
        .collect();
    assert_eq!(after_delete.first().map(|s| **s), Some("s2"), "{stdout}");
    assert!(
        stderr.contains("domain snapshot 's1' already exists"),
        "a taken name is refused: {stderr}"
    );
    assert!(
        stderr.contains("domain snapshot 's1' not found"),
        "a deleted snapshot is not found: {stderr}"
    );
}

#[test]
fn snapshot_help_explains_and_bad_names_are_refused() {
    let out = vireo(&["snapshot-create-as", "--help"], None);
    let help = text(&out.stdout);
    assert!(help.contains("--disk-only"), "{help}");
    assert!(help.contains("--description"), "{help}");
    let out = vireo(&["snapshot-create-as", "test", "bad/name"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("name:"), "the error names the field: {err}");
    let out = vireo(&["snapshot-current", "test"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("has no current snapshot"),
        "{}",
        text(&out.stderr)
    );
}
