//! Starts and watches `vramd` processes for the end-to-end tests (tests/) and
//! the benchmark (bench/), so both run the daemon the same way: in a private
//! temporary directory holding its socket and its log, waited for until it
//! accepts connections, and killed and reaped when its guard drops (also
//! while a panic unwinds). Every wait here has a deadline.
//!
//! The caller builds the [`Command`] (program, arguments, environment, log
//! options); [`Daemon`] adds the socket and the plumbing.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// Name of the daemon's log file in its directory.
pub const LOG_FILE_NAME: &str = "vramd.log";

/// Name of the daemon's socket in its directory (when the caller does not
/// choose another path).
pub const SOCKET_FILE_NAME: &str = "vramd.sock";

/// How often the waits here look again.
const POLL: Duration = Duration::from_millis(5);

/// What can go wrong starting a daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The temporary directory or the log file could not be created.
    #[error("cannot prepare {}: {source}", path.display())]
    Prepare {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The program could not be started.
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The daemon exited before it accepted a connection.
    #[error("vramd did not start listening: it exited ({status}); log:\n{log}")]
    Exited {
        /// How it exited.
        status: ExitStatus,
        /// Its log.
        log: String,
    },
    /// The daemon did not accept a connection in time.
    #[error("vramd did not start listening within {timeout:?}; log:\n{log}")]
    NotListening {
        /// How long it was given.
        timeout: Duration,
        /// Its log so far.
        log: String,
    },
}

/// Creates a private temporary directory (mode 0700) named `<prefix>XXXXXX`
/// under `$TMPDIR`, removed when the returned guard drops.
pub fn private_tempdir(prefix: &str) -> io::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// Makes `cmd`'s child get SIGKILL when the thread that spawns it ends (the
/// whole harness included, even when it is killed itself). Spawn from a
/// thread that outlives the child: the signal follows the thread that
/// forked, not the process.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    /// `None` once [`ChildGuard::kill`] ran.
    child: Option<Child>,
    pid: u32,
    /// Set when a wait reaped it: from then on its pid may be another's.
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` as it is.
    pub fn spawn(cmd: &mut Command) -> io::Result<ChildGuard> {
        Ok(ChildGuard::new(cmd.spawn()?))
    }

    /// Guards a child spawned already.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            pid: child.id(),
            child: Some(child),
            exited: None,
        }
    }

    /// Its process id (still the same after it was reaped).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child, for its pipes. Panics once [`ChildGuard::kill`] ran.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child is running")
    }

    /// Waits up to `timeout` for it to exit by itself; `None` if it did not
    /// (or was killed by [`ChildGuard::kill`] already).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => {
                    self.exited = Some(s);
                    return Some(s);
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => return None,
            }
        }
    }

    /// Whether it is still running (not exited, not killed).
    pub fn alive(&mut self) -> bool {
        self.child.is_some() && self.wait_timeout(Duration::ZERO).is_none()
    }

    /// Sends signal `sig` to it; does nothing once it was reaped (its pid
    /// may belong to another process by then). Only the waits here reap it,
    /// and they take `&mut self`, so the pid is its own while this runs.
    pub fn signal(&self, sig: i32) {
        if self.child.is_some() && self.exited.is_none() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `vramd` started on a socket in a temporary directory, with its log
/// (stderr) in a file there; killed and reaped when dropped, then the
/// directory goes.
#[derive(Debug)]
pub struct Daemon {
    // Field order matters: the process dies before its directory goes.
    child: ChildGuard,
    socket: PathBuf,
    dir: TempDir,
}

impl Daemon {
    /// Starts `cmd` on a socket in a new private temporary directory (see
    /// [`Daemon::spawn`]) and waits up to `timeout` until it accepts
    /// connections.
    pub fn start(cmd: Command, timeout: Duration) -> Result<Daemon, Error> {
        let tmp = std::env::temp_dir();
        let dir =
            private_tempdir("vramd-").map_err(|source| Error::Prepare { path: tmp, source })?;
        let socket = dir.path().join(SOCKET_FILE_NAME);
        let mut d = Daemon::spawn(cmd, dir, socket)?;
        d.wait_listening(timeout)?;
        Ok(d)
    }

    /// Spawns `cmd` with `--socket socket` added, stdin and stdout null,
    /// stderr to [`LOG_FILE_NAME`] in `dir` and `VRAMD_SOCKET` removed from
    /// its environment; returns without waiting. The caller sets the rest:
    /// arguments, environment (`RUST_LOG`), [`die_with_parent`].
    pub fn spawn(mut cmd: Command, dir: TempDir, socket: PathBuf) -> Result<Daemon, Error> {
        let log_path = dir.path().join(LOG_FILE_NAME);
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Prepare {
            path: log_path,
            source,
        })?;
        cmd.arg("--socket")
            .arg(&socket)
            .env_remove("VRAMD_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = ChildGuard::spawn(&mut cmd).map_err(|source| Error::Spawn {
            program: PathBuf::from(cmd.get_program()),
            source,
        })?;
        Ok(Daemon { child, socket, dir })
    }

    /// Waits up to `timeout` until the daemon accepts a connection on its
    /// socket; fails at once, with its log, if it exits first.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.wait_timeout(Duration::ZERO) {
                return Err(Error::Exited {
                    status,
                    log: self.log(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::NotListening {
                    timeout,
                    log: self.log(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temporary directory holding the log (and the socket, unless the
    /// caller chose another path).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG_FILE_NAME)).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    /// Sends it signal `sig` (nothing once it was reaped).
    pub fn signal(&self, sig: i32) {
        self.child.signal(sig);
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child.alive()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn sh(script: &str) -> Command {
        // `sh -c SCRIPT --socket PATH`: the added arguments become $0 and $1.
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[test]
    fn a_daemon_that_exits_first_is_reported_with_its_log() {
        let e = Daemon::start(sh("echo oops >&2; exit 3"), Duration::from_secs(10)).unwrap_err();
        match &e {
            Error::Exited { status, log } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(log, "oops\n");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string().starts_with("vramd did not start listening"),
            "{e}"
        );
    }

    #[test]
    fn waiting_ends_when_the_socket_accepts_or_the_time_is_up() {
        let dir = private_tempdir("vramd-harness-").unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let socket = dir.path().join("s.sock");
        let mut d =
            Daemon::spawn(sh("echo \"$0 $1\" >&2; exec sleep 30"), dir, socket.clone()).unwrap();
        let t = Instant::now();
        let e = d.wait_listening(Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, Error::NotListening { .. }), "{e:?}");
        assert!(t.elapsed() >= Duration::from_millis(200));
        let _listener = UnixListener::bind(&socket).unwrap();
        d.wait_listening(Duration::from_secs(10)).unwrap();
        assert_eq!(d.socket(), socket);
        assert_eq!(d.log(), format!("--socket {}\n", socket.display()));
        assert!(d.alive());
    }

    #[test]
    fn a_signal_reaches_the_child_until_it_is_reaped() {
        let mut d = Daemon::spawn(
            sh("exec sleep 30"),
            tempfile::tempdir().unwrap(),
            PathBuf::from("/nonexistent/s.sock"),
        )
        .unwrap();
        assert!(d.alive());
        assert_eq!(d.wait_exit(Duration::from_millis(50)), None);
        d.signal(libc::SIGTERM);
        let status = d.wait_exit(Duration::from_secs(10)).expect("exits");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(!d.alive());
        // Reaped: its pid is no longer its own, so nothing is sent.
        d.signal(libc::SIGKILL);
    }

    #[test]
    fn dropping_the_guard_kills_and_reaps_the_child() {
        let g = ChildGuard::spawn(Command::new("sleep").arg("30")).unwrap();
        let pid = g.pid();
        drop(g);
        // SAFETY: signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid as libc::pid_t, 0) } != 0;
        assert!(gone, "pid {pid} still exists after the guard dropped");
    }
}
