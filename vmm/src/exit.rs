//! The exit file: why the VMM stopped, written once as JSON to a temporary
//! name (opened at start, before the seccomp filter) and renamed into place.

use serde::Serialize;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Why the VMM exited (the contract's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitReason {
    Poweroff,
    Reboot,
    Destroyed,
    Crashed,
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn code(self) -> i32 {
        match self {
            Self::Poweroff | Self::Reboot | Self::Destroyed => 0,
            Self::Crashed => 1,
        }
    }
}

/// What goes into the exit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitReport {
    pub reason: ExitReason,
    pub detail: String,
    pub boot_time_us: Option<u64>,
}

/// The exit file, open under its temporary name.
pub struct ExitFile {
    tmp: File,
    tmp_path: PathBuf,
    path: PathBuf,
}

impl ExitFile {
    /// Creates `<path>.tmp` now, so writing later needs no `open`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let mut name = path.as_os_str().to_owned();
        name.push(".tmp");
        let tmp_path = PathBuf::from(name);
        let tmp = File::create(&tmp_path)?;
        Ok(Self {
            tmp,
            tmp_path,
            path: path.to_path_buf(),
        })
    }

    /// Writes the report and renames it into place.
    pub fn write(mut self, report: &ExitReport) -> std::io::Result<()> {
        let json = serde_json::to_vec(report).map_err(std::io::Error::other)?;
        self.tmp.set_len(0)?;
        self.tmp.seek(SeekFrom::Start(0))?;
        self.tmp.write_all(&json)?;
        self.tmp.write_all(b"\n")?;
        self.tmp.sync_all()?;
        std::fs::rename(&self.tmp_path, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_contract_json_and_renamed() {
        let dir = std::env::temp_dir().join(format!("vireo-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("exit.json");
        let f = ExitFile::create(&path).unwrap();
        assert!(!path.exists());
        f.write(&ExitReport {
            reason: ExitReason::Poweroff,
            detail: "guest".into(),
            boot_time_us: None,
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["reason"], "poweroff");
        assert_eq!(v["detail"], "guest");
        assert!(v["boot_time_us"].is_null());
        assert!(!dir.join("exit.json.tmp").exists());
        assert_eq!(ExitReason::Crashed.code(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
