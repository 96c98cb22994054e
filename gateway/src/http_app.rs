//! `kind = "http"`: any HTTP model service with load, unload and health
//! routes (a TTS server, a speech-to-text server, …), as one reservation.
//!
//! Requests whose path starts with one of the app's `routes` prefixes are
//! forwarded to the upstream (the path unchanged, bodies streamed both
//! ways); other paths are `404`. A request first takes the app's
//! reservation (labelled `<app>/app`, of its observed or declared size)
//! through vramd's queue when the app holds none; the reservation is busy
//! while requests run and idle 250 ms after the last.
//!
//! Lifecycle: the service is assumed loaded when the gateway starts. When
//! vramd evicts it, new requests wait, those in flight finish (up to the
//! deadline), the `unload` request is made, the gateway waits until the
//! app's attributed process gave the memory back (when one is attributed),
//! and releases. The first request after that reserves again, makes the
//! `load` request and waits until `health` answers 2xx (ensure-loaded,
//! bounded by `load_timeout`) before it is forwarded. The poller probes
//! `health` every poll interval; while it fails, requests are answered
//! `503` with a JSON error. An `always_on` app is reserved at the first
//! poll and never marked idle; an app without `unload` is never marked idle
//! either. `coexists_with` names apps never evicted for this one: while this
//! app waits in vramd's queue for its reservation, their reservations are
//! held busy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::Request;
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;

use crate::Error;
use crate::models::AppState;
use crate::ollama::ModelCall;
use crate::proxy::PRIORITY_HEADER;

/// The model name of an http app's one reservation (`<app>/app`).
pub const MODEL: &str = "app";
/// How often the wait for health after a load probes.
const HEALTH_POLL: Duration = Duration::from_millis(100);

/// What the gateway knows of one http app.
#[derive(Debug, Default)]
pub struct HttpApp {
    inner: Mutex<Inner>,
    /// The epoch of the reservation the app was last loaded for.
    loaded: tokio::sync::Mutex<Option<u64>>,
    /// An `always_on` reservation is being taken.
    reserving: AtomicBool,
    /// The gateway's other apps (for `coexists_with`).
    peers: std::sync::OnceLock<Vec<Weak<AppState>>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last health probe: `None` before the first (or with no
    /// `health`).
    healthy: Option<bool>,
    /// Evicted since its last load: the next reservation loads it.
    needs_load: bool,
    /// Coexisting apps waiting for their reservation now: this one is held
    /// busy meanwhile.
    held_for_peers: u32,
    /// The last failure and when (Unix milliseconds), kept until a later
    /// success of the same call.
    last_error: crate::last_error::LastError,
    /// Unloads asked and completed (memory seen freed, or nothing to watch).
    unloads: u64,
    /// Unloads that failed (refused, no answer by the deadline, memory not
    /// freed by the deadline).
    failed_unloads: u64,
    /// Evictions of an app that had unloaded itself already (no unload
    /// asked, not counted in `unloads`).
    already_unloaded: u64,
    /// Reservations released because the app unloaded itself while idle.
    self_unloads: u64,
    /// Loads made by `restore`.
    restores: u64,
}

impl HttpApp {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a coexisting app is waiting for its reservation (so this
    /// one must not be evicted now).
    pub fn held_for_peers(&self) -> bool {
        self.lock().held_for_peers > 0
    }

    /// Whether the last health probe answered 2xx.
    pub fn healthy(&self) -> bool {
        self.lock().healthy == Some(true)
    }

    /// Gives the app the gateway's other apps (once, at start).
    pub fn set_peers(&self, peers: Vec<Weak<AppState>>) {
        let _ = self.peers.set(peers);
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) {
        self.lock().last_error.fail(what, e);
    }

    /// A success of `what` clears a last error of `what` (only).
    fn succeed(&self, what: &str) {
        self.lock().last_error.succeed(what);
    }

    /// The last failure of the app's calls.
    pub(crate) fn last_error(&self) -> crate::last_error::LastError {
        self.lock().last_error.clone()
    }

    /// For `/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let i = self.lock();
        serde_json::json!({
            "healthy": i.healthy,
            "needs_load": i.needs_load,
            "held_for_peers": i.held_for_peers,
            "unloads": i.unloads,
            "failed_unloads": i.failed_unloads,
            "already_unloaded": i.already_unloaded,
            "self_unloads": i.self_unloads,
            "restores": i.restores,
            "last_error": i.last_error.message(),
            "last_error_at_ms": i.last_error.at_ms(),
        })
    }
}

/// The app's router: requests under its `routes` are forwarded.
pub fn router(app: Arc<AppState>) -> axum::Router {
    router_for(vec![app])
}

/// The router of `http` apps sharing one listen: a request goes to the app
/// with the longest of its `routes` prefixes that the path is under.
pub fn router_for(apps: Vec<Arc<AppState>>) -> axum::Router {
    axum::Router::new()
        .fallback(forward)
        .with_state(Arc::new(apps))
}

fn json_error(status: axum::http::StatusCode, message: String, retry: bool) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if retry {
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("5"),
        );
    }
    r
}

async fn forward(State(apps): State<Arc<Vec<Arc<AppState>>>>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_string();
    let best = apps
        .iter()
        .flat_map(|a| a.cfg.routes.iter().map(move |p| (a, p)))
        .filter(|(_, p)| under(&path, p))
        .max_by_key(|(_, p)| p.len())
        .map(|(a, _)| a.clone());
    let Some(app) = best else {
        let routes: Vec<String> = apps
            .iter()
            .flat_map(|a| {
                a.cfg
                    .routes
                    .iter()
                    .map(move |p| format!("{p} ({})", a.cfg.name))
            })
            .collect();
        return json_error(
            axum::http::StatusCode::NOT_FOUND,
            format!(
                "{path} is not routed to any app here (routes: {})",
                routes.join(", ")
            ),
            false,
        );
    };
    match handle(app, req).await {
        Ok(r) => r,
        Err(r) => r,
    }
}

fn under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix.trim_end_matches('/'))
            .is_some_and(|rest| rest.starts_with('/'))
}

async fn handle(app: Arc<AppState>, req: Request<Body>) -> Result<Response, Response> {
    let gateway_error = |e: Error| {
        tracing::info!(error = %e, "request answered by the gateway");
        e.into_response()
    };
    let (parts, body) = req.into_parts();
    if app.http_app.lock().healthy == Some(false) {
        let why = app
            .http_app
            .lock()
            .last_error
            .message()
            .unwrap_or_default()
            .to_string();
        return Err(json_error(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("app {:?} is unhealthy: {why}", app.cfg.name),
            true,
        ));
    }
    let priority = match parts.headers.get(PRIORITY_HEADER) {
        None => app.cfg.priority,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| {
                gateway_error(Error::BadRequest(format!(
                    "{PRIORITY_HEADER} must be an integer"
                )))
            })?,
    };
    app.metrics.request(&app.cfg.name, MODEL);
    let hold = acquire(&app, priority).await.map_err(gateway_error)?;
    if let Some(h) = &hold {
        let unloaded = app.http_app.lock().needs_load;
        crate::pids::attach(&app, MODEL, h.epoch(), unloaded).await;
        ensure_loaded(&app, h.epoch())
            .await
            .map_err(gateway_error)?;
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    crate::proxy::send(
        &app,
        &app.cfg.upstream,
        parts,
        reqwest::Body::wrap_stream(stream),
        hold,
    )
    .await
    .map_err(|e| {
        app.http_app.fail("forwarding", &e);
        gateway_error(e)
    })
}

/// Takes the app's reservation (waiting in vramd's queue when it holds
/// none); while it waits, the apps it coexists with are held busy.
async fn acquire(
    app: &Arc<AppState>,
    priority: i32,
) -> Result<Option<crate::models::ModelUse>, Error> {
    let call = ModelCall {
        model: MODEL.into(),
        keep_alive_secs: None,
        unload_only: false,
        num_ctx: None,
    };
    if app.reservation(MODEL).is_some() {
        return app.acquire(&call, priority).await;
    }
    let peers: Vec<Arc<AppState>> = app
        .http_app
        .peers
        .get()
        .into_iter()
        .flatten()
        .filter_map(Weak::upgrade)
        .filter(|p| {
            app.cfg.coexists_with.contains(&p.cfg.name)
                || p.cfg.coexists_with.contains(&app.cfg.name)
        })
        .collect();
    for p in &peers {
        p.http_app.lock().held_for_peers += 1;
        p.sync_idle(MODEL).await;
    }
    let r = app.acquire(&call, priority).await;
    for p in &peers {
        p.http_app.lock().held_for_peers -= 1;
        p.sync_idle(MODEL).await;
    }
    r
}

/// Before the first request of a reservation made after an eviction: the
/// `load` request, then `health` until it answers 2xx.
async fn ensure_loaded(app: &AppState, epoch: u64) -> Result<(), Error> {
    let mut loaded = app.http_app.loaded.lock().await;
    if *loaded == Some(epoch) {
        return Ok(());
    }
    if app.http_app.lock().needs_load {
        let until = Instant::now() + app.cfg.load_timeout;
        if let Some(load) = &app.cfg.load {
            tracing::info!(app = %app.cfg.name, url = %load.url, "loading (the app's load request)");
            if let Err(e) = crate::openai::request(app.http(), load).await {
                app.http_app.fail("load", &e);
                app.retry.failed(MODEL, false);
                return Err(e);
            }
        }
        if let Some(health) = &app.cfg.health {
            loop {
                match crate::openai::request(app.http(), health).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= until => {
                        app.http_app.fail("health after load", &e);
                        app.retry.failed(MODEL, false);
                        return Err(Error::Upstream {
                            upstream: app.cfg.upstream.clone(),
                            message: format!(
                                "not healthy within the load timeout ({} ms) after its load: {e}",
                                app.cfg.load_timeout.as_millis()
                            ),
                        });
                    }
                    Err(_) => tokio::time::sleep(HEALTH_POLL).await,
                }
            }
        }
        app.http_app.succeed("load");
        app.http_app.succeed("health after load");
        app.retry.succeeded(MODEL);
        app.http_app.lock().needs_load = false;
        tracing::info!(app = %app.cfg.name, "loaded");
    }
    *loaded = Some(epoch);
    Ok(())
}

/// `restore`: the app was evicted and vramd's queue is empty: its
/// reservation taken again try-once (never queued, evicting nothing), then
/// its load request and the wait for health; on failure the reservation is
/// released and a later poll tries again.
async fn restore(app: &Arc<AppState>) {
    let Some(bytes) = app
        .sizes
        .get(&format!("{}/{MODEL}", app.cfg.name))
        .or(app.cfg.size_bytes)
    else {
        return;
    };
    let Ok((generation, client)) = app.daemon.client().await else {
        return;
    };
    // vramd grants a try-once request that fits even while others wait:
    // the queue is read fresh right before asking.
    if !app.daemon.status().await.is_ok_and(|s| s.queue.is_empty()) {
        return;
    }
    let req = vramd_client::Request::new(bytes)
        .label(format!("{}/{MODEL}", app.cfg.name))
        .priority(app.cfg.priority)
        .evictable(true)
        .timeout(Duration::ZERO);
    let r = match client.reserve(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(app = %app.cfg.name, error = %e, "restore: no room now");
            return;
        }
    };
    if !app.adopt(MODEL, r, generation, false) {
        return;
    }
    let Some((epoch, _, _)) = app.reservation(MODEL) else {
        return;
    };
    tracing::info!(app = %app.cfg.name, bytes, "restoring: the room is back with nobody waiting");
    crate::pids::attach(app, MODEL, epoch, true).await;
    if let Err(e) = ensure_loaded(app, epoch).await {
        tracing::warn!(app = %app.cfg.name, error = %e, "restore failed; releasing (tried again after the backoff)");
        tokio::time::sleep(crate::models::IDLE_LINGER).await;
        if app.release_idle(MODEL, epoch, "its restore failed") {
            app.attributed.forget();
        }
        return;
    }
    app.http_app.lock().restores += 1;
}

/// Whether vramd may evict the app now.
pub(crate) fn may_be_idle(app: &AppState) -> bool {
    app.cfg.unload.is_some() && !app.cfg.always_on && !app.http_app.held_for_peers()
}

/// One poll: the health probe; an `always_on` app's reservation; the
/// measured peak.
pub(crate) async fn poll(app: &Arc<AppState>) {
    if let Some(health) = &app.cfg.health {
        let r = crate::openai::request(app.http(), health).await;
        if r.is_ok() {
            app.http_app.succeed("health");
        }
        let mut i = app.http_app.lock();
        match r {
            Ok(()) => {
                if i.healthy == Some(false) {
                    tracing::info!(app = %app.cfg.name, "healthy again");
                }
                i.healthy = Some(true);
            }
            Err(e) => {
                if i.healthy != Some(false) {
                    tracing::warn!(app = %app.cfg.name, error = %e, "unhealthy");
                }
                i.healthy = Some(false);
                i.last_error.fail("health", e);
            }
        }
    }
    if app.cfg.always_on
        && app.reservation(MODEL).is_none()
        && !app.http_app.reserving.swap(true, Ordering::SeqCst)
    {
        let app = app.clone();
        tokio::spawn(async move {
            match acquire(&app, app.cfg.priority).await {
                Ok(Some(h)) => {
                    crate::pids::attach(&app, MODEL, h.epoch(), false).await;
                    tracing::info!(app = %app.cfg.name, "always on: reserved");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(app = %app.cfg.name, error = %e, "always on: cannot reserve");
                    app.http_app.fail("reserving", &e);
                }
            }
            app.http_app.reserving.store(false, Ordering::SeqCst);
        });
    }
    if app.cfg.restore
        && app.http_app.lock().needs_load
        && !app.has_slot(MODEL)
        && app.retry.due(MODEL)
        && app.daemon.last_status().is_some_and(|s| s.queue.is_empty())
        && !app.http_app.reserving.swap(true, Ordering::SeqCst)
    {
        let app = app.clone();
        tokio::spawn(async move {
            restore(&app).await;
            app.http_app.reserving.store(false, Ordering::SeqCst);
        });
    }
    // An app that unloaded itself (its own idle timeout) is released, so
    // vramd never picks it as a victim for memory it does not hold; the
    // next request loads it again.
    if let Some((epoch, _, device)) = app.reservation(MODEL)
        && app.attributed.epoch() == Some(epoch)
        && !app.http_app.lock().needs_load
        && !app.cfg.always_on
        && crate::pids::freed_now(app, Some(device)).await == Some(true)
        && app.release_idle(MODEL, epoch, "the app unloaded itself")
    {
        app.attributed.forget();
        let mut i = app.http_app.lock();
        i.needs_load = true;
        i.self_unloads += 1;
        return;
    }
    crate::pids::observe_peak(app, MODEL);
}

/// Evicting: the `unload` request (bounded by the eviction deadline), then
/// (with an attributed process) the wait until its memory is back to the
/// baseline. An app whose memory is freed already is not asked (not a
/// completed unload); a refused or unanswered unload, or memory still in
/// use at the deadline, is a failure: the app stays loaded (retried after
/// the backoff, see `retry`).
pub(crate) async fn unload(
    app: &AppState,
    device: Option<u32>,
    until: Instant,
) -> crate::models::Unloaded {
    use crate::models::Unloaded;
    if crate::pids::unloaded_itself(app, device).await {
        // Nothing to free: not a completed unload.
        tracing::info!(app = %app.cfg.name, "the app had unloaded itself already: nothing to unload");
        app.attributed.forget();
        let mut i = app.http_app.lock();
        i.already_unloaded += 1;
        i.needs_load = true;
        return Unloaded::Already;
    }
    if let Some(call) = &app.cfg.unload {
        let why =
            match tokio::time::timeout_at(until.into(), crate::openai::request(app.http(), call))
                .await
            {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "{} {}: no answer by the eviction deadline",
                    call.method, call.url
                )),
            };
        if let Some(why) = why {
            tracing::warn!(app = %app.cfg.name, error = %why, "unload request failed");
            app.attributed.forget();
            let mut i = app.http_app.lock();
            i.failed_unloads += 1;
            i.last_error.fail("unload", &why);
            return Unloaded::Failed(why);
        }
        tracing::info!(app = %app.cfg.name, url = %call.url, "unload request accepted");
    }
    let outcome = match crate::pids::wait_freed(app, device, until).await {
        Some(true) | None => {
            app.http_app.succeed("unload");
            let mut i = app.http_app.lock();
            i.unloads += 1;
            i.needs_load = true;
            Unloaded::Freed
        }
        Some(false) => {
            let why = "accepted, but the memory was not freed by the eviction deadline";
            tracing::warn!(app = %app.cfg.name, "{why}");
            let mut i = app.http_app.lock();
            i.failed_unloads += 1;
            i.last_error.fail("unload", why);
            Unloaded::Failed(why.into())
        }
    };
    app.attributed.forget();
    outcome
}
