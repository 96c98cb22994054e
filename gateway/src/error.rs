//! The gateway's errors, and how each becomes an HTTP answer.

use std::path::PathBuf;

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is unreadable or invalid.
    #[error("{}: {message}", file.display())]
    Config {
        /// The file.
        file: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The client's request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The upstream app did not answer.
    #[error("upstream {upstream} is unreachable: {message}")]
    Upstream {
        /// The upstream's base URL.
        upstream: String,
        /// Why.
        message: String,
    },
    /// vramd is not running or the connection to it broke.
    #[error("vramd is not reachable at {}: {message}; the gateway reconnects by itself", socket.display())]
    DaemonDown {
        /// The socket tried.
        socket: PathBuf,
        /// Why.
        message: String,
    },
    /// The request's wait limit passed in vramd's queue.
    #[error("timed out waiting for GPU memory for {model}: {message}")]
    WaitTimeout {
        /// The model waited for.
        model: String,
        /// The daemon's explanation.
        message: String,
    },
    /// vramd refused the request (it can never fit).
    #[error("vramd refused {bytes_needed} bytes for {model}: {message}")]
    Refused {
        /// The model.
        model: String,
        /// What was asked.
        bytes_needed: u64,
        /// The daemon's explanation.
        message: String,
    },
    /// A `managed` model's server could not be started (or was stopped
    /// before the request could use it).
    #[error("the server for {model} is not available: {message}")]
    ServerStart {
        /// The model.
        model: String,
        /// Why.
        message: String,
    },
    /// Binding a listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bug: something the gateway built is invalid.
    #[error("internal error: {0}")]
    Internal(String),
    /// Any other I/O failure (the state file).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self {
            Error::BadRequest(_) => S::BAD_REQUEST,
            Error::Upstream { .. } => S::BAD_GATEWAY,
            Error::DaemonDown { .. }
            | Error::WaitTimeout { .. }
            | Error::Refused { .. }
            | Error::ServerStart { .. } => S::SERVICE_UNAVAILABLE,
            _ => S::INTERNAL_SERVER_ERROR,
        }
    }
}

impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        let status = self.status();
        // Ollama's own error shape, so its clients show the message.
        let body = serde_json::json!({ "error": self.to_string() });
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(self, Error::WaitTimeout { .. } | Error::DaemonDown { .. }) {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        resp
    }
}
