//! vramd-gateway: an HTTP gateway in front of apps that load models on
//! their own (Ollama, OpenAI-compatible servers: [`openai`], ComfyUI:
//! [`comfyui`]; model servers it starts itself: [`managed`]), which reserves a model's memory through vramd's
//! queue *before* forwarding a request that will load it, keeps one
//! reservation per resident model (busy while requests run, idle and
//! evictable between them), unloads a model through the app's API when
//! vramd asks for its memory back, and releases when the app unloads it by
//! itself. See docs/gateway.md.
//!
//! Lifecycle: [`run`] binds every listen address (failing fast), then runs
//! one server per app that has a `listen` (an app without one is only
//! watched: see `models::watch`), the admin server, one `/api/ps` poller per
//! app, a vramd watcher that reconnects by itself and the report of the
//! apps to vramd (`report`), until SIGINT or SIGTERM.

pub mod admin;
pub mod attribution;
pub mod comfyui;
pub mod command_app;
pub mod config;
pub mod daemon;
mod error;
pub mod http_app;
mod last_error;
pub mod managed;
pub mod metrics;
pub mod models;
pub mod ollama;
pub mod openai;
pub mod pids;
mod procfs;
pub mod proxy;
pub mod report;
pub mod retry;
pub mod sizes;

use std::sync::Arc;
use std::time::Duration;

pub use config::Settings;
pub use error::Error;

/// Runs the gateway until SIGINT or SIGTERM, or until a server fails.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let daemon = Arc::new(daemon::Daemon::new(settings.socket.clone()));
    let sizes = Arc::new(sizes::SizeStore::load(&settings.state_file));
    for app in &settings.apps {
        let one = match app.kind {
            config::Kind::ComfyUi => Some(comfyui::MODEL),
            config::Kind::Http => Some(http_app::MODEL),
            config::Kind::Command => Some(command_app::MODEL),
            _ => None,
        };
        if let Some(model) = one
            && app.size_bytes.is_none()
            && sizes.get(&format!("{}/{model}", app.name)).is_none()
        {
            return Err(Error::Config {
                file: settings.state_file.clone(),
                message: format!(
                    "app {:?}: size: required (the state file has no observed size for it)",
                    app.name
                ),
            });
        }
        let declared = app
            .models
            .iter()
            .map(|m| (&m.name, m.size_bytes))
            .chain(app.managed.iter().map(|m| (&m.name, m.size_bytes)));
        for (name, size_bytes) in declared {
            if size_bytes.is_none() && sizes.get(&format!("{}/{name}", app.name)).is_none() {
                return Err(Error::Config {
                    file: settings.state_file.clone(),
                    message: format!(
                        "app {:?}: model {:?}: size: required (the state file has no observed size for it)",
                        app.name, name
                    ),
                });
            }
        }
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Io {
            what: "building the HTTP client".into(),
            source: std::io::Error::other(e),
        })?;
    let bind = |addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })
    };
    let admin_listener = bind(settings.listen).await?;
    let mut apps: Vec<Arc<models::AppState>> = Vec::new();
    let mut servers = tokio::task::JoinSet::new();
    // One server per listen; `http` apps that share a listen are routed by
    // their prefixes (the config allows sharing among `http` apps only).
    let mut listens: Vec<(std::net::SocketAddr, Vec<Arc<models::AppState>>)> = Vec::new();
    for cfg in &settings.apps {
        let app = Arc::new(models::AppState::new(
            cfg.clone(),
            http.clone(),
            daemon.clone(),
            sizes.clone(),
            metrics.clone(),
        ));
        match cfg.listen {
            Some(addr) => {
                tracing::info!(app = %cfg.name, listen = %addr, upstream = %cfg.upstream, "serving");
                match listens.iter_mut().find(|(a, _)| *a == addr) {
                    Some((_, group)) => group.push(app.clone()),
                    None => listens.push((addr, vec![app.clone()])),
                }
            }
            None => {
                tracing::info!(app = %cfg.name, upstream = %cfg.upstream, "watching (no listen: resident models are mirrored as idle reservations)");
            }
        }
        apps.push(app);
    }
    for (addr, group) in listens {
        let listener = bind(addr).await?;
        let router = match group[0].cfg.kind {
            config::Kind::Ollama => proxy::router(group[0].clone()),
            config::Kind::OpenAi => openai::router(group[0].clone()),
            config::Kind::ComfyUi => comfyui::router(group[0].clone()),
            config::Kind::Http => http_app::router_for(group),
            // No listen (refused by the config check).
            config::Kind::Command => continue,
            config::Kind::Managed => openai::router(group[0].clone()),
        };
        servers.spawn(serve(listener, router));
    }
    for app in &apps {
        let poller = app.clone();
        every(settings.poll_interval, move || {
            let poller = poller.clone();
            async move { poller.poll().await }
        });
    }
    for app in &apps {
        app.http_app
            .set_peers(apps.iter().map(Arc::downgrade).collect());
    }
    let watcher = daemon.clone();
    every(settings.poll_interval, move || {
        let watcher = watcher.clone();
        async move {
            if let Err(e) = watcher.status().await {
                tracing::debug!(error = %e, "vramd not reachable; retrying");
            }
        }
    });
    // The apps, as vramd's status lists them (sent when they change).
    let reporter = Arc::new(report::Reporter::default());
    let (report_apps, report_daemon) = (apps.clone(), daemon.clone());
    every(settings.poll_interval, move || {
        let (reporter, apps, daemon) =
            (reporter.clone(), report_apps.clone(), report_daemon.clone());
        async move { reporter.tick(&apps, &daemon).await }
    });
    let managed_apps: Vec<Arc<models::AppState>> = apps
        .iter()
        .filter(|a| a.cfg.kind == config::Kind::Managed)
        .cloned()
        .collect();
    let admin = admin::router(admin::Admin {
        apps,
        daemon,
        metrics,
    });
    tracing::info!(listen = %settings.listen, state_file = %settings.state_file.display(), "gateway up");
    servers.spawn(serve(admin_listener, admin));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| Error::Io {
            what: "installing the SIGTERM handler".into(),
            source,
        })?;
    let stop_servers = || async {
        futures_util::future::join_all(managed_apps.iter().map(managed::stop_all)).await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: stopping");
            stop_servers().await;
        }
        _ = term.recv() => {
            tracing::info!("SIGTERM: stopping");
            stop_servers().await;
        }
        Some(r) = servers.join_next() => {
            let e = match r {
                Ok(Ok(())) => std::io::Error::other("a server stopped"),
                Ok(Err(e)) => e,
                Err(e) => std::io::Error::other(e),
            };
            return Err(Error::Io { what: "serving".into(), source: e });
        }
    }
    Ok(())
}

/// Runs `job` every `period` on a task of its own; a late tick is delayed,
/// never bunched.
fn every<F, Fut>(period: std::time::Duration, job: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            job().await;
        }
    });
}

/// Serves `router` on `listener` with `TCP_NODELAY` on every accepted
/// connection: without it a streamed answer's chunks (and a response written
/// in more than one piece) wait for the client's delayed ACK, 40 ms each on
/// Linux.
async fn serve(listener: tokio::net::TcpListener, router: axum::Router) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router).await
}
