//! `kind = "managed"`: model servers the gateway starts itself, one per
//! model, each under the model's reservation (what llama-swap does, with
//! vramd deciding where and when memory is free).
//!
//! Lifecycle of a model: a request for it (routed by the body's `model`,
//! as for `openai` apps) reserves its size through vramd's queue, as every
//! kind does. Once granted, and if its server is not running, the gateway
//! stops the app's running models that share no group with it (their
//! requests in flight get up to `stop_timeout`), picks a free loopback port
//! for `${PORT}`, and starts the model's `cmd` (no shell; its own process
//! group; `CUDA_VISIBLE_DEVICES` naming the granted device; with
//! `enforce = true`, capped at the reservation through NVIDIA MPS). The
//! server's process (and so its descendants) is attributed to the
//! reservation with `attach_pids`; the gateway waits until its health path
//! answers 2xx (up to `start_timeout`), then forwards requests (streams
//! pass through). The reservation is busy while requests run, idle (and
//! evictable) between them.
//!
//! A server is stopped — `SIGTERM` to its process group, `SIGKILL` after
//! `stop_timeout`, then a wait until vramd's readings show its memory gone
//! (bounded) — when vramd evicts its model, when it has been idle for its
//! `ttl`, when a model it shares no group with starts, when its reservation
//! is gone (the connection to vramd was lost), and when the gateway stops
//! (SIGINT, SIGTERM); only then is the reservation released. A server that
//! exits by itself releases its reservation at once and leaves its exit
//! status as the model's `last_error`; the next request starts it again.
//! A server that fails to start (exits, or no 2xx from its health path in
//! time) is stopped, its reservation released, and the request answered
//! `503`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::response::Response;
use tokio::sync::watch;

use crate::Error;
use crate::config::ManagedModel;
use crate::last_error::{LastError, now_ms};
use crate::models::AppState;
use crate::ollama::ModelCall;

/// How often a starting server's health path is asked.
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// Longest one health request may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the gateway waits for a process group to go after `SIGKILL`.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a stop re-reads vramd's status while the memory is not gone.
const FREED_POLL: Duration = Duration::from_millis(100);
/// How many times a request takes its model's reservation again when the
/// server it was granted for was stopped before it could use it.
const TRIES: usize = 3;

/// Where a model's server stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerPhase {
    /// Started; its health path has not answered 2xx yet.
    Starting,
    /// Healthy; requests are forwarded to it.
    Running,
    /// Being stopped.
    Stopping,
}

/// The `managed` side of an app: its models' servers.
#[derive(Debug, Default)]
pub struct Managed {
    inner: Mutex<HashMap<String, ModelState>>,
    /// One start (with the stops it needs) at a time per app.
    swap: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct ModelState {
    server: Option<Server>,
    last_error: LastError,
    starts: u64,
    failed_starts: u64,
    stops: u64,
    exits: u64,
    /// Largest usage vramd measured for the current server's reservation.
    peak_bytes: u64,
}

#[derive(Debug)]
struct Server {
    /// The slot (reservation) it was started for.
    epoch: u64,
    pid: u32,
    port: Option<u16>,
    base: String,
    phase: ServerPhase,
    started_at_ms: u64,
    reservation_id: u64,
    device: u32,
    enforced_limit_bytes: Option<u64>,
    /// Its exit is expected (a stop sent it a signal).
    stopping: bool,
    /// Its exit status, once it exited.
    exited: watch::Receiver<Option<String>>,
}

impl Managed {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, ModelState>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest failure of any of its models' servers, the model named
    /// first (what vramd's status shows for the app).
    pub(crate) fn last_error(&self) -> LastError {
        self.lock()
            .iter()
            .filter_map(|(model, st)| Some((st.last_error.at_ms()?, model, &st.last_error)))
            .max_by_key(|(at, model, _)| (*at, (*model).clone()))
            .map(|(_, model, e)| e.about(model))
            .unwrap_or_default()
    }

    /// For `/status`: per model of `app`, its server (`pid`, `port`,
    /// `phase`: `stopped`, `starting`, `running` or `stopping`), counters
    /// and last error.
    pub fn status_json(&self, app: &crate::config::App) -> serde_json::Value {
        let inner = self.lock();
        let models: Vec<serde_json::Value> = app
            .managed
            .iter()
            .map(|m| {
                let st = inner.get(&m.name);
                let server = st.and_then(|s| s.server.as_ref());
                let phase = server.map_or("stopped", |s| match s.phase {
                    ServerPhase::Starting => "starting",
                    ServerPhase::Running => "running",
                    ServerPhase::Stopping => "stopping",
                });
                serde_json::json!({
                    "model": m.name,
                    "phase": phase,
                    "pid": server.map(|s| s.pid),
                    "port": server.and_then(|s| s.port),
                    "url": server.map(|s| s.base.clone()),
                    "reservation_id": server.map(|s| s.reservation_id),
                    "device": server.map(|s| s.device),
                    "started_at_ms": server.map(|s| s.started_at_ms),
                    "enforced_limit_bytes": server.and_then(|s| s.enforced_limit_bytes),
                    "peak_bytes": st.map_or(0, |s| s.peak_bytes),
                    "ttl_ms": m.ttl.map(|t| t.as_millis() as u64),
                    "starts": st.map_or(0, |s| s.starts),
                    "failed_starts": st.map_or(0, |s| s.failed_starts),
                    "stops": st.map_or(0, |s| s.stops),
                    "exits": st.map_or(0, |s| s.exits),
                    "last_error": st.and_then(|s| s.last_error.message().map(str::to_string)),
                    "last_error_at_ms": st.and_then(|s| s.last_error.at_ms()),
                })
            })
            .collect();
        serde_json::json!({ "models": models })
    }

    /// The base URL of `model`'s server if it runs for the slot `epoch`.
    fn running(&self, model: &str, epoch: u64) -> Option<String> {
        self.lock()
            .get(model)
            .and_then(|s| s.server.as_ref())
            .filter(|s| s.epoch == epoch && s.phase == ServerPhase::Running)
            .map(|s| s.base.clone())
    }

    /// The slot epoch of `model`'s server, if one exists.
    fn server_epoch(&self, model: &str) -> Option<u64> {
        self.lock()
            .get(model)
            .and_then(|s| s.server.as_ref())
            .map(|s| s.epoch)
    }
}

/// Why [`ensure_running`] gave no server.
enum NotRunning {
    /// The reservation it was asked for is gone (stopped for another
    /// model, evicted): take the model's reservation again.
    Gone,
    /// The server failed to start.
    Failed(Error),
}

/// Forwards a request for `model` (a `managed` model of `app`): takes its
/// reservation, starts its server if needed, and proxies the request.
pub(crate) async fn forward(
    app: &Arc<AppState>,
    model: &str,
    parts: axum::http::request::Parts,
    body: axum::body::Bytes,
    priority: i32,
) -> Result<Response, Error> {
    let Some(m) = app.cfg.managed_model(model) else {
        return Err(Error::Internal(format!("{model} is not a managed model")));
    };
    let call = ModelCall {
        model: model.to_string(),
        keep_alive_secs: None,
        unload_only: false,
        num_ctx: None,
    };
    for _ in 0..TRIES {
        let Some(hold) = app.acquire(&call, priority).await? else {
            return Err(Error::Internal(format!("no size for {model}")));
        };
        match ensure_running(app, m, hold.epoch()).await {
            Ok(base) => {
                return crate::proxy::send(
                    app,
                    &base,
                    parts,
                    reqwest::Body::from(body),
                    Some(hold),
                )
                .await;
            }
            Err(NotRunning::Gone) => continue,
            Err(NotRunning::Failed(e)) => return Err(e),
        }
    }
    Err(Error::ServerStart {
        model: model.to_string(),
        message: format!(
            "it was stopped {TRIES} times before this request could use it (another model of a different group kept taking its place); try again"
        ),
    })
}

/// The base URL of `m`'s server running for the reservation of `epoch`,
/// started now if it is not running.
async fn ensure_running(
    app: &Arc<AppState>,
    m: &ManagedModel,
    epoch: u64,
) -> Result<String, NotRunning> {
    let name = m.name.as_str();
    if let Some(base) = app.managed.running(name, epoch) {
        return Ok(base);
    }
    let _one = app.managed.swap.lock().await;
    if let Some(base) = app.managed.running(name, epoch) {
        return Ok(base);
    }
    let Some((e, res, device)) = app.reservation(name) else {
        return Err(NotRunning::Gone);
    };
    if e != epoch {
        return Err(NotRunning::Gone);
    }
    let stop_timeout = app.cfg.stop_timeout;
    let stop_until = || Instant::now() + stop_timeout * 2 + KILL_WAIT;
    // A server left from an earlier reservation of this model (its
    // reservation went with a lost connection to vramd).
    if app.managed.server_epoch(name).is_some_and(|e| e != epoch) {
        stop_server(app, name, stop_until(), "stale").await;
    }
    // Models that may not run beside this one.
    for other in &app.cfg.managed {
        if other.name == name || app.cfg.may_run_together(name, &other.name) {
            continue;
        }
        if let Some(oe) = app.slot_epoch(&other.name) {
            let now = Instant::now();
            app.stop_model(
                &other.name,
                oe,
                now + stop_timeout,
                stop_until(),
                false,
                "swap",
            )
            .await;
        }
        if app.managed.server_epoch(&other.name).is_some() && app.slot_epoch(&other.name).is_none()
        {
            stop_server(app, &other.name, stop_until(), "swap").await;
        }
    }
    match start(app, m, epoch, &res, device).await {
        Ok(base) => Ok(base),
        Err(message) => {
            tracing::warn!(app = %app.cfg.name, model = name, error = %message, "the model's server failed to start");
            stop_server(app, name, stop_until(), "failed_start").await;
            {
                let mut inner = app.managed.lock();
                let st = inner.entry(name.to_string()).or_default();
                st.failed_starts += 1;
                st.last_error.fail("start", &message);
            }
            app.forget(name, epoch, "its server failed to start");
            Err(NotRunning::Failed(Error::ServerStart {
                model: name.to_string(),
                message,
            }))
        }
    }
}

/// A loopback port free right now.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// `text` with `${PORT}`, `${MODEL}` and `${DEVICE}` replaced.
pub fn expand(text: &str, port: Option<u16>, model: &str, device: u32) -> String {
    let mut s = text
        .replace("${MODEL}", model)
        .replace("${DEVICE}", &device.to_string());
    if let Some(p) = port {
        s = s.replace("${PORT}", &p.to_string());
    }
    s
}

/// `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` for a reservation of `bytes` on the
/// one device the server sees: `("0=<MiB>M", the limit in bytes)`, in
/// whole MiB rounded down so the cap never exceeds the reservation.
pub fn pinned_limit(bytes: u64) -> (String, u64) {
    let mib = bytes / (1024 * 1024);
    (format!("0={mib}M"), mib * 1024 * 1024)
}

/// The MPS server `enforce` runs under: the app's `mps_pipe_dir`, else the
/// one vramd reports; checked usable.
async fn mps_server(app: &AppState) -> Result<(String, Option<String>), String> {
    let (pipe, log) = match &app.cfg.mps_pipe_dir {
        Some(d) => (
            d.display().to_string(),
            app.cfg
                .mps_log_dir
                .as_ref()
                .map(|l| l.display().to_string()),
        ),
        None => {
            let s = app
                .daemon
                .status()
                .await
                .map_err(|e| format!("enforce: cannot ask vramd for its MPS server: {e}"))?;
            match s.mps {
                Some(m) => (
                    m.pipe_dir,
                    app.cfg
                        .mps_log_dir
                        .as_ref()
                        .map(|l| l.display().to_string())
                        .or(m.log_dir),
                ),
                None => {
                    return Err(
                        "enforce = true needs an NVIDIA MPS server and vramd reports none: start vramd with --mps, or set the app's mps_pipe_dir; the server was not started"
                            .into(),
                    );
                }
            }
        }
    };
    if let Some(why) = vramd_protocol::mps::control_problem(std::path::Path::new(&pipe)) {
        return Err(format!(
            "enforce: no usable MPS server at {pipe}: {why}; the server was not started"
        ));
    }
    Ok((pipe, log))
}

/// Starts `m`'s server for the reservation `res` (slot `epoch`) on
/// `device` and waits until it is healthy; its base URL, or why not.
async fn start(
    app: &Arc<AppState>,
    m: &ManagedModel,
    epoch: u64,
    res: &Arc<vramd_client::Reservation>,
    device: u32,
) -> Result<String, String> {
    let name = m.name.as_str();
    let port = if m.uses_port() {
        Some(free_port()?)
    } else {
        None
    };
    let argv: Vec<String> = m
        .argv
        .iter()
        .map(|w| expand(w, port, name, device))
        .collect();
    let base = expand(&m.proxy, port, name, device);
    let uuid = res.device_uuid().to_string();
    // CUDA accepts GPU-/MIG- UUIDs, which stay right whatever the order.
    let visible = if uuid.starts_with("GPU-") || uuid.starts_with("MIG-") {
        uuid.clone()
    } else {
        device.to_string()
    };
    let mut env: Vec<(String, String)> = vec![
        ("CUDA_VISIBLE_DEVICES".into(), visible),
        ("VRAMD_RESERVATION".into(), res.id().to_string()),
        ("VRAMD_DEVICE".into(), device.to_string()),
        ("VRAMD_DEVICE_UUID".into(), uuid),
        ("VRAMD_BYTES".into(), res.bytes().to_string()),
    ];
    env.extend(
        m.env
            .iter()
            .map(|(k, v)| (k.clone(), expand(v, port, name, device))),
    );
    let mut enforced_limit_bytes = None;
    if m.enforce {
        let (pipe, log) = mps_server(app).await?;
        let (limit, limit_bytes) = pinned_limit(res.bytes());
        env.push(("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".into(), limit));
        env.push(("CUDA_MPS_PIPE_DIRECTORY".into(), pipe));
        if let Some(l) = log {
            env.push(("CUDA_MPS_LOG_DIRECTORY".into(), l));
        }
        let r = res.clone();
        match tokio::task::spawn_blocking(move || r.set_enforced(limit_bytes, "mps")).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(app = %app.cfg.name, model = name, error = %e, "vramd did not record the enforcement; the server is capped all the same")
            }
            Err(e) => tracing::warn!(error = %e, "set_enforced task failed"),
        }
        enforced_limit_bytes = Some(limit_bytes);
    }
    let (program, args) = argv.split_first().ok_or("cmd names no program")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .process_group(0);
    // The server's output goes where the gateway's log goes.
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        cmd.stdout(std::process::Stdio::from(fd));
    }
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(|| {
            // The server gets SIGTERM if the gateway dies without stopping
            // it (SIGKILL). Set from a runtime worker thread, which lives as
            // long as the gateway.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("the gateway is gone"));
            }
            Ok(())
        });
    }
    tracing::info!(app = %app.cfg.name, model = name, ?argv, url = %base, device, "starting the model's server");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let Some(pid) = child.id() else {
        let status = child
            .wait()
            .await
            .map(|s| s.to_string())
            .unwrap_or_default();
        return Err(format!("{program:?} exited at once ({status})"));
    };
    let (tx, exited) = watch::channel(None);
    {
        let mut inner = app.managed.lock();
        let st = inner.entry(name.to_string()).or_default();
        st.starts += 1;
        st.peak_bytes = 0;
        st.server = Some(Server {
            epoch,
            pid,
            port,
            base: base.clone(),
            phase: ServerPhase::Starting,
            started_at_ms: now_ms(),
            reservation_id: res.id().0,
            device,
            enforced_limit_bytes,
            stopping: false,
            exited: exited.clone(),
        });
    }
    app.metrics.server_start(&app.cfg.name, name);
    {
        let app = app.clone();
        let model = name.to_string();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            let _ = tx.send(Some(status.clone()));
            let unexpected = {
                let mut inner = app.managed.lock();
                let st = inner.entry(model.clone()).or_default();
                match &st.server {
                    Some(s) if s.pid == pid && !s.stopping => {
                        let epoch = s.epoch;
                        st.server = None;
                        st.exits += 1;
                        st.last_error
                            .fail("server", format!("exited by itself: {status}"));
                        Some(epoch)
                    }
                    _ => None,
                }
            };
            if let Some(epoch) = unexpected {
                tracing::warn!(app = %app.cfg.name, model, pid, %status, "the model's server exited by itself");
                // Whatever it started is stopped too.
                signal_group(pid, libc::SIGKILL);
                app.metrics.server_stop(&app.cfg.name, &model, "exited");
                app.forget(&model, epoch, "its server exited");
            } else {
                tracing::info!(app = %app.cfg.name, model, pid, %status, "the model's server exited");
            }
        });
    }
    // The server and everything it starts count against the reservation.
    let r = res.clone();
    match tokio::task::spawn_blocking(move || r.attach_pids(&[pid])).await {
        Ok(Ok(_)) => {
            tracing::info!(app = %app.cfg.name, model = name, pid, "attributed the server to its reservation")
        }
        Ok(Err(e)) => {
            tracing::warn!(app = %app.cfg.name, model = name, pid, error = %e, "vramd refused to attribute the server: its memory stays unattributed")
        }
        Err(e) => tracing::warn!(error = %e, "attach task failed"),
    }
    wait_healthy(app, m, &base, exited).await?;
    let mut inner = app.managed.lock();
    let st = inner.entry(name.to_string()).or_default();
    if let Some(s) = st.server.as_mut().filter(|s| s.pid == pid) {
        s.phase = ServerPhase::Running;
    }
    st.last_error.succeed("start");
    st.last_error.succeed("server");
    tracing::info!(app = %app.cfg.name, model = name, pid, url = %base, "the model's server is up");
    Ok(base)
}

/// Waits until `base` + the health path answers 2xx (at once without one),
/// up to the app's `start_timeout`; `Err` if the server exits first.
async fn wait_healthy(
    app: &AppState,
    m: &ManagedModel,
    base: &str,
    mut exited: watch::Receiver<Option<String>>,
) -> Result<(), String> {
    let started = Instant::now();
    let until = started + app.cfg.start_timeout;
    let Some(path) = &m.health else {
        return match exited.borrow().as_ref() {
            Some(status) => Err(format!("the server exited while starting ({status})")),
            None => Ok(()),
        };
    };
    let url = format!("{base}{path}");
    let mut last = String::from("no answer yet");
    loop {
        if let Some(status) = exited.borrow().as_ref() {
            return Err(format!(
                "the server exited while starting ({status}); last health check: {last}"
            ));
        }
        match app.http().get(&url).timeout(HEALTH_TIMEOUT).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("GET {url} answered {}", r.status()),
            Err(e) => last = format!("GET {url}: {e}"),
        }
        if Instant::now() >= until {
            return Err(format!(
                "not healthy within start_timeout ({} ms): {last}",
                app.cfg.start_timeout.as_millis()
            ));
        }
        let _ = tokio::time::timeout_at(
            (Instant::now() + HEALTH_POLL).min(until).into(),
            exited.changed(),
        )
        .await;
    }
}

/// Sends `sig` to the process group `pgid` (the server's pid).
fn signal_group(pgid: u32, sig: libc::c_int) -> bool {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return false;
    };
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(-pgid, sig) == 0 }
}

/// Waits until `exited` holds a status, up to `until`; whether it did.
async fn wait_exit(exited: &mut watch::Receiver<Option<String>>, until: Instant) -> bool {
    tokio::time::timeout_at(until.into(), exited.wait_for(Option::is_some))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Stops `model`'s server, if one runs: `SIGTERM` to its process group,
/// `SIGKILL` after the app's `stop_timeout` (both bounded by `until`), then
/// waits (until `until`) until vramd's readings show no memory left for its
/// reservation. `why` labels the stop in the log and `/metrics`.
pub(crate) async fn stop_server(app: &AppState, model: &str, until: Instant, why: &str) {
    let (pid, mut exited, reservation_id, device) = {
        let mut inner = app.managed.lock();
        let Some(s) = inner.get_mut(model).and_then(|st| st.server.as_mut()) else {
            return;
        };
        s.stopping = true;
        s.phase = ServerPhase::Stopping;
        (s.pid, s.exited.clone(), s.reservation_id, s.device)
    };
    tracing::info!(app = %app.cfg.name, model, pid, why, "stopping the model's server (SIGTERM)");
    signal_group(pid, libc::SIGTERM);
    let term_until = (Instant::now() + app.cfg.stop_timeout).min(until);
    if !wait_exit(&mut exited, term_until).await {
        tracing::warn!(app = %app.cfg.name, model, pid, "still running after SIGTERM: SIGKILL");
        signal_group(pid, libc::SIGKILL);
        if !wait_exit(&mut exited, Instant::now() + KILL_WAIT).await {
            tracing::error!(app = %app.cfg.name, model, pid, "still running after SIGKILL");
        }
    }
    // What the server started and left behind in its group.
    signal_group(pid, libc::SIGKILL);
    // Released only once the memory is gone (where vramd can read it).
    loop {
        let left = app.daemon.status().await.ok().map(|s| {
            s.processes
                .iter()
                .filter(|p| {
                    p.device == device && p.reservation.map(|r| r.0) == Some(reservation_id)
                })
                .map(|p| p.bytes)
                .sum::<u64>()
        });
        if left.is_none_or(|b| b == 0) {
            break;
        }
        if Instant::now() >= until {
            tracing::warn!(app = %app.cfg.name, model, left_bytes = ?left, "the server's memory is not freed by the deadline; releasing anyway");
            break;
        }
        tokio::time::sleep(FREED_POLL).await;
    }
    {
        let mut inner = app.managed.lock();
        if let Some(st) = inner.get_mut(model) {
            if st.server.as_ref().is_some_and(|s| s.pid == pid) {
                st.server = None;
            }
            st.stops += 1;
        }
    }
    app.metrics.server_stop(&app.cfg.name, model, why);
    tracing::info!(app = %app.cfg.name, model, pid, why, "the model's server stopped");
}

/// One poll: each running server's measured peak (the model's observed
/// size), its TTL, and servers whose reservation is gone.
pub(crate) async fn poll(app: &Arc<AppState>) {
    let status = app.daemon.last_status();
    for m in &app.cfg.managed {
        let name = m.name.as_str();
        let Some((epoch, phase, reservation_id, device)) = app
            .managed
            .lock()
            .get(name)
            .and_then(|st| st.server.as_ref())
            .map(|s| (s.epoch, s.phase, s.reservation_id, s.device))
        else {
            continue;
        };
        if phase != ServerPhase::Running {
            continue;
        }
        if app.slot_epoch(name) != Some(epoch) {
            tracing::info!(app = %app.cfg.name, model = name, "the server's reservation is gone: stopping it");
            let app = app.clone();
            let model = name.to_string();
            tokio::spawn(async move {
                let until = Instant::now() + app.cfg.stop_timeout * 2 + KILL_WAIT;
                stop_server(&app, &model, until, "stale").await;
            });
            continue;
        }
        if let Some(s) = &status {
            let actual: u64 = s
                .processes
                .iter()
                .filter(|p| {
                    p.device == device && p.reservation.map(|r| r.0) == Some(reservation_id)
                })
                .map(|p| p.bytes)
                .sum();
            let grew = {
                let mut inner = app.managed.lock();
                let st = inner.entry(name.to_string()).or_default();
                let grew = actual > st.peak_bytes;
                if grew {
                    st.peak_bytes = actual;
                }
                grew
            };
            if grew {
                app.metrics.size(&app.cfg.name, name, actual);
                if let Err(e) = app
                    .sizes
                    .observe(&format!("{}/{name}", app.cfg.name), actual)
                {
                    tracing::warn!(error = %e, "cannot save the model size");
                }
            }
        }
        if let Some(ttl) = m.ttl
            && let Some((e, idle)) = app.idle_for(name)
            && e == epoch
            && idle >= ttl
        {
            let app = app.clone();
            let model = name.to_string();
            tokio::spawn(async move {
                let now = Instant::now();
                let until = now + app.cfg.stop_timeout * 2 + KILL_WAIT;
                if app.stop_model(&model, epoch, now, until, true, "ttl").await {
                    tracing::info!(app = %app.cfg.name, model, ttl_ms = ttl.as_millis() as u64, "stopped after its TTL");
                }
            });
        }
    }
}

/// Stops every server of `app` (the gateway is stopping), in parallel.
pub async fn stop_all(app: &Arc<AppState>) {
    let running: Vec<String> = app
        .managed
        .lock()
        .iter()
        .filter(|(_, st)| st.server.is_some())
        .map(|(m, _)| m.clone())
        .collect();
    let until = Instant::now() + app.cfg.stop_timeout + KILL_WAIT;
    futures_util::future::join_all(
        running
            .iter()
            .map(|m| stop_server(app, m, until, "shutdown")),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_are_replaced() {
        assert_eq!(
            expand(
                "--port ${PORT} -m ${MODEL} --dev ${DEVICE} ${HOME}",
                Some(5800),
                "q",
                1
            ),
            "--port 5800 -m q --dev 1 ${HOME}"
        );
    }

    #[test]
    fn the_limit_is_whole_mib_rounded_down() {
        assert_eq!(pinned_limit(8 << 30), ("0=8192M".into(), 8 << 30));
        assert_eq!(
            pinned_limit((4 << 30) + (1 << 20) - 1),
            ("0=4096M".into(), 4 << 30)
        );
    }
}
