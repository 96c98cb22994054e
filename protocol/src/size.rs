//! Human-readable sizes (`512MiB`, `24GiB`, `8GB`, `1.5GiB`, `4096B`) and
//! durations (`30s`, `500ms`, `2m`, `1h`).
//!
//! A size always has a unit. Binary units are powers of 1024, written
//! `KiB`, `MiB`, `GiB`, `TiB` or the Kubernetes way `Ki`, `Mi`, `Gi`, `Ti`;
//! SI units (`KB`, `MB`, `GB`, `TB`) are powers of 1000; plain bytes are
//! written with `B` (`4096B`). A bare number is refused with a hint
//! (`8` → "did you mean 8GiB?"), and so is a lone `K`, `M`, `G` or `T`
//! (binary or SI is not clear from it). Units are case-insensitive and may
//! be preceded by spaces.

use thiserror::Error;

/// One kibibyte.
pub const KIB: u64 = 1024;
/// One mebibyte.
pub const MIB: u64 = 1024 * KIB;
/// One gibibyte.
pub const GIB: u64 = 1024 * MIB;
/// One tebibyte.
pub const TIB: u64 = 1024 * GIB;

/// The units [`parse_size`] accepts, for messages.
const UNITS_HELP: &str = "B, KiB/Ki, MiB/Mi, GiB/Gi, TiB/Ti, KB, MB, GB or TB";

/// Why a size string could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason}")]
pub struct ParseSizeError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it, with a hint where there is one.
    pub reason: String,
}

/// Parses a size such as `8GiB`, `8Gi`, `512 MiB`, `1.5GiB`, `8GB` or
/// `4096B` into bytes. A number without a unit is an error whose message
/// suggests one.
pub fn parse_size(input: &str) -> Result<u64, ParseSizeError> {
    let err = |reason: String| ParseSizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err(
            "it does not start with a number (examples: 8GiB, 512MiB, 8GB, 4096B)".to_string(),
        ));
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => {
            return Err(err(format!(
                "a size needs a unit: did you mean {num}GiB? (plain bytes are written {num}B; units: {UNITS_HELP})"
            )));
        }
        "b" => 1,
        "kib" | "ki" => KIB,
        "mib" | "mi" => MIB,
        "gib" | "gi" => GIB,
        "tib" | "ti" => TIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        one @ ("k" | "m" | "g" | "t") => {
            let up = one.to_ascii_uppercase();
            return Err(err(format!(
                "{up} alone could be binary or SI: write {num}{up}iB (or {num}{up}i) for powers of 1024, {num}{up}B for powers of 1000"
            )));
        }
        _ => return Err(err(format!("unknown unit; use {UNITS_HELP}"))),
    };
    let too_large = || err("number too large".to_string());
    let malformed = || err("malformed number".to_string());
    if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
            return Err(malformed());
        }
        let int_part: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| too_large())?
        };
        let frac_digits = &frac[..frac.len().min(9)];
        let frac_value: u64 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse().map_err(|_| malformed())?
        };
        let scale = 10u64.pow(frac_digits.len() as u32);
        let whole = int_part.checked_mul(multiplier).ok_or_else(too_large)?;
        let part = (u128::from(frac_value) * u128::from(multiplier) / u128::from(scale)) as u64;
        whole.checked_add(part).ok_or_else(too_large)
    } else {
        let n: u64 = num.parse().map_err(|_| too_large())?;
        n.checked_mul(multiplier).ok_or_else(too_large)
    }
}

/// Writes bytes exactly, in the largest binary unit that divides them, so
/// that [`parse_size`] reads the same number back: `512MiB`, `24GiB`,
/// `4097B`, `0B`.
pub fn format_size_exact(bytes: u64) -> String {
    for (name, unit) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes != 0 && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
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
    fn parses_binary_kubernetes_si_and_bytes() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 * GIB);
        assert_eq!(parse_size("8Gi").unwrap(), 8 * GIB);
        assert_eq!(parse_size("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_size("512Mi").unwrap(), 512 * MIB);
        assert_eq!(parse_size("512 mib").unwrap(), 512 * MIB);
        assert_eq!(parse_size("4Ki").unwrap(), 4 * KIB);
        assert_eq!(parse_size("2Ti").unwrap(), 2 * TIB);
        assert_eq!(parse_size("2TiB").unwrap(), 2 * TIB);
        assert_eq!(parse_size("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_size("8KB").unwrap(), 8_000);
        assert_eq!(parse_size("8MB").unwrap(), 8_000_000);
        assert_eq!(parse_size("1TB").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("0B").unwrap(), 0);
        assert_eq!(parse_size("1.5GiB").unwrap(), GIB + GIB / 2);
        assert_eq!(parse_size("1.5Gi").unwrap(), GIB + GIB / 2);
        assert_eq!(parse_size("0.5KiB").unwrap(), 512);
    }

    #[test]
    fn a_bare_number_is_refused_with_a_hint() {
        for (bare, hint) in [
            ("8", "8GiB"),
            ("4096", "4096GiB"),
            ("1.5", "1.5GiB"),
            (" 24 ", "24GiB"),
        ] {
            let e = parse_size(bare).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(&format!("did you mean {hint}?")), "{text}");
            assert!(text.contains("B;") || text.contains("B "), "{text}");
        }
        assert!(
            parse_size("8")
                .unwrap_err()
                .to_string()
                .contains("written 8B")
        );
    }

    #[test]
    fn a_lone_k_m_g_or_t_is_refused_as_ambiguous() {
        for bad in ["24G", "24g", "8K", "1M", "2T"] {
            let text = parse_size(bad).unwrap_err().to_string();
            assert!(text.contains("binary or SI"), "{text}");
        }
        let text = parse_size("24G").unwrap_err().to_string();
        assert!(text.contains("24GiB") && text.contains("24GB"), "{text}");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "GiB",
            "8XB",
            "1.2.3GiB",
            "-1GiB",
            "99999999999999999999B",
            "20000000TiB",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.input, bad);
        }
        assert!(
            parse_size("8XB")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
    }

    #[test]
    fn exact_formatting_reads_back() {
        assert_eq!(format_size_exact(512 * MIB), "512MiB");
        assert_eq!(format_size_exact(24 * GIB), "24GiB");
        assert_eq!(format_size_exact(4097), "4097B");
        assert_eq!(format_size_exact(0), "0B");
        for bytes in [0, 1, 1023, 1024, 4096, 512 * MIB, 3 * TIB, u64::MAX] {
            assert_eq!(parse_size(&format_size_exact(bytes)).unwrap(), bytes);
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
