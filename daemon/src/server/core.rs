//! The core loop: the only owner of the [`Ledger`].
//!
//! Every decision goes through the ledger in one place, in order, with no
//! lock: the core receives events over a bounded channel (so a flooding
//! client is slowed at its own socket), turns each into an [`Input`], applies
//! it, and carries out the [`Effect`]s — sends messages to connections, asks
//! the poller for a fresh reading, writes log
//! lines. It never awaits anything but its inbox and its next timer, and
//! never blocks on a client: replies go to each connection's [`Outbox`],
//! drained by the connection's own task. An outbox that passes its cap
//! (a client that does not read) makes the core close that connection:
//! everything it held or waited for is released as for any disconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vramd_ledger::{ConnId, Effect, Input, Ledger, LogEvent, Peer, Released};
use vramd_protocol::{ClientMessage, ServerMessage, format_size};

use super::outbox::Outbox;
use crate::gpu::{Poller, Readings};
use crate::state::{SAVE_INTERVAL, StateFile};

/// Most bytes of a status report: a frame less the message's variant and
/// tag.
const STATUS_MAX_BYTES: usize = vramd_protocol::MAX_FRAME_BYTES - 16;

/// What connection tasks and the poller tell the core.
#[derive(Debug)]
pub(crate) enum Event {
    /// A client completed its handshake.
    Open {
        conn: ConnId,
        peer: Peer,
        outbox: Arc<Outbox>,
    },
    /// A client sent a request.
    Request { conn: ConnId, msg: ClientMessage },
    /// A client's connection closed.
    Close { conn: ConnId },
    /// The poller read the devices.
    Readings(Readings),
    /// The config file was read again (SIGHUP): the eviction timing.
    Reload {
        eviction_deadline: std::time::Duration,
        min_residency: std::time::Duration,
    },
}

/// A connection as the core sees it.
struct ConnHandle {
    peer: Peer,
    outbox: Arc<Outbox>,
}

impl Drop for ConnHandle {
    /// The core forgot the connection: its task writes what is left and ends.
    fn drop(&mut self) {
        self.outbox.finish();
    }
}

/// The ledger and everything its effects reach.
pub(crate) struct Core {
    ledger: Ledger,
    conns: HashMap<ConnId, ConnHandle>,
    poller: Option<Poller>,
    /// Connections whose outbox overflowed during the current input; closed
    /// once its effects are carried out.
    overflowed: Vec<ConnId>,
    /// The MPS server status reports, checked when a status is sent.
    mps: Option<crate::mps::MpsWatch>,
    /// Where reservations are saved for a restart, and what is unsaved.
    state: Option<Saver>,
}

/// Saves the ledger's snapshot after changes, at most once per
/// [`SAVE_INTERVAL`] (see [`crate::state`]).
struct Saver {
    file: StateFile,
    /// Grants or releases happened since the last save.
    dirty: bool,
    last: Option<Instant>,
    /// The last save failed (logged once until one succeeds).
    failing: bool,
}

impl Core {
    /// A core over `ledger`; `poller` (for a measuring backend) receives
    /// refresh asks.
    pub fn new(ledger: Ledger, poller: Option<Poller>) -> Self {
        Self {
            ledger,
            conns: HashMap::new(),
            poller,
            overflowed: Vec::new(),
            mps: None,
            state: None,
        }
    }

    /// Saves reservations to `file` as they change, and when the core stops.
    pub fn with_state(mut self, file: Option<StateFile>) -> Self {
        self.state = file.map(|file| Saver {
            file,
            dirty: false,
            last: None,
            failing: false,
        });
        self
    }

    /// When the next save is due, if something is unsaved.
    fn save_due(&self) -> Option<Instant> {
        let s = self.state.as_ref().filter(|s| s.dirty)?;
        Some(s.last.map_or_else(Instant::now, |t| t + SAVE_INTERVAL))
    }

    /// Saves the ledger's reservations now.
    fn save(&mut self) {
        let Some(s) = &mut self.state else { return };
        let now = Instant::now();
        let snapshot = self.ledger.snapshot(now);
        let count = snapshot.reservations.len();
        match s.file.save(snapshot) {
            Ok(()) => {
                if s.failing {
                    info!(path = %s.file.path().display(), "state file saved again");
                }
                debug!(path = %s.file.path().display(), reservations = count, "state saved");
                s.failing = false;
            }
            Err(e) => {
                if !s.failing {
                    warn!(path = %s.file.path().display(), error = %e,
                        "cannot save the state file: a restart now would lose reservations");
                }
                s.failing = true;
            }
        }
        s.dirty = false;
        s.last = Some(now);
    }

    /// Something a restart must keep changed.
    fn mark_dirty(&mut self) {
        if let Some(s) = &mut self.state {
            s.dirty = true;
        }
    }

    /// Reports `mps` in every status.
    pub fn with_mps(mut self, mps: Option<crate::mps::MpsWatch>) -> Self {
        self.mps = mps;
        self
    }

    /// Applies one input and carries out its effects; then closes the
    /// connections that stopped reading (which may free room for others).
    fn apply(&mut self, input: Input) {
        let effects = self.ledger.apply(input, Instant::now());
        for effect in effects {
            self.carry_out(effect);
        }
        while let Some(conn) = self.overflowed.pop() {
            let Some(pid) = self.conns.get(&conn).map(|h| h.peer.pid) else {
                continue;
            };
            warn!(conn = %conn, pid, "closing a connection that does not read its replies (over --max-unsent-bytes); releasing what it held");
            let effects = self
                .ledger
                .apply(Input::Disconnect { conn }, Instant::now());
            for effect in effects {
                self.carry_out(effect);
            }
            self.conns.remove(&conn);
        }
    }

    /// Applies a reading of every device.
    pub fn readings(&mut self, readings: Readings) {
        let taken_at = readings.taken_at;
        for (device, result) in readings.results.into_iter().enumerate() {
            self.apply(Input::Reading {
                device,
                taken_at,
                result,
            });
        }
    }

    /// Serves events until every sender is gone or `stop` fires; then
    /// saves the reservations one last time (so that a restart finds every
    /// one of them, whatever the connections do as the process ends).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        loop {
            let wake = self.ledger.next_wakeup(Instant::now());
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let save_due = self.save_due();
            let save = async {
                match save_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = save => self.save(),
                ev = events.recv() => match ev {
                    None => break,
                    Some(ev) => self.event(ev),
                },
                _ = sleep => self.apply(Input::Tick),
            }
        }
        if self.state.is_some() {
            self.save();
            if let Some(s) = &self.state {
                info!(path = %s.file.path().display(), reservations = self.ledger.reservation_count(),
                    "reservations saved for the next start");
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Open { conn, peer, outbox } => {
                self.conns.insert(conn, ConnHandle { peer, outbox });
            }
            Event::Request { conn, msg } => {
                let Some(peer) = self.conns.get(&conn).map(|h| h.peer) else {
                    return;
                };
                if let ClientMessage::Reserve(req) = &msg {
                    debug!(conn = %conn, pid = peer.pid, tag = req.tag, bytes = req.bytes, device = %req.device,
                        priority = req.priority, label = req.label.as_deref().unwrap_or(""), "reserve");
                }
                self.apply(Input::Request { conn, peer, msg });
            }
            Event::Close { conn } => {
                // Removed after the effects: their log lines name its pid.
                self.apply(Input::Disconnect { conn });
                self.conns.remove(&conn);
            }
            Event::Readings(readings) => self.readings(readings),
            Event::Reload {
                eviction_deadline,
                min_residency,
            } => {
                self.ledger
                    .set_eviction_timing(eviction_deadline, min_residency);
                info!(
                    eviction_deadline_ms = eviction_deadline.as_millis() as u64,
                    min_residency_ms = min_residency.as_millis() as u64,
                    "config reloaded"
                );
                // Eligibility may have changed: let the ledger look again.
                self.apply(Input::Tick);
            }
        }
    }

    fn pid(&self, conn: ConnId) -> u32 {
        self.conns.get(&conn).map_or(0, |h| h.peer.pid)
    }

    fn send(&mut self, conn: ConnId, msg: ServerMessage) {
        if let Some(h) = self.conns.get(&conn) {
            if !h.outbox.push(msg) {
                self.overflowed.push(conn);
            }
        }
    }

    /// Carries out one effect. Messages are queued to their connection
    /// before the log line about them is written: formatting and writing
    /// the line is not part of the client's wait.
    fn carry_out(&mut self, effect: Effect) {
        match effect {
            Effect::Reply { conn, mut msg } => {
                if matches!(
                    msg,
                    ServerMessage::Attached { .. } | ServerMessage::IdleSet { .. }
                ) {
                    self.mark_dirty();
                }
                if let ServerMessage::Status { status, .. } = &mut msg {
                    // A stat of the control pipe, outside the pure ledger.
                    status.mps = self.mps.as_ref().map(|m| m.status());
                    // Never too large to send: lists are cut to fit a frame
                    // (in both encodings); the totals still count all.
                    if status.fit(STATUS_MAX_BYTES) {
                        debug!(conn = %conn, reservations = status.reservations.len(),
                            queue = status.queue.len(), "status lists cut to fit one frame");
                    }
                }
                self.send(conn, msg)
            }
            Effect::Granted {
                conn,
                tag,
                grant,
                label,
                waited,
            } => {
                let (id, device, bytes) = (grant.id, grant.device, grant.bytes);
                self.mark_dirty();
                self.send(conn, ServerMessage::Granted { tag, grant });
                info!(id = %id, conn = %conn, pid = self.pid(conn), device, bytes, size = %format_size(bytes),
                    label = label.as_deref().unwrap_or(""), waited_ms = waited.as_millis() as u64, "granted");
            }
            Effect::Queued {
                conn,
                tag,
                id,
                position,
            } => {
                self.send(conn, ServerMessage::Queued { tag, id, position });
                debug!(id = %id, conn = %conn, position, "queued");
            }
            Effect::Evict {
                conn,
                id,
                deadline,
                reason,
            } => {
                let deadline_ms = deadline.as_millis() as u64;
                info!(id = %id, conn = %conn, pid = self.pid(conn), deadline_ms, reason = %reason,
                    "asking holder to unload (evict)");
                self.send(
                    conn,
                    ServerMessage::Evict {
                        id,
                        deadline_ms,
                        reason,
                    },
                );
            }
            Effect::EvictionFailed { victim, reason } => {
                warn!(victim = %victim, reason = %reason, "eviction failed; trying other candidates");
            }
            Effect::Failed {
                conn,
                tag,
                kind,
                message,
            } => {
                let pid = self.pid(conn);
                if kind == vramd_protocol::ErrorKind::Timeout {
                    info!(conn = %conn, pid, tag, reason = %message, "timed out");
                } else {
                    info!(conn = %conn, pid, tag, kind = %kind, reason = %message, "refused");
                }
                self.send(conn, ServerMessage::Error { tag, kind, message });
            }
            Effect::Released {
                conn,
                released,
                disconnected,
            } => {
                self.mark_dirty();
                log_released(conn, self.pid(conn), &released, disconnected)
            }
            Effect::RefreshReadings => {
                if let Some(p) = &self.poller {
                    p.refresh();
                }
            }
            Effect::Log(event) => self.log(event),
        }
    }

    fn log(&self, event: LogEvent) {
        match event {
            LogEvent::Cancelled { conn, tag, count } => {
                info!(conn = %conn, pid = self.pid(conn), tag, count, "cancelled");
            }
            LogEvent::Enforced {
                conn,
                id,
                limit_bytes,
                mechanism,
            } => {
                info!(id = %id, conn = %conn, pid = self.pid(conn), limit_bytes, mechanism, "enforced");
            }
            LogEvent::PidsAttached { conn, id, pids } => {
                info!(id = %id, conn = %conn, pid = self.pid(conn), pids = ?pids, "pids attached");
            }
            LogEvent::Resized {
                conn,
                id,
                from_bytes,
                to_bytes,
            } => {
                info!(id = %id, conn = %conn, pid = self.pid(conn), from_bytes, to_bytes, "resized");
            }
            LogEvent::IdleSet { conn, id, idle } => {
                debug!(id = %id, conn = %conn, idle, "idle state set");
            }
            LogEvent::DeviceUnhealthy { device, fault } => {
                warn!(device, error = %fault, "device unhealthy: no new grants on it until readings recover");
            }
            LogEvent::DeviceRecovered { device } => info!(device, "device readings recovered"),
            LogEvent::ConsumersReported { conn, count } => {
                debug!(conn = %conn, pid = self.pid(conn), count, "consumers reported");
            }
            LogEvent::Reclaimed { conn, id, bytes } => {
                info!(id = %id, conn = %conn, pid = self.pid(conn), bytes, size = %format_size(bytes),
                    held_for_reclaim = self.ledger.held_for_reclaim(), "reclaimed after restart");
            }
            LogEvent::ReclaimRefused { conn, id, uid } => {
                warn!(id = %id, conn = %conn, pid = self.pid(conn), uid,
                    "reclaim refused: wrong token or another user");
            }
            LogEvent::Unreclaimed {
                id,
                pid,
                uid,
                bytes,
                measured,
            } => {
                warn!(id = %id, pid, uid, bytes, size = %format_size(bytes), measured,
                    "not reclaimed within the grace period after the restart: dropped{}",
                    if measured { " (its processes' usage still counts through the readings)" } else { "" });
            }
        }
    }
}

fn log_released(conn: ConnId, pid: u32, r: &Released, disconnected: bool) {
    let (id, device, bytes, evicted) = (r.id, r.device, r.bytes, r.evicted);
    let size = format_size(bytes);
    let label = r.label.as_deref().unwrap_or("");
    let held_ms = r.held.as_millis() as u64;
    if disconnected {
        info!(id = %id, conn = %conn, pid, device, bytes, size = %size, label, held_ms, evicted,
            "released (connection closed)");
    } else {
        info!(id = %id, conn = %conn, pid, device, bytes, size = %size, label, held_ms, evicted, "released");
    }
}
