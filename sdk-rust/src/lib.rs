//! Rust SDK for [vramd], the per-machine GPU memory arbiter.
//!
//! Reserve VRAM before you load a model; the daemon grants it when it fits
//! beside everything else on the card and queues you otherwise. The
//! [`Reservation`] guard releases on `Drop`, and the daemon releases
//! everything a connection held when it closes — even after a crash.
//!
//! ```no_run
//! use vramd_client::{Client, Request, GIB};
//!
//! let client = Client::connect_default()?;
//! let r = client.reserve(Request::new(8 * GIB).label("flux"))?;
//! println!("load on cuda:{} ({} bytes)", r.device_index(), r.bytes());
//! // ... load and run the model ...
//! drop(r); // released
//! # Ok::<(), vramd_client::Error>(())
//! ```
//!
//! The API is blocking and needs no async runtime: a waiting caller reads
//! its own answer from the socket, and a background thread per connection
//! reads when no caller does (eviction requests, async callers). Several reservations may share one
//! [`Client`]; dropping the client closes its connection, which releases them
//! all. With the `tokio` feature, [`AsyncClient`] offers the same from async
//! code without blocking the executor.
//!
//! # Daemon restarts
//! A restart of the daemon loses no reservation: when the connection
//! closes under it, a client connects again (for up to
//! [`RECONNECT_FOR`], see [`Client::set_reconnect`]), reclaims every
//! reservation it holds with the token the daemon gave at the grant, and
//! submits again every request still waiting. Callers see nothing but a
//! pause (calls other than waiting requests that were in flight fail with
//! [`Error::Disconnected`]). A reservation that cannot be reclaimed is
//! *lost*: [`Reservation::is_lost`] says so and [`Reservation::on_lost`]
//! runs.
//!
//! [vramd]: https://example.invalid/vramd

mod conn;
mod error;
pub mod util;

use std::future::Future;
use std::path::Path;
#[cfg(feature = "tokio")]
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use conn::{Conn, EvictState, Slot};
pub use conn::{Eviction, RECONNECT_FOR};
pub use error::{Error, Result};
use vramd_protocol::{ClientMessage, ReserveRequest, ServerMessage};
pub use vramd_protocol::{
    ConsumerError, ConsumerReport, ConsumerStatus, DeviceSelector, ErrorKind, GIB, KIB, MIB,
    MpsStatus, ReservationId, StatusReport, TIB, format_size, parse_size, paths,
};

/// What to reserve: bytes, and optionally a device, a priority, a label and a
/// wait limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    bytes: u64,
    device: DeviceSelector,
    priority: i32,
    label: Option<String>,
    timeout: Option<Duration>,
    evictable: bool,
    pids: Option<Vec<u32>>,
}

impl Request {
    /// A request for `bytes` on any device, priority 0, no label, waiting as
    /// long as it takes.
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes,
            device: DeviceSelector::Any,
            priority: 0,
            label: None,
            timeout: None,
            evictable: false,
            pids: None,
        }
    }

    /// Makes the reservation speak for these processes (and their
    /// descendants) instead of this client's own process — for a program
    /// that holds reservations on behalf of processes it did not start,
    /// such as a gateway in front of an inference server. An empty list
    /// speaks for no process until [`Reservation::attach_pids`] names some.
    /// Usage these processes already have on the device that counts against
    /// no reservation is adopted: the request needs room only for what it
    /// reserves beyond it, so a model already loaded becomes a reservation
    /// at once. The daemon accepts only processes of the caller's user,
    /// unless the caller is root or an admin.
    pub fn for_pids(mut self, pids: impl IntoIterator<Item = u32>) -> Self {
        self.pids = Some(pids.into_iter().collect());
        self
    }

    /// Makes the reservation idle from the start: the daemon may ask the
    /// holder to unload and release it when a waiter needs the room (see
    /// [`Reservation::set_idle`] and [`Reservation::on_evict`]).
    pub fn evictable(mut self, evictable: bool) -> Self {
        self.evictable = evictable;
        self
    }

    /// Restricts it to one device (an index or a UUID) or any.
    pub fn device(mut self, device: DeviceSelector) -> Self {
        self.device = device;
        self
    }

    /// Sets the priority: higher is granted first (waiting raises it too).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets a label shown in `vramctl status` (e.g. the model's name).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Sets the longest wait; past it the request fails with
    /// [`Error::WaitTimeout`]. `Duration::ZERO` means "only if it fits now".
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn to_wire(&self, tag: u64) -> ClientMessage {
        let request = ReserveRequest {
            tag,
            bytes: self.bytes,
            device: self.device.clone(),
            priority: self.priority,
            label: self.label.clone(),
            timeout_ms: self
                .timeout
                .map(|t| t.as_millis().min(u128::from(u64::MAX)) as u64),
            evictable: self.evictable,
        };
        match &self.pids {
            None => ClientMessage::Reserve(request),
            Some(pids) => ClientMessage::ReserveFor {
                request,
                pids: pids.clone(),
            },
        }
    }
}

/// A connection to the daemon. Dropping it closes the connection, which
/// releases every reservation made through it.
#[derive(Debug)]
pub struct Client {
    conn: Arc<Conn>,
}

impl Client {
    /// Connects to the socket named by `VRAMD_SOCKET`, else the default path
    /// (see [`paths::client_socket_path`]).
    pub fn connect_default() -> Result<Client> {
        Self::connect(paths::client_socket_path())
    }

    /// Connects to the daemon listening on `path`. Its reservations
    /// survive a restart of the daemon (see the crate docs).
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Self::connect_with(path, Some(RECONNECT_FOR))
    }

    /// Connects to the daemon listening on `path`; with a `reconnect`
    /// window, as [`Client::connect`] with that window; with `None`, the
    /// client never reconnects and asks for no reclaim tokens, so its
    /// reservations end with its connection, also when the daemon restarts
    /// (for programs that reconnect and reserve again by themselves).
    pub fn connect_with(path: impl AsRef<Path>, reconnect: Option<Duration>) -> Result<Client> {
        Ok(Client {
            conn: Conn::connect(path.as_ref(), reconnect)?,
        })
    }

    /// The socket path this client is connected to.
    pub fn socket_path(&self) -> &Path {
        self.conn.socket_path()
    }

    /// The daemon's program version, from the handshake.
    pub fn daemon_version(&self) -> &str {
        self.conn.daemon_version()
    }

    /// Sets how long the client tries to reach the daemon again after its
    /// connection closed under it ([`RECONNECT_FOR`] by default), reclaiming
    /// what it held; `None`: never (every reservation is then lost with the
    /// connection; a restarted daemon still holds them for its grace period,
    /// unless the client was made by [`Client::connect_with`] with `None`).
    pub fn set_reconnect(&self, window: Option<Duration>) {
        self.conn.set_reconnect(window);
    }

    /// Sends a request and returns at once; the [`Pending`] reports queue
    /// positions and the grant.
    pub fn submit(&self, request: Request) -> Result<Pending> {
        let (tag, slot) = self.conn.register();
        if let Err(e) = self.conn.submit(tag, request.to_wire(tag)) {
            self.conn.unregister(tag);
            return Err(e);
        }
        Ok(Pending {
            conn: self.conn.clone(),
            tag,
            slot,
            position: None,
            id: None,
            finished: false,
        })
    }

    /// Reserves and waits for the grant.
    pub fn reserve(&self, request: Request) -> Result<Reservation> {
        self.submit(request)?.wait()
    }

    /// The daemon's state (devices, reservations, queue, counters).
    pub fn status(&self) -> Result<StatusReport> {
        match self.call(|tag| ClientMessage::Status { tag })? {
            ServerMessage::Status { status, .. } => Ok(*status),
            other => Err(unexpected(other)),
        }
    }

    /// Declares the consumers (apps that load models on their own) this
    /// client fronts, for the daemon's status (`consumers` and
    /// `consumer_errors`); the list replaces the one reported before (an
    /// empty list withdraws them) and lasts as long as the connection (a
    /// client that reconnects reports it again by itself). Each entry is
    /// checked here first ([`ConsumerReport::check`], names unique):
    /// an [`Error::Daemon`] of kind `bad_request` says what is out of bounds. Returns how many
    /// the daemon now lists for this connection.
    pub fn report_consumers(&self, consumers: Vec<ConsumerReport>) -> Result<u32> {
        check_report(&consumers)?;
        match self.call(|tag| ClientMessage::ReportConsumers {
            tag,
            consumers: consumers.clone(),
        })? {
            ServerMessage::ConsumersReported { count, .. } => {
                *util::lock(&self.conn.reported) = Some(consumers);
                Ok(count)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Round trip to the daemon.
    pub fn ping(&self) -> Result<()> {
        match self.call(|tag| ClientMessage::Ping { tag })? {
            ServerMessage::Pong { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn call(&self, make: impl FnOnce(u64) -> ClientMessage) -> Result<ServerMessage> {
        let (tag, slot) = self.conn.register();
        if let Err(e) = self.conn.send(&make(tag)) {
            self.conn.unregister(tag);
            return Err(e);
        }
        match self.conn.next(&slot, None)? {
            Some(ServerMessage::Error { kind, message, .. }) => {
                Err(Error::from_wire(kind, message))
            }
            Some(m) => Ok(m),
            None => Err(Error::Disconnected),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // After fork() the child shares the parent's socket: shutting it down
        // here would end the parent's session, so only the opener closes it.
        if self.conn.owned_by_this_process() {
            self.conn.shutdown();
        }
    }
}

fn unexpected(m: ServerMessage) -> Error {
    Error::Protocol(format!("unexpected reply {m:?}"))
}

/// What happened to a [`Pending`] request.
#[derive(Debug)]
pub enum Progress {
    /// It waits at this position (1 is next).
    Queued {
        /// The id it will have when granted.
        id: ReservationId,
        /// 1-based position in the queue.
        position: u32,
    },
    /// It was granted.
    Granted(Reservation),
}

/// A request on its way: waiting in the queue or about to be granted.
/// Dropping it before the grant cancels it.
#[derive(Debug)]
pub struct Pending {
    conn: Arc<Conn>,
    tag: u64,
    slot: Arc<Slot>,
    position: Option<u32>,
    id: Option<ReservationId>,
    finished: bool,
}

impl Pending {
    /// Last known queue position (`None` until the daemon says it waits).
    pub fn position(&self) -> Option<u32> {
        self.position
    }

    /// Waits for the grant (or a failure).
    pub fn wait(mut self) -> Result<Reservation> {
        loop {
            if let Some(Progress::Granted(r)) = self.next(None)? {
                return Ok(r);
            }
        }
    }

    /// Waits up to `timeout` for the next event; `Ok(None)` if none came.
    /// After `Granted` or an error the request is finished.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<Progress>> {
        if self.finished {
            return Err(Error::Protocol("this request already finished".into()));
        }
        match self.conn.next(&self.slot, timeout) {
            Ok(Some(m)) => self.handle(m).map(Some),
            Ok(None) => Ok(None),
            Err(e) => {
                self.finished = true;
                Err(e)
            }
        }
    }

    /// Waits for the grant from async code, without blocking the executor.
    pub fn granted(mut self) -> impl Future<Output = Result<Reservation>> + Send {
        std::future::poll_fn(move |cx| {
            loop {
                let msg = match self.conn.poll_next(&self.slot, cx) {
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                    std::task::Poll::Ready(Err(e)) => {
                        self.finished = true;
                        return std::task::Poll::Ready(Err(e));
                    }
                    std::task::Poll::Ready(Ok(m)) => m,
                };
                match self.handle(msg) {
                    Ok(Progress::Granted(r)) => return std::task::Poll::Ready(Ok(r)),
                    Ok(Progress::Queued { .. }) => continue,
                    Err(e) => return std::task::Poll::Ready(Err(e)),
                }
            }
        })
    }

    /// Withdraws the request. If the grant raced the cancel, the reservation
    /// is released.
    pub fn cancel(mut self) -> Result<()> {
        self.abandon();
        Ok(())
    }

    fn handle(&mut self, msg: ServerMessage) -> Result<Progress> {
        match msg {
            ServerMessage::Queued { id, position, .. } => {
                self.position = Some(position);
                self.id = Some(id);
                Ok(Progress::Queued { id, position })
            }
            ServerMessage::Granted { grant, .. } => {
                self.finished = true;
                Ok(Progress::Granted(Reservation {
                    evict: self.conn.track(grant.id),
                    conn: self.conn.clone(),
                    id: grant.id,
                    device_index: grant.device,
                    device_uuid: grant.device_uuid,
                    bytes: AtomicU64::new(grant.bytes),
                    released: false,
                }))
            }
            ServerMessage::Error { kind, message, .. } => {
                self.finished = true;
                Err(Error::from_wire(kind, message))
            }
            other => {
                self.finished = true;
                Err(unexpected(other))
            }
        }
    }

    fn abandon(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // In a forked child, touch nothing shared: a lock held by the
        // parent's other threads at fork() would never be released here.
        if !self.conn.owned_by_this_process() {
            return;
        }
        self.conn.unregister(self.tag);
        let _ = self.conn.send(&ClientMessage::Cancel { tag: self.tag });
        // A grant that arrived before we unregistered is ours to give back.
        for m in self.slot.drain() {
            if let ServerMessage::Granted { grant, .. } = m {
                let _ = self.conn.send(&ClientMessage::Release {
                    tag: self.conn.untracked_tag(),
                    id: grant.id,
                });
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// A granted reservation. It is released when dropped, when
/// [`Reservation::release`] is called, or when its client's connection
/// closes.
#[derive(Debug)]
#[must_use = "a reservation is released as soon as it is dropped"]
pub struct Reservation {
    conn: Arc<Conn>,
    evict: Arc<EvictState>,
    id: ReservationId,
    device_index: u32,
    device_uuid: String,
    bytes: AtomicU64,
    released: bool,
}

impl Reservation {
    /// Its id (as shown by `vramctl status`).
    pub fn id(&self) -> ReservationId {
        self.id
    }

    /// Index of the device it is on (as `nvidia-smi` numbers devices).
    pub fn device_index(&self) -> u32 {
        self.device_index
    }

    /// UUID of the device it is on.
    pub fn device_uuid(&self) -> &str {
        &self.device_uuid
    }

    /// Bytes reserved (as last granted or resized).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Changes its size. Shrinking always succeeds; growing succeeds only if
    /// the device has the room now — room its processes already use costs
    /// nothing, so a model that proved larger than reserved can grow to its
    /// real usage at once — else it fails with [`Error::WaitTimeout`] and
    /// keeps its size. It never waits.
    pub fn resize(&self, bytes: u64) -> Result<()> {
        let (tag, slot) = self.conn.register();
        if let Err(e) = self.conn.send(&ClientMessage::Resize {
            tag,
            id: self.id,
            bytes,
        }) {
            self.conn.unregister(tag);
            return Err(e);
        }
        self.resized(self.conn.next(&slot, None)?)
    }

    /// [`Reservation::resize`] from async code, without blocking the
    /// executor (feature `tokio`).
    #[cfg(feature = "tokio")]
    pub async fn resize_async(&self, bytes: u64) -> Result<()> {
        let (tag, slot) = self.conn.register();
        if let Err(e) = self.conn.send(&ClientMessage::Resize {
            tag,
            id: self.id,
            bytes,
        }) {
            self.conn.unregister(tag);
            return Err(e);
        }
        let msg = std::future::poll_fn(|cx| self.conn.poll_next(&slot, cx)).await?;
        self.resized(Some(msg))
    }

    fn resized(&self, msg: Option<ServerMessage>) -> Result<()> {
        match msg {
            Some(ServerMessage::Resized { bytes, .. }) => {
                self.bytes.store(bytes, Ordering::Relaxed);
                Ok(())
            }
            Some(ServerMessage::Error { kind, message, .. }) => {
                Err(Error::from_wire(kind, message))
            }
            Some(other) => Err(unexpected(other)),
            None => Err(Error::Disconnected),
        }
    }

    /// Declares that this reservation's processes run under a hard limit of
    /// `limit_bytes` that the caller set up (`mechanism`: `"mps"` for an
    /// NVIDIA MPS pinned-memory limit, as `vramctl run --enforce` does);
    /// status then lists it as enforced. The daemon records it, it does not
    /// check it.
    pub fn set_enforced(&self, limit_bytes: u64, mechanism: &str) -> Result<()> {
        let (tag, slot) = self.conn.register();
        if let Err(e) = self.conn.send(&ClientMessage::SetEnforced {
            tag,
            id: self.id,
            limit_bytes,
            mechanism: mechanism.to_string(),
        }) {
            self.conn.unregister(tag);
            return Err(e);
        }
        match self.conn.next(&slot, None)? {
            Some(ServerMessage::EnforcedSet { .. }) => Ok(()),
            Some(ServerMessage::Error { kind, message, .. }) => {
                Err(Error::from_wire(kind, message))
            }
            Some(other) => Err(unexpected(other)),
            None => Err(Error::Disconnected),
        }
    }

    /// Marks it idle (its model is kept warm and may be unloaded when a
    /// waiter needs the room) or busy (never evicted). Mark it busy while
    /// the model is in use.
    pub fn set_idle(&self, idle: bool) -> Result<()> {
        let (tag, slot) = self.conn.register();
        if let Err(e) = self.conn.send(&ClientMessage::SetIdle {
            tag,
            id: self.id,
            idle,
        }) {
            self.conn.unregister(tag);
            return Err(e);
        }
        match self.conn.next(&slot, None)? {
            Some(ServerMessage::IdleSet { .. }) => Ok(()),
            Some(ServerMessage::Error { kind, message, .. }) => {
                Err(Error::from_wire(kind, message))
            }
            Some(other) => Err(unexpected(other)),
            None => Err(Error::Disconnected),
        }
    }

    /// Sets the callback run when the daemon asks to evict this (idle)
    /// reservation: it should unload the model; the reservation is released
    /// when it returns. It runs on an SDK thread. Without a callback, an
    /// evicted reservation is released at once.
    pub fn on_evict(&self, f: impl FnOnce(&Eviction) + Send + 'static) {
        self.evict.set_handler(Box::new(f));
    }

    /// Whether the daemon evicted it (it is released).
    pub fn is_evicted(&self) -> bool {
        self.evict.evicted()
    }

    /// Why it was lost, if it was: the connection to the daemon closed and
    /// it could not be reclaimed (the daemon did not come back within the
    /// reconnect window, or refused it). A lost reservation no longer
    /// holds any memory.
    pub fn is_lost(&self) -> Option<String> {
        self.evict.lost()
    }

    /// Sets the callback run (on an SDK thread, with why) when it is lost;
    /// at once, on this thread, if it already is.
    pub fn on_lost(&self, f: impl FnOnce(&str) + Send + 'static) {
        self.evict.set_lost_handler(Box::new(f));
    }

    /// Declares more processes whose GPU usage counts against this
    /// reservation (e.g. worker processes this program started; descendants
    /// of the client count already). The daemon accepts only processes of the
    /// caller's user, unless the caller is root. Returns every pid the
    /// reservation now speaks for.
    pub fn attach_pids(&self, pids: &[u32]) -> Result<Vec<u32>> {
        let (tag, slot) = self.conn.register();
        if let Err(e) = self.conn.send(&ClientMessage::AttachPids {
            tag,
            id: self.id,
            pids: pids.to_vec(),
        }) {
            self.conn.unregister(tag);
            return Err(e);
        }
        match self.conn.next(&slot, None)? {
            Some(ServerMessage::Attached { pids, .. }) => Ok(pids),
            Some(ServerMessage::Error { kind, message, .. }) => {
                Err(Error::from_wire(kind, message))
            }
            Some(other) => Err(unexpected(other)),
            None => Err(Error::Disconnected),
        }
    }

    /// Releases it and waits for the daemon to confirm. If the connection is
    /// already gone, it was released then, and this returns `Ok`.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        if !self.conn.owned_by_this_process() {
            return Ok(());
        }
        self.conn.untrack(self.id);
        if self.evict.evicted() {
            return Ok(());
        }
        let (tag, slot) = self.conn.register();
        match self.conn.send(&ClientMessage::Release { tag, id: self.id }) {
            Ok(()) => {}
            Err(Error::Disconnected) => return Ok(()),
            Err(e) => {
                self.conn.unregister(tag);
                return Err(e);
            }
        }
        match self.conn.next(&slot, None) {
            Ok(Some(ServerMessage::Released { .. })) | Err(Error::Disconnected) => Ok(()),
            // The eviction thread's release got there first: it is released.
            Ok(Some(ServerMessage::Error {
                kind: ErrorKind::NotFound,
                ..
            })) if self.evict.asked() => Ok(()),
            Ok(Some(ServerMessage::Error { kind, message, .. })) => {
                Err(Error::from_wire(kind, message))
            }
            Ok(Some(other)) => Err(unexpected(other)),
            Ok(None) => Err(Error::Disconnected),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // A forked child never releases its parent's reservations.
        if !self.released && self.conn.owned_by_this_process() && !self.evict.evicted() {
            self.conn.untrack(self.id);
            let _ = self.conn.send(&ClientMessage::Release {
                tag: self.conn.untracked_tag(),
                id: self.id,
            });
        }
    }
}

/// The async client (feature `tokio`): the same operations as [`Client`],
/// awaiting instead of blocking.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncClient {
    inner: Client,
}

#[cfg(feature = "tokio")]
impl AsyncClient {
    /// Connects to the default socket (see [`Client::connect_default`]).
    pub async fn connect_default() -> Result<AsyncClient> {
        Self::connect(paths::client_socket_path()).await
    }

    /// Connects to the daemon listening on `path`.
    pub async fn connect(path: impl Into<PathBuf>) -> Result<AsyncClient> {
        Self::connect_with(path, Some(RECONNECT_FOR)).await
    }

    /// Connects to the daemon listening on `path`, reconnecting as
    /// [`Client::connect_with`] says.
    pub async fn connect_with(
        path: impl Into<PathBuf>,
        reconnect: Option<Duration>,
    ) -> Result<AsyncClient> {
        let path = path.into();
        let inner = tokio::task::spawn_blocking(move || Client::connect_with(path, reconnect))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        Ok(AsyncClient { inner })
    }

    /// The blocking client underneath (for `submit` and friends).
    pub fn blocking(&self) -> &Client {
        &self.inner
    }

    /// Reserves and awaits the grant. Dropping the future before the grant
    /// cancels the request.
    pub async fn reserve(&self, request: Request) -> Result<Reservation> {
        self.inner.submit(request)?.granted().await
    }

    /// As [`Client::report_consumers`], without blocking the executor.
    pub async fn report_consumers(&self, consumers: Vec<ConsumerReport>) -> Result<u32> {
        check_report(&consumers)?;
        let (tag, slot) = self.inner.conn.register();
        self.inner.conn.send(&ClientMessage::ReportConsumers {
            tag,
            consumers: consumers.clone(),
        })?;
        match std::future::poll_fn(|cx| self.inner.conn.poll_next(&slot, cx)).await? {
            ServerMessage::ConsumersReported { count, .. } => {
                *util::lock(&self.inner.conn.reported) = Some(consumers);
                Ok(count)
            }
            ServerMessage::Error { kind, message, .. } => Err(Error::from_wire(kind, message)),
            other => Err(unexpected(other)),
        }
    }

    /// The daemon's state.
    pub async fn status(&self) -> Result<StatusReport> {
        let (tag, slot) = self.inner.conn.register();
        self.inner.conn.send(&ClientMessage::Status { tag })?;
        match std::future::poll_fn(|cx| self.inner.conn.poll_next(&slot, cx)).await? {
            ServerMessage::Status { status, .. } => Ok(*status),
            ServerMessage::Error { kind, message, .. } => Err(Error::from_wire(kind, message)),
            other => Err(unexpected(other)),
        }
    }
}

/// Checks a `report_consumers` list before it is sent: what the daemon
/// would refuse as `bad_request`, said without a round trip.
fn check_report(consumers: &[ConsumerReport]) -> Result<()> {
    let bad = |message: String| Error::Daemon {
        kind: ErrorKind::BadRequest,
        message: format!("report_consumers: {message}"),
    };
    if consumers.len() > vramd_protocol::MAX_REPORTED_CONSUMERS {
        return Err(bad(format!(
            "{} consumers, over the limit of {} in one report",
            consumers.len(),
            vramd_protocol::MAX_REPORTED_CONSUMERS
        )));
    }
    for (i, c) in consumers.iter().enumerate() {
        c.check().map_err(bad)?;
        if consumers[..i].iter().any(|o| o.name == c.name) {
            return Err(bad(format!("consumer {:?} is listed twice", c.name)));
        }
    }
    Ok(())
}
