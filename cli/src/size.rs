//! Sizes on the command line follow virsh's scaled integers, so that
//! `vol-create-as default-pool v1 10G` means what it means to virsh:
//! `k`/`K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`, `P`/`PiB` are powers of
//! 1024 (so are Kubernetes' `Ki`, `Mi`, `Gi`, `Ti`); `KB`, `MB`, `GB`, `TB`,
//! `PB` are powers of 1000; `B` or no suffix is the command's default unit.
//! (Manifests use Kubernetes quantities, where `G` is 10^9.)

/// Reads a size; `default_unit` is what a bare number counts (1 for
/// bytes, 1024 for `setmem`'s KiB).
pub fn parse(text: &str, default_unit: u64) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let bad = || {
        format!(
            "'{text}' is not a size (a whole number with an optional unit such as K, M, G, T, KiB, GB)"
        )
    };
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit: u64 = match suffix {
        "" => default_unit,
        "b" | "B" | "bytes" => 1,
        "k" | "K" | "Ki" | "KiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        "T" | "Ti" | "TiB" => 1 << 40,
        "P" | "Pi" | "PiB" => 1 << 50,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "PB" => 1_000_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn virsh_units() {
        assert_eq!(parse("10G", 1), Ok(10 << 30));
        assert_eq!(parse("10GB", 1), Ok(10_000_000_000));
        assert_eq!(parse("512Mi", 1), Ok(512 << 20));
        assert_eq!(parse("2048", 1024), Ok(2 << 20));
        assert_eq!(parse("7", 1), Ok(7));
        assert!(parse("G", 1).is_err());
        assert!(parse("10X", 1).is_err());
        assert!(parse("-1", 1).is_err());
        assert!(parse("99999999999P", 1).is_err());
    }
}
