//! The seed scenario of the gateway issue, end to end on the fake
//! libnvidia-ml: a 12 GiB card, Ollama (the fake, in runner mode: one real
//! process per loaded model holding its memory on the fake card) behind
//! `vramd-gateway` with 9.4 GiB of models loaded, and an image job of 9 GiB
//! started with `vramctl run` while a chat generation is still streaming.
//! Chats go to the gateway before, during (0.3 s after the job's grant, while
//! the job is still loading) and after the job.
//!
//! What must hold: memory in use never passes the card's total (zero OOM
//! events: the fake card records its peak); only the model that had to go is
//! unloaded; the generation in progress is never cut; the chat sent during
//! the job waits and completes after it. Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::GIB;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_ollama::{FakeOllama, ModelDef, TOKENS};
use vramd_tests::gateway_rig::{Gateway, free_port, http, read_chunk, read_head, send_request};
use vramd_tests::{Daemon, WAIT, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-5eed5eed-1111-2222-3333-444444444444";
const MIB: u64 = 1 << 20;
const CARD: u64 = 12 * GIB;
/// The chat models: 1,200 + 1,024 + 7,400 MiB = 9.4 GiB.
const A: (&str, u64) = ("a:latest", 1_200 * MIB);
const B: (&str, u64) = ("b:latest", 1_024 * MIB);
const C: (&str, u64) = ("c:latest", 7_400 * MIB);
const JOB: u64 = 9 * GIB;

fn generate(addr: std::net::SocketAddr, model: &str) -> u16 {
    http(
        addr,
        "POST",
        "/api/generate",
        Some(&json!({"model": model, "prompt": "hi", "stream": false})),
        &[],
    )
    .status
}

#[test]
fn seed_scenario_chat_and_an_image_job_share_a_12_gib_card_with_no_oom() {
    let dir = tempfile::tempdir().unwrap();
    let gpu: Arc<FakeGpu> = FakeGpu::create(&dir.path().join("state.json"), &[(UUID0, CARD)]);
    let lib = fake_nvml_lib();
    let d = Daemon::start_env(
        &[
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--poll-interval",
            "50ms",
            "--min-residency",
            "0s",
        ],
        &[(fake_nvml::STATE_ENV, gpu.path())],
    );
    let o = FakeOllama::start_with_runners(
        &[A, B, C]
            .iter()
            .map(|(m, b)| ModelDef::new(m, b / 2, *b))
            .collect::<Vec<_>>(),
        gpu.clone(),
    );
    o.set_unload_delay(Duration::from_millis(300));
    let app = free_port();
    let g = Gateway::start(
        d.socket(),
        "",
        &format!(
            "[[app]]\nname = \"ollama\"\nkind = \"ollama\"\nupstream = \"{}\"\nlisten = \"{app}\"\n\
             [app.sizes]\n\"a\" = \"1200MiB\"\n\"b\" = \"1024MiB\"\n\"c\" = \"7400MiB\"\n",
            o.url()
        ),
        &[app],
    );
    let logs = || format!("gateway log:\n{}\ndaemon log:\n{}", g.log(), d.log());

    // Before the job: chats load c, then b; a generation of a is streaming.
    assert_eq!(generate(app, "c"), 200, "{}", logs());
    assert_eq!(generate(app, "b"), 200, "{}", logs());
    o.gate(true);
    let mut stream = BufReader::new(send_request(
        app,
        "POST",
        "/api/generate",
        Some(&json!({"model": "a", "prompt": "hi"})),
        &[],
    ));
    let (status, _) = read_head(&mut stream);
    assert_eq!(status, 200);
    let first = read_chunk(&mut stream).expect("the first token");
    let mut tokens = String::from_utf8(first).unwrap();
    d.wait_status(
        "three models reserved, attributed; a busy, b and c idle",
        |s| {
            s.reservations.len() == 3
                && s.reservations.iter().all(|r| {
                    let label = r.label.as_deref().unwrap_or("");
                    let want = [A, B, C]
                        .iter()
                        .find(|(m, _)| label == format!("ollama/{m}"))
                        .map(|(_, b)| *b);
                    want == Some(r.actual_bytes) && r.idle == (label != "ollama/a:latest")
                })
                && s.devices[0].used_bytes == A.1 + B.1 + C.1
        },
    );

    // The image job: reserved with vramctl run; it loads 0.5 s after its
    // grant (what a real job does while it reads its weights).
    let mut job = d
        .vramctl()
        .args([
            "run", "--json", "--vram", "9GiB", "--label", "image", "--", "sleep", "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vramctl run");
    let job_pid = job.id();
    let mut events = BufReader::new(job.stdout.take().unwrap());
    let granted_at = loop {
        let mut line = String::new();
        assert!(
            events.read_line(&mut line).unwrap() > 0,
            "vramctl run ended before its grant; {}",
            logs()
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "granted" {
            break Instant::now();
        }
    };
    // Granted only once the room was really free: c alone had to go.
    assert!(gpu.used(0) + JOB <= CARD, "granted on a full card");
    assert_eq!(o.unload_requests(), vec![C.0.to_string()]);
    let mut loaded = o.loaded();
    loaded.sort();
    assert_eq!(loaded, vec![A.0.to_string(), B.0.to_string()]);

    // 0.3 s after the grant, a chat for c arrives at the gateway.
    let during = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let sent = Instant::now();
        let status = generate(app, "c");
        (sent, status, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(500).saturating_sub(granted_at.elapsed()));
    gpu.set_process(0, job_pid, JOB);

    // The generation in progress finishes whole.
    o.gate(false);
    while let Some(chunk) = read_chunk(&mut stream) {
        tokens.push_str(&String::from_utf8(chunk).unwrap());
    }
    let lines: Vec<Value> = tokens
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), TOKENS + 1, "{tokens}");
    assert_eq!(lines.last().unwrap()["done"], true, "{tokens}");

    // The job ends; its memory goes with its process.
    let ended = wait_until(WAIT, || job.try_wait().unwrap().is_some());
    assert!(ended, "the job did not end");
    assert!(job.wait().unwrap().success());
    gpu.set_process(0, job_pid, 0);
    let job_end = Instant::now();

    // The chat sent during the job waited for it and then completed.
    let (sent, status, done) = during.join().unwrap();
    assert_eq!(status, 200, "{}", logs());
    assert!(sent < job_end && done >= job_end, "the chat did not wait");
    assert_eq!(o.loads(C.0), 2);
    // And after: all three are served again.
    assert_eq!(generate(app, "b"), 200);
    assert_eq!(generate(app, "a"), 200);

    let peak = gpu.peak_used(0);
    assert!(
        peak <= CARD,
        "memory in use reached {peak} bytes on a {CARD}-byte card: an OOM"
    );
    assert_eq!(o.unload_requests(), vec![C.0.to_string()]);
}

/// A watched app (no `listen`) on a card with real readings: its models'
/// memory is already in use by their runners, so the mirrors speak for the
/// runners and adopt that memory instead of counting it a second time —
/// on a nearly full card they fit at once, each shows its runner's usage,
/// and a waiter then gets one of them unloaded.
#[test]
fn a_watched_apps_mirrors_adopt_their_runners_memory_on_a_full_card() {
    let dir = tempfile::tempdir().unwrap();
    let gpu: Arc<FakeGpu> = FakeGpu::create(&dir.path().join("state.json"), &[(UUID0, 10 * GIB)]);
    let lib = fake_nvml_lib();
    let d = Daemon::start_env(
        &[
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--poll-interval",
            "50ms",
            "--min-residency",
            "0s",
        ],
        &[(fake_nvml::STATE_ENV, gpu.path())],
    );
    let o = FakeOllama::start_with_runners(
        &[
            ModelDef::new("big:latest", GIB, 6 * GIB),
            ModelDef::new("small:latest", GIB, 3 * GIB),
        ],
        gpu.clone(),
    );
    // Loaded straight on Ollama, before and while the gateway watches.
    let ollama: std::net::SocketAddr = o.url().trim_start_matches("http://").parse().unwrap();
    let load = |m: &str| {
        let r = http(
            ollama,
            "POST",
            "/api/generate",
            Some(&json!({"model": m, "prompt": "", "stream": false})),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };
    load("big");
    // Someone else's 0.5 GiB: 9.5 of 10 GiB in use.
    gpu.set_process(0, 4_000_001, GIB / 2);
    let g = Gateway::start(
        d.socket(),
        "",
        &format!(
            "[[app]]\nname = \"ollama\"\nkind = \"ollama\"\nupstream = \"{}\"\n",
            o.url()
        ),
        &[],
    );
    load("small");
    let s = d.wait_status(
        "both models mirrored, idle, each counting its runner",
        |s| {
            s.reservations.len() == 2
                && s.reservations.iter().all(|r| {
                    r.idle && r.actual_bytes == r.bytes && !r.over_reserved && r.pids.len() == 1
                })
        },
    );
    // Counted once: what is committed is what is in use.
    assert_eq!(s.devices[0].used_bytes, 9 * GIB + GIB / 2);
    assert_eq!(s.devices[0].committed_bytes, 9 * GIB + GIB / 2, "{s:#?}");
    assert_eq!(s.devices[0].unattributed_bytes, GIB / 2);
    // A 3 GiB waiter: one model is enough (with the free 0.5 GiB); it alone
    // is unloaded, through Ollama's API.
    let c = d.client();
    let job = c
        .reserve(
            vramd_client::Request::new(3 * GIB)
                .label("job")
                .timeout(WAIT),
        )
        .unwrap_or_else(|e| panic!("{e}; gateway log:\n{}", g.log()));
    let unloaded = o.unload_requests();
    assert_eq!(unloaded.len(), 1, "{unloaded:?}");
    let loaded = o.loaded();
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert_ne!(loaded[0], unloaded[0]);
    assert!(gpu.peak_used(0) <= 10 * GIB);
    drop(job);
}
