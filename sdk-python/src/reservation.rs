//! The Python `Reservation`: a granted reservation and its lifecycle.
//!
//! It is released by `release()` (idempotent), by leaving a `with` /
//! `async with` block, when the object is garbage-collected (the SDK guard's
//! `Drop` sends the release), and when its client's connection closes —
//! which is also what happens when the process dies. It keeps its `Client`
//! alive, so a reservation made through a temporary client stays held.
//!
//! After `fork()` the child inherits the object but not the reservation: in
//! the child, `release()` and garbage collection do nothing (the SDK checks
//! the process id), and the parent keeps holding it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::client::Client;
use crate::convert::RequestSpec;
use crate::errors::{to_py_err, usage_error};
use crate::pending::lock;

/// A granted VRAM reservation: the memory is yours until you release it.
///
/// Use it as a context manager (``with client.reserve("8GiB") as r:``) or
/// call :meth:`release`. It is also released when garbage-collected, when its
/// client is closed, and when the process exits or dies.
#[pyclass(module = "vramd", frozen)]
pub struct Reservation {
    // Locked only with the GIL released: a round trip may hold it.
    inner: Mutex<Option<vramd_client::Reservation>>,
    // Set once `release()` ran in the process that holds it.
    released: AtomicBool,
    id: u64,
    device_index: u32,
    device_uuid: String,
    bytes: u64,
    label: Option<String>,
    priority: i32,
    client: Py<Client>,
    pid: u32,
}

impl Reservation {
    pub(crate) fn new(
        r: vramd_client::Reservation,
        spec: &RequestSpec,
        client: Py<Client>,
    ) -> Self {
        Self {
            id: r.id().0,
            device_index: r.device_index(),
            device_uuid: r.device_uuid().to_string(),
            bytes: r.bytes(),
            label: spec.label.clone(),
            priority: spec.priority,
            inner: Mutex::new(Some(r)),
            released: AtomicBool::new(false),
            client,
            pid: std::process::id(),
        }
    }
}

#[pymethods]
impl Reservation {
    /// The reservation's id, as ``vramctl status`` shows it.
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// Index of the device it is on, as ``nvidia-smi`` numbers devices.
    #[getter]
    fn device_index(&self) -> u32 {
        self.device_index
    }

    /// UUID of the device it is on (``GPU-…``, or ``SIM-…`` on a simulated
    /// device).
    #[getter]
    fn device_uuid(&self) -> &str {
        &self.device_uuid
    }

    /// Bytes reserved.
    #[getter]
    fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The label it was requested with, if any.
    #[getter]
    fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }

    /// The priority it was requested with.
    #[getter]
    fn priority(&self) -> i32 {
        self.priority
    }

    /// The client it was made through (kept alive as long as the
    /// reservation).
    #[getter]
    fn client(&self, py: Python<'_>) -> Py<Client> {
        self.client.clone_ref(py)
    }

    /// Whether it is released: ``release()`` ran or its client was closed.
    /// In a child process after ``fork()`` it stays ``False``: the parent
    /// holds it, whatever the child does.
    #[getter]
    fn released(&self, py: Python<'_>) -> bool {
        if std::process::id() != self.pid {
            return false;
        }
        self.released.load(Ordering::SeqCst) || self.client.bind(py).get().is_closed()
    }

    /// Releases the reservation and waits for the daemon to confirm.
    /// Idempotent: releasing twice, or after the connection was lost (which
    /// released it already), does nothing. In a child process after
    /// ``fork()`` it does nothing either: the reservation is the parent's.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if std::process::id() != self.pid || self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = py.detach(|| lock(&self.inner).take().map(|r| r.release()));
        match result {
            None | Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(to_py_err(py, e, self.client.bind(py).get().socket_path())),
        }
    }

    /// Declares more processes (e.g. workers this program started) whose GPU
    /// usage counts against this reservation; their descendants count too.
    /// The daemon accepts only your own processes unless you are root
    /// (``vramd.PermissionDenied`` otherwise, also for a process that does
    /// not exist). Returns every pid the reservation now speaks for.
    fn attach_pids(&self, py: Python<'_>, pids: Vec<u32>) -> PyResult<Vec<u32>> {
        if std::process::id() != self.pid {
            return Err(usage_error(
                py,
                "a reservation inherited through fork() belongs to the parent process",
            ));
        }
        let result = py.detach(|| lock(&self.inner).as_ref().map(|r| r.attach_pids(&pids)));
        match result {
            Some(Ok(all)) => Ok(all),
            Some(Err(e)) => Err(to_py_err(py, e, self.client.bind(py).get().socket_path())),
            None => Err(usage_error(
                py,
                format!("reservation {} is released", self.id),
            )),
        }
    }

    /// Context manager: returns the reservation itself.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Context manager: releases the reservation, also when the block raised.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.release(py)?;
        Ok(false)
    }

    /// Async context manager: returns the reservation itself.
    fn __aenter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("vramd._aio")?
            .call_method1("_enter", (slf,))
    }

    /// Async context manager: releases the reservation in a worker thread,
    /// so the event loop is not blocked by the round trip.
    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(
        slf: &Bound<'py, Self>,
        _exc: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("vramd._aio")?
            .call_method1("release_async", (slf,))
    }

    /// Caps PyTorch's CUDA caching allocator on this reservation's device to
    /// the reserved bytes, with
    /// ``torch.cuda.set_per_process_memory_fraction(bytes / total, device)``,
    /// and returns the fraction set. ``device`` is the torch device to cap
    /// (an index, ``"cuda:N"`` or a ``torch.device``); by default the one
    /// whose UUID matches the reservation's, else ``device_index``. Raises
    /// ``vramd.TorchUnavailable`` when PyTorch is not installed or sees no
    /// CUDA device.
    #[pyo3(signature = (device = None))]
    fn apply_torch_limit(
        slf: &Bound<'_, Self>,
        device: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<f64> {
        slf.py()
            .import("vramd._torch")?
            .call_method1("apply_torch_limit", (slf, device))?
            .extract()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<vramd.Reservation id={} device={} ({}) bytes={} ({}){}{}>",
            self.id,
            self.device_index,
            self.device_uuid,
            self.bytes,
            vramd_client::format_size(self.bytes),
            match &self.label {
                Some(l) => format!(" label={l:?}"),
                None => String::new(),
            },
            if self.released(py) { " released" } else { "" }
        )
    }
}
