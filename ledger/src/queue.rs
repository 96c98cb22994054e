//! The wait queue: waiting requests in grant order, with the indices that
//! keep every operation of a scheduling pass cheap however long the queue is.
//!
//! Aging is continuous, so the grant order is static: a request's effective
//! priority at time `t` is `priority + (t − arrived) / aging`, and comparing
//! two of them at any `t` is comparing `arrived − priority × aging` (the `t`
//! cancels). That value, with the id to break ties by arrival, is the
//! [`OrderKey`]; the queue is a `BTreeMap` on it and is never sorted.
//!
//! With a priority window ([`LedgerConfig::priority_window`](crate::LedgerConfig)),
//! the order changes with time alone, once per waiter: a waiter younger
//! than the window ranks by strict priority, then arrival (rank
//! `−priority`); once it has waited the window it is *promoted*
//! ([`Queue::promote`]) to rank `OLD_BASE + arrived`, ahead of every
//! younger waiter and behind the older ones. Promotions happen in arrival
//! order (one index by id), each costs one removal and one insertion, and
//! an index of the aging ranks keeps [`Queue::first_from_rank`] (eviction's
//! "when does a waiter reach priority p") exact.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

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

/// Ranks of promoted waiters (priority window) start here: below every rank
/// of a waiter inside the window (`−priority`, at least `−2³¹`) whatever
/// its arrival (nanoseconds from the epoch, within ±2⁶⁴).
const OLD_BASE: i128 = -(1 << 100);

/// A waiter's aging rank: `arrived − priority × aging`, in nanoseconds from
/// `epoch` (comparing two of them compares effective priorities at any time).
pub(super) fn aging_rank(epoch: Instant, aging: Duration, priority: i32, arrived: Instant) -> i128 {
    since(epoch, arrived) - i128::from(priority) * aging.as_nanos().max(1) as i128
}

/// The priority window's state (see the module docs).
#[derive(Debug)]
struct Window {
    length: Duration,
    epoch: Instant,
    aging: Duration,
    /// Waiters still inside the window, by id (so by arrival).
    young: BTreeMap<ReservationId, (Instant, OrderKey)>,
    /// Every waiter's aging rank.
    by_aging: BTreeSet<(i128, ReservationId)>,
}

/// Waiting requests and their indices.
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// Set when the order has a priority window.
    window: Option<Window>,
    by_key: BTreeMap<OrderKey, Waiter>,
    /// Wait limits, for expiry without a scan.
    deadlines: BTreeSet<(Instant, OrderKey)>,
    /// Each connection's waiting requests, for cancel and disconnect.
    by_conn: HashMap<ConnId, BTreeSet<OrderKey>>,
    /// Per device (index into the ledger's devices): the waiters that may use
    /// it, by the moment they are starved (the starvation guard).
    per_device: Vec<BTreeSet<(Instant, ReservationId)>>,
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
            per_device: vec![BTreeSet::new(); devices],
            sizes: vec![BTreeSet::new(); devices],
            ..Self::default()
        }
    }

    /// An empty queue whose order has a priority window of `length`
    /// (aging ranks from `epoch` at `aging` per level, for eviction).
    pub fn with_window(devices: usize, length: Duration, epoch: Instant, aging: Duration) -> Self {
        Self {
            window: Some(Window {
                length,
                epoch,
                aging,
                young: BTreeMap::new(),
                by_aging: BTreeSet::new(),
            }),
            ..Self::new(devices)
        }
    }

    /// The key of a waiter arriving at `now`: its aging rank without a
    /// window (`aging_rank` gives it), else by its priority (or, with a
    /// zero window, its arrival).
    pub fn key_of(&self, aging_key: OrderKey, priority: i32, now: Instant) -> OrderKey {
        match &self.window {
            None => aging_key,
            Some(win) if win.length.is_zero() => OrderKey {
                rank: OLD_BASE + since(win.epoch, now),
                id: aging_key.id,
            },
            Some(_) => OrderKey {
                rank: -i128::from(priority),
                id: aging_key.id,
            },
        }
    }

    /// Promotes the waiters that have waited the priority window by `now`
    /// (see the module docs); returns whether any moved.
    pub fn promote(&mut self, now: Instant) -> bool {
        let mut moved = false;
        loop {
            let Some(win) = &self.window else {
                return false;
            };
            let Some((_, &(arrived, key))) = win.young.first_key_value() else {
                break;
            };
            if now.saturating_duration_since(arrived) < win.length {
                break;
            }
            let promoted = OrderKey {
                rank: OLD_BASE + since(win.epoch, arrived),
                id: key.id,
            };
            let w = self.remove(&key).expect("a young waiter is queued");
            self.insert(promoted, w);
            moved = true;
        }
        moved
    }

    /// When the next waiter will have waited the priority window.
    pub fn next_promotion(&self) -> Option<Instant> {
        let win = self.window.as_ref()?;
        let (_, &(arrived, _)) = win.young.first_key_value()?;
        arrived.checked_add(win.length)
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
            self.per_device[d].insert((w.starved_at, w.id));
            self.sizes[d].insert((w.bytes, w.id));
        }
        let u = self.per_uid.entry(w.peer.uid).or_default();
        u.0 += 1;
        u.1 = u.1.saturating_add(w.bytes);
        if w.plan.is_some() {
            self.planned.insert(key);
        }
        if let Some(win) = &mut self.window {
            win.by_aging.insert((
                aging_rank(win.epoch, win.aging, w.priority, w.arrived),
                w.id,
            ));
            if key.rank > OLD_BASE / 2 {
                win.young.insert(w.id, (w.arrived, key));
            }
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
            self.per_device[d].remove(&(w.starved_at, w.id));
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
        if let Some(win) = &mut self.window {
            win.by_aging.remove(&(
                aging_rank(win.epoch, win.aging, w.priority, w.arrived),
                w.id,
            ));
            win.young.remove(&w.id);
        }
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

    /// The first moment a waiter that may use device `d` is starved.
    pub fn first_starved_for(&self, d: usize) -> Option<Instant> {
        self.per_device[d].first().map(|&(t, _)| t)
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

    /// The waiter with the smallest aging rank at least `rank` (its key
    /// carries that aging rank; without a window, keys are aging ranks).
    pub fn first_from_rank(&self, rank: i128) -> Option<OrderKey> {
        if let Some(win) = &self.window {
            return win
                .by_aging
                .range((rank, ReservationId(0))..)
                .next()
                .map(|&(rank, id)| OrderKey { rank, id });
        }
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

/// Nanoseconds from `epoch` to `t` (negative before it).
fn since(epoch: Instant, t: Instant) -> i128 {
    if t >= epoch {
        t.duration_since(epoch).as_nanos() as i128
    } else {
        -(epoch.duration_since(t).as_nanos() as i128)
    }
}
