//! What a node reconciler does with a Domain, given its `runStrategy`, its
//! `lifecycle` and the state the driver reports.

use vireo_crds::{DomainReason, DomainState, Lifecycle, LifecycleAction, RunStrategy};

/// The one step a reconciler takes on a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave it as it is.
    Nothing,
    /// Start the (inactive) domain.
    Start,
    /// Stop the domain gracefully (shutdown, then destroy after a timeout).
    Stop,
    /// Save the running domain's state on its node and stop it (managed
    /// save); its next start resumes it.
    Save,
}

/// What the reconciler remembers of a domain between passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct History {
    /// The domain was started at least once under this spec generation.
    pub started_once: bool,
}

/// Decides the next step.
///
/// * `Always`: keep it running; start it whenever it is off.
/// * `RerunOnFailure`: start it the first time, then again only after a crash.
/// * `Once`: start it the first time; never again.
/// * `Manual`: never act.
/// * `Halted`: stop it whenever it runs.
/// * `Saved`: save it (managed save) whenever it runs; never start it.
///
/// A domain that stopped is also subject to its `lifecycle`: `onCrash:
/// restart` restarts a crashed guest whatever the strategy (but `Halted`
/// and `Manual`). A guest in state `crashed` was preserved on purpose
/// (`onCrash: preserve`) and is still active: it is left for inspection.
pub fn decide(
    strategy: RunStrategy,
    lifecycle: &Lifecycle,
    state: DomainState,
    reason: DomainReason,
    history: History,
) -> Action {
    let active = state.is_active();
    let crashed = state == DomainState::Crashed
        || (state == DomainState::Shutoff && reason == DomainReason::Crashed);
    match strategy {
        RunStrategy::Halted if active => Action::Stop,
        // A guest paused by an error or preserved after a crash is saved
        // as it is, as libvirt's managedsave does with a paused domain.
        RunStrategy::Saved if active => Action::Save,
        RunStrategy::Halted | RunStrategy::Manual | RunStrategy::Saved => Action::Nothing,
        _ if active => Action::Nothing,
        // Unknown: the host is not reporting; nothing may be started elsewhere.
        _ if state == DomainState::Unknown => Action::Nothing,
        RunStrategy::Always => Action::Start,
        _ if !history.started_once => Action::Start,
        RunStrategy::RerunOnFailure if crashed => Action::Start,
        _ if crashed && lifecycle.on_crash == LifecycleAction::Restart => Action::Start,
        RunStrategy::RerunOnFailure | RunStrategy::Once => Action::Nothing,
    }
}

/// Whether a stop skips the guest's shutdown and destroys the domain at
/// once: its [`STOP_ANNOTATION`](vireo_crds::labels::STOP_ANNOTATION) says
/// `destroy`.
pub fn stop_at_once(annotations: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(vireo_crds::labels::STOP_ANNOTATION))
        .is_some_and(|v| v == vireo_crds::labels::STOP_DESTROY)
}

/// What the agent does about a running domain's `vireo.dev/paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseStep {
    Nothing,
    /// Pause the running domain.
    Suspend,
    /// Resume a domain the user paused.
    Resume,
}

/// Whether the Domain asks to be kept paused (`vireo.dev/paused: "true"`).
pub fn wants_paused(annotations: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(vireo_crds::labels::PAUSED_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// Pauses a running domain that should be paused, and resumes one that
/// the user paused once it should no longer be; a domain paused for
/// another reason (an I/O error, a watchdog) is left for inspection.
pub fn pause_step(want_paused: bool, state: DomainState, reason: DomainReason) -> PauseStep {
    match (want_paused, state) {
        (true, DomainState::Running) => PauseStep::Suspend,
        (false, DomainState::Paused) if reason == DomainReason::User => PauseStep::Resume,
        _ => PauseStep::Nothing,
    }
}

/// A one-shot action on a domain (`vireo.dev/request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Reboot,
    Reset,
    /// Drop the managed save image of an inactive domain, so that its next
    /// start boots afresh (`vireo managedsave-remove`).
    ManagedSaveRemove,
}

/// The Domain's request, if it has one: `Err` with the value when it names
/// no action (the agent drops it and says so).
pub fn request(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<std::result::Result<Request, String>> {
    let value = annotations?.get(vireo_crds::labels::REQUEST_ANNOTATION)?;
    Some(match value.as_str() {
        "reboot" => Ok(Request::Reboot),
        "reset" => Ok(Request::Reset),
        "managedsave-remove" => Ok(Request::ManagedSaveRemove),
        other => Err(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use DomainReason as R;
    use DomainState as S;

    const STARTED: History = History { started_once: true };

    fn d(s: RunStrategy, state: S, reason: R, h: History) -> Action {
        decide(s, &Lifecycle::default(), state, reason, h)
    }

    #[test]
    fn always_restarts_whatever_stopped_it() {
        for reason in [R::Shutdown, R::Destroyed, R::Crashed] {
            assert_eq!(
                d(RunStrategy::Always, S::Shutoff, reason, STARTED),
                Action::Start
            );
        }
        assert_eq!(
            d(RunStrategy::Always, S::Running, R::Booted, STARTED),
            Action::Nothing
        );
    }

    #[test]
    fn rerun_on_failure_restarts_only_after_a_crash() {
        assert_eq!(
            d(
                RunStrategy::RerunOnFailure,
                S::Shutoff,
                R::Unknown,
                History::default()
            ),
            Action::Start
        );
        assert_eq!(
            d(RunStrategy::RerunOnFailure, S::Shutoff, R::Crashed, STARTED),
            Action::Start
        );
        // A crashed guest kept for inspection (onCrash: preserve) is still active: left alone.
        assert_eq!(
            d(
                RunStrategy::RerunOnFailure,
                S::Crashed,
                R::Panicked,
                STARTED
            ),
            Action::Nothing
        );
        assert_eq!(
            d(
                RunStrategy::RerunOnFailure,
                S::Shutoff,
                R::Shutdown,
                STARTED
            ),
            Action::Nothing
        );
    }

    #[test]
    fn once_never_restarts() {
        assert_eq!(
            d(
                RunStrategy::Once,
                S::Shutoff,
                R::Unknown,
                History::default()
            ),
            Action::Start
        );
        assert_eq!(
            d(RunStrategy::Once, S::Shutoff, R::Crashed, STARTED),
            Action::Nothing
        );
    }

    #[test]
    fn halted_stops_and_manual_leaves_alone() {
        assert_eq!(
            d(RunStrategy::Halted, S::Running, R::Booted, STARTED),
            Action::Stop
        );
        assert_eq!(
            d(RunStrategy::Halted, S::Paused, R::User, STARTED),
            Action::Stop
        );
        assert_eq!(
            d(RunStrategy::Halted, S::Shutoff, R::Shutdown, STARTED),
            Action::Nothing
        );
        assert_eq!(
            d(
                RunStrategy::Manual,
                S::Shutoff,
                R::Crashed,
                History::default()
            ),
            Action::Nothing
        );
        assert_eq!(
            d(RunStrategy::Manual, S::Running, R::Booted, STARTED),
            Action::Nothing
        );
    }

    #[test]
    fn saved_saves_what_runs_and_starts_nothing() {
        for (state, reason) in [
            (S::Running, R::Booted),
            (S::Paused, R::User),
            (S::Crashed, R::Panicked),
        ] {
            assert_eq!(d(RunStrategy::Saved, state, reason, STARTED), Action::Save);
        }
        for reason in [R::Saved, R::Shutdown, R::Crashed] {
            assert_eq!(
                d(RunStrategy::Saved, S::Shutoff, reason, STARTED),
                Action::Nothing
            );
        }
        assert_eq!(
            d(
                RunStrategy::Saved,
                S::Shutoff,
                R::Unknown,
                History::default()
            ),
            Action::Nothing
        );
        // Back to Always: started again (the driver resumes the saved state).
        assert_eq!(
            d(RunStrategy::Always, S::Shutoff, R::Saved, STARTED),
            Action::Start
        );
    }

    #[test]
    fn unknown_host_starts_nothing() {
        assert_eq!(
            d(RunStrategy::Always, S::Unknown, R::Unknown, STARTED),
            Action::Nothing
        );
    }

    #[test]
    fn on_crash_restart_applies_to_once() {
        let lc = Lifecycle {
            on_crash: LifecycleAction::Restart,
            ..Lifecycle::default()
        };
        assert_eq!(
            decide(RunStrategy::Once, &lc, S::Shutoff, R::Crashed, STARTED),
            Action::Start
        );
        assert_eq!(
            decide(RunStrategy::Once, &lc, S::Shutoff, R::Shutdown, STARTED),
            Action::Nothing
        );
    }

    #[test]
    fn only_the_destroy_annotation_stops_at_once() {
        use std::collections::BTreeMap;
        let with = |v: &str| {
            BTreeMap::from([(
                vireo_crds::labels::STOP_ANNOTATION.to_string(),
                v.to_string(),
            )])
        };
        assert!(stop_at_once(Some(&with("destroy"))));
        assert!(!stop_at_once(Some(&with("shutdown"))));
        assert!(!stop_at_once(Some(&BTreeMap::new())));
        assert!(!stop_at_once(None));
    }

    #[test]
    fn pauses_when_asked_and_resumes_only_what_the_user_paused() {
        assert_eq!(pause_step(true, S::Running, R::Booted), PauseStep::Suspend);
        assert_eq!(pause_step(true, S::Paused, R::User), PauseStep::Nothing);
        assert_eq!(
            pause_step(true, S::Shutoff, R::Shutdown),
            PauseStep::Nothing
        );
        assert_eq!(pause_step(false, S::Paused, R::User), PauseStep::Resume);
        assert_eq!(pause_step(false, S::Paused, R::IoError), PauseStep::Nothing);
        assert_eq!(
            pause_step(false, S::Running, R::Unpaused),
            PauseStep::Nothing
        );
    }

    #[test]
    fn reads_the_paused_and_request_annotations() {
        use std::collections::BTreeMap;
        use vireo_crds::labels::{PAUSED_ANNOTATION, REQUEST_ANNOTATION};
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(wants_paused(Some(&one(PAUSED_ANNOTATION, "true"))));
        assert!(!wants_paused(Some(&one(PAUSED_ANNOTATION, "false"))));
        assert!(!wants_paused(None));
        assert_eq!(
            request(Some(&one(REQUEST_ANNOTATION, "reboot"))),
            Some(Ok(Request::Reboot))
        );
        assert_eq!(
            request(Some(&one(REQUEST_ANNOTATION, "reset"))),
            Some(Ok(Request::Reset))
        );
        assert_eq!(
            request(Some(&one(REQUEST_ANNOTATION, "managedsave-remove"))),
            Some(Ok(Request::ManagedSaveRemove))
        );
        assert_eq!(
            request(Some(&one(REQUEST_ANNOTATION, "explode"))),
            Some(Err("explode".to_string()))
        );
        assert_eq!(request(Some(&BTreeMap::new())), None);
        assert!(vireo_crds::labels::is_request_annotation(
            REQUEST_ANNOTATION
        ));
        assert!(!vireo_crds::labels::is_request_annotation(
            "vireo.dev/title"
        ));
    }
}
