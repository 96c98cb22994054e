//! Harness for end-to-end tests: builds the real `vramd` and `vramctl`
//! binaries, starts the daemon on a temporary socket, and offers raw-socket
//! helpers. Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vramd_client::Client;

pub mod fake_comfyui;
pub mod fake_gpu;
pub mod fake_ollama;
pub mod fake_openai;
pub mod fake_service;
pub mod gateway_rig;

/// Longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// Path of a workspace binary, built once per test process with cargo so
/// that tests never run a stale binary.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test-exe> → target/<profile>
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "vramd",
            "-p",
            "vramctl",
            "-p",
            "fake-nvml",
            "-p",
            "vramd-gateway",
            // The fake model server `managed` apps start (src/bin).
            "-p",
            "vramd-tests",
            // `--lib` too: the fake libnvidia-ml is fake-nvml's library
            // (a cdylib), which `--bins` alone would skip.
            "--bins",
            "--lib",
        ]);
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the vramd binaries");
        assert!(status.success(), "cargo build of the vramd binaries failed");
        dir
    });
    dir.join(name)
}

/// Path of the fake libnvidia-ml (tests/fake-nvml), built with the binaries.
pub fn fake_nvml_lib() -> PathBuf {
    let path = bin(fake_nvml::CDYLIB_FILE_NAME);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Polls `f` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `vramd` on a temporary socket; killed when dropped. It derefs
/// to the shared [`vramd_harness::Daemon`] (also the benchmark's) for its
/// socket, directory, log, pid, signals and exit.
pub struct Daemon {
    inner: vramd_harness::Daemon,
}

impl Daemon {
    /// Starts `vramd --simulate 24GiB` plus `extra` arguments.
    pub fn start(extra: &[&str]) -> Daemon {
        let mut args = vec!["--simulate", "24GiB"];
        args.extend_from_slice(extra);
        Self::start_raw(&args)
    }

    /// Starts `vramd` with exactly `args` (plus `--socket`) and waits until
    /// it accepts connections.
    pub fn start_raw(args: &[&str]) -> Daemon {
        Self::start_env(args, &[])
    }

    /// Like [`Daemon::start_raw`], with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join(vramd_harness::SOCKET_FILE_NAME);
        let mut d = Self::spawn_env(dir, socket, args, env);
        d.inner
            .wait_listening(WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
        d
    }

    /// Starts `vramd --simulate 24GiB` plus `extra` on `socket` (a path the
    /// caller keeps, e.g. to start another daemon on it after this one
    /// stopped) and waits until it accepts connections; its log goes to a
    /// directory of its own.
    pub fn start_on(socket: &Path, extra: &[&str]) -> Daemon {
        let mut args = vec!["--simulate", "24GiB"];
        args.extend_from_slice(extra);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Self::spawn_env(dir, socket.to_path_buf(), &args, &[]);
        d.inner
            .wait_listening(WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
        d
    }

    /// Spawns `vramd` on `socket` without waiting for it.
    pub fn spawn_at(dir: tempfile::TempDir, socket: PathBuf, args: &[&str]) -> Daemon {
        Self::spawn_env(dir, socket, args, &[])
    }

    /// Spawns `vramd` with `args`, `env` and a debug log, on `socket`.
    fn spawn_env(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Daemon {
        let mut cmd = Command::new(bin("vramd"));
        cmd.envs(env.iter().map(|(k, v)| (*k, *v)))
            .args(args)
            .env("RUST_LOG", "debug");
        let inner =
            vramd_harness::Daemon::spawn(cmd, dir, socket).unwrap_or_else(|e| panic!("{e}"));
        Daemon { inner }
    }

    /// A new SDK client.
    pub fn client(&self) -> Client {
        Client::connect(self.socket()).expect("connect to vramd")
    }

    /// `vramctl` pointed at this daemon.
    pub fn vramctl(&self) -> Command {
        let mut c = Command::new(bin("vramctl"));
        c.env("VRAMD_SOCKET", self.socket());
        c
    }

    /// Waits until the daemon's status satisfies `f` (bounded by [`WAIT`]);
    /// panics naming `what`, with the last status, if it never does.
    pub fn wait_status(
        &self,
        what: &str,
        f: impl Fn(&vramd_client::StatusReport) -> bool,
    ) -> vramd_client::StatusReport {
        let c = self.client();
        let mut last = None;
        let ok = wait_until(WAIT, || {
            let s = c.status().expect("status");
            let ok = f(&s);
            last = Some(s);
            ok
        });
        let last = last.expect("at least one status");
        assert!(ok, "timed out waiting for {what}; last status: {last:#?}");
        last
    }

    /// Starts `vramctl reserve SIZE --label holder` as a separate process
    /// (so its memory belongs to its own pid) and returns once it printed
    /// its grant.
    pub fn hold(&self, size: &str) -> Child {
        let mut child = self
            .vramctl()
            .args(["reserve", size, "--label", "holder"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vramctl reserve");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the grant line");
        assert!(line.starts_with("granted reservation"), "{line:?}");
        child
    }
}

impl Deref for Daemon {
    type Target = vramd_harness::Daemon;

    fn deref(&self) -> &vramd_harness::Daemon {
        &self.inner
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut vramd_harness::Daemon {
        &mut self.inner
    }
}

/// A raw connection speaking JSON lines, as `socat` would.
pub struct JsonConn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl JsonConn {
    /// Connects without saying hello.
    pub fn connect(socket: &Path) -> JsonConn {
        let stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        JsonConn { stream, reader }
    }

    /// Connects and completes the handshake.
    pub fn open(socket: &Path) -> JsonConn {
        let mut c = Self::connect(socket);
        c.send(r#"{"hello":{"version":1}}"#);
        let w = c.recv();
        assert!(w.get("welcome").is_some(), "expected welcome, got {w}");
        c
    }

    /// Sends one line (a newline is added).
    pub fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).expect("write");
        self.stream.write_all(b"\n").expect("write");
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one JSON line (panics after [`WAIT`]).
    pub fn recv(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a reply line");
        assert!(n > 0, "connection closed while a reply was expected");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Reads one JSON line if one arrives within the socket's read timeout;
    /// `None` on timeout or end of stream.
    pub fn try_recv(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => Some(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}")),
            ),
            _ => None,
        }
    }

    /// The socket (e.g. to change its read timeout).
    pub fn stream_mut(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// The socket alone, for writing without reading.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// True if the daemon closed the connection (reads EOF within [`WAIT`]).
    pub fn closed_by_daemon(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok()
    }
}

/// The `kind` of a JSON `error` reply, if it is one.
pub fn error_kind(v: &serde_json::Value) -> Option<&str> {
    v.get("error")?.get("kind")?.as_str()
}
