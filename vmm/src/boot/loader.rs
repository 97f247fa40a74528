//! Loads the kernel, initrd and command line into guest memory and writes
//! the boot information the kernel's entry point expects (linux-loader does
//! the image parsing).

use super::Entry;
use super::e820::{self, E820Entry};
use super::layout::*;
use crate::memory::GuestMemory;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{ByteValued, Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the kernel image: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel is neither an ELF nor a bzImage")]
    UnknownFormat,
    #[error("loading the kernel: {0}")]
    Kernel(#[from] linux_loader::loader::Error),
    #[error("command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error(
        "initrd of {size} bytes does not fit in guest memory below {limit:#x} above the kernel"
    )]
    InitrdTooBig { size: u64, limit: u64 },
    #[error("writing boot information into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("--elf-entry pvh: the kernel has no PVH (Xen PHYS32_ENTRY) note")]
    NoPvhNote,
    #[error("the memory map has {0} entries, more than the boot protocol carries")]
    TooManyE820(usize),
}

/// What `load` put where.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: Entry,
    pub kernel_load: u64,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const PVH_MAGIC: u32 = 0x336e_c578;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS: u32 = 0x5372_6448;
const LOADER_UNDEFINED: u8 = 0xff;
/// startup_64 sits 0x200 into the protected-mode kernel of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE: u64 = 0x1000;

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: `hvm_start_info` is a `repr(C)` struct of integers whose size (56)
// linux-loader asserts, so it has no padding and every bit pattern is valid.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: `repr(C)` integers only, size 24 asserted by linux-loader: no
// padding, any bit pattern valid.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: `repr(C)` integers only, size 32 asserted by linux-loader: no
// padding, any bit pattern valid.
unsafe impl ByteValued for ModlistEntry {}

/// Which entry of an ELF kernel to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ElfEntry {
    /// PVH if the ELF has the note, else the 64-bit entry.
    #[default]
    Auto,
    /// Always `e_entry` in long mode with a zero page.
    Linux64,
    /// The PVH note's entry; an ELF without one is an error.
    Pvh,
}

/// Loads `kernel` (ELF, PVH ELF or bzImage), `initrd` and `cmdline` into `mem`
/// for a guest of `mem_bytes` RAM, and says how to enter it. Files are read
/// from their start, so the same handles serve a reset.
pub fn load(
    mem: &GuestMemory,
    mem_bytes: u64,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    elf_entry: ElfEntry,
) -> Result<Loaded, LoadError> {
    let mut magic = [0u8; 4];
    kernel.seek(SeekFrom::Start(0))?;
    kernel.read_exact(&mut magic)?;
    kernel.seek(SeekFrom::Start(0))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let is_elf = &magic == ELF_MAGIC;
    let result: KernelLoaderResult = if is_elf {
        Elf::load(mem, None, kernel, himem)?
    } else {
        BzImage::load(mem, None, kernel, himem).map_err(|e| match e {
            linux_loader::loader::Error::Bzimage(_) => LoadError::UnknownFormat,
            other => LoadError::Kernel(other),
        })?
    };

    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE), &cmdline)?;
    let cmdline_len = cmdline.as_cstring()?.as_bytes().len() as u32;

    let low_ram_end = mem_bytes.min(crate::memory::MMIO_GAP_START);
    let initrd_limit = match result.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => {
            low_ram_end.min(u64::from(hdr.initrd_addr_max) + 1)
        }
        _ => low_ram_end,
    };
    let initrd = match initrd {
        Some(f) => Some(load_initrd(mem, f, result.kernel_end, initrd_limit)?),
        None => None,
    };
    let map = e820::entries(mem_bytes);

    let pvh = match (is_elf, result.pvh_boot_cap, elf_entry) {
        (true, PvhBootCapability::PvhEntryPresent(rip), ElfEntry::Auto | ElfEntry::Pvh) => {
            Some(rip)
        }
        (true, _, ElfEntry::Pvh) => return Err(LoadError::NoPvhNote),
        _ => None,
    };
    let entry = match pvh {
        Some(rip) => {
            write_pvh(mem, &map, initrd)?;
            Entry::Pvh {
                rip: rip.0,
                start_info: PVH_START_INFO,
            }
        }
        _ => {
            write_zero_page(mem, &result, &map, initrd, cmdline_len)?;
            let rip = if is_elf {
                result.kernel_load.0
            } else {
                result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
            };
            Entry::Linux64 {
                rip,
                zero_page: ZERO_PAGE,
            }
        }
    };
    Ok(Loaded {
        entry,
        kernel_load: result.kernel_load.0,
        kernel_end: result.kernel_end,
        initrd,
    })
}

/// Puts the initrd as high as it may go, page aligned.
fn load_initrd(
    mem: &GuestMemory,
    f: &mut File,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), LoadError> {
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    let too_big = LoadError::InitrdTooBig { size, limit };
    let addr = limit.checked_sub(size).ok_or(too_big)? & !(PAGE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(LoadError::InitrdTooBig { size, limit });
    }
    let len = usize::try_from(size).map_err(|_| LoadError::InitrdTooBig { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), f, len)?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemory,
    result: &KernelLoaderResult,
    map: &[E820Entry],
    initrd: Option<(u64, u64)>,
    cmdline_len: u32,
) -> Result<(), LoadError> {
    let mut params = boot_params::default();
    match result.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = HDRS;
            params.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = ACPI_START;
    if map.len() > params.e820_table.len() {
        return Err(LoadError::TooManyE820(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))?;
    Ok(())
}

fn write_pvh(
    mem: &GuestMemory,
    map: &[E820Entry],
    initrd: Option<(u64, u64)>,
) -> Result<(), LoadError> {
    let max_entries =
        ((ZERO_PAGE - PVH_MEMMAP) / std::mem::size_of::<MemmapEntry>() as u64) as usize;
    if map.len() > max_entries {
        return Err(LoadError::TooManyE820(map.len()));
    }
    for (i, e) in map.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        });
        let at = PVH_MEMMAP + (i * std::mem::size_of::<MemmapEntry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        rsdp_paddr: ACPI_START,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = ModlistEntry(hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        });
        mem.write_obj(module, GuestAddress(PVH_MODLIST))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_START_INFO))?;
    Ok(())
}
