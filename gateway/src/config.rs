//! The gateway's TOML configuration (`vramd-gateway --config FILE`).
//!
//! Unknown keys are errors, and every error names the file and the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vramd_protocol::{parse_duration, parse_size};

use crate::Error;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The daemon's socket; the usual lookup (`VRAMD_SOCKET`, …) when absent.
    pub socket: Option<PathBuf>,
    /// Where the gateway serves `/status`, `/metrics` and `/healthz`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// File that keeps observed model sizes across restarts.
    pub state_file: Option<PathBuf>,
    /// How often each app's loaded models are read (Ollama's `/api/ps`).
    #[serde(default = "default_poll")]
    pub poll_interval: String,
    /// The apps served.
    #[serde(default, rename = "app")]
    pub apps: Vec<AppConfig>,
}

/// One `[[app]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Unique name; reservations are labelled `<name>/<model>`.
    pub name: String,
    /// Only `ollama` in this version.
    pub kind: String,
    /// Base URL of the app, e.g. `http://127.0.0.1:11434`.
    pub upstream: String,
    /// Where clients reach the app through the gateway; absent: the app is
    /// only watched (its resident models mirrored as idle reservations).
    pub listen: Option<SocketAddr>,
    /// Priority of this app's reservations in vramd's queue.
    #[serde(default)]
    pub priority: i32,
    /// Longest a request waits in vramd's queue (`"5m"`); absent: no limit.
    pub wait_limit: Option<String>,
    /// Whether models pinned with a negative `keep_alive` may be evicted.
    #[serde(default)]
    pub evict_pinned: bool,
    /// Context length assumed by the size estimate when a request sets none.
    #[serde(default = "default_ctx")]
    pub context_length: u64,
    /// Per-model sizes used before the first observation (`"llama3:8b" = "6GiB"`).
    #[serde(default)]
    pub sizes: BTreeMap<String, String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8090))
}

fn default_poll() -> String {
    "1s".into()
}

fn default_ctx() -> u64 {
    4096
}

/// One app with its values parsed.
#[derive(Debug, Clone)]
pub struct App {
    /// See [`AppConfig::name`].
    pub name: String,
    /// Base URL without a trailing `/`.
    pub upstream: String,
    /// See [`AppConfig::listen`]; `None`: watched only.
    pub listen: Option<SocketAddr>,
    /// See [`AppConfig::priority`].
    pub priority: i32,
    /// See [`AppConfig::wait_limit`].
    pub wait_limit: Option<Duration>,
    /// See [`AppConfig::evict_pinned`].
    pub evict_pinned: bool,
    /// See [`AppConfig::context_length`].
    pub context_length: u64,
    /// Size overrides, by normalized model name, in bytes.
    pub size_overrides: BTreeMap<String, u64>,
}

/// The configuration with every value checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// See [`Config::socket`].
    pub socket: PathBuf,
    /// See [`Config::listen`].
    pub listen: SocketAddr,
    /// See [`Config::state_file`] (resolved).
    pub state_file: PathBuf,
    /// See [`Config::poll_interval`].
    pub poll_interval: Duration,
    /// Every app.
    pub apps: Vec<App>,
}

impl Settings {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Settings, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` (read from `path`, named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Settings, Error> {
        let err = |message: String| Error::Config {
            file: path.to_path_buf(),
            message,
        };
        let c: Config = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let poll_interval =
            parse_duration(&c.poll_interval).map_err(|e| err(format!("poll_interval: {e}")))?;
        if poll_interval.is_zero() {
            return Err(err("poll_interval: must be more than 0".into()));
        }
        let mut apps: Vec<App> = Vec::new();
        for a in c.apps {
            let at = |key: &str, m: String| err(format!("app {:?}: {key}: {m}", a.name));
            if a.name.is_empty() || a.name.contains('/') {
                return Err(at("name", "must be non-empty and contain no '/'".into()));
            }
            if apps.iter().any(|x| x.name == a.name) {
                return Err(at("name", "another [[app]] has this name".into()));
            }
            match a.kind.as_str() {
                "ollama" => {}
                "openai" => {
                    return Err(at(
                        "kind",
                        "\"openai\" is not supported yet (see docs/gateway.md); use \"ollama\""
                            .into(),
                    ));
                }
                other => {
                    return Err(at(
                        "kind",
                        format!("unknown kind {other:?}; use \"ollama\""),
                    ));
                }
            }
            let upstream = a.upstream.trim_end_matches('/').to_string();
            if !upstream.starts_with("http://") {
                return Err(at(
                    "upstream",
                    format!(
                        "{upstream:?} is not an http:// URL (https upstreams are not supported)"
                    ),
                ));
            }
            let listen = a.listen;
            let wait_limit = a
                .wait_limit
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| at("wait_limit", e.to_string()))?;
            let mut size_overrides = BTreeMap::new();
            for (model, size) in &a.sizes {
                let bytes =
                    parse_size(size).map_err(|e| at(&format!("sizes.{model}"), e.to_string()))?;
                size_overrides.insert(crate::ollama::normalize_model(model), bytes);
            }
            apps.push(App {
                name: a.name,
                upstream,
                listen,
                priority: a.priority,
                wait_limit,
                evict_pinned: a.evict_pinned,
                context_length: a.context_length,
                size_overrides,
            });
        }
        if apps.is_empty() {
            return Err(err("no [[app]]: nothing to serve".into()));
        }
        Ok(Settings {
            socket: c
                .socket
                .unwrap_or_else(vramd_protocol::paths::client_socket_path),
            listen: c.listen,
            state_file: c.state_file.unwrap_or_else(default_state_file),
            poll_interval,
            apps,
        })
    }
}

/// `$XDG_STATE_HOME/vramd-gateway/sizes.json`, else
/// `~/.local/state/vramd-gateway/sizes.json`.
pub fn default_state_file() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state"))
        })
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("vramd-gateway").join("sizes.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: &str = r#"
socket = "/run/vramd/vramd.sock"     # optional: the usual lookup otherwise
listen = "127.0.0.1:8090"            # the gateway's own /status, /metrics, /healthz

[[app]]
name = "ollama"
kind = "ollama"
upstream = "http://127.0.0.1:11434"
listen = "127.0.0.1:11435"           # clients set OLLAMA_HOST / base_url to this
priority = 0
"#;

    #[test]
    fn the_first_config_in_the_docs_parses_as_written() {
        let s = Settings::parse(Path::new("g.toml"), FIRST).unwrap();
        assert_eq!(s.socket, PathBuf::from("/run/vramd/vramd.sock"));
        assert_eq!(s.listen, "127.0.0.1:8090".parse().unwrap());
        assert_eq!(s.apps.len(), 1);
        let a = &s.apps[0];
        assert_eq!(a.name, "ollama");
        assert_eq!(a.upstream, "http://127.0.0.1:11434");
        assert_eq!(a.listen, Some("127.0.0.1:11435".parse().unwrap()));
        assert_eq!(a.wait_limit, None);
        assert!(!a.evict_pinned);
    }

    #[test]
    fn unknown_keys_and_deferred_kinds_are_errors_naming_the_key() {
        let e = Settings::parse(Path::new("g.toml"), &format!("{FIRST}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus") && e.contains("g.toml"), "{e}");
        let openai = FIRST.replace("kind = \"ollama\"", "kind = \"openai\"");
        let e = Settings::parse(Path::new("g.toml"), &openai)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported yet"), "{e}");
        let https = FIRST.replace("http://127.0.0.1:11434", "https://127.0.0.1:11434");
        let e = Settings::parse(Path::new("g.toml"), &https)
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream") && e.contains("https"), "{e}");
        let sizes = format!("{FIRST}\n[app.sizes]\n\"llama3\" = \"lots\"\n");
        let e = Settings::parse(Path::new("g.toml"), &sizes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sizes.llama3"), "{e}");
    }

    #[test]
    fn an_app_without_listen_is_watched() {
        let t = FIRST.replace("listen = \"127.0.0.1:11435\"", "");
        let s = Settings::parse(Path::new("g.toml"), &t).unwrap();
        assert_eq!(s.apps[0].listen, None);
    }

    #[test]
    fn size_overrides_are_keyed_by_the_normalized_name() {
        let t = format!("{FIRST}wait_limit = \"2m\"\n[app.sizes]\n\"llama3\" = \"6GiB\"\n");
        let s = Settings::parse(Path::new("g.toml"), &t).unwrap();
        assert_eq!(s.apps[0].size_overrides["llama3:latest"], 6 << 30);
        assert_eq!(s.apps[0].wait_limit, Some(Duration::from_secs(120)));
    }
}
