//! `kind = "openai"` end to end: the real daemon on a simulated card, fake
//! OpenAI-compatible servers (tests/src/fake_openai.rs), one per model as
//! vLLM runs them, and the gateway binary. Every wait is bounded.

use std::io::BufReader;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::{Error, GIB, Request};
use vramd_tests::fake_openai::{FakeOpenAi, TOKENS};
use vramd_tests::gateway_rig::{Gateway, free_port, http, read_chunk, read_head, send_request};
use vramd_tests::{Daemon, WAIT, bin};

fn tokens() -> String {
    (0..TOKENS).map(|i| format!("tok{i} ")).collect()
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

/// One `[[app.model]]` table.
fn model(name: &str, upstream: &str, extra: &str) -> String {
    format!("[[app.model]]\nname = \"{name}\"\nupstream = \"{upstream}\"\n{extra}\n")
}

fn app(listen: std::net::SocketAddr, models: &str) -> String {
    format!("[[app]]\nname = \"llm\"\nkind = \"openai\"\nlisten = \"{listen}\"\n\n{models}")
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

#[test]
fn requests_are_routed_by_model_to_their_upstreams_with_one_reservation_each() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let (a, b) = (
        FakeOpenAi::start(&["alpha"]),
        FakeOpenAi::start(&["org/beta-7b"]),
    );
    let listen = free_port();
    let models = model("alpha", &a.url(), "size = \"4GiB\"")
        + &model("org/beta-7b", &b.url(), "size = \"3GiB\"");
    let g = Gateway::start(d.socket(), "", &app(listen, &models), &[listen]);

    // The models, listed by the gateway in the real API's shape.
    let r = http(listen, "GET", "/v1/models", None, &[]);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            m["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids, ["alpha", "org/beta-7b"]);
    let r = http(listen, "GET", "/v1/models/org/beta-7b", None, &[]);
    assert_eq!(r.json()["id"], "org/beta-7b");
    assert!(reservations(&d).is_empty(), "listing reserves nothing");

    // Whole answers, each to its own upstream.
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], tokens());
    let r = http(
        listen,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "org/beta-7b", "prompt": "hi"})),
        &[],
    );
    assert_eq!(r.json()["choices"][0]["text"], tokens());
    let r = http(
        listen,
        "POST",
        "/v1/embeddings",
        Some(&json!({"model": "alpha", "input": "x"})),
        &[],
    );
    assert_eq!(r.json()["data"][0]["embedding"], json!([0.1, 0.2, 0.3]));
    assert_eq!((a.model_requests(), b.model_requests()), (2, 1));
    assert!(a.log().iter().all(|(_, _, m)| m == "alpha"));
    assert_eq!(
        reservations(&d)
            .into_iter()
            .map(|(l, b, _)| (l, b))
            .collect::<Vec<_>>(),
        [
            ("llm/alpha".to_string(), 4 * GIB),
            ("llm/org/beta-7b".to_string(), 3 * GIB)
        ]
    );

    // A stream comes chunk by chunk, and keeps its model busy until it ends.
    b.gate(true);
    let mut s = BufReader::new(send_request(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("org/beta-7b", true)),
        &[],
    ));
    let (status, headers) = read_head(&mut s);
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "text/event-stream")
    );
    let first = String::from_utf8(read_chunk(&mut s).expect("a first event")).unwrap();
    assert!(
        first.starts_with("data: ") && first.contains("tok0 "),
        "{first:?}"
    );
    let busy = g.wait_models(0, "beta busy", |m| {
        m.iter()
            .any(|m| m["model"] == "org/beta-7b" && m["in_flight"] == 1)
    });
    assert!(busy.iter().any(|m| m["idle"] == false));
    b.gate(false);
    let mut rest = String::new();
    while let Some(c) = read_chunk(&mut s) {
        rest.push_str(&String::from_utf8(c).unwrap());
    }
    let events: Vec<&str> = rest.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), TOKENS + 1, "{rest:?}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    g.wait_models(0, "the stream no longer counted", |m| {
        m.len() == 2 && m.iter().all(|m| m["in_flight"] == 0)
    });

    // Mistakes, answered by the gateway in OpenAI's error shape.
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("gamma", false)),
        &[],
    );
    assert_eq!(r.status, 404);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("`gamma`"));
    let r = http(listen, "GET", "/v1/models/gamma", None, &[]);
    assert_eq!(r.status, 404);
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&json!([1])),
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&json!({"messages": []})),
        &[],
    );
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (400, json!("you must provide a model parameter"))
    );
    let r = http(listen, "GET", "/v2/whatever", None, &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "unknown_url");
    assert_eq!(reservations(&d).len(), 2, "mistakes reserve nothing");
}

#[test]
fn an_evicted_model_is_unloaded_by_its_request_released_and_loaded_again_on_the_next() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let a = FakeOpenAi::start(&["alpha"]);
    let listen = free_port();
    let models = model(
        "alpha",
        &a.url(),
        "size = \"8GiB\"\nunload = { path = \"/unload\", body = \"{\\\"level\\\":1}\" }\nload = { path = \"/load\" }",
    );
    let g = Gateway::start(d.socket(), "", &app(listen, &models), &[listen]);
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        a.loads(),
        1,
        "the load request is made once per reservation"
    );
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(a.loads(), 1);
    d.wait_status("idle", |s| {
        s.reservations.len() == 1 && s.reservations[0].idle
    });

    let c = d.client();
    let job = c
        .reserve(Request::new(8 * GIB).label("image-job").timeout(WAIT))
        .unwrap_or_else(|e| panic!("{e}; gateway log:\n{}", g.log()));
    assert_eq!(a.unloads(), 1);
    assert!(!a.loaded());
    let unload = a
        .log()
        .into_iter()
        .position(|(m, p, _)| m == "POST" && p == "/unload");
    assert!(unload.is_some(), "{:?}", a.log());
    g.wait_models(0, "released", |m| m.is_empty());

    // The next request waits for the room, then loads the model again
    // before it is forwarded (the fake answers 503 while unloaded).
    let waiter = std::thread::spawn(move || {
        http(
            listen,
            "POST",
            "/v1/chat/completions",
            Some(&chat("alpha", false)),
            &[],
        )
    });
    d.wait_status("the request queued", |s| s.queue.len() == 1);
    assert_eq!(a.model_requests(), 2, "not forwarded while waiting");
    drop(job);
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(a.loads(), 2);
    assert!(a.loaded());
}

#[test]
fn a_model_without_an_unload_request_is_never_evicted() {
    let d = Daemon::start_raw(&["--simulate", "12GiB", "--min-residency", "0s"]);
    let a = FakeOpenAi::start(&["alpha"]);
    let listen = free_port();
    let models = model("alpha", &a.url(), "size = \"8GiB\"");
    let g = Gateway::start(d.socket(), "", &app(listen, &models), &[listen]);
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 200);
    // Well past the idle linger: still busy in vramd.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        reservations(&d),
        [("llm/alpha".to_string(), 8 * GIB, false)]
    );
    let m = g.models(0);
    assert_eq!(
        (m[0]["in_flight"].clone(), m[0]["idle"].clone()),
        (json!(0), json!(false))
    );
    let e = d
        .client()
        .reserve(Request::new(8 * GIB).timeout(Duration::from_millis(700)))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "{e}");
    assert_eq!(a.unloads(), 0);
}

#[test]
fn an_observed_size_in_the_state_file_wins_and_a_model_without_any_size_stops_the_start() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let a = FakeOpenAi::start(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sizes.json");
    std::fs::write(&state, r#"{"size_vram_bytes": {"llm/alpha": 5368709120}}"#).unwrap();
    let listen = free_port();
    let top = format!("state_file = {state:?}");
    let g = Gateway::start(
        d.socket(),
        &top,
        &app(listen, &model("alpha", &a.url(), "size = \"2GiB\"")),
        &[listen],
    );
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(reservations(&d)[0].1, 5 * GIB);
    drop(g);

    // No size declared and none observed: the gateway does not start.
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = {:?}\nlisten = \"{}\"\nstate_file = {:?}\n{}",
            d.socket(),
            free_port(),
            dir.path().join("empty.json"),
            app(free_port(), &model("alpha", &a.url(), ""))
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(bin("vramd-gateway"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(started.elapsed() < WAIT);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model \"alpha\": size: required"), "{err}");
}

#[test]
fn an_upstream_that_is_down_is_a_502_in_openais_shape_naming_it() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let dead = format!("http://{}", free_port());
    let listen = free_port();
    let g = Gateway::start(
        d.socket(),
        "",
        &app(listen, &model("alpha", &dead, "size = \"1GiB\"")),
        &[listen],
    );
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["type"], "server_error");
    assert!(e["message"].as_str().unwrap().contains(&dead), "{e}");
    g.wait_models(0, "the failed request no longer counted", |m| {
        m.iter().all(|m| m["in_flight"] == 0)
    });
}

/// Needs a Python with the `openai` PyPI package, named by
/// `VRAMD_GATEWAY_PYTHON`: `bash gateway/scripts/test-python-clients.sh`
/// sets one up and runs this.
#[test]
#[ignore = "needs the openai PyPI package (gateway/scripts/test-python-clients.sh)"]
fn the_official_openai_python_client_works_through_an_openai_app() {
    let python = std::env::var("VRAMD_GATEWAY_PYTHON")
        .expect("VRAMD_GATEWAY_PYTHON: a python with openai installed");
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let a = FakeOpenAi::start(&["alpha"]);
    let listen = free_port();
    let g = Gateway::start(
        d.socket(),
        "",
        &app(listen, &model("alpha", &a.url(), "size = \"2GiB\"")),
        &[listen],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/tests/clients_openai.py");
    let out = Command::new(python)
        .arg(script)
        .env("GATEWAY_URL", format!("http://{listen}"))
        .env("MODEL", "alpha")
        .env("TOKENS", tokens())
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
    assert_eq!(reservations(&d).len(), 1);
}

#[test]
fn a_wait_limit_that_passes_is_a_503_with_retry_after_in_openais_shape() {
    let d = Daemon::start_raw(&["--simulate", "12GiB"]);
    let a = FakeOpenAi::start(&["alpha"]);
    let listen = free_port();
    let apps = format!(
        "[[app]]\nname = \"llm\"\nkind = \"openai\"\nlisten = \"{listen}\"\nwait_limit = \"300ms\"\n\n{}",
        model("alpha", &a.url(), "size = \"4GiB\"")
    );
    let _g = Gateway::start(d.socket(), "", &apps, &[listen]);
    let _holder = vramd_harness::ChildGuard::new(d.hold("10GiB"));
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let e = &r.json()["error"];
    assert_eq!(e["type"], "server_error");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("timed out waiting for GPU memory for alpha"),
        "{e}"
    );
    assert_eq!(a.model_requests(), 0, "nothing forwarded");
    assert!(d.client().status().unwrap().queue.is_empty());
}
