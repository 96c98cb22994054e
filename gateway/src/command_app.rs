//! `kind = "command"`: an app with no API, unloaded (and loaded again) by
//! shell commands.
//!
//! The gateway fronts no requests for it. While the app counts as loaded,
//! its declared (or observed) size is mirrored as one idle reservation
//! labelled `<app>/app`, taken try-once like a watched Ollama model's: it
//! never queues and never evicts anything for itself; when it does not fit
//! it is tried again at a later poll. The reservation speaks for the pid in
//! `pid_file` when one is given (vramd adopts the memory it already uses).
//!
//! Lifecycle: loaded at start → evicted by vramd (the `unload` command runs
//! with `sh -c`, bounded by `unload_timeout`; then, with a pid attributed,
//! the gateway waits until its memory is back to the baseline, up to the
//! eviction deadline; then the reservation is released) → unloaded. An
//! unloaded app stays so until `restore = true` finds vramd's queue empty:
//! then the reservation is taken again try-once and the `load` command runs
//! (bounded by `load_timeout`) before it is kept. A command exiting
//! non-zero or running past its timeout is the app's `last_error` (with its
//! time, kept until that command's next success); a failed unload counts in
//! `failed_unloads`, never in `unloads`. Commands' output is captured
//! (at most [`OUTPUT_LIMIT`] bytes of each stream) into the log line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vramd_client::{DeviceSelector, Error as SdkError, Request};

use crate::models::AppState;

/// The model name of a command app's one reservation (`<app>/app`).
pub const MODEL: &str = "app";
/// At most this many bytes of a command's stdout (and of its stderr) are
/// kept for the log and `last_error`.
pub const OUTPUT_LIMIT: usize = 4096;

/// What the gateway knows of one command app.
#[derive(Debug, Default)]
pub struct CommandApp {
    inner: Mutex<Inner>,
    /// A reservation is being taken (one at a time).
    reserving: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Evicted and not loaded again since.
    unloaded: bool,
    /// The last failure and when (Unix milliseconds), kept until a later
    /// success of the same command.
    last_error: crate::last_error::LastError,
    /// Unloads that succeeded (command exited 0, memory seen freed or
    /// nothing to watch).
    unloads: u64,
    /// Unloads that failed (non-zero exit, timeout, memory not freed).
    failed_unloads: u64,
    /// Evictions of an app whose memory was freed already (nothing run).
    already_unloaded: u64,
    /// Loads run by `restore` that succeeded.
    loads: u64,
    /// Loads that failed.
    failed_loads: u64,
}

impl CommandApp {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) {
        self.lock().last_error.fail(what, e);
    }

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
            "unloaded": i.unloaded,
            "unloads": i.unloads,
            "failed_unloads": i.failed_unloads,
            "already_unloaded": i.already_unloaded,
            "loads": i.loads,
            "failed_loads": i.failed_loads,
            "last_error": i.last_error.message(),
            "last_error_at_ms": i.last_error.at_ms(),
        })
    }
}

/// Runs `command` with `sh -c`, killed after `timeout`; `Err` names a
/// non-zero exit or the timeout, with the captured output.
async fn run(app: &AppState, what: &str, command: &str, timeout: Duration) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("VRAMD_APP", &app.cfg.name)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("cannot start sh: {e}"))?;
    let started = Instant::now();
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(format!("waiting for the command: {e}")),
        Err(_) => {
            tracing::warn!(app = %app.cfg.name, command, timeout_ms = timeout.as_millis() as u64, "{what} command timed out: killed");
            return Err(format!(
                "timed out after {} ms (killed)",
                timeout.as_millis()
            ));
        }
    };
    let clip = |b: &[u8]| {
        let b = &b[..b.len().min(OUTPUT_LIMIT)];
        String::from_utf8_lossy(b).trim().to_string()
    };
    let (stdout, stderr) = (clip(&out.stdout), clip(&out.stderr));
    let ms = started.elapsed().as_millis() as u64;
    if out.status.success() {
        tracing::info!(app = %app.cfg.name, command, ms, stdout, stderr, "{what} command succeeded");
        Ok(())
    } else {
        tracing::warn!(app = %app.cfg.name, command, ms, status = %out.status, stdout, stderr, "{what} command failed");
        Err(format!("{} (stderr: {stderr:?})", out.status))
    }
}

/// The pid in `pid_file`, if one is given and readable.
fn pid_of(app: &AppState) -> Vec<u32> {
    app.cfg
        .pid_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| t.trim().parse::<u32>().ok())
        .into_iter()
        .collect()
}

/// One poll: the measured peak while held; else the try-once reservation
/// of a loaded app, or the `restore` of an unloaded one.
pub(crate) async fn poll(app: &Arc<AppState>) {
    if app.reservation(MODEL).is_some() {
        crate::pids::observe_peak(app, MODEL);
        return;
    }
    if app.has_slot(MODEL) {
        return;
    }
    let unloaded = app.command.lock().unloaded;
    // After a failed unload (the app still loaded) or load: not before the
    // backoff passed.
    if !app.retry.due(MODEL) {
        return;
    }
    if unloaded {
        if !app.cfg.restore {
            return;
        }
        // Room back with nobody waiting: vramd's queue (as last polled) is
        // empty.
        let Some(status) = app.daemon.last_status() else {
            return;
        };
        if !status.queue.is_empty() {
            return;
        }
    }
    if app.command.reserving.swap(true, Ordering::SeqCst) {
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        mirror(&app, unloaded).await;
        app.command.reserving.store(false, Ordering::SeqCst);
    });
}

/// Takes the app's reservation try-once; `load`: run the `load` command
/// under it first (dropped, so released, when that fails).
async fn mirror(app: &Arc<AppState>, load: bool) {
    let Some(bytes) = app
        .sizes
        .get(&format!("{}/{MODEL}", app.cfg.name))
        .or(app.cfg.size_bytes)
    else {
        return;
    };
    let (generation, client) = match app.daemon.client().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(app = %app.cfg.name, error = %e, "cannot mirror the app now");
            return;
        }
    };
    // vramd grants a try-once request that fits even while others wait:
    // a restore reads the queue fresh right before it asks.
    if load && !app.daemon.status().await.is_ok_and(|s| s.queue.is_empty()) {
        return;
    }
    let pids = pid_of(app);
    let mut req = Request::new(bytes)
        .for_pids(pids.clone())
        .label(format!("{}/{MODEL}", app.cfg.name))
        .priority(app.cfg.priority)
        .evictable(true)
        .timeout(Duration::ZERO);
    if let Some(d) = app.cfg.device {
        req = req.device(DeviceSelector::Index(d));
    }
    let r = match client.reserve(req).await {
        Ok(r) => r,
        Err(SdkError::WaitTimeout(m)) => {
            tracing::info!(app = %app.cfg.name, bytes, why = %m, "the app's reservation does not fit now; trying again later");
            return;
        }
        Err(e) => {
            tracing::warn!(app = %app.cfg.name, bytes, error = %e, "cannot reserve for the app");
            return;
        }
    };
    if load && let Some(cmd) = &app.cfg.load_command {
        tracing::info!(app = %app.cfg.name, command = %cmd, "restoring: running the load command");
        match run(app, "load", cmd, app.cfg.load_timeout).await {
            Ok(()) => {
                app.command.succeed("load");
                app.command.lock().loads += 1;
                app.retry.succeeded(MODEL);
            }
            Err(e) => {
                app.command.fail("load", &e);
                app.command.lock().failed_loads += 1;
                app.retry.failed(MODEL, false);
                return; // `r` dropped: released.
            }
        }
    }
    let device = r.device_index();
    if !app.adopt(MODEL, r, generation, false) {
        return;
    }
    app.command.lock().unloaded = false;
    if let Some((epoch, _, _)) = app.reservation(MODEL) {
        crate::pids::note(app, epoch, pids);
    }
    tracing::info!(app = %app.cfg.name, bytes, device, restored = load, "mirrored the app as an idle reservation");
}

/// Evicting: the `unload` command, then (with an attributed pid) the wait
/// until its memory is back to the baseline. An attributed process whose
/// memory is freed already is not unloaded (not a completed unload). A
/// failure leaves the app loaded: its reservation is taken again after the
/// backoff (see `retry`) and the unload retried when vramd evicts it again.
pub(crate) async fn unload(
    app: &AppState,
    device: Option<u32>,
    until: Instant,
) -> crate::models::Unloaded {
    use crate::models::Unloaded;
    let Some(cmd) = &app.cfg.unload_command else {
        return Unloaded::Already;
    };
    if crate::pids::unloaded_itself(app, device).await {
        tracing::info!(app = %app.cfg.name, "the app had unloaded itself already: nothing to unload");
        app.attributed.forget();
        let mut i = app.command.lock();
        i.unloaded = true;
        i.already_unloaded += 1;
        return Unloaded::Already;
    }
    let timeout = app
        .cfg
        .unload_timeout
        .min(until.saturating_duration_since(Instant::now()));
    tracing::info!(app = %app.cfg.name, command = %cmd, "unloading: running the unload command");
    let failed = match run(app, "unload", cmd, timeout).await {
        Ok(()) => match crate::pids::wait_freed(app, device, until).await {
            Some(true) | None => None,
            Some(false) => {
                tracing::warn!(app = %app.cfg.name, "still holds memory at the eviction deadline");
                Some("memory not freed by the eviction deadline".to_string())
            }
        },
        Err(e) => Some(e),
    };
    app.attributed.forget();
    let mut i = app.command.lock();
    match failed {
        None => {
            i.unloaded = true;
            i.unloads += 1;
            i.last_error.succeed("unload");
            Unloaded::Freed
        }
        Some(why) => {
            i.failed_unloads += 1;
            i.last_error.fail("unload", &why);
            Unloaded::Failed(why)
        }
    }
}
