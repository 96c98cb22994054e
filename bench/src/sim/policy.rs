//! The arbiters the simulator compares: vramd's own [`Ledger`], and the
//! designs it replaces.
//!
//! - [`LedgerArbiter`] drives the real `vramd_ledger::Ledger` in virtual
//!   time (each `Instant` is a fixed base plus the simulated time): every
//!   grant decision — the priority + aging order, backfill, the starvation
//!   guard — and every eviction of an idle model (victim choice, minimum
//!   residency) is the daemon's code, not a model of it.
//! - [`QueueArbiter`] implements the baselines in a few lines each: one
//!   global lock (one job on the GPU at a time, in arrival order, as with a
//!   lock file around every model load); strict FIFO (memory-aware, but a
//!   request that does not fit blocks everything behind it); and FIFO with
//!   backfill and no starvation guard (anything that fits goes, so a large
//!   request can wait indefinitely behind a stream of small ones). They
//!   order by arrival only. So that the comparison is about ordering, the
//!   two memory-aware ones evict idle models by the same rule as the ledger,
//!   simplified: when the first waiter lacks memory, idle models that have
//!   been loaded for the minimum residency and whose priority is not above
//!   the waiter's are asked to unload, lowest priority first, then least
//!   recently used, if together they free enough.
//!
//! Holders are numbered by the simulator ("instances": one loaded copy of a
//! model); an arbiter answers each event with [`Decisions`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use vramd_ledger::{ConnId, DeviceSpec, Effect, Input, Ledger, LedgerConfig, Peer, ReadingSource};
use vramd_protocol::{ClientMessage, ReservationId, ReserveRequest, ServerMessage};

/// What an arbiter decided in answer to one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Instances granted their memory.
    pub grants: Vec<usize>,
    /// Idle instances asked to unload and release.
    pub evictions: Vec<usize>,
}

/// A memory arbiter as the simulator sees it. Times are from the start of
/// the trace.
pub trait Arbiter {
    /// Whether apps may keep models loaded after a job under this arbiter.
    /// A global lock protects memory only while it is held, so under it a
    /// model must be unloaded before the lock is released.
    fn keeps_warm(&self) -> bool {
        true
    }
    /// Instance `inst` asks for `bytes` at `priority`.
    fn request(&mut self, inst: usize, bytes: u64, priority: i32, now: Duration) -> Decisions;
    /// Instance `inst` gives its memory back.
    fn release(&mut self, inst: usize, now: Duration) -> Decisions;
    /// Instance `inst` keeps its model loaded but unused (`idle`), or uses
    /// it again.
    fn set_idle(&mut self, inst: usize, idle: bool, now: Duration) -> Decisions;
    /// Time passes (aging, guards, residency).
    fn tick(&mut self, now: Duration) -> Decisions;
    /// When [`Arbiter::tick`] should next be called.
    fn next_wakeup(&self, now: Duration) -> Option<Duration>;
    /// Problems the arbiter reported (a valid trace has none).
    fn errors(&self) -> &[String];
}

/// A reserve request for device 0, built through serde so that fields the
/// protocol adds later take their defaults.
pub fn reserve_request(tag: u64, bytes: u64, priority: i32) -> ReserveRequest {
    serde_json::from_value(serde_json::json!({
        "tag": tag,
        "bytes": bytes,
        "device": { "index": 0 },
        "priority": priority,
    }))
    .expect("a reserve request with only the required fields decodes")
}

/// vramd's policy: the daemon's [`Ledger`] on one simulated device.
#[derive(Debug)]
pub struct LedgerArbiter {
    ledger: Ledger,
    base: Instant,
    ids: HashMap<usize, ReservationId>,
    ignore_priority: bool,
    errors: Vec<String>,
}

impl LedgerArbiter {
    /// A ledger with `config` over one device of `capacity` bytes. With
    /// `ignore_priority`, every request is sent at priority 0 (for
    /// cross-checks against the FIFO baselines).
    pub fn new(capacity: u64, config: LedgerConfig, ignore_priority: bool) -> LedgerArbiter {
        let device = DeviceSpec {
            index: 0,
            uuid: "SIM-0".into(),
            name: "Simulated GPU".into(),
            total_bytes: capacity,
        };
        let base = Instant::now();
        LedgerArbiter {
            ledger: Ledger::new(config, vec![device], ReadingSource::Simulated, base),
            base,
            ids: HashMap::new(),
            ignore_priority,
            errors: Vec::new(),
        }
    }

    fn at(&self, now: Duration) -> Instant {
        self.base + now
    }

    /// Applies instance `inst`'s request (each instance is its own
    /// connection and process, so the simulated readings attribute each
    /// reservation to itself alone).
    fn send(&mut self, inst: usize, msg: ClientMessage, now: Duration) -> Decisions {
        let peer = Peer {
            pid: 100_000 + inst as u32,
            uid: 1000,
            gid: 1000,
            admin: true,
        };
        let conn = ConnId(inst as u64);
        let effects = self
            .ledger
            .apply(Input::Request { conn, peer, msg }, self.at(now));
        self.decide(effects)
    }

    fn decide(&mut self, effects: Vec<Effect>) -> Decisions {
        let mut d = Decisions::default();
        for e in effects {
            match e {
                Effect::Granted { conn, grant, .. } => {
                    let inst = conn.0 as usize;
                    self.ids.insert(inst, grant.id);
                    d.grants.push(inst);
                }
                Effect::Evict { conn, .. } => d.evictions.push(conn.0 as usize),
                Effect::Failed { conn, message, .. } => {
                    self.errors.push(format!("instance {}: {message}", conn.0));
                }
                Effect::EvictionFailed { victim, reason } => {
                    self.errors.push(format!("eviction of {victim}: {reason}"));
                }
                Effect::Reply {
                    conn,
                    msg: ServerMessage::Error { message, .. },
                } => {
                    self.errors.push(format!("instance {}: {message}", conn.0));
                }
                _ => {}
            }
        }
        d
    }
}

impl Arbiter for LedgerArbiter {
    fn request(&mut self, inst: usize, bytes: u64, priority: i32, now: Duration) -> Decisions {
        let priority = if self.ignore_priority { 0 } else { priority };
        let req = reserve_request(inst as u64, bytes, priority);
        self.send(inst, ClientMessage::Reserve(req), now)
    }

    fn release(&mut self, inst: usize, now: Duration) -> Decisions {
        let Some(id) = self.ids.remove(&inst) else {
            self.errors
                .push(format!("instance {inst} released without a grant"));
            return Decisions::default();
        };
        self.send(inst, ClientMessage::Release { tag: 0, id }, now)
    }

    fn set_idle(&mut self, inst: usize, idle: bool, now: Duration) -> Decisions {
        let Some(&id) = self.ids.get(&inst) else {
            self.errors.push(format!("instance {inst} holds nothing"));
            return Decisions::default();
        };
        self.send(inst, ClientMessage::SetIdle { tag: 0, id, idle }, now)
    }

    fn tick(&mut self, now: Duration) -> Decisions {
        let effects = self.ledger.apply(Input::Tick, self.at(now));
        self.decide(effects)
    }

    fn next_wakeup(&self, now: Duration) -> Option<Duration> {
        self.ledger
            .next_wakeup(self.at(now))
            .map(|t| t.saturating_duration_since(self.base))
    }

    fn errors(&self) -> &[String] {
        &self.errors
    }
}

/// Queue discipline of a baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discipline {
    /// One holder at a time, whatever its size, in arrival order.
    GlobalLock,
    /// Arrival order; the first request that does not fit blocks the rest.
    StrictFifo,
    /// Arrival order; every request that fits is granted (backfill), with no
    /// starvation guard.
    FifoBackfill,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    bytes: u64,
    priority: i32,
    granted_at: Duration,
    last_busy: Duration,
    idle: bool,
    evicting: bool,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    inst: usize,
    bytes: u64,
    priority: i32,
}

/// A baseline arbiter over one device.
#[derive(Debug)]
pub struct QueueArbiter {
    discipline: Discipline,
    capacity: u64,
    min_residency: Duration,
    used: u64,
    holders: HashMap<usize, Holder>,
    queue: VecDeque<Waiting>,
    errors: Vec<String>,
}

impl QueueArbiter {
    /// A baseline with `discipline` on a device of `capacity` bytes, evicting
    /// idle models loaded for at least `min_residency`.
    pub fn new(discipline: Discipline, capacity: u64, min_residency: Duration) -> QueueArbiter {
        QueueArbiter {
            discipline,
            capacity,
            min_residency,
            used: 0,
            holders: HashMap::new(),
            queue: VecDeque::new(),
            errors: Vec::new(),
        }
    }

    fn grant(&mut self, w: Waiting, now: Duration, d: &mut Decisions) {
        self.used += w.bytes;
        self.holders.insert(
            w.inst,
            Holder {
                bytes: w.bytes,
                priority: w.priority,
                granted_at: now,
                last_busy: now,
                idle: false,
                evicting: false,
            },
        );
        d.grants.push(w.inst);
    }

    fn pass(&mut self, now: Duration) -> Decisions {
        let mut d = Decisions::default();
        match self.discipline {
            Discipline::GlobalLock => {
                if self.holders.is_empty() {
                    if let Some(w) = self.queue.pop_front() {
                        self.grant(w, now, &mut d);
                    }
                }
                return d;
            }
            Discipline::StrictFifo => {
                while let Some(&w) = self.queue.front() {
                    if self.used + w.bytes > self.capacity {
                        break;
                    }
                    self.queue.pop_front();
                    self.grant(w, now, &mut d);
                }
            }
            Discipline::FifoBackfill => {
                let mut rest = VecDeque::with_capacity(self.queue.len());
                while let Some(w) = self.queue.pop_front() {
                    if self.used + w.bytes <= self.capacity {
                        self.grant(w, now, &mut d);
                    } else {
                        rest.push_back(w);
                    }
                }
                self.queue = rest;
            }
        }
        self.evict(now, &mut d);
        d
    }

    /// Asks idle models to make room for the first waiter (see the module
    /// docs).
    fn evict(&mut self, now: Duration, d: &mut Decisions) {
        let Some(&head) = self.queue.front() else {
            return;
        };
        let free = self.capacity - self.used;
        let coming: u64 = self
            .holders
            .values()
            .filter(|h| h.evicting)
            .map(|h| h.bytes)
            .sum();
        if head.bytes <= free + coming {
            return;
        }
        let need = head.bytes - free - coming;
        let mut cands: Vec<(usize, Holder)> = self
            .holders
            .iter()
            .filter(|(_, h)| {
                h.idle
                    && !h.evicting
                    && h.priority <= head.priority
                    && now.saturating_sub(h.granted_at) >= self.min_residency
            })
            .map(|(&i, &h)| (i, h))
            .collect();
        if cands.iter().map(|(_, h)| h.bytes).sum::<u64>() < need {
            return;
        }
        cands.sort_by_key(|&(i, h)| (h.priority, h.last_busy, i));
        let mut freed = 0;
        for (i, h) in cands {
            if freed >= need {
                break;
            }
            freed += h.bytes;
            if let Some(h) = self.holders.get_mut(&i) {
                h.evicting = true;
            }
            d.evictions.push(i);
        }
    }

    /// When the next idle model becomes old enough to evict, if a waiter
    /// could use it.
    fn next_eligible(&self, now: Duration) -> Option<Duration> {
        if self.queue.is_empty() {
            return None;
        }
        self.holders
            .values()
            .filter(|h| h.idle && !h.evicting)
            .map(|h| h.granted_at + self.min_residency)
            .filter(|&t| t > now)
            .min()
    }
}

impl Arbiter for QueueArbiter {
    fn keeps_warm(&self) -> bool {
        self.discipline != Discipline::GlobalLock
    }

    fn request(&mut self, inst: usize, bytes: u64, priority: i32, now: Duration) -> Decisions {
        self.queue.push_back(Waiting {
            inst,
            bytes,
            priority,
        });
        self.pass(now)
    }

    fn release(&mut self, inst: usize, now: Duration) -> Decisions {
        match self.holders.remove(&inst) {
            Some(h) => self.used -= h.bytes,
            None => self
                .errors
                .push(format!("instance {inst} released without a grant")),
        }
        self.pass(now)
    }

    fn set_idle(&mut self, inst: usize, idle: bool, now: Duration) -> Decisions {
        match self.holders.get_mut(&inst) {
            Some(h) => {
                if h.idle && !idle {
                    h.last_busy = now;
                }
                h.idle = idle;
            }
            None => self.errors.push(format!("instance {inst} holds nothing")),
        }
        self.pass(now)
    }

    fn tick(&mut self, now: Duration) -> Decisions {
        self.pass(now)
    }

    fn next_wakeup(&self, now: Duration) -> Option<Duration> {
        self.next_eligible(now)
    }

    fn errors(&self) -> &[String] {
        &self.errors
    }
}
