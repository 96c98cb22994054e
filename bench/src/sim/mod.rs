//! The trace-driven scheduling simulator.
//!
//! It replays a [`Trace`] against an [`Arbiter`] in virtual time and plays
//! the apps' side: a job arriving for a model that is loaded and idle (kept
//! warm) starts at once; otherwise its app asks the arbiter for the model's
//! memory, runs the job for its duration once granted, then keeps the model
//! warm for the job's `keep_warm_ms` (unless the arbiter is a global lock)
//! and releases it.
//!
//! When an arbiter asks an idle model to unload (vramd's ledger does so
//! when a waiter lacks memory, see docs/architecture.md, "Eviction"), its app unloads
//! and releases the memory [`SimOptions::evict_delay`] later: an unload call
//! returns before the memory is free.
//!
//! Independently of the arbiter, the simulator sums what is resident at
//! every grant: a sum above the device's memory is an overcommit (a model
//! load that would OOM).

pub mod policy;
pub mod sweep;
pub mod trace;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use serde_json::{Value, json};
use vramd_ledger::LedgerConfig;
use vramd_protocol::GIB;

use crate::stats::round2;
use policy::{Arbiter, Decisions, Discipline, LedgerArbiter, QueueArbiter};
use trace::Trace;

/// How the simulator plays the apps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimOptions {
    /// Time from an unload request to the memory being free.
    pub evict_delay: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            evict_delay: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting(usize),
    Busy(usize),
    Idle,
    Unloading,
    Gone,
}

#[derive(Debug, Clone)]
struct Instance {
    label: usize,
    bytes: u64,
    state: State,
    /// Bumped whenever a pending warm expiry becomes stale.
    generation: u64,
    last_used: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    JobEnd(usize),
    WarmEnd(usize, u64),
    Unloaded(usize),
    Wakeup,
}

/// What happened to each job, and the device, in one simulation.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Wait of each job from arrival to start (`None`: never started).
    pub waits: Vec<Option<Duration>>,
    /// Completion of each job.
    pub completions: Vec<Option<Duration>>,
    /// Grants that made the resident sum exceed the device.
    pub overcommits: u64,
    /// Largest resident sum seen.
    pub peak_resident: u64,
    /// Integral of resident bytes over time, in byte·seconds.
    pub resident_area: f64,
    /// Idle models asked to unload.
    pub evictions: u64,
    /// Unload requests for a model that was not idle (ignored).
    pub stray_evictions: u64,
    /// Jobs that found their model warm.
    pub warm_starts: u64,
    /// Problems (arbiter errors, jobs that never ran, runaway loops).
    pub errors: Vec<String>,
}

struct Sim<'a> {
    trace: &'a Trace,
    labels: Vec<usize>,
    arbiter: &'a mut dyn Arbiter,
    opts: SimOptions,
    heap: BinaryHeap<Reverse<(Duration, u64, Event)>>,
    seq: u64,
    insts: Vec<Instance>,
    resident: u64,
    last_t: Duration,
    pending_wakeup: Option<Duration>,
    done: usize,
    out: Outcome,
}

impl Sim<'_> {
    fn push(&mut self, at: Duration, ev: Event) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    fn start(&mut self, inst: usize, job: usize, now: Duration) {
        let j = &self.trace.jobs[job];
        self.out.waits[job] = Some(now.saturating_sub(Duration::from_millis(j.arrival_ms)));
        self.insts[inst].state = State::Busy(job);
        self.insts[inst].generation += 1;
        self.push(
            now + Duration::from_millis(j.duration_ms),
            Event::JobEnd(inst),
        );
    }

    fn decided(&mut self, d: Decisions, now: Duration) {
        for inst in d.grants {
            let State::Waiting(job) = self.insts[inst].state else {
                self.out
                    .errors
                    .push(format!("instance {inst} granted while not waiting"));
                continue;
            };
            self.resident += self.insts[inst].bytes;
            if self.resident > self.trace.capacity_bytes {
                self.out.overcommits += 1;
            }
            self.out.peak_resident = self.out.peak_resident.max(self.resident);
            self.start(inst, job, now);
        }
        for inst in d.evictions {
            if self.insts[inst].state == State::Idle {
                self.out.evictions += 1;
                self.insts[inst].state = State::Unloading;
                self.push(now + self.opts.evict_delay, Event::Unloaded(inst));
            } else {
                self.out.stray_evictions += 1;
            }
        }
    }

    fn release(&mut self, inst: usize, now: Duration) {
        self.insts[inst].state = State::Gone;
        self.resident -= self.insts[inst].bytes;
        let d = self.arbiter.release(inst, now);
        self.decided(d, now);
    }

    fn arrive(&mut self, job: usize, now: Duration) {
        let j = &self.trace.jobs[job];
        let label = self.labels[job];
        if self.arbiter.keeps_warm() {
            let warm = self
                .insts
                .iter()
                .position(|i| i.state == State::Idle && i.label == label && i.bytes >= j.bytes);
            if let Some(inst) = warm {
                self.out.warm_starts += 1;
                self.start(inst, job, now);
                let d = self.arbiter.set_idle(inst, false, now);
                self.decided(d, now);
                return;
            }
        }
        let inst = self.insts.len();
        self.insts.push(Instance {
            label,
            bytes: j.bytes,
            state: State::Waiting(job),
            generation: 0,
            last_used: now,
        });
        let d = self.arbiter.request(inst, j.bytes, j.priority, now);
        self.decided(d, now);
    }

    fn job_end(&mut self, inst: usize, now: Duration) {
        let State::Busy(job) = self.insts[inst].state else {
            return;
        };
        self.out.completions[job] = Some(now);
        self.done += 1;
        let warm = self.trace.jobs[job].keep_warm_ms;
        if self.arbiter.keeps_warm() && warm > 0 {
            let i = &mut self.insts[inst];
            i.state = State::Idle;
            i.last_used = now;
            i.generation += 1;
            let g = i.generation;
            self.push(now + Duration::from_millis(warm), Event::WarmEnd(inst, g));
            let d = self.arbiter.set_idle(inst, true, now);
            self.decided(d, now);
        } else {
            self.release(inst, now);
        }
    }

    fn run(mut self) -> Outcome {
        for (i, j) in self.trace.jobs.iter().enumerate() {
            self.push(Duration::from_millis(j.arrival_ms), Event::Arrive(i));
        }
        let max_steps = 200 * self.trace.jobs.len() as u64 + 10_000_000;
        let mut steps = 0u64;
        while let Some(Reverse((now, _, ev))) = self.heap.pop() {
            steps += 1;
            if steps > max_steps {
                self.out
                    .errors
                    .push(format!("gave up after {max_steps} events"));
                break;
            }
            self.out.resident_area +=
                self.resident as f64 * now.saturating_sub(self.last_t).as_secs_f64();
            self.last_t = now;
            match ev {
                Event::Arrive(job) => self.arrive(job, now),
                Event::JobEnd(inst) => self.job_end(inst, now),
                Event::WarmEnd(inst, g) => {
                    if self.insts[inst].state == State::Idle && self.insts[inst].generation == g {
                        self.release(inst, now);
                    }
                }
                Event::Unloaded(inst) => self.release(inst, now),
                Event::Wakeup => {
                    if self.pending_wakeup == Some(now) {
                        self.pending_wakeup = None;
                        let d = self.arbiter.tick(now);
                        self.decided(d, now);
                    }
                }
            }
            // Nothing waits once every job has run: stop ticking.
            if self.done == self.trace.jobs.len() {
                break;
            }
            if let Some(w) = self.arbiter.next_wakeup(now) {
                let w = w.max(now + Duration::from_millis(1));
                if self.pending_wakeup.is_none_or(|p| w < p) {
                    self.pending_wakeup = Some(w);
                    self.push(w, Event::Wakeup);
                }
            }
        }
        let never = self.out.waits.iter().filter(|w| w.is_none()).count();
        if never > 0 {
            self.out.errors.push(format!("{never} jobs never started"));
        }
        self.out
            .errors
            .extend(self.arbiter.errors().iter().take(5).cloned());
        self.out
    }
}

/// Replays `trace` against `arbiter`.
pub fn simulate(trace: &Trace, arbiter: &mut dyn Arbiter, opts: SimOptions) -> Outcome {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let labels = trace
        .jobs
        .iter()
        .map(|j| {
            let n = names.len();
            *names.entry(j.label.as_str()).or_insert(n)
        })
        .collect();
    let n = trace.jobs.len();
    let sim = Sim {
        trace,
        labels,
        arbiter,
        opts,
        heap: BinaryHeap::new(),
        seq: 0,
        insts: Vec::new(),
        resident: 0,
        last_t: Duration::ZERO,
        pending_wakeup: None,
        done: 0,
        out: Outcome {
            waits: vec![None; n],
            completions: vec![None; n],
            ..Outcome::default()
        },
    };
    sim.run()
}

/// Minimum residency the baselines give an idle model before evicting it:
/// the ledger's default.
fn min_residency() -> Duration {
    LedgerConfig::default().min_residency
}

/// The policies compared, by name: vramd (the ledger with the daemon's
/// default configuration) and the three baselines.
pub fn policies(capacity: u64) -> Vec<(&'static str, Box<dyn Arbiter>)> {
    let queue = |d| Box::new(QueueArbiter::new(d, capacity, min_residency())) as Box<dyn Arbiter>;
    vec![
        (
            "vramd",
            Box::new(LedgerArbiter::new(capacity, LedgerConfig::default(), false)),
        ),
        ("global lock", queue(Discipline::GlobalLock)),
        ("FIFO", queue(Discipline::StrictFifo)),
        ("FIFO + backfill", queue(Discipline::FifoBackfill)),
    ]
}

fn secs(d: Duration) -> f64 {
    round2(d.as_secs_f64())
}

/// Mean, p99 (nearest rank) and max of `waits`.
fn wait_stats(mut waits: Vec<Duration>) -> Value {
    if waits.is_empty() {
        return json!({ "jobs": 0 });
    }
    waits.sort_unstable();
    let n = waits.len();
    let p99 = waits[((0.99 * n as f64).ceil() as usize).clamp(1, n) - 1];
    let mean = waits.iter().map(Duration::as_secs_f64).sum::<f64>() / n as f64;
    json!({
        "jobs": n,
        "mean_s": round2(mean),
        "p99_s": secs(p99),
        "max_s": secs(waits[n - 1]),
    })
}

/// Summarises one outcome against its trace.
pub fn summarize(trace: &Trace, out: &Outcome) -> Value {
    let t0 = trace.jobs.iter().map(|j| j.arrival_ms).min().unwrap_or(0);
    let end = out.completions.iter().flatten().max().copied();
    let makespan = end.map_or(0.0, |e| {
        e.saturating_sub(Duration::from_millis(t0)).as_secs_f64()
    });
    let lb = trace.makespan_lower_bound_ms() / 1e3;
    let cap = trace.capacity_bytes as f64;
    let active = trace.active_area() as f64 / 1e3; // byte·s
    let util = |area: f64| {
        if makespan > 0.0 {
            round2(100.0 * area / (cap * makespan))
        } else {
            0.0
        }
    };
    let mut by_prio: BTreeMap<i32, Vec<Duration>> = BTreeMap::new();
    for (j, w) in trace.jobs.iter().zip(&out.waits) {
        if let Some(w) = w {
            by_prio.entry(j.priority).or_default().push(*w);
        }
    }
    let longest = out
        .waits
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (w, i)))
        .max();
    let waits: serde_json::Map<String, Value> = by_prio
        .into_iter()
        .rev()
        .map(|(p, w)| (p.to_string(), wait_stats(w)))
        .collect();
    json!({
        "makespan_s": round2(makespan),
        "makespan_over_lower_bound": if lb > 0.0 { (makespan / lb * 1000.0).round() / 1000.0 } else { 0.0 },
        "memory_utilization_pct": util(active),
        "memory_utilization_bound_pct": if lb > 0.0 { round2(100.0 * active / (cap * lb)) } else { 0.0 },
        "resident_utilization_pct": util(out.resident_area),
        "wait_by_priority": waits,
        "longest_wait": longest.map(|(w, i)| json!({
            "s": secs(w),
            "label": trace.jobs[i].label,
            "priority": trace.jobs[i].priority,
            "gib": round2(trace.jobs[i].bytes as f64 / GIB as f64),
        })),
        "overcommits": out.overcommits,
        "peak_resident_gib": round2(out.peak_resident as f64 / GIB as f64),
        "evictions": out.evictions,
        "stray_evictions": out.stray_evictions,
        "warm_starts": out.warm_starts,
        "errors": out.errors,
    })
}

/// Runs every policy on `trace`; the JSON has the trace's facts and one
/// entry per policy.
pub fn run_trace(trace: &Trace) -> Value {
    if let Err(e) = trace.validate() {
        return json!({ "error": e });
    }
    let mut results = serde_json::Map::new();
    for (name, mut arbiter) in policies(trace.capacity_bytes) {
        let started = std::time::Instant::now();
        let out = simulate(trace, arbiter.as_mut(), SimOptions::default());
        let mut v = summarize(trace, &out);
        v["simulation_seconds"] = json!(round2(started.elapsed().as_secs_f64()));
        results.insert(name.to_string(), v);
    }
    let priorities: std::collections::BTreeSet<i32> =
        trace.jobs.iter().map(|j| j.priority).collect();
    json!({
        "description": trace.description,
        "seed": trace.seed,
        "jobs": trace.jobs.len(),
        "capacity_gib": round2(trace.capacity_bytes as f64 / GIB as f64),
        "lower_bound_s": round2(trace.makespan_lower_bound_ms() / 1e3),
        "highest_priority": priorities.iter().max(),
        "policies": results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trace::{Job, random};

    fn waits(trace: &Trace, arbiter: &mut dyn Arbiter) -> Vec<Option<Duration>> {
        let out = simulate(trace, arbiter, SimOptions::default());
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.overcommits, 0);
        out.waits
    }

    /// Without warm models (so without eviction) the FIFO baselines are the
    /// ledger's own mechanics with priorities ignored: strict FIFO is a
    /// starvation guard of zero, backfill one that never fires. The
    /// simulator must give the same schedule either way.
    #[test]
    fn baselines_match_the_ledger_configured_alike() {
        let mut trace = random(11, 400, 1.1);
        for j in &mut trace.jobs {
            j.keep_warm_ms = 0;
        }
        let cap = trace.capacity_bytes;
        let res = min_residency();
        let strict = LedgerConfig {
            starvation_guard: Duration::ZERO,
            adaptive_guard: None,
            ..LedgerConfig::default()
        };
        assert_eq!(
            waits(&trace, &mut LedgerArbiter::new(cap, strict, true)),
            waits(
                &trace,
                &mut QueueArbiter::new(Discipline::StrictFifo, cap, res)
            ),
        );
        let no_guard = LedgerConfig {
            starvation_guard: Duration::from_secs(1 << 40),
            adaptive_guard: None,
            ..LedgerConfig::default()
        };
        assert_eq!(
            waits(&trace, &mut LedgerArbiter::new(cap, no_guard, true)),
            waits(
                &trace,
                &mut QueueArbiter::new(Discipline::FifoBackfill, cap, res)
            ),
        );
    }

    #[test]
    fn every_policy_finishes_without_overcommit() {
        let trace = random(5, 300, 0.8);
        for (name, mut a) in policies(trace.capacity_bytes) {
            let out = simulate(&trace, a.as_mut(), SimOptions::default());
            assert!(out.errors.is_empty(), "{name}: {:?}", out.errors);
            assert_eq!(out.overcommits, 0, "{name}");
        }
    }

    fn job(arrival_ms: u64, label: &str, bytes: u64, priority: i32, keep_warm_ms: u64) -> Job {
        Job {
            arrival_ms,
            label: label.into(),
            bytes,
            duration_ms: 1_000,
            priority,
            keep_warm_ms,
        }
    }

    fn device(jobs: Vec<Job>) -> Trace {
        Trace {
            name: "t".into(),
            description: String::new(),
            seed: None,
            capacity_bytes: 10,
            jobs,
        }
    }

    #[test]
    fn warm_model_is_reused_then_evicted_for_a_waiter() {
        // a runs at 0 s and again (warm) at 2 s; b needs a's room at 20 s.
        let trace = device(vec![
            job(0, "a", 6, 0, 60_000),
            job(2_000, "a", 6, 0, 60_000),
            job(20_000, "b", 6, 5, 0),
        ]);
        for (name, mut a) in policies(10) {
            let out = simulate(&trace, a.as_mut(), SimOptions::default());
            assert!(out.errors.is_empty(), "{name}: {:?}", out.errors);
            if name == "global lock" {
                // Nothing stays warm under a lock.
                assert_eq!(out.warm_starts, 0);
                assert_eq!(out.waits, vec![Some(Duration::ZERO); 3]);
            } else {
                assert_eq!(out.warm_starts, 1, "{name}");
                assert_eq!(out.evictions, 1, "{name}");
                // b waits for a's unload (1 s), not for its keep-warm.
                assert_eq!(out.waits[2], Some(Duration::from_secs(1)), "{name}");
            }
        }
    }

    #[test]
    fn young_or_more_urgent_idle_models_are_not_evicted() {
        // b arrives 4 s after a was loaded: a may go at 10 s (minimum
        // residency), so b starts at 11 s.
        let young = device(vec![job(0, "a", 6, 0, 60_000), job(4_000, "b", 6, 5, 0)]);
        // c outranks b: b waits for c's keep-warm to end (61 s).
        let urgent = device(vec![job(0, "c", 6, 10, 60_000), job(20_000, "b", 6, 5, 0)]);
        for (name, mut a) in policies(10) {
            if name == "global lock" {
                continue;
            }
            let out = simulate(&young, a.as_mut(), SimOptions::default());
            assert_eq!(out.waits[1], Some(Duration::from_secs(7)), "{name}");
        }
        for (name, mut a) in policies(10) {
            if name == "global lock" {
                continue;
            }
            let out = simulate(&urgent, a.as_mut(), SimOptions::default());
            assert_eq!(out.evictions, 0, "{name}");
            assert_eq!(out.waits[1], Some(Duration::from_secs(41)), "{name}");
        }
    }
}
