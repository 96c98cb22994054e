//! Real processes: a holder killed with SIGKILL, and `vramctl` end to end.

use std::process::Child;
use std::time::{Duration, Instant};

use vramd_client::{GIB, Progress, Request};
use vramd_tests::{Daemon, WAIT};

fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "child did not exit in time");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigkill_of_the_holder_grants_the_waiter() {
    let d = Daemon::start(&[]);
    let mut holder = d.hold("20GiB");
    let c = d.client();
    let s = c.status().unwrap();
    assert_eq!(
        s.reservations[0].pid,
        holder.id(),
        "reservation attributed to the holder's pid"
    );
    let mut p = c.submit(Request::new(10 * GIB)).unwrap();
    assert!(matches!(
        p.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { .. })
    ));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(holder.id() as i32, libc::SIGKILL) };
    match p.next(Some(WAIT)).unwrap() {
        Some(Progress::Granted(r)) => assert_eq!(r.bytes(), 10 * GIB),
        other => panic!("expected a grant after SIGKILL, got {other:?}"),
    }
    let _ = wait_child(&mut holder);
    let s = c.status().unwrap();
    assert_eq!(s.counters.disconnect_releases, 1);
    assert!(
        d.log().contains("released (connection closed)"),
        "{}",
        d.log()
    );
}

#[test]
fn vramctl_reserve_releases_on_sigint_and_sigterm() {
    let d = Daemon::start(&[]);
    let c = d.client();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut holder = d.hold("4GiB");
        assert_eq!(c.status().unwrap().reservations.len(), 1);
        // SAFETY: as above.
        unsafe { libc::kill(holder.id() as i32, sig) };
        let status = wait_child(&mut holder);
        assert!(status.success(), "{status:?}");
        d.wait_status("every reservation released", |s| s.reservations.is_empty());
    }
    // Released explicitly, not by the connection closing.
    assert_eq!(c.status().unwrap().counters.disconnect_releases, 0);
}

#[test]
fn vramctl_run_sets_the_environment_and_passes_the_exit_status() {
    let d = Daemon::start(&["--simulate", "8GiB"]);
    let out = d
        .vramctl()
        .args([
            "run", "--vram", "6GiB", "--device", "1", "--label", "job", "--",
        ])
        .args([
            "sh",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES $VRAMD_RESERVATION $VRAMD_DEVICE_UUID $VRAMD_BYTES; exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields[0], "1");
    assert!(fields[1].parse::<u64>().is_ok(), "{stdout}");
    assert_eq!(fields[2], "SIM-1");
    assert_eq!(fields[3], (6 * GIB).to_string());
    let c = d.client();
    d.wait_status("every reservation released", |s| s.reservations.is_empty());
    assert_eq!(c.status().unwrap().counters.grants, 1);
}

#[test]
fn vramctl_run_holds_the_memory_while_the_command_runs() {
    let d = Daemon::start(&[]);
    let c = d.client();
    let mut child = d
        .vramctl()
        .args(["run", "--vram", "20GiB", "--", "sleep", "30"])
        .spawn()
        .unwrap();
    d.wait_status("one reservation", |s| s.reservations.len() == 1);
    let err = c
        .reserve(Request::new(10 * GIB).timeout(Duration::from_millis(100)))
        .unwrap_err();
    assert!(matches!(err, vramd_client::Error::WaitTimeout(_)));
    // SIGTERM to vramctl is forwarded to the command; vramctl exits with its status.
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut child);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    d.wait_status("every reservation released", |s| s.reservations.is_empty());
}

#[test]
fn vramctl_run_times_out_with_75_and_never_runs_the_command() {
    let d = Daemon::start(&[]);
    let c = d.client();
    let _full = c.reserve(Request::new(24 * GIB)).unwrap();
    let marker = d.dir().join("ran");
    let out = d
        .vramctl()
        .args(["run", "--vram", "1GiB", "--timeout", "300ms", "--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    assert!(!marker.exists(), "the command ran without a grant");
}

#[test]
fn vramctl_status_prints_json_and_tables() {
    let d = Daemon::start(&[]);
    let c = d.client();
    let _r = c.reserve(Request::new(8 * GIB).label("flux")).unwrap();
    let out = d.vramctl().args(["status", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dev = &v["devices"][0];
    for key in [
        "index",
        "uuid",
        "name",
        "total_bytes",
        "used_bytes",
        "reserved_bytes",
        "available_bytes",
    ] {
        assert!(dev.get(key).is_some(), "devices[0] lacks {key}: {dev}");
    }
    assert_eq!(dev["reserved_bytes"], 8 * GIB);
    assert_eq!(dev["available_bytes"], 16 * GIB);
    let r = &v["reservations"][0];
    for key in ["id", "device", "bytes", "label", "pid", "uid", "age_ms"] {
        assert!(r.get(key).is_some(), "reservations[0] lacks {key}: {r}");
    }
    assert_eq!(r["label"], "flux");
    assert!(v["queue"].as_array().unwrap().is_empty());
    for key in [
        "grants",
        "releases",
        "disconnect_releases",
        "timeouts",
        "refusals",
    ] {
        assert!(v["counters"].get(key).is_some(), "counters lack {key}");
    }
    let out = d.vramctl().arg("status").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("SIM-0") && text.contains("flux") && text.contains("16.00 GiB"),
        "{text}"
    );
}

#[test]
fn vramctl_without_a_daemon_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let out = std::process::Command::new(vramd_tests::bin("vramctl"))
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not running") && err.contains("nobody.sock"),
        "{err}"
    );
}
