//! Start-up: the daemon's command line and the wiring from it to a running
//! server — config file, GPU backend, ledger, socket, runtime.
//!
//! The ledger's policy defaults are defined once, in
//! [`LedgerConfig::default`]; the command line shows them from there.
//!
//! Under systemd, the daemon takes the listening socket it is given
//! (`LISTEN_FDS`/`LISTEN_PID`, socket activation) instead of binding one,
//! and then never removes the socket file (the socket unit owns it); it
//! reports `READY=1` once it listens and `STOPPING=1` when a signal asks it
//! to stop (`NOTIFY_SOCKET`, `Type=notify`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use vramd_ledger::{AdaptiveGuard, Identity, Ledger, LedgerConfig, Placement};
use vramd_protocol::{
    format_duration, format_size, format_size_exact, parse_duration, parse_size, paths,
};

use crate::config::{Config, ConfigError};
use crate::gpu::Backend;
use crate::gpu::nvml::NvmlStartError;
use crate::mps::{MpsGuard, MpsWatch};
use crate::server::{ServerConfig, ServerError, bind_socket, serve};
use crate::state::StateFile;

/// Arbitrates GPU memory between the programs on this machine.
#[derive(Debug, Parser)]
#[command(name = "vramd", version, about)]
pub struct Args {
    /// Arbitrate a simulated device of this size (e.g. 24GiB) instead of real
    /// GPUs. Repeat for more devices.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub simulate: Vec<u64>,
    /// Config file (TOML): daemon settings (the eviction timing). See
    /// docs/configuration.md.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How long an evicted holder has to free its memory.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub eviction_deadline: Option<Duration>,
    /// Idle reservations younger than this are never evicted.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub min_residency: Option<Duration>,
    /// Load NVML from this file instead of libnvidia-ml.so.1.
    #[arg(long, value_name = "PATH", conflicts_with = "simulate")]
    pub nvml_lib: Option<PathBuf>,
    /// How often real GPUs are read (they are also read after every release).
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Socket path [default: $VRAMD_SOCKET, else /run/vramd/vramd.sock as
    /// root, else $XDG_RUNTIME_DIR/vramd.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "0660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group that owns the socket file (name or gid).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Memory kept free on every device as a safety margin.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cushion: Option<u64>,
    /// Waiting this long raises a request's effective priority by one.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub aging: Option<Duration>,
    /// After waiting this long, a request stops smaller ones from being
    /// granted ahead of it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub starvation_guard: Option<Duration>,
    /// Order requests by strict priority while they have waited less than
    /// this, and by arrival past it, ahead of every younger request (aging
    /// then only decides what a waiter may evict). Off by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub priority_window: Option<Duration>,
    /// Each request's starvation guard is its own: the recent mean wait
    /// times `--adaptive-guard-factor`, at least `--starvation-guard` and at
    /// most this; `off`: every request's guard is `--starvation-guard`
    /// (the policy before 0.2; docs/architecture.md, "Scheduling")
    /// [default: 3h].
    #[arg(long, value_name = "DURATION|off", value_parser = parse_guard_cap)]
    pub adaptive_guard: Option<GuardCap>,
    /// A request's adaptive guard is this many times the mean wait of the
    /// last 64 grants.
    #[arg(long, value_name = "N", default_value_t = AdaptiveGuard::DEFAULT_FACTOR, value_parser = clap::value_parser!(u32).range(1..))]
    pub adaptive_guard_factor: u32,
    /// Where requests for any device go: spread (most room) or pack (least room that fits).
    #[arg(long, value_parser = clap::value_parser!(Placement))]
    pub placement: Option<Placement>,
    /// Time a new client has to say hello.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Members of this group (name or gid), and root, are admins: exempt from
    /// per-user limits, and they see everyone's labels in status.
    #[arg(long, value_name = "GROUP")]
    pub admin_group: Option<String>,
    /// Most requests one user (not an admin) may have waiting at once.
    #[arg(long, value_name = "N")]
    pub max_queued_per_uid: Option<usize>,
    /// Most memory one user (not an admin) may hold and wait for together.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_bytes_per_uid: Option<u64>,
    /// Most client connections at once.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_connections: usize,
    /// Log level (error, warn, info, debug, trace, off) or a tracing filter
    /// such as `vramd=debug,info`; RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_log_filter)]
    pub log_level: String,
    /// Log lines as text, or as one JSON object each. Text has no timestamps
    /// when stderr is the journal (JOURNAL_STREAM), which adds its own.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Print the man page (vramd.8, roff) and exit.
    #[arg(long)]
    pub man: bool,
    /// Time a request (binary frame or JSON line) has to arrive in full once
    /// it started; a client stalled inside one is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub frame_timeout: Duration,
    /// Most replies (in bytes, as held in memory) a client may leave unread;
    /// past it its connection is closed and everything it held released.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub max_unsent_bytes: u64,
    /// Most reservations one user (not an admin) may hold and have waiting
    /// together.
    #[arg(long, value_name = "N")]
    pub max_reservations_per_uid: Option<usize>,
    /// Most connections one user (not an admin) may have open (past the
    /// handshake) at once.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections_per_uid: usize,
    /// Most connections still in their handshake at once; when a new one
    /// comes, the one that has waited longest is closed.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_handshakes: usize,
    /// Start the NVIDIA MPS control daemon (nvidia-cuda-mps-control -d, on
    /// PATH) with its pipe and log directories beside the socket
    /// (<socket dir>/mps/pipe, <socket dir>/mps/log), stop it on exit, and
    /// report it in status, for `vramctl run --enforce`.
    #[arg(long, conflicts_with = "mps_pipe_dir")]
    pub mps: bool,
    /// Report the MPS server the administrator runs with this pipe
    /// directory, for `vramctl run --enforce` (healthy while its `control`
    /// pipe or socket is live).
    #[arg(long, value_name = "DIR")]
    pub mps_pipe_dir: Option<PathBuf>,
    /// Directory of the state file (<socket file name>.state) where
    /// reservations are saved so that a restart loses none [default: the
    /// socket's directory].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// After a start, how long saved reservations are held for their
    /// holders to reclaim; what is not reclaimed by then is dropped.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `LEVEL target: message field=value ...`, with a timestamp unless
    /// stderr is the journal.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// The levels a log filter may name.
const LOG_LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// Checks a log filter (`--log-level` or `RUST_LOG`): a level, or
/// comma-separated directives `target=level` and at most one bare level.
/// A word that is not a level (`warning`, a typo) is refused rather than
/// taken for a target name, which would silently log nothing.
pub fn parse_log_filter(filter: &str) -> Result<String, String> {
    let levels = LOG_LEVELS.join(", ");
    if filter.trim().is_empty() {
        return Err(format!("empty log filter; use one of {levels}"));
    }
    for directive in filter.split(',').map(str::trim) {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        if target.is_some_and(|t| t.trim().is_empty()) {
            return Err(format!(
                "log filter directive {directive:?} names no target"
            ));
        }
        if !LOG_LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(match target {
                None => format!("unknown log level {level:?}; use one of {levels}"),
                Some(t) => format!("unknown log level {level:?} for {t:?}; use one of {levels}"),
            });
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    Ok(filter.to_string())
}

impl Args {
    /// Parses the process's arguments (exiting with clap's message on
    /// error), with the ledger's defaults shown in `--help` and filled in.
    pub fn parse_with_defaults() -> Self {
        let matches = Self::command_with_defaults().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// The man page, vramd.8 (roff), with the defaults `--help` shows.
    pub fn man_page() -> std::io::Result<Vec<u8>> {
        let mut page = Vec::new();
        clap_mangen::Man::new(Self::command_with_defaults())
            .section("8")
            .render(&mut page)?;
        Ok(page)
    }

    /// The command line, with the defaults of [`LedgerConfig::default`].
    fn command_with_defaults() -> clap::Command {
        let d = LedgerConfig::default();
        Self::command()
            .mut_arg("cushion", |a| {
                a.default_value(format_size_exact(d.cushion_bytes))
            })
            .mut_arg("aging", |a| a.default_value(format_duration(d.aging)))
            .mut_arg("starvation_guard", |a| {
                a.default_value(format_duration(d.starvation_guard))
            })
            .mut_arg("placement", |a| a.default_value(d.placement.to_string()))
            .mut_arg("max_queued_per_uid", |a| {
                a.default_value(d.max_queued_per_uid.to_string())
            })
            .mut_arg("max_reservations_per_uid", |a| {
                a.default_value(d.max_reservations_per_uid.to_string())
            })
            // The config file may set these; the command line wins over it.
            .mut_arg("eviction_deadline", |a| {
                a.help(format!(
                    "How long an evicted holder has to free its memory \
                     [default: config's eviction.deadline, else {}]",
                    format_duration(d.eviction_deadline)
                ))
            })
            .mut_arg("min_residency", |a| {
                a.help(format!(
                    "Idle reservations younger than this are never evicted \
                     [default: config's eviction.min_residency, else {}]",
                    format_duration(d.min_residency)
                ))
            })
    }

    /// The ledger's policy: the command line, then the config file, then
    /// [`LedgerConfig::default`].
    pub fn ledger_config(&self, file: &Config) -> LedgerConfig {
        let d = LedgerConfig::default();
        LedgerConfig {
            cushion_bytes: self.cushion.unwrap_or(d.cushion_bytes),
            aging: self.aging.unwrap_or(d.aging).max(Duration::from_millis(1)),
            starvation_guard: self.starvation_guard.unwrap_or(d.starvation_guard),
            priority_window: self.priority_window.or(d.priority_window),
            adaptive_guard: match self.adaptive_guard {
                Some(GuardCap::Off) => None,
                Some(GuardCap::Cap(cap)) => Some(AdaptiveGuard {
                    factor: self.adaptive_guard_factor,
                    cap,
                }),
                None => d.adaptive_guard.map(|g| AdaptiveGuard {
                    factor: self.adaptive_guard_factor,
                    ..g
                }),
            },
            placement: self.placement.unwrap_or(d.placement),
            eviction_deadline: self
                .eviction_deadline
                .or(file.eviction_deadline)
                .unwrap_or(d.eviction_deadline),
            min_residency: self
                .min_residency
                .or(file.min_residency)
                .unwrap_or(d.min_residency),
            max_queued_per_uid: self.max_queued_per_uid.unwrap_or(d.max_queued_per_uid),
            max_bytes_per_uid: self.max_bytes_per_uid.or(d.max_bytes_per_uid),
            max_reservations_per_uid: self
                .max_reservations_per_uid
                .unwrap_or(d.max_reservations_per_uid),
        }
    }
}

/// Logs the scheduling policy in force (docs/architecture.md, "Scheduling").
fn log_policy(c: &LedgerConfig) {
    let adaptive = c.adaptive_guard.map_or_else(
        || "off".to_string(),
        |g| {
            format!(
                "{} x recent mean wait, cap {}",
                g.factor,
                format_duration(g.cap)
            )
        },
    );
    let window = c
        .priority_window
        .map_or_else(|| "off".to_string(), format_duration);
    tracing::info!(aging = %format_duration(c.aging), starvation_guard = %format_duration(c.starvation_guard),
        adaptive_guard = %adaptive, priority_window = %window, "scheduling policy");
}

/// `--adaptive-guard`: a cap, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardCap {
    /// A fixed guard (`--starvation-guard`) for every request.
    Off,
    /// The adaptive guard, at most this long.
    Cap(Duration),
}

fn parse_guard_cap(s: &str) -> Result<GuardCap, String> {
    match s.trim() {
        "off" | "none" => Ok(GuardCap::Off),
        other => parse_duration(other)
            .map(GuardCap::Cap)
            .map_err(|e| format!("{e} (or `off` for a fixed guard)")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("invalid mode {s:?}: use octal such as 0660"))?;
    if m > 0o777 {
        return Err(format!("invalid mode {s:?}: at most 0777"));
    }
    Ok(m)
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// NVML could not be opened or found no GPU.
    #[error(transparent)]
    Nvml(#[from] NvmlStartError),
    /// An argument or config value is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] ServerError),
    /// The MPS control daemon could not be started.
    #[error(transparent)]
    Mps(#[from] crate::mps::MpsError),
    /// The runtime or the server failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The listening socket systemd passed (socket activation), if it passed
/// one. Also clears `LISTEN_FDS`/`LISTEN_PID`, so that commands the daemon
/// runs do not see them; call it before any other thread starts.
pub fn inherited_listener() -> Result<Option<std::os::unix::net::UnixListener>, StartError> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    if fds.len() > 1 {
        return Err(StartError::Invalid(format!(
            "{} sockets were passed (LISTEN_FDS); vramd takes exactly one Unix stream socket",
            fds.len()
        )));
    }
    let io = |source| StartError::Io {
        context: "the passed socket (LISTEN_FDS) is not a listening Unix stream socket",
        source,
    };
    let Some(listener) = fds.take_unix_listener(0).map_err(io)? else {
        return Ok(None);
    };
    listener.set_nonblocking(true).map_err(io)?;
    Ok(Some(listener))
}

/// Tells systemd (`NOTIFY_SOCKET`, when set) about a state change; a
/// failure is logged, never fatal.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Starts the daemon as `args` say and serves until SIGTERM or SIGINT.
pub fn run(args: Args) -> Result<(), StartError> {
    crate::server::raise_open_file_limit_logged();
    let inherited = inherited_listener()?;
    let file = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(&zero) = args.simulate.iter().find(|&&b| b == 0) {
        return Err(StartError::Invalid(format!(
            "--simulate {zero}: a simulated device needs a size above 0"
        )));
    }
    let mut backend = if args.simulate.is_empty() {
        crate::gpu::nvml::open(args.nvml_lib.as_deref())?
    } else {
        Backend::simulated(&args.simulate)
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let socket_path = match &args.socket {
        Some(p) => p.clone(),
        None => paths::daemon_socket_path(uid).ok_or_else(|| {
            StartError::Invalid(
                "no socket path: set --socket or VRAMD_SOCKET, or XDG_RUNTIME_DIR for a per-user daemon"
                    .into(),
            )
        })?,
    };
    let inherited_path = inherited.as_ref().and_then(|l| {
        l.local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(PathBuf::from))
    });
    if inherited.is_some() {
        tracing::info!(
            socket = %inherited_path.as_deref().unwrap_or(&socket_path).display(),
            "using the listening socket passed by the service manager; \
             its mode and group are the socket unit's, and it is left in place on exit"
        );
    }
    let config = ServerConfig {
        socket_path: inherited_path.unwrap_or(socket_path),
        remove_socket_on_exit: inherited.is_none(),
        socket_mode: args.socket_mode,
        socket_group: args.socket_group.clone(),
        handshake_timeout: args.handshake_timeout,
        frame_timeout: args.frame_timeout.max(Duration::from_millis(1)),
        max_unsent_bytes: usize::try_from(args.max_unsent_bytes).unwrap_or(usize::MAX),
        max_connections_per_uid: args.max_connections_per_uid.max(1),
        max_handshakes: args.max_handshakes.max(1),
        max_connections: args.max_connections.max(1),
        poll_interval: args.poll_interval.max(Duration::from_millis(10)),
        admin_group: args.admin_group.clone(),
        mps: args.mps_pipe_dir.clone().map(MpsWatch::external),
        state_file: None,
        reload: args.config.clone().map(|path| crate::server::Reload {
            path,
            cli_eviction_deadline: args.eviction_deadline,
            cli_min_residency: args.min_residency,
        }),
    };
    let identity = Identity {
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        backend: backend.name.to_string(),
    };
    let mut ledger = Ledger::new(
        args.ledger_config(&file),
        backend.devices.clone(),
        backend.source.clone(),
        std::time::Instant::now(),
    )
    .with_identity(identity)
    .with_reclaim(crate::state::random_key(), args.grace);
    for d in &backend.devices {
        tracing::info!(index = d.index, uuid = %d.uuid, name = %d.name, total_bytes = d.total_bytes,
            size = %format_size(d.total_bytes), backend = backend.name, "device");
    }
    log_policy(&args.ledger_config(&file));
    let reader = backend.reader.take();
    let io = |context| move |source| StartError::Io { context, source };
    // One thread runs the accept loop, every connection and the core (NVML readings have their own thread): the core is one task
    // anyway, and with a second worker every request and reply crossed
    // threads — a futex wake each way. Measured on 2 cores at 64 clients:
    // daemon CPU per grant+release pair 16–17 µs → 13–14 µs
    // (docs/benchmarks.md).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("cannot start the async runtime"))?;
    runtime.block_on(async move {
        let mut config = config;
        let listener = match inherited {
            Some(l) => l,
            None => bind_socket(&config)?,
        };
        // Read once the socket is ours: a second vramd refused above never
        // touches the first one's state.
        let state = StateFile::for_socket(&config.socket_path, args.state_dir.as_deref());
        restore(&mut ledger, &state, args.grace);
        config.state_file = Some(state);
        // Started once the socket is ours (a second vramd on the same path
        // stops above and leaves the first one's server alone); stopped when
        // the guard drops, on every way out.
        let _mps = if args.mps {
            let runtime_dir = config
                .socket_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            let guard = MpsGuard::start(&runtime_dir).inspect_err(|_| {
                if config.remove_socket_on_exit {
                    let _ = std::fs::remove_file(&config.socket_path);
                }
            })?;
            config.mps = Some(guard.watch());
            Some(guard)
        } else {
            None
        };
        if let Some(watch) = &config.mps {
            let s = watch.status();
            tracing::info!(pipe_dir = %s.pipe_dir, healthy = s.healthy,
                note = s.note.as_deref().unwrap_or(""), "MPS server for run --enforce");
        }
        notify(sd_notify::NotifyState::Ready);
        serve(config, listener, ledger, reader, async {
            shutdown_signal().await;
            notify(sd_notify::NotifyState::Stopping);
        })
        .await
        .map_err(io("server failed"))
    })
}

/// Holds the reservations saved in `state` for their holders (see
/// [`crate::state`]); a corrupt or foreign file is logged and set aside, and
/// the daemon starts empty.
fn restore(ledger: &mut Ledger, state: &StateFile, grace: Duration) {
    let path = state.path().display();
    if let Some(dir) = state.path().parent().filter(|d| !d.exists()) {
        use std::os::unix::fs::DirBuilderExt;
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e,
                "cannot create the state directory: a restart would lose reservations");
        }
    }
    match state.load() {
        Ok(None) => tracing::info!(path = %path, "no saved reservations (first start)"),
        Ok(Some(snapshot)) => {
            let report = ledger.restore(snapshot, std::time::Instant::now());
            for why in &report.dropped {
                tracing::warn!(path = %path, reason = %why, "saved reservation not restored");
            }
            tracing::info!(path = %path, reservations = report.held, bytes = report.held_bytes,
                size = %format_size(report.held_bytes), grace_ms = grace.as_millis() as u64,
                "saved reservations held for their holders to reclaim");
        }
        Err(why) => {
            let aside = state.set_aside();
            tracing::error!(path = %path, reason = %why,
                moved_to = %aside.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                "state file unusable; starting with no saved reservations");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        let matches = Args::command_with_defaults()
            .try_get_matches_from(std::iter::once("vramd").chain(args.iter().copied()))
            .expect("valid arguments");
        Args::from_arg_matches(&matches).expect("valid arguments")
    }

    #[test]
    fn log_levels_are_checked_and_typos_refused() {
        for good in [
            "info",
            "WARN",
            "off",
            "vramd=debug",
            "vramd=debug,info",
            "vramd::server=trace,warn",
        ] {
            assert_eq!(parse_log_filter(good).as_deref(), Ok(good), "{good}");
        }
        let e = parse_log_filter("warning").unwrap_err();
        assert!(e.contains("unknown log level \"warning\""), "{e}");
        assert!(e.contains("error, warn, info, debug, trace, off"), "{e}");
        for bad in ["", "inof", "vramd=loud", "=info", "info,verbose"] {
            assert!(parse_log_filter(bad).is_err(), "{bad}");
        }
        let matches = Args::command_with_defaults().try_get_matches_from([
            "vramd",
            "--simulate",
            "1GiB",
            "--log-level",
            "warning",
        ]);
        assert!(matches.is_err());
    }

    #[test]
    fn the_cushion_default_reads_back_with_its_unit() {
        let args = parse(&["--simulate", "24GiB"]);
        assert_eq!(args.cushion, Some(LedgerConfig::default().cushion_bytes));
        let e = Args::command_with_defaults()
            .try_get_matches_from(["vramd", "--simulate", "24"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 24GiB?"), "{e}");
    }

    #[test]
    fn no_arguments_give_the_ledgers_defaults() {
        let config = parse(&[]).ledger_config(&Config::default());
        assert_eq!(config, LedgerConfig::default());
    }

    #[test]
    fn the_command_line_wins_over_the_config_file_which_wins_over_the_default() {
        let file = Config::parse("[eviction]\ndeadline = \"5s\"\nmin_residency = \"7s\"\n")
            .expect("valid config");
        let config = parse(&[
            "--eviction-deadline",
            "2s",
            "--aging",
            "1m",
            "--placement",
            "pack",
            "--priority-window",
            "50m",
            "--adaptive-guard",
            "3h",
        ])
        .ledger_config(&file);
        assert_eq!(config.priority_window, Some(Duration::from_secs(3000)));
        assert_eq!(
            config.adaptive_guard,
            Some(AdaptiveGuard {
                factor: AdaptiveGuard::DEFAULT_FACTOR,
                cap: Duration::from_secs(3 * 3600)
            })
        );
        assert_eq!(config.eviction_deadline, Duration::from_secs(2));
        assert_eq!(config.min_residency, Duration::from_secs(7));
        assert_eq!(config.aging, Duration::from_secs(60));
        assert_eq!(config.placement, Placement::Pack);
        assert_eq!(
            config.starvation_guard,
            LedgerConfig::default().starvation_guard
        );
        let factor2 =
            parse(&["--adaptive-guard", "1h", "--adaptive-guard-factor", "2"]).ledger_config(&file);
        assert_eq!(factor2.adaptive_guard.map(|g| g.factor), Some(2));
    }

    #[test]
    fn the_adaptive_guard_is_on_by_default_and_can_be_turned_off() {
        let file = Config::default();
        assert_eq!(
            parse(&[]).ledger_config(&file).adaptive_guard,
            Some(AdaptiveGuard::DEFAULT)
        );
        // The factor alone keeps the default cap.
        assert_eq!(
            parse(&["--adaptive-guard-factor", "2"])
                .ledger_config(&file)
                .adaptive_guard,
            Some(AdaptiveGuard {
                factor: 2,
                cap: AdaptiveGuard::DEFAULT_CAP
            })
        );
        for off in ["off", "none"] {
            assert_eq!(
                parse(&["--adaptive-guard", off])
                    .ledger_config(&file)
                    .adaptive_guard,
                None
            );
        }
        for bad in [
            &["--adaptive-guard", "later"][..],
            &["--adaptive-guard-factor", "0"],
        ] {
            let mut argv = vec!["vramd"];
            argv.extend_from_slice(bad);
            assert!(
                Args::command_with_defaults()
                    .try_get_matches_from(argv)
                    .is_err(),
                "{bad:?}"
            );
        }
    }
}
