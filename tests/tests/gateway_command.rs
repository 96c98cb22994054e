//! `kind = "command"` end to end: the real daemon on the fake NVML card
//! (24 GiB), an app standing in as a `sleep` process whose 10 GiB the fake
//! card lists under its pid, and `unload`/`load` shell scripts the test
//! writes. The scripts remove or create a marker file; a test thread
//! watching it frees or takes the app's memory on the card (what the real
//! app would do). Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vramd_client::GIB;
use vramd_harness::ChildGuard;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::gateway_rig::Gateway;
use vramd_tests::{Daemon, WAIT, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const APP_BYTES: u64 = 10 * GIB;

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

/// The app: a `sleep` process holding [`APP_BYTES`] on the card, its pid
/// file, and its "loaded" marker; a thread mirrors the marker onto the
/// card (gone: the pid's memory freed; there: taken) until `stop`.
struct App {
    _proc: ChildGuard,
    pid_file: PathBuf,
    marker: PathBuf,
    runs: PathBuf,
    stop: Arc<AtomicBool>,
    /// When the app's memory was last freed on the card.
    freed: mpsc::Receiver<Instant>,
}

impl App {
    fn start(gpu: &Arc<FakeGpu>, dir: &Path) -> App {
        let mut p = ChildGuard::spawn(
            Command::new("sleep")
                .arg("600")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("spawn sleep");
        let pid = p.child_mut().id();
        let pid_file = dir.join("app.pid");
        std::fs::write(&pid_file, format!("{pid}\n")).unwrap();
        let marker = dir.join("loaded");
        std::fs::write(&marker, "").unwrap();
        gpu.set_process(0, pid, APP_BYTES);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, freed) = mpsc::channel();
        {
            let (gpu, marker, stop) = (gpu.clone(), marker.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = true;
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                    let now = marker.exists();
                    if now != held {
                        // What a real app takes: a moment to free or load.
                        std::thread::sleep(Duration::from_millis(200));
                        gpu.set_process(0, pid, if now { APP_BYTES } else { 0 });
                        if !now {
                            let _ = tx.send(Instant::now());
                        }
                        held = now;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        App {
            _proc: p,
            runs: dir.join("runs"),
            pid_file,
            marker,
            stop,
            freed,
        }
    }

    /// The lines the scripts appended to the runs file.
    fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(&self.runs)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// An `[[app]]` of kind `command` with these script bodies.
    fn config(&self, unload: &str, load: &str, extra: &str) -> String {
        format!(
            r#"
[[app]]
name = "cmd"
kind = "command"
size = "10GiB"
pid_file = {pid:?}
unload = {unload:?}
load = {load:?}
unload_timeout = "5s"
{extra}
"#,
            pid = self.pid_file,
        )
    }

    fn unload_script(&self) -> String {
        format!(
            "echo unload >> {runs:?}; rm -f {marker:?}; echo freed",
            runs = self.runs,
            marker = self.marker
        )
    }

    fn load_script(&self) -> String {
        format!(
            "echo load >> {runs:?}; touch {marker:?}",
            runs = self.runs,
            marker = self.marker
        )
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
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

fn has_label(d: &Daemon, label: &str) -> bool {
    d.client()
        .status()
        .unwrap()
        .reservations
        .iter()
        .any(|r| r.label.as_deref() == Some(label))
}

fn command_status(g: &Gateway) -> Value {
    g.status()["apps"][0]["command"].clone()
}

#[test]
fn a_job_needing_the_room_runs_unload_is_granted_after_the_memory_is_gone_and_restore_loads_it_again()
 {
    let (gpu, d) = card();
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&gpu, dir.path());
    let g = Gateway::start(
        d.socket(),
        "",
        &app.config(&app.unload_script(), &app.load_script(), "restore = true"),
        &[],
    );
    assert!(
        wait_until(WAIT, || has_label(&d, "cmd/app")),
        "the app was never mirrored; log:\n{}",
        g.log()
    );

    // 14 GiB free: a 20 GiB job needs the app's room.
    let (mut j, granted) = job(&d, "20GiB", "job");
    let granted_at = granted
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("the job was never granted; log:\n{}", g.log()));
    gpu.set_process(0, j.id(), 20 * GIB);
    let freed_at = app
        .freed
        .recv_timeout(Duration::from_secs(1))
        .expect("the app's memory was never freed");
    assert!(freed_at <= granted_at, "granted before the memory was gone");
    assert_eq!(app.runs(), vec!["unload".to_string()]);
    let s = command_status(&g);
    assert_eq!(s["unloads"], 1, "{s}");
    assert_eq!(s["failed_unloads"], 0, "{s}");
    assert!(s["last_error"].is_null(), "{s}");
    assert!(
        g.log().contains("freed"),
        "the command's output is not in the log"
    );

    // Not loaded again while the job holds the room.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(app.runs(), vec!["unload".to_string()]);
    assert!(!has_label(&d, "cmd/app"));

    // The job ends with nobody waiting: restore loads it and reserves again.
    let _ = j.kill();
    let _ = j.wait();
    gpu.set_process(0, j.id(), 0);
    assert!(
        wait_until(WAIT, || has_label(&d, "cmd/app") && app.marker.exists()),
        "the app was never restored; log:\n{}",
        g.log()
    );
    assert_eq!(app.runs(), vec!["unload".to_string(), "load".to_string()]);
    assert_eq!(command_status(&g)["loads"], 1);
    assert!(
        gpu.peak_used(0) <= gpu.total(0),
        "peak {} of {}",
        gpu.peak_used(0),
        gpu.total(0)
    );
}

#[test]
fn an_unload_that_exits_non_zero_is_shown_with_its_time_and_counted_failed() {
    let (gpu, d) = card();
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&gpu, dir.path());
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let g = Gateway::start(
        d.socket(),
        "",
        &app.config("echo no-can-do >&2; exit 3", &app.load_script(), ""),
        &[],
    );
    assert!(
        wait_until(WAIT, || has_label(&d, "cmd/app")),
        "the app was never mirrored; log:\n{}",
        g.log()
    );
    let (mut j, granted) = job(&d, "20GiB", "job");
    let mut s = Value::Null;
    assert!(
        wait_until(WAIT, || {
            s = command_status(&g);
            s["failed_unloads"] == 1
        }),
        "the failed unload was not counted: {s}; log:\n{}",
        g.log()
    );
    assert_eq!(s["unloads"], 0, "{s}");
    let err = s["last_error"].as_str().unwrap_or_default();
    assert!(
        err.starts_with("unload:") && err.contains("3") && err.contains("no-can-do"),
        "{s}"
    );
    assert!(s["last_error_at_ms"].as_u64().unwrap() >= before_ms, "{s}");
    // The memory was never freed: the job is not granted (no OOM).
    assert!(granted.recv_timeout(Duration::from_millis(700)).is_err());
    assert!(app.marker.exists());
    assert!(gpu.peak_used(0) <= gpu.total(0));
    let _ = j.kill();
    let _ = j.wait();
}

#[test]
fn restore_waits_while_someone_waits_in_vramds_queue() {
    let (gpu, d) = card();
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(&gpu, dir.path());
    let g = Gateway::start(
        d.socket(),
        "",
        &app.config(&app.unload_script(), &app.load_script(), "restore = true"),
        &[],
    );
    assert!(
        wait_until(WAIT, || has_label(&d, "cmd/app")),
        "the app was never mirrored; log:\n{}",
        g.log()
    );
    // A takes the 14 GiB left; B (10 GiB) evicts the app; C (12 GiB) waits.
    let (mut a, a_granted) = job(&d, "14GiB", "job-a");
    a_granted.recv_timeout(WAIT).expect("job A never granted");
    gpu.set_process(0, a.id(), 14 * GIB);
    let (mut b, b_granted) = job(&d, "10GiB", "job-b");
    b_granted
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("job B never granted; log:\n{}", g.log()));
    gpu.set_process(0, b.id(), 10 * GIB);
    let (mut c, c_granted) = job(&d, "12GiB", "job-c");
    std::thread::sleep(Duration::from_millis(300));
    // B ends: the app's 10 GiB are free again, but C waits in vramd's queue.
    let _ = b.kill();
    let _ = b.wait();
    gpu.set_process(0, b.id(), 0);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        app.runs(),
        vec!["unload".to_string()],
        "restored while C waits; log:\n{}",
        g.log()
    );
    assert!(!has_label(&d, "cmd/app"));
    // A ends: C is granted, nobody waits, the app comes back.
    let _ = a.kill();
    let _ = a.wait();
    gpu.set_process(0, a.id(), 0);
    c_granted.recv_timeout(WAIT).expect("job C never granted");
    gpu.set_process(0, c.id(), 12 * GIB);
    assert!(
        wait_until(WAIT, || has_label(&d, "cmd/app") && app.marker.exists()),
        "the app was never restored; log:\n{}",
        g.log()
    );
    assert!(gpu.peak_used(0) <= gpu.total(0));
    let _ = c.kill();
    let _ = c.wait();
}
