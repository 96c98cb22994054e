//! Eviction on the Python side: the `Eviction` class, and the hook that runs
//! a reservation's Python callback when the daemon asks for its memory back.
//!
//! Every reservation gets an SDK eviction handler when it is wrapped
//! ([`EvictHook::install`]); the Python callback lives in the hook, not in
//! the SDK guard. So:
//! - `Reservation.on_evict` never locks the SDK guard: the SDK keeps its
//!   handler lock while a callback runs, and a callback waits for the GIL, so
//!   taking that lock with the GIL held could deadlock;
//! - the garbage collector sees the callback (`Reservation.__traverse__`): a
//!   callback that refers back to its reservation — a bound method of the
//!   object holding it — does not keep the reservation alive forever;
//! - a callback registered after the daemon asked is run at once rather than
//!   never.
//!
//! The callback runs on the SDK's eviction thread, attached to the
//! interpreter (holding the GIL). An exception it raises goes to
//! `sys.unraisablehook`; either way the SDK releases the reservation when it
//! returns. Without a callback the reservation is released at once.
//!
//! A thread that is not Python's own must not be inside the interpreter when
//! it finalizes: CPython ends such a thread under its feet (or crashes when
//! it lets go of the GIL). So the package registers
//! [`finish_callbacks`] with `atexit`: from then on no callback starts, and
//! the exit waits — with the GIL released — for the ones running to return,
//! each at most until its eviction deadline.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use pyo3::PyTraverseError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;

use vramd_client::util::lock;

/// The daemon's request to give a reservation back, as an eviction callback
/// receives it (see :meth:`Reservation.on_evict`).
///
/// ``id`` is the reservation to give back, ``deadline`` the seconds the
/// holder has to unload before the daemon tries someone else, and ``reason``
/// says who needs the room.
#[pyclass(module = "vramd", frozen)]
pub struct Eviction {
    /// The id of the reservation the daemon wants back.
    #[pyo3(get)]
    id: u64,
    /// Seconds the holder has to unload, counted from when the daemon asked;
    /// past it the daemon asks someone else and the request keeps waiting.
    #[pyo3(get)]
    deadline: f64,
    /// Who needs the room, in words (e.g. the waiting request's size and
    /// label).
    #[pyo3(get)]
    reason: String,
}

impl From<&vramd_client::Eviction> for Eviction {
    fn from(e: &vramd_client::Eviction) -> Self {
        Self {
            id: e.id.0,
            deadline: e.deadline.as_secs_f64(),
            reason: e.reason.clone(),
        }
    }
}

#[pymethods]
impl Eviction {
    /// Builds one by hand, e.g. to test an eviction callback without a
    /// daemon. The SDK builds the ones callbacks receive.
    #[new]
    fn new(id: u64, deadline: f64, reason: String) -> Self {
        Self {
            id,
            deadline,
            reason,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<vramd.Eviction id={} deadline={}s reason={:?}>",
            self.id, self.deadline, self.reason
        )
    }
}

#[derive(Default)]
struct HookState {
    /// The Python callback, until it runs or the reservation is released.
    callback: Option<Py<PyAny>>,
    /// Set when the daemon asked for the reservation back.
    asked: Option<vramd_client::Eviction>,
}

/// A reservation's eviction state, shared by the Python `Reservation` and the
/// handler installed in its SDK guard. Its lock is only ever held to move the
/// callback in or out, never while Python code runs.
#[derive(Default)]
pub(crate) struct EvictHook {
    state: Mutex<HookState>,
    /// Set when the callback returned (or there was none): the SDK releases
    /// the reservation right after.
    evicted: AtomicBool,
}

impl EvictHook {
    /// Installs the handler that runs the Python callback in `r`'s SDK guard.
    pub(crate) fn install(r: &vramd_client::Reservation) -> Arc<Self> {
        let hook = Arc::new(Self::default());
        let handler = hook.clone();
        r.on_evict(move |e| handler.run(e));
        hook
    }

    /// The SDK's eviction handler, on the SDK's eviction thread.
    fn run(&self, e: &vramd_client::Eviction) {
        let callback = {
            let mut st = lock(&self.state);
            st.asked = Some(e.clone());
            st.callback.take()
        };
        if let Some(callback) = callback {
            // Not once the interpreter shuts down: then the callback is
            // dropped unrun (its reference goes to PyO3's pool) and the
            // reservation released all the same.
            if let Some(_running) = Running::enter(e.deadline) {
                let _ = Python::try_attach(move |py| call_reporting(py, callback, e));
                // `_running` ends here, after the thread let go of the
                // interpreter.
            }
        }
        self.evicted.store(true, Ordering::SeqCst);
    }

    /// Stores `callback` (replacing any earlier one). If the daemon already
    /// asked for the reservation, stores nothing and hands the callback back
    /// with the eviction it should be called with now.
    pub(crate) fn register(
        &self,
        callback: Py<PyAny>,
    ) -> Result<Option<Py<PyAny>>, (Py<PyAny>, vramd_client::Eviction)> {
        let mut st = lock(&self.state);
        match &st.asked {
            Some(e) => {
                let e = e.clone();
                drop(st);
                Err((callback, e))
            }
            // The replaced callback is returned, to be dropped after the lock.
            None => Ok(st.callback.replace(callback)),
        }
    }

    /// Takes the callback out (it will never run). The caller drops it, with
    /// the GIL held, after this returns.
    pub(crate) fn take_callback(&self) -> Option<Py<PyAny>> {
        lock(&self.state).callback.take()
    }

    /// Whether the daemon asked for the reservation back.
    pub(crate) fn asked(&self) -> bool {
        lock(&self.state).asked.is_some()
    }

    /// Whether the reservation was given back on the daemon's request: the
    /// callback returned (or there was none) and the SDK releases it.
    pub(crate) fn evicted(&self) -> bool {
        self.evicted.load(Ordering::SeqCst)
    }

    /// Visits the callback for the garbage collector. Never blocks: the lock
    /// is only held for a moment, and a callback being moved is skipped.
    pub(crate) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        let st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        visit.call(st.callback.as_ref())
    }
}

/// Calls `callback(Eviction)`; an exception goes to `sys.unraisablehook`.
fn call_reporting(py: Python<'_>, callback: Py<PyAny>, e: &vramd_client::Eviction) {
    let callback = callback.into_bound(py);
    let result = Bound::new(py, Eviction::from(e)).and_then(|ev| callback.call1((ev,)));
    if let Err(err) = result {
        err.write_unraisable(py, Some(&callback));
    }
}

/// Eviction callbacks running in this process.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// Set by [`finish_callbacks`]: the interpreter is about to finalize.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
/// The latest deadline of the callbacks started, in ms since [`epoch`].
static LATEST_DEADLINE_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch(d: Duration) -> u64 {
    u64::try_from((epoch().elapsed() + d).as_millis()).unwrap_or(u64::MAX)
}

/// One eviction callback running: counted from before it attaches to the
/// interpreter until after it let go.
struct Running;

impl Running {
    /// Counts a callback in, unless the interpreter shuts down.
    fn enter(deadline: Duration) -> Option<Running> {
        // The deadline first, so that whoever sees the count sees it too.
        LATEST_DEADLINE_MS.fetch_max(millis_since_epoch(deadline), Ordering::SeqCst);
        RUNNING.fetch_add(1, Ordering::SeqCst);
        if SHUTTING_DOWN.load(Ordering::SeqCst) {
            RUNNING.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Running)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// At interpreter exit (`atexit`), called with the GIL released: no eviction
/// callback starts any more, and this waits for the running ones to return,
/// each at most until its deadline (a callback still running then is left
/// to CPython's finalization).
pub(crate) fn finish_callbacks() {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    while RUNNING.load(Ordering::SeqCst) > 0
        && millis_since_epoch(Duration::ZERO) < LATEST_DEADLINE_MS.load(Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// In a child after `fork()`: the parent's eviction threads do not exist
/// here, so none of its callbacks is running.
pub(crate) fn after_fork_in_child() {
    RUNNING.store(0, Ordering::SeqCst);
    SHUTTING_DOWN.store(false, Ordering::SeqCst);
}
