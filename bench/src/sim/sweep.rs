//! The policy sweep: every candidate scheduling policy (ledger
//! configurations) against the baselines, on the home-lab trace and on
//! random traces at several offered loads and seeds, scored against the
//! scheduling targets (docs/benchmarks.md, "Priorities under load").
//!
//! Per trace, with "best baseline" the best of global lock, FIFO and
//! FIFO + backfill on that figure:
//! - **top p99 / top mean**: the top priority's p99 and mean wait are no
//!   worse than the best baseline's;
//! - **longest**: the longest wait is no worse than the reference policy's
//!   (the ledger's policy before priorities were reworked);
//! - **makespan**: no worse than the best baseline's, and at most 1.15× the
//!   lower bound at load ≤ 0.7;
//! - **overcommits**: none.
//!
//! Per load, over its seeds: the mean of the top priority's mean and p99
//! waits must be strictly below the best baseline's mean.

use std::time::Duration;

use serde_json::{Value, json};
use vramd_ledger::{AdaptiveGuard, LedgerConfig};

use super::policy::{Arbiter, Discipline, LedgerArbiter, QueueArbiter};
use super::trace::{self, Trace};
use super::{Outcome, SimOptions, min_residency, simulate};

/// A named ledger configuration to score.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its name in the tables.
    pub name: String,
    /// The configuration.
    pub config: LedgerConfig,
}

/// The reference for the longest-wait target: the ledger's policy before
/// this sweep (aging 10 s, a fixed 30 s starvation guard).
pub fn reference() -> LedgerConfig {
    LedgerConfig {
        aging: Duration::from_secs(10),
        starvation_guard: Duration::from_secs(30),
        adaptive_guard: None,
        ..LedgerConfig::default()
    }
}

/// Parses a candidate such as `aging=30s,guard=2m,window=5m,adaptive=3h`:
/// keys `aging`, `guard` (the starvation guard, or the adaptive guard's
/// floor), `window` (the priority window, `none` for none), `adaptive` (the
/// adaptive guard's cap, `none` for a fixed guard) and `factor` (its
/// factor, default 4); the rest as in [`LedgerConfig::default`].
pub fn parse_candidate(spec: &str) -> Result<Candidate, String> {
    let mut config = LedgerConfig::default();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| {
            format!("{part:?}: use key=value (aging, guard, window, adaptive, factor)")
        })?;
        let duration = || vramd_protocol::parse_duration(value).map_err(|e| e.to_string());
        match key.trim() {
            "aging" => config.aging = duration()?.max(Duration::from_millis(1)),
            "guard" => config.starvation_guard = duration()?,
            "adaptive" if value.trim() == "none" => config.adaptive_guard = None,
            "adaptive" => {
                let factor = config
                    .adaptive_guard
                    .map_or(AdaptiveGuard::DEFAULT_FACTOR, |g| g.factor);
                config.adaptive_guard = Some(AdaptiveGuard {
                    factor,
                    cap: duration()?,
                });
            }
            "factor" => {
                let factor: u32 = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("factor {value:?}: a whole number"))?;
                let g = config.adaptive_guard.get_or_insert(AdaptiveGuard {
                    factor,
                    cap: AdaptiveGuard::DEFAULT_CAP,
                });
                g.factor = factor;
            }
            "window" if value.trim() == "none" => config.priority_window = None,
            "window" => config.priority_window = Some(duration()?),
            other => {
                return Err(format!(
                    "unknown key {other:?}: use aging, guard, window, adaptive or factor"
                ));
            }
        }
    }
    Ok(Candidate {
        name: spec.to_string(),
        config,
    })
}

/// The candidates compared by default: the ledger's default (the adaptive
/// guard); the fixed 30 s guard it replaced (the reference); aging 9 s and
/// 11 s under each (how much the per-trace longest-wait target moves when
/// nothing but noise changes); slower aging; priority windows; and the
/// adaptive guard's other factors, floor and cap (the ones
/// docs/benchmarks.md reports).
pub fn candidates() -> Vec<Candidate> {
    let mut out = vec![Candidate {
        name: "default".into(),
        config: LedgerConfig::default(),
    }];
    for spec in [
        "adaptive=none",
        "adaptive=none,aging=9s",
        "adaptive=none,aging=11s",
        "aging=9s",
        "aging=11s",
        "adaptive=none,aging=100s",
        "adaptive=none,aging=1000s",
        "adaptive=none,window=300s",
        "adaptive=none,window=1000s",
        "adaptive=none,window=3000s",
        "adaptive=none,window=10000s",
        "factor=2",
        "factor=5",
        "factor=6",
        "guard=60s",
        "adaptive=1h",
        "window=1000s",
    ] {
        out.push(parse_candidate(spec).expect("a valid built-in candidate"));
    }
    out
}

/// The per-trace figures the targets use.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    top_mean_s: f64,
    top_p99_s: f64,
    longest_s: f64,
    makespan_s: f64,
    overcommits: u64,
}

fn figures(trace: &Trace, out: &Outcome) -> Figures {
    let top = trace.jobs.iter().map(|j| j.priority).max().unwrap_or(0);
    let mut waits: Vec<f64> = trace
        .jobs
        .iter()
        .zip(&out.waits)
        .filter(|(j, _)| j.priority == top)
        .filter_map(|(_, w)| w.map(|w| w.as_secs_f64()))
        .collect();
    waits.sort_by(f64::total_cmp);
    let n = waits.len().max(1);
    let p99 = waits
        .get(((0.99 * n as f64).ceil() as usize).clamp(1, n) - 1)
        .copied()
        .unwrap_or(0.0);
    let t0 = trace.jobs.iter().map(|j| j.arrival_ms).min().unwrap_or(0);
    let end = out.completions.iter().flatten().max().copied();
    Figures {
        top_mean_s: waits.iter().sum::<f64>() / n as f64,
        top_p99_s: p99,
        longest_s: out
            .waits
            .iter()
            .flatten()
            .max()
            .map_or(0.0, Duration::as_secs_f64),
        makespan_s: end.map_or(0.0, |e| {
            e.saturating_sub(Duration::from_millis(t0)).as_secs_f64()
        }),
        overcommits: out.overcommits,
    }
}

fn run(trace: &Trace, arbiter: &mut dyn Arbiter) -> Figures {
    let out = simulate(trace, arbiter, SimOptions::default());
    figures(trace, &out)
}

/// Scores every candidate on the home-lab trace and on `seeds` random traces
/// of `jobs` jobs at each load; returns the JSON and a markdown report.
pub fn sweep(candidates: &[Candidate], loads: &[f64], seeds: u64, jobs: usize) -> (Value, String) {
    let cap = 24 * vramd_protocol::GIB;
    // (name, offered load if random, traces)
    let mut groups: Vec<(String, Option<f64>, Vec<Trace>)> = vec![(
        "home lab".into(),
        None,
        vec![trace::homelab(trace::HOMELAB_SEED)],
    )];
    for &load in loads {
        let traces = (1..=seeds)
            .map(|s| trace::random(1000 + s, jobs, load))
            .collect();
        groups.push((format!("load {load}"), Some(load), traces));
    }
    let mut md = String::new();
    let mut json_groups = Vec::new();
    for (group, load, traces) in &groups {
        let low_load = load.is_none_or(|l| l <= 0.7 + 1e-9);
        let base: Vec<[Figures; 3]> = traces
            .iter()
            .map(|t| {
                let q = |d| QueueArbiter::new(d, t.capacity_bytes, min_residency());
                [
                    run(t, &mut q(Discipline::GlobalLock)),
                    run(t, &mut q(Discipline::StrictFifo)),
                    run(t, &mut q(Discipline::FifoBackfill)),
                ]
            })
            .collect();
        let reference: Vec<Figures> = traces
            .iter()
            .map(|t| run(t, &mut LedgerArbiter::new(cap, reference(), false)))
            .collect();
        let best =
            |i: usize, f: fn(&Figures) -> f64| base[i].iter().map(f).fold(f64::INFINITY, f64::min);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let best_mean_of = |f: fn(&Figures) -> f64| {
            (0..3)
                .map(|b| mean(&base.iter().map(|x| f(&x[b])).collect::<Vec<_>>()))
                .fold(f64::INFINITY, f64::min)
        };
        let base_top_mean = best_mean_of(|f| f.top_mean_s);
        let base_top_p99 = best_mean_of(|f| f.top_p99_s);
        md.push_str(&format!(
            "\n#### {group} ({} trace{})\n\nBest baseline over the traces: top-priority mean {:.0} s, p99 {:.0} s.\n\n\
             | policy | top p99 ≤ best | top mean ≤ best | longest ≤ reference | makespan | 0 overcommits | top mean / p99 (mean over traces) | longest (max) | longest ÷ reference's (max) | makespan ÷ bound (max) |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
            traces.len(),
            if traces.len() == 1 { "" } else { "s" },
            base_top_mean,
            base_top_p99,
        ));
        let mut rows = Vec::new();
        for c in candidates {
            let figs: Vec<Figures> = traces
                .iter()
                .map(|t| run(t, &mut LedgerArbiter::new(cap, c.config.clone(), false)))
                .collect();
            let n = traces.len();
            let count = |ok: &dyn Fn(usize, &Figures) -> bool| {
                figs.iter().enumerate().filter(|(i, f)| ok(*i, f)).count()
            };
            let p99_ok = count(&|i, f| f.top_p99_s <= best(i, |x| x.top_p99_s) + 1e-9);
            let mean_ok = count(&|i, f| f.top_mean_s <= best(i, |x| x.top_mean_s) + 1e-9);
            let longest_ok = count(&|i, f| f.longest_s <= reference[i].longest_s + 1e-9);
            let makespan_ok = count(&|i, f| {
                let lb = traces[i].makespan_lower_bound_ms() / 1e3;
                f.makespan_s <= best(i, |x| x.makespan_s) + 1e-9
                    && (!low_load || f.makespan_s <= 1.15 * lb)
            });
            let over_ok = count(&|_, f| f.overcommits == 0);
            let top_mean = mean(&figs.iter().map(|f| f.top_mean_s).collect::<Vec<_>>());
            let top_p99 = mean(&figs.iter().map(|f| f.top_p99_s).collect::<Vec<_>>());
            let strictly = top_mean < base_top_mean && top_p99 < base_top_p99;
            let longest = figs.iter().map(|f| f.longest_s).fold(0.0, f64::max);
            let longest_ratio = figs
                .iter()
                .zip(&reference)
                .map(|(f, r)| f.longest_s / r.longest_s.max(1e-9))
                .fold(0.0, f64::max);
            let ratio = figs
                .iter()
                .zip(traces)
                .map(|(f, t)| f.makespan_s / (t.makespan_lower_bound_ms() / 1e3).max(1e-9))
                .fold(0.0, f64::max);
            md.push_str(&format!(
                "| {} | {p99_ok}/{n} | {mean_ok}/{n} | {longest_ok}/{n} | {makespan_ok}/{n} | {over_ok}/{n} | {top_mean:.0} / {top_p99:.0} s{} | {longest:.0} s | {longest_ratio:.2} | {ratio:.3} |\n",
                c.name,
                if strictly { " (better)" } else { "" },
            ));
            rows.push(json!({
                "policy": c.name,
                "traces": n,
                "top_p99_ok": p99_ok,
                "top_mean_ok": mean_ok,
                "longest_ok": longest_ok,
                "makespan_ok": makespan_ok,
                "no_overcommit": over_ok,
                "top_mean_s": top_mean,
                "top_p99_s": top_p99,
                "strictly_better_on_the_mean": strictly,
                "longest_s": longest,
                "longest_over_reference_max": longest_ratio,
                "makespan_over_bound_max": ratio,
                "per_trace": figs.iter().enumerate().map(|(i, f)| json!({
                    "top_mean_s": f.top_mean_s,
                    "top_p99_s": f.top_p99_s,
                    "longest_s": f.longest_s,
                    "makespan_s": f.makespan_s,
                    "best_baseline_top_mean_s": best(i, |x| x.top_mean_s),
                    "best_baseline_top_p99_s": best(i, |x| x.top_p99_s),
                    "best_baseline_makespan_s": best(i, |x| x.makespan_s),
                    "reference_longest_s": reference[i].longest_s,
                    "makespan_lower_bound_s": traces[i].makespan_lower_bound_ms() / 1e3,
                })).collect::<Vec<_>>(),
            }));
        }
        json_groups.push(json!({
            "group": group,
            "best_baseline_top_mean_s": base_top_mean,
            "best_baseline_top_p99_s": base_top_p99,
            "candidates": rows,
        }));
    }
    (json!({ "groups": json_groups }), md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_parse_and_bad_ones_are_named() {
        let c = parse_candidate("aging=30s,guard=2m").unwrap();
        assert_eq!(c.config.aging, Duration::from_secs(30));
        assert_eq!(c.config.starvation_guard, Duration::from_secs(120));
        assert_eq!(c.config.priority_window, None);
        let c = parse_candidate("window=50m").unwrap();
        assert_eq!(c.config.priority_window, Some(Duration::from_secs(3000)));
        assert_eq!(c.config.aging, LedgerConfig::default().aging);
        assert!(
            parse_candidate("window=later")
                .unwrap_err()
                .contains("later")
        );
        // The default is the adaptive guard; `adaptive=none` is the fixed
        // guard it replaced (the reference).
        let c = parse_candidate("aging=10s").unwrap();
        assert_eq!(c.config.adaptive_guard, Some(AdaptiveGuard::DEFAULT));
        let c = parse_candidate("adaptive=none").unwrap();
        assert_eq!(c.config.adaptive_guard, None);
        assert_eq!(c.config.starvation_guard, reference().starvation_guard);
        let c = parse_candidate("adaptive=3h").unwrap();
        assert_eq!(
            c.config.adaptive_guard,
            Some(AdaptiveGuard {
                factor: 4,
                cap: Duration::from_secs(3 * 3600)
            })
        );
        let c = parse_candidate("adaptive=1h,factor=2").unwrap();
        assert_eq!(c.config.adaptive_guard.unwrap().factor, 2);
        assert_eq!(
            c.config.adaptive_guard.unwrap().cap,
            Duration::from_secs(3600)
        );
        assert!(
            parse_candidate("factor=x")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(parse_candidate("aging=soon").unwrap_err().contains("soon"));
        assert!(
            parse_candidate("colour=red")
                .unwrap_err()
                .contains("colour")
        );
        assert!(parse_candidate("aging").unwrap_err().contains("key=value"));
    }

    #[test]
    fn a_small_sweep_scores_every_candidate_on_every_group() {
        let cands = vec![
            parse_candidate("adaptive=none,aging=10s").unwrap(),
            parse_candidate("aging=1000s").unwrap(),
            parse_candidate("window=100s").unwrap(),
        ];
        let (v, md) = sweep(&cands, &[0.5], 2, 60);
        let groups = v["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 2, "home lab and one load");
        for g in groups {
            let rows = g["candidates"].as_array().unwrap();
            assert_eq!(rows.len(), 3);
            for r in rows {
                // The simulator never overcommits under the ledger.
                assert_eq!(r["no_overcommit"], r["traces"]);
            }
        }
        // The reference is the first candidate here: it meets its own bound.
        assert_eq!(groups[1]["candidates"][0]["longest_ok"], 2);
        assert_eq!(
            groups[1]["candidates"][0]["longest_over_reference_max"],
            1.0
        );
        assert_eq!(
            groups[1]["candidates"][2]["per_trace"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert!(md.contains("#### load 0.5 (2 traces)"));
    }
}
