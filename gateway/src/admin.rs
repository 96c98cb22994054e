//! The gateway's own listen: `GET /status`, `GET /metrics`, `GET /healthz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::daemon::Daemon;
use crate::metrics::Metrics;
use crate::models::AppState;

/// What the admin routes read.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Every app.
    pub apps: Vec<Arc<AppState>>,
    /// The connection to vramd.
    pub daemon: Arc<Daemon>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// The admin router.
pub fn router(admin: Admin) -> axum::Router {
    axum::Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(admin)
}

async fn status(State(a): State<Admin>) -> impl IntoResponse {
    let daemon = a.daemon.status().await;
    let apps: Vec<_> = a
        .apps
        .iter()
        .map(|app| {
            let sizes: serde_json::Map<String, serde_json::Value> = app
                .sizes
                .all()
                .into_iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&format!("{}/", app.cfg.name))
                        .map(|m| (m.to_string(), v.into()))
                })
                .collect();
            let mut v = serde_json::json!({
                "name": app.cfg.name,
                "kind": app.cfg.kind,
                "upstream": app.cfg.upstream,
                "listen": app.cfg.listen.map(|l| l.to_string()),
                "watched": app.cfg.listen.is_none(),
                "priority": app.cfg.priority,
                "upstream_up": app.last_ps().is_some() || app.comfy.up() || app.http_app.healthy(),
                "comfyui": (app.cfg.kind == crate::config::Kind::ComfyUi).then(|| app.comfy.status_json()),
                "attributed": app.attributed.status_json(),
                "http": (app.cfg.kind == crate::config::Kind::Http).then(|| app.http_app.status_json()),
                "command": (app.cfg.kind == crate::config::Kind::Command).then(|| app.command.status_json()),
                "managed": (app.cfg.kind == crate::config::Kind::Managed).then(|| app.managed.status_json(&app.cfg)),
                "models": app.models(),
                "loaded": app.last_ps().unwrap_or_default().iter().map(|r| serde_json::json!({
                    "name": r.name, "size_bytes": r.size, "size_vram_bytes": r.size_vram,
                    "expires_at": r.expires_at,
                })).collect::<Vec<_>>(),
                "observed_size_bytes": sizes,
                "attribution": app.attribution.report(),
            });
            // Failures: `last_error`, `failures`, `failed_unloads`,
            // `next_retry_in_ms`, `retries`.
            if let (Some(v), serde_json::Value::Object(f)) = (v.as_object_mut(), app.failures_json()) {
                v.extend(f);
            }
            v
        })
        .collect();
    axum::Json(serde_json::json!({
        "daemon": {
            "socket": a.daemon.socket().display().to_string(),
            "connected": daemon.is_ok(),
            "error": daemon.as_ref().err().map(ToString::to_string),
            "devices": daemon.as_ref().ok().map(|s| s.devices.iter().map(|d| serde_json::json!({
                "index": d.index, "total_bytes": d.total_bytes, "used_bytes": d.used_bytes,
                "reserved_bytes": d.reserved_bytes, "available_bytes": d.available_bytes,
            })).collect::<Vec<_>>()),
        },
        "apps": apps,
    }))
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    let status = a.daemon.status().await.ok();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        a.metrics.encode(status.as_ref()),
    )
}

async fn healthz(State(a): State<Admin>) -> impl IntoResponse {
    let daemon = a.daemon.connected().await;
    axum::Json(serde_json::json!({ "ok": true, "daemon_connected": daemon }))
}
