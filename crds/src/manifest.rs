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
    #[error("document {index} ({kind}): metadata.name is missing")]
    NoName { index: usize, kind: String },
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
        let invalid = |source| ManifestError::Invalid {
            index,
            kind: meta.kind.clone(),
            name: name.clone(),
            source,
        };
        Ok(match meta.kind.as_str() {
            "Domain" => Manifest::Domain(serde_yaml_ng::from_value(value).map_err(invalid)?),
            "Network" => Manifest::Network(serde_yaml_ng::from_value(value).map_err(invalid)?),
            "StoragePool" => {
                Manifest::StoragePool(serde_yaml_ng::from_value(value).map_err(invalid)?)
            }
            "StorageVol" => {
                Manifest::StorageVol(serde_yaml_ng::from_value(value).map_err(invalid)?)
            }
            "Host" => Manifest::Host(serde_yaml_ng::from_value(value).map_err(invalid)?),
            other => {
                return Err(ManifestError::Kind {
                    index,
                    found: other.to_string(),
                });
            }
        })
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
}
