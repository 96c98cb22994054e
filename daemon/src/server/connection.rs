//! One client connection, from accept to close.
//!
//! 1. Accept; read the peer's credentials (pid, uid, gid) once.
//! 2. The first byte picks the encoding ([`Encoding::detect`]); the first
//!    message must be `Hello` with our protocol version, all within the
//!    handshake timeout. Otherwise the client gets an error and is closed.
//! 3. The connection registers with the core and forwards every request to
//!    it; the core answers through the connection's [`Outbox`] (bounded:
//!    see [`super::outbox`]). A message must arrive in full within the
//!    frame timeout, or the client is told and closed.
//! 4. When the socket closes — a clean exit, a crash, SIGKILL — the
//!    connection tells the core, which releases everything the connection
//!    held or waited for and grants what now fits, at once.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vramd_ledger::{ConnId, Peer};
use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{
    ClientMessage, CodecError, Decoder, Encoding, ErrorKind, PROTOCOL_VERSION, ServerMessage,
    encode_into,
};

use super::admission::Admission;
use super::core::Event;
use super::outbox::{Outbox, Taken};
use super::socket::in_group;
use crate::gpu::owner_uid;

/// Appends a reply; one that cannot be encoded (too large for a frame)
/// becomes an `internal` error for its request instead of ending the session.
/// Returns how many bytes it appended.
fn encode_reply(encoding: Encoding, msg: &ServerMessage, out: &mut Vec<u8>) -> usize {
    let start = out.len();
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
    out.len() - start
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
///
/// The encoding is stored in `session_encoding` as soon as the first byte
/// arrives: it is the session's for good, so an error sent later (e.g. the
/// handshake timeout after a frame that did not decode, when the buffer is
/// empty again) is in the client's encoding.
async fn handshake(
    stream: &mut UnixStream,
    buf: &mut ReadBuffer,
    conn: ConnId,
    session_encoding: &mut Option<Encoding>,
) -> io::Result<Option<(Decoder, String)>> {
    if !fill(stream, buf).await? {
        return Ok(None);
    }
    let first = buf.unread()[0];
    *session_encoding = Encoding::detect(first);
    let Some(encoding) = *session_encoding else {
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
                // A hello is a few bytes: a connection that sends more
                // before one is complete holds no more memory for it.
                if buf.unread().len() > MAX_HELLO_BYTES {
                    let msg = error_msg(
                        0,
                        ErrorKind::BadRequest,
                        format!(
                            "the first message must be hello, of at most {MAX_HELLO_BYTES} bytes"
                        ),
                    );
                    send(stream, encoding, &msg).await?;
                    return Ok(None);
                }
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

/// What every connection is served with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Time to complete the handshake.
    pub handshake_timeout: Duration,
    /// Time a message has to arrive in full once its first byte did.
    pub frame_timeout: Duration,
    /// Most estimated bytes of replies a client may leave unread.
    pub max_unsent_bytes: usize,
    /// The admin group, if any.
    pub admin_gid: Option<u32>,
}

/// Serves one client from handshake to close.
pub(crate) async fn serve(
    mut stream: UnixStream,
    conn: ConnId,
    events: mpsc::Sender<Event>,
    limits: Limits,
    admission: Arc<Admission>,
) -> io::Result<()> {
    let Limits {
        handshake_timeout,
        admin_gid,
        ..
    } = limits;
    let cred = stream.peer_cred()?;
    let pid = cred.pid().map_or(0, |p| p as u32);
    let mut buf = ReadBuffer::new();
    let mut session_encoding = None;
    let ticket = admission.start_handshake(conn);
    let hs = tokio::select! {
        hs = tokio::time::timeout(
            handshake_timeout,
            handshake(&mut stream, &mut buf, conn, &mut session_encoding),
        ) => hs.map_err(|_| {
            (
                ErrorKind::HandshakeTimeout,
                format!("no hello within {} ms", handshake_timeout.as_millis()),
            )
        }),
        _ = ticket.evicted() => Err((
            ErrorKind::LimitExceeded,
            "too many connections are in their handshake; this one waited longest and is closed: send hello right after connecting".to_string(),
        )),
    };
    drop(ticket);
    let (mut decoder, client) = match hs {
        Ok(Ok(Some(ok))) => ok,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err((kind, message)) => {
            // Fixed by the first byte, not guessed again from what is left
            // in the buffer; JSON only if the client sent nothing at all.
            let encoding = session_encoding.unwrap_or(Encoding::Json);
            // Best effort: the client may be gone or not reading.
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                send(&mut stream, encoding, &error_msg(0, kind, message)),
            )
            .await;
            debug!(conn = %conn, pid, kind = %kind, "handshake ended without hello");
            return Ok(());
        }
    };
    let encoding = decoder.encoding();
    // Read from /proc only now: a connection that never says hello costs
    // no file reads.
    let peer = Peer {
        pid,
        uid: cred.uid(),
        gid: cred.gid(),
        admin: cred.uid() == 0 || admin_gid.is_some_and(|g| in_group(pid, cred.gid(), g)),
    };
    let _session = match admission.admit(peer.uid, peer.admin) {
        Ok(ticket) => ticket,
        Err(why) => {
            info!(conn = %conn, pid = peer.pid, uid = peer.uid, reason = %why, "connection refused");
            send(
                &mut stream,
                encoding,
                &error_msg(0, ErrorKind::LimitExceeded, why),
            )
            .await?;
            return Ok(());
        }
    };
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

    let outbox = Arc::new(Outbox::new(limits.max_unsent_bytes));
    let open = Event::Open {
        conn,
        peer,
        outbox: outbox.clone(),
    };
    if events.send(open).await.is_err() {
        return Ok(());
    }
    let result = session(
        &mut stream,
        conn,
        peer,
        &mut decoder,
        &mut buf,
        &events,
        &outbox,
        limits.frame_timeout,
    )
    .await;
    // However the session ended, the core releases what it held.
    let _ = events.send(Event::Close { conn }).await;
    match result {
        Ok(SessionEnd::ClientDone) => {
            // The client sent its last request and shut its side down (e.g.
            // `printf ... | socat`): it still gets the answers to what it
            // sent. The core answers every request before the close, then
            // forgets the connection, which finishes the outbox.
            let mut out = Vec::new();
            let drain = async {
                loop {
                    out.clear();
                    match outbox.take(BATCH_BYTES, |m| encode_reply(encoding, m, &mut out)) {
                        Taken::Some => stream.write_all(&out).await?,
                        Taken::Empty => outbox.ready().await,
                        Taken::Finished | Taken::Overflowed => return io::Result::Ok(()),
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
            Ok(())
        }
        Ok(SessionEnd::Overflowed) => {
            // Best effort: the client is not reading, its socket is likely full.
            let msg = error_msg(
                0,
                ErrorKind::LimitExceeded,
                format!(
                    "closed: more than {} bytes of replies were left unread; everything this connection held was released",
                    limits.max_unsent_bytes
                ),
            );
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                send(&mut stream, encoding, &msg),
            )
            .await;
            Ok(())
        }
        Ok(SessionEnd::Closed) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Most bytes a client may send before its hello is complete (framing
/// included); the hello itself is a few bytes plus the client's name.
const MAX_HELLO_BYTES: usize = 4096;

/// Most bytes of replies gathered into one write.
const BATCH_BYTES: usize = 64 * 1024;

/// How a session ended without an I/O error.
enum SessionEnd {
    /// The client closed its sending side; answers may still be owed.
    ClientDone,
    /// The daemon ended it (fatal framing error, a message that never
    /// completed, shutdown).
    Closed,
    /// The client left too many replies unread; the core already released
    /// what it held.
    Overflowed,
}

/// Why a client may not attach these pids: a pid that does not exist, or
/// belongs to another user (root and admins may attach any).
fn pids_refused(peer: Peer, pids: &[u32]) -> Option<String> {
    pids.iter().find_map(|&pid| match owner_uid(pid) {
        None => Some(format!("no process {pid}")),
        Some(uid) if peer.uid != 0 && !peer.admin && uid != peer.uid => Some(format!(
            "process {pid} belongs to uid {uid}; only your own processes (uid {}) can be attached, unless you are root or an admin",
            peer.uid
        )),
        Some(_) => None,
    })
}

/// Serves requests and writes replies until the session ends.
///
/// A message must arrive in full within `frame_timeout` of the previous
/// one completing (or of its first byte, after a pause): a client stalled
/// inside a frame or line is told so and closed, so a stalled partial
/// message holds its buffer for a bounded time.
#[allow(clippy::too_many_arguments)]
async fn session(
    stream: &mut UnixStream,
    conn: ConnId,
    peer: Peer,
    decoder: &mut Decoder,
    buf: &mut ReadBuffer,
    events: &mpsc::Sender<Event>,
    outbox: &Outbox,
    frame_timeout: Duration,
) -> io::Result<SessionEnd> {
    let encoding = decoder.encoding();
    let (mut rd, mut wr) = stream.split();
    // Grows to the largest batch of replies written at once; idle
    // connections that never got one hold nothing.
    let mut out = Vec::new();
    // When the unfinished message in `buf` must be complete.
    let mut partial_deadline: Option<tokio::time::Instant> = None;
    loop {
        // Requests already buffered (e.g. pipelined after hello) go first.
        loop {
            match decoder.decode::<ClientMessage>(buf) {
                Ok(Some(msg)) => {
                    partial_deadline = None;
                    // Checking pids reads /proc: done here, at the edge,
                    // not in the core task.
                    let named = match &msg {
                        ClientMessage::AttachPids { tag, pids, .. } => Some((*tag, pids)),
                        ClientMessage::ReserveFor { request, pids } => Some((request.tag, pids)),
                        _ => None,
                    };
                    if let Some((tag, pids)) = named {
                        if let Some(why) = pids_refused(peer, pids) {
                            let err = error_msg(tag, ErrorKind::PermissionDenied, why);
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
                    partial_deadline = None;
                    send(&mut wr, encoding, &codec_error_msg(&e)).await?;
                    if e.is_fatal() {
                        warn!(conn = %conn, error = %e, "closing connection after a fatal framing error");
                        return Ok(SessionEnd::Closed);
                    }
                }
            }
        }
        if buf.unread().is_empty() {
            partial_deadline = None;
        } else if partial_deadline.is_none() {
            partial_deadline = Some(tokio::time::Instant::now() + frame_timeout);
        }
        // Replies ready go out first; while the client does not take them
        // we read nothing more from it (its requests wait in its socket).
        out.clear();
        match outbox.take(BATCH_BYTES, |m| encode_reply(encoding, m, &mut out)) {
            Taken::Some => {
                let writing = tokio::time::Instant::now();
                tokio::select! {
                    written = wr.write_all(&out) => written?,
                    _ = outbox.overflowed() => return Ok(SessionEnd::Overflowed),
                }
                // We read nothing while the write waited: that time is not
                // charged to a message still arriving.
                if let Some(at) = &mut partial_deadline {
                    *at += writing.elapsed();
                }
                continue;
            }
            Taken::Empty => {}
            Taken::Finished => return Ok(SessionEnd::Closed),
            Taken::Overflowed => return Ok(SessionEnd::Overflowed),
        }
        if out.capacity() > BATCH_BYTES * 2 {
            // One large reply (a status) was written: give its memory back.
            out = Vec::new();
        }
        let stalled = async {
            match partial_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = fill(&mut rd, buf) => {
                if !read? {
                    return Ok(SessionEnd::ClientDone);
                }
            }
            _ = outbox.ready() => {}
            _ = stalled => {
                let msg = error_msg(
                    0,
                    ErrorKind::BadRequest,
                    format!(
                        "a message stayed incomplete for {} ms ({} bytes arrived); closing",
                        frame_timeout.as_millis(),
                        buf.unread().len()
                    ),
                );
                let _ = tokio::time::timeout(Duration::from_millis(100), send(&mut wr, encoding, &msg)).await;
                debug!(conn = %conn, pid = peer.pid, "closed: a message stayed incomplete");
                return Ok(SessionEnd::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_existing_processes_may_be_attached_unless_root_or_admin() {
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
        let admin = Peer {
            admin: true,
            ..peer(other)
        };
        assert!(
            pids_refused(admin, &[me]).is_none(),
            "an admin may attach any"
        );
        assert!(
            pids_refused(peer(0), &[u32::MAX - 3])
                .unwrap()
                .contains("no process")
        );
    }
}
