//! The Python `Client`: one connection to the daemon.
//!
//! Every blocking call (connect, submit, status, ping) runs with the GIL
//! released. Closing the client — explicitly, by leaving its `with` block, or
//! when the last reference to it goes away — closes the connection, and the
//! daemon releases everything it held.
//!
//! A client belongs to the process that opened it: after `fork()` the child
//! must open its own, and using the parent's raises `vramd.VramdError` rather
//! than sending requests on the parent's session (whose replies the child
//! could never read).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use vramd_client::paths;
use vramd_client::util::lock;

use crate::convert::RequestSpec;
use crate::errors::{ErrorClass, new_error, to_py_err, usage_error};
use crate::pending::{Pending, Waiter};
use crate::reservation::Reservation;

/// A connection to the vramd daemon.
///
/// ``socket`` is the daemon's socket path; by default the one ``vramctl``
/// uses: ``$VRAMD_SOCKET``, else ``$XDG_RUNTIME_DIR/vramd.sock`` if it exists,
/// else ``/run/vramd/vramd.sock``. Several reservations may share one client.
/// Closing it (``close()``, leaving ``with vramd.Client() as c:``, or
/// garbage collection) releases every reservation made through it.
#[pyclass(module = "vramd", frozen)]
pub struct Client {
    inner: std::sync::Mutex<Option<Arc<vramd_client::Client>>>,
    socket: PathBuf,
    /// The daemon's program version, from the handshake.
    #[pyo3(get)]
    daemon_version: String,
    pid: u32,
}

impl Client {
    /// The socket path this client connected to.
    pub(crate) fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Whether `close()` was called (in the process that opened it).
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.inner).is_none()
    }

    /// The SDK client, or the error that says why it cannot be used.
    fn handle(&self, py: Python<'_>) -> PyResult<Arc<vramd_client::Client>> {
        if std::process::id() != self.pid {
            return Err(usage_error(
                py,
                format!(
                    "this vramd.Client was opened by process {}; after fork() a child \
                     must open its own Client (vramd.reserve() does so by itself)",
                    self.pid
                ),
            ));
        }
        lock(&self.inner).clone().ok_or_else(|| {
            new_error(
                py,
                ErrorClass::Disconnected,
                format!(
                    "this vramd.Client for {} was closed; open a new one",
                    self.socket.display()
                ),
                None,
                Some(&self.socket),
            )
        })
    }

    /// Sends a validated request and returns the Python `Pending` for it.
    fn submit_spec(slf: &Bound<'_, Self>, spec: RequestSpec) -> PyResult<Pending> {
        let py = slf.py();
        let this = slf.get();
        let client = this.handle(py)?;
        let request = spec.request.clone();
        let pending = py
            .detach(move || client.submit(request))
            .map_err(|e| to_py_err(py, e, &this.socket))?;
        Ok(Pending::new(
            Waiter::new(pending, this.socket.clone()),
            spec,
            slf.clone().unbind(),
        ))
    }
}

#[pymethods]
impl Client {
    /// Connects to the daemon (see the class docs for the default socket).
    /// Raises ``vramd.DaemonNotRunning`` when nothing listens there.
    /// ``reconnect``: when the connection closes under the client (the
    /// daemon stopped or restarted), how many seconds to try to reach it
    /// again and reclaim what the client holds (``None``: never).
    #[new]
    #[pyo3(signature = (socket = None, *, reconnect = Some(60.0)))]
    fn new(py: Python<'_>, socket: Option<PathBuf>, reconnect: Option<f64>) -> PyResult<Self> {
        let window = match reconnect {
            None => None,
            Some(s) if s.is_finite() && s >= 0.0 => Some(std::time::Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "reconnect must be None or a number of seconds >= 0, not {s}"
                )));
            }
        };
        let path = socket.unwrap_or_else(paths::client_socket_path);
        let client = py
            .detach(|| vramd_client::Client::connect_with(&path, window))
            .map_err(|e| to_py_err(py, e, &path))?;
        let daemon_version = client.daemon_version().to_string();
        Ok(Self {
            inner: std::sync::Mutex::new(Some(Arc::new(client))),
            socket: path,
            daemon_version,
            pid: std::process::id(),
        })
    }

    /// Reserves ``size`` bytes of VRAM and waits for the grant.
    ///
    /// ``size`` is an int of bytes or a string such as ``"8GiB"``,
    /// ``"512MiB"`` or ``"8GB"``. ``device`` is ``None`` or ``"any"``, an
    /// index, or a UUID. Higher ``priority`` is granted first. ``label`` is
    /// shown in ``vramctl status``. ``timeout`` is the longest wait in seconds
    /// (``None``: as long as it takes; ``0``: only if it fits now); past it
    /// ``vramd.WaitTimeout`` is raised. ``evictable=True`` makes the
    /// reservation idle from the start: the daemon may ask for it back when a
    /// waiter needs the room (see :meth:`Reservation.on_evict` and
    /// :meth:`Reservation.set_idle`). ``for_pids`` (a list of pids)
    /// reserves for those processes instead of this one — e.g. the model
    /// runners of a server this program fronts; ``[]``: no process until
    /// :meth:`Reservation.attach_pids` — and adopts what they already use:
    /// a model already loaded is granted at once. The GIL is released while waiting;
    /// Ctrl-C withdraws the request and raises ``KeyboardInterrupt``.
    #[pyo3(signature = (size, *, device = None, priority = 0, label = None, timeout = None, evictable = false, for_pids = None))]
    #[allow(clippy::too_many_arguments)]
    fn reserve(
        slf: &Bound<'_, Self>,
        size: &Bound<'_, PyAny>,
        device: Option<&Bound<'_, PyAny>>,
        priority: i32,
        label: Option<String>,
        timeout: Option<f64>,
        evictable: bool,
        for_pids: Option<Vec<u32>>,
    ) -> PyResult<Reservation> {
        let spec = RequestSpec::new(size, device, priority, label, timeout, evictable, for_pids)?;
        let pending = Self::submit_spec(slf, spec)?;
        let py = slf.py();
        pending
            .wait_for(py, None)?
            .ok_or_else(|| usage_error(py, "the wait ended without a grant"))
    }

    /// Sends a reservation request and returns at once with a
    /// :class:`Pending`, to wait on with ``poll()`` or ``wait()``. Same
    /// arguments as :meth:`reserve`.
    #[pyo3(signature = (size, *, device = None, priority = 0, label = None, timeout = None, evictable = false, for_pids = None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        slf: &Bound<'_, Self>,
        size: &Bound<'_, PyAny>,
        device: Option<&Bound<'_, PyAny>>,
        priority: i32,
        label: Option<String>,
        timeout: Option<f64>,
        evictable: bool,
        for_pids: Option<Vec<u32>>,
    ) -> PyResult<Pending> {
        let spec = RequestSpec::new(size, device, priority, label, timeout, evictable, for_pids)?;
        Self::submit_spec(slf, spec)
    }

    /// Reserves from asyncio code without blocking the event loop. Same
    /// arguments as :meth:`reserve`. The result can be awaited
    /// (``r = await client.reserve_async("8GiB")``) or used as an async
    /// context manager (``async with client.reserve_async("8GiB") as r:``),
    /// which releases on exit. Cancelling the awaiting task withdraws the
    /// request.
    #[pyo3(signature = (size, *, device = None, priority = 0, label = None, timeout = None, evictable = false, for_pids = None))]
    #[allow(clippy::too_many_arguments)]
    fn reserve_async<'py>(
        slf: &Bound<'py, Self>,
        size: &Bound<'py, PyAny>,
        device: Option<&Bound<'py, PyAny>>,
        priority: i32,
        label: Option<String>,
        timeout: Option<f64>,
        evictable: bool,
        for_pids: Option<Vec<u32>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // Validate now, so a bad argument fails at the call, not at the await.
        RequestSpec::new(
            size,
            device,
            priority,
            label.clone(),
            timeout,
            evictable,
            for_pids.clone(),
        )?;
        let py = slf.py();
        let kwargs = PyDict::new(py);
        kwargs.set_item("device", device)?;
        kwargs.set_item("priority", priority)?;
        kwargs.set_item("label", label)?;
        kwargs.set_item("timeout", timeout)?;
        kwargs.set_item("evictable", evictable)?;
        kwargs.set_item("for_pids", for_pids)?;
        py.import("vramd._aio")?
            .getattr("ReserveAsync")?
            .call((slf, size), Some(&kwargs))
    }

    /// The daemon's state as a dict with the same schema as
    /// ``vramctl status --json``: ``daemon_version``, ``backend``,
    /// ``uptime_ms``, ``devices``, ``reservations``, ``queue``, ``counters``.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.handle(py)?;
        let status = py
            .detach(move || client.status())
            .map_err(|e| to_py_err(py, e, &self.socket))?;
        let json = serde_json::to_string(&status).map_err(|e| {
            new_error(
                py,
                ErrorClass::ProtocolError,
                format!("cannot encode the status as JSON: {e}"),
                None,
                Some(&self.socket),
            )
        })?;
        py.import("json")?.call_method1("loads", (json,))
    }

    /// Round trip to the daemon; raises if it does not answer.
    fn ping(&self, py: Python<'_>) -> PyResult<()> {
        let client = self.handle(py)?;
        py.detach(move || client.ping())
            .map_err(|e| to_py_err(py, e, &self.socket))
    }

    /// Closes the connection; the daemon releases every reservation made
    /// through it and withdraws its waiting requests. Idempotent. In a child
    /// after ``fork()`` it leaves the parent's connection alone.
    fn close(&self, py: Python<'_>) {
        let client = lock(&self.inner).take();
        // The SDK shuts the socket down only in the process that opened it.
        py.detach(move || drop(client));
    }

    /// Whether :meth:`close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.is_closed()
    }

    /// The socket path this client is connected to.
    #[getter]
    fn socket(&self) -> String {
        self.socket.display().to_string()
    }

    /// Context manager: returns the client itself.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Context manager: closes the client, releasing its reservations.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "<vramd.Client socket={:?} daemon={:?}{}>",
            self.socket.display().to_string(),
            self.daemon_version,
            if self.is_closed() { " closed" } else { "" }
        )
    }
}
