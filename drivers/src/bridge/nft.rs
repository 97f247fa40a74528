//! Forwarding rules: one nftables table per network (`table ip vireo_NAME`),
//! written by `nft -f -` in one transaction, so a table is replaced whole
//! and never seen half-made, and removing it removes every rule we added.
//!
//! Base chains of other tables on the same hooks still apply: an `accept`
//! here does not override a host firewall's `drop` (as with libvirt).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use vireo_crds::ForwardMode;

use super::plan::Plan;

/// The nft binary: on PATH, or where Debian's `nftables` puts it.
pub fn binary() -> Option<PathBuf> {
    super::find_program("nft")
}

/// The table of network `name`: `vireo_` and the name with '-' and '.'
/// written as '_' (with a hash of the name when it has a '.', since
/// Kubernetes names cannot hold '_' but may hold both '-' and '.').
pub fn table_name(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(200)
        .collect();
    if name.contains('.') || name.len() > 200 || !name.is_ascii() {
        clean.push_str(&format!("_{:08x}", super::short_hash(name)));
    }
    format!("vireo_{clean}")
}

/// The ruleset for a network, or `None` when it needs no rule (bridge
/// mode; nat or route without an address).
pub fn ruleset(table: &str, plan: &Plan) -> Option<String> {
    let br = &plan.bridge;
    let mut forward = vec![
        "type filter hook forward priority filter; policy accept;".to_string(),
        // Guest to guest on the same bridge (seen here only with br_netfilter).
        format!("iifname \"{br}\" oifname \"{br}\" accept"),
    ];
    let mut postrouting = Vec::new();
    match (plan.mode, plan.subnet) {
        (ForwardMode::Bridge, _) => return None,
        (ForwardMode::Nat | ForwardMode::Route, None) => return None,
        (ForwardMode::Isolated, _) => {}
        (ForwardMode::Nat, Some(s)) => {
            let net = s.cidr();
            forward.push(format!(
                "oifname \"{br}\" ip daddr {net} ct state established,related accept"
            ));
            forward.push(format!("iifname \"{br}\" ip saddr {net} accept"));
            postrouting = vec![
                "type nat hook postrouting priority srcnat; policy accept;".to_string(),
                // Multicast and broadcast are not masqueraded (as libvirt).
                format!("ip saddr {net} ip daddr 224.0.0.0/24 return"),
                format!("ip saddr {net} ip daddr 255.255.255.255 return"),
                format!("ip saddr {net} ip daddr != {net} masquerade"),
            ];
        }
        (ForwardMode::Route, Some(s)) => {
            let net = s.cidr();
            forward.push(format!("oifname \"{br}\" ip daddr {net} accept"));
            forward.push(format!("iifname \"{br}\" ip saddr {net} accept"));
        }
    }
    forward.push(format!("iifname \"{br}\" drop"));
    forward.push(format!("oifname \"{br}\" drop"));
    let mut out = String::new();
    // Declaring the table first makes the delete valid when it is absent;
    // the three lines are one transaction.
    out.push_str(&format!("table ip {table} {{}}\ndelete table ip {table}\n"));
    out.push_str(&format!("table ip {table} {{\n"));
    out.push_str("  chain forward {\n");
    for r in &forward {
        out.push_str(&format!("    {r}\n"));
    }
    out.push_str("  }\n");
    if !postrouting.is_empty() {
        out.push_str("  chain postrouting {\n");
        for r in &postrouting {
            out.push_str(&format!("    {r}\n"));
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    Some(out)
}

fn nft_stdin(script: &str) -> Result<(), String> {
    let nft = binary().ok_or("nft not found (Debian package nftables)")?;
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", nft.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing the ruleset to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f - failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Installs (or replaces) the table.
pub fn apply(script: &str) -> Result<(), String> {
    nft_stdin(script)
}

/// Removes the table; one that is not there is fine.
pub fn remove(table: &str) -> Result<(), String> {
    if binary().is_none() {
        // Without nft there can be no table of ours.
        return Ok(());
    }
    nft_stdin(&format!("table ip {table} {{}}\ndelete table ip {table}\n"))
}

/// Whether the table exists.
pub fn exists(table: &str) -> bool {
    let Some(nft) = binary() else {
        return false;
    };
    Command::new(nft)
        .args(["list", "table", "ip", table])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::super::plan::Subnet;
    use super::*;
    use std::net::Ipv4Addr;

    fn plan(mode: ForwardMode) -> Plan {
        Plan {
            mode,
            bridge: "vireo3".into(),
            subnet: Some(Subnet {
                gateway: Ipv4Addr::new(10, 9, 0, 1),
                prefix: 24,
            }),
            dhcp: None,
        }
    }

    #[test]
    fn table_names() {
        assert_eq!(table_name("default"), "vireo_default");
        assert_eq!(table_name("my-net"), "vireo_my_net");
        assert_ne!(table_name("a.b"), table_name("a-b"));
        assert!(table_name("a.b").starts_with("vireo_a_b_"));
    }

    #[test]
    fn nat_masquerades_the_subnet() {
        let r = ruleset("vireo_n", &plan(ForwardMode::Nat)).expect("rules");
        assert!(r.contains("ip saddr 10.9.0.0/24 ip daddr != 10.9.0.0/24 masquerade"));
        assert!(r.contains("delete table ip vireo_n"));
        assert!(r.contains("iifname \"vireo3\" drop"));
    }

    #[test]
    fn isolated_drops_and_bridge_has_no_rules() {
        let r = ruleset("vireo_n", &plan(ForwardMode::Isolated)).expect("rules");
        assert!(!r.contains("masquerade"));
        assert!(!r.contains("saddr"));
        assert!(r.contains("oifname \"vireo3\" drop"));
        assert!(ruleset("vireo_n", &plan(ForwardMode::Bridge)).is_none());
    }
}
