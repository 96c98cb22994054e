//! `kind = "managed"` end to end: the real daemon on the fake NVML card
//! (24 GiB), the gateway starting `fake-model-server` (tests/src/bin: a real
//! process that serves `/health`, `/v1/models` and chat completions like
//! llama-server, and lists its own pid's memory on the card after a short
//! load delay) per model, under the model's reservation. Every wait is
//! bounded; every server is stopped by the gateway before the test ends
//! (and dies with it: it gets SIGTERM when the gateway goes).

use std::io::BufReader;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use vramd_client::GIB;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::gateway_rig::{Gateway, free_port, http, read_chunk, read_head, send_request};
use vramd_tests::{Daemon, WAIT, bin, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";

/// The card, its daemon, and a thread recording the most memory ever in
/// use on it (read from the state file every 10 ms).
struct Card {
    gpu: Arc<FakeGpu>,
    d: Daemon,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Card {
    fn start(extra: &[&str]) -> Card {
        let dir = tempfile::tempdir().unwrap();
        let gpu = FakeGpu::create(&dir.path().join("state.json"), &[(UUID0, 24 * GIB)]);
        let lib = fake_nvml_lib();
        let mut args = vec![
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--poll-interval",
            "50ms",
            "--min-residency",
            "0s",
        ];
        args.extend_from_slice(extra);
        let d = Daemon::start_env(&args, &[(fake_nvml::STATE_ENV, gpu.path())]);
        let (peak, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        {
            let (path, peak, stop) = (gpu.path().to_path_buf(), peak.clone(), stop.clone());
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                    if let Ok(s) = fake_nvml::State::read(&path) {
                        peak.fetch_max(s.devices[0].used_bytes(), Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        Card {
            gpu,
            d,
            peak,
            stop,
            _dir: dir,
        }
    }

    /// Process `pid`'s usage on the card now (read from the file, which the
    /// servers write themselves).
    fn usage_of(&self, pid: u32) -> u64 {
        fake_nvml::State::read(self.gpu.path())
            .map(|s| {
                s.devices[0]
                    .processes
                    .iter()
                    .filter(|p| p.pid == pid)
                    .filter_map(|p| p.used_bytes)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// One `[[app.model]]` served by the fake, holding `size` on the card.
    fn model(&self, name: &str, size: &str, extra: &str) -> String {
        format!(
            r#"
[[app.model]]
name = "{name}"
cmd = "{fake} --port ${{PORT}} --model ${{MODEL}} --size {size} --load-delay-ms 300"
size = "{size}"
env = {{ FAKE_NVML_STATE = {state:?} }}
{extra}
"#,
            fake = bin("fake-model-server").display(),
            state = self.gpu.path(),
        )
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn app(listen: SocketAddr, extra: &str, models: &str) -> String {
    format!(
        "[[app]]\nname = \"mgd\"\nkind = \"managed\"\nlisten = \"{listen}\"\nstop_timeout = \"3s\"\nstart_timeout = \"10s\"\n{extra}\n{models}"
    )
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// `/status`'s entry for managed model `model` of app 0.
fn server(g: &Gateway, model: &str) -> Value {
    g.status()["apps"][0]["managed"]["models"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["model"] == model).cloned())
        .unwrap_or(Value::Null)
}

fn wait_phase(g: &Gateway, model: &str, phase: &str) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        last = server(g, model);
        last["phase"] == phase
    });
    assert!(ok, "{model} never {phase}: {last:#}; log:\n{}", g.log());
    last
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn label_held(d: &Daemon, label: &str) -> bool {
    d.client()
        .status()
        .unwrap()
        .reservations
        .iter()
        .any(|r| r.label.as_deref() == Some(label))
}

#[test]
fn a_model_is_started_on_demand_proxied_attributed_and_stopped_with_the_gateway() {
    let card = Card::start(&[]);
    let listen = free_port();
    let g = Gateway::start(
        card.d.socket(),
        "",
        &app(listen, "", &card.model("alpha", "6GiB", "")),
        &[listen],
    );
    assert_eq!(server(&g, "alpha")["phase"], "stopped");
    assert!(
        !label_held(&card.d, "mgd/alpha"),
        "nothing reserved before a request"
    );
    let models = http(listen, "GET", "/v1/models", None, &[]).json();
    assert_eq!(models["data"][0]["id"], "alpha");

    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}; log:\n{}", r.text(), g.log());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "hello from alpha"
    );
    let s = wait_phase(&g, "alpha", "running");
    let pid = s["pid"].as_u64().unwrap();
    assert!(alive(pid));
    assert_eq!(card.usage_of(pid as u32), 6 * GIB);

    // Its memory counts against the gateway's reservation for the model.
    let st = card.d.wait_status("the server attributed", |st| {
        st.processes
            .iter()
            .any(|p| p.pid == pid as u32 && p.reservation.is_some())
    });
    let res = st
        .reservations
        .iter()
        .find(|r| r.label.as_deref() == Some("mgd/alpha"))
        .expect("the model's reservation");
    let p = st.processes.iter().find(|p| p.pid == pid as u32).unwrap();
    assert_eq!(p.reservation, Some(res.id));
    assert_eq!(s["reservation_id"].as_u64(), Some(res.id.0));
    assert!(res.pids.contains(&(pid as u32)), "{res:?}");

    // A stream passes through, event by event, to `data: [DONE]`.
    let mut rd = BufReader::new(send_request(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("alpha", true)),
        &[],
    ));
    let (status, headers) = read_head(&mut rd);
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.contains("text/event-stream"))
    );
    let mut body = String::new();
    for _ in 0..100 {
        match read_chunk(&mut rd) {
            Some(c) => body.push_str(&String::from_utf8_lossy(&c)),
            None => break,
        }
    }
    assert!(
        body.contains("chat.completion.chunk") && body.trim_end().ends_with("data: [DONE]"),
        "{body}"
    );
    assert_eq!(
        server(&g, "alpha")["starts"],
        1,
        "one server for both requests"
    );
    let metrics = http(g.admin, "GET", "/metrics", None, &[]).text();
    assert!(
        metrics.contains("vramd_gateway_managed_starts_total{app=\"mgd\",model=\"alpha\"} 1"),
        "{metrics}"
    );

    // The gateway stops its servers when it is stopped.
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(g.pid() as i32, libc::SIGTERM) }, 0);
    assert!(
        wait_until(WAIT, || !alive(pid)),
        "the server outlived the gateway"
    );
    assert_eq!(
        card.usage_of(pid as u32),
        0,
        "it freed its memory (SIGTERM)"
    );
}

#[test]
fn eviction_stops_the_server_before_the_job_is_granted() {
    let card = Card::start(&[]);
    let listen = free_port();
    let g = Gateway::start(
        card.d.socket(),
        "",
        &app(listen, "", &card.model("big", "16GiB", "")),
        &[listen],
    );
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("big", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let pid = wait_phase(&g, "big", "running")["pid"].as_u64().unwrap();
    assert!(wait_until(WAIT, || card.usage_of(pid as u32) == 16 * GIB));

    // A 12 GiB job does not fit beside it: vramd evicts the idle model.
    let mut job = card
        .d
        .vramctl()
        .args(["reserve", "12GiB", "--label", "job"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut BufReader::new(job.stdout.as_mut().unwrap()), &mut line)
        .unwrap();
    assert!(line.starts_with("granted"), "{line:?}; log:\n{}", g.log());
    // Granted only once the server was gone and its memory freed.
    assert_eq!(card.usage_of(pid as u32), 0);
    assert!(
        wait_until(WAIT, || !alive(pid)),
        "the evicted server still runs"
    );
    assert!(!label_held(&card.d, "mgd/big"));
    assert!(
        card.peak.load(Ordering::SeqCst) <= 24 * GIB,
        "the card was overcommitted"
    );
    let s = wait_phase(&g, "big", "stopped");
    assert_eq!(s["stops"], 1);
    let metrics = http(g.admin, "GET", "/metrics", None, &[]).text();
    assert!(
        metrics.contains(
            "vramd_gateway_managed_stops_total{app=\"mgd\",model=\"big\",reason=\"evicted\"} 1"
        ),
        "{metrics}"
    );
    let _ = job.kill();
    let _ = job.wait();
    // The next request starts it again.
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("big", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let s = wait_phase(&g, "big", "running");
    assert_eq!(s["starts"], 2);
    assert_ne!(s["pid"].as_u64(), Some(pid));
}

#[test]
fn an_idle_server_is_stopped_after_its_ttl() {
    let card = Card::start(&[]);
    let listen = free_port();
    let g = Gateway::start(
        card.d.socket(),
        "",
        &app(listen, "", &card.model("brief", "2GiB", "ttl = \"1s\"")),
        &[listen],
    );
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("brief", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let pid = wait_phase(&g, "brief", "running")["pid"].as_u64().unwrap();
    assert!(label_held(&card.d, "mgd/brief"));
    let s = wait_phase(&g, "brief", "stopped");
    assert!(!alive(pid));
    assert_eq!(card.usage_of(pid as u32), 0);
    assert!(
        wait_until(WAIT, || !label_held(&card.d, "mgd/brief")),
        "the reservation outlived the TTL"
    );
    assert_eq!(s["stops"], 1);
    let metrics = http(g.admin, "GET", "/metrics", None, &[]).text();
    assert!(metrics.contains("reason=\"ttl\"} 1"), "{metrics}");
}

#[test]
fn models_of_one_group_run_together_and_a_model_outside_stops_them() {
    let card = Card::start(&[]);
    let listen = free_port();
    let models =
        card.model("a", "2GiB", "") + &card.model("b", "2GiB", "") + &card.model("c", "2GiB", "");
    let g = Gateway::start(
        card.d.socket(),
        "",
        &app(listen, "groups = [[\"a\", \"b\"]]", &models),
        &[listen],
    );
    for m in ["a", "b"] {
        let r = http(
            listen,
            "POST",
            "/v1/chat/completions",
            Some(&chat(m, false)),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let pa = wait_phase(&g, "a", "running")["pid"].as_u64().unwrap();
    let pb = wait_phase(&g, "b", "running")["pid"].as_u64().unwrap();
    assert!(alive(pa) && alive(pb), "a and b share a group: both run");
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("c", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_phase(&g, "c", "running");
    assert_eq!(server(&g, "a")["phase"], "stopped");
    assert_eq!(server(&g, "b")["phase"], "stopped");
    assert!(wait_until(WAIT, || !alive(pa) && !alive(pb)));
    assert!(!label_held(&card.d, "mgd/a") && !label_held(&card.d, "mgd/b"));
}

#[test]
fn an_enforced_server_gets_the_mps_limit_and_its_reservation_shows_as_enforced() {
    let mps = tempfile::tempdir().unwrap();
    let control = mps.path().join("control");
    let c = std::ffi::CString::new(control.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let card = Card::start(&["--mps-pipe-dir", mps.path().to_str().unwrap()]);
    let listen = free_port();
    let g = Gateway::start(
        card.d.socket(),
        "",
        &app(listen, "", &card.model("capped", "4GiB", "enforce = true")),
        &[listen],
    );
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("capped", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}; log:\n{}", r.text(), g.log());
    let s = wait_phase(&g, "capped", "running");
    let pid = s["pid"].as_u64().unwrap();
    assert_eq!(s["enforced_limit_bytes"].as_u64(), Some(4 * GIB));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let env: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let has = |kv: String| env.contains(&kv);
    assert!(
        has("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=4096M".into()),
        "{env:?}"
    );
    assert!(
        has(format!("CUDA_MPS_PIPE_DIRECTORY={}", mps.path().display())),
        "{env:?}"
    );
    assert!(has(format!("CUDA_VISIBLE_DEVICES={UUID0}")), "{env:?}");
    let st = card.d.client().status().unwrap();
    let res = st
        .reservations
        .iter()
        .find(|r| r.label.as_deref() == Some("mgd/capped"))
        .unwrap();
    let e = st
        .enforced
        .iter()
        .find(|e| e.id == res.id)
        .expect("listed as enforced");
    assert_eq!((e.limit_bytes, e.mechanism.as_str()), (4 * GIB, "mps"));
}

#[test]
fn a_server_that_exits_by_itself_releases_and_starts_again_on_the_next_request() {
    let card = Card::start(&[]);
    let listen = free_port();
    let models = card.model("flaky", "2GiB", "").replace(
        "--load-delay-ms 300",
        "--load-delay-ms 300 --exit-after-ms 1500 --exit-code 3",
    );
    let g = Gateway::start(card.d.socket(), "", &app(listen, "", &models), &[listen]);
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("flaky", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let s = wait_phase(&g, "flaky", "stopped");
    assert_eq!(s["exits"], 1);
    let err = s["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("exit status: 3"), "{s:#}");
    assert!(s["last_error_at_ms"].as_u64().is_some());
    assert!(wait_until(WAIT, || !label_held(&card.d, "mgd/flaky")));
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("flaky", false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server(&g, "flaky")["starts"], 2);
}

#[test]
fn a_server_that_never_gets_healthy_is_a_503_and_releases_its_reservation() {
    let card = Card::start(&[]);
    let listen = free_port();
    let models = card
        .model("slow", "2GiB", "")
        .replace("--load-delay-ms 300", "--load-delay-ms 60000");
    let g = Gateway::start(
        card.d.socket(),
        "",
        &app(listen, "", &models).replace("start_timeout = \"10s\"", "start_timeout = \"1s\""),
        &[listen],
    );
    let r = http(
        listen,
        "POST",
        "/v1/chat/completions",
        Some(&chat("slow", false)),
        &[],
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("start_timeout"),
        "{}",
        r.text()
    );
    let s = server(&g, "slow");
    assert_eq!(
        (s["phase"].as_str(), s["failed_starts"].as_u64()),
        (Some("stopped"), Some(1))
    );
    assert!(
        s["last_error"].as_str().unwrap().starts_with("start:"),
        "{s:#}"
    );
    assert!(!label_held(&card.d, "mgd/slow"));
}

#[test]
fn bad_managed_configs_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[app]]\nname = \"m\"\nkind = \"managed\"\nlisten = \"127.0.0.1:1\"\n[[app.model]]\nname = \"a\"\nsize = \"1GiB\"\n",
            "model \"a\": cmd: required",
        ),
        (
            "[[app]]\nname = \"m\"\nkind = \"managed\"\nlisten = \"127.0.0.1:1\"\ngroups = [[\"a\", \"zz\"]]\n[[app.model]]\nname = \"a\"\ncmd = \"x\"\nsize = \"1GiB\"\n",
            "groups: \"zz\" is not a model of this app",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path: PathBuf = dir.path().join(format!("g{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(bin("vramd-gateway"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
}
