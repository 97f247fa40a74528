//! vireo-vmm's snapshot file: a paused machine's whole state, from which a
//! new process carries on without booting (docs/save-restore.md,
//! "vireo-vmm's snapshot").
//!
//! ```text
//! offset 0   8 bytes  magic "VIREOVMM"
//! offset 8   4 bytes  format version (1), little endian
//! offset 12  4 bytes  0
//! offset 16  8 bytes  body length B
//! offset 24  4 bytes  CRC-32 (zlib's) of the body
//! offset 28  4 bytes  0
//! offset 32  B bytes  the body:
//!            4 bytes  length S of the state (at most 16 MiB)
//!            S bytes  the state: JSON ([`SnapshotState`]: machine config,
//!                     vCPUs, VM, devices)
//!            then memory runs, each: 8 bytes guest-physical address,
//!                     8 bytes length (a non-zero multiple of 4096), the bytes;
//!                     ended by address 2^64-1, length 0. Pages that are all
//!                     zeros are left out (a restored machine starts zeroed).
//! ```
//!
//! The writer makes no copy of guest memory: it walks RAM once to find the
//! non-zero pages, once for the checksum, once to write. The reader checks
//! the header, the length against the file and the checksum before it
//! parses anything, bounds every length by what is left of the body, and
//! checks every memory run against the RAM the saved config describes, so a
//! damaged or hostile file is refused with one line saying why and never
//! makes it allocate more than the state's 16 MiB.

pub mod crc32;

use crate::memory::{GuestMemory, ram_ranges};
use crate::vcpu::state::VcpuState;
use crc32::Crc32;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Seek, SeekFrom, Write};
use vireo_vmm_devices::snapshot::{
    CpuHotplugSnapshot, I8042Snapshot, SerialSnapshot, TransportState,
};
use vm_memory::{Bytes, GuestAddress};

/// The file's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"VIREOVMM";
/// The format this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the body.
pub const HEADER_LEN: u64 = 32;
/// Largest state section accepted.
pub const MAX_STATE: u32 = 16 << 20;
/// Guest page size: the unit of memory runs.
pub const PAGE: u64 = 4096;
/// Largest guest RAM a snapshot may describe (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs a snapshot may describe.
pub const MAX_VCPUS: u32 = 254;
const END: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a vireo-vmm snapshot (bad magic)")]
    Magic,
    #[error("snapshot format version {0}; this vireo-vmm reads version {VERSION}")]
    Version(u32),
    #[error("snapshot truncated: {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    Short(u64),
    #[error(
        "snapshot truncated or extended: the header says {expected} body bytes, the file has {found}"
    )]
    Size { expected: u64, found: u64 },
    #[error("snapshot damaged: checksum {found:#010x}, the header says {expected:#010x}")]
    Checksum { expected: u32, found: u32 },
    #[error("snapshot malformed: {0}")]
    Malformed(String),
    #[error("snapshot does not fit this machine: {0}")]
    Mismatch(String),
    #[error("snapshot I/O: {0}")]
    Io(#[from] io::Error),
    #[error("snapshot guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn malformed(msg: impl Into<String>) -> SnapshotError {
    SnapshotError::Malformed(msg.into())
}

/// What the machine was built from; a restore must be given the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The virtio device of each slot, in slot order (`virtio-blk`, ...).
    pub devices: Vec<String>,
}

/// The in-kernel interrupt controllers, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK`, when this KVM gives it.
    pub clock: Option<kvm_clock_data>,
}

/// Every device model's own state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialSnapshot,
    pub i8042: I8042Snapshot,
    pub cpu_hotplug: CpuHotplugSnapshot,
    /// One per virtio-mmio slot, in slot order.
    pub virtio: Vec<TransportState>,
    pub boot_time_us: Option<u64>,
}

/// The state section of the file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub config: MachineConfig,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DeviceStates,
}

impl SnapshotState {
    /// Checks what does not depend on the machine it goes into.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let c = &self.config;
        if c.memory_bytes < 16 << 20
            || c.memory_bytes > MAX_MEMORY
            || !c.memory_bytes.is_multiple_of(PAGE)
        {
            return Err(malformed(format!("memory size {} bytes", c.memory_bytes)));
        }
        if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
            return Err(malformed(format!("{} vCPUs", c.vcpus)));
        }
        if self.vcpus.len() != c.vcpus as usize {
            return Err(malformed(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                c.vcpus
            )));
        }
        if self
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| v.index as usize != i)
        {
            return Err(malformed("vCPU states out of order"));
        }
        if self.devices.virtio.len() != c.devices.len() {
            return Err(malformed(format!(
                "{} virtio device states for {} devices",
                self.devices.virtio.len(),
                c.devices.len()
            )));
        }
        if self.vm.irqchips.len() != 3 {
            return Err(malformed(format!(
                "{} interrupt controllers (PIC, PIC, IOAPIC expected)",
                self.vm.irqchips.len()
            )));
        }
        Ok(())
    }
}

/// A memory run found in the file: where it goes, how long, where its
/// bytes are in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRun {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// A checked snapshot: its state and where its memory is.
#[derive(Debug)]
pub struct Parsed {
    pub state: SnapshotState,
    pub runs: Vec<MemoryRun>,
}

impl Parsed {
    /// Bytes of guest memory the file holds.
    pub fn memory_bytes_stored(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

fn zero_page(p: &[u8]) -> bool {
    p.chunks_exact(8)
        .all(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

/// The runs of non-zero pages of guest RAM.
fn nonzero_runs(mem: &GuestMemory, memory_bytes: u64) -> Result<Vec<(u64, u64)>, SnapshotError> {
    const CHUNK: u64 = 1 << 20;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, len) in ram_ranges(memory_bytes) {
        let mut off = 0;
        while off < len {
            let n = CHUNK.min(len - off);
            let slice = &mut buf[..n as usize];
            mem.read_slice(slice, GuestAddress(start.0 + off))?;
            for (i, page) in slice.chunks(PAGE as usize).enumerate() {
                if zero_page(page) {
                    continue;
                }
                let gpa = start.0 + off + i as u64 * PAGE;
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == gpa => *l += page.len() as u64,
                    _ => runs.push((gpa, page.len() as u64)),
                }
            }
            off += n;
        }
    }
    Ok(runs)
}

/// Streams the body (state, then the runs) into `f`, a piece at a time.
fn for_each_body_piece(
    state: &[u8],
    runs: &[(u64, u64)],
    mem: &GuestMemory,
    mut f: impl FnMut(&[u8]) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    const CHUNK: u64 = 1 << 20;
    let len = u32::try_from(state.len()).map_err(|_| malformed("state too large"))?;
    f(&len.to_le_bytes())?;
    f(state)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for &(gpa, len) in runs {
        f(&gpa.to_le_bytes())?;
        f(&len.to_le_bytes())?;
        let mut off = 0;
        while off < len {
            let n = CHUNK.min(len - off);
            let slice = &mut buf[..n as usize];
            mem.read_slice(slice, GuestAddress(gpa + off))?;
            f(slice)?;
            off += n;
        }
    }
    f(&END.to_le_bytes())?;
    f(&0u64.to_le_bytes())
}

/// A snapshot ready to be written: its header is known before any byte of
/// it goes out, so it can be streamed (over a socket) without a copy.
pub struct Prepared<'a> {
    state: Vec<u8>,
    runs: Vec<(u64, u64)>,
    mem: &'a GuestMemory,
    body_len: u64,
    crc: u32,
}

impl<'a> Prepared<'a> {
    /// Serializes `state` and measures and checksums the body.
    pub fn new(state: &SnapshotState, mem: &'a GuestMemory) -> Result<Self, SnapshotError> {
        let json = serde_json::to_vec(state).map_err(|e| malformed(e.to_string()))?;
        if json.len() > MAX_STATE as usize {
            return Err(malformed(format!("state of {} bytes", json.len())));
        }
        let runs = nonzero_runs(mem, state.config.memory_bytes)?;
        let mut crc = Crc32::new();
        let mut body_len = 0u64;
        for_each_body_piece(&json, &runs, mem, |p| {
            crc.update(p);
            body_len += p.len() as u64;
            Ok(())
        })?;
        Ok(Prepared {
            state: json,
            runs,
            mem,
            body_len,
            crc: crc.finish(),
        })
    }

    /// Bytes of the whole file.
    pub fn total_len(&self) -> u64 {
        HEADER_LEN + self.body_len
    }

    /// Bytes of guest memory stored.
    pub fn memory_stored(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// Writes the file to `out`.
    pub fn write_to(&self, out: &mut impl Write) -> Result<(), SnapshotError> {
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&self.body_len.to_le_bytes());
        header[24..28].copy_from_slice(&self.crc.to_le_bytes());
        out.write_all(&header)?;
        let mut w = io::BufWriter::with_capacity(1 << 20, out);
        for_each_body_piece(&self.state, &self.runs, self.mem, |p| {
            w.write_all(p).map_err(SnapshotError::Io)
        })?;
        w.flush()?;
        Ok(())
    }
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads and checks the snapshot that starts at `base` in `r` and ends at
/// its end: header, size, checksum, state, memory runs (not loaded: see
/// [`load_memory`]).
pub fn parse<R: Read + Seek>(r: &mut R, base: u64) -> Result<Parsed, SnapshotError> {
    let end = r.seek(SeekFrom::End(0))?;
    let available = end.saturating_sub(base);
    r.seek(SeekFrom::Start(base))?;
    let mut header = [0u8; HEADER_LEN as usize];
    if available < HEADER_LEN {
        // Too short for a header: a magic that matches is a truncated file.
        let mut some = vec![0u8; available as usize];
        r.read_exact(&mut some)?;
        if some.len() >= 8 && &some[..8] == MAGIC {
            return Err(SnapshotError::Short(available));
        }
        return Err(SnapshotError::Magic);
    }
    r.read_exact(&mut header)?;
    if &header[..8] != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&header[16..24]);
    let body_len = u64::from_le_bytes(len8);
    let expected_crc = word(24);
    let found = available - HEADER_LEN;
    if body_len != found {
        return Err(SnapshotError::Size {
            expected: body_len,
            found,
        });
    }
    // The checksum before anything in the body is believed.
    let body_start = base + HEADER_LEN;
    let mut crc = Crc32::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = body_len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        r.read_exact(&mut buf[..n])?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    let crc = crc.finish();
    if crc != expected_crc {
        return Err(SnapshotError::Checksum {
            expected: expected_crc,
            found: crc,
        });
    }
    r.seek(SeekFrom::Start(body_start))?;
    let mut len4 = [0u8; 4];
    if body_len < 4 {
        return Err(malformed("no state length"));
    }
    r.read_exact(&mut len4)?;
    let state_len = u32::from_le_bytes(len4);
    if state_len > MAX_STATE || u64::from(state_len) > body_len - 4 {
        return Err(malformed(format!("state length {state_len}")));
    }
    let mut json = vec![0u8; state_len as usize];
    r.read_exact(&mut json)?;
    let state: SnapshotState =
        serde_json::from_slice(&json).map_err(|e| malformed(format!("state: {e}")))?;
    drop(json);
    state.check()?;
    let ram = ram_ranges(state.config.memory_bytes);
    let mut pos = 4 + u64::from(state_len);
    let mut runs = Vec::new();
    let mut last_end = 0u64;
    loop {
        if body_len - pos < 16 {
            return Err(malformed("memory runs end without their end marker"));
        }
        let gpa = read_u64(r)?;
        let len = read_u64(r)?;
        pos += 16;
        if gpa == END {
            if len != 0 {
                return Err(malformed("end marker with a length"));
            }
            break;
        }
        if len == 0 || !len.is_multiple_of(PAGE) || !gpa.is_multiple_of(PAGE) {
            return Err(malformed(format!(
                "memory run at {gpa:#x} of {len} bytes (not whole pages)"
            )));
        }
        if len > body_len - pos {
            return Err(malformed(format!(
                "memory run at {gpa:#x} of {len} bytes past the end of the file"
            )));
        }
        let inside = ram
            .iter()
            .any(|(s, l)| gpa >= s.0 && gpa.checked_add(len).is_some_and(|e| e <= s.0 + l));
        if !inside {
            return Err(malformed(format!(
                "memory run at {gpa:#x} of {len} bytes outside guest RAM"
            )));
        }
        if gpa < last_end {
            return Err(malformed(format!(
                "memory run at {gpa:#x} overlaps or out of order"
            )));
        }
        last_end = gpa + len;
        runs.push(MemoryRun {
            gpa,
            len,
            file_offset: body_start + pos,
        });
        pos += len;
        r.seek(SeekFrom::Start(body_start + pos))?;
    }
    if pos != body_len {
        return Err(malformed(format!(
            "{} bytes after the end marker",
            body_len - pos
        )));
    }
    Ok(Parsed { state, runs })
}

/// Copies the runs of `parsed` from `r` into `mem` (zeroed beforehand).
pub fn load_memory<R: Read + Seek>(
    r: &mut R,
    parsed: &Parsed,
    mem: &GuestMemory,
) -> Result<(), SnapshotError> {
    let mut buf = vec![0u8; 1 << 20];
    for run in &parsed.runs {
        r.seek(SeekFrom::Start(run.file_offset))?;
        let mut off = 0;
        while off < run.len {
            let n = (buf.len() as u64).min(run.len - off) as usize;
            r.read_exact(&mut buf[..n])?;
            mem.write_slice(&buf[..n], GuestAddress(run.gpa + off))?;
            off += n as u64;
        }
    }
    Ok(())
}
