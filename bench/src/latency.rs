//! Latency figures: the raw Unix-socket floor, the grant+release round trip
//! through the Rust SDK, and the same through the Python SDK.
//!
//! The floor is a ping-pong of one frame, as long as an encoded reserve
//! request, between this process and a child process over a Unix stream
//! socket: write, then block in read until the echo is back. It is the least
//! any request/answer over the daemon's socket can cost on this machine, and
//! every other latency is also given as a multiple of its median. The floor
//! and the Rust SDK round trips run in alternating blocks so that both see
//! the same machine (on a small virtual machine the cost of waking a thread
//! drifts with whatever else runs).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::util::poll_readable;
use vramd_client::{Client, GIB, Request};
use vramd_protocol::{ClientMessage, Encoding, ServerMessage, encode};

use crate::procs::{self, ChildGuard, ProcSample, TempDir, clock_ticks_per_second};
use crate::stats::{Summary, nanos, round2};
use crate::wire::RawConn;

/// Length of the frame the floor bounces: an encoded 1 GiB reserve request.
pub fn floor_frame_len() -> usize {
    let msg = ClientMessage::Reserve(crate::wire::reserve_request(1, GIB, 0));
    encode(Encoding::Binary, &msg).map_or(16, |b| b.len())
}

/// The child side of the floor: connects to `socket` and echoes frames of
/// `len` bytes until the other side closes.
pub fn echo_child(socket: &Path, len: usize) -> io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    let mut frame = vec![0u8; len.max(1)];
    loop {
        match s.read_exact(&mut frame) {
            Ok(()) => s.write_all(&frame)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// The floor's two ends: a child process echoing frames, and this side of
/// the socket.
#[derive(Debug)]
pub struct Echo {
    // Field order: the socket closes (the child exits) before the directory goes.
    stream: UnixStream,
    child: ChildGuard,
    frame: Vec<u8>,
    back: Vec<u8>,
    _dir: TempDir,
}

impl Echo {
    /// Starts the echo child (this binary's `__echo` role) and connects it.
    pub fn start(exe: &Path) -> io::Result<Echo> {
        let dir = procs::private_tempdir("vramd-bench-")?;
        let path = dir.path().join("floor.sock");
        let listener = UnixListener::bind(&path)?;
        let len = floor_frame_len();
        let child = procs::spawn(
            Command::new(exe)
                .arg("__echo")
                .arg(&path)
                .arg(len.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )?;
        if !poll_readable(listener.as_raw_fd(), Some(Duration::from_secs(10))) {
            return Err(io::Error::other(
                "the echo child did not connect within 10 s",
            ));
        }
        let (stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Echo {
            stream,
            child,
            frame: (0..len).map(|i| i as u8).collect(),
            back: vec![0u8; len],
            _dir: dir,
        })
    }

    /// Length of the frame bounced.
    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    /// Process id of the echo child.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Does `n` round trips, appending each one's duration to `out`.
    pub fn round_trips(&mut self, n: usize, out: &mut Vec<u64>) -> io::Result<()> {
        for _ in 0..n {
            let t0 = Instant::now();
            self.stream.write_all(&self.frame)?;
            self.stream.read_exact(&mut self.back)?;
            out.push(nanos(t0.elapsed()));
        }
        Ok(())
    }
}

/// Grant+release round trips through the Rust SDK on an idle daemon.
#[derive(Debug, Clone)]
pub struct SdkRoundTrip {
    /// `reserve()` returned a grant, then `release()` was confirmed.
    pub pair: Summary,
    /// `reserve()` alone.
    pub grant: Summary,
    /// `release()` alone.
    pub release: Summary,
    /// `ping()` (the daemon's plumbing without the ledger).
    pub ping: Summary,
    /// The same grant+release pair without the SDK: frames written and read
    /// by the calling thread on a blocking socket (what the daemon costs).
    pub raw_pair: Summary,
    /// Where the time goes, per grant+release pair: CPU time and context
    /// switches (each a thread going to sleep or being woken) of the daemon
    /// and of this process (caller and SDK background thread).
    pub cost: Value,
}

/// The floor, measured in the same blocks as the SDK round trips.
#[derive(Debug, Clone)]
pub struct Floor {
    /// One round trip of the frame.
    pub round_trip: Summary,
    /// Length of the frame.
    pub frame_bytes: usize,
    /// CPU time and context switches per round trip of each end.
    pub cost: Value,
}

/// Sums of CPU ticks and context switches over several sampled intervals.
#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    ticks: u64,
    switches: u64,
}

impl Cost {
    fn add(&mut self, a: &ProcSample, b: &ProcSample) {
        self.ticks += b.cpu_ticks.saturating_sub(a.cpu_ticks);
        self.switches += b.ctx_switches.saturating_sub(a.ctx_switches);
    }

    fn per_op(&self, ops: usize) -> Value {
        let ops = ops.max(1) as f64;
        let cpu_us = self.ticks as f64 * 1e6 / clock_ticks_per_second() as f64;
        json!({
            "cpu_us": round2(cpu_us / ops),
            "context_switches": round2(self.switches as f64 / ops),
        })
    }
}

/// Measures the floor alone: `iterations` round trips after `warmup`.
pub fn floor(exe: &Path, warmup: usize, iterations: usize) -> io::Result<Floor> {
    let mut echo = Echo::start(exe)?;
    echo.round_trips(warmup, &mut Vec::new())?;
    let me = std::process::id();
    let (e0, c0) = (ProcSample::read(echo.pid())?, ProcSample::read(me)?);
    let mut samples = Vec::with_capacity(iterations);
    echo.round_trips(iterations, &mut samples)?;
    let (e1, c1) = (ProcSample::read(echo.pid())?, ProcSample::read(me)?);
    let (mut ce, mut cc) = (Cost::default(), Cost::default());
    ce.add(&e0, &e1);
    cc.add(&c0, &c1);
    Ok(Floor {
        round_trip: Summary::of(samples),
        frame_bytes: echo.frame_len(),
        cost: json!({ "echo": ce.per_op(iterations), "client": cc.per_op(iterations) }),
    })
}

/// Measures the floor and the Rust SDK round trips in alternating blocks
/// (`blocks` of each), so that both see the same machine: on a small
/// virtual machine the cost of waking a thread drifts with what else runs,
/// and the ratio is what matters.
pub fn floor_and_sdk(
    exe: &Path,
    socket: &Path,
    daemon_pid: u32,
    warmup: usize,
    iterations: usize,
    blocks: usize,
    budget: Duration,
) -> Result<(Floor, SdkRoundTrip), String> {
    let io = |e: io::Error| e.to_string();
    let sdk = |e: vramd_client::Error| e.to_string();
    let mut echo = Echo::start(exe).map_err(io)?;
    let client = Client::connect(socket).map_err(sdk)?;
    let mut raw = RawConn::open(socket, Duration::from_secs(10)).map_err(io)?;
    echo.round_trips(warmup, &mut Vec::new()).map_err(io)?;
    let mut raw_tag = 0u64;
    let mut raw_round_trip = |raw: &mut RawConn| -> io::Result<()> {
        raw_tag += 1;
        raw.reserve(raw_tag, GIB, 0)?;
        let id = match raw.recv_next()? {
            ServerMessage::Granted { grant, .. } => grant.id,
            other => return Err(io::Error::other(format!("expected a grant, got {other:?}"))),
        };
        raw_tag += 1;
        raw.send(&ClientMessage::Release { tag: raw_tag, id })?;
        match raw.recv_next()? {
            ServerMessage::Released { .. } => Ok(()),
            other => Err(io::Error::other(format!(
                "expected released, got {other:?}"
            ))),
        }
    };
    for _ in 0..warmup {
        raw_round_trip(&mut raw).map_err(io)?;
    }
    for _ in 0..warmup {
        client
            .reserve(Request::new(GIB))
            .and_then(|r| r.release())
            .map_err(sdk)?;
        client.ping().map_err(sdk)?;
    }
    let me = std::process::id();
    let sample = |pid: u32| ProcSample::read(pid).map_err(io);
    let blocks = blocks.max(1);
    let per_block = iterations.div_ceil(blocks);
    let deadline = Instant::now() + budget;
    let mut floor = Vec::with_capacity(iterations);
    let (mut pair, mut grant, mut release, mut ping) = (
        Vec::with_capacity(iterations),
        Vec::with_capacity(iterations),
        Vec::with_capacity(iterations),
        Vec::with_capacity(iterations / 4),
    );
    let mut raw_pair = Vec::with_capacity(iterations / 4);
    let (mut echo_cost, mut floor_client_cost) = (Cost::default(), Cost::default());
    let (mut daemon_cost, mut sdk_client_cost) = (Cost::default(), Cost::default());
    for _ in 0..blocks {
        if Instant::now() > deadline {
            break;
        }
        let (e0, c0) = (sample(echo.pid())?, sample(me)?);
        echo.round_trips(per_block, &mut floor).map_err(io)?;
        let (e1, c1) = (sample(echo.pid())?, sample(me)?);
        echo_cost.add(&e0, &e1);
        floor_client_cost.add(&c0, &c1);

        let (d0, c0) = (sample(daemon_pid)?, sample(me)?);
        for _ in 0..per_block {
            let t0 = Instant::now();
            let r = client.reserve(Request::new(GIB)).map_err(sdk)?;
            let t1 = Instant::now();
            r.release().map_err(sdk)?;
            let t2 = Instant::now();
            pair.push(nanos(t2 - t0));
            grant.push(nanos(t1 - t0));
            release.push(nanos(t2 - t1));
        }
        let (d1, c1) = (sample(daemon_pid)?, sample(me)?);
        daemon_cost.add(&d0, &d1);
        sdk_client_cost.add(&c0, &c1);

        for _ in 0..per_block / 4 {
            let t0 = Instant::now();
            client.ping().map_err(sdk)?;
            ping.push(nanos(t0.elapsed()));
        }
        for _ in 0..per_block / 4 {
            let t0 = Instant::now();
            raw_round_trip(&mut raw).map_err(io)?;
            raw_pair.push(nanos(t0.elapsed()));
        }
    }
    let (nf, np) = (floor.len(), pair.len());
    Ok((
        Floor {
            round_trip: Summary::of(floor),
            frame_bytes: echo.frame_len(),
            cost: json!({ "echo": echo_cost.per_op(nf), "client": floor_client_cost.per_op(nf) }),
        },
        SdkRoundTrip {
            pair: Summary::of(pair),
            grant: Summary::of(grant),
            release: Summary::of(release),
            ping: Summary::of(ping),
            raw_pair: Summary::of(raw_pair),
            cost: json!({
                "daemon": daemon_cost.per_op(np),
                "client": sdk_client_cost.per_op(np),
            }),
        },
    ))
}

/// The Python side of the Python round trip: prints one duration in
/// nanoseconds per line.
const PYTHON_SCRIPT: &str = r#"
import sys, time
import vramd
sock, n, warm, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
GIB = 1 << 30
client = vramd.Client(sock)
for _ in range(warm):
    client.reserve(GIB).release()
pc = time.perf_counter_ns
out = []
deadline = time.monotonic() + budget
for _ in range(n):
    t0 = pc()
    r = client.reserve(GIB)
    r.release()
    out.append(pc() - t0)
    if time.monotonic() > deadline:
        break
client.close()
sys.stdout.write("\n".join(map(str, out)) + "\n")
"#;

/// Runs `python` with `args`, killing it after `timeout`; returns (exit ok,
/// stdout, stderr).
fn run_python(
    python: &Path,
    args: &[&str],
    timeout: Duration,
) -> io::Result<(bool, String, String)> {
    let mut child = procs::spawn(
        Command::new(python)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let mut out = child.child_mut().stdout.take().expect("piped");
    let mut err = child.child_mut().stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = child.wait_timeout(timeout);
    child.kill();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(s) => Ok((s.success(), stdout, stderr)),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("python did not finish within {timeout:?}"),
        )),
    }
}

/// The Python SDK round trip, or why it was skipped.
pub fn python_round_trip(
    python: &Path,
    socket: &Path,
    warmup: usize,
    iterations: usize,
    budget: Duration,
    floor_ns: u64,
) -> Value {
    let skipped = |reason: String| json!({ "skipped": true, "reason": reason, "python": python.display().to_string() });
    if !python.exists() {
        return skipped(format!(
            "no Python interpreter at {} (the virtualenv does not exist)",
            python.display()
        ));
    }
    let probe = run_python(
        python,
        &["-c", "import vramd; vramd.Client; print(vramd.__file__)"],
        Duration::from_secs(60),
    );
    let module = match probe {
        Ok((true, out, _)) => out.trim().to_string(),
        Ok((false, _, err)) => {
            let last = err.lines().last().unwrap_or("").trim().to_string();
            return skipped(format!("`import vramd` failed in the virtualenv: {last}"));
        }
        Err(e) => return skipped(format!("cannot run {}: {e}", python.display())),
    };
    let sock = socket.display().to_string();
    let (n, w, b) = (
        iterations.to_string(),
        warmup.to_string(),
        budget.as_secs_f64().to_string(),
    );
    let args = ["-c", PYTHON_SCRIPT, sock.as_str(), &n, &w, &b];
    match run_python(python, &args, budget + Duration::from_secs(60)) {
        Ok((true, out, _)) => {
            let samples: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
            let s = Summary::of(samples);
            json!({
                "skipped": false,
                "module": module,
                "pair": s.to_json_with_ratio(floor_ns),
            })
        }
        Ok((false, _, err)) => json!({
            "skipped": false,
            "error": format!("the Python benchmark failed: {}", err.lines().last().unwrap_or("").trim()),
        }),
        Err(e) => json!({ "skipped": false, "error": e.to_string() }),
    }
}
