//! `vramctl run --enforce`: a command capped at its reservation through an
//! NVIDIA MPS server, here a pipe directory with a `control` FIFO as the
//! MPS control daemon makes (no GPU needed: the cap is only environment).

use std::path::{Path, PathBuf};
use std::process::Output;

use vramd_tests::Daemon;

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
