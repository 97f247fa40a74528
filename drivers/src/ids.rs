//! Domain IDs shared by the hypervisor drivers of one node.
//!
//! libvirt numbers each connection's activations on its own, so `qemu:///`
//! and `test:///` may both have a domain 1. A Vireo node shows its domains
//! of every type in one list (`vireo list`, the Host's domains in `kubectl
//! get domains`), as `virsh list` shows one host's, so the agent hands its
//! drivers one counter: an ID names one domain on the node, whatever its
//! type. The counter is a small file holding the next ID, changed under an
//! exclusive lock (`flock`), so drivers opened separately on the same file
//! (and in separate processes) never hand out the same ID twice.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The next domain ID of a node, kept in a file.
#[derive(Debug, Clone)]
pub struct DomainIds {
    path: PathBuf,
}

impl DomainIds {
    /// The counter in `path` (created, starting at 1, on first use).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// The file the counter lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands out the next ID (1, 2, ...); after `u32::MAX` it wraps to 1.
    pub fn next(&self) -> io::Result<u32> {
        self.update(|next| (next, next.checked_add(1).unwrap_or(1)))
    }

    /// Makes sure no ID up to `id` is handed out again (a driver that
    /// re-adopts a running domain reports its ID here).
    pub fn observe(&self, id: u32) -> io::Result<()> {
        self.update(|next| ((), next.max(id.saturating_add(1))))
    }

    /// Runs `f` on the stored next ID under the file's lock and stores what
    /// it returns.
    fn update<R>(&self, f: impl FnOnce(u32) -> (R, u32)) -> io::Result<R> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)?;
        file.lock()?;
        let result = Self::update_locked(&mut file, f);
        // Closing the file releases the lock as well; unlock first so an
        // error here is not hidden behind the close.
        let unlocked = file.unlock();
        let r = result?;
        unlocked?;
        Ok(r)
    }

    fn update_locked<R>(file: &mut File, f: impl FnOnce(u32) -> (R, u32)) -> io::Result<R> {
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        // An empty or unreadable counter starts again at 1: the drivers
        // report the IDs they re-adopt through `observe`.
        let next = text.trim().parse::<u32>().unwrap_or(1).max(1);
        let (r, stored) = f(next);
        if stored != next || text.trim().is_empty() {
            file.seek(SeekFrom::Start(0))?;
            file.set_len(0)?;
            write!(file, "{stored}")?;
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("vireo-ids-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch directory");
            Self(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn ids_count_up_and_persist() {
        let dir = Scratch::new("ids_count_up_and_persist");
        let path = dir.path().join("sub/domain-ids");
        let ids = DomainIds::new(&path);
        assert_eq!(ids.next().expect("next"), 1);
        assert_eq!(ids.next().expect("next"), 2);
        // Another handle on the same file (another driver) continues.
        let other = DomainIds::new(&path);
        assert_eq!(other.next().expect("next"), 3);
        assert_eq!(ids.next().expect("next"), 4);
        assert_eq!(std::fs::read_to_string(&path).expect("file"), "5");
    }

    #[test]
    fn observed_ids_are_not_handed_out_again() {
        let dir = Scratch::new("observed_ids_are_not_handed_out_again");
        let ids = DomainIds::new(&dir.path().join("domain-ids"));
        ids.observe(41).expect("observe");
        assert_eq!(ids.next().expect("next"), 42);
        // Observing a lower ID changes nothing.
        ids.observe(7).expect("observe");
        assert_eq!(ids.next().expect("next"), 43);
    }

    #[test]
    fn a_damaged_counter_starts_again_and_wraps() {
        let dir = Scratch::new("a_damaged_counter_starts_again_and_wraps");
        let path = dir.path().join("domain-ids");
        std::fs::write(&path, "not a number").expect("write");
        let ids = DomainIds::new(&path);
        assert_eq!(ids.next().expect("next"), 1);
        std::fs::write(&path, u32::MAX.to_string()).expect("write");
        assert_eq!(ids.next().expect("next"), u32::MAX);
        assert_eq!(ids.next().expect("next"), 1);
    }

    #[test]
    fn threads_never_share_an_id() {
        let dir = Scratch::new("threads_never_share_an_id");
        let path = dir.path().join("domain-ids");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids = DomainIds::new(&path);
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| ids.next().expect("next"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u32> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=200).collect::<Vec<_>>());
    }
}
