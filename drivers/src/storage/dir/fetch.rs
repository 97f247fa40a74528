//! Volume content from an HTTP(S) URL (`spec.source.url`), streamed into a
//! partial file with progress.

use std::fs::File;
use std::time::Duration;

use crate::storage::Progress;

use super::file;

/// Streams `url` into `dst` (created, empty). Refuses bodies bigger than
/// `limit` bytes before writing them, when the server says how big they are,
/// and stops when more arrives than that. Returns the number of bytes.
pub fn fetch(url: &str, dst: &File, limit: u64, progress: Progress<'_>) -> Result<u64, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        // Between bytes, not for the whole body: images may be big.
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(t) = total
        && t > limit
    {
        return Err(format!(
            "GET {url}: the content is {t} bytes, more than the {limit} bytes that fit"
        ));
    }
    let mut reader = response.into_body().into_reader();
    let mut limited = std::io::Read::take(&mut reader, limit.saturating_add(1));
    let bytes = file::copy_stream(&mut limited, dst, total, progress)
        .map_err(|e| format!("GET {url}: {e}"))?;
    if bytes > limit {
        return Err(format!(
            "GET {url}: the content is more than the {limit} bytes that fit"
        ));
    }
    if let Some(t) = total
        && bytes != t
    {
        return Err(format!(
            "GET {url}: the transfer ended after {bytes} of {t} bytes"
        ));
    }
    tracing::info!(url, bytes, "fetched");
    Ok(bytes)
}
