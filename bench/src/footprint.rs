//! Footprint of an idle daemon: resident memory, and CPU time and wake-ups
//! over a quiet window with no client connected.
//!
//! The window can overlap other work of the harness that does not touch this
//! daemon (the simulator runs meanwhile): what is measured is the daemon's
//! own CPU time from `/proc/<pid>/stat`, which other processes do not add to.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::procs::{Daemon, ProcSample, clock_ticks_per_second};
use crate::stats::round2;

/// An idle daemon being watched.
#[derive(Debug)]
pub struct IdleProbe {
    daemon: Daemon,
    start: ProcSample,
}

impl IdleProbe {
    /// Starts a daemon (one simulated 24 GiB device), lets it settle for
    /// half a second, and takes the first sample.
    pub fn start(bin: &Path, log_level: &str) -> io::Result<IdleProbe> {
        let daemon = Daemon::start(bin, &["--simulate", "24GiB"], log_level)?;
        std::thread::sleep(Duration::from_millis(500));
        let start = daemon.sample()?;
        Ok(IdleProbe { daemon, start })
    }

    /// Waits until `window` has passed since the first sample, takes the
    /// second, and reports.
    pub fn finish(self, window: Duration) -> io::Result<Value> {
        let until = self.start.at + window;
        let now = Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
        let end = self.daemon.sample()?;
        let secs = (end.at - self.start.at).as_secs_f64();
        let cpu_s = end.cpu_ticks.saturating_sub(self.start.cpu_ticks) as f64
            / clock_ticks_per_second() as f64;
        let wakeups = end.ctx_switches.saturating_sub(self.start.ctx_switches);
        Ok(json!({
            "rss_mib": round2(self.start.rss_bytes as f64 / (1024.0 * 1024.0)),
            "rss_end_mib": round2(end.rss_bytes as f64 / (1024.0 * 1024.0)),
            "threads": end.threads,
            "window_seconds": round2(secs),
            "cpu_seconds": cpu_s,
            "cpu_percent_of_one_core": (cpu_s / secs * 100.0 * 1000.0).round() / 1000.0,
            "clock_tick_ms": 1000 / clock_ticks_per_second(),
            "context_switches": wakeups,
            "context_switches_per_s": round2(wakeups as f64 / secs),
        }))
    }
}
