//! The gateway's connection to vramd: made on first need, dropped when it
//! breaks, and made again by itself (the watcher in `lib.rs` retries every
//! poll interval). Each connection has a generation number; reservations
//! made on an older one are gone with it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;
use vramd_client::{AsyncClient, StatusReport};

use crate::Error;

/// A reconnecting handle on vramd.
#[derive(Debug)]
pub struct Daemon {
    socket: PathBuf,
    client: Mutex<Option<(u64, Arc<AsyncClient>)>>,
    generation: AtomicU64,
    last_status: std::sync::Mutex<Option<StatusReport>>,
}

impl Daemon {
    /// A handle on the daemon at `socket`; nothing is connected yet.
    pub fn new(socket: PathBuf) -> Daemon {
        Daemon {
            socket,
            client: Mutex::new(None),
            generation: AtomicU64::new(0),
            last_status: std::sync::Mutex::new(None),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The generation of the current connection (0: never connected).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The connection, made now if there is none, with its generation.
    pub async fn client(&self) -> Result<(u64, Arc<AsyncClient>), Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // The gateway reconnects and reserves again by itself (each
        // connection is a generation), so the SDK neither reconnects nor
        // keeps its reservations across a restart of vramd.
        let c = AsyncClient::connect_with(self.socket.clone(), None)
            .await
            .map_err(|e| self.down(e))?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(socket = %self.socket.display(), generation, "connected to vramd");
        let c = (generation, Arc::new(c));
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets connection `generation` after it failed.
    pub async fn lost(&self, generation: u64) {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(socket = %self.socket.display(), generation, "lost the connection to vramd");
            *slot = None;
            // Reservations of that generation are gone: bump so holders see it.
            self.generation.fetch_add(1, Ordering::SeqCst);
            *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Whether a connection is up.
    pub async fn connected(&self) -> bool {
        self.client.lock().await.is_some()
    }

    /// The daemon's status, connecting if needed; a failure drops the
    /// connection.
    pub async fn status(&self) -> Result<StatusReport, Error> {
        let (generation, c) = self.client().await?;
        match c.status().await {
            Ok(s) => {
                *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                Ok(s)
            }
            Err(e) => {
                self.lost(generation).await;
                Err(self.down(e))
            }
        }
    }

    /// The last status read (`None` while disconnected).
    pub fn last_status(&self) -> Option<StatusReport> {
        self.last_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The error for "vramd is not reachable".
    pub fn down(&self, e: impl std::fmt::Display) -> Error {
        Error::DaemonDown {
            socket: self.socket.clone(),
            message: e.to_string(),
        }
    }
}
