//! End-to-end tests of `vramd-gateway`: the real daemon on simulated
//! devices, the fake Ollama (tests/src/fake_ollama.rs) and the gateway
//! binary, over loopback TCP and the daemon's Unix socket. Every wait is
//! bounded.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use vramd_client::{GIB, Request};
use vramd_harness::ChildGuard;
use vramd_tests::fake_ollama::{FakeOllama, ModelDef, TOKENS};
use vramd_tests::gateway_rig::{Resp, free_port, http, read_chunk, read_head, send_request};
use vramd_tests::{Daemon, WAIT, bin, wait_until};

const TINY: &str = "tiny:latest";

/// A running `vramd-gateway`, killed when dropped.
struct Gateway {
    child: ChildGuard,
    admin: SocketAddr,
    app: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts it for one Ollama app at `upstream`, talking to vramd at
    /// `socket`, with `extra` lines appended to the `[[app]]`.
    fn start(socket: &Path, upstream: &str, extra: &str) -> Gateway {
        Self::start_with_state(socket, upstream, extra, None)
    }

    /// Like [`Gateway::start`], keeping sizes in `state` (default: in its
    /// own directory).
    fn start_with_state(
        socket: &Path,
        upstream: &str,
        extra: &str,
        state: Option<&Path>,
    ) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state.map_or_else(|| dir.path().join("state/sizes.json"), Path::to_path_buf);
        let (admin, app) = (free_port(), free_port());
        let config = format!(
            "socket = {socket:?}\nlisten = \"{admin}\"\nstate_file = {state:?}\npoll_interval = \"100ms\"\n\n\
             [[app]]\nname = \"ollama\"\nkind = \"ollama\"\nupstream = \"{upstream}\"\nlisten = \"{app}\"\npriority = 0\n{extra}\n",
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log");
        let child = ChildGuard::spawn(
            Command::new(bin("vramd-gateway"))
                .arg("--config")
                .arg(&path)
                .env("RUST_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("spawn vramd-gateway");
        let g = Gateway {
            child,
            admin,
            app,
            dir,
        };
        assert!(
            wait_until(WAIT, || TcpStream::connect(g.app).is_ok()
                && http(g.admin, "GET", "/healthz", None, &[]).status == 200),
            "the gateway never answered; log:\n{}",
            g.log()
        );
        g
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/sizes.json")
    }

    fn status(&self) -> Value {
        http(self.admin, "GET", "/status", None, &[]).json()
    }

    /// The model's entry in `/status`, if held.
    fn model(&self, model: &str) -> Option<Value> {
        self.status()["apps"][0]["models"]
            .as_array()?
            .iter()
            .find(|m| m["model"] == model)
            .cloned()
    }

    fn wait_model(&self, what: &str, f: impl Fn(Option<&Value>) -> bool) {
        let mut last = None;
        let ok = wait_until(WAIT, || {
            last = self.model(TINY);
            f(last.as_ref())
        });
        assert!(
            ok,
            "timed out waiting for {what}; last: {last:?}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.child.kill();
    }
}

/// A whole (not streamed) generate request for `model` through `addr`.
fn generate(addr: SocketAddr, model: &str) -> Resp {
    let body = json!({"model": model, "prompt": "x", "stream": false});
    http(addr, "POST", "/api/generate", Some(&body), &[])
}

fn tiny() -> FakeOllama {
    FakeOllama::start(&[ModelDef::new(TINY, GIB, 2 * GIB)])
}

/// A fake whose model takes 8 GiB once loaded: on a 12 GiB card it and an
/// 8 GiB job cannot both fit.
fn big() -> FakeOllama {
    FakeOllama::start(&[ModelDef::new(TINY, 6 * GIB, 8 * GIB)])
}

fn tokens() -> String {
    (0..TOKENS).map(|i| format!("tok{i} ")).collect()
}

fn reservations(d: &Daemon) -> Vec<(String, u64, bool)> {
    d.client()
        .status()
        .expect("status")
        .reservations
        .into_iter()
        .map(|r| (r.label.unwrap_or_default(), r.bytes, r.idle))
        .collect()
}

#[test]
fn generate_and_chat_pass_through_streamed_and_whole_with_one_reservation_per_model() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "");

    // Not streamed: one JSON object, as Ollama answered it.
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": "tiny", "prompt": "hi", "stream": false})),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let v = r.json();
    assert_eq!(v["response"], tokens());
    assert_eq!(v["done"], true);
    assert_eq!(v["context"], json!([1, 2, 3]));

    // The model's reservation: labelled app/model, the estimate's size
    // (no observation yet: file 1 GiB + KV cache, +10%, +512 MiB).
    let res = reservations(&d);
    assert_eq!(res.len(), 1, "{res:?}");
    assert_eq!(res[0].0, "ollama/tiny:latest");
    let kv = 2 * 16 * 4096 * 8 * (2048 / 32) * 2;
    assert_eq!(res[0].1, (GIB + kv) * 110 / 100 + (512 << 20));

    // Streamed NDJSON: every line, in order, intact.
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "hi"})),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), TOKENS + 1);
    let joined: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap())
        .collect();
    assert_eq!(joined, tokens());
    assert_eq!(lines.last().unwrap()["done_reason"], "stop");

    // Chat, streamed and not.
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let r = http(
        g.app,
        "POST",
        "/api/chat",
        Some(&json!({"model": TINY, "messages": msgs})),
        &[],
    );
    let joined: String = r
        .text()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(joined, tokens());
    let r = http(
        g.app,
        "POST",
        "/api/chat",
        Some(&json!({"model": TINY, "messages": msgs, "stream": false})),
        &[],
    );
    assert_eq!(r.json()["message"]["content"], tokens());

    // OpenAI-style SSE.
    let r = http(
        g.app,
        "POST",
        "/v1/chat/completions",
        Some(&json!({"model": TINY, "messages": msgs, "stream": true})),
        &[],
    );
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), TOKENS + 2, "{text:?}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");

    // A long stream arrives whole (about 2 MB of NDJSON).
    let n = 20_000;
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "hi", "options": {"num_predict": n}})),
        &[],
    );
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), n + 1);
    assert!(
        lines
            .iter()
            .enumerate()
            .take(n)
            .all(|(i, l)| l.contains(&format!("\"tok{i} \"")))
    );
    assert!(lines[n].contains("\"done\":true"));

    // Routes that load nothing pass straight through, bodies included.
    let r = http(
        g.app,
        "POST",
        "/api/show",
        Some(&json!({"model": "tiny"})),
        &[],
    );
    assert_eq!(r.json()["model_info"]["llama.block_count"], 16);
    let r = http(
        g.app,
        "POST",
        "/api/show",
        Some(&json!({"model": "nope"})),
        &[],
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("model 'nope' not found"))
    );
    let r = http(g.app, "GET", "/api/tags", None, &[]);
    assert_eq!(r.json()["models"][0]["name"], TINY);
    let r = http(g.app, "GET", "/", None, &[]);
    assert_eq!(r.text(), "Ollama is running");

    // Still one reservation, loaded once; then idle with its observed size saved.
    assert_eq!(o.loads(TINY), 1);
    assert_eq!(reservations(&d).len(), 1);
    g.wait_model("idle and seen loaded", |m| {
        m.is_some_and(|m| m["idle"] == true && m["loaded"] == true)
    });
    assert!(wait_until(WAIT, || {
        std::fs::read_to_string(g.state_file())
            .is_ok_and(|s| s.contains("\"ollama/tiny:latest\": 2147483648"))
    }));
    d.wait_status("the reservation marked idle", |s| {
        s.reservations.iter().all(|r| r.idle)
    });
}

#[test]
fn a_stream_keeps_its_model_busy_until_its_body_ends() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "");
    o.gate(true);
    let mut r = BufReader::new(send_request(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "hi"})),
        &[],
    ));
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    // The first token arrives while the fake holds the rest back: streamed,
    // not buffered.
    let first = read_chunk(&mut r).expect("a first line");
    let v: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(v["response"], "tok0 ");
    let m = g.model(TINY).expect("held");
    assert_eq!(
        (m["in_flight"].clone(), m["idle"].clone()),
        (json!(1), json!(false))
    );
    assert!(!reservations(&d)[0].2, "busy in vramd while streaming");
    o.gate(false);
    let mut rest = Vec::new();
    while let Some(c) = read_chunk(&mut r) {
        rest.extend(c);
    }
    assert_eq!(String::from_utf8(rest).unwrap().lines().count(), TOKENS);
    g.wait_model("idle after the stream", |m| {
        m.is_some_and(|m| m["in_flight"] == 0 && m["idle"] == true)
    });
    d.wait_status("idle in vramd", |s| {
        s.reservations.len() == 1 && s.reservations[0].idle
    });
}

#[test]
fn a_request_for_a_model_not_resident_waits_in_vramds_queue_until_the_card_frees() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "[app.sizes]\n\"tiny\" = \"4GiB\"\n");
    let holder = ChildGuard::new(d.hold("10GiB"));
    let app = g.app;
    let waiter = std::thread::spawn(move || {
        http(
            app,
            "POST",
            "/api/generate",
            Some(&json!({"model": "tiny", "prompt": "x", "stream": false})),
            &[],
        )
    });
    d.wait_status("the gateway's request queued", |s| {
        s.queue
            .iter()
            .any(|q| q.label.as_deref() == Some("ollama/tiny:latest") && q.bytes == 4 * GIB)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(o.loads(TINY), 0, "forwarded before the grant");
    assert!(o.log().iter().all(|(_, p)| p != "/api/generate"));
    drop(holder);
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["response"], tokens());
    assert_eq!(o.loads(TINY), 1);
    assert_eq!(g.model(TINY).unwrap()["reserved_bytes"], 4 * GIB);
    let m = http(g.admin, "GET", "/metrics", None, &[]).text();
    assert!(
        m.contains("vramd_gateway_model_waits_total{app=\"ollama\",model=\"tiny:latest\"} 1"),
        "{m}"
    );
    let waited: f64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "vramd_gateway_model_wait_seconds_total{app=\"ollama\",model=\"tiny:latest\"} ",
            )
        })
        .expect("wait seconds")
        .parse()
        .unwrap();
    assert!(waited >= 0.3, "{waited}");
}

#[test]
fn a_waiter_that_needs_the_room_makes_the_gateway_unload_an_idle_model_and_release() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let o = big();
    let g = Gateway::start(d.socket(), &o.url(), "[app.sizes]\n\"tiny\" = \"8GiB\"\n");
    let r = generate(g.app, TINY);
    assert_eq!(r.status, 200);
    d.wait_status("the model's reservation idle", |s| {
        s.reservations.len() == 1 && s.reservations[0].idle
    });
    assert_eq!(o.loaded(), vec![TINY.to_string()]);
    let c = d.client();
    let granted = c
        .reserve(Request::new(8 * GIB).label("image-job").timeout(WAIT))
        .expect("granted after the eviction");
    assert_eq!(
        o.unload_requests(),
        vec![TINY.to_string()],
        "unloaded through Ollama's API, that model only"
    );
    assert!(o.loaded().is_empty());
    let labels: Vec<String> = reservations(&d).into_iter().map(|r| r.0).collect();
    assert_eq!(labels, vec!["image-job".to_string()]);
    assert!(g.model(TINY).is_none());
    let m = http(g.admin, "GET", "/metrics", None, &[]).text();
    assert!(
        m.contains("vramd_gateway_model_evictions_total{app=\"ollama\",model=\"tiny:latest\"} 1"),
        "{m}"
    );
    // The next request for it waits for the image job, then reloads it.
    let app = g.app;
    let waiter = std::thread::spawn(move || generate(app, TINY));
    d.wait_status("the reload queued", |s| s.queue.len() == 1);
    drop(granted);
    assert_eq!(waiter.join().unwrap().status, 200);
    assert_eq!(o.loads(TINY), 2);
}

#[test]
fn a_model_unloaded_by_ollama_itself_is_released_and_a_pinned_one_is_not_evictable() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "");
    let r = generate(g.app, TINY);
    assert_eq!(r.status, 200);
    d.wait_status("held", |s| s.reservations.len() == 1);
    o.expire_now(TINY);
    d.wait_status("released after the keep-alive expired", |s| {
        s.reservations.is_empty()
    });

    // keep_alive -1 pins it: busy forever in vramd's eyes.
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "x", "stream": false, "keep_alive": -1})),
        &[],
    );
    assert_eq!(r.status, 200);
    g.wait_model("pinned, done", |m| {
        m.is_some_and(|m| m["pinned"] == true && m["in_flight"] == 0 && m["loaded"] == true)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reservations(&d)[0].2, "a pinned model must stay busy");
    // keep_alive 0 on a request: Ollama unloads after it; the gateway releases.
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "x", "stream": false, "keep_alive": 0})),
        &[],
    );
    assert_eq!(r.status, 200);
    d.wait_status("released after a keep_alive 0 request", |s| {
        s.reservations.is_empty()
    });
}

#[test]
fn bad_input_and_faults_get_clear_answers() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(
        d.socket(),
        &o.url(),
        "wait_limit = \"300ms\"\n[app.sizes]\n\"tiny\" = \"4GiB\"\n",
    );
    // Malformed body: the gateway's own 400.
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!("not an object")),
        &[],
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("JSON object"));
    let r = http(
        g.app,
        "POST",
        "/api/chat",
        Some(&json!({"messages": []})),
        &[],
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("model is required"))
    );
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY})),
        &[("X-Vramd-Priority", "high")],
    );
    assert_eq!(r.status, 400);
    // Unknown model: Ollama's own answer, nothing reserved.
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": "nope", "prompt": "x"})),
        &[],
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json()["error"],
        "model \"nope\" not found, try pulling it first"
    );
    assert!(reservations(&d).is_empty());
    // Wait limit passed: 503 with Retry-After.
    let holder = ChildGuard::new(d.hold("10GiB"));
    let r = http(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "x"})),
        &[],
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("timed out waiting for GPU memory")
    );
    assert_eq!(o.loads(TINY), 0);
    drop(holder);

    // Upstream down: 502 naming it; vramd down: 503 saying so.
    let dead = format!("http://{}", free_port());
    let g2 = Gateway::start(Path::new("/nonexistent/vramd.sock"), &dead, "");
    let r = http(g2.app, "GET", "/api/tags", None, &[]);
    assert_eq!(r.status, 502);
    assert!(
        r.json()["error"].as_str().unwrap().contains(&dead),
        "{}",
        r.text()
    );
    let g3 = Gateway::start(
        Path::new("/nonexistent/vramd.sock"),
        &o.url(),
        "[app.sizes]\n\"tiny\" = \"1GiB\"\n",
    );
    let r = http(
        g3.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "x"})),
        &[],
    );
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("vramd is not reachable"),
        "{}",
        r.text()
    );
    // The first gateway still serves.
    let r = http(g.app, "GET", "/api/version", None, &[]);
    assert_eq!(r.status, 200);
}

#[test]
fn the_gateway_reconnects_to_vramd_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vramd.sock");
    let o = tiny();
    let g = Gateway::start(&socket, &o.url(), "[app.sizes]\n\"tiny\" = \"1GiB\"\n");
    let body = json!({"model": TINY, "prompt": "x", "stream": false});
    assert_eq!(
        http(g.app, "POST", "/api/generate", Some(&body), &[]).status,
        503
    );
    let ddir = tempfile::tempdir().unwrap();
    let d = Daemon::spawn_at(ddir, socket.clone(), &["--simulate", "12GiB"]);
    assert!(wait_until(WAIT, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let r = http(g.app, "POST", "/api/generate", Some(&body), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    d.wait_status("held", |s| s.reservations.len() == 1);
    // vramd restarts: the gateway notices, forgets the lost reservation, and
    // reserves again on the next request.
    drop(d);
    let ddir = tempfile::tempdir().unwrap();
    let _ = std::fs::remove_file(&socket);
    let d2 = Daemon::spawn_at(ddir, socket.clone(), &["--simulate", "12GiB"]);
    assert!(wait_until(WAIT, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    g.wait_model("the lost reservation forgotten", |m| m.is_none());
    let r = http(g.app, "POST", "/api/generate", Some(&body), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    d2.wait_status("held again", |s| s.reservations.len() == 1);
}

#[test]
fn a_client_that_disconnects_while_waiting_withdraws_its_request() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "[app.sizes]\n\"tiny\" = \"4GiB\"\n");
    let holder = ChildGuard::new(d.hold("10GiB"));
    let s = send_request(
        g.app,
        "POST",
        "/api/generate",
        Some(&json!({"model": TINY, "prompt": "x"})),
        &[("X-Vramd-Priority", "7")],
    );
    d.wait_status("queued with the header's priority", |s| {
        s.queue.len() == 1 && s.queue[0].priority == 7
    });
    drop(s);
    d.wait_status("withdrawn", |s| s.queue.is_empty());
    g.wait_model("no slot left", |m| m.is_none());
    drop(holder);
    assert_eq!(o.loads(TINY), 0);
}

#[test]
fn status_and_metrics_answer() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "");
    let r = generate(g.app, TINY);
    assert_eq!(r.status, 200);
    g.wait_model("seen loaded", |m| m.is_some_and(|m| m["loaded"] == true));
    let s = g.status();
    assert_eq!(s["daemon"]["connected"], true);
    assert_eq!(s["daemon"]["devices"][0]["total_bytes"], 12 * GIB);
    let app = &s["apps"][0];
    assert_eq!(app["name"], "ollama");
    assert_eq!(app["upstream"], o.url());
    assert_eq!(app["models"][0]["phase"], "held");
    assert_eq!(app["loaded"][0]["size_vram_bytes"], 2 * GIB);
    let m = http(g.admin, "GET", "/metrics", None, &[]);
    assert_eq!(m.status, 200);
    let m = m.text();
    assert!(
        !m.contains("vramd_gateway_model_waits_total{"),
        "granted at once: no wait\n{m}"
    );
    for want in [
        "vramd_gateway_model_requests_total{app=\"ollama\",model=\"tiny:latest\"} 1",
        "vramd_gateway_model_size_bytes{app=\"ollama\",model=\"tiny:latest\"} 2147483648",
        "vramd_gateway_device_total_bytes{device=\"0\"",
        "vramd_gateway_device_reserved_bytes{device=\"0\"",
        "vramd_gateway_device_available_bytes{device=\"0\"",
        "vramd_gateway_device_used_bytes{device=\"0\"",
        "vramd_gateway_daemon_up 1",
    ] {
        assert!(m.contains(want), "missing {want:?} in\n{m}");
    }
    let h = http(g.admin, "GET", "/healthz", None, &[]).json();
    assert_eq!(h["ok"], true);
}

#[test]
fn during_an_eviction_new_requests_wait_and_the_release_waits_for_the_unload() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let o = big();
    let g = Gateway::start(d.socket(), &o.url(), "[app.sizes]\n\"tiny\" = \"8GiB\"\n");
    let body = json!({"model": TINY, "prompt": "x", "stream": false});
    assert_eq!(
        http(g.app, "POST", "/api/generate", Some(&body), &[]).status,
        200
    );
    d.wait_status("idle", |s| {
        s.reservations.len() == 1 && s.reservations[0].idle
    });
    let delay = Duration::from_millis(800);
    o.set_unload_delay(delay);
    let socket = d.socket().to_path_buf();
    let job = std::thread::spawn(move || {
        let c = vramd_client::Client::connect(&socket).unwrap();
        let started = std::time::Instant::now();
        let r = c
            .reserve(Request::new(8 * GIB).label("image-job").timeout(WAIT))
            .unwrap();
        (started.elapsed(), r, c)
    });
    g.wait_model("evicting", |m| m.is_some_and(|m| m["phase"] == "evicting"));
    // A request arriving now is not forwarded: it waits for a new reservation.
    let generates = || o.log().iter().filter(|(_, p)| p == "/api/generate").count();
    let app = g.app;
    let late = std::thread::spawn(move || http(app, "POST", "/api/generate", Some(&body), &[]));
    let (waited, granted, _c) = job.join().unwrap();
    let loaded_at_grant = o.loaded();
    assert!(
        waited >= delay,
        "released after {waited:?}, before the model left /api/ps"
    );
    assert!(loaded_at_grant.is_empty(), "{loaded_at_grant:?}");
    // The first request and the unload: the late one was not forwarded.
    assert_eq!(generates(), 2, "{:?}\n{}", o.log(), g.log());
    assert_eq!(o.unload_requests().len(), 1);
    d.wait_status("the late request queued", |s| s.queue.len() == 1);
    drop(granted);
    assert_eq!(late.join().unwrap().status, 200);
    assert_eq!(o.loads(TINY), 2);
}

#[test]
fn a_client_that_leaves_mid_stream_ends_its_hold_on_the_model() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "");
    o.gate(true);
    let mut r = BufReader::new(send_request(
        g.app,
        "POST",
        "/api/chat",
        Some(&json!({"model": TINY, "messages": [{"role": "user", "content": "hi"}]})),
        &[],
    ));
    assert_eq!(read_head(&mut r).0, 200);
    assert!(read_chunk(&mut r).is_some());
    g.wait_model("busy", |m| m.is_some_and(|m| m["in_flight"] == 1));
    drop(r);
    // The fake is still blocked mid-generation; the client is gone.
    g.wait_model("idle after the client left", |m| {
        m.is_some_and(|m| m["in_flight"] == 0 && m["idle"] == true)
    });
    o.gate(false);
}

#[test]
fn observed_sizes_are_kept_across_restarts() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("sizes.json");
    let extra = "[app.sizes]\n\"tiny\" = \"3GiB\"\n";
    let g = Gateway::start_with_state(d.socket(), &o.url(), extra, Some(&state_file));
    let body = json!({"model": TINY, "prompt": "x", "stream": false});
    assert_eq!(
        http(g.app, "POST", "/api/generate", Some(&body), &[]).status,
        200
    );
    assert_eq!(
        reservations(&d)[0].1,
        3 * GIB,
        "the override before any observation"
    );
    assert!(wait_until(WAIT, || std::fs::read_to_string(&state_file)
        .is_ok_and(|s| s.contains("2147483648"))));
    drop(g);
    d.wait_status("released with the gateway", |s| s.reservations.is_empty());
    o.expire_now(TINY);
    let g = Gateway::start_with_state(d.socket(), &o.url(), extra, Some(&state_file));
    assert_eq!(
        http(g.app, "POST", "/api/generate", Some(&body), &[]).status,
        200
    );
    let res = reservations(&d);
    assert_eq!(res.len(), 1, "{res:?}\n{}", g.log());
    assert_eq!(
        res[0].1,
        2 * GIB,
        "the observed size wins over the override"
    );
}

/// Needs a Python with the `ollama` and `openai` PyPI packages, named by
/// `VRAMD_GATEWAY_PYTHON`: `bash gateway/scripts/test-python-clients.sh`
/// sets one up and runs this.
#[test]
#[ignore = "needs the ollama and openai PyPI packages (gateway/scripts/test-python-clients.sh)"]
fn the_official_ollama_and_openai_python_clients_work_through_the_gateway() {
    let python = std::env::var("VRAMD_GATEWAY_PYTHON")
        .expect("VRAMD_GATEWAY_PYTHON: a python with ollama and openai installed");
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let g = Gateway::start(d.socket(), &o.url(), "");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/tests/clients.py");
    let out = Command::new(python)
        .arg(script)
        .env("GATEWAY_URL", format!("http://{}", g.app))
        .env("MODEL", TINY)
        .env("TOKENS", tokens())
        .env_remove("OLLAMA_HOST")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        g.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert_eq!(o.loads(TINY), 1, "one load for all of it");
    assert_eq!(reservations(&d).len(), 1);
}

#[test]
fn other_apps_keep_being_served_while_one_waits_or_its_upstream_is_down() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let o = tiny();
    let o2 = big();
    let (second, third, dead) = (free_port(), free_port(), free_port());
    let extra = format!(
        "[[app]]\nname = \"second\"\nkind = \"ollama\"\nupstream = \"{}\"\nlisten = \"{second}\"\n\
         [[app]]\nname = \"down\"\nkind = \"ollama\"\nupstream = \"http://{dead}\"\nlisten = \"{third}\"\n",
        o2.url()
    );
    let g = Gateway::start(d.socket(), &o.url(), &extra);
    let body = json!({"model": TINY, "prompt": "x", "stream": false});
    assert_eq!(
        http(g.app, "POST", "/api/generate", Some(&body), &[]).status,
        200
    );
    let holder = ChildGuard::new(d.hold("8GiB"));
    let b = body.clone();
    let waiter = std::thread::spawn(move || http(second, "POST", "/api/generate", Some(&b), &[]));
    d.wait_status("the second app's request queued", |s| {
        s.queue
            .iter()
            .any(|q| q.label.as_deref() == Some("second/tiny:latest"))
    });
    // Meanwhile the first app's held model is served, and the app whose
    // upstream is down answers 502 at once.
    let r = http(g.app, "POST", "/api/generate", Some(&body), &[]);
    assert_eq!(
        (r.status, r.json()["response"].clone()),
        (200, json!(tokens()))
    );
    assert_eq!(http(third, "GET", "/api/tags", None, &[]).status, 502);
    let r = http(
        third,
        "POST",
        "/api/chat",
        Some(&json!({"model": TINY, "messages": []})),
        &[],
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(o2.loads(TINY), 0);
    drop(holder);
    assert_eq!(waiter.join().unwrap().status, 200);
    assert_eq!(o2.loads(TINY), 1);
    let labels: Vec<String> = g.status()["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels, ["ollama", "second", "down"]);
}

#[test]
fn evict_pinned_lets_vramd_evict_a_model_pinned_by_keep_alive() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let o = big();
    let g = Gateway::start(d.socket(), &o.url(), "evict_pinned = true\n");
    let body = json!({"model": TINY, "prompt": "x", "stream": false, "keep_alive": "-1m"});
    assert_eq!(
        http(g.app, "POST", "/api/generate", Some(&body), &[]).status,
        200
    );
    g.wait_model("pinned and idle", |m| {
        m.is_some_and(|m| m["pinned"] == true && m["idle"] == true)
    });
    let c = d.client();
    let r = c
        .reserve(Request::new(8 * GIB).label("image-job").timeout(WAIT))
        .expect("granted after evicting the pinned model");
    assert_eq!(o.unload_requests(), vec![TINY.to_string()]);
    assert!(o.loaded().is_empty());
    drop(r);
}
