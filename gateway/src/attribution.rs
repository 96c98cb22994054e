//! Attribution: which process holds each model's memory, so that vramd
//! counts it once, against the model's reservation.
//!
//! Ollama runs one `ollama runner` child process per loaded model under
//! `ollama serve`; the model's memory is that runner's, never the
//! gateway's. Each `/api/ps` poll ends with one pass here:
//!
//! 1. **The server**: the process listening on the upstream's port (found in
//!    `/proc/net/tcp{,6}` and the owners' `/proc/PID/fd`: the gateway must
//!    run as the server's user, or as root), re-resolved when it exits.
//! 2. **Its runners**: processes that use GPU memory according to vramd's
//!    status (`processes`; other users' pids are hidden unless the gateway's
//!    user is a vramd admin) and descend from the server.
//! 3. **Which model each runs**: a real runner's command line names the
//!    model's weights (`--model /…/blobs/sha256-…`), the same path as the
//!    `FROM` line of the Modelfile that `/api/show` returns. A runner whose
//!    command line names no model known to `/api/ps` is matched by size
//!    only when exactly one such runner and one such model remain.
//! 4. **Attach**: each held model's runners are attached to its reservation
//!    (which speaks for no process of the gateway's: see `reserve_for`), so
//!    status shows each model's actual usage; a runner of a model the gateway
//!    does not hold (loaded straight on Ollama) stays unattributed, counted
//!    once by vramd.
//! 5. **Grow**: a model whose runners use more than it reserved has its
//!    reservation resized to that usage (free for vramd: the memory is
//!    already counted as the runner's); if vramd refuses, `/status` says so
//!    (`attribution.problems`).
//! 6. **Adopt**: once per connection to vramd (at start, and after a
//!    reconnect), every model resident in `/api/ps` that the gateway holds
//!    no reservation for and whose runner is known becomes a reservation
//!    for that runner at once: vramd grants it against the memory the runner
//!    already uses, without waiting for free room.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vramd_client::{Request, StatusReport};

use crate::models::AppState;
use crate::ollama::{CALL_TIMEOUT, Running, normalize_model};

/// Deepest ancestor chain walked to decide whether a process descends from
/// the server.
const MAX_DEPTH: usize = 64;
/// `expires_at` from this year on means "kept forever" (Ollama prints
/// now + the largest Go duration, about 292 years, for a negative
/// `keep_alive`).
const FOREVER_YEAR: u32 = 2200;
/// Shortest time between two failed lookups of the server process.
const LOOKUP_RETRY: Duration = Duration::from_secs(10);

/// What the gateway knows of an app's runner processes.
#[derive(Debug, Default)]
pub struct Attribution {
    inner: Mutex<Inner>,
    /// The vramd connection generation whose adoption pass ran.
    adopted_generation: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    /// The server's pid, while it lives.
    server: Option<u32>,
    /// When a lookup last failed to find it (lookups scan every process's
    /// descriptors: not more often than [`LOOKUP_RETRY`]).
    lookup_failed_at: Option<Instant>,
    /// Each model's weights path from `/api/show` (`None`: it names none).
    blobs: HashMap<String, Option<String>>,
    /// Runners of each resident model, as of the last pass.
    runners: HashMap<String, Vec<u32>>,
    /// Runners using GPU memory that run no model the pass could name.
    unknown: Vec<u32>,
    /// Held models whose reservation could not grow to their usage.
    problems: HashMap<String, String>,
}

impl Attribution {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The runner pids of `model` as of the last pass (empty: none known).
    pub fn runners_of(&self, model: &str) -> Vec<u32> {
        self.lock().runners.get(model).cloned().unwrap_or_default()
    }

    /// For `/status`: the server, each model's runners, runners of no
    /// known model, and the models whose reservation could not grow.
    pub fn report(&self) -> serde_json::Value {
        let inner = self.lock();
        let mut runners: Vec<_> = inner.runners.iter().collect();
        runners.sort();
        serde_json::json!({
            "server_pid": inner.server,
            "runners": runners.into_iter().map(|(m, p)| serde_json::json!({"model": m, "pids": p})).collect::<Vec<_>>(),
            "unknown_runner_pids": inner.unknown,
            "problems": inner.problems,
        })
    }
}

/// One attribution pass after a successful `/api/ps` poll (see the module
/// docs). Never fails: what it cannot do now it logs and tries next poll.
pub async fn attribute(app: &Arc<AppState>, ps: &[Running]) {
    let Some(status) = app.daemon.last_status() else {
        return;
    };
    let Some(server) = server_pid(app) else {
        return;
    };
    // GPU processes (summed over devices) that descend from the server.
    let mut usage: HashMap<u32, u64> = HashMap::new();
    for p in status.processes.iter().filter(|p| p.pid != 0) {
        *usage.entry(p.pid).or_default() += p.bytes;
    }
    let candidates: Vec<u32> = usage
        .keys()
        .copied()
        .filter(|&pid| descends_from(pid, server))
        .collect();
    let resident: Vec<(String, &Running)> =
        ps.iter().map(|r| (normalize_model(&r.name), r)).collect();
    for (model, _) in &resident {
        let known = app.attribution.lock().blobs.contains_key(model);
        if !known {
            // Kept once Ollama answered; a failed call is tried next poll.
            if let Some(blob) = show_blob(app, model).await {
                app.attribution.lock().blobs.insert(model.clone(), blob);
            }
        }
    }
    let runners = map_runners(app, &candidates, &resident, &usage);
    {
        let mut inner = app.attribution.lock();
        let named: HashSet<u32> = runners.values().flatten().copied().collect();
        inner.unknown = candidates
            .iter()
            .copied()
            .filter(|p| !named.contains(p))
            .collect();
        inner.unknown.sort_unstable();
        inner.runners = runners.clone();
        inner.problems.retain(|m, _| runners.contains_key(m));
    }
    attach_and_grow(app, &status, &runners).await;
    adopt(app, &resident, &runners, &usage).await;
}

/// Runners per resident model: by the weights path on each runner's
/// command line, then by size when exactly one runner and one model remain.
fn map_runners(
    app: &AppState,
    candidates: &[u32],
    resident: &[(String, &Running)],
    usage: &HashMap<u32, u64>,
) -> HashMap<String, Vec<u32>> {
    let blobs = app.attribution.lock().blobs.clone();
    let mut by_path: HashMap<&str, &str> = HashMap::new();
    for (model, _) in resident {
        if let Some(Some(path)) = blobs.get(model) {
            by_path.insert(path.as_str(), model.as_str());
        }
    }
    let mut runners: HashMap<String, Vec<u32>> = HashMap::new();
    let mut left = Vec::new();
    for &pid in candidates {
        match cmdline_model(pid).and_then(|p| by_path.get(p.as_str()).copied()) {
            Some(model) => runners.entry(model.to_string()).or_default().push(pid),
            None => left.push(pid),
        }
    }
    let unmatched: Vec<&(String, &Running)> = resident
        .iter()
        .filter(|(m, _)| !runners.contains_key(m))
        .collect();
    if let ([pid], [(model, r)]) = (left.as_slice(), unmatched.as_slice()) {
        // One runner and one model left: the same one if the sizes agree
        // (within a quarter: Ollama's size_vram is its own estimate).
        let bytes = usage.get(pid).copied().unwrap_or(0);
        if bytes.abs_diff(r.size_vram) <= r.size_vram / 4 {
            runners.insert(model.clone(), vec![*pid]);
        }
    }
    for pids in runners.values_mut() {
        pids.sort_unstable();
    }
    runners
}

/// Attaches each held model's runners to its reservation and grows a
/// reservation to its runners' usage.
async fn attach_and_grow(
    app: &Arc<AppState>,
    status: &StatusReport,
    runners: &HashMap<String, Vec<u32>>,
) {
    for (model, epoch, r) in app.held() {
        let Some(pids) = runners.get(&model) else {
            continue;
        };
        let attached: Vec<u32> = status
            .reservations
            .iter()
            .find(|s| s.id == r.id())
            .map(|s| s.pids.clone())
            .unwrap_or_default();
        let missing: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| !attached.contains(p))
            .collect();
        if !missing.is_empty() {
            let res = r.clone();
            let to_attach = missing.clone();
            match tokio::task::spawn_blocking(move || res.attach_pids(&to_attach)).await {
                Ok(Ok(all)) => {
                    tracing::info!(app = %app.cfg.name, model, runners = ?missing, pids = ?all, "runner attributed to its model's reservation");
                }
                Ok(Err(e)) => {
                    tracing::warn!(app = %app.cfg.name, model, runners = ?missing, error = %e, "cannot attach the model's runner");
                }
                Err(e) => tracing::warn!(error = %e, "attach task failed"),
            }
        }
        // What its runners use on the reservation's own device.
        let used: u64 = status
            .processes
            .iter()
            .filter(|p| p.device == r.device_index() && pids.contains(&p.pid))
            .fold(0, |a, p| a.saturating_add(p.bytes));
        if used <= r.bytes() {
            continue;
        }
        let res = r.clone();
        let from = r.bytes();
        match tokio::task::spawn_blocking(move || res.resize(used)).await {
            Ok(Ok(())) => {
                app.set_reserved(&model, epoch, used);
                app.attribution.lock().problems.remove(&model);
                tracing::info!(app = %app.cfg.name, model, from_bytes = from, to_bytes = used, "the model proved larger than reserved: reservation grown");
            }
            Ok(Err(e)) => {
                let message = format!(
                    "uses {used} bytes but reserves {from}, and vramd did not let it grow: {e}"
                );
                let mut inner = app.attribution.lock();
                if inner.problems.get(&model) != Some(&message) {
                    tracing::warn!(app = %app.cfg.name, model, used_bytes = used, reserved_bytes = from, error = %e, "cannot grow the model's reservation");
                }
                inner.problems.insert(model.clone(), message);
            }
            Err(e) => tracing::warn!(error = %e, "resize task failed"),
        }
    }
}

/// Once per vramd connection: resident models without a reservation whose
/// runner is known become reservations for that runner, at once.
async fn adopt(
    app: &Arc<AppState>,
    resident: &[(String, &Running)],
    runners: &HashMap<String, Vec<u32>>,
    usage: &HashMap<u32, u64>,
) {
    let generation = app.daemon.generation();
    if generation == 0 || app.attribution.adopted_generation.load(Ordering::SeqCst) == generation {
        return;
    }
    let Ok((generation, client)) = app.daemon.client().await else {
        return;
    };
    app.attribution
        .adopted_generation
        .store(generation, Ordering::SeqCst);
    for (model, running) in resident {
        if app.has_slot(model) {
            continue;
        }
        let Some(pids) = runners.get(model) else {
            tracing::info!(app = %app.cfg.name, model, "resident but its runner is unknown: not adopted (its memory shows as unattributed)");
            continue;
        };
        let used: u64 = pids
            .iter()
            .filter_map(|p| usage.get(p))
            .fold(0, |a, b| a.saturating_add(*b));
        let bytes = used.max(running.size_vram).max(1);
        let pinned = forever(running.expires_at.as_deref());
        let req = Request::new(bytes)
            .for_pids(pids.iter().copied())
            .label(format!("{}/{model}", app.cfg.name))
            .priority(app.cfg.priority)
            .evictable(!pinned || app.cfg.evict_pinned)
            .timeout(Duration::ZERO);
        let c = client.clone();
        match tokio::task::spawn_blocking(move || c.blocking().reserve(req)).await {
            Ok(Ok(r)) => {
                let id = r.id().0;
                if app.adopt(model, r, generation, pinned) {
                    tracing::info!(app = %app.cfg.name, model, bytes, runners = ?pids, id, "adopted a model already resident");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(app = %app.cfg.name, model, bytes, error = %e, "cannot adopt a resident model");
            }
            Err(e) => tracing::warn!(error = %e, "adopt task failed"),
        }
    }
}

/// Whether an `expires_at` means "kept forever" (a negative keep_alive).
fn forever(expires_at: Option<&str>) -> bool {
    expires_at
        .and_then(|e| e.get(..4))
        .and_then(|y| y.parse::<u32>().ok())
        .is_some_and(|y| y >= FOREVER_YEAR)
}

/// The server's pid: cached while it lives, else the process listening on
/// the upstream's port.
fn server_pid(app: &AppState) -> Option<u32> {
    let (cached, failed_at) = {
        let inner = app.attribution.lock();
        (inner.server, inner.lookup_failed_at)
    };
    if let Some(pid) = cached {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Some(pid);
        }
    } else if failed_at.is_some_and(|t| t.elapsed() < LOOKUP_RETRY) {
        return None;
    }
    let found = listening_pid(&app.cfg.upstream);
    if found != cached {
        match found {
            Some(pid) => {
                tracing::info!(app = %app.cfg.name, pid, "found the upstream's server process")
            }
            None => {
                tracing::info!(app = %app.cfg.name, upstream = %app.cfg.upstream, "cannot find the upstream's server process (another user's, or not on this machine): its models' memory stays unattributed")
            }
        }
    }
    let mut inner = app.attribution.lock();
    inner.server = found;
    inner.lookup_failed_at = found.is_none().then(Instant::now);
    found
}

/// The pid of the local process listening on `url`'s port, if this user
/// may see it.
fn listening_pid(url: &str) -> Option<u32> {
    let url = reqwest::Url::parse(url).ok()?;
    let local = matches!(
        url.host_str()?,
        "127.0.0.1" | "localhost" | "::1" | "[::1]" | "0.0.0.0"
    );
    if !local {
        return None;
    }
    let port = url.port_or_known_default()?;
    crate::procfs::listening_pids(port).first().copied()
}

/// Whether `pid` is a (proper) descendant of `ancestor`, by `/proc` parent
/// links.
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..MAX_DEPTH {
        match parent(p) {
            Some(pp) if pp == ancestor => return true,
            Some(pp) if pp > 1 && pp != p => p = pp,
            _ => return false,
        }
    }
    false
}

/// A process's parent pid, from `/proc/PID/stat`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The weights path a runner's command line names (`--model PATH` or
/// `--model=PATH`).
fn cmdline_model(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw);
    model_arg(text.split(['\0', ' ']).filter(|t| !t.is_empty()))
}

/// The value of `--model` among command-line tokens.
fn model_arg<'a>(mut tokens: impl Iterator<Item = &'a str>) -> Option<String> {
    while let Some(t) = tokens.next() {
        if t == "--model" {
            return tokens.next().map(str::to_string);
        }
        if let Some(v) = t.strip_prefix("--model=") {
            return Some(v.to_string());
        }
    }
    None
}

/// The weights path of `model`: the `FROM` line of its Modelfile in
/// `/api/show` that names a file (`Some(None)`: it names none; `None`: the
/// call failed).
async fn show_blob(app: &AppState, model: &str) -> Option<Option<String>> {
    let url = format!("{}/api/show", app.cfg.upstream.trim_end_matches('/'));
    let resp = app
        .http()
        .post(url)
        .json(&serde_json::json!({ "model": model }))
        .timeout(CALL_TIMEOUT)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    Some(
        v.get("modelfile")
            .and_then(|m| m.as_str())
            .and_then(from_line),
    )
}

/// The first `FROM` of a Modelfile that names a file (an absolute path).
fn from_line(modelfile: &str) -> Option<String> {
    modelfile.lines().find_map(|l| {
        let path = l.trim().strip_prefix("FROM ")?.trim();
        path.starts_with('/').then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weights_path_is_read_from_a_runner_and_a_modelfile() {
        let argv = "/usr/local/bin/ollama\0runner\0--ollama-engine\0--model\0/usr/share/ollama/.ollama/models/blobs/sha256-ab\0--port\x0039911\0";
        assert_eq!(
            model_arg(argv.split(['\0', ' ']).filter(|t| !t.is_empty())).as_deref(),
            Some("/usr/share/ollama/.ollama/models/blobs/sha256-ab")
        );
        assert_eq!(
            model_arg(["runner", "--model=/m"].into_iter()).as_deref(),
            Some("/m")
        );
        assert_eq!(model_arg(["serve"].into_iter()), None);
        let mf = "# Modelfile generated by \"ollama show\"\n# FROM llama3:latest\n\nFROM /blobs/sha256-cd\nTEMPLATE x\n";
        assert_eq!(from_line(mf).as_deref(), Some("/blobs/sha256-cd"));
        assert_eq!(from_line("FROM llama3\n"), None);
    }

    #[test]
    fn a_far_future_expiry_means_pinned() {
        assert!(forever(Some("2318-03-01T10:00:00.000000000Z")));
        assert!(!forever(Some("2026-11-27T20:05:00Z")));
        assert!(!forever(None));
    }

    #[test]
    fn this_process_descends_from_its_parent_and_listens_where_it_binds() {
        let me = std::process::id();
        let parent_pid = parent(me).expect("a parent");
        assert!(descends_from(me, parent_pid));
        assert!(!descends_from(parent_pid, me));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        assert_eq!(listening_pid(&url), Some(me));
        assert_eq!(listening_pid("http://192.0.2.1:80"), None);
    }
}
