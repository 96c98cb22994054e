//! Watched apps (an `[[app]]` without `listen`): vramd-gateway mirrors the
//! models Ollama has resident as idle reservations and unloads one through
//! Ollama's API when vramd chooses it — the replacement of the daemon's old
//! built-in Ollama consumer. The real daemon on a simulated card, the fake
//! Ollama (tests/src/fake_ollama.rs) and the gateway binary; every wait is
//! bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::{Error, GIB, MIB, Request};
use vramd_harness::ChildGuard;
use vramd_tests::fake_ollama::{FakeOllama, ModelDef};
use vramd_tests::gateway_rig::{Gateway, http};
use vramd_tests::{Daemon, WAIT, wait_until};

fn addr(o: &FakeOllama) -> SocketAddr {
    o.url()
        .trim_start_matches("http://")
        .parse()
        .expect("the fake's address")
}

/// Loads `model` in the fake directly, as a client that bypasses the
/// gateway would (an empty prompt only loads it).
fn load(o: &FakeOllama, model: &str, keep_alive: Option<Value>) {
    let mut body = json!({"model": model, "prompt": "", "stream": false});
    if let Some(k) = keep_alive {
        body["keep_alive"] = k;
    }
    let r = http(addr(o), "POST", "/api/generate", Some(&body), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
}

fn watched(socket: &std::path::Path, o: &FakeOllama, extra: &str) -> Gateway {
    let apps = format!(
        "[[app]]\nname = \"ollama\"\nkind = \"ollama\"\nupstream = \"{}\"\n{extra}\n",
        o.url()
    );
    Gateway::start(socket, "", &apps, &[])
}

/// `(label, bytes, idle)` of every reservation.
fn reservations(d: &Daemon) -> Vec<(String, u64, bool)> {
    let mut v: Vec<_> = d
        .client()
        .status()
        .expect("status")
        .reservations
        .into_iter()
        .map(|r| (r.label.unwrap_or_default(), r.bytes, r.idle))
        .collect();
    v.sort();
    v
}

/// The seed scenario with Ollama only watched: 9.4 GiB of idle chat models
/// on a 12 GiB card, then a job of 3.5 GiB (the old consumer unloaded all
/// three models where one was enough). The models are mirrored as idle
/// reservations as soon as the gateway starts (they were loaded before
/// it); vramd picks one model, the gateway unloads that one only, and the
/// job is granted once Ollama no longer lists it.
#[test]
fn seed_scenario_a_watched_ollama_unloads_only_the_models_the_image_job_needs() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let models = [
        ("a:1b", 1_200 * MIB),
        ("b:3b", 3_000 * MIB),
        ("c:7b", 5_400 * MIB),
    ];
    let o = FakeOllama::start(
        &models
            .iter()
            .map(|(m, b)| ModelDef::new(m, b / 2, *b))
            .collect::<Vec<_>>(),
    );
    for (m, _) in &models {
        load(&o, m, None);
    }
    let g = watched(d.socket(), &o, "");
    d.wait_status("the three models mirrored, idle", |s| {
        s.reservations.len() == 3 && s.reservations.iter().all(|r| r.idle)
    });
    let want: Vec<_> = models
        .iter()
        .map(|(m, b)| (format!("ollama/{m}"), *b, true))
        .collect();
    assert_eq!(reservations(&d), want);
    let st = g.status();
    assert_eq!(st["apps"][0]["watched"], true);
    assert_eq!(st["apps"][0]["listen"], Value::Null);

    o.set_unload_delay(Duration::from_millis(600));
    let job_bytes = 3_584 * MIB;
    let c = d.client();
    let asked = Instant::now();
    let job = c
        .reserve(Request::new(job_bytes).label("image-job").timeout(WAIT))
        .unwrap_or_else(|e| panic!("{e}; gateway log:\n{}\ndaemon log:\n{}", g.log(), d.log()));
    let waited = asked.elapsed();
    let still: u64 = o
        .loaded()
        .iter()
        .map(|m| models.iter().find(|(n, _)| n == m).unwrap().1)
        .sum();
    assert!(
        still + job_bytes <= 12 * GIB,
        "granted while Ollama still held {still} bytes: {:?}",
        o.loaded()
    );
    assert!(
        waited >= Duration::from_millis(600),
        "granted after {waited:?}, before the models left /api/ps"
    );
    // One model makes room (0.9 GiB were missing): one is unloaded, the
    // others stay loaded and mirrored.
    let unloaded = o.unload_requests();
    assert_eq!(unloaded.len(), 1, "{unloaded:?}");
    let loaded = o.loaded();
    assert_eq!(loaded.len(), 2, "{loaded:?}");
    assert!(!loaded.contains(&unloaded[0]));
    let res = reservations(&d);
    assert_eq!(res.len(), 3, "{res:?}");
    for m in &loaded {
        assert!(res.iter().any(|r| r.0 == format!("ollama/{m}")), "{res:?}");
    }
    let s = d.client().status().unwrap();
    assert_eq!(s.counters.evictions_completed, 1);
    assert_eq!(s.counters.evictions_failed, 0);
    drop(job);
}

#[test]
fn a_mirror_is_released_when_ollama_unloads_by_itself_and_a_pinned_model_is_not_evicted() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let o = FakeOllama::start(&[ModelDef::new("m:latest", GIB, 8 * GIB)]);
    let g = watched(d.socket(), &o, "");
    load(&o, "m", None);
    d.wait_status("mirrored", |s| {
        s.reservations.len() == 1 && s.reservations[0].idle
    });
    // Keep-alive expiry: the mirror goes with the model.
    o.expire_now("m:latest");
    d.wait_status("released", |s| s.reservations.is_empty());
    g.wait_models(0, "no slot left", |m| m.is_empty());

    // Kept forever (keep_alive -1): mirrored busy, never asked to unload.
    load(&o, "m", Some(json!(-1)));
    d.wait_status("mirrored again, busy", |s| {
        s.reservations.len() == 1 && !s.reservations[0].idle
    });
    g.wait_models(0, "pinned", |m| m.len() == 1 && m[0]["pinned"] == true);
    let e = d
        .client()
        .reserve(Request::new(8 * GIB).timeout(Duration::from_millis(700)))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "{e}");
    assert!(o.unload_requests().is_empty());
    assert_eq!(o.loaded(), ["m:latest"]);
}

#[test]
fn evict_pinned_makes_a_watched_pinned_model_evictable() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let o = FakeOllama::start(&[ModelDef::new("m:latest", GIB, 8 * GIB)]);
    load(&o, "m", Some(json!("-1m")));
    let _g = watched(d.socket(), &o, "evict_pinned = true\n");
    d.wait_status("mirrored idle", |s| {
        s.reservations.len() == 1 && s.reservations[0].idle
    });
    let r = d
        .client()
        .reserve(Request::new(8 * GIB).timeout(WAIT))
        .expect("granted after the pinned model was unloaded");
    assert_eq!(o.unload_requests(), ["m:latest"]);
    assert!(o.loaded().is_empty());
    drop(r);
}

/// A resident model whose mirror does not fit now is not queued: nothing
/// waits in vramd's queue for it and nothing is evicted to make room for
/// memory that is in use already; it is mirrored once it fits.
#[test]
fn a_mirror_that_does_not_fit_neither_queues_nor_evicts_and_is_taken_later() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let holder = ChildGuard::new(d.hold("8GiB"));
    let c = d.client();
    let idle = c
        .reserve(Request::new(2 * GIB).label("warm").evictable(true))
        .unwrap();
    let o = FakeOllama::start(&[ModelDef::new("m:latest", GIB, 4 * GIB)]);
    load(&o, "m", None);
    let g = watched(d.socket(), &o, "");
    assert!(
        wait_until(WAIT, || g.log().contains("does not fit now")),
        "{}",
        g.log()
    );
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        let s = d.client().status().unwrap();
        assert!(s.queue.is_empty(), "{:?}", s.queue);
        assert_eq!(s.counters.evictions_requested, 0);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!idle.is_evicted());
    drop(holder);
    d.wait_status("mirrored once it fits", |s| {
        s.reservations
            .iter()
            .any(|r| r.label.as_deref() == Some("ollama/m:latest"))
    });
    drop(idle);
}

/// vramd restarts: the mirrors went with the old daemon; the gateway
/// reconnects by itself and mirrors the models still resident again.
#[test]
fn after_a_vramd_restart_the_resident_models_are_mirrored_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vramd.sock");
    let args = ["--simulate", "12GiB"];
    let d = Daemon::spawn_at(tempfile::tempdir().unwrap(), socket.clone(), &args);
    assert!(wait_until(WAIT, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let o = FakeOllama::start(&[ModelDef::new("m:latest", GIB, 2 * GIB)]);
    load(&o, "m", None);
    let g = watched(&socket, &o, "");
    d.wait_status("mirrored", |s| s.reservations.len() == 1);
    drop(d);
    let _ = std::fs::remove_file(&socket);
    let d2 = Daemon::spawn_at(tempfile::tempdir().unwrap(), socket.clone(), &args);
    assert!(wait_until(WAIT, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let s = d2.wait_status("mirrored again by the new daemon", |s| {
        s.reservations.len() == 1
    });
    assert_eq!(
        s.reservations[0].label.as_deref(),
        Some("ollama/m:latest"),
        "{}",
        g.log()
    );
    assert!(s.reservations[0].idle);
    assert!(o.unload_requests().is_empty());
}
