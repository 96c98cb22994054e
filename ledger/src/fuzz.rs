//! Fuzzing of the ledger's one entry point with random input sequences, as
//! property tests (counts in docs/testing.md): any message any client may
//! send — out-of-range sizes, devices, ids, priorities and wait limits
//! included — interleaved with disconnects, ticks at random times and (for
//! a measured backend) random readings and read failures. After every input
//! the ledger's invariants hold (`tests::check_invariants`: indices and sums
//! match a walk, no device overcommitted, no waiter that fits held back
//! without cause, positions current, counters consistent) and a status
//! report can be made for anyone.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use vramd_protocol::{ClientMessage, DeviceSelector, ReservationId, ReserveRequest};

use crate::tests::check_invariants;
use crate::{
    ConnId, DeviceSpec, Input, Ledger, LedgerConfig, Peer, ProcessUsage, Reading, ReadingSource,
};

const G: u64 = 1 << 30;

/// Cases per property, and most inputs per case.
const CASES: u32 = 1024;
const MAX_INPUTS: usize = 80;

fn arb_bytes() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (1u64..16).prop_map(|g| g * G),
        1 => Just(0u64),
        1 => any::<u64>(),
        1 => 1u64..4096,
    ]
}

fn arb_selector() -> impl Strategy<Value = DeviceSelector> {
    prop_oneof![
        3 => Just(DeviceSelector::Any),
        2 => (0u32..3).prop_map(DeviceSelector::Index),
        1 => any::<u32>().prop_map(DeviceSelector::Index),
        1 => prop_oneof![Just("SIM-0".to_string()), Just("SIM-1".to_string()), "[A-Z-]{0,8}"]
            .prop_map(DeviceSelector::Uuid),
    ]
}

/// An id that is often one the ledger handed out (they count from 1).
fn arb_id() -> impl Strategy<Value = ReservationId> {
    prop_oneof![4 => 1u64..40, 1 => any::<u64>()].prop_map(ReservationId)
}

fn arb_msg() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        8 => (0u64..6, arb_bytes(), arb_selector(), prop_oneof![-3i32..4, any::<i32>()],
              proptest::option::of(".{0,8}"),
              proptest::option::of(prop_oneof![0u64..30_000, any::<u64>()]), any::<bool>())
            .prop_map(|(tag, bytes, device, priority, label, timeout_ms, evictable)| {
                ClientMessage::Reserve(ReserveRequest { tag, bytes, device, priority, label, timeout_ms, evictable })
            }),
        2 => (0u64..6).prop_map(|tag| ClientMessage::Cancel { tag }),
        4 => (0u64..6, arb_id()).prop_map(|(tag, id)| ClientMessage::Release { tag, id }),
        1 => (0u64..6).prop_map(|tag| ClientMessage::Status { tag }),
        1 => (0u64..6).prop_map(|tag| ClientMessage::Ping { tag }),
        1 => (0u64..6, arb_id(), proptest::collection::vec(prop_oneof![100u32..110, any::<u32>()], 0..4))
            .prop_map(|(tag, id, pids)| ClientMessage::AttachPids { tag, id, pids }),
        2 => (0u64..6, arb_id(), any::<bool>())
            .prop_map(|(tag, id, idle)| ClientMessage::SetIdle { tag, id, idle }),
        3 => (0u64..6, arb_bytes(), arb_selector(), -3i32..4, any::<bool>(),
              proptest::collection::vec(prop_oneof![4 => 100u32..110, 1 => any::<u32>()], 0..3))
            .prop_map(|(tag, bytes, device, priority, evictable, pids)| ClientMessage::ReserveFor {
                request: ReserveRequest { tag, bytes, device, priority, label: None, timeout_ms: None, evictable },
                pids,
            }),
        2 => (0u64..6, arb_id(), arb_bytes())
            .prop_map(|(tag, id, bytes)| ClientMessage::Resize { tag, id, bytes }),
        1 => (any::<u32>(), ".{0,4}").prop_map(|(version, client)| ClientMessage::Hello { version, client }),
        1 => (0u64..6).prop_map(|tag| ClientMessage::EnableReclaim { tag }),
        1 => (0u64..6, arb_id(), "[0-9a-f]{0,33}")
            .prop_map(|(tag, id, token)| ClientMessage::Reclaim { tag, id, token }),
    ]
}

fn arb_reading() -> impl Strategy<Value = Result<Reading, String>> {
    prop_oneof![
        4 => (0u64..40, proptest::option::of(proptest::collection::vec((100u32..110, 0u64..8), 0..4)))
            .prop_map(|(used, procs)| Ok(Reading {
                used_bytes: used * G,
                processes: procs.map(|v| v.into_iter().map(|(pid, g)| ProcessUsage::new(pid, g * G)).collect()),
            })),
        1 => Just(Err("fuzzed read failure".to_string())),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Request {
        conn: u64,
        uid: u32,
        admin: bool,
        msg: ClientMessage,
    },
    Disconnect {
        conn: u64,
    },
    Tick,
    Reading {
        device: usize,
        result: Result<Reading, String>,
    },
    /// The daemon restarts: a new ledger restored from this one's snapshot.
    Restart,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => (0u64..5, 1000u32..1003, proptest::bool::weighted(0.2), arb_msg())
            .prop_map(|(conn, uid, admin, msg)| Step::Request { conn, uid, admin, msg }),
        1 => (0u64..5).prop_map(|conn| Step::Disconnect { conn }),
        2 => Just(Step::Tick),
        2 => (0usize..2, arb_reading()).prop_map(|(device, result)| Step::Reading { device, result }),
        1 => Just(Step::Restart),
    ]
}

fn ledger(measured: bool, small_limits: bool, policy: u8) -> Ledger {
    let mut config = if small_limits {
        LedgerConfig {
            max_queued_per_uid: 3,
            max_reservations_per_uid: 4,
            max_bytes_per_uid: Some(20 * G),
            ..LedgerConfig::default()
        }
    } else {
        LedgerConfig::default()
    };
    // The scheduling rules: the default (adaptive guard), a priority
    // window, a short adaptive cap, the fixed guard.
    match policy {
        1 => config.priority_window = Some(Duration::from_secs(60)),
        2 => {
            config.adaptive_guard = Some(crate::AdaptiveGuard {
                factor: 4,
                cap: Duration::from_secs(600),
            })
        }
        3 => config.adaptive_guard = None,
        _ => {}
    }
    let source = if measured {
        ReadingSource::Measured(Reading {
            used_bytes: 0,
            processes: Some(vec![]),
        })
    } else {
        ReadingSource::Simulated
    };
    let devices = (0..2u32)
        .map(|i| DeviceSpec {
            index: i,
            uuid: format!("SIM-{i}"),
            name: "fuzz".into(),
            total_bytes: 16 * G,
        })
        .collect();
    Ledger::new(config, devices, source, Instant::now())
}

/// Cases per property: `CASES`, or `VRAMD_FUZZ_CASES` for a long run
/// (docs/testing.md).
fn cases() -> u32 {
    std::env::var("VRAMD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_input_sequences_keep_every_invariant(
        measured in any::<bool>(),
        small_limits in any::<bool>(),
        policy in 0u8..4,
        steps in proptest::collection::vec((arb_step(), prop_oneof![Just(0u64), 0u64..5_000, 0u64..120_000]), 1..MAX_INPUTS),
    ) {
        let mut l = ledger(measured, small_limits, policy);
        let t0 = Instant::now();
        let mut now = t0;
        for (step, advance_ms) in steps {
            now += Duration::from_millis(advance_ms);
            let input = match step {
                Step::Request { conn, uid, admin, msg } => Input::Request {
                    conn: ConnId(conn),
                    peer: Peer { pid: 100 + conn as u32, uid, gid: uid, admin },
                    msg,
                },
                Step::Disconnect { conn } => Input::Disconnect { conn: ConnId(conn) },
                Step::Tick => Input::Tick,
                // A simulated ledger never gets readings from the daemon.
                Step::Reading { device, result } if measured => Input::Reading { device, taken_at: now, result },
                Step::Reading { .. } => Input::Tick,
                Step::Restart => {
                    let snapshot = l.snapshot(now);
                    let saved = snapshot.reservations.len();
                    l = ledger(measured, small_limits, policy).with_reclaim(7, Duration::from_secs(30));
                    let report = l.restore(snapshot, now);
                    prop_assert_eq!(report.held, saved);
                    check_invariants(&l, now)?;
                    Input::Tick
                }
            };
            l.apply(input, now);
            check_invariants(&l, now)?;
            let _ = l.next_wakeup(now);
        }
        for admin in [false, true] {
            let s = l.status(Peer { pid: 1, uid: 1000, gid: 1000, admin }, now);
            prop_assert_eq!(s.reservations_total, l.reservation_count() as u64);
            prop_assert_eq!(s.queue_total, l.waiter_count() as u64);
        }
    }
}
