//! The ledger: devices, reservations, the wait queue, and every grant decision.
//!
//! It is pure and deterministic. It takes events — a request, a release, a
//! cancel, a disconnect, a reading, a tick — each with the time it happened,
//! and returns [`Effect`]s for the server to deliver. It does no I/O, reads no
//! clock and holds no lock; the server owns it from one task.
//!
//! # Accounting (DESIGN.md, "The accounting model")
//! For each device, from its latest [`Reading`]:
//! - `actual(g)`: usage of the processes a group of reservations speaks for
//!   (reservations whose pids overlap form one group, so a process holding two
//!   reservations is not counted twice);
//! - `unattributed = max(0, used − Σ actual(g))`;
//! - `committed = unattributed + Σ max(bytes(g), actual(g))`;
//! - `available = total − cushion − committed`; a request fits iff
//!   `bytes ≤ available`.
//!
//! A process counts for a reservation when the reservation speaks for its
//! pid or for one of its ancestors (the client, processes it attached, and
//! their descendants). Without per-process usage,
//! `committed = used + Σ bytes`: over-cautious, never overcommitting.
//!
//! A released reservation on a measured device becomes a *ghost* that keeps
//! counting until a reading taken after the release arrives: a grant never
//! rests on a reading older than the release it depends on. An unhealthy
//! device (its reading failed) offers nothing until a reading succeeds. A
//! simulated device has no readings of its own: what each reservation holds
//! counts as used by its process.
//!
//! # Scheduling
//! Waiters are ordered by effective priority (priority + one per `aging`
//! waited, continuously), then arrival; because every waiter ages at the same
//! rate this order never changes while they wait (see [`queue`]). A pass walks them in that order and grants
//! each that fits, so a smaller request may be granted ahead of a larger one
//! that does not fit (backfill) — until the larger one has waited past the
//! starvation guard; from then on its devices take no further grants until it
//! is granted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use vramd_protocol::{
    ConsumerStatus, Counters, DeviceSelector, DeviceStatus, ErrorKind, Grant, QueueEntry,
    ReservationId, ReservationStatus, ReserveRequest, format_size,
};

/// Queue positions are pushed on every change up to this depth; deeper
/// waiters learn their first position, then moves once within this depth.
pub const POSITION_PUSH_LIMIT: u32 = 1000;

/// Identifies one client connection inside the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who is on the other end of a connection (from the socket's peer credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Root or a member of the admin group: exempt from per-user limits and
    /// sees everyone's details in status.
    pub admin: bool,
}

/// A device as the backend describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Index (as `nvidia-smi` numbers devices).
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Total memory.
    pub total_bytes: u64,
}

/// One reading of a device's memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reading {
    /// Memory in use on the whole device.
    pub used_bytes: u64,
    /// Usage per process, or `None` where the backend cannot tell.
    pub processes: Option<Vec<ProcessUsage>>,
}

/// One process's usage of a device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessUsage {
    /// Process id.
    pub pid: u32,
    /// Bytes it uses on the device.
    pub bytes: u64,
    /// Its parent, grandparent, … (nearest first), so that the usage of a
    /// process launched by a client counts against the client's reservation.
    pub ancestors: Vec<u32>,
}

impl ProcessUsage {
    /// A process with no known ancestors.
    pub fn new(pid: u32, bytes: u64) -> Self {
        Self {
            pid,
            bytes,
            ancestors: Vec::new(),
        }
    }
}

/// Where readings of a device come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadingSource {
    /// Derived from the reservations themselves (`--simulate`).
    Simulated,
    /// Set by [`Ledger::set_reading`] from a real backend.
    Measured(Reading),
}

/// Policy knobs of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Memory kept free on every device.
    pub cushion_bytes: u64,
    /// Waiting this long raises a request's effective priority by one.
    pub aging: Duration,
    /// After waiting this long, a request stops smaller ones from being
    /// granted ahead of it on its devices.
    pub starvation_guard: Duration,
    /// How a request for any device is placed.
    pub placement: Placement,
    /// How long an evicted holder or consumer has to free its memory before
    /// the daemon reports it and tries another victim.
    pub eviction_deadline: Duration,
    /// An idle reservation younger than this is never evicted.
    pub min_residency: Duration,
    /// Most requests one user (not an admin) may have waiting at once.
    pub max_queued_per_uid: usize,
    /// Most bytes one user (not an admin) may hold and wait for together.
    pub max_bytes_per_uid: Option<u64>,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            cushion_bytes: 0,
            aging: Duration::from_secs(10),
            starvation_guard: Duration::from_secs(30),
            placement: Placement::Spread,
            eviction_deadline: Duration::from_secs(30),
            min_residency: Duration::from_secs(10),
            max_queued_per_uid: 4096,
            max_bytes_per_uid: None,
        }
    }
}

/// Placement of a request for any device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// The device with the most room.
    #[default]
    Spread,
    /// The device with the least room that fits.
    Pack,
}

/// Something the server must deliver or log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A request was granted.
    Granted {
        /// Its connection.
        conn: ConnId,
        /// Its tag.
        tag: u64,
        /// What was granted.
        grant: Grant,
        /// Its label, for logs.
        label: Option<String>,
        /// How long it waited.
        waited: Duration,
    },
    /// A request waits at this position (sent when it is queued and when its
    /// position changes).
    Queued {
        /// Its connection.
        conn: ConnId,
        /// Its tag.
        tag: u64,
        /// Its id.
        id: ReservationId,
        /// 1-based position.
        position: u32,
    },
    /// Ask a holder to unload and release an idle reservation.
    Evict {
        /// The holder's connection.
        conn: ConnId,
        /// The reservation.
        id: ReservationId,
        /// Time it has.
        deadline: Duration,
        /// Who needs the room.
        reason: String,
    },
    /// Ask an external consumer to unload.
    EvictConsumer {
        /// Its name in the config.
        name: String,
        /// Who needs the room.
        reason: String,
    },
    /// A victim did not free its memory in time (for logs).
    EvictionFailed {
        /// The reservation or consumer.
        victim: String,
        /// What happened.
        reason: String,
    },
    /// A request failed: refused, or its wait limit passed.
    Failed {
        /// Its connection.
        conn: ConnId,
        /// Its tag.
        tag: u64,
        /// Why.
        kind: ErrorKind,
        /// Explanation for the client.
        message: String,
    },
}

/// A reservation that ended, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Its id.
    pub id: ReservationId,
    /// Index of its device.
    pub device: u32,
    /// Bytes it held.
    pub bytes: u64,
    /// Its label.
    pub label: Option<String>,
    /// How long it was held.
    pub held: Duration,
    /// Whether it was released on an eviction request.
    pub evicted: bool,
}

/// Why an operation on the ledger failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    /// The connection holds no reservation with that id.
    #[error("no reservation {0} is held by this connection")]
    NotHeld(ReservationId),
}

#[derive(Debug, Clone)]
struct Device {
    spec: DeviceSpec,
    source: ReadingSource,
    /// Why the device is unhealthy (its last reading failed); `None` if healthy.
    fault: Option<String>,
}

/// A reservation released on a measured device whose memory has not yet been
/// seen free: it keeps counting until a reading taken after its release.
#[derive(Debug, Clone)]
struct Ghost {
    device: usize,
    pids: Vec<u32>,
    bytes: u64,
    released_at: Instant,
}

/// The accounting of one device (see the module docs).
#[derive(Debug, Clone, Default)]
struct Accounting {
    committed: u64,
    unattributed: u64,
    /// Actual usage of each reservation's group (reservations sharing a
    /// process are one group and show the group's usage).
    actual: HashMap<ReservationId, u64>,
    /// Reserved bytes of each reservation's group.
    group_bytes: HashMap<ReservationId, u64>,
}

#[derive(Debug, Clone)]
struct Reservation {
    id: ReservationId,
    conn: ConnId,
    device: usize,
    bytes: u64,
    label: Option<String>,
    priority: i32,
    peer: Peer,
    /// Processes whose usage this reservation speaks for.
    pids: Vec<u32>,
    granted_at: Instant,
    /// Idle: its model is kept warm and may be evicted.
    idle: bool,
    /// When it was last busy (or granted): older idle ones are evicted first.
    last_busy: Instant,
    /// Deadline of an eviction request sent to its holder.
    evicting: Option<Instant>,
}

impl Reservation {
    /// Idle and not already asked to unload: a possible eviction victim.
    fn idle_unasked(&self) -> bool {
        self.idle && self.evicting.is_none()
    }
}

/// An external consumer declared in the config (Ollama, ComfyUI, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// Its name.
    pub name: String,
    /// Its kind, for status.
    pub kind: String,
    /// Index (into the devices given to [`Ledger::new`]) of the device it
    /// lives on; `None`: it may be on any.
    pub device: Option<usize>,
    /// It is evicted only for waiters of at least this priority.
    pub priority: i32,
    /// It is not evicted until it has been resident this long.
    pub min_residency: Duration,
    /// Labels of requests it is never evicted for.
    pub coexist_with: Vec<String>,
}

/// What a consumer says it holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumerReading {
    /// Memory it holds.
    pub resident_bytes: u64,
    /// Models it holds, where it says.
    pub models: Vec<String>,
}

#[derive(Debug, Clone)]
struct Consumer {
    spec: ConsumerSpec,
    reading: ConsumerReading,
    reachable: bool,
    last_error: Option<String>,
    /// Since when it has held memory.
    loaded_since: Option<Instant>,
    last_eviction: Option<Instant>,
    /// An unload was asked and has not completed.
    evicting: bool,
}

/// Something that can be asked to give memory back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Victim {
    Reservation(ReservationId),
    Consumer(String),
}

impl std::fmt::Display for Victim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Victim::Reservation(id) => write!(f, "reservation {id}"),
            Victim::Consumer(name) => write!(f, "consumer {name}"),
        }
    }
}

/// Evictions in flight for one waiter.
#[derive(Debug, Clone)]
struct Plan {
    device: usize,
    victims: Vec<Victim>,
    deadline: Instant,
}

#[derive(Debug, Clone)]
struct Waiter {
    id: ReservationId,
    conn: ConnId,
    tag: u64,
    bytes: u64,
    selector: DeviceSelector,
    /// Indices (into `devices`) of the devices it may use.
    candidates: Vec<usize>,
    priority: i32,
    label: Option<String>,
    peer: Peer,
    arrived: Instant,
    deadline: Option<Instant>,
    /// Last position told to the client (0: none yet).
    told_position: u32,
    /// Start granted reservations idle.
    evictable: bool,
    /// Evictions in flight to make room for it.
    plan: Option<Plan>,
    /// Victims that failed it; not asked again for it.
    skip: Vec<Victim>,
}

/// The arbiter's state.
#[derive(Debug)]
pub struct Ledger {
    config: LedgerConfig,
    devices: Vec<Device>,
    reservations: BTreeMap<ReservationId, Reservation>,
    /// Each connection's reservations.
    held_by: HashMap<ConnId, BTreeSet<ReservationId>>,
    /// Waiting requests in grant order.
    queue: Queue,
    ghosts: Vec<Ghost>,
    consumers: Vec<Consumer>,
    /// Origin of order keys.
    epoch: Instant,
    /// Since the last full pass, nothing freed room and no waiter left but
    /// by that pass: only newly arrived waiters can fit.
    clean: bool,
    /// Waiters queued since the last pass.
    fresh: Vec<OrderKey>,
    /// Waiters not yet told their position.
    untold: Vec<OrderKey>,
    /// A waiter that was told its position left, or one arrived ahead of
    /// others: every position must be recomputed.
    positions_dirty: bool,
    next_id: u64,
    counters: Counters,
}

impl Ledger {
    /// A ledger over `devices`, all with readings from `source`.
    pub fn new(config: LedgerConfig, devices: Vec<DeviceSpec>, source: ReadingSource) -> Self {
        let devices_len = devices.len();
        Self {
            config,
            devices: devices
                .into_iter()
                .map(|spec| Device {
                    spec,
                    source: source.clone(),
                    fault: None,
                })
                .collect(),
            queue: Queue::new(devices_len),
            reservations: BTreeMap::new(),
            held_by: HashMap::new(),
            ghosts: Vec::new(),
            consumers: Vec::new(),
            epoch: Instant::now(),
            clean: false,
            fresh: Vec::new(),
            untold: Vec::new(),
            positions_dirty: false,
            next_id: 1,
            counters: Counters::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Event counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Number of granted reservations.
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Number of devices.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Number of waiting requests.
    pub fn waiter_count(&self) -> usize {
        self.queue.len()
    }

    /// Where a waiter of `priority` that arrived at `arrived` stands in the
    /// grant order (see [`queue`]).
    fn order_key(&self, priority: i32, arrived: Instant, id: ReservationId) -> OrderKey {
        let since_epoch = if arrived >= self.epoch {
            arrived.duration_since(self.epoch).as_nanos() as i128
        } else {
            -(self.epoch.duration_since(arrived).as_nanos() as i128)
        };
        let aging = self.config.aging.as_nanos().max(1) as i128;
        OrderKey {
            rank: since_epoch - i128::from(priority) * aging,
            id,
        }
    }

    /// Handles a request: refuses it if it can never fit, else queues it and
    /// grants what fits.
    pub fn reserve(
        &mut self,
        conn: ConnId,
        peer: Peer,
        req: ReserveRequest,
        now: Instant,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let refuse = |ledger: &mut Self, effects: &mut Vec<Effect>, message: String| {
            ledger.counters.refusals += 1;
            effects.push(Effect::Failed {
                conn,
                tag: req.tag,
                kind: ErrorKind::Refused,
                message,
            });
        };
        if req.bytes == 0 {
            refuse(
                self,
                &mut effects,
                "a reservation must be of at least 1 byte".into(),
            );
            return effects;
        }
        if let Some(message) = self.over_user_limits(peer, req.bytes) {
            self.counters.refusals += 1;
            effects.push(Effect::Failed {
                conn,
                tag: req.tag,
                kind: ErrorKind::LimitExceeded,
                message,
            });
            return effects;
        }
        let candidates = match self.candidates(&req.device) {
            Ok(c) => c,
            Err(message) => {
                refuse(self, &mut effects, message);
                return effects;
            }
        };
        if candidates.iter().all(|&d| self.devices[d].fault.is_some()) {
            let why: Vec<String> = candidates
                .iter()
                .map(|&d| {
                    let dev = &self.devices[d];
                    format!(
                        "device {} ({}) is unhealthy: {}",
                        dev.spec.index,
                        dev.spec.uuid,
                        dev.fault.as_deref().unwrap_or("")
                    )
                })
                .collect();
            effects.push(Effect::Failed {
                conn,
                tag: req.tag,
                kind: ErrorKind::Unavailable,
                message: format!(
                    "{}; no new grants until its readings recover",
                    why.join("; ")
                ),
            });
            return effects;
        }
        let largest = candidates
            .iter()
            .map(|&d| self.capacity(d))
            .max()
            .unwrap_or(0);
        if req.bytes > largest {
            refuse(
                self,
                &mut effects,
                format!(
                    "{} can never fit: the largest eligible device offers {} ({} total less the {} cushion)",
                    format_size(req.bytes),
                    format_size(largest),
                    format_size(
                        candidates
                            .iter()
                            .map(|&d| self.devices[d].spec.total_bytes)
                            .max()
                            .unwrap_or(0)
                    ),
                    format_size(self.config.cushion_bytes),
                ),
            );
            return effects;
        }
        let id = ReservationId(self.next_id);
        self.next_id += 1;
        let key = self.order_key(req.priority, now, id);
        self.fresh.push(key);
        self.untold.push(key);
        self.queue.insert(
            key,
            Waiter {
                id,
                conn,
                tag: req.tag,
                bytes: req.bytes,
                selector: req.device,
                candidates,
                priority: req.priority,
                label: req.label,
                peer,
                arrived: now,
                deadline: req
                    .timeout_ms
                    .map(|ms| now.checked_add(Duration::from_millis(ms)).unwrap_or(now)),
                told_position: 0,
                evictable: req.evictable,
                plan: None,
                skip: Vec::new(),
            },
        );
        self.settle(now, &mut effects);
        effects
    }

    /// Why a request of `bytes` by `peer` would break a per-user limit.
    fn over_user_limits(&self, peer: Peer, bytes: u64) -> Option<String> {
        if peer.admin {
            return None;
        }
        let (queued_count, queued_bytes) = self.queue.usage_of(peer.uid);
        if queued_count >= self.config.max_queued_per_uid {
            return Some(format!(
                "user {} already has {queued_count} requests waiting (limit {})",
                peer.uid, self.config.max_queued_per_uid
            ));
        }
        let limit = self.config.max_bytes_per_uid?;
        let held: u64 = self
            .reservations
            .values()
            .filter(|r| r.peer.uid == peer.uid)
            .map(|r| r.bytes)
            .fold(queued_bytes, u64::saturating_add);
        (held.saturating_add(bytes) > limit).then(|| {
            format!(
                "user {} holds or waits for {}; {} more would pass the per-user limit of {}",
                peer.uid,
                format_size(held),
                format_size(bytes),
                format_size(limit)
            )
        })
    }

    /// Releases a reservation held by `conn` and grants what now fits.
    pub fn release(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        now: Instant,
    ) -> Result<(Released, Vec<Effect>), LedgerError> {
        match self.reservations.get(&id) {
            Some(r) if r.conn == conn => {}
            _ => return Err(LedgerError::NotHeld(id)),
        }
        let r = self.take_reservation(id).expect("checked above");
        self.counters.releases += 1;
        self.clean = false;
        // The ghost (if any) must exist before the pass that follows.
        let released = self.released(r, now);
        let mut effects = Vec::new();
        self.settle(now, &mut effects);
        Ok((released, effects))
    }

    /// Removes a reservation and its index entry.
    fn take_reservation(&mut self, id: ReservationId) -> Option<Reservation> {
        let r = self.reservations.remove(&id)?;
        if let Some(set) = self.held_by.get_mut(&r.conn) {
            set.remove(&id);
            if set.is_empty() {
                self.held_by.remove(&r.conn);
            }
        }
        Some(r)
    }

    /// Removes a waiter; a waiter that was told its position leaves a gap.
    fn take_waiter(&mut self, key: &OrderKey) -> Option<Waiter> {
        let w = self.queue.remove(key)?;
        if w.told_position != 0 {
            self.positions_dirty = true;
        }
        Some(w)
    }

    fn released(&mut self, r: Reservation, now: Instant) -> Released {
        let evicted = r.evicting.is_some();
        if evicted {
            self.counters.evictions_completed += 1;
        }
        if matches!(self.devices[r.device].source, ReadingSource::Measured(_)) {
            self.ghosts.push(Ghost {
                device: r.device,
                pids: r.pids.clone(),
                bytes: r.bytes,
                released_at: now,
            });
        }
        Released {
            id: r.id,
            device: self.devices[r.device].spec.index,
            bytes: r.bytes,
            label: r.label,
            held: now.saturating_duration_since(r.granted_at),
            evicted,
        }
    }

    /// Withdraws `conn`'s waiting requests with `tag`; returns how many there
    /// were and the effects on the rest of the queue.
    pub fn cancel(&mut self, conn: ConnId, tag: u64, now: Instant) -> (u32, Vec<Effect>) {
        let keys: Vec<OrderKey> = self
            .queue
            .keys_of(conn)
            .into_iter()
            .filter(|k| self.queue.get(k).is_some_and(|w| w.tag == tag))
            .collect();
        for k in &keys {
            self.take_waiter(k);
        }
        let count = keys.len() as u32;
        self.counters.cancels += u64::from(count);
        let mut effects = Vec::new();
        if count > 0 {
            // A cancelled starved waiter may have kept room for itself.
            self.clean = false;
            self.settle(now, &mut effects);
        }
        (count, effects)
    }

    /// Drops everything `conn` held or waited for. Returns the reservations it
    /// held, and the effects (grants to waiters that now fit).
    pub fn disconnect(&mut self, conn: ConnId, now: Instant) -> (Vec<Released>, Vec<Effect>) {
        let keys = self.queue.keys_of(conn);
        for k in &keys {
            self.take_waiter(k);
        }
        let cancelled = keys.len();
        self.counters.cancels += cancelled as u64;
        let ids: Vec<ReservationId> = self
            .held_by
            .get(&conn)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let removed: Vec<Reservation> = ids
            .into_iter()
            .filter_map(|id| self.take_reservation(id))
            .collect();
        let released: Vec<Released> = removed.into_iter().map(|r| self.released(r, now)).collect();
        self.counters.releases += released.len() as u64;
        self.counters.disconnect_releases += released.len() as u64;
        let mut effects = Vec::new();
        if cancelled > 0 || !released.is_empty() {
            self.clean = false;
            self.settle(now, &mut effects);
        }
        (released, effects)
    }

    /// Stores a reading of device `index` (the `index`-th device given to
    /// [`Ledger::new`]) that was taken at `taken_at`, marks the device
    /// healthy, and grants what now fits. Released reservations stop counting
    /// once a reading taken after their release arrives.
    pub fn set_reading(
        &mut self,
        index: usize,
        reading: Reading,
        taken_at: Instant,
        now: Instant,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(d) = self.devices.get_mut(index) {
            d.source = ReadingSource::Measured(reading);
            d.fault = None;
            self.clean = false;
            self.ghosts
                .retain(|g| !(g.device == index && g.released_at < taken_at));
            self.settle(now, &mut effects);
        }
        effects
    }

    /// Marks device `index` unhealthy: no new grants on it until the next
    /// successful reading. Its reservations stay.
    pub fn set_fault(&mut self, index: usize, fault: String, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(d) = self.devices.get_mut(index) {
            d.fault = Some(fault);
            self.clean = false;
            self.settle(now, &mut effects);
        }
        effects
    }

    /// Whether device `index` is healthy.
    pub fn is_healthy(&self, index: usize) -> bool {
        self.devices.get(index).is_some_and(|d| d.fault.is_none())
    }

    /// Adds processes whose usage counts against reservation `id` held by
    /// `conn`. Returns every pid it now speaks for, and the effects.
    pub fn attach_pids(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        pids: &[u32],
        now: Instant,
    ) -> Result<(Vec<u32>, Vec<Effect>), LedgerError> {
        let r = match self.reservations.get_mut(&id) {
            Some(r) if r.conn == conn => r,
            _ => return Err(LedgerError::NotHeld(id)),
        };
        for &pid in pids {
            if pid != 0 && !r.pids.contains(&pid) {
                r.pids.push(pid);
            }
        }
        let all = r.pids.clone();
        self.clean = false;
        let mut effects = Vec::new();
        self.settle(now, &mut effects);
        Ok((all, effects))
    }

    /// Expires waiters whose wait limit passed, and re-ranks the queue (aging).
    pub fn tick(&mut self, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        self.settle(now, &mut effects);
        effects
    }

    /// When [`Ledger::tick`] should next be called: the earliest wait limit
    /// or eviction deadline, or the moment an idle holder becomes evictable
    /// while requests wait — it passes its minimum residency, or a waiter
    /// ages up to its priority. (The grant order does not change with time.)
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
            .min()
    }

    /// While requests wait: the next moment a waiter's effective priority
    /// reaches that of an idle reservation or a consumer it could not evict
    /// before (see `choose_victims`).
    ///
    /// A waiter reaches priority `p` at `rank + p × aging` (its order key's
    /// rank, from the epoch), so for each priority the first waiter in grant
    /// order still below it is the next to get there: one lookup per distinct
    /// priority of the idle, however long the queue.
    fn next_outranking(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let mut levels: Vec<i32> = self
            .reservations
            .values()
            .filter(|r| r.idle_unasked())
            .map(|r| r.priority)
            .chain(
                self.consumers
                    .iter()
                    .filter(|c| !c.evicting && c.reading.resident_bytes > 0)
                    .map(|c| c.spec.priority),
            )
            .collect();
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

    /// While requests wait: the next moment an idle reservation or a consumer
    /// passes its minimum residency (it may then be evicted).
    fn next_eviction_eligibility(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let reservations = self
            .reservations
            .values()
            .filter(|r| r.idle_unasked())
            .map(|r| r.granted_at + self.config.min_residency);
        let consumers = self
            .consumers
            .iter()
            .filter(|c| !c.evicting)
            .filter_map(|c| c.loaded_since.map(|t| t + c.spec.min_residency));
        reservations.chain(consumers).filter(|&t| t > now).min()
    }

    /// Memory a new request on device `index` may get now (0 while the
    /// device is unhealthy).
    pub fn available(&self, index: usize) -> u64 {
        let device = &self.devices[index];
        if device.fault.is_some() {
            return 0;
        }
        let committed = match device.source {
            // What each reservation holds counts as used by its process, so
            // the accounting model reduces to Σ reserved: no need to build it.
            ReadingSource::Simulated => self.reserved(index),
            ReadingSource::Measured(_) => self.account(index).committed,
        };
        self.capacity(index).saturating_sub(committed)
    }

    /// Per-device state for status.
    pub fn device_status(&self) -> Vec<DeviceStatus> {
        (0..self.devices.len())
            .map(|d| {
                let dev = &self.devices[d];
                let spec = &dev.spec;
                let reading = self.reading(d);
                let acc = self.account(d);
                let per_process_usage = reading.processes.is_some();
                let note = match (&dev.fault, per_process_usage) {
                    (Some(f), _) => Some(f.clone()),
                    (None, false) => Some(
                        "per-process usage is unavailable: counting used + reserved (cautious)"
                            .to_string(),
                    ),
                    (None, true) => None,
                };
                DeviceStatus {
                    index: spec.index,
                    uuid: spec.uuid.clone(),
                    name: spec.name.clone(),
                    total_bytes: spec.total_bytes,
                    used_bytes: reading.used_bytes,
                    reserved_bytes: self.reserved(d),
                    cushion_bytes: self.config.cushion_bytes.min(spec.total_bytes),
                    committed_bytes: acc.committed,
                    available_bytes: if dev.fault.is_some() {
                        0
                    } else {
                        self.capacity(d).saturating_sub(acc.committed)
                    },
                    unattributed_bytes: acc.unattributed,
                    healthy: dev.fault.is_none(),
                    note,
                    per_process_usage,
                }
            })
            .collect()
    }

    /// Granted reservations, by id.
    pub fn reservation_status(&self, now: Instant) -> Vec<ReservationStatus> {
        let accounts: Vec<Accounting> = (0..self.devices.len()).map(|d| self.account(d)).collect();
        self.reservations
            .values()
            .map(|r| {
                let acc = &accounts[r.device];
                let actual = acc.actual.get(&r.id).copied().unwrap_or(0);
                let group_bytes = acc.group_bytes.get(&r.id).copied().unwrap_or(r.bytes);
                (r, actual, actual > group_bytes)
            })
            .map(|(r, actual_bytes, over_reserved)| ReservationStatus {
                id: r.id,
                device: self.devices[r.device].spec.index,
                bytes: r.bytes,
                label: r.label.clone(),
                pid: r.peer.pid,
                uid: r.peer.uid,
                priority: r.priority,
                age_ms: millis(now.saturating_duration_since(r.granted_at)),
                actual_bytes,
                over_reserved,
                pids: r.pids.clone(),
                idle: r.idle,
            })
            .collect()
    }

    /// The first `limit` waiting requests, in the order they would be granted.
    pub fn queue_status(&self, now: Instant, limit: usize) -> Vec<QueueEntry> {
        self.queue
            .iter()
            .take(limit)
            .enumerate()
            .map(|(pos, (_, w))| QueueEntry {
                id: w.id,
                position: pos as u32 + 1,
                bytes: w.bytes,
                device: w.selector.clone(),
                priority: w.priority,
                label: w.label.clone(),
                pid: w.peer.pid,
                uid: w.peer.uid,
                waited_ms: millis(now.saturating_duration_since(w.arrived)),
            })
            .collect()
    }

    // ---- decisions -------------------------------------------------------

    /// Runs a scheduling pass, expires waiters past their limit, and tells
    /// the rest their new positions.
    fn settle(&mut self, now: Instant, effects: &mut Vec<Effect>) {
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

    /// Grants what fits. After a full pass, and until something frees room or
    /// a waiter leaves, only newly arrived waiters can fit: they are checked
    /// alone (no walk over the queue) unless a starved waiter may stand in
    /// their way.
    fn schedule(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        if self.queue.is_empty() {
            self.fresh.clear();
            self.clean = true;
            return;
        }
        let mut avail: Vec<u64> = (0..self.devices.len()).map(|d| self.available(d)).collect();
        let mut granted: Vec<(OrderKey, usize)> = Vec::new();
        let fast = self.clean && {
            let guard = self.config.starvation_guard;
            self.fresh.iter().all(|k| {
                self.queue.get(k).is_none_or(|w| {
                    w.candidates.iter().all(|&d| {
                        self.queue
                            .oldest_for(d)
                            .is_none_or(|a| now.saturating_duration_since(a) < guard)
                    })
                })
            })
        };
        if fast {
            let mut fresh = std::mem::take(&mut self.fresh);
            fresh.sort_unstable();
            for key in fresh {
                let Some(w) = self.queue.get(&key) else {
                    continue;
                };
                if let Some(d) = self.place(w, &avail, &[]) {
                    avail[d] -= w.bytes;
                    granted.push((key, d));
                }
            }
        } else if (0..self.devices.len())
            .all(|d| self.queue.smallest_for(d).is_none_or(|b| b > avail[d]))
        {
            // Nothing fits anywhere: no walk over the queue.
            self.fresh.clear();
        } else {
            self.fresh.clear();
            let mut blocked = vec![false; self.devices.len()];
            for (key, w) in self.queue.iter() {
                match self.place(w, &avail, &blocked) {
                    Some(d) => {
                        avail[d] -= w.bytes;
                        granted.push((*key, d));
                    }
                    None if now.saturating_duration_since(w.arrived)
                        >= self.config.starvation_guard =>
                    {
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
        for (key, d) in granted {
            let w = self.take_waiter(&key).expect("granted from the queue");
            self.grant(w, d, now, effects);
        }
    }

    /// The device a waiter goes to now, if it fits on one it may use.
    fn place(&self, w: &Waiter, avail: &[u64], blocked: &[bool]) -> Option<usize> {
        let fits = w
            .candidates
            .iter()
            .copied()
            .filter(|&d| !blocked.get(d).copied().unwrap_or(false) && avail[d] >= w.bytes);
        match self.config.placement {
            Placement::Spread => fits.max_by_key(|&d| (avail[d], std::cmp::Reverse(d))),
            Placement::Pack => fits.min_by_key(|&d| (avail[d], d)),
        }
    }

    fn grant(&mut self, w: Waiter, d: usize, now: Instant, effects: &mut Vec<Effect>) {
        let grant = Grant {
            id: w.id,
            device: self.devices[d].spec.index,
            device_uuid: self.devices[d].spec.uuid.clone(),
            bytes: w.bytes,
        };
        self.held_by.entry(w.conn).or_default().insert(w.id);
        self.reservations.insert(
            w.id,
            Reservation {
                id: w.id,
                conn: w.conn,
                device: d,
                bytes: w.bytes,
                label: w.label.clone(),
                priority: w.priority,
                peer: w.peer,
                pids: vec![w.peer.pid],
                granted_at: now,
                idle: w.evictable,
                last_busy: now,
                evicting: None,
            },
        );
        self.counters.grants += 1;
        effects.push(Effect::Granted {
            conn: w.conn,
            tag: w.tag,
            grant,
            label: w.label,
            waited: now.saturating_duration_since(w.arrived),
        });
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
                    let position = (first + i) as u32 + 1;
                    w.told_position = position;
                    effects.push(Effect::Queued {
                        conn: w.conn,
                        tag: w.tag,
                        id: w.id,
                        position,
                    });
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
                w.told_position = position;
                effects.push(Effect::Queued {
                    conn: w.conn,
                    tag: w.tag,
                    id: w.id,
                    position,
                });
            }
        }
    }

    // ---- eviction --------------------------------------------------------

    /// Marks a reservation held by `conn` idle (evictable) or busy.
    pub fn set_idle(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        idle: bool,
        now: Instant,
    ) -> Result<Vec<Effect>, LedgerError> {
        let r = match self.reservations.get_mut(&id) {
            Some(r) if r.conn == conn => r,
            _ => return Err(LedgerError::NotHeld(id)),
        };
        if r.idle && !idle {
            r.last_busy = now;
        }
        r.idle = idle;
        let mut effects = Vec::new();
        if idle {
            // A waiter may now make room by evicting it.
            self.settle(now, &mut effects);
        }
        Ok(effects)
    }

    /// Declares an external consumer.
    pub fn add_consumer(&mut self, spec: ConsumerSpec) {
        self.consumers.push(Consumer {
            spec,
            reading: ConsumerReading::default(),
            reachable: false,
            last_error: None,
            loaded_since: None,
            last_eviction: None,
            evicting: false,
        });
    }

    /// Stores what consumer `name` says it holds (or why it could not be
    /// asked). An evicting consumer that holds nothing any more has completed
    /// its eviction; grants still wait for the readings.
    pub fn set_consumer(
        &mut self,
        name: &str,
        reading: Result<ConsumerReading, String>,
        now: Instant,
    ) -> Vec<Effect> {
        let Some(c) = self.consumers.iter_mut().find(|c| c.spec.name == name) else {
            return Vec::new();
        };
        match reading {
            Ok(r) => {
                c.reachable = true;
                c.last_error = None;
                if r.resident_bytes == 0 {
                    c.loaded_since = None;
                    if c.evicting {
                        c.evicting = false;
                        self.counters.evictions_completed += 1;
                    }
                } else if c.loaded_since.is_none() {
                    c.loaded_since = Some(now);
                }
                c.reading = r;
            }
            Err(e) => {
                c.reachable = false;
                c.last_error = Some(e);
            }
        }
        let mut effects = Vec::new();
        self.settle(now, &mut effects);
        effects
    }

    /// Consumer `name` could not be asked to unload (down, error, garbage):
    /// it is reported, skipped for the waiters it was asked for, and the next
    /// candidates are tried at once.
    pub fn consumer_unload_failed(
        &mut self,
        name: &str,
        error: String,
        now: Instant,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(c) = self.consumers.iter_mut().find(|c| c.spec.name == name) else {
            return effects;
        };
        if !c.evicting {
            return effects;
        }
        c.evicting = false;
        c.last_error = Some(error.clone());
        self.counters.evictions_failed += 1;
        let victim = Victim::Consumer(name.to_string());
        effects.push(Effect::EvictionFailed {
            victim: victim.to_string(),
            reason: error,
        });
        for key in self.queue.planned() {
            let hit = self
                .queue
                .get(&key)
                .and_then(|w| w.plan.as_ref())
                .is_some_and(|p| p.victims.contains(&victim));
            if hit {
                self.queue.set_plan(&key, None);
                if let Some(w) = self.queue.get_mut(&key) {
                    w.skip.push(victim.clone());
                }
            }
        }
        self.settle(now, &mut effects);
        effects
    }

    /// Declared consumers for status.
    pub fn consumer_status(&self, now: Instant) -> Vec<ConsumerStatus> {
        self.consumers
            .iter()
            .map(|c| ConsumerStatus {
                name: c.spec.name.clone(),
                kind: c.spec.kind.clone(),
                device: c.spec.device.map(|d| self.devices[d].spec.index),
                priority: c.spec.priority,
                reachable: c.reachable,
                resident_bytes: c.reading.resident_bytes,
                models: c.reading.models.clone(),
                last_eviction_ms: c
                    .last_eviction
                    .map(|t| millis(now.saturating_duration_since(t))),
                last_error: c.last_error.clone(),
            })
            .collect()
    }

    /// Victims that missed their deadline are reported and skipped; their
    /// waiter plans again.
    fn fail_overdue_evictions(&mut self, now: Instant, effects: &mut Vec<Effect>) {
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
                    Victim::Reservation(id) => match self.reservations.get_mut(id) {
                        Some(r) => {
                            r.evicting = None;
                            true
                        }
                        None => false,
                    },
                    Victim::Consumer(name) => {
                        match self.consumers.iter_mut().find(|c| &c.spec.name == name) {
                            Some(c) if c.evicting => {
                                c.evicting = false;
                                true
                            }
                            _ => false,
                        }
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

    /// For waiters that do not fit, asks idle holders and consumers to make
    /// room — at most one eviction in flight per device, only when the
    /// victims can free enough, never a busy holder.
    fn plan_evictions(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        // The common case costs nothing: no waiter, or nothing evictable.
        let evictable = self.reservations.values().any(|r| r.idle_unasked())
            || self
                .consumers
                .iter()
                .any(|c| c.reachable && !c.evicting && c.reading.resident_bytes > 0);
        if self.queue.is_empty() || !evictable {
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
                if available >= w.bytes {
                    continue; // it fits; held back by the starvation guard
                }
                let acc = accounts[d].get_or_insert_with(|| self.account(d));
                if let Some(victims) = self.choose_victims(d, acc, w, w.bytes - available, now) {
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
                        let r = self
                            .reservations
                            .get_mut(id)
                            .expect("chosen from reservations");
                        r.evicting = Some(deadline);
                        effects.push(Effect::Evict {
                            conn: r.conn,
                            id: *id,
                            deadline: self.config.eviction_deadline,
                            reason: reason.clone(),
                        });
                    }
                    Victim::Consumer(name) => {
                        let c = self
                            .consumers
                            .iter_mut()
                            .find(|c| &c.spec.name == name)
                            .expect("chosen from consumers");
                        c.evicting = true;
                        c.last_eviction = Some(now);
                        effects.push(Effect::EvictConsumer {
                            name: name.clone(),
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

    /// The fewest victims on device `d` whose memory covers `needed` for
    /// waiter `w`, from the lowest priorities that can cover it, preferring
    /// lower priority, then least recently used. `None` if no set can.
    /// A waiter's priority plus one per `aging` it has waited, as it ranks
    /// in the queue.
    fn effective_priority(&self, w: &Waiter, now: Instant) -> i32 {
        let waited = now.saturating_duration_since(w.arrived).as_nanos();
        let steps = waited / self.config.aging.as_nanos().max(1);
        w.priority
            .saturating_add(i32::try_from(steps).unwrap_or(i32::MAX))
    }

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
        for r in self.reservations.values().filter(|r| r.device == d) {
            let v = Victim::Reservation(r.id);
            if r.idle_unasked()
                && r.priority <= rank
                && now.saturating_duration_since(r.granted_at) >= self.config.min_residency
                && !w.skip.contains(&v)
            {
                let frees = r.bytes.max(acc.actual.get(&r.id).copied().unwrap_or(0));
                cands.push((v, r.priority, r.last_busy, frees));
            }
        }
        for c in &self.consumers {
            let v = Victim::Consumer(c.spec.name.clone());
            let label_coexists = w
                .label
                .as_ref()
                .is_some_and(|l| c.spec.coexist_with.iter().any(|x| x == l));
            if c.spec.device.is_none_or(|cd| cd == d)
                && c.reachable
                && !c.evicting
                && c.reading.resident_bytes > 0
                && c.spec.priority <= rank
                && !label_coexists
                && c.loaded_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= c.spec.min_residency)
                && !w.skip.contains(&v)
            {
                let since = c.loaded_since.unwrap_or(now);
                cands.push((v, c.spec.priority, since, c.reading.resident_bytes));
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

    // ---- accounting ------------------------------------------------------

    fn candidates(&self, selector: &DeviceSelector) -> Result<Vec<usize>, String> {
        let known = || {
            self.devices
                .iter()
                .map(|d| format!("{} ({})", d.spec.index, d.spec.uuid))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match selector {
            DeviceSelector::Any => Ok((0..self.devices.len()).collect()),
            DeviceSelector::Index(i) => self
                .devices
                .iter()
                .position(|d| d.spec.index == *i)
                .map(|d| vec![d])
                .ok_or_else(|| format!("there is no device {i}; devices: {}", known())),
            DeviceSelector::Uuid(u) => self
                .devices
                .iter()
                .position(|d| d.spec.uuid.eq_ignore_ascii_case(u))
                .map(|d| vec![d])
                .ok_or_else(|| format!("there is no device {u}; devices: {}", known())),
        }
    }

    fn capacity(&self, d: usize) -> u64 {
        self.devices[d]
            .spec
            .total_bytes
            .saturating_sub(self.config.cushion_bytes)
    }

    fn reserved(&self, d: usize) -> u64 {
        self.reservations
            .values()
            .filter(|r| r.device == d)
            .map(|r| r.bytes)
            .sum()
    }

    fn reading(&self, d: usize) -> Reading {
        match &self.devices[d].source {
            ReadingSource::Measured(r) => r.clone(),
            ReadingSource::Simulated => {
                let mut per_pid: BTreeMap<u32, u64> = BTreeMap::new();
                for r in self.reservations.values().filter(|r| r.device == d) {
                    *per_pid.entry(r.peer.pid).or_default() += r.bytes;
                }
                Reading {
                    used_bytes: per_pid.values().sum(),
                    processes: Some(
                        per_pid
                            .into_iter()
                            .map(|(pid, bytes)| ProcessUsage::new(pid, bytes))
                            .collect(),
                    ),
                }
            }
        }
    }

    /// The accounting of device `d` (see the module docs). Released
    /// reservations not yet seen free (ghosts) count like held ones.
    fn account(&self, d: usize) -> Accounting {
        let reading = self.reading(d);
        // Holders: (reservation id if still held, pids, bytes).
        let holders: Vec<(Option<ReservationId>, &[u32], u64)> = self
            .reservations
            .values()
            .filter(|r| r.device == d)
            .map(|r| (Some(r.id), r.pids.as_slice(), r.bytes))
            .chain(
                self.ghosts
                    .iter()
                    .filter(|g| g.device == d)
                    .map(|g| (None, g.pids.as_slice(), g.bytes)),
            )
            .collect();
        let Some(processes) = reading.processes else {
            let reserved: u64 = holders.iter().map(|h| h.2).sum();
            return Accounting {
                committed: reading.used_bytes.saturating_add(reserved),
                unattributed: reading.used_bytes,
                actual: HashMap::new(),
                group_bytes: holders
                    .iter()
                    .filter_map(|h| h.0.map(|id| (id, h.2)))
                    .collect(),
            };
        };
        // Group holders whose pids overlap (union-find over small sets).
        let mut parent: Vec<usize> = (0..holders.len()).collect();
        fn find(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        let mut owner: HashMap<u32, usize> = HashMap::new();
        for (i, (_, pids, _)) in holders.iter().enumerate() {
            for pid in pids.iter() {
                match owner.get(pid) {
                    Some(&j) => {
                        let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                        parent[a] = b;
                    }
                    None => {
                        owner.insert(*pid, i);
                    }
                }
            }
        }
        let mut group_bytes: HashMap<usize, u64> = HashMap::new();
        for (i, h) in holders.iter().enumerate() {
            let root = find(&mut parent, i);
            *group_bytes.entry(root).or_default() += h.2;
        }
        // A process counts for the holder of its pid or of its nearest
        // ancestor that a holder speaks for.
        let mut group_actual: HashMap<usize, u64> = HashMap::new();
        for p in &processes {
            let holder = std::iter::once(&p.pid)
                .chain(p.ancestors.iter())
                .find_map(|pid| owner.get(pid).copied());
            if let Some(i) = holder {
                let root = find(&mut parent, i);
                *group_actual.entry(root).or_default() += p.bytes;
            }
        }
        let attributed: u64 = group_actual.values().sum();
        let unattributed = reading.used_bytes.saturating_sub(attributed);
        let committed = group_bytes
            .iter()
            .map(|(root, &bytes)| bytes.max(group_actual.get(root).copied().unwrap_or(0)))
            .fold(unattributed, u64::saturating_add);
        let mut actual = HashMap::new();
        let mut per_reservation_group_bytes = HashMap::new();
        for (i, h) in holders.iter().enumerate() {
            if let Some(id) = h.0 {
                let root = find(&mut parent, i);
                actual.insert(id, group_actual.get(&root).copied().unwrap_or(0));
                per_reservation_group_bytes.insert(id, group_bytes[&root]);
            }
        }
        Accounting {
            committed,
            unattributed,
            actual,
            group_bytes: per_reservation_group_bytes,
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

mod queue;

use queue::{OrderKey, Queue};

#[cfg(test)]
mod tests;
