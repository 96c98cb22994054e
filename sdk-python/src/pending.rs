//! Waiting for a grant without holding the GIL, and staying interruptible.
//!
//! A [`Waiter`] owns one SDK [`vramd_client::Pending`]. Waits happen in short
//! slices with the GIL released; between slices the waiting thread takes the
//! GIL back to run Python's signal handlers, so Ctrl-C raises
//! `KeyboardInterrupt` within a slice, after the request is withdrawn.
//!
//! Cancelling never blocks: it raises a flag and, if no thread is inside a
//! slice, withdraws the request at once; otherwise the waiting thread
//! withdraws it when its slice ends. A grant that races a cancel is released.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use vramd_client::Progress;
use vramd_client::util::lock;

use crate::client::Client;
use crate::convert::{RequestSpec, seconds};
use crate::errors::{ErrorClass, new_error, to_py_err, usage_error};
use crate::reservation::Reservation;

/// Longest the GIL stays released in one go while waiting, and so the longest
/// a Ctrl-C waits to be noticed.
pub(crate) const SLICE: Duration = Duration::from_millis(50);

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Waiting,
    Granted,
    Failed,
    Cancelled,
}

#[derive(Debug)]
struct State {
    outcome: Outcome,
    id: Option<u64>,
    position: Option<u32>,
}

/// Why a slice ended without a grant or a wait.
enum StepError {
    Sdk(vramd_client::Error),
    Cancelled,
    Finished(Outcome),
}

/// One request on its way, shared between the threads that wait on it and
/// the ones that cancel it.
#[derive(Debug)]
pub(crate) struct Waiter {
    pending: Mutex<Option<vramd_client::Pending>>,
    cancel_requested: AtomicBool,
    state: Mutex<State>,
    socket: PathBuf,
}

impl Waiter {
    pub(crate) fn new(pending: vramd_client::Pending, socket: PathBuf) -> Self {
        Self {
            pending: Mutex::new(Some(pending)),
            cancel_requested: AtomicBool::new(false),
            state: Mutex::new(State {
                outcome: Outcome::Waiting,
                id: None,
                position: None,
            }),
            socket,
        }
    }

    fn set_outcome(&self, outcome: Outcome) {
        lock(&self.state).outcome = outcome;
    }

    fn outcome(&self) -> Outcome {
        let outcome = lock(&self.state).outcome;
        if outcome == Outcome::Waiting && self.cancel_requested.load(Ordering::SeqCst) {
            Outcome::Cancelled
        } else {
            outcome
        }
    }

    /// Waits up to `slice` for the next event. Called with the GIL released.
    fn step(&self, slice: Duration) -> Result<Option<vramd_client::Reservation>, StepError> {
        let mut guard = lock(&self.pending);
        let Some(pending) = guard.as_mut() else {
            return Err(StepError::Finished(lock(&self.state).outcome));
        };
        if self.cancel_requested.load(Ordering::SeqCst) {
            if let Some(p) = guard.take() {
                let _ = p.cancel();
            }
            self.set_outcome(Outcome::Cancelled);
            return Err(StepError::Cancelled);
        }
        match pending.next(Some(slice)) {
            Ok(None) => Ok(None),
            Ok(Some(Progress::Queued { id, position })) => {
                let mut st = lock(&self.state);
                st.id = Some(id.0);
                st.position = Some(position);
                Ok(None)
            }
            Ok(Some(Progress::Granted(r))) => {
                guard.take();
                if self.cancel_requested.load(Ordering::SeqCst) {
                    // Cancelled while the grant was on its way: give it back.
                    drop(r);
                    self.set_outcome(Outcome::Cancelled);
                    return Err(StepError::Cancelled);
                }
                let mut st = lock(&self.state);
                st.outcome = Outcome::Granted;
                st.id = Some(r.id().0);
                st.position = None;
                Ok(Some(r))
            }
            Err(e) => {
                guard.take();
                self.set_outcome(Outcome::Failed);
                Err(StepError::Sdk(e))
            }
        }
    }

    fn step_error(&self, py: Python<'_>, e: StepError) -> PyErr {
        match e {
            StepError::Sdk(e) => to_py_err(py, e, &self.socket),
            StepError::Cancelled | StepError::Finished(Outcome::Cancelled) => cancelled(py),
            StepError::Finished(Outcome::Granted) => {
                usage_error(py, "this request was already granted")
            }
            StepError::Finished(_) => usage_error(py, "this request already failed"),
        }
    }

    /// Waits for the grant for at most `limit` (`None`: as long as it
    /// takes), slice by slice, running signal handlers in between. `Ok(None)`
    /// when the limit passed first. Any error — a `KeyboardInterrupt` from a
    /// handler included — withdraws the request.
    pub(crate) fn wait(
        &self,
        py: Python<'_>,
        limit: Option<Duration>,
    ) -> PyResult<Option<vramd_client::Reservation>> {
        let deadline = limit.map(|l| Instant::now() + l);
        loop {
            let slice = match deadline {
                None => SLICE,
                Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
            };
            match py.detach(|| self.step(slice)) {
                Ok(Some(r)) => return Ok(Some(r)),
                Ok(None) => {}
                Err(e) => return Err(self.step_error(py, e)),
            }
            if let Err(e) = py.check_signals() {
                py.detach(|| self.cancel());
                return Err(e);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    /// Withdraws the request, without blocking (see the module docs).
    pub(crate) fn cancel(&self) {
        if lock(&self.state).outcome != Outcome::Waiting {
            return;
        }
        self.cancel_requested.store(true, Ordering::SeqCst);
        let taken = match self.pending.try_lock() {
            Ok(mut g) => g.take(),
            Err(TryLockError::Poisoned(e)) => e.into_inner().take(),
            // A thread is inside a slice; it withdraws the request when the
            // slice ends.
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(p) = taken {
            let _ = p.cancel();
            self.set_outcome(Outcome::Cancelled);
        }
    }
}

fn cancelled(py: Python<'_>) -> PyErr {
    new_error(
        py,
        ErrorClass::Cancelled,
        "the request was cancelled before it was granted".into(),
        None,
        None,
    )
}

/// A request sent to the daemon and not yet granted (`Client.submit`).
///
/// Dropping it before the grant withdraws the request.
#[pyclass(module = "vramd", frozen)]
pub struct Pending {
    waiter: Waiter,
    spec: RequestSpec,
    /// The client the request was sent through.
    #[pyo3(get)]
    client: Py<Client>,
}

impl Pending {
    pub(crate) fn new(waiter: Waiter, spec: RequestSpec, client: Py<Client>) -> Self {
        Self {
            waiter,
            spec,
            client,
        }
    }

    /// Waits like [`Waiter::wait`] and wraps a grant in a [`Reservation`].
    pub(crate) fn wait_for(
        &self,
        py: Python<'_>,
        limit: Option<Duration>,
    ) -> PyResult<Option<Reservation>> {
        Ok(self
            .waiter
            .wait(py, limit)?
            .map(|r| Reservation::new(r, &self.spec, self.client.clone_ref(py))))
    }
}

#[pymethods]
impl Pending {
    /// Waits up to ``timeout`` seconds for the grant and returns the
    /// :class:`Reservation`, or ``None`` if it is still waiting. ``0`` (the
    /// default) only looks; ``None`` waits as long as it takes. The GIL is
    /// released while waiting; Ctrl-C withdraws the request and raises
    /// ``KeyboardInterrupt``. Raises the request's error (``WaitTimeout``,
    /// ``Refused``, ``Disconnected``, ``Cancelled``…) once it fails.
    #[pyo3(signature = (timeout = 0.0))]
    fn poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Reservation>> {
        self.wait_for(py, seconds("timeout", timeout)?)
    }

    /// Waits for the grant and returns the :class:`Reservation` (the wait
    /// limit, if any, is the one given to ``submit``). The GIL is released
    /// while waiting; Ctrl-C withdraws the request and raises
    /// ``KeyboardInterrupt``.
    fn wait(&self, py: Python<'_>) -> PyResult<Reservation> {
        // A wait without a limit only ends in a grant or an error.
        self.wait_for(py, None)?
            .ok_or_else(|| usage_error(py, "the wait ended without a grant"))
    }

    /// Withdraws the request. Never blocks; does nothing once it was granted
    /// or failed. A grant that crosses the cancel on the wire is released.
    fn cancel(&self, py: Python<'_>) {
        py.detach(|| self.waiter.cancel());
    }

    /// The reservation id the daemon gave the request when it queued it
    /// (``None`` until it queued or was granted).
    #[getter]
    fn id(&self) -> Option<u64> {
        lock(&self.waiter.state).id
    }

    /// The last known queue position (1 is next), or ``None`` when it is not
    /// known to wait.
    #[getter]
    fn position(&self) -> Option<u32> {
        lock(&self.waiter.state).position
    }

    /// Bytes requested.
    #[getter]
    fn bytes(&self) -> u64 {
        self.spec.bytes
    }

    /// Whether the request is over: granted, failed or cancelled.
    #[getter]
    fn done(&self) -> bool {
        self.waiter.outcome() != Outcome::Waiting
    }

    /// Whether the request was cancelled.
    #[getter]
    fn cancelled(&self) -> bool {
        self.waiter.outcome() == Outcome::Cancelled
    }

    fn __repr__(&self) -> String {
        let state = match self.waiter.outcome() {
            Outcome::Waiting => "waiting",
            Outcome::Granted => "granted",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        };
        format!(
            "<vramd.Pending {} ({}) {state}{}>",
            self.spec.bytes,
            vramd_client::format_size(self.spec.bytes),
            match lock(&self.waiter.state).position {
                Some(p) => format!(" at position {p}"),
                None => String::new(),
            }
        )
    }
}
