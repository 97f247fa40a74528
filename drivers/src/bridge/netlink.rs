//! Links and addresses through rtnetlink, synchronously.
//!
//! Each call opens its own netlink socket and runs it on a current-thread
//! tokio runtime in the calling thread, so the socket lives in that
//! thread's network namespace (tests enter a namespace per thread).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    BridgeStpState, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `tun`, `veth`, ... (`None` for a physical device).
    pub kind: Option<String>,
    /// The link's alias (`ip link set dev X alias ...`): Vireo marks the
    /// bridges it creates with one.
    pub alias: Option<String>,
    /// The index of the bridge it is a port of.
    pub controller: Option<u32>,
    pub up: bool,
}

/// A netlink failure: the errno (positive) when the kernel said one.
#[derive(Debug, Clone)]
pub struct NlError {
    pub errno: Option<i32>,
    pub message: String,
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<rtnetlink::Error> for NlError {
    fn from(e: rtnetlink::Error) -> Self {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
            _ => None,
        };
        let message = match errno {
            Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
            None => e.to_string(),
        };
        Self { errno, message }
    }
}

impl From<std::io::Error> for NlError {
    fn from(e: std::io::Error) -> Self {
        Self {
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }
}

pub type NlResult<T> = Result<T, NlError>;

/// Runs `f` with a fresh netlink handle on a current-thread runtime.
///
/// The callers are synchronous (the driver traits are), but they may be
/// reached from async code: the agent's start-up and its reconcilers run on
/// a tokio runtime, where blocking on a second runtime panics ("Cannot start
/// a runtime from within a runtime"). So when this thread is inside a
/// runtime, the call runs on a short-lived scoped thread of its own instead.
/// A thread made by `clone(2)` shares its creator's network namespace, so
/// the socket still lives in the caller's namespace (tests enter one per
/// thread).
fn run<T, F, Fut>(f: F) -> NlResult<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = NlResult<T>>,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return run_here(f);
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("vireo-netlink".into())
            .spawn_scoped(scope, || run_here(f))
            .map_err(NlError::from)?
            .join()
            .unwrap_or_else(|_| {
                Err(NlError {
                    errno: None,
                    message: "the netlink call panicked".into(),
                })
            })
    })
}

/// [`run`] on this thread, which is not inside a tokio runtime: the only
/// place a runtime is built and blocked on in the drivers.
fn run_here<T, F, Fut>(f: F) -> NlResult<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = NlResult<T>>,
{
    // Safe to block here: `run` calls this only where
    // `Handle::try_current()` fails, that is on a thread no runtime drives
    // (the CLI, tests, or the scoped thread `run` makes for async callers),
    // so this never panics with "Cannot start a runtime from within a
    // runtime". The tests below call it from a worker and a blocking task.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let driver = tokio::spawn(connection);
        let out = f(handle).await;
        driver.abort();
        out
    })
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        alias: None,
        controller: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a.clone()),
            LinkAttribute::Controller(c) if *c != 0 => link.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

const ENODEV: i32 = libc::ENODEV;

async fn get(handle: &Handle, name: &str) -> NlResult<Option<Link>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(link_of(&msg))),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = NlError::from(e);
            if e.errno == Some(ENODEV) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// The link called `name`, if there is one.
pub fn link(name: &str) -> NlResult<Option<Link>> {
    run(|h| async move { get(&h, name).await })
}

/// Every link whose controller (bridge) is `bridge_index`.
pub fn ports_of(bridge_index: u32) -> NlResult<Vec<Link>> {
    run(|h| async move {
        let mut out = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(msg) = links.try_next().await? {
            let link = link_of(&msg);
            if link.controller == Some(bridge_index) {
                out.push(link);
            }
        }
        Ok(out)
    })
}

/// Creates a bridge (STP off, no forward delay, as libvirt sets its
/// bridges), marks it with `alias` and brings it up. Returns its index.
pub fn create_bridge(name: &str, alias: &str) -> NlResult<u32> {
    run(|h| async move {
        let msg = LinkBridge::new(name)
            .stp_state(BridgeStpState::Disabled)
            .forward_delay(0)
            .build();
        h.link().add(msg).execute().await?;
        let link = get(&h, name).await?.ok_or_else(|| NlError {
            errno: Some(ENODEV),
            message: format!("bridge {name} vanished right after it was created"),
        })?;
        // The kernel takes an alias on a change, not on creation.
        h.link()
            .set(
                LinkUnspec::new_with_index(link.index)
                    .alias(alias)
                    .up()
                    .build(),
            )
            .execute()
            .await?;
        Ok(link.index)
    })
}

/// Every link of this namespace.
pub fn links() -> NlResult<Vec<Link>> {
    run(|h| async move {
        let mut out = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(msg) = links.try_next().await? {
            out.push(link_of(&msg));
        }
        Ok(out)
    })
}

/// Makes link `index` a port of `bridge_index` and brings it up, marking
/// it with `alias` when given.
pub fn attach_and_up(index: u32, bridge_index: u32, alias: Option<&str>) -> NlResult<()> {
    run(|h| async move {
        let mut change = LinkUnspec::new_with_index(index)
            .controller(bridge_index)
            .up();
        if let Some(alias) = alias {
            change = change.alias(alias);
        }
        h.link().set(change.build()).execute().await?;
        Ok(())
    })
}

/// Brings link `index` up.
pub fn set_up(index: u32) -> NlResult<()> {
    run(|h| async move {
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await?;
        Ok(())
    })
}

/// Deletes link `name`; a link that is not there is fine.
pub fn delete(name: &str) -> NlResult<()> {
    run(|h| async move {
        let Some(link) = get(&h, name).await? else {
            return Ok(());
        };
        match h.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NlError::from(e);
                if e.errno == Some(ENODEV) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    })
}

/// The IPv4 addresses (with prefixes) on link `index`.
pub fn ipv4_addresses(index: u32) -> NlResult<Vec<(Ipv4Addr, u8)>> {
    run(|h| async move {
        let mut out = Vec::new();
        let mut addrs = h.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = addrs.try_next().await? {
            if msg.header.index != index {
                continue;
            }
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a)) = attr {
                    out.push((*a, msg.header.prefix_len));
                }
            }
        }
        Ok(out)
    })
}

/// Adds `addr/prefix` to link `index` (already there is fine).
pub fn add_ipv4(index: u32, addr: Ipv4Addr, prefix: u8) -> NlResult<()> {
    run(|h| async move {
        h.address()
            .add(index, IpAddr::V4(addr), prefix)
            .replace()
            .execute()
            .await?;
        Ok(())
    })
}

/// Whether a kind string is a bridge's.
pub fn is_bridge(link: &Link) -> bool {
    link.kind.as_deref() == Some(&InfoKind::Bridge.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent calls the bridge backend from its async start-up and from
    /// blocking tasks: neither may panic with "Cannot start a runtime from
    /// within a runtime" (issue 23). Looking up `lo` needs no privileges.
    #[test]
    fn calls_work_inside_a_runtime_and_on_its_blocking_pool() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let on_worker = rt.block_on(async { link("lo") });
        let lo = on_worker.expect("lookup on a worker").expect("lo exists");
        assert_eq!(lo.name, "lo");
        let on_pool = rt
            .block_on(async { tokio::task::spawn_blocking(|| link("lo")).await })
            .expect("the blocking task ends");
        assert_eq!(
            on_pool.expect("lookup on the pool").map(|l| l.index),
            Some(lo.index)
        );
        // And outside any runtime, as the CLI and tests call it.
        assert_eq!(
            link("lo").expect("plain lookup").map(|l| l.index),
            Some(lo.index)
        );
    }
}
