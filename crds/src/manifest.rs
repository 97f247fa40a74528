//! Reading manifests: one YAML stream holding any of the Vireo kinds, as
//! `kubectl apply -f`, `vireo define -f` and standalone mode take them.

use serde::Deserialize;

use crate::{API_VERSION, Domain, Host, Network, StoragePool, StorageVol};

/// One object of any Vireo kind (serialized as the object itself).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Manifest {
    Domain(Box<Domain>),
    Network(Box<Network>),
    StoragePool(Box<StoragePool>),
    StorageVol(Box<StorageVol>),
    Host(Box<Host>),
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not YAML: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {index}: apiVersion is '{found}', expected '{API_VERSION}'")]
    ApiVersion { index: usize, found: String },
    #[error(
        "document {index}: kind '{found}' is not a Vireo kind (Domain, Network, StoragePool, StorageVol, Host)"
    )]
    Kind { index: usize, found: String },
    #[error("document {index} ({kind} '{name}'): {source}")]
    Invalid {
        index: usize,
        kind: String,
        name: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("line {line}: nested deeper than {MAX_DEPTH} levels; a manifest is far flatter")]
    TooDeep { line: usize },
    #[error("document {index} ({kind}): metadata.name is missing")]
    NoName { index: usize, kind: String },
    #[error(
        "document {index} ({kind} '{name}'): {field}: unknown field (the {kind} schema has no such field)"
    )]
    UnknownField {
        index: usize,
        kind: String,
        name: String,
        field: String,
    },
}

/// The CRDs' schemas, generated once.
fn crds() -> &'static [k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition]
{
    static CRDS: std::sync::OnceLock<
        Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
    > = std::sync::OnceLock::new();
    CRDS.get_or_init(crate::crd::all)
}

/// The first field of `value` that `kind`'s CRD schema does not know, as a
/// path (`spec.devices.disks[0].sise`): the API server refuses those under
/// strict field validation (kubectl's default), so reading a manifest does
/// too rather than drop them silently.
fn unknown_field(kind: &str, value: &serde_yaml_ng::Value) -> Option<String> {
    let crd = crds().iter().find(|c| c.spec.names.kind == kind)?;
    let schema = crd
        .spec
        .versions
        .first()?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?;
    unknown_in(schema, value, "")
}

fn unknown_in(
    schema: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
    value: &serde_yaml_ng::Value,
    path: &str,
) -> Option<String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    };
    if schema.x_kubernetes_preserve_unknown_fields == Some(true) {
        return None;
    }
    match value {
        serde_yaml_ng::Value::Mapping(map) => {
            let props = schema.properties.as_ref()?;
            for (k, v) in map {
                let key = match k {
                    serde_yaml_ng::Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                // Every object has these; the CRD schema leaves them out.
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match props.get(&key) {
                    Some(sub) => {
                        if let Some(u) = unknown_in(sub, v, &here) {
                            return Some(u);
                        }
                    }
                    None => match &schema.additional_properties {
                        Some(JSONSchemaPropsOrBool::Schema(sub)) => {
                            if let Some(u) = unknown_in(sub, v, &here) {
                                return Some(u);
                            }
                        }
                        Some(JSONSchemaPropsOrBool::Bool(true)) => {}
                        _ => return Some(here),
                    },
                }
            }
            None
        }
        serde_yaml_ng::Value::Sequence(items) => {
            let Some(JSONSchemaPropsOrArray::Schema(sub)) = &schema.items else {
                return None;
            };
            items
                .iter()
                .enumerate()
                .find_map(|(i, v)| unknown_in(sub, v, &format!("{path}[{i}]")))
        }
        _ => None,
    }
}

/// How deep a manifest may nest (mappings and sequences, block or flow):
/// deeper input is refused before the YAML parser, whose time grows with
/// the square of the depth, reads it. libxml2's limit for XML; no
/// Vireo manifest comes near it.
pub const MAX_DEPTH: usize = 256;

/// A cheap upper bound of a YAML stream's nesting, in one pass: flow
/// brackets outside quotes and comments, plus the block levels (each
/// deeper column where a node starts, as the YAML scanner's indentation
/// stack has them). Block scalar (`|`, `>`) content is skipped. Returns
/// the line where the bound first passes `limit`.
fn too_deep(text: &str, limit: usize) -> Option<usize> {
    let mut flow = 0usize;
    let mut columns: Vec<usize> = Vec::new();
    let mut quote: Option<u8> = None;
    let mut scalar_parent: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        if let Some(parent) = scalar_parent {
            if indent == bytes.len() || indent > parent {
                continue;
            }
            scalar_parent = None;
        }
        if quote.is_none() && flow == 0 {
            if indent == bytes.len() || bytes[indent] == b'#' {
                continue;
            }
            while columns.last().is_some_and(|&c| c > indent) {
                columns.pop();
            }
        }
        let mut node_start = quote.is_none();
        let mut i = indent;
        while i < bytes.len() {
            let b = bytes[i];
            match quote {
                Some(b'\'') => {
                    if b == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 1;
                        } else {
                            quote = None;
                        }
                    }
                }
                Some(_) => {
                    if b == b'\\' {
                        i += 1;
                    } else if b == b'"' {
                        quote = None;
                    }
                }
                None => {
                    if b == b' ' || b == b'\t' {
                        i += 1;
                        continue;
                    }
                    if b == b'#' && (i == 0 || matches!(bytes[i - 1], b' ' | b'\t')) {
                        break;
                    }
                    if node_start && flow == 0 && columns.last().is_none_or(|&c| c < i) {
                        columns.push(i);
                    }
                    let spaced = bytes.get(i + 1).is_none_or(|c| *c == b' ');
                    match b {
                        b'[' | b'{' if node_start || flow > 0 => {
                            flow += 1;
                            node_start = true;
                        }
                        b']' | b'}' if flow > 0 => {
                            flow -= 1;
                            node_start = false;
                        }
                        b',' if flow > 0 => node_start = true,
                        b'-' | b'?' | b':' if spaced => node_start = true,
                        b'\'' | b'"' if node_start => {
                            quote = Some(b);
                            node_start = false;
                        }
                        _ => node_start = false,
                    }
                    if flow + columns.len() > limit {
                        return Some(n + 1);
                    }
                }
            }
            i += 1;
        }
        // A block scalar: `key: |`, `- >-`; its lines are text, not nodes.
        if quote.is_none() && flow == 0 {
            let content = line.split(" #").next().unwrap_or(line).trim_end();
            let indicator = content
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .trim_start_matches(['-', ' ']);
            if indicator.starts_with(['|', '>'])
                && indicator[1..]
                    .bytes()
                    .all(|c| c == b'-' || c == b'+' || c.is_ascii_digit())
            {
                scalar_parent = Some(indent);
            }
        }
    }
    None
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Option<NameOnly>,
}

#[derive(Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: Option<String>,
}

impl Manifest {
    /// Reads every document of a YAML stream; empty documents are skipped.
    pub fn parse_all(text: &str) -> Result<Vec<Manifest>, ManifestError> {
        if let Some(line) = too_deep(text, MAX_DEPTH) {
            return Err(ManifestError::TooDeep { line });
        }
        let mut out = Vec::new();
        for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let index = index + 1;
            let value = serde_yaml_ng::Value::deserialize(doc)
                .map_err(|source| ManifestError::Yaml { index, source })?;
            if value.is_null() {
                continue;
            }
            out.push(Self::from_value(index, value)?);
        }
        Ok(out)
    }

    fn from_value(index: usize, value: serde_yaml_ng::Value) -> Result<Manifest, ManifestError> {
        let meta: TypeMeta = serde_yaml_ng::from_value(value.clone())
            .map_err(|source| ManifestError::Yaml { index, source })?;
        if meta.api_version != API_VERSION {
            return Err(ManifestError::ApiVersion {
                index,
                found: meta.api_version,
            });
        }
        let name = meta
            .metadata
            .and_then(|m| m.name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ManifestError::NoName {
                index,
                kind: meta.kind.clone(),
            })?;
        if let Some(field) = unknown_field(&meta.kind, &value) {
            return Err(ManifestError::UnknownField {
                index,
                kind: meta.kind.clone(),
                name,
                field,
            });
        }
        let invalid = |source| ManifestError::Invalid {
            index,
            kind: meta.kind.clone(),
            name: name.clone(),
            source,
        };
        // The error names the field (`spec.vcpus: invalid type: ...`).
        fn typed<T: serde::de::DeserializeOwned>(
            value: serde_yaml_ng::Value,
        ) -> Result<T, serde_yaml_ng::Error> {
            serde_path_to_error::deserialize(value).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path.is_empty() || path == "." {
                    inner
                } else {
                    <serde_yaml_ng::Error as serde::de::Error>::custom(format!("{path}: {inner}"))
                }
            })
        }
        Ok(match meta.kind.as_str() {
            "Domain" => Manifest::Domain(typed(value).map_err(invalid)?),
            "Network" => Manifest::Network(typed(value).map_err(invalid)?),
            "StoragePool" => Manifest::StoragePool(typed(value).map_err(invalid)?),
            "StorageVol" => Manifest::StorageVol(typed(value).map_err(invalid)?),
            "Host" => Manifest::Host(typed(value).map_err(invalid)?),
            other => {
                return Err(ManifestError::Kind {
                    index,
                    found: other.to_string(),
                });
            }
        })
    }

    /// The checks a node applies before it realizes the object: its name
    /// is a Kubernetes object name (as the API server requires), and its
    /// spec passes [`crate::validate`]. Errors name the field.
    pub fn validate(&self) -> Result<(), crate::validate::ValidationError> {
        use crate::validate::{Validate, ValidationError, is_dns_subdomain};
        let meta = match self {
            Self::Domain(o) => &o.metadata,
            Self::Network(o) => &o.metadata,
            Self::StoragePool(o) => &o.metadata,
            Self::StorageVol(o) => &o.metadata,
            Self::Host(o) => &o.metadata,
        };
        let name = meta.name.as_deref().unwrap_or_default();
        if !is_dns_subdomain(name) {
            return Err(ValidationError {
                field: "metadata.name".into(),
                message: format!(
                    "'{}' is not a Kubernetes object name (at most 253 characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit)",
                    name.chars().take(64).collect::<String>()
                ),
            });
        }
        if let Some(ns) = meta.namespace.as_deref()
            && (ns.len() > 63 || !is_dns_subdomain(ns) || ns.contains('.'))
        {
            return Err(ValidationError {
                field: "metadata.namespace".into(),
                message: format!("'{ns}' is not a namespace name"),
            });
        }
        match self {
            Self::Domain(o) => o.spec.validate(),
            Self::Network(o) => o.spec.validate(),
            Self::StoragePool(o) => o.spec.validate(),
            Self::StorageVol(o) => o.spec.validate(),
            Self::Host(_) => Ok(()),
        }
    }

    /// The object's name (empty when it has none).
    pub fn name(&self) -> &str {
        let meta = match self {
            Self::Domain(o) => &o.metadata,
            Self::Network(o) => &o.metadata,
            Self::StoragePool(o) => &o.metadata,
            Self::StorageVol(o) => &o.metadata,
            Self::Host(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }

    /// The kind, as in the manifest.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Domain(_) => "Domain",
            Self::Network(_) => "Network",
            Self::StoragePool(_) => "StoragePool",
            Self::StorageVol(_) => "StorageVol",
            Self::Host(_) => "Host",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_stream_of_kinds() {
        let text = r#"
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata: {name: web}
spec: {type: test, memory: 1Gi, vcpus: 1}
---
---
apiVersion: vireo.dev/v1alpha1
kind: Network
metadata: {name: lan}
spec: {forwardMode: isolated}
"#;
        let all = Manifest::parse_all(text).expect("parses");
        assert_eq!(all.len(), 2);
        let Manifest::Domain(d) = &all[0] else {
            panic!("first is a domain")
        };
        assert_eq!(d.metadata.name.as_deref(), Some("web"));
        assert_eq!(d.spec.vcpus, 1);
        assert_eq!(all[1].kind(), "Network");
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let err = Manifest::parse_all(
            "apiVersion: vireo.dev/v1alpha1\nkind: Domain\nmetadata: {name: x}\nspec: {type: test, memory: 1Gi}\n",
        )
        .expect_err("vcpus missing");
        let msg = err.to_string();
        assert!(msg.contains("Domain 'x'") && msg.contains("vcpus"), "{msg}");

        let err = Manifest::parse_all("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
            .expect_err("not ours");
        assert!(err.to_string().contains("apiVersion is 'v1'"), "{err}");

        let err =
            Manifest::parse_all("apiVersion: vireo.dev/v1alpha1\nkind: Pod\nmetadata: {name: p}\n")
                .expect_err("not ours");
        assert!(err.to_string().contains("kind 'Pod'"), "{err}");

        let err = Manifest::parse_all("apiVersion: vireo.dev/v1alpha1\nkind: Domain\nspec: {}\n")
            .expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_at_once() {
        let n = 100_000;
        for (what, text) in [
            (
                "flow sequences",
                format!("{}{}", "[".repeat(n), "]".repeat(n)),
            ),
            (
                "flow mappings",
                format!("{}{}", "{a: ".repeat(n), "}".repeat(n)),
            ),
            ("JSON", format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n))),
            ("block sequences", format!("{}x\n", "- ".repeat(n))),
            (
                // Indentation grows with the square of the depth: 3,000
                // levels are 4.5 MB.
                "block mappings",
                (0..3_000)
                    .map(|i| format!("{}k:\n", " ".repeat(i)))
                    .collect(),
            ),
        ] {
            let started = std::time::Instant::now();
            let err = Manifest::parse_all(&text).expect_err(what).to_string();
            assert!(
                err.contains("nested deeper than 256") && !err.contains('\n'),
                "{what}: {err}"
            );
            eprintln!("{what}, {n} deep: {err} ({:?})", started.elapsed());
        }
    }

    #[test]
    fn the_depth_bound_leaves_real_manifests_alone() {
        // Block scalars, quotes, comments and flow values of ordinary depth.
        let text = r#"
apiVersion: vireo.dev/v1alpha1
kind: Domain
metadata:
  name: web   # [[[[ not nesting
  annotations: {"a": "[[[[{{{{", b: '[[['}
spec:
  type: test
  memory: 1Gi
  vcpus: 1
  os:
    cmdline: >-
      [[[[[[ console=ttyS0
      {{{{{{{
    kernel: "/boot/vmlinuz-[x]"
  devices:
    disks:
    - {name: vda, volume: root}
    - name: vdb
      volume: data
"#;
        let all = Manifest::parse_all(text).expect("parses");
        assert_eq!(all.len(), 1);
        assert!(too_deep(text, 6).is_none(), "six levels at most");
        assert!(too_deep(text, 3).is_some());
        // And every manifest and chart file of the repository.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for dir in ["examples", "charts/vireo/crds", "charts/vireo/templates"] {
            for entry in std::fs::read_dir(root.join(dir))
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    let text = std::fs::read_to_string(&path).expect("readable");
                    assert_eq!(too_deep(&text, MAX_DEPTH), None, "{}", path.display());
                }
            }
        }
    }
}
