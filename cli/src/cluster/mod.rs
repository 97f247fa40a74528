//! `kube:///`: the CLI on a cluster. Every command goes through the API
//! server as the kubeconfig's identity, so the cluster's RBAC decides what
//! it may do; what the CLI reads is what the agents wrote into the
//! objects' status, and what it changes is the objects' spec, which the
//! agents carry out.
//!
//! | URI                          | kubeconfig context | namespace                      |
//! |------------------------------|--------------------|--------------------------------|
//! | `kube:///`                   | the current one    | the context's, else `default`  |
//! | `kube:///CONTEXT`            | `CONTEXT`          | the context's, else `default`  |
//! | `kube:///?namespace=NS`      | the current one    | `NS`                           |
//! | `kube:///CONTEXT?namespace=NS` | `CONTEXT`        | `NS`                           |
//!
//! A domain or volume argument is `NAME` (in the connection's namespace)
//! or `NS/NAME`; the CLI prints them as `NS/NAME`.

mod domains;
mod networks;
mod snapshots;
mod storage;
pub mod subresources;

use std::future::Future;
use std::sync::Arc;

use kube::config::KubeConfigOptions;
use vireo_crds::ObjectKind;
use vireo_drivers::error::ObjectName;
use vireo_drivers::{Connection, Error, Result};

/// The field manager of what the CLI applies.
pub const FIELD_MANAGER: &str = "vireo-cli";

/// Whether a URI names a cluster connection.
pub fn is_kube_uri(uri: &str) -> bool {
    uri.starts_with("kube:")
}

/// What a `kube:` URI asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The kubeconfig context; `None` for the current one.
    pub context: Option<String>,
    /// The namespace; `None` for the context's.
    pub namespace: Option<String>,
}

/// Parses `kube:///[CONTEXT][?namespace=NS]`.
pub fn parse_uri(uri: &str) -> std::result::Result<Target, String> {
    let rest = uri
        .strip_prefix("kube://")
        .ok_or("expected kube:///[CONTEXT][?namespace=NS]")?;
    let rest = rest
        .strip_prefix('/')
        .ok_or("a host part is not supported; use kube:///CONTEXT (a kubeconfig context)")?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.contains('/') {
        return Err(format!(
            "'{path}' is not a kubeconfig context name (kube:///CONTEXT)"
        ));
    }
    let context = (!path.is_empty()).then(|| path.to_string());
    let mut namespace = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        match pair.split_once('=') {
            Some(("namespace", ns)) if is_dns_label(ns) => namespace = Some(ns.to_string()),
            Some(("namespace", ns)) => {
                return Err(format!("'{ns}' is not a namespace name"));
            }
            _ => {
                return Err(format!("unknown parameter '{pair}' (known: namespace=NS)"));
            }
        }
    }
    Ok(Target { context, namespace })
}

/// A Kubernetes namespace name: a DNS label.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// What the three drivers of a cluster connection share: the runtime the
/// synchronous driver calls block on, the client, the namespace.
pub struct Kube {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    namespace: String,
}

impl Kube {
    /// Runs a future to completion on the connection's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// The connection's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `NS/NAME` or `NAME` (in the connection's namespace) as (namespace, name).
    pub fn split<'a>(&'a self, text: &'a str) -> (&'a str, &'a str) {
        split_name(&self.namespace, text)
    }
}

/// `NS/NAME` or `NAME` (in `namespace`) as (namespace, name).
pub fn split_name<'a>(namespace: &'a str, text: &'a str) -> (&'a str, &'a str) {
    match text.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (namespace, text),
    }
}

/// A `metadata.generateName` for an object made for `name` (a
/// DomainMigration, a DomainRestore): at most 52 bytes of it and `-`, so
/// that the API server's suffix keeps the whole within 63.
pub fn generate_name(name: &str) -> String {
    let mut end = name.len().min(52);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}-", name[..end].trim_end_matches(['-', '.']))
}

/// The name the CLI prints for a namespaced object: `NS/NAME`.
pub fn full_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// An API error as the drivers' errors: 404 is "not found", 403
/// "forbidden" with the API server's message, 409 "already exists" (or
/// a conflict), 422 and 400 an invalid argument.
pub fn api_error(kind: ObjectKind, name: &str, e: kube::Error) -> Error {
    let object = ObjectName::new(kind, name);
    match e {
        kube::Error::Api(s) => match s.code {
            404 => Error::NotFound(object),
            403 => Error::Forbidden {
                object,
                message: s.message,
            },
            409 if s.reason == "AlreadyExists" => Error::AlreadyExists {
                object,
                detail: String::new(),
            },
            400 | 422 => Error::InvalidArgument {
                object,
                message: s.message,
            },
            _ => Error::OperationFailed {
                object,
                message: format!("the API server answered {}: {}", s.code, s.message),
            },
        },
        other => Error::OperationFailed {
            object,
            message: format!("cannot reach the API server: {other}"),
        },
    }
}

/// Opens a cluster connection: the kubeconfig's context (the current one,
/// or the URI's), as its user.
pub fn open(uri: &str) -> Result<Connection> {
    let kube = open_kube(uri)?;
    Ok(Connection::new(
        uri,
        Arc::new(domains::Domains(kube.clone())),
        Arc::new(networks::Networks(kube.clone())),
        Arc::new(storage::Storage(kube)),
    ))
}

/// The client of a `kube:` URI, for the commands that only a cluster has
/// (`migrate NAME NODE`, `drain NODE`).
pub fn open_kube(uri: &str) -> Result<Arc<Kube>> {
    let fail = |message: String| Error::Connect {
        uri: uri.to_string(),
        message,
    };
    let target = parse_uri(uri).map_err(fail)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start a runtime: {e}")))?;
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..Default::default()
    };
    let config = rt
        .block_on(kube::Config::from_kubeconfig(&options))
        .map_err(|e| fail(format!("cannot load the kubeconfig: {e}")))?;
    let namespace = target
        .namespace
        .unwrap_or_else(|| config.default_namespace.clone());
    // The client's buffer spawns its worker on the current runtime.
    let client = rt
        .block_on(async { kube::Client::try_from(config) })
        .map_err(|e| fail(format!("cannot make a client: {e}")))?;
    Ok(Arc::new(Kube {
        rt,
        client,
        namespace,
    }))
}

/// What the kube connection does not do, named as such.
pub fn unsupported(kind: ObjectKind, name: &str, operation: &'static str) -> Error {
    Error::Unsupported {
        object: ObjectName::new(kind, name),
        driver: "kube",
        operation,
    }
}

/// An object ready for server-side apply: without what the API server,
/// the operator and the agents set (server metadata, finalizers, the
/// node label, kubectl's last applied copy), so that applying what
/// `dumpspec` or `edit` read takes none of it over.
pub fn for_apply(meta: &mut kube::api::ObjectMeta) {
    meta.resource_version = None;
    meta.uid = None;
    meta.managed_fields = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.finalizers = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.remove(vireo_crds::labels::NODE);
    }
    if let Some(notes) = meta.annotations.as_mut() {
        notes.remove("kubectl.kubernetes.io/last-applied-configuration");
        notes.retain(|k, _| !vireo_crds::labels::is_request_annotation(k));
    }
}

/// Server-side apply as `vireo-cli`, taking over the fields it sets from
/// other managers (`kubectl apply` before): `define` replaces a definition,
/// as virsh's does.
pub fn apply_params() -> kube::api::PatchParams {
    kube::api::PatchParams::apply(FIELD_MANAGER).force()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(context: Option<&str>, namespace: Option<&str>) -> Target {
        Target {
            context: context.map(str::to_string),
            namespace: namespace.map(str::to_string),
        }
    }

    #[test]
    fn parses_context_and_namespace() {
        assert_eq!(parse_uri("kube:///"), Ok(t(None, None)));
        assert_eq!(parse_uri("kube:///prod"), Ok(t(Some("prod"), None)));
        assert_eq!(
            parse_uri("kube:///?namespace=team-a"),
            Ok(t(None, Some("team-a")))
        );
        assert_eq!(
            parse_uri("kube:///kind-dev?namespace=b"),
            Ok(t(Some("kind-dev"), Some("b")))
        );
    }

    #[test]
    fn refuses_what_it_cannot_mean() {
        for bad in [
            "kube://host/",
            "kube:",
            "kube:///a/b",
            "kube:///?ns=a",
            "kube:///?namespace=Team_A",
            "kube:///?namespace=",
            "test:///default",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad} was accepted");
        }
        assert!(is_kube_uri("kube:///"));
        assert!(!is_kube_uri("kvm:///system"));
    }

    #[test]
    fn names_resolve_in_the_connection_namespace_unless_qualified() {
        assert_eq!(split_name("team-a", "web"), ("team-a", "web"));
        assert_eq!(split_name("team-a", "team-b/web"), ("team-b", "web"));
        assert_eq!(full_name("team-a", "web"), "team-a/web");
    }

    #[test]
    fn applies_leave_out_what_others_set() {
        let mut meta = kube::api::ObjectMeta {
            name: Some("web".into()),
            resource_version: Some("7".into()),
            finalizers: Some(vec!["vireo.dev/node-cleanup".into()]),
            labels: Some(
                [
                    (vireo_crds::labels::NODE.to_string(), "node-1".to_string()),
                    ("app".to_string(), "web".to_string()),
                ]
                .into(),
            ),
            annotations: Some(
                [
                    (
                        vireo_crds::labels::STOP_ANNOTATION.to_string(),
                        "destroy".to_string(),
                    ),
                    ("vireo.dev/title".to_string(), "Web".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        };
        for_apply(&mut meta);
        assert_eq!(meta.name.as_deref(), Some("web"));
        assert!(meta.resource_version.is_none() && meta.finalizers.is_none());
        let labels = meta.labels.unwrap_or_default();
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["app"]);
        let notes = meta.annotations.unwrap_or_default();
        assert_eq!(notes.keys().collect::<Vec<_>>(), ["vireo.dev/title"]);
    }

    #[test]
    fn api_errors_read_as_on_a_node() {
        let status = |code: u16, reason: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                reason: reason.to_string(),
                message: "domains.vireo.dev \"x\" is forbidden".to_string(),
                ..Default::default()
            }))
        };
        let e = api_error(ObjectKind::Domain, "b/x", status(404, "NotFound"));
        assert_eq!(e.to_string(), "domain 'b/x' not found");
        let e = api_error(ObjectKind::Domain, "b/x", status(403, "Forbidden"));
        assert_eq!(
            e.to_string(),
            "domain 'b/x': forbidden: domains.vireo.dev \"x\" is forbidden"
        );
        let e = api_error(ObjectKind::Domain, "b/x", status(409, "AlreadyExists"));
        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    }
}
