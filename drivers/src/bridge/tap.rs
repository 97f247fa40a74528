//! Tap devices for guests' virtio-net interfaces.
//!
//! A tap is made persistent (it outlives the descriptor that created it),
//! owned by this process's user, single-queue and with the virtio-net
//! header on, then put on the network's bridge and brought up. The VM
//! process opens it by name afterwards: QEMU with `-netdev
//! tap,ifname=NAME` and vireo-vmm with `--net NAME` both attach to the
//! existing device (multi-queue must match: off on both sides), so the
//! guest's first DHCP request already reaches the bridge. The driver
//! deletes the tap when the activation ends.
//!
//! Each tap carries an alias naming its network. Destroying a network
//! deletes its bridge and leaves the running guests' taps on no bridge;
//! the network's next start puts them back ([`reattach`]), so the guests'
//! links come back without a restart of the guest.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::netlink;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 203, int)`
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `_IOW('T', 204, int)`
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a tap could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapError(pub String);

impl std::fmt::Display for TapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> TapError {
    TapError(format!("{what}: {e}"))
}

/// The tap of interface `index` of a domain: `vt` and ten hex digits of
/// the UUID and the index, within Linux's 15 characters.
pub fn tap_name(uuid: &str, index: usize) -> String {
    let hex: String = uuid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(10)
        .collect();
    format!("vt{hex}{index:x}")
}

/// A stable MAC for interface `index` of a domain without `mac`: QEMU's
/// 52:54:00 prefix and three bytes from the UUID and the index.
pub fn derived_mac(uuid: &str, index: usize) -> String {
    let u = uuid::Uuid::parse_str(uuid)
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16]);
    let b = [u[13], u[14], u[15].wrapping_add(index as u8)];
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The MAC of interface `index`: its own, or the one derived from the UUID.
pub fn interface_mac(iface: &vireo_crds::Interface, uuid: &str, index: usize) -> String {
    iface
        .mac
        .as_ref()
        .map(|m| m.to_ascii_lowercase())
        .unwrap_or_else(|| derived_mac(uuid, index))
}

/// Whether `name` can be a Linux interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The alias that marks a tap as a port of network `network`, so that the
/// network's next start finds it (see [`reattach`]). The kernel takes an
/// alias shorter than 256 bytes counting the NUL netlink sends after it,
/// so 254; a longer name is cut and given a hash of the whole.
pub fn port_alias(network: &str) -> String {
    const PREFIX: &str = "vireo-port:";
    const MAX: usize = 254;
    if PREFIX.len() + network.len() <= MAX {
        return format!("{PREFIX}{network}");
    }
    let hash = format!("~{:08x}", super::short_hash(network));
    let mut cut = MAX - PREFIX.len() - hash.len();
    while !network.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{PREFIX}{}{hash}", &network[..cut])
}

/// Puts back on `bridge` every tap marked as a port of `network` that is on
/// no bridge: a network destroyed and started again (or whose bridge was
/// deleted under it) gets the taps of the guests that kept running, as
/// they were. A tap on another bridge is left where it is. Returns the
/// taps put back.
pub fn reattach(network: &str, bridge: &str) -> Result<Vec<String>, TapError> {
    let bridge_link = netlink::link(bridge)
        .map_err(|e| fail(&format!("looking up bridge {bridge}"), e))?
        .filter(netlink::is_bridge)
        .ok_or_else(|| TapError(format!("bridge '{bridge}' does not exist on this node")))?;
    let alias = port_alias(network);
    let mut back = Vec::new();
    let mut failed = Vec::new();
    for link in netlink::links().map_err(|e| fail("listing links", e))? {
        if link.kind.as_deref() != Some("tun")
            || link.controller.is_some()
            || link.alias.as_deref() != Some(alias.as_str())
        {
            continue;
        }
        // One tap that cannot be attached (deleted by its guest's stop
        // meanwhile, say) does not keep the others off the bridge.
        match netlink::attach_and_up(link.index, bridge_link.index, None) {
            Ok(()) => back.push(link.name),
            Err(e) => failed.push(format!("{}: {e}", link.name)),
        }
    }
    if failed.is_empty() {
        Ok(back)
    } else {
        Err(TapError(format!(
            "attaching to {bridge} failed for {} (put back: {back:?})",
            failed.join(", ")
        )))
    }
}

/// Creates the persistent tap `name` (or takes the existing one), puts it
/// on `bridge`, marks it as a port of `network` ([`port_alias`]) and brings
/// it up. Idempotent.
pub fn create(name: &str, bridge: &str, network: &str) -> Result<(), TapError> {
    if !valid_ifname(name) {
        return Err(TapError(format!("'{name}' is not a valid interface name")));
    }
    let bridge_link = netlink::link(bridge)
        .map_err(|e| fail(&format!("looking up bridge {bridge}"), e))?
        .filter(netlink::is_bridge)
        .ok_or_else(|| TapError(format!("bridge '{bridge}' does not exist on this node")))?;
    match netlink::link(name).map_err(|e| fail(&format!("looking up {name}"), e))? {
        Some(link) if link.kind.as_deref() != Some("tun") => {
            return Err(TapError(format!(
                "'{name}' exists and is not a tap device (it is {})",
                link.kind.as_deref().unwrap_or("a physical device")
            )));
        }
        Some(_) => {}
        None => make_persistent(name)?,
    }
    let link = netlink::link(name)
        .map_err(|e| fail(&format!("looking up {name}"), e))?
        .ok_or_else(|| TapError(format!("tap '{name}' vanished right after it was created")))?;
    netlink::attach_and_up(link.index, bridge_link.index, Some(&port_alias(network)))
        .map_err(|e| fail(&format!("attaching {name} to {bridge}"), e))
}

fn make_persistent(name: &str) -> Result<(), TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| fail("/dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = file.as_raw_fd();
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its
    // size (40 bytes) and the layout of the fields the kernel uses, and it
    // lives across the call.
    if unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(fail(
            &format!("creating tap {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: TUNSETOWNER and TUNSETPERSIST take their argument by value
    // (an integer), not a pointer; the descriptor is ours.
    let rc = unsafe { libc::ioctl(fd, TUNSETOWNER as _, uid as libc::c_ulong) };
    if rc < 0 {
        return Err(fail(
            &format!("setting the owner of {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(fd, TUNSETPERSIST as _, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(fail(
            &format!("making {name} persistent"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Deletes the tap `name`; one that is not there is fine. Refuses to
/// delete anything that is not a tap.
pub fn remove(name: &str) -> Result<(), TapError> {
    match netlink::link(name).map_err(|e| fail(&format!("looking up {name}"), e))? {
        None => Ok(()),
        Some(link) if link.kind.as_deref() == Some("tun") => {
            netlink::delete(name).map_err(|e| fail(&format!("deleting {name}"), e))
        }
        Some(_) => Err(TapError(format!(
            "'{name}' is not a tap device; left alone"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_is_40_bytes() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn derived_names_and_macs_are_stable() {
        let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(tap_name(uuid, 0), "vt0f8fad5bd90");
        assert!(tap_name(uuid, 31).len() <= 15);
        assert_eq!(derived_mac(uuid, 0), "52:54:00:28:95:0e");
        assert_eq!(derived_mac(uuid, 1), "52:54:00:28:95:0f");
        assert!(super::super::plan::valid_mac(&derived_mac(uuid, 3)));
    }

    #[test]
    fn port_aliases_fit_the_kernel() {
        assert_eq!(port_alias("default"), "vireo-port:default");
        let long = "n".repeat(253);
        let a = port_alias(&long);
        assert_eq!(a.len(), 254);
        assert!(a.starts_with("vireo-port:nnn"));
        assert_ne!(a, port_alias(&format!("{}m", "n".repeat(252))));
        let wide = "é".repeat(200);
        assert!(port_alias(&wide).len() <= 255);
    }

    #[test]
    fn interface_names() {
        assert!(valid_ifname("vt0123456789a0"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a-name-much-too-long"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("a b"));
    }
}
