//! The test doubles themselves: `vramd_tests::fake_gpu` and
//! `vramd_tests::fake_http`, driven with a hand-written HTTP/1.1 client over
//! std's TcpStream. Every wait is bounded.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_nvml::{DeviceFailure, FakeProcess, State};
use serde_json::{Value, json};
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_http::{Behaviour, FakeComfyUi, FakeHttpApp, FakeOllama, HttpRoutes, Route};
use vramd_tests::{WAIT, wait_until};

const GIB: u64 = 1 << 30;
const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const UUID1: &str = "GPU-99999999-1111-2222-3333-444444444444";
const DELAY: Duration = Duration::from_millis(500);

/// A state file with a 24 GiB and an 8 GiB device, in its own directory.
fn gpu() -> (tempfile::TempDir, Arc<FakeGpu>) {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(
        &dir.path().join("state.json"),
        &[(UUID0, 24 * GIB), (UUID1, 8 * GIB)],
    );
    (dir, gpu)
}

fn read_state(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// One HTTP/1.1 request with a raw body; (status, body). Bounded by [`WAIT`].
fn http_raw(url: &str, head: &str, body: &[u8]) -> io::Result<(u16, String)> {
    let addr = url.strip_prefix("http://").expect("http URL");
    let addr = addr.parse().expect("socket address");
    let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
    s.set_read_timeout(Some(WAIT))?;
    s.set_write_timeout(Some(WAIT))?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    // A `100 Continue` may come first.
    let answer = match answer.strip_prefix("HTTP/1.1 100 Continue\r\n\r\n") {
        Some(rest) => rest.to_string(),
        None => answer,
    };
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no head in {answer:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let len: Option<usize> = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    assert_eq!(len, Some(body.len()), "Content-Length matches the body");
    Ok((status, body.to_string()))
}

fn http(url: &str, method: &str, path: &str, body: Option<&str>) -> io::Result<(u16, String)> {
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    http_raw(url, &head, body.as_bytes())
}

/// A request that must succeed with JSON; (status, JSON).
fn call(url: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) =
        http(url, method, path, body.as_deref()).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    (status, v)
}

fn ps_names(url: &str) -> Vec<String> {
    let (status, ps) = call(url, "GET", "/api/ps", None);
    assert_eq!(status, 200);
    ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn gpu_state_file_follows_edits() {
    let (_dir, gpu) = gpu();
    let path = gpu.path().to_path_buf();
    let s = read_state(&path);
    assert_eq!(s["devices"].as_array().unwrap().len(), 2);
    assert_eq!(s["devices"][0]["uuid"], UUID0);
    assert_eq!(s["devices"][1]["total_bytes"], 8 * GIB);
    assert_eq!(s["devices"][0]["processes"], json!([]));
    assert_eq!((gpu.total(0), gpu.total(1)), (24 * GIB, 8 * GIB));
    assert_eq!(gpu.used(0), 0);

    gpu.set_process(0, 4100, 3 * GIB);
    gpu.set_process(0, 4200, GIB);
    gpu.set_process(0, 4100, 2 * GIB); // updates in place
    let s = read_state(&path);
    assert_eq!(
        s["devices"][0]["processes"],
        json!([{"pid": 4100, "used_bytes": 2 * GIB}, {"pid": 4200, "used_bytes": GIB}])
    );
    assert_eq!(gpu.used(0), 3 * GIB);
    assert_eq!(gpu.process_bytes(0, 4100), 2 * GIB);
    assert_eq!(gpu.used(1), 0);

    gpu.set_process(0, 4200, 0); // removes
    gpu.set_process(0, 9999, 0); // removing what is absent is no change
    assert_eq!(
        read_state(&path)["devices"][0]["processes"],
        json!([{"pid": 4100, "used_bytes": 2 * GIB}])
    );

    // Arbitrary edits; `used` as the fake NVML computes it.
    gpu.edit(0, |d| {
        d.extra_used_bytes = GIB;
        d.processes.push(FakeProcess::unavailable(4300));
        d.mps_processes = vec![FakeProcess::new(4400, GIB)];
    });
    assert_eq!(gpu.used(0), 4 * GIB);
    gpu.edit(1, |d| d.fail = Some(DeviceFailure::GpuLost));
    let s = read_state(&path);
    assert_eq!(s["devices"][1]["fail"], "gpu_lost");
    assert_eq!(s["devices"][0]["extra_used_bytes"], GIB);
    assert_eq!(
        s["devices"][0]["processes"][1],
        json!({"pid": 4300, "used_bytes": null})
    );
    assert_eq!(State::read(&path).unwrap(), gpu.snapshot());

    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["state.json"]);
}

#[test]
fn gpu_peak_used_tracks_every_write() {
    let (_dir, gpu) = gpu();
    assert_eq!(gpu.peak_used(0), 0);
    gpu.set_process(0, 1, 10 * GIB);
    gpu.set_process(0, 2, 8 * GIB);
    gpu.set_process(1, 3, 7 * GIB);
    gpu.set_process(0, 1, 0);
    gpu.set_process(0, 2, GIB);
    assert_eq!(gpu.used(0), GIB);
    assert_eq!(gpu.peak_used(0), 18 * GIB);
    assert_eq!(gpu.peak_used(1), 7 * GIB);
    assert!(gpu.peak_used(0) <= gpu.total(0));
}

#[test]
fn gpu_concurrent_edits_lose_no_update() {
    let (_dir, gpu) = gpu();
    const N: u32 = 150;
    let path = gpu.path().to_path_buf();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader that must never see a half-written file.
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && reads < 100_000 {
                let bytes = std::fs::read(&path).expect("the state file always exists");
                serde_json::from_slice::<Value>(&bytes).expect("the state file is always whole");
                reads += 1;
            }
            reads
        })
    };
    let writers: Vec<_> = (0..2u32)
        .map(|t| {
            let gpu = Arc::clone(&gpu);
            std::thread::spawn(move || {
                for i in 0..N {
                    gpu.set_process(0, 10_000 * (t + 1) + i, 1 + u64::from(i));
                    if i % 10 == 0 {
                        gpu.edit(1, |d| d.extra_used_bytes += 1);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);

    let s = read_state(gpu.path());
    let procs = s["devices"][0]["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2 * N as usize, "every process entry survived");
    let per_thread: u64 = (1..=u64::from(N)).sum();
    assert_eq!(gpu.used(0), 2 * per_thread);
    assert_eq!(
        s["devices"][1]["extra_used_bytes"],
        json!(2 * N.div_ceil(10))
    );
    assert_eq!(gpu.peak_used(0), 2 * per_thread);
}

#[test]
fn ollama_lists_and_unloads_after_the_delay() {
    let (_dir, gpu) = gpu();
    let models = [("llama3:8b", 5 * GIB), ("qwen2:7b", 4 * GIB)];
    let o = FakeOllama::start(Arc::clone(&gpu), 0, 3_000_001, &models, DELAY);
    assert!(o.url().starts_with("http://127.0.0.1:"));
    assert_eq!(o.held_bytes(), 9 * GIB);
    assert_eq!(gpu.process_bytes(0, 3_000_001), 9 * GIB);
    assert_eq!((o.pid(), o.device()), (3_000_001, 0));

    let (status, ps) = call(&o.url(), "GET", "/api/ps", None);
    assert_eq!(status, 200);
    assert_eq!(
        ps["models"][0],
        json!({"name": "llama3:8b", "model": "llama3:8b", "size": 5 * GIB,
               "size_vram": 5 * GIB, "expires_at": "2099-01-01T00:00:00Z"})
    );
    assert_eq!(ps_names(&o.url()), ["llama3:8b", "qwen2:7b"]);

    // The answer comes at once; the memory goes only after the delay.
    let asked = Instant::now();
    let (status, v) = call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "llama3:8b", "keep_alive": 0})),
    );
    let answered = asked.elapsed();
    assert_eq!(status, 200);
    assert_eq!(v["model"], "llama3:8b");
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "unload");
    assert!(answered < DELAY, "answered in {answered:?}");
    assert_eq!(gpu.process_bytes(0, 3_000_001), 9 * GIB, "not freed yet");
    assert_eq!(
        ps_names(&o.url()),
        ["llama3:8b", "qwen2:7b"],
        "listed until freed"
    );
    assert!(wait_until(WAIT, || gpu.process_bytes(0, 3_000_001) == 4 * GIB));
    assert!(
        asked.elapsed() >= DELAY,
        "freed after {:?}",
        asked.elapsed()
    );
    assert_eq!(o.held_bytes(), 4 * GIB);
    assert_eq!(o.loaded_models(), ["qwen2:7b"]);
    assert_eq!(ps_names(&o.url()), ["qwen2:7b"]);

    // keep_alive as a string; the last model gone removes the process entry.
    let (_, v) = call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "qwen2:7b", "keep_alive": "0s"})),
    );
    assert_eq!(v["done_reason"], "unload");
    assert!(wait_until(WAIT, || o.held_bytes() == 0));
    assert_eq!(gpu.used(0), 0);
    let s = read_state(gpu.path());
    assert_eq!(s["devices"][0]["processes"], json!([]));
    assert_eq!(gpu.peak_used(0), 9 * GIB);

    assert_eq!(o.unload_count(), 2);
    let log = o.requests();
    assert_eq!(log[0], ("GET".into(), "/api/ps".into(), String::new()));
    let unloads: Vec<_> = log.iter().filter(|r| r.1 == "/api/generate").collect();
    assert_eq!(unloads.len(), 2);
    assert_eq!(unloads[0].0, "POST");
    let body: Value = serde_json::from_str(&unloads[0].2).unwrap();
    assert_eq!(body, json!({"model": "llama3:8b", "keep_alive": 0}));
}

#[test]
fn ollama_unknown_models_reloads_and_cancelled_unloads() {
    let (_dir, gpu) = gpu();
    let o = FakeOllama::start(
        Arc::clone(&gpu),
        1,
        3_000_002,
        &[("tts:latest", GIB)],
        DELAY,
    );
    assert_eq!(gpu.process_bytes(1, 3_000_002), GIB);

    // Unloading an unknown model is still "done", and frees nothing.
    let (status, v) = call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "nope:1b", "keep_alive": "0"})),
    );
    assert_eq!((status, &v["done"]), (200, &json!(true)));
    // Loading an unknown model is a 404, as in Ollama.
    let (status, _) = call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "nope:1b"})),
    );
    assert_eq!(status, 404);
    // A body without a model is a 400.
    let (status, _) = call(&o.url(), "POST", "/api/generate", Some(json!({})));
    assert_eq!(status, 400);

    // "tts" means "tts:latest"; /api/chat unloads too.
    let (status, v) = call(
        &o.url(),
        "POST",
        "/api/chat",
        Some(json!({"model": "tts", "messages": [], "keep_alive": 0})),
    );
    assert_eq!((status, &v["done_reason"]), (200, &json!("unload")));
    // A load before the delay is over cancels the unload.
    let (status, v) = call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "tts:latest"})),
    );
    assert_eq!((status, &v["done_reason"]), (200, &json!("load")));
    std::thread::sleep(DELAY * 2);
    assert_eq!(gpu.process_bytes(1, 3_000_002), GIB, "the reload won");

    // Unload, then reload after it took effect.
    call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "tts:latest", "keep_alive": 0.0})),
    );
    assert!(wait_until(WAIT, || gpu.process_bytes(1, 3_000_002) == 0));
    let (status, _) = call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "tts:latest", "keep_alive": "5m"})),
    );
    assert_eq!(status, 200);
    assert_eq!(
        gpu.process_bytes(1, 3_000_002),
        GIB,
        "loads take effect at once"
    );
    assert!(o.load("tts:latest"));
    assert!(!o.load("nope"));
    assert_eq!(o.unload_count(), 3);
    assert_eq!(gpu.used(0), 0, "device 0 untouched");
}

#[test]
fn zero_delay_unloads_before_answering() {
    let (_dir, gpu) = gpu();
    let o = FakeOllama::start(
        Arc::clone(&gpu),
        0,
        3_000_003,
        &[("m:1", GIB)],
        Duration::ZERO,
    );
    call(
        &o.url(),
        "POST",
        "/api/generate",
        Some(json!({"model": "m:1", "keep_alive": 0})),
    );
    assert_eq!(gpu.process_bytes(0, 3_000_003), 0);
}

#[test]
fn comfyui_reports_stats_and_frees_after_the_delay() {
    let (_dir, gpu) = gpu();
    gpu.set_process(0, 4242, 2 * GIB); // someone else
    let c = FakeComfyUi::start(Arc::clone(&gpu), 0, 3_000_010, 6 * GIB, DELAY);
    assert_eq!(c.held_bytes(), 6 * GIB);

    let (status, s) = call(&c.url(), "GET", "/system_stats", None);
    assert_eq!(status, 200);
    assert_eq!(s["system"]["os"], "posix");
    let d = &s["devices"][0];
    assert_eq!(d["name"], "cuda:0");
    assert_eq!(d["type"], "cuda");
    assert_eq!(d["index"], 0);
    assert_eq!(d["vram_total"], 24 * GIB);
    assert_eq!(d["vram_free"], 16 * GIB);
    assert_eq!(d["torch_vram_total"], 6 * GIB);
    assert_eq!(d["torch_vram_free"], 0);

    let asked = Instant::now();
    let (status, v) = call(
        &c.url(),
        "POST",
        "/free",
        Some(json!({"unload_models": true, "free_memory": true})),
    );
    assert_eq!((status, v), (200, json!({})));
    assert!(asked.elapsed() < DELAY);
    assert_eq!(gpu.process_bytes(0, 3_000_010), 6 * GIB, "not freed yet");
    assert!(wait_until(WAIT, || gpu.process_bytes(0, 3_000_010) == 0));
    assert!(asked.elapsed() >= DELAY);
    assert_eq!(c.held_bytes(), 0);
    assert_eq!(gpu.used(0), 2 * GIB);
    let (_, s) = call(&c.url(), "GET", "/system_stats", None);
    assert_eq!(s["devices"][0]["vram_free"], 22 * GIB);
    assert_eq!(s["devices"][0]["torch_vram_total"], 0);
    assert_eq!(c.unload_count(), 1);

    // A prompt loads it again; a /free asking for nothing frees nothing.
    let (status, _) = call(&c.url(), "POST", "/prompt", Some(json!({"prompt": {}})));
    assert_eq!(status, 200);
    assert_eq!(gpu.process_bytes(0, 3_000_010), 6 * GIB);
    call(
        &c.url(),
        "POST",
        "/free",
        Some(json!({"unload_models": false, "free_memory": false})),
    );
    std::thread::sleep(DELAY * 2);
    assert_eq!(c.held_bytes(), 6 * GIB);
    assert_eq!(c.unload_count(), 1);
    c.load();
    assert_eq!(gpu.peak_used(0), 8 * GIB);
}

#[test]
fn generic_app_routes() {
    let (_dir, gpu) = gpu();
    let a = FakeHttpApp::start(
        Arc::clone(&gpu),
        1,
        3_000_020,
        3 * GIB,
        DELAY,
        HttpRoutes::default(),
    );
    assert_eq!(gpu.process_bytes(1, 3_000_020), 3 * GIB);
    assert_eq!(
        call(&a.url(), "GET", "/health", None),
        (200, json!({"ok": true}))
    );
    assert_eq!(
        call(&a.url(), "GET", "/unload", None).0,
        404,
        "wrong method"
    );
    assert_eq!(call(&a.url(), "POST", "/nothing", None).0, 404);

    let asked = Instant::now();
    assert_eq!(
        call(&a.url(), "POST", "/unload", None),
        (200, json!({"ok": true}))
    );
    assert!(asked.elapsed() < DELAY);
    assert_eq!(a.held_bytes(), 3 * GIB);
    assert!(wait_until(WAIT, || gpu.process_bytes(1, 3_000_020) == 0));
    assert!(asked.elapsed() >= DELAY);
    assert_eq!(call(&a.url(), "POST", "/load", Some(json!({}))).0, 200);
    assert_eq!(gpu.process_bytes(1, 3_000_020), 3 * GIB);
    assert_eq!(a.unload_count(), 1);

    // Custom routes; the query does not matter for matching, but is logged.
    let b = FakeHttpApp::start(
        Arc::clone(&gpu),
        1,
        3_000_021,
        GIB,
        Duration::from_millis(50),
        HttpRoutes::unload_only(Route::new("delete", "/v1/model")),
    );
    assert_eq!(call(&b.url(), "GET", "/health", None).0, 404);
    assert_eq!(call(&b.url(), "POST", "/load", None).0, 404);
    assert_eq!(call(&b.url(), "DELETE", "/v1/model?force=1", None).0, 200);
    assert!(wait_until(WAIT, || b.held_bytes() == 0));
    assert_eq!(b.requests().last().unwrap().1, "/v1/model?force=1");
    b.load();
    assert_eq!(gpu.used(1), 4 * GIB);
}

#[test]
fn down_refuses_connections_until_restored() {
    let (_dir, gpu) = gpu();
    let o = FakeOllama::start(Arc::clone(&gpu), 0, 3_000_030, &[("m:1", GIB)], DELAY);
    let url = o.url();
    assert_eq!(ps_names(&url), ["m:1"]);
    o.set_behaviour(Behaviour::Down);
    assert_eq!(o.behaviour(), Behaviour::Down);
    for _ in 0..3 {
        let err = TcpStream::connect_timeout(&o.addr(), WAIT).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
    assert!(http(&url, "GET", "/api/ps", None).is_err());
    o.set_behaviour(Behaviour::Normal);
    assert_eq!(o.url(), url, "same port");
    assert_eq!(ps_names(&url), ["m:1"]);
    let logged = o.requests().len();
    assert_eq!(logged, 2, "nothing was read while down");
}

#[test]
fn error_and_garbage_answers_do_nothing() {
    let (_dir, gpu) = gpu();
    let o = FakeOllama::start(
        Arc::clone(&gpu),
        0,
        3_000_040,
        &[("m:1", GIB)],
        Duration::ZERO,
    );
    let unload = json!({"model": "m:1", "keep_alive": 0}).to_string();

    o.set_behaviour(Behaviour::Error500);
    let (status, body) = http(&o.url(), "POST", "/api/generate", Some(&unload)).unwrap();
    assert_eq!(status, 500);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    assert_eq!(http(&o.url(), "GET", "/api/ps", None).unwrap().0, 500);

    o.set_behaviour(Behaviour::Garbage);
    let (status, body) = http(&o.url(), "POST", "/api/generate", Some(&unload)).unwrap();
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).is_err(), "{body:?}");
    let (status, body) = http(&o.url(), "GET", "/api/ps", None).unwrap();
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).is_err());

    assert_eq!(gpu.process_bytes(0, 3_000_040), GIB, "nothing freed");
    assert_eq!(
        o.unload_count(),
        2,
        "unloads are counted whatever the answer"
    );
    assert_eq!(o.requests().len(), 4);

    o.set_behaviour(Behaviour::Normal);
    http(&o.url(), "POST", "/api/generate", Some(&unload)).unwrap();
    assert_eq!(gpu.process_bytes(0, 3_000_040), 0);
}

#[test]
fn ignore_unload_answers_but_never_frees() {
    let (_dir, gpu) = gpu();
    let c = FakeComfyUi::start(
        Arc::clone(&gpu),
        0,
        3_000_050,
        2 * GIB,
        Duration::from_millis(50),
    );
    c.set_behaviour(Behaviour::IgnoreUnload);
    let (status, _) = call(
        &c.url(),
        "POST",
        "/free",
        Some(json!({"unload_models": true, "free_memory": true})),
    );
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.held_bytes(), 2 * GIB);
    assert_eq!(gpu.process_bytes(0, 3_000_050), 2 * GIB);
    assert_eq!(c.unload_count(), 1);
    assert_eq!(call(&c.url(), "GET", "/system_stats", None).0, 200);
}

#[test]
fn slow_answers_late() {
    let (_dir, gpu) = gpu();
    let a = FakeHttpApp::start(
        Arc::clone(&gpu),
        0,
        3_000_060,
        GIB,
        Duration::ZERO,
        HttpRoutes::default(),
    );
    a.set_behaviour(Behaviour::Slow(Duration::from_millis(400)));
    let t = Instant::now();
    assert_eq!(call(&a.url(), "GET", "/health", None).0, 200);
    assert!(t.elapsed() >= Duration::from_millis(400));
    assert!(t.elapsed() < WAIT);
}

#[test]
fn dropping_a_fake_is_prompt_even_mid_request() {
    let (_dir, gpu) = gpu();
    let o = FakeOllama::start(Arc::clone(&gpu), 0, 3_000_070, &[("m:1", GIB)], WAIT * 10);
    let url = o.url();
    call(
        &url,
        "POST",
        "/api/generate",
        Some(json!({"model": "m:1", "keep_alive": 0})),
    );
    o.set_behaviour(Behaviour::Slow(WAIT * 10));
    let client = {
        let url = url.clone();
        std::thread::spawn(move || http(&url, "GET", "/api/ps", None))
    };
    assert!(wait_until(WAIT, || o.requests().len() == 2));
    // A connection that never sends its request.
    let idle = TcpStream::connect_timeout(&o.addr(), WAIT).unwrap();
    let t = Instant::now();
    drop(o);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        t.elapsed()
    );
    assert!(
        client.join().unwrap().is_err(),
        "the slow request got no answer"
    );
    drop(idle);
    assert!(TcpStream::connect_timeout(&url[7..].parse().unwrap(), WAIT).is_err());
    assert_eq!(
        gpu.process_bytes(0, 3_000_070),
        GIB,
        "the pending unload was cancelled"
    );
}

#[test]
fn chunked_bodies_and_expect_continue() {
    let (_dir, gpu) = gpu();
    let o = FakeOllama::start(
        Arc::clone(&gpu),
        0,
        3_000_080,
        &[("m:1", GIB)],
        Duration::ZERO,
    );
    let body = br#"{"model": "m:1", "keep_alive": 0}"#;
    let (a, b) = body.split_at(10);
    let mut chunked = Vec::new();
    for part in [a, b] {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n";
    let (status, text) = http_raw(&o.url(), head, &chunked).unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(gpu.process_bytes(0, 3_000_080), 0);
    assert_eq!(o.requests()[0].2, String::from_utf8_lossy(body));

    // A malformed request is a 400 and is not logged.
    let (status, _) = http_raw(&o.url(), "NONSENSE\r\n\r\n", b"").unwrap();
    assert_eq!(status, 400);
    assert_eq!(o.requests().len(), 1);
}
