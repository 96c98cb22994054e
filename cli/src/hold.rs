//! `reserve` and `run`: wait for a grant, then hold it until a signal, or
//! run a command inside it.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;
use std::time::Duration;

use vramd_client::{Client, Error, Progress, Request, Reservation};
use vramd_protocol::format_size;

use crate::signals::{EVICTED, SignalWatch};

/// Exit status when a signal came before the grant (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

/// `vramctl reserve`: holds `request` (marked idle when `evictable`) until
/// SIGINT or SIGTERM, or until the daemon asks an evictable one to unload.
pub fn reserve(socket: &Path, request: Request, evictable: bool) -> Result<ExitCode, Error> {
    let signals = SignalWatch::start()?;
    let client = Client::connect(socket)?;
    let request = request.evictable(evictable);
    let Some(r) = wait_for_grant(&client, request, &signals)? else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    if evictable {
        let evicted = signals.slot();
        r.on_evict(move |e| {
            println!(
                "eviction requested for reservation {} ({}); releasing",
                e.id, e.reason
            );
            let _ = std::io::stdout().flush();
            // Wakes the wait below as a signal would.
            evicted.store(EVICTED, Ordering::SeqCst);
        });
    }
    println!(
        "granted reservation {} of {} on device {} ({}); holding until Ctrl-C",
        r.id(),
        format_size(r.bytes()),
        r.device_index(),
        r.device_uuid()
    );
    let _ = std::io::stdout().flush();
    signals.wait();
    if r.is_evicted() || signals.received() == Some(EVICTED) {
        // The SDK releases after the callback returns.
        let _ = wait_evicted(&r);
        eprintln!("released (evicted)");
        return Ok(ExitCode::SUCCESS);
    }
    r.release()?;
    eprintln!("released");
    Ok(ExitCode::SUCCESS)
}

/// `vramctl run`: waits for `request`, then runs `command` inside it and
/// exits with the command's status.
pub fn run(socket: &Path, request: Request, command: &[String]) -> Result<ExitCode, Error> {
    let signals = SignalWatch::start()?;
    let client = Client::connect(socket)?;
    let Some(r) = wait_for_grant(&client, request, &signals)? else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    run_command(&r, command, &signals)
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

/// Waits for the grant, printing queue positions; `None` if a signal came first.
fn wait_for_grant(
    client: &Client,
    request: Request,
    signals: &SignalWatch,
) -> Result<Option<Reservation>, Error> {
    let mut pending = client.submit(request)?;
    loop {
        if signals.received().is_some() {
            eprintln!("vramctl: interrupted while waiting; request withdrawn");
            pending.cancel()?;
            return Ok(None);
        }
        match pending.next(Some(Duration::from_millis(50)))? {
            Some(Progress::Granted(r)) => return Ok(Some(r)),
            Some(Progress::Queued { id, position }) => {
                eprintln!("vramctl: request {id} waits at position {position}");
            }
            None => {}
        }
    }
}

/// Runs `command` with the reservation in its environment, forwarding
/// signals to it; its exit status (or 128 + signal) becomes ours.
fn run_command(
    r: &Reservation,
    command: &[String],
    signals: &SignalWatch,
) -> Result<ExitCode, Error> {
    let (program, args) = command.split_first().expect("clap requires a command");
    let uuid = r.device_uuid();
    // CUDA accepts GPU-/MIG- UUIDs, which stay right whatever the device order.
    let visible = if uuid.starts_with("GPU-") || uuid.starts_with("MIG-") {
        uuid.to_string()
    } else {
        r.device_index().to_string()
    };
    let mut child = match Command::new(program)
        .args(args)
        .env("CUDA_VISIBLE_DEVICES", visible)
        .env("VRAMD_RESERVATION", r.id().to_string())
        .env("VRAMD_DEVICE", r.device_index().to_string())
        .env("VRAMD_DEVICE_UUID", uuid)
        .env("VRAMD_BYTES", r.bytes().to_string())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vramctl: cannot run {program}: {e}");
            return Ok(ExitCode::from(
                if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                },
            ));
        }
    };
    signals.forward_to(child.id());
    // The command (and so its descendants) counts against the reservation
    // even if vramctl's own process tree changes.
    if let Err(e) = r.attach_pids(&[child.id()]) {
        eprintln!("vramctl: warning: cannot attribute the command's GPU usage: {e}");
    }
    let status = child.wait()?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    })
}
