//! `kind = "http"` end to end, with ComfyUI on the same card: the broker
//! scenario of issue 13. The real daemon on the fake NVML card (24 GiB), a
//! fake ComfyUI (tests/src/fake_comfyui.rs), fake TTS and speech-to-text
//! services with load/unload/health routes (tests/src/fake_service.rs),
//! each holding its memory under a process of its own (a `sleep` child, so
//! the gateway can attribute it through `pid_file`), and the gateway
//! binary. Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::GIB;
use vramd_harness::ChildGuard;
use vramd_tests::fake_comfyui::FakeComfyUi;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_service::FakeService;
use vramd_tests::gateway_rig::{Gateway, free_port, http};
use vramd_tests::{Daemon, WAIT, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const FLUX: &str = "flux1-dev.safetensors";
const MIB: u64 = 1 << 20;

fn card() -> (Arc<FakeGpu>, Daemon) {
    let dir = tempfile::tempdir().unwrap().keep();
    let gpu = FakeGpu::create(&dir.join("state.json"), &[(UUID0, 24 * GIB)]);
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
    (gpu, d)
}

/// A process that stands for an app (its memory is listed under its pid),
/// and a pid file naming it.
fn app_process(dir: &std::path::Path, name: &str) -> (ChildGuard, u32, std::path::PathBuf) {
    let child = ChildGuard::spawn(
        Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("spawn sleep");
    let mut child = child;
    let pid = child.child_mut().id();
    let file = dir.join(format!("{name}.pid"));
    std::fs::write(&file, format!("{pid}\n")).unwrap();
    (child, pid, file)
}

/// `vramctl reserve SIZE` as its own process; the receiver gets the moment
/// it printed its grant.
fn job(d: &Daemon, size: &str, label: &str) -> (Child, mpsc::Receiver<Instant>) {
    let mut child = d
        .vramctl()
        .args(["reserve", size, "--label", label])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vramctl reserve");
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if BufReader::new(out).read_line(&mut line).is_ok() && line.starts_with("granted") {
            let _ = tx.send(Instant::now());
        }
    });
    (child, rx)
}

/// Whether the reservation labelled `label` speaks for `pid` and that
/// process's memory counts against it (`any_idle`: busy or idle; else busy).
fn attributed(s: &vramd_client::StatusReport, label: &str, pid: u32, any_idle: bool) -> bool {
    let Some(r) = s
        .reservations
        .iter()
        .find(|r| r.label.as_deref() == Some(label))
    else {
        return false;
    };
    (any_idle || !r.idle)
        && r.pids.contains(&pid)
        && s.processes
            .iter()
            .any(|p| p.pid == pid && p.reservation == Some(r.id))
}

fn labels(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = d
        .client()
        .status()
        .unwrap()
        .reservations
        .into_iter()
        .filter_map(|r| r.label)
        .collect();
    v.sort();
    v
}

#[test]
fn the_broker_scenario_evicts_the_idle_comfyui_and_reloads_the_tts_before_its_next_request() {
    let (gpu, d) = card();
    let dir = tempfile::tempdir().unwrap();
    let (_comfy_p, comfy_pid, comfy_pidf) = app_process(dir.path(), "comfy");
    let (_tts_p, tts_pid, tts_pidf) = app_process(dir.path(), "tts");
    let (_stt_p, stt_pid, stt_pidf) = app_process(dir.path(), "whisper");
    let comfy = FakeComfyUi::start(
        gpu.clone(),
        0,
        comfy_pid,
        &[(FLUX, 13 * GIB)],
        Duration::from_millis(300),
    );
    let tts_bytes = 2867 * MIB; // 2.8 GiB
    let tts = FakeService::start(
        gpu.clone(),
        0,
        tts_pid,
        tts_bytes,
        "/v1/tts",
        Duration::from_millis(300),
        Duration::from_millis(20),
    );
    let stt = FakeService::start(
        gpu.clone(),
        0,
        stt_pid,
        1536 * MIB,
        "/v1/stt",
        Duration::from_millis(300),
        Duration::from_millis(20),
    );
    let (lc, lt, ls) = (free_port(), free_port(), free_port());
    let apps = format!(
        r#"
[[app]]
name = "comfy"
kind = "comfyui"
upstream = "{}"
listen = "{lc}"
size = "13GiB"
pid_file = {comfy_pidf:?}

[[app]]
name = "tts"
kind = "http"
upstream = "{}"
listen = "{lt}"
routes = ["/v1/tts"]
size = "2867MiB"
load = {{ path = "/load" }}
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = {tts_pidf:?}

[[app]]
name = "whisper"
kind = "http"
upstream = "{}"
listen = "{ls}"
routes = ["/v1/stt"]
size = "1536MiB"
always_on = true
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = {stt_pidf:?}
"#,
        comfy.url(),
        tts.url(),
        stt.url()
    );
    let g = Gateway::start(d.socket(), "", &apps, &[lc, lt, ls]);

    // whisper is reserved at once (always on), its process attributed.
    d.wait_status("whisper reserved and attributed", |s| {
        attributed(s, "whisper/app", stt_pid, false)
    });
    // A route not under the app's prefixes is not forwarded.
    assert_eq!(
        http(lt, "POST", "/v1/other", Some(&json!({})), &[]).status,
        404
    );

    // ComfyUI renders FLUX once, then sits idle with it loaded.
    let r = http(
        lc,
        "POST",
        "/prompt",
        Some(
            &json!({"prompt": {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FLUX}}}}),
        ),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        wait_until(WAIT, || comfy.executed().len() == 1),
        "never ran"
    );

    // The TTS is used every 700 ms (idle 450 ms between requests, past the 250 ms linger) through the gateway.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, statuses) = mpsc::channel();
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let r = http(lt, "POST", "/v1/tts", Some(&json!({"text": "hi"})), &[]);
                let _ = tx.send((r.status, r.text()));
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };
    d.wait_status("the TTS reserved and attributed", |s| {
        attributed(s, "tts/app", tts_pid, true)
    });
    std::thread::sleep(Duration::from_millis(1500));

    // An 8 GiB job: 13 + 2.8 + 1.5 + 8 > 24. The idle ComfyUI is the victim.
    let (mut a, a_granted) = job(&d, "8GiB", "job-a");
    a_granted
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("job A never granted; log:\n{}", g.log()));
    gpu.set_process(0, a.id(), 8 * GIB);
    assert_eq!(comfy.frees().len(), 1, "ComfyUI was not the victim");
    assert_eq!(comfy.held_bytes(), 0);
    assert_eq!(tts.unloads(), 0, "the TTS in use was unloaded");
    assert_eq!(stt.unloads(), 0);

    // A 13 GiB job: now the TTS must make room (whisper is always on).
    let (mut b, b_granted) = job(&d, "13GiB", "job-b");
    b_granted
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("job B never granted; log:\n{}", g.log()));
    gpu.set_process(0, b.id(), 13 * GIB);
    assert_eq!(tts.unloads(), 1);
    assert!(!tts.loaded());
    // TTS requests wait for room meanwhile (none reaches the unloaded TTS).
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(tts.not_loaded(), 0);
    assert!(!tts.loaded(), "loaded again without room");
    let _ = b.kill();
    let _ = b.wait();
    gpu.set_process(0, b.id(), 0);
    // The next request reloads it through its load route, then is served.
    let served = tts.served();
    assert!(
        wait_until(WAIT, || tts.served() > served + 2),
        "the TTS was never served again; log:\n{}",
        g.log()
    );
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    let log = tts.log();
    let unload_at = log.iter().position(|(_, p)| p == "/unload").unwrap();
    let next_work = unload_at
        + log[unload_at..]
            .iter()
            .position(|(_, p)| p == "/v1/tts")
            .unwrap();
    assert!(
        log[unload_at..next_work].iter().any(|(_, p)| p == "/load"),
        "no /load between the unload and the next request: {log:?}"
    );
    assert_eq!(tts.loads(), 1);
    for (status, body) in statuses.try_iter() {
        assert_eq!(status, 200, "a TTS request failed: {body}");
    }
    // whisper never touched, still served.
    assert_eq!(
        http(ls, "POST", "/v1/stt", Some(&json!({})), &[]).status,
        200
    );
    assert_eq!((stt.unloads(), stt.loads()), (0, 0));
    assert!(labels(&d).contains(&"whisper/app".to_string()));
    // Zero OOM events; the card never oversubscribed.
    assert_eq!((comfy.ooms(), tts.ooms(), stt.ooms()), (0, 0, 0));
    assert!(
        gpu.peak_used(0) <= gpu.total(0),
        "peak {} of {}",
        gpu.peak_used(0),
        gpu.total(0)
    );
    let _ = a.kill();
    let _ = a.wait();
}

/// Two services on a simulated 8 GiB card (their memory on a fake card the
/// daemon does not read), 5 GiB each.
fn two_services(extra_tts: &str) -> (Daemon, Arc<FakeGpu>, FakeService, FakeService, String) {
    let d = Daemon::start_raw(&["--simulate", "8GiB", "--min-residency", "0s"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let gpu = FakeGpu::create(&dir.join("state.json"), &[(UUID0, 80 * GIB)]);
    let svc = |pid, prefix| {
        FakeService::start(
            gpu.clone(),
            0,
            pid,
            5 * GIB,
            prefix,
            Duration::from_millis(50),
            Duration::from_millis(10),
        )
    };
    let (tts, stt) = (svc(4_100_001, "/v1/tts"), svc(4_100_002, "/v1/stt"));
    let apps = |lt: std::net::SocketAddr, ls: std::net::SocketAddr| {
        format!(
            r#"
[[app]]
name = "tts"
kind = "http"
upstream = "{}"
listen = "{lt}"
routes = ["/v1/tts"]
size = "5GiB"
load = {{ path = "/load" }}
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = "/nonexistent/tts.pid"
{extra_tts}

[[app]]
name = "stt"
kind = "http"
upstream = "{}"
listen = "{ls}"
routes = ["/v1/stt"]
size = "5GiB"
wait_limit = "1s"
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = "/nonexistent/stt.pid"
"#,
            tts.url(),
            stt.url()
        )
    };
    let (lt, ls) = (free_port(), free_port());
    let text = apps(lt, ls);
    (d, gpu, tts, stt, format!("{lt} {ls}\n{text}"))
}

fn split(cfg: &str) -> (std::net::SocketAddr, std::net::SocketAddr, &str) {
    let (addrs, apps) = cfg.split_once('\n').unwrap();
    let (a, b) = addrs.split_once(' ').unwrap();
    (a.parse().unwrap(), b.parse().unwrap(), apps)
}

#[test]
fn apps_that_coexist_are_never_evicted_for_each_other() {
    let (d, _gpu, tts, stt, cfg) = two_services("coexists_with = [\"stt\"]");
    let (lt, ls, apps) = split(&cfg);
    let g = Gateway::start(d.socket(), "", apps, &[lt, ls]);
    assert_eq!(
        http(lt, "POST", "/v1/tts", Some(&json!({})), &[]).status,
        200
    );
    // The TTS is idle; the stt needs its room but may not evict it.
    std::thread::sleep(Duration::from_millis(400));
    let r = http(ls, "POST", "/v1/stt", Some(&json!({})), &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(tts.unloads(), 0, "evicted for an app it coexists with");
    assert_eq!(stt.served(), 0);
    // Anyone else may still evict the idle TTS.
    std::thread::sleep(Duration::from_millis(300));
    let (mut j, granted) = job(&d, "5GiB", "job");
    granted
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("the job was never granted; log:\n{}", g.log()));
    assert_eq!(tts.unloads(), 1);
    let _ = j.kill();
    let _ = j.wait();
}

#[test]
fn without_coexists_with_the_idle_app_is_evicted() {
    let (d, _gpu, tts, stt, cfg) = two_services("");
    let (lt, ls, apps) = split(&cfg);
    let _g = Gateway::start(d.socket(), "", apps, &[lt, ls]);
    assert_eq!(
        http(lt, "POST", "/v1/tts", Some(&json!({})), &[]).status,
        200
    );
    std::thread::sleep(Duration::from_millis(400));
    let r = http(ls, "POST", "/v1/stt", Some(&json!({})), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((tts.unloads(), stt.served()), (1, 1));
}

#[test]
fn an_unhealthy_app_is_answered_503_and_its_error_stays_visible_until_healthy() {
    let (d, _gpu, tts, _stt, cfg) = two_services("");
    let (lt, ls, apps) = split(&cfg);
    let g = Gateway::start(d.socket(), "", apps, &[lt, ls]);
    tts.set_healthy(false);
    let mut last = None;
    assert!(
        wait_until(WAIT, || {
            let r = http(lt, "POST", "/v1/tts", Some(&json!({})), &[]);
            let done = r.status == 503;
            last = Some(r);
            done
        }),
        "never 503"
    );
    let r = last.unwrap();
    assert_eq!(r.header("retry-after"), Some("5"));
    let e = r.json()["error"].as_str().unwrap().to_string();
    assert!(e.contains("unhealthy") && e.contains("500"), "{e}");
    let served = tts.served();
    for _ in 0..3 {
        assert_eq!(
            http(lt, "POST", "/v1/tts", Some(&json!({})), &[]).status,
            503
        );
    }
    assert_eq!(tts.served(), served, "forwarded to an unhealthy app");
    let s = g.status();
    let h = &s["apps"][0]["http"];
    assert_eq!(h["healthy"], false);
    assert!(
        h["last_error"].as_str().unwrap().starts_with("health:"),
        "{h}"
    );
    assert!(h["last_error_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    tts.set_healthy(true);
    assert!(
        wait_until(WAIT, || http(lt, "POST", "/v1/tts", Some(&json!({})), &[])
            .status
            == 200),
        "never served again"
    );
    assert_eq!(g.status()["apps"][0]["http"]["last_error"], Value::Null);
}

#[test]
fn an_app_that_unloaded_itself_is_released_not_evicted_and_loaded_again_on_its_next_request() {
    let (gpu, d) = card();
    let dir = tempfile::tempdir().unwrap();
    let (_p, pid, pidf) = app_process(dir.path(), "tts");
    let tts = FakeService::start(
        gpu.clone(),
        0,
        pid,
        2867 * MIB,
        "/v1/tts",
        Duration::from_millis(100),
        Duration::from_millis(10),
    );
    let lt = free_port();
    let apps = format!(
        r#"
[[app]]
name = "tts"
kind = "http"
upstream = "{}"
listen = "{lt}"
routes = ["/v1/tts"]
size = "2867MiB"
load = {{ path = "/load" }}
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = {pidf:?}
"#,
        tts.url()
    );
    let g = Gateway::start(d.socket(), "", &apps, &[lt]);
    assert_eq!(
        http(lt, "POST", "/v1/tts", Some(&json!({})), &[]).status,
        200
    );
    d.wait_status("the TTS reserved and attributed", |s| {
        attributed(s, "tts/app", pid, true)
    });
    // Its own idle timeout: it frees its memory by itself.
    tts.unload_self();
    d.wait_status("the reservation of the unloaded TTS released", |s| {
        !s.reservations
            .iter()
            .any(|r| r.label.as_deref() == Some("tts/app"))
    });
    let h = &g.status()["apps"][0]["http"];
    assert_eq!(h["self_unloads"], 1, "{h}");
    assert_eq!(h["needs_load"], true, "{h}");
    // Never asked to unload; the next request loads it first.
    let r = http(lt, "POST", "/v1/tts", Some(&json!({})), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((tts.unloads(), tts.loads(), tts.not_loaded()), (0, 1, 0));
    assert!(tts.loaded());
}

#[test]
fn http_apps_sharing_a_listen_are_routed_by_their_prefixes() {
    let d = Daemon::start_raw(&["--simulate", "24GiB"]);
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("s.json"), &[(UUID0, 80 * GIB)]);
    let svc = |pid, prefix| {
        FakeService::start(
            gpu.clone(),
            0,
            pid,
            GIB,
            prefix,
            Duration::from_millis(10),
            Duration::from_millis(10),
        )
    };
    let (tts, stt) = (svc(4_200_001, "/v1/tts"), svc(4_200_002, "/v1/stt"));
    let l = free_port();
    let app = |name: &str, url: &str, route: &str| {
        format!(
            "[[app]]\nname = \"{name}\"\nkind = \"http\"\nupstream = \"{url}\"\nlisten = \"{l}\"\nroutes = [\"{route}\"]\nsize = \"1GiB\"\npid_file = \"/nonexistent\"\n\n"
        )
    };
    let apps = app("tts", &tts.url(), "/v1/tts") + &app("stt", &stt.url(), "/v1/stt");
    let _g = Gateway::start(d.socket(), "", &apps, &[l]);
    assert_eq!(
        http(l, "POST", "/v1/tts", Some(&json!({})), &[]).status,
        200
    );
    assert_eq!(
        http(l, "POST", "/v1/stt/x", Some(&json!({})), &[]).status,
        200
    );
    assert_eq!((tts.served(), stt.served()), (1, 1));
    let r = http(l, "POST", "/v1/llm", Some(&json!({})), &[]);
    assert_eq!(r.status, 404);
    let e = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("/v1/tts (tts)") && e.contains("/v1/stt (stt)"),
        "{e}"
    );
    let mut l = labels(&d);
    l.sort();
    assert_eq!(l, ["stt/app", "tts/app"]);
}

#[test]
fn restore_loads_an_evicted_http_app_again_when_the_room_comes_back_with_nobody_waiting() {
    let (gpu, d) = card();
    let dir = tempfile::tempdir().unwrap();
    let (_p, pid, pidf) = app_process(dir.path(), "tts");
    let tts = FakeService::start(
        gpu.clone(),
        0,
        pid,
        10 * GIB,
        "/v1/tts",
        Duration::from_millis(200),
        Duration::from_millis(10),
    );
    let lt = free_port();
    let apps = format!(
        r#"
[[app]]
name = "tts"
kind = "http"
upstream = "{}"
listen = "{lt}"
routes = ["/v1/tts"]
size = "10GiB"
load = {{ path = "/load" }}
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = {pidf:?}
restore = true
"#,
        tts.url()
    );
    let g = Gateway::start(d.socket(), "", &apps, &[lt]);
    assert_eq!(
        http(lt, "POST", "/v1/tts", Some(&json!({})), &[]).status,
        200
    );
    std::thread::sleep(Duration::from_millis(400));
    // A 20 GiB job needs the idle TTS's room.
    let (mut j, granted) = job(&d, "20GiB", "job");
    granted
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("the job was never granted; log:\n{}", g.log()));
    gpu.set_process(0, j.id(), 20 * GIB);
    assert_eq!(tts.unloads(), 1);
    // Not loaded again while the job holds the room.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(tts.loads(), 0);
    let _ = j.kill();
    let _ = j.wait();
    gpu.set_process(0, j.id(), 0);
    // Nobody waiting: loaded again through its load route, with no request.
    assert!(
        wait_until(WAIT, || tts.loaded()
            && labels(&d).contains(&"tts/app".to_string())),
        "never restored; log:\n{}",
        g.log()
    );
    assert!(
        wait_until(WAIT, || g.status()["apps"][0]["http"]["restores"] == 1),
        "the restore was not counted"
    );
    assert_eq!(tts.loads(), 1);
    assert_eq!(tts.ooms(), 0);
    assert!(gpu.peak_used(0) <= gpu.total(0));
}
