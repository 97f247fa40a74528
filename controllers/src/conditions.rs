//! Kubernetes conditions, kept the conventional way: one per type, the
//! transition time changing only when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Builds a condition, keeping `lastTransitionTime` from `previous` when
/// the status has not changed.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    status_condition(
        previous,
        type_,
        if status { "True" } else { "False" },
        reason,
        message,
        generation,
    )
}

/// Same with a literal status (`True`, `False`, `Unknown`).
pub fn status_condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// Whether two condition lists say the same (ignoring transition times).
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

/// The condition of a type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let first = condition(&[], "Ready", true, "Running", "ok", Some(1));
        let again = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "Running",
            "still",
            Some(2),
        );
        assert_eq!(again.last_transition_time, first.last_transition_time);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let flipped = condition(
            std::slice::from_ref(&first),
            "Ready",
            false,
            "Stopped",
            "no",
            Some(2),
        );
        assert_ne!(flipped.last_transition_time, first.last_transition_time);
        assert!(same(
            std::slice::from_ref(&first),
            &[condition(&[], "Ready", true, "Running", "ok", Some(1))]
        ));
        assert!(!same(&[first], &[flipped]));
    }
}
