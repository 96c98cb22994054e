//! Wire protocol of vramd, shared by the daemon, the SDKs and `vramctl`.
//!
//! This crate owns everything that crosses the socket and nothing else:
//!
//! - [`messages`]: the serde types of every request and reply, their ids, units
//!   and error kinds;
//! - [`codec`]: the two encodings that share one socket — length-prefixed
//!   postcard frames and JSON lines — as pure encode/decode functions over byte
//!   buffers, with no I/O, so the blocking SDK and the async daemon use the same
//!   code;
//! - [`size`]: parsing and printing of human sizes (`8GiB`, `512MiB`, `8GB`);
//! - [`paths`]: where clients and the daemon look for the socket;
//! - [`mps`]: whether an NVIDIA MPS server named in status is usable.
//!
//! docs/protocol.md is the normative description of the wire; this crate is
//! its reference implementation.

pub mod codec;
pub mod messages;
pub mod mps;
pub mod paths;
pub mod size;

pub use codec::{
    CodecError, Decoder, Encoding, MAX_FRAME_BYTES, MAX_LINE_BYTES, encode, encode_into,
};
pub use messages::*;
pub use size::{
    GIB, KIB, MIB, ParseDurationError, ParseSizeError, TIB, format_duration, format_size,
    format_size_exact, parse_duration, parse_size,
};

/// Version of the wire protocol spoken by this crate. A client sends it in
/// [`ClientMessage::Hello`]; the daemon refuses a session whose version differs.
pub const PROTOCOL_VERSION: u32 = 1;
