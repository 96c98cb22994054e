//! A fake OpenAI-compatible server (as vLLM or llama.cpp's server run one):
//! it serves a fixed list of models, loaded when it starts, and answers
//! `GET /v1/models`, `POST /v1/chat/completions` and `/v1/completions`
//! (server-sent events when `"stream": true`, ending with `data: [DONE]`;
//! one JSON object otherwise) and `POST /v1/embeddings`, in the real API's
//! shapes. `POST /unload` frees its models (as vLLM's `/sleep`) and
//! `POST /load` loads them again (`/wake_up`); while unloaded a model
//! request is `503`, so a test sees whether the gateway loaded it before
//! forwarding. An unknown model is `404` in OpenAI's error shape.
//!
//! It serves HTTP/1.1 on `127.0.0.1`, one request per connection
//! (`Connection: close`), streams with chunked transfer encoding, on
//! threads of the test process. [`FakeOpenAi::gate`] makes streams stop
//! after their first chunk until the test opens it. Every read and wait is
//! bounded; dropping the fake stops its acceptor.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens each completion produces.
pub const TOKENS: usize = 5;
/// Largest request body read.
const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
struct State {
    models: Vec<String>,
    loaded: bool,
    loads: u32,
    unloads: u32,
    /// (method, path, body's model)
    log: Vec<(String, String, String)>,
    gate_closed: bool,
}

struct Core {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fake.
pub struct FakeOpenAi {
    core: Arc<Core>,
    addr: SocketAddr,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl FakeOpenAi {
    /// Starts a server with `models` loaded.
    pub fn start(models: &[&str]) -> FakeOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake server");
        let addr = listener.local_addr().expect("addr");
        let core = Arc::new(Core {
            state: Mutex::new(State {
                models: models.iter().map(|m| m.to_string()).collect(),
                loaded: true,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let c = core.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if c.stop.load(Ordering::SeqCst) {
                    break;
                }
                match conn {
                    Ok(conn) => {
                        let c = c.clone();
                        std::thread::spawn(move || serve(&c, conn));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeOpenAi {
            core,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether its models are loaded.
    pub fn loaded(&self) -> bool {
        self.core.lock().loaded
    }

    /// How many `POST /load` it answered.
    pub fn loads(&self) -> u32 {
        self.core.lock().loads
    }

    /// How many `POST /unload` it answered.
    pub fn unloads(&self) -> u32 {
        self.core.lock().unloads
    }

    /// Every request as `(method, path, model named in the body)`.
    pub fn log(&self) -> Vec<(String, String, String)> {
        self.core.lock().log.clone()
    }

    /// Model requests (to `/v1/...` with a body) it received.
    pub fn model_requests(&self) -> usize {
        self.log()
            .iter()
            .filter(|(m, p, _)| m == "POST" && p.starts_with("/v1/"))
            .count()
    }

    /// Closes (`true`) or opens the gate: while closed, streams stop after
    /// their first chunk and whole answers wait.
    pub fn gate(&self, closed: bool) {
        self.core.lock().gate_closed = closed;
        self.core.changed.notify_all();
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::SeqCst);
        self.gate(false);
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

struct Req {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn read_request(conn: &TcpStream) -> io::Result<Option<Req>> {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    if len > MAX_BODY_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(Some(Req { method, path, body }))
}

fn write_json(mut conn: &TcpStream, status: u16, v: &Value) {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(&body);
}

fn chunk(mut conn: &TcpStream, data: &[u8]) -> io::Result<()> {
    write!(conn, "{:x}\r\n", data.len())?;
    conn.write_all(data)?;
    conn.write_all(b"\r\n")?;
    conn.flush()
}

fn openai_error(status: u16, message: &str, code: Option<&str>) -> (u16, Value) {
    let kind = if status < 500 {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (
        status,
        json!({ "error": { "message": message, "type": kind, "param": Value::Null, "code": code } }),
    )
}

fn wait_gate(core: &Core) {
    let mut s = core.lock();
    let deadline = Instant::now() + IO_TIMEOUT;
    while s.gate_closed && !core.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        s = core
            .changed
            .wait_timeout(s, Duration::from_millis(50))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn token(i: usize) -> String {
    format!("tok{i} ")
}

fn serve(core: &Arc<Core>, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_nodelay(true);
    let req = match read_request(&conn) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let (s, v) = openai_error(400, &e.to_string(), None);
            return write_json(&conn, s, &v);
        }
    };
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or_default().to_string();
    core.lock()
        .log
        .push((req.method.clone(), req.path.clone(), model.clone()));
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/models") => {
            let data: Vec<Value> = core
                .lock()
                .models
                .iter()
                .map(|m| json!({ "id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake" }))
                .collect();
            write_json(&conn, 200, &json!({ "object": "list", "data": data }));
        }
        ("POST", "/load") => {
            let mut s = core.lock();
            s.loaded = true;
            s.loads += 1;
            drop(s);
            write_json(&conn, 200, &json!({}));
        }
        ("POST", "/unload") => {
            let mut s = core.lock();
            s.loaded = false;
            s.unloads += 1;
            drop(s);
            write_json(&conn, 200, &json!({}));
        }
        ("POST", path @ ("/v1/chat/completions" | "/v1/completions" | "/v1/embeddings")) => {
            complete(core, &conn, path, &body, &model);
        }
        _ => {
            let (s, v) = openai_error(404, "not found", None);
            write_json(&conn, s, &v);
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

fn complete(core: &Core, conn: &TcpStream, path: &str, body: &Value, model: &str) {
    {
        let s = core.lock();
        if !s.models.iter().any(|m| m == model) {
            drop(s);
            let (st, v) = openai_error(
                404,
                &format!("The model `{model}` does not exist."),
                Some("model_not_found"),
            );
            return write_json(conn, st, &v);
        }
        if !s.loaded {
            drop(s);
            let (st, v) = openai_error(503, "the model is unloaded; POST /load first", None);
            return write_json(conn, st, &v);
        }
    }
    if path == "/v1/embeddings" {
        return write_json(
            conn,
            200,
            &json!({ "object": "list", "model": model,
                "data": [{ "object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3] }],
                "usage": { "prompt_tokens": 1, "total_tokens": 1 } }),
        );
    }
    let chat = path == "/v1/chat/completions";
    let piece = |i: usize, done: bool| -> Value {
        if chat {
            json!({ "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": model, "choices": [{ "index": 0,
                "delta": if done { json!({}) } else { json!({ "role": "assistant", "content": token(i) }) },
                "finish_reason": if done { json!("stop") } else { Value::Null } }] })
        } else {
            json!({ "id": "cmpl-fake", "object": "text_completion", "created": 1_700_000_000,
                "model": model, "choices": [{ "index": 0, "text": if done { String::new() } else { token(i) },
                "logprobs": Value::Null, "finish_reason": if done { json!("stop") } else { Value::Null } }] })
        }
    };
    if body["stream"].as_bool().unwrap_or(false) {
        let mut c = conn;
        let mut ok = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .is_ok();
        for i in 0..=TOKENS {
            if !ok {
                break;
            }
            if i == 1 {
                wait_gate(core);
            }
            ok = chunk(
                conn,
                format!("data: {}\n\n", piece(i, i == TOKENS)).as_bytes(),
            )
            .is_ok();
        }
        if ok {
            ok = chunk(conn, b"data: [DONE]\n\n").is_ok();
        }
        if ok {
            let _ = chunk(conn, b"");
        }
        return;
    }
    wait_gate(core);
    let text: String = (0..TOKENS).map(token).collect();
    let usage =
        json!({ "prompt_tokens": 1, "completion_tokens": TOKENS, "total_tokens": TOKENS + 1 });
    let v = if chat {
        json!({ "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop" }],
            "usage": usage })
    } else {
        json!({ "id": "cmpl-fake", "object": "text_completion", "created": 1_700_000_000, "model": model,
            "choices": [{ "index": 0, "text": text, "logprobs": Value::Null, "finish_reason": "stop" }],
            "usage": usage })
    };
    write_json(conn, 200, &v);
}
