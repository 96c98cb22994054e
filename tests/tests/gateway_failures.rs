//! Failures of `vramd-gateway` stay visible, vramd goes on to its next
//! victim, and a failed app is retried after its backoff (issue 13, items 6
//! and 7). The real daemon on the fake NVML card (24 GiB, an eviction
//! deadline of 1.5 s), two `http` apps of 8 GiB each (tests/src/fake_service.rs,
//! each holding its memory under a process of its own named by a pid file)
//! and the gateway binary. The least recently used app, "tts", is vramd's
//! first victim; its `/unload` fails in one of four ways (or it unloaded
//! itself already: the phantom victim). Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use vramd_client::GIB;
use vramd_harness::ChildGuard;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_service::{FakeService, Unload};
use vramd_tests::gateway_rig::{Gateway, free_port, http};
use vramd_tests::{Daemon, WAIT, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A process that stands for an app, and a pid file naming it.
fn app_process(dir: &std::path::Path, name: &str) -> (ChildGuard, u32, std::path::PathBuf) {
    let mut child = ChildGuard::spawn(
        Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("spawn sleep");
    let pid = child.child_mut().id();
    let file = dir.join(format!("{name}.pid"));
    std::fs::write(&file, format!("{pid}\n")).unwrap();
    (child, pid, file)
}

/// `vramctl reserve SIZE` as its own process; the receiver gets a message
/// once it printed its grant.
fn job(d: &Daemon, size: &str, label: &str) -> (Child, mpsc::Receiver<()>) {
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
            let _ = tx.send(());
        }
    });
    (child, rx)
}

struct Rig {
    gpu: Arc<FakeGpu>,
    d: Daemon,
    g: Gateway,
    tts: FakeService,
    stt: FakeService,
    lt: std::net::SocketAddr,
    ls: std::net::SocketAddr,
    _procs: Vec<ChildGuard>,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Both apps reserved through a request each (the TTS first: it is the
    /// least recently used), idle in vramd.
    fn start() -> Rig {
        let state = tempfile::tempdir().unwrap().keep();
        let gpu = FakeGpu::create(&state.join("state.json"), &[(UUID0, 24 * GIB)]);
        let lib = fake_nvml_lib();
        let d = Daemon::start_env(
            &[
                "--nvml-lib",
                lib.to_str().unwrap(),
                "--poll-interval",
                "50ms",
                "--min-residency",
                "0s",
                "--eviction-deadline",
                "1500ms",
                "--cushion",
                "0B",
            ],
            &[(fake_nvml::STATE_ENV, gpu.path())],
        );
        let dir = tempfile::tempdir().unwrap();
        let (tts_p, tts_pid, tts_pidf) = app_process(dir.path(), "tts");
        let (stt_p, stt_pid, stt_pidf) = app_process(dir.path(), "stt");
        let svc = |pid, prefix| {
            FakeService::start(
                gpu.clone(),
                0,
                pid,
                8 * GIB,
                prefix,
                Duration::from_millis(50),
                Duration::from_millis(10),
            )
        };
        let (tts, stt) = (svc(tts_pid, "/v1/tts"), svc(stt_pid, "/v1/stt"));
        let (lt, ls) = (free_port(), free_port());
        let apps = format!(
            r#"
[[app]]
name = "tts"
kind = "http"
upstream = "{}"
listen = "{lt}"
routes = ["/v1/tts"]
size = "8GiB"
load = {{ path = "/load" }}
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = {tts_pidf:?}
retry_backoff = "1s"

[[app]]
name = "stt"
kind = "http"
upstream = "{}"
listen = "{ls}"
routes = ["/v1/stt"]
size = "8GiB"
load = {{ path = "/load" }}
unload = {{ path = "/unload" }}
health = {{ path = "/health" }}
pid_file = {stt_pidf:?}
"#,
            tts.url(),
            stt.url()
        );
        let g = Gateway::start(d.socket(), "", &apps, &[lt, ls]);
        let rig = Rig {
            gpu,
            d,
            g,
            tts,
            stt,
            lt,
            ls,
            _procs: vec![tts_p, stt_p],
            _dir: dir,
        };
        for (addr, path, label) in [
            (rig.lt, "/v1/tts", "tts/app"),
            (rig.ls, "/v1/stt", "stt/app"),
        ] {
            let r = http(addr, "POST", path, Some(&json!({})), &[]);
            assert_eq!(r.status, 200, "{}", r.text());
            rig.d.wait_status(&format!("{label} idle in vramd"), |s| {
                s.reservations
                    .iter()
                    .any(|r| r.label.as_deref() == Some(label) && r.idle)
            });
        }
        rig
    }

    fn tts_status(&self) -> Value {
        self.g.status()["apps"][0].clone()
    }

    /// The id of the reservation labelled `label`, if one is held.
    fn id(&self, label: &str) -> Option<u64> {
        self.d
            .client()
            .status()
            .unwrap()
            .reservations
            .iter()
            .find(|r| r.label.as_deref() == Some(label))
            .map(|r| r.id.0)
    }

    fn has(&self, label: &str) -> bool {
        self.id(label).is_some()
    }

    /// A granted job loads its memory, as a real one would: it shows on
    /// the card under the job's process.
    fn load(&self, job: &Child, bytes: u64) {
        self.gpu.set_process(0, job.id(), bytes);
    }

    /// Memory in use never went past the card's total.
    fn never_overcommitted(&self) {
        assert!(
            self.gpu.peak_used(0) <= self.gpu.total(0),
            "the card was overcommitted: {} of {}",
            self.gpu.peak_used(0),
            self.gpu.total(0)
        );
    }
}

/// The TTS's unload fails as `how`: the failure shows in `/status` with its
/// time, vramd counts the eviction failed and evicts the STT instead (the
/// job granted only once the STT's memory is gone), the TTS's memory is
/// mirrored again after its 1 s backoff, and the next eviction retries its
/// unload, which now succeeds and clears the error.
fn a_failed_unload(how: Unload, why: &str) {
    let rig = Rig::start();
    let before_ms = now_ms();
    let first = rig.id("tts/app").expect("the TTS holds its reservation");
    rig.tts.set_unload(how);
    let (mut j1, granted1) = job(&rig.d, "12GiB", "job-1");
    assert!(
        granted1.recv_timeout(WAIT).is_ok(),
        "job 1 was never granted; gateway log:\n{}",
        rig.g.log()
    );
    // The next victim was tried: the STT unloaded, the TTS still loaded.
    assert!(!rig.stt.loaded(), "the STT was not unloaded");
    assert_eq!(rig.stt.unloads(), 1);
    assert!(rig.tts.loaded());
    assert!(rig.tts.unloads() >= 1, "the TTS was never asked");
    rig.load(&j1, 12 * GIB);
    rig.never_overcommitted();
    let counters = rig.d.client().status().unwrap().counters;
    assert!(counters.evictions_failed >= 1, "{counters:?}");

    // Visible in /status, with its time.
    let mut a = Value::Null;
    assert!(
        wait_until(WAIT, || {
            a = rig.tts_status();
            a["failures"].as_u64() >= Some(1)
        }),
        "no failure counted: {a:#}"
    );
    let e = &a["last_error"];
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(msg.starts_with("unload:") && msg.contains(why), "{a:#}");
    assert!(e["at_ms"].as_u64().unwrap() >= before_ms, "{a:#}");
    assert!(e["ago_ms"].as_u64().is_some(), "{a:#}");
    assert_eq!(a["http"]["last_error"], e["message"], "{a:#}");
    assert!(a["http"]["failed_unloads"].as_u64() >= Some(1), "{a:#}");
    assert_eq!(
        a["http"]["unloads"], 0,
        "a failed unload counted completed: {a:#}"
    );

    // Retried after the backoff: the TTS's memory is mirrored again, idle.
    assert!(
        wait_until(WAIT, || rig.id("tts/app").is_some_and(|id| id != first)),
        "the TTS was never mirrored again; gateway log:\n{}",
        rig.g.log()
    );
    rig.tts.set_unload(Unload::Frees);
    let asked = rig.tts.unloads();
    let (mut j2, granted2) = job(&rig.d, "8GiB", "job-2");
    assert!(
        granted2.recv_timeout(WAIT).is_ok(),
        "job 2 was never granted; gateway log:\n{}",
        rig.g.log()
    );
    assert_eq!(rig.tts.unloads(), asked + 1, "the unload was not retried");
    assert!(!rig.tts.loaded());
    rig.load(&j2, 8 * GIB);
    rig.never_overcommitted();
    // Kept until that later success, then cleared.
    assert!(
        wait_until(WAIT, || {
            a = rig.tts_status();
            a["last_error"].is_null() && a["http"]["unloads"] == 1
        }),
        "the error was not cleared by the successful unload: {a:#}"
    );
    assert!(a["failures"].as_u64() >= Some(1), "{a:#}");
    assert!(a["next_retry_in_ms"].is_null(), "{a:#}");
    let _ = j1.kill();
    let _ = j2.kill();
    let _ = j1.wait();
    let _ = j2.wait();
}

#[test]
fn an_unload_answering_500_is_visible_the_next_victim_is_tried_and_it_is_retried() {
    a_failed_unload(Unload::Fails, "500");
}

#[test]
fn an_unload_that_hangs_past_the_deadline_is_visible_the_next_victim_is_tried_and_it_is_retried() {
    a_failed_unload(
        Unload::Hangs(Duration::from_secs(4)),
        "no answer by the eviction deadline",
    );
}

#[test]
fn an_unload_accepted_without_freeing_is_visible_the_next_victim_is_tried_and_it_is_retried() {
    a_failed_unload(Unload::KeepsMemory, "not freed by the eviction deadline");
}

/// The phantom victim: the TTS unloaded itself. It is released, never asked
/// to unload (not a completed unload either), and vramd evicts the STT for
/// a job that needs more than the TTS's memory.
#[test]
fn an_app_that_unloaded_itself_is_not_a_victim_and_the_next_one_is_evicted() {
    let rig = Rig::start();
    rig.tts.unload_self();
    assert!(
        wait_until(WAIT, || !rig.has("tts/app")),
        "the TTS's reservation was never released"
    );
    let (mut j, granted) = job(&rig.d, "20GiB", "job");
    assert!(
        granted.recv_timeout(WAIT).is_ok(),
        "the job was never granted; gateway log:\n{}",
        rig.g.log()
    );
    assert_eq!(rig.tts.unloads(), 0, "the phantom victim was asked");
    assert_eq!(rig.stt.unloads(), 1);
    assert!(!rig.stt.loaded());
    rig.load(&j, 20 * GIB);
    rig.never_overcommitted();
    let a = rig.tts_status();
    assert_eq!(a["http"]["self_unloads"], 1, "{a:#}");
    assert_eq!(a["http"]["unloads"], 0, "{a:#}");
    assert_eq!(a["failures"], 0, "{a:#}");
    assert!(a["last_error"].is_null(), "{a:#}");
    let _ = j.kill();
    let _ = j.wait();
}
