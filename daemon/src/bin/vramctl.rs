//! `vramctl`: look at and use vramd from the shell.
//!
//! - `vramctl status [--json]`: devices, reservations, queue, counters;
//! - `vramctl reserve 8GiB`: hold a reservation until Ctrl-C or SIGTERM;
//! - `vramctl run --vram 8GiB -- CMD ARGS...`: run a command inside a
//!   reservation, with `CUDA_VISIBLE_DEVICES` pointing at the granted device.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vramd_client::{Client, DeviceSelector, Error, Progress, Request, Reservation, StatusReport};
use vramd_protocol::{format_size, parse_duration, parse_size, paths};

/// Exit status when the wait limit passed (EX_TEMPFAIL).
const EXIT_TIMEOUT: u8 = 75;
/// Exit status when the daemon is not reachable or refuses (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// Look at and use the vramd GPU memory arbiter.
#[derive(Debug, Parser)]
#[command(name = "vramctl", version, about)]
struct Cli {
    /// Socket of the daemon [default: $VRAMD_SOCKET, else
    /// $XDG_RUNTIME_DIR/vramd.sock if it exists, else /run/vramd/vramd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show devices, reservations, the wait queue and counters.
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Reserve memory and hold it until Ctrl-C or SIGTERM.
    Reserve {
        /// How much, e.g. 8GiB, 512MiB, 8GB.
        #[arg(value_parser = parse_size, value_name = "SIZE")]
        size: u64,
        /// Hold it idle: when a waiter needs the room and the daemon asks,
        /// print the request and release (exit 0).
        #[arg(long)]
        evictable: bool,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// Run a command inside a reservation; release when it ends.
    Run {
        /// How much, e.g. 8GiB.
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        vram: u64,
        #[command(flatten)]
        opts: ReserveOpts,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ReserveOpts {
    /// Device: any, an index (0), or a UUID (GPU-…).
    #[arg(long, default_value = "any")]
    device: DeviceSelector,
    /// Priority: higher is granted first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Label shown in status.
    #[arg(long)]
    label: Option<String>,
    /// Longest wait, e.g. 30s, 2m; by default wait as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

impl ReserveOpts {
    fn request(&self, bytes: u64) -> Request {
        let mut r = Request::new(bytes)
            .device(self.device.clone())
            .priority(self.priority);
        if let Some(l) = &self.label {
            r = r.label(l.clone());
        }
        if let Some(t) = self.timeout {
            r = r.timeout(t);
        }
        r
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(paths::client_socket_path);
    match run(cli, socket) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vramctl: {e}");
            ExitCode::from(match e {
                Error::WaitTimeout(_) => EXIT_TIMEOUT,
                Error::NotRunning { .. } | Error::Disconnected | Error::Refused(_) => {
                    EXIT_UNAVAILABLE
                }
                _ => 1,
            })
        }
    }
}

fn run(cli: Cli, socket: PathBuf) -> Result<ExitCode, Error> {
    match cli.command {
        Cmd::Status { json } => {
            let status = Client::connect(&socket)?.status()?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                println!("{text}");
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reserve {
            size,
            evictable,
            opts,
        } => {
            let signals = SignalWatch::start()?;
            let client = Client::connect(&socket)?;
            let request = opts.request(size).evictable(evictable);
            let Some(r) = wait_for_grant(&client, request, &signals)? else {
                return Ok(ExitCode::from(130));
            };
            if evictable {
                let evicted = signals.last.clone();
                r.on_evict(move |e| {
                    println!(
                        "eviction requested for reservation {} ({}); releasing",
                        e.id, e.reason
                    );
                    let _ = std::io::stdout().flush();
                    // Wakes the wait below as a signal would.
                    evicted.store(EVICTED, Ordering::SeqCst);
                });
            }
            println!(
                "granted reservation {} of {} on device {} ({}); holding until Ctrl-C",
                r.id(),
                format_size(r.bytes()),
                r.device_index(),
                r.device_uuid()
            );
            let _ = std::io::stdout().flush();
            signals.wait();
            if r.is_evicted() || signals.received() == Some(EVICTED) {
                // The SDK releases after the callback returns.
                let _ = wait_evicted(&r);
                eprintln!("released (evicted)");
                return Ok(ExitCode::SUCCESS);
            }
            r.release()?;
            eprintln!("released");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            vram,
            opts,
            command,
        } => {
            let signals = SignalWatch::start()?;
            let client = Client::connect(&socket)?;
            let Some(r) = wait_for_grant(&client, opts.request(vram), &signals)? else {
                return Ok(ExitCode::from(130));
            };
            run_command(&r, &command, &signals)
        }
    }
}

/// Marker in [`SignalWatch`]'s slot: an eviction, not a signal.
const EVICTED: i32 = -1;

/// Waits (bounded) until the SDK has released an evicted reservation.
fn wait_evicted(r: &Reservation) -> bool {
    for _ in 0..500 {
        if r.is_evicted() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits for the grant, printing queue positions; `None` if a signal came first.
fn wait_for_grant(
    client: &Client,
    request: Request,
    signals: &SignalWatch,
) -> Result<Option<Reservation>, Error> {
    let mut pending = client.submit(request)?;
    loop {
        if signals.received().is_some() {
            eprintln!("vramctl: interrupted while waiting; request withdrawn");
            pending.cancel()?;
            return Ok(None);
        }
        match pending.next(Some(Duration::from_millis(50)))? {
            Some(Progress::Granted(r)) => return Ok(Some(r)),
            Some(Progress::Queued { id, position }) => {
                eprintln!("vramctl: request {id} waits at position {position}");
            }
            None => {}
        }
    }
}

fn run_command(
    r: &Reservation,
    command: &[String],
    signals: &SignalWatch,
) -> Result<ExitCode, Error> {
    let (program, args) = command.split_first().expect("clap requires a command");
    let uuid = r.device_uuid();
    // CUDA accepts GPU-/MIG- UUIDs, which stay right whatever the device order.
    let visible = if uuid.starts_with("GPU-") || uuid.starts_with("MIG-") {
        uuid.to_string()
    } else {
        r.device_index().to_string()
    };
    let mut child = match Command::new(program)
        .args(args)
        .env("CUDA_VISIBLE_DEVICES", visible)
        .env("VRAMD_RESERVATION", r.id().to_string())
        .env("VRAMD_DEVICE", r.device_index().to_string())
        .env("VRAMD_DEVICE_UUID", uuid)
        .env("VRAMD_BYTES", r.bytes().to_string())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vramctl: cannot run {program}: {e}");
            return Ok(ExitCode::from(
                if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                },
            ));
        }
    };
    signals.forward_to(child.id());
    // The command (and so its descendants) counts against the reservation
    // even if vramctl's own process tree changes.
    if let Err(e) = r.attach_pids(&[child.id()]) {
        eprintln!("vramctl: warning: cannot attribute the command's GPU usage: {e}");
    }
    let status = child.wait()?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    })
}

/// SIGINT/SIGTERM: recorded, and forwarded to a child once there is one.
struct SignalWatch {
    last: Arc<AtomicI32>,
    child: Arc<AtomicI32>,
    handle: signal_hook::iterator::Handle,
}

impl SignalWatch {
    fn start() -> Result<Self, Error> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let last = Arc::new(AtomicI32::new(0));
        let child = Arc::new(AtomicI32::new(0));
        let (l, c) = (last.clone(), child.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                l.store(sig, Ordering::SeqCst);
                let pid = c.load(Ordering::SeqCst);
                if pid > 0 {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, sig) };
                }
            }
        });
        Ok(Self {
            last,
            child,
            handle,
        })
    }

    fn received(&self) -> Option<i32> {
        match self.last.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Blocks until SIGINT or SIGTERM.
    fn wait(&self) {
        while self.received().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn forward_to(&self, pid: u32) {
        self.child.store(pid as i32, Ordering::SeqCst);
        // A signal that came before the child existed is passed on now.
        if let Some(sig) = self.received() {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        self.handle.close();
    }
}

fn print_status(s: &StatusReport) {
    println!(
        "vramd {} · backend {} · up {}s",
        s.daemon_version,
        s.backend,
        s.uptime_ms / 1000
    );
    println!();
    println!(
        "{:<4} {:<14} {:<20} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "DEV", "UUID", "NAME", "TOTAL", "USED", "RESERVED", "UNATTRIB.", "AVAILABLE"
    );
    for d in &s.devices {
        println!(
            "{:<4} {:<14} {:<20} {:>11} {:>11} {:>11} {:>11} {:>11}",
            d.index,
            truncate(&d.uuid, 14),
            truncate(&d.name, 20),
            format_size(d.total_bytes),
            format_size(d.used_bytes),
            format_size(d.reserved_bytes),
            format_size(d.unattributed_bytes),
            format_size(d.available_bytes)
        );
        if !d.healthy {
            println!(
                "     UNHEALTHY, no new grants: {}",
                d.note.as_deref().unwrap_or("readings fail")
            );
        } else if let Some(note) = &d.note {
            println!("     note: {note}");
        }
    }
    println!();
    if s.reservations.is_empty() {
        println!("no reservations");
    } else {
        println!(
            "{:<6} {:<4} {:>11} {:>12} {:>8} {:>6} {:>4} {:>9}  LABEL",
            "ID", "DEV", "BYTES", "ACTUAL", "PID", "UID", "PRIO", "AGE"
        );
        for r in &s.reservations {
            let flag = if r.over_reserved { " !" } else { "" };
            let idle = if r.idle { " (idle)" } else { "" };
            let actual = format!("{}{flag}", format_size(r.actual_bytes));
            let label = r.label.as_deref().unwrap_or("-");
            println!(
                "{:<6} {:<4} {:>11} {:>12} {:>8} {:>6} {:>4} {:>8}s  {label}{idle}",
                r.id,
                r.device,
                format_size(r.bytes),
                actual,
                r.pid,
                r.uid,
                r.priority,
                r.age_ms / 1000,
            );
        }
        if s.reservations.iter().any(|r| r.over_reserved) {
            println!("! uses more than it reserved (counted at its actual usage)");
        }
    }
    println!();
    if s.queue.is_empty() {
        println!("queue empty");
    } else {
        println!(
            "{:<4} {:<6} {:<6} {:>11} {:>8} {:>4} {:>9}  LABEL",
            "POS", "ID", "DEV", "BYTES", "PID", "PRIO", "WAITED"
        );
        for q in &s.queue {
            println!(
                "{:<4} {:<6} {:<6} {:>11} {:>8} {:>4} {:>8}s  {}",
                q.position,
                q.id,
                truncate(&q.device.to_string(), 6),
                format_size(q.bytes),
                q.pid,
                q.priority,
                q.waited_ms / 1000,
                q.label.as_deref().unwrap_or("-")
            );
        }
        let more = s.queue_total.saturating_sub(s.queue.len() as u64);
        if more > 0 {
            println!("… and {more} more waiting");
        }
    }
    if !s.consumers.is_empty() {
        println!();
        println!(
            "{:<12} {:<8} {:<4} {:>4} {:<10} {:>11} {:>12}  MODELS / LAST ERROR",
            "CONSUMER", "KIND", "DEV", "PRIO", "REACHABLE", "HOLDS", "LAST EVICT"
        );
        for c in &s.consumers {
            let last = c
                .last_eviction_ms
                .map_or_else(|| "never".to_string(), |ms| format!("{}s ago", ms / 1000));
            let detail = match &c.last_error {
                Some(e) => e.clone(),
                None => c.models.join(", "),
            };
            println!(
                "{:<12} {:<8} {:<4} {:>4} {:<10} {:>11} {:>12}  {}",
                truncate(&c.name, 12),
                c.kind,
                c.device
                    .map_or_else(|| "any".to_string(), |d| d.to_string()),
                c.priority,
                if c.reachable { "yes" } else { "NO" },
                format_size(c.resident_bytes),
                last,
                detail
            );
        }
    }
    let c = &s.counters;
    println!();
    println!(
        "grants {} · releases {} (on disconnect {}) · timeouts {} · refusals {} · cancels {}",
        c.grants, c.releases, c.disconnect_releases, c.timeouts, c.refusals, c.cancels
    );
    println!(
        "evictions: requested {} · completed {} · failed {}",
        c.evictions_requested, c.evictions_completed, c.evictions_failed
    );
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}
