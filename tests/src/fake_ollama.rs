//! A fake Ollama that follows the real HTTP API closely enough for the
//! gateway and Ollama's official clients: `/api/ps` (name, model, size,
//! size_vram, digest, details, expires_at, size as on the card),
//! `/api/tags`, `/api/show` (with `model_info`), `/api/generate` and
//! `/api/chat` (NDJSON streaming by default, one JSON object with
//! `"stream": false`), `/api/embed`, `/v1/chat/completions` (SSE when
//! `stream`), and `/api/version`.
//!
//! Behaviours copied from the real one, awkward parts included:
//! - a request loads its model; the model stays for the request's own
//!   `keep_alive` (seconds or a Go duration; negative = forever; 0 =
//!   unload once the request ends), else the default 5 minutes;
//! - `{"model": M, "keep_alive": 0}` with no prompt/messages unloads M
//!   without loading it, answering `done_reason: "unload"` at once; if a
//!   generation of M is running, the unload is *deferred* until it ends, and
//!   with [`FakeOllama::set_unload_delay`] M leaves `/api/ps` only after the
//!   delay (the runner takes time to exit);
//! - an empty prompt (or no messages) only loads the model (`"load"`);
//! - an unknown model is `404 {"error":"model \"M\" not found, try pulling
//!   it first"}`; a missing model name is `400 {"error":"model is required"}`;
//! - keep-alive expiry is checked whenever the state is read, so `/api/ps`
//!   stops listing an expired model exactly as the real one does.
//!
//! With [`FakeOllama::start_with_runners`], each loaded model also has a
//! runner process, as the real server runs one `ollama runner` child per
//! model: a real child of the test process (`sleep`, its command line
//! `ollama runner --model <blob path>` as the real one names the model's
//! weights, the same path `/api/show` gives in its Modelfile's `FROM` line)
//! that holds the model's `vram_bytes` on device 0 of a [`FakeGpu`], and is
//! killed (and its memory freed) when the model unloads or the fake drops.
//!
//! It serves HTTP/1.1 on `127.0.0.1`, one request per connection
//! (`Connection: close`), streaming with chunked transfer encoding. A
//! [`FakeOllama::gate`] makes generations stop after their first token until
//! the test opens it. Every read and wait is bounded; dropping the fake stops
//! its acceptor.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use crate::fake_gpu::FakeGpu;

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(300);
/// Tokens each generation produces unless `options.num_predict` says.
pub const TOKENS: usize = 5;

/// A model the fake can load.
#[derive(Debug, Clone)]
pub struct ModelDef {
    /// Its name with tag, e.g. `llama3:latest`.
    pub name: String,
    /// Bytes on disk (`/api/tags` size).
    pub file_bytes: u64,
    /// Bytes it takes on the card once loaded (`/api/ps` size_vram).
    pub vram_bytes: u64,
}

impl ModelDef {
    /// A model named `name` with these sizes.
    pub fn new(name: &str, file_bytes: u64, vram_bytes: u64) -> ModelDef {
        ModelDef {
            name: name.into(),
            file_bytes,
            vram_bytes,
        }
    }
}

#[derive(Debug)]
struct Loaded {
    /// `None`: forever.
    expires: Option<Instant>,
    active: u32,
    unload_pending: bool,
    expires_wall: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    models: BTreeMap<String, ModelDef>,
    loaded: BTreeMap<String, Loaded>,
    loads: BTreeMap<String, u32>,
    unload_requests: Vec<String>,
    log: Vec<(String, String)>,
    gate_closed: bool,
    unload_delay: Duration,
    /// Bumped on every load, so a delayed unload knows it was overtaken.
    load_epoch: u64,
}

impl State {
    fn expire(&mut self) {
        let now = Instant::now();
        self.loaded
            .retain(|_, l| l.active > 0 || l.expires.is_none_or(|e| e > now));
    }
}

struct Core {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    runners: Option<Runners>,
}

/// Runner mode: one child process per loaded model, holding its memory on
/// the fake card.
struct Runners {
    gpu: Arc<FakeGpu>,
    children: Mutex<BTreeMap<String, std::process::Child>>,
}

/// The path the fake gives a model's weights (`--model` of its runner, and
/// the `FROM` line of its Modelfile in `/api/show`).
pub fn blob_path(def: &ModelDef) -> String {
    let hex: String = def.name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("/fake-ollama/models/blobs/sha256-{hex}")
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// In runner mode: starts a runner for each loaded model that has none
    /// and stops those of models no longer loaded.
    fn reconcile(&self) {
        let Some(runners) = &self.runners else {
            return;
        };
        let mut children = runners.children.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.lock();
        let loaded: BTreeMap<String, ModelDef> = s
            .loaded
            .keys()
            .map(|m| (m.clone(), s.models[m].clone()))
            .collect();
        drop(s);
        let gone: Vec<String> = children
            .keys()
            .filter(|m| !loaded.contains_key(*m))
            .cloned()
            .collect();
        for m in gone {
            if let Some(mut c) = children.remove(&m) {
                runners.gpu.set_process(0, c.id(), 0);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for (m, def) in loaded {
            if children.contains_key(&m) {
                continue;
            }
            use std::os::unix::process::CommandExt;
            let child = std::process::Command::new("sleep")
                .arg0(format!("ollama runner --model {}", blob_path(&def)))
                .arg("600")
                .spawn()
                .expect("spawn a fake runner");
            runners.gpu.set_process(0, child.id(), def.vram_bytes);
            children.insert(m, child);
        }
    }

    /// The pid of `model`'s runner, in runner mode.
    fn runner_pid(&self, model: &str) -> Option<u32> {
        let runners = self.runners.as_ref()?;
        let children = runners.children.lock().unwrap_or_else(|p| p.into_inner());
        children.get(model).map(std::process::Child::id)
    }
}

/// The running fake.
pub struct FakeOllama {
    core: Arc<Core>,
    addr: SocketAddr,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl FakeOllama {
    /// Starts a fake that has pulled `models`.
    pub fn start(models: &[ModelDef]) -> FakeOllama {
        Self::start_inner(models, None)
    }

    /// Starts a fake in runner mode: each loaded model has a runner process
    /// holding its `vram_bytes` on device 0 of `gpu` (see the module docs).
    pub fn start_with_runners(models: &[ModelDef], gpu: Arc<FakeGpu>) -> FakeOllama {
        Self::start_inner(
            models,
            Some(Runners {
                gpu,
                children: Mutex::new(BTreeMap::new()),
            }),
        )
    }

    fn start_inner(models: &[ModelDef], runners: Option<Runners>) -> FakeOllama {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake Ollama");
        let addr = listener.local_addr().expect("addr");
        let core = Arc::new(Core {
            state: Mutex::new(State {
                models: models.iter().map(|m| (m.name.clone(), m.clone())).collect(),
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            runners,
        });
        let c = core.clone();
        let acceptor = std::thread::spawn(move || {
            // Blocking accept; Drop wakes it with a connection of its own.
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
        FakeOllama {
            core,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Models loaded now (expiry applied).
    pub fn loaded(&self) -> Vec<String> {
        let mut s = self.core.lock();
        s.expire();
        let loaded = s.loaded.keys().cloned().collect();
        drop(s);
        self.core.reconcile();
        loaded
    }

    /// The pid of `model`'s runner process (runner mode, while loaded).
    pub fn runner_pid(&self, model: &str) -> Option<u32> {
        self.core.runner_pid(model)
    }

    /// How many times `model` was loaded.
    pub fn loads(&self, model: &str) -> u32 {
        self.core.lock().loads.get(model).copied().unwrap_or(0)
    }

    /// Models named in unload requests (`keep_alive: 0`, nothing to do), in order.
    pub fn unload_requests(&self) -> Vec<String> {
        self.core.lock().unload_requests.clone()
    }

    /// Every request as `(method, path)`.
    pub fn log(&self) -> Vec<(String, String)> {
        self.core.lock().log.clone()
    }

    /// Closes (`true`) or opens the gate: while closed, generations stop
    /// after their first token.
    pub fn gate(&self, closed: bool) {
        self.core.lock().gate_closed = closed;
        self.core.changed.notify_all();
    }

    /// Makes unloads take `delay`: the answer comes at once, the model
    /// leaves `/api/ps` only later (as a real runner takes time to exit).
    pub fn set_unload_delay(&self, delay: Duration) {
        self.core.lock().unload_delay = delay;
    }

    /// Makes `model`'s keep-alive expire now (as if its timer ran out).
    pub fn expire_now(&self, model: &str) {
        let mut s = self.core.lock();
        if let Some(l) = s.loaded.get_mut(model) {
            l.expires = Some(Instant::now());
            l.expires_wall = Some(SystemTime::now());
        }
        s.expire();
        drop(s);
        self.core.reconcile();
    }
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::SeqCst);
        self.gate(false);
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        if let Some(r) = &self.core.runners {
            let mut children = r.children.lock().unwrap_or_else(|p| p.into_inner());
            for (_, mut c) in std::mem::take(&mut *children) {
                r.gpu.set_process(0, c.id(), 0);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn normalize(model: &str) -> String {
    let last = model.rsplit('/').next().unwrap_or(model);
    if last.contains(':') {
        model.to_string()
    } else {
        format!("{model}:latest")
    }
}

/// Ollama's keep_alive: seconds or a Go duration; `None` if invalid.
fn keep_alive(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let (neg, s) = s
                .strip_prefix('-')
                .map_or((false, s.as_str()), |r| (true, r));
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (n, unit) = s.split_at(split);
            let n: f64 = n.parse().ok()?;
            let scale = match unit {
                "" | "s" => 1.0,
                "ms" => 1e-3,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return None,
            };
            Some(if neg { -n * scale } else { n * scale })
        }
        _ => None,
    }
}

/// RFC 3339 in UTC with nanoseconds, as Go prints `time.Time`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
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
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(Some(Req { method, path, body }))
}

fn write_json(mut conn: &TcpStream, status: u16, v: &Value) {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(&body);
}

fn start_stream(mut conn: &TcpStream, content_type: &str) -> io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
}

fn chunk(mut conn: &TcpStream, data: &[u8]) -> io::Result<()> {
    write!(conn, "{:x}\r\n", data.len())?;
    conn.write_all(data)?;
    conn.write_all(b"\r\n")?;
    conn.flush()
}

fn serve(core: &Arc<Core>, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_nodelay(true);
    let req = match read_request(&conn) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => return write_json(&conn, 400, &json!({ "error": e.to_string() })),
    };
    core.lock().log.push((req.method.clone(), req.path.clone()));
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/api/ps") => {
            let mut s = core.lock();
            s.expire();
            let models: Vec<Value> = s
                .loaded
                .iter()
                .map(|(name, l)| {
                    let d = &s.models[name];
                    let expires = l.expires_wall.unwrap_or_else(|| {
                        // "forever": Go's far-future time as Ollama prints it
                        SystemTime::UNIX_EPOCH + Duration::from_secs(10_987_654_321)
                    });
                    json!({
                        "name": name, "model": name, "size": d.vram_bytes, "size_vram": d.vram_bytes,
                        "digest": format!("{:064x}", d.file_bytes),
                        "details": details(), "expires_at": rfc3339(expires),
                        "context_length": 4096,
                    })
                })
                .collect();
            drop(s);
            core.reconcile();
            write_json(&conn, 200, &json!({ "models": models }));
        }
        ("GET", "/api/tags") => {
            let s = core.lock();
            let models: Vec<Value> = s
                .models
                .values()
                .map(|d| {
                    json!({
                        "name": d.name, "model": d.name, "modified_at": rfc3339(SystemTime::now()),
                        "size": d.file_bytes, "digest": format!("{:064x}", d.file_bytes), "details": details(),
                    })
                })
                .collect();
            write_json(&conn, 200, &json!({ "models": models }));
        }
        ("GET", "/api/version") => write_json(&conn, 200, &json!({ "version": "0.12.6" })),
        ("GET" | "HEAD", "/") => {
            let mut c = &conn;
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 17\r\nConnection: close\r\n\r\nOllama is running");
        }
        ("POST", "/api/show") => {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let name = normalize(body["model"].as_str().unwrap_or_default());
            let def = core.lock().models.get(&name).cloned();
            let Some(def) = def else {
                return write_json(
                    &conn,
                    404,
                    &json!({ "error": format!("model '{}' not found", body["model"].as_str().unwrap_or_default()) }),
                );
            };
            let modelfile = format!(
                "# Modelfile generated by \"ollama show\"\n# FROM {name}\n\nFROM {}\nTEMPLATE {{{{ .Prompt }}}}\n",
                blob_path(&def)
            );
            write_json(
                &conn,
                200,
                &json!({
                    "modelfile": modelfile, "parameters": "", "template": "{{ .Prompt }}",
                    "details": details(), "capabilities": ["completion"],
                    "model_info": {
                        "general.architecture": "llama",
                        "llama.block_count": 16,
                        "llama.embedding_length": 2048,
                        "llama.attention.head_count": 32,
                        "llama.attention.head_count_kv": 8,
                        "llama.context_length": 131072,
                    },
                }),
            );
        }
        (
            "POST",
            path @ ("/api/generate" | "/api/chat" | "/api/embed" | "/v1/chat/completions"),
        ) => {
            generate(core, &conn, path, &req.body);
        }
        _ => {
            let mut c = &conn;
            let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 18\r\nConnection: close\r\n\r\n404 page not found");
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

fn details() -> Value {
    json!({ "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "1.2B", "quantization_level": "Q8_0" })
}

fn generate(core: &Arc<Core>, conn: &TcpStream, path: &str, raw: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(raw) else {
        return write_json(
            conn,
            400,
            &json!({ "error": "invalid character looking for beginning of value" }),
        );
    };
    let asked = body["model"].as_str().unwrap_or_default();
    if asked.is_empty() {
        return write_json(conn, 400, &json!({ "error": "model is required" }));
    }
    let model = normalize(asked);
    let openai = path.starts_with("/v1/");
    let ka = match body.get("keep_alive") {
        None | Some(Value::Null) => None,
        Some(v) => match keep_alive(v) {
            Some(k) => Some(k),
            None => return write_json(conn, 400, &json!({ "error": "invalid duration" })),
        },
    };
    let nothing = match path {
        "/api/generate" => body["prompt"].as_str().is_none_or(str::is_empty),
        "/api/chat" => body["messages"].as_array().is_none_or(Vec::is_empty),
        _ => false,
    };
    let now = SystemTime::now();
    {
        let mut s = core.lock();
        s.expire();
        if !s.models.contains_key(&model) {
            drop(s);
            let msg = format!("model \"{asked}\" not found, try pulling it first");
            return write_json(conn, 404, &json!({ "error": msg }));
        }
        if nothing && ka == Some(0.0) {
            s.unload_requests.push(model.clone());
            let delay = s.unload_delay;
            match s.loaded.get_mut(&model) {
                Some(l) if l.active > 0 => l.unload_pending = true,
                Some(_) if !delay.is_zero() => {
                    let (c, m, epoch) = (core.clone(), model.clone(), s.load_epoch);
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        let mut s = c.lock();
                        if s.load_epoch == epoch && s.loaded.get(&m).is_some_and(|l| l.active == 0)
                        {
                            s.loaded.remove(&m);
                        }
                        drop(s);
                        c.reconcile();
                    });
                }
                _ => {
                    s.loaded.remove(&model);
                }
            }
            drop(s);
            core.reconcile();
            core.changed.notify_all();
            return write_json(
                conn,
                200,
                &json!({ "model": model, "created_at": rfc3339(now),
                "response": "", "done": true, "done_reason": "unload" }),
            );
        }
        s.load_epoch += 1;
        if !s.loaded.contains_key(&model) {
            *s.loads.entry(model.clone()).or_default() += 1;
            s.loaded.insert(
                model.clone(),
                Loaded {
                    expires: None,
                    active: 0,
                    unload_pending: false,
                    expires_wall: None,
                },
            );
        }
        let l = s.loaded.get_mut(&model).expect("just loaded");
        l.active += 1;
        l.unload_pending = false;
    }
    core.reconcile();
    let finish = |core: &Arc<Core>| {
        let mut s = core.lock();
        let ka = ka.unwrap_or(DEFAULT_KEEP_ALIVE.as_secs_f64());
        if let Some(l) = s.loaded.get_mut(&model) {
            l.active -= 1;
            if l.active == 0 {
                if l.unload_pending || ka == 0.0 {
                    s.loaded.remove(&model);
                } else if ka < 0.0 {
                    l.expires = None;
                    l.expires_wall = None;
                } else {
                    let d = Duration::from_secs_f64(ka);
                    l.expires = Some(Instant::now() + d);
                    l.expires_wall = Some(SystemTime::now() + d);
                }
            }
        }
        drop(s);
        core.reconcile();
        core.changed.notify_all();
    };
    if nothing {
        finish(core);
        return write_json(
            conn,
            200,
            &json!({ "model": model, "created_at": rfc3339(now),
            "response": "", "done": true, "done_reason": "load" }),
        );
    }
    if path == "/api/embed" {
        finish(core);
        return write_json(
            conn,
            200,
            &json!({ "model": model, "embeddings": [[0.1, 0.2, 0.3]] }),
        );
    }
    let n = body["options"]["num_predict"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .map_or(TOKENS, |n| n as usize);
    let stream = body["stream"].as_bool().unwrap_or(!openai);
    let token = |i: usize| format!("tok{i} ");
    let wait_gate = |core: &Arc<Core>| {
        let mut s = core.lock();
        let deadline = Instant::now() + IO_TIMEOUT;
        while s.gate_closed && !core.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            s = core
                .changed
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    };
    let piece = |i: usize, done: bool| -> Value {
        let created = rfc3339(SystemTime::now());
        match path {
            "/api/chat" => {
                let mut v = json!({ "model": model, "created_at": created,
                    "message": { "role": "assistant", "content": if done { String::new() } else { token(i) } }, "done": done });
                if done {
                    v["done_reason"] = json!("stop");
                    v["total_duration"] = json!(1_000_000);
                    v["eval_count"] = json!(n);
                }
                v
            }
            "/v1/chat/completions" => {
                json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk",
                "created": 1_700_000_000, "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{ "index": 0, "delta": if done { json!({}) } else { json!({ "role": "assistant", "content": token(i) }) },
                    "finish_reason": if done { json!("stop") } else { Value::Null } }] })
            }
            _ => {
                let mut v = json!({ "model": model, "created_at": created,
                    "response": if done { String::new() } else { token(i) }, "done": done });
                if done {
                    v["done_reason"] = json!("stop");
                    v["context"] = json!([1, 2, 3]);
                    v["total_duration"] = json!(1_000_000);
                    v["eval_count"] = json!(n);
                }
                v
            }
        }
    };
    if stream {
        let sse = openai;
        let ct = if sse {
            "text/event-stream"
        } else {
            "application/x-ndjson"
        };
        let mut ok = start_stream(conn, ct).is_ok();
        for i in 0..=n {
            if !ok {
                break;
            }
            if i == 1 {
                wait_gate(core);
            }
            let v = piece(i, i == n);
            let line = if sse {
                format!("data: {v}\n\n")
            } else {
                format!("{v}\n")
            };
            ok = chunk(conn, line.as_bytes()).is_ok();
        }
        if ok && sse {
            ok = chunk(conn, b"data: [DONE]\n\n").is_ok();
        }
        if ok {
            let _ = chunk(conn, b"");
        }
        finish(core);
    } else {
        wait_gate(core);
        let text: String = (0..n).map(token).collect();
        let v = match path {
            "/api/chat" => json!({ "model": model, "created_at": rfc3339(SystemTime::now()),
                "message": { "role": "assistant", "content": text }, "done": true, "done_reason": "stop",
                "total_duration": 1_000_000, "eval_count": n }),
            "/v1/chat/completions" => json!({ "id": "chatcmpl-1", "object": "chat.completion",
                "created": 1_700_000_000, "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop" }],
                "usage": { "prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1 } }),
            _ => {
                json!({ "model": model, "created_at": rfc3339(SystemTime::now()), "response": text,
                "done": true, "done_reason": "stop", "context": [1, 2, 3], "total_duration": 1_000_000, "eval_count": n })
            }
        };
        finish(core);
        write_json(conn, 200, &v);
    }
}
