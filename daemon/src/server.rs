//! The socket server: socket setup, one task per connection, and the core
//! task that owns the [`Ledger`].
//!
//! # Lifecycle of a connection
//! 1. Accept; read the peer's credentials (pid, uid, gid) once.
//! 2. The first byte picks the encoding ([`Encoding::detect`]); the first
//!    message must be `Hello` with our protocol version, all within the
//!    handshake timeout. Otherwise the client gets an error and is closed.
//! 3. The connection registers with the core task and forwards every request
//!    to it; the core answers through the connection's outbound channel.
//! 4. When the socket closes — a clean exit, a crash, SIGKILL — the connection
//!    task tells the core, which releases everything the connection held or
//!    waited for and grants what now fits, at once.
//!
//! # Why one core task
//! Every decision goes through the ledger in one place, in order, with no
//! lock: the core task receives events over a bounded channel (so a flooding
//! client is slowed at its own socket), never awaits anything but its inbox
//! and its next timer, and never blocks on a client (outbound channels are
//! unbounded and drained by each connection's own task).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{
    ClientMessage, CodecError, Decoder, Encoding, ErrorKind, PROTOCOL_VERSION, ServerMessage,
    StatusReport, encode_into, format_size,
};

use crate::config::ConsumerConfig;
use crate::consumers::{self, ConsumerEvent, ConsumerHandle};
use crate::gpu::{GpuReader, Poller, Readings, owner_uid};
use crate::ledger::{ConnId, Effect, Ledger, Peer};

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
    /// Most connections served at once; more are told so and closed.
    pub max_connections: usize,
    /// Name of the GPU backend, for status.
    pub backend: String,
    /// How often a measuring backend is read.
    pub poll_interval: Duration,
    /// External consumers (their specs are also in the ledger).
    pub consumers: Vec<ConsumerConfig>,
    /// How often consumers are asked what they hold.
    pub consumer_poll_interval: Duration,
    /// Members of this group (and root) are admins.
    pub admin_group: Option<String>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another daemon answers on the socket path.
    #[error("another vramd is already listening on {0}; stop it first or use another --socket")]
    AlreadyRunning(PathBuf),
    /// The path exists and is not a socket; we will not remove it.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// The socket group does not exist.
    #[error("socket group {0:?} does not exist")]
    UnknownGroup(String),
    /// Creating, binding or setting up the socket failed.
    #[error("cannot set up socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Creates the listening socket: refuses a live daemon's path, removes a stale
/// socket file, binds under a restrictive umask, then sets mode and group.
pub fn bind_socket(config: &ServerConfig) -> Result<std::os::unix::net::UnixListener, ServerError> {
    let path = &config.socket_path;
    let sock_err = |source| ServerError::Socket {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::AlreadyRunning(path.clone())),
                Err(_) => {
                    info!(path = %path.display(), "removing stale socket file");
                    std::fs::remove_file(path).map_err(sock_err)?;
                }
            }
        }
        Ok(_) => return Err(ServerError::NotASocket(path.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(sock_err)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(sock_err)?;
        }
    }
    let gid = match &config.socket_group {
        Some(name) => Some(group_id(name).ok_or_else(|| ServerError::UnknownGroup(name.clone()))?),
        None => None,
    };
    // Bind under umask 0177 so the socket never exists with wider permissions
    // than the owner's, then widen it to the configured mode.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(sock_err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(sock_err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(sock_err)?;
    listener.set_nonblocking(true).map_err(sock_err)?;
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns a pointer to static storage or null; we read
    // one field immediately and keep no reference.
    let grp = unsafe { libc::getgrnam(cname.as_ptr()) };
    if grp.is_null() {
        None
    } else {
        // SAFETY: non-null pointer from getgrnam, read before any other call.
        Some(unsafe { (*grp).gr_gid })
    }
}

/// Whether process `pid` (primary group `gid`) is in group `group`, from
/// its supplementary groups in /proc.
fn in_group(pid: u32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Groups:"))
                .map(|l| l.split_whitespace().skip(1).any(|g| g.parse() == Ok(group)))
        })
        .unwrap_or(false)
}

/// Most queue entries a status lists (the answer must fit in one frame).
const STATUS_QUEUE_LIMIT: usize = 1000;

/// What connection tasks tell the core task.
#[derive(Debug)]
enum Event {
    Open {
        conn: ConnId,
        peer: Peer,
        tx: mpsc::UnboundedSender<ServerMessage>,
    },
    Request {
        conn: ConnId,
        msg: ClientMessage,
    },
    Close {
        conn: ConnId,
    },
    Readings(Readings),
}

/// Serves clients on `listener` until `shutdown` completes, then removes the
/// socket file.
///
/// With a `reader` (a measuring backend), a poller thread reads every device
/// each `config.poll_interval` and after every release.
pub async fn serve(
    config: ServerConfig,
    listener: std::os::unix::net::UnixListener,
    ledger: Ledger,
    reader: Option<Box<dyn GpuReader>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let listener = UnixListener::from_std(listener)?;
    let (events_tx, events_rx) = mpsc::channel::<Event>(4096);
    let poller = match reader {
        Some(reader) => {
            let tx = events_tx.clone();
            let devices = ledger.device_count();
            Some(Poller::start(
                reader,
                devices,
                config.poll_interval,
                move |r| tx.blocking_send(Event::Readings(r)).is_ok(),
            )?)
        }
        None => None,
    };
    let (consumer_tx, consumer_rx) = mpsc::channel::<ConsumerEvent>(256);
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
    let core = tokio::spawn(core_task(
        ledger,
        events_rx,
        config.backend.clone(),
        poller,
        consumers,
        consumer_rx,
    ));
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
                let handshake = config.handshake_timeout;
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, conn, events, handshake, over_limit, admin_gid).await {
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
    remove_socket(&config.socket_path);
    Ok(())
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot remove socket file");
        }
    }
}

/// Appends a reply; one that cannot be encoded (too large for a frame)
/// becomes an `internal` error for its request instead of ending the session.
fn encode_reply(encoding: Encoding, msg: &ServerMessage, out: &mut Vec<u8>) {
    if let Err(e) = encode_into(encoding, msg, out) {
        warn!(error = %e, "cannot encode a reply");
        let tag = match msg {
            ServerMessage::Status { tag, .. } => *tag,
            _ => 0,
        };
        let fallback = error_msg(
            tag,
            ErrorKind::Internal,
            format!("the reply could not be sent: {e}"),
        );
        let _ = encode_into(encoding, &fallback, out);
    }
}

/// Writes one message to the client, in its encoding.
async fn send(
    stream: &mut (impl AsyncWriteExt + Unpin),
    encoding: Encoding,
    msg: &ServerMessage,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(128);
    encode_into(encoding, msg, &mut out).map_err(io::Error::other)?;
    stream.write_all(&out).await
}

fn error_msg(tag: u64, kind: ErrorKind, message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error {
        tag,
        kind,
        message: message.into(),
    }
}

/// Reads more bytes into `buf`; `Ok(false)` at end of stream.
///
/// Cancel-safe (it is used in `select!`): bytes reach `buf` only in the poll
/// that read them.
///
/// The scratch array lives on the stack of one poll, not in the future: kept
/// across an `.await` it would sit in every idle connection's task (8 KiB ×
/// 10,000 connections). `poll_read` (rather than `readable` + `try_read`)
/// because it treats a short read as draining the socket, which saves an
/// extra `recv` that would only say "would block" on every request.
async fn fill(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut ReadBuffer,
) -> io::Result<bool> {
    std::future::poll_fn(|cx| {
        // Uninitialized: zeroing 8 KiB for every read costs more than the
        // few bytes a request usually is.
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 8 * 1024];
        let mut read = tokio::io::ReadBuf::uninit(&mut scratch);
        match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read) {
            std::task::Poll::Ready(Ok(())) => {
                buf.extend(read.filled());
                std::task::Poll::Ready(Ok(!read.filled().is_empty()))
            }
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await
}

/// The handshake: encoding from the first byte, then `Hello`, within `timeout`.
/// Returns the decoder to go on with, or `None` if the client was turned away.
async fn handshake(
    stream: &mut UnixStream,
    buf: &mut ReadBuffer,
    conn: ConnId,
) -> io::Result<Option<(Decoder, String)>> {
    if !fill(stream, buf).await? {
        return Ok(None);
    }
    let first = buf.unread()[0];
    let Some(encoding) = Encoding::detect(first) else {
        // We cannot know which encoding the client wants; JSON is readable.
        let msg = error_msg(
            0,
            ErrorKind::BadRequest,
            format!(
                "unrecognised first byte 0x{first:02x}: send JSON lines (starting with '{{') or binary frames (starting with 0x00)"
            ),
        );
        send(stream, Encoding::Json, &msg).await?;
        return Ok(None);
    };
    let mut decoder = Decoder::new(encoding);
    loop {
        match decoder.decode::<ClientMessage>(buf) {
            Ok(Some(ClientMessage::Hello { version, client })) if version == PROTOCOL_VERSION => {
                return Ok(Some((decoder, client)));
            }
            Ok(Some(ClientMessage::Hello { version, .. })) => {
                let msg = error_msg(
                    0,
                    ErrorKind::VersionMismatch,
                    format!(
                        "this daemon speaks protocol version {PROTOCOL_VERSION}, the client sent {version}"
                    ),
                );
                send(stream, encoding, &msg).await?;
                return Ok(None);
            }
            Ok(Some(_)) => {
                let msg = error_msg(
                    0,
                    ErrorKind::BadRequest,
                    format!(
                        r#"the first message must be hello, e.g. {{"hello":{{"version":{PROTOCOL_VERSION}}}}}"#
                    ),
                );
                send(stream, encoding, &msg).await?;
                return Ok(None);
            }
            Ok(None) => {
                if !fill(stream, buf).await? {
                    return Ok(None);
                }
            }
            Err(e) => {
                let fatal = e.is_fatal();
                send(stream, encoding, &codec_error_msg(&e)).await?;
                if fatal {
                    debug!(conn = %conn, error = %e, "bad handshake");
                    return Ok(None);
                }
            }
        }
    }
}

fn codec_error_msg(e: &CodecError) -> ServerMessage {
    let kind = match e {
        CodecError::FrameTooLarge { .. } => ErrorKind::FrameTooLarge,
        CodecError::LineTooLong { .. } => ErrorKind::LineTooLong,
        CodecError::Malformed(_) | CodecError::Encode(_) => ErrorKind::BadRequest,
    };
    error_msg(0, kind, e.to_string())
}

/// Serves one client from handshake to close.
async fn connection(
    mut stream: UnixStream,
    conn: ConnId,
    events: mpsc::Sender<Event>,
    handshake_timeout: Duration,
    over_limit: bool,
    admin_gid: Option<u32>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().map_or(0, |p| p as u32);
    let peer = Peer {
        pid,
        uid: cred.uid(),
        gid: cred.gid(),
        admin: cred.uid() == 0 || admin_gid.is_some_and(|g| in_group(pid, cred.gid(), g)),
    };
    let mut buf = ReadBuffer::new();
    let hs = tokio::time::timeout(handshake_timeout, handshake(&mut stream, &mut buf, conn)).await;
    let (mut decoder, client) = match hs {
        Ok(Ok(Some(ok))) => ok,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let encoding = buf
                .unread()
                .first()
                .and_then(|&b| Encoding::detect(b))
                .unwrap_or(Encoding::Json);
            let msg = error_msg(
                0,
                ErrorKind::HandshakeTimeout,
                format!("no hello within {} ms", handshake_timeout.as_millis()),
            );
            // Best effort: the client may be gone or not reading.
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                send(&mut stream, encoding, &msg),
            )
            .await;
            debug!(conn = %conn, pid = peer.pid, "handshake timed out");
            return Ok(());
        }
    };
    let encoding = decoder.encoding();
    if over_limit {
        let msg = error_msg(
            0,
            ErrorKind::LimitExceeded,
            "the daemon serves too many connections; try again later",
        );
        send(&mut stream, encoding, &msg).await?;
        warn!(conn = %conn, pid = peer.pid, "connection refused: too many connections");
        return Ok(());
    }
    send(
        &mut stream,
        encoding,
        &ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            daemon: env!("CARGO_PKG_VERSION").to_string(),
        },
    )
    .await?;
    debug!(conn = %conn, pid = peer.pid, uid = peer.uid, client = %client, ?encoding, "session opened");

    let (tx, mut outbound) = mpsc::unbounded_channel();
    if events.send(Event::Open { conn, peer, tx }).await.is_err() {
        return Ok(());
    }
    let result = session(
        &mut stream,
        conn,
        peer,
        &mut decoder,
        &mut buf,
        &events,
        &mut outbound,
    )
    .await;
    // However the session ended, the core releases what it held.
    let _ = events.send(Event::Close { conn }).await;
    if let Ok(SessionEnd::ClientDone) = result {
        // The client sent its last request and shut its side down (e.g.
        // `printf ... | socat`): it still gets the answers to what it sent.
        // The core answers every request before the close, then drops this
        // connection's channel, which ends the drain.
        let encoding = decoder.encoding();
        let drain = async {
            while let Some(msg) = outbound.recv().await {
                send(&mut stream, encoding, &msg).await?;
            }
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
    result.map(|_| ())
}

/// How a session ended without an I/O error.
enum SessionEnd {
    /// The client closed its sending side; answers may still be owed.
    ClientDone,
    /// The daemon ended it (fatal framing error, shutdown).
    Closed,
}

/// Why a client may not attach these pids: a pid that does not exist, or
/// belongs to another user (root may attach any).
fn pids_refused(peer: Peer, pids: &[u32]) -> Option<String> {
    pids.iter().find_map(|&pid| match owner_uid(pid) {
        None => Some(format!("no process {pid}")),
        Some(uid) if peer.uid != 0 && uid != peer.uid => Some(format!(
            "process {pid} belongs to uid {uid}; only your own processes (uid {}) can be attached",
            peer.uid
        )),
        Some(_) => None,
    })
}

async fn session(
    stream: &mut UnixStream,
    conn: ConnId,
    peer: Peer,
    decoder: &mut Decoder,
    buf: &mut ReadBuffer,
    events: &mpsc::Sender<Event>,
    outbound: &mut mpsc::UnboundedReceiver<ServerMessage>,
) -> io::Result<SessionEnd> {
    let encoding = decoder.encoding();
    let (mut rd, mut wr) = stream.split();
    // Grows to the largest batch of replies written at once; idle
    // connections that never got one hold nothing.
    let mut out = Vec::new();
    loop {
        // Requests already buffered (e.g. pipelined after hello) go first.
        loop {
            match decoder.decode::<ClientMessage>(buf) {
                Ok(Some(ClientMessage::Hello { .. })) => {
                    send(
                        &mut wr,
                        encoding,
                        &error_msg(0, ErrorKind::BadRequest, "hello was already sent"),
                    )
                    .await?;
                }
                Ok(Some(msg)) => {
                    // Checking pids reads /proc: done here, at the edge,
                    // not in the core task.
                    if let ClientMessage::AttachPids { tag, pids, .. } = &msg {
                        if let Some(why) = pids_refused(peer, pids) {
                            let err = error_msg(*tag, ErrorKind::PermissionDenied, why);
                            send(&mut wr, encoding, &err).await?;
                            continue;
                        }
                    }
                    if events.send(Event::Request { conn, msg }).await.is_err() {
                        return Ok(SessionEnd::Closed);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    send(&mut wr, encoding, &codec_error_msg(&e)).await?;
                    if e.is_fatal() {
                        warn!(conn = %conn, error = %e, "closing connection after a fatal framing error");
                        return Ok(SessionEnd::Closed);
                    }
                }
            }
        }
        tokio::select! {
            read = fill(&mut rd, buf) => {
                if !read? {
                    return Ok(SessionEnd::ClientDone);
                }
            }
            msg = outbound.recv() => {
                let Some(msg) = msg else { return Ok(SessionEnd::Closed) };
                out.clear();
                encode_reply(encoding, &msg, &mut out);
                // Batch whatever else is ready into one write.
                while let Ok(more) = outbound.try_recv() {
                    encode_reply(encoding, &more, &mut out);
                    if out.len() > 64 * 1024 {
                        break;
                    }
                }
                wr.write_all(&out).await?;
            }
        }
    }
}

struct ConnHandle {
    peer: Peer,
    tx: mpsc::UnboundedSender<ServerMessage>,
}

/// The only owner of the ledger: applies events in order, delivers effects.
async fn core_task(
    mut ledger: Ledger,
    mut events: mpsc::Receiver<Event>,
    backend: String,
    poller: Option<Poller>,
    consumers: HashMap<String, ConsumerHandle>,
    mut consumer_events: mpsc::Receiver<ConsumerEvent>,
) {
    // After a release, only a reading taken afterwards may show the memory
    // free (the ledger keeps counting it until then): ask for one at once.
    let refresh = || {
        if let Some(p) = &poller {
            p.refresh();
        }
    };
    let started = Instant::now();
    let mut conns: HashMap<ConnId, ConnHandle> = HashMap::new();
    let mut consumers_open = true;
    loop {
        let wake = ledger.next_wakeup(Instant::now());
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            ev = events.recv() => ev,
            _ = sleep => {
                let effects = ledger.tick(Instant::now());
                deliver(&conns, &consumers, effects);
                continue;
            }
            ce = consumer_events.recv(), if consumers_open => {
                let now = Instant::now();
                let effects = match ce {
                    None => {
                        consumers_open = false;
                        continue;
                    }
                    Some(ConsumerEvent::Reading { name, result }) => ledger.set_consumer(&name, result, now),
                    Some(ConsumerEvent::Unloaded { name, result: Ok(()) }) => {
                        // The unload call returned; the readings will tell when
                        // the memory is really free.
                        refresh();
                        debug!(consumer = %name, "unload call returned");
                        Vec::new()
                    }
                    Some(ConsumerEvent::Unloaded { name, result: Err(e) }) => {
                        ledger.consumer_unload_failed(&name, e, now)
                    }
                };
                deliver(&conns, &consumers, effects);
                continue;
            }
        };
        let Some(event) = event else { return };
        let now = Instant::now();
        match event {
            Event::Open { conn, peer, tx } => {
                conns.insert(conn, ConnHandle { peer, tx });
            }
            Event::Close { conn } => {
                let (released, effects) = ledger.disconnect(conn, now);
                if !released.is_empty() {
                    refresh();
                }
                let pid = conns.remove(&conn).map_or(0, |h| h.peer.pid);
                for r in released {
                    info!(id = %r.id, conn = %conn, pid, device = r.device, bytes = r.bytes, size = %format_size(r.bytes),
                        label = r.label.as_deref().unwrap_or(""), held_ms = r.held.as_millis() as u64, evicted = r.evicted,
                        "released (connection closed)");
                }
                deliver(&conns, &consumers, effects);
            }
            Event::Request { conn, msg } => {
                let Some(handle) = conns.get(&conn) else {
                    continue;
                };
                let peer = handle.peer;
                let reply = |m: ServerMessage| {
                    let _ = handle.tx.send(m);
                };
                match msg {
                    ClientMessage::Hello { .. } => {}
                    ClientMessage::Reserve(req) => {
                        debug!(conn = %conn, pid = peer.pid, tag = req.tag, bytes = req.bytes, device = %req.device,
                            priority = req.priority, label = req.label.as_deref().unwrap_or(""), "reserve");
                        let effects = ledger.reserve(conn, peer, req, now);
                        deliver(&conns, &consumers, effects);
                    }
                    ClientMessage::Cancel { tag } => {
                        let (count, effects) = ledger.cancel(conn, tag, now);
                        if count > 0 {
                            info!(conn = %conn, pid = peer.pid, tag, count, "cancelled");
                        }
                        reply(ServerMessage::Cancelled { tag, count });
                        deliver(&conns, &consumers, effects);
                    }
                    ClientMessage::Release { tag, id } => match ledger.release(conn, id, now) {
                        Ok((r, effects)) => {
                            reply(ServerMessage::Released { tag, id });
                            // Logged once the answer is on its way, and
                            // before the grants the release made room for.
                            info!(id = %r.id, conn = %conn, pid = peer.pid, device = r.device, bytes = r.bytes,
                                size = %format_size(r.bytes), label = r.label.as_deref().unwrap_or(""),
                                held_ms = r.held.as_millis() as u64, evicted = r.evicted, "released");
                            refresh();
                            deliver(&conns, &consumers, effects);
                        }
                        Err(e) => reply(error_msg(tag, ErrorKind::NotFound, e.to_string())),
                    },
                    ClientMessage::Status { tag } => {
                        let mut status = StatusReport {
                            daemon_version: env!("CARGO_PKG_VERSION").to_string(),
                            backend: backend.clone(),
                            uptime_ms: now.duration_since(started).as_millis() as u64,
                            devices: ledger.device_status(),
                            reservations: ledger.reservation_status(now),
                            queue: ledger.queue_status(now, STATUS_QUEUE_LIMIT),
                            queue_total: ledger.waiter_count() as u64,
                            counters: ledger.counters().clone(),
                            consumers: ledger.consumer_status(now),
                        };
                        if !peer.admin {
                            redact(&mut status, peer.uid);
                        }
                        reply(ServerMessage::Status {
                            tag,
                            status: Box::new(status),
                        });
                    }
                    ClientMessage::Ping { tag } => reply(ServerMessage::Pong { tag }),
                    ClientMessage::SetIdle { tag, id, idle } => {
                        match ledger.set_idle(conn, id, idle, now) {
                            Ok(effects) => {
                                debug!(id = %id, conn = %conn, idle, "idle state set");
                                reply(ServerMessage::IdleSet { tag, id, idle });
                                deliver(&conns, &consumers, effects);
                            }
                            Err(e) => reply(error_msg(tag, ErrorKind::NotFound, e.to_string())),
                        }
                    }
                    ClientMessage::AttachPids { tag, id, pids } => {
                        match ledger.attach_pids(conn, id, &pids, now) {
                            Ok((all, effects)) => {
                                info!(id = %id, conn = %conn, pid = peer.pid, pids = ?all, "pids attached");
                                reply(ServerMessage::Attached { tag, id, pids: all });
                                deliver(&conns, &consumers, effects);
                            }
                            Err(e) => reply(error_msg(tag, ErrorKind::NotFound, e.to_string())),
                        }
                    }
                }
            }
            Event::Readings(readings) => {
                for (i, result) in readings.results.into_iter().enumerate() {
                    let was_healthy = ledger.is_healthy(i);
                    let effects = match result {
                        Ok(reading) => {
                            if !was_healthy {
                                info!(device = i, "device readings recovered");
                            }
                            ledger.set_reading(i, reading, readings.taken_at, now)
                        }
                        Err(fault) => {
                            if was_healthy {
                                warn!(device = i, error = %fault, "device unhealthy: no new grants on it until readings recover");
                            }
                            ledger.set_fault(i, fault, now)
                        }
                    };
                    deliver(&conns, &consumers, effects);
                }
            }
        }
    }
}

/// Hides the details of other users' reservations and requests (labels,
/// pids) from a client that is not an admin.
fn redact(status: &mut StatusReport, uid: u32) {
    for r in status.reservations.iter_mut().filter(|r| r.uid != uid) {
        r.label = None;
        r.pids.clear();
    }
    for q in status.queue.iter_mut().filter(|q| q.uid != uid) {
        q.label = None;
    }
}

/// Sends effects to their connections and logs them.
fn deliver(
    conns: &HashMap<ConnId, ConnHandle>,
    consumers: &HashMap<String, ConsumerHandle>,
    effects: Vec<Effect>,
) {
    for effect in effects {
        let (conn, msg) = match effect {
            Effect::Evict {
                conn,
                id,
                deadline,
                reason,
            } => {
                info!(id = %id, conn = %conn, pid = conns.get(&conn).map_or(0, |h| h.peer.pid),
                    deadline_ms = deadline.as_millis() as u64, reason = %reason, "asking holder to unload (evict)");
                (
                    conn,
                    ServerMessage::Evict {
                        id,
                        deadline_ms: deadline.as_millis() as u64,
                        reason,
                    },
                )
            }
            Effect::EvictConsumer { name, reason } => {
                match consumers.get(&name) {
                    Some(h) => h.unload(reason),
                    None => warn!(consumer = %name, "eviction of an unknown consumer"),
                }
                continue;
            }
            Effect::EvictionFailed { victim, reason } => {
                warn!(victim = %victim, reason = %reason, "eviction failed; trying other candidates");
                continue;
            }
            Effect::Granted {
                conn,
                tag,
                grant,
                label,
                waited,
            } => {
                let (id, device, bytes) = (grant.id, grant.device, grant.bytes);
                let handle = conns.get(&conn);
                if let Some(h) = handle {
                    let _ = h.tx.send(ServerMessage::Granted { tag, grant });
                }
                // Logged once the answer is on its way: formatting and
                // writing the line is not part of the client's wait.
                info!(id = %id, conn = %conn, pid = handle.map_or(0, |h| h.peer.pid),
                    device, bytes, size = %format_size(bytes),
                    label = label.as_deref().unwrap_or(""), waited_ms = waited.as_millis() as u64, "granted");
                continue;
            }
            Effect::Queued {
                conn,
                tag,
                id,
                position,
            } => {
                debug!(id = %id, conn = %conn, position, "queued");
                (conn, ServerMessage::Queued { tag, id, position })
            }
            Effect::Failed {
                conn,
                tag,
                kind,
                message,
            } => {
                let pid = conns.get(&conn).map_or(0, |h| h.peer.pid);
                if kind == ErrorKind::Timeout {
                    info!(conn = %conn, pid, tag, reason = %message, "timed out");
                } else {
                    info!(conn = %conn, pid, tag, kind = %kind, reason = %message, "refused");
                }
                (conn, error_msg(tag, kind, message))
            }
        };
        if let Some(h) = conns.get(&conn) {
            let _ = h.tx.send(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_existing_processes_may_be_attached_unless_root() {
        let me = std::process::id();
        // SAFETY: getuid has no preconditions.
        let my_uid = unsafe { libc::getuid() };
        let peer = |uid| Peer {
            pid: 1,
            uid,
            gid: 0,
            admin: uid == 0,
        };
        assert_eq!(pids_refused(peer(my_uid), &[me]), None);
        let other = if my_uid == 4242 { 4243 } else { 4242 };
        let why = pids_refused(peer(other), &[me]).expect("another user's process is refused");
        assert!(why.contains(&format!("belongs to uid {my_uid}")), "{why}");
        assert!(
            pids_refused(peer(0), &[me]).is_none(),
            "root may attach any"
        );
        assert!(
            pids_refused(peer(0), &[u32::MAX - 3])
                .unwrap()
                .contains("no process")
        );
    }
}

#[cfg(test)]
mod redaction {
    use super::*;
    use vramd_protocol::{Counters, QueueEntry, ReservationId, ReservationStatus};

    #[test]
    fn other_users_details_are_hidden() {
        let r = |uid| ReservationStatus {
            id: ReservationId(uid as u64),
            device: 0,
            bytes: 1,
            label: Some(format!("secret-{uid}")),
            pid: 1,
            uid,
            priority: 0,
            age_ms: 0,
            actual_bytes: 0,
            over_reserved: false,
            pids: vec![1],
            idle: false,
        };
        let mut s = StatusReport {
            daemon_version: String::new(),
            backend: String::new(),
            uptime_ms: 0,
            devices: vec![],
            reservations: vec![r(1000), r(2000)],
            queue: vec![QueueEntry {
                id: ReservationId(3),
                position: 1,
                bytes: 1,
                device: Default::default(),
                priority: 0,
                label: Some("q".into()),
                pid: 2,
                uid: 2000,
                waited_ms: 0,
            }],
            counters: Counters::default(),
            consumers: vec![],
            queue_total: 1,
        };
        redact(&mut s, 1000);
        assert_eq!(s.reservations[0].label.as_deref(), Some("secret-1000"));
        assert_eq!(s.reservations[1].label, None);
        assert!(s.reservations[1].pids.is_empty());
        assert_eq!(s.queue[0].label, None);
        assert!(in_group(std::process::id(), 12345, 12345));
        assert!(!in_group(std::process::id(), 12345, 54321));
    }
}
