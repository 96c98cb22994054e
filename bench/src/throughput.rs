//! Throughput of grant+release pairs with N concurrent clients.
//!
//! Each client is its own SDK [`Client`] (its own connection and reader
//! thread) driven by its own thread, looping `reserve` → `release` on a
//! request small enough that all of them fit at once, so no one ever waits
//! for memory: what is measured is the daemon's (and the SDK's) cost per
//! operation under concurrency. Pairs completed after the stop signal are
//! not counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::{Client, DeviceSelector, MIB, Request};

use crate::procs::{ProcSample, clock_ticks_per_second};
use crate::stats::{Summary, nanos, round2};

/// Result of one throughput run.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Concurrent clients.
    pub clients: usize,
    /// Grant+release pairs completed in the window.
    pub pairs: u64,
    /// Length of the window.
    pub elapsed: Duration,
    /// Latency of each pair under this load.
    pub latency: Summary,
    /// Errors seen (a failing client stops).
    pub errors: Vec<String>,
    /// CPU time the daemon used during the window.
    pub daemon_cpu: Option<Duration>,
    /// CPU time this process (the clients) used during the window.
    pub client_cpu: Option<Duration>,
}

impl Throughput {
    /// Pairs per second.
    pub fn pairs_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.pairs as f64 / s } else { 0.0 }
    }

    /// The result as JSON. CPU shares are in % of one core; per-pair CPU
    /// in microseconds.
    pub fn to_json(&self) -> Value {
        let secs = self.elapsed.as_secs_f64();
        let pct = |c: Option<Duration>| c.map(|c| round2(100.0 * c.as_secs_f64() / secs));
        let per_pair = |c: Option<Duration>| {
            c.filter(|_| self.pairs > 0)
                .map(|c| round2(c.as_secs_f64() * 1e6 / self.pairs as f64))
        };
        json!({
            "clients": self.clients,
            "pairs": self.pairs,
            "seconds": round2(secs),
            "pairs_per_s": self.pairs_per_s().round(),
            "latency": self.latency.to_json(),
            "daemon_cpu_pct": pct(self.daemon_cpu),
            "daemon_cpu_us_per_pair": per_pair(self.daemon_cpu),
            "client_cpu_pct": pct(self.client_cpu),
            "client_cpu_us_per_pair": per_pair(self.client_cpu),
            "errors": self.errors,
        })
    }
}

/// CPU time of process `pid` so far.
fn cpu_of(pid: u32) -> Option<Duration> {
    let s = ProcSample::read(pid).ok()?;
    Some(Duration::from_secs_f64(
        s.cpu_ticks as f64 / clock_ticks_per_second() as f64,
    ))
}

/// Runs `clients` clients for `window` against the daemon `daemon_pid`
/// listening on `socket`, each reserving `bytes` on `device`.
pub fn run(
    socket: &std::path::Path,
    daemon_pid: u32,
    clients: usize,
    window: Duration,
    bytes: u64,
    device: DeviceSelector,
) -> Result<Throughput, vramd_client::Error> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Client::connect(socket)?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Gate::default());
    let mut handles = Vec::with_capacity(clients);
    let mut spawn_error = None;
    for client in conns {
        let stop = stop.clone();
        let gate = gate.clone();
        let device = device.clone();
        let h = std::thread::Builder::new()
            .name("bench-client".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut lat = Vec::with_capacity(4096);
                gate.wait();
                // Bounded by the stop flag and, as a backstop, a count.
                for _ in 0..50_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let t0 = Instant::now();
                    let r = client
                        .reserve(Request::new(bytes).device(device.clone()))
                        .and_then(|r| r.release());
                    if let Err(e) = r {
                        return (lat, Some(e.to_string()));
                    }
                    let dt = t0.elapsed();
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    lat.push(nanos(dt));
                }
                (lat, None)
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                spawn_error = Some(e);
                break;
            }
        }
    }
    if spawn_error.is_some() {
        stop.store(true, Ordering::Relaxed);
    }
    let cpu0 = (cpu_of(daemon_pid), cpu_of(std::process::id()));
    gate.open();
    let t0 = Instant::now();
    if spawn_error.is_none() {
        std::thread::sleep(window);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let cpu1 = (cpu_of(daemon_pid), cpu_of(std::process::id()));
    let diff = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok((lat, err)) => {
                all.extend(lat);
                errors.extend(err);
            }
            Err(_) => errors.push("a client thread panicked".into()),
        }
    }
    if let Some(e) = spawn_error {
        return Err(vramd_client::Error::Io(e));
    }
    Ok(Throughput {
        clients,
        pairs: all.len() as u64,
        elapsed,
        latency: Summary::of(all),
        errors,
        daemon_cpu: diff(cpu0.0, cpu1.0),
        client_cpu: diff(cpu0.1, cpu1.1),
    })
}

/// A start line the client threads wait at until the harness opens it.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.cv.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// Default request size for throughput runs: small enough that 512 clients
/// all fit on a 24 GiB device at once.
pub const PAIR_BYTES: u64 = 16 * MIB;
