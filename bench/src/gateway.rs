//! The gateway's added latency: the same requests sent straight to an
//! Ollama-like upstream and through `vramd-gateway` in front of it, in one
//! run, alternating in blocks so that noise on the machine hits both paths
//! alike.
//!
//! The upstream is a small keep-alive HTTP/1.1 server on loopback threads
//! that answers like Ollama for one model (`bench:latest`): `/api/version`,
//! `/api/ps` (the model listed once loaded), `/api/generate` whole
//! (`"stream": false`) or as NDJSON chunks (the first at once, the rest 1 ms
//! apart, as tokens come). It does no work, so what is measured is HTTP and
//! the gateway's own cost. The gateway runs with its default settings and a
//! size override for the model (so it never asks `/api/show`) against a
//! simulated daemon started by the harness.
//!
//! Figures: p50/p99 of a small non-streaming request, of the first chunk of
//! a stream, both direct and through the gateway, and requests per second
//! with 64 clients on keep-alive connections, both ways.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::procs::{self, ChildGuard};
use crate::stats::{self, Summary, nanos};

/// The one model the upstream serves.
pub const MODEL: &str = "bench:latest";
/// Chunks of a streamed answer.
const STREAM_CHUNKS: usize = 5;
/// Longest wait for one response.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Sizes of one gateway run.
#[derive(Debug, Clone)]
pub struct GatewayPlan {
    /// Requests of each kind before measuring.
    pub warmup: usize,
    /// Measured requests of each kind on each path.
    pub iters: usize,
    /// Blocks the measured requests are split into (paths alternate).
    pub blocks: usize,
    /// Clients of the throughput figure.
    pub clients: usize,
    /// How long each throughput window lasts.
    pub window: Duration,
    /// Longest the latency part may take.
    pub budget: Duration,
}

/// An Ollama-like upstream on loopback threads; stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Starts it on a free loopback port.
    pub fn start() -> io::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let loaded = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let loaded = loaded.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &loaded);
                });
            }
        });
        Ok(Upstream {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// One parsed request: method, path, body.
struct Req {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Reads one request from a keep-alive connection; `None` at its end.
fn read_request(r: &mut BufReader<TcpStream>) -> io::Result<Option<Req>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some(Req { method, path, body }))
}

fn respond(w: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

fn answer(done: bool, response: &str) -> String {
    json!({
        "model": MODEL,
        "created_at": "2026-01-01T00:00:00Z",
        "response": response,
        "done": done,
    })
    .to_string()
}

/// Serves one keep-alive connection until the client closes it.
fn serve(conn: TcpStream, loaded: &AtomicBool) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    while let Some(req) = read_request(&mut r)? {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api/version") => respond(&mut w, "200 OK", r#"{"version":"0.0.0-bench"}"#)?,
            ("GET", "/api/ps") => {
                let models = if loaded.load(Ordering::SeqCst) {
                    json!([{
                        "name": MODEL, "model": MODEL,
                        "size": 1u64 << 30, "size_vram": 1u64 << 30,
                        "digest": "0".repeat(64),
                        "details": {"format": "gguf", "family": "bench"},
                        "expires_at": "2099-01-01T00:00:00Z",
                    }])
                } else {
                    json!([])
                };
                respond(&mut w, "200 OK", &json!({ "models": models }).to_string())?
            }
            ("POST", "/api/generate") => {
                loaded.store(true, Ordering::SeqCst);
                let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                if body["stream"].as_bool() == Some(false) {
                    respond(&mut w, "200 OK", &answer(true, "hi"))?;
                } else {
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
                    )?;
                    for i in 0..STREAM_CHUNKS {
                        if i > 0 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        let line = answer(i + 1 == STREAM_CHUNKS, "tok") + "\n";
                        write!(w, "{:x}\r\n{line}\r\n", line.len())?;
                        w.flush()?;
                    }
                    w.write_all(b"0\r\n\r\n")?;
                    w.flush()?;
                }
            }
            _ => respond(&mut w, "404 Not Found", r#"{"error":"not found"}"#)?,
        }
    }
    let _ = w.shutdown(Shutdown::Both);
    Ok(())
}

/// A keep-alive HTTP/1.1 client connection.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
    host: String,
}

impl Client {
    fn connect(addr: SocketAddr) -> io::Result<Client> {
        let w = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        w.set_nodelay(true)?;
        w.set_read_timeout(Some(IO_TIMEOUT))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(Client {
            w,
            r,
            host: addr.to_string(),
        })
    }

    /// Posts `body` to `/api/generate`; returns when the first body chunk
    /// (or the whole body when not chunked) has arrived, and when the whole
    /// body has.
    fn generate(&mut self, body: &str) -> io::Result<(Duration, Duration)> {
        let started = Instant::now();
        write!(
            self.w,
            "POST /api/generate HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        )?;
        self.w.flush()?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("answer {:?}", line.trim_end())));
        }
        let (mut len, mut chunked) = (None, false);
        loop {
            let mut h = String::new();
            if self.r.read_line(&mut h)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding")
                    && v.to_ascii_lowercase().contains("chunked")
                {
                    chunked = true;
                }
            }
        }
        if !chunked {
            let mut body = vec![0; len.unwrap_or(0)];
            self.r.read_exact(&mut body)?;
            let t = started.elapsed();
            return Ok((t, t));
        }
        let mut first = None;
        loop {
            let mut size = String::new();
            if self.r.read_line(&mut size)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {size:?}")))?;
            let mut data = vec![0; n + 2];
            self.r.read_exact(&mut data)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(|| started.elapsed());
        }
        let all = started.elapsed();
        Ok((first.unwrap_or(all), all))
    }
}

/// Waits until `addr` accepts connections.
fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The gateway in front of `upstream`, a client of the daemon on `socket`.
struct Gateway {
    child: ChildGuard,
    app: SocketAddr,
    log: std::path::PathBuf,
}

impl Gateway {
    fn start(
        bin: &Path,
        socket: &Path,
        upstream: SocketAddr,
        dir: &Path,
    ) -> Result<Gateway, String> {
        let admin = free_port().map_err(|e| e.to_string())?;
        let app = free_port().map_err(|e| e.to_string())?;
        let config = dir.join("gateway.toml");
        let text = format!(
            "socket = {socket:?}\nlisten = \"{admin}\"\nstate_file = {state:?}\n\n\
             [[app]]\nname = \"bench\"\nkind = \"ollama\"\nupstream = \"http://{upstream}\"\n\
             listen = \"{app}\"\n\n[app.sizes]\n\"{MODEL}\" = \"1GiB\"\n",
            socket = socket.display().to_string(),
            state = dir.join("gateway-state.json").display().to_string(),
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let log = dir.join("gateway.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = procs::spawn(
            Command::new(bin)
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err),
        )
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let g = Gateway { child, app, log };
        if !wait_listening(app, Duration::from_secs(10)) {
            return Err(format!(
                "the gateway did not listen on {app} within 10 s; its log:\n{}",
                g.log_tail()
            ));
        }
        Ok(g)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Requests per second with `clients` keep-alive connections to `addr`
/// sending small non-streaming requests for `window`.
fn throughput(addr: SocketAddr, clients: usize, window: Duration) -> Result<f64, String> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let body = json!({"model": MODEL, "prompt": "hi", "stream": false}).to_string();
    let mut threads = Vec::new();
    for _ in 0..clients {
        let (done, errors, start, stop, body) = (
            done.clone(),
            errors.clone(),
            start.clone(),
            stop.clone(),
            body.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let conn = Client::connect(addr);
            start.wait();
            let Ok(mut c) = conn else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                match c.generate(&body) {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
            }
        }));
    }
    start.wait();
    let before = done.load(Ordering::Relaxed);
    let t = Instant::now();
    std::thread::sleep(window);
    let n = done.load(Ordering::Relaxed) - before;
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    match errors.load(Ordering::Relaxed) {
        0 => Ok(n as f64 / secs),
        e => Err(format!("{e} of {clients} clients failed")),
    }
}

/// Samples of one path (direct or gateway).
#[derive(Default)]
struct Samples {
    small: Vec<u64>,
    first_chunk: Vec<u64>,
}

fn measure(c: &mut Client, n: usize, into: &mut Samples) -> Result<(), String> {
    let small = json!({"model": MODEL, "prompt": "hi", "stream": false}).to_string();
    let stream = json!({"model": MODEL, "prompt": "hi"}).to_string();
    for _ in 0..n {
        let (t, _) = c.generate(&small).map_err(|e| e.to_string())?;
        into.small.push(nanos(t));
        let (t, _) = c.generate(&stream).map_err(|e| e.to_string())?;
        into.first_chunk.push(nanos(t));
    }
    Ok(())
}

/// The whole measurement: `gateway_bin` in front of a fresh upstream, a
/// client of the daemon on `socket`.
pub fn run(gateway_bin: &Path, socket: &Path, plan: &GatewayPlan) -> Result<Value, String> {
    let dir = procs::private_tempdir("vramd-bench-gateway").map_err(|e| e.to_string())?;
    let upstream = Upstream::start().map_err(|e| e.to_string())?;
    let gw = Gateway::start(gateway_bin, socket, upstream.addr(), dir.path())?;
    let fail = |e: String| format!("{e}; gateway log:\n{}", gw.log_tail());
    let mut direct = Client::connect(upstream.addr()).map_err(|e| e.to_string())?;
    let mut through = Client::connect(gw.app).map_err(|e| fail(e.to_string()))?;
    let mut scratch = Samples::default();
    measure(&mut through, plan.warmup, &mut scratch).map_err(fail)?;
    measure(&mut direct, plan.warmup, &mut scratch).map_err(fail)?;
    let (mut d, mut g) = (Samples::default(), Samples::default());
    let per_block = plan.iters.div_ceil(plan.blocks.max(1));
    let deadline = Instant::now() + plan.budget;
    for _ in 0..plan.blocks.max(1) {
        if Instant::now() > deadline {
            break;
        }
        measure(&mut direct, per_block, &mut d).map_err(fail)?;
        measure(&mut through, per_block, &mut g).map_err(fail)?;
    }
    let cpu_before = procs::ProcSample::read(gw.child.pid()).ok();
    let tp_direct = throughput(upstream.addr(), plan.clients, plan.window).map_err(fail)?;
    let t_gw = Instant::now();
    let tp_gateway = throughput(gw.app, plan.clients, plan.window).map_err(fail)?;
    let gw_secs = t_gw.elapsed().as_secs_f64();
    let cpu_after = procs::ProcSample::read(gw.child.pid()).ok();
    let gateway_cpu_pct = cpu_before.zip(cpu_after).map(|(a, b)| {
        let ticks = b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64;
        stats::round2(100.0 * ticks / procs::clock_ticks_per_second() as f64 / gw_secs)
    });
    let (ds, dc, gs, gc) = (
        Summary::of(d.small),
        Summary::of(d.first_chunk),
        Summary::of(g.small),
        Summary::of(g.first_chunk),
    );
    let added = |a: &Summary, b: &Summary| {
        json!({
            "p50_us": stats::round2((b.p50_ns as f64 - a.p50_ns as f64) / 1e3),
            "p99_us": stats::round2((b.p99_ns as f64 - a.p99_ns as f64) / 1e3),
        })
    };
    Ok(json!({
        "model": MODEL,
        "stream_chunks": STREAM_CHUNKS,
        "small": {
            "direct": ds.to_json(),
            "gateway": gs.to_json(),
            "added": added(&ds, &gs),
        },
        "first_chunk": {
            "direct": dc.to_json(),
            "gateway": gc.to_json(),
            "added": added(&dc, &gc),
        },
        "throughput": {
            "clients": plan.clients,
            "window_seconds": plan.window.as_secs_f64(),
            "direct_requests_per_s": stats::round2(tp_direct),
            "gateway_requests_per_s": stats::round2(tp_gateway),
            "gateway_cpu_pct": gateway_cpu_pct,
        },
    }))
}
