//! The decisions of the agents' aggregated API, kept apart from I/O so
//! that they are tested on their own: which path is which subresource,
//! when the identity headers are trusted, and when an upload may commit.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use bytes::Bytes;
use serde::Deserialize;

/// The API group the agents serve.
pub const GROUP: &str = "subresources.vireo.dev";
/// Its one version.
pub const VERSION: &str = "v1alpha1";

/// The WebSocket channels: every binary message starts with one of these
/// bytes (the framing of Kubernetes' `v4.channel.k8s.io`/`v5.channel.k8s.io`,
/// which kube's WebSocket client asks for).
pub mod channel {
    /// Client to agent: console input, upload bytes.
    pub const DATA_IN: u8 = 0;
    /// Agent to client: console output, download bytes.
    pub const DATA_OUT: u8 = 1;
    /// Agent to client: progress, JSON `{"done":N,"total":M}` (total may be null).
    pub const PROGRESS: u8 = 2;
    /// Agent to client, last: JSON `{"status":"Success","bytes":N,"sha256":"…"}`
    /// or `{"status":"Failure","message":"…"}`.
    pub const STATUS: u8 = 3;
    /// Client to agent, last of an upload: JSON `{"bytes":N,"sha256":"…"}`.
    pub const COMPLETE: u8 = 4;
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    /// `/apis`
    GroupList,
    /// `/apis/subresources.vireo.dev`
    Group,
    /// `/apis/subresources.vireo.dev/v1alpha1`
    ResourceList,
    /// A subresource of one object.
    Object(Target),
    NotFound,
}

/// The subresources served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Console,
    Upload,
    Download,
}

impl Sub {
    /// The resource and subresource names RBAC sees.
    pub fn resource(self) -> (&'static str, &'static str) {
        match self {
            Sub::Console => ("domains", "console"),
            Sub::Upload => ("storagevols", "upload"),
            Sub::Download => ("storagevols", "download"),
        }
    }
}

/// One object's subresource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    pub sub: Sub,
}

/// Maps a request path (without the query) to what it asks for.
pub fn route(path: &str) -> Route {
    let path = path.trim_end_matches('/');
    let prefix = format!("/apis/{GROUP}/{VERSION}");
    match path {
        "/healthz" | "/readyz" | "/livez" => return Route::Healthz,
        "/apis" => return Route::GroupList,
        p if p == format!("/apis/{GROUP}") => return Route::Group,
        p if p == prefix => return Route::ResourceList,
        _ => {}
    }
    let Some(rest) = path.strip_prefix(&prefix) else {
        return Route::NotFound;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let ["", "namespaces", ns, resource, name, sub] = parts.as_slice() else {
        return Route::NotFound;
    };
    let sub = match (*resource, *sub) {
        ("domains", "console") => Sub::Console,
        ("storagevols", "upload") => Sub::Upload,
        ("storagevols", "download") => Sub::Download,
        _ => return Route::NotFound,
    };
    if !is_dns_label(ns) || !is_object_name(name) {
        return Route::NotFound;
    }
    Route::Object(Target {
        namespace: ns.to_string(),
        name: name.to_string(),
        sub,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
}

/// The verb the API server derives for a request method (and the verb the
/// agent checks again by SubjectAccessReview): a WebSocket upgrade is a GET.
pub fn verb(method: &http::Method) -> Option<&'static str> {
    match *method {
        http::Method::GET => Some("get"),
        http::Method::POST => Some("create"),
        http::Method::PUT => Some("update"),
        _ => None,
    }
}

/// How the API server's front proxy tells who the user is: the settings of
/// the `extension-apiserver-authentication` ConfigMap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontProxy {
    /// Common names the front proxy's client certificate may carry (empty: any
    /// certificate the requestheader CA signed).
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
}

impl FrontProxy {
    /// Reads the ConfigMap's requestheader entries (JSON string lists).
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Result<FrontProxy, String> {
        let list = |key: &str| -> Result<Vec<String>, String> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(text) if text.trim().is_empty() => Ok(Vec::new()),
                Some(text) => serde_json::from_str(text).map_err(|e| format!("{key}: {e}")),
            }
        };
        let fp = FrontProxy {
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_prefixes: list("requestheader-extra-headers-prefix")?,
        };
        if fp.username_headers.is_empty() {
            return Err(
                "requestheader-username-headers is empty: the API server runs without \
                 --requestheader-username-headers"
                    .into(),
            );
        }
        Ok(fp)
    }
}

/// A user as the front proxy named them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The Host annotation where an agent publishes its address for the
/// subresources API (`HOST:PORT`), for the other agents to forward to.
pub const ADDRESS_ANNOTATION: &str = "subresources.vireo.dev/address";
/// The user a forwarding agent names (never read from the front proxy's
/// connections; never trusted before the agent's own token passed a
/// TokenReview and may `proxy`).
pub const FORWARDED_USER: &str = "x-vireo-forwarded-user";
/// The user's groups, one header each.
pub const FORWARDED_GROUP: &str = "x-vireo-forwarded-group";

/// Who sent a request, before the API server is asked about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The API server's front proxy, naming a user (or none: discovery).
    FrontProxy(Option<User>),
    /// Another agent forwarding a user's request: its bearer token must
    /// pass a TokenReview, and its identity may `proxy` the object, before
    /// the user it names is believed.
    Agent { token: String, user: User },
}

/// Why a request is refused before anything is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: not the API server's front proxy.
    Unauthenticated(String),
    /// 403: the user may not do this.
    Forbidden(String),
}

/// Who sent a request. `peer_cn` is the common name of the TLS client
/// certificate, present only when the requestheader CA signed it (the TLS
/// layer checked the chain). With it, only the front proxy's identity
/// headers count (the forwarded-user headers are ignored). Without it, only
/// a bearer token with the forwarded-user headers counts (another agent;
/// the caller checks the token); anything else is refused.
pub fn identify_caller(
    fp: &FrontProxy,
    peer_cn: Option<&str>,
    headers: &http::HeaderMap,
) -> Result<Caller, Refusal> {
    if peer_cn.is_some() {
        return identify(fp, peer_cn, headers).map(Caller::FrontProxy);
    }
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let name = headers
        .get(FORWARDED_USER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| !n.is_empty());
    match (token, name) {
        (Some(token), Some(name)) => Ok(Caller::Agent {
            token: token.to_string(),
            user: User {
                name: name.to_string(),
                groups: headers
                    .get_all(FORWARDED_GROUP)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(str::to_string)
                    .collect(),
                extra: BTreeMap::new(),
            },
        }),
        _ => Err(Refusal::Unauthenticated(
            "no client certificate from the API server's front proxy, and no agent's token".into(),
        )),
    }
}

/// [`identify_caller`] for a connection of the front proxy: the identity
/// headers are trusted only from a certificate the requestheader CA signed
/// with an allowed name. `Ok(None)`: the front proxy, with no user (the
/// aggregator's own discovery and health checks).
pub fn identify(
    fp: &FrontProxy,
    peer_cn: Option<&str>,
    headers: &http::HeaderMap,
) -> Result<Option<User>, Refusal> {
    let Some(cn) = peer_cn else {
        return Err(Refusal::Unauthenticated(
            "no client certificate from the API server's front proxy".into(),
        ));
    };
    if !fp.allowed_names.is_empty() && !fp.allowed_names.iter().any(|n| n == cn) {
        return Err(Refusal::Unauthenticated(format!(
            "client certificate '{cn}' is not an allowed front-proxy name"
        )));
    }
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let Some(name) = fp
        .username_headers
        .iter()
        .flat_map(|h| values(h))
        .find(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let groups = fp.group_headers.iter().flat_map(|h| values(h)).collect();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, value) in headers {
        let key = key.as_str();
        for prefix in &fp.extra_prefixes {
            let prefix = prefix.to_ascii_lowercase();
            if let Some(k) = key.strip_prefix(prefix.as_str())
                && !k.is_empty()
                && let Ok(v) = value.to_str()
            {
                extra
                    .entry(unescape_extra_key(k))
                    .or_default()
                    .push(v.to_string());
            }
        }
    }
    Ok(Some(User {
        name,
        groups,
        extra,
    }))
}

/// Extra keys travel percent-encoded in header names (the API server's rule).
fn unescape_extra_key(k: &str) -> String {
    let b = k.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = k.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The common name in a DER X.509 certificate's subject, if it has one.
pub fn subject_common_name(cert: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, cert, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // [0] version (optional), serial, signature, issuer, validity, subject.
    let mut fields = Vec::new();
    while !tbs.is_empty() && fields.len() < 7 {
        let (tag, value, rest) = tlv(tbs)?;
        fields.push((tag, value));
        tbs = rest;
    }
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let (tag, mut subject) = *fields.get(skip + 4)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut found = None;
    while !subject.is_empty() {
        let (tag, mut set, rest) = tlv(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (_, atv, rest) = tlv(set)?;
            set = rest;
            let (oid_tag, oid, value) = tlv(atv)?;
            let (_, text, _) = tlv(value)?;
            if oid_tag == 0x06 && oid == CN {
                found = Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    found
}

/// One DER tag-length-value: (tag, value, what follows). Single-byte tags only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for &b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

/// What the upload's reader gets from the connection.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    Complete(Complete),
}

/// The client's last upload message: how many bytes it sent, and their
/// SHA-256 (hex) when it computed one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Complete {
    pub bytes: u64,
    #[serde(default)]
    pub sha256: Option<String>,
}

/// The upload's byte source for the storage driver. It ends (EOF) only
/// after the client's complete message, and only when that message's byte
/// count (and checksum, if given) match what arrived, and the announced
/// length if there was one; a connection that closes first, or any
/// mismatch, is a read error, and the driver then keeps the volume's old
/// content and removes the partial file.
pub struct UploadReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    length: Option<u64>,
    current: Bytes,
    received: u64,
    hasher: Option<ring::digest::Context>,
    finished: bool,
}

impl UploadReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Chunk>, length: Option<u64>) -> Self {
        Self {
            rx,
            length,
            current: Bytes::new(),
            received: 0,
            hasher: Some(ring::digest::Context::new(&ring::digest::SHA256)),
            finished: false,
        }
    }

    fn check(&mut self, c: &Complete) -> io::Result<()> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        if c.bytes != self.received {
            return Err(bad(format!(
                "the client sent {} bytes but says {}",
                self.received, c.bytes
            )));
        }
        if let Some(l) = self.length
            && l != self.received
        {
            return Err(bad(format!(
                "the upload announced {l} bytes, {} arrived",
                self.received
            )));
        }
        let digest = self
            .hasher
            .take()
            .map(|h| hex(h.finish().as_ref()))
            .unwrap_or_default();
        if let Some(want) = &c.sha256
            && !want.eq_ignore_ascii_case(&digest)
        {
            return Err(bad(format!(
                "SHA-256 mismatch: the client says {want}, the agent received {digest}"
            )));
        }
        Ok(())
    }
}

impl Read for UploadReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.current.is_empty() {
                let n = out.len().min(self.current.len());
                out[..n].copy_from_slice(&self.current[..n]);
                let _ = self.current.split_to(n);
                return Ok(n);
            }
            if self.finished || out.is_empty() {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => {
                    self.received += b.len() as u64;
                    if let Some(l) = self.length
                        && self.received > l
                    {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("more than the announced {l} bytes arrived"),
                        ));
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&b);
                    }
                    self.current = b;
                }
                Some(Chunk::Complete(c)) => {
                    self.check(&c)?;
                    self.finished = true;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the connection closed after {} bytes, before the upload's complete message",
                            self.received
                        ),
                    ));
                }
            }
        }
    }
}

/// The download's byte sink for the storage driver: chunks of up to
/// `CHUNK` bytes into a bounded channel (a slow client slows the copy;
/// a client gone fails it).
pub struct DownloadWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

/// Bytes per download message.
pub const CHUNK: usize = 256 << 10;

impl DownloadWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<Bytes>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(chunk).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client closed the connection",
            )
        })
    }
}

impl Write for DownloadWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn target(ns: &str, name: &str, sub: Sub) -> Route {
        Route::Object(Target {
            namespace: ns.into(),
            name: name.into(),
            sub,
        })
    }

    #[test]
    fn routes() {
        let p = "/apis/subresources.vireo.dev/v1alpha1";
        assert_eq!(route("/apis"), Route::GroupList);
        assert_eq!(route("/apis/subresources.vireo.dev"), Route::Group);
        assert_eq!(route(p), Route::ResourceList);
        assert_eq!(route(&format!("{p}/")), Route::ResourceList);
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(
            route(&format!("{p}/namespaces/team-a/domains/web-1/console")),
            target("team-a", "web-1", Sub::Console)
        );
        assert_eq!(
            route(&format!("{p}/namespaces/a/storagevols/disk.img/upload")),
            target("a", "disk.img", Sub::Upload)
        );
        assert_eq!(
            route(&format!("{p}/namespaces/a/storagevols/d/download")),
            target("a", "d", Sub::Download)
        );
        for bad in [
            format!("{p}/namespaces/a/domains/x/upload"),
            format!("{p}/namespaces/a/storagevols/x/console"),
            format!("{p}/namespaces/a/domains/x"),
            format!("{p}/namespaces/a/domains/x/console/more"),
            format!("{p}/namespaces/A/domains/x/console"),
            format!("{p}/namespaces/a/domains/../console"),
            format!("{p}/namespaces//domains/x/console"),
            "/apis/other.dev/v1alpha1/namespaces/a/domains/x/console".to_string(),
            "/api/v1/namespaces".to_string(),
        ] {
            assert_eq!(route(&bad), Route::NotFound, "{bad}");
        }
    }

    #[test]
    fn verbs() {
        assert_eq!(verb(&http::Method::GET), Some("get"));
        assert_eq!(verb(&http::Method::POST), Some("create"));
        assert_eq!(verb(&http::Method::PUT), Some("update"));
        assert_eq!(verb(&http::Method::DELETE), None);
    }

    fn front_proxy() -> FrontProxy {
        let data: BTreeMap<String, String> = [
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
            (
                "requestheader-extra-headers-prefix",
                r#"["X-Remote-Extra-"]"#,
            ),
            ("requestheader-client-ca-file", "PEM"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        FrontProxy::from_config_map(&data).expect("parses")
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", "alice".parse().expect("value"));
        h.append("x-remote-group", "team-a".parse().expect("value"));
        h.append(
            "x-remote-group",
            "system:authenticated".parse().expect("value"),
        );
        h.insert("x-remote-extra-scopes%2fone", "s1".parse().expect("value"));
        h
    }

    #[test]
    fn headers_are_trusted_only_from_the_front_proxy() {
        let fp = front_proxy();
        // No client certificate: refused, whatever the headers say.
        assert!(matches!(
            identify(&fp, None, &headers()),
            Err(Refusal::Unauthenticated(_))
        ));
        // A certificate the CA signed but with another name: refused.
        assert!(matches!(
            identify(&fp, Some("someone-else"), &headers()),
            Err(Refusal::Unauthenticated(_))
        ));
        // The front proxy: the headers name the user.
        let user = identify(&fp, Some("front-proxy-client"), &headers())
            .expect("accepted")
            .expect("a user");
        assert_eq!(user.name, "alice");
        assert_eq!(user.groups, ["team-a", "system:authenticated"]);
        assert_eq!(user.extra.get("scopes/one"), Some(&vec!["s1".to_string()]));
        // The front proxy without a user (discovery, health checks).
        assert_eq!(
            identify(&fp, Some("front-proxy-client"), &HeaderMap::new()),
            Ok(None)
        );
        // No allowed names: any certificate of the CA.
        let any = FrontProxy {
            allowed_names: vec![],
            ..fp
        };
        assert!(identify(&any, Some("x"), &headers()).is_ok());
    }

    #[test]
    fn forwarded_identities_need_a_token_and_no_front_proxy() {
        let fp = front_proxy();
        let mut h = headers();
        h.insert(FORWARDED_USER, "mallory".parse().expect("value"));
        // On the front proxy's connection the forwarded headers are ignored.
        assert_eq!(
            identify_caller(&fp, Some("front-proxy-client"), &h)
                .map(|c| matches!(c, Caller::FrontProxy(Some(u)) if u.name == "alice")),
            Ok(true)
        );
        // Without a certificate, the front proxy's headers are not enough.
        assert!(identify_caller(&fp, None, &headers()).is_err());
        // Nor the forwarded ones without a token.
        assert!(identify_caller(&fp, None, &h).is_err());
        // A token and a forwarded user: an agent, to be checked.
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer abc".parse().expect("value"),
        );
        h.append(FORWARDED_GROUP, "g1".parse().expect("value"));
        match identify_caller(&fp, None, &h) {
            Ok(Caller::Agent { token, user }) => {
                assert_eq!(token, "abc");
                assert_eq!(user.name, "mallory");
                assert_eq!(user.groups, ["g1"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_config_map_without_username_headers_is_refused() {
        assert!(FrontProxy::from_config_map(&BTreeMap::new()).is_err());
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBuDCCAV2gAwIBAgIUeGgSFfy1IY2YklEmVrwAOgst9/MwCgYIKoZIzj0EAwIw
MDERMA8GA1UECgwIc29tZS1vcmcxGzAZBgNVBAMMEmZyb250LXByb3h5LWNsaWVu
dDAgFw0yNjEyMDMxNzA1NTVaGA8yMTI2MTEwOTE3MDU1NVowMDERMA8GA1UECgwI
c29tZS1vcmcxGzAZBgNVBAMMEmZyb250LXByb3h5LWNsaWVudDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABIoG9UdybC4xcdLrc/W+vGDkeQbua8UL5InXsD9Obm83
YNutS/qHIudX5XMfX/1AAjJNwj1dv4raHRTHxobyLpCjUzBRMB0GA1UdDgQWBBR6
2Pixh6VEfMHFcc59gwlJz6FDgzAfBgNVHSMEGDAWgBR62Pixh6VEfMHFcc59gwlJ
z6FDgzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDe6O/FBfoR
ppY6Xc2qbVZAYC9m3V8lm7SIoKX3Rh4C2QIhAMTbv5F4JZrOKwtYsS5lsxCPQIWf
q4KxVhvPfJ+Wdql6
-----END CERTIFICATE-----
";

    #[test]
    fn common_name_of_a_certificate() {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(CERT.as_bytes()).expect("PEM");
        assert_eq!(
            subject_common_name(&der).as_deref(),
            Some("front-proxy-client")
        );
        // Garbage and truncations never panic and name no one.
        assert_eq!(subject_common_name(b""), None);
        assert_eq!(
            subject_common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        for n in 0..der.len() {
            let _ = subject_common_name(&der[..n]);
        }
    }

    fn sha(data: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
    }

    /// Feeds chunks to an UploadReader, closes the connection, and reads it to the end.
    fn upload(chunks: Vec<Chunk>, length: Option<u64>) -> io::Result<Vec<u8>> {
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len() + 1);
        for c in chunks {
            tx.try_send(c).expect("room");
        }
        drop(tx);
        let mut out = Vec::new();
        UploadReader::new(rx, length).read_to_end(&mut out)?;
        Ok(out)
    }

    fn data(b: &[u8]) -> Chunk {
        Chunk::Data(Bytes::copy_from_slice(b))
    }

    fn complete(bytes: u64, sha256: Option<String>) -> Chunk {
        Chunk::Complete(Complete { bytes, sha256 })
    }

    #[test]
    fn an_upload_ends_only_with_a_matching_complete_message() {
        let all = b"hello world";
        let ok = upload(
            vec![
                data(b"hello "),
                data(b"world"),
                complete(11, Some(sha(all))),
            ],
            Some(11),
        )
        .expect("commits");
        assert_eq!(ok, all);
        // Without a checksum, the count alone.
        assert!(upload(vec![data(all), complete(11, None)], None).is_ok());
        // Cut: the connection closed before the complete message.
        let cut = upload(vec![data(b"hello ")], Some(11)).expect_err("cut");
        assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof);
        // The count disagrees.
        assert!(upload(vec![data(all), complete(12, None)], None).is_err());
        // The announced length disagrees.
        assert!(upload(vec![data(all), complete(11, None)], Some(12)).is_err());
        assert!(upload(vec![data(all), complete(11, None)], Some(5)).is_err());
        // The checksum disagrees.
        assert!(upload(vec![data(all), complete(11, Some(sha(b"other")))], None).is_err());
        // An empty upload is complete too.
        assert_eq!(
            upload(vec![complete(0, Some(sha(b"")))], Some(0)).expect("empty"),
            b""
        );
    }

    #[test]
    fn a_download_stops_when_the_client_is_gone() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut w = DownloadWriter::new(tx);
        w.write_all(&vec![7u8; CHUNK + 10]).expect("write");
        w.flush().expect("flush");
        let total: usize = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| b.len())
            .sum();
        assert_eq!(total, CHUNK + 10);
        drop(rx);
        let err = w.write_all(&vec![1u8; CHUNK]).expect_err("gone");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
