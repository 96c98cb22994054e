//! What holds the card: `vramctl ps` and the `blocked` messages of a waiting
//! `reserve`, against the fake libnvidia-ml with processes of two users.
//!
//! The other user's process is a real process of another uid: run as root
//! (as CI runs the tests), the test starts `sleep` as uid 65534 (nobody);
//! otherwise it uses pid 1 when that belongs to someone else, and skips
//! (saying so on stderr) when neither is possible.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::Value;
use vramd_client::{GIB, StatusReport};
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::{Daemon, WAIT, fake_nvml_lib};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";

/// The user other processes belong to when the test runs as root.
const OTHER_UID: u32 = 65534;

/// A fake 24 GiB card and a daemon reading it.
struct Fake {
    gpu: Arc<FakeGpu>,
    daemon: Daemon,
}

impl Fake {
    fn start() -> Fake {
        Self::start_with(&[])
    }

    /// Like [`Fake::start`], with extra daemon arguments.
    fn start_with(extra: &[&str]) -> Fake {
        let dir = tempfile::tempdir().unwrap().keep();
        let gpu = FakeGpu::create(&dir.join("state.json"), &[(UUID0, 24 * GIB)]);
        let lib = fake_nvml_lib();
        let daemon = Daemon::start_env(
            &[
                "--nvml-lib",
                lib.to_str().unwrap(),
                "--poll-interval",
                "50ms",
                "--cushion",
                "0B",
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
            &[(fake_nvml::STATE_ENV, gpu.path())],
        );
        Fake { gpu, daemon }
    }

    fn wait_status(&self, what: &str, f: impl Fn(&StatusReport) -> bool) -> StatusReport {
        self.daemon.wait_status(what, f)
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper() -> Proc {
    Proc(
        Command::new("sleep")
            .arg("120")
            .spawn()
            .expect("spawn sleep"),
    )
}

fn my_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A process of another user: `(pid, uid, the process if we started it)`,
/// or `None` (and a note on stderr) where there is none to use.
fn other_users_process() -> Option<(u32, u32, Option<Proc>)> {
    if my_uid() == 0 {
        let child = Command::new("sleep")
            .arg("120")
            .uid(OTHER_UID)
            .gid(OTHER_UID)
            .spawn()
            .expect("spawn sleep as nobody");
        let p = Proc(child);
        return Some((p.pid(), OTHER_UID, Some(p)));
    }
    match uid_of(1) {
        Some(uid) if uid != my_uid() => Some((1, uid, None)),
        _ => {
            eprintln!("SKIPPED: not root, and pid 1 is ours: no process of another user to show");
            None
        }
    }
}

/// The name `id -nu` gives `uid`, or the number.
fn user_name(uid: u32) -> String {
    Command::new("id")
        .args(["-nu", &uid.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| uid.to_string())
}

/// The line of `text` that starts (after padding) with `pid`.
fn row(text: &str, pid: u32) -> &str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
        .unwrap_or_else(|| panic!("no row for pid {pid} in:\n{text}"))
}

#[test]
fn ps_shows_processes_of_two_users_and_what_each_counts_against() {
    let Some((other_pid, other_uid, _other)) = other_users_process() else {
        return;
    };
    let f = Fake::start();
    let mine = sleeper();
    // A reservation whose client (vramctl reserve) itself uses 6 GiB.
    let mut holder = f.daemon.hold("6GiB");
    let holder_pid = holder.id();
    f.gpu.set_process(0, holder_pid, 6 * GIB);
    f.gpu.set_process(0, mine.pid(), 3 * GIB);
    f.gpu.set_process(0, other_pid, 2 * GIB);
    let s = f.wait_status("three GPU processes", |s| s.processes.len() == 3);
    let id = s.reservations[0].id;
    let me = user_name(my_uid());
    let other = user_name(other_uid);

    let out = f.daemon.vramctl().arg("ps").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().next().unwrap();
    for col in ["PID", "USER", "COMMAND", "DEV", "BYTES", "COUNTS AGAINST"] {
        assert!(header.contains(col), "{header}");
    }
    let cells = |pid| {
        row(&text, pid)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        cells(holder_pid),
        format!("{holder_pid} {me} vramctl 0 6.00 GiB {id} (holder)")
    );
    assert_eq!(
        cells(mine.pid()),
        format!("{} {me} sleep 0 3.00 GiB unattributed", mine.pid())
    );
    let other_row = cells(other_pid);
    assert!(
        other_row.starts_with(&format!("{other_pid} {other} "))
            && other_row.ends_with(" 0 2.00 GiB unattributed"),
        "{other_row}"
    );
    // Largest first.
    let pids: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(
        pids,
        [holder_pid, mine.pid(), other_pid].map(|p| p.to_string())
    );

    let out = f.daemon.vramctl().args(["ps", "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3, "{v}");
    let by_pid = |pid: u32| {
        procs
            .iter()
            .find(|p| p["pid"] == pid)
            .unwrap_or_else(|| panic!("pid {pid} in {v}"))
    };
    let h = by_pid(holder_pid);
    assert_eq!(
        (
            &h["uid"],
            &h["user"],
            &h["command"],
            &h["bytes"],
            &h["reservation"],
            &h["label"]
        ),
        (
            &Value::from(my_uid()),
            &Value::from(me.clone()),
            &Value::from("vramctl"),
            &Value::from(6 * GIB),
            &Value::from(id.0),
            &Value::from("holder")
        )
    );
    let o = by_pid(other_pid);
    assert_eq!(o["uid"], other_uid);
    assert_eq!(o["user"], other);
    assert_eq!(o["reservation"], Value::Null);
    assert_eq!(o["released"], false);
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn ps_hides_other_users_pids_from_a_user_who_is_not_an_admin() {
    if my_uid() != 0 {
        eprintln!("SKIPPED: needs root to run vramctl as another user");
        return;
    }
    let f = Fake::start_with(&["--socket-mode", "0666"]);
    // The socket's directory is ours alone: let the other user reach it.
    let dir = f.daemon.socket().parent().unwrap().to_path_buf();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let root_proc = sleeper();
    let (other_pid, _, _other) = other_users_process().unwrap();
    f.gpu.set_process(0, root_proc.pid(), 3 * GIB);
    f.gpu.set_process(0, other_pid, 2 * GIB);
    f.wait_status("two GPU processes", |s| s.processes.len() == 2);
    let out = f
        .daemon
        .vramctl()
        .args(["ps", "--json"])
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2, "{v}");
    // Largest first: root's process, its pid and command hidden.
    assert_eq!(procs[0]["pid"], 0, "{v}");
    assert_eq!(procs[0]["uid"], 0);
    assert_eq!(procs[0]["user"], "root");
    assert_eq!(procs[0]["command"], Value::Null);
    assert_eq!(procs[0]["bytes"], 3 * GIB);
    // Its own process, in full.
    assert_eq!(procs[1]["pid"], other_pid);
    assert_eq!(procs[1]["uid"], OTHER_UID);
    assert_eq!(procs[1]["command"], "sleep");
    // Root (an admin) sees both pids.
    let out = f.daemon.vramctl().args(["ps", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["processes"][0]["pid"], root_proc.pid());
}

/// Reads `child`'s stdout or stderr lines on a thread.
fn lines_of(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line that satisfies `f`, within [`WAIT`]; panics with the lines
/// seen otherwise.
fn next_line(rx: &Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if f(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {what}; saw {seen:#?}");
}

/// A held 13 GiB reservation whose client uses 13 GiB, and an unattributed
/// `sleep` using 4 GiB: 7 GiB left of 24.
fn crowded() -> (Fake, Child, Proc) {
    let f = Fake::start();
    let holder = f.daemon.hold("13GiB");
    f.gpu.set_process(0, holder.id(), 13 * GIB);
    let squatter = sleeper();
    f.gpu.set_process(0, squatter.pid(), 4 * GIB);
    f.wait_status("7 GiB available", |s| {
        s.devices[0].available_bytes == 7 * GIB && s.processes.len() == 2
    });
    (f, holder, squatter)
}

#[test]
fn a_waiting_reserve_says_what_blocks_it_and_again_when_that_changes() {
    let (f, mut holder, squatter) = crowded();
    let (hp, sp) = (holder.id(), squatter.pid());
    let mut waiter = f
        .daemon
        .vramctl()
        .args(["reserve", "8GiB", "--device", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines_of(waiter.stderr.take().unwrap());
    let out = lines_of(waiter.stdout.take().unwrap());
    next_line(&err, "the queue position", |l| {
        l.contains("waits at position 1")
    });
    let first = next_line(&err, "a blocked message", |l| l.contains("needs"));
    assert!(
        first.ends_with(&format!(
            "needs 8.00 GiB on GPU 0, 7.00 GiB available; held by holder (pid {hp}) \
             13.00 GiB, unattributed sleep (pid {sp}) 4.00 GiB"
        )),
        "{first}"
    );
    // Nothing changes for a few polls: nothing more is said.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(err.try_recv().is_err(), "repeated while nothing changed");
    // The squatter shrinks but 8 GiB still do not fit: said again.
    f.gpu.set_process(0, sp, 3 * GIB + GIB / 2);
    let second = next_line(&err, "a changed blocked message", |l| l.contains("needs"));
    assert!(
        second.contains("7.50 GiB available")
            && second.contains(&format!("unattributed sleep (pid {sp}) 3.50 GiB")),
        "{second}"
    );
    // It goes: granted.
    f.gpu.set_process(0, sp, 0);
    next_line(&out, "the grant", |l| l.starts_with("granted reservation"));
    drop(squatter);
    let _ = waiter.kill();
    let _ = waiter.wait();
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn with_json_what_blocks_a_run_is_a_blocked_event() {
    let (f, mut holder, squatter) = crowded();
    let (hp, sp) = (holder.id(), squatter.pid());
    let mut waiter = f
        .daemon
        .vramctl()
        .args(["run", "--vram", "8GiB", "--json", "--", "true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = lines_of(waiter.stdout.take().unwrap());
    let event = |name: &'static str| {
        let line = next_line(&out, name, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == name)
        });
        serde_json::from_str::<Value>(&line).unwrap()
    };
    let queued = event("queued");
    let b = event("blocked");
    assert_eq!(b["id"], queued["id"]);
    assert_eq!(b["device"], 0);
    assert_eq!(b["needs_bytes"], 8 * GIB);
    assert_eq!(b["available_bytes"], 7 * GIB);
    assert_eq!(b["ahead"], 0);
    let held = b["held_by"].as_array().unwrap();
    assert_eq!(held.len(), 2, "{b}");
    assert_eq!(held[0]["kind"], "reservation");
    assert_eq!(held[0]["label"], "holder");
    assert_eq!(held[0]["pid"], hp);
    assert_eq!(held[0]["bytes"], 13 * GIB);
    assert_eq!(held[1]["kind"], "unattributed");
    assert_eq!(held[1]["pid"], sp);
    assert_eq!(held[1]["command"], "sleep");
    assert_eq!(held[1]["bytes"], 4 * GIB);
    // The holder grows: a new event.
    f.gpu.set_process(0, hp, 14 * GIB);
    let b2 = event("blocked");
    assert_eq!(b2["available_bytes"], 6 * GIB);
    assert_eq!(b2["held_by"][0]["bytes"], 14 * GIB);
    // Room is made: granted, run, exited.
    f.gpu.set_process(0, sp, 0);
    f.gpu.set_process(0, hp, 0);
    event("granted");
    let exited = event("exited");
    assert_eq!(exited["code"], 0);
    drop(squatter);
    let _ = waiter.wait();
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn top_once_piped_prints_one_plain_frame() {
    let d = Daemon::start(&[]);
    let mut holder = d.hold("4GiB");
    let out = d.vramctl().args(["top", "--once"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\x1b'),
        "no terminal codes in a pipe:\n{text}"
    );
    assert_eq!(text.matches("vramd ").count(), 1, "one frame:\n{text}");
    assert!(text.starts_with("vramd "), "{text}");
    assert!(text.contains("backend simulated"), "{text}");
    // The device, the holder's process and its reservation, the queue.
    assert!(text.contains("SIM-0"), "{text}");
    let proc_row = row(&text, holder.id());
    assert!(
        proc_row.contains("vramctl") && proc_row.contains("4.00 GiB"),
        "{proc_row}"
    );
    assert!(text.contains("holder"), "{text}");
    assert!(text.contains("queue empty"), "{text}");
    assert!(
        text.ends_with("recent events:\n  none seen yet\n"),
        "{text}"
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn top_piped_prints_a_frame_per_refresh_with_the_events_it_saw() {
    let d = Daemon::start(&[]);
    let mut top = d
        .vramctl()
        .args(["top", "--interval", "100ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(top.stdout.take().unwrap());
    next_line(&out, "a first frame", |l| l.starts_with("vramd "));
    next_line(&out, "a second frame", |l| l.starts_with("vramd "));
    let mut holder = d.hold("4GiB");
    let id = d.client().status().unwrap().reservations[0].id;
    let event = next_line(&out, "the grant as an event", |l| {
        l.contains(&format!("granted {id}: 4.00 GiB on GPU 0 (holder)"))
    });
    assert!(event.starts_with("  up "), "{event}");
    let _ = holder.kill();
    let _ = holder.wait();
    next_line(&out, "the release as an event", |l| {
        l.contains(&format!("released {id}: 4.00 GiB on GPU 0 (holder)"))
    });
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(top.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = top.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "top did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn top_on_a_terminal_draws_in_place_and_restores_it() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED: `script` (util-linux) is not installed: no pseudo-terminal to test in");
        return;
    }
    let d = Daemon::start(&[]);
    let vramctl = vramd_tests::bin("vramctl");
    // `script` gives top a pseudo-terminal; SIGINT after a second ends it.
    let inner = format!(
        "timeout -s INT --preserve-status 1 {} top --interval 100ms",
        vramctl.display()
    );
    let out = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .env("VRAMD_SOCKET", d.socket())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let enter = "\x1b[?1049h\x1b[?25l";
    let leave = "\x1b[?25h\x1b[?1049l";
    assert!(text.starts_with(enter), "alternate screen first: {text:?}");
    let frames = text.matches("\x1b[Hvramd ").count();
    assert!(
        frames >= 3,
        "a frame per refresh, drawn from home: {text:?}"
    );
    assert!(
        text.contains("\x1b[K") && text.contains("\x1b[J"),
        "{text:?}"
    );
    assert!(
        text.trim_end().ends_with(leave),
        "the terminal is restored last: {text:?}"
    );
}
