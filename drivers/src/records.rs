//! JSON records in a directory, one file per object, shared by the drivers
//! whose state must outlive their process (the vm drivers' domains, the
//! bridge driver's networks, the dir backend's pools):
//!
//! ```text
//! ROOT/lock            flock(2): one writer at a time, across processes
//! ROOT/SUBDIR/NAME.json
//! ```
//!
//! Files are written to a temporary name, synced and renamed, so a reader
//! (locked or not) sees the old record or the new one, never half of one.
//! Names are escaped into file names ('%' as "%25", '/' as "%2F").

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A record that knows its own name.
pub trait Named {
    fn name(&self) -> &str;
}

/// A directory of records under a root.
pub struct RecordDir {
    root: PathBuf,
    dir: PathBuf,
    /// What a record is, for log lines (`domain`, `network`, `pool`).
    what: &'static str,
}

/// Holds the root's lock while alive; writes go through it.
pub struct Locked<'a> {
    records: &'a RecordDir,
    _file: File,
}

fn file_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 5);
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out.push_str(".json");
    out
}

impl RecordDir {
    /// Opens (and creates) ROOT/SUBDIR.
    pub fn open(root: &Path, subdir: &str, what: &'static str) -> io::Result<Self> {
        let dir = root.join(subdir);
        fs::create_dir_all(&dir)?;
        Ok(Self {
            root: root.to_path_buf(),
            dir,
            what,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(file_name(name))
    }

    /// Takes the cross-process lock.
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))?;
        // SAFETY: flock on a descriptor we own; it only blocks this thread
        // until other holders release the lock.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Locked {
            records: self,
            _file: file,
        })
    }

    /// Every record, sorted by name; unreadable files are skipped with a
    /// warning rather than failing every operation.
    pub fn all<T: DeserializeOwned + Named>(&self) -> io::Result<Vec<T>> {
        let mut out: Vec<T> = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                // Gone between the listing and the read: not an error.
                Err(_) if !path.exists() => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable {} record", self.what)
                }
            }
        }
        out.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(out)
    }

    /// The record of `name`, if there is one.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> io::Result<Option<T>> {
        match fs::read(self.path(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Locked<'_> {
    pub fn records(&self) -> &RecordDir {
        self.records
    }

    /// Writes a record atomically (temporary file, fsync, rename).
    pub fn put<T: Serialize + Named>(&self, record: &T) -> io::Result<()> {
        let path = self.records.path(record.name());
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(tmp, path)
    }

    /// Removes a record; a missing one is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.records.path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct R {
        name: String,
        n: u32,
    }
    impl Named for R {
        fn name(&self) -> &str {
            &self.name
        }
    }

    #[test]
    fn records_round_trip_sorted_and_escaped() {
        let root = std::env::temp_dir().join(format!("vireo-records-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = RecordDir::open(&root, "things", "thing").expect("open");
        let l = dir.lock().expect("lock");
        for (name, n) in [("b", 2), ("ns/a", 1), ("50%", 3)] {
            l.put(&R {
                name: name.into(),
                n,
            })
            .expect("put");
        }
        assert!(root.join("things/ns%2Fa.json").exists());
        assert!(root.join("things/50%25.json").exists());
        let all: Vec<R> = dir.all().expect("all");
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["50%", "b", "ns/a"]);
        assert_eq!(dir.get::<R>("ns/a").expect("get").map(|r| r.n), Some(1));
        l.remove("ns/a").expect("remove");
        l.remove("ns/a").expect("remove again is fine");
        assert_eq!(dir.get::<R>("ns/a").expect("get"), None);
        // A broken file is skipped, not fatal.
        fs::write(root.join("things/bad.json"), b"{").expect("write");
        assert_eq!(dir.all::<R>().expect("all").len(), 2);
    }
}
