//! Firmware boot through libvirt XML (issue 21): a disk-booting libvirt
//! domain (UEFI, boot order, a CD-ROM, sata and scsi disks) imports with
//! `vireo import-xml`, noting what does not carry over; the manifest's
//! `vireo dumpxml` is XML that real `virsh define` accepts and reports the
//! same firmware, boot order and disks for.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn run(program: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("VIREO_DEFAULT_URI", "test:///default")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const LIBVIRT_EFI: &str = "<domain type='test'>
  <name>installer</name>
  <memory unit='GiB'>1</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <nvram>/var/lib/libvirt/qemu/nvram/installer_VARS.fd</nvram>
    <boot dev='cdrom'/>
    <boot dev='hd'/>
  </os>
  <devices>
    <disk type='volume' device='disk'>
      <source pool='default' volume='root'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='cdrom'>
      <source pool='default' volume='debian-12.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='default' volume='data'/>
      <target dev='sdb' bus='scsi'/>
    </disk>
  </devices>
</domain>
";

#[test]
fn a_disk_booting_libvirt_domain_round_trips_through_virsh() {
    if Command::new("virsh").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "virsh (libvirt-clients) is missing and CI is set"
        );
        eprintln!("SKIP a_disk_booting_libvirt_domain_round_trips_through_virsh: no virsh");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vireo-fw-xml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let xml_file = dir.join("installer.xml");
    std::fs::write(&xml_file, LIBVIRT_EFI).expect("write");
    let vireo = env!("CARGO_BIN_EXE_vireo");
    let out = run(vireo, &["import-xml", &xml_file.display().to_string()], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    for want in [
        "firmware: efi",
        "- cdrom\n    - hd",
        "device: cdrom",
        "bus: sata",
        "bus: scsi",
        "volume: debian-12\n",
    ] {
        assert!(yaml.contains(want), "{want} not in:\n{yaml}");
    }
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "note: domain/os/nvram: /var/lib/libvirt/qemu/nvram/installer_VARS.fd is not kept"
        ),
        "{stderr}"
    );
    // Defined from the manifest, dumped, and into real virsh.
    let manifest = dir.join("installer.yaml");
    std::fs::write(&manifest, &yaml).expect("write");
    let out = run(
        vireo,
        &[],
        &format!("define -f {}\ndumpxml installer\n", manifest.display()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ours = text(&out.stdout);
    let ours = &ours[ours.find("<domain").expect("a domain element")..];
    let ours_file = dir.join("ours.xml");
    std::fs::write(&ours_file, ours).expect("write");
    let out = run(
        "virsh",
        &["-q", "-c", "test:///default"],
        &format!("define {}\ndumpxml installer\n", ours_file.display()),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stderr.trim().is_empty(),
        "virsh refused our XML: {stderr}\n{ours}"
    );
    for want in [
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>",
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>",
        "<boot dev='cdrom'/>",
        "<boot dev='hd'/>",
        "<disk type='volume' device='cdrom'>",
        "<target dev='sda' bus='sata'/>",
        "<target dev='sdb' bus='scsi'/>",
        "<readonly/>",
    ] {
        assert!(
            stdout.contains(want),
            "{want} not in virsh's dumpxml:\n{stdout}"
        );
    }
    // And what virsh keeps imports to the same boot settings again.
    let start = stdout.find("<domain").expect("virsh's domain");
    let theirs_file = dir.join("theirs.xml");
    std::fs::write(&theirs_file, &stdout[start..]).expect("write");
    let out = run(
        vireo,
        &["import-xml", &theirs_file.display().to_string()],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = text(&out.stdout);
    for want in [
        "firmware: efi",
        "- cdrom\n    - hd",
        "device: cdrom",
        "bus: scsi",
    ] {
        assert!(again.contains(want), "{want} not in:\n{again}");
    }

    // BIOS with per-disk boot order: libvirt's <boot order>.
    let bios = "<domain type='test'><name>old</name><memory>524288</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os><devices><disk type='volume' device='disk'><source pool='default' volume='root'/><target dev='vda' bus='virtio'/><boot order='2'/></disk><disk type='volume' device='cdrom'><source pool='default' volume='tools'/><target dev='sda' bus='sata'/><boot order='1'/></disk></devices></domain>";
    let bios_file = dir.join("old.xml");
    std::fs::write(&bios_file, bios).expect("write");
    let out = run(
        vireo,
        &[],
        &format!("define -f {}\ndumpxml old\n", bios_file.display()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ours = text(&out.stdout);
    let ours = &ours[ours.find("<domain").expect("a domain element")..];
    assert!(ours.contains("<os firmware='bios'>"), "{ours}");
    std::fs::write(&bios_file, ours).expect("write");
    let out = run(
        "virsh",
        &["-q", "-c", "test:///default"],
        &format!("define {}\ndumpxml old\n", bios_file.display()),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stderr.trim().is_empty(),
        "virsh refused our XML: {stderr}\n{ours}"
    );
    assert!(
        stdout.contains("<os firmware='bios'>")
            && stdout.contains("<boot order='1'/>")
            && stdout.contains("<boot order='2'/>"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
