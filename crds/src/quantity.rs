//! Kubernetes `Quantity` strings as byte counts.
//!
//! Sizes in Vireo manifests are Kubernetes quantities (`8Gi`, `512Mi`,
//! `100G`, `1048576`), the same notation as Pod resources. Drivers work in
//! bytes; these two functions convert both ways.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Why a quantity could not be read as a byte count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "'{0}' is not a quantity (expected a number with an optional suffix such as Ki, Mi, Gi, Ti, k, M, G, T)"
    )]
    Syntax(String),
    #[error("'{0}' is negative; a size must not be")]
    Negative(String),
    #[error("'{0}' is not a whole number of bytes")]
    Fraction(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// Reads a quantity (`2Gi`, `1.5Gi`, `100M`, `4096`) as a number of bytes.
pub fn parse_quantity(q: &Quantity) -> Result<u64, QuantityError> {
    parse_str(&q.0)
}

/// Same as [`parse_quantity`] on a plain string.
pub fn parse_str(s: &str) -> Result<u64, QuantityError> {
    let text = s.trim();
    let syntax = || QuantityError::Syntax(s.to_string());
    if text.is_empty() {
        return Err(syntax());
    }
    if text.starts_with('-') {
        return Err(QuantityError::Negative(s.to_string()));
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    // (numerator multiplier, denominator) for each suffix.
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        _ => {
            // Decimal exponent form: 1e9, 12E3.
            if let Some(exp) = suffix.strip_prefix(['e', 'E']) {
                let e: u32 = exp.parse().map_err(|_| syntax())?;
                if e > 18 {
                    return Err(QuantityError::Overflow(s.to_string()));
                }
                (10u128.pow(e), 1)
            } else {
                return Err(syntax());
            }
        }
    };
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
        return Err(syntax());
    }
    if frac_part.len() > 18 {
        return Err(syntax());
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part
            .parse()
            .map_err(|_| QuantityError::Overflow(s.to_string()))?
    };
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        frac_part.parse().map_err(|_| syntax())?
    };
    let scale = 10u128.pow(frac_part.len() as u32);
    let overflow = || QuantityError::Overflow(s.to_string());
    let numerator = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac))
        .and_then(|v| v.checked_mul(mul))
        .ok_or_else(overflow)?;
    let denominator = scale * div;
    if numerator % denominator != 0 {
        return Err(QuantityError::Fraction(s.to_string()));
    }
    u64::try_from(numerator / denominator).map_err(|_| overflow())
}

/// Writes a byte count as the shortest exact binary quantity (`8Gi`, `1536Mi`, `1000`).
pub fn format_bytes(bytes: u64) -> Quantity {
    const SUFFIXES: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    if bytes != 0 {
        for (suffix, shift) in SUFFIXES {
            let unit = 1u64 << shift;
            if bytes.is_multiple_of(unit) {
                return Quantity(format!("{}{}", bytes / unit, suffix));
            }
        }
    }
    Quantity(bytes.to_string())
}

/// A size as virsh prints it: `100.00 GiB`, `0.00 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_str("8Gi"), Ok(8 << 30));
        assert_eq!(parse_str("512Mi"), Ok(512 << 20));
        assert_eq!(parse_str("100G"), Ok(100_000_000_000));
        assert_eq!(parse_str("4096"), Ok(4096));
        assert_eq!(parse_str("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_str("2k"), Ok(2000));
        assert_eq!(parse_str("1e3"), Ok(1000));
        assert_eq!(parse_str("0"), Ok(0));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(parse_str(""), Err(QuantityError::Syntax(_))));
        assert!(matches!(parse_str("Gi"), Err(QuantityError::Syntax(_))));
        assert!(matches!(parse_str("12XB"), Err(QuantityError::Syntax(_))));
        assert!(matches!(parse_str("1.2.3"), Err(QuantityError::Syntax(_))));
        assert!(matches!(parse_str("-1Gi"), Err(QuantityError::Negative(_))));
        assert!(matches!(
            parse_str("1.0000001"),
            Err(QuantityError::Fraction(_))
        ));
        assert!(matches!(
            parse_str("100Ei"),
            Err(QuantityError::Overflow(_))
        ));
        assert!(matches!(
            parse_str("99999999999999999999999999999999999999999"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for bytes in [0u64, 1, 1000, 1024, 1536 << 20, 8 << 30, 100 << 30, 3 << 29] {
            let q = format_bytes(bytes);
            assert_eq!(parse_quantity(&q), Ok(bytes), "{}", q.0);
        }
        assert_eq!(format_bytes(8 << 30).0, "8Gi");
        assert_eq!(format_bytes(1536 << 20).0, "1536Mi");
        assert_eq!(format_bytes(1000).0, "1000");
    }

    #[test]
    fn human_sizes_read_like_virsh() {
        assert_eq!(human_bytes(0), "0.00 B");
        assert_eq!(human_bytes(100 << 30), "100.00 GiB");
        assert_eq!(human_bytes(1536 << 20), "1.50 GiB");
    }
}
