//! Watched apps: an `[[app]]` without `listen`. The gateway fronts none of
//! its requests; it only mirrors the models the app has resident (Ollama's
//! `/api/ps`) as idle reservations labelled `<app>/<model>`, so that vramd
//! can choose one of them as a victim and the gateway unloads that model
//! through the app's API (the eviction path of [`AppState::evict`]). This
//! replaces the daemon's old built-in Ollama consumer, per model instead of
//! all or nothing.
//!
//! Lifecycle of a mirror: a model seen in `/api/ps` with memory on the GPU
//! and no slot → one *try-once* reservation of its `size_vram` (a zero wait
//! limit: granted if it fits now, else the daemon answers at once, nothing
//! waits in vramd's queue and nothing is evicted for it) → `Held`, idle
//! (unless pinned, below) → released when `/api/ps` no longer lists the
//! model, or evicted. A mirror that did not fit is tried again after
//! [`RETRY_AFTER`].
//!
//! A model Ollama keeps forever (a negative `keep_alive`: `/api/ps` shows an
//! `expires_at` centuries ahead) is pinned: its mirror is busy, never
//! evicted, unless the app sets `evict_pinned`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use vramd_client::{Error as SdkError, Request};

use super::{AppState, Phase, ReservingGuard, Slot};
use crate::ollama::{Running, normalize_model};

/// How long a mirror that did not fit waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What a watched app remembers between polls.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// Models whose mirror did not fit, with when to try again.
    retry_at: HashMap<String, Instant>,
}

/// Whether Ollama keeps the model forever: its `expires_at` (RFC 3339) is
/// more than a century ahead (Go's far-future time for a negative
/// `keep_alive`).
pub fn pinned_forever(expires_at: Option<&str>) -> bool {
    let Some(year) = expires_at
        .and_then(|e| e.get(..4))
        .and_then(|y| y.parse::<u64>().ok())
    else {
        return false;
    };
    let now_year = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 31_556_952)
        + 1970;
    year > now_year + 100
}

impl AppState {
    /// After a poll of a watched app: mirrors every resident model that has
    /// no slot (`only`: just these, for a fronted app whose unloads failed),
    /// and follows pinning changes of those mirrored. A model whose unload
    /// failed waits for its backoff first.
    pub(super) fn mirror_resident(self: &Arc<Self>, ps: &[Running], only: Option<&[String]>) {
        let now = Instant::now();
        let mut start = Vec::new();
        let mut repin = Vec::new();
        {
            let mut watch = self.watch.lock().unwrap_or_else(|p| p.into_inner());
            watch
                .retry_at
                .retain(|m, _| ps.iter().any(|r| normalize_model(&r.name) == *m));
            let mut slots = self.lock();
            for r in ps {
                let model = normalize_model(&r.name);
                if only.is_some_and(|o| !o.contains(&model)) {
                    continue;
                }
                let pinned = pinned_forever(r.expires_at.as_deref());
                if let Some(s) = slots.get_mut(&model) {
                    if s.phase == Phase::Held && s.pinned != pinned {
                        s.pinned = pinned;
                        repin.push(model);
                    }
                    continue;
                }
                if r.size_vram == 0
                    || watch.retry_at.get(&model).is_some_and(|t| *t > now)
                    || !self.retry.due(&model)
                {
                    continue;
                }
                watch.retry_at.insert(model.clone(), now + RETRY_AFTER);
                let epoch = self
                    .next_epoch
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                slots.insert(
                    model.clone(),
                    Slot {
                        epoch,
                        phase: Phase::Reserving,
                        reservation: None,
                        generation: 0,
                        bytes: r.size_vram,
                        device: None,
                        in_flight: 0,
                        last_busy: now,
                        pinned,
                        loaded: true,
                        idle_sent: Arc::new(tokio::sync::Mutex::new(None)),
                        draining: false,
                    },
                );
                start.push((model, r.size_vram, pinned, epoch));
            }
        }
        for model in repin {
            let app = self.clone();
            self.runtime
                .spawn(async move { app.sync_idle(&model).await });
        }
        for (model, bytes, pinned, epoch) in start {
            let app = self.clone();
            self.runtime
                .spawn(async move { app.mirror(model, bytes, pinned, epoch).await });
        }
    }

    /// Takes the try-once reservation of a resident model.
    async fn mirror(self: Arc<Self>, model: String, bytes: u64, pinned: bool, epoch: u64) {
        let mut guard = ReservingGuard {
            app: &self,
            model: &model,
            epoch,
            armed: true,
        };
        let (generation, client) = match self.daemon.client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(app = %self.cfg.name, model, error = %e, "cannot mirror the model now");
                return;
            }
        };
        let idle = !pinned || self.cfg.evict_pinned;
        // The mirror speaks for the model's runners (known from the last
        // attribution pass), never for the gateway's own process: vramd then
        // adopts the memory they already use instead of counting it twice,
        // and a mirror fits even on a full card. Runners not known yet are
        // attached by the next pass.
        let req = Request::new(bytes)
            .for_pids(self.attribution.runners_of(&model))
            .label(self.label(&model))
            .priority(self.cfg.priority)
            .evictable(idle)
            .timeout(Duration::ZERO);
        let r = match client.reserve(req).await {
            Ok(r) => r,
            Err(SdkError::WaitTimeout(m)) => {
                tracing::info!(
                    app = %self.cfg.name, model, bytes, why = %m,
                    "a resident model's mirror does not fit now; trying again later"
                );
                return;
            }
            Err(e) => {
                let e = self.reserve_error(&model, bytes, generation, e).await;
                tracing::warn!(app = %self.cfg.name, model, error = %e, "cannot mirror the model");
                return;
            }
        };
        tracing::info!(
            app = %self.cfg.name, model, bytes, device = r.device_index(), id = r.id().0, idle,
            "mirrored a resident model"
        );
        let app = self.clone();
        let evicted_model = model.clone();
        let runtime = self.runtime.clone();
        r.on_evict(move |ev| {
            runtime.block_on(app.evict(&evicted_model, epoch, ev.deadline, &ev.reason));
        });
        let device = r.device_index();
        {
            let mut slots = self.lock();
            let Some(s) = slots.get_mut(&model).filter(|s| s.epoch == epoch) else {
                return;
            };
            s.phase = Phase::Held;
            s.reservation = Some(Arc::new(r));
            s.generation = generation;
            s.device = Some(device);
            s.last_busy = Instant::now();
            s.idle_sent = Arc::new(tokio::sync::Mutex::new(Some(idle)));
        }
        guard.armed = false;
        self.retry.remirrored(&model);
        self.watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retry_at
            .remove(&model);
        self.changed.notify_waiters();
        // Pinning may have changed while the grant was on its way.
        self.sync_idle(&model).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_far_future_expiry_means_pinned() {
        assert!(pinned_forever(Some("2318-01-01T00:00:00Z")));
        assert!(!pinned_forever(Some("2030-01-01T00:00:00.123Z")));
        assert!(!pinned_forever(Some("soon")));
        assert!(!pinned_forever(None));
    }
}
