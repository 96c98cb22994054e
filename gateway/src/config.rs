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
    /// vramd's `--aging` (a waiter's effective priority rises by one per
    /// this long); the drain limit reckons with it.
    #[serde(default = "default_aging")]
    pub aging: String,
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
    /// `ollama` or `openai`.
    pub kind: String,
    /// Base URL of the app, e.g. `http://127.0.0.1:11434`; for `openai`,
    /// the default of its models' `upstream`.
    pub upstream: Option<String>,
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
    /// How long a waiter in vramd may outrank one of this app's busy models
    /// before the gateway stops admitting new requests for that model.
    #[serde(default = "default_drain_limit")]
    pub drain_limit: String,
    /// `openai`: the models served (`[[app.model]]`).
    #[serde(default, rename = "model")]
    pub models: Vec<ModelConfig>,
    /// `comfyui`: what the app takes on the card with its models loaded
    /// (`"13GiB"`); may be left out when the state file has an observed size.
    pub size: Option<String>,
    /// `comfyui`, `http`: a file holding the app's pid (attributed to its
    /// reservation); absent: the process listening on the upstream's port.
    pub pid_file: Option<PathBuf>,
    /// `http`: the path prefixes forwarded (others are `404`); default `["/"]`.
    #[serde(default)]
    pub routes: Vec<String>,
    /// `http`: the request that loads the app's model again after an
    /// eviction; `command`: the shell command that does.
    pub load: Option<Action>,
    /// `http`: the request that frees the app's memory (without it the app
    /// is never evicted); `command`: the shell command that does (required).
    pub unload: Option<Action>,
    /// `http`: the request whose 2xx answer means the app is up.
    pub health: Option<CallConfig>,
    /// `http`: reserved from the start and never evicted.
    #[serde(default)]
    pub always_on: bool,
    /// `http`: other apps of this gateway that are never evicted for this
    /// one (nor it for them).
    #[serde(default)]
    pub coexists_with: Vec<String>,
    /// `http`: longest the load request and the wait for health may take;
    /// `command`: longest the `load` command may run.
    pub load_timeout: Option<String>,
    /// `command`: longest the `unload` command may run (default 60 s).
    pub unload_timeout: Option<String>,
    /// `command`: the device index the app uses (default: any).
    pub device: Option<u32>,
    /// `http`, `command`: loaded again (its reservation taken, its `load`
    /// made) when it was evicted and vramd's queue is empty.
    #[serde(default)]
    pub restore: bool,
    /// Wait before a failed unload, load or restore is tried again
    /// (`"5s"`); doubles with each failure in a row, up to 5 minutes.
    pub retry_backoff: Option<String>,
    /// `managed`: longest a started server may take to answer its health
    /// check (default 120 s).
    pub start_timeout: Option<String>,
    /// `managed`: how long a stopped server has after `SIGTERM` before
    /// `SIGKILL` (default 10 s).
    pub stop_timeout: Option<String>,
    /// `managed`: groups of model names that may run together; starting a
    /// model stops the app's running models that share no group with it.
    #[serde(default)]
    pub groups: Vec<Vec<String>>,
    /// `managed`: the pipe directory of the NVIDIA MPS server that
    /// `enforce = true` models run under (default: the one vramd reports).
    pub mps_pipe_dir: Option<PathBuf>,
    /// `managed`: the MPS server's log directory, passed on as
    /// `CUDA_MPS_LOG_DIRECTORY` (default: the one vramd reports).
    pub mps_log_dir: Option<PathBuf>,
}

/// `load`/`unload`: a request (`http`) or a shell command (`command`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Action {
    /// A shell command, run with `sh -c`.
    Command(String),
    /// An HTTP request.
    Call(CallConfig),
}

impl Action {
    fn call(&self) -> Option<&CallConfig> {
        match self {
            Action::Call(c) => Some(c),
            Action::Command(_) => None,
        }
    }
    fn command(&self) -> Option<&str> {
        match self {
            Action::Command(c) => Some(c),
            Action::Call(_) => None,
        }
    }
}

/// One `[[app.model]]` of an `openai` app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients put in the body's `model`, matched exactly.
    pub name: String,
    /// Base URL of the server that serves it; the app's `upstream` when absent.
    pub upstream: Option<String>,
    /// Memory it takes once loaded (`"16GiB"`); may be left out when the
    /// state file has an observed size for it.
    pub size: Option<String>,
    /// The request that makes the server free the model's memory, called
    /// when vramd evicts it; without it the model is never evicted.
    pub unload: Option<CallConfig>,
    /// The request that makes the server load the model again, called after
    /// a new reservation is granted and before the first request is forwarded.
    pub load: Option<CallConfig>,
    /// `managed`: the command that serves the model (macros `${PORT}`,
    /// `${MODEL}`, `${DEVICE}`), split into words as a shell would but run
    /// without one.
    pub cmd: Option<String>,
    /// `managed`: the base URL requests are forwarded to (default
    /// `http://127.0.0.1:${PORT}`).
    pub proxy: Option<String>,
    /// `managed`: the path whose 2xx answer means the server is ready
    /// (default `/health`; `"none"`: ready once started).
    pub health: Option<String>,
    /// `managed`: idle time after which the server is stopped and its
    /// reservation released (absent: never).
    pub ttl: Option<String>,
    /// `managed`: extra environment variables for the server.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `managed`: run the server capped at its reservation through NVIDIA
    /// MPS (`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`).
    #[serde(default)]
    pub enforce: bool,
}

/// An HTTP request the gateway makes to a server (`unload`, `load`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    /// `POST` when absent.
    pub method: Option<String>,
    /// A path on the model's upstream (`"/sleep"`); or give `url`.
    pub path: Option<String>,
    /// A whole `http://` URL; or give `path`.
    pub url: Option<String>,
    /// The body; sent as `application/json` when it is JSON.
    pub body: Option<String>,
}

/// The kind of an app: which API the gateway speaks to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Ollama: one upstream, models named in bodies, `/api/ps`.
    Ollama,
    /// Any OpenAI-compatible server: models routed to their own upstreams.
    #[serde(rename = "openai")]
    OpenAi,
    /// ComfyUI: one reservation for the app, `POST /prompt` gated, busy
    /// while its queue has prompts, evicted with `/free`.
    #[serde(rename = "comfyui")]
    ComfyUi,
    /// Any HTTP model service with load, unload and health routes: one
    /// reservation for the app, loaded again before the first request after
    /// an eviction.
    Http,
    /// An app with no API: one idle reservation mirrored while it is
    /// loaded, evicted by running its `unload` shell command.
    Command,
    /// Model servers the gateway starts itself, one per model, under the
    /// model's reservation, and stops when evicted or idle past their TTL.
    Managed,
}

/// A request the gateway makes, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Upper-case method.
    pub method: String,
    /// The whole URL.
    pub url: String,
    /// The body, if any.
    pub body: Option<String>,
}

/// One model of an `openai` app, parsed.
#[derive(Debug, Clone)]
pub struct OpenAiModel {
    /// See [`ModelConfig::name`].
    pub name: String,
    /// Base URL without a trailing `/`.
    pub upstream: String,
    /// The declared size, if any.
    pub size_bytes: Option<u64>,
    /// See [`ModelConfig::unload`].
    pub unload: Option<Call>,
    /// See [`ModelConfig::load`].
    pub load: Option<Call>,
}

/// One model of a `managed` app, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedModel {
    /// The body's `model`, matched exactly.
    pub name: String,
    /// The command's words, macros not yet replaced.
    pub argv: Vec<String>,
    /// The base URL template requests go to (macros not yet replaced).
    pub proxy: String,
    /// The declared size, if any.
    pub size_bytes: Option<u64>,
    /// The health path (starting with `/`); `None`: no health check.
    pub health: Option<String>,
    /// Idle time after which it is stopped; `None`: never.
    pub ttl: Option<Duration>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Capped at its reservation through NVIDIA MPS.
    pub enforce: bool,
}

impl ManagedModel {
    /// Whether `${PORT}` appears in its command or proxy (then the gateway
    /// picks a free loopback port for each start).
    pub fn uses_port(&self) -> bool {
        self.proxy.contains("${PORT}") || self.argv.iter().any(|w| w.contains("${PORT}"))
    }
}

/// Splits a command into words as a POSIX shell would, without running
/// one: whitespace (newlines included) separates words; `'…'` keeps
/// everything literally; `"…"` keeps everything but `\"` and `\\`;
/// a backslash outside quotes keeps the next character (a backslash before
/// a newline joins lines); `#` at the start of a word comments out the rest
/// of its line. No expansion of any kind.
pub fn split_command(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '#' if word.is_none() => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("a single quote is not closed".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => w.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("a double quote is not closed".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("a double quote is not closed".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("it ends with a backslash".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
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

fn default_aging() -> String {
    "10s".into()
}

fn default_drain_limit() -> String {
    "30s".into()
}

/// One app with its values parsed.
#[derive(Debug, Clone)]
pub struct App {
    /// See [`AppConfig::name`].
    pub name: String,
    /// See [`AppConfig::kind`].
    pub kind: Kind,
    /// Base URL without a trailing `/` (`openai`: the default of its
    /// models' upstreams, possibly empty).
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
    /// `openai`: the models, in the config's order.
    pub models: Vec<OpenAiModel>,
    /// See [`AppConfig::drain_limit`].
    pub drain_limit: Duration,
    /// See [`Config::aging`] (the same for every app).
    pub aging: Duration,
    /// `comfyui`: see [`AppConfig::size`].
    pub size_bytes: Option<u64>,
    /// `comfyui`, `http`: see [`AppConfig::pid_file`].
    pub pid_file: Option<PathBuf>,
    /// `http`: see [`AppConfig::routes`] (each starting with `/`).
    pub routes: Vec<String>,
    /// `http`: see [`AppConfig::load`].
    pub load: Option<Call>,
    /// `http`: see [`AppConfig::unload`].
    pub unload: Option<Call>,
    /// `http`: see [`AppConfig::health`].
    pub health: Option<Call>,
    /// `http`: see [`AppConfig::always_on`].
    pub always_on: bool,
    /// `http`: see [`AppConfig::coexists_with`].
    pub coexists_with: Vec<String>,
    /// `http`: see [`AppConfig::load_timeout`] (default 60 s).
    pub load_timeout: Duration,
    /// `command`: the `load` shell command.
    pub load_command: Option<String>,
    /// `command`: the `unload` shell command.
    pub unload_command: Option<String>,
    /// `command`: see [`AppConfig::unload_timeout`] (default 60 s).
    pub unload_timeout: Duration,
    /// `command`: see [`AppConfig::device`].
    pub device: Option<u32>,
    /// `http`, `command`: see [`AppConfig::restore`].
    pub restore: bool,
    /// See [`AppConfig::retry_backoff`] (default 5 s).
    pub retry_backoff: Duration,
    /// `managed`: the models, in the config's order.
    pub managed: Vec<ManagedModel>,
    /// `managed`: see [`AppConfig::start_timeout`] (default 120 s).
    pub start_timeout: Duration,
    /// `managed`: see [`AppConfig::stop_timeout`] (default 10 s).
    pub stop_timeout: Duration,
    /// `managed`: see [`AppConfig::groups`].
    pub groups: Vec<Vec<String>>,
    /// `managed`: see [`AppConfig::mps_pipe_dir`].
    pub mps_pipe_dir: Option<PathBuf>,
    /// `managed`: see [`AppConfig::mps_log_dir`].
    pub mps_log_dir: Option<PathBuf>,
}

impl App {
    /// The `openai` model named `name`, matched exactly.
    pub fn model(&self, name: &str) -> Option<&OpenAiModel> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The `managed` model named `name`, matched exactly.
    pub fn managed_model(&self, name: &str) -> Option<&ManagedModel> {
        self.managed.iter().find(|m| m.name == name)
    }

    /// The names of the models served (`openai` and `managed` apps).
    pub fn model_names(&self) -> Vec<&str> {
        self.models
            .iter()
            .map(|m| m.name.as_str())
            .chain(self.managed.iter().map(|m| m.name.as_str()))
            .collect()
    }

    /// Whether `managed` models `a` and `b` may run together: they share a
    /// group (a model always may run beside itself).
    pub fn may_run_together(&self, a: &str, b: &str) -> bool {
        a == b
            || self
                .groups
                .iter()
                .any(|g| g.iter().any(|m| m == a) && g.iter().any(|m| m == b))
    }
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
        let aging = parse_duration(&c.aging).map_err(|e| err(format!("aging: {e}")))?;
        if aging.is_zero() {
            return Err(err("aging: must be more than 0".into()));
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
            let kind = match a.kind.as_str() {
                "ollama" => Kind::Ollama,
                "openai" => Kind::OpenAi,
                "comfyui" => Kind::ComfyUi,
                "http" => Kind::Http,
                "command" => Kind::Command,
                "managed" => Kind::Managed,
                other => {
                    return Err(at(
                        "kind",
                        format!(
                            "unknown kind {other:?}; use \"ollama\", \"openai\", \"comfyui\", \"http\", \"command\" or \"managed\""
                        ),
                    ));
                }
            };
            let check_url = |key: &str, u: &str| -> Result<String, Error> {
                let u = u.trim_end_matches('/').to_string();
                if u.starts_with("http://") {
                    Ok(u)
                } else {
                    Err(at(
                        key,
                        format!("{u:?} is not an http:// URL (https upstreams are not supported)"),
                    ))
                }
            };
            let upstream = match (&a.upstream, kind) {
                (Some(u), _) => check_url("upstream", u)?,
                (None, Kind::Ollama | Kind::ComfyUi | Kind::Http) => {
                    return Err(at("upstream", "required".into()));
                }
                (None, Kind::OpenAi | Kind::Command | Kind::Managed) => String::new(),
            };
            let listen = a.listen;
            let mut models = Vec::new();
            let mut managed: Vec<ManagedModel> = Vec::new();
            if !matches!(kind, Kind::ComfyUi | Kind::Http | Kind::Command) {
                if a.size.is_some() {
                    return Err(at(
                        "size",
                        "only for kinds \"comfyui\", \"http\" and \"command\"".into(),
                    ));
                }
                if a.pid_file.is_some() {
                    return Err(at(
                        "pid_file",
                        "only for kinds \"comfyui\", \"http\" and \"command\"".into(),
                    ));
                }
            }
            if a.restore && !matches!(kind, Kind::Http | Kind::Command) {
                return Err(at(
                    "restore",
                    "only for kinds \"http\" and \"command\"".into(),
                ));
            }
            if a.restore && kind == Kind::Http && a.load.is_none() {
                return Err(at("restore", "needs a load request".into()));
            }
            if !matches!(kind, Kind::Http | Kind::Command) {
                let shared = [
                    ("load", a.load.is_some()),
                    ("unload", a.unload.is_some()),
                    ("load_timeout", a.load_timeout.is_some()),
                ];
                if let Some((key, _)) = shared.iter().find(|(_, set)| *set) {
                    return Err(at(key, "only for kinds \"http\" and \"command\"".into()));
                }
            }
            if kind != Kind::Http {
                let http_only = [
                    ("routes", !a.routes.is_empty()),
                    ("health", a.health.is_some()),
                    ("always_on", a.always_on),
                    ("coexists_with", !a.coexists_with.is_empty()),
                ];
                if let Some((key, _)) = http_only.iter().find(|(_, set)| *set) {
                    return Err(at(key, "only for kind \"http\"".into()));
                }
            }
            if kind != Kind::Command && a.unload_timeout.is_some() {
                return Err(at("unload_timeout", "only for kind \"command\"".into()));
            }
            if !matches!(kind, Kind::Command | Kind::Managed) && a.device.is_some() {
                return Err(at(
                    "device",
                    "only for kinds \"command\" and \"managed\"".into(),
                ));
            }
            if kind != Kind::Managed {
                let managed_only = [
                    ("start_timeout", a.start_timeout.is_some()),
                    ("stop_timeout", a.stop_timeout.is_some()),
                    ("groups", !a.groups.is_empty()),
                    ("mps_pipe_dir", a.mps_pipe_dir.is_some()),
                    ("mps_log_dir", a.mps_log_dir.is_some()),
                ];
                if let Some((key, _)) = managed_only.iter().find(|(_, set)| *set) {
                    return Err(at(key, "only for kind \"managed\"".into()));
                }
            }
            if kind != Kind::Managed
                && let Some((m, key)) = a.models.iter().find_map(|m| {
                    [
                        ("cmd", m.cmd.is_some()),
                        ("proxy", m.proxy.is_some()),
                        ("health", m.health.is_some()),
                        ("ttl", m.ttl.is_some()),
                        ("env", !m.env.is_empty()),
                        ("enforce", m.enforce),
                    ]
                    .into_iter()
                    .find(|(_, set)| *set)
                    .map(|(k, _)| (m, k))
                })
            {
                return Err(at(
                    &format!("model {:?}: {key}", m.name),
                    "only for kind \"managed\"".into(),
                ));
            }
            let (mut load_command, mut unload_command) = (None, None);
            if kind == Kind::Command {
                if a.upstream.is_some() || a.listen.is_some() {
                    let key = if a.upstream.is_some() {
                        "upstream"
                    } else {
                        "listen"
                    };
                    return Err(at(
                        key,
                        "not for kind \"command\" (the gateway fronts no requests for it)".into(),
                    ));
                }
                let cmd = |key: &str, x: &Option<Action>| -> Result<Option<String>, Error> {
                    match x {
                        None => Ok(None),
                        Some(Action::Command(c)) if !c.trim().is_empty() => Ok(Some(c.clone())),
                        Some(_) => Err(at(
                            key,
                            "a shell command (a non-empty string) for kind \"command\"".into(),
                        )),
                    }
                };
                load_command = cmd("load", &a.load)?;
                unload_command = cmd("unload", &a.unload)?;
                if unload_command.is_none() {
                    return Err(at("unload", "required for kind \"command\"".into()));
                }
                if a.size.is_none() {
                    return Err(at("size", "required for kind \"command\"".into()));
                }
                if a.restore && load_command.is_none() {
                    return Err(at("restore", "needs a load command".into()));
                }
            } else if let Some(key) = [("load", &a.load), ("unload", &a.unload)]
                .iter()
                .find(|(_, x)| x.as_ref().is_some_and(|x| x.command().is_some()))
                .map(|(k, _)| *k)
            {
                return Err(at(key, "a shell command is only for kind \"command\"; give { path = ... } or { url = ... }".into()));
            }
            let unload_timeout = match &a.unload_timeout {
                Some(t) => parse_duration(t).map_err(|e| at("unload_timeout", e.to_string()))?,
                None => Duration::from_secs(60),
            };
            let app_call = |key: &str, c: &CallConfig| -> Result<Call, Error> {
                let url = match (&c.path, &c.url) {
                    (Some(p), None) => {
                        let p = p.trim();
                        if p.starts_with('/') {
                            format!("{upstream}{p}")
                        } else {
                            format!("{upstream}/{p}")
                        }
                    }
                    (None, Some(u)) => check_url(&format!("{key}.url"), u)?,
                    _ => return Err(at(key, "give exactly one of path and url".into())),
                };
                let method = c.method.as_deref().unwrap_or("POST").to_ascii_uppercase();
                if reqwest::Method::from_bytes(method.as_bytes()).is_err() {
                    return Err(at(
                        &format!("{key}.method"),
                        format!("{method:?} is not an HTTP method"),
                    ));
                }
                Ok(Call {
                    method,
                    url,
                    body: c.body.clone(),
                })
            };
            let load = a
                .load
                .as_ref()
                .and_then(Action::call)
                .map(|c| app_call("load", c))
                .transpose()?;
            let unload = a
                .unload
                .as_ref()
                .and_then(Action::call)
                .map(|c| app_call("unload", c))
                .transpose()?;
            let health = a
                .health
                .as_ref()
                .map(|c| {
                    let mut c = c.clone();
                    c.method = Some(c.method.unwrap_or_else(|| "GET".into()));
                    app_call("health", &c)
                })
                .transpose()?;
            let load_timeout = match &a.load_timeout {
                Some(t) => parse_duration(t).map_err(|e| at("load_timeout", e.to_string()))?,
                None => Duration::from_secs(60),
            };
            let routes = if a.routes.is_empty() {
                vec!["/".to_string()]
            } else {
                a.routes.clone()
            };
            if let Some(r) = routes.iter().find(|r| !r.starts_with('/')) {
                return Err(at("routes", format!("{r:?} does not start with '/'")));
            }
            let size_bytes = a
                .size
                .as_deref()
                .map(parse_size)
                .transpose()
                .map_err(|e| at("size", e.to_string()))?;
            match kind {
                Kind::Http | Kind::ComfyUi => {
                    let (name, what) = if kind == Kind::Http {
                        ("http", "its requests")
                    } else {
                        ("comfyui", "its prompts")
                    };
                    let one = if kind == Kind::Http {
                        "an http app"
                    } else {
                        "a ComfyUI app"
                    };
                    if listen.is_none() {
                        return Err(at(
                            "listen",
                            format!(
                                "required for kind \"{name}\" ({what} must go through the gateway)"
                            ),
                        ));
                    }
                    if !a.models.is_empty() {
                        return Err(at(
                            "model",
                            format!(
                                "[[app.model]] is for kind \"openai\"; {one} has one size (size)"
                            ),
                        ));
                    }
                    if !a.sizes.is_empty() {
                        return Err(at(
                            "sizes",
                            format!("not for kind \"{name}\": give the app's size"),
                        ));
                    }
                }
                Kind::Managed => {
                    if listen.is_none() {
                        return Err(at(
                            "listen",
                            "required for kind \"managed\" (its requests must go through the gateway)"
                                .into(),
                        ));
                    }
                    if a.upstream.is_some() {
                        return Err(at(
                            "upstream",
                            "not for kind \"managed\": the gateway starts each model's server (see cmd, proxy)"
                                .into(),
                        ));
                    }
                    if a.size.is_some() || !a.sizes.is_empty() || a.pid_file.is_some() {
                        let key = if a.size.is_some() {
                            "size"
                        } else if a.pid_file.is_some() {
                            "pid_file"
                        } else {
                            "sizes"
                        };
                        return Err(at(
                            key,
                            "not for kind \"managed\": give each [[app.model]] its size".into(),
                        ));
                    }
                    if a.models.is_empty() {
                        return Err(at(
                            "model",
                            "kind \"managed\" needs at least one [[app.model]]".into(),
                        ));
                    }
                    for m in &a.models {
                        let mkey = |k: &str| format!("model {:?}: {k}", m.name);
                        if m.name.trim().is_empty() {
                            return Err(at("model.name", "must be non-empty".into()));
                        }
                        if managed.iter().any(|x| x.name == m.name) {
                            return Err(at(&mkey("name"), "declared twice".into()));
                        }
                        for (key, set) in [
                            ("upstream", m.upstream.is_some()),
                            ("load", m.load.is_some()),
                            ("unload", m.unload.is_some()),
                        ] {
                            if set {
                                return Err(at(
                                    &mkey(key),
                                    "not for kind \"managed\" (the gateway starts and stops the model's server)"
                                        .into(),
                                ));
                            }
                        }
                        let Some(cmd) = &m.cmd else {
                            return Err(at(&mkey("cmd"), "required for kind \"managed\"".into()));
                        };
                        let argv = split_command(cmd).map_err(|e| at(&mkey("cmd"), e))?;
                        if argv.is_empty() {
                            return Err(at(&mkey("cmd"), "names no program".into()));
                        }
                        let proxy = m
                            .proxy
                            .as_deref()
                            .unwrap_or("http://127.0.0.1:${PORT}")
                            .trim_end_matches('/')
                            .to_string();
                        if !proxy.starts_with("http://") {
                            return Err(at(
                                &mkey("proxy"),
                                format!("{proxy:?} is not an http:// URL"),
                            ));
                        }
                        let health = match m.health.as_deref().map(str::trim) {
                            None => Some("/health".to_string()),
                            Some("none") => None,
                            Some(p) if p.starts_with('/') => Some(p.to_string()),
                            Some(p) => {
                                return Err(at(
                                    &mkey("health"),
                                    format!("{p:?} does not start with '/' (or say \"none\")"),
                                ));
                            }
                        };
                        let ttl = m
                            .ttl
                            .as_deref()
                            .map(parse_duration)
                            .transpose()
                            .map_err(|e| at(&mkey("ttl"), e.to_string()))?
                            .filter(|t| !t.is_zero());
                        let size_bytes = m
                            .size
                            .as_deref()
                            .map(parse_size)
                            .transpose()
                            .map_err(|e| at(&mkey("size"), e.to_string()))?;
                        if let Some(k) = m.env.keys().find(|k| k.is_empty() || k.contains('=')) {
                            return Err(at(
                                &mkey("env"),
                                format!("{k:?} is not an environment variable name"),
                            ));
                        }
                        managed.push(ManagedModel {
                            name: m.name.clone(),
                            argv,
                            proxy,
                            size_bytes,
                            health,
                            ttl,
                            env: m.env.clone(),
                            enforce: m.enforce,
                        });
                    }
                    for g in &a.groups {
                        if let Some(x) = g.iter().find(|x| !managed.iter().any(|m| &m.name == *x)) {
                            return Err(at("groups", format!("{x:?} is not a model of this app")));
                        }
                    }
                }
                Kind::Command => {
                    if !a.models.is_empty() || !a.sizes.is_empty() {
                        return Err(at(
                            if a.sizes.is_empty() { "model" } else { "sizes" },
                            "not for kind \"command\": give the app's size".into(),
                        ));
                    }
                }
                Kind::Ollama => {
                    if !a.models.is_empty() {
                        return Err(at(
                            "model",
                            "[[app.model]] is for kind \"openai\"; an Ollama app finds its models itself"
                                .into(),
                        ));
                    }
                }
                Kind::OpenAi => {
                    if listen.is_none() {
                        return Err(at(
                            "listen",
                            "required for kind \"openai\" (an OpenAI-style server cannot be watched: it does not say what it has loaded)"
                                .into(),
                        ));
                    }
                    if !a.sizes.is_empty() {
                        return Err(at(
                            "sizes",
                            "not for kind \"openai\": give each [[app.model]] its size".into(),
                        ));
                    }
                    if a.models.is_empty() {
                        return Err(at(
                            "model",
                            "kind \"openai\" needs at least one [[app.model]]".into(),
                        ));
                    }
                    for m in &a.models {
                        let mkey = |k: &str| format!("model {:?}: {k}", m.name);
                        if m.name.trim().is_empty() {
                            return Err(at("model.name", "must be non-empty".into()));
                        }
                        if models.iter().any(|x: &OpenAiModel| x.name == m.name) {
                            return Err(at(&mkey("name"), "declared twice".into()));
                        }
                        let upstream = match &m.upstream {
                            Some(u) => check_url(&mkey("upstream"), u)?,
                            None if !upstream.is_empty() => upstream.clone(),
                            None => {
                                return Err(at(
                                    &mkey("upstream"),
                                    "required (or set the app's upstream)".into(),
                                ));
                            }
                        };
                        let size_bytes = m
                            .size
                            .as_deref()
                            .map(parse_size)
                            .transpose()
                            .map_err(|e| at(&mkey("size"), e.to_string()))?;
                        let call = |key: &str, c: &CallConfig| -> Result<Call, Error> {
                            let url = match (&c.path, &c.url) {
                                (Some(p), None) => {
                                    let p = p.trim();
                                    if p.starts_with('/') {
                                        format!("{upstream}{p}")
                                    } else {
                                        format!("{upstream}/{p}")
                                    }
                                }
                                (None, Some(u)) => check_url(&mkey(&format!("{key}.url")), u)?,
                                _ => {
                                    return Err(at(
                                        &mkey(key),
                                        "give exactly one of path and url".into(),
                                    ));
                                }
                            };
                            let method = c.method.as_deref().unwrap_or("POST").to_ascii_uppercase();
                            if reqwest::Method::from_bytes(method.as_bytes()).is_err() {
                                return Err(at(
                                    &mkey(&format!("{key}.method")),
                                    format!("{method:?} is not an HTTP method"),
                                ));
                            }
                            Ok(Call {
                                method,
                                url,
                                body: c.body.clone(),
                            })
                        };
                        models.push(OpenAiModel {
                            name: m.name.clone(),
                            size_bytes,
                            unload: m.unload.as_ref().map(|c| call("unload", c)).transpose()?,
                            load: m.load.as_ref().map(|c| call("load", c)).transpose()?,
                            upstream,
                        });
                    }
                }
            }
            let wait_limit = a
                .wait_limit
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| at("wait_limit", e.to_string()))?;
            let drain_limit =
                parse_duration(&a.drain_limit).map_err(|e| at("drain_limit", e.to_string()))?;
            let retry_backoff = match &a.retry_backoff {
                Some(t) => match parse_duration(t) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => return Err(at("retry_backoff", "must be more than 0".into())),
                    Err(e) => return Err(at("retry_backoff", e.to_string())),
                },
                None => crate::retry::DEFAULT_BACKOFF,
            };
            let start_timeout = match &a.start_timeout {
                Some(t) => parse_duration(t).map_err(|e| at("start_timeout", e.to_string()))?,
                None => Duration::from_secs(120),
            };
            let stop_timeout = match &a.stop_timeout {
                Some(t) => parse_duration(t).map_err(|e| at("stop_timeout", e.to_string()))?,
                None => Duration::from_secs(10),
            };
            let mut size_overrides = BTreeMap::new();
            for (model, size) in &a.sizes {
                let bytes =
                    parse_size(size).map_err(|e| at(&format!("sizes.{model}"), e.to_string()))?;
                size_overrides.insert(crate::ollama::normalize_model(model), bytes);
            }
            apps.push(App {
                name: a.name,
                kind,
                upstream,
                listen,
                priority: a.priority,
                wait_limit,
                evict_pinned: a.evict_pinned,
                context_length: a.context_length,
                size_overrides,
                models,
                drain_limit,
                aging,
                size_bytes,
                pid_file: a.pid_file,
                routes,
                load,
                unload,
                health,
                always_on: a.always_on,
                coexists_with: a.coexists_with,
                load_timeout,
                load_command,
                unload_command,
                unload_timeout,
                device: a.device,
                restore: a.restore,
                retry_backoff,
                managed,
                start_timeout,
                stop_timeout,
                groups: a.groups,
                mps_pipe_dir: a.mps_pipe_dir,
                mps_log_dir: a.mps_log_dir,
            });
        }
        if apps.is_empty() {
            return Err(err("no [[app]]: nothing to serve".into()));
        }
        for (i, a) in apps.iter().enumerate() {
            if let Some(b) = apps[..i]
                .iter()
                .find(|b| b.listen.is_some() && b.listen == a.listen)
                && (a.kind != Kind::Http || b.kind != Kind::Http)
            {
                return Err(err(format!(
                    "app {:?}: listen: {} is also app {:?}'s; only http apps may share a listen (routed by their routes)",
                    a.name,
                    a.listen.map(|l| l.to_string()).unwrap_or_default(),
                    b.name
                )));
            }
            for other in &a.coexists_with {
                if !apps
                    .iter()
                    .any(|x| &x.name == other && x.kind == Kind::Http)
                {
                    return Err(err(format!(
                        "app {:?}: coexists_with: {other:?} is not an http app of this file",
                        a.name
                    )));
                }
            }
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
        assert!(e.contains("at least one [[app.model]]"), "{e}");
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

    const OPENAI: &str = r#"
[[app]]
name = "llm"
kind = "openai"
listen = "127.0.0.1:8001"
upstream = "http://127.0.0.1:8000"

[[app.model]]
name = "qwen"
size = "16GiB"
unload = { path = "/sleep", body = "{\"level\":1}" }
load = { path = "wake_up" }

[[app.model]]
name = "embed"
upstream = "http://127.0.0.1:8002/"
size = "1GiB"
unload = { method = "delete", url = "http://127.0.0.1:9000/models/embed" }
"#;

    #[test]
    fn openai_models_get_their_upstreams_sizes_and_calls() {
        let s = Settings::parse(Path::new("g.toml"), OPENAI).unwrap();
        let a = &s.apps[0];
        assert_eq!(a.kind, Kind::OpenAi);
        let q = a.model("qwen").unwrap();
        assert_eq!(q.upstream, "http://127.0.0.1:8000");
        assert_eq!(q.size_bytes, Some(16 << 30));
        assert_eq!(
            q.unload,
            Some(Call {
                method: "POST".into(),
                url: "http://127.0.0.1:8000/sleep".into(),
                body: Some("{\"level\":1}".into()),
            })
        );
        assert_eq!(
            q.load.as_ref().unwrap().url,
            "http://127.0.0.1:8000/wake_up"
        );
        let e = a.model("embed").unwrap();
        assert_eq!(e.upstream, "http://127.0.0.1:8002");
        assert_eq!(e.unload.as_ref().unwrap().method, "DELETE");
        assert_eq!(
            e.unload.as_ref().unwrap().url,
            "http://127.0.0.1:9000/models/embed"
        );
        assert!(a.model("Qwen").is_none(), "names match exactly");
    }

    #[test]
    fn openai_mistakes_name_the_app_the_model_and_the_key() {
        let cases = [
            (
                OPENAI.replace(
                    "load = { path = \"wake_up\" }",
                    "load = { path = \"/a\", url = \"http://x\" }",
                ),
                "model \"qwen\": load: give exactly one of path and url",
            ),
            (
                OPENAI.replace("upstream = \"http://127.0.0.1:8000\"\n", ""),
                "model \"qwen\": upstream: required",
            ),
            (
                OPENAI.replace("name = \"embed\"", "name = \"qwen\""),
                "model \"qwen\": name: declared twice",
            ),
            (
                OPENAI.replace("listen = \"127.0.0.1:8001\"\n", ""),
                "app \"llm\": listen: required for kind \"openai\"",
            ),
            (
                OPENAI.replace("size = \"1GiB\"", "size = \"1\""),
                "model \"embed\": size",
            ),
            (
                OPENAI.replace("method = \"delete\"", "method = \"DE LETE\""),
                "unload.method",
            ),
            (
                format!("{OPENAI}\n[app.sizes]\nqwen = \"1GiB\"\n"),
                "sizes: not for kind",
            ),
            (
                format!("{FIRST}\n[[app.model]]\nname = \"x\"\n"),
                "is for kind \"openai\"",
            ),
        ];
        for (text, want) in cases {
            let e = Settings::parse(Path::new("g.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    const COMFY: &str = r#"
[[app]]
name = "comfy"
kind = "comfyui"
upstream = "http://127.0.0.1:8188"
listen = "127.0.0.1:8189"
size = "13GiB"
pid_file = "/run/comfy.pid"
"#;

    #[test]
    fn a_comfyui_app_has_one_size_and_maybe_a_pid_file() {
        let s = Settings::parse(Path::new("g.toml"), COMFY).unwrap();
        let a = &s.apps[0];
        assert_eq!(a.kind, Kind::ComfyUi);
        assert_eq!(a.size_bytes, Some(13 << 30));
        assert_eq!(a.pid_file, Some(PathBuf::from("/run/comfy.pid")));
        let cases = [
            (
                COMFY.replace("listen = \"127.0.0.1:8189\"\n", ""),
                "app \"comfy\": listen: required for kind \"comfyui\"",
            ),
            (
                COMFY.replace("upstream = \"http://127.0.0.1:8188\"\n", ""),
                "app \"comfy\": upstream: required",
            ),
            (
                COMFY.replace("\"13GiB\"", "\"lots\""),
                "app \"comfy\": size",
            ),
            (
                format!("{COMFY}[app.sizes]\nx = \"1GiB\"\n"),
                "sizes: not for kind \"comfyui\"",
            ),
            (format!("{FIRST}size = \"1GiB\"\n"), "size: only for kinds"),
            (
                format!("{FIRST}pid_file = \"/x\"\n"),
                "pid_file: only for kinds",
            ),
            (
                FIRST.replace("kind = \"ollama\"", "kind = \"comfy\""),
                "use \"ollama\", \"openai\", \"comfyui\", \"http\", \"command\" or \"managed\"",
            ),
        ];
        for (text, want) in cases {
            let e = Settings::parse(Path::new("g.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    const HTTP: &str = r#"
[[app]]
name = "tts"
kind = "http"
upstream = "http://127.0.0.1:9000"
listen = "127.0.0.1:9001"
routes = ["/v1/tts"]
size = "2.8GiB"
load = { path = "/load" }
unload = { path = "unload", body = "{}" }
health = { path = "/health" }
coexists_with = ["whisper"]

[[app]]
name = "whisper"
kind = "http"
upstream = "http://127.0.0.1:9100"
listen = "127.0.0.1:9101"
size = "1.5GiB"
always_on = true
load_timeout = "5s"
"#;

    #[test]
    fn http_apps_get_routes_calls_and_their_flags() {
        let s = Settings::parse(Path::new("g.toml"), HTTP).unwrap();
        let (t, w) = (&s.apps[0], &s.apps[1]);
        assert_eq!(t.kind, Kind::Http);
        assert_eq!(t.routes, ["/v1/tts"]);
        assert_eq!(t.load.as_ref().unwrap().url, "http://127.0.0.1:9000/load");
        let u = t.unload.as_ref().unwrap();
        assert_eq!(
            (u.method.as_str(), u.url.as_str()),
            ("POST", "http://127.0.0.1:9000/unload")
        );
        let h = t.health.as_ref().unwrap();
        assert_eq!(h.method, "GET", "health defaults to GET");
        assert_eq!(t.coexists_with, ["whisper"]);
        assert_eq!(t.load_timeout, Duration::from_secs(60));
        assert_eq!(w.routes, ["/"]);
        assert!(w.always_on && w.unload.is_none());
        assert_eq!(w.load_timeout, Duration::from_secs(5));
        let cases = [
            (
                HTTP.replace("\"whisper\"]", "\"nobody\"]"),
                "coexists_with: \"nobody\" is not an http app",
            ),
            (
                HTTP.replace("[\"/v1/tts\"]", "[\"v1\"]"),
                "routes: \"v1\" does not start with '/'",
            ),
            (
                HTTP.replace("load_timeout = \"5s\"", "load_timeout = \"x\""),
                "load_timeout",
            ),
            (
                HTTP.replacen("listen = \"127.0.0.1:9001\"\n", "", 1),
                "listen: required for kind \"http\"",
            ),
            (
                format!("{FIRST}always_on = true\n"),
                "always_on: only for kind \"http\"",
            ),
            (
                format!("{FIRST}routes = [\"/\"]\n"),
                "routes: only for kind \"http\"",
            ),
        ];
        for (text, want) in cases {
            let e = Settings::parse(Path::new("g.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    #[test]
    fn only_http_apps_may_share_a_listen() {
        let two = HTTP.replace("127.0.0.1:9101", "127.0.0.1:9001");
        let s = Settings::parse(Path::new("g.toml"), &two).unwrap();
        assert_eq!(s.apps[0].listen, s.apps[1].listen);
        let mixed = COMFY.replace("127.0.0.1:8189", "127.0.0.1:9001") + HTTP;
        let e = Settings::parse(Path::new("g.toml"), &mixed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only http apps may share a listen"), "{e}");
    }

    #[test]
    fn retry_backoff_defaults_to_5s_and_must_be_a_positive_duration() {
        let s = Settings::parse(Path::new("g.toml"), FIRST).unwrap();
        assert_eq!(s.apps[0].retry_backoff, Duration::from_secs(5));
        let t = format!("{FIRST}retry_backoff = \"1m\"\n");
        let s = Settings::parse(Path::new("g.toml"), &t).unwrap();
        assert_eq!(s.apps[0].retry_backoff, Duration::from_secs(60));
        for bad in ["soon", "0s"] {
            let t = format!("{FIRST}retry_backoff = \"{bad}\"\n");
            let e = Settings::parse(Path::new("g.toml"), &t)
                .unwrap_err()
                .to_string();
            assert!(e.contains("retry_backoff"), "{e}");
        }
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
        assert_eq!(s.apps[0].drain_limit, Duration::from_secs(30));
        assert_eq!(s.apps[0].aging, Duration::from_secs(10));
        let t = format!("aging = \"5s\"\n{FIRST}drain_limit = \"2s\"\n");
        let s = Settings::parse(Path::new("g.toml"), &t).unwrap();
        assert_eq!(s.apps[0].drain_limit, Duration::from_secs(2));
        assert_eq!(s.apps[0].aging, Duration::from_secs(5));
        let t = format!("{FIRST}drain_limit = \"soon\"\n");
        let e = Settings::parse(Path::new("g.toml"), &t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("drain_limit"), "{e}");
    }

    const COMMAND: &str = r#"
[[app]]
name = "sd"
kind = "command"
size = "6GiB"
unload = "systemctl --user stop sd"
load = "systemctl --user start sd"
pid_file = "/run/sd.pid"
unload_timeout = "20s"
device = 1
restore = true
"#;

    #[test]
    fn command_apps_get_their_commands_timeouts_and_restore() {
        let s = Settings::parse(Path::new("g.toml"), COMMAND).unwrap();
        let a = &s.apps[0];
        assert_eq!(a.kind, Kind::Command);
        assert_eq!(
            a.unload_command.as_deref(),
            Some("systemctl --user stop sd")
        );
        assert_eq!(a.load_command.as_deref(), Some("systemctl --user start sd"));
        assert!(a.unload.is_none() && a.load.is_none());
        assert_eq!(a.unload_timeout, Duration::from_secs(20));
        assert_eq!(
            (a.device, a.restore, a.size_bytes),
            (Some(1), true, Some(6 << 30))
        );
        let cases = [
            (
                COMMAND.replace("unload = \"systemctl --user stop sd\"\n", ""),
                "unload: required for kind \"command\"",
            ),
            (
                format!("{COMMAND}upstream = \"http://127.0.0.1:1\"\n"),
                "upstream: not for kind \"command\"",
            ),
            (
                COMMAND.replace("size = \"6GiB\"\n", ""),
                "size: required for kind \"command\"",
            ),
            (
                COMMAND.replace("load = \"systemctl --user start sd\"\n", ""),
                "restore: needs a load command",
            ),
            (
                COMMAND.replace("\"systemctl --user stop sd\"", "{ path = \"/x\" }"),
                "unload: a shell command",
            ),
            (
                format!("{COMMAND}always_on = true\n"),
                "always_on: only for kind \"http\"",
            ),
        ];
        for (text, want) in cases {
            let e = Settings::parse(Path::new("g.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        let e = Settings::parse(
            Path::new("g.toml"),
            "[[app]]\nname = \"x\"\nkind = \"http\"\nupstream = \"http://127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\nsize = \"1GiB\"\nunload = \"rm -rf /\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unload: a shell command is only for kind \"command\""),
            "{e}"
        );
        let e = Settings::parse(
            Path::new("g.toml"),
            &format!(
                "{}restore = true\n",
                "[[app]]\nname = \"x\"\nkind = \"ollama\"\nupstream = \"http://127.0.0.1:1\"\n"
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("restore: only for kinds \"http\" and \"command\""),
            "{e}"
        );
    }

    const MANAGED: &str = r#"
[[app]]
name = "llm"
kind = "managed"
listen = "127.0.0.1:8080"
start_timeout = "5m"
stop_timeout = "20s"
groups = [["qwen", "embed"]]
device = 1

[[app.model]]
name = "qwen"
cmd = """
llama-server --port ${PORT}   # the port the gateway picked
  -m '/models/Qwen3 8B.gguf' \\
  --ctx-size 8192
"""
size = "7GiB"
ttl = "5m"
enforce = true
env = { LLAMA_ARG_THREADS = "8" }

[[app.model]]
name = "embed"
cmd = "vllm serve BAAI/bge-m3 --port 9000"
proxy = "http://127.0.0.1:9000"
health = "none"
size = "2GiB"
"#;

    #[test]
    fn managed_models_get_their_commands_macros_groups_and_timeouts() {
        let s = Settings::parse(Path::new("g.toml"), MANAGED).unwrap();
        let a = &s.apps[0];
        assert_eq!(a.kind, Kind::Managed);
        assert_eq!(a.start_timeout, Duration::from_secs(300));
        assert_eq!(a.stop_timeout, Duration::from_secs(20));
        assert_eq!(a.device, Some(1));
        let q = a.managed_model("qwen").unwrap();
        assert_eq!(
            q.argv,
            [
                "llama-server",
                "--port",
                "${PORT}",
                "-m",
                "/models/Qwen3 8B.gguf",
                "--ctx-size",
                "8192"
            ]
        );
        assert_eq!(q.proxy, "http://127.0.0.1:${PORT}");
        assert!(q.uses_port() && q.enforce);
        assert_eq!(q.health.as_deref(), Some("/health"));
        assert_eq!(q.ttl, Some(Duration::from_secs(300)));
        assert_eq!(q.size_bytes, Some(7 << 30));
        assert_eq!(q.env["LLAMA_ARG_THREADS"], "8");
        let e = a.managed_model("embed").unwrap();
        assert!(!e.uses_port());
        assert_eq!((e.health.as_deref(), e.ttl), (None, None));
        assert!(a.may_run_together("qwen", "embed"));
        assert_eq!(a.model_names(), ["qwen", "embed"]);
        let defaults = MANAGED
            .replace("start_timeout = \"5m\"\n", "")
            .replace("stop_timeout = \"20s\"\n", "")
            .replace("groups = [[\"qwen\", \"embed\"]]\n", "");
        let a = &Settings::parse(Path::new("g.toml"), &defaults)
            .unwrap()
            .apps[0];
        assert_eq!(a.start_timeout, Duration::from_secs(120));
        assert_eq!(a.stop_timeout, Duration::from_secs(10));
        assert!(
            !a.may_run_together("qwen", "embed"),
            "no group: one at a time"
        );
        assert!(a.may_run_together("qwen", "qwen"));
    }

    #[test]
    fn managed_mistakes_name_the_app_the_model_and_the_key() {
        let cases = [
            (
                MANAGED.replace("cmd = \"vllm serve BAAI/bge-m3 --port 9000\"\n", ""),
                "model \"embed\": cmd: required for kind \"managed\"",
            ),
            (
                MANAGED.replace("[[\"qwen\", \"embed\"]]", "[[\"qwen\", \"nope\"]]"),
                "groups: \"nope\" is not a model of this app",
            ),
            (
                MANAGED.replace("listen = \"127.0.0.1:8080\"\n", ""),
                "listen: required for kind \"managed\"",
            ),
            (
                MANAGED.replace("health = \"none\"", "health = \"up\""),
                "model \"embed\": health",
            ),
            (
                MANAGED.replace("ttl = \"5m\"", "ttl = \"soon\""),
                "model \"qwen\": ttl",
            ),
            (
                MANAGED.replace("http://127.0.0.1:9000", "https://x"),
                "model \"embed\": proxy",
            ),
            (
                MANAGED.replace("name = \"embed\"", "name = \"qwen\""),
                "model \"qwen\": name: declared twice",
            ),
            (
                MANAGED.replace("--port 9000\"", "--port '9000\""),
                "cmd: a single quote is not closed",
            ),
            (
                format!("{MANAGED}upstream = \"http://127.0.0.1:1\"\n"),
                "model \"embed\": upstream: not for kind \"managed\"",
            ),
            (
                OPENAI.replace("size = \"1GiB\"", "size = \"1GiB\"\nttl = \"1m\""),
                "model \"embed\": ttl: only for kind \"managed\"",
            ),
            (
                format!("{FIRST}groups = [[\"a\"]]\n"),
                "groups: only for kind \"managed\"",
            ),
        ];
        for (text, want) in cases {
            let e = Settings::parse(Path::new("g.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

    #[test]
    fn commands_split_like_a_shell_without_one() {
        let w = split_command("a 'b c' \"d \\\" e\" f\\ g # comment\nh\\\ni").unwrap();
        assert_eq!(w, ["a", "b c", "d \" e", "f g", "hi"]);
        assert_eq!(split_command("x ''").unwrap(), ["x", ""]);
        assert!(split_command("x \"y").is_err());
        assert!(split_command("x\\").is_err());
        assert!(split_command("  # only a comment").unwrap().is_empty());
    }
}
