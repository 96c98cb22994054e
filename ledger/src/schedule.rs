//! Scheduling passes: grants in queue order with backfill and the
//! starvation guard, placement, wait limits, and the queue positions told to
//! waiters.

use std::time::{Duration, Instant};

use vramd_protocol::{ErrorKind, Grant, format_size};

use crate::queue::OrderKey;
use crate::{
    AdaptiveGuard, Effect, Ledger, POSITION_PUSH_LIMIT, Placement, ReadingSource, Reservation,
    Waiter, millis,
};

impl Ledger {
    /// When the daemon should next apply [`Input::Tick`](crate::Input::Tick): the earliest wait limit
    /// or eviction deadline, or the moment an idle holder becomes evictable
    /// while requests wait — it passes its minimum residency, or a waiter
    /// ages up to its priority — or, with a priority window, the moment the
    /// next waiter has waited the window (it moves ahead of younger ones).
    /// (Without a window the grant order does not change with time.)
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let plans = self.queue.planned().into_iter().filter_map(|k| {
            self.queue
                .get(&k)
                .and_then(|w| w.plan.as_ref())
                .map(|p| p.deadline)
        });
        self.queue
            .next_deadline()
            .into_iter()
            .chain(plans)
            .chain(self.next_eviction_eligibility(now))
            .chain(self.next_outranking(now))
            .chain(self.queue.next_promotion())
            .chain(self.grace_until())
            .min()
    }

    /// Runs a scheduling pass, expires waiters past their limit, and tells
    /// the rest their new positions.
    pub(crate) fn settle(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        if self.queue.promote(now) {
            // Promoted waiters moved ahead of younger ones: one may now be
            // ahead of the starved waiter that held it back, and positions
            // changed.
            self.clean = false;
            self.positions_dirty = true;
        }
        self.schedule(now, effects);
        if self.expire(now, effects) {
            // An expired waiter may have held devices for itself (starvation
            // guard); what it blocked may fit now.
            self.schedule(now, effects);
        }
        self.fail_overdue_evictions(now, effects);
        self.plan_evictions(now, effects);
        self.tell_positions(now, effects);
    }

    /// Grants what fits: passes until one grants nothing on a measured
    /// device. A pass counts each grant at its full size, but a grantee whose
    /// process already used memory (counted as unattributed until then)
    /// takes over that usage, so its device may have more room after the
    /// pass than the pass assumed — enough for a waiter it left behind.
    fn schedule(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        while self.schedule_pass(now, effects) {
            self.clean = false;
        }
    }

    /// One scheduling pass; returns whether a measured device it granted on
    /// has more room left than the pass counted. After a full pass, and until something frees room
    /// or a waiter leaves, only newly arrived waiters can fit: they are
    /// checked alone (no walk over the queue) unless a starved waiter may
    /// stand in their way.
    fn schedule_pass(&mut self, now: Instant, effects: &mut Vec<Effect>) -> bool {
        if self.queue.is_empty() {
            self.fresh.clear();
            self.clean = true;
            return false;
        }
        let mut avail: Vec<u64> = (0..self.devices.len()).map(|d| self.available(d)).collect();
        let mut granted: Vec<(OrderKey, usize)> = Vec::new();
        // Devices on which this pass granted a waiter that adopted usage:
        // another waiter naming the same processes must not adopt it again,
        // so later adopters on them count in full until the next pass.
        let mut adopted = vec![false; self.devices.len()];
        // Bytes this pass granted per device: an adopter must also keep the
        // device's reserved sum within its capacity (its need may be 0 on a
        // device whose readings already show it past its capacity).
        let mut added = vec![0u64; self.devices.len()];
        let fast = self.clean
            && self.fresh.iter().all(|k| {
                self.queue.get(k).is_none_or(|w| {
                    w.candidates
                        .iter()
                        .all(|&d| self.queue.first_starved_for(d).is_none_or(|s| now < s))
                })
            });
        if fast {
            let mut fresh = std::mem::take(&mut self.fresh);
            fresh.sort_unstable();
            for key in fresh {
                let Some(w) = self.queue.get(&key) else {
                    continue;
                };
                if let Some((d, need)) = self.place(w, &avail, &[], &mut adopted, &added) {
                    avail[d] -= need;
                    added[d] = added[d].saturating_add(w.bytes);
                    granted.push((key, d));
                }
            }
        } else if self.adopting == 0
            && (0..self.devices.len())
                .all(|d| self.queue.smallest_for(d).is_none_or(|b| b > avail[d]))
        {
            // Nothing fits anywhere: no walk over the queue.
            self.fresh.clear();
        } else {
            self.fresh.clear();
            let mut blocked = vec![false; self.devices.len()];
            for (key, w) in self.queue.iter() {
                match self.place(w, &avail, &blocked, &mut adopted, &added) {
                    Some((d, need)) => {
                        avail[d] -= need;
                        added[d] = added[d].saturating_add(w.bytes);
                        granted.push((*key, d));
                    }
                    None if now >= w.starved_at => {
                        // Starved: its devices keep their room for it.
                        for &d in &w.candidates {
                            if self.capacity(d) >= w.bytes {
                                blocked[d] = true;
                            }
                        }
                    }
                    None => {}
                }
            }
        }
        self.clean = true;
        let mut touched = vec![false; self.devices.len()];
        for (key, d) in granted {
            touched[d] = true;
            let w = self.take_waiter(&key).expect("granted from the queue");
            self.grant(w, d, now, effects);
        }
        // Only a measured device can have more room than the pass counted.
        (0..self.devices.len()).any(|d| {
            touched[d]
                && matches!(self.devices[d].source, ReadingSource::Measured(_))
                && self.available(d) > avail[d]
        })
    }

    /// The device a waiter goes to now, if it fits on one it may use, and
    /// the room it takes there (less than its bytes when it adopts usage).
    fn place(
        &self,
        w: &Waiter,
        avail: &[u64],
        blocked: &[bool],
        adopted: &mut [bool],
        added: &[u64],
    ) -> Option<(usize, u64)> {
        let need = |d: usize| {
            if adopted[d] { w.bytes } else { self.need(w, d) }
        };
        let fits = w.candidates.iter().copied().filter_map(|d| {
            let n = need(d);
            let within = n == w.bytes
                || self
                    .reserved(d)
                    .saturating_add(added[d])
                    .saturating_add(w.bytes)
                    <= self.capacity(d);
            (!blocked.get(d).copied().unwrap_or(false)
                && self.devices[d].fault.is_none()
                && avail[d] >= n
                && within)
                .then_some((d, n))
        });
        let (d, n) = match self.config.placement {
            Placement::Spread => fits.max_by_key(|&(d, _)| (avail[d], std::cmp::Reverse(d))),
            Placement::Pack => fits.min_by_key(|&(d, _)| (avail[d], d)),
        }?;
        if n < w.bytes {
            adopted[d] = true;
        }
        Some((d, n))
    }

    /// The moment a request arriving `now` is starved: `now` + its guard
    /// (see [`LedgerConfig::adaptive_guard`](crate::LedgerConfig)); a guard
    /// past what an `Instant` can hold means never.
    pub(crate) fn starved_at_for_new(&self, now: Instant) -> Instant {
        now.checked_add(self.guard_for_new())
            .or_else(|| now.checked_add(NEVER))
            .unwrap_or(now)
    }

    /// The starvation guard of a request arriving now.
    fn guard_for_new(&self) -> Duration {
        let floor = self.config.starvation_guard;
        match self.config.adaptive_guard {
            None => floor,
            Some(g) => self
                .recent_waits
                .mean()
                .saturating_mul(g.factor)
                .clamp(floor, g.cap.max(floor)),
        }
    }

    fn grant(&mut self, w: Waiter, d: usize, now: Instant, effects: &mut Vec<Effect>) {
        if self.config.adaptive_guard.is_some() {
            self.recent_waits
                .push(now.saturating_duration_since(w.arrived));
        }
        let grant = Grant {
            id: w.id,
            device: self.devices[d].spec.index,
            device_uuid: self.devices[d].spec.uuid.clone(),
            bytes: w.bytes,
        };
        self.put_reservation(Reservation {
            id: w.id,
            conn: w.conn,
            device: d,
            bytes: w.bytes,
            label: w.label.clone(),
            priority: w.priority,
            peer: w.peer,
            pids: w.pids.clone().unwrap_or_else(|| vec![w.peer.pid]),
            granted_at: now,
            idle: w.evictable,
            last_busy: now,
            evicting: None,
            enforced: None,
        });
        self.counters.grants += 1;
        effects.push(Effect::Granted {
            conn: w.conn,
            tag: w.tag,
            grant,
            label: w.label,
            waited: now.saturating_duration_since(w.arrived),
        });
        self.push_token(w.conn, w.tag, w.id, effects);
    }

    /// Fails waiters whose wait limit passed; returns whether there were any.
    fn expire(&mut self, now: Instant, effects: &mut Vec<Effect>) -> bool {
        let due = self.queue.due(now);
        for key in &due {
            let Some(w) = self.take_waiter(key) else {
                continue;
            };
            self.counters.timeouts += 1;
            effects.push(Effect::Failed {
                conn: w.conn,
                tag: w.tag,
                kind: ErrorKind::Timeout,
                message: format!(
                    "waited {} ms for {} and it did not fit (position {} in the queue)",
                    millis(now.saturating_duration_since(w.arrived)),
                    format_size(w.bytes),
                    w.told_position.max(1),
                ),
            });
        }
        if !due.is_empty() {
            // An expired starved waiter may have kept room for itself.
            self.clean = false;
        }
        !due.is_empty()
    }

    /// Tells waiters their positions where they changed. Waiters that arrive
    /// behind everyone (the usual case) are told without a walk over the queue.
    fn tell_positions(&mut self, _now: Instant, effects: &mut Vec<Effect>) {
        let mut untold: Vec<OrderKey> = std::mem::take(&mut self.untold)
            .into_iter()
            .filter(|k| self.queue.contains(k))
            .collect();
        if !self.positions_dirty {
            if untold.is_empty() {
                return;
            }
            untold.sort_unstable();
            if self.queue.tail(untold.len()) == untold {
                let first = self.queue.len() - untold.len();
                for (i, key) in untold.iter().enumerate() {
                    let w = self.queue.get_mut(key).expect("in the queue");
                    tell(w, (first + i) as u32 + 1, effects);
                }
                return;
            }
        }
        self.positions_dirty = false;
        for (pos, (_, w)) in self.queue.iter_mut().enumerate() {
            let position = pos as u32 + 1;
            // Deep in a long queue, moves are not pushed (a move at the head
            // would otherwise cost a message per waiter): only a waiter's
            // first position and its moves within the first POSITION_PUSH_LIMIT.
            let worth_telling = position <= POSITION_PUSH_LIMIT || w.told_position == 0;
            if w.told_position != position && worth_telling {
                tell(w, position, effects);
            }
        }
    }
}

/// Tells a waiter its position.
fn tell(w: &mut Waiter, position: u32, effects: &mut Vec<Effect>) {
    w.told_position = position;
    effects.push(Effect::Queued {
        conn: w.conn,
        tag: w.tag,
        id: w.id,
        position,
    });
}

/// A guard this long (about a century) stands for "never starved" when a
/// configured one does not fit in an `Instant`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The waits of the last [`AdaptiveGuard::GRANTS`] grants and their sum.
#[derive(Debug, Default)]
pub(crate) struct RecentWaits {
    waits: std::collections::VecDeque<Duration>,
    sum: Duration,
}

impl RecentWaits {
    fn push(&mut self, wait: Duration) {
        if self.waits.len() == AdaptiveGuard::GRANTS {
            if let Some(old) = self.waits.pop_front() {
                self.sum = self.sum.saturating_sub(old);
            }
        }
        self.waits.push_back(wait);
        self.sum = self.sum.saturating_add(wait);
    }

    /// The mean wait of the last grants (zero before any).
    pub fn mean(&self) -> Duration {
        self.sum / self.waits.len().max(1) as u32
    }
}
