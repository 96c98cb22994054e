//! The socket server: [`socket`] setup, one task per [`connection`], and
//! the [`core`] loop that owns the ledger. [`serve`] wires them together.

pub mod admission;
pub mod connection;
pub mod core;
pub mod outbox;
pub mod socket;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vramd_ledger::{ConnId, Ledger};

use crate::gpu::{GpuReader, Poller, read_all};
pub use socket::{ServerError, bind_socket};
use socket::{group_id, raise_open_file_limit, remove_socket};

use self::admission::Admission;
use self::core::{Core, Event};

/// Settings of the socket server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Path of the Unix socket.
    pub socket_path: PathBuf,
    /// Whether [`serve`] removes the socket file when it stops (not when
    /// the socket was passed in by systemd, whose socket unit owns it).
    pub remove_socket_on_exit: bool,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Group that owns the socket file, if set.
    pub socket_group: Option<String>,
    /// How long a new client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// How long a message (binary frame or JSON line) may take to arrive in
    /// full once it started; a client stalled inside one is closed.
    pub frame_timeout: Duration,
    /// Most bytes of replies (estimated in memory) a client may leave
    /// unread; past it the connection is closed and what it held released.
    pub max_unsent_bytes: usize,
    /// Most connections served at once (past the handshake); more are
    /// told so and closed.
    pub max_connections: usize,
    /// Most connections one user (not an admin) may have past the
    /// handshake.
    pub max_connections_per_uid: usize,
    /// Most connections in their handshake at once; a new one closes the
    /// one that has waited longest.
    pub max_handshakes: usize,
    /// How often a measuring backend is read.
    pub poll_interval: Duration,
    /// Members of this group (and root) are admins.
    pub admin_group: Option<String>,
    /// The MPS server reported in status (its health checked each time).
    pub mps: Option<crate::mps::MpsWatch>,
    /// Where reservations are saved for a restart (`None`: not saved).
    pub state_file: Option<crate::state::StateFile>,
    /// The config file SIGHUP reads again, if any.
    pub reload: Option<Reload>,
}

/// What SIGHUP reloads: the eviction timing from the config file (unless the
/// command line set it).
#[derive(Debug, Clone)]
pub struct Reload {
    /// The config file.
    pub path: PathBuf,
    /// `--eviction-deadline`, which wins over the file.
    pub cli_eviction_deadline: Option<Duration>,
    /// `--min-residency`, which wins over the file.
    pub cli_min_residency: Option<Duration>,
}

impl Reload {
    /// Reads the file again: the event for the core, or why not.
    fn read(&self) -> Result<Event, String> {
        let file = crate::config::Config::load(&self.path).map_err(|e| e.to_string())?;
        let d = vramd_ledger::LedgerConfig::default();
        Ok(Event::Reload {
            eviction_deadline: self
                .cli_eviction_deadline
                .or(file.eviction_deadline)
                .unwrap_or(d.eviction_deadline),
            min_residency: self
                .cli_min_residency
                .or(file.min_residency)
                .unwrap_or(d.min_residency),
        })
    }
}

/// Raises the open-file soft limit to the hard limit (every connection is a
/// file descriptor: take all the system allows) and logs it. Called at the
/// very start, before the socket is bound: a client that can connect must
/// find the limit already raised.
pub fn raise_open_file_limit_logged() {
    match raise_open_file_limit() {
        Ok((before, after)) if after > before => {
            info!(
                before,
                after, "raised the open-file limit to its hard limit"
            );
        }
        Ok((_, after)) => debug!(limit = after, "open-file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Serves clients on `listener` until `shutdown` completes, then removes the
/// socket file (also when it fails) if `config.remove_socket_on_exit` (a
/// socket passed by systemd stays). SIGHUP reads the config file again
/// (see [`Reload`]); without one it is logged and ignored.
///
/// With a `reader` (a measuring backend), every device is read once before
/// anyone is served (so the first grants already see what is on the cards),
/// then a poller thread reads them each `config.poll_interval` and after
/// every release.
pub async fn serve(
    config: ServerConfig,
    listener: std::os::unix::net::UnixListener,
    ledger: Ledger,
    mut reader: Option<Box<dyn GpuReader>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    // From here on, every way out — shutdown, an error below, a panic
    // unwinding through this future — removes the socket file, unless it
    // was passed by systemd (which owns it).
    let _socket_file = config
        .remove_socket_on_exit
        .then(|| SocketFile(config.socket_path.clone()));
    // SIGHUP would otherwise end the process without cleaning up: it
    // reloads the config file, or without one is logged and ignored.
    let mut hangup = signal(SignalKind::hangup())?;
    let listener = UnixListener::from_std(listener)?;
    let (events_tx, events_rx) = mpsc::channel::<Event>(4096);
    let devices = ledger.device_count();
    let first = reader.as_mut().map(|r| read_all(&mut **r, devices));
    let poller = match reader {
        Some(reader) => {
            let tx = events_tx.clone();
            Some(Poller::start(
                reader,
                devices,
                config.poll_interval,
                move |r| tx.blocking_send(Event::Readings(r)).is_ok(),
            )?)
        }
        None => None,
    };
    let mut core = Core::new(ledger, poller)
        .with_mps(config.mps.clone())
        .with_state(config.state_file.clone());
    if let Some(first) = first {
        for (device, r) in first.results.iter().enumerate() {
            if let Ok(reading) = r {
                info!(
                    device,
                    used_bytes = reading.used_bytes,
                    processes = reading.processes.as_ref().map_or(0, Vec::len),
                    per_process_usage = reading.processes.is_some(),
                    "first reading"
                );
            }
        }
        core.readings(first);
    }
    let (stop_core, stop_rx) = tokio::sync::oneshot::channel();
    let core = tokio::spawn(core.run(events_rx, stop_rx));
    let admission = Admission::new(
        config.max_connections,
        config.max_connections_per_uid,
        config.max_handshakes,
    );
    let admin_gid = match &config.admin_group {
        Some(name) => Some(group_id(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("admin group {name:?} does not exist"),
            )
        })?),
        None => None,
    };
    let mut next_conn = 1u64;
    let mut accept_errors = AcceptErrors::default();
    let mut spare = open_spare();
    info!(socket = %config.socket_path.display(), mode = format!("{:o}", config.socket_mode), "listening");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => match &config.reload {
                None => info!(signal = "SIGHUP", "signal received; no config file to reload, ignored"),
                Some(reload) => {
                    info!(signal = "SIGHUP", path = %reload.path.display(), "signal received; reloading the config file");
                    match reload.read() {
                        Ok(event) => {
                            let _ = events_tx.send(event).await;
                        }
                        Err(e) => warn!(error = %e, "config not reloaded; the one in force stays"),
                    }
                }
            },
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => {
                        accept_errors.succeeded();
                        s
                    }
                    Err(e) => {
                        // EMFILE and friends: the client that waits gets a
                        // clear error if a spare descriptor allows; the log
                        // says so at most once a second; the loop backs off.
                        let refused = if is_out_of_files(&e) {
                            refuse_with_spare(&listener, &mut spare).await
                        } else {
                            false
                        };
                        let pause = accept_errors.failed(&e, refused);
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                };
                let conn = ConnId(next_conn);
                next_conn += 1;
                let admission = admission.clone();
                let events = events_tx.clone();
                let limits = connection::Limits {
                    handshake_timeout: config.handshake_timeout,
                    frame_timeout: config.frame_timeout,
                    max_unsent_bytes: config.max_unsent_bytes,
                    admin_gid,
                };
                tokio::spawn(async move {
                    if let Err(e) = connection::serve(stream, conn, events, limits, admission).await {
                        debug!(conn = %conn, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    info!("shutting down");
    drop(events_tx);
    // The core saves the reservations before it ends; connections are not
    // closed before (their closing must not release what a restart keeps).
    let _ = stop_core.send(());
    if tokio::time::timeout(Duration::from_secs(5), core)
        .await
        .is_err()
    {
        warn!("the core did not stop within 5 s");
    }
    Ok(())
}

/// The socket file, removed when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        remove_socket(&self.0);
    }
}

/// Whether an accept error means the process or system is out of file
/// descriptors.
fn is_out_of_files(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// A descriptor held in reserve, so that when the process runs out of them
/// a waiting client can still be accepted and told why it is turned away.
fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Out of descriptors: gives up the spare one, accepts the waiting client,
/// tells it (in its encoding if it already spoke, else JSON) and closes it,
/// then takes the spare again. Returns whether a client was told.
async fn refuse_with_spare(listener: &UnixListener, spare: &mut Option<std::fs::File>) -> bool {
    if spare.take().is_none() {
        *spare = open_spare();
        return false;
    }
    let told = match tokio::time::timeout(Duration::from_millis(10), listener.accept()).await {
        Ok(Ok((stream, _))) => {
            let mut first = [0u8; 1];
            let encoding = match stream.try_read(&mut first) {
                Ok(1) => vramd_protocol::Encoding::detect(first[0])
                    .unwrap_or(vramd_protocol::Encoding::Json),
                _ => vramd_protocol::Encoding::Json,
            };
            let msg = vramd_protocol::ServerMessage::Error {
                tag: 0,
                kind: vramd_protocol::ErrorKind::LimitExceeded,
                message:
                    "the daemon is out of file descriptors (too many connections); try again later"
                        .into(),
            };
            if let Ok(bytes) = vramd_protocol::encode(encoding, &msg) {
                // Small enough for an empty socket buffer; never waits.
                let _ = stream.try_write(&bytes);
            }
            true
        }
        _ => false,
    };
    *spare = open_spare();
    told
}

/// Accept errors: a growing pause between tries, and log lines at most
/// once a second (with how many were not logged).
#[derive(Debug, Default)]
struct AcceptErrors {
    pause: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
    refused: u64,
}

impl AcceptErrors {
    const FIRST_PAUSE: Duration = Duration::from_millis(5);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(1);

    /// Records a failed accept; returns how long to pause.
    fn failed(&mut self, e: &io::Error, refused: bool) -> Duration {
        self.unlogged += 1;
        self.refused += u64::from(refused);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Self::LOG_EVERY)
        {
            warn!(error = %e, failures = self.unlogged, clients_refused = self.refused,
                "accept failed; backing off");
            self.last_log = Some(now);
            self.unlogged = 0;
            self.refused = 0;
        }
        // A refused client made room in the backlog: try again soon.
        self.pause = if refused {
            Self::FIRST_PAUSE
        } else {
            (self.pause * 2).clamp(Self::FIRST_PAUSE, Self::MAX_PAUSE)
        };
        self.pause
    }

    /// Records a successful accept: the next failure starts over.
    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }
}
