//! The wait queue: waiting requests in grant order, with the indices that
//! keep every operation of a scheduling pass cheap however long the queue is.
//!
//! Aging is continuous, so the grant order is static: a request's effective
//! priority at time `t` is `priority + (t − arrived) / aging`, and comparing
//! two of them at any `t` is comparing `arrived − priority × aging` (the `t`
//! cancels). That value, with the id to break ties by arrival, is the
//! [`OrderKey`]; the queue is a `BTreeMap` on it and is never sorted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use vramd_protocol::ReservationId;

use super::{ConnId, Waiter};

/// A waiter's place in the grant order (smaller is served first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct OrderKey {
    /// `arrived − priority × aging`, in nanoseconds from the ledger's epoch.
    pub rank: i128,
    /// Ties go to the earlier arrival.
    pub id: ReservationId,
}

/// Waiting requests and their indices.
#[derive(Debug, Default)]
pub(super) struct Queue {
    by_key: BTreeMap<OrderKey, Waiter>,
    /// Wait limits, for expiry without a scan.
    deadlines: BTreeSet<(Instant, OrderKey)>,
    /// Each connection's waiting requests, for cancel and disconnect.
    by_conn: HashMap<ConnId, BTreeSet<OrderKey>>,
    /// Per device (index into the ledger's devices): the waiters that may use
    /// it, by id (so by arrival), with their arrival time.
    per_device: Vec<BTreeMap<ReservationId, Instant>>,
    /// Per device: the same waiters by size, to tell at once whether any
    /// could fit.
    sizes: Vec<BTreeSet<(u64, ReservationId)>>,
    /// Per user: how many requests wait, and for how many bytes.
    per_uid: HashMap<u32, (usize, u64)>,
    /// Waiters with evictions in flight.
    planned: BTreeSet<OrderKey>,
}

impl Queue {
    /// An empty queue for `devices` devices.
    pub fn new(devices: usize) -> Self {
        Self {
            per_device: vec![BTreeMap::new(); devices],
            sizes: vec![BTreeSet::new(); devices],
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn insert(&mut self, key: OrderKey, w: Waiter) {
        if let Some(d) = w.deadline {
            self.deadlines.insert((d, key));
        }
        self.by_conn.entry(w.conn).or_default().insert(key);
        for &d in &w.candidates {
            self.per_device[d].insert(w.id, w.arrived);
            self.sizes[d].insert((w.bytes, w.id));
        }
        let u = self.per_uid.entry(w.peer.uid).or_default();
        u.0 += 1;
        u.1 = u.1.saturating_add(w.bytes);
        if w.plan.is_some() {
            self.planned.insert(key);
        }
        self.by_key.insert(key, w);
    }

    pub fn remove(&mut self, key: &OrderKey) -> Option<Waiter> {
        let w = self.by_key.remove(key)?;
        if let Some(d) = w.deadline {
            self.deadlines.remove(&(d, *key));
        }
        if let Some(set) = self.by_conn.get_mut(&w.conn) {
            set.remove(key);
            if set.is_empty() {
                self.by_conn.remove(&w.conn);
            }
        }
        for &d in &w.candidates {
            self.per_device[d].remove(&w.id);
            self.sizes[d].remove(&(w.bytes, w.id));
        }
        if let Some(u) = self.per_uid.get_mut(&w.peer.uid) {
            u.0 -= 1;
            u.1 = u.1.saturating_sub(w.bytes);
            if u.0 == 0 {
                self.per_uid.remove(&w.peer.uid);
            }
        }
        self.planned.remove(key);
        Some(w)
    }

    pub fn get(&self, key: &OrderKey) -> Option<&Waiter> {
        self.by_key.get(key)
    }

    pub fn contains(&self, key: &OrderKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Mutable access to fields that no index covers (position, skip list).
    pub fn get_mut(&mut self, key: &OrderKey) -> Option<&mut Waiter> {
        self.by_key.get_mut(key)
    }

    /// Sets or clears a waiter's eviction plan.
    pub fn set_plan(&mut self, key: &OrderKey, plan: Option<super::Plan>) {
        if let Some(w) = self.by_key.get_mut(key) {
            if plan.is_some() {
                self.planned.insert(*key);
            } else {
                self.planned.remove(key);
            }
            w.plan = plan;
        }
    }

    /// Waiters in grant order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&OrderKey, &Waiter)> {
        self.by_key.iter()
    }

    /// Mutable waiters in grant order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&OrderKey, &mut Waiter)> {
        self.by_key.iter_mut()
    }

    /// Keys of a connection's waiting requests.
    pub fn keys_of(&self, conn: ConnId) -> Vec<OrderKey> {
        self.by_conn
            .get(&conn)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Keys whose wait limit is at or before `now`.
    pub fn due(&self, now: Instant) -> Vec<OrderKey> {
        self.deadlines
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|(_, k)| *k)
            .collect()
    }

    /// The earliest wait limit.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Arrival of the oldest waiter that may use device `d`.
    pub fn oldest_for(&self, d: usize) -> Option<Instant> {
        self.per_device[d].first_key_value().map(|(_, &a)| a)
    }

    /// The smallest request that may use device `d`.
    pub fn smallest_for(&self, d: usize) -> Option<u64> {
        self.sizes[d].first().map(|(b, _)| *b)
    }

    /// How many requests user `uid` has waiting, and for how many bytes.
    pub fn usage_of(&self, uid: u32) -> (usize, u64) {
        self.per_uid.get(&uid).copied().unwrap_or((0, 0))
    }

    /// Keys of waiters with evictions in flight.
    pub fn planned(&self) -> Vec<OrderKey> {
        self.planned.iter().copied().collect()
    }

    /// Whether any waiter has an eviction in flight on device `d`.
    pub fn plan_on(&self, d: usize) -> bool {
        self.planned.iter().any(|k| {
            self.by_key
                .get(k)
                .and_then(|w| w.plan.as_ref())
                .is_some_and(|p| p.device == d)
        })
    }

    /// The first key in grant order whose rank is at least `rank`.
    pub fn first_from_rank(&self, rank: i128) -> Option<OrderKey> {
        let from = OrderKey {
            rank,
            id: ReservationId(0),
        };
        self.by_key.range(from..).next().map(|(k, _)| *k)
    }

    /// The last `n` keys in grant order, first to last.
    pub fn tail(&self, n: usize) -> Vec<OrderKey> {
        let mut v: Vec<OrderKey> = self.by_key.keys().rev().take(n).copied().collect();
        v.reverse();
        v
    }
}
