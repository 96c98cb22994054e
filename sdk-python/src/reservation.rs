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
//!
//! A reservation marked idle (`set_idle`, or reserved with `evictable=True`)
//! may be evicted: the daemon asks for it back, its `on_evict` callback runs
//! (see `evict.rs`), and the SDK releases it. Releasing it afterwards — a
//! `with` block ending — is a no-op, never an error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::PyTraverseError;
use pyo3::exceptions::PyTypeError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use vramd_client::ErrorKind;
use vramd_client::util::lock;

use crate::client::Client;
use crate::convert::RequestSpec;
use crate::errors::{ErrorClass, new_error, to_py_err, usage_error};
use crate::evict::{EvictHook, Eviction};

/// A granted VRAM reservation: the memory is yours until you release it.
///
/// Use it as a context manager (``with client.reserve("8GiB") as r:``) or
/// call :meth:`release`. It is also released when garbage-collected, when its
/// client is closed, and when the process exits or dies. Marked idle
/// (:meth:`set_idle`, or reserved with ``evictable=True``), it may also be
/// evicted: the daemon asks for it back when a waiter needs the room, its
/// :meth:`on_evict` callback runs, and it is released.
#[pyclass(module = "vramd", frozen)]
pub struct Reservation {
    // Locked only with the GIL released: a round trip may hold it.
    inner: Mutex<Option<vramd_client::Reservation>>,
    // The eviction callback and whether the daemon asked for it back.
    hook: Arc<EvictHook>,
    // Set once `release()` ran in the process that holds it.
    released: AtomicBool,
    /// The reservation's id, as ``vramctl status`` shows it.
    #[pyo3(get)]
    id: u64,
    /// Index of the device it is on, as ``nvidia-smi`` numbers devices.
    #[pyo3(get)]
    device_index: u32,
    /// UUID of the device it is on (``GPU-…``, or ``SIM-…`` on a simulated
    /// device).
    #[pyo3(get)]
    device_uuid: String,
    // Bytes reserved (the `bytes` getter): changed by `resize`.
    bytes: std::sync::atomic::AtomicU64,
    /// The label it was requested with, if any.
    #[pyo3(get)]
    label: Option<String>,
    /// The priority it was requested with.
    #[pyo3(get)]
    priority: i32,
    /// The client it was made through (kept alive as long as the
    /// reservation).
    #[pyo3(get)]
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
            hook: EvictHook::install(&r),
            id: r.id().0,
            device_index: r.device_index(),
            device_uuid: r.device_uuid().to_string(),
            bytes: std::sync::atomic::AtomicU64::new(r.bytes()),
            label: spec.label.clone(),
            priority: spec.priority,
            inner: Mutex::new(Some(r)),
            released: AtomicBool::new(false),
            client,
            pid: std::process::id(),
        }
    }

    /// Whether this process is the one holding it (false in a child after
    /// `fork()`).
    fn owned(&self) -> bool {
        std::process::id() == self.pid
    }

    /// The error for using it after the daemon evicted it.
    fn evicted_error(&self, py: Python<'_>) -> PyErr {
        new_error(
            py,
            ErrorClass::NotFound,
            format!(
                "reservation {} was evicted: the daemon asked for its memory back and it \
                 is released; reserve again",
                self.id
            ),
            Some(ErrorKind::NotFound),
            Some(self.client.bind(py).get().socket_path()),
        )
    }

    /// The Python exception for an SDK error about this reservation; a
    /// `not_found` from the daemon after an eviction says so.
    fn sdk_error(&self, py: Python<'_>, e: vramd_client::Error) -> PyErr {
        if e.kind() == Some(ErrorKind::NotFound) && self.hook.asked() {
            return self.evicted_error(py);
        }
        to_py_err(py, e, self.client.bind(py).get().socket_path())
    }

    /// Checks that a request about it may be sent: it is this process's and
    /// the daemon did not evict it.
    fn check_usable(&self, py: Python<'_>) -> PyResult<()> {
        if !self.owned() {
            return Err(usage_error(
                py,
                "a reservation inherited through fork() belongs to the parent process",
            ));
        }
        if self.hook.evicted() {
            return Err(self.evicted_error(py));
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Garbage-collected (with the GIL held): an eviction request racing
        // the release must not run the callback of a reservation gone.
        drop(self.hook.take_callback());
    }
}

#[pymethods]
impl Reservation {
    /// Whether it is released: ``release()`` ran, its client was closed, or
    /// it was evicted. In a child process after ``fork()`` it stays
    /// ``False``: the parent holds it, whatever the child does.
    #[getter]
    fn released(&self, py: Python<'_>) -> bool {
        if !self.owned() {
            return false;
        }
        self.released.load(Ordering::SeqCst)
            || self.hook.evicted()
            || self.client.bind(py).get().is_closed()
    }

    /// Whether the daemon evicted it: it asked for the memory back, the
    /// :meth:`on_evict` callback (if any) returned, and the reservation is
    /// released. ``False`` in a child process after ``fork()``.
    #[getter]
    fn evicted(&self) -> bool {
        self.owned() && self.hook.evicted()
    }

    /// Why it was lost, or ``None``: the daemon went away and the client
    /// could not reclaim it (the daemon did not come back within 60 s, or
    /// refused it). A daemon restart alone loses nothing: the client
    /// reconnects and reclaims it by itself.
    #[getter]
    fn lost(&self) -> Option<String> {
        lock(&self.inner).as_ref().and_then(|r| r.is_lost())
    }

    /// Marks the reservation idle (``True``, the default: its model is kept
    /// warm and the daemon may evict it when a waiter needs the room) or busy
    /// (``False``: never evicted). Mark it busy while the model is in use,
    /// idle when it is not. Waits for the daemon's answer with the GIL
    /// released. Raises ``vramd.NotFound`` once it was evicted, and
    /// ``vramd.VramdError`` once it was released or in a child process after
    /// ``fork()``.
    #[pyo3(signature = (idle = true))]
    fn set_idle(&self, py: Python<'_>, idle: bool) -> PyResult<()> {
        self.check_usable(py)?;
        let result = py.detach(|| lock(&self.inner).as_ref().map(|r| r.set_idle(idle)));
        match result {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.sdk_error(py, e)),
            None => Err(usage_error(
                py,
                format!("reservation {} is released", self.id),
            )),
        }
    }

    /// Sets the function called when the daemon asks for this (idle)
    /// reservation back: ``callback(eviction)``, with a :class:`Eviction`.
    /// It should unload the model (free the GPU memory) before
    /// ``eviction.deadline`` seconds pass; when it returns, the reservation
    /// is released. Returns ``callback``, so it also works as a decorator
    /// (``@r.on_evict``).
    ///
    /// The callback runs on an SDK thread, holding the GIL. An exception it
    /// raises is reported through ``sys.unraisablehook``, and the
    /// reservation is released all the same. Without a callback an evicted
    /// reservation is released at once. A later call replaces the callback.
    /// If the daemon already asked for the reservation, ``callback`` is
    /// called at once, in the calling thread (an exception it raises then
    /// propagates). Raises ``TypeError`` if ``callback`` is not callable and
    /// ``vramd.VramdError`` if the reservation was released; does nothing in
    /// a child process after ``fork()``.
    fn on_evict<'py>(
        &self,
        py: Python<'py>,
        callback: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !callback.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "on_evict() takes a callable, not {}",
                callback.get_type().name()?
            )));
        }
        if !self.owned() {
            // The parent's reservation: this process is never asked for it.
            return Ok(callback);
        }
        if !self.hook.asked() && self.released(py) {
            return Err(usage_error(
                py,
                format!(
                    "reservation {} is released; an eviction callback would never run",
                    self.id
                ),
            ));
        }
        match self.hook.register(callback.clone().unbind()) {
            Ok(replaced) => drop(replaced),
            Err((now, eviction)) => {
                let eviction = Bound::new(py, Eviction::from(&eviction))?;
                now.bind(py).call1((eviction,))?;
            }
        }
        Ok(callback)
    }

    /// Releases the reservation and waits for the daemon to confirm.
    /// Idempotent: releasing twice, or after the connection was lost (which
    /// released it already), does nothing. In a child process after
    /// ``fork()`` it does nothing either: the reservation is the parent's.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if !self.owned() || self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // The callback will not run any more: let go of what it refers to.
        drop(self.hook.take_callback());
        let result = py.detach(|| lock(&self.inner).take().map(|r| r.release()));
        match result {
            None | Some(Ok(())) => Ok(()),
            // The SDK's own release after an eviction got there first.
            Some(Err(e)) if e.kind() == Some(ErrorKind::NotFound) && self.hook.asked() => Ok(()),
            Some(Err(e)) => Err(to_py_err(py, e, self.client.bind(py).get().socket_path())),
        }
    }

    /// Declares more processes (e.g. workers this program started) whose GPU
    /// usage counts against this reservation; their descendants count too.
    /// The daemon accepts only your own processes unless you are root
    /// (``vramd.PermissionDenied`` otherwise, also for a process that does
    /// not exist). Returns every pid the reservation now speaks for.
    fn attach_pids(&self, py: Python<'_>, pids: Vec<u32>) -> PyResult<Vec<u32>> {
        self.check_usable(py)?;
        let result = py.detach(|| lock(&self.inner).as_ref().map(|r| r.attach_pids(&pids)));
        match result {
            Some(Ok(all)) => Ok(all),
            Some(Err(e)) => Err(self.sdk_error(py, e)),
            None => Err(usage_error(
                py,
                format!("reservation {} is released", self.id),
            )),
        }
    }

    /// Bytes reserved (as granted, or as last resized).
    #[getter]
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Changes its size (an int of bytes or a string such as ``"6GiB"``).
    /// Shrinking always succeeds; growing succeeds only if the device has the
    /// room now — room its processes already use costs nothing, so a model
    /// that proved larger than reserved grows to its real usage at once —
    /// else ``vramd.WaitTimeout`` is raised and it keeps its size. It never
    /// waits.
    fn resize(&self, py: Python<'_>, size: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = crate::convert::size_bytes(size)?;
        self.check_usable(py)?;
        let result = py.detach(|| lock(&self.inner).as_ref().map(|r| r.resize(bytes)));
        match result {
            Some(Ok(())) => {
                self.bytes.store(bytes, Ordering::SeqCst);
                Ok(())
            }
            Some(Err(e)) => Err(self.sdk_error(py, e)),
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

    /// Context manager: releases the reservation, also when the block raised
    /// (after an eviction there is nothing left to release).
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

    /// Lets the garbage collector see the eviction callback, so a callback
    /// that refers back to the reservation does not keep it alive forever.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.client)?;
        self.hook.traverse(&visit)
    }

    /// Breaks a reference cycle through the eviction callback.
    fn __clear__(&self) {
        drop(self.hook.take_callback());
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<vramd.Reservation id={} device={} ({}) bytes={} ({}){}{}>",
            self.id,
            self.device_index,
            self.device_uuid,
            self.bytes(),
            vramd_client::format_size(self.bytes()),
            match &self.label {
                Some(l) => format!(" label={l:?}"),
                None => String::new(),
            },
            if self.evicted() {
                " evicted"
            } else if self.released(py) {
                " released"
            } else {
                ""
            }
        )
    }
}
