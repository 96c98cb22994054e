//! Reservations through the Rust SDK against the real daemon.

use std::time::Duration;

use vramd_client::{DeviceSelector, Error, GIB, Progress, Request};
use vramd_tests::{Daemon, WAIT, wait_until};

#[test]
fn queued_request_is_granted_when_the_holder_releases() {
    let d = Daemon::start(&[]);
    let a = d.client();
    let b = d.client();
    let held = a.reserve(Request::new(20 * GIB).label("image")).unwrap();
    assert_eq!(held.device_index(), 0);
    assert_eq!(held.device_uuid(), "SIM-0");
    let mut pending = b.submit(Request::new(10 * GIB).label("chat")).unwrap();
    match pending.next(Some(WAIT)).unwrap() {
        Some(Progress::Queued { position, .. }) => assert_eq!(position, 1),
        other => panic!("expected queued, got {other:?}"),
    }
    assert!(
        pending
            .next(Some(Duration::from_millis(200)))
            .unwrap()
            .is_none(),
        "granted past capacity"
    );
    held.release().unwrap();
    match pending.next(Some(WAIT)).unwrap() {
        Some(Progress::Granted(r)) => assert_eq!(r.bytes(), 10 * GIB),
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn dropping_the_guard_or_the_client_releases() {
    let d = Daemon::start(&[]);
    let a = d.client();
    let r1 = a.reserve(Request::new(8 * GIB)).unwrap();
    let r2 = a.reserve(Request::new(8 * GIB)).unwrap();
    let _r3 = a.reserve(Request::new(8 * GIB)).unwrap();
    drop(r1);
    let obs = d.client();
    d.wait_status("two reservations", |s| s.reservations.len() == 2);
    // Dropping the client closes its connection: everything it held goes.
    let waiter = d.client();
    let pending = waiter.submit(Request::new(24 * GIB)).unwrap();
    std::mem::forget(r2); // even a leaked guard cannot outlive its connection
    drop(a);
    let r = pending.wait().unwrap();
    assert_eq!(r.bytes(), 24 * GIB);
    let s = obs.status().unwrap();
    assert_eq!(s.counters.disconnect_releases, 2);
}

#[test]
fn wait_limit_ends_in_a_timeout_error() {
    let d = Daemon::start(&[]);
    let c = d.client();
    let _full = c.reserve(Request::new(24 * GIB)).unwrap();
    let other = d.client();
    let err = other
        .reserve(Request::new(GIB).timeout(Duration::from_millis(200)))
        .unwrap_err();
    assert!(matches!(err, Error::WaitTimeout(_)), "{err:?}");
    let err = other
        .reserve(Request::new(GIB).timeout(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(err, Error::WaitTimeout(_)), "{err:?}");
    let s = other.status().unwrap();
    assert_eq!(s.counters.timeouts, 2);
    assert!(s.queue.is_empty());
}

#[test]
fn cancel_withdraws_a_waiting_request() {
    let d = Daemon::start(&[]);
    let c = d.client();
    let full = c.reserve(Request::new(24 * GIB)).unwrap();
    let other = d.client();
    let mut p = other.submit(Request::new(GIB).label("cancel-me")).unwrap();
    assert!(matches!(
        p.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { .. })
    ));
    assert_eq!(other.status().unwrap().queue.len(), 1);
    p.cancel().unwrap();
    d.wait_status("an empty queue", |s| s.queue.is_empty());
    drop(full);
    // The cancelled request was not granted behind our back.
    d.wait_status("every reservation released", |s| s.reservations.is_empty());
    assert_eq!(other.status().unwrap().counters.cancels, 1);
}

#[test]
fn higher_priority_is_granted_first() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let full = holder.reserve(Request::new(24 * GIB)).unwrap();
    let low_c = d.client();
    let high_c = d.client();
    let mut low = low_c
        .submit(Request::new(16 * GIB).priority(0).label("low"))
        .unwrap();
    assert!(matches!(
        low.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    let mut high = high_c
        .submit(Request::new(16 * GIB).priority(5).label("high"))
        .unwrap();
    assert!(matches!(
        high.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    // The low one is told it moved back.
    assert!(matches!(
        low.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 2, .. })
    ));
    drop(full);
    let granted = high.next(Some(WAIT)).unwrap();
    assert!(matches!(granted, Some(Progress::Granted(_))), "{granted:?}");
    // The low one moves up but is not granted: the high one holds 16 of 24.
    assert!(matches!(
        low.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    assert!(
        low.next(Some(Duration::from_millis(200)))
            .unwrap()
            .is_none()
    );
}

#[test]
fn impossible_requests_are_refused_at_once() {
    let d = Daemon::start(&["--cushion", "1GiB"]);
    let c = d.client();
    let e = c.reserve(Request::new(24 * GIB)).unwrap_err();
    assert!(
        matches!(&e, Error::Refused(m) if m.contains("can never fit")),
        "{e}"
    );
    let e = c
        .reserve(Request::new(GIB).device(DeviceSelector::Index(3)))
        .unwrap_err();
    assert!(
        matches!(&e, Error::Refused(m) if m.contains("no device 3")),
        "{e}"
    );
    let e = c.reserve(Request::new(0)).unwrap_err();
    assert!(matches!(e, Error::Refused(_)), "{e}");
    assert!(c.reserve(Request::new(23 * GIB)).is_ok());
    assert_eq!(c.status().unwrap().counters.refusals, 3);
}

#[test]
fn two_devices_by_index_uuid_and_any() {
    let d = Daemon::start(&["--simulate", "8GiB"]);
    let c = d.client();
    let on1 = c
        .reserve(Request::new(6 * GIB).device(DeviceSelector::Index(1)))
        .unwrap();
    assert_eq!((on1.device_index(), on1.device_uuid()), (1, "SIM-1"));
    let by_uuid = c
        .reserve(Request::new(GIB).device(DeviceSelector::Uuid("SIM-1".into())))
        .unwrap();
    assert_eq!(by_uuid.device_index(), 1);
    // Any: the device with most room (0 has 24, 1 has 1 left).
    let any = c.reserve(Request::new(2 * GIB)).unwrap();
    assert_eq!(any.device_index(), 0);
    // 2 GiB on device 1 must wait even though device 0 has room.
    let mut p = c
        .submit(Request::new(2 * GIB).device(DeviceSelector::Index(1)))
        .unwrap();
    assert!(matches!(
        p.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { .. })
    ));
    drop(on1);
    let _moved = match p.next(Some(WAIT)).unwrap() {
        Some(Progress::Granted(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(_moved.device_index(), 1);
    let s = c.status().unwrap();
    assert_eq!(s.devices.len(), 2);
    assert_eq!(s.devices[1].reserved_bytes, 3 * GIB);
    assert_eq!(s.devices[1].available_bytes, 5 * GIB);
}

#[test]
fn many_waiters_on_one_connection_and_status_schema() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let full = holder.reserve(Request::new(24 * GIB)).unwrap();
    let c = d.client();
    let pendings: Vec<_> = (0..4)
        .map(|i| {
            c.submit(Request::new(6 * GIB).label(format!("w{i}")))
                .unwrap()
        })
        .collect();
    assert!(wait_until(WAIT, || c.status().unwrap().queue.len() == 4));
    let s = c.status().unwrap();
    assert_eq!(s.backend, "simulated");
    let labels: Vec<_> = s.queue.iter().map(|q| q.label.clone().unwrap()).collect();
    assert_eq!(labels, ["w0", "w1", "w2", "w3"]);
    assert_eq!(s.queue[0].pid, std::process::id());
    assert_eq!(s.reservations[0].bytes, 24 * GIB);
    drop(full);
    let granted: Vec<_> = pendings.into_iter().map(|p| p.wait().unwrap()).collect();
    assert_eq!(granted.len(), 4);
    assert_eq!(c.status().unwrap().devices[0].available_bytes, 0);
}

#[test]
fn async_client_reserves_without_blocking_the_runtime() {
    let d = Daemon::start(&[]);
    let socket = d.socket().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let a = vramd_client::AsyncClient::connect(socket.clone())
            .await
            .unwrap();
        let b = vramd_client::AsyncClient::connect(socket).await.unwrap();
        let held = a.reserve(Request::new(20 * GIB)).await.unwrap();
        let waiting = b.reserve(Request::new(10 * GIB));
        tokio::pin!(waiting);
        // On a single-threaded runtime, a timer still fires while we wait:
        // the wait does not block the executor.
        tokio::select! {
            r = &mut waiting => panic!("granted past capacity: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        drop(held);
        let r = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("grant in time")
            .unwrap();
        assert_eq!(r.bytes(), 10 * GIB);
        assert_eq!(b.status().await.unwrap().reservations.len(), 1);
    });
}

#[test]
fn status_of_a_long_queue_lists_the_head_and_counts_the_rest() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let _full = holder.reserve(Request::new(24 * GIB)).unwrap();
    let c = d.client();
    let pendings: Vec<_> = (0..1500)
        .map(|_| c.submit(Request::new(GIB)).unwrap())
        .collect();
    assert!(wait_until(WAIT, || c.status().unwrap().queue_total == 1500));
    let s = c.status().unwrap();
    assert_eq!(s.queue.len(), 1000);
    assert_eq!(s.queue[999].position, 1000);
    let out = d.vramctl().arg("status").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("… and 500 more waiting"));
    // Closing the connection withdraws all 1,500 at once (no cancel each).
    drop(c);
    drop(pendings);
}

#[test]
fn with_a_priority_window_a_request_that_waited_it_goes_ahead_by_arrival() {
    let d = Daemon::start(&["--priority-window", "1s"]);
    let holder = d.client();
    let full = holder.reserve(Request::new(24 * GIB)).unwrap();
    let low_c = d.client();
    let high_c = d.client();
    let mut low = low_c
        .submit(Request::new(16 * GIB).priority(0).label("low"))
        .unwrap();
    assert!(matches!(
        low.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    let mut high = high_c
        .submit(Request::new(16 * GIB).priority(5).label("high"))
        .unwrap();
    // Inside the window: strict priority.
    assert!(matches!(
        high.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    assert!(matches!(
        low.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 2, .. })
    ));
    // A second later, with no other event, the daemon's timer promotes the
    // low one: it is ahead by arrival, and both are told.
    assert!(matches!(
        low.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    assert!(matches!(
        high.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 2, .. })
    ));
    drop(full);
    let granted = low.next(Some(WAIT)).unwrap();
    assert!(matches!(granted, Some(Progress::Granted(_))), "{granted:?}");
    // The high one moves up but does not fit beside it.
    assert!(matches!(
        high.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    assert!(
        high.next(Some(Duration::from_millis(200)))
            .unwrap()
            .is_none()
    );
}

#[test]
fn with_an_adaptive_guard_a_busy_card_keeps_backfilling_past_the_fixed_guard() {
    // Fixed guard 1 s; each request's own guard is 10 × the recent mean wait.
    let d = Daemon::start(&[
        "--starvation-guard",
        "1s",
        "--adaptive-guard",
        "1h",
        "--adaptive-guard-factor",
        "10",
    ]);
    let holder = d.client();
    let first = holder.reserve(Request::new(20 * GIB)).unwrap();
    let w_c = d.client();
    let mut w = w_c.submit(Request::new(20 * GIB)).unwrap();
    assert!(matches!(
        w.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    std::thread::sleep(Duration::from_millis(1500));
    drop(first);
    let granted = w.next(Some(WAIT)).unwrap();
    assert!(matches!(granted, Some(Progress::Granted(_))), "{granted:?}");
    // Waits so far: 0 and ≥ 1.5 s, so a new request's guard is ≥ 7.5 s.
    let big_c = d.client();
    let mut big = big_c.submit(Request::new(20 * GIB)).unwrap();
    assert!(matches!(
        big.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { position: 1, .. })
    ));
    std::thread::sleep(Duration::from_millis(2500));
    // Past the fixed 1 s guard, well within its own: a small request that
    // fits beside the holder is granted ahead of it.
    let small_c = d.client();
    let small = small_c
        .reserve(Request::new(2 * GIB).timeout(Duration::ZERO))
        .unwrap();
    drop(small);
}
