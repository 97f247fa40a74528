//! Saved-state files (libvirt's `virDomainSave`/`Restore`, `managedsave`).
//!
//! One file holds a small Vireo header and, after it, the hypervisor's own
//! state stream (QEMU's migration stream for the qemu driver; nothing for
//! the test driver, whose state is the definition):
//!
//! ```text
//! offset 0   8 bytes   magic "VIREOSV1"
//! offset 8   4 bytes   header length H (little endian)
//! offset 12  H bytes   the header, JSON padded with spaces
//! offset 12+H          the state stream, `stateSize` bytes
//! ```
//!
//! The header names the driver, the domain (name, UUID, definition), the
//! run state to come back in, and the stream's size and CRC-32. A restore
//! reads and checks all of it before anything changes: a file that is not
//! a save file, a truncated one, one whose stream does not match its
//! checksum or one of another driver is refused.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_crds::{Domain, ObjectKind};

use crate::Error;

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"VIREOSV1";
/// The header format this code writes and reads.
pub const FORMAT: u32 = 1;
/// The largest header accepted (a definition is far smaller).
const MAX_HEADER: u32 = 16 << 20;

/// What a save file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// [`FORMAT`].
    pub format: u32,
    /// The driver that wrote it (`qemu`, `test`); only it restores it.
    pub driver: String,
    pub name: String,
    pub uuid: String,
    /// The live definition at the time of the save; the restored domain
    /// runs it.
    pub definition: Domain,
    /// The guest was paused when saved: it comes back paused.
    pub paused: bool,
    /// Unix seconds of the save.
    pub saved_at: u64,
    /// Bytes of state after the header.
    pub state_size: u64,
    /// CRC-32 (IEEE) of those bytes.
    pub state_crc32: u32,
}

/// Why a save file cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a Vireo saved-state file (no VIREOSV1 header)")]
    NotASaveFile { path: PathBuf },
    #[error("{path}: the saved-state header is unreadable: {message}")]
    BadHeader { path: PathBuf, message: String },
    #[error("{path}: saved-state format {found} is not supported (this build reads {FORMAT})")]
    Format { path: PathBuf, found: u32 },
    #[error(
        "{path} is truncated or was extended: its header promises {expected} bytes of state, the file has {found}"
    )]
    Size {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path} is damaged: the state's CRC-32 is {found:08x}, the header says {expected:08x}")]
    Checksum {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
}

impl SaveError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> SaveError + '_ {
        move |source| SaveError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// As a driver error about the domain (or file) `name`.
    pub fn into_error(self, name: &str) -> Error {
        match self {
            SaveError::Io { .. } => Error::OperationFailed {
                object: crate::error::ObjectName::new(ObjectKind::Domain, name),
                message: self.to_string(),
            },
            other => Error::invalid_argument(ObjectKind::Domain, name, other.to_string()),
        }
    }
}

/// A save in progress: the header is written, the state follows.
pub struct Writer {
    path: PathBuf,
    header: Header,
    /// Bytes reserved for the header.
    room: u32,
}

impl Writer {
    /// Creates (or replaces) `path` with `header` and room to rewrite it
    /// with the final size and checksum.
    pub fn create(path: &Path, header: Header) -> Result<Self, SaveError> {
        let json = serde_json::to_vec(&header).map_err(|e| SaveError::BadHeader {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // Room for the size and checksum to grow, rounded to a page.
        let room = (json.len() + 512).div_ceil(4096) * 4096;
        let room = u32::try_from(room).map_err(|_| SaveError::BadHeader {
            path: path.to_path_buf(),
            message: "the definition is too large".into(),
        })?;
        let mut file = File::create(path).map_err(SaveError::io(path))?;
        write_header(&mut file, &json, room).map_err(SaveError::io(path))?;
        file.sync_all().map_err(SaveError::io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            header,
            room,
        })
    }

    /// Where the state starts.
    pub fn offset(&self) -> u64 {
        12 + u64::from(self.room)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `state` (for drivers that hold it in memory).
    pub fn append(&self, state: &[u8]) -> Result<(), SaveError> {
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(SaveError::io(&self.path))?;
        file.write_all(state).map_err(SaveError::io(&self.path))
    }

    /// Measures the state written after the header (by this process or by
    /// the hypervisor), and records its size and checksum in the header.
    pub fn finish(mut self) -> Result<Header, SaveError> {
        let path = self.path.clone();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(SaveError::io(&path))?;
        let (size, crc) = crc_from(&mut file, self.offset()).map_err(SaveError::io(&path))?;
        self.header.state_size = size;
        self.header.state_crc32 = crc;
        let json = serde_json::to_vec(&self.header).map_err(|e| SaveError::BadHeader {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if json.len() > self.room as usize {
            return Err(SaveError::BadHeader {
                path,
                message: "the final header outgrew its room".into(),
            });
        }
        file.seek(SeekFrom::Start(0))
            .map_err(SaveError::io(&path))?;
        write_header(&mut file, &json, self.room).map_err(SaveError::io(&path))?;
        file.sync_all().map_err(SaveError::io(&path))?;
        Ok(self.header)
    }
}

fn write_header(file: &mut File, json: &[u8], room: u32) -> io::Result<()> {
    let mut buf = Vec::with_capacity(12 + room as usize);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&room.to_le_bytes());
    buf.extend_from_slice(json);
    buf.resize(12 + room as usize, b' ');
    file.write_all(&buf)
}

/// Reads and checks a save file: its magic, header, format, size and
/// checksum. Returns the header and where the state starts.
pub fn read(path: &Path) -> Result<(Header, u64), SaveError> {
    let mut file = File::open(path).map_err(SaveError::io(path))?;
    let mut fixed = [0u8; 12];
    match file.read_exact(&mut fixed) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(SaveError::NotASaveFile {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(SaveError::io(path)(e)),
    }
    if &fixed[..8] != MAGIC {
        return Err(SaveError::NotASaveFile {
            path: path.to_path_buf(),
        });
    }
    let room = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    let bad = |message: String| SaveError::BadHeader {
        path: path.to_path_buf(),
        message,
    };
    if room > MAX_HEADER {
        return Err(bad(format!("header length {room} is beyond {MAX_HEADER}")));
    }
    let mut json = vec![0u8; room as usize];
    file.read_exact(&mut json)
        .map_err(|e| bad(format!("cannot read {room} header bytes: {e}")))?;
    // An older or newer format is named as such, whatever else it holds.
    let value: serde_json::Value = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    let found = value
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad("no format field".into()))?;
    if found != u64::from(FORMAT) {
        return Err(SaveError::Format {
            path: path.to_path_buf(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
        });
    }
    let header: Header = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let offset = 12 + u64::from(room);
    let (size, crc) = crc_from(&mut file, offset).map_err(SaveError::io(path))?;
    if size != header.state_size {
        return Err(SaveError::Size {
            path: path.to_path_buf(),
            expected: header.state_size,
            found: size,
        });
    }
    if crc != header.state_crc32 {
        return Err(SaveError::Checksum {
            path: path.to_path_buf(),
            expected: header.state_crc32,
            found: crc,
        });
    }
    Ok((header, offset))
}

/// Size and CRC-32 of everything from `offset` to the end.
fn crc_from(file: &mut File, offset: u64) -> io::Result<(u64, u32)> {
    file.seek(SeekFrom::Start(offset))?;
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, crc.finalize()))
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh header for `definition` (size and checksum come at the end).
pub fn header(driver: &str, name: &str, uuid: &str, definition: &Domain, paused: bool) -> Header {
    Header {
        format: FORMAT,
        driver: driver.to_string(),
        name: name.to_string(),
        uuid: uuid.to_string(),
        definition: definition.clone(),
        paused,
        saved_at: now_secs(),
        state_size: 0,
        state_crc32: 0,
    }
}

/// Quotes `s` for `/bin/sh` (QEMU runs `exec:` migration URIs with it).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain() -> Domain {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        use vireo_crds::{DomainDevices, DomainSpec, DomainType, Lifecycle, RunStrategy};
        Domain::new(
            "d",
            DomainSpec {
                domain_type: DomainType::Test,
                arch: None,
                uuid: None,
                memory: Quantity("64Mi".into()),
                current_memory: None,
                vcpus: 1,
                max_vcpus: None,
                os: None,
                devices: DomainDevices::default(),
                cloud_init: None,
                run_strategy: RunStrategy::Manual,
                lifecycle: Lifecycle::default(),
                node_selector: None,
                eviction_strategy: None,
            },
        )
    }

    #[test]
    fn crc32_matches_zlib() {
        let mut c = crc32fast::Hasher::new();
        c.update(b"123456789");
        assert_eq!(c.finalize(), 0xCBF4_3926);
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("vireo-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("d.save");
        let w = Writer::create(&path, header("test", "d", "u", &domain(), false)).expect("create");
        w.append(b"state bytes").expect("append");
        let h = w.finish().expect("finish");
        assert_eq!(h.state_size, 11);
        let (back, offset) = read(&path).expect("read");
        assert_eq!(
            (back.state_size, back.state_crc32, back.uuid),
            (h.state_size, h.state_crc32, h.uuid)
        );
        assert_eq!(offset % 4096, 12);

        // Truncated.
        let bytes = std::fs::read(&path).expect("bytes");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("write");
        assert!(matches!(read(&path), Err(SaveError::Size { .. })));
        // One byte of the state changed.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        assert!(matches!(read(&path), Err(SaveError::Checksum { .. })));
        // Garbage and empty files.
        std::fs::write(&path, b"garbage, not a save file").expect("write");
        assert!(matches!(read(&path), Err(SaveError::NotASaveFile { .. })));
        std::fs::write(&path, b"").expect("write");
        assert!(matches!(read(&path), Err(SaveError::NotASaveFile { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}
