//! A fake HTTP model service with load, unload and health routes, like the
//! broker seed's TTS server (mvoice) or a speech-to-text server: one model,
//! held on the fake card under the service's pid while loaded.
//!
//! - `POST /load`: loads the model (taking the configured load time) and
//!   answers `{"status": "loaded"}` once it is loaded; a load that does not
//!   fit on the card is `500 {"detail": "CUDA out of memory…"}` (counted by
//!   [`FakeService::ooms`]) and allocates nothing;
//! - `POST /unload`: frees it at once, `{"status": "unloaded"}` (also when
//!   nothing was loaded) — or, after [`FakeService::set_unload`], fails the
//!   way a real service can ([`Unload`]: `500`, no answer for a while, or
//!   `200` with the memory kept);
//! - `GET /health`: `{"status": "ok", "loaded": bool}`, or `500` after
//!   [`FakeService::set_healthy`]`(false)`;
//! - any `POST` under the work prefix (`/v1/tts`, …): `200 {"ok": true}`
//!   after the work time while loaded; `503 {"detail": "model not loaded"}`
//!   while not (counted by [`FakeService::not_loaded`]), as FastAPI services
//!   answer.
//!
//! It starts loaded (services load their model at start). One request per
//! connection; every wait is bounded; dropping it stops the acceptor.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;

use crate::fake_comfyui::{read_request, write_json};
use crate::fake_gpu::FakeGpu;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How `POST /unload` behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Unload {
    /// Frees the model, answers `200`.
    #[default]
    Frees,
    /// Answers `500 {"detail": "unload failed"}`, frees nothing.
    Fails,
    /// Answers nothing for this long (at most 10 s), then `503`; frees
    /// nothing.
    Hangs(Duration),
    /// Answers `200 {"status": "unloaded"}` but frees nothing.
    KeepsMemory,
}

#[derive(Debug, Default)]
struct State {
    loaded: bool,
    loads: u32,
    unloads: u32,
    ooms: u32,
    not_loaded: u32,
    served: u32,
    healthy: bool,
    unload: Unload,
    log: Vec<(String, String)>,
}

struct Core {
    state: Mutex<State>,
    stop: AtomicBool,
    gpu: Arc<FakeGpu>,
    device: usize,
    pid: u32,
    bytes: u64,
    work_prefix: String,
    load_time: Duration,
    work_time: Duration,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the model if it fits; false on an OOM.
    fn load(&self, s: &mut State) -> bool {
        if s.loaded {
            return true;
        }
        let mut fits = true;
        self.gpu.edit(self.device, |d| {
            let mine: u64 = d
                .processes
                .iter()
                .filter(|p| p.pid == self.pid)
                .filter_map(|p| p.used_bytes)
                .sum();
            if d.used_bytes() - mine + self.bytes > d.total_bytes {
                fits = false;
                return;
            }
            d.processes.retain(|p| p.pid != self.pid);
            d.processes
                .push(fake_nvml::FakeProcess::new(self.pid, self.bytes));
        });
        if fits {
            s.loaded = true;
            s.loads += 1;
        } else {
            s.ooms += 1;
        }
        fits
    }

    fn unload(&self, s: &mut State) {
        s.loaded = false;
        self.gpu.set_process(self.device, self.pid, 0);
    }
}

/// The running fake.
pub struct FakeService {
    core: Arc<Core>,
    addr: SocketAddr,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl FakeService {
    /// Starts a service holding `bytes` as process `pid` on device `device`
    /// of `gpu` (loaded now), serving work under `work_prefix`; a load takes
    /// `load_time`, a work request `work_time`.
    pub fn start(
        gpu: Arc<FakeGpu>,
        device: usize,
        pid: u32,
        bytes: u64,
        work_prefix: &str,
        load_time: Duration,
        work_time: Duration,
    ) -> FakeService {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake service");
        let addr = listener.local_addr().expect("addr");
        let core = Arc::new(Core {
            state: Mutex::new(State {
                healthy: true,
                ..State::default()
            }),
            stop: AtomicBool::new(false),
            gpu,
            device,
            pid,
            bytes,
            work_prefix: work_prefix.to_string(),
            load_time,
            work_time,
        });
        {
            let mut s = core.lock();
            assert!(core.load(&mut s), "the fake service does not fit at start");
            s.loads = 0;
        }
        let c = core.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if c.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let c = c.clone();
                    std::thread::spawn(move || serve(&c, conn));
                }
            }
        });
        FakeService {
            core,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether the model is loaded.
    pub fn loaded(&self) -> bool {
        self.core.lock().loaded
    }

    /// Loads through `/load` since start.
    pub fn loads(&self) -> u32 {
        self.core.lock().loads
    }

    /// `/unload` requests read.
    pub fn unloads(&self) -> u32 {
        self.core.lock().unloads
    }

    /// Loads that did not fit (CUDA OOM).
    pub fn ooms(&self) -> u32 {
        self.core.lock().ooms
    }

    /// Work requests answered `503` because the model was not loaded.
    pub fn not_loaded(&self) -> u32 {
        self.core.lock().not_loaded
    }

    /// Work requests served.
    pub fn served(&self) -> u32 {
        self.core.lock().served
    }

    /// Every request, `(method, path)`, in order.
    pub fn log(&self) -> Vec<(String, String)> {
        self.core.lock().log.clone()
    }

    /// Makes `/health` answer `500` (false) or `200` again.
    pub fn set_healthy(&self, healthy: bool) {
        self.core.lock().healthy = healthy;
    }

    /// Makes `POST /unload` behave as `how` from now on.
    pub fn set_unload(&self, how: Unload) {
        self.core.lock().unload = how;
    }

    /// Unloads the model by itself (an idle timeout of its own).
    pub fn unload_self(&self) {
        let mut s = self.core.lock();
        self.core.unload(&mut s);
    }
}

impl Drop for FakeService {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn serve(core: &Arc<Core>, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(Some(req)) = read_request(&conn) else {
        return;
    };
    core.lock().log.push((req.method.clone(), req.path.clone()));
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/load") => {
            std::thread::sleep(core.load_time);
            let mut s = core.lock();
            if core.load(&mut s) {
                drop(s);
                write_json(&conn, 200, &json!({"status": "loaded"}));
            } else {
                drop(s);
                write_json(
                    &conn,
                    500,
                    &json!({"detail": "CUDA out of memory. Tried to allocate the model"}),
                );
            }
        }
        ("POST", "/unload") => {
            let mut s = core.lock();
            s.unloads += 1;
            let how = s.unload;
            if how == Unload::Frees {
                core.unload(&mut s);
            }
            drop(s);
            match how {
                Unload::Frees | Unload::KeepsMemory => {
                    write_json(&conn, 200, &json!({"status": "unloaded"}))
                }
                Unload::Fails => write_json(&conn, 500, &json!({"detail": "unload failed"})),
                Unload::Hangs(d) => {
                    std::thread::sleep(d.min(IO_TIMEOUT));
                    write_json(&conn, 503, &json!({"detail": "busy"}));
                }
            }
        }
        ("GET", "/health") => {
            let s = core.lock();
            let (healthy, loaded) = (s.healthy, s.loaded);
            drop(s);
            if healthy {
                write_json(&conn, 200, &json!({"status": "ok", "loaded": loaded}));
            } else {
                write_json(&conn, 500, &json!({"detail": "internal error"}));
            }
        }
        ("POST", p) if p.starts_with(&core.work_prefix) => {
            if !core.lock().loaded {
                core.lock().not_loaded += 1;
                return write_json(&conn, 503, &json!({"detail": "model not loaded"}));
            }
            std::thread::sleep(core.work_time);
            core.lock().served += 1;
            write_json(&conn, 200, &json!({"ok": true, "path": p}));
        }
        _ => write_json(&conn, 404, &json!({"detail": "Not Found"})),
    }
}
