//! Scale: many open connections and a deep wait queue.
//!
//! The daemon runs with two simulated 24 GiB devices. Device 0 is held whole
//! by one client, so every request queued for it waits; device 1 stays free
//! for the throughput clients. The run:
//!
//! 1. measures grant+release throughput on device 1 with an empty queue;
//! 2. opens the connections (bare protocol sessions, see [`crate::wire`]) and
//!    reads the daemon's RSS;
//! 3. queues requests for device 0, spread round-robin over those
//!    connections, in batches, waiting for each request's `queued` answer,
//!    and records the cost per request as the queue grows — until the target
//!    depth or the time budget, whichever comes first;
//! 4. reads the RSS again and measures throughput on device 1 with that
//!    backlog, and whether `status` still answers.
//!
//! At the end the daemon is killed before the connections close, so that
//! tearing down the backlog is not part of any figure.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::{Client, DeviceSelector, GIB, Request};
use vramd_protocol::{ClientMessage, ServerMessage};

use crate::procs::{Daemon, ProcSample};
use crate::stats::round2;
use crate::throughput::{self, PAIR_BYTES};
use crate::wire::RawConn;

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    /// Connections to open.
    pub connections: usize,
    /// Requests to queue.
    pub queued: usize,
    /// Requests per batch while queueing.
    pub batch: usize,
    /// Longest time spent queueing.
    pub build_budget: Duration,
    /// Clients of each throughput run.
    pub clients: usize,
    /// Length of each throughput run.
    pub window: Duration,
}

fn mib(b: u64) -> f64 {
    round2(b as f64 / (1024.0 * 1024.0))
}

/// Waits for the `queued` answer on `c`; anything else is an error.
fn await_queued(c: &mut RawConn, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left)? {
            Some(ServerMessage::Queued { .. }) => return Ok(()),
            Some(ServerMessage::Error { kind, message, .. }) => {
                return Err(io::Error::other(format!("{kind:?}: {message}")));
            }
            Some(_) => continue,
            None => return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")),
        }
    }
}

/// Asks for `status` on a fresh connection: whether it answered, how fast,
/// and how large the answer was (a frame is capped at 1 MiB).
fn probe_status(socket: &Path, timeout: Duration) -> Value {
    let t0 = Instant::now();
    let result = (|| -> io::Result<(usize, u64)> {
        let mut c = RawConn::open(socket, timeout)?;
        let before = c.read_bytes();
        c.send(&ClientMessage::Status { tag: 7 })?;
        let deadline = t0 + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match c.recv(left)? {
                Some(ServerMessage::Status { status, .. }) => {
                    return Ok((status.queue.len(), c.read_bytes() - before));
                }
                Some(ServerMessage::Error { kind, message, .. }) => {
                    return Err(io::Error::other(format!("{kind:?}: {message}")));
                }
                Some(_) => continue,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no status answer in time",
                    ));
                }
            }
        }
    })();
    let ms = round2(t0.elapsed().as_secs_f64() * 1e3);
    match result {
        Ok((n, bytes)) => json!({ "ok": true, "ms": ms, "queue_entries": n, "frame_bytes": bytes }),
        Err(e) => json!({ "ok": false, "ms": ms, "error": e.to_string() }),
    }
}

/// Runs the scale measurement against a daemon started from `bin`.
pub fn run(bin: &Path, log_level: &str, cfg: &ScaleConfig) -> Result<Value, String> {
    let mut args = vec![
        "--simulate".to_string(),
        "24GiB".into(),
        "--simulate".into(),
        "24GiB".into(),
    ];
    // Per-user limits (queue depth, reservations, connections) would refuse
    // a backlog this deep from one non-admin user; lift them where the
    // daemon has them.
    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if help.contains("--max-queued-per-uid") {
        args.push("--max-queued-per-uid".into());
        args.push((cfg.queued + 1000).to_string());
    }
    if help.contains("--max-reservations-per-uid") {
        args.push("--max-reservations-per-uid".into());
        args.push((cfg.queued + 1000).to_string());
    }
    if help.contains("--max-connections-per-uid") {
        args.push("--max-connections-per-uid".into());
        args.push((cfg.connections + cfg.clients + 100).to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start(bin, &args, log_level).map_err(|e| e.to_string())?;
    let socket = daemon.socket().to_path_buf();
    let sample = |d: &Daemon| d.sample().map_err(|e| format!("read /proc: {e}"));
    std::thread::sleep(Duration::from_millis(200));
    let idle = sample(&daemon)?;

    // Pairs on device 1, which the holder and the backlog leave free.
    let throughput = |what: &str| {
        throughput::run(
            &socket,
            daemon.pid(),
            cfg.clients,
            cfg.window,
            PAIR_BYTES,
            DeviceSelector::Index(1),
        )
        .map_err(|e| format!("throughput ({what}): {e}"))
    };
    let empty = throughput("empty queue")?;

    let holder = Client::connect(&socket).map_err(|e| e.to_string())?;
    let held = holder
        .reserve(Request::new(24 * GIB).device(DeviceSelector::Index(0)))
        .map_err(|e| format!("holder: {e}"))?;
    let before = sample(&daemon)?;

    // Open the connections.
    let t_open = Instant::now();
    let open_deadline = t_open + Duration::from_secs(120);
    let mut conns = Vec::with_capacity(cfg.connections);
    let mut open_error = None;
    while conns.len() < cfg.connections {
        if Instant::now() > open_deadline {
            open_error = Some("gave up opening connections after 120 s".to_string());
            break;
        }
        match RawConn::open(&socket, Duration::from_secs(10)) {
            Ok(c) => conns.push(c),
            Err(e) => {
                open_error = Some(format!("connection {}: {e}", conns.len() + 1));
                break;
            }
        }
    }
    let open_s = t_open.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let with_conns = sample(&daemon)?;
    if conns.is_empty() {
        return Err(open_error.unwrap_or_else(|| "no connection opened".into()));
    }

    // Queue requests, batch by batch.
    let n_conns = conns.len();
    let t_build = Instant::now();
    let build_deadline = t_build + cfg.build_budget;
    let mut queued = 0usize;
    let mut curve: Vec<(usize, f64)> = Vec::new();
    let mut build_error = None;
    'build: while queued < cfg.queued {
        if Instant::now() > build_deadline {
            break;
        }
        let batch = cfg.batch.min(cfg.queued - queued).min(n_conns);
        let tb = Instant::now();
        for k in queued..queued + batch {
            let c = &mut conns[k % n_conns];
            if let Err(e) = c.reserve((k / n_conns) as u64 + 1, GIB, 0) {
                build_error = Some(format!("send request {k}: {e}"));
                break 'build;
            }
        }
        // Generous: one batch at the worst per-request cost seen so far
        // (tens of milliseconds) still fits.
        let answer_deadline = Instant::now() + Duration::from_secs(300);
        for k in queued..queued + batch {
            if let Err(e) = await_queued(&mut conns[k % n_conns], answer_deadline) {
                build_error = Some(format!("request {k}: {e}"));
                break 'build;
            }
        }
        queued += batch;
        curve.push((queued, tb.elapsed().as_secs_f64() * 1e6 / batch as f64));
    }
    let build_s = t_build.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let with_backlog = sample(&daemon)?;

    let backlog = throughput("with backlog")?;
    let status = probe_status(&socket, Duration::from_secs(30));
    let end = sample(&daemon)?;

    // Kill the daemon first: closing ten thousand sessions with a deep queue
    // would be measured by nobody and could take long.
    drop(daemon);
    drop(held);
    drop(holder);
    drop(conns);

    // Down-sample the cost curve to about 20 points.
    let step = curve.len().div_ceil(20).max(1);
    let points: Vec<Value> = curve
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == step - 1 || *i + 1 == curve.len())
        .map(|(_, &(depth, us))| json!({ "depth": depth, "us_per_request": round2(us) }))
        .collect();
    let ratio = if backlog.pairs_per_s() > 0.0 {
        round2(empty.pairs_per_s() / backlog.pairs_per_s())
    } else {
        f64::INFINITY
    };
    let per_conn_kib = |s: &ProcSample| {
        round2(s.rss_bytes.saturating_sub(before.rss_bytes) as f64 / 1024.0 / n_conns as f64)
    };
    Ok(json!({
        "connections_target": cfg.connections,
        "connections_opened": n_conns,
        "open_error": open_error,
        "open_seconds": round2(open_s),
        "rss_idle_mib": mib(idle.rss_bytes),
        "rss_before_connections_mib": mib(before.rss_bytes),
        "rss_connections_mib": mib(with_conns.rss_bytes),
        "rss_per_connection_kib": per_conn_kib(&with_conns),
        "daemon_threads": with_conns.threads,
        "queued_target": cfg.queued,
        "queued_reached": queued,
        "queue_build_seconds": round2(build_s),
        "queue_build_budget_seconds": cfg.build_budget.as_secs(),
        "queue_build_error": build_error,
        "enqueue_cost_by_depth": points,
        "rss_backlog_mib": mib(with_backlog.rss_bytes),
        "rss_peak_mib": mib(end.hwm_bytes),
        "throughput_clients": cfg.clients,
        "throughput_empty": empty.to_json(),
        "throughput_backlog": backlog.to_json(),
        "empty_over_backlog": ratio,
        "status_with_backlog": status,
    }))
}
