//! Eviction: idle holders asked to unload when a waiter cannot fit —
//! victim choice, deadlines, failures, and the moments a victim becomes
//! eligible. (Apps that load on their own are evicted through the
//! reservations vramd-gateway holds for them, like any holder.)

use std::time::{Duration, Instant};

use vramd_protocol::{ReservationId, ServerMessage, format_size};

use crate::accounting::Accounting;
use crate::queue::OrderKey;
use crate::{ConnId, Effect, Ledger, LogEvent, Reservation, Waiter};

/// Something that can be asked to give memory back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Victim {
    Reservation(ReservationId),
}

impl std::fmt::Display for Victim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Victim::Reservation(id) => write!(f, "reservation {id}"),
        }
    }
}

/// Evictions in flight for one waiter.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub device: usize,
    pub victims: Vec<Victim>,
    pub deadline: Instant,
}

impl Ledger {
    /// Reservations that are idle and not asked to unload.
    fn idle_victims(&self) -> impl Iterator<Item = &Reservation> {
        self.idle_unasked
            .iter()
            .filter_map(|id| self.reservations.get(id))
    }

    /// While requests wait: the next moment a waiter's effective priority
    /// reaches that of an idle reservation it could not evict
    /// before (see `choose_victims`).
    ///
    /// A waiter reaches priority `p` at `rank + p × aging` (its order key's
    /// rank, from the epoch), so for each priority the first waiter in grant
    /// order still below it is the next to get there: one lookup per distinct
    /// priority of the idle, however long the queue.
    pub(crate) fn next_outranking(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let mut levels: Vec<i32> = self.idle_victims().map(|r| r.priority).collect();
        levels.sort_unstable();
        levels.dedup();
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as i128;
        let aging = self.config.aging.as_nanos().max(1) as i128;
        levels
            .into_iter()
            .filter_map(|p| {
                let lift = i128::from(p) * aging;
                let key = self.queue.first_from_rank(now_ns - lift + 1)?;
                let at = key.rank + lift;
                u64::try_from(at)
                    .ok()
                    .map(|ns| self.epoch + Duration::from_nanos(ns))
            })
            .min()
    }

    /// While requests wait: the next moment an idle reservation passes its
    /// minimum residency (it may then be evicted).
    pub(crate) fn next_eviction_eligibility(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        self.idle_victims()
            .map(|r| r.granted_at + self.config.min_residency)
            .filter(|&t| t > now)
            .min()
    }

    /// Marks a reservation held by `conn` idle (evictable) or busy, and
    /// answers.
    pub(crate) fn on_set_idle(
        &mut self,
        conn: ConnId,
        tag: u64,
        id: ReservationId,
        idle: bool,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> bool {
        if self.held(conn, tag, id, fx).is_none() {
            return false;
        }
        self.update_idle(id, |r| {
            if r.idle && !idle {
                r.last_busy = now;
            }
            r.idle = idle;
        });
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::IdleSet { tag, id, idle },
        });
        fx.push(Effect::Log(LogEvent::IdleSet { conn, id, idle }));
        // An idle one may make room for a waiter by being evicted.
        idle
    }

    /// Victims that missed their deadline are reported and skipped; their
    /// waiter plans again.
    pub(crate) fn fail_overdue_evictions(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        for key in self.queue.planned() {
            let Some(plan) = self.queue.get(&key).and_then(|w| w.plan.clone()) else {
                continue;
            };
            if now < plan.deadline {
                continue;
            }
            self.queue.set_plan(&key, None);
            for v in plan.victims {
                let pending = match &v {
                    Victim::Reservation(id) => {
                        let held = self.reservations.contains_key(id);
                        self.update_idle(*id, |r| r.evicting = None);
                        held
                    }
                };
                if pending {
                    self.counters.evictions_failed += 1;
                    effects.push(Effect::EvictionFailed {
                        victim: v.to_string(),
                        reason: format!(
                            "did not give its memory back within {} ms",
                            self.config.eviction_deadline.as_millis()
                        ),
                    });
                    if let Some(w) = self.queue.get_mut(&key) {
                        w.skip.push(v);
                    }
                }
            }
        }
    }

    /// For waiters that do not fit, asks idle holders to make
    /// room — at most one eviction in flight per device, only when the
    /// victims can free enough, never a busy holder.
    pub(crate) fn plan_evictions(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        // The common case costs nothing: no waiter, or nothing evictable.
        if self.queue.is_empty() {
            return;
        }
        if self.idle_unasked.is_empty() {
            return;
        }
        let avail: Vec<u64> = (0..self.devices.len()).map(|d| self.available(d)).collect();
        let mut accounts: Vec<Option<Accounting>> = vec![None; self.devices.len()];
        let mut claimed: Vec<bool> = (0..self.devices.len())
            .map(|d| self.queue.plan_on(d))
            .collect();
        // (waiter, device, victims, reason)
        let mut chosen: Vec<(OrderKey, usize, Vec<Victim>, String)> = Vec::new();
        for (key, w) in self.queue.iter() {
            if claimed.iter().all(|&c| c) {
                break;
            }
            if w.plan.is_some() {
                continue;
            }
            let mut best: Option<(usize, Vec<(Victim, u64)>)> = None;
            for &d in &w.candidates {
                if claimed[d] || self.devices[d].fault.is_some() || self.capacity(d) < w.bytes {
                    continue;
                }
                let available = avail[d];
                let need = self.need(w, d);
                // An adopter must also keep the reserved sum within capacity.
                let over = if need < w.bytes {
                    self.reserved(d)
                        .saturating_add(w.bytes)
                        .saturating_sub(self.capacity(d))
                } else {
                    0
                };
                let short = need.saturating_sub(available).max(over);
                if short == 0 {
                    continue; // it fits; held back by the starvation guard
                }
                let acc = accounts[d].get_or_insert_with(|| self.account(d));
                if let Some(victims) = self.choose_victims(d, acc, w, short, now) {
                    if best.as_ref().is_none_or(|(_, b)| victims.len() < b.len()) {
                        best = Some((d, victims));
                    }
                }
            }
            let Some((d, victims)) = best else { continue };
            claimed[d] = true;
            let reason = format!(
                "request {} for {}{} waits for room on device {}",
                w.id,
                format_size(w.bytes),
                w.label
                    .as_deref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default(),
                self.devices[d].spec.index
            );
            chosen.push((
                *key,
                d,
                victims.into_iter().map(|(v, _)| v).collect(),
                reason,
            ));
        }
        let deadline = now + self.config.eviction_deadline;
        for (key, d, victims, reason) in chosen {
            for v in &victims {
                self.counters.evictions_requested += 1;
                match v {
                    Victim::Reservation(id) => {
                        self.update_idle(*id, |r| r.evicting = Some(deadline));
                        let r = &self.reservations[id];
                        effects.push(Effect::Evict {
                            conn: r.conn,
                            id: *id,
                            deadline: self.config.eviction_deadline,
                            reason: reason.clone(),
                        });
                    }
                }
            }
            self.queue.set_plan(
                &key,
                Some(Plan {
                    device: d,
                    victims,
                    deadline,
                }),
            );
        }
    }

    /// A waiter's priority plus one per `aging` it has waited, as it ranks
    /// in the queue.
    fn effective_priority(&self, w: &Waiter, now: Instant) -> i32 {
        let waited = now.saturating_duration_since(w.arrived).as_nanos();
        let steps = waited / self.config.aging.as_nanos().max(1);
        w.priority
            .saturating_add(i32::try_from(steps).unwrap_or(i32::MAX))
    }

    /// The fewest victims on device `d` whose memory covers `needed` for
    /// waiter `w`, from the lowest priorities that can cover it, preferring
    /// lower priority, then least recently used. `None` if no set can.
    fn choose_victims(
        &self,
        d: usize,
        acc: &Accounting,
        w: &Waiter,
        needed: u64,
        now: Instant,
    ) -> Option<Vec<(Victim, u64)>> {
        // A waiter may evict what it outranks, by its rank in the queue: a
        // request that has aged past an idle model's priority may evict it,
        // so a starved request (whose device takes no other grant) is not
        // left waiting for idle models to leave by themselves.
        let rank = self.effective_priority(w, now);
        // (victim, priority, last used, bytes it would free)
        let mut cands: Vec<(Victim, i32, Instant, u64)> = Vec::new();
        for r in self.on_device(d) {
            let v = Victim::Reservation(r.id);
            if r.idle_unasked()
                && r.priority <= rank
                && now.saturating_duration_since(r.granted_at) >= self.config.min_residency
                && !w.skip.contains(&v)
            {
                cands.push((v, r.priority, r.last_busy, frees(acc, r.id, r.bytes)));
            }
        }
        // The lowest priority tier that can cover the need.
        let mut tiers: Vec<i32> = cands.iter().map(|c| c.1).collect();
        tiers.sort_unstable();
        tiers.dedup();
        let tier = tiers
            .into_iter()
            .find(|&t| cands.iter().filter(|c| c.1 <= t).map(|c| c.3).sum::<u64>() >= needed)?;
        let mut pool: Vec<(Victim, i32, Instant, u64)> =
            cands.into_iter().filter(|c| c.1 <= tier).collect();
        // Fewest victims: how many of the largest it takes.
        let mut sizes: Vec<u64> = pool.iter().map(|c| c.3).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut k = 0;
        let mut sum = 0u64;
        while sum < needed {
            sum += sizes[k];
            k += 1;
        }
        // Among sets of k, prefer lower priority then least recently used:
        // take each candidate in that order if the set can still be completed
        // with the largest of the rest.
        pool.sort_by_key(|c| (c.1, c.2));
        let mut chosen = Vec::with_capacity(k);
        let mut taken = 0u64;
        for i in 0..pool.len() {
            if chosen.len() == k {
                break;
            }
            let slots_after = k - chosen.len() - 1;
            let mut rest: Vec<u64> = pool[i + 1..].iter().map(|c| c.3).collect();
            rest.sort_unstable_by(|a, b| b.cmp(a));
            let best_rest: u64 = rest.iter().take(slots_after).sum();
            if taken + pool[i].3 + best_rest >= needed {
                taken += pool[i].3;
                chosen.push((pool[i].0.clone(), pool[i].3));
            }
        }
        (taken >= needed).then_some(chosen)
    }
}

/// What evicting reservation `id` (of `bytes`) frees: its own share of its
/// group. A group's reservations together stand for `max(group bytes, group
/// usage)`; each frees its reserved bytes plus, when the group uses more than
/// it reserved, a share of the excess in proportion to its size. A
/// reservation alone in its group frees `max(bytes, usage)`; three 3 GiB
/// models of one client whose process uses 9 GiB free 3 GiB each, not 9.
fn frees(acc: &Accounting, id: ReservationId, bytes: u64) -> u64 {
    let usage = acc.actual.get(&id).copied().unwrap_or(0);
    let group = acc
        .group_bytes
        .get(&id)
        .copied()
        .unwrap_or(bytes)
        .max(bytes);
    let excess = usage.saturating_sub(group);
    let share = u128::from(excess) * u128::from(bytes) / u128::from(group.max(1));
    bytes.saturating_add(share as u64)
}
