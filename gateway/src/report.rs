//! Reporting the apps to vramd: every poll interval the gateway reads what
//! each app looks like — kind, priority, whether it answers, what it holds,
//! its models, its last eviction, its last error with its time — and, when
//! that changed since the last report on the current daemon connection,
//! sends it with `report_consumers`, so that vramd's status and
//! `vramctl status` list the apps. A new connection (vramd restarted, or
//! the connection was lost) gets the list again. The daemon drops the list
//! when the gateway's connection closes.
//!
//! Cheap: the comparison is on the state itself (instants, not the ages
//! sent), so an unchanged gateway sends nothing; building the list reads
//! each app's in-memory state only.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vramd_protocol::{
    ConsumerReport, MAX_CONSUMER_ERROR_BYTES, MAX_CONSUMER_KIND_BYTES, MAX_CONSUMER_MODEL_BYTES,
    MAX_CONSUMER_MODELS, MAX_CONSUMER_NAME_BYTES, MAX_REPORTED_CONSUMERS,
};

use crate::config::Kind;
use crate::daemon::Daemon;
use crate::models::{AppState, Phase};

/// One app as reported, with its last eviction as an instant (so that an
/// unchanged app compares equal from one poll to the next).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    report: ConsumerReport,
    last_eviction: Option<Instant>,
}

/// What was last sent, on which connection generation.
#[derive(Debug, Default)]
pub struct Reporter {
    sent: Mutex<Option<(u64, Vec<Snapshot>)>>,
}

impl Reporter {
    /// Sends the apps' state to vramd if it changed since the last report
    /// on the current connection (or nothing was reported on it yet).
    pub async fn tick(&self, apps: &[Arc<AppState>], daemon: &Daemon) {
        let now = snapshot(apps);
        let (generation, client) = match daemon.client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "vramd not reachable; the apps are reported when it is");
                return;
            }
        };
        {
            let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            if sent
                .as_ref()
                .is_some_and(|(g, s)| *g == generation && *s == now)
            {
                return;
            }
        }
        let at = Instant::now();
        let list: Vec<ConsumerReport> = now
            .iter()
            .map(|s| ConsumerReport {
                last_eviction_ms: s
                    .last_eviction
                    .map(|t| at.saturating_duration_since(t).as_millis() as u64),
                ..s.report.clone()
            })
            .collect();
        match client.report_consumers(list).await {
            Ok(count) => {
                tracing::debug!(count, generation, "apps reported to vramd");
                *self.sent.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, now));
            }
            Err(e) if e.kind().is_some() => {
                // Refused (out of bounds, or the daemon's limit reached):
                // said once per change, not every poll.
                tracing::warn!(error = %e, "vramd refused the report of the apps; its status will not list them");
                *self.sent.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, now));
            }
            Err(e) => {
                tracing::debug!(error = %e, "reporting the apps to vramd failed");
                daemon.lost(generation).await;
            }
        }
    }
}

/// Every app as it is now, cut to the protocol's bounds.
fn snapshot(apps: &[Arc<AppState>]) -> Vec<Snapshot> {
    apps.iter()
        .take(MAX_REPORTED_CONSUMERS)
        .map(|app| one(app))
        .collect()
}

fn one(app: &AppState) -> Snapshot {
    let cfg = &app.cfg;
    let held: Vec<_> = app
        .models()
        .into_iter()
        .filter(|m| matches!(m.phase, Phase::Held | Phase::Evicting))
        .collect();
    let mut devices: Vec<u32> = held.iter().filter_map(|m| m.device).collect();
    devices.sort_unstable();
    devices.dedup();
    let reachable = match cfg.kind {
        Kind::Ollama => app.last_ps().is_some(),
        Kind::ComfyUi => app.comfy.up(),
        Kind::Http => app.http_app.healthy(),
        // Nothing the gateway polls: it counts as reachable.
        Kind::Command | Kind::OpenAi | Kind::Managed => true,
    };
    // Every kind's last failure (kept until the same call succeeds).
    let failure = app.last_error();
    let last_error = failure
        .message()
        .filter(|e| !e.is_empty())
        .map(|e| cut(e, MAX_CONSUMER_ERROR_BYTES));
    let last_error_at_ms = last_error.as_ref().and(failure.at_ms());
    let kind = serde_json::to_value(cfg.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    Snapshot {
        report: ConsumerReport {
            name: cut(&cfg.name, MAX_CONSUMER_NAME_BYTES),
            kind: cut(&kind, MAX_CONSUMER_KIND_BYTES),
            device: match devices.as_slice() {
                [one] => Some(*one),
                _ => None,
            },
            priority: cfg.priority,
            reachable,
            resident_bytes: held.iter().map(|m| m.reserved_bytes).sum(),
            models: held
                .iter()
                .filter(|m| !m.model.is_empty())
                .take(MAX_CONSUMER_MODELS)
                .map(|m| cut(&m.model, MAX_CONSUMER_MODEL_BYTES))
                .collect(),
            last_eviction_ms: None,
            last_error,
            last_error_at_ms,
        },
        last_eviction: app.metrics.last_eviction(&cfg.name),
    }
}

/// `s` cut to at most `max` bytes, at a character boundary, with `…` when
/// cut.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_within_the_bound_at_a_character_boundary() {
        assert_eq!(cut("short", 10), "short");
        let long = "é".repeat(700); // 1,400 bytes
        let c = cut(&long, MAX_CONSUMER_ERROR_BYTES);
        assert!(c.len() <= MAX_CONSUMER_ERROR_BYTES, "{}", c.len());
        assert!(c.ends_with('…'));
        assert!(c.len() > MAX_CONSUMER_ERROR_BYTES - 8);
    }
}
