//! Running under systemd: the daemon serves on a socket passed to it
//! (socket activation, through `systemd-socket-activate`), leaves that
//! socket in place when it stops, and reports READY=1 and STOPPING=1 on
//! `NOTIFY_SOCKET`.
//!
//! `systemd-socket-activate` comes with the `systemd` package; without it
//! the socket-activation test says it is skipped, unless
//! `VRAMD_REQUIRE_SYSTEMD_TOOLS=1` (scripts/test sets it after installing
//! the package), where its absence fails the test.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vramd_tests::{Daemon, WAIT, bin};

/// `systemd-socket-activate` on PATH, if there is one.
fn socket_activate() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("systemd-socket-activate"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("VRAMD_REQUIRE_SYSTEMD_TOOLS").as_deref() != Ok("1"),
            "systemd-socket-activate is not on PATH, and VRAMD_REQUIRE_SYSTEMD_TOOLS=1"
        );
        eprintln!("SKIPPED: systemd-socket-activate is not on PATH (apt-get install systemd)");
    }
    found
}

#[test]
fn a_socket_passed_by_systemd_is_served_and_left_in_place() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let dir = vramd_harness::private_tempdir("vramd-sa-").unwrap();
    let socket = dir.path().join("activated.sock");
    // systemd-socket-activate binds the socket, then on the first
    // connection executes vramd with it as fd 3 (LISTEN_FDS=1). The
    // harness adds `--socket PATH` (the same path): vramd must not bind it.
    let mut cmd = Command::new(activate);
    cmd.arg("-l").arg(&socket).arg(bin("vramd")).args([
        "--simulate",
        "24GiB",
        "--log-level",
        "debug",
    ]);
    let mut d = vramd_harness::Daemon::spawn(cmd, dir, socket.clone()).unwrap();
    d.wait_listening(WAIT).unwrap_or_else(|e| panic!("{e}"));
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&socket).unwrap().ino()
    };
    let before = inode();

    // A client through the passed socket: vramctl status and a grant.
    let out = Command::new(bin("vramctl"))
        .env("VRAMD_SOCKET", &socket)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SIM-0"));
    let client = vramd_client::Client::connect(&socket).unwrap();
    let r = client
        .reserve(vramd_client::Request::new(vramd_client::GIB))
        .unwrap();
    assert_eq!(r.bytes(), vramd_client::GIB);
    drop(r);
    drop(client);
    assert!(
        d.log()
            .contains("using the listening socket passed by the service manager"),
        "{}",
        d.log()
    );
    assert!(
        !d.log().contains("removing stale socket file"),
        "{}",
        d.log()
    );

    d.signal(libc::SIGTERM);
    let status = d.wait_exit(WAIT).expect("vramd exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", d.log());
    // The socket unit owns the socket: it is neither removed nor replaced.
    assert!(
        socket.exists(),
        "the passed socket was removed\n{}",
        d.log()
    );
    assert_eq!(inode(), before, "the passed socket was recreated");
}

#[test]
fn readiness_and_stopping_are_reported_on_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let d = Daemon::start_env(&["--simulate", "24GiB"], &[("NOTIFY_SOCKET", &notify_path)]);
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("READY=1 within the wait limit");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    // Ready means serving.
    d.client().ping().unwrap();
    d.signal(libc::SIGTERM);
    let n = notify.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
    let mut d = d;
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());
}
