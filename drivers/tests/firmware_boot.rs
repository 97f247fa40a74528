//! Firmware boot on the qemu driver under TCG (issue 21), with volumes of a
//! real dir pool: SeaBIOS and OVMF on the serial console, a blank disk's
//! clear message instead of a silent hang, an EFI Domain's own NVRAM
//! (created at the first start, kept across stop and start, removed with
//! the Domain), and a CD-ROM-first boot from an ISO volume on sata and on
//! scsi. The boots need no guest OS: the ISO carries a 60-byte boot
//! program that prints a marker on the serial port, so each takes seconds.
//!
//! Without `qemu-system-x86_64`, OVMF, xorriso or binutils these tests fail
//! when `CI` is set, and otherwise print a SKIP line and return.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fresh_root, qemu_available, say, yaml};
use vireo_crds::{BootDevice, Disk, DiskBus, DiskDevice, Domain, Firmware, OsSpec, RunStrategy};
use vireo_drivers::qemu::wait_for_console;
use vireo_drivers::{Connection, Lookup, StorageDriver};

const CONSOLE_TIMEOUT: Duration = Duration::from_secs(90);
const CD_MARKER: &str = "VIREO-CDROM-BOOTED";

/// Whether a tool the test needs is here; fails under CI, skips otherwise.
fn have(test: &str, what: &str, ok: bool, package: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {what} is missing and CI is set (scripts/setup installs {package})"
    );
    say(&format!(
        "SKIP {test}: {what} is missing ({package}); not run"
    ));
    false
}

fn tool(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A bootable ISO 9660 image (El Torito, no emulation) whose boot program
/// writes `VIREO-CDROM-BOOTED` to COM1 and halts.
fn boot_iso(dir: &Path) -> PathBuf {
    let tree = dir.join("iso");
    std::fs::create_dir_all(&tree).expect("iso tree");
    let src = dir.join("boot.S");
    std::fs::write(
        &src,
        format!(
            r#".code16
.global _start
_start:
  cli
  call 1f
1:
  pop %si
  add $(msg - 1b), %si
  push %cs
  pop %ds
  mov $0x3f8, %dx
2:
  lodsb
  test %al, %al
  jz 3f
  out %al, (%dx)
  jmp 2b
3:
  hlt
  jmp 3b
msg:
  .asciz "{CD_MARKER}\r\n"
"#
        ),
    )
    .expect("boot.S");
    let obj = dir.join("boot.o");
    let img = tree.join("boot.img");
    let iso = dir.join("cd.iso");
    for (program, args) in [
        (
            "as",
            vec!["--32", "-o", obj.to_str().unwrap(), src.to_str().unwrap()],
        ),
        (
            "ld",
            vec![
                "-m",
                "elf_i386",
                "-Ttext",
                "0",
                "--oformat",
                "binary",
                "-o",
                img.to_str().unwrap(),
                obj.to_str().unwrap(),
            ],
        ),
    ] {
        let out = Command::new(program).args(&args).output().expect(program);
        assert!(out.status.success(), "{program}: {out:?}");
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| f.set_len(2048))
        .expect("pad the boot image");
    let out = Command::new("xorriso")
        .args([
            "-as", "mkisofs", "-quiet", "-V", "VIREOCD", "-b", "boot.img",
        ])
        .args(["-no-emul-boot", "-boot-load-size", "4", "-o"])
        .arg(&iso)
        .arg(&tree)
        .output()
        .expect("xorriso");
    assert!(out.status.success(), "xorriso: {out:?}");
    iso
}

struct Node {
    root: PathBuf,
    conn: Connection,
}

/// The qemu driver on a fresh root, with a dir pool `p` holding a blank
/// raw volume `blank` and the ISO as volume `cd` (found by a refresh, as
/// any file put in a dir pool).
fn node(tag: &str) -> Node {
    let root = fresh_root(tag);
    let (storage, pool_dir) = common::started_pool(&root);
    let blank: vireo_crds::StorageVol = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {name: blank}\nspec: {pool: p, capacity: 64Mi, format: raw}\n",
    );
    storage.create_volume(&blank).expect("blank volume");
    let iso = boot_iso(&root);
    std::fs::copy(&iso, pool_dir.join("cd")).expect("ISO into the pool");
    storage.refresh_pool("p").expect("refresh");
    let info = storage.volume_info("p", "cd").expect("the ISO is a volume");
    assert_eq!(info.format, vireo_crds::VolFormat::Iso, "probed as an ISO");
    let networks = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let conn = vireo_drivers::qemu::open_with(
        &format!("qemu:///embed?root={}", root.display()),
        &format!("/embed?root={}", root.display()),
        networks,
        storage,
    )
    .expect("opens the qemu driver with the dir backend");
    Node { root, conn }
}

fn domain(name: &str, firmware: Firmware, boot: Vec<BootDevice>, disks: Vec<Disk>) -> Domain {
    let mut d: Domain = serde_yaml_ng::from_str(&format!(
        "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {{name: {name}}}\nspec: {{type: qemu, memory: 256Mi, vcpus: 1}}\n"
    ))
    .expect("domain");
    d.spec.os = Some(OsSpec {
        firmware: Some(firmware),
        boot,
        ..Default::default()
    });
    d.spec.devices.disks = disks;
    d.spec.run_strategy = RunStrategy::Manual;
    d
}

fn disk(name: &str, volume: &str, device: DiskDevice, bus: DiskBus) -> Disk {
    Disk {
        name: name.into(),
        volume: volume.into(),
        device,
        bus,
        ..Default::default()
    }
}

impl Node {
    /// Presses the power button and waits for the guest to be shut off.
    fn shut_down(&self, name: &str) {
        self.conn
            .hypervisor()
            .shutdown_domain(name)
            .expect("shutdown");
        vireo_drivers::conformance::wait_for_state(
            &self.conn,
            name,
            vireo_crds::DomainState::Shutoff,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|f| panic!("{f}"));
    }

    fn uuid(&self, name: &str) -> String {
        self.conn
            .hypervisor()
            .lookup_domain(Lookup::Name(name))
            .expect("lookup")
            .uuid
    }
    fn console(&self, name: &str) -> PathBuf {
        self.root
            .join("run")
            .join(self.uuid(name))
            .join("console.log")
    }
    /// Starts `name` and waits for each of `wants` on its console, in turn.
    fn boot(&self, name: &str, wants: &[&str]) -> String {
        let started = Instant::now();
        self.conn.hypervisor().start_domain(name).expect("start");
        let log = self.console(name);
        let mut text = String::new();
        for want in wants {
            text = wait_for_console(&log, want, CONSOLE_TIMEOUT)
                .unwrap_or_else(|t| panic!("{name}: no '{want}' on the console:\n{t}"));
        }
        say(&format!(
            "{name}: {:?} on the console after {:.1} s",
            wants.last(),
            started.elapsed().as_secs_f64()
        ));
        text
    }
    fn destroy(&self, name: &str) {
        self.conn
            .hypervisor()
            .destroy_domain(name)
            .expect("destroy");
        std::fs::write(self.console(name), "").expect("truncate the console log");
    }
}

/// SeaBIOS and OVMF with nothing to boot say so on the serial console; an
/// EFI Domain's NVRAM is its own file under the driver's root, made from
/// OVMF's template at the first start, the same file (with what the
/// firmware wrote into it) after a stop and start, and gone with the
/// Domain.
#[test]
fn a_blank_disk_says_so_and_an_efi_domain_keeps_its_nvram() {
    let test = "a_blank_disk_says_so_and_an_efi_domain_keeps_its_nvram";
    if !qemu_available(test)
        || !have(
            test,
            "OVMF",
            Path::new(vireo_drivers::qemu::command::OVMF_VARS).is_file(),
            "ovmf",
        )
        || !have(test, "xorriso", tool("xorriso"), "xorriso")
        || !have(test, "as and ld", tool("as") && tool("ld"), "binutils")
    {
        return;
    }
    let node = node("fw-blank");
    let hv = node.conn.hypervisor();
    let blank = || vec![disk("vda", "blank", DiskDevice::Disk, DiskBus::Virtio)];

    // SeaBIOS: its banner, the attempt, and the verdict, on the serial port.
    hv.define_domain(&domain("bios-blank", Firmware::Bios, vec![], blank()))
        .expect("define");
    let text = node.boot(
        "bios-blank",
        &[
            "SeaBIOS (version",
            "Booting from Hard Disk",
            "No bootable device.",
        ],
    );
    assert!(text.contains("Boot failed: not a bootable disk"), "{text}");
    // The driver reads the verdict off the console (the agent's
    // Bootable=False condition and Warning event come from this).
    let problem = hv.boot_problem("bios-blank").expect("boot_problem");
    assert!(
        problem
            .as_deref()
            .is_some_and(|p| p.contains("SeaBIOS found no bootable device")),
        "{problem:?}"
    );
    node.destroy("bios-blank");
    assert_eq!(hv.boot_problem("bios-blank").expect("stopped"), None);
    hv.undefine_domain("bios-blank").expect("undefine");

    // OVMF: the failed boot option on the console, then its shell.
    hv.define_domain(&domain("efi-blank", Firmware::Efi, vec![], blank()))
        .expect("define");
    let nvram = node
        .root
        .join("nvram")
        .join(format!("{}_VARS.fd", node.uuid("efi-blank")));
    assert!(!nvram.exists(), "no NVRAM before the first start");
    node.boot("efi-blank", &["BdsDxe: failed to load Boot0001", "Shell>"]);
    let problem = hv.boot_problem("efi-blank").expect("boot_problem");
    assert!(
        problem.as_deref().is_some_and(|p| p.contains("UEFI shell")),
        "{problem:?}"
    );
    let template = std::fs::read(vireo_drivers::qemu::command::OVMF_VARS).expect("template");
    let first = std::fs::read(&nvram).expect("the Domain's NVRAM after its first start");
    assert_eq!(first.len(), template.len());
    assert_ne!(
        first, template,
        "OVMF wrote its boot options into the Domain's own store"
    );
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(&nvram).expect("nvram").ino();
    node.destroy("efi-blank");
    assert_eq!(
        std::fs::read(&nvram).expect("kept while stopped"),
        first,
        "stopping keeps the store as the firmware left it"
    );
    // A second start uses the same file: not a fresh copy of the template.
    node.boot("efi-blank", &["Shell>"]);
    assert_eq!(std::fs::metadata(&nvram).expect("nvram").ino(), inode);
    assert_ne!(std::fs::read(&nvram).expect("nvram"), template);
    // The command line names it as the second flash chip.
    let uuid = node.uuid("efi-blank");
    let pid: u32 = std::fs::read_to_string(node.root.join("run").join(&uuid).join("pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(&format!(
            "filename={},node-name=ovmf-vars-file",
            nvram.display()
        )) && cmdline.contains("pflash1=ovmf-vars"),
        "{cmdline}"
    );
    node.destroy("efi-blank");
    hv.undefine_domain("efi-blank").expect("undefine");
    assert!(!nvram.exists(), "undefine removes the NVRAM");
    let _ = std::fs::remove_dir_all(&node.root);
}

/// `boot: [cdrom, hd]` boots the ISO volume on the sata CD-ROM before the
/// (blank) disk; per-disk `bootOrder` does the same for a scsi CD-ROM; so
/// does a libvirt domain XML with `<boot dev='cdrom'/>`, imported.
#[test]
fn a_cdrom_first_boots_from_an_iso_volume() {
    let test = "a_cdrom_first_boots_from_an_iso_volume";
    if !qemu_available(test)
        || !have(test, "xorriso", tool("xorriso"), "xorriso")
        || !have(test, "as and ld", tool("as") && tool("ld"), "binutils")
    {
        return;
    }
    let node = node("fw-cd");
    let hv = node.conn.hypervisor();
    hv.define_domain(&domain(
        "cd-sata",
        Firmware::Bios,
        vec![BootDevice::Cdrom, BootDevice::Hd],
        vec![
            disk("vda", "blank", DiskDevice::Disk, DiskBus::Virtio),
            disk("sda", "cd", DiskDevice::Cdrom, DiskBus::Sata),
        ],
    ))
    .expect("define");
    let text = node.boot("cd-sata", &["Booting from DVD/CD", CD_MARKER]);
    assert!(!text.contains("Booting from Hard Disk"), "{text}");
    assert_eq!(
        hv.boot_problem("cd-sata").expect("boot_problem"),
        None,
        "a CD-ROM that boots is no boot problem"
    );
    node.destroy("cd-sata");

    let mut cd = disk("sda", "cd", DiskDevice::Cdrom, DiskBus::Scsi);
    cd.boot_order = Some(1);
    let mut vda = disk("vda", "blank", DiskDevice::Disk, DiskBus::Virtio);
    vda.boot_order = Some(2);
    hv.define_domain(&domain("cd-scsi", Firmware::Bios, vec![], vec![vda, cd]))
        .expect("define");
    node.boot("cd-scsi", &["Booting from DVD/CD", CD_MARKER]);
    node.destroy("cd-scsi");

    // A libvirt domain without a kernel, imported: <boot dev>, a disk and
    // a CD-ROM carry over and it runs as libvirt would run it (BIOS).
    let xml = "<domain type='qemu'><name>from-libvirt</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
        <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='cdrom'/><boot dev='hd'/></os>\
        <devices><disk type='volume' device='disk'><source pool='p' volume='blank'/><target dev='vda' bus='virtio'/></disk>\
        <disk type='volume' device='cdrom'><source pool='p' volume='cd'/><target dev='hdc' bus='ide'/><readonly/></disk></devices></domain>";
    let imported = vireo_crds::libvirt_xml::from_xml(xml, &Default::default()).expect("imports");
    let vireo_crds::Manifest::Domain(d) = imported.manifest else {
        panic!("a Domain");
    };
    assert_eq!(
        d.spec.os.as_ref().and_then(|o| o.firmware),
        Some(Firmware::Bios)
    );
    hv.define_domain(&d).expect("define the imported domain");
    node.boot("from-libvirt", &["Booting from DVD/CD", CD_MARKER]);
    node.destroy("from-libvirt");
    for name in ["cd-sata", "cd-scsi", "from-libvirt"] {
        hv.undefine_domain(name).expect("undefine");
    }
    let _ = std::fs::remove_dir_all(&node.root);
}

/// `secureBoot: true` runs OVMF's secure-boot build (q35 with SMM) on a
/// store made from the template with Microsoft's keys: it refuses to run
/// its own unsigned shell ("Security Violation"), which the plain build
/// starts at once.
#[test]
fn secure_boot_refuses_an_unsigned_loader() {
    let test = "secure_boot_refuses_an_unsigned_loader";
    if !qemu_available(test)
        || !have(
            test,
            "OVMF's secure-boot build",
            Path::new(vireo_drivers::qemu::command::OVMF_CODE_SECURE).is_file(),
            "ovmf",
        )
        || !have(test, "xorriso", tool("xorriso"), "xorriso")
        || !have(test, "as and ld", tool("as") && tool("ld"), "binutils")
    {
        return;
    }
    let node = node("fw-sb");
    let hv = node.conn.hypervisor();
    let mut d = domain(
        "sb",
        Firmware::Efi,
        vec![],
        vec![disk("vda", "blank", DiskDevice::Disk, DiskBus::Virtio)],
    );
    if let Some(os) = d.spec.os.as_mut() {
        os.secure_boot = true;
    }
    hv.define_domain(&d).expect("define");
    let text = node.boot("sb", &["Security Violation"]);
    assert!(text.contains("EFI Internal Shell"), "{text}");
    let nvram = node
        .root
        .join("nvram")
        .join(format!("{}_VARS.fd", node.uuid("sb")));
    let template =
        std::fs::metadata(vireo_drivers::qemu::command::OVMF_VARS_SECURE).expect("template");
    assert_eq!(
        std::fs::metadata(&nvram).expect("nvram").len(),
        template.len()
    );
    node.destroy("sb");
    hv.undefine_domain("sb").expect("undefine");
    assert!(!nvram.exists());
    let _ = std::fs::remove_dir_all(&node.root);
}

// ---------------------------------------------------------------------------
// The Debian disk guest (scripts/debian-image.sh), in a network namespace
// ---------------------------------------------------------------------------

const DEBIAN_READY: &str = "VIREO-DEBIAN-READY 10.73.0.";
const DEBIAN_TIMEOUT: Duration = Duration::from_secs(400);

fn find_program(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// A network namespace of the test's own, deleted (with what runs in it)
/// when dropped; the calling thread enters it.
struct Netns(String);

impl Netns {
    fn enter(tag: &str) -> Self {
        let id = format!("{:x}", std::process::id());
        let name = format!("vireo-test-{tag}-{id}");
        let ip = find_program("ip").expect("ip");
        let ok = |args: &[&str]| {
            let out = Command::new(&ip).args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        let _ = Command::new(&ip).args(["netns", "del", &name]).output();
        ok(&["netns", "add", &name]);
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        let f = std::fs::File::open(format!("/run/netns/{name}")).expect("the namespace");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace descriptor we own; it changes only
        // the calling thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ip = find_program("ip").unwrap_or_else(|| "ip".into());
        if let Ok(out) = Command::new(&ip).args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) touches no memory; these processes
                    // were started by this test inside its own namespace.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = Command::new(&ip).args(["netns", "del", &self.0]).status();
    }
}

/// The Debian cloud disk boots with `firmware: bios` and with
/// `firmware: efi` (at once, on one isolated Vireo network with DHCP) to
/// its READY marker with a leased address and a `login:` prompt on the
/// serial console, each on its own qcow2 overlay of the image; the EFI
/// guest's NVRAM holds what OVMF wrote and the EFI variable the guest
/// wrote (live, in OVMF's store format); after a guest shutdown and a start
/// it is the same file, and the guest reads its variable back and counts
/// the boot on top. The BIOS guest reads a cloud-init NoCloud seed made by
/// the node (host name, a user, a command).
#[test]
fn the_debian_disk_boots_with_bios_and_efi() {
    let test = "the_debian_disk_boots_with_bios_and_efi";
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let script = common::repo_root().join("scripts/debian-image.sh");
    if !qemu_available(test)
        || !have(test, "root", root_user, "run as root")
        || !have(
            test,
            "ip, nft and dnsmasq",
            ["ip", "nft", "dnsmasq"]
                .iter()
                .all(|p| find_program(p).is_some()),
            "iproute2, nftables, dnsmasq-base",
        )
        || !have(
            test,
            "OVMF",
            Path::new(vireo_drivers::qemu::command::OVMF_VARS).is_file(),
            "ovmf",
        )
        || !have(
            test,
            "scripts/debian-image.sh",
            script.is_file(),
            "the repo's script",
        )
    {
        return;
    }
    // Built (or found in its cache) before entering the namespace.
    let out = Command::new(&script)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("runs scripts/debian-image.sh");
    assert!(
        out.status.success(),
        "scripts/debian-image.sh: {}",
        out.status
    );
    let image = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("the image directory")
            .trim(),
    )
    .join("debian.qcow2");
    let _ns = Netns::enter("deb");

    let root = fresh_root("fw-debian");
    let (storage, pool_dir) = common::started_pool(&root);
    std::fs::copy(&image, pool_dir.join("debian")).expect("the image into the pool");
    storage.refresh_pool("p").expect("refresh");
    for name in ["bios-root", "efi-root"] {
        let vol: vireo_crds::StorageVol = yaml(&format!(
            "apiVersion: vireo.dev/v1alpha1\nkind: StorageVol\nmetadata: {{name: {name}}}\nspec: {{pool: p, capacity: 3Gi, format: qcow2, source: {{clone: {{volume: debian, overlay: true}}}}}}\n"
        ));
        storage.create_volume(&vol).expect("overlay volume");
    }
    let networks = Arc::new(
        vireo_drivers::bridge::BridgeDriver::open(&root.join("net")).expect("network driver"),
    );
    let net: vireo_crds::Network = yaml(
        "apiVersion: vireo.dev/v1alpha1\nkind: Network\nmetadata: {name: deb}\nspec: {forwardMode: isolated, ip: {address: 10.73.0.1, prefix: 24, dhcp: {ranges: [{start: 10.73.0.100, end: 10.73.0.120}]}}}\n",
    );
    use vireo_drivers::NetworkDriver;
    networks.define_network(&net).expect("define network");
    networks.start_network("deb").expect("start network");
    let conn = vireo_drivers::qemu::open_with(
        &format!("qemu:///embed?root={}", root.display()),
        &format!("/embed?root={}", root.display()),
        networks.clone(),
        storage,
    )
    .expect("opens the qemu driver");
    let node = Node { root, conn };
    let hv = node.conn.hypervisor();
    for (name, firmware) in [("deb-bios", Firmware::Bios), ("deb-efi", Firmware::Efi)] {
        let mut d = domain(
            name,
            firmware,
            vec![],
            vec![disk(
                "vda",
                &format!("{}-root", firmware.as_str()),
                DiskDevice::Disk,
                DiskBus::Virtio,
            )],
        );
        d.spec.memory = k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into());
        d.spec.devices.interfaces = vec![vireo_crds::Interface {
            name: "net0".into(),
            network: "deb".into(),
            mac: None,
        }];
        if firmware == Firmware::Bios {
            // cloud-init, for real: a NoCloud seed the node makes, read by
            // the guest's cloud-init (host name, a user with an SSH key,
            // a static address beside DHCP, a command).
            d.spec.cloud_init = Some(vireo_crds::CloudInit {
                hostname: Some("vireo-seeded".into()),
                user_data: Some(CLOUD_CONFIG.into()),
                network_config: Some(NETWORK_CONFIG.into()),
                ..Default::default()
            });
        }
        hv.define_domain(&d).expect("define");
    }
    let started = Instant::now();
    for name in ["deb-bios", "deb-efi"] {
        hv.start_domain(name).expect("start");
    }
    let wait = |name: &str, want: &str| {
        wait_for_console(&node.console(name), want, DEBIAN_TIMEOUT)
            .unwrap_or_else(|t| panic!("{name}: no '{want}' on the console:\n{t}"))
    };
    let bios = wait("deb-bios", "SeaBIOS (version");
    assert!(!bios.contains("No bootable device"), "{bios}");
    let efi_first = wait("deb-efi", "login:");
    say(&format!(
        "deb-efi: login prompt after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let bios = wait("deb-bios", "vireo-seeded login:");
    say(&format!(
        "deb-bios: login prompt after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    for (name, text) in [("deb-bios", &bios), ("deb-efi", &efi_first)] {
        let text = if text.contains(DEBIAN_READY) {
            text.clone()
        } else {
            wait(name, DEBIAN_READY)
        };
        assert!(
            text.contains("Linux version"),
            "{name}: the kernel's lines:\n{text}"
        );
    }
    let efi_first = wait("deb-efi", DEBIAN_READY);
    assert!(!efi_first.contains("SeaBIOS"), "{efi_first}");
    // The guest counted its first EFI boot in an EFI variable of its own.
    assert!(
        efi_first.contains("VIREO-EFI-BOOTS previous=none now=1"),
        "{efi_first}"
    );
    assert!(!bios.contains("VIREO-EFI-BOOTS"), "{bios}");
    // cloud-init ran the seed's user-data: its command wrote on the console
    // as the user it created.
    let seeded = wait("deb-bios", "VIREO-CLOUD-INIT user=vireo");
    assert!(
        seeded.contains(
            "VIREO-CLOUD-INIT user=vireo host=vireo-seeded key=vireo-test-key static=10.73.0.50/24"
        ),
        "{seeded}"
    );
    assert!(
        !efi_first.contains("VIREO-CLOUD-INIT"),
        "no seed, no user-data"
    );
    // The addresses are leases of the Vireo network.
    let leases = networks.dhcp_leases("deb").expect("leases");
    assert_eq!(leases.len(), 2, "{leases:?}");
    // Debian's own qemu-guest-agent answers on the port every qemu guest
    // gets: the host name cloud-init set, the OS, and the address the
    // guest has is the one the network leased to its MAC (domifaddr
    // --source agent against --source lease).
    let agent_start = Instant::now();
    let info = loop {
        match hv.guest_info("deb-bios") {
            Ok(info) if !info.interfaces.is_empty() => break info,
            other => {
                assert!(
                    agent_start.elapsed() < Duration::from_secs(120),
                    "qemu-guest-agent of deb-bios did not answer: {other:?}"
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    say(&format!(
        "deb-bios: qemu-ga {} answered {:.1} s after the login prompt",
        info.agent_version.clone().unwrap_or_default(),
        agent_start.elapsed().as_secs_f64()
    ));
    assert_eq!(info.hostname.as_deref(), Some("vireo-seeded"), "{info:?}");
    assert_eq!(
        info.os.as_ref().and_then(|o| o.id.as_deref()),
        Some("debian"),
        "{info:?}"
    );
    let eth0 = info
        .interfaces
        .iter()
        .find(|i| i.name == "eth0")
        .unwrap_or_else(|| panic!("eth0 in {:?}", info.interfaces));
    let mac = eth0.mac.clone().expect("eth0's MAC");
    let lease = leases
        .iter()
        .find(|l| l.mac == mac)
        .unwrap_or_else(|| panic!("a lease for {mac}: {leases:?}"));
    assert!(
        eth0.addresses
            .contains(&format!("{}/{}", lease.ip, lease.prefix)),
        "the guest's own eth0 {:?} has its lease {}/{}",
        eth0.addresses,
        lease.ip,
        lease.prefix
    );
    assert!(
        eth0.addresses.iter().any(|a| a == "10.73.0.50/24"),
        "and the static address of spec.cloudInit.networkConfig: {:?}",
        eth0.addresses
    );
    assert!(
        info.filesystems.iter().any(|f| f.mountpoint == "/"),
        "{:?}",
        info.filesystems
    );
    // And it powers the guest off when asked: shut off (shutdown).
    hv.guest_agent_shutdown("deb-bios", false)
        .expect("shutdown --mode agent");
    let reason = vireo_drivers::conformance::wait_for_state(
        &node.conn,
        "deb-bios",
        vireo_crds::DomainState::Shutoff,
        Duration::from_secs(120),
    )
    .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(reason, vireo_crds::DomainReason::Shutdown);

    // EFI: the store is the Domain's own file, kept across stop and start.
    let nvram = node
        .root
        .join("nvram")
        .join(format!("{}_VARS.fd", node.uuid("deb-efi")));
    let template = std::fs::read(vireo_drivers::qemu::command::OVMF_VARS).expect("template");
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(&nvram).expect("nvram").ino();
    node.shut_down("deb-efi");
    let kept = std::fs::read(&nvram).expect("kept while stopped");
    assert_ne!(
        kept, template,
        "the firmware's writes are in the Domain's store"
    );
    assert_eq!(
        live_variables(&kept, GUEST_VARIABLE),
        vec![b"1".to_vec()],
        "the variable the guest wrote is in the Domain's store, live, once"
    );
    std::fs::write(node.console("deb-efi"), "").expect("truncate");
    let again = Instant::now();
    hv.start_domain("deb-efi").expect("start again");
    // The guest again, through the kept store: it reads the variable it
    // wrote before the stop, and counts this boot on top.
    let second = wait("deb-efi", "VIREO-EFI-BOOTS previous=");
    say(&format!(
        "deb-efi: userspace again after {:.1} s",
        again.elapsed().as_secs_f64()
    ));
    assert!(
        second.contains("VIREO-EFI-BOOTS previous=1 now=2"),
        "the guest saw its own variable after the stop and start:\n{second}"
    );
    assert_eq!(std::fs::metadata(&nvram).expect("nvram").ino(), inode);
    // On the host: the store holds the new value, live, once (the old
    // record retired).
    node.shut_down("deb-efi");
    assert_eq!(
        live_variables(&std::fs::read(&nvram).expect("nvram"), GUEST_VARIABLE),
        vec![b"2".to_vec()],
        "the guest's second write is the one live record"
    );
    for name in ["deb-bios", "deb-efi"] {
        hv.undefine_domain(name).expect("undefine");
    }
    assert!(!nvram.exists());
    let _ = networks.destroy_network("deb");
    let _ = std::fs::remove_dir_all(&node.root);
}

/// The user-data of the BIOS Debian guest: a user, and a command whose
/// output on the serial console proves both ran.
const CLOUD_CONFIG: &str = "#cloud-config\nusers:\n  - name: vireo\n    shell: /bin/sh\n    ssh_authorized_keys:\n      - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFZpcmVvIHRlc3Qga2V5LCBub3QgYSByZWFsIG9uZQ vireo-test-key\nruncmd:\n  - [sh, -c, 'echo \"VIREO-CLOUD-INIT user=$(id -un vireo) host=$(hostname) key=$(cut -d\" \" -f3 /home/vireo/.ssh/authorized_keys) static=$(ip -4 -o addr show eth0 | grep -o 10.73.0.50/24)\" > /dev/ttyS0']\n";

/// cloud-init network config (version 2): DHCP on eth0 as the image does,
/// and a static address beside it.
const NETWORK_CONFIG: &str =
    "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n    addresses: [10.73.0.50/24]\n";

/// The EFI variable the Debian image's `vireo-ready` writes at each EFI boot.
const GUEST_VARIABLE: &str = "VireoTest";

/// The data of each live record named `name` in an OVMF variable store
/// (authenticated variables: a 60-byte header of StartId 0x55AA, State,
/// Reserved, Attributes, MonotonicCount, TimeStamp, PubKeyIndex, NameSize,
/// DataSize and VendorGuid, then the UTF-16LE name and the data). OVMF
/// appends a record per write and clears State bits to retire old ones: a
/// record is live while its State is VAR_ADDED (0x3F).
fn live_variables(store: &[u8], name: &str) -> Vec<Vec<u8>> {
    let utf16: Vec<u8> = name
        .encode_utf16()
        .chain([0])
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let u32_at = |at: usize| {
        store
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = store[from..]
        .windows(utf16.len())
        .position(|w| w == utf16.as_slice())
    {
        let at = from + found;
        from = at + 1;
        let Some(header) = at.checked_sub(60) else {
            continue;
        };
        let (Some(name_size), Some(data_size)) = (u32_at(header + 36), u32_at(header + 40)) else {
            continue;
        };
        if store[header..header + 2] != [0xAA, 0x55] || name_size != utf16.len() {
            continue;
        }
        if store[header + 2] == 0x3F {
            let data = at + name_size;
            if let Some(d) = store.get(data..data + data_size) {
                out.push(d.to_vec());
            }
        }
    }
    out
}
