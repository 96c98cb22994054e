//! `kind = "comfyui"` end to end: the real daemon on the fake NVML card, a
//! fake ComfyUI that follows the real server (tests/src/fake_comfyui.rs:
//! one prompt worker, `/free` only sets flags it acts on after the running
//! prompt), and the gateway binary. Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::GIB;
use vramd_tests::fake_comfyui::FakeComfyUi;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::gateway_rig::{Gateway, free_port, http};
use vramd_tests::{Daemon, WAIT, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const FLUX: &str = "flux1-dev.safetensors";

/// A 24 GiB fake card and a daemon reading it every 50 ms.
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
        ],
        &[(fake_nvml::STATE_ENV, gpu.path())],
    );
    (gpu, d)
}

fn comfy_app(listen: std::net::SocketAddr, upstream: &str, extra: &str) -> String {
    format!(
        "[[app]]\nname = \"comfy\"\nkind = \"comfyui\"\nupstream = \"{upstream}\"\nlisten = \"{listen}\"\n{extra}\n"
    )
}

fn prompt(ckpt: &str, seed: u64) -> Value {
    json!({
        "client_id": "test",
        "prompt": {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "3": {"class_type": "KSampler", "inputs": {"seed": seed, "model": ["4", 0]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
        }
    })
}

/// `vramctl reserve SIZE` as its own process (so its memory is its own
/// pid's); the receiver gets the moment it printed its grant.
fn image_job(d: &Daemon, size: &str) -> (Child, mpsc::Receiver<Instant>) {
    let mut child = d
        .vramctl()
        .args(["reserve", size, "--label", "image-job"])
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

#[test]
fn the_fake_comfyui_acts_on_free_only_between_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("s.json"), &[(UUID0, 24 * GIB)]);
    let c = FakeComfyUi::start(
        gpu.clone(),
        0,
        4_000_001,
        &[(FLUX, 13 * GIB)],
        Duration::from_millis(600),
    );
    let r = http(c.addr(), "POST", "/prompt", Some(&prompt(FLUX, 1)), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["number"], 0);
    assert!(v["prompt_id"].as_str().unwrap().len() == 36, "{v}");
    assert_eq!(v["node_errors"], json!({}));
    assert!(wait_until(WAIT, || c.queue().0), "the prompt never ran");
    let r = http(c.addr(), "POST", "/prompt", Some(&prompt(FLUX, 2)), &[]);
    assert_eq!(r.json()["number"], 1);
    let q = http(c.addr(), "GET", "/queue", None, &[]).json();
    assert_eq!(q["queue_running"].as_array().unwrap().len(), 1);
    assert_eq!(q["queue_pending"].as_array().unwrap().len(), 1);
    assert_eq!(q["queue_running"][0][1], v["prompt_id"]);
    assert_eq!(gpu.process_bytes(0, 4_000_001), 13 * GIB);
    // /free with a prompt pending: the worker frees after the running one,
    // then the pending one loads the model again.
    let r = http(
        c.addr(),
        "POST",
        "/free",
        Some(&json!({"unload_models": true, "free_memory": true})),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(gpu.process_bytes(0, 4_000_001), 13 * GIB, "only flags set");
    assert!(
        wait_until(WAIT, || c.executed().len() == 2 && !c.queue().0),
        "the prompts never ended"
    );
    assert_eq!(c.loads(), 2, "the queued prompt reloaded the model");
    assert_eq!(gpu.process_bytes(0, 4_000_001), 13 * GIB);
    let h = http(
        c.addr(),
        "GET",
        &format!("/history/{}", v["prompt_id"].as_str().unwrap()),
        None,
        &[],
    )
    .json();
    assert_eq!(
        h[v["prompt_id"].as_str().unwrap()]["status"]["status_str"],
        "success"
    );
    // Idle: /free acts at once.
    http(
        c.addr(),
        "POST",
        "/api/free",
        Some(&json!({"unload_models": true})),
        &[],
    );
    assert!(
        wait_until(WAIT, || gpu.process_bytes(0, 4_000_001) == 0),
        "an idle /free never freed"
    );
    let s = http(c.addr(), "GET", "/system_stats", None, &[]).json();
    assert_eq!(s["devices"][0]["vram_total"], 24 * GIB);
    assert_eq!(s["devices"][0]["torch_vram_total"], 0);
    // An unknown checkpoint fails validation.
    let r = http(
        c.addr(),
        "POST",
        "/prompt",
        Some(&prompt("nope.safetensors", 3)),
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["type"],
        "prompt_outputs_failed_validation"
    );
    assert_eq!(c.ooms(), 0);
}

#[test]
fn a_busy_comfyui_is_not_evicted_until_its_queue_is_empty() {
    let (gpu, d) = card();
    let comfy = FakeComfyUi::start(
        gpu.clone(),
        0,
        std::process::id(),
        &[(FLUX, 13 * GIB)],
        Duration::from_millis(1500),
    );
    let listen = free_port();
    let g = Gateway::start(
        d.socket(),
        "",
        &comfy_app(listen, &comfy.url(), "size = \"13GiB\""),
        &[listen],
    );

    // A running prompt, and one queued behind it.
    let r = http(listen, "POST", "/prompt", Some(&prompt(FLUX, 1)), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["prompt_id"].is_string());
    assert!(wait_until(WAIT, || comfy.queue().0), "never ran");
    let r = http(listen, "POST", "/api/prompt", Some(&prompt(FLUX, 2)), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    // ComfyUI's process is attributed to the reservation: its 13 GiB count
    // once, against it.
    d.wait_status("ComfyUI's memory counted against its reservation", |s| {
        s.reservations.iter().any(|r| {
            r.label.as_deref() == Some("comfy/models")
                && r.bytes == 13 * GIB
                && r.actual_bytes == 13 * GIB
                && r.pids.contains(&std::process::id())
        })
    });

    // Busy in vramd while ComfyUI's queue has prompts, though the POSTs
    // were answered long ago (past the gateway's 250 ms idle linger).
    std::thread::sleep(Duration::from_millis(400));
    let comfy_res = |s: &vramd_client::StatusReport| {
        s.reservations
            .iter()
            .find(|r| r.label.as_deref() == Some("comfy/models"))
            .map(|r| r.idle)
    };
    assert_eq!(
        comfy_res(&d.client().status().unwrap()),
        Some(false),
        "idle in vramd while ComfyUI's queue is busy"
    );

    // The image job waits; 13 + 12 > 24.
    let (mut job, granted) = image_job(&d, "12GiB");
    let grant = granted
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("the image job was never granted; log:\n{}", g.log()));
    let (running, pending) = comfy.queue();
    assert!(
        comfy.executed().len() == 2 && !running && pending == 0,
        "granted while ComfyUI's queue was busy ({running}, {pending})"
    );
    assert_eq!(comfy.held_bytes(), 0, "granted before ComfyUI freed");
    // The image job allocates what it was granted.
    gpu.set_process(0, job.id(), 12 * GIB);
    let frees = comfy.frees();
    assert!(!frees.is_empty(), "ComfyUI was never asked to free");
    for f in &frees {
        assert!(
            !f.running && f.pending == 0,
            "/free came while the queue was busy: {f:?}"
        );
        assert_eq!((f.unload_models, f.free_memory), (Some(true), Some(true)));
        assert!(f.at < grant);
    }
    assert_eq!(comfy.loads(), 1, "the model was loaded once");

    // A prompt now waits for the room (the image job holds it), then runs.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = http(listen, "POST", "/prompt", Some(&prompt(FLUX, 3)), &[]);
        let _ = tx.send((r.status, Instant::now()));
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.try_recv().is_err(),
        "a prompt was forwarded without room"
    );
    assert_eq!(comfy.executed().len(), 2);
    let _ = job.kill();
    let _ = job.wait();
    gpu.set_process(0, job.id(), 0);
    let (status, _) = rx
        .recv_timeout(WAIT)
        .expect("the prompt never went through");
    assert_eq!(status, 200);
    assert!(
        wait_until(WAIT, || comfy.executed().len() == 3),
        "never ran"
    );

    assert_eq!(comfy.ooms(), 0, "ComfyUI ran out of memory");
    assert!(
        gpu.peak_used(0) <= gpu.total(0),
        "the card was oversubscribed: peak {} of {}",
        gpu.peak_used(0),
        gpu.total(0)
    );
    // The measured size is kept.
    let state = std::fs::read_to_string(g.state_file()).unwrap_or_default();
    assert!(state.contains("comfy/models"), "{state}");
    let s = g.status();
    assert_eq!(s["apps"][0]["kind"], "comfyui");
    assert_eq!(
        s["apps"][0]["attributed"]["pids"],
        json!([std::process::id()])
    );
    assert!(
        wait_until(WAIT, || g.status()["apps"][0]["comfyui"]["busy"] == false),
        "still busy with an empty queue"
    );
}

#[test]
fn comfyuis_websocket_is_forwarded_both_ways() {
    use std::io::{Read, Write};
    let d = Daemon::start_raw(&["--simulate", "24GiB"]);
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("s.json"), &[(UUID0, 24 * GIB)]);
    let comfy = FakeComfyUi::start(
        gpu,
        0,
        4_000_002,
        &[(FLUX, 13 * GIB)],
        Duration::from_millis(100),
    );
    let listen = free_port();
    let _g = Gateway::start(
        d.socket(),
        "",
        &comfy_app(listen, &comfy.url(), "size = \"13GiB\""),
        &[listen],
    );
    let mut s = std::net::TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(
        b"GET /ws?clientId=abc HTTP/1.1\r\nHost: comfy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status:?}");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h == "\r\n" {
            break;
        }
    }
    // ComfyUI's first message, through the gateway.
    let mut head = [0u8; 2];
    r.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x81, "a text frame");
    let len = match head[1] {
        126 => {
            let mut l = [0u8; 2];
            r.read_exact(&mut l).unwrap();
            usize::from(u16::from_be_bytes(l))
        }
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).unwrap();
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["type"], "status");
    assert_eq!(v["data"]["sid"], "abc");
    // A client message, masked, reaches ComfyUI.
    let msg = br#"{"type":"feature_flags","data":{}}"#;
    let mask = [7u8, 1, 2, 3];
    let mut frame = vec![0x81, 0x80 | msg.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(msg.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
    assert!(
        wait_until(WAIT, || comfy.ws_messages()
            == [String::from_utf8_lossy(msg).into_owned()]),
        "got {:?}",
        comfy.ws_messages()
    );
}

#[test]
fn a_comfyui_that_does_not_answer_shows_its_error_and_time_in_status() {
    let d = Daemon::start_raw(&["--simulate", "24GiB"]);
    let (listen, nobody) = (free_port(), free_port());
    let g = Gateway::start(
        d.socket(),
        "",
        &comfy_app(listen, &format!("http://{nobody}"), "size = \"13GiB\""),
        &[listen],
    );
    let mut last = Value::Null;
    assert!(
        wait_until(WAIT, || {
            last = g.status()["apps"][0].clone();
            last["comfyui"]["last_error"].is_string()
        }),
        "no error shown: {last}"
    );
    let e = last["comfyui"]["last_error"].as_str().unwrap();
    assert!(e.starts_with("queue:"), "{e}");
    assert!(last["comfyui"]["last_error_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(last["upstream_up"], false);
    // A prompt is answered 502 naming the upstream (after its reservation).
    let r = http(listen, "POST", "/prompt", Some(&prompt(FLUX, 1)), &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains(&nobody.to_string()), "{}", r.text());
    // Nothing was queued: the reservation is not held busy for it.
    d.wait_status("the reservation idle (evictable)", |s| {
        s.reservations
            .iter()
            .any(|r| r.label.as_deref() == Some("comfy/models") && r.idle)
    });
}
