//! The config file (`vramd --config FILE`, TOML): daemon settings only —
//! the eviction timing. docs/configuration.md describes every key.
//!
//! ```toml
//! [eviction]
//! deadline = "30s"          # how long a victim has to free its memory
//! min_residency = "10s"     # idle reservations younger than this are kept
//! ```
//!
//! vramd talks to no app itself: the `[[consumer]]` entries and
//! `consumer_poll_interval` of older versions moved to vramd-gateway. A
//! file that still has them is refused with one error that names every
//! moved key and where it goes ([`moved_keys_error`]).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use vramd_protocol::parse_duration;

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
    /// It still has keys of the consumers vramd no longer has.
    #[error("invalid config file {path}: {message}")]
    Moved {
        /// The path.
        path: String,
        /// The moved keys, where each goes, and the docs to read.
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    eviction: RawEviction,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEviction {
    deadline: Option<String>,
    min_residency: Option<String>,
}

/// Where each consumer kind of old went (the gateway's `[[app]]`).
const KIND_MOVES: &str = "kind \"comfyui\" becomes an [[app]] with kind = \"comfyui\", \
    upstream = <its url>, a listen for its clients and size = <what it takes loaded>; \
    kind \"http\" becomes kind = \"http\" with upstream = <its url>, a listen, \
    size = <its vram>, unload and health as before; kind \"command\" becomes \
    kind = \"command\" with unload = <its unload_command> and size = <its vram>; \
    kind \"ollama\" becomes kind = \"ollama\" with upstream = <its url> and no listen \
    (watched)";

/// The error for a file with consumer keys: every moved key found, where
/// they go, what each kind becomes, and the docs to read.
pub fn moved_keys_error(keys: &[String]) -> String {
    format!(
        "{} moved to vramd-gateway: vramd no longer talks to apps itself. Remove {} here \
         and give each consumer to the gateway's config as an [[app]] with the same name \
         (see \"Moving from vramd's consumers\" in docs/gateway.md, and \"Moving an old \
         config\" in docs/configuration.md): {KIND_MOVES}; consumer_poll_interval becomes the \
         gateway's poll_interval",
        keys.join(", "),
        if keys.len() == 1 { "it" } else { "them" },
    )
}

/// The consumer keys of older versions in a parsed file, as a user would
/// name them (`[[consumer]] "comfyui"`, `eviction.consumer_poll_interval`).
fn moved_keys(doc: &toml::Table) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, value) in doc {
        if key == "consumer" || key == "consumers" {
            match value {
                toml::Value::Array(items) => {
                    let names: Vec<String> = items
                        .iter()
                        .map(|c| match c.get("name").and_then(|n| n.as_str()) {
                            Some(n) => format!("{n:?}"),
                            None => "(unnamed)".into(),
                        })
                        .collect();
                    keys.push(format!("[[{key}]] ({})", names.join(", ")));
                }
                _ => keys.push(format!("[{key}]")),
            }
        } else if key == "consumer_poll_interval" {
            keys.push(key.clone());
        }
    }
    if let Some(ev) = doc.get("eviction").and_then(|e| e.as_table()) {
        if ev.contains_key("consumer_poll_interval") {
            keys.push("eviction.consumer_poll_interval".into());
        }
    }
    keys
}

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `[eviction] deadline`.
    pub eviction_deadline: Option<Duration>,
    /// `[eviction] min_residency`.
    pub min_residency: Option<Duration>,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| {
            let path = path.display().to_string();
            match e {
                ConfigError::Parse { message, .. } => ConfigError::Parse { path, message },
                ConfigError::Invalid { message, .. } => ConfigError::Invalid { path, message },
                ConfigError::Moved { message, .. } => ConfigError::Moved { path, message },
                other => other,
            }
        })
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: String::new(),
            message: e.to_string(),
        };
        // Moved keys first: one error naming them all, rather than
        // "unknown field" for the first.
        let doc: toml::Table = toml::from_str(text).map_err(parse_error)?;
        let moved = moved_keys(&doc);
        if !moved.is_empty() {
            return Err(ConfigError::Moved {
                path: String::new(),
                message: moved_keys_error(&moved),
            });
        }
        let raw: RawConfig = toml::from_str(text).map_err(parse_error)?;
        let dur = |what: &str, v: &Option<String>| -> Result<Option<Duration>, ConfigError> {
            v.as_deref()
                .map(|s| {
                    parse_duration(s).map_err(|e| ConfigError::Invalid {
                        path: String::new(),
                        message: format!("{what}: {e}"),
                    })
                })
                .transpose()
        };
        Ok(Config {
            eviction_deadline: dur("eviction.deadline", &raw.eviction.deadline)?,
            min_residency: dur("eviction.min_residency", &raw.eviction.min_residency)?,
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
        assert_eq!(c.min_residency, Some(Duration::from_secs(10)));
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("[eviction]\ndeadline = \"soon\"", "eviction.deadline"),
            ("[eviction]\ncolor = 1", "unknown field"),
            ("color = 1", "unknown field"),
            ("[eviction", "invalid config file"),
        ];
        for (text, want) in cases {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn consumer_keys_are_refused_with_where_each_went() {
        let text = "[eviction]\ndeadline = \"30s\"\nconsumer_poll_interval = \"2s\"\n\
            [[consumer]]\nname = \"comfyui\"\nkind = \"comfyui\"\nurl = \"http://127.0.0.1:8188\"\n\
            [[consumer]]\nname = \"tts\"\nkind = \"http\"\nurl = \"http://127.0.0.1:5002\"\n";
        let e = Config::parse(text).unwrap_err();
        assert!(matches!(e, ConfigError::Moved { .. }), "{e:?}");
        let e = e.to_string();
        for want in [
            "[[consumer]] (\"comfyui\", \"tts\")",
            "eviction.consumer_poll_interval",
            "moved to vramd-gateway",
            "[[app]]",
            "docs/gateway.md",
            "Moving from vramd's consumers",
            "kind \"comfyui\" becomes",
            "kind \"http\" becomes",
            "kind \"command\" becomes",
            "kind \"ollama\" becomes",
            "gateway's poll_interval",
        ] {
            assert!(e.contains(want), "missing {want:?}: {e}");
        }
        // One key alone is named too, even beside an unknown one.
        let e = Config::parse("[[consumer]]\nname = \"w\"\nkind = \"command\"\ncolor = 1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[[consumer]] (\"w\") moved to vramd-gateway"),
            "{e}"
        );
        assert!(!e.contains("unknown field"), "{e}");
    }
}
