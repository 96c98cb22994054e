//! Tests of the ledger, every event made through [`Ledger::apply`]: the
//! [`Drive`] shim gives each kind of event the shape of a call and keeps the
//! effects the older per-event tests assert on; `apply_*` tests pin the
//! replies and log events themselves.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use vramd_protocol::{DeviceSelector, GpuProcess, StatusReport};

/// Each kind of event as a call, made through `apply`. The effects returned
/// are those about requests and evictions (grants, queue moves, failures,
/// eviction asks); replies and log events are pinned by the `apply_*` tests.
trait Drive {
    fn reserve(
        &mut self,
        conn: ConnId,
        peer: Peer,
        req: ReserveRequest,
        now: Instant,
    ) -> Vec<Effect>;
    fn release(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        now: Instant,
    ) -> Result<(Released, Vec<Effect>), LedgerError>;
    fn cancel(&mut self, conn: ConnId, tag: u64, now: Instant) -> (u32, Vec<Effect>);
    fn disconnect(&mut self, conn: ConnId, now: Instant) -> (Vec<Released>, Vec<Effect>);
    fn set_reading(
        &mut self,
        index: usize,
        r: Reading,
        taken_at: Instant,
        now: Instant,
    ) -> Vec<Effect>;
    fn set_fault(&mut self, index: usize, fault: String, now: Instant) -> Vec<Effect>;
    fn attach_pids(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        pids: &[u32],
        now: Instant,
    ) -> Result<(Vec<u32>, Vec<Effect>), LedgerError>;
    fn set_idle(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        idle: bool,
        now: Instant,
    ) -> Result<Vec<Effect>, LedgerError>;
    fn tick(&mut self, now: Instant) -> Vec<Effect>;
}

/// Effects about requests and evictions, without replies and log events.
fn decisions(effects: Vec<Effect>) -> Vec<Effect> {
    effects
        .into_iter()
        .filter(|e| {
            !matches!(
                e,
                Effect::Reply { .. }
                    | Effect::Released { .. }
                    | Effect::RefreshReadings
                    | Effect::Log(_)
            )
        })
        .collect()
}

/// The `not_found` answer of a request about a reservation not held, if any.
fn not_held(effects: &[Effect], id: ReservationId) -> Option<LedgerError> {
    effects.iter().find_map(|e| match e {
        Effect::Reply {
            msg:
                ServerMessage::Error {
                    kind: ErrorKind::NotFound,
                    ..
                },
            ..
        } => Some(LedgerError::NotHeld(id)),
        _ => None,
    })
}

fn released_of(effects: &[Effect]) -> Vec<Released> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Released { released, .. } => Some(released.clone()),
            _ => None,
        })
        .collect()
}

fn request(l: &mut Ledger, conn: ConnId, msg: ClientMessage, now: Instant) -> Vec<Effect> {
    let peer = Peer {
        pid: 1,
        uid: 1000,
        gid: 1000,
        admin: false,
    };
    l.apply(Input::Request { conn, peer, msg }, now)
}

impl Drive for Ledger {
    fn reserve(
        &mut self,
        conn: ConnId,
        peer: Peer,
        req: ReserveRequest,
        now: Instant,
    ) -> Vec<Effect> {
        let msg = ClientMessage::Reserve(req);
        decisions(self.apply(Input::Request { conn, peer, msg }, now))
    }

    fn release(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        now: Instant,
    ) -> Result<(Released, Vec<Effect>), LedgerError> {
        let e = request(self, conn, ClientMessage::Release { tag: 0, id }, now);
        if let Some(err) = not_held(&e, id) {
            return Err(err);
        }
        let released = released_of(&e).pop().expect("a release is logged");
        Ok((released, decisions(e)))
    }

    fn cancel(&mut self, conn: ConnId, tag: u64, now: Instant) -> (u32, Vec<Effect>) {
        let e = request(self, conn, ClientMessage::Cancel { tag }, now);
        let count = e
            .iter()
            .find_map(|e| match e {
                Effect::Reply {
                    msg: ServerMessage::Cancelled { count, .. },
                    ..
                } => Some(*count),
                _ => None,
            })
            .expect("cancel is answered");
        (count, decisions(e))
    }

    fn disconnect(&mut self, conn: ConnId, now: Instant) -> (Vec<Released>, Vec<Effect>) {
        let e = self.apply(Input::Disconnect { conn }, now);
        (released_of(&e), decisions(e))
    }

    fn set_reading(
        &mut self,
        index: usize,
        r: Reading,
        taken_at: Instant,
        now: Instant,
    ) -> Vec<Effect> {
        let input = Input::Reading {
            device: index,
            taken_at,
            result: Ok(r),
        };
        decisions(self.apply(input, now))
    }

    fn set_fault(&mut self, index: usize, fault: String, now: Instant) -> Vec<Effect> {
        let input = Input::Reading {
            device: index,
            taken_at: now,
            result: Err(fault),
        };
        decisions(self.apply(input, now))
    }

    fn attach_pids(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        pids: &[u32],
        now: Instant,
    ) -> Result<(Vec<u32>, Vec<Effect>), LedgerError> {
        let msg = ClientMessage::AttachPids {
            tag: 0,
            id,
            pids: pids.to_vec(),
        };
        let e = request(self, conn, msg, now);
        if let Some(err) = not_held(&e, id) {
            return Err(err);
        }
        let all = e
            .iter()
            .find_map(|e| match e {
                Effect::Reply {
                    msg: ServerMessage::Attached { pids, .. },
                    ..
                } => Some(pids.clone()),
                _ => None,
            })
            .expect("attach is answered");
        Ok((all, decisions(e)))
    }

    fn set_idle(
        &mut self,
        conn: ConnId,
        id: ReservationId,
        idle: bool,
        now: Instant,
    ) -> Result<Vec<Effect>, LedgerError> {
        let e = request(self, conn, ClientMessage::SetIdle { tag: 0, id, idle }, now);
        match not_held(&e, id) {
            Some(err) => Err(err),
            None => Ok(decisions(e)),
        }
    }

    fn tick(&mut self, now: Instant) -> Vec<Effect> {
        decisions(self.apply(Input::Tick, now))
    }
}

const G: u64 = 1 << 30;

fn spec(index: u32, total_bytes: u64) -> DeviceSpec {
    DeviceSpec {
        index,
        uuid: format!("SIM-{index}"),
        name: "sim".into(),
        total_bytes,
    }
}

fn sim(totals: &[u64]) -> Ledger {
    Ledger::new(
        LedgerConfig::default(),
        totals
            .iter()
            .enumerate()
            .map(|(i, &t)| spec(i as u32, t))
            .collect(),
        ReadingSource::Simulated,
        Instant::now(),
    )
}

fn peer(pid: u32) -> Peer {
    Peer {
        pid,
        uid: 1000,
        gid: 1000,
        admin: false,
    }
}

fn req(tag: u64, bytes: u64) -> ReserveRequest {
    ReserveRequest {
        tag,
        bytes,
        device: DeviceSelector::Any,
        priority: 0,
        label: None,
        timeout_ms: None,
        evictable: false,
    }
}

fn granted(effects: &[Effect]) -> Vec<(ConnId, u64, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Granted {
                conn, tag, grant, ..
            } => Some((*conn, *tag, grant.device)),
            _ => None,
        })
        .collect()
}

fn failed(effects: &[Effect]) -> Vec<(u64, ErrorKind)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Failed { tag, kind, .. } => Some((*tag, *kind)),
            _ => None,
        })
        .collect()
}

fn grant_id(effects: &[Effect]) -> ReservationId {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Granted { grant, .. } => Some(grant.id),
            _ => None,
        })
        .expect("a grant")
}

#[test]
fn grants_what_fits_and_queues_the_rest_until_release() {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    let a = l.reserve(ConnId(1), peer(1), req(1, 16 * G), t0);
    assert_eq!(granted(&a), vec![(ConnId(1), 1, 0)]);
    let b = l.reserve(ConnId(2), peer(2), req(1, 10 * G), t0);
    assert!(granted(&b).is_empty());
    assert!(b.contains(&Effect::Queued {
        conn: ConnId(2),
        tag: 1,
        id: ReservationId(2),
        position: 1
    }));
    assert_eq!(l.available(0), 8 * G);
    let r = l.release(ConnId(1), grant_id(&a), t0).unwrap().1;
    assert_eq!(granted(&r), vec![(ConnId(2), 1, 0)]);
    assert_eq!(l.available(0), 14 * G);
}

#[test]
fn release_of_someone_elses_reservation_is_refused() {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    let id = grant_id(&l.reserve(ConnId(1), peer(1), req(1, G), t0));
    assert_eq!(l.release(ConnId(2), id, t0), Err(LedgerError::NotHeld(id)));
    assert_eq!(l.reservation_count(), 1);
}

#[test]
fn impossible_and_unknown_device_requests_are_refused_at_once() {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G, 8 * G]);
    let e = l.reserve(ConnId(1), peer(1), req(1, 25 * G), t0);
    assert_eq!(failed(&e), vec![(1, ErrorKind::Refused)]);
    let mut r = req(2, 9 * G);
    r.device = DeviceSelector::Index(1);
    assert_eq!(
        failed(&l.reserve(ConnId(1), peer(1), r, t0)),
        vec![(2, ErrorKind::Refused)]
    );
    let mut r = req(3, G);
    r.device = DeviceSelector::Index(7);
    let e = l.reserve(ConnId(1), peer(1), r, t0);
    assert!(
        matches!(&e[0], Effect::Failed { kind: ErrorKind::Refused, message, .. } if message.contains("no device 7"))
    );
    assert_eq!(
        failed(&l.reserve(ConnId(1), peer(1), req(4, 0), t0)),
        vec![(4, ErrorKind::Refused)]
    );
    assert_eq!(l.waiter_count(), 0);
    assert_eq!(l.counters().refusals, 4);
}

#[test]
fn priority_then_arrival_decides_who_is_granted() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let hold = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 10 * G), t0));
    let low = req(1, 6 * G);
    let mut high = req(1, 6 * G);
    high.priority = 5;
    l.reserve(ConnId(2), peer(2), low, t0);
    l.reserve(ConnId(3), peer(3), high, t0);
    let e = l.release(ConnId(1), hold, t0).unwrap().1;
    assert_eq!(granted(&e), vec![(ConnId(3), 1, 0)]);
}

#[test]
fn aging_lets_a_long_waiter_overtake_a_newer_higher_priority_one() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let hold = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 10 * G), t0));
    l.reserve(ConnId(2), peer(2), req(1, 6 * G), t0);
    let t1 = t0 + Duration::from_secs(25); // +2 steps of aging
    let mut high = req(1, 6 * G);
    high.priority = 1;
    l.reserve(ConnId(3), peer(3), high, t1);
    let e = l.release(ConnId(1), hold, t1).unwrap().1;
    assert_eq!(granted(&e), vec![(ConnId(2), 1, 0)]);
}

#[test]
fn backfill_until_the_starvation_guard_then_room_is_kept() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let a = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 6 * G), t0));
    // A big request waits; a small one backfills beside the holder.
    l.reserve(ConnId(2), peer(2), req(1, 8 * G), t0);
    let e = l.reserve(ConnId(3), peer(3), req(1, 2 * G), t0);
    assert_eq!(granted(&e), vec![(ConnId(3), 1, 0)]);
    // Past the guard, a new small request no longer gets ahead.
    let late = t0 + l.config().starvation_guard;
    let e = l.reserve(ConnId(4), peer(4), req(1, G), late);
    assert!(granted(&e).is_empty(), "{e:?}");
    // Once the holder leaves, the big one goes first (6+2 freed → 8 fits).
    let e = l.release(ConnId(1), a, late).unwrap().1;
    assert_eq!(granted(&e)[0], (ConnId(2), 1, 0));
}

#[test]
fn wait_limits_expire_and_zero_means_try_once() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    l.reserve(ConnId(1), peer(1), req(1, 10 * G), t0);
    let mut r = req(7, G);
    r.timeout_ms = Some(0);
    assert_eq!(
        failed(&l.reserve(ConnId(2), peer(2), r, t0)),
        vec![(7, ErrorKind::Timeout)]
    );
    let mut r = req(8, G);
    r.timeout_ms = Some(500);
    l.reserve(ConnId(2), peer(2), r, t0);
    assert_eq!(l.next_wakeup(t0), Some(t0 + Duration::from_millis(500)));
    assert!(failed(&l.tick(t0 + Duration::from_millis(499))).is_empty());
    assert_eq!(
        failed(&l.tick(t0 + Duration::from_millis(500))),
        vec![(8, ErrorKind::Timeout)]
    );
    assert_eq!(l.counters().timeouts, 2);
    assert_eq!(l.waiter_count(), 0);
}

#[test]
fn cancel_and_disconnect_withdraw_and_grant_the_next() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    l.reserve(ConnId(1), peer(1), req(1, 8 * G), t0);
    l.reserve(ConnId(1), peer(1), req(2, 2 * G), t0);
    l.reserve(ConnId(2), peer(2), req(1, 5 * G), t0);
    l.reserve(ConnId(3), peer(3), req(1, 4 * G), t0);
    let (n, _) = l.cancel(ConnId(2), 1, t0);
    assert_eq!(n, 1);
    assert_eq!(l.cancel(ConnId(2), 1, t0).0, 0);
    let (released, e) = l.disconnect(ConnId(1), t0);
    assert_eq!(released.len(), 2);
    assert_eq!(granted(&e), vec![(ConnId(3), 1, 0)]);
    assert_eq!(l.counters().disconnect_releases, 2);
}

#[test]
fn positions_are_pushed_when_they_change() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let hold = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 10 * G), t0));
    l.reserve(ConnId(2), peer(2), req(1, 9 * G), t0);
    l.reserve(ConnId(3), peer(3), req(1, 9 * G), t0);
    let mut urgent = req(1, 9 * G);
    urgent.priority = 9;
    let e = l.reserve(ConnId(4), peer(4), urgent, t0);
    let queued: Vec<_> = e
        .iter()
        .filter_map(|e| match e {
            Effect::Queued { conn, position, .. } => Some((conn.0, *position)),
            _ => None,
        })
        .collect();
    assert_eq!(queued, vec![(4, 1), (2, 2), (3, 3)]);
    let e = l.release(ConnId(1), hold, t0).unwrap().1;
    assert_eq!(granted(&e), vec![(ConnId(4), 1, 0)]);
    assert!(e.contains(&Effect::Queued {
        conn: ConnId(2),
        tag: 1,
        id: ReservationId(2),
        position: 1
    }));
}

#[test]
fn spread_and_pack_placement() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G, 20 * G]);
    assert_eq!(
        granted(&l.reserve(ConnId(1), peer(1), req(1, G), t0))[0].2,
        1
    );
    let mut l = sim(&[10 * G, 20 * G]);
    l.config.placement = Placement::Pack;
    assert_eq!(
        granted(&l.reserve(ConnId(1), peer(1), req(1, G), t0))[0].2,
        0
    );
}

fn measured(used: u64, procs: Option<Vec<(u32, u64)>>) -> Reading {
    Reading {
        used_bytes: used,
        processes: procs.map(|v| {
            v.into_iter()
                .map(|(pid, bytes)| ProcessUsage::new(pid, bytes))
                .collect()
        }),
    }
}

fn measured_ledger(totals: &[u64]) -> Ledger {
    Ledger::new(
        LedgerConfig::default(),
        totals
            .iter()
            .enumerate()
            .map(|(i, &t)| spec(i as u32, t))
            .collect(),
        ReadingSource::Measured(Reading {
            used_bytes: 0,
            processes: Some(vec![]),
        }),
        Instant::now(),
    )
}

fn ms(t: Instant, n: u64) -> Instant {
    t + Duration::from_millis(n)
}

#[test]
fn accounting_sees_outsiders_counts_overuse_and_never_double_counts() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G]);
    // An outside process uses 10 GiB without a reservation.
    l.set_reading(0, measured(10 * G, Some(vec![(99, 10 * G)])), t0, t0);
    assert_eq!(l.available(0), 14 * G);
    // A client reserves 4 GiB: counted in full before it loads.
    l.reserve(ConnId(1), peer(1), req(1, 4 * G), t0);
    assert_eq!(l.available(0), 10 * G);
    // Its process loads 3 GiB: still 4 (max of reserved and actual), not 7.
    let r = measured(13 * G, Some(vec![(99, 10 * G), (1, 3 * G)]));
    l.set_reading(0, r, t0, t0);
    assert_eq!(l.available(0), 10 * G);
    // It grows to 6 GiB: counted at its real usage, and flagged.
    let r = measured(16 * G, Some(vec![(99, 10 * G), (1, 6 * G)]));
    l.set_reading(0, r, t0, t0);
    assert_eq!(l.available(0), 8 * G);
    let st = l.reservation_status(t0);
    assert_eq!((st[0].actual_bytes, st[0].over_reserved), (6 * G, true));
    assert_eq!(l.device_status()[0].unattributed_bytes, 10 * G);
    // A second reservation by the same process: one group, no double count.
    l.reserve(ConnId(1), peer(1), req(2, G), t0);
    assert_eq!(l.available(0), 8 * G);
    // Without per-process usage: used + Σ reserved (cautious).
    l.set_reading(0, measured(16 * G, None), t0, t0);
    assert_eq!(l.available(0), 24 * G - 16 * G - 5 * G);
    let ds = &l.device_status()[0];
    assert!(!ds.per_process_usage);
    assert!(ds.note.as_deref().unwrap().contains("cautious"));
}

#[test]
fn memory_still_in_use_after_release_keeps_blocking_until_read_free() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G]);
    let id = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 20 * G), t0));
    let busy = || measured(20 * G, Some(vec![(1, 20 * G)]));
    l.set_reading(0, busy(), ms(t0, 1), ms(t0, 1));
    l.reserve(ConnId(2), peer(2), req(1, 10 * G), ms(t0, 2));
    // Released, but the process has not freed its memory yet: no grant.
    assert!(granted(&l.release(ConnId(1), id, ms(t0, 3)).unwrap().1).is_empty());
    let e = l.set_reading(0, busy(), ms(t0, 4), ms(t0, 4));
    assert!(granted(&e).is_empty());
    // The reading shows it freed: granted.
    let e = l.set_reading(0, measured(0, Some(vec![])), ms(t0, 5), ms(t0, 5));
    assert_eq!(granted(&e), vec![(ConnId(2), 1, 0)]);
}

#[test]
fn a_reading_taken_before_a_release_cannot_free_its_memory() {
    // The last reading was taken before the holder loaded its model. After
    // the release, that stale reading must not be trusted to show the room.
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G]);
    let id = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 20 * G), t0));
    l.reserve(ConnId(2), peer(2), req(1, 10 * G), ms(t0, 1));
    let (_, e) = l.release(ConnId(1), id, ms(t0, 10)).unwrap();
    assert!(
        granted(&e).is_empty(),
        "granted on a reading older than the release"
    );
    // A reading taken before the release, delivered late: still no grant.
    let e = l.set_reading(0, measured(0, Some(vec![])), ms(t0, 9), ms(t0, 11));
    assert!(granted(&e).is_empty());
    // The first reading taken after the release decides.
    let e = l.set_reading(0, measured(0, Some(vec![])), ms(t0, 12), ms(t0, 12));
    assert_eq!(granted(&e), vec![(ConnId(2), 1, 0)]);
}

#[test]
fn readings_early_late_or_never() {
    let t0 = Instant::now();
    // Never: no reading since start; reservations count by their bytes.
    let mut l = measured_ledger(&[24 * G]);
    l.reserve(ConnId(1), peer(1), req(1, 8 * G), t0);
    assert_eq!(l.available(0), 16 * G);
    // Early: the process already used memory before it reserved (the reading
    // predates the grant): its usage is attributed, not counted twice.
    let mut l = measured_ledger(&[24 * G]);
    l.set_reading(0, measured(6 * G, Some(vec![(1, 6 * G)])), t0, t0);
    assert_eq!(l.available(0), 18 * G);
    l.reserve(ConnId(1), peer(1), req(1, 8 * G), ms(t0, 1));
    assert_eq!(l.available(0), 16 * G);
    // Late: after its connection closed, its process still shows usage:
    // counted as unattributed until it is read free.
    l.disconnect(ConnId(1), ms(t0, 2));
    let r = measured(6 * G, Some(vec![(1, 6 * G)]));
    l.set_reading(0, r, ms(t0, 3), ms(t0, 3));
    assert_eq!(l.available(0), 18 * G);
    assert_eq!(l.device_status()[0].unattributed_bytes, 6 * G);
    l.set_reading(0, measured(0, Some(vec![])), ms(t0, 4), ms(t0, 4));
    assert_eq!(l.available(0), 24 * G);
}

#[test]
fn descendants_and_attached_pids_count_against_the_reservation() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G]);
    let id = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 8 * G), t0));
    // A child of the client (pid 50, parent 1) uses 5 GiB: inside the 8 reserved.
    let child = ProcessUsage {
        pid: 50,
        bytes: 5 * G,
        ancestors: vec![1],
        uid: 0,
    };
    let r = Reading {
        used_bytes: 5 * G,
        processes: Some(vec![child.clone()]),
    };
    l.set_reading(0, r, t0, t0);
    assert_eq!(l.available(0), 16 * G);
    assert_eq!(l.reservation_status(t0)[0].actual_bytes, 5 * G);
    // An unrelated process 77 uses 4 GiB: unattributed, until it is attached.
    let r = Reading {
        used_bytes: 9 * G,
        processes: Some(vec![child, ProcessUsage::new(77, 4 * G)]),
    };
    l.set_reading(0, r, t0, t0);
    assert_eq!(l.available(0), 12 * G);
    assert_eq!(
        l.attach_pids(ConnId(2), id, &[77], t0),
        Err(LedgerError::NotHeld(id))
    );
    let (pids, _) = l.attach_pids(ConnId(1), id, &[77], t0).unwrap();
    assert_eq!(pids, vec![1, 77]);
    // Now 9 GiB actual against 8 reserved: counted at 9, flagged.
    assert_eq!(l.available(0), 15 * G);
    assert!(l.reservation_status(t0)[0].over_reserved);
}

#[test]
fn an_unhealthy_device_takes_no_new_grants_and_recovers() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G, 24 * G]);
    let held = l.reserve(ConnId(1), peer(1), req(1, 4 * G), t0);
    assert_eq!(granted(&held)[0].2, 0);
    l.set_fault(0, "GPU is lost".into(), t0);
    assert!(!l.is_healthy(0));
    assert_eq!(l.reservation_count(), 1, "reservations are kept");
    let mut r = req(2, G);
    r.device = DeviceSelector::Index(0);
    let e = l.reserve(ConnId(2), peer(2), r.clone(), t0);
    assert!(
        matches!(&e[0], Effect::Failed { kind: ErrorKind::Unavailable, message, .. } if message.contains("GPU is lost")),
        "{e:?}"
    );
    // "any" goes to the healthy device.
    assert_eq!(
        granted(&l.reserve(ConnId(2), peer(2), req(3, 20 * G), t0))[0].2,
        1
    );
    let ds = l.device_status();
    assert!(!ds[0].healthy && ds[0].available_bytes == 0);
    l.set_reading(0, measured(0, Some(vec![])), ms(t0, 1), ms(t0, 1));
    assert!(l.is_healthy(0));
    assert_eq!(
        granted(&l.reserve(ConnId(2), peer(2), r, ms(t0, 2))).len(),
        1
    );
}

#[test]
fn cushion_is_kept_free() {
    let t0 = Instant::now();
    let mut l = Ledger::new(
        LedgerConfig {
            cushion_bytes: G,
            ..LedgerConfig::default()
        },
        vec![spec(0, 10 * G)],
        ReadingSource::Simulated,
        Instant::now(),
    );
    assert_eq!(
        failed(&l.reserve(ConnId(1), peer(1), req(1, 10 * G), t0)),
        vec![(1, ErrorKind::Refused)]
    );
    assert_eq!(
        granted(&l.reserve(ConnId(1), peer(1), req(2, 9 * G), t0)).len(),
        1
    );
    assert_eq!(l.available(0), 0);
}

// ---- property tests -------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Reserve {
        conn: u64,
        bytes: u64,
        device: Option<u32>,
        priority: i32,
        timeout_ms: Option<u64>,
        evictable: bool,
    },
    Release {
        conn: u64,
        nth: usize,
    },
    Cancel {
        conn: u64,
        nth: usize,
    },
    Disconnect {
        conn: u64,
    },
    Tick,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..5, 1u64..24, proptest::option::of(0u32..3), -2i32..3, proptest::option::of(0u64..60_000), any::<bool>())
            .prop_map(|(conn, bytes, device, priority, timeout_ms, evictable)| Op::Reserve { conn, bytes: bytes * G, device, priority, timeout_ms, evictable }),
        3 => (0u64..5, 0usize..4).prop_map(|(conn, nth)| Op::Release { conn, nth }),
        1 => (0u64..5, 0usize..4).prop_map(|(conn, nth)| Op::Cancel { conn, nth }),
        1 => (0u64..5).prop_map(|conn| Op::Disconnect { conn }),
        2 => Just(Op::Tick),
    ]
}

/// What the test knows of each request it made, by (conn, tag).
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    Waiting,
    Held(ReservationId),
    Done,
}

pub(crate) fn check_invariants(l: &Ledger, now: Instant) -> Result<(), TestCaseError> {
    // The sums and indices kept as reservations come and go match a walk.
    for d in 0..l.devices.len() {
        let on_d = l.reservations.values().filter(|r| r.device == d);
        prop_assert_eq!(l.reserved(d), on_d.clone().map(|r| r.bytes).sum::<u64>());
        prop_assert_eq!(
            l.devices[d]
                .reservations
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            on_d.map(|r| r.id).collect::<Vec<_>>()
        );
    }
    let mut per_uid: HashMap<u32, u64> = HashMap::new();
    for r in l.reservations.values() {
        *per_uid.entry(r.peer.uid).or_default() += r.bytes;
    }
    prop_assert_eq!(&l.held_by_uid, &per_uid);
    let mut count_per_uid: HashMap<u32, usize> = HashMap::new();
    for r in l.reservations.values() {
        *count_per_uid.entry(r.peer.uid).or_default() += 1;
    }
    prop_assert_eq!(&l.held_count_by_uid, &count_per_uid);
    let idle: BTreeSet<ReservationId> = l
        .reservations
        .values()
        .filter(|r| r.idle_unasked())
        .map(|r| r.id)
        .collect();
    prop_assert_eq!(&l.idle_unasked, &idle);
    for d in 0..l.devices.len() {
        prop_assert!(
            l.reserved(d) <= l.capacity(d),
            "device {d} overcommitted: {} > {}",
            l.reserved(d),
            l.capacity(d)
        );
    }
    // Work conservation: a waiter that fits is held back only by a starved
    // waiter ahead of it on that device.
    let order: Vec<&Waiter> = l.queue.iter().map(|(_, w)| w).collect();
    for (pos, w) in order.iter().enumerate() {
        // Every waiter knows its exact position after each event.
        prop_assert_eq!(
            w.told_position as usize,
            pos + 1,
            "stale position of {:?}",
            w.id
        );
        // A waiter is starved from `arrived + starvation_guard` (with an
        // adaptive guard, its own guard: checked by its property test).
        if l.config.adaptive_guard.is_none() {
            prop_assert_eq!(w.starved_at, w.arrived + l.config.starvation_guard);
        }
        for &d in &w.candidates {
            if l.available(d) >= w.bytes {
                let held_back = order[..pos].iter().any(|s| {
                    now >= s.starved_at && s.candidates.contains(&d) && l.capacity(d) >= s.bytes
                });
                prop_assert!(held_back, "waiter {:?} fits on {d} but waits", w.id);
            }
        }
    }
    prop_assert_eq!(
        l.counters.grants - l.counters.releases,
        l.reservations.len() as u64
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_every_invariant(
        totals in proptest::collection::vec(8u64..40, 1..3),
        ops in proptest::collection::vec((arb_op(), 0u64..20_000), 1..60),
        fixed_guard in proptest::bool::ANY,
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut l = sim(&totals.iter().map(|t| t * G).collect::<Vec<_>>());
        // The default (adaptive) guard, or the fixed one it replaced.
        if fixed_guard {
            l.config.adaptive_guard = None;
        }
        let mut fates: BTreeMap<(u64, u64), Fate> = BTreeMap::new();
        let mut prio: BTreeMap<ReservationId, (i32, Instant)> = BTreeMap::new();
        let mut next_tag = 1u64;
        let mut live: BTreeSet<u64> = BTreeSet::new();
        for (op, advance_ms) in ops {
            now += Duration::from_millis(advance_ms);
            let effects = match op {
                Op::Reserve { conn, bytes, device, priority, timeout_ms, evictable } => {
                    live.insert(conn);
                    let tag = next_tag;
                    next_tag += 1;
                    fates.insert((conn, tag), Fate::Waiting);
                    let r = ReserveRequest {
                        tag, bytes,
                        device: device.map_or(DeviceSelector::Any, DeviceSelector::Index),
                        priority, label: None, timeout_ms, evictable,
                    };
                    prio.insert(ReservationId(l.next_id), (priority, now));
                    l.reserve(ConnId(conn), Peer { uid: 1000 + (conn % 2) as u32, ..peer(conn as u32 + 100) }, r, now)
                }
                Op::Release { conn, nth } => {
                    let held: Vec<ReservationId> = fates.iter().filter_map(|((c, _), f)| match f {
                        Fate::Held(id) if *c == conn => Some(*id), _ => None }).collect();
                    match held.get(nth) {
                        Some(&id) => {
                            let key = *fates.iter().find(|(_, f)| **f == Fate::Held(id)).unwrap().0;
                            fates.insert(key, Fate::Done);
                            l.release(ConnId(conn), id, now).expect("held reservation releases").1
                        }
                        None => {
                            // Releasing what it does not hold is an error and changes nothing.
                            let before = l.reservation_count();
                            prop_assert!(l.release(ConnId(conn), ReservationId(u64::MAX), now).is_err());
                            prop_assert_eq!(before, l.reservation_count());
                            // Aging can reorder the queue while nothing happens;
                            // the daemon ticks for that (next_wakeup).
                            l.tick(now)
                        }
                    }
                }
                Op::Cancel { conn, nth } => {
                    let waiting: Vec<u64> = fates.iter().filter_map(|((c, t), f)| (*c == conn && *f == Fate::Waiting).then_some(*t)).collect();
                    let tag = waiting.get(nth).copied().unwrap_or(u64::MAX);
                    let (n, e) = l.cancel(ConnId(conn), tag, now);
                    prop_assert_eq!(n as usize, usize::from(waiting.get(nth).is_some()));
                    if n == 1 { fates.insert((conn, tag), Fate::Done); e } else { l.tick(now) }
                }
                Op::Disconnect { conn } => {
                    live.remove(&conn);
                    let (released, mut e) = l.disconnect(ConnId(conn), now);
                    if released.is_empty() && e.is_empty() {
                        e = l.tick(now);
                    }
                    for ((c, _), f) in fates.iter_mut() { if *c == conn { *f = Fate::Done; } }
                    // Nothing of the closed connection remains.
                    prop_assert!(l.reservations.values().all(|r| r.conn != ConnId(conn)));
                    prop_assert!(l.queue.iter().all(|(_, w)| w.conn != ConnId(conn)));
                    e
                }
                Op::Tick => l.tick(now),
            };
            for e in &effects {
                match e {
                    Effect::Granted { conn, tag, grant, .. } => {
                        let f = fates.get_mut(&(conn.0, *tag)).expect("grant for a known request");
                        prop_assert_eq!(&*f, &Fate::Waiting, "granted twice or after it ended");
                        *f = Fate::Held(grant.id);
                        // Starvation guard: no starved waiter that could use this
                        // device and ranks ahead of this grant is still waiting.
                        let d = l.devices.iter().position(|x| x.spec.index == grant.device).unwrap();
                        let (p, arrived) = prio[&grant.id];
                        let granted_key = l.order_key(p, arrived, grant.id);
                        for (_, s) in l.queue.iter() {
                            // Its own guard (the fixed one, or its adaptive one).
                            let starved = now >= s.starved_at;
                            let ahead = l.order_key(s.priority, s.arrived, s.id) < granted_key;
                            prop_assert!(!(starved && ahead && s.candidates.contains(&d) && l.capacity(d) >= s.bytes),
                                "grant {:?} jumped starved waiter {:?}", grant.id, s.id);
                        }
                    }
                    Effect::Failed { conn, tag, .. } => {
                        let f = fates.get_mut(&(conn.0, *tag)).expect("failure for a known request");
                        prop_assert_eq!(&*f, &Fate::Waiting);
                        *f = Fate::Done;
                    }
                    Effect::Queued { conn, tag, .. } => {
                        prop_assert_eq!(&fates[&(conn.0, *tag)], &Fate::Waiting);
                    }
                    Effect::Evict { id, conn, .. } => {
                        // Only idle, old-enough reservations of that holder are asked.
                        let r = l.reservations.get(id).expect("evicts a held reservation");
                        prop_assert!(r.idle && r.conn == *conn);
                        prop_assert!(now.saturating_duration_since(r.granted_at) >= l.config.min_residency);
                    }
                    Effect::EvictionFailed { .. } => {}
                    other => prop_assert!(false, "the shim keeps decisions only: {:?}", other),
                }
            }
            check_invariants(&l, now)?;
            // No orphans: the ledger's view matches the test's.
            let waiting = fates.values().filter(|f| **f == Fate::Waiting).count();
            let held = fates.values().filter(|f| matches!(f, Fate::Held(_))).count();
            prop_assert_eq!(waiting, l.waiter_count());
            prop_assert_eq!(held, l.reservation_count());
        }
        // Everyone leaves: the ledger is empty.
        for conn in live {
            l.disconnect(ConnId(conn), now);
        }
        prop_assert_eq!(l.reservation_count(), 0);
        prop_assert_eq!(l.waiter_count(), 0);
    }
}

// ---- eviction ---------------------------------------------------------------

fn evicting_ledger(totals: &[u64]) -> Ledger {
    let mut l = sim(totals);
    l.config.min_residency = Duration::ZERO;
    l.config.eviction_deadline = Duration::from_secs(5);
    l
}

fn idle_req(tag: u64, bytes: u64, priority: i32) -> ReserveRequest {
    let mut r = req(tag, bytes);
    r.priority = priority;
    r.evictable = true;
    r
}

fn evicted(effects: &[Effect]) -> Vec<ReservationId> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Evict { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn an_idle_holder_is_asked_to_unload_and_its_release_grants_the_waiter() {
    let t0 = Instant::now();
    let mut l = evicting_ledger(&[24 * G]);
    let idle = grant_id(&l.reserve(ConnId(1), peer(1), idle_req(1, 10 * G, 0), t0));
    let busy = grant_id(&l.reserve(ConnId(2), peer(2), req(1, 10 * G), t0));
    let e = l.reserve(ConnId(3), peer(3), req(1, 13 * G), t0);
    assert_eq!(evicted(&e), vec![idle], "only the idle one is asked");
    assert!(granted(&e).is_empty());
    // Nothing more is asked while that eviction is in flight.
    assert!(evicted(&l.tick(ms(t0, 10))).is_empty());
    let (_, e) = l.release(ConnId(1), idle, ms(t0, 20)).unwrap();
    assert_eq!(granted(&e), vec![(ConnId(3), 1, 0)]);
    assert_eq!(l.counters().evictions_requested, 1);
    assert_eq!(l.counters().evictions_completed, 1);
    let _ = busy;
}

#[test]
fn busy_holders_are_never_evicted_and_nothing_is_evicted_in_vain() {
    let t0 = Instant::now();
    let mut l = evicting_ledger(&[24 * G]);
    let idle = grant_id(&l.reserve(ConnId(1), peer(1), idle_req(1, 4 * G, 0), t0));
    l.reserve(ConnId(2), peer(2), req(1, 18 * G), t0);
    // 10 GiB needed, only 4 (+2 free) could be freed: nobody is asked.
    let e = l.reserve(ConnId(3), peer(3), req(1, 10 * G), t0);
    assert!(evicted(&e).is_empty());
    // Marking it busy then idle: asked only once it is idle and enough.
    l.set_idle(ConnId(1), idle, false, t0).unwrap();
    let e = l.reserve(ConnId(4), peer(4), req(1, 5 * G), t0);
    assert!(evicted(&e).is_empty(), "busy holder asked");
    let e = l.set_idle(ConnId(1), idle, true, t0).unwrap();
    assert_eq!(evicted(&e), vec![idle]);
    assert_eq!(l.counters().evictions_requested, 1);
}

#[test]
fn victims_are_the_fewest_from_the_lowest_priorities_oldest_first() {
    let t0 = Instant::now();
    let mut l = evicting_ledger(&[24 * G]);
    let a = grant_id(&l.reserve(ConnId(1), peer(1), idle_req(1, 4 * G, 0), t0));
    let b = grant_id(&l.reserve(ConnId(2), peer(2), idle_req(1, 4 * G, 0), ms(t0, 1)));
    let c = grant_id(&l.reserve(ConnId(3), peer(3), idle_req(1, 8 * G, 0), ms(t0, 2)));
    let hi = grant_id(&l.reserve(ConnId(4), peer(4), idle_req(1, 8 * G, 3), ms(t0, 3)));
    // Full. 8 GiB needed at priority 3: one 8 GiB victim of priority 0 (c),
    // not two 4 GiB ones, not the priority-3 holder.
    let e = l.reserve(ConnId(5), peer(5), idle_req(1, 8 * G, 3), ms(t0, 4));
    assert_eq!(evicted(&e), vec![c]);
    l.release(ConnId(3), c, ms(t0, 5)).unwrap();
    // 4 GiB needed: the older of a and b.
    let e = l.reserve(ConnId(6), peer(6), req(1, 4 * G), ms(t0, 6));
    assert_eq!(evicted(&e), vec![a]);
    // A fresh priority-0 waiter does not evict a priority-3 holder.
    l.release(ConnId(1), a, ms(t0, 7)).unwrap();
    let _ = (b, hi);
    let e = l.reserve(ConnId(7), peer(7), req(1, 12 * G), ms(t0, 8));
    assert!(evicted(&e).is_empty(), "{e:?}");
}

#[test]
fn a_waiter_evicts_a_higher_priority_idle_model_once_aged_up_to_it() {
    let t0 = Instant::now();
    let mut l = evicting_ledger(&[24 * G]);
    l.config.aging = Duration::from_secs(10);
    let hi = grant_id(&l.reserve(ConnId(1), peer(1), idle_req(1, 20 * G, 3), t0));
    let arrived = ms(t0, 100);
    let e = l.reserve(ConnId(2), peer(2), req(1, 10 * G), arrived);
    assert!(
        evicted(&e).is_empty(),
        "a fresh priority-0 waiter evicted a priority-3 model"
    );
    // Priority 0 + one per 10 s waited reaches 3 after 30 s: the daemon
    // wakes up at that moment, not before, and asks then.
    let at = arrived + Duration::from_secs(30);
    assert_eq!(l.next_wakeup(arrived), Some(at));
    assert!(evicted(&l.tick(at - Duration::from_millis(1))).is_empty());
    assert_eq!(evicted(&l.tick(at)), vec![hi]);
    let (_, e) = l
        .release(ConnId(1), hi, at + Duration::from_secs(1))
        .unwrap();
    assert_eq!(granted(&e), vec![(ConnId(2), 1, 0)]);
}

#[test]
fn young_reservations_are_kept_until_their_minimum_residency() {
    let t0 = Instant::now();
    let mut l = evicting_ledger(&[24 * G]);
    l.config.min_residency = Duration::from_secs(10);
    let idle = grant_id(&l.reserve(ConnId(1), peer(1), idle_req(1, 20 * G, 0), t0));
    let e = l.reserve(ConnId(2), peer(2), req(1, 10 * G), ms(t0, 100));
    assert!(evicted(&e).is_empty());
    // The daemon wakes up when the holder becomes evictable.
    assert_eq!(
        l.next_wakeup(ms(t0, 100)),
        Some(t0 + Duration::from_secs(10))
    );
    let e = l.tick(t0 + Duration::from_secs(10));
    assert_eq!(evicted(&e), vec![idle]);
}

#[test]
fn a_victim_that_misses_its_deadline_is_reported_and_the_next_is_asked() {
    let t0 = Instant::now();
    let mut l = evicting_ledger(&[24 * G]);
    let stuck = grant_id(&l.reserve(ConnId(1), peer(1), idle_req(1, 12 * G, 0), t0));
    let other = grant_id(&l.reserve(ConnId(2), peer(2), idle_req(1, 12 * G, 0), ms(t0, 1)));
    let e = l.reserve(ConnId(3), peer(3), req(1, 12 * G), ms(t0, 2));
    assert_eq!(evicted(&e), vec![stuck]);
    assert_eq!(
        l.next_wakeup(ms(t0, 3)),
        Some(ms(t0, 2) + Duration::from_secs(5))
    );
    let e = l.tick(ms(t0, 2) + Duration::from_secs(5));
    assert!(e.iter().any(|e| matches!(e, Effect::EvictionFailed { victim, .. } if victim == &format!("reservation {stuck}"))));
    assert_eq!(evicted(&e), vec![other]);
    assert_eq!(l.counters().evictions_failed, 1);
}

#[test]
fn per_user_limits_bound_what_one_user_holds_and_queues_but_not_admins() {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    l.config.max_queued_per_uid = 2;
    l.config.max_bytes_per_uid = Some(31 * G);
    l.reserve(ConnId(1), peer(1), req(1, 20 * G), t0);
    l.reserve(ConnId(1), peer(1), req(2, 5 * G), t0);
    l.reserve(ConnId(1), peer(1), req(3, 6 * G), t0);
    assert_eq!(l.waiter_count(), 2);
    // Third waiting request: over the queue limit.
    let e = l.reserve(ConnId(1), peer(1), req(4, G), t0);
    assert_eq!(failed(&e), vec![(4, ErrorKind::LimitExceeded)]);
    // Bytes: 20 held + 5 queued + 7 > 31.
    l.cancel(ConnId(1), 3, t0);
    let e = l.reserve(ConnId(1), peer(1), req(5, 7 * G), t0);
    assert!(
        matches!(&e[0], Effect::Failed { kind: ErrorKind::LimitExceeded, message, .. } if message.contains("per-user limit")),
        "{e:?}"
    );
    // Another user is not affected; an admin is exempt.
    let other = Peer {
        uid: 2000,
        ..peer(9)
    };
    assert!(failed(&l.reserve(ConnId(2), other, req(1, 4 * G), t0)).is_empty());
    let admin = Peer {
        uid: 1000,
        admin: true,
        ..peer(1)
    };
    assert!(failed(&l.reserve(ConnId(1), admin, req(6, 20 * G), t0)).is_empty());
}

#[test]
fn per_user_reservation_count_covers_held_and_waiting_but_not_admins() {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    l.config.max_reservations_per_uid = 3;
    // Two held, one waiting: the limit.
    assert_eq!(
        granted(&l.reserve(ConnId(1), peer(1), req(1, G), t0)).len(),
        1
    );
    assert_eq!(
        granted(&l.reserve(ConnId(1), peer(1), req(2, G), t0)).len(),
        1
    );
    l.reserve(ConnId(1), peer(1), req(3, 23 * G), t0);
    assert_eq!(l.waiter_count(), 1);
    let e = l.reserve(ConnId(2), peer(2), req(4, 1), t0);
    assert!(
        matches!(&e[0], Effect::Failed { kind: ErrorKind::LimitExceeded, message, .. } if message.contains("2 reservations and has 1 requests waiting")),
        "{e:?}"
    );
    // Cancelling the waiter makes room for one more.
    l.cancel(ConnId(1), 3, t0);
    assert_eq!(
        granted(&l.reserve(ConnId(2), peer(2), req(5, 1), t0)).len(),
        1
    );
    assert_eq!(
        failed(&l.reserve(ConnId(2), peer(2), req(6, 1), t0)),
        vec![(6, ErrorKind::LimitExceeded)]
    );
    let admin = Peer {
        admin: true,
        ..peer(1)
    };
    assert!(failed(&l.reserve(ConnId(3), admin, req(7, 1), t0)).is_empty());
}

// ---- apply: replies and log events ------------------------------------------

fn admin() -> Peer {
    Peer {
        pid: 7,
        uid: 0,
        gid: 0,
        admin: true,
    }
}

fn reserve_msg(tag: u64, bytes: u64, label: &str) -> ClientMessage {
    let mut r = req(tag, bytes);
    r.label = Some(label.into());
    ClientMessage::Reserve(r)
}

#[test]
fn apply_release_answers_then_logs_then_grants_what_it_made_room_for() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let (a, b) = (ConnId(1), ConnId(2));
    let id = grant_id(&request(&mut l, a, reserve_msg(1, 8 * G, "a"), t0));
    request(&mut l, b, reserve_msg(5, 8 * G, "b"), t0);
    let e = request(&mut l, a, ClientMessage::Release { tag: 9, id }, t0);
    assert_eq!(e.len(), 4, "{e:?}");
    assert_eq!(
        e[0],
        Effect::Reply {
            conn: a,
            msg: ServerMessage::Released { tag: 9, id }
        }
    );
    assert!(
        matches!(&e[1], Effect::Released { conn, released, disconnected: false }
            if *conn == a && released.id == id && released.bytes == 8 * G && released.label.as_deref() == Some("a"))
    );
    assert_eq!(e[2], Effect::RefreshReadings);
    assert!(matches!(&e[3], Effect::Granted { conn, tag: 5, .. } if *conn == b));
}

#[test]
fn apply_answers_not_found_for_what_the_connection_does_not_hold() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let id = grant_id(&request(&mut l, ConnId(1), reserve_msg(1, G, "a"), t0));
    let other = ConnId(2);
    for (tag, msg) in [
        (3, ClientMessage::Release { tag: 3, id }),
        (
            4,
            ClientMessage::SetIdle {
                tag: 4,
                id,
                idle: true,
            },
        ),
        (
            5,
            ClientMessage::AttachPids {
                tag: 5,
                id,
                pids: vec![1],
            },
        ),
    ] {
        let e = request(&mut l, other, msg, t0);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            matches!(&e[0], Effect::Reply { conn, msg: ServerMessage::Error { tag: t, kind: ErrorKind::NotFound, message } }
                if *conn == other && *t == tag && message.contains(&id.to_string())),
            "{e:?}"
        );
    }
    assert_eq!(l.reservation_count(), 1);
    assert_eq!(l.counters().releases, 0);
}

#[test]
fn apply_answers_ping_status_and_a_second_hello_without_a_pass() {
    let mut l = sim(&[10 * G]).with_identity(Identity {
        daemon_version: "9.9.9".into(),
        backend: "simulated".into(),
    });
    // Uptime counts from the ledger's start, which is before this.
    let t0 = Instant::now();
    let e = request(&mut l, ConnId(1), ClientMessage::Ping { tag: 4 }, t0);
    assert_eq!(
        e,
        vec![Effect::Reply {
            conn: ConnId(1),
            msg: ServerMessage::Pong { tag: 4 }
        }]
    );
    let hello = ClientMessage::Hello {
        version: 1,
        client: String::new(),
    };
    let e = request(&mut l, ConnId(1), hello, t0);
    assert!(matches!(
        &e[..],
        [Effect::Reply {
            msg: ServerMessage::Error {
                kind: ErrorKind::BadRequest,
                ..
            },
            ..
        }]
    ));
    let e = request(
        &mut l,
        ConnId(1),
        ClientMessage::Status { tag: 2 },
        t0 + Duration::from_secs(3),
    );
    let [
        Effect::Reply {
            msg: ServerMessage::Status { tag: 2, status },
            ..
        },
    ] = &e[..]
    else {
        panic!("{e:?}")
    };
    assert_eq!(status.daemon_version, "9.9.9");
    assert_eq!(status.backend, "simulated");
    assert!(status.uptime_ms >= 3000, "{}", status.uptime_ms);
    assert_eq!(status.devices.len(), 1);
}

#[test]
fn apply_status_hides_other_users_details_from_non_admins() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let user = |uid, pid| Peer {
        pid,
        uid,
        gid: uid,
        admin: false,
    };
    let reserve = |l: &mut Ledger, conn, peer, label: &str, bytes| {
        let msg = reserve_msg(1, bytes, label);
        l.apply(Input::Request { conn, peer, msg }, t0)
    };
    reserve(&mut l, ConnId(1), user(1000, 11), "mine", 4 * G);
    reserve(&mut l, ConnId(2), user(2000, 22), "theirs", 4 * G);
    reserve(&mut l, ConnId(3), user(2000, 23), "queued", 4 * G);
    let status_of = |l: &mut Ledger, peer: Peer| -> StatusReport {
        let msg = ClientMessage::Status { tag: 1 };
        match l
            .apply(
                Input::Request {
                    conn: ConnId(9),
                    peer,
                    msg,
                },
                t0,
            )
            .pop()
        {
            Some(Effect::Reply {
                msg: ServerMessage::Status { status, .. },
                ..
            }) => *status,
            other => panic!("{other:?}"),
        }
    };
    let s = status_of(&mut l, user(1000, 99));
    let label = |s: &StatusReport, uid| {
        s.reservations
            .iter()
            .find(|r| r.uid == uid)
            .map(|r| (r.label.clone(), r.pids.clone()))
    };
    assert_eq!(label(&s, 1000), Some((Some("mine".into()), vec![11])));
    assert_eq!(label(&s, 2000), Some((None, vec![])));
    assert_eq!(s.queue[0].label, None);
    // Other users' pids are hidden too; one's own stays.
    let pid = |s: &StatusReport, uid| s.reservations.iter().find(|r| r.uid == uid).map(|r| r.pid);
    assert_eq!(pid(&s, 1000), Some(11));
    assert_eq!(pid(&s, 2000), Some(0));
    assert_eq!(s.queue[0].pid, 0);
    assert_eq!(s.queue[0].uid, 2000, "the uid still says whose it is");
    let s = status_of(&mut l, admin());
    assert_eq!(label(&s, 2000), Some((Some("theirs".into()), vec![22])));
    assert_eq!(s.queue[0].label.as_deref(), Some("queued"));
    assert_eq!(pid(&s, 2000), Some(22));
    assert_eq!(s.queue[0].pid, 23);
}

#[test]
fn apply_logs_a_device_going_unhealthy_and_recovering_once_each() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G]);
    let reading = |l: &mut Ledger, result| {
        let input = Input::Reading {
            device: 0,
            taken_at: t0,
            result,
        };
        l.apply(input, t0)
    };
    let logs = |e: Vec<Effect>| -> Vec<LogEvent> {
        e.into_iter()
            .filter_map(|e| match e {
                Effect::Log(l) => Some(l),
                _ => None,
            })
            .collect()
    };
    let down = LogEvent::DeviceUnhealthy {
        device: 0,
        fault: "lost".into(),
    };
    assert_eq!(logs(reading(&mut l, Err("lost".into()))), vec![down]);
    assert!(logs(reading(&mut l, Err("lost".into()))).is_empty());
    assert!(!l.is_healthy(0));
    assert_eq!(
        logs(reading(&mut l, Ok(measured(0, Some(vec![]))))),
        vec![LogEvent::DeviceRecovered { device: 0 }]
    );
    assert!(logs(reading(&mut l, Ok(measured(0, Some(vec![]))))).is_empty());
}

#[test]
fn apply_disconnect_logs_each_release_and_asks_for_one_fresh_reading() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let c = ConnId(1);
    request(&mut l, c, reserve_msg(1, G, "a"), t0);
    request(&mut l, c, reserve_msg(2, G, "b"), t0);
    let e = l.apply(Input::Disconnect { conn: c }, t0);
    let released: Vec<bool> = e
        .iter()
        .filter_map(|e| match e {
            Effect::Released { disconnected, .. } => Some(*disconnected),
            _ => None,
        })
        .collect();
    assert_eq!(released, vec![true, true]);
    assert_eq!(
        e.iter().filter(|e| **e == Effect::RefreshReadings).count(),
        1
    );
    // A connection that held nothing changes nothing.
    assert!(
        l.apply(Input::Disconnect { conn: ConnId(5) }, t0)
            .is_empty()
    );
}

#[test]
fn status_lists_each_gpu_process_and_what_it_counts_against() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G]);
    let id = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 8 * G), t0));
    let gone = grant_id(&l.reserve(ConnId(2), peer(2), req(1, 2 * G), t0));
    // The client's child (pid 50) uses 5 GiB, an outsider of uid 7 4 GiB,
    // the second holder 2 GiB.
    let child = ProcessUsage {
        pid: 50,
        bytes: 5 * G,
        ancestors: vec![1],
        uid: 1000,
    };
    let outsider = ProcessUsage {
        uid: 7,
        ..ProcessUsage::new(77, 4 * G)
    };
    let holder2 = ProcessUsage {
        uid: 1000,
        ..ProcessUsage::new(2, 2 * G)
    };
    let r = Reading {
        used_bytes: 11 * G,
        processes: Some(vec![child, outsider, holder2.clone()]),
    };
    l.set_reading(0, r.clone(), ms(t0, 1), ms(t0, 1));
    // Released, not yet seen free: its process says so.
    l.release(ConnId(2), gone, ms(t0, 2)).unwrap();
    let admin = Peer {
        admin: true,
        ..peer(9)
    };
    let p = |pid, uid, bytes, reservation, released| GpuProcess {
        device: 0,
        pid,
        uid,
        bytes,
        reservation,
        released,
    };
    assert_eq!(
        l.status(admin, ms(t0, 3)).processes,
        vec![
            p(50, 1000, 5 * G, Some(id), false),
            p(77, 7, 4 * G, None, false),
            p(2, 1000, 2 * G, None, true),
        ]
    );
    // A user sees the pids of their own processes only.
    let other = Peer { uid: 5, ..peer(9) };
    let pids: Vec<u32> = l
        .status(other, ms(t0, 3))
        .processes
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(pids, vec![0, 0, 0]);
    let own: Vec<u32> = l
        .status(peer(9), ms(t0, 3))
        .processes
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(own, vec![50, 0, 2]);
    // Without per-process usage there is nothing to list.
    l.set_reading(0, measured(11 * G, None), ms(t0, 4), ms(t0, 4));
    assert!(l.status(admin, ms(t0, 4)).processes.is_empty());
}

#[test]
fn on_a_simulated_device_each_reservation_is_its_clients_process() {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    let a = grant_id(&l.reserve(ConnId(1), peer(11), req(1, 2 * G), t0));
    let b = grant_id(&l.reserve(ConnId(1), peer(11), req(2, 6 * G), t0));
    let got: Vec<(u32, u32, u64, Option<ReservationId>, bool)> = l
        .status(peer(11), t0)
        .processes
        .iter()
        .map(|p| (p.pid, p.uid, p.bytes, p.reservation, p.released))
        .collect();
    // Largest first.
    assert_eq!(
        got,
        vec![
            (11, 1000, 6 * G, Some(b), false),
            (11, 1000, 2 * G, Some(a), false)
        ]
    );
}

#[test]
fn a_grantee_that_already_used_memory_leaves_room_granted_in_the_same_event() {
    // 16 GiB measured: pid 99 (never asks) uses 5 GiB; pid 104 already uses
    // 1 GiB before it reserves 6 GiB.
    let t0 = Instant::now();
    let mut l = measured_ledger(&[16 * G]);
    let held = grant_id(&l.reserve(ConnId(1), peer(200), req(1, 6 * G), t0));
    let outside = || measured(6 * G, Some(vec![(104, G), (99, 5 * G)]));
    l.set_reading(0, outside(), ms(t0, 1), ms(t0, 1));
    assert!(granted(&l.reserve(ConnId(2), peer(104), req(1, 6 * G), ms(t0, 2))).is_empty());
    assert!(granted(&l.reserve(ConnId(3), peer(105), req(1, 5 * G), ms(t0, 2))).is_empty());
    l.release(ConnId(1), held, ms(t0, 3)).unwrap();
    // The first reading after the release frees 6 GiB: 10 GiB available, A
    // takes 6 — and its process's 1 GiB moves from unattributed into A, so
    // 16 − 5 − 6 = 5 GiB remain: B fits at once.
    let e = l.set_reading(0, outside(), ms(t0, 4), ms(t0, 4));
    assert_eq!(granted(&e), vec![(ConnId(2), 1, 0), (ConnId(3), 1, 0)]);
    assert_eq!(l.available(0), 0);
}

// ---- priority window ----------------------------------------------------------

fn windowed(totals: &[u64], window: Duration) -> Ledger {
    let mut config = LedgerConfig {
        priority_window: Some(window),
        ..LedgerConfig::default()
    };
    // Aging still lifts priorities for eviction, never the grant order.
    config.aging = Duration::from_millis(1);
    Ledger::new(
        config,
        totals
            .iter()
            .enumerate()
            .map(|(i, &t)| spec(i as u32, t))
            .collect(),
        ReadingSource::Simulated,
        Instant::now(),
    )
}

fn prio_req(tag: u64, bytes: u64, priority: i32) -> ReserveRequest {
    let mut r = req(tag, bytes);
    r.priority = priority;
    r
}

fn queued_position(effects: &[Effect], conn: ConnId) -> Option<u32> {
    effects.iter().rev().find_map(|e| match e {
        Effect::Queued {
            conn: c, position, ..
        } if *c == conn => Some(*position),
        _ => None,
    })
}

#[test]
fn inside_the_window_priority_is_strict_and_past_it_arrival_goes_first() {
    let t0 = Instant::now();
    let window = Duration::from_secs(100);
    let mut l = windowed(&[24 * G], window);
    let holder = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 24 * G), t0));
    // A low-priority request, then a top one 50 s later: strict priority
    // (with aging at 1 ms per level it would be far ahead of the top one).
    l.reserve(ConnId(2), peer(2), prio_req(1, 4 * G, 0), t0);
    let e = l.reserve(ConnId(3), peer(3), prio_req(1, 4 * G, 10), ms(t0, 50_000));
    assert_eq!(queued_position(&e, ConnId(3)), Some(1), "{e:?}");
    assert_eq!(queued_position(&e, ConnId(2)), Some(2), "{e:?}");
    // The daemon is woken when the low one has waited the window...
    assert_eq!(l.next_wakeup(ms(t0, 50_000)), Some(t0 + window));
    // ...and then it goes first, and is told so.
    let e = l.tick(t0 + window);
    assert_eq!(queued_position(&e, ConnId(2)), Some(1), "{e:?}");
    assert_eq!(queued_position(&e, ConnId(3)), Some(2), "{e:?}");
    // A new top-priority request stays behind it.
    let e = l.reserve(ConnId(4), peer(4), prio_req(1, 20 * G, 10), ms(t0, 100_001));
    assert_eq!(queued_position(&e, ConnId(4)), Some(3), "{e:?}");
    // 24 GiB free: the promoted one, then the top one that arrived first;
    // the 20 GiB one no longer fits.
    let e = l.release(ConnId(1), holder, ms(t0, 100_002)).unwrap().1;
    assert_eq!(
        granted(&e),
        vec![(ConnId(2), 1, 0), (ConnId(3), 1, 0)],
        "{e:?}"
    );
}

#[test]
fn a_promotion_can_grant_what_a_younger_starved_waiter_held_back() {
    let t0 = Instant::now();
    let window = Duration::from_secs(60);
    let mut l = windowed(&[24 * G], window);
    l.config.starvation_guard = Duration::from_secs(30);
    grant_id(&l.reserve(ConnId(1), peer(1), req(1, 19 * G), t0));
    let five = grant_id(&l.reserve(ConnId(9), peer(9), req(1, 5 * G), t0));
    l.reserve(ConnId(2), peer(2), prio_req(1, 3 * G, 0), t0);
    // A top-priority 10 GiB request 10 s later goes ahead of the small one.
    l.reserve(ConnId(3), peer(3), prio_req(1, 10 * G, 10), ms(t0, 10_000));
    // 5 GiB free at 45 s: the top one is starved, does not fit and keeps
    // the device's room; the small one behind it waits.
    let e = l.release(ConnId(9), five, ms(t0, 45_000)).unwrap().1;
    assert!(granted(&e).is_empty(), "{e:?}");
    assert_eq!(l.next_wakeup(ms(t0, 45_000)), Some(t0 + window));
    // At 60 s the small one has waited the window: it moves ahead of the
    // starved one and the tick alone grants it.
    let e = l.tick(t0 + window);
    assert_eq!(granted(&e), vec![(ConnId(2), 1, 0)], "{e:?}");
}

/// The grant order with a priority window as docs/architecture.md states it:
/// waiters that have waited the window first, by arrival; then the others
/// by priority (higher first), then arrival.
fn window_rank(
    window: Duration,
    now: Instant,
    priority: i32,
    arrived: Instant,
    id: ReservationId,
) -> (bool, i64, ReservationId) {
    let old = now.saturating_duration_since(arrived) >= window;
    (!old, if old { 0 } else { -i64::from(priority) }, id)
}

/// The checks of `random_histories_keep_the_priority_window` after the
/// effects of one event at `now`.
fn window_step(
    l: &Ledger,
    window: Duration,
    arrivals: &BTreeMap<ReservationId, (i32, Instant)>,
    held: &mut BTreeMap<ReservationId, u64>,
    waiting: &mut BTreeSet<(u64, u64)>,
    effects: &[Effect],
    now: Instant,
) -> Result<(), TestCaseError> {
    for e in effects {
        match e {
            Effect::Granted {
                conn, tag, grant, ..
            } => {
                waiting.remove(&(conn.0, *tag));
                held.insert(grant.id, conn.0);
                // No starved waiter that ranks ahead of the grantee
                // (by the window's rule, now) and could use its
                // device is still waiting.
                let d = l
                    .devices
                    .iter()
                    .position(|x| x.spec.index == grant.device)
                    .unwrap();
                let (p, arrived) = arrivals[&grant.id];
                let granted_rank = window_rank(window, now, p, arrived, grant.id);
                for (_, s) in l.queue.iter() {
                    let starved = now >= s.starved_at;
                    let ahead =
                        window_rank(window, now, s.priority, s.arrived, s.id) < granted_rank;
                    prop_assert!(
                        !(starved
                            && ahead
                            && s.candidates.contains(&d)
                            && l.capacity(d) >= s.bytes),
                        "grant {:?} jumped starved waiter {:?}",
                        grant.id,
                        s.id
                    );
                }
            }
            Effect::Failed { conn, tag, .. } => {
                waiting.remove(&(conn.0, *tag));
            }
            _ => {}
        }
    }
    check_invariants(l, now)?;
    // The queue is in the window's order at every moment the
    // ledger sees.
    let order: Vec<ReservationId> = l.queue.iter().map(|(_, w)| w.id).collect();
    let mut expected = order.clone();
    expected.sort_by_key(|id| {
        let (p, arrived) = arrivals[id];
        window_rank(window, now, p, arrived, *id)
    });
    prop_assert_eq!(order, expected);
    // The daemon is woken for the next promotion.
    let next_promotion = l
        .queue
        .iter()
        .map(|(_, w)| w.arrived + window)
        .filter(|&t| t > now)
        .min();
    if let Some(t) = next_promotion {
        prop_assert!(l.next_wakeup(now).is_some_and(|w| w <= t));
    }
    prop_assert_eq!(waiting.len(), l.waiter_count());
    prop_assert_eq!(held.len(), l.reservation_count());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_the_priority_window(
        totals in proptest::collection::vec(8u64..40, 1..3),
        window_s in 0u64..90,
        ops in proptest::collection::vec((arb_op(), 0u64..20_000), 1..60),
    ) {
        let window = Duration::from_secs(window_s);
        let t0 = Instant::now();
        let mut now = t0;
        let mut l = windowed(&totals.iter().map(|t| t * G).collect::<Vec<_>>(), window);
        let mut arrivals: BTreeMap<ReservationId, (i32, Instant)> = BTreeMap::new();
        let mut held: BTreeMap<ReservationId, u64> = BTreeMap::new();
        let mut waiting: BTreeSet<(u64, u64)> = BTreeSet::new();
        let mut next_tag = 1u64;
        for (op, advance_ms) in ops {
            let before = now;
            now += Duration::from_millis(advance_ms);
            // The daemon ticks at every wakeup the ledger asks for.
            let mut at = before;
            for _ in 0..1000 {
                match l.next_wakeup(at) {
                    Some(t) if t <= now => {
                        at = t.max(at);
                        let effects = l.tick(at);
                        window_step(&l, window, &arrivals, &mut held, &mut waiting, &effects, at)?;
                    }
                    _ => break,
                }
            }
            let effects = match op {
                Op::Reserve { conn, bytes, device, priority, timeout_ms, evictable } => {
                    let tag = next_tag;
                    next_tag += 1;
                    waiting.insert((conn, tag));
                    arrivals.insert(ReservationId(l.next_id), (priority, now));
                    let r = ReserveRequest {
                        tag, bytes,
                        device: device.map_or(DeviceSelector::Any, DeviceSelector::Index),
                        priority, label: None, timeout_ms, evictable,
                    };
                    l.reserve(ConnId(conn), peer(conn as u32 + 100), r, now)
                }
                Op::Release { conn, nth } => {
                    let mine: Vec<ReservationId> =
                        held.iter().filter(|(_, c)| **c == conn).map(|(id, _)| *id).collect();
                    match mine.get(nth) {
                        Some(id) => {
                            held.remove(id);
                            l.release(ConnId(conn), *id, now).expect("held").1
                        }
                        None => l.tick(now),
                    }
                }
                Op::Cancel { conn, nth } => {
                    let tags: Vec<u64> =
                        waiting.iter().filter(|(c, _)| *c == conn).map(|(_, t)| *t).collect();
                    let tag = tags.get(nth).copied().unwrap_or(u64::MAX);
                    waiting.remove(&(conn, tag));
                    l.cancel(ConnId(conn), tag, now).1
                }
                Op::Disconnect { conn } => {
                    held.retain(|_, c| *c != conn);
                    waiting.retain(|(c, _)| *c != conn);
                    l.disconnect(ConnId(conn), now).1
                }
                Op::Tick => l.tick(now),
            };
            window_step(&l, window, &arrivals, &mut held, &mut waiting, &effects, now)?;
        }
    }
}

/// Grant+release pairs per second in the ledger alone, with `queued`
/// requests waiting on a full device while the pairs use another one (as
/// docs/architecture.md, "Scheduling", reports). Run with
/// `cargo test --release -p vramd-ledger --lib pairs_per_second -- --ignored --nocapture`.
fn pairs_per_second(window: Option<Duration>, queued: u64) -> f64 {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G, 24 * G]);
    l.config.priority_window = window;
    if let Some(w) = window {
        l.queue = queue::Queue::with_window(2, w, t0, l.config.aging);
    }
    let on = |d: u32, tag: u64, bytes: u64, priority: i32| ReserveRequest {
        device: DeviceSelector::Index(d),
        ..prio_req(tag, bytes, priority)
    };
    grant_id(&l.reserve(ConnId(0), peer(1), on(0, 0, 24 * G, 0), t0));
    for i in 0..queued {
        let admin = Peer {
            admin: true,
            ..peer(2)
        };
        l.reserve(ConnId(1), admin, on(0, i, G, 0), t0);
    }
    let pairs = 200_000u64;
    let start = Instant::now();
    for i in 0..pairs {
        let now = t0 + Duration::from_micros(i);
        let other = Peer {
            uid: 2000,
            ..peer(3)
        };
        let id = grant_id(&l.reserve(ConnId(2), other, on(1, i, G, 0), now));
        l.release(ConnId(2), id, now).expect("held");
    }
    pairs as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "a measurement: run in release mode"]
fn pairs_per_second_with_and_without_a_window() {
    for window in [None, Some(Duration::from_secs(300))] {
        for queued in [0, 100_000] {
            println!(
                "window {window:?}, {queued} queued: {:.0} grant+release pairs/s",
                pairs_per_second(window, queued)
            );
        }
    }
}

#[test]
fn with_a_window_aging_still_decides_what_a_waiter_may_evict() {
    let t0 = Instant::now();
    let config = LedgerConfig {
        priority_window: Some(Duration::from_secs(3000)),
        aging: Duration::from_secs(10),
        min_residency: Duration::ZERO,
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, vec![spec(0, 24 * G)], ReadingSource::Simulated, t0);
    let hi = grant_id(&l.reserve(ConnId(1), peer(1), idle_req(1, 20 * G, 3), t0));
    // Two waiters: a priority-2 one ranks first by the window's order, but
    // the priority-0 one is older and reaches 3 first by aging (30 s after
    // it arrived, against 10 s after the other one arrived 25 s later).
    let arrived = ms(t0, 100);
    l.reserve(ConnId(2), peer(2), req(1, 10 * G), arrived);
    l.reserve(ConnId(3), peer(3), prio_req(1, 10 * G, 2), ms(t0, 25_100));
    let at = arrived + Duration::from_secs(30);
    assert_eq!(l.next_wakeup(ms(t0, 25_100)), Some(at));
    assert!(evicted(&l.tick(at - Duration::from_millis(1))).is_empty());
    assert_eq!(evicted(&l.tick(at)), vec![hi]);
}

// ---- adaptive starvation guard -----------------------------------------------

#[test]
fn an_adaptive_guard_follows_the_recent_waits_between_its_floor_and_cap() {
    let t0 = Instant::now();
    let config = LedgerConfig {
        adaptive_guard: Some(AdaptiveGuard {
            factor: 4,
            cap: Duration::from_secs(100),
        }),
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, vec![spec(0, 24 * G)], ReadingSource::Simulated, t0);
    // No grant yet: the floor (30 s).
    let a = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 20 * G), t0));
    // One grant, at once: the mean wait is 0, the guard the floor.
    let big = ms(t0, 1_000);
    l.reserve(ConnId(2), peer(2), req(1, 10 * G), big);
    assert_eq!(
        l.queue.iter().next().unwrap().1.starved_at,
        big + Duration::from_secs(30)
    );
    // It waits 10 s: the mean over two grants is 5 s, so the next guard is
    // 4 × 5 s = 20 s → the floor, 30 s; then one more that waits 40 s.
    l.release(ConnId(1), a, ms(t0, 11_000)).unwrap();
    let b = l.reservations.keys().copied().last().unwrap();
    let c_at = ms(t0, 12_000);
    l.reserve(ConnId(3), peer(3), req(1, 20 * G), c_at);
    assert_eq!(
        l.queue.iter().next().unwrap().1.starved_at,
        c_at + Duration::from_secs(30)
    );
    l.release(ConnId(2), b, ms(t0, 52_000)).unwrap();
    // Waits 0, 10 and 40 s: mean 50/3 s, × 4 = 66.67 s.
    let d_at = ms(t0, 53_000);
    l.reserve(ConnId(4), peer(4), req(1, 10 * G), d_at);
    let d = l.queue.iter().next().unwrap().1;
    assert_eq!(d.starved_at, d_at + Duration::from_secs(50) / 3 * 4);
    // And the cap: after a grant that waited an hour, 4 × the mean is far
    // above 100 s.
    let mut l = Ledger::new(
        LedgerConfig {
            adaptive_guard: Some(AdaptiveGuard {
                factor: 4,
                cap: Duration::from_secs(100),
            }),
            ..LedgerConfig::default()
        },
        vec![spec(0, 24 * G)],
        ReadingSource::Simulated,
        t0,
    );
    let a = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 24 * G), t0));
    l.reserve(ConnId(2), peer(2), req(1, 24 * G), t0);
    l.release(ConnId(1), a, ms(t0, 3_600_000)).unwrap();
    let e_at = ms(t0, 3_600_001);
    l.reserve(ConnId(3), peer(3), req(1, 24 * G), e_at);
    assert_eq!(
        l.queue.iter().next().unwrap().1.starved_at,
        e_at + Duration::from_secs(100)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_the_adaptive_guard(
        totals in proptest::collection::vec(8u64..40, 1..3),
        factor in 1u32..8,
        floor_s in 0u64..40,
        cap_s in 0u64..200,
        ops in proptest::collection::vec((arb_op(), 0u64..20_000), 1..60),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let guard = AdaptiveGuard { factor, cap: Duration::from_secs(cap_s) };
        let floor = Duration::from_secs(floor_s);
        let config = LedgerConfig {
            starvation_guard: floor,
            adaptive_guard: Some(guard),
            ..LedgerConfig::default()
        };
        let devices = totals.iter().enumerate().map(|(i, t)| spec(i as u32, t * G)).collect();
        let mut l = Ledger::new(config, devices, ReadingSource::Simulated, t0);
        // The test's own record of the last grants' waits, and of each
        // request's arrival, priority and expected guard.
        let mut recent: std::collections::VecDeque<Duration> = Default::default();
        let mut expected: BTreeMap<ReservationId, (i32, Instant, Instant)> = BTreeMap::new();
        let mut held: BTreeMap<ReservationId, u64> = BTreeMap::new();
        let mut next_tag = 1u64;
        for (op, advance_ms) in ops {
            now += Duration::from_millis(advance_ms);
            let effects = match op {
                Op::Reserve { conn, bytes, device, priority, timeout_ms, evictable } => {
                    let tag = next_tag;
                    next_tag += 1;
                    let mean = recent.iter().sum::<Duration>() / recent.len().max(1) as u32;
                    let g = (mean * factor).clamp(floor, guard.cap.max(floor));
                    expected.insert(ReservationId(l.next_id), (priority, now, now + g));
                    let r = ReserveRequest {
                        tag, bytes,
                        device: device.map_or(DeviceSelector::Any, DeviceSelector::Index),
                        priority, label: None, timeout_ms, evictable,
                    };
                    l.reserve(ConnId(conn), peer(conn as u32 + 100), r, now)
                }
                Op::Release { conn, nth } => {
                    let mine: Vec<ReservationId> =
                        held.iter().filter(|(_, c)| **c == conn).map(|(id, _)| *id).collect();
                    match mine.get(nth) {
                        Some(id) => {
                            held.remove(id);
                            l.release(ConnId(conn), *id, now).expect("held").1
                        }
                        None => l.tick(now),
                    }
                }
                Op::Cancel { conn, .. } => l.cancel(ConnId(conn), u64::MAX, now).1,
                Op::Disconnect { conn } => {
                    held.retain(|_, c| *c != conn);
                    l.disconnect(ConnId(conn), now).1
                }
                Op::Tick => l.tick(now),
            };
            for e in &effects {
                if let Effect::Granted { conn, grant, waited, .. } = e {
                    held.insert(grant.id, conn.0);
                    let (p, arrived, _) = expected[&grant.id];
                    prop_assert_eq!(*waited, now.saturating_duration_since(arrived));
                    if recent.len() == AdaptiveGuard::GRANTS {
                        recent.pop_front();
                    }
                    recent.push_back(*waited);
                    // No grant jumps a starved waiter ahead of it (aging
                    // order) on its device.
                    let d = l.devices.iter().position(|x| x.spec.index == grant.device).unwrap();
                    let granted_key = l.order_key(p, arrived, grant.id);
                    for (_, s) in l.queue.iter() {
                        let ahead = l.order_key(s.priority, s.arrived, s.id) < granted_key;
                        prop_assert!(!(now >= s.starved_at && ahead && s.candidates.contains(&d)
                            && l.capacity(d) >= s.bytes),
                            "grant {:?} jumped starved waiter {:?}", grant.id, s.id);
                    }
                }
            }
            // Every waiter's guard is the one the rule gives at its arrival.
            for (_, w) in l.queue.iter() {
                prop_assert_eq!(w.starved_at, expected[&w.id].2, "guard of {:?}", w.id);
                prop_assert!(w.starved_at <= w.arrived + guard.cap.max(floor));
            }
            check_invariants(&l, now)?;
            prop_assert_eq!(held.len(), l.reservation_count());
        }
    }
}

#[test]
fn with_an_adaptive_guard_backfill_goes_on_until_the_request_s_own_guard() {
    let t0 = Instant::now();
    let config = LedgerConfig {
        adaptive_guard: Some(AdaptiveGuard {
            factor: 6,
            cap: Duration::from_secs(100),
        }),
        ..LedgerConfig::default()
    };
    let mut l = Ledger::new(config, vec![spec(0, 24 * G)], ReadingSource::Simulated, t0);
    let a = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 20 * G), t0));
    let x = grant_id(&l.reserve(ConnId(9), peer(9), req(1, 2 * G), t0));
    l.reserve(ConnId(2), peer(2), req(1, 20 * G), t0);
    // Waits 0, 0 and 40 s: the next request's guard is 6 × 40/3 s ≈ 80 s.
    assert_eq!(
        granted(&l.release(ConnId(1), a, ms(t0, 40_000)).unwrap().1).len(),
        1
    );
    let c_at = ms(t0, 41_000);
    l.reserve(ConnId(3), peer(3), req(1, 20 * G), c_at);
    let d = l.reserve(
        ConnId(4),
        peer(4),
        req(1, 3 * G),
        c_at + Duration::from_secs(50),
    );
    assert!(granted(&d).is_empty());
    // 59 s after it arrived it is past the fixed 30 s but not its own 80 s:
    // the pass a release starts lets the small request behind it go ahead.
    let e = l
        .release(ConnId(9), x, c_at + Duration::from_secs(59))
        .unwrap()
        .1;
    assert_eq!(granted(&e), vec![(ConnId(4), 1, 0)], "{e:?}");
    // Past 80 s its device keeps the room for it.
    let e = l.reserve(
        ConnId(5),
        peer(5),
        req(1, G),
        c_at + Duration::from_secs(81),
    );
    assert!(granted(&e).is_empty(), "{e:?}");
}

#[test]
fn huge_guards_and_windows_mean_never_and_do_not_panic() {
    let t0 = Instant::now();
    for adaptive in [None, Some(Duration::MAX)] {
        let config = LedgerConfig {
            starvation_guard: Duration::MAX,
            priority_window: Some(Duration::MAX),
            adaptive_guard: adaptive.map(|cap| AdaptiveGuard {
                factor: u32::MAX,
                cap,
            }),
            ..LedgerConfig::default()
        };
        let mut l = Ledger::new(config, vec![spec(0, 24 * G)], ReadingSource::Simulated, t0);
        let a = grant_id(&l.reserve(ConnId(1), peer(1), req(1, 20 * G), t0));
        l.reserve(ConnId(2), peer(2), req(1, 20 * G), t0);
        assert_eq!(l.next_wakeup(t0), None);
        // Never starved: backfill goes on a day later.
        let later = t0 + Duration::from_secs(86_400);
        assert_eq!(
            granted(&l.reserve(ConnId(3), peer(3), req(1, G), later)).len(),
            1
        );
        l.release(ConnId(1), a, later).unwrap();
        let e = l.reserve(ConnId(4), peer(4), req(1, G), later);
        assert_eq!(granted(&e).len(), 1, "{e:?}");
    }
}

#[test]
fn each_victim_of_one_clients_group_counts_for_its_own_share() {
    // One client (the gateway) holds three idle 3 GiB models on a full 10 GiB
    // card; its process uses all 9 GiB, so the three reservations form one
    // group whose usage each of them shows. A 5 GiB waiter needs two of them
    // freed: both are asked at once (counting each as freeing the group's
    // 9 GiB would ask one and leave the waiter to sit out its deadline).
    let t0 = Instant::now();
    let mut l = measured_ledger(&[10 * G]);
    l.config.min_residency = Duration::ZERO;
    let ids: Vec<ReservationId> = (0..3)
        .map(|i| grant_id(&l.reserve(ConnId(1), peer(1), idle_req(i, 3 * G, 0), ms(t0, i))))
        .collect();
    let reading = measured(10 * G, Some(vec![(1, 9 * G), (99, G)]));
    l.set_reading(0, reading, ms(t0, 5), ms(t0, 5));
    assert_eq!(l.available(0), 0);
    let e = l.reserve(ConnId(2), peer(2), req(1, 5 * G), ms(t0, 6));
    assert_eq!(evicted(&e), vec![ids[0], ids[1]], "{e:?}");
    // A group using more than it reserved frees its usage in all, shared by
    // reserved size: 12 GiB over three 3 GiB reservations is 4 GiB each, so
    // a 4 GiB waiter needs one.
    let mut l = measured_ledger(&[13 * G]);
    l.config.min_residency = Duration::ZERO;
    let ids: Vec<ReservationId> = (0..3)
        .map(|i| grant_id(&l.reserve(ConnId(1), peer(1), idle_req(i, 3 * G, 0), ms(t0, i))))
        .collect();
    let reading = measured(13 * G, Some(vec![(1, 12 * G), (99, G)]));
    l.set_reading(0, reading, ms(t0, 5), ms(t0, 5));
    let e = l.reserve(ConnId(2), peer(2), req(1, 4 * G), ms(t0, 6));
    assert_eq!(evicted(&e), vec![ids[0]], "{e:?}");
}

fn reserve_for(tag: u64, bytes: u64, pids: &[u32]) -> ClientMessage {
    ClientMessage::ReserveFor {
        request: req(tag, bytes),
        pids: pids.to_vec(),
    }
}

fn actual_of(l: &Ledger, id: ReservationId, now: Instant) -> u64 {
    l.status(admin(), now)
        .reservations
        .iter()
        .find(|r| r.id == id)
        .map(|r| r.actual_bytes)
        .expect("held")
}

#[test]
fn reserve_for_leaves_the_clients_own_process_out() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[24 * G]);
    // The gateway (pid 1) holds two models for runners 50 and 51; its own
    // process uses 1 GiB of its own, which counts against neither.
    let a = grant_id(&request(
        &mut l,
        ConnId(1),
        reserve_for(1, 4 * G, &[50]),
        t0,
    ));
    let b = grant_id(&request(
        &mut l,
        ConnId(1),
        reserve_for(2, 4 * G, &[51]),
        t0,
    ));
    let r = measured(8 * G, Some(vec![(1, G), (50, 3 * G), (51, 4 * G)]));
    l.set_reading(0, r, ms(t0, 1), ms(t0, 1));
    assert_eq!(actual_of(&l, a, ms(t0, 1)), 3 * G);
    assert_eq!(actual_of(&l, b, ms(t0, 1)), 4 * G);
    let st = l.status(admin(), ms(t0, 1));
    assert_eq!(st.devices[0].unattributed_bytes, G);
    assert_eq!(st.reservations[0].pids, vec![50]);
    // 1 GiB unattributed + 4 + 4 reserved.
    assert_eq!(l.available(0), 15 * G);
    // One that speaks for no process counts its bytes until pids come.
    let c = grant_id(&request(
        &mut l,
        ConnId(1),
        reserve_for(3, 2 * G, &[]),
        ms(t0, 2),
    ));
    assert_eq!(l.available(0), 13 * G);
    assert_eq!(actual_of(&l, c, ms(t0, 2)), 0);
    let (pids, _) = l.attach_pids(ConnId(1), c, &[52], ms(t0, 3)).unwrap();
    assert_eq!(pids, vec![52]);
    let r = measured(
        11 * G,
        Some(vec![(1, G), (50, 3 * G), (51, 4 * G), (52, 3 * G)]),
    );
    l.set_reading(0, r, ms(t0, 4), ms(t0, 4));
    assert_eq!(actual_of(&l, c, ms(t0, 4)), 3 * G);
    assert_eq!(l.available(0), 12 * G);
}

#[test]
fn reserve_for_adopts_usage_already_on_the_card() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[10 * G]);
    // A full card: runner 50 (with a child 60) already holds 6 GiB
    // unattributed, an outsider 4 GiB.
    let child = ProcessUsage {
        pid: 60,
        bytes: G,
        ancestors: vec![50],
        uid: 0,
    };
    let r = Reading {
        used_bytes: 10 * G,
        processes: Some(vec![
            ProcessUsage::new(50, 5 * G),
            child,
            ProcessUsage::new(99, 4 * G),
        ]),
    };
    l.set_reading(0, r, t0, t0);
    assert_eq!(l.available(0), 0);
    // A plain reservation of the same size waits; one adopting the runner
    // is granted at once, and a second naming it adopts nothing more.
    let e = request(&mut l, ConnId(2), ClientMessage::Reserve(req(1, 6 * G)), t0);
    assert!(granted(&e).is_empty());
    let e = request(&mut l, ConnId(1), reserve_for(1, 6 * G, &[50]), ms(t0, 1));
    assert_eq!(granted(&e), vec![(ConnId(1), 1, 0)]);
    let id = grant_id(&e);
    assert_eq!(actual_of(&l, id, ms(t0, 1)), 6 * G);
    assert_eq!(
        l.status(admin(), ms(t0, 1)).devices[0].unattributed_bytes,
        4 * G
    );
    let e = request(&mut l, ConnId(3), reserve_for(1, G, &[50]), ms(t0, 2));
    assert!(granted(&e).is_empty(), "adopted twice: {e:?}");
    // Growth beyond current usage needs room: 7 GiB for what uses 6 waits.
    l.apply(Input::Disconnect { conn: ConnId(3) }, ms(t0, 3));
    l.apply(Input::Disconnect { conn: ConnId(2) }, ms(t0, 3));
    let mut l2 = measured_ledger(&[10 * G]);
    let r = measured(10 * G, Some(vec![(50, 6 * G), (99, 4 * G)]));
    l2.set_reading(0, r, t0, t0);
    let e = request(&mut l2, ConnId(1), reserve_for(1, 7 * G, &[50]), t0);
    assert!(granted(&e).is_empty());
    // The outsider leaves: now the extra 1 GiB fits.
    let r = measured(6 * G, Some(vec![(50, 6 * G)]));
    let e = l2.apply(
        Input::Reading {
            device: 0,
            taken_at: ms(t0, 1),
            result: Ok(r),
        },
        ms(t0, 1),
    );
    assert_eq!(granted(&e), vec![(ConnId(1), 1, 0)]);
}

#[test]
fn resize_grows_into_its_own_usage_or_free_room_and_shrinking_lets_waiters_in() {
    let t0 = Instant::now();
    let mut l = measured_ledger(&[10 * G]);
    let id = grant_id(&request(
        &mut l,
        ConnId(1),
        reserve_for(1, 3 * G, &[50]),
        t0,
    ));
    // Its model proves larger: 5 GiB, and an outsider takes the rest.
    let r = measured(10 * G, Some(vec![(50, 5 * G), (99, 5 * G)]));
    l.set_reading(0, r, ms(t0, 1), ms(t0, 1));
    let resize = |tag, bytes| ClientMessage::Resize { tag, id, bytes };
    let e = request(&mut l, ConnId(1), resize(2, 5 * G), ms(t0, 2));
    assert!(
        e.iter().any(|e| matches!(e, Effect::Reply { msg: ServerMessage::Resized { tag: 2, bytes, .. }, .. } if *bytes == 5 * G)),
        "{e:?}"
    );
    let st = l.status(admin(), ms(t0, 2));
    assert_eq!(st.reservations[0].bytes, 5 * G);
    assert!(!st.reservations[0].over_reserved);
    // Growing beyond what is there fails and keeps its size.
    let e = request(&mut l, ConnId(1), resize(3, 6 * G), ms(t0, 3));
    assert_eq!(
        e.iter().find_map(|e| match e {
            Effect::Reply {
                msg: ServerMessage::Error { tag: 3, kind, .. },
                ..
            } => Some(*kind),
            _ => None,
        }),
        Some(ErrorKind::Timeout),
        "{e:?}"
    );
    assert_eq!(l.status(admin(), ms(t0, 3)).reservations[0].bytes, 5 * G);
    // Zero, or someone else's: refused / not found.
    let e = request(&mut l, ConnId(1), resize(4, 0), ms(t0, 4));
    assert_eq!(failed_reply(&e), Some(ErrorKind::Refused));
    let e = request(&mut l, ConnId(2), resize(5, G), ms(t0, 4));
    assert_eq!(failed_reply(&e), Some(ErrorKind::NotFound));
    // The model unloads part of itself; shrinking lets a waiter in.
    let r = measured(7 * G, Some(vec![(50, 2 * G), (99, 5 * G)]));
    l.set_reading(0, r, ms(t0, 5), ms(t0, 5));
    let e = request(
        &mut l,
        ConnId(2),
        ClientMessage::Reserve(req(1, 3 * G)),
        ms(t0, 6),
    );
    assert!(granted(&e).is_empty());
    let e = request(&mut l, ConnId(1), resize(6, 2 * G), ms(t0, 7));
    assert_eq!(granted(&e), vec![(ConnId(2), 1, 0)]);
}

fn failed_reply(effects: &[Effect]) -> Option<ErrorKind> {
    effects.iter().find_map(|e| match e {
        Effect::Reply {
            msg: ServerMessage::Error { kind, .. },
            ..
        } => Some(*kind),
        _ => None,
    })
}

#[test]
fn adoption_keeps_the_reserved_sum_within_capacity_and_works_past_a_cushion() {
    let t0 = Instant::now();
    // A full 10 GiB card with a 1 GiB cushion: its readings show more in
    // use (10) than the capacity (9). Runner 50's 6 GiB is still adopted.
    let mut l = measured_ledger(&[10 * G]);
    l.config.cushion_bytes = G;
    let r = measured(10 * G, Some(vec![(50, 6 * G), (99, 4 * G)]));
    l.set_reading(0, r, t0, t0);
    let e = request(&mut l, ConnId(1), reserve_for(1, 6 * G, &[50]), t0);
    assert_eq!(granted(&e), vec![(ConnId(1), 1, 0)], "{e:?}");
    // A second runner's 4 GiB cannot be adopted as a 4 GiB reservation:
    // 6 + 4 reserved would pass the 9 GiB capacity.
    let r = measured(10 * G, Some(vec![(50, 6 * G), (51, 4 * G)]));
    l.set_reading(0, r, ms(t0, 1), ms(t0, 1));
    let e = request(&mut l, ConnId(2), reserve_for(1, 4 * G, &[51]), ms(t0, 2));
    assert!(granted(&e).is_empty(), "{e:?}");
    assert!(l.reserved(0) <= l.capacity(0));
    // 3 GiB of it can.
    let e = request(&mut l, ConnId(3), reserve_for(1, 3 * G, &[51]), ms(t0, 3));
    assert_eq!(granted(&e), vec![(ConnId(3), 1, 0)], "{e:?}");
}

#[test]
fn set_enforced_is_listed_in_status_until_released_and_checks_its_input() {
    let t0 = Instant::now();
    let mut l = sim(&[10 * G]);
    let id = grant_id(&request(
        &mut l,
        ConnId(1),
        ClientMessage::Reserve(req(1, 4 * G)),
        t0,
    ));
    let enforce = |tag, limit_bytes, mechanism: &str| ClientMessage::SetEnforced {
        tag,
        id,
        limit_bytes,
        mechanism: mechanism.into(),
    };
    // Bad input: a clear error, nothing recorded.
    let e = request(&mut l, ConnId(1), enforce(2, 0, "mps"), ms(t0, 1));
    assert_eq!(failed_reply(&e), Some(ErrorKind::BadRequest), "{e:?}");
    let e = request(&mut l, ConnId(1), enforce(3, G, ""), ms(t0, 1));
    assert_eq!(failed_reply(&e), Some(ErrorKind::BadRequest), "{e:?}");
    // Another connection cannot declare it.
    let e = request(&mut l, ConnId(2), enforce(4, G, "mps"), ms(t0, 1));
    assert_eq!(failed_reply(&e), Some(ErrorKind::NotFound), "{e:?}");
    assert!(l.status(admin(), ms(t0, 1)).enforced.is_empty());
    // Its holder can.
    let e = request(&mut l, ConnId(1), enforce(5, 4 * G, "mps"), ms(t0, 2));
    assert!(
        e.iter().any(|e| matches!(
            e,
            Effect::Reply { msg: ServerMessage::EnforcedSet { tag: 5, limit_bytes, .. }, .. }
                if *limit_bytes == 4 * G
        )),
        "{e:?}"
    );
    let st = l.status(peer(77), ms(t0, 2));
    assert_eq!(st.enforced.len(), 1);
    assert_eq!(st.enforced[0].id, id);
    assert_eq!(st.enforced[0].limit_bytes, 4 * G);
    assert_eq!(st.enforced[0].mechanism, "mps");
    // Released: no longer listed.
    l.release(ConnId(1), id, ms(t0, 3)).unwrap();
    assert!(l.status(admin(), ms(t0, 3)).enforced.is_empty());
}

// ---- reported consumers -----------------------------------------------------

fn app(name: &str) -> vramd_protocol::ConsumerReport {
    vramd_protocol::ConsumerReport {
        name: name.into(),
        kind: "http".into(),
        device: Some(0),
        priority: 3,
        reachable: true,
        resident_bytes: 2 * G,
        models: vec!["tts".into()],
        last_eviction_ms: Some(1_000),
        last_error: None,
        last_error_at_ms: None,
    }
}

fn report(consumers: Vec<vramd_protocol::ConsumerReport>) -> ClientMessage {
    ClientMessage::ReportConsumers { tag: 4, consumers }
}

fn reported_count(effects: &[Effect]) -> Option<u32> {
    effects.iter().find_map(|e| match e {
        Effect::Reply {
            msg: ServerMessage::ConsumersReported { tag: 4, count },
            ..
        } => Some(*count),
        _ => None,
    })
}

#[test]
fn reported_consumers_are_listed_replaced_and_dropped_with_their_connection() {
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    let mut failing = app("tts");
    failing.last_error = Some("unload: answered 500".into());
    failing.last_error_at_ms = Some(1_700_000_000_000);
    let e = request(&mut l, ConnId(1), report(vec![failing, app("img")]), t0);
    assert_eq!(reported_count(&e), Some(2), "{e:?}");
    let e = request(&mut l, ConnId(2), report(vec![app("other")]), t0);
    assert_eq!(reported_count(&e), Some(1), "{e:?}");
    let st = l.status(peer(9), ms(t0, 500));
    let names: Vec<&str> = st.consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["tts", "img", "other"]);
    assert_eq!(st.consumers[0].kind, "http");
    assert_eq!(st.consumers[0].resident_bytes, 2 * G);
    assert_eq!(st.consumers[0].priority, 3);
    assert_eq!(st.consumers[0].device, Some(0));
    // The eviction ages from the report.
    assert_eq!(st.consumers[0].last_eviction_ms, Some(1_500));
    assert_eq!(
        st.consumers[0].last_error.as_deref(),
        Some("unload: answered 500")
    );
    assert_eq!(st.consumer_errors.len(), 1);
    assert_eq!(st.consumer_errors[0].name, "tts");
    assert_eq!(st.consumer_errors[0].message, "unload: answered 500");
    assert_eq!(st.consumer_errors[0].at_ms, Some(1_700_000_000_000));
    // A new report replaces the connection's list; the other stays.
    let e = request(&mut l, ConnId(1), report(vec![app("img")]), ms(t0, 600));
    assert_eq!(reported_count(&e), Some(1));
    let st = l.status(peer(9), ms(t0, 600));
    let names: Vec<&str> = st.consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["img", "other"]);
    assert!(st.consumer_errors.is_empty());
    // The connection closes: its consumers go, the other's stay.
    l.disconnect(ConnId(1), ms(t0, 700));
    let st = l.status(peer(9), ms(t0, 700));
    let names: Vec<&str> = st.consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["other"]);
    // An empty report withdraws them.
    let e = request(&mut l, ConnId(2), report(vec![]), ms(t0, 800));
    assert_eq!(reported_count(&e), Some(0));
    assert!(l.status(peer(9), ms(t0, 800)).consumers.is_empty());
}

#[test]
fn a_report_out_of_bounds_is_refused_and_changes_nothing() {
    use vramd_protocol::{
        MAX_CONSUMER_ERROR_BYTES, MAX_CONSUMER_KIND_BYTES, MAX_CONSUMER_MODEL_BYTES,
        MAX_CONSUMER_MODELS, MAX_CONSUMER_NAME_BYTES, MAX_REPORTED_CONSUMERS,
    };
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    let e = request(&mut l, ConnId(1), report(vec![app("kept")]), t0);
    assert_eq!(reported_count(&e), Some(1));
    let with = |f: &dyn Fn(&mut vramd_protocol::ConsumerReport)| {
        let mut c = app("x");
        f(&mut c);
        vec![c]
    };
    let cases: Vec<(Vec<vramd_protocol::ConsumerReport>, &str)> = vec![
        (with(&|c| c.name.clear()), "name is empty"),
        (
            with(&|c| c.name = "n".repeat(MAX_CONSUMER_NAME_BYTES + 1)),
            "over the limit of 128",
        ),
        (with(&|c| c.kind.clear()), "kind is empty"),
        (
            with(&|c| c.kind = "k".repeat(MAX_CONSUMER_KIND_BYTES + 1)),
            "kind is 33 bytes",
        ),
        (
            with(&|c| c.models = vec!["m".into(); MAX_CONSUMER_MODELS + 1]),
            "33 models",
        ),
        (
            with(&|c| c.models = vec!["m".repeat(MAX_CONSUMER_MODEL_BYTES + 1)]),
            "a model name is 257 bytes",
        ),
        (
            with(&|c| c.last_error = Some("e".repeat(MAX_CONSUMER_ERROR_BYTES + 1))),
            "last_error is 1025 bytes",
        ),
        (vec![app("a"), app("a")], "listed twice"),
        (
            (0..=MAX_REPORTED_CONSUMERS)
                .map(|i| app(&format!("a{i}")))
                .collect(),
            "65 consumers",
        ),
    ];
    for (consumers, want) in cases {
        let e = request(&mut l, ConnId(1), report(consumers), ms(t0, 1));
        let message = e
            .iter()
            .find_map(|e| match e {
                Effect::Reply {
                    msg:
                        ServerMessage::Error {
                            tag: 4,
                            kind: ErrorKind::BadRequest,
                            message,
                        },
                    ..
                } => Some(message.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{want}: not refused: {e:?}"));
        assert!(message.contains(want), "{want}: {message}");
        assert!(message.starts_with("report_consumers: "), "{message}");
    }
    let st = l.status(peer(9), ms(t0, 2));
    let names: Vec<&str> = st.consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["kept"], "a refused report leaves the previous one");
    // The daemon-wide bound: another connection cannot push past it, and
    // what connection 1 reported stays.
    let many: Vec<_> = (0..MAX_REPORTED_CONSUMERS)
        .map(|i| app(&format!("b{i}")))
        .collect();
    let e = request(&mut l, ConnId(2), report(many.clone()), ms(t0, 3));
    assert_eq!(failed_reply(&e), Some(ErrorKind::LimitExceeded), "{e:?}");
    assert_eq!(l.status(peer(9), ms(t0, 3)).consumers.len(), 1);
    // Its own previous entries do not count against a replacement.
    let e = request(&mut l, ConnId(1), report(many), ms(t0, 4));
    assert_eq!(reported_count(&e), Some(MAX_REPORTED_CONSUMERS as u32));
}

#[test]
fn the_most_that_can_be_reported_still_fits_in_one_status_frame() {
    use vramd_protocol::{
        Encoding, MAX_CONSUMER_ERROR_BYTES, MAX_CONSUMER_KIND_BYTES, MAX_CONSUMER_MODEL_BYTES,
        MAX_CONSUMER_MODELS, MAX_CONSUMER_NAME_BYTES, MAX_REPORTED_CONSUMERS, encode,
    };
    let t0 = Instant::now();
    let mut l = sim(&[24 * G]);
    let widest = |i: usize| {
        let mut c = app(&format!("{i:0>width$}", width = MAX_CONSUMER_NAME_BYTES));
        c.kind = "k".repeat(MAX_CONSUMER_KIND_BYTES);
        c.models = (0..MAX_CONSUMER_MODELS)
            .map(|m| format!("{m:0>width$}", width = MAX_CONSUMER_MODEL_BYTES))
            .collect();
        c.last_error = Some("e".repeat(MAX_CONSUMER_ERROR_BYTES));
        c.last_error_at_ms = Some(u64::MAX);
        c.last_eviction_ms = Some(u64::MAX);
        c
    };
    let all: Vec<_> = (0..MAX_REPORTED_CONSUMERS).map(widest).collect();
    let e = request(&mut l, ConnId(1), report(all), t0);
    assert_eq!(reported_count(&e), Some(MAX_REPORTED_CONSUMERS as u32));
    let status = l.status(admin(), ms(t0, 1));
    assert_eq!(status.consumers.len(), MAX_REPORTED_CONSUMERS);
    assert_eq!(status.consumer_errors.len(), MAX_REPORTED_CONSUMERS);
    let msg = ServerMessage::Status {
        tag: u64::MAX,
        status: Box::new(status),
    };
    let frame = encode(Encoding::Binary, &msg).expect("fits in one frame");
    // At most three quarters of a frame: the rest of a status (cut to fit
    // by `StatusReport::fit`) keeps a quarter at least.
    assert!(
        frame.len() < vramd_protocol::MAX_FRAME_BYTES * 3 / 4,
        "{}",
        frame.len()
    );
}
