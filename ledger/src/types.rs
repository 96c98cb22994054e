//! The ledger's vocabulary: who asks, what devices and readings look like,
//! the policy knobs, and the [`Input`]s and [`Effect`]s of
//! [`Ledger::apply`](crate::Ledger::apply).

use std::time::{Duration, Instant};

use vramd_protocol::{ClientMessage, ErrorKind, Grant, ReservationId, ServerMessage};

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
    /// Real user id of the process (filled in by the daemon from /proc); 0
    /// if unknown. Used only to show it in status, and to hide its pid from
    /// other users.
    pub uid: u32,
}

impl ProcessUsage {
    /// A process with no known ancestors and an unknown (0) uid.
    pub fn new(pid: u32, bytes: u64) -> Self {
        Self {
            pid,
            bytes,
            ancestors: Vec::new(),
            uid: 0,
        }
    }
}

/// Where readings of a device come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadingSource {
    /// Derived from the reservations themselves (`--simulate`).
    Simulated,
    /// Set by [`Input::Reading`] from a real backend.
    Measured(Reading),
}

/// Policy knobs of the ledger. [`LedgerConfig::default`] is the one place
/// where their defaults are defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Memory kept free on every device.
    pub cushion_bytes: u64,
    /// Waiting this long raises a request's effective priority by one.
    pub aging: Duration,
    /// After waiting this long, a request stops smaller ones from being
    /// granted ahead of it on its devices.
    pub starvation_guard: Duration,
    /// `None`: waiters are ordered by effective priority (priority + aging).
    /// `Some(window)`: by strict priority (then arrival) while they have
    /// waited less than `window`, and past it by arrival, ahead of every
    /// younger waiter (see `queue`). Aging then only lifts a waiter's
    /// priority for choosing eviction victims.
    pub priority_window: Option<Duration>,
    /// `Some(g)` (the default, [`AdaptiveGuard::DEFAULT`]): each request's
    /// guard, fixed when it arrives, is `g.factor` × the mean wait of the
    /// last [`AdaptiveGuard::GRANTS`] grants, at least `starvation_guard`
    /// and at most `g.cap`: on a busy card, where everyone waits, a large
    /// request stops others from going ahead of it only once it has waited
    /// well past what others wait; on a quiet card it is `starvation_guard`.
    /// `None`: every request is starved (its devices keep their room for
    /// it) once it has waited `starvation_guard` (the policy before the
    /// scheduling sweep, docs/benchmarks.md).
    pub adaptive_guard: Option<AdaptiveGuard>,
    /// How a request for any device is placed.
    pub placement: Placement,
    /// How long an evicted holder has to free its memory before
    /// the daemon reports it and tries another victim.
    pub eviction_deadline: Duration,
    /// An idle reservation younger than this is never evicted.
    pub min_residency: Duration,
    /// Most requests one user (not an admin) may have waiting at once.
    pub max_queued_per_uid: usize,
    /// Most bytes one user (not an admin) may hold and wait for together.
    pub max_bytes_per_uid: Option<u64>,
    /// Most reservations one user (not an admin) may hold and have waiting
    /// together (so that nobody can grow the daemon's state, and every
    /// status, without bound with tiny requests).
    pub max_reservations_per_uid: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            cushion_bytes: 0,
            aging: Duration::from_secs(10),
            starvation_guard: Duration::from_secs(30),
            priority_window: None,
            adaptive_guard: Some(AdaptiveGuard::DEFAULT),
            placement: Placement::Spread,
            eviction_deadline: Duration::from_secs(30),
            min_residency: Duration::from_secs(10),
            max_queued_per_uid: 4096,
            max_bytes_per_uid: None,
            max_reservations_per_uid: 4096,
        }
    }
}

/// The adaptive starvation guard (see [`LedgerConfig::adaptive_guard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveGuard {
    /// A request's guard is this many times the recent mean wait.
    pub factor: u32,
    /// The longest guard.
    pub cap: Duration,
}

impl AdaptiveGuard {
    /// How many of the last grants the mean wait is taken over.
    pub const GRANTS: usize = 64;
    /// The factor chosen by the policy sweep (docs/benchmarks.md).
    pub const DEFAULT_FACTOR: u32 = 4;
    /// The cap chosen by the policy sweep (docs/benchmarks.md): the longest
    /// any request's guard can be.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(3 * 3600);
    /// The ledger's default: factor 4, cap 3 h.
    pub const DEFAULT: AdaptiveGuard = AdaptiveGuard {
        factor: Self::DEFAULT_FACTOR,
        cap: Self::DEFAULT_CAP,
    };
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

impl std::str::FromStr for Placement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spread" => Ok(Placement::Spread),
            "pack" => Ok(Placement::Pack),
            _ => Err(format!("invalid placement {s:?}: use spread or pack")),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Spread => "spread",
            Placement::Pack => "pack",
        })
    }
}

/// What status reports about the daemon itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The daemon's version.
    pub daemon_version: String,
    /// Name of the GPU backend (`simulated`, `nvml`).
    pub backend: String,
}

/// Every event the ledger reacts to. Each comes with the time it happened,
/// as the second argument of [`Ledger::apply`](crate::Ledger::apply).
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A decoded message from a client after its handshake.
    Request {
        /// Its connection.
        conn: ConnId,
        /// Who sent it.
        peer: Peer,
        /// The message.
        msg: ClientMessage,
    },
    /// A connection closed: everything it held or waited for goes.
    Disconnect {
        /// The connection.
        conn: ConnId,
    },
    /// A reading of one device (index into the devices given to
    /// [`Ledger::new`](crate::Ledger::new)), or why it failed.
    Reading {
        /// The device's position.
        device: usize,
        /// When the reading was taken: released memory stops counting only
        /// on a reading taken after its release.
        taken_at: Instant,
        /// The reading, or the fault that makes the device unhealthy.
        result: Result<Reading, String>,
    },
    /// Time passed: wait limits, eviction deadlines, minimum residencies and
    /// aging may have come due (see [`Ledger::next_wakeup`](crate::Ledger::next_wakeup)).
    Tick,
}

/// What [`Ledger::apply`](crate::Ledger::apply) asks the daemon to do, in
/// order: every message to a client, every eviction ask, and every event
/// worth a log line. Replies come before the log lines about them, and a
/// release before the grants it made room for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send a message to a client: the direct answer to a request (released,
    /// cancelled, status, pong, idle set, attached, or an error).
    Reply {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ServerMessage,
    },
    /// A request was granted: send [`ServerMessage::Granted`] and log it.
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
    /// position changes): send [`ServerMessage::Queued`].
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
    /// Ask a holder to unload and release an idle reservation: send
    /// [`ServerMessage::Evict`] and log it.
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
    /// A victim did not free its memory in time (for logs).
    EvictionFailed {
        /// The reservation.
        victim: String,
        /// What happened.
        reason: String,
    },
    /// A request failed: refused, or its wait limit passed. Send it as an
    /// error and log it.
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
    /// A reservation ended (for logs). On a measured device, the memory it
    /// held counts until a reading taken after now: see
    /// [`Effect::RefreshReadings`].
    Released {
        /// The connection that held it.
        conn: ConnId,
        /// What ended.
        released: Released,
        /// Whether its connection closed (rather than an explicit release).
        disconnected: bool,
    },
    /// Take a fresh reading now: memory was released and only a reading
    /// taken after the release can show it free.
    RefreshReadings,
    /// Something worth a log line that sends nothing.
    Log(LogEvent),
}

/// Events worth a log line that send nothing to anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A client withdrew waiting requests.
    Cancelled {
        /// Its connection.
        conn: ConnId,
        /// Their tag.
        tag: u64,
        /// How many.
        count: u32,
    },
    /// A holder declared that its reservation runs under a hard limit.
    Enforced {
        /// The connection.
        conn: ConnId,
        /// The reservation.
        id: ReservationId,
        /// The limit.
        limit_bytes: u64,
        /// How it is enforced.
        mechanism: String,
    },
    /// Processes now count against a reservation.
    PidsAttached {
        /// The connection.
        conn: ConnId,
        /// The reservation.
        id: ReservationId,
        /// Every pid it speaks for now.
        pids: Vec<u32>,
    },
    /// A holder changed its reservation's size.
    Resized {
        /// The connection.
        conn: ConnId,
        /// The reservation.
        id: ReservationId,
        /// Its size before.
        from_bytes: u64,
        /// Its size now.
        to_bytes: u64,
    },
    /// A holder marked its reservation idle or busy.
    IdleSet {
        /// The connection.
        conn: ConnId,
        /// The reservation.
        id: ReservationId,
        /// Idle (evictable) or busy.
        idle: bool,
    },
    /// A device's reading failed: no new grants on it until one succeeds.
    DeviceUnhealthy {
        /// Its index (as `nvidia-smi` numbers devices).
        device: u32,
        /// Why.
        fault: String,
    },
    /// A device's readings succeed again.
    DeviceRecovered {
        /// Its index.
        device: u32,
    },
    /// A connection reported the consumers it fronts (`ReportConsumers`).
    ConsumersReported {
        /// The connection.
        conn: ConnId,
        /// How many it reports now.
        count: usize,
    },
    /// A reservation held since a restart was reclaimed by its holder.
    Reclaimed {
        /// The connection that has it now.
        conn: ConnId,
        /// The reservation.
        id: ReservationId,
        /// Its bytes.
        bytes: u64,
    },
    /// A reclaim was refused: wrong token, or another user.
    ReclaimRefused {
        /// The connection that asked.
        conn: ConnId,
        /// The reservation it named.
        id: ReservationId,
        /// Its user.
        uid: u32,
    },
    /// The grace period after a restart ended and this reservation was not
    /// reclaimed: it is dropped (on a measured device, its processes'
    /// usage still counts through the readings).
    Unreclaimed {
        /// The reservation.
        id: ReservationId,
        /// Its holder's pid before the restart.
        pid: u32,
        /// Its holder's uid.
        uid: u32,
        /// Its bytes.
        bytes: u64,
        /// Whether its device is measured (its usage keeps counting).
        measured: bool,
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
