//! External consumers: apps that hold GPU memory without asking vramd
//! (ComfyUI, any HTTP app, anything a command can stop), read and unloaded
//! through their own APIs. (Ollama is watched per model by vramd-gateway.)
//!
//! Each consumer has its own task: it asks the consumer what it holds every
//! poll interval, and unloads it when the core says so. Every call has a time
//! limit; an unreachable, failing or garbled consumer is reported to the core
//! and never blocks the daemon or other consumers. An unload call returning
//! does not mean the memory is free: only the GPU readings decide grants.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::{ConsumerConfig, ConsumerKind, Route};
use vramd_ledger::{ConsumerReading, Input};

/// Handle to a consumer's task.
#[derive(Debug, Clone)]
pub struct ConsumerHandle {
    unload: mpsc::UnboundedSender<String>,
}

impl ConsumerHandle {
    /// Asks the consumer to unload; `reason` is logged.
    pub fn unload(&self, reason: String) {
        let _ = self.unload.send(reason);
    }
}

/// Starts the task of one consumer; it reports through `report` until that
/// channel closes.
pub fn start(
    config: ConsumerConfig,
    poll_interval: Duration,
    report: mpsc::Sender<Input>,
) -> ConsumerHandle {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut adapter = Adapter::new(config);
        let name = adapter.config.name.clone();
        let mut next_poll = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_poll) => {
                    let result = adapter.read().await;
                    if let Err(e) = &result {
                        debug!(consumer = %name, error = %e, "consumer unreachable");
                    }
                    if report.send(Input::ConsumerReading { name: name.clone(), result }).await.is_err() {
                        return;
                    }
                    next_poll = tokio::time::Instant::now() + poll_interval;
                }
                reason = rx.recv() => {
                    let Some(reason) = reason else { return };
                    info!(consumer = %name, kind = adapter.config.kind.name(), reason = %reason, "asking consumer to unload");
                    let result = adapter.unload().await;
                    match &result {
                        Ok(()) => info!(consumer = %name, "consumer accepted the unload; waiting for the readings to show the memory free"),
                        Err(e) => warn!(consumer = %name, error = %e, "consumer unload failed"),
                    }
                    if report.send(Input::ConsumerUnloaded { name: name.clone(), result }).await.is_err() {
                        return;
                    }
                    // Ask again soon: the answer tells when it let go.
                    next_poll = tokio::time::Instant::now() + Duration::from_millis(100).min(poll_interval);
                }
            }
        }
    });
    ConsumerHandle { unload: tx }
}

struct Adapter {
    config: ConsumerConfig,
    http: reqwest::Client,
    /// `http`/`command`: when it was last unloaded.
    unloaded_at: Option<Instant>,
}

#[derive(Deserialize)]
struct ComfyStats {
    devices: Vec<ComfyDevice>,
}

#[derive(Deserialize)]
struct ComfyDevice {
    #[serde(default)]
    name: String,
    #[serde(default)]
    torch_vram_total: u64,
}

impl Adapter {
    fn new(config: ConsumerConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .unwrap_or_default();
        Self {
            config,
            http,
            unloaded_at: None,
        }
    }

    fn cooling_down(&self) -> bool {
        self.unloaded_at
            .is_some_and(|t| t.elapsed() < self.config.cooldown)
    }

    async fn read(&mut self) -> Result<ConsumerReading, String> {
        match &self.config.kind {
            ConsumerKind::ComfyUi { url } => {
                let stats: ComfyStats = self.get_json(&format!("{url}/system_stats")).await?;
                Ok(ConsumerReading {
                    resident_bytes: stats.devices.iter().map(|d| d.torch_vram_total).sum(),
                    models: stats
                        .devices
                        .into_iter()
                        .filter(|d| d.torch_vram_total > 0)
                        .map(|d| d.name)
                        .collect(),
                })
            }
            ConsumerKind::Http {
                url,
                health,
                vram_bytes,
                ..
            } => {
                if let Some(route) = health {
                    self.call(url, route).await?;
                }
                Ok(self.declared(*vram_bytes))
            }
            ConsumerKind::Command { vram_bytes, .. } => Ok(self.declared(*vram_bytes)),
        }
    }

    fn declared(&self, vram_bytes: u64) -> ConsumerReading {
        ConsumerReading {
            resident_bytes: if self.cooling_down() { 0 } else { vram_bytes },
            models: Vec::new(),
        }
    }

    async fn unload(&mut self) -> Result<(), String> {
        match self.config.kind.clone() {
            ConsumerKind::ComfyUi { url } => {
                let body = serde_json::json!({ "unload_models": true, "free_memory": true });
                self.post_json(&format!("{url}/free"), &body).await?;
                Ok(())
            }
            ConsumerKind::Http { url, unload, .. } => {
                self.call(&url, &unload).await?;
                self.unloaded_at = Some(Instant::now());
                Ok(())
            }
            ConsumerKind::Command { unload_command, .. } => {
                self.run_command(&unload_command).await?;
                self.unloaded_at = Some(Instant::now());
                Ok(())
            }
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| describe(url, &e))?;
        let body = check(url, resp).await?;
        serde_json::from_slice(&body).map_err(|e| format!("malformed JSON from {url}: {e}"))
    }

    async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<(), String> {
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| describe(url, &e))?;
        check(url, resp).await.map(|_| ())
    }

    async fn call(&self, base: &str, route: &Route) -> Result<(), String> {
        let url = format!("{base}{}", route.path);
        let method = reqwest::Method::from_bytes(route.method.as_bytes())
            .map_err(|_| format!("invalid HTTP method {:?}", route.method))?;
        let mut req = self.http.request(method, &url);
        if let Some(body) = &route.body {
            if serde_json::from_str::<serde_json::Value>(body).is_ok() {
                req = req.header("content-type", "application/json");
            }
            req = req.body(body.clone());
        }
        let resp = req.send().await.map_err(|e| describe(&url, &e))?;
        check(&url, resp).await.map(|_| ())
    }

    async fn run_command(&self, command: &str) -> Result<(), String> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {command:?}: {e}"))?;
        match tokio::time::timeout(self.config.timeout, child.wait_with_output()).await {
            Err(_) => Err(format!(
                "{command:?} did not finish within {} ms",
                self.config.timeout.as_millis()
            )),
            Ok(Err(e)) => Err(format!("{command:?}: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let tail: String = stderr
                    .trim()
                    .chars()
                    .rev()
                    .take(200)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Err(format!("{command:?} failed ({}): {tail}", out.status))
            }
        }
    }
}

fn describe(url: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("{url}: timed out")
    } else if e.is_connect() {
        format!("{url}: cannot connect (is it running?)")
    } else {
        format!("{url}: {e}")
    }
}

async fn check(url: &str, resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("{url}: reading the answer: {e}"))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(200).collect();
        return Err(format!("{url} answered {status}: {text}"));
    }
    Ok(body.to_vec())
}
