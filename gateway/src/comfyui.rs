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
use crate::pids::FREED_SLACK_BYTES;
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
    /// The last failure and when (Unix milliseconds), kept until a later
    /// success of the same call.
    last_error: crate::last_error::LastError,
}

impl Comfy {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether ComfyUI may have a prompt queued or running.
    pub fn busy(&self) -> bool {
        self.lock().busy
    }

    /// The last failure of the app's calls.
    pub(crate) fn last_error(&self) -> crate::last_error::LastError {
        self.lock().last_error.clone()
    }

    /// For `/status`.
    pub fn status_json(&self) -> Value {
        let i = self.lock();
        serde_json::json!({
            "busy": i.busy,
            "queue_running": i.queue.map(|q| q.0),
            "queue_pending": i.queue.map(|q| q.1),
            "last_error": i.last_error.message(),
            "last_error_at_ms": i.last_error.at_ms(),
        })
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) {
        self.lock().last_error.fail(what, e);
    }

    fn succeed(&self, what: &str) {
        self.lock().last_error.succeed(what);
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
    if parts.headers.contains_key(axum::http::header::UPGRADE) {
        return tunnel(&app, parts).await;
    }
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
        // ComfyUI loads models only when a prompt runs: before the first
        // prompt of a reservation (the gateway's first, or the first after
        // an eviction's /free) it holds none, so its usage is its baseline.
        crate::pids::attach(&app, MODEL, h.epoch(), true).await;
    }
    let was_busy = {
        let mut i = app.comfy.lock();
        let was = i.busy;
        i.busy = true;
        i.forwarding += 1;
        was
    };
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
        let queued = r.as_ref().is_ok_and(|r| r.status().is_success());
        if queued {
            i.last_forwarded = Some(Instant::now());
        } else if i.forwarding == 0 {
            // ComfyUI did not queue it (unreachable, or it refused the
            // prompt): this prompt makes nothing busy.
            i.busy = was_busy;
        }
    }
    r
}

/// A protocol upgrade (ComfyUI's `/ws` WebSocket): the request is sent to
/// the upstream with its upgrade headers; if it answers `101`, the client's
/// connection and the upstream's are spliced byte for byte until either
/// side closes. Anything else is answered as ComfyUI answered it.
async fn tunnel(
    app: &Arc<AppState>,
    mut parts: axum::http::request::Parts,
) -> Result<Response, Error> {
    use axum::http::{HeaderMap, StatusCode, header};
    let on_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| Error::BadRequest("this connection cannot be upgraded".into()))?;
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{pq}", app.cfg.upstream);
    let mut headers = HeaderMap::new();
    for (k, v) in &parts.headers {
        if k != header::HOST && k != header::CONTENT_LENGTH {
            headers.append(k.clone(), v.clone());
        }
    }
    let resp = app
        .http()
        .request(parts.method.clone(), &url)
        .headers(headers)
        .send()
        .await
        .map_err(|e| Error::Upstream {
            upstream: app.cfg.upstream.clone(),
            message: e.to_string(),
        })?;
    let mut out = Response::builder().status(resp.status());
    if let Some(hs) = out.headers_mut() {
        for (k, v) in resp.headers() {
            hs.append(k.clone(), v.clone());
        }
    }
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let body = resp.bytes().await.unwrap_or_default();
        return out
            .body(Body::from(body))
            .map_err(|e| Error::Internal(format!("building the response: {e}")));
    }
    let upstream = resp.upgrade().await.map_err(|e| Error::Upstream {
        upstream: app.cfg.upstream.clone(),
        message: format!("upgrading {url}: {e}"),
    })?;
    let name = app.cfg.name.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(client) => {
                let mut client = hyper_util::rt::TokioIo::new(client);
                let mut upstream = upstream;
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(app = %name, error = %e, "upgraded connection ended");
                }
            }
            Err(e) => tracing::debug!(app = %name, error = %e, "the client's upgrade failed"),
        }
    });
    out.body(Body::empty())
        .map_err(|e| Error::Internal(format!("building the response: {e}")))
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
    match &q {
        Ok(_) => app.comfy.succeed("queue"),
        Err(e) => app.comfy.fail("queue", e),
    }
    if changed {
        tracing::debug!(app = %app.cfg.name, busy = app.comfy.busy(), "ComfyUI's queue changed");
        app.sync_idle(MODEL).await;
    }
    // The reservation's measured usage: the app's size.
    crate::pids::observe_peak(app, MODEL);
}

/// Evicting: waits until ComfyUI's queue is empty, calls `/free`, waits
/// until the memory is gone (all up to `until`).
pub(crate) async fn unload(
    app: &AppState,
    device: Option<u32>,
    until: Instant,
) -> crate::models::Unloaded {
    use crate::models::Unloaded;
    if crate::pids::unloaded_itself(app, device).await {
        tracing::info!(app = %app.cfg.name, "ComfyUI holds no models any more: nothing to free");
        app.attributed.forget();
        return Unloaded::Already;
    }
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
        .timeout(CALL_TIMEOUT.min(until.saturating_duration_since(Instant::now())))
        .send()
        .await;
    let failed = match sent {
        Ok(r) if r.status().is_success() => {
            app.comfy.succeed("free");
            tracing::info!(app = %app.cfg.name, "asked ComfyUI to free its memory");
            None
        }
        Ok(r) => Some(format!("{url} answered {}", r.status())),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = failed {
        tracing::warn!(app = %app.cfg.name, error = %why, "ComfyUI's /free failed");
        app.comfy.fail("free", &why);
        app.attributed.forget();
        return Unloaded::Failed(why);
    }
    let freed = match crate::pids::wait_freed(app, device, until).await {
        Some(freed) => freed,
        None => loop {
            if torch_vram(app, device)
                .await
                .is_some_and(|b| b <= FREED_SLACK_BYTES)
            {
                break true;
            }
            if Instant::now() >= until {
                break false;
            }
            tokio::time::sleep(EVICT_POLL).await;
        },
    };
    app.attributed.forget();
    if freed {
        app.comfy.succeed("eviction");
        tracing::info!(app = %app.cfg.name, "ComfyUI's memory is free");
        Unloaded::Freed
    } else {
        let why = "memory not freed by the eviction deadline";
        app.comfy.fail("eviction", why);
        tracing::warn!(app = %app.cfg.name, "ComfyUI still holds memory at the eviction deadline");
        Unloaded::Failed(why.into())
    }
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
