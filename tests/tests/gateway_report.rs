//! The gateway reports its apps to vramd (`report_consumers`): the daemon,
//! which calls no app itself, lists them in its status and `vramctl status`
//! — an app whose unload fails shows its error and how long ago — and
//! drops them when the gateway's connection closes. The real daemon on a
//! simulated card, a fake HTTP model service (tests/src/fake_service.rs)
//! whose unload route does not exist (`404`), and the gateway binary.
//! Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};
use vramd_client::GIB;
use vramd_tests::Daemon;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::fake_service::FakeService;
use vramd_tests::gateway_rig::{Gateway, free_port, http};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";

/// `vramctl reserve SIZE` as its own process; the receiver hears when it
/// printed its grant.
fn job(d: &Daemon, size: &str) -> (Child, mpsc::Receiver<()>) {
    let mut child = d
        .vramctl()
        .args(["reserve", size, "--label", "job", "--priority", "5"])
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

fn vramctl_status(d: &Daemon, json: bool) -> String {
    let mut c = d.vramctl();
    c.arg("status");
    if json {
        c.arg("--json");
    }
    let out = c.output().expect("run vramctl status");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn an_app_whose_unload_fails_shows_in_vramctl_status_with_its_error_and_time_until_the_gateway_goes()
 {
    let d = Daemon::start_raw(&[
        "--simulate",
        "8GiB",
        "--min-residency",
        "0s",
        "--eviction-deadline",
        "1s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("state.json"), &[(UUID0, 80 * GIB)]);
    let tts = FakeService::start(
        gpu,
        0,
        4_200_001,
        5 * GIB,
        "/v1/tts",
        Duration::from_millis(10),
        Duration::from_millis(10),
    );
    let listen = free_port();
    let apps = format!(
        r#"
[[app]]
name = "tts"
kind = "http"
upstream = "{}"
listen = "{listen}"
routes = ["/v1/tts"]
size = "5GiB"
priority = 2
unload = {{ path = "/broken-unload" }}
health = {{ path = "/health" }}
pid_file = "/nonexistent/tts.pid"
"#,
        tts.url()
    );
    let before_ms = now_ms();
    let g = Gateway::start(d.socket(), "", &apps, &[listen]);

    // Listed as soon as the gateway polled, holding nothing yet.
    let s = d.wait_status("the gateway's app listed", |s| {
        s.consumers.iter().any(|c| c.name == "tts")
    });
    let c = &s.consumers[0];
    assert_eq!(
        (c.kind.as_str(), c.priority, c.resident_bytes),
        ("http", 2, 0)
    );
    assert!(
        c.last_error.is_none() && s.consumer_errors.is_empty(),
        "{s:#?}"
    );

    // A request reserves the app: the report follows.
    let r = http(listen, "POST", "/v1/tts", Some(&json!({})), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let s = d.wait_status("the app's reservation reported", |s| {
        s.consumers
            .iter()
            .any(|c| c.name == "tts" && c.resident_bytes == 5 * GIB && c.reachable)
    });
    assert_eq!(s.consumers[0].device, Some(0));
    assert!(!s.consumers[0].models.is_empty(), "{s:#?}");

    // A job needs its room: vramd evicts it, its unload answers 404.
    std::thread::sleep(Duration::from_millis(400));
    let (mut j, _granted) = job(&d, "5GiB");
    let s = d.wait_status("the failed unload reported", |s| {
        s.consumers.iter().any(|c| {
            c.name == "tts"
                && c.last_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("unload:"))
                && c.last_eviction_ms.is_some()
        })
    });
    let e = &s.consumer_errors;
    assert_eq!(e.len(), 1, "{s:#?}");
    assert_eq!(e[0].name, "tts");
    assert!(e[0].message.contains("404"), "{s:#?}");
    let at = e[0].at_ms.expect("its time");
    assert!(at >= before_ms && at <= now_ms(), "{at} {before_ms}");

    // vramctl status: the app, then its error and how long ago.
    let text = vramctl_status(&d, false);
    assert!(text.contains("CONSUMER"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("tts failed "))
        .unwrap_or_else(|| panic!("no error line:\n{text}"));
    assert!(line.contains("s ago: unload:"), "{line}");
    assert!(line.contains("404"), "{line}");
    // --json prints the same report.
    let v: Value = serde_json::from_str(&vramctl_status(&d, true)).unwrap();
    assert_eq!(v["consumers"][0]["name"], "tts");
    assert_eq!(v["consumer_errors"][0]["name"], "tts");
    assert!(v["consumer_errors"][0]["at_ms"].as_u64().unwrap() >= before_ms);

    // The gateway goes: its apps go with its connection.
    let _ = j.kill();
    let _ = j.wait();
    drop(g);
    d.wait_status("the apps gone with the gateway", |s| {
        s.consumers.is_empty() && s.consumer_errors.is_empty()
    });
    assert!(
        !vramctl_status(&d, false).contains("CONSUMER"),
        "still listed"
    );
}
