//! The drain limit end to end: a model kept busy by a steady stream of
//! requests through the gateway cannot starve a higher-priority waiter in
//! vramd. The real daemon on a simulated card, the fake Ollama and the
//! gateway binary; every wait and loop is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use vramd_client::{GIB, Request};
use vramd_tests::fake_ollama::{FakeOllama, ModelDef};
use vramd_tests::gateway_rig::{Gateway, free_port, http};
use vramd_tests::{Daemon, WAIT};

const MODEL: &str = "tiny:latest";

/// Longest any stream thread runs.
const STREAM_LIMIT: Duration = Duration::from_secs(20);

/// Starts `clients` threads that each send a request for the model every
/// 40 ms (so the model never stays unused for the 250 ms the gateway waits
/// before marking it idle) until `stop`; returns them with the count of
/// answers that were not 200.
fn stream(
    listen: std::net::SocketAddr,
    clients: usize,
    stop: &Arc<AtomicBool>,
    bad: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<usize>> {
    (0..clients)
        .map(|_| {
            let (stop, bad) = (stop.clone(), bad.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && started.elapsed() < STREAM_LIMIT {
                    let body = json!({"model": MODEL, "prompt": "x", "stream": false});
                    let r = http(listen, "POST", "/api/generate", Some(&body), &[]);
                    if r.status != 200 {
                        bad.fetch_add(1, Ordering::SeqCst);
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(40));
                }
                n
            })
        })
        .collect()
}

fn rig(drain_limit: &str) -> (Daemon, FakeOllama, Gateway, std::net::SocketAddr) {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let o = FakeOllama::start(&[ModelDef::new(MODEL, 6 * GIB, 8 * GIB)]);
    let listen = free_port();
    let apps = format!(
        "[[app]]\nname = \"ollama\"\nkind = \"ollama\"\nupstream = \"{}\"\nlisten = \"{listen}\"\n\
         drain_limit = \"{drain_limit}\"\n[app.sizes]\n\"tiny\" = \"8GiB\"\n",
        o.url()
    );
    let g = Gateway::start(d.socket(), "", &apps, &[listen]);
    (d, o, g, listen)
}

/// A busy model with a steady stream of requests and a higher-priority
/// waiter for its room: the waiter is granted within the drain limit plus
/// the time the model takes to drain and unload, while requests that came
/// meanwhile wait and are served after.
#[test]
fn a_steady_stream_of_requests_cannot_starve_a_waiter_past_the_drain_limit() {
    let drain = Duration::from_millis(500);
    let (d, o, g, listen) = rig("500ms");
    let (stop, bad) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let threads = stream(listen, 2, &stop, &bad);
    d.wait_status("the model held and busy", |s| {
        s.reservations.len() == 1 && !s.reservations[0].idle
    });

    let c = d.client();
    let asked = Instant::now();
    let job = c
        .reserve(
            Request::new(8 * GIB)
                .label("image-job")
                .priority(5)
                .timeout(WAIT),
        )
        .unwrap_or_else(|e| panic!("{e}; gateway log:\n{}", g.log()));
    let waited = asked.elapsed();
    eprintln!("the waiter was granted after {waited:?} (drain limit {drain:?})");
    // The bound: the drain limit, a poll and a status refresh (100 ms
    // each), the idle linger (250 ms), the unload and its /api/ps check,
    // and slack for a loaded 2-core machine.
    let bound = drain + Duration::from_millis(2_500);
    assert!(
        waited >= drain,
        "granted after {waited:?}, before the drain limit: the model was not busy?"
    );
    assert!(waited <= bound, "granted after {waited:?} > {bound:?}");
    assert!(o.loaded().is_empty(), "granted while the model was loaded");
    assert!(g.log().contains("draining"), "{}", g.log());
    assert_eq!(o.unload_requests(), [MODEL]);
    let m = http(g.admin, "GET", "/metrics", None, &[]).text();
    assert!(
        m.contains("vramd_gateway_model_drains_total{app=\"ollama\",model=\"tiny:latest\"} 1"),
        "{m}"
    );

    // The stream's requests wait for the room meanwhile, then are served.
    d.wait_status("the stream's request queued behind the job", |s| {
        s.queue
            .iter()
            .any(|q| q.label.as_deref() == Some("ollama/tiny:latest"))
    });
    drop(job);
    d.wait_status("the model held again", |s| {
        s.reservations
            .iter()
            .any(|r| r.label.as_deref() == Some("ollama/tiny:latest"))
    });
    stop.store(true, Ordering::SeqCst);
    let sent: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(sent > 4, "the stream sent only {sent} requests");
    assert_eq!(bad.load(Ordering::SeqCst), 0, "every request was served");
    assert_eq!(o.loads(MODEL), 2);
}

/// The same stream with a waiter that does not outrank the model (a lower
/// priority, aging by one level per 10 s): the model keeps being served and
/// nothing is drained or evicted.
#[test]
fn a_waiter_that_does_not_outrank_the_model_does_not_drain_it() {
    let (d, o, g, listen) = rig("200ms");
    let (stop, bad) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let threads = stream(listen, 2, &stop, &bad);
    d.wait_status("the model held and busy", |s| {
        s.reservations.len() == 1 && !s.reservations[0].idle
    });
    let c = d.client();
    let p = c
        .submit(
            Request::new(8 * GIB)
                .priority(-3)
                .timeout(Duration::from_millis(1_200)),
        )
        .unwrap();
    // Requests 40 ms apart keep the model busy in vramd all along (it is
    // marked idle only 250 ms after the last one).
    let until = Instant::now() + Duration::from_millis(1_000);
    while Instant::now() < until {
        let s = c.status().unwrap();
        assert!(
            s.reservations.iter().all(|r| !r.idle),
            "marked idle between back-to-back requests: {:?}",
            s.reservations
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = p.wait().unwrap_err();
    assert!(matches!(e, vramd_client::Error::WaitTimeout(_)), "{e}");
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    assert!(!g.log().contains("draining"), "{}", g.log());
    assert!(o.unload_requests().is_empty());
    assert_eq!(o.loads(MODEL), 1);
}
