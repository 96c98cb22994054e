//! `kind = "openai"`: any OpenAI-compatible server (vLLM, llama.cpp's
//! server, LocalAI), one or more per app, each model with its own upstream.
//!
//! Requests are routed by the JSON body's `model` (matched exactly against
//! the app's `[[app.model]]` names): `POST /v1/chat/completions`,
//! `/v1/completions` and `/v1/embeddings` reserve the model's size through
//! vramd (as for Ollama: reserve before forwarding, busy while a request
//! runs, idle after), then go to that model's upstream, answers streamed
//! back chunk by chunk (server-sent events included). `GET /v1/models` and
//! `GET /v1/models/{id}` are answered by the gateway from the config, in
//! the real API's shape. Everything the gateway itself answers with an
//! error is in OpenAI's error shape.
//!
//! Lifecycle of a model: the first request after a grant calls the model's
//! `load` request (if any) before it is forwarded; when vramd evicts the
//! model, requests in flight finish (up to the deadline), the `unload`
//! request is called, and the reservation is released (the server cannot be
//! watched: vramd grants the memory only once its readings show it free). A
//! model without `unload` is never marked idle, so never evicted: nothing
//! could free its memory.
//!
//! `kind = "managed"` apps use the same router (routes, `/v1/models`,
//! errors); their requests go through [`crate::managed::forward`], which
//! starts the model's server under its reservation before proxying.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::Error;
use crate::config::Call;
use crate::models::AppState;
use crate::ollama::{CALL_TIMEOUT, ModelCall};
use crate::proxy::{MAX_MODEL_BODY_BYTES, PRIORITY_HEADER};

/// The routes whose requests name a model to route by.
pub const MODEL_ROUTES: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// An `openai` app's router state.
#[derive(Debug)]
struct OpenAi {
    app: Arc<AppState>,
    /// Per model, the epoch of the reservation its `load` request was last
    /// made for (so it is made once per reservation).
    loaded: tokio::sync::Mutex<HashMap<String, u64>>,
}

/// The app's router.
pub fn router(app: Arc<AppState>) -> axum::Router {
    let state = Arc::new(OpenAi {
        app,
        loaded: tokio::sync::Mutex::new(HashMap::new()),
    });
    axum::Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{*id}", get(one))
        .fallback(forward)
        .with_state(state)
}

/// An error in OpenAI's shape:
/// `{"error": {"message", "type", "param", "code"}}`.
pub fn error(
    status: StatusCode,
    message: String,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let kind = match status.as_u16() {
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body =
        json!({ "error": { "message": message, "type": kind, "param": param, "code": code } });
    (status, axum::Json(body)).into_response()
}

fn from_error(e: Error) -> Response {
    tracing::info!(error = %e, "request answered by the gateway");
    let retry = matches!(e, Error::WaitTimeout { .. } | Error::DaemonDown { .. });
    let mut r = error(e.status(), e.to_string(), None, None);
    if retry {
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("5"),
        );
    }
    r
}

fn not_found(model: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("The model `{model}` does not exist or you do not have access to it."),
        Some("model"),
        Some("model_not_found"),
    )
}

fn model_object(app: &AppState, name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": 0, "owned_by": app.cfg.name })
}

async fn list(State(s): State<Arc<OpenAi>>) -> Response {
    let data: Vec<Value> = s
        .app
        .cfg
        .model_names()
        .into_iter()
        .map(|m| model_object(&s.app, m))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

async fn one(State(s): State<Arc<OpenAi>>, Path(id): Path<String>) -> Response {
    match s.app.cfg.model_names().into_iter().find(|m| *m == id) {
        Some(m) => axum::Json(model_object(&s.app, m)).into_response(),
        None => not_found(&id),
    }
}

async fn forward(State(s): State<Arc<OpenAi>>, req: Request<Body>) -> Response {
    match handle(&s, req).await {
        Ok(r) => r,
        Err(r) => r,
    }
}

async fn handle(s: &OpenAi, req: Request<Body>) -> Result<Response, Response> {
    let app = &s.app;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if parts.method != Method::POST || !MODEL_ROUTES.contains(&path.as_str()) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "{} {path} is not served by vramd-gateway for this app; it serves GET /v1/models and POST {}",
                parts.method,
                MODEL_ROUTES.join(", ")
            ),
            None,
            Some("unknown_url"),
        ));
    }
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m, None, None);
    let bytes = axum::body::to_bytes(body, MAX_MODEL_BODY_BYTES)
        .await
        .map_err(|e| bad(format!("cannot read the request body: {e}")))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))?;
    let name = match v.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "you must provide a model parameter".into(),
                Some("model"),
                None,
            ));
        }
        Some(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "model must be a string".into(),
                Some("model"),
                None,
            ));
        }
    };
    let model = app.cfg.model(&name);
    if model.is_none() && app.cfg.managed_model(&name).is_none() {
        return Err(not_found(&name));
    }
    let priority = match parts.headers.get(PRIORITY_HEADER) {
        None => app.cfg.priority,
        Some(h) => h
            .to_str()
            .ok()
            .and_then(|x| x.trim().parse::<i32>().ok())
            .ok_or_else(|| bad(format!("{PRIORITY_HEADER} must be an integer")))?,
    };
    app.metrics.request(&app.cfg.name, &name);
    let Some(model) = model else {
        return crate::managed::forward(app, &name, parts, bytes, priority)
            .await
            .map_err(from_error);
    };
    let call = ModelCall {
        model: name.clone(),
        keep_alive_secs: None,
        unload_only: false,
        num_ctx: None,
    };
    let hold = app.acquire(&call, priority).await.map_err(from_error)?;
    if let (Some(h), Some(load)) = (&hold, &model.load) {
        let mut loaded = s.loaded.lock().await;
        if loaded.get(&name) != Some(&h.epoch()) {
            tracing::info!(app = %app.cfg.name, model = %name, url = %load.url, "loading (the model's load request)");
            request(app.http(), load).await.map_err(from_error)?;
            loaded.insert(name.clone(), h.epoch());
        }
    }
    crate::proxy::send(
        app,
        &model.upstream,
        parts,
        reqwest::Body::from(bytes),
        hold,
    )
    .await
    .map_err(from_error)
}

/// Makes one of the config's requests; a non-2xx answer is an error.
pub async fn request(http: &reqwest::Client, call: &Call) -> Result<(), Error> {
    let down = |m: String| Error::Upstream {
        upstream: call.url.clone(),
        message: m,
    };
    let method = reqwest::Method::from_bytes(call.method.as_bytes())
        .map_err(|e| Error::Internal(format!("method {:?}: {e}", call.method)))?;
    let mut req = http.request(method, &call.url).timeout(CALL_TIMEOUT);
    if let Some(body) = &call.body {
        if serde_json::from_str::<Value>(body).is_ok() {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
        }
        req = req.body(body.clone());
    }
    let resp = req.send().await.map_err(|e| down(e.to_string()))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        let text: String = text.chars().take(200).collect();
        Err(down(format!(
            "{} {} answered {status}: {text}",
            call.method, call.url
        )))
    }
}

/// Evicting `model`: calls its `unload` request, bounded by the eviction
/// deadline `until` (a model without one is never idle, so never evicted;
/// if vramd asks anyway, nothing is called).
pub(crate) async fn unload(
    app: &AppState,
    model: &str,
    until: std::time::Instant,
) -> crate::models::Unloaded {
    use crate::models::Unloaded;
    let Some(call) = app.cfg.model(model).and_then(|m| m.unload.as_ref()) else {
        tracing::warn!(app = %app.cfg.name, model, "no unload request configured: releasing without unloading");
        return Unloaded::Already;
    };
    let why = match tokio::time::timeout_at(until.into(), request(app.http(), call)).await {
        Ok(Ok(())) => {
            tracing::info!(app = %app.cfg.name, model, url = %call.url, "unload request accepted");
            app.retry.succeed(&format!("unload {model}"));
            return Unloaded::Freed;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer by the eviction deadline".to_string(),
    };
    tracing::warn!(app = %app.cfg.name, model, error = %why, "unload request failed");
    app.retry.fail(&format!("unload {model}"), &why);
    Unloaded::Failed(why)
}
