//! One connection to the daemon and its reader thread.
//!
//! Requests are written from the caller's thread under a mutex; a reader
//! thread decodes everything the daemon sends and routes it by tag to a
//! [`Slot`], where a blocking caller waits on a condition variable and an
//! async caller on a waker. When the socket closes, every slot learns it.
//!
//! A grant that arrives for a request nobody waits for any more (cancelled or
//! dropped while the grant was in flight) is released at once, so a race can
//! never leak a reservation.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{
    ClientMessage, Decoder, Encoding, PROTOCOL_VERSION, ReservationId, ServerMessage, encode,
};

use crate::error::{Error, Result};

/// How long `connect` waits for the daemon's welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; go on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where replies to one request are delivered.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    events: VecDeque<ServerMessage>,
    closed: bool,
    waker: Option<Waker>,
}

impl Slot {
    fn push(&self, msg: ServerMessage) {
        let mut st = lock(&self.state);
        st.events.push_back(msg);
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        self.cv.notify_all();
    }

    fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        self.cv.notify_all();
    }

    /// Next event, waiting up to `timeout` (`None`: as long as it takes).
    /// `Ok(None)`: nothing arrived in time. `Err(Disconnected)`: the
    /// connection closed and nothing is left.
    pub(crate) fn next(&self, timeout: Option<Duration>) -> Result<Option<ServerMessage>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.state);
        loop {
            if let Some(m) = st.events.pop_front() {
                return Ok(Some(m));
            }
            if st.closed {
                return Err(Error::Disconnected);
            }
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    st = self
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Polls for the next event from async code.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Result<ServerMessage>> {
        let mut st = lock(&self.state);
        if let Some(m) = st.events.pop_front() {
            return Poll::Ready(Ok(m));
        }
        if st.closed {
            return Poll::Ready(Err(Error::Disconnected));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Takes whatever is queued without waiting.
    pub(crate) fn drain(&self) -> Vec<ServerMessage> {
        lock(&self.state).events.drain(..).collect()
    }
}

/// An eviction request from the daemon, as the holder's callback sees it.
#[derive(Debug, Clone)]
pub struct Eviction {
    /// The reservation to give back.
    pub id: ReservationId,
    /// Time the holder has to unload before the daemon tries someone else.
    pub deadline: Duration,
    /// Who needs the room.
    pub reason: String,
}

/// Callback run when the daemon asks a holder to unload.
pub(crate) type EvictHandler = Box<dyn FnOnce(&Eviction) + Send>;

/// Per-reservation eviction state shared by the guard and the reader.
#[derive(Default)]
pub(crate) struct EvictState {
    handler: Mutex<Option<EvictHandler>>,
    /// The daemon asked to evict it (the SDK will release it).
    asked: AtomicBool,
    evicted: AtomicBool,
}

impl std::fmt::Debug for EvictState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvictState")
            .field("evicted", &self.evicted.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl EvictState {
    pub(crate) fn set_handler(&self, h: EvictHandler) {
        *lock(&self.handler) = Some(h);
    }

    /// Whether the reservation was given back on the daemon's request.
    pub(crate) fn evicted(&self) -> bool {
        self.evicted.load(Ordering::SeqCst)
    }

    /// Whether the daemon asked to evict it.
    pub(crate) fn asked(&self) -> bool {
        self.asked.load(Ordering::SeqCst)
    }
}

/// A live session with the daemon.
#[derive(Debug)]
pub(crate) struct Conn {
    writer: Mutex<UnixStream>,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    evictions: Mutex<HashMap<ReservationId, Arc<EvictState>>>,
    closed: AtomicBool,
    next_tag: AtomicU64,
    socket_path: PathBuf,
    daemon_version: String,
    pid: u32,
}

impl Conn {
    /// Connects, says hello, and starts the reader thread.
    pub(crate) fn connect(path: &Path) -> Result<Arc<Conn>> {
        let not_running = |source| Error::NotRunning {
            path: path.to_path_buf(),
            source,
        };
        let mut stream = UnixStream::connect(path).map_err(not_running)?;
        let hello = ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            client: format!(
                "vramd-client/{} pid {}",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ),
        };
        stream.write_all(
            &encode(Encoding::Binary, &hello).map_err(|e| Error::Protocol(e.to_string()))?,
        )?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut decoder = Decoder::new(Encoding::Binary);
        let mut buf = ReadBuffer::new();
        let welcome = match read_message(&mut stream, &mut decoder, &mut buf) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Error::Disconnected),
            Err(Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Protocol(format!(
                    "{} did not answer the handshake within {:?}; is it a vramd socket?",
                    path.display(),
                    HANDSHAKE_TIMEOUT
                )));
            }
            Err(e) => return Err(e),
        };
        let daemon_version = match welcome {
            ServerMessage::Welcome { daemon, .. } => daemon,
            ServerMessage::Error { kind, message, .. } => {
                return Err(Error::from_wire(kind, message));
            }
            other => return Err(Error::Protocol(format!("expected welcome, got {other:?}"))),
        };
        stream.set_read_timeout(None)?;
        let reader_stream = stream.try_clone()?;
        let conn = Arc::new(Conn {
            writer: Mutex::new(stream),
            slots: Mutex::new(HashMap::new()),
            evictions: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            next_tag: AtomicU64::new(1),
            socket_path: path.to_path_buf(),
            daemon_version,
            pid: std::process::id(),
        });
        let reader_conn = conn.clone();
        std::thread::Builder::new()
            .name("vramd-client-reader".into())
            .spawn(move || reader_conn.read_loop(reader_stream, decoder, buf))?;
        Ok(conn)
    }

    pub(crate) fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub(crate) fn daemon_version(&self) -> &str {
        &self.daemon_version
    }

    /// Whether this process is the one that opened the connection (false in
    /// a child after `fork()`).
    pub(crate) fn owned_by_this_process(&self) -> bool {
        self.pid == std::process::id()
    }

    /// A fresh tag with a slot registered for its replies.
    pub(crate) fn register(&self) -> (u64, Arc<Slot>) {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        if self.closed.load(Ordering::SeqCst) {
            slot.close();
        } else {
            lock(&self.slots).insert(tag, slot.clone());
        }
        (tag, slot)
    }

    /// Registers a granted reservation for eviction requests.
    pub(crate) fn track(&self, id: ReservationId) -> Arc<EvictState> {
        let st = Arc::new(EvictState::default());
        lock(&self.evictions).insert(id, st.clone());
        st
    }

    /// Stops tracking a reservation that ended.
    pub(crate) fn untrack(&self, id: ReservationId) {
        lock(&self.evictions).remove(&id);
    }

    /// Stops routing replies for `tag`.
    pub(crate) fn unregister(&self, tag: u64) {
        lock(&self.slots).remove(&tag);
    }

    /// A tag nobody waits on (for fire-and-forget messages).
    pub(crate) fn untracked_tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn send(&self, msg: &ClientMessage) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Disconnected);
        }
        let bytes = encode(Encoding::Binary, msg).map_err(|e| Error::Protocol(e.to_string()))?;
        lock(&self.writer).write_all(&bytes).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                Error::Disconnected
            } else {
                Error::Io(e)
            }
        })
    }

    /// Closes the socket; the daemon releases everything this connection held.
    pub(crate) fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }

    fn read_loop(
        self: Arc<Self>,
        mut stream: UnixStream,
        mut decoder: Decoder,
        mut buf: ReadBuffer,
    ) {
        while let Ok(Some(msg)) = read_message(&mut stream, &mut decoder, &mut buf) {
            self.route(msg);
        }
        self.closed.store(true, Ordering::SeqCst);
        let slots: Vec<Arc<Slot>> = lock(&self.slots).drain().map(|(_, s)| s).collect();
        for s in slots {
            s.close();
        }
    }

    /// Runs the holder's callback (on its own thread, so the reader keeps
    /// reading), then releases the reservation.
    fn evict(self: &Arc<Self>, eviction: Eviction) {
        let Some(st) = lock(&self.evictions).remove(&eviction.id) else {
            return; // already released
        };
        st.asked.store(true, Ordering::SeqCst);
        let conn = self.clone();
        let id = eviction.id;
        let run = move || {
            // Take the handler out first: the lock must not be held while it runs.
            let handler = lock(&st.handler).take();
            if let Some(handler) = handler {
                // A panicking callback must not keep the memory.
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&eviction)));
            }
            st.evicted.store(true, Ordering::SeqCst);
            let _ = conn.send(&ClientMessage::Release {
                tag: conn.untracked_tag(),
                id: eviction.id,
            });
        };
        if std::thread::Builder::new()
            .name("vramd-client-evict".into())
            .spawn(run)
            .is_err()
        {
            // No thread: release at once rather than hold the memory.
            let _ = self.send(&ClientMessage::Release {
                tag: self.untracked_tag(),
                id,
            });
        }
    }

    fn route(self: &Arc<Self>, msg: ServerMessage) {
        let (tag, terminal) = match &msg {
            ServerMessage::Welcome { .. } => return,
            ServerMessage::Evict {
                id,
                deadline_ms,
                reason,
            } => {
                self.evict(Eviction {
                    id: *id,
                    deadline: Duration::from_millis(*deadline_ms),
                    reason: reason.clone(),
                });
                return;
            }
            ServerMessage::Queued { tag, .. } => (*tag, false),
            ServerMessage::Granted { tag, .. }
            | ServerMessage::Released { tag, .. }
            | ServerMessage::Cancelled { tag, .. }
            | ServerMessage::Status { tag, .. }
            | ServerMessage::Pong { tag }
            | ServerMessage::Error { tag, .. }
            | ServerMessage::Attached { tag, .. }
            | ServerMessage::IdleSet { tag, .. } => (*tag, true),
        };
        let slot = {
            let mut slots = lock(&self.slots);
            if terminal {
                slots.remove(&tag)
            } else {
                slots.get(&tag).cloned()
            }
        };
        match (slot, msg) {
            (Some(slot), msg) => slot.push(msg),
            (None, ServerMessage::Granted { grant, .. }) => {
                // Nobody waits for this grant any more: give it back.
                let _ = self.send(&ClientMessage::Release {
                    tag: self.untracked_tag(),
                    id: grant.id,
                });
            }
            (None, _) => {}
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Only the process that opened the session ends it (after fork() the
        // child shares the socket).
        if self.owned_by_this_process() {
            let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Reads one message, blocking; `Ok(None)` at end of stream.
fn read_message(
    stream: &mut UnixStream,
    decoder: &mut Decoder,
    buf: &mut ReadBuffer,
) -> Result<Option<ServerMessage>> {
    let mut scratch = [0u8; 8 * 1024];
    loop {
        match decoder.decode::<ServerMessage>(buf) {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) => {}
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
        let n = stream.read(&mut scratch)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend(&scratch[..n]);
    }
}
