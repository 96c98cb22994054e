//! Errors of the SDK. Each daemon [`ErrorKind`] maps to one variant, so
//! callers can match on what went wrong.

use std::io;
use std::path::PathBuf;

use vramd_protocol::ErrorKind;

/// Everything that can go wrong talking to vramd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No daemon answers on the socket path.
    #[error(
        "vramd is not running at {} ({source}); start it with `vramd`, or point VRAMD_SOCKET or --socket at its socket",
        path.display()
    )]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
        /// Why connecting failed.
        #[source]
        source: io::Error,
    },
    /// The connection closed (the daemon stopped or restarted).
    #[error("the connection to vramd was lost; every reservation it held is released")]
    Disconnected,
    /// The request's wait limit passed before it fit.
    #[error("timed out waiting for VRAM: {0}")]
    WaitTimeout(String),
    /// The request can never be granted (larger than every eligible device,
    /// unknown device, zero bytes).
    #[error("request refused: {0}")]
    Refused(String),
    /// The request was cancelled before it was granted.
    #[error("request cancelled")]
    Cancelled,
    /// The daemon rejected a request for another reason.
    #[error("vramd rejected the request ({kind}): {message}")]
    Daemon {
        /// The wire error kind.
        kind: ErrorKind,
        /// The daemon's explanation.
        message: String,
    },
    /// The daemon sent something this SDK does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reading or writing the socket failed.
    #[error("I/O error talking to vramd: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// The error from a daemon `Error` message.
    pub(crate) fn from_wire(kind: ErrorKind, message: String) -> Self {
        match kind {
            ErrorKind::Timeout => Error::WaitTimeout(message),
            ErrorKind::Refused => Error::Refused(message),
            _ => Error::Daemon { kind, message },
        }
    }

    /// The wire error kind this error corresponds to, where there is one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Error::WaitTimeout(_) => Some(ErrorKind::Timeout),
            Error::Refused(_) => Some(ErrorKind::Refused),
            Error::Daemon { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Result with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
