//! Traces of GPU jobs for the scheduling simulator, and their generators.
//!
//! A trace is a list of jobs on one device. A job arrives, needs `bytes` of
//! its model resident for `duration_ms`, at a priority; afterwards its app
//! may keep the model loaded (warm) for `keep_warm_ms`, so that a later job
//! with the same label starts at once. Traces are JSON (see
//! `bench/traces/homelab.json`); two generators make them: [`homelab`], an
//! evening on a 24 GiB card at home, and [`random`], a seeded synthetic mix.

use serde::{Deserialize, Serialize};
use vramd_protocol::GIB;

/// A trace: jobs on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Short name (used as a key in the results).
    pub name: String,
    /// What it models.
    #[serde(default)]
    pub description: String,
    /// Seed it was generated with, if generated.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Memory of the device.
    pub capacity_bytes: u64,
    /// The jobs, in any order.
    pub jobs: Vec<Job>,
}

/// One job of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// When it arrives, from the start of the trace.
    pub arrival_ms: u64,
    /// Its model; jobs with the same label can share a warm model.
    pub label: String,
    /// Memory the model needs.
    pub bytes: u64,
    /// How long it runs once its memory is granted.
    pub duration_ms: u64,
    /// Higher is more urgent.
    pub priority: i32,
    /// How long the app keeps the model loaded after the job (0: unloads).
    #[serde(default)]
    pub keep_warm_ms: u64,
}

impl Trace {
    /// Checks that every job can run on the device at all.
    pub fn validate(&self) -> Result<(), String> {
        if self.jobs.is_empty() {
            return Err(format!("trace {} has no jobs", self.name));
        }
        for (i, j) in self.jobs.iter().enumerate() {
            if j.bytes == 0 || j.bytes > self.capacity_bytes {
                return Err(format!(
                    "trace {}: job {i} ({}) needs {} bytes on a {}-byte device",
                    self.name, j.label, j.bytes, self.capacity_bytes
                ));
            }
        }
        Ok(())
    }

    /// Memory-time of the jobs' work, in byte·milliseconds.
    pub fn active_area(&self) -> u128 {
        self.jobs
            .iter()
            .map(|j| u128::from(j.bytes) * u128::from(j.duration_ms))
            .sum()
    }

    /// A lower bound on the makespan (first arrival to last completion), in
    /// milliseconds, that no scheduler can beat: the larger of
    /// - the latest `arrival + duration` of any job, and
    /// - for every arrival time T, T plus the memory-time of the jobs
    ///   arriving at or after T divided by the device's memory
    ///
    /// (warm models are optional, so they count for nothing here).
    pub fn makespan_lower_bound_ms(&self) -> f64 {
        let t0 = self.jobs.iter().map(|j| j.arrival_ms).min().unwrap_or(0) as f64;
        let mut by_arrival: Vec<&Job> = self.jobs.iter().collect();
        by_arrival.sort_by_key(|j| j.arrival_ms);
        let mut bound = self
            .jobs
            .iter()
            .map(|j| (j.arrival_ms + j.duration_ms) as f64)
            .fold(0.0, f64::max);
        let cap = self.capacity_bytes as f64;
        let mut suffix = 0.0f64;
        for j in by_arrival.iter().rev() {
            suffix += j.bytes as f64 * j.duration_ms as f64;
            bound = bound.max(j.arrival_ms as f64 + suffix / cap);
        }
        bound - t0
    }
}

/// A small deterministic generator (SplitMix64), so traces need no crate
/// and are the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Log-uniform in [lo, hi) (lo > 0).
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + (hi.ln() - lo.ln()) * self.unit()).exp()
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Integer in [lo, hi] (inclusive).
    pub fn int(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Index chosen with the given weights.
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

fn gib(x: f64) -> u64 {
    (x * GIB as f64) as u64
}

fn secs(x: f64) -> u64 {
    (x * 1000.0).round() as u64
}

/// Seed of the shipped home-lab trace (`bench/traces/homelab.json`).
pub const HOMELAB_SEED: u64 = 2024;

/// An evening (three hours) of a home lab on one 24 GiB card:
///
/// - a voice assistant: speech-to-text (1.5 GiB) and text-to-speech
///   (2.8 GiB) services loaded at start and kept warm all evening, and a
///   small chat model (4 GiB) answering; priority 10 (someone is talking to
///   it); an interaction every few minutes;
/// - chat sessions with larger models (5, 6 and 9 GiB) through an
///   Ollama-like server that keeps a model warm 5 minutes after use;
///   priority 5;
/// - image sessions with a 13 GiB image model (ComfyUI-like, kept warm 10
///   minutes): a few generations in a row with pauses; priority 0.
pub fn homelab(seed: u64) -> Trace {
    let mut rng = Rng::new(seed);
    let span = 3.0 * 3600.0;
    let mut jobs = Vec::new();
    let job = |arrival: f64, label: &str, bytes: u64, dur: f64, prio: i32, warm: f64| Job {
        arrival_ms: secs(arrival),
        label: label.to_string(),
        bytes,
        duration_ms: secs(dur).max(1),
        priority: prio,
        keep_warm_ms: secs(warm),
    };
    let (stt, tts, voice_llm) = (gib(1.5), gib(2.8), gib(4.0));
    // Services loaded at start, warm for the whole evening.
    jobs.push(job(0.0, "whisper-stt", stt, 3.0, 10, span + 3600.0));
    jobs.push(job(0.5, "kokoro-tts", tts, 4.0, 10, span + 3600.0));
    // Voice interactions: STT, then the assistant's model, then TTS.
    let mut t = rng.exponential(240.0);
    while t < span {
        jobs.push(job(
            t,
            "whisper-stt",
            stt,
            rng.uniform(0.8, 2.0),
            10,
            span + 3600.0,
        ));
        jobs.push(job(
            t + 2.0,
            "llama3.2-3b",
            voice_llm,
            rng.uniform(2.0, 6.0),
            10,
            300.0,
        ));
        jobs.push(job(
            t + 8.0,
            "kokoro-tts",
            tts,
            rng.uniform(1.5, 5.0),
            10,
            span + 3600.0,
        ));
        t += rng.exponential(240.0);
    }
    // Chat sessions.
    let chat_models = [
        ("llama3.1-8b", gib(6.0), 0.5),
        ("mistral-nemo-12b", gib(9.0), 0.25),
        ("qwen2.5-coder-7b", gib(5.0), 0.25),
    ];
    let weights: Vec<f64> = chat_models.iter().map(|m| m.2).collect();
    let mut t = rng.exponential(900.0);
    while t < span {
        let (label, bytes, _) = chat_models[rng.weighted(&weights)];
        let mut at = t;
        for _ in 0..rng.int(3, 12) {
            let dur = rng.log_uniform(4.0, 45.0);
            jobs.push(job(at, label, bytes, dur, 5, 300.0));
            at += dur + rng.uniform(20.0, 120.0);
        }
        t += rng.exponential(900.0);
    }
    // Image sessions.
    let mut t = rng.exponential(1500.0);
    while t < span {
        let mut at = t;
        for _ in 0..rng.int(2, 6) {
            let images = rng.int(1, 4) as f64;
            let dur = images * rng.uniform(20.0, 40.0);
            jobs.push(job(at, "flux-image", gib(13.0), dur, 0, 600.0));
            at += dur + rng.uniform(30.0, 180.0);
        }
        t += rng.exponential(1500.0);
    }
    jobs.sort_by(|a, b| {
        a.arrival_ms
            .cmp(&b.arrival_ms)
            .then_with(|| a.label.cmp(&b.label))
    });
    Trace {
        name: "homelab".into(),
        description: "An evening (3 h) on a 24 GiB card: voice assistant (STT 1.5 GiB and TTS \
                      2.8 GiB kept warm, 4 GiB assistant model; priority 10), chat sessions \
                      with 5-9 GiB models kept warm 5 min (priority 5), image sessions with a \
                      13 GiB model kept warm 10 min (priority 0)."
            .into(),
        seed: Some(seed),
        capacity_bytes: 24 * GIB,
        jobs,
    }
}

/// A synthetic trace of `n` jobs on a 24 GiB card with offered load `load`
/// (the jobs' memory-time per unit time over the device's memory; 1.0 keeps
/// the card exactly full on average, before warm models).
///
/// Sixteen models: sizes from 1 to 20 GiB (half small, a third medium, the
/// rest large); priorities 0, 5 or 10 (60/30/10 %); kept warm 0, 60 or 300 s.
/// Jobs pick models with a skew (some are popular), run 2 s to 5 min
/// (log-uniform), and arrive as a Poisson process.
pub fn random(seed: u64, n: usize, load: f64) -> Trace {
    let mut rng = Rng::new(seed);
    let capacity = 24 * GIB;
    struct Model {
        bytes: u64,
        priority: i32,
        warm_s: f64,
    }
    let models: Vec<Model> = (0..16)
        .map(|_| {
            let bytes = match rng.weighted(&[0.5, 0.35, 0.15]) {
                0 => rng.uniform(1.0, 4.0),
                1 => rng.uniform(4.0, 10.0),
                _ => rng.uniform(10.0, 20.0),
            };
            Model {
                bytes: gib(bytes),
                priority: [0, 5, 10][rng.weighted(&[0.6, 0.3, 0.1])],
                warm_s: [0.0, 60.0, 300.0][rng.weighted(&[0.4, 0.4, 0.2])],
            }
        })
        .collect();
    let popularity: Vec<f64> = (0..models.len()).map(|i| 1.0 / (1.0 + i as f64)).collect();
    // Draw the jobs first, then space arrivals for the requested load.
    let mut draws = Vec::with_capacity(n);
    let mut area = 0.0;
    for _ in 0..n {
        let m = rng.weighted(&popularity);
        let dur = rng.log_uniform(2.0, 300.0);
        area += models[m].bytes as f64 * dur;
        draws.push((m, dur));
    }
    let mean_gap = area / n as f64 / (capacity as f64 * load.max(0.01));
    let mut t = 0.0;
    let jobs = draws
        .into_iter()
        .map(|(m, dur)| {
            let model = &models[m];
            let j = Job {
                arrival_ms: secs(t),
                label: format!("model-{m:02}"),
                bytes: model.bytes,
                duration_ms: secs(dur).max(1),
                priority: model.priority,
                keep_warm_ms: secs(model.warm_s),
            };
            t += rng.exponential(mean_gap);
            j
        })
        .collect();
    Trace {
        name: format!("random-seed{seed}"),
        description: format!(
            "{n} synthetic jobs on a 24 GiB card at offered load {load}: 16 models of 1-20 GiB, \
             priorities 0/5/10, kept warm 0/60/300 s, runs of 2 s-5 min, Poisson arrivals."
        ),
        seed: Some(seed),
        capacity_bytes: capacity,
        jobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_homelab_trace_is_the_generators() {
        let shipped: Trace =
            serde_json::from_str(include_str!("../../traces/homelab.json")).expect("parse");
        assert_eq!(shipped, homelab(HOMELAB_SEED));
        shipped.validate().expect("valid");
    }

    #[test]
    fn generators_are_deterministic_and_valid() {
        assert_eq!(random(3, 200, 0.9), random(3, 200, 0.9));
        assert_ne!(random(3, 200, 0.9), random(4, 200, 0.9));
        random(3, 200, 0.9).validate().expect("valid");
        let h = homelab(1);
        h.validate().expect("valid");
        for label in ["whisper-stt", "kokoro-tts", "llama3.2-3b", "flux-image"] {
            assert!(h.jobs.iter().any(|j| j.label == label), "{label} missing");
        }
    }

    #[test]
    fn lower_bound_counts_arrivals_and_area() {
        let job = |arrival_ms, bytes, duration_ms| Job {
            arrival_ms,
            label: "x".into(),
            bytes,
            duration_ms,
            priority: 0,
            keep_warm_ms: 0,
        };
        // Two full-device jobs of 10 s arriving together: 20 s.
        let t = Trace {
            name: "t".into(),
            description: String::new(),
            seed: None,
            capacity_bytes: 100,
            jobs: vec![job(0, 100, 10_000), job(0, 100, 10_000)],
        };
        assert_eq!(t.makespan_lower_bound_ms(), 20_000.0);
        // A late short job: its arrival plus its duration.
        let t = Trace {
            jobs: vec![job(0, 10, 1_000), job(50_000, 10, 1_000)],
            ..t
        };
        assert_eq!(t.makespan_lower_bound_ms(), 51_000.0);
    }
}
