//! Fuzzing of both decoders with random input, as property tests (cargo-fuzz
//! needs a nightly toolchain; these run in every `cargo test`). The case
//! counts are recorded in docs/testing.md.
//!
//! Whatever bytes arrive, in whatever pieces: no panic, every error is one
//! the daemon knows how to answer, memory stays proportional to what
//! arrived, and after a non-fatal error the decoder goes on.

use proptest::prelude::*;
use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{
    ClientMessage, CodecError, Decoder, Encoding, MAX_FRAME_BYTES, MAX_LINE_BYTES, encode,
};

/// Cases per property.
const CASES: u32 = 2000;

/// Feeds `bytes` in pieces of `chunk` and decodes after each; stops at a
/// fatal error. Returns (messages, non-fatal errors, whether it ended on a
/// fatal error).
fn run(encoding: Encoding, bytes: &[u8], chunk: usize) -> (usize, usize, bool) {
    let mut dec = Decoder::new(encoding);
    let mut buf = ReadBuffer::new();
    let (mut msgs, mut errors) = (0, 0);
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend(piece);
        // The buffer holds at most what arrived (twice, as a Vec grows).
        assert!(buf.capacity() <= 2 * bytes.len().max(ReadBuffer::KEPT_CAPACITY) + 64);
        loop {
            match dec.decode::<ClientMessage>(&mut buf) {
                Ok(Some(_)) => msgs += 1,
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    assert!(matches!(e, CodecError::FrameTooLarge { .. }), "{e}");
                    return (msgs, errors, true);
                }
                Err(e) => {
                    assert!(
                        matches!(e, CodecError::Malformed(_) | CodecError::LineTooLong { .. }),
                        "{e}"
                    );
                    errors += 1;
                }
            }
        }
    }
    (msgs, errors, false)
}

/// Valid messages of every kind, to mutate.
fn valid_stream(encoding: Encoding) -> Vec<u8> {
    let msgs = [
        r#"{"hello":{"version":1,"client":"fuzz"}}"#,
        r#"{"reserve":{"tag":2,"bytes":1,"device":{"uuid":"SIM-1"},"priority":-3,"label":"ab","timeout_ms":300,"evictable":true}}"#,
        r#"{"cancel":{"tag":2}}"#,
        r#"{"release":{"tag":3,"id":7}}"#,
        r#"{"status":{"tag":4}}"#,
        r#"{"ping":{"tag":5}}"#,
        r#"{"attach_pids":{"tag":6,"id":7,"pids":[1,2,3]}}"#,
        r#"{"set_idle":{"tag":8,"id":7,"idle":true}}"#,
    ];
    let mut out = Vec::new();
    for m in msgs {
        let msg: ClientMessage = serde_json::from_str(m).unwrap();
        out.extend(encode(encoding, &msg).unwrap());
    }
    out
}

/// Cases per property: `CASES`, or `VRAMD_FUZZ_CASES` for a long run
/// (docs/testing.md).
fn cases() -> u32 {
    std::env::var("VRAMD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Random bytes after a binary session's first `0x00`.
    #[test]
    fn binary_decoder_survives_random_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..64,
    ) {
        let mut bytes = vec![0u8];
        bytes.extend(body);
        run(Encoding::Binary, &bytes, chunk);
    }

    /// Random frames with plausible lengths: every complete frame is a
    /// message or a non-fatal error, and all of it is consumed.
    #[test]
    fn binary_decoder_consumes_every_complete_frame(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8),
        chunk in 1usize..64,
    ) {
        let mut bytes = Vec::new();
        for p in &payloads {
            bytes.extend((p.len() as u32).to_be_bytes());
            bytes.extend(p);
        }
        let (msgs, errors, fatal) = run(Encoding::Binary, &bytes, chunk);
        prop_assert!(!fatal);
        prop_assert_eq!(msgs + errors, payloads.len());
    }

    /// Valid binary frames with random bytes overwritten.
    #[test]
    fn binary_decoder_survives_mutations(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        chunk in 1usize..64,
    ) {
        let mut bytes = valid_stream(Encoding::Binary);
        for (at, b) in flips {
            let n = bytes.len();
            bytes[at % n] = b;
        }
        // `run` checks that only a length over the cap is fatal.
        run(Encoding::Binary, &bytes, chunk);
    }

    /// Random bytes after a JSON session's first `{`: never fatal, and once
    /// a newline ends it, nothing is left over.
    #[test]
    fn json_decoder_survives_random_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..64,
    ) {
        let mut bytes = vec![b'{'];
        bytes.extend(body);
        bytes.push(b'\n');
        let mut dec = Decoder::new(Encoding::Json);
        let mut buf = ReadBuffer::new();
        for piece in bytes.chunks(chunk) {
            buf.extend(piece);
            loop {
                match dec.decode::<ClientMessage>(&mut buf) {
                    Ok(Some(_)) | Err(CodecError::Malformed(_)) => {}
                    Ok(None) => break,
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
        }
        prop_assert!(buf.unread().is_empty());
    }

    /// Random JSON-ish text built from JSON's own characters, to reach the
    /// deserializer's deeper paths.
    #[test]
    fn json_decoder_survives_json_like_text(
        text in r#"[{}\[\]":,0-9a-z_ \-.eE]{0,300}"#,
        chunk in 1usize..64,
    ) {
        let mut bytes = b"{".to_vec();
        bytes.extend(text.as_bytes());
        bytes.push(b'\n');
        let (_, _, fatal) = run(Encoding::Json, &bytes, chunk);
        prop_assert!(!fatal);
    }

    /// Valid JSON lines with random bytes overwritten (a newline may come or
    /// go): never fatal.
    #[test]
    fn json_decoder_survives_mutations(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        chunk in 1usize..64,
    ) {
        let mut bytes = valid_stream(Encoding::Json);
        for (at, b) in flips {
            let n = bytes.len();
            bytes[at % n] = b;
        }
        let (_, _, fatal) = run(Encoding::Json, &bytes, chunk);
        prop_assert!(!fatal);
    }
}

/// Lines and frames at and past their caps, in one piece and in many.
#[test]
fn caps_hold_at_their_edges() {
    for chunk in [1 << 20, 4096, 7] {
        let mut line = vec![b'{'];
        line.extend(std::iter::repeat_n(b' ', MAX_LINE_BYTES + 1));
        line.push(b'\n');
        line.extend(b"{\"ping\":{\"tag\":1}}\n");
        let (msgs, errors, fatal) = run(Encoding::Json, &line, chunk);
        assert_eq!((msgs, errors, fatal), (1, 1, false), "chunk {chunk}");
        let mut frame = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec();
        frame.extend([0u8; 16]);
        let (_, _, fatal) = run(Encoding::Binary, &frame, chunk);
        assert!(fatal);
    }
}
