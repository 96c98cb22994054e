//! `kind = "comfyui"`: ComfyUI behind the gateway, as one reservation.
//!
//! Every route is forwarded to the upstream unchanged (streamed both ways);
//! `POST /prompt` (and `/api/prompt`) is gated: it first takes the app's
//! reservation (labelled `<app>/models`, of the app's observed or declared
//! size) through vramd's queue when the app holds none, then is forwarded.
//!
//! Lifecycle: ComfyUI answers `POST /prompt` at once and runs the prompt
//! later on its one prompt worker, so a request's life says nothing about
//! the card. The app is *busy* from the moment a prompt is forwarded until
//! a read of `GET /queue` made after that prompt was queued shows neither a
//! running nor a pending prompt; the poller reads `/queue` every poll
//! interval. When vramd evicts the (idle) reservation, new prompts wait; the
//! gateway waits until `/queue` is empty (a prompt sent straight to ComfyUI
//! meanwhile must end first), calls
//! `POST /free {"unload_models": true, "free_memory": true}` (which only
//! sets flags that the worker acts on when it next wakes), waits until the
//! memory is really gone — the attributed processes' usage in vramd's
//! readings back to what it was when the reservation was granted (+
//! [`FREED_SLACK_BYTES`]), or, with no process attributed, `/system_stats`'
//! `torch_vram_total` at most [`FREED_SLACK_BYTES`] — and then releases.
//!
//! Attribution: once per reservation the gateway attaches ComfyUI's process
//! (from `pid_file`, else the process listening on the upstream's port, read
//! from `/proc`) to it, so vramd counts its usage against the reservation
//! (not twice), and the reservation's measured peak becomes the app's
//! observed size in the state file.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde_json::Value;

use crate::Error;
use crate::models::AppState;
use crate::ollama::{CALL_TIMEOUT, ModelCall};
use crate::proxy::{MAX_MODEL_BODY_BYTES, PRIORITY_HEADER};

/// The model name of a ComfyUI app's one reservation (`<app>/models`).
pub const MODEL: &str = "models";
/// The routes that queue a prompt.
pub const PROMPT_ROUTES: [&str; 2] = ["/prompt", "/api/prompt"];
/// What may stay on the card after `/free` (CUDA context, allocator slack).
pub const FREED_SLACK_BYTES: u64 = 256 << 20;
/// How often an eviction re-reads `/queue` and the memory while it waits.
const EVICT_POLL: Duration = Duration::from_millis(100);

/// What the gateway knows of one ComfyUI app.
#[derive(Debug, Default)]
pub struct Comfy {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// A prompt may be queued or running.
    busy: bool,
    /// Prompts being forwarded now.
    forwarding: u32,
    /// When the last forwarded prompt was answered (queued by ComfyUI).
    last_forwarded: Option<Instant>,
    /// The last `/queue` read: (running, pending); `None`: no answer.
    queue: Option<(usize, usize)>,
    /// The reservation (epoch) the pids were attached to.
    attached_epoch: Option<u64>,
    /// The attributed pids.
    pids: Vec<u32>,
    /// Their usage on the reservation's device when attached.
    baseline_bytes: u64,
    /// Largest usage vramd measured for the reservation.
    peak_bytes: u64,
}

impl Comfy {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether ComfyUI may have a prompt queued or running.
    pub fn busy(&self) -> bool {
        self.lock().busy
    }

    /// For `/status`.
    pub fn status_json(&self) -> Value {
        let i = self.lock();
        serde_json::json!({
            "busy": i.busy,
            "queue_running": i.queue.map(|q| q.0),
            "queue_pending": i.queue.map(|q| q.1),
            "pids": i.pids,
            "baseline_bytes": i.baseline_bytes,
            "peak_bytes": i.peak_bytes,
        })
    }

    /// Whether the last `/queue` read was answered.
    pub fn up(&self) -> bool {
        self.lock().queue.is_some()
    }
}

/// The app's router: everything is forwarded, `POST /prompt` gated.
pub fn router(app: Arc<AppState>) -> axum::Router {
    axum::Router::new().fallback(forward).with_state(app)
}

async fn forward(State(app): State<Arc<AppState>>, req: Request<Body>) -> Response {
    match handle(app, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "request answered by the gateway");
            e.into_response()
        }
    }
}

async fn handle(app: Arc<AppState>, req: Request<Body>) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    if parts.method != Method::POST || !PROMPT_ROUTES.contains(&parts.uri.path()) {
        let stream = body.into_data_stream().map_err(std::io::Error::other);
        return crate::proxy::send(
            &app,
            &app.cfg.upstream,
            parts,
            reqwest::Body::wrap_stream(stream),
            None,
        )
        .await;
    }
    let bytes = axum::body::to_bytes(body, MAX_MODEL_BODY_BYTES)
        .await
        .map_err(|e| Error::BadRequest(format!("cannot read the request body: {e}")))?;
    let priority = match parts.headers.get(PRIORITY_HEADER) {
        None => app.cfg.priority,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| Error::BadRequest(format!("{PRIORITY_HEADER} must be an integer")))?,
    };
    app.metrics.request(&app.cfg.name, MODEL);
    let call = ModelCall {
        model: MODEL.into(),
        keep_alive_secs: None,
        unload_only: false,
        num_ctx: None,
    };
    let hold = app.acquire(&call, priority).await?;
    if let Some(h) = &hold {
        attach(&app, h.epoch()).await;
    }
    {
        let mut i = app.comfy.lock();
        i.busy = true;
        i.forwarding += 1;
    }
    let r = crate::proxy::send(
        &app,
        &app.cfg.upstream,
        parts,
        reqwest::Body::from(bytes),
        hold,
    )
    .await;
    {
        let mut i = app.comfy.lock();
        i.forwarding -= 1;
        i.last_forwarded = Some(Instant::now());
    }
    r
}

/// Attaches ComfyUI's process to the reservation of `epoch`, once, and
/// notes its usage then (what `/free` cannot take back).
async fn attach(app: &Arc<AppState>, epoch: u64) {
    if app.comfy.lock().attached_epoch == Some(epoch) {
        return;
    }
    let Some((e, res, device)) = app.reservation(MODEL) else {
        return;
    };
    if e != epoch {
        return;
    }
    let pid_file = app.cfg.pid_file.clone();
    let upstream = app.cfg.upstream.clone();
    let found = tokio::task::spawn_blocking(move || find_pids(pid_file.as_deref(), &upstream))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    let pids = match found {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(app = %app.cfg.name, error = %e, "cannot find ComfyUI's process: its memory stays unattributed");
            app.comfy.lock().attached_epoch = Some(epoch);
            return;
        }
    };
    let r = {
        let pids = pids.clone();
        tokio::task::spawn_blocking(move || res.attach_pids(&pids)).await
    };
    match r {
        Ok(Ok(all)) => {
            let baseline = usage(app, &pids, device).await.unwrap_or(0);
            tracing::info!(app = %app.cfg.name, ?pids, ?all, baseline_bytes = baseline, "attributed ComfyUI's process to its reservation");
            let mut i = app.comfy.lock();
            i.attached_epoch = Some(epoch);
            i.pids = pids;
            i.baseline_bytes = baseline;
            i.peak_bytes = 0;
        }
        Ok(Err(e)) => {
            tracing::warn!(app = %app.cfg.name, ?pids, error = %e, "vramd refused to attribute ComfyUI's process");
            let mut i = app.comfy.lock();
            i.attached_epoch = Some(epoch);
            i.pids.clear();
        }
        Err(e) => tracing::warn!(error = %e, "attach task failed"),
    }
}

/// The pids' usage on `device` in vramd's readings (a fresh status).
async fn usage(app: &AppState, pids: &[u32], device: u32) -> Option<u64> {
    let s = app.daemon.status().await.ok()?;
    Some(
        s.processes
            .iter()
            .filter(|p| p.device == device && pids.contains(&p.pid))
            .map(|p| p.bytes)
            .sum(),
    )
}

/// ComfyUI's pids: the one in `pid_file`, else the processes listening on
/// the upstream's TCP port (Linux `/proc`).
fn find_pids(pid_file: Option<&std::path::Path>, upstream: &str) -> Result<Vec<u32>, String> {
    if let Some(f) = pid_file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let pid = text
            .trim()
            .parse::<u32>()
            .map_err(|e| format!("{}: not a pid: {e}", f.display()))?;
        return Ok(vec![pid]);
    }
    let port = upstream_port(upstream).ok_or_else(|| format!("no port in {upstream}"))?;
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let p = f[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return Err(format!("nothing listens on port {port}"));
    }
    let mut pids = Vec::new();
    let procs = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let owns = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| l.to_str().map(|l| inodes.iter().any(|i| i == l)))
                .unwrap_or(false)
        });
        if owns {
            pids.push(pid);
        }
    }
    if pids.is_empty() {
        return Err(format!(
            "no process of this user holds the socket listening on port {port}"
        ));
    }
    Ok(pids)
}

fn upstream_port(upstream: &str) -> Option<u16> {
    let rest = upstream.strip_prefix("http://")?;
    let host = rest.split('/').next()?;
    match host.rsplit_once(':') {
        Some((_, p)) if !p.ends_with(']') => p.parse().ok(),
        _ => Some(80),
    }
}

/// `GET /queue`: (running, pending).
async fn read_queue(app: &AppState) -> Result<(usize, usize), String> {
    let url = format!("{}/queue", app.cfg.upstream);
    let resp = app
        .http()
        .get(&url)
        .timeout(CALL_TIMEOUT)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("GET {url} answered {}", resp.status()));
    }
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    let len = |k: &str| -> Result<usize, String> {
        v.get(k)
            .and_then(Value::as_array)
            .map(Vec::len)
            .ok_or_else(|| format!("GET {url}: no {k} list"))
    };
    Ok((len("queue_running")?, len("queue_pending")?))
}

/// One poll: reads `/queue` and marks the app busy or idle; notes the
/// reservation's measured peak as the app's observed size.
pub(crate) async fn poll(app: &Arc<AppState>) {
    let started = Instant::now();
    let q = read_queue(app).await;
    let changed = {
        let mut i = app.comfy.lock();
        let before = i.busy;
        match &q {
            Ok((r, p)) => {
                i.queue = Some((*r, *p));
                if r + p > 0 {
                    i.busy = true;
                } else if i.forwarding == 0 && i.last_forwarded.is_none_or(|t| t < started) {
                    i.busy = false;
                }
            }
            Err(e) => {
                tracing::debug!(app = %app.cfg.name, error = %e, "reading ComfyUI's /queue");
                i.queue = None;
            }
        }
        before != i.busy
    };
    if changed {
        tracing::debug!(app = %app.cfg.name, busy = app.comfy.busy(), "ComfyUI's queue changed");
        app.sync_idle(MODEL).await;
    }
    // The reservation's measured usage: the app's size.
    let Some((_, res, _)) = app.reservation(MODEL) else {
        return;
    };
    let actual = app.daemon.last_status().and_then(|s| {
        s.reservations
            .iter()
            .find(|r| r.id == res.id())
            .map(|r| r.actual_bytes)
    });
    if let Some(actual) = actual {
        let grew = {
            let mut i = app.comfy.lock();
            let grew = actual > i.peak_bytes && !i.pids.is_empty();
            if grew {
                i.peak_bytes = actual;
            }
            grew
        };
        if grew {
            let label = format!("{}/{MODEL}", app.cfg.name);
            app.metrics.size(&app.cfg.name, MODEL, actual);
            if let Err(e) = app.sizes.observe(&label, actual) {
                tracing::warn!(error = %e, "cannot save the app's size");
            }
        }
    }
}

/// Evicting: waits until ComfyUI's queue is empty, calls `/free`, waits
/// until the memory is gone (all up to `until`).
pub(crate) async fn unload(app: &AppState, device: Option<u32>, until: Instant) {
    loop {
        match read_queue(app).await {
            Ok((0, 0)) => break,
            Ok((r, p)) => {
                tracing::debug!(app = %app.cfg.name, running = r, pending = p, "eviction waits for ComfyUI's queue")
            }
            Err(e) => {
                tracing::debug!(app = %app.cfg.name, error = %e, "reading /queue during an eviction")
            }
        }
        if Instant::now() >= until {
            tracing::warn!(app = %app.cfg.name, "ComfyUI's queue still busy at the eviction deadline; freeing anyway");
            break;
        }
        tokio::time::sleep(EVICT_POLL).await;
    }
    let url = format!("{}/free", app.cfg.upstream);
    let sent = app
        .http()
        .post(&url)
        .json(&serde_json::json!({"unload_models": true, "free_memory": true}))
        .timeout(CALL_TIMEOUT)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => {
            tracing::info!(app = %app.cfg.name, "asked ComfyUI to free its memory")
        }
        Ok(r) => {
            tracing::warn!(app = %app.cfg.name, status = %r.status(), "ComfyUI's /free failed")
        }
        Err(e) => tracing::warn!(app = %app.cfg.name, error = %e, "ComfyUI's /free failed"),
    }
    let (pids, baseline) = {
        let i = app.comfy.lock();
        (i.pids.clone(), i.baseline_bytes)
    };
    loop {
        let gone = match (pids.is_empty(), device) {
            (false, Some(d)) => usage(app, &pids, d)
                .await
                .is_some_and(|b| b <= baseline + FREED_SLACK_BYTES),
            _ => torch_vram(app, device)
                .await
                .is_some_and(|b| b <= FREED_SLACK_BYTES),
        };
        if gone {
            tracing::info!(app = %app.cfg.name, "ComfyUI's memory is free");
            break;
        }
        if Instant::now() >= until {
            tracing::warn!(app = %app.cfg.name, "ComfyUI still holds memory at the eviction deadline; releasing anyway");
            break;
        }
        tokio::time::sleep(EVICT_POLL).await;
    }
    app.comfy.lock().attached_epoch = None;
}

/// `/system_stats`' `torch_vram_total` of the device with `index` (the
/// first device when unknown).
async fn torch_vram(app: &AppState, index: Option<u32>) -> Option<u64> {
    let url = format!("{}/system_stats", app.cfg.upstream);
    let v: Value = app
        .http()
        .get(&url)
        .timeout(CALL_TIMEOUT)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let devices = v.get("devices")?.as_array()?;
    let d = devices
        .iter()
        .find(|d| {
            index.is_some_and(|i| d.get("index").and_then(Value::as_u64) == Some(u64::from(i)))
        })
        .or_else(|| devices.first())?;
    d.get("torch_vram_total")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_port_is_read_from_the_url() {
        assert_eq!(upstream_port("http://127.0.0.1:8188"), Some(8188));
        assert_eq!(upstream_port("http://localhost"), Some(80));
        assert_eq!(upstream_port("http://[::1]:8188/x"), Some(8188));
    }

    #[test]
    fn the_process_listening_on_a_port_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let pids = find_pids(None, &format!("http://127.0.0.1:{port}")).unwrap();
        assert_eq!(pids, vec![std::process::id()]);
        drop(l);
        assert!(find_pids(None, &format!("http://127.0.0.1:{port}")).is_err());
    }
}
