//! Kill-to-grant: how long after a holder is SIGKILLed does the request
//! waiting for its memory get granted?
//!
//! Each trial starts a holder process (this binary's `__holder` role) that
//! reserves the whole device through the SDK and reports the grant on its
//! stdout. A waiter in this process then asks for the whole device and is
//! queued. The clock starts just before `kill(holder, SIGKILL)` and stops when
//! the waiter's SDK call returns the grant, so the figure includes the
//! kernel tearing the process down and closing its socket, the daemon
//! noticing the close, releasing, scheduling, and the grant reaching the
//! waiter.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vramd_client::util::poll_readable;
use vramd_client::{Client, DeviceSelector, Progress, Request};

use crate::procs::{self, ChildGuard, sigkill};
use crate::stats::{Summary, nanos};

/// The holder role: reserves `bytes` on device 0, prints `granted <id>`,
/// then holds until its stdin closes (or two minutes pass).
pub fn holder_child(socket: &Path, bytes: u64) -> io::Result<()> {
    let client = Client::connect(socket).map_err(io::Error::other)?;
    let r = client
        .reserve(Request::new(bytes).device(DeviceSelector::Index(0)))
        .map_err(io::Error::other)?;
    let mut out = io::stdout().lock();
    writeln!(out, "granted {}", r.id())?;
    out.flush()?;
    drop(out);
    // Hold until the harness closes our stdin (or kills us).
    let stdin = io::stdin();
    if poll_readable(stdin.as_raw_fd(), Some(Duration::from_secs(120))) {
        let mut b = [0u8; 1];
        let _ = stdin.lock().read(&mut b);
    }
    drop(r);
    Ok(())
}

/// Outcome of the kill-to-grant trials.
#[derive(Debug, Clone)]
pub struct KillToGrant {
    /// Time from the kill to the waiter's grant, per completed trial.
    pub latency: Summary,
    /// Trials attempted.
    pub trials: usize,
    /// What went wrong in trials that did not complete.
    pub failures: Vec<String>,
}

/// Reads one line from a child's stdout within `timeout`.
fn read_line(child: &mut ChildGuard, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let stdout = child.child_mut().stdout.as_mut().expect("piped");
    let mut line = Vec::new();
    let mut b = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !poll_readable(stdout.as_raw_fd(), Some(left)) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the holder did not report its grant in time",
            ));
        }
        let n = stdout.read(&mut b)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the holder exited before reporting a grant",
            ));
        }
        line.extend_from_slice(&b[..n]);
        if let Some(i) = line.iter().position(|&c| c == b'\n') {
            line.truncate(i);
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

fn trial(exe: &Path, socket: &Path, waiter: &Client, bytes: u64) -> Result<u64, String> {
    let mut holder = procs::spawn(
        Command::new(exe)
            .arg("__holder")
            .arg(socket)
            .arg(bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .map_err(|e| format!("spawn holder: {e}"))?;
    let line = read_line(&mut holder, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    if !line.starts_with("granted") {
        return Err(format!("unexpected holder output {line:?}"));
    }
    let mut pending = waiter
        .submit(Request::new(bytes).device(DeviceSelector::Index(0)))
        .map_err(|e| format!("submit: {e}"))?;
    match pending.next(Some(Duration::from_secs(5))) {
        Ok(Some(Progress::Queued { .. })) => {}
        Ok(Some(Progress::Granted(_))) => {
            return Err("the waiter was granted while the holder held the device".into());
        }
        Ok(None) => return Err("the waiter was not queued within 5 s".into()),
        Err(e) => return Err(format!("waiter: {e}")),
    }
    let t0 = Instant::now();
    sigkill(holder.pid()).map_err(|e| format!("kill: {e}"))?;
    let deadline = t0 + Duration::from_secs(5);
    let granted = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match pending.next(Some(left)) {
            Ok(Some(Progress::Granted(r))) => break (Instant::now(), r),
            Ok(Some(Progress::Queued { .. })) if !left.is_zero() => continue,
            Ok(_) => return Err("no grant within 5 s of the kill".into()),
            Err(e) => return Err(format!("waiter: {e}")),
        }
    };
    let dt = nanos(granted.0 - t0);
    holder.kill();
    granted.1.release().map_err(|e| format!("release: {e}"))?;
    Ok(dt)
}

/// Runs up to `trials` trials within `budget`, each holder taking `bytes`
/// (the whole device) on device 0.
pub fn run(
    exe: &Path,
    socket: &Path,
    trials: usize,
    bytes: u64,
    budget: Duration,
) -> Result<KillToGrant, vramd_client::Error> {
    let waiter = Client::connect(socket)?;
    let deadline = Instant::now() + budget;
    let mut samples = Vec::with_capacity(trials);
    let mut failures = Vec::new();
    let mut attempted = 0;
    for _ in 0..trials {
        if Instant::now() > deadline {
            break;
        }
        attempted += 1;
        match trial(exe, socket, &waiter, bytes) {
            Ok(ns) => samples.push(ns),
            Err(e) => {
                failures.push(e);
                if failures.len() >= 5 {
                    break;
                }
            }
        }
    }
    Ok(KillToGrant {
        latency: Summary::of(samples),
        trials: attempted,
        failures,
    })
}
