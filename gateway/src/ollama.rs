//! What the gateway knows of Ollama's API: which requests load a model,
//! the model-name rules, `/api/ps`, `/api/tags`, `/api/show` and unloading.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::Error;

/// Extra memory on top of the weights and the KV cache for the compute
/// graph and CUDA context, in the size estimate.
pub const ESTIMATE_OVERHEAD_BYTES: u64 = 512 << 20;
/// Safety margin of the size estimate, in percent of weights + KV cache.
pub const ESTIMATE_MARGIN_PERCENT: u64 = 10;
/// Longest any call the gateway itself makes to Ollama may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Ollama's name for `model`: a name without a tag means `:latest`.
pub fn normalize_model(model: &str) -> String {
    let last = model.rsplit('/').next().unwrap_or(model);
    if last.contains(':') {
        model.to_string()
    } else {
        format!("{model}:latest")
    }
}

/// The routes whose requests make Ollama load the model their body names.
pub fn loads_model(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::POST
        && matches!(
            path,
            "/api/generate"
                | "/api/chat"
                | "/api/embed"
                | "/api/embeddings"
                | "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
        )
}

/// What a model request's body says that the gateway acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCall {
    /// The normalized model name.
    pub model: String,
    /// The request's own `keep_alive`, in seconds (negative: forever).
    pub keep_alive_secs: Option<f64>,
    /// Whether it only unloads (`keep_alive: 0` with nothing to generate):
    /// Ollama then loads nothing.
    pub unload_only: bool,
    /// `options.num_ctx`, if set.
    pub num_ctx: Option<u64>,
}

/// Reads the body of a request to a model route; `Err` is a 400.
pub fn parse_call(path: &str, body: &[u8]) -> Result<ModelCall, Error> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("the request body is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(Error::BadRequest(
            "the request body must be a JSON object".into(),
        ));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.trim(),
        Some(Value::String(_)) | None => {
            return Err(Error::BadRequest("model is required".into()));
        }
        Some(_) => return Err(Error::BadRequest("model must be a string".into())),
    };
    let keep_alive_secs = match obj.get("keep_alive") {
        None | Some(Value::Null) => None,
        Some(k) => Some(parse_keep_alive(k).ok_or_else(|| {
            Error::BadRequest(format!(
                "keep_alive {k} is neither a number of seconds nor a duration"
            ))
        })?),
    };
    let empty = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    let nothing_to_do = match path {
        "/api/generate" => empty("prompt"),
        "/api/chat" => empty("messages"),
        _ => false,
    };
    let unload_only = nothing_to_do && keep_alive_secs == Some(0.0);
    let num_ctx = obj
        .get("options")
        .and_then(|o| o.get("num_ctx"))
        .and_then(Value::as_u64);
    Ok(ModelCall {
        model: normalize_model(model),
        keep_alive_secs,
        unload_only,
        num_ctx,
    })
}

/// Ollama's `keep_alive`: a number of seconds, or a Go duration such as
/// `"5m"`, `"1h30m"`, `"-1"`, `"-1m"` (negative: keep forever).
pub fn parse_keep_alive(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(n) = s.parse::<f64>() {
                return Some(n);
            }
            let (neg, mut rest) = match s.strip_prefix('-') {
                Some(r) => (true, r),
                None => (false, s),
            };
            let mut total = 0.0;
            while !rest.is_empty() {
                let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
                let (num, tail) = rest.split_at(split);
                let value: f64 = num.parse().ok()?;
                let unit_len = tail
                    .find(|c: char| c.is_ascii_digit() || c == '.')
                    .unwrap_or(tail.len());
                let (unit, next) = tail.split_at(unit_len);
                let scale = match unit {
                    "ns" => 1e-9,
                    "us" | "µs" => 1e-6,
                    "ms" => 1e-3,
                    "s" => 1.0,
                    "m" => 60.0,
                    "h" => 3600.0,
                    _ => return None,
                };
                total += value * scale;
                rest = next;
            }
            Some(if neg { -total } else { total })
        }
        _ => None,
    }
}

/// One entry of `/api/ps`.
#[derive(Debug, Clone, Deserialize)]
pub struct Running {
    /// The model's name, e.g. `llama3:latest`.
    pub name: String,
    /// Total size.
    #[serde(default)]
    pub size: u64,
    /// Bytes in GPU memory.
    #[serde(default)]
    pub size_vram: u64,
    /// When Ollama unloads it by itself.
    #[serde(default)]
    pub expires_at: Option<String>,
}

#[derive(Deserialize)]
struct Ps {
    #[serde(default)]
    models: Vec<Running>,
}

#[derive(Deserialize)]
struct Tags {
    #[serde(default)]
    models: Vec<Tag>,
}

#[derive(Deserialize)]
struct Tag {
    name: String,
    #[serde(default)]
    size: u64,
}

/// The gateway's own calls to one Ollama.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Base URL.
    pub base: String,
    http: reqwest::Client,
}

impl Upstream {
    /// Calls to `base` through `http`.
    pub fn new(base: String, http: reqwest::Client) -> Upstream {
        Upstream { base, http }
    }

    /// The HTTP client used for it.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn down(&self, e: impl std::fmt::Display) -> Error {
        Error::Upstream {
            upstream: self.base.clone(),
            message: e.to_string(),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<T>, Error> {
        let resp = req
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.down(e))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.down(format!("answered {}", resp.status())));
        }
        resp.json().await.map(Some).map_err(|e| self.down(e))
    }

    /// The loaded models (`GET /api/ps`).
    pub async fn ps(&self) -> Result<Vec<Running>, Error> {
        let ps: Option<Ps> = self
            .get_json(self.http.get(format!("{}/api/ps", self.base)))
            .await?;
        Ok(ps.map(|p| p.models).unwrap_or_default())
    }

    /// The size on disk of `model` (`GET /api/tags`), `None` if not pulled.
    pub async fn file_size(&self, model: &str) -> Result<Option<u64>, Error> {
        let tags: Option<Tags> = self
            .get_json(self.http.get(format!("{}/api/tags", self.base)))
            .await?;
        Ok(tags
            .unwrap_or(Tags { models: vec![] })
            .models
            .into_iter()
            .find(|t| normalize_model(&t.name) == model)
            .map(|t| t.size))
    }

    /// `model_info` of `POST /api/show`, `None` if unknown.
    pub async fn model_info(&self, model: &str) -> Result<Option<Value>, Error> {
        let show: Option<Value> = self
            .get_json(
                self.http
                    .post(format!("{}/api/show", self.base))
                    .json(&serde_json::json!({ "model": model })),
            )
            .await?;
        Ok(show.and_then(|mut s| s.get_mut("model_info").map(Value::take)))
    }

    /// Asks Ollama to unload `model` only.
    pub async fn unload(&self, model: &str) -> Result<(), Error> {
        let resp = self
            .http
            .post(format!("{}/api/generate", self.base))
            .json(&serde_json::json!({ "model": model, "keep_alive": 0 }))
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.down(e))?;
        // Drain the (small) answer so the connection can be reused.
        let status = resp.status();
        let _ = resp.bytes().await;
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.down(format!("unloading {model} answered {status}")))
        }
    }
}

/// The size estimate before a model was ever seen loaded:
/// `(file + kv) × (100 + ESTIMATE_MARGIN_PERCENT) / 100 + ESTIMATE_OVERHEAD_BYTES`,
/// where `kv = 2 × block_count × ctx × head_count_kv × (embedding_length /
/// head_count) × 2 bytes` (f16 keys and values), `ctx` the smaller of the
/// requested context and the model's `context_length`. Keys missing from
/// `model_info` leave the KV cache at 0.
pub fn estimate_bytes(file_bytes: u64, model_info: Option<&Value>, ctx: u64) -> u64 {
    let kv = model_info.map_or(0, |info| kv_cache_bytes(info, ctx));
    (file_bytes.saturating_add(kv)).saturating_mul(100 + ESTIMATE_MARGIN_PERCENT) / 100
        + ESTIMATE_OVERHEAD_BYTES
}

fn kv_cache_bytes(info: &Value, ctx: u64) -> u64 {
    let Some(obj) = info.as_object() else {
        return 0;
    };
    let arch = obj
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("llama");
    let key = |k: &str| obj.get(&format!("{arch}.{k}")).and_then(Value::as_u64);
    let (Some(blocks), Some(embd), Some(heads)) = (
        key("block_count"),
        key("embedding_length"),
        key("attention.head_count"),
    ) else {
        return 0;
    };
    if heads == 0 {
        return 0;
    }
    let heads_kv = key("attention.head_count_kv").unwrap_or(heads);
    let ctx = key("context_length").map_or(ctx, |max| ctx.min(max));
    2u64.saturating_mul(blocks)
        .saturating_mul(ctx)
        .saturating_mul(heads_kv)
        .saturating_mul(embd / heads)
        .saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_without_a_tag_mean_latest() {
        assert_eq!(normalize_model("llama3"), "llama3:latest");
        assert_eq!(normalize_model("llama3:8b"), "llama3:8b");
        assert_eq!(normalize_model("hf.co/org/m"), "hf.co/org/m:latest");
        assert_eq!(
            normalize_model("localhost:5000/m"),
            "localhost:5000/m:latest"
        );
    }

    #[test]
    fn keep_alive_reads_numbers_and_go_durations() {
        assert_eq!(parse_keep_alive(&json!(0)), Some(0.0));
        assert_eq!(parse_keep_alive(&json!(-1)), Some(-1.0));
        assert_eq!(parse_keep_alive(&json!("5m")), Some(300.0));
        assert_eq!(parse_keep_alive(&json!("1h30m")), Some(5400.0));
        assert_eq!(parse_keep_alive(&json!("-1m")), Some(-60.0));
        assert_eq!(parse_keep_alive(&json!("10")), Some(10.0));
        assert_eq!(parse_keep_alive(&json!("soon")), None);
    }

    #[test]
    fn calls_are_parsed_and_bad_bodies_are_400() {
        let c = parse_call("/api/generate", br#"{"model":"m","keep_alive":0}"#).unwrap();
        assert!(c.unload_only);
        assert_eq!(c.model, "m:latest");
        let c = parse_call(
            "/api/generate",
            br#"{"model":"m","prompt":"hi","keep_alive":0}"#,
        )
        .unwrap();
        assert!(
            !c.unload_only,
            "a prompt loads the model even with keep_alive 0"
        );
        let c = parse_call("/api/chat", br#"{"model":"m","options":{"num_ctx":8192}}"#).unwrap();
        assert_eq!(c.num_ctx, Some(8192));
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"prompt":"x"}"#,
            br#"{"model":3}"#,
            br#"{"model":"m","keep_alive":"x"}"#,
        ] {
            let e = parse_call("/api/generate", bad).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn the_estimate_adds_kv_cache_margin_and_overhead() {
        let info = json!({
            "general.architecture": "llama",
            "llama.block_count": 32,
            "llama.embedding_length": 4096,
            "llama.attention.head_count": 32,
            "llama.attention.head_count_kv": 8,
            "llama.context_length": 8192,
        });
        // kv = 2 × 32 × 4096 × 8 × 128 × 2 = 512 MiB
        let kv = 512u64 << 20;
        let file = 4u64 << 30;
        assert_eq!(
            estimate_bytes(file, Some(&info), 4096),
            (file + kv) * 110 / 100 + ESTIMATE_OVERHEAD_BYTES
        );
        // the model's own context length caps the request's
        assert_eq!(
            estimate_bytes(file, Some(&info), 1 << 20),
            estimate_bytes(file, Some(&info), 8192)
        );
        assert_eq!(
            estimate_bytes(file, None, 4096),
            file * 110 / 100 + ESTIMATE_OVERHEAD_BYTES
        );
    }
}
