//! Hardening: no client can exhaust the daemon or lock others out, and
//! every refusal is a clear error in the client's own encoding. Each test
//! names one finding of the hardening review; all waits are bounded.
//!
//! Tests that need a second user run a thread whose credentials alone are
//! changed (the raw `setresuid` system call acts on the calling thread on
//! Linux), so the daemon sees its connections as another uid's. They need
//! root, which is how the suite runs in CI; elsewhere they say so and pass.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{Decoder, Encoding, ErrorKind, ServerMessage};
use vramd_tests::{Daemon, JsonConn, WAIT, error_kind, wait_until};

/// The uid (and gid) of the "other user" in these tests.
const OTHER_UID: u32 = 65534;

/// Whether this process may act as another user.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `f` on a thread whose credentials are `uid`/`uid` (only that
/// thread's: the raw system calls, unlike libc's wrappers, do not change
/// the other threads).
fn as_user<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: plain system calls on this thread's credentials.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, uid, uid, uid),
                0,
                "setresgid"
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, uid, uid, uid),
                0,
                "setresuid"
            );
        }
        f()
    })
    .join()
    .expect("the other user's thread")
}

/// A daemon another user can reach: its socket is 0666 and its directory
/// searchable.
fn shared_daemon(extra: &[&str]) -> Daemon {
    let mut args = vec!["--socket-mode", "0666"];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args);
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A raw binary connection.
struct BinConn {
    stream: UnixStream,
    buf: ReadBuffer,
    dec: Decoder,
}

impl BinConn {
    fn connect(socket: &Path) -> BinConn {
        let stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        BinConn {
            stream,
            buf: ReadBuffer::new(),
            dec: Decoder::new(Encoding::Binary),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// The next message; panics if the bytes are not a binary frame (e.g. a
    /// JSON line) or nothing comes within [`WAIT`].
    fn recv(&mut self) -> ServerMessage {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.dec.decode::<ServerMessage>(&mut self.buf) {
                Ok(Some(m)) => return m,
                Ok(None) => {}
                Err(e) => panic!(
                    "not a binary frame ({e}): {:?}",
                    String::from_utf8_lossy(self.buf.unread())
                ),
            }
            let n = self.stream.read(&mut chunk).expect("read a reply");
            assert!(n > 0, "connection closed while a reply was expected");
            self.buf.extend(&chunk[..n]);
        }
    }
}

fn assert_error(msg: &ServerMessage, kind: ErrorKind) {
    match msg {
        ServerMessage::Error { kind: k, .. } if *k == kind => {}
        other => panic!("expected a {kind} error, got {other:?}"),
    }
}

/// Finding 5: a user who is not an admin does not see the pids of other
/// users' reservations and waiting requests (nor their labels); the uid
/// stays.
#[test]
fn other_users_pids_are_hidden_from_non_admins() {
    if !is_root() {
        eprintln!("skipped: needs root to act as a second user");
        return;
    }
    let d = shared_daemon(&[]);
    let mut root = JsonConn::open(d.socket());
    root.send(r#"{"reserve":{"tag":1,"bytes":25769803776,"label":"root-job"}}"#);
    assert!(root.recv().get("granted").is_some());
    root.send(r#"{"reserve":{"tag":2,"bytes":1024,"label":"waits"}}"#);
    assert!(root.recv().get("queued").is_some());
    let socket: PathBuf = d.socket().to_path_buf();
    let seen = as_user(OTHER_UID, move || {
        let mut c = JsonConn::open(&socket);
        c.send(r#"{"status":{"tag":1}}"#);
        c.recv()
    });
    let status = &seen["status"]["status"];
    let r = &status["reservations"][0];
    assert_eq!(r["uid"], 0, "{status}");
    assert_eq!(r["pid"], 0, "another user's pid is hidden: {status}");
    assert_eq!(r["label"], serde_json::Value::Null);
    assert_eq!(r["pids"], serde_json::json!([]));
    let q = &status["queue"][0];
    assert_eq!(
        q["pid"], 0,
        "another user's waiting pid is hidden: {status}"
    );
    assert_eq!(q["label"], serde_json::Value::Null);
    // Root (an admin) still sees them.
    root.send(r#"{"status":{"tag":3}}"#);
    let s = root.recv();
    assert_eq!(
        s["status"]["status"]["reservations"][0]["pid"],
        std::process::id()
    );
}

/// Finding 6 (the part without restart): SIGHUP neither stops nor
/// disturbs the daemon, and the socket file goes on every way out the
/// daemon controls — a signal, or a start-up error after the socket was
/// bound (an unknown admin group).
#[test]
fn sighup_is_ignored_and_every_exit_removes_the_socket() {
    let mut d = Daemon::start(&[]);
    let mut c = JsonConn::open(d.socket());
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(WAIT, || d.log().contains("SIGHUP")),
        "SIGHUP is logged: {}",
        d.log_tail(20)
    );
    assert!(d.alive(), "SIGHUP ended the daemon");
    c.send(r#"{"ping":{"tag":4}}"#);
    assert_eq!(c.recv()["pong"]["tag"], 4, "the session survives SIGHUP");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).is_some(), "SIGTERM ends the daemon");
    assert!(
        !d.socket().exists(),
        "the socket file is removed on SIGTERM"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vramd.sock");
    let mut bad = Daemon::spawn_at(
        dir,
        socket.clone(),
        &[
            "--simulate",
            "1GiB",
            "--admin-group",
            "no-such-group-vramd-hardening",
        ],
    );
    let status = bad.wait_exit(WAIT).expect("an unknown admin group ends it");
    assert!(!status.success());
    assert!(
        bad.log().contains("no-such-group-vramd-hardening"),
        "{}",
        bad.log()
    );
    assert!(
        !socket.exists(),
        "the socket file is removed when start-up fails after binding"
    );
}

/// Finding 7: once a session's first byte said binary, every error is a
/// binary frame — also the handshake timeout after a first frame that did
/// not decode (when nothing is left in the buffer to guess from).
#[test]
fn a_binary_session_gets_its_errors_in_binary() {
    let d = Daemon::start(&["--handshake-timeout", "300ms"]);
    let mut c = BinConn::connect(d.socket());
    // A one-byte frame with variant 99: no such message.
    c.send_raw(&[0, 0, 0, 1, 99]);
    assert_error(&c.recv(), ErrorKind::BadRequest);
    assert_error(&c.recv(), ErrorKind::HandshakeTimeout);
    // JSON sessions are unchanged.
    let mut j = JsonConn::connect(d.socket());
    j.send("{\"nonsense\":{}}");
    assert_eq!(error_kind(&j.recv()), Some("bad_request"));
    assert_eq!(error_kind(&j.recv()), Some("handshake_timeout"));
}
