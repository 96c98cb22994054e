//! Reservations across a daemon restart: reclaim tokens, the state the
//! daemon saves ([`Snapshot`]) and the grace period after a start.
//!
//! # Lifecycle
//! 1. A connection sends `EnableReclaim`; from then on each of its grants is
//!    followed by a `ReclaimToken`. A token is a keyed hash of the
//!    reservation's id (the key is the daemon's secret, saved with the
//!    state), so the ledger stores nothing per reservation for it.
//! 2. The daemon saves [`Ledger::snapshot`] (at the edge, after grants and
//!    releases, and when it stops).
//! 3. A new daemon calls [`Ledger::restore`] before it serves anyone: every
//!    saved reservation is *held for reclaim* — it belongs to no connection,
//!    counts on its device like any other (so no new grant takes its room)
//!    and is never evicted — until the grace period ends.
//! 4. A client sends `Reclaim { id, token }`: with the right token, from the
//!    same user (or root), the reservation becomes its connection's again,
//!    unchanged (id, device, bytes, label, pids, priority, idle state), and
//!    the answer is `Granted`.
//! 5. When the grace period ends, what was not reclaimed is dropped as if
//!    its connection had closed: on a measured device its processes' usage
//!    still counts (as unattributed) through the readings.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vramd_protocol::{ErrorKind, Grant, ReservationId, ServerMessage};

use crate::{ConnId, Effect, Ledger, LogEvent, Peer, ReadingSource, Reservation, error, millis};

/// The owner of reservations held for reclaim: no connection (the daemon
/// numbers its connections from 1).
pub const NO_CONN: ConnId = ConnId(0);

/// What the ledger keeps about restarts.
#[derive(Debug, Default)]
pub(crate) struct Restart {
    /// The secret from which tokens are derived.
    key: u128,
    /// How long restored reservations are held.
    grace: Duration,
    /// When the grace period ends, while reservations are held.
    grace_until: Option<Instant>,
    /// Reservations held for reclaim, with their idle state (they are kept
    /// busy while held: nobody could be asked to unload them).
    held: BTreeMap<ReservationId, bool>,
    /// Connections that asked for tokens.
    enabled: HashSet<ConnId>,
}

/// The state a daemon saves so that a restart loses no reservation: plain
/// data, written and read by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The next reservation id (ids are never reused across a restart).
    pub next_id: u64,
    /// The secret reclaim tokens derive from, as 32 hex digits.
    pub token_key: String,
    /// Every granted reservation (including those still held for reclaim).
    pub reservations: Vec<SavedReservation>,
}

/// One reservation in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReservation {
    /// Its id.
    pub id: ReservationId,
    /// UUID of its device (it is restored onto the device with this UUID).
    pub device_uuid: String,
    /// Bytes reserved.
    pub bytes: u64,
    /// Its label.
    pub label: Option<String>,
    /// Priority it was requested with.
    pub priority: i32,
    /// Process id of the client that made it.
    pub pid: u32,
    /// User id of that client: only this user (or root) may reclaim it.
    pub uid: u32,
    /// Group id of that client.
    pub gid: u32,
    /// Whether that client was an admin.
    pub admin: bool,
    /// Processes it speaks for.
    pub pids: Vec<u32>,
    /// Whether it was idle (evictable).
    pub idle: bool,
    /// How long it had been held when saved, in milliseconds.
    pub age_ms: u64,
    /// The hard limit its holder declared (`SetEnforced`): bytes and
    /// mechanism. Absent in files written before it existed.
    #[serde(default)]
    pub enforced: Option<(u64, String)>,
}

/// What [`Ledger::restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Reservations now held for reclaim.
    pub held: usize,
    /// Bytes they hold in all.
    pub held_bytes: u64,
    /// Saved reservations that could not be restored, and why.
    pub dropped: Vec<String>,
}

/// Formats a token key or token as 32 lowercase hex digits.
pub fn hex128(v: u128) -> String {
    format!("{v:032x}")
}

/// Parses 32 hex digits.
pub fn parse_hex128(s: &str) -> Option<u128> {
    (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
}

impl Ledger {
    /// Sets the secret reclaim tokens derive from (random, from the daemon)
    /// and how long restored reservations are held for their holders.
    pub fn with_reclaim(mut self, token_key: u128, grace: Duration) -> Self {
        self.restart.key = token_key;
        self.restart.grace = grace;
        self
    }

    /// The reclaim token of reservation `id`.
    pub fn reclaim_token(&self, id: ReservationId) -> String {
        #[allow(deprecated)] // SipHash-2-4 with a 128-bit key, as std still ships it
        let half = |domain: u64| {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::SipHasher::new_with_keys(
                self.restart.key as u64,
                (self.restart.key >> 64) as u64,
            );
            (domain, id.0).hash(&mut h);
            h.finish()
        };
        hex128((u128::from(half(1)) << 64) | u128::from(half(2)))
    }

    /// Number of reservations held for reclaim.
    pub fn held_for_reclaim(&self) -> usize {
        self.restart.held.len()
    }

    /// When the grace period ends, while reservations are held for reclaim.
    pub fn grace_until(&self) -> Option<Instant> {
        self.restart
            .grace_until
            .filter(|_| !self.restart.held.is_empty())
    }

    /// The state to save so that a restart loses no reservation: every
    /// reservation that can be reclaimed — those of connections that asked
    /// for tokens, and those still held for reclaim. The others end with
    /// the daemon, as their connections do.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        Snapshot {
            next_id: self.next_id,
            token_key: hex128(self.restart.key),
            reservations: self
                .reservations
                .values()
                .filter(|r| r.conn == NO_CONN || self.restart.enabled.contains(&r.conn))
                .map(|r| SavedReservation {
                    id: r.id,
                    device_uuid: self.devices[r.device].spec.uuid.clone(),
                    bytes: r.bytes,
                    label: r.label.clone(),
                    priority: r.priority,
                    pid: r.peer.pid,
                    uid: r.peer.uid,
                    gid: r.peer.gid,
                    admin: r.peer.admin,
                    pids: r.pids.clone(),
                    idle: self.restart.held.get(&r.id).copied().unwrap_or(r.idle),
                    age_ms: millis(now.saturating_duration_since(r.granted_at)),
                    enforced: r.enforced.clone(),
                })
                .collect(),
        }
    }

    /// Takes a saved state at start, before anyone is served: its token key
    /// (so tokens given before the restart still hold) and its
    /// reservations, held for reclaim until `now` + the grace period. A
    /// reservation whose device is gone, or whose id repeats, is dropped
    /// (and said so in the report).
    pub fn restore(&mut self, snapshot: Snapshot, now: Instant) -> RestoreReport {
        let mut report = RestoreReport::default();
        if let Some(key) = parse_hex128(&snapshot.token_key) {
            self.restart.key = key;
        } else {
            report.dropped.push(format!(
                "the token key {:?} is not 32 hex digits: no reservation can be reclaimed",
                snapshot.token_key
            ));
            return report;
        }
        let mut max_id = 0;
        for s in snapshot.reservations {
            max_id = max_id.max(s.id.0);
            let Some(device) = self
                .devices
                .iter()
                .position(|d| d.spec.uuid.eq_ignore_ascii_case(&s.device_uuid))
            else {
                report.dropped.push(format!(
                    "reservation {}: its device {} is not here",
                    s.id, s.device_uuid
                ));
                continue;
            };
            if s.bytes == 0 || self.reservations.contains_key(&s.id) {
                report
                    .dropped
                    .push(format!("reservation {}: empty or repeated", s.id));
                continue;
            }
            let granted_at = now
                .checked_sub(Duration::from_millis(s.age_ms))
                .unwrap_or(now);
            let mut pids = s.pids;
            if pids.is_empty() {
                pids.push(s.pid);
            }
            self.restart.held.insert(s.id, s.idle);
            // Counted as this daemon's grants, so that grants − releases
            // stays what is held (each ends in a release: reclaimed and
            // released, or dropped with the grace period).
            self.counters.grants += 1;
            report.held += 1;
            report.held_bytes = report.held_bytes.saturating_add(s.bytes);
            self.put_reservation(Reservation {
                id: s.id,
                conn: NO_CONN,
                device,
                bytes: s.bytes,
                label: s.label,
                priority: s.priority,
                peer: Peer {
                    pid: s.pid,
                    uid: s.uid,
                    gid: s.gid,
                    admin: s.admin,
                },
                pids,
                granted_at,
                idle: false,
                last_busy: now,
                evicting: None,
                enforced: s.enforced,
            });
        }
        self.next_id = self.next_id.max(snapshot.next_id).max(max_id + 1);
        if !self.restart.held.is_empty() {
            self.restart.grace_until = Some(now.checked_add(self.restart.grace).unwrap_or(now));
        }
        self.clean = false;
        report
    }

    /// `EnableReclaim`: tokens from now on, and at once for what `conn`
    /// already holds.
    pub(crate) fn on_enable_reclaim(&mut self, conn: ConnId, tag: u64, fx: &mut Vec<Effect>) {
        self.restart.enabled.insert(conn);
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::ReclaimEnabled {
                tag,
                grace_ms: millis(self.restart.grace),
            },
        });
        let ids: Vec<ReservationId> = self
            .held_by
            .get(&conn)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for id in ids {
            fx.push(Effect::Reply {
                conn,
                msg: ServerMessage::ReclaimToken {
                    tag,
                    id,
                    token: self.reclaim_token(id),
                },
            });
        }
    }

    /// After a grant to `conn`: its token, if `conn` asked for tokens.
    pub(crate) fn push_token(
        &self,
        conn: ConnId,
        tag: u64,
        id: ReservationId,
        fx: &mut Vec<Effect>,
    ) {
        if self.restart.enabled.contains(&conn) {
            fx.push(Effect::Reply {
                conn,
                msg: ServerMessage::ReclaimToken {
                    tag,
                    id,
                    token: self.reclaim_token(id),
                },
            });
        }
    }

    /// A connection closed: it asks for nothing any more.
    pub(crate) fn forget_reclaim(&mut self, conn: ConnId) {
        self.restart.enabled.remove(&conn);
    }

    /// `Reclaim`: gives a reservation held for reclaim back to its holder.
    /// Returns whether a scheduling pass must follow.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_reclaim(
        &mut self,
        conn: ConnId,
        peer: Peer,
        tag: u64,
        id: ReservationId,
        token: &str,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> bool {
        let granted = |l: &Ledger, r: &Reservation| ServerMessage::Granted {
            tag,
            grant: Grant {
                id: r.id,
                device: l.devices[r.device].spec.index,
                device_uuid: l.devices[r.device].spec.uuid.clone(),
                bytes: r.bytes,
            },
        };
        match self.reservations.get(&id) {
            // Already this connection's (a repeated reclaim): same answer.
            Some(r) if r.conn == conn => {
                let msg = granted(self, r);
                fx.push(Effect::Reply { conn, msg });
                return false;
            }
            Some(_) if self.restart.held.contains_key(&id) => {}
            _ => {
                fx.push(Effect::Reply {
                    conn,
                    msg: error(
                        tag,
                        ErrorKind::NotFound,
                        format!(
                            "reservation {id} is not held for reclaim (it was never saved, was reclaimed by another connection, or the grace period after the restart is over)"
                        ),
                    ),
                });
                return false;
            }
        }
        let owner = self.reservations[&id].peer.uid;
        let token_ok = constant_time_eq(token.as_bytes(), self.reclaim_token(id).as_bytes());
        if !token_ok || (peer.uid != owner && peer.uid != 0) {
            fx.push(Effect::Log(LogEvent::ReclaimRefused {
                conn,
                id,
                uid: peer.uid,
            }));
            fx.push(Effect::Reply {
                conn,
                msg: error(
                    tag,
                    ErrorKind::PermissionDenied,
                    format!(
                        "reservation {id} may be reclaimed only by its holder's user (uid {owner}) or root, with the token given at its grant"
                    ),
                ),
            });
            return false;
        }
        let idle = self.restart.held.remove(&id).unwrap_or(false);
        let mut r = self.take_reservation(id).expect("checked above");
        r.conn = conn;
        r.idle = idle;
        r.last_busy = now;
        let msg = granted(self, &r);
        let bytes = r.bytes;
        self.put_reservation(r);
        fx.push(Effect::Reply { conn, msg });
        fx.push(Effect::Log(LogEvent::Reclaimed { conn, id, bytes }));
        // An idle one is a possible victim again.
        self.clean = false;
        true
    }

    /// Ends the grace period if it is over at `now`: what was not
    /// reclaimed is dropped. Returns whether anything was.
    pub(crate) fn end_grace(&mut self, now: Instant, fx: &mut Vec<Effect>) -> bool {
        match self.restart.grace_until {
            Some(t) if now >= t => {}
            _ => return false,
        }
        self.restart.grace_until = None;
        let held = std::mem::take(&mut self.restart.held);
        let mut dropped = 0u64;
        for id in held.into_keys() {
            let Some(r) = self.take_reservation(id) else {
                continue;
            };
            let measured = matches!(self.devices[r.device].source, ReadingSource::Measured(_));
            let (pid, uid) = (r.peer.pid, r.peer.uid);
            let released = self.released(r, now);
            fx.push(Effect::Log(LogEvent::Unreclaimed {
                id,
                pid,
                uid,
                bytes: released.bytes,
                measured,
            }));
            fx.push(Effect::Released {
                conn: NO_CONN,
                released,
                disconnected: true,
            });
            dropped += 1;
        }
        self.counters.releases += dropped;
        self.counters.disconnect_releases += dropped;
        if dropped > 0 {
            fx.push(Effect::RefreshReadings);
            self.clean = false;
        }
        dropped > 0
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceSpec, Input, LedgerConfig, ReadingSource};
    use vramd_protocol::{ClientMessage, ReserveRequest};

    const GIB: u64 = 1 << 30;

    fn ledger(now: Instant) -> Ledger {
        Ledger::new(
            LedgerConfig::default(),
            vec![DeviceSpec {
                index: 0,
                uuid: "SIM-0".into(),
                name: "sim".into(),
                total_bytes: 24 * GIB,
            }],
            ReadingSource::Simulated,
            now,
        )
        .with_reclaim(0x1234, Duration::from_secs(30))
    }

    fn peer(uid: u32) -> Peer {
        Peer {
            pid: 100 + uid,
            uid,
            gid: uid,
            admin: false,
        }
    }

    fn send(l: &mut Ledger, conn: u64, uid: u32, msg: ClientMessage, now: Instant) -> Vec<Effect> {
        l.apply(
            Input::Request {
                conn: ConnId(conn),
                peer: peer(uid),
                msg,
            },
            now,
        )
    }

    fn reserve(tag: u64, bytes: u64) -> ClientMessage {
        ClientMessage::Reserve(ReserveRequest {
            tag,
            bytes,
            device: Default::default(),
            priority: 3,
            label: Some("model".into()),
            timeout_ms: Some(0),
            evictable: true,
        })
    }

    fn replies(fx: &[Effect]) -> Vec<ServerMessage> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Reply { msg, .. } => Some(msg.clone()),
                Effect::Granted { tag, grant, .. } => Some(ServerMessage::Granted {
                    tag: *tag,
                    grant: grant.clone(),
                }),
                Effect::Failed {
                    tag, kind, message, ..
                } => Some(ServerMessage::Error {
                    tag: *tag,
                    kind: *kind,
                    message: message.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    fn kind(m: &ServerMessage) -> Option<ErrorKind> {
        match m {
            ServerMessage::Error { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// A ledger holding one 16 GiB reservation of uid 1000 with its token,
    /// saved and restored into a new ledger.
    fn restarted(now: Instant) -> (Ledger, ReservationId, String) {
        let mut old = ledger(now);
        let fx = send(
            &mut old,
            1,
            1000,
            ClientMessage::EnableReclaim { tag: 1 },
            now,
        );
        assert!(matches!(
            replies(&fx)[..],
            [ServerMessage::ReclaimEnabled {
                tag: 1,
                grace_ms: 30_000
            }]
        ));
        let fx = send(&mut old, 1, 1000, reserve(2, 16 * GIB), now);
        let r = replies(&fx);
        let (id, token) = match &r[..] {
            [
                ServerMessage::Granted { tag: 2, grant },
                ServerMessage::ReclaimToken { tag: 2, id, token },
            ] if grant.id == *id => (*id, token.clone()),
            other => panic!("{other:?}"),
        };
        assert_eq!(token, old.reclaim_token(id));
        let snapshot = old.snapshot(now + Duration::from_secs(5));
        assert_eq!(snapshot.reservations[0].age_ms, 5000);
        let mut new = ledger(now).with_reclaim(0x9999, Duration::from_secs(30));
        let report = new.restore(snapshot, now);
        assert_eq!((report.held, report.held_bytes), (1, 16 * GIB));
        assert!(report.dropped.is_empty());
        (new, id, token)
    }

    #[test]
    fn an_enforcement_declaration_survives_a_restart() {
        let now = Instant::now();
        let mut old = ledger(now);
        send(
            &mut old,
            1,
            1000,
            ClientMessage::EnableReclaim { tag: 1 },
            now,
        );
        let fx = send(&mut old, 1, 1000, reserve(2, 4 * GIB), now);
        let id = match &replies(&fx)[0] {
            ServerMessage::Granted { grant, .. } => grant.id,
            other => panic!("{other:?}"),
        };
        let enforce = ClientMessage::SetEnforced {
            tag: 3,
            id,
            limit_bytes: 4 * GIB,
            mechanism: "mps".into(),
        };
        send(&mut old, 1, 1000, enforce, now);
        let snapshot = old.snapshot(now);
        assert_eq!(
            snapshot.reservations[0].enforced,
            Some((4 * GIB, "mps".to_string()))
        );
        let mut new = ledger(now).with_reclaim(0x9999, Duration::from_secs(30));
        new.restore(snapshot, now);
        let st = new.status(
            Peer {
                pid: 1,
                uid: 0,
                gid: 0,
                admin: true,
            },
            now,
        );
        assert_eq!(st.enforced.len(), 1);
        assert_eq!(
            (st.enforced[0].id, st.enforced[0].limit_bytes),
            (id, 4 * GIB)
        );
    }

    #[test]
    fn held_reservations_keep_their_room_until_reclaimed_or_the_grace_ends() {
        let now = Instant::now();
        let (mut l, id, _) = restarted(now);
        assert_eq!(l.held_for_reclaim(), 1);
        // A newcomer does not get the room.
        let fx = send(&mut l, 2, 2000, reserve(1, 16 * GIB), now);
        assert_eq!(kind(&replies(&fx)[0]), Some(ErrorKind::Timeout));
        assert_eq!(l.next_wakeup(now), Some(now + Duration::from_secs(30)));
        // After the grace period it is dropped (logged) and the room is free.
        let fx = l.apply(Input::Tick, now + Duration::from_secs(30));
        assert!(fx.iter().any(|e| matches!(
            e,
            Effect::Log(LogEvent::Unreclaimed { id: i, bytes, .. }) if *i == id && *bytes == 16 * GIB
        )));
        assert_eq!(l.reservation_count(), 0);
        let fx = send(
            &mut l,
            2,
            2000,
            reserve(3, 16 * GIB),
            now + Duration::from_secs(31),
        );
        match &replies(&fx)[0] {
            ServerMessage::Granted { grant, .. } => assert!(grant.id.0 > id.0, "ids not reused"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_token_and_the_holders_user_reclaim_and_nothing_changes() {
        let now = Instant::now();
        let (mut l, id, token) = restarted(now);
        let reclaim = |tag, token: &str| ClientMessage::Reclaim {
            tag,
            id,
            token: token.into(),
        };
        let fx = send(
            &mut l,
            5,
            1000,
            reclaim(1, "00000000000000000000000000000000"),
            now,
        );
        assert_eq!(kind(&replies(&fx)[0]), Some(ErrorKind::PermissionDenied));
        let fx = send(&mut l, 6, 2000, reclaim(2, &token), now);
        assert_eq!(kind(&replies(&fx)[0]), Some(ErrorKind::PermissionDenied));
        let fx = send(&mut l, 7, 1000, reclaim(3, &token), now);
        match &replies(&fx)[0] {
            ServerMessage::Granted { tag: 3, grant } => {
                assert_eq!((grant.id, grant.bytes, grant.device), (id, 16 * GIB, 0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.held_for_reclaim(), 0);
        assert_eq!(l.next_wakeup(now), None);
        // Taken: nobody else may, not even with the token.
        let fx = send(&mut l, 8, 1000, reclaim(4, &token), now);
        assert_eq!(kind(&replies(&fx)[0]), Some(ErrorKind::NotFound));
        let s = l.reservation_status(now);
        assert_eq!(s.len(), 1);
        let r = &s[0];
        assert_eq!(
            (r.label.as_deref(), r.priority, r.pid, r.uid),
            (Some("model"), 3, 1100, 1000)
        );
        assert!(r.idle, "its idle state comes back with it");
        assert!(r.age_ms >= 5000);
        // The grace period ending drops nothing that was reclaimed.
        l.apply(Input::Tick, now + Duration::from_secs(60));
        assert_eq!(l.reservation_count(), 1);
        // It is the new connection's: released when it closes.
        l.apply(
            Input::Disconnect { conn: ConnId(7) },
            now + Duration::from_secs(61),
        );
        assert_eq!(l.reservation_count(), 0);
    }

    #[test]
    fn root_may_reclaim_and_a_bad_snapshot_restores_nothing() {
        let now = Instant::now();
        let (mut l, id, token) = restarted(now);
        let fx = send(
            &mut l,
            9,
            0,
            ClientMessage::Reclaim { tag: 1, id, token },
            now,
        );
        assert!(matches!(replies(&fx)[0], ServerMessage::Granted { .. }));

        let mut l = ledger(now);
        let report = l.restore(
            Snapshot {
                next_id: 1,
                token_key: "not hex".into(),
                reservations: vec![],
            },
            now,
        );
        assert_eq!(report.held, 0);
        assert_eq!(report.dropped.len(), 1);
        let mut snap = restarted(now).0.snapshot(now);
        snap.reservations[0].device_uuid = "GPU-gone".into();
        let report = l.restore(snap, now);
        assert_eq!(report.held, 0);
        assert!(
            report.dropped[0].contains("GPU-gone"),
            "{:?}",
            report.dropped
        );
    }

    #[test]
    fn enabling_late_gives_the_tokens_of_what_is_held() {
        let now = Instant::now();
        let mut l = ledger(now);
        let fx = send(&mut l, 1, 1000, reserve(1, GIB), now);
        assert_eq!(replies(&fx).len(), 1, "no token unless asked");
        assert!(
            l.snapshot(now).reservations.is_empty(),
            "what cannot be reclaimed is not saved"
        );
        let fx = send(
            &mut l,
            1,
            1000,
            ClientMessage::EnableReclaim { tag: 7 },
            now,
        );
        match &replies(&fx)[..] {
            [
                ServerMessage::ReclaimEnabled { .. },
                ServerMessage::ReclaimToken { tag: 7, id, token },
            ] => {
                assert_eq!(*token, l.reclaim_token(*id));
                assert_eq!(token.len(), 32);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.snapshot(now).reservations.len(), 1);
        assert_ne!(
            l.reclaim_token(ReservationId(1)),
            l.reclaim_token(ReservationId(2))
        );
        let other_key = ledger(now).with_reclaim(0x4321, Duration::ZERO);
        assert_ne!(
            l.reclaim_token(ReservationId(1)),
            other_key.reclaim_token(ReservationId(1))
        );
    }
}
