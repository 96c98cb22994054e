//! Forwarding: every request to an app's `listen` goes to its upstream,
//! bodies streamed both ways. Requests that make Ollama load a model first
//! get that model's reservation (see [`crate::models`]), held until the
//! response body ends or the client goes away.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, Request, header};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};

use crate::Error;
use crate::models::AppState;
use crate::ollama::{loads_model, parse_call};

/// Largest body of a model request the gateway reads (images in chats are
/// base64 inside the JSON).
pub const MAX_MODEL_BODY_BYTES: usize = 256 << 20;
/// Header that sets a request's priority in vramd's queue.
pub const PRIORITY_HEADER: &str = "x-vramd-priority";

/// The app's router: everything is forwarded.
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
    let path = parts.uri.path().to_string();
    if !loads_model(&parts.method, &path) {
        let stream = body.into_data_stream().map_err(std::io::Error::other);
        return send(
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
    let call = parse_call(&path, &bytes)?;
    let priority = match parts.headers.get(PRIORITY_HEADER) {
        None => app.cfg.priority,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| Error::BadRequest(format!("{PRIORITY_HEADER} must be an integer")))?,
    };
    app.metrics.request(&app.cfg.name, &call.model);
    let hold = if call.unload_only {
        None
    } else {
        app.acquire(&call, priority).await?
    };
    send(
        &app,
        &app.cfg.upstream,
        parts,
        reqwest::Body::from(bytes),
        hold,
    )
    .await
}

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1), plus those the
/// HTTP stacks set themselves.
fn hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    let listed = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()));
    listed
        || matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "host"
                | "content-length"
                | "x-vramd-priority"
        )
}

/// Forwards a request to `upstream` (a base URL) and streams the answer
/// back; `hold` lives as long as the answer's body.
pub(crate) async fn send(
    app: &Arc<AppState>,
    upstream: &str,
    parts: axum::http::request::Parts,
    body: reqwest::Body,
    hold: Option<crate::models::ModelUse>,
) -> Result<Response, Error> {
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{upstream}{pq}");
    let mut headers = HeaderMap::new();
    for (k, v) in &parts.headers {
        if !hop_by_hop(k, &parts.headers) {
            headers.append(k.clone(), v.clone());
        }
    }
    let resp = app
        .http()
        .request(parts.method, url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| Error::Upstream {
            upstream: upstream.to_string(),
            message: error_chain(&e),
        })?;
    let mut out = Response::builder().status(resp.status());
    let h = resp.headers().clone();
    if let Some(hs) = out.headers_mut() {
        for (k, v) in &h {
            if !hop_by_hop(k, &h) || k == header::CONTENT_LENGTH {
                hs.append(k.clone(), v.clone());
            }
        }
    }
    // The hold lives as long as the body stream: to its end, or until the
    // client disconnects and the stream is dropped.
    let stream = resp.bytes_stream().map(move |chunk| {
        let _keep = &hold;
        chunk.map_err(std::io::Error::other)
    });
    out.body(Body::from_stream(stream))
        .map_err(|e| Error::Internal(format!("building the response: {e}")))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
