//! Eviction end to end: idle SDK holders asked through their callback and
//! skipped when they ignore it, by priority and minimum residency. (Apps
//! that load on their own — Ollama, ComfyUI, HTTP services, commands — are
//! evicted through vramd-gateway's reservations: tests/tests/gateway_*.rs.)

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vramd_client::{Error, GIB, Request};
use vramd_tests::{Daemon, WAIT, wait_until};

// ---- SDK holders (a simulated device is enough) ----------------------------

/// A simulated 24 GiB device; evictions have 600 ms; idle reservations may
/// be evicted at once unless `min_residency` says otherwise.
fn sim(min_residency: &str) -> Daemon {
    Daemon::start(&[
        "--min-residency",
        min_residency,
        "--eviction-deadline",
        "600ms",
    ])
}

#[test]
fn an_idle_holder_runs_its_callback_then_releases() {
    let d = sim("0s");
    let holder = d.client();
    let r = holder
        .reserve(Request::new(20 * GIB).label("chat").evictable(true))
        .unwrap();
    let unloaded = Arc::new(AtomicBool::new(false));
    let flag = unloaded.clone();
    r.on_evict(move |e| {
        assert!(e.reason.contains("10.00 GiB"), "{}", e.reason);
        std::thread::sleep(Duration::from_millis(100)); // "unloading"
        flag.store(true, Ordering::SeqCst);
    });
    let waiter = d.client();
    let g = waiter
        .reserve(Request::new(10 * GIB).timeout(WAIT))
        .unwrap();
    assert!(
        unloaded.load(Ordering::SeqCst),
        "granted before the callback finished"
    );
    assert!(wait_until(WAIT, || r.is_evicted()));
    let s = waiter.status().unwrap();
    assert_eq!(
        (
            s.counters.evictions_requested,
            s.counters.evictions_completed
        ),
        (1, 1)
    );
    drop(g);
    drop(r); // already released: dropping sends nothing
}

#[test]
fn busy_holders_are_never_asked_and_idle_ones_only_when_marked() {
    let d = sim("0s");
    let holder = d.client();
    let r = holder.reserve(Request::new(20 * GIB)).unwrap();
    let asked = Arc::new(AtomicBool::new(false));
    let flag = asked.clone();
    r.on_evict(move |_| flag.store(true, Ordering::SeqCst));
    let waiter = d.client();
    let e = waiter
        .reserve(Request::new(10 * GIB).timeout(Duration::from_millis(400)))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)));
    assert!(!asked.load(Ordering::SeqCst));
    // Idle now: the waiting request gets it.
    let p = waiter.submit(Request::new(10 * GIB).timeout(WAIT)).unwrap();
    r.set_idle(true).unwrap();
    let _granted = p.wait().unwrap();
    assert!(asked.load(Ordering::SeqCst));
    assert!(
        holder
            .status()
            .unwrap()
            .reservations
            .iter()
            .all(|x| x.bytes != 20 * GIB)
    );
}

#[test]
fn a_holder_that_ignores_the_request_is_skipped_after_its_deadline() {
    let d = sim("0s");
    let stuck = d.client();
    let a = stuck
        .reserve(Request::new(12 * GIB).evictable(true))
        .unwrap();
    a.on_evict(|_| std::thread::sleep(Duration::from_secs(4)));
    let polite = d.client();
    let b = polite
        .reserve(Request::new(12 * GIB).evictable(true))
        .unwrap();
    let waiter = d.client();
    let t = Instant::now();
    let g = waiter
        .reserve(Request::new(12 * GIB).timeout(WAIT))
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "the stuck holder's deadline was not waited for"
    );
    assert!(wait_until(WAIT, || b.is_evicted()));
    let s = waiter.status().unwrap();
    assert_eq!(s.counters.evictions_failed, 1);
    assert!(d.log().contains("eviction failed"));
    drop((g, a));
}

#[test]
fn victims_respect_priority_and_minimum_residency() {
    let d = sim("800ms");
    let lo = d.client();
    let hi = d.client();
    // Taken before the grant, so the daemon's grant time is not earlier.
    let before_grant = Instant::now();
    let r_lo = lo
        .reserve(Request::new(12 * GIB).priority(0).evictable(true))
        .unwrap();
    let r_hi = hi
        .reserve(Request::new(12 * GIB).priority(2).evictable(true))
        .unwrap();
    let waiter = d.client();
    let g = waiter
        .reserve(Request::new(12 * GIB).priority(2).timeout(WAIT))
        .unwrap();
    assert!(
        before_grant.elapsed() >= Duration::from_millis(800),
        "evicted before its minimum residency"
    );
    assert!(wait_until(WAIT, || r_lo.is_evicted()));
    assert!(!r_hi.is_evicted(), "the higher-priority holder was evicted");
    // A lower-priority waiter never evicts the priority-2 holder.
    let e = lo
        .reserve(Request::new(12 * GIB).timeout(Duration::from_millis(1500)))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)));
    assert!(!r_hi.is_evicted());
    drop((g, r_hi));
}

#[test]
fn vramctl_reserve_evictable_prints_the_request_and_releases() {
    let d = sim("0s");
    let mut child = d
        .vramctl()
        .args(["reserve", "20GiB", "--evictable", "--label", "warm"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.starts_with("granted"), "{line}");
    let c = d.client();
    assert!(c.status().unwrap().reservations[0].idle);
    let g = c.reserve(Request::new(10 * GIB).timeout(WAIT)).unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.starts_with("eviction requested"), "{line}");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vramctl did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    drop(g);
}
