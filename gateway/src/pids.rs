//! An app's own process attributed to its one reservation (`comfyui` and
//! `http` apps): found from `pid_file`, else as the process listening on the
//! upstream's TCP port (`/proc`); attached once per reservation with the
//! SDK's `attach_pids`; its usage in vramd's readings tells when an unload
//! really freed the memory, and the reservation's measured peak becomes the
//! app's observed size.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::models::AppState;

/// What may stay on the card after an unload above the process's known
/// baseline (allocator slack).
pub const FREED_SLACK_BYTES: u64 = 256 << 20;
/// What may stay on the card after an unload when the process's baseline
/// is not known yet (it was attached with its model loaded): a CUDA
/// context.
pub const UNKNOWN_BASELINE_BYTES: u64 = 768 << 20;
/// How often an eviction re-reads the usage while it waits.
const FREED_POLL: Duration = Duration::from_millis(100);

/// The attributed process of an app with one reservation.
#[derive(Debug, Default)]
pub struct Attributed {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The reservation (epoch) the pids were attached to.
    epoch: Option<u64>,
    /// The attributed pids.
    pids: Vec<u32>,
    /// Their usage without the model: measured when attached unloaded, or
    /// after an unload freed the memory; `None`: not known yet.
    baseline_bytes: Option<u64>,
    /// Largest usage vramd measured for the reservation.
    peak_bytes: u64,
}

impl Attributed {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pids attributed now (empty: none), with the usage at or below
    /// which their memory counts as freed.
    pub fn pids(&self) -> (Vec<u32>, u64) {
        let i = self.lock();
        (i.pids.clone(), freed_at(i.baseline_bytes))
    }

    /// The epoch of the reservation the pids were last attached to.
    pub fn epoch(&self) -> Option<u64> {
        self.lock().epoch
    }

    /// For `/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let i = self.lock();
        serde_json::json!({
            "pids": i.pids,
            "baseline_bytes": i.baseline_bytes,
            "peak_bytes": i.peak_bytes,
        })
    }

    /// Forgets the reservation (after an eviction): the next one attaches again.
    pub fn forget(&self) {
        self.lock().epoch = None;
    }
}

fn freed_at(baseline: Option<u64>) -> u64 {
    baseline.map_or(UNKNOWN_BASELINE_BYTES, |b| b + FREED_SLACK_BYTES)
}

/// Attaches the app's process to `model`'s reservation of `epoch`, once.
/// `unloaded`: the app holds no model now, so its usage now is its baseline
/// (what an unload cannot take back); else a baseline learned before is kept.
pub(crate) async fn attach(app: &Arc<AppState>, model: &str, epoch: u64, unloaded: bool) {
    if app.attributed.lock().epoch == Some(epoch) {
        return;
    }
    let Some((e, res, device)) = app.reservation(model) else {
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
            tracing::warn!(app = %app.cfg.name, error = %e, "cannot find the app's process: its memory stays unattributed");
            let mut i = app.attributed.lock();
            i.epoch = Some(epoch);
            i.pids.clear();
            return;
        }
    };
    let r = {
        let pids = pids.clone();
        tokio::task::spawn_blocking(move || res.attach_pids(&pids)).await
    };
    match r {
        Ok(Ok(all)) => {
            let now = usage(app, &pids, device).await;
            let mut i = app.attributed.lock();
            if unloaded && now.is_some() {
                i.baseline_bytes = now;
            }
            tracing::info!(app = %app.cfg.name, ?pids, ?all, baseline_bytes = ?i.baseline_bytes, "attributed the app's process to its reservation");
            i.epoch = Some(epoch);
            i.pids = pids;
            i.peak_bytes = 0;
        }
        Ok(Err(e)) => {
            tracing::warn!(app = %app.cfg.name, ?pids, error = %e, "vramd refused to attribute the app's process");
            let mut i = app.attributed.lock();
            i.epoch = Some(epoch);
            i.pids.clear();
        }
        Err(e) => tracing::warn!(error = %e, "attach task failed"),
    }
}

/// Records `pids` (already given to vramd with the reservation) as
/// attributed to the reservation of `epoch`, without attaching them again.
pub(crate) fn note(app: &AppState, epoch: u64, pids: Vec<u32>) {
    let mut i = app.attributed.lock();
    i.epoch = Some(epoch);
    i.pids = pids;
    i.peak_bytes = 0;
}

/// The pids' usage on `device` in vramd's readings (a fresh status).
pub(crate) async fn usage(app: &AppState, pids: &[u32], device: u32) -> Option<u64> {
    let s = app.daemon.status().await.ok()?;
    Some(
        s.processes
            .iter()
            .filter(|p| p.device == device && pids.contains(&p.pid))
            .map(|p| p.bytes)
            .sum(),
    )
}

/// Whether the attributed process's memory on `device` counts as freed
/// now: its usage at most its baseline + [`FREED_SLACK_BYTES`] (baseline
/// unknown: at most [`UNKNOWN_BASELINE_BYTES`]). `None`: nothing is
/// attributed or no reading.
pub(crate) async fn freed_now(app: &AppState, device: Option<u32>) -> Option<bool> {
    let (pids, limit) = app.attributed.pids();
    if pids.is_empty() {
        return None;
    }
    usage(app, &pids, device?).await.map(|b| b <= limit)
}

/// Whether the attributed process was seen holding its model (its measured
/// peak above the freed limit) and its memory counts as freed now: the app
/// unloaded itself, so an eviction has nothing to ask. A process never seen
/// holding anything (absent from the readings so far) does not count.
pub(crate) async fn unloaded_itself(app: &AppState, device: Option<u32>) -> bool {
    let (peak, limit) = {
        let i = app.attributed.lock();
        (i.peak_bytes, freed_at(i.baseline_bytes))
    };
    peak > limit && freed_now(app, device).await == Some(true)
}

/// Waits (until `until`) until the attributed process's memory on `device`
/// counts as freed ([`freed_now`]); its usage then is its baseline from
/// now on. `None`: nothing is attributed, so nothing can be watched; else
/// whether it was freed.
pub(crate) async fn wait_freed(
    app: &AppState,
    device: Option<u32>,
    until: Instant,
) -> Option<bool> {
    let (pids, limit) = app.attributed.pids();
    let device = device?;
    if pids.is_empty() {
        return None;
    }
    loop {
        if let Some(b) = usage(app, &pids, device).await
            && b <= limit
        {
            app.attributed.lock().baseline_bytes = Some(b);
            return Some(true);
        }
        if Instant::now() >= until {
            return Some(false);
        }
        tokio::time::sleep(FREED_POLL).await;
    }
}

/// Notes the attributed process's usage on `model`'s reservation's device
/// (vramd's last status); a new peak becomes the app's observed size. (Not
/// the reservation's `actual_bytes`: every reservation of the gateway also
/// speaks for the gateway's own process, so that shows the whole group.)
pub(crate) fn observe_peak(app: &AppState, model: &str) {
    let Some((_, _, device)) = app.reservation(model) else {
        return;
    };
    let (pids, _) = app.attributed.pids();
    if pids.is_empty() {
        return;
    }
    let actual = app.daemon.last_status().map(|s| {
        s.processes
            .iter()
            .filter(|p| p.device == device && pids.contains(&p.pid))
            .map(|p| p.bytes)
            .sum::<u64>()
    });
    let Some(actual) = actual else { return };
    let grew = {
        let mut i = app.attributed.lock();
        let grew = actual > i.peak_bytes && !i.pids.is_empty();
        if grew {
            i.peak_bytes = actual;
        }
        grew
    };
    if grew {
        let label = format!("{}/{model}", app.cfg.name);
        app.metrics.size(&app.cfg.name, model, actual);
        if let Err(e) = app.sizes.observe(&label, actual) {
            tracing::warn!(error = %e, "cannot save the app's size");
        }
    }
}

/// The app's pids: the one in `pid_file`, else the processes listening on
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
    if !crate::procfs::is_listening(port) {
        return Err(format!("nothing listens on port {port}"));
    }
    let pids = crate::procfs::listening_pids(port);
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

    #[test]
    fn a_pid_file_wins() {
        let dir = std::env::temp_dir().join(format!("vramd-gw-pid-{}", std::process::id()));
        std::fs::write(&dir, "4242\n").unwrap();
        assert_eq!(
            find_pids(Some(&dir), "http://127.0.0.1:1").unwrap(),
            vec![4242]
        );
        std::fs::write(&dir, "x").unwrap();
        assert!(find_pids(Some(&dir), "http://127.0.0.1:1").is_err());
        let _ = std::fs::remove_file(&dir);
    }
}
