//! `vramd`: the GPU memory arbiter daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vramd::gpu::Backend;
use vramd::ledger::{Ledger, LedgerConfig, Placement};
use vramd::server::{ServerConfig, bind_socket, serve};
use vramd_protocol::{parse_duration, parse_size, paths};

/// Arbitrates GPU memory between the programs on this machine.
#[derive(Debug, Parser)]
#[command(name = "vramd", version, about)]
struct Args {
    /// Arbitrate a simulated device of this size (e.g. 24GiB) instead of real
    /// GPUs. Repeat for more devices.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    simulate: Vec<u64>,
    /// Config file (TOML): eviction settings and external consumers
    /// (Ollama, ComfyUI, HTTP apps, commands). See docs/configuration.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How long an evicted holder or consumer has to free its memory
    /// [default: config's eviction.deadline, else 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    eviction_deadline: Option<Duration>,
    /// Idle reservations younger than this are never evicted
    /// [default: config's eviction.min_residency, else 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    min_residency: Option<Duration>,
    /// Load NVML from this file instead of libnvidia-ml.so.1.
    #[arg(long, value_name = "PATH", conflicts_with = "simulate")]
    nvml_lib: Option<PathBuf>,
    /// How often real GPUs are read (they are also read after every release).
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Socket path [default: $VRAMD_SOCKET, else /run/vramd/vramd.sock as
    /// root, else $XDG_RUNTIME_DIR/vramd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Permission bits of the socket file, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "0660", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group that owns the socket file (name or gid).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Memory kept free on every device as a safety margin.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    cushion: u64,
    /// Waiting this long raises a request's effective priority by one.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    aging: Duration,
    /// After waiting this long, a request stops smaller ones from being
    /// granted ahead of it.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    starvation_guard: Duration,
    /// Where requests for any device go: spread (most room) or pack (least room that fits).
    #[arg(long, default_value = "spread", value_parser = parse_placement)]
    placement: Placement,
    /// Time a new client has to say hello.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Members of this group (name or gid), and root, are admins: exempt from
    /// per-user limits, and they see everyone's labels in status.
    #[arg(long, value_name = "GROUP")]
    admin_group: Option<String>,
    /// Most requests one user (not an admin) may have waiting at once.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_queued_per_uid: usize,
    /// Most memory one user (not an admin) may hold and wait for together.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_bytes_per_uid: Option<u64>,
    /// Most client connections at once.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    max_connections: usize,
    /// Log level (error, warn, info, debug, trace) or a tracing filter; RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("invalid mode {s:?}: use octal such as 0660"))?;
    if m > 0o777 {
        return Err(format!("invalid mode {s:?}: at most 0777"));
    }
    Ok(m)
}

fn parse_placement(s: &str) -> Result<Placement, String> {
    match s {
        "spread" => Ok(Placement::Spread),
        "pack" => Ok(Placement::Pack),
        _ => Err(format!("invalid placement {s:?}: use spread or pack")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vramd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => vramd::config::Config::load(path)?,
        None => vramd::config::Config::default(),
    };
    if let Some(&zero) = args.simulate.iter().find(|&&b| b == 0) {
        bail!("--simulate {zero}: a simulated device needs a size above 0");
    }
    let mut backend = if args.simulate.is_empty() {
        vramd::gpu::nvml::open(args.nvml_lib.as_deref())?
    } else {
        Backend::simulated(&args.simulate)
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let socket_path = match args.socket {
        Some(p) => p,
        None => paths::daemon_socket_path(uid).context(
            "no socket path: set --socket or VRAMD_SOCKET, or XDG_RUNTIME_DIR for a per-user daemon",
        )?,
    };
    let config = ServerConfig {
        socket_path,
        socket_mode: args.socket_mode,
        socket_group: args.socket_group,
        handshake_timeout: args.handshake_timeout,
        max_connections: args.max_connections.max(1),
        backend: backend.name.to_string(),
        poll_interval: args.poll_interval.max(Duration::from_millis(10)),
        consumers: file.consumers.clone(),
        admin_group: args.admin_group.clone(),
        consumer_poll_interval: file
            .consumer_poll_interval
            .unwrap_or(Duration::from_secs(2))
            .max(Duration::from_millis(10)),
    };
    let mut ledger = Ledger::new(
        LedgerConfig {
            cushion_bytes: args.cushion,
            aging: args.aging.max(Duration::from_millis(1)),
            starvation_guard: args.starvation_guard,
            placement: args.placement,
            eviction_deadline: args
                .eviction_deadline
                .or(file.eviction_deadline)
                .unwrap_or(Duration::from_secs(30)),
            min_residency: args
                .min_residency
                .or(file.min_residency)
                .unwrap_or(Duration::from_secs(10)),
            max_queued_per_uid: args.max_queued_per_uid,
            max_bytes_per_uid: args.max_bytes_per_uid,
        },
        backend.devices.clone(),
        backend.source.clone(),
    );
    for d in &backend.devices {
        tracing::info!(index = d.index, uuid = %d.uuid, name = %d.name, total_bytes = d.total_bytes,
            size = %vramd_protocol::format_size(d.total_bytes), backend = backend.name, "device");
    }
    for c in &file.consumers {
        let device = match c.device {
            None => None,
            Some(index) => Some(
                backend
                    .devices
                    .iter()
                    .position(|d| d.index == index)
                    .with_context(|| {
                        format!("consumer {:?}: there is no device {index}", c.name)
                    })?,
            ),
        };
        ledger.add_consumer(vramd::ledger::ConsumerSpec {
            name: c.name.clone(),
            kind: c.kind.name().to_string(),
            device,
            priority: c.priority,
            min_residency: c.min_residency,
            coexist_with: c.coexist_with.clone(),
        });
        tracing::info!(consumer = %c.name, kind = c.kind.name(), priority = c.priority, "consumer declared");
    }
    // A measuring backend is read once before anyone is served, so the first
    // grants already see what is on the cards.
    if let Some(reader) = backend.reader.as_mut() {
        let first = vramd::gpu::read_all(&mut **reader, backend.devices.len());
        let now = std::time::Instant::now();
        for (i, r) in first.results.into_iter().enumerate() {
            match r {
                Ok(reading) => {
                    tracing::info!(
                        device = i,
                        used_bytes = reading.used_bytes,
                        processes = reading.processes.as_ref().map_or(0, Vec::len),
                        per_process_usage = reading.processes.is_some(),
                        "first reading"
                    );
                    ledger.set_reading(i, reading, first.taken_at, now);
                }
                Err(e) => {
                    tracing::warn!(device = i, error = %e, "device unhealthy at start");
                    ledger.set_fault(i, e, now);
                }
            }
        }
    }
    let reader = backend.reader.take();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = bind_socket(&config)?;
        serve(config, listener, ledger, reader, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
}
