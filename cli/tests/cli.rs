//! The `vireo` binary as a user runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn vireo(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(args)
        // The in-memory test node, even where a local agent runs.
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

fn example(name: &str) -> String {
    format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn list_reads_like_virsh() {
    let out = vireo(&["list", "--all"], None);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        " Id   Name   State\n----------------------\n 1    test   running\n"
    );
}

#[test]
fn without_an_agent_the_fallback_to_the_test_node_is_said_on_stderr() {
    if std::path::Path::new("/var/lib/vireo/vireo.sock").exists() {
        eprintln!("skipped: a local agent listens at /var/lib/vireo/vireo.sock on this machine");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["list", "--all"])
        .env_remove("VIREO_DEFAULT_URI")
        .output()
        .expect("vireo runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("no agent is listening at /var/lib/vireo/vireo.sock")
            && err.contains("using test:///default"),
        "stderr: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    // The tables stay clean for scripts.
    assert!(text(&out.stdout).contains(" 1    test   running"));

    // With a connection named, nothing is said.
    let out = vireo(&["list", "--all"], None);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn errors_are_one_line_on_stderr_with_nonzero_exit() {
    let out = vireo(&["dominfo", "nosuch"], None);
    assert!(!out.status.success());
    assert_eq!(text(&out.stderr), "error: domain 'nosuch' not found\n");
    assert!(out.stdout.is_empty());

    let out = vireo(&["resume", "test"], None);
    assert!(!out.status.success());
    assert_eq!(text(&out.stderr), "error: domain 'test' is not paused\n");

    let out = vireo(&["-c", "bogus:///x", "list"], None);
    assert!(!out.status.success());
    assert!(text(&out.stderr).starts_with("error: cannot open 'bogus:///x'"));

    let out = vireo(&["define", "-f", "/nonexistent.yaml"], None);
    assert!(!out.status.success());
    assert!(text(&out.stderr).starts_with("error: cannot read /nonexistent.yaml"));
}

#[test]
fn bad_manifest_names_the_field() {
    let dir = std::env::temp_dir().join(format!("vireo-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let f = dir.join("bad.yaml");
    std::fs::write(
        &f,
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: bad}\nspec: {type: test, memory: 1Gi, currentMemory: 2Gi, vcpus: 1}\n",
    )
    .expect("write");
    let out = vireo(&["define", "-f", f.to_str().expect("utf8")], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("domain 'bad'") && err.contains("spec.currentMemory"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A Domain imported from libvirt XML is found by its libvirt name too
/// (`QEMUGuest1` is the Domain `qemuguest1`), and dumpxml gives it back.
#[test]
fn an_imported_domain_answers_to_its_libvirt_name() {
    let dir = std::env::temp_dir().join(format!("vireo-cli-libvirt-name-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let xml = dir.join("guest.xml");
    std::fs::write(
        &xml,
        "<domain type='qemu'><name>QEMUGuest1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>/boot/vmlinuz</kernel></os></domain>",
    )
    .expect("xml");
    let script = format!(
        "define -f {}\ndomstate QEMUGuest1\ndomstate qemuguest1\ndumpxml QEMUGuest1\ndomstate NoSuchGuest\n",
        xml.display()
    );
    let out = vireo(&["-c", "test:///default"], Some(&script));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Domain 'qemuguest1' defined"), "{stdout}");
    assert_eq!(stdout.matches("shut off").count(), 2, "{stdout}");
    assert!(stdout.contains("<name>QEMUGuest1</name>"), "{stdout}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("'QEMUGuest1' becomes 'qemuguest1'"),
        "the rename is noted: {stderr}"
    );
    assert!(
        stderr.ends_with("error: domain 'NoSuchGuest' not found\n"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shell_mode_keeps_one_connection() {
    let script = format!(
        "define -f {}\nstart demo\ndomstate demo --reason\nsuspend demo\ndomstate demo --reason\n\
         resume demo\nresume demo\ndomstate demo --reason\nshutdown demo\ndomstate demo --reason\nundefine demo\nlist --all\n",
        example("test-domain.yaml")
    );
    let out = vireo(&[], Some(&script));
    let stdout = text(&out.stdout);
    let expected = [
        format!("Domain 'demo' defined from {}", example("test-domain.yaml")),
        "Domain 'demo' started".into(),
        "running (booted)".into(),
        "Domain 'demo' suspended".into(),
        "paused (user)".into(),
        "Domain 'demo' resumed".into(),
        "running (unpaused)".into(),
        "Domain 'demo' is being shutdown".into(),
        "shut off (shutdown)".into(),
        "Domain 'demo' has been undefined".into(),
        " Id   Name   State".into(),
        "----------------------".into(),
        " 1    test   running".into(),
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stdout}");
    assert_eq!(text(&out.stderr), "error: domain 'demo' is not paused\n");
    assert!(
        !out.status.success(),
        "a failed line makes the session fail"
    );
}

#[test]
fn shell_mode_reports_bad_lines_and_goes_on() {
    let out = vireo(&[], Some("frobnicate\nstart\ndomid test\n"));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(stderr.lines().all(|l| l.starts_with("error: ")), "{stderr}");
    assert_eq!(text(&out.stdout), "1\n");
}

#[test]
fn json_and_yaml_output_for_scripts() {
    let out = vireo(&["-o", "json", "dominfo", "test"], None);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["name"], "test");
    assert_eq!(v["info"]["state"], "running");
    assert_eq!(v["info"]["maxMemory"], "8Gi");

    let out = vireo(&["-o", "yaml", "list", "--all"], None);
    let v: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).expect("yaml");
    assert_eq!(v[0]["id"], 1);
    assert_eq!(v[0]["state"], "running");
}

#[test]
fn networks_pools_and_volumes() {
    let script = format!(
        "net-define -f {net}\nnet-start lab\nnet-info lab\nnet-destroy lab\nnet-destroy lab\nnet-undefine lab\n\
         pool-define -f {pool}\npool-build images\npool-start images\nvol-create -f {vol}\n\
         vol-create-as images big 1000G\nvol-clone scratch copy --pool images\nvol-resize copy 4G --pool images\n\
         vol-list images --details\nvol-delete copy --pool images\nvol-delete /var/lib/vireo/images/scratch\n\
         pool-destroy images\npool-delete images\npool-undefine images\npool-list --all\n",
        net = example("test-network.yaml"),
        pool = example("test-pool.yaml"),
        vol = example("test-volume.yaml"),
    );
    let out = vireo(&[], Some(&script));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stdout.contains("Network lab started"), "{stdout}");
    assert!(stdout.contains("Bridge:         vireo-lab0"), "{stdout}");
    assert!(
        stderr.contains("error: network 'lab' is not active"),
        "{stderr}"
    );
    assert!(stdout.contains("Pool images built") && stdout.contains("Pool images started"));
    assert!(
        stderr.contains("error: storage volume 'big': not enough free space"),
        "{stderr}"
    );
    assert!(stdout.contains("Vol copy cloned from scratch"));
    assert!(
        stdout.contains(" copy      /var/lib/vireo/images/copy      file   4.00 GiB   4.00 GiB"),
        "{stdout}"
    );
    assert!(stdout.contains("Vol scratch deleted"));
    assert!(
        stdout.contains("Pool images deleted") && stdout.contains("Pool images has been undefined")
    );
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
}

#[test]
fn help_explains_itself() {
    let out = vireo(&["--help"], None);
    let help = text(&out.stdout);
    assert!(help.contains("virsh") && help.contains("vol-create-as") && help.contains("--connect"));
}

/// Runs the same session through virsh's own test driver and ours and
/// compares, command by command, success and the state with its reason.
#[test]
fn same_session_as_virsh() {
    let dir = std::env::temp_dir().join(format!("vireo-virsh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let xml = dir.join("demo.xml");
    std::fs::write(
        &xml,
        "<domain type='test'><name>demo</name><memory unit='MiB'>512</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>",
    )
    .expect("write xml");
    let steps = [
        "start demo",
        "suspend demo",
        "suspend demo",
        "resume demo",
        "resume demo",
        "start demo",
        "reboot demo",
        "shutdown demo",
        "shutdown demo",
        "suspend demo",
        "destroy demo",
        "start demo",
        "destroy demo",
        "undefine demo",
    ];
    // Each step as its own `virsh`/`vireo` session line, followed by a state query.
    let session = |define: String| {
        let mut s = define + "\n";
        for step in steps {
            s.push_str(step);
            s.push_str("\ndomstate demo --reason\n");
        }
        s
    };
    let Some((virsh_out, virsh_err)) = virsh_session(
        "same_session_as_virsh",
        &session(format!("define {}", xml.display())),
    ) else {
        let _ = std::fs::remove_dir_all(dir);
        return;
    };
    let ours = vireo(
        &[],
        Some(&session(format!(
            "define -f {}",
            example("test-domain.yaml")
        ))),
    );
    let states = |out: &str| -> Vec<String> {
        out.lines()
            .map(str::trim)
            .filter(|l| l.contains('(') && !l.contains('\''))
            .map(|l| l.trim_start_matches("virsh # ").to_string())
            .collect()
    };
    let virsh_states = states(&virsh_out);
    let our_states = states(&text(&ours.stdout));
    // The last state query fails in both: the undefined domain is gone.
    assert_eq!(virsh_states.len(), steps.len() - 1, "virsh: {}", virsh_out);
    assert_eq!(our_states, virsh_states, "state and reason after each step");
    // The same steps fail: virsh prints two lines per failure, we print one.
    let virsh_failures = virsh_err.matches("error: Failed to").count()
        + virsh_err.matches("error: Domain is already active").count()
        + virsh_err.matches("error: failed to get domain").count();
    let our_failures = text(&ours.stderr).lines().count();
    assert_eq!(
        our_failures,
        virsh_failures,
        "virsh: {}\nours: {}",
        virsh_err,
        text(&ours.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn vol_upload_and_download_on_a_real_dir_pool() {
    let dir = std::env::temp_dir().join(format!("vireo-cli-vol-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let pool_dir = dir.join("pool");
    let manifest = dir.join("pool.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: p}}\nspec: {{path: {}}}\n",
            pool_dir.display()
        ),
    )
    .expect("manifest");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let input = dir.join("in.img");
    std::fs::write(&input, &content).expect("input");
    let output = dir.join("out.img");
    let uri = format!("qemu:///embed?root={}", dir.join("state").display());
    let session = format!(
        "pool-define -f {}\npool-build p\npool-start p\nvol-create-as p disk 4M\nvol-upload disk {} --pool p\nvol-download disk {} --pool p\nvol-info disk --pool p\n",
        manifest.display(),
        input.display(),
        output.display()
    );
    let out = vireo(&["-c", &uri], Some(&session));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("Uploaded 2.86 MiB into volume 'disk'"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Downloaded 4.00 MiB of volume 'disk'"),
        "{stdout}"
    );
    // The file in the pool is the volume, and the download is its content.
    let stored = std::fs::read(pool_dir.join("disk")).expect("the volume is a file");
    assert_eq!(&stored[..content.len()], &content[..]);
    assert_eq!(std::fs::read(&output).expect("downloaded"), stored);
    // Uploading a missing file fails on one line and changes nothing.
    let out = vireo(
        &[
            "-c",
            &uri,
            "vol-upload",
            "disk",
            "/nonexistent/file",
            "--pool",
            "p",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot open /nonexistent/file"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(pool_dir.join("disk")).expect("still there"),
        stored
    );
    // From standard input ('-'), as `kubectl exec -i` hands it over; a
    // stream shorter than --length says so and changes nothing.
    let piped = "piped content\n".repeat(1000);
    let length = piped.len().to_string();
    let args = |length: &str| -> Vec<String> {
        vec![
            "-c".to_string(),
            uri.clone(),
            "vol-upload".into(),
            "disk".into(),
            "-".into(),
            "--pool".into(),
            "p".into(),
            "--length".into(),
            length.to_string(),
        ]
    };
    let short = args("999999");
    let out = vireo(
        &short.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&piped),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("the stream ended after {length} of 999999 bytes")),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(pool_dir.join("disk")).expect("still there"),
        stored
    );
    let full = args(&length);
    let out = vireo(
        &full.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(&piped),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stored = std::fs::read(pool_dir.join("disk")).expect("the volume");
    assert_eq!(&stored[..piped.len()], piped.as_bytes());
    assert_eq!(stored.len(), 4 << 20, "a shorter raw upload keeps the size");
}

#[test]
fn dhcp_leases_and_domifaddr_read_like_virsh() {
    let net = example("test-network.yaml");
    let dom = example("test-vm-with-disk.yaml");
    let session = format!(
        "net-define -f {net}\nnet-start lab\nnet-dhcp-leases lab\ndefine -f {dom}\nstart web\ndomifaddr web\ndestroy test\ndomifaddr test\n"
    );
    let out = vireo(&[], Some(&session));
    let stdout = text(&out.stdout);
    // The test driver runs no DHCP server: the tables have their headers only.
    assert!(
        stdout.contains("Expiry Time")
            && stdout.contains("MAC address")
            && stdout.contains("IP address"),
        "{stdout}"
    );
    // web's interface on lab: a test domain's goes by its own name (it has
    // no tap), with the MAC derived from its UUID and the address libvirt's
    // test driver would make up (ID 2: 192.168.122.23).
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("net0 "))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("52:54:00:") && line.contains("ipv4         192.168.122.23/24"),
        "an interface row: {stdout}"
    );
    // domifaddr of a domain that does not run says so.
    assert!(
        text(&out.stderr).contains("domain 'test' is not running")
            || stdout.contains("domain 'test' is not running"),
        "{stdout}{}",
        text(&out.stderr)
    );
    let out = vireo(&["net-dhcp-leases", "nowhere"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("network 'nowhere' not found"),
        "{}",
        text(&out.stderr)
    );
}

/// `virsh -c test:///default` with the session on stdin: (stdout, stderr),
/// or None (and a SKIP line, or a failure under CI) without virsh.
fn virsh_session(test: &str, session: &str) -> Option<(String, String)> {
    if Command::new("virsh").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "virsh (libvirt-clients) is missing, and CI installs it: .ci/run is broken"
        );
        eprintln!("SKIP {test}: virsh is not installed (apt-get install libvirt-clients)");
        return None;
    }
    let out = Command::new("virsh")
        .args(["-q", "-c", "test:///default"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(session.as_bytes())?;
            c.wait_with_output()
        })
        .expect("virsh runs");
    Some((text(&out.stdout), text(&out.stderr)))
}

/// The host, network, pool and domain accessors of the same session, in
/// vireo and in virsh on the same default test node: every `Key: value`
/// line they both print agrees (CPU time, which virsh's test driver makes
/// up, and OS type aside), and so do the rows of their lists.
#[test]
fn accessors_and_lists_agree_with_virsh() {
    let session = "uri\nnodeinfo\nlist --all\nlist --inactive\nnet-list --all\nnet-info default\n\
                   pool-list --all --details\npool-info default-pool\n\
                   setmem test 1048576\nsetvcpus test 1\nautostart test\ndominfo test\n\
                   autostart test --disable\nreset test\ndomstate test --reason\ndominfo test\n\
                   vol-create-as default-pool w.img 1M\nvol-info w.img --pool default-pool\n";
    let Some((virsh_out, virsh_err)) =
        virsh_session("accessors_and_lists_agree_with_virsh", session)
    else {
        return;
    };
    let ours = vireo(&[], Some(session));
    let (our_out, our_err) = (text(&ours.stdout), text(&ours.stderr));
    assert!(ours.status.success(), "{our_err}");
    assert!(virsh_err.trim().is_empty(), "virsh failed: {virsh_err}");

    let keys = [
        "CPU model",
        "CPU(s)",
        "CPU frequency",
        "CPU socket(s)",
        "Core(s) per socket",
        "Thread(s) per core",
        "NUMA cell(s)",
        "Memory size",
        "Name",
        "UUID",
        "Id",
        "State",
        "Active",
        "Persistent",
        "Autostart",
        "Bridge",
        "Capacity",
        "Allocation",
        "Available",
        "Max memory",
        "Used memory",
        "Type",
    ];
    let fields = |out: &str| -> Vec<(String, String)> {
        out.lines()
            .map(|l| l.trim_start_matches("virsh # "))
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| keys.contains(&k.trim()))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    };
    let (theirs, mine) = (fields(&virsh_out), fields(&our_out));
    assert!(theirs.len() > 40, "virsh printed its fields: {virsh_out}");
    assert_eq!(mine, theirs, "virsh:\n{virsh_out}\nours:\n{our_out}");
    // After setmem, setvcpus and autostart the domain says so.
    assert!(mine.contains(&("Used memory".into(), "1048576 KiB".into())));
    assert!(mine.contains(&("Autostart".into(), "enable".into())));

    // List rows, word by word (virsh -q prints no headers).
    let rows = |out: &str| -> Vec<Vec<String>> {
        out.lines()
            .map(|l| l.trim_start_matches("virsh # "))
            .filter(|l| {
                let w = l.split_whitespace().next().unwrap_or("");
                ["default", "default-pool", "test", "1"].contains(&w) && !l.contains(':')
            })
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    let (their_rows, my_rows) = (rows(&virsh_out), rows(&our_out));
    assert!(their_rows.len() >= 3, "{virsh_out}");
    assert_eq!(my_rows, their_rows, "virsh:\n{virsh_out}\nours:\n{our_out}");
    // `uri` and the state after a reset, as virsh has them.
    assert!(our_out.lines().any(|l| l.trim() == "test:///default"));
    assert!(our_out.lines().any(|l| l.trim() == "running (unknown)"));
}

/// Migrating from libvirt: what real `virsh dumpxml` prints imports into a
/// manifest (`import-xml`), and `define -f` takes the XML itself; what
/// `vireo dumpxml` prints, real `virsh define` accepts and reports the same
/// memory and vCPUs for.
#[test]
fn libvirt_xml_imports_from_virsh_and_exports_to_it() {
    let dir = std::env::temp_dir().join(format!("vireo-xml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // libvirt's own description of its test domain and default network.
    let Some((domain_xml, _)) = virsh_session(
        "libvirt_xml_imports_from_virsh_and_exports_to_it",
        "dumpxml test\n",
    ) else {
        return;
    };
    let start = domain_xml
        .find("<domain type='test'")
        .expect("a domain element");
    let end = domain_xml.find("</domain>").expect("its end") + "</domain>".len();
    // Renamed, and without its UUID (the test node's own `test` keeps it).
    let domain_xml: String = domain_xml[start..end]
        .replace("<name>test</name>", "<name>from-libvirt</name>")
        .lines()
        .filter(|l| !l.trim_start().starts_with("<uuid>"))
        .collect::<Vec<_>>()
        .join("\n");
    let domain_file = dir.join("test.xml");
    std::fs::write(&domain_file, &domain_xml).expect("write");
    let out = vireo(&["import-xml", &domain_file.display().to_string()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    for want in [
        "kind: Domain",
        "name: from-libvirt",
        "type: test",
        "memory: 8Gi",
        "currentMemory: 2Gi",
        "vcpus: 2",
        "network: default",
        "runStrategy: Manual",
    ] {
        assert!(yaml.contains(want), "{want} not in:\n{yaml}");
    }
    assert!(
        text(&out.stderr).contains("note: domain/devices/disk[0]: the file /guest/diskimage1"),
        "{}",
        text(&out.stderr)
    );
    // The manifest it printed defines as any other; so does the XML itself.
    let manifest = dir.join("from-libvirt.yaml");
    std::fs::write(&manifest, &yaml).expect("write");
    let session = format!(
        "define -f {}\ndominfo from-libvirt\nundefine from-libvirt\ndefine -f {}\ndomstate from-libvirt\n",
        manifest.display(),
        domain_file.display()
    );
    let out = vireo(&[], Some(&session));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("Max memory:     8388608 KiB"), "{stdout}");
    assert_eq!(
        stdout.matches("Domain 'from-libvirt' defined").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("shut off"), "{stdout}");

    // Ours, into virsh: the example domain and a NAT network.
    let out = vireo(
        &[],
        Some(&format!(
            "define -f {}\ndumpxml demo\n",
            example("test-domain.yaml")
        )),
    );
    let xml = text(&out.stdout);
    let xml = &xml[xml.find("<domain").expect("a domain element")..];
    let demo = dir.join("demo.xml");
    std::fs::write(&demo, xml).expect("write");
    let out = vireo(
        &[],
        Some(&format!(
            "net-define -f {}\nnet-dumpxml lab\n",
            example("test-network.yaml")
        )),
    );
    let xml = text(&out.stdout);
    let xml = &xml[xml.find("<network").expect("a network element")..];
    let lab = dir.join("lab.xml");
    std::fs::write(&lab, xml).expect("write");
    let (stdout, stderr) = virsh_session(
        "libvirt_xml_imports_from_virsh_and_exports_to_it",
        &format!(
            "define {}\ndominfo demo\nnet-define {}\nnet-info lab\nnet-dumpxml lab\n",
            demo.display(),
            lab.display()
        ),
    )
    .expect("virsh was there a moment ago");
    assert!(stderr.trim().is_empty(), "virsh refused our XML: {stderr}");
    let field = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l[key.len()..].trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("Max memory:"), "524288 KiB", "{stdout}");
    assert_eq!(field("CPU(s):"), "1", "{stdout}");
    assert_eq!(field("Bridge:"), "vireo-lab0", "{stdout}");
    assert!(
        stdout.contains("<range start='10.77.0.10' end='10.77.0.99'/>")
            && stdout.contains("<forward mode='nat'"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn save_restore_and_managedsave_read_like_virsh() {
    let dir = std::env::temp_dir().join(format!("vireo-cli-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("test.save");
    let garbage = dir.join("garbage.save");
    std::fs::write(&garbage, "not a save file").expect("write");
    let f = file.display();
    let g = garbage.display();
    let script = format!(
        "save test {f}\ndomstate test --reason\nrestore {g}\nrestore {f}\ndomstate test --reason\n\
         managedsave test\ndominfo test\nstart test\ndomstate test --reason\n\
         managedsave test\nmanagedsave-remove test\nmanagedsave-remove test\n"
    );
    let out = vireo(&[], Some(&script));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        format!("Domain 'test' saved to {f}"),
        "shut off (saved)".into(),
        format!("Domain restored from {f}"),
        "running (restored)".into(),
        "Domain 'test' state saved by libvirt".into(),
        "Managed save:   yes".into(),
        "Domain 'test' started".into(),
        "Removed managedsave image for domain 'test'".into(),
        "Domain 'test' has no manage save image; removal skipped".into(),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "no line '{want}' in:\n{stdout}"
        );
    }
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not a Vireo saved-state file"),
        "the garbage file is refused clearly: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn domjobabort_without_a_job_says_so_and_names_the_domain() {
    let out = vireo(&["domjobabort", "test"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("'test'") && err.contains("no job running"),
        "stderr: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let out = vireo(&["domjobabort", "nosuch"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nosuch"),
        "{}",
        text(&out.stderr)
    );
    let help = vireo(&["domjobabort", "--help"], None);
    assert!(
        text(&help.stdout).contains("migration being sent"),
        "{}",
        text(&help.stdout)
    );
}
