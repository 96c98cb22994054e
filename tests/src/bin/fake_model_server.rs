//! `fake-model-server`: a stand-in for llama.cpp's `llama-server` (an
//! OpenAI-compatible server serving one model), for `kind = "managed"`
//! tests. It is a real process, so the gateway starts, attributes and stops
//! it as it would the real server.
//!
//! `fake-model-server --port PORT --model NAME --size BYTES
//! [--load-delay-ms MS] [--exit-after-ms MS --exit-code N] [--device I]`,
//! with `FAKE_NVML_STATE` naming the fake NVML card's state file. After the
//! load delay it lists its own pid holding `BYTES` on device `I` of the card
//! (the state file is edited under an exclusive `flock` of `<state>.lock`,
//! so several servers never lose each other's writes). It serves
//! `GET /health` (`503` while loading, `200` after, as llama-server does),
//! `GET /v1/models`, and `POST /v1/chat/completions` (one JSON object, or
//! server-sent events ending with `data: [DONE]` when `"stream": true`).
//! On SIGTERM or SIGINT (or `--exit-after-ms`, exiting with `--exit-code`)
//! it removes its memory from the card and exits; it never runs longer than
//! five minutes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fake_nvml::{FakeProcess, State};
use serde_json::{Value, json};

static STOP: AtomicBool = AtomicBool::new(false);
static LOADED: AtomicBool = AtomicBool::new(false);
/// Longest it ever runs.
const LIFETIME: Duration = Duration::from_secs(300);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    port: u16,
    model: String,
    size_bytes: u64,
    load_delay: Duration,
    exit_after: Option<Duration>,
    exit_code: i32,
    device: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        port: 0,
        model: String::new(),
        size_bytes: 0,
        load_delay: Duration::ZERO,
        exit_after: None,
        exit_code: 0,
        device: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{k} {v}: {e}"));
        match k.as_str() {
            "--port" => a.port = num(&v)? as u16,
            "--model" => a.model = v,
            "--size" => {
                a.size_bytes = vramd_protocol::parse_size(&v).map_err(|e| format!("--size: {e}"))?
            }
            "--load-delay-ms" => a.load_delay = Duration::from_millis(num(&v)?),
            "--exit-after-ms" => a.exit_after = Some(Duration::from_millis(num(&v)?)),
            "--exit-code" => a.exit_code = num(&v)? as i32,
            "--device" => a.device = num(&v)? as usize,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.port == 0 || a.model.is_empty() {
        return Err("--port and --model are required".into());
    }
    Ok(a)
}

/// Sets this process's usage on the card under the state file's lock.
fn set_usage(state: &Path, device: usize, bytes: u64) {
    let lock_path = PathBuf::from(format!("{}.lock", state.display()));
    let Ok(lock) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
    else {
        eprintln!("fake-model-server: cannot open {}", lock_path.display());
        return;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&lock);
    // SAFETY: fd is an open file descriptor owned by `lock`.
    unsafe { libc::flock(fd, libc::LOCK_EX) };
    let pid = std::process::id();
    match State::read(state) {
        Ok(mut s) => {
            if let Some(d) = s.devices.get_mut(device) {
                d.processes.retain(|p| p.pid != pid);
                if bytes > 0 {
                    d.processes.push(FakeProcess::new(pid, bytes));
                }
                if let Err(e) = s.write_atomic(state) {
                    eprintln!("fake-model-server: write {}: {e}", state.display());
                }
            }
        }
        Err(e) => eprintln!("fake-model-server: read {}: {e}", state.display()),
    }
    // SAFETY: as above.
    unsafe { libc::flock(fd, libc::LOCK_UN) };
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake-model-server: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let state = std::env::var_os(fake_nvml::STATE_ENV).map(PathBuf::from);
    let listener = match TcpListener::bind(("127.0.0.1", args.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-model-server: bind port {}: {e}", args.port);
            std::process::exit(1);
        }
    };
    listener.set_nonblocking(true).expect("nonblocking");
    let started = Instant::now();
    let mut registered = false;
    let model = args.model.clone();
    let code = loop {
        if STOP.load(Ordering::SeqCst) || started.elapsed() > LIFETIME {
            break 0;
        }
        if args.exit_after.is_some_and(|d| started.elapsed() >= d) {
            break args.exit_code;
        }
        if !registered && started.elapsed() >= args.load_delay {
            if let Some(s) = &state {
                set_usage(s, args.device, args.size_bytes);
            }
            registered = true;
            LOADED.store(true, Ordering::SeqCst);
        }
        match listener.accept() {
            Ok((conn, _)) => {
                let model = model.clone();
                std::thread::spawn(move || serve(conn, &model));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    if registered && let Some(s) = &state {
        set_usage(s, args.device, 0);
    }
    std::process::exit(code);
}

struct Req {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn read_request(conn: &TcpStream) -> Option<Req> {
    conn.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut len = 0usize;
    for _ in 0..100 {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; len.min(1 << 20)];
    r.read_exact(&mut body).ok()?;
    Some(Req { method, path, body })
}

fn write_json(mut conn: &TcpStream, status: u16, v: &Value) {
    let body = v.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn serve(conn: TcpStream, model: &str) {
    let Some(req) = read_request(&conn) else {
        return;
    };
    let loaded = LOADED.load(Ordering::SeqCst);
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/health") if loaded => write_json(&conn, 200, &json!({"status": "ok"})),
        ("GET", "/health") => write_json(
            &conn,
            503,
            &json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
        ),
        ("GET", "/v1/models") => write_json(
            &conn,
            200,
            &json!({"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake"}]}),
        ),
        ("POST", "/v1/chat/completions") if !loaded => write_json(
            &conn,
            503,
            &json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
        ),
        ("POST", "/v1/chat/completions") => {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            if body["stream"] == json!(true) {
                stream(conn, model);
            } else {
                write_json(
                    &conn,
                    200,
                    &json!({
                        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("hello from {model}")}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                    }),
                );
            }
        }
        _ => write_json(
            &conn,
            404,
            &json!({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}),
        ),
    }
}

fn stream(mut conn: TcpStream, model: &str) {
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let mut events: Vec<String> = ["hello", " from", " fake"]
        .iter()
        .map(|t| {
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
            .to_string()
        })
        .collect();
    events.push(
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        .to_string(),
    );
    events.push("[DONE]".into());
    for e in events {
        let data = format!("data: {e}\n\n");
        if write!(conn, "{:x}\r\n{data}\r\n", data.len()).is_err() {
            return;
        }
        let _ = conn.flush();
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = write!(conn, "0\r\n\r\n");
}
