//! A bare protocol connection (binary frames, no reader thread) for the
//! scale measurement, where ten thousand SDK clients would mean ten thousand
//! reader threads in the harness. It uses the protocol crate's own codec.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{
    ClientMessage, Decoder, Encoding, PROTOCOL_VERSION, ReserveRequest, ServerMessage, encode_into,
};

/// A reserve request for `bytes` on device `index`, priority 0, no wait
/// limit — built through serde, so that fields the protocol adds later take
/// their defaults.
pub fn reserve_request(tag: u64, bytes: u64, index: u32) -> ReserveRequest {
    serde_json::from_value(serde_json::json!({
        "tag": tag,
        "bytes": bytes,
        "device": { "index": index },
    }))
    .expect("a reserve request with only the required fields decodes")
}

/// One session spoken frame by frame.
#[derive(Debug)]
pub struct RawConn {
    stream: UnixStream,
    decoder: Decoder,
    buf: ReadBuffer,
    read_bytes: u64,
}

impl RawConn {
    /// Connects and completes the handshake within `timeout`.
    pub fn open(socket: &Path, timeout: Duration) -> io::Result<RawConn> {
        let stream = UnixStream::connect(socket)?;
        let mut c = RawConn {
            stream,
            decoder: Decoder::new(Encoding::Binary),
            buf: ReadBuffer::new(),
            read_bytes: 0,
        };
        c.send(&ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            client: "vramd-bench raw".into(),
        })?;
        match c.recv(timeout)? {
            Some(ServerMessage::Welcome { .. }) => Ok(c),
            Some(other) => Err(io::Error::other(format!("expected welcome, got {other:?}"))),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no welcome in time",
            )),
        }
    }

    /// Bytes received so far.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &ClientMessage) -> io::Result<()> {
        let mut out = Vec::with_capacity(64);
        encode_into(Encoding::Binary, msg, &mut out).map_err(io::Error::other)?;
        self.stream.write_all(&out)
    }

    /// Sends a reserve request for `bytes` on device `index`, no wait limit.
    pub fn reserve(&mut self, tag: u64, bytes: u64, index: u32) -> io::Result<()> {
        self.send(&ClientMessage::Reserve(reserve_request(tag, bytes, index)))
    }

    /// Receives the next message, blocking under the read timeout set by the
    /// last [`RawConn::recv`] (one `read` per message: no timeout to set).
    pub fn recv_next(&mut self) -> io::Result<ServerMessage> {
        loop {
            if let Some(m) = self.decoded()? {
                return Ok(m);
            }
            self.read_more()?;
        }
    }

    /// Receives one message, waiting up to `timeout`; `Ok(None)` if none came.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<ServerMessage>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.decoded()? {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.read_more() {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete message among the bytes already read, if any.
    fn decoded(&mut self) -> io::Result<Option<ServerMessage>> {
        self.decoder.decode(&mut self.buf).map_err(io::Error::other)
    }

    /// One `read` into the buffer, under the socket's current read timeout.
    fn read_more(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        match self.stream.read(&mut scratch)? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            )),
            n => {
                self.read_bytes += n as u64;
                self.buf.extend(&scratch[..n]);
                Ok(())
            }
        }
    }
}
