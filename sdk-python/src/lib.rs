//! Python bindings of the vramd SDK: the native module `vramd._vramd`.
//!
//! This crate wraps the blocking Rust SDK (`vramd-client`) for Python. It
//! owns the classes `Client`, `Reservation`, `Pending` and `Eviction`, the
//! size helpers, and the mapping of SDK errors to the exception classes
//! defined in `python/vramd/_errors.py`. The Python package
//! (`python/vramd/`) re-exports all of it and adds what is simpler in Python:
//! the module-level default client, the asyncio helpers and the PyTorch
//! helper.
//!
//! Rules every binding here follows: a call that can block releases the GIL
//! (`Python::detach`); a wait runs in short slices and runs signal handlers
//! in between, so Ctrl-C interrupts it; no error is a panic or a bare
//! `Exception`.

mod client;
mod convert;
mod errors;
mod evict;
mod pending;
mod reservation;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::{ErrorClass, new_error};

/// Parses a size such as ``"8GiB"``, ``"8Gi"``, ``"512MiB"``, ``"1.5GiB"``,
/// ``"8GB"`` or ``"4096B"`` into bytes. Binary units (KiB/Ki, MiB/Mi,
/// GiB/Gi, TiB/Ti) are powers of 1024, SI units (KB, MB, GB, TB) powers of
/// 1000, B is bytes; case does not matter. Raises ``ValueError`` for anything
/// else, with a hint for a number without a unit ("did you mean 8GiB?").
#[pyfunction]
fn parse_size(size: &str) -> PyResult<u64> {
    vramd_client::parse_size(size).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Formats bytes for people, e.g. ``format_size(8 * 2**30) == "8.00 GiB"``.
#[pyfunction]
fn format_size(bytes: u64) -> String {
    vramd_client::format_size(bytes)
}

/// The socket path a ``Client()`` without arguments connects to:
/// ``$VRAMD_SOCKET``, else ``$XDG_RUNTIME_DIR/vramd.sock`` if it exists, else
/// ``/run/vramd/vramd.sock``.
#[pyfunction]
fn default_socket_path() -> String {
    vramd_client::paths::client_socket_path()
        .display()
        .to_string()
}

/// The exception the SDK raises for a daemon error of wire kind ``kind``
/// (``"timeout"``, ``"not_found"``…), returned, not raised. For tests and
/// for code that wants to check the mapping.
#[pyfunction]
fn _error_for_wire_kind(py: Python<'_>, kind: &str, message: String) -> PyResult<Py<PyAny>> {
    let parsed: vramd_client::ErrorKind =
        serde_json::from_value(serde_json::Value::String(kind.to_string()))
            .map_err(|_| PyValueError::new_err(format!("unknown wire error kind {kind:?}")))?;
    let message = vramd_client::Error::Daemon {
        kind: parsed,
        message,
    }
    .to_string();
    let class = ErrorClass::for_kind(parsed);
    Ok(new_error(py, class, message, Some(parsed), None)
        .into_value(py)
        .into_any())
}

/// Lets eviction callbacks finish before the interpreter finalizes: none
/// starts any more, and this waits (GIL released) for the running ones, each
/// at most until its deadline. Registered with ``atexit`` by the package.
#[pyfunction]
fn _finish_eviction_callbacks(py: Python<'_>) {
    py.detach(evict::finish_callbacks);
}

/// Forgets the parent's running eviction callbacks in a child after
/// ``fork()``. Registered with ``os.register_at_fork`` by the package.
#[pyfunction]
fn _after_fork_in_child() {
    evict::after_fork_in_child();
}

/// The native part of the ``vramd`` package; import ``vramd`` instead.
#[pymodule(name = "_vramd")]
fn vramd_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<reservation::Reservation>()?;
    m.add_class::<pending::Pending>()?;
    m.add_class::<evict::Eviction>()?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(format_size, m)?)?;
    m.add_function(wrap_pyfunction!(default_socket_path, m)?)?;
    m.add_function(wrap_pyfunction!(_error_for_wire_kind, m)?)?;
    m.add_function(wrap_pyfunction!(_finish_eviction_callbacks, m)?)?;
    m.add_function(wrap_pyfunction!(_after_fork_in_child, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SLICE_SECONDS", pending::SLICE.as_secs_f64())?;
    Ok(())
}
