//! The agents' aggregated API, `subresources.vireo.dev/v1alpha1`: a Domain's
//! serial console and a StorageVol's upload and download, reached through
//! the kube-apiserver (an `APIService`), which authenticates the user and
//! asks RBAC about `domains/console`, `storagevols/upload` and
//! `storagevols/download` before it proxies the request here.
//!
//! Trust chain: the agent serves TLS and accepts the identity headers
//! (`X-Remote-User`, `X-Remote-Group`, `X-Remote-Extra-*`, as the
//! `extension-apiserver-authentication` ConfigMap names them) only on a
//! connection whose client certificate the requestheader CA signed, with an
//! allowed common name: the API server's front proxy. Then, as defence in
//! depth, it asks a SubjectAccessReview for that user on the exact object
//! before it opens anything. The API server picks any agent endpoint: a
//! request for an object another node holds is forwarded to that node's
//! agent (`Server::forward`) with this agent's token, which the receiving
//! agent checks (TokenReview, then `proxy` by SubjectAccessReview) before
//! it believes the user named.
//!
//! Streams are WebSockets; see [`rules::channel`] for the framing.

pub mod rules;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use vireo_crds::{Domain, StorageVol};

use self::rules::{
    Caller, Chunk, Complete, DownloadWriter, FrontProxy, GROUP, Refusal, Route, Sub, Target,
    UploadReader, User, VERSION, channel,
};
use super::Ctx;
use crate::error::Result;

/// How the agent serves its aggregated API (`--subresources-listen`).
#[derive(Debug, Clone)]
pub struct SubresourcesConfig {
    pub listen: SocketAddr,
    /// PEM serving certificate (chain) and key; without them, a
    /// self-signed certificate made at start (the APIService then needs
    /// `insecureSkipTLSVerify`, and other agents cannot forward here).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `HOST:PORT` the other agents reach this one at, published in this
    /// node's Host (annotation `subresources.vireo.dev/address`).
    pub advertise: Option<String>,
    /// Forwarding to the agent of another node: the CA its serving
    /// certificate must chain to, and the name it must carry. Without
    /// both, requests for other nodes' objects get 503.
    pub peer_ca: Option<PathBuf>,
    pub peer_server_name: Option<String>,
}

type Body = Full<Bytes>;
/// An early answer instead of a stream (boxed: responses are large).
type Reply = Box<Response<Body>>;
type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Largest WebSocket message accepted from a client.
const MAX_MESSAGE: usize = 4 << 20;
/// Upload chunks queued between the connection and the driver.
const QUEUE: usize = 8;

struct Server {
    ctx: Arc<Ctx>,
    front: FrontProxy,
    /// How to reach another node's agent, when forwarding is configured.
    peers: Option<Peers>,
}

struct Peers {
    tls: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    /// This agent's own credentials (a token, or the file the kubelet keeps fresh).
    auth: kube::config::AuthInfo,
}

/// Serves the aggregated API until the agent stops. Waits for the
/// `extension-apiserver-authentication` ConfigMap first.
pub(crate) async fn serve(ctx: Arc<Ctx>, config: SubresourcesConfig) {
    let (front, ca) = loop {
        match front_proxy(&ctx.client).await {
            Ok(v) => break v,
            Err(e) => {
                tracing::warn!(error = %e, "subresources API: no front-proxy settings yet; retrying in 5s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let tls = match tls_config(&config, ca) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "subresources API not served");
            return;
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.listen, error = %e, "subresources API: cannot listen");
            return;
        }
    };
    tracing::info!(addr = %config.listen, "subresources API listening ({GROUP}/{VERSION})");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let peers = match peers(&config).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "subresources API: forwarding to other nodes is off");
            None
        }
    };
    let server = Arc::new(Server { ctx, front, peers });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "subresources API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, server) = (acceptor.clone(), server.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "subresources API: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            // The chain was verified against the requestheader CA by rustls.
            let cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| rules::subject_common_name(c));
            let service = hyper::service::service_fn(move |req| {
                let (server, cn) = (server.clone(), cn.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(server.handle(req, cn.as_deref(), peer).await)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, error = %e, "subresources API: connection ended");
            }
        });
    }
}

/// The requestheader settings and CA from kube-system's
/// `extension-apiserver-authentication` ConfigMap.
async fn front_proxy(
    client: &kube::Client,
) -> std::result::Result<(FrontProxy, rustls::RootCertStore), String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let cm = api
        .get("extension-apiserver-authentication")
        .await
        .map_err(|e| format!("kube-system/extension-apiserver-authentication: {e}"))?;
    let data = cm.data.unwrap_or_default();
    let pem = data.get("requestheader-client-ca-file").ok_or(
        "requestheader-client-ca-file is missing: the API server runs without \
         --requestheader-client-ca-file",
    )?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("requestheader-client-ca-file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("requestheader-client-ca-file: {e}"))?;
    }
    if roots.is_empty() {
        return Err("requestheader-client-ca-file holds no certificate".into());
    }
    Ok((FrontProxy::from_config_map(&data)?, roots))
}

/// The TLS client and credentials for forwarding, when configured.
async fn peers(config: &SubresourcesConfig) -> std::result::Result<Option<Peers>, String> {
    let (Some(ca), Some(name)) = (&config.peer_ca, &config.peer_server_name) else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = rustls_pki_types::ServerName::try_from(name.clone())
        .map_err(|e| format!("--subresources-server-name {name}: {e}"))?;
    let auth = kube::Config::infer()
        .await
        .map_err(|e| format!("this agent's credentials: {e}"))?
        .auth_info;
    Ok(Some(Peers {
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        server_name,
        auth,
    }))
}

impl Peers {
    fn token(&self) -> Option<String> {
        use secrecy::ExposeSecret;
        if let Some(file) = &self.auth.token_file {
            return std::fs::read_to_string(file)
                .ok()
                .map(|t| t.trim().to_string());
        }
        self.auth
            .token
            .as_ref()
            .map(|t| t.expose_secret().to_string())
    }
}

fn tls_config(
    config: &SubresourcesConfig,
    roots: rustls::RootCertStore,
) -> std::result::Result<rustls::ServerConfig, String> {
    let (certs, key) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| format!("serving certificate {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("serving key {}: {e}", key.display()))?;
            (certs, key)
        }
        _ => self_signed(config)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Connections without a client certificate are let through TLS (the
    // kubelet's probes of /healthz); every other path refuses them.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("requestheader CA: {e}"))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("serving certificate: {e}"))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// A self-signed serving certificate for the names this agent may be
/// reached by (the Service's, the advertised host, localhost).
fn self_signed(
    config: &SubresourcesConfig,
) -> std::result::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let mut names = vec!["localhost".to_string()];
    names.extend(config.peer_server_name.clone());
    if let Some(host) = config
        .advertise
        .as_deref()
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
    {
        names.push(host);
    }
    let made = rcgen::generate_simple_self_signed(names.clone())
        .map_err(|e| format!("a self-signed certificate: {e}"))?;
    tracing::warn!(
        ?names,
        "subresources API: no --subresources-cert; serving a self-signed certificate (the \
         APIService needs insecureSkipTLSVerify: true, and other agents cannot forward here)"
    );
    let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    Ok((vec![made.cert.der().clone()], key))
}

impl Server {
    async fn handle(
        &self,
        mut req: Request<Incoming>,
        cn: Option<&str>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let route = rules::route(req.uri().path());
        if route == Route::Healthz {
            return text(StatusCode::OK, "ok");
        }
        let caller = match rules::identify_caller(&self.front, cn, req.headers()) {
            Ok(c) => c,
            Err(refusal) => {
                tracing::warn!(%peer, path = req.uri().path(), ?refusal, "subresources API: refused");
                return refused(refusal);
            }
        };
        let (user, forwarded) = match caller {
            Caller::FrontProxy(user) => (user, false),
            Caller::Agent { token, user } => {
                let Route::Object(target) = &route else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "no such path");
                };
                match self.agent_may_forward(&token, target).await {
                    Ok(true) => (Some(user), true),
                    Ok(false) => {
                        tracing::warn!(%peer, path = req.uri().path(), "subresources API: a bearer token that may not forward");
                        return refused(Refusal::Unauthenticated(
                            "this token may not forward requests to agents".into(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "subresources API: TokenReview failed");
                        return status(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "InternalError",
                            &format!("cannot check the forwarding agent: {e}"),
                        );
                    }
                }
            }
        };
        match route {
            Route::Healthz => text(StatusCode::OK, "ok"),
            Route::GroupList => json(StatusCode::OK, &discovery::group_list()),
            Route::Group => json(StatusCode::OK, &discovery::group()),
            Route::ResourceList => json(StatusCode::OK, &discovery::resources()),
            Route::NotFound => status(StatusCode::NOT_FOUND, "NotFound", "no such path"),
            Route::Object(target) => {
                let Some(user) = user else {
                    tracing::warn!(%peer, path = req.uri().path(), "subresources API: no user header");
                    return refused(Refusal::Unauthenticated("no user named".into()));
                };
                let Some(verb) = rules::verb(req.method()) else {
                    return status(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowed",
                        "use GET with a WebSocket upgrade",
                    );
                };
                match self.allowed(&user, verb, &target).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let (res, sub) = target.sub.resource();
                        let why = format!(
                            "{} cannot {verb} resource \"{res}/{sub}\" in API group \"{GROUP}\" in the namespace \"{}\"",
                            user.name, target.namespace
                        );
                        tracing::warn!(%peer, user = %user.name, object = %format!("{}/{}", target.namespace, target.name), "subresources API: {why}");
                        return refused(Refusal::Forbidden(why));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "subresources API: SubjectAccessReview failed");
                        return status(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "InternalError",
                            &format!("authorization check failed: {e}"),
                        );
                    }
                }
                let length = query_u64(req.uri().query(), "length");
                let open = match self.open(&target).await {
                    Ok(Place::Here(o)) => o,
                    Ok(Place::Node(node)) => {
                        return match (&self.peers, forwarded) {
                            (Some(peers), false) => {
                                self.forward(peers, req, &node, &user, &target).await
                            }
                            _ => status(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "ServiceUnavailable",
                                &format!(
                                    "{}/{} is on node {node}, and this agent ({}) does not forward to it",
                                    target.namespace, target.name, self.ctx.config.node_name
                                ),
                            ),
                        };
                    }
                    Err(resp) => return *resp,
                };
                let (resp, upgrade) = match websocket_accept(&mut req) {
                    Ok(v) => v,
                    Err(resp) => return *resp,
                };
                tracing::info!(user = %user.name, object = %format!("{}/{}", target.namespace, target.name), sub = ?target.sub, "subresources API: stream opened");
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    let ws = match upgrade.await {
                        Ok(u) => {
                            WebSocketStream::from_raw_socket(
                                TokioIo::new(u),
                                Role::Server,
                                Some(
                                    WebSocketConfig::default()
                                        .max_message_size(Some(MAX_MESSAGE))
                                        .max_frame_size(Some(MAX_MESSAGE)),
                                ),
                            )
                            .await
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "subresources API: upgrade failed");
                            return;
                        }
                    };
                    match open {
                        Opened::Console(s) => console(ws, s).await,
                        Opened::Upload { pool, file } => upload(ctx, ws, pool, file, length).await,
                        Opened::Download { pool, file } => download(ctx, ws, pool, file).await,
                    }
                    tracing::info!(object = %format!("{}/{}", target.namespace, target.name), sub = ?target.sub, "subresources API: stream closed");
                });
                resp
            }
        }
    }

    /// Whether a bearer token belongs to an identity that may forward
    /// users' requests to agents: a TokenReview, then a SubjectAccessReview
    /// for `proxy` on the object's resource (only the agents' ClusterRole
    /// grants it).
    async fn agent_may_forward(&self, token: &str, target: &Target) -> Result<bool> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.ctx.client.clone());
        let done = api.create(&PostParams::default(), &review).await?;
        let Some(who) = done
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
        else {
            return Ok(false);
        };
        let agent = User {
            name: who.username.unwrap_or_default(),
            groups: who.groups.unwrap_or_default(),
            extra: who.extra.unwrap_or_default(),
        };
        let (resource, _) = target.sub.resource();
        self.review(&agent, "proxy", resource, None, target).await
    }

    /// Sends the request on to the agent of `node` with this agent's token
    /// and the user's name, and splices the two upgraded connections.
    async fn forward(
        &self,
        peers: &Peers,
        mut req: Request<Incoming>,
        node: &str,
        user: &User,
        target: &Target,
    ) -> Response<Body> {
        let unavailable = |why: String| {
            tracing::warn!(node, "subresources API: cannot forward: {why}");
            status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &why)
        };
        let hosts: Api<vireo_crds::Host> = Api::all(self.ctx.client.clone());
        let address = match hosts.get_opt(node).await {
            Ok(Some(h)) => h
                .metadata
                .annotations
                .and_then(|a| a.get(rules::ADDRESS_ANNOTATION).cloned()),
            Ok(None) => None,
            Err(e) => return unavailable(format!("Host {node}: {e}")),
        };
        let Some(address) = address else {
            return unavailable(format!(
                "{}/{} is on node {node}, whose agent publishes no subresources address",
                target.namespace, target.name
            ));
        };
        let Some(token) = peers.token() else {
            return unavailable("this agent has no token to forward with".into());
        };
        let tcp = match tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&address),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return unavailable(format!("node {node}'s agent at {address}: {e}")),
            Err(_) => return unavailable(format!("node {node}'s agent at {address}: timed out")),
        };
        let tls = match peers.tls.connect(peers.server_name.clone(), tcp).await {
            Ok(t) => t,
            Err(e) => return unavailable(format!("node {node}'s agent at {address}: TLS: {e}")),
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls)).await {
                Ok(v) => v,
                Err(e) => return unavailable(format!("node {node}'s agent at {address}: {e}")),
            };
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "forwarded connection ended");
            }
        });
        let mut out = Request::builder()
            .method(req.method().clone())
            .uri(req.uri().path_and_query().map_or("/", |p| p.as_str()));
        for name in [
            header::HOST,
            header::UPGRADE,
            header::CONNECTION,
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_PROTOCOL,
        ] {
            for v in req.headers().get_all(&name) {
                out = out.header(&name, v);
            }
        }
        out = out
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(rules::FORWARDED_USER, user.name.as_str());
        for g in &user.groups {
            out = out.header(rules::FORWARDED_GROUP, g.as_str());
        }
        let out = match out.body(Body::default()) {
            Ok(r) => r,
            Err(e) => return unavailable(format!("cannot forward: {e}")),
        };
        let mut resp = match sender.send_request(out).await {
            Ok(r) => r,
            Err(e) => return unavailable(format!("node {node}'s agent at {address}: {e}")),
        };
        tracing::info!(node, user = %user.name, object = %format!("{}/{}", target.namespace, target.name), code = resp.status().as_u16(), "subresources API: forwarded");
        let mut answer = Response::builder().status(resp.status());
        for (k, v) in resp.headers() {
            answer = answer.header(k, v);
        }
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            use http_body_util::BodyExt;
            let body = match resp.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return unavailable(format!("node {node}'s agent: {e}")),
            };
            return answer
                .body(Body::from(body))
                .unwrap_or_else(|e| unavailable(e.to_string()));
        }
        let theirs = hyper::upgrade::on(&mut resp);
        let ours = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match (ours.await, theirs.await) {
                (Ok(a), Ok(b)) => {
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::info!(error = %e, "forwarded upgrade failed");
                }
            }
        });
        answer
            .body(Body::default())
            .unwrap_or_else(|e| unavailable(e.to_string()))
    }

    /// The SubjectAccessReview for exactly this object.
    async fn allowed(&self, user: &User, verb: &str, target: &Target) -> Result<bool> {
        let (resource, subresource) = target.sub.resource();
        self.review(user, verb, resource, Some(subresource), target)
            .await
    }

    async fn review(
        &self,
        user: &User,
        verb: &str,
        resource: &str,
        subresource: Option<&str>,
        target: &Target,
    ) -> Result<bool> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    version: Some(VERSION.into()),
                    resource: Some(resource.into()),
                    subresource: subresource.map(str::to_string),
                    namespace: Some(target.namespace.clone()),
                    name: Some(target.name.clone()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.ctx.client.clone());
        let done = api.create(&PostParams::default(), &review).await?;
        Ok(done
            .status
            .is_some_and(|s| s.allowed && s.denied != Some(true)))
    }

    /// Finds the object on this node and opens what the stream needs.
    async fn open(&self, t: &Target) -> std::result::Result<Place, Reply> {
        let me = &self.ctx.config.node_name;
        let not_found = |kind: &str| {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "{kind} \"{}\" not found in namespace {}",
                    t.name, t.namespace
                ),
            )
        };
        let elsewhere = |kind: &str, node: Option<&str>| match node {
            Some(n) => Ok(Place::Node(n.to_string())),
            None => Err(Box::new(status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!("{kind} {}/{} is not on any node yet", t.namespace, t.name),
            ))),
        };
        let internal = |e: &dyn std::fmt::Display| {
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &e.to_string(),
            )
        };
        match t.sub {
            Sub::Console => {
                let api: Api<Domain> = Api::namespaced(self.ctx.client.clone(), &t.namespace);
                let dom = match api.get_opt(&t.name).await {
                    Ok(Some(d)) => d,
                    Ok(None) => return Err(Box::new(not_found("domain"))),
                    Err(e) => return Err(Box::new(internal(&e))),
                };
                let node = dom.status.as_ref().and_then(|s| s.node_name.as_deref());
                if node != Some(me.as_str()) {
                    return elsewhere("domain", node);
                }
                let key = vireo_crds::labels::node_key(&t.namespace, &t.name);
                match self
                    .ctx
                    .drive_domain(dom.spec.domain_type, move |c| {
                        c.hypervisor().open_console(&key)
                    })
                    .await
                {
                    Ok(s) => Ok(Place::Here(Opened::Console(s))),
                    Err(e) => Err(Box::new(status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        &format!("cannot open the console: {e}"),
                    ))),
                }
            }
            Sub::Upload | Sub::Download => {
                let api: Api<StorageVol> = Api::namespaced(self.ctx.client.clone(), &t.namespace);
                let vol = match api.get_opt(&t.name).await {
                    Ok(Some(v)) => v,
                    Ok(None) => return Err(Box::new(not_found("storagevol"))),
                    Err(e) => return Err(Box::new(internal(&e))),
                };
                let node = vol.status.as_ref().and_then(|s| s.node_name.as_deref());
                if node != Some(me.as_str()) {
                    return elsewhere("storagevol", node);
                }
                let pool = vol.spec.pool.clone();
                let file = super::volume_file_name(&t.namespace, &t.name);
                // The volume must exist in its pool here (a placeholder for
                // `source.upload` volumes).
                let (p, f) = (pool.clone(), file.clone());
                if let Err(e) = self
                    .ctx
                    .drive(move |c| c.storage().volume_info(&p, &f))
                    .await
                {
                    return Err(Box::new(status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        &format!("the volume is not in pool {pool} on node {me} yet: {e}"),
                    )));
                }
                Ok(Place::Here(if t.sub == Sub::Upload {
                    Opened::Upload { pool, file }
                } else {
                    Opened::Download { pool, file }
                }))
            }
        }
    }
}

/// Where an object is served.
enum Place {
    Here(Opened),
    /// Another node's agent holds it.
    Node(String),
}

enum Opened {
    Console(std::os::unix::net::UnixStream),
    Upload { pool: String, file: String },
    Download { pool: String, file: String },
}

/// Checks a WebSocket upgrade request and answers it (101), choosing the
/// channel subprotocol the client offers.
fn websocket_accept(
    req: &mut Request<Incoming>,
) -> std::result::Result<(Response<Body>, hyper::upgrade::OnUpgrade), Reply> {
    let h = req.headers();
    let is = |name: header::HeaderName, want: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(want)))
        })
    };
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return Err(Box::new(bad_upgrade()));
    };
    if !is(header::UPGRADE, "websocket") || !is(header::CONNECTION, "upgrade") {
        return Err(Box::new(bad_upgrade()));
    }
    let protocol = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| is(header::SEC_WEBSOCKET_PROTOCOL, p));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        hs.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol {
        hs.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok((resp, hyper::upgrade::on(req)))
}

fn bad_upgrade() -> Response<Body> {
    status(
        StatusCode::BAD_REQUEST,
        "BadRequest",
        "this subresource is a WebSocket: send a GET with Upgrade: websocket",
    )
}

fn frame(ch: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(ch);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

fn json_frame(ch: u8, value: &serde_json::Value) -> Message {
    frame(ch, value.to_string().as_bytes())
}

/// Bridges the guest's console and the client. Reading the guest waits
/// while the client is slow (one message in flight, bounded buffers);
/// closing either side ends the bridge and leaves the guest running.
async fn console(ws: Ws, guest: std::os::unix::net::UnixStream) {
    let guest = match guest
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(guest))
    {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "console: cannot use the guest's console socket");
            return;
        }
    };
    let (mut gr, mut gw) = guest.into_split();
    let (mut sink, mut src) = ws.split();
    let to_client = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match gr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(frame(channel::DATA_OUT, &buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sink
            .send(json_frame(
                channel::STATUS,
                &serde_json::json!({"status": "Success", "message": "the guest's console closed"}),
            ))
            .await;
        let _ = sink.close().await;
    };
    let from_client = async {
        while let Some(Ok(msg)) = src.next().await {
            let more = match msg {
                Message::Binary(b) if b.first() == Some(&channel::DATA_IN) => {
                    gw.write_all(&b[1..]).await.is_ok()
                }
                Message::Close(_) => false,
                _ => true,
            };
            if !more {
                break;
            }
        }
    };
    tokio::select! {
        () = to_client => {}
        () = from_client => {}
    }
}

/// Receives an upload: the driver writes a partial file beside the volume
/// and renames it in place only after the client's complete message
/// matched (see [`UploadReader`]); a cut connection leaves the old content.
async fn upload(ctx: Arc<Ctx>, ws: Ws, pool: String, file: String, length: Option<u64>) {
    let (mut sink, mut src) = ws.split();
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(QUEUE);
    // The connection's reader: bounded queue, so a fast client waits for the disk.
    let reader = tokio::spawn(async move {
        while let Some(msg) = src.next().await {
            let Ok(msg) = msg else { break };
            let more = match msg {
                Message::Binary(b) => match b.first().copied() {
                    Some(channel::DATA_IN) => tx.send(Chunk::Data(b.slice(1..))).await.is_ok(),
                    Some(channel::COMPLETE) => {
                        match serde_json::from_slice::<Complete>(&b[1..]) {
                            Ok(c) => {
                                let _ = tx.send(Chunk::Complete(c)).await;
                            }
                            Err(e) => {
                                tracing::info!(error = %e, "upload: a malformed complete message");
                            }
                        }
                        false
                    }
                    _ => true,
                },
                Message::Close(_) => false,
                _ => true,
            };
            if !more {
                break;
            }
        }
        // Dropping the sender without a complete message fails the upload.
    });
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let (p, f) = (pool.clone(), file.clone());
    let job = ctx.drive(move |c| {
        let mut source = UploadReader::new(rx, length);
        let progress = move |n: u64, _total: Option<u64>| d.store(n, Ordering::Relaxed);
        c.storage()
            .upload_volume(&p, &f, &mut source, length, &progress)
    });
    let result = with_progress(&mut sink, job, &done, length).await;
    reader.abort();
    finish(&mut sink, &pool, &file, "upload", result, None).await;
}

/// Sends a volume's content with progress; the SHA-256 of what was sent
/// is in the final status.
async fn download(ctx: Arc<Ctx>, ws: Ws, pool: String, file: String) {
    let (mut sink, _src) = ws.split();
    let (p, f) = (pool.clone(), file.clone());
    let total = ctx
        .drive(move |c| c.storage().volume_info(&p, &f))
        .await
        .ok()
        .map(|i| i.capacity);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
    let done = Arc::new(AtomicU64::new(0));
    let (p, f) = (pool.clone(), file.clone());
    let mut job = Box::pin(ctx.drive(move |c| {
        let mut sink = DownloadWriter::new(tx);
        let n =
            c.storage()
                .download_volume(&p, &f, &mut sink, &vireo_drivers::storage::no_progress)?;
        std::io::Write::flush(&mut sink).map_err(|e| vireo_drivers::Error::OperationFailed {
            object: vireo_drivers::error::ObjectName::new(vireo_crds::ObjectKind::StorageVol, &f),
            message: format!("download: {e}"),
        })?;
        Ok(n)
    }));
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut sent = 0u64;
    let mut result = None;
    loop {
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(c) => {
                    hasher.update(&c);
                    sent += c.len() as u64;
                    done.store(sent, Ordering::Relaxed);
                    if sink.send(frame(channel::DATA_OUT, &c)).await.is_err() {
                        // The client is gone: the driver's next write fails.
                        drop(rx);
                        let _ = job.await;
                        return;
                    }
                }
                None => break,
            },
            r = &mut job, if result.is_none() => result = Some(r),
            _ = tick.tick() => {
                let _ = sink.send(json_frame(channel::PROGRESS, &serde_json::json!({"done": sent, "total": total}))).await;
            }
        }
    }
    let result = match result {
        Some(r) => r,
        None => job.await,
    };
    let sha = rules::hex(hasher.finish().as_ref());
    finish(&mut sink, &pool, &file, "download", result, Some(sha)).await;
}

/// Awaits a transfer, sending progress every half second.
async fn with_progress<S>(
    sink: &mut S,
    job: impl std::future::Future<Output = Result<u64>>,
    done: &AtomicU64,
    total: Option<u64>,
) -> Result<u64>
where
    S: futures::Sink<Message> + Unpin,
{
    let mut job = std::pin::pin!(job);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = &mut job => return r,
            _ = tick.tick() => {
                let n = done.load(Ordering::Relaxed);
                let _ = sink.send(json_frame(channel::PROGRESS, &serde_json::json!({"done": n, "total": total}))).await;
            }
        }
    }
}

/// The final status message, then close.
async fn finish<S>(
    sink: &mut S,
    pool: &str,
    file: &str,
    what: &str,
    result: Result<u64>,
    sha256: Option<String>,
) where
    S: futures::Sink<Message> + Unpin,
{
    let msg = match &result {
        Ok(n) => {
            tracing::info!(pool, volume = file, bytes = n, "{what} complete");
            serde_json::json!({"status": "Success", "bytes": n, "sha256": sha256})
        }
        Err(e) => {
            tracing::warn!(pool, volume = file, error = %e, "{what} failed; the volume keeps its content");
            serde_json::json!({"status": "Failure", "message": e.to_string()})
        }
    };
    let _ = sink.send(json_frame(channel::STATUS, &msg)).await;
    let _ = sink.close().await;
}

fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

fn text(code: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = code;
    r
}

fn json(code: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Body::from(value.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A `metav1.Status` error, as clients of the API server expect.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json(
        code,
        &serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn refused(r: Refusal) -> Response<Body> {
    match r {
        Refusal::Unauthenticated(m) => status(StatusCode::UNAUTHORIZED, "Unauthorized", &m),
        Refusal::Forbidden(m) => status(StatusCode::FORBIDDEN, "Forbidden", &m),
    }
}

/// The discovery documents the aggregator reads.
mod discovery {
    use super::{GROUP, VERSION};
    use serde_json::{Value, json};

    fn group_version() -> Value {
        json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION})
    }

    pub fn group() -> Value {
        json!({
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": GROUP,
            "versions": [group_version()],
            "preferredVersion": group_version(),
        })
    }

    pub fn group_list() -> Value {
        let mut g = group();
        if let Some(o) = g.as_object_mut() {
            o.remove("kind");
            o.remove("apiVersion");
        }
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [g]})
    }

    pub fn resources() -> Value {
        let r = |name: &str, kind: &str| json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": ["get", "create"]});
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": format!("{GROUP}/{VERSION}"),
            "resources": [
                r("domains/console", "DomainConsole"),
                r("storagevols/upload", "StorageVolUpload"),
                r("storagevols/download", "StorageVolDownload"),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_lists_the_three_subresources() {
        let r = discovery::resources();
        let names: Vec<&str> = r["resources"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|x| x["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "domains/console",
                "storagevols/upload",
                "storagevols/download"
            ]
        );
        assert_eq!(r["groupVersion"], "subresources.vireo.dev/v1alpha1");
        assert_eq!(discovery::group_list()["groups"][0]["name"], GROUP);
    }

    #[test]
    fn a_self_signed_certificate_when_none_is_given() {
        let config = SubresourcesConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert: None,
            key: None,
            advertise: Some("192.0.2.7:8443".into()),
            peer_ca: None,
            peer_server_name: Some("vireo-subresources.vireo-system.svc".into()),
        };
        let (certs, _key) = self_signed(&config).expect("made");
        assert_eq!(certs.len(), 1);
        // It serves: rustls takes it with the key.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certs[0].clone()).expect("a CA for the test");
        tls_config(&config, roots).expect("a TLS configuration");
    }

    #[test]
    fn query_length() {
        assert_eq!(query_u64(Some("length=42"), "length"), Some(42));
        assert_eq!(query_u64(Some("a=1&length=7"), "length"), Some(7));
        assert_eq!(query_u64(Some("length=x"), "length"), None);
        assert_eq!(query_u64(None, "length"), None);
    }
}
