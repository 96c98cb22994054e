//! The gateway's attribution of model memory on the fake libnvidia-ml: the
//! fake Ollama in runner mode (one real child process per loaded model,
//! holding the model's memory on the fake card), the real daemon with
//! `--nvml-lib`, and the gateway binary. Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use vramd_client::{Error, GIB, Request, StatusReport};
use vramd_harness::ChildGuard;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_ollama::{FakeOllama, ModelDef};
use vramd_tests::{Daemon, WAIT, bin, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const A: &str = "alpha:latest";
const B: &str = "beta:latest";
const C: &str = "gamma:latest";

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A fake card of `total` bytes and a daemon reading it.
fn card(total: u64) -> (Arc<FakeGpu>, Daemon) {
    card_with(total, &[])
}

/// [`card`] with extra daemon arguments.
fn card_with(total: u64, extra: &[&str]) -> (Arc<FakeGpu>, Daemon) {
    let dir = tempfile::tempdir().unwrap().keep();
    let gpu = FakeGpu::create(&dir.join("state.json"), &[(UUID0, total)]);
    let lib = fake_nvml_lib();
    let mut args = vec![
        "--nvml-lib",
        lib.to_str().unwrap(),
        "--poll-interval",
        "50ms",
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_env(&args, &[(fake_nvml::STATE_ENV, gpu.path())]);
    (gpu, daemon)
}

/// A running `vramd-gateway` for one Ollama app, killed when dropped.
struct Gateway {
    child: ChildGuard,
    admin: SocketAddr,
    app: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gateway {
    fn start(socket: &Path, upstream: &str, extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state/sizes.json");
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
                && http(g.admin, "GET", "/status", None).0 == 200),
            "the gateway never answered; log:\n{}",
            g.log()
        );
        g
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    fn status(&self) -> Value {
        let (code, body) = http(self.admin, "GET", "/status", None);
        assert_eq!(code, 200);
        serde_json::from_slice(&body).expect("JSON status")
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.child.kill();
    }
}

/// One HTTP/1.1 request (`Connection: close`); the status and the body
/// (chunked bodies decoded).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        if h.trim_end().is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
    let mut out = Vec::new();
    if chunked {
        for _ in 0..100_000 {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            let mut data = vec![0; n + 2];
            r.read_exact(&mut data).expect("chunk");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&data[..n]);
        }
    } else {
        r.read_to_end(&mut out).expect("body");
    }
    (status, out)
}

fn generate(addr: SocketAddr, model: &str) -> u16 {
    let body = json!({"model": model, "prompt": "x", "stream": false});
    http(addr, "POST", "/api/generate", Some(&body)).0
}

fn held<'a>(s: &'a StatusReport, model: &str) -> Option<&'a vramd_protocol::ReservationStatus> {
    let label = format!("ollama/{model}");
    s.reservations
        .iter()
        .find(|r| r.label.as_deref() == Some(label.as_str()))
}

#[test]
fn runners_are_attributed_per_model_and_a_direct_load_stays_unattributed() {
    let (gpu, d) = card(24 * GIB);
    let o = FakeOllama::start_with_runners(
        &[
            ModelDef::new(A, GIB, 2 * GIB),
            ModelDef::new(B, GIB, 3 * GIB),
            ModelDef::new(C, GIB, 4 * GIB),
        ],
        gpu.clone(),
    );
    let g = Gateway::start(
        d.socket(),
        &o.url(),
        "[app.sizes]\n\"alpha\" = \"2GiB\"\n\"beta\" = \"3GiB\"\n",
    );
    assert_eq!(generate(g.app, A), 200);
    assert_eq!(generate(g.app, B), 200);
    let (ra, rb) = (o.runner_pid(A).unwrap(), o.runner_pid(B).unwrap());
    let s = d.wait_status("each model's runner attached", |s| {
        held(s, A).is_some_and(|r| r.pids == vec![ra] && r.actual_bytes == 2 * GIB)
            && held(s, B).is_some_and(|r| r.pids == vec![rb] && r.actual_bytes == 3 * GIB)
    });
    assert!(
        s.reservations.iter().all(|r| !r.pids.contains(&g.pid())),
        "the gateway's own process is left out: {s:#?}"
    );
    assert_eq!(s.devices[0].unattributed_bytes, 0);
    assert_eq!(s.devices[0].committed_bytes, 5 * GIB);
    // A model loaded straight on Ollama, behind the gateway's back: its
    // runner's memory is unattributed, counted once.
    assert_eq!(generate(o.url().parse_addr(), C), 200);
    let rc = o.runner_pid(C).unwrap();
    let s = d.wait_status("the direct load read", |s| {
        s.devices[0].used_bytes == 9 * GIB
    });
    assert_eq!(s.devices[0].unattributed_bytes, 4 * GIB);
    assert_eq!(
        s.devices[0].committed_bytes,
        9 * GIB,
        "counted twice: {s:#?}"
    );
    assert_eq!(s.devices[0].available_bytes, 15 * GIB);
    let p = s.processes.iter().find(|p| p.pid == rc).unwrap();
    assert_eq!(p.reservation, None);
    // It stays so: the gateway does not take it over while it runs.
    std::thread::sleep(Duration::from_millis(500));
    let s = d.client().status().unwrap();
    assert!(held(&s, C).is_none(), "{s:#?}");
    assert_eq!(s.devices[0].unattributed_bytes, 4 * GIB);
    let st = g.status();
    let runners = &st["apps"][0]["attribution"]["runners"];
    assert!(
        runners
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["model"] == A && r["pids"] == json!([ra])),
        "{st:#}"
    );
}

/// `SocketAddr` of a fake's `http://` URL.
trait ParseAddr {
    fn parse_addr(&self) -> SocketAddr;
}

impl ParseAddr for String {
    fn parse_addr(&self) -> SocketAddr {
        self.trim_start_matches("http://").parse().expect("addr")
    }
}

#[test]
fn a_restarted_gateway_adopts_resident_models_without_waiting() {
    let (gpu, d) = card(12 * GIB);
    let o = FakeOllama::start_with_runners(
        &[
            ModelDef::new(A, GIB, 4 * GIB),
            ModelDef::new(B, GIB, 6 * GIB),
        ],
        gpu.clone(),
    );
    let sizes = "[app.sizes]\n\"alpha\" = \"4GiB\"\n\"beta\" = \"6GiB\"\n";
    let g = Gateway::start(d.socket(), &o.url(), sizes);
    assert_eq!(generate(g.app, A), 200);
    assert_eq!(generate(g.app, B), 200);
    d.wait_status("both held", |s| s.reservations.len() == 2);
    drop(g);
    // The models stay loaded; the card fills up.
    gpu.set_process(0, 4_000_000, 2 * GIB);
    let s = d.wait_status("released, card full", |s| {
        s.reservations.is_empty() && s.devices[0].used_bytes == 12 * GIB
    });
    assert_eq!(s.devices[0].available_bytes, 0);
    let c = d.client();
    let e = c
        .reserve(Request::new(GIB).timeout(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "{e}");
    // A new gateway adopts them at once, each with its runner.
    let g = Gateway::start(d.socket(), &o.url(), sizes);
    let (ra, rb) = (o.runner_pid(A).unwrap(), o.runner_pid(B).unwrap());
    let s = d.wait_status("both adopted", |s| {
        held(s, A).is_some_and(|r| r.pids == vec![ra] && r.bytes == 4 * GIB)
            && held(s, B).is_some_and(|r| r.pids == vec![rb] && r.bytes == 6 * GIB)
    });
    assert_eq!(s.devices[0].unattributed_bytes, 2 * GIB);
    assert!(s.queue.is_empty());
    assert!(s.reservations.iter().all(|r| r.idle), "{s:#?}");
    // A request for one of them is served on its reservation: no reload,
    // no wait.
    assert_eq!(generate(g.app, A), 200);
    assert_eq!(o.loads(A), 1);
    assert_eq!(c.status().unwrap().reservations.len(), 2);
}

#[test]
fn a_load_larger_than_declared_grows_the_reservation() {
    let (gpu, d) = card(24 * GIB);
    let o = FakeOllama::start_with_runners(&[ModelDef::new(A, GIB, 5 * GIB)], gpu.clone());
    let g = Gateway::start(d.socket(), &o.url(), "[app.sizes]\n\"alpha\" = \"2GiB\"\n");
    assert_eq!(generate(g.app, A), 200);
    let s = d.wait_status("grown to the runner's usage", |s| {
        held(s, A).is_some_and(|r| r.bytes == 5 * GIB && !r.over_reserved)
    });
    assert_eq!(s.devices[0].committed_bytes, 5 * GIB);
    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        last = g.status();
        last["apps"][0]["models"][0]["reserved_bytes"] == json!(5 * GIB)
    });
    assert!(ok, "{last:#}");
    assert!(g.log().contains("reservation grown"), "{}", g.log());
}

#[test]
fn a_load_that_cannot_grow_its_reservation_is_flagged_in_status() {
    let (gpu, d) = card(6 * GIB);
    let o = FakeOllama::start_with_runners(&[ModelDef::new(A, GIB, 5 * GIB)], gpu.clone());
    // Another job holds 3 GiB it has not loaded yet: the model's 5 GiB and
    // the job's 3 cannot both be reserved on a 6 GiB card.
    let c = d.client();
    let _job = c.reserve(Request::new(3 * GIB).label("job")).unwrap();
    let g = Gateway::start(d.socket(), &o.url(), "[app.sizes]\n\"alpha\" = \"2GiB\"\n");
    assert_eq!(generate(g.app, A), 200);
    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        last = g.status();
        last["apps"][0]["attribution"]["problems"][A]
            .as_str()
            .is_some_and(|m| m.contains("did not let it grow"))
    });
    assert!(ok, "{last:#}");
    let s = d.client().status().unwrap();
    let r = held(&s, A).unwrap();
    assert_eq!(r.bytes, 2 * GIB);
    assert!(r.over_reserved, "vramd still counts its real usage: {s:#?}");
    assert_eq!(s.devices[0].committed_bytes, 8 * GIB);
}

#[test]
fn a_waiter_that_needs_two_of_the_gateways_models_gets_both_unloaded_at_once() {
    // The case: three idle 3 GiB models held by the gateway on a
    // full 10 GiB card, a 5 GiB job. Two must go; both are asked at once,
    // so the job is granted long before the 30 s eviction deadline that a
    // one-at-a-time choice would sit out.
    let (gpu, d) = card_with(10 * GIB, &["--min-residency", "0s"]);
    let o = FakeOllama::start_with_runners(
        &[
            ModelDef::new(A, GIB, 3 * GIB),
            ModelDef::new(B, GIB, 3 * GIB),
            ModelDef::new(C, GIB, 3 * GIB),
        ],
        gpu.clone(),
    );
    let sizes = "[app.sizes]\n\"alpha\" = \"3GiB\"\n\"beta\" = \"3GiB\"\n\"gamma\" = \"3GiB\"\n";
    let g = Gateway::start(d.socket(), &o.url(), sizes);
    for m in [A, B, C] {
        assert_eq!(generate(g.app, m), 200);
    }
    gpu.set_process(0, 4_000_000, GIB);
    d.wait_status("three idle models attributed on a full card", |s| {
        s.reservations.len() == 3
            && s.reservations
                .iter()
                .all(|r| r.idle && r.actual_bytes == 3 * GIB)
            && s.devices[0].used_bytes == 10 * GIB
    });
    let started = std::time::Instant::now();
    let c = d.client();
    let job = c
        .reserve(
            Request::new(5 * GIB)
                .label("job")
                .timeout(Duration::from_secs(20)),
        )
        .expect("granted once two models are unloaded");
    let waited = started.elapsed();
    eprintln!("the 5 GiB job waited {waited:?} for two unloads");
    assert_eq!(o.unload_requests().len(), 2, "{:?}", o.unload_requests());
    assert_eq!(o.loaded().len(), 1);
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    let s = c.status().unwrap();
    assert_eq!(s.counters.evictions_requested, 2);
    assert_eq!(s.counters.evictions_failed, 0);
    drop(job);
}
