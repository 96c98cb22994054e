//! A running `vramd-gateway` for end-to-end tests, started from a config
//! the test writes (any apps: fronted, watched, OpenAI-style), and a small
//! HTTP/1.1 client over loopback TCP that reads chunked bodies chunk by
//! chunk. Every wait is bounded by [`WAIT`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use vramd_harness::ChildGuard;

use crate::{WAIT, bin, wait_until};

/// A loopback address free right now.
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A running `vramd-gateway`, killed when dropped.
pub struct Gateway {
    child: ChildGuard,
    /// Its own listen (`/status`, `/metrics`, `/healthz`).
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts it talking to vramd at `socket`, with `apps` (TOML of one or
    /// more `[[app]]` tables) and `top` (extra top-level keys; its own
    /// `state_file` unless `top` sets one), polling every 100 ms; waits
    /// until `/healthz` and every address in `wait_for` answer.
    pub fn start(socket: &Path, top: &str, apps: &str, wait_for: &[SocketAddr]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = free_port();
        let state = dir.path().join("state/sizes.json");
        // A `state_file` in `top` wins over the one in the gateway's directory.
        let state = if top.contains("state_file") {
            String::new()
        } else {
            format!("state_file = {state:?}\n")
        };
        let config = format!(
            "socket = {socket:?}\nlisten = \"{admin}\"\n{state}poll_interval = \"100ms\"\n{top}\n\n{apps}\n",
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log");
        let child = ChildGuard::spawn(
            Command::new(bin("vramd-gateway"))
                .arg("--config")
                .arg(&path)
                .env("RUST_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("spawn vramd-gateway");
        let g = Gateway { child, admin, dir };
        assert!(
            wait_until(WAIT, || wait_for
                .iter()
                .all(|a| TcpStream::connect(a).is_ok())
                && http(g.admin, "GET", "/healthz", None, &[]).status == 200),
            "the gateway never answered; log:\n{}",
            g.log()
        );
        g
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Its state file of observed sizes.
    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/sizes.json")
    }

    /// `GET /status`.
    pub fn status(&self) -> Value {
        http(self.admin, "GET", "/status", None, &[]).json()
    }

    /// The models `/status` shows for app number `app`.
    pub fn models(&self, app: usize) -> Vec<Value> {
        self.status()["apps"][app]["models"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the models of app number `app` satisfy `f`; panics
    /// naming `what`, with the last value and the log, if they never do.
    pub fn wait_models(&self, app: usize, what: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut last = Vec::new();
        let ok = wait_until(WAIT, || {
            last = self.models(app);
            f(&last)
        });
        assert!(
            ok,
            "timed out waiting for {what}; last: {last:#?}; log:\n{}",
            self.log()
        );
        last
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.child.kill();
    }
}

/// A response read in full.
pub struct Resp {
    /// Status code (0: nothing listened).
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Resp {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }
}

/// Sends a request (`Connection: close`) and returns the open connection.
pub fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body.as_bytes()).expect("write");
    s
}

/// Reads a response head: status and headers.
pub fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').expect("header line");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

/// Reads one chunk of a chunked body (`None` at its end).
pub fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).expect("chunk size");
    let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
    let mut data = vec![0; n + 2];
    r.read_exact(&mut data).expect("chunk");
    data.truncate(n);
    (n > 0).then_some(data)
}

/// One whole request; status 0 if nothing listens at `addr`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Resp {
    let Ok(probe) = TcpStream::connect(addr) else {
        return Resp {
            status: 0,
            headers: vec![],
            body: vec![],
        };
    };
    drop(probe);
    let mut r = BufReader::new(send_request(addr, method, path, body, headers));
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            body.extend(c);
        }
    } else {
        r.read_to_end(&mut body).expect("body");
    }
    Resp {
        status,
        headers,
        body,
    }
}
