//! Live migration between two test driver nodes, with libvirt's semantics
//! and no stream: each node keeps its own state (two agents, two
//! processes), and what would cross the wire (memory, device state) is
//! nothing for a guest that is only a record. The steps do what libvirt's
//! do to each side's domain:
//!
//! * prepare (target): defines the domain here and makes it active,
//!   paused with reason `migration`; the URI names this node's address;
//! * perform (source): pauses the running domain (reason `migration`);
//! * finish (target): resumes it (running, `migrated`), or on a cancelled
//!   migration destroys and removes what prepare made;
//! * confirm (source): stops and removes its copy (shut off, `migrated`),
//!   or on a cancelled migration resumes it.

use std::net::IpAddr;
use std::time::Instant;

use vireo_crds::{Domain, DomainReason, DomainState, ObjectKind};

use super::{Kind, State, TestDriver, object_name};
use crate::hypervisor::DomainRef;
use crate::migration::{MigrationIncoming, MigrationParams, MigrationStats};
use crate::{Error, Result};

const KIND: ObjectKind = ObjectKind::Domain;

/// The scheme of the URIs the test driver's prepare hands out.
pub const URI_SCHEME: &str = "test+migrate://";

fn waiting(st: &State, name: &str) -> Result<()> {
    let obj = st.domain(name)?;
    if obj.state == DomainState::Paused && obj.reason == DomainReason::Migration {
        Ok(())
    } else {
        Err(Error::invalid_state(
            KIND,
            name,
            format!(
                "is not in a migration (it is {} ({}))",
                obj.state, obj.reason
            ),
        ))
    }
}

impl TestDriver {
    pub(super) fn prepare_incoming(
        &self,
        domain: &Domain,
        params: &MigrationParams,
    ) -> Result<MigrationIncoming> {
        let name = object_name(&domain.metadata);
        let address: IpAddr = params.target_address.parse().map_err(|_| {
            Error::invalid_argument(
                KIND,
                &name,
                format!(
                    "the migration address '{}' is not an IP address",
                    params.target_address
                ),
            )
        })?;
        self.change(Kind::Domain, &name, |st| {
            if st.domains.get(&name).is_some_and(|o| o.is_active()) {
                return Err(Error::invalid_state(KIND, &name, "is already active here"));
            }
            st.define(domain)?;
            st.activate(&name, DomainReason::Migration)?;
            let obj = st.domain_mut(&name)?;
            obj.stop_clock();
            obj.state = DomainState::Paused;
            Ok(())
        })?;
        let host = match address {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        Ok(MigrationIncoming {
            uri: format!("{URI_SCHEME}{host}/{name}"),
            disks: Vec::new(),
            cookie: serde_json::Value::Null,
        })
    }

    pub(super) fn perform_outgoing(
        &self,
        name: &str,
        incoming: &MigrationIncoming,
    ) -> Result<MigrationStats> {
        if !incoming.uri.starts_with(URI_SCHEME) {
            return Err(Error::invalid_argument(
                KIND,
                name,
                format!(
                    "'{}' is not a test driver migration URI ({URI_SCHEME}ADDRESS/NAME): the target is not the test driver",
                    incoming.uri
                ),
            ));
        }
        let started = Instant::now();
        self.change(Kind::Domain, name, |st| {
            let obj = st.domain_mut(name)?;
            if obj.state != DomainState::Running {
                return Err(Error::invalid_state(
                    KIND,
                    name,
                    format!("is not running (it is {}): nothing to migrate", obj.state),
                ));
            }
            obj.stop_clock();
            obj.state = DomainState::Paused;
            obj.reason = DomainReason::Migration;
            Ok(MigrationStats {
                total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                downtime_ms: 0,
                memory_bytes: obj.memory,
                disk_bytes: 0,
            })
        })
    }

    pub(super) fn finish_incoming(&self, name: &str, succeeded: bool) -> Result<Option<DomainRef>> {
        self.change(Kind::Domain, name, |st| {
            waiting(st, name)?;
            if succeeded {
                let obj = st.domain_mut(name)?;
                obj.state = DomainState::Running;
                obj.reason = DomainReason::Migrated;
                obj.running_since = Some(Instant::now());
                Ok(Some(obj.reference()))
            } else {
                st.deactivate(name, DomainReason::Destroyed)?;
                st.domains.remove(name);
                Ok(None)
            }
        })
    }

    pub(super) fn confirm_outgoing(&self, name: &str, succeeded: bool) -> Result<()> {
        self.change(Kind::Domain, name, |st| {
            if succeeded {
                waiting(st, name)?;
                st.deactivate(name, DomainReason::Migrated)?;
                st.domains.remove(name);
                return Ok(());
            }
            // Cancelled: a source that perform paused runs again; one that
            // perform never paused runs on as it was.
            if waiting(st, name).is_ok() {
                let obj = st.domain_mut(name)?;
                obj.state = DomainState::Running;
                obj.reason = DomainReason::Unpaused;
                obj.running_since = Some(Instant::now());
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HypervisorDriver;

    fn params() -> MigrationParams {
        MigrationParams {
            target_address: "10.0.0.2".into(),
            copy_storage: false,
            max_downtime_ms: None,
            bandwidth_mib_s: None,
        }
    }

    /// Two nodes, `web` running on the first.
    fn nodes() -> (TestDriver, TestDriver, Domain) {
        let src = TestDriver::empty(super::super::default_node_info());
        let dst = TestDriver::empty(super::super::default_node_info());
        let dom = crate::conformance::test_driver_fixture().domain("web");
        src.define_domain(&dom).expect("defined");
        src.start_domain("web").expect("started");
        let def = src.domain_definition("web", true).expect("def");
        (src, dst, def)
    }

    fn state(d: &TestDriver) -> Option<(DomainState, DomainReason)> {
        d.domain_state("web").ok()
    }

    #[test]
    fn the_four_steps_move_the_domain_and_never_run_it_twice() {
        let (src, dst, def) = nodes();
        let incoming = dst.migrate_prepare(&def, &params()).expect("prepare");
        assert_eq!(incoming.uri, "test+migrate://10.0.0.2/web");
        assert_eq!(
            state(&dst),
            Some((DomainState::Paused, DomainReason::Migration))
        );
        let stats = src
            .migrate_perform("web", &incoming, &params())
            .expect("perform");
        assert_eq!(stats.memory_bytes, 1 << 30, "the fixture's memory");
        assert_eq!(
            state(&src),
            Some((DomainState::Paused, DomainReason::Migration))
        );
        let r = dst.migrate_finish("web", true).expect("finish");
        assert!(r.is_some_and(|r| r.id.is_some()));
        assert_eq!(
            state(&dst),
            Some((DomainState::Running, DomainReason::Migrated))
        );
        src.migrate_confirm("web", true).expect("confirm");
        assert_eq!(state(&src), None, "the source's copy is gone");
        assert_eq!(
            dst.domain_definition("web", true).expect("def").spec.uuid,
            def.spec.uuid,
            "the same domain"
        );
        assert!(dst.domain_is_persistent("web").expect("persistent"));
    }

    #[test]
    fn a_cancelled_migration_leaves_the_guest_running_on_the_source() {
        let (src, dst, def) = nodes();
        let incoming = dst.migrate_prepare(&def, &params()).expect("prepare");
        src.migrate_perform("web", &incoming, &params())
            .expect("perform");
        dst.migrate_finish("web", false).expect("finish cancelled");
        assert_eq!(state(&dst), None, "prepare's domain is removed");
        src.migrate_confirm("web", false)
            .expect("confirm cancelled");
        assert_eq!(state(&src).map(|s| s.0), Some(DomainState::Running));
        // Perform that failed before pausing: confirm leaves it running.
        src.migrate_confirm("web", false).expect("again");
        assert_eq!(state(&src).map(|s| s.0), Some(DomainState::Running));
    }

    #[test]
    fn bad_steps_are_refused_with_the_reason() {
        let (src, dst, def) = nodes();
        let mut p = params();
        p.target_address = "node2.example".into();
        let e = dst.migrate_prepare(&def, &p).expect_err("a host name");
        assert!(e.to_string().contains("not an IP address"), "{e}");
        // Preparing where the domain already runs.
        let e = src.migrate_prepare(&def, &params()).expect_err("active");
        assert!(e.to_string().contains("already active"), "{e}");
        // A URI of another driver.
        let other = MigrationIncoming {
            uri: "tcp:10.0.0.2:49152".into(),
            disks: Vec::new(),
            cookie: serde_json::Value::Null,
        };
        let e = src
            .migrate_perform("web", &other, &params())
            .expect_err("not ours");
        assert!(
            e.to_string().contains("not a test driver migration URI"),
            "{e}"
        );
        assert_eq!(state(&src).map(|s| s.0), Some(DomainState::Running));
        // Finish without prepare; confirm of success on a running source.
        let e = dst
            .migrate_finish("web", true)
            .expect_err("nothing prepared");
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let e = src.migrate_confirm("web", true).expect_err("not performed");
        assert!(e.to_string().contains("not in a migration"), "{e}");
    }

    #[test]
    fn a_persistent_node_keeps_a_prepared_domain() {
        let dir = std::env::temp_dir().join(format!(
            "vireo-test-migration-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let (src, _, def) = nodes();
        let dst = TestDriver::from_dir(&dir).expect("node");
        let incoming = dst.migrate_prepare(&def, &params()).expect("prepare");
        drop(dst);
        let dst = TestDriver::from_dir(&dir).expect("again");
        src.migrate_perform("web", &incoming, &params())
            .expect("perform");
        dst.migrate_finish("web", true)
            .expect("finish after a restart");
        assert_eq!(state(&dst).map(|s| s.0), Some(DomainState::Running));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
