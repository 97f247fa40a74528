//! What the operator's and the agents' DomainMigration controllers share:
//! the status writes (each one guarded by the resourceVersion it read, so
//! that two writers never both move a migration on from one phase), the
//! step conditions, and the conversions between the drivers' migration
//! types and the API's.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;
use vireo_crds::domain_migration::{MigrationDisk, MigrationIncoming, MigrationStats};
use vireo_crds::{DomainMigration, DomainMigrationStatus, MigrationPhase};

use crate::conditions::condition;
use crate::error::Result;

/// The phase a migration is in (`Pending` before anyone wrote one).
pub fn phase(m: &DomainMigration) -> MigrationPhase {
    m.status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or(MigrationPhase::Pending)
}

/// Writes the status `f` makes of the current one, as a merge patch that
/// holds only if the object is still at the version read.
pub async fn update(
    api: &Api<DomainMigration>,
    m: &DomainMigration,
    f: impl FnOnce(&mut DomainMigrationStatus),
) -> Result<DomainMigrationStatus> {
    let mut status = m.status.clone().unwrap_or_default();
    f(&mut status);
    let body = json!({
        "metadata": {"resourceVersion": m.resource_version()},
        "status": status,
    });
    api.patch_status(&m.name_any(), &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(status)
}

/// As [`update`], but when the object changed meanwhile without leaving
/// the phase it was read in (a deletion started, a label was set), the
/// write is made again on the current version: a step that took long
/// (perform) is never lost to an unrelated change.
pub async fn update_in_phase(
    api: &Api<DomainMigration>,
    m: &DomainMigration,
    f: impl Fn(&mut DomainMigrationStatus),
) -> Result<DomainMigrationStatus> {
    match update(api, m, &f).await {
        Err(crate::error::Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
            let Some(now) = api.get_opt(&m.name_any()).await? else {
                return Err(crate::error::Error::Kube(kube::Error::Api(e)));
            };
            if phase(&now) != phase(m) {
                return Err(crate::error::Error::Kube(kube::Error::Api(e)));
            }
            update(api, &now, &f).await
        }
        other => other,
    }
}

/// Sets (or replaces) one step's condition.
pub fn set_condition(
    status: &mut DomainMigrationStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
) {
    let c = condition(&status.conditions, type_, ok, reason, message, None);
    status.conditions.retain(|x| x.type_ != type_);
    status.conditions.push(c);
}

/// Ends the migration as failed: the step's condition, the message, the end time.
pub fn fail(status: &mut DomainMigrationStatus, step: &str, reason: &str, message: &str) {
    set_condition(status, step, false, reason, message);
    status.phase = Some(MigrationPhase::Failed);
    status.message = Some(message.to_string());
    status.end_time = Some(now());
}

/// Now, as the API's time.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Whether a step's condition is True.
pub fn step_ok(status: &DomainMigrationStatus, type_: &str) -> Option<bool> {
    crate::conditions::find(&status.conditions, type_).map(|c| c.status == "True")
}

/// The message of the first step that failed, for the final message.
pub fn first_failure(status: &DomainMigrationStatus) -> Option<String> {
    ["Prepared", "Transferred", "Finished"]
        .iter()
        .filter_map(|t| crate::conditions::find(&status.conditions, t))
        .find(|c| c.status != "True")
        .map(|c| c.message.clone())
}

/// The prepare step's answer as the API keeps it.
pub fn incoming_to_api(i: &vireo_drivers::migration::MigrationIncoming) -> MigrationIncoming {
    MigrationIncoming {
        uri: i.uri.clone(),
        disks: i
            .disks
            .iter()
            .map(|(name, uri)| MigrationDisk {
                name: name.clone(),
                uri: uri.clone(),
            })
            .collect(),
        cookie: (!i.cookie.is_null()).then(|| i.cookie.to_string()),
    }
}

/// The API's copy of the prepare step's answer, for the source's driver.
pub fn incoming_from_api(
    i: &MigrationIncoming,
) -> std::result::Result<vireo_drivers::migration::MigrationIncoming, String> {
    let cookie = match &i.cookie {
        None => serde_json::Value::Null,
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("status.incoming.cookie is not JSON: {e}"))?,
    };
    Ok(vireo_drivers::migration::MigrationIncoming {
        uri: i.uri.clone(),
        disks: i
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.uri.clone()))
            .collect(),
        cookie,
    })
}

/// The transfer's figures as the API keeps them.
pub fn stats_to_api(s: &vireo_drivers::migration::MigrationStats) -> MigrationStats {
    MigrationStats {
        total_ms: s.total_ms,
        downtime_ms: s.downtime_ms,
        // perform returns with the source paused for `downtime_ms` already.
        paused_at_ms: Some(now_ms().saturating_sub(s.downtime_ms)),
        memory_bytes: s.memory_bytes,
        disk_bytes: s.disk_bytes,
    }
}

/// Now, in Unix ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The guest-visible downtime once the target resumed it: from the
/// source's pause to now, never less than the driver's own figure.
pub fn downtime_until_now(stats: &MigrationStats) -> u64 {
    stats.paused_at_ms.map_or(stats.downtime_ms, |at| {
        now_ms().saturating_sub(at).max(stats.downtime_ms)
    })
}

/// An Event on the migration and the same on its Domain (when it exists).
pub async fn events(
    recorder: &kube::runtime::events::Recorder,
    m: &DomainMigration,
    domain: Option<&vireo_crds::Domain>,
    type_: EventType,
    reason: &str,
    note: String,
) {
    crate::k8s::event(recorder, m, type_, reason, "Migrate", note.clone()).await;
    if let Some(d) = domain {
        crate::k8s::event(
            recorder,
            d,
            type_,
            reason,
            "Migrate",
            format!("{note} (DomainMigration {})", m.name_any()),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_round_trips_through_the_api() {
        let i = vireo_drivers::migration::MigrationIncoming {
            uri: "tcp:10.0.0.2:49152".into(),
            disks: vec![("vda".into(), "nbd://10.0.0.2:49153/vda".into())],
            cookie: json!({"port": 49152}),
        };
        let api = incoming_to_api(&i);
        assert_eq!(api.disks[0].name, "vda");
        assert_eq!(incoming_from_api(&api), Ok(i));
        let mut bad = api;
        bad.cookie = Some("{".into());
        assert!(incoming_from_api(&bad).is_err_and(|e| e.contains("cookie")));
    }

    #[test]
    fn downtime_runs_from_the_pause_to_the_resume() {
        let mut s = MigrationStats {
            downtime_ms: 40,
            ..Default::default()
        };
        assert_eq!(downtime_until_now(&s), 40, "no pause time: the driver's");
        s.paused_at_ms = Some(now_ms() - 1_000);
        let d = downtime_until_now(&s);
        assert!((1_000..1_500).contains(&d), "{d}");
        // A source clock ahead of this one: never below the driver's figure.
        s.paused_at_ms = Some(now_ms() + 60_000);
        assert_eq!(downtime_until_now(&s), 40);
        let api = stats_to_api(&vireo_drivers::migration::MigrationStats {
            downtime_ms: 300,
            ..Default::default()
        });
        let at = api.paused_at_ms.expect("set");
        assert!(now_ms() - at >= 300, "paused 300 ms before now");
    }

    #[test]
    fn the_first_failed_step_is_the_message() {
        let mut s = DomainMigrationStatus::default();
        set_condition(&mut s, "Prepared", true, "Prepared", "ok");
        set_condition(&mut s, "Transferred", false, "TransferFailed", "boom");
        set_condition(&mut s, "Finished", false, "Cancelled", "cancelled");
        assert_eq!(first_failure(&s).as_deref(), Some("boom"));
        set_condition(&mut s, "Transferred", true, "Transferred", "sent");
        assert_eq!(first_failure(&s).as_deref(), Some("cancelled"));
        fail(&mut s, "Confirmed", "Cancelled", "x");
        assert_eq!(s.phase, Some(MigrationPhase::Failed));
        assert!(s.end_time.is_some());
    }
}
