//! The socket server: [`socket`] setup, one task per [`connection`], and
//! the [`core`] loop that owns the ledger. [`serve`] wires them together.

pub mod connection;
pub mod core;
pub mod outbox;
pub mod socket;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vramd_ledger::{ConnId, Input, Ledger};

use crate::config::ConsumerConfig;
use crate::consumers::{self, ConsumerHandle};
use crate::gpu::{GpuReader, Poller, read_all};
pub use socket::{ServerError, bind_socket};
use socket::{group_id, remove_socket};

use self::core::{Core, Event};

/// Settings of the socket server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Path of the Unix socket.
    pub socket_path: PathBuf,
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
    /// Most connections served at once; more are told so and closed.
    pub max_connections: usize,
    /// How often a measuring backend is read.
    pub poll_interval: Duration,
    /// External consumers (their specs are also in the ledger).
    pub consumers: Vec<ConsumerConfig>,
    /// How often consumers are asked what they hold.
    pub consumer_poll_interval: Duration,
    /// Members of this group (and root) are admins.
    pub admin_group: Option<String>,
}

/// Serves clients on `listener` until `shutdown` completes, then removes the
/// socket file (also when it fails). SIGHUP is logged and ignored.
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
    // unwinding through this future — removes the socket file.
    let _socket_file = SocketFile(config.socket_path.clone());
    // SIGHUP would otherwise end the process without cleaning up; there is
    // no configuration to reload, so it is logged and ignored.
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
    let (consumer_tx, consumer_rx) = mpsc::channel::<Input>(256);
    let consumers: HashMap<String, ConsumerHandle> = config
        .consumers
        .iter()
        .map(|c| {
            let handle = consumers::start(
                c.clone(),
                config.consumer_poll_interval,
                consumer_tx.clone(),
            );
            (c.name.clone(), handle)
        })
        .collect();
    drop(consumer_tx);
    let mut core = Core::new(ledger, consumers, poller);
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
    let core = tokio::spawn(core.run(events_rx, consumer_rx));
    let open = Arc::new(AtomicUsize::new(0));
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
    info!(socket = %config.socket_path.display(), mode = format!("{:o}", config.socket_mode), "listening");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => {
                info!(signal = "SIGHUP", "signal received; nothing to reload, ignored");
            }
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: log, back off briefly, keep serving.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let conn = ConnId(next_conn);
                next_conn += 1;
                let over_limit = open.fetch_add(1, Ordering::SeqCst) >= config.max_connections;
                let open = open.clone();
                let events = events_tx.clone();
                let limits = connection::Limits {
                    handshake_timeout: config.handshake_timeout,
                    frame_timeout: config.frame_timeout,
                    max_unsent_bytes: config.max_unsent_bytes,
                    admin_gid,
                };
                tokio::spawn(async move {
                    if let Err(e) = connection::serve(stream, conn, events, limits, over_limit).await {
                        debug!(conn = %conn, error = %e, "connection ended with an error");
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }
    info!("shutting down");
    drop(events_tx);
    core.abort();
    Ok(())
}

/// The socket file, removed when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        remove_socket(&self.0);
    }
}
