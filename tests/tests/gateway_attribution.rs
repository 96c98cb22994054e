//! The gateway's attribution of model memory on the fake libnvidia-ml: the
//! fake Ollama in runner mode (one real child process per loaded model,
//! holding the model's memory on the fake card), the real daemon with
//! `--nvml-lib`, and the gateway binary. Every wait is bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use vramd_client::{Error, GIB, Request, StatusReport};
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_ollama::{FakeOllama, ModelDef};
use vramd_tests::gateway_rig::{Gateway, free_port, http};
use vramd_tests::{Daemon, WAIT, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const A: &str = "alpha:latest";
const B: &str = "beta:latest";
const C: &str = "gamma:latest";

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

/// The rig's gateway fronting one Ollama app named `ollama`, and that
/// app's address.
struct Fronted {
    gw: Gateway,
    app: SocketAddr,
}

impl std::ops::Deref for Fronted {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

fn start_gateway(socket: &Path, upstream: &str, extra: &str) -> Fronted {
    let app = free_port();
    let gw = Gateway::start(
        socket,
        "",
        &format!(
            "[[app]]\nname = \"ollama\"\nkind = \"ollama\"\nupstream = \"{upstream}\"\n\
             listen = \"{app}\"\npriority = 0\n{extra}\n"
        ),
        &[app],
    );
    Fronted { gw, app }
}

fn generate(addr: SocketAddr, model: &str) -> u16 {
    let body = json!({"model": model, "prompt": "x", "stream": false});
    http(addr, "POST", "/api/generate", Some(&body), &[]).status
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
    let g = start_gateway(
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
    let g = start_gateway(d.socket(), &o.url(), sizes);
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
    let g = start_gateway(d.socket(), &o.url(), sizes);
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
    let g = start_gateway(d.socket(), &o.url(), "[app.sizes]\n\"alpha\" = \"2GiB\"\n");
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
    let g = start_gateway(d.socket(), &o.url(), "[app.sizes]\n\"alpha\" = \"2GiB\"\n");
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
    let g = start_gateway(d.socket(), &o.url(), sizes);
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
