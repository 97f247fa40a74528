//! `vireo console` against the qemu driver with the real guest image: what
//! is piped in reaches the guest's shell, and its answer comes back.
//! Without `qemu-system-x86_64` the test fails when `CI` is set, and
//! otherwise prints a SKIP line and returns.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vireo(uri: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .arg("-c")
        .arg(uri)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vireo runs");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("vireo finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn qemu_available() -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-system-x86_64 is missing and CI is set (scripts/setup installs it)"
        );
        eprintln!(
            "SKIP console test: qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
        );
    }
    found
}

fn guest_image() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-image.sh");
    let out = Command::new(script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("runs scripts/guest-image.sh");
    assert!(out.status.success(), "scripts/guest-image.sh failed");
    PathBuf::from(text(&out.stdout).lines().last().expect("image dir").trim())
}

#[test]
fn console_reaches_the_guest_shell() {
    if !qemu_available() {
        return;
    }
    let image = guest_image();
    let root = std::env::temp_dir().join(format!("vireo-cli-console-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let uri = format!("qemu:///embed?root={}", root.display());
    let manifest = root.with_extension("yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: shell}}\nspec:\n  type: qemu\n  memory: 256Mi\n  vcpus: 1\n  os:\n    kernel: {}\n    initrd: {}\n    cmdline: console=ttyS0 quiet vireo.net=0 vireo.shell=1\n",
            image.join("vmlinuz").display(),
            image.join("initrd.img").display()
        ),
    )
    .expect("write manifest");
    let out = vireo(&uri, &["create", "-f", &manifest.display().to_string()], "");
    assert!(out.status.success(), "create: {}", text(&out.stderr));

    // The guest's console output, until its set-up is done.
    let start = Instant::now();
    let mut seen = String::new();
    while !seen.contains("VIREO-GUEST-SETUP-DONE") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no set-up marker on the console:\n{seen}"
        );
        let out = vireo(&uri, &["console", "shell", "--watch", "2"], "");
        assert!(
            out.status.success(),
            "console --watch: {}",
            text(&out.stderr)
        );
        seen.push_str(&text(&out.stdout));
    }

    let token = format!("OUT-{}", std::process::id());
    let mut answer = String::new();
    for _ in 0..5 {
        let out = vireo(
            &uri,
            &["console", "shell"],
            &format!("\necho {token}-$((6*7))\n"),
        );
        assert!(out.status.success(), "console: {}", text(&out.stderr));
        answer.push_str(&text(&out.stdout));
        if answer.contains(&format!("{token}-42")) {
            break;
        }
    }
    assert!(
        answer.contains(&format!("{token}-42")),
        "the guest's shell did not answer through vireo console:\n{answer}"
    );

    let out = vireo(&uri, &["destroy", "shell"], "");
    assert!(out.status.success(), "destroy: {}", text(&out.stderr));
    let out = vireo(&uri, &["console", "shell"], "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("domain 'shell' not found"),
        "a destroyed transient domain has no console: {}",
        text(&out.stderr)
    );
    // The test driver runs no guest, so it has no console.
    let out = vireo("test:///default", &["console", "test"], "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not supported"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&manifest);
}
