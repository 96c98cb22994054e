//! A daemon restart loses no reservation (hardening finding 6): the daemon
//! saves its reservations beside the socket, holds them after a start for a
//! grace period in which only their holders may reclaim them (with the
//! token given at the grant), and drops what is not reclaimed after it; the
//! SDK and vramctl reconnect and reclaim by themselves, and say loudly when
//! they cannot. Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use vramd_client::{Client, Error, GIB, Request};
use vramd_tests::{Daemon, JsonConn, WAIT, bin, error_kind, wait_until};

/// A socket path in a directory the test keeps across daemons.
fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vramd.sock");
    (dir, socket)
}

/// Stops `d` with SIGTERM and waits (bounded) until it exited.
fn stop(mut d: Daemon) -> String {
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(WAIT).expect("vramd exits on SIGTERM");
    assert!(
        status.success(),
        "vramd exited with {status:?}: {}",
        d.log()
    );
    d.log()
}

/// A JSON session that asked for reclaim tokens and holds `gib` GiB:
/// returns it with the reservation's id and token.
fn hold_with_token(socket: &Path, gib: u64, label: &str) -> (JsonConn, u64, String) {
    let mut c = JsonConn::open(socket);
    c.send(r#"{"enable_reclaim":{"tag":1}}"#);
    let enabled = c.recv();
    assert_eq!(enabled["reclaim_enabled"]["tag"], 1, "{enabled}");
    c.send(&format!(
        r#"{{"reserve":{{"tag":2,"bytes":{},"label":"{label}"}}}}"#,
        gib * GIB
    ));
    let granted = c.recv();
    let id = granted["granted"]["grant"]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected a grant, got {granted}"));
    let token = c.recv();
    assert_eq!(token["reclaim_token"]["tag"], 2, "{token}");
    assert_eq!(token["reclaim_token"]["id"], id, "{token}");
    let token = token["reclaim_token"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_eq!(token.len(), 32, "{token}");
    (c, id, token)
}

/// A newcomer asking for `gib` GiB, only if it fits now.
fn try_now(socket: &Path, gib: u64) -> serde_json::Value {
    let mut c = JsonConn::open(socket);
    c.send(&format!(
        r#"{{"reserve":{{"tag":9,"bytes":{},"timeout_ms":0}}}}"#,
        gib * GIB
    ));
    c.recv()
}

#[test]
fn the_sdk_reclaims_its_reservation_across_a_restart_and_newcomers_wait() {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &["--grace", "20s"]);
    let client = Client::connect(&socket).expect("connect");
    let r = client
        .reserve(Request::new(16 * GIB).label("kept"))
        .expect("grant");
    let id = r.id();
    let log = stop(d);
    assert!(log.contains("reservations saved"), "{log}");
    let state = socket.with_file_name("vramd.sock.state");
    let mode = std::fs::metadata(&state)
        .expect("state file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "state file mode");

    let d = Daemon::start_on(&socket, &["--grace", "20s"]);
    // The old holder's room is not given away during the grace period.
    let answer = try_now(&socket, 16);
    assert_eq!(error_kind(&answer), Some("timeout"), "{answer}");
    // The SDK reconnects and reclaims by itself.
    assert!(
        wait_until(WAIT, || d.log().contains("reclaimed after restart")),
        "no reclaim: {}",
        d.log()
    );
    assert_eq!(r.is_lost(), None);
    let status = client.status().expect("status on the new session");
    let kept = status
        .reservations
        .iter()
        .find(|x| x.id == id)
        .unwrap_or_else(|| panic!("reservation {id} gone: {status:#?}"));
    assert_eq!(kept.bytes, 16 * GIB);
    assert_eq!(kept.label.as_deref(), Some("kept"));
    // It is this connection's again: it may be marked and released.
    r.set_idle(false)
        .expect("set_idle on the reclaimed reservation");
    r.release().expect("release");
    let s = d.wait_status("the release", |s| s.reservations.is_empty());
    assert_eq!(s.reservations_total, 0);
    let answer = try_now(&socket, 16);
    assert!(answer.get("granted").is_some(), "{answer}");
}

#[test]
fn a_waiting_request_is_submitted_again_after_a_restart() {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &["--grace", "1s"]);
    let (mut holder, _, _) = hold_with_token(&socket, 20, "big");
    let client = Client::connect(&socket).expect("connect");
    let mut pending = client.submit(Request::new(10 * GIB)).expect("submit");
    assert!(matches!(
        pending.next(Some(WAIT)),
        Ok(Some(vramd_client::Progress::Queued { .. }))
    ));
    stop(d);
    drop(holder.stream_mut().shutdown(std::net::Shutdown::Both));
    let _d = Daemon::start_on(&socket, &["--grace", "1s"]);
    // The holder does not reclaim: after the grace period the waiter fits.
    let deadline = Instant::now() + WAIT;
    let r = loop {
        match pending.next(Some(Duration::from_millis(200))) {
            Ok(Some(vramd_client::Progress::Granted(r))) => break r,
            Ok(_) => assert!(Instant::now() < deadline, "never granted"),
            Err(e) => panic!("the waiting request failed: {e}"),
        }
    };
    assert_eq!(r.bytes(), 10 * GIB);
}

#[test]
fn what_is_not_reclaimed_is_dropped_after_the_grace_period() {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &[]);
    let (_holder, id, _token) = hold_with_token(&socket, 16, "gone");
    // A client that asked for no token: its reservation ends with the daemon.
    let mut untokened = JsonConn::open(&socket);
    untokened.send(&format!(r#"{{"reserve":{{"tag":1,"bytes":{}}}}}"#, 8 * GIB));
    assert!(untokened.recv().get("granted").is_some());
    stop(d);
    let d = Daemon::start_on(&socket, &["--grace", "1s"]);
    let t = Instant::now();
    let answer = try_now(&socket, 16);
    assert_eq!(error_kind(&answer), Some("timeout"), "{answer}");
    // Its room is free at once (the newcomer's connection closes with it).
    let answer = try_now(&socket, 8);
    assert!(answer.get("granted").is_some(), "{answer}");
    let mut c = JsonConn::open(&socket);
    c.send(&format!(
        r#"{{"reserve":{{"tag":3,"bytes":{}}}}}"#,
        16 * GIB
    ));
    let mut granted = None;
    for _ in 0..20 {
        let m = c.recv();
        if m.get("granted").is_some() {
            granted = Some(m);
            break;
        }
    }
    let granted = granted.expect("granted after the grace period");
    // (the grace period started a little before `t`, when the state was read)
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "granted before the grace period ended"
    );
    assert_ne!(granted["granted"]["grant"]["id"], id, "ids are not reused");
    assert!(
        d.log().contains("not reclaimed within the grace period"),
        "{}",
        d.log()
    );
}

#[test]
fn a_reclaim_needs_the_token_and_keeps_the_reservation_as_it_was() {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &[]);
    let (_holder, id, token) = hold_with_token(&socket, 4, "mine");
    stop(d);
    let d = Daemon::start_on(&socket, &["--grace", "20s"]);
    let mut c = JsonConn::open(&socket);
    let wrong = if token.starts_with('0') { "1" } else { "0" }.to_string() + &token[1..];
    c.send(&format!(
        r#"{{"reclaim":{{"tag":5,"id":{id},"token":"{wrong}"}}}}"#
    ));
    let e = c.recv();
    assert_eq!(error_kind(&e), Some("permission_denied"), "{e}");
    c.send(&format!(
        r#"{{"reclaim":{{"tag":6,"id":{},"token":"{token}"}}}}"#,
        id + 100
    ));
    let e = c.recv();
    assert_eq!(error_kind(&e), Some("not_found"), "{e}");
    if unsafe { libc::geteuid() } == 0 {
        // Another user with the right token is refused too.
        std::fs::set_permissions(socket.parent().unwrap(), PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(&socket, PermissionsExt::from_mode(0o666)).unwrap();
        let (s, t) = (socket.clone(), token.clone());
        let e = std::thread::spawn(move || {
            // SAFETY: plain system calls on this thread's credentials.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
            }
            let mut c = JsonConn::open(&s);
            c.send(&format!(
                r#"{{"reclaim":{{"tag":7,"id":{id},"token":"{t}"}}}}"#
            ));
            c.recv()
        })
        .join()
        .unwrap();
        assert_eq!(error_kind(&e), Some("permission_denied"), "{e}");
    }
    c.send(&format!(
        r#"{{"reclaim":{{"tag":8,"id":{id},"token":"{token}"}}}}"#
    ));
    let g = c.recv();
    assert_eq!(g["granted"]["tag"], 8, "{g}");
    assert_eq!(g["granted"]["grant"]["id"], id, "{g}");
    assert_eq!(g["granted"]["grant"]["bytes"], 4 * GIB, "{g}");
    let s = d.wait_status("the reclaimed reservation", |s| {
        s.reservations.iter().any(|r| r.id.0 == id)
    });
    let r = s.reservations.iter().find(|r| r.id.0 == id).unwrap();
    assert_eq!(r.label.as_deref(), Some("mine"));
    // It is this connection's: it is released when it closes.
    drop(c);
    d.wait_status("the release on close", |s| s.reservations.is_empty());
}

#[test]
fn a_corrupt_state_file_is_logged_and_the_daemon_starts_empty() {
    let (_dir, socket) = socket_dir();
    let state = socket.with_file_name("vramd.sock.state");
    std::fs::write(&state, b"{\"format\":\"vramd-state\",\"version\":1,").unwrap();
    std::fs::set_permissions(&state, PermissionsExt::from_mode(0o600)).unwrap();
    let d = Daemon::start_on(&socket, &[]);
    assert!(
        d.log().contains("state file unusable"),
        "no clear line: {}",
        d.log()
    );
    let answer = try_now(&socket, 24);
    assert!(answer.get("granted").is_some(), "{answer}");
    assert!(state.with_file_name("vramd.sock.state.bad").exists());
}

/// `vramctl reserve SIZE` as a process, once it printed its grant.
fn vramctl_reserve(socket: &Path, extra: &[&str]) -> Child {
    let mut child = std::process::Command::new(bin("vramctl"))
        .env("VRAMD_SOCKET", socket)
        .args(["reserve", "2GiB", "--label", "held"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vramctl reserve");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("granted reservation"), "{line:?}");
    child
}

/// Waits (bounded) for `child` to exit; its status and stderr (read once
/// every process holding it closed it), and when it exited.
fn finish_at(mut child: Child) -> (std::process::ExitStatus, String, Instant) {
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < WAIT, "vramctl did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let exited = Instant::now();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status, err, exited)
}

/// Waits (bounded) for `child` to exit; its status and stderr.
fn finish(child: Child) -> (std::process::ExitStatus, String) {
    let (status, err, _) = finish_at(child);
    (status, err)
}

#[test]
fn vramctl_reserve_reclaims_across_a_restart() {
    let (dir, socket) = socket_dir();
    // The state in a directory of its own (made by the daemon).
    let state_dir = dir.path().join("state");
    let sd = state_dir.to_str().unwrap();
    let d = Daemon::start_on(&socket, &["--state-dir", sd]);
    let child = vramctl_reserve(&socket, &[]);
    stop(d);
    let state = state_dir.join("vramd.sock.state");
    let mode = std::fs::metadata(&state)
        .expect("state file in --state-dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!socket.with_file_name("vramd.sock.state").exists());
    let d = Daemon::start_on(&socket, &["--grace", "20s", "--state-dir", sd]);
    assert!(
        wait_until(WAIT, || d.log().contains("reclaimed after restart")),
        "{}",
        d.log()
    );
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (status, err) = finish(child);
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("released"), "{err}");
    d.wait_status("the release", |s| s.reservations.is_empty());
}

#[test]
fn vramctl_reserve_says_its_reservation_is_lost_when_the_daemon_does_not_come_back() {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &[]);
    let child = vramctl_reserve(&socket, &["--reconnect-for", "1s"]);
    stop(d);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(err.contains("LOST"), "{err}");
    assert!(!err.contains("released"), "{err}");
}

/// `vramctl run` of a 3-second command whose daemon stops for good.
fn run_and_lose(on_loss: &str) -> (std::process::ExitStatus, String, Duration) {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &[]);
    let mut child = std::process::Command::new(bin("vramctl"))
        .env("VRAMD_SOCKET", &socket)
        .args([
            "run",
            "--vram",
            "1GiB",
            "--reconnect-for",
            "500ms",
            "--on-daemon-loss",
            on_loss,
            "--",
            "sh",
            "-c",
            "echo started; sleep 3; echo finished",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vramctl run");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let t = Instant::now();
    stop(d);
    let (status, err, exited) = finish_at(child);
    (status, err, exited - t)
}

#[test]
fn vramctl_run_warns_when_its_reservation_is_lost() {
    let (status, err, _) = run_and_lose("warn");
    assert_eq!(status.code(), Some(0), "the command's own status: {err}");
    assert!(err.contains("LOST"), "{err}");
    assert!(err.contains("WITHOUT a reservation"), "{err}");
}

#[test]
fn vramctl_run_kills_its_command_when_told_to_and_the_reservation_is_lost() {
    let (status, err, took) = run_and_lose("kill");
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(err.contains("LOST"), "{err}");
    assert!(took < Duration::from_millis(2500), "not killed: {took:?}");
}

#[test]
fn an_sdk_client_without_reconnect_loses_its_reservation_with_the_connection() {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &[]);
    let client = Client::connect(&socket).expect("connect");
    client.set_reconnect(None);
    let r = client.reserve(Request::new(GIB)).expect("grant");
    stop(d);
    assert!(wait_until(WAIT, || r.is_lost().is_some()));
    assert!(matches!(client.status(), Err(Error::Disconnected)));
}

#[test]
fn sighup_reloads_the_config_file_and_a_bad_one_changes_nothing() {
    let (dir, socket) = socket_dir();
    let config = dir.path().join("vramd.toml");
    std::fs::write(&config, "[eviction]\nmin_residency = \"1h\"\n").unwrap();
    let mut d = Daemon::start_on(&socket, &["--config", config.to_str().unwrap()]);
    let mut holder = JsonConn::open(&socket);
    holder.send(&format!(
        r#"{{"reserve":{{"tag":1,"bytes":{},"evictable":true}}}}"#,
        20 * GIB
    ));
    assert!(holder.recv().get("granted").is_some());
    let mut waiter = JsonConn::open(&socket);
    waiter.send(&format!(
        r#"{{"reserve":{{"tag":2,"bytes":{}}}}}"#,
        10 * GIB
    ));
    assert!(waiter.recv().get("queued").is_some());
    // Younger than the minimum residency: not asked to unload.
    holder
        .stream_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(holder.try_recv(), None, "evicted despite min_residency 1h");
    // A broken file: logged, the daemon and the old config stay.
    std::fs::write(&config, "[eviction\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(WAIT, || d.log().contains("config not reloaded")),
        "{}",
        d.log()
    );
    assert!(d.alive(), "SIGHUP ended the daemon");
    assert_eq!(
        holder.try_recv(),
        None,
        "a broken config changed the timing"
    );
    // The new minimum residency applies at once: the idle holder is asked.
    std::fs::write(&config, "[eviction]\nmin_residency = \"0s\"\n").unwrap();
    d.signal(libc::SIGHUP);
    holder.stream_mut().set_read_timeout(Some(WAIT)).unwrap();
    let evict = holder.recv();
    assert!(evict.get("evict").is_some(), "{evict}");
    assert!(d.log().contains("config reloaded"), "{}", d.log());
    assert!(d.alive());
    let log = stop(d);
    assert!(log.contains("SIGHUP"), "{log}");
    assert!(!socket.exists(), "the socket file stays after SIGTERM");
}

#[test]
fn a_reservation_released_while_the_daemon_is_away_is_given_back_after_the_restart() {
    let (_dir, socket) = socket_dir();
    let d = Daemon::start_on(&socket, &[]);
    let client = Client::connect(&socket).expect("connect");
    let r = client.reserve(Request::new(16 * GIB)).expect("grant");
    stop(d);
    // Nobody to tell: released once the client is back (not after the grace).
    r.release()
        .expect("a release while the daemon is away is not an error");
    let d = Daemon::start_on(&socket, &["--grace", "60s"]);
    d.wait_status("the release after the reclaim", |s| {
        s.reservations.is_empty()
    });
    let answer = try_now(&socket, 16);
    assert!(answer.get("granted").is_some(), "{answer}");
}
