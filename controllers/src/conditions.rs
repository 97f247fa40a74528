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

/// The conditions the operator keeps on every bound Domain.
pub const OPERATOR_DOMAIN_CONDITIONS: [&str; 4] = [
    "Scheduled",
    "VolumesReady",
    "NetworksReady",
    "HostReachable",
];

/// `Scheduled`'s message once bound.
pub fn bound_message(node: &str) -> String {
    format!("bound to host {node}")
}

/// `VolumesReady`'s message when every volume is ready on the node.
pub fn volumes_ready_message(count: usize, node: &str) -> String {
    format!("{count} volume(s) ready on {node}")
}

/// `NetworksReady`'s message when every network is active on the node.
pub fn networks_ready_message(count: usize, node: &str) -> String {
    format!("{count} network(s) active on {node}")
}

/// `HostReachable`'s message while the Host reports.
pub fn host_reporting_message(node: &str) -> String {
    format!("host {node} is reporting")
}

/// What the operator says of a Domain that uses no volume and no network,
/// bound to a Host that reports: scheduled, both gates open, the Host
/// reachable. The node's agent writes these in the status apply that says
/// the guest runs, so that such a Domain costs the API server one status
/// write instead of two (issue 19); the operator writes them itself when
/// anything differs, and from then on they are its own.
pub fn ungated_domain_conditions(
    previous: &[Condition],
    node: &str,
    generation: Option<i64>,
) -> Vec<Condition> {
    vec![
        condition(
            previous,
            "Scheduled",
            true,
            "Bound",
            bound_message(node),
            generation,
        ),
        condition(
            previous,
            "VolumesReady",
            true,
            "Ready",
            volumes_ready_message(0, node),
            generation,
        ),
        condition(
            previous,
            "NetworksReady",
            true,
            "Ready",
            networks_ready_message(0, node),
            generation,
        ),
        condition(
            previous,
            "HostReachable",
            true,
            "HostReady",
            host_reporting_message(node),
            generation,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_copy_of_the_operators_conditions_is_what_the_operator_says() {
        let c = ungated_domain_conditions(&[], "node-2", Some(2));
        let types: Vec<&str> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, OPERATOR_DOMAIN_CONDITIONS);
        assert!(
            c.iter()
                .all(|c| c.status == "True" && c.observed_generation == Some(2))
        );
        assert_eq!(c[0].message, "bound to host node-2");
        assert_eq!(c[1].message, "0 volume(s) ready on node-2");
        assert_eq!(c[2].message, "0 network(s) active on node-2");
        assert_eq!(c[3].message, "host node-2 is reporting");
        // Written again, they keep their transition times.
        let again = ungated_domain_conditions(&c, "node-2", Some(2));
        assert_eq!(again, c);
    }

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
