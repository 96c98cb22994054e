//! The drain limit: no waiter starves behind a model kept busy by a stream
//! of requests.
//!
//! vramd never evicts a busy reservation, and a model that requests keep
//! coming for stays busy (each request marks it busy; idle comes only
//! [`IDLE_LINGER`](super::IDLE_LINGER) after the last). So after every poll
//! the gateway reads vramd's status (refreshed every poll interval) and,
//! for each model it holds, finds the waiters in vramd's queue that
//! *outrank* the model's reservation on its device — whose effective
//! priority (priority + one per `aging` waited, as vramd counts it) has
//! reached the reservation's priority, so vramd would evict the model for
//! them if it were idle. Once one has outranked it for longer than the
//! app's `drain_limit`, the model is *draining*: new requests for it are
//! not admitted (they wait, as during an eviction), requests in flight
//! finish, the model goes idle and vramd may evict it. Draining ends when
//! no waiter outranks the model any more (it was granted, or left).
//!
//! A model that could not be evicted anyway (pinned, or an `openai` model
//! without `unload`) never drains: holding its requests back would free
//! nothing.

use std::time::Duration;

use vramd_client::StatusReport;
use vramd_protocol::DeviceSelector;

use super::{AppState, Phase};

/// How long the longest-outranking waiter of `status`'s queue has outranked
/// reservation `id` (`None`: no waiter outranks it, or it is not in
/// `status`).
pub fn outranked_in(status: &StatusReport, id: u64, aging: Duration) -> Option<Duration> {
    let r = status.reservations.iter().find(|r| r.id.0 == id)?;
    let uuid = status
        .devices
        .iter()
        .find(|d| d.index == r.device)
        .map(|d| d.uuid.as_str());
    outranked_for(
        r.priority,
        r.device,
        uuid,
        status
            .queue
            .iter()
            .map(|q| (q.priority, q.waited_ms, &q.device)),
        aging,
    )
}

/// How long the longest-outranking of `waiters` (priority, milliseconds
/// waited, device asked for) has outranked a reservation of `priority` on
/// device `device` (`uuid`): a waiter outranks it from the moment its
/// effective priority reaches `priority`.
pub fn outranked_for<'a>(
    priority: i32,
    device: u32,
    uuid: Option<&str>,
    waiters: impl IntoIterator<Item = (i32, u64, &'a DeviceSelector)>,
    aging: Duration,
) -> Option<Duration> {
    let aging_ms = u64::try_from(aging.as_millis()).unwrap_or(u64::MAX).max(1);
    waiters
        .into_iter()
        .filter(|(_, _, d)| match d {
            DeviceSelector::Any => true,
            DeviceSelector::Index(i) => *i == device,
            DeviceSelector::Uuid(u) => uuid.is_some_and(|d| d.eq_ignore_ascii_case(u)),
        })
        .filter_map(|(p, waited_ms, _)| {
            // It reaches the reservation's priority after this long.
            let levels = i64::from(priority) - i64::from(p);
            let reach_ms = u64::try_from(levels.max(0))
                .unwrap_or(0)
                .saturating_mul(aging_ms);
            waited_ms.checked_sub(reach_ms)
        })
        .max()
        .map(Duration::from_millis)
}

impl AppState {
    /// Marks each held model draining or not from vramd's last status.
    pub(super) fn update_drain(&self) {
        let status = self.daemon.last_status();
        let mut changed = Vec::new();
        {
            let mut slots = self.lock();
            for (model, s) in slots.iter_mut() {
                let evictable = (!s.pinned || self.cfg.evict_pinned) && self.can_unload(model);
                let drain = match (&status, &s.reservation) {
                    (Some(st), Some(r)) if s.phase == Phase::Held && evictable => {
                        outranked_in(st, r.id().0, self.cfg.aging)
                            .is_some_and(|d| d > self.cfg.drain_limit)
                    }
                    _ => false,
                };
                if s.draining != drain {
                    s.draining = drain;
                    changed.push((model.clone(), drain, s.in_flight));
                }
            }
        }
        for (model, drain, in_flight) in &changed {
            if *drain {
                self.metrics.drain(&self.cfg.name, model);
                tracing::info!(
                    app = %self.cfg.name, model, in_flight, drain_limit_ms = self.cfg.drain_limit.as_millis() as u64,
                    "draining: a waiter has outranked the model longer than the drain limit; new requests wait"
                );
            } else {
                tracing::info!(app = %self.cfg.name, model, "no longer draining");
            }
        }
        if !changed.is_empty() {
            self.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_outranks_from_when_its_effective_priority_reaches_the_reservations() {
        let aging = Duration::from_secs(10);
        let ms = |m| Some(Duration::from_millis(m));
        let any = DeviceSelector::Any;
        let at = |p: i32, q: &[(i32, u64, &DeviceSelector)]| {
            outranked_for(p, 0, Some("GPU-0"), q.iter().copied(), aging)
        };
        // Higher priority: from its arrival.
        assert_eq!(at(0, &[(5, 1_500, &any)]), ms(1_500));
        // Same priority: from its arrival too (vramd evicts priority <= rank).
        assert_eq!(at(2, &[(2, 300, &any)]), ms(300));
        // Two levels below: only after 20 s of aging.
        assert_eq!(at(2, &[(0, 19_000, &any)]), None);
        assert_eq!(at(2, &[(0, 23_000, &any)]), ms(3_000));
        // Another device's waiter does not count; the longest one does.
        let (d0, d1) = (DeviceSelector::Index(0), DeviceSelector::Index(1));
        let uuid = DeviceSelector::Uuid("gpu-0".into());
        assert_eq!(
            at(0, &[(1, 9_000, &d1), (1, 400, &d0), (1, 700, &any)]),
            ms(700)
        );
        assert_eq!(at(0, &[(1, 900, &uuid)]), ms(900));
        assert_eq!(at(0, &[]), None);
    }
}
