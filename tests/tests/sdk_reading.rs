//! Who reads a client's socket: a blocking caller reads its own answer when
//! nobody else does, a background thread otherwise (sdk-rust/src/conn.rs).
//! Every answer must reach its caller whoever reads, with several threads,
//! async callers and unsolicited messages on one connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use vramd_client::{Client, Error, GIB, Progress, Request};
use vramd_tests::{Daemon, WAIT, wait_until};

/// Runs `f` on a thread and fails the test if it does not finish within
/// `limit` (a lost answer shows up as a caller that never returns).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("a caller did not get its answer in time")
}

/// Runs `f` to completion on a fresh single-threaded tokio runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn threads_sharing_one_client_all_get_their_answers() {
    let d = Daemon::start(&[]);
    let client = Arc::new(d.client());
    let done = within(Duration::from_secs(60), move || {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let c = client.clone();
                std::thread::spawn(move || {
                    for n in 0..150 {
                        let r = c.reserve(Request::new(GIB).label(format!("t{i}"))).unwrap();
                        if n % 10 == 0 {
                            c.ping().unwrap();
                        }
                        assert_eq!(r.bytes(), GIB);
                        r.release().unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().all(|t| t.join().is_ok())
    });
    assert!(done, "a thread panicked");
    let s = d.client().status().unwrap();
    assert_eq!(s.reservations.len(), 0);
    assert_eq!(s.counters.grants, 600);
}

#[test]
fn a_caller_waiting_in_the_queue_routes_other_threads_answers() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let held = holder.reserve(Request::new(20 * GIB)).unwrap();
    let client = Arc::new(d.client());
    // One thread waits for a grant that cannot come yet: it reads the
    // socket (it leads) the whole time.
    let waiting = {
        let c = client.clone();
        std::thread::spawn(move || c.reserve(Request::new(10 * GIB).timeout(WAIT)))
    };
    let c = client.clone();
    assert!(wait_until(WAIT, || c.status().unwrap().queue.len() == 1));
    // Other threads' answers keep coming meanwhile, through whoever reads.
    let c = client.clone();
    within(WAIT, move || {
        for _ in 0..50 {
            c.ping().unwrap();
            c.reserve(Request::new(GIB)).unwrap().release().unwrap();
        }
    });
    // An async caller on the same connection too.
    let c = client.clone();
    let granted = within(WAIT, move || {
        block_on(async move {
            let p = c.submit(Request::new(2 * GIB)).unwrap();
            tokio::time::timeout(WAIT, p.granted()).await
        })
    });
    let r = granted.expect("async grant in time").unwrap();
    assert_eq!(r.bytes(), 2 * GIB);
    drop(r);
    drop(held);
    let r = waiting.join().unwrap().unwrap();
    assert_eq!(r.bytes(), 10 * GIB);
}

#[test]
fn an_async_waiter_is_served_between_blocking_calls() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let held = holder.reserve(Request::new(20 * GIB)).unwrap();
    let client = Arc::new(d.client());
    let c = client.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (c, stop) = (client.clone(), stop.clone());
        // Blocking calls in a loop: each leads briefly, then leaves.
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 100_000 {
                c.ping().unwrap();
                n += 1;
            }
        })
    };
    let granted = within(WAIT + WAIT, move || {
        block_on(async move {
            let p = c.submit(Request::new(10 * GIB)).unwrap();
            let grant = p.granted();
            tokio::pin!(grant);
            tokio::select! {
                r = &mut grant => panic!("granted past capacity: {r:?}"),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            drop(held);
            tokio::time::timeout(WAIT, grant).await
        })
    });
    stop.store(true, Ordering::SeqCst);
    busy.join().unwrap();
    let r = granted.expect("async grant in time").unwrap();
    assert_eq!(r.bytes(), 10 * GIB);
}

#[test]
fn a_caller_reading_for_itself_learns_when_the_daemon_dies() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let _held = holder.reserve(Request::new(20 * GIB)).unwrap();
    // The daemon does not come back: the caller learns it once the client's
    // reconnect window (shortened here from its 60 s) has passed.
    let client = Client::connect_with(d.socket(), Some(Duration::from_millis(500))).unwrap();
    let mut pending = client.submit(Request::new(10 * GIB)).unwrap();
    match pending.next(Some(WAIT)).unwrap() {
        Some(Progress::Queued { .. }) => {}
        other => panic!("expected queued, got {other:?}"),
    }
    let waiting = std::thread::spawn(move || pending.next(None).map(|p| p.is_some()));
    std::thread::sleep(Duration::from_millis(100));
    d.signal(libc::SIGKILL);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(waiting.join().unwrap());
    });
    match rx.recv_timeout(WAIT).expect("the waiting caller returned") {
        Err(Error::Disconnected) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(matches!(client.ping(), Err(Error::Disconnected)));
}

#[test]
fn a_caller_left_waiting_when_the_reader_returns_is_still_answered() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let h1 = holder.reserve(Request::new(12 * GIB)).unwrap();
    let h2 = holder.reserve(Request::new(12 * GIB)).unwrap();
    let client = Arc::new(d.client());
    // B (16 GiB) is first in the queue, A (8 GiB) second: A is granted by
    // backfill when 12 GiB come free, and B's position does not change (no
    // message for B that could wake it).
    let mut b = client.submit(Request::new(16 * GIB)).unwrap();
    let mut a = client.submit(Request::new(8 * GIB)).unwrap();
    for p in [&mut b, &mut a] {
        assert!(matches!(
            p.next(Some(WAIT)).unwrap(),
            Some(Progress::Queued { .. })
        ));
    }
    // A waits first and reads the socket for both; B waits for A to
    // route its answer.
    let a = std::thread::spawn(move || a.wait());
    std::thread::sleep(Duration::from_millis(100));
    let b = std::thread::spawn(move || b.wait());
    std::thread::sleep(Duration::from_millis(100));
    // A's grant comes first: A returns and stops reading, B still waits.
    drop(h1);
    let ra = within(WAIT, move || a.join().unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // B's grant now reaches B only if someone else reads.
    drop(h2);
    let rb = within(WAIT, move || b.join().unwrap()).unwrap();
    assert_eq!((ra.bytes(), rb.bytes()), (8 * GIB, 16 * GIB));
}

#[test]
fn a_caller_polling_with_a_zero_timeout_still_sees_its_answers() {
    let d = Daemon::start(&[]);
    let holder = d.client();
    let held = holder.reserve(Request::new(20 * GIB)).unwrap();
    let c = d.client();
    let mut p = c.submit(Request::new(10 * GIB)).unwrap();
    // Each zero-timeout poll leads and leaves at once; what arrived must
    // still be read (by the poller itself), not left for a background
    // thread that never gets its turn.
    let mut polls = 0;
    let queued = wait_until(WAIT, || {
        polls += 1;
        matches!(
            p.next(Some(Duration::ZERO)).unwrap(),
            Some(Progress::Queued { .. })
        )
    });
    assert!(queued, "no queue position after {polls} polls");
    drop(held);
    let granted = wait_until(WAIT, || {
        matches!(
            p.next(Some(Duration::ZERO)).unwrap(),
            Some(Progress::Granted(_))
        )
    });
    assert!(granted, "no grant seen by zero-timeout polls");
}
