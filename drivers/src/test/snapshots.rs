//! Snapshots on the test driver, with libvirt's test-driver semantics: a
//! snapshot keeps the domain's definition, its state and (of an active
//! domain, unless disk-only) its runtime sizes; a revert brings back the
//! definition and the state, reason `from snapshot`.

use std::time::Instant;

use vireo_crds::{DomainReason, DomainState, ObjectKind};

use super::State;
use crate::snapshot::{
    RevertTo, SnapshotDisk, SnapshotInfo, SnapshotParams, SnapshotRecord, SnapshotState,
};
use crate::{Error, Result};

/// What a test snapshot keeps beyond the definition.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Runtime {
    memory: u64,
    vcpus: u32,
}

impl State {
    pub(super) fn snapshot_create(
        &mut self,
        name: &str,
        params: &SnapshotParams,
    ) -> Result<SnapshotInfo> {
        let snap = crate::snapshot::snapshot_name(name, params)?;
        let obj = self.domain_mut(name)?;
        obj.snapshots.check_new(name, &snap)?;
        let (state, memory) = crate::snapshot::state_for(obj.state, params.disk_only);
        let disks = obj
            .def
            .spec
            .devices
            .disks
            .iter()
            .map(|d| SnapshotDisk {
                name: d.name.clone(),
                volume: d.volume.clone(),
                location: "internal".into(),
            })
            .collect();
        let runtime = serde_json::to_value(Runtime {
            memory: obj.memory,
            vcpus: obj.vcpus,
        })
        .unwrap_or_default();
        obj.snapshots.add(SnapshotRecord {
            name: snap.clone(),
            description: params.description.clone(),
            creation_time: crate::snapshot::now_secs(),
            state,
            parent: None,
            memory,
            disks,
            definition: obj.def.clone(),
            driver_data: if memory {
                runtime
            } else {
                serde_json::Value::Null
            },
        });
        obj.snapshots.info(name, &snap)
    }

    pub(super) fn snapshot_revert(&mut self, name: &str, snap: &str, to: RevertTo) -> Result<()> {
        let obj = self.domain_mut(name)?;
        let rec = obj.snapshots.get(snap)?.clone();
        let target = match (to, rec.state) {
            (RevertTo::Running, _) => DomainState::Running,
            (RevertTo::Paused, _) => DomainState::Paused,
            (RevertTo::Snapshot, SnapshotState::Running) => DomainState::Running,
            (RevertTo::Snapshot, SnapshotState::Paused) => DomainState::Paused,
            (RevertTo::Snapshot, _) => DomainState::Shutoff,
        };
        if !obj.persistent && !target.is_active() {
            return Err(Error::invalid_state(
                ObjectKind::Domain,
                name,
                format!(
                    "is transient and snapshot '{snap}' is of a shut-off domain: a transient \
                     domain needs to remain running (use --running or --paused)"
                ),
            ));
        }
        let mut def = rec.definition.clone();
        def.spec.uuid = Some(obj.uuid.clone());
        def.status = None;
        let runtime: Option<Runtime> = serde_json::from_value(rec.driver_data.clone()).ok();
        if obj.is_active() && !target.is_active() {
            obj.new_def = None;
            self.deactivate(name, DomainReason::FromSnapshot)?;
        }
        let obj = self.domain_mut(name)?;
        obj.def = def;
        obj.new_def = None;
        if !target.is_active() {
            obj.load_sizes();
            obj.reason = DomainReason::FromSnapshot;
        } else {
            if !obj.is_active() {
                self.activate(name, DomainReason::FromSnapshot)?;
            }
            let obj = self.domain_mut(name)?;
            obj.load_sizes();
            if let Some(rt) = runtime {
                obj.memory = rt.memory.min(obj.max_memory);
                obj.vcpus = rt.vcpus;
            }
            obj.reason = DomainReason::FromSnapshot;
            if target == DomainState::Paused {
                obj.stop_clock();
                obj.state = DomainState::Paused;
            } else {
                obj.state = DomainState::Running;
                obj.running_since.get_or_insert_with(Instant::now);
            }
        }
        self.domain_mut(name)?.snapshots.set_current(snap)
    }
}

#[cfg(test)]
mod tests {
    use crate::HypervisorDriver;
    use crate::snapshot::{RevertTo, SnapshotParams, SnapshotState};
    use crate::test::TestDriver;
    use vireo_crds::{DomainReason, DomainState};

    fn params(name: &str) -> SnapshotParams {
        SnapshotParams {
            name: Some(name.into()),
            description: Some(format!("{name} desc")),
            disk_only: false,
        }
    }

    #[test]
    fn revert_brings_back_state_definition_and_sizes() {
        let d = TestDriver::default_node();
        let s1 = d.snapshot_create("test", &params("s1")).expect("s1");
        assert_eq!(
            (s1.state, s1.memory, s1.current),
            (SnapshotState::Running, true, true)
        );
        assert_eq!(s1.disks.len(), 1);
        d.set_domain_memory("test", 1 << 30).expect("setmem");
        d.destroy_domain("test").expect("destroy");
        let s2 = d.snapshot_create("test", &params("s2")).expect("s2");
        assert_eq!((s2.state, s2.memory), (SnapshotState::Shutoff, false));
        assert_eq!(s2.parent.as_deref(), Some("s1"));

        d.snapshot_revert("test", "s1", RevertTo::Snapshot)
            .expect("revert s1");
        assert_eq!(
            d.domain_state("test").expect("state"),
            (DomainState::Running, DomainReason::FromSnapshot)
        );
        assert_eq!(d.domain_info("test").expect("info").memory.0, "2Gi");
        assert_eq!(
            d.snapshot_current("test").expect("current").map(|s| s.name),
            Some("s1".to_string())
        );
        d.snapshot_revert("test", "s2", RevertTo::Snapshot)
            .expect("revert s2");
        assert_eq!(
            d.domain_state("test").expect("state"),
            (DomainState::Shutoff, DomainReason::FromSnapshot)
        );
        d.snapshot_revert("test", "s2", RevertTo::Paused)
            .expect("revert s2 paused");
        assert_eq!(
            d.domain_state("test").expect("state"),
            (DomainState::Paused, DomainReason::FromSnapshot)
        );
        let e = d.snapshot_create("test", &params("s1")).expect_err("taken");
        assert!(e.to_string().contains("already exists"), "{e}");
        d.destroy_domain("test").expect("destroy");
        let e = d.undefine_domain("test").expect_err("has snapshots");
        assert!(e.to_string().contains("snapshot-delete"), "{e}");
        d.snapshot_delete("test", "s1").expect("delete s1");
        assert_eq!(
            d.snapshot_get("test", "s2").expect("s2").parent,
            None,
            "s2 goes to s1's parent"
        );
        d.snapshot_delete("test", "s2").expect("delete s2");
        assert!(d.snapshot_list("test").expect("list").is_empty());
        assert!(d.snapshot_current("test").expect("current").is_none());
        d.undefine_domain("test").expect("undefine");
    }

    #[test]
    fn a_transient_domain_stays_running() {
        let d = TestDriver::default_node();
        let dom = crate::conformance::test_driver_fixture().domain("t");
        d.create_domain(&dom).expect("created");
        d.snapshot_create(
            "t",
            &SnapshotParams {
                disk_only: true,
                ..params("disks")
            },
        )
        .expect("disk-only");
        let s = d.snapshot_get("t", "disks").expect("get");
        assert_eq!((s.state, s.memory), (SnapshotState::DiskSnapshot, false));
        let e = d
            .snapshot_revert("t", "disks", RevertTo::Snapshot)
            .expect_err("transient to shutoff");
        assert!(e.to_string().contains("transient"), "{e}");
        d.snapshot_revert("t", "disks", RevertTo::Running)
            .expect("running");
        assert_eq!(
            d.domain_state("t").expect("state"),
            (DomainState::Running, DomainReason::FromSnapshot)
        );
    }
}
