//! One connection to the daemon: who reads its socket, and where replies go.
//!
//! Requests are written from the caller's thread under a mutex. Everything
//! the daemon sends is decoded and routed by tag to a [`Slot`], where a
//! blocking caller waits on a condition variable and an async caller on a
//! waker. When the socket closes, every slot learns it.
//!
//! # Who reads
//! One reader at a time, either
//! - a **blocking caller** waiting for its own answer: if nobody else is
//!   reading, it becomes the *leader* and reads the socket itself, routing
//!   whatever comes (its own answer, others' answers, eviction requests)
//!   until its answer is there. The answer then wakes the caller directly,
//!   with no hand-off between threads: that hand-off was about a fifth of a
//!   request's round trip (docs/benchmarks.md); or
//! - the **background thread**, whenever no caller leads: it waits for the
//!   socket to be readable (`poll`, without holding anything), then reads
//!   what is there without blocking. It serves async callers, callers that
//!   found a reader busy, and unsolicited messages (eviction requests) while
//!   the program does something else.
//!
//! While a caller leads, and for up to [`LINGER`] after it left, the
//! background thread stays away from the socket unless someone else waits
//! (a caller that found the reader busy, an async caller): a caller in a
//! loop comes back within microseconds and leads again, and a background
//! thread woken by every answer would cost the caller's CPU. Unsolicited
//! messages (eviction requests) that arrive just as a leader leaves are
//! therefore read up to [`LINGER`] late — eviction deadlines are seconds.
//!
//! A grant that arrives for a request nobody waits for any more (cancelled or
//! dropped while the grant was in flight) is released at once, so a race can
//! never leak a reservation.
//!
//! # Reconnecting
//! Every session asks for reclaim tokens (`EnableReclaim`) and keeps the
//! token of each reservation it holds. When the socket closes without this
//! side closing it (the daemon stopped or restarted), the background thread
//! connects again, for up to the reconnect window ([`RECONNECT_FOR`] unless
//! set), and on the new session reclaims every reservation still held
//! (`Reclaim` with its token) and submits again every request still waiting
//! (same tag; the daemon queues it anew). Meanwhile waiting callers keep
//! waiting; other calls in flight fail with `Disconnected`. A reservation
//! whose reclaim is refused, or every one when the window passes, is *lost*:
//! [`EvictState::lost`] is set and its `on_lost` callback runs.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{
    ClientMessage, Decoder, Encoding, PROTOCOL_VERSION, ReservationId, ServerMessage, encode,
};

use crate::error::{Error, Result};
use crate::util::{lock, poll_readable};

/// How long `connect` waits for the daemon's welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the background thread leaves the socket to callers after a
/// leader left, when nobody else waits (see the module docs); also how often
/// it looks while a caller leads.
pub(crate) const LINGER: Duration = Duration::from_millis(50);

/// How long a client tries to reach the daemon again after its connection
/// was lost, unless set otherwise.
pub const RECONNECT_FOR: Duration = Duration::from_secs(60);

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
    /// Threads blocked on `cv`. A leader reading its own answer is not one
    /// of them, and notifying nobody would still cost a syscall.
    sleepers: u32,
}

impl Slot {
    fn push(&self, msg: ServerMessage) {
        let mut st = lock(&self.state);
        st.events.push_back(msg);
        self.wake(&mut st);
    }

    fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        self.wake(&mut st);
    }

    /// Wakes whoever waits: the async caller's waker, blocked threads.
    fn wake(&self, st: &mut SlotState) {
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        if st.sleepers > 0 {
            self.cv.notify_all();
        }
    }

    /// The next event if one is there. `Err(Disconnected)`: the connection
    /// closed and nothing is left.
    fn try_take(&self) -> Result<Option<ServerMessage>> {
        let mut st = lock(&self.state);
        match st.events.pop_front() {
            Some(m) => Ok(Some(m)),
            None if st.closed => Err(Error::Disconnected),
            None => Ok(None),
        }
    }

    /// Whether an async caller waits on it.
    fn has_waker(&self) -> bool {
        lock(&self.state).waker.is_some()
    }

    /// Next event, waiting up to `deadline` (`None`: as long as it takes)
    /// for someone else to route it. `Ok(None)`: nothing arrived in time.
    /// `Err(Disconnected)`: the connection closed and nothing is left.
    fn wait(&self, deadline: Option<Instant>) -> Result<Option<ServerMessage>> {
        let mut st = lock(&self.state);
        loop {
            if let Some(m) = st.events.pop_front() {
                return Ok(Some(m));
            }
            if st.closed {
                return Err(Error::Disconnected);
            }
            st.sleepers += 1;
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        st.sleepers -= 1;
                        return Ok(None);
                    }
                    st = self
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            st.sleepers -= 1;
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

/// Callback run when a reservation is lost (with why).
pub(crate) type LostHandler = Box<dyn FnOnce(&str) + Send>;

/// Per-reservation eviction state shared by the guard and the reader.
#[derive(Default)]
pub(crate) struct EvictState {
    handler: Mutex<Option<EvictHandler>>,
    /// The daemon asked to evict it (the SDK will release it).
    asked: AtomicBool,
    evicted: AtomicBool,
    /// The connection was lost and the reservation could not be reclaimed.
    lost: Mutex<Option<String>>,
    lost_handler: Mutex<Option<LostHandler>>,
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

    /// Why it was lost, if it was.
    pub(crate) fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    /// Sets the callback run when it is lost (at once if it already is).
    pub(crate) fn set_lost_handler(&self, h: LostHandler) {
        let why = lock(&self.lost).clone();
        match why {
            Some(why) => h(&why),
            None => *lock(&self.lost_handler) = Some(h),
        }
    }

    /// Marks it lost and runs its callback (on its own thread).
    fn mark_lost(&self, why: &str) {
        {
            let mut lost = lock(&self.lost);
            if lost.is_some() {
                return;
            }
            *lost = Some(why.to_string());
        }
        if let Some(h) = lock(&self.lost_handler).take() {
            let why = why.to_string();
            let _ = std::thread::Builder::new()
                .name("vramd-client-lost".into())
                .spawn(move || {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(&why)));
                });
        }
    }
}

/// The reading end of the socket, with what was read but not yet decoded.
/// Only the current reader (a leader or the background thread) touches it.
#[derive(Debug)]
struct ReadSide {
    stream: UnixStream,
    decoder: Decoder,
    buf: ReadBuffer,
}

/// Who reads the socket now (see the module docs).
#[derive(Debug, Default)]
struct Readers {
    /// A blocking caller reads.
    leading: bool,
    /// The background thread reads (it has seen the socket readable).
    background: bool,
    /// Blocking callers waiting on their slot for someone else to read.
    waiting: usize,
    /// When the last leader left, while the background thread lingers.
    lead_ended: Option<Instant>,
    /// The session is over: the background thread ends.
    closed: bool,
    /// The socket closed; the background thread connects again. Nobody
    /// leads meanwhile.
    reconnecting: bool,
}

/// A live session with the daemon.
#[derive(Debug)]
pub(crate) struct Conn {
    writer: Mutex<UnixStream>,
    reader: Mutex<ReadSide>,
    /// The reading end's descriptor, to `poll` it without taking `reader`
    /// (it changes when the client reconnects).
    read_fd: AtomicI32,
    readers: Mutex<Readers>,
    /// The background thread waits here while a caller leads or it lingers.
    readers_cv: Condvar,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    evictions: Mutex<HashMap<ReservationId, Arc<EvictState>>>,
    closed: AtomicBool,
    next_tag: AtomicU64,
    socket_path: PathBuf,
    daemon_version: String,
    pid: u32,
    /// Reclaim tokens of the reservations held, by id.
    tokens: Mutex<HashMap<ReservationId, String>>,
    /// Requests waiting for their grant, by tag: submitted again after a
    /// reconnect.
    requests: Mutex<HashMap<u64, ClientMessage>>,
    /// Reclaims in flight after a reconnect, by tag.
    reclaims: Mutex<HashMap<u64, ReservationId>>,
    /// How long to try to reconnect after the connection is lost (`None`:
    /// never).
    reconnect_for: Mutex<Option<Duration>>,
    /// The consumers last reported (`ReportConsumers`): reported again
    /// after a reconnect.
    pub(crate) reported: Mutex<Option<Vec<vramd_protocol::ConsumerReport>>>,
}

impl Conn {
    /// Connects, says hello, and starts the background reader thread.
    /// With a `reconnect` window, asks for reclaim tokens, and reconnects
    /// (reclaiming) within it when the connection is lost; without, the
    /// session ends with the connection.
    pub(crate) fn connect(path: &Path, reconnect: Option<Duration>) -> Result<Arc<Conn>> {
        let (stream, decoder, buf, daemon_version) = Self::handshake(path)?;
        let reader_stream = stream.try_clone()?;
        let conn = Arc::new(Conn {
            writer: Mutex::new(stream),
            read_fd: AtomicI32::new(reader_stream.as_raw_fd()),
            reader: Mutex::new(ReadSide {
                stream: reader_stream,
                decoder,
                buf,
            }),
            readers: Mutex::new(Readers::default()),
            readers_cv: Condvar::new(),
            slots: Mutex::new(HashMap::new()),
            evictions: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            next_tag: AtomicU64::new(1),
            socket_path: path.to_path_buf(),
            daemon_version,
            pid: std::process::id(),
            tokens: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            reclaims: Mutex::new(HashMap::new()),
            reconnect_for: Mutex::new(reconnect),
            reported: Mutex::new(None),
        });
        // Tokens for every grant, so that a restart of the daemon loses
        // nothing (the answers are routed like any other).
        if reconnect.is_some() {
            conn.send(&ClientMessage::EnableReclaim {
                tag: conn.untracked_tag(),
            })?;
        }
        let reader_conn = conn.clone();
        std::thread::Builder::new()
            .name("vramd-client-reader".into())
            .spawn(move || reader_conn.background())?;
        Ok(conn)
    }

    /// Connects and says hello: the stream, its decoder and what was read
    /// past the welcome, and the daemon's version.
    fn handshake(path: &Path) -> Result<(UnixStream, Decoder, ReadBuffer, String)> {
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
        Ok((stream, decoder, buf, daemon_version))
    }

    /// Sets how long to try to reconnect after the connection is lost
    /// (`None`: never; every reservation is then lost with the connection).
    pub(crate) fn set_reconnect(&self, window: Option<Duration>) {
        *lock(&self.reconnect_for) = window;
    }

    /// Sends a reservation request, remembered until it is answered so that
    /// it is submitted again after a reconnect. While the client reconnects
    /// it is only remembered.
    pub(crate) fn submit(&self, tag: u64, msg: ClientMessage) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Disconnected);
        }
        if !self.owned_by_this_process() {
            return Err(forked());
        }
        let bytes = encode(Encoding::Binary, &msg).map_err(|e| Error::Protocol(e.to_string()))?;
        // Under the writer's lock, as a reconnect sends the remembered ones:
        // a request is sent on the old session or on the new one, not twice.
        let mut writer = lock(&self.writer);
        lock(&self.requests).insert(tag, msg);
        match writer.write_all(&bytes) {
            Ok(()) => Ok(()),
            Err(_) if lock(&self.readers).reconnecting || self.reconnect_window().is_some() => {
                // The session is lost; the reconnect submits it again.
                Ok(())
            }
            Err(e) => {
                lock(&self.requests).remove(&tag);
                Err(Error::Io(e))
            }
        }
    }

    fn reconnect_window(&self) -> Option<Duration> {
        *lock(&self.reconnect_for)
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
        // Under the slots lock, as `close_all` sets `closed`: a slot is
        // either closed here or drained there, never missed.
        let mut slots = lock(&self.slots);
        if self.closed.load(Ordering::SeqCst) {
            slot.close();
        } else {
            slots.insert(tag, slot.clone());
        }
        (tag, slot)
    }

    /// Registers a granted reservation for eviction requests.
    pub(crate) fn track(&self, id: ReservationId) -> Arc<EvictState> {
        let st = Arc::new(EvictState::default());
        lock(&self.evictions).insert(id, st.clone());
        st
    }

    /// Stops tracking a reservation that ended. Its token stays until the
    /// daemon confirms the release: one released while the daemon was away
    /// is reclaimed after the reconnect, and released at once.
    pub(crate) fn untrack(&self, id: ReservationId) {
        lock(&self.evictions).remove(&id);
    }

    /// Stops routing replies for `tag` (and forgets its request).
    pub(crate) fn unregister(&self, tag: u64) {
        lock(&self.slots).remove(&tag);
        lock(&self.requests).remove(&tag);
    }

    /// A tag nobody waits on (for fire-and-forget messages).
    pub(crate) fn untracked_tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn send(&self, msg: &ClientMessage) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Disconnected);
        }
        if !self.owned_by_this_process() {
            return Err(forked());
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

    /// The next event for `slot`, waiting up to `timeout` (`None`: as long
    /// as it takes), reading the socket itself when nobody else does.
    /// `Ok(None)`: nothing arrived in time. `Err(Disconnected)`: the
    /// connection closed and nothing is left.
    pub(crate) fn next(
        self: &Arc<Self>,
        slot: &Slot,
        timeout: Option<Duration>,
    ) -> Result<Option<ServerMessage>> {
        if !self.owned_by_this_process() {
            return Err(forked());
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(m) = slot.try_take()? {
                return Ok(Some(m));
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(Error::Disconnected);
            }
            let lead = {
                let mut r = lock(&self.readers);
                if !r.leading && !r.background && !r.closed && !r.reconnecting {
                    r.leading = true;
                    true
                } else {
                    r.waiting += 1;
                    false
                }
            };
            if lead {
                let outcome = self.lead(slot, deadline);
                let mut r = lock(&self.readers);
                r.leading = false;
                if r.waiting > 0 || self.async_waiting() {
                    // Someone else needs a reader now.
                    r.lead_ended = None;
                    self.readers_cv.notify_all();
                } else {
                    // Probably back soon: no need to wake the background
                    // thread (it looks again within LINGER).
                    r.lead_ended = Some(Instant::now());
                }
                drop(r);
                match outcome {
                    Lead::Answered(m) => return Ok(Some(m)),
                    Lead::TimedOut => return Ok(None),
                    Lead::Closed => return slot.try_take()?.map(Some).ok_or(Error::Disconnected),
                    // The background thread reconnects; wait for it.
                    Lead::Lost => continue,
                }
            }
            // The current reader routes our answer; the background thread
            // must not linger meanwhile.
            self.readers_cv.notify_all();
            let got = slot.wait(deadline);
            lock(&self.readers).waiting -= 1;
            match got {
                Ok(Some(m)) => return Ok(Some(m)),
                Err(e) => return Err(e),
                Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(None),
                // Woken without an answer (spurious): try to lead.
                Ok(None) => {}
            }
        }
    }

    /// Reads and routes as the leader until `slot` has an event, the
    /// deadline passes or the session ends.
    fn lead(self: &Arc<Self>, slot: &Slot, deadline: Option<Instant>) -> Lead {
        let mut side = lock(&self.reader);
        loop {
            match slot.try_take() {
                Ok(Some(m)) => return Lead::Answered(m),
                Ok(None) => {}
                Err(_) => return Lead::Closed,
            }
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            // Wait in `poll` for readability, then read without blocking —
            // also when the time is up: a caller polling with a zero timeout
            // still reads what has arrived (it is the only reader while it
            // leads). Not a blocking `recv`: a thread blocked there sleeps on
            // the socket's one wait queue, which the daemon wakes when it
            // consumes our request (that frees write space), so every request
            // would cost us a wake-up for nothing and the daemon a cross-CPU
            // wake. `poll` asks to be woken for readability only.
            if poll_readable(self.read_fd.load(Ordering::SeqCst), wait) {
                if self.read_and_route(&mut side, true).is_err() {
                    drop(side);
                    return if self.session_lost() {
                        Lead::Lost
                    } else {
                        Lead::Closed
                    };
                }
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                return match slot.try_take() {
                    Ok(Some(m)) => Lead::Answered(m),
                    Ok(None) => Lead::TimedOut,
                    Err(_) => Lead::Closed,
                };
            }
        }
    }

    /// One read from the socket (without blocking if `nonblocking`); routes
    /// every complete message. `Err` when the session is over.
    fn read_and_route(
        self: &Arc<Self>,
        side: &mut ReadSide,
        nonblocking: bool,
    ) -> std::result::Result<(), ()> {
        // Uninitialized: `recv` writes before anything reads, and zeroing
        // 8 KiB per read costs more than the few bytes an answer usually is.
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 8 * 1024];
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `scratch` is valid for writes of its length for the call.
        let n = unsafe {
            libc::recv(
                side.stream.as_raw_fd(),
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                flags,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(()),
                _ => Err(()),
            };
        }
        if n == 0 {
            return Err(());
        }
        // SAFETY: `recv` initialized the first `n` bytes.
        let read = unsafe { std::slice::from_raw_parts(scratch.as_ptr().cast::<u8>(), n as usize) };
        side.buf.extend(read);
        loop {
            match side.decoder.decode::<ServerMessage>(&mut side.buf) {
                Ok(Some(m)) => self.route(m),
                Ok(None) => return Ok(()),
                // The daemon sent something we cannot decode: the stream is
                // lost; end the session rather than guess.
                Err(_) => return Err(()),
            }
        }
    }

    fn is_reclaim(&self, tag: u64) -> bool {
        lock(&self.reclaims).contains_key(&tag)
    }

    /// Whether an async caller waits for an answer.
    fn async_waiting(&self) -> bool {
        lock(&self.slots).values().any(|s| s.has_waker())
    }

    /// The session is over: every slot learns it, the background thread ends.
    fn close_all(&self) {
        let slots: Vec<Arc<Slot>> = {
            let mut slots = lock(&self.slots);
            self.closed.store(true, Ordering::SeqCst);
            slots.drain().map(|(_, s)| s).collect()
        };
        for s in slots {
            s.close();
        }
        lock(&self.readers).closed = true;
        self.readers_cv.notify_all();
    }

    /// Polls for the next event from async code; makes sure the background
    /// thread reads for it.
    pub(crate) fn poll_next(
        &self,
        slot: &Slot,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ServerMessage>> {
        let p = slot.poll_next(cx);
        if p.is_pending() {
            let mut r = lock(&self.readers);
            if r.lead_ended.take().is_some() {
                self.readers_cv.notify_all();
            }
        }
        p
    }

    /// The background reader: reads whenever no caller leads (see the module
    /// docs), until the session ends.
    fn background(self: Arc<Self>) {
        loop {
            {
                let mut r = lock(&self.readers);
                loop {
                    if r.closed {
                        return;
                    }
                    if r.reconnecting {
                        drop(r);
                        self.reconnect();
                        r = lock(&self.readers);
                        continue;
                    }
                    if r.leading {
                        r = self
                            .readers_cv
                            .wait_timeout(r, LINGER)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        continue;
                    }
                    let linger = match r.lead_ended {
                        Some(t) if r.waiting == 0 => LINGER.saturating_sub(t.elapsed()),
                        _ => Duration::ZERO,
                    };
                    if linger.is_zero() {
                        r.lead_ended = None;
                        break;
                    }
                    r = self
                        .readers_cv
                        .wait_timeout(r, linger)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            // Wait for something to read, holding nothing.
            poll_readable(self.read_fd.load(Ordering::SeqCst), None);
            {
                let mut r = lock(&self.readers);
                if r.closed {
                    return;
                }
                if r.leading || r.reconnecting {
                    continue; // the leader reads it, or the session is gone
                }
                r.background = true;
            }
            let over = {
                let mut side = lock(&self.reader);
                self.read_and_route(&mut side, true).is_err()
            };
            lock(&self.readers).background = false;
            if over && !self.session_lost() {
                return;
            }
        }
    }

    /// The socket closed under us. Unless this side closed it or reconnects
    /// are off, calls in flight other than waiting requests fail, and the
    /// background thread is told to reconnect: returns true. Otherwise the
    /// session is over (every slot learns it, every reservation is lost):
    /// returns false.
    fn session_lost(self: &Arc<Self>) -> bool {
        if self.closed.load(Ordering::SeqCst)
            || self.reconnect_window().is_none()
            || !self.owned_by_this_process()
        {
            self.close_all();
            self.mark_all_lost("the connection to the daemon closed");
            return false;
        }
        {
            let mut r = lock(&self.readers);
            if r.reconnecting {
                return true;
            }
            r.reconnecting = true;
        }
        // Answers to anything but a waiting request will not come.
        let gone: Vec<Arc<Slot>> = {
            let requests = lock(&self.requests);
            let mut slots = lock(&self.slots);
            let tags: Vec<u64> = slots
                .keys()
                .filter(|t| !requests.contains_key(t))
                .copied()
                .collect();
            tags.iter().filter_map(|t| slots.remove(t)).collect()
        };
        for s in gone {
            s.close();
        }
        self.readers_cv.notify_all();
        true
    }

    /// Every reservation still tracked is lost, for `why`.
    fn mark_all_lost(&self, why: &str) {
        let all: Vec<Arc<EvictState>> = lock(&self.evictions).values().cloned().collect();
        for st in all {
            st.mark_lost(why);
        }
    }

    /// On the background thread: connects again within the window, then
    /// reclaims what is held and submits again what waits; or, past the
    /// window, ends the session.
    fn reconnect(self: &Arc<Self>) {
        let window = self.reconnect_window().unwrap_or_default();
        let give_up = Instant::now() + window;
        let mut pause = Duration::from_millis(20);
        let session = loop {
            if self.closed.load(Ordering::SeqCst) {
                break None;
            }
            match Self::handshake(&self.socket_path) {
                Ok(s) => break Some(s),
                Err(_) if Instant::now() < give_up => {
                    std::thread::sleep(
                        pause.min(give_up.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(_) => break None,
            }
        };
        let Some((stream, decoder, buf, _version)) = session else {
            lock(&self.readers).reconnecting = false;
            self.close_all();
            self.mark_all_lost(&format!(
                "the connection to the daemon was lost and it did not answer again within {window:?}"
            ));
            return;
        };
        let Ok(reader_stream) = stream.try_clone() else {
            lock(&self.readers).reconnecting = false;
            self.close_all();
            self.mark_all_lost("cannot set up the new connection to the daemon");
            return;
        };
        {
            let mut side = lock(&self.reader);
            let mut writer = lock(&self.writer);
            *writer = stream;
            self.read_fd
                .store(reader_stream.as_raw_fd(), Ordering::SeqCst);
            *side = ReadSide {
                stream: reader_stream,
                decoder,
                buf,
            };
            // Still under the writer's lock: no request is sent twice.
            let mut out = Vec::new();
            out.push(ClientMessage::EnableReclaim {
                tag: self.untracked_tag(),
            });
            let tokens: Vec<(ReservationId, String)> = lock(&self.tokens)
                .iter()
                .map(|(id, t)| (*id, t.clone()))
                .collect();
            let tracked: Vec<ReservationId> = lock(&self.evictions).keys().copied().collect();
            for id in tracked {
                if !tokens.iter().any(|(t, _)| *t == id)
                    && let Some(st) = lock(&self.evictions).get(&id).cloned()
                {
                    st.mark_lost("the daemon gave no reclaim token for it (an older daemon?)");
                }
            }
            for (id, token) in tokens {
                let tag = self.untracked_tag();
                lock(&self.reclaims).insert(tag, id);
                out.push(ClientMessage::Reclaim { tag, id, token });
            }
            out.extend(lock(&self.requests).values().cloned());
            if let Some(consumers) = lock(&self.reported).clone() {
                out.push(ClientMessage::ReportConsumers {
                    tag: self.untracked_tag(),
                    consumers,
                });
            }
            let mut failed = false;
            for msg in &out {
                if let Ok(bytes) = encode(Encoding::Binary, msg)
                    && writer.write_all(&bytes).is_err()
                {
                    failed = true;
                    break;
                }
            }
            drop(writer);
            drop(side);
            let mut r = lock(&self.readers);
            r.reconnecting = false;
            r.lead_ended = None;
            drop(r);
            if failed {
                // Lost again at once: the next read says so and we retry.
            }
        }
        self.readers_cv.notify_all();
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
            ServerMessage::Welcome { .. } | ServerMessage::ReclaimEnabled { .. } => return,
            ServerMessage::ReclaimToken { id, token, .. } => {
                lock(&self.tokens).insert(*id, token.clone());
                return;
            }
            ServerMessage::Granted { tag, grant } if self.is_reclaim(*tag) => {
                lock(&self.reclaims).remove(tag);
                if !lock(&self.evictions).contains_key(&grant.id) {
                    // Released while the daemon was away: give it back now.
                    let _ = self.send(&ClientMessage::Release {
                        tag: self.untracked_tag(),
                        id: grant.id,
                    });
                }
                return;
            }
            ServerMessage::Error { tag, message, .. } if self.is_reclaim(*tag) => {
                let id = lock(&self.reclaims).remove(tag);
                if let Some(id) = id {
                    lock(&self.tokens).remove(&id);
                    let st = lock(&self.evictions).get(&id).cloned();
                    if let Some(st) = st {
                        st.mark_lost(&format!(
                            "the daemon restarted and refused to give it back: {message}"
                        ));
                    }
                }
                return;
            }
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
            | ServerMessage::IdleSet { tag, .. }
            | ServerMessage::Resized { tag, .. }
            | ServerMessage::EnforcedSet { tag, .. }
            | ServerMessage::ConsumersReported { tag, .. } => (*tag, true),
        };
        if terminal {
            lock(&self.requests).remove(&tag);
        }
        if let ServerMessage::Released { id, .. } = &msg {
            lock(&self.tokens).remove(id);
        }
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

/// The error for a client used in a child after `fork()`: the session is the
/// parent's, and its answers go to the parent.
fn forked() -> Error {
    Error::Protocol(
        "this client was opened by the parent process before fork(); open a new one in the child"
            .into(),
    )
}

/// How a leader's reading ended.
enum Lead {
    Answered(ServerMessage),
    TimedOut,
    Closed,
    /// The socket closed; the background thread reconnects.
    Lost,
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
