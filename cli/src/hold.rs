//! `reserve` and `run`: wait for a grant, then hold it until a signal, or
//! run a command inside it. What happens is told by a [`Report`]: messages
//! for people, or with `--json` one JSON event per line on stdout.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vramd_client::{Client, Error, Progress, Request, Reservation, ReservationId};
use vramd_protocol::format_size;

use crate::blocked::Blocked;
use crate::cli::OnDaemonLoss;
use crate::exit::{EXIT_INTERRUPTED, Failure};
use crate::mps::{MpsServer, Unusable};
use crate::ps::Local;
use crate::signals::{EVICTED, LOST, SignalWatch};

/// How often a waiting `reserve` or `run` looks at what blocks it.
const BLOCKED_POLL: Duration = Duration::from_secs(1);

/// Where `reserve` and `run` tell what happens: messages for people
/// (progress on stderr, the grant on stdout), or with `json` one JSON
/// object per line on stdout, each with an `event` field.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// One JSON event per line instead of messages.
    pub json: bool,
}

impl Report {
    /// Prints one event line and flushes it (a reader may be waiting on it).
    fn event(self, value: Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }

    /// The request waits at `position`.
    fn queued(self, id: ReservationId, position: u32) {
        if self.json {
            self.event(json!({"event": "queued", "id": id, "position": position}));
        } else {
            eprintln!("vramctl: request {id} waits at position {position}");
        }
    }

    /// What blocks the waiting request (told when it changes).
    fn blocked(self, b: &Blocked) {
        if self.json {
            self.event(b.to_json());
        } else {
            eprintln!("vramctl: request {} {}", b.id, b.message());
        }
    }

    /// The request was granted; `holding` for `reserve` (which holds it
    /// until a signal).
    fn granted(self, r: &Reservation, holding: bool) {
        if self.json {
            self.event(json!({
                "event": "granted",
                "id": r.id(),
                "bytes": r.bytes(),
                "device": r.device_index(),
                "device_uuid": r.device_uuid(),
            }));
        } else if holding {
            println!(
                "granted reservation {} of {} on device {} ({}); holding until Ctrl-C",
                r.id(),
                format_size(r.bytes()),
                r.device_index(),
                r.device_uuid()
            );
            let _ = std::io::stdout().flush();
        }
    }

    /// The daemon asked an evictable reservation to unload.
    fn evicted(self, id: ReservationId, reason: &str) {
        if self.json {
            self.event(json!({"event": "evicted", "id": id, "reason": reason}));
        } else {
            println!("eviction requested for reservation {id} ({reason}); releasing");
            let _ = std::io::stdout().flush();
        }
    }

    /// The reservation was lost: the daemon went away and did not give it
    /// back. Said loudly on stderr whatever the output mode.
    fn lost(self, id: ReservationId, why: &str, what_now: &str) {
        if self.json {
            self.event(json!({"event": "lost", "id": id, "reason": why}));
        }
        eprintln!("vramctl: WARNING: reservation {id} is LOST: {why}; {what_now}");
    }

    /// The reservation was released (`evicted`: at the daemon's request).
    fn released(self, id: ReservationId, evicted: bool) {
        if self.json {
            self.event(json!({"event": "released", "id": id, "evicted": evicted}));
        } else if evicted {
            eprintln!("released (evicted)");
        } else {
            eprintln!("released");
        }
    }

    /// A signal came before the grant; the request was withdrawn.
    fn interrupted(self) {
        if self.json {
            self.event(json!({"event": "interrupted", "exit_status": EXIT_INTERRUPTED}));
        }
        eprintln!("vramctl: interrupted while waiting; request withdrawn");
    }

    /// `run`'s command ended with `code`, or was killed by `signal`.
    fn exited(self, code: Option<i32>, signal: Option<i32>) {
        if self.json {
            self.event(json!({"event": "exited", "code": code, "signal": signal}));
        }
    }

    /// The command could not be started.
    fn not_started(self, program: &str, e: &std::io::Error, exit_status: u8) {
        if self.json {
            self.event(json!({
                "event": "error",
                "kind": "not_started",
                "message": format!("cannot run {program}: {e}"),
                "exit_status": exit_status,
            }));
        }
        eprintln!("vramctl: cannot run {program}: {e}");
    }

    /// The command failed with `message`; vramctl exits with `exit_status`.
    pub fn error(self, failure: Failure, message: &str, exit_status: u8) {
        if self.json {
            self.event(json!({
                "event": "error",
                "kind": failure.name(),
                "message": message,
                "exit_status": exit_status,
            }));
        }
    }
}

/// `vramctl reserve`: holds `request` (marked idle when `evictable`) until
/// SIGINT or SIGTERM, or until the daemon asks an evictable one to unload.
pub fn reserve(
    socket: &Path,
    request: Request,
    evictable: bool,
    reconnect_for: Duration,
    report: Report,
) -> Result<ExitCode, Error> {
    let signals = SignalWatch::start()?;
    let client = Client::connect(socket)?;
    client.set_reconnect(Some(reconnect_for));
    let request = request.evictable(evictable);
    let Some(r) = wait_for_grant(&client, request, &signals, report)? else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    if evictable {
        let evicted = signals.slot();
        r.on_evict(move |e| {
            report.evicted(e.id, &e.reason);
            // Wakes the wait below as a signal would.
            evicted.store(EVICTED, Ordering::SeqCst);
        });
    }
    let lost = signals.slot();
    r.on_lost(move |_| lost.store(LOST, Ordering::SeqCst));
    report.granted(&r, true);
    signals.wait();
    let id = r.id();
    if let Some(why) = r.is_lost() {
        report.lost(id, &why, "nothing is held any more");
        let status = crate::exit::EXIT_UNREACHABLE;
        report.error(Failure::Unreachable, &why, status);
        return Ok(ExitCode::from(status));
    }
    if r.is_evicted() || signals.received() == Some(EVICTED) {
        // The SDK releases after the callback returns.
        let _ = wait_evicted(&r);
        report.released(id, true);
        return Ok(ExitCode::SUCCESS);
    }
    r.release()?;
    report.released(id, false);
    Ok(ExitCode::SUCCESS)
}

/// `run --enforce` without a usable MPS server: says why and exits with
/// [`crate::exit::EXIT_NO_MPS`]; the command does not run.
pub fn refuse_unenforced(why: &Unusable, report: Report) -> ExitCode {
    let message = why.to_string();
    let status = Failure::NoMps.exit_status();
    report.error(Failure::NoMps, &message, status);
    eprintln!("vramctl: {message}");
    ExitCode::from(status)
}

/// What `run` does when the daemon goes away.
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    /// How long to try to reconnect and reclaim.
    pub reconnect_for: Duration,
    /// What to do with the command when the reservation is lost.
    pub on_loss: OnDaemonLoss,
}

/// `vramctl run`: waits for `request`, then runs `command` inside it (with
/// `mps`, capped at the reservation through that MPS server) and exits with
/// the command's status.
pub fn run(
    socket: &Path,
    request: Request,
    mps: Option<&MpsServer>,
    command: &[String],
    loss: Loss,
    report: Report,
) -> Result<ExitCode, Error> {
    let signals = SignalWatch::start()?;
    let client = Client::connect(socket)?;
    client.set_reconnect(Some(loss.reconnect_for));
    let Some(r) = wait_for_grant(&client, request, &signals, report)? else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    report.granted(&r, false);
    let id = r.id();
    // The server may have stopped while the request waited: look again, so
    // that the command never runs unenforced.
    if let Some(Err(why)) = mps.map(MpsServer::check) {
        drop(r);
        report.released(id, false);
        return Ok(refuse_unenforced(&why, report));
    }
    if mps.is_some() {
        // Status shows the reservation as enforced, with the limit the
        // command gets (whole MiB, as CUDA_MPS_PINNED_DEVICE_MEM_LIMIT).
        let limit_bytes = crate::mps::limit_bytes(r.bytes());
        if let Err(e) = r.set_enforced(limit_bytes, "mps") {
            eprintln!(
                "vramctl: warning: vramd did not record the enforcement ({e}); the command \
                 is capped all the same"
            );
        }
    }
    let code = run_command(&r, mps, command, &signals, loss.on_loss, report)?;
    if r.is_lost().is_some() {
        drop(r);
        if loss.on_loss == OnDaemonLoss::Kill {
            return Ok(ExitCode::from(crate::exit::EXIT_UNREACHABLE));
        }
        return Ok(code);
    }
    drop(r);
    report.released(id, false);
    Ok(code)
}

/// Waits (bounded) until the SDK has released an evicted reservation.
fn wait_evicted(r: &Reservation) -> bool {
    for _ in 0..500 {
        if r.is_evicted() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits for the grant, printing queue positions and, while it waits, what
/// blocks it (looked up in the status at most once per
/// [`BLOCKED_POLL`], told again only when it changes); `None` if a signal
/// came first.
fn wait_for_grant(
    client: &Client,
    request: Request,
    signals: &SignalWatch,
    report: Report,
) -> Result<Option<Reservation>, Error> {
    let mut pending = client.submit(request)?;
    let mut waiting: Option<ReservationId> = None;
    let mut last_check: Option<Instant> = None;
    let mut last_blocked: Option<Blocked> = None;
    loop {
        if signals.received().is_some() {
            pending.cancel()?;
            report.interrupted();
            return Ok(None);
        }
        match pending.next(Some(Duration::from_millis(50)))? {
            Some(Progress::Granted(r)) => return Ok(Some(r)),
            Some(Progress::Queued { id, position }) => {
                report.queued(id, position);
                waiting = Some(id);
            }
            None => {}
        }
        let Some(id) = waiting else { continue };
        if last_check.is_some_and(|t| t.elapsed() < BLOCKED_POLL) {
            continue;
        }
        last_check = Some(Instant::now());
        // A failed look is no reason to give up the wait: try again later.
        let Ok(status) = client.status() else {
            continue;
        };
        let blocked = Blocked::of(&status, id, &Local);
        if let Some(b) = &blocked
            && last_blocked.as_ref() != Some(b)
        {
            report.blocked(b);
        }
        if blocked.is_some() {
            last_blocked = blocked;
        }
    }
}

/// Runs `command` with the reservation in its environment, forwarding
/// signals to it; its exit status (or 128 + signal) becomes ours.
fn run_command(
    r: &Reservation,
    mps: Option<&MpsServer>,
    command: &[String],
    signals: &SignalWatch,
    on_loss: OnDaemonLoss,
    report: Report,
) -> Result<ExitCode, Error> {
    let (program, args) = command.split_first().expect("clap requires a command");
    let uuid = r.device_uuid();
    // CUDA accepts GPU-/MIG- UUIDs, which stay right whatever the device order.
    let visible = if uuid.starts_with("GPU-") || uuid.starts_with("MIG-") {
        uuid.to_string()
    } else {
        r.device_index().to_string()
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("CUDA_VISIBLE_DEVICES", visible)
        .env("VRAMD_RESERVATION", r.id().to_string())
        .env("VRAMD_DEVICE", r.device_index().to_string())
        .env("VRAMD_DEVICE_UUID", uuid)
        .env("VRAMD_BYTES", r.bytes().to_string());
    if let Some(mps) = mps {
        // CUDA_VISIBLE_DEVICES names one device, so the command sees it as
        // ordinal 0, the one the limit names.
        cmd.envs(mps.env(r.bytes()));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            report.not_started(program, &e, code);
            return Ok(ExitCode::from(code));
        }
    };
    signals.forward_to(child.id());
    let (id, pid) = (r.id(), child.id());
    r.on_lost(move |why| match on_loss {
        OnDaemonLoss::Warn => report.lost(
            id,
            why,
            "the command runs on WITHOUT a reservation (--on-daemon-loss warn)",
        ),
        OnDaemonLoss::Kill => {
            report.lost(
                id,
                why,
                "sending the command SIGTERM (--on-daemon-loss kill)",
            );
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    });
    // The command (and so its descendants) counts against the reservation
    // even if vramctl's own process tree changes.
    if let Err(e) = r.attach_pids(&[child.id()]) {
        eprintln!("vramctl: warning: cannot attribute the command's GPU usage: {e}");
    }
    let status = child.wait()?;
    report.exited(status.code(), status.signal());
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    })
}
