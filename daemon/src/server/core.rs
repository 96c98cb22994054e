//! The core loop: the only owner of the [`Ledger`].
//!
//! Every decision goes through the ledger in one place, in order, with no
//! lock: the core receives events over a bounded channel (so a flooding
//! client is slowed at its own socket), turns each into an [`Input`], applies
//! it, and carries out the [`Effect`]s — sends messages to connections, asks
//! consumers to unload, asks the poller for a fresh reading, writes log
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
use crate::consumers::ConsumerHandle;
use crate::gpu::{Poller, Readings};

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
    consumers: HashMap<String, ConsumerHandle>,
    poller: Option<Poller>,
    /// Connections whose outbox overflowed during the current input; closed
    /// once its effects are carried out.
    overflowed: Vec<ConnId>,
    /// The MPS server status reports, checked when a status is sent.
    mps: Option<crate::mps::MpsWatch>,
}

impl Core {
    /// A core over `ledger`; `consumers` receive unload asks, `poller` (for
    /// a measuring backend) refresh asks.
    pub fn new(
        ledger: Ledger,
        consumers: HashMap<String, ConsumerHandle>,
        poller: Option<Poller>,
    ) -> Self {
        Self {
            ledger,
            conns: HashMap::new(),
            consumers,
            poller,
            overflowed: Vec::new(),
            mps: None,
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

    /// Serves events until every sender is gone.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut consumer_events: mpsc::Receiver<Input>,
    ) {
        let mut consumers_open = true;
        loop {
            let wake = self.ledger.next_wakeup(Instant::now());
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    None => return,
                    Some(ev) => self.event(ev),
                },
                _ = sleep => self.apply(Input::Tick),
                // Consumer tasks report as ledger inputs.
                input = consumer_events.recv(), if consumers_open => match input {
                    None => consumers_open = false,
                    Some(input) => self.apply(input),
                },
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
            Effect::EvictConsumer { name, reason } => match self.consumers.get(&name) {
                Some(h) => h.unload(reason),
                None => warn!(consumer = %name, "eviction of an unknown consumer"),
            },
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
            } => log_released(conn, self.pid(conn), &released, disconnected),
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
            LogEvent::ConsumerUnloadReturned { name } => {
                debug!(consumer = %name, "unload call returned");
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
