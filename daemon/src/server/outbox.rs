//! A connection's outbound messages: what the core has decided to tell a
//! client and its connection task has not written yet.
//!
//! The core never blocks on a client, so it only ever appends here; the
//! connection task takes batches when its socket can take them. Two rules
//! keep a client that does not read from costing the daemon memory:
//!
//! - **Queue positions coalesce**: a `queued` message still unsent for a
//!   request is updated in place, so at most one per waiting request is ever
//!   pending, however often the queue moves.
//! - **A cap on unsent bytes** (estimated in memory, `--max-unsent-bytes`):
//!   past it the outbox drops what it holds and is *overflowed*; the core
//!   then releases everything the connection held, as for any disconnect,
//!   and the connection task closes the socket after a best-effort
//!   `limit_exceeded` error.
//!
//! When the core forgets the connection (it closed, or the daemon stops) the
//! outbox is *finished*: the connection task may still write what is left.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;
use vramd_protocol::{ReservationId, ServerMessage};

/// Where an outbox stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxState {
    /// The core may append.
    Open,
    /// The core forgot the connection; what is left may still be written.
    Finished,
    /// The client left more than the cap unread; everything was dropped.
    Overflowed,
}

/// What [`Outbox::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Messages were moved into the batch.
    Some,
    /// Nothing to write now; more may come.
    Empty,
    /// Nothing left, and nothing more will come.
    Finished,
    /// The connection is to be closed for not reading.
    Overflowed,
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<(ServerMessage, usize)>,
    /// Sequence number of `queue[0]`.
    head: u64,
    /// For each request with an unsent `queued`, that message's sequence
    /// number.
    positions: HashMap<ReservationId, u64>,
    /// Estimated memory of `queue`.
    bytes: usize,
    state: OutboxState,
}

/// One connection's outbound messages (shared by the core and the
/// connection task).
#[derive(Debug)]
pub(crate) struct Outbox {
    inner: Mutex<Inner>,
    cap_bytes: usize,
    /// Woken on every append and state change (one waiter: the connection
    /// task's main loop).
    ready: Notify,
    /// Woken (all waiters) when the outbox overflows.
    overflow: Notify,
}

impl Outbox {
    /// An open, empty outbox that overflows past `cap_bytes`.
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                head: 0,
                positions: HashMap::new(),
                bytes: 0,
                state: OutboxState::Open,
            }),
            cap_bytes,
            ready: Notify::new(),
            overflow: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `msg` (or updates the unsent position of its request).
    /// Returns `false` exactly once: when this message made the outbox
    /// overflow, and the caller must close the connection.
    pub fn push(&self, msg: ServerMessage) -> bool {
        let mut inner = self.lock();
        if inner.state != OutboxState::Open {
            return true;
        }
        if let ServerMessage::Queued { id, position, .. } = &msg {
            if let Some(&seq) = inner.positions.get(id) {
                let index = (seq - inner.head) as usize;
                if let Some((ServerMessage::Queued { position: p, .. }, _)) =
                    inner.queue.get_mut(index)
                {
                    *p = *position;
                    return true;
                }
            }
        }
        let size = estimate(&msg);
        if inner.bytes + size > self.cap_bytes {
            inner.state = OutboxState::Overflowed;
            inner.queue = VecDeque::new();
            inner.positions = HashMap::new();
            inner.bytes = 0;
            drop(inner);
            self.overflow.notify_waiters();
            self.ready.notify_one();
            return false;
        }
        if let ServerMessage::Queued { id, .. } = &msg {
            let seq = inner.head + inner.queue.len() as u64;
            inner.positions.insert(*id, seq);
        }
        inner.bytes += size;
        inner.queue.push_back((msg, size));
        drop(inner);
        self.ready.notify_one();
        true
    }

    /// Marks the outbox finished: the core appends nothing more.
    pub fn finish(&self) {
        let mut inner = self.lock();
        if inner.state == OutboxState::Open {
            inner.state = OutboxState::Finished;
        }
        drop(inner);
        self.ready.notify_one();
    }

    /// Moves messages into `batch` (through `encode`) until about
    /// `max_bytes` of it are filled.
    pub fn take(&self, max_bytes: usize, mut encode: impl FnMut(&ServerMessage) -> usize) -> Taken {
        let mut inner = self.lock();
        if inner.state == OutboxState::Overflowed {
            return Taken::Overflowed;
        }
        let mut filled = 0;
        let mut any = false;
        while filled < max_bytes {
            let Some((msg, size)) = inner.queue.pop_front() else {
                break;
            };
            let seq = inner.head;
            inner.head += 1;
            inner.bytes -= size;
            if let ServerMessage::Queued { id, .. } = &msg {
                if inner.positions.get(id) == Some(&seq) {
                    inner.positions.remove(id);
                }
            }
            filled += encode(&msg);
            any = true;
        }
        if inner.queue.is_empty() && inner.queue.capacity() > 64 {
            // A burst is over: give its memory back.
            inner.queue = VecDeque::new();
            inner.positions = HashMap::new();
        }
        match (any, inner.state) {
            (true, _) => Taken::Some,
            (false, OutboxState::Finished) => Taken::Finished,
            (false, _) => Taken::Empty,
        }
    }

    /// Completes when something was appended or the state changed since
    /// the last call (a wake-up may be spurious: call [`Outbox::take`]).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Completes when the outbox overflows.
    pub async fn overflowed(&self) {
        loop {
            let notified = self.overflow.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().state == OutboxState::Overflowed {
                return;
            }
            notified.await;
        }
    }

    /// Estimated bytes pending.
    #[cfg(test)]
    pub fn pending_bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Memory a queued message takes, roughly: its slot plus what it owns.
fn estimate(msg: &ServerMessage) -> usize {
    let owned = match msg {
        ServerMessage::Welcome { daemon, .. } => daemon.len(),
        ServerMessage::Granted { grant, .. } => grant.device_uuid.len(),
        ServerMessage::Error { message, .. } => message.len(),
        ServerMessage::Attached { pids, .. } => pids.len() * 4,
        ServerMessage::Evict { reason, .. } => reason.len(),
        ServerMessage::Status { status, .. } => {
            let s = &**status;
            let label = |l: &Option<String>| l.as_ref().map_or(0, String::len);
            std::mem::size_of_val(s)
                + s.devices.len() * (std::mem::size_of::<vramd_protocol::DeviceStatus>() + 96)
                + s.reservations
                    .iter()
                    .map(|r| std::mem::size_of_val(r) + label(&r.label) + r.pids.len() * 4)
                    .sum::<usize>()
                + s.queue
                    .iter()
                    .map(|q| std::mem::size_of_val(q) + label(&q.label))
                    .sum::<usize>()
                + s.consumers
                    .iter()
                    .map(|c| {
                        std::mem::size_of_val(c)
                            + c.name.len()
                            + c.kind.len()
                            + label(&c.last_error)
                            + c.models
                                .iter()
                                .map(|m| std::mem::size_of_val(m) + m.len())
                                .sum::<usize>()
                    })
                    .sum::<usize>()
                + s.consumer_errors
                    .iter()
                    .map(|e| std::mem::size_of_val(e) + e.name.len() + e.message.len())
                    .sum::<usize>()
        }
        _ => 0,
    };
    std::mem::size_of::<ServerMessage>() + owned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(id: u64, position: u32) -> ServerMessage {
        ServerMessage::Queued {
            tag: id,
            id: ReservationId(id),
            position,
        }
    }

    fn drain(o: &Outbox) -> (Taken, Vec<ServerMessage>) {
        let mut got = Vec::new();
        let t = o.take(usize::MAX, |m| {
            got.push(m.clone());
            1
        });
        (t, got)
    }

    #[test]
    fn unsent_positions_coalesce_to_the_newest_in_place() {
        let o = Outbox::new(1 << 20);
        for round in 0..1000u32 {
            assert!(o.push(queued(1, 1000 - round)));
            assert!(o.push(queued(2, 2000 - round)));
        }
        o.push(ServerMessage::Pong { tag: 7 });
        o.push(queued(1, 1));
        let (t, got) = drain(&o);
        assert_eq!(t, Taken::Some);
        assert_eq!(
            got,
            vec![
                queued(1, 1),
                queued(2, 1001),
                ServerMessage::Pong { tag: 7 }
            ]
        );
        // Once sent, a new position is a new message.
        o.push(queued(1, 5));
        assert_eq!(drain(&o).1, vec![queued(1, 5)]);
        assert_eq!(o.pending_bytes(), 0);
    }

    #[test]
    fn past_the_cap_it_overflows_once_and_drops_everything() {
        let o = Outbox::new(10 * std::mem::size_of::<ServerMessage>());
        let mut results = Vec::new();
        for tag in 0..20 {
            results.push(o.push(ServerMessage::Pong { tag }));
        }
        assert_eq!(results.iter().filter(|ok| !**ok).count(), 1);
        assert_eq!(results.iter().position(|ok| !ok), Some(10));
        assert_eq!(drain(&o).0, Taken::Overflowed);
        assert_eq!(o.pending_bytes(), 0);
        o.finish();
        assert_eq!(drain(&o).0, Taken::Overflowed);
    }

    #[test]
    fn a_finished_outbox_still_gives_what_is_left() {
        let o = Outbox::new(1 << 20);
        o.push(ServerMessage::Pong { tag: 1 });
        o.finish();
        o.push(ServerMessage::Pong { tag: 2 });
        let (t, got) = drain(&o);
        assert_eq!(
            (t, got),
            (Taken::Some, vec![ServerMessage::Pong { tag: 1 }])
        );
        assert_eq!(drain(&o).0, Taken::Finished);
    }
}
