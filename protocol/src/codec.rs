//! Framing of the two encodings that share one socket.
//!
//! - **Binary**: a 4-byte big-endian payload length, then a postcard payload.
//!   Lengths over [`MAX_FRAME_BYTES`] are rejected before anything is
//!   allocated; since the cap is far below 2^24, the first byte a binary
//!   client sends is always `0x00`.
//! - **JSON lines**: one JSON object per `\n`-terminated line, at most
//!   [`MAX_LINE_BYTES`] long. The first byte a JSON client sends is `{` or
//!   whitespace.
//!
//! The daemon picks the encoding from the first byte ([`Encoding::detect`]).
//! Everything here is pure: [`encode`] produces bytes and [`Decoder`] consumes
//! them from a [`ReadBuffer`]; the caller owns the I/O.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// Largest binary payload accepted, in bytes.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Longest JSON line accepted, in bytes (without the newline).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The encoding of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Length-prefixed postcard frames.
    Binary,
    /// JSON lines.
    Json,
}

impl Encoding {
    /// Tells the encoding from the first byte a client sent, or `None` if the
    /// byte starts neither encoding.
    pub fn detect(first: u8) -> Option<Encoding> {
        match first {
            0x00 => Some(Encoding::Binary),
            b'{' | b' ' | b'\t' | b'\r' | b'\n' => Some(Encoding::Json),
            _ => None,
        }
    }
}

/// Why bytes could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum CodecError {
    /// A binary frame announced a payload over the cap. The stream cannot be
    /// resynchronised; the connection must be closed.
    #[error("frame of {len} bytes is over the {max}-byte cap")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A JSON line is over the cap. The decoder discards it up to its newline
    /// and carries on.
    #[error("line is over the {max}-byte cap and was discarded")]
    LineTooLong {
        /// The cap.
        max: usize,
    },
    /// A complete frame or line did not decode into a message. It was consumed;
    /// the session can carry on.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message could not be encoded (too large, or a serializer failure).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl CodecError {
    /// Whether the stream is unusable after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, CodecError::FrameTooLarge { .. })
    }
}

/// Appends one encoded message (with its framing) to `out`.
pub fn encode_into<T: Serialize>(
    encoding: Encoding,
    msg: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    match encoding {
        Encoding::Binary => {
            let start = out.len();
            out.extend_from_slice(&[0; 4]);
            let taken = std::mem::take(out);
            let mut buf =
                postcard::to_extend(msg, taken).map_err(|e| CodecError::Encode(e.to_string()))?;
            let len = buf.len() - start - 4;
            if len > MAX_FRAME_BYTES {
                buf.truncate(start);
                *out = buf;
                return Err(CodecError::Encode(format!(
                    "payload of {len} bytes is over the {MAX_FRAME_BYTES}-byte cap"
                )));
            }
            buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
            *out = buf;
        }
        Encoding::Json => {
            serde_json::to_writer(&mut *out, msg).map_err(|e| CodecError::Encode(e.to_string()))?;
            out.push(b'\n');
        }
    }
    Ok(())
}

/// Encodes one message with its framing.
pub fn encode<T: Serialize>(encoding: Encoding, msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    encode_into(encoding, msg, &mut out)?;
    Ok(out)
}

/// A growable read buffer with a consumed prefix, so that decoding many small
/// messages from one read does not move bytes for each one.
#[derive(Debug, Default)]
pub struct ReadBuffer {
    data: Vec<u8>,
    start: usize,
}

impl ReadBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes not yet consumed.
    pub fn unread(&self) -> &[u8] {
        &self.data[self.start..]
    }

    /// Marks `n` unread bytes as consumed. Once everything is consumed, a
    /// buffer that grew past [`ReadBuffer::KEPT_CAPACITY`] (for a large
    /// frame) gives its memory back: an idle connection holds no more than
    /// that, whatever it sent before.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.data.len());
        if self.start == self.data.len() {
            if self.data.capacity() > Self::KEPT_CAPACITY {
                self.data = Vec::new();
            } else {
                self.data.clear();
            }
            self.start = 0;
        }
    }

    /// Most capacity an empty buffer keeps for the next reads.
    pub const KEPT_CAPACITY: usize = 64 * 1024;

    /// Bytes allocated. It grows with the bytes that arrived (never with
    /// the length a frame announces), at most about twice them.
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    /// Appends bytes (for callers that read into their own buffer).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.compact();
        self.data.extend_from_slice(bytes);
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.data.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Decodes messages of one encoding from a [`ReadBuffer`].
#[derive(Debug)]
pub struct Decoder {
    encoding: Encoding,
    /// In JSON mode, true while the rest of an over-long line is skipped.
    discarding: bool,
}

impl Decoder {
    /// A decoder for `encoding`.
    pub fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            discarding: false,
        }
    }

    /// The encoding it decodes.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Decodes the next complete message, consuming its bytes.
    ///
    /// `Ok(None)`: more bytes are needed. A non-fatal error
    /// ([`CodecError::is_fatal`] false) has consumed the bad message, and the
    /// next call carries on after it.
    pub fn decode<T: DeserializeOwned>(
        &mut self,
        buf: &mut ReadBuffer,
    ) -> Result<Option<T>, CodecError> {
        match self.encoding {
            Encoding::Binary => decode_frame(buf),
            Encoding::Json => self.decode_line(buf),
        }
    }

    fn decode_line<T: DeserializeOwned>(
        &mut self,
        buf: &mut ReadBuffer,
    ) -> Result<Option<T>, CodecError> {
        loop {
            let unread = buf.unread();
            let newline = unread.iter().position(|&b| b == b'\n');
            if self.discarding {
                match newline {
                    Some(i) => {
                        buf.consume(i + 1);
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        let n = unread.len();
                        buf.consume(n);
                        return Ok(None);
                    }
                }
            }
            let Some(i) = newline else {
                if unread.len() > MAX_LINE_BYTES {
                    let n = unread.len();
                    buf.consume(n);
                    self.discarding = true;
                    return Err(CodecError::LineTooLong {
                        max: MAX_LINE_BYTES,
                    });
                }
                return Ok(None);
            };
            if i > MAX_LINE_BYTES {
                buf.consume(i + 1);
                return Err(CodecError::LineTooLong {
                    max: MAX_LINE_BYTES,
                });
            }
            let line = &unread[..i];
            let text = line.trim_ascii();
            if text.is_empty() {
                buf.consume(i + 1);
                continue;
            }
            let result = serde_json::from_slice::<T>(text)
                .map_err(|e| CodecError::Malformed(format!("{e} (in {:?})", abbreviate(text))));
            buf.consume(i + 1);
            return result.map(Some);
        }
    }
}

fn decode_frame<T: DeserializeOwned>(buf: &mut ReadBuffer) -> Result<Option<T>, CodecError> {
    let unread = buf.unread();
    if unread.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([unread[0], unread[1], unread[2], unread[3]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    if unread.len() < 4 + len {
        return Ok(None);
    }
    let result = postcard::from_bytes::<T>(&unread[4..4 + len])
        .map_err(|e| CodecError::Malformed(format!("undecodable binary frame: {e}")));
    buf.consume(4 + len);
    result.map(Some)
}

fn abbreviate(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use proptest::prelude::*;

    fn feed(buf: &mut ReadBuffer, bytes: &[u8]) {
        buf.extend(bytes);
    }

    /// The *GpuProcess* bytes docs/protocol.md spells out.
    #[test]
    fn a_gpu_process_encodes_as_the_protocol_doc_says() {
        let p = GpuProcess {
            device: 0,
            pid: 1234,
            uid: 1000,
            bytes: 4096,
            reservation: Some(ReservationId(7)),
            released: false,
        };
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(bytes, [0, 210, 9, 232, 7, 128, 32, 1, 7, 0]);
        let doc = include_str!("../../docs/protocol.md").replace('\n', " ");
        assert!(doc.contains("`0 210 9 232 7 128 32 1 7 0`"));
    }

    /// The daemon queues answers per connection, and a queue slot is as large
    /// as the largest variant: a large inline variant (as `StatusReport` was,
    /// 232 bytes in all) costs every idle connection kilobytes.
    #[test]
    fn server_messages_stay_small() {
        assert!(
            std::mem::size_of::<ServerMessage>() <= 72,
            "ServerMessage is {} bytes; box the large variant",
            std::mem::size_of::<ServerMessage>()
        );
    }

    fn arb_selector() -> impl Strategy<Value = DeviceSelector> {
        prop_oneof![
            Just(DeviceSelector::Any),
            any::<u32>().prop_map(DeviceSelector::Index),
            "[A-Za-z0-9-]{0,40}".prop_map(DeviceSelector::Uuid),
        ]
    }

    fn arb_client() -> impl Strategy<Value = ClientMessage> {
        prop_oneof![
            (any::<u32>(), ".{0,20}")
                .prop_map(|(version, client)| ClientMessage::Hello { version, client }),
            (
                any::<u64>(),
                any::<u64>(),
                arb_selector(),
                any::<i32>(),
                proptest::option::of(".{0,30}"),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(tag, bytes, device, priority, label, timeout_ms)| {
                    ClientMessage::Reserve(ReserveRequest {
                        tag,
                        bytes,
                        device,
                        priority,
                        label,
                        timeout_ms,
                        evictable: false,
                    })
                }),
            any::<u64>().prop_map(|tag| ClientMessage::Cancel { tag }),
            (any::<u64>(), any::<u64>()).prop_map(|(tag, id)| ClientMessage::Release {
                tag,
                id: ReservationId(id)
            }),
            any::<u64>().prop_map(|tag| ClientMessage::Status { tag }),
            any::<u64>().prop_map(|tag| ClientMessage::Ping { tag }),
            (
                any::<u64>(),
                proptest::collection::vec(arb_consumer_report(), 0..4)
            )
                .prop_map(|(tag, consumers)| ClientMessage::ReportConsumers { tag, consumers }),
        ]
    }

    fn arb_consumer_report() -> impl Strategy<Value = ConsumerReport> {
        (
            (
                ".{0,12}",
                "[a-z]{0,8}",
                proptest::option::of(any::<u32>()),
                any::<i32>(),
            ),
            (
                any::<bool>(),
                any::<u64>(),
                proptest::collection::vec(".{0,10}", 0..3),
                proptest::option::of(any::<u64>()),
            ),
            (
                proptest::option::of(".{0,20}"),
                proptest::option::of(any::<u64>()),
            ),
        )
            .prop_map(
                |(
                    (name, kind, device, priority),
                    (reachable, resident_bytes, models, last_eviction_ms),
                    (last_error, last_error_at_ms),
                )| ConsumerReport {
                    name,
                    kind,
                    device,
                    priority,
                    reachable,
                    resident_bytes,
                    models,
                    last_eviction_ms,
                    last_error,
                    last_error_at_ms,
                },
            )
    }

    fn arb_server() -> impl Strategy<Value = ServerMessage> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(tag, id, position)| {
                ServerMessage::Queued {
                    tag,
                    id: ReservationId(id),
                    position,
                }
            }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                ".{0,20}",
                any::<u64>()
            )
                .prop_map(|(tag, id, device, device_uuid, bytes)| {
                    ServerMessage::Granted {
                        tag,
                        grant: Grant {
                            id: ReservationId(id),
                            device,
                            device_uuid,
                            bytes,
                        },
                    }
                }),
            (any::<u64>(), ".{0,40}").prop_map(|(tag, message)| ServerMessage::Error {
                tag,
                kind: ErrorKind::Timeout,
                message
            }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(tag, count)| ServerMessage::Cancelled { tag, count }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(tag, count)| ServerMessage::ConsumersReported { tag, count }),
        ]
    }

    proptest! {
        #[test]
        fn client_messages_round_trip(msgs in proptest::collection::vec(arb_client(), 1..8), binary in any::<bool>(), chunk in 1usize..17) {
            let enc = if binary { Encoding::Binary } else { Encoding::Json };
            let mut bytes = Vec::new();
            for m in &msgs { encode_into(enc, m, &mut bytes).unwrap(); }
            if binary { prop_assert_eq!(bytes[0], 0); } else { prop_assert_eq!(Encoding::detect(bytes[0]), Some(Encoding::Json)); }
            // Feed in small chunks: decoding must not depend on read boundaries.
            let mut dec = Decoder::new(enc);
            let mut buf = ReadBuffer::new();
            let mut out = Vec::new();
            for piece in bytes.chunks(chunk) {
                feed(&mut buf, piece);
                while let Some(m) = dec.decode::<ClientMessage>(&mut buf).unwrap() { out.push(m); }
            }
            prop_assert_eq!(out, msgs);
            prop_assert!(buf.unread().is_empty());
        }

        #[test]
        fn server_messages_round_trip(msg in arb_server(), binary in any::<bool>()) {
            let enc = if binary { Encoding::Binary } else { Encoding::Json };
            let mut buf = ReadBuffer::new();
            buf.extend(&encode(enc, &msg).unwrap());
            let got = Decoder::new(enc).decode::<ServerMessage>(&mut buf).unwrap();
            prop_assert_eq!(got, Some(msg));
        }

        #[test]
        fn random_binary_frames_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&payload);
            let mut buf = ReadBuffer::new();
            buf.extend(&bytes);
            // Either a message or a non-fatal Malformed error, and the frame is consumed.
            match Decoder::new(Encoding::Binary).decode::<ClientMessage>(&mut buf) {
                Ok(Some(_)) | Err(CodecError::Malformed(_)) => {}
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            prop_assert!(buf.unread().is_empty());
        }
    }

    #[test]
    fn oversized_frame_is_rejected_before_allocation() {
        let mut buf = ReadBuffer::new();
        buf.extend(&u32::MAX.to_be_bytes());
        let err = Decoder::new(Encoding::Binary)
            .decode::<ClientMessage>(&mut buf)
            .unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { len, .. } if len == u32::MAX as usize));
        assert!(err.is_fatal());
    }

    /// A frame that announces 1 MiB costs what arrived of it, and the
    /// memory goes back once the frame is consumed.
    #[test]
    fn frame_memory_grows_with_what_arrived_and_is_given_back() {
        let mut buf = ReadBuffer::new();
        let mut dec = Decoder::new(Encoding::Binary);
        buf.extend(&(MAX_FRAME_BYTES as u32).to_be_bytes());
        buf.extend(&[5; 100]);
        assert_eq!(dec.decode::<ClientMessage>(&mut buf).unwrap(), None);
        assert!(buf.capacity() < 4096, "{}", buf.capacity());
        let rest = vec![0u8; MAX_FRAME_BYTES - 100];
        buf.extend(&rest);
        assert!(buf.capacity() >= MAX_FRAME_BYTES);
        assert!(dec.decode::<ClientMessage>(&mut buf).is_ok());
        assert!(buf.unread().is_empty());
        assert!(
            buf.capacity() <= ReadBuffer::KEPT_CAPACITY,
            "{}",
            buf.capacity()
        );
    }

    #[test]
    fn a_long_process_list_is_cut_to_fit_and_the_rest_kept() {
        let mut s = StatusReport {
            daemon_version: "0".into(),
            backend: "nvml".into(),
            uptime_ms: 0,
            devices: vec![],
            reservations: vec![],
            queue: vec![],
            counters: Counters::default(),
            consumers: vec![],
            queue_total: 0,
            reservations_total: 0,
            mps: None,
            enforced: vec![],
            consumer_errors: vec![],
            processes: (0..200_000)
                .map(|pid| GpuProcess {
                    device: 0,
                    pid,
                    uid: 1000,
                    bytes: u64::MAX,
                    reservation: Some(ReservationId(u64::MAX)),
                    released: false,
                })
                .collect(),
        };
        let msg = |s: &StatusReport| ServerMessage::Status {
            tag: u64::MAX,
            status: Box::new(s.clone()),
        };
        assert!(encode(Encoding::Binary, &msg(&s)).is_err());
        assert!(s.fit(MAX_FRAME_BYTES - 16));
        assert!(!s.processes.is_empty() && s.processes.len() < 200_000);
        assert_eq!(s.processes[0].pid, 0, "the head is kept");
        assert!(encode(Encoding::Binary, &msg(&s)).is_ok());
    }

    #[test]
    fn a_status_is_cut_to_fit_and_keeps_its_totals() {
        let entry = |i: u64| ReservationStatus {
            id: ReservationId(i),
            device: 0,
            bytes: 1,
            label: Some("x".repeat(20_000)),
            pid: 1,
            uid: 1,
            priority: 0,
            age_ms: 0,
            actual_bytes: 0,
            over_reserved: false,
            pids: vec![1],
            idle: false,
        };
        let mut s = StatusReport {
            daemon_version: "0".into(),
            backend: "simulated".into(),
            uptime_ms: 0,
            devices: vec![],
            reservations: (0..100).map(entry).collect(),
            queue: vec![],
            counters: Counters::default(),
            consumers: vec![],
            queue_total: 0,
            reservations_total: 100,
            mps: None,
            enforced: vec![],
            consumer_errors: vec![],
            processes: vec![],
        };
        let msg = |s: &StatusReport| ServerMessage::Status {
            tag: u64::MAX,
            status: Box::new(s.clone()),
        };
        assert!(encode(Encoding::Binary, &msg(&s)).is_err());
        assert!(s.fit(MAX_FRAME_BYTES - 16));
        assert!(!s.reservations.is_empty() && s.reservations.len() < 100);
        assert_eq!(s.reservations_total, 100);
        assert!(encode(Encoding::Binary, &msg(&s)).is_ok());
        assert!(
            !s.fit(MAX_FRAME_BYTES - 16),
            "a report that fits is left alone"
        );
    }

    #[test]
    fn malformed_json_line_is_skipped_and_the_next_decodes() {
        let mut buf = ReadBuffer::new();
        buf.extend(b"{\"reseve\":{}}\nnot json\n\n{\"ping\":{\"tag\":7}}\n");
        let mut dec = Decoder::new(Encoding::Json);
        let e1 = dec.decode::<ClientMessage>(&mut buf).unwrap_err();
        assert!(e1.to_string().contains("unknown variant `reseve`"), "{e1}");
        assert!(!e1.is_fatal());
        assert!(matches!(
            dec.decode::<ClientMessage>(&mut buf),
            Err(CodecError::Malformed(_))
        ));
        assert_eq!(
            dec.decode::<ClientMessage>(&mut buf).unwrap(),
            Some(ClientMessage::Ping { tag: 7 })
        );
        assert_eq!(dec.decode::<ClientMessage>(&mut buf).unwrap(), None);
    }

    #[test]
    fn overlong_line_is_discarded_up_to_its_newline() {
        let mut dec = Decoder::new(Encoding::Json);
        let mut buf = ReadBuffer::new();
        buf.extend(&vec![b'x'; MAX_LINE_BYTES + 10]);
        assert!(matches!(
            dec.decode::<ClientMessage>(&mut buf),
            Err(CodecError::LineTooLong { .. })
        ));
        // The rest of the long line arrives, then a good line.
        buf.extend(&vec![b'y'; 1000]);
        assert_eq!(dec.decode::<ClientMessage>(&mut buf).unwrap(), None);
        buf.extend(b"yyy\n{\"status\":{}}\n");
        assert_eq!(
            dec.decode::<ClientMessage>(&mut buf).unwrap(),
            Some(ClientMessage::Status { tag: 0 })
        );
    }

    #[test]
    fn json_defaults_let_people_type_short_lines() {
        let mut buf = ReadBuffer::new();
        buf.extend(b"{\"reserve\":{\"bytes\":1024,\"label\":\"x\"}}\r\n");
        let m = Decoder::new(Encoding::Json)
            .decode::<ClientMessage>(&mut buf)
            .unwrap();
        assert_eq!(
            m,
            Some(ClientMessage::Reserve(ReserveRequest {
                tag: 0,
                bytes: 1024,
                device: DeviceSelector::Any,
                priority: 0,
                label: Some("x".into()),
                timeout_ms: None,
                evictable: false,
            }))
        );
    }

    #[test]
    fn wire_shapes_are_stable() {
        // The JSON shapes documented in docs/protocol.md.
        let s = serde_json::to_string(&ServerMessage::Granted {
            tag: 1,
            grant: Grant {
                id: ReservationId(5),
                device: 0,
                device_uuid: "SIM-0".into(),
                bytes: 8,
            },
        })
        .unwrap();
        assert_eq!(
            s,
            r#"{"granted":{"tag":1,"grant":{"id":5,"device":0,"device_uuid":"SIM-0","bytes":8}}}"#
        );
        let sel: DeviceSelector = serde_json::from_str(r#"{"index":1}"#).unwrap();
        assert_eq!(sel, DeviceSelector::Index(1));
        // The binary encoding of a Ping: frame length 2, variant 5, tag 9.
        assert_eq!(
            encode(Encoding::Binary, &ClientMessage::Ping { tag: 9 }).unwrap(),
            vec![0, 0, 0, 2, 5, 9]
        );
    }

    #[test]
    fn a_consumer_report_decodes_with_its_json_defaults_and_rejects_bad_input() {
        // Only name and kind are required in JSON.
        let line = br#"{"report_consumers":{"consumers":[{"name":"tts","kind":"http"}]}}"#;
        let mut buf = ReadBuffer::new();
        buf.extend(line);
        buf.extend(b"\n");
        let got = Decoder::new(Encoding::Json)
            .decode::<ClientMessage>(&mut buf)
            .unwrap();
        let Some(ClientMessage::ReportConsumers { tag: 0, consumers }) = got else {
            panic!("{got:?}");
        };
        assert_eq!(consumers.len(), 1);
        let c = &consumers[0];
        assert_eq!((c.name.as_str(), c.kind.as_str()), ("tts", "http"));
        assert!(c.device.is_none() && c.models.is_empty() && c.last_error.is_none());
        assert!(c.check().is_ok());
        // A missing kind, a wrong type: malformed, not a panic, and the
        // session goes on.
        for bad in [
            &br#"{"report_consumers":{"consumers":[{"name":"tts"}]}}"#[..],
            br#"{"report_consumers":{"consumers":[{"name":"tts","kind":"http","resident_bytes":-1}]}}"#,
            br#"{"report_consumers":{"consumers":"tts"}}"#,
        ] {
            let mut buf = ReadBuffer::new();
            buf.extend(bad);
            buf.extend(b"\n");
            let e = Decoder::new(Encoding::Json)
                .decode::<ClientMessage>(&mut buf)
                .unwrap_err();
            assert!(matches!(e, CodecError::Malformed(_)), "{e:?}");
            assert!(!e.is_fatal());
        }
        // Out of bounds: `check` names the consumer, the field and the limit.
        let mut long = c.clone();
        long.models = vec!["m".repeat(MAX_CONSUMER_MODEL_BYTES + 1)];
        let e = long.check().unwrap_err();
        assert!(e.contains("consumer \"tts\"") && e.contains("256"), "{e}");
        let mut empty = c.clone();
        empty.last_error = Some(String::new());
        assert!(empty.check().unwrap_err().contains("last_error is empty"));
    }

    #[test]
    fn detect_first_byte() {
        assert_eq!(Encoding::detect(0), Some(Encoding::Binary));
        assert_eq!(Encoding::detect(b'{'), Some(Encoding::Json));
        assert_eq!(Encoding::detect(b'G'), None);
    }
}

#[cfg(test)]
mod wire_contract {
    //! The variant numbers and byte examples documented in docs/protocol.md.
    use super::*;
    use crate::messages::*;

    fn payload<T: Serialize>(m: &T) -> Vec<u8> {
        encode(Encoding::Binary, m).unwrap()[4..].to_vec()
    }

    #[test]
    fn client_variant_numbers() {
        let msgs = [
            ClientMessage::Hello {
                version: 1,
                client: String::new(),
            },
            ClientMessage::Reserve(ReserveRequest {
                tag: 1,
                bytes: 1024,
                device: DeviceSelector::Any,
                priority: 0,
                label: None,
                timeout_ms: None,
                evictable: false,
            }),
            ClientMessage::Cancel { tag: 0 },
            ClientMessage::Release {
                tag: 0,
                id: ReservationId(0),
            },
            ClientMessage::Status { tag: 0 },
            ClientMessage::Ping { tag: 9 },
            ClientMessage::AttachPids {
                tag: 0,
                id: ReservationId(0),
                pids: vec![],
            },
            ClientMessage::SetIdle {
                tag: 0,
                id: ReservationId(0),
                idle: false,
            },
            ClientMessage::EnableReclaim { tag: 1 },
            ClientMessage::Reclaim {
                tag: 0,
                id: ReservationId(0),
                token: String::new(),
            },
            ClientMessage::ReserveFor {
                request: ReserveRequest {
                    tag: 1,
                    bytes: 1024,
                    device: DeviceSelector::Any,
                    priority: 0,
                    label: None,
                    timeout_ms: None,
                    evictable: false,
                },
                pids: vec![4242],
            },
            ClientMessage::Resize {
                tag: 2,
                id: ReservationId(7),
                bytes: 4096,
            },
            ClientMessage::SetEnforced {
                tag: 3,
                id: ReservationId(7),
                limit_bytes: 4096,
                mechanism: "mps".into(),
            },
            ClientMessage::ReportConsumers {
                tag: 5,
                consumers: vec![ConsumerReport {
                    name: "tts".into(),
                    kind: "http".into(),
                    device: Some(0),
                    priority: -1,
                    reachable: true,
                    resident_bytes: 4096,
                    models: vec!["app".into()],
                    last_eviction_ms: None,
                    last_error: Some("x".into()),
                    last_error_at_ms: Some(300),
                }],
            },
        ];
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(payload(m)[0] as usize, i, "{m:?}");
        }
        assert_eq!(payload(&msgs[0]), [0, 1, 0]);
        assert_eq!(payload(&msgs[1]), [1, 1, 128, 8, 0, 0, 0, 0, 0]);
        assert_eq!(payload(&msgs[5]), [5, 9]);
        assert_eq!(payload(&msgs[8]), [8, 1]);
        assert_eq!(
            payload(&msgs[10]),
            [10, 1, 128, 8, 0, 0, 0, 0, 0, 1, 146, 33]
        );
        assert_eq!(payload(&msgs[11]), [11, 2, 7, 128, 32]);
        assert_eq!(payload(&msgs[12]), [12, 3, 7, 128, 32, 3, b'm', b'p', b's']);
        assert_eq!(
            payload(&msgs[13]),
            [
                13, 5, 1, 3, b't', b't', b's', 4, b'h', b't', b't', b'p', 1, 0, 1, 1, 128, 32, 1,
                3, b'a', b'p', b'p', 0, 1, 1, b'x', 1, 172, 2
            ]
        );
    }

    #[test]
    fn server_and_error_variant_numbers() {
        assert_eq!(payload(&ServerMessage::Pong { tag: 9 }), [6, 9]);
        let attached = ServerMessage::Attached {
            tag: 1,
            id: ReservationId(2),
            pids: vec![3],
        };
        assert_eq!(payload(&attached), [8, 1, 2, 1, 3]);
        let idle = ServerMessage::IdleSet {
            tag: 1,
            id: ReservationId(2),
            idle: true,
        };
        assert_eq!(payload(&idle), [9, 1, 2, 1]);
        let evict = ServerMessage::Evict {
            id: ReservationId(2),
            deadline_ms: 5,
            reason: "x".into(),
        };
        assert_eq!(payload(&evict), [10, 2, 5, 1, b'x']);
        let resized = ServerMessage::Resized {
            tag: 2,
            id: ReservationId(7),
            bytes: 4096,
        };
        assert_eq!(payload(&resized), [13, 2, 7, 128, 32]);
        let enabled = ServerMessage::ReclaimEnabled {
            tag: 1,
            grace_ms: 5,
        };
        assert_eq!(payload(&enabled), [11, 1, 5]);
        let enforced = ServerMessage::EnforcedSet {
            tag: 3,
            id: ReservationId(7),
            limit_bytes: 4096,
        };
        assert_eq!(payload(&enforced), [14, 3, 7, 128, 32]);
        let reported = ServerMessage::ConsumersReported { tag: 5, count: 2 };
        assert_eq!(payload(&reported), [15, 5, 2]);
        let e = payload(&ServerMessage::Error {
            tag: 0,
            kind: ErrorKind::Internal,
            message: String::new(),
        });
        assert_eq!(e, [7, 0, 11, 0]);
        let kinds = [
            ErrorKind::BadRequest,
            ErrorKind::VersionMismatch,
            ErrorKind::HandshakeTimeout,
            ErrorKind::FrameTooLarge,
            ErrorKind::LineTooLong,
            ErrorKind::Timeout,
            ErrorKind::Refused,
            ErrorKind::NotFound,
            ErrorKind::PermissionDenied,
            ErrorKind::Unavailable,
            ErrorKind::LimitExceeded,
            ErrorKind::Internal,
        ];
        for (i, k) in kinds.iter().enumerate() {
            assert_eq!(postcard::to_allocvec(k).unwrap(), [i as u8]);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert_eq!(payload(&DeviceSelector::Uuid("G".into())), [2, 1, b'G']);
    }
}
