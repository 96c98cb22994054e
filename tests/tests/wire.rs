//! Raw bytes on the socket: both encodings, and bad input that must get a
//! clear error without disturbing anyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use vramd_client::{GIB, Request};
use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{ClientMessage, Decoder, Encoding, ServerMessage, encode};
use vramd_tests::{Daemon, JsonConn, WAIT, error_kind};

#[test]
fn json_lines_session_reserve_status_release() {
    let d = Daemon::start(&[]);
    let mut c = JsonConn::open(d.socket());
    c.send(r#"{"reserve":{"tag":1,"bytes":8589934592,"label":"flux"}}"#);
    let g = c.recv();
    assert_eq!(g["granted"]["tag"], 1);
    assert_eq!(g["granted"]["grant"]["bytes"], 8u64 * GIB);
    let id = g["granted"]["grant"]["id"].as_u64().unwrap();
    c.send(r#"{"status":{"tag":2}}"#);
    let s = c.recv();
    assert_eq!(s["status"]["status"]["reservations"][0]["label"], "flux");
    c.send(&format!(r#"{{"release":{{"tag":3,"id":{id}}}}}"#));
    assert_eq!(c.recv()["released"]["id"], id);
    c.send(r#"{"release":{"tag":4,"id":999}}"#);
    assert_eq!(error_kind(&c.recv()), Some("not_found"));
}

#[test]
fn binary_frames_by_hand() {
    let d = Daemon::start(&[]);
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    // Hello: length 3; variant 0 (hello); version 1 (varint); client "" (length 0).
    s.write_all(&[0, 0, 0, 3, 0, 1, 0]).unwrap();
    // Ping with tag 9: length 2; variant 5; tag 9.
    s.write_all(&[0, 0, 0, 2, 5, 9]).unwrap();
    let mut dec = Decoder::new(Encoding::Binary);
    let mut buf = ReadBuffer::new();
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while got.len() < 2 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early");
        buf.extend(&chunk[..n]);
        while let Some(m) = dec.decode::<ServerMessage>(&mut buf).unwrap() {
            got.push(m);
        }
    }
    assert!(
        matches!(got[0], ServerMessage::Welcome { version: 1, .. }),
        "{got:?}"
    );
    assert_eq!(got[1], ServerMessage::Pong { tag: 9 });
    // Pong is sent as: length 2; variant 6 (pong); tag 9.
    s.write_all(&encode(Encoding::Binary, &ClientMessage::Ping { tag: 9 }).unwrap())
        .unwrap();
    let mut raw = [0u8; 6];
    s.read_exact(&mut raw).unwrap();
    assert_eq!(raw, [0, 0, 0, 2, 6, 9]);
}

#[test]
fn malformed_and_unknown_messages_get_errors_and_the_session_goes_on() {
    let d = Daemon::start(&[]);
    let mut c = JsonConn::open(d.socket());
    c.send(r#"{"reserve":{"bytes":1024}}"#);
    assert!(c.recv().get("granted").is_some());
    c.send(r#"{"teleport":{}}"#);
    let e = c.recv();
    assert_eq!(error_kind(&e), Some("bad_request"));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown variant"),
        "{e}"
    );
    c.send("this is not json");
    assert_eq!(error_kind(&c.recv()), Some("bad_request"));
    c.send(r#"{"reserve":{"bytes":"lots"}}"#);
    assert_eq!(error_kind(&c.recv()), Some("bad_request"));
    c.send(r#"{"hello":{"version":1}}"#);
    assert_eq!(error_kind(&c.recv()), Some("bad_request"));
    // An over-long line is discarded; the session continues.
    let long = format!(r#"{{"status":{{"pad":"{}"}}}}"#, "x".repeat(70 * 1024));
    c.send(&long);
    assert_eq!(error_kind(&c.recv()), Some("line_too_long"));
    c.send(r#"{"ping":{"tag":5}}"#);
    assert_eq!(c.recv()["pong"]["tag"], 5);
    // Nothing was lost: the reservation is still held.
    c.send(r#"{"status":{}}"#);
    assert_eq!(
        c.recv()["status"]["status"]["reservations"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// A raw connection (reads bounded by [`WAIT`]) that has sent a binary hello
/// as `client`; the welcome is left unread.
fn binary_hello(d: &Daemon, client: &str) -> UnixStream {
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let hello = ClientMessage::Hello {
        version: 1,
        client: client.into(),
    };
    s.write_all(&encode(Encoding::Binary, &hello).unwrap())
        .unwrap();
    s
}

#[test]
fn oversized_frame_is_refused_and_only_that_client_is_closed() {
    let d = Daemon::start(&[]);
    let bystander = d.client();
    let kept = bystander.reserve(Request::new(GIB)).unwrap();
    let mut s = binary_hello(&d, "evil");
    // 4 GiB announced: refused before any allocation.
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let mut buf = ReadBuffer::new();
    buf.extend(&all);
    let mut dec = Decoder::new(Encoding::Binary);
    let welcome: ServerMessage = dec.decode(&mut buf).unwrap().unwrap();
    assert!(matches!(welcome, ServerMessage::Welcome { .. }));
    match dec.decode::<ServerMessage>(&mut buf).unwrap().unwrap() {
        ServerMessage::Error { kind, .. } => {
            assert_eq!(kind, vramd_protocol::ErrorKind::FrameTooLarge)
        }
        other => panic!("{other:?}"),
    }
    bystander.ping().unwrap();
    assert_eq!(bystander.status().unwrap().reservations.len(), 1);
    drop(kept);
}

#[test]
fn handshake_problems_are_explained() {
    let d = Daemon::start(&["--handshake-timeout", "300ms"]);
    // Wrong version.
    let mut c = JsonConn::connect(d.socket());
    c.send(r#"{"hello":{"version":99}}"#);
    assert_eq!(error_kind(&c.recv()), Some("version_mismatch"));
    assert!(c.closed_by_daemon());
    // A request before hello.
    let mut c = JsonConn::connect(d.socket());
    c.send(r#"{"status":{}}"#);
    let e = c.recv();
    assert_eq!(error_kind(&e), Some("bad_request"));
    assert!(e["error"]["message"].as_str().unwrap().contains("hello"));
    // A first byte that starts neither encoding.
    let mut c = JsonConn::connect(d.socket());
    c.send_raw(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(error_kind(&c.recv()), Some("bad_request"));
    // Silence: the handshake times out.
    let mut c = JsonConn::connect(d.socket());
    let e = c.recv();
    assert_eq!(error_kind(&e), Some("handshake_timeout"));
    assert!(c.closed_by_daemon());
    // Half a hello, then silence.
    let mut c = JsonConn::connect(d.socket());
    c.send_raw(br#"{"hello":"#);
    assert_eq!(error_kind(&c.recv()), Some("handshake_timeout"));
    // The daemon still serves.
    d.client().ping().unwrap();
}

#[test]
fn a_client_vanishing_mid_frame_loses_its_reservations_and_harms_nobody() {
    let d = Daemon::start(&[]);
    let obs = d.client();
    {
        let mut s = binary_hello(&d, "");
        let reserve = ClientMessage::Reserve(vramd_protocol::ReserveRequest {
            tag: 1,
            bytes: 20 * GIB,
            device: Default::default(),
            priority: 0,
            label: Some("vanishing".into()),
            timeout_ms: None,
            evictable: false,
        });
        s.write_all(&encode(Encoding::Binary, &reserve).unwrap())
            .unwrap();
        d.wait_status("one reservation", |s| s.reservations.len() == 1);
        // Half of a frame, then gone.
        let frame = encode(Encoding::Binary, &ClientMessage::Status { tag: 2 }).unwrap();
        s.write_all(&frame[..3]).unwrap();
    }
    d.wait_status("every reservation released", |s| s.reservations.is_empty());
    // The room is really free again.
    let r = obs
        .reserve(Request::new(24 * GIB).timeout(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(r.bytes(), 24 * GIB);
}

/// The socat lines in the README work verbatim.
#[test]
fn readme_socat_example_works_verbatim() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("<!-- socat-example -->")
        .expect("README has the socat example marker");
    let block = &readme[start..];
    let body_start = block
        .find("```jsonl\n")
        .expect("a ```jsonl block after the marker")
        + "```jsonl\n".len();
    let body_end = block[body_start..].find("```").expect("closing fence") + body_start;
    let lines: Vec<&str> = block[body_start..body_end]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(lines.len() >= 4, "{lines:?}");
    let d = Daemon::start(&[]);
    let mut child = Command::new("socat")
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", d.socket().display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("socat is needed for this test (scripts/test installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut replies = Vec::new();
    for line in &lines {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
        let mut reply = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut reply).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"));
        assert!(v.get("error").is_none(), "README line {line} failed: {v}");
        replies.push(v);
    }
    drop(stdin);
    let _ = child.wait();
    assert!(replies[0].get("welcome").is_some());
    assert!(replies.iter().any(|v| v.get("granted").is_some()));
    assert!(replies.iter().any(|v| v.get("status").is_some()));
    assert!(replies.iter().any(|v| v.get("released").is_some()));
}

/// `printf '...' | socat - UNIX-CONNECT:...`: the client sends every line and
/// shuts its side down at once; it still gets every answer.
#[test]
fn a_client_that_half_closes_gets_all_its_answers() {
    let d = Daemon::start(&[]);
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(
        b"{\"hello\":{\"version\":1}}\n{\"reserve\":{\"tag\":1,\"bytes\":1024}}\n{\"status\":{\"tag\":2}}\n{\"ping\":{\"tag\":3}}\n",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let kinds: Vec<String> = all
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object().unwrap().keys().next().unwrap().clone()
        })
        .collect();
    assert_eq!(kinds, ["welcome", "granted", "status", "pong"], "{all}");
    // The connection is gone, so is its reservation.
    d.wait_status("every reservation released", |s| s.reservations.is_empty());
}
