//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with the sleep control,
//! sleep status and reset registers on the power device at port 0x600),
//! MADT (one local APIC per vCPU and the IOAPIC) and a DSDT describing COM1,
//! the i8042, the virtio-mmio slots in use (`LNRO0005`) and `_S5_`.
//!
//! Built with the acpi_tables crate and written from [`layout::ACPI_START`]
//! up, RSDP first. The area is reserved in the e820 map.

use super::layout;
use crate::memory::GuestMemory;
use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

const OEM_ID: [u8; 6] = *b"VIREO ";
const OEM_REVISION: u32 = 1;
/// Table end must stay below 1 MiB.
const ACPI_END: u64 = layout::HIMEM_START;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u8 = 1;
/// IA-PC boot architecture flags: an 8042 is present, no VGA.
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit below 1 MiB")]
    TooBig,
    #[error("writing ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("{0} vCPUs is more than the MADT's 8-bit APIC IDs allow (max 254)")]
    TooManyVcpus(u32),
}

/// A virtio-mmio device the DSDT announces.
#[derive(Debug, Clone, Copy)]
pub struct VirtioSlot {
    pub index: u32,
}

impl VirtioSlot {
    pub fn base(&self) -> u64 {
        layout::VIRTIO_MMIO_BASE + u64::from(self.index) * layout::VIRTIO_MMIO_SIZE
    }
    pub fn gsi(&self) -> u32 {
        layout::VIRTIO_GSI_BASE + self.index
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn checksum_fix(table: &mut [u8]) {
    if table.len() > 9 {
        table[9] = 0;
        let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        table[9] = 0u8.wrapping_sub(sum);
    }
}

fn power_register() -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::POWER),
    )
}

/// AML already serialised (so builders need not outlive their children).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// CPU hot-plug in AML: `\_SB_.CPUS` (a processor container) with one
/// processor device `Cnnn` per vCPU, whose `_STA` and `_EJ0` go through the
/// hot-plug controller's ports, and a Generic Event Device whose interrupt
/// runs `CSCN`: for each vCPU with a remove request, Notify(Cnnn, 3) (eject
/// request); for each with an insert request, acknowledge it and
/// Notify(Cnnn, 1) (device check). vCPU 0 has no `_EJ0`.
fn cpu_hotplug_aml(vcpus: u32, sb: &mut Vec<u8>) {
    use acpi_tables::aml::{
        Acquire, And, Arg, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Local,
        MethodCall, Notify, OpRegionSpace, Release, Return, Store,
    };
    let csel = aml::Path::new("CSEL");
    let csta = aml::Path::new("CSTA");
    let clck = || aml::Path::new("CLCK");
    let names: Vec<String> = (0..vcpus).map(|i| format!("C{i:03X}")).collect();
    let paths: Vec<aml::Path> = names.iter().map(|n| aml::Path::new(n)).collect();
    let indices: Vec<u32> = (0..vcpus).collect();

    let region = aml::OpRegion::new(
        "PRST".into(),
        OpRegionSpace::SystemIO,
        &layout::CPU_HOTPLUG,
        &4u8,
    );
    let field = aml::Field::new(
        "PRST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Named(*b"CSEL", 8),
            FieldEntry::Named(*b"CSTA", 8),
            FieldEntry::Named(*b"CPEN", 8),
            FieldEntry::Named(*b"CCNT", 8),
        ],
    );
    let mutex = aml::Mutex::new("CLCK".into(), 0);
    let csta_enabled = And::new(&aml::ZERO, &csta, &1u8);
    // CSTS(i): _STA of vCPU i (0xF enabled, 0 ejected).
    let csts = RawAml(bytes(&aml::Method::new(
        "CSTS".into(),
        1,
        true,
        vec![
            &Acquire::new(clck(), 0xffff),
            &Store::new(&csel, &Arg(0)),
            &Store::new(&Local(0), &aml::ZERO),
            &If::new(&csta_enabled, vec![&Store::new(&Local(0), &0xfu8)]),
            &Release::new(clck()),
            &Return::new(&Local(0)),
        ],
    )));
    // CEJ0(i): eject vCPU i.
    let cej0 = RawAml(bytes(&aml::Method::new(
        "CEJ0".into(),
        1,
        true,
        vec![
            &Acquire::new(clck(), 0xffff),
            &Store::new(&csel, &Arg(0)),
            &Store::new(&csta, &8u8),
            &Release::new(clck()),
        ],
    )));
    // CSCN, one block per vCPU.
    let remove_pending = And::new(&aml::ZERO, &Local(0), &4u8);
    let insert_pending = And::new(&aml::ZERO, &Local(0), &2u8);
    let eject_request = 3u8;
    let device_check = 1u8;
    let notifies_remove: Vec<Notify> = paths
        .iter()
        .map(|p| Notify::new(p, &eject_request))
        .collect();
    let notifies_insert: Vec<Notify> = paths
        .iter()
        .map(|p| Notify::new(p, &device_check))
        .collect();
    let ack_insert = Store::new(&csta, &2u8);
    let sels: Vec<Store> = indices.iter().map(|i| Store::new(&csel, i)).collect();
    let read_sta = Store::new(&Local(0), &csta);
    let ifs_remove: Vec<If> = notifies_remove
        .iter()
        .map(|n| If::new(&remove_pending, vec![n]))
        .collect();
    let ifs_insert: Vec<If> = notifies_insert
        .iter()
        .map(|n| If::new(&insert_pending, vec![&ack_insert, n]))
        .collect();
    let acquire = Acquire::new(clck(), 0xffff);
    let release = Release::new(clck());
    let mut scan: Vec<&dyn Aml> = vec![&acquire];
    for i in 0..vcpus as usize {
        scan.push(&sels[i]);
        scan.push(&read_sta);
        scan.push(&ifs_remove[i]);
        scan.push(&ifs_insert[i]);
    }
    scan.push(&release);
    let cscn = aml::Method::new("CSCN".into(), 0, true, scan);

    let hid = aml::Name::new("_HID".into(), &"ACPI0007");
    let stas: Vec<MethodCall> = indices
        .iter()
        .map(|i| MethodCall::new("CSTS".into(), vec![i]))
        .collect();
    let returns: Vec<Return> = stas.iter().map(|c| Return::new(c)).collect();
    let sta_methods: Vec<aml::Method> = returns
        .iter()
        .map(|r| aml::Method::new("_STA".into(), 0, false, vec![r]))
        .collect();
    let ej_calls: Vec<MethodCall> = indices
        .iter()
        .map(|i| MethodCall::new("CEJ0".into(), vec![i]))
        .collect();
    let ej_methods: Vec<aml::Method> = ej_calls
        .iter()
        .map(|c| aml::Method::new("_EJ0".into(), 1, false, vec![c]))
        .collect();
    let uids: Vec<aml::Name> = indices
        .iter()
        .map(|i| aml::Name::new("_UID".into(), i))
        .collect();
    let cpu_devices: Vec<aml::Device> = (0..vcpus as usize)
        .map(|i| {
            let mut children: Vec<&dyn Aml> = vec![&hid, &uids[i], &sta_methods[i]];
            if i > 0 {
                children.push(&ej_methods[i]);
            }
            aml::Device::new(names[i].as_str().into(), children)
        })
        .collect();
    let container_hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let container_cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
    let mut cpus: Vec<&dyn Aml> = vec![
        &container_hid,
        &container_cid,
        &region,
        &field,
        &mutex,
        &csts,
        &cej0,
        &cscn,
    ];
    for d in &cpu_devices {
        cpus.push(d);
    }
    aml::Device::new("CPUS".into(), cpus).to_aml_bytes(sb);

    let scan_call = MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![]);
    aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    layout::CPU_HOTPLUG_GSI,
                )]),
            ),
            &aml::Method::new("_EVT".into(), 1, true, vec![&scan_call]),
        ],
    )
    .to_aml_bytes(sb);
}

/// The DSDT's AML body.
pub fn dsdt_body(virtio: &[VirtioSlot], vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();

    // \_S5_: SLP_TYP 5 for power-off (what the power device decodes).
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    // Devices under \_SB_, each serialised in one statement (the AML
    // builders borrow their children).
    let mut sb = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::COM1, layout::COM1, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, layout::COM1_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    aml::Device::new(
        "PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::I8042, layout::I8042, 1, 1),
                    &aml::IO::new(layout::I8042 + 4, layout::I8042 + 4, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, layout::I8042_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);
    // The pvpanic port, under the _HID QEMU gives it, so Linux's pvpanic
    // driver (pvpanic-mmio, which takes an I/O port resource as well) tells
    // the VMM when the guest kernel panics: libvirt's "crashed".
    aml::Device::new(
        "PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    layout::PVPANIC,
                    layout::PVPANIC,
                    1,
                    1,
                )]),
            ),
            &aml::Name::new("_STA".into(), &0x0Bu8),
        ],
    )
    .to_aml_bytes(&mut sb);
    for slot in virtio {
        // Linux's virtio_mmio driver binds ACPI devices with this _HID.
        let name = format!("V{:03X}", slot.index);
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &slot.index),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(
                            true,
                            slot.base() as u32,
                            layout::VIRTIO_MMIO_SIZE as u32,
                        ),
                        &aml::Interrupt::new(true, true, false, false, slot.gsi()),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut sb);
    }
    cpu_hotplug_aml(vcpus, &mut sb);
    body.extend(aml::Scope::raw("_SB_".into(), sb));
    body
}

/// Writes every table for `vcpus` vCPUs; returns the RSDP's address.
pub fn write(mem: &GuestMemory, vcpus: u32, virtio: &[VirtioSlot]) -> Result<u64, AcpiError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }
    let mut at = layout::ACPI_START;
    let rsdp_addr = at;
    at += Rsdp::len() as u64;
    let mut place = |table: Vec<u8>| -> Result<u64, AcpiError> {
        let addr = (at + 15) & !15;
        let end = addr + table.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooBig);
        }
        mem.write_slice(&table, GuestAddress(addr))?;
        at = end;
        Ok(addr)
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VIREODSD", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(virtio, vcpus));
    let dsdt_addr = place(dsdt.as_slice().to_vec())?;

    let mut fadt = FADTBuilder::new(OEM_ID, *b"VIREOFAC", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = power_register();
    fadt.reset_value = vireo_vmm_devices::legacy::power::RESET_VALUE;
    fadt.sleep_control_reg = power_register();
    fadt.sleep_status_reg = power_register();
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VIREOVMM").into();
    let fadt_addr = place(bytes(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM_ID,
        *b"VIREOAPC",
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC as u32),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC as u32, 0));
    let mut madt = bytes(&madt);
    // The crate leaves the MADT flags at 0; say the 8259s exist.
    if let Some(flags) = madt.get_mut(40) {
        *flags |= MADT_PCAT_COMPAT;
    }
    checksum_fix(&mut madt);
    let madt_addr = place(madt)?;

    let mut xsdt = XSDT::new(OEM_ID, *b"VIREOXSD", OEM_REVISION);
    for t in [fadt_addr, madt_addr] {
        xsdt.add_entry(t);
    }
    let xsdt_addr = place(bytes(&xsdt))?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes(&rsdp), GuestAddress(rsdp_addr))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr))
            .expect("the tables lie inside guest RAM");
        v
    }

    /// The little-endian u64 at `at` (table pointers and addresses).
    fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(v)
    }

    fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let hdr = read(mem, addr, 8);
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        read(mem, addr, len)
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = crate::memory::create(64 << 20).expect("64 MiB of guest RAM");
        let slots = [VirtioSlot { index: 0 }, VirtioSlot { index: 3 }];
        let rsdp = write(&mem, 3, &slots).expect("tables for 3 vCPUs");
        assert_eq!(rsdp, layout::ACPI_START);
        let r = read(&mem, rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt_addr = u64_at(&r, 24);
        let xsdt = table(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let mut seen = Vec::new();
        for chunk in xsdt[36..].chunks(8) {
            let t = table(&mem, u64_at(chunk, 0));
            assert_eq!(sum(&t), 0, "{:?}", &t[..4]);
            seen.push(t);
        }
        let fadt = seen
            .iter()
            .find(|t| &t[..4] == b"FACP")
            .expect("the XSDT lists a FADT");
        let flags = u32::from_le_bytes([fadt[112], fadt[113], fadt[114], fadt[115]]);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        // Reset register: system I/O at the power port, value 1.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), 0x600);
        assert_eq!(fadt[128], 1);
        let dsdt_addr = u64_at(fadt, 140);
        let dsdt = table(&mem, dsdt_addr);
        assert_eq!(sum(&dsdt), 0);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005"));
        assert!(has(b"_S5_"));
        assert!(has(b"V000") && has(b"V003") && !has(b"V001"));
        let madt = seen
            .iter()
            .find(|t| &t[..4] == b"APIC")
            .expect("the XSDT lists a MADT");
        // Walk the MADT's structures: type 0 is a processor local APIC.
        let mut off = 44;
        let mut cpus = 0;
        while off + 2 <= madt.len() {
            if madt[off] == 0 {
                cpus += 1;
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(cpus, 3);
        assert!(write(&mem, 0, &[]).is_err());
    }

    /// ACPICA's disassembler accepts every table (when `iasl` is installed).
    #[test]
    fn iasl_disassembles_the_tables() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("SKIP iasl_disassembles_the_tables: iasl (acpica-tools) not installed");
            return;
        }
        let mem = crate::memory::create(64 << 20).expect("64 MiB of guest RAM");
        let slots = [VirtioSlot { index: 0 }, VirtioSlot { index: 1 }];
        let rsdp = write(&mem, 2, &slots).expect("tables for 2 vCPUs");
        let r = read(&mem, rsdp, 36);
        let xsdt = table(&mem, u64_at(&r, 24));
        let mut tables: Vec<Vec<u8>> = xsdt[36..]
            .chunks(8)
            .map(|c| table(&mem, u64_at(c, 0)))
            .collect();
        let fadt = tables
            .iter()
            .find(|t| &t[..4] == b"FACP")
            .expect("the XSDT lists a FADT")
            .clone();
        tables.push(table(&mem, u64_at(&fadt, 140)));
        let dir = std::env::temp_dir().join(format!("vireo-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        for t in &tables {
            let name = String::from_utf8_lossy(&t[..4]).to_lowercase();
            let path = dir.join(format!("{name}.dat"));
            std::fs::write(&path, t).expect("the table written out");
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&path)
                .current_dir(&dir)
                .output()
                .expect("iasl runs");
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
                .expect("iasl wrote the .dsl");
            match name.as_str() {
                "dsdt" => {
                    for want in [
                        "Name (_S5, Package",
                        "LNRO0005",
                        "PNP0501",
                        "PNP0303",
                        "Device (PEVT)",
                        "\"QEMU0001\"",
                        "0x0505,             // Range Minimum",
                        "0xFEB00200",
                        "0x00000006",
                        "ACPI0010",
                        "ACPI0013",
                        "Method (_EJ0",
                        "Notify (C001, 0x03)",
                        "Notify (C001, One)",
                        "Return (CSTS (One))",
                        "SystemIO, 0x0610",
                        "0x00000017",
                        "\\_SB.CPUS.CSCN ()",
                    ] {
                        assert!(dsl.contains(want), "{want} missing:\n{dsl}");
                    }
                }
                "facp" => {
                    assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}");
                    assert!(
                        !dsl.to_lowercase().contains("checksum is incorrect"),
                        "{dsl}"
                    );
                }
                _ => assert!(!dsl.to_lowercase().contains("incorrect"), "{dsl}"),
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
