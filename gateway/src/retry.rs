//! Failed unloads, loads and restores of an app, and when each is tried
//! again.
//!
//! Lifecycle of a failure (per model; the single-reservation kinds use
//! their one model name): a failed call counts in `failures` and sets the
//! next try `retry_backoff` later (default [`DEFAULT_BACKOFF`]), doubling
//! with each failure in a row up to [`MAX_BACKOFF`] (or `retry_backoff`
//! itself when larger); a success of that model's unload or load resets
//! it. A failed *unload* leaves the app's memory on the card while the
//! reservation that stood for it is released (the SDK releases when the
//! eviction callback returns), so it also asks for a *re-mirror*: once the
//! backoff has passed, the poller takes a try-once, idle reservation for
//! the app's processes again (vramd adopts the memory they already use),
//! vramd may choose it as a victim again, and the unload is retried.
//! Nothing here waits: the pollers ask [`Retry::due`] and
//! [`Retry::remirror_due`].
//!
//! Ollama and `openai` apps keep their last error here too (`http`,
//! `command` and `comfyui` apps keep theirs with their kind's state).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::last_error::LastError;

/// `retry_backoff` when the config sets none.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait between two tries (unless `retry_backoff` is longer).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One app's failures and pending tries.
#[derive(Debug)]
pub struct Retry {
    base: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Failures since the gateway started.
    failures: u64,
    /// Unload failures since the gateway started (a subset of `failures`).
    failed_unloads: u64,
    /// Per model: failures in a row and when to try again.
    pending: HashMap<String, Pending>,
    /// `ollama`, `openai`: the last failure.
    last_error: LastError,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    in_a_row: u32,
    at: Instant,
    /// The unload failed: the model's memory is still on the card and its
    /// reservation is to be taken again once `at` passed.
    remirror: bool,
}

impl Retry {
    /// No failures yet; waits start at `base`.
    pub fn new(base: Duration) -> Retry {
        Retry {
            base,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wait after the `n`-th failure in a row (`n` ≥ 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let cap = MAX_BACKOFF.max(self.base);
        let doubled = self
            .base
            .checked_mul(1u32 << n.saturating_sub(1).min(20))
            .unwrap_or(cap);
        doubled.min(cap)
    }

    /// Records a failure of `model`'s unload (`unload`: its memory stays
    /// and its reservation is to be taken again) or load; returns the wait
    /// before the next try.
    pub fn failed(&self, model: &str, unload: bool) -> Duration {
        let mut i = self.lock();
        i.failures += 1;
        if unload {
            i.failed_unloads += 1;
        }
        let in_a_row = i.pending.get(model).map_or(0, |p| p.in_a_row) + 1;
        let wait = self.backoff(in_a_row);
        let remirror = unload || i.pending.get(model).is_some_and(|p| p.remirror);
        i.pending.insert(
            model.to_string(),
            Pending {
                in_a_row,
                at: Instant::now() + wait,
                remirror,
            },
        );
        wait
    }

    /// Starts `model`'s pending wait over from now (the reservation of a
    /// failed unload was released only now).
    pub fn restart_wait(&self, model: &str) {
        if let Some(p) = self.lock().pending.get_mut(model) {
            p.at = Instant::now() + self.backoff(p.in_a_row);
        }
    }

    /// `model`'s unload or load succeeded (or found nothing to do): the
    /// backoff starts over.
    pub fn succeeded(&self, model: &str) {
        self.lock().pending.remove(model);
    }

    /// Whether `model` may be tried now (no failure pending, or its wait
    /// has passed).
    pub fn due(&self, model: &str) -> bool {
        self.lock()
            .pending
            .get(model)
            .is_none_or(|p| p.at <= Instant::now())
    }

    /// Whether `model` waits for its reservation to be taken again after a
    /// failed unload, and its wait has passed.
    pub fn remirror_due(&self, model: &str) -> bool {
        self.lock()
            .pending
            .get(model)
            .is_some_and(|p| p.remirror && p.at <= Instant::now())
    }

    /// The models waiting for a re-mirror whose wait has passed.
    pub fn remirrors_due(&self) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .pending
            .iter()
            .filter(|(_, p)| p.remirror && p.at <= now)
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// `model`'s reservation was taken again (by a re-mirror or a
    /// request): no re-mirror is pending any more; the failures in a row
    /// stay counted until its unload succeeds.
    pub fn remirrored(&self, model: &str) {
        if let Some(p) = self.lock().pending.get_mut(model) {
            p.remirror = false;
        }
    }

    /// A re-mirror did not fit now: tried again one `retry_backoff` later
    /// (not counted as a failure).
    pub fn not_now(&self, model: &str) {
        if let Some(p) = self.lock().pending.get_mut(model) {
            p.at = Instant::now() + self.base;
            p.remirror = true;
        }
    }

    /// Records an `ollama`/`openai` app's failure of `call`.
    pub(crate) fn fail(&self, call: &str, e: impl std::fmt::Display) {
        self.lock().last_error.fail(call, e);
    }

    /// Clears an `ollama`/`openai` app's last failure if it was `call`'s.
    pub(crate) fn succeed(&self, call: &str) {
        self.lock().last_error.succeed(call);
    }

    /// The `ollama`/`openai` app's last failure.
    pub(crate) fn last_error(&self) -> LastError {
        self.lock().last_error.clone()
    }

    /// For `/status`: `failures`, `failed_unloads`, `next_retry_in_ms` (the
    /// soonest pending try; `null`: none), and per model `retries`.
    pub fn status_json(&self) -> serde_json::Value {
        let i = self.lock();
        let now = Instant::now();
        let in_ms = |p: &Pending| p.at.saturating_duration_since(now).as_millis() as u64;
        let retries: serde_json::Map<String, serde_json::Value> = i
            .pending
            .iter()
            .map(|(m, p)| {
                (
                    m.clone(),
                    serde_json::json!({
                        "failures_in_a_row": p.in_a_row,
                        "next_retry_in_ms": in_ms(p),
                        "remirror": p.remirror,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "failures": i.failures,
            "failed_unloads": i.failed_unloads,
            "next_retry_in_ms": i.pending.values().map(in_ms).min(),
            "retries": retries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let r = Retry::new(Duration::from_secs(5));
        assert_eq!(r.backoff(1), Duration::from_secs(5));
        assert_eq!(r.backoff(2), Duration::from_secs(10));
        assert_eq!(r.backoff(7), Duration::from_secs(300));
        assert_eq!(r.backoff(60), Duration::from_secs(300));
        assert!(r.due("app"));
        assert_eq!(r.failed("app", true), Duration::from_secs(5));
        assert_eq!(r.failed("app", false), Duration::from_secs(10));
        assert!(!r.due("app"));
        assert!(!r.remirror_due("app"));
        assert!(r.due("other"));
        let s = r.status_json();
        assert_eq!(s["failures"], 2);
        assert_eq!(s["failed_unloads"], 1);
        assert!(s["next_retry_in_ms"].as_u64().unwrap() > 5_000);
        r.succeeded("app");
        assert!(r.due("app"));
        assert_eq!(r.failed("app", false), Duration::from_secs(5));
        assert_eq!(r.status_json()["failures"], 3);
    }

    #[test]
    fn a_failed_unload_asks_for_a_re_mirror_once_its_wait_passed() {
        let r = Retry::new(Duration::from_millis(1));
        r.failed("m", true);
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.remirror_due("m"));
        assert_eq!(r.remirrors_due(), vec!["m".to_string()]);
        r.remirrored("m");
        assert!(!r.remirror_due("m"));
        assert!(r.due("m"));
    }

    #[test]
    fn a_longer_base_than_the_cap_is_kept() {
        let r = Retry::new(Duration::from_secs(600));
        assert_eq!(r.backoff(1), Duration::from_secs(600));
        assert_eq!(r.backoff(3), Duration::from_secs(600));
    }
}
