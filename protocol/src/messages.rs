//! Every message that crosses the socket, in both encodings.
//!
//! A session is: the client sends [`ClientMessage::Hello`], the daemon answers
//! [`ServerMessage::Welcome`] (or an error and closes), then the client sends
//! requests at any time and the daemon sends replies and events at any time.
//!
//! Every request carries a client-chosen `tag` (a `u64`, default 0) that the
//! daemon echoes in every reply and event about that request, so one
//! connection can have many requests in flight. Tag 0 is also used for errors
//! that concern no request.
//!
//! Enums are externally tagged (`{"reserve": {...}}` in JSON) because postcard
//! cannot carry internally tagged enums. New variants are only appended; a
//! change of wire meaning bumps [`crate::PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// Daemon-assigned id of a reservation. A queued request gets its id when it is
/// queued and keeps it when it is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReservationId(pub u64);

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Which device a request may be placed on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSelector {
    /// Any device; the daemon picks one (the one with most room).
    #[default]
    Any,
    /// The device with this index (as `nvidia-smi` numbers them).
    Index(u32),
    /// The device with this UUID (`GPU-...`).
    Uuid(String),
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::Any => f.pad("any"),
            DeviceSelector::Index(i) => fmt::Display::fmt(i, f),
            DeviceSelector::Uuid(u) => f.pad(u),
        }
    }
}

impl std::str::FromStr for DeviceSelector {
    type Err = String;

    /// Parses `any`, an index such as `0`, or a UUID such as `GPU-1234...`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("any") {
            Ok(DeviceSelector::Any)
        } else if let Ok(i) = s.parse::<u32>() {
            Ok(DeviceSelector::Index(i))
        } else if s.starts_with("GPU-") || s.starts_with("MIG-") || s.starts_with("SIM-") {
            Ok(DeviceSelector::Uuid(s.to_string()))
        } else {
            Err(format!(
                "invalid device {s:?}: use `any`, an index such as 0, or a UUID such as GPU-…"
            ))
        }
    }
}

/// A request for a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// Client-chosen tag echoed in every reply about this request.
    #[serde(default)]
    pub tag: u64,
    /// Bytes of device memory to reserve.
    pub bytes: u64,
    /// Where it may be placed.
    #[serde(default)]
    pub device: DeviceSelector,
    /// Higher runs first. Waiting raises a request's effective priority (aging).
    #[serde(default)]
    pub priority: i32,
    /// Free text shown in status (e.g. the model's name).
    #[serde(default)]
    pub label: Option<String>,
    /// Longest time to wait in the queue, in milliseconds; `None` waits as long
    /// as it takes, `0` fails at once unless it fits now.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Start idle: the daemon may ask the holder to unload and release it
    /// when a waiter needs the room (see `SetIdle`).
    #[serde(default)]
    pub evictable: bool,
}

/// A message from a client to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message of every session.
    Hello {
        /// Must equal [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// Free text naming the client, for logs.
        #[serde(default)]
        client: String,
    },
    /// Ask for a reservation; answered by `Queued` events and then `Granted`
    /// or `Error`.
    Reserve(ReserveRequest),
    /// Withdraw this connection's waiting requests with this tag; answered by
    /// `Cancelled`.
    Cancel {
        /// Tag of the request to cancel.
        #[serde(default)]
        tag: u64,
    },
    /// Release a reservation this connection holds; answered by `Released`.
    Release {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
        /// The reservation to release.
        id: ReservationId,
    },
    /// Ask for the daemon's state; answered by `Status`.
    Status {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
    },
    /// Liveness check; answered by `Pong`.
    Ping {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
    },
    /// Declare more processes whose GPU usage counts against a reservation
    /// this connection holds (their descendants count too). Only processes
    /// of the client's own user are accepted, unless the client is root.
    /// Answered by `Attached`.
    AttachPids {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// Process ids to add.
        pids: Vec<u32>,
    },
    /// Mark a reservation this connection holds idle (its model is kept warm
    /// and may be unloaded when a waiter needs the room) or busy (never
    /// evicted). Answered by `IdleSet`.
    SetIdle {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// True: idle, evictable. False: busy.
        idle: bool,
    },
    /// Ask for a reclaim token with every grant on this connection (and at
    /// once for what it already holds), so that its reservations can be
    /// reclaimed after a daemon restart. Answered by `ReclaimEnabled`, then
    /// one `ReclaimToken` per reservation already held.
    EnableReclaim {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
    },
    /// After a daemon restart, take back reservation `id` (held for its
    /// holder during the grace period) with the token given at its grant.
    /// Only the same user (or root) may. Answered by `Granted` with this tag
    /// (same id, device and bytes), or `Error` (`not_found`: not held for
    /// reclaim, e.g. the grace period is over; `permission_denied`: wrong
    /// token or user).
    Reclaim {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
        /// The reservation's id, as granted before the restart.
        id: ReservationId,
        /// The token from its `ReclaimToken`.
        token: String,
    },
    /// Ask for a reservation that speaks for the processes in `pids` (and
    /// their descendants) instead of the client's own process: a client
    /// that holds reservations for other processes (a gateway in front of
    /// an inference server) leaves itself out of them. An empty list speaks
    /// for no process: it counts its reserved bytes until pids are attached
    /// with `AttachPids`. Usage the named processes already have on the
    /// device that counts against no reservation is adopted: the request
    /// needs room only for what it reserves beyond that usage. The pids are
    /// checked as for `AttachPids`. Answered as `Reserve`.
    ReserveFor {
        /// What to reserve.
        request: ReserveRequest,
        /// The processes it speaks for.
        pids: Vec<u32>,
    },
    /// Change the bytes of a reservation this connection holds. Shrinking
    /// always succeeds; growing succeeds only if the device has the room now
    /// (room its processes already use costs nothing), else it fails with
    /// `timeout` as a `Reserve` with `timeout_ms: 0` would, and the
    /// reservation keeps its size. Answered by `Resized`.
    Resize {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// Its new size in bytes (at least 1).
        bytes: u64,
    },
    /// Declare that the processes of a reservation this connection holds run
    /// under a hard limit of `limit_bytes` on its device, which the client
    /// set up itself (`vramctl run --enforce`: an NVIDIA MPS pinned-memory
    /// limit); status then lists the reservation as enforced. The daemon
    /// records the declaration, it does not check it. Answered by
    /// `EnforcedSet`.
    SetEnforced {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// The limit its processes run under, in bytes (at least 1).
        limit_bytes: u64,
        /// How: `mps` (an NVIDIA MPS pinned-memory limit); free text of at
        /// most 64 bytes.
        mechanism: String,
    },
    /// Declare the consumers (apps that load models on their own) this
    /// client fronts, for status: vramd-gateway sends its apps. The list
    /// replaces the one this connection reported before (an empty list
    /// withdraws them) and is dropped when the connection closes. The
    /// daemon only shows them: it never calls them. At most
    /// [`MAX_REPORTED_CONSUMERS`] entries, each checked by
    /// [`ConsumerReport::check`]; names are unique within the list.
    /// Answered by `ConsumersReported`, or `Error` (`bad_request`: an entry
    /// out of bounds, or a name twice; `limit_exceeded`: more than
    /// [`MAX_REPORTED_CONSUMERS`] reported on the daemon in all). A refused
    /// report leaves this connection's previous one in place.
    ReportConsumers {
        /// Tag echoed in the answer.
        #[serde(default)]
        tag: u64,
        /// Every consumer the client fronts now.
        consumers: Vec<ConsumerReport>,
    },
}

/// Most consumers one `ReportConsumers` may list, and most listed on one
/// daemon by all its clients together.
pub const MAX_REPORTED_CONSUMERS: usize = 64;
/// Most bytes of a reported consumer's `name`.
pub const MAX_CONSUMER_NAME_BYTES: usize = 128;
/// Most bytes of a reported consumer's `kind`.
pub const MAX_CONSUMER_KIND_BYTES: usize = 32;
/// Most models a reported consumer may list.
pub const MAX_CONSUMER_MODELS: usize = 32;
/// Most bytes of each model name a reported consumer lists.
pub const MAX_CONSUMER_MODEL_BYTES: usize = 256;
/// Most bytes of a reported consumer's `last_error`.
pub const MAX_CONSUMER_ERROR_BYTES: usize = 1024;

/// One consumer in [`ClientMessage::ReportConsumers`]: an app the client
/// fronts, as the client sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerReport {
    /// Its name (the gateway's app name): 1 to
    /// [`MAX_CONSUMER_NAME_BYTES`] bytes.
    pub name: String,
    /// What it is (the gateway's app kinds: `ollama`, `openai`, `comfyui`,
    /// `http`, `command`): 1 to [`MAX_CONSUMER_KIND_BYTES`] bytes.
    pub kind: String,
    /// Device index its memory is on, when known and only one.
    #[serde(default)]
    pub device: Option<u32>,
    /// Its priority (that of the reservations held for it).
    #[serde(default)]
    pub priority: i32,
    /// Whether its API answered the client's last check.
    #[serde(default)]
    pub reachable: bool,
    /// Memory held for it (the reservations the client holds for it).
    #[serde(default)]
    pub resident_bytes: u64,
    /// The models it holds: at most [`MAX_CONSUMER_MODELS`], each 1 to
    /// [`MAX_CONSUMER_MODEL_BYTES`] bytes.
    #[serde(default)]
    pub models: Vec<String>,
    /// Milliseconds since the daemon last asked for its memory back (as the
    /// report is sent), if ever.
    #[serde(default)]
    pub last_eviction_ms: Option<u64>,
    /// Its last failure (unload answering an error, hanging, a failed
    /// health check…), at most [`MAX_CONSUMER_ERROR_BYTES`] bytes; `None`
    /// once the failing call succeeded again.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When `last_error` happened: Unix time in milliseconds.
    #[serde(default)]
    pub last_error_at_ms: Option<u64>,
}

impl ConsumerReport {
    /// Checks the bounds: a clear message naming the consumer, the field
    /// and the limit when one is out of them.
    pub fn check(&self) -> Result<(), String> {
        let who = || format!("consumer {:?}", self.name);
        let text = |what: &str, v: &str, max: usize| -> Result<(), String> {
            if v.is_empty() {
                Err(format!("{}: {what} is empty", who()))
            } else if v.len() > max {
                Err(format!(
                    "{}: {what} is {} bytes, over the limit of {max}",
                    who(),
                    v.len()
                ))
            } else {
                Ok(())
            }
        };
        if self.name.is_empty() {
            return Err("a consumer's name is empty".into());
        }
        if self.name.len() > MAX_CONSUMER_NAME_BYTES {
            return Err(format!(
                "a consumer's name is {} bytes, over the limit of {MAX_CONSUMER_NAME_BYTES}",
                self.name.len()
            ));
        }
        text("kind", &self.kind, MAX_CONSUMER_KIND_BYTES)?;
        if self.models.len() > MAX_CONSUMER_MODELS {
            return Err(format!(
                "{}: {} models, over the limit of {MAX_CONSUMER_MODELS}",
                who(),
                self.models.len()
            ));
        }
        for m in &self.models {
            text("a model name", m, MAX_CONSUMER_MODEL_BYTES)?;
        }
        if let Some(e) = &self.last_error {
            text("last_error", e, MAX_CONSUMER_ERROR_BYTES)?;
        }
        Ok(())
    }
}

/// A granted reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Its id, used to release it.
    pub id: ReservationId,
    /// Index of the device it is on.
    pub device: u32,
    /// UUID of the device it is on.
    pub device_uuid: String,
    /// Bytes reserved.
    pub bytes: u64,
}

/// A message from the daemon to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to `Hello`: the session is open.
    Welcome {
        /// The daemon's protocol version.
        version: u32,
        /// The daemon's program version.
        daemon: String,
    },
    /// The request waits; sent when it is queued and whenever its position changes.
    Queued {
        /// The request's tag.
        tag: u64,
        /// The id it will have when granted.
        id: ReservationId,
        /// 1-based position in the wait queue.
        position: u32,
    },
    /// The request is granted; the memory is the client's until it releases
    /// or its connection closes.
    Granted {
        /// The request's tag.
        tag: u64,
        /// What was granted.
        grant: Grant,
    },
    /// Answer to `Release`.
    Released {
        /// The `Release` request's tag.
        tag: u64,
        /// The reservation released.
        id: ReservationId,
    },
    /// Answer to `Cancel`: the waiting requests with this tag are withdrawn.
    Cancelled {
        /// The cancelled tag.
        tag: u64,
        /// How many waiting requests were withdrawn (0 if none waited).
        count: u32,
    },
    /// Answer to `Status`.
    Status {
        /// The `Status` request's tag.
        tag: u64,
        /// The daemon's state (boxed: it is by far the largest answer, and
        /// every queued message is as large as the largest variant).
        status: Box<StatusReport>,
    },
    /// Answer to `Ping`.
    Pong {
        /// The `Ping` request's tag.
        tag: u64,
    },
    /// A request failed, or (tag 0) the session has a problem.
    Error {
        /// The request's tag, or 0.
        tag: u64,
        /// What kind of failure.
        kind: ErrorKind,
        /// Human-readable explanation.
        message: String,
    },
    /// Answer to `AttachPids`.
    Attached {
        /// The request's tag.
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// Every process it now speaks for.
        pids: Vec<u32>,
    },
    /// Answer to `SetIdle`.
    IdleSet {
        /// The request's tag.
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// Its new state.
        idle: bool,
    },
    /// The daemon asks the holder to unload what reservation `id` holds and
    /// then release it, within `deadline_ms`. Sent only for idle reservations.
    Evict {
        /// The reservation to give back.
        id: ReservationId,
        /// Milliseconds the holder has before the daemon reports it and tries
        /// another victim.
        deadline_ms: u64,
        /// Who needs the room, for logs.
        reason: String,
    },
    /// Answer to `EnableReclaim`: from now on every `Granted` on this
    /// connection is followed by a `ReclaimToken`.
    ReclaimEnabled {
        /// The `EnableReclaim` request's tag.
        tag: u64,
        /// How long, after a restart, the daemon holds reservations for their
        /// holders to reclaim, in milliseconds.
        grace_ms: u64,
    },
    /// The token that reclaims reservation `id` after a daemon restart (see
    /// `Reclaim`). Sent right after its `Granted` (with the same tag), and
    /// for reservations held when `EnableReclaim` came (with its tag). Keep
    /// it secret: with it, any process of the same user may take the
    /// reservation over after a restart.
    ReclaimToken {
        /// The grant's (or the `EnableReclaim`'s) tag.
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// 32 lowercase hex digits.
        token: String,
    },
    /// Answer to `Resize`.
    Resized {
        /// The request's tag.
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// Its size now.
        bytes: u64,
    },
    /// Answer to `SetEnforced`.
    EnforcedSet {
        /// The request's tag.
        tag: u64,
        /// The reservation.
        id: ReservationId,
        /// The limit recorded.
        limit_bytes: u64,
    },
    /// Answer to `ReportConsumers`: the list is in status from now on.
    ConsumersReported {
        /// The request's tag.
        tag: u64,
        /// How many consumers this connection now reports.
        count: u32,
    },
}

/// Kinds of failure reported on the wire. Each maps to one SDK error class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message could not be decoded or makes no sense.
    BadRequest,
    /// The client speaks another protocol version.
    VersionMismatch,
    /// The client sent no `Hello` in time.
    HandshakeTimeout,
    /// A binary frame's length is over the cap; the connection is closed.
    FrameTooLarge,
    /// A JSON line is over the cap; it is discarded.
    LineTooLong,
    /// The request's wait limit passed before it fit.
    Timeout,
    /// The request can never fit (larger than every eligible device).
    Refused,
    /// No such reservation, request or device.
    NotFound,
    /// The client may not do this.
    PermissionDenied,
    /// The daemon cannot serve this now (shutting down, device unhealthy).
    Unavailable,
    /// The client has too many requests or connections open.
    LimitExceeded,
    /// A bug in the daemon.
    Internal,
}

impl ErrorKind {
    /// The snake_case name used on the JSON wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::VersionMismatch => "version_mismatch",
            ErrorKind::HandshakeTimeout => "handshake_timeout",
            ErrorKind::FrameTooLarge => "frame_too_large",
            ErrorKind::LineTooLong => "line_too_long",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Refused => "refused",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::LimitExceeded => "limit_exceeded",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The daemon's state, as `vramctl status --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon's program version.
    pub daemon_version: String,
    /// Where readings come from: `simulated` or `nvml`.
    pub backend: String,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// Every device the daemon arbitrates.
    pub devices: Vec<DeviceStatus>,
    /// Every granted reservation.
    pub reservations: Vec<ReservationStatus>,
    /// Every waiting request, in the order they would be granted.
    pub queue: Vec<QueueEntry>,
    /// Event counters since start.
    pub counters: Counters,
    /// The consumers (apps that load models on their own) that clients
    /// declared with `ReportConsumers` (vramd-gateway's apps), in the order
    /// of their connections, while those connections last.
    pub consumers: Vec<ConsumerStatus>,
    /// How many requests wait in all; `queue` lists at most the first 1,000.
    pub queue_total: u64,
    /// How many reservations are granted in all; `reservations` lists at
    /// most the first 1,000 by id (fewer if the report would not fit in a
    /// frame: see [`StatusReport::fit`]). Appended in protocol version 1;
    /// JSON from an older daemon without it reads as 0.
    #[serde(default)]
    pub reservations_total: u64,
    /// Every process using GPU memory, per device, and what it counts
    /// against. Appended in protocol version 1 after `reservations_total`;
    /// JSON from an older daemon without it reads as an empty list.
    #[serde(default)]
    pub processes: Vec<GpuProcess>,
    /// The NVIDIA MPS server that `vramctl run --enforce` caps commands
    /// through, when the daemon runs one (`vramd --mps`) or was told of one
    /// (`--mps-pipe-dir`); `None` otherwise. Appended after `processes`;
    /// JSON from an older daemon without it reads as `None`.
    #[serde(default)]
    pub mps: Option<MpsStatus>,
    /// The reservations whose processes run under a hard limit (declared with
    /// `SetEnforced`, e.g. by `vramctl run --enforce`), by id. Appended after
    /// `mps`; JSON from an older daemon without it reads as an empty list.
    #[serde(default)]
    pub enforced: Vec<Enforcement>,
    /// The last error of each consumer in `consumers` that has one, in the
    /// same order, with when it happened. Appended after `enforced`
    /// (`ConsumerStatus` cannot grow: its entries sit in the middle of the
    /// report); JSON from an older daemon without it reads as an empty
    /// list.
    #[serde(default)]
    pub consumer_errors: Vec<ConsumerError>,
}

/// A consumer's last error in [`StatusReport`], with its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerError {
    /// The consumer's name, as in `consumers`.
    pub name: String,
    /// The error, as in its `ConsumerStatus::last_error`.
    pub message: String,
    /// When it happened, Unix time in milliseconds, as its client reported
    /// it; `None` if the client did not say.
    pub at_ms: Option<u64>,
}

/// One enforced reservation in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    /// The reservation.
    pub id: ReservationId,
    /// The hard limit its processes run under on its device.
    pub limit_bytes: u64,
    /// How it is enforced: `mps` (an NVIDIA MPS pinned-memory limit).
    pub mechanism: String,
}

/// The MPS server in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MpsStatus {
    /// Its pipe directory (`CUDA_MPS_PIPE_DIRECTORY` for its clients).
    pub pipe_dir: String,
    /// Its log directory (`CUDA_MPS_LOG_DIRECTORY`), when known.
    pub log_dir: Option<String>,
    /// Whether its control pipe (`control` in `pipe_dir`) exists, as last
    /// checked (when the status was asked).
    pub healthy: bool,
    /// Why it is unhealthy, or who runs it.
    pub note: Option<String>,
}

impl StatusReport {
    /// Shortens `reservations`, `queue` and `processes` (halving the
    /// longest one, then the others) until the report's binary encoding is at most `max_bytes`, so
    /// that a status answer never fails because of its size; the `*_total`
    /// fields still count everything. Returns whether anything was cut.
    pub fn fit(&mut self, max_bytes: usize) -> bool {
        let mut cut = false;
        while postcard::experimental::serialized_size(self).is_ok_and(|n| n > max_bytes) {
            let (r, q, p) = (
                self.reservations.len(),
                self.queue.len(),
                self.processes.len(),
            );
            if r == 0 && q == 0 && p == 0 {
                break;
            }
            if p > r && p > q {
                self.processes.truncate(p / 2);
            } else if r >= q {
                self.reservations.truncate(r / 2);
            } else {
                self.queue.truncate(q / 2);
            }
            cut = true;
        }
        cut
    }
}

/// One consumer (an app that loads models on its own: Ollama, ComfyUI, an
/// HTTP app, a command) in [`StatusReport`], as its client (vramd-gateway)
/// last reported it with `ReportConsumers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    /// Its name, as reported.
    pub name: String,
    /// `ollama`, `openai`, `comfyui`, `http`, `command` (as reported).
    pub kind: String,
    /// Device index its memory is on, if reported.
    pub device: Option<u32>,
    /// Its priority, as reported.
    pub priority: i32,
    /// Whether its API answered its client's last check.
    pub reachable: bool,
    /// Memory held for it, as reported.
    pub resident_bytes: u64,
    /// Models it holds, as reported.
    pub models: Vec<String>,
    /// Milliseconds since it was last asked to unload, if ever.
    pub last_eviction_ms: Option<u64>,
    /// Its last error (its time is in [`StatusReport::consumer_errors`]).
    pub last_error: Option<String>,
}

/// One device in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Index (as `nvidia-smi` numbers devices).
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Total memory.
    pub total_bytes: u64,
    /// Memory in use on the whole device, as last read.
    pub used_bytes: u64,
    /// Sum of the bytes of reservations granted on it.
    pub reserved_bytes: u64,
    /// Memory kept free as a safety margin.
    pub cushion_bytes: u64,
    /// Memory counted as taken by the accounting model.
    pub committed_bytes: u64,
    /// What a new request may still get: total − cushion − committed.
    pub available_bytes: u64,
    /// Usage by processes that hold no reservation (other users, apps that
    /// never ask).
    pub unattributed_bytes: u64,
    /// Whether the last reading succeeded; no new grants while false.
    pub healthy: bool,
    /// Why the device is unhealthy, or a note about its readings (e.g. that
    /// per-process usage is unavailable and the cautious fallback is in use).
    pub note: Option<String>,
    /// Whether per-process usage is known; without it the daemon counts
    /// `used + Σ reserved` (cautious).
    pub per_process_usage: bool,
}

/// One process using memory on a device, in [`StatusReport`]: what holds
/// the card. On a simulated device each reservation is one process (its
/// client's pid) holding what it reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Device index.
    pub device: u32,
    /// Process id (0 for another user's process when the client is not an
    /// admin).
    pub pid: u32,
    /// Real user id of the process, as the daemon read it from /proc; 0 if
    /// unknown.
    pub uid: u32,
    /// Memory it uses on the device, as last read.
    pub bytes: u64,
    /// The reservation its usage counts against (that of its pid or of its
    /// nearest ancestor a reservation speaks for); `None` if unattributed or
    /// `released`.
    pub reservation: Option<ReservationId>,
    /// It counts against memory released but not yet seen free (a
    /// reservation released since the last reading).
    pub released: bool,
}

/// One granted reservation in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationStatus {
    /// Its id.
    pub id: ReservationId,
    /// Device index.
    pub device: u32,
    /// Bytes reserved.
    pub bytes: u64,
    /// Label given by the client.
    pub label: Option<String>,
    /// Process id of the client.
    pub pid: u32,
    /// User id of the client.
    pub uid: u32,
    /// Priority it was requested with.
    pub priority: i32,
    /// Milliseconds since it was granted.
    pub age_ms: u64,
    /// Memory its processes actually use on the device, as last read.
    pub actual_bytes: u64,
    /// True when its processes use more than it reserved.
    pub over_reserved: bool,
    /// Processes it speaks for (the client, and any it declared or launched;
    /// their descendants count too).
    pub pids: Vec<u32>,
    /// Whether it is idle (evictable).
    pub idle: bool,
}

/// One waiting request in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// The id it will have when granted.
    pub id: ReservationId,
    /// 1-based position in the queue.
    pub position: u32,
    /// Bytes requested.
    pub bytes: u64,
    /// Device requested.
    pub device: DeviceSelector,
    /// Priority requested.
    pub priority: i32,
    /// Label given by the client.
    pub label: Option<String>,
    /// Process id of the client.
    pub pid: u32,
    /// User id of the client.
    pub uid: u32,
    /// Milliseconds it has waited.
    pub waited_ms: u64,
}

/// Event counters since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Reservations granted.
    pub grants: u64,
    /// Reservations released (explicitly or by disconnect).
    pub releases: u64,
    /// Of `releases`, those caused by a connection closing.
    pub disconnect_releases: u64,
    /// Requests whose wait limit passed.
    pub timeouts: u64,
    /// Requests refused at once (can never fit, unknown device).
    pub refusals: u64,
    /// Requests withdrawn by `Cancel` or by their connection closing.
    pub cancels: u64,
    /// Holders asked to unload.
    pub evictions_requested: u64,
    /// Of those, the ones that gave their memory back in time.
    pub evictions_completed: u64,
    /// Of those, the ones that failed, missed their deadline, or could not be reached.
    pub evictions_failed: u64,
}
