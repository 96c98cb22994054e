//! Fake external GPU consumers that vramd evicts through their own HTTP APIs:
//! [`FakeOllama`], [`FakeComfyUi`] and a generic [`FakeHttpApp`] (a TTS
//! server, say).
//!
//! Each fake serves HTTP/1.1 on `127.0.0.1` at an ephemeral port, one request
//! per connection (`Connection: close`), on threads of the test process. What
//! it has loaded it holds in a [`FakeGpu`] state as one process entry (a pid
//! the caller picks, one that exists nowhere, e.g. `3_000_000 + n`) on one
//! device. Asked to unload, it answers at once and frees the memory only
//! after its `unload_delay`, from a background thread: so a test proves the
//! daemon waits for the readings, not for the HTTP answer. A load takes
//! effect at once, and cancels an unload still pending for that model.
//!
//! [`Behaviour`] makes a fake misbehave; [`Behaviour::Down`] closes its
//! listener, so connections are refused, and leaving `Down` binds the same
//! port again. Dropping a fake stops it: its listener closes, open
//! connections are shut down, pending unloads are cancelled, and every one
//! of its threads is joined (all of them wake within a bounded time). What it
//! held stays in the state file.
//!
//! Every read and every wait is bounded: a request's head is at most
//! 64 KiB, its body 1 MiB, a connection reads for at most 5 s, and at most
//! 64 connections are served at once (more are closed unanswered).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::util::lock;

use crate::fake_gpu::FakeGpu;

/// Longest request head (request line and headers) a fake reads.
const MAX_HEAD_BYTES: u64 = 64 * 1024;
/// Longest request body a fake reads.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most connections a fake serves at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request, or to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long leaving [`Behaviour::Down`] keeps trying to bind the port again.
const REBIND_WAIT: Duration = Duration::from_secs(5);

/// How a fake answers its requests. Changed at any time with
/// `set_behaviour`; a request follows the behaviour in force when it has
/// been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Serves its API.
    Normal,
    /// Not listening: the listener is closed, so connections are refused. A
    /// connection accepted just before is closed unanswered.
    Down,
    /// Waits this long, then serves the request as [`Behaviour::Normal`]
    /// (so an unload starts only then, whether or not the client still
    /// waits).
    Slow(Duration),
    /// Answers every request `500` with a JSON error, doing nothing.
    Error500,
    /// Answers every request `200` with `Content-Type: application/json` and
    /// a body that is not JSON, doing nothing.
    Garbage,
    /// Answers as [`Behaviour::Normal`], but an unload frees nothing (loads
    /// still work).
    IgnoreUnload,
}

/// One HTTP route: a method and a path (matched exactly, without the query).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The method, e.g. `POST`.
    pub method: String,
    /// The path, e.g. `/unload`.
    pub path: String,
}

impl Route {
    /// The route `method path`, e.g. `Route::new("POST", "/unload")`.
    pub fn new(method: &str, path: &str) -> Route {
        Route {
            method: method.to_ascii_uppercase(),
            path: path.to_string(),
        }
    }

    fn matches(&self, req: &Request) -> bool {
        self.method == req.method && self.path == req.path_only()
    }
}

/// The routes of a [`FakeHttpApp`]. Each answers `200 {"ok":true}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRoutes {
    /// Unloads what the app holds (after its delay).
    pub unload: Route,
    /// Loads it again, at once.
    pub load: Option<Route>,
    /// Only answers.
    pub health: Option<Route>,
}

impl HttpRoutes {
    /// Only an unload route.
    pub fn unload_only(unload: Route) -> HttpRoutes {
        HttpRoutes {
            unload,
            load: None,
            health: None,
        }
    }
}

impl Default for HttpRoutes {
    /// `POST /unload`, `POST /load`, `GET /health`.
    fn default() -> HttpRoutes {
        HttpRoutes {
            unload: Route::new("POST", "/unload"),
            load: Some(Route::new("POST", "/load")),
            health: Some(Route::new("GET", "/health")),
        }
    }
}

/// A fake Ollama: `GET /api/ps` lists the loaded models;
/// `POST /api/generate` (or `/api/chat`) with `{"model": M, "keep_alive": 0}`
/// unloads M after the delay (`keep_alive` may be `0`, `"0"`, `"0s"`, …),
/// answering `{"model":M,"done":true,"done_reason":"unload"}` at once, even
/// for a model that is not loaded; the same without a zero `keep_alive`
/// loads M again at once (`404` for a model it never had). A model being
/// unloaded stays listed until its memory is freed. Also `GET /` and
/// `GET /api/version`. All its models count in one process entry.
pub struct FakeOllama {
    server: Server,
}

impl FakeOllama {
    /// Starts serving, with `models` (name, bytes) all loaded: their sum is
    /// written as process `pid` on device `device` of `gpu`.
    pub fn start(
        gpu: Arc<FakeGpu>,
        device: usize,
        pid: u32,
        models: &[(&str, u64)],
        unload_delay: Duration,
    ) -> FakeOllama {
        FakeOllama {
            server: Server::start(Kind::Ollama, gpu, device, pid, models, unload_delay),
        }
    }

    /// Loads `model` as a generate request would, at once; false if this
    /// fake never had it.
    pub fn load(&self, model: &str) -> bool {
        self.server.core.load(Some(model))
    }

    /// The models loaded now (in the order given to `start`), including any
    /// whose unload is still pending.
    pub fn loaded_models(&self) -> Vec<String> {
        lock(&self.server.core.held)
            .iter()
            .filter(|h| h.resident)
            .map(|h| h.name.clone())
            .collect()
    }
}

/// A fake ComfyUI: `GET /system_stats` reports the device (`vram_total`,
/// `vram_free` from the [`FakeGpu`] readings, `torch_vram_total` what it
/// holds); `POST /free` with `unload_models` or `free_memory` true frees all
/// it holds after the delay and answers `200 {}` at once; `POST /prompt`
/// loads it all again at once.
pub struct FakeComfyUi {
    server: Server,
}

impl FakeComfyUi {
    /// Starts serving, holding `held_bytes` as process `pid` on device
    /// `device` of `gpu`.
    pub fn start(
        gpu: Arc<FakeGpu>,
        device: usize,
        pid: u32,
        held_bytes: u64,
        unload_delay: Duration,
    ) -> FakeComfyUi {
        FakeComfyUi {
            server: Server::start(
                Kind::ComfyUi,
                gpu,
                device,
                pid,
                &[("models", held_bytes)],
                unload_delay,
            ),
        }
    }

    /// Loads its models again at once, as a queued prompt would.
    pub fn load(&self) {
        self.server.core.load(None);
    }
}

/// A fake generic HTTP app (a TTS server, say) holding a fixed resident size
/// while loaded, with configurable unload, load and health routes (see
/// [`HttpRoutes`]); anything else is `404`.
pub struct FakeHttpApp {
    server: Server,
}

impl FakeHttpApp {
    /// Starts serving, loaded: `resident_bytes` as process `pid` on device
    /// `device` of `gpu`.
    pub fn start(
        gpu: Arc<FakeGpu>,
        device: usize,
        pid: u32,
        resident_bytes: u64,
        unload_delay: Duration,
        routes: HttpRoutes,
    ) -> FakeHttpApp {
        FakeHttpApp {
            server: Server::start(
                Kind::Http(routes),
                gpu,
                device,
                pid,
                &[("resident", resident_bytes)],
                unload_delay,
            ),
        }
    }

    /// Loads it again at once, as its load route would.
    pub fn load(&self) {
        self.server.core.load(None);
    }
}

/// The controls every fake has.
macro_rules! controls {
    ($fake:ident) => {
        impl $fake {
            /// Its base URL, `http://127.0.0.1:PORT` (no trailing slash).
            pub fn url(&self) -> String {
                format!("http://{}", self.server.core.addr)
            }

            /// Its address, `127.0.0.1:PORT`.
            pub fn addr(&self) -> SocketAddr {
                self.server.core.addr
            }

            /// The bytes it holds now in the [`FakeGpu`] state (its process
            /// entry), counting what a pending unload has not freed yet.
            pub fn held_bytes(&self) -> u64 {
                self.server.core.held_bytes()
            }

            /// Every request it has read, in order: (method, path with the
            /// query, body as lossy UTF-8), whatever the behaviour.
            pub fn requests(&self) -> Vec<(String, String, String)> {
                lock(&self.server.core.log).clone()
            }

            /// How many unload requests it has read, whatever the behaviour
            /// and whether or not they freed anything.
            pub fn unload_count(&self) -> usize {
                self.server.core.unloads.load(Ordering::SeqCst)
            }

            /// Changes how it answers from now on. Entering
            /// [`Behaviour::Down`] closes the listener before returning;
            /// leaving it binds the same port again before returning
            /// (panics if the port was taken meanwhile).
            pub fn set_behaviour(&self, b: Behaviour) {
                self.server.set_behaviour(b);
            }

            /// How it answers now.
            pub fn behaviour(&self) -> Behaviour {
                *lock(&self.server.core.behaviour)
            }

            /// The fake process id its memory is listed under.
            pub fn pid(&self) -> u32 {
                self.server.core.pid
            }

            /// The device index its memory is on.
            pub fn device(&self) -> usize {
                self.server.core.device
            }
        }
    };
}

controls!(FakeOllama);
controls!(FakeComfyUi);
controls!(FakeHttpApp);

/// Which API a fake serves.
enum Kind {
    Ollama,
    ComfyUi,
    Http(HttpRoutes),
}

/// One thing a fake can load: an Ollama model, or all of a ComfyUI or a
/// generic app.
struct Held {
    name: String,
    bytes: u64,
    resident: bool,
    /// An unload is pending (its timer runs).
    unloading: bool,
    /// Bumped on every load, so a pending unload started before it is void.
    generation: u64,
}

/// The state a fake's threads share.
struct Core {
    kind: Kind,
    gpu: Arc<FakeGpu>,
    device: usize,
    pid: u32,
    unload_delay: Duration,
    addr: SocketAddr,
    behaviour: Mutex<Behaviour>,
    held: Mutex<Vec<Held>>,
    log: Mutex<Vec<(String, String, String)>>,
    unloads: AtomicUsize,
    /// Set once, when the fake is dropped; `wake` wakes its sleepers.
    stopped: Mutex<bool>,
    wake: Condvar,
    /// Connection and unload threads, to join when dropped.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Open connections, to shut down when dropped.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

impl Core {
    fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Sleeps `d`; false (early) if the fake is stopped meanwhile.
    fn pause(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stopped = lock(&self.stopped);
        loop {
            if *stopped {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            stopped = self
                .wake
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs `f` on a thread joined when the fake is dropped; false (and `f`
    /// is not run) if it is already stopped.
    fn spawn(&self, f: impl FnOnce() + Send + 'static) -> bool {
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        if self.is_stopped() {
            return false;
        }
        threads.push(std::thread::spawn(f));
        true
    }

    fn held_bytes(&self) -> u64 {
        resident_bytes(&lock(&self.held))
    }

    /// Writes what `held` holds as this fake's process entry.
    fn publish(&self, held: &[Held]) {
        self.gpu
            .set_process(self.device, self.pid, resident_bytes(held));
    }

    /// Loads `name` (all when `None`) at once, voiding pending unloads;
    /// false if nothing matched.
    fn load(&self, name: Option<&str>) -> bool {
        let mut held = lock(&self.held);
        let mut any = false;
        for h in held.iter_mut().filter(|h| name_matches(&h.name, name)) {
            h.resident = true;
            h.unloading = false;
            h.generation += 1;
            any = true;
        }
        if any {
            self.publish(&held);
        }
        any
    }

    /// Unloads `name` (all when `None`): at once if the delay is zero, else
    /// from a thread after the delay. Idempotent while one is pending.
    fn unload(self: &Arc<Self>, name: Option<&str>) {
        let mut held = lock(&self.held);
        let targets: Vec<(usize, u64)> = held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.resident && !h.unloading && name_matches(&h.name, name))
            .map(|(i, h)| (i, h.generation))
            .collect();
        if targets.is_empty() {
            return;
        }
        if self.unload_delay.is_zero() {
            for &(i, _) in &targets {
                held[i].resident = false;
            }
            self.publish(&held);
            return;
        }
        for &(i, _) in &targets {
            held[i].unloading = true;
        }
        drop(held);
        let core = Arc::clone(self);
        self.spawn(move || {
            if !core.pause(core.unload_delay) {
                return;
            }
            let mut held = lock(&core.held);
            let mut changed = false;
            for (i, generation) in targets {
                let h = &mut held[i];
                if h.generation == generation && h.unloading {
                    h.resident = false;
                    h.unloading = false;
                    changed = true;
                }
            }
            if changed {
                core.publish(&held);
            }
        });
    }

    /// Whether `req` asks to unload something (counted whatever the
    /// behaviour).
    fn is_unload(&self, req: &Request) -> bool {
        match &self.kind {
            Kind::Ollama => ollama_call(req).is_some_and(|(_, unload)| unload),
            Kind::ComfyUi => comfy_free(req).unwrap_or(false),
            Kind::Http(routes) => routes.unload.matches(req),
        }
    }

    /// Serves `req`; unloads are done only if `act`.
    fn respond(self: &Arc<Self>, req: &Request, act: bool) -> Response {
        match &self.kind {
            Kind::Ollama => self.respond_ollama(req, act),
            Kind::ComfyUi => self.respond_comfy(req, act),
            Kind::Http(routes) => {
                if routes.unload.matches(req) {
                    if act {
                        self.unload(None);
                    }
                } else if routes.load.as_ref().is_some_and(|r| r.matches(req)) {
                    self.load(None);
                } else if !routes.health.as_ref().is_some_and(|r| r.matches(req)) {
                    return not_found();
                }
                Response::json(200, &json!({ "ok": true }))
            }
        }
    }

    fn respond_ollama(self: &Arc<Self>, req: &Request, act: bool) -> Response {
        match (req.method.as_str(), req.path_only()) {
            ("GET", "/") => Response {
                status: 200,
                content_type: "text/plain; charset=utf-8",
                body: b"Ollama is running".to_vec(),
            },
            ("GET", "/api/version") => Response::json(200, &json!({ "version": "0.0.0-fake" })),
            ("GET", "/api/ps") => {
                let models: Vec<Value> = lock(&self.held)
                    .iter()
                    .filter(|h| h.resident)
                    .map(|h| {
                        json!({
                            "name": h.name,
                            "model": h.name,
                            "size": h.bytes,
                            "size_vram": h.bytes,
                            "expires_at": "2099-01-01T00:00:00Z",
                        })
                    })
                    .collect();
                Response::json(200, &json!({ "models": models }))
            }
            ("POST", path @ ("/api/generate" | "/api/chat")) => {
                let Some((model, unload)) = ollama_call(req) else {
                    return Response::json(400, &json!({ "error": "model is required" }));
                };
                let reason = if unload {
                    if act {
                        self.unload(Some(&model));
                    }
                    "unload"
                } else if self.load(Some(&model)) {
                    "load"
                } else {
                    return Response::json(
                        404,
                        &json!({ "error": format!("model \"{model}\" not found, try pulling it first") }),
                    );
                };
                let mut answer = json!({
                    "model": model,
                    "created_at": "2024-01-01T00:00:00Z",
                    "done": true,
                    "done_reason": reason,
                });
                if path == "/api/chat" {
                    answer["message"] = json!({ "role": "assistant", "content": "" });
                } else {
                    answer["response"] = json!("");
                }
                Response::json(200, &answer)
            }
            _ => not_found(),
        }
    }

    fn respond_comfy(self: &Arc<Self>, req: &Request, act: bool) -> Response {
        match (req.method.as_str(), req.path_only()) {
            ("GET", "/system_stats") => {
                let total = self.gpu.total(self.device);
                let free = total.saturating_sub(self.gpu.used(self.device));
                Response::json(
                    200,
                    &json!({
                        "system": { "os": "posix" },
                        "devices": [{
                            "name": format!("cuda:{}", self.device),
                            "type": "cuda",
                            "index": self.device,
                            "vram_total": total,
                            "vram_free": free,
                            "torch_vram_total": self.held_bytes(),
                            "torch_vram_free": 0,
                        }],
                    }),
                )
            }
            ("POST", "/free") => match comfy_free(req) {
                None => Response::json(400, &json!({ "error": "body is not a JSON object" })),
                Some(free) => {
                    if free && act {
                        self.unload(None);
                    }
                    Response::json(200, &json!({}))
                }
            },
            ("POST", "/prompt") => {
                self.load(None);
                Response::json(
                    200,
                    &json!({ "prompt_id": "00000000-0000-0000-0000-000000000000", "number": 0, "node_errors": {} }),
                )
            }
            _ => not_found(),
        }
    }
}

fn resident_bytes(held: &[Held]) -> u64 {
    held.iter()
        .filter(|h| h.resident)
        .map(|h| h.bytes)
        .fold(0, u64::saturating_add)
}

/// `None` matches everything; `llama3` also matches `llama3:latest`, as in
/// Ollama.
fn name_matches(have: &str, want: Option<&str>) -> bool {
    match want {
        None => true,
        Some(w) => have == w || (!w.contains(':') && have.strip_suffix(":latest") == Some(w)),
    }
}

/// An Ollama generate or chat call: (model, whether `keep_alive` is zero).
fn ollama_call(req: &Request) -> Option<(String, bool)> {
    if req.method != "POST" || !matches!(req.path_only(), "/api/generate" | "/api/chat") {
        return None;
    }
    let body: Value = serde_json::from_slice(&req.body).ok()?;
    let model = body.get("model")?.as_str()?.to_string();
    let unload = body.get("keep_alive").is_some_and(keep_alive_is_zero);
    Some((model, unload))
}

/// `0`, `0.0`, `"0"`, `"0s"`, `"0m"`, … (a Go duration or a number of
/// seconds that is zero).
fn keep_alive_is_zero(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64().is_some_and(|f| f == 0.0),
        Value::String(s) => {
            let s = s.trim();
            let end = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (number, unit) = s.split_at(end);
            number.parse::<f64>().is_ok_and(|f| f == 0.0)
                && matches!(unit, "" | "ns" | "us" | "µs" | "ms" | "s" | "m" | "h")
        }
        _ => false,
    }
}

/// A ComfyUI `/free` call: whether it asks to free anything; `None` if the
/// body is not a JSON object (or it is not such a call).
fn comfy_free(req: &Request) -> Option<bool> {
    if req.method != "POST" || req.path_only() != "/free" {
        return None;
    }
    let body: Value = serde_json::from_slice(&req.body).ok()?;
    let body = body.as_object()?;
    let flag = |k: &str| body.get(k).and_then(Value::as_bool).unwrap_or(false);
    Some(flag("unload_models") || flag("free_memory"))
}

fn not_found() -> Response {
    Response::json(404, &json!({ "error": "not found" }))
}

/// The listener's thread; stopped before the listener is dropped.
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// A fake's server: the shared core and its accept thread, if listening.
struct Server {
    core: Arc<Core>,
    /// `None` while [`Behaviour::Down`]; its lock serializes behaviour changes.
    acceptor: Mutex<Option<Acceptor>>,
}

impl Server {
    fn start(
        kind: Kind,
        gpu: Arc<FakeGpu>,
        device: usize,
        pid: u32,
        held: &[(&str, u64)],
        unload_delay: Duration,
    ) -> Server {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a fake HTTP server");
        let addr = listener.local_addr().expect("local address");
        let held: Vec<Held> = held
            .iter()
            .map(|&(name, bytes)| Held {
                name: name.to_string(),
                bytes,
                resident: true,
                unloading: false,
                generation: 0,
            })
            .collect();
        let core = Arc::new(Core {
            kind,
            gpu,
            device,
            pid,
            unload_delay,
            addr,
            behaviour: Mutex::new(Behaviour::Normal),
            held: Mutex::new(held),
            log: Mutex::new(Vec::new()),
            unloads: AtomicUsize::new(0),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        core.publish(&lock(&core.held));
        let acceptor = start_acceptor(&core, listener);
        Server {
            core,
            acceptor: Mutex::new(Some(acceptor)),
        }
    }

    fn set_behaviour(&self, b: Behaviour) {
        let mut acceptor = lock(&self.acceptor);
        *lock(&self.core.behaviour) = b;
        if b == Behaviour::Down {
            if let Some(a) = acceptor.take() {
                stop_acceptor(self.core.addr, a);
            }
        } else if acceptor.is_none() {
            let listener = rebind(self.core.addr);
            *acceptor = Some(start_acceptor(&self.core, listener));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        *lock(&self.core.stopped) = true;
        self.core.wake.notify_all();
        if let Some(a) = lock(&self.acceptor).take() {
            stop_acceptor(self.core.addr, a);
        }
        for (_, conn) in lock(&self.core.conns).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        // Threads cannot start once stopped; those already started end soon:
        // their sleeps wake on `stopped`, their sockets are shut down.
        loop {
            let threads = std::mem::take(&mut *lock(&self.core.threads));
            if threads.is_empty() {
                break;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// Binds `addr` again (after [`Behaviour::Down`]), retrying for a while.
fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + REBIND_WAIT;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() >= deadline => {
                panic!("a fake HTTP server could not bind {addr} again: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn start_acceptor(core: &Arc<Core>, listener: TcpListener) -> Acceptor {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let core = Arc::clone(core);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            // Ends when told: `stop_acceptor` connects once to wake accept.
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match conn {
                    Ok(conn) => accept(&core, conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    Acceptor { stop, thread }
}

/// Stops an acceptor and waits until its listener is closed.
fn stop_acceptor(addr: SocketAddr, a: Acceptor) {
    a.stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + REBIND_WAIT;
    while !a.thread.is_finished() && Instant::now() < deadline {
        // Wakes the blocking accept; the connection itself is dropped.
        let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(2));
    }
    if a.thread.is_finished() {
        let _ = a.thread.join();
    } else {
        panic!("a fake HTTP server's accept thread on {addr} did not stop");
    }
}

/// Serves one accepted connection on its own thread.
fn accept(core: &Arc<Core>, conn: TcpStream) {
    let id = core.next_conn.fetch_add(1, Ordering::SeqCst);
    {
        let mut conns = lock(&core.conns);
        if conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let Ok(clone) = conn.try_clone() else { return };
        conns.insert(id, clone);
    }
    let c = Arc::clone(core);
    let started = core.spawn(move || {
        serve(&c, conn);
        lock(&c.conns).remove(&id);
    });
    if !started {
        lock(&core.conns).remove(&id);
    }
}

fn serve(core: &Arc<Core>, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_nodelay(true);
    let req = match read_request(&conn) {
        Ok(Some(req)) => req,
        Ok(None) => return,
        Err(e) => {
            let _ = write_response(
                &conn,
                &Response::json(400, &json!({ "error": e.to_string() })),
            );
            return;
        }
    };
    lock(&core.log).push((
        req.method.clone(),
        req.target.clone(),
        String::from_utf8_lossy(&req.body).into_owned(),
    ));
    if core.is_unload(&req) {
        core.unloads.fetch_add(1, Ordering::SeqCst);
    }
    let behaviour = *lock(&core.behaviour);
    let resp = match behaviour {
        Behaviour::Down => return,
        Behaviour::Slow(d) => {
            if !core.pause(d) {
                return;
            }
            core.respond(&req, true)
        }
        Behaviour::Error500 => Response::json(500, &json!({ "error": "fake internal error" })),
        Behaviour::Garbage => Response {
            status: 200,
            content_type: "application/json",
            body: b"<html><body>this is not JSON {".to_vec(),
        },
        Behaviour::IgnoreUnload => core.respond(&req, false),
        Behaviour::Normal => core.respond(&req, true),
    };
    let _ = write_response(&conn, &resp);
    let _ = conn.shutdown(Shutdown::Write);
}

/// A request as read.
struct Request {
    method: String,
    /// The request target: path and query.
    target: String,
    body: Vec<u8>,
}

impl Request {
    fn path_only(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one HTTP/1.x request; `None` if the peer closed without sending a
/// byte (as the wake-up connection does).
fn read_request(conn: &TcpStream) -> io::Result<Option<Request>> {
    let mut head = BufReader::new(conn).take(MAX_HEAD_BYTES);
    let mut line = String::new();
    if head.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not HTTP/1.x"));
    }
    let (method, target) = (method.to_string(), target.to_string());
    let mut length = 0usize;
    let mut chunked = false;
    let mut expect_continue = false;
    loop {
        line.clear();
        if head.read_line(&mut line)? == 0 {
            return Err(bad("request head truncated or too long"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(bad("bad header line"));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                length = value.parse().map_err(|_| bad("bad Content-Length"))?;
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if expect_continue {
        (&*conn).write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    // The rest of the request may already sit in the head reader's buffer.
    let mut reader = head.into_inner();
    let body = if chunked {
        read_chunked(&mut reader)?
    } else {
        if length > MAX_BODY_BYTES {
            return Err(bad("body too large"));
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    };
    Ok(Some(Request {
        method,
        target,
        body,
    }))
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if Read::take(&mut *reader, 1024).read_line(&mut line)? == 0 {
            return Err(bad("chunked body truncated"));
        }
        let size = line.trim().split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            break;
        }
        if body.len() + size > MAX_BODY_BYTES {
            return Err(bad("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
    }
    // Trailers, up to the empty line; bounded by the per-line cap and count.
    for _ in 0..64 {
        line.clear();
        if Read::take(&mut *reader, 1024).read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(body);
        }
    }
    Err(bad("too many trailers"))
}

/// An answer.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, v: &Value) -> Response {
        Response {
            status,
            content_type: "application/json; charset=utf-8",
            body: serde_json::to_vec(v).expect("serialize a fake answer"),
        }
    }
}

fn write_response(mut conn: &TcpStream, r: &Response) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Unknown",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(&r.body)?;
    conn.flush()
}
