//! `vramctl run --enforce`: a command capped at its reservation through an
//! NVIDIA MPS server, here a pipe directory with a `control` FIFO as the
//! MPS control daemon makes (no GPU needed: the cap is only environment);
//! `vramd --mps` with a fake `nvidia-cuda-mps-control` on its PATH, and
//! `vramd --mps-pipe-dir`.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vramd_tests::{Daemon, WAIT, bin};

/// A fake `nvidia-cuda-mps-control`: `-d` makes the control FIFO in
/// `$CUDA_MPS_PIPE_DIRECTORY`; a `quit` line on stdin removes it. Each call
/// appends what it did, its arguments and both directories to
/// `$FAKE_MPS_RECORD`.
const FAKE_CONTROL: &str = r#"#!/bin/sh
record="${FAKE_MPS_RECORD:?}"
if [ "$1" = "-d" ]; then
    echo "start args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$record"
    mkfifo "$CUDA_MPS_PIPE_DIRECTORY/control" || exit 1
    exit 0
fi
read -r line
echo "$line args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$record"
if [ "$line" = quit ]; then
    rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
fi
"#;

/// A directory holding the fake control program, and the PATH that finds
/// it first.
fn fake_control_path(dir: &Path) -> PathBuf {
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let prog = bin_dir.join("nvidia-cuda-mps-control");
    std::fs::write(&prog, FAKE_CONTROL).unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    PathBuf::from(format!("{}:{path}", bin_dir.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn is_fifo(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// The exit status of `run --enforce` without a usable MPS server.
const EXIT_NO_MPS: i32 = 78;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes `dir/pipe/control` a FIFO, as `nvidia-cuda-mps-control -d` does,
/// and `dir/log`; returns (pipe dir, log dir).
fn fake_mps_server(dir: &Path) -> (PathBuf, PathBuf) {
    let pipe = dir.join("pipe");
    let log = dir.join("log");
    std::fs::create_dir_all(&pipe).unwrap();
    std::fs::create_dir_all(&log).unwrap();
    mkfifo(&pipe.join("control"));
    (pipe, log)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// The `NAME=value` lines of `env` output.
fn env_value<'a>(env: &'a str, name: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn run_enforce_caps_the_command_at_its_reservation_through_the_named_server() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (pipe, log) = fake_mps_server(dir.path());
    let out = d
        .vramctl()
        .args(["run", "--enforce", "--vram", "8GiB", "--mps-pipe-dir"])
        .arg(&pipe)
        .arg("--mps-log-dir")
        .arg(&log)
        .args(["--", "sh", "-c", "env"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let env = stdout(&out);
    assert_eq!(
        env_value(&env, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
        Some("0=8192M"),
        "{env}"
    );
    assert_eq!(
        env_value(&env, "CUDA_MPS_PIPE_DIRECTORY"),
        pipe.to_str(),
        "{env}"
    );
    assert_eq!(
        env_value(&env, "CUDA_MPS_LOG_DIRECTORY"),
        log.to_str(),
        "{env}"
    );
    // Ordinal 0 is the granted device: the only one the command sees.
    assert_eq!(env_value(&env, "CUDA_VISIBLE_DEVICES"), Some("0"), "{env}");
}

#[test]
fn status_lists_an_enforced_run_with_its_limit_and_a_plain_run_as_not_enforced() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (pipe, _log) = fake_mps_server(dir.path());
    let vramctl = bin("vramctl");
    let inside = format!(
        "{v} status --json && echo ==== && {v} status",
        v = vramctl.display()
    );
    let run = |enforce: bool| {
        let mut c = d.vramctl();
        c.args(["run", "--label", "capped", "--vram", "4295016447B"]);
        if enforce {
            c.arg("--enforce").arg("--mps-pipe-dir").arg(&pipe);
        }
        let out = c.args(["--", "sh", "-c", &inside]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let (json, table) = text.split_once("====\n").expect("both statuses");
        let status: serde_json::Value = serde_json::from_str(json).expect("status JSON");
        (status, table.to_string())
    };
    let (status, table) = run(true);
    let id = status["reservations"][0]["id"].clone();
    assert_eq!(
        status["enforced"],
        serde_json::json!([{"id": id, "limit_bytes": 4096u64 << 20, "mechanism": "mps"}]),
        "{status:#}"
    );
    assert!(
        table.contains("capped (enforced: mps ≤ 4.00 GiB)"),
        "{table}"
    );
    let (status, table) = run(false);
    assert_eq!(status["enforced"], serde_json::json!([]), "{status:#}");
    assert!(!table.contains("enforced"), "{table}");
}

#[test]
fn run_enforce_takes_the_server_from_the_environment_and_rounds_down_to_mib() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (pipe, log) = fake_mps_server(dir.path());
    let out = d
        .vramctl()
        .env("VRAMD_MPS_PIPE_DIRECTORY", &pipe)
        .env("VRAMD_MPS_LOG_DIRECTORY", &log)
        // 4 GiB and one byte short of another MiB.
        .args(["run", "--enforce", "--vram", "4295016447B", "--", "env"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let env = stdout(&out);
    assert_eq!(
        env_value(&env, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
        Some("0=4096M"),
        "{env}"
    );
    assert_eq!(
        env_value(&env, "CUDA_MPS_PIPE_DIRECTORY"),
        pipe.to_str(),
        "{env}"
    );
    assert_eq!(
        env_value(&env, "CUDA_MPS_LOG_DIRECTORY"),
        log.to_str(),
        "{env}"
    );
}

#[test]
fn run_without_enforce_sets_no_limit_even_with_a_server_named() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (pipe, _log) = fake_mps_server(dir.path());
    let out = d
        .vramctl()
        .env("VRAMD_MPS_PIPE_DIRECTORY", &pipe)
        .env_remove("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")
        .args(["run", "--vram", "1GiB", "--", "env"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let env = stdout(&out);
    assert_eq!(
        env_value(&env, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
        None,
        "{env}"
    );
    assert_eq!(env_value(&env, "VRAMD_BYTES"), Some("1073741824"), "{env}");
}

#[test]
fn run_enforce_without_a_server_refuses_and_never_runs_the_command() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let out = d
        .vramctl()
        .env_remove("VRAMD_MPS_PIPE_DIRECTORY")
        .args(["run", "--enforce", "--vram", "1GiB", "--", "touch"])
        .arg(&ran)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_NO_MPS), "{}", stderr(&out));
    assert!(!ran.exists(), "the command ran unenforced");
    let err = stderr(&out);
    assert!(
        err.contains("--enforce needs an NVIDIA MPS server"),
        "{err}"
    );
    assert!(err.contains("--mps-pipe-dir"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Refused before reserving: the daemon granted nothing.
    let s = d.client().status().unwrap();
    assert_eq!(s.counters.grants, 0, "{s:#?}");
}

#[test]
fn run_enforce_with_a_pipe_dir_without_control_pipe_refuses() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    // A directory, but no MPS control daemon made its pipe there.
    let pipe = dir.path().join("pipe");
    std::fs::create_dir_all(&pipe).unwrap();
    let out = d
        .vramctl()
        .args([
            "run",
            "--enforce",
            "--vram",
            "1GiB",
            "--json",
            "--mps-pipe-dir",
        ])
        .arg(&pipe)
        .args(["--", "touch"])
        .arg(&ran)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_NO_MPS), "{}", stderr(&out));
    assert!(!ran.exists(), "the command ran unenforced");
    let event: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(event["event"], "error");
    assert_eq!(event["kind"], "no_mps");
    assert_eq!(event["exit_status"], EXIT_NO_MPS);
    let message = event["message"].as_str().unwrap();
    assert!(message.contains(pipe.to_str().unwrap()), "{message}");
    assert!(message.contains("control"), "{message}");
    let s = d.client().status().unwrap();
    assert_eq!(s.counters.grants, 0, "{s:#?}");
}

#[test]
fn vramd_mps_starts_the_control_daemon_reports_it_enforces_through_it_and_stops_it_on_sigterm() {
    let fake = tempfile::tempdir().unwrap();
    let path = fake_control_path(fake.path());
    let record = fake.path().join("record");
    let mut d = Daemon::start_env(
        &["--simulate", "24GiB", "--mps"],
        &[("PATH", &path), ("FAKE_MPS_RECORD", &record)],
    );
    let pipe = d.dir().join("mps").join("pipe");
    let log = d.dir().join("mps").join("log");
    // The socket is bound before the control daemon starts, but nothing is
    // served until it did: the first status comes after it.
    let s = d.client().status().unwrap();
    // Started once, in the background, with both directories beside the socket.
    assert_eq!(
        read(&record),
        format!(
            "start args=-d pipe={} log={}\n",
            pipe.display(),
            log.display()
        )
    );
    assert!(is_fifo(&pipe.join("control")));
    let mps = s.mps.expect("status reports the MPS server");
    assert_eq!(mps.pipe_dir, pipe.display().to_string());
    assert_eq!(mps.log_dir, Some(log.display().to_string()));
    assert!(mps.healthy, "{mps:?}");

    // run --enforce finds it through the status.
    let out = d
        .vramctl()
        .env_remove("VRAMD_MPS_PIPE_DIRECTORY")
        .env_remove("VRAMD_MPS_LOG_DIRECTORY")
        .args([
            "run",
            "--enforce",
            "--vram",
            "8GiB",
            "--",
            "sh",
            "-c",
            "env",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let env = stdout(&out);
    assert_eq!(
        env_value(&env, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
        Some("0=8192M"),
        "{env}"
    );
    assert_eq!(
        env_value(&env, "CUDA_MPS_PIPE_DIRECTORY"),
        pipe.to_str(),
        "{env}"
    );
    assert_eq!(
        env_value(&env, "CUDA_MPS_LOG_DIRECTORY"),
        log.to_str(),
        "{env}"
    );

    d.signal(libc::SIGTERM);
    let status = d.wait_exit(WAIT).expect("vramd exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(
        read(&record).ends_with(&format!(
            "quit args= pipe={} log={}\n",
            pipe.display(),
            log.display()
        )),
        "{}",
        read(&record)
    );
    assert!(
        !pipe.join("control").exists(),
        "the control daemon was not stopped"
    );
}

#[test]
fn vramd_mps_pipe_dir_reports_the_administrators_server_and_its_health() {
    let dir = tempfile::tempdir().unwrap();
    let (pipe, _log) = fake_mps_server(dir.path());
    let d = Daemon::start(&["--mps-pipe-dir", pipe.to_str().unwrap()]);
    let mps = d.client().status().unwrap().mps.expect("reported");
    assert_eq!(mps.pipe_dir, pipe.display().to_string());
    assert!(mps.healthy, "{mps:?}");
    // Checked each time the status is asked: the server stopped.
    std::fs::remove_file(pipe.join("control")).unwrap();
    let mps = d.client().status().unwrap().mps.expect("reported");
    assert!(!mps.healthy, "{mps:?}");
    assert!(
        mps.note.as_deref().unwrap_or("").contains("control"),
        "{mps:?}"
    );
    // And run --enforce refuses rather than run unenforced.
    let ran = dir.path().join("ran");
    let out = d
        .vramctl()
        .env_remove("VRAMD_MPS_PIPE_DIRECTORY")
        .args(["run", "--enforce", "--vram", "1GiB", "--", "touch"])
        .arg(&ran)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_NO_MPS), "{}", stderr(&out));
    assert!(!ran.exists(), "the command ran unenforced");
}

#[test]
fn a_daemon_without_mps_reports_none() {
    let d = Daemon::start(&[]);
    assert_eq!(d.client().status().unwrap().mps, None);
}

#[test]
fn vramd_mps_without_the_control_program_fails_to_start_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let socket = dir.path().join("x.sock");
    let out = Command::new("/usr/bin/timeout")
        .arg("20")
        .arg(bin("vramd"))
        .args([
            "--simulate",
            "24GiB",
            "--mps",
            "--log-level",
            "off",
            "--socket",
        ])
        .arg(&socket)
        .env_remove("RUST_LOG")
        .env("PATH", &empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("vramd: --mps: cannot run nvidia-cuda-mps-control:"),
        "{err}"
    );
    assert!(err.contains("without --mps"), "{err}");
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn run_enforce_accepts_a_live_control_socket_and_refuses_one_left_after_quit() {
    // The layout of current drivers: `control` is a socket, and the control
    // daemon's pid file beside it goes when it quits (the socket stays).
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe");
    std::fs::create_dir_all(&pipe).unwrap();
    let _control = std::os::unix::net::UnixListener::bind(pipe.join("control")).unwrap();
    let ran = dir.path().join("ran");
    let run = || {
        d.vramctl()
            .args(["run", "--enforce", "--vram", "1GiB", "--mps-pipe-dir"])
            .arg(&pipe)
            .args(["--", "touch"])
            .arg(&ran)
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(out.status.code(), Some(EXIT_NO_MPS), "{}", stderr(&out));
    assert!(stderr(&out).contains("stopped"), "{}", stderr(&out));
    assert!(!ran.exists(), "the command ran unenforced");
    // A live control daemon (here: this test's own pid).
    std::fs::write(
        pipe.join("nvidia-cuda-mps-control.pid"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ran.exists(), "the command did not run");
}
