//! vramd's pure core: devices, reservations, the wait queue, accounting,
//! eviction choice and status — every decision the daemon makes.
//!
//! It is deterministic and has one entry point, [`Ledger::apply`]: every
//! event is an [`Input`] (a client's request, a disconnect, a reading, a
//! tick, a consumer's report) with the time it happened, and the answer is
//! the list of [`Effect`]s the daemon must carry out — every reply, grant,
//! queue move, eviction ask and log-worthy event, in order. The ledger does
//! no I/O, reads no clock and holds no lock; the daemon owns it from one
//! task and [`Ledger::next_wakeup`] tells it when to send the next
//! [`Input::Tick`].
//!
//! Modules, by concern: [`types`] (the vocabulary), `accounting` (what is
//! committed on a device), `queue` (waiters in grant order), `schedule`
//! (grant passes, wait limits, positions), `eviction` (idle holders,
//! victim choice), `reported` (the consumers clients report, for status)
//! and `status` (the report clients see).
//!
//! # Accounting
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
//! counts as used by its process, so its committed memory is the sum of the
//! reservations, kept per device as they come and go.
//!
//! # Scheduling
//! Waiters are ordered by effective priority (priority + one per `aging`
//! waited, continuously), then arrival; because every waiter ages at the same
//! rate this order never changes while they wait (see `queue`). A pass
//! walks them in that order and grants each that fits, so a smaller request
//! may be granted ahead of a larger one that does not fit (backfill) — until
//! the larger one has waited past the starvation guard; from then on its
//! devices take no further grants until it is granted.
//!
//! With a priority window ([`LedgerConfig::priority_window`]) the order
//! changes with time: strict priority, then arrival, for waiters younger
//! than the window, and arrival ahead of them for the rest (see `queue`).
//! With an adaptive guard ([`LedgerConfig::adaptive_guard`]) each waiter's
//! guard, fixed when it arrives, follows the mean wait of the last grants.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use vramd_protocol::{
    ClientMessage, Counters, DeviceSelector, ErrorKind, ReservationId, ReserveRequest,
    ServerMessage, format_size,
};

mod accounting;
mod eviction;
mod queue;
mod reported;
pub mod restart;
mod schedule;
mod status;
pub mod types;

pub use restart::{NO_CONN, RestoreReport, SavedReservation, Snapshot};
pub use status::{STATUS_PROCESS_LIMIT, STATUS_QUEUE_LIMIT, redact};
pub use types::{
    AdaptiveGuard, ConnId, DeviceSpec, Effect, Identity, Input, LedgerConfig, LedgerError,
    LogEvent, Peer, Placement, ProcessUsage, Reading, ReadingSource, Released,
};

use accounting::Ghost;
use eviction::{Plan, Victim};
use queue::{OrderKey, Queue};

/// Queue positions are pushed on every change up to this depth; deeper
/// waiters learn their first position, then moves once within this depth.
pub const POSITION_PUSH_LIMIT: u32 = 1000;

#[derive(Debug, Clone)]
struct Device {
    spec: DeviceSpec,
    source: ReadingSource,
    /// Why the device is unhealthy (its last reading failed); `None` if healthy.
    fault: Option<String>,
    /// Σ bytes of the reservations granted on it, kept as they come and go.
    reserved_bytes: u64,
    /// Its reservations, so that its accounting never walks the others.
    reservations: BTreeSet<ReservationId>,
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
    /// The hard limit its holder declared its processes run under (bytes,
    /// mechanism), see [`ClientMessage::SetEnforced`].
    enforced: Option<(u64, String)>,
}

impl Reservation {
    /// Idle and not already asked to unload: a possible eviction victim.
    fn idle_unasked(&self) -> bool {
        self.idle && self.evicting.is_none()
    }
}

impl Waiter {
    /// Whether it names processes whose usage it may adopt.
    fn adopts(&self) -> bool {
        self.pids.as_ref().is_some_and(|p| !p.is_empty())
    }
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
    /// From then on it is starved: its devices keep their room for it.
    starved_at: Instant,
    deadline: Option<Instant>,
    /// Last position told to the client (0: none yet).
    told_position: u32,
    /// Start granted reservations idle.
    evictable: bool,
    /// The processes it will speak for (`reserve_for`); `None`: the
    /// client's own. Their unattributed usage is adopted (see `need`).
    pids: Option<Vec<u32>>,
    /// Evictions in flight to make room for it.
    plan: Option<Plan>,
    /// Victims that failed it; not asked again for it.
    skip: Vec<Victim>,
}

/// The arbiter's state.
#[derive(Debug)]
pub struct Ledger {
    config: LedgerConfig,
    identity: Identity,
    devices: Vec<Device>,
    reservations: BTreeMap<ReservationId, Reservation>,
    /// Each connection's reservations.
    held_by: HashMap<ConnId, BTreeSet<ReservationId>>,
    /// Each user's granted bytes (for the per-user limit without a walk).
    held_by_uid: HashMap<u32, u64>,
    /// Each user's number of granted reservations (for the per-user limit
    /// without a walk).
    held_count_by_uid: HashMap<u32, usize>,
    /// Reservations that are idle and not asked to unload: the possible
    /// victims, so that an event with nothing evictable walks nothing.
    idle_unasked: BTreeSet<ReservationId>,
    /// Waiting requests in grant order.
    queue: Queue,
    ghosts: Vec<Ghost>,
    /// The consumers each connection reported (`ReportConsumers`).
    reported: reported::Reported,
    /// Origin of order keys, and the start of uptime.
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
    /// Waits of the last grants (for an adaptive starvation guard).
    recent_waits: schedule::RecentWaits,
    next_id: u64,
    counters: Counters,
    /// Reclaim tokens, reservations held for reclaim, the grace period.
    restart: restart::Restart,
    /// Waiters made by `reserve_for` with pids to adopt: while there are
    /// any, a pass cannot rule out a fit from sizes alone.
    adopting: usize,
}

impl Ledger {
    /// A ledger over `devices`, all with readings from `source`, starting at
    /// `now`.
    pub fn new(
        config: LedgerConfig,
        devices: Vec<DeviceSpec>,
        source: ReadingSource,
        now: Instant,
    ) -> Self {
        let devices_len = devices.len();
        let queue = match config.priority_window {
            Some(window) => Queue::with_window(devices_len, window, now, config.aging),
            None => Queue::new(devices_len),
        };
        Self {
            config,
            identity: Identity::default(),
            devices: devices
                .into_iter()
                .map(|spec| Device {
                    spec,
                    source: source.clone(),
                    fault: None,
                    reserved_bytes: 0,
                    reservations: BTreeSet::new(),
                })
                .collect(),
            queue,
            reservations: BTreeMap::new(),
            held_by: HashMap::new(),
            held_by_uid: HashMap::new(),
            held_count_by_uid: HashMap::new(),
            idle_unasked: BTreeSet::new(),
            ghosts: Vec::new(),
            reported: reported::Reported::default(),
            epoch: now,
            clean: false,
            fresh: Vec::new(),
            untold: Vec::new(),
            positions_dirty: false,
            recent_waits: schedule::RecentWaits::default(),
            next_id: 1,
            counters: Counters::default(),
            restart: restart::Restart::default(),
            adopting: 0,
        }
    }

    /// Sets what status reports about the daemon (its version, its backend).
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    /// The configuration in force.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Changes the eviction timing (a config reload): evictions already
    /// asked keep their deadline; minimum residencies are judged anew.
    pub fn set_eviction_timing(&mut self, eviction_deadline: Duration, min_residency: Duration) {
        self.config.eviction_deadline = eviction_deadline;
        self.config.min_residency = min_residency;
        self.clean = false;
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

    /// Whether device `index` is healthy.
    pub fn is_healthy(&self, index: usize) -> bool {
        self.devices.get(index).is_some_and(|d| d.fault.is_none())
    }

    /// Handles one event that happened at `now` and returns what the daemon
    /// must do about it, in order.
    pub fn apply(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        let grace_ended = self.end_grace(now, &mut fx);
        let settle = grace_ended
            | match input {
                Input::Request { conn, peer, msg } => {
                    self.on_request(conn, peer, msg, now, &mut fx)
                }
                Input::Disconnect { conn } => self.on_disconnect(conn, now, &mut fx),
                Input::Reading {
                    device,
                    taken_at,
                    result,
                } => self.on_reading(device, taken_at, result, &mut fx),
                Input::Tick => true,
            };
        if settle {
            self.settle(now, &mut fx);
        }
        fx
    }

    /// A client's request; returns whether a scheduling pass must follow.
    fn on_request(
        &mut self,
        conn: ConnId,
        peer: Peer,
        msg: ClientMessage,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> bool {
        let mut reply = |msg| fx.push(Effect::Reply { conn, msg });
        match msg {
            ClientMessage::Hello { .. } => {
                reply(error(0, ErrorKind::BadRequest, "hello was already sent"));
                false
            }
            ClientMessage::Ping { tag } => {
                reply(ServerMessage::Pong { tag });
                false
            }
            ClientMessage::Status { tag } => {
                let status = self.status(peer, now);
                reply(ServerMessage::Status {
                    tag,
                    status: Box::new(status),
                });
                false
            }
            ClientMessage::Reserve(req) => self.on_reserve(conn, peer, req, None, now, fx),
            ClientMessage::ReserveFor { request, pids } => {
                self.on_reserve(conn, peer, request, Some(pids), now, fx)
            }
            ClientMessage::Resize { tag, id, bytes } => {
                self.on_resize(conn, peer, tag, id, bytes, now, fx)
            }
            ClientMessage::SetEnforced {
                tag,
                id,
                limit_bytes,
                mechanism,
            } => self.on_set_enforced(conn, tag, id, limit_bytes, mechanism, fx),
            ClientMessage::Cancel { tag } => self.on_cancel(conn, tag, fx),
            ClientMessage::Release { tag, id } => self.on_release(conn, tag, id, now, fx),
            ClientMessage::SetIdle { tag, id, idle } => {
                self.on_set_idle(conn, tag, id, idle, now, fx)
            }
            ClientMessage::AttachPids { tag, id, pids } => {
                self.on_attach_pids(conn, tag, id, &pids, fx)
            }
            ClientMessage::EnableReclaim { tag } => {
                self.on_enable_reclaim(conn, tag, fx);
                false
            }
            ClientMessage::Reclaim { tag, id, token } => {
                self.on_reclaim(conn, peer, tag, id, &token, now, fx)
            }
            ClientMessage::ReportConsumers { tag, consumers } => {
                self.reported.report(conn, tag, consumers, now, fx);
                false
            }
        }
    }

    /// The reservation `id` if `conn` holds it; otherwise the `not_found`
    /// answer is pushed.
    fn held(
        &mut self,
        conn: ConnId,
        tag: u64,
        id: ReservationId,
        fx: &mut Vec<Effect>,
    ) -> Option<&mut Reservation> {
        match self.reservations.get_mut(&id) {
            Some(r) if r.conn == conn => Some(r),
            _ => {
                fx.push(Effect::Reply {
                    conn,
                    msg: error(
                        tag,
                        ErrorKind::NotFound,
                        LedgerError::NotHeld(id).to_string(),
                    ),
                });
                None
            }
        }
    }

    /// Where a waiter of `priority` that arrived at `arrived` stands in the
    /// aging order (see `queue`): without a priority window, its key in the
    /// grant order for as long as it waits.
    fn order_key(&self, priority: i32, arrived: Instant, id: ReservationId) -> OrderKey {
        OrderKey {
            rank: queue::aging_rank(self.epoch, self.config.aging, priority, arrived),
            id,
        }
    }

    /// Handles a request: refuses it if it can never fit, else queues it
    /// (the pass that follows grants what fits).
    fn on_reserve(
        &mut self,
        conn: ConnId,
        peer: Peer,
        req: ReserveRequest,
        pids: Option<Vec<u32>>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> bool {
        match self.admit(peer, &req) {
            Ok(candidates) => {
                self.enqueue(conn, peer, req, pids, candidates, now);
                true
            }
            Err((kind, message)) => {
                if kind != ErrorKind::Unavailable {
                    self.counters.refusals += 1;
                }
                fx.push(Effect::Failed {
                    conn,
                    tag: req.tag,
                    kind,
                    message,
                });
                false
            }
        }
    }

    /// The devices a request may wait for, or why it is refused at once.
    fn admit(&self, peer: Peer, req: &ReserveRequest) -> Result<Vec<usize>, (ErrorKind, String)> {
        let refused = |message: String| (ErrorKind::Refused, message);
        if req.bytes == 0 {
            return Err(refused("a reservation must be of at least 1 byte".into()));
        }
        if let Some(message) = self.over_user_limits(peer, req.bytes) {
            return Err((ErrorKind::LimitExceeded, message));
        }
        let candidates = self.candidates(&req.device).map_err(refused)?;
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
            return Err((
                ErrorKind::Unavailable,
                format!(
                    "{}; no new grants until its readings recover",
                    why.join("; ")
                ),
            ));
        }
        let largest = candidates
            .iter()
            .map(|&d| self.capacity(d))
            .max()
            .unwrap_or(0);
        if req.bytes > largest {
            return Err(refused(format!(
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
            )));
        }
        Ok(candidates)
    }

    /// Puts an admitted request in the queue.
    fn enqueue(
        &mut self,
        conn: ConnId,
        peer: Peer,
        req: ReserveRequest,
        pids: Option<Vec<u32>>,
        candidates: Vec<usize>,
        now: Instant,
    ) {
        let pids = pids.map(|mut p| {
            p.retain(|&pid| pid != 0);
            p.sort_unstable();
            p.dedup();
            p
        });
        if pids.as_ref().is_some_and(|p| !p.is_empty()) {
            self.adopting += 1;
        }
        let id = ReservationId(self.next_id);
        self.next_id += 1;
        let key = self
            .queue
            .key_of(self.order_key(req.priority, now, id), req.priority, now);
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
                starved_at: self.starved_at_for_new(now),
                deadline: req
                    .timeout_ms
                    .map(|ms| now.checked_add(Duration::from_millis(ms)).unwrap_or(now)),
                told_position: 0,
                evictable: req.evictable,
                pids,
                plan: None,
                skip: Vec::new(),
            },
        );
    }

    /// Why a request of `bytes` by `peer` would break a per-user limit.
    fn over_user_limits(&self, peer: Peer, bytes: u64) -> Option<String> {
        if peer.admin {
            return None;
        }
        let (queued_count, queued_bytes) = self.queue.usage_of(peer.uid);
        let held_count = self.held_count_by_uid.get(&peer.uid).copied().unwrap_or(0);
        if held_count + queued_count >= self.config.max_reservations_per_uid {
            return Some(format!(
                "user {} already holds {held_count} reservations and has {queued_count} requests waiting (limit {} together)",
                peer.uid, self.config.max_reservations_per_uid
            ));
        }
        if queued_count >= self.config.max_queued_per_uid {
            return Some(format!(
                "user {} already has {queued_count} requests waiting (limit {})",
                peer.uid, self.config.max_queued_per_uid
            ));
        }
        let limit = self.config.max_bytes_per_uid?;
        let held = self
            .held_by_uid
            .get(&peer.uid)
            .copied()
            .unwrap_or(0)
            .saturating_add(queued_bytes);
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

    /// Releases a reservation held by `conn`; the pass that follows grants
    /// what now fits.
    fn on_release(
        &mut self,
        conn: ConnId,
        tag: u64,
        id: ReservationId,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> bool {
        if self.held(conn, tag, id, fx).is_none() {
            return false;
        }
        let r = self.take_reservation(id).expect("checked above");
        self.counters.releases += 1;
        self.clean = false;
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::Released { tag, id },
        });
        // The ghost (if any) must exist before the pass that follows; the
        // release is logged once its answer is on its way, and before the
        // grants it made room for.
        let released = self.released(r, now);
        fx.push(Effect::Released {
            conn,
            released,
            disconnected: false,
        });
        fx.push(Effect::RefreshReadings);
        true
    }

    /// Removes a reservation and its index entries.
    fn take_reservation(&mut self, id: ReservationId) -> Option<Reservation> {
        let r = self.reservations.remove(&id)?;
        if let Some(set) = self.held_by.get_mut(&r.conn) {
            set.remove(&id);
            if set.is_empty() {
                self.held_by.remove(&r.conn);
            }
        }
        if let Some(held) = self.held_by_uid.get_mut(&r.peer.uid) {
            *held = held.saturating_sub(r.bytes);
            if *held == 0 {
                self.held_by_uid.remove(&r.peer.uid);
            }
        }
        if let Some(count) = self.held_count_by_uid.get_mut(&r.peer.uid) {
            *count -= 1;
            if *count == 0 {
                self.held_count_by_uid.remove(&r.peer.uid);
            }
        }
        let device = &mut self.devices[r.device];
        device.reserved_bytes = device.reserved_bytes.saturating_sub(r.bytes);
        device.reservations.remove(&id);
        self.idle_unasked.remove(&id);
        Some(r)
    }

    /// Adds a reservation and its index entries.
    fn put_reservation(&mut self, r: Reservation) {
        self.held_by.entry(r.conn).or_default().insert(r.id);
        let held = self.held_by_uid.entry(r.peer.uid).or_default();
        *held = held.saturating_add(r.bytes);
        *self.held_count_by_uid.entry(r.peer.uid).or_default() += 1;
        let device = &mut self.devices[r.device];
        device.reserved_bytes = device.reserved_bytes.saturating_add(r.bytes);
        device.reservations.insert(r.id);
        if r.idle_unasked() {
            self.idle_unasked.insert(r.id);
        }
        self.reservations.insert(r.id, r);
    }

    /// Changes a reservation's idle or evicting state, keeping the index of
    /// possible victims in step.
    fn update_idle(&mut self, id: ReservationId, change: impl FnOnce(&mut Reservation)) {
        if let Some(r) = self.reservations.get_mut(&id) {
            change(r);
            if r.idle_unasked() {
                self.idle_unasked.insert(id);
            } else {
                self.idle_unasked.remove(&id);
            }
        }
    }

    /// Removes a waiter; a waiter that was told its position leaves a gap.
    fn take_waiter(&mut self, key: &OrderKey) -> Option<Waiter> {
        let w = self.queue.remove(key)?;
        if w.adopts() {
            self.adopting -= 1;
        }
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

    /// Withdraws `conn`'s waiting requests with `tag` and answers how many
    /// there were.
    fn on_cancel(&mut self, conn: ConnId, tag: u64, fx: &mut Vec<Effect>) -> bool {
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
        if count > 0 {
            fx.push(Effect::Log(LogEvent::Cancelled { conn, tag, count }));
        }
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::Cancelled { tag, count },
        });
        // A cancelled starved waiter may have kept room for itself.
        self.clean &= count == 0;
        count > 0
    }

    /// Drops everything `conn` held or waited for.
    fn on_disconnect(&mut self, conn: ConnId, now: Instant, fx: &mut Vec<Effect>) -> bool {
        self.forget_reclaim(conn);
        self.reported.forget(conn);
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
        let mut released = 0;
        for id in ids {
            if let Some(r) = self.take_reservation(id) {
                let released_one = self.released(r, now);
                fx.push(Effect::Released {
                    conn,
                    released: released_one,
                    disconnected: true,
                });
                released += 1;
            }
        }
        self.counters.releases += released;
        self.counters.disconnect_releases += released;
        if released > 0 {
            fx.push(Effect::RefreshReadings);
        }
        let changed = cancelled > 0 || released > 0;
        self.clean &= !changed;
        changed
    }

    /// A reading of device `index` taken at `taken_at` (or its failure).
    /// A success marks the device healthy; released reservations stop
    /// counting once a reading taken after their release arrives. A failure
    /// marks it unhealthy: no new grants on it until the next successful
    /// reading; its reservations stay.
    fn on_reading(
        &mut self,
        index: usize,
        taken_at: Instant,
        result: Result<Reading, String>,
        fx: &mut Vec<Effect>,
    ) -> bool {
        let Some(d) = self.devices.get_mut(index) else {
            return false;
        };
        let was_healthy = d.fault.is_none();
        match result {
            Ok(reading) => {
                d.source = ReadingSource::Measured(reading);
                d.fault = None;
                if !was_healthy {
                    fx.push(Effect::Log(LogEvent::DeviceRecovered {
                        device: d.spec.index,
                    }));
                }
                self.ghosts
                    .retain(|g| !(g.device == index && g.released_at < taken_at));
            }
            Err(fault) => {
                if was_healthy {
                    fx.push(Effect::Log(LogEvent::DeviceUnhealthy {
                        device: d.spec.index,
                        fault: fault.clone(),
                    }));
                }
                d.fault = Some(fault);
            }
        }
        self.clean = false;
        true
    }

    /// Adds processes whose usage counts against reservation `id` held by
    /// `conn`, and answers with every pid it now speaks for.
    fn on_attach_pids(
        &mut self,
        conn: ConnId,
        tag: u64,
        id: ReservationId,
        pids: &[u32],
        fx: &mut Vec<Effect>,
    ) -> bool {
        let Some(r) = self.held(conn, tag, id, fx) else {
            return false;
        };
        for &pid in pids {
            if pid != 0 && !r.pids.contains(&pid) {
                r.pids.push(pid);
            }
        }
        let all = r.pids.clone();
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::Attached {
                tag,
                id,
                pids: all.clone(),
            },
        });
        fx.push(Effect::Log(LogEvent::PidsAttached {
            conn,
            id,
            pids: all,
        }));
        self.clean = false;
        true
    }

    /// Changes the size of reservation `id` held by `conn` (see
    /// [`ClientMessage::Resize`]): a shrink always, a growth only into room
    /// there is now; answers `Resized` or an error.
    #[allow(clippy::too_many_arguments)]
    fn on_resize(
        &mut self,
        conn: ConnId,
        peer: Peer,
        tag: u64,
        id: ReservationId,
        bytes: u64,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> bool {
        let Some(r) = self.held(conn, tag, id, fx) else {
            return false;
        };
        let (d, old) = (r.device, r.bytes);
        let refuse = |fx: &mut Vec<Effect>, kind: ErrorKind, message: String| {
            fx.push(Effect::Reply {
                conn,
                msg: error(tag, kind, message),
            });
            false
        };
        if bytes == 0 {
            return refuse(
                fx,
                ErrorKind::Refused,
                "a reservation must be of at least 1 byte".into(),
            );
        }
        let capacity = self.capacity(d);
        if bytes > capacity {
            return refuse(
                fx,
                ErrorKind::Refused,
                format!(
                    "{} can never fit on device {}: it offers {} (total less the cushion)",
                    format_size(bytes),
                    self.devices[d].spec.index,
                    format_size(capacity)
                ),
            );
        }
        if bytes > old {
            if let (false, Some(limit)) = (peer.admin, self.config.max_bytes_per_uid) {
                let held = self
                    .held_by_uid
                    .get(&peer.uid)
                    .copied()
                    .unwrap_or(0)
                    .saturating_add(self.queue.usage_of(peer.uid).1);
                if held.saturating_add(bytes - old) > limit {
                    return refuse(
                        fx,
                        ErrorKind::LimitExceeded,
                        format!(
                            "user {} holds or waits for {}; {} more would pass the per-user limit of {}",
                            peer.uid,
                            format_size(held),
                            format_size(bytes - old),
                            format_size(limit)
                        ),
                    );
                }
            }
            if let Some(fault) = &self.devices[d].fault {
                let message = format!(
                    "device {} is unhealthy ({fault}): no growth until its readings recover",
                    self.devices[d].spec.index
                );
                return refuse(fx, ErrorKind::Unavailable, message);
            }
            let before = self.committed(d);
            self.set_bytes(id, bytes);
            let after = self.committed(d);
            let starved = self.queue.first_starved_for(d).is_some_and(|s| now >= s);
            let over = self.reserved(d) > capacity;
            if (after > before || over) && (after > capacity || over || starved) {
                self.set_bytes(id, old);
                let why = if after > capacity || over {
                    format!(
                        "it needs {} more and the device has {} now",
                        format_size(if over { bytes - old } else { after - before }),
                        format_size(capacity.saturating_sub(before))
                    )
                } else {
                    "a request that has waited past the starvation guard keeps the device's room"
                        .to_string()
                };
                return refuse(
                    fx,
                    ErrorKind::Timeout,
                    format!(
                        "reservation {id} cannot grow from {} to {} on device {}: {why}; it keeps its size",
                        format_size(old),
                        format_size(bytes),
                        self.devices[d].spec.index
                    ),
                );
            }
        } else {
            self.set_bytes(id, bytes);
        }
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::Resized { tag, id, bytes },
        });
        fx.push(Effect::Log(LogEvent::Resized {
            conn,
            id,
            from_bytes: old,
            to_bytes: bytes,
        }));
        // A shrink may make room for a waiter.
        let shrunk = bytes < old;
        self.clean &= !shrunk;
        shrunk
    }

    /// What the accounting counts as taken on device `d`.
    fn committed(&self, d: usize) -> u64 {
        match self.devices[d].source {
            ReadingSource::Simulated => self.reserved(d),
            ReadingSource::Measured(_) => self.account(d).committed,
        }
    }

    /// Sets a held reservation's bytes, keeping the sums per device and
    /// per user in step.
    fn set_bytes(&mut self, id: ReservationId, bytes: u64) {
        let Some(r) = self.reservations.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut r.bytes, bytes);
        let (d, uid) = (r.device, r.peer.uid);
        let device = &mut self.devices[d];
        device.reserved_bytes = device
            .reserved_bytes
            .saturating_sub(old)
            .saturating_add(bytes);
        let held = self.held_by_uid.entry(uid).or_default();
        *held = held.saturating_sub(old).saturating_add(bytes);
    }

    /// Records that reservation `id` held by `conn` runs under a hard limit
    /// (see [`ClientMessage::SetEnforced`]) and answers `EnforcedSet`.
    fn on_set_enforced(
        &mut self,
        conn: ConnId,
        tag: u64,
        id: ReservationId,
        limit_bytes: u64,
        mechanism: String,
        fx: &mut Vec<Effect>,
    ) -> bool {
        let bad = if limit_bytes == 0 {
            Some("limit_bytes must be at least 1")
        } else if mechanism.is_empty() || mechanism.len() > 64 {
            Some("mechanism must be 1 to 64 bytes (e.g. \"mps\")")
        } else {
            None
        };
        if let Some(why) = bad {
            fx.push(Effect::Reply {
                conn,
                msg: error(tag, ErrorKind::BadRequest, format!("set_enforced: {why}")),
            });
            return false;
        }
        let Some(r) = self.held(conn, tag, id, fx) else {
            return false;
        };
        r.enforced = Some((limit_bytes, mechanism.clone()));
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::EnforcedSet {
                tag,
                id,
                limit_bytes,
            },
        });
        fx.push(Effect::Log(LogEvent::Enforced {
            conn,
            id,
            limit_bytes,
            mechanism,
        }));
        false
    }

    /// Indices of the devices a selector names, or why there are none.
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
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// An error answer.
fn error(tag: u64, kind: ErrorKind, message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error {
        tag,
        kind,
        message: message.into(),
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
