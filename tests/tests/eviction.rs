//! Eviction end to end: idle SDK holders asked through their callback, and
//! external apps (fake ComfyUI, an HTTP app, a command) unloaded through
//! their APIs — granted only once the fake GPU's readings show the memory
//! free. (Ollama is watched by vramd-gateway: tests/tests/gateway_watch.rs.)

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vramd_client::{Error, GIB, Progress, Request, StatusReport};
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_http::{Behaviour, FakeComfyUi, FakeHttpApp, HttpRoutes, Route};
use vramd_tests::{Daemon, WAIT, fake_nvml_lib, wait_until};

const UUID: &str = "GPU-00000000-1111-2222-3333-444444444444";
const CARD: u64 = 24 * GIB;

fn wait_status(d: &Daemon, what: &str, f: impl Fn(&StatusReport) -> bool) -> StatusReport {
    d.wait_status(what, f)
}

fn comfyui_config(url: &str, extra: &str) -> String {
    format!(
        "[eviction]\ndeadline = \"5s\"\nconsumer_poll_interval = \"100ms\"\n\n[[consumer]]\nname = \"comfyui\"\nkind = \"comfyui\"\nurl = \"{url}\"\nmin_residency = \"0s\"\ntimeout = \"1s\"\n{extra}\n"
    )
}

// The seed scenario with Ollama (9.4 GiB of idle chat models making room for
// an image job) moved with the Ollama consumer to vramd-gateway's watched
// apps: tests/tests/gateway_watch.rs.

#[test]
fn the_requests_a_consumer_coexists_with_never_evict_it() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("state.json"), &[(UUID, CARD)]);
    let comfy = FakeComfyUi::start(gpu.clone(), 0, 3_000_002, 20 * GIB, Duration::ZERO);
    let d = rig_with(
        &dir,
        &gpu,
        &comfyui_config(&comfy.url(), "coexist_with = [\"tts\"]"),
    );
    wait_status(&d, "ComfyUI seen", |s| {
        s.consumers[0].reachable && s.consumers[0].resident_bytes > 0
    });
    let c = d.client();
    let e = c
        .reserve(
            Request::new(6 * GIB)
                .label("tts")
                .timeout(Duration::from_millis(700)),
        )
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "{e}");
    assert_eq!(comfy.unload_count(), 0);
    let r = c
        .reserve(Request::new(6 * GIB).label("image").timeout(WAIT))
        .unwrap();
    assert_eq!(comfy.unload_count(), 1);
    drop(r);
}

#[test]
fn comfyui_is_freed_through_its_api() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("state.json"), &[(UUID, CARD)]);
    let comfy = FakeComfyUi::start(
        gpu.clone(),
        0,
        3_000_003,
        12 * GIB,
        Duration::from_millis(300),
    );
    let cfg = format!(
        "[eviction]\nconsumer_poll_interval = \"100ms\"\n[[consumer]]\nname = \"comfyui\"\nkind = \"comfyui\"\nurl = \"{}\"\nmin_residency = \"0s\"\n",
        comfy.url()
    );
    let r = rig_with(&dir, &gpu, &cfg);
    wait_status(&r, "ComfyUI seen", |s| {
        s.consumers[0].resident_bytes == 12 * GIB
    });
    let c = r.client();
    let granted = c.reserve(Request::new(20 * GIB).timeout(WAIT)).unwrap();
    assert_eq!(comfy.held_bytes(), 0);
    let reqs = comfy.requests();
    assert!(
        reqs.iter()
            .any(|(m, p, b)| m == "POST" && p == "/free" && b.contains("unload_models")),
        "{reqs:?}"
    );
    let out = r.vramctl().arg("status").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("comfyui") && table.contains("evictions: requested 1"),
        "{table}"
    );
    drop(granted);
}

/// Starts a daemon on an existing fake card with this config text.
fn rig_with(dir: &tempfile::TempDir, gpu: &Arc<FakeGpu>, config: &str) -> Daemon {
    let cfg = dir.path().join("vramd.toml");
    std::fs::write(&cfg, config).unwrap();
    let lib = fake_nvml_lib();
    let state = gpu.path().to_path_buf();
    Daemon::start_env(
        &[
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--poll-interval",
            "50ms",
            "--min-residency",
            "0s",
        ],
        &[(fake_nvml::STATE_ENV, state.as_path())],
    )
}

#[test]
fn an_http_app_and_a_command_are_unloaded_lowest_priority_first() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("state.json"), &[(UUID, CARD)]);
    let tts = FakeHttpApp::start(
        gpu.clone(),
        0,
        3_000_004,
        8 * GIB,
        Duration::from_millis(100),
        HttpRoutes::unload_only(Route::new("POST", "/unload")),
    );
    // The command "unloads" a service by touching a file; the test frees its
    // memory when it sees the file.
    let marker = dir.path().join("stopped");
    gpu.set_process(0, 3_000_005, 8 * GIB);
    let cfg = format!(
        "[eviction]\nconsumer_poll_interval = \"100ms\"\n\
         [[consumer]]\nname = \"tts\"\nkind = \"http\"\nurl = \"{}\"\nvram = \"8GiB\"\npriority = 1\nmin_residency = \"0s\"\n\
         unload = {{ method = \"POST\", path = \"/unload\", body = \"{{}}\" }}\n\
         [[consumer]]\nname = \"stt\"\nkind = \"command\"\nvram = \"8GiB\"\nmin_residency = \"0s\"\nunload_command = \"touch {}\"\n",
        tts.url(),
        marker.display()
    );
    let d = rig_with(&dir, &gpu, &cfg);
    wait_status(&d, "consumers seen", |s| {
        s.consumers
            .iter()
            .all(|c| c.reachable && c.resident_bytes == 8 * GIB)
    });
    let c = d.client();
    // 16 GiB used of 24: a 12 GiB request needs one of them; priority 0 (stt) goes first.
    let mut p = c.submit(Request::new(12 * GIB).priority(1)).unwrap();
    assert!(
        wait_until(WAIT, || marker.exists()),
        "the command was not run"
    );
    assert_eq!(
        tts.unload_count(),
        0,
        "the higher-priority consumer was asked first"
    );
    gpu.set_process(0, 3_000_005, 0);
    let r = loop {
        match p.next(Some(WAIT)).unwrap() {
            Some(Progress::Granted(r)) => break r,
            Some(Progress::Queued { .. }) => continue,
            None => panic!("not granted in time"),
        }
    };
    // Then 12 more: the TTS server goes.
    let r2 = c
        .reserve(Request::new(12 * GIB).priority(1).timeout(WAIT))
        .unwrap();
    assert_eq!(tts.unload_count(), 1);
    assert_eq!(tts.held_bytes(), 0);
    drop((r, r2));
}

#[test]
fn consumers_that_are_down_slow_or_garbled_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("state.json"), &[(UUID, CARD)]);
    let comfy = FakeComfyUi::start(gpu.clone(), 0, 3_000_006, 20 * GIB, Duration::ZERO);
    let d = rig_with(&dir, &gpu, &comfyui_config(&comfy.url(), ""));
    wait_status(&d, "reachable", |s| s.consumers[0].reachable);
    for (b, want) in [
        (Behaviour::Down, "cannot connect"),
        (Behaviour::Garbage, "malformed JSON"),
        (Behaviour::Error500, "500"),
        (Behaviour::Slow(Duration::from_secs(3)), "timed out"),
    ] {
        comfy.set_behaviour(b);
        let s = wait_status(&d, &format!("{b:?} reported"), |s| {
            !s.consumers[0].reachable
                && s.consumers[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(want))
        });
        // Other clients are served at once meanwhile.
        let t = Instant::now();
        d.client().ping().unwrap();
        // A slow consumer (3 s) must not hold the daemon up.
        assert!(t.elapsed() < Duration::from_millis(2500));
        assert_eq!(s.counters.evictions_requested, 0);
        comfy.set_behaviour(Behaviour::Normal);
        wait_status(&d, "reachable again", |s| s.consumers[0].reachable);
    }
    // Reachable at the last poll but down when asked: the failure is counted,
    // and the waiter keeps waiting (here until its own limit).
    let slow_poll = format!(
        "[eviction]\nconsumer_poll_interval = \"60s\"\n[[consumer]]\nname = \"comfyui\"\nkind = \"comfyui\"\nurl = \"{}\"\nmin_residency = \"0s\"\ntimeout = \"1s\"\n",
        comfy.url()
    );
    drop(d);
    let d = rig_with(&dir, &gpu, &slow_poll);
    wait_status(&d, "reachable", |s| {
        s.consumers[0].reachable && s.consumers[0].resident_bytes > 0
    });
    comfy.set_behaviour(Behaviour::Down);
    let e = d
        .client()
        .reserve(Request::new(10 * GIB).timeout(Duration::from_secs(2)))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "{e}");
    let s = d.client().status().unwrap();
    assert_eq!(s.counters.evictions_requested, 1);
    assert_eq!(s.counters.evictions_failed, 1);
    assert!(d.log().contains("consumer unload failed"));
}

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
