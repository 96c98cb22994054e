//! A fake ComfyUI that follows the real server's HTTP API and its prompt
//! worker closely enough for the gateway, awkward parts included:
//!
//! - `POST /prompt` (`{"prompt": {...}, "client_id": ...}`) only *queues* the
//!   prompt and answers at once with
//!   `{"prompt_id": "<uuid>", "number": N, "node_errors": {}}`; a body
//!   without a `prompt` object is `400` with ComfyUI's error shape
//!   (`{"error": {"type", "message", "details", "extra_info"}, "node_errors": {}}`),
//!   and so is a checkpoint the fake does not have
//!   (`prompt_outputs_failed_validation`, the node named in `node_errors`);
//! - ONE prompt worker runs the queued prompts in order. Running a prompt
//!   loads the model it names (any node's `inputs.ckpt_name` or
//!   `inputs.unet_name`; else the fake's default model) unless it is loaded
//!   already, holding its bytes on the fake card in a [`FakeGpu`] process
//!   entry under the fake's pid, and takes the configured run time. Models
//!   stay loaded after the prompt (ComfyUI caches them). A load that does
//!   not fit on the card fails the prompt as CUDA would (`execution_error`
//!   in its history, counted by [`FakeComfyUi::ooms`]) and allocates
//!   nothing;
//! - `POST /free` (`{"unload_models": true, "free_memory": true}`) only SETS
//!   FLAGS: the worker acts on them when it next wakes — after the running
//!   prompt ends and before it takes the next (so with a prompt pending, the
//!   next prompt runs and loads its model again), or at once when idle (the
//!   real queue's `set_flag` notifies the waiting worker). `unload_models`
//!   defaults to `free_memory`, as in the real worker, and frees every
//!   model (`free_memory` alone only empties caches: nothing here);
//! - `GET /queue` → `{"queue_running": [[number, prompt_id, prompt,
//!   extra_data, outputs_to_execute]], "queue_pending": [...]}`;
//!   `POST /queue {"clear": true}` drops the pending prompts;
//! - `GET /prompt` → `{"exec_info": {"queue_remaining": N}}`;
//! - `GET /history`, `GET /history/{prompt_id}` (`{}` for an unknown id);
//! - `GET /system_stats` → `{"system": {...}, "devices": [{"name":
//!   "cuda:0 Fake GPU : cudaMallocAsync", "type": "cuda", "index": 0,
//!   "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"}]}`
//!   (`vram_*` from the fake card's readings, `torch_vram_total` what the
//!   fake holds, `torch_vram_free` 0);
//! - `GET /object_info` (minimal: `CheckpointLoaderSimple` with the fake's
//!   checkpoints);
//! - `GET /ws?clientId=…` with `Upgrade: websocket`: `101`, then a text
//!   frame `{"type": "status", "data": {"status": {"exec_info":
//!   {"queue_remaining": N}}, "sid": clientId}}` as the real server sends
//!   first; text frames the client sends (masked, short) are recorded
//!   ([`FakeComfyUi::ws_messages`]). (`Sec-WebSocket-Accept` is not
//!   computed: the fake's test clients do not check it.)
//! - every route also under `/api/…`, as the real server registers them.
//!
//! It serves HTTP/1.1 on `127.0.0.1`, one request per connection
//! (`Connection: close`). Every read and wait is bounded; dropping the fake
//! stops its acceptor and its worker (what it held stays on the card).

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_gpu::FakeGpu;

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request body read.
const MAX_BODY_BYTES: usize = 4 << 20;
/// How often an idle worker wakes to look at its stop flag (the real one
/// waits up to 1000 s; `set_flag` and new prompts wake it at once here too).
const WORKER_TICK: Duration = Duration::from_millis(100);

/// One `/free` call, with the queue as it stood when the call came.
#[derive(Debug, Clone)]
pub struct FreeCall {
    /// Whether a prompt was running.
    pub running: bool,
    /// How many prompts were pending.
    pub pending: usize,
    /// When it came.
    pub at: Instant,
    /// `unload_models` as sent (`None`: absent).
    pub unload_models: Option<bool>,
    /// `free_memory` as sent (`None`: absent).
    pub free_memory: Option<bool>,
}

#[derive(Debug, Clone)]
struct Item {
    number: u64,
    prompt_id: String,
    prompt: Value,
    extra_data: Value,
    outputs: Vec<String>,
}

impl Item {
    fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }
}

#[derive(Debug, Default)]
struct Flags {
    unload_models: Option<bool>,
    free_memory: Option<bool>,
}

impl Flags {
    fn any(&self) -> bool {
        self.unload_models.is_some() || self.free_memory.is_some()
    }
}

#[derive(Debug, Default)]
struct State {
    models: BTreeMap<String, u64>,
    default_model: String,
    pending: VecDeque<Item>,
    running: Option<Item>,
    next_number: u64,
    next_id: u64,
    history: BTreeMap<String, Value>,
    flags: Flags,
    loaded: BTreeMap<String, u64>,
    run_time: Duration,
    loads: u32,
    ooms: u32,
    frees: Vec<FreeCall>,
    executed: Vec<String>,
    log: Vec<(String, String)>,
    ws_messages: Vec<String>,
}

struct Core {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    gpu: Arc<FakeGpu>,
    device: usize,
    pid: u32,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held(s: &State) -> u64 {
        s.loaded.values().sum()
    }
}

/// The running fake.
pub struct FakeComfyUi {
    core: Arc<Core>,
    addr: SocketAddr,
    acceptor: Option<std::thread::JoinHandle<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl FakeComfyUi {
    /// Starts a fake with these checkpoints (name, bytes on the card once
    /// loaded; the first is the default for a prompt that names none),
    /// whose memory is process `pid`'s on device `device` of `gpu`, each
    /// prompt taking `run_time`.
    pub fn start(
        gpu: Arc<FakeGpu>,
        device: usize,
        pid: u32,
        models: &[(&str, u64)],
        run_time: Duration,
    ) -> FakeComfyUi {
        assert!(!models.is_empty(), "a fake ComfyUI needs a model");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake ComfyUI");
        let addr = listener.local_addr().expect("addr");
        let core = Arc::new(Core {
            state: Mutex::new(State {
                models: models.iter().map(|&(m, b)| (m.to_string(), b)).collect(),
                default_model: models[0].0.to_string(),
                run_time,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            gpu,
            device,
            pid,
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
        let c = core.clone();
        let worker = std::thread::spawn(move || prompt_worker(&c));
        FakeComfyUi {
            core,
            addr,
            acceptor: Some(acceptor),
            worker: Some(worker),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pid its memory is held under.
    pub fn pid(&self) -> u32 {
        self.core.pid
    }

    /// Models loaded now.
    pub fn loaded(&self) -> Vec<String> {
        self.core.lock().loaded.keys().cloned().collect()
    }

    /// Bytes it holds on the card now.
    pub fn held_bytes(&self) -> u64 {
        Core::held(&self.core.lock())
    }

    /// How many model loads it made.
    pub fn loads(&self) -> u32 {
        self.core.lock().loads
    }

    /// How many prompts failed with an out-of-memory error.
    pub fn ooms(&self) -> u32 {
        self.core.lock().ooms
    }

    /// Every `/free` call, in order.
    pub fn frees(&self) -> Vec<FreeCall> {
        self.core.lock().frees.clone()
    }

    /// Prompt ids executed (successfully or not), in order.
    pub fn executed(&self) -> Vec<String> {
        self.core.lock().executed.clone()
    }

    /// `(running, pending)` now.
    pub fn queue(&self) -> (bool, usize) {
        let s = self.core.lock();
        (s.running.is_some(), s.pending.len())
    }

    /// Every request as `(method, path)`.
    pub fn log(&self) -> Vec<(String, String)> {
        self.core.lock().log.clone()
    }

    /// Text frames received on `/ws` connections, in order.
    pub fn ws_messages(&self) -> Vec<String> {
        self.core.lock().ws_messages.clone()
    }

    /// Sets how long each prompt runs from now on.
    pub fn set_run_time(&self, d: Duration) {
        self.core.lock().run_time = d;
    }

    /// Loads `model` at once, as a prompt sent straight to ComfyUI would
    /// (bypassing the gateway). Returns false if it did not fit (an OOM).
    pub fn load_directly(&self, model: &str) -> bool {
        let mut s = self.core.lock();
        load(&self.core, &mut s, model)
    }
}

impl Drop for FakeComfyUi {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::SeqCst);
        self.core.changed.notify_all();
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Loads `model` if it is not loaded: its bytes go on the card under the
/// fake's pid, unless they do not fit (then nothing is allocated, the OOM is
/// counted, and false is returned).
fn load(core: &Core, s: &mut State, model: &str) -> bool {
    if s.loaded.contains_key(model) {
        return true;
    }
    let bytes = s.models.get(model).copied().unwrap_or(0);
    let new_total = Core::held(s) + bytes;
    let mut fits = true;
    core.gpu.edit(core.device, |d| {
        let others: u64 = d.used_bytes()
            - d.processes
                .iter()
                .filter(|p| p.pid == core.pid)
                .filter_map(|p| p.used_bytes)
                .sum::<u64>();
        if others + new_total > d.total_bytes {
            fits = false;
            return;
        }
        match d.processes.iter_mut().find(|p| p.pid == core.pid) {
            Some(p) => p.used_bytes = Some(new_total),
            None => d
                .processes
                .push(fake_nvml::FakeProcess::new(core.pid, new_total)),
        }
    });
    if fits {
        s.loaded.insert(model.to_string(), bytes);
        s.loads += 1;
    } else {
        s.ooms += 1;
    }
    fits
}

fn unload_all(core: &Core, s: &mut State) {
    s.loaded.clear();
    core.gpu.set_process(core.device, core.pid, 0);
}

/// The model a prompt names: the first node with `inputs.ckpt_name` or
/// `inputs.unet_name` (with its node id), in node-id order.
fn named_model(prompt: &Value) -> Option<(String, String)> {
    let nodes = prompt.as_object()?;
    nodes.iter().find_map(|(id, node)| {
        let inputs = node.get("inputs")?;
        ["ckpt_name", "unet_name"]
            .iter()
            .find_map(|k| inputs.get(*k)?.as_str())
            .map(|m| (id.clone(), m.to_string()))
    })
}

/// ComfyUI's `prompt_worker`: take the next prompt (waiting while there is
/// none, woken by a new prompt or a flag), run it, then act on the flags.
fn prompt_worker(core: &Arc<Core>) {
    loop {
        let mut s = core.lock();
        while s.pending.is_empty() && !s.flags.any() && !core.stop.load(Ordering::SeqCst) {
            s = core
                .changed
                .wait_timeout(s, WORKER_TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if core.stop.load(Ordering::SeqCst) {
            return;
        }
        if let Some(item) = s.pending.pop_front() {
            s.running = Some(item.clone());
            let model = named_model(&item.prompt)
                .map(|(_, m)| m)
                .unwrap_or_else(|| s.default_model.clone());
            let ok = load(core, &mut s, &model);
            let run_time = s.run_time;
            core.changed.notify_all();
            if ok {
                let until = Instant::now() + run_time;
                while Instant::now() < until && !core.stop.load(Ordering::SeqCst) {
                    let left = until.saturating_duration_since(Instant::now());
                    s = core
                        .changed
                        .wait_timeout(s, left.min(WORKER_TICK))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            s.running = None;
            let status = if ok {
                json!({"status_str": "success", "completed": true, "messages": [
                    ["execution_start", {"prompt_id": item.prompt_id}],
                    ["execution_success", {"prompt_id": item.prompt_id}]]})
            } else {
                json!({"status_str": "error", "completed": false, "messages": [
                    ["execution_start", {"prompt_id": item.prompt_id}],
                    ["execution_error", {"prompt_id": item.prompt_id,
                        "exception_type": "torch.OutOfMemoryError",
                        "exception_message": "CUDA out of memory."}]]})
            };
            s.history.insert(
                item.prompt_id.clone(),
                json!({"prompt": item.to_json(), "outputs": {}, "status": status, "meta": {}}),
            );
            s.executed.push(item.prompt_id.clone());
        }
        // After each item (or an idle wake), the flags.
        let flags = std::mem::take(&mut s.flags);
        let free_memory = flags.free_memory.unwrap_or(false);
        if flags.unload_models.unwrap_or(free_memory) {
            unload_all(core, &mut s);
        }
        drop(s);
        core.changed.notify_all();
    }
}

/// A request read by [`read_request`] (shared with the other fakes).
pub(crate) struct Req {
    /// The method.
    pub(crate) method: String,
    /// The path without the query.
    pub(crate) path: String,
    /// The query (without `?`), possibly empty.
    pub(crate) query: String,
    /// The body.
    pub(crate) body: Vec<u8>,
}

/// Reads one request (Content-Length bodies, bounded).
pub(crate) fn read_request(conn: &TcpStream) -> io::Result<Option<Req>> {
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
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    if len > MAX_BODY_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "body too long"));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Ok(Some(Req {
        method,
        path: path.to_string(),
        query: query.to_string(),
        body,
    }))
}

/// Writes a whole JSON answer.
pub(crate) fn write_json(mut conn: &TcpStream, status: u16, v: &Value) {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(&body);
}

/// ComfyUI's `/ws`: the status message first, then the client's text
/// frames are recorded until it closes (or the read timeout).
fn websocket(core: &Arc<Core>, mut conn: TcpStream, query: &str) {
    let sid = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("clientId="))
        .unwrap_or("fake-sid")
        .to_string();
    let remaining = {
        let s = core.lock();
        s.pending.len() + usize::from(s.running.is_some())
    };
    let msg = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": sid}})
        .to_string();
    let mut out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: fake\r\n\r\n".to_vec();
    out.push(0x81);
    if msg.len() < 126 {
        out.push(msg.len() as u8);
    } else {
        out.push(126);
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(msg.as_bytes());
    if conn.write_all(&out).is_err() {
        return;
    }
    // Client frames: FIN+opcode, MASK+len (< 126), 4 mask bytes, payload.
    loop {
        let mut head = [0u8; 2];
        if conn.read_exact(&mut head).is_err() {
            return;
        }
        let len = usize::from(head[1] & 0x7f);
        if head[0] & 0x0f == 0x8 || len >= 126 || head[1] & 0x80 == 0 {
            return;
        }
        let mut mask = [0u8; 4];
        let mut payload = vec![0u8; len];
        if conn.read_exact(&mut mask).is_err() || conn.read_exact(&mut payload).is_err() {
            return;
        }
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        if head[0] & 0x0f == 0x1 {
            core.lock()
                .ws_messages
                .push(String::from_utf8_lossy(&payload).into_owned());
        }
    }
}

fn write_empty(mut conn: &TcpStream) {
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

fn prompt_error(kind: &str, message: &str, details: &str, node_errors: Value) -> Value {
    json!({
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": node_errors,
    })
}

fn serve(core: &Arc<Core>, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let req = match read_request(&conn) {
        Ok(Some(r)) => r,
        _ => return,
    };
    let path = req
        .path
        .strip_prefix("/api")
        .unwrap_or(&req.path)
        .to_string();
    core.lock().log.push((req.method.clone(), path.clone()));
    if req.method == "GET" && path == "/ws" {
        return websocket(core, conn, &req.query);
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    match (req.method.as_str(), path.as_str()) {
        ("POST", "/prompt") => {
            let Some(prompt) = body.get("prompt").filter(|p| p.is_object()) else {
                return write_json(
                    &conn,
                    400,
                    &prompt_error(
                        "no_prompt",
                        "No prompt provided",
                        "No prompt provided",
                        json!({}),
                    ),
                );
            };
            let mut s = core.lock();
            if let Some((node, m)) = named_model(prompt)
                && !s.models.contains_key(&m)
            {
                let node_errors = json!({ node: {"errors": [{
                    "type": "value_not_in_list",
                    "message": "Value not in list",
                    "details": format!("ckpt_name: '{m}' not in {:?}", s.models.keys().collect::<Vec<_>>()),
                    "extra_info": {}}], "dependent_outputs": [], "class_type": "CheckpointLoaderSimple"}});
                drop(s);
                return write_json(
                    &conn,
                    400,
                    &prompt_error(
                        "prompt_outputs_failed_validation",
                        "Prompt outputs failed validation",
                        "",
                        node_errors,
                    ),
                );
            }
            s.next_id += 1;
            let prompt_id = format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                0x5eed_0000u32 + (s.next_id as u32),
                core.pid & 0xffff,
                s.next_id & 0xfff,
                s.next_number & 0xfff,
                s.next_id
            );
            let number = s.next_number;
            s.next_number += 1;
            let mut extra_data = body.get("extra_data").cloned().unwrap_or(json!({}));
            if let (Some(e), Some(c)) = (extra_data.as_object_mut(), body.get("client_id")) {
                e.insert("client_id".into(), c.clone());
            }
            let outputs: Vec<String> = prompt
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            s.pending.push_back(Item {
                number,
                prompt_id: prompt_id.clone(),
                prompt: prompt.clone(),
                extra_data,
                outputs,
            });
            drop(s);
            core.changed.notify_all();
            write_json(
                &conn,
                200,
                &json!({"prompt_id": prompt_id, "number": number, "node_errors": {}}),
            );
        }
        ("GET", "/prompt") => {
            let s = core.lock();
            let n = s.pending.len() + usize::from(s.running.is_some());
            drop(s);
            write_json(&conn, 200, &json!({"exec_info": {"queue_remaining": n}}));
        }
        ("GET", "/queue") => {
            let s = core.lock();
            let v = json!({
                "queue_running": s.running.iter().map(Item::to_json).collect::<Vec<_>>(),
                "queue_pending": s.pending.iter().map(Item::to_json).collect::<Vec<_>>(),
            });
            drop(s);
            write_json(&conn, 200, &v);
        }
        ("POST", "/queue") => {
            if body.get("clear").and_then(Value::as_bool) == Some(true) {
                core.lock().pending.clear();
            }
            write_empty(&conn);
        }
        ("POST", "/free") => {
            let flag = |k: &str| body.get(k).and_then(Value::as_bool);
            let mut s = core.lock();
            let call = FreeCall {
                running: s.running.is_some(),
                pending: s.pending.len(),
                at: Instant::now(),
                unload_models: flag("unload_models"),
                free_memory: flag("free_memory"),
            };
            // server.py: each flag present is passed to set_flag.
            if let Some(u) = call.unload_models {
                s.flags.unload_models = Some(u);
            }
            if let Some(f) = call.free_memory {
                s.flags.free_memory = Some(f);
            }
            s.frees.push(call);
            drop(s);
            core.changed.notify_all();
            write_empty(&conn);
        }
        ("GET", "/system_stats") => {
            let held = Core::held(&core.lock());
            let total = core.gpu.total(core.device);
            let free = total.saturating_sub(core.gpu.used(core.device));
            write_json(
                &conn,
                200,
                &json!({
                    "system": {
                        "os": "posix", "ram_total": 64u64 << 30, "ram_free": 32u64 << 30,
                        "comfyui_version": "0.3.40", "python_version": "3.12.3",
                        "pytorch_version": "2.7.0+cu128", "embedded_python": false,
                        "argv": ["main.py"],
                    },
                    "devices": [{
                        "name": format!("cuda:{} Fake GPU : cudaMallocAsync", core.device),
                        "type": "cuda", "index": core.device,
                        "vram_total": total, "vram_free": free,
                        "torch_vram_total": held, "torch_vram_free": 0,
                    }],
                }),
            );
        }
        ("GET", "/history") => {
            let v = Value::Object(
                core.lock()
                    .history
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            write_json(&conn, 200, &v);
        }
        ("GET", p) if p.starts_with("/history/") => {
            let id = &p["/history/".len()..];
            let v = match core.lock().history.get(id) {
                Some(h) => json!({ id: h }),
                None => json!({}),
            };
            write_json(&conn, 200, &v);
        }
        ("GET", "/object_info") => {
            let names: Vec<String> = core.lock().models.keys().cloned().collect();
            write_json(
                &conn,
                200,
                &json!({"CheckpointLoaderSimple": {
                    "input": {"required": {"ckpt_name": [names]}},
                    "output": ["MODEL", "CLIP", "VAE"],
                    "name": "CheckpointLoaderSimple", "category": "loaders",
                }}),
            );
        }
        _ => write_json(&conn, 404, &json!({"error": "Not Found"})),
    }
}
