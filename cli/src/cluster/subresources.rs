//! Consoles and volume transfers on a cluster: WebSockets to the agents'
//! aggregated API `subresources.vireo.dev/v1alpha1`, through the API
//! server, which authenticates the user and asks RBAC about
//! `domains/console`, `storagevols/upload` and `storagevols/download`
//! before it proxies the connection to the agent of the object's node.
//!
//! Framing (see docs/architecture.md): every binary message starts with a
//! channel byte: 0 data to the agent, 1 data from it, 2 progress (JSON),
//! 3 the final status (JSON), 4 the upload's complete message (JSON).
//!
//! `rt` must be a multi-threaded runtime: the console's bridge runs on it
//! after `open_console` returns.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use vireo_crds::ObjectKind;
use vireo_drivers::error::ObjectName;
use vireo_drivers::storage::Progress;
use vireo_drivers::{Error, Result};

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

const PREFIX: &str = "/apis/subresources.vireo.dev/v1alpha1";
/// Bytes per upload message.
const CHUNK: usize = 1 << 20;

mod channel {
    pub const DATA_IN: u8 = 0;
    pub const DATA_OUT: u8 = 1;
    pub const PROGRESS: u8 = 2;
    pub const STATUS: u8 = 3;
    pub const COMPLETE: u8 = 4;
}

/// Opens the serial console of Domain `namespace/name`. The returned
/// stream is one end of a socket pair; the other end is bridged to the
/// WebSocket on `rt` until either side closes.
pub fn open_console(
    client: &Client,
    rt: &Runtime,
    namespace: &str,
    name: &str,
) -> Result<UnixStream> {
    let object = ObjectName::new(ObjectKind::Domain, format!("{namespace}/{name}"));
    let path = format!("{PREFIX}/namespaces/{namespace}/domains/{name}/console");
    let ws = rt.block_on(connect(client, &path, &object))?;
    let (mine, theirs) = UnixStream::pair().map_err(|e| failed(&object, e))?;
    theirs
        .set_nonblocking(true)
        .map_err(|e| failed(&object, e))?;
    let theirs = {
        let _guard = rt.enter();
        tokio::net::UnixStream::from_std(theirs).map_err(|e| failed(&object, e))?
    };
    rt.spawn(bridge(ws, theirs));
    Ok(mine)
}

/// Copies between the WebSocket and the local end of the console pair.
async fn bridge(ws: Ws, local: tokio::net::UnixStream) {
    let (mut sink, mut stream) = ws.split();
    let (mut lr, mut lw) = local.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match lr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(frame(channel::DATA_IN, &buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(msg)) = stream.next().await {
            let more = match msg {
                Message::Binary(b) if b.first() == Some(&channel::DATA_OUT) => {
                    lw.write_all(&b[1..]).await.is_ok()
                }
                Message::Close(_) => false,
                _ => true,
            };
            if !more {
                break;
            }
        }
        let _ = lw.shutdown().await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

/// Replaces the content of StorageVol `namespace/volume` with `source`.
/// The agent commits only after the final message (byte count and
/// SHA-256) matches what it received; a cut connection leaves the volume
/// as it was. Progress counts the bytes sent.
pub fn upload(
    client: &Client,
    rt: &Runtime,
    namespace: &str,
    volume: &str,
    source: &mut dyn Read,
    length: Option<u64>,
    progress: Progress<'_>,
) -> Result<u64> {
    let object = ObjectName::new(ObjectKind::StorageVol, format!("{namespace}/{volume}"));
    let query = length.map(|l| format!("?length={l}")).unwrap_or_default();
    let path = format!("{PREFIX}/namespaces/{namespace}/storagevols/{volume}/upload{query}");
    let ws = rt.block_on(connect(client, &path, &object))?;
    let (mut sink, stream) = ws.split();
    // The agent's answer, read while we send (progress is ignored here).
    let answer = rt.spawn(final_status(stream));
    let result = (|| -> Result<u64> {
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(failed(&object, format!("reading the source: {e}"))),
            };
            hasher.update(&buf[..n]);
            rt.block_on(sink.send(frame(channel::DATA_IN, &buf[..n])))
                .map_err(|e| failed(&object, format!("sending: {e}")))?;
            sent += n as u64;
            progress(sent, length);
        }
        let complete = serde_json::json!({
            "bytes": sent,
            "sha256": hex(hasher.finish().as_ref()),
        });
        rt.block_on(sink.send(frame(channel::COMPLETE, complete.to_string().as_bytes())))
            .map_err(|e| failed(&object, format!("sending: {e}")))?;
        Ok(sent)
    })();
    match result {
        Ok(sent) => {
            let status = rt
                .block_on(answer)
                .map_err(|e| failed(&object, e))?
                .map_err(|m| failed(&object, m))?;
            let _ = rt.block_on(sink.close());
            match status.get("bytes").and_then(|b| b.as_u64()) {
                Some(n) if n == sent => Ok(n),
                other => Err(failed(
                    &object,
                    format!("the agent stored {other:?} bytes, {sent} were sent"),
                )),
            }
        }
        Err(e) => {
            // Prefer the agent's reason when it gave one.
            let _ = rt.block_on(sink.close());
            let why = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(2), answer).await
            });
            match why {
                Ok(Ok(Err(m))) => Err(failed(&object, m)),
                _ => Err(e),
            }
        }
    }
}

/// Writes the content of StorageVol `namespace/volume` to `sink`; checks
/// the byte count and SHA-256 the agent reports at the end.
pub fn download(
    client: &Client,
    rt: &Runtime,
    namespace: &str,
    volume: &str,
    sink: &mut dyn Write,
    progress: Progress<'_>,
) -> Result<u64> {
    let object = ObjectName::new(ObjectKind::StorageVol, format!("{namespace}/{volume}"));
    let path = format!("{PREFIX}/namespaces/{namespace}/storagevols/{volume}/download");
    let mut ws = rt.block_on(connect(client, &path, &object))?;
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut received = 0u64;
    let mut total = None;
    loop {
        let msg = match rt.block_on(ws.next()) {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(failed(&object, format!("receiving: {e}"))),
            None => break,
        };
        let Message::Binary(b) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        match b.first().copied() {
            Some(channel::DATA_OUT) => {
                let data = &b[1..];
                sink.write_all(data)
                    .map_err(|e| failed(&object, format!("writing: {e}")))?;
                hasher.update(data);
                received += data.len() as u64;
                progress(received, total);
            }
            Some(channel::PROGRESS) => {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b[1..]) {
                    total = v.get("total").and_then(|t| t.as_u64());
                }
            }
            Some(channel::STATUS) => {
                let status = parse_status(&b[1..]).map_err(|m| failed(&object, m))?;
                sink.flush()
                    .map_err(|e| failed(&object, format!("writing: {e}")))?;
                let _ = rt.block_on(ws.close(None));
                let digest = hex(hasher.finish().as_ref());
                if status.get("bytes").and_then(|b| b.as_u64()) != Some(received) {
                    return Err(failed(
                        &object,
                        format!("received {received} bytes, the agent sent {status}"),
                    ));
                }
                if let Some(want) = status.get("sha256").and_then(|s| s.as_str())
                    && want != digest
                {
                    return Err(failed(
                        &object,
                        "the received bytes' SHA-256 does not match",
                    ));
                }
                return Ok(received);
            }
            _ => {}
        }
    }
    Err(failed(
        &object,
        format!("the connection closed after {received} bytes, before the download completed"),
    ))
}

/// Reads the agent's messages to its final status.
async fn final_status(
    mut stream: futures::stream::SplitStream<Ws>,
) -> std::result::Result<serde_json::Value, String> {
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) if b.first() == Some(&channel::STATUS) => {
                return parse_status(&b[1..]);
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("receiving: {e}")),
        }
    }
    Err("the connection closed before the agent confirmed".into())
}

/// `Ok(status)` for `"status": "Success"`, the agent's message otherwise.
fn parse_status(data: &[u8]) -> std::result::Result<serde_json::Value, String> {
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| format!("a malformed status: {e}"))?;
    if v.get("status").and_then(|s| s.as_str()) == Some("Success") {
        Ok(v)
    } else {
        Err(v
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("the agent reported a failure")
            .to_string())
    }
}

/// The WebSocket to a subresource, through the API server.
async fn connect(client: &Client, path: &str, object: &ObjectName) -> Result<Ws> {
    let req = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| failed(object, e))?;
    match client.connect(req).await {
        Ok(c) => Ok(c.into_stream()),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            Err(failed(object, format!("forbidden: {}", s.message)))
        }
        Err(kube::Error::Api(s)) if s.code == 404 && s.message.contains("not found") => {
            Err(Error::NotFound(object.clone()))
        }
        Err(kube::Error::Api(s)) => Err(failed(object, s.message)),
        Err(e) => Err(failed(object, e)),
    }
}

fn failed(object: &ObjectName, e: impl std::fmt::Display) -> Error {
    Error::OperationFailed {
        object: object.clone(),
        message: e.to_string(),
    }
}

fn frame(ch: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(ch);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert!(parse_status(br#"{"status":"Success","bytes":3}"#).is_ok());
        assert_eq!(
            parse_status(br#"{"status":"Failure","message":"no space"}"#),
            Err("no space".to_string())
        );
        assert!(parse_status(b"garbage").is_err());
    }

    #[test]
    fn frames_carry_their_channel() {
        let Message::Binary(b) = frame(channel::COMPLETE, b"{}") else {
            panic!("binary")
        };
        assert_eq!(&b[..], b"\x04{}");
    }
}
