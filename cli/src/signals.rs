//! SIGINT and SIGTERM while `reserve` or `run` holds a reservation.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Marker in [`SignalWatch`]'s slot: an eviction, not a signal.
pub const EVICTED: i32 = -1;
/// Marker in [`SignalWatch`]'s slot: the reservation was lost (the daemon
/// went away and did not give it back).
pub const LOST: i32 = -2;

/// SIGINT/SIGTERM: recorded, and forwarded to a child once there is one.
pub struct SignalWatch {
    /// The last signal received (0: none yet; [`EVICTED`]: an eviction).
    last: Arc<AtomicI32>,
    /// The child to forward signals to (0: none yet).
    child: Arc<AtomicI32>,
    /// Closes the signal thread's iterator on drop.
    handle: signal_hook::iterator::Handle,
}

impl SignalWatch {
    /// Starts watching, on a thread of its own.
    pub fn start() -> std::io::Result<Self> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let last = Arc::new(AtomicI32::new(0));
        let child = Arc::new(AtomicI32::new(0));
        let (l, c) = (last.clone(), child.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                l.store(sig, Ordering::SeqCst);
                let pid = c.load(Ordering::SeqCst);
                if pid > 0 {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, sig) };
                }
            }
        });
        Ok(Self {
            last,
            child,
            handle,
        })
    }

    /// The slot [`received`](Self::received) reads; storing [`EVICTED`] in
    /// it wakes [`wait`](Self::wait) as a signal would.
    pub fn slot(&self) -> Arc<AtomicI32> {
        self.last.clone()
    }

    /// The last signal received (or [`EVICTED`]), if any.
    pub fn received(&self) -> Option<i32> {
        match self.last.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Blocks until SIGINT or SIGTERM.
    pub fn wait(&self) {
        while self.received().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forwards signals to `pid` from now on.
    pub fn forward_to(&self, pid: u32) {
        self.child.store(pid as i32, Ordering::SeqCst);
        // A signal that came before the child existed is passed on now.
        if let Some(sig) = self.received() {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        self.handle.close();
    }
}
