//! Snapshots of process-backed domains (qemu, kvm): libvirt's
//! `virDomainSnapshot*` over [`super::VmDriver`].
//!
//! ```text
//! ROOT/snapshots/UUID/snapshots.json   the domain's tree (crate::snapshot)
//! ROOT/snapshots/UUID/NAME.save        a full snapshot's memory and device
//!                                      state: a save file (crate::save)
//! ROOT/snapshots/UUID/NAME.DISK.img    a raw disk's sparse copy (kvm)
//! ```
//!
//! What a disk keeps depends on the backend ([`DiskSnapshots`]): QEMU takes
//! *internal* qcow2 snapshots (`blockdev-snapshot-internal-sync` while the
//! guest runs, `qemu-img snapshot -c` while it is shut off), so a snapshot
//! costs nothing until the guest writes; vireo-vmm, whose disks are raw,
//! gets a sparse copy of each. Of a running guest, the disks and the
//! memory are taken in one pause, so they agree; the memory goes to a save
//! file through the backend's save path, and a revert loads it through the
//! restore path. Read-only disks are left out (they do not change).

use std::path::PathBuf;

use vireo_crds::{Domain, DomainReason, DomainState, VolFormat};

use super::store::{Locked, Record};
use super::{Backend, Control, DiskFile, Inner, KIND, LiveState, control_error, io_failed};
use crate::snapshot::{
    RevertTo, SnapshotDisk, SnapshotInfo, SnapshotParams, SnapshotRecord, SnapshotState,
    SnapshotTree,
};
use crate::{Error, Result};

/// How a backend keeps a disk's contents in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSnapshots {
    /// qcow2 disks only, as internal snapshots inside the image.
    Qcow2Internal,
    /// raw disks only, as sparse copies beside the domain's state.
    RawCopies,
}

/// A disk of a snapshot: its index among the launch's disks (QEMU's node
/// `disk{index}`), its file, and its volume.
struct SnapDisk {
    index: usize,
    file: DiskFile,
    volume: String,
}

fn location(kind: DiskSnapshots) -> &'static str {
    match kind {
        DiskSnapshots::Qcow2Internal => "internal",
        DiskSnapshots::RawCopies => "copy",
    }
}

impl<B: Backend> Inner<B> {
    /// The backend's way with disks, or `Unsupported`.
    pub(super) fn snapshot_kind(&self, name: &str) -> Result<DiskSnapshots> {
        self.backend
            .snapshot_disks()
            .ok_or_else(|| Error::Unsupported {
                object: crate::error::ObjectName::new(KIND, name),
                driver: self.backend.name(),
                operation: "snapshots",
            })
    }

    fn snapshot_dir(&self, uuid: &str) -> PathBuf {
        self.store.root().join("snapshots").join(uuid)
    }

    fn memory_file(&self, uuid: &str, snap: &str) -> PathBuf {
        self.snapshot_dir(uuid).join(format!("{snap}.save"))
    }

    fn disk_copy(&self, uuid: &str, snap: &str, disk: &str) -> PathBuf {
        self.snapshot_dir(uuid).join(format!("{snap}.{disk}.img"))
    }

    /// The domain's snapshot tree (empty when it has none).
    pub(super) fn load_tree(&self, name: &str, uuid: &str) -> Result<SnapshotTree> {
        SnapshotTree::load(&self.snapshot_dir(uuid).join("snapshots.json"))
            .map_err(|e| io_failed(name, "reading its snapshots", e))
    }

    fn store_tree(&self, name: &str, uuid: &str, tree: &SnapshotTree) -> Result<()> {
        let path = self.snapshot_dir(uuid).join("snapshots.json");
        if tree.is_empty() {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir(self.snapshot_dir(uuid));
            return Ok(());
        }
        tree.store(&path)
            .map_err(|e| io_failed(name, "writing its snapshots", e))
    }

    /// The writable disks of `def` that a snapshot takes; a disk whose
    /// format the backend cannot snapshot is refused, naming it.
    fn snapshot_disks_of(
        &self,
        name: &str,
        def: &Domain,
        kind: DiskSnapshots,
    ) -> Result<Vec<SnapDisk>> {
        let files = self.volume_disks(name, def)?;
        let mut out = Vec::new();
        for (index, (disk, file)) in def.spec.devices.disks.iter().zip(files).enumerate() {
            if disk.read_only {
                continue;
            }
            let ok = matches!(
                (kind, file.format),
                (DiskSnapshots::Qcow2Internal, VolFormat::Qcow2)
                    | (DiskSnapshots::RawCopies, VolFormat::Raw)
            );
            if !ok {
                let (wanted, how) = match kind {
                    DiskSnapshots::Qcow2Internal => ("qcow2", "internal qcow2 snapshots"),
                    DiskSnapshots::RawCopies => ("raw", "sparse copies"),
                };
                return Err(Error::invalid_argument(
                    KIND,
                    name,
                    format!(
                        "spec.devices.disks[{index}]: disk '{}' (volume '{}') is {}; the {} driver \
                         snapshots {wanted} disks only ({how}): convert the volume or make the \
                         disk read-only",
                        disk.name,
                        disk.volume,
                        file.format,
                        self.backend.name()
                    ),
                ));
            }
            out.push(SnapDisk {
                index,
                file,
                volume: disk.volume.clone(),
            });
        }
        Ok(out)
    }

    /// Takes the disks' contents while no guest writes them (shut off, or
    /// paused): all or none.
    fn take_disks(
        &self,
        rec: &Record,
        snap: &str,
        disks: &[SnapDisk],
        kind: DiskSnapshots,
        live: bool,
    ) -> Result<()> {
        let name = &rec.name;
        match kind {
            DiskSnapshots::Qcow2Internal if live => {
                let indexes: Vec<usize> = disks.iter().map(|d| d.index).collect();
                self.backend
                    .snapshot_internal_live(&self.paths(&rec.uuid), &indexes, snap)
                    .map_err(|e| io_failed(name, "taking the disks' internal snapshots", e))
            }
            DiskSnapshots::Qcow2Internal => {
                for (i, d) in disks.iter().enumerate() {
                    let path = std::path::Path::new(&d.file.path);
                    if let Err(e) = crate::storage::dir::qemu_img::snapshot(path, "-c", snap) {
                        for done in &disks[..i] {
                            let _ = crate::storage::dir::qemu_img::snapshot(
                                std::path::Path::new(&done.file.path),
                                "-d",
                                snap,
                            );
                        }
                        return Err(io_failed(
                            name,
                            &format!("snapshot of disk '{}'", d.file.name),
                            e,
                        ));
                    }
                }
                Ok(())
            }
            DiskSnapshots::RawCopies => {
                let dir = self.snapshot_dir(&rec.uuid);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| io_failed(name, "creating the snapshot directory", e))?;
                for (i, d) in disks.iter().enumerate() {
                    let to = self.disk_copy(&rec.uuid, snap, &d.file.name);
                    let copied = std::fs::File::create(&to).and_then(|out| {
                        crate::storage::dir::file::copy_sparse(
                            std::path::Path::new(&d.file.path),
                            &out,
                            &crate::storage::no_progress,
                        )
                    });
                    if let Err(e) = copied {
                        for done in &disks[..=i] {
                            let _ = std::fs::remove_file(self.disk_copy(
                                &rec.uuid,
                                snap,
                                &done.file.name,
                            ));
                        }
                        return Err(io_failed(
                            name,
                            &format!("copying disk '{}' to {}", d.file.name, to.display()),
                            e,
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Removes what [`take_disks`](Self::take_disks) made, best effort
    /// (undoing a failed snapshot).
    fn drop_disks(&self, rec: &Record, snap: &str, disks: &[SnapDisk], live: bool) {
        for d in disks {
            self.delete_disk(rec, snap, &d.file.name, &d.file.path, live.then_some(d.index))
                .unwrap_or_else(|e| {
                    tracing::warn!(domain = %rec.name, snapshot = snap, error = %e, "removing a disk snapshot");
                });
        }
    }

    /// Deletes one disk's part of a snapshot: the internal snapshot (over
    /// QMP while the guest runs with the disk at `live_index`), or the copy.
    fn delete_disk(
        &self,
        rec: &Record,
        snap: &str,
        disk: &str,
        path: &str,
        live_index: Option<usize>,
    ) -> std::result::Result<(), String> {
        match self.backend.snapshot_disks() {
            Some(DiskSnapshots::Qcow2Internal) => {
                let r = match live_index {
                    Some(i) => self
                        .backend
                        .snapshot_delete_live(&self.paths(&rec.uuid), i, snap),
                    None => crate::storage::dir::qemu_img::snapshot(
                        std::path::Path::new(path),
                        "-d",
                        snap,
                    ),
                };
                match r {
                    // Gone already (the image was replaced): nothing to do.
                    Err(e) if e.contains("not found") || e.contains("Can't find") => Ok(()),
                    other => other,
                }
            }
            _ => match std::fs::remove_file(self.disk_copy(&rec.uuid, snap, disk)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
        }
    }

    pub(super) fn snapshot_create(
        &self,
        _l: &Locked<'_>,
        rec: &mut Record,
        params: &SnapshotParams,
    ) -> Result<SnapshotInfo> {
        let name = rec.name.clone();
        let kind = self.snapshot_kind(&name)?;
        let snap = crate::snapshot::snapshot_name(&name, params)?;
        let mut tree = self.load_tree(&name, &rec.uuid)?;
        tree.check_new(&name, &snap)?;
        let def = rec
            .current()
            .cloned()
            .ok_or_else(|| Error::not_found(KIND, &name))?;
        let disks = self.snapshot_disks_of(&name, &def, kind)?;
        let dir = self.snapshot_dir(&rec.uuid);
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_failed(&name, "creating the snapshot directory", e))?;
        let started = std::time::Instant::now();
        let (state, memory) = match rec.run.clone() {
            None => {
                self.take_disks(rec, &snap, &disks, kind, false)?;
                (SnapshotState::Shutoff, false)
            }
            Some(run) => {
                if run.pid == 0 {
                    return Err(Error::invalid_state(KIND, &name, "is still starting"));
                }
                let paths = self.paths(&rec.uuid);
                let live = self
                    .backend
                    .query(&paths)
                    .map_err(|e| io_failed(&name, "asking the VM process its state", e))?;
                let paused = match live.state {
                    LiveState::Running => false,
                    LiveState::Paused => true,
                    LiveState::GuestStopped | LiveState::GuestCrashed => {
                        return Err(Error::invalid_state(
                            KIND,
                            &name,
                            "has stopped (its guest powered off or crashed): nothing to snapshot",
                        ));
                    }
                };
                let (state, memory) = crate::snapshot::state_for(
                    if paused {
                        DomainState::Paused
                    } else {
                        DomainState::Running
                    },
                    params.disk_only,
                );
                if !paused {
                    self.backend
                        .control(&paths, Control::Pause)
                        .map_err(|e| control_error(&name, &self.backend, e))?;
                }
                // Disks and memory in the same pause, so that they agree.
                let taken = self
                    .take_disks(rec, &snap, &disks, kind, true)
                    .and_then(|()| {
                        if !memory {
                            return Ok(());
                        }
                        let file = self.memory_file(&rec.uuid, &snap);
                        let header = crate::save::header(
                            self.backend.name(),
                            &name,
                            &rec.uuid,
                            &run.live,
                            paused,
                        );
                        let saved = crate::save::Writer::create(&file, header)
                            .map_err(|e| e.into_error(&name))
                            .and_then(|w| {
                                self.backend.save_state(&paths, &file).map_err(|e| {
                                    io_failed(&name, "saving the guest's memory", e)
                                })?;
                                w.finish().map_err(|e| e.into_error(&name))
                            });
                        if let Err(e) = saved {
                            let _ = std::fs::remove_file(&file);
                            self.drop_disks(rec, &snap, &disks, true);
                            return Err(e);
                        }
                        Ok(())
                    });
                if !paused && let Err(e) = self.backend.control(&paths, Control::Resume) {
                    tracing::warn!(domain = %name, error = ?e, "resuming the guest after its snapshot");
                }
                taken?;
                (state, memory)
            }
        };
        tree.add(SnapshotRecord {
            name: snap.clone(),
            description: params.description.clone(),
            creation_time: crate::snapshot::now_secs(),
            state,
            parent: None,
            memory,
            disks: disks
                .iter()
                .map(|d| SnapshotDisk {
                    name: d.file.name.clone(),
                    volume: d.volume.clone(),
                    location: location(kind).to_string(),
                })
                .collect(),
            definition: def,
            driver_data: serde_json::Value::Null,
        });
        self.store_tree(&name, &rec.uuid, &tree)?;
        tracing::info!(driver = self.backend.name(), domain = %name, snapshot = %snap, state = %state, memory, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot taken");
        tree.info(&name, &snap)
    }

    pub(super) fn snapshot_revert(
        &self,
        l: &Locked<'_>,
        rec: &mut Record,
        snap: &str,
        to: RevertTo,
    ) -> Result<()> {
        let name = rec.name.clone();
        self.snapshot_kind(&name)?;
        let mut tree = self.load_tree(&name, &rec.uuid)?;
        let s = tree.get(snap)?.clone();
        let target = match (to, s.state) {
            (RevertTo::Running, _) | (RevertTo::Snapshot, SnapshotState::Running) => {
                DomainState::Running
            }
            (RevertTo::Paused, _) | (RevertTo::Snapshot, SnapshotState::Paused) => {
                DomainState::Paused
            }
            (RevertTo::Snapshot, _) => DomainState::Shutoff,
        };
        let transient = rec.definition.is_none();
        if transient && !target.is_active() {
            return Err(Error::invalid_state(
                KIND,
                &name,
                format!(
                    "is transient and snapshot '{snap}' is of a shut-off domain: a transient \
                     domain needs to remain running (use --running or --paused)"
                ),
            ));
        }
        let mut def = s.definition.clone();
        def.metadata.name = Some(name.clone());
        def.spec.uuid = Some(rec.uuid.clone());
        def.status = None;
        self.backend
            .check(&def)
            .map_err(|e| Error::invalid_argument(KIND, &name, e))?;
        // Everything the revert reads is checked before anything changes.
        let memory = if s.memory && target.is_active() {
            let file = self.memory_file(&rec.uuid, snap);
            let (_, offset) = crate::save::read(&file).map_err(|e| e.into_error(&name))?;
            Some((file, offset))
        } else {
            None
        };
        let mut files = Vec::new();
        for (i, d) in s.disks.iter().enumerate() {
            let field = format!("snapshot '{snap}' disks[{i}] ({})", d.name);
            let info = self.find_volume(&name, &field, &d.volume)?;
            if d.location == "copy" {
                let copy = self.disk_copy(&rec.uuid, snap, &d.name);
                if !copy.is_file() {
                    return Err(io_failed(
                        &name,
                        &field,
                        format!("its copy {} is missing", copy.display()),
                    ));
                }
            }
            files.push((d.clone(), info.path));
        }
        if rec.is_active() {
            // A transient domain keeps its record across the stop.
            if transient {
                rec.definition = Some(def.clone());
            }
            self.end(l, rec, DomainReason::FromSnapshot)?;
        }
        for (d, path) in &files {
            let done = if d.location == "copy" {
                let copy = self.disk_copy(&rec.uuid, snap, &d.name);
                std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(path)
                    .and_then(|out| {
                        crate::storage::dir::file::copy_sparse(
                            &copy,
                            &out,
                            &crate::storage::no_progress,
                        )
                    })
                    .map(drop)
                    .map_err(|e| e.to_string())
            } else {
                crate::storage::dir::qemu_img::snapshot(std::path::Path::new(path), "-a", snap)
            };
            done.map_err(|e| {
                io_failed(
                    &name,
                    &format!("returning disk '{}' to snapshot '{snap}'", d.name),
                    e,
                )
            })?;
        }
        rec.definition = if transient { None } else { Some(def.clone()) };
        if target.is_active() {
            let paused = target == DomainState::Paused;
            let started = match &memory {
                Some((file, offset)) => self.activate_from(
                    l,
                    rec,
                    def,
                    super::Start::Saved(file.as_path(), *offset, paused),
                ),
                None => self.activate(l, rec, def),
            };
            if let Err(e) = started {
                if transient {
                    let _ = l.remove(&name);
                }
                return Err(e);
            }
            if paused && memory.is_none() {
                self.backend
                    .control(&self.paths(&rec.uuid), Control::Pause)
                    .map_err(|e| control_error(&name, &self.backend, e))?;
            }
            if let Some(run) = rec.run.as_mut() {
                run.reason = DomainReason::FromSnapshot;
            }
        } else {
            rec.last_reason = DomainReason::FromSnapshot;
        }
        self.save(l, rec)?;
        tree.set_current(snap)?;
        self.store_tree(&name, &rec.uuid, &tree)?;
        tracing::info!(driver = self.backend.name(), domain = %name, snapshot = %snap, state = %target, "reverted to snapshot");
        Ok(())
    }

    pub(super) fn snapshot_delete(&self, rec: &Record, snap: &str) -> Result<()> {
        let name = rec.name.clone();
        self.snapshot_kind(&name)?;
        let mut tree = self.load_tree(&name, &rec.uuid)?;
        let s = tree.get(snap)?.clone();
        let live = rec.run.as_ref().map(|r| r.live.clone());
        for d in &s.disks {
            let path = match self.find_volume(&name, "", &d.volume) {
                Ok(info) => info.path,
                // The volume is gone, and its snapshots with it.
                Err(_) if d.location == "internal" => continue,
                Err(_) => String::new(),
            };
            // While the guest runs with that volume, QEMU deletes the
            // internal snapshot (the image is locked to others).
            let live_index = live.as_ref().and_then(|def| {
                def.spec
                    .devices
                    .disks
                    .iter()
                    .position(|x| x.volume == d.volume && !x.read_only)
            });
            self.delete_disk(rec, snap, &d.name, &path, live_index)
                .map_err(|e| {
                    io_failed(
                        &name,
                        &format!("deleting disk '{}' of snapshot '{snap}'", d.name),
                        e,
                    )
                })?;
        }
        let _ = std::fs::remove_file(self.memory_file(&rec.uuid, snap));
        tree.remove(snap)?;
        self.store_tree(&name, &rec.uuid, &tree)?;
        tracing::info!(driver = self.backend.name(), domain = %name, snapshot = %snap, "snapshot deleted");
        Ok(())
    }
}
