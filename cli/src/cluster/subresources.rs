//! The console and volume transfers on a cluster, through Vireo's
//! aggregated API (its subresources). Until that API is here, each says
//! that it needs it.

use vireo_crds::ObjectKind;
use vireo_drivers::error::ObjectName;
use vireo_drivers::storage::Progress;

fn needs_api(
    kind: ObjectKind,
    namespace: &str,
    name: &str,
    operation: &'static str,
) -> vireo_drivers::Error {
    vireo_drivers::Error::Unsupported {
        object: ObjectName::new(kind, format!("{namespace}/{name}")),
        driver: "kube",
        operation,
    }
}

/// A duplex stream to a running domain's serial console.
pub fn open_console(
    client: &kube::Client,
    rt: &tokio::runtime::Runtime,
    namespace: &str,
    name: &str,
) -> vireo_drivers::Result<std::os::unix::net::UnixStream> {
    let _ = (client, rt);
    Err(needs_api(
        ObjectKind::Domain,
        namespace,
        name,
        "console (it needs the subresources API)",
    ))
}

/// Replaces a StorageVol's content with the bytes of `source`.
pub fn upload(
    client: &kube::Client,
    rt: &tokio::runtime::Runtime,
    namespace: &str,
    volume: &str,
    source: &mut dyn std::io::Read,
    length: Option<u64>,
    progress: Progress<'_>,
) -> vireo_drivers::Result<u64> {
    let _ = (client, rt, source, length, progress);
    Err(needs_api(
        ObjectKind::StorageVol,
        namespace,
        volume,
        "vol-upload (it needs the subresources API)",
    ))
}

/// Writes a StorageVol's content to `sink`.
pub fn download(
    client: &kube::Client,
    rt: &tokio::runtime::Runtime,
    namespace: &str,
    volume: &str,
    sink: &mut dyn std::io::Write,
    progress: Progress<'_>,
) -> vireo_drivers::Result<u64> {
    let _ = (client, rt, sink, progress);
    Err(needs_api(
        ObjectKind::StorageVol,
        namespace,
        volume,
        "vol-download (it needs the subresources API)",
    ))
}
