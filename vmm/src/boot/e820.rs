//! The memory map the guest is told about (e820 for the Linux boot
//! protocol, the same entries for PVH).

use super::layout::{EBDA_START, HIMEM_START};
use crate::memory::ram_ranges;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One entry of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map for a guest with `mem_bytes` of RAM: conventional memory up to
/// the EBDA, 0x9fc00..1 MiB reserved (ACPI tables live there), then the rest
/// of RAM below the MMIO gap and above 4 GiB.
pub fn entries(mem_bytes: u64) -> Vec<E820Entry> {
    let mut out = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(mem_bytes) {
        let (start, end) = (start.0.max(HIMEM_START), start.0 + len);
        if end > start {
            out.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_covers_ram_without_overlap() {
        for mem in [64u64 << 20, 3 << 30, 5 << 30] {
            let e = entries(mem);
            let ram: u64 = e
                .iter()
                .filter(|x| x.kind == E820_RAM)
                .map(|x| x.size)
                .sum();
            let reserved: u64 = e
                .iter()
                .filter(|x| x.kind == E820_RESERVED)
                .map(|x| x.size)
                .sum();
            assert_eq!(ram + reserved, mem, "{mem}");
            for w in e.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{w:?}");
            }
        }
    }
}
