//! Human-readable sizes (`512MiB`, `24GiB`, `8GB`, `1.5GiB`, `4096`) and
//! durations (`30s`, `500ms`, `2m`, `1h`).
//!
//! Binary suffixes (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024; SI suffixes
//! (`KB`, `MB`, `GB`, `TB`) are powers of 1000; a bare number is bytes. Suffixes
//! are case-insensitive and may be preceded by spaces.

use thiserror::Error;

/// One kibibyte.
pub const KIB: u64 = 1024;
/// One mebibyte.
pub const MIB: u64 = 1024 * KIB;
/// One gibibyte.
pub const GIB: u64 = 1024 * MIB;
/// One tebibyte.
pub const TIB: u64 = 1024 * GIB;

/// Why a size string could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason} (examples: 8GiB, 512MiB, 8GB, 4096)")]
pub struct ParseSizeError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a size such as `8GiB`, `512 MiB`, `1.5GiB`, `8GB` or `4096` into bytes.
pub fn parse_size(input: &str) -> Result<u64, ParseSizeError> {
    let err = |reason| ParseSizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err("it does not start with a number"));
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        "t" | "tib" => TIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(err(
                "unknown unit; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB",
            ));
        }
    };
    if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
            return Err(err("malformed number"));
        }
        let int_part: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err("number too large"))?
        };
        let frac_digits = &frac[..frac.len().min(9)];
        let frac_value: u64 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse().map_err(|_| err("malformed number"))?
        };
        let scale = 10u64.pow(frac_digits.len() as u32);
        let whole = int_part
            .checked_mul(multiplier)
            .ok_or_else(|| err("number too large"))?;
        let part = (u128::from(frac_value) * u128::from(multiplier) / u128::from(scale)) as u64;
        whole
            .checked_add(part)
            .ok_or_else(|| err("number too large"))
    } else {
        let n: u64 = num.parse().map_err(|_| err("number too large"))?;
        n.checked_mul(multiplier)
            .ok_or_else(|| err("number too large"))
    }
}

/// Formats bytes for people: `8.00 GiB`, `512.00 MiB`, `100 B`.
///
/// Integer arithmetic, rounding a tie to even as `{:.2}` does for the
/// exact quotient: the daemon logs a size with every grant and release, and
/// float formatting was a visible part of its cost.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (name, unit) in UNITS {
        if bytes >= unit {
            let unit = u128::from(unit);
            let scaled = u128::from(bytes) * 100;
            let (q, r) = (scaled / unit, scaled % unit);
            let hundredths = if 2 * r > unit || (2 * r == unit && q % 2 == 1) {
                q + 1
            } else {
                q
            };
            return format!("{}.{:02} {name}", hundredths / 100, hundredths % 100);
        }
    }
    format!("{bytes} B")
}

/// Why a duration string could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "invalid duration {0:?}: use a number with ms, s, m or h (e.g. 500ms, 30s, 2m); a bare number is seconds"
)]
pub struct ParseDurationError(pub String);

/// Parses a duration such as `500ms`, `30s`, `1.5s`, `2m`, `1h` or `30` (seconds).
pub fn parse_duration(input: &str) -> Result<std::time::Duration, ParseDurationError> {
    let err = || ParseDurationError(input.to_string());
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| err())?;
    let seconds = match unit.trim().to_ascii_lowercase().as_str() {
        "ms" => value / 1000.0,
        "" | "s" | "sec" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(err()),
    };
    std::time::Duration::try_from_secs_f64(seconds).map_err(|_| err())
}

/// Formats a duration the way [`parse_duration`] reads it back: `250ms`,
/// `30s`, `2m`, `1h`.
pub fn format_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 || ms == 0 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_si_and_plain() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 * GIB);
        assert_eq!(parse_size("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_size("512 mib").unwrap(), 512 * MIB);
        assert_eq!(parse_size("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5GiB").unwrap(), GIB + GIB / 2);
        assert_eq!(parse_size("0.5KiB").unwrap(), 512);
        assert_eq!(parse_size("24G").unwrap(), 24 * GIB);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "GiB",
            "8XB",
            "1.2.3GiB",
            "-1GiB",
            "99999999999999999999",
            "20000000TiB",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.input, bad);
        }
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        for d in [
            0, 1, 250, 1000, 10_000, 90_000, 120_000, 3_600_000, 5_400_000,
        ] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(8 * GIB), "8.00 GiB");
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(1536 * KIB), "1.50 MiB");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(u64::MAX), "16777216.00 TiB");
        // Every size up to 256 KiB, ties (1152 B = 1.125 KiB) included.
        for bytes in KIB..256 * KIB {
            let float = format!("{:.2} KiB", bytes as f64 / KIB as f64);
            assert_eq!(format_size(bytes), float, "{bytes}");
        }
    }

    proptest::proptest! {
        /// The integer formatting says what `{:.2}` of the exact quotient
        /// says (below 2^53, where the quotient is exact in an f64).
        #[test]
        fn format_size_matches_float_formatting(bytes in 0u64..(1 << 53), shift in 0u32..40) {
            let bytes = (bytes >> shift).max(1);
            let expected = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)]
                .into_iter()
                .find(|&(_, unit)| bytes >= unit)
                .map_or(format!("{bytes} B"), |(name, unit)| {
                    format!("{:.2} {name}", bytes as f64 / unit as f64)
                });
            proptest::prop_assert_eq!(format_size(bytes), expected);
        }
    }
}
