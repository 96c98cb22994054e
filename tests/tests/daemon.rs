//! The daemon's own lifecycle: start-up checks, the socket file, shutdown.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use vramd_tests::{Daemon, WAIT, bin, wait_until};

#[test]
fn without_simulate_it_explains_what_to_do() {
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let out = Command::new(bin("vramd"))
        .arg("--socket")
        .arg("/nonexistent/x.sock")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("libnvidia-ml.so.1") && err.contains("--simulate"),
        "{err}"
    );
}

#[test]
fn socket_mode_is_0660_by_default_and_configurable() {
    let d = Daemon::start(&[]);
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let d = Daemon::start(&["--socket-mode", "0600"]);
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn refuses_a_live_daemons_socket_and_replaces_a_stale_one() {
    let first = Daemon::start(&[]);
    let second = Command::new(bin("vramd"))
        .args(["--simulate", "8GiB", "--socket"])
        .arg(first.socket())
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listening"));
    // The first daemon still serves.
    first.client().ping().unwrap();

    // A socket file nobody listens on is stale: removed and replaced.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut d = Daemon::spawn_at(dir, path.clone(), &["--simulate", "8GiB"]);
    assert!(
        wait_until(WAIT, || vramd_client::Client::connect(&path).is_ok()),
        "{}",
        d.log()
    );
    assert!(d.alive());
}

#[test]
fn a_regular_file_at_the_socket_path_is_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, "data").unwrap();
    let out = Command::new(bin("vramd"))
        .args(["--simulate", "8GiB", "--socket"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly_and_remove_the_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut d = Daemon::start(&[]);
        let c = d.client();
        let _r = c.reserve(vramd_client::Request::new(1 << 30)).unwrap();
        d.signal(sig);
        let status = d.wait_exit(WAIT).expect("daemon exits");
        assert!(status.success(), "{status:?}: {}", d.log());
        assert!(!d.socket().exists(), "socket file left behind");
        assert!(d.log().contains("shutting down"));
        // The client notices.
        assert!(wait_until(WAIT, || c.ping().is_err()));
    }
}

#[test]
fn logs_one_line_per_grant_release_timeout_and_refusal() {
    let d = Daemon::start(&[]);
    let c = d.client();
    let r = c
        .reserve(vramd_client::Request::new(20 << 30).label("flux"))
        .unwrap();
    let _ = c.reserve(vramd_client::Request::new(10 << 30).timeout(Duration::from_millis(50)));
    let _ = c.reserve(vramd_client::Request::new(99 << 30));
    r.release().unwrap();
    assert!(wait_until(WAIT, || d.log().contains(" released ")));
    let log = d.log();
    let granted = log
        .lines()
        .find(|l| l.contains(" granted "))
        .expect("grant line");
    assert!(
        granted.contains("label=\"flux\"") || granted.contains("label=flux"),
        "{granted}"
    );
    assert!(granted.contains("bytes=21474836480"), "{granted}");
    assert!(log.lines().any(|l| l.contains("timed out")), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("refused") && l.contains("can never fit")),
        "{log}"
    );
}

#[test]
fn a_release_is_logged_before_the_grant_it_made_room_for() {
    let d = Daemon::start(&[]);
    let a = d.client();
    let b = d.client();
    let held = a
        .reserve(vramd_client::Request::new(20 << 30).label("first"))
        .unwrap();
    let waiting = b
        .submit(vramd_client::Request::new(10 << 30).label("second"))
        .unwrap();
    held.release().unwrap();
    let granted = waiting.wait().unwrap();
    // The line is written just after the answer is sent.
    assert!(wait_until(WAIT, || d.log().lines().any(|l| l
        .contains(" granted ")
        && l.contains("label=\"second\""))));
    let log = d.log();
    let line_of = |what: &str, label: &str| {
        let label = format!("label=\"{label}\"");
        log.lines()
            .position(|l| l.contains(what) && l.contains(&label))
            .unwrap_or_else(|| panic!("no {what:?} line for {label}:\n{log}"))
    };
    let released = line_of(" released ", "first");
    let second = line_of(" granted ", "second");
    assert!(released < second, "{log}");
    drop(granted);
}
