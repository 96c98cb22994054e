//! Two small helpers the SDK uses itself, public so that the Python SDK, the
//! end-to-end tests and the benchmark share one copy instead of each writing
//! its own. A client of the daemon does not need them.

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Locks `m`, going on when it is poisoned: a thread that panicked while
/// holding it leaves plain data behind, never a half-done update the caller
/// must repair, so the next holder may use it as it is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `fd` is readable (or hung up), up to `timeout` (`None`: as
/// long as it takes); true if it is. A wait interrupted by a signal returns
/// `false` early. A timeout is rounded up to whole milliseconds, so a short
/// wait is not a busy loop.
pub fn poll_readable(fd: RawFd, timeout: Option<Duration>) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = match timeout {
        None => -1,
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}
