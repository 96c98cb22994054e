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

use std::collections::HashMap;
use std::time::{Duration, Instant};
use vramd_protocol::codec::ReadBuffer;

use vramd_protocol::{ClientMessage, Decoder, Encoding, ErrorKind, ServerMessage, encode};
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

    fn open(socket: &Path) -> BinConn {
        let mut c = Self::connect(socket);
        c.send(&ClientMessage::Hello {
            version: 1,
            client: "hardening".into(),
        });
        let w = c.recv();
        assert!(matches!(w, ServerMessage::Welcome { .. }), "{w:?}");
        c
    }

    fn send(&mut self, msg: &ClientMessage) {
        self.send_raw(&encode(Encoding::Binary, msg).expect("encode"));
    }

    /// Whether the daemon closes the connection within [`WAIT`] (reading
    /// and dropping whatever comes first).
    fn closed_by_daemon(&mut self) -> bool {
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).is_ok()
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

/// The daemon's resident memory, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Fills the simulated 24 GiB device, so that every later request waits.
fn fill_device(d: &Daemon) -> JsonConn {
    let mut holder = JsonConn::open(d.socket());
    holder.send(r#"{"reserve":{"tag":1,"bytes":25769803776,"label":"full"}}"#);
    assert!(holder.recv().get("granted").is_some());
    holder
}

/// Finding 1: a client that queued 1,000 requests and reads nothing while
/// another moves the queue with reserve/cancel of a high-priority request
/// costs the daemon no memory per move: unsent positions coalesce. When
/// the client finally reads, each request's newest position is there.
#[test]
fn a_client_that_does_not_read_costs_no_memory_per_queue_move() {
    const WAITERS: u64 = 1000;
    const CYCLES: u64 = 800;
    let d = Daemon::start(&[]);
    let _holder = fill_device(&d);
    let mut sleeper = JsonConn::open(d.socket());
    let mut burst = String::new();
    for tag in 1..=WAITERS {
        burst.push_str(&format!(r#"{{"reserve":{{"tag":{tag},"bytes":1}}}}"#));
        burst.push('\n');
    }
    sleeper.send_raw(burst.as_bytes());
    d.wait_status("the sleeper's requests to wait", |s| {
        s.queue_total == WAITERS
    });
    let before = rss_bytes(d.pid());
    let mut mover = JsonConn::open(d.socket());
    let started = Instant::now();
    let mut cycles = 0;
    while cycles < CYCLES && started.elapsed() < Duration::from_secs(60) {
        mover.send(r#"{"reserve":{"tag":7,"bytes":1,"priority":10}}"#);
        assert_eq!(mover.recv()["queued"]["position"], 1);
        mover.send(r#"{"cancel":{"tag":7}}"#);
        assert_eq!(mover.recv()["cancelled"]["count"], 1);
        cycles += 1;
    }
    let grown = rss_bytes(d.pid()).saturating_sub(before);
    eprintln!(
        "{cycles} queue moves x2 in {:?}: daemon RSS grew {} KiB",
        started.elapsed(),
        grown / 1024
    );
    assert!(
        grown < 32 << 20,
        "the daemon grew {} MiB for a client that does not read",
        grown >> 20
    );
    // The sleeper reads at last: for every request, its last word is its
    // current position.
    let mut last = HashMap::new();
    sleeper
        .stream_mut()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Some(v) = sleeper.try_recv() {
        let q = &v["queued"];
        assert!(q.is_object(), "{v}");
        last.insert(q["tag"].as_u64().unwrap(), q["position"].as_u64().unwrap());
    }
    assert_eq!(last.len() as u64, WAITERS);
    for (tag, position) in last {
        assert_eq!(tag, position, "request {tag}'s newest position");
    }
}

/// Finding 1, the cap: a client that leaves more than --max-unsent-bytes
/// of replies unread is closed, everything it held is released (a waiter
/// gets the memory), and the daemon says why in its log.
#[test]
fn a_client_past_the_unread_cap_is_closed_and_releases_what_it_held() {
    let d = Daemon::start(&["--max-unsent-bytes", "64KiB"]);
    let hog = fill_device(&d);
    let mut waiter = JsonConn::open(d.socket());
    waiter.send(r#"{"reserve":{"tag":2,"bytes":25769803776}}"#);
    assert!(waiter.recv().get("queued").is_some());
    // The hog asks for status over and over and reads none of it.
    let mut writer = hog.into_stream();
    let spammer = std::thread::spawn(move || {
        let line = b"{\"status\":{\"tag\":3}}\n".repeat(1000);
        for _ in 0..100 {
            if writer.write_all(&line).is_err() {
                return true;
            }
        }
        false
    });
    let g = waiter.recv();
    assert_eq!(
        g["granted"]["tag"], 2,
        "the waiter gets the hog's memory: {g}"
    );
    assert!(spammer.join().unwrap(), "the hog's connection was closed");
    assert!(
        d.log().contains("does not read its replies"),
        "{}",
        d.log_tail(20)
    );
}

/// Finding 2: a client stalled inside a frame (or a JSON line) is told so
/// and closed once --frame-timeout passes; it does not keep its buffer.
#[test]
fn a_message_that_never_completes_closes_its_connection() {
    let d = Daemon::start(&["--frame-timeout", "300ms"]);
    let mut b = BinConn::open(d.socket());
    // A frame announcing 1 MiB, of which 1,000 bytes arrive.
    let mut partial = (1u32 << 20).to_be_bytes().to_vec();
    partial.extend_from_slice(&[0; 1000]);
    b.send_raw(&partial);
    let started = Instant::now();
    assert_error(&b.recv(), ErrorKind::BadRequest);
    assert!(b.closed_by_daemon());
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut j = JsonConn::open(d.socket());
    j.send_raw(br#"{"ping":{"tag":"#);
    let e = j.recv();
    assert_eq!(error_kind(&e), Some("bad_request"), "{e}");
    assert!(j.closed_by_daemon());
    // Before hello, a frame larger than any hello is refused at once.
    let mut early = BinConn::connect(d.socket());
    let mut big = (1u32 << 20).to_be_bytes().to_vec();
    big.extend_from_slice(&[0; 5000]);
    early.send_raw(&big);
    assert_error(&early.recv(), ErrorKind::BadRequest);
    assert!(early.closed_by_daemon());
    // A client that sends a message slowly but completely is served.
    let mut slow = JsonConn::open(d.socket());
    for piece in [&br#"{"ping":"#[..], br#"{"tag":5}"#, b"}\n"] {
        slow.send_raw(piece);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(slow.recv()["pong"]["tag"], 5);
}

/// Finding 3: 60,000 tiny reservations (and a few with huge labels) do not
/// make `status` fail: past its caps it lists fewer, and the totals count
/// everything — in both encodings.
#[test]
fn status_never_fails_because_of_its_size() {
    const TINY: u64 = 60_000;
    const LABELLED: u64 = 40;
    let d = Daemon::start(&[]);
    let c = JsonConn::open(d.socket());
    let mut writer = c.into_stream();
    let mut reader = std::io::BufReader::new(writer.try_clone().expect("clone"));
    let feeder = std::thread::spawn(move || {
        let mut burst = Vec::new();
        // The labelled ones first: they are among the first listed, which
        // alone would pass a frame (40 × 50 KB).
        let label = "x".repeat(50_000);
        for tag in 0..LABELLED {
            burst.extend_from_slice(
                format!("{{\"reserve\":{{\"tag\":{tag},\"bytes\":1,\"label\":\"{label}\"}}}}\n")
                    .as_bytes(),
            );
        }
        for tag in 0..TINY {
            burst.extend_from_slice(
                format!("{{\"reserve\":{{\"tag\":{tag},\"bytes\":1}}}}\n").as_bytes(),
            );
        }
        writer.write_all(&burst).expect("write the burst");
        writer
    });
    let mut granted = 0;
    let mut line = String::new();
    while granted < TINY + LABELLED {
        line.clear();
        use std::io::BufRead;
        assert!(reader.read_line(&mut line).expect("a grant") > 0, "closed");
        assert!(line.starts_with("{\"granted\""), "{line}");
        granted += 1;
    }
    let mut writer = feeder.join().expect("feeder");
    // Binary, through the SDK.
    let s = d.client().status().expect("status in binary");
    assert_eq!(s.reservations_total, TINY + LABELLED);
    assert!(
        !s.reservations.is_empty() && s.reservations.len() < LABELLED as usize,
        "cut to fit a frame: {}",
        s.reservations.len()
    );
    // JSON, by hand.
    writer.write_all(b"{\"status\":{\"tag\":9}}\n").unwrap();
    line.clear();
    use std::io::BufRead;
    reader.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON status");
    let st = &v["status"]["status"];
    assert_eq!(
        st["reservations_total"],
        TINY + LABELLED,
        "{}",
        &line[..200]
    );
    let listed = st["reservations"].as_array().expect("a list").len();
    assert!(listed > 0 && listed < LABELLED as usize, "{listed}");
}

/// The soft and hard limits on open files of process `pid`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// Sets the open-file limits of process `pid` (0: this one).
fn set_open_file_limits(pid: u32, soft: u64, hard: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit reads one rlimit struct we own.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Finding 4: connections that never say hello lock no one out. They do
/// not count towards --max-connections, their pool is bounded on its own
/// (the one that waited longest is closed, with an error), and the daemon
/// raised its open-file soft limit to the hard limit at start.
#[test]
fn silent_connections_lock_no_one_out() {
    const SILENT: usize = 400;
    let (soft, hard) = open_file_limits(std::process::id());
    // Start the daemon with a low soft limit (it inherits ours).
    set_open_file_limits(0, 256.min(hard), hard);
    let d = Daemon::start(&["--max-connections", "100", "--max-handshakes", "64"]);
    set_open_file_limits(0, soft, hard);
    let (daemon_soft, daemon_hard) = open_file_limits(d.pid());
    assert_eq!(
        daemon_soft, daemon_hard,
        "the daemon raises its soft open-file limit to the hard limit"
    );
    let mut silent: Vec<JsonConn> = (0..SILENT).map(|_| JsonConn::connect(d.socket())).collect();
    let started = Instant::now();
    let c = d.client();
    let s = c.status().expect("a client that says hello is served");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s.devices.len(), 1);
    // The oldest silent connection was told why it was closed.
    let e = silent[0].recv();
    assert_eq!(error_kind(&e), Some("limit_exceeded"), "{e}");
    assert!(silent[0].closed_by_daemon());
}

/// Finding 4: per-user caps on connections (past hello) and on
/// reservations + waiting requests; over them a client gets a clear
/// `limit_exceeded` in its own encoding, and admins (root) are exempt.
#[test]
fn per_user_caps_refuse_clearly_and_spare_admins() {
    if !is_root() {
        eprintln!("skipped: needs root to act as a second user");
        return;
    }
    let d = shared_daemon(&[
        "--max-connections-per-uid",
        "3",
        "--max-reservations-per-uid",
        "2",
    ]);
    let socket = d.socket().to_path_buf();
    as_user(OTHER_UID, move || {
        let mut open: Vec<JsonConn> = (0..3).map(|_| JsonConn::open(&socket)).collect();
        let mut fourth = JsonConn::connect(&socket);
        fourth.send(r#"{"hello":{"version":1}}"#);
        let e = fourth.recv();
        assert_eq!(error_kind(&e), Some("limit_exceeded"), "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--max-connections-per-uid"),
            "{e}"
        );
        assert!(fourth.closed_by_daemon());
        let mut binary = BinConn::connect(&socket);
        binary.send(&ClientMessage::Hello {
            version: 1,
            client: String::new(),
        });
        assert_error(&binary.recv(), ErrorKind::LimitExceeded);
        // Reservations: two held or waiting, then no more.
        let c = &mut open[0];
        c.send(r#"{"reserve":{"tag":1,"bytes":1}}"#);
        assert!(c.recv().get("granted").is_some());
        c.send(r#"{"reserve":{"tag":2,"bytes":25769803776}}"#);
        assert!(c.recv().get("queued").is_some());
        c.send(r#"{"reserve":{"tag":3,"bytes":1}}"#);
        let e = c.recv();
        assert_eq!(error_kind(&e), Some("limit_exceeded"), "{e}");
        // Closing one connection makes room for another.
        drop(open.pop());
        assert!(wait_until(WAIT, || {
            let mut c = JsonConn::connect(&socket);
            c.send(r#"{"hello":{"version":1}}"#);
            c.recv().get("welcome").is_some()
        }));
    });
    // Root is an admin: no per-user cap.
    let mut mine: Vec<JsonConn> = (0..5).map(|_| JsonConn::open(d.socket())).collect();
    for tag in 0..5 {
        mine[0].send(&format!(r#"{{"reserve":{{"tag":{tag},"bytes":1}}}}"#));
        assert!(mine[0].recv().get("granted").is_some());
    }
}

/// Finding 4: out of file descriptors (a hard limit the daemon cannot
/// raise), a client that connects gets a clear error instead of a hang,
/// and the log does not flood with accept failures.
#[test]
fn out_of_file_descriptors_a_client_gets_an_error_not_a_hang() {
    if !is_root() {
        eprintln!("skipped: needs root to lower the daemon's hard limit");
        return;
    }
    let d = Daemon::start(&[]);
    set_open_file_limits(d.pid(), 64, 64);
    let _silent: Vec<JsonConn> = (0..100).map(|_| JsonConn::connect(d.socket())).collect();
    let started = Instant::now();
    let mut c = JsonConn::connect(d.socket());
    c.send(r#"{"hello":{"version":1}}"#);
    let e = c.recv();
    assert_eq!(error_kind(&e), Some("limit_exceeded"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    let failures = d.log().matches("accept failed").count();
    assert!(
        failures <= 5,
        "{failures} accept-failure lines in about 2 s: {}",
        d.log_tail(10)
    );
}
