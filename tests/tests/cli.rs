//! The command lines' messages and exit statuses: `vramctl`'s distinct exit
//! statuses (listed in its `--help`), `--json` events, completions and man
//! pages; `vramd`'s start-up checks (sizes, log level, config file).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vramd_tests::{Daemon, WAIT, bin};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON events `out` printed, one per line.
fn events(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn vramctl_at(socket: &std::path::Path) -> Command {
    let mut c = Command::new(bin("vramctl"));
    c.env("VRAMD_SOCKET", socket);
    c
}

#[test]
fn help_lists_every_exit_status() {
    let out = Command::new(bin("vramctl")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = stdout(&out);
    for line in [
        "Exit statuses:",
        "  64   usage error",
        "  65   request refused",
        "  69   vramd unreachable",
        "  75   the wait limit",
        "  77   permission denied",
        "  78   run --enforce: no usable NVIDIA MPS server",
        "  130  interrupted",
    ] {
        assert!(help.contains(line), "{line:?} missing from:\n{help}");
    }
}

#[test]
fn a_size_without_a_unit_is_a_usage_error_with_a_hint() {
    // No daemon anywhere: a usage error is found before connecting, and
    // does not look like "daemon not running" (69).
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    for (args, hint) in [
        (&["reserve", "8"][..], "did you mean 8GiB?"),
        (&["reserve", "0"][..], "did you mean 0GiB?"),
        (
            &["run", "--vram", "24", "--", "true"][..],
            "did you mean 24GiB?",
        ),
        (&["reserve", "24G"][..], "24GiB"),
    ] {
        let out = vramctl_at(&socket).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(hint), "{args:?}: {}", stderr(&out));
    }
    let out = vramctl_at(&socket).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

#[test]
fn an_unreachable_daemon_exits_69_and_says_so_in_json_too() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let out = vramctl_at(&socket)
        .args(["reserve", "1GiB", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let ev = events(&out);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["event"], "error");
    assert_eq!(ev[0]["kind"], "unreachable");
    assert_eq!(ev[0]["exit_status"], 69);
    assert!(stderr(&out).contains("nobody.sock"), "{}", stderr(&out));
}

#[test]
fn a_refused_request_exits_65_not_like_an_unreachable_daemon() {
    let d = Daemon::start(&[]);
    for size in ["0B", "30GiB"] {
        let out = d.vramctl().args(["reserve", size]).output().unwrap();
        assert_eq!(out.status.code(), Some(65), "{size}: {}", stderr(&out));
        assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
    }
    let out = d
        .vramctl()
        .args(["run", "--vram", "30GiB", "--json", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let ev = events(&out);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0]["event"].as_str(), ev[0]["kind"].as_str()),
        (Some("error"), Some("refused"))
    );
    d.client().ping().expect("the daemon still serves");
}

#[test]
fn permission_denied_exits_77_naming_owner_group_mode_and_how_to_join() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("vramd.sock");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // Root may open anything, so the client runs as nobody; anyone else is
    // kept out of a socket of mode 0000, their own included.
    let mode = if root { "0660" } else { "0000" };
    let mut d = Daemon::spawn_at(
        tempfile::tempdir().unwrap(),
        socket.clone(),
        &["--simulate", "24GiB", "--socket-mode", mode],
    );
    assert!(
        vramd_tests::wait_until(WAIT, || socket.exists()),
        "{}",
        d.log()
    );
    let mut cmd = if root {
        // A copy nobody may run, whatever the permissions above target/.
        let copy = dir.path().join("vramctl");
        std::fs::copy(bin("vramctl"), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = Command::new(copy);
        // Setting the uid also drops root's supplementary groups.
        c.uid(65534).gid(65534);
        c
    } else {
        Command::new(bin("vramctl"))
    };
    cmd.env("VRAMD_SOCKET", &socket).arg("status");
    // A child that another test thread forks while the copy is being
    // written holds it open for a moment: exec then says "text file busy".
    let deadline = Instant::now() + WAIT;
    let out = loop {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                assert!(Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.unwrap(),
        }
    };
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    let err = stderr(&out);
    let meta = std::fs::metadata(&socket).unwrap();
    let (owner, group) = names(&meta);
    for want in [
        "permission denied".to_string(),
        socket.display().to_string(),
        format!("owner {owner}"),
        format!("group {group}"),
        format!("mode {mode}"),
        format!("sudo usermod -aG {group} $USER"),
        "log in again".to_string(),
    ] {
        assert!(err.contains(&want), "{want:?} missing from {err:?}");
    }
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(d.alive(), "{}", d.log());
}

/// The user and group names of a file's owner (as `ls -l` shows them).
fn names(meta: &std::fs::Metadata) -> (String, String) {
    use std::os::unix::fs::MetadataExt;
    let name = |cmd: &str, id: u32| {
        let o = Command::new("getent")
            .args([cmd, &id.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split(':')
            .next()
            .filter(|n| !n.trim().is_empty())
            .map_or(id.to_string(), |n| n.trim().to_string())
    };
    (name("passwd", meta.uid()), name("group", meta.gid()))
}

#[test]
fn reserve_json_prints_one_event_per_line() {
    let d = Daemon::start(&[]);
    let mut holder = d
        .vramctl()
        .args(["reserve", "20GiB", "--json", "--label", "holder"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let granted: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(granted["event"], "granted");
    assert_eq!(granted["bytes"], 20u64 << 30);
    assert_eq!(granted["device"], 0);
    assert_eq!(granted["device_uuid"], "SIM-0");
    let id = granted["id"].as_u64().unwrap();

    // A waiter reports its place in the queue, what blocks it, then its
    // wait limit.
    let out = d
        .vramctl()
        .args(["reserve", "10GiB", "--json", "--timeout", "300ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let ev = events(&out);
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert_eq!(ev[0]["event"], "queued");
    assert_eq!(ev[0]["position"], 1);
    assert_eq!(ev[1]["event"], "blocked");
    assert_eq!(ev[1]["needs_bytes"], 10u64 << 30);
    assert_eq!(ev[1]["held_by"][0]["reservation"], id);
    assert_eq!(ev[1]["held_by"][0]["pid"], holder.id());
    assert_eq!(ev[2]["event"], "error");
    assert_eq!(ev[2]["kind"], "wait_timeout");
    assert_eq!(ev[2]["exit_status"], 75);

    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(holder.id() as i32, libc::SIGTERM) };
    let released: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(released["event"], "released");
    assert_eq!(released["id"], id);
    assert!(lines.next().is_none(), "one event per line, nothing else");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = holder.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vramctl reserve did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut holder.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.is_empty(), "--json keeps stderr for errors: {err:?}");
}

#[test]
fn run_json_reports_the_grant_the_exit_and_the_release() {
    let d = Daemon::start(&[]);
    let out = d
        .vramctl()
        .args([
            "run", "--vram", "1GiB", "--json", "--", "sh", "-c", "exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let ev = events(&out);
    let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["granted", "exited", "released"], "{ev:?}");
    assert_eq!(ev[0]["bytes"], 1u64 << 30);
    assert_eq!(ev[1]["code"], 3);
    assert_eq!(ev[1]["signal"], Value::Null);
    assert_eq!(ev[2]["id"], ev[0]["id"]);
}

#[test]
fn completions_and_man_pages_are_generated() {
    for (shell, marker) in [
        ("bash", "_vramctl()"),
        ("zsh", "#compdef vramctl"),
        ("fish", "complete -c vramctl"),
    ] {
        let out = Command::new(bin("vramctl"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("reserve") && text.contains("json"), "{shell}");
    }
    let out = Command::new(bin("vramctl")).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = stdout(&out);
    assert!(page.contains(".TH vramctl 1"), "{page}");
    assert!(
        page.contains("Exit statuses"),
        "the exit statuses are in the man page"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("vramctl"))
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "vramctl.1",
        "vramctl-reserve.1",
        "vramctl-run.1",
        "vramctl-status.1",
        "vramctl-ps.1",
        "vramctl-top.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie"), "{page}: {text}");
        assert!(stdout(&out).contains(page));
    }
}

#[test]
fn vramd_prints_its_man_page_with_the_flags_and_defaults() {
    let out = Command::new(bin("vramd")).arg("--man").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains(".TH vramd 8"), "{page}");
    for flag in [
        "simulate",
        "config",
        "admin\\-group",
        "max\\-bytes\\-per\\-uid",
        "log\\-format",
    ] {
        assert!(page.contains(flag), "{flag} missing from the man page");
    }
}

/// Runs `vramd` with `args` on a socket in a temporary directory, for
/// start-up checks that stop it before it serves (a command that passed
/// them would be killed by the harness's time limit, failing the test).
fn vramd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new("timeout")
        .arg("20")
        .arg(bin("vramd"))
        .args(args)
        .arg("--socket")
        .arg(dir.path().join("x.sock"))
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn vramd_refuses_a_size_without_a_unit_with_a_hint() {
    for (args, hint) in [
        (&["--simulate", "24"][..], "did you mean 24GiB?"),
        (
            &["--simulate", "24GiB", "--cushion", "512"][..],
            "did you mean 512GiB?",
        ),
        (
            &["--simulate", "24GiB", "--max-bytes-per-uid", "8"][..],
            "did you mean 8GiB?",
        ),
    ] {
        let out = vramd(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(hint), "{args:?}: {}", stderr(&out));
    }
    // The Kubernetes spelling and plain bytes with B are sizes.
    let d = Daemon::start_raw(&["--simulate", "24Gi", "--cushion", "4096B"]);
    let s = d.client().status().unwrap();
    assert_eq!(s.devices[0].total_bytes, 24 << 30);
}

#[test]
fn vramd_refuses_an_unknown_log_level_naming_the_valid_ones() {
    let out = vramd(&["--simulate", "24GiB", "--log-level", "warning"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("\"warning\"") && err.contains("error, warn, info, debug, trace, off"),
        "{err}"
    );
    let out = vramd(&["--simulate", "24GiB"], &[("RUST_LOG", "inof")]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with("vramd: RUST_LOG: unknown log level \"inof\""),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_missing_config_file_is_reported_once_on_one_line() {
    let out = vramd(
        &["--simulate", "24GiB", "--config", "/nonexistent/vramd.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.matches("/nonexistent/vramd.toml").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("vramd: cannot read config file"), "{err}");
}

#[test]
fn consumer_keys_stop_the_start_with_where_they_moved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vramd.toml");
    std::fs::write(
        &path,
        "[eviction]\ndeadline = \"30s\"\nconsumer_poll_interval = \"2s\"\n\n\
         [[consumer]]\nname = \"images\"\nkind = \"comfyui\"\nurl = \"http://127.0.0.1:8188\"\n\n\
         [[consumer]]\nname = \"whisper\"\nkind = \"command\"\nunload_command = \"true\"\nvram = \"1GiB\"\n",
    )
    .unwrap();
    let out = vramd(
        &["--simulate", "24GiB", "--config", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    for want in [
        path.to_str().unwrap(),
        "[[consumer]] (\"images\", \"whisper\")",
        "eviction.consumer_poll_interval",
        "moved to vramd-gateway",
        "[[app]]",
        "kind \"comfyui\" becomes",
        "kind \"command\" becomes",
        "\"Moving from vramd's consumers\" in docs/gateway.md",
        "\"Moving an old config\" in docs/configuration.md",
    ] {
        assert!(err.contains(want), "missing {want:?}: {err}");
    }
}

#[test]
fn a_config_with_daemon_settings_only_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vramd.toml");
    std::fs::write(&path, include_str!("../../docs/examples/vramd.toml")).unwrap();
    let d = Daemon::start(&["--config", path.to_str().unwrap()]);
    d.client().ping().unwrap();
    assert!(d.client().status().unwrap().consumers.is_empty());
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let d = Daemon::start(&["--log-format", "json"]);
    d.client().ping().unwrap();
    let log = d.log();
    let mut n = 0;
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        n += 1;
    }
    assert!(log.contains("\"message\":\"listening\""), "{log}");
    assert!(n >= 2, "{log}");
}
