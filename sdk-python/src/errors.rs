//! How SDK errors become Python exceptions.
//!
//! The exception classes are defined in Python (`vramd/_errors.py`), where they
//! can inherit from both `vramd.VramdError` and the matching built-in class
//! (`TimeoutError`, `ConnectionError`, `PermissionError`). This module looks
//! each class up once and raises it with the SDK's message, setting the
//! instance's `kind` (the wire error kind, or `None`) and `socket` (the socket
//! path involved) attributes. Every SDK error maps to exactly one class, and
//! every wire [`ErrorKind`] to its own.

use std::path::Path;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use vramd_client::{Error, ErrorKind};

/// The Python exception classes the native module raises, by name in
/// `vramd._errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    VramdError,
    DaemonNotRunning,
    Disconnected,
    WaitTimeout,
    Refused,
    Cancelled,
    ProtocolError,
    BadRequest,
    VersionMismatch,
    HandshakeTimeout,
    FrameTooLarge,
    LineTooLong,
    NotFound,
    PermissionDenied,
    Unavailable,
    LimitExceeded,
    InternalError,
}

impl ErrorClass {
    /// How many classes there are (the size of the lookup table).
    const COUNT: usize = ErrorClass::InternalError as usize + 1;

    fn name(self) -> &'static str {
        match self {
            ErrorClass::VramdError => "VramdError",
            ErrorClass::DaemonNotRunning => "DaemonNotRunning",
            ErrorClass::Disconnected => "Disconnected",
            ErrorClass::WaitTimeout => "WaitTimeout",
            ErrorClass::Refused => "Refused",
            ErrorClass::Cancelled => "Cancelled",
            ErrorClass::ProtocolError => "ProtocolError",
            ErrorClass::BadRequest => "BadRequest",
            ErrorClass::VersionMismatch => "VersionMismatch",
            ErrorClass::HandshakeTimeout => "HandshakeTimeout",
            ErrorClass::FrameTooLarge => "FrameTooLarge",
            ErrorClass::LineTooLong => "LineTooLong",
            ErrorClass::NotFound => "NotFound",
            ErrorClass::PermissionDenied => "PermissionDenied",
            ErrorClass::Unavailable => "Unavailable",
            ErrorClass::LimitExceeded => "LimitExceeded",
            ErrorClass::InternalError => "InternalError",
        }
    }

    /// The class a wire error kind maps to.
    pub(crate) fn for_kind(kind: ErrorKind) -> ErrorClass {
        // The wildcard arm keeps this compiling when the protocol grows a
        // kind; until it has its own class, a new kind is a VramdError.
        #[allow(unreachable_patterns)]
        match kind {
            ErrorKind::BadRequest => ErrorClass::BadRequest,
            ErrorKind::VersionMismatch => ErrorClass::VersionMismatch,
            ErrorKind::HandshakeTimeout => ErrorClass::HandshakeTimeout,
            ErrorKind::FrameTooLarge => ErrorClass::FrameTooLarge,
            ErrorKind::LineTooLong => ErrorClass::LineTooLong,
            ErrorKind::Timeout => ErrorClass::WaitTimeout,
            ErrorKind::Refused => ErrorClass::Refused,
            ErrorKind::NotFound => ErrorClass::NotFound,
            ErrorKind::PermissionDenied => ErrorClass::PermissionDenied,
            ErrorKind::Unavailable => ErrorClass::Unavailable,
            ErrorKind::LimitExceeded => ErrorClass::LimitExceeded,
            ErrorKind::Internal => ErrorClass::InternalError,
            _ => ErrorClass::VramdError,
        }
    }

    fn class<'py>(self, py: Python<'py>) -> PyResult<&'py Bound<'py, PyType>> {
        static CLASSES: [PyOnceLock<Py<PyType>>; ErrorClass::COUNT] =
            [const { PyOnceLock::new() }; ErrorClass::COUNT];
        CLASSES[self as usize].import(py, "vramd._errors", self.name())
    }
}

/// Builds an instance of `class` with `message`, `kind` and `socket` set.
pub(crate) fn new_error(
    py: Python<'_>,
    class: ErrorClass,
    message: String,
    kind: Option<ErrorKind>,
    socket: Option<&Path>,
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let instance = class.class(py)?.call1((message.clone(),))?;
        instance.setattr("kind", kind.map(ErrorKind::as_str))?;
        instance.setattr("socket", socket.map(|p| p.display().to_string()))?;
        Ok(PyErr::from_value(instance))
    };
    // Only a broken installation (no vramd._errors) fails here; say so
    // rather than hiding the original message.
    build().unwrap_or_else(|e| {
        PyRuntimeError::new_err(format!(
            "{message} (and the vramd exception classes could not be loaded: {e})"
        ))
    })
}

/// A usage error (`vramd.VramdError` itself), e.g. a request that already
/// finished.
pub(crate) fn usage_error(py: Python<'_>, message: impl Into<String>) -> PyErr {
    new_error(py, ErrorClass::VramdError, message.into(), None, None)
}

/// The Python exception for an SDK error that happened talking to `socket`.
pub(crate) fn to_py_err(py: Python<'_>, err: Error, socket: &Path) -> PyErr {
    let kind = err.kind();
    // The wildcard arm keeps this compiling when the SDK grows a variant; a
    // new variant is still a VramdError.
    #[allow(unreachable_patterns)]
    let class = match &err {
        Error::NotRunning { .. } => ErrorClass::DaemonNotRunning,
        Error::Disconnected | Error::Io(_) => ErrorClass::Disconnected,
        Error::WaitTimeout(_) => ErrorClass::WaitTimeout,
        Error::Refused(_) => ErrorClass::Refused,
        Error::Cancelled => ErrorClass::Cancelled,
        Error::Daemon { kind, .. } => ErrorClass::for_kind(*kind),
        Error::Protocol(_) => ErrorClass::ProtocolError,
        _ => ErrorClass::VramdError,
    };
    let message = match &err {
        // The SDK's messages for these do not name the socket.
        Error::Disconnected => format!(
            "the connection to vramd at {} was lost; every reservation it held is released",
            socket.display()
        ),
        Error::Io(e) => format!(
            "I/O error talking to vramd at {}: {e}; the connection is unusable",
            socket.display()
        ),
        other => other.to_string(),
    };
    new_error(py, class, message, kind, Some(socket))
}
