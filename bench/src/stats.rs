//! Latency summaries: percentiles over recorded samples.
//!
//! Samples are kept whole (a `Vec` of nanoseconds) and sorted once, so every
//! percentile is exact rather than bucketed; the largest run records a few
//! hundred thousand samples, which sorts in milliseconds.

use std::time::Duration;

use serde_json::{Value, json};

/// Percentiles of a set of durations, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Smallest sample.
    pub min_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
    /// Arithmetic mean.
    pub mean_ns: f64,
}

impl Summary {
    /// Summarises `samples` (nanoseconds); all zero when there are none.
    pub fn of(mut samples: Vec<u64>) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        // Nearest-rank percentile: the smallest sample with at least q of
        // the samples at or below it.
        let rank = |q: f64| -> u64 {
            let r = ((q * n as f64).ceil() as usize).clamp(1, n);
            samples[r - 1]
        };
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Summary {
            count: n,
            min_ns: samples[0],
            p50_ns: rank(0.50),
            p90_ns: rank(0.90),
            p99_ns: rank(0.99),
            p999_ns: rank(0.999),
            max_ns: samples[n - 1],
            mean_ns: sum as f64 / n as f64,
        }
    }

    /// The summary as JSON, in microseconds.
    pub fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "min_us": us(self.min_ns),
            "p50_us": us(self.p50_ns),
            "p90_us": us(self.p90_ns),
            "p99_us": us(self.p99_ns),
            "p999_us": us(self.p999_ns),
            "max_us": us(self.max_ns),
            "mean_us": round2(self.mean_ns / 1e3),
        })
    }

    /// The summary as JSON, with each percentile also given as a multiple of
    /// `floor_ns` (the raw socket ping-pong median).
    pub fn to_json_with_ratio(self, floor_ns: u64) -> Value {
        let mut v = self.to_json();
        if floor_ns > 0 {
            let ratio = |x: u64| round2(x as f64 / floor_ns as f64);
            v["p50_x_floor"] = json!(ratio(self.p50_ns));
            v["p99_x_floor"] = json!(ratio(self.p99_ns));
            v["p999_x_floor"] = json!(ratio(self.p999_ns));
        }
        v
    }
}

/// A duration in whole nanoseconds (saturating).
pub fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// Nanoseconds as microseconds, to two decimals.
pub fn us(ns: u64) -> f64 {
    round2(ns as f64 / 1e3)
}

/// Rounds to two decimals (for readable JSON).
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = Summary::of((1..=1000).collect());
        assert_eq!(s.count, 1000);
        assert_eq!(s.min_ns, 1);
        assert_eq!(s.p50_ns, 500);
        assert_eq!(s.p99_ns, 990);
        assert_eq!(s.p999_ns, 999);
        assert_eq!(s.max_ns, 1000);
        assert!((s.mean_ns - 500.5).abs() < 1e-9);
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(Summary::of(vec![]).count, 0);
        let s = Summary::of(vec![7]);
        assert_eq!((s.p50_ns, s.p999_ns, s.max_ns), (7, 7, 7));
    }
}
