//! The config file (`vramd --config FILE`, TOML): eviction settings and the
//! external consumers vramd may ask to unload. docs/configuration.md
//! describes every key.
//!
//! ```toml
//! [eviction]
//! deadline = "30s"          # how long a victim has to free its memory
//! min_residency = "10s"     # idle SDK reservations younger than this are kept
//! consumer_poll_interval = "2s"
//!
//! [[consumer]]
//! name = "comfyui"
//! kind = "comfyui"
//! url = "http://127.0.0.1:8188"
//! ```
//!
//! Ollama is no consumer kind any more: `vramd-gateway` watches it per model
//! (an `[[app]]` without `listen`); a `kind = "ollama"` here is an error
//! that says how to move it ([`OLLAMA_MOVED`]).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use vramd_protocol::{parse_duration, parse_size};

/// Why the config file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It is not valid TOML or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The path.
        path: String,
        /// What is wrong, with its position.
        message: String,
    },
    /// A value is wrong.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    eviction: RawEviction,
    #[serde(default, rename = "consumer")]
    consumers: Vec<RawConsumer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEviction {
    deadline: Option<String>,
    min_residency: Option<String>,
    consumer_poll_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    body: Option<String>,
}

fn default_method() -> String {
    "POST".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    name: String,
    kind: String,
    url: Option<String>,
    device: Option<u32>,
    #[serde(default)]
    priority: i32,
    min_residency: Option<String>,
    #[serde(default)]
    coexist_with: Vec<String>,
    timeout: Option<String>,
    vram: Option<String>,
    unload: Option<RawRoute>,
    health: Option<RawRoute>,
    unload_command: Option<String>,
    cooldown: Option<String>,
}

/// An HTTP route: method, path, optional body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path appended to the consumer's URL, e.g. `/unload`.
    pub path: String,
    /// Request body (sent as JSON when it parses as JSON).
    pub body: Option<String>,
}

/// What a `kind = "ollama"` consumer is told: the project keeps one
/// implementation of Ollama's API, in vramd-gateway.
pub const OLLAMA_MOVED: &str = "kind \"ollama\" is no longer a vramd consumer: Ollama is \
    watched per model by vramd-gateway now. Remove this [[consumer]] and add to the gateway's \
    config an [[app]] with the same name, kind = \"ollama\", upstream = <this url> and no listen \
    (see \"Moving from vramd's Ollama consumer\" in docs/gateway.md)";

/// How vramd talks to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerKind {
    /// ComfyUI: `GET /system_stats`, unload with `POST /free`.
    ComfyUi {
        /// Base URL.
        url: String,
    },
    /// Any HTTP app with an unload route and a declared resident size.
    Http {
        /// Base URL.
        url: String,
        /// The unload route.
        unload: Route,
        /// A route that answers 2xx while the app is up.
        health: Option<Route>,
        /// Memory it holds while loaded.
        vram_bytes: u64,
    },
    /// A shell command that unloads (e.g. stops a service).
    Command {
        /// Run with `sh -c`.
        unload_command: String,
        /// Memory it holds while loaded.
        vram_bytes: u64,
    },
}

impl ConsumerKind {
    /// The kind's name as in the config.
    pub fn name(&self) -> &'static str {
        match self {
            ConsumerKind::ComfyUi { .. } => "comfyui",
            ConsumerKind::Http { .. } => "http",
            ConsumerKind::Command { .. } => "command",
        }
    }
}

/// One `[[consumer]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Unique name.
    pub name: String,
    /// How to reach it.
    pub kind: ConsumerKind,
    /// Device index it lives on; `None`: any.
    pub device: Option<u32>,
    /// Evicted only for waiters of at least this priority (default 0).
    pub priority: i32,
    /// Not evicted until resident this long (default 30 s).
    pub min_residency: Duration,
    /// Labels of requests it is never evicted for.
    pub coexist_with: Vec<String>,
    /// Time limit of each HTTP call or command (default 5 s).
    pub timeout: Duration,
    /// `http`/`command`: after an unload, assumed unloaded this long (default 60 s).
    pub cooldown: Duration,
}

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `[eviction] deadline`.
    pub eviction_deadline: Option<Duration>,
    /// `[eviction] min_residency`.
    pub min_residency: Option<Duration>,
    /// `[eviction] consumer_poll_interval` (default 2 s).
    pub consumer_poll_interval: Option<Duration>,
    /// `[[consumer]]` entries.
    pub consumers: Vec<ConsumerConfig>,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: String::new(),
            message,
        };
        let dur = |what: &str, v: &Option<String>| -> Result<Option<Duration>, ConfigError> {
            v.as_deref()
                .map(|s| parse_duration(s).map_err(|e| invalid(format!("{what}: {e}"))))
                .transpose()
        };
        let mut consumers: Vec<ConsumerConfig> = Vec::new();
        for c in raw.consumers {
            let ctx = format!("consumer {:?}", c.name);
            if c.name.trim().is_empty() {
                return Err(invalid("a consumer needs a non-empty name".into()));
            }
            if consumers.iter().any(|x| x.name == c.name) {
                return Err(invalid(format!("{ctx} is declared twice")));
            }
            let url = || -> Result<String, ConfigError> {
                let u = c
                    .url
                    .clone()
                    .ok_or_else(|| invalid(format!("{ctx}: kind {} needs a url", c.kind)))?;
                if u.get(..8)
                    .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
                {
                    return Err(invalid(format!(
                        "{ctx}: url {u:?}: https is not supported (vramd has no TLS built in); \
                         use http:// to the app on this machine"
                    )));
                }
                if !u.starts_with("http://") {
                    return Err(invalid(format!("{ctx}: url {u:?} must start with http://")));
                }
                Ok(u.trim_end_matches('/').to_string())
            };
            let vram = || -> Result<u64, ConfigError> {
                let v = c.vram.as_deref().ok_or_else(|| {
                    invalid(format!(
                        "{ctx}: kind {} needs vram (its resident size, e.g. \"2.8GiB\")",
                        c.kind
                    ))
                })?;
                parse_size(v).map_err(|e| invalid(format!("{ctx}: vram: {e}")))
            };
            let route = |r: &RawRoute| Route {
                method: r.method.to_ascii_uppercase(),
                path: if r.path.starts_with('/') {
                    r.path.clone()
                } else {
                    format!("/{}", r.path)
                },
                body: r.body.clone(),
            };
            let kind = match c.kind.as_str() {
                "ollama" => return Err(invalid(format!("{ctx}: {OLLAMA_MOVED}"))),
                "comfyui" => ConsumerKind::ComfyUi { url: url()? },
                "http" => ConsumerKind::Http {
                    url: url()?,
                    unload: c.unload.as_ref().map(route).ok_or_else(|| {
                        invalid(format!("{ctx}: kind http needs an unload route"))
                    })?,
                    health: c.health.as_ref().map(route),
                    vram_bytes: vram()?,
                },
                "command" => ConsumerKind::Command {
                    unload_command: c
                        .unload_command
                        .clone()
                        .filter(|s| !s.trim().is_empty())
                        .ok_or_else(|| {
                            invalid(format!("{ctx}: kind command needs unload_command"))
                        })?,
                    vram_bytes: vram()?,
                },
                other => {
                    return Err(invalid(format!(
                        "{ctx}: unknown kind {other:?}; use comfyui, http or command"
                    )));
                }
            };
            consumers.push(ConsumerConfig {
                name: c.name.clone(),
                kind,
                device: c.device,
                priority: c.priority,
                min_residency: dur(&format!("{ctx}: min_residency"), &c.min_residency)?
                    .unwrap_or(Duration::from_secs(30)),
                coexist_with: c.coexist_with.clone(),
                timeout: dur(&format!("{ctx}: timeout"), &c.timeout)?
                    .unwrap_or(Duration::from_secs(5)),
                cooldown: dur(&format!("{ctx}: cooldown"), &c.cooldown)?
                    .unwrap_or(Duration::from_secs(60)),
            });
        }
        Ok(Config {
            eviction_deadline: dur("eviction.deadline", &raw.eviction.deadline)?,
            min_residency: dur("eviction.min_residency", &raw.eviction.min_residency)?,
            consumer_poll_interval: dur(
                "eviction.consumer_poll_interval",
                &raw.eviction.consumer_poll_interval,
            )?,
            consumers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../docs/examples/vramd.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.eviction_deadline, Some(Duration::from_secs(30)));
        let names: Vec<&str> = c.consumers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["comfyui", "tts", "whisper"]);
        let tts = parse_size("2.8GiB").unwrap();
        assert!(
            matches!(&c.consumers[1].kind, ConsumerKind::Http { vram_bytes, .. } if *vram_bytes == tts)
        );
        assert_eq!(c.consumers[0].priority, 5);
        assert_eq!(c.consumers[0].coexist_with, ["tts"]);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                "[[consumer]]\nname = \"a\"\nkind = \"olama\"\nurl = \"http://x\"",
                "unknown kind",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"comfyui\"",
                "needs a url",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://x\"\nvram = \"1GiB\"",
                "unload route",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"command\"\nunload_command = \"true\"",
                "needs vram",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"comfyui\"\nurl = \"http://x\"\ncolor = 1",
                "unknown field",
            ),
            ("[eviction]\ndeadline = \"soon\"", "eviction.deadline"),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"comfyui\"\nurl = \"ftp://x\"",
                "http://",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"comfyui\"\nurl = \"https://x\"",
                "https is not supported (vramd has no TLS built in)",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"http\"\nurl = \"HTTPS://x\"\nvram = \"1GiB\"\nunload = { path = \"/u\" }",
                "https is not supported",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"command\"\nunload_command = \"true\"\nvram = \"2\"",
                "did you mean 2GiB?",
            ),
            (
                "[[consumer]]\nname = \"a\"\nkind = \"comfyui\"\nurl = \"http://x\"\n[[consumer]]\nname = \"a\"\nkind = \"comfyui\"\nurl = \"http://y\"",
                "twice",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn an_ollama_consumer_is_told_to_move_to_the_gateway() {
        let e = Config::parse(
            "[[consumer]]\nname = \"chat\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:11434\"",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "consumer \"chat\"",
            "kind \"ollama\"",
            "vramd-gateway",
            "kind = \"ollama\"",
            "no listen",
            "docs/gateway.md",
        ] {
            assert!(e.contains(want), "missing {want:?}: {e}");
        }
    }
}
